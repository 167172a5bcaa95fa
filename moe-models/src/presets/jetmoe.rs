//! JetMoE (`JetMoeMoE`): top-k of the raw logits, softmax over the k; SwiGLU experts (first half gate); an output
//! bias `[d]` added to every token. On disk: `router.layer.weight`, `input_linear.weight [E, 2f, d]`,
//! `output_linear.weight [E, d, f]`, `bias [d]` (v5 fused names are also accepted).

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
/// Fused gate-up names (v5, Hub), `[E, 2f, d]` (first half gate).
pub const GATE_UP: &[&str] = &["experts.gate_up_proj", "input_linear.weight"];
/// Down names matching [`GATE_UP`], `[E, d, f]`.
pub const DOWN: &[&str] = &["experts.down_proj", "output_linear.weight"];
/// The output bias `[d]`.
pub const BIAS: &str = "bias";

/// The JetMoE descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["jetmoe"],
    hf_class: "JetMoeMoE",
    layer_prefix: "model.layers.{layer}.mlp.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(&["num_local_experts"], Setting::NExperts, HfDefault::Int(8)),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(2)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new("router.layer.weight", "[E, d]", "router.gate", Presence::Hub),
        TensorSpec::new("router.weight", "[E, d]", "router.gate", Presence::Fused),
        TensorSpec::new("input_linear.weight", "[E, 2f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("output_linear.weight", "[E, d, f]", "experts.down", Presence::Hub),
        TensorSpec::new("experts.gate_up_proj", "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new("experts.down_proj", "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new(BIAS, "[d]", "output_bias", Presence::Required),
    ],
    build,
    inspect: InspectView {
        router: GATE,
        markers: &[&["input_linear.weight", "=bias"]],
        priority: 40,
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
    // JetMoeConfig's `aux_loss_coef` default is 0.01 (Granite's `router_aux_loss_coef` is 0.001).
    let router = l
        .topk_router(TopKPreset::Granite, gate, cfg.top_k, None)?
        .with_aux_coefficient(1e-2)
        .map_err(l.err())?;
    let mut layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    // `JetMoeMoE.bias` is a parameter of every block.
    let bias = l.vec("output_bias", BIAS, Some(d))?;
    layer = layer.with_output_bias(bias).map_err(l.err())?;
    Ok(l.finish(layer))
}
