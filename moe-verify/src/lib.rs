//! # moe-verify
//!
//! The fixture verifier: reads a directory in the golden-fixture format (`manifest.json` plus one safetensors file
//! per case holding the block's HF state dict and `ref.*` tensors; [`moe_models::fixture`]), builds each case's
//! preset from the manifest's `routing` and the file's unprefixed state dict, uploads it to a backend (any of
//! `moe_backends::open`'s: cpu, wgpu, cuda), runs it on `ref.input` through the resident
//! [`DeviceLayer`](moe_core::DeviceLayer), and compares every reference the file has. This crate sits above
//! `moe-models` and `moe-backends`, which know nothing of each other.
//!
//! ## Where each reference is computed
//! - On the chosen backend ([`Side::Backend`]): `output` (the forward), `routed_output` (a second upload of the
//!   layer without its shared experts), and everything read from the forward's plan: `router_logits`,
//!   `router_probs` (their row softmax, taken on the host), `topk_indices`, `topk_weights`, `dropped`,
//!   `dispatch_mask`, `top1_mask`, `combine_weights`, `jetmoe.expert_size`, and `aux.lb_loss` / `aux.z_loss` when
//!   the backend's plan carries them (the CPU backend's always does).
//! - On the host ([`Side::Host`]): `shared_expert_output` (the CPU backend's expert forward of the one shared
//!   expert), `shared_expert_gate_logit` (`x · w`), and the aux losses a backend's native routing does not compute
//!   (the layer's router run by [`MoeLayer::route`](moe_core::MoeLayer::route)).
//!
//! - Gradients (`ref.grad.*`, `ref.grad_lb.*`, `ref.grad_z.*`, tests/fixtures/hf-grad): a training forward and
//!   a backward on the backend for each loss the file has gradients of (the output loss with `ref.cotangent`, the
//!   load-balancing loss alone, the z-loss alone), every parameter gradient split into the checkpoint's tensors by
//!   the names the preset recorded; a backend without training has them skipped with its reason.
//!
//! ## Measures
//! Continuous quantities report the relative error
//! `rel = max_i |ours_i − ref_i| / max(max_i |ref_i|, 1e-30)` and pass when `rel ≤ 1e-5` ([`TOLERANCE`]).
//! Discrete quantities (chosen experts, dropped tokens, masks, counts) report the number of mismatching tokens
//! and pass only at 0. Routing is compared as sets of `(expert, weight)` pairs per token, so the order inside a
//! row does not matter (DeepSeek-V3's `topk(sorted=False)`).
//!
//! ```no_run
//! let backend = moe_verify::open_backend("cpu")?;
//! let reports = moe_verify::verify_dir("tests/fixtures/hf", backend.as_ref())?;
//! assert!(reports.iter().all(|r| r.passed));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod compare;
mod grad;
mod run;

use std::path::{Path, PathBuf};

use moe_backends::{BackendError, BackendKind};
use moe_core::Backend;
use moe_models::LoadError;
use moe_models::fixture::{FixtureCase, Manifest, ManifestCase};

pub use compare::rel_err;
pub use moe_models::fixture;

/// Relative tolerance of f32 parity with transformers: an independent float64 re-implementation matches the
/// references to ≤ 6e-7 relative, so 1e-5 leaves a wide margin for summation-order differences.
pub const TOLERANCE: f64 = 1e-5;

/// How a quantity is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Relative error `max |ours − ref| / max |ref|`; passes at ≤ [`TOLERANCE`].
    RelErr,
    /// Number of mismatching tokens (or experts); passes at 0.
    Mismatches,
}

/// Where a compared quantity was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// On the chosen backend (its forward and its plan).
    Backend,
    /// On the host (see the crate docs for which references).
    Host,
}

/// One compared quantity of a case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Quantity {
    /// The reference's name without `ref.` (`output`, `topk_weights`, `aux.lb_loss`).
    pub name: String,
    /// How `value` is measured.
    pub measure: Measure,
    /// The relative error or the mismatch count.
    pub value: f64,
    /// Whether it is within tolerance.
    pub passed: bool,
    /// Where it was computed.
    pub on: Side,
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CaseReport {
    /// The case name from the manifest.
    pub name: String,
    /// The HF `model_type` of the case.
    pub family: String,
    /// The case file.
    pub file: PathBuf,
    /// The backend it ran on (`cpu`, `wgpu`, `cuda`).
    pub backend: String,
    /// Number of tokens `T = B · S`.
    pub tokens: usize,
    /// Every compared quantity.
    pub quantities: Vec<Quantity>,
    /// References in the file that the verifier does not compare (with the reason).
    pub skipped: Vec<String>,
    /// Why the case failed: it could not run, it has nothing to compare, or which quantities are out of
    /// tolerance; `None` when it passed.
    pub error: Option<String>,
    /// Whether the case ran and every quantity passed.
    pub passed: bool,
    /// The routed experts' weights as they ran: `f32`, or a packed format (`mxfp4 (packed)`); empty when the
    /// case could not be loaded.
    pub experts: String,
    /// The case file could not be loaded (a malformed tensor, config or file: bad input, `moe verify` exits 2),
    /// as opposed to a case that ran and failed.
    pub bad_input: bool,
}

