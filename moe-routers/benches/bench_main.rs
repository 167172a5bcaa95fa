//! Criterion benches of moe-routers, one module per topic in `benches/benchmarks/` (`cargo bench -p moe-routers`).

mod benchmarks;

criterion::criterion_main!(benchmarks::peer::benches);
