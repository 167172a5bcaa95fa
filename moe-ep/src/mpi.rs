//! [`MpiComm`]: the [`Communicator`] over MPI (OpenMPI through rsmpi), for ranks started by `mpirun`.
//!
//! # Design: one MPI thread, bounded waits
//! MPI cannot take back a buffer it was given: an unfinished collective can be neither cancelled (MPI 4.1 §3.8.4
//! forbids cancelling collectives) nor left behind (rsmpi's request scopes abort the process when a request is
//! dropped unfinished). So a wait bounded by a timeout cannot be a `test()` loop on the caller's thread that
//! gives up and returns: the buffers would still belong to MPI. Instead [`MpiComm::world`] starts one thread that
//! initialises MPI, owns every buffer it hands to MPI and runs the collectives (blocking calls, in order); the
//! caller sends it a job and waits for the answer for at most [`Communicator::timeout`]. When the answer does not
//! come, the call fails with [`MoeError::Communication`] (`"no answer within 60.0 s: a rank stalled or died"`)
//! and the communicator is unusable from then on: the MPI thread, stuck in a collective, keeps its buffers until
//! the process ends. The caller should then take the whole job down with [`MpiComm::abort`] (`MPI_Abort`):
//! `mpirun` ends every rank and exits with the given code.
//!
//! Cost of the design per call: one copy of the send buffer (to hand it to the MPI thread) and two thread
//! hand-offs (a few µs each), next to the collectives themselves.
//!
//! # Wire
//! [`Communicator::all_to_all_v`] is two collectives: `MPI_Alltoall` of one `u64` byte count per destination
//! (`u64::MAX` when this rank cannot send, so every rank fails at once instead of waiting for it), then
//! `MPI_Alltoallv` of the bytes. MPI counts and displacements are C `int`s: a rank's whole send or receive
//! buffer is limited to `i32::MAX` bytes (2 GiB − 1). A sender over the limit fails every rank before any byte
//! is sent; a receiver whose incoming total is over the limit fails alone, and its senders then time out.
//!
//! # Faults (OpenMPI 4.1 under `mpirun`)
//! - A rank that stalls: the others' calls fail after the timeout as above.
//! - A rank that exits without `MPI_Finalize` (a crash, `std::process::exit`): `mpirun` notices, kills every
//!   rank and exits non-zero, naming the rank that "exited improperly"; the others' calls usually never return.
//! - MPI errors themselves are fatal (the default `MPI_ERRORS_ARE_FATAL` handler): the job aborts.
//!
//! # Running
//! `mpirun -np 4 BINARY` (add `--oversubscribe` when there are more ranks than cores, `--allow-run-as-root` as
//! root). One `MpiComm` per process: MPI can be initialised only once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use moe_core::MoeError;
use mpi::Threading;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _};

use crate::comm::{Communicator, DEFAULT_TIMEOUT, Exchanged, check_counts, comm_error};

/// The count a rank sends to say it cannot send (its counts are wrong or over MPI's limit).
const CANNOT_SEND: u64 = u64::MAX;

/// Whether this process already started MPI (MPI can be initialised once per process).
static STARTED: AtomicBool = AtomicBool::new(false);

/// What the caller asks the MPI thread to do.
#[derive(Debug)]
enum Job {
    AllToAllV { send: Vec<u8>, counts: Vec<usize> },
    Barrier,
}

/// What the MPI thread reports once MPI is up: rank, size and the thread support MPI granted.
type Ready = Result<(usize, usize, Threading), MoeError>;

/// One rank of `MPI_COMM_WORLD` (see the [module docs](self) for the design, the wire and the faults).
#[derive(Debug)]
pub struct MpiComm {
    rank: usize,
    size: usize,
    threading: Threading,
    timeout: Duration,
    /// `None` once dropped: the MPI thread then finalises MPI and ends.
    jobs: Option<Sender<Job>>,
    replies: Receiver<Result<Exchanged, MoeError>>,
    worker: Option<JoinHandle<()>>,
    /// Why the communicator is unusable (a call timed out, the MPI thread ended).
    failed: Option<String>,
}

