//! PEER, parameter-efficient expert retrieval (He 2024, arXiv 2407.04153; docs/ROUTERS.md §6): exact product-key top-k
//! over `N = n²` singleton experts, `h` heads sharing one expert pool, with no `O(N)` work per token.
//!
//! Per head `i` a query `q = W_qⁱ x` (`W_qⁱ` is `[2·d_key, d]`) splits into `q₁ = q[..d_key]` and
//! `q₂ = q[d_key..]`. Each head has its own two sub-key tables `Cⁱ, C'ⁱ` of `n` keys (`[n, d_key]` each), as in
//! product-key memories (Lample et al. 2019) and PEER-pytorch (`keys [heads, n, 2, d_key]`). Expert `(a, b)`, id
//! `a·n + b`, scores `q₁·c_a + q₂·c'_b`. Retrieval takes the top `p` of each half (`p = product_key_topk`, default
//! `k`), forms the `p²` candidate sums and keeps their top `k`; ties go to the lower expert id. It is exact for
//! `p >= k`: if `(a, b)` is in the global top-k, fewer than `k` rows `a'` rank before `a`, since each would give
//! `(a', b)` a better score, so `a` is in its half's top `p` (the same for `b`). In f32 the one slack is a rounding
//! tie (`s₁[a'] > s₁[a]` but equal sums): it can only swap experts of equal score at the k-th place. Cost per token
//! `O(h·(n·d_key + p²))` plus the query projection `O(d · h·2·d_key)`; nothing is `O(N)`.
//!
//! Weights per head: `softmax` over the `k` retrieved scores (the paper, and PEER-pytorch up to 0.1.10 with
//! `softmax_on_scores=True`), or with `non_competing_scores = true` `ReLU(score)` of each (PEER-pytorch from 0.1.11,
//! after Csordás et al. 2023). PEER-pytorch's `non_competing_scores=True` default also keeps only the top 1 of the
//! candidates per head while retrieving 16 per half: that is `non_competing_scores=true k=1 product_key_topk=16`
//! here. A ReLU weight can be 0; the retrieved expert still gets its slot (it was computed, with weight 0).
//!
//! Each (token, head) gives `k` assignments `{ token, expert: a·n + b, weight, rank: head·k + j }`, `j` in
//! descending score order; two heads may retrieve the same expert, which then holds two slots of that token.
//!
//! Query BatchNorm (an ablation in the paper that improves expert usage), as PyTorch's `BatchNorm1d` over the
//! `h·2·d_key` query features: in [`Mode::Eval`] `q ← (q − running_mean) / sqrt(running_var + eps) · weight + bias`
//! (with the default statistics 0, 1, 1, 0, eps 1e-5 it is `q / sqrt(1 + 1e-5)`); in [`Mode::Train`] the batch
//! statistics of the non-padding tokens' queries replace the running ones (mean and biased variance, PyTorch's
//! training mode; padding tokens are left out of the statistics, as out of every loss), so a token's routing then
//! depends on the rest of the batch and the router is not causal. The running statistics are frozen state
//! updated by the explicit once-per-step [`Router::update_state`] (momentum, unbiased variance, PyTorch's
//! convention); `weight` and `bias` are trainable.
//!
//! The backward ([`Router::backward`]) differentiates the weights (softmax or ReLU of the retrieved scores) to the
//! queries and the two sub-key rows of every retrieved expert, then the BatchNorm (in training through the batch
//! statistics) and the query projection: `O(h·k·d_key)` per token after the retrieval it recomputes, never `O(N)`.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, Array3, ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use moe_core::kit;
use moe_core::rng::SeqRng;
use moe_core::{
    Activation, Assignment, Grad, Mode, MoeError, Param, ParamMut, Router, RouterArgs,
    RouterBackward, RouterConfig, RouterEntry, RouterGrads, RouterInput, RouterRegistry, Routing,
    check_finite,
};

/// Random stream of the query projections in registry factories.
pub const QUERY_STREAM: u64 = 3;
/// Random stream of the first sub-key tables `C`.
pub const KEYS_1_STREAM: u64 = 4;
/// Random stream of the second sub-key tables `C'`.
pub const KEYS_2_STREAM: u64 = 5;

/// Largest number of singleton experts `N = n²` (`2^26`, `n = 8192`; the paper uses about `2^20`).
pub const MAX_PEER_EXPERTS: usize = 1 << 26;

/// Largest number of values in one parameter tensor (query projections or one sub-key table set).
pub const MAX_PEER_PARAMS: u128 = 1 << 31;

/// Default heads (the paper's 8).
pub const DEFAULT_HEADS: usize = 8;

/// Default experts per head before clamping to `n` (the paper's 16).
pub const DEFAULT_K: usize = 16;

/// Default sub-key width before clamping to `d` (the paper's 128).
pub const DEFAULT_D_KEY: usize = 128;

/// Tokens per work unit. Fixed, so that results do not depend on the thread count.
const BLOCK_TOKENS: usize = 256;

moe_core::router_options! {
    /// Options of [`Peer`]; every field is optional.
    pub struct PeerConfig {
        /// Query heads h; each retrieves k experts from the shared pool of E = n² experts (the paper's 8).
        heads: usize = DEFAULT_HEADS,
        /// Experts kept per head, so a token gets h·k slots; the layer's k is not used.
        ///
        /// Unset: the paper's 16, clamped to n so that E = 16 works.
        #[default_doc = "min(16, n)"]
        k: usize,
        /// Candidates per sub-key half p, k <= p <= n; retrieval is exact for any p >= k.
        #[default_doc = "k"]
        product_key_topk: usize,
        /// Sub-key width d_key; the query of a head is [2·d_key].
        #[default_doc = "min(128, d)"]
        d_key: usize,
        /// ReLU(score) weights instead of the softmax over the k (PEER-pytorch >= 0.1.11 is this with k = 1).
        non_competing_scores: bool = false,
        /// BatchNorm on the queries (running statistics 0 / 1, affine 1 / 0, momentum 0.1): batch statistics in
        /// training (then not causal), the running ones in eval (q / sqrt(1 + 1e-5) until updated).
        query_batchnorm: bool = false,
        /// Activation of the experts, for building the matching PeerBank; routing does not use it.
        ///
        /// It lives in [`PeerBank`](moe_core::PeerBank); kept here so that whoever builds the bank from the same
        /// options can read it back with [`Peer::activation`].
        activation: Activation = Activation::Gelu,
    }
}

impl RouterConfig for PeerConfig {
    /// Causal without query BatchNorm: each token's query retrieves its experts from fixed keys; other tokens play
    /// no part. With it, training mode normalises the queries with the batch statistics, so every token's routing
    /// depends on the whole batch: not causal.
    fn is_causal(&self) -> bool {
        !self.query_batchnorm()
    }
}

/// The parameters of a PEER router.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerWeights {
    /// Query projections `[h, 2·d_key, d]`: head `i`'s rows `0..d_key` give `q₁`, rows `d_key..2·d_key` give `q₂`.
    pub query: Array3<f32>,
    /// First sub-key tables `C`, `[h, n, d_key]`: expert `(a, b)` uses row `a`.
    pub keys_1: Array3<f32>,
    /// Second sub-key tables `C'`, `[h, n, d_key]`: expert `(a, b)` uses row `b`.
    pub keys_2: Array3<f32>,
}

impl PeerWeights {
    /// Seeded weights: `W_q ~ N(0, 1/d)` (so query entries are about unit scale for unit inputs) and sub-keys
    /// `~ N(0, 1/d_key)` (so each half's score is about unit scale).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a zero size; [`MoeError::TooLarge`] past [`MAX_PEER_EXPERTS`] experts or
    /// [`MAX_PEER_PARAMS`] values in a tensor.
    pub fn random(
        d: usize,
        n: usize,
        heads: usize,
        d_key: usize,
        seed: u64,
    ) -> Result<Self, MoeError> {
        if d == 0 || n == 0 || heads == 0 || d_key == 0 {
            return Err(MoeError::config(
                "d/n/heads/d_key",
                format!("{d}/{n}/{heads}/{d_key}"),
                "must all be >= 1",
            ));
        }
        check_sizes(d, n, heads, d_key)?;
        let mut rq = SeqRng::new(seed, QUERY_STREAM);
        let sq = 1.0 / (d as f32).sqrt();
        let query = Array3::from_shape_simple_fn((heads, 2 * d_key, d), || rq.normal() as f32 * sq);
        let sk = 1.0 / (d_key as f32).sqrt();
        let mut r1 = SeqRng::new(seed, KEYS_1_STREAM);
        let keys_1 = Array3::from_shape_simple_fn((heads, n, d_key), || r1.normal() as f32 * sk);
        let mut r2 = SeqRng::new(seed, KEYS_2_STREAM);
        let keys_2 = Array3::from_shape_simple_fn((heads, n, d_key), || r2.normal() as f32 * sk);
        Ok(PeerWeights {
            query,
            keys_1,
            keys_2,
        })
    }
}

