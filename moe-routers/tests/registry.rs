//! The registry and the routers agree: causality over every combination of each router's enum and boolean options
//! (`moe list` prints the registry's answer, `moe compare` the router's), the conformance suite on each of those
//! routers, option docs generated from the configs, and parameter views that are live.

use moe_core::testing::check_registered;
use moe_core::{Causality, Mode, RouterArgs, RouterInput};

/// `d = 12`, `E = 16` (a square, for PEER), layer `k = 2`.
fn args() -> RouterArgs {
    RouterArgs::new(12, 16, 2, 0)
}

#[test]
fn registry_and_routers_agree_on_causality_for_every_option_combination() {
    let reg = moe_routers::builtin();
    // Options some combinations need: switch's `fixed` rounding needs `expert_capacity`; hash's `balanced` table
    // needs `counts` (64 ids: the suite routes ids 0..64).
    let counts: Vec<u64> = (0..64u64).map(|i| i % 7 + 1).collect();
    let extra = [
        (
            "switch-top1",
            args()
                .with_option("capacity", "fixed")
                .with_option("expert_capacity", 3),
        ),
        (
            "hash",
            args()
                .with_option("table", "balanced")
                .with_option("counts", serde_json::json!(counts)),
        ),
    ];
    for name in reg.names() {
        let c = check_registered(&reg, &name, &args()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{name}: {c:?}");
        assert!(c.built > 0);
    }
    for (name, a) in extra {
        let c = check_registered(&reg, name, &a).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "{name} with {:?}: {c:?}",
            a.options.keys().collect::<Vec<_>>()
        );
        assert!(c.built > 0);
    }
    // switch-top1: (4 roundings + unset) · (per_sequence 2 + unset) · (4 drop policies + unset) = 75. Without
    // expert_capacity the `fixed` rounding is refused (1 · 3 · 5 = 15), so 60 build; they are causal exactly with
    // drop unset or `position`: 4 · 3 · 2 = 24.
    let s = check_registered(&reg, "switch-top1", &args()).expect("switch");
    assert_eq!((s.combinations, s.built, s.causal), (75, 60, 24));
}

#[test]
fn list_reports_causality_from_the_options() {
    let reg = moe_routers::builtin();
    let causality = |name: &str| {
        reg.get(name)
            .map(|e| e.causality().expect("enumerable"))
            .expect("registered")
    };
    assert_eq!(causality("softmax-topk"), Causality::Causal);
    assert_eq!(causality("noisy-topk"), Causality::Causal);
    assert_eq!(causality("switch-top1"), Causality::DependsOn(vec!["drop"]));
    assert_eq!(causality("hash"), Causality::Causal);
    assert_eq!(causality("expert-choice"), Causality::NotCausal);
    // PEER's query BatchNorm normalises with the batch statistics in training: not causal then.
    assert_eq!(
        causality("peer"),
        Causality::DependsOn(vec!["query_batchnorm"])
    );
    // The registry's answer for one set of options, and the router's, for the case `moe list` got wrong before.
    let entry = reg.get("switch-top1").expect("registered");
    for (drop, causal) in [
        ("position", true),
        ("probability", false),
        ("random", false),
        ("batch_prioritized", false),
    ] {
        let a = args().with_option("drop", drop);
        assert_eq!(entry.is_causal(&a), Ok(causal), "{drop}");
        let r = reg.create("switch-top1", &a).expect("create");
        assert_eq!(r.is_causal(), causal, "{drop}");
    }
}

#[test]
fn option_docs_come_from_the_configs() {
    let reg = moe_routers::builtin();
    for e in reg.describe() {
        assert!(!e.options.is_empty(), "{}", e.name);
        for o in &e.options {
            assert!(
                !o.doc.is_empty() && !o.default.is_empty(),
                "{}.{}",
                e.name,
                o.name
            );
        }
    }
    let switch = &reg.get("switch-top1").expect("registered").options;
    let find = |n: &str| switch.iter().find(|o| o.name == n).expect("option");
    assert_eq!(find("capacity").default, "megatron");
    assert_eq!(
        find("capacity").values,
        ["megatron", "deepspeed", "fairseq", "fixed"]
    );
    assert_eq!(find("capacity_factor").default, "1.25");
    assert_eq!(find("drop").default, "position");
    assert_eq!(find("jitter").default, "0.01");
    assert_eq!(find("expert_capacity").default, "none");
    let ec = &reg.get("expert-choice").expect("registered").options;
    assert_eq!(
        (ec[0].name, ec[0].default.as_str()),
        ("capacity_factor", "2.0")
    );
    let peer = &reg.get("peer").expect("registered").options;
    assert!(
        peer.iter()
            .any(|o| o.name == "k" && o.default == "min(16, n)")
    );
}

