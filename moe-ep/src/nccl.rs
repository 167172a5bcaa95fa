//! The NCCL communicator (feature `nccl`): one GPU per rank, bytes exchanged with NCCL's grouped send/recv
//! through cudarc's safe bindings (`cudarc::nccl::Comm`), every wait bounded by the communicator's timeout.
//!
//! # How it works
//! - **Start** ([`NcclComm::new`]): the ranks first talk over a bootstrap [`Communicator`] (an `MpiComm` across
//!   processes, a [`ThreadComm`](crate::ThreadComm) in one process). Each rank checks locally that the CUDA driver
//!   and libnccl load and that its GPU exists; rank 0 makes NCCL's unique id (`ncclGetUniqueId`, 128 bytes). One
//!   `all_gather` over the bootstrap shares every rank's verdict, GPU ordinal and GPU count, and rank 0's id, so a
//!   rank that cannot join makes every rank fail at once with its reason, instead of the others waiting in
//!   `ncclCommInitRank`. With thread ranks (all ranks in one process) two ranks on one GPU, or more ranks than
//!   GPUs, are refused before NCCL sees them: NCCL refuses two ranks on one GPU. Then `ncclCommInitRank`
//!   (`Comm::from_rank`) on a stream of its own.
//! - **A worker thread per rank** owns the CUDA context, the stream and the NCCL communicator; the
//!   [`NcclComm`] sends it each operation over a channel and waits for the answer with
//!   [`Communicator::timeout`] (plus [`ABORT_GRACE`]). The worker polls a CUDA event recorded after the NCCL
//!   calls (`cuEventQuery`, every 50 µs) until the timeout; past it, it drops the communicator, which calls
//!   `ncclCommAbort` (cudarc's `Drop for Comm`) and so stops the kernels that wait for a peer, and answers with
//!   [`MoeError::Communication`]. A worker blocked inside an NCCL call itself (`ncclCommInitRank` waiting for a
//!   rank that never came, `ncclGroupEnd` connecting to a stalled peer) cannot be interrupted from outside with
//!   cudarc's safe API: the caller stops waiting after the grace, returns the error and leaves that thread behind.
//!   Either way the caller never hangs. After any failure the communicator is spent: every later call fails at
//!   once, naming the first failure.
//! - **`all_to_all_v`** is NCCL's documented all-to-all-v recipe
//!   (<https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/usage/p2p.html#all-to-all-v>): first the counts,
//!   one `u64` per peer, by grouped `ncclSend`/`ncclRecv` pairs, so each rank knows how many bytes come from each
//!   peer; then the send buffer is copied to the GPU, one grouped `ncclSend`/`ncclRecv` pair per peer with a
//!   non-empty message (`ncclGroupStart` … `ncclGroupEnd`), and the receive buffer is copied back. A rank's own
//!   message never leaves the host. The calls each rank makes are `transfers`, a pure function tested without a
//!   GPU.
//! - **`barrier`**: an `ncclAllReduce` of one `f32` (sum; the result must be the rank count).
//! - **`all_reduce_sum`** keeps the contract's provided method (an all-gather, then the sum in rank order), so the
//!   bits are the same on every rank and the same as with MPI or threads; NCCL's own all-reduce orders its sums
//!   by its ring or tree and would not be.
//!
//! # Libraries at run time
//! cudarc loads `libcuda` and `libnccl` when first used (`dynamic-loading`), so building needs neither. cudarc
//! 0.19.10 built for CUDA 13 looks for `libnccl.so`, `libnccl.so.13`, `.12`, `.11`, `.10`, `.9` and `.1` on the
//! loader's path, **not `libnccl.so.2`**, the name NCCL's runtime packages install (Debian's `libnccl2`, pip's
//! `nvidia-nccl-cu12`): install the development package (`libnccl-dev`, which adds the `libnccl.so` link) or make
//! the link yourself in a directory on `LD_LIBRARY_PATH`. [`NcclComm::available`] says which is missing.
//!
//! # What was and was not run
//! Built, clippy-checked (`cargo clippy -p moe-ep --features nccl --all-targets -- -D warnings`) and unit-tested
//! (`cargo test -p moe-ep --features nccl`) on a 2-core machine with neither a GPU nor libnccl: the tests there
//! cover the transfer plan, the bootstrap messages and their checks, and that starting without a GPU or libnccl
//! is a clear error on every rank, not a panic. The GPU tests (`moe-ep/tests/nccl.rs`: all-to-all-v against
//! thread ranks, all-reduce, barrier, a rank that leaves) need one GPU per rank, two at least, and have **not been
//! run**: no multi-GPU machine was lent. Run them with
//! `MOE_REQUIRE_GPU=nccl cargo test -p moe-ep --features nccl --test nccl` on a machine with two or more GPUs.
//! Never run at all, so unproven on hardware: `ncclCommInitRank` through cudarc, the grouped send/recv, the
//! event-polled timeout and the abort path. With one GPU only the start test's refusal of two thread ranks runs.

