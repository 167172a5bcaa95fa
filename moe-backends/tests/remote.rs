//! The CPU backend's halves of expert parallelism against one rank: a test-only [`RemoteExperts`] splits each plan
//! among 1 to 4 fake owners (contiguous or strided blocks of experts, each a `CpuExperts` of `bank.select(owned)`
//! run with the whole plan's `plan_max_rows`) and reassembles their outputs. `forward_remote` on a home layer whose
//! routed bank is a placeholder (custom experts that fail when run) is bit-identical to `forward` of the real
//! layer, for SwiGLU / GPT-OSS / MLP banks, shared experts and output bias, every built-in router but PEER, T up to
//! ~300 (every kernel class), both kernel sets and 1 or 2 threads; `forward_train_remote` + `backward_remote` equal
//! `forward_train` + `backward` for `d_input` and every non-expert gradient, and the owners' gradients mapped to
//! global experts equal the single-rank ones (also summed over two batches). Custom banks; typed errors.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, Axis, s};
use proptest::prelude::*;

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::testing::random_bank;
use moe_core::{
    Activation, Backend, Expert, ExpertBank, ExpertGroups, Grad, GradValue, LayerGrads,
    LayerOutput, Mode, MoeError, MoeLayer, RemoteExperts, ResidentExperts, Router, RouterArgs,
    RouterInput, Routing, SharedExperts, rng::SeqRng,
};

/// softmax-topk, switch-top1 with capacity factor 0.5 (drops), expert-choice, noisy-topk, hash (k = 2, gate
/// weights), hash by `id mod E` (k = 1, gate weights: the plan follows the token ids), by `which` 0..6.
fn router(which: u8, d: usize, e: usize, k: usize, seed: u64) -> Box<dyn Router> {
    let (name, k, opts): (&str, usize, &[(&str, &str)]) = match which {
        0 => ("softmax-topk", k, &[]),
        1 => ("switch-top1", 1, &[("capacity_factor", "0.5")]),
        2 => ("expert-choice", k, &[]),
        3 => ("noisy-topk", k, &[]),
        4 => ("hash", k, &[("k", "2"), ("weights", "gate")]),
        _ => ("hash", k, &[("table", "modulo"), ("weights", "gate")]),
    };
    let mut args = RouterArgs::new(d, e, k, seed);
    for (key, v) in opts {
        args.set_option_str(key, v);
    }
    moe_routers::builtin()
        .create(name, &args)
        .unwrap_or_else(|err| panic!("{name}: {err}"))
}

/// An expert that fails when run: what an expert-parallel home holds in place of the experts it does not own.
#[derive(Debug, Clone)]
struct Placeholder(usize);

impl Expert for Placeholder {
    fn d_model(&self) -> usize {
        self.0
    }
    fn forward(&self, _: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Err(MoeError::config(
            "placeholder",
            "",
            "the home ran a routed expert itself",
        ))
    }
}

/// A custom expert: `x ↦ tanh(x) · c + x`.
#[derive(Debug, Clone)]
struct Tanh(usize, f32);

impl Expert for Tanh {
    fn d_model(&self) -> usize {
        self.0
    }
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Ok(x.mapv(|v| v.tanh() * self.1 + v))
    }
}

fn placeholders(e: usize, d: usize) -> ExpertBank {
    ExpertBank::Custom(
        (0..e)
            .map(|_| Box::new(Placeholder(d)) as Box<dyn Expert>)
            .collect(),
    )
}

#[derive(Debug, Clone)]
struct Spec {
    kind: u8,
    router: u8,
    e: usize,
    k: usize,
    d: usize,
    f: usize,
    /// 0: none, 1: shared experts without gate, 2: with gate.
    shared: u8,
    bias: bool,
    scale: bool,
    seed: u64,
    /// Token ids send 4 of 5 tokens to expert 0 under `id mod E` (router 5): one large group, the rest small.
    skew: bool,
}

