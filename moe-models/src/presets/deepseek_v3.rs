//! DeepSeek-V3 (`DeepseekV3MoE`): `s = sigmoid(logits)`; selection on `s + e_score_correction_bias` limited to the
//! `topk_group` best of `n_group` groups (group score = sum of its top-2); weights are the unbiased `s` of the
//! chosen experts, renormalised (`norm_topk_prob`) and times `routed_scaling_factor`; plus ungated shared experts.
//! On disk: `gate.weight`, `gate.e_score_correction_bias [E]`, experts as OLMoE, `shared_experts.*`.

use moe_core::{ExpertBank, MoeLayer};
use moe_routers::{SoftmaxTopKConfig, TopKPreset};

use super::{PROJ_NAMES, core_err, load_gate, load_shared_swiglu, load_swiglu, shared};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The correction bias `[E]`.
pub const BIAS: &str = "gate.e_score_correction_bias";
/// The shared experts' prefix.
pub const SHARED: &str = "shared_experts";

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::DeepseekV3;
    let e = cfg.n_experts;
    let gate = load_gate(w, super::mixtral::GATE, e)?;
    let d = gate.ncols();
    let bank = load_swiglu(w, super::mixtral::FUSED, PROJ_NAMES, e, d, fam)?;
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
    .map_err(core_err(w, fam))?;
    if w.contains(BIAS) {
        router = router
            .with_correction_bias(w.get1(BIAS, Some(e))?)
            .map_err(core_err(w, fam))?;
    }
    let layer =
        MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, fam))?;
    if !w.contains(&format!("{SHARED}.gate_proj.weight")) {
        return Ok(layer);
    }
    let sbank = load_shared_swiglu(w, SHARED, d, fam)?;
    layer
        .with_shared(shared(w, sbank, None, fam)?)
        .map_err(core_err(w, fam))
}
