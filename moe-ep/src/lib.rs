//! Expert parallelism for moe-rs: a layer's experts split across ranks, tokens sent to their experts' owners in an
//! all-to-all (dispatch) and their outputs brought back in a second one (combine), bit-identical to one rank.
//!
//! - [`comm`]: the [`Communicator`] contract (all-to-all with variable counts, all-reduce, barrier, rank and
//!   size, every wait bounded by a timeout) and its implementations: [`ThreadComm`] (ranks as threads of one
//!   process, for tests), `MpiComm` (feature `mpi`, OpenMPI through rsmpi) and `NcclComm` (feature `nccl`,
//!   through cudarc).
//! - [`Placement`]: which rank owns which expert.
//! - [`cost`]: the all-to-all cost model (bytes, messages, expert load per rank; predicted time on a
//!   [`Network`] of alpha-beta [`Link`]s).
//!
//! Design, guarantees and the cost model: `docs/EP.md`.

pub mod comm;
pub mod cost;
pub mod layer;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod network;
pub mod placement;
pub mod plan;
pub mod thread;
mod wire;

#[cfg(feature = "mpi")]
pub use self::mpi::MpiComm;
pub use comm::{Communicator, Exchanged};
pub use cost::{EpCost, Traffic};
pub use layer::{EpLayer, EpOptions, EpStats};
#[cfg(feature = "nccl")]
pub use nccl::NcclComm;
pub use network::{Link, Network};
pub use placement::Placement;
pub use thread::ThreadComm;
