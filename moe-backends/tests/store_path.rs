//! The CPU backend's stored banks (`ExpertBank::Stored`) against the all-resident layer: outputs bit for bit and
//! routing identical for every live policy, random capacities, prefetches interleaved, both kernel sets and 1 or
//! 2 threads; the store's counters; failed loads (demand and prefetch) that leave nothing partial behind; Belady
//! and training refused.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ndarray::Array2;
use proptest::prelude::*;

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::store::policy::{PolicyContext, PolicyKind};
use moe_core::store::{
    Capacity, ExpertForm, ExpertSource, HostSource, StoreConfig, StoredBank, Tier,
};
use moe_core::testing::random_bank;
use moe_core::{
    Backend, DeviceLayer, ExpertBank, LayerOutput, MoeError, MoeLayer, Router, RouterArgs,
    RouterInput, SharedExperts, rng::SeqRng,
};

/// softmax-topk (k of E), switch-top1 with capacity factor 0.5 (drops), expert-choice, by `which` 0..3.
fn router(which: u8, d: usize, e: usize, k: usize, seed: u64) -> Box<dyn Router> {
    let (name, k, opts): (&str, usize, &[(&str, &str)]) = match which {
        0 => ("softmax-topk", k, &[]),
        1 => ("switch-top1", 1, &[("capacity_factor", "0.5")]),
        _ => ("expert-choice", k, &[]),
    };
    let mut args = RouterArgs::new(d, e, k, seed);
    for (key, v) in opts {
        args.set_option_str(key, v);
    }
    moe_routers::builtin()
        .create(name, &args)
        .unwrap_or_else(|err| panic!("{name}: {err}"))
}

/// A resident layer and its stored twin (same router, shared experts and output bias; the routed experts in a
/// host source with `config`).
struct Pair {
    resident: Arc<MoeLayer>,
    stored: Arc<MoeLayer>,
}

struct Spec {
    kind: u8,
    router: u8,
    e: usize,
    k: usize,
    d: usize,
    f: usize,
    shared: bool,
    bias: bool,
    seed: u64,
}

fn pair(spec: &Spec, source: impl FnOnce(ExpertBank) -> Arc<dyn ExpertSource>) -> Pair {
    let mut rng = SeqRng::new(spec.seed, 7);
    let (d, e) = (spec.d, spec.e);
    let bank = random_bank(spec.kind, e, d, spec.f, &mut rng);
    let r = router(spec.router, d, e, spec.k, spec.seed);
    let mut resident =
        MoeLayer::new(r.clone(), bank.clone()).unwrap_or_else(|err| panic!("layer: {err}"));
    let src = source(bank);
    let stored_bank = StoredBank::new(src, StoreConfig::lru(1))
        .unwrap_or_else(|err| panic!("stored bank: {err}"));
    let mut stored = MoeLayer::new(r, ExpertBank::Stored(stored_bank))
        .unwrap_or_else(|err| panic!("stored layer: {err}"));
    if spec.shared {
        let sb = random_bank(0, 1, d, spec.f + 3, &mut rng);
        let gate = Some(rng.normal_matrix(1, d, 0.3).row(0).to_owned());
        let sh = SharedExperts::new(sb, gate).unwrap_or_else(|err| panic!("shared: {err}"));
        resident = resident
            .with_shared(sh.clone())
            .unwrap_or_else(|err| panic!("{err}"));
        stored = stored.with_shared(sh).unwrap_or_else(|err| panic!("{err}"));
    }
    if spec.bias {
        let b = rng.normal_matrix(1, d, 0.1).row(0).to_owned();
        resident = resident
            .with_output_bias(b.clone())
            .unwrap_or_else(|err| panic!("{err}"));
        stored = stored
            .with_output_bias(b)
            .unwrap_or_else(|err| panic!("{err}"));
    }
    Pair {
        resident: Arc::new(resident),
        stored: Arc::new(stored),
    }
}

/// `layer` (whose routed bank is stored) with another store configuration over the same source.
fn restore(layer: &MoeLayer, config: StoreConfig) -> Result<Arc<MoeLayer>, MoeError> {
    let ExpertBank::Stored(sb) = layer.experts() else {
        panic!("not a stored layer");
    };
    let bank = StoredBank::new(Arc::clone(sb.source()), config)?;
    Ok(Arc::new(layer.with_experts(ExpertBank::Stored(bank))?))
}

