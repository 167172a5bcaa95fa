//! Packed expert banks ([`moe_core::ExpertBank::Packed`], or an f32 bank quantised at upload with
//! [`PackedBank::quantize`]) made resident on the GPU.
//!
//! - int8, FP8 and MXFP4 weights stay packed: the bytes exactly as [`PackedMatrix::data`] holds them (`[E, rows,
//!   row_bytes]`, reduction axis contiguous) and their scales ([`DevScales`]); a GPT-OSS bank keeps its interleaved
//!   gate / up rows (`2j` gate, `2j + 1` up) and interleaved first bias, which the kernels read in that order
//!   (`kernels_q.cu`, `il`). The products decode inside the product (`qgemm.rs`).
//! - f32, bf16 and f16 packed banks become the canonical dense layout of the f32 / bf16 / f16 kernels (values
//!   unchanged, only moved: a GPT-OSS bank's rows and first bias de-interleaved, gate half then up half).
//!
//! Biases stay f32.

use cudarc::driver::CudaSlice;
use ndarray::Array2;

use moe_core::quant::Scales;
use moe_core::{MoeError, PackedBank, PackedFamily, PackedMatrix};

use super::device::{Gpu, err};
use super::upload::{DevBank, Weights};
use crate::Dtype;
use crate::packed::{MODE_GATED, MODE_GPT_OSS, MODE_SINGLE, act_code};

/// One packed weight tensor `[E, rows, cols]` resident on the GPU (int8, fp8 or mxfp4).
#[derive(Debug)]
pub(super) struct DevPacked {
    /// The format.
    pub format: Dtype,
    /// `[E, rows, cols]`.
    pub dims: [usize; 3],
    /// `E · rows` rows of [`Dtype::row_bytes`]`(cols)` bytes.
    pub data: CudaSlice<u8>,
    /// The scales.
    pub scales: DevScales,
}

/// Resident scales of a [`DevPacked`] (see [`Scales`]).
#[derive(Debug)]
pub(super) enum DevScales {
    /// int8: f32 `[E, rows]`.
    Rows(CudaSlice<f32>),
    /// FP8: f32 `[E, ⌈rows / block_rows⌉, ⌈cols / block_cols⌉]`.
    Blocks {
        block_rows: usize,
        block_cols: usize,
        values: CudaSlice<f32>,
    },
    /// MXFP4: E8M0 codes `[E, rows, cols / 32]`.
    E8m0(CudaSlice<u8>),
}

impl DevPacked {
    /// Uploads `m` as it is (int8, fp8 or mxfp4).
    ///
    /// # Errors
    /// A dense format (an internal error: those take the dense kernels), a device error.
    pub fn upload(gpu: &Gpu, m: &PackedMatrix) -> Result<Self, MoeError> {
        let scales = match m.scales() {
            Scales::Rows(v) => DevScales::Rows(gpu.upload(v)?),
            Scales::Blocks {
                block_rows,
                block_cols,
                values,
            } => DevScales::Blocks {
                block_rows: *block_rows,
                block_cols: *block_cols,
                values: gpu.upload(values)?,
            },
            Scales::E8m0(v) => DevScales::E8m0(gpu.upload(v)?),
            Scales::None => {
                return Err(err(format!(
                    "internal: {} weights uploaded as packed codes",
                    m.format()
                )));
            }
        };
        Ok(DevPacked {
            format: m.format(),
            dims: m.dims(),
            data: gpu.upload(m.data())?,
            scales,
        })
    }

    /// Bytes of one expert's weights (the kernels' `w_stride`).
    pub fn w_stride(&self) -> usize {
        let [_, rows, cols] = self.dims;
        rows * self.format.row_bytes(cols)
    }

    /// Scale elements of one expert (the kernels' `s_stride`).
    pub fn s_stride(&self) -> usize {
        let [_, rows, cols] = self.dims;
        match &self.scales {
            DevScales::Rows(_) => rows,
            DevScales::Blocks {
                block_rows,
                block_cols,
                ..
            } => rows.div_ceil((*block_rows).max(1)) * cols.div_ceil((*block_cols).max(1)),
            DevScales::E8m0(_) => rows * (cols / moe_core::quant::MXFP4_BLOCK),
        }
    }

    /// Scale elements held.
    pub fn scales_len(&self) -> usize {
        match &self.scales {
            DevScales::Rows(v) | DevScales::Blocks { values: v, .. } => v.len(),
            DevScales::E8m0(v) => v.len(),
        }
    }

