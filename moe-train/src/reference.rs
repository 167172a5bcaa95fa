//! The PyTorch reference of the whole training step (`scripts/train_reference.py`): [`write_inputs`] writes a
//! directory the script trains from (our initial weights, the batches, the configuration), and [`replay`] trains
//! our model on the same inputs, so a test can compare the per-step losses with the script's `reference.json`.
//!
//! A reference directory holds `config.json` (`{"model": LmConfig, "train": TrainConfig}`), `init.safetensors`
//! (every parameter by name, f32), `batches.safetensors` (`inputs` and `targets`, int32 `[S, B, C]`, S =
//! `train.steps`) and, once the script ran, `reference.json` (`ce`, `aux`, `loss`, `grad_norm`, `lr` per step).

use std::path::Path;

use moe_core::RouterRegistry;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::{LmConfig, TrainConfig};
use crate::data::{Batch, Corpus, train_batch};
use crate::error::TrainError;
use crate::model::Lm;
use crate::optim::AdamW;
use crate::trainer;

/// `config.json` of a reference directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceConfig {
    /// The model.
    pub model: LmConfig,
    /// The loop (`steps` batches are stored).
    pub train: TrainConfig,
}

/// What each step of a replay (or of the PyTorch script) gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    /// Cross-entropy per step (nats per byte).
    pub ce: Vec<f64>,
    /// `Σ c · aux` per step.
    pub aux: Vec<f64>,
    /// `ce + aux` per step.
    pub loss: Vec<f64>,
    /// Global gradient norm before clipping, per step.
    pub grad_norm: Vec<f64>,
    /// Learning rate per step.
    pub lr: Vec<f64>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Writes a reference directory for `model` and `train`: initial weights from `train.seed`, the first
/// `train.steps` training batches of `corpus`.
///
/// # Errors
/// [`TrainError::Io`] when a file cannot be written; the model's errors.
pub fn write_inputs(
    dir: &Path,
    registry: &RouterRegistry,
    model: &LmConfig,
    train: &TrainConfig,
    corpus: &Corpus,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg = ReferenceConfig {
        model: model.clone(),
        train: train.clone(),
    };
    let json = serde_json::to_string_pretty(&cfg).map_err(|e| bad(dir, e.to_string()))?;
    let path = dir.join("config.json");
    std::fs::write(&path, json + "\n").map_err(io(&path))?;
    let lm = Lm::new(registry, model, train.seed)?;
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = lm
        .named_params()
        .into_iter()
        .map(|(n, a)| {
            (
                n,
                a.shape().to_vec(),
                a.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    write_tensors(&dir.join("init.safetensors"), &owned)?;
    let (s, b, c) = (train.steps, train.batch, model.context);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for step in 0..s {
        let batch = train_batch(corpus, train.seed, step, b, c);
        inputs.extend(batch.inputs.iter().flat_map(|&x| (x as i32).to_le_bytes()));
        targets.extend(batch.targets.iter().flat_map(|&x| (x as i32).to_le_bytes()));
    }
    write_tensors_typed(
        &dir.join("batches.safetensors"),
        &[
            ("inputs".into(), vec![s, b, c], inputs),
            ("targets".into(), vec![s, b, c], targets),
        ],
        Dtype::I32,
    )
}

fn write_tensors(path: &Path, t: &[(String, Vec<usize>, Vec<u8>)]) -> Result<(), TrainError> {
    write_tensors_typed(path, t, Dtype::F32)
}

fn write_tensors_typed(
    path: &Path,
    t: &[(String, Vec<usize>, Vec<u8>)],
    dtype: Dtype,
) -> Result<(), TrainError> {
    let views = t
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| bad(path, format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| bad(path, e.to_string()))
}

/// Reads `config.json` of a reference directory.
///
/// # Errors
/// [`TrainError::Io`]; [`TrainError::Checkpoint`] for JSON that is not a [`ReferenceConfig`].
pub fn read_config(dir: &Path) -> Result<ReferenceConfig, TrainError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))
}

/// The stored batches `[S]` of a reference directory.
fn read_batches(dir: &Path, cfg: &ReferenceConfig) -> Result<Vec<Batch>, TrainError> {
    let path = dir.join("batches.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(&path, e.to_string()))?;
    let (s, b, c) = (cfg.train.steps, cfg.train.batch, cfg.model.context);
    let get = |name: &str| -> Result<Vec<u32>, TrainError> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(&path, format!("no tensor `{name}`")))?;
        if t.dtype() != Dtype::I32 || t.shape() != [s, b, c] {
            return Err(bad(&path, format!("`{name}` must be I32 [{s}, {b}, {c}]")));
        }
        t.data()
            .chunks_exact(4)
            .map(|x| {
                u32::try_from(i32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                    .map_err(|_| bad(&path, format!("`{name}` holds a negative token id")))
            })
            .collect()
    };
    let (inputs, targets) = (get("inputs")?, get("targets")?);
    Ok((0..s)
        .map(|i| Batch {
            batch: b,
            context: c,
            inputs: inputs[i * b * c..(i + 1) * b * c].to_vec(),
            targets: targets[i * b * c..(i + 1) * b * c].to_vec(),
        })
        .collect())
}

/// Trains our model from a reference directory's initial weights on its batches, as the PyTorch script does,
/// and returns the per-step losses and the trained model.
///
/// # Errors
/// Unreadable or inconsistent files; the training step's errors.
pub fn replay(dir: &Path, registry: &RouterRegistry) -> Result<(StepLosses, Lm), TrainError> {
    let cfg = read_config(dir)?;
    let batches = read_batches(dir, &cfg)?;
    let mut lm = checkpoint::load_weights(
        &dir.join("init.safetensors"),
        registry,
        &cfg.model,
        cfg.train.seed,
    )?;
    let mut opt = AdamW::new(cfg.train.optim);
    let label = cfg.model.ffn.label();
    let mut out = StepLosses::default();
    for (s, batch) in batches.iter().enumerate() {
        let r = trainer::step(&mut lm, &mut opt, batch, &cfg.train, &label, s)?;
        out.ce.push(r.stats.ce);
        out.aux.push(r.stats.aux);
        out.loss.push(r.stats.ce + r.stats.aux);
        out.grad_norm.push(r.grad_norm);
        out.lr.push(f64::from(r.lr));
    }
    Ok((out, lm))
}

/// Reads `reference.json` (the PyTorch script's losses).
///
/// # Errors
/// [`TrainError::Io`]; [`TrainError::Checkpoint`] for JSON without the per-step arrays.
pub fn read_reference(dir: &Path) -> Result<StepLosses, TrainError> {
    let path = dir.join("reference.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| bad(&path, e.to_string()))
}