fn host(bank: ExpertBank) -> Arc<dyn ExpertSource> {
    Arc::new(HostSource::new(Arc::new(bank)).unwrap_or_else(|err| panic!("host source: {err}")))
}

fn kernel_sets() -> Vec<CpuKernels> {
    vec![CpuKernels::Portable, CpuKernels::Avx2, CpuKernels::Auto]
}

fn upload(layer: &Arc<MoeLayer>, threads: usize, kernels: CpuKernels) -> Box<dyn DeviceLayer> {
    CpuBackend::with_threads(threads)
        .with_kernels(kernels)
        .upload(Arc::clone(layer))
        .unwrap_or_else(|err| panic!("upload: {err}"))
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn same(got: &LayerOutput, want: &LayerOutput, what: &str) {
    assert_eq!(got.routing, want.routing, "{what}: routing");
    assert_eq!(got.output.dim(), want.output.dim(), "{what}: shape");
    assert!(
        bits(&got.output) == bits(&want.output),
        "{what}: outputs differ in their bits (max |diff| {})",
        got.output
            .iter()
            .zip(want.output.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    );
}

/// The policies that build live with `frequencies` (skipping only those whose build is `Unsupported`).
fn live_policies(e: usize, slots: usize, frequencies: &[u64]) -> Vec<PolicyKind> {
    PolicyKind::ALL
        .into_iter()
        .filter(|&p| p != PolicyKind::Belady)
        .filter(|p| {
            let ctx = PolicyContext {
                n_experts: e,
                slots,
                future: None,
                frequencies: Some(frequencies),
            };
            match p.build(&ctx) {
                Ok(_) => true,
                Err(MoeError::Unsupported { .. }) => false,
                Err(other) => panic!("policy {p}: {other}"),
            }
        })
        .collect()
}

/// Forwards of `inputs` on a stored layer (with `prefetches[i]` before input `i`) equal the resident layer's, bit
/// for bit; returns the stored layer's outputs and checks its counters.
fn run_and_compare(
    resident: &[LayerOutput],
    stored: &Arc<MoeLayer>,
    inputs: &[Array2<f32>],
    prefetches: &[Vec<u32>],
    threads: usize,
    kernels: CpuKernels,
    what: &str,
) -> Vec<LayerOutput> {
    let mut dev = upload(stored, threads, kernels);
    let mut outs = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        if let Some(p) = prefetches.get(i) {
            dev.prefetch(p)
                .unwrap_or_else(|err| panic!("{what}: prefetch: {err}"));
        }
        let got = dev
            .forward(&RouterInput::new(x.view()))
            .unwrap_or_else(|err| panic!("{what}: forward {i}: {err}"));
        same(&got, &resident[i], &format!("{what}, forward {i}"));
        outs.push(got);
    }
    let stats = dev
        .store_stats()
        .unwrap_or_else(|| panic!("{what}: no store stats"));
    let per = stored_bytes(stored);
    assert_eq!(
        stats.bytes_read,
        (stats.cache.loads + stats.cache.prefetches) * per,
        "{what}: bytes read = loads x bytes per expert"
    );
    assert_eq!(
        stats.cache.hits + stats.cache.loads,
        stats.cache.accesses,
        "{what}"
    );
    outs
}

fn stored_bytes(layer: &MoeLayer) -> u64 {
    match layer.experts() {
        ExpertBank::Stored(sb) => sb.source().stored_bytes_per_expert(),
        _ => panic!("not stored"),
    }
}

static RAN: Mutex<Vec<PolicyKind>> = Mutex::new(Vec::new());

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: proptest::test_runner::RngSeed::Fixed(19), ..ProptestConfig::default() })]

    /// Every live policy, a random capacity (in experts or bytes), a random bank / router / shared expert /
    /// output bias, three forwards of T in 1..300 with random prefetches before two of them: bit-identical to the
    /// all-resident layer, on both kernel sets.
    #[test]
    fn stored_equals_resident(kind in 0u8..5, which in 0u8..3, e in 1usize..9, kf in 0.0f64..1.0,
                              d in 1usize..140, f in 1usize..200, shared in any::<bool>(), bias in any::<bool>(),
                              cap_frac in 0.0f64..1.0, in_bytes in any::<bool>(),
                              ts in proptest::collection::vec(1usize..300, 3),
                              pre in proptest::collection::vec(proptest::collection::vec(0u32..10, 0..6), 3),
                              seed in 0u64..10_000) {
        let k = 1 + ((e - 1) as f64 * kf) as usize;
        let spec = Spec { kind, router: which, e, k, d, f, shared, bias, seed };
        let p = pair(&spec, host);
        let mut rng = SeqRng::new(seed, 11);
        let inputs: Vec<Array2<f32>> = ts.iter().map(|&t| rng.normal_matrix(t, d, 1.0)).collect();
        let frequencies: Vec<u64> = (0..e).map(|_| (rng.uniform() * 100.0) as u64).collect();
        let slots = 1 + ((e - 1) as f64 * cap_frac).round() as usize;
        let per = ExpertForm::of(p.resident.experts()).unwrap_or_else(|err| panic!("{err}")).resident_bytes();
        let capacity = if in_bytes { Capacity::Bytes(slots as u64 * per + per / 2) } else { Capacity::Experts(slots) };
        let policies = live_policies(e, slots, &frequencies);
        RAN.lock().unwrap_or_else(|p| p.into_inner()).extend(policies.iter().copied());
        for kernels in kernel_sets() {
            let mut dev = upload(&p.resident, 2, kernels);
            let want: Vec<LayerOutput> = inputs
                .iter()
                .map(|x| dev.forward(&RouterInput::new(x.view())).unwrap_or_else(|err| panic!("resident: {err}")))
                .collect();
            for &policy in &policies {
                let config = StoreConfig { capacity, policy, frequencies: Some(frequencies.clone()) };
                let stored = restore(&p.stored, config).unwrap_or_else(|err| panic!("{err}"));
                let what = format!("{policy}, {slots} of {e} slots, bank {kind}, router {which}, {kernels:?}");
                run_and_compare(&want, &stored, &inputs, &pre[..2], 2, kernels, &what);
            }
        }
    }
}

