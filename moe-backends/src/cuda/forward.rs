//! A layer resident on the CUDA backend and its forward: the orchestration of the stages (input copy, gate
//! projection and top-k routing or the host plan, the counting sort, the expert products, shared experts,
//! combine), all enqueued on the GPU's one stream with no host round trip, then one read-back. Every launch goes
//! through its stage's safe wrapper; this file holds no `unsafe`. [`DeviceLayer::set_router`] swaps only the
//! router's device state ([`Route`]); the uploaded experts stay.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use ndarray::Array2;

use moe_core::store::StoreStats;
use moe_core::{
    DeviceLayer, ExpertBank, KEEP_LOGITS_MAX_EXPERTS, LayerOutput, MoeError, MoeLayer, Router,
    RouterInput, RouterPath, Routing, TopKSpec,
};

use super::combine::{Combine, TokenSlots, combine, shared_gate};
use super::device::{Gpu, err};
use super::gemm::{bank_products, gate_projection};
use super::route::{Route, TopKLaunch, route_topk};
use super::sort::{HostPlan, Sort, counting_sort};
use super::store::CudaStore;
use super::upload::DevBank;
use super::workspace::{Work, grow, need};
use super::{BM, CHUNK};
use crate::Dtype;
use crate::native::{check_or_route, native_routing};

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
    /// The expert store of a stored routed bank (`bank` is then its slot bank); such a layer routes on the host.
    store: Option<CudaStore>,
}

/// A checked forward, ready to enqueue.
struct Prepared {
    t: usize,
    padded: bool,
    plan: Option<HostPlan>,
    host_routing: Option<Routing>,
}

impl CudaLayer {
    /// Uploads `layer`: its banks (packed, in `dtype`), shared-expert gate, output bias and router.
    pub(super) fn build(
        gpu: Arc<Gpu>,
        layer: Arc<MoeLayer>,
        dtype: Dtype,
    ) -> Result<Self, MoeError> {
        let (e, d) = (layer.n_experts(), layer.d_model());
        let (bank, store) = match layer.experts() {
            ExpertBank::Stored(sb) => {
                let (bank, store) = CudaStore::build(&gpu, sb, dtype)?;
                (bank, Some(store))
            }
            other => (DevBank::upload(&gpu, other, dtype, "routed")?, None),
        };
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
        let route = match store {
            Some(_) => Route::Host,
            None => Route::new(&gpu, layer.router(), e, d)?,
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
            store,
        })
    }

    /// Where this layer's routing runs.
    pub fn router_path(&self) -> RouterPath {
        self.route.path()
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
            route,
            bank,
            shared,
            out_bias,
            work,
            store,
            ..
        } = self;
        let gpu = &**gpu;
        let (e, d) = (layer.n_experts(), layer.d_model());
        let shared_f = shared.as_ref().map(|(sb, _)| sb.f);
        let (max_rows, tokens) =
            grow_workspace(gpu, work, route, bank.f, shared_f, plan, (t, e, d))?;
        let w = &*work;
        let x = need(&w.x)?;
        let meta_all = need(&w.meta_all)?;
        if let Route::TopK {
            spec,
            gate,
            gate_bias,
            corr,
        } = &*route
        {
            gate_projection(
                gpu,
                x,
                meta_all,
                gate,
                gate_bias.as_ref(),
                need(&w.logits)?,
                (t, e, d),
            )?;
            route_and_sort(gpu, w, spec, corr.as_ref(), padded, (t, e))?;
        }
        // Routed experts.
        let slot_out = need(&w.slot_out)?;
        if let Some(s) = store.as_mut() {
            let plan = plan.ok_or_else(|| err("internal: stored forward without a host plan"))?;
            s.run(gpu, bank, plan, (x, t), (need(&w.h)?, slot_out), max_rows)?;
        } else if max_rows > 0 {
            let a = (x, t, Some(need(&w.slot_token)?));
            bank_products(
                gpu,
                bank,
                a,
                need(&w.meta)?,
                max_rows,
                need(&w.h)?,
                slot_out,
            )?;
        }
        let shared_out = shared_products(gpu, shared.as_ref(), w, (t, d))?;
        let (slot_weight, slots) = match store.as_ref() {
            Some(s) => s.combine_rows()?,
            None => (need(&w.slot_weight)?, need(&w.assign_slot)?),
        };
        let tokens = match tokens {
            Tokens::Fixed(k) => TokenSlots::Fixed { k, slots },
            Tokens::Offsets(entries) => TokenSlots::Offsets {
                offsets: need(&w.tok_off)?,
                slots,
                entries,
            },
        };
        combine(
            gpu,
            &Combine {
                slot_out,
                slot_weight,
                rows: max_rows,
                tokens,
                t,
                d,
                scale: layer.output_scale(),
                shared: shared_out,
                bias: out_bias.as_ref(),
                y: need(&w.y)?,
            },
        )
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
            (None, Route::TopK { spec, .. }) => (
                read_routing(&gpu, w, input, (t, e, spec.k))?,
                RouterPath::Native,
            ),
            (None, Route::Host) => return Err(err("internal: host route without a plan")),
        };
        Ok(LayerOutput {
            output,
            routing,
            router_path: path,
        })
    }
}

