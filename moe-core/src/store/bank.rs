//! A bank whose experts live in an [`ExpertSource`], with its capacity and eviction policy.

use std::sync::Arc;

use crate::error::MoeError;

use super::cache::SlotCache;
use super::form::ExpertForm;
use super::policy::{PolicyContext, PolicyKind};
use super::source::ExpertSource;

/// Most experts a stored bank may have (2²⁴): a store keeps a few words per expert.
pub const MAX_STORED_EXPERTS: usize = 1 << 24;

/// How many experts of one layer may be resident at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    /// At most this many experts.
    Experts(usize),
    /// At most this many bytes of resident (f32) expert weights: `bytes / ExpertForm::resident_bytes()` slots.
    Bytes(u64),
}

/// How a stored bank keeps its experts: capacity per layer, eviction policy, and the expert frequencies the
/// pin-most-frequent policy pins by (a profile from a trace). [`StoredBank::new`] refuses `pin` without
/// frequencies and `belady` (offline: it needs the future; `moe cache-sim` runs it on a trace).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Resident capacity of the layer.
    pub capacity: Capacity,
    /// Which resident expert a load evicts.
    pub policy: PolicyKind,
    /// Per expert, how often a profile saw it (`[E]`), for [`PolicyKind::Pin`].
    pub frequencies: Option<Vec<u64>>,
}

impl StoreConfig {
    /// `slots` experts resident at most, evicting the least recently used.
    pub fn lru(slots: usize) -> Self {
        StoreConfig {
            capacity: Capacity::Experts(slots),
            policy: PolicyKind::Lru,
            frequencies: None,
        }
    }
}

/// A bank of `E` experts living in a source, at most [`StoredBank::slots`] of them resident at once (an
/// [`ExpertBank::Stored`](crate::ExpertBank::Stored)). Holds no weights itself; the backend that runs it keeps
/// the resident slots. Cloning shares the source.
#[derive(Debug, Clone)]
pub struct StoredBank {
    source: Arc<dyn ExpertSource>,
    config: StoreConfig,
    slots: usize,
}

impl StoredBank {
    /// A stored bank over `source` kept as `config` says.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a capacity of zero experts, or of fewer bytes than one expert takes
    /// resident; a source of 0 or more than [`MAX_STORED_EXPERTS`] experts; `belady` (offline) and `pin` without
    /// frequencies; [`MoeError::Shape`] for frequencies that are not `[E]`.
    pub fn new(source: Arc<dyn ExpertSource>, config: StoreConfig) -> Result<Self, MoeError> {
        let e = source.n_experts();
        if e == 0 || e > MAX_STORED_EXPERTS {
            return Err(MoeError::config(
                "expert store",
                format!("{e} experts"),
                format!("a source of 1 to {MAX_STORED_EXPERTS} experts"),
            ));
        }
        let per = source.form().resident_bytes().max(1);
        let slots = match config.capacity {
            Capacity::Experts(n) => n,
            Capacity::Bytes(b) => usize::try_from(b / per).unwrap_or(usize::MAX),
        };
        if slots == 0 {
            let found = match config.capacity {
                Capacity::Experts(_) => "0 experts".to_string(),
                Capacity::Bytes(b) => format!("{b} bytes"),
            };
            return Err(MoeError::config(
                "expert store capacity",
                &found,
                format!("at least one expert resident ({per} bytes each)"),
            ));
        }
        if let Some(f) = &config.frequencies
            && f.len() != e
        {
            return Err(MoeError::shape(
                "store frequencies",
                format!("[{e}]"),
                &[f.len()],
            ));
        }
        let bank = StoredBank {
            slots: slots.min(e),
            source,
            config,
        };
        // A live store builds its policy without a future: refuse what cannot run now, not at the first forward.
        bank.new_cache()?;
        Ok(bank)
    }

    /// Where the experts live.
    pub fn source(&self) -> &Arc<dyn ExpertSource> {
        &self.source
    }

    /// The experts' form.
    pub fn form(&self) -> &ExpertForm {
        self.source.form()
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Empty slots for this bank, with its policy built for a live store (no future): what a backend keeps per
    /// resident layer.
    ///
    /// # Errors
    /// The policy's build error (`belady` is offline; `pin` needs frequencies).
    pub fn new_cache(&self) -> Result<SlotCache, MoeError> {
        let (n_experts, slots) = (self.source.n_experts(), self.slots);
        let policy = self.config.policy.build(&PolicyContext {
            n_experts,
            slots,
            future: None,
            frequencies: self.config.frequencies.as_deref(),
        })?;
        SlotCache::new(n_experts, slots, policy)
    }

    /// Resident slots: the capacity in experts, at most `E`.
    pub fn slots(&self) -> usize {
        self.slots
    }
}

/// What a resident layer with a stored bank did so far ([`DeviceLayer::store_stats`](crate::DeviceLayer::store_stats)).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    /// Resident slots of the layer.
    pub slots: usize,
    /// Accesses, hits, loads, evictions, prefetches ([`SlotCache`](super::cache::SlotCache)'s counts).
    pub cache: super::cache::CacheStats,
    /// Bytes read from the source's tier (at the stored dtype), demand loads and prefetches.
    pub bytes_read: u64,
    /// Milliseconds forwards spent loading missing experts themselves (demand loads, on the forward's thread).
    pub demand_load_ms: f64,
    /// Milliseconds the background thread spent loading prefetched experts.
    pub prefetch_load_ms: f64,
    /// Milliseconds forwards waited for prefetches still in flight: the prefetch time that compute did not hide
    /// (`1 − wait / prefetch_load` is the overlap).
    pub wait_ms: f64,
    /// Bytes of staging buffers beside the slots (the CUDA backend's pinned host ring; 0 on the CPU backend, whose
    /// prefetches load into their slots).
    pub staging_bytes: u64,
}
