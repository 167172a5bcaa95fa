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
//! `z₀ > L` and its up none where `|z₁| > L`; exact GELU `Φ(x) + x φ(x)` (in f64, as its forward); tanh GELU as
//! torch's `gelu_backward(approximate="tanh")`.

use moe_core::{Activation, ExpertBank};

use super::experts::activate;

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
        Activation::Gelu => {
            let x = v as f64;
            let cdf = 0.5 * (1.0 + moe_core::math::erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + x * pdf) as f32
        }
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
}
