//! The network an all-to-all runs on, in the alpha-beta (Hockney) model: a [`Link`] per kind of pair (two ranks of
//! one node, two ranks of different nodes), ranks per node, nominal presets, and a link fitted to measured
//! ping-pong times.
//!
//! Model (Hockney 1994, "The communication challenge for MPP: Intel Paragon and Meiko CS-2", Parallel Computing
//! 20(3); the α-β form of Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication operations
//! in MPICH", IJHPCA 19(1)): one message of `n` bytes over a link takes `t = α + n / β`, with α the start-up
//! latency and β the bandwidth of one direction. Links are full duplex: a rank sends one message and receives
//! another at the same time.

use moe_core::MoeError;
use serde::{Deserialize, Serialize};

/// One kind of link between two ranks: `t(n) = α + n / β` for a message of `n` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// α: start-up latency of one message, microseconds (≥ 0).
    pub latency_us: f64,
    /// β: bandwidth of one direction, GB/s (10⁹ bytes per second, > 0).
    pub bandwidth_gb_s: f64,
}

impl Link {
    /// A link from a measured (or nominal) latency and bandwidth, as a ping-pong benchmark reports them
    /// (`osu_latency`: half the round trip of a small message; `osu_bw` or a large ping-pong: bytes / one-way
    /// time).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a latency that is negative or not finite, or a bandwidth that is not
    /// finite and positive.
    pub fn new(latency_us: f64, bandwidth_gb_s: f64) -> Result<Self, MoeError> {
        if !latency_us.is_finite() || latency_us < 0.0 {
            return Err(MoeError::config(
                "link latency_us",
                latency_us,
                "must be finite and >= 0 (microseconds)",
            ));
        }
        if !bandwidth_gb_s.is_finite() || bandwidth_gb_s <= 0.0 {
            return Err(MoeError::config(
                "link bandwidth_gb_s",
                bandwidth_gb_s,
                "must be finite and > 0 (GB/s)",
            ));
        }
        Ok(Link {
            latency_us,
            bandwidth_gb_s,
        })
    }

    /// Checks a link read from a file (see [`Link::new`]).
    ///
    /// # Errors
    /// As [`Link::new`].
    pub fn check(&self) -> Result<(), MoeError> {
        Link::new(self.latency_us, self.bandwidth_gb_s).map(|_| ())
    }

    /// Time of one message of `bytes` bytes, microseconds: `α + bytes / β` (`bytes / (β · 10⁹)` seconds is
    /// `bytes / (β · 10³)` µs); 0 for an empty message, which is not sent.
    pub fn message_us(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            return 0.0;
        }
        self.latency_us + bytes as f64 / (self.bandwidth_gb_s * 1e3)
    }

    /// Fits `t = α + n / β` by least squares to one-way times measured at several message sizes
    /// (`samples[i] = (bytes, microseconds)`, e.g. half of a ping-pong's round trip). A small negative intercept
    /// (noise) is clamped to α = 0.
    ///
    /// Formula: slope `s = Σ(n − n̄)(t − t̄) / Σ(n − n̄)²` µs per byte, `β = 1 / (s · 10³)` GB/s,
    /// `α = t̄ − s · n̄`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for fewer than two distinct sizes, a time that is not finite and ≥ 0, or a
    /// fit whose slope is not positive (times that do not grow with the size give no bandwidth).
    pub fn fit(samples: &[(u64, f64)]) -> Result<Self, MoeError> {
        if let Some(&(n, t)) = samples.iter().find(|(_, t)| !t.is_finite() || *t < 0.0) {
            return Err(MoeError::config(
                "ping-pong sample",
                format!("{t} us for {n} bytes"),
                "times must be finite and >= 0",
            ));
        }
        let m = samples.len() as f64;
        let n_mean = samples.iter().map(|s| s.0 as f64).sum::<f64>() / m;
        let t_mean = samples.iter().map(|s| s.1).sum::<f64>() / m;
        let sxx: f64 = samples.iter().map(|s| (s.0 as f64 - n_mean).powi(2)).sum();
        let sxy: f64 = samples
            .iter()
            .map(|s| (s.0 as f64 - n_mean) * (s.1 - t_mean))
            .sum();
        if samples.is_empty() || sxx <= 0.0 {
            return Err(MoeError::config(
                "ping-pong samples",
                samples.len(),
                "need times at two or more distinct message sizes",
            ));
        }
        let slope = sxy / sxx;
        if slope.is_nan() || slope <= 0.0 {
            return Err(MoeError::config(
                "ping-pong fit",
                format!("{slope} us per byte"),
                "times must grow with the message size to give a bandwidth",
            ));
        }
        Link::new((t_mean - slope * n_mean).max(0.0), 1.0 / (slope * 1e3))
    }
}

