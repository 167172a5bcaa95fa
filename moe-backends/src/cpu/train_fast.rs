//! The grouped path's training forward and backward of the whole layer (`cpu/grouped_train.rs` runs the banks):
//! buffers in [`TrainWorkspace`], reused from step to step, so a steady state allocates only what it returns.

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use moe_core::{LayerGrads, LayerOutput, MoeError, MoeLayer, RouterInput, Routing};

use super::activation::Act;
use super::backward_ref::BankGrads;
use super::grouped::{supports, widest};
use super::grouped_train::{BankBufs, GradIndex, Rows, backward_bank, train_bank};
use super::kernels::Kernels;
use super::train::{Parts, Saved, finish_backward, scatter_slots, shared_gate_backward};
use super::{combine, expert_forward, finish, internal};

/// Buffers of the grouped training path.
#[derive(Debug, Default)]
pub(crate) struct TrainWorkspace {
    /// The routed bank's rows: `x` gathered, `y` its outputs (`dX` after the backward), `dy` its output gradients.
    pub(crate) routed: BankBufs,
    shared: BankBufs,
    token_offsets: Vec<usize>,
    token_slots: Vec<usize>,
    d_weights: Vec<f32>,
    index: GradIndex,
}

/// The training forward on the grouped path (the routed bank is one [`supports`] runs): as the forward, keeping
/// `X`, `P`, `H`, `Y` of the routed and shared banks, the input and the plan.
///
/// # Errors
/// As [`moe_core::DeviceLayer::forward`].
pub(crate) fn forward_train(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    saved: &mut Saved,
    ws: &mut TrainWorkspace,
    kernels: Kernels,
) -> Result<LayerOutput, MoeError> {
    let routing = train_gather(layer, input, saved, ws)?;
    let (rows, d) = (routing.n_slots(), input.hidden.ncols());
    let offsets = routing.offsets();
    let r = &mut ws.routed;
    train_bank(
        layer.experts(),
        routing.active_experts(),
        offsets,
        r.x.get(rows * d),
        &mut r.p,
        &mut r.h,
        &mut r.y,
        widest(offsets),
        kernels,
    )?;
    train_combine(layer, input, saved, ws, kernels, routing)
}

/// The first part of [`forward_train`]: keeps the input, routes it and gathers each slot's row into
/// `ws.routed.x` (`[slots, d]`, the plan's order).
///
/// # Errors
/// The router's errors.
pub(crate) fn train_gather(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    saved: &mut Saved,
    ws: &mut TrainWorkspace,
) -> Result<Routing, MoeError> {
    saved.keep_input(input);
    let routing = layer.route(input)?;
    let d = input.hidden.ncols();
    let rows = routing.n_slots();
    let (hidden, tokens) = (saved.hidden(), routing.slot_tokens());
    ws.routed
        .x
        .get_mut(rows * d)
        .par_chunks_mut(d.max(1))
        .zip(tokens.par_iter())
        .for_each(|(row, &tok)| {
            let tok = tok as usize;
            row.copy_from_slice(&hidden[tok * d..(tok + 1) * d]);
        });
    Ok(routing)
}

/// The rest of [`forward_train`] once the routed experts' outputs are in `ws.routed.y` (`[slots, d]`): the
/// combine, the shared experts (kept for the backward), the output bias; marks `saved` ready with the plan.
///
/// # Errors
/// Shared experts' errors; [`MoeError::Backend`] for inconsistent buffers.
pub(crate) fn train_combine(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    saved: &mut Saved,
    ws: &mut TrainWorkspace,
    kernels: Kernels,
    routing: Routing,
) -> Result<LayerOutput, MoeError> {
    let (t, d) = input.hidden.dim();
    let rows = routing.n_slots();
    let hidden = saved.hidden();
    routing.token_slots_into(&mut ws.token_offsets, &mut ws.token_slots);
    let mut output = combine::combine(
        &ws.token_offsets,
        &ws.token_slots,
        routing.slot_weights(),
        ws.routed.y.get(rows * d),
        t,
        d,
        layer.output_scale(),
    )?;
    if let Some(shared) = layer.shared() {
        if supports(shared.bank()) {
            let s = &mut ws.shared;
            train_bank(
                shared.bank(),
                &[0],
                &[0, t],
                hidden,
                &mut s.p,
                &mut s.h,
                &mut s.y,
                t,
                kernels,
            )?;
            let ys = ArrayView2::from_shape((t, d), s.y.get(t * d))
                .map_err(|e| internal(&e.to_string()))?;
            combine::add_shared(&mut output, input.hidden, ys, shared.gate());
        } else {
            let ys = expert_forward(shared.bank(), 0, input.hidden)?;
            combine::add_shared(&mut output, input.hidden, ys.view(), shared.gate());
        }
    }
    saved.routing = Some(routing.clone());
    saved.fast = true;
    saved.ready = true;
    Ok(finish(layer, output, routing))
}

