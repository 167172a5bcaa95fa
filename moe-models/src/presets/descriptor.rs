//! [`Preset`], the descriptor every family file exports: what the family reads from `config.json` (with
//! transformers' defaults), the tensor names it loads, its builder and what `moe inspect` looks for. The table in
//! [`super`] lists one descriptor per family; nothing else in the crate names a family.

use moe_core::MoeLayer;

use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Builds the MoE block from a config and the tensors under a block prefix.
///
/// # Errors
/// [`LoadError::MissingTensor`], [`LoadError::Shape`], [`LoadError::Dtype`] for the checkpoint,
/// [`LoadError::Config`] for a setting the family cannot run, [`LoadError::Layer`] when moe-core rejects the
/// layer (`k > E`, groups that do not divide `E`).
pub type BuildFn = fn(&MoeConfig, &Weights<'_>) -> Result<MoeLayer, LoadError>;

/// One Hugging Face family, as the loader, `moe inspect`, `moe verify` and the docs see it.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// The `config.json` `model_type` values of the family, the canonical one first (`qwen2_moe`, `qwen3_moe`).
    pub model_types: &'static [&'static str],
    /// The transformers module the block reproduces (`MixtralSparseMoeBlock`); the fixture generator builds its
    /// cases from this class.
    pub hf_class: &'static str,
    /// The block prefix of layer `{layer}` in a full model checkpoint (`model.layers.{layer}.block_sparse_moe.`).
    pub layer_prefix: &'static str,
    /// Experts per token when the family fixes it (Switch 1, NLLB 2); otherwise `num_experts_per_tok` or its
    /// equal in [`Preset::config`].
    pub fixed_top_k: Option<usize>,
    /// The `config.json` fields the family reads, each with transformers' default for a missing field: the
    /// fields of the transformers config class of [`Preset::model_type`] that the block's code reads, as of
    /// transformers 5.23.0. Every other key of `config.json` is ignored, as that class ignores it.
    pub config: &'static [ConfigField],
    /// The tables of the family's other `model_type`s, whose config classes differ (`qwen3_moe`:
    /// `Qwen3MoeConfig`, other defaults and no shared expert); [`Preset::config_for`] picks one.
    pub config_variants: &'static [(&'static str, &'static [ConfigField])],
    /// The tensors the family loads, under the block prefix, with their shapes on disk and the layer parameter
    /// each one fills.
    pub tensors: &'static [TensorSpec],
    /// Builds the layer.
    pub build: BuildFn,
    /// How `moe inspect` finds the family's blocks and recognises the family without a `config.json`.
    pub inspect: InspectView,
}

impl Preset {
    /// The canonical `model_type` (`mixtral`).
    pub fn model_type(&self) -> &'static str {
        self.model_types.first().copied().unwrap_or("")
    }

    /// The config table of `model_type`: its entry of [`Preset::config_variants`], else [`Preset::config`].
    pub fn config_for(&self, model_type: &str) -> &'static [ConfigField] {
        self.config_variants
            .iter()
            .find(|(m, _)| *m == model_type)
            .map_or(self.config, |(_, c)| c)
    }

    /// The block prefix of layer `layer` ([`Preset::layer_prefix`] with `{layer}` replaced).
    pub fn layer_prefix(&self, layer: usize) -> String {
        self.layer_prefix.replace("{layer}", &layer.to_string())
    }
}

/// A `config.json` field a family reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConfigField {
    /// The HF names tried, in order: the attribute and its `attribute_map` aliases, in the precedence
    /// transformers 5.23.0 gives them when `config.json` holds several (the first wins; checked per class).
    /// Empty for a setting the config class fixes (Qwen3-MoE's absent shared expert): the default always applies.
    pub hf: &'static [&'static str],
    /// The setting of [`MoeConfig`] it gives.
    pub sets: Setting,
    /// transformers' default, taken when `config.json` lacks the field (or holds `null`).
    pub default: HfDefault,
}

/// The [`MoeConfig`] setting a [`ConfigField`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Setting {
    /// [`MoeConfig::n_experts`] (integer).
    NExperts,
    /// [`MoeConfig::top_k`] (integer).
    TopK,
    /// [`MoeConfig::renormalize`] (bool).
    Renormalize,
    /// [`MoeConfig::n_group`] (integer).
    NGroup,
    /// [`MoeConfig::topk_group`] (integer).
    TopkGroup,
    /// [`MoeConfig::routed_scaling_factor`] (number).
    RoutedScaling,
    /// [`MoeConfig::swiglu_limit`] (number).
    SwigluLimit,
    /// [`MoeConfig::swiglu_alpha`] (number).
    SwigluAlpha,
    /// [`MoeConfig::expert_capacity`] (integer).
    ExpertCapacity,
    /// [`MoeConfig::capacity_fraction`] (number).
    CapacityFraction,
    /// [`MoeConfig::token_dropout`] (number).
    TokenDropout,
    /// [`MoeConfig::batch_prioritized`] (bool).
    BatchPrioritized,
    /// [`MoeConfig::normalize_before_dropping`] (bool).
    NormalizeBeforeDropping,
    /// NLLB's `second_expert_policy` (string): checked, only `all` (the eval behaviour) is supported.
    SecondExpertPolicy,
    /// [`MoeConfig::shared_expert_size`] (integer; Qwen2-MoE's `shared_expert_intermediate_size`, 0 = none).
    SharedExpertSize,
    /// [`MoeConfig::n_shared_experts`] (integer; DeepSeek-V3, 0 = none).
    NSharedExperts,
    /// [`MoeConfig::router_bias`] (bool; Switch and NLLB: whether the router classifier has a bias).
    RouterBias,
}

