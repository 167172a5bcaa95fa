//! The AVX2 dot-product kernel of the fast CPU path, for CPUs without AVX-512 (and forced with
//! `CpuKernels::Avx2`): `C[i, j] = Σ_kk A[i, kk] · W[j, kk]` with both reduction axes contiguous, f32 and every
//! packed format. The structure of `cpu/dot.rs` with 8 lanes and register tiles of 2 rows x 4 weight rows (16
//! registers); the horizontal sum adds the two 128-bit halves, then pairs, in a fixed order. Decoding equals
//! `ExpertMatrix::decode_row` bit for bit (F16C converts halves; MXFP4 looks up the 8 magnitudes and sets the
//! sign bit).
#![allow(
    unsafe_code,
    reason = "SIMD intrinsics on raw pointers; every caller checks the bounds first (kernels.rs)"
)]

use std::arch::x86_64::*;

use super::rows::{Bf16Rows, F16Rows, F32Rows, Fp8Rows, Int8Rows, Mxfp4Rows, Rows, scale_mask};

const MR: usize = 2;
const NR: usize = 4;
const L: usize = 8;
/// Bytes of weight rows prefetched into L2 ahead of the group of rows being read (see `tile`).
const AHEAD: usize = 16384;
/// How far ahead (in bytes) weight rows are prefetched.
const PREFETCH: usize = 512;

/// Weight rows an AVX2 kernel can decode: 8 values from column `o` (a multiple of 8) of row `j`.
pub(crate) trait Load256: Rows {
    /// What decoding a row needs besides its codes, fixed over one scale run ([`Rows::scale_run_log2`]): the
    /// broadcast scale, or MXFP4's magnitudes times its scale. All-zero bits are a valid value.
    type Scale: Copy;

    /// The scale of row `j` at column `o`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; row `j` and column `o` in bounds.
    unsafe fn scale(self, j: usize, o: usize) -> Self::Scale;

    /// # Safety
    /// AVX2, FMA and F16C must be available; row `j` and columns `o..o + 8` in bounds; `s` is
    /// `self.scale(j, o')` for a column `o'` of the same scale run.
    unsafe fn load(self, j: usize, o: usize, s: Self::Scale) -> __m256;
}

/// # Safety
/// AVX2, FMA and F16C must be available; `a` must hold `m` rows of `k` at stride `lda`, `w` `n` rows of `k`, and `c` `m`
/// rows of `n` writable values at stride `ldc`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matmul_nt<W: Load256>(
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
                let rows4 = i + MR <= m;
                match (rows4, full) {
                    (true, true) => tile::<W, MR, NR>(ai, lda, w, j, k, cij, ldc),
                    (false, true) => tile::<W, 1, NR>(ai, lda, w, j, k, cij, ldc),
                    (true, false) => tile::<W, MR, 1>(ai, lda, w, j, k, cij, ldc),
                    (false, false) => tile::<W, 1, 1>(ai, lda, w, j, k, cij, ldc),
                }
                i += if rows4 { MR } else { 1 };
            }
            j += if full { NR } else { 1 };
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<W: Load256, const R: usize, const C: usize>(
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
        let mut acc = [[_mm256_setzero_ps(); C]; R];
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
        let mask = scale_mask(w, 3);
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
            let mut wv = [_mm256_setzero_ps(); C];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = w.load(j0 + jj, o, scales[jj]);
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let av = _mm256_loadu_ps(a.add(ii * lda + o));
                for (acc_ij, &wj) in row.iter_mut().zip(wv.iter()) {
                    *acc_ij = _mm256_fmadd_ps(av, wj, *acc_ij);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                let mut s = hsum(v);
                for kk in steps * L..k {
                    s = (*a.add(ii * lda + kk)).mul_add(w.scalar(j0 + jj, kk), s);
                }
                *c.add(ii * ldc + jj) = s;
            }
        }
    }
}

/// Decodes rows `0..n` of `w` (`k` values each) into `out` (`[n, k]`, row-major), 8 values at a time.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` must hold `n` rows of `k` and `out` `n · k` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn decode<W: Load256>(n: usize, k: usize, w: W, out: &mut [f32]) {
    // SAFETY: rows 0..n and columns 0..k are in bounds (the caller's contract); out holds n · k values.
    unsafe {
        let steps = k / L;
        let mask = scale_mask(w, 3);
        for j in 0..n {
            let row = out.as_mut_ptr().add(j * k);
            // SAFETY: all-zero bits are a valid Scale (the trait's contract); set at s = 0, before its use.
            let mut sc: W::Scale = std::mem::zeroed();
            for s in 0..steps {
                if s & mask == 0 {
                    sc = w.scale(j, s * L);
                }
                _mm256_storeu_ps(row.add(s * L), w.load(j, s * L, sc));
            }
            for kk in steps * L..k {
                *row.add(kk) = w.scalar(j, kk);
            }
        }
    }
}

