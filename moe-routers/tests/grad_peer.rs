//! The backward of `peer` against finite differences (`moe_core::testing::check_router_grad`) over random
//! heads, `N = n²`, k, product-key candidates, sub-key widths, ReLU or softmax weights, query BatchNorm (train mode
//! through the batch statistics, eval mode with running statistics), padding; the training-mode BatchNorm and
//! `update_state` against PyTorch's formulas written out here; bit-identical gradients across calls and thread
//! counts; and a backward over `N = 1024²` experts whose cost and gradients are sized by `√N`, not `N`.

use ndarray::{Array1, Array2};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use moe_core::rng::SeqRng;
use moe_core::testing::check_router_grad;
use moe_core::{Mode, MoeError, Router, RouterBackward, RouterGrads, RouterInput};
use moe_routers::peer::{Peer, PeerWeights, QueryBatchNorm};

fn fixed(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x9EE6),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Query BatchNorm over `f` features: PyTorch's initial state, or seeded statistics and affine parameters.
fn batchnorm(f: usize, random: bool, seed: u64) -> QueryBatchNorm {
    if !random {
        return QueryBatchNorm::identity(f);
    }
    let mut rng = SeqRng::new(seed, 21);
    let mut v = |scale: f64, offset: f64| -> Array1<f32> {
        (0..f)
            .map(|_| (rng.normal() * scale + offset) as f32)
            .collect()
    };
    QueryBatchNorm {
        running_mean: v(0.3, 0.0),
        running_var: v(0.2, 1.0).mapv(|x| x.abs() + 0.1),
        weight: v(0.3, 1.0),
        bias: v(0.3, 0.0),
        eps: 1e-5,
        momentum: 0.1,
    }
}

/// The backward with seeded coefficients for every slot.
fn backward(r: &Peer, input: &RouterInput<'_>, seed: u64) -> RouterGrads {
    let plan = r.route(input).expect("route");
    let mut rng = SeqRng::new(seed, 11);
    let c: Vec<f32> = (0..plan.n_slots()).map(|_| rng.normal() as f32).collect();
    r.backward(&RouterBackward {
        input,
        routing: &plan,
        d_weights: &c,
        d_aux: &[],
    })
    .expect("backward")
}

/// Smallest gap kept between the k-th and (k+1)-th expert score of every real token and head in the property
/// test: a perturbation `h = 1e-2 · max(1, |θ|)` of one coordinate moves scores by about `h` times unit-scale
/// factors, so closer scores switch the retrieval at `± h` (the checker skips such coordinates, and fails where
/// most are).
const MARGIN: f64 = 0.05;

/// The queries after BatchNorm as the forward computes them (in f64): `[T, h·2·d_key]`.
fn queries(w: &PeerWeights, bn: Option<&QueryBatchNorm>, input: &RouterInput<'_>) -> Array2<f64> {
    let mut q = projections(w, &input.hidden.to_owned());
    let Some(bn) = bn else {
        return q;
    };
    let real: Vec<usize> = (0..input.n_tokens())
        .filter(|&i| !input.is_padding(i))
        .collect();
    let f = q.ncols();
    let (mut mean, mut var): (Vec<f64>, Vec<f64>) = (
        bn.running_mean.iter().map(|&v| f64::from(v)).collect(),
        bn.running_var.iter().map(|&v| f64::from(v)).collect(),
    );
    if matches!(input.mode, Mode::Train { .. }) && !real.is_empty() {
        let n = real.len() as f64;
        for c in 0..f {
            mean[c] = real.iter().map(|&i| q[[i, c]]).sum::<f64>() / n;
            var[c] = real
                .iter()
                .map(|&i| (q[[i, c]] - mean[c]).powi(2))
                .sum::<f64>()
                / n;
        }
    }
    for mut row in q.outer_iter_mut() {
        for c in 0..f {
            let scale = f64::from(bn.weight[c]) / (var[c] + f64::from(bn.eps)).sqrt();
            row[c] = (row[c] - mean[c]) * scale + f64::from(bn.bias[c]);
        }
    }
    q
}

