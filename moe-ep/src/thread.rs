//! Ranks as threads of one process: the [`Communicator`] unit tests use, with the same failure behaviour as the
//! real transports (a rank that leaves or stalls makes the others fail within the timeout).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moe_core::MoeError;

use crate::comm::{Communicator, DEFAULT_TIMEOUT, Exchanged, check_counts, comm_error};

/// What the ranks share: per (destination, source) a queue of (operation number, message), and who left.
#[derive(Debug)]
struct State {
    queues: Vec<Vec<VecDeque<(u64, Vec<u8>)>>>,
    left: Vec<bool>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left the queues consistent (every change is one push or
        // pop), so the poison is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One rank of a group of in-process ranks ([`ThreadComm::group`]); move each to its own thread. Dropping a rank
/// (its thread ended or panicked) tells the others it left: their next wait for it fails at once.
#[derive(Debug)]
pub struct ThreadComm {
    rank: usize,
    size: usize,
    op: u64,
    timeout: Duration,
    shared: Arc<Shared>,
}

impl ThreadComm {
    /// `size` connected ranks, rank `i` at index `i`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for `size = 0`.
    pub fn group(size: usize) -> Result<Vec<ThreadComm>, MoeError> {
        if size == 0 {
            return Err(MoeError::config("ranks", size, "at least 1"));
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queues: (0..size)
                    .map(|_| (0..size).map(|_| VecDeque::new()).collect())
                    .collect(),
                left: vec![false; size],
            }),
            arrived: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| ThreadComm {
                rank,
                size,
                op: 0,
                timeout: DEFAULT_TIMEOUT,
                shared: Arc::clone(&shared),
            })
            .collect())
    }

    /// Runs `f(comm)` on `size` threads, one per rank, and returns their results in rank order: how tests run
    /// an expert-parallel layer without MPI.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for `size = 0`; [`MoeError::Communication`] naming a rank whose thread
    /// panicked.
    pub fn run<R: Send>(
        size: usize,
        f: impl Fn(ThreadComm) -> R + Sync,
    ) -> Result<Vec<R>, MoeError> {
        let comms = ThreadComm::group(size)?;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let f = &f;
                    s.spawn(move || f(c))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(rank, h)| {
                    h.join()
                        .map_err(|_| comm_error("run", rank, "the rank's thread panicked"))
                })
                .collect()
        })
    }

    fn exchange(&mut self, op_name: &str, messages: Vec<Vec<u8>>) -> Result<Exchanged, MoeError> {
        let op = self.op;
        self.op += 1;
        let mut state = self.shared.lock();
        for (dst, m) in messages.into_iter().enumerate() {
            state.queues[dst][self.rank].push_back((op, m));
        }
        self.shared.arrived.notify_all();
        let deadline = Instant::now() + self.timeout;
        loop {
            let missing = (0..self.size).find(|&src| state.queues[self.rank][src].is_empty());
            let Some(src) = missing else { break };
            if state.left[src] {
                return Err(comm_error(
                    op_name,
                    self.rank,
                    format!(
                        "rank {src} left before sending its message (its thread ended or panicked)"
                    ),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(comm_error(
                    op_name,
                    self.rank,
                    format!(
                        "rank {src} sent nothing within the timeout of {:.1} s: it stalled or died",
                        self.timeout.as_secs_f64()
                    ),
                ));
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let mut got = Vec::with_capacity(self.size);
        for src in 0..self.size {
            match state.queues[self.rank][src].pop_front() {
                Some((o, m)) if o == op => got.push(m),
                Some((o, _)) => {
                    return Err(comm_error(
                        op_name,
                        self.rank,
                        format!(
                            "rank {src} is at operation {o}, this rank at {op}: the ranks called collectives in different orders"
                        ),
                    ));
                }
                None => return Err(comm_error(op_name, self.rank, "message vanished")),
            }
        }
        Ok(Exchanged::from_messages(&got))
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.left[self.rank] = true;
        self.shared.arrived.notify_all();
    }
}

impl Communicator for ThreadComm {
    fn name(&self) -> &'static str {
        "threads"
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
        let mut messages = Vec::with_capacity(self.size);
        let mut at = 0;
        for &c in counts {
            messages.push(send[at..at + c].to_vec());
            at += c;
        }
        self.exchange("all_to_all_v", messages)
    }

    fn barrier(&mut self) -> Result<(), MoeError> {
        self.exchange("barrier", vec![Vec::new(); self.size])
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_to_all_delivers_in_rank_order_and_all_reduce_sums_in_rank_order() {
        let out = ThreadComm::run(3, |mut c| {
            let r = c.rank() as u8;
            // Rank r sends r + 1 copies of (10 r + dst) to each dst.
            let mut send = Vec::new();
            let mut counts = Vec::new();
            for dst in 0..3u8 {
                send.extend(std::iter::repeat_n(10 * r + dst, r as usize + 1));
                counts.push(r as usize + 1);
            }
            let got = c
                .all_to_all_v(&send, &counts)
                .unwrap_or_else(|e| panic!("{e}"));
            let mut v = [r as f32 + 0.5, 1e8, -1e8];
            c.all_reduce_sum(&mut v).unwrap_or_else(|e| panic!("{e}"));
            c.barrier().unwrap_or_else(|e| panic!("{e}"));
            (got, v)
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for (dst, (got, v)) in out.iter().enumerate() {
            for src in 0..3 {
                assert_eq!(
                    got.from(src),
                    vec![10 * src as u8 + dst as u8; src + 1].as_slice()
                );
            }
            assert_eq!(v[0], 0.5 + 1.5 + 2.5);
            assert_eq!(v[1], (1e8f32 + 1e8) + 1e8);
        }
    }

    #[test]
    fn a_rank_that_leaves_or_stalls_fails_the_others_within_the_timeout() {
        let out = ThreadComm::run(3, |mut c| {
            c.set_timeout(Duration::from_millis(300));
            match c.rank() {
                0 => Ok(()), // leaves at once
                _ => c.barrier(),
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        for r in [1, 2] {
            let msg = out[r]
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(msg.contains("rank 0 left"), "{msg}");
        }
        let start = Instant::now();
        let out = ThreadComm::run(2, |mut c| {
            c.set_timeout(Duration::from_millis(200));
            if c.rank() == 0 {
                std::thread::sleep(Duration::from_millis(600));
                return Ok(());
            }
            c.barrier()
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let msg = out[1]
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("rank 0 sent nothing within the timeout of 0.2 s"),
            "{msg}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bad_counts_are_refused() {
        let mut g = ThreadComm::group(2).unwrap_or_else(|e| panic!("{e}"));
        let e = g[0]
            .all_to_all_v(&[1, 2, 3], &[1, 1])
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("counts add up to"));
        let e = g[0].all_to_all_v(&[1], &[1]).err().map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("1 counts for 2 ranks"));
    }
}
