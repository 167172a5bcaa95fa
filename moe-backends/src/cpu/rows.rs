//! Weight rows as the SIMD kernels read them (`cpu/dot.rs`, `cpu/dot2.rs`): one small `Copy` value per format
//! holding raw pointers to a tile's first weight row and its scales, built from a bounds-checked
//! [`ExpertMatrix`] by [`AnyRows::new`]. The scalar decode here ([`Rows::scalar`]) equals
//! `ExpertMatrix::decode_row` bit for bit; the SIMD decodes of the kernels equal it too.
#![allow(
    unsafe_code,
    reason = "raw row pointers for the SIMD kernels; built from checked slices, read within their bounds"
)]

use moe_core::quant::{ExpertMatrix, ExpertScales, WeightFormat, codec};

/// Rows `j = 0..` of a weight operand starting at a tile's first row, `k` values each.
pub(crate) trait Rows: Copy {
    /// Bits a stored value takes (32, 16, 8 or 4): the kernels prefetch once per 64-byte line of a row, every
    /// `512 / (lanes · BITS)` steps.
    const BITS: usize;

    /// log2 of the values one scale covers along a row (an FP8 block's or an MXFP4 block's width); `None` for
    /// formats with no scale or one per row. The kernels look a row's scale up once per run, not per vector.
    fn scale_run_log2(self) -> Option<u32>;

    /// An address `ahead` bytes past value `o` of row `j`, for a prefetch (never dereferenced).
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8;

    /// Value `kk` of row `j`, decoded.
    ///
    /// # Safety
    /// Row `j` and value `kk` in bounds.
    unsafe fn scalar(self, j: usize, kk: usize) -> f32;
}

/// f32 rows at stride `ld` values.
#[derive(Clone, Copy)]
pub(crate) struct F32Rows {
    pub p: *const f32,
    pub ld: usize,
}

/// bf16 rows at stride `ld` values.
#[derive(Clone, Copy)]
pub(crate) struct Bf16Rows {
    pub p: *const u16,
    pub ld: usize,
}

/// f16 rows at stride `ld` values.
#[derive(Clone, Copy)]
pub(crate) struct F16Rows {
    pub p: *const u16,
    pub ld: usize,
}

/// int8 rows at stride `ld` bytes, one f32 scale a row.
#[derive(Clone, Copy)]
pub(crate) struct Int8Rows {
    pub p: *const i8,
    pub ld: usize,
    pub scales: *const f32,
}

/// FP8 E4M3 rows at stride `ld` bytes with block scales: row `j`'s block row is `(row0 + j) >> row_shift`, its
/// column block `o >> shift` (`block_rows = 2^row_shift`, `block_cols = 2^shift`).
#[derive(Clone, Copy)]
pub(crate) struct Fp8Rows {
    pub p: *const u8,
    pub ld: usize,
    pub scales: *const f32,
    pub row0: usize,
    pub row_shift: u32,
    pub grid_cols: usize,
    pub shift: u32,
}

/// MXFP4 rows at stride `ld` bytes (two codes a byte, the even column low), one E8M0 code per 32 values.
#[derive(Clone, Copy)]
pub(crate) struct Mxfp4Rows {
    pub p: *const u8,
    pub ld: usize,
    pub scales: *const u8,
    pub blocks: usize,
}

impl Fp8Rows {
    /// The scale of row `j`, column `o`.
    ///
    /// # Safety
    /// Row `j` and column `o` in bounds.
    #[inline(always)]
    pub(crate) unsafe fn scale(self, j: usize, o: usize) -> f32 {
        // SAFETY: the block (row, column) of an in-bounds value is in the scale grid (checked at construction).
        unsafe {
            *self
                .scales
                .add(((self.row0 + j) >> self.row_shift) * self.grid_cols + (o >> self.shift))
        }
    }
}

impl Mxfp4Rows {
    /// The scale of row `j`, column `o`: `2^(s − 127)`, as `codec::e8m0_to_f32` (code 255 never gets here).
    ///
    /// # Safety
    /// Row `j` and column `o` in bounds.
    #[inline(always)]
    pub(crate) unsafe fn scale(self, j: usize, o: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        let s = u32::from(unsafe { *self.scales.add(j * self.blocks + o / 32) });
        // Branch-free: code 0 is the subnormal 2^-127 (bit 22), every other code the normal 2^(s - 127).
        f32::from_bits((s << 23) | (u32::from(s == 0) << 22))
    }
}

impl Rows for F32Rows {
    const BITS: usize = 32;
    fn scale_run_log2(self) -> Option<u32> {
        None
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        (self.p.wrapping_add(j * self.ld + o) as *const i8).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        unsafe { *self.p.add(j * self.ld + kk) }
    }
}

impl Rows for Bf16Rows {
    const BITS: usize = 16;
    fn scale_run_log2(self) -> Option<u32> {
        None
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        (self.p.wrapping_add(j * self.ld + o) as *const i8).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        half::bf16::from_bits(unsafe { self.p.add(j * self.ld + kk).read_unaligned() }).to_f32()
    }
}

impl Rows for F16Rows {
    const BITS: usize = 16;
    fn scale_run_log2(self) -> Option<u32> {
        None
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        (self.p.wrapping_add(j * self.ld + o) as *const i8).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        half::f16::from_bits(unsafe { self.p.add(j * self.ld + kk).read_unaligned() }).to_f32()
    }
}

