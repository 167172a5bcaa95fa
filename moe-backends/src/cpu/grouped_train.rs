//! Training on the grouped path, per bank: the training forward keeps each row's pre-activations `P`, hidden `H`
//! and output `Y` beside the gathered inputs `X`; the backward runs, per expert over its contiguous rows,
//! `dW2 = dYᵀ · H` (+ bias), `dH = dY · W2`, the activation's backward row by row (`P` becomes `dP` in place),
//! `dW1 = dPᵀ · X` (+ bias) and `dX = dP · W1` (written over `Y`). The row products run on the forward's kernels
//! ([`Tile::matmul`]); the weight gradients on the `gemm` crate with transposed operands
//! ([`Tile::matmul_strided`]), threads over tiles of (expert, column block). Every gradient value is computed by
//! one kernel call in a fixed reduction order, and bias sums run in ascending row order on one thread, so gradients
//! are bit-identical on any number of threads.

use rayon::prelude::*;

use moe_core::{ExpertBank, MoeError};

use super::activation::{Act, backward_row, hidden_row};
use super::backward_ref::BankGrads;
use super::grouped::{
    AlignedBuf, block_cols, down_phase, expert_weights, reserve_tiles, tile_rows, unsupported,
    widest,
};
use super::internal;
use super::kernels::{Kernels, Strided, Weights, par_tiles};

/// Columns per tile of the weight gradients.
const GRAD_BLOCK: usize = 256;

/// One bank's training buffers (grown on demand, reused across steps).
#[derive(Debug, Default)]
pub(crate) struct BankBufs {
    /// Gathered input rows `[rows, d]` (routed experts; the shared bank reads the kept input).
    pub x: AlignedBuf,
    /// Pre-activations `[rows, 2f]` or `[rows, f]`; `dP` after the backward.
    pub p: AlignedBuf,
    /// Hidden rows `[rows, f]`; `dH` after the backward.
    pub h: AlignedBuf,
    /// Expert outputs `[rows, d]`; `dX` after the backward.
    pub y: AlignedBuf,
    /// Output gradients `[rows, d]`.
    pub dy: AlignedBuf,
}

/// The per-expert index of the weight-gradient tiles: row offsets `[0, a, 2a, ..]` and each expert's group.
#[derive(Debug, Default)]
pub(crate) struct GradIndex {
    rows: Vec<usize>,
    group_of: Vec<usize>,
}

impl GradIndex {
    fn build(&mut self, n_experts: usize, experts: &[u32]) {
        self.group_of.clear();
        self.group_of.resize(n_experts, usize::MAX);
        for (g, &e) in experts.iter().enumerate() {
            if let Some(slot) = self.group_of.get_mut(e as usize) {
                *slot = g;
            }
        }
    }

    fn offsets(&mut self, n: usize, a: usize) -> &[usize] {
        self.rows.clear();
        self.rows.extend((0..=n).map(|e| e * a));
        &self.rows
    }
}

/// The first product's weights and bias of expert `e` (`P = X · W1ᵀ + b1`).
fn first_weights(
    bank: &ExpertBank,
    e: usize,
) -> Result<(Weights<'_>, Option<ndarray::ArrayView1<'_, f32>>), MoeError> {
    let (d, f) = (bank.d_model(), bank.ffn());
    Ok(match bank {
        ExpertBank::SwiGlu(b) => (expert_weights(b.gate_up(), e, d, 1)?, None),
        ExpertBank::GptOss(b) => (
            expert_weights(b.gate_up(), e, 1, 2 * f)?,
            Some(b.gate_up_bias().row(e)),
        ),
        ExpertBank::Mlp(b) => (expert_weights(b.w1(), e, d, 1)?, b.b1().map(|b1| b1.row(e))),
        _ => return Err(unsupported(bank)),
    })
}

