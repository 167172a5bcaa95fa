//! Eviction policies behind one trait: which resident expert a load evicts.
//!
//! A policy is a pure function of the access sequence it is shown: the same accesses give the same victims,
//! whatever the machine, thread count or timing. Time is the index of an access in its layer's sequence
//! (0, 1, 2, ...), as [`SlotCache`](super::cache::SlotCache) numbers them.

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

impl PolicyKind {
    /// Builds the policy for a layer.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for Belady without `future` ("offline: needs the trace") and pin without
    /// `frequencies`, or frequencies that are not `[E]`.
    pub fn build(self, ctx: &PolicyContext<'_>) -> Result<Box<dyn EvictionPolicy>, MoeError> {
        match self {
            PolicyKind::Lru => Ok(Box::new(Lru::new(ctx.n_experts))),
            other => Err(MoeError::Unsupported {
                owner: format!("eviction policy {other}"),
                feature: "building".into(),
            }),
        }
    }
}
