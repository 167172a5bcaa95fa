//! Grouped products over packed low-precision weights (int8 with row scales, FP8 E4M3 with block scales of any
//! shape, MXFP4 with E8M0 scales per 32): one safe wrapper around the `gemm_q_{format}_{mode}` launches of
//! `kernels_q.cu`, the two products of a packed bank, and the device decode of a packed matrix (the check that the
//! kernels' decode is moe-core's [`moe_core::quant::ExpertMatrix::decode_row`] bit for bit).
//!
//! The products decode each weight as it is staged into shared memory (no decoded copy of a matrix), keep the
//! activations in f32 and accumulate in f32, on the row tiles of the dense products (`gemm.rs`).

use cudarc::driver::CudaSlice;
use ndarray::Array3;

use moe_core::{MoeError, PackedMatrix};

use super::device::{Arg, Gpu, err, ptr, ptr_opt};
use super::gemm::tile_grid;
use super::quant::{DevPacked, DevScales};
use super::upload::DevBank;
use super::{BM, BN};
use crate::Dtype;
use crate::packed::{MODE_GPT_OSS, MODE_SINGLE};

/// One grouped product over packed weights: `out[r] = epilogue(a[idx[r] or r] · W_eᵀ)` over the rows of `meta`
/// (kernels_q.cu's `QGEMM_ARGS`, in its order).
pub(super) struct QProduct<'a> {
    /// Epilogue: [`MODE_SINGLE`], [`crate::packed::MODE_GATED`] or [`MODE_GPT_OSS`].
    pub mode: u32,
    /// Gated rows interleaved (`2n` gate, `2n + 1` up; first bias likewise) instead of gate rows then up rows.
    pub interleaved: bool,
    /// Input rows, `k` values each.
    pub a: &'a CudaSlice<f32>,
    /// Rows of `a`.
    pub a_rows: usize,
    /// Row `r` reads `a` row `idx[r]` (`None`: row `r`).
    pub idx: Option<&'a CudaSlice<u32>>,
    /// `[2E + 2]` row and tile offsets; every row below `max_rows`.
    pub meta: &'a CudaSlice<u32>,
    /// The weights, `[E, N or 2N, k]`.
    pub w: &'a DevPacked,
    /// Expert `e`'s biases start at `e · b_stride` (`N` values, `2N` for GPT-OSS).
    pub bias: Option<&'a CudaSlice<f32>>,
    pub b_stride: usize,
    /// `[max_rows, N]`.
    pub out: &'a CudaSlice<f32>,
    pub n: usize,
    pub k: usize,
    pub max_rows: usize,
    pub act: u32,
    pub alpha: f32,
    pub limit: f32,
}

/// The kernels' name of a packed format.
fn format_name(f: Dtype) -> Result<&'static str, MoeError> {
    match f {
        Dtype::Int8 | Dtype::Fp8 | Dtype::Mxfp4 => Ok(f.name()),
        other => Err(err(format!(
            "internal: {other} weights in a packed product"
        ))),
    }
}

/// Checks the sizes a packed weight's kernels rely on: codes and scales for all `E` experts, block sizes.
fn check_packed(w: &DevPacked) -> Result<(), MoeError> {
    let bad = |what: &str| Err(err(format!("internal: packed weights {what}")));
    let [e, rows, cols] = w.dims;
    format_name(w.format)?;
    let scales_ok = matches!(
        (w.format, &w.scales),
        (Dtype::Int8, DevScales::Rows(_))
            | (Dtype::Fp8, DevScales::Blocks { .. })
            | (Dtype::Mxfp4, DevScales::E8m0(_))
    );
    if !scales_ok {
        return bad("with scales of another format");
    }
    if w.format == Dtype::Mxfp4 && !cols.is_multiple_of(moe_core::quant::MXFP4_BLOCK) {
        return bad("of MXFP4 rows not a multiple of 32");
    }
    let (br, bc) = w.blocks();
    if br == 0 || bc == 0 || u32::try_from(br.max(bc)).is_err() {
        return bad("with a block size of zero or beyond u32");
    }
    if w.data.len() < e * w.w_stride() || w.scales_len() < e * w.s_stride() {
        return bad("shorter than their dimensions");
    }
    if u32::try_from(rows.max(cols).max(e)).is_err() {
        return bad("with sizes beyond u32");
    }
    Ok(())
}

