//! Criterion benches of moe-routers (placeholder until the PEER bench lands).

fn main() {}