/// How the combine finds each token's slots: `k` per token (native), or offsets over `entries` (host plan).
enum Tokens {
    Fixed(usize),
    Offsets(usize),
}

/// Grows the workspace for a forward of `t` tokens (`f`, `shared_f`: the banks' FFN widths) and copies the host
/// plan up; returns the rows of the routed products and how the combine finds each token's slots.
fn grow_workspace(
    gpu: &Gpu,
    w: &mut Work,
    route: &Route,
    f: usize,
    shared_f: Option<usize>,
    plan: Option<&HostPlan>,
    (t, e, d): (usize, usize, usize),
) -> Result<(usize, Tokens), MoeError> {
    // Rows of the whole batch: one group of T rows (gate projection, shared experts).
    if w.meta_all_t != Some(t) {
        let m = grow(gpu, &mut w.meta_all, 4)?;
        let t32 = t as u32;
        gpu.write(&[0, t32, 0, t32.div_ceil(BM as u32)], m)?;
        w.meta_all_t = Some(t);
    }
    let (k, max_rows, tokens) = match (route, plan) {
        (Route::TopK { spec, .. }, _) => (spec.k, t * spec.k, Tokens::Fixed(spec.k)),
        (Route::Host, Some(p)) => (0, p.slot_token.len(), Tokens::Offsets(p.tok_slot.len())),
        (Route::Host, None) => return Err(err("internal: host route without a plan")),
    };
    let n = t * k;
    grow(gpu, &mut w.h, max_rows * f)?;
    grow(gpu, &mut w.slot_out, max_rows * d)?;
    grow(gpu, &mut w.y, t * d)?;
    match (route, plan) {
        (Route::TopK { .. }, _) => {
            grow(gpu, &mut w.meta, 2 * e + 2)?;
            grow(gpu, &mut w.slot_token, n)?;
            grow(gpu, &mut w.slot_weight, n)?;
            grow(gpu, &mut w.logits, t * e)?;
            grow(gpu, &mut w.sel, t * e)?;
            grow(gpu, &mut w.a_expert, n)?;
            grow(gpu, &mut w.a_weight, n)?;
            grow(gpu, &mut w.a_info, n)?;
            grow(gpu, &mut w.counts, n.div_ceil(CHUNK) * e)?;
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
            let slots = grow(gpu, &mut w.assign_slot, plan.tok_slot.len())?;
            gpu.write(&plan.tok_slot, slots)?;
        }
        (Route::Host, None) => {}
    }
    if let Some(sf) = shared_f {
        grow(gpu, &mut w.sh_h, t * sf)?;
        grow(gpu, &mut w.sh_out, t * d)?;
        grow(gpu, &mut w.sg, t)?;
    }
    Ok((max_rows, tokens))
}

/// The shared experts' output `[T, d]` and optional gate `[T]`, as the combine reads them.
type SharedOut<'w> = Option<(&'w CudaSlice<f32>, Option<&'w CudaSlice<f32>>)>;

