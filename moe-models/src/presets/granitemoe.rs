//! GraniteMoE (`GraniteMoeMoE`): top-k of the raw logits, softmax over the k; SwiGLU experts. On disk (v5):
//! `router.weight`, `experts.gate_up_proj`, `experts.down_proj`; on the Hub: `router.layer.weight`,
//! `input_linear.weight [E, 2f, d]`, `output_linear.weight [E, d, f]`.

use moe_core::MoeLayer;
use moe_routers::TopKPreset;

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::Loader;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Router gate names (v5, Hub).
pub const GATE: &[&str] = &["router.weight", "router.layer.weight"];
/// Fused gate-up names (v5, Hub), `[E, 2f, d]`.
pub const GATE_UP: &[&str] = &["experts.gate_up_proj", "input_linear.weight"];
/// Down names matching [`GATE_UP`], `[E, d, f]`.
pub const DOWN: &[&str] = &["experts.down_proj", "output_linear.weight"];

/// The GraniteMoE descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["granitemoe"],
    hf_class: "GraniteMoeMoE",
    layer_prefix: "model.layers.{layer}.block_sparse_moe.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(&["num_local_experts"], Setting::NExperts, HfDefault::Int(8)),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(2)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new("router.weight", "[E, d]", "router.gate", Presence::Fused),
        TensorSpec::new("router.layer.weight", "[E, d]", "router.gate", Presence::Hub),
        TensorSpec::new("experts.gate_up_proj", "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new("experts.down_proj", "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new("input_linear.weight", "[E, 2f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("output_linear.weight", "[E, d, f]", "experts.down", Presence::Hub),
    ],
    build,
    inspect: InspectView {
        router: GATE,
        markers: &[&["router.weight"], &["router.layer.weight"]],
        priority: 30,
    },
};

/// Builds the block.
///
/// # Errors
/// As [`super::BuildFn`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let mut l = Loader::new(w, cfg, PRESET.model_type());
    let gate = l.gate(GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = l.fused_swiglu(GATE_UP, DOWN, cfg.n_experts, d)?;
    let router = l.topk_router(TopKPreset::Granite, gate, cfg.top_k, None)?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    Ok(l.finish(layer))
}
