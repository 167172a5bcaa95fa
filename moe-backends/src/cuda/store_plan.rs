//! The pure planning of the CUDA expert store ([`super::store`]), apart from the device so that it is unit-tested
//! on any machine: which experts a forward touches, how each group's rows are laid out over the resident slots,
//! and in which order the copy stream, the compute stream and the host wait for each other.
//!
//! # The slot-major row layout of a group
//! The product kernels find a row tile's expert `e` by a binary search of the tile offsets of their `meta`
//! (`[E + 1]` row offsets, then `[E + 1]` tile offsets) and read expert `e`'s weights at `e · stride`. A stored
//! layer runs each group of at most `slots` experts on the slot bank, so the kernels' expert index must be the
//! SLOT; the kernels need the experts' row ranges in ascending index order, which for slots is not the experts'
//! (ascending id) order. So each group's rows are laid out slot-major inside the group's own row range
//! `[R₀, R₁)` of the plan: the group's experts ordered by slot, each expert's rows kept contiguous and in their
//! order, and a per-group `meta` over the `slots` indices (an empty range for a slot outside the group). Rows keep
//! their position inside their expert's block, and every expert block starts a new 64-row tile in both layouts,
//! so every output value is computed by the same kernel on the same operands at the same tile position as in the
//! all-resident forward. The combine reads each token's entries in the plan's order (ascending expert) through
//! the row map ([`GroupLayout::dst`]): the same sum in the same order, bit for bit.

use moe_core::MoeError;
use moe_core::store::cache::Placement;

use super::device::err;

/// The experts a host plan's `meta` (`[E + 1]` row offsets, then `[E + 1]` tile offsets) gives rows, ascending,
/// and their row offsets (`[active + 1]`, expert-major as the plan): [`moe_core::Routing::active_experts`] and
/// [`moe_core::Routing::offsets`] of the plan's routing (a routing lists exactly the experts with kept rows).
///
/// # Errors
/// [`MoeError::Backend`] when `meta` is not `2E + 2` long or its row offsets decrease (a bug).
pub(super) fn active_of_meta(meta: &[u32], e: usize) -> Result<(Vec<u32>, Vec<usize>), MoeError> {
    if meta.len() != 2 * e + 2 || meta.first() != Some(&0) {
        return Err(err(
            "internal: stored forward: a plan's row offsets of the wrong size",
        ));
    }
    let (mut active, mut offsets) = (Vec::new(), vec![0usize]);
    for (i, w) in meta[..=e].windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(err(
                "internal: stored forward: a plan's row offsets decrease",
            ));
        }
        if w[1] > w[0] {
            active.push(i as u32);
            offsets.push(w[1] as usize);
        }
    }
    Ok((active, offsets))
}

/// One group laid out slot-major (module docs): its kernels' `meta` and where each of its rows goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupLayout {
    /// `[slots + 1]` row offsets (absolute rows of the plan, starting at the group's first row), then
    /// `[slots + 1]` tile offsets of 64-row tiles: the `meta` of the group's two products over the slot bank.
    pub meta: Vec<u32>,
    /// The group's first plan row `R₀`.
    pub first: usize,
    /// Per row of the group (plan row `R₀ + i`), the row it is computed in.
    pub dst: Vec<u32>,
}