/// The backward of [`forward_train`] (checks done by the caller). Dense expert gradients of `recycle` (a previous
/// step's, named as the layer names them) are reused where their shapes fit: the grouped kernels overwrite every
/// value, so a training loop that hands them back allocates its gradients once.
///
/// # Errors
/// As [`moe_core::DeviceLayer::backward`].
pub(crate) fn backward(
    layer: &MoeLayer,
    saved: &Saved,
    ws: &mut TrainWorkspace,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
    kernels: Kernels,
    recycle: &mut Vec<moe_core::Grad>,
) -> Result<LayerGrads, MoeError> {
    let routing = backward_dy(layer, saved, ws, d_output)?;
    let (rows, d) = (routing.n_slots(), saved.d);
    let mut expert_grads = BankGrads::reuse(layer.experts(), recycle, "experts.")?;
    let f = layer.experts().ffn();
    let pw = Act::of(layer.experts()).map_or(2 * f, |a| a.width(f));
    let r = &mut ws.routed;
    backward_bank(
        layer.experts(),
        routing.active_experts(),
        routing.offsets(),
        Rows {
            x: r.x.get(rows * d),
            p: r.p.get_mut(rows * pw),
            h: r.h.get_mut(rows * f),
            y: r.y.get_mut(rows * d),
            dy: r.dy.get(rows * d),
        },
        &mut expert_grads,
        &mut ws.index,
        widest(routing.offsets()),
        kernels,
    )?;
    let grads = expert_grads.into_grads();
    backward_rest(layer, saved, ws, d_output, d_aux, kernels, recycle, grads)
}

/// The first part of [`backward`]: `dY` per slot (`s · w · dy_t`, the plan's order) into `ws.routed.dy` and
/// `d weight` per slot (`s · ⟨Y, dy_t⟩`, from the outputs in `ws.routed.y`) into `ws.d_weights`. Returns the plan.
///
/// # Errors
/// [`MoeError::Backend`] when no plan was kept (a bug: the caller checks the order).
pub(crate) fn backward_dy<'s>(
    layer: &MoeLayer,
    saved: &'s Saved,
    ws: &mut TrainWorkspace,
    d_output: ArrayView2<'_, f32>,
) -> Result<&'s Routing, MoeError> {
    let routing = saved
        .routing
        .as_ref()
        .ok_or_else(|| internal("no saved plan"))?;
    let d = saved.d;
    let rows = routing.n_slots();
    let scale = layer.output_scale();
    let owned;
    let dout: &[f32] = match d_output.as_slice() {
        Some(s) => s,
        None => {
            owned = d_output.as_standard_layout().into_owned();
            owned
                .as_slice()
                .ok_or_else(|| internal("d_output copy is not contiguous"))?
        }
    };
    // dY per slot (s · w · dy_t, expert-major) and d weight per slot (s · ⟨Y, dy_t⟩).
    ws.d_weights.clear();
    ws.d_weights.resize(rows, 0.0);
    let r = &mut ws.routed;
    let (tokens, weights) = (routing.slot_tokens(), routing.slot_weights());
    let y = r.y.get(rows * d);
    r.dy.get_mut(rows * d)
        .par_chunks_mut(d.max(1))
        .zip(ws.d_weights.par_iter_mut())
        .enumerate()
        .for_each(|(s, (row, dw))| {
            let tok = tokens[s] as usize;
            let g = &dout[tok * d..(tok + 1) * d];
            let ys = &y[s * d..(s + 1) * d];
            *dw = scale * ys.iter().zip(g).map(|(&a, &b)| a * b).sum::<f32>();
            let w = scale * weights[s];
            row.iter_mut().zip(g).for_each(|(o, &v)| *o = w * v);
        });
    Ok(routing)
}

