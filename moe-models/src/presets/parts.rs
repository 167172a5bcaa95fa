//! The pieces family files build from: a [`Loader`] that reads tensors under a block prefix and records, for every
//! layer parameter it fills, the checkpoint name it came from ([`MoeLayer::with_hf_names`]), plus the bank loaders
//! several families share (SwiGLU experts fused or per expert, a one-expert shared SwiGLU, per-expert two-layer
//! MLPs) and the softmax top-k router.
//!
//! # HF names
//! A parameter's HF name is the full checkpoint name (block prefix included) of the tensor it was read from, when
//! one tensor holds it in the layer's layout. Otherwise:
//! - `{e}` in a name: one tensor per expert, stacked on a new leading axis `E`
//!   (`model.layers.1.block_sparse_moe.experts.{e}.w2.weight`, `[d, f]` each, is `experts.down` `[E, d, f]`);
//! - ` + ` between names: the tensors are concatenated along the rows of each expert, in that order
//!   (`experts.{e}.w1.weight + experts.{e}.w3.weight` is `experts.gate_up` `[E, 2f, d]`: gate rows, then up
//!   rows);
//! - a one-expert shared bank has a leading axis 1 that the checkpoint lacks (`shared_expert.down_proj.weight`
//!   `[d, f]` is `shared.down` `[1, d, f]`), and Qwen2-MoE's `shared_expert_gate.weight` `[1, d]` is `shared.gate`
//!   `[d]`: only leading axes of size 1 differ.

use moe_core::{Activation, ExpertBank, MlpBank, MoeError, MoeLayer, SharedExperts, SwiGluBank};
use moe_routers::{SoftmaxTopK, SoftmaxTopKConfig, TopKPreset};
use ndarray::{Array1, Array2, Array3, Axis, concatenate};

use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::quant::{ExpertWeights, QuantizationConfig};

/// Reads a family's tensors under a block prefix and remembers which checkpoint name filled which parameter.
#[derive(Debug)]
pub(crate) struct Loader<'w, 'a> {
    pub(super) w: &'w Weights<'a>,
    model_type: &'static str,
    names: Vec<(&'static str, String)>,
    /// The format expert weights are kept in ([`MoeConfig::expert_weights`]).
    pub(super) experts: ExpertWeights,
    /// The checkpoint's `quantization_config`.
    pub(super) quant: Option<QuantizationConfig>,
}

impl<'w, 'a> Loader<'w, 'a> {
    /// A loader for family `model_type` (named in errors) over `w`, keeping expert weights as `cfg` says.
    pub fn new(w: &'w Weights<'a>, cfg: &MoeConfig, model_type: &'static str) -> Self {
        Loader {
            w,
            model_type,
            names: Vec::new(),
            experts: cfg.expert_weights,
            quant: cfg.quantization,
        }
    }

    /// Whether `name` exists under the prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(name)
    }

    /// Wraps a core error with the checkpoint and the family (`building the mixtral layer`).
    pub fn err(&self) -> impl Fn(MoeError) -> LoadError + use<> {
        let file = self.w.checkpoint().origin().to_path_buf();
        let context = format!("building the {} layer", self.model_type);
        move |e| LoadError::from_core(file.clone(), context.clone(), e)
    }

    /// A config error naming the checkpoint.
    pub fn config_err(&self, field: &str, reason: impl Into<String>) -> LoadError {
        LoadError::config(self.w.checkpoint().origin(), field, reason)
    }

    /// An error when the config declares a `quantization_config` but the experts were found unquantised (tensor
    /// `tensor`, unprefixed, is not a packed one): a config that says the weights are quantised is never ignored.
    pub fn require_unquantized(&self, tensor: &str) -> Result<(), LoadError> {
        match self.quant {
            None => Ok(()),
            Some(q) => Err(self.config_err(
                "quantization_config",
                format!(
                    "declares \"quant_method\": \"{}\", but the experts are not quantised (tensor {} holds \
                     plain weights): remove the quantization_config or give the packed tensors",
                    q.quant_method(),
                    self.w.full(tensor)
                ),
            )),
        }
    }

