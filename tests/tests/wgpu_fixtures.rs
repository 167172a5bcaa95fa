//! The nine Hugging Face fixtures (tests/fixtures/hf) on the wgpu backend (see `device_fixtures` for how they are
//! compared). Router path: native for the seven top-k families and Switch (a spec without a gate bias), host for
//! NLLB-MoE (its router has no spec).
//!
//! Without an adapter every test prints why and returns, unless `MOE_REQUIRE_GPU=wgpu` is set.
#![cfg(feature = "wgpu")]

#[macro_use]
mod device_fixtures;

use std::sync::OnceLock;

use moe_backends::wgpu::WgpuBackend;

fn backend() -> Option<WgpuBackend> {
    static B: OnceLock<Result<WgpuBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "wgpu",
        B.get_or_init(|| WgpuBackend::new().map_err(|e| e.to_string())),
    )
}

family_tests! {
    backend;
    wgpu_mixtral => "mixtral", Native,
    wgpu_qwen2_moe => "qwen2_moe", Native,
    wgpu_olmoe => "olmoe", Native,
    wgpu_deepseek_v3 => "deepseek_v3", Native,
    wgpu_switch_transformers => "switch_transformers", Native,
    wgpu_nllb_moe => "nllb_moe", Host,
    wgpu_granitemoe => "granitemoe", Native,
    wgpu_jetmoe => "jetmoe", Native,
    wgpu_gpt_oss => "gpt_oss", Native,
}
