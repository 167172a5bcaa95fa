//! Eviction policies behind one trait: which resident expert a load evicts.
//!
//! A policy is a pure function of the access sequence it is shown: the same accesses give the same victims,
//! whatever the machine, thread count or timing. Time is the index of an access in its layer's sequence
//! (0, 1, 2, ...), as [`SlotCache`](super::cache::SlotCache) numbers them (a prefetch takes a time too). Every tie
//! is broken by a stated rule, ending with the expert id, so no choice depends on iteration order.
//!
//! | policy | evicts | source |
//! |---|---|---|
//! | [`Lru`] | the oldest last access | — |
//! | [`Lfu`] | the fewest accesses so far (counts kept across evictions: "perfect LFU"); ties least recent | Breslau et al., *Web caching and Zipf-like distributions*, INFOCOM 1999 (perfect vs in-cache LFU) |
//! | [`Lfru`] | the smallest combined recency-frequency value `CRF = Σ 2^(-(t - tᵢ)/H)`, `H = E` accesses | Lee et al., *LRFU*, IEEE Trans. Computers 50(12), 2001 |
//! | [`Pin`] | LRU among the unpinned; the `slots / 2` most frequent experts of a profile stay once loaded | FlashML-org/FreeToken#174 (frequency pinning) |
//! | [`Stale`] | the largest predicted next use `last + max(EWMA reuse interval, 1)` | SpecMD's least-stale, arXiv 2602.03921, as its public ports implement it (see [`Stale`]) |
//! | [`Belady`] | the farthest next use (never again first) | Belady, IBM Systems Journal 5(2), 1966 (MIN) |
//!
//! Belady's MIN needs the whole future access sequence of the layer ([`PolicyContext::future`]): it is the
//! offline upper bound a simulator reports beside the online policies; it is optimal for single-expert groups
//! (proved by the exchange argument in Belady 1966 and checked against brute force in `tests/store_policy.rs`).

use crate::error::MoeError;

/// The policies, by the names `moe cache-sim --policy` and `StoreConfig` use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// Least frequently used (ties: least recently used).
    Lfu,
    /// Least frequently and recently used.
    Lfru,
    /// Pin the most frequent experts of a profile, LRU for the rest.
    Pin,
    /// Least-stale (SpecMD, arXiv 2602.03921).
    Stale,
    /// Belady's MIN: evict the expert used furthest in the future (offline; needs the whole sequence).
    Belady,
}

impl PolicyKind {
    /// Every policy, in a fixed order.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Lfru,
        PolicyKind::Pin,
        PolicyKind::Stale,
        PolicyKind::Belady,
    ];

    /// The policy's name: `lru`, `lfu`, `lfru`, `pin`, `stale`, `belady`.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Lfru => "lfru",
            PolicyKind::Pin => "pin",
            PolicyKind::Stale => "stale",
            PolicyKind::Belady => "belady",
        }
    }

    /// Parses a name of [`PolicyKind::name`].
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the accepted names.
    pub fn parse(name: &str) -> Result<Self, MoeError> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                MoeError::config(
                    "eviction policy",
                    name,
                    "one of: lru, lfu, lfru, pin, stale, belady",
                )
            })
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a policy may be built from besides its kind.
#[derive(Debug, Clone, Default)]
pub struct PolicyContext<'a> {
    /// Experts `E` of the layer.
    pub n_experts: usize,
    /// Resident slots.
    pub slots: usize,
    /// The whole access sequence of the layer, in access order (Belady's MIN needs it; live stores have none).
    pub future: Option<&'a [u32]>,
    /// Per expert, how often a profile saw it (`[E]`; the pin policy pins the most frequent).
    pub frequencies: Option<&'a [u64]>,
}

/// Chooses which resident expert a load evicts.
pub trait EvictionPolicy: Send + std::fmt::Debug {
    /// The policy's kind.
    fn kind(&self) -> PolicyKind;

