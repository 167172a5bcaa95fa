//! Scalar special functions shared by routers and backends: `erfc` / `erf` (f64) and the normal CDF (the smooth
//! load estimator of noisy top-k); branch-free f32 `exp_f32`, `erf_f32` and `normal_cdf_pdf_f32` (the exact GELU
//! of the CPU backend, written so that a loop over a row vectorises).

/// Standard normal CDF `Φ(z) = erfc(−z / √2) / 2`. Absolute error below 1e-15; relative error below 1e-15 for
/// `|z| <= 8`, growing to about 1e-13 at `Φ(−37)` (the rounding of `z / √2` is amplified by the slope of `ln erfc`);
/// exactly 0 below about −37.5.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z * std::f64::consts::FRAC_1_SQRT_2)
}

/// Complementary error function by W. J. Cody's rational Chebyshev approximations ("Rational Chebyshev
/// approximations for the error function", Math. Comp. 23, 1969; netlib `specfun/calerf`), three intervals
/// `|x| <= 0.46875`, `<= 4`, `> 4`. Relative error below 1e-15 for `x <= 26.5` (largest seen 8.2e-16 on a grid of
/// step 0.0013 over [−8, 26.5] against CPython's `math.erfc`); 0 past `x = 26.543`, where erfc is subnormal;
/// `erfc(x) = 2 − erfc(|x|)` for `x < 0`. NaN gives NaN.
#[allow(
    clippy::excessive_precision,
    reason = "Cody's coefficients are kept at their published precision"
)]
pub fn erfc(x: f64) -> f64 {
    const A: [f64; 5] = [
        3.16112374387056560e00,
        1.13864154151050156e02,
        3.77485237685302021e02,
        3.20937758913846947e03,
        1.85777706184603153e-1,
    ];
    const B: [f64; 4] = [
        2.36012909523441209e01,
        2.44024637934444173e02,
        1.28261652607737228e03,
        2.84423683343917062e03,
    ];
    const C: [f64; 9] = [
        5.64188496988670089e-1,
        8.88314979438837594e00,
        6.61191906371416295e01,
        2.98635138197400131e02,
        8.81952221241769090e02,
        1.71204761263407058e03,
        2.05107837782607147e03,
        1.23033935479799725e03,
        2.15311535474403846e-8,
    ];
    const D: [f64; 8] = [
        1.57449261107098347e01,
        1.17693950891312499e02,
        5.37181101862009858e02,
        1.62138957456669019e03,
        3.29079923573345963e03,
        4.36261909014324716e03,
        3.43936767414372164e03,
        1.23033935480374942e03,
    ];
    const P: [f64; 6] = [
        3.05326634961232344e-1,
        3.60344899949804439e-1,
        1.25781726111229246e-1,
        1.60837851487422766e-2,
        6.58749161529837803e-4,
        1.63153871373020978e-2,
    ];
    const Q: [f64; 5] = [
        2.56852019228982242e00,
        1.87295284992346047e00,
        5.27905102951428412e-1,
        6.05183413124413191e-2,
        2.33520497626869185e-3,
    ];
    const ONE_OVER_SQRT_PI: f64 = 5.6418958354775628695e-1;
    const THRESHOLD: f64 = 0.468_75;
    const X_BIG: f64 = 26.543;

    if x.is_nan() {
        return x;
    }
    let y = x.abs();
    if y <= THRESHOLD {
        // erf(x) = x · R(x²) on [−0.46875, 0.46875].
        let ysq = if y > 1.11e-16 { y * y } else { 0.0 };
        let mut num = A[4] * ysq;
        let mut den = ysq;
        for i in 0..3 {
            num = (num + A[i]) * ysq;
            den = (den + B[i]) * ysq;
        }
        return 1.0 - x * (num + A[3]) / (den + B[3]);
    }
    // erfc(y) = exp(−y²) · R(y) for y > 0.46875; exp(−y²) is split as exp(−ŷ²) · exp(−(y − ŷ)(y + ŷ)) with ŷ = y
    // truncated to 1/16, which keeps the relative error of the product small.
    let scaled = if y <= 4.0 {
        let mut num = C[8] * y;
        let mut den = y;
        for i in 0..7 {
            num = (num + C[i]) * y;
            den = (den + D[i]) * y;
        }
        (num + C[7]) / (den + D[7])
    } else if y < X_BIG {
        let ysq = 1.0 / (y * y);
        let mut num = P[5] * ysq;
        let mut den = ysq;
        for i in 0..4 {
            num = (num + P[i]) * ysq;
            den = (den + Q[i]) * ysq;
        }
        (ONE_OVER_SQRT_PI - ysq * (num + P[4]) / (den + Q[4])) / y
    } else {
        0.0
    };
    let y_trunc = (y * 16.0).trunc() / 16.0;
    let del = (y - y_trunc) * (y + y_trunc);
    let tail = (-y_trunc * y_trunc).exp() * (-del).exp() * scaled;
    if x < 0.0 { 2.0 - tail } else { tail }
}

