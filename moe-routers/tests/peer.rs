//! Behaviour of the `peer` router: product-key retrieval equals brute-force top-k over all `N` experts, weights,
//! determinism across thread counts, conformance and the registry defaults.

use ndarray::{Array2, ArrayView1};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use moe_core::rng::SeqRng;
use moe_core::{MoeError, Router, RouterArgs, RouterInput, Routing};
use moe_routers::peer::{Peer, PeerConfig, PeerWeights, QueryBatchNorm};

/// Scores are compared with an f64 brute force: 1e-5 absolute covers f32 rounding of dot products of length
/// `d <= 32` and `d_key <= 16` with unit-scale values (scores are about 1 to 10).
const SCORE_TOL: f64 = 1e-5;

fn fixed(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x9EE2),
        failure_persistence: None,
        ..Config::default()
    }
}

fn dot(a: ArrayView1<'_, f32>, b: ArrayView1<'_, f32>) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Brute force over all `N = n²` experts, in f64: for each token and head, the `k` best `(expert, score)` by score
/// descending, ties to the lower id.
fn brute_force(w: &PeerWeights, x: &Array2<f32>, k: usize) -> Vec<Vec<Vec<(u32, f64)>>> {
    let (h, two_dk, _) = w.query.dim();
    let (dk, n) = (two_dk / 2, w.keys_1.dim().1);
    x.outer_iter()
        .map(|row| {
            (0..h)
                .map(|head| {
                    let q: Vec<f64> = (0..two_dk)
                        .map(|r| dot(w.query.slice(ndarray::s![head, r, ..]), row))
                        .collect();
                    let half = |keys: &ndarray::Array3<f32>, part: &[f64]| -> Vec<f64> {
                        (0..n)
                            .map(|a| {
                                keys.slice(ndarray::s![head, a, ..])
                                    .iter()
                                    .zip(part)
                                    .map(|(&c, &q)| c as f64 * q)
                                    .sum()
                            })
                            .collect()
                    };
                    let s1 = half(&w.keys_1, &q[..dk]);
                    let s2 = half(&w.keys_2, &q[dk..]);
                    let mut all: Vec<(u32, f64)> = (0..n * n)
                        .map(|e| (e as u32, s1[e / n] + s2[e % n]))
                        .collect();
                    let cmp =
                        |x: &(u32, f64), y: &(u32, f64)| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0));
                    all.select_nth_unstable_by(k - 1, cmp);
                    all.truncate(k);
                    all.sort_by(cmp);
                    all
                })
                .collect()
        })
        .collect()
}

/// Checks the router's retrieval against the brute force: same expert sets, scores within [`SCORE_TOL`].
fn assert_matches_brute_force(r: &Peer, w: &PeerWeights, x: &Array2<f32>) {
    let got = r.retrieve(x.view()).expect("retrieve");
    let want = brute_force(w, x, r.k());
    for (t, heads) in want.iter().enumerate() {
        for (head, best) in heads.iter().enumerate() {
            let mut g: Vec<(u32, f32)> = (0..r.k())
                .map(|j| (got.experts[[t, head, j]], got.scores[[t, head, j]]))
                .collect();
            // Descending scores as returned.
            assert!(
                g.windows(2).all(|p| p[0].1 >= p[1].1),
                "token {t} head {head}: not sorted {g:?}"
            );
            let mut b = best.clone();
            g.sort_by_key(|p| p.0);
            b.sort_by_key(|p| p.0);
            let ge: Vec<u32> = g.iter().map(|p| p.0).collect();
            let be: Vec<u32> = b.iter().map(|p| p.0).collect();
            assert_eq!(ge, be, "token {t} head {head}: expert sets differ");
            for (gp, bp) in g.iter().zip(&b) {
                assert!(
                    (gp.1 as f64 - bp.1).abs() < SCORE_TOL,
                    "token {t} head {head} expert {}: {} vs {}",
                    gp.0,
                    gp.1,
                    bp.1
                );
            }
        }
    }
}

#[test]
fn product_keys_equal_brute_force_n64_squared() {
    // N = 4096, d = 32, d_key = 16, 3 heads, k = 16, 24 tokens; and p = 32 candidates per half (still exact).
    let (d, n, h, dk) = (32, 64, 3, 16);
    let w = PeerWeights::random(d, n, h, dk, 11).expect("weights");
    let x = SeqRng::new(12, 0).normal_matrix(24, d, 1.0);
    let r = Peer::new(w.clone(), 16, 16).expect("peer");
    assert_eq!(r.n_experts(), 64 * 64);
    assert_matches_brute_force(&r, &w, &x);
    let wide = Peer::new(w.clone(), 16, 32).expect("peer");
    assert_matches_brute_force(&wide, &w, &x);
}

