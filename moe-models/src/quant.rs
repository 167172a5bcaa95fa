//! Quantised and 16-bit checkpoints: the `quantization_config` of `config.json` ([`QuantizationConfig`]) and the
//! format the loader keeps expert weights in ([`ExpertWeights`]).
//!
//! | checkpoint | expert tensors (under the block prefix) | [`ExpertWeights::Checkpoint`] loads |
//! | --- | --- | --- |
//! | GPT-OSS MXFP4 (`"quant_method": "mxfp4"`) | `experts.gate_up_proj_blocks` U8 `[E, 2f, d/32, 16]`, `_scales` U8 `[E, 2f, d/32]`, `experts.down_proj_blocks` `[E, d, f/32, 16]`, `_scales` `[E, d, f/32]`, biases BF16 / F32 | `PackedBank` MXFP4 (bytes as in the file) |
//! | DeepSeek-V3 FP8 (`"quant_method": "fp8"`) | `experts.{e}.{gate,up,down}_proj.weight` F8_E4M3 with `.weight_scale_inv` F32 (BF16 / F16 read exactly) `[⌈out/128⌉, ⌈in/128⌉]` (or transformers' fused `experts.gate_up_proj` / `_scale_inv`), shared experts likewise | `PackedBank` FP8 with block scales |
//! | BF16 / F16 | the family's usual names | `PackedBank` BF16 / F16 |
//! | F32 | the family's usual names | the f32 bank |
//!
//! [`ExpertWeights::F32`] widens every one of them to the f32 bank instead (each weight decoded exactly, one f32
//! rounding: the bank equals `PackedBank::dequantize` of the packed load). Routers, gate biases and DeepSeek's
//! `e_score_correction_bias` are f32 in every case. Sources: transformers 5.23 `integrations/mxfp4.py`
//! (`convert_moe_packed_tensors`), `integrations/finegrained_fp8.py` and `utils/quantization_config.py`
//! (`FineGrainedFP8Config`); DeepSeek-V3's `config.json`.

use std::path::Path;

use moe_core::WeightFormat;
use serde_json::Value;

use crate::error::LoadError;
use crate::presets::Family;

/// The format the loader keeps expert weights (routed and shared) in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertWeights {
    /// The checkpoint's own format: MXFP4 and FP8 experts are kept packed, BF16 / F16 experts become packed
    /// BF16 / F16 banks (`moe_core::ExpertBank::Packed`), F32 experts the f32 bank. Inference only (a packed bank
    /// has no trainable parameters). Families with MLP experts (Switch, NLLB) and mixed-dtype banks load f32.
    Checkpoint,
    /// Every expert weight widened to f32 (the f32 bank of the family): what training and the f32 fixture checks
    /// need. The default of [`crate::MoeConfig::new`] and of every loader that takes no option.
    F32,
}

/// The `quantization_config` of a checkpoint's `config.json`: how its expert weights are quantised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "quant_method", rename_all = "lowercase")]
pub enum QuantizationConfig {
    /// GPT-OSS MXFP4 (`"quant_method": "mxfp4"`): E2M1 codes two a byte with one E8M0 scale per 32 values.
    Mxfp4,
    /// Fine-grained FP8 (`"quant_method": "fp8"`, DeepSeek-V3): E4M3 weights with one f32 multiplier
    /// (`weight_scale_inv`) per `weight_block_size[0] × weight_block_size[1]` block.
    Fp8 {
        /// `[rows, cols]` of a scale block (`[128, 128]` in DeepSeek-V3 and transformers' default).
        weight_block_size: [usize; 2],
    },
}

/// The families whose checkpoints may carry each `quant_method`.
const MXFP4_FAMILIES: &[Family] = &[Family::GptOss];
const FP8_FAMILIES: &[Family] = &[Family::DeepseekV3, Family::Qwen2Moe];

