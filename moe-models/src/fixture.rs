//! The golden-fixture format (`tests/fixtures/hf`): a directory with `manifest.json` and one safetensors file per
//! case, holding the block's HF state dict (unprefixed) and `ref.*` reference tensors that transformers computed.
//! This module reads the format and builds each case's layer and input; running them on a backend and comparing
//! with the references is the `moe-verify` crate's work.

use std::path::{Path, PathBuf};

use moe_core::MoeLayer;
use ndarray::Array2;

use crate::checkpoint::Checkpoint;
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::files::{confined_path, read_json, require_regular, sha256_hex};
use crate::presets::build_layer;
use crate::quant::ExpertWeights;

/// `manifest.json`: the part the loader reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    /// The cases.
    pub cases: Vec<ManifestCase>,
}

impl Manifest {
    /// Reads `dir/manifest.json`.
    ///
    /// # Errors
    /// [`LoadError::Io`], [`LoadError::Json`].
    pub fn read(dir: &Path) -> Result<Self, LoadError> {
        read_json(&dir.join("manifest.json"))
    }
}

/// One case of the manifest.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ManifestCase {
    /// Case name (`mixtral`).
    pub name: String,
    /// The safetensors file, relative to the directory.
    pub file: String,
    /// The HF `model_type` (defaults to the name).
    #[serde(default)]
    pub model_family: Option<String>,
    /// Batch size `B`.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Sequence length `S`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// The routing config.
    #[serde(default)]
    pub routing: serde_json::Value,
    /// The case file's size in bytes, checked when present.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// The case file's SHA-256 digest (64 hex digits), checked when present.
    #[serde(default)]
    pub sha256: Option<String>,
}

impl ManifestCase {
    /// The case's HF `model_type` (`model_family`, else the name).
    pub fn model_type(&self) -> &str {
        self.model_family.as_deref().unwrap_or(&self.name)
    }

    /// `batch × seq_len` when the manifest gives both (`None` otherwise).
    ///
    /// # Errors
    /// [`LoadError::Config`] naming the case when the product overflows.
    pub fn n_tokens(&self, manifest: &Path) -> Result<Option<usize>, LoadError> {
        match (self.batch, self.seq_len) {
            (Some(b), Some(s)) => b.checked_mul(s).map(Some).ok_or_else(|| {
                LoadError::config(
                    manifest,
                    format!("cases[{}].batch × seq_len", self.name),
                    format!("{b} × {s} overflows"),
                )
            }),
            _ => Ok(None),
        }
    }

    /// The case file `dir/file`, checked: confined to `dir` ([`confined_path`]: no `..`, no absolute path, no
    /// symlink leading out), a regular file, and of the manifest's `bytes` and `sha256` when it records them.
    ///
    /// # Errors
    /// [`LoadError::OutsideDir`], [`LoadError::Io`] (missing, unreadable), [`LoadError::NotRegular`],
    /// [`LoadError::Integrity`] for a size or digest that differs, [`LoadError::Config`] for a `sha256` that is
    /// not 64 hex digits.
    pub fn checked_path(&self, dir: &Path) -> Result<PathBuf, LoadError> {
        let manifest = dir.join("manifest.json");
        let path = confined_path(dir, &self.file, &manifest)?;
        let len = require_regular(&path)?.len();
        let integrity = |field: &str, expected: String, found: String| LoadError::Integrity {
            file: path.clone(),
            manifest: manifest.clone(),
            field: field.into(),
            expected,
            found,
        };
        if let Some(want) = self.bytes
            && want != len
        {
            return Err(integrity("bytes", want.to_string(), len.to_string()));
        }
        if let Some(want) = &self.sha256 {
            let want = want.to_ascii_lowercase();
            if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(LoadError::config(
                    &manifest,
                    format!("cases[{}].sha256", self.name),
                    format!("expected 64 hex digits, found {:?}", self.sha256),
                ));
            }
            let found = sha256_hex(&path)?;
            if found != want {
                return Err(integrity("sha256", want, found));
            }
        }
        Ok(path)
    }
}

/// The preset config of a manifest case, from its `routing` object ([`MoeConfig::from_manifest_routing`]: the
/// family's settings only, each type-checked; a missing or `null` field leaves the setting unset).
///
/// # Errors
/// [`LoadError::UnknownFamily`], [`LoadError::Config`] for a missing `num_experts` / `top_k` or a field of the
/// wrong type.
pub fn case_config(case: &ManifestCase, manifest: &Path) -> Result<MoeConfig, LoadError> {
    MoeConfig::from_manifest_routing(case.model_type(), &case.routing, manifest, &case.name)
}

