//! OLMoE (`OlmoeSparseMoeBlock`): softmax over all `E`, top-k, no renormalisation unless `norm_topk_prob`; SwiGLU
//! experts. On disk: `gate.weight`, fused `experts.gate_up_proj` / `experts.down_proj`, or the Hub's
//! `experts.{e}.gate_proj|up_proj|down_proj.weight`.

use moe_core::{ExpertBank, MoeLayer};
use moe_routers::TopKPreset;

use super::{PROJ_NAMES, core_err, load_gate, load_swiglu, topk_router};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let gate = load_gate(w, super::mixtral::GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = load_swiglu(
        w,
        super::mixtral::FUSED,
        PROJ_NAMES,
        cfg.n_experts,
        d,
        Family::Olmoe,
    )?;
    let router = topk_router(
        w,
        Family::Olmoe,
        TopKPreset::Olmoe,
        gate,
        cfg.top_k,
        Some(cfg.renormalize.unwrap_or(false)),
    )?;
    MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, Family::Olmoe))
}
