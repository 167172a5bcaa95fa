//! The CUDA backend's expert store, the host-to-device tier: a layer whose routed bank is an
//! [`ExpertBank::Stored`](moe_core::ExpertBank::Stored) keeps `slots` experts resident on the GPU (a slot bank in
//! the canonical layout of [`crate::packed`], in the backend's [`Dtype`]) and copies each group's missing experts
//! from the bank's [`ExpertSource`] through pinned host staging on a copy stream of its own, ordered against the
//! compute stream by events.
//!
//! **Status: compile-checked only.** No GPU was lent to the session that wrote this file: it was built with the
//! `cuda` feature, its pure planning (`cuda/store_plan.rs`) unit-tested on the CPU, and the kernels it launches
//! are the existing product and combine kernels (no kernel was added or changed; NVRTC compiles them in CI). What
//! runs when a GPU is lent: `moe-backends/tests/cuda_store.rs` (a stored layer against the all-resident CUDA
//! layer bit for bit over several capacities and policies, and against the CPU within the CUDA tolerance), with
//! `MOE_REQUIRE_GPU=cuda cargo test -p moe-backends --features cuda --test cuda_store` on the GPU machine
//! (scripts/cuda-device.sh sets the variable); without a GPU those tests print why and return.
//!
//! # A forward
//! The layer routes on the host (a stored layer always takes the host path: the host needs the plan to know which
//! experts to fetch), then runs the plan group by group ([`SlotCache::groups`], as the CPU store): `admit` the
//! group; for each load, wait for the staging buffer's previous copy (host, on its event; counted in `wait_ms`),
//! load the expert from the source into a one-expert host bank, pack and convert it, copy it into the pinned
//! staging, and enqueue the host-to-device copy into its slot on the copy stream, which first waited for an event
//! recorded on the compute stream after the products enqueued so far (a slot is overwritten only when no launched
//! kernel still reads it); the compute stream waits for the copies' event and runs the group's two products with
//! the slot as the kernels' expert index. The order of these steps is [`store_plan::group_steps`]; the row
//! layout that lets the existing kernels take slots as experts is [`store_plan::group_layout`] (why it is
//! bit-identical is in that module's docs). Staging (`store_stage.rs`) is a ring of `RING` (4) one-expert pinned
//! buffers, so the host loads the next experts while earlier copies run.
//!
//! Prefetch ([`DeviceLayer::prefetch`](moe_core::DeviceLayer::prefetch)) keeps the core's default (no-op) on this
//! backend: every load is a demand load; `prefetch_load_ms` stays 0.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

use moe_core::store::cache::SlotCache;
use moe_core::store::{ExpertSource, StoreStats, StoredBank};
use moe_core::{ExpertBank, MoeError};

use super::BM;
use super::device::{Gpu, err};
use super::gemm::bank_products;
use super::sort::HostPlan;
use super::store_plan::{self, Step};
use super::store_stage::{RING, Sizes, Staging, enqueue_copies, load_packed, slot_bank, stage};
use super::upload::DevBank;
use super::workspace::{grow, need};
use crate::Dtype;
use crate::packed::pack;

/// What a stored layer keeps on the CUDA backend besides its slot bank (which is the layer's routed
/// [`DevBank`], `slots` experts): the slots' bookkeeping, the source, the copy stream, the pinned staging and the
/// per-forward device buffers of the slot-major layout.
pub(super) struct CudaStore {
    source: Arc<dyn ExpertSource>,
    cache: SlotCache,
    dtype: Dtype,
    sizes: Sizes,
    /// A one-expert host bank of the source's form: where the source loads into.
    host: ExpertBank,
    copy: Arc<CudaStream>,
    /// Recorded on the compute stream before a group's copies (the copy stream waits for it).
    compute_mark: CudaEvent,
    /// Recorded on the copy stream after a group's copies (the compute stream waits for it).
    copies_done: CudaEvent,
    ring: Vec<Staging>,
    next_buf: usize,
    /// Per group of a forward, the `[2·slots + 2]` meta of its products.
    metas: Vec<CudaSlice<u32>>,
    /// `[rows]` gather indices, `[rows]` slot weights and the combine's token entries, in the slot-major layout.
    idx: Option<CudaSlice<u32>>,
    weight: Option<CudaSlice<f32>>,
    entries: Option<CudaSlice<u32>>,
    bytes_read: u64,
    demand_load_ms: f64,
    wait_ms: f64,
}

