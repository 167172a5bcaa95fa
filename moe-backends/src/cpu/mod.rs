//! The CPU backend, the reference every other backend is tested against, and the fast path users run.
//!
//! A forward routes on the host, gathers each active expert's rows into one contiguous block, runs the expert
//! products grouped per expert (`cpu/grouped.rs`: the first product with the activation fused per tile, then the
//! second), and combines the outputs with their weights in ascending expert order per token. Threads (rayon) run
//! over tiles of (expert, column block); which tile computes which value depends only on the shapes, so results
//! are bit-identical on any thread count. Buffers are reused across forwards ([`CpuLayer`] owns them), so in the
//! steady state the only allocations of a forward are the returned output and routing plan.
//!
//! [`reference_forward`] is the plain path (ndarray products per expert, fresh buffers) the fast path is tested
//! against; banks the fast path does not run (PEER, custom experts) use the same per-expert code.
//!
//! Expert parallelism (`cpu/remote.rs`): [`CpuExperts`] runs the groups of rows other ranks send to the experts
//! this rank owns, and a [`CpuLayer`]'s `forward_remote` / `backward_remote` run the frames above with the routed
//! experts' products done remotely; both bit-identical to one rank.
//!
//! A stored bank ([`moe_core::ExpertBank::Stored`]) keeps `slots` experts resident and loads the others from its
//! source when the routing picks them, group by group, with the fast path's kernels and tiles (`cpu/store.rs`);
//! its output is bit-identical to the all-resident layer's. Stored experts are read-only: training is refused.

mod activation;
mod backward_ref;
mod combine;
pub mod dense;
#[cfg(target_arch = "x86_64")]
mod dot;
#[cfg(target_arch = "x86_64")]
mod dot2;
#[cfg(target_arch = "x86_64")]
mod dot_bf16;
mod experts;
mod grouped;
mod grouped_train;
mod kernels;
mod peer;
pub mod probe;
mod quant;
mod reference;
mod remote;
mod rows;
mod store;
mod store_loader;
mod train;
mod train_fast;

use std::sync::Arc;

use ndarray::Array2;

use moe_core::{
    Backend, Capabilities, DeviceLayer, Grad, LayerGrads, LayerOutput, MoeError, MoeLayer,
    ParamMut, Router, RouterInput, RouterPath, Routing, store::StoreStats,
};

use grouped::Workspace;
use kernels::Kernels;

pub use experts::expert_forward;
pub use kernels::CpuKernels;
pub use reference::reference_forward;
pub use remote::CpuExperts;

/// The CPU backend. `threads = None` uses rayon's global pool.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    threads: Option<usize>,
    kernels: CpuKernels,
    dtype: crate::Dtype,
    bf16_activations: bool,
}

impl CpuBackend {
    /// A CPU backend on rayon's global pool.
    pub fn new() -> Self {
        CpuBackend::default()
    }

    /// A CPU backend on its own pool of `threads` threads (results do not depend on the count).
    pub fn with_threads(threads: usize) -> Self {
        CpuBackend {
            threads: Some(threads.max(1)),
            ..CpuBackend::default()
        }
    }

