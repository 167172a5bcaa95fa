//! The wgpu backend (feature `wgpu`): WGSL compute kernels on any adapter wgpu finds (Vulkan, Metal, DX12, GL;
//! Mesa's lavapipe software Vulkan driver on machines without a GPU).
//!
//! # What runs where
//! - Weights are uploaded once, in [`Backend::upload`], in the layout the bank has (no repacking). Expert tensors
//!   larger than one storage binding (128 MiB on lavapipe) are split into chunks of whole experts; a layer whose
//!   single expert, gate or per-forward workspace exceeds a binding is refused with a clear [`MoeError::Backend`].
//! - Every forward runs on the device: the gate projection (tiled GEMM), the router spec, grouping of the kept
//!   assignments by expert (a counting sort: per-expert counts, a prefix sum, an ordered scatter, so each expert's
//!   rows are in ascending token order), the grouped expert products (tiled GEMM in workgroup memory, one row tile
//!   list over all experts, experts with no tokens skipped) with SwiGLU / GPT-OSS GLU fused into the first product
//!   and the MLP activation and biases into its epilogue, shared experts, and the weighted combine in ascending
//!   expert order per token with the output scale and bias. Everything is f32.
//! - Router specs run natively ([`RouterPath::Native`]): [`RouterSpec::TopK`] (softmax / sigmoid / sqrt-softplus
//!   scores, both orders, renormalisation, scaling, group-limited selection, correction bias, gate bias; `k` up to
//!   32) and [`RouterSpec::Switch`] (softmax, argmax, capacity per sequence or batch, drops by position or
//!   probability). The [`Routing`] returned with the output is built on the host from one read-back of the compact
//!   per-token results (expert ids, weights, ranks and drop flags, `T · k` each) and, for `E ≤ 4096`, the router
//!   logits, which are attached to it as the CPU routers do. Aux losses are not computed on the native path (a
//!   spec does not carry the loss settings); the host path keeps the router's own.
//! - Every other router (no spec, random drops, `k > 32`, a spec this backend cannot check) takes the host path
//!   ([`RouterPath::Host`]): [`Router::route`](moe_core::Router::route) runs on the host, the plan is uploaded and
//!   the experts run on the device as above.
//! - Expert banks: SwiGLU, GPT-OSS and MLP run on the device; PEER and custom banks are refused by `upload` with
//!   a [`MoeError::Backend`] naming the bank (run them on the CPU backend).

mod device;

use std::sync::Arc;

use ::wgpu as wg;
use ndarray::{Array1, Array2};

use moe_core::{
    Activation, Backend, Capabilities, DeviceLayer, DropPolicy, ExpertBank, LayerOutput, MoeError,
    MoeLayer, RouterInput, RouterPath, RouterSpec, Routing, ScoreFn, SwitchSpec, TopKOrder,
    TopKSpec,
};

use crate::BackendError;
use device::{BM, BN, Ctx, Pool, bytes_of, err, words};

/// Largest `k` the native top-k kernel runs; larger `k` takes the host path.
pub const MAX_NATIVE_K: usize = 32;

/// Router logits are read back and attached to the plan when `E` is at most this (as the CPU routers do).
const KEEP_LOGITS_MAX_EXPERTS: usize = 4096;

use crate::native::{check_or_route, native_routing, row_meta, topk_supported};

/// Settings of [`WgpuBackend`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgpuOptions {
    /// Caps the bytes of one chunk of expert weights below the adapter's storage-binding limit (tests use it to
    /// force the chunked weight path on small layers). `None`: the adapter's limit.
    pub max_weight_binding_bytes: Option<u64>,
}

/// The wgpu backend: one adapter and device, shared by the layers uploaded to it.
#[derive(Debug, Clone)]
pub struct WgpuBackend {
    ctx: Arc<Ctx>,
}

impl WgpuBackend {
    /// Opens the default adapter (wgpu's environment variables, such as `WGPU_BACKEND=vulkan`, apply).
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason when no adapter or device is found.
    pub fn new() -> Result<Self, BackendError> {
        Self::with_options(WgpuOptions::default())
    }

    /// Opens the default adapter with `options`.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] with the reason when no adapter or device is found.
    pub fn with_options(options: WgpuOptions) -> Result<Self, BackendError> {
        Ok(WgpuBackend {
            ctx: Arc::new(Ctx::open(options.max_weight_binding_bytes)?),
        })
    }

    /// The adapter in words: name, backend, device type and driver.
    pub fn adapter(&self) -> String {
        self.ctx.describe()
    }

