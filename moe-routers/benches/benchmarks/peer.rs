//! PEER routing at the paper's shape (PERFORMANCE.md PEER row): `N = 1024²` singleton experts, 8 heads, k = 16,
//! `d = 1024`, `d_key = 128`. Throughput is tokens (`Elements(T)`), so criterion reports tokens/s.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group};
use moe_core::rng::SeqRng;
use moe_core::{Router, RouterInput};
use moe_routers::peer::PeerConfig;

/// Routes `T` tokens through a paper-shaped PEER router (query projection, both sub-key halves per head, exact
/// product-key top-k, softmax weights, and building the expert-major plan).
fn peer_routing(c: &mut Criterion) {
    let (d, n, heads, k, d_key) = (1024, 1024, 8, 16, 128);
    let cfg = PeerConfig {
        heads: Some(heads),
        k: Some(k),
        d_key: Some(d_key),
        ..Default::default()
    };
    let router = match cfg.build(d, n * n, 0) {
        Ok(r) => r,
        Err(e) => panic!("the paper shape must build: {e}"),
    };
    let mut group = c.benchmark_group("peer_routing");
    for t in [256usize, 4096] {
        let x = SeqRng::new(1, 0).normal_matrix(t, d, 1.0);
        group.throughput(Throughput::Elements(t as u64));
        group.bench_function(format!("paper_n1024sq_h8_k16_d1024_dk128_t{t}"), |b| {
            b.iter(|| black_box(router.route(&RouterInput::new(black_box(x.view())))))
        });
    }
    group.finish();
}

criterion_group!(benches, peer_routing);
