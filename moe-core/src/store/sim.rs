//! The trace-driven cache simulator behind `moe cache-sim`: replays a [`RoutingTrace`] through one
//! [`SlotCache`] per layer — the same slots, placement and policies a live store uses — and counts hits, loads,
//! evictions, prefetches and bytes moved.
//!
//! ## What is replayed
//! A trace holds, per step and layer, the experts each token used. The simulator turns it into *requests*, each
//! the distinct ascending experts one layer needs at once, issued in this order ([`Granularity`]):
//! - [`Granularity::Token`]: decode with batch 1. For each step, each token in order, each layer in order: the
//!   token's experts at that layer are one request.
//! - [`Granularity::Step`]: a batched forward. For each step, each layer in order: the union of the step's
//!   tokens' experts at that layer is one request.
//!
//! A request goes through [`SlotCache::groups`] (chunks of `slots` experts) and [`SlotCache::admit`], so a
//! request larger than the slots evicts within itself as a live forward does. A layer's accesses, flattened in
//! issue order, are its sequence: Belady's MIN is built on exactly that sequence.
//!
//! ## Prefetch ([`Prefetch`])
//! Before a request, the experts predicted for it are placed with [`SlotCache::prefetch`] (at most `slots`,
//! the first ones; not counted as accesses; a later access that finds one is a hit and a prefetch hit):
//! - [`Prefetch::Gate`]: the trace's predicted experts for that layer and token (the next layer's gate applied
//!   to the previous layer's input, as mixtral-offloading does; Eliseev and Mazur, arXiv 2312.17238), the union
//!   over the step's tokens at [`Granularity::Step`].
//! - [`Prefetch::Frequency`]: the `top` experts of layer `l` most often used by the same token together with the
//!   experts it used at layer `l - 1`, from transition counts `C[l][a][b]` = tokens so far that used `a` at
//!   `l - 1` and `b` at `l`. Scores are `Σ_a C[l][a][b]` over the request's layer `l - 1` experts (each token's,
//!   summed over the step's tokens at [`Granularity::Step`]); only experts with a positive score are
//!   predicted; ties go to the lower id. Counts are updated after the request: online, no peeking. Layer 0 has
//!   no prediction.
//!
//! Prediction quality is scored per request that has a prediction (each token-layer at
//! [`Granularity::Token`], each step-layer at [`Granularity::Step`]), with `P` the predicted experts and `U` the
//! used ones: precision `Σ|P ∩ U| / Σ|P|`, recall `Σ|P ∩ U| / Σ|U|`.
//!
//! ## Counts
//! `hit_rate = hits / accesses`; `bytes_moved = (loads + prefetches) × header.expert_bytes`. With `slots >= E`
//! and no prefetch, every policy hits all but the first access of each expert per layer:
//! `hit_rate = 1 − Σ_l distinct_l / accesses`.
//!
//! The pin policy pins by each layer's expert counts over the *whole* trace (token-level, [`expert_frequencies`]):
//! an oracle profile, the best case for pinning, the way FlashML-org/FreeToken#174 reports it.

use crate::error::MoeError;

use super::cache::{CacheStats, SlotCache};
use super::policy::{PolicyContext, PolicyKind};
use super::trace::RoutingTrace;

/// How the trace's accesses are grouped into requests (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Each token's experts at a layer are one request: tokens in order, for each token every layer in order
    /// (decode with batch 1).
    Token,
    /// Each step's union of experts at a layer is one request, layers in order (a batched forward).
    Step,
}

impl Granularity {
    /// `token` or `step`.
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Token => "token",
            Granularity::Step => "step",
        }
    }

    /// Parses a name of [`Granularity::name`].
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the accepted names.
    pub fn parse(name: &str) -> Result<Self, MoeError> {
        match name {
            "token" => Ok(Granularity::Token),
            "step" => Ok(Granularity::Step),
            other => Err(MoeError::config("granularity", other, "token or step")),
        }
    }
}

