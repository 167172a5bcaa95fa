//! The training halves of expert parallelism on the CPU backend (`cpu/remote.rs` has the forward): what a
//! [`CpuExperts`] keeps per training batch, its backward and summed gradients, and the home layer's
//! `forward_train_remote` / `backward_remote` frames.

use ndarray::{Array2, ArrayView2};

use moe_core::{
    ExpertBank, ExpertGroups, Grad, LayerGrads, LayerOutput, MoeError, RemoteExperts, RouterInput,
};

use super::super::activation::Act;
use super::super::backward_ref::{BankGrads, custom_unsupported};
use super::super::grouped_train::{BankBufs, Rows, backward_bank, train_bank};
use super::super::{CpuLayer, internal, train, train_fast};
use super::{CpuExperts, check_groups, copy_returned, copy_rows, in_pool};

/// What one training forward keeps for its backward.
#[derive(Debug, Default)]
pub(super) struct Batch {
    experts: Vec<u32>,
    offsets: Vec<usize>,
    plan_max_rows: usize,
    /// `X`, `P`, `H`, `Y` of the forward; `dy` the backward's copy of `d_out`.
    bufs: BankBufs,
    /// The forward ran and its backward has not.
    pending: bool,
}

impl CpuExperts {
    /// Fails unless the bank trains here (the grouped path runs it).
    fn trainable(&self) -> Result<(), MoeError> {
        match self.bank.as_ref() {
            _ if self.fast => Ok(()),
            ExpertBank::Custom(_) => Err(custom_unsupported()),
            other => Err(MoeError::Unsupported {
                owner: format!(
                    "resident {} experts whose weights are not in standard layout",
                    other.kind()
                ),
                feature: "training on the cpu backend".into(),
            }),
        }
    }

    /// The gradient buffer of the next backward: the sums themselves after a `take_grads`, else the temporary.
    /// Returns whether it is the temporary.
    fn grad_target(&mut self) -> Result<bool, MoeError> {
        if self.sum.is_none() {
            self.sum = Some(BankGrads::zeros(&self.bank, &[])?);
            return Ok(false);
        }
        if self.tmp.is_none() {
            self.tmp = Some(BankGrads::zeros(&self.bank, &[])?);
        }
        Ok(true)
    }

    /// [`ResidentExperts::forward_train`].
    pub(super) fn train_forward(
        &mut self,
        groups: &ExpertGroups<'_>,
        rows: ArrayView2<'_, f32>,
    ) -> Result<(usize, Array2<f32>), MoeError> {
        self.trainable()?;
        let d = self.bank.d_model();
        check_groups(groups, rows, self.bank.n_experts(), d)?;
        let n = groups.rows();
        if self.live == self.batches.len() {
            self.batches.push(Batch::default());
        }
        let i = self.live;
        let batch = self
            .batches
            .get_mut(i)
            .ok_or_else(|| internal("resident experts: no batch buffer"))?;
        let Batch {
            experts,
            offsets,
            plan_max_rows,
            bufs,
            pending,
        } = batch;
        *pending = false;
        experts.clear();
        experts.extend_from_slice(groups.experts);
        offsets.clear();
        offsets.extend_from_slice(groups.offsets);
        *plan_max_rows = groups.plan_max_rows;
        let (bank, kernels) = (&self.bank, self.kernels);
        let out = in_pool(&self.pool, || {
            let x = copy_rows(&mut bufs.x, rows);
            let (p, h, y) = (&mut bufs.p, &mut bufs.h, &mut bufs.y);
            train_bank(bank, experts, offsets, x, p, h, y, *plan_max_rows, kernels)?;
            Array2::from_shape_vec((n, d), bufs.y.get(n * d).to_vec())
                .map_err(|e| internal(&e.to_string()))
        })?;
        *pending = true;
        self.live += 1;
        Ok((i, out))
    }

    /// [`ResidentExperts::backward`].
    pub(super) fn train_backward(
        &mut self,
        batch: usize,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        self.trainable()?;
        let live = self.live;
        if !self
            .batches
            .get(batch)
            .is_some_and(|b| batch < live && b.pending)
        {
            return Err(MoeError::Order {
                call: format!("backward of batch {batch}"),
                before:
                    "its forward_train (each batch has one backward; take_grads forgets them all)"
                        .into(),
            });
        }
        let (d, f) = (self.bank.d_model(), self.bank.ffn());
        let n = self.batches[batch].offsets.last().copied().unwrap_or(0);
        if d_out.dim() != (n, d) {
            return Err(MoeError::shape(
                "d_out",
                format!("[{n}, {d}] (the batch's rows)"),
                d_out.shape(),
            ));
        }
        let pw = Act::of(&self.bank).map_or(2 * f, |a| a.width(f));
        let into_tmp = self.grad_target()?;
        let Self {
            bank,
            pool,
            kernels,
            batches,
            sum,
            tmp,
            index,
            ..
        } = self;
        let grads = if into_tmp { &mut *tmp } else { &mut *sum };
        let grads = grads
            .as_mut()
            .ok_or_else(|| internal("resident experts: no gradient buffer"))?;
        let b = &mut batches[batch];
        // The batch's backward consumes it, whatever the outcome.
        b.pending = false;
        let (experts, offsets, bufs) = (&b.experts, &b.offsets, &mut b.bufs);
        in_pool(pool, || {
            let dy = copy_rows(&mut bufs.dy, d_out);
            let rows = Rows {
                x: bufs.x.get(n * d),
                p: bufs.p.get_mut(n * pw),
                h: bufs.h.get_mut(n * f),
                y: bufs.y.get_mut(n * d),
                dy,
            };
            backward_bank(
                bank,
                experts,
                offsets,
                rows,
                grads,
                index,
                b.plan_max_rows,
                *kernels,
            )
        })?;
        if into_tmp {
            let (Some(s), Some(g)) = (sum.as_mut(), tmp.as_ref()) else {
                return Err(internal("resident experts: no gradient buffer"));
            };
            add_grads(s, g)?;
        }
        Array2::from_shape_vec((n, d), bufs.y.get(n * d).to_vec())
            .map_err(|e| internal(&e.to_string()))
    }

