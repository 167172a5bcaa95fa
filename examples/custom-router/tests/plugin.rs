//! The plugin passes the router conformance suite and shows up in its own `moe compare` beside the built-ins.

use moe_core::{RouterArgs, RouterInput, WorkloadConfig};

#[test]
fn conformance_and_capacity() {
    let mut reg = moe_core::RouterRegistry::new();
    custom_router::register(&mut reg).expect("register");
    let r = reg
        .create("greedy-balanced", &RouterArgs::new(16, 8, 2, 0))
        .expect("create");
    moe_core::testing::check_router(r.as_ref(), 16).expect("conformance");
    let w = WorkloadConfig {
        tokens: 400,
        d_model: 16,
        ..Default::default()
    }
    .generate()
    .expect("workload");
    let plan = r.route(&RouterInput::new(w.hidden.view())).expect("route");
    // Capacity ceil(400 * 2 / 8 * 1.0) = 100 per expert: no expert goes over it, every token gets an expert,
    // and at most k; the last tokens may find fewer than k experts with room left.
    assert!(
        plan.expert_counts().iter().all(|&c| c <= 100),
        "{:?}",
        plan.expert_counts()
    );
    for choices in plan.per_token() {
        assert!((1..=2).contains(&choices.len()));
    }
    assert!(plan.diagnostics().cv < 0.05, "{:?}", plan.expert_counts());
    // Registering twice is an error, not a panic.
    assert!(custom_router::register(&mut reg).is_err());
}

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

#[test]
fn readme_shows_this_plugin_verbatim() {
    let readme = include_str!("../../../README.md");
    for (name, src) in [
        ("lib.rs", include_str!("../src/lib.rs")),
        ("main.rs", include_str!("../src/main.rs")),
    ] {
        let block = format!("// examples/custom-router/src/{name}\n{src}```");
        assert!(
            readme.contains(&block),
            "README.md's copy of examples/custom-router/src/{name} is out of date"
        );
    }
}