#[test]
fn with_option_text_matches_the_cli() {
    // The README's library form: text values are read as the CLI reads `key=value`.
    let reg = moe_routers::builtin();
    let typed = args()
        .with_option("capacity", "fixed")
        .with_option("expert_capacity", 3);
    let text = args()
        .with_option("capacity", "fixed")
        .with_option("expert_capacity", "3");
    let mut cli = args();
    cli.set_option_str("capacity", "fixed");
    cli.set_option_str("expert_capacity", "3");
    assert_eq!(typed, text);
    assert_eq!(text, cli);
    let r = reg
        .create("switch-top1", &text)
        .expect("text options build");
    assert_eq!(r.spec().map(|_| ()), None, "jitter > 0 has no spec");
}

/// Expected `(name, shape, trainable)` of each router's parameter views, built by the registry from [`args`].
#[test]
fn parameter_views_have_documented_names_and_shapes() {
    let reg = moe_routers::builtin();
    let views = |name: &str, a: RouterArgs| {
        let r = reg.create(name, &a).expect("create");
        r.params()
            .iter()
            .map(|p| (p.name.clone(), p.shape().to_vec(), p.trainable))
            .collect::<Vec<_>>()
    };
    let v = |n: &str, s: &[usize], t: bool| (n.to_string(), s.to_vec(), t);
    assert_eq!(
        views("softmax-topk", args()),
        vec![v("gate", &[16, 12], true)]
    );
    assert_eq!(
        views("softmax-topk", args().with_option("preset", "deepseek_v3")),
        vec![
            v("gate", &[16, 12], true),
            v("correction_bias", &[16], false)
        ]
    );
    assert_eq!(
        views("noisy-topk", args()),
        vec![v("gate", &[16, 12], true), v("noise", &[16, 12], true)]
    );
    assert_eq!(
        views("switch-top1", args()),
        vec![v("gate", &[16, 12], true)]
    );
    assert_eq!(views("hash", args()), vec![]);
    assert_eq!(
        views("hash", args().with_option("weights", "gate")),
        vec![v("gate", &[16, 12], true)]
    );
    assert_eq!(
        views("expert-choice", args()),
        vec![v("gate", &[16, 12], true)]
    );
    // PEER, E = 16 = 4²: n = 4, h = 8 (default), d_key = min(128, 12) = 12.
    assert_eq!(
        views("peer", args()),
        vec![
            v("query", &[8, 24, 12], true),
            v("keys_1", &[8, 4, 12], true),
            v("keys_2", &[8, 4, 12], true)
        ]
    );
    // Biases set by a loader are listed too.
    let gate = moe_core::kit::init_gate(12, 16, 0, moe_core::kit::GATE_STREAM).expect("gate");
    let topk = moe_routers::TopKPreset::DeepseekV3
        .config()
        .build(gate.clone(), 2)
        .and_then(|r| r.with_gate_bias(ndarray::Array1::zeros(16)))
        .expect("router");
    let names: Vec<(String, bool)> = moe_core::Router::params(&topk)
        .into_iter()
        .map(|p| (p.name, p.trainable))
        .collect();
    assert_eq!(
        names,
        [
            ("gate".to_string(), true),
            ("gate_bias".to_string(), true),
            ("correction_bias".to_string(), false)
        ]
    );
    let switch = moe_routers::SwitchTop1Config::default()
        .build(gate)
        .and_then(|r| r.with_gate_bias(ndarray::Array1::zeros(16)))
        .expect("router");
    let shapes: Vec<Vec<usize>> = moe_core::Router::params(&switch)
        .iter()
        .map(|p| p.shape().to_vec())
        .collect();
    assert_eq!(shapes, [vec![16, 12], vec![16]]);
}

#[test]
fn writing_through_params_mut_changes_routing() {
    let reg = moe_routers::builtin();
    let x = moe_core::rng::SeqRng::new(1, 0).normal_matrix(40, 12, 1.0);
    let ids: Vec<u32> = (0..40).collect();
    let input = RouterInput::new(x.view())
        .with_token_ids(&ids)
        .with_mode(Mode::Train { seed: 1 });
    let cases = [
        ("softmax-topk", args().with_option("preset", "deepseek_v3")),
        ("noisy-topk", args()),
        ("switch-top1", args()),
        // k = 2: with one expert per token the gate's softmax weight is always 1.
        (
            "hash",
            args().with_option("weights", "gate").with_option("k", 2),
        ),
        ("expert-choice", args()),
        ("peer", args()),
    ];
    for (name, a) in cases {
        let router = reg.create(name, &a).expect("create");
        let before = router.route(&input).expect("route");
        let n_params = router.params().len();
        assert!(n_params > 0, "{name}");
        for i in 0..n_params {
            let mut r = router.clone();
            let mut rng = moe_core::rng::SeqRng::new(9, i as u64);
            let written: Vec<f32> = {
                let mut views = r.params_mut();
                let p = &mut views[i];
                for v in p.value.iter_mut() {
                    *v = rng.normal() as f32 * 3.0;
                }
                p.value.iter().copied().collect()
            };
            let pname = r.params()[i].name.clone();
            let read: Vec<f32> = r.params()[i].value.iter().copied().collect();
            assert_eq!(read, written, "{name}.{pname}: params() sees the write");
            let after = r.route(&input).expect("route");
            assert_ne!(before, after, "{name}.{pname}: writing it changed nothing");
        }
    }
}
