//! OLMoE (`OlmoeSparseMoeBlock`): softmax over all `E`, top-k, no renormalisation unless `norm_topk_prob`; SwiGLU
//! experts. On disk: `gate.weight`, fused `experts.gate_up_proj` / `experts.down_proj`, or the Hub's
//! `experts.{e}.gate_proj|up_proj|down_proj.weight`.

use moe_core::MoeLayer;
use moe_routers::TopKPreset;

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::{Loader, PROJ_NAMES};
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "gate.weight";
/// Fused experts (transformers v5): `[E, 2f, d]`, `[E, d, f]`.
pub const FUSED: (&str, &str) = ("experts.gate_up_proj", "experts.down_proj");

/// The OLMoE descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["olmoe"],
    hf_class: "OlmoeSparseMoeBlock",
    layer_prefix: "model.layers.{layer}.mlp.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(
            &["num_local_experts", "num_experts"],
            Setting::NExperts,
            HfDefault::Int(64),
        ),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(8)),
        ConfigField::new(&["norm_topk_prob"], Setting::Renormalize, HfDefault::Bool(false)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(FUSED.0, "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new(FUSED.1, "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new("experts.{e}.gate_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.up_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.down_proj.weight", "[d, f]", "experts.down", Presence::Hub),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&[".gate_proj.weight"]],
        priority: 20,
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
    let bank = l.swiglu(FUSED, PROJ_NAMES, cfg.n_experts, d)?;
    let renormalize = Some(cfg.renormalize.unwrap_or(false));
    let router = l.topk_router(TopKPreset::Olmoe, gate, cfg.top_k, renormalize)?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    Ok(l.finish(layer))
}