/// The training forward of `bank`'s experts `experts[g]` on rows `x[offsets[g]..offsets[g + 1]]`: writes `p`, `h`
/// and `y` (sized here). `max_rows` is the largest group of the whole plan these groups belong to (at least the
/// largest of them, [`super::grouped::widest`] for a whole plan): it picks the tiles' column blocks, as in
/// `grouped::run_groups`, so a plan run in parts gives every row the values of one call over the whole plan.
///
/// # Errors
/// [`MoeError::Backend`] for a bank kind this path does not run or inconsistent buffers (a group larger than
/// `max_rows`).
pub(crate) fn train_bank(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    x: &[f32],
    p: &mut AlignedBuf,
    h: &mut AlignedBuf,
    y: &mut AlignedBuf,
    max_rows: usize,
    kernels: Kernels,
) -> Result<(), MoeError> {
    let act = Act::of(bank).ok_or_else(|| unsupported(bank))?;
    let (d, f) = (bank.d_model(), bank.ffn());
    let pw = act.width(f);
    let rows = offsets.last().copied().unwrap_or(0);
    if experts.len() + 1 != offsets.len() || x.len() < rows * d || widest(offsets) > max_rows {
        return Err(internal("grouped training: inconsistent groups or buffers"));
    }
    let (p, h, y) = (
        p.get_mut(rows * pw),
        h.get_mut(rows * f),
        y.get_mut(rows * d),
    );
    if rows == 0 {
        return Ok(());
    }
    let max_rows = tile_rows(max_rows, widest(offsets));
    reserve_tiles(max_rows);
    par_tiles(
        p,
        pw,
        offsets,
        pw,
        block_cols(max_rows, true),
        |g, col0, mut tile| {
            let (w, bias) = first_weights(bank, experts[g] as usize)?;
            let a = &x[offsets[g] * d..offsets[g + 1] * d];
            tile.matmul(a, d, d, w, col0, kernels)?;
            if let Some(b) = bias {
                for i in 0..tile.rows() {
                    for (j, v) in tile.row_mut(i).iter_mut().enumerate() {
                        *v += b[col0 + j];
                    }
                }
            }
            Ok(())
        },
    )?;
    h.par_chunks_mut(f)
        .zip(p.par_chunks(pw))
        .for_each(|(hr, pr)| hidden_row(act, pr, hr));
    down_phase(bank, experts, offsets, h, y, max_rows, kernels)
}

/// The training buffers of one backward of a bank, sized `[rows, ·]`.
pub(crate) struct Rows<'a> {
    /// Inputs `[rows, d]`.
    pub x: &'a [f32],
    /// Pre-activations, become `dP`.
    pub p: &'a mut [f32],
    /// Hidden rows, become `dH`.
    pub h: &'a mut [f32],
    /// Outputs, become `dX`.
    pub y: &'a mut [f32],
    /// Output gradients `[rows, d]`.
    pub dy: &'a [f32],
}

/// The backward of [`train_bank`] for output gradients `dy` (`[rows, d]`, already scaled by the combine): fills
/// `grads` (every expert of the bank; experts without rows get zeros) and leaves `dX` in `buf.y`. `max_rows` as
/// for [`train_bank`] (the same value the training forward had).
///
/// # Errors
/// [`MoeError::Backend`] for a bank kind this path does not run, inconsistent buffers or gradients (a group
/// larger than `max_rows`).
pub(crate) fn backward_bank(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    buf: Rows<'_>,
    grads: &mut BankGrads,
    index: &mut GradIndex,
    max_rows: usize,
    kernels: Kernels,
) -> Result<(), MoeError> {
    let act = Act::of(bank).ok_or_else(|| unsupported(bank))?;
    let (d, f, n_experts) = (bank.d_model(), bank.ffn(), bank.n_experts());
    let pw = act.width(f);
    let rows = offsets.last().copied().unwrap_or(0);
    let Rows { x, p, h, y, dy } = buf;
    if experts.len() + 1 != offsets.len()
        || x.len() < rows * d
        || p.len() < rows * pw
        || h.len() < rows * f
        || y.len() < rows * d
        || dy.len() < rows * d
        || widest(offsets) > max_rows
    {
        return Err(internal("grouped backward: inconsistent groups or buffers"));
    }
    let BankGrads::Dense { w1, b1, w2, b2, .. } = grads else {
        return Err(internal("grouped backward: gradients of another bank kind"));
    };
    index.build(n_experts, experts);
    let gpt = matches!(bank, ExpertBank::GptOss(_));
    // dW2 (+ db2) from dY and H.
    let mut g2 = Grad2 { offsets, index };
    if gpt {
        g2.weights(slice(w2)?, f, d, (h, f), (dy, d))?;
    } else {
        g2.weights(slice(w2)?, d, f, (dy, d), (h, f))?;
    }
    if let Some(b2) = b2 {
        g2.bias(b2, dy, d)?;
    }
    if rows == 0 {
        return zero_first(w1, b1);
    }
    let max_rows = tile_rows(max_rows, widest(offsets));
    reserve_tiles(max_rows);
    // dH = dY · W2, over H.
    par_tiles(
        h,
        f,
        offsets,
        f,
        block_cols(max_rows, true),
        |g, col0, mut tile| {
            let e = experts[g] as usize;
            let w = match bank {
                ExpertBank::SwiGlu(b) => expert_weights(b.down(), e, 1, f)?,
                ExpertBank::Mlp(b) => expert_weights(b.w2(), e, 1, f)?,
                ExpertBank::GptOss(b) => expert_weights(b.down(), e, d, 1)?,
                _ => return Err(unsupported(bank)),
            };
            tile.matmul(
                &dy[offsets[g] * d..offsets[g + 1] * d],
                d,
                d,
                w,
                col0,
                kernels,
            )
        },
    )?;
    // The activation: P becomes dP.
    p[..rows * pw]
        .par_chunks_mut(pw)
        .zip(h[..rows * f].par_chunks(f))
        .for_each(|(pr, dhr)| backward_row(act, pr, dhr));
    let p: &[f32] = p;
    // dW1 (+ db1) from dP and X.
    if gpt {
        g2.weights(slice(w1)?, d, pw, (x, d), (p, pw))?;
    } else {
        g2.weights(slice(w1)?, pw, d, (p, pw), (x, d))?;
    }
    if let Some(b1) = b1 {
        g2.bias(b1, p, pw)?;
    }
    // dX = dP · W1, over Y.
    par_tiles(
        y,
        d,
        offsets,
        d,
        block_cols(max_rows, false),
        |g, col0, mut tile| {
            let e = experts[g] as usize;
            let w = match bank {
                ExpertBank::SwiGlu(b) => expert_weights(b.gate_up(), e, 1, d)?,
                ExpertBank::Mlp(b) => expert_weights(b.w1(), e, 1, d)?,
                ExpertBank::GptOss(b) => expert_weights(b.gate_up(), e, pw, 1)?,
                _ => return Err(unsupported(bank)),
            };
            tile.matmul(
                &p[offsets[g] * pw..offsets[g + 1] * pw],
                pw,
                pw,
                w,
                col0,
                kernels,
            )
        },
    )
}

