//! Uploading an expert bank: packed into the canonical layout ([`crate::packed`]) on the host, converted to the
//! backend's [`Dtype`] (f32, or bf16 / f16 rounded to nearest even) and kept resident. Biases stay f32.

use cudarc::driver::CudaSlice;

use moe_core::{ExpertBank, MoeError};

use super::device::{Arg, Gpu, err, ptr};
use crate::Dtype;
use crate::packed::pack;

/// Resident weights of one precision.
#[derive(Debug)]
pub(super) enum Weights {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

/// A borrowed view of resident weights, as a product kernel reads them.
#[derive(Debug, Clone, Copy)]
pub(super) enum WeightsRef<'a> {
    F32(&'a CudaSlice<f32>),
    Half(&'a CudaSlice<u16>),
}

impl Weights {
    /// A view of these weights.
    pub fn view(&self) -> WeightsRef<'_> {
        match self {
            Weights::F32(s) => WeightsRef::F32(s),
            Weights::Half(s) => WeightsRef::Half(s),
        }
    }
}

impl WeightsRef<'_> {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            WeightsRef::F32(s) => s.len(),
            WeightsRef::Half(s) => s.len(),
        }
    }

    /// Whether the elements are 16-bit (bf16 / f16 bit patterns).
    pub fn is_half(&self) -> bool {
        matches!(self, WeightsRef::Half(_))
    }

    /// The device address.
    pub fn ptr(&self, gpu: &Gpu) -> Arg {
        match self {
            WeightsRef::F32(s) => ptr(gpu, s),
            WeightsRef::Half(s) => ptr(gpu, s),
        }
    }
}

/// An expert bank resident on the GPU (canonical layout).
#[derive(Debug)]
pub(super) struct DevBank {
    pub mode: u32,
    pub n_experts: usize,
    pub d: usize,
    pub f: usize,
    pub up_rows: usize,
    pub act: u32,
    pub alpha: f32,
    pub limit: f32,
    pub up: Weights,
    pub up_bias: Option<CudaSlice<f32>>,
    pub down: Weights,
    pub down_bias: Option<CudaSlice<f32>>,
}

impl DevBank {
    /// Packs `bank`, converts it to `dtype` and uploads it (`what`: "routed" or "shared", for errors).
    ///
    /// # Errors
    /// A bank this backend does not run (PEER, custom), a device error.
    pub fn upload(
        gpu: &Gpu,
        bank: &ExpertBank,
        dtype: Dtype,
        what: &str,
    ) -> Result<Self, MoeError> {
        let p = pack(bank, "cuda").map_err(|r| err(format!("{what} experts: {r}")))?;
        let weights = |v: &[f32]| -> Result<Weights, MoeError> {
            Ok(match crate::dtype::half_bits(dtype, v) {
                None => Weights::F32(gpu.upload(v)?),
                Some(bits) => Weights::Half(gpu.upload(&bits)?),
            })
        };
        Ok(DevBank {
            mode: p.mode,
            n_experts: p.n_experts,
            d: p.d,
            f: p.f,
            up_rows: p.up_rows(),
            act: p.act,
            alpha: p.alpha,
            limit: p.limit,
            up: weights(&p.up)?,
            up_bias: p.up_bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
            down: weights(&p.down)?,
            down_bias: p.down_bias.as_deref().map(|b| gpu.upload(b)).transpose()?,
        })
    }
}
