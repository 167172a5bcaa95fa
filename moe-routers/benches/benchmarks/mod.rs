//! The bench modules, one per topic. They live in this folder, not beside `bench_main.rs`, because Cargo would
//! otherwise build each `benches/<topic>.rs` as a bench target of its own with the libtest harness, which rejects
//! criterion's flags (`--sample-size`).

pub mod peer;
