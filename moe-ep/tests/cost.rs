//! The all-to-all cost model: bytes and messages by hand, pairwise-exchange times by hand on a hierarchical
//! network, imbalance, presets, the ping-pong fit, the trace split, and a property test against an independent
//! byte count.

use moe_core::store::trace::{LayerRecord, RoutingTrace, TraceHeader};
use moe_core::{Assignment, Routing};
use moe_ep::Placement;
use moe_ep::cost::{self, Traffic};
use moe_ep::network::{self, Link, Network};
use moe_ep::plan::dispatch_plan;
use proptest::prelude::*;

/// A routing of `t` tokens over `e` experts: `tokens[i]` are token `i`'s experts.
fn routing(e: usize, tokens: &[&[u32]]) -> Routing {
    let mut kept = Vec::new();
    for (t, ex) in tokens.iter().enumerate() {
        for (rank, &x) in ex.iter().enumerate() {
            kept.push(Assignment {
                token: t as u32,
                expert: x,
                weight: 0.5,
                rank: rank as u16,
            });
        }
    }
    Routing::new(tokens.len(), e, tokens.len(), kept, Vec::new()).unwrap_or_else(|x| panic!("{x}"))
}

fn one_node(latency_us: f64, bandwidth_gb_s: f64) -> Network {
    let l = Link::new(latency_us, bandwidth_gb_s).unwrap_or_else(|x| panic!("{x}"));
    Network {
        name: "test".into(),
        intra: l,
        inter: l,
        ranks_per_node: None,
    }
}