impl std::fmt::Debug for CudaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStore")
            .field("source", &self.source.describe())
            .field("slots", &self.cache.slots())
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl CudaStore {
    /// The slot bank (zeroed, `sb.slots()` experts, in `dtype`) and the store of a stored bank.
    ///
    /// # Errors
    /// The policy's build error (Belady's MIN is offline; `pin` without frequencies); a form this backend does
    /// not run; [`MoeError::Unsupported`] for `dtype` int8, fp8 or mxfp4; slots beyond the address space; device errors (out of memory, pinned or device).
    pub(super) fn build(
        gpu: &Gpu,
        sb: &StoredBank,
        dtype: Dtype,
    ) -> Result<(DevBank, CudaStore), MoeError> {
        if !matches!(dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) {
            return Err(MoeError::Unsupported {
                owner: "backend cuda".into(),
                feature: format!(
                    "stored expert banks in {dtype} (stored banks run f32, bf16 and f16 weights)"
                ),
            });
        }
        let slots = sb.slots();
        let cache = sb.new_cache()?;
        let host = sb.form().zeros(1)?;
        let p = pack(&host, "cuda").map_err(|r| err(format!("stored experts: {r}")))?;
        let sizes = Sizes::of(&p);
        let bank = slot_bank(gpu, &p, sizes, slots, dtype)?;
        let fail = |what: &str, e: cudarc::driver::DriverError| err(format!("{what}: {e}"));
        let copy = gpu
            .ctx
            .new_stream()
            .map_err(|e| fail("creating the copy stream", e))?;
        let event = || {
            gpu.ctx
                .new_event(None)
                .map_err(|e| fail("creating an event", e))
        };
        let ring = (0..slots.min(RING))
            .map(|_| Staging::new(gpu, dtype, sizes))
            .collect::<Result<Vec<_>, _>>()?;
        let store = CudaStore {
            source: Arc::clone(sb.source()),
            cache,
            dtype,
            sizes,
            host,
            copy,
            compute_mark: event()?,
            copies_done: event()?,
            ring,
            next_buf: 0,
            metas: Vec::new(),
            idx: None,
            weight: None,
            entries: None,
            bytes_read: 0,
            demand_load_ms: 0.0,
            wait_ms: 0.0,
        };
        Ok((bank, store))
    }

    /// The counters so far (no prefetches on this backend: `prefetch_load_ms` is 0).
    pub(super) fn stats(&self) -> StoreStats {
        StoreStats {
            slots: self.cache.slots(),
            cache: self.cache.stats(),
            bytes_read: self.bytes_read,
            demand_load_ms: self.demand_load_ms,
            prefetch_load_ms: 0.0,
            wait_ms: self.wait_ms,
            // The pinned ring (host memory beyond the device slots).
            staging_bytes: RING as u64 * self.sizes.staging_bytes(self.dtype),
        }
    }

    /// Waits for every copy in flight (before the slot bank or the staging is freed).
    pub(super) fn quiesce(&self) {
        // A failure here has no one to report to; the context records it for the next call.
        let _ = self.copy.synchronize();
    }

    /// Enqueues the routed experts of `plan` (the host plan of this forward) group by group on `bank` (the slot
    /// bank): loads, then the two products of each group into `h` / `out` (`[max_rows, ·]`) in the slot-major
    /// layout, reading the `t` input rows of `x`. Afterwards [`CudaStore::combine_rows`] gives the combine's
    /// weights and token entries in that layout.
    ///
    /// # Errors
    /// As the all-resident forward; a failed load is [`MoeError::Expert`] naming the expert: its slot is emptied,
    /// the group's other loads still complete, and no product of that group runs.
    pub(super) fn run(
        &mut self,
        gpu: &Gpu,
        bank: &mut DevBank,
        plan: &HostPlan,
        (x, t): (&CudaSlice<f32>, usize),
        (h, out): (&CudaSlice<f32>, &CudaSlice<f32>),
        max_rows: usize,
    ) -> Result<(), MoeError> {
        let (slots, e) = (self.cache.slots(), self.cache.n_experts());
        let (active, offsets) = store_plan::active_of_meta(&plan.meta, e)?;
        let rows = plan.slot_token.len();
        let mut map = vec![0u32; rows];
        let mut idx_host = vec![0u32; rows];
        grow(gpu, &mut self.idx, rows)?;
        let groups: Vec<&[u32]> = self.cache.groups(&active).collect();
        let mut g0 = 0;
        for (gi, group) in groups.into_iter().enumerate() {
            let g1 = g0 + group.len();
            let placements = self.cache.admit(group)?;
            let bounds = offsets.get(g0..=g1).ok_or_else(|| {
                err("internal: stored forward: plan offsets shorter than its experts")
            })?;
            let layout = store_plan::group_layout(bounds, &placements, slots, BM)?;
            let (first, last) = (layout.first, layout.first + layout.dst.len());
            for (i, &to) in layout.dst.iter().enumerate() {
                map[first + i] = to;
                idx_host[to as usize] = plan.slot_token[first + i];
            }
            if self.metas.len() <= gi {
                self.metas.push(gpu.zeros(2 * slots + 2)?);
            }
            gpu.write(&layout.meta, &mut self.metas[gi])?;
            write_range(gpu, &idx_host[first..last], self.idx.as_mut(), first)?;
            let steps = store_plan::group_steps(&placements, self.ring.len(), &mut self.next_buf);
            let mut failed = None;
            for step in steps {
                match step {
                    Step::CopyWaitsCompute => {
                        record(&self.compute_mark, &gpu.stream)?;
                        wait(&self.copy, &self.compute_mark)?;
                    }
                    Step::Load { expert, slot, buf } => {
                        if let Err(e) = self.load(bank, expert, slot, buf) {
                            self.cache.invalidate(slot);
                            failed.get_or_insert(e);
                        }
                    }
                    Step::ComputeWaitsCopies => {
                        record(&self.copies_done, &self.copy)?;
                        wait(&gpu.stream, &self.copies_done)?;
                    }
                    Step::Products => {
                        if let Some(e) = failed.take() {
                            return Err(e);
                        }
                        let (idx, meta) = (need(&self.idx)?, &self.metas[gi]);
                        bank_products(gpu, bank, (x, t, Some(idx)), meta, max_rows, h, out)?;
                    }
                }
            }
            g0 = g1;
        }
        let weights = store_plan::permute(&plan.slot_weight, &map);
        gpu.write(&weights, grow(gpu, &mut self.weight, rows)?)?;
        let entries = store_plan::remap_entries(&plan.tok_slot, &map);
        gpu.write(&entries, grow(gpu, &mut self.entries, entries.len())?)?;
        Ok(())
    }

    /// The combine's `[rows]` slot weights and token entries (row + 1) in the slot-major layout of the last
    /// [`CudaStore::run`].
    pub(super) fn combine_rows(&self) -> Result<(&CudaSlice<f32>, &CudaSlice<u32>), MoeError> {
        Ok((need(&self.weight)?, need(&self.entries)?))
    }

    /// One demand load (module docs): staging `buf` free again, the expert loaded, packed and converted into it,
    /// its copies into `slot` of `bank` enqueued on the copy stream and `buf`'s event recorded after them.
    fn load(
        &mut self,
        bank: &mut DevBank,
        expert: u32,
        slot: usize,
        buf: usize,
    ) -> Result<(), MoeError> {
        let CudaStore {
            source,
            dtype,
            sizes,
            host,
            copy,
            ring,
            wait_ms,
            demand_load_ms,
            bytes_read,
            ..
        } = self;
        let st = ring
            .get_mut(buf)
            .ok_or_else(|| err("internal: stored forward: a staging buffer outside the ring"))?;
        let waited = Instant::now();
        st.copied
            .synchronize()
            .map_err(|e| err(format!("waiting for an expert copy: {e}")))?;
        *wait_ms += ms_since(waited);
        let start = Instant::now();
        let p = load_packed(source.as_ref(), host, expert)?;
        stage(st, &p, *dtype, *sizes)?;
        enqueue_copies(copy, st, bank, slot, *sizes)?;
        record(&st.copied, copy)?;
        *demand_load_ms += ms_since(start);
        *bytes_read += source.stored_bytes_per_expert();
        Ok(())
    }
}

impl Drop for CudaStore {
    fn drop(&mut self) {
        self.quiesce();
    }
}

/// Writes `src` into `dst` from element `at` on the compute stream.
fn write_range(
    gpu: &Gpu,
    src: &[u32],
    dst: Option<&mut CudaSlice<u32>>,
    at: usize,
) -> Result<(), MoeError> {
    if src.is_empty() {
        return Ok(());
    }
    let dst = dst.ok_or_else(|| err("internal: workspace"))?;
    let mut view = dst
        .try_slice_mut(at..at + src.len())
        .ok_or_else(|| err("internal: stored forward: rows outside the gather buffer"))?;
    gpu.stream
        .memcpy_htod(src, &mut view)
        .map_err(|e| err(format!("copying to the GPU: {e}")))
}

fn record(event: &CudaEvent, stream: &CudaStream) -> Result<(), MoeError> {
    event
        .record(stream)
        .map_err(|e| err(format!("recording an event: {e}")))
}

fn wait(stream: &CudaStream, event: &CudaEvent) -> Result<(), MoeError> {
    stream
        .wait(event)
        .map_err(|e| err(format!("ordering the copy and compute streams: {e}")))
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