/// transformers' default of a [`ConfigField`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HfDefault {
    /// An integer.
    Int(usize),
    /// A number.
    Float(f64),
    /// A bool.
    Bool(bool),
    /// A string.
    Str(&'static str),
    /// No default in the config class: the setting stays unset and the builder applies the block's own rule
    /// (Mixtral's `norm_topk_prob`: the block always renormalises).
    Unset,
}

impl ConfigField {
    /// A field read under the names `hf` (the first is canonical).
    pub const fn new(hf: &'static [&'static str], sets: Setting, default: HfDefault) -> Self {
        ConfigField { hf, sets, default }
    }
}

/// When a family reads a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    /// Always.
    Required,
    /// When the checkpoint has it (a bias the block may or may not have).
    Optional,
    /// Required when the config says the block has the part (a shared expert unless
    /// `shared_expert_intermediate_size = 0` or `qwen3_moe`, a router bias with `router_bias = true`); not read
    /// when it says the part is absent.
    Conditional,
    /// transformers v5's fused names, tried first.
    Fused,
    /// The Hub's names (per-expert tensors, or a family's original module names), when the fused ones are absent.
    Hub,
}

/// A tensor a family loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    /// The name under the block prefix; `{e}` stands for the expert index (`experts.{e}.w1.weight`).
    pub name: &'static str,
    /// The shape on disk, in the docs' alphabet (`[E, 2f, d]`; `[f, d]` for a per-expert tensor).
    pub shape: &'static str,
    /// The layer parameter it fills, as [`MoeLayer::params`] names it (`router.gate`, `experts.gate_up`).
    pub param: &'static str,
    /// When it is read.
    pub presence: Presence,
}

impl TensorSpec {
    /// A tensor spec.
    pub const fn new(
        name: &'static str,
        shape: &'static str,
        param: &'static str,
        presence: Presence,
    ) -> Self {
        TensorSpec {
            name,
            shape,
            param,
            presence,
        }
    }

    /// Whether `name` (unprefixed) is this tensor, reading `{e}` as any expert index.
    pub fn matches(&self, name: &str) -> bool {
        match self.name.split_once("{e}") {
            None => self.name == name,
            Some((head, tail)) => name
                .strip_prefix(head)
                .and_then(|rest| rest.strip_suffix(tail))
                .is_some_and(|idx| !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// What `moe inspect` looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InspectView {
    /// Router tensor names that mark an MoE block of the family; the block prefix is what precedes them.
    pub router: &'static [&'static str],
    /// Tensor-name markers that identify the family in a block without `config.json`: the family matches when
    /// every marker of one of the lists occurs in some name (a marker `=bias` must equal a whole name).
    pub markers: &'static [&'static [&'static str]],
    /// When several families match, the highest priority wins (a family whose markers also match another's
    /// blocks ranks above it: NLLB above Switch, Qwen2-MoE above OLMoE above Mixtral).
    pub priority: u8,
}

impl InspectView {
    /// Whether the block's (unprefixed) tensor names show this family.
    pub fn matches<'a>(&self, names: impl IntoIterator<Item = &'a str> + Clone) -> bool {
        let has = |m: &str| {
            let mut it = names.clone().into_iter();
            match m.strip_prefix('=') {
                Some(exact) => it.any(|n| n == exact),
                None => it.any(|n| n.contains(m)),
            }
        };
        self.markers.iter().any(|all| all.iter().all(|m| has(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_expert_indices_only() {
        let t = TensorSpec::new(
            "experts.{e}.w1.weight",
            "[f, d]",
            "experts.gate_up",
            Presence::Hub,
        );
        assert!(t.matches("experts.0.w1.weight"));
        assert!(t.matches("experts.12.w1.weight"));
        assert!(!t.matches("experts..w1.weight"));
        assert!(!t.matches("experts.x.w1.weight"));
        assert!(!t.matches("experts.0.w3.weight"));
        let plain = TensorSpec::new("gate.weight", "[E, d]", "router.gate", Presence::Required);
        assert!(plain.matches("gate.weight") && !plain.matches("x.gate.weight"));
    }

    #[test]
    fn markers_need_every_entry_of_one_list() {
        let v = InspectView {
            router: &["router.layer.weight"],
            markers: &[&["input_linear.weight", "=bias"]],
            priority: 1,
        };
        assert!(v.matches(["input_linear.weight", "bias"]));
        assert!(!v.matches(["input_linear.weight", "x.bias"]));
        assert!(!v.matches(["bias"]));
    }
}