/// The real layer of `spec` and its home twin (the same layer with placeholder routed experts).
fn layers(spec: &Spec) -> (Arc<MoeLayer>, Arc<MoeLayer>, ExpertBank) {
    let mut rng = SeqRng::new(spec.seed, 11);
    let (d, e) = (spec.d, spec.e);
    let bank = random_bank(spec.kind, e, d, spec.f, &mut rng);
    let r = router(spec.router, d, e, spec.k, spec.seed);
    let mut l = MoeLayer::new(r, bank.clone()).unwrap_or_else(|err| panic!("layer: {err}"));
    if spec.shared > 0 {
        let sb = random_bank(0, 1, d, spec.f + 3, &mut rng);
        let gate = (spec.shared == 2).then(|| rng.normal_matrix(1, d, 0.3).row(0).to_owned());
        let sh = SharedExperts::new(sb, gate).unwrap_or_else(|err| panic!("shared: {err}"));
        l = l.with_shared(sh).unwrap_or_else(|err| panic!("{err}"));
    }
    if spec.bias {
        let b = rng.normal_matrix(1, d, 0.1).row(0).to_owned();
        l = l.with_output_bias(b).unwrap_or_else(|err| panic!("{err}"));
    }
    if spec.scale {
        l = l
            .with_output_scale(1.75)
            .unwrap_or_else(|err| panic!("{err}"));
    }
    let home = l
        .with_experts(placeholders(e, d))
        .unwrap_or_else(|err| panic!("home: {err}"));
    (Arc::new(l), Arc::new(home), bank)
}

fn backend(threads: usize, kernels: CpuKernels) -> CpuBackend {
    CpuBackend::with_threads(threads).with_kernels(kernels)
}

fn kernel_sets() -> Vec<CpuKernels> {
    if CpuBackend::new().uses_dot_kernel() {
        vec![CpuKernels::Portable, CpuKernels::Auto]
    } else {
        vec![CpuKernels::Portable]
    }
}

/// Experts of `e` split among `owners`: contiguous blocks, or strided (`expert % owners`).
fn placement(e: usize, owners: usize, strided: bool) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); owners];
    for x in 0..e {
        let o = if strided { x % owners } else { x * owners / e };
        out[o].push(x as u32);
    }
    out.retain(|v| !v.is_empty());
    out
}

/// The owners of a plan's experts, each a `CpuExperts` of its experts, driven as an expert-parallel layer does.
struct FakeRemote {
    /// Per owner: its global experts (ascending) and its resident bank.
    owners: Vec<(Vec<u32>, Box<dyn ResidentExperts>)>,
    /// The batch number each owner gave the last training forward.
    last: Vec<usize>,
}

/// One owner's share of a plan: its local groups and the slots (rows of the plan) they cover, in order.
struct Share {
    experts: Vec<u32>,
    offsets: Vec<usize>,
    slots: Vec<usize>,
}

impl FakeRemote {
    fn new(bank: &ExpertBank, owners: Vec<Vec<u32>>, be: &CpuBackend) -> Self {
        let owners = owners
            .into_iter()
            .map(|ids| {
                let sel = bank
                    .select(&ids)
                    .unwrap_or_else(|err| panic!("select: {err}"));
                let res = be
                    .upload_experts(Arc::new(sel))
                    .unwrap_or_else(|err| panic!("upload_experts: {err}"));
                (ids, res)
            })
            .collect::<Vec<_>>();
        let n = owners.len();
        FakeRemote {
            owners,
            last: vec![usize::MAX; n],
        }
    }

    fn share(&self, o: usize, routing: &Routing) -> Share {
        let ids = &self.owners[o].0;
        let offsets = routing.offsets();
        let mut sh = Share {
            experts: Vec::new(),
            offsets: vec![0],
            slots: Vec::new(),
        };
        for (g, &x) in routing.active_experts().iter().enumerate() {
            if let Some(local) = ids.iter().position(|&i| i == x) {
                sh.experts.push(local as u32);
                sh.slots.extend(offsets[g]..offsets[g + 1]);
                sh.offsets.push(sh.slots.len());
            }
        }
        sh
    }