    /// Records that parameter `param` was read from `names` (unprefixed, joined by ` + `).
    pub fn record(&mut self, param: &'static str, names: &[&str]) {
        let full: Vec<String> = names.iter().map(|n| self.w.full(n)).collect();
        self.names.push((param, full.join(" + ")));
    }

    /// Reads `[a]` tensor `name` into parameter `param`.
    pub fn vec(
        &mut self,
        param: &'static str,
        name: &str,
        a: Option<usize>,
    ) -> Result<Array1<f32>, LoadError> {
        let v = self.w.get1(name, a)?;
        self.record(param, &[name]);
        Ok(v)
    }

    /// Reads `[a]` tensor `name` into parameter `param` when the checkpoint has it.
    pub fn optional_vec(
        &mut self,
        param: &'static str,
        name: &str,
        a: Option<usize>,
    ) -> Result<Option<Array1<f32>>, LoadError> {
        if self.contains(name) {
            self.vec(param, name, a).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads `[a, b]` tensor `name` into parameter `param`.
    pub fn mat(
        &mut self,
        param: &'static str,
        name: &str,
        a: Option<usize>,
        b: Option<usize>,
    ) -> Result<Array2<f32>, LoadError> {
        let v = self.w.get2(name, a, b)?;
        self.record(param, &[name]);
        Ok(v)
    }

    /// Reads `[a, b, c]` tensor `name` into parameter `param`.
    pub fn tensor3(
        &mut self,
        param: &'static str,
        name: &str,
        dims: [Option<usize>; 3],
    ) -> Result<Array3<f32>, LoadError> {
        let v = self.w.get3(name, dims[0], dims[1], dims[2])?;
        self.record(param, &[name]);
        Ok(v)
    }

    /// The router gate `[E, d]` (parameter `router.gate`) under the first of `names` present.
    pub fn gate(&mut self, names: &[&str], n_experts: usize) -> Result<Array2<f32>, LoadError> {
        let name = self.w.first_of(names)?;
        self.mat("router.gate", name, Some(n_experts), None)
    }

    /// SwiGLU experts (`experts.gate_up` `[E, 2f, d]`, `experts.down` `[E, d, f]`): the fused `fused.0` /
    /// `fused.1` if present, else the per-expert `experts.{e}.{gate|up|down}.weight` fused here (gate rows first,
    /// then up rows). FP8 tensors (with their `weight_scale_inv`) and, under [`ExpertWeights::Checkpoint`], BF16 /
    /// F16 tensors load packed ([`Loader::packed_swiglu`]).
    pub fn swiglu(
        &mut self,
        fused: (&str, &str),
        per_expert: PerExpertNames,
        n_experts: usize,
        d: usize,
    ) -> Result<ExpertBank, LoadError> {
        if let Some(bank) = self.packed_swiglu(fused, per_expert, n_experts, d)? {
            return Ok(bank);
        }
        self.require_unquantized(if self.contains(fused.0) {
            fused.0
        } else {
            "experts"
        })?;
        let (gate_up, down) = if self.contains(fused.0) {
            let w = self.w;
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
            self.record("experts.gate_up", &[fused.0]);
            self.record("experts.down", &[fused.1]);
            (gate_up, down)
        } else {
            self.per_expert_swiglu(fused.0, per_expert, n_experts, d)?
        };
        SwiGluBank::new(gate_up, down, Activation::Silu)
            .map(ExpertBank::SwiGlu)
            .map_err(self.err())
    }

    /// SwiGLU experts stored fused under one of several namings: `gate_up[i]` `[E, 2f, d]` with `down[i]`
    /// `[E, d, f]` for the first `i` whose `gate_up[i]` is present; BF16 / F16 tensors stay 16-bit under
    /// [`ExpertWeights::Checkpoint`].
    pub fn fused_swiglu(
        &mut self,
        gate_up: &[&str],
        down: &[&str],
        n_experts: usize,
        d: usize,
    ) -> Result<ExpertBank, LoadError> {
        let gu_name = self.w.first_of(gate_up)?;
        let i = gate_up.iter().position(|n| *n == gu_name).unwrap_or(0);
        let down_name = down.get(i).or(down.first()).copied().unwrap_or_default();
        if let Some(bank) = self.packed_fused_swiglu((gu_name, down_name), n_experts, d)? {
            return Ok(bank);
        }
        self.require_unquantized(gu_name)?;
        let gu = self.tensor3("experts.gate_up", gu_name, [Some(n_experts), None, Some(d)])?;
        let f2 = gu.dim().1;
        let dn = self.tensor3(
            "experts.down",
            down_name,
            [Some(n_experts), Some(d), Some(f2 / 2)],
        )?;
        SwiGluBank::new(gu, dn, Activation::Silu)
            .map(ExpertBank::SwiGlu)
            .map_err(self.err())
    }

    /// The per-expert half of [`Loader::swiglu`].
    fn per_expert_swiglu(
        &mut self,
        fused_gate_up: &str,
        names: PerExpertNames,
        n_experts: usize,
        d: usize,
    ) -> Result<(Array3<f32>, Array3<f32>), LoadError> {
        let w = self.w;
        let name = |e: usize, proj: &str| format!("experts.{e}.{proj}.weight");
        let first = name(0, names.gate);
        if !w.contains(&first) {
            // Report the fused name and the Hub name.
            w.first_of(&[fused_gate_up, first.as_str()])?;
        }
        let f = w.get2(&first, None, Some(d))?.nrows();
        // `f · d` values are in the file; `E · 2f · d` is checked before the bank is allocated.
        if n_experts
            .checked_mul(f)
            .and_then(|v| v.checked_mul(2))
            .and_then(|v| v.checked_mul(d))
            .and_then(|v| v.checked_mul(4))
            .is_none_or(|b| b > isize::MAX as usize)
        {
            return Err(LoadError::Shape {
                file: w.checkpoint().file_of(&w.full(&first)).to_path_buf(),
                tensor: w.full(&first),
                expected: format!("a bank of {n_experts} experts that fits in memory"),
                found: vec![f, d],
            });
        }
        let mut gate_up = Array3::<f32>::zeros((n_experts, 2 * f, d));
        let mut down = Array3::<f32>::zeros((n_experts, d, f));
        for e in 0..n_experts {
            let g = w.get2(&name(e, names.gate), Some(f), Some(d))?;
            let u = w.get2(&name(e, names.up), Some(f), Some(d))?;
            let dn = w.get2(&name(e, names.down), Some(d), Some(f))?;
            let mut gu = gate_up.index_axis_mut(Axis(0), e);
            gu.slice_mut(ndarray::s![..f, ..]).assign(&g);
            gu.slice_mut(ndarray::s![f.., ..]).assign(&u);
            down.index_axis_mut(Axis(0), e).assign(&dn);
        }
        let pattern = |proj: &str| format!("experts.{{e}}.{proj}.weight");
        self.record(
            "experts.gate_up",
            &[&pattern(names.gate), &pattern(names.up)],
        );
        self.record("experts.down", &[&pattern(names.down)]);
        Ok((gate_up, down))
    }

    /// A one-expert SwiGLU bank from `{prefix}.gate_proj|up_proj|down_proj.weight` (Qwen2-MoE `shared_expert`,
    /// DeepSeek-V3 `shared_experts`), as parameters `shared.gate_up` and `shared.down`; packed as
    /// [`Loader::swiglu`] packs.
    pub fn shared_swiglu(&mut self, prefix: &str, d: usize) -> Result<ExpertBank, LoadError> {
        if let Some(bank) = self.packed_shared_swiglu(prefix, d)? {
            return Ok(bank);
        }
        let s = self.w.pp(prefix);
        let g = s.get2("gate_proj.weight", None, Some(d))?;
        let f = g.nrows();
        let u = s.get2("up_proj.weight", Some(f), Some(d))?;
        let dn = s.get2("down_proj.weight", Some(d), Some(f))?;
        let gate_up = concatenate(Axis(0), &[g.view(), u.view()])
            .map_err(|e| MoeError::config(prefix, e, "cannot join gate and up"))
            .map_err(self.err())?
            .insert_axis(Axis(0));
        let down = dn.insert_axis(Axis(0));
        let bank = SwiGluBank::new(gate_up, down, Activation::Silu).map_err(self.err())?;
        self.record(
            "shared.gate_up",
            &[
                &format!("{prefix}.gate_proj.weight"),
                &format!("{prefix}.up_proj.weight"),
            ],
        );
        self.record("shared.down", &[&format!("{prefix}.down_proj.weight")]);
        Ok(ExpertBank::SwiGlu(bank))
    }

    /// Wraps a one-expert bank as shared experts with an optional gate vector `[d]`.
    pub fn shared(
        &self,
        bank: ExpertBank,
        gate: Option<Array1<f32>>,
    ) -> Result<SharedExperts, LoadError> {
        SharedExperts::new(bank, gate).map_err(self.err())
    }

    /// Two-layer per-expert MLPs `experts.expert_{e}.{w1}` / `{w2}` (and their biases when `biases`) as one bank
    /// (`experts.w1` `[E, f, d]`, `experts.b1`, `experts.w2` `[E, d, f]`, `experts.b2`) with `act` between them.
    pub fn mlp_bank(
        &mut self,
        n_experts: usize,
        d: usize,
        names: (&str, &str),
        biases: bool,
        act: Activation,
    ) -> Result<MlpBank, LoadError> {
        let w = self.w;
        let name = |e: &str, proj: &str, kind: &str| format!("experts.expert_{e}.{proj}.{kind}");
        let f = w
            .get2(&name("0", names.0, "weight"), None, Some(d))?
            .nrows();
        let mut w1 = Array3::<f32>::zeros((n_experts, f, d));
        let mut w2 = Array3::<f32>::zeros((n_experts, d, f));
        let mut b1 = biases.then(|| Array2::<f32>::zeros((n_experts, f)));
        let mut b2 = biases.then(|| Array2::<f32>::zeros((n_experts, d)));
        for e in 0..n_experts {
            let ex = e.to_string();
            w1.index_axis_mut(Axis(0), e).assign(&w.get2(
                &name(&ex, names.0, "weight"),
                Some(f),
                Some(d),
            )?);
            w2.index_axis_mut(Axis(0), e).assign(&w.get2(
                &name(&ex, names.1, "weight"),
                Some(d),
                Some(f),
            )?);
            if let Some(b) = &mut b1 {
                b.row_mut(e)
                    .assign(&w.get1(&name(&ex, names.0, "bias"), Some(f))?);
            }
            if let Some(b) = &mut b2 {
                b.row_mut(e)
                    .assign(&w.get1(&name(&ex, names.1, "bias"), Some(d))?);
            }
        }
        self.record("experts.w1", &[&name("{e}", names.0, "weight")]);
        self.record("experts.w2", &[&name("{e}", names.1, "weight")]);
        if biases {
            self.record("experts.b1", &[&name("{e}", names.0, "bias")]);
            self.record("experts.b2", &[&name("{e}", names.1, "bias")]);
        }
        MlpBank::new(w1, b1, w2, b2, act).map_err(self.err())
    }

    /// A softmax top-k router from a preset, `k`, and an optional renormalisation override.
    pub fn topk_router(
        &self,
        preset: TopKPreset,
        gate: Array2<f32>,
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
        .map_err(self.err())
    }

    /// Attaches the recorded checkpoint names to `layer` ([`MoeLayer::with_hf_names`]).
    pub fn finish(self, layer: MoeLayer) -> MoeLayer {
        layer.with_hf_names(self.names.iter().map(|(p, n)| (*p, n.clone())))
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

/// The `gate_proj` / `up_proj` / `down_proj` Hub names (Qwen2-MoE, OLMoE, DeepSeek-V3).
pub(crate) const PROJ_NAMES: PerExpertNames = PerExpertNames {
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};
