//! The CPU backend's halves of expert parallelism (`moe_core::remote`): [`CpuExperts`], a bank resident without a
//! router that runs the groups of rows other ranks' plans send it (the owner's half), and the frames of
//! [`CpuLayer`]'s `forward_remote`, `forward_train_remote` and `backward_remote` (the home's half).
//!
//! Bit-identity with one rank: the home runs the single-rank frames themselves (`store::route_gather` /
//! `store::combine_rest`, `train_fast::train_gather` / `train_combine`, `train_fast::backward_dy` /
//! `backward_rest`), only the routed experts' products come from a [`RemoteExperts`]. An owner runs its groups
//! with the single-rank kernels (`grouped::run_groups`, `grouped_train::train_bank` / `backward_bank`) tiled for
//! the source plan's largest group (`plan_max_rows`): which kernel computes a value depends only on its group's
//! row count, the column blocks only on the plan's largest group, and every expert's rows and weights are the same
//! numbers, so every value is computed by the same kernel call on the same operands as on one rank.
//!
//! Custom experts run per expert (`expert_forward`), as the single-rank forward of a layer with a custom bank
//! ([`custom_forward`], which shares the fast frame so shared experts take the same path whatever the routed bank
//! is); they have no training. PEER and stored banks run only inside their layer: [`MoeError::Unsupported`].

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

#[path = "remote_train.rs"]
mod train_half;

use train_half::Batch;

use moe_core::{
    ExpertBank, ExpertGroups, Grad, LayerOutput, MoeError, MoeLayer, RemoteExperts,
    ResidentExperts, RouterInput,
};

use super::backward_ref::BankGrads;
use super::grouped::{self, AlignedBuf, Workspace};
use super::grouped_train::GradIndex;
use super::kernels::Kernels;
use super::{CpuBackend, CpuLayer, expert_forward, internal, store};

/// Experts resident on the CPU backend without a router: one expert-parallel rank's own experts
/// ([`moe_core::Backend::upload_experts`] on a [`CpuBackend`]). SwiGLU, GPT-OSS and MLP banks run on the grouped
/// path (forward and training); custom experts run per expert (forward only). Buffers are reused across calls;
/// the products run on the backend's thread pool.
#[derive(Debug)]
pub struct CpuExperts {
    bank: Arc<ExpertBank>,
    pool: Option<Arc<rayon::ThreadPool>>,
    kernels: Kernels,
    /// The grouped path runs the bank; otherwise `expert_forward` per expert, and no training.
    fast: bool,
    ws: Workspace,
    /// Training batches: the first `live` are the training forwards since the last `take_grads`.
    batches: Vec<Batch>,
    live: usize,
    /// The summed gradients of the backwards since the last `take_grads` (`None`: no backward yet).
    sum: Option<BankGrads>,
    /// The gradients of one backward after the first, added into `sum`.
    tmp: Option<BankGrads>,
    index: GradIndex,
}

/// [`moe_core::Backend::upload_experts`] of the CPU backend.
///
/// # Errors
/// [`MoeError::Unsupported`] for PEER and stored banks; [`MoeError::Backend`] when the thread pool cannot start.
pub(super) fn upload_experts(
    backend: &CpuBackend,
    mut bank: Arc<ExpertBank>,
) -> Result<Box<dyn ResidentExperts>, MoeError> {
    if matches!(bank.as_ref(), ExpertBank::Peer(_) | ExpertBank::Stored(_)) {
        return Err(MoeError::Unsupported {
            owner: format!("a {} bank on the cpu backend", bank.kind()),
            feature: "resident experts without a layer (PEER and stored banks run only inside their layer)"
                .into(),
        });
    }
    // As `upload`: weights are moved onto cache lines only when nobody else holds the bank.
    if let Some(b) = Arc::get_mut(&mut bank) {
        b.align_weights(64);
    }
    let fast = grouped::supports(&bank);
    Ok(Box::new(CpuExperts {
        bank,
        pool: backend.pool()?,
        kernels: backend.layer_kernels()?,
        fast,
        ws: Workspace::default(),
        batches: Vec::new(),
        live: 0,
        sum: None,
        tmp: None,
        index: GradIndex::default(),
    }))
}

