//! The training loop (in progress).

use std::path::PathBuf;

use moe_core::RouterRegistry;

use crate::config::{LmConfig, TrainConfig};
use crate::data::Corpus;
use crate::error::TrainError;
use crate::report::{Progress, RunReport};

/// One language-model run.
#[derive(Debug, Clone)]
pub struct LmRun<'a> {
    /// Where routers are found (built-ins and plugins).
    pub registry: &'a RouterRegistry,
    /// The model.
    pub model: LmConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Threads (a rayon pool of this size runs the whole run; results do not depend on it).
    pub threads: usize,
    /// Write a checkpoint here at every evaluation and at the end.
    pub save: Option<PathBuf>,
    /// Start from this checkpoint (its step, weights and optimizer state).
    pub resume: Option<PathBuf>,
    /// Stop after this many steps (counted from 0, as if interrupted; the schedule still spans `train.steps`).
    pub stop_after: Option<usize>,
}

/// Trains one model on `corpus`.
///
/// # Errors
/// See [`TrainError`].
pub fn train_lm(
    run: &LmRun<'_>,
    corpus: &Corpus,
    progress: &mut dyn Progress,
) -> Result<RunReport, TrainError> {
    let _ = (run, corpus, progress);
    Err(TrainError::Untrainable {
        router: "any".into(),
        reason: "the trainer is being written".into(),
    })
}