#[test]
fn zz_print_policies_the_property_ran() {
    // Runs after the property when tests run on one thread; informative only (the property asserts).
    let ran = RAN.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut names: Vec<&str> = ran.iter().map(|p| p.name()).collect();
    names.sort_unstable();
    names.dedup();
    println!("live policies the property ran: {names:?}");
}

/// Policies that build live: printed, and LRU always among them.
#[test]
fn live_policies_include_lru() {
    let got = live_policies(6, 3, &[5, 1, 4, 1, 5, 9]);
    println!(
        "live policies: {:?}; skipped (Unsupported): {:?}",
        got.iter().map(|p| p.name()).collect::<Vec<_>>(),
        PolicyKind::ALL
            .iter()
            .filter(|p| !got.contains(p))
            .map(|p| p.name())
            .collect::<Vec<_>>()
    );
    assert!(got.contains(&PolicyKind::Lru));
}

fn spec(kind: u8, e: usize, k: usize, seed: u64) -> Spec {
    Spec {
        kind,
        router: 0,
        e,
        k,
        d: 24,
        f: 40,
        shared: true,
        bias: true,
        seed,
    }
}

fn resident_outputs(layer: &Arc<MoeLayer>, inputs: &[Array2<f32>]) -> Vec<LayerOutput> {
    let mut dev = upload(layer, 2, CpuKernels::Portable);
    inputs
        .iter()
        .map(|x| {
            dev.forward(&RouterInput::new(x.view()))
                .unwrap_or_else(|err| panic!("{err}"))
        })
        .collect()
}

/// One and two threads give the same bits on a stored layer with prefetches (and both the resident layer's).
#[test]
fn one_and_two_threads_are_bit_identical() {
    let mut rng = SeqRng::new(3, 0);
    for (kind, t) in [(0u8, 40usize), (1, 300), (4, 120)] {
        let p = pair(&spec(kind, 8, 2, 21), host);
        let inputs: Vec<Array2<f32>> = (0..3).map(|_| rng.normal_matrix(t, 24, 1.0)).collect();
        let want = resident_outputs(&p.resident, &inputs);
        let stored = restore(&p.stored, StoreConfig::lru(3)).unwrap_or_else(|err| panic!("{err}"));
        let pre = vec![vec![7, 1], vec![0, 2, 5]];
        let one = run_and_compare(&want, &stored, &inputs, &pre, 1, CpuKernels::Portable, "1");
        let two = run_and_compare(&want, &stored, &inputs, &pre, 2, CpuKernels::Portable, "2");
        for (a, b) in one.iter().zip(&two) {
            same(a, b, &format!("bank {kind}: 1 vs 2 threads"));
        }
    }
}

