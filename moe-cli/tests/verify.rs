//! End-to-end tests of `moe verify` and `moe inspect` on the HF golden fixtures.

use std::process::{Command, Output};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf");

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("the moe binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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

#[test]
fn verify_fails_with_exit_1_on_a_broken_case() {
    let dir = std::env::temp_dir().join(format!("moe-cli-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let manifest = serde_json::json!({ "cases": [{
        "name": "mixtral", "file": "absent.safetensors", "model_family": "mixtral", "batch": 1, "seq_len": 4,
        "routing": { "num_experts": 8, "top_k": 2 } }] });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("manifest");
    let o = moe(&["verify", dir.to_str().expect("utf-8 path")]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAIL"));
    let _ = std::fs::remove_dir_all(&dir);
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