/// Guards sizes before anything is allocated.
fn check_sizes(d: usize, n: usize, heads: usize, d_key: usize) -> Result<(), MoeError> {
    let big = |what: &str, size: u128, limit: u128| MoeError::TooLarge {
        what: what.into(),
        size,
        limit,
    };
    let experts = n as u128 * n as u128;
    if experts > MAX_PEER_EXPERTS as u128 {
        return Err(big(
            "peer experts N = n²",
            experts,
            MAX_PEER_EXPERTS as u128,
        ));
    }
    let q = heads as u128 * 2 * d_key as u128 * d as u128;
    if q > MAX_PEER_PARAMS {
        return Err(big(
            "peer query projections h·2·d_key·d",
            q,
            MAX_PEER_PARAMS,
        ));
    }
    let keys = heads as u128 * n as u128 * d_key as u128;
    if keys > MAX_PEER_PARAMS {
        return Err(big("peer sub-key table h·n·d_key", keys, MAX_PEER_PARAMS));
    }
    Ok(())
}

/// BatchNorm over the `h·2·d_key` query features (head-major, `q₁` then `q₂` within a head), as PyTorch's
/// `BatchNorm1d`: in eval `(q − running_mean) / sqrt(running_var + eps) · weight + bias`; in training the mean
/// and biased variance of the batch (its non-padding tokens) replace the running statistics, which
/// [`Router::update_state`] moves towards the batch's mean and unbiased variance by `momentum`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryBatchNorm {
    /// Running mean `[h·2·d_key]`.
    pub running_mean: Array1<f32>,
    /// Running variance `[h·2·d_key]`, `>= 0`.
    pub running_var: Array1<f32>,
    /// Affine scale `[h·2·d_key]`.
    pub weight: Array1<f32>,
    /// Affine shift `[h·2·d_key]`.
    pub bias: Array1<f32>,
    /// Variance epsilon, `> 0` (PyTorch: 1e-5).
    pub eps: f32,
    /// Momentum of the running statistics, in `[0, 1]` (PyTorch: 0.1): `running ← (1 − momentum) · running +
    /// momentum · batch`.
    pub momentum: f32,
}

impl QueryBatchNorm {
    /// PyTorch's initial state: mean 0, variance 1, weight 1, bias 0, eps 1e-5.
    pub fn identity(features: usize) -> Self {
        QueryBatchNorm {
            running_mean: Array1::zeros(features),
            running_var: Array1::ones(features),
            weight: Array1::ones(features),
            bias: Array1::zeros(features),
            eps: 1e-5,
            momentum: 0.1,
        }
    }

    /// The folded affine map `q · scale + shift`.
    fn fold(&self, features: usize) -> Result<(Array1<f32>, Array1<f32>), MoeError> {
        let named = [
            ("query_batchnorm.running_mean", &self.running_mean),
            ("query_batchnorm.running_var", &self.running_var),
            ("query_batchnorm.weight", &self.weight),
            ("query_batchnorm.bias", &self.bias),
        ];
        for (name, a) in named {
            if a.len() != features {
                return Err(MoeError::shape(name, format!("[{features}]"), &[a.len()]));
            }
            if let Some((i, v)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(MoeError::config(
                    name,
                    v,
                    format!("non-finite at feature {i}"),
                ));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(MoeError::config(
                "query_batchnorm.eps",
                self.eps,
                "must be finite and > 0",
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(MoeError::config(
                "query_batchnorm.momentum",
                self.momentum,
                "must be in [0, 1]",
            ));
        }
        if let Some((i, v)) = self.running_var.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(MoeError::config(
                "query_batchnorm.running_var",
                v,
                format!("negative at feature {i}"),
            ));
        }
        let scale: Array1<f32> = self
            .running_var
            .iter()
            .zip(&self.weight)
            .map(|(&v, &w)| w / (v + self.eps).sqrt())
            .collect();
        let shift: Array1<f32> = self
            .bias
            .iter()
            .zip(&self.running_mean)
            .zip(&scale)
            .map(|((&b, &m), &s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }
}

/// What retrieval found: for each token `t` and head `i`, the `k` experts and their raw scores
/// `q₁·c_a + q₂·c'_b`, in descending score order (ties: lower expert id first).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRetrieval {
    /// Expert ids `a·n + b`, `[T, h, k]`.
    pub experts: Array3<u32>,
    /// Scores, `[T, h, k]`.
    pub scores: Array3<f32>,
}

/// The PEER router. `n_experts()` is `N = n²`; it expects width `d`.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    d: usize,
    heads: usize,
    n: usize,
    d_key: usize,
    k: usize,
    product_key_topk: usize,
    /// `[h·2·d_key, d]`, standard layout.
    query: Array2<f32>,
    /// `[h, n, d_key]`, standard layout.
    keys_1: Array3<f32>,
    /// `[h, n, d_key]`, standard layout.
    keys_2: Array3<f32>,
    non_competing: bool,
    batchnorm: Option<QueryBatchNorm>,
    activation: Activation,
}

/// The query normalisation of one call, folded to `q · scale + shift` per feature (`[h·2·d_key]` each).
#[derive(Debug, Clone)]
struct QueryNorm {
    scale: Array1<f32>,
    shift: Array1<f32>,
    /// In training, the batch statistics the fold was made from: per feature the mean and the biased variance of
    /// the non-padding tokens' queries (f64).
    batch: Option<(Array1<f64>, Array1<f64>)>,
}

/// Per feature, the mean and the biased variance of the rows of `q` (`[T, F]`) that are not padding, in f64 and
/// token order (two passes), and their number.
fn batch_stats(q: &Array2<f32>, input: &RouterInput<'_>) -> (Array1<f64>, Array1<f64>, usize) {
    let f = q.ncols();
    let mut mean = Array1::<f64>::zeros(f);
    let mut n = 0usize;
    for (t, row) in q.outer_iter().enumerate() {
        if !input.is_padding(t) {
            n += 1;
            mean.zip_mut_with(&row, |m, &v| *m += f64::from(v));
        }
    }
    if n == 0 {
        return (mean, Array1::zeros(f), 0);
    }
    mean /= n as f64;
    let mut var = Array1::<f64>::zeros(f);
    for (t, row) in q.outer_iter().enumerate() {
        if !input.is_padding(t) {
            for ((v, &x), &m) in var.iter_mut().zip(&row).zip(&mean) {
                *v += (f64::from(x) - m) * (f64::from(x) - m);
            }
        }
    }
    var /= n as f64;
    (mean, var, n)
}

/// `floor(sqrt(e))`, exact for every `usize`.
fn floor_sqrt(e: usize) -> usize {
    let square_above = |r: usize| r.checked_mul(r).is_none_or(|sq| sq > e);
    let mut r = (e as f64).sqrt() as usize;
    while r > 0 && square_above(r) {
        r -= 1;
    }
    while !square_above(r + 1) {
        r += 1;
    }
    r
}

/// Integer square root: the `n` with `n² = e`, if any.
fn exact_sqrt(e: usize) -> Option<usize> {
    let r = floor_sqrt(e);
    (r.checked_mul(r) == Some(e)).then_some(r)
}

impl PeerConfig {
    /// Resolves the defaults and builds a router over `E = n_experts = n²` experts of width `d_model`, with
    /// [`PeerWeights::random`] parameters drawn from `seed`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] if `n_experts` is not a perfect square (the message names the nearest squares)
    /// or an option is out of range; [`MoeError::TooLarge`] for absurd sizes; then [`Peer::new`]'s errors.
    pub fn build(&self, d_model: usize, n_experts: usize, seed: u64) -> Result<Peer, MoeError> {
        if n_experts > MAX_PEER_EXPERTS {
            return Err(MoeError::TooLarge {
                what: "peer experts N = n²".into(),
                size: n_experts as u128,
                limit: MAX_PEER_EXPERTS as u128,
            });
        }
        let Some(n) = exact_sqrt(n_experts).filter(|&n| n > 0) else {
            let lo = floor_sqrt(n_experts).max(1);
            let hi = lo + 1;
            return Err(MoeError::config(
                "n_experts",
                n_experts,
                format!(
                    "peer needs E = n² singleton experts (n keys per sub-key half); {n_experts} is not a square: \
                     use {} = {lo}² or {} = {hi}²",
                    lo * lo,
                    hi * hi
                ),
            ));
        };
        let heads = self.heads();
        let d_key = self.d_key.unwrap_or(DEFAULT_D_KEY.min(d_model));
        let (k, p) = self.resolve_k(n);
        // Validate the cheap integer options before drawing any weights.
        check_k(n, heads, k, p)?;
        let weights = PeerWeights::random(d_model, n, heads, d_key, seed)?;
        self.finish(Peer::new(weights, k, p)?)
    }

    /// Builds a router around given weights; `heads` and `d_key`, if set, must agree with them.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for disagreeing `heads` / `d_key`; then [`Peer::new`]'s errors.
    pub fn build_with(&self, weights: PeerWeights) -> Result<Peer, MoeError> {
        let (h, two_dk, _) = weights.query.dim();
        if let Some(heads) = self.heads.filter(|&x| x != h) {
            return Err(MoeError::mismatch(
                "peer heads",
                "option heads",
                heads,
                "weights heads",
                h,
            ));
        }
        if let Some(dk) = self.d_key.filter(|&x| x != two_dk / 2) {
            return Err(MoeError::mismatch(
                "peer d_key",
                "option d_key",
                dk,
                "weights d_key",
                two_dk / 2,
            ));
        }
        let (k, p) = self.resolve_k(weights.keys_1.dim().1);
        self.finish(Peer::new(weights, k, p)?)
    }

    /// `k` and `product_key_topk` with their defaults for `n` keys per half.
    fn resolve_k(&self, n: usize) -> (usize, usize) {
        let k = self.k.unwrap_or(DEFAULT_K.min(n));
        (k, self.product_key_topk.unwrap_or(k))
    }

    /// Applies the score, BatchNorm and activation options.
    fn finish(&self, peer: Peer) -> Result<Peer, MoeError> {
        let mut peer = peer.with_non_competing_scores(self.non_competing_scores());
        peer.activation = self.activation();
        if self.query_batchnorm() {
            let features = peer.heads * 2 * peer.d_key;
            peer = peer.with_query_batchnorm(QueryBatchNorm::identity(features))?;
        }
        Ok(peer)
    }
}

/// Checks `1 <= k <= p <= n` and that ranks `head·k + j` fit in `u16`.
fn check_k(n: usize, heads: usize, k: usize, p: usize) -> Result<(), MoeError> {
    if k == 0 || k > n {
        return Err(MoeError::config(
            "k",
            k,
            format!(
                "peer keeps k experts per head out of the top k of each {n}-key half, so 1 <= k <= n = {n} (E = {})",
                n * n
            ),
        ));
    }
    if p < k || p > n {
        return Err(MoeError::config(
            "product_key_topk",
            p,
            format!("must be in k..=n = {k}..={n}"),
        ));
    }
    let slots = heads as u128 * k as u128;
    if slots > 1 << 16 {
        return Err(MoeError::TooLarge {
            what: "peer heads·k (slot ranks are u16)".into(),
            size: slots,
            limit: 1 << 16,
        });
    }
    Ok(())
}

/// Names the first non-finite value of a 3-D parameter.
fn check_finite_3(name: &str, a: &Array3<f32>) -> Result<(), MoeError> {
    match a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        Some(((i, j, l), v)) => Err(MoeError::config(
            name,
            v,
            format!("non-finite at [{i}, {j}, {l}]"),
        )),
        None => Ok(()),
    }
}

/// Whether `x` ranks before `y`: higher score, then lower id (the order [`rank_key`] encodes).
#[cfg(test)]
fn better(x: (f32, u32), y: (f32, u32)) -> bool {
    x.0 > y.0 || (x.0 == y.0 && x.1 < y.1)
}

/// Offers `c` to `top`, the best `k` so far in rank order. `O(1)` when it does not enter, `O(k)` when it does.
/// The tests' reference for [`top_of_row`] and [`best_sums`].
#[cfg(test)]
fn offer(top: &mut Vec<(f32, u32)>, k: usize, c: (f32, u32)) {
    if top.len() == k {
        match top.last() {
            Some(&last) if better(c, last) => {
                top.pop();
            }
            _ => return,
        }
    }
    let at = top.partition_point(|&e| better(e, c));
    top.insert(at, c);
}

/// The rank order of [`better`] as an [`Ordering`](std::cmp::Ordering) (a total order on finite values with
/// distinct ids).
#[cfg(test)]
fn rank_cmp(x: &(f32, u32), y: &(f32, u32)) -> std::cmp::Ordering {
    if better(*x, *y) {
        std::cmp::Ordering::Less
    } else if better(*y, *x) {
        std::cmp::Ordering::Greater
    } else {
        std::cmp::Ordering::Equal
    }
}

/// The rank order (higher score, then lower id) as one integer, ascending = better, for finite values: the score
/// mapped to an order-preserving `u32` (−0 and +0 alike, as `==` has them) and inverted, then the id. Sorting by
/// it is a sort by that order without a branchy float comparison per step (a test checks it against the
/// comparison).
fn rank_key(x: &(f32, u32)) -> u64 {
    let v = if x.0 == 0.0 { 0.0f32 } else { x.0 };
    let bits = v.to_bits();
    let ordered = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ordered) << 32) | u64::from(x.1)
}

