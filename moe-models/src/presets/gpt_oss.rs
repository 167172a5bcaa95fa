//! GPT-OSS (`GptOssMLP`): logits `x · Wᵀ + b`, top-k of the logits, softmax over the k; experts in the transposed
//! layout (`x · W`) with interleaved gate/up, clamped SwiGLU and biases. On disk: `router.weight [E, d]`,
//! `router.bias [E]`, `experts.gate_up_proj [E, d, 2f]`, `experts.gate_up_proj_bias [E, 2f]`,
//! `experts.down_proj [E, f, d]`, `experts.down_proj_bias [E, d]` (f32/bf16; MXFP4 blocks are not read).

use moe_core::{ExpertBank, GptOssBank, MoeLayer};
use moe_routers::TopKPreset;

use super::{core_err, load_gate, topk_router};
use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Builds the block.
///
/// # Errors
/// As [`super::build_layer`].
pub fn build(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    let fam = Family::GptOss;
    let e = cfg.n_experts;
    let gate = load_gate(w, &["router.weight"], e)?;
    let d = gate.ncols();
    let bias = w.get1("router.bias", Some(e))?;
    let gate_up = w.get3("experts.gate_up_proj", Some(e), Some(d), None)?;
    let f2 = gate_up.dim().2;
    let gate_up_bias = w.get2("experts.gate_up_proj_bias", Some(e), Some(f2))?;
    let down = w.get3("experts.down_proj", Some(e), Some(f2 / 2), Some(d))?;
    let down_bias = w.get2("experts.down_proj_bias", Some(e), Some(d))?;
    let bank = GptOssBank::new(
        gate_up,
        gate_up_bias,
        down,
        down_bias,
        cfg.swiglu_alpha,
        cfg.swiglu_limit,
    )
    .map_err(core_err(w, fam))?;
    let router = topk_router(w, fam, TopKPreset::Granite, gate, cfg.top_k, None)?
        .with_gate_bias(bias)
        .map_err(core_err(w, fam))?;
    MoeLayer::new(Box::new(router), ExpertBank::GptOss(bank)).map_err(core_err(w, fam))
}