/// Wide experts (several column blocks per tile row) and groups on both sides of the small-row limit, one and
/// two slots: each group runs with the whole plan's tile shapes, so the bits match the resident layer's.
#[test]
fn wide_experts_in_small_groups_match_bit_for_bit() {
    let mut rng = SeqRng::new(12, 0);
    for (kind, e, t) in [
        (0u8, 8usize, 300usize),
        (1, 6, 90),
        (4, 5, 200),
        (3, 12, 30),
    ] {
        let s = Spec {
            d: 200,
            f: 300,
            ..spec(kind, e, 2, 33)
        };
        let p = pair(&s, host);
        let inputs: Vec<Array2<f32>> = (0..2).map(|_| rng.normal_matrix(t, 200, 1.0)).collect();
        for kernels in kernel_sets() {
            let mut dev = upload(&p.resident, 2, kernels);
            let want: Vec<LayerOutput> = inputs
                .iter()
                .map(|x| {
                    dev.forward(&RouterInput::new(x.view()))
                        .unwrap_or_else(|err| panic!("{err}"))
                })
                .collect();
            for slots in [1, 2, e - 1] {
                let stored = restore(&p.stored, StoreConfig::lru(slots))
                    .unwrap_or_else(|err| panic!("{err}"));
                let what = format!("bank {kind}, T {t}, {slots} of {e} slots, {kernels:?}");
                run_and_compare(
                    &want,
                    &stored,
                    &inputs,
                    &[vec![], vec![1, 3]],
                    2,
                    kernels,
                    &what,
                );
            }
        }
    }
}

/// A capacity of E: after a warm-up forward, the same input loads nothing more and nothing is ever evicted.
#[test]
fn full_capacity_loads_each_expert_once() {
    let p = pair(&spec(0, 6, 2, 4), host);
    let x = SeqRng::new(1, 0).normal_matrix(50, 24, 1.0);
    let stored = restore(&p.stored, StoreConfig::lru(6)).unwrap_or_else(|err| panic!("{err}"));
    let mut dev = upload(&stored, 2, CpuKernels::Portable);
    let input = RouterInput::new(x.view());
    let first = dev.forward(&input).unwrap_or_else(|err| panic!("{err}"));
    let warm = dev.store_stats().unwrap_or_else(|| panic!("no stats"));
    let active = first.routing.active_experts().len() as u64;
    assert_eq!(warm.cache.loads, active);
    assert_eq!(warm.slots, 6);
    for _ in 0..3 {
        dev.forward(&input).unwrap_or_else(|err| panic!("{err}"));
    }
    let s = dev.store_stats().unwrap_or_else(|| panic!("no stats"));
    assert_eq!(s.cache.loads, warm.cache.loads, "loads after warm-up");
    assert_eq!(s.cache.evictions, 0);
    assert_eq!(s.cache.hits, 3 * active);
    assert_eq!(s.bytes_read, active * stored_bytes(&stored));
    // Every expert at once, then nothing more to load whatever the input.
    dev.prefetch(&[0, 1, 2, 3, 4, 5])
        .unwrap_or_else(|err| panic!("{err}"));
    let before = dev.store_stats().unwrap_or_else(|| panic!("no stats"));
    let y = SeqRng::new(2, 0).normal_matrix(80, 24, 1.0);
    dev.forward(&RouterInput::new(y.view()))
        .unwrap_or_else(|err| panic!("{err}"));
    let after = dev.store_stats().unwrap_or_else(|| panic!("no stats"));
    assert_eq!(after.cache.loads, before.cache.loads);
    assert_eq!(
        after.cache.prefetches + active,
        6,
        "the prefetch placed the experts the first forward had not"
    );
    assert!(after.prefetch_load_ms >= 0.0 && after.wait_ms >= 0.0);
}

/// A host source that fails one load (the `fail_at`-th call, counting from 1), writing garbage into its
/// destination first (a partial read); `fail_at = 0` never fails. Records the expert that failed.
#[derive(Debug)]
struct Flaky {
    inner: HostSource,
    calls: AtomicUsize,
    fail_at: AtomicUsize,
    failed: Mutex<Option<usize>>,
    /// Panic instead of returning the error.
    panics: std::sync::atomic::AtomicBool,
}