/// Keeps the best `p` of `c` (finite values, distinct ids) in rank order: a selection, then a sort of `p`.
fn keep_best(c: &mut Vec<(f32, u32)>, p: usize) {
    if p == 0 {
        c.clear();
        return;
    }
    if c.len() > p {
        c.select_nth_unstable_by_key(p - 1, rank_key);
        c.truncate(p);
    }
    c.sort_unstable_by_key(rank_key);
}

/// The best `k` of the sums `a_i + b_j` (ids `a_id · n + b_id`) in rank order into `best`, exactly, for two lists
/// in rank order. `τ` = the largest `a_{r−1} + b_{⌈k/r⌉−1}` over `r`: the `r · ⌈k/r⌉ >= k` sums `i < r`,
/// `j < ⌈k/r⌉` are each `>= τ` (f32 addition is monotone), so the k-th best is `>= τ` and every one of the best
/// `k` is among the sums `>= τ`, which each row `i` yields as a prefix of `b`. Those candidates (about
/// `k · ln k`) are then selected and sorted in the exact rank order.
fn best_sums(a: &[(f32, u32)], b: &[(f32, u32)], k: usize, n: usize, best: &mut Vec<(f32, u32)>) {
    best.clear();
    if k == 0 || a.is_empty() || b.is_empty() {
        return;
    }
    let mut tau = f32::NEG_INFINITY;
    if a.len() * b.len() >= k {
        for r in 1..=a.len().min(k) {
            let c = k.div_ceil(r);
            if c <= b.len() {
                let v = a[r - 1].0 + b[c - 1].0;
                tau = if v > tau { v } else { tau };
            }
        }
    }
    for &(va, ia) in a {
        if va + b[0].0 < tau {
            break;
        }
        for &(vb, ib) in b {
            let v = va + vb;
            if v < tau {
                break;
            }
            best.push((v, ia * n as u32 + ib));
        }
    }
    keep_best(best, k);
}

/// Number of strided groups [`top_of_row`] takes maxima over (at least `p` are used).
const SCAN_GROUPS: usize = 64;