/// What is loaded ahead of each request (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prefetch {
    /// Nothing.
    None,
    /// The trace's predicted experts for the layer (the trace must carry predictions).
    Gate,
    /// The `top` experts most often co-used with the previous layer's experts of the same token, counted online.
    Frequency {
        /// How many experts to predict per request (at least 1).
        top: usize,
    },
}

/// One simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Eviction policy of every layer.
    pub policy: PolicyKind,
    /// Resident slots per layer (at least 1; more than `E` acts as `E`).
    pub slots: usize,
    /// How accesses are grouped into requests.
    pub granularity: Granularity,
    /// What is loaded ahead of each request (not with Belady).
    pub prefetch: Prefetch,
}

/// The counts of one simulation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimResult {
    /// Per layer, its cache's counts (`[L]`).
    pub per_layer: Vec<CacheStats>,
    /// The sums over layers.
    pub total: CacheStats,
    /// `total.hits / total.accesses` (0 without accesses).
    pub hit_rate: f64,
    /// `(loads + prefetches) × expert_bytes` of the trace header, bytes (0 when the header says 0: unknown).
    pub bytes_moved: u64,
    /// `Σ|P ∩ U| / Σ|P|` over the requests with a prediction; `None` without prefetch or without any predicted
    /// expert.
    pub prefetch_precision: Option<f64>,
    /// `Σ|P ∩ U| / Σ|U|` over the requests with a prediction; `None` without prefetch or without any used expert
    /// in them.
    pub prefetch_recall: Option<f64>,
}

/// One row of a [`sweep`]: a policy at a slot count.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimRow {
    /// The policy.
    pub policy: PolicyKind,
    /// Slots per layer as asked.
    pub slots: usize,
    /// Its counts.
    pub result: SimResult,
}

/// Per layer, how many tokens of the whole trace used each expert (`[L][E]`): the pin policy's oracle profile.
pub fn expert_frequencies(trace: &RoutingTrace) -> Vec<Vec<u64>> {
    let h = trace.header();
    let mut f = vec![vec![0u64; h.n_experts]; h.n_layers];
    for step in trace.steps() {
        for (l, r) in step.iter().enumerate() {
            for &e in &r.experts {
                if let Some(c) = f.get_mut(l).and_then(|row| row.get_mut(e as usize)) {
                    *c += 1;
                }
            }
        }
    }
    f
}

/// Replays `trace` through one [`SlotCache`] per layer as `config` says. Pin pins by [`expert_frequencies`] of
/// the same trace (an oracle profile); Belady runs on each layer's own request sequence.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for zero slots, Belady with a prefetch (its sequence would not be the cache's),
/// gate prefetch on a trace without predictions, frequency prefetch with `top = 0`.
pub fn simulate(trace: &RoutingTrace, config: &SimConfig) -> Result<SimResult, MoeError> {
    check_combination(config.policy, config.prefetch)?;
    let plan = Plan::new(trace, config.granularity, config.prefetch)?;
    plan.run(config.policy, config.slots)
}

/// Simulates every policy at every slot count: rows in the order policy-major (`policies[0]` at each of `slots`,
/// then `policies[1]`, ...). The requests and predictions are derived once and shared by every row.
///
/// # Errors
/// As [`simulate`], plus [`MoeError::InvalidConfig`] for an empty `policies` or `slots`.
pub fn sweep(
    trace: &RoutingTrace,
    policies: &[PolicyKind],
    slots: &[usize],
    granularity: Granularity,
    prefetch: Prefetch,
) -> Result<Vec<SimRow>, MoeError> {
    if policies.is_empty() || slots.is_empty() {
        return Err(MoeError::config(
            "cache-sim sweep",
            format!("{} policies, {} slot counts", policies.len(), slots.len()),
            "at least one policy and one slot count",
        ));
    }
    for &p in policies {
        check_combination(p, prefetch)?;
    }
    if let Some(&s) = slots.iter().find(|&&s| s == 0) {
        return Err(zero_slots(s));
    }
    let plan = Plan::new(trace, granularity, prefetch)?;
    let mut rows = Vec::with_capacity(policies.len() * slots.len());
    for &policy in policies {
        for &s in slots {
            rows.push(SimRow {
                policy,
                slots: s,
                result: plan.run(policy, s)?,
            });
        }
    }
    Ok(rows)
}

