//! # moe-backends
//!
//! Backends that run a [`moe_core::MoeLayer`]: upload its weights once, then run forwards.
//!
//! - [`cpu`]: the reference backend, always built, and a fast one. Grouped: assignments are grouped by expert once,
//!   each expert's rows run as contiguous matrix products (a cache-blocked SIMD GEMM, or an AVX-512 kernel for few
//!   rows) with the activation fused between the two products, in parallel over tiles, on reused workspaces; the
//!   outputs are combined with their weights in a fixed order (ascending expert id per token), so results are
//!   bit-identical on any thread count. [`cpu::reference_forward`] is the plain path it is tested against.
//! - `wgpu` (feature `wgpu`): WGSL compute kernels on any wgpu adapter (a GPU, or Mesa's lavapipe on the CPU):
//!   resident weights, native top-k and Switch routing, grouping by expert, tiled grouped GEMMs, fused
//!   activations and combine on the device; see the `wgpu` module (documented when the feature is on).
//! - `cuda` (feature `cuda`): NVRTC-compiled CUDA kernels on an NVIDIA GPU: resident f32, bf16 or f16 weights,
//!   f32 router math, native top-k routing, a stable counting sort by expert, grouped products (tensor cores for
//!   16-bit weights) with fused activations, and the combine; see the `cuda` module (documented when the feature
//!   is on).
//!
//! ```
//! use std::sync::Arc;
//! use moe_core::{Activation, ExpertBank, MoeLayer, RouterArgs, RouterInput, SwiGluBank, WorkloadConfig};
//! use ndarray::Array3;
//!
//! let (d, f, e) = (16, 32, 4);
//! let router = moe_routers::builtin().create("softmax-topk", &RouterArgs::new(d, e, 2, 0))?;
//! let bank = SwiGluBank::new(Array3::from_elem((e, 2 * f, d), 0.01), Array3::from_elem((e, d, f), 0.01), Activation::Silu)?;
//! let layer = Arc::new(MoeLayer::new(router, ExpertBank::SwiGlu(bank))?);
//! let mut resident = moe_backends::open(moe_backends::BackendKind::Cpu)?.upload(layer)?;
//! let w = WorkloadConfig { tokens: 8, d_model: d, ..Default::default() }.generate()?;
//! let out = resident.forward(&RouterInput::new(w.hidden.view()))?;
//! assert_eq!(out.output.dim(), (8, d));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Features
//! - none by default.
//! - `wgpu`: the wgpu backend (`BackendKind::Wgpu`, `wgpu = "=30.0.1"`, which needs Rust 1.87). Without an
//!   adapter, [`open`] returns [`BackendError::Unavailable`] with the reason.
//! - `cuda`: the CUDA backend (`BackendKind::Cuda`, cudarc with the driver and NVRTC loaded at run time, so it
//!   builds without a CUDA toolkit). Without a driver or NVRTC, [`open`] returns [`BackendError::Unavailable`]
//!   with the reason.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dtype;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod native;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod packed;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use dtype::Dtype;
use moe_core::{Backend, MoeError};
use thiserror::Error;

/// Errors of opening a backend.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend exists but cannot run on this machine (no driver, no adapter, feature off).
    #[error("backend {backend} is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: String,
        /// Why, in words a user can act on.
        reason: String,
    },
    /// An error of the contracts (bad layer, bad input).
    #[error(transparent)]
    Core(#[from] MoeError),
}

/// The backends this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda,
    /// The wgpu backend (feature `wgpu`).
    #[cfg(feature = "wgpu")]
    Wgpu,
}

impl BackendKind {
    /// Every backend name moe-rs has, built or not, with whether this build includes it.
    pub const ALL: &'static [(&'static str, bool)] = &[
        ("cpu", true),
        ("cuda", cfg!(feature = "cuda")),
        ("wgpu", cfg!(feature = "wgpu")),
    ];

    /// Parses a backend name.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] for a known backend this build lacks, with the feature to enable;
    /// [`MoeError::InvalidConfig`] for an unknown name.
    pub fn parse(name: &str) -> Result<Self, BackendError> {
        match name {
            "cpu" => Ok(BackendKind::Cpu),
            #[cfg(feature = "cuda")]
            "cuda" => Ok(BackendKind::Cuda),
            #[cfg(feature = "wgpu")]
            "wgpu" => Ok(BackendKind::Wgpu),
            #[allow(
                unreachable_patterns,
                reason = "with both device features on, the names above already matched"
            )]
            "cuda" | "wgpu" => Err(not_built(name)),
            other => Err(MoeError::config("backend", other, "one of: cpu, cuda, wgpu").into()),
        }
    }
}

