//! The staging side of the CUDA expert store ([`super::store`]): the ring of pinned one-expert host buffers, a
//! load from the source packed and converted into one of them, the asynchronous copies from it into a slot of the
//! slot bank on the copy stream, and the zeroed slot bank itself.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice};

use moe_core::store::ExpertSource;
use moe_core::{ExpertBank, MoeError};

use super::device::{Gpu, err};
use super::upload::{DevBank, Weights};
use crate::Dtype;
use crate::packed::{PackedBank, pack};

/// Pinned one-expert staging buffers per stored layer: the host fills one while the copies of the others run.
pub(super) const RING: usize = 4;

/// One pinned staging buffer: an expert's weights (`up` then `down`, in the backend's precision) and biases
/// (`up_bias` then `down_bias`, f32), and the event recorded on the copy stream after its last copy.
pub(super) struct Staging {
    weights: PinnedWeights,
    bias: Option<PinnedHostSlice<f32>>,
    /// Recorded on the copy stream after the buffer's last copy; the host waits for it before refilling.
    pub copied: CudaEvent,
}

impl Staging {
    /// A zeroed staging buffer for one expert of `sizes`, weights in `dtype`.
    ///
    /// # Errors
    /// The driver's (out of pinned memory, no event).
    pub(super) fn new(gpu: &Gpu, dtype: Dtype, sizes: Sizes) -> Result<Self, MoeError> {
        let n = sizes.up + sizes.down;
        Ok(Staging {
            weights: match dtype {
                Dtype::F32 => PinnedWeights::F32(gpu.pinned_zeros(n)?),
                _ => PinnedWeights::Half(gpu.pinned_zeros(n)?),
            },
            bias: match sizes.up_bias + sizes.down_bias {
                0 => None,
                b => Some(gpu.pinned_zeros(b)?),
            },
            copied: gpu
                .ctx
                .new_event(None)
                .map_err(|e| err(format!("creating an event: {e}")))?,
        })
    }
}

enum PinnedWeights {
    F32(PinnedHostSlice<f32>),
    Half(PinnedHostSlice<u16>),
}

/// Per-expert sizes in the canonical layout (values).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sizes {
    up: usize,
    down: usize,
    up_bias: usize,
    down_bias: usize,
}

impl Sizes {
    /// Bytes of one pinned staging buffer: the weights in `dtype`, the biases in f32.
    pub(super) fn staging_bytes(&self, dtype: Dtype) -> u64 {
        let w = crate::dtype::dense_bytes(dtype);
        ((self.up + self.down) * w + (self.up_bias + self.down_bias) * 4) as u64
    }

    /// The per-expert sizes of the packed one-expert bank `p`.
    pub(super) fn of(p: &PackedBank) -> Self {
        Sizes {
            up: p.up_per_expert(),
            down: p.down_per_expert(),
            up_bias: p.up_bias.as_ref().map_or(0, Vec::len),
            down_bias: p.down_bias.as_ref().map_or(0, Vec::len),
        }
    }
}

/// The zeroed slot bank: `slots` experts of the packed one-expert bank `p`'s kind, in `dtype`.
pub(super) fn slot_bank(
    gpu: &Gpu,
    p: &PackedBank,
    sizes: Sizes,
    slots: usize,
    dtype: Dtype,
) -> Result<DevBank, MoeError> {
    let times = |n: usize| {
        n.checked_mul(slots).ok_or_else(|| MoeError::TooLarge {
            what: format!("{slots} resident expert slots on the GPU"),
            size: n as u128 * slots as u128,
            limit: usize::MAX as u128,
        })
    };
    let weights = |n: usize| -> Result<Weights, MoeError> {
        Ok(match dtype {
            Dtype::F32 => Weights::F32(gpu.zeros(times(n)?)?),
            _ => Weights::Half(gpu.zeros(times(n)?)?),
        })
    };
    let bias = |n: usize| -> Result<Option<CudaSlice<f32>>, MoeError> {
        if n == 0 {
            Ok(None)
        } else {
            Ok(Some(gpu.zeros(times(n)?)?))
        }
    };
    Ok(DevBank {
        format: dtype,
        interleaved: false,
        mode: p.mode,
        n_experts: slots,
        d: p.d,
        f: p.f,
        up_rows: p.up_rows(),
        act: p.act,
        alpha: p.alpha,
        limit: p.limit,
        up: weights(sizes.up)?,
        up_bias: bias(sizes.up_bias)?,
        down: weights(sizes.down)?,
        down_bias: bias(sizes.down_bias)?,
    })
}

/// Loads `expert` from `source` into the one-expert bank `host` and packs it (canonical layout, f32).
pub(super) fn load_packed(
    source: &dyn ExpertSource,
    host: &mut ExpertBank,
    expert: u32,
) -> Result<PackedBank, MoeError> {
    {
        let mut dst: Vec<&mut [f32]> = host
            .params_mut()
            .into_iter()
            .map(|p| p.value.into_slice())
            .collect::<Option<_>>()
            .ok_or_else(|| err("internal: stored forward: a non-contiguous staging bank"))?;
        source
            .load(expert as usize, &mut dst)
            .map_err(|e| name_expert(e, expert, source))?;
    }
    pack(host, "cuda").map_err(|r| err(format!("stored experts: {r}")))
}

