//! The grouped expert products of one bank over a row plan: the first product (`gemm_single`, or `gemm_dual` with
//! SwiGLU / GPT-OSS gating fused into its epilogue) into the hidden rows, then the down product into the output
//! rows, one dispatch per weight chunk.

use ::wgpu as wg;

use super::device::{BM, BN};
use super::execute::Encoder;
use super::params::GemmParams;
use super::sort::Rows;
use super::upload::{Chunk, DeviceBank};
use crate::packed::MODE_SINGLE;

/// Enqueues both products of `bank` over `rows` (`a`: input rows `[T, d]`, gathered through `rows.slot_token`
/// when `gather`): `h = act(a · W₁ᵀ)` (fused gating), `out = h · W₂ᵀ + b₂`.
pub(super) fn bank_products(
    enc: &mut Encoder<'_>,
    bank: &DeviceBank,
    rows: &Rows,
    gather: bool,
    a: &wg::Buffer,
    h: &wg::Buffer,
    out: &wg::Buffer,
) {
    let (d, f) = (bank.d as u32, bank.f as u32);
    let up = GemmParams {
        n: f,
        k: d,
        w_stride: bank.up_stride as u32,
        n_experts: bank.n_experts as u32,
        act: bank.act,
        mode: bank.mode,
        has_bias: u32::from(bank.up_bias.is_some()),
        b_stride: if bank.mode == MODE_SINGLE { f } else { 2 * f },
        gather: u32::from(gather),
        alpha: bank.alpha,
        limit: bank.limit,
        ..GemmParams::default()
    };
    let p = enc.pipes();
    let pipe = if bank.mode == MODE_SINGLE {
        &p.gemm_single
    } else {
        &p.gemm_dual
    };
    let io = (a, h);
    for c in &bank.up {
        product(enc, pipe, up, c, rows, io, bank.up_bias.as_ref());
    }
    // Down products read the h rows in place (no gather).
    let down = GemmParams {
        n: d,
        k: f,
        w_stride: bank.down_stride as u32,
        n_experts: bank.n_experts as u32,
        has_bias: u32::from(bank.down_bias.is_some()),
        b_stride: d,
        ..GemmParams::default()
    };
    for c in &bank.down {
        product(
            enc,
            &p.gemm_single,
            down,
            c,
            rows,
            (h, out),
            bank.down_bias.as_ref(),
        );
    }
}

/// Enqueues one product over the experts of `chunk` (`io`: input and output rows).
fn product<'a>(
    enc: &mut Encoder<'a>,
    pipe: &'a wg::ComputePipeline,
    params: GemmParams,
    chunk: &Chunk,
    rows: &Rows,
    io: (&wg::Buffer, &wg::Buffer),
    bias: Option<&wg::Buffer>,
) {
    let params = GemmParams {
        e0: chunk.e0,
        e1: chunk.e1,
        ..params
    };
    let tiles = (rows.max_rows as u32).div_ceil(BM) + (chunk.e1 - chunk.e0);
    let (gy, gz) = enc.grid(tiles);
    let bufs = vec![
        (1, io.0.clone()),
        (2, rows.slot_token.clone()),
        (3, rows.meta.clone()),
        (4, chunk.buf.clone()),
        (5, bias.unwrap_or(&enc.dummy).clone()),
        (6, io.1.clone()),
    ];
    enc.push(pipe, &params, bufs, (params.n.div_ceil(BN), gy, gz));
}
