//! Experts beyond memory: where a bank's experts live and how many are resident at once.
//!
//! - [`ExpertSource`]: where expert `e`'s weights are read from when the router picks it — host memory
//!   ([`HostSource`]), a checkpoint file on disk (`moe_models::store`), or any plugin. A source knows the
//!   [`ExpertForm`] of its experts (family, widths, activation, biases) and the [`Tier`] it reads from.
//! - [`StoredBank`]: a bank whose experts live in a source, with a [`StoreConfig`]: the capacity per layer
//!   ([`Capacity`], in experts or bytes), the eviction policy ([`policy::PolicyKind`]). It is an
//!   [`ExpertBank::Stored`](crate::ExpertBank::Stored): a [`MoeLayer`](crate::MoeLayer) routes over all `E`
//!   experts while at most `slots` of them are resident; a backend that runs stored banks fetches the missing
//!   experts of each group before the group runs, fetching only what the routing selected, and its output is
//!   bit-identical to the all-resident layer for every policy and capacity.
//! - [`policy`]: eviction policies behind one trait ([`policy::EvictionPolicy`]): LRU, LFU, LFRU,
//!   pin-most-frequent, least-stale and Belady's MIN (offline, on a trace); pure functions of the access sequence.
//! - [`trace`]: routing traces (per step and layer, the experts each token used) in a documented compact format.
//! - [`cache`]: the slots of one layer ([`cache::SlotCache`]), shared by live stores and the simulator.
//! - [`sim`]: the trace-driven cache simulator behind `moe cache-sim`.
//! - [`stack`]: layers run in order with a residual, each next layer's experts prefetched by its gate.
//!
//! Shapes use the crate's alphabet: `E` experts, `d` hidden, `f` expert FFN width; sizes are bytes.

mod bank;
pub mod cache;
mod form;
pub mod policy;
pub mod sim;
mod source;
pub mod stack;
pub mod trace;

pub use bank::{Capacity, MAX_STORED_EXPERTS, StoreConfig, StoreStats, StoredBank};
pub use form::ExpertForm;
pub use source::{ExpertSource, HostSource, Tier, check_load_dst};
