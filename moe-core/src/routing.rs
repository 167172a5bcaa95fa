//! The dispatch plan every backend understands: kept assignments grouped expert-major (CSR over the experts that
//! received tokens), dropped assignments, auxiliary losses and optional router logits. No dense `[T, E]` dispatch
//! tensor exists anywhere, so the same type serves 8 experts and a million (PEER).

use ndarray::Array2;

use crate::error::MoeError;
use crate::loss::AuxLoss;
use crate::stats::Diagnostics;

/// One (token, expert, weight) decision. `rank` is the choice's position for its token (0 = first choice), used
/// for second-choice overflow statistics and printing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    /// Token (row) index.
    pub token: u32,
    /// Expert index.
    pub expert: u32,
    /// Combine weight.
    pub weight: f32,
    /// Choice rank for this token (0-based).
    pub rank: u16,
}

/// The kept tokens of one expert: a contiguous slice of the plan's slots.
#[derive(Debug, Clone, Copy)]
pub struct ExpertGroup<'a> {
    /// Expert index.
    pub expert: usize,
    /// First slot of this group in the plan (slots are expert-major).
    pub slot_start: usize,
    /// Token indices, ascending.
    pub tokens: &'a [u32],
    /// Combine weights, one per token.
    pub weights: &'a [f32],
}

/// An expert-major dispatch plan.
///
/// Slots are numbered expert-major: expert `active[0]`'s tokens first (ascending token index), then the next active
/// expert's. A token may hold zero, one or many slots (expert choice, capacity drops, PEER heads retrieving the same
/// expert twice).
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    n_tokens: usize,
    n_experts: usize,
    n_real_tokens: usize,
    active: Vec<u32>,
    offsets: Vec<usize>,
    slot_token: Vec<u32>,
    slot_weight: Vec<f32>,
    slot_rank: Vec<u16>,
    dropped: Vec<Assignment>,
    aux: Vec<AuxLoss>,
    logits: Option<Array2<f32>>,
}

impl Routing {
    /// Builds a plan from kept and dropped assignments in any order. `n_real_tokens` is the number of non-padding
    /// tokens (used by diagnostics).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] if an assignment names a token `>= n_tokens` or an expert `>= n_experts`, or has
    /// a non-finite or negative weight: a plugin router's bug is reported, not passed on to a backend.
    pub fn new(
        n_tokens: usize,
        n_experts: usize,
        n_real_tokens: usize,
        mut kept: Vec<Assignment>,
        dropped: Vec<Assignment>,
    ) -> Result<Self, MoeError> {
        if n_tokens > u32::MAX as usize || n_experts > u32::MAX as usize {
            return Err(MoeError::TooLarge {
                what: "tokens or experts".into(),
                size: n_tokens.max(n_experts) as u128,
                limit: u32::MAX as u128,
            });
        }
        for a in kept.iter().chain(dropped.iter()) {
            if a.token as usize >= n_tokens {
                return Err(MoeError::config(
                    "assignment.token",
                    a.token,
                    format!("must be < T = {n_tokens}"),
                ));
            }
            if a.expert as usize >= n_experts {
                return Err(MoeError::config(
                    "assignment.expert",
                    a.expert,
                    format!("must be < E = {n_experts}"),
                ));
            }
            if !a.weight.is_finite() || a.weight < 0.0 {
                return Err(MoeError::config(
                    "assignment.weight",
                    a.weight,
                    format!(
                        "weights must be finite and >= 0 (token {}, expert {})",
                        a.token, a.expert
                    ),
                ));
            }
        }
        // Expert-major, then token, then rank: one deterministic order whatever the router produced.
        kept.sort_unstable_by_key(|a| (a.expert, a.token, a.rank));
        let mut active = Vec::new();
        let mut offsets = vec![0usize];
        let mut slot_token = Vec::with_capacity(kept.len());
        let mut slot_weight = Vec::with_capacity(kept.len());
        let mut slot_rank = Vec::with_capacity(kept.len());
        for (i, a) in kept.iter().enumerate() {
            if active.last() != Some(&a.expert) {
                if !active.is_empty() {
                    offsets.push(i);
                }
                active.push(a.expert);
            }
            slot_token.push(a.token);
            slot_weight.push(a.weight);
            slot_rank.push(a.rank);
        }
        if !active.is_empty() {
            offsets.push(kept.len());
        }
        Ok(Routing {
            n_tokens,
            n_experts,
            n_real_tokens,
            active,
            offsets,
            slot_token,
            slot_weight,
            slot_rank,
            dropped,
            aux: Vec::new(),
            logits: None,
        })
    }