fn close(a: f64, b: f64) -> bool {
    // Sums of a few terms of at most 1e4: 1e-9 relative is far above f64 rounding and far below any model term.
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// R = 2, E = 4 (rank 0 owns experts 0, 1; rank 1 owns 2, 3), d = 4.
fn two_ranks() -> Vec<Routing> {
    vec![
        // Rank 0: token 0 → {0, 2}, token 1 → {1, 3}, token 2 → {2}: to rank 1 experts 2 (2 rows) and 3 (1 row).
        routing(4, &[&[0, 2], &[1, 3], &[2]]),
        // Rank 1: token 0 → {0}, token 1 → {3}: to rank 0 expert 0 (1 row).
        routing(4, &[&[0], &[3]]),
    ]
}

#[test]
fn bytes_messages_and_rows_by_hand() {
    let p = Placement::contiguous(4, 2).unwrap_or_else(|x| panic!("{x}"));
    let plans: Vec<_> = two_ranks().iter().map(|r| dispatch_plan(r, &p)).collect();
    let t = Traffic::from_plans(&plans, 4).unwrap_or_else(|x| panic!("{x}"));
    // Dispatch 0 → 1: header 12 + 2 groups × 8 + 3 rows × d 4 × 4 bytes = 12 + 16 + 48 = 76.
    assert_eq!(t.dispatch(0, 1), 76);
    // Combine 1 → 0: dropped count 4 + 3 rows × 4 × 4 = 52.
    assert_eq!(t.combine(1, 0), 52);
    // Dispatch 1 → 0: 12 + 8 + 1 × 16 = 36; combine 0 → 1: 4 + 16 = 20.
    assert_eq!(t.dispatch(1, 0), 36);
    assert_eq!(t.combine(0, 1), 20);
    // Own messages are in the table (rank 0 to itself: 2 groups, 2 rows: 12 + 16 + 32 = 60) but not "sent".
    assert_eq!(t.dispatch(0, 0), 60);
    assert_eq!(t.bytes_sent(0), 76 + 20);
    assert_eq!(t.bytes_sent(1), 36 + 52);
    assert_eq!(t.bytes_received(0), 36 + 52);
    assert_eq!(t.bytes_received(1), 76 + 20);
    assert_eq!((t.messages_sent(0), t.messages_sent(1)), (2, 2));
    // Loads: rank 0's experts get 2 own rows + 1 from rank 1; rank 1's get 3 from rank 0 + 1 own.
    assert_eq!((t.rows_received(0), t.rows_received(1)), (3, 4));

    let c = cost::estimate(&t, &one_node(2.0, 1.0));
    // Imbalance = max / mean = 4 / 3.5.
    assert!(close(c.imbalance, 4.0 / 3.5), "{}", c.imbalance);
    assert_eq!(c.bytes_sent_per_rank, vec![96, 88]);
    assert_eq!(c.max_bytes_sent(), 96);
    assert!(close(c.mean_bytes_sent(), 92.0));
    // One round. Dispatch: max(2 + 76 / 1e3, 2 + 36 / 1e3) µs = 2.076 µs (1 GB/s = 1e3 bytes per µs).
    assert!(close(c.dispatch_ms, 2.076e-3), "{}", c.dispatch_ms);
    // Combine: max(2 + 20 / 1e3, 2 + 52 / 1e3) = 2.052 µs.
    assert!(close(c.combine_ms, 2.052e-3), "{}", c.combine_ms);
    assert!(close(c.total_ms, 4.128e-3));
    let same =
        cost::predict(&two_ranks(), 4, &one_node(2.0, 1.0)).unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(same, c);
}

#[test]
fn empty_messages_are_not_sent() {
    // Rank 0 sends only to itself, rank 1 only to rank 0.
    let rs = vec![routing(2, &[&[0]]), routing(2, &[&[0]])];
    let c = cost::predict(&rs, 2, &one_node(1.0, 1.0)).unwrap_or_else(|x| panic!("{x}"));
    // 1 → 0: 12 + 8 + 1 × 2 × 4 = 28; combine 0 → 1: 4 + 8 = 12.
    assert_eq!(c.bytes_sent_per_rank, vec![12, 28]);
    assert_eq!(c.messages_per_rank, vec![1, 1]);
    assert_eq!(c.rows_per_rank, vec![2, 0]);
    // Max 2 over mean 1.
    assert!(close(c.imbalance, 2.0));
    assert!(close(c.dispatch_ms, (1.0 + 0.028) / 1e3));
}

#[test]
fn pairwise_exchange_by_hand_on_a_hierarchical_network() {
    // Ranks 0 and 1 on node 0, rank 2 on node 1. Intra: α 1 µs, 10 GB/s (1e4 B/µs); inter: α 5 µs, 1 GB/s.
    let net = Network {
        name: "two nodes".into(),
        intra: Link::new(1.0, 10.0).unwrap_or_else(|x| panic!("{x}")),
        inter: Link::new(5.0, 1.0).unwrap_or_else(|x| panic!("{x}")),
        ranks_per_node: Some(2),
    };
    let b = [[0u64, 10_000, 2_000], [0, 0, 1_000], [3_000, 0, 0]];
    let t = cost::pairwise_exchange_us(3, &net, |x, y| b[x][y]);
    // Round 1 (r → r + 1): 0 → 1 intra 1 + 1 = 2; 1 → 2 inter 5 + 1 = 6; 2 → 0 inter 5 + 3 = 8.
    //   rank 0: max(send 2, recv 8) = 8; rank 1: max(6, 2) = 6; rank 2: max(8, 6) = 8 → round 8.
    // Round 2 (r → r + 2): 0 → 2 inter 5 + 2 = 7; 1 → 0 and 2 → 1 empty (0) → round 7.
    assert!(close(t, 15.0), "{t}");
    // R = 2 over the inter link (one rank per node): one round, max(5 + 1, 5 + 0.5) = 6.
    let net1 = Network {
        ranks_per_node: Some(1),
        ..net.clone()
    };
    let t2 = cost::pairwise_exchange_us(2, &net1, |x, _| if x == 0 { 1_000 } else { 500 });
    assert!(close(t2, 6.0), "{t2}");
    // The same two ranks on one node take the intra link: max(1 + 0.1, 1 + 0.05) = 1.1.
    let t2 = cost::pairwise_exchange_us(2, &net, |x, _| if x == 0 { 1_000 } else { 500 });
    assert!(close(t2, 1.1), "{t2}");
    assert_eq!(cost::pairwise_exchange_us(1, &net, |_, _| 1_000), 0.0);
}

#[test]
fn a_balanced_exchange_costs_r_minus_one_rounds_of_one_message() {
    // R = 4, E = 4: every rank's 4 tokens go one to each expert, so every rank sends each other rank one group of
    // one row: 12 + 8 + d 8 × 4 = 52 bytes, and gets back 4 + 32 = 36.
    let rs: Vec<_> = (0..4)
        .map(|_| routing(4, &[&[0], &[1], &[2], &[3]]))
        .collect();
    let (alpha, beta) = (3.0, 2.0);
    let c = cost::predict(&rs, 8, &one_node(alpha, beta)).unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(c.bytes_sent_per_rank, vec![3 * (52 + 36); 4]);
    assert_eq!(c.bytes_received_per_rank, vec![3 * (52 + 36); 4]);
    assert_eq!(c.messages_per_rank, vec![6; 4]);
    assert_eq!(c.rows_per_rank, vec![4; 4]);
    assert!(close(c.imbalance, 1.0));
    // Thakur et al.: (R − 1)(α + n / β), β = 2 GB/s = 2e3 B/µs.
    assert!(close(c.dispatch_ms * 1e3, 3.0 * (alpha + 52.0 / 2e3)));
    assert!(close(c.combine_ms * 1e3, 3.0 * (alpha + 36.0 / 2e3)));
}

#[test]
fn ranks_beyond_experts_and_mixed_experts_are_refused() {
    let rs: Vec<_> = (0..3).map(|_| routing(2, &[&[0]])).collect();
    let e = cost::predict(&rs, 4, &one_node(1.0, 1.0));
    assert!(e.is_err_and(|x| x.to_string().contains("E = 2")));
    let mixed = vec![routing(2, &[&[0]]), routing(3, &[&[0]])];
    assert!(cost::predict(&mixed, 4, &one_node(1.0, 1.0)).is_err());
    assert!(cost::predict(&[], 4, &one_node(1.0, 1.0)).is_err());
    assert!(cost::check_ranks(8, 8).is_ok());
    assert!(cost::check_ranks(8, 0).is_err());
    assert!(Traffic::new(0).is_err());
    // A plan for 2 owners added to the traffic of 3 ranks.
    let p = dispatch_plan(
        &routing(2, &[&[0]]),
        &Placement::contiguous(2, 2).unwrap_or_else(|x| panic!("{x}")),
    );
    let mut t = Traffic::new(3).unwrap_or_else(|x| panic!("{x}"));
    assert!(t.add_source(0, &p, 4).is_err());
    let mut t = Traffic::new(2).unwrap_or_else(|x| panic!("{x}"));
    assert!(t.add_source(2, &p, 4).is_err());
}

#[test]
fn one_rank_sends_nothing() {
    let c = cost::predict(&[routing(2, &[&[0, 1]])], 4, &one_node(1.0, 1.0))
        .unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(c.bytes_sent_per_rank, vec![0]);
    assert_eq!(c.rows_per_rank, vec![2]);
    assert_eq!((c.total_ms, c.imbalance), (0.0, 1.0));
}

#[test]
fn presets_links_and_the_ping_pong_fit() {
    for name in network::PRESETS {
        let n = Network::preset(name).unwrap_or_else(|x| panic!("{x}"));
        n.check().unwrap_or_else(|x| panic!("{name}: {x}"));
        assert_eq!(&n.name, name);
    }
    assert!(Network::preset("token-ring").is_err_and(|x| x.to_string().contains("ib-hdr")));
    let ib = Network::preset("ib-hdr").unwrap_or_else(|x| panic!("{x}"));
    // 200 Gb/s = 25 GB/s between nodes, 8 ranks per node: ranks 7 and 8 are on different nodes.
    assert_eq!(ib.inter.bandwidth_gb_s, 25.0);
    assert_eq!(ib.link(0, 7), &ib.intra);
    assert_eq!(ib.link(7, 8), &ib.inter);
    assert!(ib.clone().with_ranks_per_node(0).is_err());
    let json = serde_json::to_string(&ib).unwrap_or_else(|x| panic!("{x}"));
    let back: Network = serde_json::from_str(&json).unwrap_or_else(|x| panic!("{x}"));
    assert_eq!(back, ib);
    assert!(Link::new(-1.0, 1.0).is_err());
    assert!(Link::new(1.0, 0.0).is_err());
    assert!(Link::new(f64::NAN, 1.0).is_err());
    assert_eq!(Link::new(1.0, 1.0).map(|l| l.message_us(0)).ok(), Some(0.0));
    // Exact samples of α = 1.5 µs, β = 25 GB/s (25e3 B/µs): t = 1.5 + n / 25e3.
    let samples: Vec<(u64, f64)> = [8u64, 1 << 10, 1 << 16, 1 << 20]
        .iter()
        .map(|&n| (n, 1.5 + n as f64 / 25e3))
        .collect();
    let l = Link::fit(&samples).unwrap_or_else(|x| panic!("{x}"));
    assert!((l.latency_us - 1.5).abs() < 1e-6, "{l:?}");
    assert!((l.bandwidth_gb_s - 25.0).abs() < 1e-6, "{l:?}");
    assert!(Link::fit(&[(8, 1.0)]).is_err());
    assert!(Link::fit(&[(8, 1.0), (8, 2.0)]).is_err());
    assert!(Link::fit(&[(8, 2.0), (1 << 20, 1.0)]).is_err());
    assert!(Link::fit(&[(8, f64::INFINITY), (16, 1.0)]).is_err());
    assert!(Link::fit(&[]).is_err());
}

fn trace_of(e: usize, steps: &[Vec<Vec<u32>>]) -> RoutingTrace {
    let header = TraceHeader {
        n_layers: 1,
        n_experts: e,
        top_k: 2,
        expert_bytes: 0,
        model: "test".into(),
        router: "test".into(),
    };
    let mut tr = RoutingTrace::new(header).unwrap_or_else(|x| panic!("{x}"));
    for s in steps {
        let mut offsets = vec![0u32];
        let mut experts = Vec::new();
        for t in s {
            experts.extend_from_slice(t);
            offsets.push(experts.len() as u32);
        }
        tr.push_step(vec![LayerRecord {
            offsets,
            experts,
            predicted: None,
        }])
        .unwrap_or_else(|x| panic!("{x}"));
    }
    tr
}

#[test]
fn a_trace_is_dealt_contiguously_and_wraps() {
    // Two steps, 5 tokens: 0 → {0}, 1 → {1}, 2 → {2, 3}, then 3 → {3}, 4 → {0, 1}.
    let tr = trace_of(
        4,
        &[
            vec![vec![0], vec![1], vec![2, 3]],
            vec![vec![3], vec![0, 1]],
        ],
    );
    let s = cost::split_trace(&tr, 0, 2, 3).unwrap_or_else(|x| panic!("{x}"));
    assert!(s.wrapped);
    assert_eq!(s.tokens_available, 5);
    // Rank 0: tokens 0, 1, 2; rank 1: tokens 3, 4, then 0 again.
    assert_eq!(s.routings[0].expert_counts(), vec![1, 1, 1, 1]);
    assert_eq!(s.routings[1].expert_counts(), vec![2, 1, 0, 1]);
    let net = one_node(1.0, 5.0);
    let (c, wrapped) =
        cost::predict_trace(&tr, 0, 2, 3, 16, &net).unwrap_or_else(|x| panic!("{x}"));
    assert!(wrapped);
    assert_eq!(
        Ok(c),
        cost::predict(&s.routings, 16, &net).map_err(|x| x.to_string())
    );
    let s = cost::split_trace(&tr, 0, 1, 5).unwrap_or_else(|x| panic!("{x}"));
    assert!(!s.wrapped);
    assert!(cost::split_trace(&tr, 1, 2, 3).is_err());
    assert!(cost::split_trace(&tr, 0, 0, 3).is_err());
    assert!(cost::split_trace(&tr, 0, 2, 0).is_err());
    assert!(cost::predict_trace(&tr, 0, 5, 1, 16, &net).is_err());
    assert!(cost::split_trace(&trace_of(4, &[]), 0, 2, 3).is_err());
}

/// Rows and distinct experts source `s` sends owner `o`, counted from the assignments with the contiguous rule
/// written out again: owner of `x` is the `r` with `start(r) <= x < start(r + 1)`, `start(r) = r·⌊E/R⌋ + min(r, E mod R)`.
fn independent_bytes(routings: &[Routing], d: u64) -> (u64, u64) {
    let rr = routings.len();
    let e = routings[0].n_experts();
    let start = |r: usize| r * (e / rr) + r.min(e % rr);
    let owner = |x: usize| (0..rr).rev().find(|&r| start(r) <= x).unwrap_or(0);
    let (mut sent, mut rows_total) = (0u64, 0u64);
    for (s, r) in routings.iter().enumerate() {
        let mut rows = vec![0u64; rr];
        let mut groups = vec![std::collections::BTreeSet::new(); rr];
        for x in r.slot_experts() {
            let o = owner(x as usize);
            rows[o] += 1;
            groups[o].insert(x);
            rows_total += 1;
        }
        for o in (0..rr).filter(|&o| o != s && rows[o] > 0) {
            // Dispatch: 12 header + 8 per group + 4·rows·d; combine: 4 + 4·rows·d.
            sent += 12 + 8 * groups[o].len() as u64 + 4 * rows[o] * d;
            sent += 4 + 4 * rows[o] * d;
        }
    }
    (sent, rows_total)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(20), ..ProptestConfig::default() })]

    #[test]
    fn bytes_sent_sum_to_the_independently_counted_messages(
        ranks in 1usize..6,
        extra in 0usize..7,
        d in 1usize..9,
        picks in proptest::collection::vec(proptest::collection::vec((0u32..64, 0u32..64), 0..12), 6),
    ) {
        let e = ranks + extra;
        let rs: Vec<Routing> = (0..ranks)
            .map(|r| {
                let toks: Vec<Vec<u32>> = picks[r]
                    .iter()
                    .map(|&(a, b)| {
                        let (a, b) = (a % e as u32, b % e as u32);
                        if a == b { vec![a] } else { vec![a, b] }
                    })
                    .collect();
                let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
                routing(e, &refs)
            })
            .collect();
        let c = cost::predict(&rs, d, &one_node(1.0, 1.0)).map_err(|x| TestCaseError::fail(x.to_string()))?;
        let (sent, rows) = independent_bytes(&rs, d as u64);
        prop_assert_eq!(c.bytes_sent_per_rank.iter().sum::<u64>(), sent);
        prop_assert_eq!(c.bytes_received_per_rank.iter().sum::<u64>(), sent);
        prop_assert_eq!(c.rows_per_rank.iter().sum::<u64>(), rows);
        prop_assert!(c.imbalance >= 1.0 - 1e-12);
        prop_assert!(c.total_ms >= 0.0);
    }
}

