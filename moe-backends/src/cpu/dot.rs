//! The AVX-512 dot-product kernel of the fast CPU path: `C[i, j] = Σ_kk A[i, kk] · W[j, kk]` with both reduction axes contiguous.
//! Register tiles of 4 rows x 6 weight rows (24 accumulators), 16 lanes per step, one horizontal sum per
//! output in a fixed order, the tail of `k` added in order after it. Weight rows are prefetched a few cache
//! lines ahead (a prefetch past the end of a row never faults).
#![allow(
    unsafe_code,
    reason = "SIMD intrinsics on raw pointers; every caller checks the bounds first (kernels.rs)"
)]

use std::arch::x86_64::*;

const MR: usize = 4;
const NR: usize = 6;
const L: usize = 16;
/// How far ahead (in values) weight rows are prefetched.
const PREFETCH: usize = 128;

/// # Safety
/// AVX-512F must be available; `a` must hold `m` rows of `k` at stride `lda`, `w` `n` rows of `k` at stride
/// `ldw`, and `c` `m` rows of `n` writable values at stride `ldc`.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn matmul_nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    w: *const f32,
    ldw: usize,
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
                let (ai, wj, cij) = (a.add(i * lda), w.add(j * ldw), c.add(i * ldc + j));
                let rows4 = i + MR <= m;
                match (rows4, full) {
                    (true, true) => tile::<MR, NR>(ai, lda, wj, ldw, k, cij, ldc),
                    (false, true) => tile::<1, NR>(ai, lda, wj, ldw, k, cij, ldc),
                    (true, false) => tile::<MR, 1>(ai, lda, wj, ldw, k, cij, ldc),
                    (false, false) => tile::<1, 1>(ai, lda, wj, ldw, k, cij, ldc),
                }
                i += if rows4 { MR } else { 1 };
            }
            j += if full { NR } else { 1 };
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    a: *const f32,
    lda: usize,
    w: *const f32,
    ldw: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): R rows of A and C columns of W, k values each, are in bounds (see matmul_nt).
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let steps = k / L;
        for s in 0..steps {
            let o = s * L;
            let mut wv = [_mm512_setzero_ps(); C];
            for (jj, v) in wv.iter_mut().enumerate() {
                // Weight rows stream from memory once: ask for them PREFETCH values ahead.
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(jj * ldw + o + PREFETCH) as *const i8);
                *v = _mm512_loadu_ps(w.add(jj * ldw + o));
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
                    s = (*a.add(ii * lda + kk)).mul_add(*w.add(jj * ldw + kk), s);
                }
                *c.add(ii * ldc + jj) = s;
            }
        }
    }
}
