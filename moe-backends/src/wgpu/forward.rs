//! A layer resident on the wgpu backend and its forward: the orchestration of the stages (input upload, routing
//! or the host plan, grouping, expert products, shared experts, combine), one submission, one read-back, and the
//! plan rebuilt on the host from the read-back choices. [`DeviceLayer::set_router`] swaps only the router's
//! device state ([`Route`]); the uploaded experts stay.

use std::sync::Arc;

use ::wgpu as wg;
use ndarray::Array2;

use moe_core::{
    DeviceLayer, KEEP_LOGITS_MAX_EXPERTS, LayerOutput, MoeError, MoeLayer, Router, RouterInput,
    RouterPath, Routing,
};

use super::combine::{combine, shared_experts};
use super::device::{Ctx, Pool, bytes_of, err, words};
use super::execute::{Batch, Encoder, execute};
use super::grouped::bank_products;
use super::route::{Choices, Route, route_native};
use super::sort::{all_rows, host_plan, sort_native};
use super::upload::DeviceBank;
use crate::native::{check_or_route, native_routing};

/// A layer resident on the wgpu backend.
#[derive(Debug)]
pub struct WgpuLayer {
    ctx: Arc<Ctx>,
    layer: Arc<MoeLayer>,
    route: Route,
    bank: DeviceBank,
    shared: Option<(DeviceBank, Option<wg::Buffer>)>,
    out_bias: Option<wg::Buffer>,
    dummy: wg::Buffer,
    pool: Pool,
}

impl WgpuLayer {
    /// Uploads `layer`: its banks (packed), shared-expert gate, output bias and router.
    pub(super) fn build(ctx: &Arc<Ctx>, layer: Arc<MoeLayer>) -> Result<Self, MoeError> {
        let (e, d) = (layer.n_experts(), layer.d_model());
        let bank = DeviceBank::upload(ctx, layer.experts(), "routed")?;
        let shared = match layer.shared() {
            Some(s) => {
                let b = DeviceBank::upload(ctx, s.bank(), "shared")?;
                let g = s
                    .gate()
                    .map(|g| ctx.storage_init("shared_expert_gate.weight", bytes_of(&g.to_vec())))
                    .transpose()?;
                Some((b, g))
            }
            None => None,
        };
        let out_bias = layer
            .output_bias()
            .map(|b| ctx.storage_init("bias", bytes_of(&b.to_vec())))
            .transpose()?;
        let route = Route::new(ctx, layer.router(), e, d)?;
        let dummy = ctx.storage_init("dummy", &[0u8; 16])?;
        Ok(WgpuLayer {
            ctx: Arc::clone(ctx),
            layer,
            route,
            bank,
            shared,
            out_bias,
            dummy,
            pool: Pool::default(),
        })
    }

    /// Where this layer's routing runs.
    pub fn router_path(&self) -> RouterPath {
        self.route.path()
    }