use std::ffi::c_char;
use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp, group_end, group_start};
use moe_core::MoeError;

use crate::comm::{Communicator, Exchanged, check_counts, comm_error};

/// How much longer than its timeout a caller waits for the worker thread's answer: the worker reports a timeout
/// itself and aborts the communicator; the grace covers that abort. Past it the worker is taken to be blocked
/// inside NCCL and is left behind.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// Bytes in NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// How often the worker polls the stream's completion (`cuEventQuery`) while it waits for NCCL.
const POLL: Duration = Duration::from_micros(50);

/// One rank of an NCCL communicator on one GPU. Built collectively by [`NcclComm::new`]; each operation is run by
/// the rank's worker thread (see the module doc), every wait bounded by [`Communicator::timeout`].
#[derive(Debug)]
pub struct NcclComm {
    rank: usize,
    size: usize,
    ordinal: usize,
    timeout: Duration,
    jobs: Option<Sender<Job>>,
    replies: Receiver<Result<Reply, String>>,
    worker: Option<JoinHandle<()>>,
    /// The first failure: once set, every call fails at once.
    spent: Option<String>,
}

/// What the caller asks the worker thread to do.
#[derive(Debug)]
enum Job {
    AllToAll {
        send: Vec<u8>,
        counts: Vec<usize>,
        timeout: Duration,
    },
    Barrier {
        timeout: Duration,
    },
}

/// What the worker answers.
#[derive(Debug)]
enum Reply {
    Ready,
    Exchanged(Exchanged),
    Done,
}

