//! The backward of the router kit's pieces, so a plugin's [`Router::backward`](crate::router::Router::backward) is a
//! few lines: the linear gate ([`gate_backward`]), the score functions ([`softmax_backward`], [`sigmoid_backward`],
//! [`sqrt_softplus_backward`], [`score_backward`]), renormalisation and scaling of the top-k weights
//! ([`renormalize_backward`]), and the losses ([`load_balance_backward`], [`z_loss_backward`],
//! [`cv_squared_backward`]). Each takes what the forward computed and the gradient of its output, and returns (or
//! writes) the gradient of its input; every formula is the derivative of the forward's, cited there.
//!
//! Top-k itself has no backward: the indices are constants (the gradient of a kept weight flows to its score, a
//! dropped or unselected expert's score gets none from the combine).

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::error::MoeError;
use crate::loss::LbNorm;
use crate::router::ScoreFn;

use super::{sigmoid, softplus};

/// The gradients of a linear gate `l = x · gateᵀ (+ bias)`.
#[derive(Debug, Clone, PartialEq)]
pub struct GateGrads {
    /// `dL/dx = d_logits · gate`, `[T, d]`.
    pub d_x: Array2<f32>,
    /// `dL/d gate = d_logitsᵀ · x`, `[E, d]`.
    pub d_gate: Array2<f32>,
    /// `dL/d bias = Σ_t d_logits[t]`, `[E]`.
    pub d_bias: Array1<f32>,
}

/// The backward of [`gate_logits`](super::gate_logits) `l = x · gateᵀ (+ bias)`: given `d_logits` `[T, E]`, returns
/// [`GateGrads`]: `d_logits · gate`, `d_logitsᵀ · x`, `Σ_t d_logits[t]`.
///
/// # Errors
/// [`MoeError::Shape`] naming `d_logits` when the shapes disagree.
pub fn gate_backward(
    x: ArrayView2<'_, f32>,
    gate: ArrayView2<'_, f32>,
    d_logits: ArrayView2<'_, f32>,
) -> Result<GateGrads, MoeError> {
    let (t, _) = x.dim();
    let (e, _) = gate.dim();
    if d_logits.dim() != (t, e) || x.ncols() != gate.ncols() {
        return Err(MoeError::shape(
            "d_logits",
            format!("[{t}, {e}] (x [T, d], gate [E, d] with one d)"),
            d_logits.shape(),
        ));
    }
    Ok(GateGrads {
        d_x: d_logits.dot(&gate),
        d_gate: d_logits.t().dot(&x),
        d_bias: d_logits.sum_axis(ndarray::Axis(0)),
    })
}

/// The backward of a softmax over one row (`p = softmax(l)`, any length): `dl_i = p_i · (dp_i − Σ_j p_j dp_j)`,
/// written into `d_logits` (same length).
pub fn softmax_backward(p: &[f32], d_p: &[f32], d_logits: &mut [f32]) {
    let s: f32 = p.iter().zip(d_p).map(|(&a, &b)| a * b).sum();
    for ((o, &pi), &gi) in d_logits.iter_mut().zip(p).zip(d_p) {
        *o = pi * (gi - s);
    }
}

/// The backward of `s = sigmoid(l)` from the score itself: `dl = ds · s · (1 − s)`.
pub fn sigmoid_backward(s: f32, d_s: f32) -> f32 {
    d_s * s * (1.0 - s)
}

/// The backward of `s = √softplus(l)` from the logit: `dl = ds · sigmoid(l) / (2 √softplus(l))` (0 where the
/// score underflowed to 0).
pub fn sqrt_softplus_backward(l: f32, d_s: f32) -> f32 {
    let sp = softplus(l).sqrt();
    if sp == 0.0 {
        0.0
    } else {
        d_s * sigmoid(l) / (2.0 * sp)
    }
}

/// The backward of a score function over one row: `logits` and `scores` `[E]` as the forward computed them,
/// `d_scores` `[E]` the gradient of the scores; writes `d_logits` `[E]`.
pub fn score_backward(
    score: ScoreFn,
    logits: &[f32],
    scores: &[f32],
    d_scores: &[f32],
    d_logits: &mut [f32],
) {
    match score {
        ScoreFn::Softmax => softmax_backward(scores, d_scores, d_logits),
        ScoreFn::Sigmoid => {
            for ((o, &s), &g) in d_logits.iter_mut().zip(scores).zip(d_scores) {
                *o = sigmoid_backward(s, g);
            }
        }
        ScoreFn::SqrtSoftplus => {
            for ((o, &l), &g) in d_logits.iter_mut().zip(logits).zip(d_scores) {
                *o = sqrt_softplus_backward(l, g);
            }
        }
    }
}

