//! `switch-top1`'s backward against finite differences ([`moe_core::testing::check_router_grad`]) over random
//! shapes and options: every capacity rounding (small fixed capacities drop tokens), per-sequence or batch groups,
//! every drop policy, jitter in train mode (the seeded multipliers reach `dL/dx`), a gate bias, padding, and both
//! losses (HF-Switch load balancing per sequence, z-loss).

use moe_core::testing::check_router_grad;
use moe_core::{
    AuxLossKind, DropPolicy, Grad, LbNorm, Mode, Router, RouterBackward, RouterInput, rng::SeqRng,
};
use moe_routers::switch::{CapacityRounding, SwitchTop1, SwitchTop1Config};
use ndarray::{Array1, Array2};
use proptest::prelude::*;

const DROPS: [DropPolicy; 4] = [
    DropPolicy::Position,
    DropPolicy::Probability,
    DropPolicy::Random,
    DropPolicy::BatchPrioritized,
];

fn config(
    rounding: usize,
    cap: usize,
    per_sequence: bool,
    drop: usize,
    jitter: f32,
) -> SwitchTop1Config {
    let base = SwitchTop1Config {
        per_sequence: Some(per_sequence),
        drop: Some(DROPS[drop]),
        jitter: Some(jitter),
        aux_coefficient: Some(1.0),
        z_coefficient: Some(1.0),
        ..Default::default()
    };
    match rounding {
        0 => SwitchTop1Config {
            capacity: Some(CapacityRounding::Fixed),
            expert_capacity: Some(cap),
            ..base
        },
        1 => SwitchTop1Config {
            capacity: Some(CapacityRounding::Megatron),
            capacity_factor: Some(0.5 + cap as f64 * 0.25),
            ..base
        },
        2 => SwitchTop1Config {
            capacity: Some(CapacityRounding::DeepSpeed),
            capacity_factor: Some(1.0),
            min_capacity: Some(cap),
            ..base
        },
        _ => SwitchTop1Config {
            capacity: Some(CapacityRounding::Fairseq),
            capacity_factor: Some(cap as f64 * 0.5),
            ..base
        },
    }
}

/// `N(0, 1)` hidden states `[t, d]` whose routing logits have every token's best two at least 0.1 apart (redrawn up
/// to 50 times): the checker's steps move a logit by about `1e-2 · |x|`, and a token nearer a tie switches expert
/// under most of them, which the checker rightly refuses as proving nothing.
fn separated_input(
    router: &SwitchTop1,
    t: usize,
    d: usize,
    mode: Mode,
    rng: &mut SeqRng,
) -> Array2<f32> {
    let mut x = rng.normal_matrix(t, d, 1.0);
    for _ in 0..50 {
        let plan = router
            .route(&RouterInput::new(x.view()).with_mode(mode))
            .expect("route");
        let separated = plan.logits().is_some_and(|l| {
            l.outer_iter().all(|row| {
                let mut v = row.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                v.len() < 2 || v[0] - v[1] >= 0.1
            })
        });
        if separated {
            break;
        }
        x = rng.normal_matrix(t, d, 1.0);
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(15), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_finite_differences(
        t in 1usize..20, d in 1usize..8, e in 2usize..8, rounding in 0usize..4, cap in 1usize..5,
        per_sequence in any::<bool>(), drop in 0usize..4, jitter in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        train in any::<bool>(), gate_bias in any::<bool>(), pad in any::<bool>(), n_seq in 1usize..4,
        seed in 0u64..1000,
    ) {
        let mut rng = SeqRng::new(seed, 16);
        let mut router = config(rounding, cap, per_sequence, drop, jitter)
            .build(rng.normal_matrix(e, d, 1.0))
            .expect("valid config");
        if gate_bias {
            let b = Array1::from_shape_fn(e, |_| rng.normal() as f32 * 0.5);
            router = router.with_gate_bias(b).expect("bias");
        }
        let mode = if train { Mode::Train { seed: seed ^ 0x55 } } else { Mode::Eval };
        let x = separated_input(&router, t, d, mode, &mut rng);
        let padding: Vec<bool> = (0..t).map(|i| pad && i % 4 == 2).collect();
        // n_seq consecutive sequences (the last takes the rest), each at least one token.
        let n_seq = n_seq.min(t);
        let mut lens = vec![t / n_seq; n_seq];
        lens[n_seq - 1] += t % n_seq;
        let input = RouterInput::new(x.view())
            .with_padding(&padding)
            .with_seq_lens(&lens)
            .with_mode(mode);
        let report = check_router_grad(&router, &input, seed).map_err(TestCaseError::fail)?;
        prop_assert!(report.checked > 0);
    }
}

/// The backward of each loss alone, by name, against its finite differences on a batch where capacity drops
/// tokens; and jitter: the same step seed gives the same gradient, another seed another one.
#[test]
fn each_loss_alone_and_the_jitter_factor() {
    let mut rng = SeqRng::new(9, 3);
    let router = config(0, 2, true, 0, 0.3)
        .build(rng.normal_matrix(4, 6, 1.0))
        .expect("router");
    let x = rng.normal_matrix(12, 6, 1.0);
    let lens = [6usize, 6];
    let input = RouterInput::new(x.view())
        .with_seq_lens(&lens)
        .with_mode(Mode::Train { seed: 4 });
    let plan = router.route(&input).expect("route");
    assert!(
        !plan.dropped().is_empty(),
        "capacity 2 of 6 tokens over 4 experts drops some"
    );
    let kinds: Vec<AuxLossKind> = plan.aux_losses().iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        vec![
            AuxLossKind::LoadBalance(LbNorm::HfSwitch),
            AuxLossKind::RouterZ
        ]
    );
    let zero = vec![0.0f32; plan.n_slots()];
    let grads = |input: &RouterInput<'_>, d_aux: &[f32]| {
        let plan = router.route(input).expect("route");
        router
            .backward(&RouterBackward {
                input,
                routing: &plan,
                d_weights: &zero,
                d_aux,
            })
            .expect("backward")
    };
    for (i, d_aux) in [[1.0f32, 0.0], [0.0, 1.0]].iter().enumerate() {
        let g = grads(&input, d_aux);
        // d(loss)/d gate[0, 0] by central differences.
        let h = 1e-3f32;
        let loss_at = |v: f32| {
            let mut r = router.clone();
            if let Some(mut p) = r.params_mut().into_iter().next() {
                p.value[[0, 0]] = v;
            }
            r.route(&input).expect("route").aux_losses()[i].value as f64
        };
        let g00 = router.gate()[[0, 0]];
        let fd = (loss_at(g00 + h) - loss_at(g00 - h)) / (2.0 * h as f64);
        let an = dense(&g.params[0])[0] as f64;
        assert!(
            (an - fd).abs() < 2e-3 * an.abs().max(1e-2) + 1e-4,
            "loss {i}: {an} vs {fd}"
        );
    }
    let a = grads(&input, &[1.0, 1.0]);
    let b = grads(&input, &[1.0, 1.0]);
    assert_eq!(a, b);
    let other = RouterInput::new(x.view())
        .with_seq_lens(&lens)
        .with_mode(Mode::Train { seed: 5 });
    assert_ne!(a.d_hidden, grads(&other, &[1.0, 1.0]).d_hidden);
}

fn dense(g: &Grad) -> Vec<f32> {
    g.to_dense().expect("dense").iter().copied().collect()
}