/// The values of a gradient tensor, row-major.
fn slice(a: &mut ndarray::Array3<f32>) -> Result<&mut [f32], MoeError> {
    a.as_slice_mut()
        .ok_or_else(|| internal("gradient buffer is not contiguous"))
}

/// Zero first-layer gradients (a batch without rows).
fn zero_first(
    w1: &mut ndarray::Array3<f32>,
    b1: &mut Option<ndarray::Array2<f32>>,
) -> Result<(), MoeError> {
    w1.fill(0.0);
    if let Some(b) = b1 {
        b.fill(0.0);
    }
    Ok(())
}

/// Weight and bias gradients over the groups `offsets`.
struct Grad2<'a> {
    offsets: &'a [usize],
    index: &'a mut GradIndex,
}

impl Grad2<'_> {
    /// `out[e] = Σ_i left[i, ·]ᵀ right[i, ·]` over expert `e`'s rows (`[a, b]` per expert; `left` rows of width
    /// `a`, `right` of width `b`), zeros for experts without rows; tiles of (expert, column block).
    fn weights(
        &mut self,
        out: &mut [f32],
        a: usize,
        b: usize,
        left: (&[f32], usize),
        right: (&[f32], usize),
    ) -> Result<(), MoeError> {
        let offsets = self.offsets;
        let index = &mut *self.index;
        let group_of = std::mem::take(&mut index.group_of);
        let result = par_tiles(
            out,
            b,
            index.offsets(group_of.len(), a),
            b,
            GRAD_BLOCK,
            |e, col0, mut tile| {
                let Some(&g) = group_of.get(e).filter(|&&g| g != usize::MAX) else {
                    return tile.matmul_strided(
                        Strided {
                            data: &[],
                            rs: 1,
                            cs: 1,
                        },
                        0,
                        Weights {
                            data: &[],
                            col_stride: 1,
                            k_stride: 1,
                        },
                        col0,
                    );
                };
                let (r0, r1) = (offsets[g], offsets[g + 1]);
                tile.matmul_strided(
                    Strided {
                        data: &left.0[r0 * left.1..r1 * left.1],
                        rs: 1,
                        cs: left.1,
                    },
                    r1 - r0,
                    Weights {
                        data: &right.0[r0 * right.1..r1 * right.1],
                        col_stride: 1,
                        k_stride: right.1,
                    },
                    col0,
                )
            },
        );
        index.group_of = group_of;
        result
    }

    /// `out[e] = Σ_i m[i, ·]` over expert `e`'s rows, ascending (`m` rows of width `w`), zeros for experts
    /// without rows.
    fn bias(&self, out: &mut ndarray::Array2<f32>, m: &[f32], w: usize) -> Result<(), MoeError> {
        let (offsets, group_of) = (self.offsets, &self.index.group_of);
        let buf = out
            .as_slice_mut()
            .ok_or_else(|| internal("bias gradient is not contiguous"))?;
        buf.par_chunks_mut(w).enumerate().for_each(|(e, row)| {
            row.fill(0.0);
            if let Some(&g) = group_of.get(e).filter(|&&g| g != usize::MAX) {
                for r in m[offsets[g] * w..offsets[g + 1] * w].chunks_exact(w) {
                    row.iter_mut().zip(r).for_each(|(o, &v)| *o += v);
                }
            }
        });
        Ok(())
    }
}