fn zero_slots(s: usize) -> MoeError {
    MoeError::config("cache slots", s, "at least 1 slot per layer")
}

fn check_combination(policy: PolicyKind, prefetch: Prefetch) -> Result<(), MoeError> {
    if policy == PolicyKind::Belady && prefetch != Prefetch::None {
        return Err(MoeError::config(
            "cache-sim prefetch",
            format!("{prefetch:?} with belady"),
            "Belady's MIN is the bound on demand loads; run it without prefetch",
        ));
    }
    if prefetch == (Prefetch::Frequency { top: 0 }) {
        return Err(MoeError::config(
            "frequency prefetch top",
            0,
            "at least 1 expert per request",
        ));
    }
    Ok(())
}

/// One request of one layer: ranges into [`Plan::ids`].
#[derive(Debug, Clone)]
struct Event {
    layer: usize,
    request: std::ops::Range<usize>,
    prefetch: Option<std::ops::Range<usize>>,
}

/// The requests (and predictions) of a trace in issue order, independent of the policy and slots.
#[derive(Debug)]
struct Plan {
    n_experts: usize,
    expert_bytes: u64,
    events: Vec<Event>,
    ids: Vec<u32>,
    /// Per layer, the flattened request sequence (Belady's future).
    futures: Vec<Vec<u32>>,
    frequencies: Vec<Vec<u64>>,
    /// `Σ|P ∩ U|`, `Σ|P|`, `Σ|U|` over requests with a prediction.
    overlap: u64,
    predicted: u64,
    used: u64,
    any_prediction: bool,
}

/// Online transition counts of frequency prefetch: per layer `l >= 1`, per expert `a` of layer `l - 1`, the
/// tokens that used `a` there and `b` at `l`, as `(b, count)` pairs.
struct Transitions {
    rows: Vec<Vec<Vec<(u32, u64)>>>,
    score: Vec<u64>,
    touched: Vec<u32>,
}

impl Transitions {
    fn new(n_layers: usize, n_experts: usize) -> Self {
        Transitions {
            rows: vec![vec![Vec::new(); n_experts]; n_layers],
            score: vec![0; n_experts],
            touched: Vec::new(),
        }
    }

    /// Adds the scores of one token's previous-layer experts.
    fn add_scores(&mut self, layer: usize, prev: &[u32]) {
        for &a in prev {
            for &(b, c) in &self.rows[layer][a as usize] {
                let s = &mut self.score[b as usize];
                if *s == 0 {
                    self.touched.push(b);
                }
                *s += c;
            }
        }
    }

    /// The `top` best-scored experts (positive scores, ties to the lower id), ascending; clears the scores.
    fn take_top(&mut self, top: usize, out: &mut Vec<u32>) {
        let mut cand: Vec<(u64, u32)> = self
            .touched
            .iter()
            .map(|&b| (self.score[b as usize], b))
            .collect();
        for &b in &self.touched {
            self.score[b as usize] = 0;
        }
        self.touched.clear();
        cand.sort_unstable_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)));
        let start = out.len();
        out.extend(cand.iter().take(top).map(|c| c.1));
        out[start..].sort_unstable();
    }

    /// Counts one token's transitions from `prev` (layer `l - 1`) to `cur` (layer `l`).
    fn count(&mut self, layer: usize, prev: &[u32], cur: &[u32]) {
        for &a in prev {
            let row = &mut self.rows[layer][a as usize];
            for &b in cur {
                match row.binary_search_by_key(&b, |p| p.0) {
                    Ok(i) => row[i].1 += 1,
                    Err(i) => row.insert(i, (b, 1)),
                }
            }
        }
    }
}

/// `|a ∩ b|` of two ascending lists.
fn overlap(a: &[u32], b: &[u32]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                n += 1;
                i += 1;
                j += 1;
            }
        }
    }
    n
}