impl QuantizationConfig {
    /// The packed format of the expert weights.
    pub fn format(self) -> WeightFormat {
        match self {
            QuantizationConfig::Mxfp4 => WeightFormat::Mxfp4,
            QuantizationConfig::Fp8 { .. } => WeightFormat::Fp8,
        }
    }

    /// `mxfp4` or `fp8`.
    pub fn quant_method(self) -> &'static str {
        match self {
            QuantizationConfig::Mxfp4 => "mxfp4",
            QuantizationConfig::Fp8 { .. } => "fp8",
        }
    }

    /// Parses a `quantization_config` object found under `key` (`quantization_config`, or a fixture manifest's
    /// `cases[NAME].routing.quantization_config`) of `file`, for `family`. Read: `quant_method` (`mxfp4` or
    /// `fp8`, required); for `fp8` also `fmt` (`e4m3`, the default), `weight_block_size` (two positive integers,
    /// default `[128, 128]`), `activation_scheme` (`dynamic`, the default: activations are not quantised here) and
    /// `scale_fmt` (`float` or `ue8m0`: either way the scales are read from the F32 tensors). Other keys are
    /// ignored, as transformers ignores them for the weights.
    ///
    /// # Errors
    /// [`LoadError::Config`] naming `KEY.FIELD`: not an object, a field of the wrong JSON type, an unknown
    /// `quant_method`, `fmt` other than `e4m3`, a `weight_block_size` that is not two positive integers (`null`:
    /// per-tensor scales are not read), `activation_scheme` other than `dynamic`, a `quant_method` that `family`'s
    /// checkpoints cannot carry.
    pub fn from_json(v: &Value, key: &str, family: Family, file: &Path) -> Result<Self, LoadError> {
        let obj = v.as_object().ok_or_else(|| {
            LoadError::config(file, key, format!("expected an object, found {v}"))
        })?;
        let field = |name: &str| format!("{key}.{name}");
        let string = |name: &str| -> Result<Option<&str>, LoadError> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(LoadError::config(
                    file,
                    field(name),
                    format!("expected a string, found {other}"),
                )),
            }
        };
        let method = string("quant_method")?
            .ok_or_else(|| LoadError::config(file, field("quant_method"), "missing"))?;
        let q = match method {
            "mxfp4" => QuantizationConfig::Mxfp4,
            "fp8" => {
                if let Some(fmt) = string("fmt")?.filter(|f| *f != "e4m3") {
                    return Err(LoadError::config(
                        file,
                        field("fmt"),
                        format!("{fmt:?} is not supported (only \"e4m3\")"),
                    ));
                }
                if let Some(a) = string("activation_scheme")?.filter(|a| *a != "dynamic") {
                    return Err(LoadError::config(
                        file,
                        field("activation_scheme"),
                        format!("{a:?} is not supported (only \"dynamic\": activations stay f32)"),
                    ));
                }
                if let Some(s) = string("scale_fmt")?.filter(|s| !matches!(*s, "float" | "ue8m0")) {
                    return Err(LoadError::config(
                        file,
                        field("scale_fmt"),
                        format!("{s:?} is not one of \"float\", \"ue8m0\""),
                    ));
                }
                QuantizationConfig::Fp8 {
                    weight_block_size: block_size(obj.get("weight_block_size"), &field, file)?,
                }
            }
            other => {
                return Err(LoadError::config(
                    file,
                    field("quant_method"),
                    format!("{other:?} is not supported (one of: mxfp4, fp8)"),
                ));
            }
        };
        let allowed = match q {
            QuantizationConfig::Mxfp4 => MXFP4_FAMILIES,
            QuantizationConfig::Fp8 { .. } => FP8_FAMILIES,
        };
        if !allowed.contains(&family) {
            let names: Vec<&str> = allowed.iter().map(|f| f.model_type()).collect();
            return Err(LoadError::config(
                file,
                field("quant_method"),
                format!(
                    "{method:?} checkpoints of {} are not read (only {})",
                    family.model_type(),
                    names.join(", ")
                ),
            ));
        }
        Ok(q)
    }
}

