//! NLLB-MoE (`NllbMoeSparseMLP`, router `NllbMoeTop2Router`, eval, `second_expert_policy = all`).
//!
//! `p = softmax(l)`, `l = x · Wᵀ`; top-1 = argmax `p`; top-2 = argmax of `l` with top-1 masked. Capacity is
//! **global** over all `T` tokens, `C = ceil(moe_eval_capacity_token_fraction · T)` in eval. Slots:
//! `loc1 = cumsum(top-1 one-hot) − 1`, `loc2 = cumsum(top-2 one-hot) − 1 + (top-1 count of that expert)`; with
//! batch-prioritised routing the cumsums run over tokens sorted by descending `max p` (ties by position). An
//! assignment is kept when `loc < C`. Weights `p1 / (p1 + p2)`, `p2 / (p1 + p2)` over the kept ones (denominator
//! clamped at f32 epsilon), or over both before dropping with `normalize_router_prob_before_dropping`. The routed
//! output is scaled by `1 − moe_token_dropout` (eval). Experts: `fc2(relu(fc1(x)))` with biases.
//!
//! transformers 5.23's `NllbMoeExperts.forward` dispatches the wrong experts (it one-hot-encodes an already
//! one-hot mask); this preset computes the intended (v4) result.
//!
//! The router, [`NllbTop2`], is this family's own (no built-in router has global top-2 capacity); it is written
//! with the router kit of `moe-core` alone ([`moe_core::kit`]).

use ndarray::{Array1, Array2};

use moe_core::{
    Activation, Assignment, ExpertBank, Grad, KEEP_LOGITS_MAX_EXPERTS, MoeError, MoeLayer, Param,
    ParamMut, Router, RouterBackward, RouterGrads, RouterInput, Routing, kit,
};

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::Loader;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "router.classifier.weight";
/// The optional router bias `[E]`.
pub const GATE_BIAS: &str = "router.classifier.bias";
/// The per-expert projections `experts.expert_{e}.{fc1|fc2}.{weight|bias}`.
pub const EXPERT_NAMES: (&str, &str) = ("fc1", "fc2");

/// The NLLB-MoE descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["nllb_moe"],
    hf_class: "NllbMoeSparseMLP",
    layer_prefix: "model.encoder.layers.{layer}.ffn.",
    fixed_top_k: Some(2),
    config: &[
        ConfigField::new(&["num_experts"], Setting::NExperts, HfDefault::Int(128)),
        ConfigField::new(&["expert_capacity"], Setting::ExpertCapacity, HfDefault::Int(64)),
        ConfigField::new(&["router_bias"], Setting::RouterBias, HfDefault::Bool(false)),
        ConfigField::new(
            &["moe_eval_capacity_token_fraction"],
            Setting::CapacityFraction,
            HfDefault::Float(1.0),
        ),
        ConfigField::new(&["moe_token_dropout"], Setting::TokenDropout, HfDefault::Float(0.2)),
        ConfigField::new(
            &["batch_prioritized_routing"],
            Setting::BatchPrioritized,
            HfDefault::Bool(false),
        ),
        ConfigField::new(
            &["normalize_router_prob_before_dropping"],
            Setting::NormalizeBeforeDropping,
            HfDefault::Bool(false),
        ),
        ConfigField::new(
            &["second_expert_policy"],
            Setting::SecondExpertPolicy,
            HfDefault::Str("all"),
        ),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(GATE_BIAS, "[E]", "router.gate_bias", Presence::Conditional),
        TensorSpec::new("experts.expert_{e}.fc1.weight", "[f, d]", "experts.w1", Presence::Required),
        TensorSpec::new("experts.expert_{e}.fc1.bias", "[f]", "experts.b1", Presence::Required),
        TensorSpec::new("experts.expert_{e}.fc2.weight", "[d, f]", "experts.w2", Presence::Required),
        TensorSpec::new("experts.expert_{e}.fc2.bias", "[d]", "experts.b2", Presence::Required),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&[GATE, ".fc1."]],
        priority: 90,
    },
};

/// How the capacity is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Capacity {
    /// `ceil(fraction · T)`, recomputed per batch (eval).
    Fraction(f64),
    /// A fixed number of slots per expert.
    Fixed(usize),
}

