//! Per-forward device buffers of a resident layer, grown when a larger batch comes and reused otherwise.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use moe_core::MoeError;

use super::device::{Gpu, err};

/// The workspace of one layer.
#[derive(Debug, Default)]
pub(super) struct Work {
    pub x: Option<CudaSlice<f32>>,
    pub y: Option<CudaSlice<f32>>,
    pub pad: Option<CudaSlice<u32>>,
    pub logits: Option<CudaSlice<f32>>,
    pub sel: Option<CudaSlice<f32>>,
    pub a_expert: Option<CudaSlice<u32>>,
    pub a_weight: Option<CudaSlice<f32>>,
    pub a_info: Option<CudaSlice<u32>>,
    pub counts: Option<CudaSlice<u32>>,
    pub meta: Option<CudaSlice<u32>>,
    pub meta_all: Option<CudaSlice<u32>>,
    pub slot_token: Option<CudaSlice<u32>>,
    pub slot_weight: Option<CudaSlice<f32>>,
    pub assign_slot: Option<CudaSlice<u32>>,
    pub tok_off: Option<CudaSlice<u32>>,
    pub h: Option<CudaSlice<f32>>,
    pub slot_out: Option<CudaSlice<f32>>,
    pub sh_h: Option<CudaSlice<f32>>,
    pub sh_out: Option<CudaSlice<f32>>,
    pub sg: Option<CudaSlice<f32>>,
    /// T of the rows in `meta_all`.
    pub meta_all_t: Option<usize>,
}

/// `slot` with at least `n` elements (contents unspecified).
pub(super) fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    slot: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>, MoeError> {
    if slot.as_ref().is_none_or(|s| s.len() < n.max(1)) {
        *slot = None;
        *slot = Some(gpu.zeros(n)?);
    }
    slot.as_mut().ok_or_else(|| err("internal: workspace"))
}

/// A workspace buffer that the forward has grown.
pub(super) fn need<T>(s: &Option<CudaSlice<T>>) -> Result<&CudaSlice<T>, MoeError> {
    s.as_ref().ok_or_else(|| err("internal: workspace"))
}
