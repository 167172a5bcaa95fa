//! The all-to-all cost model of an expert-parallel step: the bytes every rank puts on the wire (exactly what the
//! layer sends: the same [`dispatch_plan`] and wire sizes [`plan::dispatch_bytes`] / [`plan::combine_bytes`]),
//! the expert load each rank receives, and the predicted time of the dispatch and combine all-to-alls on a
//! [`Network`].
//!
//! ## Time of one all-to-all (pairwise exchange)
//! MPICH's pairwise-exchange all-to-all (Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
//! communication operations in MPICH", IJHPCA 19(1), §4.5; OpenMPI's `alltoallv_intra_pairwise` is the same
//! schedule) runs `R − 1` rounds; in round `i` rank `r` sends to `(r + i) mod R` and receives from
//! `(r − i) mod R` at once (full duplex). In the α-β model (see [`crate::network`]) rank `r`'s round takes
//! `max(α_s + n_s / β_s, α_r + n_r / β_r)` for its send of `n_s` bytes and receive of `n_r` bytes, over the link
//! each pair uses (intra- or inter-node), an empty message costing nothing (it is not sent). A round ends when
//! its slowest pair does, so
//!
//! ```text
//! T_a2a = Σ_{i=1}^{R−1} max_r max(t(r → r+i), t(r−i → r)),   t(a → b) = α_ab + bytes(a, b) / β_ab  (0 if empty)
//! ```
//!
//! The sum of round maxima is an upper bound of the schedule without a barrier between rounds (a rank may start
//! round `i + 1` when its own pair is done); for a balanced exchange the two agree, and with equal messages of
//! `n` bytes on one link it is Thakur et al.'s `(R − 1)(α + n/β)`. A rank's message to itself is a local copy
//! and costs nothing. One step's cost is the dispatch all-to-all plus the combine all-to-all.
//!
//! ## What it ignores
//! Contention inside the network (links are independent pairs: a full-bisection fabric), a NIC shared by the
//! ranks of a node (give the per-rank share as `inter`), packing and unpacking (the layer's copies) and overlap
//! with the expert computation. `docs/EP.md` says how to validate it against `mpirun … moe bench --ep`.
//!
//! ## Scaling from a routing trace
//! [`split_trace`] deals a trace's tokens to `R` ranks of `tokens_per_rank` each (contiguous, wrapping to the
//! start when the trace is shorter than `R · tokens_per_rank`); [`predict`] places experts in contiguous
//! blocks ([`Placement::contiguous`]) and refuses `E < R` (a rank without experts is not expert parallelism:
//! real deployments with more ranks than experts replicate the expert-parallel group, whose cost is that of
//! `R = E`).

use moe_core::store::trace::RoutingTrace;
use moe_core::{Assignment, MoeError, Routing};
use serde::Serialize;

use crate::network::Network;
use crate::placement::Placement;
use crate::plan::{self, DispatchPlan, dispatch_plan};

/// The bytes of one step's two all-to-alls between `R` ranks, and the rows each rank's experts receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    ranks: usize,
    /// `[R · R]`: `dispatch[s · R + o]`, bytes source `s` sends owner `o`.
    dispatch: Vec<u64>,
    /// `[R · R]`: `combine[o · R + s]`, bytes owner `o` sends back to source `s`.
    combine: Vec<u64>,
    /// `[R]`: rows (slots) each owner's experts receive, its own tokens' included.
    rows: Vec<u64>,
}

impl Traffic {
    /// No traffic yet between `ranks` ranks; add each source's plan with [`Traffic::add_source`].
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for 0 ranks or more than [`MAX_RANKS`].
    pub fn new(ranks: usize) -> Result<Self, MoeError> {
        if ranks == 0 || ranks > MAX_RANKS {
            return Err(MoeError::config(
                "ranks",
                ranks,
                format!("must be between 1 and {MAX_RANKS}"),
            ));
        }
        Ok(Traffic {
            ranks,
            dispatch: vec![0; ranks * ranks],
            combine: vec![0; ranks * ranks],
            rows: vec![0; ranks],
        })
    }

    /// The traffic of the plans of every rank (`plans[s]`: rank `s`'s [`dispatch_plan`]) with rows of width `d`
    /// and no rank capacity (nothing dropped).
    ///
    /// # Errors
    /// As [`Traffic::new`] for `plans.len()`, and [`Traffic::add_source`].
    pub fn from_plans(plans: &[DispatchPlan], d: usize) -> Result<Self, MoeError> {
        let mut t = Traffic::new(plans.len())?;
        for (s, p) in plans.iter().enumerate() {
            t.add_source(s, p, d)?;
        }
        Ok(t)
    }

