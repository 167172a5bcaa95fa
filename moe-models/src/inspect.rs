//! What a checkpoint holds: its family (from `config.json`, else guessed from tensor names), its MoE config, and
//! the tensors of each MoE block, found by the router's name (`gate.weight`, `router.weight`, ...). What marks a
//! block and what identifies a family are stated by each family's descriptor ([`crate::Preset::inspect`]).

use std::path::{Path, PathBuf};

use moe_routers::TopKPreset;

use crate::checkpoint::Checkpoint;
use crate::config::{HfConfig, MoeConfig};
use crate::error::LoadError;
use crate::files::read_json;
use crate::presets::{Family, Setting};
use crate::quant::QuantizationConfig;

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
    /// The values the preset will build with, defaults resolved ([`effective`]); empty without a config.
    pub effective: Vec<Effective>,
    /// Total number of tensors.
    pub n_tensors: usize,
    /// The MoE blocks, in name order.
    pub blocks: Vec<BlockInfo>,
}

/// One value the preset will use, with its default resolved: `renormalize` `true` for Mixtral.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Effective {
    /// The setting, by the project's name (`top_k`, `renormalize`, `scaling`).
    pub name: &'static str,
    /// Its value as the builder takes it (`true`, `2.5`, `score_then_top_k`, `none`).
    pub value: String,
}

/// The routing values the family's builder uses for `cfg`, each default resolved as the builder resolves it
/// (the softmax top-k families through their [`TopKPreset`]; a test builds every fixture and checks these against
/// the router it gets).
pub fn effective(cfg: &MoeConfig) -> Vec<Effective> {
    let mut v = vec![
        ("experts", cfg.n_experts.to_string()),
        ("top_k", cfg.top_k.to_string()),
    ];
    // What `SoftmaxTopKConfig::build` takes for a preset, with the builder's overrides.
    let topk = |preset: TopKPreset, renormalize: Option<bool>, scaling: Option<f32>| {
        let base = preset.config();
        vec![
            ("score", snake(base.score.unwrap_or_default())),
            ("order", snake(base.order.unwrap_or_default())),
            (
                "renormalize",
                renormalize.or(base.renormalize).unwrap_or(true).to_string(),
            ),
            (
                "scaling",
                scaling.or(base.scaling).unwrap_or(1.0).to_string(),
            ),
        ]
    };
    let optional = |v: Option<usize>, what: &str| match v {
        Some(0) => "none".to_string(),
        Some(n) => format!("{n} ({what} required)"),
        None => "loaded when present".to_string(),
    };
    let bias = |b: Option<bool>| match b {
        Some(true) => "required".to_string(),
        Some(false) => "none".to_string(),
        None => "loaded when present".to_string(),
    };
    match cfg.family {
        Family::Mixtral => v.extend(topk(TopKPreset::Mixtral, cfg.renormalize, None)),
        Family::Olmoe => v.extend(topk(
            TopKPreset::Olmoe,
            Some(cfg.renormalize.unwrap_or(false)),
            None,
        )),
        Family::Qwen2Moe => {
            v.extend(topk(
                TopKPreset::Qwen2Moe,
                Some(cfg.renormalize.unwrap_or(false)),
                None,
            ));
            v.push((
                "shared_expert",
                optional(cfg.shared_expert_size, "the shared expert and its gate"),
            ));
        }
        Family::GraniteMoe | Family::JetMoe => v.extend(topk(TopKPreset::Granite, None, None)),
        Family::GptOss => {
            v.extend(topk(TopKPreset::Granite, None, None));
            v.push(("swiglu_limit", cfg.swiglu_limit.to_string()));
            v.push(("swiglu_alpha", cfg.swiglu_alpha.to_string()));
        }
        Family::DeepseekV3 => {
            v.extend(topk(
                TopKPreset::DeepseekV3,
                Some(cfg.renormalize.unwrap_or(true)),
                Some(cfg.routed_scaling_factor.unwrap_or(1.0)),
            ));
            let g = cfg.n_group.unwrap_or(1);
            v.push(("n_group", g.to_string()));
            v.push(("topk_group", cfg.topk_group.unwrap_or(g).to_string()));
            v.push((
                "shared_experts",
                optional(cfg.n_shared_experts, "the shared experts"),
            ));
        }
        Family::SwitchTransformers => {
            v.push((
                "capacity",
                cfg.expert_capacity
                    .map_or("missing: loading fails".into(), |c| {
                        format!("{c} per expert per sequence")
                    }),
            ));
            v.push(("router_bias", bias(cfg.router_bias)));
        }
        Family::NllbMoe => {
            let capacity = match (cfg.capacity_fraction, cfg.expert_capacity) {
                (Some(f), _) if f > 0.0 => format!("ceil({f} × tokens) per expert"),
                (f, Some(c)) => format!(
                    "{c} per expert{}",
                    f.map(|f| format!(" (fraction {f} ≤ 0 is off, as in transformers)"))
                        .unwrap_or_default()
                ),
                _ => "missing: loading fails".into(),
            };
            v.push(("capacity", capacity));
            v.push(("token_dropout", cfg.token_dropout.to_string()));
            v.push(("batch_prioritized", cfg.batch_prioritized.to_string()));
            v.push((
                "normalize_before_dropping",
                cfg.normalize_before_dropping.to_string(),
            ));
            v.push(("router_bias", bias(cfg.router_bias)));
        }
    }
    // The experts' packed format (routers stay f32): `moe_models::ExpertWeights::Checkpoint` keeps it.
    match cfg.quantization {
        Some(QuantizationConfig::Mxfp4) => v.push((
            "expert_weights",
            "mxfp4 (E2M1, one E8M0 scale per 32; 4.25 bits a weight, kept packed)".into(),
        )),
        Some(QuantizationConfig::Fp8 {
            weight_block_size: [r, c],
        }) => v.push((
            "expert_weights",
            format!("fp8 e4m3, one f32 scale per {r} × {c} block (kept packed)"),
        )),
        None => {}
    }
    v.into_iter()
        .map(|(name, value)| Effective { name, value })
        .collect()
}

