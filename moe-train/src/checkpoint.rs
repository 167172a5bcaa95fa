//! Checkpoints as safetensors (in progress).

use std::path::{Path, PathBuf};

use crate::config::{LmConfig, TrainConfig};
use crate::error::TrainError;

/// What a checkpoint holds, read from its header alone.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The file.
    pub path: PathBuf,
    /// The run's label (`dense`, a router spec).
    pub label: String,
    /// Steps done.
    pub step: usize,
    /// The model.
    pub model: LmConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Tensors (name, shape), model parameters first, then the optimizer's moments (`adamw.m.NAME`,
    /// `adamw.v.NAME`).
    pub tensors: Vec<(String, Vec<usize>)>,
}

/// Reads a checkpoint's header.
///
/// # Errors
/// [`TrainError::Checkpoint`] for a file that is not a moe-train checkpoint.
pub fn read_info(path: &Path) -> Result<CheckpointInfo, TrainError> {
    Err(TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: "reading checkpoints is being written".into(),
    })
}