    /// Adds source `s`'s plan: to owner `o`, `dispatch_bytes(groups, rows, d, false)` bytes, and back from `o`,
    /// `combine_bytes(sent, rows, 0, d)`; `o`'s load grows by the rows.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when the plan has another number of owners than the ranks;
    /// [`MoeError::InvalidConfig`] for `s >= R`.
    pub fn add_source(&mut self, s: usize, p: &DispatchPlan, d: usize) -> Result<(), MoeError> {
        let counts: Vec<(usize, usize)> = p.owners.iter().map(|g| (g.groups(), g.rows())).collect();
        self.add_counts(s, &counts, d)
    }

    /// [`Traffic::add_source`] from the plan's counts alone: `owners[o] = (groups, rows)` source `s` sends owner
    /// `o` (what a rank can send another cheaply, e.g. to predict a measured run).
    ///
    /// # Errors
    /// As [`Traffic::add_source`].
    pub fn add_counts(
        &mut self,
        s: usize,
        owners: &[(usize, usize)],
        d: usize,
    ) -> Result<(), MoeError> {
        let r = self.ranks;
        if owners.len() != r {
            return Err(MoeError::mismatch(
                "dispatch plan",
                "owners in the plan",
                owners.len(),
                "ranks",
                r,
            ));
        }
        if s >= r {
            return Err(MoeError::config(
                "source rank",
                s,
                format!("ranks are 0..{r}"),
            ));
        }
        for (o, &(groups, rows)) in owners.iter().enumerate() {
            let sent = plan::dispatch_bytes(groups, rows, d, false);
            self.dispatch[s * r + o] += sent as u64;
            self.combine[o * r + s] += plan::combine_bytes(sent > 0, rows, 0, d) as u64;
            self.rows[o] += rows as u64;
        }
        Ok(())
    }

    /// The number of ranks `R`.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Bytes `s` sends `o` in the dispatch (0 out of range).
    pub fn dispatch(&self, s: usize, o: usize) -> u64 {
        self.at(&self.dispatch, s, o)
    }

    /// Bytes `o` sends `s` in the combine (0 out of range).
    pub fn combine(&self, o: usize, s: usize) -> u64 {
        self.at(&self.combine, o, s)
    }

    fn at(&self, m: &[u64], a: usize, b: usize) -> u64 {
        if a < self.ranks && b < self.ranks {
            m[a * self.ranks + b]
        } else {
            0
        }
    }

    /// Bytes rank `r` sends in both all-to-alls, its messages to itself excluded.
    pub fn bytes_sent(&self, r: usize) -> u64 {
        (0..self.ranks)
            .filter(|&o| o != r)
            .map(|o| self.dispatch(r, o) + self.combine(r, o))
            .sum()
    }

    /// Bytes rank `r` receives in both all-to-alls, its messages from itself excluded.
    pub fn bytes_received(&self, r: usize) -> u64 {
        (0..self.ranks)
            .filter(|&s| s != r)
            .map(|s| self.dispatch(s, r) + self.combine(s, r))
            .sum()
    }

    /// Non-empty messages rank `r` sends in both all-to-alls, to itself excluded.
    pub fn messages_sent(&self, r: usize) -> u64 {
        (0..self.ranks)
            .filter(|&o| o != r)
            .map(|o| u64::from(self.dispatch(r, o) > 0) + u64::from(self.combine(r, o) > 0))
            .sum()
    }

    /// Rows (slots) rank `r`'s experts receive, from itself included: its expert load.
    pub fn rows_received(&self, r: usize) -> u64 {
        self.rows.get(r).copied().unwrap_or(0)
    }
}

/// Most ranks a [`Traffic`] holds: its two `R²` tables of `u64` are 256 MiB at 4096 ranks.
pub const MAX_RANKS: usize = 1 << 12;

/// Predicted time of one pairwise-exchange all-to-all between `ranks` ranks on `network`, microseconds, where
/// `bytes(a, b)` is what `a` sends `b` (formula in the module docs). 0 for one rank.
pub fn pairwise_exchange_us(
    ranks: usize,
    network: &Network,
    bytes: impl Fn(usize, usize) -> u64,
) -> f64 {
    let mut total = 0.0;
    for i in 1..ranks {
        let mut round: f64 = 0.0;
        for r in 0..ranks {
            let (to, from) = ((r + i) % ranks, (r + ranks - i) % ranks);
            let send = network.link(r, to).message_us(bytes(r, to));
            let recv = network.link(from, r).message_us(bytes(from, r));
            round = round.max(send.max(recv));
        }
        total += round;
    }
    total
}

