//! Training on the CPU backend: what a training forward keeps ([`Saved`]), the checks of a backward, and the parts
//! of the backward common to both paths: the combine's (`d weight` per slot, `dY` per slot), the shared experts'
//! and their sigmoid gate's, the output bias's, the scatter of the experts' `dx` into `d_input` in a fixed order,
//! the router's backward, and the naming of every gradient as [`MoeLayer::params`] names the parameters.
//!
//! Semantics (MegaBlocks, ScatterMoE, torch autograd through transformers): for the layer
//! `y_t = s · Σ_{slots (t, e)} w · E_e(x_t) + σ(x_t · g) · S(x_t) + b`, `dL/dw = s · ⟨E_e(x_t), dy_t⟩` per slot, the
//! expert sees `s · w · dy_t`; the router gets `dL/dw` and `d_aux` and returns its part of `dL/dx`.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use moe_core::{
    ExpertBank, Grad, LayerGrads, Mode, MoeError, MoeLayer, RouterBackward, RouterInput, Routing,
    SharedExperts, check_finite,
};

use super::backward_ref::{BankGrads, expert_backward};
use super::experts::expert_forward;
use super::internal;

/// What a training forward keeps for the backward: owned copies of the input (hidden states, ids, sequence
/// lengths, padding, mode: the router's backward rebuilds its [`RouterInput`] from them) and the plan. Buffers are
/// reused from step to step. The grouped path's intermediates live in its workspace (`cpu/grouped_train.rs`).
#[derive(Debug, Default)]
pub(crate) struct Saved {
    /// Whether a training forward ran since the last backward.
    pub ready: bool,
    /// Whether it ran the grouped path (else the reference path, which recomputes the experts' intermediates).
    pub fast: bool,
    /// Tokens `T`, width `d`.
    pub t: usize,
    /// See `t`.
    pub d: usize,
    hidden: Vec<f32>,
    token_ids: Option<Vec<u32>>,
    seq_lens: Option<Vec<usize>>,
    padding: Option<Vec<bool>>,
    mode: Mode,
    /// The plan of the training forward.
    pub routing: Option<Routing>,
    /// Whether the routed experts' products were done remotely (`forward_train_remote`): only
    /// `backward_remote` takes such a forward.
    pub remote: bool,
}

/// Copies `src` into `dst` (reusing its allocation), or clears `dst` to `None`.
fn keep<T: Copy>(dst: &mut Option<Vec<T>>, src: Option<&[T]>) {
    match src {
        Some(s) => {
            let v = dst.get_or_insert_with(Vec::new);
            v.clear();
            v.extend_from_slice(s);
        }
        None => *dst = None,
    }
}

impl Saved {
    /// Keeps an owned copy of `input` (row-major hidden states) and marks the state not ready until the plan is
    /// stored.
    pub(crate) fn keep_input(&mut self, input: &RouterInput<'_>) {
        let (t, d) = input.hidden.dim();
        self.ready = false;
        self.remote = false;
        self.t = t;
        self.d = d;
        self.hidden.clear();
        self.hidden.reserve(t * d);
        for row in input.hidden.outer_iter() {
            self.hidden.extend(row.iter().copied());
        }
        keep(&mut self.token_ids, input.token_ids);
        keep(&mut self.seq_lens, input.seq_lens);
        keep(&mut self.padding, input.padding);
        self.mode = input.mode;
    }

    /// The kept hidden states, `[T, d]` row-major.
    pub(crate) fn hidden(&self) -> &[f32] {
        &self.hidden
    }

    /// The kept input, as the router saw it.
    ///
    /// # Errors
    /// [`MoeError::Backend`] if the kept buffers are inconsistent (a bug).
    pub(crate) fn input(&self) -> Result<RouterInput<'_>, MoeError> {
        let hidden = ArrayView2::from_shape((self.t, self.d), &self.hidden[..])
            .map_err(|e| internal(&e.to_string()))?;
        Ok(RouterInput {
            hidden,
            token_ids: self.token_ids.as_deref(),
            seq_lens: self.seq_lens.as_deref(),
            padding: self.padding.as_deref(),
            mode: self.mode,
        })
    }
}

