//! The communicator contract: what an expert-parallel layer needs from MPI, NCCL or in-process thread ranks.

use std::time::Duration;

use moe_core::MoeError;

/// The default bound on every wait for a peer: a rank that died or stalls makes the others fail with
/// [`MoeError::Communication`] after this long instead of hanging.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What an all-to-all brought: the bytes every rank sent this one, in rank order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exchanged {
    data: Vec<u8>,
    /// `[size + 1]` byte offsets of each source's message in `data`.
    offsets: Vec<usize>,
}

impl Exchanged {
    /// Joins per-source messages (`messages[i]` from rank `i`).
    pub fn from_messages<M: AsRef<[u8]>>(messages: &[M]) -> Self {
        let mut offsets = Vec::with_capacity(messages.len() + 1);
        offsets.push(0);
        let mut data = Vec::with_capacity(messages.iter().map(|m| m.as_ref().len()).sum());
        for m in messages {
            data.extend_from_slice(m.as_ref());
            offsets.push(data.len());
        }
        Exchanged { data, offsets }
    }

    /// Wraps received bytes with their per-source byte counts.
    ///
    /// # Errors
    /// [`MoeError::Communication`] when the counts do not add up to the data's length.
    pub fn from_parts(data: Vec<u8>, counts: &[usize], rank: usize) -> Result<Self, MoeError> {
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0usize);
        for &c in counts {
            let next = offsets[offsets.len() - 1].checked_add(c);
            match next {
                Some(n) => offsets.push(n),
                None => return Err(comm_error("all_to_all_v", rank, "byte counts overflow")),
            }
        }
        if offsets[counts.len()] != data.len() {
            return Err(comm_error(
                "all_to_all_v",
                rank,
                format!(
                    "received {} bytes, the counts say {}",
                    data.len(),
                    offsets[counts.len()]
                ),
            ));
        }
        Ok(Exchanged { data, offsets })
    }

    /// The number of sources (the communicator's size).
    pub fn sources(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The message from rank `src` (empty for a rank out of range).
    pub fn from(&self, src: usize) -> &[u8] {
        match (self.offsets.get(src), self.offsets.get(src + 1)) {
            (Some(&a), Some(&b)) => &self.data[a..b],
            _ => &[],
        }
    }

    /// Total bytes received.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A group of `size` ranks that exchange bytes. Every operation is collective: all ranks call it, in the same
/// order. Every wait for a peer is bounded by [`Communicator::timeout`]: a peer that left, died or stalls makes the
/// call fail with [`MoeError::Communication`] naming it (where the transport can tell), never hang.
pub trait Communicator: Send {
    /// The transport's name: `threads`, `mpi`, `nccl`.
    fn name(&self) -> &'static str;

    /// This rank, `0..size`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn size(&self) -> usize;

    /// The bound on each wait for a peer.
    fn timeout(&self) -> Duration;

    /// Sets the bound on each wait for a peer.
    fn set_timeout(&mut self, timeout: Duration);

    /// All-to-all with variable counts: `send` holds this rank's messages to ranks `0..size` one after the
    /// other, `counts[i]` bytes for rank `i` (its own message included, delivered locally). Returns what every
    /// rank sent this one, in rank order.
    ///
    /// # Errors
    /// [`MoeError::Communication`] for counts that are not `[size]` or do not add up to `send`'s length, a peer
    /// that left or did not answer within the timeout, a transport error.
    fn all_to_all_v(&mut self, send: &[u8], counts: &[usize]) -> Result<Exchanged, MoeError>;

    /// Waits until every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_to_all_v`].
    fn barrier(&mut self) -> Result<(), MoeError>;

    /// Every rank's `mine`, in rank order (the same on every rank).
    ///
    /// # Errors
    /// As [`Communicator::all_to_all_v`].
    fn all_gather(&mut self, mine: &[u8]) -> Result<Exchanged, MoeError> {
        let n = self.size();
        let send: Vec<u8> = (0..n).flat_map(|_| mine.iter().copied()).collect();
        self.all_to_all_v(&send, &vec![mine.len(); n])
    }

    /// `values` becomes the sum over ranks of every rank's `values`, added in rank order (`((v₀ + v₁) + v₂) + …`),
    /// so every rank gets the same bits whatever the transport.
    ///
    /// # Errors
    /// As [`Communicator::all_to_all_v`]; [`MoeError::Communication`] when the ranks' lengths differ.
    fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), MoeError> {
        let mine: &[u8] = bytemuck::cast_slice(values);
        let all = self.all_gather(mine)?;
        let rank = self.rank();
        let n = values.len();
        let mut sum = vec![0.0f32; n];
        for src in 0..all.sources() {
            let bytes = all.from(src);
            if bytes.len() != n * 4 {
                return Err(comm_error(
                    "all_reduce_sum",
                    rank,
                    format!(
                        "rank {src} sent {} values, this rank has {n}",
                        bytes.len() / 4
                    ),
                ));
            }
            for (acc, chunk) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
                let v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                *acc = if src == 0 { v } else { *acc + v };
            }
        }
        values.copy_from_slice(&sum);
        Ok(())
    }
}

/// A [`MoeError::Communication`] for `op` on `rank`.
pub fn comm_error(op: &str, rank: usize, reason: impl Into<String>) -> MoeError {
    MoeError::Communication {
        op: op.into(),
        rank,
        reason: reason.into(),
    }
}

/// Checks an all-to-all's arguments: `counts` is `[size]` and adds up to `send_len`.
///
/// # Errors
/// [`MoeError::Communication`] naming what is wrong.
pub fn check_counts(
    rank: usize,
    size: usize,
    send_len: usize,
    counts: &[usize],
) -> Result<(), MoeError> {
    if counts.len() != size {
        return Err(comm_error(
            "all_to_all_v",
            rank,
            format!("{} counts for {size} ranks", counts.len()),
        ));
    }
    let total = counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
    if total != Some(send_len) {
        return Err(comm_error(
            "all_to_all_v",
            rank,
            format!("counts add up to {total:?}, the send buffer has {send_len} bytes"),
        ));
    }
    Ok(())
}