/// The network of a run: the link between two ranks of one node, the link between two nodes, and how ranks are
/// packed on nodes (ranks `[j·ranks_per_node, (j+1)·ranks_per_node)` share node `j`, as `mpirun --map-by core`
/// places them). `inter` is the bandwidth one rank gets: with one NIC per GPU (DGX) the NIC's; where the ranks of
/// a node share one NIC, divide it by the ranks that send at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// A name for reports (the preset's).
    pub name: String,
    /// Between two ranks of one node.
    pub intra: Link,
    /// Between two ranks of different nodes.
    pub inter: Link,
    /// Ranks per node; `None`: every rank on one node.
    pub ranks_per_node: Option<usize>,
}

/// The preset names of [`Network::preset`].
pub const PRESETS: &[&str] = &["shm", "ib-hdr", "ethernet-100g", "dgx-h100"];

/// Shared memory between processes of one machine (MPI's vader/sm transport): about 0.5 µs, about 10 GB/s per
/// pair (one copy through a shared buffer). Nominal.
const SHM: Link = Link {
    latency_us: 0.5,
    bandwidth_gb_s: 10.0,
};

impl Network {
    /// A nominal network (datasheet numbers, not measurements; calibrate with [`Link::fit`] for predictions
    /// that matter):
    /// - `shm`: every rank on one machine, shared memory (α 0.5 µs, β 10 GB/s).
    /// - `ib-hdr`: 8 ranks per node over shared memory, nodes on InfiniBand HDR, 200 Gb/s = 25 GB/s per rank,
    ///   α 1.5 µs (MPI ping-pong on HDR is 1–2 µs).
    /// - `ethernet-100g`: 8 ranks per node over shared memory, nodes on 100 Gb/s Ethernet = 12.5 GB/s per rank
    ///   over TCP, α 15 µs.
    /// - `dgx-h100`: 8 GPUs per node on NVLink 4 (450 GB/s per direction, α 3 µs through NCCL), one
    ///   InfiniBand NDR NIC per GPU between nodes (400 Gb/s = 50 GB/s, α 5 µs).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for another name, listing [`PRESETS`].
    pub fn preset(name: &str) -> Result<Self, MoeError> {
        let link = |latency_us, bandwidth_gb_s| Link {
            latency_us,
            bandwidth_gb_s,
        };
        let (intra, inter, ranks_per_node) = match name {
            "shm" => (SHM, SHM, None),
            "ib-hdr" => (SHM, link(1.5, 25.0), Some(8)),
            "ethernet-100g" => (SHM, link(15.0, 12.5), Some(8)),
            "dgx-h100" => (link(3.0, 450.0), link(5.0, 50.0), Some(8)),
            _ => {
                return Err(MoeError::config(
                    "network preset",
                    name,
                    format!("one of {}", PRESETS.join(", ")),
                ));
            }
        };
        Ok(Network {
            name: name.to_string(),
            intra,
            inter,
            ranks_per_node,
        })
    }

