//! Configuration: [`HfConfig`], the fields of an HF `config.json` that the presets read (HF names appear only
//! here, through serde renames), and [`MoeConfig`], the family-independent settings a preset is built from.

use std::path::Path;

use crate::Family;
use crate::checkpoint::read_json;
use crate::error::LoadError;

/// The MoE fields of an HF `config.json`. Each family uses a subset; unknown fields are ignored.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct HfConfig {
    /// `model_type`: selects the family.
    pub model_type: Option<String>,
    /// `hidden_size` (most families).
    pub hidden_size: Option<usize>,
    /// `d_model` (Switch, NLLB).
    pub d_model: Option<usize>,
    /// `num_local_experts` (Mixtral, Granite, JetMoE, GPT-OSS).
    pub num_local_experts: Option<usize>,
    /// `num_experts` (Qwen2/3-MoE, OLMoE, Switch, NLLB).
    pub num_experts: Option<usize>,
    /// `n_routed_experts` (DeepSeek-V3).
    pub n_routed_experts: Option<usize>,
    /// `num_experts_per_tok`: experts per token.
    pub num_experts_per_tok: Option<usize>,
    /// `norm_topk_prob`: renormalise the k weights.
    pub norm_topk_prob: Option<bool>,
    /// `n_group` (DeepSeek-V3).
    pub n_group: Option<usize>,
    /// `topk_group` (DeepSeek-V3).
    pub topk_group: Option<usize>,
    /// `routed_scaling_factor` (DeepSeek-V3).
    pub routed_scaling_factor: Option<f32>,
    /// `swiglu_limit` (GPT-OSS).
    pub swiglu_limit: Option<f32>,
    /// `expert_capacity` (Switch).
    pub expert_capacity: Option<usize>,
    /// `moe_eval_capacity_token_fraction` (NLLB).
    pub moe_eval_capacity_token_fraction: Option<f64>,
    /// `moe_token_dropout` (NLLB).
    pub moe_token_dropout: Option<f32>,
    /// `batch_prioritized_routing` (NLLB).
    pub batch_prioritized_routing: Option<bool>,
    /// `normalize_router_prob_before_dropping` (NLLB).
    pub normalize_router_prob_before_dropping: Option<bool>,
    /// `second_expert_policy` (NLLB; only `all` is supported).
    pub second_expert_policy: Option<String>,
}

/// The settings a preset is built from, in the project's own names.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MoeConfig {
    /// The family.
    pub family: Family,
    /// Routed experts `E`.
    pub n_experts: usize,
    /// Experts per token `k` (1 for Switch, 2 for NLLB).
    pub top_k: usize,
    /// Renormalise the k weights (`norm_topk_prob`); `None` takes the family's default.
    pub renormalize: Option<bool>,
    /// Group-limited selection: number of groups (DeepSeek-V3).
    pub n_group: Option<usize>,
    /// Groups kept per token (DeepSeek-V3).
    pub topk_group: Option<usize>,
    /// Routed scaling factor (DeepSeek-V3).
    pub routed_scaling_factor: Option<f32>,
    /// GPT-OSS clamped SwiGLU limit (default 7.0).
    pub swiglu_limit: f32,
    /// GPT-OSS sigmoid slope (1.702).
    pub swiglu_alpha: f32,
    /// Switch: capacity per expert per sequence.
    pub expert_capacity: Option<usize>,
    /// NLLB: eval capacity as a fraction of all tokens, `capacity = ceil(fraction · T)`.
    pub capacity_fraction: Option<f64>,
    /// NLLB: token dropout `p`; the eval output is scaled by `1 − p`.
    pub token_dropout: f32,
    /// NLLB: take slots in order of descending top-1 probability instead of token order.
    pub batch_prioritized: bool,
    /// NLLB: normalise the two weights before capacity drops them.
    pub normalize_before_dropping: bool,
}

