//! The wgpu backend against the CPU reference, on seeded random layers: every bank kind the device runs, every
//! router spec option, the host path, capacity drops, padding, empty experts, chunked weights, and bad input.
//!
//! Tolerance: outputs agree to `max |wgpu − cpu| ≤ 1e-5 · max(max |cpu|, 1)` (f32 sums in another order on the
//! device; the largest seen is about 1e-6 relative), routing weights to 1e-5 absolute, and the chosen experts,
//! their ranks and the dropped assignments are identical (the seeded cases have no near ties).
//!
//! Without an adapter every test prints why and returns, unless `MOE_REQUIRE_GPU=wgpu` is set: then a missing
//! adapter fails the test (CI sets it, with Mesa's lavapipe installed).
#![cfg(feature = "wgpu")]

use std::sync::{Arc, OnceLock};

use ndarray::{Array1, Array2, Array3};

use moe_backends::cpu::CpuBackend;
use moe_backends::wgpu::{WgpuBackend, WgpuOptions};
use moe_core::{
    Activation, Assignment, Backend, ExpertBank, GptOssBank, LayerOutput, MlpBank, MoeError,
    MoeLayer, PeerBank, Router, RouterArgs, RouterInput, RouterPath, Routing, SharedExperts,
    SwiGluBank, rng::SeqRng,
};
use moe_routers::{SoftmaxTopKConfig, SwitchTop1Config, TopKPreset};

/// Output tolerance relative to `max(max |ref|, 1)`.
const OUT_TOL: f32 = 1e-5;
/// Routing weight tolerance, absolute.
const W_TOL: f32 = 1e-5;

/// The shared backend, or `None` (after printing why) when this machine has no adapter.
fn backend() -> Option<WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    match B.get_or_init(|| WgpuBackend::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b.clone()),
        Err(why) => {
            if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "wgpu") {
                panic!("MOE_REQUIRE_GPU=wgpu but the wgpu backend is unavailable: {why}");
            }
            eprintln!("skipping: wgpu backend unavailable: {why}");
            None
        }
    }
}

fn rng(seed: u64) -> SeqRng {
    SeqRng::new(seed, 77)
}

fn matrix(r: &mut SeqRng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    r.normal_matrix(rows, cols, scale)
}

fn tensor3(r: &mut SeqRng, a: usize, b: usize, c: usize, scale: f32) -> Array3<f32> {
    let m = r.normal_matrix(a * b, c, scale);
    Array3::from_shape_vec((a, b, c), m.into_iter().collect()).expect("shape")
}

fn vector(r: &mut SeqRng, n: usize, scale: f32) -> Array1<f32> {
    r.normal_matrix(1, n, scale).into_iter().collect()
}

fn swiglu(r: &mut SeqRng, e: usize, d: usize, f: usize, act: Activation) -> ExpertBank {
    let s1 = 1.0 / (d as f32).sqrt();
    let s2 = 1.0 / (f as f32).sqrt();
    ExpertBank::SwiGlu(
        SwiGluBank::new(tensor3(r, e, 2 * f, d, s1), tensor3(r, e, d, f, s2), act).expect("bank"),
    )
}

fn mlp(r: &mut SeqRng, e: usize, d: usize, f: usize, act: Activation, biases: bool) -> ExpertBank {
    let s1 = 1.0 / (d as f32).sqrt();
    let s2 = 1.0 / (f as f32).sqrt();
    let w1 = tensor3(r, e, f, d, s1);
    let w2 = tensor3(r, e, d, f, s2);
    let (b1, b2) = if biases {
        (Some(matrix(r, e, f, 0.5)), Some(matrix(r, e, d, 0.5)))
    } else {
        (None, None)
    };
    ExpertBank::Mlp(MlpBank::new(w1, b1, w2, b2, act).expect("bank"))
}

fn topk_router(
    r: &mut SeqRng,
    e: usize,
    d: usize,
    k: usize,
    cfg: SoftmaxTopKConfig,
) -> Box<dyn Router> {
    Box::new(cfg.build(matrix(r, e, d, 1.0), k).expect("router"))
}

/// Runs `layer` on both backends and checks outputs and plans; returns the wgpu output.
fn check(layer: MoeLayer, input: &RouterInput<'_>, path: RouterPath) -> Option<LayerOutput> {
    check_on(&backend()?, layer, input, path)
}

fn check_on(
    wgpu: &WgpuBackend,
    layer: MoeLayer,
    input: &RouterInput<'_>,
    path: RouterPath,
) -> Option<LayerOutput> {
    let layer = Arc::new(layer);
    let want = CpuBackend::new()
        .upload(Arc::clone(&layer))
        .expect("cpu upload")
        .forward(input)
        .expect("cpu forward");
    let got = wgpu
        .upload(layer)
        .expect("wgpu upload")
        .forward(input)
        .expect("wgpu forward");
    assert_eq!(got.router_path, path, "router path");
    compare(&want, &got);
    Some(got)
}

fn compare(want: &LayerOutput, got: &LayerOutput) {
    assert_eq!(want.output.dim(), got.output.dim());
    let scale = want.output.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = want
        .output
        .iter()
        .zip(&got.output)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= OUT_TOL * scale,
        "max |wgpu - cpu| = {diff:e} > {OUT_TOL:e} * {scale}"
    );
    compare_routing(&want.routing, &got.routing);
}

fn compare_routing(want: &Routing, got: &Routing) {
    assert_eq!(want.n_tokens(), got.n_tokens());
    assert_eq!(want.n_experts(), got.n_experts());
    assert_eq!(want.n_real_tokens(), got.n_real_tokens());
    let (a, b) = (want.per_token(), got.per_token());
    for (t, (x, y)) in a.iter().zip(&b).enumerate() {
        let ex: Vec<(usize, u16)> = x.iter().map(|p| (p.0, p.2)).collect();
        let ey: Vec<(usize, u16)> = y.iter().map(|p| (p.0, p.2)).collect();
        assert_eq!(ex, ey, "token {t}: experts and ranks");
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p.1 - q.1).abs() <= W_TOL,
                "token {t}: weight {} vs {}",
                p.1,
                q.1
            );
        }
    }
    let key = |v: &[Assignment]| -> Vec<(u32, u32)> {
        let mut k: Vec<(u32, u32)> = v.iter().map(|a| (a.token, a.expert)).collect();
        k.sort_unstable();
        k
    };
    assert_eq!(key(want.dropped()), key(got.dropped()), "dropped");
    assert_eq!(want.offsets(), got.offsets());
    assert_eq!(want.slot_tokens(), got.slot_tokens());
    if let (Some(l1), Some(l2)) = (want.logits(), got.logits()) {
        let s = l1.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let dl = l1
            .iter()
            .zip(l2)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(dl <= OUT_TOL * s, "logits differ by {dl:e}");
    }
}

#[test]
fn smoke_mixtral_like() {
    let mut r = rng(1);
    let (t, d, f, e, k) = (5, 16, 24, 4, 2);
    let layer = MoeLayer::new(
        topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config()),
        swiglu(&mut r, e, d, f, Activation::Silu),
    )
    .expect("layer");
    let x = matrix(&mut r, t, d, 1.0);
    check(layer, &RouterInput::new(x.view()), RouterPath::Native);
}
