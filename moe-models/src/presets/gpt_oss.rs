//! GPT-OSS (`GptOssMLP`): logits `x · Wᵀ + b`, top-k of the logits, softmax over the k; experts in the transposed
//! layout (`x · W`) with interleaved gate/up, clamped SwiGLU and biases. On disk: `router.weight [E, d]`,
//! `router.bias [E]`, `experts.gate_up_proj [E, d, 2f]`, `experts.gate_up_proj_bias [E, 2f]`,
//! `experts.down_proj [E, f, d]`, `experts.down_proj_bias [E, d]` (f32/bf16), or, in MXFP4 checkpoints,
//! `experts.gate_up_proj_blocks` U8 `[E, 2f, d/32, 16]` + `_scales` `[E, 2f, d/32]` and `experts.down_proj_blocks`
//! `[E, d, f/32, 16]` + `_scales` `[E, d, f/32]`, kept packed (see [`crate::quant`]).

use moe_core::{ExpertBank, GptOssBank, MoeLayer, PackedFamily};
use moe_routers::TopKPreset;

use super::descriptor::{
    ConfigField, HfDefault, InspectView, Preset, Presence, Setting, TensorSpec,
};
use super::packed::GptOssNames;
use super::parts::Loader;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The router gate `[E, d]`.
pub const GATE: &str = "router.weight";
/// The router bias `[E]`.
pub const GATE_BIAS: &str = "router.bias";
/// Gate and up, interleaved columns, `[E, d, 2f]`.
pub const GATE_UP: &str = "experts.gate_up_proj";
/// Their bias `[E, 2f]`.
pub const GATE_UP_BIAS: &str = "experts.gate_up_proj_bias";
/// Down `[E, f, d]`.
pub const DOWN: &str = "experts.down_proj";
/// Its bias `[E, d]`.
pub const DOWN_BIAS: &str = "experts.down_proj_bias";

/// The GPT-OSS descriptor.
pub const PRESET: Preset = Preset {
    model_types: &["gpt_oss"],
    hf_class: "GptOssMLP",
    layer_prefix: "model.layers.{layer}.mlp.",
    fixed_top_k: None,
    config: &[
        ConfigField::new(
            &["num_experts", "num_local_experts"],
            Setting::NExperts,
            HfDefault::Int(128),
        ),
        ConfigField::new(&["num_experts_per_tok"], Setting::TopK, HfDefault::Int(4)),
        ConfigField::new(&["swiglu_limit"], Setting::SwigluLimit, HfDefault::Float(7.0)),
        ConfigField::new(&["swiglu_alpha"], Setting::SwigluAlpha, HfDefault::Float(1.702)),
    ],
    config_variants: &[],
    tensors: &[
        TensorSpec::new(GATE, "[E, d]", "router.gate", Presence::Required),
        TensorSpec::new(GATE_BIAS, "[E]", "router.gate_bias", Presence::Required),
        TensorSpec::new(GATE_UP, "[E, d, 2f]", "experts.gate_up", Presence::Required),
        TensorSpec::new(GATE_UP_BIAS, "[E, 2f]", "experts.gate_up_bias", Presence::Required),
        TensorSpec::new(DOWN, "[E, f, d]", "experts.down", Presence::Required),
        TensorSpec::new(DOWN_BIAS, "[E, d]", "experts.down_bias", Presence::Required),
    ],
    build,
    inspect: InspectView {
        router: &[GATE],
        markers: &[&["gate_up_proj_bias"]],
        priority: 70,
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
    let bias = l.vec("router.gate_bias", GATE_BIAS, Some(e))?;
    let names = GptOssNames {
        gate_up: GATE_UP,
        gate_up_bias: GATE_UP_BIAS,
        down: DOWN,
        down_bias: DOWN_BIAS,
    };
    let family = PackedFamily::GptOss {
        alpha: cfg.swiglu_alpha,
        limit: cfg.swiglu_limit,
    };
    let bank = match l.packed_gpt_oss(names, e, d, family)? {
        Some(bank) => bank,
        None => {
            l.require_unquantized(GATE_UP)?;
            f32_bank(&mut l, cfg, e, d)?
        }
    };
    let router = l
        .topk_router(TopKPreset::Granite, gate, cfg.top_k, None)?
        .with_gate_bias(bias)
        .map_err(l.err())?;
    let layer = MoeLayer::new(Box::new(router), bank).map_err(l.err())?;
    Ok(l.finish(layer))
}

/// The f32 bank from `gate_up_proj` / `down_proj` (F32, BF16 or F16, widened).
fn f32_bank(l: &mut Loader<'_, '_>, cfg: &MoeConfig, e: usize, d: usize) -> Result<ExpertBank, LoadError> {
    let gate_up = l.tensor3("experts.gate_up", GATE_UP, [Some(e), Some(d), None])?;
    let f2 = gate_up.dim().2;
    let gate_up_bias = l.mat("experts.gate_up_bias", GATE_UP_BIAS, Some(e), Some(f2))?;
    let down = l.tensor3("experts.down", DOWN, [Some(e), Some(f2 / 2), Some(d)])?;
    let down_bias = l.mat("experts.down_bias", DOWN_BIAS, Some(e), Some(d))?;
    let bank = GptOssBank::new(
        gate_up,
        gate_up_bias,
        down,
        down_bias,
        cfg.swiglu_alpha,
        cfg.swiglu_limit,
    )
    .map_err(l.err())?;
    Ok(ExpertBank::GptOss(bank))
}
