//! Mixtral (`MixtralSparseMoeBlock`): softmax over all `E` logits, top-k, renormalise to sum 1; SwiGLU experts.
//! On disk: `gate.weight [E, d]`, fused `experts.gate_up_proj [E, 2f, d]` / `experts.down_proj [E, d, f]`, or the
//! Hub's `experts.{e}.w1|w3|w2.weight` (gate, up, down).

use moe_core::{ExpertBank, MoeLayer};
use moe_routers::TopKPreset;

use super::{MIXTRAL_NAMES, core_err, load_gate, load_swiglu, topk_router};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Router gate names.
pub const GATE: &[&str] = &["gate.weight"];
/// Fused expert names (transformers v5).
pub const FUSED: (&str, &str) = ("experts.gate_up_proj", "experts.down_proj");

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let gate = load_gate(w, GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = load_swiglu(w, FUSED, MIXTRAL_NAMES, cfg.n_experts, d, Family::Mixtral)?;
    let router = topk_router(
        w,
        Family::Mixtral,
        TopKPreset::Mixtral,
        gate,
        cfg.top_k,
        cfg.renormalize,
    )?;
    MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, Family::Mixtral))
}