/// The top `p` of `row` in rank order (descending value, ties to the lower index) into `top`, exactly.
///
/// Fast path (`n >= 2·G`, `G = max(64, p)` groups): the maxima of the `G` strided groups `row[l], row[l + G], …` are
/// an elementwise (vectorised) max; their `p`-th largest `τ` is at most the row's `p`-th largest value, so the top
/// `p` are among the values `>= τ` (about `p + 3` of 1024 for `p = 16` on random scores). Those are collected and
/// sorted with the exact order. Small rows are scanned with [`offer`].
///
/// # Errors
/// The index of the first non-finite value, if any (`top` is then unspecified).
fn top_of_row(
    row: &[f32],
    p: usize,
    top: &mut Vec<(f32, u32)>,
    lanes: &mut Vec<f32>,
) -> Result<(), usize> {
    top.clear();
    if row.iter().map(|v| u32::from(!v.is_finite())).sum::<u32>() > 0 {
        return Err(row.iter().position(|v| !v.is_finite()).unwrap_or(0));
    }
    let g = SCAN_GROUPS.max(p);
    if row.len() < 2 * g || p == 0 {
        top.extend(row.iter().enumerate().map(|(i, &v)| (v, i as u32)));
        keep_best(top, p);
        return Ok(());
    }
    lanes.clear();
    lanes.extend_from_slice(&row[..g]);
    let mut rest = row[g..].chunks_exact(g);
    for chunk in &mut rest {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in lanes.iter_mut().zip(rest.remainder()) {
        *m = if v > *m { v } else { *m };
    }
    // τ = the p-th largest group maximum. At least p values are >= τ, so the p-th largest value is >= τ.
    let (_, &mut tau, _) = lanes.select_nth_unstable_by(p - 1, |a, b| b.total_cmp(a));
    for (i, &v) in row.iter().enumerate() {
        if v >= tau {
            top.push((v, i as u32));
        }
    }
    keep_best(top, p);
    Ok(())
}

impl Peer {
    /// A router from weights, keeping `k` experts per head out of `product_key_topk` candidates per half.
    ///
    /// # Errors
    /// [`MoeError::Shape`] for a query that is not `[h >= 1, 2·d_key (even), d >= 1]` or sub-key tables that are
    /// not both `[h, n >= 1, d_key]`; [`MoeError::InvalidConfig`] for a non-finite weight or `k`,
    /// `product_key_topk` outside `1 <= k <= p <= n`; [`MoeError::TooLarge`] past [`MAX_PEER_EXPERTS`] experts or
    /// `h·k > 65536`.
    pub fn new(weights: PeerWeights, k: usize, product_key_topk: usize) -> Result<Self, MoeError> {
        let PeerWeights {
            query,
            keys_1,
            keys_2,
        } = weights;
        let (heads, two_dk, d) = query.dim();
        if heads == 0 || two_dk == 0 || two_dk % 2 != 0 || d == 0 {
            return Err(MoeError::shape(
                "peer.query",
                "[h >= 1, 2·d_key (even, >= 2), d >= 1]",
                query.shape(),
            ));
        }
        let d_key = two_dk / 2;
        let n = keys_1.dim().1;
        if keys_1.dim() != (heads, n, d_key) || n == 0 {
            return Err(MoeError::shape(
                "peer.keys_1",
                format!("[{heads}, n >= 1, {d_key}]"),
                keys_1.shape(),
            ));
        }
        if keys_2.dim() != keys_1.dim() {
            return Err(MoeError::shape(
                "peer.keys_2",
                format!("[{heads}, {n}, {d_key}]"),
                keys_2.shape(),
            ));
        }
        check_sizes(d, n, heads, d_key)?;
        check_k(n, heads, k, product_key_topk)?;
        check_finite_3("peer.query", &query)?;
        check_finite_3("peer.keys_1", &keys_1)?;
        check_finite_3("peer.keys_2", &keys_2)?;
        let query = query
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((heads * two_dk, d))
            .map_err(|_| {
                MoeError::shape(
                    "peer.query",
                    format!("[{heads}, {two_dk}, {d}]"),
                    &[heads, two_dk, d],
                )
            })?;
        Ok(Peer {
            d,
            heads,
            n,
            d_key,
            k,
            product_key_topk,
            query,
            keys_1: keys_1.as_standard_layout().into_owned(),
            keys_2: keys_2.as_standard_layout().into_owned(),
            non_competing: false,
            batchnorm: None,
            activation: Activation::Gelu,
        })
    }

    /// Weights `ReLU(score)` (`true`) or `softmax` over the head's k scores (`false`, the paper).
    pub fn with_non_competing_scores(mut self, on: bool) -> Self {
        self.non_competing = on;
        self
    }

    /// Applies BatchNorm to the queries (see [`QueryBatchNorm`]): running statistics in eval, batch statistics in
    /// training. The router is then not causal ([`Router::is_causal`]).
    ///
    /// # Errors
    /// [`MoeError::Shape`] for statistics that are not `[h·2·d_key]`; [`MoeError::InvalidConfig`] for non-finite
    /// values, a negative variance, `eps <= 0` or a momentum outside `[0, 1]`.
    pub fn with_query_batchnorm(mut self, bn: QueryBatchNorm) -> Result<Self, MoeError> {
        bn.fold(self.heads * 2 * self.d_key)?;
        self.batchnorm = Some(bn);
        Ok(self)
    }

    /// Records the experts' activation (see [`PeerConfig::activation()`]).
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Query heads `h`.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Keys per half `n` (`E = n²`).
    pub fn n_keys(&self) -> usize {
        self.n
    }

    /// Sub-key width `d_key`.
    pub fn d_key(&self) -> usize {
        self.d_key
    }

    /// Experts kept per head.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Candidates per half.
    pub fn product_key_topk(&self) -> usize {
        self.product_key_topk
    }

    /// Whether weights are `ReLU(score)`.
    pub fn non_competing_scores(&self) -> bool {
        self.non_competing
    }

    /// The query BatchNorm, if any.
    pub fn query_batchnorm(&self) -> Option<&QueryBatchNorm> {
        self.batchnorm.as_ref()
    }

    /// The experts' activation, for building the matching [`PeerBank`](moe_core::PeerBank).
    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Product-key retrieval for hidden states `[T, d]`: per token and head, the top `k` experts and scores, with
    /// the query BatchNorm (if any) in its eval form (running statistics; [`Router::route`] in training uses the
    /// batch's). Parallel over (block of 256 tokens, head) units fixed by `T` alone, so the result is the same on
    /// any thread count.
    ///
    /// # Errors
    /// [`MoeError::Shape`] for a wrong width; [`MoeError::NonFinite`] for a non-finite input (naming the token) or
    /// a score that overflows (tensor `peer head i sub-key scores`).
    pub fn retrieve(&self, hidden: ArrayView2<'_, f32>) -> Result<PeerRetrieval, MoeError> {
        let (t, d) = hidden.dim();
        if d != self.d {
            return Err(MoeError::shape(
                "hidden",
                format!("[T, {}]", self.d),
                &[t, d],
            ));
        }
        check_finite("hidden", hidden)?;
        let norm = self.query_norm(&RouterInput::new(hidden), None)?;
        self.retrieve_checked(hidden, norm.as_ref())
    }

    /// The query projections `x · W_qᵀ` of every token and head, before any BatchNorm: `[T, h·2·d_key]`.
    fn project(&self, hidden: ArrayView2<'_, f32>) -> Array2<f32> {
        hidden.dot(&self.query.t())
    }

    /// The query normalisation for `input` (`None` without BatchNorm): the running statistics in eval (or when
    /// every token is padding), in training the batch statistics of the non-padding tokens' projections `q_pre`
    /// (`[T, h·2·d_key]`, computed here when not given). The fold is `scale = weight / sqrt(var + eps)`,
    /// `shift = bias − mean · scale`.
    fn query_norm(
        &self,
        input: &RouterInput<'_>,
        q_pre: Option<&Array2<f32>>,
    ) -> Result<Option<QueryNorm>, MoeError> {
        let Some(bn) = &self.batchnorm else {
            return Ok(None);
        };
        let (scale, shift) = bn.fold(self.heads * 2 * self.d_key)?;
        let n_real = (0..input.n_tokens())
            .filter(|&t| !input.is_padding(t))
            .count();
        if matches!(input.mode, Mode::Eval) || n_real == 0 {
            return Ok(Some(QueryNorm {
                scale,
                shift,
                batch: None,
            }));
        }
        let owned;
        let q = match q_pre {
            Some(q) => q,
            None => {
                owned = self.project(input.hidden);
                &owned
            }
        };
        let (mean, var, _) = batch_stats(q, input);
        let eps = f64::from(bn.eps);
        let scale64: Vec<f64> = var
            .iter()
            .zip(&bn.weight)
            .map(|(&v, &w)| f64::from(w) / (v + eps).sqrt())
            .collect();
        let scale = scale64.iter().map(|&x| x as f32).collect();
        let shift = bn
            .bias
            .iter()
            .zip(&mean)
            .zip(&scale64)
            .map(|((&b, &m), &s)| (f64::from(b) - m * s) as f32)
            .collect();
        Ok(Some(QueryNorm {
            scale,
            shift,
            batch: Some((mean, var)),
        }))
    }

    /// [`Peer::retrieve`] on an input already checked for width and finiteness. Work units are (block of
    /// [`BLOCK_TOKENS`] tokens, head): blocks are large enough to amortise packing each head's `W_q` and sub-keys
    /// for the matrix products, and heads give parallel work even for one block.
    fn retrieve_checked(
        &self,
        hidden: ArrayView2<'_, f32>,
        norm: Option<&QueryNorm>,
    ) -> Result<PeerRetrieval, MoeError> {
        let (t, h, k) = (hidden.nrows(), self.heads, self.k);
        let units: Vec<(usize, usize)> = (0..t.div_ceil(BLOCK_TOKENS))
            .flat_map(|b| (0..h).map(move |head| (b, head)))
            .collect();
        let results: Vec<Result<Vec<(f32, u32)>, MoeError>> = units
            .par_iter()
            .map(|&(b, head)| {
                let start = b * BLOCK_TOKENS;
                let end = (start + BLOCK_TOKENS).min(t);
                self.retrieve_unit(hidden.slice(s![start..end, ..]), start, head, norm)
            })
            .collect();
        let mut experts = vec![0u32; t * h * k];
        let mut scores = vec![0f32; t * h * k];
        // Scatter `[b, k]` per unit into `[T, h, k]`; the first error in (block, head) order, whatever the
        // scheduling.
        for (&(b, head), found) in units.iter().zip(results) {
            for (r, row) in found?.chunks_exact(k).enumerate() {
                let at = ((b * BLOCK_TOKENS + r) * h + head) * k;
                for (j, &(v, e)) in row.iter().enumerate() {
                    if let (Some(es), Some(ss)) = (experts.get_mut(at + j), scores.get_mut(at + j))
                    {
                        *es = e;
                        *ss = v;
                    }
                }
            }
        }
        let shape = (t, h, k);
        let bad = |_| MoeError::shape("peer retrieval", format!("{shape:?}"), &[t * h * k]);
        Ok(PeerRetrieval {
            experts: Array3::from_shape_vec(shape, experts).map_err(bad)?,
            scores: Array3::from_shape_vec(shape, scores).map_err(bad)?,
        })
    }

    /// Retrieval for one head and one block of tokens `x` (`[b, d]`, first token `first`): `[b, k]` (score,
    /// expert) pairs, flat, each row in rank order.
    fn retrieve_unit(
        &self,
        x: ArrayView2<'_, f32>,
        first: usize,
        head: usize,
        norm: Option<&QueryNorm>,
    ) -> Result<Vec<(f32, u32)>, MoeError> {
        let (b, n, dk, k, p) = (x.nrows(), self.n, self.d_key, self.k, self.product_key_topk);
        let rows = head * 2 * dk..(head + 1) * 2 * dk;
        let mut q = x.dot(&self.query.slice(s![rows.clone(), ..]).t());
        if let Some(norm) = norm {
            q *= &norm.scale.slice(s![rows.clone()]);
            q += &norm.shift.slice(s![rows]);
        }
        let mut s1 = vec![0f32; b * n];
        let mut s2 = vec![0f32; b * n];
        for (buf, keys, cols) in [
            (&mut s1, &self.keys_1, 0..dk),
            (&mut s2, &self.keys_2, dk..2 * dk),
        ] {
            let len = buf.len();
            let mut out = ArrayViewMut2::from_shape((b, n), &mut buf[..]).map_err(|_| {
                MoeError::shape("peer sub-key scores", format!("[{b}, {n}]"), &[len])
            })?;
            general_mat_mul(
                1.0,
                &q.slice(s![.., cols]),
                &keys.index_axis(Axis(0), head).t(),
                0.0,
                &mut out,
            );
        }
        let (mut top1, mut top2) = (Vec::with_capacity(p), Vec::with_capacity(p));
        let mut lanes = Vec::with_capacity(SCAN_GROUPS.max(p));
        let mut found = Vec::with_capacity(b * k);
        let mut best = Vec::with_capacity(k);
        for (r, (row1, row2)) in s1.chunks_exact(n).zip(s2.chunks_exact(n)).enumerate() {
            for (half, row, top) in [(0, row1, &mut top1), (1, row2, &mut top2)] {
                if let Err(column) = top_of_row(row, p, top, &mut lanes) {
                    let value = row.get(column).copied().unwrap_or(f32::NAN);
                    return Err(MoeError::NonFinite {
                        tensor: format!("peer head {head} sub-key scores (half {half})"),
                        token: first + r,
                        column,
                        value,
                    });
                }
            }
            best_sums(&top1, &top2, k, n, &mut best);
            found.extend_from_slice(&best);
        }
        Ok(found)
    }

    /// The weights of one head's `k` scores (descending).
    fn head_weights(&self, scores: &[f32], out: &mut Vec<f32>) {
        out.clear();
        if self.non_competing {
            out.extend(scores.iter().map(|&s| s.max(0.0)));
        } else {
            out.extend_from_slice(scores);
            kit::softmax_in_place(out);
        }
    }
}

impl Router for Peer {
    fn name(&self) -> &str {
        "peer"
    }

    fn n_experts(&self) -> usize {
        self.n * self.n
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.d)
    }

    /// [`PeerConfig::is_causal`]: `true` without query BatchNorm; with it the training mode's batch statistics
    /// make every token's routing depend on the whole batch.
    fn is_causal(&self) -> bool {
        self.batchnorm.is_none()
    }

    /// `query`: the query projections `W_q`, `[h, 2·d_key, d]` (head `i`'s rows `0..d_key` give `q₁`, the rest
    /// `q₂`, as [`PeerWeights::query`]); `keys_1`: the sub-keys `C`, `[h, n, d_key]`; `keys_2`: the sub-keys `C'`,
    /// `[h, n, d_key]`. With query BatchNorm also `query_batchnorm.weight` and `query_batchnorm.bias`
    /// (`[h·2·d_key]`, trainable) and `query_batchnorm.running_mean` and `query_batchnorm.running_var` (frozen:
    /// moved by [`Router::update_state`], never by a gradient), PyTorch's `BatchNorm1d` names.
    fn params(&self) -> Vec<Param<'_>> {
        let shape = (self.heads, 2 * self.d_key, self.d);
        // The query is stored `[h·2·d_key, d]` in standard layout (`Peer::new`), so the reshape always succeeds.
        let query = self.query.view().into_shape_with_order(shape).ok();
        let mut out: Vec<Param<'_>> = query
            .map(|q| Param::new("query", q))
            .into_iter()
            .chain([
                Param::new("keys_1", self.keys_1.view()),
                Param::new("keys_2", self.keys_2.view()),
            ])
            .collect();
        if let Some(bn) = &self.batchnorm {
            out.extend([
                Param::new("query_batchnorm.weight", bn.weight.view()),
                Param::new("query_batchnorm.bias", bn.bias.view()),
                Param::new("query_batchnorm.running_mean", bn.running_mean.view()).frozen(),
                Param::new("query_batchnorm.running_var", bn.running_var.view()).frozen(),
            ]);
        }
        out
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        let shape = (self.heads, 2 * self.d_key, self.d);
        let query = self.query.view_mut().into_shape_with_order(shape).ok();
        let mut out: Vec<ParamMut<'_>> = query
            .map(|q| ParamMut::new("query", q))
            .into_iter()
            .chain([
                ParamMut::new("keys_1", self.keys_1.view_mut()),
                ParamMut::new("keys_2", self.keys_2.view_mut()),
            ])
            .collect();
        if let Some(bn) = &mut self.batchnorm {
            out.extend([
                ParamMut::new("query_batchnorm.weight", bn.weight.view_mut()),
                ParamMut::new("query_batchnorm.bias", bn.bias.view_mut()),
                ParamMut::new("query_batchnorm.running_mean", bn.running_mean.view_mut()).frozen(),
                ParamMut::new("query_batchnorm.running_var", bn.running_var.view_mut()).frozen(),
            ]);
        }
        out
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let e = self.n_experts();
        kit::check_input(input, Some(self.d), e, self.k)?;
        let t = input.n_tokens();
        let norm = self.query_norm(input, None)?;
        let found = self.retrieve_checked(input.hidden, norm.as_ref())?;
        let (Some(experts), Some(scores)) = (found.experts.as_slice(), found.scores.as_slice())
        else {
            return Err(MoeError::shape(
                "peer retrieval",
                "standard layout [T, h, k]",
                found.experts.shape(),
            ));
        };
        let hk = self.heads * self.k;
        // Slots per expert over the real tokens, then each slot placed at its expert's next free position
        // (a counting sort): the plan's (expert, token, rank) order, which `Routing::new` then only checks.
        let real_tokens = || (0..t).filter(|&i| !input.is_padding(i));
        let mut next = vec![0usize; e + 1];
        for token in real_tokens() {
            for &x in &experts[token * hk..(token + 1) * hk] {
                next[x as usize + 1] += 1;
            }
        }
        for i in 1..=e {
            next[i] += next[i - 1];
        }
        let blank = Assignment {
            token: 0,
            expert: 0,
            weight: 0.0,
            rank: 0,
        };
        let mut kept = vec![blank; next[e]];
        let mut w = Vec::with_capacity(self.k);
        for token in real_tokens() {
            let (te, ts) = (
                &experts[token * hk..(token + 1) * hk],
                &scores[token * hk..(token + 1) * hk],
            );
            for (head, (he, hs)) in te
                .chunks_exact(self.k)
                .zip(ts.chunks_exact(self.k))
                .enumerate()
            {
                self.head_weights(hs, &mut w);
                for (j, (&expert, &weight)) in he.iter().zip(&w).enumerate() {
                    let at = &mut next[expert as usize];
                    if let Some(slot) = kept.get_mut(*at) {
                        *slot = Assignment {
                            token: token as u32,
                            expert,
                            weight,
                            rank: (head * self.k + j) as u16,
                        };
                    }
                    *at += 1;
                }
            }
        }
        Routing::new(t, e, real_tokens().count(), kept, Vec::new())
    }

    /// The exact backward of [`Router::route`], recomputing the forward (projection, normalisation, retrieval).
    /// Per real token and head, the weights of the `k` retrieved scores (softmax, or ReLU with
    /// `non_competing_scores`) give `dL/d score_j`; a score `q₁·c_a + q₂·c'_b` passes `ds_j · c_a`, `ds_j · c'_b`
    /// to the query halves and `ds_j · q₁`, `ds_j · q₂` to rows `a` and `b` of the head's sub-key tables. Then the
    /// query BatchNorm, if any (`Peer::batchnorm_backward`: in training through the batch statistics), and the
    /// projection: `dx = dq · W_q`, `dW_q = dqᵀ · x`. The retrieval (which experts) gets no gradient; padding rows
    /// get 0. `O(h·k·d_key)` per token after the retrieval, nothing `O(N)`; the sub-key gradients are dense
    /// (`h·n·d_key` values, `O(√N)`). Heads run in parallel, each summing its tokens in order: the same bits on
    /// any thread count.
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; [`MoeError::Mismatch`] for a plan of another `E` or whose experts
    /// differ from the recomputed retrieval (a plan routed from another input, mode or router); the errors of
    /// [`Router::route`].
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let input = grad.input;
        let e = self.n_experts();
        kit::check_input(input, Some(self.d), e, self.k)?;
        if grad.routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "peer backward",
                "plan experts",
                grad.routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let t = input.n_tokens();
        let q_pre = self.project(input.hidden);
        let norm = self.query_norm(input, Some(&q_pre))?;
        let found = self.retrieve_checked(input.hidden, norm.as_ref())?;
        let q = match &norm {
            Some(n) => &q_pre * &n.scale + &n.shift,
            None => q_pre.clone(),
        };
        // Row slices in `head_backward`: the product's layout is ndarray's choice.
        let q = if q.is_standard_layout() {
            q
        } else {
            q.as_standard_layout().into_owned()
        };
        let slots = self.plan_slots(grad, t)?;
        let heads: Vec<Result<HeadGrads, MoeError>> = (0..self.heads)
            .into_par_iter()
            .map(|head| self.head_backward(head, input, &found, &q, &slots))
            .collect();
        let f = 2 * self.d_key;
        let mut d_q = Array2::<f32>::zeros((t, self.heads * f));
        let mut d_keys_1 = Array3::<f32>::zeros(self.keys_1.dim());
        let mut d_keys_2 = Array3::<f32>::zeros(self.keys_2.dim());
        for (head, g) in heads.into_iter().enumerate() {
            let g = g?;
            d_q.slice_mut(s![.., head * f..(head + 1) * f])
                .assign(&g.d_q);
            d_keys_1.index_axis_mut(Axis(0), head).assign(&g.d_keys_1);
            d_keys_2.index_axis_mut(Axis(0), head).assign(&g.d_keys_2);
        }
        let (d_pre, bn) = self.batchnorm_backward(input, &q_pre, norm.as_ref(), d_q);
        let d_hidden = d_pre.dot(&self.query);
        let d_query = d_pre
            .t()
            .dot(&input.hidden)
            .into_shape_with_order((self.heads, f, self.d))
            .map_err(|_| {
                MoeError::shape(
                    "peer d_query",
                    format!("[{}, {f}, {}]", self.heads, self.d),
                    &[],
                )
            })?;
        let mut params = vec![
            Grad::dense("query", d_query),
            Grad::dense("keys_1", d_keys_1),
            Grad::dense("keys_2", d_keys_2),
        ];
        if let Some((d_weight, d_bias)) = bn {
            params.push(Grad::dense("query_batchnorm.weight", d_weight));
            params.push(Grad::dense("query_batchnorm.bias", d_bias));
        }
        Ok(RouterGrads { d_hidden, params })
    }

    /// Moves the query BatchNorm's running statistics towards the batch's, as PyTorch's `BatchNorm1d` does in a
    /// training forward: `running_mean ← (1 − m) · running_mean + m · mean`, `running_var ← (1 − m) ·
    /// running_var + m · var_unbiased` (`m` the momentum, the statistics over the non-padding tokens' query
    /// projections of `input`, the variance with `n − 1`). Returns `false` (and changes nothing) without query
    /// BatchNorm. `bias_rate` is not used. Call it once per training step, with that step's input and plan.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for a plan of another `T` or `E`; the input errors of [`Router::route`];
    /// [`MoeError::InvalidConfig`] for fewer than 2 non-padding tokens (the unbiased variance is undefined;
    /// PyTorch refuses to train BatchNorm on one value per channel too) or invalid statistics.
    fn update_state(
        &mut self,
        input: &RouterInput<'_>,
        routing: &Routing,
        bias_rate: f32,
    ) -> Result<bool, MoeError> {
        let _ = bias_rate;
        if self.batchnorm.is_none() {
            return Ok(false);
        }
        kit::check_input(input, Some(self.d), self.n_experts(), self.k)?;
        for (what, plan, want) in [
            ("tokens", routing.n_tokens(), input.n_tokens()),
            ("experts", routing.n_experts(), self.n_experts()),
        ] {
            if plan != want {
                return Err(MoeError::mismatch(
                    "peer update_state",
                    format!("plan {what}"),
                    plan,
                    format!("router {what}"),
                    want,
                ));
            }
        }
        let q_pre = self.project(input.hidden);
        let (mean, var, n) = batch_stats(&q_pre, input);
        let features = self.heads * 2 * self.d_key;
        let Some(bn) = self.batchnorm.as_mut() else {
            return Ok(false);
        };
        bn.fold(features)?;
        if n < 2 {
            return Err(MoeError::config(
                "query_batchnorm",
                format!("{n} non-padding tokens"),
                "updating the running statistics needs at least 2 (the unbiased variance divides by n - 1)",
            ));
        }
        let m = f64::from(bn.momentum);
        let unbias = n as f64 / (n - 1) as f64;
        let step = |r: &mut f32, batch: f64| *r = ((1.0 - m) * f64::from(*r) + m * batch) as f32;
        for (r, &b) in bn.running_mean.iter_mut().zip(&mean) {
            step(r, b);
        }
        for (r, &v) in bn.running_var.iter_mut().zip(&var) {
            step(r, v * unbias);
        }
        Ok(true)
    }
}

