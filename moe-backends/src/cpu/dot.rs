//! The AVX-512 dot-product kernel of the fast CPU path: `C[i, j] = Σ_kk A[i, kk] · W[j, kk]` with both reduction
//! axes contiguous, for f32 weights and every packed format (`moe_core::quant`).
//!
//! Register tiles of 4 rows x 6 weight rows (24 accumulators), 16 lanes per step, one horizontal sum per output
//! in a fixed order, the tail of `k` added in order after it. Weight rows are prefetched 1 KiB ahead into L1, and
//! the next group of weight rows at the same offset into L2 (its streams then start warm: this made T = 1 up to 2x
//! faster for 16-bit rows); a prefetch past the end of a matrix never faults. A packed weight row is decoded 16 values at a time in
//! registers ([`Rows::load`]) to exactly the f32 values `ExpertMatrix::decode_row` gives, so the packed kernel's
//! output equals the f32 kernel's on the decoded weights, bit for bit.
#![allow(
    unsafe_code,
    reason = "SIMD intrinsics on raw pointers; every caller checks the bounds first (kernels.rs)"
)]

use std::arch::x86_64::*;

use super::rows::{Bf16Rows, F16Rows, F32Rows, Fp8Rows, Int8Rows, Mxfp4Rows, Rows, scale_mask};

const MR: usize = 4;
const NR: usize = 6;
const L: usize = 16;
/// Bytes of weight rows prefetched into L2 ahead of the group of rows being read (see `tile`).
const AHEAD: usize = 16384;
/// How far ahead (in bytes) weight rows are prefetched.
const PREFETCH: usize = 1024;

/// Weight rows an AVX-512 kernel can decode: 16 values from column `o` (a multiple of 16) of row `j`.
pub(crate) trait Load512: Rows {
    /// What decoding a row needs besides its codes, fixed over one scale run ([`Rows::scale_run_log2`]): the
    /// broadcast scale, or MXFP4's value table times its scale. All-zero bits are a valid value.
    type Scale: Copy;

    /// The scale of row `j` at column `o`.
    ///
    /// # Safety
    /// AVX-512F must be available; row `j` and column `o` in bounds.
    unsafe fn scale(self, j: usize, o: usize) -> Self::Scale;

    /// # Safety
    /// AVX-512F must be available; row `j` and columns `o..o + 16` in bounds; `s` is `self.scale(j, o')` for a
    /// column `o'` of the same scale run.
    unsafe fn load(self, j: usize, o: usize, s: Self::Scale) -> __m512;
}

/// # Safety
/// AVX-512F must be available; `a` must hold `m` rows of `k` at stride `lda`, `w` `n` rows of `k`, and `c` `m`
/// rows of `n` writable values at stride `ldc`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn matmul_nt<W: Load512>(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    w: W,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): every pointer offset below stays inside the bounds the caller guarantees: rows
    // `i..i + R` inside `0..m`, weight rows `j..j + C` inside `0..n`.
    unsafe {
        let mut j = 0;
        while j < n {
            let full = j + NR <= n;
            let mut i = 0;
            while i < m {
                let (ai, cij) = (a.add(i * lda), c.add(i * ldc + j));
                // 4 rows at a time, then 2, then 1: each weight vector is loaded (and decoded) once per tile,
                // so 2 or 3 leftover rows share it. The sum of each output keeps its order whatever the tile.
                let rows = if i + MR <= m {
                    MR
                } else if i + 2 <= m {
                    2
                } else {
                    1
                };
                match (rows, full) {
                    (MR, true) => tile::<W, MR, NR>(ai, lda, w, j, k, cij, ldc),
                    (2, true) => tile::<W, 2, NR>(ai, lda, w, j, k, cij, ldc),
                    (_, true) => tile::<W, 1, NR>(ai, lda, w, j, k, cij, ldc),
                    (MR, false) => tile::<W, MR, 1>(ai, lda, w, j, k, cij, ldc),
                    (2, false) => tile::<W, 2, 1>(ai, lda, w, j, k, cij, ldc),
                    (_, false) => tile::<W, 1, 1>(ai, lda, w, j, k, cij, ldc),
                }
                i += rows;
            }
            j += if full { NR } else { 1 };
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<W: Load512, const R: usize, const C: usize>(
    a: *const f32,
    lda: usize,
    w: W,
    j0: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): R rows of A and C rows of W from j0, k values each, are in bounds (see matmul_nt).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let steps = k / L;
        // Steps per 64-byte line of a weight row: one prefetch per line and row, not one per vector (an MXFP4
        // row's line holds 128 values, 8 steps of 16).
        let per_line = (512 / (L * W::BITS)).max(1);
        // Rows ahead whose lines go to L2 while this group runs: whole groups, at least AHEAD bytes of rows (a
        // group of short packed rows runs too briefly for the next group's lines to arrive in time).
        let ahead = {
            let row_bytes = (k * W::BITS / 8).max(1);
            AHEAD.div_ceil(C * row_bytes).max(1) * C
        };
        // Each row's scale, looked up at the start of each scale run.
        let mask = scale_mask(w, 4);
        // SAFETY: all-zero bits are a valid Scale (the trait's contract); each is set before its first use.
        let mut scales: [W::Scale; C] = std::mem::zeroed();
        for s in 0..steps {
            let o = s * L;
            if s % per_line == 0 {
                for jj in 0..C {
                    // Weight rows stream from memory once: ask for them PREFETCH bytes ahead.
                    _mm_prefetch::<_MM_HINT_T0>(w.prefetch(j0 + jj, o, PREFETCH));
                    _mm_prefetch::<_MM_HINT_T1>(w.prefetch(j0 + ahead + jj, o, 0));
                }
            }
            if s & mask == 0 {
                for (jj, sc) in scales.iter_mut().enumerate() {
                    *sc = w.scale(j0 + jj, o);
                }
            }
            let mut wv = [_mm512_setzero_ps(); C];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = w.load(j0 + jj, o, scales[jj]);
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let av = _mm512_loadu_ps(a.add(ii * lda + o));
                for (acc_ij, &wj) in row.iter_mut().zip(wv.iter()) {
                    *acc_ij = _mm512_fmadd_ps(av, wj, *acc_ij);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(v);
                for kk in steps * L..k {
                    s = (*a.add(ii * lda + kk)).mul_add(w.scalar(j0 + jj, kk), s);
                }
                *c.add(ii * ldc + jj) = s;
            }
        }
    }
}

