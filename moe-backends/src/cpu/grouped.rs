//! The fast grouped expert path: for a bank and a set of row groups (one expert each, contiguous rows), the first
//! product and the activation (fused per tile), then the second product, each phase in parallel over tiles of
//! (group, column block). Workspaces live in [`Workspace`] and are reused, so a steady state allocates nothing here.
//!
//! Which tile computes which output values depends only on the shapes, never on the thread count, and every value
//! is computed by one kernel call in a fixed reduction order: results are bit-identical on any number of threads.

use std::cell::RefCell;

use moe_core::{ExpertBank, MoeError};

use super::experts::activate;
use super::kernels::{Kernels, MAX_BLOCK, SMALL_ROWS, Tile, Weights, par_tiles, reserve_scratch};

/// Reusable buffers of the CPU backend (grown on demand, never shrunk).
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    /// Gathered input rows `[rows, d]`.
    pub x: AlignedBuf,
    /// Activated hidden rows `[rows, f]`.
    pub h: AlignedBuf,
    /// Expert outputs `[rows, d]`.
    pub y: AlignedBuf,
    /// Token-major slot index (offsets, slots).
    pub token_offsets: Vec<usize>,
    /// See `token_offsets`.
    pub token_slots: Vec<usize>,
}

/// `&mut v[..len]`, growing `v` only when it is too short (no clearing: callers overwrite what they read).
pub(crate) fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Values per cache line: workspaces start on a 64-byte boundary, so rows of a width that is a multiple of 16
/// values start on one too and the SIMD kernel's loads do not split cache lines.
const ALIGN: usize = 16;

/// A growable f32 buffer whose data starts on a 64-byte boundary.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf(Vec<f32>);

impl AlignedBuf {
    fn offset(&self) -> usize {
        (ALIGN - (self.0.as_ptr() as usize / std::mem::size_of::<f32>()) % ALIGN) % ALIGN
    }

    /// The first `len` values, growing the buffer (never shrinking) when it is too short; contents are whatever
    /// the last use left.
    pub(crate) fn get_mut(&mut self, len: usize) -> &mut [f32] {
        if self.0.len() < len + ALIGN {
            self.0.resize(len + ALIGN, 0.0);
        }
        let off = self.offset();
        &mut self.0[off..off + len]
    }

    /// The first `len` values (as last written through [`AlignedBuf::get_mut`]).
    pub(crate) fn get(&self, len: usize) -> &[f32] {
        let off = self.offset();
        self.0.get(off..off + len).unwrap_or(&[])
    }
}

