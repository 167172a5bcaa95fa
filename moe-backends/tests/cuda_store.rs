//! The CUDA backend's stored banks (`ExpertBank::Stored`, the host-to-device tier) against the all-resident CUDA
//! layer, bit for bit, for every live policy and several capacities (1 slot, a few, all), every bank kind, f32
//! and bf16 weights, with tile-crossing shapes; against the CPU backend within the CUDA parity tolerance (f32
//! weights: 1e-5 of `max(max |cpu|, 1)`); the store's counters; a failed load that names the expert and leaves
//! the layer usable. A stored layer routes on the host, so the bit-for-bit comparison uses routers whose
//! all-resident CUDA layer routes on the host too (switch with capacity drops, expert choice); a top-k router
//! (native on the all-resident layer) is compared with the CPU.
//!
//! Without a GPU (no driver, no NVRTC) every test prints why and returns, unless `MOE_REQUIRE_GPU=cuda` is set:
//! then a missing GPU fails the test. On the GPU machine:
//! `MOE_REQUIRE_GPU=cuda cargo test -p moe-backends --features cuda --test cuda_store`.
#![cfg(feature = "cuda")]

use std::sync::{Arc, OnceLock};

use ndarray::Array2;

use moe_backends::cpu::CpuBackend;
use moe_backends::cuda::{CudaBackend, Dtype};
use moe_core::store::policy::{PolicyContext, PolicyKind};
use moe_core::store::{ExpertForm, ExpertSource, HostSource, StoreConfig, StoredBank, Tier};
use moe_core::testing::random_bank;
use moe_core::{
    Backend, DeviceLayer, ExpertBank, LayerOutput, MoeError, MoeLayer, Router, RouterArgs,
    RouterInput, RouterPath, SharedExperts, rng::SeqRng,
};

fn backend() -> Option<CudaBackend> {
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "cuda",
        B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())),
    )
}

/// switch-top1 with capacity factor 0.5 (drops), expert-choice, softmax-topk, by `which` 0..3.
fn router(which: u8, d: usize, e: usize, k: usize, seed: u64) -> Box<dyn Router> {
    let (name, k, opts): (&str, usize, &[(&str, &str)]) = match which {
        0 => ("switch-top1", 1, &[("capacity_factor", "0.5")]),
        1 => ("expert-choice", k, &[]),
        _ => ("softmax-topk", k, &[]),
    };
    let mut args = RouterArgs::new(d, e, k, seed);
    for (key, v) in opts {
        args.set_option_str(key, v);
    }
    moe_routers::builtin()
        .create(name, &args)
        .unwrap_or_else(|err| panic!("{name}: {err}"))
}

/// A resident layer (with a shared expert and an output bias) and the source of its routed experts.
fn resident(
    kind: u8,
    which: u8,
    (e, d, f, k): (usize, usize, usize, usize),
    seed: u64,
) -> MoeLayer {
    let mut rng = SeqRng::new(seed, 11);
    let bank = random_bank(kind, e, d, f, &mut rng);
    let shared = random_bank(0, 1, d, f + 5, &mut rng);
    let gate = Some(rng.normal_matrix(1, d, 0.3).row(0).to_owned());
    let bias = rng.normal_matrix(1, d, 0.1).row(0).to_owned();
    MoeLayer::new(router(which, d, e, k, seed), bank)
        .and_then(|l| l.with_shared(SharedExperts::new(shared, gate)?))
        .and_then(|l| l.with_output_bias(bias))
        .unwrap_or_else(|err| panic!("layer: {err}"))
}

/// `layer` with its routed experts in `source`, kept as `config` says.
fn stored(layer: &MoeLayer, source: Arc<dyn ExpertSource>, config: StoreConfig) -> Arc<MoeLayer> {
    let bank = StoredBank::new(source, config).unwrap_or_else(|err| panic!("stored bank: {err}"));
    let mut l = MoeLayer::new(layer.router_box(), ExpertBank::Stored(bank))
        .unwrap_or_else(|err| panic!("stored layer: {err}"));
    if let Some(sh) = layer.shared() {
        l = l
            .with_shared(sh.clone())
            .unwrap_or_else(|err| panic!("{err}"));
    }
    if let Some(b) = layer.output_bias() {
        l = l
            .with_output_bias(b.clone())
            .unwrap_or_else(|err| panic!("{err}"));
    }
    Arc::new(l)
}

fn host(bank: &ExpertBank) -> Arc<dyn ExpertSource> {
    Arc::new(HostSource::new(Arc::new(bank.clone())).unwrap_or_else(|err| panic!("source: {err}")))
}

