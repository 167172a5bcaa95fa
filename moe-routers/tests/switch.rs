//! Behaviour tests of `switch-top1`: drop policies and capacity groups against hand-derived plans, the losses,
//! jitter, padding, thread-count invariance, conformance, and property tests against an independent reference.

use std::collections::{BTreeMap, BTreeSet};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::CounterRng;
use moe_core::{AuxLossKind, DropPolicy, LbNorm, Mode, Router, RouterInput, Routing};
use moe_routers::switch::{
    CapacityRounding, DROP_STREAM, EVAL_DROP_SEED, JITTER_STREAM, SwitchTop1, SwitchTop1Config,
};
use ndarray::{Array2, array};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};

/// A router with the identity gate `[E, E]`, so the logits are the inputs themselves.
fn eye_router(cfg: SwitchTop1Config, e: usize) -> SwitchTop1 {
    cfg.build(Array2::eye(e)).expect("valid config")
}

fn fixed(capacity: usize, per_sequence: bool, drop: DropPolicy) -> SwitchTop1Config {
    SwitchTop1Config {
        capacity: Some(CapacityRounding::Fixed),
        expert_capacity: Some(capacity),
        per_sequence: Some(per_sequence),
        drop: Some(drop),
        ..Default::default()
    }
}

/// Logits `[T, E]` where token `t` has logit `a_t` on expert `e_t` and 0 elsewhere, so it picks `e_t` with
/// `p_max = e^a / (e^a + E − 1)` (for `a > 0`).
fn prefs(choices: &[(usize, f32)], e: usize) -> Array2<f32> {
    let mut x = Array2::zeros((choices.len(), e));
    for (t, &(ex, a)) in choices.iter().enumerate() {
        x[[t, ex]] = a;
    }
    x
}

/// `(token, expert)` of the kept assignments, by token.
fn kept(plan: &Routing) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = plan
        .groups()
        .flat_map(|g| g.tokens.iter().map(move |&t| (t, g.expert as u32)))
        .collect();
    v.sort_unstable();
    v
}

fn dropped(plan: &Routing) -> Vec<u32> {
    plan.dropped().iter().map(|a| a.token).collect()
}

fn aux(plan: &Routing, kind: AuxLossKind) -> f32 {
    plan.aux_losses()
        .iter()
        .find(|a| a.kind == kind)
        .map(|a| a.value)
        .expect("loss present")
}

#[test]
fn position_drops_follow_the_hf_rule_per_sequence() {
    // E = 2, two sequences of 5, fixed capacity 2, a = 2 on the chosen expert.
    // HF walks each sequence in order and drops a token whose running count for its expert exceeds 2:
    //   seq 0 experts [0, 0, 1, 0, 0]: expert 0 counts 1, 2, -, 3, 4 -> tokens 3, 4 dropped;
    //   seq 1 experts [1, 1, 1, 0, 1]: expert 1 counts 1, 2, 3, -, 4 -> tokens 7, 9 dropped.
    let ex = [0, 0, 1, 0, 0, 1, 1, 1, 0, 1];
    let x = prefs(&ex.map(|e| (e, 2.0)), 2);
    let lens = [5, 5];
    let input = RouterInput::new(x.view()).with_seq_lens(&lens);
    let plan = eye_router(fixed(2, true, DropPolicy::Position), 2)
        .route(&input)
        .expect("route");
    assert_eq!(dropped(&plan), vec![3, 4, 7, 9]);
    assert_eq!(
        kept(&plan),
        vec![(0, 0), (1, 0), (2, 1), (5, 1), (6, 1), (8, 0)]
    );
    // Weight = p_max = e² / (e² + 1) = 0.880797, not renormalised.
    let w = 2f32.exp() / (2f32.exp() + 1.0);
    assert!(plan.slot_weights().iter().all(|&v| (v - w).abs() < 1e-6));
    assert!(
        plan.dropped()
            .iter()
            .all(|a| (a.weight - w).abs() < 1e-6 && a.rank == 0)
    );

    // Over the whole batch the counts do not restart at token 5:
    //   expert 0 tokens 0, 1, 3, 4, 8 -> keep 0, 1; expert 1 tokens 2, 5, 6, 7, 9 -> keep 2, 5.
    let plan = eye_router(fixed(2, false, DropPolicy::Position), 2)
        .route(&input)
        .expect("route");
    assert_eq!(dropped(&plan), vec![3, 4, 6, 7, 8, 9]);
    assert_eq!(plan.expert_counts(), vec![2, 2]);
}