    /// `expert` was requested at access `time` (times increase by one per access); `hit` says whether it was
    /// resident. Called for every access, hits and misses, before any eviction the access causes.
    fn on_access(&mut self, expert: u32, time: u64, hit: bool);

    /// The expert to evict among `candidates` (resident experts that may leave now, ascending, never empty) to
    /// make room for the access at `time`. Must return one of `candidates`.
    fn victim(&mut self, candidates: &[u32], time: u64) -> u32;

    /// `expert` left the cache (evicted, or its load failed).
    fn on_evict(&mut self, expert: u32) {
        let _ = expert;
    }
}

/// `v[e]`, 0 past the end.
fn at(v: &[u64], e: u32) -> u64 {
    v.get(e as usize).copied().unwrap_or(0)
}

/// The first of `candidates` (ascending ids) in the order `cmp`, ties to the lower id.
fn first_by(candidates: &[u32], cmp: impl Fn(u32, u32) -> std::cmp::Ordering) -> u32 {
    candidates
        .iter()
        .copied()
        .min_by(|&a, &b| cmp(a, b).then(a.cmp(&b)))
        .unwrap_or(0)
}

/// Least recently used: evicts the candidate whose last access is oldest (ties: the lower id).
#[derive(Debug, Clone)]
pub struct Lru {
    last: Vec<u64>,
}

impl Lru {
    /// LRU over `n_experts` experts.
    pub fn new(n_experts: usize) -> Self {
        Lru {
            last: vec![0; n_experts],
        }
    }
}

impl EvictionPolicy for Lru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }

    fn on_access(&mut self, expert: u32, time: u64, _hit: bool) {
        if let Some(t) = self.last.get_mut(expert as usize) {
            *t = time;
        }
    }

    fn victim(&mut self, candidates: &[u32], _time: u64) -> u32 {
        candidates
            .iter()
            .copied()
            .min_by_key(|&e| (self.last.get(e as usize).copied().unwrap_or(0), e))
            .unwrap_or(0)
    }
}

/// Least frequently used: evicts the candidate with the fewest accesses so far (ties: the least recent, then the
/// lower id).
///
/// Counts persist across evictions ("perfect LFU" in Breslau et al., INFOCOM 1999, as opposed to "in-cache LFU",
/// which forgets an evicted expert's count): an expert's routing frequency is a property of the model and the
/// data, not of its stay in the cache, and a per-layer expert popularity that changes slowly is the case LFU is
/// for. A prefetch counts as an access (the cache shows it to the policy as one).
#[derive(Debug, Clone)]
pub struct Lfu {
    count: Vec<u64>,
    last: Vec<u64>,
}

impl Lfu {
    /// LFU over `n_experts` experts, every count 0.
    pub fn new(n_experts: usize) -> Self {
        Lfu {
            count: vec![0; n_experts],
            last: vec![0; n_experts],
        }
    }
}

impl EvictionPolicy for Lfu {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lfu
    }

    fn on_access(&mut self, expert: u32, time: u64, _hit: bool) {
        let e = expert as usize;
        if let (Some(c), Some(t)) = (self.count.get_mut(e), self.last.get_mut(e)) {
            *c += 1;
            *t = time;
        }
    }

    fn victim(&mut self, candidates: &[u32], _time: u64) -> u32 {
        let key = |e: u32| {
            let i = e as usize;
            (
                self.count.get(i).copied().unwrap_or(0),
                self.last.get(i).copied().unwrap_or(0),
                e,
            )
        };
        candidates
            .iter()
            .copied()
            .min_by_key(|&e| key(e))
            .unwrap_or(0)
    }
}