    /// Runs `call(owner, groups, rows)` for every owner (also those without rows) and scatters the results.
    fn each(
        &mut self,
        routing: &Routing,
        rows: ArrayView2<'_, f32>,
        mut call: impl FnMut(
            usize,
            &mut dyn ResidentExperts,
            &ExpertGroups<'_>,
            ArrayView2<'_, f32>,
        ) -> Result<Array2<f32>, MoeError>,
    ) -> Result<Array2<f32>, MoeError> {
        let plan_max_rows = routing
            .offsets()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        let mut out = Array2::<f32>::from_elem(rows.raw_dim(), f32::NAN);
        for o in 0..self.owners.len() {
            let sh = self.share(o, routing);
            let groups = ExpertGroups {
                experts: &sh.experts,
                offsets: &sh.offsets,
                plan_max_rows,
            };
            let mine = rows.select(Axis(0), &sh.slots);
            let got = call(o, self.owners[o].1.as_mut(), &groups, mine.view())?;
            assert_eq!(got.dim(), mine.dim(), "owner {o}: returned shape");
            for (i, &slot) in sh.slots.iter().enumerate() {
                out.row_mut(slot).assign(&got.row(i));
            }
        }
        Ok(out)
    }

    /// The owners' summed gradients as the bank's global `experts.*` gradients (rows of owned experts).
    fn grads(&mut self, bank: &ExpertBank) -> Vec<Grad> {
        let mut global: Vec<Grad> = bank
            .params()
            .iter()
            .map(|p| Grad::dense(&format!("experts.{}", p.name), p.value.mapv(|_| f32::NAN)))
            .collect();
        for (ids, res) in &mut self.owners {
            let local = res
                .take_grads()
                .unwrap_or_else(|err| panic!("take_grads: {err}"));
            assert_eq!(local.len(), global.len(), "gradient count");
            for (g, l) in global.iter_mut().zip(&local) {
                assert_eq!(g.name, l.name, "gradient names");
                let (GradValue::Dense(g), GradValue::Dense(l)) = (&mut g.value, &l.value) else {
                    panic!("dense gradients expected");
                };
                for (i, &x) in ids.iter().enumerate() {
                    g.index_axis_mut(Axis(0), x as usize)
                        .assign(&l.index_axis(Axis(0), i));
                }
            }
        }
        global
    }
}

impl RemoteExperts for FakeRemote {
    fn forward(
        &mut self,
        routing: &Routing,
        rows: ArrayView2<'_, f32>,
        train: bool,
    ) -> Result<Array2<f32>, MoeError> {
        let mut last = std::mem::take(&mut self.last);
        let out = self.each(routing, rows, |o, res, groups, mine| {
            if train {
                let (b, y) = res.forward_train(groups, mine)?;
                last[o] = b;
                Ok(y)
            } else {
                res.forward(groups, mine)
            }
        });
        self.last = last;
        out
    }

