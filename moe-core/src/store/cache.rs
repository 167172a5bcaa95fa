//! The resident slots of one layer and the bookkeeping of which expert sits where: one mechanism for the live
//! store (a backend's forward) and the simulator (`moe cache-sim`), so a simulated hit rate is the one a live run
//! of the same accesses gets.

use crate::error::MoeError;

use super::policy::EvictionPolicy;

/// One expert of a group, placed: its slot and whether the slot must be loaded first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The expert.
    pub expert: u32,
    /// Its resident slot.
    pub slot: usize,
    /// Whether it was missing: the caller loads it into `slot` (and calls [`SlotCache::invalidate`] if that
    /// load fails).
    pub load: bool,
    /// The expert the load evicts from `slot`, if the slot held one.
    pub evicted: Option<u32>,
}

/// Counts of one cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Accesses (one per expert of each group).
    pub accesses: u64,
    /// Accesses that found the expert resident.
    pub hits: u64,
    /// Loads (misses).
    pub loads: u64,
    /// Loads that evicted a resident expert (demand loads and prefetches).
    pub evictions: u64,
    /// Experts placed by [`SlotCache::prefetch`] (loaded ahead of demand; not accesses).
    pub prefetches: u64,
    /// Hits on an expert a prefetch placed, before any other access to it.
    pub prefetch_hits: u64,
}

impl CacheStats {
    /// Hits over accesses (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        if self.accesses == 0 {
            0.0
        } else {
            self.hits as f64 / self.accesses as f64
        }
    }
}

/// The slots of one layer: at most `slots` of `E` experts resident, a policy choosing victims.
#[derive(Debug)]
pub struct SlotCache {
    expert_slot: Vec<Option<usize>>,
    slot_expert: Vec<Option<u32>>,
    policy: Box<dyn EvictionPolicy>,
    time: u64,
    stats: CacheStats,
    /// Per expert: placed by a prefetch and not accessed since.
    prefetched: Vec<bool>,
}

impl SlotCache {
    /// Empty slots for `n_experts` experts.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for zero slots or zero experts.
    pub fn new(
        n_experts: usize,
        slots: usize,
        policy: Box<dyn EvictionPolicy>,
    ) -> Result<Self, MoeError> {
        if slots == 0 || n_experts == 0 {
            return Err(MoeError::config(
                "expert cache",
                format!("{slots} slots for {n_experts} experts"),
                "at least one slot and one expert",
            ));
        }
        Ok(SlotCache {
            expert_slot: vec![None; n_experts],
            slot_expert: vec![None; slots.min(n_experts)],
            policy,
            time: 0,
            stats: CacheStats::default(),
            prefetched: vec![false; n_experts],
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slot_expert.len()
    }

    /// Number of experts `E`.
    pub fn n_experts(&self) -> usize {
        self.expert_slot.len()
    }

    /// The slot `expert` is resident in.
    pub fn slot_of(&self, expert: u32) -> Option<usize> {
        self.expert_slot.get(expert as usize).copied().flatten()
    }

    /// The expert resident in each slot.
    pub fn residents(&self) -> &[Option<u32>] {
        &self.slot_expert
    }

    /// The counts so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// The number of accesses so far (the time of the next one).
    pub fn time(&self) -> u64 {
        self.time
    }

    /// Splits a request (the distinct experts one forward, or one token, needs) into groups that fit the slots
    /// together: ascending expert id, `slots` at a time. A pure function of the request, so the access order, and
    /// with it Belady's future, is the request order.
    /// The iterator does not borrow the cache, so each group can be admitted while iterating.
    pub fn groups<'a>(&self, request: &'a [u32]) -> impl Iterator<Item = &'a [u32]> + use<'a> {
        request.chunks(self.slots())
    }

    /// Places one group (distinct experts, at most [`SlotCache::slots`], each `< E`): one access per expert, in
    /// order; a missing expert takes a free slot or evicts the policy's victim among the residents outside the
    /// group. The caller loads every placement with `load` before using the group.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a group larger than the slots, a repeated expert or an expert `>= E`; the
    /// cache is unchanged then.
    pub fn admit(&mut self, group: &[u32]) -> Result<Vec<Placement>, MoeError> {
        self.check_group(group)?;
        let mut out = Vec::with_capacity(group.len());
        for &e in group {
            let time = self.time;
            self.time += 1;
            self.stats.accesses += 1;
            if let Some(slot) = self.slot_of(e) {
                self.stats.hits += 1;
                if std::mem::take(&mut self.prefetched[e as usize]) {
                    self.stats.prefetch_hits += 1;
                }
                self.policy.on_access(e, time, true);
                out.push(Placement {
                    expert: e,
                    slot,
                    load: false,
                    evicted: None,
                });
                continue;
            }
            self.policy.on_access(e, time, false);
            self.stats.loads += 1;
            out.push(self.place(e, group, time));
        }
        Ok(out)
    }

    /// Places the missing experts of `experts` ahead of demand (the next layer's predicted experts): each takes a
    /// free slot or evicts the policy's victim among the residents outside `experts`; at most
    /// [`SlotCache::slots`] are placed (the first ones), experts `>= E` and repeats are skipped. A prefetch is
    /// shown to the policy as an access (so it is not the next victim) but is not counted as one; a later access
    /// that finds it counts as a hit and a prefetch hit. The caller loads every returned placement.
    pub fn prefetch(&mut self, experts: &[u32]) -> Vec<Placement> {
        let mut want: Vec<u32> = Vec::new();
        for &e in experts {
            if (e as usize) < self.n_experts() && !want.contains(&e) && want.len() < self.slots() {
                want.push(e);
            }
        }
        let mut out = Vec::new();
        for &e in &want {
            if self.slot_of(e).is_some() {
                continue;
            }
            let time = self.time;
            self.time += 1;
            self.policy.on_access(e, time, false);
            self.stats.prefetches += 1;
            self.prefetched[e as usize] = true;
            out.push(self.place(e, &want, time));
        }
        out
    }

    /// Puts missing expert `e` into a free slot or the slot of the policy's victim among the residents outside
    /// `protect` (at most `slots` experts including `e`, which is not resident, so a candidate exists).
    fn place(&mut self, e: u32, protect: &[u32], time: u64) -> Placement {
        let (slot, evicted) = match self.slot_expert.iter().position(Option::is_none) {
            Some(free) => (free, None),
            None => {
                let mut candidates: Vec<u32> = self
                    .slot_expert
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|r| !protect.contains(r))
                    .collect();
                candidates.sort_unstable();
                let pick = self.policy.victim(&candidates, time);
                // A policy returning a non-candidate is a bug; fall back to the first candidate.
                let victim = if candidates.contains(&pick) {
                    pick
                } else {
                    candidates.first().copied().unwrap_or(pick)
                };
                let slot = self.slot_of(victim).unwrap_or(0);
                self.expert_slot[victim as usize] = None;
                self.prefetched[victim as usize] = false;
                self.policy.on_evict(victim);
                self.stats.evictions += 1;
                (slot, Some(victim))
            }
        };
        self.slot_expert[slot] = Some(e);
        self.expert_slot[e as usize] = Some(slot);
        Placement {
            expert: e,
            slot,
            load: true,
            evicted,
        }
    }