/// The slot-major layout of one group: `bounds` are the group's row offsets in the plan (`[group + 1]`, absolute,
/// one block per expert of the group, ascending expert), `placements` its experts' slots (same order), `slots`
/// the slot bank's size and `bm` the kernels' rows per tile.
///
/// # Errors
/// [`MoeError::Backend`] when the sizes disagree, a slot is outside the bank or used twice (bugs).
pub(super) fn group_layout(
    bounds: &[usize],
    placements: &[Placement],
    slots: usize,
    bm: usize,
) -> Result<GroupLayout, MoeError> {
    let bad = |what: &str| Err(err(format!("internal: stored forward: {what}")));
    if bounds.len() != placements.len() + 1 || bounds.windows(2).any(|w| w[1] < w[0]) || bm == 0 {
        return bad("group bounds do not match its placements");
    }
    let first = bounds[0];
    // Per slot, the group position of the expert it holds.
    let mut by_slot: Vec<Option<usize>> = vec![None; slots];
    for (j, p) in placements.iter().enumerate() {
        match by_slot.get_mut(p.slot) {
            Some(s @ None) => *s = Some(j),
            _ => return bad("a slot outside the bank or used twice in one group"),
        }
    }
    let to_u32 = |v: usize| u32::try_from(v).map_err(|_| err("stored forward: rows beyond u32"));
    let mut meta = vec![0u32; 2 * slots + 2];
    let mut dst = vec![0u32; bounds[placements.len()] - first];
    let (mut row, mut tiles) = (first, 0usize);
    meta[0] = to_u32(row)?;
    for (s, held) in by_slot.iter().enumerate() {
        if let Some(j) = *held {
            let (r0, r1) = (bounds[j], bounds[j + 1]);
            for (i, d) in dst[r0 - first..r1 - first].iter_mut().enumerate() {
                *d = to_u32(row + i)?;
            }
            row += r1 - r0;
            tiles += (r1 - r0).div_ceil(bm);
        }
        meta[s + 1] = to_u32(row)?;
        meta[slots + 2 + s] = to_u32(tiles)?;
    }
    Ok(GroupLayout { meta, first, dst })
}

/// `values` (one per plan row) moved to the rows `map` gives (`map[r]`: where plan row `r` is computed).
pub(super) fn permute<T: Copy + Default>(values: &[T], map: &[u32]) -> Vec<T> {
    let mut out = vec![T::default(); values.len()];
    for (v, &to) in values.iter().zip(map) {
        if let Some(o) = out.get_mut(to as usize) {
            *o = *v;
        }
    }
    out
}

/// The combine's token entries (plan row + 1, 0: none) pointed at the rows `map` gives.
pub(super) fn remap_entries(entries: &[u32], map: &[u32]) -> Vec<u32> {
    entries
        .iter()
        .map(|&s| match s.checked_sub(1) {
            Some(r) => map.get(r as usize).map_or(0, |&to| to + 1),
            None => 0,
        })
        .collect()
}

/// One step of a group on the device, in the order the host issues them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The copy stream waits for the compute stream's work enqueued so far (the products of earlier groups,
    /// which may still read a slot this group overwrites).
    CopyWaitsCompute,
    /// The host waits for staging buffer `buf`'s previous copy, loads `expert` from the source into it (packed,
    /// converted), and enqueues its copy into `slot` on the copy stream, then records `buf`'s event there.
    Load {
        expert: u32,
        slot: usize,
        buf: usize,
    },
    /// The compute stream waits for the copy stream's work so far (this group's copies).
    ComputeWaitsCopies,
    /// The group's two products on the compute stream.
    Products,
}

