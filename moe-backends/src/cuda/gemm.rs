//! Grouped products: one safe wrapper around the `gemm_{fma,mma}_{type}_{mode}` launches, the two products of a
//! bank (`h = act(a · W₁ᵀ)` with fused gating, `out = h · W₂ᵀ + b₂`) and the router's gate projection (a
//! one-expert f32 product over every token). Tiles of [`BM`] rows of one expert by [`BN`] output columns, one list
//! of row tiles over all experts.

use cudarc::driver::CudaSlice;

use moe_core::MoeError;

use super::device::{Arg, Gpu, err, ptr, ptr_opt};
use super::qgemm::packed_products;
use super::upload::{DevBank, Weights, WeightsRef};
use super::{BM, BN};
use crate::Dtype;
use crate::packed::{MODE_GPT_OSS, MODE_SINGLE};

/// One grouped product: `out[r] = epilogue(a[idx[r] or r] · W_eᵀ)` over the rows of `meta` (kernels.cu's
/// `GEMM_ARGS`, in its order).
pub(super) struct Product<'a> {
    /// Precision of `w` (selects the kernel with `mode`).
    pub dtype: Dtype,
    /// Epilogue: [`MODE_SINGLE`], [`crate::packed::MODE_GATED`] or [`MODE_GPT_OSS`].
    pub mode: u32,
    /// Input rows, `k` values each.
    pub a: &'a CudaSlice<f32>,
    /// Rows of `a` (every gathered index, or every row of `meta`, is below it).
    pub a_rows: usize,
    /// Row `r` reads `a` row `idx[r]` (`None`: row `r`).
    pub idx: Option<&'a CudaSlice<u32>>,
    /// `[2E + 2]` row and tile offsets; every row below `max_rows`.
    pub meta: &'a CudaSlice<u32>,
    pub n_experts: usize,
    /// Expert `e`'s `[N or 2N, K]` rows start at `e · w_stride`.
    pub w: WeightsRef<'a>,
    pub w_stride: usize,
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

/// Grid (y, z) covering `tiles` row tiles.
pub(super) fn tile_grid(tiles: usize) -> Result<(u32, u32), MoeError> {
    let y = tiles.clamp(1, 65_535);
    let z = tiles.div_ceil(y).max(1);
    if z > 65_535 {
        return Err(MoeError::TooLarge {
            what: "row tiles of one cuda product".into(),
            size: tiles as u128,
            limit: 65_535u128 * 65_535,
        });
    }
    Ok((y as u32, z as u32))
}

/// The product kernel and block size for `dtype` and epilogue `mode`.
fn gemm_kernel(gpu: &Gpu, dtype: Dtype, mode: u32) -> (String, u32) {
    let (ty, mma) = match dtype {
        Dtype::Bf16 => ("bf16", gpu.tensor_cores),
        Dtype::F16 => ("f16", gpu.tensor_cores),
        // Packed formats take `qgemm` (refused by `check_product`).
        _ => ("f32", false),
    };
    if mma {
        (format!("gemm_mma_{ty}_{mode}"), 128)
    } else {
        (format!("gemm_fma_{ty}_{mode}"), 256)
    }
}

/// Checks the sizes a product kernel relies on.
fn check_product(p: &Product<'_>) -> Result<(), MoeError> {
    let bad = |what: &str| Err(err(format!("internal: product {what}")));
    let w_rows = if p.mode == MODE_SINGLE { p.n } else { 2 * p.n };
    let bias_len = match p.mode {
        MODE_SINGLE => p.n,
        MODE_GPT_OSS => 2 * p.n,
        _ => 0,
    };
    let last = p.n_experts.saturating_sub(1);
    if p.n_experts == 0 || p.mode > MODE_GPT_OSS {
        return bad("without experts or with an unknown epilogue");
    }
    if p.w.is_packed() || p.w.is_half() != (p.dtype != Dtype::F32) {
        return bad("weights of another precision than its kernel");
    }
    if p.meta.len() < 2 * p.n_experts + 2 {
        return bad("row offsets too short");
    }
    if p.a.len() < p.a_rows * p.k || (p.idx.is_none() && p.a_rows < p.max_rows) {
        return bad("input too short");
    }
    if p.idx.is_some_and(|i| i.len() < p.max_rows) {
        return bad("gather indices too short");
    }
    if p.w.len() < last * p.w_stride + w_rows * p.k {
        return bad("weights too short");
    }
    if p.bias
        .is_some_and(|b| b.len() < last * p.b_stride + bias_len)
    {
        return bad("biases too short");
    }
    if p.out.len() < p.max_rows * p.n {
        return bad("output too short");
    }
    let fits = |v: usize| u32::try_from(v).is_ok();
    if !(fits(p.n_experts) && fits(p.n) && fits(p.k) && fits(p.b_stride)) {
        return bad("sizes beyond u32");
    }
    Ok(())
}