/// Appends the sorted, distinct union of `rows` to `out`.
fn push_union<'a>(out: &mut Vec<u32>, rows: impl Iterator<Item = &'a [u32]>) {
    let start = out.len();
    for r in rows {
        out.extend_from_slice(r);
    }
    out[start..].sort_unstable();
    let mut w = start;
    for i in start..out.len() {
        if w == start || out[i] != out[w - 1] {
            out[w] = out[i];
            w += 1;
        }
    }
    out.truncate(w);
}

impl Plan {
    fn new(
        trace: &RoutingTrace,
        granularity: Granularity,
        prefetch: Prefetch,
    ) -> Result<Self, MoeError> {
        let h = trace.header();
        if prefetch == Prefetch::Gate
            && !trace
                .steps()
                .iter()
                .any(|s| s.iter().any(|r| r.predicted.is_some()))
        {
            return Err(MoeError::config(
                "cache-sim prefetch",
                "gate",
                "the trace has no predicted experts (record it with next-layer predictions)",
            ));
        }
        let mut plan = Plan {
            n_experts: h.n_experts,
            expert_bytes: h.expert_bytes,
            events: Vec::new(),
            ids: Vec::new(),
            futures: vec![Vec::new(); h.n_layers],
            frequencies: expert_frequencies(trace),
            overlap: 0,
            predicted: 0,
            used: 0,
            any_prediction: false,
        };
        let top = match prefetch {
            Prefetch::Frequency { top } => Some(top),
            _ => None,
        };
        let mut tr = top.map(|_| Transitions::new(h.n_layers, h.n_experts));
        for step in trace.steps() {
            match granularity {
                Granularity::Token => {
                    let t_count = step.first().map_or(0, |r| r.n_tokens());
                    for t in 0..t_count {
                        for l in 0..step.len() {
                            let pre =
                                predict_token(&mut tr, top, prefetch, step, l, t, &mut plan.ids);
                            let start = plan.ids.len();
                            plan.ids.extend_from_slice(step[l].token(t));
                            plan.push(l, start, pre);
                            if let (Some(tr), true) = (tr.as_mut(), l > 0) {
                                tr.count(l, step[l - 1].token(t), step[l].token(t));
                            }
                        }
                    }
                }
                Granularity::Step => {
                    for l in 0..step.len() {
                        let t_count = step[l].n_tokens();
                        let pre = predict_step(&mut tr, top, prefetch, step, l, &mut plan.ids);
                        let start = plan.ids.len();
                        push_union(&mut plan.ids, (0..t_count).map(|t| step[l].token(t)));
                        plan.push(l, start, pre);
                        if let (Some(tr), true) = (tr.as_mut(), l > 0) {
                            for t in 0..t_count {
                                tr.count(l, step[l - 1].token(t), step[l].token(t));
                            }
                        }
                    }
                }
            }
        }
        Ok(plan)
    }

    /// Records the request `ids[start..]` of `layer` with the prediction `pre` (a range of `ids`, if any).
    fn push(&mut self, layer: usize, start: usize, pre: Option<std::ops::Range<usize>>) {
        let request = start..self.ids.len();
        if let Some(p) = &pre {
            self.any_prediction = true;
            self.overlap += overlap(&self.ids[p.clone()], &self.ids[request.clone()]);
            self.predicted += p.len() as u64;
            self.used += request.len() as u64;
        }
        if request.is_empty() && pre.as_ref().is_none_or(|p| p.is_empty()) {
            return;
        }
        self.futures[layer].extend_from_slice(&self.ids[request.clone()]);
        self.events.push(Event {
            layer,
            request,
            prefetch: pre,
        });
    }

