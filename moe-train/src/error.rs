//! Errors of training: every one says what was wrong and, where the user can act, what to do.

use std::path::PathBuf;

use moe_core::MoeError;

/// What can go wrong in a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A layer, router or shape error.
    #[error(transparent)]
    Moe(#[from] MoeError),
    /// A corpus that is not in the cache.
    #[error(
        "corpus {name} not found at {}: fetch it once with `moe train --fetch-corpus {name}` ({how})",
        path.display()
    )]
    MissingCorpus {
        /// The corpus name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
        /// What the fetch does.
        how: String,
    },
    /// A corpus that cannot be used (too short, unreadable, a wrong size or checksum).
    #[error("corpus {name}: {reason}")]
    Corpus {
        /// The corpus name or path.
        name: String,
        /// Why.
        reason: String,
    },
    /// Fetching a corpus failed.
    #[error("fetching corpus {name}: {reason}")]
    Fetch {
        /// The corpus name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A NaN or infinity in the forward or backward: the run stops.
    #[error("non-finite {what} at step {step}{}: the run stopped (lower the learning rate, or clip gradients)",
        layer.map(|l| format!(" in layer {l}")).unwrap_or_default())]
    NonFinite {
        /// Step (1-based).
        step: usize,
        /// Block index, where the value came from one.
        layer: Option<usize>,
        /// What was not finite (`loss`, `MoE output`, `gradient of blocks.1.attn.qkv`).
        what: String,
    },
    /// A checkpoint that cannot be used: unreadable, of another shape, or of another model.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A router that cannot be trained (a plugin without a backward).
    #[error("router {router} cannot be trained: {reason}")]
    Untrainable {
        /// The router's label.
        router: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl TrainError {
    /// Whether the error is the user's input (exit code 2) rather than a failure of the machine (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, TrainError::Io { .. } | TrainError::Fetch { .. })
    }
}
