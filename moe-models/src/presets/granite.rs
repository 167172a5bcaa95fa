//! GraniteMoE (`GraniteMoeMoE`): top-k of the raw logits, softmax over the k; SwiGLU experts. On disk (v5):
//! `router.weight`, `experts.gate_up_proj`, `experts.down_proj`; on the Hub: `router.layer.weight`,
//! `input_linear.weight [E, 2f, d]`, `output_linear.weight [E, d, f]`.

use moe_core::{ExpertBank, MoeLayer, SwiGluBank};
use moe_routers::TopKPreset;

use super::{core_err, load_gate, topk_router};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Router gate names (v5, Hub).
pub const GATE: &[&str] = &["router.weight", "router.layer.weight"];
/// Fused gate-up names (v5, Hub).
pub const GATE_UP: &[&str] = &["experts.gate_up_proj", "input_linear.weight"];
/// Down names matching [`GATE_UP`].
pub const DOWN: &[&str] = &["experts.down_proj", "output_linear.weight"];

/// The fused experts under either naming.
pub(crate) fn load_fused(
    w: &Weights<'_>,
    n_experts: usize,
    d: usize,
    family: Family,
) -> Result<SwiGluBank, LoadError> {
    let gu_name = w.first_of(GATE_UP)?;
    let down_name = if gu_name == GATE_UP[0] {
        DOWN[0]
    } else {
        DOWN[1]
    };
    let gate_up = w.get3(gu_name, Some(n_experts), None, Some(d))?;
    let f2 = gate_up.dim().1;
    let down = w.get3(down_name, Some(n_experts), Some(d), Some(f2 / 2))?;
    SwiGluBank::new(gate_up, down, moe_core::Activation::Silu).map_err(core_err(w, family))
}

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::GraniteMoe;
    let gate = load_gate(w, GATE, cfg.n_experts)?;
    let d = gate.ncols();
    let bank = load_fused(w, cfg.n_experts, d, fam)?;
    let router = topk_router(w, fam, TopKPreset::Granite, gate, cfg.top_k, None)?;
    MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).map_err(core_err(w, fam))
}