/// NLLB-MoE's top-2 router with global capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct NllbTop2 {
    gate: Array2<f32>,
    bias: Option<Array1<f32>>,
    capacity: Capacity,
    batch_prioritized: bool,
    normalize_before_dropping: bool,
}

impl NllbTop2 {
    /// A router around `gate` (`[E, d]`, `E >= 2`).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a non-finite gate, a fraction outside `(0, ∞)` or a zero capacity;
    /// [`MoeError::TopK`] for fewer than 2 experts; [`MoeError::Shape`] for a bias of the wrong length.
    pub fn new(
        gate: Array2<f32>,
        bias: Option<Array1<f32>>,
        capacity: Capacity,
        batch_prioritized: bool,
        normalize_before_dropping: bool,
    ) -> Result<Self, MoeError> {
        kit::check_gate(GATE, &gate)?;
        if gate.nrows() < 2 {
            return Err(MoeError::TopK {
                k: 2,
                n_experts: gate.nrows(),
            });
        }
        match capacity {
            Capacity::Fraction(f) if !(f.is_finite() && f > 0.0) => {
                return Err(MoeError::config(
                    "moe_eval_capacity_token_fraction",
                    f,
                    "must be finite and > 0",
                ));
            }
            Capacity::Fixed(0) => {
                return Err(MoeError::config("expert_capacity", 0, "must be >= 1"));
            }
            _ => {}
        }
        if let Some(b) = &bias
            && b.len() != gate.nrows()
        {
            return Err(MoeError::shape(
                GATE_BIAS,
                format!("[{}]", gate.nrows()),
                &[b.len()],
            ));
        }
        Ok(NllbTop2 {
            gate,
            bias,
            capacity,
            batch_prioritized,
            normalize_before_dropping,
        })
    }

    /// The capacity for `t` tokens.
    pub fn capacity_for(&self, t: usize) -> usize {
        match self.capacity {
            Capacity::Fraction(f) => (f * t as f64).ceil() as usize,
            Capacity::Fixed(c) => c,
        }
    }
}

/// One of a token's two assignments, for the backward: its expert and, when kept, `dL/dw` (`None`: dropped).
type Choice = (usize, Option<f32>);

/// `(a / s, b / s)` with `s = max(a + b, f32::EPSILON)` (HF's `normalize_router_probabilities`).
fn normalize(a: f32, b: f32) -> (f32, f32) {
    let s = (a + b).max(f32::EPSILON);
    (a / s, b / s)
}

