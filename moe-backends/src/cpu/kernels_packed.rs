//! Products whose weights are packed rows (`moe_core::quant`), and the SIMD dot-kernel dispatch shared with f32.
//!
//! Up to [`direct_rows`] rows (16 for 16-bit formats, 4 for int8, FP8 and MXFP4), the dot kernel (AVX-512 or AVX2) decodes each weight vector in registers inside
//! the product: the weights stream from memory once, at their packed size. With more rows (or without those
//! kernels, or for a layout they cannot read) a tile's weight rows are first decoded into a per-thread panel
//! `[width, k]` (SIMD where available) and the f32 product runs on it, as it would on f32 weights of that
//! layout. Either way every decoded value equals `ExpertMatrix::decode_row`'s and the product is the f32 one of
//! the same kernel choice, so the result equals the f32 kernels' on the decoded weights bit for bit.
#![allow(
    unsafe_code,
    reason = "the SIMD kernels' entry points on pointers this module bounds-checks first"
)]

use std::cell::RefCell;

use moe_core::MoeError;
use moe_core::quant::ExpertMatrix;

use super::{Kernels, SMALL_ROWS, Tile, Weights};
#[cfg(target_arch = "x86_64")]
use crate::cpu::rows::{AnyRows, with_rows};

/// Row counts up to which the dot kernel decodes packed weights in registers; above, a tile's weights are decoded
/// once into a panel (each register decode is repeated once per 4 (AVX-512) or 2 (AVX2) rows). A cheap decode
/// (16-bit: a shift or one conversion) pays for itself up to 16 rows; a dearer one (int8, FP8, MXFP4: conversions,
/// scales, permutes) only within one 4-row tile (measured on the Mixtral-like and GPT-OSS-like shapes, T = 16:
/// int8 / FP8 / MXFP4 25-35 % faster with 4, bf16 25-45 % slower).
fn direct_rows(format: moe_core::WeightFormat) -> usize {
    use moe_core::WeightFormat as F;
    match format {
        F::F32 | F::Bf16 | F::F16 => 16,
        F::Int8 | F::Fp8 | F::Mxfp4 => 4,
    }
}

/// Rows of a decoded panel the dot kernel takes at a time: about 96 KiB of f32 (in L2, beside the activations),
/// a multiple of 12 (whole register tiles of 6 (AVX-512) and 4 (AVX2) weight rows). A whole 192-row tile decoded
/// at once (768 KiB for `k` = 1024) spilled out of L2 before the product read it back: bf16 at T = 128 ran slower
/// than f32.
fn panel_rows(k: usize) -> usize {
    ((96 * 1024 / 4 / k.max(1)) / 12).max(1) * 12
}