/// The smallest gap between the k-th and (k+1)-th of all `N` scores over every real token and head (brute
/// force; infinite for `k = N`), and with ReLU weights (`relu`) also the smallest `|score|` of the kept `k`: the
/// ReLU's kink at 0 is as far from the checked point.
fn margin(
    w: &PeerWeights,
    bn: Option<&QueryBatchNorm>,
    k: usize,
    relu: bool,
    input: &RouterInput<'_>,
) -> f64 {
    let (h, two_dk, _) = w.query.dim();
    let (dk, n) = (two_dk / 2, w.keys_1.dim().1);
    let q = queries(w, bn, input);
    let mut best = f64::INFINITY;
    for t in (0..input.n_tokens()).filter(|&i| !input.is_padding(i)) {
        for head in 0..h {
            let half = |keys: &ndarray::Array3<f32>, off: usize, a: usize| -> f64 {
                (0..dk)
                    .map(|j| f64::from(keys[[head, a, j]]) * q[[t, head * two_dk + off + j]])
                    .sum()
            };
            let mut all: Vec<f64> = (0..n * n)
                .map(|e| half(&w.keys_1, 0, e / n) + half(&w.keys_2, dk, e % n))
                .collect();
            all.sort_by(|a, b| b.total_cmp(a));
            if let Some(&next) = all.get(k) {
                best = best.min(all[k - 1] - next);
            }
            if relu {
                best = all[..k].iter().fold(best, |m, s| m.min(s.abs()));
            }
        }
    }
    best
}

proptest! {
    #![proptest_config(fixed(64))]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..16,
        d in 1usize..8,
        heads in 1usize..4,
        n in 2usize..7,
        k_raw in 1usize..5,
        p_extra in 0usize..3,
        d_key in 1usize..5,
        non_competing in any::<bool>(),
        bn in 0u8..3,
        pad_every in 0usize..4,
        train in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let k = k_raw.min(n);
        let p = (k + p_extra).min(n);
        // Training-mode BatchNorm over a handful of tokens curves the loss so much (the batch variance of 2 or 3
        // queries) that central differences at the checker's h are off by their truncation error: at least 6
        // more tokens there.
        // It also makes the loss invariant to the scale of each query row, with curvature ~ 1 / |row|²: rows
        // shorter than 1/2 are redrawn there (with d = 1 a row is one N(0, 1) value, often tiny, so d >= 2).
        let t = if bn > 0 && train { t + 6 } else { t };
        let d = if bn > 0 && train { d.max(2) } else { d };
        let w = PeerWeights::random(d, n, heads, d_key, seed).expect("weights");
        let shortest = w
            .query
            .rows()
            .into_iter()
            .map(|r| r.dot(&r).sqrt())
            .fold(f32::INFINITY, f32::min);
        prop_assume!(!(bn > 0 && train) || shortest > 0.5);
        let mut r = Peer::new(w.clone(), k, p).expect("peer").with_non_competing_scores(non_competing);
        let norm = (bn > 0).then(|| batchnorm(heads * 2 * d_key, bn == 2, seed));
        if let Some(b) = &norm {
            r = r.with_query_batchnorm(b.clone()).expect("batchnorm");
        }
        let x = SeqRng::new(seed, 7).normal_matrix(t, d, 1.0);
        let pad: Vec<bool> = (0..t).map(|i| pad_every > 0 && i % (pad_every + 1) == 1).collect();
        let mode = if train { Mode::Train { seed } } else { Mode::Eval };
        let input = RouterInput::new(x.view()).with_padding(&pad).with_mode(mode);
        prop_assume!(margin(&w, norm.as_ref(), k, non_competing, &input) > MARGIN);
        let report = check_router_grad(&r, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
        let g = backward(&r, &input, seed);
        for (i, &is_pad) in pad.iter().enumerate() {
            if is_pad {
                prop_assert!(g.d_hidden.row(i).iter().all(|&v| v == 0.0), "padding row {}", i);
            }
        }
        let names: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
        if bn > 0 {
            prop_assert_eq!(
                names,
                ["query", "keys_1", "keys_2", "query_batchnorm.weight", "query_batchnorm.bias"]
            );
        } else {
            prop_assert_eq!(names, ["query", "keys_1", "keys_2"]);
        }
    }
}

/// `x · W_qᵀ` in f64, `[T, h·2·d_key]`.
fn projections(w: &PeerWeights, x: &Array2<f32>) -> Array2<f64> {
    let (h, f, d) = w.query.dim();
    let q = w
        .query
        .clone()
        .into_shape_with_order((h * f, d))
        .expect("reshape")
        .mapv(f64::from);
    x.mapv(f64::from).dot(&q.t())
}