impl Router for NllbTop2 {
    fn name(&self) -> &str {
        "hf-nllb-top2"
    }

    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }

    fn is_causal(&self) -> bool {
        // Global capacity: a token's fate depends on the whole batch.
        false
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, 2)?;
        let t = input.n_tokens();
        let logits = kit::gate_logits(input.hidden, self.gate.view(), self.bias.as_ref())?;
        // Per real token: (token, top-1, top-2, p1, p2, max p).
        let mut picks = Vec::with_capacity(t);
        for (tok, lrow) in logits.outer_iter().enumerate() {
            if input.is_padding(tok) {
                continue;
            }
            let mut p = lrow.to_vec();
            kit::softmax_in_place(&mut p);
            let mut masked = lrow.to_vec();
            // Top-1 by probability, ties (softmax underflow or rounding) broken by the logit, then the lower id.
            let Some(e1) = kit::argmax_ranked(&p, &masked) else {
                continue;
            };
            if let Some(v) = masked.get_mut(e1) {
                *v = f32::NEG_INFINITY;
            }
            let Some(&e2) = kit::top_k(&masked, 1).first() else {
                continue;
            };
            let p1 = p.get(e1).copied().unwrap_or(0.0);
            let p2 = p.get(e2).copied().unwrap_or(0.0);
            picks.push((tok, e1, e2, p1, p2));
        }
        let capacity = self.capacity_for(t);
        // Slot order: token order, or descending max probability (stable, so ties keep token order).
        let mut order: Vec<usize> = (0..picks.len()).collect();
        if self.batch_prioritized {
            order.sort_by(|&a, &b| {
                let pa = picks.get(a).map_or(0.0, |p| p.3);
                let pb = picks.get(b).map_or(0.0, |p| p.3);
                pb.total_cmp(&pa)
            });
        }
        let mut top1_count = vec![0usize; e];
        for &(_, e1, ..) in &picks {
            if let Some(c) = top1_count.get_mut(e1) {
                *c += 1;
            }
        }
        let mut loc1 = vec![0usize; e];
        let mut loc2 = top1_count.clone();
        let mut keep = vec![(false, false); picks.len()];
        for &i in &order {
            let Some(&(_, e1, e2, _, _)) = picks.get(i) else {
                continue;
            };
            let (Some(l1), Some(l2), Some(k)) =
                (loc1.get_mut(e1), loc2.get_mut(e2), keep.get_mut(i))
            else {
                continue;
            };
            *k = (*l1 < capacity, *l2 < capacity);
            *l1 += 1;
            *l2 += 1;
        }
        let mut kept = Vec::with_capacity(2 * picks.len());
        let mut dropped = Vec::new();
        for (&(tok, e1, e2, p1, p2), &(k1, k2)) in picks.iter().zip(&keep) {
            let (w1, w2) = if self.normalize_before_dropping {
                normalize(p1, p2)
            } else {
                normalize(if k1 { p1 } else { 0.0 }, if k2 { p2 } else { 0.0 })
            };
            for (ex, w, k, rank) in [(e1, w1, k1, 0u16), (e2, w2, k2, 1u16)] {
                let a = Assignment {
                    token: tok as u32,
                    expert: ex as u32,
                    weight: w,
                    rank,
                };
                if k { kept.push(a) } else { dropped.push(a) }
            }
        }
        let mut routing = Routing::new(t, e, picks.len(), kept, dropped)?;
        if e <= KEEP_LOGITS_MAX_EXPERTS {
            routing.set_logits(logits);
        }
        Ok(routing)
    }

    /// The exact derivative of [`Router::route`] (recomputed from `grad.input`): a token's kept weights
    /// `w_i = a_i / max(a_1 + a_2, ε)` (`ε` = f32 epsilon, HF's clamp) with `a_i = p_{e_i}`, or `a_i = 0` (a
    /// constant) for an assignment dropped before a normalisation after dropping; so
    /// `dL/da_j = (dw_j − Σ_i dw_i · w_i) / s` (`dw_j / ε` where the clamp holds), a dropped assignment having
    /// `dw = 0` (it is not in the plan), then through `p = softmax(l)` over all `E` ([`kit::softmax_backward`])
    /// and the gate ([`kit::gate_backward`]): `dL/dx`, `gate`, and `gate_bias` when set. The choice of the two
    /// experts, the capacity and the drops get none; the router emits no auxiliary loss. The output scale
    /// `1 − moe_token_dropout` is the layer's, not the router's: it reaches `dL/dw` through the layer.
    ///
    /// # Errors
    /// [`moe_core::RouterBackward::validate`]'s errors; the input's errors as in [`Router::route`];
    /// [`MoeError::Mismatch`] for a plan of another `E`.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, routing) = (grad.input, grad.routing);
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, 2)?;
        if routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "hf-nllb-top2 backward",
                "plan experts",
                routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let t = input.n_tokens();
        let logits = kit::gate_logits(input.hidden, self.gate.view(), self.bias.as_ref())?;
        // Per token and rank (0: top-1, 1: top-2): the expert and, when kept, dL/dw.
        let mut choice: Vec<[Option<Choice>; 2]> = vec![[None, None]; t];
        let ranks = routing.slot_ranks();
        for g in routing.groups() {
            for (j, &tok) in g.tokens.iter().enumerate() {
                let s = g.slot_start + j;
                if let (Some(c), Some(&r)) = (choice.get_mut(tok as usize), ranks.get(s))
                    && let Some(slot) = c.get_mut(usize::from(r))
                {
                    *slot = Some((g.expert, grad.d_weights.get(s).copied()));
                }
            }
        }
        for a in routing.dropped() {
            if let Some(slot) = choice
                .get_mut(a.token as usize)
                .and_then(|c| c.get_mut(usize::from(a.rank)))
            {
                *slot = Some((a.expert as usize, None));
            }
        }
        let mut d_logits = Array2::<f32>::zeros((t, e));
        let (mut p, mut dp, mut dl) = (vec![0.0f32; e], vec![0.0f32; e], vec![0.0f32; e]);
        for (tok, c) in choice.iter().enumerate() {
            let [Some((e1, dw1)), Some((e2, dw2))] = *c else {
                continue;
            };
            if dw1.is_none() && dw2.is_none() {
                continue;
            }
            p.clear();
            p.extend(logits.row(tok).iter().copied());
            kit::softmax_in_place(&mut p);
            // a_i: the probability, or the constant 0 of an assignment dropped before normalising.
            let live = |dw: Option<f32>| self.normalize_before_dropping || dw.is_some();
            let a = [e1, e2].map(|ex| p.get(ex).copied().unwrap_or(0.0));
            let a = [
                if live(dw1) { a[0] } else { 0.0 },
                if live(dw2) { a[1] } else { 0.0 },
            ];
            let dw = [dw1.unwrap_or(0.0), dw2.unwrap_or(0.0)];
            let raw = a[0] + a[1];
            let s = raw.max(f32::EPSILON);
            let dot = if raw >= f32::EPSILON {
                (dw[0] * a[0] + dw[1] * a[1]) / s
            } else {
                0.0
            };
            dp.fill(0.0);
            for ((&ex, &dwi), ok) in [e1, e2].iter().zip(&dw).zip([live(dw1), live(dw2)]) {
                if ok && let Some(v) = dp.get_mut(ex) {
                    *v += (dwi - dot) / s;
                }
            }
            kit::softmax_backward(&p, &dp, &mut dl);
            d_logits
                .row_mut(tok)
                .zip_mut_with(&ndarray::ArrayView1::from(&dl[..]), |o, &v| *o += v);
        }
        let g = kit::gate_backward(input.hidden, self.gate.view(), d_logits.view())?;
        let mut params = vec![Grad::dense("gate", g.d_gate)];
        if self.bias.is_some() {
            params.push(Grad::dense("gate_bias", g.d_bias));
        }
        Ok(RouterGrads {
            d_hidden: g.d_x,
            params,
        })
    }

    fn params(&self) -> Vec<Param<'_>> {
        let mut v = vec![Param::new("gate", self.gate.view())];
        if let Some(b) = &self.bias {
            v.push(Param::new("gate_bias", b.view()));
        }
        v
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        let mut v = vec![ParamMut::new("gate", self.gate.view_mut())];
        if let Some(b) = &mut self.bias {
            v.push(ParamMut::new("gate_bias", b.view_mut()));
        }
        v
    }
}