/// Least frequently and recently used, as LRFU's combined recency-frequency value (Lee, Choi, Kim, Noh, Min, Cho
/// and Kim, "LRFU: a spectrum of policies that subsumes the least recently used and least frequently used
/// policies", IEEE Trans. Computers 50(12), 2001): each past access at time `tᵢ` weighs `2^(-(t - tᵢ)/H)` at
/// time `t`, an expert's value is the sum, and the smallest value is evicted (ties: the least recent, then the
/// lower id).
///
/// `H`, the half-life, is `E` accesses (LRFU's `λ = 1/E`): an access counts half after the layer has seen as
/// many accesses as it has experts (`E / k` tokens at top-k). `H → 0` is LRU, `H → ∞` LFU. vLLM's LFRU expert
/// cache (vllm-project/vllm#37190) motivated the policy; its formula was not in the public text we could read,
/// so this is the published LRFU instead. Values persist across evictions, as in [`Lfu`].
///
/// Computed in the log domain, `log2 CRF(t) = log2 C + (tₗ - t)/H` with `C` the value at the last access `tₗ`,
/// so comparisons at one `t` use `log2 C + tₗ/H` and nothing underflows on long traces.
#[derive(Debug, Clone)]
pub struct Lfru {
    /// `C`: the value at the last access (0: never accessed).
    crf: Vec<f64>,
    last: Vec<u64>,
    half_life: f64,
}

impl Lfru {
    /// LRFU over `n_experts` experts with a half-life of `n_experts` accesses (at least 1).
    pub fn new(n_experts: usize) -> Self {
        Lfru {
            crf: vec![0.0; n_experts],
            last: vec![0; n_experts],
            half_life: n_experts.max(1) as f64,
        }
    }

    /// `log2 CRF + tₗ / H`: larger means keep (−∞ for an expert never accessed).
    fn key(&self, e: u32) -> f64 {
        let i = e as usize;
        match (self.crf.get(i), self.last.get(i)) {
            (Some(&c), Some(&t)) if c > 0.0 => c.log2() + t as f64 / self.half_life,
            _ => f64::NEG_INFINITY,
        }
    }
}

impl EvictionPolicy for Lfru {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lfru
    }

    fn on_access(&mut self, expert: u32, time: u64, _hit: bool) {
        let e = expert as usize;
        let h = self.half_life;
        if let (Some(c), Some(t)) = (self.crf.get_mut(e), self.last.get_mut(e)) {
            let age = time.saturating_sub(*t) as f64;
            *c = 1.0 + *c * (-age / h).exp2();
            *t = time;
        }
    }

    fn victim(&mut self, candidates: &[u32], _time: u64) -> u32 {
        // Smallest CRF value, then least recent, then lowest id.
        first_by(candidates, |a, b| {
            self.key(a)
                .total_cmp(&self.key(b))
                .then(at(&self.last, a).cmp(&at(&self.last, b)))
        })
    }
}

/// Pin-most-frequent: the `p` most frequent experts of a profile are never evicted once loaded; LRU among the
/// rest (ties: the lower id).
///
/// `p = min(slots, E) / 2` (rounded down): half the slots hold the profile's favourites, half follow the
/// recent past; 0 with one slot (plain LRU), at least 1 from two slots on. The favourites are the `p` largest
/// frequencies, ties to the lower id. When a group needs every unpinned slot, a pinned expert outside the group
/// is evicted after all (the least recent one): a group must fit.
#[derive(Debug, Clone)]
pub struct Pin {
    pinned: Vec<bool>,
    lru: Lru,
}

impl Pin {
    /// Pins the `min(slots, E) / 2` most frequent of `frequencies` (`[E]`).
    pub fn new(frequencies: &[u64], slots: usize) -> Self {
        let n = frequencies.len();
        let p = slots.min(n) / 2;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&e| (std::cmp::Reverse(frequencies[e]), e));
        let mut pinned = vec![false; n];
        for &e in order.iter().take(p) {
            pinned[e] = true;
        }
        Pin {
            pinned,
            lru: Lru::new(n),
        }
    }

    /// The pinned experts, ascending.
    pub fn pinned(&self) -> Vec<u32> {
        (0..self.pinned.len() as u32)
            .filter(|&e| self.pinned[e as usize])
            .collect()
    }
}