    /// The adapter's largest storage binding, in bytes (128 MiB on lavapipe).
    pub fn max_binding_bytes(&self) -> u64 {
        self.ctx.max_binding
    }
}

impl Backend for WgpuBackend {
    fn name(&self) -> &str {
        "wgpu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            device: self.ctx.describe(),
            dtypes: vec!["f32".into()],
            native_specs: vec!["topk".into(), "switch".into()],
            banks: vec!["swiglu".into(), "gpt_oss".into(), "mlp".into()],
        }
    }

    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        let ctx = Arc::clone(&self.ctx);
        let scope = ctx.device.push_error_scope(wg::ErrorFilter::OutOfMemory);
        let built = WgpuLayer::build(&ctx, layer);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(err(format!("uploading the layer: {e}")));
        }
        Ok(Box::new(built?))
    }
}

/// How the layer routes on this backend.
#[derive(Debug)]
enum Route {
    /// `router.route` on the host.
    Host,
    /// A native top-k spec.
    TopK {
        spec: TopKSpec,
        gate: wg::Buffer,
        gate_bias: Option<wg::Buffer>,
        corr: Option<wg::Buffer>,
    },
    /// A native Switch spec.
    Switch { spec: SwitchSpec, gate: wg::Buffer },
}

/// The expert family of a bank on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SwiGlu,
    GptOss,
    Mlp,
}

/// Weights of `[e0, e1)` experts in one buffer.
#[derive(Debug)]
struct Chunk {
    e0: u32,
    e1: u32,
    buf: wg::Buffer,
}

/// An expert bank resident on the device.
#[derive(Debug)]
struct DeviceBank {
    kind: Kind,
    n_experts: usize,
    d: usize,
    f: usize,
    act: u32,
    up: Vec<Chunk>,
    up_stride: usize,
    up_bias: Option<wg::Buffer>,
    down: Vec<Chunk>,
    down_stride: usize,
    down_bias: Option<wg::Buffer>,
    alpha: f32,
    limit: f32,
}

fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Silu => 1,
        Activation::Relu => 2,
        Activation::Gelu => 3,
        Activation::GeluTanh => 4,
    }
}

/// Standard-layout values of an array.
fn values<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// Uploads `data` (`n_experts` equal parts) in chunks of whole experts that each fit one binding.
fn upload_chunks(
    ctx: &Ctx,
    name: &str,
    data: &[f32],
    n_experts: usize,
) -> Result<(Vec<Chunk>, usize), MoeError> {
    let per = data.len() / n_experts.max(1);
    let per_bytes = (per as u64) * 4;
    let limit = ctx.max_weight_binding.min(ctx.max_buffer);
    if per_bytes > limit {
        return Err(err(format!(
            "one expert's {name} is {}, over the largest weight binding ({}): the layer is too large for \
             the wgpu backend here",
            device::human(per_bytes),
            device::human(limit)
        )));
    }
    let per_chunk = ((limit / per_bytes.max(1)) as usize).clamp(1, n_experts.max(1));
    let mut chunks = Vec::new();
    let mut e0 = 0usize;
    while e0 < n_experts {
        let e1 = (e0 + per_chunk).min(n_experts);
        let buf = ctx.storage_init(name, bytes_of(&data[e0 * per..e1 * per]))?;
        chunks.push(Chunk {
            e0: e0 as u32,
            e1: e1 as u32,
            buf,
        });
        e0 = e1;
    }
    Ok((chunks, per))
}

