//! The background loader of a stored layer's prefetches: one thread per layer (started at the first prefetch)
//! that reads experts from the layer's [`ExpertSource`] straight into their resident slots while the caller
//! computes. Jobs run in submission order on the one thread.
//!
//! A job carries its slot's tensors as raw parts ([`SlotDst`]), the one `unsafe` of the store: between
//! [`Loader::submit`] and the collection of its result ([`Loader::wait_all`]) the loader thread is the only one
//! that touches that slot's memory. The store keeps this so: every path that reads or writes the slot bank
//! (a forward, the next prefetch, dropping the store) collects every job first, the cache places distinct
//! experts in distinct slots, and the slot bank is never moved or freed while a job is in flight. A slot whose
//! load failed is emptied by the store, so nothing partial is used. Loading in place costs no memory beyond the
//! slots and no copy on the forward's path (a staging copy doubled the memory of a prefetching stack and cost a
//! copy per expert: measured on a Qwen3-30B-A3B-shaped stack, 1.8 GB of staging beside 2.4 GB of slots).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use moe_core::MoeError;
use moe_core::store::ExpertSource;

/// One slot's tensors (one `(pointer, length)` per tensor of the form), written by the loader thread alone until
/// its job is collected (see the module docs).
pub(super) struct SlotDst {
    parts: Vec<(*mut f32, usize)>,
}

impl SlotDst {
    /// The raw parts of `tensors` (one slot's, from the slot bank).
    pub(super) fn new(tensors: Vec<&mut [f32]>) -> Self {
        SlotDst {
            parts: tensors
                .into_iter()
                .map(|t| (t.as_mut_ptr(), t.len()))
                .collect(),
        }
    }
}

// SAFETY: a `SlotDst` points into the slot bank of the store that submitted it, which keeps that memory alive and
// untouched by any other thread until the job is collected (module docs); sending it to the loader thread moves
// the only access to that memory there.
#[allow(
    unsafe_code,
    reason = "the slot's raw parts travel to the loader thread; invariant in the module docs"
)]
unsafe impl Send for SlotDst {}

/// One expert to load into the resident slot `slot`.
struct Job {
    expert: u32,
    slot: usize,
    dst: SlotDst,
}

/// A finished load: the slot holds expert `expert`'s tensors (in [`ExpertForm::tensors`] order) when `result` is
/// `Ok`.
///
/// [`ExpertForm::tensors`]: moe_core::store::ExpertForm::tensors
#[derive(Debug)]
pub(super) struct Done {
    /// The expert loaded.
    pub expert: u32,
    /// The resident slot it went to.
    pub slot: usize,
    /// The source's answer; an error names the expert.
    pub result: Result<(), MoeError>,
    /// Milliseconds the thread spent on the load.
    pub ms: f64,
}

/// The loader thread of one stored layer, and the jobs it has not returned yet.
#[derive(Debug)]
pub(super) struct Loader {
    source: Arc<dyn ExpertSource>,
    thread: Option<Worker>,
    /// (expert, slot) of each submitted job not collected yet, in submission order.
    pending: Vec<(u32, usize)>,
}

#[derive(Debug)]
struct Worker {
    jobs: Sender<Job>,
    done: Receiver<Done>,
    handle: JoinHandle<()>,
}

impl Loader {
    /// A loader over `source` (no thread until the first [`Loader::submit`]).
    pub(super) fn new(source: Arc<dyn ExpertSource>) -> Self {
        Loader {
            source,
            thread: None,
            pending: Vec::new(),
        }
    }