    /// The FP8 block shape `(block_rows, block_cols)`; `(1, 1)` for the other formats (the kernels divide by it).
    pub fn blocks(&self) -> (usize, usize) {
        match &self.scales {
            DevScales::Blocks {
                block_rows,
                block_cols,
                ..
            } => (*block_rows, *block_cols),
            _ => (1, 1),
        }
    }
}

/// Host values of a dense packed tensor in canonical row order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum DenseHost {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(Vec<u16>),
}

/// `v` (`E` blocks of `rows` rows of `width` values) with each block's rows de-interleaved: even rows, then odd
/// rows (GPT-OSS's `2j` gate / `2j + 1` up → gate half then up half). Unchanged when `il` is false.
pub(super) fn deinterleave<T: Copy>(v: Vec<T>, rows: usize, width: usize, il: bool) -> Vec<T> {
    if !il || rows == 0 || width == 0 {
        return v;
    }
    let mut out = Vec::with_capacity(v.len());
    for block in v.chunks(rows * width) {
        for start in [0, 1] {
            for row in block.chunks(width).skip(start).step_by(2) {
                out.extend_from_slice(row);
            }
        }
    }
    out
}

/// The values of a dense (f32, bf16, f16) packed tensor `m`, rows de-interleaved when `il` (see
/// [`deinterleave`]).
///
/// # Errors
/// A format with scales (an internal error).
pub(super) fn dense_host(m: &PackedMatrix, il: bool) -> Result<DenseHost, MoeError> {
    let [_, rows, cols] = m.dims();
    let bytes = m.data();
    Ok(match m.format() {
        Dtype::F32 => DenseHost::F32(deinterleave(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            rows,
            cols,
            il,
        )),
        Dtype::Bf16 | Dtype::F16 => DenseHost::Half(deinterleave(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
            rows,
            cols,
            il,
        )),
        other => {
            return Err(err(format!(
                "internal: {other} weights taken for dense ones"
            )));
        }
    })
}

/// The kernels' epilogue of `family`: (mode, activation code, alpha, limit).
pub(super) fn family_mode(family: PackedFamily) -> (u32, u32, f32, f32) {
    match family {
        PackedFamily::SwiGlu { act } => (MODE_GATED, act_code(act), 0.0, 0.0),
        PackedFamily::GptOss { alpha, limit } => (MODE_GPT_OSS, 0, alpha, limit),
        PackedFamily::Mlp { act } => (MODE_SINGLE, act_code(act), 0.0, 0.0),
    }
}

/// A bias `[E, n]` (row order as given, de-interleaved when `il`) uploaded.
fn bias(gpu: &Gpu, b: Option<&Array2<f32>>, il: bool) -> Result<Option<CudaSlice<f32>>, MoeError> {
    b.map(|b| {
        let v: Vec<f32> = b.iter().copied().collect();
        gpu.upload(&deinterleave(v, b.ncols(), 1, il))
    })
    .transpose()
}

