//! Qwen2-MoE (`Qwen2MoeSparseMoeBlock`, and Qwen3-MoE's config): softmax over all `E`, top-k, renormalise only
//! with `norm_topk_prob`; SwiGLU experts; a SwiGLU shared expert gated by `sigmoid(x · shared_expert_gate)`
//! (absent in Qwen3-MoE). On disk: as OLMoE plus `shared_expert.gate_proj|up_proj|down_proj.weight` and
//! `shared_expert_gate.weight [1, d]`.
//!
//! The config defaults are `Qwen2MoeConfig`'s; a `qwen3_moe` `config.json` is read with `Qwen3MoeConfig`'s table
//! (128 experts, k = 8, no shared expert). The shared expert and its gate are required unless the config says
//! there is none (`shared_expert_intermediate_size = 0`, or `qwen3_moe`).

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
/// The shared expert's prefix.
pub const SHARED: &str = "shared_expert";
/// The shared expert's gate `[1, d]`.
pub const SHARED_GATE: &str = "shared_expert_gate.weight";

/// `Qwen3MoeConfig` (transformers 5.23.0): its own defaults, `num_experts` an alias of `num_local_experts`
/// (the attribute wins when both are given), and no shared expert (the block has none: fixed 0).
const QWEN3_CONFIG: &[ConfigField] = &[
    ConfigField::new(
        &["num_local_experts", "num_experts"],
        Setting::NExperts,
        HfDefault::Int(128),
    ),
    ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(8)),
    ConfigField::new(&["norm_topk_prob"], Setting::Renormalize, HfDefault::Bool(false)),
    ConfigField::new(&[], Setting::SharedExpertSize, HfDefault::Int(0)),
];

/// The Qwen2-MoE descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["qwen2_moe", "qwen3_moe"],
    hf_class: "Qwen2MoeSparseMoeBlock",
    layer_prefix: "model.layers.{layer}.mlp.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(&["num_experts"], Setting::NExperts, HfDefault::Int(60)),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(4)),
        ConfigField::new(&["norm_topk_prob"], Setting::Renormalize, HfDefault::Bool(false)),
        ConfigField::new(
            &["shared_expert_intermediate_size"],
            Setting::SharedExpertSize,
            HfDefault::Int(5632),
        ),
    ],
    config_variants: &[("qwen3_moe", QWEN3_CONFIG)],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(FUSED.0, "[E, 2f, d]", "experts.gate_up", Presence::Fused),
        TensorSpec::new(FUSED.1, "[E, d, f]", "experts.down", Presence::Fused),
        TensorSpec::new("experts.{e}.gate_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.up_proj.weight", "[f, d]", "experts.gate_up", Presence::Hub),
        TensorSpec::new("experts.{e}.down_proj.weight", "[d, f]", "experts.down", Presence::Hub),
        TensorSpec::new("shared_expert.gate_proj.weight", "[fs, d]", "shared.gate_up", Presence::Conditional),
        TensorSpec::new("shared_expert.up_proj.weight", "[fs, d]", "shared.gate_up", Presence::Conditional),
        TensorSpec::new("shared_expert.down_proj.weight", "[d, fs]", "shared.down", Presence::Conditional),
        TensorSpec::new(SHARED_GATE, "[1, d]", "shared.gate", Presence::Conditional),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&["shared_expert"]],
        priority: 50,
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
    let router = l.topk_router(TopKPreset::Qwen2Moe, gate, cfg.top_k, renormalize)?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    let has_shared = match cfg.shared_expert_size {
        // `shared_expert_intermediate_size = 0` or Qwen3-MoE: no shared expert.
        Some(0) => false,
        Some(_) => true,
        // Not stated (a hand-made config): the checkpoint decides, but the gate still belongs to the expert.
        None => l.contains(&format!("{SHARED}.gate_proj.weight")),
    };
    if !has_shared {
        return Ok(l.finish(layer));
    }
    let sbank = l.shared_swiglu(SHARED, d)?;
    let sgate = Some(l.mat("shared.gate", SHARED_GATE, Some(1), Some(d))?.row(0).to_owned());
    let layer = layer.with_shared(l.shared(sbank, sgate)?).map_err(l.err())?;
    Ok(l.finish(layer))
}
