//! Grouping by expert. On the native path, a stable counting sort on the GPU over chunks of [`CHUNK`]
//! assignments (`group_count`: per-chunk histograms; `group_scan`: row and tile offsets, and each chunk's first
//! slot per expert; `group_scatter`: each kept assignment's slot), so each expert's rows are in ascending token
//! order and no atomics decide an order; each launch has its safe wrapper. On the host path, the host plan's rows
//! ([`HostPlan`]), copied up.

use cudarc::driver::CudaSlice;

use moe_core::{MoeError, Routing};

use super::device::{Arg, Gpu, err, ptr};
use super::{BM, CHUNK};
use crate::native::row_meta;

/// A host-routed plan, ready to copy up: row and tile offsets, slots, and each token's slots.
pub(super) struct HostPlan {
    pub meta: Vec<u32>,
    pub slot_token: Vec<u32>,
    pub slot_weight: Vec<f32>,
    pub tok_off: Vec<u32>,
    pub tok_slot: Vec<u32>,
}

impl HostPlan {
    /// The device form of `routing`.
    ///
    /// # Errors
    /// [`MoeError::TooLarge`] when the slots do not fit in `u32`.
    pub fn new(routing: &Routing) -> Result<Self, MoeError> {
        let (offsets, slots) = routing.token_slots();
        Ok(HostPlan {
            meta: row_meta(routing, BM)?,
            slot_token: routing.slot_tokens().to_vec(),
            slot_weight: routing.slot_weights().to_vec(),
            tok_off: offsets.iter().map(|&o| o as u32).collect(),
            tok_slot: slots.iter().map(|&s| s as u32 + 1).collect(),
        })
    }
}

/// The buffers of the counting sort of `n = T · k` assignments of `k` per token over `e` experts.
pub(super) struct Sort<'a> {
    pub n: usize,
    pub k: usize,
    pub e: usize,
    /// Assignment expert ids, infos (drop flag) and weights, `n` each.
    pub a_expert: &'a CudaSlice<u32>,
    pub a_info: &'a CudaSlice<u32>,
    pub a_weight: &'a CudaSlice<f32>,
    /// `[chunks, E]` histograms, then each chunk's first slot per expert.
    pub counts: &'a CudaSlice<u32>,
    /// `[2E + 2]` row and tile offsets.
    pub meta: &'a CudaSlice<u32>,
    /// `n` each: slot -> token and weight, assignment -> slot + 1.
    pub slot_token: &'a CudaSlice<u32>,
    pub slot_weight: &'a CudaSlice<f32>,
    pub assign_slot: &'a CudaSlice<u32>,
}

impl Sort<'_> {
    /// Chunks of [`CHUNK`] assignments.
    fn chunks(&self) -> usize {
        self.n.div_ceil(CHUNK)
    }

    /// Checks the lengths and sizes every launch of the sort relies on.
    fn check(&self) -> Result<(), MoeError> {
        let (n, e) = (self.n, self.e);
        let ok = self.a_expert.len() >= n
            && self.a_info.len() >= n
            && self.a_weight.len() >= n
            && self.counts.len() >= self.chunks() * e
            && self.meta.len() >= 2 * e + 2
            && self.slot_token.len() >= n
            && self.slot_weight.len() >= n
            && self.assign_slot.len() >= n
            && self.k >= 1
            && u32::try_from(n).is_ok()
            && u32::try_from(e).is_ok();
        if ok {
            Ok(())
        } else {
            Err(err("internal: counting sort of the wrong size"))
        }
    }
}

/// Enqueues the three launches of the sort.
///
/// # Errors
/// A buffer too short or a histogram over the shared memory (internal errors), a launch failure.
pub(super) fn counting_sort(gpu: &Gpu, s: &Sort<'_>) -> Result<(), MoeError> {
    group_count(gpu, s)?;
    group_scan(gpu, s)?;
    group_scatter(gpu, s)
}

/// `counts[c · E + e]` = kept assignments of expert `e` in chunk `c`.
#[allow(
    unsafe_code,
    reason = "the one launch of group_count, after checking its buffers"
)]
fn group_count(gpu: &Gpu, s: &Sort<'_>) -> Result<(), MoeError> {
    s.check()?;
    let shared = s.e * 4;
    if shared > gpu.max_shared {
        return Err(err("internal: expert histogram over the shared memory"));
    }
    let args = [
        ptr(gpu, s.a_expert),
        ptr(gpu, s.a_info),
        Arg::U32(s.n as u32),
        Arg::U32(s.e as u32),
        ptr(gpu, s.counts),
    ];
    // SAFETY: `Sort::check` checked that the assignment buffers hold n entries and counts chunks·E; the kernel's
    // dynamic shared memory (E words) is within the device's limit, checked above; expert ids below E are ours
    // (the routing kernel's). The arguments are group_count's parameters in order (kernels.cu).
    unsafe {
        gpu.launch(
            "group_count",
            (s.chunks() as u32, 1, 1),
            CHUNK as u32,
            shared as u32,
            &args,
        )
    }
}

/// `meta` = row and tile offsets; `counts` become each chunk's first slot per expert.
#[allow(
    unsafe_code,
    reason = "the one launch of group_scan, after checking its buffers"
)]
fn group_scan(gpu: &Gpu, s: &Sort<'_>) -> Result<(), MoeError> {
    s.check()?;
    let args = [
        ptr(gpu, s.counts),
        Arg::U32(s.chunks() as u32),
        Arg::U32(s.e as u32),
        ptr(gpu, s.meta),
    ];
    // SAFETY: `Sort::check` checked that counts holds chunks·E entries and meta 2E + 2. The arguments are
    // group_scan's parameters in order (kernels.cu).
    unsafe { gpu.launch("group_scan", (1, 1, 1), 256, 0, &args) }
}

/// Each kept assignment's slot: its chunk's first slot for the expert plus the kept ones before it.
#[allow(
    unsafe_code,
    reason = "the one launch of group_scatter, after checking its buffers"
)]
fn group_scatter(gpu: &Gpu, s: &Sort<'_>) -> Result<(), MoeError> {
    s.check()?;
    let args = [
        ptr(gpu, s.a_expert),
        ptr(gpu, s.a_info),
        ptr(gpu, s.a_weight),
        Arg::U32(s.n as u32),
        Arg::U32(s.k as u32),
        Arg::U32(s.e as u32),
        ptr(gpu, s.counts),
        ptr(gpu, s.slot_token),
        ptr(gpu, s.slot_weight),
        ptr(gpu, s.assign_slot),
    ];
    // SAFETY: `Sort::check` checked that the assignment buffers, the slot lists and assign_slot hold n entries
    // and counts chunks·E; the slots the scan computed are below the number of kept assignments, at most n. The
    // arguments are group_scatter's parameters in order (kernels.cu).
    unsafe {
        gpu.launch(
            "group_scatter",
            (s.chunks() as u32, 1, 1),
            CHUNK as u32,
            0,
            &args,
        )
    }
}