/// The checks of [`DeviceLayer::backward`](moe_core::DeviceLayer::backward) before any work: a training forward
/// came first, `d_output` is `[T, d]` and finite, `d_aux` has one entry per auxiliary loss of the plan.
///
/// # Errors
/// [`MoeError::Order`], [`MoeError::Shape`] naming `d_output` or `d_aux`, [`MoeError::NonFinite`] naming
/// `d_output` and the token.
pub(crate) fn check_backward<'s>(
    saved: &'s Saved,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
) -> Result<&'s Routing, MoeError> {
    check_backward_of(saved, d_output, d_aux, false)
}

/// [`check_backward`] of `backward` (`remote = false`) or of `backward_remote` (`remote = true`): the training
/// forward must be of the same kind (`forward_train` or `forward_train_remote`).
///
/// # Errors
/// As [`check_backward`].
pub(crate) fn check_backward_of<'s>(
    saved: &'s Saved,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
    remote: bool,
) -> Result<&'s Routing, MoeError> {
    let (call, forward) = if remote {
        ("backward_remote", "forward_train_remote")
    } else {
        ("backward", "forward_train")
    };
    let routing = match (&saved.routing, saved.ready) {
        (Some(r), true) if saved.remote == remote => r,
        _ => {
            return Err(MoeError::Order {
                call: call.into(),
                before: format!("a training forward ({forward}; each backward consumes one)"),
            });
        }
    };
    if d_output.dim() != (saved.t, saved.d) {
        return Err(MoeError::shape(
            "d_output",
            format!("[{}, {}] (the training forward's output)", saved.t, saved.d),
            d_output.shape(),
        ));
    }
    check_finite("d_output", d_output)?;
    let n_aux = routing.aux_losses().len();
    if d_aux.len() != n_aux {
        return Err(MoeError::shape(
            "d_aux",
            format!("[{n_aux}] (one per auxiliary loss of the plan)"),
            &[d_aux.len()],
        ));
    }
    Ok(routing)
}

/// Fails with [`MoeError::Unsupported`] naming custom experts if the routed or shared bank has them.
///
/// # Errors
/// As above.
pub(crate) fn check_banks(layer: &MoeLayer) -> Result<(), MoeError> {
    let custom = |b: &ExpertBank| matches!(b, ExpertBank::Custom(_));
    if custom(layer.experts()) || layer.shared().is_some_and(|s| custom(s.bank())) {
        return Err(super::backward_ref::custom_unsupported());
    }
    Ok(())
}

/// What [`routed_reference`] returns: `d weight` per slot, `dx` per slot (`[slots, d]`), the bank's gradients.
pub(crate) type RoutedGrads = (Vec<f32>, Array2<f32>, Vec<Grad>);

/// The reference backward of the routed experts: per active expert, its rows gathered, `dY = s · w · dy_t`, the
/// expert's backward ([`expert_backward`]); `d weight` per slot from the recomputed expert outputs. Returns the
/// per-slot `d weight`, `dx` per slot (`[slots, d]`) and the bank's gradients.
///
/// # Errors
/// Expert errors; [`MoeError::Unsupported`] for custom experts.
pub(crate) fn routed_reference(
    layer: &MoeLayer,
    x: ArrayView2<'_, f32>,
    routing: &Routing,
    d_output: ArrayView2<'_, f32>,
) -> Result<RoutedGrads, MoeError> {
    let d = x.ncols();
    let scale = layer.output_scale();
    let mut d_weights = vec![0.0f32; routing.n_slots()];
    let mut slot_dx = Array2::<f32>::zeros((routing.n_slots(), d));
    let mut grads = BankGrads::zeros(layer.experts(), routing.active_experts())?;
    for (gi, g) in routing.groups().enumerate() {
        let idx: Vec<usize> = g.tokens.iter().map(|&t| t as usize).collect();
        let xg = x.select(Axis(0), &idx);
        let mut dy = d_output.select(Axis(0), &idx);
        let y = expert_forward(layer.experts(), g.expert, xg.view())?;
        for (j, (mut dyr, yr)) in dy.outer_iter_mut().zip(y.outer_iter()).enumerate() {
            d_weights[g.slot_start + j] = scale * yr.dot(&dyr);
            dyr *= scale * g.weights[j];
        }
        let dx = expert_backward(
            layer.experts(),
            g.expert,
            gi,
            xg.view(),
            dy.view(),
            &mut grads,
        )?;
        slot_dx
            .slice_mut(ndarray::s![g.slot_start..g.slot_start + idx.len(), ..])
            .assign(&dx);
    }
    Ok((d_weights, slot_dx, grads.into_grads()))
}

