//! bf16 products on bf16 activations, the opt-in mode of [`crate::cpu::CpuBackend::with_bf16_activations`]:
//! `C[i, j] = Σ_kk bf16(A[i, kk]) · W[j, kk]` for bf16 weight rows `W`, the activations rounded to bf16 (round to
//! nearest even, `VCVTNE2PS2BF16`) and the products summed in f32 by AVX-512 BF16's `VDPBF16PS`, which takes 32
//! bf16 pairs an instruction where an f32 FMA takes 16 (twice the rate on compute-bound rows).
//!
//! Numerics (what the mode changes): each product of two bf16 values is exact in f32; `VDPBF16PS` adds the two
//! products of a lane's pair to its f32 accumulator with denormals flushed (Intel SDM, "VDPBF16PS"); the 16 lanes
//! are summed in a fixed order. So the result is the f32 sum of the exact products of the rounded activations, up
//! to f32 accumulation error, and independent of the thread count and of the rows in the batch (every row count
//! takes this kernel). PyTorch's bf16 blocks round their activations the same way (and their outputs too, which
//! this mode does not: outputs stay f32).
#![allow(
    unsafe_code,
    reason = "AVX-512 BF16 intrinsics on raw pointers; every caller checks the bounds first (kernels_packed.rs)"
)]

use std::arch::x86_64::*;

/// Register tile: 4 rows x 4 weight rows (4 x 6, the f32 kernel's, made LLVM spill accumulators here: T = 128
/// ran 25 % slower).
const MR: usize = 4;
const NR: usize = 4;
/// bf16 values a step.
const L: usize = 32;
/// How far ahead (in bytes) weight rows are prefetched into L1.
const PREFETCH: usize = 1024;
/// Bytes of weight rows prefetched into L2 ahead of the group being read (as `cpu/dot.rs`).
const AHEAD: usize = 16384;

/// Rounds `m` rows of `a` (`k` values each, stride `lda`) to bf16 bit patterns in `out` (`[m, k]`), to nearest
/// even.
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; `a` holds `m` rows of `k` at stride `lda`, `out` `m · k`
/// values.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn to_bf16(m: usize, k: usize, a: *const f32, lda: usize, out: *mut u16) {
    // SAFETY: rows 0..m, columns 0..k of a and out are in bounds (the caller's contract); the masked loads and
    // stores touch only columns below k.
    unsafe {
        for i in 0..m {
            let (src, dst) = (a.add(i * lda), out.add(i * k));
            let mut o = 0;
            while o < k {
                let n = (k - o).min(L);
                let lo = _mm512_maskz_loadu_ps(mask16(n), src.add(o));
                // Lanes past k are masked off (never read), so the address may lie past the row.
                let hi =
                    _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), src.wrapping_add(o + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_mask_storeu_epi16(dst.add(o) as *mut i16, mask32(n), v);
                o += n;
            }
        }
    }
}

/// `C = A · Wᵀ` on bf16 activation rows `a` (`m` rows of `k`, stride `k`) and bf16 weight rows `w` (`n` rows of
/// `k`, stride `ldw`), into `c` (`m` rows of `n` at stride `ldc`).
///
/// # Safety
/// AVX-512F, AVX-512BW and AVX-512 BF16 must be available; the operands hold what the shapes say.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn matmul_nt(
    m: usize,
    n: usize,
    k: usize,
    a: *const u16,
    w: *const u16,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): rows i..i + R of a and j..j + C of w stay inside 0..m and 0..n.
    unsafe {
        let mut j = 0;
        while j < n {
            let full = j + NR <= n;
            let mut i = 0;
            while i < m {
                let rows = if i + MR <= m {
                    MR
                } else if i + 2 <= m {
                    2
                } else {
                    1
                };
                let (ai, wj, cij) = (a.add(i * k), w.add(j * ldw), c.add(i * ldc + j));
                match (rows, full) {
                    (MR, true) => tile::<MR, NR>(ai, k, wj, ldw, cij, ldc),
                    (2, true) => tile::<2, NR>(ai, k, wj, ldw, cij, ldc),
                    (_, true) => tile::<1, NR>(ai, k, wj, ldw, cij, ldc),
                    (MR, false) => tile::<MR, 1>(ai, k, wj, ldw, cij, ldc),
                    (2, false) => tile::<2, 1>(ai, k, wj, ldw, cij, ldc),
                    (_, false) => tile::<1, 1>(ai, k, wj, ldw, cij, ldc),
                }
                i += rows;
            }
            j += if full { NR } else { 1 };
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn tile<const R: usize, const C: usize>(
    a: *const u16,
    k: usize,
    w: *const u16,
    ldw: usize,
    c: *mut f32,
    ldc: usize,
) {
    // SAFETY (whole body): R rows of a and C rows of w, k values each, are in bounds (see matmul_nt); the last
    // step's masked loads read only columns below k.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        // Rows ahead whose lines go to L2 while this group runs: whole groups, at least AHEAD bytes.
        let ahead = AHEAD.div_ceil(C * 2 * k.max(1)).max(1) * C;
        let mut o = 0;
        while o < k {
            let mask = mask32((k - o).min(L));
            let mut wv: [__m512bh; C] = std::mem::zeroed();
            for (jj, v) in wv.iter_mut().enumerate() {
                let p = w.add(jj * ldw + o);
                // Weight rows stream from memory once: one prefetch per 64-byte line.
                _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((ahead + jj) * ldw + o) as *const i8);
                *v = std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                    mask,
                    p as *const i16,
                ));
            }
            for (ii, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(
                    mask,
                    a.add(ii * k + o) as *const i16,
                ));
                for (acc_ij, &wj) in row.iter_mut().zip(wv.iter()) {
                    *acc_ij = _mm512_dpbf16_ps(*acc_ij, av, wj);
                }
            }
            o += L;
        }
        for (ii, row) in acc.iter().enumerate() {
            for (jj, &v) in row.iter().enumerate() {
                *c.add(ii * ldc + jj) = _mm512_reduce_add_ps(v);
            }
        }
    }
}

