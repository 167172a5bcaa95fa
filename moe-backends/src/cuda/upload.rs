//! Uploading an expert bank: packed into the canonical layout ([`crate::packed`]) on the host, converted to the
//! backend's [`Dtype`] (f32, or bf16 / f16 rounded to nearest even) and kept resident; for int8, fp8 and mxfp4
//! quantised on the host ([`PackedBank::quantize`]) and kept packed (`quant.rs`), as a bank that arrives packed
//! ([`ExpertBank::Packed`], in its own format whatever the backend's) is. Biases stay f32.

use cudarc::driver::CudaSlice;

use moe_core::{ExpertBank, MoeError, PackedBank};

use super::device::{Arg, Gpu, err, ptr};
use super::quant::{DevPacked, upload_packed};
use crate::Dtype;
use crate::packed::pack;

/// Resident weights of one precision.
#[derive(Debug)]
pub(super) enum Weights {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
    /// int8, fp8 or mxfp4 codes and their scales (`quant.rs`).
    Packed(DevPacked),
}

/// A borrowed view of resident weights, as a product kernel reads them.
#[derive(Debug, Clone, Copy)]
pub(super) enum WeightsRef<'a> {
    F32(&'a CudaSlice<f32>),
    Half(&'a CudaSlice<u16>),
    Packed(&'a DevPacked),
}

impl Weights {
    /// A view of these weights.
    pub fn view(&self) -> WeightsRef<'_> {
        match self {
            Weights::F32(s) => WeightsRef::F32(s),
            Weights::Half(s) => WeightsRef::Half(s),
            Weights::Packed(p) => WeightsRef::Packed(p),
        }
    }
}

impl WeightsRef<'_> {
    /// Elements held (bytes of packed codes).
    pub fn len(&self) -> usize {
        match self {
            WeightsRef::F32(s) => s.len(),
            WeightsRef::Half(s) => s.len(),
            WeightsRef::Packed(p) => p.data.len(),
        }
    }

    /// Whether these are packed codes with scales (the `gemm_q` kernels).
    pub fn is_packed(&self) -> bool {
        matches!(self, WeightsRef::Packed(_))
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
            WeightsRef::Packed(p) => ptr(gpu, &p.data),
        }
    }
}

/// An expert bank resident on the GPU (canonical layout).
#[derive(Debug)]
pub(super) struct DevBank {
    /// The weights' format: selects the product kernels.
    pub format: Dtype,
    /// GPT-OSS rows kept interleaved (`2j` gate, `2j + 1` up, first bias likewise): packed int8 / fp8 / mxfp4
    /// GPT-OSS banks. Dense banks are canonical (gate rows, then up rows).
    pub interleaved: bool,
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
    /// Packs `bank`, converts it to `dtype` and uploads it (`what`: "routed" or "shared", for errors). A packed
    /// bank keeps its own format; an f32 bank with `dtype` int8, fp8 or mxfp4 is quantised on the host first.
    ///
    /// # Errors
    /// A bank this backend does not run (PEER, custom), the quantisation's errors ([`PackedBank::quantize`]:
    /// MXFP4 needs `d` and `f` multiples of 32, non-finite weights), a device error.
    pub fn upload(
        gpu: &Gpu,
        bank: &ExpertBank,
        dtype: Dtype,
        what: &str,
    ) -> Result<Self, MoeError> {
        match bank {
            ExpertBank::Packed(pb) => return upload_packed(gpu, pb),
            ExpertBank::SwiGlu(_) | ExpertBank::GptOss(_) | ExpertBank::Mlp(_)
                if matches!(dtype, Dtype::Int8 | Dtype::Fp8 | Dtype::Mxfp4) =>
            {
                return upload_packed(gpu, &PackedBank::quantize(bank, dtype)?);
            }
            _ => {}
        }
        let p = pack(bank, "cuda").map_err(|r| err(format!("{what} experts: {r}")))?;
        let weights = |v: &[f32]| -> Result<Weights, MoeError> {
            Ok(match crate::dtype::half_bits(dtype, v) {
                None => Weights::F32(gpu.upload(v)?),
                Some(bits) => Weights::Half(gpu.upload(&bits)?),
            })
        };
        Ok(DevBank {
            format: if matches!(dtype, Dtype::Bf16 | Dtype::F16) {
                dtype
            } else {
                Dtype::F32
            },
            interleaved: false,
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