/// Builds the block.
///
/// # Errors
/// As [`super::BuildFn`]; [`LoadError::Config`] when neither `moe_eval_capacity_token_fraction` nor
/// `expert_capacity` is set, or `moe_token_dropout` is outside `[0, 1)`.
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let mut l = Loader::new(w, cfg, PRESET.model_type());
    let gate = l.mat("router.gate", GATE, Some(cfg.n_experts), None)?;
    let d = gate.ncols();
    // `router_bias` decides whether the classifier has a bias (`nn.Linear(..., bias=config.router_bias)`).
    let bias = match cfg.router_bias {
        Some(true) => Some(l.vec("router.gate_bias", GATE_BIAS, Some(cfg.n_experts))?),
        Some(false) => None,
        None => l.optional_vec("router.gate_bias", GATE_BIAS, Some(cfg.n_experts))?,
    };
    let capacity = match (cfg.capacity_fraction, cfg.expert_capacity) {
        (Some(f), _) if f > 0.0 => Capacity::Fraction(f),
        (_, Some(c)) => Capacity::Fixed(c),
        _ => {
            return Err(l.config_err(
                "moe_eval_capacity_token_fraction | expert_capacity",
                "missing",
            ));
        }
    };
    if !(0.0..1.0).contains(&cfg.token_dropout) {
        return Err(l.config_err(
            "moe_token_dropout",
            format!("{} is outside [0, 1)", cfg.token_dropout),
        ));
    }
    let bank = l.mlp_bank(cfg.n_experts, d, EXPERT_NAMES, true, Activation::Relu)?;
    let router = NllbTop2::new(
        gate,
        bias,
        capacity,
        cfg.batch_prioritized,
        cfg.normalize_before_dropping,
    )
    .map_err(l.err())?;
    let layer = MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank))
        .and_then(|layer| layer.with_output_scale(1.0 - cfg.token_dropout))
        .map_err(l.err())?;
    Ok(l.finish(layer))
}
