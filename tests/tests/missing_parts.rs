//! No silently missing parts (issue 17): for every HF golden-fixture family, each tensor of the block's state dict
//! is removed in turn and the case loaded again. Every removal is refused with a missing-tensor error naming the
//! tensor, since each fixture's config declares every part it has; and where a config says a part is absent
//! (Qwen2-MoE `shared_expert_intermediate_size = 0`, DeepSeek-V3 `n_shared_experts = 0`), the block loads without
//! its tensors.

use std::path::Path;

use moe_models::LoadError;
use moe_models::fixture::{FixtureCase, Manifest, ManifestCase};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/hf");

/// A fresh, unique temporary directory, removed when dropped.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-missing-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// Writes `src` without the tensors `drop` to `dst`.
fn without(src: &[u8], drop: &[&str], dst: &Path) {
    let st = SafeTensors::deserialize(src).expect("fixture parses");
    let kept: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !drop.contains(&n.as_str()))
        .map(|(n, v)| {
            let view = TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).expect("view");
            (n, view)
        })
        .collect();
    let bytes = safetensors::serialize(kept, None).expect("serialize");
    std::fs::write(dst, bytes).expect("write");
}

/// The block's own tensors (not `ref.*`) of a case file.
fn block_tensors(src: &[u8]) -> Vec<String> {
    let st = SafeTensors::deserialize(src).expect("fixture parses");
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("ref."))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// `case` with its file renamed and no recorded size or digest (the file is a modified copy).
fn copy_case(case: &ManifestCase, file: &str) -> ManifestCase {
    ManifestCase {
        file: file.to_string(),
        bytes: None,
        sha256: None,
        ..case.clone()
    }
}

#[test]
fn every_tensor_of_every_family_is_required() {
    let dir = Path::new(FIXTURES);
    let manifest = Manifest::read(dir).expect("manifest");
    let tmp_guard = temp_dir("each");
    let tmp = tmp_guard.path();
    let mut checked = 0;
    for case in &manifest.cases {
        let src = std::fs::read(dir.join(&case.file)).expect("fixture");
        // The full copy loads: what fails below fails for the missing tensor alone.
        without(&src, &[], &tmp.join("full.safetensors"));
        FixtureCase::load(tmp, &copy_case(case, "full.safetensors")).expect("full copy loads");
        for name in block_tensors(&src) {
            let file = format!("{}-without-{name}.safetensors", case.name);
            without(&src, &[name.as_str()], &tmp.join(&file));
            let err = FixtureCase::load(tmp, &copy_case(case, &file))
                .map(|_| ())
                .expect_err(&format!("{}: loaded without {name}", case.name));
            assert!(
                matches!(err, LoadError::MissingTensor { .. }),
                "{}: without {name}: {err}",
                case.name
            );
            assert!(
                err.to_string().contains(&name),
                "{}: the error does not name {name}: {err}",
                case.name
            );
            let _ = std::fs::remove_file(tmp.join(&file));
            checked += 1;
        }
    }
    assert!(checked >= 9 * 3, "{checked} removals checked");
}

/// Where the config says a part is absent, its tensors are not needed (and not loaded).
#[test]
fn parts_the_config_declares_absent_are_not_required() {
    let dir = Path::new(FIXTURES);
    let manifest = Manifest::read(dir).expect("manifest");
    let tmp_guard = temp_dir("absent");
    let tmp = tmp_guard.path();
    let cases: [(&str, &str, &[&str]); 2] = [
        (
            "qwen2_moe",
            "shared_expert_intermediate_size",
            &[
                "shared_expert.gate_proj.weight",
                "shared_expert.up_proj.weight",
                "shared_expert.down_proj.weight",
                "shared_expert_gate.weight",
            ],
        ),
        (
            "deepseek_v3",
            "n_shared_experts",
            &[
                "shared_experts.gate_proj.weight",
                "shared_experts.up_proj.weight",
                "shared_experts.down_proj.weight",
            ],
        ),
    ];
    for (name, key, drop) in cases {
        let case = manifest
            .cases
            .iter()
            .find(|c| c.name == name)
            .expect("case");
        let src = std::fs::read(dir.join(&case.file)).expect("fixture");
        let file = format!("{name}-no-shared.safetensors");
        without(&src, drop, &tmp.join(&file));
        let mut c = copy_case(case, &file);
        c.routing[key] = serde_json::json!(0);
        let fx = FixtureCase::load(tmp, &c)
            .unwrap_or_else(|e| panic!("{name} with {key} = 0 and no shared tensors: {e}"));
        assert!(fx.layer.shared().is_none(), "{name}: no shared expert");
        // The same file with the config declaring the part: refused, naming a shared tensor.
        let err = FixtureCase::load(tmp, &copy_case(case, &file))
            .map(|_| ())
            .expect_err("declared shared part missing");
        assert!(
            drop.iter().any(|d| err.to_string().contains(d)),
            "{name}: {err}"
        );
    }
}