/// The backward of renormalised, scaled top-k weights `w_i = scale · r_i / (Σ_j r_j + eps)` (`eps` as the forward
/// used it: 0 for Mixtral and Qwen, 1e-20 for DeepSeek-V3): given the raw values `r` `[k]` and `dL/dw` `[k]`,
/// writes `dL/dr_j = scale · (dw_j − Σ_i dw_i · r_i / S) / S` with `S = Σ r + eps`. Without renormalisation the
/// backward of `w = scale · r` is `dr = scale · dw`: call it with `renormalize = false`.
pub fn renormalize_backward(
    raw: &[f32],
    d_w: &[f32],
    renormalize: bool,
    eps: f32,
    scale: f32,
    d_raw: &mut [f32],
) {
    if !renormalize {
        for (o, &g) in d_raw.iter_mut().zip(d_w) {
            *o = scale * g;
        }
        return;
    }
    let s: f32 = raw.iter().sum::<f32>() + eps;
    let dot: f32 = raw.iter().zip(d_w).map(|(&r, &g)| r * g).sum::<f32>() / s;
    for (o, &g) in d_raw.iter_mut().zip(d_w) {
        *o = scale * (g - dot) / s;
    }
}

/// The backward of [`load_balance`](crate::loss::load_balance) with respect to `probs` `[T, E]` (the counts are
/// constants: argmax and top-k are not differentiable): `d probs[t, e] = d_value · C · f_e / T` with
/// `f_e = counts_e / T` and `C = E` (`HfTopK`, `HfSwitch`) or `E / k` (`Megatron`, `DeepSpeed`). Returns zeros for
/// `T = 0`.
pub fn load_balance_backward(
    t: usize,
    counts: &[usize],
    n_experts: usize,
    k: usize,
    norm: LbNorm,
    d_value: f32,
) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((t, n_experts));
    if t == 0 || n_experts == 0 {
        return out;
    }
    let c = match norm {
        LbNorm::HfTopK | LbNorm::HfSwitch => n_experts as f64,
        LbNorm::Megatron | LbNorm::DeepSpeed => n_experts as f64 / k.max(1) as f64,
    };
    let tt = t as f64;
    for (e, mut col) in out.columns_mut().into_iter().enumerate() {
        let f = counts.get(e).copied().unwrap_or(0) as f64 / tt;
        col.fill((d_value as f64 * c * f / tt) as f32);
    }
    out
}

/// The backward of [`z_loss`](crate::loss::z_loss) `mean_t (logsumexp_e l[t, e])²`: `dl[t, e] = d_value · 2 ·
/// lse_t · softmax(l_t)_e / T`.
pub fn z_loss_backward(logits: ArrayView2<'_, f32>, d_value: f32) -> Array2<f32> {
    let t = logits.nrows();
    let mut out = Array2::<f32>::zeros(logits.dim());
    if t == 0 {
        return out;
    }
    for (row, mut o) in logits.outer_iter().zip(out.outer_iter_mut()) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let s: f64 = row.iter().map(|&l| (l as f64 - m).exp()).sum();
        let lse = m + s.ln();
        let c = d_value as f64 * 2.0 * lse / t as f64;
        for (ov, &l) in o.iter_mut().zip(row.iter()) {
            *ov = (c * (l as f64 - m).exp() / s) as f32;
        }
    }
    out
}