/// The gradients of the query BatchNorm's `weight` and `bias`, `[h·2·d_key]` each.
type BatchNormGrads = (Array1<f32>, Array1<f32>);

/// One head's share of the backward.
struct HeadGrads {
    /// `dL/dq` of the head's query features (after BatchNorm), `[T, 2·d_key]`.
    d_q: Array2<f32>,
    /// `[n, d_key]`.
    d_keys_1: Array2<f32>,
    /// `[n, d_key]`.
    d_keys_2: Array2<f32>,
}

/// The plan's slots by (token, head, j): `dL/dw` and the expert, each `[T · h · k]` (expert `u32::MAX` where the
/// plan has none).
struct PlanSlots {
    d_w: Vec<f32>,
    expert: Vec<u32>,
}

impl Peer {
    /// Reads the plan's slots into [`PlanSlots`] (rank `head·k + j`).
    fn plan_slots(&self, grad: &RouterBackward<'_, '_>, t: usize) -> Result<PlanSlots, MoeError> {
        let hk = self.heads * self.k;
        let mut d_w = vec![0.0f32; t * hk];
        let mut expert = vec![u32::MAX; t * hk];
        let ranks = grad.routing.slot_ranks();
        for g in grad.routing.groups() {
            for (j, &token) in g.tokens.iter().enumerate() {
                let s = g.slot_start + j;
                let rank = ranks.get(s).map_or(usize::MAX, |&r| usize::from(r));
                if rank >= hk {
                    return Err(MoeError::config(
                        "peer backward: plan rank",
                        rank,
                        format!(
                            "must be < heads·k = {hk} (the plan was not routed by this router)"
                        ),
                    ));
                }
                let at = token as usize * hk + rank;
                if let (Some(dw), Some(ex), Some(&v)) =
                    (d_w.get_mut(at), expert.get_mut(at), grad.d_weights.get(s))
                {
                    *dw = v;
                    *ex = g.expert as u32;
                }
            }
        }
        Ok(PlanSlots { d_w, expert })
    }

