//! The CUDA backend against the CPU reference, on seeded random layers: the cases every device backend runs
//! (`device_parity`: every bank kind, every top-k spec option, the host path with Switch, hash, expert choice,
//! noisy top-k and a plugin plan, padding, empty experts, bad input, activations), plus shapes that cross the
//! 64-row / 64-column tiles and the 32-wide k steps, bf16 and f16 weights, and CUDA-event timing.
//!
//! Tolerances (see `device_parity`): f32 weights to 1e-5 of `max(max |cpu|, 1)`; bf16 / f16 weights to 1e-2 of
//! `max |cpu|` against the CPU on the f32 weights; routing exactly as f32 (the router stays f32).
//!
//! Without a GPU (no driver, no NVRTC) every test prints why and returns, unless `MOE_REQUIRE_GPU=cuda` is set:
//! then a missing GPU fails the test (scripts/cuda-device.sh sets it on the GPU machine).
#![cfg(feature = "cuda")]

#[macro_use]
mod device_parity;

use std::sync::{Arc, OnceLock};

use moe_backends::cpu::CpuBackend;
use moe_backends::cuda::{CudaBackend, Dtype};
use moe_core::{
    Activation, Backend, ExpertBank, GptOssBank, MoeLayer, RouterInput, RouterPath, SharedExperts,
};
use moe_routers::{SoftmaxTopKConfig, TopKPreset};
use ndarray::Array2;

use device_parity::{
    Device, check_on, compare, matrix, mlp, rng, swiglu, tensor3, topk_router, vector,
};

/// The shared backend (f32 weights), or `None` (after printing why) when this machine has no GPU.
fn backend() -> Option<CudaBackend> {
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "cuda",
        B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())),
    )
}

shared_cases!(backend, device);

/// The backend names its GPU and what it runs natively.
#[test]
fn capabilities_name_the_gpu() {
    let Some(b) = backend() else { return };
    let c = b.capabilities();
    assert!(!c.device.is_empty());
    assert_eq!(c.native_specs, vec!["topk"]);
    assert_eq!(c.dtypes, vec!["f32", "bf16", "f16", "int8", "fp8", "mxfp4"]);
    assert!(c.banks.iter().any(|k| k == "swiglu") && c.banks.iter().any(|k| k == "mlp"));
    assert!(c.banks.iter().any(|k| k == "packed"));
    let opened = moe_backends::open(moe_backends::BackendKind::Cuda).expect("open");
    assert_eq!(opened.name(), "cuda");
}

/// The backend with 16-bit weights, or `None` without a GPU.
fn half_backend(dtype: Dtype) -> Option<CudaBackend> {
    backend()?;
    Some(CudaBackend::with_dtype(dtype).expect("the GPU opened once already"))
}

/// `b` as a device under test.
fn device(b: &CudaBackend) -> Device<'_> {
    Device {
        backend: b,
        dtype: b.dtype(),
        switch_path: RouterPath::Host,
    }
}

/// Shapes that cross every tile edge: several 64-row tiles per expert, output columns past one 64-wide tile,
/// reductions with a tail after 32-wide (tensor-core) and 16-wide (FMA) steps, and widths that are and are not
/// multiples of 8 (the 16-bit kernel's vector and scalar staging). All three bank kinds, a gated shared expert.
fn tile_edge_layers(seed: u64) -> Vec<(MoeLayer, Array2<f32>)> {
    let mut out = Vec::new();
    for (i, &(t, d, f, e, k)) in [
        (300, 72, 136, 4, 2),
        (257, 70, 66, 3, 2),
        (130, 40, 200, 6, 3),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(seed + i as u64);
        let bank = match i {
            0 => swiglu(&mut r, e, d, f, Activation::Silu),
            1 => mlp(&mut r, e, d, f, Activation::Gelu, true),
            _ => ExpertBank::GptOss(
                GptOssBank::new(
                    tensor3(&mut r, e, d, 2 * f, 0.3),
                    matrix(&mut r, e, 2 * f, 0.3),
                    tensor3(&mut r, e, f, d, 0.1),
                    matrix(&mut r, e, d, 0.3),
                    1.702,
                    7.0,
                )
                .expect("bank"),
            ),
        };
        let shared = swiglu(&mut r, 1, d, 96, Activation::Silu);
        let gate = vector(&mut r, d, 0.3);
        let layer = MoeLayer::new(
            topk_router(&mut r, e, d, k, TopKPreset::Qwen2Moe.config()),
            bank,
        )
        .and_then(|l| l.with_shared(SharedExperts::new(shared, Some(gate))?))
        .expect("layer");
        out.push((layer, matrix(&mut r, t, d, 1.0)));
    }
    out
}

#[test]
fn tile_edges_f32() {
    let Some(b) = backend() else { return };
    for (layer, x) in tile_edge_layers(1000) {
        check_on(
            &device(&b),
            layer,
            &RouterInput::new(x.view()),
            RouterPath::Native,
        );
    }
}

/// bf16 and f16 weights (tensor cores from compute capability 8.0) on the tile-edge shapes and on DeepSeek-V3
/// style routing, against the CPU on the f32 weights.
#[test]
fn half_precision_weights() {
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let Some(b) = half_backend(dtype) else { return };
        for (layer, x) in tile_edge_layers(1100) {
            check_on(
                &device(&b),
                layer,
                &RouterInput::new(x.view()),
                RouterPath::Native,
            );
        }
        let mut r = rng(1200);
        let cfg = SoftmaxTopKConfig {
            n_group: Some(4),
            topk_group: Some(2),
            ..TopKPreset::DeepseekV3.config()
        };
        let router = cfg
            .build(matrix(&mut r, 16, 64, 1.0), 4)
            .expect("router")
            .with_correction_bias(vector(&mut r, 16, 0.3))
            .expect("bias");
        let layer = MoeLayer::new(
            Box::new(router),
            swiglu(&mut r, 16, 64, 48, Activation::Silu),
        )
        .expect("layer");
        let x = matrix(&mut r, 190, 64, 1.0);
        check_on(
            &device(&b),
            layer,
            &RouterInput::new(x.view()),
            RouterPath::Native,
        );
    }
}

/// Device timing: one figure per repeat, each positive, and the layer still gives the CPU's result afterwards.
#[test]
fn device_times_with_events() {
    let Some(b) = backend() else { return };
    let mut r = rng(1300);
    let (t, d, f, e, k) = (128, 64, 96, 8, 2);
    let layer = Arc::new(
        MoeLayer::new(
            topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config()),
            swiglu(&mut r, e, d, f, Activation::Silu),
        )
        .expect("layer"),
    );
    let x = matrix(&mut r, t, d, 1.0);
    let input = RouterInput::new(x.view());
    let mut dev = b.upload(Arc::clone(&layer)).expect("upload");
    let times = dev
        .device_times(&input, 5)
        .expect("timed")
        .expect("the cuda backend has a device clock");
    assert_eq!(times.len(), 5);
    assert!(
        times.iter().all(|&ms| ms > 0.0 && ms.is_finite()),
        "{times:?}"
    );
    let want = CpuBackend::new()
        .upload(layer)
        .expect("cpu")
        .forward(&input)
        .expect("cpu");
    compare(&want, &dev.forward(&input).expect("cuda"));
}
