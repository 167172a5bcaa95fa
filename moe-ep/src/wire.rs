//! The expert-parallel layer's messages: encoding a dispatch, reading what came, putting the owners' answers
//! back in slot order (the wire format is in [`crate::plan`]).

use ndarray::Array2;

use moe_core::MoeError;

use crate::comm::comm_error;
use crate::plan::{DispatchPlan, GROUP_BYTES, HEADER_BYTES, dispatch_bytes};

/// A marker in a message's first word: the sending rank failed this step (its reason follows, UTF-8).
pub(crate) const FAILED: u32 = u32::MAX;

pub(crate) fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_rows(buf: &mut Vec<u8>, rows: &[f32]) {
    if cfg!(target_endian = "little") {
        // The wire is little-endian: the values' own bytes.
        buf.extend_from_slice(bytemuck::cast_slice(rows));
    } else {
        buf.reserve(rows.len() * 4);
        for v in rows {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Reads little-endian words from a received message, with errors naming the sender.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) at: usize,
    pub(crate) src: usize,
    pub(crate) rank: usize,
    pub(crate) op: &'static str,
}

impl Reader<'_> {
    pub(crate) fn u32(&mut self) -> Result<u32, MoeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&[u8], MoeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(comm_error(
                self.op,
                self.rank,
                format!(
                    "rank {}'s message is {} bytes, shorter than its header says",
                    self.src,
                    self.bytes.len()
                ),
            ));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(crate) fn rows(&mut self, n_rows: usize, d: usize) -> Result<Array2<f32>, MoeError> {
        let n = n_rows.checked_mul(d).and_then(|n| n.checked_mul(4));
        let b = self.take(n.unwrap_or(usize::MAX))?;
        let v: Vec<f32> = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Array2::from_shape_vec((n_rows, d), v)
            .map_err(|e| comm_error(self.op, self.rank, e.to_string()))
    }

    pub(crate) fn failure(&mut self) -> MoeError {
        let reason = String::from_utf8_lossy(&self.bytes[self.at..]).into_owned();
        comm_error(
            self.op,
            self.rank,
            format!("rank {} failed: {reason}", self.src),
        )
    }

    pub(crate) fn done(&self) -> Result<(), MoeError> {
        if self.at != self.bytes.len() {
            return Err(comm_error(
                self.op,
                self.rank,
                format!(
                    "rank {}'s message has {} bytes past its end",
                    self.src,
                    self.bytes.len() - self.at
                ),
            ));
        }
        Ok(())
    }
}

/// What an all-to-all brought: the others' messages and this rank's own.
pub(crate) struct Inbox {
    pub(crate) got: crate::comm::Exchanged,
    pub(crate) own: Vec<u8>,
    pub(crate) rank: usize,
}

impl Inbox {
    pub(crate) fn sources(&self) -> usize {
        self.got.sources()
    }

    pub(crate) fn from(&self, src: usize) -> &[u8] {
        if src == self.rank {
            &self.own
        } else {
            self.got.from(src)
        }
    }
}

/// What one source sent this owner in a dispatch.
pub(crate) struct Inbound {
    pub(crate) experts: Vec<u32>,
    pub(crate) offsets: Vec<usize>,
    pub(crate) plan_max_rows: usize,
    pub(crate) source_slots: usize,
    pub(crate) rows: Array2<f32>,
}

/// The dispatch message from a rank with plan `plan` to owner `o`.
pub(crate) fn encode_dispatch(
    plan: &DispatchPlan,
    o: usize,
    offsets: &[usize],
    rows: &[f32],
    d: usize,
    always_header: bool,
) -> Vec<u8> {
    let g = &plan.owners[o];
    let bytes = dispatch_bytes(g.groups(), g.rows(), d, always_header);
    let mut m = Vec::with_capacity(bytes);
    if bytes == 0 {
        return m;
    }
    put_u32(&mut m, g.groups() as u32);
    put_u32(&mut m, plan.plan_max_rows as u32);
    put_u32(&mut m, plan.slots as u32);
    for (i, &e) in g.local_experts.iter().enumerate() {
        put_u32(&mut m, e);
        put_u32(&mut m, (g.offsets[i + 1] - g.offsets[i]) as u32);
    }
    for &pg in &g.plan_groups {
        put_rows(&mut m, &rows[offsets[pg] * d..offsets[pg + 1] * d]);
    }
    debug_assert_eq!(m.len(), bytes);
    debug_assert_eq!(
        HEADER_BYTES + GROUP_BYTES * g.groups(),
        bytes - 4 * g.rows() * d
    );
    m
}

/// Puts every owner's answer back into the plan's slot order, `[slots, d]`; dropped rows stay zero.
pub(crate) fn assemble(
    plan: &DispatchPlan,
    back: &Inbox,
    offsets: &[usize],
    d: usize,
    rank: usize,
) -> Result<Array2<f32>, MoeError> {
    let mut y = Array2::<f32>::zeros((plan.slots, d));
    for (o, g) in plan.owners.iter().enumerate() {
        let bytes = back.from(o);
        let mut r = Reader {
            bytes,
            at: 0,
            src: o,
            rank,
            op: "combine",
        };
        if bytes.is_empty() {
            if g.rows() > 0 {
                return Err(comm_error(
                    "combine",
                    rank,
                    format!("rank {o} sent no outputs for {} rows", g.rows()),
                ));
            }
            continue;
        }
        let dropped = r.u32()?;
        if dropped == FAILED {
            return Err(r.failure());
        }
        let dropped = dropped as usize;
        if dropped > g.rows() {
            return Err(comm_error(
                "combine",
                rank,
                format!("rank {o} dropped {dropped} of {} rows", g.rows()),
            ));
        }
        let mut is_dropped = vec![false; g.rows()];
        for _ in 0..dropped {
            let i = r.u32()? as usize;
            match is_dropped.get_mut(i) {
                Some(f) => *f = true,
                None => {
                    return Err(comm_error(
                        "combine",
                        rank,
                        format!("rank {o} dropped row {i} of {}", g.rows()),
                    ));
                }
            }
        }
        let kept = r.rows(g.rows() - dropped, d)?;
        r.done()?;
        let mut next = kept.outer_iter();
        let mut i = 0;
        for &pg in &g.plan_groups {
            for slot in offsets[pg]..offsets[pg + 1] {
                if !is_dropped[i]
                    && let Some(row) = next.next()
                {
                    y.row_mut(slot).assign(&row);
                }
                i += 1;
            }
        }
    }
    Ok(y)
}
