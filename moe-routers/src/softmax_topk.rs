//! Softmax top-k, the token-choice family (docs/ROUTERS.md §1): score function (softmax, sigmoid, sqrt-softplus), order
//! (score then top-k, or top-k of logits then softmax), renormalisation, routed scaling factor, group-limited
//! selection with top-2-sum group scores, a selection-only correction bias and its aux-loss-free update rule.
//! Presets: `mixtral`, `qwen2_moe`, `olmoe`, `granite`, `deepseek_v3`.
//!
//! Ranking: every top-k (experts, groups) uses the exact-arithmetic order of [`kit::rank_cmp`]: the selection value
//! (score, plus the correction bias when set), then the raw logit, then the lower id, so distinct logits never tie
//! through f32 saturation. Memory: routing holds one `[T, E]` buffer, the logits (the balance loss softmaxes them
//! in place), plus per-thread `[E]` scratch rows and `O(T·k)` choices; when the plan keeps the logits
//! (`E <= KEEP_LOGITS_MAX_EXPERTS`) one more `[T_real, E]` buffer holds the probabilities of the balance loss.

use ndarray::{Array1, Array2, ArrayView1};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::{
    Assignment, AuxLoss, AuxLossKind, Grad, GroupLimit, KEEP_LOGITS_MAX_EXPERTS, LbNorm, MoeError,
    Param, ParamMut, Router, RouterArgs, RouterBackward, RouterConfig, RouterEntry, RouterGrads,
    RouterInput, RouterRegistry, RouterSpec, Routing, ScoreFn, TopKOrder, TopKSpec, loss,
};

/// The denominator guard of renormalisation, `w_i = r_i / (Σ_j r_j + RENORM_EPS)` (DeepSeek-V3's `1e-20`; below
/// f32 resolution next to any sum of probabilities, so Mixtral's plain `r_i / Σ_j r_j` is reproduced too). The
/// backward uses the same value.
pub const RENORM_EPS: f32 = 1e-20;

/// Named settings of real models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopKPreset {
    /// Mixtral: softmax over all E, top-k, renormalise.
    Mixtral,
    /// Qwen2-MoE (`norm_topk_prob = false`): softmax, top-k, no renormalisation.
    Qwen2Moe,
    /// OLMoE: softmax, top-k, no renormalisation.
    Olmoe,
    /// Granite (and JetMoE, GPT-OSS): top-k of raw logits, softmax over the k.
    Granite,
    /// DeepSeek-V3 (`noaux_tc`): sigmoid, correction bias, groups 8/4 (top-2 sum), renormalise, scale 2.5.
    DeepseekV3,
}

moe_core::router_options! {
    /// Options of [`SoftmaxTopK`]; every field is optional, and unset fields take the preset's value, then the
    /// default (Mixtral's behaviour).
    pub struct SoftmaxTopKConfig {
        /// A model's settings, overridden by the options below.
        preset: TopKPreset,
        /// Experts per token.
        #[default_doc = "layer k"]
        k: usize,
        /// Score function: softmax over all experts, or sigmoid / sqrt_softplus per expert.
        score: ScoreFn = ScoreFn::Softmax,
        /// Score all experts then take the top k, or take the top k of the logits then softmax over the k.
        order: TopKOrder = TopKOrder::ScoreThenTopK,
        /// Renormalise the k weights to sum 1 (score_then_top_k). With top_k_then_softmax the softmax over the k
        /// already sums to 1: `true` is accepted, `false` refused (a preset's `false` is overridden by the order).
        renormalize: bool = true,
        /// Routed scaling factor, applied after renormalisation.
        scaling: f32 = 1.0,
        /// Number of contiguous expert groups for group-limited selection (set with topk_group).
        n_group: usize,
        /// Groups kept per token (group score = sum of its top-2 selection scores; set with n_group).
        topk_group: usize,
        /// Keep a selection-only per-expert bias, starting at 0 (aux-loss-free balancing).
        ///
        /// The bias is updated by [`SoftmaxTopK::update_bias`].
        correction_bias: bool = false,
        /// Normalisation of the reported load-balancing loss.
        lb_norm: LbNorm = LbNorm::HfTopK,
        /// Coefficient reported with the load-balancing loss (what `Routing::aux_coefficients` trains with). The
        /// presets take transformers' `router_aux_loss_coef` defaults: mixtral, qwen2_moe, granite 0.001, olmoe
        /// 0.01, deepseek_v3 0 (its block has no aux loss: the correction bias balances it).
        aux_coefficient: f32 = 1e-2,
    }
}

impl RouterConfig for SoftmaxTopKConfig {
    /// Always causal: every token is scored and selected from its own logits alone.
    fn is_causal(&self) -> bool {
        true
    }
}

/// Token-choice top-k router. Its whole behaviour is a [`TopKSpec`], which backends can run natively.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftmaxTopK {
    spec: TopKSpec,
    lb_norm: LbNorm,
    aux_coefficient: f32,
}

