//! Configuration: [`HfConfig`], an HF `config.json` as read, and [`MoeConfig`], the family-independent settings a
//! preset is built from. Which HF fields a family reads, and transformers' default for each, is stated by the
//! family's descriptor ([`crate::Preset::config`]); HF names appear only there.

use std::path::Path;

use crate::error::LoadError;
use crate::files::read_json;
use crate::presets::{Family, HfDefault, Setting};
use crate::quant::{ExpertWeights, QuantizationConfig};

/// An HF `config.json`, as read: its fields by HF name. Each family's
/// [`Preset::config`](crate::Preset::config) says which fields it reads and transformers' default for each; unknown
/// fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(transparent)]
pub struct HfConfig {
    /// The fields.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl HfConfig {
    /// `model_type`, if it is a string.
    pub fn model_type(&self) -> Option<&str> {
        self.fields
            .get("model_type")
            .and_then(serde_json::Value::as_str)
    }

    /// The first of `names` present with a non-null value, with its name.
    pub fn first_of<'n>(&self, names: &[&'n str]) -> Option<(&'n str, &serde_json::Value)> {
        names.iter().find_map(|n| {
            self.fields
                .get(*n)
                .filter(|v| !v.is_null())
                .map(|v| (*n, v))
        })
    }
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
    /// Qwen2-MoE: the shared expert's width (`shared_expert_intermediate_size`); `Some(0)` means no shared expert
    /// (and `qwen3_moe`); `Some(_)` requires the shared expert and its gate; `None` (not stated) loads them when
    /// present.
    pub shared_expert_size: Option<usize>,
    /// DeepSeek-V3: `n_shared_experts`; `Some(0)` means none, `Some(_)` requires them, `None` loads them when
    /// present.
    pub n_shared_experts: Option<usize>,
    /// Switch / NLLB: whether the router classifier has a bias (`router_bias`); `Some(true)` requires it,
    /// `Some(false)` ignores a bias tensor (transformers builds no bias), `None` loads it when present.
    pub router_bias: Option<bool>,
    /// `quantization_config`: how the checkpoint's expert weights are quantised (MXFP4, FP8 blocks); `None` for
    /// unquantised checkpoints ([`QuantizationConfig::from_json`]).
    pub quantization: Option<QuantizationConfig>,
    /// The format the expert weights are kept in once loaded: [`ExpertWeights::F32`] (widened, the default of
    /// [`MoeConfig::new`], [`MoeConfig::from_file`] and the manifest reader) or [`ExpertWeights::Checkpoint`] (the
    /// file's format, packed). Not read from any file: a load option ([`MoeConfig::with_expert_weights`]).
    pub expert_weights: ExpertWeights,
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
            shared_expert_size: None,
            n_shared_experts: None,
            router_bias: None,
            quantization: None,
            expert_weights: ExpertWeights::F32,
        }
    }

    /// The config with expert weights kept as `experts` says (see [`MoeConfig::expert_weights`]).
    pub fn with_expert_weights(mut self, experts: ExpertWeights) -> Self {
        self.expert_weights = experts;
        self
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

    /// Converts an HF config; `file` names it in errors. The family's [`Preset::config`](crate::Preset::config)
    /// fields are read under their HF names; a missing (or `null`) field takes transformers' default
    /// ([`HfDefault`]).
    ///
    /// # Errors
    /// [`LoadError::UnknownFamily`] for a `model_type` that is not a family; [`LoadError::Config`] for a field of
    /// the wrong JSON type or a negative count, for NLLB's `second_expert_policy` other than `all`, and for a
    /// `quantization_config` that [`QuantizationConfig::from_json`] refuses (named `quantization_config.KEY`).
    pub fn from_hf(hf: &HfConfig, file: &Path) -> Result<Self, LoadError> {
        let model_type = hf.model_type().unwrap_or_default();
        let family =
            Family::from_model_type(model_type).ok_or_else(|| LoadError::UnknownFamily {
                file: file.to_path_buf(),
                model_type: model_type.to_string(),
                known: Family::ALL.map(Family::model_type).join(", "),
            })?;
        let preset = family.preset();
        let mut c = MoeConfig::new(family, 0, preset.fixed_top_k.unwrap_or(0));
        for field in preset.config_for(model_type) {
            let value = match hf.first_of(field.hf) {
                Some((name, v)) => FieldValue::read(v, field.sets, name, file)?,
                None => FieldValue::from_default(field.default),
            };
            let name = field.hf.first().copied().unwrap_or_default();
            c.apply(field.sets, value, name, file)?;
        }
        if let Some(q) = hf
            .fields
            .get("quantization_config")
            .filter(|v| !v.is_null())
        {
            c.quantization = Some(QuantizationConfig::from_json(
                q,
                "quantization_config",
                family,
                file,
            )?);
        }
        c.validate(file)?;
        Ok(c)
    }

    /// Converts a golden-fixture manifest case's `routing` object (case `case` of `file`) for `model_type`. Only
    /// the settings the family's config table reads are taken, each under its manifest key
    /// ([`manifest_keys`]); the others are ignored, as transformers ignores them (a Mixtral case's
    /// `norm_topk_prob`). A missing or `null` key leaves the setting unset (the builder's rule applies), except
    /// `num_experts` and a family's `top_k`, which are required. Under `capacity` a string is the generator's
    /// description of a rule (NLLB), not a count, and is skipped.
    ///
    /// # Errors
    /// [`LoadError::UnknownFamily`]; [`LoadError::Config`] naming `cases[NAME].routing.KEY` for a missing
    /// required key or a value of the wrong type (`expected a non-negative integer, found a string "2"`).
    pub fn from_manifest_routing(
        model_type: &str,
        routing: &serde_json::Value,
        file: &Path,
        case: &str,
    ) -> Result<Self, LoadError> {
        let family =
            Family::from_model_type(model_type).ok_or_else(|| LoadError::UnknownFamily {
                file: file.to_path_buf(),
                model_type: model_type.to_string(),
                known: Family::ALL.map(Family::model_type).join(", "),
            })?;
        let preset = family.preset();
        let mut c = MoeConfig::new(family, 0, preset.fixed_top_k.unwrap_or(0));
        for field in preset.config_for(model_type) {
            let keys = manifest_keys(field.sets);
            let found = keys
                .iter()
                .find_map(|k| routing.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)));
            let found = found.filter(|(k, v)| !(*k == "capacity" && v.is_string()));
            let key = keys.first().copied().unwrap_or_default();
            let value = match found {
                Some((k, v)) => {
                    FieldValue::read(v, field.sets, &format!("cases[{case}].routing.{k}"), file)?
                }
                None if matches!(field.sets, Setting::NExperts | Setting::TopK) => {
                    return Err(LoadError::config(
                        file,
                        format!("cases[{case}].routing.{key}"),
                        "missing",
                    ));
                }
                None => FieldValue::Unset,
            };
            c.apply(
                field.sets,
                value,
                &format!("cases[{case}].routing.{key}"),
                file,
            )?;
        }
        if let Some(q) = routing.get("quantization_config").filter(|v| !v.is_null()) {
            let key = format!("cases[{case}].routing.quantization_config");
            c.quantization = Some(QuantizationConfig::from_json(q, &key, family, file)?);
        }
        Ok(c)
    }

    /// Checks the settings against each other, as loading needs them: `E ≥ 1`, `1 ≤ k ≤ E`, groups that divide
    /// `E` with `1 ≤ topk_group ≤ n_group`, every number finite as an `f32`, and NLLB's token dropout in `[0, 1)`. `moe inspect` and loading run the
    /// same check.
    ///
    /// # Errors
    /// [`LoadError::Config`] naming the setting (by its project name) and the cause.
    pub fn validate(&self, file: &Path) -> Result<(), LoadError> {
        let err = |field: &str, reason: String| Err(LoadError::config(file, field, reason));
        if self.n_experts == 0 {
            return err("num_experts", "0 experts".into());
        }
        if self.top_k == 0 || self.top_k > self.n_experts {
            return err(
                "num_experts_per_tok",
                format!(
                    "k = {} is outside 1..={} (the expert count)",
                    self.top_k, self.n_experts
                ),
            );
        }
        if let Some(g) = self.n_group {
            if g == 0 || !self.n_experts.is_multiple_of(g) {
                return err(
                    "n_group",
                    format!("{g} groups do not divide {} experts", self.n_experts),
                );
            }
            if let Some(t) = self.topk_group.filter(|&t| t == 0 || t > g) {
                return err("topk_group", format!("{t} is outside 1..={g} (n_group)"));
            }
        }
        let floats = [
            (
                "routed_scaling_factor",
                self.routed_scaling_factor.map(f64::from),
            ),
            ("swiglu_limit", Some(f64::from(self.swiglu_limit))),
            ("swiglu_alpha", Some(f64::from(self.swiglu_alpha))),
            (
                "moe_eval_capacity_token_fraction",
                self.capacity_fraction.map(|v| v as f32 as f64),
            ),
            ("moe_token_dropout", Some(f64::from(self.token_dropout))),
        ];
        for (name, v) in floats {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return err(name, format!("{v} is not a finite f32"));
            }
        }
        // NLLB scales its eval output by `1 − p`: the builder refuses `p` outside `[0, 1)`, so does this.
        if self.family == Family::NllbMoe && !(0.0..1.0).contains(&self.token_dropout) {
            return err(
                "moe_token_dropout",
                format!("{} is outside [0, 1)", self.token_dropout),
            );
        }
        Ok(())
    }

    /// Sets `setting` to `value` (read from field `name` of `file`).
    fn apply(
        &mut self,
        setting: Setting,
        value: FieldValue,
        name: &str,
        file: &Path,
    ) -> Result<(), LoadError> {
        use FieldValue as V;
        match (setting, value) {
            (_, V::Unset) => {}
            (Setting::NExperts, V::Int(v)) => self.n_experts = v,
            (Setting::TopK, V::Int(v)) => self.top_k = v,
            (Setting::Renormalize, V::Bool(v)) => self.renormalize = Some(v),
            (Setting::NGroup, V::Int(v)) => self.n_group = Some(v),
            (Setting::TopkGroup, V::Int(v)) => self.topk_group = Some(v),
            (Setting::RoutedScaling, V::Float(v)) => self.routed_scaling_factor = Some(v as f32),
            (Setting::SwigluLimit, V::Float(v)) => self.swiglu_limit = v as f32,
            (Setting::SwigluAlpha, V::Float(v)) => self.swiglu_alpha = v as f32,
            (Setting::ExpertCapacity, V::Int(v)) => self.expert_capacity = Some(v),
            (Setting::CapacityFraction, V::Float(v)) => self.capacity_fraction = Some(v),
            (Setting::TokenDropout, V::Float(v)) => self.token_dropout = v as f32,
            (Setting::BatchPrioritized, V::Bool(v)) => self.batch_prioritized = v,
            (Setting::NormalizeBeforeDropping, V::Bool(v)) => self.normalize_before_dropping = v,
            (Setting::SharedExpertSize, V::Int(v)) => self.shared_expert_size = Some(v),
            (Setting::NSharedExperts, V::Int(v)) => self.n_shared_experts = Some(v),
            (Setting::RouterBias, V::Bool(v)) => self.router_bias = Some(v),
            (Setting::SecondExpertPolicy, V::Str(p)) => {
                if p != "all" {
                    return Err(LoadError::config(
                        file,
                        name,
                        format!("{p:?} is not supported (only \"all\", the eval behaviour)"),
                    ));
                }
            }
            (s, v) => {
                return Err(LoadError::config(
                    file,
                    name,
                    format!("{v:?} does not fit {s:?}"),
                ));
            }
        }
        Ok(())
    }

    /// The block prefix of layer `layer` in a full model checkpoint, as transformers names it
    /// (`model.layers.3.block_sparse_moe.`; [`Preset::layer_prefix`](crate::Preset::layer_prefix)).
    pub fn layer_prefix(&self, layer: usize) -> String {
        self.family.preset().layer_prefix(layer)
    }
}

