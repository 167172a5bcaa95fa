//! The router kit: what a plugin router needs to be as good as a built-in, written once and used by every built-in
//! router. Seeded gate init ([`init_gate`], [`GATE_STREAM`]), the linear gate ([`gate_logits`]), top-k and argmax
//! in the exact-arithmetic order (score, then logit, then lower id: [`rank_cmp`], [`top_k_ranked`],
//! [`argmax_ranked`], [`top_k`]), the score functions ([`softmax_in_place`], [`sigmoid`], [`softplus`],
//! [`sqrt_softplus`]), input and parameter checks ([`check_input`], [`check_gate`], [`check_dense_experts`]) and the
//! limits every router shares ([`MAX_DENSE_EXPERTS`], [`KEEP_LOGITS_MAX_EXPERTS`]); and the backward of each piece
//! ([`gate_backward`], [`softmax_backward`], [`sigmoid_backward`], [`sqrt_softplus_backward`], [`score_backward`],
//! [`renormalize_backward`], [`load_balance_backward`],
//! [`z_loss_backward`], [`cv_squared_backward`]) for a router's [`Router::backward`](crate::router::Router::backward).
//!
//! Shapes: `T` tokens, `d` hidden, `E` experts, `k` per token. The formulas are those of docs/ROUTERS.md, cited per
//! item.

mod backward;

pub use backward::{
    GateGrads, cv_squared_backward, gate_backward, load_balance_backward, renormalize_backward,
    score_backward, sigmoid_backward, softmax_backward, sqrt_softplus_backward, z_loss_backward,
};

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

/// Router logits `l = x · gateᵀ (+ bias)`, `[T, E]`, in f32 (the linear gate of every dense router, `nn.Linear`
/// layout: `x` is `[T, d]`, `gate` is `[E, d]`, `bias` is `[E]`), computed in a fixed order so that the same input
/// gives the same bits on any thread count and whatever the other rows hold.
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

/// Indices of the `k` largest values (`values` is one row, `[E]`), in descending value order, ties to the lower
/// index: [`top_k_ranked`] with the values as their own tie-break key. Use it where the values are the raw logits
/// (or anything that does not saturate); where a score function of the logits is ranked, use [`top_k_ranked`] with
/// the logits as the key. `k` is clamped to the length. `O(E)` selection plus `O(k log k)` sort.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    top_k_ranked(values, values, k)
}

/// The exact-arithmetic ranking order of every top-k and argmax (docs/ROUTERS.md §1, "Ties"): `a` ranks before `b`
/// when its f32 `score` is larger, or the scores are equal and its `key` (the raw logit) is larger, or both are
/// equal and its index is lower. Returns [`Ordering::Less`](std::cmp::Ordering::Less) when `a` ranks first.
///
/// Why the second key: the score functions are strictly increasing in the logit, but f32 saturates them (sigmoid is
/// exactly 1.0 above about 16.7, softmax underflows to 0 about 104 below the row's maximum, sqrt-softplus rounds
/// alike), so two distinct logits can share one f32 score. The logit breaks that tie as exact arithmetic would, and
/// the index breaks the remaining ties, so a selection never depends on the thread count, the sort algorithm or
/// the backend. The key must be strictly increasing where the score is (the logit for softmax / sigmoid /
/// sqrt-softplus of one row; the log-probability `l − logsumexp(l)` when scores of different rows are compared);
/// with an additive per-expert bias the score is `s + b` and the key stays the logit (exact when the biases are
/// equal, a deterministic tie-break otherwise). Values are compared with [`f32::total_cmp`]: `-inf` ranks below
/// every number, NaN (which routers never pass: their inputs are checked) above `+inf`. Indices outside either
/// slice rank as `-inf` would.
pub fn rank_cmp(score: &[f32], key: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    let s = |i: usize| score.get(i).copied().unwrap_or(f32::NEG_INFINITY);
    let l = |i: usize| key.get(i).copied().unwrap_or(f32::NEG_INFINITY);
    s(b).total_cmp(&s(a))
        .then(l(b).total_cmp(&l(a)))
        .then(a.cmp(&b))
}

