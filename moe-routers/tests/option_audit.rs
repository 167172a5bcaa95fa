//! The option audit ("no silently ignored option", issue 17): for every built-in router, every option and every
//! combination of its enum and boolean options (plus a value per numeric option), either changing the option
//! changes what the router does on some input, or the combination is refused with a typed error.
//! Case `fidelity/topk-then-softmax-renormalize`: `order=top_k_then_softmax,renormalize=false` and
//! `preset=granite,renormalize=false` were accepted and ignored; they are now refused.

use moe_core::testing::{check_options_take_effect, routing_fingerprint};
use moe_core::{Mode, MoeError, Router, RouterArgs, RouterInput, rng::SeqRng};
use serde_json::{Value, json};

/// `d = 12`, `E = 16` (a square, for PEER), layer `k = 2`.
fn args() -> RouterArgs {
    RouterArgs::new(12, 16, 2, 0)
}

/// What a router does: its plans on an eval and a train input (two sequences, token ids, logits of a few units so
/// that softmax, sigmoid and their saturations all show), and its parameter names and shapes.
fn observe(r: &dyn Router) -> Result<String, MoeError> {
    let d = 12;
    let mut out = String::new();
    // 24 tokens in sequences of 10 and 14, then 96 in 40 and 56 (so that T-dependent capacities of every rounding
    // are >= 1 and drops happen), ids below 32, in eval and in training.
    for (t, lens) in [(24usize, [10usize, 14]), (96, [40, 56])] {
        let x = SeqRng::new(5, t as u64).normal_matrix(t, d, 3.0);
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7) % 32).collect();
        for mode in [Mode::Eval, Mode::Train { seed: 3 }] {
            let input = RouterInput::new(x.view())
                .with_token_ids(&ids)
                .with_seq_lens(&lens)
                .with_mode(mode);
            // A refused input is an observation too (hash's vocab refuses ids past it).
            match r.route(&input) {
                Ok(p) => out.push_str(&routing_fingerprint(&p)),
                Err(e) => out.push_str(&format!("refused: {e}")),
            }
            out.push('\n');
        }
    }
    // An id past a small vocabulary: routed, or refused (hash's vocab).
    let x = SeqRng::new(6, 1).normal_matrix(2, d, 1.0);
    let ids = [1u32, 100];
    match r.route(&RouterInput::new(x.view()).with_token_ids(&ids)) {
        Ok(p) => out.push_str(&routing_fingerprint(&p)),
        Err(e) => out.push_str(&format!("refused: {e}")),
    }
    let params: Vec<(String, Vec<usize>, bool)> = r
        .params()
        .iter()
        .map(|p| (p.name.to_string(), p.value.shape().to_vec(), p.trainable))
        .collect();
    out.push_str(&format!("{params:?}"));
    Ok(out)
}

