//! The routers' backward of the auxiliary losses alone against PyTorch autograd through the transformers blocks:
//! `ref.grad_lb.*` (HF's load-balancing loss) and `ref.grad_z.*` (the Switch router z-loss) of
//! `tests/fixtures/hf-grad`, at 1e-5 of each tensor's max |value| (the fixtures' README). Each case's layer routes
//! `ref.input` (`[B, S, d]` → `[B·S, d]`, sequences `[S; B]` as `moe verify` passes them); its router's backward
//! runs with `d_weights = 0` and `d_aux = 1` for that loss alone.

use std::path::Path;

use moe_core::{AuxLossKind, Router, RouterBackward, RouterInput};
use moe_models::fixture::{FixtureCase, Manifest};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf-grad");

/// Compares `ours` with the reference tensor `key` of the case at 1e-5 of the reference's max |value|; returns
/// the worst |difference| relative to that scale.
fn compare(fx: &FixtureCase, key: &str, ours: &[f32]) -> f64 {
    let want = fx
        .checkpoint
        .tensor(key)
        .unwrap_or_else(|e| panic!("{}: {key}: {e}", fx.path.display()));
    assert_eq!(want.data.len(), ours.len(), "{key}: sizes");
    let scale = want.data.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let worst = want
        .data
        .iter()
        .zip(ours)
        .map(|(&w, &o)| (w as f64 - o as f64).abs())
        .fold(0.0f64, f64::max);
    assert!(
        worst <= 1e-5 * scale,
        "{}: {key}: max |ours − ref| = {worst:.3e} > 1e-5 × {scale:.3e}",
        fx.path.display()
    );
    worst / scale.max(f64::MIN_POSITIVE)
}

/// Checks the gradients of one loss (`which`: `"lb"` load balancing, `"z"` z-loss) of one case against its
/// `ref.grad_{which}.*` tensors; returns how many tensors it compared (0 when the case has none).
fn check_loss(fx: &FixtureCase, which: &str) -> usize {
    let prefix = format!("ref.grad_{which}.");
    let keys: Vec<String> = fx
        .reference_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if keys.is_empty() {
        return 0;
    }
    let seq_lens = fx.seq_lens();
    let input = RouterInput::new(fx.input.view()).with_seq_lens(&seq_lens);
    let router: &dyn Router = fx.layer.router();
    let plan = router.route(&input).expect("route");
    let d_aux: Vec<f32> = plan
        .aux_losses()
        .iter()
        .map(|a| match (which, a.kind) {
            ("lb", AuxLossKind::LoadBalance(_)) | ("z", AuxLossKind::RouterZ) => 1.0,
            _ => 0.0,
        })
        .collect();
    assert!(
        d_aux.contains(&1.0),
        "{}: no {which} loss in the plan",
        fx.path.display()
    );
    let zero = vec![0.0f32; plan.n_slots()];
    let grads = router
        .backward(&RouterBackward {
            input: &input,
            routing: &plan,
            d_weights: &zero,
            d_aux: &d_aux,
        })
        .expect("backward");
    let named = fx.layer.name_grads("router", grads.params);
    let mut compared = 0;
    for key in &keys {
        let name = &key[prefix.len()..];
        let ours: Vec<f32> = if name == "input" {
            grads.d_hidden.iter().copied().collect()
        } else {
            let g = named
                .iter()
                .find(|g| g.hf_name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", fx.path.display()));
            g.to_dense().expect("dense").iter().copied().collect()
        };
        let rel = compare(fx, key, &ours);
        eprintln!("{}: {key}: worst {rel:.2e} of the scale", fx.path.display());
        compared += 1;
    }
    compared
}

#[test]
fn aux_loss_gradients_match_torch_autograd() {
    let dir = Path::new(DIR);
    let manifest = Manifest::read(dir).expect("manifest");
    let mut compared = 0;
    let mut cases = Vec::new();
    for case in &manifest.cases {
        let fx = FixtureCase::load(dir, case).expect("case");
        let n = check_loss(&fx, "lb") + check_loss(&fx, "z");
        if n > 0 {
            cases.push(case.name.clone());
        }
        compared += n;
    }
    cases.sort();
    assert_eq!(
        cases,
        [
            "gpt_oss",
            "granitemoe",
            "jetmoe",
            "mixtral",
            "olmoe",
            "qwen2_moe",
            "switch_transformers"
        ]
    );
    assert_eq!(compared, 17);
}