impl MpiComm {
    /// Initialises MPI (asking for `MPI_THREAD_MULTIPLE`, so that [`MpiComm::abort`] may run while the MPI thread
    /// is inside a collective) on a thread of its own and returns this process's rank of `MPI_COMM_WORLD`, with
    /// the timeout [`DEFAULT_TIMEOUT`]. MPI is finalised when the `MpiComm` is dropped.
    ///
    /// # Errors
    /// [`MoeError::Communication`] (op `init`) when MPI was already initialised in this process (a second call),
    /// when the MPI thread cannot start or `MPI_Init_thread` does not return within [`DEFAULT_TIMEOUT`].
    pub fn world() -> Result<MpiComm, MoeError> {
        if STARTED.swap(true, Ordering::SeqCst) {
            return Err(comm_error(
                "init",
                0,
                "MPI is initialised once per process and MpiComm::world() was already called",
            ));
        }
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (reply_tx, reply_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let worker = std::thread::Builder::new()
            .name("moe-ep-mpi".into())
            .spawn(move || serve(job_rx, reply_tx, ready_tx))
            .map_err(|e| comm_error("init", 0, format!("cannot start the MPI thread: {e}")))?;
        let (rank, size, threading) = match ready_rx.recv_timeout(DEFAULT_TIMEOUT) {
            Ok(ready) => ready?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(comm_error(
                    "init",
                    0,
                    format!(
                        "MPI_Init_thread did not return within {:.1} s",
                        DEFAULT_TIMEOUT.as_secs_f64()
                    ),
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(comm_error(
                    "init",
                    0,
                    "the MPI thread ended while initialising MPI",
                ));
            }
        };
        Ok(MpiComm {
            rank,
            size,
            threading,
            timeout: DEFAULT_TIMEOUT,
            jobs: Some(job_tx),
            replies: reply_rx,
            worker: Some(worker),
            failed: None,
        })
    }

    /// The thread support MPI granted (`Multiple` with Debian's OpenMPI 4.1).
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// Why the communicator is unusable (`None` while it works): after a timeout every call fails at once.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Ends every rank of the job: `MPI_Abort(MPI_COMM_WORLD, code)`; `mpirun` kills the other ranks and exits
    /// with `code` (after its own banner on stderr). The way out after a [`MoeError::Communication`]: print the
    /// error, then abort. Never returns.
    pub fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }

    /// Hands `job` to the MPI thread and waits for its answer for at most the timeout.
    fn call(&mut self, op: &str, job: Job) -> Result<Exchanged, MoeError> {
        if let Some(reason) = &self.failed {
            return Err(comm_error(
                op,
                self.rank,
                format!("the communicator is unusable after an earlier failure ({reason})"),
            ));
        }
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job).is_ok());
        if sent != Some(true) {
            return Err(self.fail(op, "the MPI thread ended (it panicked)".into()));
        }
        match self.replies.recv_timeout(self.timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => {
                let reason = format!(
                    "no answer within {:.1} s: a rank stalled or died",
                    self.timeout.as_secs_f64()
                );
                Err(self.fail(op, reason))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.fail(op, "the MPI thread ended (it panicked)".into()))
            }
        }
    }

    /// Marks the communicator unusable and returns the error for `op`.
    fn fail(&mut self, op: &str, reason: String) -> MoeError {
        self.failed = Some(reason.clone());
        comm_error(op, self.rank, reason)
    }
}

impl Drop for MpiComm {
    /// Ends the MPI thread, which finalises MPI (`MPI_Finalize` waits for the other ranks), waiting at most the
    /// timeout. After a failure the MPI thread is stuck in a collective: it is left behind and the process ends
    /// without finalising (`mpirun` then reports the rank as exited improperly; [`MpiComm::abort`] is cleaner).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if self.failed.is_some() {
            return;
        }
        if let Some(worker) = self.worker.take() {
            let deadline = Instant::now() + self.timeout;
            while !worker.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if worker.is_finished() {
                // The thread's panic, if any, was already reported on stderr.
                let _ = worker.join();
            }
        }
    }
}

impl Communicator for MpiComm {
    fn name(&self) -> &'static str {
        "mpi"
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
        let job = Job::AllToAllV {
            send: send.to_vec(),
            counts: counts.to_vec(),
        };
        self.call("all_to_all_v", job)
    }

    fn barrier(&mut self) -> Result<(), MoeError> {
        self.call("barrier", Job::Barrier).map(|_| ())
    }
}