impl NcclComm {
    /// Joins the NCCL communicator of the `bootstrap` group's ranks, this rank on GPU `device_ordinal`
    /// (collective: every rank of `bootstrap` calls it). Rank `r` of `bootstrap` is rank `r` here; the timeout
    /// starts as the bootstrap's. With a [`ThreadComm`](crate::ThreadComm) bootstrap (ranks in one process) every
    /// rank needs a GPU of its own: the ordinals must differ and the GPU count must be at least the rank count.
    ///
    /// # Errors
    /// [`MoeError::Communication`] (op `nccl init`), on every rank, when some rank cannot join: no CUDA driver,
    /// no libnccl (see the module doc for the file names), no GPU `device_ordinal`, two thread ranks on one GPU,
    /// fewer GPUs than thread ranks, `ncclGetUniqueId` or `ncclCommInitRank` failing, or the start not done
    /// within the timeout (plus [`ABORT_GRACE`]); the bootstrap's own errors.
    pub fn new(bootstrap: &mut dyn Communicator, device_ordinal: usize) -> Result<Self, MoeError> {
        let (rank, size, timeout) = (bootstrap.rank(), bootstrap.size(), bootstrap.timeout());
        let mine = std::panic::catch_unwind(|| local_hello(device_ordinal, rank == 0))
            .unwrap_or_else(|_| {
                Hello::Failed("cudarc panicked while probing CUDA and NCCL".into())
            });
        let all = bootstrap.all_gather(&mine.encode())?;
        let hellos = (0..all.sources())
            .map(|src| {
                Hello::decode(all.from(src)).map_err(|why| {
                    comm_error(
                        "nccl init",
                        rank,
                        format!("rank {src}'s start message: {why}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let id = check_hellos(&hellos, rank, size, bootstrap.name() == "threads")
            .map_err(|why| comm_error("nccl init", rank, why))?;
        let (jobs, job_rx) = mpsc::channel();
        let (reply_tx, replies) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("nccl-rank-{rank}"))
            .spawn(move || worker_main(device_ordinal, rank, size, id, &job_rx, &reply_tx));
        let worker = spawned.map_err(|e| {
            comm_error(
                "nccl init",
                rank,
                format!("cannot start the worker thread: {e}"),
            )
        })?;
        let mut comm = NcclComm {
            rank,
            size,
            ordinal: device_ordinal,
            timeout,
            jobs: Some(jobs),
            replies,
            worker: Some(worker),
            spent: None,
        };
        comm.answer("nccl init")?;
        Ok(comm)
    }

    /// `Ok(number of GPUs)` when the CUDA driver and libnccl load, else why not: what tests check before
    /// starting ranks. Probes only; starts nothing.
    ///
    /// # Errors
    /// The reason, as text: no driver, no libnccl, no GPU, or the driver's error.
    pub fn available() -> Result<usize, String> {
        libraries_present()?;
        let count = CudaContext::device_count()
            .map_err(|e| format!("the CUDA driver cannot count GPUs: {e}"))?;
        match usize::try_from(count) {
            Ok(0) | Err(_) => Err("the CUDA driver sees no GPU".into()),
            Ok(n) => Ok(n),
        }
    }

    /// The GPU this rank runs on (CUDA device ordinal).
    pub fn device_ordinal(&self) -> usize {
        self.ordinal
    }

    /// Sends `job` to the worker and waits for its answer.
    fn call(&mut self, op: &str, job: Job) -> Result<Reply, MoeError> {
        if let Some(first) = &self.spent {
            return Err(comm_error(
                op,
                self.rank,
                format!("the NCCL communicator was aborted after an earlier failure: {first}"),
            ));
        }
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        if !matches!(sent, Some(Ok(()))) {
            let why = "the NCCL worker thread has ended".to_string();
            self.spent = Some(why.clone());
            return Err(comm_error(op, self.rank, why));
        }
        self.answer(op)
    }

    /// Waits for the worker's answer within the timeout plus [`ABORT_GRACE`].
    fn answer(&mut self, op: &str) -> Result<Reply, MoeError> {
        let why = match self.replies.recv_timeout(self.timeout + ABORT_GRACE) {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(why)) => why,
            Err(RecvTimeoutError::Timeout) => format!(
                "no answer within the timeout of {:.1} s (+{} s grace): a peer stalled or died while NCCL was \
                 blocked in a call (ncclCommInitRank or ncclGroupEnd); the rank's worker thread is left behind",
                self.timeout.as_secs_f64(),
                ABORT_GRACE.as_secs()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                "the NCCL worker thread ended without answering (a panic in cudarc: see stderr)"
                    .to_string()
            }
        };
        self.spent = Some(why.clone());
        Err(comm_error(op, self.rank, why))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop; it drops the NCCL communicator (`ncclCommAbort`). A worker
        // that may be blocked inside NCCL is not waited for.
        self.jobs = None;
        if self.spent.is_none()
            && let Some(worker) = self.worker.take()
        {
            let _ = worker.join();
        }
    }
}

impl Communicator for NcclComm {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn all_to_all_v(&mut self, send: &[u8], counts: &[usize]) -> Result<Exchanged, MoeError> {
        check_counts(self.rank, self.size, send.len(), counts)?;
        let job = Job::AllToAll {
            send: send.to_vec(),
            counts: counts.to_vec(),
            timeout: self.timeout,
        };
        match self.call("all_to_all_v", job)? {
            Reply::Exchanged(got) => Ok(got),
            other => Err(comm_error(
                "all_to_all_v",
                self.rank,
                format!("the worker answered {other:?}"),
            )),
        }
    }

    fn barrier(&mut self) -> Result<(), MoeError> {
        let timeout = self.timeout;
        match self.call("barrier", Job::Barrier { timeout })? {
            Reply::Done => Ok(()),
            other => Err(comm_error(
                "barrier",
                self.rank,
                format!("the worker answered {other:?}"),
            )),
        }
    }
}

/// `Ok` when both the CUDA driver and libnccl load, else which does not.
#[allow(
    unsafe_code,
    reason = "cudarc's library probes are `unsafe fn`s; they only try to load the shared libraries"
)]
fn libraries_present() -> Result<(), String> {
    // SAFETY: `is_culib_present` tries `dlopen` on the library's candidate names and calls nothing in them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "the CUDA driver library (libcuda.so) was not found: this machine has no NVIDIA driver"
                .into(),
        );
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(
            "libnccl was not found: cudarc looks for libnccl.so (not libnccl.so.2): install libnccl-dev or link \
             libnccl.so to libnccl.so.2 in a directory on LD_LIBRARY_PATH"
                .into(),
        );
    }
    Ok(())
}

