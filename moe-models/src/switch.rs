//! Switch Transformers (`SwitchTransformersSparseMLP`, router `SwitchTransformersTop1Router`, eval):
//! `p = softmax(x · Wᵀ)`, expert = argmax (ties to the lower id), weight = `max p` (no renormalisation). Capacity
//! is counted **per sequence**, first come first served in position order: the token that would be expert `e`'s
//! `capacity + 1`-th in its sequence is dropped and its output row is exactly 0 (transformers v5). Experts are
//! `wo · relu(wi · x)` without biases. On disk: `router.classifier.weight [E, d]`,
//! `experts.expert_{e}.wi.weight [f, d]`, `experts.expert_{e}.wo.weight [d, f]`.
//!
//! The router reports the z-loss `mean_t logsumexp(l_t)²` and HF Switch's load-balancing loss
//! `E² · mean_{s,e}(frac_tokens[s, e] · mean_prob[s, e])` (per sequence, pre-capacity choices).

use ndarray::{Array1, Array2, Array3, Axis};

use moe_core::{
    Activation, Assignment, AuxLoss, AuxLossKind, DropPolicy, ExpertBank, LbNorm, MlpBank,
    MoeError, MoeLayer, Router, RouterInput, RouterSpec, Routing, SwitchSpec, loss,
};
use moe_routers::util;

use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::presets::core_err;

/// The router gate `[E, d]`.
pub const GATE: &str = "router.classifier.weight";
/// The optional router bias `[E]` (`router_bias = true`).
pub const GATE_BIAS: &str = "router.classifier.bias";

/// Switch's top-1 router with per-sequence, position-order capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchTop1 {
    gate: Array2<f32>,
    bias: Option<Array1<f32>>,
    capacity: usize,
}

impl SwitchTop1 {
    /// A router around `gate` (`[E, d]`) with `capacity` tokens per expert per sequence.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a non-finite gate or bias, or `capacity = 0`; [`MoeError::Shape`] for a
    /// bias of the wrong length.
    pub fn new(
        gate: Array2<f32>,
        bias: Option<Array1<f32>>,
        capacity: usize,
    ) -> Result<Self, MoeError> {
        util::check_gate(GATE, &gate)?;
        if capacity == 0 {
            return Err(MoeError::config("expert_capacity", 0, "must be >= 1"));
        }
        if let Some(b) = &bias {
            if b.len() != gate.nrows() {
                return Err(MoeError::shape(
                    GATE_BIAS,
                    format!("[{}]", gate.nrows()),
                    &[b.len()],
                ));
            }
        }
        Ok(SwitchTop1 {
            gate,
            bias,
            capacity,
        })
    }
}