impl TopKPreset {
    /// The preset's settings as a config (unset fields stay `None`).
    pub fn config(self) -> SoftmaxTopKConfig {
        let base = SoftmaxTopKConfig {
            preset: Some(self),
            ..Default::default()
        };
        match self {
            TopKPreset::Mixtral => SoftmaxTopKConfig {
                score: Some(ScoreFn::Softmax),
                order: Some(TopKOrder::ScoreThenTopK),
                renormalize: Some(true),
                aux_coefficient: Some(1e-3),
                ..base
            },
            TopKPreset::Qwen2Moe | TopKPreset::Olmoe => SoftmaxTopKConfig {
                score: Some(ScoreFn::Softmax),
                order: Some(TopKOrder::ScoreThenTopK),
                renormalize: Some(false),
                aux_coefficient: Some(if self == TopKPreset::Olmoe {
                    1e-2
                } else {
                    1e-3
                }),
                ..base
            },
            TopKPreset::Granite => SoftmaxTopKConfig {
                score: Some(ScoreFn::Softmax),
                order: Some(TopKOrder::TopKThenSoftmax),
                renormalize: Some(true),
                aux_coefficient: Some(1e-3),
                ..base
            },
            TopKPreset::DeepseekV3 => SoftmaxTopKConfig {
                score: Some(ScoreFn::Sigmoid),
                order: Some(TopKOrder::ScoreThenTopK),
                renormalize: Some(true),
                scaling: Some(2.5),
                n_group: Some(8),
                topk_group: Some(4),
                correction_bias: Some(true),
                aux_coefficient: Some(0.0),
                ..base
            },
        }
    }
}

impl SoftmaxTopKConfig {
    /// Resolves the preset and defaults, and builds the router around `gate` (`[E, d]`).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] / [`MoeError::TopK`] for inconsistent options (see [`SoftmaxTopK::new`]).
    pub fn build(&self, gate: Array2<f32>, default_k: usize) -> Result<SoftmaxTopK, MoeError> {
        let preset = self.preset.map(TopKPreset::config).unwrap_or_default();
        let c = self.clone().with_unset_from(&preset);
        let e = gate.nrows();
        let groups = match (c.n_group, c.topk_group) {
            (None, None) => None,
            (Some(n_group), Some(topk_group)) => Some(GroupLimit {
                n_group,
                topk_group,
            }),
            (a, b) => {
                return Err(MoeError::config(
                    "n_group/topk_group",
                    format!("{a:?}/{b:?}"),
                    "set both or neither",
                ));
            }
        };
        let top_k_then_softmax = c.order() == TopKOrder::TopKThenSoftmax;
        if top_k_then_softmax && self.renormalize == Some(false) {
            return Err(MoeError::config(
                "renormalize",
                false,
                "has no effect with order = top_k_then_softmax (the softmax over the k weights already sums to 1); \
                 leave it unset or use order = score_then_top_k",
            ));
        }
        let spec = TopKSpec {
            gate,
            gate_bias: None,
            k: c.k.unwrap_or(default_k),
            score: c.score(),
            order: c.order(),
            // A preset's `renormalize = false` is overridden by an explicit top_k_then_softmax order.
            renormalize: c.renormalize() || top_k_then_softmax,
            scaling: c.scaling(),
            groups,
            correction_bias: c.correction_bias().then(|| Array1::zeros(e)),
        };
        let mut r = SoftmaxTopK::new(spec)?;
        r.lb_norm = c.lb_norm();
        r.aux_coefficient = c.aux_coefficient();
        Ok(r)
    }
}

