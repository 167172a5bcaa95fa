//! Eviction policies and the trace simulator on hand-made traces (victims spelled out), Belady's MIN against a
//! brute-force optimum, and no online policy above Belady.

use std::collections::HashMap;

use moe_core::store::cache::{CacheStats, SlotCache};
use moe_core::store::policy::{
    Belady, EvictionPolicy, Lfru, Lfu, Lru, Pin, PolicyContext, PolicyKind, Stale,
};
use moe_core::store::sim::{Granularity, Prefetch, SimConfig, expert_frequencies, simulate, sweep};
use moe_core::store::trace::{LayerRecord, RoutingTrace, TraceHeader};

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Replays `seq` one expert per group; returns the hits and, per access, the expert it evicted.
fn replay(
    policy: Box<dyn EvictionPolicy>,
    e: usize,
    slots: usize,
    seq: &[u32],
) -> (u64, Vec<Option<u32>>) {
    let mut c = ok(SlotCache::new(e, slots, policy));
    let victims = seq.iter().map(|&x| ok(c.admit(&[x]))[0].evicted).collect();
    (c.stats().hits, victims)
}

fn built(kind: PolicyKind, e: usize, slots: usize, seq: &[u32]) -> Box<dyn EvictionPolicy> {
    let freq = counts(e, seq);
    ok(kind.build(&PolicyContext {
        n_experts: e,
        slots,
        future: Some(seq),
        frequencies: Some(&freq),
    }))
}

fn counts(e: usize, seq: &[u32]) -> Vec<u64> {
    let mut f = vec![0u64; e];
    for &x in seq {
        f[x as usize] += 1;
    }
    f
}

const N: Option<u32> = None;

#[test]
fn lru_evicts_the_oldest_last_access() {
    let (hits, v) = replay(Box::new(Lru::new(4)), 4, 2, &[0, 1, 0, 2, 1, 3]);
    assert_eq!(v, vec![N, N, N, Some(1), Some(0), Some(2)]);
    assert_eq!(hits, 1);
}

#[test]
fn lfu_evicts_the_fewest_accesses_keeping_counts_across_evictions() {
    // 0 twice, 1 three times; 2 evicts 0 (2 < 3). 0 comes back with count 3 (kept: perfect LFU), so 2 (count 1)
    // goes; then 2 (count 2) meets 0 and 1 at 3 each: the least recent, 1, goes. An in-cache LFU would have
    // restarted 0 at 1 and evicted 0 last.
    let (hits, v) = replay(Box::new(Lfu::new(3)), 3, 2, &[0, 0, 1, 1, 1, 2, 0, 2]);
    assert_eq!(v, vec![N, N, N, N, N, Some(0), Some(2), Some(1)]);
    assert_eq!(hits, 3);
}

#[test]
fn lfru_weighs_frequency_against_recency() {
    // E = 4: half-life 4 accesses. 0 three times (CRF 2.55 at t2), then 1: 2 evicts 1 (where LRU would evict 0);
    // 3 evicts 2; 1 returns with its old value decayed (log2 1.59 + 6/4 > log2 2.55 + 2/4) and evicts 3; 2
    // then evicts 0 although 0 has the most accesses (LFU would evict 1).
    let seq = [0, 0, 0, 1, 2, 3, 1, 2];
    let (_, v) = replay(Box::new(Lfru::new(4)), 4, 2, &seq);
    assert_eq!(v, vec![N, N, N, N, Some(1), Some(2), Some(3), Some(0)]);
    let (_, lru) = replay(Box::new(Lru::new(4)), 4, 2, &seq);
    let (_, lfu) = replay(Box::new(Lfu::new(4)), 4, 2, &seq);
    assert_eq!((lru[4], lfu[7]), (Some(0), Some(1)));
}

#[test]
fn pin_keeps_the_most_frequent_and_runs_lru_on_the_rest() {
    let freq = [1u64, 10, 5, 0];
    let (hits, v) = replay(Box::new(Pin::new(&freq, 2)), 4, 2, &[1, 0, 2, 3, 1]);
    assert_eq!(v, vec![N, N, Some(0), Some(2), N]);
    assert_eq!(hits, 1);
    // p = min(slots, E) / 2, ties to the lower id.
    assert!(Pin::new(&freq, 1).pinned().is_empty());
    assert_eq!(Pin::new(&freq, 3).pinned(), vec![1]);
    assert_eq!(Pin::new(&freq, 4).pinned(), vec![1, 2]);
    assert_eq!(Pin::new(&[3, 3, 3, 3], 9).pinned(), vec![0, 1]);
    // A group that needs every unpinned slot evicts a pinned expert after all.
    let mut c = ok(SlotCache::new(4, 2, Box::new(Pin::new(&freq, 2))));
    ok(c.admit(&[1, 0]));
    let p = ok(c.admit(&[2, 3]));
    assert_eq!((p[0].evicted, p[1].evicted), (Some(0), Some(1)));
}