impl DeviceBank {
    fn upload(ctx: &Ctx, bank: &ExpertBank, what: &str) -> Result<Self, MoeError> {
        let (e, d, f) = (bank.n_experts(), bank.d_model(), bank.ffn());
        let bias = |name: &str, b: Option<&Array2<f32>>| -> Result<Option<wg::Buffer>, MoeError> {
            b.map(|b| ctx.storage_init(name, bytes_of(&values(b))))
                .transpose()
        };
        let (kind, act, up, down, up_bias, down_bias, alpha, limit) = match bank {
            ExpertBank::SwiGlu(b) => (
                Kind::SwiGlu,
                act_code(b.act()),
                upload_chunks(ctx, "experts.gate_up_proj", &values(b.gate_up()), e)?,
                upload_chunks(ctx, "experts.down_proj", &values(b.down()), e)?,
                None,
                None,
                0.0,
                0.0,
            ),
            ExpertBank::GptOss(b) => (
                Kind::GptOss,
                0,
                upload_chunks(ctx, "experts.gate_up_proj", &values(b.gate_up()), e)?,
                upload_chunks(ctx, "experts.down_proj", &values(b.down()), e)?,
                bias("experts.gate_up_proj_bias", Some(b.gate_up_bias()))?,
                bias("experts.down_proj_bias", Some(b.down_bias()))?,
                b.alpha(),
                b.limit(),
            ),
            ExpertBank::Mlp(b) => (
                Kind::Mlp,
                act_code(b.act()),
                upload_chunks(ctx, "experts.w1", &values(b.w1()), e)?,
                upload_chunks(ctx, "experts.w2", &values(b.w2()), e)?,
                bias("experts.b1", b.b1())?,
                bias("experts.b2", b.b2())?,
                0.0,
                0.0,
            ),
            other => {
                return Err(err(format!(
                    "the wgpu backend runs swiglu, gpt_oss and mlp expert banks; the {what} bank is {}: run \
                     this layer on the cpu backend",
                    other.kind()
                )));
            }
        };
        Ok(DeviceBank {
            kind,
            n_experts: e,
            d,
            f,
            act,
            up: up.0,
            up_stride: up.1,
            up_bias,
            down: down.0,
            down_stride: down.1,
            down_bias,
            alpha,
            limit,
        })
    }
}

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
    fn build(ctx: &Arc<Ctx>, layer: Arc<MoeLayer>) -> Result<Self, MoeError> {
        let (e, d) = (layer.n_experts(), layer.d_model());
        let bank = DeviceBank::upload(ctx, layer.experts(), "routed")?;
        let shared = match layer.shared() {
            Some(s) => {
                let b = DeviceBank::upload(ctx, s.bank(), "shared")?;
                let g = s
                    .gate()
                    .map(|g| ctx.storage_init("shared_expert_gate.weight", bytes_of(&values(g))))
                    .transpose()?;
                Some((b, g))
            }
            None => None,
        };
        let out_bias = layer
            .output_bias()
            .map(|b| ctx.storage_init("bias", bytes_of(&values(b))))
            .transpose()?;
        let vec_buf = |name: &str, v: Option<&Array1<f32>>| {
            v.map(|v| ctx.storage_init(name, bytes_of(&values(v))))
                .transpose()
        };
        let route = match layer.router().spec() {
            Some(RouterSpec::TopK(s)) if topk_supported(&s, e, d, MAX_NATIVE_K) => Route::TopK {
                gate: ctx.storage_init("gate.weight", bytes_of(&values(&s.gate)))?,
                gate_bias: vec_buf("gate.bias", s.gate_bias.as_ref())?,
                corr: vec_buf("e_score_correction_bias", s.correction_bias.as_ref())?,
                spec: s,
            },
            Some(RouterSpec::Switch(s))
                if s.drop != DropPolicy::Random && s.gate.dim() == (e, d) =>
            {
                Route::Switch {
                    gate: ctx
                        .storage_init("router.classifier.weight", bytes_of(&values(&s.gate)))?,
                    spec: s,
                }
            }
            _ => Route::Host,
        };
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
        match self.route {
            Route::Host => RouterPath::Host,
            _ => RouterPath::Native,
        }
    }
}

/// One kernel launch: pipeline, 16 parameter words, storage buffers by binding, workgroups.
struct Dispatch<'a> {
    pipe: &'a wg::ComputePipeline,
    params: [u32; 16],
    bufs: Vec<(u32, wg::Buffer)>,
    groups: (u32, u32, u32),
}

/// The per-forward row plan of the grouped products: where the expert-major rows and the row-tile map are.
struct Rows {
    /// `[E + 1]` row offsets then `[E + 1]` tile offsets.
    meta: wg::Buffer,
    /// Slot -> token.
    slot_token: wg::Buffer,
    /// Upper bound of the number of rows.
    max_rows: usize,
}

