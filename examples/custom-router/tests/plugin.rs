//! The plugin passes the router conformance suite, respects its capacity, skips padding, and the README shows its
//! code verbatim.

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
fn padding_tokens_get_no_expert_and_take_no_capacity() {
    let mut reg = moe_core::RouterRegistry::new();
    custom_router::register(&mut reg).expect("register");
    let r = reg
        .create("greedy-balanced", &RouterArgs::new(16, 8, 2, 0))
        .expect("create");
    let w = WorkloadConfig {
        tokens: 64,
        d_model: 16,
        ..Default::default()
    }
    .generate()
    .expect("workload");
    // 16 of 64 tokens marked, the README's report: none of them may get an assignment.
    let padding: Vec<bool> = (0..64).map(|t| t % 4 == 3).collect();
    let plan = r
        .route(&RouterInput::new(w.hidden.view()).with_padding(&padding))
        .expect("route");
    assert_eq!(plan.n_real_tokens(), 48);
    for (t, choices) in plan.per_token().iter().enumerate() {
        if padding[t] {
            assert!(choices.is_empty(), "padding token {t} got {choices:?}");
        } else {
            assert!((1..=2).contains(&choices.len()));
        }
    }
    // Capacity counts real tokens: ceil(48 * 2 / 8 * 1.0) = 12 per expert.
    assert!(plan.expert_counts().iter().all(|&c| c <= 12));
}

#[test]
fn readme_shows_this_plugin_verbatim() {
    let readme = include_str!("../../../README.md");
    for (name, src) in [
        ("src/lib.rs", include_str!("../src/lib.rs")),
        ("tests/conformance.rs", include_str!("conformance.rs")),
        ("cli/src/main.rs", include_str!("../cli/src/main.rs")),
    ] {
        let block = format!("// examples/custom-router/{name}\n{src}```");
        assert!(
            readme.contains(&block),
            "README.md's copy of examples/custom-router/{name} is out of date"
        );
    }
}
