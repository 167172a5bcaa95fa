//! The shared router pieces, now the router kit of `moe-core` ([`moe_core::kit`]); re-exported here for the
//! built-in routers.

pub use moe_core::kit::*;