    /// The same network with `ranks_per_node` ranks per node.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for 0.
    pub fn with_ranks_per_node(mut self, ranks_per_node: usize) -> Result<Self, MoeError> {
        if ranks_per_node == 0 {
            return Err(MoeError::config("ranks_per_node", 0, "must be at least 1"));
        }
        self.ranks_per_node = Some(ranks_per_node);
        Ok(self)
    }

    /// Checks a network read from a file: both links valid, `ranks_per_node` not 0.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the bad value.
    pub fn check(&self) -> Result<(), MoeError> {
        self.intra.check()?;
        self.inter.check()?;
        if self.ranks_per_node == Some(0) {
            return Err(MoeError::config("ranks_per_node", 0, "must be at least 1"));
        }
        Ok(())
    }

    /// The node of rank `r`.
    pub fn node(&self, r: usize) -> usize {
        self.ranks_per_node.map_or(0, |n| r / n.max(1))
    }

    /// The link between ranks `a` and `b`: `intra` on one node, else `inter`.
    pub fn link(&self, a: usize, b: usize) -> &Link {
        if self.node(a) == self.node(b) {
            &self.intra
        } else {
            &self.inter
        }
    }
}

/// Measures the link between ranks 0 and 1 through `comm` itself (collective): for each size in `sizes`
/// (bytes, ascending), `reps` all-to-alls in which ranks 0 and 1 exchange a message of that size and every other
/// rank sends nothing; the median time of each size is measured on rank 0 and shared with every rank. The
/// bandwidth β is [`Link::fit`]'s over the sizes of 64 KiB and more (two or more of them), the latency
/// `α = t(smallest) − smallest / β` (at least 0): a plain least-squares fit over every size lets the largest
/// messages set the intercept, which then says little about small ones. The link includes the transport's
/// per-call overhead (the count exchange, the hand-off to an MPI thread), which an expert-parallel step pays too.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for fewer than 2 ranks, `reps = 0`, fewer than two sizes of 64 KiB or more, or a
/// fit [`Link::fit`] refuses; the communicator's errors.
pub fn calibrate(
    comm: &mut dyn crate::comm::Communicator,
    sizes: &[usize],
    reps: usize,
) -> Result<Link, MoeError> {
    let (rank, size) = (comm.rank(), comm.size());
    if size < 2 || reps == 0 {
        return Err(MoeError::config(
            "calibration",
            format!("{size} ranks, {reps} repeats"),
            "needs 2 or more ranks and 1 or more repeats",
        ));
    }
    let mut medians = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let peer = match rank {
            0 => Some(1),
            1 => Some(0),
            _ => None,
        };
        let mut counts = vec![0usize; size];
        if let Some(p) = peer {
            counts[p] = n;
        }
        let send = vec![0x5au8; counts.iter().sum()];
        comm.barrier()?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            comm.all_to_all_v(&send, &counts)?;
            times.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        medians.push(times[times.len() / 2]);
    }
    // Rank 0's medians, the same on every rank.
    let mine: Vec<u8> = medians.iter().flat_map(|t| t.to_le_bytes()).collect();
    let all = comm.all_gather(&mine)?;
    let zero = all.from(0);
    let samples: Vec<(u64, f64)> = sizes
        .iter()
        .zip(zero.chunks_exact(8))
        .map(|(&n, b)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            (n as u64, f64::from_le_bytes(a))
        })
        .collect();
    let large: Vec<(u64, f64)> = samples
        .iter()
        .copied()
        .filter(|&(n, _)| n >= 1 << 16)
        .collect();
    let beta = Link::fit(&large)?.bandwidth_gb_s;
    let (n0, t0) = samples
        .iter()
        .copied()
        .min_by_key(|&(n, _)| n)
        .unwrap_or((0, 0.0));
    Link::new((t0 - n0 as f64 / (beta * 1e3)).max(0.0), beta)
}
