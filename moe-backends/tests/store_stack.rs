//! `moe_core::store::stack::forward_stack` on the CPU backend: a stack of stored layers gives the all-resident
//! stack's output bit for bit with and without next-layer gate prefetch; the prefetch turns demand loads into
//! prefetch hits and its precision and recall are counted over layers 1..L.

use std::sync::Arc;

use ndarray::Array2;

use moe_backends::cpu::CpuBackend;
use moe_core::store::stack::{StackPrefetch, forward_stack};
use moe_core::store::{Capacity, HostSource, StoreConfig, StoredBank, policy::PolicyKind};
use moe_core::{
    Backend, DeviceLayer, ExpertBank, MoeLayer, RouterArgs, rng::SeqRng,
    workload::random_swiglu_bank,
};

const L: usize = 3;
const E: usize = 8;
const D: usize = 24;

/// Layer `l` of the stack, resident or stored with `slots` slots.
fn layer(l: usize, slots: Option<usize>) -> Box<dyn DeviceLayer> {
    let router = moe_routers::builtin()
        .create("softmax-topk", &RouterArgs::new(D, E, 2, 10 + l as u64))
        .unwrap_or_else(|e| panic!("{e}"));
    let bank = random_swiglu_bank(E, D, 32, 100 + l as u64).unwrap_or_else(|e| panic!("{e}"));
    let bank = match slots {
        None => bank,
        Some(n) => {
            let source = HostSource::new(Arc::new(bank)).unwrap_or_else(|e| panic!("{e}"));
            let config = StoreConfig {
                capacity: Capacity::Experts(n),
                policy: PolicyKind::Lru,
                frequencies: None,
            };
            ExpertBank::Stored(
                StoredBank::new(Arc::new(source), config).unwrap_or_else(|e| panic!("{e}")),
            )
        }
    };
    let layer = MoeLayer::new(router, bank).unwrap_or_else(|e| panic!("{e}"));
    CpuBackend::with_threads(2)
        .upload(Arc::new(layer))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn stack(slots: Option<usize>) -> Vec<Box<dyn DeviceLayer>> {
    (0..L).map(|l| layer(l, slots)).collect()
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn stored_stacks_match_the_resident_stack_with_and_without_prefetch() {
    let mut rng = SeqRng::new(3, 0);
    let steps: Vec<Array2<f32>> = (0..6).map(|_| rng.normal_matrix(2, D, 1.0)).collect();
    let mut resident = stack(None);
    let mut plain = stack(Some(3));
    let mut prefetched = stack(Some(3));
    let mut total = moe_core::store::stack::PredictionCounts::default();
    for x in &steps {
        let r = forward_stack(&mut resident, x.view(), StackPrefetch::None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.counts, Default::default());
        assert!(r.predicted.iter().all(Option::is_none));
        let want = r.output;
        let a = forward_stack(&mut plain, x.view(), StackPrefetch::None)
            .unwrap_or_else(|e| panic!("{e}"))
            .output;
        let run = forward_stack(&mut prefetched, x.view(), StackPrefetch::NextGate)
            .unwrap_or_else(|e| panic!("{e}"));
        let (b, counts) = (run.output, run.counts);
        // Plans per layer; predictions for layers 1 and 2, per token (2 tokens).
        assert_eq!(run.plans.len(), L);
        assert!(run.predicted[0].is_none());
        assert!(
            run.predicted[1..]
                .iter()
                .all(|p| p.as_ref().is_some_and(|p| p.n_tokens() == 2))
        );
        assert_eq!(r.plans[2].active_experts(), run.plans[2].active_experts());
        assert_eq!(bits(&a), bits(&want));
        assert_eq!(bits(&b), bits(&want));
        // Layers 1 and 2 get predictions: at most 2 tokens × k = 2 experts each.
        assert!(counts.predicted >= 2 && counts.predicted <= 8, "{counts:?}");
        assert!(counts.used >= 2 && counts.correct <= counts.predicted.min(counts.used));
        total.add(counts);
    }
    assert!(total.precision() > 0.0 && total.recall() > 0.0, "{total:?}");
    // Layer 0 gets no prefetch; the others load some experts ahead of demand and hit them.
    let stats: Vec<_> = prefetched
        .iter()
        .map(|l| l.store_stats().expect("stored"))
        .collect();
    assert_eq!(stats[0].cache.prefetches, 0);
    for s in &stats[1..] {
        assert!(s.cache.prefetches > 0 && s.cache.prefetch_hits > 0, "{s:?}");
        assert!(s.cache.prefetch_hits <= s.cache.prefetches);
    }
    // Prefetched experts became hits: fewer demand loads than without prefetch in the predicted layers.
    let plain_loads: u64 = plain[1..]
        .iter()
        .map(|l| l.store_stats().expect("stored").cache.loads)
        .sum();
    let pre_loads: u64 = stats[1..].iter().map(|s| s.cache.loads).sum();
    assert!(
        pre_loads < plain_loads,
        "demand loads {pre_loads} with prefetch, {plain_loads} without"
    );
}

#[test]
fn dropping_a_layer_with_prefetches_in_flight_is_safe() {
    // The loader writes into the slots in place; dropping the layer collects its jobs before the slots are freed.
    for _ in 0..20 {
        let mut l = layer(1, Some(4));
        l.prefetch(&[0, 1, 2, 3]).unwrap_or_else(|e| panic!("{e}"));
        drop(l);
    }
    // And a prefetch followed by a forward gives the resident output.
    let x = SeqRng::new(9, 0).normal_matrix(3, D, 1.0);
    let mut stored = layer(1, Some(4));
    let mut resident = layer(1, None);
    stored
        .prefetch(&[7, 6, 5, 4])
        .unwrap_or_else(|e| panic!("{e}"));
    let input = moe_core::RouterInput::new(x.view());
    let a = stored.forward(&input).unwrap_or_else(|e| panic!("{e}"));
    let b = resident.forward(&input).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&a.output), bits(&b.output));
    let s = stored.store_stats().expect("stored");
    assert_eq!(s.cache.prefetches, 4);
    assert_eq!(s.staging_bytes, 0);
}