/// Uploads the packed bank `pb` (see the module docs for what stays packed).
///
/// # Errors
/// Device errors.
pub(super) fn upload_packed(gpu: &Gpu, pb: &PackedBank) -> Result<DevBank, MoeError> {
    let (n_experts, d, f) = (pb.n_experts(), pb.d_model(), pb.ffn());
    let (mode, act, alpha, limit) = family_mode(pb.family());
    let gpt_oss = mode == MODE_GPT_OSS;
    let format = pb.format();
    let dense = |m: &PackedMatrix, il: bool| -> Result<Weights, MoeError> {
        Ok(match dense_host(m, il)? {
            DenseHost::F32(v) => Weights::F32(gpu.upload(&v)?),
            DenseHost::Half(v) => Weights::Half(gpu.upload(&v)?),
        })
    };
    let (up, down, interleaved) = match format {
        Dtype::F32 | Dtype::Bf16 | Dtype::F16 => {
            (dense(pb.up(), gpt_oss)?, dense(pb.down(), false)?, false)
        }
        Dtype::Int8 | Dtype::Fp8 | Dtype::Mxfp4 => (
            Weights::Packed(DevPacked::upload(gpu, pb.up())?),
            Weights::Packed(DevPacked::upload(gpu, pb.down())?),
            gpt_oss,
        ),
    };
    Ok(DevBank {
        format,
        interleaved,
        mode,
        n_experts,
        d,
        f,
        up_rows: if mode == MODE_SINGLE { f } else { 2 * f },
        act,
        alpha,
        limit,
        up,
        // Dense GPT-OSS rows were de-interleaved above: the bias follows them.
        up_bias: bias(gpu, pb.up_bias(), gpt_oss && !interleaved)?,
        down,
        down_bias: bias(gpu, pb.down_bias(), false)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::pack;
    use moe_core::{ExpertBank, GptOssBank, MlpBank, SwiGluBank};
    use ndarray::Array3;

    fn arr3(e: usize, a: usize, b: usize, seed: usize) -> Array3<f32> {
        Array3::from_shape_fn((e, a, b), |(i, j, k)| {
            let h = (i * 7919 + j * 104_729 + k * 1_299_709 + seed * 15_485_863) % 1000;
            (h as f32 / 1000.0 - 0.5) * 0.4
        })
    }

    fn arr2(e: usize, a: usize, seed: usize) -> Array2<f32> {
        Array2::from_shape_fn((e, a), |(i, j)| {
            ((i * 31 + j * 7 + seed) % 17) as f32 * 0.05 - 0.4
        })
    }

    /// The dense values a packed bank uploads, widened to f32, are exactly the canonical layout of its
    /// dequantised bank (what the dense kernels read for an f32 bank): rows and biases in the same order.
    #[test]
    fn dense_packed_banks_take_the_canonical_layout() {
        let (e, d, f) = (3, 32, 64);
        let banks = [
            ExpertBank::SwiGlu(
                SwiGluBank::new(
                    arr3(e, 2 * f, d, 1),
                    arr3(e, d, f, 2),
                    moe_core::Activation::Silu,
                )
                .expect("bank"),
            ),
            ExpertBank::GptOss(
                GptOssBank::new(
                    arr3(e, d, 2 * f, 3),
                    arr2(e, 2 * f, 4),
                    arr3(e, f, d, 5),
                    arr2(e, d, 6),
                    1.702,
                    7.0,
                )
                .expect("bank"),
            ),
            ExpertBank::Mlp(
                MlpBank::new(
                    arr3(e, f, d, 7),
                    Some(arr2(e, f, 8)),
                    arr3(e, d, f, 9),
                    None,
                    moe_core::Activation::Gelu,
                )
                .expect("bank"),
            ),
        ];
        for bank in &banks {
            for format in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                let pb = PackedBank::quantize(bank, format).expect("quantise");
                let want = pack(&pb.dequantize().expect("dequantise"), "test").expect("pack");
                let gpt_oss = matches!(pb.family(), PackedFamily::GptOss { .. });
                let widen = |h: DenseHost| -> Vec<f32> {
                    match h {
                        DenseHost::F32(v) => v,
                        DenseHost::Half(v) if format == Dtype::Bf16 => v
                            .into_iter()
                            .map(|b| half::bf16::from_bits(b).to_f32())
                            .collect(),
                        DenseHost::Half(v) => v
                            .into_iter()
                            .map(|b| half::f16::from_bits(b).to_f32())
                            .collect(),
                    }
                };
                let up = widen(dense_host(pb.up(), gpt_oss).expect("up"));
                let down = widen(dense_host(pb.down(), false).expect("down"));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&up), bits(&want.up), "{} {format} up", bank.kind());
                assert_eq!(
                    bits(&down),
                    bits(&want.down),
                    "{} {format} down",
                    bank.kind()
                );
                let ub = pb
                    .up_bias()
                    .map(|b| deinterleave(b.iter().copied().collect(), b.ncols(), 1, gpt_oss));
                assert_eq!(ub, want.up_bias, "{} {format} up bias", bank.kind());
                let (mode, act, alpha, limit) = family_mode(pb.family());
                assert_eq!(
                    (mode, act, alpha, limit),
                    (want.mode, want.act, want.alpha, want.limit)
                );
            }
        }
    }

    #[test]
    fn deinterleave_takes_even_rows_then_odd_rows_per_block() {
        let v: Vec<u32> = (0..12).collect();
        // 2 blocks of 3 rows of 2.
        assert_eq!(
            deinterleave(v.clone(), 3, 2, true),
            vec![0, 1, 4, 5, 2, 3, 6, 7, 10, 11, 8, 9]
        );
        assert_eq!(deinterleave(v.clone(), 3, 2, false), v);
    }
}
