//! What the device backends share: the plan of a natively routed forward, rebuilt on the host from the compact
//! per-token results the routing kernels write (expert ids, weights, choice ranks with a drop flag).

use moe_core::{Assignment, MoeError, RouterInput, Routing};

/// Expert id of an empty choice (a padding token's).
pub(crate) const NONE: u32 = u32::MAX;
/// Flag in a choice's info word: capacity dropped it.
pub(crate) const DROPPED: u32 = 0x1_0000;

/// The plan of the native routers from the read-back per-token results.
pub(crate) fn native_routing(
    t: usize,
    e: usize,
    k: usize,
    input: &RouterInput<'_>,
    experts: &[u32],
    weights: &[f32],
    info: &[u32],
) -> Result<Routing, MoeError> {
    if experts.len() != t * k || weights.len() != t * k || info.len() != t * k {
        return Err(MoeError::Backend {
            backend: "device".into(),
            reason: "routing read-back has the wrong length".into(),
        });
    }
    let mut kept = Vec::with_capacity(t * k);
    let mut dropped = Vec::new();
    let mut real = 0usize;
    for tok in 0..t {
        if input.is_padding(tok) {
            continue;
        }
        real += 1;
        for p in tok * k..(tok + 1) * k {
            if experts[p] == NONE {
                continue;
            }
            let a = Assignment {
                token: tok as u32,
                expert: experts[p],
                weight: weights[p],
                rank: (info[p] & 0xffff) as u16,
            };
            if info[p] & DROPPED != 0 {
                dropped.push(a);
            } else {
                kept.push(a);
            }
        }
    }
    Routing::new(t, e, real, kept, dropped)
}