    fn run(&self, policy: PolicyKind, slots: usize) -> Result<SimResult, MoeError> {
        if slots == 0 {
            return Err(zero_slots(slots));
        }
        let mut caches = Vec::with_capacity(self.futures.len());
        for (future, freq) in self.futures.iter().zip(&self.frequencies) {
            let ctx = PolicyContext {
                n_experts: self.n_experts,
                slots,
                future: Some(future),
                frequencies: Some(freq),
            };
            caches.push(SlotCache::new(self.n_experts, slots, policy.build(&ctx)?)?);
        }
        for ev in &self.events {
            let cache = &mut caches[ev.layer];
            if let Some(p) = &ev.prefetch {
                cache.prefetch(&self.ids[p.clone()]);
            }
            for group in cache.groups(&self.ids[ev.request.clone()]) {
                cache.admit(group)?;
            }
        }
        let per_layer: Vec<CacheStats> = caches.iter().map(SlotCache::stats).collect();
        let mut total = CacheStats::default();
        for s in &per_layer {
            total.accesses += s.accesses;
            total.hits += s.hits;
            total.loads += s.loads;
            total.evictions += s.evictions;
            total.prefetches += s.prefetches;
            total.prefetch_hits += s.prefetch_hits;
        }
        let ratio =
            |num: u64, den: u64| (self.any_prediction && den > 0).then(|| num as f64 / den as f64);
        Ok(SimResult {
            hit_rate: total.hit_rate(),
            bytes_moved: (total.loads + total.prefetches).saturating_mul(self.expert_bytes),
            prefetch_precision: ratio(self.overlap, self.predicted),
            prefetch_recall: ratio(self.overlap, self.used),
            per_layer,
            total,
        })
    }
}

/// The prediction for token `t` at layer `l`, appended to `ids`; `None` when the mode has none for it.
fn predict_token(
    tr: &mut Option<Transitions>,
    top: Option<usize>,
    prefetch: Prefetch,
    step: &[super::trace::LayerRecord],
    l: usize,
    t: usize,
    ids: &mut Vec<u32>,
) -> Option<std::ops::Range<usize>> {
    let start = ids.len();
    match (prefetch, tr.as_mut(), top) {
        (Prefetch::Gate, _, _) => {
            step[l].predicted.as_ref()?;
            ids.extend_from_slice(step[l].predicted_token(t));
        }
        (Prefetch::Frequency { .. }, Some(tr), Some(top)) if l > 0 => {
            tr.add_scores(l, step[l - 1].token(t));
            tr.take_top(top, ids);
        }
        _ => return None,
    }
    Some(start..ids.len())
}

/// The prediction for the whole step at layer `l`, appended to `ids`; `None` when the mode has none for it.
fn predict_step(
    tr: &mut Option<Transitions>,
    top: Option<usize>,
    prefetch: Prefetch,
    step: &[super::trace::LayerRecord],
    l: usize,
    ids: &mut Vec<u32>,
) -> Option<std::ops::Range<usize>> {
    let start = ids.len();
    let t_count = step[l].n_tokens();
    match (prefetch, tr.as_mut(), top) {
        (Prefetch::Gate, _, _) => {
            step[l].predicted.as_ref()?;
            push_union(ids, (0..t_count).map(|t| step[l].predicted_token(t)));
        }
        (Prefetch::Frequency { .. }, Some(tr), Some(top)) if l > 0 => {
            for t in 0..t_count {
                tr.add_scores(l, step[l - 1].token(t));
            }
            tr.take_top(top, ids);
        }
        _ => return None,
    }
    Some(start..ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_and_overlap() {
        let mut v = vec![9];
        let rows: [&[u32]; 3] = [&[3, 5], &[1, 5], &[]];
        push_union(&mut v, rows.into_iter());
        assert_eq!(v, vec![9, 1, 3, 5]);
        assert_eq!(overlap(&[1, 3, 5], &[0, 3, 5, 7]), 2);
    }

    #[test]
    fn transitions_score_online_and_break_ties_low() {
        let mut tr = Transitions::new(2, 4);
        tr.count(1, &[0], &[2, 3]);
        tr.count(1, &[0, 1], &[3]);
        tr.add_scores(1, &[0, 1]);
        let mut out = Vec::new();
        tr.take_top(1, &mut out);
        assert_eq!(out, vec![3]); // 3: 2 + 1, 2: 1
        tr.add_scores(1, &[0]);
        out.clear();
        tr.take_top(5, &mut out);
        assert_eq!(out, vec![2, 3]);
        // Scores were cleared: nothing scored, nothing predicted.
        out.clear();
        tr.take_top(5, &mut out);
        assert!(out.is_empty());
    }
}
