//! The experts' activations from saved pre-activations, and their backward, one row at a time (shared by the
//! reference and the grouped training paths, so both differentiate exactly the same formulas).
//!
//! Pre-activation rows, per bank (bias included):
//! - SwiGLU: `[2f]`, gate then up (`h = act(g) · u`);
//! - GPT-OSS: `[2f]`, interleaved (gate, up) pairs before the clamps (`g = min(z₀, L)`, `u = clamp(z₁, −L, L)`,
//!   `h = (u + 1) · g · σ(α g)`);
//! - MLP: `[f]` (`h = act(a)`).
//!
//! Derivatives follow torch autograd: `relu'(0) = 0`; `clamp` passes the gradient where `min ≤ x ≤ max` (the
//! boundary included, `torch.clamp`'s backward mask `(x >= min) & (x <= max)`), so GPT-OSS's gate gets none where
//! `z₀ > L` and its up none where `|z₁| > L`; exact GELU `Φ(x) + x φ(x)`; tanh GELU as torch's
//! `gelu_backward(approximate="tanh")`.
//!
//! The exact GELU, forward `x Φ(x)` and backward, is computed in f32 by [`gelu`] / [`gelu_grad`]
//! ([`moe_core::math::normal_cdf_pdf_f32`]: branch-free, so the row loops below vectorise; absolute error about
//! 1e-7, as torch's own CPU GELU, whose erf is a polynomial times `exp(−x²)` in f32).

use moe_core::math::normal_cdf_pdf_f32;
use moe_core::{Activation, ExpertBank};

use super::experts::activate;

/// The exact GELU `x Φ(x)` (torch's `F.gelu`), in f32 (see the module docs): absolute error at most about
/// `|x| · 1e-7`, relative error a few ulp.
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    x * normal_cdf_pdf_f32(x).0
}

/// The derivative of the exact GELU, `Φ(x) + x φ(x)`, in f32 (absolute error below about 2e-7).
#[inline]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    let (cdf, pdf) = normal_cdf_pdf_f32(x);
    cdf + x * pdf
}

/// `act'(v)`.
pub(crate) fn act_grad(act: Activation, v: f32) -> f32 {
    match act {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-v).exp());
            s * (1.0 + v * (1.0 - s))
        }
        Activation::Relu => {
            if v > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => gelu_grad(v),
        Activation::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            let k = 0.044_715f32;
            let t = (c * (v + k * v * v * v)).tanh();
            0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * k * v * v)
        }
    }
}

/// The activation parameters of a bank that [`hidden_row`] and [`backward_row`] need.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Act {
    /// SwiGLU with this gate activation.
    Glu(Activation),
    /// GPT-OSS's clamped GLU: `alpha`, `limit`.
    Clamped(f32, f32),
    /// MLP with this activation.
    Mlp(Activation),
}

impl Act {
    /// The activation of `bank`, `None` for PEER and custom experts (no pre-activation rows).
    pub(crate) fn of(bank: &ExpertBank) -> Option<Act> {
        match bank {
            ExpertBank::SwiGlu(b) => Some(Act::Glu(b.act())),
            ExpertBank::GptOss(b) => Some(Act::Clamped(b.alpha(), b.limit())),
            ExpertBank::Mlp(b) => Some(Act::Mlp(b.act())),
            _ => None,
        }
    }

