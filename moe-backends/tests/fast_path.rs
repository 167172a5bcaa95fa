//! The fast CPU path against the reference path (`cpu::reference_forward`) on random shapes that cross every
//! kernel and tile boundary, and its results on 1, 2 and 3 threads, bit for bit.

use std::sync::Arc;

use ndarray::Array2;
use proptest::prelude::*;

use moe_backends::cpu::{CpuBackend, CpuKernels, reference_forward};
use moe_core::testing::random_bank;
use moe_core::{Assignment, Backend, MoeLayer, RouterInput, SharedExperts, rng::SeqRng};

/// A router that returns a fixed plan (no spec), so a test controls the dispatch exactly.
type Fixed = moe_core::testing::FixedPlan;

/// A plan where each token picks `k` distinct experts among the `live` ones (the others get no tokens), with
/// random positive weights.
fn random_plan(t: usize, k: usize, live: &[usize], rng: &mut SeqRng) -> Vec<Assignment> {
    let mut kept = Vec::new();
    for token in 0..t {
        let mut pool = live.to_vec();
        for rank in 0..k.min(pool.len()) {
            let i = (rng.uniform() * pool.len() as f64) as usize % pool.len();
            let expert = pool.swap_remove(i);
            kept.push(Assignment {
                token: token as u32,
                expert: expert as u32,
                weight: rng.uniform() as f32 + 0.1,
                rank: rank as u16,
            });
        }
    }
    kept
}

/// A layer with a fixed random plan over `t` tokens, optionally a gated shared expert.
fn layer(
    t: usize,
    d: usize,
    e: usize,
    k: usize,
    f: usize,
    kind: u8,
    shared: bool,
    rng: &mut SeqRng,
) -> MoeLayer {
    // Drop about a third of the experts so some get no tokens (never all of them).
    let live: Vec<usize> = (0..e).filter(|&x| x == 0 || rng.uniform() > 0.33).collect();
    let kept = random_plan(t, k, &live, rng);
    let bank = random_bank(kind, e, d, f, rng);
    let mut l = MoeLayer::new(
        Box::new(Fixed {
            n_experts: e,
            d_model: d,
            kept,
        }),
        bank,
    )
    .unwrap_or_else(|err| panic!("layer: {err}"));
    if shared {
        let sb = random_bank(0, 1, d, f + 3, rng);
        let gate = Some(rng.normal_matrix(1, d, 0.3).row(0).to_owned());
        l = l
            .with_shared(SharedExperts::new(sb, gate).unwrap_or_else(|err| panic!("shared: {err}")))
            .unwrap_or_else(|err| panic!("{err}"));
    }
    l
}

/// The kernel sets to test on this machine: portable (`gemm` only), AVX2 (its dot kernel where the CPU has AVX2)
/// and auto (AVX-512's where the CPU has it); printed so a log says which ran.
fn kernel_sets() -> Vec<CpuKernels> {
    let dot = CpuBackend::new().uses_dot_kernel();
    println!(
        "kernel sets tested: portable, avx2, auto{}",
        if dot {
            " (AVX-512 dot)"
        } else {
            " (no AVX-512 here: as avx2)"
        }
    );
    vec![CpuKernels::Portable, CpuKernels::Avx2, CpuKernels::Auto]
}

fn fast(layer: Arc<MoeLayer>, threads: usize, kernels: CpuKernels, x: &Array2<f32>) -> Array2<f32> {
    CpuBackend::with_threads(threads)
        .with_kernels(kernels)
        .upload(layer)
        .and_then(|mut l| {
            // Twice on the same resident layer: the second forward runs on reused workspaces.
            let first = l.forward(&RouterInput::new(x.view()))?;
            let second = l.forward(&RouterInput::new(x.view()))?;
            assert_eq!(
                first.output, second.output,
                "a forward on reused workspaces differs"
            );
            Ok(second.output)
        })
        .unwrap_or_else(|err| panic!("fast forward: {err}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, rng_seed: proptest::test_runner::RngSeed::Fixed(17), ..ProptestConfig::default() })]

    /// Fast path = reference path within 2e-5 of the output's scale, for T from 0 to 299 (one token, T not a
    /// multiple of any block, groups above and below the small-row kernel's limit), d and f across the SIMD width
    /// (tails included), experts with no tokens, every grouped bank kind and an optional gated shared expert.
    #[test]
    fn fast_equals_reference(t in 0usize..300, d in 1usize..90, f in 1usize..120, e in 1usize..10, kf in 0.0f64..1.0,
                             kind in 0u8..4, shared in any::<bool>(), seed in 0u64..10_000) {
        let k = 1 + ((e - 1) as f64 * kf) as usize;
        let mut rng = SeqRng::new(seed, 3);
        let l = Arc::new(layer(t, d, e, k, f, kind, shared, &mut rng));
        let x = rng.normal_matrix(t, d, 1.0);
        let want = reference_forward(&l, &RouterInput::new(x.view())).unwrap_or_else(|err| panic!("reference: {err}")).output;
        for kernels in kernel_sets() {
            let got = fast(l.clone(), 2, kernels, &x);
            prop_assert_eq!(got.dim(), (t, d));
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for ((i, j), &w) in want.indexed_iter() {
                let g = got[[i, j]];
                prop_assert!((g - w).abs() <= 2e-5 * scale, "[{}, {}] ({:?}): fast {} vs reference {} (scale {})", i, j, kernels, g, w, scale);
            }
        }
    }
}

#[test]
fn one_two_and_three_threads_are_bit_identical() {
    // Groups of ~10 rows (dot kernel), ~200 rows (transposed gemm) and ~300 rows (gemm), d and f not multiples of
    // 16, a shared expert.
    let mut rng = SeqRng::new(5, 0);
    for (t, e, k) in [(40, 8, 2), (400, 4, 2), (600, 2, 1), (1, 3, 1)] {
        for kind in 0..4 {
            let l = Arc::new(layer(t, 70, e, k, 150, kind, kind == 0, &mut rng));
            let x = rng.normal_matrix(t, 70, 1.0);
            for kernels in kernel_sets() {
                let one = fast(l.clone(), 1, kernels, &x);
                assert_eq!(
                    one,
                    fast(l.clone(), 2, kernels, &x),
                    "T {t}, bank {kind}, {kernels:?}: 1 vs 2 threads"
                );
                assert_eq!(
                    one,
                    fast(l.clone(), 3, kernels, &x),
                    "T {t}, bank {kind}, {kernels:?}: 1 vs 3 threads"
                );
            }
        }
    }
}

#[test]
fn empty_batch_and_wrong_width_on_the_fast_path() {
    let mut rng = SeqRng::new(9, 0);
    let l = Arc::new(layer(0, 20, 4, 2, 30, 0, true, &mut rng));
    let out = fast(l.clone(), 2, CpuKernels::Portable, &Array2::zeros((0, 20)));
    assert_eq!(out.dim(), (0, 20));
    let err = CpuBackend::with_threads(2)
        .upload(l)
        .and_then(|mut r| r.forward(&RouterInput::new(Array2::<f32>::zeros((3, 21)).view())))
        .map(|_| ());
    match err {
        Err(e) => assert!(e.to_string().contains("hidden"), "{e}"),
        Ok(()) => panic!("a [3, 21] input to a d = 20 layer must be an error"),
    }
}