/// The keys of a golden-fixture manifest's `routing` object that give `setting`, in order of precedence.
pub fn manifest_keys(setting: Setting) -> &'static [&'static str] {
    use Setting as S;
    match setting {
        S::NExperts => &["num_experts"],
        S::TopK => &["top_k"],
        S::Renormalize => &["norm_topk_prob"],
        S::NGroup => &["n_group"],
        S::TopkGroup => &["topk_group"],
        S::RoutedScaling => &["routed_scaling_factor"],
        S::SwigluLimit => &["swiglu_limit"],
        S::SwigluAlpha => &["swiglu_alpha"],
        S::ExpertCapacity => &["expert_capacity", "capacity"],
        S::CapacityFraction => &["moe_eval_capacity_token_fraction"],
        S::TokenDropout => &["moe_token_dropout"],
        S::BatchPrioritized => &["batch_prioritized_routing"],
        S::NormalizeBeforeDropping => &["normalize_router_prob_before_dropping"],
        S::SecondExpertPolicy => &["second_expert_policy"],
        S::SharedExpertSize => &["shared_expert_intermediate_size"],
        S::NSharedExperts => &["n_shared_experts"],
        S::RouterBias => &["router_bias"],
    }
}

/// `a string`, `a number`, ... for messages.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A config value, typed by the [`Setting`] it gives.
#[derive(Debug, Clone, PartialEq)]
enum FieldValue {
    Int(usize),
    Float(f64),
    Bool(bool),
    Str(String),
    Unset,
}

