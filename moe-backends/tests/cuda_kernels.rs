//! The CUDA kernels compile: NVRTC (no GPU needed) turns `kernels.cu` into PTX for the architectures the backend
//! targets, and every kernel the backend looks up is an entry of that PTX: the FMA products, routing, sort and
//! combine everywhere; the products over packed int8 / FP8 / MXFP4 weights and their decode kernels everywhere;
//! the `mma.sync` bf16 / f16 tensor-core products from compute capability 8.0 (and not before, where the backend
//! falls back to the FMA kernels).
//!
//! Without NVRTC the test prints why and returns, unless `MOE_REQUIRE_NVRTC=1`: then it fails. CI installs
//! NVRTC from PyPI (`nvidia-cuda-nvrtc`) and sets it, so the kernels are compiled on every CI run.
#![cfg(feature = "cuda")]

use moe_backends::cuda::{KERNELS, MMA_KERNELS, QUANT_KERNELS, compile_kernels, nvrtc_present};

fn nvrtc() -> bool {
    match nvrtc_present() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("MOE_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
                panic!("MOE_REQUIRE_NVRTC=1 but NVRTC is unavailable: {why}");
            }
            eprintln!("skipping: {why}");
            false
        }
    }
}

/// Whether the PTX defines kernel `name`.
fn has_entry(ptx: &str, name: &str) -> bool {
    ptx.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with(".visible .entry") && l.contains(&format!(" {name}("))
    })
}

/// The PTX of kernel `name`: from its `.entry` line to the next entry (empty when absent).
fn entry_body<'a>(ptx: &'a str, name: &str) -> &'a str {
    let head = format!(".visible .entry {name}(");
    let Some(at) = ptx.find(&head) else {
        return "";
    };
    let rest = &ptx[at + head.len()..];
    &rest[..rest.find(".visible .entry").unwrap_or(rest.len())]
}

#[test]
fn kernels_compile_for_hopper_and_ampere() {
    if !nvrtc() {
        return;
    }
    for arch in ["compute_90", "compute_80", "sm_90"] {
        let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{e}"));
        for name in KERNELS.iter().chain(QUANT_KERNELS).chain(MMA_KERNELS) {
            assert!(
                has_entry(&ptx, name),
                "{arch}: kernel {name} missing from the PTX"
            );
        }
        assert!(
            ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
                && ptx.contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
            "{arch}: no tensor-core instructions in the PTX"
        );
    }
}

#[test]
fn kernels_compile_without_tensor_cores() {
    if !nvrtc() {
        return;
    }
    let ptx = compile_kernels("compute_75").unwrap_or_else(|e| panic!("{e}"));
    for name in KERNELS.iter().chain(QUANT_KERNELS) {
        assert!(has_entry(&ptx, name), "compute_75: kernel {name} missing");
    }
    for name in MMA_KERNELS {
        assert!(!has_entry(&ptx, name), "compute_75: {name} needs sm_80");
    }
}

#[test]
fn compile_errors_are_reported_not_panicked() {
    if !nvrtc() {
        return;
    }
    let e = compile_kernels("compute_0").expect_err("no such architecture");
    assert!(e.contains("compute_0"), "{e}");
}

/// The packed-weight kernels are there for every format and epilogue, and their decode is the one-rounding
/// multiply moe-core's `decode_row` does: `mul.rn.f32` (never contracted into an FMA), no flush to zero (E8M0
/// code 0 is the subnormal 2^-127, FP8 subnormals decode exactly).
#[test]
fn packed_weight_kernels_compile_with_exact_decode() {
    if !nvrtc() {
        return;
    }
    for arch in ["compute_75", "compute_80", "compute_90"] {
        let ptx = compile_kernels(arch).unwrap_or_else(|e| panic!("{e}"));
        for fmt in ["int8", "fp8", "mxfp4"] {
            for mode in 0..3 {
                let name = format!("gemm_q_{fmt}_{mode}");
                assert!(QUANT_KERNELS.contains(&name.as_str()), "{name} not listed");
                assert!(has_entry(&ptx, &name), "{arch}: {name} missing");
            }
            let name = format!("decode_q_{fmt}");
            assert!(QUANT_KERNELS.contains(&name.as_str()), "{name} not listed");
            assert!(has_entry(&ptx, &name), "{arch}: {name} missing");
        }
        for name in QUANT_KERNELS {
            let body = entry_body(&ptx, name);
            assert!(
                body.contains("mul.rn.f32"),
                "{arch}: {name} decodes without the round-to-nearest multiply"
            );
            if name.starts_with("decode_q_") {
                assert!(!body.contains(".ftz."), "{arch}: {name} flushes subnormals");
            }
        }
    }
}