    /// The load into `slot` failed: the slot holds nothing usable and is free again.
    pub fn invalidate(&mut self, slot: usize) {
        if let Some(Some(e)) = self.slot_expert.get(slot).copied() {
            self.expert_slot[e as usize] = None;
            self.prefetched[e as usize] = false;
            self.slot_expert[slot] = None;
            self.policy.on_evict(e);
        }
    }

    fn check_group(&self, group: &[u32]) -> Result<(), MoeError> {
        if group.len() > self.slots() {
            return Err(MoeError::config(
                "expert cache group",
                format!("{} experts", group.len()),
                format!("at most {} (the slots)", self.slots()),
            ));
        }
        for (i, &e) in group.iter().enumerate() {
            if e as usize >= self.n_experts() || group[..i].contains(&e) {
                return Err(MoeError::config(
                    "expert cache group",
                    format!("{group:?}"),
                    format!("distinct experts below {}", self.n_experts()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::policy::Lru;

    #[test]
    fn lru_places_evicts_and_counts() {
        let mut c = SlotCache::new(4, 2, Box::new(Lru::new(4))).unwrap_or_else(|e| panic!("{e}"));
        let p = c.admit(&[0, 1]).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.iter().all(|p| p.load));
        let p = c.admit(&[2]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p[0].evicted, p[0].slot), (Some(0), 0));
        let p = c.admit(&[1]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!p[0].load);
        assert_eq!(
            c.stats(),
            CacheStats {
                accesses: 4,
                hits: 1,
                loads: 3,
                evictions: 1,
                ..CacheStats::default()
            }
        );
        // A prefetch of 3 evicts the least recently used (2 was accessed before 1); a later access hits it.
        let p = c.prefetch(&[3, 1, 3]);
        assert_eq!((p.len(), p[0].expert, p[0].evicted), (1, 3, Some(2)));
        let p = c.admit(&[3]).unwrap_or_else(|e| panic!("{e}"));
        assert!(!p[0].load);
        let s = c.stats();
        assert_eq!((s.prefetches, s.prefetch_hits, s.hits), (1, 1, 2));
        assert!(c.admit(&[0, 1, 2]).is_err());
        assert!(c.admit(&[3, 3]).is_err());
        assert!(c.admit(&[4]).is_err());
        c.invalidate(1);
        assert_eq!(c.slot_of(1), None);
    }
}