impl SoftmaxTopK {
    /// A router from a full spec.
    ///
    /// # Errors
    /// [`MoeError::TopK`] for `k = 0` or `k > E`; [`MoeError::InvalidConfig`] for a non-finite gate, scaling or
    /// bias, `top_k_then_softmax` with a non-softmax score or without renormalisation (it would be ignored), groups that do not divide `E`, `topk_group` outside
    /// `1..=n_group`, or fewer than `k` experts in the kept groups; [`MoeError::Shape`] for bias lengths.
    pub fn new(spec: TopKSpec) -> Result<Self, MoeError> {
        kit::check_gate("gate.weight", &spec.gate)?;
        let e = spec.gate.nrows();
        if spec.k == 0 || spec.k > e {
            return Err(MoeError::TopK {
                k: spec.k,
                n_experts: e,
            });
        }
        if !spec.scaling.is_finite() || spec.scaling <= 0.0 {
            return Err(MoeError::config(
                "scaling",
                spec.scaling,
                "must be finite and > 0",
            ));
        }
        if spec.order == TopKOrder::TopKThenSoftmax && spec.score != ScoreFn::Softmax {
            return Err(MoeError::config(
                "order",
                "top_k_then_softmax",
                "needs score = softmax",
            ));
        }
        if spec.order == TopKOrder::TopKThenSoftmax && !spec.renormalize {
            return Err(MoeError::config(
                "renormalize",
                false,
                "has no effect with order = top_k_then_softmax (the softmax over the k weights already sums to 1)",
            ));
        }
        for (name, b) in [
            ("gate.bias", &spec.gate_bias),
            ("e_score_correction_bias", &spec.correction_bias),
        ] {
            if let Some(b) = b {
                if b.len() != e {
                    return Err(MoeError::shape(name, format!("[{e}]"), &[b.len()]));
                }
                if let Some((i, v)) = b.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(MoeError::config(
                        name,
                        v,
                        format!("non-finite at expert {i}"),
                    ));
                }
            }
        }
        if let Some(g) = spec.groups {
            if g.n_group == 0 || !e.is_multiple_of(g.n_group) {
                return Err(MoeError::config(
                    "n_group",
                    g.n_group,
                    format!("must divide E = {e}"),
                ));
            }
            if g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(MoeError::config(
                    "topk_group",
                    g.topk_group,
                    format!("must be in 1..={}", g.n_group),
                ));
            }
            if g.topk_group * (e / g.n_group) < spec.k {
                return Err(MoeError::config(
                    "topk_group",
                    g.topk_group,
                    format!(
                        "the kept groups hold {} experts, fewer than k = {}",
                        g.topk_group * (e / g.n_group),
                        spec.k
                    ),
                ));
            }
        }
        Ok(SoftmaxTopK {
            spec,
            lb_norm: LbNorm::HfTopK,
            aux_coefficient: 1e-2,
        })
    }

    /// The spec this router executes.
    pub fn topk_spec(&self) -> &TopKSpec {
        &self.spec
    }

    /// Experts per token.
    pub fn k(&self) -> usize {
        self.spec.k
    }

    /// Sets the gate bias `[E]` added to the logits (GPT-OSS `router.bias`).
    ///
    /// # Errors
    /// As [`SoftmaxTopK::new`].
    pub fn with_gate_bias(mut self, bias: Array1<f32>) -> Result<Self, MoeError> {
        self.spec.gate_bias = Some(bias);
        self.revalidated()
    }

    /// Sets the coefficient reported with the load-balancing loss (JetMoE's `aux_loss_coef` is 0.01 where the
    /// Granite preset it routes with has 0.001).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a negative or non-finite coefficient.
    pub fn with_aux_coefficient(mut self, coefficient: f32) -> Result<Self, MoeError> {
        if !(coefficient.is_finite() && coefficient >= 0.0) {
            return Err(MoeError::config(
                "aux_coefficient",
                coefficient,
                "must be finite and >= 0",
            ));
        }
        self.aux_coefficient = coefficient;
        Ok(self)
    }

    /// Sets the selection-only correction bias `[E]` (DeepSeek-V3 `e_score_correction_bias`).
    ///
    /// # Errors
    /// As [`SoftmaxTopK::new`].
    pub fn with_correction_bias(mut self, bias: Array1<f32>) -> Result<Self, MoeError> {
        self.spec.correction_bias = Some(bias);
        self.revalidated()
    }

    /// Checks the spec again after a change, keeping the loss settings.
    fn revalidated(self) -> Result<Self, MoeError> {
        let (lb_norm, aux_coefficient) = (self.lb_norm, self.aux_coefficient);
        SoftmaxTopK::new(self.spec).map(|r| SoftmaxTopK {
            lb_norm,
            aux_coefficient,
            ..r
        })
    }

    /// Aux-loss-free balancing step (DeepSeek-V3, Megatron `moe_router_enable_expert_bias`):
    /// `b_e += rate · sign(mean_load − load_e)`, with loads counted in integers from `routing`. Creates a zero bias
    /// first if the router has none.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] if `routing` has another expert count; [`MoeError::InvalidConfig`] for a non-finite
    /// rate.
    pub fn update_bias(&mut self, routing: &Routing, rate: f32) -> Result<(), MoeError> {
        let e = self.spec.gate.nrows();
        if routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "bias update",
                "routing experts",
                routing.n_experts(),
                "router experts",
                e,
            ));
        }
        if !rate.is_finite() {
            return Err(MoeError::config("rate", rate, "must be finite"));
        }
        let counts = routing.expert_counts();
        let total: usize = counts.iter().sum();
        let bias = self
            .spec
            .correction_bias
            .get_or_insert_with(|| Array1::zeros(e));
        for (b, &c) in bias.iter_mut().zip(&counts) {
            // mean - load compared in integers: (total - E·c) has the sign of (total/E - c).
            let diff = total as i128 - (e as i128) * (c as i128);
            *b += rate * diff.signum() as f32;
        }
        Ok(())
    }

    /// The experts and weights of one token, from its logits row (`[E]`), in selection order. `sel` and
    /// `scores` are per-thread scratch rows (`[E]` each, reused across tokens). Ranking is the exact-arithmetic
    /// order of [`kit::rank_cmp`]: the selection value (the score, or the logit for `top_k_then_softmax`, plus the
    /// correction bias when set), then the raw logit, then the lower id.
    fn route_token(
        &self,
        logits: ArrayView1<'_, f32>,
        (sel, scores): &mut (Vec<f32>, Vec<f32>),
    ) -> (Vec<usize>, Vec<f32>) {
        let s = &self.spec;
        let key: Vec<f32>;
        let key: &[f32] = match logits.as_slice() {
            Some(row) => row,
            None => {
                key = logits.to_vec();
                &key
            }
        };
        scores.clear();
        scores.extend_from_slice(key);
        if s.order == TopKOrder::ScoreThenTopK {
            match s.score {
                ScoreFn::Softmax => kit::softmax_in_place(scores),
                ScoreFn::Sigmoid => scores.iter_mut().for_each(|v| *v = kit::sigmoid(*v)),
                ScoreFn::SqrtSoftplus => {
                    scores.iter_mut().for_each(|v| *v = kit::sqrt_softplus(*v))
                }
            }
        }
        sel.clear();
        sel.extend_from_slice(scores);
        if let Some(b) = &s.correction_bias {
            for (v, bb) in sel.iter_mut().zip(b) {
                *v += bb;
            }
        }
        let idx = select(sel, key, s.groups, s.k);
        let mut w: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        match s.order {
            TopKOrder::TopKThenSoftmax => {
                kit::softmax_in_place(&mut w);
                for v in &mut w {
                    *v *= s.scaling;
                }
            }
            TopKOrder::ScoreThenTopK => {
                if s.renormalize {
                    let sum: f32 = w.iter().sum::<f32>() + RENORM_EPS;
                    for v in &mut w {
                        *v /= sum;
                    }
                }
                if s.scaling != 1.0 {
                    for v in &mut w {
                        *v *= s.scaling;
                    }
                }
            }
        }
        (idx, w)
    }
}