#[test]
fn probability_drops_keep_the_most_confident() {
    // One expert wanted by all four tokens (logit a on expert 0): p = sigmoid(a) for a = [3, 1, 2, 2]
    // = [0.9526, 0.7311, 0.8808, 0.8808]. Capacity 2:
    //   probability keeps token 0 and, of the tied tokens 2 and 3, the earlier one (2); drops 1, 3;
    //   position keeps 0, 1; drops 2, 3.
    let x = prefs(&[(0, 3.0), (0, 1.0), (0, 2.0), (0, 2.0)], 2);
    let input = RouterInput::new(x.view());
    let plan = eye_router(fixed(2, false, DropPolicy::Probability), 2)
        .route(&input)
        .expect("route");
    assert_eq!(kept(&plan), vec![(0, 0), (2, 0)]);
    assert_eq!(dropped(&plan), vec![1, 3]);
    let plan = eye_router(fixed(2, false, DropPolicy::Position), 2)
        .route(&input)
        .expect("route");
    assert_eq!(dropped(&plan), vec![2, 3]);
}

#[test]
fn batch_prioritized_order() {
    // Tokens (expert, logit): t0 (0, 0.5) p 0.6225; t1 (1, 3) p 0.9526; t2 (0, 3) p 0.9526; t3 (1, 0.5) p 0.6225;
    // t4 (0, 2) p 0.8808. Sorted by max prob desc, then position: t1, t2, t4, t0, t3. Capacity 1 walk:
    // t1 takes expert 1, t2 takes expert 0, t4, t0, t3 find their experts full -> dropped {0, 3, 4}.
    // Position order instead keeps t0 and t1 and drops {2, 3, 4}.
    let x = prefs(&[(0, 0.5), (1, 3.0), (0, 3.0), (1, 0.5), (0, 2.0)], 2);
    let input = RouterInput::new(x.view());
    let bp = eye_router(fixed(1, false, DropPolicy::BatchPrioritized), 2)
        .route(&input)
        .expect("route");
    assert_eq!(kept(&bp), vec![(1, 1), (2, 0)]);
    assert_eq!(dropped(&bp), vec![0, 3, 4]);
    let pos = eye_router(fixed(1, false, DropPolicy::Position), 2)
        .route(&input)
        .expect("route");
    assert_eq!(kept(&pos), vec![(0, 0), (1, 1)]);
    // With one choice per token, batch-prioritised and probability visit tokens in the same order.
    let prob = eye_router(fixed(1, false, DropPolicy::Probability), 2)
        .route(&input)
        .expect("route");
    assert_eq!(bp, prob);
}

#[test]
fn random_drops_are_seeded_and_deterministic() {
    // 40 tokens all choosing expert 0, capacity 5: exactly 5 kept, chosen by the counter-based priorities.
    let t = 40usize;
    let x = prefs(&vec![(0, 1.0); t], 3);
    let cfg = SwitchTop1Config {
        jitter: Some(0.0),
        ..fixed(5, false, DropPolicy::Random)
    };
    let r = eye_router(cfg, 3);
    let route = |mode| {
        r.route(&RouterInput::new(x.view()).with_mode(mode))
            .expect("route")
    };
    let mut sets = BTreeSet::new();
    for seed in 1..=4u64 {
        let a = route(Mode::Train { seed });
        assert_eq!(a, route(Mode::Train { seed }), "same seed, same plan");
        assert_eq!(a.n_slots(), 5);
        assert_eq!(a.dropped().len(), t - 5);
        // The kept tokens are the 5 with the largest u64 priority of stream (seed, DROP_STREAM).
        let rng = CounterRng::new(seed, DROP_STREAM);
        let mut by_priority: Vec<u32> = (0..t as u32).collect();
        by_priority.sort_by_key(|&i| std::cmp::Reverse(rng.u64_at(i as u64)));
        let want: BTreeSet<u32> = by_priority[..5].iter().copied().collect();
        let got: BTreeSet<u32> = kept(&a).iter().map(|k| k.0).collect();
        assert_eq!(got, want);
        sets.insert(kept(&a));
    }
    assert!(
        sets.len() > 1,
        "different seeds should drop different tokens"
    );
    // Eval uses the documented fixed seed: repeatable, and equal to training with that seed when jitter is off.
    assert_eq!(route(Mode::Eval), route(Mode::Eval));
    assert_eq!(
        route(Mode::Eval),
        route(Mode::Train {
            seed: EVAL_DROP_SEED
        })
    );
}

