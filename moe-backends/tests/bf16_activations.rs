//! `CpuBackend::with_bf16_activations`: bf16 weights times bf16-rounded activations (AVX-512 BF16). Where the CPU
//! has it: close to the f32-activation output (the activations' rounding, not more), bit-identical on 1 and 2
//! threads, a token's output independent of the rest of its batch, other formats untouched. Where it does not
//! (or with other kernels): refused at upload, never a silent fallback. The kernel's own exactness (every output
//! the exact sum of the bf16 products within f32 accumulation error) is `cpu/dot_bf16.rs`'s unit test.

use std::sync::Arc;

use ndarray::{Array2, s};

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::quant::WeightFormat;
use moe_core::testing::random_bank;
use moe_core::{Backend, MoeError, MoeLayer, RouterInput, SharedExperts, rng::SeqRng};

/// A SwiGLU layer (softmax top-2 router) with a shared expert, its banks in `format`.
fn layer(format: WeightFormat, d: usize, f: usize, rng: &mut SeqRng) -> MoeLayer {
    let e = 6;
    let shared = SharedExperts::new(random_bank(0, 1, d, f, rng), None)
        .unwrap_or_else(|err| panic!("shared: {err}"));
    let router = moe_routers::SoftmaxTopKConfig::default()
        .build(rng.normal_matrix(e, d, 1.0), 2)
        .unwrap_or_else(|err| panic!("router: {err}"));
    MoeLayer::new(Box::new(router), random_bank(0, e, d, f, rng))
        .and_then(|l| l.with_shared(shared))
        .and_then(|l| l.quantized(format))
        .unwrap_or_else(|err| panic!("layer: {err}"))
}

fn forward(backend: &CpuBackend, l: &MoeLayer, x: &Array2<f32>) -> Result<Array2<f32>, MoeError> {
    let mut dev = backend.upload(Arc::new(l.clone()))?;
    Ok(dev.forward(&RouterInput::new(x.view()))?.output)
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16")
}

#[test]
fn bf16_activations_stay_close_to_f32_and_do_not_depend_on_threads_or_batch() {
    let mut rng = SeqRng::new(18, 5);
    let (t, d, f) = (150, 96, 200);
    let l = layer(WeightFormat::Bf16, d, f, &mut rng);
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    let on = |threads| CpuBackend::with_threads(threads).with_bf16_activations(true);
    if !available() {
        let e = forward(&on(1), &l, &x).expect_err("no AVX-512 BF16 here");
        assert!(matches!(e, MoeError::Unsupported { .. }), "{e}");
        return;
    }
    let exact = forward(&CpuBackend::with_threads(2), &l, &x).expect("f32 activations");
    let got = forward(&on(1), &l, &x).expect("bf16 activations");
    // Rounding x and h to bf16 (relative 2^-9 each) moves the output by a few times that: measurably (3.0e-3 on
    // this layer), and no more (twice that fails).
    let (mut diff, mut norm) = (0f64, 0f64);
    for (a, b) in got.iter().zip(&exact) {
        diff += f64::from(a - b).powi(2);
        norm += f64::from(*b).powi(2);
    }
    let rel = (diff / norm).sqrt();
    eprintln!("relative RMS against f32 activations: {rel:e}");
    assert!(
        rel > 1e-3 && rel < 6e-3,
        "relative RMS against f32 activations: {rel:e}"
    );
    assert!(bits(&forward(&on(2), &l, &x).expect("2 threads")) == bits(&got));
    // Each token's output is the same alone, in a batch of 3, or in the whole batch (every row count takes the
    // one bf16 kernel).
    for (lo, hi) in [(0, 1), (7, 8), (20, 23), (149, 150)] {
        let part = forward(&on(2), &l, &x.slice(s![lo..hi, ..]).to_owned()).expect("part");
        assert!(
            bits(&part) == bits(&got.slice(s![lo..hi, ..]).to_owned()),
            "rows {lo}..{hi} alone differ from the batch"
        );
    }
}

#[test]
fn other_formats_are_untouched_and_other_kernels_are_refused() {
    let mut rng = SeqRng::new(18, 6);
    let (t, d, f) = (40, 64, 96);
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    for kernels in [CpuKernels::Avx2, CpuKernels::Portable] {
        let l = layer(WeightFormat::Bf16, d, f, &mut rng);
        let backend = CpuBackend::with_threads(1)
            .with_kernels(kernels)
            .with_bf16_activations(true);
        let e = forward(&backend, &l, &x).expect_err("refused");
        assert!(
            matches!(&e, MoeError::Unsupported { feature, .. } if feature.contains("bf16 activations")),
            "{e}"
        );
    }
    if !available() {
        return;
    }
    for format in [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Mxfp4,
    ] {
        let l = layer(format, d, f, &mut rng);
        let off = forward(&CpuBackend::with_threads(2), &l, &x).expect("off");
        let on = forward(
            &CpuBackend::with_threads(2).with_bf16_activations(true),
            &l,
            &x,
        )
        .expect("on");
        assert!(
            bits(&on) == bits(&off),
            "{format} changed with bf16 activations"
        );
    }
}