/// The steps of one group: its loads (staging buffers taken round-robin from `next_buf`, a ring of `ring`),
/// ordered after the compute so far and before the group's products; no waits for a group of hits only.
pub(super) fn group_steps(
    placements: &[Placement],
    ring: usize,
    next_buf: &mut usize,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let ring = ring.max(1);
    for p in placements.iter().filter(|p| p.load) {
        if steps.is_empty() {
            steps.push(Step::CopyWaitsCompute);
        }
        steps.push(Step::Load {
            expert: p.expert,
            slot: p.slot,
            buf: *next_buf % ring,
        });
        *next_buf = (*next_buf + 1) % ring;
    }
    if !steps.is_empty() {
        steps.push(Step::ComputeWaitsCopies);
    }
    steps.push(Step::Products);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(expert: u32, slot: usize, load: bool) -> Placement {
        Placement {
            expert,
            slot,
            load,
            evicted: None,
        }
    }

    #[test]
    fn active_experts_from_the_plan_meta() {
        // E = 4: expert 0 has 2 rows, 1 none, 2 has 70 rows (two tiles), 3 has 1.
        let meta = [0, 2, 2, 72, 73, 0, 1, 1, 3, 4];
        let (active, offsets) = active_of_meta(&meta, 4).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(active, vec![0, 2, 3]);
        assert_eq!(offsets, vec![0, 2, 72, 73]);
        assert!(active_of_meta(&meta[..9], 4).is_err());
        assert!(active_of_meta(&[0, 3, 2, 0, 1, 1], 2).is_err());
    }

    /// A group of experts in slots 2, 0, 3 (of 4) at plan rows 10.. : rows laid out slot-major (slot 0's expert
    /// first), each expert's rows in order, the meta over slots with slot 1 empty, tiles per expert block.
    #[test]
    fn group_rows_go_slot_major() {
        let bounds = [10, 13, 80, 81];
        let p = [placed(5, 2, true), placed(7, 0, false), placed(9, 3, true)];
        let g = group_layout(&bounds, &p, 4, 64).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.first, 10);
        // Slot 0 (expert 7, 67 rows) at 10..77, slot 1 empty, slot 2 (expert 5, 3 rows) 77..80, slot 3 80..81.
        assert_eq!(&g.meta[..5], &[10, 77, 77, 80, 81]);
        assert_eq!(&g.meta[5..], &[0, 2, 2, 3, 4]);
        let mut want: Vec<u32> = (77..80).collect();
        want.extend(10..77);
        want.push(80);
        assert_eq!(g.dst, want);
        // Every row goes to a distinct row of the group's range.
        let mut seen = g.dst.clone();
        seen.sort_unstable();
        assert_eq!(seen, (10..81).collect::<Vec<u32>>());
        // Slots in the experts' order give the plan's own layout.
        let q = [placed(5, 0, true), placed(7, 1, true), placed(9, 2, true)];
        let g = group_layout(&bounds, &q, 3, 64).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.dst, (10..81).collect::<Vec<u32>>());
        assert_eq!(&g.meta, &[10, 13, 80, 81, 0, 1, 3, 4]);
    }

    #[test]
    fn bad_groups_are_refused() {
        let p = [placed(1, 0, true), placed(2, 0, true)];
        assert!(group_layout(&[0, 1, 2], &p, 2, 64).is_err());
        assert!(group_layout(&[0, 1], &p, 2, 64).is_err());
        assert!(group_layout(&[0, 1], &[placed(1, 3, true)], 2, 64).is_err());
        assert!(group_layout(&[2, 1], &[placed(1, 0, true)], 2, 64).is_err());
    }

    #[test]
    fn values_and_entries_follow_the_rows() {
        let map = [2, 0, 1];
        assert_eq!(
            permute(&[10.0f32, 20.0, 30.0], &map),
            vec![20.0, 30.0, 10.0]
        );
        assert_eq!(remap_entries(&[1, 0, 3, 2, 9], &map), vec![3, 0, 2, 1, 0]);
    }

    #[test]
    fn copies_wait_for_compute_and_products_for_copies() {
        let mut buf = 0;
        // Hits only: no stream waits at all.
        let s = group_steps(&[placed(1, 0, false)], 2, &mut buf);
        assert_eq!(s, vec![Step::Products]);
        // Two loads and a hit: the copy stream waits first, buffers round-robin, products after the copies.
        let p = [placed(1, 0, true), placed(2, 1, false), placed(3, 2, true)];
        let s = group_steps(&p, 2, &mut buf);
        assert_eq!(
            s,
            vec![
                Step::CopyWaitsCompute,
                Step::Load {
                    expert: 1,
                    slot: 0,
                    buf: 0
                },
                Step::Load {
                    expert: 3,
                    slot: 2,
                    buf: 1
                },
                Step::ComputeWaitsCopies,
                Step::Products,
            ]
        );
        // The ring goes on across groups.
        let s = group_steps(&[placed(4, 1, true)], 2, &mut buf);
        assert_eq!(
            s[1],
            Step::Load {
                expert: 4,
                slot: 1,
                buf: 0
            }
        );
    }
}
