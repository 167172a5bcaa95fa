//! JetMoE (`JetMoeMoE`): top-k of the raw logits, softmax over the k; SwiGLU experts (first half gate); an output
//! bias `[d]` added to every token. On disk: `router.layer.weight`, `input_linear.weight [E, 2f, d]`,
//! `output_linear.weight [E, d, f]`, `bias [d]` (v5 fused names are also accepted).

use moe_core::{ExpertBank, MoeLayer};
use moe_routers::TopKPreset;

use super::{core_err, load_gate, topk_router};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// The output bias `[d]`.
pub const BIAS: &str = "bias";

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::JetMoe;
    let gate = load_gate(w, super::granite::GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = super::granite::load_fused(w, cfg.n_experts, d, fam)?;
    let router = topk_router(w, fam, TopKPreset::Granite, gate, cfg.top_k, None)?;
    let layer =
        MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, fam))?;
    if w.contains(BIAS) {
        layer
            .with_output_bias(w.get1(BIAS, Some(d))?)
            .map_err(core_err(w, fam))
    } else {
        Ok(layer)
    }
}
