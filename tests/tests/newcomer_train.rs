//! A newcomer's training loop, written from the README ("Using the library", "Training") alone: SGD on a fixed
//! batch toward a fixed target (MSE), for built-in routers with a SwiGLU bank; and a tiny plugin router with a
//! backward written with the kit, checked by `check_router_grad`.

use std::sync::Arc;

use moe_core::kit::{self, GATE_STREAM};
use moe_core::ndarray::{Array2, Array3};
use moe_core::rng::SeqRng;
use moe_core::testing::check_router_grad;
use moe_core::{
    Activation, Assignment, Backend, ExpertBank, Grad, LayerGrads, MoeError, MoeLayer, Param,
    ParamMut, Router, RouterArgs, RouterBackward, RouterGrads, RouterInput, Routing, SwiGluBank,
};
use moe_core::{Mode, grad};

const T: usize = 32;
const D: usize = 16;
const F: usize = 24;
const E: usize = 4;
const K: usize = 2;

fn array3(rng: &mut SeqRng, e: usize, r: usize, c: usize, std: f32) -> Array3<f32> {
    let m = rng.normal_matrix(e * r, c, std);
    m.into_shape_with_order((e, r, c)).expect("reshape")
}

/// MSE `mean((y − target)²)` over all `T · d` values.
fn mse(y: &Array2<f32>, target: &Array2<f32>) -> f32 {
    let n = y.len() as f32;
    y.iter()
        .zip(target)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        / n
}

/// What [`train`] saw.
struct Run {
    first: f32,
    last: f32,
    n_aux: usize,
    /// `update_state` said the router has state learned without gradient.
    stateful: bool,
    /// The router's gate in the resident layer moved.
    gate_moved: bool,
}

fn gate(layer: &MoeLayer) -> Vec<f32> {
    let p = layer.params().into_iter().find(|p| p.name == "router.gate");
    p.map(|p| p.value.iter().copied().collect())
        .unwrap_or_default()
}

/// Trains `router` with a SwiGLU bank for a few SGD steps.
fn train(router_name: &str, args: &RouterArgs, steps: u64, lr: f32) -> Run {
    let mut rng = SeqRng::new(7, 0);
    let gate_up = array3(&mut rng, E, 2 * F, D, 1.0 / (D as f32).sqrt());
    let down = array3(&mut rng, E, D, F, 1.0 / (F as f32).sqrt());
    let x = rng.normal_matrix(T, D, 1.0);
    let target = rng.normal_matrix(T, D, 0.5);

    let router = moe_routers::builtin()
        .create(router_name, args)
        .expect("create");
    let layer = Arc::new(
        MoeLayer::new(
            router,
            ExpertBank::SwiGlu(SwiGluBank::new(gate_up, down, Activation::Silu).expect("bank")),
        )
        .expect("layer"),
    );
    let mut resident = moe_backends::cpu::CpuBackend::new()
        .upload(layer)
        .expect("upload");

    let gate0 = gate(resident.layer());
    let mut grads = LayerGrads::empty();
    let (mut first, mut last, mut n_aux, mut stateful) = (f32::NAN, f32::NAN, 0, false);
    for step in 0..steps {
        let input = RouterInput::new(x.view()).with_mode(Mode::Train { seed: step });
        let out = resident.forward_train(&input).expect("forward_train");
        let loss = mse(&out.output, &target);
        if step == 0 {
            first = loss;
        }
        last = loss;
        let n = out.output.len() as f32;
        let d_output = (&out.output - &target).mapv(|v| 2.0 * v / n);
        let d_aux = out.routing.aux_coefficients();
        n_aux = d_aux.len();
        resident
            .backward_into(d_output.view(), &d_aux, &mut grads)
            .expect("backward_into");
        assert_eq!(grads.d_input.dim(), (T, D));
        assert!(
            grads.get("router.gate").is_some(),
            "router.gate has a gradient"
        );
        assert!(grads.get("experts.gate_up").is_some());
        resident
            .apply_update(&grads.params, &mut grad::sgd(lr))
            .expect("update");
        let mut router = resident.layer().router_box();
        stateful = router
            .update_state(&input, &out.routing, 1e-3)
            .expect("update_state");
        resident.set_router(router).expect("set_router");
    }
    Run {
        first,
        last,
        n_aux,
        stateful,
        gate_moved: gate(resident.layer()) != gate0,
    }
}

