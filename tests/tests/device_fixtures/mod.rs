//! The nine Hugging Face fixtures (tests/fixtures/hf) on a device backend, shared by `wgpu_fixtures.rs` and
//! `cuda_fixtures.rs`: each case's layer is built by `moe-models` exactly as `moe verify` builds it, run on the
//! CPU reference and on the device, and compared.
//!
//! Tolerances: the output within `1e-5 · max |ref|` of transformers' `ref.output` (the verifier's formula and
//! tolerance) and within `1e-5 · max |cpu|` of the CPU backend; the chosen experts, ranks and dropped
//! assignments identical to the CPU's; weights within 1e-6.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::{Backend, RouterInput, RouterPath};
use moe_models::fixture::{Manifest, case_config};
use moe_models::{Checkpoint, build_layer};
use ndarray::Array2;

const TOL: f64 = 1e-5;

/// One `#[test]` per `name => "case", Path` row: fixture `case` on the backend `$backend()` returns (`None`:
/// skip), routed by `RouterPath::Path`.
macro_rules! family_tests {
    ($backend:ident; $($test:ident => $case:literal, $path:ident),* $(,)?) => {
        $(#[test] fn $test() {
            if let Some(b) = $backend() {
                device_fixtures::check_case(&b, $case, moe_core::RouterPath::$path);
            }
        })*
    };
}

/// The fixtures folder: `MOE_FIXTURES` when set (test binaries carried to a GPU machine), else this crate's.
pub fn fixtures() -> PathBuf {
    std::env::var_os("MOE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf"))
}

/// `max |a − b| / max |b|`.
pub fn rel(a: impl Iterator<Item = f32>, b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-30f64, |m, v| m.max(f64::from(v.abs())));
    a.zip(b)
        .fold(0.0f64, |m, (x, y)| m.max(f64::from((x - y).abs())))
        / scale
}

/// Runs fixture `name` on the CPU backend and on `device`, which must route it by `path`, and compares.
pub fn check_case(device: &dyn Backend, name: &str, path: RouterPath) {
    let dir = fixtures();
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let manifest: Manifest = serde_json::from_str(&text).expect("manifest parses");
    let case = manifest
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("case {name} not in the manifest"));
    let cfg = case_config(case, &dir.join("manifest.json")).expect("config");
    let ckpt = Checkpoint::open(dir.join(&case.file)).expect("fixture");
    let layer = Arc::new(build_layer(&cfg, &ckpt.weights("")).expect("layer"));
    let input = ckpt.tensor("ref.input").expect("input");
    let d = layer.d_model();
    let (b, s) = (
        case.batch.unwrap_or(1),
        case.seq_len.unwrap_or(input.data.len() / d),
    );
    let x = Array2::from_shape_vec((b * s, d), input.data).expect("input shape");
    let lens = vec![s; b];
    let ri = RouterInput::new(x.view()).with_seq_lens(&lens);
    let want = CpuBackend::new()
        .upload(Arc::clone(&layer))
        .expect("cpu")
        .forward(&ri)
        .expect("cpu forward");
    let got = device
        .upload(layer)
        .unwrap_or_else(|e| panic!("{name}: {} upload: {e}", device.name()))
        .forward(&ri)
        .unwrap_or_else(|e| panic!("{name}: {} forward: {e}", device.name()));
    assert_eq!(got.router_path, path, "{name}: router path");
    let reference = ckpt.tensor("ref.output").expect("ref.output");
    let vs_ref = rel(got.output.iter().copied(), &reference.data);
    let cpu: Vec<f32> = want.output.iter().copied().collect();
    let vs_cpu = rel(got.output.iter().copied(), &cpu);
    println!("{name}: rel err vs transformers {vs_ref:.2e}, vs cpu {vs_cpu:.2e}");
    assert!(vs_ref <= TOL, "{name}: output vs transformers {vs_ref:e}");
    assert!(vs_cpu <= TOL, "{name}: output vs cpu {vs_cpu:e}");
    let (a, c) = (want.routing.per_token(), got.routing.per_token());
    for (t, (p, q)) in a.iter().zip(&c).enumerate() {
        let ep: Vec<(usize, u16)> = p.iter().map(|v| (v.0, v.2)).collect();
        let eq: Vec<(usize, u16)> = q.iter().map(|v| (v.0, v.2)).collect();
        assert_eq!(ep, eq, "{name}: token {t} experts");
        for (u, v) in p.iter().zip(q) {
            assert!(
                (u.1 - v.1).abs() <= 1e-6,
                "{name}: token {t} weight {} vs {}",
                u.1,
                v.1
            );
        }
    }
    let drops = |r: &moe_core::Routing| -> Vec<(u32, u32)> {
        let mut v: Vec<(u32, u32)> = r.dropped().iter().map(|a| (a.token, a.expert)).collect();
        v.sort_unstable();
        v
    };
    assert_eq!(drops(&want.routing), drops(&got.routing), "{name}: dropped");
}
