//! The CPU backend, the reference every other backend is tested against: grouped expert products over contiguous
//! rows, activation fused between the two products, weighted combine in a fixed order, experts with no tokens
//! skipped. Threads run over experts (rayon); results are bit-identical on any thread count because each expert's
//! products and each token's combine run in one fixed order on one thread.

mod combine;
mod experts;

use std::sync::Arc;

use ndarray::Array2;
use rayon::prelude::*;

use moe_core::{
    Backend, Capabilities, DeviceLayer, LayerOutput, MoeError, MoeLayer, RouterInput, RouterPath,
};

pub use experts::expert_forward;

/// The CPU backend. `threads = None` uses rayon's global pool.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend {
    threads: Option<usize>,
}

impl CpuBackend {
    /// A CPU backend on rayon's global pool.
    pub fn new() -> Self {
        CpuBackend { threads: None }
    }

    /// A CPU backend on its own pool of `threads` threads (results do not depend on the count).
    pub fn with_threads(threads: usize) -> Self {
        CpuBackend {
            threads: Some(threads.max(1)),
        }
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn capabilities(&self) -> Capabilities {
        let n = self.threads.unwrap_or_else(rayon::current_num_threads);
        Capabilities {
            device: format!("cpu ({n} threads)"),
            dtypes: vec!["f32".into()],
            native_specs: vec!["all (routers run on the host, which is this device)".into()],
            banks: ["swiglu", "gpt_oss", "mlp", "peer", "custom"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError> {
        let pool = match self.threads {
            Some(n) => Some(Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| MoeError::Backend {
                        backend: "cpu".into(),
                        reason: e.to_string(),
                    })?,
            )),
            None => None,
        };
        Ok(Box::new(CpuLayer { layer, pool }))
    }
}

/// A layer resident on the CPU backend.
#[derive(Debug)]
pub struct CpuLayer {
    layer: Arc<MoeLayer>,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl DeviceLayer for CpuLayer {
    fn layer(&self) -> &MoeLayer {
        &self.layer
    }

    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        match &self.pool {
            Some(pool) => pool.install(|| forward(&self.layer, input)),
            None => forward(&self.layer, input),
        }
    }
}

/// One grouped forward of `layer` on `input`.
fn forward(layer: &MoeLayer, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
    let (t, d) = input.hidden.dim();
    if d != layer.d_model() {
        return Err(MoeError::shape(
            "hidden",
            format!("[T, {}]", layer.d_model()),
            &[t, d],
        ));
    }
    let routing = layer.router().route(input)?;
    if routing.n_tokens() != t || routing.n_experts() != layer.n_experts() {
        return Err(MoeError::mismatch(
            format!(
                "router {} returned a plan of the wrong size",
                layer.router().name()
            ),
            "plan tokens x experts",
            routing.n_tokens() * routing.n_experts(),
            "input tokens x layer experts",
            t * layer.n_experts(),
        ));
    }
    // Expert outputs per slot, expert-major: each active expert owns a contiguous block of rows.
    let mut slot_out = Array2::<f32>::zeros((routing.n_slots(), d));
    {
        let mut blocks = Vec::with_capacity(routing.active_experts().len());
        let mut rest = slot_out
            .as_slice_mut()
            .ok_or_else(|| internal("slot buffer is not contiguous"))?;
        for g in routing.groups() {
            let (head, tail) = rest.split_at_mut(g.tokens.len() * d);
            blocks.push((g, head));
            rest = tail;
        }
        blocks.into_par_iter().try_for_each(|(g, out)| {
            let xg = input.hidden.select(
                ndarray::Axis(0),
                &g.tokens.iter().map(|&t| t as usize).collect::<Vec<_>>(),
            );
            let y = expert_forward(layer.experts(), g.expert, xg.view())?;
            let ys = y
                .as_slice()
                .ok_or_else(|| internal("expert output is not contiguous"))?;
            out.copy_from_slice(ys);
            Ok::<(), MoeError>(())
        })?;
    }
    let mut output = combine::combine(&routing, slot_out.view(), layer.output_scale())?;
    if let Some(shared) = layer.shared() {
        let ys = expert_forward(&shared.bank, 0, input.hidden)?;
        combine::add_shared(&mut output, input.hidden, ys.view(), shared.gate.as_ref());
    }
    if let Some(b) = layer.output_bias() {
        output += b;
    }
    Ok(LayerOutput {
        output,
        routing,
        router_path: RouterPath::Host,
    })
}

fn internal(what: &str) -> MoeError {
    MoeError::Backend {
        backend: "cpu".into(),
        reason: what.into(),
    }
}
