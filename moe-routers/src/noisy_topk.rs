//! Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538; docs/ROUTERS.md §2): learned Gaussian noise in training, KeepTopK, softmax
//! over the kept noisy logits, and the importance and smooth load losses.

use ndarray::{Array2, ArrayView1};
use rayon::prelude::*;

use moe_core::kit::{self, GATE_STREAM};
use moe_core::math::normal_cdf;
use moe_core::rng::CounterRng;
use moe_core::{
    Assignment, AuxLoss, AuxLossKind, Grad, KEEP_LOGITS_MAX_EXPERTS, Mode, MoeError, Param,
    ParamMut, Router, RouterArgs, RouterBackward, RouterConfig, RouterEntry, RouterGrads,
    RouterInput, RouterRegistry, Routing, check_finite, loss,
};

/// Largest `T · E` a single call accepts: the router holds a few `[T, E]` f32 tables.
const MAX_SCORE_VALUES: u128 = 1 << 31;

/// Random stream of `W_noise` in registry factories (`W_g` uses [`GATE_STREAM`]).
pub const NOISE_WEIGHT_STREAM: u64 = 2;

/// Random stream of the training noise: `ε[t, e] = CounterRng::new(seed, NOISE_STREAM).normal_at(t · E + e)`,
/// so the noise of a token does not depend on the thread count or the evaluation order.
pub const NOISE_STREAM: u64 = 0x006E_6F69_7379; // "noisy" in ASCII

/// Default `noise_epsilon`, the floor of the noise standard deviation (Shazeer's reference: 1e-2).
pub const DEFAULT_NOISE_EPSILON: f32 = 1e-2;

/// Default coefficient of both losses (Shazeer's reference: 1e-2).
pub const DEFAULT_LOSS_COEFFICIENT: f32 = 1e-2;

moe_core::router_options! {
    /// Options of [`NoisyTopK`]; every field is optional.
    pub struct NoisyTopKConfig {
        /// Experts per token.
        #[default_doc = "layer k"]
        k: usize,
        /// Floor of the noise std: σ = softplus(x · W_noiseᵀ) + noise_epsilon; finite, > 0.
        noise_epsilon: f32 = DEFAULT_NOISE_EPSILON,
        /// Coefficient reported with the importance loss CV²(Σ_t G(x_t)); finite, >= 0.
        w_importance: f32 = DEFAULT_LOSS_COEFFICIENT,
        /// Coefficient reported with the load loss CV²(Σ_t P(x_t, e)); finite, >= 0.
        w_load: f32 = DEFAULT_LOSS_COEFFICIENT,
    }
}

impl RouterConfig for NoisyTopKConfig {
    /// Always causal: each token is routed from its own logits, and its training noise is drawn at its own index
    /// (`t · E + e`), so later tokens never change it.
    fn is_causal(&self) -> bool {
        true
    }
}

impl NoisyTopKConfig {
    /// Resolves the defaults and builds the router around `gate` and `noise` (both `[E, d]`).
    ///
    /// # Errors
    /// [`NoisyTopK::new`]'s errors; [`MoeError::InvalidConfig`] for a `noise_epsilon` that is not finite and
    /// `> 0`, or a coefficient that is not finite and `>= 0`.
    pub fn build(
        &self,
        gate: Array2<f32>,
        noise: Array2<f32>,
        default_k: usize,
    ) -> Result<NoisyTopK, MoeError> {
        let mut r = NoisyTopK::new(gate, noise, self.k.unwrap_or(default_k))?;
        let eps = self.noise_epsilon();
        if !eps.is_finite() || eps <= 0.0 {
            return Err(MoeError::config(
                "noise_epsilon",
                eps,
                "must be finite and > 0",
            ));
        }
        let (w_importance, w_load) = (self.w_importance(), self.w_load());
        for (name, w) in [("w_importance", w_importance), ("w_load", w_load)] {
            if !w.is_finite() || w < 0.0 {
                return Err(MoeError::config(name, w, "must be finite and >= 0"));
            }
        }
        r.noise_epsilon = eps;
        r.w_importance = w_importance;
        r.w_load = w_load;
        Ok(r)
    }
}

/// Noisy top-k router (Shazeer et al. 2017, arXiv 1701.06538).
///
/// With clean logits `l = x · W_gᵀ` and `σ = softplus(x · W_noiseᵀ) + noise_epsilon` (both `[T, E]`):
/// - noisy logits `H = l + ε ⊙ σ`, `ε ~ N(0, 1)` drawn only in [`Mode::Train`] (from [`NOISE_STREAM`]); in
///   [`Mode::Eval`] `H = l`;
/// - gates `G = softmax(KeepTopK(H, k))`: the `k` largest noisy logits (ties to the lower expert id), softmax over
///   those `k`, rank = position in descending `H`;
/// - [`AuxLossKind::Importance`]: `CV²(Σ_t G(x_t))`;
/// - [`AuxLossKind::SmoothLoad`]: `CV²(Σ_t P(x_t, e))` in training, with
///   `P(x, e) = Φ((l_e − threshold_e) / σ_e)` and `threshold_e` the k-th largest noisy logit excluding `e`; in eval
///   the load is the count of gates `> 0` instead.
///
/// Padding tokens get no assignment and are left out of both losses. The clean logits are attached to the plan
/// when `E <= 4096`. Calls with `T · E > 2^31` are refused with [`MoeError::TooLarge`].
#[derive(Debug, Clone, PartialEq)]
pub struct NoisyTopK {
    gate: Array2<f32>,
    noise: Array2<f32>,
    k: usize,
    noise_epsilon: f32,
    w_importance: f32,
    w_load: f32,
}