#[test]
fn capacity_counts_real_tokens_and_padding_is_not_routed() {
    // Megatron, cf = 1, E = 2, T = 8 of which 4 are padding: C = ceil(4 / 2 · 1) = 2 (8 tokens would give 4).
    // All 8 tokens prefer expert 0; the real ones are 1, 3, 5, 7 -> keep 1, 3; drop 5, 7; padding nowhere.
    let x = prefs(&[(0, 1.0); 8], 2);
    let pad = [true, false, true, false, true, false, true, false];
    let cfg = SwitchTop1Config {
        capacity_factor: Some(1.0),
        ..Default::default()
    };
    let r = eye_router(cfg, 2);
    assert_eq!(r.capacity_for(4), 2);
    let plan = r
        .route(&RouterInput::new(x.view()).with_padding(&pad))
        .expect("route");
    assert_eq!(kept(&plan), vec![(1, 0), (3, 0)]);
    assert_eq!(dropped(&plan), vec![5, 7]);
    assert_eq!(plan.n_real_tokens(), 4);
    assert_eq!(plan.diagnostics().dropped_fraction, 0.5);

    // Fixed capacity 1, padding first: the padding token does not take expert 0's only slot.
    let x = prefs(&[(0, 5.0), (0, 1.0)], 2);
    let plan = eye_router(fixed(1, true, DropPolicy::Position), 2)
        .route(&RouterInput::new(x.view()).with_padding(&[true, false]))
        .expect("route");
    assert_eq!(kept(&plan), vec![(1, 0)]);
    assert!(plan.dropped().is_empty());
}

