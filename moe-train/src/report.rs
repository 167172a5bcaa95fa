//! What a run reports: one [`RunReport`] per router (and the dense baseline), with its curves; the CLI prints them
//! as a table, JSON, CSV or Markdown and plots the curves.

use serde::{Deserialize, Serialize};

/// One point of a run's curves, every `eval_interval` steps and at the last step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Steps done (1-based: the point after step `step`).
    pub step: usize,
    /// Learning rate of that step.
    pub lr: f32,
    /// Mean training loss (cross-entropy in nats per byte; MSE for the teacher task) over the steps since the
    /// previous point.
    pub train_loss: f64,
    /// Validation loss at this point (same unit), eval mode.
    pub val_loss: f64,
    /// Mean over layers and over the steps since the previous point of the load CV (std / mean of the kept
    /// assignments per expert; 0 = balanced).
    pub load_cv: f64,
    /// Mean fraction of assignments dropped over capacity, in percent.
    pub dropped_pct: f64,
    /// Per layer, the share of kept assignments of each expert, summed over the steps since the previous point
    /// (`[L][E]`, each row sums to 1; empty for the dense baseline).
    pub load: Vec<Vec<f64>>,
}

/// One trained model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// `dense`, or the router spec as typed (`softmax-topk`, `switch-top1:capacity_factor=1.0`).
    pub label: String,
    /// Whether the router is causal (a token's routing depends on no later token); `true` for dense.
    pub causal: bool,
    /// What a non-causal router leaks, said in the table (expert choice: a token's experts depend on the whole
    /// batch, later tokens included).
    pub leak: Option<String>,
    /// Parameters every token uses (embeddings, attention, norms, the router and `k` experts per layer).
    pub active_params: usize,
    /// All parameters.
    pub total_params: usize,
    /// The routers' own parameters (gates, noise matrices, PEER's query projections and keys), counted in both
    /// `active_params` and `total_params`: "equal active parameters" compares `active_params − router_params`.
    pub router_params: usize,
    /// Steps trained.
    pub steps: usize,
    /// Tokens per step (`B · C`; samples per step for the teacher task).
    pub tokens_per_step: usize,
    /// Validation loss after the last step (nats per byte; MSE for the teacher task).
    pub final_val_loss: f64,
    /// Lowest validation loss of any evaluation.
    pub best_val_loss: f64,
    /// Step of that evaluation.
    pub best_step: usize,
    /// Mean training loss over the last evaluation interval.
    pub final_train_loss: f64,
    /// Training throughput: tokens of the training steps / their wall time (evaluations excluded).
    pub tokens_per_s: f64,
    /// Wall time of the run in seconds, evaluations included.
    pub wall_s: f64,
    /// Load CV averaged over layers and training steps.
    pub load_cv: f64,
    /// Dropped assignments in percent, averaged over layers and training steps.
    pub dropped_pct: f64,
    /// Experts (summed over layers) that got no assignment over the last evaluation interval.
    pub dead_experts: usize,
    /// The largest router logit |value| seen in training (where the router reports logits; 0 otherwise).
    pub max_router_logit: f64,
    /// Agreement of the student's routing with the teacher's (adjusted Rand index of the top-1 experts on the
    /// validation inputs); teacher task only.
    pub ari: Option<f64>,
    /// The curves.
    pub curve: Vec<CurvePoint>,
}

impl RunReport {
    /// Bits per byte of the final validation loss (nats / ln 2).
    pub fn final_val_bpb(&self) -> f64 {
        self.final_val_loss / std::f64::consts::LN_2
    }
}

/// Progress of a run, for a progress bar: called after every training step and every evaluation (from the
/// thread that runs the training loop, inside its pool, hence `Send`).
pub trait Progress: Send {
    /// Step `step` (1-based) of `total` finished with training loss `loss`.
    fn step(&mut self, step: usize, total: usize, loss: f64);
    /// An evaluation at `step` gave `val_loss`.
    fn eval(&mut self, step: usize, val_loss: f64);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&mut self, _step: usize, _total: usize, _loss: f64) {}
    fn eval(&mut self, _step: usize, _val_loss: f64) {}
}