/// The error function, `erf(x) = 1 − erfc(x)`; near 0 it is computed as `x · R(x²)` inside [`erfc`], so small
/// arguments keep their relative accuracy to about 1e-15.
pub fn erf(x: f64) -> f64 {
    if x.abs() <= 0.468_75 {
        // erfc returns 1 − x·R(x²) there; undo the subtraction without losing digits for tiny x.
        let r = 1.0 - erfc(x);
        if x != 0.0 && r == 0.0 {
            x * std::f64::consts::FRAC_2_SQRT_PI
        } else {
            r
        }
    } else {
        1.0 - erfc(x)
    }
}

/// `e^x` in f32, branch-free so that a loop over a slice vectorises (`f32::exp` is a libm call and does not).
///
/// Cephes' `expf` (S. L. Moshier, Cephes Math Library, `expf.c`): `x = n ln 2 + r` with `n` the nearest integer to
/// `x log₂e` and `ln 2` split in two (`0.693359375 − 2.12194440e-4`, the first exact in few bits), `|r| ≤ ln 2 / 2`;
/// `e^r = 1 + r + r² P(r)` with Cephes' degree-5 `P`; `2ⁿ` is built from bits in two halves, so results in the
/// subnormal range are produced too (rounded once). Errors (measured, see the tests): at most 1 ulp over
/// `[−87.3, 88.7]` (normal results) on a dense sweep. `x` is clamped to `[−104, 89]` first: `e^x` is `+inf` for
/// `x ≥ 88.73` and `0` for `x ≤ −103.98`, as the correctly rounded values; NaN gives NaN.
#[inline]
#[allow(
    clippy::excessive_precision,
    reason = "Cephes' coefficients are kept at their published precision"
)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_40e-4;
    // 1.5 · 2²³: `y + SHIFT` rounds `y` to an integer held in the low mantissa bits (for |y| < 2²²).
    const SHIFT: f32 = 12_582_912.0;
    // `clamp` keeps NaN (both comparisons are false).
    let x = x.clamp(-104.0, 89.0);
    let k = x * std::f32::consts::LOG2_E + SHIFT;
    let n = k - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_150_0e-4f32;
    p = p * r + 1.398_199_950_7e-3;
    p = p * r + 8.333_451_907_3e-3;
    p = p * r + 4.166_579_589_4e-2;
    p = p * r + 1.666_666_545_9e-1;
    p = p * r + 5.000_000_120_1e-1;
    let er = p * (r * r) + r + 1.0;
    // n ∈ [−150, 129]: two factors 2^n1 · 2^n2, each a normal number.
    let ni = (k.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let pow2 = |m: i32| f32::from_bits((m.wrapping_add(127) as u32) << 23);
    er * pow2(n1) * pow2(n2)
}

