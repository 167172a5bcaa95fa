//! Load diagnostics every router reports (ROUTERS.md §8), computed by
//! [`Routing::diagnostics`](crate::routing::Routing::diagnostics) from the plan alone so that built-in and plugin
//! routers are measured the same way.

/// Load statistics of one dispatch plan. Loads count kept assignments per expert.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostics {
    /// Non-padding tokens routed.
    pub tokens: usize,
    /// Number of experts `E`.
    pub experts: usize,
    /// Kept assignments.
    pub kept: usize,
    /// Dropped assignments (over capacity).
    pub dropped: usize,
    /// Smallest load of any expert.
    pub min_load: usize,
    /// Largest load of any expert.
    pub max_load: usize,
    /// Mean load, `kept / E`.
    pub mean_load: f64,
    /// `max_load / mean_load` (1 = perfect balance; 0 when nothing is kept).
    pub max_over_mean: f64,
    /// Coefficient of variation of the loads, `std / mean` (population std; 0 = perfect balance).
    pub cv: f64,
    /// `dropped / (kept + dropped)`.
    pub dropped_fraction: f64,
    /// Experts with no kept token.
    pub dead_experts: usize,
    /// Entropy of the load distribution divided by `ln E` (1 = uniform, 0 = one expert takes all).
    pub load_entropy: f64,
    /// Share of kept assignments on the busiest `ceil(0.2 · E)` experts.
    pub top20_share: f64,
    /// Fraction of second-choice (rank 1) assignments dropped; `None` if there are no second choices.
    pub second_choice_overflow: Option<f64>,
    /// Non-padding tokens that ended with no expert at all.
    pub tokens_without_expert: usize,
    /// Mean kept experts per non-padding token, `kept / tokens` (`k` for a top-k router without drops; expert
    /// choice and capacity drops make it vary per token).
    pub experts_per_token_mean: f64,
    /// Fewest kept experts of any non-padding token (0 when a token got none).
    pub experts_per_token_min: usize,
    /// Most kept experts of any token.
    pub experts_per_token_max: usize,
}
