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