/// Top-k of `sel` (`[E]`, the selection values) with `key` (`[E]`, the raw logits) as the exact-arithmetic
/// tie-break ([`kit::rank_cmp`]), after group-limited masking: each group's score is the sum of its top-2
/// selection values (top-1 for groups of one), its key the sum of those experts' logits; only the `topk_group`
/// best groups by (score, key, lower group) stay eligible; masked experts get `-inf`.
fn select(sel: &mut [f32], key: &[f32], groups: Option<GroupLimit>, k: usize) -> Vec<usize> {
    if let Some(g) = groups {
        let size = sel.len() / g.n_group;
        let (group_scores, group_keys): (Vec<f32>, Vec<f32>) = sel
            .chunks(size)
            .zip(key.chunks(size))
            .map(|(c, l)| {
                let top = kit::top_k_ranked(c, l, 2);
                (
                    top.iter().map(|&i| c[i]).sum::<f32>(),
                    top.iter().map(|&i| l[i]).sum::<f32>(),
                )
            })
            .unzip();
        let keep = kit::top_k_ranked(&group_scores, &group_keys, g.topk_group);
        let mut kept = vec![false; g.n_group];
        for i in keep {
            kept[i] = true;
        }
        for (gi, c) in sel.chunks_mut(size).enumerate() {
            if !kept[gi] {
                c.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
            }
        }
    }
    kit::top_k_ranked(sel, key, k)
}

impl Router for SoftmaxTopK {
    fn name(&self) -> &str {
        "softmax-topk"
    }