    /// [`ResidentExperts::take_grads`].
    pub(super) fn take(&mut self) -> Result<Vec<Grad>, MoeError> {
        self.trainable()?;
        self.live = 0;
        self.batches.iter_mut().for_each(|b| b.pending = false);
        let grads = match self.sum.take() {
            Some(g) => g,
            None => BankGrads::zeros(&self.bank, &[])?,
        };
        Ok(grads
            .into_grads()
            .into_iter()
            .map(|g| Grad {
                name: format!("experts.{}", g.name),
                ..g
            })
            .collect())
    }
}

/// `sum += g`, tensor by tensor (both dense gradients of the same bank).
fn add_grads(sum: &mut BankGrads, g: &BankGrads) -> Result<(), MoeError> {
    match (sum, g) {
        (
            BankGrads::Dense { w1, b1, w2, b2, .. },
            BankGrads::Dense {
                w1: g1,
                b1: gb1,
                w2: g2,
                b2: gb2,
                ..
            },
        ) if w1.dim() == g1.dim() && w2.dim() == g2.dim() => {
            *w1 += g1;
            *w2 += g2;
            for (s, g) in [(b1, gb1), (b2, gb2)] {
                match (s, g) {
                    (Some(s), Some(g)) if s.dim() == g.dim() => *s += g,
                    (None, None) => {}
                    _ => return Err(internal("resident experts: bias gradients differ")),
                }
            }
            Ok(())
        }
        _ => Err(internal("resident experts: gradients of another shape")),
    }
}

impl CpuLayer {
    /// [`moe_core::DeviceLayer::forward_train_remote`]: the grouped training forward's frame with the routed
    /// products from `experts` (their outputs kept for the backward's `d weight`).
    pub(in crate::cpu) fn forward_train_remote_frame(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        self.remote_frame()?;
        let (layer, pool, kernels) = (&self.layer, &self.pool, self.kernels);
        let (saved, tws) = (&mut self.saved, &mut self.tws);
        let routing = in_pool(pool, || train_fast::train_gather(layer, input, saved, tws))?;
        let (n, d) = (routing.n_slots(), input.hidden.ncols());
        let r = &mut tws.routed;
        let x =
            ArrayView2::from_shape((n, d), r.x.get(n * d)).map_err(|e| internal(&e.to_string()))?;
        let y = experts.forward(&routing, x, true)?;
        copy_returned(&y, r.y.get_mut(n * d), d, "remote experts' outputs")?;
        let out = in_pool(pool, || {
            train_fast::train_combine(layer, input, saved, tws, kernels, routing)
        })?;
        saved.remote = true;
        Ok(out)
    }

    /// [`moe_core::DeviceLayer::backward_remote`]: the grouped backward's frame with the routed experts' backward
    /// done by `experts`; the returned gradients have no `experts.*` entries (their owners keep them).
    pub(in crate::cpu) fn backward_remote_frame(
        &mut self,
        d_output: ArrayView2<'_, f32>,
        d_aux: &[f32],
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerGrads, MoeError> {
        self.remote_frame()?;
        let (layer, pool, kernels) = (&self.layer, &self.pool, self.kernels);
        let (saved, tws) = (&mut self.saved, &mut self.tws);
        train::check_backward_of(saved, d_output, d_aux, true)?;
        if layer
            .shared()
            .is_some_and(|s| matches!(s.bank(), ExpertBank::Custom(_)))
        {
            return Err(custom_unsupported());
        }
        // A backward consumes its forward's state (as torch frees the graph).
        saved.ready = false;
        let saved = &*saved;
        let routing = in_pool(pool, || {
            train_fast::backward_dy(layer, saved, tws, d_output)
        })?;
        let d = saved.d;
        let r = &mut tws.routed;
        let n = routing.n_slots();
        let dy = ArrayView2::from_shape((n, d), r.dy.get(n * d))
            .map_err(|e| internal(&e.to_string()))?;
        let dx = experts.backward(routing, dy)?;
        copy_returned(
            &dx,
            r.y.get_mut(n * d),
            d,
            "remote experts' input gradients",
        )?;
        in_pool(pool, || {
            let mut none = Vec::new();
            train_fast::backward_rest(
                layer,
                saved,
                tws,
                d_output,
                d_aux,
                kernels,
                &mut none,
                Vec::new(),
            )
        })
    }
}
