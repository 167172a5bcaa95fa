//! The background loader of a stored layer's prefetches: one thread per layer (started at the first prefetch)
//! that reads experts from the layer's [`ExpertSource`] into staging buffers it owns while the caller computes.
//!
//! No memory is shared mutably: a job carries its staging buffers (one `Vec<f32>` per tensor of
//! [`ExpertForm::tensors`]) to the thread and the result carries them back; the layer copies staging into the
//! resident slot when it collects the result ([`Loader::wait_all`]), and reuses the buffers for later jobs.
//! Jobs run in submission order on the one thread.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use moe_core::MoeError;
use moe_core::store::{ExpertForm, ExpertSource};

/// One expert to load into staging, for the resident slot `slot`.
struct Job {
    expert: u32,
    slot: usize,
    staging: Vec<Vec<f32>>,
}

/// A finished load: the staging buffers hold expert `expert`'s tensors (in [`ExpertForm::tensors`] order) when
/// `result` is `Ok`.
#[derive(Debug)]
pub(super) struct Done {
    /// The expert loaded.
    pub expert: u32,
    /// The resident slot it is for.
    pub slot: usize,
    /// One buffer per tensor of the form, each exactly the tensor's size.
    pub staging: Vec<Vec<f32>>,
    /// The source's answer; an error names the expert.
    pub result: Result<(), MoeError>,
    /// Milliseconds the thread spent on the load.
    pub ms: f64,
}

/// The loader thread of one stored layer, and the jobs it has not returned yet.
#[derive(Debug)]
pub(super) struct Loader {
    source: Arc<dyn ExpertSource>,
    form: ExpertForm,
    thread: Option<Worker>,
    /// (expert, slot) of each submitted job not collected yet, in submission order.
    pending: Vec<(u32, usize)>,
    /// Staging buffers of collected jobs, for reuse.
    spare: Vec<Vec<Vec<f32>>>,
    /// Staging sets allocated so far (each one expert's tensors in f32).
    allocated: usize,
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
        let form = source.form().clone();
        Loader {
            source,
            form,
            thread: None,
            pending: Vec::new(),
            spare: Vec::new(),
            allocated: 0,
        }
    }

    /// Bytes of the staging buffers allocated so far (one expert's f32 tensors per set; sets are reused, so this
    /// is the largest number of prefetches in flight at once times the expert's resident size).
    pub(super) fn staging_bytes(&self) -> u64 {
        self.allocated as u64 * self.form.resident_bytes()
    }

    /// Whether loads are in flight (submitted and not collected).
    pub(super) fn busy(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Queues a load of `expert` for slot `slot` on the thread, starting it if needed.
    ///
    /// # Errors
    /// [`MoeError::Backend`] when the thread cannot be started or has stopped.
    pub(super) fn submit(&mut self, expert: u32, slot: usize) -> Result<(), MoeError> {
        if self.thread.is_none() {
            self.thread = Some(self.spawn()?);
        }
        let staging = match self.spare.pop() {
            Some(s) => s,
            None => {
                self.allocated += 1;
                self.form
                    .tensors()
                    .iter()
                    .map(|&(_, n)| vec![0.0; n])
                    .collect()
            }
        };
        let sent = match &self.thread {
            Some(w) => w.jobs.send(Job {
                expert,
                slot,
                staging,
            }),
            None => return Err(stopped(expert)),
        };
        if sent.is_err() {
            // The thread is gone; the next submit starts a new one.
            self.stop();
            return Err(stopped(expert));
        }
        self.pending.push((expert, slot));
        Ok(())
    }

    /// Waits for every submitted load and returns them in submission order. A load the thread never answered
    /// (it stopped) comes back as an error naming its expert, with fresh staging.
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
                        staging: Vec::new(),
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

    /// Takes back staging buffers of a collected load for later jobs (buffers of another shape are dropped).
    pub(super) fn recycle(&mut self, staging: Vec<Vec<f32>>) {
        let fits = staging.len() == self.form.tensors().len()
            && staging
                .iter()
                .zip(self.form.tensors())
                .all(|(s, (_, n))| s.len() == n);
        if fits {
            self.spare.push(staging);
        }
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

    /// Closes the job channel and joins the thread (it finishes the load it is on first).
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
        self.stop();
    }
}

/// The thread's loop: load each job into its staging and send it back, until the job channel closes. A source
/// that panics is reported as a failed load of that expert (the thread goes on).
fn run(source: &dyn ExpertSource, jobs: &Receiver<Job>, done: &Sender<Done>) {
    while let Ok(mut job) = jobs.recv() {
        let start = Instant::now();
        let expert = job.expert;
        let result = {
            let mut dst: Vec<&mut [f32]> = job.staging.iter_mut().map(Vec::as_mut_slice).collect();
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
            staging: job.staging,
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