/// One step's predicted cost on `R` ranks: the bytes and messages of the dispatch and combine all-to-alls, the
/// expert load per rank and the predicted times.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpCost {
    /// Ranks `R`.
    pub ranks: usize,
    /// The network's name.
    pub network: String,
    /// `[R]`: bytes each rank sends (dispatch + combine, its messages to itself excluded).
    pub bytes_sent_per_rank: Vec<u64>,
    /// `[R]`: bytes each rank receives (dispatch + combine, from itself excluded).
    pub bytes_received_per_rank: Vec<u64>,
    /// `[R]`: non-empty messages each rank sends (dispatch + combine, to itself excluded).
    pub messages_per_rank: Vec<u64>,
    /// `[R]`: rows (slots) each rank's experts receive, its own included: the expert load.
    pub rows_per_rank: Vec<u64>,
    /// Max over mean of `rows_per_rank` (1 when no rows at all).
    pub imbalance: f64,
    /// Predicted dispatch all-to-all, milliseconds.
    pub dispatch_ms: f64,
    /// Predicted combine all-to-all, milliseconds.
    pub combine_ms: f64,
    /// `dispatch_ms + combine_ms`.
    pub total_ms: f64,
}

impl EpCost {
    /// Largest bytes sent by one rank.
    pub fn max_bytes_sent(&self) -> u64 {
        self.bytes_sent_per_rank.iter().copied().max().unwrap_or(0)
    }

    /// Mean bytes sent per rank.
    pub fn mean_bytes_sent(&self) -> f64 {
        mean(&self.bytes_sent_per_rank)
    }

    /// Most messages sent by one rank.
    pub fn max_messages(&self) -> u64 {
        self.messages_per_rank.iter().copied().max().unwrap_or(0)
    }

    /// Mean messages sent per rank.
    pub fn mean_messages(&self) -> f64 {
        mean(&self.messages_per_rank)
    }
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
    }
}

/// The cost of `traffic` on `network` (formula in the module docs).
pub fn estimate(traffic: &Traffic, network: &Network) -> EpCost {
    let r = traffic.ranks();
    let rows: Vec<u64> = (0..r).map(|x| traffic.rows_received(x)).collect();
    let max = rows.iter().copied().max().unwrap_or(0) as f64;
    let m = mean(&rows);
    let dispatch_ms = pairwise_exchange_us(r, network, |a, b| traffic.dispatch(a, b)) / 1e3;
    let combine_ms = pairwise_exchange_us(r, network, |a, b| traffic.combine(a, b)) / 1e3;
    EpCost {
        ranks: r,
        network: network.name.clone(),
        bytes_sent_per_rank: (0..r).map(|x| traffic.bytes_sent(x)).collect(),
        bytes_received_per_rank: (0..r).map(|x| traffic.bytes_received(x)).collect(),
        messages_per_rank: (0..r).map(|x| traffic.messages_sent(x)).collect(),
        rows_per_rank: rows,
        imbalance: if m > 0.0 { max / m } else { 1.0 },
        dispatch_ms,
        combine_ms,
        total_ms: dispatch_ms + combine_ms,
    }
}

/// Refuses `ranks` ranks for `n_experts` experts unless `1 <= R <= E` (every rank owns an expert; module docs).
///
/// # Errors
/// [`MoeError::InvalidConfig`] saying what to change.
pub fn check_ranks(n_experts: usize, ranks: usize) -> Result<(), MoeError> {
    if ranks == 0 || ranks > n_experts || ranks > MAX_RANKS {
        return Err(MoeError::config(
            "expert-parallel ranks",
            ranks,
            format!(
                "must be between 1 and E = {n_experts} (every rank owns at least one expert; at most {MAX_RANKS})"
            ),
        ));
    }
    Ok(())
}

/// Predicts one step where rank `r` routed its own tokens into `routings[r]`: experts in contiguous blocks over
/// `R = routings.len()` ranks, rows of width `d`, no rank capacity.
///
/// # Errors
/// [`MoeError::Mismatch`] when the routings have different `E`; [`check_ranks`]'s error.
pub fn predict(routings: &[Routing], d: usize, network: &Network) -> Result<EpCost, MoeError> {
    let e = routings.first().map_or(0, Routing::n_experts);
    if let Some(bad) = routings.iter().find(|x| x.n_experts() != e) {
        return Err(MoeError::mismatch(
            "expert-parallel routings",
            "experts of a rank's routing",
            bad.n_experts(),
            "experts of rank 0's",
            e,
        ));
    }
    check_ranks(e, routings.len())?;
    let placement = Placement::contiguous(e, routings.len())?;
    let mut t = Traffic::new(routings.len())?;
    for (s, x) in routings.iter().enumerate() {
        t.add_source(s, &dispatch_plan(x, &placement), d)?;
    }
    Ok(estimate(&t, network))
}

/// How [`split_trace`] dealt a trace's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSplit {
    /// `[R]`: rank `r`'s routing of its `tokens_per_rank` tokens (weights 1, choice ranks in id order).
    pub routings: Vec<Routing>,
    /// Tokens of the layer in the whole trace (every step, in order).
    pub tokens_available: usize,
    /// Whether `R · tokens_per_rank` exceeded them, so tokens were dealt again from the start.
    pub wrapped: bool,
}