    /// Head `head`'s backward from its retrieved experts and scores to its query features and sub-keys (see
    /// [`Router::backward`]), tokens in order.
    fn head_backward(
        &self,
        head: usize,
        input: &RouterInput<'_>,
        found: &PeerRetrieval,
        q: &Array2<f32>,
        slots: &PlanSlots,
    ) -> Result<HeadGrads, MoeError> {
        let (t, n, dk, k, h) = (input.n_tokens(), self.n, self.d_key, self.k, self.heads);
        let mut d_q = vec![0.0f32; t * 2 * dk];
        let mut d_keys_1 = vec![0.0f32; n * dk];
        let mut d_keys_2 = vec![0.0f32; n * dk];
        let layout = |what: &str, shape: &[usize]| MoeError::shape(what, "standard layout", shape);
        let (Some(experts), Some(scores)) = (found.experts.as_slice(), found.scores.as_slice())
        else {
            return Err(layout("peer retrieval", found.experts.shape()));
        };
        let (Some(keys_1), Some(keys_2)) = (
            self.keys_1.index_axis(Axis(0), head).to_slice(),
            self.keys_2.index_axis(Axis(0), head).to_slice(),
        ) else {
            return Err(layout("peer sub-keys", self.keys_1.shape()));
        };
        let Some(q) = q.as_slice() else {
            return Err(layout("peer queries", q.shape()));
        };
        let (mut w, mut d_s) = (Vec::with_capacity(k), vec![0.0f32; k]);
        for token in (0..t).filter(|&i| !input.is_padding(i)) {
            let at = (token * h + head) * k;
            let (ex, sc) = (&experts[at..at + k], &scores[at..at + k]);
            let (pe, dw) = (&slots.expert[at..at + k], &slots.d_w[at..at + k]);
            if let Some(j) = (0..k).find(|&j| pe[j] != ex[j]) {
                return Err(MoeError::mismatch(
                    format!(
                        "peer backward, token {token} head {head} rank {j} (the plan must come from this \
                         router, input and mode)"
                    ),
                    "plan expert",
                    pe[j] as usize,
                    "recomputed expert",
                    ex[j] as usize,
                ));
            }
            if self.non_competing {
                for ((o, &g), &s) in d_s.iter_mut().zip(dw).zip(sc) {
                    *o = if s > 0.0 { g } else { 0.0 };
                }
            } else {
                self.head_weights(sc, &mut w);
                kit::softmax_backward(&w, dw, &mut d_s);
            }
            let qrow = &q[(token * h + head) * 2 * dk..(token * h + head + 1) * 2 * dk];
            let (q1, q2) = qrow.split_at(dk);
            let (dq1, dq2) = d_q[token * 2 * dk..(token + 1) * 2 * dk].split_at_mut(dk);
            // As `scaled_add`: `o += g · v` per element.
            let axpy = |o: &mut [f32], g: f32, v: &[f32]| {
                o.iter_mut().zip(v).for_each(|(o, &v)| *o += g * v);
            };
            for (&id, &g) in ex.iter().zip(&d_s) {
                let (a, b) = (id as usize / n, id as usize % n);
                axpy(dq1, g, &keys_1[a * dk..(a + 1) * dk]);
                axpy(dq2, g, &keys_2[b * dk..(b + 1) * dk]);
                axpy(&mut d_keys_1[a * dk..(a + 1) * dk], g, q1);
                axpy(&mut d_keys_2[b * dk..(b + 1) * dk], g, q2);
            }
        }
        let shaped = |v: Vec<f32>, rows: usize, cols: usize| {
            Array2::from_shape_vec((rows, cols), v).map_err(|_| {
                MoeError::shape("peer head gradients", format!("[{rows}, {cols}]"), &[])
            })
        };
        Ok(HeadGrads {
            d_q: shaped(d_q, t, 2 * dk)?,
            d_keys_1: shaped(d_keys_1, n, dk)?,
            d_keys_2: shaped(d_keys_2, n, dk)?,
        })
    }

