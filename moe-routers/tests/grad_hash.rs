//! `hash`'s backward against finite differences ([`moe_core::testing::check_router_grad`]) over random tables,
//! `k`, widths and padding: with `weights = gate` the gradient flows through the softmax over the chosen experts'
//! gate logits to the hidden states and the gate; with uniform weights `dL/dx = 0` and there is no parameter.

use moe_core::testing::check_router_grad;
use moe_core::{Router, RouterBackward, RouterInput, rng::SeqRng};
use moe_routers::hash::{HashRouter, HashRouterConfig, HashTable, HashWeights};
use proptest::prelude::*;

const VOCAB: usize = 50;

fn router(table: usize, weights: bool, d: usize, e: usize, k: usize, seed: u64) -> HashRouter {
    let cfg = HashRouterConfig {
        table: Some([HashTable::Random, HashTable::Modulo][table]),
        vocab: (table == 0).then_some(VOCAB),
        k: Some(k),
        weights: Some(if weights {
            HashWeights::Gate
        } else {
            HashWeights::Uniform
        }),
        ..Default::default()
    };
    cfg.build(d, e, seed).expect("valid config")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(15), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..24, d in 1usize..8, e in 1usize..8, kf in 0.0f64..1.0, table in 0usize..2,
        gate in any::<bool>(), pad in any::<bool>(), seed in 0u64..1000,
    ) {
        let k = 1 + ((e - 1) as f64 * kf) as usize;
        let r = router(table, gate, d, e, k, seed);
        let mut rng = SeqRng::new(seed, 17);
        let x = rng.normal_matrix(t, d, 1.0);
        let ids: Vec<u32> = (0..t).map(|_| rng.below(VOCAB as u64) as u32).collect();
        let padding: Vec<bool> = (0..t).map(|i| pad && i % 3 == 0).collect();
        let input = RouterInput::new(x.view()).with_token_ids(&ids).with_padding(&padding);
        let report = check_router_grad(&r, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
        prop_assert_eq!(r.params().len(), usize::from(gate));
    }
}

#[test]
fn constant_weights_give_zero_gradients() {
    let mut rng = SeqRng::new(1, 1);
    let x = rng.normal_matrix(10, 6, 1.0);
    let ids: Vec<u32> = (0..10).collect();
    let input = RouterInput::new(x.view()).with_token_ids(&ids);
    // Uniform weights: no parameter, d_hidden = 0; gate weights with k = 1: the weight is the constant 1.
    for (r, n_params) in [
        (router(1, false, 6, 4, 2, 3), 0),
        (router(1, true, 6, 4, 1, 3), 1),
    ] {
        let plan = r.route(&input).expect("route");
        let dw: Vec<f32> = (0..plan.n_slots()).map(|i| i as f32 - 3.0).collect();
        let g = r
            .backward(&RouterBackward {
                input: &input,
                routing: &plan,
                d_weights: &dw,
                d_aux: &[],
            })
            .expect("backward");
        assert_eq!(g.d_hidden.dim(), (10, 6));
        assert!(g.d_hidden.iter().all(|&v| v == 0.0));
        assert_eq!(g.params.len(), n_params);
        assert!(g.params.iter().all(|p| p.max_abs() == 0.0));
    }
}