/// Checks the sizes a packed product kernel relies on.
fn check_qproduct(p: &QProduct<'_>) -> Result<(), MoeError> {
    let bad = |what: &str| Err(err(format!("internal: packed product {what}")));
    check_packed(p.w)?;
    let [e, rows, cols] = p.w.dims;
    let w_rows = if p.mode == MODE_SINGLE { p.n } else { 2 * p.n };
    let bias_len = match p.mode {
        MODE_SINGLE => p.n,
        MODE_GPT_OSS => 2 * p.n,
        _ => 0,
    };
    if e == 0 || p.mode > MODE_GPT_OSS {
        return bad("without experts or with an unknown epilogue");
    }
    if rows != w_rows || cols != p.k {
        return bad("weights of another shape");
    }
    if p.meta.len() < 2 * e + 2 {
        return bad("row offsets too short");
    }
    if p.a.len() < p.a_rows * p.k || (p.idx.is_none() && p.a_rows < p.max_rows) {
        return bad("input too short");
    }
    if p.idx.is_some_and(|i| i.len() < p.max_rows) {
        return bad("gather indices too short");
    }
    if p.bias
        .is_some_and(|b| b.len() < (e - 1) * p.b_stride + bias_len)
    {
        return bad("biases too short");
    }
    if p.out.len() < p.max_rows * p.n {
        return bad("output too short");
    }
    if u32::try_from(p.b_stride.max(p.n)).is_err() {
        return bad("sizes beyond u32");
    }
    Ok(())
}

/// The scales' device address.
fn scales_ptr(gpu: &Gpu, w: &DevPacked) -> Arg {
    match &w.scales {
        DevScales::Rows(v) | DevScales::Blocks { values: v, .. } => ptr(gpu, v),
        DevScales::E8m0(v) => ptr(gpu, v),
    }
}

/// Enqueues one grouped product over packed weights, after checking every length it relies on.
///
/// # Errors
/// A buffer shorter than the product needs (an internal error), a grid too large, a launch failure.
#[allow(
    unsafe_code,
    reason = "the one launch of the packed product kernels, after checking their buffers"
)]
pub(super) fn qgemm(gpu: &Gpu, p: &QProduct<'_>) -> Result<(), MoeError> {
    check_qproduct(p)?;
    let name = format!("gemm_q_{}_{}", format_name(p.w.format)?, p.mode);
    let e = p.w.dims[0];
    let (gy, gz) = tile_grid(p.max_rows.div_ceil(BM) + e)?;
    let gx = u32::try_from(p.n.div_ceil(BN)).map_err(|_| err("too many output columns"))?;
    let (br, bc) = p.w.blocks();
    let args = [
        ptr(gpu, p.a),
        ptr_opt(gpu, p.idx),
        ptr(gpu, p.meta),
        Arg::U32(e as u32),
        ptr(gpu, &p.w.data),
        Arg::U64(p.w.w_stride() as u64),
        scales_ptr(gpu, p.w),
        Arg::U64(p.w.s_stride() as u64),
        Arg::U32(br as u32),
        Arg::U32(bc as u32),
        ptr_opt(gpu, p.bias),
        Arg::U32(p.b_stride as u32),
        ptr(gpu, p.out),
        Arg::U32(p.n as u32),
        Arg::U32(p.k as u32),
        Arg::U32(u32::from(p.interleaved)),
        Arg::U32(p.act),
        Arg::F32(p.alpha),
        Arg::F32(p.limit),
    ];
    // SAFETY: `check_qproduct` checked that `a` holds `a_rows` rows of `k` values, `idx` (if any) `max_rows`
    // entries, `meta` `2E + 2` offsets, the packed codes and scales every expert's `N` (`2N` gated) rows of `k`
    // values at the strides passed (the format's row bytes, its scale layout and nonzero block sizes; MXFP4 rows a
    // multiple of 32), `bias` (if any) every expert's `N` (`2N` GPT-OSS) values, `out` `max_rows · N` values. The
    // contents the kernel trusts are ours: gather indices below `a_rows`, `meta`'s rows below `max_rows` (as for
    // the dense products). The arguments are the kernel's parameters in order (kernels_q.cu `QGEMM_ARGS`).
    unsafe { gpu.launch(&name, (gx, gy, gz), 256, 0, &args) }
}