    fn n_experts(&self) -> usize {
        self.spec.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.spec.gate.ncols())
    }

    fn spec(&self) -> Option<RouterSpec> {
        Some(RouterSpec::TopK(self.spec.clone()))
    }

    /// [`SoftmaxTopKConfig::is_causal`]: always `true`.
    fn is_causal(&self) -> bool {
        SoftmaxTopKConfig::default().is_causal()
    }

    /// `gate`: `W_g`, `[E, d]`; `gate_bias`: `[E]`, added to the logits (GPT-OSS), when set; `correction_bias`:
    /// `[E]`, the selection-only bias (DeepSeek-V3 `e_score_correction_bias`), when set, listed
    /// [`frozen`](Param::frozen): it is updated by [`SoftmaxTopK::update_bias`], not by gradient.
    fn params(&self) -> Vec<Param<'_>> {
        let s = &self.spec;
        let mut v = vec![Param::new("gate", s.gate.view())];
        v.extend(
            s.gate_bias
                .iter()
                .map(|b| Param::new("gate_bias", b.view())),
        );
        v.extend(
            s.correction_bias
                .iter()
                .map(|b| Param::new("correction_bias", b.view()).frozen()),
        );
        v
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        let s = &mut self.spec;
        let mut v = vec![ParamMut::new("gate", s.gate.view_mut())];
        v.extend(
            s.gate_bias
                .iter_mut()
                .map(|b| ParamMut::new("gate_bias", b.view_mut())),
        );
        v.extend(
            s.correction_bias
                .iter_mut()
                .map(|b| ParamMut::new("correction_bias", b.view_mut()).frozen()),
        );
        v
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, self.spec.k)?;
        let t = input.n_tokens();
        let mut logits = kit::gate_logits(
            input.hidden,
            self.spec.gate.view(),
            self.spec.gate_bias.as_ref(),
        )?;
        // Tokens are independent: parallel over rows, each row computed the same way on any thread count.
        let per_token: Vec<Option<(Vec<usize>, Vec<f32>)>> = (0..t)
            .into_par_iter()
            .map_init(<(Vec<f32>, Vec<f32>)>::default, |scratch, i| {
                (!input.is_padding(i)).then(|| self.route_token(logits.row(i), scratch))
            })
            .collect();
        let mut kept = Vec::with_capacity(t * self.spec.k);
        let mut counts = vec![0usize; e];
        let mut real = Vec::with_capacity(t);
        for (i, choice) in per_token.iter().enumerate() {
            let Some((idx, w)) = choice else { continue };
            real.push(i);
            for (rank, (&ex, &wt)) in idx.iter().zip(w).enumerate() {
                counts[ex] += 1;
                kept.push(Assignment {
                    token: i as u32,
                    expert: ex as u32,
                    weight: wt,
                    rank: rank as u16,
                });
            }
        }
        let mut routing = Routing::new(t, e, real.len(), kept, Vec::new())?;
        let keep_logits = e <= KEEP_LOGITS_MAX_EXPERTS;
        let lb = self.balance_loss(&mut logits, &real, &counts, keep_logits);
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::LoadBalance(self.lb_norm),
            value: lb,
            coefficient: self.aux_coefficient,
        });
        if keep_logits {
            routing.set_logits(logits);
        }
        Ok(routing)
    }

    /// The exact derivative of [`Router::route`] (the module's forward, recomputed from `grad.input`):
    /// - kept weights: `score_then_top_k` takes `dw` through the scaling and renormalisation
    ///   ([`kit::renormalize_backward`] with [`RENORM_EPS`], as the forward divides) to the `k` chosen scores, then
    ///   through the score function over the whole row ([`kit::score_backward`]: softmax over all `E`, or sigmoid /
    ///   sqrt-softplus per expert); `top_k_then_softmax` through the scaling and the softmax over the `k` chosen
    ///   logits;
    /// - the load-balancing loss (its normalisation, real tokens only, counts constant) through `softmax(l)` of
    ///   every real token ([`kit::load_balance_backward`]);
    /// - the gate ([`kit::gate_backward`]): `dL/dx`, `gate` and, when set, `gate_bias` (GPT-OSS).
    ///
    /// Selection (top-k, groups, the correction bias) gets no gradient, and the correction bias, frozen, has none.
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; the input's errors as in [`Router::route`];
    /// [`MoeError::Mismatch`] for a plan of another `E`.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, routing) = (grad.input, grad.routing);
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, self.spec.k)?;
        if routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "softmax-topk backward",
                "plan experts",
                routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let logits = kit::gate_logits(
            input.hidden,
            self.spec.gate.view(),
            self.spec.gate_bias.as_ref(),
        )?;
        let mut d_logits = Array2::<f32>::zeros(logits.dim());
        self.weights_backward(&logits, routing, grad.d_weights, &mut d_logits);
        let d_lb = grad.d_aux_of(AuxLossKind::LoadBalance(self.lb_norm));
        if d_lb != 0.0 {
            let real: Vec<usize> = (0..input.n_tokens())
                .filter(|&t| !input.is_padding(t))
                .collect();
            let counts = routing.expert_counts();
            balance_backward(
                &logits,
                &real,
                &counts,
                self.spec.k,
                self.lb_norm,
                d_lb,
                &mut d_logits,
            );
        }
        let g = kit::gate_backward(input.hidden, self.spec.gate.view(), d_logits.view())?;
        let mut params = vec![Grad::dense("gate", g.d_gate)];
        if self.spec.gate_bias.is_some() {
            params.push(Grad::dense("gate_bias", g.d_bias));
        }
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params,
        })
    }

    /// The aux-loss-free step of the correction bias, [`SoftmaxTopK::update_bias`] with `rate = bias_rate`, when
    /// the router has a correction bias (returns `Ok(true)`); a router without one is left unchanged (no bias is
    /// created) and returns `Ok(false)`.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for a plan of another `T` or `E`; [`MoeError::InvalidConfig`] for a non-finite rate.
    fn update_state(
        &mut self,
        input: &RouterInput<'_>,
        routing: &Routing,
        bias_rate: f32,
    ) -> Result<bool, MoeError> {
        if self.spec.correction_bias.is_none() {
            return Ok(false);
        }
        if routing.n_tokens() != input.n_tokens() {
            return Err(MoeError::mismatch(
                "bias update",
                "plan tokens",
                routing.n_tokens(),
                "input tokens",
                input.n_tokens(),
            ));
        }
        self.update_bias(routing, bias_rate)?;
        Ok(true)
    }
}

/// The expert of every slot of `routing` (slot order).
fn slot_experts(routing: &Routing) -> Vec<usize> {
    let mut out = vec![0usize; routing.n_slots()];
    for g in routing.groups() {
        out[g.slot_start..g.slot_start + g.tokens.len()].fill(g.expert);
    }
    out
}

/// Adds the gradient of the load-balancing loss (`d_value` times it) with respect to the logits of the `real` rows
/// to `d_logits`: `dP` from [`kit::load_balance_backward`] (counts constant), through `softmax` of each row.
fn balance_backward(
    logits: &Array2<f32>,
    real: &[usize],
    counts: &[usize],
    k: usize,
    norm: LbNorm,
    d_value: f32,
    d_logits: &mut Array2<f32>,
) {
    let e = logits.ncols();
    let d_probs = kit::load_balance_backward(real.len(), counts, e, k, norm, d_value);
    let (mut p, mut dl) = (vec![0.0f32; e], vec![0.0f32; e]);
    for (r, &t) in real.iter().enumerate() {
        p.clear();
        p.extend(logits.row(t).iter().copied());
        kit::softmax_in_place(&mut p);
        let dp = d_probs.row(r);
        match dp.as_slice() {
            Some(dp) => kit::softmax_backward(&p, dp, &mut dl),
            None => kit::softmax_backward(&p, &dp.to_vec(), &mut dl),
        }
        d_logits
            .row_mut(t)
            .zip_mut_with(&ArrayView1::from(&dl[..]), |o, &g| *o += g);
    }
}