impl MoeConfig {
    /// A config with the family's defaults for everything but `E` and `k`.
    pub fn new(family: Family, n_experts: usize, top_k: usize) -> Self {
        MoeConfig {
            family,
            n_experts,
            top_k,
            renormalize: None,
            n_group: None,
            topk_group: None,
            routed_scaling_factor: None,
            swiglu_limit: 7.0,
            swiglu_alpha: 1.702,
            expert_capacity: None,
            capacity_fraction: None,
            token_dropout: 0.0,
            batch_prioritized: false,
            normalize_before_dropping: false,
        }
    }

    /// Reads `config.json` and converts it.
    ///
    /// # Errors
    /// [`LoadError::Io`], [`LoadError::Json`], and the errors of [`MoeConfig::from_hf`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let hf: HfConfig = read_json(path)?;
        Self::from_hf(&hf, path)
    }

    /// Converts an HF config; `file` names it in errors.
    ///
    /// # Errors
    /// [`LoadError::UnknownFamily`] for a `model_type` that is not a family; [`LoadError::Config`] when the
    /// number of experts or `k` is missing.
    pub fn from_hf(hf: &HfConfig, file: &Path) -> Result<Self, LoadError> {
        let model_type = hf.model_type.clone().unwrap_or_default();
        let family =
            Family::from_model_type(&model_type).ok_or_else(|| LoadError::UnknownFamily {
                file: file.to_path_buf(),
                model_type: model_type.clone(),
                known: Family::ALL.map(Family::model_type).join(", "),
            })?;
        let n_experts = hf
            .n_routed_experts
            .or(hf.num_local_experts)
            .or(hf.num_experts)
            .ok_or_else(|| {
                LoadError::config(
                    file,
                    "num_local_experts | num_experts | n_routed_experts",
                    "missing",
                )
            })?;
        let top_k = match family {
            Family::SwitchTransformers => 1,
            Family::NllbMoe => 2,
            _ => hf
                .num_experts_per_tok
                .ok_or_else(|| LoadError::config(file, "num_experts_per_tok", "missing"))?,
        };
        if let Some(p) = &hf.second_expert_policy
            && p != "all"
        {
            return Err(LoadError::config(
                file,
                "second_expert_policy",
                format!("{p:?} is not supported (only \"all\", the eval behaviour)"),
            ));
        }
        let mut c = MoeConfig::new(family, n_experts, top_k);
        c.renormalize = hf.norm_topk_prob;
        c.n_group = hf.n_group;
        c.topk_group = hf.topk_group;
        c.routed_scaling_factor = hf.routed_scaling_factor;
        if let Some(l) = hf.swiglu_limit {
            c.swiglu_limit = l;
        }
        c.expert_capacity = hf.expert_capacity;
        c.capacity_fraction = hf.moe_eval_capacity_token_fraction;
        c.token_dropout = hf.moe_token_dropout.unwrap_or(0.0);
        c.batch_prioritized = hf.batch_prioritized_routing.unwrap_or(false);
        c.normalize_before_dropping = hf.normalize_router_prob_before_dropping.unwrap_or(false);
        Ok(c)
    }

    /// The block prefix of layer `layer` in a full model checkpoint, as transformers names it
    /// (`model.layers.3.block_sparse_moe.`).
    pub fn layer_prefix(&self, layer: usize) -> String {
        match self.family {
            Family::Mixtral | Family::GraniteMoe => {
                format!("model.layers.{layer}.block_sparse_moe.")
            }
            Family::Qwen2Moe
            | Family::Olmoe
            | Family::DeepseekV3
            | Family::JetMoe
            | Family::GptOss => {
                format!("model.layers.{layer}.mlp.")
            }
            Family::SwitchTransformers => {
                format!("encoder.block.{layer}.layer.1.mlp.")
            }
            Family::NllbMoe => format!("model.encoder.layers.{layer}.ffn."),
        }
    }
}