    /// The same backend with the kernels `kernels` (the default is [`CpuKernels::Auto`]).
    pub fn with_kernels(mut self, kernels: CpuKernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// The same backend quantising the experts of every layer it uploads to `dtype` ([`MoeLayer::quantized`]);
    /// `F32` (the default) uploads banks as they are, packed banks in their own format.
    pub fn with_dtype(mut self, dtype: crate::Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same backend multiplying bf16 expert weights by bf16 activations (`on`; the default is off): in every
    /// product over a bf16 bank (packed, loaded from a bf16 checkpoint or quantised at upload), the activations
    /// (`x`, and `h` of the second product) are rounded to bf16 (nearest even) and the exact products summed in f32
    /// by AVX-512 BF16's `VDPBF16PS`, twice the f32 FMA rate on compute-bound rows; outputs stay f32. As
    /// PyTorch's bf16 blocks round their activations; off, activations stay f32 and a bf16 bank's output equals
    /// the f32 bank of its weights bit for bit. Other formats and f32 banks are unchanged. Source:
    /// `cpu/dot_bf16.rs`.
    ///
    /// Uploading a layer fails with [`MoeError::Unsupported`] where the CPU lacks AVX-512F, BW or BF16, or with
    /// kernels other than [`CpuKernels::Auto`].
    pub fn with_bf16_activations(mut self, on: bool) -> Self {
        self.bf16_activations = on;
        self
    }

    /// Whether this CPU runs bf16 activations ([`CpuBackend::with_bf16_activations`]): AVX-512F, AVX-512BW and
    /// AVX-512 BF16 (with the default kernels).
    pub fn bf16_activations_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            Kernels::new(CpuKernels::Auto).dot && dot_bf16::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The kernels of a layer uploaded here.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for bf16 activations this CPU or kernel choice cannot run.
    pub(crate) fn layer_kernels(&self) -> Result<Kernels, MoeError> {
        let mut k = Kernels::new(self.kernels);
        if self.bf16_activations {
            #[cfg(target_arch = "x86_64")]
            let ok = k.dot && dot_bf16::available();
            #[cfg(not(target_arch = "x86_64"))]
            let ok = false;
            if !ok {
                return Err(MoeError::Unsupported {
                    owner: "backend cpu".into(),
                    feature: format!(
                        "bf16 activations with {:?} kernels on this CPU (they need the AVX-512 kernels and \
                         AVX-512F, BW and BF16)",
                        self.kernels
                    ),
                });
            }
            k.bf16 = true;
        }
        Ok(k)
    }

    /// Whether forwards on this backend use the AVX-512 dot-product kernel (for groups of at most 48 rows): the
    /// kernels are [`CpuKernels::Auto`] and this CPU has AVX-512F.
    pub fn uses_dot_kernel(&self) -> bool {
        Kernels::new(self.kernels).dot
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn capabilities(&self) -> Capabilities {
        let n = self.threads.unwrap_or_else(rayon::current_num_threads);
        let k = Kernels::new(self.kernels);
        let kernels = if k.dot && self.bf16_activations {
            "AVX-512 dot kernel + gemm, bf16 activations for bf16 weights"
        } else if k.dot {
            "AVX-512 dot kernel + gemm"
        } else if k.avx2 {
            "AVX2 dot kernel + gemm"
        } else {
            "gemm kernels"
        };
        Capabilities {
            device: format!(
                "cpu ({n} thread{}, {kernels})",
                if n == 1 { "" } else { "s" }
            ),
            dtypes: moe_core::WeightFormat::ALL
                .iter()
                .map(|f| f.name().to_string())
                .collect(),
            native_specs: vec!["all (routers run on the host, which is this device)".into()],
            banks: [
                "swiglu", "gpt_oss", "mlp", "peer", "custom", "stored", "packed",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    fn upload(&self, mut layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        if self.dtype != crate::Dtype::F32 {
            layer = Arc::new(layer.quantized(self.dtype)?);
        }
        // Rows of weights that start on a cache line are read faster by the SIMD kernel. The weights can only be
        // moved when nobody else holds the layer; otherwise they are used where they are (correct, a bit slower).
        if let Some(l) = Arc::get_mut(&mut layer) {
            l.align_weights(64);
        }
        let pool = self.pool()?;
        let fast = grouped::supports(layer.experts());
        let peer = peer::supports(&layer).then(Box::default);
        let store = store::StoreState::for_layer(&layer)?.map(Box::new);
        Ok(Box::new(CpuLayer {
            layer,
            pool,
            ws: Workspace::default(),
            saved: train::Saved::default(),
            tws: train_fast::TrainWorkspace::default(),
            peer,
            store,
            fast,
            kernels: self.layer_kernels()?,
        }))
    }

    fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<Option<f64>, MoeError> {
        let threads = self.threads.unwrap_or_else(rayon::current_num_threads);
        probe::read_bandwidth(bytes, threads, repeats).map(Some)
    }

    fn upload_experts(
        &self,
        bank: Arc<moe_core::ExpertBank>,
    ) -> Result<Box<dyn moe_core::ResidentExperts>, MoeError> {
        remote::upload_experts(self, bank)
    }
}

impl CpuBackend {
    /// The backend's own thread pool (`None`: rayon's global pool).
    fn pool(&self) -> Result<Option<Arc<rayon::ThreadPool>>, MoeError> {
        self.threads
            .map(|n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map(Arc::new)
            })
            .transpose()
            .map_err(|e| internal(&e.to_string()))
    }
}

/// A layer resident on the CPU backend.
#[derive(Debug)]
pub struct CpuLayer {
    layer: Arc<MoeLayer>,
    pool: Option<Arc<rayon::ThreadPool>>,
    ws: Workspace,
    /// What the last training forward kept for the backward.
    saved: train::Saved,
    /// The grouped path's training buffers.
    tws: train_fast::TrainWorkspace,
    /// The PEER path's buffers when the routed bank is PEER (`cpu/peer.rs`).
    peer: Option<Box<peer::PeerWorkspaces>>,
    /// The resident slots, source and prefetch thread when the routed bank is stored (`cpu/store.rs`).
    store: Option<Box<store::StoreState>>,
    /// The grouped fast path runs the routed bank (chosen once, at upload); otherwise the reference path.
    fast: bool,
    kernels: Kernels,
}

impl CpuLayer {
    /// The backward, reusing the dense expert gradients of `recycle` (a previous step's) on the grouped path.
    fn backward_recycling(
        &mut self,
        d_output: ndarray::ArrayView2<'_, f32>,
        d_aux: &[f32],
        mut recycle: Vec<moe_core::Grad>,
    ) -> Result<LayerGrads, MoeError> {
        let (layer, saved, tws, kernels) =
            (&self.layer, &mut self.saved, &mut self.tws, self.kernels);
        let mut pws = self.peer.as_deref_mut();
        let mut run = |saved: &mut train::Saved, tws: &mut train_fast::TrainWorkspace| {
            train::check_backward(saved, d_output, d_aux)?;
            train::check_banks(layer)?;
            // A backward consumes its forward's state (as torch frees the graph).
            saved.ready = false;
            if let Some(p) = pws.as_deref_mut() {
                peer::backward(layer, saved, &mut p.train, d_output, d_aux)
            } else if saved.fast {
                train_fast::backward(layer, saved, tws, d_output, d_aux, kernels, &mut recycle)
            } else {
                train::reference_backward(layer, saved, d_output, d_aux)
            }
        };
        match &self.pool {
            Some(pool) => pool.install(|| run(saved, tws)),
            None => run(saved, tws),
        }
    }
}

impl DeviceLayer for CpuLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    fn backend(&self) -> &str {
        "cpu"
    }

    fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError> {
        // The layer's banks sit behind their own `Arc`s, so a shared layer is copied without its weights.
        Arc::make_mut(&mut self.layer).set_router(router)
    }

    fn on_workers(&self, work: &(dyn Fn(usize, usize) + Sync)) {
        let run = |c: rayon::BroadcastContext<'_>| work(c.index(), c.num_threads());
        match &self.pool {
            Some(pool) => {
                pool.broadcast(run);
            }
            None => {
                rayon::broadcast(run);
            }
        }
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let (layer, ws, kernels) = (&self.layer, &mut self.ws, self.kernels);
        let mut pws = self.peer.as_deref_mut();
        let mut sws = self.store.as_deref_mut();
        let mut run = |ws: &mut Workspace| {
            if let Some(s) = sws.as_deref_mut() {
                s.forward(layer, input, ws, kernels)
            } else if let Some(p) = pws.as_deref_mut() {
                peer::forward(layer, input, &mut p.eval, false)
            } else if self.fast {
                forward(layer, input, ws, kernels)
            } else {
                remote::custom_forward(layer, input, ws, kernels)
            }
        };
        match &self.pool {
            Some(pool) => pool.install(|| run(ws)),
            None => run(ws),
        }
    }

    fn forward_train(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let packed = |b: &moe_core::ExpertBank| matches!(b, moe_core::ExpertBank::Packed(_));
        if packed(self.layer.experts()) || self.layer.shared().is_some_and(|s| packed(s.bank())) {
            return Err(MoeError::Unsupported {
                owner: "a packed (low-precision) bank".into(),
                feature: "training (train an f32 layer; PackedBank::dequantize gives one)".into(),
            });
        }
        if self.store.is_some() {
            return Err(MoeError::Unsupported {
                owner: "stored experts".into(),
                feature: "training (experts are read-only in a store)".into(),
            });
        }
        let (layer, saved, tws, kernels) =
            (&self.layer, &mut self.saved, &mut self.tws, self.kernels);
        let (fast, ws) = (self.fast, &mut self.ws);
        let mut pws = self.peer.as_deref_mut();
        let mut run = |saved: &mut train::Saved, tws: &mut train_fast::TrainWorkspace| {
            if let Some(p) = pws.as_deref_mut() {
                return peer::forward_train(layer, input, saved, &mut p.train);
            }
            if fast {
                return train_fast::forward_train(layer, input, saved, tws, kernels);
            }
            saved.keep_input(input);
            let out = remote::custom_forward(layer, input, ws, kernels)?;
            saved.fast = false;
            saved.routing = Some(out.routing.clone());
            saved.ready = true;
            Ok(out)
        };
        match &self.pool {
            Some(pool) => pool.install(|| run(saved, tws)),
            None => run(saved, tws),
        }
    }

    fn backward(
        &mut self,
        d_output: ndarray::ArrayView2<'_, f32>,
        d_aux: &[f32],
    ) -> Result<LayerGrads, MoeError> {
        self.backward_recycling(d_output, d_aux, Vec::new())
    }

    fn backward_into(
        &mut self,
        d_output: ndarray::ArrayView2<'_, f32>,
        d_aux: &[f32],
        grads: &mut LayerGrads,
    ) -> Result<(), MoeError> {
        let recycle = std::mem::take(&mut grads.params);
        match self.backward_recycling(d_output, d_aux, recycle) {
            Ok(g) => {
                *grads = g;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn forward_remote(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn moe_core::RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        self.forward_remote_frame(input, experts)
    }

    fn forward_train_remote(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn moe_core::RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        self.forward_train_remote_frame(input, experts)
    }

    fn backward_remote(
        &mut self,
        d_output: ndarray::ArrayView2<'_, f32>,
        d_aux: &[f32],
        experts: &mut dyn moe_core::RemoteExperts,
    ) -> Result<LayerGrads, MoeError> {
        self.backward_remote_frame(d_output, d_aux, experts)
    }

    fn store_stats(&self) -> Option<StoreStats> {
        self.store.as_ref().map(|s| s.stats())
    }

    fn prefetch(&mut self, experts: &[u32]) -> Result<(), MoeError> {
        match self.store.as_deref_mut() {
            Some(s) => s.prefetch(experts),
            None => Ok(()),
        }
    }

    fn apply_update(
        &mut self,
        grads: &[Grad],
        update: &mut dyn FnMut(&mut ParamMut<'_>, &Grad) -> Result<(), MoeError>,
    ) -> Result<(), MoeError> {
        // Copies the layer first if another holder shares it (its banks are copied only when shared too).
        let layer = Arc::make_mut(&mut self.layer);
        layer.apply_update(grads, update)?;
        layer.align_weights(64);
        Ok(())
    }
}

/// One fast forward of `layer` on `input`, reusing `ws` (the routed bank is one [`grouped::supports`] runs).
fn forward(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut Workspace,
    kernels: Kernels,
) -> Result<LayerOutput, MoeError> {
    store::forward_with(layer, input, ws, kernels, |routing, x, h, y| {
        let offsets = routing.offsets();
        grouped::run_bank(
            layer.experts(),
            routing.active_experts(),
            offsets,
            x,
            h,
            y,
            kernels,
        )
    })
}

/// Adds the layer's output bias and wraps the result (both paths route on the host).
fn finish(layer: &MoeLayer, mut output: Array2<f32>, routing: Routing) -> LayerOutput {
    if let Some(b) = layer.output_bias() {
        output += b;
    }
    LayerOutput {
        output,
        routing,
        router_path: RouterPath::Host,
    }
}

fn internal(what: &str) -> MoeError {
    MoeError::Backend {
        backend: "cpu".into(),
        reason: what.into(),
    }
}