/// What one token's pass produces (padding tokens included; the caller skips them).
struct TokenGates {
    /// Noisy logits `[E]` (the clean logits in eval).
    noisy: Vec<f32>,
    /// The `k` chosen experts, in descending noisy logit.
    experts: Vec<usize>,
    /// Their softmax weights.
    weights: Vec<f32>,
    /// `P(x, e)` for every expert `[E]`, in training only.
    load_prob: Option<Vec<f64>>,
}

impl NoisyTopK {
    /// A router from the gate `W_g` and noise matrix `W_noise` (both `[E, d]`, `nn.Linear` layout) with `k`
    /// experts per token, `noise_epsilon = 1e-2` and loss coefficients 1e-2 (use [`NoisyTopKConfig::build`] to
    /// set those).
    ///
    /// # Errors
    /// [`MoeError::Shape`] for an empty gate or a noise matrix of another shape, [`MoeError::NonFinite`] for a
    /// NaN or infinity in either, [`MoeError::TooLarge`] past [`kit::MAX_DENSE_EXPERTS`] experts,
    /// [`MoeError::TopK`] for `k = 0` or `k > E`.
    pub fn new(gate: Array2<f32>, noise: Array2<f32>, k: usize) -> Result<Self, MoeError> {
        kit::check_gate("w_gate", &gate)?;
        let (e, d) = gate.dim();
        if noise.dim() != (e, d) {
            return Err(MoeError::shape(
                "w_noise",
                format!("[{e}, {d}]"),
                noise.shape(),
            ));
        }
        check_finite("w_noise", noise.view())?;
        kit::check_dense_experts(e)?;
        if k == 0 || k > e {
            return Err(MoeError::TopK { k, n_experts: e });
        }
        Ok(NoisyTopK {
            gate,
            noise,
            k,
            noise_epsilon: DEFAULT_NOISE_EPSILON,
            w_importance: DEFAULT_LOSS_COEFFICIENT,
            w_load: DEFAULT_LOSS_COEFFICIENT,
        })
    }

    /// Experts per token.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The gate matrix `W_g` `[E, d]`.
    pub fn gate(&self) -> &Array2<f32> {
        &self.gate
    }

    /// The noise matrix `W_noise` `[E, d]`.
    pub fn noise(&self) -> &Array2<f32> {
        &self.noise
    }

    /// The floor of the noise standard deviation.
    pub fn noise_epsilon(&self) -> f32 {
        self.noise_epsilon
    }

    /// The noisy logits `H` `[T, E]` that [`Router::route`] selects from for the same input (the clean logits in
    /// eval; padding rows are computed too).
    ///
    /// # Errors
    /// As [`Router::route`].
    pub fn noisy_logits(&self, input: &RouterInput<'_>) -> Result<Array2<f32>, MoeError> {
        let (_, tokens) = self.forward(input)?;
        let e = self.n_experts();
        let t = tokens.len();
        let flat: Vec<f32> = tokens.into_iter().flat_map(|g| g.noisy).collect();
        Array2::from_shape_vec((t, e), flat)
            .map_err(|_| MoeError::shape("noisy logits", format!("[T, {e}]"), &[t]))
    }

    /// The per-token load estimate `[T, E]` behind the load loss: in training the smooth estimator
    /// `P(x_t, e) = Φ((l_e − threshold_e) / σ_e)`, the probability that `e` stays in the top k when only its own
    /// noise is redrawn; in eval the indicator of gate `> 0`. Padding rows are 0.
    ///
    /// # Errors
    /// As [`Router::route`].
    pub fn load_probabilities(&self, input: &RouterInput<'_>) -> Result<Array2<f64>, MoeError> {
        let (_, tokens) = self.forward(input)?;
        let e = self.n_experts();
        let mut flat = vec![0.0f64; tokens.len() * e];
        for (i, (g, row)) in tokens.iter().zip(flat.chunks_mut(e)).enumerate() {
            if !input.is_padding(i) {
                token_load(g, row);
            }
        }
        Array2::from_shape_vec((tokens.len(), e), flat).map_err(|_| {
            MoeError::shape("load probabilities", format!("[T, {e}]"), &[tokens.len()])
        })
    }

    /// Clean logits `[T, E]` and every token's gates, in token order. Tokens are independent and their noise is
    /// counter-based, so the result is the same on any thread count.
    fn forward(&self, input: &RouterInput<'_>) -> Result<(Array2<f32>, Vec<TokenGates>), MoeError> {
        let clean = self.clean_logits(input)?;
        let tokens = self.gates(input, &clean, 0..input.n_tokens(), true)?;
        Ok((clean, tokens))
    }

