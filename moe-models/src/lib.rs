//! # moe-models
//!
//! Presets that build a [`moe_core::MoeLayer`] from a Hugging Face checkpoint: `config.json` (HF field names only
//! at this edge) plus safetensors, memory-mapped, single-file or sharded (`model.safetensors.index.json`), with
//! `F32`, `BF16` or `F16` weights converted once to `f32`. Tensor names are taken as transformers v5 fuses them
//! (`experts.gate_up_proj`) or as on the Hub (`experts.{e}.w1.weight`, `experts.{e}.gate_proj.weight`), fused at
//! load. One layer of a many-layer checkpoint is picked by its prefix (`model.layers.3.block_sparse_moe.`).
//!
//! Families: Mixtral, Qwen2-MoE (and Qwen3-MoE's config), OLMoE, DeepSeek-V3, GraniteMoE, JetMoE, GPT-OSS (all
//! through `moe_routers::SoftmaxTopK`), Switch Transformers and NLLB-MoE (capacity routers of this crate).
//! [`verify`] checks presets against the golden fixtures that transformers produced.
//!
//! ```no_run
//! use moe_models::{Checkpoint, MoeConfig, build_layer};
//!
//! let cfg = MoeConfig::from_file("mixtral/config.json")?;
//! let ckpt = Checkpoint::open("mixtral")?;
//! let layer = build_layer(&cfg, &ckpt.weights(&cfg.layer_prefix(3)))?;
//! assert_eq!(layer.n_experts(), cfg.n_experts);
//! # Ok::<(), moe_models::LoadError>(())
//! ```
//!
//! No feature flags.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod hidden;
pub mod inspect;
pub mod nllb;
pub mod presets;
pub mod switch;
pub mod verify;

use std::path::Path;

pub use checkpoint::{Checkpoint, Tensor, Weights};
pub use config::{HfConfig, MoeConfig};
pub use error::LoadError;
pub use presets::build_layer;

/// Loads MoE layer `layer` of the checkpoint in `dir` (`config.json` plus `model.safetensors` or
/// `model.safetensors.index.json`), under the family's usual block prefix.
///
/// # Errors
/// Any [`LoadError`] of the config, the checkpoint or the tensors.
pub fn load_layer(dir: impl AsRef<Path>, layer: usize) -> Result<moe_core::MoeLayer, LoadError> {
    let dir = dir.as_ref();
    let cfg = MoeConfig::from_file(dir.join("config.json"))?;
    load_layer_with_prefix(dir, &cfg, &cfg.layer_prefix(layer))
}

/// Loads the MoE block under `prefix` (`model.layers.3.block_sparse_moe.`; `""` for a block's own state dict) of
/// the checkpoint at `path` (file, index or directory), with `cfg`.
///
/// # Errors
/// Any [`LoadError`] of the checkpoint or the tensors.
pub fn load_layer_with_prefix(
    path: impl AsRef<Path>,
    cfg: &MoeConfig,
    prefix: &str,
) -> Result<moe_core::MoeLayer, LoadError> {
    let ckpt = Checkpoint::open(path)?;
    build_layer(cfg, &ckpt.weights(prefix))
}

/// A Hugging Face MoE family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Family {
    /// `MixtralSparseMoeBlock`.
    Mixtral,
    /// `Qwen2MoeSparseMoeBlock` (and Qwen3-MoE's config).
    Qwen2Moe,
    /// `OlmoeSparseMoeBlock`.
    Olmoe,
    /// `DeepseekV3MoE`.
    DeepseekV3,
    /// `SwitchTransformersSparseMLP`.
    SwitchTransformers,
    /// `NllbMoeSparseMLP`.
    NllbMoe,
    /// `GraniteMoeMoE`.
    GraniteMoe,
    /// `JetMoeMoE`.
    JetMoe,
    /// `GptOssMLP`.
    GptOss,
}

impl Family {
    /// Every family, in the fixtures' order.
    pub const ALL: [Family; 9] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Olmoe,
        Family::DeepseekV3,
        Family::SwitchTransformers,
        Family::NllbMoe,
        Family::GraniteMoe,
        Family::JetMoe,
        Family::GptOss,
    ];

    /// The family of an HF `config.json` `model_type`, if it is one of ours.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" | "qwen3_moe" => Family::Qwen2Moe,
            "olmoe" => Family::Olmoe,
            "deepseek_v3" => Family::DeepseekV3,
            "switch_transformers" => Family::SwitchTransformers,
            "nllb_moe" => Family::NllbMoe,
            "granitemoe" => Family::GraniteMoe,
            "jetmoe" => Family::JetMoe,
            "gpt_oss" => Family::GptOss,
            _ => return None,
        })
    }

    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV3 => "deepseek_v3",
            Family::SwitchTransformers => "switch_transformers",
            Family::NllbMoe => "nllb_moe",
            Family::GraniteMoe => "granitemoe",
            Family::JetMoe => "jetmoe",
            Family::GptOss => "gpt_oss",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
        }
        assert_eq!(Family::from_model_type("qwen3_moe"), Some(Family::Qwen2Moe));
        assert_eq!(Family::from_model_type("llama"), None);
    }
}