#[test]
fn sgd_lowers_the_mse_softmax_topk_and_switch() {
    // (router, args, aux losses, has state learned without gradient)
    for (name, args, n_aux, stateful) in [
        (
            "softmax-topk",
            RouterArgs::new(D, E, K, 3).with_option("preset", "mixtral"),
            1,
            false,
        ),
        ("switch-top1", RouterArgs::new(D, E, 1, 3), 2, false),
        (
            // DeepSeek-V3's preset has 8 groups: E = 4 needs its own grouping.
            "softmax-topk",
            RouterArgs::new(D, E, K, 3)
                .with_option("preset", "deepseek_v3")
                .with_option("n_group", 2)
                .with_option("topk_group", 1),
            1,
            true,
        ),
    ] {
        let run = train(name, &args, 30, 0.5);
        let (first, last) = (run.first, run.last);
        eprintln!(
            "{name}: loss {first:.4} -> {last:.4} ({} aux losses)",
            run.n_aux
        );
        assert!(first.is_finite() && last.is_finite());
        assert!(last < 0.9 * first, "{name}: loss {first} -> {last}");
        assert_eq!((run.n_aux, run.stateful), (n_aux, stateful), "{name}");
        assert!(run.gate_moved, "{name}: the router gate did not train");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A tiny plugin router: top-k of the gate logits, weights the softmax over the k (top-k-then-softmax).

#[derive(Clone, Debug)]
struct TinyTopK {
    gate: Array2<f32>,
    k: usize,
}

impl Router for TinyTopK {
    fn name(&self) -> &str {
        "tiny-topk"
    }
    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }
    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }
    fn params(&self) -> Vec<Param<'_>> {
        vec![Param::new("gate", self.gate.view())]
    }
    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        vec![ParamMut::new("gate", self.gate.view_mut())]
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let (t, e) = (input.n_tokens(), self.n_experts());
        kit::check_input(input, self.d_model(), e, self.k)?;
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let mut kept = Vec::new();
        let mut real = 0;
        for tok in (0..t).filter(|&i| !input.is_padding(i)) {
            real += 1;
            let row = logits.row(tok).to_vec();
            let chosen = kit::top_k(&row, self.k);
            let mut w: Vec<f32> = chosen.iter().map(|&x| row[x]).collect();
            kit::softmax_in_place(&mut w);
            for (rank, (&x, &weight)) in chosen.iter().zip(&w).enumerate() {
                kept.push(Assignment {
                    token: tok as u32,
                    expert: x as u32,
                    weight,
                    rank: rank as u16,
                });
            }
        }
        Routing::new(t, e, real, kept, Vec::new())
    }
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, plan) = (grad.input, grad.routing);
        let logits = kit::gate_logits(input.hidden, self.gate.view(), None)?;
        let mut expert = vec![0; plan.n_slots()];
        for g in plan.groups() {
            expert[g.slot_start..g.slot_start + g.tokens.len()].fill(g.expert);
        }
        let (offsets, slots) = plan.token_slots();
        let mut d_logits = Array2::zeros(logits.dim());
        for (t, span) in offsets.windows(2).enumerate() {
            let slots = &slots[span[0]..span[1]];
            let mut w: Vec<f32> = slots.iter().map(|&s| logits[[t, expert[s]]]).collect();
            kit::softmax_in_place(&mut w);
            let dw: Vec<f32> = slots.iter().map(|&s| grad.d_weights[s]).collect();
            let mut dl = vec![0.0; w.len()];
            kit::softmax_backward(&w, &dw, &mut dl);
            for (&s, g) in slots.iter().zip(dl) {
                d_logits[[t, expert[s]]] += g;
            }
        }
        let g = kit::gate_backward(input.hidden, self.gate.view(), d_logits.view())?;
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params: vec![Grad::dense("gate", g.d_gate)],
        })
    }
}

#[test]
fn plugin_router_backward_passes_the_gradient_check() {
    let router = TinyTopK {
        gate: kit::init_gate(D, E, 5, GATE_STREAM).expect("gate"),
        k: K,
    };
    let x = SeqRng::new(1, 0).normal_matrix(T, D, 1.0);
    let padding: Vec<bool> = (0..T).map(|t| t % 7 == 6).collect();
    let input = RouterInput::new(x.view()).with_padding(&padding);
    let report = check_router_grad(&router, &input, 0).expect("gradient");
    assert!(report.checked > 0 && report.worst < 1.0, "{report:?}");

    // And it trains inside a layer.
    let mut rng = SeqRng::new(9, 0);
    let gate_up = array3(&mut rng, E, 2 * F, D, 0.25);
    let down = array3(&mut rng, E, D, F, 0.2);
    let layer = MoeLayer::new(
        Box::new(router),
        ExpertBank::SwiGlu(SwiGluBank::new(gate_up, down, Activation::Silu).expect("bank")),
    )
    .expect("layer");
    let mut resident = moe_backends::cpu::CpuBackend::new()
        .upload(Arc::new(layer))
        .expect("upload");
    let target = rng.normal_matrix(T, D, 0.5);
    let mut grads = LayerGrads::empty();
    let mut losses = Vec::new();
    for _ in 0..20 {
        let input = RouterInput::new(x.view());
        let out = resident.forward_train(&input).expect("forward_train");
        losses.push(mse(&out.output, &target));
        let d_output = (&out.output - &target).mapv(|v| 2.0 * v / out.output.len() as f32);
        resident
            .backward_into(d_output.view(), &out.routing.aux_coefficients(), &mut grads)
            .expect("backward_into");
        resident
            .apply_update(&grads.params, &mut grad::sgd(0.5))
            .expect("update");
    }
    assert!(
        losses[19] < 0.9 * losses[0],
        "plugin layer: loss {losses:?}"
    );
}