/// Decodes rows `0..n` of `w` (`k` values each) into `out` (`[n, k]`, row-major), 16 values at a time.
///
/// # Safety
/// AVX-512F must be available; `w` must hold `n` rows of `k` and `out` `n · k` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn decode<W: Load512>(n: usize, k: usize, w: W, out: &mut [f32]) {
    // SAFETY: rows 0..n and columns 0..k are in bounds (the caller's contract); out holds n · k values.
    unsafe {
        let steps = k / L;
        let mask = scale_mask(w, 4);
        for j in 0..n {
            let row = out.as_mut_ptr().add(j * k);
            // SAFETY: all-zero bits are a valid Scale (the trait's contract); set at s = 0, before its use.
            let mut sc: W::Scale = std::mem::zeroed();
            for s in 0..steps {
                if s & mask == 0 {
                    sc = w.scale(j, s * L);
                }
                _mm512_storeu_ps(row.add(s * L), w.load(j, s * L, sc));
            }
            for kk in steps * L..k {
                *row.add(kk) = w.scalar(j, kk);
            }
        }
    }
}

impl Load512 for F32Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m512 {
        // SAFETY: in bounds (the trait's contract).
        unsafe { _mm512_loadu_ps(self.p.add(j * self.ld + o)) }
    }
}

impl Load512 for Bf16Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m512 {
        // SAFETY: 16 u16 values in bounds (the trait's contract). bf16 is the top half of an f32.
        unsafe {
            let h = _mm256_loadu_si256(self.p.add(j * self.ld + o) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

impl Load512 for F16Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m512 {
        // SAFETY: 16 u16 values in bounds (the trait's contract).
        unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                self.p.add(j * self.ld + o) as *const __m256i
            ))
        }
    }
}

impl Load512 for Int8Rows {
    type Scale = __m512;
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scale(self, j: usize, _o: usize) -> __m512 {
        // SAFETY: the row's scale is in bounds (the trait's contract).
        _mm512_set1_ps(unsafe { *self.scales.add(j) })
    }
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m512) -> __m512 {
        // SAFETY: 16 bytes in bounds (the trait's contract).
        unsafe {
            let q = _mm_loadu_si128(self.p.add(j * self.ld + o) as *const __m128i);
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s)
        }
    }
}

impl Load512 for Fp8Rows {
    type Scale = __m512;
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scale(self, j: usize, o: usize) -> __m512 {
        // SAFETY: the block's scale is in bounds (the trait's contract). s · 2^8 is exact (s · 448 is finite,
        // checked when the matrix was built).
        _mm512_set1_ps(unsafe { Fp8Rows::scale(self, j, o) } * 256.0)
    }
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m512) -> __m512 {
        // SAFETY: 16 bytes in bounds (the trait's contract).
        unsafe {
            let q = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                self.p.add(j * self.ld + o) as *const __m128i
            ));
            // (q · 2^-8) · (s · 2^8): both factors exact, so one rounding of q · s, as the reference.
            _mm512_mul_ps(_mm512_cvtph_ps(fp8_to_f16_bits(q)), s)
        }
    }
}

/// FP8 E4M3 codes, sign-extended to 16-bit lanes, as f16 bit patterns of `value · 2^-8`: shifted up by 7, the
/// exponent and mantissa land where f16 keeps them (E4M3's bias 7 and f16's 15 differ by 8, subnormals included)
/// and the sign's copies fill bits 14 and 15; clearing bit 14 leaves the sign in bit 15. Exact for all 256 codes.
#[target_feature(enable = "avx512f")]
#[inline]
fn fp8_to_f16_bits(q: __m256i) -> __m256i {
    _mm256_and_si256(
        _mm256_slli_epi16::<7>(q),
        _mm256_set1_epi16(0xBFFFu16 as i16),
    )
}

impl Load512 for Mxfp4Rows {
    /// The 16 E2M1 values times the block's scale: each entry rounded once, as `decode_row`'s `value · scale`.
    type Scale = __m512;
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn scale(self, j: usize, o: usize) -> __m512 {
        // SAFETY: the block's scale is in bounds (the trait's contract).
        let s = unsafe { Mxfp4Rows::scale(self, j, o) };
        // SAFETY: the table holds 16 f32 values.
        let lut = unsafe { _mm512_loadu_ps(moe_core::quant::codec::E2M1_VALUES.as_ptr()) };
        _mm512_mul_ps(lut, _mm512_set1_ps(s))
    }
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m512) -> __m512 {
        // SAFETY: 8 bytes (16 codes) in bounds (the trait's contract).
        unsafe {
            let b = _mm_loadl_epi64(self.p.add(j * self.ld + o / 2) as *const __m128i);
            // b0 b0 b1 b1 …: lane 2i takes byte i's low nibble, lane 2i + 1 its high one.
            let lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
            let shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
            // vpermps reads only the low 4 bits of each index: no mask needed after the shift.
            _mm512_permutexvar_ps(_mm512_srlv_epi32(lanes, shift), s)
        }
    }
}
