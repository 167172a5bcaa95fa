//! The PEER bank's forward, training forward and backward, token-major without grouping: per token, over its
//! slots, `z = u_e · x_t`, `y_t += w · act(z) · v_e`, the rows of `u` and `v` read in place by every thread.
//! The backward writes `dx` per token, then `du`, `dv` as sparse rows of the touched experts, each expert's rows
//! reduced in the plan's (expert-major, ascending token) slot order: the same bits on any thread count.
//!
//! Formulas (as `backward_ref.rs`, torch autograd through the same expression): with `g = ⟨dy_t, v_e⟩` and
//! `c = s · w` (`s` the output scale), `dL/dw = s · act(z) · g`, `dz = act'(z) · c · g`, `dx_t += dz · u_e`,
//! `du_e += dz · x_t`, `dv_e += c · act(z) · dy_t`. The forward performs the same f32 operations as the reference
//! forward (`expert_forward` then `combine::combine`), so both give the same bits.

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use moe_core::{
    Activation, ExpertBank, LayerGrads, LayerOutput, MoeError, MoeLayer, PeerBank, RouterInput,
    Routing,
};

use super::activation::act_grad;
use super::backward_ref::BankGrads;
use super::experts::{activate, expert_forward};
use super::train::{Parts, Saved, finish_backward, shared_reference};
use super::{combine, finish, internal};

/// Tokens per parallel work unit.
const BLOCK: usize = 8;

/// The PEER path's buffers: the training forward's (kept for the backward) and the eval forward's apart, so an
/// eval forward between a training forward and its backward changes nothing.
#[derive(Debug, Default)]
pub(crate) struct PeerWorkspaces {
    /// For `forward_train` and `backward`.
    pub train: PeerWorkspace,
    /// For `forward`.
    pub eval: PeerWorkspace,
}

/// Buffers of the PEER path, reused from step to step. Per-slot values are token-major (position `p` of the
/// token-major slot list).
#[derive(Debug, Default)]
pub(crate) struct PeerWorkspace {
    token_offsets: Vec<usize>,
    token_slots: Vec<usize>,
    /// Expert of each (expert-major) slot.
    slot_expert: Vec<u32>,
    /// Token-major position of each (expert-major) slot.
    position: Vec<usize>,
    /// `act(z)` per position (training forward).
    h: Vec<f32>,
    /// `act'(z)` per position (training forward).
    hp: Vec<f32>,
    /// `dz` per position (backward).
    dz: Vec<f32>,
    /// `s · w · act(z)` per position (backward).
    cv: Vec<f32>,
    /// `dL/dw` per position (backward).
    dw: Vec<f32>,
    /// A contiguous copy of the input or `d_output` when the caller's is not.
    rows: Vec<f32>,
}

/// Whether `layer`'s routed bank runs on this path.
pub(crate) fn supports(layer: &MoeLayer) -> bool {
    matches!(layer.experts(), ExpertBank::Peer(_))
}

/// The eight-lane dot product of ndarray's `unrolled_dot` (the reference forward's `x.dot(&u)`), in the same order:
/// lanes `i mod 8`, then `(p0 + p4) + (p1 + p5) + (p2 + p6) + (p3 + p7)`, then the tail in order.
#[inline]
fn dot(xs: &[f32], ys: &[f32]) -> f32 {
    let n = xs.len().min(ys.len());
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mut p = [0.0f32; 8];
    let (xc, yc) = (xs.chunks_exact(8), ys.chunks_exact(8));
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            p[l] += a[l] * b[l];
        }
    }
    let mut sum = 0.0f32;
    sum += p[0] + p[4];
    sum += p[1] + p[5];
    sum += p[2] + p[6];
    sum += p[3] + p[7];
    for (&a, &b) in xt.iter().zip(yt) {
        sum += a * b;
    }
    sum
}

/// `act(z)` and `act'(z)`, bit-identical to [`activate`] and [`act_grad`]; exact GELU shares its `Φ(z)`.
#[inline]
fn act_both(act: Activation, z: f32) -> (f32, f32) {
    match act {
        Activation::Gelu => {
            let (cdf, pdf) = moe_core::math::normal_cdf_pdf_f32(z);
            (z * cdf, cdf + z * pdf)
        }
        _ => (activate(act, z), act_grad(act, z)),
    }
}

