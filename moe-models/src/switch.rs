//! Switch Transformers (`SwitchTransformersSparseMLP`, router `SwitchTransformersTop1Router`, eval):
//! `p = softmax(x · Wᵀ (+ b))`, expert = argmax (ties to the lower id), weight = `max p` (no renormalisation).
//! Capacity is counted **per sequence**, first come first served in position order: the token that would be expert
//! `e`'s `capacity + 1`-th in its sequence is dropped and its output row is exactly 0 (transformers v5). Experts are
//! `wo · relu(wi · x)` without biases. On disk: `router.classifier.weight [E, d]`, optionally
//! `router.classifier.bias [E]` (`router_bias = true`), `experts.expert_{e}.wi.weight [f, d]`,
//! `experts.expert_{e}.wo.weight [d, f]`.
//!
//! The router is the shared [`moe_routers::SwitchTop1`] built from
//! [`SwitchTop1Config::hf_switch`]`(expert_capacity)` (fixed capacity per sequence, position drops, coefficients
//! 1e-3), with jitter 0: HF applies `router_jitter_noise` in training only, and this preset is for inference, so
//! the router never jitters (whatever the mode) and, without a bias, keeps its [`moe_core::SwitchSpec`]. The bias,
//! when present, is added with [`moe_routers::SwitchTop1::with_gate_bias`]. The router reports the z-loss
//! `mean_t logsumexp(l_t)²` and HF Switch's load-balancing loss
//! `E² · mean_{s,e}(frac_tokens[s, e] · mean_prob[s, e])` (per sequence, pre-capacity choices).

use ndarray::{Array2, Array3, Axis};

use moe_core::{Activation, ExpertBank, MlpBank, MoeLayer};
use moe_routers::SwitchTop1Config;

use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::presets::core_err;

/// The router gate `[E, d]`.
pub const GATE: &str = "router.classifier.weight";
/// The optional router bias `[E]` (`router_bias = true`).
pub const GATE_BIAS: &str = "router.classifier.bias";

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
    let hf = SwitchTop1Config {
        jitter: Some(0.0),
        ..SwitchTop1Config::hf_switch(capacity)
    };
    let mut router = hf.build(gate).map_err(core_err(w, fam))?;
    if let Some(b) = bias {
        router = router.with_gate_bias(b).map_err(core_err(w, fam))?;
    }
    MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank)).map_err(core_err(w, fam))
}