    /// The checked clean logits `[T, E]` of `input`.
    fn clean_logits(&self, input: &RouterInput<'_>) -> Result<Array2<f32>, MoeError> {
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, self.k)?;
        check_size(input.n_tokens(), e)?;
        kit::gate_logits(input.hidden, self.gate.view(), None)
    }

    /// The gates of tokens `rows` (their noise logits computed for these rows only, so routing in blocks holds
    /// `O(block · E)` of them); `keep_noisy = false` drops each token's noisy row once its choice is made.
    fn gates(
        &self,
        input: &RouterInput<'_>,
        clean: &Array2<f32>,
        rows: std::ops::Range<usize>,
        keep_noisy: bool,
    ) -> Result<Vec<TokenGates>, MoeError> {
        let raw = self.noise_logits(input, rows.clone())?;
        self.gates_with(input, clean, rows, raw.as_ref(), keep_noisy)
    }

    /// The raw noise logits `x · W_noiseᵀ` of tokens `rows` (`[rows, E]`) in training, `None` in eval.
    fn noise_logits(
        &self,
        input: &RouterInput<'_>,
        rows: std::ops::Range<usize>,
    ) -> Result<Option<Array2<f32>>, MoeError> {
        let start = rows.start;
        let Mode::Train { .. } = input.mode else {
            return Ok(None);
        };
        let raw = input
            .hidden
            .slice(ndarray::s![rows, ..])
            .dot(&self.noise.t());
        check_finite("noise logits", raw.view()).map_err(|e| match e {
            MoeError::NonFinite {
                tensor,
                token,
                column,
                value,
            } => MoeError::NonFinite {
                tensor,
                token: token + start,
                column,
                value,
            },
            e => e,
        })?;
        Ok(Some(raw))
    }

    /// [`NoisyTopK::gates`] from the raw noise logits of `rows` ([`NoisyTopK::noise_logits`]).
    fn gates_with(
        &self,
        input: &RouterInput<'_>,
        clean: &Array2<f32>,
        rows: std::ops::Range<usize>,
        raw: Option<&Array2<f32>>,
        keep_noisy: bool,
    ) -> Result<Vec<TokenGates>, MoeError> {
        let start = rows.start;
        let noise = match (input.mode, raw) {
            (Mode::Train { seed }, Some(raw)) => Some((raw, CounterRng::new(seed, NOISE_STREAM))),
            _ => None,
        };
        let results: Vec<Result<TokenGates, MoeError>> = rows
            .into_par_iter()
            .map(|i| {
                let raw = noise.as_ref().map(|(raw, rng)| (raw.row(i - start), rng));
                let mut g = self.route_token(i, clean.row(i), raw)?;
                if !keep_noisy {
                    g.noisy = Vec::new();
                }
                Ok(g)
            })
            .collect();
        // The first error in token order, whatever the thread count.
        results.into_iter().collect()
    }

    /// One token: noisy logits, KeepTopK, softmax, and in training the smooth load estimate.
    fn route_token(
        &self,
        token: usize,
        clean: ArrayView1<'_, f32>,
        noise: Option<(ArrayView1<'_, f32>, &CounterRng)>,
    ) -> Result<TokenGates, MoeError> {
        let e = clean.len();
        let (noisy, sigma) = match noise {
            None => (clean.to_vec(), None),
            Some((raw, rng)) => {
                let sigma: Vec<f32> = raw
                    .iter()
                    .map(|&v| kit::softplus(v) + self.noise_epsilon)
                    .collect();
                let base = token as u64 * e as u64;
                let noisy: Vec<f32> = clean
                    .iter()
                    .zip(&sigma)
                    .enumerate()
                    .map(|(j, (&l, &s))| l + rng.normal_at(base + j as u64) as f32 * s)
                    .collect();
                (noisy, Some(sigma))
            }
        };
        if let Some((column, &value)) = noisy.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(MoeError::NonFinite {
                tensor: "noisy logits".into(),
                token,
                column,
                value,
            });
        }
        // The top k + 1 give both thresholds of the smooth load estimator.
        let top = kit::top_k(&noisy, self.k + 1);
        let experts: Vec<usize> = top.iter().take(self.k).copied().collect();
        let mut weights: Vec<f32> = experts.iter().map(|&j| noisy[j]).collect();
        kit::softmax_in_place(&mut weights);
        let load_prob = sigma.map(|sigma| smooth_load(clean, &noisy, &sigma, &top, self.k));
        Ok(TokenGates {
            noisy,
            experts,
            weights,
            load_prob,
        })
    }
}

/// Tokens whose per-token rows (noise, noisy logits, load estimates) [`Router::route`] holds at once.
const ROUTE_BLOCK: usize = 64;

/// Checks that `T · E` stays below [`MAX_SCORE_VALUES`].
fn check_size(t: usize, e: usize) -> Result<(), MoeError> {
    let size = t as u128 * e as u128;
    if size > MAX_SCORE_VALUES {
        return Err(MoeError::TooLarge {
            what: "noisy-topk scores T * E".into(),
            size,
            limit: MAX_SCORE_VALUES,
        });
    }
    Ok(())
}

/// Adds one real token's load into `out` (`[E]`): `P(x, e)` in training, the indicator of gate `> 0` in eval.
fn token_load(g: &TokenGates, out: &mut [f64]) {
    match &g.load_prob {
        Some(p) => out.iter_mut().zip(p).for_each(|(o, &p)| *o += p),
        None => {
            for (&j, &w) in g.experts.iter().zip(&g.weights) {
                if let Some(o) = out.get_mut(j).filter(|_| w > 0.0) {
                    *o += 1.0;
                }
            }
        }
    }
}

