//! Criterion benches of the CPU layer at PERFORMANCE.md's CPU shapes (`cargo bench -p moe-backends --bench layer`):
//! the full forward (gate, routing, grouped experts, combine) and, beside it, the gate projection plus routing
//! alone, so the share of the experts is visible; and the training step: `forward_train` + `backward`, and the
//! backward alone (timed around `backward` only, each after an untimed `forward_train`), to compare with the
//! forward (the target: backward at most 2.2 x the forward at T >= 512), with the router's own backward and
//! the gradients handed back from step to step (`backward_into`), as a training loop does. Threads: all cores, or `MOE_BENCH_THREADS`. `MOE_BENCH_FILTER_T`
//! (comma-separated) keeps only those token counts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};

use moe_backends::cpu::CpuBackend;
use moe_core::{
    Backend, LayerGrads, MoeLayer, RouterArgs, RouterInput, WorkloadConfig,
    workload::random_swiglu_bank,
};

/// A benchmark shape: name, d, ffn, E, k, token counts.
type Shape = (&'static str, usize, usize, usize, usize, &'static [usize]);

const SHAPES: &[Shape] = &[
    ("mixtral-like", 1024, 3584, 8, 2, &[16, 128, 512, 2048]),
    ("olmoe-like", 2048, 1408, 64, 6, &[128, 512, 2048]),
];

fn threads() -> usize {
    std::env::var("MOE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn kept_tokens() -> Option<Vec<usize>> {
    std::env::var("MOE_BENCH_FILTER_T")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
}

fn layer(c: &mut Criterion) {
    let threads = threads();
    for &(name, d, f, e, k, tokens) in SHAPES {
        let registry = moe_routers::builtin();
        let router = registry
            .create("softmax-topk", &RouterArgs::new(d, e, k, 0))
            .unwrap_or_else(|err| panic!("{err}"));
        let bank = random_swiglu_bank(e, d, f, 0).unwrap_or_else(|err| panic!("{err}"));
        let layer = Arc::new(MoeLayer::new(router, bank).unwrap_or_else(|err| panic!("{err}")));
        let mut resident = CpuBackend::with_threads(threads)
            .upload(layer.clone())
            .unwrap_or_else(|err| panic!("{err}"));
        let mut g = c.benchmark_group(format!("cpu_layer/{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        let keep = kept_tokens();
        for &t in tokens {
            if keep.as_ref().is_some_and(|k| !k.contains(&t)) {
                continue;
            }
            let w = WorkloadConfig {
                tokens: t,
                d_model: d,
                skew: 0.0,
                clusters: 256,
                ..Default::default()
            }
            .generate()
            .unwrap_or_else(|err| panic!("{err}"));
            let input = RouterInput::new(w.hidden.view());
            g.throughput(Throughput::Elements(t as u64));
            g.bench_with_input(BenchmarkId::new("forward", t), &input, |b, input| {
                b.iter(|| {
                    resident
                        .forward(input)
                        .unwrap_or_else(|err| panic!("{err}"))
                })
            });
            g.bench_with_input(BenchmarkId::new("gate+routing", t), &input, |b, input| {
                b.iter(|| {
                    layer
                        .router()
                        .route(input)
                        .unwrap_or_else(|err| panic!("{err}"))
                })
            });
            let backend = CpuBackend::with_threads(threads);
            let mut train = backend
                .upload(layer.clone())
                .unwrap_or_else(|err| panic!("{err}"));
            let d_output = ndarray::Array2::<f32>::ones((t, d));
            let mut grads = LayerGrads::empty();
            g.bench_with_input(
                BenchmarkId::new("forward_train+backward", t),
                &input,
                |b, input| {
                    b.iter(|| {
                        let out = train
                            .forward_train(input)
                            .unwrap_or_else(|err| panic!("{err}"));
                        train
                            .backward_into(
                                d_output.view(),
                                &out.routing.aux_coefficients(),
                                &mut grads,
                            )
                            .unwrap_or_else(|err| panic!("{err}"))
                    })
                },
            );
            g.bench_with_input(BenchmarkId::new("backward", t), &input, |b, input| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let out = train
                            .forward_train(input)
                            .unwrap_or_else(|err| panic!("{err}"));
                        let d_aux = out.routing.aux_coefficients();
                        let t0 = Instant::now();
                        train
                            .backward_into(d_output.view(), &d_aux, &mut grads)
                            .unwrap_or_else(|err| panic!("{err}"));
                        total += t0.elapsed();
                    }
                    total
                })
            });
        }
        g.finish();
    }
}

criterion::criterion_group!(benches, layer);
criterion::criterion_main!(benches);
