//! The backward of `noisy-topk` against finite differences (`moe_core::testing::check_router_grad`) over random
//! shapes, k, E, noise scales, padding, train and eval: `W_g`, `W_noise` through the noise scale, the kept
//! softmax weights, the importance loss and the smooth load loss. Bit-identical gradients across calls and thread
//! counts; typed errors for a plan that does not match.

use ndarray::Array2;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::SeqRng;
use moe_core::testing::check_router_grad;
use moe_core::{AuxLossKind, Mode, MoeError, Router, RouterBackward, RouterGrads, RouterInput};
use moe_routers::noisy_topk::NOISE_WEIGHT_STREAM;
use moe_routers::{NoisyTopK, NoisyTopKConfig};

fn fixed(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x4015),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A router over width `d` with `E` experts: `W_g` `N(0, 1/d)` times `gain`, `W_noise` times `noise_gain`.
fn router(
    d: usize,
    e: usize,
    k: usize,
    gain: f32,
    noise_gain: f32,
    eps: f32,
    seed: u64,
) -> NoisyTopK {
    let gate = kit::init_gate(d, e, seed, GATE_STREAM).expect("gate") * gain;
    let noise = kit::init_gate(d, e, seed, NOISE_WEIGHT_STREAM).expect("noise") * noise_gain;
    NoisyTopKConfig {
        noise_epsilon: Some(eps),
        ..Default::default()
    }
    .build(gate, noise, k)
    .expect("router")
}

/// The backward with seeded coefficients for every slot and loss.
fn backward(r: &NoisyTopK, input: &RouterInput<'_>, seed: u64) -> RouterGrads {
    let plan = r.route(input).expect("route");
    let mut rng = SeqRng::new(seed, 11);
    let c: Vec<f32> = (0..plan.n_slots()).map(|_| rng.normal() as f32).collect();
    let a: Vec<f32> = (0..plan.aux_losses().len())
        .map(|_| rng.normal() as f32)
        .collect();
    r.backward(&RouterBackward {
        input,
        routing: &plan,
        d_weights: &c,
        d_aux: &a,
    })
    .expect("backward")
}

/// Smallest gap kept between the k-th and (k+1)-th noisy logits of a real token in the property test: a
/// perturbation `h = 1e-2 · max(1, |θ|)` of one coordinate moves a logit by about `h · |x| · |W|`.
const MARGIN: f32 = 0.03;

/// The smallest gap between the k-th and (k+1)-th noisy logits over the real tokens (infinite for `k = E`).
fn margin(r: &NoisyTopK, input: &RouterInput<'_>) -> f32 {
    let h = r.noisy_logits(input).expect("noisy logits");
    let k = r.k();
    h.outer_iter()
        .enumerate()
        .filter(|&(i, _)| !input.is_padding(i))
        .filter_map(|(_, row)| {
            let mut v = row.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v.get(k).map(|&next| v[k - 1] - next)
        })
        .fold(f32::INFINITY, f32::min)
}

proptest! {
    #![proptest_config(fixed(64))]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..20,
        d in 1usize..9,
        e in 2usize..9,
        k_frac in 0.0f64..1.0,
        gain in prop::sample::select(vec![1.0f32, 3.0]),
        noise_gain in prop::sample::select(vec![0.3f32, 1.0, 2.0]),
        eps in prop::sample::select(vec![1e-2f32, 0.3]),
        pad_every in 0usize..4,
        train in any::<bool>(),
        seed in 0u64..1000,
    ) {
        // k in 1..=E, k = E included (the load estimate is then the constant 1).
        let k = 1 + ((k_frac * e as f64) as usize).min(e - 1);
        let r = router(d, e, k, gain, noise_gain, eps, seed);
        let x = SeqRng::new(seed, 7).normal_matrix(t, d, 1.0);
        let pad: Vec<bool> = (0..t).map(|i| pad_every > 0 && i % (pad_every + 1) == 1).collect();
        let mode = if train { Mode::Train { seed: seed ^ 0x55 } } else { Mode::Eval };
        let input = RouterInput::new(x.view()).with_padding(&pad).with_mode(mode);
        // Finite differences prove nothing across a switch of the top k: inputs whose k-th and (k+1)-th noisy
        // logits nearly tie are redrawn (the checker skips such coordinates, and fails where most are).
        prop_assume!(margin(&r, &input) > MARGIN);
        let report = check_router_grad(&r, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
        let g = backward(&r, &input, seed);
        for (i, &p) in pad.iter().enumerate() {
            if p {
                prop_assert!(g.d_hidden.row(i).iter().all(|&v| v == 0.0), "padding row {}", i);
            }
        }
        // In eval the noise matrix plays no part.
        let noise = g.params.iter().find(|p| p.name == "noise").expect("noise gradient");
        if !train {
            prop_assert_eq!(noise.max_abs(), 0.0);
        }
    }
}