/// What a rank tells the others over the bootstrap before NCCL starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hello {
    /// Ready to join on GPU `ordinal` of `devices`; rank 0 adds NCCL's unique id.
    Ready {
        ordinal: u64,
        devices: u64,
        id: Option<[u8; ID_BYTES]>,
    },
    /// Cannot join, and why.
    Failed(String),
}

impl Hello {
    /// Wire format: `[1] ordinal u64 LE, devices u64 LE, (id: 128 bytes)?` or `[0] reason (UTF-8)`.
    fn encode(&self) -> Vec<u8> {
        match self {
            Hello::Ready {
                ordinal,
                devices,
                id,
            } => {
                let mut out = vec![1u8];
                out.extend_from_slice(&ordinal.to_le_bytes());
                out.extend_from_slice(&devices.to_le_bytes());
                if let Some(id) = id {
                    out.extend_from_slice(id);
                }
                out
            }
            Hello::Failed(why) => {
                let mut out = vec![0u8];
                out.extend_from_slice(why.as_bytes());
                out
            }
        }
    }

    fn decode(bytes: &[u8]) -> Result<Hello, String> {
        let u64_at = |at: usize| -> Option<u64> {
            let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        };
        match bytes.first() {
            Some(0) => Ok(Hello::Failed(
                String::from_utf8_lossy(&bytes[1..]).into_owned(),
            )),
            Some(1) => {
                let (Some(ordinal), Some(devices)) = (u64_at(1), u64_at(9)) else {
                    return Err(format!("{} bytes, too short", bytes.len()));
                };
                let id =
                    match &bytes[17.min(bytes.len())..] {
                        [] => None,
                        rest => Some(<[u8; ID_BYTES]>::try_from(rest).map_err(|_| {
                            format!("an id of {} bytes, not {ID_BYTES}", rest.len())
                        })?),
                    };
                Ok(Hello::Ready {
                    ordinal,
                    devices,
                    id,
                })
            }
            Some(other) => Err(format!("unknown kind {other}")),
            None => Err("empty".into()),
        }
    }
}

/// This rank's [`Hello`]: the libraries load, GPU `ordinal` exists, and (on rank 0) NCCL's unique id.
fn local_hello(ordinal: usize, make_id: bool) -> Hello {
    let devices = match NcclComm::available() {
        Ok(n) => n,
        Err(why) => return Hello::Failed(why),
    };
    if ordinal >= devices {
        return Hello::Failed(format!(
            "GPU {ordinal} does not exist: this machine has {devices} (ordinals 0..{devices})"
        ));
    }
    let id = if make_id {
        match Id::new() {
            Ok(id) => Some(id.internal().map(|c| c as u8)),
            Err(e) => return Hello::Failed(format!("ncclGetUniqueId failed: {:?}", e.0)),
        }
    } else {
        None
    };
    Hello::Ready {
        ordinal: ordinal as u64,
        devices: devices as u64,
        id,
    }
}

/// Checks every rank's [`Hello`] (index = rank) and returns rank 0's unique id. `same_process`: the ranks are
/// threads of this process, so their GPUs are this machine's and must all differ.
///
/// # Errors
/// The first rank that cannot join and why; rank 0 without an id; with `same_process`, fewer GPUs than ranks or
/// two ranks on one GPU.
fn check_hellos(
    hellos: &[Hello],
    rank: usize,
    size: usize,
    same_process: bool,
) -> Result<[u8; ID_BYTES], String> {
    if hellos.len() != size {
        return Err(format!("{} start messages for {size} ranks", hellos.len()));
    }
    let mut ordinals = Vec::with_capacity(size);
    for (src, hello) in hellos.iter().enumerate() {
        match hello {
            Hello::Failed(why) => {
                let who = if src == rank {
                    "this rank".to_string()
                } else {
                    format!("rank {src}")
                };
                return Err(format!("{who} cannot join NCCL: {why}"));
            }
            Hello::Ready {
                ordinal, devices, ..
            } => ordinals.push((*ordinal, *devices)),
        }
    }
    if same_process {
        let devices = ordinals.iter().map(|&(_, d)| d).min().unwrap_or(0);
        if devices < size as u64 {
            return Err(format!(
                "{size} thread ranks need {size} GPUs, this machine has {devices}: NCCL refuses two ranks on one GPU"
            ));
        }
        for (b, &(ob, _)) in ordinals.iter().enumerate() {
            if let Some(a) = ordinals[..b].iter().position(|&(oa, _)| oa == ob) {
                return Err(format!(
                    "ranks {a} and {b} both asked for GPU {ob}: NCCL refuses two ranks on one GPU"
                ));
            }
        }
    }
    match hellos.first() {
        Some(Hello::Ready { id: Some(id), .. }) => Ok(*id),
        _ => Err("rank 0 sent no NCCL unique id".into()),
    }
}