/// `a` as one row-major slice: in place when it is standard layout, else copied into `buf`.
fn rows_of<'a>(a: ArrayView2<'a, f32>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if let Some(s) = a.to_slice() {
        return s;
    }
    buf.clear();
    buf.extend(a.iter().copied());
    buf
}

/// The bank's `u` and `v` as row-major slices (copied when not standard layout, which upload avoids).
fn weights(b: &PeerBank) -> (Cow<'_, [f32]>, Cow<'_, [f32]>) {
    (cow(b.u()), cow(b.v()))
}

/// `a` as one row-major slice, borrowed when it is standard layout.
fn cow(a: &Array2<f32>) -> Cow<'_, [f32]> {
    match a.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.iter().copied().collect()),
    }
}

/// Splits `buf` into consecutive pieces of lengths `offsets[i + 1] − offsets[i]` for each block of [`BLOCK`]
/// tokens (`offsets` the token offsets, `[T + 1]`).
fn split_blocks<'a, T>(mut buf: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let t = offsets.len().saturating_sub(1);
    let mut out = Vec::with_capacity(t.div_ceil(BLOCK));
    for b in (0..t).step_by(BLOCK) {
        let len = offsets[(b + BLOCK).min(t)] - offsets[b];
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        out.push(head);
        buf = tail;
    }
    out
}

impl PeerWorkspace {
    /// Fills the slot indices of `routing`: token-major offsets and slots, each slot's expert and position.
    fn index(&mut self, routing: &Routing) {
        routing.token_slots_into(&mut self.token_offsets, &mut self.token_slots);
        self.slot_expert.clear();
        for (g, &e) in routing.active_experts().iter().enumerate() {
            let n = routing.offsets()[g + 1] - routing.offsets()[g];
            self.slot_expert.extend(std::iter::repeat_n(e, n));
        }
        self.position.clear();
        self.position.resize(self.token_slots.len(), 0);
        for (p, &s) in self.token_slots.iter().enumerate() {
            self.position[s] = p;
        }
    }
}

/// The forward of the routed PEER bank on `routing`: `[T, d]` (before shared experts and the bias). With `keep`,
/// `act(z)` and `act'(z)` per slot go to the workspace for the backward.
fn routed_forward(
    b: &PeerBank,
    x: &[f32],
    routing: &Routing,
    scale: f32,
    ws: &mut PeerWorkspace,
    keep: bool,
) -> Result<Array2<f32>, MoeError> {
    let (t, d) = (routing.n_tokens(), b.u().ncols());
    ws.index(routing);
    let n_pos = ws.token_slots.len();
    let (u, v) = weights(b);
    let (u, v) = (&u[..], &v[..]);
    let mut out = Array2::<f32>::zeros((t, d));
    if t == 0 || d == 0 {
        return Ok(out);
    }
    let buf = out
        .as_slice_mut()
        .ok_or_else(|| internal("output not contiguous"))?;
    let (h, hp) = (&mut ws.h, &mut ws.hp);
    let len = if keep { n_pos } else { 0 };
    h.resize(len, 0.0);
    hp.resize(len, 0.0);
    let (offs, slots, experts) = (&ws.token_offsets, &ws.token_slots, &ws.slot_expert);
    let weights = routing.slot_weights();
    let keep_offs: Vec<usize> = if keep {
        offs.clone()
    } else {
        vec![0; offs.len()]
    };
    let (hb, hpb) = (split_blocks(h, &keep_offs), split_blocks(hp, &keep_offs));
    let act = b.act();
    buf.par_chunks_mut(BLOCK * d)
        .zip(hb)
        .zip(hpb)
        .enumerate()
        .for_each(|(blk, ((rows, hs), hps))| {
            let base = offs[blk * BLOCK];
            for (i, row) in rows.chunks_exact_mut(d).enumerate() {
                let tok = blk * BLOCK + i;
                let xr = &x[tok * d..(tok + 1) * d];
                for p in offs[tok]..offs[tok + 1] {
                    let s = slots[p];
                    let e = experts[s] as usize;
                    let z = dot(xr, &u[e * d..(e + 1) * d]);
                    let a = if keep {
                        let (a, g) = act_both(act, z);
                        hs[p - base] = a;
                        hps[p - base] = g;
                        a
                    } else {
                        activate(act, z)
                    };
                    let w = weights[s];
                    for (o, &vv) in row.iter_mut().zip(&v[e * d..(e + 1) * d]) {
                        *o += w * (a * vv);
                    }
                }
                if scale != 1.0 {
                    row.iter_mut().for_each(|o| *o *= scale);
                }
            }
        });
    Ok(out)
}

