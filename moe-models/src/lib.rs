//! # moe-models
//!
//! Presets that build a [`moe_core::MoeLayer`] from a Hugging Face checkpoint: `config.json` (HF field names only
//! at this edge) plus safetensors, memory-mapped, single-file or sharded (`model.safetensors.index.json`), with
//! `F32`, `BF16` or `F16` weights converted once to `f32`, or kept packed: [`quant`] reads GPT-OSS MXFP4 and
//! DeepSeek-V3 FP8 checkpoints (`quantization_config`) and keeps 16-bit experts 16-bit when the config asks for
//! [`ExpertWeights::Checkpoint`] ([`load_layer_with`], [`MoeConfig::with_expert_weights`]). Tensor names are taken as transformers v5 fuses them
//! (`experts.gate_up_proj`) or as on the Hub (`experts.{e}.w1.weight`, `experts.{e}.gate_proj.weight`), fused at
//! load. One layer of a many-layer checkpoint is picked by its prefix (`model.layers.3.block_sparse_moe.`).
//!
//! Families: Mixtral, Qwen2-MoE (and Qwen3-MoE's config), OLMoE, DeepSeek-V3, GraniteMoE, JetMoE, GPT-OSS (all
//! through `moe_routers::SoftmaxTopK`), Switch Transformers (`moe_routers::SwitchTop1`) and NLLB-MoE (a router of
//! its own, written with `moe_core::kit`). Each family is one file under [`presets`] exporting a [`Preset`]
//! descriptor; the table in [`presets`] lists them. [`fixture`] reads the golden-fixture format that transformers'
//! blocks produced; the `moe-verify` crate runs those fixtures on any backend (this crate depends on no backend).
//!
//! Every layer a preset builds names its parameters' checkpoint tensors ([`moe_core::Param::hf_name`]): the full
//! name when one tensor holds the parameter in the layer's layout; `{e}` for one tensor per expert, stacked on a
//! leading axis `E` (`model.layers.1.block_sparse_moe.experts.{e}.w2.weight`); ` + ` between names for tensors
//! joined along each expert's rows, in order (`experts.{e}.w1.weight + experts.{e}.w3.weight`, gate rows then up
//! rows); one-expert shared banks and Qwen2-MoE's `shared_expert_gate.weight` `[1, d]` (the layer's `[d]`) differ
//! from the checkpoint only by leading axes of size 1. [`hf_names::split_by_hf_name`] inverts that assembly (a
//! gradient back into the checkpoint's tensors).
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
//! [`store`] (unix) is the disk tier of `moe_core`'s expert store: [`store::DiskSource`] reads one expert at a
//! time from a safetensors file with positioned reads (the header only at open), and
//! [`store::write_expert_checkpoint`] streams a seeded random layer of any size to disk for tests and benches.
//!
//! No feature flags.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod files;
pub mod fixture;
pub mod hf_names;
pub mod hidden;
pub mod inspect;
pub mod presets;
pub mod quant;
#[cfg(unix)]
pub mod store;
#[cfg(unix)]
mod store_write;

use std::path::Path;

pub use checkpoint::{Checkpoint, Tensor, Weights};
pub use config::{HfConfig, MoeConfig};
pub use error::LoadError;
pub use presets::{Family, Preset, build_layer};
pub use quant::{ExpertWeights, QuantizationConfig};

/// Loads MoE layer `layer` of the checkpoint in `dir` (`config.json` plus `model.safetensors` or
/// `model.safetensors.index.json`), under the family's usual block prefix, with f32 experts: 16-bit, FP8 and MXFP4
/// expert weights are decoded to f32 ([`ExpertWeights::F32`]; [`load_layer_with`] keeps them packed).
///
/// # Errors
/// Any [`LoadError`] of the config, the checkpoint or the tensors.
pub fn load_layer(dir: impl AsRef<Path>, layer: usize) -> Result<moe_core::MoeLayer, LoadError> {
    let dir = dir.as_ref();
    let cfg = MoeConfig::from_file(dir.join("config.json"))?;
    load_layer_with_prefix(dir, &cfg, &cfg.layer_prefix(layer))
}

/// Loads MoE layer `layer` as [`load_layer`] does, keeping the expert weights as `experts` says:
/// [`ExpertWeights::Checkpoint`] keeps MXFP4, FP8, BF16 and F16 experts packed (`moe_core::ExpertBank::Packed`),
/// [`ExpertWeights::F32`] widens them (what [`load_layer`] does).
///
/// # Errors
/// As [`load_layer`]; [`LoadError::BadTensor`] naming a malformed packed tensor (a NaN code, a non-finite
/// scale), [`LoadError::Shape`] / [`LoadError::Dtype`] / [`LoadError::MissingTensor`] naming a scale or block
/// tensor of the wrong shape or dtype or a missing one.
pub fn load_layer_with(
    dir: impl AsRef<Path>,
    layer: usize,
    experts: ExpertWeights,
) -> Result<moe_core::MoeLayer, LoadError> {
    let dir = dir.as_ref();
    let cfg = MoeConfig::from_file(dir.join("config.json"))?.with_expert_weights(experts);
    load_layer_with_prefix(dir, &cfg, &cfg.layer_prefix(layer))
}

/// Loads the MoE block under `prefix` (`model.layers.3.block_sparse_moe.`; `""` for a block's own state dict) of
/// the checkpoint at `path` (file, index or directory), with `cfg` (whose [`MoeConfig::expert_weights`] says how
/// expert weights are kept).
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
