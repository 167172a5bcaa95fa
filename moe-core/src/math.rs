//! Scalar special functions shared by routers and backends: `erf` (exact GELU, the normal CDF of noisy top-k).

/// The error function, computed in f64 to about 1e-15 relative accuracy: a Taylor series for `|x| < 2.5`, and a
/// continued fraction for `erfc` beyond.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(x) = 2/√π Σ_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = a * a;
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        1.0 - erfc_large(a)
    };
    if x < 0.0 { -r } else { r }
}

/// `erfc(a)` for `a >= 2.5`: `e^{-a²}/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))`, evaluated backwards.
fn erfc_large(a: f64) -> f64 {
    if a > 27.0 {
        return 0.0;
    }
    let mut f = a;
    for n in (1..=60).rev() {
        f = a + (n as f64 / 2.0) / f;
    }
    (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
}

/// Standard normal CDF `Φ(x) = (1 + erf(x / √2)) / 2`.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))
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
                (erf(x) - want).abs() < 1e-14,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
        assert!((normal_cdf(1.959_963_984_540_054) - 0.975).abs() < 1e-12);
    }
}