/// The forward of a layer whose routed bank is PEER (`keep`: keep what the backward needs in `ws`), shared
/// experts and the output bias as the reference forward.
///
/// # Errors
/// As [`moe_core::DeviceLayer::forward`].
pub(crate) fn forward(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut PeerWorkspace,
    keep: bool,
) -> Result<LayerOutput, MoeError> {
    let ExpertBank::Peer(b) = layer.experts() else {
        return Err(internal("the PEER path on another bank"));
    };
    let routing = layer.route(input)?;
    if input.hidden.ncols() != b.u().ncols() {
        return Err(MoeError::shape(
            "hidden",
            format!("[T, {}]", b.u().ncols()),
            input.hidden.shape(),
        ));
    }
    let mut rows = std::mem::take(&mut ws.rows);
    let x = rows_of(input.hidden, &mut rows);
    let out = routed_forward(b, x, &routing, layer.output_scale(), ws, keep);
    ws.rows = rows;
    let mut output = out?;
    if let Some(shared) = layer.shared() {
        let ys = expert_forward(shared.bank(), 0, input.hidden)?;
        combine::add_shared(&mut output, input.hidden, ys.view(), shared.gate());
    }
    Ok(finish(layer, output, routing))
}

/// The training forward: [`forward`] keeping the input and the plan in `saved`, the activations in `ws`.
///
/// # Errors
/// As [`moe_core::DeviceLayer::forward_train`].
pub(crate) fn forward_train(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    saved: &mut Saved,
    ws: &mut PeerWorkspace,
) -> Result<LayerOutput, MoeError> {
    saved.keep_input(input);
    let out = forward(layer, input, ws, true)?;
    saved.fast = false;
    saved.routing = Some(out.routing.clone());
    saved.ready = true;
    Ok(out)
}

/// The token-major pass of the backward: per slot `dL/dw`, `dz`, `s · w · act(z)` (by position), `dx` into
/// `d_input` (`[T, d]` row-major).
fn token_pass(
    (u, v): (&[f32], &[f32]),
    d: usize,
    dy: &[f32],
    weights: &[f32],
    scale: f32,
    ws: &mut PeerWorkspace,
    d_input: &mut [f32],
) {
    let n_pos = ws.token_slots.len();
    for buf in [&mut ws.dz, &mut ws.cv, &mut ws.dw] {
        buf.clear();
        buf.resize(n_pos, 0.0);
    }
    let offs = &ws.token_offsets;
    let (slots, experts, h, hp) = (&ws.token_slots, &ws.slot_expert, &ws.h, &ws.hp);
    let dzb = split_blocks(&mut ws.dz, offs);
    let cvb = split_blocks(&mut ws.cv, offs);
    let dwb = split_blocks(&mut ws.dw, offs);
    d_input
        .par_chunks_mut(BLOCK * d)
        .zip(dzb)
        .zip(cvb)
        .zip(dwb)
        .enumerate()
        .for_each(|(blk, (((rows, dzs), cvs), dws))| {
            let base = offs[blk * BLOCK];
            for (i, dx) in rows.chunks_exact_mut(d).enumerate() {
                let tok = blk * BLOCK + i;
                let dyr = &dy[tok * d..(tok + 1) * d];
                for p in offs[tok]..offs[tok + 1] {
                    let s = slots[p];
                    let e = experts[s] as usize;
                    let g = dot(dyr, &v[e * d..(e + 1) * d]);
                    let c = scale * weights[s];
                    let dz = hp[p] * c * g;
                    dws[p - base] = scale * h[p] * g;
                    dzs[p - base] = dz;
                    cvs[p - base] = c * h[p];
                    for (o, &uu) in dx.iter_mut().zip(&u[e * d..(e + 1) * d]) {
                        *o += dz * uu;
                    }
                }
            }
        });
}