/// One case, loaded: its file, config, layer and input.
#[derive(Debug)]
pub struct FixtureCase {
    /// The case file.
    pub path: PathBuf,
    /// The preset config ([`case_config`]).
    pub config: MoeConfig,
    /// The case file, open (state dict and `ref.*`).
    pub checkpoint: Checkpoint,
    /// The layer built from the unprefixed state dict.
    pub layer: MoeLayer,
    /// `ref.input` as `[T, d]`, `T = B · S`.
    pub input: Array2<f32>,
    /// Batch size `B`.
    pub batch: usize,
    /// Sequence length `S` (every sequence of the batch has it).
    pub seq_len: usize,
}

impl FixtureCase {
    /// Opens case `case` of the fixture directory `dir` and builds its layer. `B` and `S` come from the manifest,
    /// else from `ref.input`'s shape `[B, S, d]`, else `B = 1`.
    ///
    /// # Errors
    /// [`LoadError`] when the case file is refused ([`ManifestCase::checked_path`]), the file or its tensors cannot
    /// be read, the preset cannot be built, `B · S` overflows
    /// ([`LoadError::Config`]), or `ref.input` does not hold `B · S · d` values.
    pub fn load(dir: &Path, case: &ManifestCase) -> Result<Self, LoadError> {
        Self::load_with(dir, case, ExpertWeights::F32)
    }

    /// [`FixtureCase::load`] keeping the expert weights as `experts` says ([`ExpertWeights::Checkpoint`]: a case
    /// whose state dict holds MXFP4 / FP8 / 16-bit experts builds a packed bank; the routing `quantization_config`
    /// gives the FP8 block).
    ///
    /// # Errors
    /// As [`FixtureCase::load`].
    pub fn load_with(
        dir: &Path,
        case: &ManifestCase,
        experts: ExpertWeights,
    ) -> Result<Self, LoadError> {
        let config = case_config(case, &dir.join("manifest.json"))?.with_expert_weights(experts);
        let path = case.checked_path(dir)?;
        let checkpoint = Checkpoint::open(&path)?;
        let layer = build_layer(&config, &checkpoint.weights(""))?;
        let input = checkpoint.tensor("ref.input")?;
        let d = layer.d_model();
        let (b, s) = match (case.batch, case.seq_len, input.shape.as_slice()) {
            (Some(b), Some(s), _) => (b, s),
            (_, _, [b, s, _]) => (*b, *s),
            _ => (1, input.data.len() / d.max(1)),
        };
        // `B · S` is read from the file: checked, and it must be the number of rows `ref.input` holds, so the
        // sequence lengths `[S; B]` are bounded by the file too.
        let t = b.checked_mul(s).ok_or_else(|| {
            LoadError::config(
                dir.join("manifest.json"),
                format!("cases[{}].batch × seq_len", case.name),
                format!("{b} × {s} overflows"),
            )
        })?;
        if t.checked_mul(d) != Some(input.data.len()) {
            return Err(LoadError::Shape {
                file: path.clone(),
                tensor: "ref.input".into(),
                expected: format!("[{b}, {s}, {d}]"),
                found: input.shape.clone(),
            });
        }
        let x = Array2::from_shape_vec((t, d), input.data).map_err(|_| LoadError::Shape {
            file: path.clone(),
            tensor: "ref.input".into(),
            expected: format!("[{b}, {s}, {d}]"),
            found: input.shape.clone(),
        })?;
        Ok(FixtureCase {
            path,
            config,
            checkpoint,
            layer,
            input: x,
            batch: b,
            seq_len: s,
        })
    }

    /// Number of tokens `T = B · S`.
    pub fn n_tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// The sequence lengths `[S; B]`, for [`moe_core::RouterInput::with_seq_lens`].
    pub fn seq_lens(&self) -> Vec<usize> {
        vec![self.seq_len; self.batch]
    }

    /// The names of the case's reference tensors (`ref.output`, ...), sorted.
    pub fn reference_names(&self) -> Vec<String> {
        self.checkpoint
            .names()
            .filter(|n| n.starts_with("ref."))
            .map(str::to_string)
            .collect()
    }
}
