//! Behaviour of `noisy-topk`: the smooth load estimator against Monte Carlo, invariants under proptest, and the
//! same routing on any thread count.

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::{CounterRng, SeqRng};
use moe_core::{AuxLossKind, Mode, Router, RouterInput, Routing, loss};
use moe_routers::noisy_topk::{NOISE_WEIGHT_STREAM, NoisyTopK};
use ndarray::Array2;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

fn router(d: usize, e: usize, k: usize, seed: u64) -> NoisyTopK {
    let gate = kit::init_gate(d, e, seed, GATE_STREAM).expect("gate");
    let noise = kit::init_gate(d, e, seed, NOISE_WEIGHT_STREAM).expect("noise");
    NoisyTopK::new(gate, noise, k).expect("router")
}

/// `σ = softplus(x · W_noiseᵀ) + noise_epsilon`, recomputed here from the router's parameters.
fn sigma(r: &NoisyTopK, x: &Array2<f32>) -> Array2<f32> {
    x.dot(&r.noise().t())
        .mapv(|v| kit::softplus(v) + r.noise_epsilon())
}

/// `P(x, e)` is the probability that `e` stays in the top k when only its own noise `ε_e` is redrawn and the other
/// experts' noisy logits stay as drawn. Redraw `ε_e` `n` times with an independent generator and count how often
/// `e` lands in the top k. Each count is Binomial(n, P), so its mean has standard error `sqrt(P(1 − P) / n)`; 4
/// standard errors (two-sided tail 6e-5 per cell, 48 cells) plus 1e-3 for the f32 rounding of the logits is the
/// tolerance.
#[test]
fn smooth_load_matches_monte_carlo() {
    let (t, e, d, k, n) = (8usize, 6usize, 5usize, 2usize, 20_000u64);
    let r = router(d, e, k, 11);
    let x = SeqRng::new(12, 0).normal_matrix(t, d, 1.0);
    let train = RouterInput::new(x.view()).with_mode(Mode::Train { seed: 77 });
    let h = r.noisy_logits(&train).expect("noisy logits");
    let p = r.load_probabilities(&train).expect("load probabilities");
    let clean = r
        .noisy_logits(&RouterInput::new(x.view()))
        .expect("clean logits");
    let s = sigma(&r, &x);
    let mc = CounterRng::new(2024, 99);
    let mut intermediate = 0;
    for ti in 0..t {
        for ei in 0..e {
            let mut row = h.row(ti).to_vec();
            let mut hits = 0u64;
            for draw in 0..n {
                let eps = mc.normal_at(((ti * e + ei) as u64) * n + draw) as f32;
                row[ei] = clean[[ti, ei]] + eps * s[[ti, ei]];
                if kit::top_k(&row, k).contains(&ei) {
                    hits += 1;
                }
            }
            let est = hits as f64 / n as f64;
            let want = p[[ti, ei]];
            let tol = 4.0 * (want * (1.0 - want) / n as f64).sqrt() + 1e-3;
            assert!(
                (est - want).abs() <= tol,
                "token {ti} expert {ei}: Monte Carlo {est} vs P {want} (tolerance {tol})"
            );
            if (0.05..0.95).contains(&want) {
                intermediate += 1;
            }
        }
    }
    // The check is only meaningful if many cells are neither almost surely in nor almost surely out.
    assert!(intermediate >= 10, "only {intermediate} intermediate cells");
}

/// Averaged over the noise of all experts, `P` and the actual selection have the same mean: `P` is the conditional
/// expectation of the indicator "e in the top k" given the other experts' noise. Over `n` seeds of `route`, the mean
/// of `I − P` has standard error `sqrt(mean(P(1 − P)) / n)` (its conditional variance is `P(1 − P)`); 4 of those
/// plus 1e-3 is the tolerance. This runs the real `route` path, seed by seed.
#[test]
fn smooth_load_is_unbiased_for_routing() {
    let (t, e, d, k, n) = (8usize, 6usize, 5usize, 2usize, 20_000u64);
    let r = router(d, e, k, 5);
    let x = SeqRng::new(6, 0).normal_matrix(t, d, 1.0);
    let mut sum_i = Array2::<f64>::zeros((t, e));
    let mut sum_p = Array2::<f64>::zeros((t, e));
    let mut sum_var = Array2::<f64>::zeros((t, e));
    for seed in 0..n {
        let input = RouterInput::new(x.view()).with_mode(Mode::Train { seed });
        let plan = r.route(&input).expect("route");
        for g in plan.groups() {
            for &tok in g.tokens {
                sum_i[[tok as usize, g.expert]] += 1.0;
            }
        }
        let p = r.load_probabilities(&input).expect("load probabilities");
        sum_var += &p.mapv(|v| v * (1.0 - v));
        sum_p += &p;
    }
    let nf = n as f64;
    for ti in 0..t {
        for ei in 0..e {
            let (mi, mp) = (sum_i[[ti, ei]] / nf, sum_p[[ti, ei]] / nf);
            let tol = 4.0 * (sum_var[[ti, ei]] / nf / nf).sqrt() + 1e-3;
            assert!(
                (mi - mp).abs() <= tol,
                "token {ti} expert {ei}: selected {mi} vs mean P {mp} (tolerance {tol})"
            );
        }
    }
}