/// Copies the packed expert `p` into the pinned staging `st`, converting its weights to `dtype`.
pub(super) fn stage(
    st: &mut Staging,
    p: &PackedBank,
    dtype: Dtype,
    sizes: Sizes,
) -> Result<(), MoeError> {
    let pinned = |e: cudarc::driver::DriverError| err(format!("pinned staging: {e}"));
    if p.up.len() != sizes.up || p.down.len() != sizes.down {
        return Err(err(
            "internal: stored forward: a packed expert of the wrong size",
        ));
    }
    match &mut st.weights {
        PinnedWeights::F32(w) => {
            let w = w.as_mut_slice().map_err(pinned)?;
            w[..sizes.up].copy_from_slice(&p.up);
            w[sizes.up..sizes.up + sizes.down].copy_from_slice(&p.down);
        }
        PinnedWeights::Half(w) => {
            let w = w.as_mut_slice().map_err(pinned)?;
            let (up, down) = (
                crate::dtype::half_bits(dtype, &p.up),
                crate::dtype::half_bits(dtype, &p.down),
            );
            let (Some(up), Some(down)) = (up, down) else {
                return Err(err("internal: stored forward: f32 weights in half staging"));
            };
            w[..sizes.up].copy_from_slice(&up);
            w[sizes.up..sizes.up + sizes.down].copy_from_slice(&down);
        }
    }
    if let Some(b) = &mut st.bias {
        let b = b.as_mut_slice().map_err(pinned)?;
        let (ub, db) = (
            p.up_bias.as_deref().unwrap_or(&[]),
            p.down_bias.as_deref().unwrap_or(&[]),
        );
        if ub.len() != sizes.up_bias || db.len() != sizes.down_bias {
            return Err(err(
                "internal: stored forward: packed biases of the wrong size",
            ));
        }
        b[..ub.len()].copy_from_slice(ub);
        b[ub.len()..ub.len() + db.len()].copy_from_slice(db);
    }
    Ok(())
}

/// Enqueues on `copy` the copies of staging `st` into `slot` of `bank` (weights, then biases).
pub(super) fn enqueue_copies(
    copy: &Arc<CudaStream>,
    st: &Staging,
    bank: &mut DevBank,
    slot: usize,
    sizes: Sizes,
) -> Result<(), MoeError> {
    let pinned = |e: cudarc::driver::DriverError| err(format!("pinned staging: {e}"));
    match (&st.weights, &mut bank.up, &mut bank.down) {
        (PinnedWeights::F32(w), Weights::F32(up), Weights::F32(down)) => {
            let w = w.as_slice().map_err(pinned)?;
            copy_into(copy, &w[..sizes.up], up, slot)?;
            copy_into(copy, &w[sizes.up..sizes.up + sizes.down], down, slot)?;
        }
        (PinnedWeights::Half(w), Weights::Half(up), Weights::Half(down)) => {
            let w = w.as_slice().map_err(pinned)?;
            copy_into(copy, &w[..sizes.up], up, slot)?;
            copy_into(copy, &w[sizes.up..sizes.up + sizes.down], down, slot)?;
        }
        _ => {
            return Err(err(
                "internal: stored forward: staging and slots of other precisions",
            ));
        }
    }
    if let Some(b) = &st.bias {
        let b = b.as_slice().map_err(pinned)?;
        if let Some(ub) = &mut bank.up_bias {
            copy_into(copy, &b[..sizes.up_bias], ub, slot)?;
        }
        if let Some(db) = &mut bank.down_bias {
            let r = sizes.up_bias..sizes.up_bias + sizes.down_bias;
            copy_into(copy, &b[r], db, slot)?;
        }
    }
    Ok(())
}

/// Enqueues on `copy` the copy of `src` (one expert's tensor, in pinned memory) into slot `slot` of `dst`
/// (`[slots, src.len()]`). The source must stay unchanged until the copy stream passes this copy: the caller
/// records the staging's event after it and waits for that event before writing the staging again.
fn copy_into<T: DeviceRepr>(
    copy: &Arc<CudaStream>,
    src: &[T],
    dst: &mut CudaSlice<T>,
    slot: usize,
) -> Result<(), MoeError> {
    let n = src.len();
    let range = slot * n..(slot + 1) * n;
    let mut view = dst
        .try_slice_mut(range)
        .ok_or_else(|| err("internal: stored forward: a slot outside the slot bank"))?;
    copy.memcpy_htod(src, &mut view)
        .map_err(|e| err(format!("copying an expert to the GPU: {e}")))
}

/// `e` as an error naming `expert`: kept when it already names it, else wrapped with the source's description.
pub(super) fn name_expert(e: MoeError, expert: u32, source: &dyn ExpertSource) -> MoeError {
    match e {
        MoeError::Expert { expert: x, .. } if x == expert as usize => e,
        other => MoeError::Expert {
            expert: expert as usize,
            reason: format!("loading it from {}: {other}", source.describe()),
        },
    }
}