/// Enqueues both products of the packed bank `bank` (weights `up`, `down`) over the rows of `meta`:
/// `h = act(a · W₁ᵀ)` (fused gating, GPT-OSS rows interleaved when the bank keeps them so), `out = h · W₂ᵀ + b₂`.
pub(super) fn packed_products(
    gpu: &Gpu,
    bank: &DevBank,
    (up, down): (&DevPacked, &DevPacked),
    (a, a_rows, idx): (&CudaSlice<f32>, usize, Option<&CudaSlice<u32>>),
    meta: &CudaSlice<u32>,
    max_rows: usize,
    (h, out): (&CudaSlice<f32>, &CudaSlice<f32>),
) -> Result<(), MoeError> {
    qgemm(
        gpu,
        &QProduct {
            mode: bank.mode,
            interleaved: bank.interleaved,
            a,
            a_rows,
            idx,
            meta,
            w: up,
            bias: bank.up_bias.as_ref(),
            b_stride: bank.up_rows,
            out: h,
            n: bank.f,
            k: bank.d,
            max_rows,
            act: bank.act,
            alpha: bank.alpha,
            limit: bank.limit,
        },
    )?;
    qgemm(
        gpu,
        &QProduct {
            mode: MODE_SINGLE,
            interleaved: false,
            a: h,
            a_rows: max_rows,
            idx: None,
            meta,
            w: down,
            bias: bank.down_bias.as_ref(),
            b_stride: bank.d,
            out,
            n: bank.d,
            k: bank.f,
            max_rows,
            act: 0,
            alpha: 0.0,
            limit: 0.0,
        },
    )
}

/// `m` (int8, fp8 or mxfp4) uploaded and decoded on the GPU by the products' own decode (`decode_q_{format}`),
/// read back as `[E, rows, cols]` f32.
///
/// # Errors
/// [`MoeError::Unsupported`] for f32, bf16 and f16 (no codes to decode); [`MoeError::TooLarge`] past 2^31 values;
/// device errors.
#[allow(
    unsafe_code,
    reason = "the one launch of the decode kernels, after checking their buffers"
)]
pub(super) fn decode_on_device(gpu: &Gpu, m: &PackedMatrix) -> Result<Array3<f32>, MoeError> {
    if !matches!(m.format(), Dtype::Int8 | Dtype::Fp8 | Dtype::Mxfp4) {
        return Err(MoeError::Unsupported {
            owner: "backend cuda".into(),
            feature: format!(
                "decoding {} weights (int8, fp8 and mxfp4 have codes)",
                m.format()
            ),
        });
    }
    let [e, rows, cols] = m.dims();
    let total = e * rows * cols;
    if total > (i32::MAX as usize) {
        return Err(MoeError::TooLarge {
            what: "values of one device decode".into(),
            size: total as u128,
            limit: i32::MAX as u128,
        });
    }
    let w = DevPacked::upload(gpu, m)?;
    check_packed(&w)?;
    let out = gpu.zeros::<f32>(total)?;
    let (br, bc) = w.blocks();
    let args = [
        ptr(gpu, &w.data),
        Arg::U64(w.w_stride() as u64),
        scales_ptr(gpu, &w),
        Arg::U64(w.s_stride() as u64),
        Arg::U32(e as u32),
        Arg::U32(rows as u32),
        Arg::U32(cols as u32),
        Arg::U32(br as u32),
        Arg::U32(bc as u32),
        ptr(gpu, &out),
    ];
    let blocks = total.div_ceil(256).clamp(1, 65_535) as u32;
    let name = format!("decode_q_{}", format_name(w.format)?);
    // SAFETY: `check_packed` checked the codes and scales of all `E` experts against the strides passed and the
    // block sizes; `out` holds `E · rows · cols` values, all the grid-stride loop writes. The arguments are the
    // kernel's parameters in order (kernels_q.cu `DECODE_ARGS`).
    unsafe { gpu.launch(&name, (blocks, 1, 1), 256, 0, &args)? };
    let v = gpu.read(&out, total)?;
    Array3::from_shape_vec((e, rows, cols), v).map_err(|x| err(format!("decoded matrix: {x}")))
}