impl ExpertSource for Flaky {
    fn form(&self) -> &ExpertForm {
        self.inner.form()
    }
    fn n_experts(&self) -> usize {
        self.inner.n_experts()
    }
    fn tier(&self) -> Tier {
        Tier::Disk
    }
    fn stored_bytes_per_expert(&self) -> u64 {
        self.inner.stored_bytes_per_expert()
    }
    fn describe(&self) -> String {
        "a flaky test source".into()
    }
    fn load(&self, expert: usize, dst: &mut [&mut [f32]]) -> Result<(), MoeError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_at.load(Ordering::SeqCst) {
            for s in dst.iter_mut() {
                s.fill(f32::NAN);
            }
            *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(expert);
            if self.panics.load(Ordering::SeqCst) {
                panic!("injected panic loading expert {expert}");
            }
            return Err(MoeError::Expert {
                expert,
                reason: "read error (injected)".into(),
            });
        }
        self.inner.load(expert, dst)
    }
}

fn flaky_pair(fail_at: usize) -> (Pair, Arc<Flaky>) {
    let mut keep = None;
    let p = pair(&spec(0, 6, 2, 8), |bank| {
        let f = Arc::new(Flaky {
            inner: HostSource::new(Arc::new(bank)).unwrap_or_else(|err| panic!("{err}")),
            calls: AtomicUsize::new(0),
            fail_at: AtomicUsize::new(fail_at),
            failed: Mutex::new(None),
            panics: std::sync::atomic::AtomicBool::new(false),
        });
        keep = Some(Arc::clone(&f));
        f
    });
    (p, keep.unwrap_or_else(|| panic!("no source")))
}

fn expect_expert_error(r: Result<LayerOutput, MoeError>, failed: Option<usize>, what: &str) {
    let failed = failed.unwrap_or_else(|| panic!("{what}: the source did not fail"));
    match r {
        Err(MoeError::Expert { expert, reason }) => {
            assert_eq!(expert, failed, "{what}: {reason}");
            assert!(reason.contains("injected"), "{what}: {reason}");
        }
        Err(other) => panic!("{what}: not an expert error: {other}"),
        Ok(_) => panic!("{what}: a failed load must fail the forward"),
    }
}

/// The 3rd load fails mid-forward: the forward errors naming the expert; the next forwards (source healed) are
/// bit-identical to the resident layer's, so nothing the failed load wrote is used.
#[test]
fn failed_demand_load_is_an_error_and_leaves_nothing_partial() {
    let mut rng = SeqRng::new(4, 0);
    // With 6 of 6 slots nothing is evicted, so a slot the failed load wrote would be reused as a hit.
    for slots in [2, 5, 6] {
        let (p, src) = flaky_pair(3);
        let inputs: Vec<Array2<f32>> = (0..3).map(|_| rng.normal_matrix(60, 24, 1.0)).collect();
        let want = resident_outputs(&p.resident, &inputs);
        let stored =
            restore(&p.stored, StoreConfig::lru(slots)).unwrap_or_else(|err| panic!("{err}"));
        let mut dev = upload(&stored, 2, CpuKernels::Portable);
        let r = dev.forward(&RouterInput::new(inputs[0].view()));
        let failed = *src.failed.lock().unwrap_or_else(|p| p.into_inner());
        expect_expert_error(r, failed, &format!("demand load, {slots} slots"));
        for (i, x) in inputs.iter().enumerate() {
            let got = dev
                .forward(&RouterInput::new(x.view()))
                .unwrap_or_else(|err| panic!("after the failure: {err}"));
            same(
                &got,
                &want[i],
                &format!("forward {i} after a failed load, {slots} slots"),
            );
        }
    }
}

