//! Qwen2-MoE (`Qwen2MoeSparseMoeBlock`, and Qwen3-MoE's config): softmax over all `E`, top-k, renormalise only
//! with `norm_topk_prob`; SwiGLU experts; a SwiGLU shared expert gated by `sigmoid(x · shared_expert_gate)`
//! (absent in Qwen3-MoE). On disk: as OLMoE plus `shared_expert.gate_proj|up_proj|down_proj.weight` and
//! `shared_expert_gate.weight [1, d]`.

use moe_core::{ExpertBank, MoeLayer};
use moe_routers::TopKPreset;

use super::{
    PROJ_NAMES, core_err, load_gate, load_shared_swiglu, load_swiglu, shared, topk_router,
};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The shared expert's prefix.
pub const SHARED: &str = "shared_expert";
/// The shared expert's gate `[1, d]`.
pub const SHARED_GATE: &str = "shared_expert_gate.weight";

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::Qwen2Moe;
    let gate = load_gate(w, super::mixtral::GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = load_swiglu(w, super::mixtral::FUSED, PROJ_NAMES, cfg.n_experts, d, fam)?;
    let router = topk_router(
        w,
        fam,
        TopKPreset::Qwen2Moe,
        gate,
        cfg.top_k,
        Some(cfg.renormalize.unwrap_or(false)),
    )?;
    let layer =
        MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, fam))?;
    if !w.contains(&format!("{SHARED}.gate_proj.weight")) {
        // Qwen3-MoE: no shared expert.
        return Ok(layer);
    }
    let sbank = load_shared_swiglu(w, SHARED, d, fam)?;
    let sgate = if w.contains(SHARED_GATE) {
        Some(w.get2(SHARED_GATE, Some(1), Some(d))?.row(0).to_owned())
    } else {
        None
    };
    layer
        .with_shared(shared(w, sbank, sgate, fam)?)
        .map_err(core_err(w, fam))
}
