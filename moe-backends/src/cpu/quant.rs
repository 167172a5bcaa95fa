//! The grouped path's tiles for packed banks ([`moe_core::ExpertBank::Packed`]): the same two phases, tiles and
//! epilogues as the f32 banks of `cpu/grouped.rs`, with each product reading packed weight rows through
//! [`Tile::matmul_packed`] (decoded inside the product, never as a whole dequantised matrix).
//!
//! Every decoded weight equals [`moe_core::quant::ExpertMatrix::decode_row`] bit for bit and the reduction order
//! is the f32 kernels' own, so a packed bank's output is bit-identical to the f32 canonical-layout bank holding
//! its decoded weights, on any thread count (tests/packed_path.rs).

use moe_core::MoeError;
use moe_core::quant::{PackedBank, PackedFamily};

use super::grouped::{gpt_oss_epilogue, mlp_epilogue, swiglu_epilogue, with_scratch};
use super::kernels::{Kernels, Tile};

/// One tile of phase 1 for a packed bank: hidden columns `col0..col0 + width` of expert `e` on rows `a`
/// (`[rows, d]`).
pub(super) fn hidden_tile(
    b: &PackedBank,
    e: usize,
    a: &[f32],
    d: usize,
    f: usize,
    col0: usize,
    tile: &mut Tile<'_>,
    kernels: Kernels,
) -> Result<(), MoeError> {
    let rows = tile.rows();
    let w = tile.width();
    let up = b.up().expert(e);
    let bias = b.up_bias().map(|bb| bb.row(e));
    match b.family() {
        PackedFamily::Mlp { act } => {
            tile.matmul_packed(a, d, d, up, col0, kernels)?;
            mlp_epilogue(tile, act, bias, col0);
            Ok(())
        }
        PackedFamily::SwiGlu { act } => with_scratch(rows * 2 * w, |s| {
            // Gate rows col0.. to s[:, ..w], up rows f + col0.. to s[:, w..].
            Tile::from_slice(s, rows, w, 2 * w)?.matmul_packed(a, d, d, up, col0, kernels)?;
            Tile::from_slice(&mut s[w..], rows, w, 2 * w)?.matmul_packed(
                a,
                d,
                d,
                up,
                f + col0,
                kernels,
            )?;
            swiglu_epilogue(tile, s, act);
            Ok(())
        }),
        PackedFamily::GptOss { alpha, limit } => {
            let bias = bias.ok_or_else(|| missing("up bias"))?;
            with_scratch(rows * 2 * w, |s| {
                // Interleaved rows 2·col0..: (gate, up) pairs, as the f32 bank's product columns.
                Tile::from_slice(s, rows, 2 * w, 2 * w)?.matmul_packed(
                    a,
                    d,
                    d,
                    up,
                    2 * col0,
                    kernels,
                )?;
                gpt_oss_epilogue(tile, s, bias, col0, alpha, limit);
                Ok(())
            })
        }
    }
}

/// One tile of phase 2 for a packed bank: output columns `col0..col0 + width` of expert `e` on hidden rows `a`
/// (`[rows, f]`), plus the down bias where the bank has one.
pub(super) fn down_tile(
    b: &PackedBank,
    e: usize,
    a: &[f32],
    f: usize,
    col0: usize,
    tile: &mut Tile<'_>,
    kernels: Kernels,
) -> Result<(), MoeError> {
    tile.matmul_packed(a, f, f, b.down().expert(e), col0, kernels)?;
    if let Some(bias) = b.down_bias() {
        let bias = bias.row(e);
        for i in 0..tile.rows() {
            for (j, v) in tile.row_mut(i).iter_mut().enumerate() {
                *v += bias[col0 + j];
            }
        }
    }
    Ok(())
}

fn missing(what: &str) -> MoeError {
    MoeError::Backend {
        backend: "cpu".into(),
        reason: format!("packed GPT-OSS bank without its {what}"),
    }
}