/// A prefetch whose background load fails: the next forward errors naming the expert, the one after is
/// bit-identical to the resident layer's.
#[test]
fn failed_prefetch_is_reported_by_the_next_forward() {
    let (p, src) = flaky_pair(0);
    let x = SeqRng::new(6, 0).normal_matrix(30, 24, 1.0);
    let want = resident_outputs(&p.resident, std::slice::from_ref(&x));
    let stored = restore(&p.stored, StoreConfig::lru(3)).unwrap_or_else(|err| panic!("{err}"));
    let mut dev = upload(&stored, 2, CpuKernels::Portable);
    let active: Vec<u32> = want[0].routing.active_experts().to_vec();
    src.fail_at.store(2, Ordering::SeqCst);
    dev.prefetch(&active).unwrap_or_else(|err| panic!("{err}"));
    let r = dev.forward(&RouterInput::new(x.view()));
    let failed = *src.failed.lock().unwrap_or_else(|p| p.into_inner());
    expect_expert_error(r, failed, "prefetch");
    let got = dev
        .forward(&RouterInput::new(x.view()))
        .unwrap_or_else(|err| panic!("{err}"));
    same(&got, &want[0], "after a failed prefetch");
    // A prefetch right after another collects the first one's loads first; outputs do not change.
    dev.prefetch(&[5, 4]).unwrap_or_else(|err| panic!("{err}"));
    dev.prefetch(&[0, 1, 2])
        .unwrap_or_else(|err| panic!("{err}"));
    let got = dev
        .forward(&RouterInput::new(x.view()))
        .unwrap_or_else(|err| panic!("{err}"));
    same(&got, &want[0], "after two prefetches");
    let s = dev.store_stats().unwrap_or_else(|| panic!("no stats"));
    assert!(s.cache.prefetches >= 2, "{s:?}");
}

/// A source that panics on the prefetch thread: the next forward reports it as a failed load of that expert
/// (the thread goes on), and the forward after it is bit-identical to the resident layer's.
#[test]
fn a_panicking_source_on_the_prefetch_thread_is_an_error() {
    let (p, src) = flaky_pair(0);
    let x = SeqRng::new(8, 0).normal_matrix(20, 24, 1.0);
    let want = resident_outputs(&p.resident, std::slice::from_ref(&x));
    let stored = restore(&p.stored, StoreConfig::lru(4)).unwrap_or_else(|err| panic!("{err}"));
    let mut dev = upload(&stored, 2, CpuKernels::Portable);
    src.panics.store(true, Ordering::SeqCst);
    src.fail_at.store(1, Ordering::SeqCst);
    dev.prefetch(&[3, 0]).unwrap_or_else(|err| panic!("{err}"));
    let failed = match dev.forward(&RouterInput::new(x.view())) {
        Err(MoeError::Expert { expert, reason }) => {
            assert!(reason.contains("panicked"), "{reason}");
            expert
        }
        Err(other) => panic!("not an expert error: {other}"),
        Ok(_) => panic!("a panicked load must fail the forward"),
    };
    assert_eq!(
        Some(failed),
        *src.failed.lock().unwrap_or_else(|p| p.into_inner())
    );
    dev.prefetch(&[1, 2]).unwrap_or_else(|err| panic!("{err}"));
    let got = dev
        .forward(&RouterInput::new(x.view()))
        .unwrap_or_else(|err| panic!("{err}"));
    same(&got, &want[0], "after a panicked prefetch");
}

/// Belady's MIN is offline: a stored bank refuses it when it is made, with an error naming it.
#[test]
fn belady_is_refused_at_upload() {
    let p = pair(&spec(0, 4, 2, 1), host);
    let config = StoreConfig {
        capacity: Capacity::Experts(2),
        policy: PolicyKind::Belady,
        frequencies: None,
    };
    // Refused when the stored bank is made (before any upload or forward).
    match restore(&p.stored, config) {
        Ok(_) => panic!("Belady must be refused by a live store"),
        Err(e) => assert!(e.to_string().to_lowercase().contains("belady"), "{e}"),
    }
}

/// Stored experts are read-only: training is refused, the capabilities list stored banks, and an all-resident
/// layer has no store stats.
#[test]
fn training_is_refused_and_capabilities_list_stored() {
    let p = pair(&spec(2, 4, 2, 1), host);
    let x = SeqRng::new(6, 0).normal_matrix(5, 24, 1.0);
    let mut dev = upload(&p.stored, 1, CpuKernels::Portable);
    match dev.forward_train(&RouterInput::new(x.view())) {
        Err(MoeError::Unsupported { owner, feature }) => {
            assert_eq!(owner, "stored experts");
            assert!(feature.contains("training"), "{feature}");
        }
        Err(other) => panic!("not Unsupported: {other}"),
        Ok(_) => panic!("training on stored experts must be refused"),
    }
    assert!(dev.backward(Array2::zeros((5, 24)).view(), &[]).is_err());
    assert!(
        CpuBackend::new()
            .capabilities()
            .banks
            .contains(&"stored".to_string())
    );
    assert!(
        upload(&p.resident, 1, CpuKernels::Portable)
            .store_stats()
            .is_none()
    );
}