/// The launches of one bank over `rows` (`a`: input rows `[T, d]`, gathered through `rows.slot_token` when
/// `gather`): up product (with the fused activation) into `h`, down product into `out`.
fn bank_dispatches<'a>(
    ctx: &'a Ctx,
    dummy: &wg::Buffer,
    bank: &DeviceBank,
    rows: &Rows,
    gather: bool,
    a: &wg::Buffer,
    h: &wg::Buffer,
    out: &wg::Buffer,
) -> Vec<Dispatch<'a>> {
    let p = &ctx.pipes;
    let (d, f, e) = (bank.d as u32, bank.f as u32, bank.n_experts as u32);
    let mut v = Vec::new();
    for c in &bank.up {
        let tiles = (rows.max_rows as u32).div_ceil(BM) + (c.e1 - c.e0);
        let (gy, gz) = ctx.grid(tiles);
        let mut params = [0u32; 16];
        params[0] = f;
        params[1] = d;
        params[2] = c.e0;
        params[3] = c.e1;
        params[4] = bank.up_stride as u32;
        params[7] = bank.act;
        params[10] = u32::from(gather);
        params[14] = e;
        let (pipe, bias) = match bank.kind {
            Kind::SwiGlu => {
                params[5] = d;
                params[6] = 1;
                params[11] = 0;
                (&p.gemm_dual, None)
            }
            Kind::GptOss => {
                params[5] = 2 * f;
                params[6] = 0;
                params[8] = 1;
                params[9] = 2 * f;
                params[11] = 1;
                params[12] = bank.alpha.to_bits();
                params[13] = bank.limit.to_bits();
                (&p.gemm_dual, bank.up_bias.as_ref())
            }
            Kind::Mlp => {
                params[5] = d;
                params[6] = 1;
                params[8] = u32::from(bank.up_bias.is_some());
                params[9] = f;
                (&p.gemm_single, bank.up_bias.as_ref())
            }
        };
        v.push(Dispatch {
            pipe,
            params,
            bufs: vec![
                (1, a.clone()),
                (2, rows.slot_token.clone()),
                (3, rows.meta.clone()),
                (4, c.buf.clone()),
                (5, bias.unwrap_or(dummy).clone()),
                (6, h.clone()),
            ],
            groups: (f.div_ceil(BN), gy, gz),
        });
    }
    for c in &bank.down {
        let tiles = (rows.max_rows as u32).div_ceil(BM) + (c.e1 - c.e0);
        let (gy, gz) = ctx.grid(tiles);
        let mut params = [0u32; 16];
        params[0] = d;
        params[1] = f;
        params[2] = c.e0;
        params[3] = c.e1;
        params[4] = bank.down_stride as u32;
        params[14] = e;
        // Down products read the h rows in place (no gather).
        if bank.kind == Kind::GptOss {
            params[5] = d;
            params[6] = 0;
        } else {
            params[5] = f;
            params[6] = 1;
        }
        params[8] = u32::from(bank.down_bias.is_some());
        params[9] = d;
        v.push(Dispatch {
            pipe: &p.gemm_single,
            params,
            bufs: vec![
                (1, h.clone()),
                (2, rows.slot_token.clone()),
                (3, rows.meta.clone()),
                (4, c.buf.clone()),
                (5, bank.down_bias.as_ref().unwrap_or(dummy).clone()),
                (6, out.clone()),
            ],
            groups: (d.div_ceil(BN), gy, gz),
        });
    }
    v
}

