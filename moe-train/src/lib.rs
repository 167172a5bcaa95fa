//! Training small decoder-only language models around moe-rs MoE layers, so that routers are compared by what
//! they learn: validation loss at equal active parameters and steps, balance while learning, and cost.
//!
//! - [`model`]: the language model (byte embedding, learned positions, pre-norm blocks of RMSNorm, causal
//!   multi-head attention and an MoE FFN from any registered router, a final norm, the tied output projection),
//!   with the forward and backward of the non-MoE parts written by hand over the CPU backend's GEMM kernels
//!   ([`ops`]); the MoE layers run on the CPU backend (`forward_train` / `backward`).
//! - [`optim`]: AdamW (decoupled weight decay), warm-up and cosine schedule, gradient clipping, as torch does them.
//! - [`data`]: byte corpora with a fixed 90 / 10 split and seeded batches; corpus fetching into a cache.
//! - [`trainer`]: the loop (`charlm`), evaluation, diagnostics, NaN checks, checkpoints ([`checkpoint`]).
//! - [`trace`]: routing traces of a trained model on the validation set, for `moe cache-sim`.
//! - [`teacher`]: a seeded teacher MoE generates targets; a student is scored by MSE and by the adjusted Rand
//!   index of its routing against the teacher's.
//!
//! Determinism: the same seed gives bit-identical loss curves on any thread count, and a resumed run continues
//! the curve of an uninterrupted one.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dense;
pub mod error;
pub mod fetch;
pub mod model;
pub mod ops;
pub mod optim;
pub mod reference;
pub mod report;
pub mod teacher;
pub mod trace;
pub mod trainer;

pub use config::{BankKind, FfnConfig, FfnKind, LmConfig, OptimConfig, TrainConfig};
pub use data::{Batch, Corpus};
pub use error::TrainError;
pub use report::{CurvePoint, NoProgress, Progress, RunReport};
