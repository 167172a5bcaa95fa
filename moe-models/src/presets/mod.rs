//! Per-family presets: each module knows its family's tensor names and layouts on disk (transformers v5 fused
//! names and the per-expert Hub names) and builds a [`MoeLayer`] from them. Shared helpers live here.

pub mod deepseek_v3;
pub mod gpt_oss;
pub mod granite;
pub mod jetmoe;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;

use moe_core::{Activation, MoeError, MoeLayer, SharedExperts, SwiGluBank};
use moe_routers::{SoftmaxTopK, SoftmaxTopKConfig, TopKPreset};
use ndarray::{Array3, Axis, concatenate};

use crate::Family;
use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Builds the MoE block of `cfg.family` from the tensors under `w`'s prefix.
///
/// # Errors
/// [`LoadError::MissingTensor`], [`LoadError::Shape`], [`LoadError::Dtype`] for the checkpoint,
/// [`LoadError::Layer`] when moe-core rejects the settings (`k > E`, groups that do not divide `E`).
pub fn build_layer(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    match cfg.family {
        Family::Mixtral => mixtral::build(cfg, w),
        Family::Qwen2Moe => qwen2_moe::build(cfg, w),
        Family::Olmoe => olmoe::build(cfg, w),
        Family::DeepseekV3 => deepseek_v3::build(cfg, w),
        Family::GraniteMoe => granite::build(cfg, w),
        Family::JetMoe => jetmoe::build(cfg, w),
        Family::GptOss => gpt_oss::build(cfg, w),
        Family::SwitchTransformers => crate::switch::build(cfg, w),
        Family::NllbMoe => crate::nllb::build(cfg, w),
    }
}

/// Wraps a core error with the checkpoint and the family.
pub(crate) fn core_err(w: &Weights<'_>, family: Family) -> impl Fn(MoeError) -> LoadError + use<> {
    let file = w.checkpoint().origin().to_path_buf();
    move |e| {
        LoadError::layer(
            file.clone(),
            format!("building the {} layer", family.model_type()),
            e,
        )
    }
}

/// Per-expert Hub names of a SwiGLU expert: `experts.{e}.{gate}.weight` etc.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PerExpertNames {
    /// Gate projection (`w1`, `gate_proj`), `[f, d]`.
    pub gate: &'static str,
    /// Up projection (`w3`, `up_proj`), `[f, d]`.
    pub up: &'static str,
    /// Down projection (`w2`, `down_proj`), `[d, f]`.
    pub down: &'static str,
}

/// Mixtral's Hub names.
pub(crate) const MIXTRAL_NAMES: PerExpertNames = PerExpertNames {
    gate: "w1",
    up: "w3",
    down: "w2",
};
/// Qwen2-MoE, OLMoE and DeepSeek-V3 Hub names.
pub(crate) const PROJ_NAMES: PerExpertNames = PerExpertNames {
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};

/// The router gate `[E, d]` under one of `names`; returns it and `d`.
pub(crate) fn load_gate(
    w: &Weights<'_>,
    names: &[&str],
    n_experts: usize,
) -> Result<ndarray::Array2<f32>, LoadError> {
    let name = w.first_of(names)?;
    w.get2(name, Some(n_experts), None)
}

