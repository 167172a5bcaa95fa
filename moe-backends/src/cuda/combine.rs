//! The shared experts' sigmoid gate and the combine, each behind its safe launch wrapper: `y[t] = scale · Σ w ·
//! out[slot]` over token `t`'s slots in ascending expert order (as the CPU backend), plus the (gated) shared
//! output and the output bias.

use cudarc::driver::CudaSlice;

use moe_core::MoeError;

use super::device::{Arg, Gpu, err, ptr, ptr_opt};

/// Enqueues `out[t] = sigmoid(x[t] · g)` for `t` tokens of width `d` (one warp per token).
///
/// # Errors
/// A buffer too short (an internal error), a launch failure.
#[allow(
    unsafe_code,
    reason = "the one launch of shared_gate, after checking its buffers"
)]
pub(super) fn shared_gate(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
    (t, d): (usize, usize),
) -> Result<(), MoeError> {
    let fits = u32::try_from(t).is_ok() && u32::try_from(d).is_ok();
    if x.len() < t * d || g.len() < d || out.len() < t || !fits {
        return Err(err("internal: shared_gate launch of the wrong size"));
    }
    let args = [
        ptr(gpu, x),
        ptr(gpu, g),
        Arg::U32(t as u32),
        Arg::U32(d as u32),
        ptr(gpu, out),
    ];
    // SAFETY: checked above: x holds T·d values, g d, out T. The arguments are shared_gate's parameters in order
    // (kernels.cu).
    unsafe { gpu.launch("shared_gate", (t.div_ceil(4) as u32, 1, 1), 128, 0, &args) }
}

/// Token `t`'s slot entries (slot + 1, 0: none) as the combine reads them.
pub(super) enum TokenSlots<'a> {
    /// `[t · k, +k)` of `slots` (native routing).
    Fixed { k: usize, slots: &'a CudaSlice<u32> },
    /// `offsets[t] .. offsets[t + 1]` of `slots` (a host plan of `entries` entries).
    Offsets {
        offsets: &'a CudaSlice<u32>,
        slots: &'a CudaSlice<u32>,
        entries: usize,
    },
}

/// One `combine` launch (kernels.cu's parameters, in order).
pub(super) struct Combine<'a> {
    /// `[rows, d]` expert outputs by slot, and `[rows]` slot weights; every slot entry is below `rows`.
    pub slot_out: &'a CudaSlice<f32>,
    pub slot_weight: &'a CudaSlice<f32>,
    pub rows: usize,
    pub tokens: TokenSlots<'a>,
    pub t: usize,
    pub d: usize,
    pub scale: f32,
    /// `[T, d]` shared-expert output and its optional `[T]` gate.
    pub shared: Option<(&'a CudaSlice<f32>, Option<&'a CudaSlice<f32>>)>,
    /// `[d]`.
    pub bias: Option<&'a CudaSlice<f32>>,
    /// `[T, d]`.
    pub y: &'a CudaSlice<f32>,
}

/// Checks the lengths `combine` relies on.
fn check_combine(c: &Combine<'_>) -> Result<(), MoeError> {
    let (t, d) = (c.t, c.d);
    let slots_ok = match &c.tokens {
        TokenSlots::Fixed { k, slots } => *k >= 1 && slots.len() >= t * k,
        TokenSlots::Offsets {
            offsets,
            slots,
            entries,
        } => offsets.len() > t && slots.len() >= *entries,
    };
    let shared_ok = c
        .shared
        .is_none_or(|(sh, g)| sh.len() >= t * d && g.is_none_or(|g| g.len() >= t));
    let ok = slots_ok
        && shared_ok
        && c.slot_out.len() >= c.rows * d
        && c.slot_weight.len() >= c.rows
        && c.bias.is_none_or(|b| b.len() >= d)
        && c.y.len() >= t * d
        && u32::try_from(t).is_ok()
        && u32::try_from(d).is_ok();
    if ok {
        Ok(())
    } else {
        Err(err("internal: combine launch of the wrong size"))
    }
}

/// Enqueues the combine into `y`, after checking its sizes.
///
/// # Errors
/// A buffer too short (an internal error), `T · d` too large, a launch failure.
#[allow(
    unsafe_code,
    reason = "the one launch of combine, after checking its buffers"
)]
pub(super) fn combine(gpu: &Gpu, c: &Combine<'_>) -> Result<(), MoeError> {
    check_combine(c)?;
    let (fixed_k, slots, offsets) = match &c.tokens {
        TokenSlots::Fixed { k, slots } => (*k as u32, *slots, None),
        TokenSlots::Offsets { offsets, slots, .. } => (0, *slots, Some(*offsets)),
    };
    let (shared_mode, sh, sg) = match c.shared {
        None => (0u32, None, None),
        Some((sh, None)) => (1, Some(sh), None),
        Some((sh, Some(g))) => (2, Some(sh), Some(g)),
    };
    let args = [
        ptr(gpu, c.slot_out),
        ptr(gpu, c.slot_weight),
        ptr(gpu, slots),
        ptr_opt(gpu, offsets),
        Arg::U32(fixed_k),
        Arg::U32(c.t as u32),
        Arg::U32(c.d as u32),
        Arg::F32(c.scale),
        Arg::U32(shared_mode),
        ptr_opt(gpu, sh),
        ptr_opt(gpu, sg),
        ptr_opt(gpu, c.bias),
        ptr(gpu, c.y),
    ];
    let blocks = u32::try_from((c.t * c.d).div_ceil(256)).map_err(|_| err("T · d too large"))?;
    // SAFETY: `check_combine` checked that slot_out holds rows·d values and slot_weight rows, that the token slot
    // lists hold T·k entries (native) or T + 1 offsets and their entries (host), the shared output T·d values
    // and its gate T, the bias d and y T·d. The slot entries and offsets are ours (the sort's or the host plan's):
    // every slot is below rows and every offset within the entries. The arguments are combine's parameters in
    // order (kernels.cu).
    unsafe { gpu.launch("combine", (blocks, 1, 1), 256, 0, &args) }
}
