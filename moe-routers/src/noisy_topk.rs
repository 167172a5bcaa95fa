//! Noisy top-k gating (Shazeer et al. 2017, arXiv 1701.06538; docs/ROUTERS.md §2): learned Gaussian noise in training, KeepTopK, softmax
//! over the kept noisy logits, and the importance and smooth load losses.

use ndarray::{Array2, ArrayView1};
use rayon::prelude::*;

use moe_core::kit::{self, GATE_STREAM};
use moe_core::math::normal_cdf;
use moe_core::rng::CounterRng;
use moe_core::{
    Assignment, AuxLoss, AuxLossKind, KEEP_LOGITS_MAX_EXPERTS, Mode, MoeError, Param, ParamMut,
    Router, RouterArgs, RouterConfig, RouterEntry, RouterInput, RouterRegistry, Routing,
    check_finite, loss,
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
        let start = rows.start;
        let noise = match input.mode {
            Mode::Eval => None,
            Mode::Train { seed } => {
                let raw = input
                    .hidden
                    .slice(ndarray::s![rows.clone(), ..])
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
                Some((raw, CounterRng::new(seed, NOISE_STREAM)))
            }
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