/// Runs `f` on `pool` (rayon's current pool without one).
fn in_pool<R: Send>(pool: &Option<Arc<rayon::ThreadPool>>, f: impl FnOnce() -> R + Send) -> R {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Checks `groups` against a bank of `n_experts` experts of width `d` and `rows` against the groups.
fn check_groups(
    groups: &ExpertGroups<'_>,
    rows: ArrayView2<'_, f32>,
    n_experts: usize,
    d: usize,
) -> Result<(), MoeError> {
    groups.check(n_experts, rows.nrows())?;
    if rows.ncols() != d {
        return Err(MoeError::shape(
            "rows",
            format!(
                "[{}, {d}] (the groups' rows, the bank's width)",
                groups.rows()
            ),
            rows.shape(),
        ));
    }
    Ok(())
}

/// Copies `a` (`[rows, d]`, any layout) row-major into `buf`; returns the copy.
fn copy_rows<'b>(buf: &'b mut AlignedBuf, a: ArrayView2<'_, f32>) -> &'b [f32] {
    let (rows, d) = a.dim();
    let out = buf.get_mut(rows * d);
    for (dst, src) in out.chunks_exact_mut(d.max(1)).zip(a.outer_iter()) {
        dst.iter_mut().zip(src.iter()).for_each(|(o, &v)| *o = v);
    }
    buf.get(rows * d)
}

/// Copies what remote experts returned (`got`, expected `[rows, d]`) into `dst` (`rows · d` values, row-major).
///
/// # Errors
/// [`MoeError::Shape`] naming `what` when `got` is not `[rows, d]`.
fn copy_returned(got: &Array2<f32>, dst: &mut [f32], d: usize, what: &str) -> Result<(), MoeError> {
    let rows = dst.len() / d.max(1);
    if got.dim() != (rows, d) {
        return Err(MoeError::shape(
            what,
            format!("[{rows}, {d}] (one row per slot of the plan)"),
            got.shape(),
        ));
    }
    for (row, src) in dst.chunks_exact_mut(d.max(1)).zip(got.outer_iter()) {
        row.iter_mut().zip(src.iter()).for_each(|(o, &v)| *o = v);
    }
    Ok(())
}

/// Runs `bank`'s experts `experts[g]` one by one (`expert_forward`, in parallel over groups) on rows
/// `x[offsets[g]..offsets[g + 1]]` (`[rows, d]` row-major), writing `y` (`[rows, d]`): the per-expert path of
/// banks the grouped path does not run (custom experts), as `reference_forward` runs them.
///
/// # Errors
/// Expert errors; [`MoeError::Shape`] naming the expert when its output is not `[its rows, d]`;
/// [`MoeError::Backend`] for inconsistent buffers.
fn per_expert(
    bank: &ExpertBank,
    experts: &[u32],
    offsets: &[usize],
    x: &[f32],
    y: &mut [f32],
    d: usize,
) -> Result<(), MoeError> {
    let rows = offsets.last().copied().unwrap_or(0);
    if experts.len() + 1 != offsets.len() || x.len() < rows * d || y.len() < rows * d {
        return Err(internal("per-expert path: inconsistent groups or buffers"));
    }
    let mut blocks = Vec::with_capacity(experts.len());
    let mut rest = &mut y[..rows * d];
    for (g, w) in offsets.windows(2).enumerate() {
        let n = w[1]
            .checked_sub(w[0])
            .ok_or_else(|| internal("offsets decrease"))?;
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(n * d);
        blocks.push((g, head));
        rest = tail;
    }
    blocks.into_par_iter().try_for_each(|(g, out)| {
        let n = offsets[g + 1] - offsets[g];
        let xg = ArrayView2::from_shape((n, d), &x[offsets[g] * d..offsets[g + 1] * d])
            .map_err(|e| internal(&e.to_string()))?;
        let e = experts[g] as usize;
        let yg = expert_forward(bank, e, xg)?;
        if yg.dim() != (n, d) {
            return Err(MoeError::shape(
                format!("output of expert {e}"),
                format!("[{n}, {d}]"),
                yg.shape(),
            ));
        }
        out.iter_mut().zip(yg.iter()).for_each(|(o, &v)| *o = v);
        Ok(())
    })
}

/// The CPU forward of a layer whose routed bank the grouped path does not run (custom experts, weights not in
/// standard layout; not PEER or stored): the fast forward's frame ([`store::forward_with`]) with the routed
/// experts run one by one as [`super::reference_forward`] runs them, so the shared experts take the same path as
/// in every other layer and an expert-parallel home ([`CpuLayer::forward_remote`]) matches it bit for bit.
///
/// # Errors
/// As [`moe_core::DeviceLayer::forward`].
pub(super) fn custom_forward(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut Workspace,
    kernels: Kernels,
) -> Result<LayerOutput, MoeError> {
    let d = input.hidden.ncols();
    store::forward_with(layer, input, ws, kernels, |routing, x, _, y| {
        per_expert(
            layer.experts(),
            routing.active_experts(),
            routing.offsets(),
            x,
            y,
            d,
        )
    })
}

impl ResidentExperts for CpuExperts {
    fn bank(&self) -> &ExpertBank {
        &self.bank
    }

    fn forward(
        &mut self,
        groups: &ExpertGroups<'_>,
        rows: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        let d = self.bank.d_model();
        check_groups(groups, rows, self.bank.n_experts(), d)?;
        let n = groups.rows();
        let Self {
            bank,
            pool,
            kernels,
            fast,
            ws,
            ..
        } = self;
        in_pool(pool, || {
            let x = copy_rows(&mut ws.x, rows);
            let y = ws.y.get_mut(n * d);
            if *fast {
                grouped::run_groups(
                    bank,
                    groups.experts,
                    groups.offsets,
                    x,
                    &mut ws.h,
                    y,
                    groups.plan_max_rows,
                    *kernels,
                )?;
            } else {
                per_expert(bank, groups.experts, groups.offsets, x, y, d)?;
            }
            Array2::from_shape_vec((n, d), ws.y.get(n * d).to_vec())
                .map_err(|e| internal(&e.to_string()))
        })
    }

    fn forward_train(
        &mut self,
        groups: &ExpertGroups<'_>,
        rows: ArrayView2<'_, f32>,
    ) -> Result<(usize, Array2<f32>), MoeError> {
        self.train_forward(groups, rows)
    }

    fn backward(
        &mut self,
        batch: usize,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        self.train_backward(batch, d_out)
    }

    fn take_grads(&mut self) -> Result<Vec<Grad>, MoeError> {
        self.take()
    }
}

impl CpuLayer {
    /// Fails for a layer whose routed bank runs on its own path (stored, PEER): no remote frame there.
    fn remote_frame(&self) -> Result<(), MoeError> {
        if self.store.is_some() || self.peer.is_some() {
            return Err(MoeError::Unsupported {
                owner: format!("a layer with a {} routed bank", self.layer.experts().kind()),
                feature: "remote experts (expert parallelism) on the cpu backend".into(),
            });
        }
        Ok(())
    }

    /// [`moe_core::DeviceLayer::forward_remote`]: the fast forward's frame with the routed products from
    /// `experts`.
    pub(super) fn forward_remote_frame(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        self.remote_frame()?;
        let (layer, pool, ws, kernels) = (&self.layer, &self.pool, &mut self.ws, self.kernels);
        let routing = in_pool(pool, || store::route_gather(layer, input, ws))?;
        let (n, d) = (routing.n_slots(), input.hidden.ncols());
        let x = ArrayView2::from_shape((n, d), ws.x.get(n * d))
            .map_err(|e| internal(&e.to_string()))?;
        let y = experts.forward(&routing, x, false)?;
        copy_returned(&y, ws.y.get_mut(n * d), d, "remote experts' outputs")?;
        in_pool(pool, || {
            store::combine_rest(layer, input, ws, kernels, routing)
        })
    }
}
