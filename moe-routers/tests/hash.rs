//! Behaviour of the `hash` router: conformance, determinism across thread counts, and invariants of every table
//! and weighting (k distinct experts, weights summing to 1, the balanced table's load bound).

use ndarray::Array2;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use moe_core::rng::SeqRng;
use moe_core::{MoeError, Router, RouterArgs, RouterInput, Routing, WorkloadConfig};
use moe_routers::hash::{HashRouter, HashRouterConfig, HashTable, HashWeights};

fn fixed(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x4A54),
        failure_persistence: None,
        ..Config::default()
    }
}

fn route(r: &HashRouter, x: &Array2<f32>, ids: &[u32]) -> Routing {
    r.route(&RouterInput::new(x.view()).with_token_ids(ids))
        .expect("route")
}

#[test]
fn conformance_of_every_variant() {
    let d = 12;
    for table in [HashTable::Random, HashTable::Balanced, HashTable::Modulo] {
        for weights in [HashWeights::Uniform, HashWeights::Gate] {
            for k in [1, 3] {
                let counts = (table == HashTable::Balanced)
                    .then(|| (0..100u64).map(|v| 1000 / (v + 1)).collect());
                let cfg = HashRouterConfig {
                    table: Some(table),
                    counts,
                    k: Some(k),
                    weights: Some(weights),
                    ..Default::default()
                };
                let r = cfg.build(d, 8, 7).expect("build");
                moe_core::testing::check_router(&r, d)
                    .unwrap_or_else(|e| panic!("{table:?}/{weights:?}/k={k}: {e}"));
            }
        }
    }
}

#[test]
fn registry_default_builds_and_needs_token_ids() {
    let reg = moe_routers::builtin();
    let r = reg
        .create("hash", &RouterArgs::new(16, 16, 2, 0))
        .expect("create");
    assert_eq!(r.d_model(), None);
    let x = Array2::<f32>::zeros((3, 5));
    assert_eq!(
        r.route(&RouterInput::new(x.view())),
        Err(MoeError::MissingInput {
            router: "hash".into(),
            what: "token ids".into()
        })
    );
    let p = r
        .route(&RouterInput::new(x.view()).with_token_ids(&[1, 2, 31_999]))
        .expect("route");
    assert_eq!(p.n_slots(), 3);
}

#[test]
fn same_plan_on_1_and_4_threads() {
    let w = WorkloadConfig {
        tokens: 3000,
        d_model: 16,
        vocab: 32_000,
        ..Default::default()
    }
    .generate()
    .expect("workload");
    let cfg = HashRouterConfig {
        k: Some(2),
        weights: Some(HashWeights::Gate),
        ..Default::default()
    };
    let r = cfg.build(16, 8, 3).expect("build");
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| route(&r, &w.hidden, &w.token_ids))
    };
    let one = run(1);
    assert_eq!(one, run(4));
    assert_eq!(
        one,
        route(
            &cfg.build(16, 8, 3).expect("rebuild"),
            &w.hidden,
            &w.token_ids
        ),
        "same seed, same router"
    );
}

#[test]
fn balanced_beats_random_on_zipf_ids() {
    // Zipf token ids: the balanced table built from their own counts spreads the load better than a random one.
    let w = WorkloadConfig {
        tokens: 20_000,
        d_model: 4,
        vocab: 2000,
        skew: 1.1,
        ..Default::default()
    }
    .generate()
    .expect("workload");
    let mut counts = vec![0u64; 2000];
    for &id in &w.token_ids {
        counts[id as usize] += 1;
    }
    let balanced = HashRouter::balanced(&counts, 16, 1).expect("balanced");
    let random = HashRouter::random(2000, 16, 1, 0).expect("random");
    let cv_b = route(&balanced, &w.hidden, &w.token_ids).diagnostics().cv;
    let cv_r = route(&random, &w.hidden, &w.token_ids).diagnostics().cv;
    assert!(cv_b < cv_r, "balanced cv {cv_b} vs random cv {cv_r}");
}

proptest! {
    #![proptest_config(fixed(128))]

    #[test]
    fn k_distinct_experts_and_weights_sum_to_one(
        e in 1usize..40,
        kf in 0.0f64..1.0,
        table in 0u8..3,
        gate in any::<bool>(),
        seed in any::<u64>(),
        ids in proptest::collection::vec(0u32..500, 0..40),
    ) {
        let k = 1 + ((e - 1) as f64 * kf) as usize;
        let d = 6;
        let r = match table {
            0 => HashRouter::random(500, e, k, seed),
            1 => HashRouter::balanced(&(0..500u64).map(|v| (v * 7919 + seed) % 97).collect::<Vec<_>>(), e, k),
            _ => HashRouter::modulo(e, k),
        }.expect("router");
        let r = if gate { r.with_gate(SeqRng::new(seed, 9).normal_matrix(e, d, 1.0)).expect("gate") } else { r };
        let x = SeqRng::new(seed, 10).normal_matrix(ids.len(), d, 1.0);
        let p = route(&r, &x, &ids);
        prop_assert_eq!(p.n_slots(), ids.len() * k);
        for (t, choices) in p.per_token().iter().enumerate() {
            let mut experts: Vec<usize> = choices.iter().map(|c| c.0).collect();
            let first = experts[0];
            // Rank j holds (h + j) mod E.
            for (j, &ex) in experts.iter().enumerate() {
                prop_assert_eq!(ex, (first + j) % e, "token {}", t);
            }
            experts.sort_unstable();
            experts.dedup();
            prop_assert_eq!(experts.len(), k);
            let sum: f32 = choices.iter().map(|c| c.1).sum();
            prop_assert!((sum - 1.0).abs() < 1e-5, "token {} weights sum {}", t, sum);
        }
    }

    #[test]
    fn balanced_load_bound(
        e in 1usize..20,
        counts in proptest::collection::vec(0u64..1000, 1..300),
    ) {
        // Greedy assignment to the least-loaded expert: every expert's load is at most mean + largest count.
        let r = HashRouter::balanced(&counts, e, 1).expect("balanced");
        let table = r.table().expect("table");
        let mut load = vec![0u64; e];
        for (v, &ex) in table.iter().enumerate() {
            load[ex as usize] += counts[v];
        }
        let total: u64 = counts.iter().sum();
        let max_count = counts.iter().copied().max().unwrap_or(0);
        let bound = total as f64 / e as f64 + max_count as f64;
        prop_assert!(load.iter().all(|&l| l as f64 <= bound + 1e-9), "loads {:?} bound {}", load, bound);
    }
}