/// Byte offsets `[counts.len() + 1]` of consecutive messages of `counts` bytes, or `None` on overflow.
pub(crate) fn offsets(counts: &[usize]) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(counts.len() + 1);
    out.push(0usize);
    for &c in counts {
        out.push(out[out.len() - 1].checked_add(c)?);
    }
    Some(out)
}

/// One peer's part of a grouped exchange: what this rank sends it and where what it sends lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transfer {
    /// The peer's rank.
    pub peer: usize,
    /// Elements of the send buffer going to `peer`; empty: no `ncclSend`.
    pub send: Range<usize>,
    /// Elements of the receive buffer coming from `peer`; empty: no `ncclRecv`.
    pub recv: Range<usize>,
}

/// The NCCL calls of one grouped exchange on `rank`, from the send and receive offsets (`[size + 1]` each):
/// one entry per other rank with something to send or receive, in rank order. This rank's own message is left
/// out (copied on the host), and so are empty messages: a peer skips a send exactly when the receiver's count
/// for it is zero, so both sides agree on which calls happen.
pub(crate) fn transfers(
    rank: usize,
    send_offsets: &[usize],
    recv_offsets: &[usize],
) -> Vec<Transfer> {
    let peers = send_offsets.len().min(recv_offsets.len()).saturating_sub(1);
    (0..peers)
        .filter(|&p| p != rank)
        .map(|p| Transfer {
            peer: p,
            send: send_offsets[p]..send_offsets[p + 1],
            recv: recv_offsets[p]..recv_offsets[p + 1],
        })
        .filter(|t| !t.send.is_empty() || !t.recv.is_empty())
        .collect()
}

/// The worker thread's state: the rank's CUDA stream and NCCL communicator (`None` once aborted).
struct Worker {
    comm: Option<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

/// The worker thread: starts NCCL on GPU `ordinal`, answers [`Reply::Ready`] or why not, then runs jobs until the
/// channel closes or one fails (then it drops the communicator, which aborts it, and ends).
fn worker_main(
    ordinal: usize,
    rank: usize,
    size: usize,
    id: [u8; ID_BYTES],
    jobs: &Receiver<Job>,
    replies: &Sender<Result<Reply, String>>,
) {
    let mut worker = match Worker::start(ordinal, rank, size, id) {
        Ok(w) => w,
        Err(why) => {
            let _ = replies.send(Err(why));
            return;
        }
    };
    if replies.send(Ok(Reply::Ready)).is_err() {
        return;
    }
    while let Ok(job) = jobs.recv() {
        let reply = match job {
            Job::AllToAll {
                send,
                counts,
                timeout,
            } => worker
                .all_to_all_v(&send, &counts, Instant::now() + timeout)
                .map(Reply::Exchanged),
            Job::Barrier { timeout } => worker
                .barrier(Instant::now() + timeout)
                .map(|()| Reply::Done),
        };
        let failed = reply.is_err();
        if replies.send(reply).is_err() || failed {
            return;
        }
    }
}

/// A driver error as text.
fn driver(what: &str, e: cudarc::driver::DriverError) -> String {
    format!("{what}: CUDA error {e}")
}

/// An NCCL error as text.
fn nccl(what: &str, e: cudarc::nccl::result::NcclError) -> String {
    format!("{what}: {:?}", e.0)
}

impl Worker {
    /// `ncclCommInitRank` for `rank` of `size` on GPU `ordinal`, on a new stream.
    fn start(
        ordinal: usize,
        rank: usize,
        size: usize,
        id: [u8; ID_BYTES],
    ) -> Result<Worker, String> {
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver(&format!("opening GPU {ordinal}"), e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver("creating a stream", e))?;
        let id = Id::uninit(id.map(|b| b as c_char));
        let comm = Comm::from_rank(Arc::clone(&stream), rank, size, id).map_err(|e| {
            format!(
                "ncclCommInitRank on GPU {ordinal}: {:?} (ncclInvalidUsage is what NCCL says when two ranks share \
                 a GPU: NCCL refuses two ranks on one GPU)",
                e.0
            )
        })?;
        Ok(Worker {
            comm: Some(comm),
            stream,
            rank,
            size,
        })
    }