/// The tokens of one layer of a trace, dealt to ranks (see [`split_trace`]).
struct Dealer<'a> {
    records: Vec<&'a moe_core::store::trace::LayerRecord>,
    /// `(step, token)` of every token of the layer, in order.
    index: Vec<(u32, u32)>,
    n_experts: usize,
    tokens_per_rank: usize,
}

impl<'a> Dealer<'a> {
    fn new(
        trace: &'a RoutingTrace,
        layer: usize,
        ranks: usize,
        tokens_per_rank: usize,
    ) -> Result<Self, MoeError> {
        let h = trace.header();
        if layer >= h.n_layers {
            return Err(MoeError::config(
                "trace layer",
                layer,
                format!("the trace has layers 0..{}", h.n_layers),
            ));
        }
        if ranks == 0
            || ranks > MAX_RANKS
            || tokens_per_rank == 0
            || tokens_per_rank > u32::MAX as usize
        {
            return Err(MoeError::config(
                "trace split",
                format!("{ranks} ranks of {tokens_per_rank} tokens"),
                format!("needs 1 to {MAX_RANKS} ranks of 1 to 2^32 - 1 tokens"),
            ));
        }
        let records: Vec<_> = trace.steps().iter().filter_map(|s| s.get(layer)).collect();
        let index: Vec<(u32, u32)> = records
            .iter()
            .enumerate()
            .flat_map(|(s, r)| (0..r.n_tokens() as u32).map(move |t| (s as u32, t)))
            .collect();
        if index.is_empty() {
            return Err(MoeError::config(
                "routing trace",
                "no tokens",
                "needs at least one token",
            ));
        }
        Ok(Dealer {
            records,
            index,
            n_experts: h.n_experts,
            tokens_per_rank,
        })
    }

    /// Rank `r`'s routing: tokens `(r · tokens_per_rank + i) mod N`.
    fn routing(&self, r: usize) -> Result<Routing, MoeError> {
        let (n, tpr) = (self.index.len(), self.tokens_per_rank);
        let start = ((r as u128 * tpr as u128) % n as u128) as usize;
        let mut kept = Vec::new();
        for i in 0..tpr {
            let (s, t) = self.index[(start + i % n) % n];
            for (rank, &e) in self.records[s as usize]
                .token(t as usize)
                .iter()
                .enumerate()
            {
                kept.push(Assignment {
                    token: i as u32,
                    expert: e,
                    weight: 1.0,
                    rank: rank.min(u16::MAX as usize) as u16,
                });
            }
        }
        Routing::new(tpr, self.n_experts, tpr, kept, Vec::new())
    }

    fn wrapped(&self, ranks: usize) -> bool {
        ranks.saturating_mul(self.tokens_per_rank) > self.index.len()
    }
}

/// Deals layer `layer`'s tokens of `trace` (every step in order) to `ranks` ranks: rank `r` gets tokens
/// `(r · tokens_per_rank + i) mod N` for `i < tokens_per_rank`, `N` the trace's tokens of that layer. Holds every
/// rank's routing at once; [`predict_trace`] holds one at a time.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a layer out of range, 0 or more than [`MAX_RANKS`] ranks, 0 or 2³² or more
/// tokens per rank, or a trace without tokens.
pub fn split_trace(
    trace: &RoutingTrace,
    layer: usize,
    ranks: usize,
    tokens_per_rank: usize,
) -> Result<TraceSplit, MoeError> {
    let dealer = Dealer::new(trace, layer, ranks, tokens_per_rank)?;
    Ok(TraceSplit {
        routings: (0..ranks)
            .map(|r| dealer.routing(r))
            .collect::<Result<_, _>>()?,
        tokens_available: dealer.index.len(),
        wrapped: dealer.wrapped(ranks),
    })
}

/// [`predict`] for the ranks of [`split_trace`], building one rank's routing at a time (for 64–1024 ranks).
/// Returns the cost and whether the tokens wrapped.
///
/// # Errors
/// [`split_trace`]'s and [`check_ranks`]'s errors.
pub fn predict_trace(
    trace: &RoutingTrace,
    layer: usize,
    ranks: usize,
    tokens_per_rank: usize,
    d: usize,
    network: &Network,
) -> Result<(EpCost, bool), MoeError> {
    let dealer = Dealer::new(trace, layer, ranks, tokens_per_rank)?;
    check_ranks(dealer.n_experts, ranks)?;
    let placement = Placement::contiguous(dealer.n_experts, ranks)?;
    let mut t = Traffic::new(ranks)?;
    for r in 0..ranks {
        t.add_source(r, &dispatch_plan(&dealer.routing(r)?, &placement), d)?;
    }
    Ok((estimate(&t, network), dealer.wrapped(ranks)))
}