#[test]
fn training_mode_normalises_with_the_batch_statistics() {
    // PyTorch's BatchNorm1d in training: (q − mean) / sqrt(var_biased + eps) · weight + bias over the batch's
    // non-padding rows. The same plan comes from the eval form with running statistics set to the batch's.
    let w = PeerWeights::random(10, 8, 2, 3, 1).expect("weights");
    let x = SeqRng::new(3, 0).normal_matrix(30, 10, 1.0);
    let pad: Vec<bool> = (0..30).map(|i| i % 5 == 2).collect();
    let q = projections(&w, &x);
    let real: Vec<usize> = (0..30).filter(|&i| !pad[i]).collect();
    let n = real.len() as f64;
    let mut mean = Array1::<f64>::zeros(12);
    for &i in &real {
        mean += &q.row(i);
    }
    mean /= n;
    let mut var = Array1::<f64>::zeros(12);
    for &i in &real {
        var += &(&q.row(i) - &mean).mapv(|v| v * v);
    }
    var /= n;
    let bn = batchnorm(12, true, 4);
    let train = Peer::new(w.clone(), 3, 4)
        .expect("peer")
        .with_query_batchnorm(bn.clone())
        .expect("bn");
    let as_eval = Peer::new(w, 3, 4)
        .expect("peer")
        .with_query_batchnorm(QueryBatchNorm {
            running_mean: mean.mapv(|v| v as f32),
            running_var: var.mapv(|v| v as f32),
            ..bn
        })
        .expect("bn");
    assert!(!train.is_causal());
    let input = RouterInput::new(x.view()).with_padding(&pad);
    let got = train
        .route(&input.clone().with_mode(Mode::Train { seed: 1 }))
        .expect("route");
    let want = as_eval.route(&input).expect("route");
    assert_eq!(got.active_experts(), want.active_experts());
    assert_eq!(got.slot_tokens(), want.slot_tokens());
    for (a, b) in got.slot_weights().iter().zip(want.slot_weights()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // The eval mode of the training router still uses its running statistics (PyTorch's initial ones here are not
    // the batch's, so the plans differ).
    assert_ne!(train.route(&input).expect("route"), got);
}

#[test]
fn update_state_moves_the_running_statistics_as_pytorch() {
    let w = PeerWeights::random(6, 4, 2, 2, 2).expect("weights");
    let x = SeqRng::new(5, 0).normal_matrix(17, 6, 1.0);
    let pad: Vec<bool> = (0..17).map(|i| i % 4 == 0).collect();
    let bn = batchnorm(8, true, 7);
    let mut r = Peer::new(w.clone(), 2, 2)
        .expect("peer")
        .with_query_batchnorm(bn.clone())
        .expect("bn");
    let input = RouterInput::new(x.view())
        .with_padding(&pad)
        .with_mode(Mode::Train { seed: 2 });
    let plan = r.route(&input).expect("route");
    assert_eq!(r.update_state(&input, &plan, 0.0), Ok(true));
    // running ← 0.9 · running + 0.1 · batch, the variance unbiased (n − 1), over the non-padding rows.
    let q = projections(&w, &x);
    let real: Vec<usize> = (0..17).filter(|&i| !pad[i]).collect();
    let n = real.len() as f64;
    let after = r.query_batchnorm().expect("bn");
    for f in 0..8 {
        let m = real.iter().map(|&i| q[[i, f]]).sum::<f64>() / n;
        let v = real.iter().map(|&i| (q[[i, f]] - m).powi(2)).sum::<f64>() / (n - 1.0);
        let want_m = 0.9 * f64::from(bn.running_mean[f]) + 0.1 * m;
        let want_v = 0.9 * f64::from(bn.running_var[f]) + 0.1 * v;
        assert!(
            (f64::from(after.running_mean[f]) - want_m).abs() < 1e-6,
            "mean {f}"
        );
        assert!(
            (f64::from(after.running_var[f]) - want_v).abs() < 1e-6,
            "var {f}"
        );
    }
    // The affine parameters are the optimizer's, not update_state's; the statistics are frozen for it.
    assert_eq!(after.weight, bn.weight);
    let frozen: Vec<(String, bool)> = r
        .params()
        .into_iter()
        .map(|p| (p.name, p.trainable))
        .collect();
    assert_eq!(
        frozen[3..],
        [
            ("query_batchnorm.weight".to_string(), true),
            ("query_batchnorm.bias".to_string(), true),
            ("query_batchnorm.running_mean".to_string(), false),
            ("query_batchnorm.running_var".to_string(), false),
        ]
    );
    // One non-padding token: the unbiased variance is undefined.
    let one: Vec<bool> = (0..17).map(|i| i != 3).collect();
    let lone = RouterInput::new(x.view()).with_padding(&one);
    let plan = r.route(&lone).expect("route");
    assert!(matches!(
        r.update_state(&lone, &plan, 0.0),
        Err(MoeError::InvalidConfig { .. })
    ));
    // A plan of another T.
    let short = RouterInput::new(x.slice(ndarray::s![..5, ..]));
    let other = r.route(&short).expect("route");
    assert!(matches!(
        r.update_state(&input, &other, 0.0),
        Err(MoeError::Mismatch { .. })
    ));
    // Without BatchNorm there is no state.
    let mut plain = Peer::new(w, 2, 2).expect("peer");
    let plan = plain.route(&input).expect("route");
    assert_eq!(plain.update_state(&input, &plan, 0.0), Ok(false));
    assert!(plain.is_causal());
}

#[test]
fn gradients_are_bit_identical_across_calls_and_threads() {
    // 300 tokens: 2 blocks of the retrieval's 256; 3 heads run in parallel in the backward.
    let w = PeerWeights::random(20, 16, 3, 6, 4).expect("weights");
    let r = Peer::new(w, 4, 6)
        .expect("peer")
        .with_query_batchnorm(batchnorm(36, true, 1))
        .expect("bn");
    let x = SeqRng::new(8, 0).normal_matrix(300, 20, 1.0);
    let pad: Vec<bool> = (0..300).map(|i| i % 9 == 4).collect();
    for mode in [Mode::Eval, Mode::Train { seed: 3 }] {
        let input = RouterInput::new(x.view())
            .with_padding(&pad)
            .with_mode(mode);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| backward(&r, &input, 5))
        };
        let one = run(1);
        assert_eq!(one, run(1), "{mode:?}");
        assert_eq!(one, run(2), "{mode:?}");
        assert_eq!(one, run(4), "{mode:?}");
    }
}