#[test]
fn load_balance_loss_hand_computed() {
    // E = 4, tokens are the cyclic shifts of logits [2, 1, 0, -1]: token i picks expert i, and every column holds
    // each probability once, so f_e = P_e = 1/4 and E² · mean_e(f_e P_e) = 16 · (1/16) = 1.
    let base = [2.0f32, 1.0, 0.0, -1.0];
    let x = Array2::from_shape_fn((4, 4), |(t, j)| base[(j + 4 - t) % 4]);
    let r = eye_router(SwitchTop1Config::default(), 4);
    let plan = r.route(&RouterInput::new(x.view())).expect("route");
    assert_eq!(kept(&plan), vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
    assert!((aux(&plan, AuxLossKind::LoadBalance(LbNorm::HfSwitch)) - 1.0).abs() < 1e-6);
    let lb = plan
        .aux_losses()
        .iter()
        .find(|a| a.kind == AuxLossKind::LoadBalance(LbNorm::HfSwitch));
    assert_eq!(lb.map(|a| a.coefficient), Some(1e-2));

    // Per sequence: seq A = [[2, 0], [0, 2]] is balanced -> 1. Seq B = two tokens [ln 3, 0]: p = [0.75, 0.25],
    // both pick expert 0 (pre-capacity), f = [1, 0], P = [0.75, 0.25] -> 4 · mean(0.75, 0) = 1.5.
    // Mean over the two sequences: 1.25. Capacity 1 per sequence drops token 3, but the loss counts choices
    // before capacity, so it stays 1.25. A whole-batch loss would instead be
    // 4 · mean_e(f_e P_e) with f = [3/4, 1/4], P = [(0.8808 + 0.1192 + 1.5) / 4, ...] = [0.625, 0.375] -> 1.125.
    let l3 = 3f32.ln();
    let x = array![[2.0f32, 0.0], [0.0, 2.0], [l3, 0.0], [l3, 0.0]];
    let lens = [2, 2];
    let plan = eye_router(SwitchTop1Config::hf_switch(1), 2)
        .route(&RouterInput::new(x.view()).with_seq_lens(&lens))
        .expect("route");
    assert_eq!(dropped(&plan), vec![3]);
    assert!((aux(&plan, AuxLossKind::LoadBalance(LbNorm::HfSwitch)) - 1.25).abs() < 1e-6);

    // A sequence made only of padding does not enter the mean: seq A alone gives 1 (not (1 + 0) / 2).
    let plan = eye_router(SwitchTop1Config::hf_switch(1), 2)
        .route(
            &RouterInput::new(x.view())
                .with_seq_lens(&lens)
                .with_padding(&[false, false, true, true]),
        )
        .expect("route");
    assert!((aux(&plan, AuxLossKind::LoadBalance(LbNorm::HfSwitch)) - 1.0).abs() < 1e-6);
}

#[test]
fn z_loss_of_zero_logits_is_ln_e_squared_and_ignores_padding() {
    // logsumexp of E = 4 zeros is ln 4; the padding token's logits [50, 0, 0, 0] are left out.
    let mut x = Array2::<f32>::zeros((5, 4));
    x[[4, 0]] = 50.0;
    let pad = [false, false, false, false, true];
    let plan = eye_router(SwitchTop1Config::default(), 4)
        .route(&RouterInput::new(x.view()).with_padding(&pad))
        .expect("route");
    let z = aux(&plan, AuxLossKind::RouterZ);
    assert!((z - 4f32.ln().powi(2)).abs() < 1e-6, "z = {z}");
    // Zero logits: every token ties and picks expert 0 (lower id), so f = [1, 0, 0, 0] and P = [1/4; 4]; the loss is
    // E² · mean_e(f_e P_e) = 16 · (1 · 1/4) / 4 = 1.
    assert!((aux(&plan, AuxLossKind::LoadBalance(LbNorm::HfSwitch)) - 1.0).abs() < 1e-6);
    // Megatron C = ceil(4 / 4 · 1.25) = 2: tokens 0, 1 kept and 2, 3 dropped, all on expert 0.
    assert_eq!(kept(&plan), vec![(0, 0), (1, 0)]);
    assert_eq!(dropped(&plan), vec![2, 3]);
    assert!(
        plan.dropped()
            .iter()
            .all(|a| a.expert == 0 && a.weight == 0.25)
    );
}

#[test]
fn jitter_only_in_training_and_counter_based() {
    let (t, d) = (6usize, 3usize);
    let x = Array2::from_shape_fn((t, d), |(i, j)| 1.0 + i as f32 * 0.25 - j as f32 * 0.7);
    let eps = 0.05f32;
    let r = eye_router(
        SwitchTop1Config {
            jitter: Some(eps),
            ..Default::default()
        },
        d,
    );
    let logits = |mode| {
        r.route(&RouterInput::new(x.view()).with_mode(mode))
            .expect("route")
            .logits()
            .expect("logits")
            .clone()
    };
    // Eval: no jitter, the logits are x itself.
    assert_eq!(logits(Mode::Eval), x);
    // Train: l[t, j] = x[t, j] · (1 − ε + 2ε · u), u = CounterRng(seed, JITTER_STREAM).uniform_at(t · d + j).
    let seed = 11u64;
    let got = logits(Mode::Train { seed });
    let rng = CounterRng::new(seed, JITTER_STREAM);
    for ((i, j), &v) in got.indexed_iter() {
        let m = (1.0 - f64::from(eps) + 2.0 * f64::from(eps) * rng.uniform_at((i * d + j) as u64))
            as f32;
        assert_eq!(v, x[[i, j]] * m, "token {i} column {j}");
        let ratio = v / x[[i, j]];
        assert!(ratio >= 1.0 - eps - 1e-6 && ratio <= 1.0 + eps + 1e-6);
    }
    assert_eq!(got, logits(Mode::Train { seed }));
    assert_ne!(got, logits(Mode::Train { seed: seed + 1 }));
    // jitter = 0 in training is eval.
    let r0 = eye_router(
        SwitchTop1Config {
            jitter: Some(0.0),
            ..Default::default()
        },
        d,
    );
    let a = r0
        .route(&RouterInput::new(x.view()).with_mode(Mode::Train { seed }))
        .expect("route");
    assert_eq!(a, r0.route(&RouterInput::new(x.view())).expect("route"));

    // A near tie (logits 1.0 vs 1.001) is decided by the jitter: over 32 seeds both experts win sometimes.
    let near = array![[1.0f32, 1.001]];
    let r = eye_router(
        SwitchTop1Config {
            jitter: Some(0.01),
            ..Default::default()
        },
        2,
    );
    let winners: BTreeSet<u32> = (0..32u64)
        .map(|seed| {
            let p = r
                .route(&RouterInput::new(near.view()).with_mode(Mode::Train { seed }))
                .expect("route");
            kept(&p)[0].1
        })
        .collect();
    assert_eq!(winners, BTreeSet::from([0, 1]));
}

/// A seeded workload: `[T, d]` normals, three sequences, every 7th token padding.
fn workload(t: usize, d: usize) -> (Array2<f32>, Vec<usize>, Vec<bool>) {
    let mut rng = moe_core::rng::SeqRng::new(42, 9);
    let x = rng.normal_matrix(t, d, 1.0);
    let a = t / 3;
    (
        x,
        vec![a, t - 2 * a, a],
        (0..t).map(|i| i % 7 == 3).collect(),
    )
}

#[test]
fn same_plan_on_one_and_four_threads() -> Result<(), Box<dyn std::error::Error>> {
    let (t, d, e) = (301usize, 16usize, 8usize);
    let (x, lens, pad) = workload(t, d);
    let gate = kit::init_gate(d, e, 5, GATE_STREAM)?;
    for drop in [
        DropPolicy::Position,
        DropPolicy::Probability,
        DropPolicy::Random,
        DropPolicy::BatchPrioritized,
    ] {
        let cfg = SwitchTop1Config {
            capacity_factor: Some(1.0),
            per_sequence: Some(true),
            drop: Some(drop),
            jitter: Some(0.05),
            ..Default::default()
        };
        let r = cfg.build(gate.clone())?;
        let input = RouterInput::new(x.view())
            .with_seq_lens(&lens)
            .with_padding(&pad)
            .with_mode(Mode::Train { seed: 77 });
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()?
            .install(|| r.route(&input))?;
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()?
            .install(|| r.route(&input))?;
        assert_eq!(one, four, "{drop:?}");
        assert!(
            !one.dropped().is_empty(),
            "capacity factor 1 should drop something ({drop:?})"
        );
    }
    Ok(())
}

#[test]
fn conformance() {
    let configs = [
        SwitchTop1Config::default(),
        SwitchTop1Config::hf_switch(2),
        SwitchTop1Config {
            drop: Some(DropPolicy::Random),
            ..Default::default()
        },
        SwitchTop1Config {
            drop: Some(DropPolicy::Probability),
            capacity_factor: Some(0.5),
            ..Default::default()
        },
        SwitchTop1Config {
            capacity: Some(CapacityRounding::DeepSpeed),
            per_sequence: Some(true),
            ..Default::default()
        },
        SwitchTop1Config {
            capacity: Some(CapacityRounding::Fairseq),
            drop: Some(DropPolicy::BatchPrioritized),
            ..Default::default()
        },
    ];
    for cfg in configs {
        let gate = kit::init_gate(12, 16, 1, GATE_STREAM).expect("gate");
        let r = cfg.build(gate).expect("build");
        moe_core::testing::check_router(&r, 12).unwrap_or_else(|e| panic!("{cfg:?}: {e}"));
    }
}

/// Assignments by token: `token -> (expert, weight)`.
type Plan = BTreeMap<usize, (usize, f32)>;

/// One random routing problem.
#[derive(Debug, Clone)]
struct Case {
    gate: Array2<f32>,
    x: Array2<f32>,
    lens: Vec<usize>,
    pad: Vec<bool>,
    cfg: SwitchTop1Config,
    mode: Mode,
}

/// Values that often tie exactly (small integers) or not at all.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![(-2i32..=2).prop_map(|v| v as f32), -2.0f32..2.0]
}