fn inputs(seed: u64, d: usize) -> Vec<Array2<f32>> {
    let mut rng = SeqRng::new(seed, 12);
    [150, 1, 70, 150]
        .iter()
        .map(|&t| rng.normal_matrix(t, d, 1.0))
        .collect()
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The policies that build live with uniform-ish frequencies.
fn live_policies(e: usize, slots: usize) -> Vec<(PolicyKind, Vec<u64>)> {
    let freq: Vec<u64> = (0..e as u64).map(|i| (i * 7) % 5 + 1).collect();
    PolicyKind::ALL
        .into_iter()
        .filter(|&p| p != PolicyKind::Belady)
        .filter(|p| {
            let ctx = PolicyContext {
                n_experts: e,
                slots,
                future: None,
                frequencies: Some(&freq),
            };
            match p.build(&ctx) {
                Ok(_) => true,
                Err(MoeError::Unsupported { .. }) => false,
                Err(other) => panic!("policy {p}: {other}"),
            }
        })
        .map(|p| (p, freq.clone()))
        .collect()
}

fn config(slots: usize, policy: PolicyKind, freq: &[u64]) -> StoreConfig {
    StoreConfig {
        capacity: moe_core::store::Capacity::Experts(slots),
        policy,
        frequencies: Some(freq.to_vec()),
    }
}

fn run_all(dev: &mut dyn DeviceLayer, xs: &[Array2<f32>], what: &str) -> Vec<LayerOutput> {
    xs.iter()
        .enumerate()
        .map(|(i, x)| {
            dev.forward(&RouterInput::new(x.view()))
                .unwrap_or_else(|err| panic!("{what}: forward {i}: {err}"))
        })
        .collect()
}

/// Stored CUDA layers equal the all-resident CUDA layer bit for bit (host-routed routers), for every bank kind,
/// every live policy and capacities 1, 2, E-1 and E, f32 and bf16; the counters add up.
#[test]
fn stored_equals_resident_bit_for_bit() {
    if backend().is_none() {
        return;
    }
    let (e, d, f, k) = (6, 40, 72, 2);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let b = CudaBackend::with_dtype(dtype).unwrap_or_else(|err| panic!("{err}"));
        for kind in 0..4u8 {
            for which in 0..2u8 {
                let seed = 100 + u64::from(kind) * 10 + u64::from(which);
                let layer = resident(kind, which, (e, d, f, k), seed);
                let xs = inputs(seed, d);
                let mut dev = b
                    .upload(Arc::new(layer.clone()))
                    .unwrap_or_else(|err| panic!("{err}"));
                assert_eq!(dev.store_stats(), None);
                let want = run_all(dev.as_mut(), &xs, "resident");
                assert_eq!(want[0].router_path, RouterPath::Host);
                for slots in [1, 2, e - 1, e] {
                    for (policy, freq) in live_policies(e, slots) {
                        let what =
                            format!("{dtype:?} kind {kind} router {which} {policy} {slots} slots");
                        let s = stored(&layer, host(layer.experts()), config(slots, policy, &freq));
                        let mut sdev = b
                            .upload(Arc::clone(&s))
                            .unwrap_or_else(|err| panic!("{what}: {err}"));
                        let got = run_all(sdev.as_mut(), &xs, &what);
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(g.routing, w.routing, "{what}: routing {i}");
                            assert!(
                                bits(&g.output) == bits(&w.output),
                                "{what}: forward {i} differs (max |diff| {})",
                                max_diff(&g.output, &w.output)
                            );
                        }
                        let st = sdev
                            .store_stats()
                            .unwrap_or_else(|| panic!("{what}: no stats"));
                        let per = host(layer.experts()).stored_bytes_per_expert();
                        assert_eq!(st.slots, slots, "{what}");
                        assert_eq!(st.bytes_read, st.cache.loads * per, "{what}");
                        assert_eq!(st.cache.hits + st.cache.loads, st.cache.accesses, "{what}");
                        assert_eq!(st.prefetch_load_ms, 0.0, "{what}");
                        if slots == e {
                            assert!(
                                st.cache.loads <= e as u64,
                                "{what}: all slots: each expert loaded once"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A stored CUDA layer with a top-k router (host-routed when stored) against the CPU, within the tolerance of
/// the CUDA parity tests for f32 weights; its routing equals the CPU's.
#[test]
fn stored_topk_matches_the_cpu() {
    let Some(b) = backend() else { return };
    let (e, d, f, k) = (8, 70, 66, 3);
    for kind in 0..4u8 {
        let layer = resident(kind, 2, (e, d, f, k), 300 + u64::from(kind));
        let xs = inputs(300, d);
        let mut cpu = CpuBackend::new()
            .upload(Arc::new(layer.clone()))
            .unwrap_or_else(|err| panic!("{err}"));
        let want = run_all(cpu.as_mut(), &xs, "cpu");
        for slots in [1, 3, e] {
            let s = stored(&layer, host(layer.experts()), StoreConfig::lru(slots));
            let mut dev = b.upload(s).unwrap_or_else(|err| panic!("{err}"));
            let got = run_all(dev.as_mut(), &xs, "stored");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.router_path, RouterPath::Host);
                assert_eq!(
                    g.routing, w.routing,
                    "kind {kind} {slots} slots: routing {i}"
                );
                let scale = w.output.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let diff = max_diff(&g.output, &w.output);
                assert!(
                    diff <= 1e-5 * scale,
                    "kind {kind} {slots} slots, forward {i}: |diff| {diff}"
                );
            }
        }
    }
}

/// A source that fails for one expert.
#[derive(Debug)]
struct Failing {
    inner: HostSource,
    bad: usize,
}

impl ExpertSource for Failing {
    fn form(&self) -> &ExpertForm {
        self.inner.form()
    }
    fn n_experts(&self) -> usize {
        self.inner.n_experts()
    }
    fn tier(&self) -> Tier {
        self.inner.tier()
    }
    fn stored_bytes_per_expert(&self) -> u64 {
        self.inner.stored_bytes_per_expert()
    }
    fn describe(&self) -> String {
        "a failing test source".into()
    }
    fn load(&self, expert: usize, dst: &mut [&mut [f32]]) -> Result<(), MoeError> {
        if expert == self.bad {
            return Err(MoeError::Backend {
                backend: "test".into(),
                reason: "injected read error".into(),
            });
        }
        self.inner.load(expert, dst)
    }
}

/// A failed load is an error naming the expert; the slot is emptied, and a later forward that does not route to
/// the failing expert is still bit-identical to the all-resident layer.
#[test]
fn a_failed_load_names_the_expert_and_leaves_nothing_partial() {
    let Some(b) = backend() else { return };
    let (e, d, f) = (4, 32, 48);
    let layer = resident(0, 0, (e, d, f, 1), 500);
    let inner =
        HostSource::new(Arc::new(layer.experts().clone())).unwrap_or_else(|err| panic!("{err}"));
    let x = SeqRng::new(501, 1).normal_matrix(64, d, 1.0);
    let routing = layer
        .route(&RouterInput::new(x.view()))
        .unwrap_or_else(|err| panic!("{err}"));
    let bad = routing.active_experts()[0] as usize;
    let source: Arc<dyn ExpertSource> = Arc::new(Failing { inner, bad });
    let mut dev = b
        .upload(stored(&layer, source, StoreConfig::lru(2)))
        .unwrap_or_else(|err| panic!("{err}"));
    match dev.forward(&RouterInput::new(x.view())) {
        Err(MoeError::Expert { expert, .. }) => assert_eq!(expert, bad),
        other => panic!("expected a failed load of expert {bad}, got {other:?}"),
    }
    // A token kept by another expert (top-1: it picks that expert alone too) runs cleanly afterwards.
    let other = (0..x.nrows()).find(|&t| kept_elsewhere(&routing, t, bad as u32));
    if let Some(t) = other {
        let xt = x.slice(ndarray::s![t..t + 1, ..]).to_owned();
        let got = dev
            .forward(&RouterInput::new(xt.view()))
            .unwrap_or_else(|err| panic!("{err}"));
        let mut res = b
            .upload(Arc::new(layer.clone()))
            .unwrap_or_else(|err| panic!("{err}"));
        let want = res
            .forward(&RouterInput::new(xt.view()))
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(bits(&got.output) == bits(&want.output));
    }
}

/// Whether token `t` has a kept slot, none of them with `expert`.
fn kept_elsewhere(routing: &moe_core::Routing, t: usize, expert: u32) -> bool {
    let experts = routing.slot_experts();
    let (offsets, slots) = routing.token_slots();
    let mine = &slots[offsets[t]..offsets[t + 1]];
    !mine.is_empty() && mine.iter().all(|&s| experts[s] != expert)
}

/// Belady's MIN is refused at upload (a live store has no future).
#[test]
fn belady_is_refused() {
    let Some(b) = backend() else { return };
    let layer = resident(0, 0, (4, 16, 16, 1), 600);
    let cfg = StoreConfig {
        capacity: moe_core::store::Capacity::Experts(2),
        policy: PolicyKind::Belady,
        frequencies: None,
    };
    assert!(
        b.upload(stored(&layer, host(layer.experts()), cfg))
            .is_err()
    );
}