impl CaseReport {
    /// The largest relative error over the continuous quantities (0 if there are none).
    pub fn max_rel_err(&self) -> f64 {
        self.quantities
            .iter()
            .filter(|q| q.measure == Measure::RelErr)
            .map(|q| q.value)
            .fold(0.0, f64::max)
    }
}

/// Opens backend `name` (`cpu`, `wgpu`, `cuda`) with default settings.
///
/// # Errors
/// [`BackendError::Unavailable`] for a backend this build lacks or that cannot run here (no adapter, no driver),
/// with the reason; [`BackendError::Core`] for an unknown name.
pub fn open_backend(name: &str) -> Result<Box<dyn Backend>, BackendError> {
    moe_backends::open(BackendKind::parse(name)?)
}

/// Verifies every case of `dir/manifest.json` on `backend`. A case that cannot be built or run is reported with
/// its error (and fails); the others still run.
///
/// # Errors
/// [`LoadError`] when the manifest cannot be read or parsed, lists no case or a case whose `batch × seq_len`
/// overflows ([`LoadError::Config`]), or a case
/// file is refused ([`moe_models::fixture::ManifestCase::checked_path`]: outside the directory, not a regular
/// file, a size or SHA-256 other than the manifest records).
pub fn verify_dir(
    dir: impl AsRef<Path>,
    backend: &dyn Backend,
) -> Result<Vec<CaseReport>, LoadError> {
    let dir = dir.as_ref();
    let manifest = Manifest::read(dir)?;
    if manifest.cases.is_empty() {
        return Err(LoadError::config(
            dir.join("manifest.json"),
            "cases",
            "the list is empty: there is nothing to verify",
        ));
    }
    // The manifest is checked before any case runs: `batch × seq_len` fits, and each case file is confined to the
    // directory, a regular file, and of the recorded `bytes` and `sha256`. A fixture set that fails this is bad
    // input, not a failing case (a missing case file is reported by its case, which fails).
    for c in &manifest.cases {
        c.n_tokens(&dir.join("manifest.json"))?;
        match c.checked_path(dir) {
            Err(LoadError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => {
                other?;
            }
        }
    }
    Ok(manifest
        .cases
        .iter()
        .map(|c| {
            let failed = |e: LoadError, bad_input: bool| CaseReport {
                name: c.name.clone(),
                family: c.model_type().to_string(),
                file: dir.join(&c.file),
                backend: backend.name().to_string(),
                tokens: c.batch.unwrap_or(0).saturating_mul(c.seq_len.unwrap_or(0)),
                quantities: Vec::new(),
                skipped: Vec::new(),
                error: Some(e.to_string()),
                passed: false,
                experts: String::new(),
                bad_input,
            };
            match load_case(dir, c) {
                Err(e) => failed(e, true),
                Ok(fx) => verify_loaded(&fx, c, backend).unwrap_or_else(|e| failed(e, false)),
            }
        })
        .collect())
}

/// Verifies one case of the directory `dir` on `backend`.
///
/// # Errors
/// [`LoadError`] when the file or its tensors cannot be read, the preset cannot be built, or the upload or a
/// forward fails ([`LoadError::Layer`] naming the case).
pub fn verify_case(
    dir: &Path,
    case: &ManifestCase,
    backend: &dyn Backend,
) -> Result<CaseReport, LoadError> {
    verify_loaded(&load_case(dir, case)?, case, backend)
}

/// Loads a case with its experts as the file holds them: a packed fixture (MXFP4, FP8) runs packed, an f32 one
/// in f32.
fn load_case(dir: &Path, case: &ManifestCase) -> Result<FixtureCase, LoadError> {
    FixtureCase::load_with(dir, case, moe_models::ExpertWeights::Checkpoint)
}

/// Runs a loaded case on `backend` and compares every reference it holds.
fn verify_loaded(
    fx: &FixtureCase,
    case: &ManifestCase,
    backend: &dyn Backend,
) -> Result<CaseReport, LoadError> {
    let run = run::Run::new(fx, &case.name, backend)?;
    let mut rep = compare::Compare::new(&fx.checkpoint, fx.n_tokens());
    for name in fx.reference_names() {
        run.check(&mut rep, &name)?;
    }
    grad::check(fx, &case.name, backend, &mut rep)?;
    let passed = rep.quantities.iter().all(|q| q.passed) && !rep.quantities.is_empty();
    // A case that fails says why: nothing to compare, or which quantities are out of tolerance.
    let error = if rep.quantities.is_empty() {
        Some(format!(
            "{} holds no reference the verifier compares (ref.output, ref.router_logits, ...)",
            fx.path.display()
        ))
    } else if passed {
        None
    } else {
        let bad: Vec<&str> = rep
            .quantities
            .iter()
            .filter(|q| !q.passed)
            .map(|q| q.name.as_str())
            .collect();
        Some(format!("out of tolerance: {}", bad.join(", ")))
    };
    Ok(CaseReport {
        name: case.name.clone(),
        family: fx.config.family.model_type().to_string(),
        file: fx.path.clone(),
        backend: backend.name().to_string(),
        tokens: fx.n_tokens(),
        quantities: rep.quantities,
        skipped: rep.skipped,
        error,
        passed,
        experts: match fx.layer.experts() {
            moe_core::ExpertBank::Packed(b) => format!("{} (packed)", b.format()),
            _ => "f32".to_string(),
        },
        bad_input: false,
    })
}