/// SwiGLU experts under `w` (the `experts.` level's parent): fused `fused.0 [E, 2f, d]` / `fused.1 [E, d, f]` if
/// present, else per-expert `experts.{e}.{gate|up|down}.weight` fused here (gate rows first, then up rows).
pub(crate) fn load_swiglu(
    w: &Weights<'_>,
    fused: (&str, &str),
    per_expert: PerExpertNames,
    n_experts: usize,
    d: usize,
    family: Family,
) -> Result<SwiGluBank, LoadError> {
    let (gate_up, down) = if w.contains(fused.0) {
        let gate_up = w.get3(fused.0, Some(n_experts), None, Some(d))?;
        let f2 = gate_up.dim().1;
        if f2 % 2 != 0 || f2 == 0 {
            return Err(LoadError::Shape {
                file: w.checkpoint().file_of(&w.full(fused.0)).to_path_buf(),
                tensor: w.full(fused.0),
                expected: format!("[{n_experts}, 2f (even), {d}]"),
                found: gate_up.shape().to_vec(),
            });
        }
        let down = w.get3(fused.1, Some(n_experts), Some(d), Some(f2 / 2))?;
        (gate_up, down)
    } else {
        let first = format!("experts.0.{}.weight", per_expert.gate);
        if !w.contains(&first) {
            // Report the fused name and the Hub name.
            w.first_of(&[fused.0, first.as_str()])?;
        }
        let f = w.get2(&first, None, Some(d))?.nrows();
        let mut gate_up = Array3::<f32>::zeros((n_experts, 2 * f, d));
        let mut down = Array3::<f32>::zeros((n_experts, d, f));
        for e in 0..n_experts {
            let g = w.get2(
                &format!("experts.{e}.{}.weight", per_expert.gate),
                Some(f),
                Some(d),
            )?;
            let u = w.get2(
                &format!("experts.{e}.{}.weight", per_expert.up),
                Some(f),
                Some(d),
            )?;
            let dn = w.get2(
                &format!("experts.{e}.{}.weight", per_expert.down),
                Some(d),
                Some(f),
            )?;
            let mut gu = gate_up.index_axis_mut(Axis(0), e);
            gu.slice_mut(ndarray::s![..f, ..]).assign(&g);
            gu.slice_mut(ndarray::s![f.., ..]).assign(&u);
            down.index_axis_mut(Axis(0), e).assign(&dn);
        }
        (gate_up, down)
    };
    SwiGluBank::new(gate_up, down, Activation::Silu).map_err(core_err(w, family))
}

/// A one-expert SwiGLU bank from `{prefix}.gate_proj|up_proj|down_proj.weight` (Qwen2-MoE `shared_expert`,
/// DeepSeek-V3 `shared_experts`).
pub(crate) fn load_shared_swiglu(
    w: &Weights<'_>,
    prefix: &str,
    d: usize,
    family: Family,
) -> Result<SwiGluBank, LoadError> {
    let s = w.pp(prefix);
    let g = s.get2("gate_proj.weight", None, Some(d))?;
    let f = g.nrows();
    let u = s.get2("up_proj.weight", Some(f), Some(d))?;
    let dn = s.get2("down_proj.weight", Some(d), Some(f))?;
    let gate_up = concatenate(Axis(0), &[g.view(), u.view()])
        .map_err(|e| MoeError::config(prefix, e, "cannot join gate and up"))
        .map_err(core_err(w, family))?
        .insert_axis(Axis(0));
    let down = dn.insert_axis(Axis(0));
    SwiGluBank::new(gate_up, down, Activation::Silu).map_err(core_err(w, family))
}

/// Wraps a bank as shared experts with an optional gate vector.
pub(crate) fn shared(
    w: &Weights<'_>,
    bank: SwiGluBank,
    gate: Option<ndarray::Array1<f32>>,
    family: Family,
) -> Result<SharedExperts, LoadError> {
    SharedExperts::new(moe_core::ExpertBank::SwiGlu(bank), gate).map_err(core_err(w, family))
}

/// A softmax top-k router from a preset, `k`, and an optional renormalisation override.
pub(crate) fn topk_router(
    w: &Weights<'_>,
    family: Family,
    preset: TopKPreset,
    gate: ndarray::Array2<f32>,
    k: usize,
    renormalize: Option<bool>,
) -> Result<SoftmaxTopK, LoadError> {
    SoftmaxTopKConfig {
        preset: Some(preset),
        k: Some(k),
        renormalize,
        ..Default::default()
    }
    .build(gate, k)
    .map_err(core_err(w, family))
}
