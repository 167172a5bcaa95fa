//! The plugin's binary is the whole `moe` CLI with `greedy-balanced` beside the built-ins.

#[test]
fn plugin_binary_compares_it_with_the_builtins() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_moe-custom"))
        .args([
            "compare",
            "--num-tokens",
            "256",
            "--d-model",
            "16",
            "--format",
            "json",
        ])
        .output()
        .expect("moe-custom runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let names: Vec<&str> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["router"].as_str())
        .collect();
    assert!(names.contains(&"greedy-balanced"), "{names:?}");
    assert!(names.contains(&"softmax-topk"), "{names:?}");
}