/// Shazeer's smooth load estimator for one token, `[E]`: `P(x, e) = Φ((l_e − threshold_e) / σ_e)`, where
/// `threshold_e` is the k-th largest noisy logit among the other experts. `top` holds the indices of the `k + 1`
/// largest noisy logits in descending order: if `e` is among the first `k` the threshold is the (k+1)-th value,
/// else the k-th. With `k = E` every expert is always chosen and `P = 1`.
fn smooth_load(
    clean: ArrayView1<'_, f32>,
    noisy: &[f32],
    sigma: &[f32],
    top: &[usize],
    k: usize,
) -> Vec<f64> {
    let e = clean.len();
    let (Some(&kth), Some(&next)) = (k.checked_sub(1).and_then(|i| top.get(i)), top.get(k)) else {
        return vec![1.0; e];
    };
    let threshold_out = f64::from(noisy[kth]);
    let threshold_in = f64::from(noisy[next]);
    let mut is_in = vec![false; e];
    for &j in top.iter().take(k) {
        is_in[j] = true;
    }
    clean
        .iter()
        .zip(sigma)
        .zip(&is_in)
        .map(|((&l, &s), &inside)| {
            let threshold = if inside { threshold_in } else { threshold_out };
            normal_cdf((f64::from(l) - threshold) / f64::from(s))
        })
        .collect()
}

/// `φ(z)`, the standard normal density: the derivative of [`normal_cdf`].
fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// What the backward reads from the plan ([`NoisyTopK::plan_gradients`]).
struct PlanGrads {
    /// `dL/dw` of (token `t`, rank `j`) at `t · k + j`, `[T · k]`.
    d_w: Vec<f32>,
    /// The plan's expert of (token, rank), `u32::MAX` where it has none, `[T · k]`.
    plan_expert: Vec<u32>,
    /// `Σ_t G(x_t)` `[E]`, summed as the forward summed it.
    importance: Vec<f64>,
}

/// What every token's backward shares: the plan's gradients per (token, rank) and the losses' gradients per expert.
struct BackwardCtx<'a> {
    /// `dL/dw` of the slot of (token `t`, rank `j`) at `t · k + j` (0 where the plan has none).
    d_w: &'a [f32],
    /// The plan's expert at (token, rank), `u32::MAX` where it has none.
    plan_expert: &'a [u32],
    /// `dL/d importance_e` `[E]`.
    d_importance: &'a [f64],
    /// `dL/d load_e` `[E]`, in training (the eval load is a count of gates, a constant).
    d_load: Option<&'a [f64]>,
    /// The training noise generator, in training.
    rng: Option<CounterRng>,
}

impl NoisyTopK {
    /// From the plan: `dL/dw` and the expert of every (token, rank) `[T · k]`, and the importance `Σ_t G(x_t)`
    /// `[E]` summed in token order per expert, as the forward summed it.
    fn plan_gradients(
        &self,
        grad: &RouterBackward<'_, '_>,
        t: usize,
        e: usize,
    ) -> Result<PlanGrads, MoeError> {
        let k = self.k;
        let mut d_w = vec![0.0f32; t * k];
        let mut plan_expert = vec![u32::MAX; t * k];
        let mut importance = vec![0.0f64; e];
        let ranks = grad.routing.slot_ranks();
        for g in grad.routing.groups() {
            for (j, (&token, &w)) in g.tokens.iter().zip(g.weights).enumerate() {
                let s = g.slot_start + j;
                let rank = ranks.get(s).map_or(usize::MAX, |&r| usize::from(r));
                if rank >= k {
                    return Err(MoeError::config(
                        "noisy-topk backward: plan rank",
                        rank,
                        format!("must be < k = {k} (the plan was not routed by this router)"),
                    ));
                }
                let at = token as usize * k + rank;
                if let (Some(dw), Some(pe), Some(&g_s)) = (
                    d_w.get_mut(at),
                    plan_expert.get_mut(at),
                    grad.d_weights.get(s),
                ) {
                    *dw = g_s;
                    *pe = g.expert as u32;
                }
                if let Some(imp) = importance.get_mut(g.expert) {
                    *imp += f64::from(w);
                }
            }
        }
        Ok(PlanGrads {
            d_w,
            plan_expert,
            importance,
        })
    }