    /// The query BatchNorm's backward from `dL/dq` (after it) to `dL/dq_pre` (the projections, `[T, F]`), and the
    /// gradients of its `weight` and `bias` (`None` without BatchNorm, when `d_q` passes through). With
    /// `q̂ = (q_pre − μ) / sqrt(v + eps)` and `q = weight · q̂ + bias`: `d bias = Σ_t dq`, `d weight = Σ_t dq · q̂`
    /// over the non-padding tokens; in eval (running `μ`, `v`) `dq_pre = dq · weight / sqrt(v + eps)`; in training
    /// (the batch's `μ` and biased `v` over the `N` non-padding tokens, PyTorch's BatchNorm backward)
    /// `dq_pre = (weight · dq − d bias · weight / N − q̂ · d weight · weight / N) / sqrt(v + eps)`, 0 on padding.
    fn batchnorm_backward(
        &self,
        input: &RouterInput<'_>,
        q_pre: &Array2<f32>,
        norm: Option<&QueryNorm>,
        d_q: Array2<f32>,
    ) -> (Array2<f32>, Option<BatchNormGrads>) {
        let (Some(bn), Some(norm)) = (&self.batchnorm, norm) else {
            return (d_q, None);
        };
        let eps = f64::from(bn.eps);
        let (mean, inv): (Vec<f64>, Vec<f64>) = match &norm.batch {
            Some((m, v)) => (
                m.to_vec(),
                v.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect(),
            ),
            None => (
                bn.running_mean.iter().map(|&m| f64::from(m)).collect(),
                bn.running_var
                    .iter()
                    .map(|&v| 1.0 / (f64::from(v) + eps).sqrt())
                    .collect(),
            ),
        };
        let real: Vec<usize> = (0..input.n_tokens())
            .filter(|&t| !input.is_padding(t))
            .collect();
        let f = q_pre.ncols();
        let (mut d_weight, mut d_bias) = (vec![0.0f64; f], vec![0.0f64; f]);
        let hat = |t: usize, c: usize| (f64::from(q_pre[[t, c]]) - mean[c]) * inv[c];
        for &t in &real {
            for c in 0..f {
                let g = f64::from(d_q[[t, c]]);
                d_bias[c] += g;
                d_weight[c] += g * hat(t, c);
            }
        }
        let mut d_pre = Array2::<f32>::zeros(q_pre.dim());
        let nf = real.len().max(1) as f64;
        for &t in &real {
            for c in 0..f {
                let w = f64::from(bn.weight[c]);
                let g = f64::from(d_q[[t, c]]) * w;
                let d = match norm.batch {
                    None => g * inv[c],
                    Some(_) => inv[c] * (g - w * d_bias[c] / nf - hat(t, c) * w * d_weight[c] / nf),
                };
                d_pre[[t, c]] = d as f32;
            }
        }
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Array1<f32>>();
        (d_pre, Some((to32(d_weight), to32(d_bias))))
    }
}

/// Expert usage over many plans (PEER's key diagnostic, docs/ROUTERS.md §6): the fraction of the `N` experts retrieved
/// at least once. A bitset of `N` bits; adding a plan costs `O(active experts)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertUsage {
    n_experts: usize,
    seen: Vec<u64>,
    used: usize,
}

impl ExpertUsage {
    /// Nothing seen yet, over `n_experts` experts.
    pub fn new(n_experts: usize) -> Self {
        ExpertUsage {
            n_experts,
            seen: vec![0; n_experts.div_ceil(64)],
            used: 0,
        }
    }

    /// Marks the experts that received a slot in `plan`.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] if the plan has another expert count.
    pub fn add(&mut self, plan: &Routing) -> Result<(), MoeError> {
        if plan.n_experts() != self.n_experts {
            return Err(MoeError::mismatch(
                "expert usage",
                "plan experts",
                plan.n_experts(),
                "usage experts",
                self.n_experts,
            ));
        }
        for &e in plan.active_experts() {
            let (word, bit) = (e as usize / 64, 1u64 << (e % 64));
            if let Some(w) = self.seen.get_mut(word)
                && *w & bit == 0
            {
                *w |= bit;
                self.used += 1;
            }
        }
        Ok(())
    }

    /// Experts retrieved at least once.
    pub fn used(&self) -> usize {
        self.used
    }

    /// `used / N` (0 for `N = 0`).
    pub fn fraction(&self) -> f64 {
        if self.n_experts == 0 {
            0.0
        } else {
            self.used as f64 / self.n_experts as f64
        }
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: PeerConfig = args.parse("peer")?;
    Ok(Box::new(cfg.build(
        args.d_model,
        args.n_experts,
        args.seed,
    )?))
}

/// Registers `peer`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<PeerConfig>(
        "peer",
        "PEER (He 2024): exact product-key top-k over E = n² singleton experts, multi-head",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// One head, `n = 2` (`E = 4`), `d = 2`, `d_key = 1`: `W_q = I` so `q₁ = x₀`, `q₂ = x₁`; `C = [1, −1]`,
    /// `C' = [2, 0.5]`.
    fn tiny(k: usize) -> Peer {
        let weights = PeerWeights {
            query: array![[[1.0f32, 0.0], [0.0, 1.0]]],
            keys_1: array![[[1.0f32], [-1.0]]],
            keys_2: array![[[2.0f32], [0.5]]],
        };
        Peer::new(weights, k, k).expect("valid weights")
    }