/// `d_input[t] += Σ dx[s]` over token `t`'s slots in the token-major order (`offsets`, `slots`: ascending expert
/// per token), each token's sum on one thread in that fixed order.
pub(crate) fn scatter_slots(
    d_input: &mut Array2<f32>,
    offsets: &[usize],
    slots: &[usize],
    dx: &[f32],
) -> Result<(), MoeError> {
    use rayon::prelude::*;
    let d = d_input.ncols();
    if d == 0 {
        return Ok(());
    }
    let buf = d_input
        .as_slice_mut()
        .ok_or_else(|| internal("d_input is not contiguous"))?;
    buf.par_chunks_mut(d).enumerate().for_each(|(t, row)| {
        for &s in &slots[offsets[t]..offsets[t + 1]] {
            for (a, &b) in row.iter_mut().zip(&dx[s * d..(s + 1) * d]) {
                *a += b;
            }
        }
    });
    Ok(())
}

/// The shared experts' gate: given the shared output `s` (`[T, d]`) and `d_output`, writes the gradient the shared
/// bank sees (`σ(x · g) · dy`, or `dy` without a gate) into `dy_shared`, adds the gate's `dx` to `d_input` and
/// returns the gate's gradient (`Σ_t σ'(l_t) ⟨dy_t, s_t⟩ x_t`).
pub(crate) fn shared_gate_backward(
    shared: &SharedExperts,
    x: ArrayView2<'_, f32>,
    s: ArrayView2<'_, f32>,
    d_output: ArrayView2<'_, f32>,
    dy_shared: &mut [f32],
    d_input: &mut Array2<f32>,
) -> Option<Array1<f32>> {
    let d = x.ncols();
    match shared.gate() {
        None => {
            for (o, &v) in dy_shared.iter_mut().zip(d_output.iter()) {
                *o = v;
            }
            None
        }
        Some(g) => {
            // The same logits as the forward (`combine::add_shared`).
            let logits = x.dot(g);
            let mut dl = Array1::<f32>::zeros(x.nrows());
            for (t, &l) in logits.iter().enumerate() {
                let sg = 1.0 / (1.0 + (-l).exp());
                let dyr = d_output.row(t);
                dl[t] = sg * (1.0 - sg) * dyr.dot(&s.row(t));
                for (o, &v) in dy_shared[t * d..(t + 1) * d].iter_mut().zip(dyr.iter()) {
                    *o = sg * v;
                }
                d_input.row_mut(t).scaled_add(dl[t], g);
            }
            Some(x.t().dot(&dl))
        }
    }
}

/// The reference backward of the shared experts on all `T` rows: adds their `dx` to `d_input`, returns their
/// gradients (the bank's, then `gate`).
///
/// # Errors
/// Expert errors; [`MoeError::Unsupported`] for custom experts.
pub(crate) fn shared_reference(
    shared: &SharedExperts,
    x: ArrayView2<'_, f32>,
    d_output: ArrayView2<'_, f32>,
    d_input: &mut Array2<f32>,
) -> Result<Vec<Grad>, MoeError> {
    let s = expert_forward(shared.bank(), 0, x)?;
    let mut dy = Array2::<f32>::zeros(x.raw_dim());
    let buf = dy
        .as_slice_mut()
        .ok_or_else(|| internal("shared gradient buffer"))?;
    let d_gate = shared_gate_backward(shared, x, s.view(), d_output, buf, d_input);
    let mut grads = BankGrads::zeros(shared.bank(), &[0])?;
    let dx = expert_backward(shared.bank(), 0, 0, x, dy.view(), &mut grads)?;
    *d_input += &dx;
    let mut out = grads.into_grads();
    out.extend(d_gate.map(|g| Grad::dense("gate", g)));
    Ok(out)
}