    /// Pre-activation values per hidden value: 2 for the gated banks, 1 for MLP.
    pub(crate) fn width(self, f: usize) -> usize {
        match self {
            Act::Mlp(_) => f,
            _ => 2 * f,
        }
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Writes the hidden row `h` (`[f]`) from the pre-activation row `p` (see the module docs).
pub(crate) fn hidden_row(act: Act, p: &[f32], h: &mut [f32]) {
    let f = h.len();
    match act {
        Act::Glu(Activation::Gelu) => {
            let (g, u) = p.split_at(f);
            for ((hv, &gv), &uv) in h.iter_mut().zip(g).zip(u) {
                *hv = gelu(gv) * uv;
            }
        }
        Act::Glu(a) => {
            let (g, u) = p.split_at(f);
            for ((hv, &gv), &uv) in h.iter_mut().zip(g).zip(u) {
                *hv = activate(a, gv) * uv;
            }
        }
        Act::Clamped(alpha, limit) => {
            for (j, hv) in h.iter_mut().enumerate() {
                let g = p[2 * j].min(limit);
                let u = p[2 * j + 1].clamp(-limit, limit);
                let glu = g / (1.0 + (-(g * alpha)).exp());
                *hv = (u + 1.0) * glu;
            }
        }
        Act::Mlp(Activation::Gelu) => {
            for (hv, &z) in h.iter_mut().zip(p) {
                *hv = gelu(z);
            }
        }
        Act::Mlp(a) => {
            for (hv, &z) in h.iter_mut().zip(p) {
                *hv = activate(a, z);
            }
        }
    }
}

/// Replaces the pre-activation row `p` by its gradient, given `dh` (`[f]`), the gradient of the hidden row.
pub(crate) fn backward_row(act: Act, p: &mut [f32], dh: &[f32]) {
    let f = dh.len();
    match act {
        Act::Glu(Activation::Gelu) => {
            let (g, u) = p.split_at_mut(f);
            for ((gv, uv), &d) in g.iter_mut().zip(u.iter_mut()).zip(dh) {
                let (x, y) = (*gv, *uv);
                let (cdf, pdf) = normal_cdf_pdf_f32(x);
                *gv = d * y * (cdf + x * pdf);
                *uv = d * (x * cdf);
            }
        }
        Act::Glu(a) => {
            let (g, u) = p.split_at_mut(f);
            for ((gv, uv), &d) in g.iter_mut().zip(u.iter_mut()).zip(dh) {
                let (x, y) = (*gv, *uv);
                *gv = d * y * act_grad(a, x);
                *uv = d * activate(a, x);
            }
        }
        Act::Clamped(alpha, limit) => {
            for (j, &d) in dh.iter().enumerate() {
                let (zg, zu) = (p[2 * j], p[2 * j + 1]);
                let g = zg.min(limit);
                let u = zu.clamp(-limit, limit);
                let s = sigmoid(alpha * g);
                let glu = g * s;
                let dglu = s + alpha * g * s * (1.0 - s);
                p[2 * j] = if zg <= limit {
                    d * (u + 1.0) * dglu
                } else {
                    0.0
                };
                p[2 * j + 1] = if (-limit..=limit).contains(&zu) {
                    d * glu
                } else {
                    0.0
                };
            }
        }
        Act::Mlp(Activation::Gelu) => {
            for (z, &d) in p.iter_mut().zip(dh) {
                *z = d * gelu_grad(*z);
            }
        }
        Act::Mlp(a) => {
            for (z, &d) in p.iter_mut().zip(dh) {
                *z = d * act_grad(a, *z);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn act_grad_matches_finite_differences() {
        for act in [
            Activation::Silu,
            Activation::Relu,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            for &v in &[-3.0f32, -0.7, 0.3, 1.1, 4.0] {
                let h = 1e-3f32;
                let fd =
                    (activate(act, v + h) as f64 - activate(act, v - h) as f64) / (2.0 * h as f64);
                let an = act_grad(act, v) as f64;
                assert!((an - fd).abs() < 2e-3, "{act:?} at {v}: {an} vs {fd}");
            }
        }
    }

    #[test]
    fn clamped_glu_has_no_gradient_past_the_limits_and_one_at_them() {
        let act = Act::Clamped(1.702, 1.0);
        // Gate above the limit, up below -limit: both gradients 0.
        let mut p = [2.0f32, -3.0];
        backward_row(act, &mut p, &[1.0]);
        assert_eq!(p, [0.0, 0.0]);
        // At the limits exactly: torch's clamp passes the gradient.
        let mut p = [1.0f32, -1.0];
        backward_row(act, &mut p, &[1.0]);
        assert!(p[1] != 0.0, "up at -limit gets the gradient");
        assert_eq!(p[0], 0.0, "(u + 1) = 0 at u = -1");
        let mut p = [1.0f32, 0.5];
        backward_row(act, &mut p, &[1.0]);
        assert!(p[0] != 0.0, "gate at the limit gets the gradient");
    }

    /// The exact GELU as it was computed before (f64 Cody erf and libm exp, per element): the reference of the
    /// agreement test and the "before" of the timing.
    fn gelu_f64(v: f32) -> f32 {
        let x = f64::from(v);
        (0.5 * x * (1.0 + moe_core::math::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
    }

    fn gelu_grad_f64(v: f32) -> f32 {
        let x = f64::from(v);
        let cdf = 0.5 * (1.0 + moe_core::math::erf(x * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (cdf + x * pdf) as f32
    }

    #[test]
    fn f32_gelu_rows_agree_with_the_f64_formulas() {
        // Rows of a sweep over [−12, 12]; MLP and SwiGLU banks, forward and backward.
        let f = 4001;
        let z: Vec<f32> = (0..f)
            .map(|i| -12.0 + 24.0 * i as f32 / (f - 1) as f32)
            .collect();
        let dh: Vec<f32> = (0..f).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut h = vec![0.0f32; f];
        hidden_row(Act::Mlp(Activation::Gelu), &z, &mut h);
        let mut g = z.clone();
        backward_row(Act::Mlp(Activation::Gelu), &mut g, &dh);
        for i in 0..f {
            let (want_h, want_g) = (gelu_f64(z[i]), dh[i] * gelu_grad_f64(z[i]));
            let tol = 2e-7 * z[i].abs().max(1.0);
            assert!(
                (h[i] - want_h).abs() <= tol,
                "gelu({}) = {} vs {want_h}",
                z[i],
                h[i]
            );
            assert!(
                (g[i] - want_g).abs() <= 2.0 * tol,
                "gelu'({}): {} vs {want_g}",
                z[i],
                g[i]
            );
            assert_eq!(
                activate(Activation::Gelu, z[i]),
                h[i],
                "forward and training agree"
            );
        }
        let up: Vec<f32> = dh.iter().map(|v| v - 1.0).collect();
        let p: Vec<f32> = z.iter().chain(&up).copied().collect();
        let mut hg = vec![0.0f32; f];
        hidden_row(Act::Glu(Activation::Gelu), &p, &mut hg);
        let mut pg = p.clone();
        backward_row(Act::Glu(Activation::Gelu), &mut pg, &dh);
        for i in 0..f {
            assert_eq!(hg[i], h[i] * up[i]);
            let want_g = dh[i] * up[i] * gelu_grad_f64(z[i]);
            let want_u = dh[i] * gelu_f64(z[i]);
            let tol = 4e-7 * z[i].abs().max(1.0);
            assert!(
                (pg[i] - want_g).abs() <= tol,
                "{}: {} vs {want_g}",
                z[i],
                pg[i]
            );
            assert!(
                (pg[f + i] - want_u).abs() <= tol,
                "{}: {} vs {want_u}",
                z[i],
                pg[f + i]
            );
        }
    }

    /// A [768, 512] block of pre-activations, N(0, 1)-like values (a fixed LCG, Box–Muller-free: sum of uniforms).
    fn block() -> (Vec<f32>, Vec<f32>) {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            ((state >> 40) as f32) / (1u64 << 24) as f32
        };
        let z = (0..768 * 512)
            .map(|_| (0..4).map(|_| next()).sum::<f32>() * 1.7 - 3.4)
            .collect();
        let dh = (0..768 * 512).map(|_| next() - 0.5).collect();
        (z, dh)
    }

    const BENCH_REPS: usize = 40;

    /// Timing (run under `perf stat -e task-clock`): the f32 rows, hidden_row then backward_row, on a [768, 512]
    /// block, BENCH_REPS times.
    #[test]
    #[ignore = "a timing, run by hand under perf stat"]
    fn bench_gelu_rows_f32() {
        let (z, dh) = block();
        let (mut h, mut g) = (vec![0.0f32; 512], vec![0.0f32; 512]);
        let mut sum = 0.0f32;
        for _ in 0..BENCH_REPS {
            for (zr, dr) in z.chunks(512).zip(dh.chunks(512)) {
                hidden_row(Act::Mlp(Activation::Gelu), zr, &mut h);
                g.copy_from_slice(zr);
                backward_row(Act::Mlp(Activation::Gelu), &mut g, dr);
                sum += h[7] + g[11];
            }
        }
        eprintln!("{}", std::hint::black_box(sum));
    }

    /// Timing: the setup alone (the block), to subtract from the two timings.
    #[test]
    #[ignore = "a timing, run by hand under perf stat"]
    fn bench_gelu_rows_setup() {
        let (z, dh) = block();
        eprintln!("{}", std::hint::black_box(z[7] + dh[11]));
    }

    /// Timing: the same work with the former per-element f64 formulas.
    #[test]
    #[ignore = "a timing, run by hand under perf stat"]
    fn bench_gelu_rows_f64_before() {
        let (z, dh) = block();
        let (mut h, mut g) = (vec![0.0f32; 512], vec![0.0f32; 512]);
        let mut sum = 0.0f32;
        for _ in 0..BENCH_REPS {
            for (zr, dr) in z.chunks(512).zip(dh.chunks(512)) {
                for (hv, &v) in h.iter_mut().zip(std::hint::black_box(zr)) {
                    *hv = gelu_f64(v);
                }
                for ((gv, &v), &d) in g.iter_mut().zip(zr).zip(dr) {
                    *gv = d * gelu_grad_f64(v);
                }
                sum += h[7] + g[11];
            }
        }
        eprintln!("{}", std::hint::black_box(sum));
    }
}