/// The backward of [`cv_squared`](crate::loss::cv_squared) `CV² = var / mean²` (population variance): with `n`
/// values of mean `m` and variance `v`, `d x_i = d_value · (2 (x_i − m) / (n m²) − 2 v / (n m³))`; zeros where the
/// forward returned its constant 0 (fewer than 2 values, zero mean).
pub fn cv_squared_backward(values: ArrayView1<'_, f64>, d_value: f32) -> Array1<f64> {
    let n = values.len();
    let mut out = Array1::<f64>::zeros(n);
    if n < 2 {
        return out;
    }
    let nf = n as f64;
    let m = values.sum() / nf;
    if m == 0.0 {
        return out;
    }
    let v = values.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / nf;
    let d = d_value as f64;
    for (o, &x) in out.iter_mut().zip(values.iter()) {
        *o = d * (2.0 * (x - m) / (nf * m * m) - 2.0 * v / (nf * m * m * m));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::{softmax_in_place, sqrt_softplus};
    use crate::loss::{cv_squared, load_balance, z_loss};
    use ndarray::array;

    /// Central difference of `f` at `x` in f64.
    fn fd(f: impl Fn(f64) -> f64, x: f64) -> f64 {
        let h = 1e-4;
        (f(x + h) - f(x - h)) / (2.0 * h)
    }

    #[test]
    fn score_functions_match_finite_differences() {
        for l in [-3.0f32, -0.5, 0.0, 0.7, 4.0] {
            let s = sigmoid(l);
            let want = fd(|v| 1.0 / (1.0 + (-v).exp()), l as f64);
            assert!((sigmoid_backward(s, 1.0) as f64 - want).abs() < 1e-6);
            let want = fd(|v| (1.0 + v.exp()).ln().sqrt(), l as f64);
            assert!(
                (sqrt_softplus_backward(l, 1.0) as f64 - want).abs() < 1e-5,
                "{l}"
            );
            assert!(sqrt_softplus(l) > 0.0);
        }
        // softmax: d/dl of Σ c_i p_i.
        let l = [0.3f32, -1.2, 2.0, 0.1];
        let c = [0.5f32, -1.0, 2.0, 0.25];
        let mut p = l;
        softmax_in_place(&mut p);
        let mut dl = [0.0f32; 4];
        softmax_backward(&p, &c, &mut dl);
        for i in 0..4 {
            let f = |v: f64| {
                let mut r: Vec<f64> = l.iter().map(|&x| x as f64).collect();
                r[i] = v;
                let m = r.iter().cloned().fold(f64::MIN, f64::max);
                let s: f64 = r.iter().map(|x| (x - m).exp()).sum();
                r.iter()
                    .zip(&c)
                    .map(|(x, &ci)| ci as f64 * (x - m).exp() / s)
                    .sum()
            };
            assert!((dl[i] as f64 - fd(f, l[i] as f64)).abs() < 1e-5, "{i}");
        }
    }

    #[test]
    fn renormalisation_matches_finite_differences() {
        let r = [0.4f32, 0.1, 0.25];
        let c = [1.0f32, -2.0, 0.5];
        let mut d = [0.0f32; 3];
        renormalize_backward(&r, &c, true, 0.0, 2.5, &mut d);
        for j in 0..3 {
            let f = |v: f64| {
                let mut rr: Vec<f64> = r.iter().map(|&x| x as f64).collect();
                rr[j] = v;
                let s: f64 = rr.iter().sum();
                rr.iter()
                    .zip(&c)
                    .map(|(x, &ci)| 2.5 * ci as f64 * x / s)
                    .sum()
            };
            assert!((d[j] as f64 - fd(f, r[j] as f64)).abs() < 1e-4, "{j}");
        }
        renormalize_backward(&r, &c, false, 0.0, 2.5, &mut d);
        assert_eq!(d, [2.5, -5.0, 1.25]);
    }

    #[test]
    fn losses_match_finite_differences() {
        let probs = array![[0.2f32, 0.5, 0.3], [0.6, 0.1, 0.3]];
        let counts = [1usize, 2, 1];
        for norm in [LbNorm::HfTopK, LbNorm::Megatron] {
            let g = load_balance_backward(2, &counts, 3, 2, norm, 1.0);
            let mut p = probs.clone();
            p[[1, 2]] += 1e-3;
            let up = load_balance(p.view(), &counts, 2, norm);
            p[[1, 2]] -= 2e-3;
            let down = load_balance(p.view(), &counts, 2, norm);
            assert!(((up - down) / 2e-3 - g[[1, 2]]).abs() < 1e-3, "{norm:?}");
        }
        let l = array![[0.3f32, -1.0, 2.0], [1.5, 0.5, -0.5]];
        let g = z_loss_backward(l.view(), 1.0);
        let mut p = l.clone();
        p[[0, 2]] += 1e-3;
        let up = z_loss(p.view());
        p[[0, 2]] -= 2e-3;
        let down = z_loss(p.view());
        assert!(((up - down) / 2e-3 - g[[0, 2]]).abs() < 1e-3);
        let v = array![1.0f64, 3.0, 2.5, 0.5];
        let g = cv_squared_backward(v.view(), 1.0);
        let f = |x: f64| {
            let mut w = v.to_vec();
            w[1] = x;
            cv_squared(&w) as f64
        };
        assert!((g[1] - fd(f, 3.0)).abs() < 1e-4);
        assert_eq!(cv_squared_backward(array![2.0f64].view(), 1.0)[0], 0.0);
    }

    #[test]
    fn gate_backward_shapes_and_values() {
        let x = array![[1.0f32, 2.0], [0.5, -1.0], [0.0, 3.0]];
        let gate = array![[0.1f32, 0.2], [0.3, -0.4]];
        let dl = array![[1.0f32, 0.0], [0.0, 2.0], [1.0, 1.0]];
        let g = gate_backward(x.view(), gate.view(), dl.view()).expect("shapes");
        assert_eq!(g.d_x, dl.dot(&gate));
        assert_eq!(g.d_gate, dl.t().dot(&x));
        assert_eq!(g.d_bias, array![2.0f32, 3.0]);
        assert!(gate_backward(x.view(), gate.view(), dl.t()).is_err());
    }
}
