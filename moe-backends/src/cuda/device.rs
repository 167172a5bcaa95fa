//! The CUDA device behind the backend: library probes, the process-wide context and stream, the NVRTC-compiled
//! kernel module, device buffers, device addresses and the raw kernel launch ([`Gpu::launch`], `unsafe`: only the
//! stages' safe launch wrappers call it, each after checking the buffers its kernel uses).
#![allow(
    unsafe_code,
    reason = "the driver and NVRTC load probes, disabling event tracking, pinned staging, and the raw launch"
)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PinnedHostSlice, PushKernelArg, ValidAsZeroBits, sys,
};
use cudarc::nvrtc::{CompileError, CompileOptions, compile_ptx_with_opts};

use moe_core::MoeError;

/// The kernels' CUDA C source, compiled by NVRTC for the GPU at hand: `kernels.cu`, then the products over packed
/// low-precision weights, `kernels_q.cu`, in one module.
pub const SOURCE: &str = concat!(include_str!("kernels.cu"), include_str!("kernels_q.cu"));

/// An error of the backend, as a [`MoeError::Backend`].
pub(crate) fn err(reason: impl Into<String>) -> MoeError {
    MoeError::Backend {
        backend: "cuda".into(),
        reason: reason.into(),
    }
}

/// `Ok` when the CUDA driver library loads, else why not.
pub fn driver_present() -> Result<(), String> {
    // SAFETY: the probe only tries to load the shared library; it calls nothing in it.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "the CUDA driver library (libcuda.so) was not found: this machine has no NVIDIA driver"
                .into(),
        )
    }
}

/// `Ok` when NVRTC loads, else why not.
pub fn nvrtc_present() -> Result<(), String> {
    // SAFETY: as above, a load probe.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "NVRTC (libnvrtc.so) was not found: install CUDA's NVRTC and put its lib directory on \
             LD_LIBRARY_PATH"
                .into(),
        )
    }
}

/// Compiles the kernels for `arch` (`compute_90`, `sm_80`, ...) with NVRTC and returns the PTX text. Needs NVRTC
/// only, no GPU: tests use it to check that the source compiles for the architectures the backend targets.
///
/// # Errors
/// NVRTC missing, or the compiler's log.
pub fn compile_kernels(arch: &str) -> Result<String, String> {
    nvrtc_present()?;
    let ptx = compile(arch)?;
    Ok(ptx.to_src())
}

fn compile(arch: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some("moe_kernels.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, opts).map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            format!(
                "NVRTC could not compile the kernels for {arch}:\n{}",
                log.to_string_lossy()
            )
        }
        other => format!("NVRTC failed for {arch}: {other:?}"),
    })
}

/// The kernels this backend launches (every one is looked up at open, so a missing one fails there).
pub const KERNELS: &[&str] = &[
    "gemm_fma_f32_0",
    "gemm_fma_f32_1",
    "gemm_fma_f32_2",
    "gemm_fma_bf16_0",
    "gemm_fma_bf16_1",
    "gemm_fma_bf16_2",
    "gemm_fma_f16_0",
    "gemm_fma_f16_1",
    "gemm_fma_f16_2",
    "route_topk",
    "group_count",
    "group_scan",
    "group_scatter",
    "shared_gate",
    "combine",
];

/// The products over packed low-precision weights (int8, FP8 E4M3 blocks, MXFP4; epilogue modes 0, 1, 2) and
/// their decode kernels, present on every architecture (`kernels_q.cu`).
pub const QUANT_KERNELS: &[&str] = &[
    "gemm_q_int8_0",
    "gemm_q_int8_1",
    "gemm_q_int8_2",
    "gemm_q_fp8_0",
    "gemm_q_fp8_1",
    "gemm_q_fp8_2",
    "gemm_q_mxfp4_0",
    "gemm_q_mxfp4_1",
    "gemm_q_mxfp4_2",
    "decode_q_int8",
    "decode_q_fp8",
    "decode_q_mxfp4",
];

/// Tensor-core kernels, present from compute capability 8.0.
pub const MMA_KERNELS: &[&str] = &[
    "gemm_mma_bf16_0",
    "gemm_mma_bf16_1",
    "gemm_mma_bf16_2",
    "gemm_mma_f16_0",
    "gemm_mma_f16_1",
    "gemm_mma_f16_2",
];

/// One GPU: context, stream and kernels, shared by every backend handle of the process.
pub(crate) struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Device name, compute capability and memory, in words.
    pub(crate) describe: String,
    /// Compute capability 8.0 or newer: tensor-core kernels for bf16 / f16.
    pub(crate) tensor_cores: bool,
    /// Most dynamic shared memory a block may take without opting in.
    pub(crate) max_shared: usize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

/// The process's GPU, or why there is none (decided once per process).
static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();

impl Gpu {
    /// The process's GPU 0, opened (and its kernels compiled) on first use.
    pub(crate) fn get() -> Result<Arc<Gpu>, String> {
        GPU.get_or_init(|| Self::open().map(Arc::new)).clone()
    }

