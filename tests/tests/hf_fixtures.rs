//! Hugging Face golden fixtures through `moe-models`: every family at 1e-5 relative (the verifier's formula,
//! `max |ours − ref| / max |ref|`), a sharded bf16 many-layer checkpoint in Hub naming, and one test per kind of
//! bad file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::{Backend, MoeLayer, RouterInput};
use moe_models::fixture::{FixtureCase, Manifest};
use moe_models::{Checkpoint, Family, LoadError, MoeConfig};
use moe_verify::{self as verify, TOLERANCE};
use ndarray::Array2;
use safetensors::tensor::{Dtype, TensorView};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest parses")
}

/// Runs the verifier on one case and asserts that every quantity passes at [`TOLERANCE`].
fn check_case(name: &str) {
    let m = manifest();
    let case = m
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("case {name} not in the manifest"));
    let rep = verify::verify_case(&fixtures(), case, &CpuBackend::new()).expect("the case runs");
    for q in &rep.quantities {
        assert!(
            q.passed,
            "{name}: {} = {:e} ({:?})",
            q.name, q.value, q.measure
        );
    }
    assert!(rep.passed, "{name}: {rep:?}");
    assert!(rep.max_rel_err() <= TOLERANCE);
    // Output and routing are always among the compared quantities.
    for must in ["output", "topk_indices", "router_logits"] {
        assert!(
            rep.quantities.iter().any(|q| q.name == must),
            "{name}: {must} not compared"
        );
    }
}