impl SoftmaxTopK {
    /// Adds `dL/d logits` of the kept weights to `d_logits` (`[T, E]`), token by token, from the recomputed
    /// `logits` and the plan's chosen experts (see [`Router::backward`]).
    fn weights_backward(
        &self,
        logits: &Array2<f32>,
        routing: &Routing,
        d_weights: &[f32],
        d_logits: &mut Array2<f32>,
    ) {
        let s = &self.spec;
        let e = logits.ncols();
        let experts = slot_experts(routing);
        let (offsets, slots) = routing.token_slots();
        let (mut scores, mut d_scores, mut d_row) =
            (vec![0.0f32; e], vec![0.0f32; e], vec![0.0f32; e]);
        let (mut raw, mut dw, mut d_raw) = (Vec::new(), Vec::new(), Vec::new());
        let (mut chosen, mut lrow) = (Vec::new(), vec![0.0f32; e]);
        for (t, w) in offsets.windows(2).enumerate() {
            let token_slots = slots.get(w[0]..w[1]).unwrap_or(&[]);
            if token_slots.is_empty() {
                continue;
            }
            let l = logits.row(t);
            chosen.clear();
            chosen.extend(token_slots.iter().map(|&i| experts[i]));
            dw.clear();
            dw.extend(token_slots.iter().map(|&i| d_weights[i]));
            d_raw.clear();
            d_raw.resize(chosen.len(), 0.0);
            let mut out = d_logits.row_mut(t);
            match s.order {
                TopKOrder::TopKThenSoftmax => {
                    // w = scaling · softmax(l[chosen]).
                    raw.clear();
                    raw.extend(chosen.iter().map(|&j| l[j]));
                    kit::softmax_in_place(&mut raw);
                    dw.iter_mut().for_each(|g| *g *= s.scaling);
                    kit::softmax_backward(&raw, &dw, &mut d_raw);
                    for (&j, &g) in chosen.iter().zip(&d_raw) {
                        out[j] += g;
                    }
                }
                TopKOrder::ScoreThenTopK => {
                    lrow.clear();
                    lrow.extend(l.iter().copied());
                    scores.clone_from(&lrow);
                    match s.score {
                        ScoreFn::Softmax => kit::softmax_in_place(&mut scores),
                        ScoreFn::Sigmoid => scores.iter_mut().for_each(|v| *v = kit::sigmoid(*v)),
                        ScoreFn::SqrtSoftplus => {
                            scores.iter_mut().for_each(|v| *v = kit::sqrt_softplus(*v))
                        }
                    }
                    raw.clear();
                    raw.extend(chosen.iter().map(|&j| scores[j]));
                    kit::renormalize_backward(
                        &raw,
                        &dw,
                        s.renormalize,
                        RENORM_EPS,
                        s.scaling,
                        &mut d_raw,
                    );
                    d_scores.fill(0.0);
                    for (&j, &g) in chosen.iter().zip(&d_raw) {
                        d_scores[j] += g;
                    }
                    kit::score_backward(s.score, &lrow, &scores, &d_scores, &mut d_row);
                    out.zip_mut_with(&ArrayView1::from(&d_row[..]), |o, &g| *o += g);
                }
            }
        }
    }
}

impl SoftmaxTopK {
    /// The load-balancing loss over the real tokens, with probabilities `softmax(logits)` as every reference uses.
    /// When the logits are not kept (`keep = false`) the probabilities are computed in place in `logits` (real rows
    /// moved to the front first), so routing holds one `[T, E]` buffer; when they are kept, one copy of the real
    /// rows holds the probabilities (two `[T, E]` buffers, `E <= KEEP_LOGITS_MAX_EXPERTS`).
    fn balance_loss(
        &self,
        logits: &mut Array2<f32>,
        real: &[usize],
        counts: &[usize],
        keep: bool,
    ) -> f32 {
        if keep {
            let mut probs = logits.select(ndarray::Axis(0), real);
            softmax_rows(&mut probs);
            return loss::load_balance(probs.view(), counts, self.spec.k, self.lb_norm);
        }
        for (r, &i) in real.iter().enumerate() {
            if r != i {
                let (mut dst, src) =
                    logits.multi_slice_mut((ndarray::s![r, ..], ndarray::s![i, ..]));
                dst.assign(&src);
            }
        }
        let mut probs = logits.slice_mut(ndarray::s![..real.len(), ..]);
        softmax_rows(&mut probs);
        loss::load_balance(probs.view(), counts, self.spec.k, self.lb_norm)
    }
}

