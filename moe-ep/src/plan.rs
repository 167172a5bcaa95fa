//! The dispatch plan of one rank and the bytes it puts on the wire: one function used by the expert-parallel
//! layer to send and by the cost model to predict, so measured and predicted bytes agree by construction of the
//! same code and are checked equal by the tests.
//!
//! Wire format (little-endian). A dispatch message from source `s` to owner `o` is empty when `s` has no rows
//! for `o`'s experts (and no rank capacity is set); otherwise a header of [`HEADER_BYTES`]
//! (`groups: u32, plan_max_rows: u32, source_slots: u32`), [`GROUP_BYTES`] per group
//! (`local expert: u32, rows: u32`), then the rows, `rows × d` f32. The owner's answer (combine) is empty for an
//! empty dispatch message; otherwise `dropped: u32`, the dropped rows' indices (`u32` each, in the message's row
//! order), then the kept rows' outputs, `kept × d` f32.

use moe_core::Routing;

use crate::placement::Placement;

/// Bytes of a dispatch message's header.
pub const HEADER_BYTES: usize = 12;
/// Bytes per group in a dispatch message.
pub const GROUP_BYTES: usize = 8;
/// Bytes of a combine message's header.
pub const COMBINE_HEADER_BYTES: usize = 4;
/// Bytes of one value (f32).
pub const VALUE_BYTES: usize = 4;

/// What one source sends one owner: the plan's groups of experts that owner owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerGroups {
    /// The groups' experts, ids local to the owner.
    pub local_experts: Vec<u32>,
    /// The groups' index in the plan (`Routing::active_experts`).
    pub plan_groups: Vec<usize>,
    /// `[groups + 1]` row offsets within the message.
    pub offsets: Vec<usize>,
}

impl OwnerGroups {
    /// Rows sent.
    pub fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Groups sent.
    pub fn groups(&self) -> usize {
        self.local_experts.len()
    }
}

/// A rank's plan split by owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    /// Per owner rank, what goes there (this rank's own experts included).
    pub owners: Vec<OwnerGroups>,
    /// The plan's largest group (every owner tiles with it).
    pub plan_max_rows: usize,
    /// The plan's slots (kept assignments).
    pub slots: usize,
}

/// Splits `routing` by the owners of its active experts.
pub fn dispatch_plan(routing: &Routing, placement: &Placement) -> DispatchPlan {
    let local = placement.local_ids();
    let mut owners = vec![
        OwnerGroups {
            offsets: vec![0],
            ..OwnerGroups::default()
        };
        placement.ranks()
    ];
    let offsets = routing.offsets();
    for (g, &e) in routing.active_experts().iter().enumerate() {
        let o = &mut owners[placement.owner(e as usize)];
        let rows = offsets[g + 1] - offsets[g];
        o.local_experts.push(local[e as usize]);
        o.plan_groups.push(g);
        let last = o.rows();
        o.offsets.push(last + rows);
    }
    DispatchPlan {
        owners,
        plan_max_rows: offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0),
        slots: routing.n_slots(),
    }
}

/// Bytes of a dispatch message with `groups` groups and `rows` rows of width `d` (0 when empty and
/// `always_header` is false).
pub fn dispatch_bytes(groups: usize, rows: usize, d: usize, always_header: bool) -> usize {
    if groups == 0 && !always_header {
        return 0;
    }
    HEADER_BYTES + GROUP_BYTES * groups + VALUE_BYTES * rows * d
}

/// Bytes of the combine message answering a dispatch message of `rows` rows, `dropped` of them dropped (0 when the
/// dispatch message was empty).
pub fn combine_bytes(sent: bool, rows: usize, dropped: usize, d: usize) -> usize {
    if !sent {
        return 0;
    }
    COMBINE_HEADER_BYTES + VALUE_BYTES * dropped + VALUE_BYTES * (rows - dropped.min(rows)) * d
}