fn case() -> impl Strategy<Value = Case> {
    let shape = (
        1usize..=6,
        1usize..=5,
        prop::collection::vec(1usize..=12, 1..=4),
    );
    let opts = (
        0usize..4,
        0.25f64..3.0,
        1usize..=4,
        0usize..=4,
        any::<bool>(),
        0usize..4,
        prop::option::of(any::<u64>()),
        prop_oneof![Just(0.0f32), Just(0.01), Just(0.3)],
    );
    (shape, opts).prop_flat_map(
        |((e, d, lens), (round, cf, cap, min_cap, per_seq, drop, seed, jitter))| {
            let t: usize = lens.iter().sum();
            let rounding = [
                CapacityRounding::Megatron,
                CapacityRounding::DeepSpeed,
                CapacityRounding::Fairseq,
                CapacityRounding::Fixed,
            ][round];
            let cfg = SwitchTop1Config {
                capacity: Some(rounding),
                capacity_factor: (rounding != CapacityRounding::Fixed).then_some(cf),
                min_capacity: (rounding == CapacityRounding::DeepSpeed).then_some(min_cap),
                expert_capacity: (rounding == CapacityRounding::Fixed).then_some(cap),
                per_sequence: Some(per_seq),
                drop: Some(
                    [
                        DropPolicy::Position,
                        DropPolicy::Probability,
                        DropPolicy::Random,
                        DropPolicy::BatchPrioritized,
                    ][drop],
                ),
                jitter: Some(jitter),
                ..Default::default()
            };
            let mode = seed.map_or(Mode::Eval, |seed| Mode::Train { seed });
            (
                prop::collection::vec(value(), e * d),
                prop::collection::vec(value(), t * d),
                prop::collection::vec(prop::bool::weighted(0.2), t),
            )
                .prop_map(move |(g, xs, pad)| Case {
                    gate: Array2::from_shape_vec((e, d), g).expect("gate shape"),
                    x: Array2::from_shape_vec((t, d), xs).expect("x shape"),
                    lens: lens.clone(),
                    pad,
                    cfg: cfg.clone(),
                    mode,
                })
        },
    )
}