/// Enqueues the shared experts over every token of `w.x` and their optional sigmoid gate.
fn shared_products<'w>(
    gpu: &Gpu,
    shared: Option<&(DevBank, Option<CudaSlice<f32>>)>,
    w: &'w Work,
    (t, d): (usize, usize),
) -> Result<SharedOut<'w>, MoeError> {
    let Some((sb, gate)) = shared else {
        return Ok(None);
    };
    let (x, sh_out) = (need(&w.x)?, need(&w.sh_out)?);
    bank_products(
        gpu,
        sb,
        (x, t, None),
        need(&w.meta_all)?,
        t,
        need(&w.sh_h)?,
        sh_out,
    )?;
    let sg = match gate {
        Some(g) => {
            let sg = need(&w.sg)?;
            shared_gate(gpu, x, g, sg, (t, d))?;
            Some(sg)
        }
        None => None,
    };
    Ok(Some((sh_out, sg)))
}

/// Enqueues the top-k routing over the logits already in `w.logits` and the counting sort of its choices.
fn route_and_sort(
    gpu: &Gpu,
    w: &Work,
    spec: &TopKSpec,
    corr: Option<&CudaSlice<f32>>,
    padded: bool,
    (t, e): (usize, usize),
) -> Result<(), MoeError> {
    let (a_expert, a_weight, a_info) = (need(&w.a_expert)?, need(&w.a_weight)?, need(&w.a_info)?);
    route_topk(
        gpu,
        &TopKLaunch {
            spec,
            logits: need(&w.logits)?,
            corr,
            pad: if padded { Some(need(&w.pad)?) } else { None },
            sel: need(&w.sel)?,
            t,
            e,
            a_expert,
            a_weight,
            a_info,
        },
    )?;
    counting_sort(
        gpu,
        &Sort {
            n: t * spec.k,
            k: spec.k,
            e,
            a_expert,
            a_info,
            a_weight,
            counts: need(&w.counts)?,
            meta: need(&w.meta)?,
            slot_token: need(&w.slot_token)?,
            slot_weight: need(&w.slot_weight)?,
            assign_slot: need(&w.assign_slot)?,
        },
    )
}

/// The plan of a natively routed forward from the choices (and, for `E ≤ 4096`, the logits) read back.
fn read_routing(
    gpu: &Gpu,
    w: &Work,
    input: &RouterInput<'_>,
    (t, e, k): (usize, usize, usize),
) -> Result<Routing, MoeError> {
    let experts = gpu.read(need(&w.a_expert)?, t * k)?;
    let weights = gpu.read(need(&w.a_weight)?, t * k)?;
    let info = gpu.read(need(&w.a_info)?, t * k)?;
    let logits = if e <= KEEP_LOGITS_MAX_EXPERTS {
        Some(gpu.read(need(&w.logits)?, t * e)?)
    } else {
        None
    };
    native_routing(t, e, k, input, &experts, &weights, &info, logits)
}

impl DeviceLayer for CudaLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    /// Training is not on this backend yet: the core's defaults of `forward_train`, `backward` and
    /// `apply_update` return `MoeError::Unsupported` naming it.
    fn backend(&self) -> &str {
        "cuda"
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.forward_impl(input)
    }

    /// Checks that `router` fits the layer, uploads its device state (gate, biases, spec) and keeps the experts.
    fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError> {
        let mut layer = (*self.layer).clone();
        layer.set_router(router)?;
        let (e, d) = (layer.n_experts(), layer.d_model());
        let route = match self.store {
            Some(_) => Route::Host,
            None => Route::new(&self.gpu, layer.router(), e, d)?,
        };
        self.gpu.sync()?;
        self.route = route;
        self.layer = Arc::new(layer);
        Ok(())
    }

    /// The expert store's counters when the routed bank is stored (no prefetch on this backend).
    fn store_stats(&self) -> Option<StoreStats> {
        self.store.as_ref().map(CudaStore::stats)
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

impl Drop for CudaLayer {
    /// Copies into the slot bank may still be in flight on the store's copy stream: they finish before the
    /// fields (the slot bank among them) are freed.
    fn drop(&mut self) {
        if let Some(s) = &self.store {
            s.quiesce();
        }
    }
}