macro_rules! family_tests {
    ($($test:ident => $case:literal),* $(,)?) => {
        $(#[test] fn $test() { check_case($case); })*
    };
}

family_tests! {
    mixtral => "mixtral",
    qwen2_moe => "qwen2_moe",
    olmoe => "olmoe",
    deepseek_v3 => "deepseek_v3",
    switch_transformers => "switch_transformers",
    nllb_moe => "nllb_moe",
    granitemoe => "granitemoe",
    jetmoe => "jetmoe",
    gpt_oss => "gpt_oss",
}

#[test]
fn verify_dir_covers_every_family() {
    let reports = verify::verify_dir(fixtures(), &CpuBackend::new()).expect("manifest reads");
    assert_eq!(reports.len(), Family::ALL.len());
    assert!(reports.iter().all(|r| r.passed), "{reports:#?}");
}

/// A fresh, unique temporary directory, removed when dropped.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-hf-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

/// Tensors to write: name, dtype, shape, little-endian bytes.
type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn write_safetensors(path: &Path, tensors: &Raw) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| {
            (
                n.clone(),
                TensorView::new(*dt, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect()
}

fn run(layer: MoeLayer, x: &Array2<f32>) -> Array2<f32> {
    let mut dev = CpuBackend::new().upload(Arc::new(layer)).expect("upload");
    dev.forward(&RouterInput::new(x.view()))
        .expect("forward")
        .output
}

/// Mixtral's fixture, rounded to bf16, written as a two-layer, two-shard checkpoint in Hub naming
/// (`model.layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight`) with an index, loads to exactly the layer
/// that the fused f32 file with the same bf16-rounded values gives (same f32 weights, so the outputs are equal
/// bit for bit), and stays within 3e-2 relative of transformers' f32 output (bf16 keeps 8 bits of mantissa:
/// about 4e-3 per weight, accumulated over two products).
#[test]
fn sharded_bf16_hub_checkpoint_matches_fused_f32() {
    let fix = Checkpoint::open(fixtures().join("mixtral.safetensors")).expect("fixture");
    let gate = fix.tensor("gate.weight").expect("gate");
    let gu = fix.tensor("experts.gate_up_proj").expect("gate_up");
    let down = fix.tensor("experts.down_proj").expect("down");
    let (e, f2, d) = (gu.shape[0], gu.shape[1], gu.shape[2]);
    let f = f2 / 2;
    let input = fix.tensor("ref.input").expect("input");
    let reference = fix.tensor("ref.output").expect("output");
    let x = Array2::from_shape_vec((input.data.len() / d, d), input.data.clone()).expect("x");

    let dir_guard = temp_dir("sharded");
    let dir = dir_guard.path();
    let mut shards: [Raw; 2] = [Vec::new(), Vec::new()];
    for (layer, shard) in shards.iter_mut().enumerate() {
        let p = format!("model.layers.{layer}.block_sparse_moe.");
        // Layer 0 gets the weights negated, so picking the wrong layer would show.
        let sign = if layer == 0 { -1.0 } else { 1.0 };
        let signed = |v: &[f32]| v.iter().map(|x| sign * x).collect::<Vec<f32>>();
        shard.push((
            format!("{p}gate.weight"),
            Dtype::BF16,
            vec![e, d],
            bf16_bytes(&signed(&gate.data)),
        ));
        for ex in 0..e {
            let gu_e = &gu.data[ex * f2 * d..(ex + 1) * f2 * d];
            let (w1, w3) = gu_e.split_at(f * d);
            let w2 = &down.data[ex * d * f..(ex + 1) * d * f];
            for (name, data, shape) in [("w1", w1, [f, d]), ("w3", w3, [f, d]), ("w2", w2, [d, f])]
            {
                shard.push((
                    format!("{p}experts.{ex}.{name}.weight"),
                    Dtype::BF16,
                    shape.to_vec(),
                    bf16_bytes(&signed(data)),
                ));
            }
        }
    }
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        write_safetensors(&dir.join(&file), shard);
        for (n, ..) in shard {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let config = serde_json::json!({
        "model_type": "mixtral", "num_local_experts": e, "num_experts_per_tok": 2, "hidden_size": d,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let sharded = moe_models::load_layer(dir, 1).expect("sharded layer 1 loads");
    // Per-expert Hub tensors are named by pattern, with the layer's prefix, and resolve in the sharded checkpoint.
    let hub = Checkpoint::open(dir).expect("index opens");
    let p = "model.layers.1.block_sparse_moe.";
    for param in sharded.params() {
        let hf = param
            .hf_name
            .clone()
            .expect("every parameter has an HF name");
        let shape = hf_shape(&hub, &hf, e).expect("the HF name resolves");
        assert_eq!(squeeze(&shape), squeeze(param.shape()), "{hf}");
        if param.name == "experts.gate_up" {
            assert_eq!(
                hf,
                format!("{p}experts.{{e}}.w1.weight + {p}experts.{{e}}.w3.weight")
            );
        }
    }

    // The fused f32 file with the same bf16-rounded values.
    let fused_path = dir.join("fused.safetensors");
    write_safetensors(
        &fused_path,
        &vec![
            (
                "gate.weight".into(),
                Dtype::F32,
                vec![e, d],
                f32_bytes(&bf16_round(&gate.data)),
            ),
            (
                "experts.gate_up_proj".into(),
                Dtype::F32,
                vec![e, f2, d],
                f32_bytes(&bf16_round(&gu.data)),
            ),
            (
                "experts.down_proj".into(),
                Dtype::F32,
                vec![e, d, f],
                f32_bytes(&bf16_round(&down.data)),
            ),
        ],
    );
    let cfg = MoeConfig::from_file(dir.join("config.json")).expect("config");
    let fused = moe_models::load_layer_with_prefix(&fused_path, &cfg, "").expect("fused loads");

    let y_sharded = run(sharded, &x);
    let y_fused = run(fused, &x);
    assert_eq!(
        y_sharded, y_fused,
        "same f32 weights must give the same bits"
    );
    let scale = reference.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = y_sharded
        .iter()
        .zip(&reference.data)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(err < 3e-2, "bf16 checkpoint vs f32 reference: {err}");
}

/// A small valid Mixtral block state dict (E = 2, d = 4, f = 3) as raw tensors.
fn small_mixtral() -> Raw {
    let (e, d, f) = (2usize, 4usize, 3usize);
    let vals = |n: usize| {
        (0..n)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<f32>>()
    };
    vec![
        (
            "gate.weight".into(),
            Dtype::F32,
            vec![e, d],
            f32_bytes(&vals(e * d)),
        ),
        (
            "experts.gate_up_proj".into(),
            Dtype::F32,
            vec![e, 2 * f, d],
            f32_bytes(&vals(e * 2 * f * d)),
        ),
        (
            "experts.down_proj".into(),
            Dtype::F32,
            vec![e, d, f],
            f32_bytes(&vals(e * d * f)),
        ),
    ]
}

fn small_cfg() -> MoeConfig {
    MoeConfig::new(Family::Mixtral, 2, 1)
}

fn load(path: &Path) -> Result<MoeLayer, LoadError> {
    moe_models::load_layer_with_prefix(path, &small_cfg(), "")
}

#[test]
fn small_valid_file_loads() {
    let dir_guard = temp_dir("valid");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    write_safetensors(&p, &small_mixtral());
    let layer = load(&p).expect("valid file loads");
    assert_eq!((layer.n_experts(), layer.d_model()), (2, 4));
}

#[test]
fn truncated_file() {
    let dir_guard = temp_dir("truncated");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    write_safetensors(&p, &small_mixtral());
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() - 10]).expect("write");
    let err = load(&p).expect_err("truncated");
    assert!(matches!(err, LoadError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("m.safetensors"), "{err}");
    // Shorter than the 8-byte length prefix.
    std::fs::write(&p, [1u8, 2, 3]).expect("write");
    let err = load(&p).expect_err("tiny");
    assert!(matches!(err, LoadError::Truncated { .. }), "{err}");
}

#[test]
fn header_length_past_end() {
    let dir_guard = temp_dir("header");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).expect("write");
    let err = load(&p).expect_err("header past end");
    assert!(
        matches!(
            err,
            LoadError::HeaderPastEnd {
                header_len: 1_000_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("m.safetensors"), "{err}");
}

#[test]
fn wrong_dtype() {
    let dir_guard = temp_dir("dtype");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    let mut t = small_mixtral();
    t[0].1 = Dtype::I32;
    write_safetensors(&p, &t);
    let err = load(&p).expect_err("wrong dtype");
    assert!(matches!(err, LoadError::Dtype { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("gate.weight") && msg.contains("I32") && msg.contains("m.safetensors"),
        "{msg}"
    );
}

#[test]
fn wrong_shape() {
    let dir_guard = temp_dir("shape");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    let mut t = small_mixtral();
    // down_proj written as [E, f, d] instead of [E, d, f].
    t[2].2 = vec![2, 3, 4];
    write_safetensors(&p, &t);
    let err = load(&p).expect_err("wrong shape");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("experts.down_proj [2, 4, 3]") && msg.contains("[2, 3, 4]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor() {
    let dir_guard = temp_dir("missing");
    let dir = dir_guard.path();
    let p = dir.join("m.safetensors");
    let mut t = small_mixtral();
    t.remove(2);
    write_safetensors(&p, &t);
    let err = load(&p).expect_err("missing tensor");
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("experts.down_proj"), "{err}");
}

#[test]
fn unknown_family() {
    let dir_guard = temp_dir("family");
    let dir = dir_guard.path();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "num_local_experts": 2}"#,
    )
    .expect("write");
    let err = moe_models::load_layer(dir, 0).expect_err("unknown family");
    assert!(matches!(err, LoadError::UnknownFamily { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("llama") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn index_pointing_to_missing_shard() {
    let dir_guard = temp_dir("shard");
    let dir = dir_guard.path();
    write_safetensors(&dir.join("a.safetensors"), &small_mixtral());
    let index = serde_json::json!({ "weight_map": {
        "gate.weight": "a.safetensors", "experts.down_proj": "b.safetensors" } });
    let ip = dir.join("model.safetensors.index.json");
    std::fs::write(&ip, index.to_string()).expect("write");
    let err = Checkpoint::open(dir).expect_err("missing shard");
    assert!(matches!(err, LoadError::MissingShard { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("b.safetensors") && msg.contains("experts.down_proj"),
        "{msg}"
    );
}

#[test]
fn bad_json() {
    let dir_guard = temp_dir("json");
    let dir = dir_guard.path();
    std::fs::write(dir.join("config.json"), "{ \"model_type\": ").expect("write");
    let err = moe_models::load_layer(dir, 0).expect_err("bad json");
    assert!(matches!(err, LoadError::Json { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::write(dir.join("manifest.json"), "[1, 2").expect("write");
    let err = verify::verify_dir(dir, &CpuBackend::new()).expect_err("bad manifest");
    assert!(matches!(err, LoadError::Json { .. }), "{err}");
}

/// The shape a parameter's HF name stands for in `ckpt` (the forms of moe-models' crate docs): a plain name is
/// that tensor; `{e}` stacks one tensor per expert on a new leading axis `E`; ` + ` joins tensors along each
/// expert's rows (axis 1 after an expert axis, else axis 0).
fn hf_shape(ckpt: &Checkpoint, hf: &str, n_experts: usize) -> Result<Vec<usize>, String> {
    let mut joined: Option<Vec<usize>> = None;
    for part in hf.split(" + ") {
        let per_expert = part.contains("{e}");
        let shape = if per_expert {
            let mut first: Option<Vec<usize>> = None;
            for e in 0..n_experts {
                let name = part.replace("{e}", &e.to_string());
                let s = ckpt.shape(&name).map_err(|err| err.to_string())?;
                match &first {
                    Some(f) if *f != s => return Err(format!("{name} is {s:?}, expert 0 {f:?}")),
                    Some(_) => {}
                    None => first = Some(s),
                }
            }
            let mut s = vec![n_experts];
            s.extend(first.unwrap_or_default());
            s
        } else {
            ckpt.shape(part).map_err(|err| err.to_string())?
        };
        joined = Some(match joined {
            None => shape,
            Some(mut j) => {
                let axis = usize::from(per_expert);
                let rest = |s: &[usize]| {
                    let mut s = s.to_vec();
                    s.remove(axis);
                    s
                };
                if j.len() != shape.len() || j.len() <= axis || rest(&j) != rest(&shape) {
                    return Err(format!("cannot join {j:?} and {shape:?} ({part})"));
                }
                j[axis] += shape[axis];
                j
            }
        });
    }
    joined.ok_or_else(|| "empty name".to_string())
}

/// A shape without its leading axes of size 1 (a one-expert shared bank `[1, f, d]` is `[f, d]` on disk; Qwen2-MoE's
/// `shared_expert_gate.weight` `[1, d]` is the layer's `shared.gate` `[d]`).
fn squeeze(s: &[usize]) -> &[usize] {
    let lead = s.iter().take_while(|&&v| v == 1).count();
    &s[lead.min(s.len().saturating_sub(1))..]
}

/// For every fixture family: each parameter the loaded layer lists has an HF name that exists in the fixture with
/// the parameter's shape (up to the documented stacking, joining and size-1 axes); each tensor of the fixture's
/// state dict is one the family's descriptor lists, and the parameter it fills names it. Router parameters are
/// checked where the router lists them ([`moe_core::Router::params`]; a router that lists none yet is noted).
#[test]
fn parameters_name_their_checkpoint_tensors() {
    let dir = fixtures();
    for case in &manifest().cases {
        let fx = FixtureCase::load(&dir, case).expect("case loads");
        let (ckpt, layer) = (&fx.checkpoint, &fx.layer);
        let params = layer.params();
        assert!(!params.is_empty(), "{}: no parameters", case.name);
        for p in &params {
            let hf = p
                .hf_name
                .as_deref()
                .unwrap_or_else(|| panic!("{}: {} has no HF name", case.name, p.name));
            let shape = hf_shape(ckpt, hf, layer.n_experts())
                .unwrap_or_else(|e| panic!("{}: {} = {hf}: {e}", case.name, p.name));
            assert_eq!(
                squeeze(&shape),
                squeeze(p.shape()),
                "{}: {} = {hf}",
                case.name,
                p.name
            );
        }
        let preset = fx.config.family.preset();
        let router_lists_params = !layer.router().params().is_empty();
        for name in ckpt.names().filter(|n| !n.starts_with("ref.")) {
            let spec = preset
                .tensors
                .iter()
                .find(|t| t.matches(name))
                .unwrap_or_else(|| panic!("{}: {name} is not in the descriptor", case.name));
            match params.iter().find(|p| p.name == spec.param) {
                Some(p) => {
                    let hf = p.hf_name.as_deref().unwrap_or_default();
                    assert!(
                        hf.split(" + ").any(|part| part == spec.name),
                        "{}: {} = {hf} does not name {name}",
                        case.name,
                        p.name
                    );
                }
                None if spec.param.starts_with("router.") && !router_lists_params => {
                    println!(
                        "{}: router {} lists no parameters yet; {name} ({}) not checked",
                        case.name,
                        layer.router().name(),
                        spec.param
                    );
                }
                None => panic!("{}: no parameter {} for {name}", case.name, spec.param),
            }
        }
    }
}