impl WgpuLayer {
    /// Encodes `dispatches` (after zeroing `clears`), submits, and reads back `reads` (whole-byte lengths).
    fn execute(
        &mut self,
        clears: &[wg::Buffer],
        dispatches: &[Dispatch<'_>],
        reads: &[(wg::Buffer, u64)],
    ) -> Result<Vec<Vec<u8>>, MoeError> {
        let ctx = Arc::clone(&self.ctx);
        let dev = &ctx.device;
        let scope_v = dev.push_error_scope(wg::ErrorFilter::Validation);
        let scope_m = dev.push_error_scope(wg::ErrorFilter::OutOfMemory);
        let stride = ctx.uniform_align;
        let ubuf = self.pool.get(
            &ctx,
            "params",
            stride * dispatches.len().max(1) as u64,
            wg::BufferUsages::UNIFORM | wg::BufferUsages::COPY_DST,
        )?;
        let mut blob = vec![0u8; (stride as usize) * dispatches.len().max(1)];
        for (i, d) in dispatches.iter().enumerate() {
            let at = i * stride as usize;
            blob[at..at + 64].copy_from_slice(bytes_of(&d.params));
        }
        ctx.queue.write_buffer(&ubuf, 0, &blob);
        let groups: Vec<wg::BindGroup> = dispatches
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut entries = vec![wg::BindGroupEntry {
                    binding: 0,
                    resource: wg::BindingResource::Buffer(wg::BufferBinding {
                        buffer: &ubuf,
                        offset: i as u64 * stride,
                        size: wg::BufferSize::new(64),
                    }),
                }];
                for (b, buf) in &d.bufs {
                    entries.push(wg::BindGroupEntry {
                        binding: *b,
                        resource: buf.as_entire_binding(),
                    });
                }
                dev.create_bind_group(&wg::BindGroupDescriptor {
                    label: None,
                    layout: &d.pipe.get_bind_group_layout(0),
                    entries: &entries,
                })
            })
            .collect();
        let mut enc = dev.create_command_encoder(&wg::CommandEncoderDescriptor { label: None });
        for b in clears {
            enc.clear_buffer(b, 0, None);
        }
        {
            let mut pass = enc.begin_compute_pass(&wg::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            for (d, g) in dispatches.iter().zip(&groups) {
                pass.set_pipeline(d.pipe);
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
            }
        }
        let total: u64 = reads.iter().map(|r| r.1.next_multiple_of(4)).sum();
        let staging = self.pool.get(
            &ctx,
            "staging",
            total,
            wg::BufferUsages::MAP_READ | wg::BufferUsages::COPY_DST,
        )?;
        let mut at = 0u64;
        for (src, n) in reads {
            if *n > 0 {
                enc.copy_buffer_to_buffer(src, 0, &staging, at, n.next_multiple_of(4));
            }
            at += n.next_multiple_of(4);
        }
        ctx.queue.submit([enc.finish()]);
        let oom = pollster::block_on(scope_m.pop());
        let invalid = pollster::block_on(scope_v.pop());
        if let Some(e) = oom.or(invalid) {
            return Err(err(format!("device error: {e}")));
        }
        let mut out = Vec::with_capacity(reads.len());
        if total > 0 {
            let slice = staging.slice(0..total);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wg::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            dev.poll(wg::PollType::wait_indefinitely())
                .map_err(|e| err(format!("waiting for the device: {e}")))?;
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(err(format!("reading results back: {e}"))),
                Err(_) => return Err(err("reading results back: the map callback never ran")),
            }
            {
                let view = slice
                    .get_mapped_range()
                    .map_err(|e| err(format!("reading results back: {e}")))?;
                let mut at = 0usize;
                for (_, n) in reads {
                    out.push(view[at..at + *n as usize].to_vec());
                    at += n.next_multiple_of(4) as usize;
                }
            }
            staging.unmap();
        } else {
            out.resize(reads.len(), Vec::new());
        }
        let lost = ctx.take_uncaptured();
        if !lost.is_empty() {
            return Err(err(format!("device error: {}", lost.join("; "))));
        }
        Ok(out)
    }

    /// Per-token CSR of the plan's slots as combine reads it: offsets `[T + 1]` and slot + 1 per entry.
    fn host_plan(
        &mut self,
        routing: &Routing,
    ) -> Result<(Rows, wg::Buffer, wg::Buffer, wg::Buffer), MoeError> {
        let ctx = Arc::clone(&self.ctx);
        let meta = row_meta(routing, BM as usize)?;
        let (offsets, slots) = routing.token_slots();
        let off: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let tslots: Vec<u32> = slots.iter().map(|&s| s as u32 + 1).collect();
        let slot_token: Vec<u32> = routing.slot_tokens().to_vec();
        let put =
            |pool: &mut Pool, name: &'static str, data: &[u8]| -> Result<wg::Buffer, MoeError> {
                let b = pool.storage(&ctx, name, data.len() as u64)?;
                if !data.is_empty() {
                    ctx.queue.write_buffer(&b, 0, data);
                }
                Ok(b)
            };
        let meta_b = put(&mut self.pool, "meta", bytes_of(&meta))?;
        let st = put(&mut self.pool, "slot_token", bytes_of(&slot_token))?;
        let sw = put(
            &mut self.pool,
            "slot_weight",
            bytes_of(routing.slot_weights()),
        )?;
        let to = put(&mut self.pool, "tok_off", bytes_of(&off))?;
        let ts = put(&mut self.pool, "tok_slot", bytes_of(&tslots))?;
        Ok((
            Rows {
                meta: meta_b,
                slot_token: st,
                max_rows: routing.n_slots(),
            },
            sw,
            to,
            ts,
        ))
    }

    fn forward_impl(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let (t, d) = input.hidden.dim();
        let layer = Arc::clone(&self.layer);
        let e = layer.n_experts();
        let native = !matches!(self.route, Route::Host);
        let host_routing = check_or_route(&layer, input, native)?;
        if t == 0 {
            return Ok(LayerOutput {
                output: Array2::zeros((0, d)),
                routing: host_routing.unwrap_or_else(|| Routing::empty(0, e)),
                router_path: self.router_path(),
            });
        }
        if t > (u32::MAX / 4) as usize {
            return Err(MoeError::TooLarge {
                what: "tokens per wgpu forward".into(),
                size: t as u128,
                limit: (u32::MAX / 4) as u128,
            });
        }
        let ctx = Arc::clone(&self.ctx);
        let p = &ctx.pipes;
        let x_std = input.hidden.as_standard_layout();
        let x_vals: Vec<f32> = x_std.iter().copied().collect();
        let x = self.pool.storage(&ctx, "hidden", (t * d * 4) as u64)?;
        ctx.queue.write_buffer(&x, 0, bytes_of(&x_vals));
        let y = self.pool.storage(&ctx, "output", (t * d * 4) as u64)?;
        let dummy = self.dummy.clone();
        let t32 = t as u32;
        let mut clears = Vec::new();
        let mut dispatches: Vec<Dispatch<'_>> = Vec::new();
        let mut reads = Vec::new();

        // Rows of the full batch (gate projection, shared experts): one group of T rows, no gather.
        // Layout of one expert: row offsets [0, T], tile offsets [0, ceil(T / BM)].
        let all_meta = self.pool.storage(&ctx, "meta_all", 16)?;
        ctx.queue
            .write_buffer(&all_meta, 0, bytes_of(&[0u32, t32, 0, t32.div_ceil(BM)]));
        let all_rows = Rows {
            meta: all_meta,
            slot_token: dummy.clone(),
            max_rows: t,
        };

        // Routing and grouping.
        let k = match &self.route {
            Route::TopK { spec, .. } => spec.k,
            Route::Switch { .. } => 1,
            Route::Host => 0,
        };
        let (rows, fixed_k, w_buf, slot_buf, off_buf, logits_buf, assign) = if native {
            let n_assign = t * k;
            let logits = self
                .pool
                .storage(&ctx, "router_logits", (t * e * 4) as u64)?;
            let pad: Vec<u32> = (0..t).map(|i| u32::from(input.is_padding(i))).collect();
            let pad_b = self.pool.storage(&ctx, "padding", (t * 4) as u64)?;
            ctx.queue.write_buffer(&pad_b, 0, bytes_of(&pad));
            let a_expert = self.pool.storage(&ctx, "a_expert", (n_assign * 4) as u64)?;
            let a_weight = self.pool.storage(&ctx, "a_weight", (n_assign * 4) as u64)?;
            let a_info = self.pool.storage(&ctx, "a_info", (n_assign * 4) as u64)?;
            let (gate, gate_bias) = match &self.route {
                Route::TopK {
                    gate, gate_bias, ..
                } => (gate.clone(), gate_bias.clone()),
                Route::Switch { gate, .. } => (gate.clone(), None),
                Route::Host => (dummy.clone(), None),
            };
            // Gate projection: logits [T, E] = x . gate^T (+ bias).
            let mut gp = [0u32; 16];
            gp[0] = e as u32;
            gp[1] = d as u32;
            gp[2] = 0;
            gp[3] = 1;
            gp[4] = (e * d) as u32;
            gp[5] = d as u32;
            gp[6] = 1;
            gp[8] = u32::from(gate_bias.is_some());
            gp[9] = e as u32;
            gp[14] = 1;
            let (gy, gz) = ctx.grid(t32.div_ceil(BM) + 1);
            dispatches.push(Dispatch {
                pipe: &p.gemm_single,
                params: gp,
                bufs: vec![
                    (1, x.clone()),
                    (2, dummy.clone()),
                    (3, all_rows.meta.clone()),
                    (4, gate),
                    (5, gate_bias.unwrap_or_else(|| dummy.clone())),
                    (6, logits.clone()),
                ],
                groups: ((e as u32).div_ceil(BN), gy, gz),
            });
            let (rx, ry) = ctx.grid(t32.div_ceil(64));
            match &self.route {
                Route::TopK { spec, corr, .. } => {
                    let ng = spec.groups.map_or(0, |g| g.n_group);
                    let gscore =
                        self.pool
                            .storage(&ctx, "group_scores", (t * ng.max(1) * 4) as u64)?;
                    let mut rp = [0u32; 16];
                    rp[0] = t32;
                    rp[1] = e as u32;
                    rp[2] = k as u32;
                    rp[3] = match spec.score {
                        ScoreFn::Softmax => 0,
                        ScoreFn::Sigmoid => 1,
                        ScoreFn::SqrtSoftplus => 2,
                    };
                    rp[4] = u32::from(spec.order == TopKOrder::TopKThenSoftmax);
                    rp[5] = u32::from(spec.renormalize);
                    rp[6] = spec.scaling.to_bits();
                    rp[7] = ng as u32;
                    rp[8] = spec.groups.map_or(0, |g| g.topk_group as u32);
                    rp[9] = u32::from(corr.is_some());
                    dispatches.push(Dispatch {
                        pipe: &p.route_topk,
                        params: rp,
                        bufs: vec![
                            (1, logits.clone()),
                            (2, corr.clone().unwrap_or_else(|| dummy.clone())),
                            (3, pad_b.clone()),
                            (4, a_expert.clone()),
                            (5, a_weight.clone()),
                            (6, a_info.clone()),
                            (7, gscore),
                        ],
                        groups: (rx, ry, 1),
                    });
                }
                Route::Switch { spec, .. } => {
                    let mut rp = [0u32; 16];
                    rp[0] = t32;
                    rp[1] = e as u32;
                    dispatches.push(Dispatch {
                        pipe: &p.route_switch,
                        params: rp,
                        bufs: vec![
                            (1, logits.clone()),
                            (3, pad_b.clone()),
                            (4, a_expert.clone()),
                            (5, a_weight.clone()),
                            (6, a_info.clone()),
                        ],
                        groups: (rx, ry, 1),
                    });
                    let mut groups = vec![0u32; 2 * t];
                    if spec.per_sequence {
                        let mut start = 0usize;
                        for len in input.sequences() {
                            for i in start..start + len {
                                groups[2 * i] = start as u32;
                                groups[2 * i + 1] = (start + len) as u32;
                            }
                            start += len;
                        }
                    } else {
                        for i in 0..t {
                            groups[2 * i + 1] = t32;
                        }
                    }
                    let gb = self.pool.storage(&ctx, "capacity_groups", (8 * t) as u64)?;
                    ctx.queue.write_buffer(&gb, 0, bytes_of(&groups));
                    rp[10] = spec.capacity.min(u32::MAX as usize) as u32;
                    rp[11] = u32::from(spec.drop != DropPolicy::Position);
                    dispatches.push(Dispatch {
                        pipe: &p.switch_capacity,
                        params: rp,
                        bufs: vec![
                            (4, a_expert.clone()),
                            (5, a_weight.clone()),
                            (6, a_info.clone()),
                            (8, gb),
                        ],
                        groups: (rx, ry, 1),
                    });
                }
                Route::Host => {}
            }
            // Counting sort by expert.
            let counts = self.pool.storage(&ctx, "expert_counts", (e * 4) as u64)?;
            let meta = self.pool.storage(&ctx, "meta", ((2 * e + 2) * 4) as u64)?;
            let slot_token = self
                .pool
                .storage(&ctx, "slot_token", (n_assign * 4) as u64)?;
            let slot_weight = self
                .pool
                .storage(&ctx, "slot_weight", (n_assign * 4) as u64)?;
            let assign_slot = self
                .pool
                .storage(&ctx, "assign_slot", (n_assign * 4) as u64)?;
            clears.push(assign_slot.clone());
            let mut sp = [0u32; 16];
            sp[0] = n_assign as u32;
            sp[1] = e as u32;
            sp[2] = k as u32;
            sp[3] = BM;
            let (ex, ey) = ctx.grid(e as u32);
            dispatches.push(Dispatch {
                pipe: &p.group_count,
                params: sp,
                bufs: vec![
                    (1, a_expert.clone()),
                    (2, a_info.clone()),
                    (4, counts.clone()),
                ],
                groups: (ex, ey, 1),
            });
            dispatches.push(Dispatch {
                pipe: &p.group_scan,
                params: sp,
                bufs: vec![(4, counts.clone()), (5, meta.clone())],
                groups: (1, 1, 1),
            });
            dispatches.push(Dispatch {
                pipe: &p.group_scatter,
                params: sp,
                bufs: vec![
                    (1, a_expert.clone()),
                    (2, a_info.clone()),
                    (3, a_weight.clone()),
                    (5, meta.clone()),
                    (6, slot_token.clone()),
                    (7, slot_weight.clone()),
                    (8, assign_slot.clone()),
                ],
                groups: (ex, ey, 1),
            });
            (
                Rows {
                    meta,
                    slot_token,
                    max_rows: n_assign,
                },
                k as u32,
                slot_weight,
                assign_slot,
                dummy.clone(),
                Some(logits),
                Some((a_expert, a_weight, a_info)),
            )
        } else {
            let routing = host_routing
                .as_ref()
                .ok_or_else(|| err("missing host plan"))?;
            let (rows, sw, off, slots) = self.host_plan(routing)?;
            (rows, 0, sw, slots, off, None, None)
        };

        // Routed experts.
        let (f, max_rows) = (self.bank.f, rows.max_rows);
        let h = self
            .pool
            .storage(&ctx, "expert_hidden", (max_rows * f * 4) as u64)?;
        let slot_out = self
            .pool
            .storage(&ctx, "expert_out", (max_rows * d * 4) as u64)?;
        if max_rows > 0 {
            dispatches.extend(bank_dispatches(
                &ctx, &dummy, &self.bank, &rows, true, &x, &h, &slot_out,
            ));
        }
        // Shared experts (every token), with the optional sigmoid gate.
        let mut shared_mode = 0u32;
        let mut sh_out = dummy.clone();
        let mut sg = dummy.clone();
        if let Some((sb, gate)) = &self.shared {
            let sh_h = self
                .pool
                .storage(&ctx, "shared_hidden", (t * sb.f * 4) as u64)?;
            let out = self.pool.storage(&ctx, "shared_out", (t * d * 4) as u64)?;
            dispatches.extend(bank_dispatches(
                &ctx, &dummy, sb, &all_rows, false, &x, &sh_h, &out,
            ));
            sh_out = out;
            shared_mode = 1;
            if let Some(g) = gate {
                let sgb = self.pool.storage(&ctx, "shared_gate", (t * 4) as u64)?;
                let mut gp = [0u32; 16];
                gp[0] = t32;
                gp[1] = d as u32;
                let (gx, gy) = ctx.grid(t32.div_ceil(64));
                dispatches.push(Dispatch {
                    pipe: &p.shared_gate,
                    params: gp,
                    bufs: vec![(1, x.clone()), (2, g.clone()), (3, sgb.clone())],
                    groups: (gx, gy, 1),
                });
                sg = sgb;
                shared_mode = 2;
            }
        }
        // Combine.
        let mut cp = [0u32; 16];
        cp[0] = t32;
        cp[1] = d as u32;
        cp[2] = fixed_k;
        cp[3] = layer.output_scale().to_bits();
        cp[4] = shared_mode;
        cp[5] = u32::from(self.out_bias.is_some());
        let total = (t * d) as u64;
        if total > u64::from(u32::MAX) {
            return Err(MoeError::TooLarge {
                what: "T * d of one wgpu forward".into(),
                size: u128::from(total),
                limit: u128::from(u32::MAX),
            });
        }
        let (cx, cy) = ctx.grid((total as u32).div_ceil(64));
        dispatches.push(Dispatch {
            pipe: &p.combine,
            params: cp,
            bufs: vec![
                (1, slot_out.clone()),
                (2, w_buf.clone()),
                (3, slot_buf.clone()),
                (4, off_buf.clone()),
                (5, sh_out),
                (6, sg),
                (7, self.out_bias.clone().unwrap_or_else(|| dummy.clone())),
                (8, y.clone()),
            ],
            groups: (cx, cy, 1),
        });

        reads.push((y.clone(), total * 4));
        let keep_logits = e <= KEEP_LOGITS_MAX_EXPERTS;
        if let (Some(l), Some((ae, aw, ai))) = (&logits_buf, &assign) {
            let n = (t * k * 4) as u64;
            reads.push((ae.clone(), n));
            reads.push((aw.clone(), n));
            reads.push((ai.clone(), n));
            if keep_logits {
                reads.push((l.clone(), (t * e * 4) as u64));
            }
        }
        let data = self.execute(&clears, &dispatches, &reads)?;
        drop(dispatches);
        let f32s = |b: &[u8]| -> Vec<f32> { words(b).map(f32::from_bits).collect() };
        let output = Array2::from_shape_vec((t, d), f32s(&data[0]))
            .map_err(|e| err(format!("output read-back: {e}")))?;
        let (routing, path) = match host_routing {
            Some(r) => (r, RouterPath::Host),
            None => {
                let experts: Vec<u32> = data.get(1).map(|b| words(b).collect()).unwrap_or_default();
                let weights = data.get(2).map(|b| f32s(b)).unwrap_or_default();
                let info: Vec<u32> = data.get(3).map(|b| words(b).collect()).unwrap_or_default();
                let logits = if keep_logits {
                    let l = data.get(4).map(|b| f32s(b)).unwrap_or_default();
                    let l = Array2::from_shape_vec((t, e), l)
                        .map_err(|e| err(format!("logits read-back: {e}")))?;
                    moe_core::check_finite("router logits", l.view())?;
                    Some(l)
                } else {
                    None
                };
                let mut routing = native_routing(t, e, k, input, &experts, &weights, &info)?;
                if let Some(l) = logits {
                    routing.set_logits(l);
                }
                (routing, RouterPath::Native)
            }
        };
        Ok(LayerOutput {
            output,
            routing,
            router_path: path,
        })
    }
}

impl DeviceLayer for WgpuLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        self.forward_impl(input)
    }

    fn set_router(&mut self, router: Box<dyn moe_core::Router>) -> Result<(), MoeError> {
        let mut layer = (*self.layer).clone();
        layer.set_router(router)?;
        *self = WgpuLayer::build(&self.ctx, Arc::new(layer))?;
        Ok(())
    }
}