/// The MPI thread: initialises MPI, reports rank and size on `ready`, runs the jobs in order until the caller
/// hangs up, then finalises MPI.
fn serve(jobs: Receiver<Job>, replies: Sender<Result<Exchanged, MoeError>>, ready: Sender<Ready>) {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        let _ = ready.send(Err(comm_error(
            "init",
            0,
            "MPI was already initialised (or finalised) in this process",
        )));
        return;
    };
    let world = universe.world();
    let (rank, size) = (
        usize::try_from(world.rank()).unwrap_or(0),
        usize::try_from(world.size()).unwrap_or(0),
    );
    if ready.send(Ok((rank, size, threading))).is_err() {
        return;
    }
    for job in jobs.iter() {
        let reply = match job {
            Job::AllToAllV { send, counts } => exchange(&world, rank, &send, &counts),
            Job::Barrier => {
                world.barrier();
                Ok(Exchanged::default())
            }
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    drop(universe);
}

/// MPI's counts and displacements (C `int`s) for messages of `counts` bytes one after the other.
///
/// # Errors
/// The reason, when a count or the total exceeds `i32::MAX` bytes.
fn mpi_layout(counts: &[usize]) -> Result<(Vec<mpi::Count>, Vec<mpi::Count>), String> {
    let mut mpi_counts = Vec::with_capacity(counts.len());
    let mut displs = Vec::with_capacity(counts.len());
    let mut offset: mpi::Count = 0;
    for (peer, &c) in counts.iter().enumerate() {
        let c = mpi::Count::try_from(c).map_err(|_| {
            format!(
                "{c} bytes for rank {peer}: MPI counts are C ints, at most {} bytes",
                i32::MAX
            )
        })?;
        displs.push(offset);
        mpi_counts.push(c);
        offset = offset.checked_add(c).ok_or_else(|| {
            format!(
                "{} bytes in all: MPI displacements are C ints, at most {} bytes per buffer",
                counts.iter().sum::<usize>(),
                i32::MAX
            )
        })?;
    }
    Ok((mpi_counts, displs))
}

/// One all-to-all-v on the MPI thread: the counts, then the bytes (see the module docs' "Wire").
fn exchange(
    world: &SimpleCommunicator,
    rank: usize,
    send: &[u8],
    counts: &[usize],
) -> Result<Exchanged, MoeError> {
    let size = usize::try_from(world.size()).unwrap_or(0);
    let layout = check_counts(rank, size, send.len(), counts).and_then(|()| {
        mpi_layout(counts).map_err(|reason| comm_error("all_to_all_v", rank, reason))
    });
    let header: Vec<u64> = match &layout {
        Ok(_) => counts.iter().map(|&c| c as u64).collect(),
        Err(_) => vec![CANNOT_SEND; size],
    };
    let mut incoming = vec![0u64; size];
    world.all_to_all_into(&header[..], &mut incoming[..]);
    let (send_counts, send_displs) = layout?;
    if let Some(src) = incoming.iter().position(|&c| c == CANNOT_SEND) {
        return Err(comm_error(
            "all_to_all_v",
            rank,
            format!(
                "rank {src} cannot send (its counts are wrong or over MPI's limit; it says why)"
            ),
        ));
    }
    let recv_sizes: Vec<usize> = incoming.iter().map(|&c| c as usize).collect();
    let (recv_counts, recv_displs) = mpi_layout(&recv_sizes)
        .map_err(|reason| comm_error("all_to_all_v", rank, format!("cannot receive: {reason}")))?;
    let total: usize = recv_sizes.iter().sum();
    // OpenMPI refuses (MPI_ERR_ARG) a send buffer at the receive buffer's address, which two empty buffers
    // share (both dangling at 1): the receive buffer always has a byte, an empty send buffer is a static byte.
    let mut data = vec![0u8; total + 1];
    let send: &[u8] = if send.is_empty() { &[0u8] } else { send };
    {
        let out = Partition::new(send, send_counts, send_displs);
        let mut into = PartitionMut::new(&mut data[..], recv_counts, recv_displs);
        world.all_to_all_varcount_into(&out, &mut into);
    }
    data.truncate(total);
    Exchanged::from_parts(data, &recv_sizes, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test of this process that starts MPI (once per process): a singleton world, without mpirun.
    #[test]
    fn a_singleton_world_exchanges_with_itself_and_mpi_starts_once() {
        let mut comm = match MpiComm::world() {
            Ok(c) => c,
            Err(e) => panic!("MPI did not start: {e}"),
        };
        assert_eq!((comm.name(), comm.rank(), comm.size()), ("mpi", 0, 1));
        let again = MpiComm::world();
        assert!(
            matches!(&again, Err(MoeError::Communication { op, .. }) if op == "init"),
            "{again:?}"
        );
        for message in [&b""[..], b"expert rows"] {
            let got = comm.all_to_all_v(message, &[message.len()]);
            assert!(
                matches!(&got, Ok(x) if x.sources() == 1 && x.from(0) == message),
                "{got:?}"
            );
        }
        let bad = comm.all_to_all_v(b"abc", &[2]);
        assert!(
            matches!(&bad, Err(MoeError::Communication { reason, .. }) if reason.contains("3 bytes")),
            "{bad:?}"
        );
        let mut v = [0.5f32, -2.0];
        assert!(comm.all_reduce_sum(&mut v).is_ok());
        assert_eq!(v, [0.5, -2.0]);
        assert!(comm.barrier().is_ok());
        assert_eq!(comm.failure(), None);
    }

    #[test]
    fn mpi_layout_packs_messages_and_refuses_what_a_c_int_cannot_hold() {
        assert_eq!(mpi_layout(&[3, 0, 5]), Ok((vec![3, 0, 5], vec![0, 3, 3])));
        assert_eq!(mpi_layout(&[]), Ok((vec![], vec![])));
        let max = i32::MAX as usize;
        assert_eq!(mpi_layout(&[max]), Ok((vec![i32::MAX], vec![0])));
        let one_over = mpi_layout(&[0, max + 1]);
        assert!(
            matches!(&one_over, Err(r) if r.contains("for rank 1") && r.contains("C ints")),
            "{one_over:?}"
        );
        let total_over = mpi_layout(&[max, 1]);
        assert!(
            matches!(&total_over, Err(r) if r.contains("displacements")),
            "{total_over:?}"
        );
    }
}