    #[test]
    fn tiny_hand_computed() {
        // x = [1, 2]: half scores s1 = [1·1, −1·1] = [1, −1], s2 = [2·2, 0.5·2] = [4, 1].
        // Expert (a, b) = a·2 + b: 0 = (0,0) 1 + 4 = 5; 1 = (0,1) 1 + 1 = 2; 2 = (1,0) −1 + 4 = 3; 3 = (1,1) 0.
        // Top-2: expert 0 (5), expert 2 (3). Softmax: e⁵ / (e⁵ + e³) = 1 / (1 + e⁻²) = 0.8807971, 0.1192029.
        let r = tiny(2);
        let x = array![[1.0f32, 2.0]];
        let got = r.retrieve(x.view()).expect("retrieve");
        assert_eq!(got.experts.iter().copied().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(
            got.scores.iter().copied().collect::<Vec<_>>(),
            vec![5.0, 3.0]
        );
        let plan = r
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        assert_eq!((plan[0][0].0, plan[0][0].2), (0, 0));
        assert_eq!((plan[0][1].0, plan[0][1].2), (2, 1));
        assert!((plan[0][0].1 - 0.880_797_1).abs() < 1e-6);
        assert!((plan[0][1].1 - 0.119_202_9).abs() < 1e-6);
        // Non-competing: ReLU(5) = 5, ReLU(3) = 3.
        let plan = r
            .with_non_competing_scores(true)
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        assert_eq!(plan[0], vec![(0, 5.0, 0), (2, 3.0, 1)]);
    }

    #[test]
    fn ties_go_to_the_lower_expert_id() {
        // x = [0, 0]: every score is 0, so the top-2 are the two lowest ids, experts 0 and 1.
        let r = tiny(2);
        let x = array![[0.0f32, 0.0]];
        let got = r.retrieve(x.view()).expect("retrieve");
        assert_eq!(got.experts.iter().copied().collect::<Vec<_>>(), vec![0, 1]);
        // x = [0, 1]: s1 = [0, -0], s2 = [2, 0.5]; experts 0 and 2 tie at 2, 1 and 3 at 0.5 -> order 0, 2, 1, 3.
        let weights = PeerWeights {
            query: array![[[1.0f32, 0.0], [0.0, 1.0]]],
            keys_1: array![[[1.0f32], [-1.0]]],
            keys_2: array![[[2.0f32], [0.5]]],
        };
        let r = Peer::new(weights, 2, 2)
            .expect("peer")
            .with_non_competing_scores(true);
        let got = r.retrieve(array![[0.0f32, 1.0]].view()).expect("retrieve");
        assert_eq!(got.experts.iter().copied().collect::<Vec<_>>(), vec![0, 2]);
        let plan = r
            .route(&RouterInput::new(array![[0.0f32, 0.0]].view()))
            .expect("route");
        assert!(
            plan.slot_weights().iter().all(|&w| w == 0.0),
            "ReLU of zero scores is 0, slots kept"
        );
        assert_eq!(plan.n_slots(), 2);
    }

    #[test]
    fn batchnorm_eval_form_hand_computed() {
        // Features [q1, q2] with mean [1, 0], var [3, 1], weight [2, 1], bias [0, 0.5], eps 1:
        // q1' = (1 − 1) / 2 · 2 + 0 = 0; q2' = (2 − 0) / sqrt(2) · 1 + 0.5 = 1.9142136 for x = [1, 2].
        // Scores: s1 = [0, 0], s2 = [3.8284271, 0.9571068]; top-1 = expert 0 (score 3.8284271).
        let bn = QueryBatchNorm {
            running_mean: array![1.0f32, 0.0],
            running_var: array![3.0f32, 1.0],
            weight: array![2.0f32, 1.0],
            bias: array![0.0f32, 0.5],
            eps: 1.0,
            momentum: 0.1,
        };
        let r = tiny(1).with_query_batchnorm(bn).expect("bn");
        let got = r.retrieve(array![[1.0f32, 2.0]].view()).expect("retrieve");
        assert_eq!(got.experts[[0, 0, 0]], 0);
        assert!((got.scores[[0, 0, 0]] - 3.828_427).abs() < 1e-5);
        // The default statistics divide by sqrt(1 + 1e-5) only.
        let id = tiny(2)
            .with_query_batchnorm(QueryBatchNorm::identity(2))
            .expect("bn");
        let got = id.retrieve(array![[1.0f32, 2.0]].view()).expect("retrieve");
        assert!((got.scores[[0, 0, 0]] - 5.0 / (1.0f32 + 1e-5).sqrt()).abs() < 1e-6);
        let bad = QueryBatchNorm {
            eps: 0.0,
            ..QueryBatchNorm::identity(2)
        };
        assert!(matches!(
            tiny(1).with_query_batchnorm(bad),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            tiny(1).with_query_batchnorm(QueryBatchNorm::identity(3)),
            Err(MoeError::Shape { .. })
        ));
    }

    /// The reference order: every value offered in index order.
    fn reference_top(row: &[f32], p: usize) -> Vec<(f32, u32)> {
        let mut top = Vec::new();
        for (i, &v) in row.iter().enumerate() {
            offer(&mut top, p, (v, i as u32));
        }
        top
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x70F),
            failure_persistence: None,
            ..Default::default()
        })]

        #[test]
        fn fast_row_scan_equals_reference_with_ties(
            levels in 1u32..6,
            raw in proptest::collection::vec(0u32..1000, 0..600),
            p in 1usize..80,
            signed_zero in proptest::bool::ANY,
        ) {
            // Few distinct values (many ties, and -0 beside +0) stress the tie order on the fast path (n >= 128).
            let row: Vec<f32> = raw
                .iter()
                .map(|&r| {
                    let v = (r % levels) as f32 - 1.0;
                    if signed_zero && v == 0.0 && r % 2 == 1 { -0.0 } else { v }
                })
                .collect();
            let p = p.min(row.len().max(1));
            let (mut top, mut lanes) = (Vec::new(), Vec::new());
            proptest::prop_assert!(top_of_row(&row, p, &mut top, &mut lanes).is_ok());
            let want = reference_top(&row, p);
            proptest::prop_assert_eq!(
                top.iter().map(|x| x.1).collect::<Vec<_>>(),
                want.iter().map(|x| x.1).collect::<Vec<_>>()
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5E5),
            failure_persistence: None,
            ..Default::default()
        })]

        #[test]
        fn rank_key_orders_as_the_comparison(
            a in -4i32..4, b in -4i32..4, ia in 0u32..5, ib in 0u32..5, za in proptest::bool::ANY,
        ) {
            let val = |v: i32, neg_zero: bool| if v == 0 && neg_zero { -0.0f32 } else { v as f32 * 0.5 };
            let (x, y) = ((val(a, za), ia), (val(b, !za), ib));
            proptest::prop_assert_eq!(rank_key(&x).cmp(&rank_key(&y)), rank_cmp(&x, &y));
        }

        fn best_sums_equal_every_sum_offered(
            levels in 1u32..6,
            raw in proptest::collection::vec(0u32..1000, 2..120),
            p in 1usize..40,
            k in 1usize..80,
            signed_zero in proptest::bool::ANY,
        ) {
            // Two halves of few distinct values (ties, -0 beside +0), each reduced to its top p as retrieval does;
            // the reference offers all p² sums, in the retrieval's (row, column) order.
            let half = raw.len() / 2;
            let row: Vec<f32> = raw
                .iter()
                .map(|&r| {
                    let v = ((r % levels) as f32 - 1.0) * 0.75;
                    if signed_zero && v == 0.0 && r % 2 == 1 { -0.0 } else { v }
                })
                .collect();
            let (r1, r2) = row.split_at(half);
            let p = p.min(half);
            let (a, b) = (reference_top(r1, p), reference_top(r2, p));
            let k = k.min(a.len() * b.len());
            let mut want = Vec::new();
            for &(va, ia) in &a {
                for &(vb, ib) in &b {
                    offer(&mut want, k, (va + vb, ia * r2.len() as u32 + ib));
                }
            }
            let mut got = Vec::new();
            best_sums(&a, &b, k, r2.len(), &mut got);
            proptest::prop_assert_eq!(
                got.iter().map(|x| (x.0.to_bits(), x.1)).collect::<Vec<_>>(),
                want.iter().map(|x| (x.0.to_bits(), x.1)).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn row_scan_reports_the_first_non_finite_value() {
        let mut row = vec![0.5f32; 300];
        row[200] = f32::NAN;
        row[250] = f32::INFINITY;
        let (mut top, mut lanes) = (Vec::new(), Vec::new());
        assert_eq!(top_of_row(&row, 4, &mut top, &mut lanes), Err(200));
        assert_eq!(top_of_row(&row[..10], 4, &mut top, &mut lanes), Ok(()));
        assert_eq!(
            top.iter().map(|x| x.1).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn exact_sqrt_and_square_error() {
        assert_eq!(exact_sqrt(16), Some(4));
        assert_eq!(exact_sqrt(1 << 20), Some(1024));
        assert_eq!(exact_sqrt(15), None);
        assert_eq!(exact_sqrt(usize::MAX), None);
        match PeerConfig::default().build(8, 15, 0) {
            Err(MoeError::InvalidConfig { option, reason, .. }) => {
                assert_eq!(option, "n_experts");
                assert!(
                    reason.contains("9 = 3²") && reason.contains("16 = 4²"),
                    "{reason}"
                );
            }
            other => panic!("expected a non-square error, got {other:?}"),
        }
    }

    #[test]
    fn options_are_validated_before_allocation() {
        let cfg = |c: PeerConfig| c.build(8, 16, 0);
        assert!(matches!(
            cfg(PeerConfig {
                k: Some(5),
                ..Default::default()
            }),
            Err(MoeError::InvalidConfig { .. })
        ));
        assert!(matches!(
            cfg(PeerConfig {
                k: Some(0),
                ..Default::default()
            }),
            Err(MoeError::InvalidConfig { .. })
        ));
        let p = PeerConfig {
            k: Some(3),
            product_key_topk: Some(2),
            ..Default::default()
        };
        assert!(matches!(cfg(p), Err(MoeError::InvalidConfig { .. })));
        assert!(matches!(
            cfg(PeerConfig {
                heads: Some(0),
                ..Default::default()
            }),
            Err(MoeError::InvalidConfig { .. })
        ));
        // 2^40 experts and a 2^40-value query projection are refused without allocating.
        assert!(matches!(
            PeerConfig::default().build(8, 1 << 40, 0),
            Err(MoeError::TooLarge { .. })
        ));
        // h·2·d_key·d = 2^12 · 256 · 2^12 = 2^32 query values.
        let wide = PeerConfig {
            heads: Some(1 << 12),
            ..Default::default()
        };
        assert!(matches!(
            wide.build(1 << 12, 16, 0),
            Err(MoeError::TooLarge { .. })
        ));
        let slots = PeerConfig {
            heads: Some(1 << 13),
            d_key: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            slots.build(1, 1 << 10, 0),
            Err(MoeError::TooLarge { .. })
        ));
    }

    #[test]
    fn defaults_at_e16() {
        // E = 16 -> n = 4; heads 8, k = min(16, 4) = 4, d_key = min(128, 8) = 8.
        let r = PeerConfig::default().build(8, 16, 0).expect("peer");
        assert_eq!(
            (r.n_experts(), r.n_keys(), r.heads(), r.k(), r.d_key()),
            (16, 4, 8, 4, 8)
        );
        assert_eq!(r.activation(), Activation::Gelu);
    }

    #[test]
    fn usage_counts_distinct_experts() {
        let r = tiny(2);
        let mut u = ExpertUsage::new(4);
        u.add(
            &r.route(&RouterInput::new(array![[1.0f32, 2.0]].view()))
                .expect("route"),
        )
        .expect("add");
        assert_eq!(u.used(), 2);
        u.add(
            &r.route(&RouterInput::new(array![[2.0f32, 1.0]].view()))
                .expect("route"),
        )
        .expect("add");
        // x = [2, 1]: s1 = [2, −2], s2 = [2, 0.5]; best: (0,0) = 4, (0,1) = 2.5 -> experts 0, 1; 0 was seen.
        assert_eq!(u.used(), 3);
        assert!((u.fraction() - 0.75).abs() < 1e-12);
    }
}
