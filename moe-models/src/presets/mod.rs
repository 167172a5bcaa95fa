//! One file per Hugging Face family, and the table that lists them.
//!
//! Each family file (`mixtral.rs`, `nllb_moe.rs`, ...) exports `PRESET`, a [`Preset`]: the `config.json` fields it
//! reads with transformers' defaults, its tensor names (as constants, listed in [`Preset::tensors`]), its builder
//! (config + tensors → [`MoeLayer`], recording each parameter's checkpoint name) and its [`InspectView`]. The table
//! below, one line per family, declares the file, the [`Family`] variant and the lookup; nothing else in the crate
//! names a family. Adding a family is one file here, one line in the table, and one case in the fixture generator
//! (`tests/fixtures/hf/generate.py`); see the README's "Adding a model family".
//!
//! Family files depend on [`descriptor`] and `parts` (the crate-private loader they share) only, never on each
//! other or on this module.

pub mod descriptor;
pub(crate) mod packed;
pub(crate) mod parts;

use moe_core::MoeLayer;

pub use descriptor::{
    BuildFn, ConfigField, HfDefault, InspectView, Presence, Preset, Setting, TensorSpec,
};

use crate::checkpoint::Weights;
use crate::config::MoeConfig;
use crate::error::LoadError;

/// Declares the family files, the [`Family`] enum and its table of [`Preset`]s from one line per family:
/// `/// doc` `Variant => module,` where `module.rs` exports `pub const PRESET: Preset`.
macro_rules! families {
    ($($(#[doc = $doc:literal])* $variant:ident => $module:ident,)*) => {
        $(pub mod $module;)*

        /// A Hugging Face MoE family: one line of the table in [`crate::presets`].
        /// Serialised as its canonical `model_type` (`jetmoe`), the name `moe list` and `moe inspect` print.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Family {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Family {
            /// Every family, in the table's (and the fixtures') order.
            pub const ALL: [Family; [$(stringify!($variant)),*].len()] = [$(Family::$variant),*];

            /// The family's descriptor.
            pub fn preset(self) -> &'static Preset {
                match self {
                    $(Family::$variant => &$module::PRESET,)*
                }
            }
        }
    };
}

families! {
    /// `MixtralSparseMoeBlock`.
    Mixtral => mixtral,
    /// `Qwen2MoeSparseMoeBlock` (and Qwen3-MoE's config).
    Qwen2Moe => qwen2_moe,
    /// `OlmoeSparseMoeBlock`.
    Olmoe => olmoe,
    /// `DeepseekV3MoE`.
    DeepseekV3 => deepseek_v3,
    /// `SwitchTransformersSparseMLP`.
    SwitchTransformers => switch_transformers,
    /// `NllbMoeSparseMLP`.
    NllbMoe => nllb_moe,
    /// `GraniteMoeMoE`.
    GraniteMoe => granitemoe,
    /// `JetMoeMoE`.
    JetMoe => jetmoe,
    /// `GptOssMLP`.
    GptOss => gpt_oss,
}

impl serde::Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.model_type())
    }
}

impl Family {
    /// The family of an HF `config.json` `model_type`, if it is one of ours.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.preset().model_types.contains(&model_type))
    }

    /// The HF `model_type` string (the canonical one: `qwen2_moe` for Qwen3-MoE too).
    pub fn model_type(self) -> &'static str {
        self.preset().model_type()
    }
}

/// Builds the MoE block of `cfg.family` from the tensors under `w`'s prefix, with the family's builder
/// ([`Preset::build`]). Every parameter of the layer records the checkpoint name it was read from
/// ([`moe_core::Param::hf_name`]; the name forms are described in the crate docs).
///
/// # Errors
/// [`LoadError::MissingTensor`], [`LoadError::Shape`], [`LoadError::Dtype`] for the checkpoint,
/// [`LoadError::Config`] for a setting the family cannot run, [`LoadError::Layer`] when moe-core rejects the
/// settings (`k > E`, groups that do not divide `E`).
pub fn build_layer(cfg: &MoeConfig, w: &Weights<'_>) -> Result<MoeLayer, LoadError> {
    (cfg.family.preset().build)(cfg, w)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn model_types_round_trip() {
        for f in Family::ALL {
            assert_eq!(Family::from_model_type(f.model_type()), Some(f));
        }
        assert_eq!(Family::from_model_type("qwen3_moe"), Some(Family::Qwen2Moe));
        assert_eq!(Family::from_model_type("llama"), None);
    }

    #[test]
    fn descriptors_are_consistent() {
        let mut model_types = BTreeSet::new();
        let mut priorities = BTreeSet::new();
        for f in Family::ALL {
            let p = f.preset();
            for m in p.model_types {
                assert!(model_types.insert(*m), "{m} claimed twice");
            }
            assert!(
                priorities.insert(p.inspect.priority),
                "{f:?}: priority taken"
            );
            assert!(p.layer_prefix.contains("{layer}"), "{f:?}");
            assert!(p.layer_prefix(3).contains(".3."), "{f:?}");
            let sets: Vec<Setting> = p.config.iter().map(|c| c.sets).collect();
            assert!(
                sets.contains(&Setting::NExperts),
                "{f:?} reads no expert count"
            );
            assert!(
                p.fixed_top_k.is_some() != sets.contains(&Setting::TopK),
                "{f:?}: k is fixed or read, not both"
            );
            for r in p.inspect.router {
                assert!(
                    p.tensors
                        .iter()
                        .any(|t| t.name == *r && t.param == "router.gate"),
                    "{f:?}: router name {r} is not a router.gate tensor"
                );
            }
        }
    }
}