/// Enqueues one grouped product, after checking every length it relies on.
///
/// # Errors
/// A buffer shorter than the product needs (an internal error), a grid too large, a launch failure.
#[allow(
    unsafe_code,
    reason = "the one launch of the product kernels, after checking their buffers"
)]
pub(super) fn gemm(gpu: &Gpu, p: &Product<'_>) -> Result<(), MoeError> {
    check_product(p)?;
    let (name, block) = gemm_kernel(gpu, p.dtype, p.mode);
    let tiles = p.max_rows.div_ceil(BM) + p.n_experts;
    let (gy, gz) = tile_grid(tiles)?;
    let gx = u32::try_from(p.n.div_ceil(BN)).map_err(|_| err("too many output columns"))?;
    let args = [
        ptr(gpu, p.a),
        ptr_opt(gpu, p.idx),
        ptr(gpu, p.meta),
        Arg::U32(p.n_experts as u32),
        p.w.ptr(gpu),
        Arg::U64(p.w_stride as u64),
        ptr_opt(gpu, p.bias),
        Arg::U32(p.b_stride as u32),
        ptr(gpu, p.out),
        Arg::U32(p.n as u32),
        Arg::U32(p.k as u32),
        Arg::U32(p.act),
        Arg::F32(p.alpha),
        Arg::F32(p.limit),
    ];
    // SAFETY: `check_product` checked that `a` holds `a_rows` rows of `k` values, `idx` (if any) `max_rows`
    // entries, `meta` `2E + 2` offsets, `w` every expert's `N` (`2N` gated) rows of `k` values at its stride,
    // `bias` (if any) every expert's `N` (`2N` GPT-OSS) values, `out` `max_rows · N` values, and that the weights'
    // precision is the kernel's. The contents the kernel trusts are ours: the gather indices name rows below
    // `a_rows` (token ids from the sort or the host plan), and `meta`'s rows stay below `max_rows` (its offsets
    // sum the kept assignments). The arguments are the kernel's parameters in order (kernels.cu `GEMM_ARGS`).
    unsafe { gpu.launch(&name, (gx, gy, gz), block, 0, &args) }
}

/// Enqueues both products of `bank` over the rows of `meta` (at most `max_rows`): `h = act(a · W₁ᵀ)` (fused
/// gating), `out = h · W₂ᵀ + b₂`, with the kernels of the bank's format (packed int8 / fp8 / mxfp4 banks:
/// [`packed_products`]). `a` holds `a_rows` rows, read through `idx` when given.
pub(super) fn bank_products(
    gpu: &Gpu,
    bank: &DevBank,
    (a, a_rows, idx): (&CudaSlice<f32>, usize, Option<&CudaSlice<u32>>),
    meta: &CudaSlice<u32>,
    max_rows: usize,
    h: &CudaSlice<f32>,
    out: &CudaSlice<f32>,
) -> Result<(), MoeError> {
    if let (Weights::Packed(up), Weights::Packed(down)) = (&bank.up, &bank.down) {
        return packed_products(
            gpu,
            bank,
            (up, down),
            (a, a_rows, idx),
            meta,
            max_rows,
            (h, out),
        );
    }
    let dtype = bank.format;
    gemm(
        gpu,
        &Product {
            dtype,
            mode: bank.mode,
            a,
            a_rows,
            idx,
            meta,
            n_experts: bank.n_experts,
            w: bank.up.view(),
            w_stride: bank.up_rows * bank.d,
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
    gemm(
        gpu,
        &Product {
            dtype,
            mode: MODE_SINGLE,
            a: h,
            a_rows: max_rows,
            idx: None,
            meta,
            n_experts: bank.n_experts,
            w: bank.down.view(),
            w_stride: bank.d * bank.f,
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

/// Enqueues the gate projection, f32: `logits [T, E] = x · gateᵀ (+ bias)` over the `t` rows of `meta_all`.
pub(super) fn gate_projection(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    meta_all: &CudaSlice<u32>,
    gate: &CudaSlice<f32>,
    gate_bias: Option<&CudaSlice<f32>>,
    logits: &CudaSlice<f32>,
    (t, e, d): (usize, usize, usize),
) -> Result<(), MoeError> {
    gemm(
        gpu,
        &Product {
            dtype: Dtype::F32,
            mode: MODE_SINGLE,
            a: x,
            a_rows: t,
            idx: None,
            meta: meta_all,
            n_experts: 1,
            w: WeightsRef::F32(gate),
            w_stride: 0,
            bias: gate_bias,
            b_stride: 0,
            out: logits,
            n: e,
            k: d,
            max_rows: t,
            act: 0,
            alpha: 0.0,
            limit: 0.0,
        },
    )
}
