//! `softmax-topk`'s backward against finite differences ([`moe_core::testing::check_router_grad`]) over random
//! shapes and options: every score function, both orders, renormalisation, scaling, groups, a gate bias (GPT-OSS),
//! a correction bias (selection only, frozen), every load-balancing normalisation and padding; plus the
//! correction-bias step through `Router::update_state`.

use moe_core::testing::check_router_grad;
use moe_core::{LbNorm, Router, RouterInput, ScoreFn, TopKOrder, rng::SeqRng};
use moe_routers::{SoftmaxTopKConfig, TopKPreset};
use ndarray::Array1;
use proptest::prelude::*;

const NORMS: [LbNorm; 4] = [
    LbNorm::HfTopK,
    LbNorm::HfSwitch,
    LbNorm::Megatron,
    LbNorm::DeepSpeed,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(15), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..16, d in 1usize..8, groups in 1usize..4, per_group in 1usize..5, kf in 0.0f64..1.0,
        score in 0usize..3, order in 0usize..2, renorm in any::<bool>(), scaling in 0.5f32..3.0,
        use_groups in any::<bool>(), correction in any::<bool>(), gate_bias in any::<bool>(),
        norm in 0usize..4, pad in any::<bool>(), seed in 0u64..1000,
    ) {
        let e = groups * per_group;
        let (score, order) = match (score, order) {
            (_, 1) => (ScoreFn::Softmax, TopKOrder::TopKThenSoftmax),
            (0, _) => (ScoreFn::Softmax, TopKOrder::ScoreThenTopK),
            (1, _) => (ScoreFn::Sigmoid, TopKOrder::ScoreThenTopK),
            _ => (ScoreFn::SqrtSoftplus, TopKOrder::ScoreThenTopK),
        };
        let topk_group = 1 + (groups - 1) / 2;
        let max_k = if use_groups { topk_group * per_group } else { e };
        let k = 1 + ((max_k - 1) as f64 * kf) as usize;
        let mut rng = SeqRng::new(seed, 15);
        let cfg = SoftmaxTopKConfig {
            k: Some(k),
            score: Some(score),
            order: Some(order),
            renormalize: (order == TopKOrder::ScoreThenTopK).then_some(renorm),
            scaling: Some(scaling),
            n_group: use_groups.then_some(groups),
            topk_group: use_groups.then_some(topk_group),
            lb_norm: Some(NORMS[norm]),
            aux_coefficient: Some(1.0),
            ..Default::default()
        };
        let mut router = cfg.build(rng.normal_matrix(e, d, 1.0), k).expect("valid config");
        if correction {
            let b = Array1::from_shape_fn(e, |_| rng.normal() as f32 * 0.3);
            router = router.with_correction_bias(b).expect("bias");
        }
        if gate_bias {
            let b = Array1::from_shape_fn(e, |_| rng.normal() as f32 * 0.5);
            router = router.with_gate_bias(b).expect("bias");
        }
        let x = rng.normal_matrix(t, d, 1.0);
        let padding: Vec<bool> = (0..t).map(|i| pad && i % 3 == 1).collect();
        let input = RouterInput::new(x.view()).with_padding(&padding);
        let report = check_router_grad(&router, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
        // The frozen correction bias is listed, frozen, and gets no gradient (the checker refuses one).
        prop_assert_eq!(
            router.params().iter().any(|p| p.name == "correction_bias" && !p.trainable),
            correction
        );
    }
}

#[test]
fn presets_pass_the_checker() {
    for preset in [
        TopKPreset::Mixtral,
        TopKPreset::Qwen2Moe,
        TopKPreset::Olmoe,
        TopKPreset::Granite,
        TopKPreset::DeepseekV3,
    ] {
        let mut rng = SeqRng::new(3, 1);
        let router = preset
            .config()
            .build(rng.normal_matrix(16, 8, 0.5), 4)
            .expect("router");
        let x = rng.normal_matrix(12, 8, 1.0);
        let input = RouterInput::new(x.view());
        let r = check_router_grad(&router, &input, 7).unwrap_or_else(|e| panic!("{preset:?}: {e}"));
        assert!(r.checked >= 12, "{preset:?}: {r:?}");
    }
}

#[test]
fn update_state_steps_the_correction_bias_only_when_there_is_one() {
    let mut rng = SeqRng::new(5, 2);
    let x = rng.normal_matrix(20, 4, 1.0);
    let input = RouterInput::new(x.view());
    let mut with = SoftmaxTopKConfig {
        correction_bias: Some(true),
        ..Default::default()
    }
    .build(rng.normal_matrix(4, 4, 1.0), 2)
    .expect("router");
    let mut reference = with.clone();
    let plan = with.route(&input).expect("route");
    assert!(with.update_state(&input, &plan, 1e-3).expect("update"));
    reference.update_bias(&plan, 1e-3).expect("update");
    assert_eq!(with, reference);
    assert!(
        with.topk_spec()
            .correction_bias
            .iter()
            .flatten()
            .any(|&b| b != 0.0)
    );
    // No correction bias: nothing to update, and none is created.
    let mut without = SoftmaxTopKConfig::default()
        .build(rng.normal_matrix(4, 4, 1.0), 2)
        .expect("router");
    let plan = without.route(&input).expect("route");
    assert!(!without.update_state(&input, &plan, 1e-3).expect("update"));
    assert!(without.topk_spec().correction_bias.is_none());
    // A plan of another T is refused.
    let short = rng.normal_matrix(3, 4, 1.0);
    assert!(
        with.update_state(&RouterInput::new(short.view()), &plan, 1e-3)
            .is_err()
    );
}
