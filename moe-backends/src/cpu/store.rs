//! The CPU backend's expert store: a layer whose routed bank is an [`ExpertBank::Stored`] keeps `slots` resident
//! experts in a slot bank and fetches the missing experts of each group from the bank's [`ExpertSource`] before
//! the group runs; prefetches load on a background thread (`cpu/store_loader.rs`). Also home of the fast
//! forward's frame ([`forward_with`]: route, gather, experts, combine), which the all-resident and the stored
//! forward share.
//!
//! Bit-identity with the all-resident layer: a group of experts runs on the slot bank with the kernels and tile
//! shapes of the one call over the whole plan (`grouped::run_groups` with the plan's largest group), and a slot
//! holds exactly the values of its expert (a load fills every tensor or the slot is invalidated), so every output
//! value is computed by the same kernel call on the same numbers as the all-resident forward.

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use moe_core::store::cache::{Placement, SlotCache};
use moe_core::store::{ExpertForm, ExpertSource, StoreStats};
use moe_core::{ExpertBank, LayerOutput, MoeError, MoeLayer, RouterInput, Routing};

use super::grouped::{self, AlignedBuf, Workspace};
use super::kernels::{self, Kernels};
use super::store_loader::{Loader, SlotDst};
use super::{combine, expert_forward, finish, internal};

/// What a layer with a stored bank keeps on the CPU: the resident slots, which expert sits where, the source,
/// the prefetch thread and the counters.
#[derive(Debug)]
pub(super) struct StoreState {
    source: Arc<dyn ExpertSource>,
    form: ExpertForm,
    /// The resident slots: a bank of `slots` experts of the form (`[slots, ...]` per tensor), 64-byte aligned.
    bank: ExpertBank,
    cache: SlotCache,
    loader: Loader,
    bytes_read: u64,
    demand_load_ms: f64,
    prefetch_load_ms: f64,
    wait_ms: f64,
}

impl Drop for StoreState {
    fn drop(&mut self) {
        // Prefetches in flight write into the slot bank: collect them before the bank is freed.
        let _ = self.loader.wait_all();
    }
}

impl StoreState {
    /// The store of `layer` when its routed bank is stored, `None` otherwise.
    ///
    /// # Errors
    /// The policy's build error (Belady's MIN is offline: a live store has no future to build it from; `pin`
    /// without frequencies); [`MoeError::TooLarge`] when the slots do not fit in memory.
    pub(super) fn for_layer(layer: &MoeLayer) -> Result<Option<Self>, MoeError> {
        let ExpertBank::Stored(sb) = layer.experts() else {
            return Ok(None);
        };
        let slots = sb.slots();
        let cache = sb.new_cache()?;
        let mut bank = sb.form().zeros(slots)?;
        bank.align_weights(64);
        // Touch every page of the slots now: fresh zeroed memory is mapped lazily, and a first write costs a page
        // fault per 4 KiB (measured: loads into never-used slots 6x slower than into reused ones). The slots are
        // the store's budget, so they are resident from upload on.
        for mut p in bank.params_mut() {
            p.value.fill(0.0);
        }
        Ok(Some(StoreState {
            source: Arc::clone(sb.source()),
            form: sb.form().clone(),
            bank,
            cache,
            loader: Loader::new(Arc::clone(sb.source())),
            bytes_read: 0,
            demand_load_ms: 0.0,
            prefetch_load_ms: 0.0,
            wait_ms: 0.0,
        }))
    }

    /// The counters so far (prefetches still in flight are counted when a forward or prefetch collects them).
    pub(super) fn stats(&self) -> StoreStats {
        StoreStats {
            slots: self.cache.slots(),
            cache: self.cache.stats(),
            bytes_read: self.bytes_read,
            demand_load_ms: self.demand_load_ms,
            prefetch_load_ms: self.prefetch_load_ms,
            wait_ms: self.wait_ms,
            // Prefetches load into their slots: no memory beyond them.
            staging_bytes: 0,
        }
    }