/// Indices of the `k` best entries of one row by the exact-arithmetic order [`rank_cmp`] (`score` and `key` are
/// `[E]`: the selection score and the raw logit), best first. `k` is clamped to the length of `score`. `O(E)`
/// selection plus `O(k log k)` sort; the result depends only on the values, never on the algorithm.
pub fn top_k_ranked(score: &[f32], key: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(score.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| rank_cmp(score, key, *a, *b);
    let mut idx: Vec<usize> = (0..score.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        // The result holds k indices, not the E of the scratch: a router keeping one per token stays O(T·k).
        idx.shrink_to_fit();
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// The best index of one row by [`rank_cmp`] (`None` for an empty row): the argmax of `score`, ties broken by the
/// larger `key`, then the lower index.
pub fn argmax_ranked(score: &[f32], key: &[f32]) -> Option<usize> {
    (0..score.len()).min_by(|&a, &b| rank_cmp(score, key, a, b))
}

/// In-place softmax of one row (`[E]` or `[k]`): `p_i = e^{l_i − m} / Σ_j e^{l_j − m}` with `m = max_j l_j`, in
/// f32 (as PyTorch's `softmax(dtype=torch.float32)`). Subtracting the maximum keeps it finite for any finite
/// logits, however large (`[1000, 1000]` gives `[0.5, 0.5]`); `-inf` entries get 0 as long as one entry is finite.
/// An empty row is left as it is.
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

/// The logistic function `σ(x) = 1 / (1 + e^{−x})` (DeepSeek-V3's score function, docs/ROUTERS.md §1). Saturates to
/// 0 and 1 without NaN.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `softplus(x) = ln(1 + e^x)`, stable for large `|x|`: `x` above 20 and `e^x` below −20, PyTorch's
/// `F.softplus` threshold (there the error of either shortcut is below f32 resolution). The noise scale of noisy
/// top-k (Shazeer et al. 2017, docs/ROUTERS.md §2).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.exp().ln_1p()
    }
}

/// The `sqrt_softplus` score `√softplus(x)` ([`ScoreFn::SqrtSoftplus`](crate::router::ScoreFn::SqrtSoftplus),
/// docs/ROUTERS.md §1): positive, `√x` for large `x`, `e^{x/2}` for very negative `x`.
pub fn sqrt_softplus(x: f32) -> f32 {
    softplus(x).sqrt()
}

/// Checks `input` for a router of width `d` (`None` = any) with `n_experts` experts and top-k `k`.
///
/// # Errors
/// [`MoeError::TopK`] for `k = 0` or `k > E`, then [`RouterInput::validate`]'s errors (wrong width or lengths,
/// a NaN or infinity naming the token).
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

/// A seeded gate matrix `[E, d]` with `N(0, 1/d)` entries (the scale of `nn.Linear`-style init, so logits of a
/// unit-scale input are about unit scale), drawn from `SeqRng::new(seed, stream)` in row-major order. Registry
/// factories pass [`GATE_STREAM`] so that every dense router of one seed starts from the same `W_g`.
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
    check_dense_experts(n_experts)?;
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

/// Checks the expert count `E` of a dense-gate router against [`MAX_DENSE_EXPERTS`].
///
/// # Errors
/// [`MoeError::TooLarge`] past the limit.
pub fn check_dense_experts(n_experts: usize) -> Result<(), MoeError> {
    if n_experts > MAX_DENSE_EXPERTS {
        return Err(MoeError::TooLarge {
            what: "experts".into(),
            size: n_experts as u128,
            limit: MAX_DENSE_EXPERTS as u128,
        });
    }
    Ok(())
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
    fn top_k_orders_infinities_and_clamps() {
        let inf = f32::INFINITY;
        assert_eq!(top_k(&[-inf, 0.0, inf, -1.0], 4), vec![2, 1, 3, 0]);
        // Ties at the k-th place: the lower index wins, whatever the selection algorithm moved.
        let v = [2.0f32, 1.0, 2.0, 1.0, 2.0, 1.0];
        assert_eq!(top_k(&v, 4), vec![0, 2, 4, 1]);
        assert!(top_k(&v, 0).is_empty());
    }

    #[test]
    fn ranking_breaks_saturated_ties_by_the_logit() {
        // DeepSeek-V3's saturation rows (case fidelity/sigmoid-saturation): sigmoid is exactly 1.0 for both large
        // logits, the logit decides: experts 1, 3, 0.
        for (row, best) in [
            ([18.0f32, 20.0, 0.0, 0.0], 1),
            ([17.0, 0.0, 0.0, 25.0], 3),
            ([25.0, 0.0, 0.0, 17.0], 0),
        ] {
            let s: Vec<f32> = row.iter().map(|&l| sigmoid(l)).collect();
            assert_eq!(
                s.iter().filter(|&&v| v == 1.0).count(),
                2,
                "{row:?} saturates"
            );
            assert_eq!(top_k_ranked(&s, &row, 1), vec![best]);
            assert_eq!(argmax_ranked(&s, &row), Some(best));
            assert_eq!(top_k_ranked(&s, &row, 4)[0], best);
        }
        // Softmax underflow: both far entries are exactly 0, the larger logit ranks first.
        let mut p = [0.0f32, -200.0, -150.0];
        let l = p;
        softmax_in_place(&mut p);
        assert_eq!((p[1], p[2]), (0.0, 0.0));
        assert_eq!(top_k_ranked(&p, &l, 3), vec![0, 2, 1]);
        // Equal score and key: the lower index; an empty row has no argmax.
        assert_eq!(top_k_ranked(&[1.0, 1.0], &[2.0, 2.0], 2), vec![0, 1]);
        assert_eq!(argmax_ranked(&[], &[]), None);
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        // e^{1000} overflows f32; with the max subtracted the row is [e^0, e^0] / 2.
        let mut r = [1000.0f32, 1000.0];
        softmax_in_place(&mut r);
        assert_eq!(r, [0.5, 0.5]);
        // [1000, 1000 + ln 3]: p = [1, 3] / 4 (f32 ln 3 near 1000 is off by about 3e-5 in the exponent).
        let mut r = [1000.0f32, 1000.0 + 3f32.ln()];
        softmax_in_place(&mut r);
        assert!(
            (r[0] - 0.25).abs() < 1e-4 && (r[1] - 0.75).abs() < 1e-4,
            "{r:?}"
        );
        // -inf entries get 0; -1e30 and 1e30 stay finite.
        let mut r = [f32::NEG_INFINITY, 0.0, -1e30, 1e30];
        softmax_in_place(&mut r);
        assert_eq!(r, [0.0, 0.0, 0.0, 1.0]);
        let mut empty: [f32; 0] = [];
        softmax_in_place(&mut empty);
    }

    #[test]
    fn sigmoid_softplus_and_sqrt_softplus() {
        // sigmoid(0) = 1/2; sigmoid(ln 3) = 1 / (1 + 1/3) = 3/4; saturation without NaN.
        assert_eq!(sigmoid(0.0), 0.5);
        assert!((sigmoid(3f32.ln()) - 0.75).abs() < 1e-7);
        assert_eq!((sigmoid(-200.0), sigmoid(200.0)), (0.0, 1.0));
        // softplus(0) = ln 2; softplus(ln 3) = ln 4; beyond ±20 the shortcuts x and e^x.
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert!((softplus(3f32.ln()) - 4f32.ln()).abs() < 1e-6);
        assert_eq!(softplus(30.0), 30.0);
        assert_eq!(softplus(-30.0), (-30f32).exp());
        // The shortcuts meet the exact formula at the threshold: ln(1 + e^20) = 20 + ln(1 + e^-20) = 20 + 2e-9.
        assert!((softplus(20.0) - 20.0).abs() < 1e-6);
        // sqrt_softplus(ln 3) = sqrt(ln 4) = sqrt(2 ln 2); sqrt_softplus(100) = 10; always > 0.
        assert!((sqrt_softplus(3f32.ln()) - (2.0 * 2f32.ln()).sqrt()).abs() < 1e-6);
        assert_eq!(sqrt_softplus(100.0), 10.0);
        assert!(sqrt_softplus(-80.0) > 0.0);
    }

    #[test]
    fn gate_init_and_checks() {
        let g = init_gate(4, 3, 7, GATE_STREAM).expect("gate");
        assert_eq!(g.dim(), (3, 4));
        assert_eq!(g, init_gate(4, 3, 7, GATE_STREAM).expect("gate"));
        assert_ne!(g, init_gate(4, 3, 8, GATE_STREAM).expect("gate"));
        assert!(matches!(
            init_gate(0, 3, 0, 0),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            init_gate(1, MAX_DENSE_EXPERTS + 1, 0, 0),
            Err(MoeError::TooLarge { .. })
        ));
        assert!(matches!(
            check_gate("g", &Array2::zeros((0, 2))),
            Err(MoeError::Shape { .. })
        ));
        let x = ndarray::array![[1.0f32, 2.0]];
        let l = gate_logits(
            x.view(),
            ndarray::array![[1.0f32, 0.0], [0.0, 1.0]].view(),
            None,
        )
        .expect("logits");
        assert_eq!(l, ndarray::array![[1.0f32, 2.0]]);
        let big = ndarray::array![[f32::MAX, f32::MAX]];
        assert!(matches!(
            gate_logits(big.view(), ndarray::array![[1.0f32, 1.0]].view(), None),
            Err(MoeError::NonFinite { token: 0, .. })
        ));
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