    fn open() -> Result<Gpu, String> {
        driver_present()?;
        nvrtc_present()?;
        let n = CudaContext::device_count().map_err(|e| format!("no CUDA device: {e}"))?;
        if n < 1 {
            return Err("the CUDA driver sees no GPU".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("opening GPU 0: {e}"))?;
        // One stream runs every launch in order, so cudarc's per-buffer event tracking is not needed.
        // SAFETY: called before any buffer or stream other than the default one exists.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("reading the compute capability: {e}"))?;
        let name = ctx
            .name()
            .map_err(|e| format!("reading the device name: {e}"))?;
        let mem = ctx.total_mem().unwrap_or(0);
        let max_shared = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)
            .unwrap_or(48 * 1024) as usize;
        let arch = format!("compute_{major}{minor}");
        let ptx = compile(&arch)?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| format!("loading the kernels ({arch}): {e}"))?;
        let tensor_cores = major >= 8;
        let mut funcs = HashMap::new();
        let names =
            KERNELS
                .iter()
                .chain(QUANT_KERNELS)
                .chain(if tensor_cores { MMA_KERNELS } else { &[] });
        for &k in names {
            let f = module
                .load_function(k)
                .map_err(|e| format!("kernel {k} missing from the module: {e}"))?;
            funcs.insert(k, f);
        }
        Ok(Gpu {
            stream: ctx.default_stream(),
            ctx,
            funcs,
            describe: format!(
                "{name} (compute {major}.{minor}, {:.0} GiB)",
                mem as f64 / (1u64 << 30) as f64
            ),
            tensor_cores,
            max_shared,
        })
    }

    /// A kernel by name.
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, MoeError> {
        self.funcs
            .get(name)
            .ok_or_else(|| err(format!("kernel {name} is not loaded on this GPU")))
    }

    /// Uploads `data`.
    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>, MoeError> {
        if data.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(data).map_err(|e| {
            err(format!(
                "copying {} bytes to the GPU: {e}",
                std::mem::size_of_val(data)
            ))
        })
    }

    /// `n` zeroed elements (at least one, so every buffer has an address).
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, MoeError> {
        self.stream.alloc_zeros(n.max(1)).map_err(|e| {
            err(format!(
                "allocating {} bytes on the GPU: {e}",
                n.max(1) * std::mem::size_of::<T>()
            ))
        })
    }

    /// `n` zeroed elements of page-locked (pinned), write-combined host memory (at least one): the staging of
    /// asynchronous host-to-device copies (the expert store's loads). Whoever copies from it on another stream
    /// orders its own writes after those copies with an event (cudarc's own event on it is not recorded: event
    /// tracking is off).
    ///
    /// # Errors
    /// The driver's error (out of pinned memory), naming the bytes asked for.
    pub(crate) fn pinned_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<PinnedHostSlice<T>, MoeError> {
        let n = n.max(1);
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .filter(|&b| b < isize::MAX as usize)
            .ok_or_else(|| {
                err(format!(
                    "{n} pinned staging elements overflow the address space"
                ))
            })?;
        let fail = |e: cudarc::driver::DriverError| {
            err(format!(
                "allocating {bytes} bytes of pinned host memory: {e}"
            ))
        };
        // SAFETY: cuMemHostAlloc returns `bytes` bytes of uninitialised host memory; no reference to it is formed
        // before it is zeroed below, and all-zero bits are a valid `T` (`ValidAsZeroBits`).
        let mut p = unsafe { self.ctx.alloc_pinned::<T>(n) }.map_err(fail)?;
        let raw = p.as_mut_ptr().map_err(fail)?;
        // SAFETY: `raw` points to the `n` elements just allocated, which nothing else uses yet.
        unsafe { std::ptr::write_bytes(raw, 0, n) };
        Ok(p)
    }

    /// Copies `src` into the front of `dst`.
    pub(crate) fn write<T: DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<(), MoeError> {
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > dst.len() {
            return Err(err("internal: device buffer too small for a copy"));
        }
        let mut view = dst.slice_mut(0..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| err(format!("copying to the GPU: {e}")))
    }

    /// Reads the first `n` elements of `src` (waits for the stream).
    pub(crate) fn read<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>, MoeError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > src.len() {
            return Err(err("internal: read past a device buffer"));
        }
        let mut out = vec![T::default(); n];
        self.stream
            .memcpy_dtoh(&src.slice(0..n), &mut out)
            .map_err(|e| err(format!("reading results from the GPU: {e}")))?;
        Ok(out)
    }

    /// Waits for every launch so far, reporting a kernel fault.
    pub(crate) fn sync(&self) -> Result<(), MoeError> {
        self.stream
            .synchronize()
            .map_err(|e| err(format!("a GPU kernel failed: {e}")))
    }

    /// Launches `name` over `grid` blocks of `block` threads with `shared` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// Every [`Arg::Ptr`] must point into a live buffer of this GPU at least as long as the kernel reads or writes
    /// through it for the scalar arguments given (the kernels trust the sizes the host computed), or be null where
    /// the kernel allows it.
    pub(crate) unsafe fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<(), MoeError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.func(name)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::U32(v) => b.arg(v),
                Arg::U64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
                Arg::Ptr(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: shared,
        };
        // SAFETY: the caller vouches for the pointers; the argument list matches the kernel's signature (each
        // caller passes the kernel's parameters in order, see kernels.cu).
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| err(format!("launching {name}: {e}")))
    }
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    U32(u32),
    U64(u64),
    F32(f32),
    /// A device address (0: null).
    Ptr(u64),
}

/// The device address of `s` (the stream is the GPU's only one, so no event waits are needed).
pub(crate) fn ptr<T>(gpu: &Gpu, s: &CudaSlice<T>) -> Arg {
    let (p, _guard) = s.device_ptr(&gpu.stream);
    Arg::Ptr(p)
}

/// The device address of `s`, or null.
pub(crate) fn ptr_opt<T>(gpu: &Gpu, s: Option<&CudaSlice<T>>) -> Arg {
    s.map_or(Arg::Ptr(0), |s| ptr(gpu, s))
}
