//! The CUDA backend (feature `cuda`): CUDA C kernels compiled at run time by NVRTC for the GPU at hand, launched
//! through cudarc, which loads the driver and NVRTC when the backend opens. A build needs no CUDA toolkit; a
//! machine without a driver or NVRTC gets [`BackendError::Unavailable`] with the reason.
//!
//! # What runs where
//! - [`Backend::upload`] packs each expert bank into one canonical layout (every product `a · Wᵀ`; GPT-OSS banks
//!   are transposed and de-interleaved on the host), converts it to the backend's [`Dtype`] (f32, bf16 or f16,
//!   rounded to nearest even) and keeps it resident. Router weights stay f32.
//! - A forward of a layer whose router has a [`RouterSpec::TopK`] spec ([`RouterPath::Native`]) runs on the GPU
//!   from the input copy to the output: gate projection (f32), top-k routing (softmax / sigmoid / sqrt-softplus,
//!   both orders, renormalisation, scaling, group-limited selection, correction bias, gate bias; `k` up to 32,
//!   up to 64 groups), a stable counting sort of the assignments by expert (each expert's rows in ascending
//!   token order), the grouped products, shared experts and the weighted combine (ascending expert order per
//!   token, as the CPU backend). **No host round trip inside the forward**: row offsets and tile counts stay on
//!   the device, and the product kernels find their expert and rows there. The host reads back once, at the
//!   end: the output and, to return the [`Routing`], the per-token choices and (for `E ≤ 4096`) the logits.
//!   [`DeviceLayer::device_times`] skips that read-back and the input copy, and times with CUDA events.
//! - Every other router takes the host path ([`RouterPath::Host`]): it routes on the host, the plan is copied up,
//!   and the experts and combine run on the GPU.
//! - Grouped products: tiles of 64 rows of one expert by 64 output columns, one list of row tiles over all
//!   experts. f32 weights use FMA tiles in f32; bf16 / f16 weights use tensor cores (`mma.sync` m16n8k16, f32
//!   accumulators) from compute capability 8.0, with the activations rounded to the weights' type as they are
//!   staged, as a bf16 model does. SwiGLU / GPT-OSS gating is fused into the first product's epilogue, MLP biases
//!   and activations likewise.
//! - Expert banks: SwiGLU, GPT-OSS and MLP. PEER and custom banks are refused by `upload` with a clear error.
//!
//! Aux losses are not computed on the native path (a spec carries no loss settings); the host path keeps the
//! router's own.

#![allow(unsafe_code)] // kernel launches; see `device` for the rest

mod device;
mod pack;

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use ndarray::Array2;

use moe_core::{
    Backend, Capabilities, DeviceLayer, LayerOutput, MoeError, MoeLayer, RouterInput, RouterPath,
    RouterSpec, Routing, ScoreFn, TopKOrder, TopKSpec,
};

use crate::BackendError;
pub use crate::Dtype;
use crate::native::{check_or_route, native_routing, row_meta, topk_supported};
use device::{Arg, Gpu, err, ptr, ptr_opt};
pub use device::{KERNELS, MMA_KERNELS, SOURCE, compile_kernels, driver_present, nvrtc_present};

/// Largest `k` the native top-k kernel runs; larger `k` takes the host path.
pub const MAX_NATIVE_K: usize = 32;
/// Most groups of a group-limited spec the native kernel runs.
pub const MAX_NATIVE_GROUPS: usize = 64;
/// Router logits are read back and attached to the plan when `E` is at most this (as the CPU routers do).
const KEEP_LOGITS_MAX_EXPERTS: usize = 4096;
/// Rows and columns of one product tile (kernels.cu's BM and BN).
const BM: usize = 64;
const BN: usize = 64;
/// Assignments per block of the counting sort (kernels.cu's CHUNK).
const CHUNK: usize = 256;

/// The CUDA backend: GPU 0 of this process, with the weight precision of the layers uploaded through it.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    dtype: Dtype,
}

impl CudaBackend {
    /// Opens GPU 0 with f32 weights.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason (no driver, no NVRTC, no GPU, kernels that do not compile).
    pub fn new() -> Result<Self, BackendError> {
        Self::with_dtype(Dtype::F32)
    }

