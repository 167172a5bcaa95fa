//! The wgpu device context: adapter and device selection, limits, the compiled kernels ([`super::pipelines`]),
//! buffer helpers, the per-layer workspace pool, and the mapping of device errors to [`MoeError::Backend`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ::wgpu as wg;
use wg::util::DeviceExt;

use moe_core::MoeError;

use super::pipelines::{Pipes, compile};
use crate::BackendError;

/// Rows per GEMM tile (`BM` in the kernels).
pub(super) const BM: u32 = 32;
/// Output columns per GEMM tile (`BN` in the kernels).
pub(super) const BN: u32 = 32;

/// A backend error with the reason.
pub(super) fn err(reason: impl Into<String>) -> MoeError {
    MoeError::Backend {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

/// One opened adapter and device with the compiled kernels.
pub(super) struct Ctx {
    pub device: wg::Device,
    pub queue: wg::Queue,
    pub info: wg::AdapterInfo,
    /// Largest storage binding, bytes (the adapter's limit).
    pub max_binding: u64,
    /// Largest binding of one chunk of expert weights, bytes (the smaller of the adapter's and the option's).
    pub max_weight_binding: u64,
    /// Largest buffer, bytes.
    pub max_buffer: u64,
    /// Largest workgroup count per dispatch dimension.
    pub max_groups: u32,
    /// Alignment of uniform-buffer offsets.
    pub uniform_align: u64,
    pub pipes: Pipes,
    /// Device errors no error scope caught (reported by the next forward).
    pub uncaptured: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("max_binding", &self.max_binding)
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: impl Into<String>) -> BackendError {
    BackendError::Unavailable {
        backend: "wgpu".into(),
        reason: reason.into(),
    }
}

impl Ctx {
    /// Opens the default adapter (honouring `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, ...) and compiles the kernels.
    pub fn open(max_binding: Option<u64>) -> Result<Self, BackendError> {
        let instance =
            wg::Instance::new(wg::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = pollster::block_on(instance.request_adapter(&wg::RequestAdapterOptions {
            power_preference: wg::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| {
            unavailable(format!(
                "no wgpu adapter found ({e}); on Linux without a GPU, install Mesa's software Vulkan driver \
                 (`apt-get install mesa-vulkan-drivers libvulkan1`) and set WGPU_BACKEND=vulkan"
            ))
        })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wg::DeviceDescriptor {
            label: Some("moe-rs"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("adapter {} refused a device: {e}", info.name)))?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wg::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let scope = device.push_error_scope(wg::ErrorFilter::Validation);
        let pipes = compile(&device);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(unavailable(format!(
                "the kernels do not compile on adapter {}: {e}",
                info.name
            )));
        }
        let adapter_binding = limits.max_storage_buffer_binding_size;
        Ok(Ctx {
            max_binding: adapter_binding,
            max_weight_binding: max_binding.map_or(adapter_binding, |m| m.min(adapter_binding)),
            max_buffer: limits.max_buffer_size,
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
            uniform_align: u64::from(limits.min_uniform_buffer_offset_alignment).max(64),
            device,
            queue,
            info,
            pipes,
            uncaptured,
        })
    }

    /// The adapter in words: name, backend, device type and driver.
    pub fn describe(&self) -> String {
        let i = &self.info;
        let driver = match (i.driver.is_empty(), i.driver_info.is_empty()) {
            (true, true) => "unknown driver".to_string(),
            (false, true) => i.driver.clone(),
            (true, false) => i.driver_info.clone(),
            (false, false) => format!("{} {}", i.driver, i.driver_info),
        };
        format!(
            "{} ({:?}, {:?}, {driver})",
            i.name, i.backend, i.device_type
        )
    }

    /// A storage buffer holding `data` (at least 4 bytes), after checking the binding limit.
    pub fn storage_init(&self, what: &str, data: &[u8]) -> Result<wg::Buffer, MoeError> {
        self.check_binding(what, data.len() as u64)?;
        let pad = [0u8; 4];
        let contents = if data.is_empty() { &pad[..] } else { data };
        Ok(self
            .device
            .create_buffer_init(&wg::util::BufferInitDescriptor {
                label: Some(what),
                contents,
                usage: wg::BufferUsages::STORAGE | wg::BufferUsages::COPY_DST,
            }))
    }

    /// Errors when `bytes` cannot be one storage binding on this adapter.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<(), MoeError> {
        let limit = self.max_binding.min(self.max_buffer);
        if bytes > limit {
            return Err(err(format!(
                "{what} needs {} in one storage binding, over this adapter's limit of {}; the layer or batch \
                 is too large for the wgpu backend here (use fewer tokens per forward, or the cpu backend)",
                human(bytes),
                human(limit)
            )));
        }
        Ok(())
    }

    /// Takes the device errors that no error scope caught.
    pub fn take_uncaptured(&self) -> Vec<String> {
        self.uncaptured
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// `(x, y)` workgroups covering `n` when one dimension holds at most `max_groups`.
    pub fn grid(&self, n: u32) -> (u32, u32) {
        let n = n.max(1);
        let x = n.min(self.max_groups);
        (x, n.div_ceil(x))
    }
}

/// Reusable per-layer workspace buffers, grown on demand and kept between forwards.
#[derive(Debug, Default)]
pub(super) struct Pool {
    bufs: HashMap<&'static str, wg::Buffer>,
}

impl Pool {
    /// A storage buffer named `name` of at least `bytes` bytes (checked against the binding limit).
    pub fn storage(
        &mut self,
        ctx: &Ctx,
        name: &'static str,
        bytes: u64,
    ) -> Result<wg::Buffer, MoeError> {
        ctx.check_binding(name, bytes)?;
        self.get(
            ctx,
            name,
            bytes,
            wg::BufferUsages::STORAGE | wg::BufferUsages::COPY_DST | wg::BufferUsages::COPY_SRC,
        )
    }

    /// A buffer of at least `bytes` bytes with `usage`, reused when the last one was large enough.
    pub fn get(
        &mut self,
        ctx: &Ctx,
        name: &'static str,
        bytes: u64,
        usage: wg::BufferUsages,
    ) -> Result<wg::Buffer, MoeError> {
        let bytes = bytes.max(4).next_multiple_of(4);
        if bytes > ctx.max_buffer {
            return Err(err(format!(
                "{name} needs {bytes} bytes, over this adapter's largest buffer ({} bytes)",
                ctx.max_buffer
            )));
        }
        if let Some(b) = self.bufs.get(name)
            && b.size() >= bytes
            && b.usage() == usage
        {
            return Ok(b.clone());
        }
        let b = ctx.device.create_buffer(&wg::BufferDescriptor {
            label: Some(name),
            size: bytes,
            usage,
            mapped_at_creation: false,
        });
        self.bufs.insert(name, b.clone());
        Ok(b)
    }
}

/// A byte count in words: `3.0 MiB`, `12.5 KiB`, `100 B`.
pub(super) fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / 1048576.0)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

/// Bytes of a slice of plain values.
pub(super) fn bytes_of<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Little-endian words of a byte slice (no alignment needed).
pub(super) fn words(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}
