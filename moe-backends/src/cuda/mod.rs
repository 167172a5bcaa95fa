//! The CUDA backend (feature `cuda`): CUDA C kernels compiled at run time by NVRTC for the GPU at hand, launched
//! through cudarc, which loads the driver and NVRTC when the backend opens. A build needs no CUDA toolkit; a
//! machine without a driver or NVRTC gets [`BackendError::Unavailable`] with the reason.
//!
//! # What runs where
//! - [`Backend::upload`] packs each expert bank into the canonical layout the wgpu backend uses too
//!   (`crate::packed`: every product `a · Wᵀ` with `W` row-major `[out, in]`, a gated bank's gate rows before its
//!   up rows; GPT-OSS banks are transposed and de-interleaved on the host), converts it to the backend's [`Dtype`]
//!   (f32, bf16 or f16, rounded to nearest even; int8, fp8 and mxfp4 stay packed, see below) and keeps it
//!   resident. Router weights stay f32.
//! - A forward of a layer whose router has a [`RouterSpec::TopK`] spec ([`RouterPath::Native`]) runs on the GPU
//!   from the input copy to the output: gate projection (f32), top-k routing (softmax / sigmoid / sqrt-softplus,
//!   both orders, renormalisation, scaling, group-limited selection, correction bias, gate bias; `k` up to 32,
//!   up to 64 groups), a stable counting sort of the assignments by expert (each expert's rows in ascending
//!   token order), the grouped products, shared experts and the weighted combine (ascending expert order per
//!   token, as the CPU backend). **No host round trip inside the forward**: row offsets and tile counts stay on
//!   the device, and the product kernels find their expert and rows there. The host reads back once, at the
//!   end: the output and, to return the [`Routing`], the per-token choices and (for `E ≤ 4096`,
//!   [`moe_core::KEEP_LOGITS_MAX_EXPERTS`]) the logits.
//!   [`DeviceLayer::device_times`] skips that read-back and the input copy, and times with CUDA events.
//! - Every other router takes the host path ([`RouterPath::Host`]): it routes on the host, the plan is copied up,
//!   and the experts and combine run on the GPU.
//! - Grouped products: tiles of 64 rows of one expert by 64 output columns, one list of row tiles over all
//!   experts. f32 weights use FMA tiles in f32; bf16 / f16 weights use tensor cores (`mma.sync` m16n8k16, f32
//!   accumulators) from compute capability 8.0, with the activations rounded to the weights' type as they are
//!   staged, as a bf16 model does. SwiGLU / GPT-OSS gating is fused into the first product's epilogue, MLP biases
//!   and activations likewise.
//! - Packed low-precision weights (issue 18): int8 (f32 scale per row), FP8 E4M3 (f32 scales per block of any
//!   shape, DeepSeek-V3's `weight_scale_inv`) and MXFP4 (E2M1 codes, E8M0 scale per 32, GPT-OSS's `*_blocks` /
//!   `*_scales`) stay packed on the GPU, bytes as moe-core's [`PackedMatrix`] holds them, from a
//!   [`moe_core::ExpertBank::Packed`] bank or an f32 bank quantised at upload (`dtype` int8 / fp8 / mxfp4). The
//!   `gemm_q` kernels (`kernels_q.cu`) decode each weight as they stage it (the code's exact value times its
//!   scale, one f32 rounding: moe-core's `decode_row` bit for bit), keep activations f32, accumulate in f32, and
//!   read GPT-OSS's interleaved gate / up rows in place. f32 / bf16 / f16 packed banks take the dense kernels
//!   (GPT-OSS rows de-interleaved on the host). Routers stay f32. Stored banks run f32, bf16 and f16 only.
//! - Expert banks: SwiGLU, GPT-OSS, MLP and packed. PEER and custom banks are refused by `upload` with a clear error.
//! - Stored banks ([`moe_core::ExpertBank::Stored`], experts beyond GPU memory): `slots` experts resident, the
//!   missing ones of each group copied from the bank's source through pinned staging on a copy stream
//!   (`store.rs`; compile-checked only so far, see its docs). Such a layer routes on the host.
//! - [`DeviceLayer::set_router`] swaps only the router's device state (its gate, biases and spec, or the host
//!   path); the uploaded experts stay, so many routers run on one resident bank.
//!
//! Aux losses are not computed on the native path (a spec carries no loss settings); the host path keeps the
//! router's own.
//!
//! # Files, one stage each
//! `device.rs` (probes, context, NVRTC, buffers, device addresses and the raw `unsafe` launch), `upload.rs`
//! (packing, precision, upload), `quant.rs` (packed low-precision banks made resident), `workspace.rs`
//! (per-forward buffers), `gemm.rs` (grouped products and the gate projection), `qgemm.rs` (products over packed
//! weights, the device decode), `route.rs` (native top-k), `sort.rs` (the counting sort, host plans), `combine.rs` (shared-expert
//! gate and combine), `forward.rs` (the resident layer and the orchestration of a forward), `timing.rs` (CUDA
//! events), `store.rs` with `store_plan.rs` and `store_stage.rs` (stored banks: the slots, the slot-major group
//! layout and the order of copies and products, the pinned staging and its copies). Every kernel launch goes
//! through one safe wrapper in its stage's file that checks the lengths of the buffers the kernel uses before its
//! `unsafe` launch (with a `// SAFETY:` comment); the orchestration holds no `unsafe`. The kernels are one CUDA C module,
//! `kernels.cu` followed by `kernels_q.cu`.