/// `erf(a) / a` for `|a| ≤ 1`, as a polynomial in `s = a²` (a Lawson-iterated minimax fit of relative error
/// 4.0e-8 in f64 against mpmath's erf; degree 5).
#[inline]
#[allow(
    clippy::approx_constant,
    reason = "the fitted constant term, 1.1283791 (one f32 ulp below 2/√π rounded), is the better one for the fit"
)]
fn erf_over_x(s: f32) -> f32 {
    let mut p = -0.000_563_146_1f32;
    p = p * s + 0.004_917_562_5;
    p = p * s - 0.026_711_322;
    p = p * s + 0.112_801_805;
    p = p * s - 0.376_123_25;
    p * s + 1.128_379_1
}

/// `erfcx(a) = e^{a²} erfc(a)` for `a ≥ 1` (and up to `+inf`), as a polynomial without constant term in
/// `t = 1 / (1 + a/2)`, `t ∈ [0, 2/3]` (the variable of Abramowitz & Stegun 7.1.26, refitted: a Lawson-iterated
/// minimax fit of relative error 3.7e-8 in f64 against mpmath's erfc; degree 9).
#[inline]
#[allow(
    clippy::excessive_precision,
    reason = "the fitted coefficients as printed by the fit (shortest f32 representations)"
)]
fn erfcx_tail(a: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * a);
    let mut p = 0.023_034_208f32;
    p = p * t + 0.030_549_062;
    p = p * t - 0.157_159_03;
    p = p * t + 0.044_286_862;
    p = p * t + 0.071_420_82;
    p = p * t + 0.177_966_45;
    p = p * t + 0.246_724_92;
    p = p * t + 0.282_097_43;
    p = p * t + 0.282_094_78;
    p * t
}

/// The error function in f32, branch-free (both pieces are evaluated and one is selected, so a loop over a slice
/// vectorises): `erf(x) = x · S(x²)` for `|x| < 1`, `sign(x) · (1 − e^{−x²} · erfcx(|x|))` otherwise, with the
/// fitted polynomials of this module and [`exp_f32`].
///
/// Accuracy (measured against the f64 [`erf`] on a sweep of step 1e-5 over `[−10, 10]`, see the tests): absolute
/// error at most 1.2e-7, about one ulp of 1; relative error about 2 ulp below 1 (subnormal arguments included: erf
/// is `2x/√π` there). PyTorch's CPU `erf` (ATen `Vectorized<float>::erf`, A&S 7.1.26 times `exp(−x²)`) is exact
/// to about 1e-7 absolute. `erf(±inf) = ±1`, NaN gives NaN, `erf(−0) = −0`.
#[inline]
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let small = x * erf_over_x(x * x);
    let big = (1.0 - exp_f32(-(a * a)) * erfcx_tail(a)).copysign(x);
    if a < 1.0 { small } else { big }
}

