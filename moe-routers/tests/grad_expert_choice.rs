//! The backward of `expert-choice` against finite differences (`moe_core::testing::check_router_grad`) over
//! random shapes, capacity factors, padding and modes; bit-identical gradients across calls and thread counts;
//! typed errors for inconsistent gradients.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::SeqRng;
use moe_core::testing::check_router_grad;
use moe_core::{Mode, MoeError, Router, RouterBackward, RouterInput};
use moe_routers::ExpertChoice;

fn fixed(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0xEC6D),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A router of `E` experts over width `d`, gate `N(0, 1/d)` scaled by `gain` (larger logits, sharper softmax).
fn router(d: usize, e: usize, c: f64, gain: f32, seed: u64) -> ExpertChoice {
    let gate = kit::init_gate(d, e, seed, GATE_STREAM).expect("gate") * gain;
    ExpertChoice::new(gate, c).expect("router")
}

/// Smallest gap in log-probability kept between the C-th and (C+1)-th token of every expert's column in the
/// property test: a perturbation `h = 1e-2 · max(1, |θ|)` of one coordinate moves a logit by about
/// `h · |x| · |W_g|`, so closer columns switch their selection at `± h` (the checker skips such coordinates, and
/// fails where most are).
const MARGIN: f64 = 0.05;

/// The smallest gap between the C-th and (C+1)-th log-probabilities over every expert's column of real tokens
/// (infinite when an expert takes every real token).
fn margin(r: &ExpertChoice, input: &RouterInput<'_>) -> f64 {
    let logits = input
        .hidden
        .mapv(f64::from)
        .dot(&r.gate().mapv(f64::from).t());
    let real: Vec<usize> = (0..input.n_tokens())
        .filter(|&i| !input.is_padding(i))
        .collect();
    let cap = r.capacity(real.len());
    let logp: Vec<Vec<f64>> = real
        .iter()
        .map(|&i| {
            let row = logits.row(i);
            let m = row.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|&l| (l - m).exp()).sum::<f64>().ln();
            row.iter().map(|&l| l - lse).collect()
        })
        .collect();
    (0..r.n_experts())
        .filter_map(|e| {
            let mut col: Vec<f64> = logp.iter().map(|row| row[e]).collect();
            col.sort_by(|a, b| b.total_cmp(a));
            col.get(cap).map(|&next| col[cap - 1] - next)
        })
        .fold(f64::INFINITY, f64::min)
}

proptest! {
    #![proptest_config(fixed(48))]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..20,
        d in 1usize..10,
        e in 1usize..9,
        c in prop::sample::select(vec![0.5f64, 1.0, 1.5, 2.0, 3.7]),
        gain in prop::sample::select(vec![1.0f32, 3.0]),
        pad_every in 0usize..4,
        train in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let r = router(d, e, c, gain, seed);
        let x = SeqRng::new(seed, 7).normal_matrix(t, d, 1.0);
        // pad_every = 0: no padding; else every pad_every-th token (from 1) is padding.
        let pad: Vec<bool> = (0..t).map(|i| pad_every > 0 && i % (pad_every + 1) == 1).collect();
        let mode = if train { Mode::Train { seed } } else { Mode::Eval };
        let input = RouterInput::new(x.view()).with_padding(&pad).with_mode(mode);
        prop_assume!(margin(&r, &input) > MARGIN);
        let report = check_router_grad(&r, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
        // Padding rows get no gradient.
        let plan = r.route(&input).expect("route");
        let c: Vec<f32> = (0..plan.n_slots()).map(|i| i as f32 * 0.1 - 1.0).collect();
        let g = r
            .backward(&RouterBackward { input: &input, routing: &plan, d_weights: &c, d_aux: &[] })
            .expect("backward");
        for (i, &p) in pad.iter().enumerate() {
            if p {
                prop_assert!(g.d_hidden.row(i).iter().all(|&v| v == 0.0), "padding row {}", i);
            }
        }
    }
}

#[test]
fn gradients_are_bit_identical_across_calls_and_threads() {
    let r = router(16, 6, 1.5, 2.0, 3);
    let x = SeqRng::new(4, 0).normal_matrix(300, 16, 1.0);
    let input = RouterInput::new(x.view());
    let plan = r.route(&input).expect("route");
    let mut rng = SeqRng::new(5, 1);
    let c: Vec<f32> = (0..plan.n_slots()).map(|_| rng.normal() as f32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            r.backward(&RouterBackward {
                input: &input,
                routing: &plan,
                d_weights: &c,
                d_aux: &[],
            })
        })
        .expect("backward")
    };
    let one = run(1);
    assert_eq!(one, run(1));
    assert_eq!(one, run(2));
    assert_eq!(one, run(4));
    assert_eq!(one.params.len(), 1);
    assert_eq!(one.params[0].name, "gate");
    assert_eq!(one.params[0].shape(), &[6, 16]);
}

#[test]
fn inconsistent_gradients_are_typed_errors() {
    let r = router(4, 3, 1.0, 1.0, 1);
    let x = SeqRng::new(1, 0).normal_matrix(6, 4, 1.0);
    let input = RouterInput::new(x.view());
    let plan = r.route(&input).expect("route");
    let n = plan.n_slots();
    let short = vec![0.0f32; n - 1];
    let call = |dw: &[f32], da: &[f32]| {
        r.backward(&RouterBackward {
            input: &input,
            routing: &plan,
            d_weights: dw,
            d_aux: da,
        })
    };
    assert!(matches!(call(&short, &[]), Err(MoeError::Shape { .. })));
    assert!(matches!(
        call(&vec![0.0; n], &[1.0]),
        Err(MoeError::Shape { .. })
    ));
    let mut nan = vec![0.0f32; n];
    nan[1] = f32::NAN;
    assert!(matches!(call(&nan, &[]), Err(MoeError::NonFinite { .. })));
    // A plan of another router (more experts) is refused.
    let other = router(4, 5, 1.0, 1.0, 1).route(&input).expect("route");
    let dw = vec![0.0f32; other.n_slots()];
    assert!(matches!(
        r.backward(&RouterBackward {
            input: &input,
            routing: &other,
            d_weights: &dw,
            d_aux: &[],
        }),
        Err(MoeError::Mismatch { .. })
    ));
}
