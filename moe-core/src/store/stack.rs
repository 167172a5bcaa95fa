//! A stack of resident layers run in order with a residual connection, prefetching each next layer's experts
//! while the current one computes: the next layer's gate applied to the current layer's input predicts them (the
//! approach of mixtral-offloading: Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models with
//! Offloading", arXiv 2312.17238, §3.2: the residual stream changes little from one layer to the next).

use ndarray::{Array2, ArrayView2};

use crate::backend::DeviceLayer;
use crate::error::MoeError;
use crate::router::RouterInput;
use crate::routing::Routing;

/// Whether a stack run prefetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StackPrefetch {
    /// Experts are loaded when a layer's routing selects them.
    #[default]
    None,
    /// Before layer `l` runs, layer `l + 1`'s router routes layer `l`'s input and the experts it selects are
    /// prefetched into layer `l + 1` ([`DeviceLayer::prefetch`]).
    NextGate,
}

/// How well the predictions of one stack run matched: over layers `1..L`, the experts predicted for the layer
/// and the experts its routing used (distinct experts per step and layer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PredictionCounts {
    /// Experts predicted.
    pub predicted: u64,
    /// Experts used.
    pub used: u64,
    /// Experts predicted and used.
    pub correct: u64,
}

impl PredictionCounts {
    /// `correct / predicted` (0 when nothing was predicted).
    pub fn precision(&self) -> f64 {
        ratio(self.correct, self.predicted)
    }

    /// `correct / used` (0 when nothing was used).
    pub fn recall(&self) -> f64 {
        ratio(self.correct, self.used)
    }

    /// Adds another run's counts.
    pub fn add(&mut self, other: PredictionCounts) {
        self.predicted += other.predicted;
        self.used += other.used;
        self.correct += other.correct;
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// What one stack run gives: the output, the prediction counts, and per layer the plan it ran and (layers ≥ 1
/// with [`StackPrefetch::NextGate`]) the plan its gate made on the layer before's input (the prediction, per
/// token): what a routing trace records.
#[derive(Debug, Clone)]
pub struct StackRun {
    /// `x_L`, `[T, d]`.
    pub output: Array2<f32>,
    /// How well the predictions matched (zero without prefetch).
    pub counts: PredictionCounts,
    /// Per layer, the plan its forward executed.
    pub plans: Vec<Routing>,
    /// Per layer, the plan predicted for it (`None` for layer 0 and without prefetch).
    pub predicted: Vec<Option<Routing>>,
}

/// Runs `x` (`[T, d]`) through `layers` in order: `x_{l+1} = x_l + layer_l(x_l)`, and returns `x_L` with the
/// prediction counts (zero without prefetch) and the plans. Each layer sees its input in eval mode. Prefetches
/// change no output.
///
/// # Errors
/// A layer's forward or prefetch error; [`MoeError::Mismatch`] when a layer's width differs from `x`'s.
pub fn forward_stack(
    layers: &mut [Box<dyn DeviceLayer>],
    x: ArrayView2<'_, f32>,
    prefetch: StackPrefetch,
) -> Result<StackRun, MoeError> {
    let mut h = x.to_owned();
    let mut counts = PredictionCounts::default();
    let mut plans = Vec::with_capacity(layers.len());
    let mut predicted: Vec<Option<Routing>> = Vec::with_capacity(layers.len());
    // The plan predicted for the layer about to run (made while the layer before it ran).
    let mut pending: Option<Routing> = None;
    for l in 0..layers.len() {
        let mine = pending.take();
        if prefetch == StackPrefetch::NextGate
            && let Some(next) = layers.get_mut(l + 1)
        {
            let plan = next.layer().route(&RouterInput::new(h.view()))?;
            next.prefetch(plan.active_experts())?;
            pending = Some(plan);
        }
        let out = layers[l].forward(&RouterInput::new(h.view()))?;
        if let Some(p) = &mine {
            let used = out.routing.active_experts();
            let guess = p.active_experts();
            counts.add(PredictionCounts {
                predicted: guess.len() as u64,
                used: used.len() as u64,
                correct: guess
                    .iter()
                    .filter(|e| used.binary_search(e).is_ok())
                    .count() as u64,
            });
        }
        if out.output.dim() != h.dim() {
            return Err(MoeError::mismatch(
                "layer stack",
                format!("layer {l} output width"),
                out.output.ncols(),
                "input width",
                h.ncols(),
            ));
        }
        h += &out.output;
        plans.push(out.routing);
        predicted.push(mine);
    }
    Ok(StackRun {
        output: h,
        counts,
        plans,
        predicted,
    })
}