thread_local! {
    /// Per-thread scratch for pre-activations of one tile (rayon's workers persist, so this is allocated once).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Columns per tile for the first (`hidden`) or second (`out`) product, from the largest group's row count.
pub(super) fn block_cols(max_rows: usize, hidden: bool) -> usize {
    match (max_rows <= SMALL_ROWS, max_rows <= 256, hidden) {
        (true, _, true) => 192,
        (true, _, false) => 96,
        (false, true, true) => 768,
        (false, true, false) => 512,
        (false, false, true) => MAX_BLOCK,
        (false, false, false) => 512,
    }
}

/// The row count of the largest of the groups `offsets` (`[groups + 1]` row offsets; 0 without groups).
pub(super) fn widest(offsets: &[usize]) -> usize {
    offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// The smallest row count at least `widest` whose tiles are those of a plan whose largest group has `max_rows`
/// rows (`widest <= max_rows`): the same [`block_cols`] (rows up to [`SMALL_ROWS`], up to 256, more), so a
/// caller's plan-wide `max_rows`, however large, never sizes scratch beyond the rows it runs.
pub(super) fn tile_rows(max_rows: usize, widest: usize) -> usize {
    let floor = if max_rows <= SMALL_ROWS {
        0
    } else if max_rows <= 256 {
        SMALL_ROWS + 1
    } else {
        257
    };
    widest.max(floor).min(max_rows)
}

/// Grows every pool thread's scratch to the largest tile of a call whose largest group has `max_rows` rows, first:
/// which thread runs which tile then never decides whether a later call allocates.
pub(super) fn reserve_tiles(max_rows: usize) {
    let reserve = max_rows * 2 * block_cols(max_rows, true);
    let widest = block_cols(max_rows, true).max(block_cols(max_rows, false));
    rayon::broadcast(|_| {
        SCRATCH.with(|cell| {
            let mut v = cell.borrow_mut();
            if v.len() < reserve {
                v.resize(reserve, 0.0);
            }
        });
        // GPT-OSS's first product is 2 * block wide.
        reserve_scratch(max_rows, 2 * widest);
    });
}

/// Whether [`run_bank`] runs this bank (SwiGLU, GPT-OSS and MLP banks with weights in standard layout, packed
/// banks); others
/// take the reference path.
pub(crate) fn supports(bank: &ExpertBank) -> bool {
    match bank {
        ExpertBank::SwiGlu(b) => b.gate_up().is_standard_layout() && b.down().is_standard_layout(),
        ExpertBank::GptOss(b) => b.gate_up().is_standard_layout() && b.down().is_standard_layout(),
        ExpertBank::Mlp(b) => b.w1().is_standard_layout() && b.w2().is_standard_layout(),
        ExpertBank::Packed(_) => true,
        _ => false,
    }
}

/// Runs `bank`'s experts `experts[g]` on rows `x[offsets[g]..offsets[g + 1]]` (`[rows, d]`), writing `y`
/// (`[rows, d]`). `h` is the hidden workspace; `kernels` the products' kernels.
///
/// # Errors
/// [`MoeError::Backend`] for a bank kind this path does not run or inconsistent buffers.
pub(crate) fn run_bank(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    x: &[f32],
    h: &mut AlignedBuf,
    y: &mut [f32],
    kernels: Kernels,
) -> Result<(), MoeError> {
    run_groups(bank, experts, offsets, x, h, y, widest(offsets), kernels)
}

/// [`run_bank`] with the tiles' column blocks picked for a largest group of `max_rows` rows (at least the largest
/// of these groups) instead of these groups' own largest: a plan run a few groups at a time (an expert store's
/// slots) then tiles every group exactly as one call over the whole plan does, so its values are bit-identical.
///
/// # Errors
/// As [`run_bank`]; [`MoeError::Backend`] when a group has more than `max_rows` rows.
#[allow(
    clippy::too_many_arguments,
    reason = "run_bank's buffers plus the plan-wide tile shape; a struct would only rename them"
)]
pub(crate) fn run_groups(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    x: &[f32],
    h: &mut AlignedBuf,
    y: &mut [f32],
    max_rows: usize,
    kernels: Kernels,
) -> Result<(), MoeError> {
    let d = bank.d_model();
    let f = bank.ffn();
    let rows = offsets.last().copied().unwrap_or(0);
    if rows == 0 {
        return Ok(());
    }
    let largest = widest(offsets);
    if experts.len() + 1 != offsets.len()
        || x.len() < rows * d
        || y.len() < rows * d
        || largest > max_rows
    {
        return Err(MoeError::Backend {
            backend: "cpu".into(),
            reason: "grouped path: inconsistent groups or buffers".into(),
        });
    }
    let h = h.get_mut(rows * f);
    let max_rows = tile_rows(max_rows, largest);
    reserve_tiles(max_rows);
    // Phase 1: h = act(first product), tile by tile.
    par_tiles(
        h,
        f,
        offsets,
        f,
        block_cols(max_rows, true),
        |g, col0, mut tile| {
            let e = experts[g] as usize;
            let a = &x[offsets[g] * d..offsets[g + 1] * d];
            hidden_tile(bank, e, a, d, f, col0, &mut tile, kernels)
        },
    )?;
    // Phase 2: y = h · second product (+ bias).
    down_phase(bank, experts, offsets, h, y, max_rows, kernels)
}

/// The second product of the grouped path: `y = h · W2ᵀ (+ bias)` for rows `h` (`[rows, f]`) grouped as in
/// [`run_bank`], writing `y` (`[rows, d]`); `max_rows` is the largest group (it picks the column blocks).
///
/// # Errors
/// [`MoeError::Backend`] for a bank kind this path does not run or inconsistent buffers.
pub(super) fn down_phase(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    h: &[f32],
    y: &mut [f32],
    max_rows: usize,
    kernels: Kernels,
) -> Result<(), MoeError> {
    let d = bank.d_model();
    let f = bank.ffn();
    par_tiles(
        y,
        d,
        offsets,
        d,
        block_cols(max_rows, false),
        |g, col0, mut tile| {
            let e = experts[g] as usize;
            let a = &h[offsets[g] * f..offsets[g + 1] * f];
            if let ExpertBank::Packed(b) = bank {
                return super::quant::down_tile(b, e, a, f, col0, &mut tile, kernels);
            }
            let (w, bias) = match bank {
                ExpertBank::SwiGlu(b) => (expert_weights(b.down(), e, f, 1)?, None),
                ExpertBank::Mlp(b) => (expert_weights(b.w2(), e, f, 1)?, b.b2()),
                ExpertBank::GptOss(b) => (expert_weights(b.down(), e, 1, d)?, Some(b.down_bias())),
                _ => return Err(unsupported(bank)),
            };
            tile.matmul(a, f, f, w, col0, kernels)?;
            if let Some(bias) = bias {
                let b = bias.row(e);
                for i in 0..tile.rows() {
                    for (j, v) in tile.row_mut(i).iter_mut().enumerate() {
                        *v += b[col0 + j];
                    }
                }
            }
            Ok(())
        },
    )
}