/// What the experts' part of a backward produced, for [`finish_backward`].
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    /// `dL/dw` per slot of the plan.
    pub d_weights: &'a [f32],
    /// `dL/dx` `[T, d]` so far (routed and shared experts).
    pub d_input: Array2<f32>,
    /// The routed bank's gradients, as [`ExpertBank::params`] names them.
    pub expert_grads: Vec<Grad>,
    /// The shared experts' gradients (bank, then `gate`).
    pub shared_grads: Vec<Grad>,
}

/// The end of every backward: the router's backward (its `d_hidden` added to `d_input`), the output bias's
/// gradient (`Σ_t dy_t`), and every gradient named and ordered as [`MoeLayer::params`].
///
/// # Errors
/// The router's errors ([`MoeError::Unsupported`] naming a router without a backward).
pub(crate) fn finish_backward(
    layer: &MoeLayer,
    saved: &Saved,
    routing: &Routing,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
    parts: Parts<'_>,
) -> Result<LayerGrads, MoeError> {
    let Parts {
        d_weights,
        mut d_input,
        expert_grads,
        shared_grads,
    } = parts;
    let input = saved.input()?;
    let router = layer.router().backward(&RouterBackward {
        input: &input,
        routing,
        d_weights,
        d_aux,
    })?;
    if router.d_hidden.dim() != d_input.dim() {
        return Err(MoeError::shape(
            format!("d_hidden of router {}", layer.router().name()),
            format!("{:?}", d_input.shape()),
            router.d_hidden.shape(),
        ));
    }
    d_input += &router.d_hidden;
    // The router's gradients in the order of its parameters.
    let order = layer.router().params();
    let mut rg = router.params;
    rg.sort_by_key(|g| {
        order
            .iter()
            .position(|p| p.name == g.name)
            .unwrap_or(usize::MAX)
    });
    let mut params = layer.name_grads("router", rg);
    params.extend(layer.name_grads("experts", expert_grads));
    params.extend(layer.name_grads("shared", shared_grads));
    if layer.output_bias().is_some() {
        let db = d_output.sum_axis(Axis(0));
        params.extend(layer.name_grads("", vec![Grad::dense("output_bias", db)]));
    }
    Ok(LayerGrads { d_input, params })
}

/// The reference backward of the last training forward (`saved`): the routed experts per expert on recomputed
/// intermediates, the shared experts, then [`finish_backward`].
pub(crate) fn reference_backward(
    layer: &MoeLayer,
    saved: &Saved,
    d_output: ndarray::ArrayView2<'_, f32>,
    d_aux: &[f32],
) -> Result<LayerGrads, MoeError> {
    let routing = saved
        .routing
        .as_ref()
        .ok_or_else(|| internal("no saved plan"))?;
    let input = saved.input()?;
    let x = input.hidden;
    let (d_weights, slot_dx, expert_grads) = routed_reference(layer, x, routing, d_output)?;
    let mut d_input = Array2::<f32>::zeros(x.raw_dim());
    let (offsets, slots) = routing.token_slots();
    let dx = slot_dx
        .as_slice()
        .ok_or_else(|| internal("slot gradients are not contiguous"))?;
    scatter_slots(&mut d_input, &offsets, &slots, dx)?;
    let shared_grads = match layer.shared() {
        Some(shared) => shared_reference(shared, x, d_output, &mut d_input)?,
        None => Vec::new(),
    };
    finish_backward(
        layer,
        saved,
        routing,
        d_output,
        d_aux,
        Parts {
            d_weights: &d_weights,
            d_input,
            expert_grads,
            shared_grads,
        },
    )
}