    /// One real token's backward into its rows of `dL/dl` (clean logits) and `dL/d raw` (noise logits, training
    /// only), both `[E]`. The noisy logits `H = l + ε ⊙ σ` (`H = l` in eval) get the softmax backward of the kept
    /// weights (`dL/dw` of the slot plus `dL/d importance` of its expert) and, in training, the thresholds'
    /// share of the load backward; then `dl += dH`, `dσ += dH ⊙ ε` and `d raw = dσ ⊙ sigmoid(raw)` (the
    /// derivative of softplus).
    fn token_backward(
        &self,
        token: usize,
        clean: ArrayView1<'_, f32>,
        g: &TokenGates,
        raw: Option<ArrayView1<'_, f32>>,
        ctx: &BackwardCtx<'_>,
        d_l: &mut [f32],
        d_raw: &mut [f32],
    ) -> Result<(), MoeError> {
        let (e, k) = (clean.len(), self.k);
        let mut d_h = vec![0.0f64; e];
        let mut dw = Vec::with_capacity(k);
        for (j, &ex) in g.experts.iter().enumerate() {
            let plan = ctx
                .plan_expert
                .get(token * k + j)
                .copied()
                .unwrap_or(u32::MAX);
            if plan as usize != ex {
                return Err(MoeError::mismatch(
                    format!(
                        "noisy-topk backward, token {token} rank {j} (the plan must come from this router, input \
                         and mode)"
                    ),
                    "plan expert",
                    plan as usize,
                    "recomputed expert",
                    ex,
                ));
            }
            let d_imp = ctx.d_importance.get(ex).copied().unwrap_or(0.0) as f32;
            dw.push(ctx.d_w.get(token * k + j).copied().unwrap_or(0.0) + d_imp);
        }
        let mut d_kept = vec![0.0f32; g.experts.len()];
        kit::softmax_backward(&g.weights, &dw, &mut d_kept);
        for (&ex, &v) in g.experts.iter().zip(&d_kept) {
            d_h[ex] += f64::from(v);
        }
        let (Some(raw), Some(rng)) = (raw, ctx.rng.as_ref()) else {
            for (o, &v) in d_l.iter_mut().zip(&d_h) {
                *o = v as f32;
            }
            return Ok(());
        };
        let sigma: Vec<f32> = raw
            .iter()
            .map(|&v| kit::softplus(v) + self.noise_epsilon)
            .collect();
        let mut d_clean = vec![0.0f64; e];
        let mut d_sigma = vec![0.0f64; e];
        if let Some(d_load) = ctx.d_load {
            let mut parts = LoadGrads {
                d_clean: &mut d_clean,
                d_noisy: &mut d_h,
                d_sigma: &mut d_sigma,
            };
            smooth_load_backward(clean, &g.noisy, &sigma, k, d_load, &mut parts);
        }
        let base = token as u64 * e as u64;
        for ex in 0..e {
            let eps = rng.normal_at(base + ex as u64) as f32;
            let dl = d_clean[ex] + d_h[ex];
            let ds = d_sigma[ex] + d_h[ex] * f64::from(eps);
            d_l[ex] = dl as f32;
            d_raw[ex] = (ds * f64::from(kit::sigmoid(raw[ex]))) as f32;
        }
        Ok(())
    }
}

impl NoisyTopK {
    /// The two linear maps' backward from `dL/dl` and `dL/d raw` (`[T · E]` each, row-major): `dx`, `dW_g` and
    /// `dW_noise` (zeros in eval, where the noise matrix is not used).
    fn linear_backward(
        &self,
        input: &RouterInput<'_>,
        t: usize,
        d_l: Vec<f32>,
        d_raw: Vec<f32>,
    ) -> Result<RouterGrads, MoeError> {
        let e = self.n_experts();
        let shape = |v: Vec<f32>, name: &str| {
            Array2::from_shape_vec((t, e), v)
                .map_err(|_| MoeError::shape(name, format!("[{t}, {e}]"), &[t]))
        };
        let g = kit::gate_backward(
            input.hidden,
            self.gate.view(),
            shape(d_l, "d_logits")?.view(),
        )?;
        let mut d_x = g.d_x;
        let d_noise = match input.mode {
            Mode::Eval => Array2::zeros(self.noise.dim()),
            Mode::Train { .. } => {
                let d_raw = shape(d_raw, "d_noise_logits")?;
                let n = kit::gate_backward(input.hidden, self.noise.view(), d_raw.view())?;
                d_x += &n.d_x;
                n.d_gate
            }
        };
        Ok(RouterGrads {
            d_hidden: d_x,
            params: vec![Grad::dense("gate", g.d_gate), Grad::dense("noise", d_noise)],
        })
    }
}

/// Accumulators of one token's load backward, `[E]` each.
struct LoadGrads<'a> {
    /// `dL/dl` (clean logits).
    d_clean: &'a mut [f64],
    /// `dL/dH` (noisy logits: the thresholds).
    d_noisy: &'a mut [f64],
    /// `dL/dσ`.
    d_sigma: &'a mut [f64],
}

/// The backward of [`smooth_load`] for one token, given `dL/dP(x, e)` `[E]`: with `z_e = (l_e − threshold_e) /
/// σ_e` and `dz_e = dP_e · φ(z_e)`: `dl_e += dz_e / σ_e`, `dσ_e −= dz_e · z_e / σ_e`, and the threshold (the noisy
/// logit it was read from, the (k+1)-th or the k-th largest) gets `−dz_e / σ_e`, as in Shazeer's reference, where
/// the thresholds are gathered from the differentiable top-k values. With `k = E` the estimate is the constant 1.
fn smooth_load_backward(
    clean: ArrayView1<'_, f32>,
    noisy: &[f32],
    sigma: &[f32],
    k: usize,
    d_load: &[f64],
    out: &mut LoadGrads<'_>,
) {
    let top = kit::top_k(noisy, k + 1);
    let (Some(&kth), Some(&next)) = (k.checked_sub(1).and_then(|i| top.get(i)), top.get(k)) else {
        return;
    };
    let e = clean.len();
    let mut is_in = vec![false; e];
    for &j in top.iter().take(k) {
        is_in[j] = true;
    }
    for ex in 0..e {
        let at = if is_in[ex] { next } else { kth };
        let s = f64::from(sigma[ex]);
        let z = (f64::from(clean[ex]) - f64::from(noisy[at])) / s;
        let dz = d_load.get(ex).copied().unwrap_or(0.0) * normal_pdf(z) / s;
        out.d_clean[ex] += dz;
        out.d_noisy[at] -= dz;
        out.d_sigma[ex] -= dz * z;
    }
}