/// The expert-major pass of the backward: `du`, `dv` rows of the active experts (`[active, d]` each), each
/// expert's slots summed in plan order.
fn expert_pass(
    routing: &Routing,
    x: &[f32],
    dy: &[f32],
    d: usize,
    ws: &PeerWorkspace,
) -> Result<(Array2<f32>, Array2<f32>), MoeError> {
    let n = routing.active_experts().len();
    let mut du = Array2::<f32>::zeros((n, d));
    let mut dv = Array2::<f32>::zeros((n, d));
    if d == 0 {
        return Ok((du, dv));
    }
    let (offsets, tokens) = (routing.offsets(), routing.slot_tokens());
    let (dz, cv, position) = (&ws.dz, &ws.cv, &ws.position);
    let dub = du
        .as_slice_mut()
        .ok_or_else(|| internal("du not contiguous"))?;
    let dvb = dv
        .as_slice_mut()
        .ok_or_else(|| internal("dv not contiguous"))?;
    dub.par_chunks_mut(d)
        .zip(dvb.par_chunks_mut(d))
        .enumerate()
        .with_min_len(16)
        .for_each(|(g, (gu, gv))| {
            for s in offsets[g]..offsets[g + 1] {
                let (p, tok) = (position[s], tokens[s] as usize);
                let (a, c) = (dz[p], cv[p]);
                for (o, &xx) in gu.iter_mut().zip(&x[tok * d..(tok + 1) * d]) {
                    *o += a * xx;
                }
                for (o, &yy) in gv.iter_mut().zip(&dy[tok * d..(tok + 1) * d]) {
                    *o += c * yy;
                }
            }
        });
    Ok((du, dv))
}

/// The backward of the last training forward on the PEER path (`saved`, `ws`): the routed bank token-major and
/// expert-major, the shared experts as the reference backward, then [`finish_backward`].
///
/// # Errors
/// As [`moe_core::DeviceLayer::backward`].
pub(crate) fn backward(
    layer: &MoeLayer,
    saved: &Saved,
    ws: &mut PeerWorkspace,
    d_output: ArrayView2<'_, f32>,
    d_aux: &[f32],
) -> Result<LayerGrads, MoeError> {
    let ExpertBank::Peer(b) = layer.experts() else {
        return Err(internal("the PEER path on another bank"));
    };
    let routing = saved
        .routing
        .as_ref()
        .ok_or_else(|| internal("no saved plan"))?;
    let (t, d) = (saved.t, saved.d);
    if ws.h.len() != ws.token_slots.len() || ws.token_offsets.len() != t + 1 {
        return Err(internal(
            "the PEER workspace does not hold the training forward",
        ));
    }
    let mut rows = std::mem::take(&mut ws.rows);
    let dy = rows_of(d_output, &mut rows);
    let x = saved.hidden();
    let (u, v) = weights(b);
    let mut d_input = Array2::<f32>::zeros((t, d));
    let di = d_input
        .as_slice_mut()
        .ok_or_else(|| internal("d_input not contiguous"))?;
    let scale = layer.output_scale();
    if d > 0 {
        token_pass((&u, &v), d, dy, routing.slot_weights(), scale, ws, di);
    }
    let grads = expert_pass(routing, x, dy, d, ws);
    ws.rows = rows;
    let (du, dv) = grads?;
    let d_weights: Vec<f32> = ws.position.iter().map(|&p| ws.dw[p]).collect();
    let expert_grads = BankGrads::Peer {
        shape: [b.u().nrows(), d],
        rows: routing.active_experts().to_vec(),
        du,
        dv,
    }
    .into_grads();
    let input = saved.input()?;
    let shared_grads = match layer.shared() {
        Some(shared) => shared_reference(shared, input.hidden, d_output, &mut d_input)?,
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