impl Router for SwitchTop1 {
    fn name(&self) -> &str {
        "hf-switch-top1"
    }

    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }

    fn spec(&self) -> Option<RouterSpec> {
        // Only the bias-free router is what `SwitchSpec` describes.
        self.bias.is_none().then(|| {
            RouterSpec::Switch(SwitchSpec {
                gate: self.gate.clone(),
                capacity: self.capacity,
                per_sequence: true,
                drop: DropPolicy::Position,
            })
        })
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let e = self.n_experts();
        util::check_input(input, self.d_model(), e, 1)?;
        let t = input.n_tokens();
        let logits = util::gate_logits(input.hidden, self.gate.view(), self.bias.as_ref())?;
        let mut probs = logits.clone();
        for mut row in probs.outer_iter_mut() {
            if let Some(r) = row.as_slice_mut() {
                util::softmax_in_place(r);
            }
        }
        let seqs = input.sequences();
        let mut kept = Vec::with_capacity(t);
        let mut dropped = Vec::new();
        let mut counts_per_seq = Vec::with_capacity(seqs.len());
        let mut real = 0usize;
        let mut start = 0usize;
        for &len in &seqs {
            let mut load = vec![0usize; e];
            let mut counts = vec![0usize; e];
            for tok in start..start + len {
                if input.is_padding(tok) {
                    continue;
                }
                real += 1;
                let row = probs.row(tok);
                let Some(p) = row.as_slice() else { continue };
                let Some(&ex) = util::top_k(p, 1).first() else {
                    continue;
                };
                let a = Assignment {
                    token: tok as u32,
                    expert: ex as u32,
                    weight: p.get(ex).copied().unwrap_or(0.0),
                    rank: 0,
                };
                if let Some(c) = counts.get_mut(ex) {
                    *c += 1;
                }
                let slot = load.get_mut(ex);
                match slot {
                    Some(l) if *l < self.capacity => {
                        *l += 1;
                        kept.push(a);
                    }
                    _ => dropped.push(a),
                }
            }
            counts_per_seq.push(counts);
            start += len;
        }
        let mut routing = Routing::new(t, e, real, kept, dropped)?;
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::LoadBalance(LbNorm::HfSwitch),
            value: loss::load_balance_grouped(
                probs.view(),
                &seqs,
                &counts_per_seq,
                1,
                LbNorm::HfSwitch,
            ),
            coefficient: 1e-3,
        });
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::RouterZ,
            value: loss::z_loss(logits.view()),
            coefficient: 1e-3,
        });
        routing.set_logits(logits);
        Ok(routing)
    }
}

/// Two-layer per-expert MLP weights `experts.expert_{e}.{w1}` / `{w2}` (and optional biases) as one bank.
pub(crate) fn load_mlp_bank(
    w: &Weights<'_>,
    n_experts: usize,
    d: usize,
    names: (&str, &str),
    biases: bool,
    family: Family,
) -> Result<MlpBank, LoadError> {
    let first = w.get2(
        &format!("experts.expert_0.{}.weight", names.0),
        None,
        Some(d),
    )?;
    let f = first.nrows();
    let mut w1 = Array3::<f32>::zeros((n_experts, f, d));
    let mut w2 = Array3::<f32>::zeros((n_experts, d, f));
    let mut b1 = biases.then(|| Array2::<f32>::zeros((n_experts, f)));
    let mut b2 = biases.then(|| Array2::<f32>::zeros((n_experts, d)));
    for e in 0..n_experts {
        let p = format!("experts.expert_{e}.");
        w1.index_axis_mut(Axis(0), e).assign(&w.get2(
            &format!("{p}{}.weight", names.0),
            Some(f),
            Some(d),
        )?);
        w2.index_axis_mut(Axis(0), e).assign(&w.get2(
            &format!("{p}{}.weight", names.1),
            Some(d),
            Some(f),
        )?);
        if let Some(b) = &mut b1 {
            b.row_mut(e)
                .assign(&w.get1(&format!("{p}{}.bias", names.0), Some(f))?);
        }
        if let Some(b) = &mut b2 {
            b.row_mut(e)
                .assign(&w.get1(&format!("{p}{}.bias", names.1), Some(d))?);
        }
    }
    MlpBank::new(w1, b1, w2, b2, Activation::Relu).map_err(core_err(w, family))
}

/// Builds the block.
///
/// # Errors
/// As [`crate::presets::build_layer`]; [`LoadError::Config`] when `expert_capacity` is missing.
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::SwitchTransformers;
    let gate = w.get2(GATE, Some(cfg.n_experts), None)?;
    let d = gate.ncols();
    let bias = if w.contains(GATE_BIAS) {
        Some(w.get1(GATE_BIAS, Some(cfg.n_experts))?)
    } else {
        None
    };
    let capacity = cfg
        .expert_capacity
        .ok_or_else(|| LoadError::config(w.checkpoint().origin(), "expert_capacity", "missing"))?;
    let bank = load_mlp_bank(w, cfg.n_experts, d, ("wi", "wo"), false, fam)?;
    let router = SwitchTop1::new(gate, bias, capacity).map_err(core_err(w, fam))?;
    MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank)).map_err(core_err(w, fam))
}
