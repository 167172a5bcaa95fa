//! The wgpu backend (feature `wgpu`): WGSL compute kernels on any adapter wgpu finds (Vulkan, Metal, DX12, GL;
//! Mesa's lavapipe software Vulkan driver on machines without a GPU).
//!
//! # What runs where
//! - Weights are uploaded once, in [`Backend::upload`], in the canonical packed layout the CUDA backend uses too
//!   (`crate::packed`: every product `a · Wᵀ` with `W` row-major `[out, in]`, a gated bank's gate rows before
//!   its up rows; GPT-OSS banks are transposed and de-interleaved on the host), so the kernels know one layout.
//!   Expert tensors larger than one storage binding (128 MiB on lavapipe) are split into chunks of whole
//!   experts; a layer whose single expert, gate or per-forward workspace exceeds a binding is refused with a
//!   clear [`MoeError::Backend`].
//! - Every forward runs on the device: the gate projection (tiled GEMM), the router spec, grouping of the kept
//!   assignments by expert (a counting sort: per-expert counts, a prefix sum, an ordered scatter, so each expert's
//!   rows are in ascending token order), the grouped expert products (tiled GEMM in workgroup memory, one row tile
//!   list over all experts, experts with no tokens skipped) with SwiGLU / GPT-OSS GLU fused into the first product
//!   and the MLP activation and biases into its epilogue, shared experts, and the weighted combine in ascending
//!   expert order per token with the output scale and bias. Everything is f32.
//! - Router specs run natively ([`RouterPath::Native`]): [`RouterSpec::TopK`] (softmax / sigmoid / sqrt-softplus
//!   scores, both orders, renormalisation, scaling, group-limited selection, correction bias, gate bias; `k` up to
//!   32) and [`RouterSpec::Switch`] (softmax, argmax, capacity per sequence or batch, drops by position or
//!   probability). The [`Routing`] returned with the output is built on the host from one read-back of the compact
//!   per-token results (expert ids, weights, ranks and drop flags, `T · k` each) and, for `E ≤ 4096`
//!   ([`moe_core::KEEP_LOGITS_MAX_EXPERTS`]), the router logits, which are attached to it as the CPU routers do.
//!   Aux losses are not computed on the native path (a spec does not carry the loss settings); the host path
//!   keeps the router's own.
//! - Every other router (no spec, random drops, `k > 32`, a spec this backend cannot check) takes the host path
//!   ([`RouterPath::Host`]): [`MoeLayer::route`] runs on the host, the plan is uploaded and the experts run on the
//!   device as above.
//! - [`DeviceLayer::set_router`] swaps only the router's device state (its
//!   gate, biases and spec, or the host path); the uploaded experts stay, so many routers run on one resident bank.
//! - Expert banks: SwiGLU, GPT-OSS and MLP run on the device; PEER and custom banks are refused by `upload` with
//!   a [`MoeError::Backend`] naming the bank (run them on the CPU backend).
//!
//! # Files, one stage each
//! `device.rs` (adapter, device, buffers, workspace pool), `pipelines.rs` (the WGSL modules and pipelines),
//! `params.rs` (one `#[repr(C)]` parameter struct per kernel family, mirrored by its WGSL struct; a test checks
//! the layouts agree), `upload.rs` (packing and chunked upload), `gate.rs` (router and shared-expert gates),
//! `route.rs` (native top-k and Switch routing), `sort.rs` (grouping by expert, host plans), `grouped.rs` (the
//! expert products), `combine.rs` (shared experts and the combine), `execute.rs` (encoding, submission,
//! read-back), `forward.rs` (the resident layer and its forward). The kernels sit beside them: `common.wgsl`
//! (activations and helpers, the start of every module), `gemm.wgsl`, `route.wgsl` with `route_topk.wgsl` and
//! `route_switch.wgsl`, `group.wgsl`, `shared_gate.wgsl`, `combine.wgsl`.

mod combine;
mod device;
mod execute;
mod forward;
mod gate;
mod grouped;
mod params;
mod pipelines;
mod route;
mod sort;
mod upload;

use std::sync::Arc;

use ::wgpu as wg;

use moe_core::{Backend, Capabilities, DeviceLayer, MoeError, MoeLayer};
#[cfg(doc)]
use moe_core::{RouterPath, RouterSpec, Routing};

use crate::BackendError;
use device::{Ctx, err};
pub use forward::WgpuLayer;

/// Largest `k` the native top-k kernel runs; larger `k` takes the host path.
pub const MAX_NATIVE_K: usize = 32;

/// Settings of [`WgpuBackend`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgpuOptions {
    /// Caps the bytes of one chunk of expert weights below the adapter's storage-binding limit (tests use it to
    /// force the chunked weight path on small layers). `None`: the adapter's limit.
    pub max_weight_binding_bytes: Option<u64>,
}

/// The wgpu backend: one adapter and device, shared by the layers uploaded to it.
#[derive(Debug, Clone)]
pub struct WgpuBackend {
    ctx: Arc<Ctx>,
}

impl WgpuBackend {
    /// Opens the default adapter (wgpu's environment variables, such as `WGPU_BACKEND=vulkan`, apply).
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason when no adapter or device is found.
    pub fn new() -> Result<Self, BackendError> {
        Self::with_options(WgpuOptions::default())
    }

    /// Opens the default adapter with `options`.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason when no adapter or device is found.
    pub fn with_options(options: WgpuOptions) -> Result<Self, BackendError> {
        Ok(WgpuBackend {
            ctx: Arc::new(Ctx::open(options.max_weight_binding_bytes)?),
        })
    }

    /// The adapter in words: name, backend, device type and driver.
    pub fn adapter(&self) -> String {
        self.ctx.describe()
    }

    /// The adapter's largest storage binding, in bytes (128 MiB on lavapipe).
    pub fn max_binding_bytes(&self) -> u64 {
        self.ctx.max_binding
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &str {
        "wgpu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            device: self.ctx.describe(),
            dtypes: vec!["f32".into()],
            native_specs: vec!["topk".into(), "switch".into()],
            banks: vec!["swiglu".into(), "gpt_oss".into(), "mlp".into()],
        }
    }

    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        let ctx = Arc::clone(&self.ctx);
        let scope = ctx.device.push_error_scope(wg::ErrorFilter::OutOfMemory);
        let built = WgpuLayer::build(&ctx, layer);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(err(format!("uploading the layer: {e}")));
        }
        Ok(Box::new(built?))
    }
}