#[test]
fn stale_evicts_the_latest_predicted_next_use() {
    // The hand trace of a public SpecMD least-stale port (cap 3): intervals 3 for A, B, C; D evicts A
    // (predicted 6 + 3 = 9, the latest); A evicts D (7 + 1 = 8 ties C's 5 + 3, the more recent last access
    // goes); B and C hit with intervals 3.5; D evicts C (10 + 3.5).
    let (a, b, c, d) = (1, 2, 3, 4);
    let seq = [a, b, c, a, b, c, a, d, a, b, c, d];
    let (hits, v) = replay(Box::new(Stale::new(5)), 5, 3, &seq);
    let mut want = vec![N; seq.len()];
    want[7] = Some(a);
    want[8] = Some(d);
    want[11] = Some(c);
    assert_eq!(v, want);
    assert_eq!(hits, 6);
}

#[test]
fn belady_evicts_the_farthest_next_use() {
    let seq = [0, 1, 2, 0, 1, 3, 0, 1];
    let (hits, v) = replay(Box::new(Belady::new(4, &seq)), 4, 2, &seq);
    // t2: 0 next at 3, 1 at 4 -> 1; t4: 2 never again -> 2; t5: 0 at 6, 1 at 7 -> 1; t7: both never -> lower id 0.
    assert_eq!(v, vec![N, N, Some(1), N, Some(2), Some(1), N, Some(0)]);
    assert_eq!(hits, 2);
}

#[test]
fn build_refuses_what_a_policy_cannot_run_without() {
    let ctx = PolicyContext {
        n_experts: 4,
        slots: 2,
        future: None,
        frequencies: None,
    };
    for kind in [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Lfru,
        PolicyKind::Stale,
    ] {
        assert_eq!(ok(kind.build(&ctx)).kind(), kind);
    }
    let msg = |k: PolicyKind, c: &PolicyContext<'_>| match k.build(c) {
        Ok(_) => panic!("{k} built"),
        Err(e) => e.to_string(),
    };
    assert!(msg(PolicyKind::Belady, &ctx).contains("offline"));
    assert!(msg(PolicyKind::Pin, &ctx).contains("frequencies"));
    let short = [1u64, 2, 3];
    let bad = PolicyContext {
        frequencies: Some(&short),
        ..ctx.clone()
    };
    assert!(msg(PolicyKind::Pin, &bad).contains("3"));
}

/// A small deterministic generator (xorshift64*), so the random tests replay exactly.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// The most hits any eviction choices reach on `seq` (single-expert groups), over every choice at every miss.
fn brute_force(seq: &[u32], slots: usize) -> u64 {
    fn go(
        seq: &[u32],
        i: usize,
        set: u32,
        slots: usize,
        memo: &mut HashMap<(usize, u32), u64>,
    ) -> u64 {
        if i == seq.len() {
            return 0;
        }
        if let Some(&v) = memo.get(&(i, set)) {
            return v;
        }
        let bit = 1u32 << seq[i];
        let best = if set & bit != 0 {
            1 + go(seq, i + 1, set, slots, memo)
        } else if (set.count_ones() as usize) < slots {
            go(seq, i + 1, set | bit, slots, memo)
        } else {
            (0..32)
                .filter(|v| set & (1 << v) != 0)
                .map(|v| go(seq, i + 1, (set & !(1 << v)) | bit, slots, memo))
                .max()
                .unwrap_or(0)
        };
        memo.insert((i, set), best);
        best
    }
    go(seq, 0, 0, slots, &mut HashMap::new())
}

#[test]
fn belady_is_optimal_and_no_policy_beats_it_on_random_traces() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut strict = 0;
    for _ in 0..600 {
        let e = 1 + rng.below(5) as usize;
        let slots = 1 + rng.below(3) as usize;
        let len = 1 + rng.below(12) as usize;
        let seq: Vec<u32> = (0..len).map(|_| rng.below(e as u64) as u32).collect();
        let (opt, _) = replay(built(PolicyKind::Belady, e, slots, &seq), e, slots, &seq);
        assert_eq!(
            opt,
            brute_force(&seq, slots.min(e)),
            "{seq:?} slots {slots}"
        );
        for kind in PolicyKind::ALL {
            let (h, v) = replay(built(kind, e, slots, &seq), e, slots, &seq);
            assert!(
                h <= opt,
                "{kind} {h} > belady {opt} on {seq:?} slots {slots}"
            );
            // Pure: the same accesses, the same victims.
            assert_eq!(replay(built(kind, e, slots, &seq), e, slots, &seq), (h, v));
            strict += usize::from(h < opt);
        }
    }
    assert!(
        strict > 100,
        "the traces never separate the policies from the bound ({strict})"
    );
}

