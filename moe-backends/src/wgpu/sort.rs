//! Grouping by expert: the row plan of the grouped products. On the native path a counting sort on the device
//! (per-expert counts, a prefix sum, an ordered scatter, so each expert's rows are in ascending token order); on
//! the host path the host plan's rows, uploaded. Also the plan of "every token, one group" that the gate
//! projection and the shared experts use.

use ::wgpu as wg;

use moe_core::{MoeError, Routing};

use super::device::{BM, bytes_of};
use super::execute::Encoder;
use super::params::GroupParams;
use super::route::Choices;
use crate::native::row_meta;

/// The row plan of a grouped product: where the expert-major rows and the row-tile map are.
pub(super) struct Rows {
    /// `[E + 1]` row offsets then `[E + 1]` tile offsets.
    pub meta: wg::Buffer,
    /// Slot -> token.
    pub slot_token: wg::Buffer,
    /// Upper bound of the number of rows.
    pub max_rows: usize,
}

/// The grouped rows of the routed experts and, per token, its slots as the combine reads them.
pub(super) struct Plan {
    pub rows: Rows,
    /// Entries per token (native routing); 0: `offsets` hold each token's range (a host plan).
    pub fixed_k: u32,
    /// Weight of each slot.
    pub slot_weight: wg::Buffer,
    /// Per-token entries, slot + 1 (0: none).
    pub slots: wg::Buffer,
    /// `[T + 1]` per-token offsets into `slots` (host plan; a placeholder otherwise).
    pub offsets: wg::Buffer,
}

/// Every token in one group of `t` rows, no gather: row offsets `[0, T]`, tile offsets `[0, ceil(T / BM)]`.
pub(super) fn all_rows(enc: &mut Encoder<'_>, t: u32) -> Result<Rows, MoeError> {
    let meta = enc.upload("meta_all", bytes_of(&[0u32, t, 0, t.div_ceil(BM)]))?;
    Ok(Rows {
        meta,
        slot_token: enc.dummy.clone(),
        max_rows: t as usize,
    })
}

/// Enqueues the counting sort of the routing kernels' choices (`e` experts): kept assignments grouped by expert.
pub(super) fn sort_native(enc: &mut Encoder<'_>, c: &Choices, e: usize) -> Result<Plan, MoeError> {
    let n_assign = c.t * c.k;
    let counts = enc.storage("expert_counts", (e * 4) as u64)?;
    let meta = enc.storage("meta", ((2 * e + 2) * 4) as u64)?;
    let slot_token = enc.storage("slot_token", (n_assign * 4) as u64)?;
    let slot_weight = enc.storage("slot_weight", (n_assign * 4) as u64)?;
    let assign_slot = enc.storage("assign_slot", (n_assign * 4) as u64)?;
    enc.batch.clears.push(assign_slot.clone());
    let params = GroupParams {
        n_assign: n_assign as u32,
        e: e as u32,
        k: c.k as u32,
        bm: BM,
    };
    let (ex, ey) = enc.grid(e as u32);
    let p = enc.pipes();
    enc.push(
        &p.group_count,
        &params,
        vec![
            (1, c.expert.clone()),
            (2, c.info.clone()),
            (4, counts.clone()),
        ],
        (ex, ey, 1),
    );
    enc.push(
        &p.group_scan,
        &params,
        vec![(4, counts), (5, meta.clone())],
        (1, 1, 1),
    );
    enc.push(
        &p.group_scatter,
        &params,
        vec![
            (1, c.expert.clone()),
            (2, c.info.clone()),
            (3, c.weight.clone()),
            (5, meta.clone()),
            (6, slot_token.clone()),
            (7, slot_weight.clone()),
            (8, assign_slot.clone()),
        ],
        (ex, ey, 1),
    );
    Ok(Plan {
        rows: Rows {
            meta,
            slot_token,
            max_rows: n_assign,
        },
        fixed_k: c.k as u32,
        slot_weight,
        slots: assign_slot,
        offsets: enc.dummy.clone(),
    })
}

/// Uploads a host plan: its row and tile offsets, slots, slot weights, and each token's slots (CSR, slot + 1).
pub(super) fn host_plan(enc: &mut Encoder<'_>, routing: &Routing) -> Result<Plan, MoeError> {
    let meta = row_meta(routing, BM as usize)?;
    let (offsets, slots) = routing.token_slots();
    let off: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
    let tslots: Vec<u32> = slots.iter().map(|&s| s as u32 + 1).collect();
    let meta = enc.upload("meta", bytes_of(&meta))?;
    let slot_token = enc.upload("slot_token", bytes_of(routing.slot_tokens()))?;
    let slot_weight = enc.upload("slot_weight", bytes_of(routing.slot_weights()))?;
    let offsets = enc.upload("tok_off", bytes_of(&off))?;
    let slots = enc.upload("tok_slot", bytes_of(&tslots))?;
    Ok(Plan {
        rows: Rows {
            meta,
            slot_token,
            max_rows: routing.n_slots(),
        },
        fixed_k: 0,
        slot_weight,
        slots,
        offsets,
    })
}