impl Router for NoisyTopK {
    fn name(&self) -> &str {
        "noisy-topk"
    }

    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }

    /// [`NoisyTopKConfig::is_causal`]: always `true`.
    fn is_causal(&self) -> bool {
        NoisyTopKConfig::default().is_causal()
    }

    /// `gate`: `W_g`, `[E, d]`; `noise`: `W_noise`, `[E, d]` (σ = softplus(x · W_noiseᵀ) + noise_epsilon).
    fn params(&self) -> Vec<Param<'_>> {
        vec![
            Param::new("gate", self.gate.view()),
            Param::new("noise", self.noise.view()),
        ]
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        vec![
            ParamMut::new("gate", self.gate.view_mut()),
            ParamMut::new("noise", self.noise.view_mut()),
        ]
    }

    /// Memory: one `[T, E]` buffer, the clean logits; the noise logits, noisy logits and training load estimates
    /// (f64) live for a block of 64 tokens (`ROUTE_BLOCK`) at a time, and the loss sums run in token order as before.
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let clean = self.clean_logits(input)?;
        let (t, e) = clean.dim();
        let mut kept = Vec::with_capacity(t.saturating_mul(self.k));
        let mut importance = vec![0.0f64; e];
        let mut load = vec![0.0f64; e];
        let mut n_real = 0usize;
        let mut tokens = Vec::new();
        for i in 0..t {
            if i % ROUTE_BLOCK == 0 {
                tokens = self.gates(input, &clean, i..(i + ROUTE_BLOCK).min(t), false)?;
            }
            let Some(g) = tokens.get(i % ROUTE_BLOCK) else {
                continue;
            };
            if input.is_padding(i) {
                continue;
            }
            n_real += 1;
            for (rank, (&expert, &weight)) in g.experts.iter().zip(&g.weights).enumerate() {
                kept.push(Assignment {
                    token: i as u32,
                    expert: expert as u32,
                    weight,
                    rank: u16::try_from(rank).unwrap_or(u16::MAX),
                });
                if let Some(imp) = importance.get_mut(expert) {
                    *imp += f64::from(weight);
                }
            }
            token_load(g, &mut load);
        }
        let mut routing = Routing::new(t, e, n_real, kept, Vec::new())?;
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::Importance,
            value: loss::cv_squared(&importance),
            coefficient: self.w_importance,
        });
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::SmoothLoad,
            value: loss::cv_squared(&load),
            coefficient: self.w_load,
        });
        if e <= KEEP_LOGITS_MAX_EXPERTS {
            routing.set_logits(clean);
        }
        Ok(routing)
    }

    /// The exact backward of [`Router::route`], recomputing the forward (clean logits, the seeded noise of
    /// `input.mode`, in the same blocks of tokens). Per real token: the kept weights `softmax(H_kept)` get `dL/dw`
    /// of their slot plus `dL/d importance_e` of their expert ([`kit::cv_squared_backward`]); in training the smooth
    /// load `P(x, e) = Φ((l_e − threshold_e) / σ_e)` gets `dL/d load_e` and passes it to the clean logit, to `σ` and
    /// to the noisy logit the threshold was read from (`smooth_load_backward`); the noisy logits
    /// `H = l + ε ⊙ σ` pass to `l` and, through `σ = softplus(x · W_noiseᵀ) + noise_epsilon`, to `W_noise` (`ε` are
    /// constants, redrawn from the seed). Then the two linear maps: `dx = dl · W_g + d raw · W_noise`,
    /// `dW_g = dlᵀ · x`, `dW_noise = d rawᵀ · x`. In eval there is no noise and the load is a count of gates, so
    /// `W_noise` gets zeros. Padding rows get 0 and are out of both losses, as in the forward. Which experts were
    /// kept gets no gradient. Tokens are independent: the same bits on any thread count.
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; [`MoeError::Mismatch`] for a plan of another `E` or one whose experts
    /// differ from the recomputed ones (a plan routed from another input, mode or router); the input errors of
    /// [`Router::route`].
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let input = grad.input;
        let clean = self.clean_logits(input)?;
        let (t, e) = clean.dim();
        if grad.routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "noisy-topk backward",
                "plan experts",
                grad.routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let PlanGrads {
            d_w,
            plan_expert,
            importance,
        } = self.plan_gradients(grad, t, e)?;
        let d_importance = kit::cv_squared_backward(
            ArrayView1::from(&importance[..]),
            grad.d_aux_of(AuxLossKind::Importance),
        );
        let mut raws = Vec::with_capacity(t.div_ceil(ROUTE_BLOCK));
        let mut tokens = Vec::with_capacity(t);
        for start in (0..t).step_by(ROUTE_BLOCK) {
            let rows = start..(start + ROUTE_BLOCK).min(t);
            let raw = self.noise_logits(input, rows.clone())?;
            tokens.extend(self.gates_with(input, &clean, rows, raw.as_ref(), true)?);
            raws.push(raw);
        }
        let (rng, d_load) = match input.mode {
            Mode::Eval => (None, None),
            Mode::Train { seed } => {
                let mut load = vec![0.0f64; e];
                for (i, g) in tokens.iter().enumerate() {
                    if !input.is_padding(i) {
                        token_load(g, &mut load);
                    }
                }
                let d = kit::cv_squared_backward(
                    ArrayView1::from(&load[..]),
                    grad.d_aux_of(AuxLossKind::SmoothLoad),
                );
                (Some(CounterRng::new(seed, NOISE_STREAM)), Some(d.to_vec()))
            }
        };
        let ctx = BackwardCtx {
            d_w: &d_w,
            plan_expert: &plan_expert,
            d_importance: d_importance.as_slice().unwrap_or(&[]),
            d_load: d_load.as_deref(),
            rng,
        };
        let mut d_l = vec![0.0f32; t * e];
        let mut d_raw = vec![0.0f32; t * e];
        let results: Vec<Result<(), MoeError>> = d_l
            .par_chunks_mut(e)
            .zip(d_raw.par_chunks_mut(e))
            .enumerate()
            .map(|(i, (dl, dr))| match tokens.get(i) {
                Some(g) if !input.is_padding(i) => {
                    let raw = raws
                        .get(i / ROUTE_BLOCK)
                        .and_then(|r| r.as_ref())
                        .map(|r| r.row(i % ROUTE_BLOCK));
                    self.token_backward(i, clean.row(i), g, raw, &ctx, dl, dr)
                }
                _ => Ok(()),
            })
            .collect();
        results.into_iter().collect::<Result<Vec<()>, MoeError>>()?;
        self.linear_backward(input, t, d_l, d_raw)
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: NoisyTopKConfig = args.parse("noisy-topk")?;
    let gate = kit::init_gate(args.d_model, args.n_experts, args.seed, GATE_STREAM)?;
    let noise = kit::init_gate(args.d_model, args.n_experts, args.seed, NOISE_WEIGHT_STREAM)?;
    Ok(Box::new(cfg.build(gate, noise, args.top_k)?))
}