mod combine;
mod device;
mod forward;
mod gemm;
mod qgemm;
mod quant;
mod route;
mod sort;
mod store;
mod store_plan;
mod store_stage;
mod timing;
mod upload;
mod workspace;

use std::sync::Arc;

use moe_core::{Backend, Capabilities, DeviceLayer, MoeError, MoeLayer, PackedMatrix};
#[cfg(doc)]
use moe_core::{RouterPath, RouterSpec, Routing};
use ndarray::Array3;

use crate::BackendError;
pub use crate::Dtype;
use device::Gpu;
pub use device::{
    KERNELS, MMA_KERNELS, QUANT_KERNELS, SOURCE, compile_kernels, driver_present, nvrtc_present,
};
pub use forward::CudaLayer;

/// Largest `k` the native top-k kernel runs; larger `k` takes the host path.
pub const MAX_NATIVE_K: usize = 32;
/// Most groups of a group-limited spec the native kernel runs.
pub const MAX_NATIVE_GROUPS: usize = 64;
/// Rows and columns of one product tile (kernels.cu's BM and BN).
const BM: usize = 64;
const BN: usize = 64;
/// Assignments per block of the counting sort (kernels.cu's CHUNK).
const CHUNK: usize = 256;

/// The CUDA backend: GPU 0 of this process, with the weight precision of the layers uploaded through it.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    dtype: Dtype,
}

impl CudaBackend {
    /// Opens GPU 0 with f32 weights.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason (no driver, no NVRTC, no GPU, kernels that do not compile).
    pub fn new() -> Result<Self, BackendError> {
        Self::with_dtype(Dtype::F32)
    }

    /// Opens GPU 0; layers uploaded through this handle keep their expert weights in `dtype`: f32 banks are
    /// rounded to bf16 / f16, or quantised on the host to int8 / fp8 / mxfp4 ([`moe_core::PackedBank::quantize`])
    /// and kept packed. A bank that arrives packed ([`moe_core::ExpertBank::Packed`]) runs in its own format.
    ///
    /// # Errors
    /// As [`CudaBackend::new`].
    pub fn with_dtype(dtype: Dtype) -> Result<Self, BackendError> {
        let gpu = Gpu::get().map_err(|reason| BackendError::Unavailable {
            backend: "cuda".into(),
            reason,
        })?;
        Ok(CudaBackend { gpu, dtype })
    }

    /// The weight precision of uploads.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Whether bf16 / f16 products run on tensor cores (compute capability 8.0 or newer).
    pub fn tensor_cores(&self) -> bool {
        self.gpu.tensor_cores
    }

    /// `m` decoded on the GPU by the decode the packed products use (int8, fp8, mxfp4), `[E, rows, cols]` f32:
    /// equal bit for bit to [`PackedMatrix::dequantize`] (the check of the kernels' decode).
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for f32, bf16 and f16; [`MoeError::TooLarge`] past 2^31 values; device errors.
    pub fn decode_packed(&self, m: &PackedMatrix) -> Result<Array3<f32>, MoeError> {
        qgemm::decode_on_device(&self.gpu, m)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            device: self.gpu.describe.clone(),
            dtypes: Dtype::ALL.iter().map(|d| d.name().into()).collect(),
            native_specs: vec!["topk".into()],
            banks: vec![
                "swiglu".into(),
                "gpt_oss".into(),
                "mlp".into(),
                "packed".into(),
            ],
        }
    }

    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        Ok(Box::new(CudaLayer::build(
            Arc::clone(&self.gpu),
            layer,
            self.dtype,
        )?))
    }
}
