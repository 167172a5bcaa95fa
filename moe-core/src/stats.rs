//! Load diagnostics every router reports (ROUTERS.md §8), computed from a [`Routing`] alone so that built-in and
//! plugin routers are measured the same way.

use crate::routing::Routing;

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
}

impl Diagnostics {
    /// Computes the diagnostics of a plan in `O(E log E + slots + T)`.
    pub fn of(r: &Routing) -> Self {
        let counts = r.expert_counts();
        let e = counts.len();
        let kept = r.n_slots();
        let dropped = r.dropped().len();
        let min_load = counts.iter().copied().min().unwrap_or(0);
        let max_load = counts.iter().copied().max().unwrap_or(0);
        let mean_load = if e == 0 { 0.0 } else { kept as f64 / e as f64 };
        let max_over_mean = if mean_load > 0.0 {
            max_load as f64 / mean_load
        } else {
            0.0
        };
        let cv = if mean_load > 0.0 {
            let var = counts
                .iter()
                .map(|&c| (c as f64 - mean_load).powi(2))
                .sum::<f64>()
                / e as f64;
            var.sqrt() / mean_load
        } else {
            0.0
        };
        let dropped_fraction = if kept + dropped > 0 {
            dropped as f64 / (kept + dropped) as f64
        } else {
            0.0
        };
        let dead_experts = counts.iter().filter(|&&c| c == 0).count();
        let load_entropy = if kept > 0 && e > 1 {
            let h: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / kept as f64;
                    -p * p.ln()
                })
                .sum();
            h / (e as f64).ln()
        } else {
            0.0
        };
        let top20_share = if kept > 0 {
            let mut sorted = counts.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let n_top = e.div_ceil(5).max(1);
            sorted.iter().take(n_top).sum::<usize>() as f64 / kept as f64
        } else {
            0.0
        };
        let second_kept = r.slot_ranks().iter().filter(|&&k| k == 1).count();
        let second_dropped = r.dropped().iter().filter(|a| a.rank == 1).count();
        let second_choice_overflow = if second_kept + second_dropped > 0 {
            Some(second_dropped as f64 / (second_kept + second_dropped) as f64)
        } else {
            None
        };
        let mut has = vec![false; r.n_tokens()];
        for &t in r.slot_tokens() {
            has[t as usize] = true;
        }
        let without = has.iter().filter(|&&h| !h).count();
        let padding = r.n_tokens() - r.n_real_tokens();
        Diagnostics {
            tokens: r.n_real_tokens(),
            experts: e,
            kept,
            dropped,
            min_load,
            max_load,
            mean_load,
            max_over_mean,
            cv,
            dropped_fraction,
            dead_experts,
            load_entropy,
            top20_share,
            second_choice_overflow,
            tokens_without_expert: without.saturating_sub(padding),
        }
    }
}
