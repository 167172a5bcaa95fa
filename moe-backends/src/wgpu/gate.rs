//! Gate projections: the router's logits (`x · gateᵀ + bias`, a one-expert grouped product over every token) and
//! the shared experts' sigmoid gate (`shared_gate`).

use ::wgpu as wg;

use super::device::{BM, BN};
use super::execute::Encoder;
use super::params::{GemmParams, SharedGateParams};
use super::sort::Rows;

/// Enqueues `logits [T, E] = x · gateᵀ (+ gate_bias)` (`gate`: `[E, d]` row-major, the canonical layout).
pub(super) fn gate_projection(
    enc: &mut Encoder<'_>,
    x: &wg::Buffer,
    all_rows: &Rows,
    gate: &wg::Buffer,
    gate_bias: Option<&wg::Buffer>,
    logits: &wg::Buffer,
    e: usize,
    d: usize,
) {
    let params = GemmParams {
        n: e as u32,
        k: d as u32,
        e0: 0,
        e1: 1,
        w_stride: (e * d) as u32,
        n_experts: 1,
        has_bias: u32::from(gate_bias.is_some()),
        b_stride: e as u32,
        ..GemmParams::default()
    };
    let (gy, gz) = enc.grid((all_rows.max_rows as u32).div_ceil(BM) + 1);
    let bufs = vec![
        (1, x.clone()),
        (2, enc.dummy.clone()),
        (3, all_rows.meta.clone()),
        (4, gate.clone()),
        (5, gate_bias.unwrap_or(&enc.dummy).clone()),
        (6, logits.clone()),
    ];
    let p = enc.pipes();
    enc.push(
        &p.gemm_single,
        &params,
        bufs,
        ((e as u32).div_ceil(BN), gy, gz),
    );
}

/// Enqueues `out[t] = sigmoid(x[t] · g)` for the `t` tokens of width `d`.
pub(super) fn shared_gate(
    enc: &mut Encoder<'_>,
    x: &wg::Buffer,
    g: &wg::Buffer,
    out: &wg::Buffer,
    t: usize,
    d: usize,
) {
    let params = SharedGateParams {
        t: t as u32,
        d: d as u32,
    };
    let (gx, gy) = enc.grid((t as u32).div_ceil(64));
    let p = enc.pipes();
    enc.push(
        &p.shared_gate,
        &params,
        vec![(1, x.clone()), (2, g.clone()), (3, out.clone())],
        (gx, gy, 1),
    );
}