    /// Opens GPU 0; layers uploaded through this handle keep their expert weights in `dtype`.
    ///
    /// # Errors
    /// As [`CudaBackend::new`].
    pub fn with_dtype(dtype: Dtype) -> Result<Self, BackendError> {
        let gpu = Gpu::get().map_err(|reason| BackendError::Unavailable {
            backend: "cuda".into(),
            reason,
        })?;
        Ok(CudaBackend { gpu, dtype })
    }

    /// The weight precision of uploads.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Whether bf16 / f16 products run on tensor cores (compute capability 8.0 or newer).
    pub fn tensor_cores(&self) -> bool {
        self.gpu.tensor_cores
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            device: self.gpu.describe.clone(),
            dtypes: vec!["f32".into(), "bf16".into(), "f16".into()],
            native_specs: vec!["topk".into()],
            banks: vec!["swiglu".into(), "gpt_oss".into(), "mlp".into()],
        }
    }

    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        Ok(Box::new(CudaLayer::build(
            Arc::clone(&self.gpu),
            layer,
            self.dtype,
        )?))
    }
}

/// Resident weights of one precision.
#[derive(Debug)]
enum Weights {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>),
}

/// An expert bank resident on the GPU (canonical layout).
#[derive(Debug)]
struct DevBank {
    mode: u32,
    n_experts: usize,
    d: usize,
    f: usize,
    up_rows: usize,
    act: u32,
    alpha: f32,
    limit: f32,
    up: Weights,
    up_bias: Option<CudaSlice<f32>>,
    down: Weights,
    down_bias: Option<CudaSlice<f32>>,
}