/// `weight_block_size`: missing takes transformers' default `[128, 128]`.
fn block_size(
    v: Option<&Value>,
    field: &dyn Fn(&str) -> String,
    file: &Path,
) -> Result<[usize; 2], LoadError> {
    let Some(v) = v else {
        return Ok(moe_core::quant::FP8_BLOCK);
    };
    let bad = || {
        LoadError::config(
            file,
            field("weight_block_size"),
            format!("expected two positive integers [rows, cols], found {v}"),
        )
    };
    let items = v.as_array().filter(|a| a.len() == 2).ok_or_else(bad)?;
    let mut out = [0usize; 2];
    for (o, item) in out.iter_mut().zip(items) {
        *o = item
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(bad)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, family: Family) -> Result<QuantizationConfig, LoadError> {
        let v: Value = serde_json::from_str(json).expect("json");
        QuantizationConfig::from_json(&v, "quantization_config", family, Path::new("config.json"))
    }

    fn field_of(e: &LoadError) -> String {
        match e {
            LoadError::Config { field, .. } => field.clone(),
            other => panic!("not a config error: {other}"),
        }
    }

    #[test]
    fn deepseek_and_gpt_oss_configs_parse() {
        let q = parse(
            r#"{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 64],
                "activation_scheme": "dynamic"}"#,
            Family::DeepseekV3,
        )
        .expect("fp8");
        assert_eq!(
            q,
            QuantizationConfig::Fp8 {
                weight_block_size: [128, 64]
            }
        );
        let q = parse(r#"{"quant_method": "fp8"}"#, Family::DeepseekV3).expect("defaults");
        assert_eq!(
            q,
            QuantizationConfig::Fp8 {
                weight_block_size: [128, 128]
            }
        );
        let q = parse(
            r#"{"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}"#,
            Family::GptOss,
        )
        .expect("mxfp4");
        assert_eq!(
            (q, q.format()),
            (QuantizationConfig::Mxfp4, WeightFormat::Mxfp4)
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            (
                r#"{"quant_method": "gptq"}"#,
                "quantization_config.quant_method",
            ),
            (r#"{"fmt": "e4m3"}"#, "quantization_config.quant_method"),
            (r#"{"quant_method": 8}"#, "quantization_config.quant_method"),
            (
                r#"{"quant_method": "fp8", "fmt": "e5m2"}"#,
                "quantization_config.fmt",
            ),
            (
                r#"{"quant_method": "fp8", "fmt": 4}"#,
                "quantization_config.fmt",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": [128]}"#,
                "quantization_config.weight_block_size",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": [128, 0]}"#,
                "quantization_config.weight_block_size",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": [128, -1]}"#,
                "quantization_config.weight_block_size",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": [128, 1.5]}"#,
                "quantization_config.weight_block_size",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": null}"#,
                "quantization_config.weight_block_size",
            ),
            (
                r#"{"quant_method": "fp8", "activation_scheme": "static"}"#,
                "quantization_config.activation_scheme",
            ),
            (r#"["fp8"]"#, "quantization_config"),
        ];
        for (json, key) in cases {
            let e = parse(json, Family::DeepseekV3).expect_err(json);
            assert_eq!(field_of(&e), key, "{json}: {e}");
        }
    }

    #[test]
    fn a_family_that_cannot_carry_the_method_is_refused() {
        let e = parse(r#"{"quant_method": "mxfp4"}"#, Family::Mixtral).expect_err("mixtral");
        assert_eq!(field_of(&e), "quantization_config.quant_method");
        assert!(e.to_string().contains("mixtral"), "{e}");
        let e = parse(r#"{"quant_method": "fp8"}"#, Family::GptOss).expect_err("gpt-oss");
        assert!(e.to_string().contains("gpt_oss"), "{e}");
    }
}