/// An independent reference: jitter, logits and softmax as documented, then for each capacity group and expert,
/// that expert's tokens ranked by the policy's key (position; probability then position; random priority then
/// position) with the first `C` kept: the per-expert formulation of HF (`cumsum <= C`), Megatron (`topk` of probs)
/// and DeepSpeed (`topk` of random scores). Batch-prioritised is the global sort-and-walk of the NLLB code.
/// Returns kept `token -> (expert, weight)` and dropped `token -> (expert, weight)`.
fn reference(r: &SwitchTop1, c: &Case) -> (Plan, Plan) {
    let (t, d) = c.x.dim();
    let e = c.gate.nrows();
    let mut x = c.x.clone();
    if let (Mode::Train { seed }, true) = (c.mode, r.jitter() > 0.0) {
        let rng = CounterRng::new(seed, JITTER_STREAM);
        let eps = f64::from(r.jitter());
        for ((i, j), v) in x.indexed_iter_mut() {
            *v *= (1.0 - eps + 2.0 * eps * rng.uniform_at((i * d + j) as u64)) as f32;
        }
    }
    let logits = x.dot(&c.gate.t());
    let mut choice = vec![None; t];
    for (i, row) in logits.outer_iter().enumerate() {
        if c.pad[i] {
            continue;
        }
        let mut p = row.to_vec();
        kit::softmax_in_place(&mut p);
        let mut best = 0;
        for j in 1..e {
            if p[j] > p[best] {
                best = j;
            }
        }
        choice[i] = Some((best, p[best]));
    }
    let mut groups = Vec::new();
    if r.per_sequence() {
        let mut s = 0;
        for &l in &c.lens {
            groups.push(s..s + l);
            s += l;
        }
    } else {
        groups.push(0..t);
    }
    let seed = match c.mode {
        Mode::Train { seed } => seed,
        Mode::Eval => EVAL_DROP_SEED,
    };
    let rng = CounterRng::new(seed, DROP_STREAM);
    let (mut kept, mut dropped) = (BTreeMap::new(), BTreeMap::new());
    for g in groups {
        let real: Vec<usize> = g.filter(|&i| choice[i].is_some()).collect();
        let cap = r.capacity_for(real.len());
        let w = |i: usize| choice[i].map_or(0.0, |c| c.1);
        let ex = |i: usize| choice[i].map_or(0, |c| c.0);
        if r.drop_policy() == DropPolicy::BatchPrioritized {
            let mut order = real.clone();
            order.sort_by(|&a, &b| w(b).total_cmp(&w(a)).then(a.cmp(&b)));
            let mut used = vec![0; e];
            for i in order {
                if used[ex(i)] < cap {
                    used[ex(i)] += 1;
                    kept.insert(i, (ex(i), w(i)));
                } else {
                    dropped.insert(i, (ex(i), w(i)));
                }
            }
            continue;
        }
        for expert in 0..e {
            let mut mine: Vec<usize> = real.iter().copied().filter(|&i| ex(i) == expert).collect();
            match r.drop_policy() {
                DropPolicy::Probability => {
                    mine.sort_by(|&a, &b| w(b).total_cmp(&w(a)).then(a.cmp(&b)))
                }
                DropPolicy::Random => {
                    mine.sort_by_key(|&i| (std::cmp::Reverse(rng.u64_at(i as u64)), i))
                }
                _ => {}
            }
            for (rank, &i) in mine.iter().enumerate() {
                let slot = if rank < cap { &mut kept } else { &mut dropped };
                slot.insert(i, (expert, w(i)));
            }
        }
    }
    (kept, dropped)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x0057_17C4),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_and_reference(c in case()) {
        let r = c.cfg.build(c.gate.clone()).expect("valid generated config");
        let input = RouterInput::new(c.x.view()).with_seq_lens(&c.lens).with_padding(&c.pad).with_mode(c.mode);
        let plan = r.route(&input).expect("route");
        let t = c.x.nrows();
        let n_real = c.pad.iter().filter(|&&p| !p).count();
        prop_assert_eq!(plan.n_real_tokens(), n_real);

        // Each token at most one kept expert; kept and dropped partition the real tokens; padding nowhere.
        let kept_plan: Plan = plan.groups()
            .flat_map(|g| g.tokens.iter().zip(g.weights).map(move |(&tk, &w)| (tk as usize, (g.expert, w))))
            .collect();
        prop_assert_eq!(kept_plan.len(), plan.n_slots(), "a token holds two slots");
        let dropped_plan: Plan =
            plan.dropped().iter().map(|a| (a.token as usize, (a.expert as usize, a.weight))).collect();
        prop_assert_eq!(dropped_plan.len(), plan.dropped().len());
        prop_assert_eq!(kept_plan.len() + dropped_plan.len(), n_real);
        for i in 0..t {
            let k = kept_plan.contains_key(&i);
            let d = dropped_plan.contains_key(&i);
            prop_assert!(if c.pad[i] { !k && !d } else { k != d }, "token {} kept {} dropped {}", i, k, d);
        }
        // Weights in (0, 1].
        for &(_, w) in kept_plan.values().chain(dropped_plan.values()) {
            prop_assert!(w > 0.0 && w <= 1.0, "weight {}", w);
        }
        // No expert over capacity in any group.
        let groups: Vec<(usize, usize)> = if r.per_sequence() {
            let mut s = 0;
            c.lens.iter().map(|&l| { s += l; (s - l, s) }).collect()
        } else {
            vec![(0, t)]
        };
        for (a, b) in groups {
            let real = (a..b).filter(|&i| !c.pad[i]).count();
            let cap = r.capacity_for(real);
            let mut used = vec![0usize; r.n_experts()];
            for (_, &(ex, _)) in kept_plan.range(a..b) {
                used[ex] += 1;
            }
            prop_assert!(used.iter().all(|&u| u <= cap), "group {}..{}: loads {:?} over C = {}", a, b, used, cap);
        }
        // Exactly the reference plan.
        let (kept_ref, dropped_ref) = reference(&r, &c);
        prop_assert_eq!(&kept_plan, &kept_ref);
        prop_assert_eq!(&dropped_plan, &dropped_ref);
        // Batch-prioritised and probability coincide for top-1.
        if matches!(r.drop_policy(), DropPolicy::Probability | DropPolicy::BatchPrioritized) {
            let other = if r.drop_policy() == DropPolicy::Probability { DropPolicy::BatchPrioritized } else { DropPolicy::Probability };
            let r2 = SwitchTop1Config { drop: Some(other), ..c.cfg.clone() }.build(c.gate.clone()).expect("build");
            prop_assert_eq!(r2.route(&input).expect("route"), plan);
        }
    }
}