    /// One forward of `layer` (whose routed bank is this store's) on `input`: collects prefetches in flight,
    /// then runs the plan group by group ([`SlotCache::groups`]), loading each group's missing experts first.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward`](moe_core::DeviceLayer::forward); a failed load (demand, or a prefetch
    /// collected now) is [`MoeError::Expert`] naming the expert, its slot is emptied and no output is returned.
    pub(super) fn forward(
        &mut self,
        layer: &MoeLayer,
        input: &RouterInput<'_>,
        ws: &mut Workspace,
        kernels: Kernels,
    ) -> Result<LayerOutput, MoeError> {
        self.settle()?;
        forward_with(layer, input, ws, kernels, |routing, x, h, y| {
            self.run_plan(routing, x, h, y, kernels)
        })
    }

    /// Places `experts` (the caller's guess of the next experts; ids `>= E` and repeats skipped) in the slots
    /// and queues their loads on the background thread, after collecting the loads of earlier prefetches.
    ///
    /// # Errors
    /// A failed earlier prefetch ([`MoeError::Expert`] naming it; its slot is emptied); the thread cannot start.
    pub(super) fn prefetch(&mut self, experts: &[u32]) -> Result<(), MoeError> {
        self.settle()?;
        let placements = self.cache.prefetch(experts);
        if placements.is_empty() {
            return Ok(());
        }
        // Each placement's slot goes to the loader thread, which alone touches it until `settle` collects it.
        let mut views = slot_views(&mut self.bank, &self.form, self.cache.slots())?;
        for (i, p) in placements.iter().enumerate() {
            let dst = views
                .get_mut(p.slot)
                .map(std::mem::take)
                .ok_or_else(|| internal("prefetch: a placement outside the slots"))?;
            if let Err(e) = self.loader.submit(p.expert, p.slot, SlotDst::new(dst)) {
                // Nothing was queued for this one and the rest: their slots hold nothing usable.
                for q in &placements[i..] {
                    self.cache.invalidate(q.slot);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits for the loads in flight (the wait is `wait_ms`; they wrote their slots in place), and
    /// empties the slot of each failed one; the first failure is returned after all are collected.
    fn settle(&mut self) -> Result<(), MoeError> {
        if !self.loader.busy() {
            return Ok(());
        }
        let start = Instant::now();
        let done = self.loader.wait_all();
        self.wait_ms += ms_since(start);
        let per_expert = self.source.stored_bytes_per_expert();
        let mut first_err = None;
        for d in done {
            self.prefetch_load_ms += d.ms;
            match d.result {
                Ok(()) => self.bytes_read += per_expert,
                Err(e) => {
                    // The slot may hold part of the expert: emptied, never used.
                    self.cache.invalidate(d.slot);
                    first_err.get_or_insert(name_expert(e, d.expert, self.source.as_ref()));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The routed experts of `routing` on the gathered rows `x` into `y` (both `[rows, d]`, expert-major), one
    /// group of at most `slots` experts at a time: admit, load the missing, run the group's rows on its slots.
    fn run_plan(
        &mut self,
        routing: &Routing,
        x: &[f32],
        h: &mut AlignedBuf,
        y: &mut [f32],
        kernels: Kernels,
    ) -> Result<(), MoeError> {
        let d = self.form.d_model();
        let offsets = routing.offsets();
        // The whole plan's largest group picks the tiles' column blocks, as in the all-resident forward.
        let max_rows = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let groups: Vec<&[u32]> = self.cache.groups(routing.active_experts()).collect();
        let (mut slots, mut rebased) = (Vec::new(), Vec::new());
        let mut g0 = 0;
        for group in groups {
            let g1 = g0 + group.len();
            let placements = self.cache.admit(group)?;
            self.load_missing(&placements)?;
            slots.clear();
            slots.extend(placements.iter().map(|p| p.slot as u32));
            let bounds = offsets
                .get(g0..=g1)
                .ok_or_else(|| internal("stored forward: plan offsets shorter than its experts"))?;
            rebased.clear();
            rebased.extend(bounds.iter().map(|&o| o - bounds[0]));
            let rows = bounds[0] * d..bounds[g1 - g0] * d;
            let (xs, ys) = (x.get(rows.clone()), y.get_mut(rows));
            let (Some(xs), Some(ys)) = (xs, ys) else {
                return Err(internal(
                    "stored forward: rows outside the gathered buffers",
                ));
            };
            grouped::run_groups(&self.bank, &slots, &rebased, xs, h, ys, max_rows, kernels)?;
            g0 = g1;
        }
        Ok(())
    }

    /// Loads the placements marked `load` into their slots, in parallel (a source is `Sync`); the time is
    /// `demand_load_ms`. A failed load empties its slot; the first failure is returned after all finished.
    fn load_missing(&mut self, placements: &[Placement]) -> Result<(), MoeError> {
        if !placements.iter().any(|p| p.load) {
            return Ok(());
        }
        let start = Instant::now();
        let mut views = slot_views(&mut self.bank, &self.form, self.cache.slots())?;
        let mut jobs = Vec::new();
        for p in placements.iter().filter(|p| p.load) {
            let dst = views
                .get_mut(p.slot)
                .map(std::mem::take)
                .ok_or_else(|| internal("stored forward: a placement outside the slots"))?;
            jobs.push((*p, dst));
        }
        let source = self.source.as_ref();
        let results: Vec<(Placement, Result<(), MoeError>)> = jobs
            .into_par_iter()
            .map(|(p, mut dst)| {
                let r = source.load(p.expert as usize, &mut dst);
                (p, r.map_err(|e| name_expert(e, p.expert, source)))
            })
            .collect();
        self.demand_load_ms += ms_since(start);
        let per_expert = self.source.stored_bytes_per_expert();
        let mut first_err = None;
        for (p, r) in results {
            match r {
                Ok(()) => self.bytes_read += per_expert,
                Err(e) => {
                    self.cache.invalidate(p.slot);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Per slot, its tensors' slices of the slot bank (`[slots, ...]` per tensor, slot `s` the `s`-th chunk of
/// [`ExpertForm::tensors`]' size), in the form's tensor order: the destination of a load into the slot.
///
/// # Errors
/// [`MoeError::Backend`] when the slot bank's tensors do not have the form's sizes (a bug).
fn slot_views<'a>(
    bank: &'a mut ExpertBank,
    form: &ExpertForm,
    slots: usize,
) -> Result<Vec<Vec<&'a mut [f32]>>, MoeError> {
    let tensors = form.tensors();
    let params = bank.params_mut();
    if params.len() != tensors.len() {
        return Err(internal("slot bank: tensors differ from the form's"));
    }
    let mut out: Vec<Vec<&'a mut [f32]>> = (0..slots).map(|_| Vec::new()).collect();
    for (param, (name, n)) in params.into_iter().zip(tensors) {
        let all = param
            .value
            .into_slice()
            .filter(|a| a.len() == n * slots)
            .ok_or_else(|| internal(&format!("slot bank: tensor {name} is not [slots, {n}]")))?;
        if n == 0 {
            out.iter_mut().for_each(|v| v.push(Default::default()));
        } else {
            for (v, chunk) in out.iter_mut().zip(all.chunks_exact_mut(n)) {
                v.push(chunk);
            }
        }
    }
    Ok(out)
}

/// `err` as an error naming `expert`: kept when it already names it, else wrapped with the source's description.
fn name_expert(err: MoeError, expert: u32, source: &dyn ExpertSource) -> MoeError {
    match err {
        MoeError::Expert { expert: e, .. } if e == expert as usize => err,
        other => MoeError::Expert {
            expert: expert as usize,
            reason: format!("loading it from {}: {other}", source.describe()),
        },
    }
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// The fast forward's frame: routes, gathers each active expert's rows (`x`, `[rows, d]`, expert-major as the
/// plan's offsets), lets `experts` write the routed experts' outputs (`y`, `[rows, d]`; `h` is the hidden
/// workspace), then combines them and adds the shared experts and the output bias ([`route_gather`], then
/// [`combine_rest`]).
pub(super) fn forward_with(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut Workspace,
    kernels: Kernels,
    experts: impl FnOnce(&Routing, &[f32], &mut grouped::AlignedBuf, &mut [f32]) -> Result<(), MoeError>,
) -> Result<LayerOutput, MoeError> {
    let routing = route_gather(layer, input, ws)?;
    let rows = routing.n_slots() * input.hidden.ncols();
    experts(&routing, ws.x.get(rows), &mut ws.h, ws.y.get_mut(rows))?;
    combine_rest(layer, input, ws, kernels, routing)
}

/// The first part of [`forward_with`]: routes `input` and gathers each active expert's rows into `ws.x`
/// (`[slots, d]`, expert-major as the plan's offsets).
///
/// # Errors
/// The router's errors.
pub(super) fn route_gather(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut Workspace,
) -> Result<Routing, MoeError> {
    let routing = layer.route(input)?;
    let d = input.hidden.ncols();
    let rows = routing.n_slots();
    let offsets = routing.offsets();
    // Gather each active expert's rows into one contiguous block.
    let x = ws.x.get_mut(rows * d);
    let slot_tokens = routing.slot_tokens();
    kernels::par_tiles(x, d, offsets, d, d.max(1), |g, _, mut tile| {
        for i in 0..tile.rows() {
            let tok = slot_tokens[offsets[g] + i] as usize;
            tile.row_mut(i)
                .iter_mut()
                .zip(input.hidden.row(tok).iter())
                .for_each(|(o, &v)| *o = v);
        }
        Ok(())
    })?;
    Ok(routing)
}

/// The rest of [`forward_with`] once the routed experts' outputs are in `ws.y` (`[slots, d]`, the plan's order):
/// the weighted combine, the shared experts (on the grouped path when their bank runs there) and the output bias.
///
/// # Errors
/// Shared experts' errors; [`MoeError::Backend`] for inconsistent buffers.
pub(super) fn combine_rest(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    ws: &mut Workspace,
    kernels: Kernels,
    routing: Routing,
) -> Result<LayerOutput, MoeError> {
    let (t, d) = input.hidden.dim();
    let rows = routing.n_slots();
    routing.token_slots_into(&mut ws.token_offsets, &mut ws.token_slots);
    let mut output = combine::combine(
        &ws.token_offsets,
        &ws.token_slots,
        routing.slot_weights(),
        ws.y.get(rows * d),
        t,
        d,
        layer.output_scale(),
    )?;
    if let Some(shared) = layer.shared() {
        if grouped::supports(shared.bank()) {
            // The shared expert is one more group holding every token; the routed experts' buffers are free now.
            // A contiguous input is read in place; any other layout is copied into the row workspace first.
            let x = match input.hidden.as_slice() {
                Some(x) => x,
                None => {
                    let x = ws.x.get_mut(t * d);
                    for (row, src) in x.chunks_exact_mut(d.max(1)).zip(input.hidden.outer_iter()) {
                        row.iter_mut().zip(src.iter()).for_each(|(o, &v)| *o = v);
                    }
                    ws.x.get(t * d)
                }
            };
            let y = ws.y.get_mut(t * d);
            grouped::run_bank(shared.bank(), &[0], &[0, t], x, &mut ws.h, y, kernels)?;
            let ys = ndarray::ArrayView2::from_shape((t, d), ws.y.get(t * d))
                .map_err(|e| internal(&e.to_string()))?;
            combine::add_shared(&mut output, input.hidden, ys, shared.gate());
        } else {
            let ys = expert_forward(shared.bank(), 0, input.hidden)?;
            combine::add_shared(&mut output, input.hidden, ys.view(), shared.gate());
        }
    }
    Ok(finish(layer, output, routing))
}