impl DevBank {
    fn upload(
        gpu: &Gpu,
        bank: &moe_core::ExpertBank,
        dtype: Dtype,
        what: &str,
    ) -> Result<Self, MoeError> {
        let p = pack::pack(bank).map_err(|r| err(format!("{what} experts: {r}")))?;
        let weights = |v: &[f32]| -> Result<Weights, MoeError> {
            Ok(match dtype.bits(v) {
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

/// How the layer routes.
#[derive(Debug)]
enum Route {
    Host,
    TopK {
        spec: Box<TopKSpec>,
        gate: CudaSlice<f32>,
        gate_bias: Option<CudaSlice<f32>>,
        corr: Option<CudaSlice<f32>>,
    },
}

/// Whether the native kernel runs `s` exactly as the host router does: what every device top-k kernel runs, with
/// at most [`MAX_NATIVE_GROUPS`] groups and one histogram word per expert in a block's shared memory (the sort).
fn topk_native(s: &TopKSpec, e: usize, d: usize, max_shared: usize) -> bool {
    topk_supported(s, e, d, MAX_NATIVE_K)
        && s.groups.is_none_or(|g| g.n_group <= MAX_NATIVE_GROUPS)
        && e * 4 <= max_shared
}

/// Per-forward device buffers, grown when a larger batch comes and reused otherwise.
#[derive(Debug, Default)]
struct Work {
    x: Option<CudaSlice<f32>>,
    y: Option<CudaSlice<f32>>,
    pad: Option<CudaSlice<u32>>,
    logits: Option<CudaSlice<f32>>,
    sel: Option<CudaSlice<f32>>,
    a_expert: Option<CudaSlice<u32>>,
    a_weight: Option<CudaSlice<f32>>,
    a_info: Option<CudaSlice<u32>>,
    counts: Option<CudaSlice<u32>>,
    meta: Option<CudaSlice<u32>>,
    meta_all: Option<CudaSlice<u32>>,
    slot_token: Option<CudaSlice<u32>>,
    slot_weight: Option<CudaSlice<f32>>,
    assign_slot: Option<CudaSlice<u32>>,
    tok_off: Option<CudaSlice<u32>>,
    h: Option<CudaSlice<f32>>,
    slot_out: Option<CudaSlice<f32>>,
    sh_h: Option<CudaSlice<f32>>,
    sh_out: Option<CudaSlice<f32>>,
    sg: Option<CudaSlice<f32>>,
    /// T of the rows in `meta_all`.
    meta_all_t: Option<usize>,
}

/// `slot` with at least `n` elements (contents unspecified).
fn grow<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
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

/// Grid (y, z) covering `tiles` row tiles.
fn tile_grid(tiles: usize) -> Result<(u32, u32), MoeError> {
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
        Dtype::F32 => ("f32", false),
        Dtype::Bf16 => ("bf16", gpu.tensor_cores),
        Dtype::F16 => ("f16", gpu.tensor_cores),
    };
    if mma {
        (format!("gemm_mma_{ty}_{mode}"), 128)
    } else {
        (format!("gemm_fma_{ty}_{mode}"), 256)
    }
}

/// The device address of resident weights.
fn weights_ptr(gpu: &Gpu, w: &Weights) -> Arg {
    match w {
        Weights::F32(s) => ptr(gpu, s),
        Weights::Half(s) => ptr(gpu, s),
    }
}

/// Enqueues one grouped product: `out[r] = epilogue(a[idx[r] or r] · W_eᵀ)` over the rows of `meta`.
fn gemm(
    gpu: &Gpu,
    kernel: (&str, u32),
    a: Arg,
    idx: Arg,
    meta: Arg,
    n_experts: usize,
    w: Arg,
    w_stride: usize,
    bias: Arg,
    b_stride: usize,
    out: Arg,
    n: usize,
    k: usize,
    max_rows: usize,
    act: u32,
    alpha: f32,
    limit: f32,
) -> Result<(), MoeError> {
    let tiles = max_rows.div_ceil(BM) + n_experts;
    let (gy, gz) = tile_grid(tiles)?;
    let gx = u32::try_from(n.div_ceil(BN)).map_err(|_| err("too many output columns"))?;
    let args = [
        a,
        idx,
        meta,
        Arg::U32(n_experts as u32),
        w,
        Arg::U64(w_stride as u64),
        bias,
        Arg::U32(b_stride as u32),
        out,
        Arg::U32(n as u32),
        Arg::U32(k as u32),
        Arg::U32(act),
        Arg::F32(alpha),
        Arg::F32(limit),
    ];
    // SAFETY: `a` holds the rows `idx` (or the row numbers) name with `k` values each, `w` holds
    // `n_experts * w_stride` weights, `out` holds `max_rows * n` values, `bias` (if any) holds
    // `n_experts * b_stride` values, and `meta` holds `2 * n_experts + 2` offsets whose rows stay below
    // `max_rows`; the callers size every buffer so (see `CudaLayer::enqueue`).
    unsafe { gpu.launch(kernel.0, (gx, gy, gz), kernel.1, 0, &args) }
}

/// Enqueues both products of `bank` over the rows of `meta` (at most `max_rows`): `h = act(a · W₁ᵀ)` (fused
/// gating), `out = h · W₂ᵀ + b₂`.
fn bank_products(
    gpu: &Gpu,
    dtype: Dtype,
    bank: &DevBank,
    a: Arg,
    idx: Arg,
    meta: Arg,
    max_rows: usize,
    h: Arg,
    out: Arg,
) -> Result<(), MoeError> {
    let (up_name, up_block) = gemm_kernel(gpu, dtype, bank.mode);
    gemm(
        gpu,
        (&up_name, up_block),
        a,
        idx,
        meta,
        bank.n_experts,
        weights_ptr(gpu, &bank.up),
        bank.up_rows * bank.d,
        ptr_opt(gpu, bank.up_bias.as_ref()),
        bank.up_rows,
        h,
        bank.f,
        bank.d,
        max_rows,
        bank.act,
        bank.alpha,
        bank.limit,
    )?;
    let (down_name, down_block) = gemm_kernel(gpu, dtype, pack::MODE_SINGLE);
    gemm(
        gpu,
        (&down_name, down_block),
        h,
        Arg::Ptr(0),
        meta,
        bank.n_experts,
        weights_ptr(gpu, &bank.down),
        bank.d * bank.f,
        ptr_opt(gpu, bank.down_bias.as_ref()),
        bank.d,
        out,
        bank.d,
        bank.f,
        max_rows,
        0,
        0.0,
        0.0,
    )
}

/// A host-routed plan, ready to copy up: row and tile offsets, slots, and each token's slots.
struct HostPlan {
    meta: Vec<u32>,
    slot_token: Vec<u32>,
    slot_weight: Vec<f32>,
    tok_off: Vec<u32>,
    tok_slot: Vec<u32>,
}

impl HostPlan {
    fn new(routing: &Routing) -> Result<Self, MoeError> {
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

/// A layer resident on the CUDA backend.
#[derive(Debug)]
pub struct CudaLayer {
    gpu: Arc<Gpu>,
    layer: Arc<MoeLayer>,
    dtype: Dtype,
    route: Route,
    bank: DevBank,
    shared: Option<(DevBank, Option<CudaSlice<f32>>)>,
    out_bias: Option<CudaSlice<f32>>,
    work: Work,
}

impl CudaLayer {
    fn build(gpu: Arc<Gpu>, layer: Arc<MoeLayer>, dtype: Dtype) -> Result<Self, MoeError> {
        let (e, d) = (layer.n_experts(), layer.d_model());
        let bank = DevBank::upload(&gpu, layer.experts(), dtype, "routed")?;
        let shared = match layer.shared() {
            Some(s) => Some((
                DevBank::upload(&gpu, s.bank(), dtype, "shared")?,
                s.gate().map(|g| gpu.upload(&g.to_vec())).transpose()?,
            )),
            None => None,
        };
        let out_bias = layer
            .output_bias()
            .map(|b| gpu.upload(&b.to_vec()))
            .transpose()?;
        let route = match layer.router().spec() {
            Some(RouterSpec::TopK(s)) if topk_native(&s, e, d, gpu.max_shared) => Route::TopK {
                gate: gpu.upload(&s.gate.iter().copied().collect::<Vec<_>>())?,
                gate_bias: s
                    .gate_bias
                    .as_ref()
                    .map(|b| gpu.upload(&b.to_vec()))
                    .transpose()?,
                corr: s
                    .correction_bias
                    .as_ref()
                    .map(|b| gpu.upload(&b.to_vec()))
                    .transpose()?,
                spec: Box::new(s),
            },
            _ => Route::Host,
        };
        gpu.sync()?;
        Ok(CudaLayer {
            gpu,
            layer,
            dtype,
            route,
            bank,
            shared,
            out_bias,
            work: Work::default(),
        })
    }

    /// Where this layer's routing runs.
    pub fn router_path(&self) -> RouterPath {
        match self.route {
            Route::Host => RouterPath::Host,
            Route::TopK { .. } => RouterPath::Native,
        }
    }

    /// The precision of the resident expert weights.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Enqueues a forward of the `t` tokens already in `work.x` (`padded`: padding flags are in `work.pad`;
    /// `plan`: the host plan on the host path). Leaves the output in `work.y`.
    fn enqueue(&mut self, t: usize, padded: bool, plan: Option<&HostPlan>) -> Result<(), MoeError> {
        let CudaLayer {
            gpu,
            layer,
            dtype,
            route,
            bank,
            shared,
            out_bias,
            work: w,
        } = self;
        let (gpu, dtype) = (&**gpu, *dtype);
        let (e, d) = (layer.n_experts(), layer.d_model());
        // Rows of the whole batch: one group of T rows (gate projection, shared experts).
        if w.meta_all_t != Some(t) {
            let m = grow(gpu, &mut w.meta_all, 4)?;
            let t32 = t as u32;
            gpu.write(&[0, t32, 0, t32.div_ceil(BM as u32)], m)?;
            w.meta_all_t = Some(t);
        }
        let (k, max_rows, fixed_k) = match (&*route, plan) {
            (Route::TopK { spec, .. }, _) => (spec.k, t * spec.k, spec.k as u32),
            (Route::Host, Some(p)) => (0, p.slot_token.len(), 0),
            (Route::Host, None) => return Err(err("internal: host route without a plan")),
        };
        let n = t * k;
        let chunks = n.div_ceil(CHUNK);
        grow(gpu, &mut w.h, max_rows * bank.f)?;
        grow(gpu, &mut w.slot_out, max_rows * d)?;
        grow(gpu, &mut w.y, t * d)?;
        match (&*route, plan) {
            (Route::TopK { .. }, _) => {
                grow(gpu, &mut w.meta, 2 * e + 2)?;
                grow(gpu, &mut w.slot_token, n)?;
                grow(gpu, &mut w.slot_weight, n)?;
                grow(gpu, &mut w.logits, t * e)?;
                grow(gpu, &mut w.sel, t * e)?;
                grow(gpu, &mut w.a_expert, n)?;
                grow(gpu, &mut w.a_weight, n)?;
                grow(gpu, &mut w.a_info, n)?;
                grow(gpu, &mut w.counts, chunks * e)?;
                grow(gpu, &mut w.assign_slot, n)?;
            }
            (Route::Host, Some(plan)) => {
                gpu.write(&plan.meta, grow(gpu, &mut w.meta, plan.meta.len())?)?;
                gpu.write(&plan.slot_token, grow(gpu, &mut w.slot_token, max_rows)?)?;
                gpu.write(&plan.slot_weight, grow(gpu, &mut w.slot_weight, max_rows)?)?;
                gpu.write(
                    &plan.tok_off,
                    grow(gpu, &mut w.tok_off, plan.tok_off.len())?,
                )?;
                gpu.write(
                    &plan.tok_slot,
                    grow(gpu, &mut w.assign_slot, plan.tok_slot.len())?,
                )?;
            }
            (Route::Host, None) => {}
        }
        if let Some((sb, _)) = &*shared {
            grow(gpu, &mut w.sh_h, t * sb.f)?;
            grow(gpu, &mut w.sh_out, t * d)?;
            grow(gpu, &mut w.sg, t)?;
        }
        let w = &*w;
        let p = |s: &Option<CudaSlice<f32>>| ptr_opt(gpu, s.as_ref());
        let q = |s: &Option<CudaSlice<u32>>| ptr_opt(gpu, s.as_ref());
        let (x, meta_all, meta) = (p(&w.x), q(&w.meta_all), q(&w.meta));
        if let Route::TopK {
            spec,
            gate,
            gate_bias,
            corr,
        } = &*route
        {
            // Gate projection, f32: logits [T, E] = x · gateᵀ (+ bias).
            gemm(
                gpu,
                ("gemm_fma_f32_0", 256),
                x,
                Arg::Ptr(0),
                meta_all,
                1,
                ptr(gpu, gate),
                0,
                ptr_opt(gpu, gate_bias.as_ref()),
                0,
                p(&w.logits),
                e,
                d,
                t,
                0,
                0.0,
                0.0,
            )?;
            let args = [
                p(&w.logits),
                ptr_opt(gpu, corr.as_ref()),
                if padded { q(&w.pad) } else { Arg::Ptr(0) },
                p(&w.sel),
                Arg::U32(t as u32),
                Arg::U32(e as u32),
                Arg::U32(k as u32),
                Arg::U32(match spec.score {
                    ScoreFn::Softmax => 0,
                    ScoreFn::Sigmoid => 1,
                    ScoreFn::SqrtSoftplus => 2,
                }),
                Arg::U32(u32::from(spec.order == TopKOrder::TopKThenSoftmax)),
                Arg::U32(u32::from(spec.renormalize)),
                Arg::F32(spec.scaling),
                Arg::U32(spec.groups.map_or(0, |g| g.n_group as u32)),
                Arg::U32(spec.groups.map_or(0, |g| g.topk_group as u32)),
                q(&w.a_expert),
                p(&w.a_weight),
                q(&w.a_info),
            ];
            let (n32, e32, c32) = (n as u32, e as u32, chunks as u32);
            // SAFETY: logits and sel hold T·E values, corr E, pad T, the assignment buffers and slot lists
            // T·k, counts chunks·E, meta 2E + 2 (all grown above); group_count's shared memory is E words,
            // checked against the device limit when the route was chosen.
            unsafe {
                gpu.launch("route_topk", (t.div_ceil(128) as u32, 1, 1), 128, 0, &args)?;
                gpu.launch(
                    "group_count",
                    (c32, 1, 1),
                    CHUNK as u32,
                    (e * 4) as u32,
                    &[
                        q(&w.a_expert),
                        q(&w.a_info),
                        Arg::U32(n32),
                        Arg::U32(e32),
                        q(&w.counts),
                    ],
                )?;
                gpu.launch(
                    "group_scan",
                    (1, 1, 1),
                    256,
                    0,
                    &[q(&w.counts), Arg::U32(c32), Arg::U32(e32), meta],
                )?;
                gpu.launch(
                    "group_scatter",
                    (c32, 1, 1),
                    CHUNK as u32,
                    0,
                    &[
                        q(&w.a_expert),
                        q(&w.a_info),
                        p(&w.a_weight),
                        Arg::U32(n32),
                        Arg::U32(k as u32),
                        Arg::U32(e32),
                        q(&w.counts),
                        q(&w.slot_token),
                        p(&w.slot_weight),
                        q(&w.assign_slot),
                    ],
                )?;
            }
        }
        // Routed experts.
        let slot_out = p(&w.slot_out);
        if max_rows > 0 {
            bank_products(
                gpu,
                dtype,
                bank,
                x,
                q(&w.slot_token),
                meta,
                max_rows,
                p(&w.h),
                slot_out,
            )?;
        }
        // Shared experts over every token, with the optional sigmoid gate.
        let mut shared_mode = 0u32;
        let (mut sh_out, mut sg) = (Arg::Ptr(0), Arg::Ptr(0));
        if let Some((sb, gate)) = &*shared {
            sh_out = p(&w.sh_out);
            bank_products(
                gpu,
                dtype,
                sb,
                x,
                Arg::Ptr(0),
                meta_all,
                t,
                p(&w.sh_h),
                sh_out,
            )?;
            shared_mode = 1;
            if let Some(g) = gate {
                sg = p(&w.sg);
                // SAFETY: x holds T·d values, g d, sg T.
                unsafe {
                    gpu.launch(
                        "shared_gate",
                        (t.div_ceil(4) as u32, 1, 1),
                        128,
                        0,
                        &[x, ptr(gpu, g), Arg::U32(t as u32), Arg::U32(d as u32), sg],
                    )?
                };
                shared_mode = 2;
            }
        }
        // Combine.
        let args = [
            slot_out,
            p(&w.slot_weight),
            q(&w.assign_slot),
            q(&w.tok_off),
            Arg::U32(fixed_k),
            Arg::U32(t as u32),
            Arg::U32(d as u32),
            Arg::F32(layer.output_scale()),
            Arg::U32(shared_mode),
            sh_out,
            sg,
            ptr_opt(gpu, out_bias.as_ref()),
            p(&w.y),
        ];
        let blocks = u32::try_from((t * d).div_ceil(256)).map_err(|_| err("T · d too large"))?;
        // SAFETY: slot_out holds max_rows·d values and every slot entry names a row below max_rows; the slot
        // lists hold T·k entries (native) or T + 1 offsets and their entries (host); y holds T·d.
        unsafe { gpu.launch("combine", (blocks, 1, 1), 256, 0, &args) }
    }

    /// Checks the input, routes on the host if needed, copies the input (and padding flags) up.
    fn prepare(&mut self, input: &RouterInput<'_>) -> Result<Prepared, MoeError> {
        let (t, d) = input.hidden.dim();
        let layer = Arc::clone(&self.layer);
        let e = layer.n_experts();
        let host_routing = check_or_route(&layer, input, matches!(self.route, Route::TopK { .. }))?;
        let k = match &self.route {
            Route::TopK { spec, .. } => spec.k,
            Route::Host => 1,
        };
        let limit = (u32::MAX / 2) as usize;
        if t.saturating_mul(k.max(1)) > limit
            || t.saturating_mul(d) > limit
            || t.saturating_mul(e) > limit
        {
            return Err(MoeError::TooLarge {
                what: "tokens of one cuda forward (T·k, T·d and T·E must stay below 2^31)".into(),
                size: t as u128,
                limit: (limit / k.max(d).max(e).max(1)) as u128,
            });
        }
        let plan = host_routing.as_ref().map(HostPlan::new).transpose()?;
        let gpu = Arc::clone(&self.gpu);
        if t > 0 {
            let x_std = input.hidden.as_standard_layout();
            let xs = x_std
                .as_slice()
                .ok_or_else(|| err("internal: input not contiguous"))?;
            gpu.write(xs, grow(&gpu, &mut self.work.x, t * d)?)?;
        }
        let padded = (0..t).any(|i| input.is_padding(i));
        if padded {
            let pad: Vec<u32> = (0..t).map(|i| u32::from(input.is_padding(i))).collect();
            gpu.write(&pad, grow(&gpu, &mut self.work.pad, t)?)?;
        }
        Ok(Prepared {
            t,
            padded,
            plan,
            host_routing,
        })
    }

    fn forward_impl(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let prep = self.prepare(input)?;
        let (t, d, e) = (prep.t, self.layer.d_model(), self.layer.n_experts());
        if t == 0 {
            return Ok(LayerOutput {
                output: Array2::zeros((0, d)),
                routing: prep.host_routing.unwrap_or_else(|| Routing::empty(0, e)),
                router_path: self.router_path(),
            });
        }
        self.enqueue(t, prep.padded, prep.plan.as_ref())?;
        let gpu = Arc::clone(&self.gpu);
        let w = &self.work;

        let y = gpu.read(need(&w.y)?, t * d)?;
        let output = Array2::from_shape_vec((t, d), y).map_err(|e| err(format!("output: {e}")))?;
        let (routing, path) = match (prep.host_routing, &self.route) {
            (Some(r), _) => (r, RouterPath::Host),
            (None, Route::TopK { spec, .. }) => {
                let k = spec.k;
                let experts = gpu.read(need(&w.a_expert)?, t * k)?;
                let weights = gpu.read(need(&w.a_weight)?, t * k)?;
                let info = gpu.read(need(&w.a_info)?, t * k)?;
                let mut routing = native_routing(t, e, k, input, &experts, &weights, &info)?;
                if e <= KEEP_LOGITS_MAX_EXPERTS {
                    let l = Array2::from_shape_vec((t, e), gpu.read(need(&w.logits)?, t * e)?)
                        .map_err(|e| err(format!("logits: {e}")))?;
                    moe_core::check_finite("router logits", l.view())?;
                    routing.set_logits(l);
                }
                (routing, RouterPath::Native)
            }
            (None, Route::Host) => return Err(err("internal: host route without a plan")),
        };
        Ok(LayerOutput {
            output,
            routing,
            router_path: path,
        })
    }
}

/// A checked forward, ready to enqueue.
struct Prepared {
    t: usize,
    padded: bool,
    plan: Option<HostPlan>,
    host_routing: Option<Routing>,
}

impl DeviceLayer for CudaLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.forward_impl(input)
    }

    fn set_router(&mut self, router: Box<dyn moe_core::Router>) -> Result<(), MoeError> {
        let mut layer = (*self.layer).clone();
        layer.set_router(router)?;
        *self = CudaLayer::build(Arc::clone(&self.gpu), Arc::new(layer), self.dtype)?;
        Ok(())
    }

    fn device_times(
        &mut self,
        input: &RouterInput<'_>,
        repeats: usize,
    ) -> Result<Option<Vec<f64>>, MoeError> {
        let prep = self.prepare(input)?;
        if prep.t == 0 {
            return Ok(Some(vec![0.0; repeats]));
        }
        // One untimed forward first (first launches, workspace growth).
        self.enqueue(prep.t, prep.padded, prep.plan.as_ref())?;
        self.gpu.sync()?;
        let gpu = Arc::clone(&self.gpu);
        let times = gpu.time(repeats, || {
            self.enqueue(prep.t, prep.padded, prep.plan.as_ref())
        })?;
        Ok(Some(times))
    }
}

/// A workspace buffer that the forward has grown.
fn need<T>(s: &Option<CudaSlice<T>>) -> Result<&CudaSlice<T>, MoeError> {
    s.as_ref().ok_or_else(|| err("internal: workspace"))
}