impl FieldValue {
    fn from_default(d: HfDefault) -> Self {
        match d {
            HfDefault::Int(v) => FieldValue::Int(v),
            HfDefault::Float(v) => FieldValue::Float(v),
            HfDefault::Bool(v) => FieldValue::Bool(v),
            HfDefault::Str(v) => FieldValue::Str(v.to_string()),
            HfDefault::Unset => FieldValue::Unset,
        }
    }

    /// Reads `v` (field `name` of `file`) as the type `setting` takes.
    fn read(
        v: &serde_json::Value,
        setting: Setting,
        name: &str,
        file: &Path,
    ) -> Result<Self, LoadError> {
        use Setting as S;
        let bad = |want: &str| {
            LoadError::config(
                file,
                name,
                format!("expected {want}, found {} {v}", json_kind(v)),
            )
        };
        Ok(match setting {
            S::NExperts
            | S::TopK
            | S::NGroup
            | S::TopkGroup
            | S::ExpertCapacity
            | S::SharedExpertSize
            | S::NSharedExperts => {
                let n = v.as_u64().ok_or_else(|| bad("a non-negative integer"))?;
                FieldValue::Int(usize::try_from(n).map_err(|_| bad("a smaller integer"))?)
            }
            S::RoutedScaling
            | S::SwigluLimit
            | S::SwigluAlpha
            | S::CapacityFraction
            | S::TokenDropout => FieldValue::Float(v.as_f64().ok_or_else(|| bad("a number"))?),
            S::Renormalize | S::BatchPrioritized | S::NormalizeBeforeDropping | S::RouterBias => {
                FieldValue::Bool(v.as_bool().ok_or_else(|| bad("true or false"))?)
            }
            S::SecondExpertPolicy => {
                FieldValue::Str(v.as_str().ok_or_else(|| bad("a string"))?.to_string())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<MoeConfig, LoadError> {
        let hf: HfConfig = serde_json::from_str(json).expect("json");
        MoeConfig::from_hf(&hf, Path::new("config.json"))
    }

    #[test]
    fn fields_are_read_under_their_hf_names() {
        let c = parse(
            r#"{"model_type": "deepseek_v3", "n_routed_experts": 16, "num_experts_per_tok": 4,
                "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5, "norm_topk_prob": false}"#,
        )
        .expect("config");
        assert_eq!(
            (c.family, c.n_experts, c.top_k),
            (Family::DeepseekV3, 16, 4)
        );
        assert_eq!((c.n_group, c.topk_group), (Some(4), Some(2)));
        assert_eq!(c.routed_scaling_factor, Some(1.5));
        assert_eq!(c.renormalize, Some(false));
        // An alias of transformers' attribute_map.
        let c =
            parse(r#"{"model_type": "olmoe", "num_local_experts": 4, "num_experts_per_tok": 2}"#)
                .expect("config");
        assert_eq!(c.n_experts, 4);
    }

    #[test]
    fn missing_fields_take_transformers_defaults() {
        let c = parse(r#"{"model_type": "mixtral"}"#).expect("config");
        assert_eq!((c.n_experts, c.top_k, c.renormalize), (8, 2, None));
        let c = parse(r#"{"model_type": "deepseek_v3", "n_group": null}"#).expect("config");
        assert_eq!((c.n_experts, c.top_k), (256, 8));
        assert_eq!((c.n_group, c.topk_group), (Some(8), Some(4)));
        assert_eq!(c.routed_scaling_factor, Some(2.5));
        let c = parse(r#"{"model_type": "nllb_moe", "num_experts": 4}"#).expect("config");
        assert_eq!((c.n_experts, c.top_k), (4, 2));
        assert_eq!(
            (c.capacity_fraction, c.expert_capacity),
            (Some(1.0), Some(64))
        );
        assert!((c.token_dropout - 0.2).abs() < 1e-7);
        let c = parse(r#"{"model_type": "switch_transformers"}"#).expect("config");
        assert_eq!((c.n_experts, c.top_k, c.expert_capacity), (8, 1, Some(64)));
        let c = parse(r#"{"model_type": "gpt_oss", "swiglu_limit": 5}"#).expect("config");
        assert_eq!((c.swiglu_limit, c.swiglu_alpha), (5.0, 1.702));
    }

    #[test]
    fn every_family_loads_from_its_defaults() {
        for f in Family::ALL {
            let c = parse(&format!(r#"{{"model_type": "{}"}}"#, f.model_type()))
                .unwrap_or_else(|e| panic!("{f:?}: {e}"));
            assert_eq!(c.family, f);
            assert!(c.n_experts >= 1 && c.top_k >= 1, "{f:?}: {c:?}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse(r#"{"model_type": "mixtral", "num_local_experts": "eight"}"#)
            .expect_err("string count");
        assert!(
            matches!(&e, LoadError::Config { field, .. } if field == "num_local_experts"),
            "{e}"
        );
        assert!(e.to_string().contains("\"eight\""), "{e}");
        let e = parse(r#"{"model_type": "qwen2_moe", "num_experts": -1}"#).expect_err("negative");
        assert!(e.to_string().contains("num_experts"), "{e}");
        let e = parse(r#"{"model_type": "nllb_moe", "second_expert_policy": "random"}"#)
            .expect_err("policy");
        assert!(e.to_string().contains("second_expert_policy"), "{e}");
        let e = parse(r#"{"model_type": "llama"}"#).expect_err("family");
        assert!(matches!(e, LoadError::UnknownFamily { .. }), "{e}");
    }

    #[test]
    fn layer_prefixes_come_from_the_descriptors() {
        let c = MoeConfig::new(Family::Mixtral, 8, 2);
        assert_eq!(c.layer_prefix(3), "model.layers.3.block_sparse_moe.");
        let c = MoeConfig::new(Family::NllbMoe, 8, 2);
        assert_eq!(c.layer_prefix(0), "model.encoder.layers.0.ffn.");
    }
}