/// Registers `noisy-topk`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<NoisyTopKConfig>(
        "noisy-topk",
        "noisy top-k gating with importance and smooth load losses (Shazeer 2017)",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// With an identity gate the clean logits are the inputs themselves.
    fn eye_router(e: usize, k: usize) -> NoisyTopK {
        NoisyTopK::new(Array2::eye(e), Array2::zeros((e, e)), k).expect("valid router")
    }

    fn aux(plan: &Routing, kind: AuxLossKind) -> f32 {
        plan.aux_losses()
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| a.value)
            .expect("loss present")
    }

    #[test]
    fn eval_hand_computed() {
        // Identity gate, k = 2, eval (no noise), so H = l = x.
        // Token 0, l = [1, 2, 0]: top-2 = experts 1, 0; softmax(2, 1) = [e/(e+1), 1/(e+1)]
        //   = [0.7310586, 0.2689414].
        // Token 1, l = [0, 0, 3]: top-2 = experts 2, 0 (the 0/0 tie goes to the lower id);
        //   softmax(3, 0) = [0.9525741, 0.0474259].
        // Importance = [0.2689414 + 0.0474259, 0.7310586, 0.9525741] = [0.3163673, 0.7310586, 0.9525741], mean 2/3;
        //   deviations [-0.3503, 0.0644, 0.2859], population variance 0.0695330; CV² = var / mean² = 0.1564493.
        // Load (counts of gates > 0) = [2, 1, 1], mean 4/3; variance = (4/9 + 1/9 + 1/9)/3 = 2/9; CV² = (2/9)/(16/9)
        //   = 0.125.
        let r = eye_router(3, 2);
        let x = array![[1.0f32, 2.0, 0.0], [0.0, 0.0, 3.0]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        let t = plan.per_token();
        assert_eq!(t[0].iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((t[0][0].1 - 0.731_058_6).abs() < 1e-6);
        assert!((t[0][1].1 - 0.268_941_4).abs() < 1e-6);
        assert_eq!(t[1].iter().map(|a| a.0).collect::<Vec<_>>(), vec![2, 0]);
        assert!((t[1][0].1 - 0.952_574_1).abs() < 1e-6);
        assert!((t[1][1].1 - 0.047_425_9).abs() < 1e-6);
        assert!((aux(&plan, AuxLossKind::Importance) - 0.156_449_3).abs() < 1e-5);
        assert!((aux(&plan, AuxLossKind::SmoothLoad) - 0.125).abs() < 1e-6);
        assert_eq!(plan.logits(), Some(&x));
    }

    #[test]
    fn balanced_input_has_zero_losses() {
        // Cyclic shifts of [2, 1, 0, 0] through an identity gate: every expert receives the same multiset of gates
        // (one first choice, one second choice), so importance and load are uniform and both CV² are 0.
        let r = eye_router(4, 2);
        let x = array![
            [2.0f32, 1.0, 0.0, 0.0],
            [0.0, 2.0, 1.0, 0.0],
            [0.0, 0.0, 2.0, 1.0],
            [1.0, 0.0, 0.0, 2.0]
        ];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        assert!(aux(&plan, AuxLossKind::Importance).abs() < 1e-10);
        assert_eq!(aux(&plan, AuxLossKind::SmoothLoad), 0.0);
        assert_eq!(plan.expert_counts(), vec![2; 4]);
    }

    #[test]
    fn padding_is_not_routed_and_not_in_losses() {
        // The same two real tokens as `eval_hand_computed`, with a padding token between them: the losses must not
        // change.
        let r = eye_router(3, 2);
        let x = array![[1.0f32, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 3.0]];
        let pad = [false, true, false];
        let plan = r
            .route(&RouterInput::new(x.view()).with_padding(&pad))
            .expect("route");
        assert!(plan.per_token()[1].is_empty());
        assert_eq!(plan.n_real_tokens(), 2);
        assert!((aux(&plan, AuxLossKind::Importance) - 0.156_449_3).abs() < 1e-5);
        assert!((aux(&plan, AuxLossKind::SmoothLoad) - 0.125).abs() < 1e-6);
        let train = RouterInput::new(x.view())
            .with_padding(&pad)
            .with_mode(Mode::Train { seed: 5 });
        let p = r.load_probabilities(&train).expect("probabilities");
        assert!(p.row(1).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn smooth_load_thresholds() {
        // k = 2, noisy logits [3, 1, 2, 0], clean logits all 1, σ all 1: the top k + 1 are experts 0, 2, 1.
        // Experts 0 and 2 are in the top 2, threshold = the 3rd value 1: P = Φ(1 − 1) = 0.5.
        // Experts 1 and 3 are out, threshold = the 2nd value 2: P = Φ(1 − 2) = Φ(−1) = 0.15865525393145707.
        let noisy = [3.0f32, 1.0, 2.0, 0.0];
        let clean = ndarray::Array1::from_elem(4, 1.0f32);
        let top = kit::top_k(&noisy, 3);
        let p = smooth_load(clean.view(), &noisy, &[1.0; 4], &top, 2);
        let phi_m1 = 0.158_655_253_931_457_07;
        for (got, want) in p.iter().zip([0.5, phi_m1, 0.5, phi_m1]) {
            assert!((got - want).abs() < 1e-15, "{got} vs {want}");
        }
        // k = E: always chosen.
        let top = kit::top_k(&noisy, 5);
        assert_eq!(
            smooth_load(clean.view(), &noisy, &[1.0; 4], &top, 4),
            vec![1.0; 4]
        );
    }

    #[test]
    fn train_is_seeded() {
        let gate = kit::init_gate(8, 6, 1, GATE_STREAM).expect("gate");
        let noise = kit::init_gate(8, 6, 1, NOISE_WEIGHT_STREAM).expect("noise");
        let r = NoisyTopK::new(gate, noise, 2).expect("router");
        let x = moe_core::rng::SeqRng::new(9, 0).normal_matrix(32, 8, 1.0);
        let route = |seed| {
            r.route(&RouterInput::new(x.view()).with_mode(Mode::Train { seed }))
                .expect("route")
        };
        assert_eq!(route(1), route(1));
        assert_ne!(route(1), route(2));
        // Noise changes the weights, and eval equals neither.
        let eval = r.route(&RouterInput::new(x.view())).expect("route");
        assert_ne!(eval.slot_weights(), route(1).slot_weights());
    }

    #[test]
    fn errors_are_typed() {
        let eye = Array2::<f32>::eye(3);
        assert!(matches!(
            NoisyTopK::new(eye.clone(), Array2::zeros((3, 2)), 1),
            Err(MoeError::Shape { .. })
        ));
        assert!(matches!(
            NoisyTopK::new(eye.clone(), Array2::zeros((3, 3)), 4),
            Err(MoeError::TopK { k: 4, n_experts: 3 })
        ));
        let mut bad = Array2::<f32>::zeros((3, 3));
        bad[[1, 2]] = f32::NAN;
        assert!(matches!(
            NoisyTopK::new(eye.clone(), bad, 1),
            Err(MoeError::NonFinite {
                token: 1,
                column: 2,
                ..
            })
        ));
        for cfg in [
            NoisyTopKConfig {
                noise_epsilon: Some(0.0),
                ..Default::default()
            },
            NoisyTopKConfig {
                noise_epsilon: Some(f32::NAN),
                ..Default::default()
            },
            NoisyTopKConfig {
                w_load: Some(-1.0),
                ..Default::default()
            },
            NoisyTopKConfig {
                w_importance: Some(f32::INFINITY),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                cfg.build(eye.clone(), Array2::zeros((3, 3)), 1),
                Err(MoeError::InvalidConfig { .. })
            ));
        }
        let r = eye_router(3, 2);
        let x = array![[1.0f32, 0.0]];
        assert!(matches!(
            r.route(&RouterInput::new(x.view())),
            Err(MoeError::Shape { .. })
        ));
    }

    #[test]
    fn registry_options() {
        let mut reg = RouterRegistry::new();
        register(&mut reg).expect("register");
        let args = RouterArgs::new(8, 6, 2, 0).with_option("noise_epsilon", 0.05);
        assert!(
            reg.get("noisy-topk")
                .is_some_and(|e| e.is_causal(&args) == Ok(true)
                    && e.causality() == Ok(moe_core::Causality::Causal))
        );
        let r = reg.create("noisy-topk", &args).expect("create");
        assert_eq!(r.n_experts(), 6);
        let bad = RouterArgs::new(8, 6, 2, 0).with_option("noise_eps", 0.05);
        assert!(matches!(
            reg.create("noisy-topk", &bad),
            Err(MoeError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn conformance() {
        for k in [1, 2, 6] {
            let gate = kit::init_gate(12, 6, 1, GATE_STREAM).expect("gate");
            let noise = kit::init_gate(12, 6, 1, NOISE_WEIGHT_STREAM).expect("noise");
            let r = NoisyTopK::new(gate, noise, k).expect("router");
            moe_core::testing::check_router(&r, 12).expect("conformance");
        }
    }
}