    /// The NCCL communicator, unless aborted.
    fn comm(&self) -> Result<&Comm, String> {
        self.comm
            .as_ref()
            .ok_or_else(|| "the NCCL communicator was aborted".to_string())
    }

    /// Waits until the stream's work so far is done, polling a CUDA event until `deadline`.
    fn wait(&mut self, what: &str, deadline: Instant) -> Result<(), String> {
        let started = Instant::now();
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| driver("recording an event", e))?;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() >= deadline => {
                    // Abort first (cudarc's `Drop for Comm` calls `ncclCommAbort`), so that the kernels waiting
                    // for the peer end before the caller frees the buffers they use.
                    self.comm = None;
                    return Err(format!(
                        "{what} was not done after {:.1} s: a peer stalled or died; the NCCL communicator is \
                         aborted (ncclCommAbort)",
                        started.elapsed().as_secs_f64()
                    ));
                }
                Ok(false) => std::thread::sleep(POLL),
                Err(e) => return Err(driver(what, e)),
            }
        }
    }

    /// One grouped exchange: for each [`Transfer`], `ncclSend` of `send[t.send]` and `ncclRecv` into
    /// `recv[t.recv]`, between `ncclGroupStart` and `ncclGroupEnd`.
    fn grouped<T: NcclType + DeviceRepr>(
        &self,
        plan: &[Transfer],
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), String> {
        group_start().map_err(|e| nccl("ncclGroupStart", e))?;
        let enqueued = plan.iter().try_for_each(|t| {
            let peer = i32::try_from(t.peer).map_err(|_| format!("rank {} is past i32", t.peer))?;
            if !t.send.is_empty() {
                let view = send
                    .try_slice(t.send.clone())
                    .ok_or_else(|| format!("send range {:?} past the buffer", t.send))?;
                self.comm()?
                    .send(&view, peer)
                    .map_err(|e| nccl(&format!("ncclSend to rank {}", t.peer), e))?;
            }
            if !t.recv.is_empty() {
                let mut view = recv
                    .try_slice_mut(t.recv.clone())
                    .ok_or_else(|| format!("receive range {:?} past the buffer", t.recv))?;
                self.comm()?
                    .recv(&mut view, peer)
                    .map_err(|e| nccl(&format!("ncclRecv from rank {}", t.peer), e))?;
            }
            Ok::<(), String>(())
        });
        // The group is closed even when a call failed, so that the thread's NCCL group depth stays balanced.
        let ended = group_end().map_err(|e| nccl("ncclGroupEnd", e));
        enqueued?;
        ended.map(|_| ())
    }

    /// A device buffer of `len.max(1)` zeroed elements (a zero-length allocation is an error in CUDA).
    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>, String> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| driver(&format!("allocating {len} elements"), e))
    }

    /// The counts every peer sends this rank: one `u64` each way per peer (this rank's own from `counts`).
    fn exchange_counts(
        &mut self,
        counts: &[usize],
        deadline: Instant,
    ) -> Result<Vec<usize>, String> {
        let mine: Vec<u64> = counts.iter().map(|&c| c as u64).collect();
        let mut send = self.zeros::<u64>(self.size)?;
        self.stream
            .memcpy_htod(&mine, &mut send)
            .map_err(|e| driver("copying the counts to the GPU", e))?;
        let mut recv = self.zeros::<u64>(self.size)?;
        let unit = offsets(&vec![1; self.size]).ok_or("too many ranks")?;
        self.grouped(&transfers(self.rank, &unit, &unit), &send, &mut recv)?;
        self.wait("the count exchange", deadline)?;
        let got = self
            .stream
            .clone_dtoh(&recv)
            .map_err(|e| driver("copying the counts back", e))?;
        (0..self.size)
            .map(|src| {
                let c = if src == self.rank {
                    mine[src]
                } else {
                    got[src]
                };
                usize::try_from(c).map_err(|_| format!("rank {src} announced {c} bytes"))
            })
            .collect()
    }

    /// [`Communicator::all_to_all_v`] on the GPU (counts already checked by the caller).
    fn all_to_all_v(
        &mut self,
        send: &[u8],
        counts: &[usize],
        deadline: Instant,
    ) -> Result<Exchanged, String> {
        let recv_counts = self.exchange_counts(counts, deadline)?;
        let send_off = offsets(counts).ok_or("send counts overflow")?;
        let recv_off = offsets(&recv_counts).ok_or("receive counts overflow")?;
        let total = recv_off[self.size];
        let plan = transfers(self.rank, &send_off, &recv_off);
        let mut host = if plan.is_empty() {
            vec![0u8; total]
        } else {
            let mut dev_send = self.zeros::<u8>(send.len())?;
            self.stream
                .memcpy_htod(send, &mut dev_send)
                .map_err(|e| driver("copying the send buffer to the GPU", e))?;
            let mut dev_recv = self.zeros::<u8>(total)?;
            self.grouped(&plan, &dev_send, &mut dev_recv)?;
            self.wait("all_to_all_v", deadline)?;
            let mut host = self
                .stream
                .clone_dtoh(&dev_recv)
                .map_err(|e| driver("copying the received bytes back", e))?;
            host.truncate(total);
            host
        };
        let own = send_off[self.rank]..send_off[self.rank + 1];
        let dst = recv_off[self.rank]..recv_off[self.rank + 1];
        if own.len() != dst.len() {
            return Err(format!(
                "own message of {} bytes, {} expected",
                own.len(),
                dst.len()
            ));
        }
        host[dst].copy_from_slice(&send[own]);
        Exchanged::from_parts(host, &recv_counts, self.rank).map_err(|e| e.to_string())
    }

    /// [`Communicator::barrier`]: `ncclAllReduce` (sum) of one `1.0` per rank; the sum must be the rank count.
    fn barrier(&mut self, deadline: Instant) -> Result<(), String> {
        let mut one = self.zeros::<f32>(1)?;
        self.stream
            .memcpy_htod(&[1.0f32], &mut one)
            .map_err(|e| driver("copying to the GPU", e))?;
        self.comm()?
            .all_reduce_in_place(&mut one, &ReduceOp::Sum)
            .map_err(|e| nccl("ncclAllReduce", e))?;
        self.wait("barrier", deadline)?;
        let got = self
            .stream
            .clone_dtoh(&one)
            .map_err(|e| driver("copying back", e))?;
        match got.first() {
            Some(&v) if v == self.size as f32 => Ok(()),
            other => Err(format!("the all-reduce gave {other:?}, not {}", self.size)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadComm;

    fn ready(ordinal: u64, devices: u64, id: Option<[u8; ID_BYTES]>) -> Hello {
        Hello::Ready {
            ordinal,
            devices,
            id,
        }
    }

    #[test]
    fn offsets_add_up_and_overflow_is_none() {
        assert_eq!(offsets(&[3, 0, 5]), Some(vec![0, 3, 3, 8]));
        assert_eq!(offsets(&[]), Some(vec![0]));
        assert_eq!(offsets(&[usize::MAX, 1]), None);
    }

    #[test]
    fn transfers_skip_self_and_empty_messages() {
        // Rank 1 of 4 sends [2, 7, 0, 3] bytes and receives [5, 7, 0, 0].
        let send = offsets(&[2, 7, 0, 3]).expect("small");
        let recv = offsets(&[5, 7, 0, 0]).expect("small");
        let plan = transfers(1, &send, &recv);
        assert_eq!(
            plan,
            vec![
                Transfer {
                    peer: 0,
                    send: 0..2,
                    recv: 0..5
                },
                Transfer {
                    peer: 3,
                    send: 9..12,
                    recv: 12..12
                },
            ]
        );
    }

    /// For random count matrices (`m[a][b]`: bytes from a to b), what a sends b is what b expects from a, on
    /// both sides of every pair, and every byte except a rank's own message is in exactly one call.
    #[test]
    fn transfers_pair_up_across_ranks() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 4) as usize
        };
        for size in 1..6 {
            let m: Vec<Vec<usize>> = (0..size)
                .map(|_| (0..size).map(|_| next()).collect())
                .collect();
            let plans: Vec<Vec<Transfer>> = (0..size)
                .map(|r| {
                    let send = offsets(&m[r]).expect("small");
                    let col: Vec<usize> = (0..size).map(|s| m[s][r]).collect();
                    transfers(r, &send, &offsets(&col).expect("small"))
                })
                .collect();
            for a in 0..size {
                let sent: usize = plans[a].iter().map(|t| t.send.len()).sum();
                assert_eq!(
                    sent,
                    m[a].iter().sum::<usize>() - m[a][a],
                    "size {size} rank {a}"
                );
                for t in &plans[a] {
                    assert_ne!(t.peer, a);
                    assert_eq!(t.send.len(), m[a][t.peer]);
                    assert_eq!(t.recv.len(), m[t.peer][a]);
                }
                for b in (0..size).filter(|&b| b != a && m[a][b] > 0) {
                    let back = plans[b]
                        .iter()
                        .find(|t| t.peer == a)
                        .expect("the receiver posts a recv");
                    assert_eq!(back.recv.len(), m[a][b]);
                }
            }
        }
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let id = [7u8; ID_BYTES];
        for h in [
            ready(3, 8, Some(id)),
            ready(0, 1, None),
            Hello::Failed("no driver".into()),
        ] {
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
        assert!(Hello::decode(&[]).is_err());
        assert!(Hello::decode(&[2]).is_err());
        assert!(Hello::decode(&[1, 0, 0]).is_err());
        let mut short_id = ready(0, 1, None).encode();
        short_id.extend_from_slice(&[1, 2, 3]);
        assert!(
            Hello::decode(&short_id)
                .expect_err("an error")
                .contains("3 bytes")
        );
    }

    #[test]
    fn hellos_name_the_rank_that_cannot_join() {
        let id = [1u8; ID_BYTES];
        let hellos = vec![
            ready(0, 2, Some(id)),
            Hello::Failed("libnccl was not found".into()),
        ];
        let why = check_hellos(&hellos, 0, 2, false).expect_err("an error");
        assert!(why.contains("rank 1") && why.contains("libnccl"), "{why}");
        let why = check_hellos(&hellos, 1, 2, false).expect_err("an error");
        assert!(why.starts_with("this rank"), "{why}");
        assert!(check_hellos(&hellos[..1], 0, 2, false).is_err());
        let no_id = vec![ready(0, 2, None), ready(1, 2, None)];
        assert!(
            check_hellos(&no_id, 0, 2, false)
                .expect_err("an error")
                .contains("unique id")
        );
    }

    #[test]
    fn thread_ranks_need_a_gpu_each() {
        let id = [9u8; ID_BYTES];
        let ok = vec![ready(1, 2, Some(id)), ready(0, 2, None)];
        assert_eq!(check_hellos(&ok, 0, 2, true), Ok(id));
        let shared = vec![ready(0, 4, Some(id)), ready(2, 4, None), ready(0, 4, None)];
        let why = check_hellos(&shared, 0, 3, true).expect_err("an error");
        assert!(
            why.contains("ranks 0 and 2 both asked for GPU 0") && why.contains("one GPU"),
            "{why}"
        );
        // Across processes the same ordinal may be another machine's GPU: NCCL itself checks.
        assert_eq!(check_hellos(&shared, 0, 3, false), Ok(id));
        let few = vec![ready(0, 1, Some(id)), ready(1, 1, None)];
        let why = check_hellos(&few, 1, 2, true).expect_err("an error");
        assert!(
            why.contains("2 thread ranks need 2 GPUs, this machine has 1"),
            "{why}"
        );
    }

    /// Starting NCCL is collective and never panics: on a machine without a GPU or libnccl every rank gets the
    /// same clear error; with enough GPUs every rank joins.
    #[test]
    fn start_fails_cleanly_or_joins_on_every_rank() {
        let ranks = 2;
        let available = NcclComm::available();
        let results = ThreadComm::run(ranks, |mut boot| {
            let ordinal = boot.rank();
            NcclComm::new(&mut boot, ordinal).map(|c| (c.rank(), c.name()))
        })
        .expect("no rank panicked");
        match available {
            Ok(gpus) if gpus >= ranks => {
                for (r, got) in results.into_iter().enumerate() {
                    assert_eq!(got.expect("joins"), (r, "nccl"));
                }
            }
            Ok(gpus) => {
                for got in results {
                    let why = got.expect_err("too few GPUs").to_string();
                    assert!(why.contains(&format!("this machine has {gpus}")), "{why}");
                }
            }
            Err(reason) => {
                for (r, got) in results.into_iter().enumerate() {
                    let e = got.expect_err("no GPU or no libnccl");
                    assert!(matches!(&e, MoeError::Communication { rank, .. } if *rank == r));
                    let why = e.to_string();
                    assert!(why.contains("nccl init") && why.contains(&reason), "{why}");
                }
            }
        }
    }
}
