//! Behaviour of `expert-choice`: exact capacity, optimal picks and weights under proptest, and the same routing on
//! any thread count.

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::SeqRng;
use moe_core::{Router, RouterInput};
use moe_routers::expert_choice::ExpertChoice;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const D: usize = 4;

#[test]
fn same_routing_on_one_and_four_threads() {
    let (t, e) = (500usize, 32usize);
    let gate = kit::init_gate(16, e, 2, GATE_STREAM).expect("gate");
    let r = ExpertChoice::new(gate, 1.25).expect("router");
    let x = SeqRng::new(3, 0).normal_matrix(t, 16, 1.0);
    let pad: Vec<bool> = (0..t).map(|i| i % 13 == 0).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            r.route(&RouterInput::new(x.view()).with_padding(&pad))
                .expect("route")
        })
    };
    assert_eq!(run(1), run(4));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: RngSeed::Fixed(0xEC),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// With `c = q / 4` (exact in binary, so `T_real · c / E` rounds to an integer exactly when it is one), every
    /// expert gets exactly `C = min(T_real, ceil(T_real · q / 4E))` distinct real tokens; each weight is the token's
    /// softmax score for that expert, in [0, 1]; no unpicked real token beats a picked one (ties: lower index
    /// picked); each token's ranks are 0.. in descending weight.
    #[test]
    fn every_expert_takes_exactly_c_best_tokens(
        t in 0usize..40,
        e in 1usize..8,
        q_frac in 0.0f64..1.0,
        data_seed in any::<u64>(),
        gate_seed in any::<u64>(),
        pad_bits in any::<u64>(),
    ) {
        // q in 1..=8E: c up to 2E, so the cap at T_real is exercised too.
        let q = 1 + (q_frac * (8 * e) as f64) as usize;
        let gate = kit::init_gate(D, e, gate_seed, GATE_STREAM).expect("gate");
        let r = ExpertChoice::new(gate, q as f64 / 4.0).expect("router");
        let x = SeqRng::new(data_seed, 0).normal_matrix(t, D, 2.0);
        let pad: Vec<bool> = (0..t).map(|i| pad_bits >> i & 1 == 1).collect();
        let plan = r.route(&RouterInput::new(x.view()).with_padding(&pad)).expect("route");
        let t_real = pad.iter().filter(|&&p| !p).count();
        let cap = (t_real * q).div_ceil(4 * e).min(t_real);
        prop_assert_eq!(plan.expert_counts(), vec![cap; e]);
        prop_assert_eq!(plan.n_real_tokens(), t_real);
        // Reference scores: the softmax of the logits the plan carries.
        let logits = plan.logits().expect("logits kept");
        let scores: Vec<Vec<f32>> = logits
            .outer_iter()
            .map(|row| {
                let mut s = row.to_vec();
                kit::softmax_in_place(&mut s);
                s
            })
            .collect();
        for g in plan.groups() {
            prop_assert!(g.tokens.windows(2).all(|w| w[0] < w[1]), "distinct, ascending");
            for (&tok, &w) in g.tokens.iter().zip(g.weights) {
                prop_assert!(!pad[tok as usize]);
                prop_assert!((0.0..=1.0).contains(&w));
                prop_assert_eq!(w, scores[tok as usize][g.expert]);
            }
            for u in (0..t).filter(|&u| !pad[u] && !g.tokens.contains(&(u as u32))) {
                for &p in g.tokens {
                    let (sp, su) = (scores[p as usize][g.expert], scores[u][g.expert]);
                    prop_assert!(sp > su || (sp == su && (p as usize) < u), "token {} beats {}", u, p);
                }
            }
        }
        for choices in plan.per_token() {
            let ranks: Vec<u16> = choices.iter().map(|c| c.2).collect();
            prop_assert_eq!(ranks, (0..choices.len() as u16).collect::<Vec<_>>());
            prop_assert!(choices.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
}