/// The first `n` of 16 lanes (`n ≤ 16`).
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

/// The first `n` of 32 lanes (`n ≤ 32`).
fn mask32(n: usize) -> __mmask32 {
    if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
}

/// Whether this CPU runs the kernels here (AVX-512F, AVX-512BW and AVX-512 BF16).
pub(crate) fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::rng::SeqRng;

    fn bf16(v: f32) -> u16 {
        half::bf16::from_f32(v).to_bits()
    }

    fn f32_of(b: u16) -> f32 {
        half::bf16::from_bits(b).to_f32()
    }

    /// The conversion rounds to nearest even, as `half`'s, on normal values, ties and both signs.
    #[test]
    fn activations_round_to_nearest_even() {
        if !available() {
            return;
        }
        let mut rng = SeqRng::new(18, 3);
        let mut v: Vec<f32> = (0..1000).map(|_| rng.normal() as f32 * 3.0).collect();
        // Exact ties: the bit below bf16's last kept bit set, nothing under it, both parities.
        v.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0xBF80_8000),
            f32::from_bits(0xBF81_8000),
            0.0,
            -0.0,
            65504.0,
        ]);
        for (m, k) in [(1, v.len()), (7, 143), (3, 31), (2, 33)] {
            let mut out = vec![0u16; m * k];
            // SAFETY: available() checked; a holds m rows of k at stride k (m · k ≤ v.len()), out m · k values.
            unsafe { to_bf16(m, k, v.as_ptr(), k, out.as_mut_ptr()) };
            for (o, &x) in out.iter().zip(&v) {
                assert_eq!(*o, bf16(x), "{x:e}");
            }
        }
    }

    /// Every output is the f64 sum of the exact products of the bf16 operands, within f32 accumulation error
    /// (`(k / 16 + 16) · 2^-24 · Σ|products|`: each lane adds k / 16 products one at a time, then 16 lanes are
    /// summed), for
    /// every register tile (1, 2, 4 rows x 1, 4 weight rows) and lengths with and without a partial last step.
    #[test]
    fn products_equal_the_exact_sums_within_accumulation_error() {
        if !available() {
            return;
        }
        let mut rng = SeqRng::new(18, 4);
        for (m, n, k) in [
            (1, 1, 1),
            (1, 6, 32),
            (2, 7, 33),
            (3, 13, 100),
            (4, 12, 1024),
            (9, 19, 3584),
        ] {
            let ldw = k + 3;
            let a: Vec<u16> = (0..m * k).map(|_| bf16(rng.normal() as f32)).collect();
            let w: Vec<u16> = (0..n * ldw).map(|_| bf16(rng.normal() as f32)).collect();
            let ldc = n + 2;
            let mut c = vec![f32::NAN; m * ldc];
            // SAFETY: available() checked; the buffers hold the shapes passed.
            unsafe { matmul_nt(m, n, k, a.as_ptr(), w.as_ptr(), ldw, c.as_mut_ptr(), ldc) };
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut size) = (0.0f64, 0.0f64);
                    for kk in 0..k {
                        let p =
                            f64::from(f32_of(a[i * k + kk])) * f64::from(f32_of(w[j * ldw + kk]));
                        exact += p;
                        size += p.abs();
                    }
                    let got = f64::from(c[i * ldc + j]);
                    let bound = (k / 16 + 16) as f64 * 2f64.powi(-24) * size;
                    assert!(
                        (got - exact).abs() <= bound,
                        "m {m} n {n} k {k} [{i}, {j}]: {got} vs {exact} (bound {bound:e})"
                    );
                }
                // Columns past n are not written.
                assert!(c[i * ldc + n].is_nan());
            }
        }
    }
}
