//! The shared fidelity cases of issue 17 that run through the verifier (`tests/fixtures/cases`), each with its
//! right value.

use std::path::Path;

fn dir(case: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cases")
        .join(case)
}

#[test]
fn mixtral_ignores_norm_topk_prob_and_renormalises() {
    let backend = moe_verify::open_backend("cpu").expect("cpu");
    let reports = moe_verify::verify_dir(dir("mixtral-norm-flag"), backend.as_ref()).expect("dir");
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert!(r.passed, "{r:?}");
    assert!(r.max_rel_err() <= moe_verify::TOLERANCE, "{r:?}");
    // Token 0's weights, as transformers renormalises them: 0.5599, 0.4401.
    let fx = moe_verify::fixture::Manifest::read(&dir("mixtral-norm-flag")).expect("manifest");
    let case = moe_verify::fixture::FixtureCase::load(&dir("mixtral-norm-flag"), &fx.cases[0])
        .expect("case");
    let routing = case
        .layer
        .route(&moe_core::RouterInput::new(case.input.view()))
        .expect("route");
    let mut w: Vec<f32> = routing.per_token()[0].iter().map(|c| c.1).collect();
    w.sort_by(|a, b| b.total_cmp(a));
    assert_eq!(w.len(), 2);
    assert!(
        (w[0] - 0.5599).abs() < 1e-4 && (w[1] - 0.4401).abs() < 1e-4,
        "{w:?}"
    );
}

#[test]
fn qwen2_without_shared_expert_gate_is_refused_naming_it() {
    let backend = moe_verify::open_backend("cpu").expect("cpu");
    let reports =
        moe_verify::verify_dir(dir("qwen2-missing-shared-gate"), backend.as_ref()).expect("dir");
    let full = reports
        .iter()
        .find(|r| r.name == "full_qwen2_moe")
        .expect("control");
    assert!(full.passed, "{full:?}");
    let bad = reports
        .iter()
        .find(|r| r.name == "qwen2_moe_no_shared_expert_gate")
        .expect("case");
    assert!(!bad.passed);
    let e = bad.error.as_deref().unwrap_or_default();
    assert!(
        e.contains("missing tensor shared_expert_gate.weight"),
        "{e}"
    );
}
