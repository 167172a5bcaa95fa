//! The nine Hugging Face fixtures (tests/fixtures/hf) on the CUDA backend with f32 weights (see
//! `device_fixtures` for how they are compared; `MOE_FIXTURES` names the folder when the test binary was carried to
//! a GPU machine). Router path: native for the seven top-k families, host for Switch (this backend runs no Switch
//! spec natively) and NLLB-MoE (its router has no spec).
//!
//! Without a GPU every test prints why and returns, unless `MOE_REQUIRE_GPU=cuda` is set.
#![cfg(feature = "cuda")]

#[macro_use]
mod device_fixtures;

use std::sync::OnceLock;

use moe_backends::cuda::CudaBackend;

fn backend() -> Option<CudaBackend> {
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "cuda",
        B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())),
    )
}

family_tests! {
    backend;
    cuda_mixtral => "mixtral", Native,
    cuda_qwen2_moe => "qwen2_moe", Native,
    cuda_olmoe => "olmoe", Native,
    cuda_deepseek_v3 => "deepseek_v3", Native,
    cuda_switch_transformers => "switch_transformers", Host,
    cuda_nllb_moe => "nllb_moe", Host,
    cuda_granitemoe => "granitemoe", Native,
    cuda_jetmoe => "jetmoe", Native,
    cuda_gpt_oss => "gpt_oss", Native,
}
