//! End-to-end tests of `moe verify` and `moe inspect` on the HF golden fixtures.

mod common;

use common::{moe, safetensors, scratch, stderr, stdout};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf");

#[test]
fn verify_table_passes_every_case() {
    let o = moe(&["verify", FIXTURES]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    for case in [
        "mixtral",
        "qwen2_moe",
        "olmoe",
        "deepseek_v3",
        "switch_transformers",
        "nllb_moe",
        "granitemoe",
        "jetmoe",
        "gpt_oss",
    ] {
        assert!(out.contains(case), "{case} missing from\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn verify_json_is_typed() {
    let o = moe(&["verify", FIXTURES, "--format", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let cases = v.as_array().expect("array of cases");
    assert_eq!(cases.len(), 9);
    for c in cases {
        assert_eq!(c["passed"], true, "{c}");
        assert!(c["quantities"].as_array().is_some_and(|q| !q.is_empty()));
    }
}

/// The gradient fixtures: every case passes on the CPU with its gradients compared (output loss, and the
/// load-balancing and z-losses where the file has them), none skipped.
#[test]
fn verify_gradient_fixtures_compares_every_gradient() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf-grad");
    let o = moe(&["verify", dir, "--format", "json"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let cases = v.as_array().expect("array of cases");
    assert_eq!(cases.len(), 9);
    for c in cases {
        assert_eq!(c["passed"], true, "{c}");
        let names: Vec<&str> = c["quantities"]
            .as_array()
            .expect("quantities")
            .iter()
            .filter_map(|q| q["name"].as_str())
            .collect();
        assert!(names.contains(&"grad.input"), "{c}");
        let skipped = c["skipped"].to_string();
        assert!(
            !skipped.contains("grad"),
            "a gradient was skipped: {skipped}"
        );
    }
    let switch = cases
        .iter()
        .find(|c| c["name"] == "switch_transformers")
        .expect("switch case");
    let names = switch["quantities"].to_string();
    assert!(
        names.contains("grad_z.input") && names.contains("grad_lb.input"),
        "{names}"
    );
}

#[test]
fn verify_exits_2_on_a_case_whose_file_cannot_load() {
    let dir = scratch("verify-unloadable");
    let manifest = serde_json::json!({ "cases": [{
        "name": "mixtral", "file": "absent.safetensors", "model_family": "mixtral", "batch": 1, "seq_len": 4,
        "routing": { "num_experts": 8, "top_k": 2 } }] });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("manifest");
    let o = moe(&["verify", dir.to_str().expect("utf-8 path")]);
    // A case file that cannot be loaded is bad input (exit 2); the table still names it and why.
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAIL"));
    assert!(stderr(&o).contains("could not be loaded"), "{}", stderr(&o));
}

#[test]
fn inspect_a_fixture() {
    let o = moe(&["inspect", &format!("{FIXTURES}/deepseek_v3.safetensors")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(out.contains("family: deepseek_v3"), "{out}");
    assert!(
        out.contains("experts.gate_up_proj F32 [16, 96, 64]"),
        "{out}"
    );
}

#[test]
fn verify_on_the_cpu_backend_names_it() {
    let o = moe(&["verify", FIXTURES, "--backend", "cpu"]);
    assert!(
        o.status.success(),
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    assert!(out.contains("backend: cpu, device: "), "{out}");
    assert!(
        out.contains("on the host: shared_expert_gate_logit, shared_expert_output"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    let o = moe(&["verify", FIXTURES, "--backend", "cpu", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    for c in v.as_array().expect("array of cases") {
        assert_eq!(c["backend"], "cpu", "{c}");
        for q in c["quantities"].as_array().expect("quantities") {
            let host = matches!(
                q["name"].as_str(),
                Some("shared_expert_output" | "shared_expert_gate_logit")
            );
            assert_eq!(q["on"], if host { "host" } else { "backend" }, "{q}");
        }
    }
}

/// A backend this build lacks, or one that cannot run here, is one line on stderr and exit code 2, before any case
/// runs.
#[test]
fn verify_on_an_unavailable_backend_exits_2() {
    let mut names = vec!["nope"];
    if !cfg!(feature = "cuda") {
        names.push("cuda");
    }
    if !cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    for name in names {
        let o = moe(&["verify", FIXTURES, "--backend", name]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        assert!(err.contains(name), "{name}: {err}");
        assert!(stdout(&o).is_empty(), "{name}: {}", stdout(&o));
    }
}

/// Whether `MOE_REQUIRE_GPU` names `backend` (CI sets it where the device is expected).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn required(backend: &str) -> bool {
    std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == backend)
}

/// `moe verify` on wgpu (Mesa's lavapipe in CI): every case passes, or, without an adapter and unless
/// `MOE_REQUIRE_GPU=wgpu`, the command reports the backend unavailable (exit 2) and the test skips.
#[cfg(feature = "wgpu")]
#[test]
fn verify_on_wgpu_passes_every_case() {
    let o = moe(&["verify", FIXTURES, "--backend", "wgpu"]);
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(2) && !required("wgpu") {
        eprintln!("skipping: {err}");
        return;
    }
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{err}");
    let passed = out
        .lines()
        .filter(|l| l.trim_end().ends_with(" pass"))
        .count();
    assert_eq!(passed, 9, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("backend: wgpu, device: "), "{out}");
    println!("{out}");
}

/// `moe verify` on CUDA: every case passes on a GPU; without one (and unless `MOE_REQUIRE_GPU=cuda`) the command
/// reports the backend unavailable in one line, exit 2.
#[cfg(feature = "cuda")]
#[test]
fn verify_on_cuda_passes_or_reports_unavailability() {
    let o = moe(&["verify", FIXTURES, "--backend", "cuda"]);
    let (out, err) = (stdout(&o), String::from_utf8_lossy(&o.stderr));
    match o.status.code() {
        Some(0) => {
            assert!(!out.contains("FAIL"), "{out}");
            assert!(out.contains("backend: cuda, device: "), "{out}");
        }
        Some(2) if !required("cuda") => {
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(
                err.starts_with("error: backend cuda is unavailable"),
                "{err}"
            );
            assert!(out.is_empty(), "{out}");
        }
        other => panic!("exit {other:?}\n{out}{err}"),
    }
}

// ---- issue 17: the reliability cases of `moe verify` / `moe inspect`, built here (see /work/shared/cases).

fn write_json(path: &std::path::Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec(v).expect("json")).expect("write");
}

/// A tiny Mixtral case (E 2, d 2, f 1) with `tokens` rows of `ref.input`.
fn tiny_mixtral(tokens: u64, extra_refs: bool) -> Vec<u8> {
    let mut t = vec![
        ("gate.weight", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0]),
        ("experts.gate_up_proj", vec![2, 2, 2], vec![0.1; 8]),
        ("experts.down_proj", vec![2, 2, 1], vec![0.1; 4]),
        (
            "ref.input",
            vec![1, tokens, 2],
            (0..tokens * 2).map(|i| (i % 7) as f32).collect(),
        ),
    ];
    if extra_refs {
        t.push((
            "ref.router_logits",
            vec![tokens, 2],
            (0..tokens * 2).map(|i| (i % 7) as f32).collect(),
        ));
    }
    safetensors(&t)
}

#[test]
fn f01_batch_times_seq_len_overflow_is_a_clear_error() {
    let dir = scratch("f01");
    std::fs::write(dir.join("mixtral.safetensors"), tiny_mixtral(32, true)).expect("write");
    for batch in [(1u64 << 63) + 1, (1u64 << 59) + 1] {
        write_json(
            &dir.join("manifest.json"),
            &serde_json::json!({"cases": [{"name": "mixtral", "file": "mixtral.safetensors",
                "batch": batch, "seq_len": 32, "routing": {"num_experts": 2, "top_k": 1}}]}),
        );
        let o = moe(&["verify", dir.to_str().expect("utf-8")]);
        let out = stdout(&o) + &stderr(&o);
        // Bad input: exit 2, one line naming the manifest field.
        assert_eq!(o.status.code(), Some(2), "{out}");
        assert!(out.contains("batch × seq_len"), "{out}");
        assert!(
            out.contains("overflows") || out.contains("ref.input"),
            "{out}"
        );
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[test]
fn f02_zero_width_and_huge_per_expert_tensors_are_refused() {
    let dir = scratch("f02");
    let z = |name: &'static str, shape: Vec<u64>| (name, shape, Vec::new());
    let f = 1u64 << 62;
    std::fs::write(
        dir.join("mixtral.safetensors"),
        safetensors(&[
            z("gate.weight", vec![8, 0]),
            z("experts.0.w1.weight", vec![f, 0]),
            z("experts.0.w3.weight", vec![f, 0]),
            z("experts.0.w2.weight", vec![0, f]),
        ]),
    )
    .expect("write");
    std::fs::write(
        dir.join("switch.safetensors"),
        safetensors(&[
            z("router.classifier.weight", vec![8, 0]),
            z("experts.expert_0.wi.weight", vec![f, 0]),
            z("experts.expert_0.wo.weight", vec![0, f]),
        ]),
    )
    .expect("write");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [
            {"name": "mixtral", "file": "mixtral.safetensors", "routing": {"num_experts": 8, "top_k": 2}},
            {"name": "switch_transformers", "file": "switch.safetensors",
             "routing": {"num_experts": 8, "top_k": 1, "capacity": 4}}]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    let out = stdout(&o) + &stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        out.contains("gate.weight") && out.contains("every axis at least 1"),
        "{out}"
    );
    assert!(out.contains("router.classifier.weight"), "{out}");
}

#[test]
fn f15_inspect_validates_the_config_as_loading_does() {
    let base = serde_json::json!({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let cases = [
        (
            "topk0",
            with("num_experts_per_tok", serde_json::json!(0)),
            "num_experts_per_tok",
        ),
        (
            "topk9",
            with("num_experts_per_tok", serde_json::json!(9)),
            "num_experts_per_tok",
        ),
        (
            "scaling_inf",
            serde_json::json!({"model_type": "deepseek_v3", "n_routed_experts": 8, "n_group": 1,
                "topk_group": 1, "routed_scaling_factor": 1e39}),
            "routed_scaling_factor",
        ),
    ];
    for (name, cfg, field) in cases {
        let dir = scratch(&format!("f15-{name}"));
        std::fs::write(
            dir.join("model.safetensors"),
            safetensors(&[("gate.weight", vec![8, 4], vec![0.1; 32])]),
        )
        .expect("write");
        write_json(&dir.join("config.json"), &cfg);
        let o = moe(&["inspect", dir.to_str().expect("utf-8")]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {}{err}", stdout(&o));
        assert!(err.contains(field), "{name}: {err}");
    }
}

#[test]
fn f19_inspect_bad_file_exits_2() {
    let dir = scratch("f19");
    let mut b = safetensors(&[("hidden_states", vec![8, 4], vec![0.5; 32])]);
    b.truncate(b.len() - 5);
    let p = dir.join("trunc.safetensors");
    std::fs::write(&p, b).expect("write");
    let o = moe(&["inspect", p.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("trunc.safetensors"), "{}", stderr(&o));
}

#[test]
fn f21_empty_case_list_is_an_error_and_a_failing_case_says_why() {
    let dir = scratch("f21-empty");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": []}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("empty"), "{}", stderr(&o));
    let dir = scratch("f21-norefs");
    std::fs::write(dir.join("mixtral.safetensors"), tiny_mixtral(4, false)).expect("write");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [{"name": "mixtral", "file": "mixtral.safetensors",
            "routing": {"num_experts": 2, "top_k": 1}}]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("no reference"), "{}", stdout(&o));
}

#[test]
fn f22_wrong_type_is_not_reported_missing() {
    let dir = scratch("f22");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [
            {"name": "mixtral", "file": "x.safetensors", "routing": {"num_experts": 8, "top_k": "2"}},
            {"name": "olmoe", "file": "y.safetensors", "routing": {"num_experts": -8, "top_k": 2}}]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    let out = stdout(&o);
    assert!(!out.contains("missing"), "{out}");
    assert!(
        out.contains("top_k: expected a non-negative integer, found a string"),
        "{out}"
    );
    assert!(
        out.contains("num_experts: expected a non-negative integer, found a number -8"),
        "{out}"
    );
}

/// A copy of the mixtral fixture case in a fresh directory, with its manifest entry (and its `bytes`, `sha256`).
fn mixtral_copy(name: &str) -> (common::Scratch, serde_json::Value) {
    let dir = scratch(name);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(format!("{FIXTURES}/manifest.json")).expect("manifest"),
    )
    .expect("json");
    let case = m["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "mixtral"))
        .expect("mixtral case")
        .clone();
    std::fs::copy(
        format!("{FIXTURES}/mixtral.safetensors"),
        dir.join("mixtral.safetensors"),
    )
    .expect("copy");
    (dir, case)
}

#[test]
fn f14_manifest_sha256_and_bytes_are_checked() {
    // As recorded: passes (the fixture manifest carries both fields).
    let (dir, case) = mixtral_copy("f14-ok");
    assert!(
        case["sha256"].is_string() && case["bytes"].is_u64(),
        "{case}"
    );
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [case.clone()]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    // A byte appended: the size differs.
    let p = dir.join("mixtral.safetensors");
    let mut b = std::fs::read(&p).expect("read");
    b.push(0);
    std::fs::write(&p, &b).expect("write");
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("mixtral.safetensors: bytes is"),
        "{}",
        stderr(&o)
    );
    // Same size, one value changed: the digest differs.
    b.pop();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&p, &b).expect("write");
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("mixtral.safetensors: sha256 is"), "{err}");
    assert!(err.contains(case["sha256"].as_str().expect("sha")), "{err}");
    // A malformed digest is named as such.
    let mut bad = case.clone();
    bad["sha256"] = serde_json::json!("xyz");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [bad]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cases[mixtral].sha256: expected 64 hex digits"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn manifest_case_files_stay_in_their_directory() {
    let (dir, case) = mixtral_copy("case-confined");
    let outside = dir.join("..").join(format!(
        "moe-cli-outside-{}.safetensors",
        std::process::id()
    ));
    std::fs::copy(dir.join("mixtral.safetensors"), &outside).expect("copy");
    let abs = outside.canonicalize().expect("abs");
    let mut files = vec![
        ("../mixtral.safetensors".to_string(), "contains `..`"),
        (abs.to_str().expect("utf-8").to_string(), "absolute path"),
    ];
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&abs, dir.join("link.safetensors")).expect("symlink");
        files.push(("link.safetensors".to_string(), "resolves to"));
    }
    for (file, why) in files {
        let mut c = case.clone();
        c["file"] = serde_json::json!(file);
        c.as_object_mut().expect("object").remove("sha256");
        c.as_object_mut().expect("object").remove("bytes");
        write_json(
            &dir.join("manifest.json"),
            &serde_json::json!({"cases": [c]}),
        );
        let o = moe(&["verify", dir.to_str().expect("utf-8")]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{file}: {}{err}", stdout(&o));
        assert!(
            err.contains("manifest.json") && err.contains(why),
            "{file}: {err}"
        );
    }
    // A case file that is a directory says so.
    let mut c = case.clone();
    c["file"] = serde_json::json!("sub");
    std::fs::create_dir_all(dir.join("sub")).expect("dir");
    write_json(
        &dir.join("manifest.json"),
        &serde_json::json!({"cases": [c]}),
    );
    let o = moe(&["verify", dir.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is a directory, not a regular file"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_file(&outside);
}