    /// An empty plan (`T = 0` or every token padding).
    pub fn empty(n_tokens: usize, n_experts: usize) -> Self {
        Routing {
            n_tokens,
            n_experts,
            n_real_tokens: 0,
            active: Vec::new(),
            offsets: vec![0],
            slot_token: Vec::new(),
            slot_weight: Vec::new(),
            slot_rank: Vec::new(),
            dropped: Vec::new(),
            aux: Vec::new(),
            logits: None,
        }
    }

    /// Attaches an auxiliary loss.
    pub fn push_aux(&mut self, loss: AuxLoss) {
        self.aux.push(loss);
    }

    /// Attaches the router logits `[T, E]` (routers with moderate `E` keep them for verification).
    pub fn set_logits(&mut self, logits: Array2<f32>) {
        self.logits = Some(logits);
    }

    /// Number of tokens `T` (padding included).
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Number of non-padding tokens.
    pub fn n_real_tokens(&self) -> usize {
        self.n_real_tokens
    }

    /// Number of experts `E`.
    pub fn n_experts(&self) -> usize {
        self.n_experts
    }

    /// Number of kept assignments (slots).
    pub fn n_slots(&self) -> usize {
        self.slot_token.len()
    }

    /// Experts that received at least one token, ascending.
    pub fn active_experts(&self) -> &[u32] {
        &self.active
    }

    /// CSR offsets over [`Routing::active_experts`] (length `active + 1`).
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Expert of each slot (slots are expert-major: the slots of `active_experts()[g]` are
    /// `offsets()[g]..offsets()[g + 1]`), for a backward that needs each slot's expert.
    pub fn slot_experts(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.slot_token.len());
        for (g, &e) in self.active.iter().enumerate() {
            let n = self.offsets[g + 1] - self.offsets[g];
            out.extend(std::iter::repeat_n(e, n));
        }
        out
    }

    /// Token of each slot.
    pub fn slot_tokens(&self) -> &[u32] {
        &self.slot_token
    }

    /// Weight of each slot.
    pub fn slot_weights(&self) -> &[f32] {
        &self.slot_weight
    }

    /// Choice rank of each slot.
    pub fn slot_ranks(&self) -> &[u16] {
        &self.slot_rank
    }

    /// The kept tokens of each active expert, in ascending expert order.
    pub fn groups(&self) -> impl ExactSizeIterator<Item = ExpertGroup<'_>> + '_ {
        self.active.iter().enumerate().map(move |(i, &e)| {
            let (s, t) = (self.offsets[i], self.offsets[i + 1]);
            ExpertGroup {
                expert: e as usize,
                slot_start: s,
                tokens: &self.slot_token[s..t],
                weights: &self.slot_weight[s..t],
            }
        })
    }

    /// Dropped assignments (over capacity), with the weight they would have had.
    pub fn dropped(&self) -> &[Assignment] {
        &self.dropped
    }

    /// Auxiliary losses, each with its normalisation named.
    pub fn aux_losses(&self) -> &[AuxLoss] {
        &self.aux
    }

    /// The coefficient of every auxiliary loss, in the order of [`Routing::aux_losses`]: the `d_aux` of a
    /// backward that trains with the routers' own coefficients.
    pub fn aux_coefficients(&self) -> Vec<f32> {
        self.aux.iter().map(|a| a.coefficient).collect()
    }

    /// Router logits `[T, E]`, if the router kept them.
    pub fn logits(&self) -> Option<&Array2<f32>> {
        self.logits.as_ref()
    }

    /// Kept tokens per expert, dense `[E]`.
    pub fn expert_counts(&self) -> Vec<usize> {
        let mut c = vec![0usize; self.n_experts];
        for (i, &e) in self.active.iter().enumerate() {
            c[e as usize] = self.offsets[i + 1] - self.offsets[i];
        }
        c
    }

    /// Token-major index of the slots: `(offsets [T + 1], slots)`; token `t`'s slots are
    /// `slots[offsets[t]..offsets[t + 1]]`, in ascending expert order (the fixed combine order). A counting sort,
    /// `O(T + slots)`.
    pub fn token_slots(&self) -> (Vec<usize>, Vec<usize>) {
        let (mut offsets, mut slots) = (Vec::new(), Vec::new());
        self.token_slots_into(&mut offsets, &mut slots);
        (offsets, slots)
    }

