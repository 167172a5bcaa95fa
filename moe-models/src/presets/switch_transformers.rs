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

use moe_core::{Activation, ExpertBank, MoeLayer};
use moe_routers::SwitchTop1Config;

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::Loader;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "router.classifier.weight";
/// The optional router bias `[E]` (`router_bias = true`).
pub const GATE_BIAS: &str = "router.classifier.bias";
/// The per-expert projections `experts.expert_{e}.{wi|wo}.weight`.
pub const EXPERT_NAMES: (&str, &str) = ("wi", "wo");

/// The Switch Transformers descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["switch_transformers"],
    hf_class: "SwitchTransformersSparseMLP",
    layer_prefix: "encoder.block.{layer}.layer.1.mlp.",
    fixed_top_k: Some(1),
    config: &[
        ConfigField::new(&["num_experts"], Setting::NExperts, HfDefault::Int(8)),
        ConfigField::new(&["expert_capacity"], Setting::ExpertCapacity, HfDefault::Int(64)),
        ConfigField::new(&["router_bias"], Setting::RouterBias, HfDefault::Bool(false)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(GATE_BIAS, "[E]", "router.gate_bias", Presence::Conditional),
        TensorSpec::new("experts.expert_{e}.wi.weight", "[f, d]", "experts.w1", Presence::Required),
        TensorSpec::new("experts.expert_{e}.wo.weight", "[d, f]", "experts.w2", Presence::Required),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&[GATE]],
        priority: 80,
    },
};

/// Builds the block.
///
/// # Errors
/// As [`super::BuildFn`]; [`LoadError::Config`] when `expert_capacity` is missing.
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
    let capacity = cfg
        .expert_capacity
        .ok_or_else(|| l.config_err("expert_capacity", "missing"))?;
    let bank = l.mlp_bank(cfg.n_experts, d, EXPERT_NAMES, false, Activation::Relu)?;
    let hf = SwitchTop1Config {
        jitter: Some(0.0),
        ..SwitchTop1Config::hf_switch(capacity)
    };
    let mut router = hf.build(gate).map_err(l.err())?;
    if let Some(b) = bias {
        router = router.with_gate_bias(b).map_err(l.err())?;
    }
    let layer = MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank)).map_err(l.err())?;
    Ok(l.finish(layer))
}