/// Row-wise softmax in place (`[T, E]`).
fn softmax_rows<S: ndarray::DataMut<Elem = f32>>(m: &mut ndarray::ArrayBase<S, ndarray::Ix2>) {
    for mut row in m.outer_iter_mut() {
        match row.as_slice_mut() {
            Some(r) => kit::softmax_in_place(r),
            None => {
                let mut v = row.to_vec();
                kit::softmax_in_place(&mut v);
                row.assign(&ArrayView1::from(&v[..]));
            }
        }
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: SoftmaxTopKConfig = args.parse("softmax-topk")?;
    let gate = kit::init_gate(args.d_model, args.n_experts, args.seed, GATE_STREAM)?;
    Ok(Box::new(cfg.build(gate, args.top_k)?))
}

/// Registers `softmax-topk`.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<SoftmaxTopKConfig>(
        "softmax-topk",
        "token-choice top-k (Mixtral, Qwen, OLMoE, Granite, DeepSeek-V3 presets)",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn router(gate: Array2<f32>, cfg: SoftmaxTopKConfig, k: usize) -> SoftmaxTopK {
        cfg.build(gate, k).expect("valid config")
    }

    /// With an identity gate the logits are the inputs themselves.
    fn eye(e: usize) -> Array2<f32> {
        Array2::eye(e)
    }

    #[test]
    fn mixtral_hand_computed() {
        // logits [1, 2, 0]: softmax = [0.24473, 0.66524, 0.09003]; top-2 = experts 1, 0;
        // renormalised: 0.66524 / 0.90997 = 0.73106, 0.24473 / 0.90997 = 0.26894 (= sigmoid(1), sigmoid(-1)).
        let r = router(eye(3), TopKPreset::Mixtral.config(), 2);
        let x = array![[1.0f32, 2.0, 0.0]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        let t = plan.per_token();
        assert_eq!(t[0].len(), 2);
        assert_eq!(t[0][0].0, 1);
        assert!((t[0][0].1 - 0.731_058_6).abs() < 1e-6);
        assert_eq!(t[0][1].0, 0);
        assert!((t[0][1].1 - 0.268_941_4).abs() < 1e-6);
    }

    #[test]
    fn qwen_keeps_unnormalised_weights() {
        // Same logits, no renormalisation: weights are the softmax values 0.66524, 0.24473.
        let r = router(eye(3), TopKPreset::Qwen2Moe.config(), 2);
        let x = array![[1.0f32, 2.0, 0.0]];
        let t = r
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        assert!((t[0][0].1 - 0.665_240_9).abs() < 1e-6);
        assert!((t[0][1].1 - 0.244_728_5).abs() < 1e-6);
    }

    #[test]
    fn granite_equals_mixtral_weights() {
        // Top-k of logits then softmax over the k equals softmax-then-renormalise in exact arithmetic.
        let x = array![[0.3f32, -1.0, 2.0, 0.7], [1.5, 1.4, -0.2, 0.0]];
        let a = router(eye(4), TopKPreset::Granite.config(), 2)
            .route(&RouterInput::new(x.view()))
            .expect("route");
        let b = router(eye(4), TopKPreset::Mixtral.config(), 2)
            .route(&RouterInput::new(x.view()))
            .expect("route");
        for (ta, tb) in a.per_token().iter().zip(b.per_token()) {
            for (pa, pb) in ta.iter().zip(&tb) {
                assert_eq!(pa.0, pb.0);
                assert!((pa.1 - pb.1).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn deepseek_group_path_and_bias_changes_selection() {
        // E = 4 experts in 2 groups of 2, keep 1 group, k = 2, scaling 2.5.
        // logits [2, -2, 0.5, 0.4]: s = sigmoid = [0.8808, 0.1192, 0.6225, 0.5987].
        // No bias: group scores [0.8808+0.1192 = 1.0, 0.6225+0.5987 = 1.2212] -> group 1 -> experts 2, 3;
        // weights 0.6225/1.2212 * 2.5 = 1.2744, 0.5987/1.2212 * 2.5 = 1.2256.
        let cfg = SoftmaxTopKConfig {
            n_group: Some(2),
            topk_group: Some(1),
            ..TopKPreset::DeepseekV3.config()
        };
        let r = router(eye(4), cfg, 2);
        let x = array![[2.0f32, -2.0, 0.5, 0.4]];
        let t = r
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        let got: Vec<usize> = t[0].iter().map(|a| a.0).collect();
        assert_eq!(got, vec![2, 3]);
        let s2 = kit::sigmoid(0.5);
        let s3 = kit::sigmoid(0.4);
        assert!((t[0][0].1 - s2 / (s2 + s3) * 2.5).abs() < 1e-5);
        // Bias +0.3 on expert 1: group 0 score becomes 0.8808 + 0.4192 = 1.3 > 1.2212 -> experts 0, 1 chosen,
        // but weights use the unbiased sigmoid: 0.8808 / 1.0 * 2.5 = 2.2020, 0.1192 * 2.5 = 0.2980.
        let r = r
            .with_correction_bias(array![0.0f32, 0.3, 0.0, 0.0])
            .expect("bias");
        let t = r
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token();
        let got: Vec<usize> = t[0].iter().map(|a| a.0).collect();
        assert_eq!(got, vec![0, 1]);
        assert!(
            (t[0][0].1 - kit::sigmoid(2.0) / (kit::sigmoid(2.0) + kit::sigmoid(-2.0)) * 2.5).abs()
                < 1e-5
        );
        assert!((t[0][0].1 + t[0][1].1 - 2.5).abs() < 1e-5);
    }

    #[test]
    fn bias_update_moves_toward_balance() {
        let mut r = router(
            eye(2),
            SoftmaxTopKConfig {
                correction_bias: Some(true),
                ..Default::default()
            },
            1,
        );
        // Three tokens all prefer expert 0: load [3, 0], mean 1.5 -> b0 -= rate, b1 += rate.
        let x = array![[1.0f32, 0.0], [2.0, 0.0], [1.0, -1.0]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        r.update_bias(&plan, 1e-3).expect("update");
        let b = r.topk_spec().correction_bias.clone().expect("bias");
        assert_eq!(b.to_vec(), vec![-1e-3, 1e-3]);
    }

    #[test]
    fn errors_are_typed() {
        assert!(matches!(
            SoftmaxTopKConfig::default().build(eye(3), 4),
            Err(MoeError::TopK { k: 4, n_experts: 3 })
        ));
        let bad = SoftmaxTopKConfig {
            n_group: Some(2),
            topk_group: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            bad.build(eye(3), 1),
            Err(MoeError::InvalidConfig { .. })
        ));
        let r = router(eye(3), SoftmaxTopKConfig::default(), 2);
        let x = array![[1.0f32, f32::INFINITY, 0.0]];
        assert!(matches!(
            r.route(&RouterInput::new(x.view())),
            Err(MoeError::NonFinite {
                token: 0,
                column: 1,
                ..
            })
        ));
        let x = array![[1.0f32, 0.0]];
        assert!(matches!(
            r.route(&RouterInput::new(x.view())),
            Err(MoeError::Shape { .. })
        ));
    }

    #[test]
    fn conformance() {
        for preset in [
            TopKPreset::Mixtral,
            TopKPreset::Qwen2Moe,
            TopKPreset::Olmoe,
            TopKPreset::Granite,
            TopKPreset::DeepseekV3,
        ] {
            let gate = kit::init_gate(12, 16, 1, GATE_STREAM).expect("gate");
            let r = router(gate, preset.config(), 4);
            moe_core::testing::check_router(&r, 12).expect("conformance");
        }
    }

    #[test]
    fn padding_tokens_are_not_routed() {
        let r = router(eye(3), SoftmaxTopKConfig::default(), 2);
        let x = array![[1.0f32, 2.0, 0.0], [0.0, 0.0, 1.0]];
        let pad = [false, true];
        let plan = r
            .route(&RouterInput::new(x.view()).with_padding(&pad))
            .expect("route");
        assert_eq!(plan.n_slots(), 2);
        assert_eq!(plan.n_real_tokens(), 1);
        assert!(plan.per_token()[1].is_empty());
    }

    /// The rows of case `fidelity/sigmoid-saturation` (DeepSeek-V3, identity gate, k 1): f32 sigmoid is exactly
    /// 1.0 for both large logits of each row; the larger logit has the larger exact score, so experts 1, 3, 0.
    fn saturated_rows() -> Array2<f32> {
        array![
            [18.0f32, 20.0, 0.0, 0.0],
            [17.0, 0.0, 0.0, 25.0],
            [25.0, 0.0, 0.0, 17.0]
        ]
    }

    fn top1(r: &SoftmaxTopK, x: &Array2<f32>) -> Vec<usize> {
        r.route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token()
            .iter()
            .map(|t| t[0].0)
            .collect()
    }

    #[test]
    fn sigmoid_saturation_ranks_by_the_logit() {
        let x = saturated_rows();
        assert_eq!(kit::sigmoid(18.0), 1.0);
        let ds = SoftmaxTopKConfig {
            n_group: Some(1),
            topk_group: Some(1),
            ..TopKPreset::DeepseekV3.config()
        };
        assert_eq!(top1(&router(eye(4), ds.clone(), 1), &x), vec![1, 3, 0]);
        // With groups of 2 (the group scores tie at 2.0 as well, the group key decides) and equal biases.
        let grouped = SoftmaxTopKConfig {
            n_group: Some(2),
            topk_group: Some(1),
            ..ds.clone()
        };
        let r = router(eye(4), grouped, 1)
            .with_correction_bias(array![0.1f32, 0.1, 0.1, 0.1])
            .expect("bias");
        assert_eq!(top1(&r, &x), vec![1, 3, 0]);
        // sigmoid and sqrt-softplus underflow: every score of these rows is exactly 0, the logit decides.
        let low = array![
            [-300.0f32, -200.0, -400.0, -500.0],
            [-500.0, -400.0, -300.0, -200.0]
        ];
        assert_eq!(
            (kit::sigmoid(-200.0), kit::sqrt_softplus(-200.0)),
            (0.0, 0.0)
        );
        for score in [ScoreFn::Sigmoid, ScoreFn::SqrtSoftplus] {
            let cfg = SoftmaxTopKConfig {
                score: Some(score),
                ..Default::default()
            };
            assert_eq!(top1(&router(eye(4), cfg, 1), &low), vec![1, 3], "{score:?}");
        }
        let under = array![[0.0f32, -200.0, -150.0, -300.0]];
        let r = router(eye(4), TopKPreset::Qwen2Moe.config(), 3);
        let t = r
            .route(&RouterInput::new(under.view()))
            .expect("route")
            .per_token();
        let got: Vec<usize> = t[0].iter().map(|a| a.0).collect();
        assert_eq!(got, vec![0, 2, 1]);
    }
}