/// One tile of phase 1: hidden columns `col0..col0 + width` of expert `e` on rows `a` (`[rows, d]`).
fn hidden_tile(
    bank: &ExpertBank,
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
    match bank {
        ExpertBank::Packed(b) => super::quant::hidden_tile(b, e, a, d, f, col0, tile, kernels),
        ExpertBank::Mlp(b) => {
            tile.matmul(a, d, d, expert_weights(b.w1(), e, d, 1)?, col0, kernels)?;
            mlp_epilogue(tile, b.act(), b.b1().map(|b1| b1.row(e)), col0);
            Ok(())
        }
        ExpertBank::SwiGlu(b) => {
            let gu = expert_weights(b.gate_up(), e, d, 1)?;
            with_scratch(rows * 2 * w, |s| {
                // Gate columns to s[:, ..w], up columns (f further on in gate_up) to s[:, w..].
                Tile::from_slice(s, rows, w, 2 * w)?.matmul(a, d, d, gu, col0, kernels)?;
                Tile::from_slice(&mut s[w..], rows, w, 2 * w)?.matmul(
                    a,
                    d,
                    d,
                    gu,
                    f + col0,
                    kernels,
                )?;
                swiglu_epilogue(tile, s, b.act());
                Ok(())
            })
        }
        ExpertBank::GptOss(b) => {
            // gate_up [E, d, 2f] applied as x · W: interleaved (gate, up) pairs, columns 2·col0.. of the product.
            let gu = expert_weights(b.gate_up(), e, 1, 2 * f)?;
            let bias = b.gate_up_bias().row(e);
            with_scratch(rows * 2 * w, |s| {
                Tile::from_slice(s, rows, 2 * w, 2 * w)?.matmul(a, d, d, gu, 2 * col0, kernels)?;
                gpt_oss_epilogue(tile, s, bias, col0, b.alpha(), b.limit());
                Ok(())
            })
        }
        _ => Err(unsupported(bank)),
    }
}

/// The MLP epilogue on a tile of first-product values: `act(v + b₁[col0 + j])` (no bias: `act(v)`).
pub(super) fn mlp_epilogue(
    tile: &mut Tile<'_>,
    act: moe_core::Activation,
    bias: Option<ndarray::ArrayView1<'_, f32>>,
    col0: usize,
) {
    for i in 0..tile.rows() {
        for (j, v) in tile.row_mut(i).iter_mut().enumerate() {
            let z = bias.as_ref().map_or(*v, |bb| *v + bb[col0 + j]);
            *v = activate(act, z);
        }
    }
}

/// The SwiGLU epilogue: `tile[i, j] = act(g) · u` from the scratch `s` (`[rows, 2w]`: gate columns, then up).
pub(super) fn swiglu_epilogue(tile: &mut Tile<'_>, s: &[f32], act: moe_core::Activation) {
    let w = tile.width();
    for i in 0..tile.rows() {
        let (g, u) = s[i * 2 * w..(i + 1) * 2 * w].split_at(w);
        for ((hv, &gv), &uv) in tile.row_mut(i).iter_mut().zip(g).zip(u) {
            *hv = activate(act, gv) * uv;
        }
    }
}

/// The GPT-OSS epilogue (transformers' `GptOssExperts`): from the scratch `s` (`[rows, 2w]`, interleaved (gate,
/// up) pairs of columns `col0..`) and the interleaved bias `[2f]`, `(clamp(u + b_u, ±limit) + 1) · glu(min(g +
/// b_g, limit))` with `glu(g) = g · σ(alpha · g)`.
pub(super) fn gpt_oss_epilogue(
    tile: &mut Tile<'_>,
    s: &[f32],
    bias: ndarray::ArrayView1<'_, f32>,
    col0: usize,
    alpha: f32,
    limit: f32,
) {
    let w = tile.width();
    for i in 0..tile.rows() {
        let z = &s[i * 2 * w..(i + 1) * 2 * w];
        for (j, hv) in tile.row_mut(i).iter_mut().enumerate() {
            let g = (z[2 * j] + bias[2 * (col0 + j)]).min(limit);
            let u = (z[2 * j + 1] + bias[2 * (col0 + j) + 1]).clamp(-limit, limit);
            let glu = g / (1.0 + (-(g * alpha)).exp());
            *hv = (u + 1.0) * glu;
        }
    }
}

/// Expert `e` of a 3-D weight tensor as a [`Weights`] operand with the given strides.
pub(super) fn expert_weights(
    t: &ndarray::Array3<f32>,
    e: usize,
    col_stride: usize,
    k_stride: usize,
) -> Result<Weights<'_>, MoeError> {
    let all = t.as_slice().ok_or_else(|| MoeError::Backend {
        backend: "cpu".into(),
        reason: "expert weights are not in standard layout".into(),
    })?;
    let per = t.dim().1 * t.dim().2;
    let data = all.get(e * per..(e + 1) * per).ok_or(MoeError::Expert {
        expert: e,
        reason: format!("the bank has {} experts", t.dim().0),
    })?;
    Ok(Weights {
        data,
        col_stride,
        k_stride,
    })
}

/// Runs `f` on this thread's scratch of `len` values (grown beforehand by `run_bank`).
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut v = cell.borrow_mut();
        f(grow(&mut v, len))
    })
}

pub(super) fn unsupported(bank: &ExpertBank) -> MoeError {
    MoeError::Backend {
        backend: "cpu".into(),
        reason: format!("the grouped path does not run {} banks", bank.kind()),
    }
}