#[test]
fn each_loss_alone_reaches_both_matrices_in_training() {
    // d_weights = 0 and one loss at a time: the importance loss reaches W_noise only through the noisy weights, the
    // smooth load loss through σ; both give W_g a gradient.
    let r = router(6, 5, 2, 2.0, 1.0, 1e-2, 3);
    let x = SeqRng::new(2, 0).normal_matrix(40, 6, 1.0);
    let input = RouterInput::new(x.view()).with_mode(Mode::Train { seed: 8 });
    let plan = r.route(&input).expect("route");
    let kinds: Vec<AuxLossKind> = plan.aux_losses().iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [AuxLossKind::Importance, AuxLossKind::SmoothLoad]);
    let zeros = vec![0.0f32; plan.n_slots()];
    for d_aux in [[1.0f32, 0.0], [0.0, 1.0]] {
        let g = r
            .backward(&RouterBackward {
                input: &input,
                routing: &plan,
                d_weights: &zeros,
                d_aux: &d_aux,
            })
            .expect("backward");
        for p in &g.params {
            assert!(p.max_abs() > 0.0, "{} with d_aux {d_aux:?}", p.name);
        }
    }
    // Nothing in, nothing out.
    let g = r
        .backward(&RouterBackward {
            input: &input,
            routing: &plan,
            d_weights: &zeros,
            d_aux: &[0.0, 0.0],
        })
        .expect("backward");
    assert_eq!(g.d_hidden, Array2::<f32>::zeros((40, 6)));
}

#[test]
fn gradients_are_bit_identical_across_calls_and_threads() {
    // 200 tokens: 4 blocks of the forward's 64.
    let r = router(16, 8, 3, 2.0, 1.0, 1e-2, 5);
    let x = SeqRng::new(4, 0).normal_matrix(200, 16, 1.0);
    let pad: Vec<bool> = (0..200).map(|i| i % 7 == 3).collect();
    for mode in [Mode::Eval, Mode::Train { seed: 12 }] {
        let input = RouterInput::new(x.view())
            .with_padding(&pad)
            .with_mode(mode);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| backward(&r, &input, 6))
        };
        let one = run(1);
        assert_eq!(one, run(1), "{mode:?}");
        assert_eq!(one, run(2), "{mode:?}");
        assert_eq!(one, run(4), "{mode:?}");
        let names: Vec<&str> = one.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["gate", "noise"]);
    }
}

#[test]
fn a_plan_from_another_input_or_mode_is_refused() {
    let r = router(6, 5, 2, 2.0, 1.0, 1e-2, 3);
    let x = SeqRng::new(2, 0).normal_matrix(20, 6, 1.0);
    let eval = RouterInput::new(x.view());
    let train = RouterInput::new(x.view()).with_mode(Mode::Train { seed: 8 });
    let plan = r.route(&eval).expect("route");
    let dw = vec![0.5f32; plan.n_slots()];
    // The eval plan against the training input: the noisy choices differ somewhere.
    match r.backward(&RouterBackward {
        input: &train,
        routing: &plan,
        d_weights: &dw,
        d_aux: &[0.0, 0.0],
    }) {
        Err(MoeError::Mismatch { .. }) => {}
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(matches!(
        r.backward(&RouterBackward {
            input: &eval,
            routing: &plan,
            d_weights: &dw,
            d_aux: &[0.0],
        }),
        Err(MoeError::Shape { .. })
    ));
}