/// A serde enum's snake_case name (`score_then_top_k`).
fn snake<T: serde::Serialize>(v: T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// Checks each block's router tensor against the config's expert count: `E` is its first axis, so a config
/// claiming more (or fewer) experts than the checkpoint holds is refused before anything is sized by it.
fn check_experts(
    ckpt: &Checkpoint,
    cfg: &MoeConfig,
    hf: &HfConfig,
    cfg_path: &Path,
    blocks: &[BlockInfo],
) -> Result<(), LoadError> {
    let preset = cfg.family.preset();
    // The field as `config.json` spells it (the alias read), else the class's own name.
    let names = preset
        .config_for(hf.model_type().unwrap_or_default())
        .iter()
        .find(|f| f.sets == Setting::NExperts)
        .map(|f| f.hf)
        .unwrap_or_default();
    let field = hf
        .first_of(names)
        .map(|(n, _)| n)
        .or(names.first().copied())
        .unwrap_or("num_experts");
    for b in blocks {
        let Some(router) = preset
            .inspect
            .router
            .iter()
            .map(|r| format!("{}{r}", b.prefix))
            .find(|n| ckpt.contains(n))
        else {
            continue;
        };
        let shape = ckpt.shape(&router)?;
        if shape.first() != Some(&cfg.n_experts) {
            return Err(LoadError::config(
                cfg_path,
                field,
                format!(
                    "{} experts, but the router tensor {router} has shape {shape:?}",
                    cfg.n_experts
                ),
            ));
        }
    }
    Ok(())
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
/// The [`LoadError`]s of [`Checkpoint::open`] and [`MoeConfig::from_file`] (the config validated as loading
/// validates it); [`LoadError::Config`] naming the expert-count field when a block's router tensor does not have
/// that many rows.
pub fn inspect(path: impl AsRef<Path>) -> Result<Inspection, LoadError> {
    let path = path.as_ref();
    let ckpt = Checkpoint::open(path)?;
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let cfg_path = dir.join("config.json");
    // Anything at `config.json` is read (a directory or device there is an error, not skipped).
    let hf: Option<HfConfig> = if cfg_path.symlink_metadata().is_ok() {
        Some(read_json(&cfg_path)?)
    } else {
        None
    };
    let config = match &hf {
        Some(hf) => Some(MoeConfig::from_hf(hf, &cfg_path)?),
        None => None,
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
    if let (Some(c), Some(hf)) = (&config, &hf) {
        check_experts(&ckpt, c, hf, &cfg_path, &blocks)?;
    }
    let family = config.as_ref().map(|c| c.family).or_else(|| {
        blocks
            .first()
            .and_then(|b| detect_family(b.tensors.iter().map(|t| t.name.as_str())))
    });
    Ok(Inspection {
        path: path.to_path_buf(),
        family,
        effective: config.as_ref().map(effective).unwrap_or_default(),
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