fn aux(plan: &Routing, kind: AuxLossKind) -> f32 {
    plan.aux_losses()
        .iter()
        .find(|a| a.kind == kind)
        .map(|a| a.value)
        .expect("loss present")
}

#[test]
fn losses_are_cv_squared_of_the_sums() {
    let (t, e, d, k) = (40usize, 8usize, 6usize, 3usize);
    let r = router(d, e, k, 3);
    let x = SeqRng::new(4, 0).normal_matrix(t, d, 1.0);
    let pad: Vec<bool> = (0..t).map(|i| i % 7 == 3).collect();
    for mode in [Mode::Eval, Mode::Train { seed: 8 }] {
        let input = RouterInput::new(x.view())
            .with_padding(&pad)
            .with_mode(mode);
        let plan = r.route(&input).expect("route");
        let mut importance = vec![0.0f64; e];
        for g in plan.groups() {
            importance[g.expert] = g.weights.iter().map(|&w| f64::from(w)).sum();
        }
        let imp = aux(&plan, AuxLossKind::Importance);
        assert!((imp - loss::cv_squared(&importance)).abs() < 1e-6);
        let p = r.load_probabilities(&input).expect("load probabilities");
        let load: Vec<f64> = p.columns().into_iter().map(|c| c.sum()).collect();
        let smooth = aux(&plan, AuxLossKind::SmoothLoad);
        assert!((smooth - loss::cv_squared(&load)).abs() < 1e-6);
        if mode == Mode::Eval {
            // In eval the load is the count of gates > 0, i.e. the expert counts here.
            let counts: Vec<f64> = plan.expert_counts().iter().map(|&c| c as f64).collect();
            assert_eq!(load, counts);
        }
    }
}

#[test]
fn same_routing_on_one_and_four_threads() {
    let (t, e, d, k) = (300usize, 16usize, 32usize, 3usize);
    let r = router(d, e, k, 21);
    let x = SeqRng::new(22, 0).normal_matrix(t, d, 1.0);
    let pad: Vec<bool> = (0..t).map(|i| i % 11 == 0).collect();
    let run = |threads: usize, mode: Mode| -> (Routing, Array2<f32>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let input = RouterInput::new(x.view())
                .with_padding(&pad)
                .with_mode(mode);
            (
                r.route(&input).expect("route"),
                r.noisy_logits(&input).expect("noisy logits"),
            )
        })
    };
    for mode in [Mode::Eval, Mode::Train { seed: 31 }] {
        assert_eq!(run(1, mode), run(4, mode), "{mode:?}");
    }
}

const E: usize = 6;
const D: usize = 5;
const K: usize = 2;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: RngSeed::Fixed(0x006E_6F69_7379),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Fixed config E = 6, d = 5, k = 2. Every real token gets k distinct experts with finite weights >= 0 that sum
    /// to 1 and ranks 0..k; the chosen experts hold the k largest noisy logits; padding tokens get nothing.
    /// Scales up to 30 push logits near ±100, where the second weight underflows.
    #[test]
    fn gates_are_a_distribution_over_k_distinct_experts(
        t in 0usize..24,
        data_seed in any::<u64>(),
        scale in prop::sample::select(vec![0.1f32, 1.0, 30.0]),
        train_seed in prop::option::of(any::<u64>()),
        pad_bits in any::<u32>(),
    ) {
        let r = router(D, E, K, 1);
        let x = SeqRng::new(data_seed, 0).normal_matrix(t, D, scale);
        let pad: Vec<bool> = (0..t).map(|i| pad_bits >> i & 1 == 1).collect();
        let mode = train_seed.map_or(Mode::Eval, |seed| Mode::Train { seed });
        let input = RouterInput::new(x.view()).with_padding(&pad).with_mode(mode);
        let plan = r.route(&input).expect("route");
        let h = r.noisy_logits(&input).expect("noisy logits");
        for (ti, choices) in plan.per_token().iter().enumerate() {
            if pad[ti] {
                prop_assert!(choices.is_empty());
                continue;
            }
            prop_assert_eq!(choices.len(), K);
            let mut experts: Vec<usize> = choices.iter().map(|c| c.0).collect();
            let ranks: Vec<u16> = choices.iter().map(|c| c.2).collect();
            prop_assert_eq!(ranks, (0..K as u16).collect::<Vec<_>>());
            let sum: f32 = choices.iter().map(|c| c.1).sum();
            prop_assert!(choices.iter().all(|c| c.1.is_finite() && c.1 >= 0.0));
            prop_assert!((sum - 1.0).abs() < 1e-5, "sum {}", sum);
            let lowest_chosen = experts.iter().map(|&j| h[[ti, j]]).fold(f32::INFINITY, f32::min);
            for j in (0..E).filter(|j| !experts.contains(j)) {
                prop_assert!(h[[ti, j]] <= lowest_chosen);
            }
            experts.sort_unstable();
            experts.dedup();
            prop_assert_eq!(experts.len(), K);
        }
    }
}