/// The error for a backend this build does not include.
fn not_built(name: &str) -> BackendError {
    BackendError::Unavailable {
        backend: name.to_string(),
        reason: format!(
            "this build has no {name} backend (build with the `{name}` cargo feature of moe-backends, or \
             moe-cli's feature of the same name)"
        ),
    }
}

/// Opens a backend with default settings.
///
/// # Errors
/// [`BackendError::Unavailable`] when the backend cannot run here.
pub fn open(kind: BackendKind) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(cpu::CpuBackend::new())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Box::new(cuda::CudaBackend::new()?)),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(Box::new(wgpu::WgpuBackend::new()?)),
    }
}

/// Settings of [`open_with`]; the default is what [`open`] uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// Precision of the resident expert weights. `F32` (the default) keeps every bank as it is; another format
    /// quantises f32 banks at upload ([`moe_core::PackedBank::quantize`]). The cpu backend runs every format,
    /// cuda every format (int8, fp8 and mxfp4 kernels compiled with NVRTC, not yet run on a GPU), wgpu f32.
    pub dtype: Dtype,
    /// Threads of the cpu backend (`None`: all cores); other backends take none.
    pub threads: Option<usize>,
    /// Kernels of the cpu backend ([`cpu::CpuKernels::Auto`] unless set); other backends take only the default.
    pub cpu_kernels: cpu::CpuKernels,
    /// bf16 weights times bf16-rounded activations on the cpu backend
    /// ([`cpu::CpuBackend::with_bf16_activations`]); other backends take only the default (off).
    pub bf16_activations: bool,
}

/// Opens a backend with `options`.
///
/// # Errors
/// [`BackendError::Unavailable`] when the backend cannot run here; [`MoeError::InvalidConfig`] for a dtype or a
/// thread count the backend does not take.
pub fn open_with(
    kind: BackendKind,
    options: BackendOptions,
) -> Result<Box<dyn Backend>, BackendError> {
    if let Some(n) = options.threads
        && kind != BackendKind::Cpu
    {
        return Err(MoeError::config("threads", n, "set only for the cpu backend").into());
    }
    if options.cpu_kernels != cpu::CpuKernels::Auto && kind != BackendKind::Cpu {
        return Err(MoeError::config(
            "cpu kernels",
            format!("{:?}", options.cpu_kernels),
            "set only for the cpu backend",
        )
        .into());
    }
    if options.bf16_activations && kind != BackendKind::Cpu {
        return Err(
            MoeError::config("bf16 activations", true, "set only for the cpu backend").into(),
        );
    }
    match kind {
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Box::new(cuda::CudaBackend::with_dtype(options.dtype)?)),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu if options.dtype != Dtype::F32 => Err(MoeError::config(
            "dtype",
            options.dtype.name(),
            "only f32 on the wgpu backend (the cpu and cuda backends run every format)",
        )
        .into()),
        BackendKind::Cpu => {
            let b = match options.threads {
                Some(n) => cpu::CpuBackend::with_threads(n),
                None => cpu::CpuBackend::new(),
            }
            .with_kernels(options.cpu_kernels)
            .with_dtype(options.dtype)
            .with_bf16_activations(options.bf16_activations);
            // Refused here, a usage error, rather than at the first upload.
            if b.layer_kernels().is_err() {
                return Err(MoeError::config(
                    "bf16 activations",
                    true,
                    format!(
                        "needs the auto kernels (got {}) on a CPU with AVX-512F, AVX-512BW and AVX-512 BF16 (this \
                         one: {})",
                        match options.cpu_kernels {
                            cpu::CpuKernels::Auto => "auto",
                            cpu::CpuKernels::Avx2 => "avx2",
                            cpu::CpuKernels::Portable => "portable",
                        },
                        if cpu::CpuBackend::bf16_activations_available() { "yes" } else { "no" }
                    ),
                )
                .into());
            }
            Ok(Box::new(b))
        }
        #[allow(
            unreachable_patterns,
            reason = "without device features every kind matched above"
        )]
        other => open(other),
    }
}

/// Each backend name with `Ok(device)` if it can run here or `Err(reason)` if not (the reason alone, without the
/// backend's name).
pub fn availability() -> Vec<(&'static str, Result<String, String>)> {
    // The reason alone: the caller already names the backend and says it is unavailable.
    let why = |e: BackendError| match e {
        BackendError::Unavailable { reason, .. } => reason,
        other => other.to_string(),
    };
    BackendKind::ALL
        .iter()
        .map(|&(name, _)| {
            let r = BackendKind::parse(name)
                .map_err(why)
                .and_then(|k| open(k).map(|b| b.capabilities().device).map_err(why));
            (name, r)
        })
        .collect()
}