impl EvictionPolicy for Pin {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Pin
    }

    fn on_access(&mut self, expert: u32, time: u64, hit: bool) {
        self.lru.on_access(expert, time, hit);
    }

    fn victim(&mut self, candidates: &[u32], time: u64) -> u32 {
        let free: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&e| !self.pinned.get(e as usize).copied().unwrap_or(false))
            .collect();
        if free.is_empty() {
            self.lru.victim(candidates, time)
        } else {
            self.lru.victim(&free, time)
        }
    }
}

/// Least-stale (SpecMD, Hoang, Jaiswal, Samragh and Cho, arXiv 2602.03921): predicts each resident expert's next
/// use from its reuse interval and evicts the one predicted to be needed last.
///
/// The paper's own text (beyond its abstract: "exploits MoE's predictable expert access patterns") was not
/// available to us; this follows the rule two public re-implementations that call themselves ports of SpecMD's
/// least-stale agree on: per resident expert, the time of its last access `tₗ` and an exponentially weighted
/// mean `I` of its reuse intervals (the first observed interval seeds it, then `I ← 0.75·I + 0.25·Δ`); the
/// predicted next use is `tₗ + max(I, 1)`, and the candidate with the latest one is evicted (ties: the more
/// recent `tₗ`, then the lower id). An expert whose predicted use has passed (stale) is kept: it is due. The
/// state of an evicted expert is forgotten; reloaded, it starts afresh (`I = 0`, predicted next use `tₗ + 1`).
/// We checked the implementation against the hand-traced victim sequence of one of those ports
/// (`tests/store_policy.rs`).
#[derive(Debug, Clone)]
pub struct Stale {
    last: Vec<u64>,
    interval: Vec<f64>,
    resident: Vec<bool>,
}

impl Stale {
    /// Least-stale over `n_experts` experts.
    pub fn new(n_experts: usize) -> Self {
        Stale {
            last: vec![0; n_experts],
            interval: vec![0.0; n_experts],
            resident: vec![false; n_experts],
        }
    }

    fn predicted_next(&self, e: u32) -> f64 {
        let i = e as usize;
        let last = self.last.get(i).copied().unwrap_or(0) as f64;
        last + self.interval.get(i).copied().unwrap_or(0.0).max(1.0)
    }
}

impl EvictionPolicy for Stale {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Stale
    }

    fn on_access(&mut self, expert: u32, time: u64, _hit: bool) {
        let e = expert as usize;
        let (Some(last), Some(interval), Some(resident)) = (
            self.last.get_mut(e),
            self.interval.get_mut(e),
            self.resident.get_mut(e),
        ) else {
            return;
        };
        if *resident {
            let gap = time.saturating_sub(*last);
            if gap > 0 {
                let gap = gap as f64;
                *interval = if *interval == 0.0 {
                    gap
                } else {
                    0.75 * *interval + 0.25 * gap
                };
            }
        } else {
            *interval = 0.0;
            *resident = true;
        }
        *last = time;
    }

    fn victim(&mut self, candidates: &[u32], _time: u64) -> u32 {
        // Latest predicted use, then most recent last access, then lowest id.
        first_by(candidates, |a, b| {
            self.predicted_next(b)
                .total_cmp(&self.predicted_next(a))
                .then(at(&self.last, b).cmp(&at(&self.last, a)))
        })
    }

    fn on_evict(&mut self, expert: u32) {
        if let Some(r) = self.resident.get_mut(expert as usize) {
            *r = false;
        }
    }
}

/// "Never used again" as a next-use time.
const NEVER: u64 = u64::MAX;