/// The standard normal CDF and density in f32, `(Φ(x), φ(x))`, sharing one [`exp_f32`]: with `z = x / √2`,
/// `Φ(x) = (1 + erf(z)) / 2` for `|z| < 1`, otherwise `erfc(|z|) / 2 = e^{−z²} erfcx(|z|) / 2` (for `x < 0`) or
/// one minus it (`x > 0`), so the lower tail keeps its relative accuracy (no `1 − erf` cancellation);
/// `φ(x) = e^{−z²} / √(2π)`. Branch-free, for vectorised loops (the exact GELU `x Φ(x)` and its derivative
/// `Φ(x) + x φ(x)`).
///
/// Accuracy (measured, see the tests): absolute error of `Φ` below 9e-8 over `[−14, 14]`; `φ` within 6 ulp for
/// `|x| ≤ 4` (2 ulp for `|x| ≤ 1`), its relative error growing as `x²·2⁻²⁴` beyond (the rounding of `x²` in f32,
/// as in torch's `exp(−x²/2)`); `Φ(x) + x φ(x)` (the GELU derivative) within 1.6e-7 absolute. `Φ(−inf) = 0`,
/// `Φ(inf) = 1`, `φ(±inf) = 0`; NaN gives NaN for both.
#[inline]
pub fn normal_cdf_pdf_f32(x: f32) -> (f32, f32) {
    const ONE_OVER_SQRT_2PI: f32 = 0.398_942_3;
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    // e^{−x²/2} = e^{−z²}, from x (one rounding of x², not three through z).
    let e = exp_f32(-0.5 * (x * x));
    let small = 0.5 + 0.5 * (z * erf_over_x(z * z));
    let tail = 0.5 * (e * erfcx_tail(a));
    let big = if x < 0.0 { tail } else { 1.0 - tail };
    let cdf = if a < 1.0 { small } else { big };
    (cdf, e * ONE_OVER_SQRT_2PI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_known_values() {
        // Reference values from tables of erf (Abramowitz & Stegun 7.1).
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.0, 0.999_977_909_503_001_4),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-15,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
        assert!((normal_cdf(1.959_963_984_540_054) - 0.975).abs() < 1e-12);
    }

    #[test]
    fn erfc_matches_reference_values() {
        // References: CPython's math.erfc (correctly rounded to about 1 ulp).
        let cases = [
            (-3.0, 1.999_977_909_503_001_5),
            (-1.0, 1.842_700_792_949_715),
            (-0.3, 1.328_626_759_459_127_4),
            (0.0, 1.0),
            (0.2, 0.777_297_410_789_521_5),
            (0.468_75, 0.507_386_526_782_062),
            (0.5, 0.479_500_122_186_953_5),
            (1.0, 0.157_299_207_050_285_13),
            (2.0, 0.004_677_734_981_047_265),
            (3.5, 7.430_983_723_414_128e-7),
            (4.0, 1.541_725_790_028_002e-8),
            (4.5, 1.966_160_441_542_887_3e-10),
            (6.0, 2.151_973_671_249_891_6e-17),
            (10.0, 2.088_487_583_762_545e-45),
        ];
        for (x, want) in cases {
            let got = erfc(x);
            assert!(
                ((got - want) / want).abs() < 1e-14,
                "erfc({x}) = {got}, want {want}"
            );
        }
        assert_eq!(erfc(30.0), 0.0);
        assert_eq!(erfc(-30.0), 2.0);
        assert!(erfc(f64::NAN).is_nan());
        // Φ(1.96) = 0.9750021048517795, Φ(−8) = 6.220960574271819e-16.
        assert!((normal_cdf(1.96) - 0.975_002_104_851_779_5).abs() < 1e-15);
        assert!((normal_cdf(-8.0) / 6.220_960_574_271_819e-16 - 1.0).abs() < 1e-13);
    }

    /// The spacing of f32 numbers at `|v|` (the ulp), subnormals included.
    fn ulp_f32(v: f64) -> f64 {
        let f = (v.abs() as f32).max(f32::from_bits(1));
        let next = f32::from_bits(f.to_bits() + 1);
        f64::from(next) - f64::from(f)
    }

    /// `(max abs error, max error in ulp of the reference)` of `f` against `reference` at `xs`.
    fn sweep(
        xs: impl Iterator<Item = f32>,
        f: impl Fn(f32) -> f32,
        reference: impl Fn(f64) -> f64,
    ) -> (f64, f64, f32) {
        let (mut abs, mut ulp, mut at) = (0.0f64, 0.0f64, 0.0f32);
        for x in xs {
            let want = reference(f64::from(x));
            let got = f64::from(f(x));
            let e = (got - want).abs();
            abs = abs.max(e);
            let u = e / ulp_f32(want);
            if u > ulp {
                (ulp, at) = (u, x);
            }
        }
        (abs, ulp, at)
    }

    fn grid(lo: f32, hi: f32, step: f64) -> impl Iterator<Item = f32> {
        let n = ((f64::from(hi) - f64::from(lo)) / step) as usize;
        (0..=n).map(move |i| (f64::from(lo) + i as f64 * step) as f32)
    }

    #[test]
    fn exp_f32_is_within_one_ulp() {
        // Normal results: [−87.3, 88.7], step 1e-4 (1.76M points), against f64 exp (correctly rounded to f32 ± 0.5).
        let (abs_rel, ulp, at) = sweep(grid(-87.3, 88.7, 1e-4), exp_f32, f64::exp);
        eprintln!("exp_f32 on [-87.3, 88.7]: max error {ulp:.3} ulp at {at} (abs {abs_rel:e})");
        assert!(ulp <= 1.0, "exp_f32: {ulp} ulp at {at}");
        // Near 0 and on random-ish bit patterns of the whole range.
        let (_, ulp0, at0) = sweep(grid(-1.0, 1.0, 1e-6), exp_f32, f64::exp);
        eprintln!("exp_f32 on [-1, 1]: max error {ulp0:.3} ulp at {at0}");
        assert!(ulp0 <= 1.0, "exp_f32: {ulp0} ulp at {at0}");
        // Subnormal results: error within one subnormal step (plus the rounding of the reference).
        let (abs_sub, ulp_sub, at_sub) = sweep(grid(-103.9, -87.4, 1e-4), exp_f32, f64::exp);
        eprintln!("exp_f32 on [-103.9, -87.4] (subnormal results): {ulp_sub:.3} ulp at {at_sub}");
        assert!(abs_sub <= 1.5 * f64::from(f32::from_bits(1)), "{abs_sub:e}");
        assert!(ulp_sub <= 1.0, "exp_f32 subnormal: {ulp_sub} at {at_sub}");
    }

    #[test]
    fn exp_f32_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-f32::NAN).is_nan());
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(1e30), f32::INFINITY);
        assert_eq!(exp_f32(f32::MAX), f32::INFINITY);
        assert_eq!(exp_f32(-104.0), 0.0);
        assert_eq!(exp_f32(f32::MIN), 0.0);
        // The largest finite result and the smallest subnormal one.
        assert!(exp_f32(88.72).is_finite());
        assert!(exp_f32(88.72) > 3.0e38);
        assert_eq!(exp_f32(-103.2), f32::from_bits(1));
        assert_eq!(exp_f32(f32::from_bits(1)), 1.0);
        assert_eq!(exp_f32(-f32::from_bits(1)), 1.0);
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
    }

    #[test]
    fn erf_f32_is_as_exact_as_torch() {
        // Step 1e-5 over [−10, 10]: 2M points, against the f64 Cody erf.
        let (abs, ulp, at) = sweep(grid(-10.0, 10.0, 1e-5), erf_f32, erf);
        eprintln!("erf_f32 on [-10, 10]: max abs error {abs:e}, max {ulp:.3} ulp (at {at})");
        assert!(abs <= 1.5e-7, "erf_f32: max abs error {abs:e}");
        assert!(ulp <= 2.5, "erf_f32: {ulp} ulp at {at}");
        // Small arguments (relative accuracy), down to subnormals.
        let tiny = (0..2000).map(|i| 1e-38f32 * 1.05f32.powi(i).min(1e30));
        // (The f64 erf is 1 − erfc there, exact to 1e-16 absolute only: the reference is its Taylor series.)
        let taylor =
            |x: f64| std::f64::consts::FRAC_2_SQRT_PI * x * (1.0 - x * x / 3.0 + x.powi(4) / 10.0);
        let tiny = tiny.take_while(|&x| x < 1e-3);
        let (_, ulp_t, at_t) = sweep(tiny, erf_f32, taylor);
        eprintln!("erf_f32 on [1e-38, 1]: max {ulp_t:.3} ulp (at {at_t})");
        assert!(ulp_t <= 2.5, "erf_f32: {ulp_t} ulp at {at_t}");
    }

    #[test]
    fn erf_f32_special_values() {
        assert_eq!(erf_f32(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(erf_f32(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(5.0), 1.0);
        assert_eq!(erf_f32(-1e30), -1.0);
        assert_eq!(erf_f32(f32::MAX), 1.0);
        // Subnormal arguments: 2x/√π, to the rounding of the subnormal result.
        for bits in [1u32, 7, 1000, 0x007f_ffff] {
            let x = f32::from_bits(bits);
            let want = f64::from(x) * std::f64::consts::FRAC_2_SQRT_PI;
            assert!((f64::from(erf_f32(x)) - want).abs() <= f64::from(f32::from_bits(1)));
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
        // Odd on the sweep's sample.
        for x in [0.3f32, 0.999_999_9, 1.0, 2.5, 7.0] {
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
    }

    #[test]
    fn normal_cdf_pdf_f32_matches_f64() {
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let (abs, _, at) = sweep(
            grid(-14.0, 14.0, 1e-5),
            |x| normal_cdf_pdf_f32(x).0,
            normal_cdf,
        );
        eprintln!("Φ f32 on [-14, 14]: max abs error {abs:e} (worst ulp at {at})");
        assert!(abs <= 1.5e-7, "Φ: {abs:e} at {at}");
        // Lower tail: relative accuracy kept (no 1 − erf cancellation); the rounding of x²/2 in f32 costs about
        // x²·2⁻²⁴ relative.
        for x in [-2.0f32, -4.0, -6.0, -9.0, -12.0] {
            let want = normal_cdf(f64::from(x));
            let rel = (f64::from(normal_cdf_pdf_f32(x).0) - want).abs() / want;
            assert!(
                rel <= 2e-6 + f64::from(x * x) * 1.2e-7,
                "Φ({x}): rel {rel:e}"
            );
        }
        let (abs_p, ulp_p, at_p) = sweep(grid(-4.0, 4.0, 1e-5), |x| normal_cdf_pdf_f32(x).1, pdf);
        eprintln!("φ f32 on [-4, 4]: max abs error {abs_p:e}, {ulp_p:.3} ulp (at {at_p})");
        // Torch's exp(−x²/2) in f32 rounds x² the same way: relative error about x²·2⁻²⁴ on top of exp's.
        assert!(abs_p <= 1e-7, "φ: {abs_p:e} at {at_p}");
        let (_, ulp_p1, at_p1) = sweep(grid(-1.0, 1.0, 1e-5), |x| normal_cdf_pdf_f32(x).1, pdf);
        eprintln!("φ f32 on [-1, 1]: {ulp_p1:.3} ulp (at {at_p1})");
        assert!(ulp_p1 <= 3.0, "φ: {ulp_p1} ulp at {at_p1}");
        let (abs_g, _, at_g) = sweep(
            grid(-14.0, 14.0, 1e-5),
            |x| {
                let (c, p) = normal_cdf_pdf_f32(x);
                c + x * p
            },
            |x| normal_cdf(x) + x * pdf(x),
        );
        eprintln!("GELU' f32 on [-14, 14]: max abs error {abs_g:e} (worst ulp at {at_g})");
        assert!(abs_g <= 3e-7, "GELU': {abs_g:e} at {at_g}");
        assert_eq!(normal_cdf_pdf_f32(f32::NEG_INFINITY), (0.0, 0.0));
        assert_eq!(normal_cdf_pdf_f32(f32::INFINITY), (1.0, 0.0));
        assert_eq!(normal_cdf_pdf_f32(0.0), (0.5, 0.398_942_3));
        let (c, p) = normal_cdf_pdf_f32(f32::NAN);
        assert!(c.is_nan() && p.is_nan());
    }
}