    /// Whether loads are in flight (submitted and not collected).
    pub(super) fn busy(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Queues a load of `expert` into slot `slot` (its tensors `dst`) on the thread, starting it if needed. The
    /// caller must not touch the slot until it collects the job with [`Loader::wait_all`].
    ///
    /// # Errors
    /// [`MoeError::Backend`] when the thread cannot be started or has stopped (nothing was queued).
    pub(super) fn submit(
        &mut self,
        expert: u32,
        slot: usize,
        dst: SlotDst,
    ) -> Result<(), MoeError> {
        if self.thread.is_none() {
            self.thread = Some(self.spawn()?);
        }
        let sent = match &self.thread {
            Some(w) => w.jobs.send(Job { expert, slot, dst }),
            None => return Err(stopped(expert)),
        };
        if sent.is_err() {
            // The thread is gone (the job came back unsent); the next submit starts a new one.
            self.stop();
            return Err(stopped(expert));
        }
        self.pending.push((expert, slot));
        Ok(())
    }

    /// Waits for every submitted load and returns them in submission order. A load the thread never answered
    /// (it stopped) comes back as an error naming its expert; the thread is joined then, so no job is in flight
    /// when this returns.
    pub(super) fn wait_all(&mut self) -> Vec<Done> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(pending.len());
        let mut lost = false;
        for (expert, slot) in pending {
            let got = match &self.thread {
                Some(w) if !lost => w.done.recv().ok(),
                _ => None,
            };
            match got {
                Some(done) => out.push(done),
                None => {
                    lost = true;
                    out.push(Done {
                        expert,
                        slot,
                        result: Err(stopped(expert)),
                        ms: 0.0,
                    });
                }
            }
        }
        if lost {
            self.stop();
        }
        out
    }

    fn spawn(&self) -> Result<Worker, MoeError> {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel::<Done>();
        let source = Arc::clone(&self.source);
        let handle = std::thread::Builder::new()
            .name("moe-store-prefetch".into())
            .spawn(move || run(source.as_ref(), &job_rx, &done_tx))
            .map_err(|e| MoeError::Backend {
                backend: "cpu".into(),
                reason: format!("cannot start the expert prefetch thread: {e}"),
            })?;
        Ok(Worker { jobs, done, handle })
    }

    /// Closes the job channel and joins the thread (it finishes the jobs queued before it sees the close).
    fn stop(&mut self) {
        if let Some(w) = self.thread.take() {
            drop(w.jobs);
            // A thread that panicked has nothing more to say; its jobs were reported as lost.
            let _ = w.handle.join();
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Joins the thread after it has run every queued job: no job writes a slot after this.
        self.stop();
    }
}

/// The thread's loop: load each job into its slot and send the answer back, until the job channel closes. A
/// source that panics is reported as a failed load of that expert (the thread goes on).
fn run(source: &dyn ExpertSource, jobs: &Receiver<Job>, done: &Sender<Done>) {
    while let Ok(job) = jobs.recv() {
        let start = Instant::now();
        let expert = job.expert;
        let result = {
            // SAFETY: the parts were made from one slot's distinct tensors of the live slot bank, and until this
            // job's answer is collected nothing else touches them (module docs).
            #[allow(
                unsafe_code,
                reason = "the slot's tensors, rebuilt on the loader thread; invariant in the module docs"
            )]
            let mut dst: Vec<&mut [f32]> = job
                .dst
                .parts
                .iter()
                .map(|&(ptr, len)| unsafe { std::slice::from_raw_parts_mut(ptr, len) })
                .collect();
            std::panic::catch_unwind(AssertUnwindSafe(|| source.load(expert as usize, &mut dst)))
                .unwrap_or_else(|_| {
                    Err(MoeError::Expert {
                        expert: expert as usize,
                        reason: format!("loading it from {} panicked", source.describe()),
                    })
                })
        };
        let reply = Done {
            expert,
            slot: job.slot,
            result,
            ms: start.elapsed().as_secs_f64() * 1e3,
        };
        if done.send(reply).is_err() {
            return;
        }
    }
}

fn stopped(expert: u32) -> MoeError {
    MoeError::Expert {
        expert: expert as usize,
        reason: "the prefetch thread stopped before loading it".into(),
    }
}
