//! Every built-in router inside a whole layer on the CPU backend, checked end to end by
//! `moe_core::testing::check_layer_grad` (central finite differences of `Σ output ⊙ C + Σ a_i aux_i` with respect
//! to the input and every trainable parameter: router, experts, shared experts, output bias), in train and eval
//! mode, with padding, capacity drops and several option sets. The routers' own property tests check each backward
//! alone; this checks that the layer feeds them the right `d_weights` and `d_aux` and adds their `d_hidden`.

use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::rng::SeqRng;
use moe_core::testing::check_layer_grad;
use moe_core::workload::random_swiglu_bank;
use moe_core::{
    Activation, Backend, ExpertBank, Mode, MoeLayer, PeerBank, RouterArgs, RouterInput,
    SharedExperts,
};
use ndarray::{Array1, Array2};

const T: usize = 24;
const D: usize = 12;

/// Hidden states `[T, D]` from `N(0, 1)`, seeded.
fn hidden(seed: u64) -> Array2<f32> {
    SeqRng::new(seed, 9).normal_matrix(T, D, 1.0)
}

/// A SwiGLU layer of `e` experts around router `name` with `options`, with a gated shared expert, an output scale
/// and an output bias.
fn layer(name: &str, e: usize, k: usize, options: &[(&str, serde_json::Value)]) -> MoeLayer {
    let mut args = RouterArgs::new(D, e, k, 3);
    for (key, v) in options {
        args = args.with_option_value(key, v.clone());
    }
    let router = moe_routers::builtin()
        .create(name, &args)
        .unwrap_or_else(|err| panic!("{name} {options:?}: {err}"));
    let bank = random_swiglu_bank(e, D, 8, 5).expect("bank");
    let shared = SharedExperts::new(
        random_swiglu_bank(1, D, 6, 6).expect("shared"),
        Some(SeqRng::new(7, 1).normal_matrix(1, D, 0.3).row(0).to_owned()),
    )
    .expect("shared experts");
    MoeLayer::new(router, bank)
        .and_then(|l| l.with_shared(shared))
        .and_then(|l| l.with_output_scale(0.8))
        .and_then(|l| l.with_output_bias(Array1::linspace(-0.5, 0.5, D)))
        .expect("layer")
}

/// Runs the check on `l` in eval and train mode, with and without padding, over a few input seeds; at least one
/// seed per setting must give margins the checker can use (most do), and none may fail.
fn check(what: &str, l: &MoeLayer) {
    let ids: Vec<u32> = (0..T as u32).map(|i| (i * 7) % 50).collect();
    let padding: Vec<bool> = (0..T).map(|t| t % 5 == 3).collect();
    let seq = [T / 2, T / 2];
    for mode in [Mode::Eval, Mode::Train { seed: 11 }] {
        for pad in [false, true] {
            let mut checked = 0;
            let mut last = String::new();
            for seed in 0..4 {
                let x = hidden(seed);
                let mut input = RouterInput::new(x.view())
                    .with_token_ids(&ids)
                    .with_seq_lens(&seq)
                    .with_mode(mode);
                if pad {
                    input = input.with_padding(&padding);
                }
                match check_layer_grad(&CpuBackend::new(), l, &input, seed) {
                    Ok(r) => {
                        assert!(r.checked > 0, "{what}: nothing checked");
                        checked += 1;
                    }
                    // Plan switches within ± h on most coordinates of a tensor: this input proves nothing.
                    Err(e) if e.contains("changed the plan") => last = e,
                    Err(e) => panic!("{what} ({mode:?}, padding {pad}, seed {seed}): {e}"),
                }
            }
            assert!(
                checked > 0,
                "{what} ({mode:?}, padding {pad}): every input straddled a switch: {last}"
            );
        }
    }
}

#[test]
fn softmax_topk_in_a_layer() {
    use serde_json::json;
    for opts in [
        vec![],
        vec![
            ("score", json!("sigmoid")),
            ("renormalize", json!(true)),
            ("scaling", json!(2.5)),
        ],
        vec![("order", json!("top_k_then_softmax"))],
        vec![
            ("score", json!("sqrt_softplus")),
            ("renormalize", json!(false)),
        ],
        vec![
            ("n_group", json!(4)),
            ("topk_group", json!(2)),
            ("score", json!("sigmoid")),
            ("correction_bias", json!(true)),
        ],
        vec![("lb_norm", json!("megatron"))],
    ] {
        check(
            &format!("softmax-topk {opts:?}"),
            &layer("softmax-topk", 8, 2, &opts),
        );
    }
}

#[test]
fn noisy_topk_in_a_layer() {
    check("noisy-topk", &layer("noisy-topk", 6, 2, &[]));
}

#[test]
fn switch_top1_in_a_layer_with_drops() {
    use serde_json::json;
    for opts in [
        vec![("capacity_factor", json!(0.5))],
        vec![
            ("capacity_factor", json!(1.0)),
            ("per_sequence", json!(true)),
        ],
        vec![("jitter", json!(0.05)), ("capacity_factor", json!(2.0))],
    ] {
        check(
            &format!("switch-top1 {opts:?}"),
            &layer("switch-top1", 4, 1, &opts),
        );
    }
}

#[test]
fn hash_in_a_layer() {
    use serde_json::json;
    check(
        "hash gate",
        &layer(
            "hash",
            5,
            1,
            &[
                ("k", json!(2)),
                ("weights", json!("gate")),
                ("vocab", json!(64)),
            ],
        ),
    );
    check(
        "hash uniform",
        &layer("hash", 5, 1, &[("vocab", json!(64))]),
    );
}