thread_local! {
    /// Per-thread panel of decoded weight rows.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread bf16 copy of a tile's activation rows (`Kernels::bf16`).
    static ACTIVATIONS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

impl Tile<'_> {
    /// The f32 dot kernel of `kernels` on `m` rows of `a` and the weight rows `w` (`n` of them, `k` each).
    ///
    /// # Safety
    /// `kernels.dot` or `kernels.avx2` is set (so the CPU has the features); `a` holds `m` rows of `k` at stride
    /// `lda`; `w` holds `n` rows of `k`; `m`, `n` are this tile's rows and width.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn dot_kernel<W: super::super::dot::Load512 + super::super::dot2::Load256>(
        &mut self,
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        lda: usize,
        w: W,
        kernels: Kernels,
    ) {
        // SAFETY: the caller's contract; the tile owns its m x n rectangle at stride ld.
        unsafe {
            if kernels.dot {
                super::super::dot::matmul_nt(m, n, k, a, lda, w, self.ptr, self.ld);
            } else {
                super::super::dot2::matmul_nt(m, n, k, a, lda, w, self.ptr, self.ld);
            }
        }
    }

    /// `self[i, j] = Σ_kk a[i * lda + kk] · W[row0 + j, kk]` for every row `i` and column `j` of the tile, `W`
    /// one expert's packed matrix (`k` = its columns), decoded inside the product (see the module docs).
    ///
    /// # Errors
    /// [`MoeError::Backend`] if an operand is too short for the product (a bug in the caller, never a panic).
    pub(crate) fn matmul_packed(
        &mut self,
        a: &[f32],
        lda: usize,
        k: usize,
        w: ExpertMatrix<'_>,
        row0: usize,
        kernels: Kernels,
    ) -> Result<(), MoeError> {
        let (m, n) = (self.rows, self.width);
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k != w.cols || row0 + n > w.rows || lda < k || a.len() < (m - 1) * lda + k {
            return Err(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!(
                    "packed product out of bounds: rows {row0}..{} of [{}, {}], k {k}, a {} values",
                    row0 + n,
                    w.rows,
                    w.cols,
                    a.len()
                ),
            });
        }
        #[cfg(target_arch = "x86_64")]
        if kernels.bf16
            && let Some(AnyRows::Bf16(rows)) = AnyRows::new(&w, row0, n)
        {
            // Every row count takes this kernel: a token's output does not depend on the rest of its batch.
            ACTIVATIONS.with(|cell| {
                let mut buf = cell.borrow_mut();
                if buf.len() < m * k {
                    buf.resize(m * k, 0);
                }
                // SAFETY: `kernels.bf16` is set only where the CPU has AVX-512F, BW and BF16; a holds m rows of k
                // at stride lda and the buffer m · k values; rows row0..row0 + n of w are in bounds (checked
                // above); the tile owns its m x n rectangle at stride ld.
                unsafe {
                    super::super::dot_bf16::to_bf16(m, k, a.as_ptr(), lda, buf.as_mut_ptr());
                    super::super::dot_bf16::matmul_nt(
                        m,
                        n,
                        k,
                        buf.as_ptr(),
                        rows.p,
                        rows.ld,
                        self.ptr,
                        self.ld,
                    );
                }
            });
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        if m <= direct_rows(w.format)
            && (kernels.dot || kernels.avx2)
            && let Some(rows) = AnyRows::new(&w, row0, n)
        {
            // SAFETY: bounds checked above (rows row0..row0 + n of k values; m rows of a); the kernel flags are
            // set only where the CPU has their features.
            with_rows!(rows, r => unsafe { self.dot_kernel(m, n, k, a.as_ptr(), lda, r, kernels) });
            return Ok(());
        }
        // The dot kernel computes each output from its own weight row alone, so the panel can be decoded and used
        // a few rows at a time, staying in L1 / L2; gemm's blocking depends on the product's width, so its panel is
        // the whole tile (as the f32 bank's product).
        let chunk = if m <= SMALL_ROWS && (kernels.dot || kernels.avx2) {
            panel_rows(k)
        } else {
            n
        };
        PANEL.with(|cell| {
            let mut panel = cell.borrow_mut();
            let len = chunk.min(n) * k;
            if panel.len() < len {
                panel.resize(len, 0.0);
            }
            let panel = &mut panel[..len];
            for c0 in (0..n).step_by(chunk) {
                let cn = chunk.min(n - c0);
                let panel = &mut panel[..cn * k];
                decode_panel(&w, row0 + c0, cn, panel, kernels);
                let weights = Weights {
                    data: panel,
                    col_stride: k,
                    k_stride: 1,
                };
                self.columns(c0, cn)
                    .matmul(a, lda, k, weights, 0, kernels)?;
            }
            Ok(())
        })
    }
}

/// Rows `row0..row0 + n` of `w` decoded into `out` (`[n, cols]`), SIMD where the kernels allow.
fn decode_panel(w: &ExpertMatrix<'_>, row0: usize, n: usize, out: &mut [f32], kernels: Kernels) {
    let k = w.cols;
    #[cfg(target_arch = "x86_64")]
    if (kernels.dot || kernels.avx2)
        && let Some(rows) = AnyRows::new(w, row0, n)
    {
        // SAFETY: AnyRows::new checked rows row0..row0 + n of w; out holds n · k values (the caller's slice);
        // the flags are set only where the CPU has the features.
        with_rows!(rows, r => unsafe {
            if kernels.dot {
                super::super::dot::decode(n, k, r, out);
            } else {
                super::super::dot2::decode(n, k, r, out);
            }
        });
        return;
    }
    let _ = kernels;
    for (j, row) in out.chunks_exact_mut(k).take(n).enumerate() {
        w.decode_row(row0 + j, row);
    }
}
