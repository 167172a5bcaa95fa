//! The router kit: what a plugin router needs to be as good as a built-in, written once. Seeded gate init, gate
//! logits, stable top-k, softmax / sigmoid / softplus, input checks, and the limits every router shares.

use ndarray::{Array1, Array2, ArrayView2};

use crate::error::{MoeError, check_finite};
use crate::rng::SeqRng;
use crate::router::RouterInput;

/// Random stream of the gate matrix in registry factories: every dense-gate router built from the same
/// [`RouterArgs`](crate::registry::RouterArgs) seed gets the same `W_g`, so comparisons differ by routing rule alone.
pub const GATE_STREAM: u64 = 1;

/// Largest number of experts a dense-gate router accepts (PEER, which never builds `[T, N]`, is not bound by it).
pub const MAX_DENSE_EXPERTS: usize = 1 << 20;

/// Largest `E` for which a plan keeps the router logits `[T, E]` ([`Routing::set_logits`](crate::routing::Routing::set_logits)):
/// enough for every released dense-gate MoE, small enough that `[T, E]` stays a fraction of the hidden states.
/// Routers and device backends alike use this one limit.
pub const KEEP_LOGITS_MAX_EXPERTS: usize = 4096;

/// Router logits `x · gateᵀ (+ bias)`, `[T, E]`, in f32, computed in a fixed order (same bits on any thread count).
///
/// # Errors
/// [`MoeError::NonFinite`] naming the token if a logit overflows to infinity or is NaN.
pub fn gate_logits(
    x: ArrayView2<'_, f32>,
    gate: ArrayView2<'_, f32>,
    bias: Option<&Array1<f32>>,
) -> Result<Array2<f32>, MoeError> {
    let mut l = x.dot(&gate.t());
    if let Some(b) = bias {
        l += b;
    }
    check_finite("router logits", l.view())?;
    Ok(l)
}

/// Indices of the `k` largest values, in descending value order; ties go to the lower index. `k` is clamped to the
/// length. `O(n)` selection plus `O(k log k)` sort.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..values.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// In-place softmax of one row, in f32 with the max subtracted (as PyTorch's `softmax(dtype=float32)`).
pub fn softmax_in_place(row: &mut [f32]) {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in row.iter_mut() {
        *v /= s;
    }
}

/// `1 / (1 + e^{-x})`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + e^x)`, stable for large `|x|`.
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// Checks `input` for a router of width `d` (`None` = any) with `n_experts` experts and top-k `k`.
///
/// # Errors
/// [`MoeError::TopK`] for `k = 0` or `k > E`, then [`RouterInput::validate`]'s errors.
pub fn check_input(
    input: &RouterInput<'_>,
    d: Option<usize>,
    n_experts: usize,
    k: usize,
) -> Result<(), MoeError> {
    if k == 0 || k > n_experts {
        return Err(MoeError::TopK { k, n_experts });
    }
    input.validate(d)
}

/// A gate matrix `[E, d]` with `N(0, 1/d)` entries (the scale of `nn.Linear`-style init), seeded.
///
/// # Errors
/// [`MoeError::TooLarge`] past [`MAX_DENSE_EXPERTS`] experts or `2^31` values; [`MoeError::InvalidConfig`] for a
/// zero size.
pub fn init_gate(
    d: usize,
    n_experts: usize,
    seed: u64,
    stream: u64,
) -> Result<Array2<f32>, MoeError> {
    if d == 0 || n_experts == 0 {
        return Err(MoeError::config(
            "d/E",
            format!("{d}/{n_experts}"),
            "must both be >= 1",
        ));
    }
    if n_experts > MAX_DENSE_EXPERTS {
        return Err(MoeError::TooLarge {
            what: "experts".into(),
            size: n_experts as u128,
            limit: MAX_DENSE_EXPERTS as u128,
        });
    }
    let values = d as u128 * n_experts as u128;
    if values > (1u128 << 31) {
        return Err(MoeError::TooLarge {
            what: "gate matrix E * d".into(),
            size: values,
            limit: 1 << 31,
        });
    }
    let mut rng = SeqRng::new(seed, stream);
    Ok(rng.normal_matrix(n_experts, d, 1.0 / (d as f32).sqrt()))
}

/// Checks a user-given gate `[E, d]`: non-empty, finite.
///
/// # Errors
/// [`MoeError::Shape`] or [`MoeError::NonFinite`] with `name`.
pub fn check_gate(name: &str, gate: &Array2<f32>) -> Result<(), MoeError> {
    if gate.nrows() == 0 || gate.ncols() == 0 {
        return Err(MoeError::shape(name, "[E >= 1, d >= 1]", gate.shape()));
    }
    check_finite(name, gate.view())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_stable_and_ordered() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[0.5; 5], 2), vec![0, 1]);
        assert_eq!(top_k(&[1.0], 4), vec![0]);
        assert!(top_k(&[], 1).is_empty());
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut r = [1.0f32, 2.0, 3.0];
        softmax_in_place(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // e^1 / (e^1 + e^2 + e^3) = 0.09003057
        assert!((r[0] - 0.090_030_57).abs() < 1e-6);
    }
}