#[test]
fn a_trace_predicts_1024_ranks() {
    // E = 1024 experts, 4096 tokens of k <= 2 distinct experts each (a fixed LCG, no OS seed); 1024 ranks of 4
    // tokens deal every token once.
    let mut x: u64 = 20;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % 1024) as u32
    };
    let toks: Vec<Vec<u32>> = (0..4096)
        .map(|_| {
            let (a, b) = (next(), next());
            if a == b {
                vec![a]
            } else {
                vec![a.min(b), a.max(b)]
            }
        })
        .collect();
    let slots: usize = toks.iter().map(Vec::len).sum();
    let tr = trace_of(1024, &[toks]);
    let net = Network::preset("ib-hdr").unwrap_or_else(|x| panic!("{x}"));
    let (c, wrapped) =
        cost::predict_trace(&tr, 0, 1024, 4, 64, &net).unwrap_or_else(|x| panic!("{x}"));
    assert!(!wrapped);
    assert_eq!(c.ranks, 1024);
    // Every slot lands on one owner (ranks own one expert each).
    assert_eq!(c.rows_per_rank.iter().sum::<u64>(), slots as u64);
    // A rank's 4 tokens send at most 8 rows, so at most 8 dispatch messages; each is answered by one combine
    // message: at most 2 · 8 · 1024 messages in all.
    assert!(c.messages_per_rank.iter().sum::<u64>() <= 2 * 8 * 1024);
    // Every round has a message somewhere unless the pairs of a round are all empty: the time is positive and at
    // most 1023 rounds of the slowest possible message (8 rows × 64 × 4 bytes over the inter link).
    let worst = net.inter.message_us(12 + 8 * 8 + 8 * 64 * 4) * 1023.0 / 1e3;
    assert!(
        c.dispatch_ms > 0.0 && c.dispatch_ms <= worst,
        "{} vs {worst}",
        c.dispatch_ms
    );
    assert!(cost::predict_trace(&tr, 0, 4097, 1, 64, &net).is_err());
}