/// Belady's MIN (L. A. Belady, "A study of replacement algorithms for a virtual-storage computer", IBM Systems
/// Journal 5(2), 1966): evicts the candidate whose next use is farthest in the future; candidates never used
/// again go first; ties: the lower id.
///
/// Offline: built on the layer's whole access sequence (`future[time]` is the expert of access `time`). The
/// next-use index of every position is precomputed once (`O(n)`), so a victim costs `O(candidates)`. If an
/// access does not match `future` (a caller replaying another sequence), the next use of that expert is found by
/// a scan instead, and the result is no longer an optimum of anything.
#[derive(Debug, Clone)]
pub struct Belady {
    future: Vec<u32>,
    /// `next[i]`: the next position after `i` holding `future[i]`, or [`NEVER`].
    next: Vec<u64>,
    /// Per expert, its next use after its last access (first use before any access).
    next_use: Vec<u64>,
}

impl Belady {
    /// MIN over `n_experts` experts and the access sequence `future` (ids `>= E` are never resident; they are
    /// kept only for the positions).
    pub fn new(n_experts: usize, future: &[u32]) -> Self {
        let mut next = vec![NEVER; future.len()];
        let mut seen = vec![NEVER; n_experts];
        for (i, &e) in future.iter().enumerate().rev() {
            if let Some(s) = seen.get_mut(e as usize) {
                next[i] = *s;
                *s = i as u64;
            }
        }
        Belady {
            future: future.to_vec(),
            next,
            next_use: seen,
        }
    }

    fn scan_next(&self, expert: u32, time: u64) -> u64 {
        let from = usize::try_from(time).map_or(self.future.len(), |t| t.saturating_add(1));
        self.future
            .get(from..)
            .and_then(|rest| rest.iter().position(|&x| x == expert))
            .map_or(NEVER, |p| (from + p) as u64)
    }
}

impl EvictionPolicy for Belady {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Belady
    }

    fn on_access(&mut self, expert: u32, time: u64, _hit: bool) {
        let at = usize::try_from(time).ok();
        let n = match at.and_then(|i| self.future.get(i).map(|&x| (i, x))) {
            Some((i, x)) if x == expert => self.next[i],
            _ => self.scan_next(expert, time),
        };
        if let Some(u) = self.next_use.get_mut(expert as usize) {
            *u = n;
        }
    }

    fn victim(&mut self, candidates: &[u32], _time: u64) -> u32 {
        candidates
            .iter()
            .copied()
            .max_by_key(|&e| {
                (
                    self.next_use.get(e as usize).copied().unwrap_or(NEVER),
                    std::cmp::Reverse(e),
                )
            })
            .unwrap_or(0)
    }
}

impl PolicyKind {
    /// Builds the policy for a layer.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for Belady without `future` ("offline: needs the trace") and pin without
    /// `frequencies`, or frequencies that are not `[E]`.
    pub fn build(self, ctx: &PolicyContext<'_>) -> Result<Box<dyn EvictionPolicy>, MoeError> {
        let e = ctx.n_experts;
        Ok(match self {
            PolicyKind::Lru => Box::new(Lru::new(e)),
            PolicyKind::Lfu => Box::new(Lfu::new(e)),
            PolicyKind::Lfru => Box::new(Lfru::new(e)),
            PolicyKind::Stale => Box::new(Stale::new(e)),
            PolicyKind::Pin => {
                let f = ctx.frequencies.ok_or_else(|| {
                    MoeError::config(
                        "eviction policy",
                        "pin",
                        "pin needs expert frequencies (a profile, e.g. from a routing trace)",
                    )
                })?;
                if f.len() != e {
                    return Err(MoeError::mismatch(
                        "pin policy profile",
                        "frequencies",
                        f.len(),
                        "experts E",
                        e,
                    ));
                }
                Box::new(Pin::new(f, ctx.slots))
            }
            PolicyKind::Belady => {
                let f = ctx.future.ok_or_else(|| {
                    MoeError::config(
                        "eviction policy",
                        "belady",
                        "Belady's MIN is offline: it needs the whole access sequence (a trace; moe cache-sim)",
                    )
                })?;
                Box::new(Belady::new(e, f))
            }
        })
    }
}
