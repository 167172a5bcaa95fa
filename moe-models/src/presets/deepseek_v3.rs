//! DeepSeek-V3 (`DeepseekV3MoE`): `s = sigmoid(logits)`; selection on `s + e_score_correction_bias` limited to the
//! `topk_group` best of `n_group` groups (group score = sum of its top-2); weights are the unbiased `s` of the
//! chosen experts, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`; plus ungated shared experts.
//! On disk: `gate.weight`, `gate.e_score_correction_bias [E]`, experts as OLMoE, `shared_experts.*`; in FP8
//! checkpoints every expert linear (routed and shared) is F8_E4M3 with its `weight_scale_inv`, kept packed (see
//! [`crate::quant`]); the gate and the correction bias are not FP8.

use moe_core::MoeLayer;
use moe_routers::{SoftmaxTopKConfig, TopKPreset};

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::parts::{Loader, PROJ_NAMES};
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "gate.weight";
/// The correction bias `[E]` (selection only).
pub const BIAS: &str = "gate.e_score_correction_bias";
/// Fused experts (transformers v5): `[E, 2f, d]`, `[E, d, f]`.
pub const FUSED: (&str, &str) = ("experts.gate_up_proj", "experts.down_proj");
/// The shared experts' prefix.
pub const SHARED: &str = "shared_experts";

/// The DeepSeek-V3 descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["deepseek_v3"],
    hf_class: "DeepseekV3MoE",
    layer_prefix: "model.layers.{layer}.mlp.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(
            &["num_local_experts", "n_routed_experts"],
            Setting::NExperts,
            HfDefault::Int(256),
        ),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(8)),
        ConfigField::new(&["norm_topk_prob"], Setting::Renormalize, HfDefault::Bool(true)),
        ConfigField::new(&["n_group"], Setting::NGroup, HfDefault::Int(8)),
        ConfigField::new(&["topk_group"], Setting::TopkGroup, HfDefault::Int(4)),
        ConfigField::new(
            &["routed_scaling_factor"],
            Setting::RoutedScaling,
            HfDefault::Float(2.5),
        ),
        ConfigField::new(&["n_shared_experts"], Setting::NSharedExperts, HfDefault::Int(1)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(BIAS, "[E]", "router.correction_bias", Presence::Required),
        TensorSpec::new(FUSED.0, "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new(FUSED.1, "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new("experts.{e}.gate_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.up_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.down_proj.weight", "[d, f]", "experts.down", Presence::Hub),
        TensorSpec::new("shared_experts.gate_proj.weight", "[fs, d]", "shared.gate_up", Presence::Conditional),
        TensorSpec::new("shared_experts.up_proj.weight", "[fs, d]", "shared.gate_up", Presence::Conditional),
        TensorSpec::new("shared_experts.down_proj.weight", "[d, fs]", "shared.down", Presence::Conditional),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&["e_score_correction_bias"], &["shared_experts."]],
        priority: 60,
    },
};

/// Builds the block.
///
/// # Errors
/// As [`super::BuildFn`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let mut l = Loader::new(w, cfg, PRESET.model_type());
    let e = cfg.n_experts;
    let gate = l.gate(&[GATE], e)?;
    let d = gate.ncols();
    let bank = l.swiglu(FUSED, PROJ_NAMES, e, d)?;
    let n_group = cfg.n_group.unwrap_or(1);
    let topk_group = cfg.topk_group.unwrap_or(n_group);
    let mut router = SoftmaxTopKConfig {
        preset: Some(TopKPreset::DeepseekV3),
        k: Some(cfg.top_k),
        renormalize: Some(cfg.renormalize.unwrap_or(true)),
        scaling: Some(cfg.routed_scaling_factor.unwrap_or(1.0)),
        n_group: Some(n_group),
        topk_group: Some(topk_group),
        ..Default::default()
    }
    .build(gate, cfg.top_k)
    .map_err(l.err())?;
    // A buffer of `DeepseekV3TopkRouter`, always in the state dict.
    let bias = l.vec("router.correction_bias", BIAS, Some(e))?;
    router = router.with_correction_bias(bias).map_err(l.err())?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    let has_shared = match cfg.n_shared_experts {
        Some(n) => n > 0,
        None => l.contains(&format!("{SHARED}.gate_proj.weight")),
    };
    if !has_shared {
        return Ok(l.finish(layer));
    }
    let sbank = l.shared_swiglu(SHARED, d)?;
    let layer = layer.with_shared(l.shared(sbank, None)?).map_err(l.err())?;
    Ok(l.finish(layer))
}