    fn forward_impl(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let (t, d) = input.hidden.dim();
        let layer = Arc::clone(&self.layer);
        let e = layer.n_experts();
        let host_routing = check_or_route(&layer, input, self.route.path() == RouterPath::Native)?;
        if t == 0 {
            return Ok(LayerOutput {
                output: Array2::zeros((0, d)),
                routing: host_routing.unwrap_or_else(|| Routing::empty(0, e)),
                router_path: self.router_path(),
            });
        }
        check_sizes(t, d)?;
        let ctx = Arc::clone(&self.ctx);
        let WgpuLayer {
            route,
            bank,
            shared,
            out_bias,
            dummy,
            pool,
            ..
        } = self;
        let mut enc = Encoder {
            ctx: &ctx,
            pool,
            dummy: dummy.clone(),
            batch: Batch::default(),
        };
        let x_vals: Vec<f32> = input.hidden.iter().copied().collect();
        let x = enc.upload("hidden", bytes_of(&x_vals))?;
        let y = enc.storage("output", (t * d * 4) as u64)?;
        let all = all_rows(&mut enc, t as u32)?;
        // Routing and grouping by expert.
        let (plan, choices) = match &host_routing {
            Some(routing) => (host_plan(&mut enc, routing)?, None),
            None => {
                let c = route_native(&mut enc, route, input, &x, &all, e)?;
                (sort_native(&mut enc, &c, e)?, Some(c))
            }
        };
        // Routed experts.
        let max_rows = plan.rows.max_rows;
        let h = enc.storage("expert_hidden", (max_rows * bank.f * 4) as u64)?;
        let slot_out = enc.storage("expert_out", (max_rows * d * 4) as u64)?;
        if max_rows > 0 {
            bank_products(&mut enc, bank, &plan.rows, true, &x, &h, &slot_out);
        }
        let sh = shared_experts(&mut enc, shared.as_ref(), &all, &x, t, d)?;
        let scale = layer.output_scale();
        combine(
            &mut enc,
            &plan,
            &slot_out,
            sh,
            out_bias.as_ref(),
            scale,
            &y,
            (t, d),
        );
        // One submission; read back the output and, on the native path, the choices (and logits).
        let keep_logits = e <= KEEP_LOGITS_MAX_EXPERTS;
        enc.batch.reads.push((y, (t * d * 4) as u64));
        if let Some(c) = &choices {
            let n = (c.t * c.k * 4) as u64;
            enc.batch.reads.push((c.expert.clone(), n));
            enc.batch.reads.push((c.weight.clone(), n));
            enc.batch.reads.push((c.info.clone(), n));
            if keep_logits {
                enc.batch.reads.push((c.logits.clone(), (t * e * 4) as u64));
            }
        }
        let Encoder { pool, batch, .. } = enc;
        let data = execute(&ctx, pool, &batch)?;
        drop(batch);
        let y_bytes = data
            .first()
            .ok_or_else(|| err("internal: no output read-back"))?;
        let output = Array2::from_shape_vec((t, d), f32s(y_bytes))
            .map_err(|e| err(format!("output read-back: {e}")))?;
        let (routing, path) = match (host_routing, choices) {
            (Some(r), _) => (r, RouterPath::Host),
            (None, Some(c)) => (
                decode_routing(input, &c, e, keep_logits, &data)?,
                RouterPath::Native,
            ),
            (None, None) => return Err(err("internal: no routing")),
        };
        Ok(LayerOutput {
            output,
            routing,
            router_path: path,
        })
    }
}

/// Refuses forwards whose sizes the kernels' u32 indices cannot hold.
fn check_sizes(t: usize, d: usize) -> Result<(), MoeError> {
    if t > (u32::MAX / 4) as usize {
        return Err(MoeError::TooLarge {
            what: "tokens per wgpu forward".into(),
            size: t as u128,
            limit: (u32::MAX / 4) as u128,
        });
    }
    let total = (t * d) as u64;
    if total > u64::from(u32::MAX) {
        return Err(MoeError::TooLarge {
            what: "T * d of one wgpu forward".into(),
            size: u128::from(total),
            limit: u128::from(u32::MAX),
        });
    }
    Ok(())
}

/// f32 values of read-back bytes.
fn f32s(b: &[u8]) -> Vec<f32> {
    words(b).map(f32::from_bits).collect()
}

/// The plan of a natively routed forward from the read-back choices (`data[1..=3]`) and logits (`data[4]`).
fn decode_routing(
    input: &RouterInput<'_>,
    c: &Choices,
    e: usize,
    keep_logits: bool,
    data: &[Vec<u8>],
) -> Result<Routing, MoeError> {
    let experts: Vec<u32> = data.get(1).map(|b| words(b).collect()).unwrap_or_default();
    let weights = data.get(2).map(|b| f32s(b)).unwrap_or_default();
    let info: Vec<u32> = data.get(3).map(|b| words(b).collect()).unwrap_or_default();
    let logits = keep_logits.then(|| data.get(4).map(|b| f32s(b)).unwrap_or_default());
    native_routing(c.t, e, c.k, input, &experts, &weights, &info, logits)
}

impl DeviceLayer for WgpuLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    /// Training is not on this backend yet: the core's defaults of `forward_train`, `backward` and
    /// `apply_update` return `MoeError::Unsupported` naming it.
    fn backend(&self) -> &str {
        "wgpu"
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.forward_impl(input)
    }

    /// Checks that `router` fits the layer, uploads its device state (gate, biases, spec) and keeps the experts.
    fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError> {
        let mut layer = (*self.layer).clone();
        layer.set_router(router)?;
        let scope = self
            .ctx
            .device
            .push_error_scope(wg::ErrorFilter::OutOfMemory);
        let route = Route::new(
            &self.ctx,
            layer.router(),
            layer.n_experts(),
            layer.d_model(),
        );
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(err(format!("uploading the router: {e}")));
        }
        self.route = route?;
        self.layer = Arc::new(layer);
        Ok(())
    }
}