fn header(l: usize, e: usize) -> TraceHeader {
    TraceHeader {
        n_layers: l,
        n_experts: e,
        top_k: 2,
        expert_bytes: 100,
        model: "hand-made".into(),
        router: "softmax-topk".into(),
    }
}

/// A record from per-token expert lists (ascending).
fn rec(tokens: &[&[u32]]) -> LayerRecord {
    let mut offsets = vec![0u32];
    let mut experts = Vec::new();
    for t in tokens {
        experts.extend_from_slice(t);
        offsets.push(experts.len() as u32);
    }
    LayerRecord {
        offsets,
        experts,
        predicted: None,
    }
}

fn with_pred(mut r: LayerRecord, tokens: &[&[u32]]) -> LayerRecord {
    let p = rec(tokens);
    r.predicted = Some((p.offsets, p.experts));
    r
}

fn trace(l: usize, e: usize, steps: Vec<Vec<LayerRecord>>) -> RoutingTrace {
    let mut t = ok(RoutingTrace::new(header(l, e)));
    for s in steps {
        ok(t.push_step(s));
    }
    t
}

/// L = 2, E = 4, two steps of two tokens.
fn hand_trace() -> RoutingTrace {
    trace(
        2,
        4,
        vec![
            vec![rec(&[&[0, 1], &[1, 2]]), rec(&[&[3], &[0, 3]])],
            vec![rec(&[&[0, 2], &[3]]), rec(&[&[3], &[1]])],
        ],
    )
}

fn cfg(policy: PolicyKind, slots: usize, granularity: Granularity) -> SimConfig {
    SimConfig {
        policy,
        slots,
        granularity,
        prefetch: Prefetch::None,
    }
}

fn stats(accesses: u64, hits: u64, loads: u64, evictions: u64) -> CacheStats {
    CacheStats {
        accesses,
        hits,
        loads,
        evictions,
        ..CacheStats::default()
    }
}

#[test]
fn simulated_counts_equal_hand_counts_and_granularity_matters() {
    // Token, LRU, 2 slots. Layer 0 sees [0,1] [1,2] [0,2] [3]: 0 1 miss; 1 hit, 2 evicts 0; 0 evicts 1 (2 is in
    // its group), 2 hit; 3 evicts 0. Layer 1 sees [3] [0,3] [3] [1]: 3, 0 miss; 3, 3 hit; 1 evicts 0.
    let r = ok(simulate(
        &hand_trace(),
        &cfg(PolicyKind::Lru, 2, Granularity::Token),
    ));
    assert_eq!(r.per_layer, vec![stats(7, 2, 5, 3), stats(5, 2, 3, 1)]);
    assert_eq!(r.total, stats(12, 4, 8, 4));
    assert_eq!((r.hit_rate, r.bytes_moved), (4.0 / 12.0, 800));
    assert_eq!((r.prefetch_precision, r.prefetch_recall), (None, None));
    // Step: layer 0 sees [0,1,2] = [0,1] [2] then [0,2,3] = [0,2] [3]; layer 1 [0,3] then [1,3]. The union
    // folds the repeats of a step into one access: fewer accesses and fewer hits.
    let r = ok(simulate(
        &hand_trace(),
        &cfg(PolicyKind::Lru, 2, Granularity::Step),
    ));
    assert_eq!(r.per_layer, vec![stats(6, 1, 5, 3), stats(4, 1, 3, 1)]);
    assert_eq!(r.bytes_moved, 800);
}

#[test]
fn gate_prefetch_places_the_predicted_experts_and_scores_them() {
    let t = trace(
        2,
        4,
        vec![vec![rec(&[&[0]]), with_pred(rec(&[&[2]]), &[&[2, 3]])]],
    );
    let mut c = cfg(PolicyKind::Lru, 2, Granularity::Token);
    c.prefetch = Prefetch::Gate;
    let r = ok(simulate(&t, &c));
    let l1 = r.per_layer[1];
    assert_eq!(
        (
            l1.accesses,
            l1.hits,
            l1.loads,
            l1.prefetches,
            l1.prefetch_hits
        ),
        (1, 1, 0, 2, 1)
    );
    assert_eq!(
        (r.prefetch_precision, r.prefetch_recall),
        (Some(0.5), Some(1.0))
    );
    assert_eq!(r.bytes_moved, 300);
    // Without predictions in the trace, gate prefetch is refused.
    assert!(simulate(&hand_trace(), &c).is_err());
}

