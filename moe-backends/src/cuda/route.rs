//! Routing on the GPU: which router specs run natively ([`Route`], chosen at upload or by `set_router`: top-k
//! specs the kernel runs exactly as the host router does) and the safe wrapper of the `route_topk` launch, one
//! thread per token writing its choices in ascending expert order.

use cudarc::driver::CudaSlice;

use moe_core::{MoeError, Router, RouterPath, RouterSpec, ScoreFn, TopKOrder, TopKSpec};

use super::device::{Arg, Gpu, err, ptr, ptr_opt};
use super::{MAX_NATIVE_GROUPS, MAX_NATIVE_K};
use crate::native::topk_supported;

/// How the layer routes: the router's device state.
#[derive(Debug)]
pub(super) enum Route {
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

impl Route {
    /// The route of `router` for a layer of `e` experts and width `d`, its gate and biases uploaded.
    ///
    /// # Errors
    /// A device error while uploading the router's parameters.
    pub fn new(gpu: &Gpu, router: &dyn Router, e: usize, d: usize) -> Result<Self, MoeError> {
        Ok(match router.spec() {
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
        })
    }

    /// Where the routing runs.
    pub fn path(&self) -> RouterPath {
        match self {
            Route::Host => RouterPath::Host,
            Route::TopK { .. } => RouterPath::Native,
        }
    }
}

/// One `route_topk` launch (kernels.cu's parameters, in order).
pub(super) struct TopKLaunch<'a> {
    pub spec: &'a TopKSpec,
    /// `[T, E]`.
    pub logits: &'a CudaSlice<f32>,
    /// `[E]`.
    pub corr: Option<&'a CudaSlice<f32>>,
    /// `[T]` padding flags (`None`: no padding).
    pub pad: Option<&'a CudaSlice<u32>>,
    /// `[T, E]` scratch.
    pub sel: &'a CudaSlice<f32>,
    pub t: usize,
    pub e: usize,
    /// `[T, k]` each.
    pub a_expert: &'a CudaSlice<u32>,
    pub a_weight: &'a CudaSlice<f32>,
    pub a_info: &'a CudaSlice<u32>,
}

/// Checks what `route_topk` relies on: its fixed arrays (`k ≤ 32` choices, `≤ 64` groups), at least `k`
/// eligible experts, and every buffer's length.
fn check_topk(l: &TopKLaunch<'_>) -> Result<(), MoeError> {
    let (s, t, e) = (l.spec, l.t, l.e);
    let groups_ok = s.groups.is_none_or(|g| {
        g.n_group >= 1
            && g.n_group <= MAX_NATIVE_GROUPS
            && e.is_multiple_of(g.n_group)
            && g.topk_group >= 1
            && g.topk_group <= g.n_group
            && g.topk_group * (e / g.n_group) >= s.k
    });
    let lens_ok = l.logits.len() >= t * e
        && l.sel.len() >= t * e
        && l.corr.is_none_or(|c| c.len() >= e)
        && l.pad.is_none_or(|p| p.len() >= t)
        && l.a_expert.len() >= t * s.k
        && l.a_weight.len() >= t * s.k
        && l.a_info.len() >= t * s.k;
    let fits = u32::try_from(t).is_ok() && u32::try_from(e).is_ok();
    if s.k >= 1 && s.k <= e.min(MAX_NATIVE_K) && groups_ok && lens_ok && fits {
        Ok(())
    } else {
        Err(err("internal: route_topk launch of the wrong size"))
    }
}

/// Enqueues `route_topk`, after checking its sizes.
///
/// # Errors
/// A spec the kernel cannot run or a buffer too short (internal errors), a launch failure.
#[allow(
    unsafe_code,
    reason = "the one launch of route_topk, after checking its buffers"
)]
pub(super) fn route_topk(gpu: &Gpu, l: &TopKLaunch<'_>) -> Result<(), MoeError> {
    check_topk(l)?;
    let s = l.spec;
    let args = [
        ptr(gpu, l.logits),
        ptr_opt(gpu, l.corr),
        ptr_opt(gpu, l.pad),
        ptr(gpu, l.sel),
        Arg::U32(l.t as u32),
        Arg::U32(l.e as u32),
        Arg::U32(s.k as u32),
        Arg::U32(match s.score {
            ScoreFn::Softmax => 0,
            ScoreFn::Sigmoid => 1,
            ScoreFn::SqrtSoftplus => 2,
        }),
        Arg::U32(u32::from(s.order == TopKOrder::TopKThenSoftmax)),
        Arg::U32(u32::from(s.renormalize)),
        Arg::F32(s.scaling),
        Arg::U32(s.groups.map_or(0, |g| g.n_group as u32)),
        Arg::U32(s.groups.map_or(0, |g| g.topk_group as u32)),
        ptr(gpu, l.a_expert),
        ptr(gpu, l.a_weight),
        ptr(gpu, l.a_info),
    ];
    let blocks = u32::try_from(l.t.div_ceil(128)).map_err(|_| err("too many tokens"))?;
    // SAFETY: `check_topk` checked that logits and sel hold T·E values, corr E, pad T and each assignment buffer
    // T·k, that k fits the kernel's 32-entry arrays and the groups its 64-entry array, and that the kept groups
    // hold at least k experts (so every choice names an expert). The arguments are route_topk's parameters in
    // order (kernels.cu).
    unsafe { gpu.launch("route_topk", (blocks, 1, 1), 128, 0, &args) }
}
