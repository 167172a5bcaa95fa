//! Mixtral (`MixtralSparseMoeBlock`): softmax over all `E` logits, top-k, renormalise to sum 1; SwiGLU experts.
//! On disk: `gate.weight [E, d]`, fused `experts.gate_up_proj [E, 2f, d]` / `experts.down_proj [E, d, f]`, or the
//! Hub's `experts.{e}.w1|w3|w2.weight` (gate, up, down).

use moe_core::MoeLayer;
use moe_routers::TopKPreset;

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::{Loader, PerExpertNames};
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "gate.weight";
/// Fused experts (transformers v5): gate and up rows `[E, 2f, d]`, down `[E, d, f]`.
pub const FUSED: (&str, &str) = ("experts.gate_up_proj", "experts.down_proj");
/// The Hub's per-expert names: `experts.{e}.w1|w3|w2.weight`.
pub(crate) const HUB: PerExpertNames = PerExpertNames {
    gate: "w1",
    up: "w3",
    down: "w2",
};

/// The Mixtral descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["mixtral"],
    hf_class: "MixtralSparseMoeBlock",
    layer_prefix: "model.layers.{layer}.block_sparse_moe.",
    fixed_top_k: None,
    config: &[
        // `MixtralConfig` (transformers 5.23.0). It has no `norm_topk_prob`: the block always renormalises, and
        // a `norm_topk_prob` key in `config.json` is ignored, as transformers ignores it.
        ConfigField::new(
            &["num_experts", "num_local_experts"],
            Setting::NExperts,
            HfDefault::Int(8),
        ),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(2)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(FUSED.0, "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new(FUSED.1, "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new("experts.{e}.w1.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.w3.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.w2.weight", "[d, f]", "experts.down", Presence::Hub),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&[GATE]],
        priority: 10,
    },
};

/// Builds the block.
///
/// # Errors
/// As [`super::BuildFn`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let mut l = Loader::new(w, cfg, PRESET.model_type());
    let gate = l.gate(&[GATE], cfg.n_experts)?;
    let d = gate.ncols();
    let bank = l.swiglu(FUSED, HUB, cfg.n_experts, d)?;
    // `MoeConfig::renormalize` is never set from a config for Mixtral; a library caller may still set it.
    let router = l.topk_router(TopKPreset::Mixtral, gate, cfg.top_k, cfg.renormalize)?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    Ok(l.finish(layer))
}
