//! The wgpu backend against the CPU reference, on seeded random layers: the cases every device backend runs
//! (`device_parity`: every bank kind, every router spec option, the host path, capacity drops, padding, empty
//! experts, bad input, activations), plus chunked weights.
//!
//! Tolerance (see `device_parity`): outputs to `1e-5 · max(max |cpu|, 1)` (f32 sums in another order on the
//! device; the HF fixture runs show at most 3.5e-7), routing weights to 1e-5, and the chosen experts, their ranks
//! and the dropped assignments identical (the seeded cases have no near ties).
//!
//! Without an adapter every test prints why and returns, unless `MOE_REQUIRE_GPU=wgpu` is set: then a missing
//! adapter fails the test (CI sets it, with Mesa's lavapipe installed).
#![cfg(feature = "wgpu")]

#[macro_use]
mod device_parity;

use std::sync::{Arc, OnceLock};

use moe_backends::Dtype;
use moe_backends::wgpu::{WgpuBackend, WgpuOptions};
use moe_core::{Activation, Backend, MoeError, MoeLayer, RouterInput, RouterPath};
use moe_routers::TopKPreset;

use device_parity::{Device, check_on, matrix, rng, swiglu, topk_router};
use moe_core::rng::SeqRng;

/// The shared backend, or `None` (after printing why) when this machine has no adapter.
fn backend() -> Option<WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "wgpu",
        B.get_or_init(|| WgpuBackend::new().map_err(|e| e.to_string())),
    )
}

/// `b` as a device under test.
fn device(b: &WgpuBackend) -> Device<'_> {
    Device {
        backend: b,
        dtype: Dtype::F32,
        switch_path: RouterPath::Native,
    }
}

shared_cases!(backend, device);

/// Expert tensors split over several bindings (the binding limit lowered to a few experts' worth) give the same
/// results; a limit below one expert is a clear error, not a crash.
#[test]
fn chunked_weights_and_too_large_layers() {
    if backend().is_none() {
        return;
    }
    let (t, d, f, e, k) = (41, 16, 32, 12, 3);
    // gate_up of one expert is 2 * 32 * 16 * 4 = 4 KiB: a 9 KiB limit holds 2 experts per chunk.
    let small = WgpuBackend::with_options(WgpuOptions {
        max_weight_binding_bytes: Some(9 * 1024),
    })
    .expect("backend");
    let mut r = rng(800);
    let make = |r: &mut SeqRng| {
        MoeLayer::new(
            topk_router(r, e, d, k, TopKPreset::Mixtral.config()),
            swiglu(r, e, d, f, Activation::Silu),
        )
        .expect("layer")
    };
    let layer = make(&mut r);
    let x = matrix(&mut r, t, d, 1.0);
    check_on(
        &device(&small),
        layer,
        &RouterInput::new(x.view()),
        RouterPath::Native,
    );
    let tiny = WgpuBackend::with_options(WgpuOptions {
        max_weight_binding_bytes: Some(1024),
    })
    .expect("backend");
    let e = tiny
        .upload(Arc::new(make(&mut rng(801))))
        .err()
        .expect("a layer over the binding limit is refused");
    assert!(
        matches!(&e, MoeError::Backend { reason, .. } if reason.contains("too large")),
        "{e}"
    );
}

/// The backend names its adapter and what it runs natively.
#[test]
fn capabilities_name_the_adapter() {
    let Some(b) = backend() else { return };
    let c = b.capabilities();
    assert!(!c.device.is_empty());
    assert_eq!(c.native_specs, vec!["topk", "switch"]);
    assert!(c.banks.iter().any(|k| k == "swiglu") && c.banks.iter().any(|k| k == "mlp"));
    let opened = moe_backends::open(moe_backends::BackendKind::Wgpu).expect("open");
    assert_eq!(opened.name(), "wgpu");
}