#[test]
fn a_million_experts_backward_is_sized_by_the_square_root() {
    // N = 1024² experts, d = 8, 2 heads of d_key 4, k = 4: the router's parameters and gradients hold
    // h·2·d_key·d + 2·h·n·d_key = 128 + 16384 values, and the backward never touches the N experts.
    let (d, n, h, dk) = (8usize, 1024usize, 2usize, 4usize);
    let w = PeerWeights::random(d, n, h, dk, 9).expect("weights");
    let r = Peer::new(w, 4, 4).expect("peer");
    assert_eq!(r.n_experts(), 1 << 20);
    let x = SeqRng::new(1, 0).normal_matrix(32, d, 1.0);
    let input = RouterInput::new(x.view()).with_mode(Mode::Train { seed: 1 });
    let start = std::time::Instant::now();
    let g = backward(&r, &input, 2);
    let elapsed = start.elapsed();
    let values: usize = g
        .params
        .iter()
        .map(|p| p.shape().iter().product::<usize>())
        .sum();
    assert_eq!(values, h * 2 * dk * d + 2 * h * n * dk);
    assert!(values * 32 < r.n_experts(), "{values} gradient values");
    // The touched sub-key rows: at most k per token and head, of n.
    let touched = g.params[1]
        .to_dense()
        .expect("dense")
        .into_shape_with_order((h * n, dk))
        .expect("reshape")
        .outer_iter()
        .filter(|row| row.iter().any(|&v| v != 0.0))
        .count();
    assert!(touched > 0 && touched <= 32 * h * 4, "{touched} rows");
    // Loose: O(N·d) work would be 8M multiply-adds per token; this is a few thousand.
    assert!(
        elapsed.as_secs_f64() < 20.0,
        "backward over N = 2^20 took {elapsed:?}"
    );
}

#[test]
fn a_plan_from_another_input_is_refused() {
    let w = PeerWeights::random(6, 5, 2, 3, 2).expect("weights");
    let r = Peer::new(w, 3, 3).expect("peer");
    let x = SeqRng::new(2, 0).normal_matrix(8, 6, 1.0);
    let y = SeqRng::new(3, 0).normal_matrix(8, 6, 1.0);
    let plan = r.route(&RouterInput::new(y.view())).expect("route");
    let dw = vec![1.0f32; plan.n_slots()];
    assert!(matches!(
        r.backward(&RouterBackward {
            input: &RouterInput::new(x.view()),
            routing: &plan,
            d_weights: &dw,
            d_aux: &[],
        }),
        Err(MoeError::Mismatch { .. })
    ));
}