#[test]
fn expert_choice_in_a_layer() {
    use serde_json::json;
    check(
        "expert-choice",
        &layer("expert-choice", 4, 2, &[("capacity_factor", json!(1.0))]),
    );
}

#[test]
fn peer_in_a_layer() {
    use serde_json::json;
    // E = n² = 16 singleton experts, 2 heads of 2; a PEER bank (u, v [N, d]): sparse gradients.
    let args = RouterArgs::new(D, 16, 2, 3)
        .with_option_value("heads", json!(2))
        .with_option_value("k", json!(2))
        .with_option_value("d_key", json!(4));
    let router = moe_routers::builtin().create("peer", &args).expect("peer");
    let mut rng = SeqRng::new(8, 2);
    let bank = PeerBank::new(
        rng.normal_matrix(16, D, 0.5),
        rng.normal_matrix(16, D, 0.5),
        Activation::Gelu,
    )
    .expect("bank");
    let l = MoeLayer::new(router, ExpertBank::Peer(bank)).expect("layer");
    check("peer", &l);
}

#[test]
fn backward_is_bit_identical_on_one_and_two_threads_with_a_real_router() {
    let l = Arc::new(layer("softmax-topk", 8, 2, &[]));
    let x = hidden(1);
    let cot = SeqRng::new(2, 3).normal_matrix(T, D, 1.0);
    let run = |threads: usize| {
        let mut dev = CpuBackend::with_threads(threads)
            .upload(Arc::clone(&l))
            .expect("upload");
        let out = dev
            .forward_train(&RouterInput::new(x.view()).with_mode(Mode::Train { seed: 4 }))
            .expect("forward");
        dev.backward(cot.view(), &out.routing.aux_coefficients())
            .expect("backward")
    };
    assert_eq!(run(1), run(2));
}

/// The README's training snippet: forward_train, backward with the routers' own coefficients, an SGD step, and the
/// correction bias's once-per-step update on the resident layer (`DeviceLayer::update_state`).
#[test]
fn readme_training_step() {
    use moe_core::grad;
    use serde_json::json;
    let l = layer(
        "softmax-topk",
        8,
        2,
        &[
            ("score", json!("sigmoid")),
            ("correction_bias", json!(true)),
        ],
    );
    let mut resident = CpuBackend::new().upload(Arc::new(l)).expect("upload");
    let x = hidden(3);
    let d_output = SeqRng::new(4, 4).normal_matrix(T, D, 1.0);
    let input = RouterInput::new(x.view()).with_mode(Mode::Train { seed: 1 });
    let out = resident.forward_train(&input).expect("forward_train");
    let d_aux = out.routing.aux_coefficients();
    let grads = resident
        .backward(d_output.view(), &d_aux)
        .expect("backward");
    assert_eq!(grads.d_input.dim(), (T, D));
    let names: Vec<&str> = grads.params.iter().map(|g| g.name.as_str()).collect();
    assert!(names.contains(&"router.gate") && names.contains(&"experts.gate_up"));
    assert!(!names.iter().any(|n| n.contains("correction")), "{names:?}");
    let loss = |dev: &mut dyn moe_core::DeviceLayer| -> f64 {
        let o = dev.forward(&input).expect("forward");
        o.output
            .iter()
            .zip(d_output.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let before = loss(resident.as_mut());
    resident
        .apply_update(&grads.params, &mut grad::sgd(1e-3))
        .expect("update");
    assert!(
        loss(resident.as_mut()) < before,
        "an SGD step along -grad lowers the loss"
    );
    let bias_of = |dev: &dyn moe_core::DeviceLayer| -> Vec<f32> {
        dev.layer()
            .params()
            .into_iter()
            .find(|p| p.name.contains("correction"))
            .map(|p| p.value.iter().copied().collect())
            .expect("correction bias listed")
    };
    let b0 = bias_of(resident.as_ref());
    let mut router = resident.layer().router_box();
    assert!(
        router
            .update_state(&input, &out.routing, 1e-3)
            .expect("update_state")
    );
    resident.set_router(router).expect("set_router");
    assert_ne!(bias_of(resident.as_ref()), b0, "the correction bias moved");
}

/// `backward_into` gives the gradients `backward` gives, and on the grouped path reuses the expert gradient tensors
/// it is handed (the same allocation comes back), so a training loop allocates them once.
#[test]
fn backward_into_reuses_the_expert_gradients() {
    let l = Arc::new(layer("softmax-topk", 8, 2, &[]));
    let x = hidden(2);
    let cot = SeqRng::new(5, 3).normal_matrix(T, D, 1.0);
    let input = RouterInput::new(x.view());
    let mut dev = CpuBackend::new().upload(Arc::clone(&l)).expect("upload");
    let out = dev.forward_train(&input).expect("forward");
    let d_aux = out.routing.aux_coefficients();
    let fresh = dev.backward(cot.view(), &d_aux).expect("backward");
    let mut grads = moe_core::LayerGrads::empty();
    let ptr = |g: &moe_core::LayerGrads| match &g.get("experts.gate_up").expect("gate_up").value {
        moe_core::GradValue::Dense(a) => a.as_ptr(),
        other => panic!("dense expected, got {other:?}"),
    };
    dev.forward_train(&input).expect("forward");
    dev.backward_into(cot.view(), &d_aux, &mut grads)
        .expect("backward_into");
    assert_eq!(grads, fresh);
    let first = ptr(&grads);
    dev.forward_train(&input).expect("forward");
    dev.backward_into(cot.view(), &d_aux, &mut grads)
        .expect("backward_into");
    assert_eq!(grads, fresh);
    assert_eq!(
        ptr(&grads),
        first,
        "the expert gradient was allocated again"
    );
}