impl Rows for Int8Rows {
    const BITS: usize = 8;
    fn scale_run_log2(self) -> Option<u32> {
        None
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        self.p.wrapping_add(j * self.ld + o).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        unsafe { f32::from(*self.p.add(j * self.ld + kk)) * *self.scales.add(j) }
    }
}

impl Rows for Fp8Rows {
    const BITS: usize = 8;
    fn scale_run_log2(self) -> Option<u32> {
        Some(self.shift)
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        (self.p.wrapping_add(j * self.ld + o) as *const i8).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract); NaN codes were refused when the matrix was built.
        unsafe {
            codec::fp8_e4m3_to_f32(*self.p.add(j * self.ld + kk)).unwrap_or(f32::NAN)
                * self.scale(j, kk)
        }
    }
}

impl Rows for Mxfp4Rows {
    const BITS: usize = 4;
    fn scale_run_log2(self) -> Option<u32> {
        Some(5)
    }
    fn prefetch(self, j: usize, o: usize, ahead: usize) -> *const i8 {
        (self.p.wrapping_add(j * self.ld + o / 2) as *const i8).wrapping_add(ahead)
    }
    #[inline(always)]
    unsafe fn scalar(self, j: usize, kk: usize) -> f32 {
        // SAFETY: in bounds (the caller's contract).
        unsafe {
            let byte = *self.p.add(j * self.ld + kk / 2);
            let code = if kk.is_multiple_of(2) {
                byte & 0xF
            } else {
                byte >> 4
            };
            codec::e2m1_to_f32(code) * self.scale(j, kk)
        }
    }
}

/// Mask of the step index `s` at whose multiples a kernel of `2^lanes_log2` lanes looks its rows' scales up again
/// (`s & mask == 0`): every step of a scale run shares one (`usize::MAX`: once, at the first step).
pub(crate) fn scale_mask<W: Rows>(w: W, lanes_log2: u32) -> usize {
    match w.scale_run_log2() {
        Some(b) => (1usize << b.saturating_sub(lanes_log2)) - 1,
        None => usize::MAX,
    }
}

/// The rows of one packed format.
#[derive(Clone, Copy)]
pub(crate) enum AnyRows {
    F32(F32Rows),
    Bf16(Bf16Rows),
    F16(F16Rows),
    Int8(Int8Rows),
    Fp8(Fp8Rows),
    Mxfp4(Mxfp4Rows),
}

impl AnyRows {
    /// Rows `row0..row0 + n` of `w` (`n ≥ 1`, in bounds: checked by the caller), or `None` where the SIMD
    /// kernels cannot read the layout (FP8 blocks whose rows are not a power of two, or whose columns are not a
    /// power of two of at least 16 values).
    pub(crate) fn new(w: &ExpertMatrix<'_>, row0: usize, n: usize) -> Option<AnyRows> {
        if n == 0 || row0 + n > w.rows {
            return None;
        }
        let rb = w.format.row_bytes(w.cols);
        let p = w.data.get(row0 * rb..(row0 + n) * rb)?.as_ptr();
        Some(match (w.format, w.scales) {
            (WeightFormat::F32, _) => AnyRows::F32(F32Rows {
                p: p as *const f32,
                ld: w.cols,
            }),
            (WeightFormat::Bf16, _) => AnyRows::Bf16(Bf16Rows {
                p: p as *const u16,
                ld: w.cols,
            }),
            (WeightFormat::F16, _) => AnyRows::F16(F16Rows {
                p: p as *const u16,
                ld: w.cols,
            }),
            (WeightFormat::Int8, ExpertScales::Rows(s)) => AnyRows::Int8(Int8Rows {
                p: p as *const i8,
                ld: rb,
                scales: s.get(row0..row0 + n)?.as_ptr(),
            }),
            (
                WeightFormat::Fp8,
                ExpertScales::Blocks {
                    block_rows,
                    block_cols,
                    grid_cols,
                    values,
                },
            ) => {
                if !block_cols.is_power_of_two() || block_cols < 16 || !block_rows.is_power_of_two()
                {
                    return None;
                }
                let grid_rows = w.rows.div_ceil(block_rows);
                if values.len() < grid_rows * grid_cols {
                    return None;
                }
                AnyRows::Fp8(Fp8Rows {
                    p,
                    ld: rb,
                    scales: values.as_ptr(),
                    row0,
                    row_shift: block_rows.trailing_zeros(),
                    grid_cols,
                    shift: block_cols.trailing_zeros(),
                })
            }
            (WeightFormat::Mxfp4, ExpertScales::E8m0(s)) => {
                let blocks = w.cols / 32;
                AnyRows::Mxfp4(Mxfp4Rows {
                    p,
                    ld: rb,
                    scales: s.get(row0 * blocks..(row0 + n) * blocks)?.as_ptr(),
                    blocks,
                })
            }
            _ => return None,
        })
    }
}

/// Runs `$body` with `$r` bound to the format's rows (one monomorphised kernel per format).
macro_rules! with_rows {
    ($rows:expr, $r:ident => $body:expr) => {
        match $rows {
            $crate::cpu::rows::AnyRows::F32($r) => $body,
            $crate::cpu::rows::AnyRows::Bf16($r) => $body,
            $crate::cpu::rows::AnyRows::F16($r) => $body,
            $crate::cpu::rows::AnyRows::Int8($r) => $body,
            $crate::cpu::rows::AnyRows::Fp8($r) => $body,
            $crate::cpu::rows::AnyRows::Mxfp4($r) => $body,
        }
    };
}
pub(crate) use with_rows;
