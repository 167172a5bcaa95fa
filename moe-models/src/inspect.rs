//! What a checkpoint holds: its family (from `config.json`, else guessed from tensor names), its MoE config, and
//! the tensors of each MoE block, found by the router's name (`gate.weight`, `router.weight`, ...). What marks a
//! block and what identifies a family are stated by each family's descriptor ([`crate::Preset::inspect`]).

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::presets::Family;

/// Router tensor names that mark an MoE block (every family's
/// [`InspectView::router`](crate::presets::InspectView::router), longest first); the block prefix is what precedes
/// them.
fn router_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Family::ALL
        .iter()
        .flat_map(|f| f.preset().inspect.router.iter().copied())
        .collect();
    names.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    names.dedup();
    names
}

/// One tensor of a block.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorInfo {
    /// Name without the block prefix.
    pub name: String,
    /// Dtype (`F32`, `BF16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One MoE block of the checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockInfo {
    /// The block prefix (`model.layers.3.block_sparse_moe.`, `""` for a bare block).
    pub prefix: String,
    /// Its tensors.
    pub tensors: Vec<TensorInfo>,
}

/// The result of [`inspect`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Inspection {
    /// What was opened.
    pub path: PathBuf,
    /// The family, from `config.json` or guessed from the names.
    pub family: Option<Family>,
    /// The MoE config, when a `config.json` was found.
    pub config: Option<MoeConfig>,
    /// Total number of tensors.
    pub n_tensors: usize,
    /// The MoE blocks, in name order.
    pub blocks: Vec<BlockInfo>,
}

/// Guesses the family of a block from its tensor names (unprefixed): the family of highest
/// [`InspectView::priority`](crate::presets::InspectView::priority) whose markers match
/// ([`InspectView::matches`](crate::presets::InspectView::matches)). OLMoE and Mixtral v5 blocks look alike and are
/// reported as Mixtral.
pub fn detect_family<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Option<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| f.preset().inspect.matches(names.clone()))
        .max_by_key(|f| f.preset().inspect.priority)
}

/// Inspects a checkpoint (file, index or directory). A `config.json` in the directory (or next to the file) gives
/// the family and config.
///
/// # Errors
/// The [`LoadError`]s of [`Checkpoint::open`] and [`MoeConfig::from_file`].
pub fn inspect(path: impl AsRef<Path>) -> Result<Inspection, LoadError> {
    let path = path.as_ref();
    let ckpt = Checkpoint::open(path)?;
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let cfg_path = dir.join("config.json");
    let config = if cfg_path.is_file() {
        Some(MoeConfig::from_file(&cfg_path)?)
    } else {
        None
    };
    let routers = router_names();
    let mut prefixes: Vec<String> = ckpt
        .names()
        .filter_map(|n| {
            routers
                .iter()
                .find_map(|r| n.strip_suffix(r))
                .filter(|p| p.is_empty() || p.ends_with('.'))
                .map(str::to_string)
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    // A longer router name (`router.layer.weight`) also ends with a shorter one's tail; keep the outermost prefix.
    let outer: Vec<String> = prefixes
        .iter()
        .filter(|p| {
            !prefixes
                .iter()
                .any(|q| q != *p && p.starts_with(q.as_str()) && !q.is_empty())
        })
        .cloned()
        .collect();
    let mut blocks = Vec::new();
    for prefix in outer {
        let mut tensors = Vec::new();
        for n in ckpt.names().filter(|n| n.starts_with(&prefix)) {
            if n.starts_with("ref.") {
                continue;
            }
            tensors.push(TensorInfo {
                name: n.strip_prefix(prefix.as_str()).unwrap_or(n).to_string(),
                dtype: ckpt.dtype(n)?,
                shape: ckpt.shape(n)?,
            });
        }
        blocks.push(BlockInfo { prefix, tensors });
    }
    let family = config.as_ref().map(|c| c.family).or_else(|| {
        blocks
            .first()
            .and_then(|b| detect_family(b.tensors.iter().map(|t| t.name.as_str())))
    });
    Ok(Inspection {
        path: path.to_path_buf(),
        family,
        config,
        n_tensors: ckpt.names().count(),
        blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_is_detected_from_its_names() {
        let cases: [(&[&str], Family); 10] = [
            (
                &["gate.weight", "experts.gate_up_proj", "experts.down_proj"],
                Family::Mixtral,
            ),
            (&["gate.weight", "experts.0.w1.weight"], Family::Mixtral),
            (
                &["gate.weight", "experts.0.gate_proj.weight"],
                Family::Olmoe,
            ),
            (
                &[
                    "gate.weight",
                    "experts.gate_up_proj",
                    "shared_expert.gate_proj.weight",
                ],
                Family::Qwen2Moe,
            ),
            (
                &[
                    "gate.weight",
                    "gate.e_score_correction_bias",
                    "shared_experts.up_proj.weight",
                ],
                Family::DeepseekV3,
            ),
            (
                &["router.classifier.weight", "experts.expert_0.wi.weight"],
                Family::SwitchTransformers,
            ),
            (
                &["router.classifier.weight", "experts.expert_0.fc1.weight"],
                Family::NllbMoe,
            ),
            (
                &["router.layer.weight", "input_linear.weight"],
                Family::GraniteMoe,
            ),
            (
                &["router.layer.weight", "input_linear.weight", "bias"],
                Family::JetMoe,
            ),
            (
                &["router.weight", "router.bias", "experts.gate_up_proj_bias"],
                Family::GptOss,
            ),
        ];
        for (names, family) in cases {
            assert_eq!(
                detect_family(names.iter().copied()),
                Some(family),
                "{names:?}"
            );
        }
        assert_eq!(detect_family(["lm_head.weight"]), None);
    }

    #[test]
    fn router_names_cover_every_family_longest_first() {
        let names = router_names();
        for n in [
            "router.classifier.weight",
            "router.layer.weight",
            "router.weight",
            "gate.weight",
        ] {
            assert!(names.contains(&n), "{n} in {names:?}");
        }
        assert!(
            names.windows(2).all(|w| w[0].len() >= w[1].len()),
            "{names:?}"
        );
    }
}
