//! # moe-models
//!
//! Presets that build a [`moe_core::MoeLayer`] from a Hugging Face checkpoint. This first version names the nine
//! families the project reproduces and maps HF `model_type` strings to them; the safetensors loader and the
//! per-family builders come with the presets issue.

/// A Hugging Face MoE family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Family {
    /// `MixtralSparseMoeBlock`.
    Mixtral,
    /// `Qwen2MoeSparseMoeBlock` (and Qwen3-MoE's config).
    Qwen2Moe,
    /// `OlmoeSparseMoeBlock`.
    Olmoe,
    /// `DeepseekV3MoE`.
    DeepseekV3,
    /// `SwitchTransformersSparseMLP`.
    SwitchTransformers,
    /// `NllbMoeSparseMLP`.
    NllbMoe,
    /// `GraniteMoeMoE`.
    GraniteMoe,
    /// `JetMoeMoE`.
    JetMoe,
    /// `GptOssMLP`.
    GptOss,
}

impl Family {
    /// Every family, in the fixtures' order.
    pub const ALL: [Family; 9] = [
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Olmoe,
        Family::DeepseekV3,
        Family::SwitchTransformers,
        Family::NllbMoe,
        Family::GraniteMoe,
        Family::JetMoe,
        Family::GptOss,
    ];

    /// The family of an HF `config.json` `model_type`, if it is one of ours.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "mixtral" => Family::Mixtral,
            "qwen2_moe" | "qwen3_moe" => Family::Qwen2Moe,
            "olmoe" => Family::Olmoe,
            "deepseek_v3" => Family::DeepseekV3,
            "switch_transformers" => Family::SwitchTransformers,
            "nllb_moe" => Family::NllbMoe,
            "granitemoe" => Family::GraniteMoe,
            "jetmoe" => Family::JetMoe,
            "gpt_oss" => Family::GptOss,
            _ => return None,
        })
    }

    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Olmoe => "olmoe",
            Family::DeepseekV3 => "deepseek_v3",
            Family::SwitchTransformers => "switch_transformers",
            Family::NllbMoe => "nllb_moe",
            Family::GraniteMoe => "granitemoe",
            Family::JetMoe => "jetmoe",
            Family::GptOss => "gpt_oss",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_types_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
        }
        assert_eq!(Family::from_model_type("qwen3_moe"), Some(Family::Qwen2Moe));
        assert_eq!(Family::from_model_type("llama"), None);
    }
}