#[test]
fn frequency_prefetch_learns_transitions_online() {
    // Tokens (layer 0 -> layer 1): 0 -> 1, 2 -> 3, 0 -> 1. One slot, top 1. The third token's layer 1 is
    // predicted from the first's transition (0 -> 1): the prefetch evicts 3 and the access hits it.
    let t = trace(
        2,
        4,
        vec![
            vec![rec(&[&[0]]), rec(&[&[1]])],
            vec![rec(&[&[2]]), rec(&[&[3]])],
            vec![rec(&[&[0]]), rec(&[&[1]])],
        ],
    );
    let mut c = cfg(PolicyKind::Lru, 1, Granularity::Token);
    c.prefetch = Prefetch::Frequency { top: 1 };
    let r = ok(simulate(&t, &c));
    assert_eq!(r.per_layer[0], stats(3, 0, 3, 2));
    assert_eq!(
        r.per_layer[1],
        CacheStats {
            prefetches: 1,
            prefetch_hits: 1,
            ..stats(3, 1, 2, 2)
        }
    );
    assert_eq!(r.prefetch_precision, Some(1.0));
    assert_eq!(r.prefetch_recall, Some(1.0 / 3.0));
    assert_eq!(r.bytes_moved, 600);
}

#[test]
fn bad_configurations_are_clear_errors() {
    let t = hand_trace();
    let err = |c: SimConfig| match simulate(&t, &c) {
        Ok(_) => panic!("{c:?} ran"),
        Err(e) => e.to_string(),
    };
    assert!(err(cfg(PolicyKind::Lru, 0, Granularity::Token)).contains("slot"));
    let mut c = cfg(PolicyKind::Belady, 2, Granularity::Token);
    c.prefetch = Prefetch::Frequency { top: 2 };
    assert!(err(c).contains("belady"));
    c.policy = PolicyKind::Lru;
    c.prefetch = Prefetch::Frequency { top: 0 };
    assert!(err(c).contains("top"));
    assert!(sweep(&t, &[], &[2], Granularity::Token, Prefetch::None).is_err());
    assert_eq!(ok(Granularity::parse("step")), Granularity::Step);
    assert!(Granularity::parse("batch").is_err());
    assert!(
        sweep(
            &t,
            &[PolicyKind::Lru],
            &[2, 0],
            Granularity::Token,
            Prefetch::None
        )
        .is_err()
    );
}

/// A random trace: `l` layers, `e` experts, steps of 1..=3 tokens with 1..=min(3, E) experts each.
fn random_trace(rng: &mut Rng, l: usize, e: usize, steps: usize) -> RoutingTrace {
    let mut all = Vec::new();
    for _ in 0..steps {
        let t = 1 + rng.below(3) as usize;
        let mut layers = Vec::new();
        for _ in 0..l {
            let mut tokens: Vec<Vec<u32>> = Vec::new();
            for _ in 0..t {
                let k = 1 + rng.below(e.min(3) as u64) as usize;
                let mut ids: Vec<u32> = Vec::new();
                while ids.len() < k {
                    let x = rng.below(e as u64) as u32;
                    if !ids.contains(&x) {
                        ids.push(x);
                    }
                }
                ids.sort_unstable();
                tokens.push(ids);
            }
            let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            layers.push(rec(&refs));
        }
        all.push(layers);
    }
    trace(l, e, all)
}

#[test]
fn belady_bounds_every_policy_and_full_slots_hit_all_but_first_uses() {
    let mut rng = Rng(7);
    for _ in 0..40 {
        let l = 1 + rng.below(3) as usize;
        let e = 3 + rng.below(5) as usize;
        let steps = 1 + rng.below(20) as usize;
        let t = random_trace(&mut rng, l, e, steps);
        for g in [Granularity::Token, Granularity::Step] {
            let slots: Vec<usize> = (1..=e + 1).collect();
            let rows = ok(sweep(&t, &PolicyKind::ALL, &slots, g, Prefetch::None));
            assert_eq!(rows.len(), 6 * slots.len());
            for row in &rows {
                let bound = rows
                    .iter()
                    .find(|b| b.policy == PolicyKind::Belady && b.slots == row.slots)
                    .map_or(0, |b| b.result.total.hits);
                assert!(
                    row.result.total.hits <= bound,
                    "{} at {} slots ({g:?})",
                    row.policy,
                    row.slots
                );
                if row.slots >= e {
                    let distinct: u64 = expert_frequencies(&t)
                        .iter()
                        .map(|f| f.iter().filter(|&&c| c > 0).count() as u64)
                        .sum();
                    let acc = row.result.total.accesses;
                    assert_eq!(
                        row.result.total.hits,
                        acc - distinct,
                        "{} ({g:?})",
                        row.policy
                    );
                    assert!(
                        (row.result.hit_rate - (1.0 - distinct as f64 / acc as f64)).abs() < 1e-12
                    );
                }
            }
        }
    }
}