fn audit(name: &str, args: &RouterArgs, numeric: &[(&'static str, Vec<Value>)], exempt: &[&str]) {
    let reg = moe_routers::builtin();
    let a = check_options_take_effect(&reg, name, args, numeric, exempt, &observe)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(a.built > 0 && a.compared > 0, "{name}: {a:?}");
    println!("{name}: {a:?}");
}

#[test]
fn softmax_topk_options_take_effect_or_are_refused() {
    // Selection and weights: every enum and bool option, the numeric scaling and groups.
    audit(
        "softmax-topk",
        &args(),
        &[
            ("scaling", vec![json!(2.0)]),
            ("n_group", vec![json!(4)]),
            ("topk_group", vec![json!(2)]),
        ],
        // preset: a bundle of defaults that explicit options override by design (its own test below).
        &["preset", "lb_norm", "aux_coefficient", "k"],
    );
    // The reported loss and the experts per token, with the selection options at their defaults.
    audit(
        "softmax-topk",
        &args(),
        &[
            ("aux_coefficient", vec![json!(0.5)]),
            ("k", vec![json!(1), json!(3)]),
        ],
        &["preset", "score", "order", "renormalize", "correction_bias"],
    );
}

#[test]
fn each_softmax_topk_preset_takes_effect() {
    // Alone, each preset is observed differently from every other. qwen2_moe and olmoe route alike (softmax,
    // top-k, no renormalisation: the same choices and weights) and differ only in the coefficient of their
    // load-balancing loss (transformers' defaults: 0.001 and 0.01); the other options, set explicitly, override a
    // preset.
    let reg = moe_routers::builtin();
    let presets = ["mixtral", "qwen2_moe", "olmoe", "granite", "deepseek_v3"];
    let seen: Vec<String> = presets
        .iter()
        .map(|p| {
            let a = RouterArgs::new(12, 16, 2, 0).with_option("preset", *p);
            observe(reg.create("softmax-topk", &a).expect("preset").as_ref()).expect("route")
        })
        .collect();
    for i in 0..presets.len() {
        for j in i + 1..presets.len() {
            assert_ne!(seen[i], seen[j], "{} vs {}", presets[i], presets[j]);
        }
    }
    let plan = |p: &str| {
        let a = RouterArgs::new(12, 16, 2, 0).with_option("preset", p);
        let x = SeqRng::new(5, 1).normal_matrix(24, 12, 3.0);
        reg.create("softmax-topk", &a)
            .expect("preset")
            .route(&RouterInput::new(x.view()))
            .expect("route")
    };
    let (qwen, olmoe) = (plan("qwen2_moe"), plan("olmoe"));
    assert_eq!(qwen.per_token(), olmoe.per_token());
    let coefficients = |r: &moe_core::Routing| r.aux_coefficients();
    assert_eq!(
        (coefficients(&qwen), coefficients(&olmoe)),
        (vec![1e-3], vec![1e-2])
    );
}

#[test]
fn topk_then_softmax_renormalize_false_is_refused() {
    // Case fidelity/topk-then-softmax-renormalize: the softmax over the k already sums to 1, so renormalize=false
    // would be ignored; it is refused naming the option, whether order comes from the option or from a preset.
    let reg = moe_routers::builtin();
    for opts in [
        [("order", "top_k_then_softmax"), ("renormalize", "false")],
        [("preset", "granite"), ("renormalize", "false")],
    ] {
        let mut a = args();
        for (k, v) in opts {
            a.set_option_str(k, v);
        }
        match reg.create("softmax-topk", &a) {
            Err(e @ MoeError::InvalidConfig { .. }) => {
                assert!(e.to_string().contains("renormalize"), "{e}")
            }
            Err(e) => panic!("{opts:?}: unexpected error {e}"),
            Ok(_) => panic!("{opts:?} accepted"),
        }
    }
    // renormalize=true (or unset) with it stays accepted: it is what the order does.
    let a = args()
        .with_option("preset", "granite")
        .with_option("renormalize", true);
    assert!(reg.create("softmax-topk", &a).is_ok());
}

#[test]
fn switch_options_take_effect_or_are_refused() {
    audit(
        "switch-top1",
        &args(),
        &[
            ("capacity_factor", vec![json!(0.5)]),
            ("min_capacity", vec![json!(1)]),
            ("expert_capacity", vec![json!(1)]),
            ("jitter", vec![json!(0.5)]),
            ("aux_coefficient", vec![json!(0.5)]),
            ("z_coefficient", vec![json!(0.5)]),
        ],
        &[],
    );
}

#[test]
fn noisy_topk_options_take_effect_or_are_refused() {
    audit(
        "noisy-topk",
        &args(),
        &[
            ("k", vec![json!(1)]),
            ("noise_epsilon", vec![json!(5.0)]),
            ("w_importance", vec![json!(0.5)]),
            ("w_load", vec![json!(0.5)]),
        ],
        &[],
    );
}

#[test]
fn expert_choice_options_take_effect_or_are_refused() {
    audit(
        "expert-choice",
        &args(),
        &[("capacity_factor", vec![json!(0.5), json!(2.0)])],
        &[],
    );
}

#[test]
fn hash_options_take_effect_or_are_refused() {
    // vocab 32: refused with balanced (counts hold 64 ids) and modulo; with random it refuses the id 100 a
    // default vocabulary routes. (A vocab equal to the counts' length is accepted as a consistent restatement: it
    // is checked against them, not ignored.)
    let counts: Vec<u64> = (0..64u64).map(|i| i % 7 + 1).collect();
    audit(
        "hash",
        &args(),
        &[
            ("vocab", vec![json!(32)]),
            ("counts", vec![json!(counts)]),
            ("k", vec![json!(2)]),
        ],
        &[],
    );
}

#[test]
fn peer_options_take_effect_or_are_refused() {
    // Exempt, with the reason checked below: `activation` is not a routing option (the PeerBank built from the same
    // options reads it back), and `product_key_topk` is a speed knob (retrieval is exact for any p >= k).
    audit(
        "peer",
        &args(),
        &[
            ("heads", vec![json!(2)]),
            ("k", vec![json!(2)]),
            ("d_key", vec![json!(4)]),
        ],
        &["activation", "product_key_topk"],
    );
    // The exempt options: product_key_topk never changes the plan, activation is read back for the bank.
    let reg = moe_routers::builtin();
    let with = |k: &str, v: Value| {
        reg.create("peer", &args().with_option_value(k, v))
            .expect("peer")
    };
    let base = observe(with("product_key_topk", json!(4)).as_ref()).expect("route");
    assert_eq!(
        observe(with("product_key_topk", json!(4)).as_ref()).expect("route"),
        base
    );
    let p: moe_routers::PeerConfig = args()
        .with_option("activation", "relu")
        .parse("peer")
        .expect("options");
    assert_eq!(p.activation(), moe_core::Activation::Relu);
}