    fn backward(
        &mut self,
        routing: &Routing,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        let last = self.last.clone();
        self.each(routing, d_out, |o, res, _, mine| {
            res.backward(last[o], mine)
        })
    }
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

fn same_array(got: &Array2<f32>, want: &Array2<f32>, what: &str) {
    assert_eq!(got.dim(), want.dim(), "{what}: shape");
    assert!(
        bits(got) == bits(want),
        "{what}: values differ in their bits (max |diff| {})",
        got.iter()
            .zip(want.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    );
}

fn same_output(got: &LayerOutput, want: &LayerOutput, what: &str) {
    assert_eq!(got.routing, want.routing, "{what}: routing");
    same_array(&got.output, &want.output, what);
}

fn grad_bits(g: &Grad) -> Vec<u32> {
    match &g.value {
        GradValue::Dense(a) => a.iter().map(|v| v.to_bits()).collect(),
        GradValue::Rows { values, .. } => values.iter().map(|v| v.to_bits()).collect(),
    }
}

/// `want`'s gradients split into `experts.*` and the rest, in order.
fn split_grads(want: &LayerGrads) -> (Vec<&Grad>, Vec<&Grad>) {
    want.params
        .iter()
        .partition(|g| g.name.starts_with("experts."))
}

fn same_grads(got: &[&Grad], want: &[&Grad], what: &str) {
    let names = |v: &[&Grad]| v.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: gradient names");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape(), w.shape(), "{what}: shape of {}", g.name);
        assert!(
            grad_bits(g) == grad_bits(w),
            "{what}: {} differs in its bits",
            g.name
        );
    }
}

fn input<'a>(x: &'a Array2<f32>, ids: &'a [u32], mode: Mode) -> RouterInput<'a> {
    RouterInput::new(x.view())
        .with_token_ids(ids)
        .with_mode(mode)
}

fn tokens(t: usize, d: usize, seed: u64, skew: bool) -> (Array2<f32>, Vec<u32>) {
    let mut rng = SeqRng::new(seed, 3);
    let x = rng.normal_matrix(t, d, 1.0);
    let ids = (0..t)
        .map(|i| match skew {
            true if i % 5 != 0 => 0,
            _ => ((i as u64 * 7919 + seed) % 1000) as u32,
        })
        .collect();
    (x, ids)
}

/// Forward of `spec` on `t` tokens: remote (owners as `placement`) against the real layer, bit for bit.
fn check_forward(spec: &Spec, t: usize, owners: usize, strided: bool) {
    let (real, home, bank) = layers(spec);
    let (x, ids) = tokens(t, spec.d, spec.seed, spec.skew);
    let mode = Mode::Eval;
    for kernels in kernel_sets() {
        for threads in [1, 2] {
            let be = backend(threads, kernels);
            let what = format!(
                "{spec:?} t={t} owners={owners} strided={strided} {kernels:?} threads={threads}"
            );
            let want = be
                .upload(Arc::clone(&real))
                .and_then(|mut l| l.forward(&input(&x, &ids, mode)))
                .unwrap_or_else(|err| panic!("{what}: forward: {err}"));
            let mut remote = FakeRemote::new(&bank, placement(spec.e, owners, strided), &be);
            let mut h = be
                .upload(Arc::clone(&home))
                .unwrap_or_else(|err| panic!("{err}"));
            let got = h
                .forward_remote(&input(&x, &ids, mode), &mut remote)
                .unwrap_or_else(|err| panic!("{what}: forward_remote: {err}"));
            same_output(&got, &want, &what);
        }
    }
}

/// Training of `spec` on two batches (`t1`, `t2` tokens): remote against the real layer, bit for bit, for
/// `d_input`, every non-expert gradient of each batch and the experts' gradients summed over both.
fn check_training(
    spec: &Spec,
    t1: usize,
    t2: usize,
    owners: usize,
    strided: bool,
    kernels: CpuKernels,
) {
    let (real, home, bank) = layers(spec);
    let be = backend(2, kernels);
    let what = format!("{spec:?} t={t1},{t2} owners={owners} strided={strided} {kernels:?}");
    let mut l = be
        .upload(Arc::clone(&real))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut h = be
        .upload(Arc::clone(&home))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut remote = FakeRemote::new(&bank, placement(spec.e, owners, strided), &be);
    let mut sum: Option<Vec<Grad>> = None;
    for (b, t) in [t1, t2].into_iter().enumerate() {
        let (x, ids) = tokens(t, spec.d, spec.seed + b as u64, spec.skew);
        let mode = Mode::Train {
            seed: spec.seed + 17 * b as u64,
        };
        let want = l
            .forward_train(&input(&x, &ids, mode))
            .unwrap_or_else(|err| panic!("{what}: forward_train: {err}"));
        let got = h
            .forward_train_remote(&input(&x, &ids, mode), &mut remote)
            .unwrap_or_else(|err| panic!("{what}: forward_train_remote: {err}"));
        same_output(&got, &want, &format!("{what} batch {b}: training forward"));
        let dy = SeqRng::new(spec.seed, 40 + b as u64).normal_matrix(t, spec.d, 1.0);
        let d_aux: Vec<f32> = (0..want.routing.aux_losses().len())
            .map(|i| 0.5 + i as f32)
            .collect();
        let gw = l
            .backward(dy.view(), &d_aux)
            .unwrap_or_else(|err| panic!("{what}: backward: {err}"));
        let gg = h
            .backward_remote(dy.view(), &d_aux, &mut remote)
            .unwrap_or_else(|err| panic!("{what}: backward_remote: {err}"));
        same_array(
            &gg.d_input,
            &gw.d_input,
            &format!("{what} batch {b}: d_input"),
        );
        let (w_experts, w_rest) = split_grads(&gw);
        let (g_experts, g_rest) = split_grads(&gg);
        assert!(
            g_experts.is_empty(),
            "{what}: backward_remote returned expert gradients"
        );
        same_grads(&g_rest, &w_rest, &format!("{what} batch {b}"));
        match &mut sum {
            None => sum = Some(w_experts.into_iter().cloned().collect()),
            Some(s) => {
                for (acc, g) in s.iter_mut().zip(w_experts) {
                    let (GradValue::Dense(a), GradValue::Dense(v)) = (&mut acc.value, &g.value)
                    else {
                        panic!("dense gradients expected");
                    };
                    *a += v;
                }
            }
        }
    }
    let got = remote.grads(&bank);
    let want = sum.unwrap_or_default();
    same_grads(
        &got.iter().collect::<Vec<_>>(),
        &want.iter().collect::<Vec<_>>(),
        &format!("{what}: experts"),
    );
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        0u8..6,
        0u8..6,
        2usize..9,
        1usize..4,
        // Widths above a column block (96 / 192 for groups of at most 48 rows) split products into tiles
        // whose shapes depend on the plan's largest group.
        prop_oneof![Just(8usize), Just(12), Just(100)],
        prop_oneof![Just(8usize), Just(20), Just(200)],
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        (any::<u64>(), any::<bool>()),
    )
        .prop_map(
            |(kind, router, e, k, d, f, shared, bias, scale, (seed, skew))| Spec {
                kind,
                router,
                e,
                k: k.min(e),
                d,
                f,
                shared,
                bias,
                scale,
                seed,
                skew,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn forward_remote_is_forward_bit_for_bit(
        spec in spec_strategy(),
        t in prop_oneof![0usize..4, 4usize..60, 60usize..320],
        owners in 1usize..5,
        strided in any::<bool>(),
    ) {
        check_forward(&spec, t, owners, strided);
    }

    #[test]
    fn remote_training_is_training_bit_for_bit(
        spec in spec_strategy(),
        t1 in prop_oneof![0usize..4, 4usize..60, 60usize..320],
        t2 in 1usize..120,
        owners in 1usize..5,
        strided in any::<bool>(),
        auto in any::<bool>(),
    ) {
        let kernels = if auto { *kernel_sets().last().unwrap_or(&CpuKernels::Portable) } else { CpuKernels::Portable };
        check_training(&spec, t1, t2, owners, strided, kernels);
    }
}

/// Every kernel class (groups of at most 48 rows, at most 256, more) in one plan of many tokens and few experts.
#[test]
fn large_groups_cross_every_kernel_class() {
    for kind in [0u8, 1, 4] {
        let spec = Spec {
            kind,
            router: 0,
            e: 3,
            k: 2,
            d: 16,
            f: 40,
            shared: 2,
            bias: true,
            scale: false,
            seed: 5 + kind as u64,
            skew: false,
        };
        check_forward(&spec, 300, 2, false);
        check_forward(&spec, 300, 3, true);
        // Wide products and one large group (expert 0): owners whose own groups are all small tile as the
        // plan's largest group says (60 tokens: 48 in expert 0; 130: 104; 400: 320).
        let wide = Spec {
            router: 5,
            e: 8,
            d: 100,
            f: 200,
            skew: true,
            ..spec.clone()
        };
        for t in [60, 130, 400] {
            check_forward(&wide, t, 4, true);
            check_training(&wide, t, 20, 4, true, CpuKernels::Portable);
        }
        check_training(&spec, 300, 40, 2, false, CpuKernels::Portable);
        for kernels in kernel_sets() {
            check_training(&spec, 290, 7, 3, true, kernels);
        }
    }
}

/// A custom routed bank: the home and the owners run its experts one by one, as the single-rank forward does,
/// with a grouped (supported) shared bank and without one.
#[test]
fn custom_bank_forward_remote_is_forward() {
    // Widths above the grouped path's column blocks: its shared products differ in rounding from
    // `expert_forward`'s, so the home must take the single-rank path for them.
    let (e, d, t) = (5, 100, 40);
    let bank = ExpertBank::Custom(
        (0..e)
            .map(|i| Box::new(Tanh(d, 0.5 + i as f32)) as Box<dyn Expert>)
            .collect(),
    );
    let mut rng = SeqRng::new(9, 1);
    for shared in [false, true] {
        let mut real = MoeLayer::new(router(0, d, e, 2, 3), bank.clone()).expect("layer");
        if shared {
            let sb = random_bank(0, 1, d, 200, &mut rng);
            let gate = Some(rng.normal_matrix(1, d, 0.3).row(0).to_owned());
            real = real
                .with_shared(SharedExperts::new(sb, gate).expect("shared"))
                .expect("with shared");
        }
        let home = real.with_experts(placeholders(e, d)).expect("home");
        let (x, ids) = tokens(t, d, 4, false);
        for (threads, kernels) in kernel_sets().into_iter().flat_map(|k| [(1, k), (2, k)]) {
            let be = backend(threads, kernels);
            let want = be
                .upload(Arc::new(real.clone()))
                .and_then(|mut l| l.forward(&input(&x, &ids, Mode::Eval)))
                .expect("forward");
            let mut remote = FakeRemote::new(&bank, placement(e, 2, true), &be);
            let got = be
                .upload(Arc::new(home.clone()))
                .and_then(|mut h| h.forward_remote(&input(&x, &ids, Mode::Eval), &mut remote))
                .expect("forward_remote");
            same_output(
                &got,
                &want,
                &format!("custom, shared = {shared}, threads = {threads}, {kernels:?}"),
            );
            // The per-expert values are the reference's too.
            let reference =
                moe_backends::cpu::reference_forward(&real, &input(&x, &ids, Mode::Eval))
                    .expect("reference");
            if !shared {
                same_output(
                    &got,
                    &reference,
                    "custom without shared experts: the reference",
                );
            }
        }
        // Custom experts do not train.
        let mut res = CpuBackend::new()
            .upload_experts(Arc::new(bank.clone()))
            .expect("upload custom");
        let groups = ExpertGroups {
            experts: &[1],
            offsets: &[0, 2],
            plan_max_rows: 2,
        };
        let rows = Array2::<f32>::ones((2, d));
        assert!(matches!(
            res.forward_train(&groups, rows.view()),
            Err(MoeError::Unsupported { .. })
        ));
        let y = res.forward(&groups, rows.view()).expect("custom forward");
        assert_eq!(y, rows.mapv(|v| v.tanh() * 1.5 + v));
    }
}

/// The groups an owner is given are checked; so are its rows, `d_out`, the order of calls and what remote
/// experts return to a home.
#[test]
fn bad_calls_are_typed_errors() {
    let mut rng = SeqRng::new(2, 2);
    let (e, d, f) = (4, 8, 12);
    let bank = random_bank(0, e, d, f, &mut rng);
    let mut res = CpuBackend::new()
        .upload_experts(Arc::new(bank.clone()))
        .expect("upload");
    let rows = rng.normal_matrix(5, d, 1.0);
    let good = ExpertGroups {
        experts: &[0, 3],
        offsets: &[0, 2, 5],
        plan_max_rows: 7,
    };
    let config = |r: Result<Array2<f32>, MoeError>, what: &str| match r {
        Err(MoeError::InvalidConfig { .. }) => {}
        other => panic!("{what}: expected InvalidConfig, got {other:?}"),
    };
    // Groups that do not fit: an expert >= E, a group above plan_max_rows, offsets not covering the rows.
    let bad_expert = ExpertGroups {
        experts: &[0, 4],
        ..good
    };
    config(res.forward(&bad_expert, rows.view()), "expert 4 of 4");
    let small_plan = ExpertGroups {
        plan_max_rows: 2,
        ..good
    };
    config(
        res.forward(&small_plan, rows.view()),
        "plan_max_rows below a group",
    );
    config(
        res.forward(&good, rows.slice(s![..4, ..])),
        "rows not covered",
    );
    let bad_offsets = ExpertGroups {
        offsets: &[0, 5],
        ..good
    };
    config(
        res.forward(&bad_offsets, rows.view()),
        "offsets of another group count",
    );
    // Rows of another width.
    let wide = Array2::<f32>::zeros((5, d + 1));
    assert!(matches!(
        res.forward(&good, wide.view()),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        res.forward_train(&good, wide.view()),
        Err(MoeError::Shape { .. })
    ));
    // A backward without its forward, twice, or after take_grads; d_out of another shape.
    let dy = rng.normal_matrix(5, d, 1.0);
    assert!(matches!(
        res.backward(0, dy.view()),
        Err(MoeError::Order { .. })
    ));
    let (b, _) = res
        .forward_train(&good, rows.view())
        .expect("forward_train");
    assert_eq!(b, 0);
    assert!(matches!(
        res.backward(b, dy.slice(s![..4, ..])),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        res.backward(b + 1, dy.view()),
        Err(MoeError::Order { .. })
    ));
    res.backward(b, dy.view()).expect("backward");
    assert!(matches!(
        res.backward(b, dy.view()),
        Err(MoeError::Order { .. })
    ));
    let (b2, _) = res
        .forward_train(&good, rows.view())
        .expect("forward_train");
    assert_eq!(b2, 1);
    let grads = res.take_grads().expect("take_grads");
    let names: Vec<&str> = grads.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["experts.gate_up", "experts.down"]);
    assert!(matches!(
        res.backward(b2, dy.view()),
        Err(MoeError::Order { .. })
    ));
    // No backward since take_grads: zero gradients of the bank's shapes.
    let zeros = res.take_grads().expect("take_grads");
    for (z, p) in zeros.iter().zip(bank.params()) {
        assert_eq!(z.shape(), p.value.shape());
        assert!(
            grad_bits(z).iter().all(|&v| v == 0),
            "{} is not zero",
            z.name
        );
    }
    // PEER and stored banks are refused.
    let peer = ExpertBank::Peer(
        moe_core::PeerBank::new(
            rng.normal_matrix(4, d, 0.1),
            rng.normal_matrix(4, d, 0.1),
            Activation::Relu,
        )
        .expect("peer"),
    );
    assert!(matches!(
        CpuBackend::new().upload_experts(Arc::new(peer)),
        Err(MoeError::Unsupported { .. })
    ));

    // A home whose remote experts return the wrong shape, and a backward_remote without its forward.
    let layer = MoeLayer::new(router(0, d, e, 2, 1), placeholders(e, d)).expect("layer");
    let mut h = CpuBackend::new().upload(Arc::new(layer)).expect("upload");
    let x = rng.normal_matrix(6, d, 1.0);
    let mut wrong = WrongShape;
    assert!(matches!(
        h.forward_remote(&RouterInput::new(x.view()), &mut wrong),
        Err(MoeError::Shape { .. })
    ));
    assert!(matches!(
        h.forward_train_remote(&RouterInput::new(x.view()), &mut wrong),
        Err(MoeError::Shape { .. })
    ));
    let dx = rng.normal_matrix(6, d, 1.0);
    assert!(matches!(
        h.backward_remote(dx.view(), &[], &mut wrong),
        Err(MoeError::Order { .. })
    ));
    // The placeholder layer's own forward runs its (failing) experts: the home never does.
    assert!(h.forward(&RouterInput::new(x.view())).is_err());
}

/// A training forward done remotely takes only `backward_remote`, and a local one only `backward`.
#[test]
fn backward_kinds_do_not_mix() {
    let spec = Spec {
        kind: 0,
        router: 0,
        e: 4,
        k: 2,
        d: 8,
        f: 12,
        shared: 1,
        bias: false,
        scale: false,
        seed: 3,
        skew: false,
    };
    let (real, _, bank) = layers(&spec);
    let be = CpuBackend::new();
    let mut l = be.upload(real).expect("upload");
    let mut remote = FakeRemote::new(&bank, placement(4, 2, false), &be);
    let (x, ids) = tokens(10, 8, 1, false);
    let dy = SeqRng::new(1, 1).normal_matrix(10, 8, 1.0);
    l.forward_train_remote(&input(&x, &ids, Mode::Eval), &mut remote)
        .expect("forward_train_remote");
    assert!(matches!(
        l.backward(dy.view(), &[]),
        Err(MoeError::Order { .. })
    ));
    let out = l
        .forward_train(&input(&x, &ids, Mode::Eval))
        .expect("forward_train");
    let d_aux = vec![1.0; out.routing.aux_losses().len()];
    assert!(matches!(
        l.backward_remote(dy.view(), &d_aux, &mut remote),
        Err(MoeError::Order { .. })
    ));
    l.backward(dy.view(), &d_aux)
        .expect("backward after forward_train");
}

/// Remote experts that return one row too few.
struct WrongShape;

impl RemoteExperts for WrongShape {
    fn forward(
        &mut self,
        _: &Routing,
        rows: ArrayView2<'_, f32>,
        _: bool,
    ) -> Result<Array2<f32>, MoeError> {
        Ok(Array2::zeros((rows.nrows() + 1, rows.ncols())))
    }
    fn backward(
        &mut self,
        _: &Routing,
        d_out: ArrayView2<'_, f32>,
    ) -> Result<Array2<f32>, MoeError> {
        Ok(d_out.to_owned())
    }
}