/// The rest of [`backward`] once the routed experts' `dX` per slot is in `ws.routed.y` (`[slots, d]`): scatters
/// it into `d_input`, runs the shared experts' backward, then [`finish_backward`] with `expert_grads` (the routed
/// bank's gradients as [`moe_core::ExpertBank::params`] names them; empty when their owners keep them).
///
/// # Errors
/// As [`moe_core::DeviceLayer::backward`].
pub(crate) fn backward_rest(
    layer: &MoeLayer,
    saved: &Saved,
    ws: &mut TrainWorkspace,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
    kernels: Kernels,
    recycle: &mut Vec<moe_core::Grad>,
    expert_grads: Vec<moe_core::Grad>,
) -> Result<LayerGrads, MoeError> {
    let routing = saved
        .routing
        .as_ref()
        .ok_or_else(|| internal("no saved plan"))?;
    let (t, d) = (saved.t, saved.d);
    let rows = routing.n_slots();
    let mut d_input = Array2::<f32>::zeros((t, d));
    scatter_slots(
        &mut d_input,
        &ws.token_offsets,
        &ws.token_slots,
        ws.routed.y.get(rows * d),
    )?;
    let shared_grads = shared_backward(layer, saved, ws, d_output, &mut d_input, kernels, recycle)?;
    finish_backward(
        layer,
        saved,
        routing,
        d_output,
        d_aux,
        Parts {
            d_weights: &ws.d_weights,
            d_input,
            expert_grads,
            shared_grads,
        },
    )
}

/// The shared experts' backward: on the grouped path when their bank runs there, else the reference.
fn shared_backward(
    layer: &MoeLayer,
    saved: &Saved,
    ws: &mut TrainWorkspace,
    d_output: ArrayView2<'_, f32>,
    d_input: &mut Array2<f32>,
    kernels: Kernels,
    recycle: &mut Vec<moe_core::Grad>,
) -> Result<Vec<moe_core::Grad>, MoeError> {
    let Some(shared) = layer.shared() else {
        return Ok(Vec::new());
    };
    let (t, d) = (saved.t, saved.d);
    let x = ArrayView2::from_shape((t, d), saved.hidden()).map_err(|e| internal(&e.to_string()))?;
    if !supports(shared.bank()) {
        return super::train::shared_reference(shared, x, d_output, d_input);
    }
    let s = &mut ws.shared;
    let sy =
        ArrayView2::from_shape((t, d), s.y.get(t * d)).map_err(|e| internal(&e.to_string()))?;
    let d_gate = shared_gate_backward(shared, x, sy, d_output, s.dy.get_mut(t * d), d_input);
    let mut grads = BankGrads::reuse(shared.bank(), recycle, "shared.")?;
    let f = shared.bank().ffn();
    let pw = Act::of(shared.bank()).map_or(2 * f, |a| a.width(f));
    backward_bank(
        shared.bank(),
        &[0],
        &[0, t],
        Rows {
            x: saved.hidden(),
            p: s.p.get_mut(t * pw),
            h: s.h.get_mut(t * f),
            y: s.y.get_mut(t * d),
            dy: s.dy.get(t * d),
        },
        &mut grads,
        &mut ws.index,
        t,
        kernels,
    )?;
    let dx =
        ArrayView2::from_shape((t, d), s.y.get(t * d)).map_err(|e| internal(&e.to_string()))?;
    *d_input += &dx;
    let mut out = grads.into_grads();
    out.extend(d_gate.map(|g| moe_core::Grad::dense("gate", g)));
    Ok(out)
}