    /// [`Routing::token_slots`] into caller-owned buffers (cleared first), so a backend's steady state need not
    /// allocate.
    pub fn token_slots_into(&self, offsets: &mut Vec<usize>, slots: &mut Vec<usize>) {
        offsets.clear();
        offsets.resize(self.n_tokens + 1, 0);
        for &t in &self.slot_token {
            offsets[t as usize + 1] += 1;
        }
        for t in 0..self.n_tokens {
            offsets[t + 1] += offsets[t];
        }
        // Fill in token order: `offsets[t]` is used as the fill cursor of token t, then shifted back.
        slots.clear();
        slots.resize(self.slot_token.len(), 0);
        for (s, &t) in self.slot_token.iter().enumerate() {
            slots[offsets[t as usize]] = s;
            offsets[t as usize] += 1;
        }
        for t in (0..self.n_tokens).rev() {
            offsets[t + 1] = offsets[t];
        }
        if let Some(first) = offsets.first_mut() {
            *first = 0;
        }
    }

    /// Kept assignments of each token, `(expert, weight, rank)` sorted by rank: what a person reads.
    pub fn per_token(&self) -> Vec<Vec<(usize, f32, u16)>> {
        let mut out = vec![Vec::new(); self.n_tokens];
        for g in self.groups() {
            for (j, (&t, &w)) in g.tokens.iter().zip(g.weights).enumerate() {
                out[t as usize].push((g.expert, w, self.slot_rank[g.slot_start + j]));
            }
        }
        for v in &mut out {
            v.sort_by_key(|a| (a.2, a.0));
        }
        out
    }

    /// Load diagnostics (ROUTERS.md §8) of this plan, in `O(E log E + slots + T)`.
    pub fn diagnostics(&self) -> Diagnostics {
        let r = self;
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
        // Kept experts per token; padding tokens hold none (`Routing` never keeps one for them).
        let mut per_token = vec![0usize; r.n_tokens()];
        for &t in r.slot_tokens() {
            per_token[t as usize] += 1;
        }
        let without = per_token.iter().filter(|&&c| c == 0).count();
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
            experts_per_token_mean: if r.n_real_tokens() > 0 {
                kept as f64 / r.n_real_tokens() as f64
            } else {
                0.0
            },
            experts_per_token_min: if without > padding {
                0
            } else {
                per_token
                    .iter()
                    .copied()
                    .filter(|&c| c > 0)
                    .min()
                    .unwrap_or(0)
            },
            experts_per_token_max: per_token.iter().copied().max().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(token: u32, expert: u32, rank: u16) -> Assignment {
        Assignment {
            token,
            expert,
            weight: 0.5,
            rank,
        }
    }

    #[test]
    fn experts_per_token_counts_real_tokens_only() {
        // T = 5, token 4 is padding (no assignment, n_real = 4): token 0 has 3 experts, token 1 has 1, token 2 has
        // 2, token 3 has none. Mean = 6 kept / 4 real tokens = 1.5; min 0 (token 3); max 3.
        let kept = vec![
            a(0, 0, 0),
            a(0, 1, 1),
            a(0, 2, 2),
            a(1, 2, 0),
            a(2, 0, 0),
            a(2, 3, 1),
        ];
        let r = Routing::new(5, 4, 4, kept, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        let d = r.diagnostics();
        assert_eq!(d.tokens_without_expert, 1);
        assert_eq!(d.experts_per_token_mean, 1.5);
        assert_eq!(d.experts_per_token_min, 0);
        assert_eq!(d.experts_per_token_max, 3);
        // Without token 3 among the real ones (it is padding too): every real token has >= 1 expert, min 1.
        let kept = vec![a(0, 0, 0), a(0, 1, 1), a(1, 2, 0)];
        let r = Routing::new(4, 4, 2, kept, Vec::new()).unwrap_or_else(|e| panic!("{e}"));
        let d = r.diagnostics();
        assert_eq!(
            (
                d.tokens_without_expert,
                d.experts_per_token_min,
                d.experts_per_token_max
            ),
            (0, 1, 2)
        );
        assert_eq!(d.experts_per_token_mean, 1.5);
    }
}
