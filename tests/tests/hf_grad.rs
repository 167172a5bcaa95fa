//! Gradient fixtures (tests/fixtures/hf-grad: torch autograd through transformers' own blocks) through the library:
//! every family's `dL/dx` and parameter gradients of the output loss, of HF's load-balancing loss alone and of the
//! Switch z-loss alone, at 1e-5 of each tensor's max |value| (the verifier's relative error), each reference
//! compared (none skipped) and every gradient of ours without a reference zero.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::{Backend, RouterInput};
use moe_models::fixture::{FixtureCase, Manifest};
use moe_models::hf_names::split_by_hf_name;
use moe_verify::{self as verify, TOLERANCE};
use ndarray::Array2;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf-grad")
}

fn manifest() -> Manifest {
    Manifest::read(&fixtures()).expect("manifest")
}

/// Runs the verifier on one case: every quantity passes, and every gradient reference of the file is compared.
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
    let fx = FixtureCase::load(&fixtures(), case).expect("case loads");
    let grads: Vec<String> = fx
        .reference_names()
        .into_iter()
        .filter_map(|r| r.strip_prefix("ref.").map(str::to_string))
        .filter(|r| r.starts_with("grad"))
        .collect();
    assert!(!grads.is_empty(), "{name}: the fixture holds no gradient");
    for g in &grads {
        assert!(
            rep.quantities.iter().any(|q| &q.name == g),
            "{name}: {g} was not compared (skipped: {:?})",
            rep.skipped
        );
    }
    println!(
        "{name}: {} gradient references, worst relative error {:.2e}",
        grads.len(),
        rep.max_rel_err()
    );
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

/// The training API as a user calls it, on the Mixtral case: forward_train, backward with the cotangent, the
/// router gradient split into the checkpoint's tensor and compared by hand.
#[test]
fn library_api_on_mixtral() {
    let m = manifest();
    let case = m
        .cases
        .iter()
        .find(|c| c.name == "mixtral")
        .expect("mixtral");
    let fx = FixtureCase::load(&fixtures(), case).expect("case loads");
    let mut dev = CpuBackend::new()
        .upload(Arc::new(fx.layer.clone()))
        .expect("upload");
    let seq = fx.seq_lens();
    let input = RouterInput::new(fx.input.view()).with_seq_lens(&seq);
    let out = dev.forward_train(&input).expect("forward");
    let cot = fx.checkpoint.tensor("ref.cotangent").expect("cotangent");
    let cot = Array2::from_shape_vec(out.output.dim(), cot.data).expect("[T, d]");
    let zeros = vec![0.0; out.routing.aux_losses().len()];
    let grads = dev.backward(cot.view(), &zeros).expect("backward");
    let gate = grads.get("router.gate").expect("router.gate gradient");
    let hf = gate.hf_name.as_deref().expect("checkpoint name");
    assert_eq!(hf, "gate.weight");
    let dense = gate.to_dense().expect("dense");
    let pieces = split_by_hf_name(hf, dense.view()).expect("split");
    let reference = fx
        .checkpoint
        .tensor("ref.grad.gate.weight")
        .expect("reference");
    let err = verify::rel_err(pieces[0].1.iter().copied(), &reference.data);
    assert!(err <= TOLERANCE, "router.gate: {err:e}");
    // A backward consumes its training forward: a second one is refused, naming what must come first; another
    // training forward gives the same gradients again.
    assert!(matches!(
        dev.backward(cot.view(), &zeros),
        Err(moe_core::MoeError::Order { .. })
    ));
    dev.forward_train(&input).expect("forward again");
    assert_eq!(
        dev.backward(cot.view(), &zeros).expect("backward again"),
        grads
    );
}

/// The presets report their load-balancing loss with transformers' default coefficient (`router_aux_loss_coef`,
/// JetMoE's `aux_loss_coef`; DeepSeek-V3's block has none: 0), which `Routing::aux_coefficients` trains with.
#[test]
fn presets_report_transformers_aux_coefficients() {
    let m = manifest();
    for (name, want) in [
        ("mixtral", 1e-3f32),
        ("qwen2_moe", 1e-3),
        ("olmoe", 1e-2),
        ("granitemoe", 1e-3),
        ("jetmoe", 1e-2),
        ("gpt_oss", 1e-3),
        ("deepseek_v3", 0.0),
    ] {
        let case = m.cases.iter().find(|c| c.name == name).expect("case");
        let fx = FixtureCase::load(&fixtures(), case).expect("case loads");
        let plan = fx
            .layer
            .route(&RouterInput::new(fx.input.view()))
            .expect("routes");
        let lb: Vec<f32> = plan
            .aux_losses()
            .iter()
            .filter(|a| matches!(a.kind, moe_core::AuxLossKind::LoadBalance(_)))
            .map(|a| a.coefficient)
            .collect();
        assert_eq!(lb, vec![want], "{name}");
    }
}