/// The sum of the 8 lanes in a fixed order: halves, then pairs, then the last two.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    let x = _mm_add_ss(x, _mm_shuffle_ps::<1>(x, x));
    _mm_cvtss_f32(x)
}

impl Load256 for F32Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m256 {
        // SAFETY: in bounds (the trait's contract).
        unsafe { _mm256_loadu_ps(self.p.add(j * self.ld + o)) }
    }
}

impl Load256 for Bf16Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m256 {
        // SAFETY: 8 u16 values in bounds (the trait's contract). bf16 is the top half of an f32.
        unsafe {
            let h = _mm_loadu_si128(self.p.add(j * self.ld + o) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
}

impl Load256 for F16Rows {
    type Scale = ();
    #[inline(always)]
    unsafe fn scale(self, _j: usize, _o: usize) {}
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, _s: ()) -> __m256 {
        // SAFETY: 8 u16 values in bounds (the trait's contract).
        unsafe {
            _mm256_cvtph_ps(_mm_loadu_si128(
                self.p.add(j * self.ld + o) as *const __m128i
            ))
        }
    }
}

impl Load256 for Int8Rows {
    type Scale = __m256;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale(self, j: usize, _o: usize) -> __m256 {
        // SAFETY: the row's scale is in bounds (the trait's contract).
        _mm256_set1_ps(unsafe { *self.scales.add(j) })
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m256) -> __m256 {
        // SAFETY: 8 bytes in bounds (the trait's contract).
        unsafe {
            let q = _mm_loadl_epi64(self.p.add(j * self.ld + o) as *const __m128i);
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s)
        }
    }
}

impl Load256 for Fp8Rows {
    type Scale = __m256;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale(self, j: usize, o: usize) -> __m256 {
        // SAFETY: the block's scale is in bounds (the trait's contract); s · 2^8 is exact (see cpu/dot.rs).
        _mm256_set1_ps(unsafe { Fp8Rows::scale(self, j, o) } * 256.0)
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m256) -> __m256 {
        // SAFETY: 8 bytes in bounds (the trait's contract).
        unsafe {
            let q = _mm_cvtepi8_epi16(_mm_loadl_epi64(
                self.p.add(j * self.ld + o) as *const __m128i
            ));
            // As cpu/dot.rs: the sign-extended code shifted up by 7, bit 14 cleared, is the f16 of value · 2^-8.
            let h = _mm_and_si128(_mm_slli_epi16::<7>(q), _mm_set1_epi16(0xBFFFu16 as i16));
            // (q · 2^-8) · (s · 2^8): one rounding of q · s (see cpu/dot.rs).
            _mm256_mul_ps(_mm256_cvtph_ps(h), s)
        }
    }
}

impl Load256 for Mxfp4Rows {
    /// The 8 E2M1 magnitudes times the block's scale, each rounded once (the sign is exact either side).
    type Scale = __m256;
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scale(self, j: usize, o: usize) -> __m256 {
        // SAFETY: the block's scale is in bounds (the trait's contract).
        let s = unsafe { Mxfp4Rows::scale(self, j, o) };
        // SAFETY: the table holds 16 f32 values; the first 8 are the magnitudes.
        let lut = unsafe { _mm256_loadu_ps(moe_core::quant::codec::E2M1_VALUES.as_ptr()) };
        _mm256_mul_ps(lut, _mm256_set1_ps(s))
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load(self, j: usize, o: usize, s: __m256) -> __m256 {
        // SAFETY: 4 bytes (8 codes) in bounds (the trait's contract).
        unsafe {
            let word = (self.p.add(j * self.ld + o / 2) as *const i32).read_unaligned();
            let b = _mm_cvtsi32_si128(word);
            let lanes = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
            let shift = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
            let codes = _mm256_and_si256(_mm256_srlv_epi32(lanes, shift), _mm256_set1_epi32(0xF));
            // Scaled magnitudes of codes 0..8 (permutevar8x32 reads the low 3 bits), then code bit 3 as the
            // sign: −(|v| · s) = (−|v|) · s exactly.
            let mag = _mm256_permutevar8x32_ps(s, codes);
            let sign = _mm256_slli_epi32::<28>(_mm256_and_si256(codes, _mm256_set1_epi32(8)));
            _mm256_xor_ps(mag, _mm256_castsi256_ps(sign))
        }
    }
}