#[test]
fn product_keys_equal_brute_force_n256_squared() {
    // N = 65536, d = 16, d_key = 8, 2 heads, k = 8, 16 tokens.
    let (d, n, h, dk) = (16, 256, 2, 8);
    let w = PeerWeights::random(d, n, h, dk, 21).expect("weights");
    let x = SeqRng::new(22, 0).normal_matrix(16, d, 1.0);
    let r = Peer::new(w.clone(), 8, 8).expect("peer");
    assert_eq!(r.n_experts(), 256 * 256);
    assert_matches_brute_force(&r, &w, &x);
}

#[test]
fn softmax_weights_sum_to_one_per_head_and_ranks_are_head_major() {
    let cfg = PeerConfig {
        heads: Some(4),
        k: Some(5),
        ..Default::default()
    };
    let r = cfg.build(24, 100, 5).expect("peer");
    let x = SeqRng::new(6, 0).normal_matrix(70, 24, 1.0);
    let p = r.route(&RouterInput::new(x.view())).expect("route");
    assert_eq!(p.n_slots(), 70 * 4 * 5);
    let found = r.retrieve(x.view()).expect("retrieve");
    for (t, slots) in p.per_token().iter().enumerate() {
        assert_eq!(slots.len(), 20);
        for head in 0..4 {
            let mine: Vec<&(usize, f32, u16)> =
                slots.iter().filter(|s| s.2 as usize / 5 == head).collect();
            assert_eq!(mine.len(), 5);
            let sum: f32 = mine.iter().map(|s| s.1).sum();
            assert!((sum - 1.0).abs() < 1e-5, "token {t} head {head}: sum {sum}");
            // Rank head·k + j holds the j-th retrieved expert; weights descend with the scores.
            for (j, s) in mine.iter().enumerate() {
                assert_eq!(s.0 as u32, found.experts[[t, head, j]]);
            }
            assert!(mine.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
}

#[test]
fn non_competing_scores_are_relu() {
    let base = PeerConfig {
        heads: Some(2),
        k: Some(3),
        ..Default::default()
    };
    let nc = PeerConfig {
        non_competing_scores: Some(true),
        ..base.clone()
    };
    let r = nc.build(8, 36, 1).expect("peer");
    let x = SeqRng::new(2, 0).normal_matrix(10, 8, 1.0);
    let found = r.retrieve(x.view()).expect("retrieve");
    let p = r.route(&RouterInput::new(x.view())).expect("route");
    for (t, slots) in p.per_token().iter().enumerate() {
        for &(_, w, rank) in slots {
            let (head, j) = (rank as usize / 3, rank as usize % 3);
            assert_eq!(w, found.scores[[t, head, j]].max(0.0));
        }
    }
    // Same retrieval as the softmax router: only the weights differ.
    assert_eq!(
        base.build(8, 36, 1)
            .expect("peer")
            .retrieve(x.view())
            .expect("retrieve"),
        found
    );
}

#[test]
fn same_plan_on_1_and_4_threads() {
    // 300 tokens x 3 heads make 6 work units (2 blocks of 256 tokens), so several threads really share the work.
    let cfg = PeerConfig {
        heads: Some(3),
        k: Some(6),
        query_batchnorm: Some(true),
        ..Default::default()
    };
    let r = cfg.build(20, 32 * 32, 4).expect("peer");
    let x = SeqRng::new(8, 0).normal_matrix(300, 20, 1.0);
    let run = |threads: usize| -> Routing {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| r.route(&RouterInput::new(x.view())))
            .expect("route")
    };
    let one = run(1);
    assert_eq!(one, run(4));
    assert_eq!(one, run(3));
    // Also independent of how tokens are batched: the first 10 tokens alone route the same way.
    let head = r
        .retrieve(x.slice(ndarray::s![..10, ..]))
        .expect("retrieve");
    let all = r.retrieve(x.view()).expect("retrieve");
    assert_eq!(head.experts, all.experts.slice(ndarray::s![..10, .., ..]));
}

#[test]
fn conformance() {
    let d = 12;
    for cfg in [
        PeerConfig::default(),
        PeerConfig {
            heads: Some(2),
            k: Some(3),
            product_key_topk: Some(5),
            d_key: Some(4),
            ..Default::default()
        },
        PeerConfig {
            non_competing_scores: Some(true),
            query_batchnorm: Some(true),
            k: Some(1),
            ..Default::default()
        },
    ] {
        for e in [1, 16, 25 * 25] {
            let k_ok =
                cfg.k.is_none_or(|k| k * k <= e) && cfg.product_key_topk.is_none_or(|p| p * p <= e);
            if !k_ok {
                continue;
            }
            let r = cfg.build(d, e, 3).expect("peer");
            moe_core::testing::check_router(&r, d)
                .unwrap_or_else(|err| panic!("{cfg:?} E = {e}: {err}"));
        }
    }
}

#[test]
fn registry_defaults_work_at_e16_and_explain_non_squares() {
    let reg = moe_routers::builtin();
    let r = reg
        .create("peer", &RouterArgs::new(16, 16, 2, 0))
        .expect("E = 16 = 4²");
    assert_eq!((r.n_experts(), r.d_model()), (16, Some(16)));
    let x = SeqRng::new(1, 0).normal_matrix(5, 16, 1.0);
    let p = r.route(&RouterInput::new(x.view())).expect("route");
    // Defaults: 8 heads, k = min(16, 4) = 4 -> 32 slots per token.
    assert_eq!(p.n_slots(), 5 * 8 * 4);
    match reg.create("peer", &RouterArgs::new(16, 20, 2, 0)) {
        Err(MoeError::InvalidConfig { option, reason, .. }) => {
            assert_eq!(option, "n_experts");
            assert!(
                reason.contains("16 = 4²") && reason.contains("25 = 5²"),
                "{reason}"
            );
        }
        other => panic!("expected a non-square error, got {other:?}"),
    }
    let typo = RouterArgs::new(16, 16, 2, 0).with_option("head", 2);
    assert!(matches!(
        reg.create("peer", &typo),
        Err(MoeError::InvalidConfig { .. })
    ));
}

#[test]
fn given_weights_and_batchnorm_shapes_are_checked() {
    let w = PeerWeights::random(8, 4, 2, 3, 0).expect("weights");
    let mut bad = w.clone();
    bad.keys_2 = ndarray::Array3::zeros((2, 5, 3));
    assert!(matches!(Peer::new(bad, 2, 2), Err(MoeError::Shape { .. })));
    let mut nan = w.clone();
    nan.query[[1, 2, 3]] = f32::NAN;
    assert!(matches!(
        Peer::new(nan, 2, 2),
        Err(MoeError::InvalidConfig { .. })
    ));
    let cfg = PeerConfig {
        heads: Some(3),
        ..Default::default()
    };
    assert!(matches!(
        cfg.build_with(w.clone()),
        Err(MoeError::Mismatch { .. })
    ));
    let r = PeerConfig::default().build_with(w).expect("peer");
    assert_eq!((r.heads(), r.n_keys(), r.d_key(), r.k()), (2, 4, 3, 4));
    assert!(
        r.clone()
            .with_query_batchnorm(QueryBatchNorm::identity(12))
            .is_ok()
    );
    assert!(matches!(
        r.with_query_batchnorm(QueryBatchNorm::identity(6)),
        Err(MoeError::Shape { .. })
    ));
}

#[test]
fn large_pool_routes_without_touching_every_expert() {
    // N = 1024² with d = 64: the router holds O(h·n·d_key) keys, never an [N] array; a handful of tokens route
    // quickly and the plan names only the retrieved experts.
    let cfg = PeerConfig {
        heads: Some(2),
        k: Some(4),
        d_key: Some(16),
        ..Default::default()
    };
    let r = cfg.build(64, 1 << 20, 9).expect("peer");
    let x = SeqRng::new(3, 0).normal_matrix(4, 64, 1.0);
    let p = r.route(&RouterInput::new(x.view())).expect("route");
    assert_eq!(p.n_experts(), 1 << 20);
    assert!(p.active_experts().len() <= 4 * 2 * 4);
}

proptest! {
    #![proptest_config(fixed(64))]

    #[test]
    fn fast_path_equals_brute_force(
        n in 1usize..12,
        h in 1usize..4,
        dk in 1usize..6,
        d in 1usize..10,
        kf in 0.0f64..1.0,
        pf in 0.0f64..1.0,
        t in 0usize..9,
        seed in any::<u64>(),
    ) {
        let k = 1 + ((n - 1) as f64 * kf) as usize;
        let p = k + ((n - k) as f64 * pf) as usize;
        let w = PeerWeights::random(d, n, h, dk, seed).expect("weights");
        let x = SeqRng::new(seed, 99).normal_matrix(t, d, 1.0);
        let r = Peer::new(w.clone(), k, p).expect("peer");
        assert_matches_brute_force(&r, &w, &x);
        // Within a head the k experts are distinct (they are distinct (a, b) pairs).
        let found = r.retrieve(x.view()).expect("retrieve");
        for row in found.experts.outer_iter() {
            for head in row.outer_iter() {
                let mut e: Vec<u32> = head.to_vec();
                e.sort_unstable();
                e.dedup();
                prop_assert_eq!(e.len(), k);
            }
        }
    }
}

#[test]
fn padding_tokens_get_no_slots() {
    let cfg = PeerConfig {
        heads: Some(2),
        k: Some(2),
        ..Default::default()
    };
    let r = cfg.build(8, 16, 0).expect("peer");
    let x = SeqRng::new(4, 0).normal_matrix(3, 8, 1.0);
    let pad = [false, true, false];
    let p = r
        .route(&RouterInput::new(x.view()).with_padding(&pad))
        .expect("route");
    assert_eq!((p.n_slots(), p.n_real_tokens()), (2 * 2 * 2, 2));
    assert!(p.per_token()[1].is_empty());
}
