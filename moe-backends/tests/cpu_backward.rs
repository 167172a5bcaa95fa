//! The CPU backend's backward: finite-difference checks ([`check_layer_grad`]) for every bank kind and activation,
//! shared experts with and without their gate, output scale and bias, padding and experts with no tokens (the
//! router is [`FixedPlan`], whose backward is exact, so the experts' gradients are what is checked); the grouped
//! path against the reference path; bit-identical gradients on 1 and 2 threads; the typed errors of bad calls;
//! and an SGD step through `apply_update` that lowers the loss.

use std::sync::Arc;

use ndarray::{Array1, Array2, Array3};
use proptest::prelude::*;

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::rng::SeqRng;
use moe_core::testing::{FixedPlan, check_layer_grad};
use moe_core::{
    Activation, Assignment, Backend, Expert, ExpertBank, GptOssBank, GradValue, LayerGrads,
    MlpBank, MoeError, MoeLayer, PeerBank, Router, RouterInput, SharedExperts, SwiGluBank,
};

const ACTS: [Activation; 4] = [
    Activation::Silu,
    Activation::Relu,
    Activation::Gelu,
    Activation::GeluTanh,
];

/// Bank kinds: 0 SwiGLU, 1 GPT-OSS, 2 MLP with biases, 3 MLP without, 4 PEER.
fn bank(kind: u8, act: Activation, e: usize, d: usize, f: usize, rng: &mut SeqRng) -> ExpertBank {
    let s = 1.0 / (d as f32).sqrt();
    let mut a3 =
        |sh: (usize, usize, usize)| Array3::from_shape_simple_fn(sh, || rng.normal() as f32 * s);
    match kind {
        0 => ExpertBank::SwiGlu(
            SwiGluBank::new(a3((e, 2 * f, d)), a3((e, d, f)), act).expect("bank"),
        ),
        1 => {
            let (gu, down) = (a3((e, d, 2 * f)), a3((e, f, d)));
            // A small limit, so that the clamps are active on some entries.
            ExpertBank::GptOss(
                GptOssBank::new(
                    gu,
                    rng.normal_matrix(e, 2 * f, 0.3),
                    down,
                    rng.normal_matrix(e, d, 0.3),
                    1.702,
                    0.6,
                )
                .expect("bank"),
            )
        }
        2 | 3 => {
            let (w1, w2) = (a3((e, f, d)), a3((e, d, f)));
            let biases = kind == 2;
            ExpertBank::Mlp(
                MlpBank::new(
                    w1,
                    biases.then(|| rng.normal_matrix(e, f, 0.3)),
                    w2,
                    biases.then(|| rng.normal_matrix(e, d, 0.3)),
                    act,
                )
                .expect("bank"),
            )
        }
        _ => ExpertBank::Peer(
            PeerBank::new(
                rng.normal_matrix(e, d, s),
                rng.normal_matrix(e, d, 1.0),
                act,
            )
            .expect("bank"),
        ),
    }
}

/// A fixed plan over `t` tokens: every non-padding token gets `k` distinct experts among the first `e - 1` (the
/// last expert never gets a token), with positive weights.
fn plan(t: usize, e: usize, k: usize, padding: &[bool], rng: &mut SeqRng) -> Vec<Assignment> {
    let usable = (e - 1).max(1);
    let k = k.min(usable);
    let mut kept = Vec::new();
    for tok in 0..t {
        if padding.get(tok).copied().unwrap_or(false) {
            continue;
        }
        let first = rng.below(usable as u64) as usize;
        for r in 0..k {
            kept.push(Assignment {
                token: tok as u32,
                expert: ((first + r) % usable) as u32,
                weight: 0.2 + rng.uniform() as f32,
                rank: r as u16,
            });
        }
    }
    kept
}

#[derive(Debug, Clone, Copy)]
struct Options {
    shared: Option<bool>,
    scale: f32,
    bias: bool,
}

fn layer(bank: ExpertBank, kept: Vec<Assignment>, o: Options, rng: &mut SeqRng) -> MoeLayer {
    let (e, d) = (bank.n_experts(), bank.d_model());
    let router = FixedPlan {
        n_experts: e,
        d_model: d,
        kept,
    };
    let mut l = MoeLayer::new(Box::new(router), bank)
        .and_then(|l| l.with_output_scale(o.scale))
        .expect("layer");
    if let Some(gated) = o.shared {
        let sb = match moe_core::workload::random_swiglu_bank(1, d, 5, rng.below(1000)) {
            Ok(b) => b,
            Err(err) => panic!("{err}"),
        };
        let gate = gated.then(|| Array1::from_shape_fn(d, |_| rng.normal() as f32 * 0.5));
        l = l
            .with_shared(SharedExperts::new(sb, gate).expect("shared"))
            .expect("layer");
    }
    if o.bias {
        l = l
            .with_output_bias(Array1::from_shape_fn(d, |_| rng.normal() as f32))
            .expect("layer");
    }
    l
}

fn check(l: &MoeLayer, x: &Array2<f32>, padding: Option<&[bool]>, seed: u64) {
    let mut input = RouterInput::new(x.view());
    if let Some(p) = padding {
        input = input.with_padding(p);
    }
    for backend in [
        CpuBackend::with_threads(2),
        CpuBackend::with_threads(2).with_kernels(CpuKernels::Portable),
    ] {
        let report = check_layer_grad(&backend, l, &input, seed)
            .unwrap_or_else(|err| panic!("gradient check failed: {err}"));
        assert!(report.checked > 0);
    }
}

#[test]
fn every_bank_and_activation_passes_the_gradient_check() {
    let mut rng = SeqRng::new(5, 0);
    let (t, d, e, f) = (13, 6, 4, 7);
    let padding: Vec<bool> = (0..t).map(|i| i % 5 == 3).collect();
    for kind in 0u8..5 {
        let acts: &[Activation] = if kind == 1 { &ACTS[..1] } else { &ACTS };
        for &act in acts {
            for (i, o) in [
                Options {
                    shared: None,
                    scale: 1.0,
                    bias: false,
                },
                Options {
                    shared: Some(true),
                    scale: 0.7,
                    bias: true,
                },
                Options {
                    shared: Some(false),
                    scale: 1.3,
                    bias: false,
                },
            ]
            .into_iter()
            .enumerate()
            {
                let b = bank(kind, act, e, d, f, &mut rng);
                let kept = plan(t, e, 2, &padding, &mut rng);
                let l = layer(b, kept, o, &mut rng);
                let x = rng.normal_matrix(t, d, 1.0);
                let pad = (i == 1).then_some(&padding[..]);
                check(&l, &x, pad, kind as u64 * 100 + i as u64);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: proptest::test_runner::RngSeed::Fixed(15), ..ProptestConfig::default() })]

    /// Random shapes, k, banks, activations and layer options pass the finite-difference check.
    #[test]
    fn random_layers_pass_the_gradient_check(t in 1usize..24, d in 1usize..9, e in 2usize..7, f in 1usize..9,
                                             k in 1usize..4, kind in 0u8..5, act in 0usize..4, shared in 0u8..3,
                                             scale in 0.5f32..1.5, bias in any::<bool>(), seed in 0u64..1000) {
        let mut rng = SeqRng::new(seed, 1);
        let padding: Vec<bool> = (0..t).map(|i| i % 4 == 2).collect();
        let b = bank(kind, ACTS[act], e, d, f, &mut rng);
        let kept = plan(t, e, k, &padding, &mut rng);
        let o = Options { shared: [None, Some(true), Some(false)][shared as usize], scale, bias };
        let l = layer(b, kept, o, &mut rng);
        let x = rng.normal_matrix(t, d, 1.0);
        check(&l, &x, Some(&padding), seed);
    }
}

fn train_step(
    backend: &CpuBackend,
    l: &MoeLayer,
    x: &Array2<f32>,
    cot: &Array2<f32>,
) -> (Array2<f32>, LayerGrads) {
    let mut dev = backend.upload(Arc::new(l.clone())).expect("upload");
    let out = dev
        .forward_train(&RouterInput::new(x.view()))
        .expect("forward_train");
    let grads = dev.backward(cot.view(), &[]).expect("backward");
    (out.output, grads)
}

/// A larger layer, so the grouped path runs the gemm kernels (groups of more than 48 rows) and several tiles.
fn big_layer(kind: u8, act: Activation, rng: &mut SeqRng) -> (MoeLayer, Array2<f32>, Array2<f32>) {
    let (t, d, e, f) = (150, 40, 5, 72);
    let b = bank(kind, act, e, d, f, rng);
    let kept = plan(t, e, 2, &[], rng);
    let o = Options {
        shared: Some(true),
        scale: 0.9,
        bias: true,
    };
    let l = layer(b, kept, o, rng);
    let x = rng.normal_matrix(t, d, 1.0);
    let cot = rng.normal_matrix(t, d, 1.0);
    (l, x, cot)
}

#[test]
fn gradients_are_bit_identical_on_one_and_two_threads() {
    let mut rng = SeqRng::new(9, 0);
    for kind in 0u8..5 {
        let (l, x, cot) = big_layer(kind, Activation::Silu, &mut rng);
        for kernels in [CpuKernels::Auto, CpuKernels::Portable] {
            let (y1, g1) = train_step(
                &CpuBackend::with_threads(1).with_kernels(kernels),
                &l,
                &x,
                &cot,
            );
            let (y2, g2) = train_step(
                &CpuBackend::with_threads(2).with_kernels(kernels),
                &l,
                &x,
                &cot,
            );
            assert_eq!(y1, y2, "bank {kind}: outputs differ");
            assert_eq!(
                g1, g2,
                "bank {kind} ({kernels:?}): gradients differ between 1 and 2 threads"
            );
        }
    }
}

#[test]
fn gradients_are_named_and_ordered_as_the_parameters() {
    let mut rng = SeqRng::new(3, 0);
    for kind in 0u8..5 {
        let (l, x, cot) = big_layer(kind, Activation::Gelu, &mut rng);
        let (_, g) = train_step(&CpuBackend::with_threads(2), &l, &x, &cot);
        let want: Vec<(String, Vec<usize>)> = l
            .params()
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| (p.name.clone(), p.shape().to_vec()))
            .collect();
        let got: Vec<(String, Vec<usize>)> = g
            .params
            .iter()
            .map(|g| (g.name.clone(), g.shape().to_vec()))
            .collect();
        assert_eq!(got, want);
        if kind == 4 {
            // PEER: sparse rows, only the touched experts (the last expert has no token).
            for name in ["experts.u", "experts.v"] {
                match &g.get(name).expect("peer gradient").value {
                    GradValue::Rows { rows, .. } => assert_eq!(rows, &vec![0, 1, 2, 3]),
                    GradValue::Dense(_) => panic!("{name}: dense gradient for PEER"),
                }
            }
        }
    }
}

/// A router that routes but has no backward (the trait's default).
#[derive(Debug, Clone)]
struct NoBackward(FixedPlan);

impl Router for NoBackward {
    fn name(&self) -> &str {
        "no-backward"
    }
    fn n_experts(&self) -> usize {
        self.0.n_experts
    }
    fn d_model(&self) -> Option<usize> {
        Some(self.0.d_model)
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<moe_core::Routing, MoeError> {
        self.0.route(input)
    }
}

#[derive(Debug, Clone)]
struct Doubler(usize);

impl Expert for Doubler {
    fn d_model(&self) -> usize {
        self.0
    }
    fn forward(&self, x: ndarray::ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Ok(x.mapv(|v| 2.0 * v))
    }
}

#[test]
fn bad_calls_are_typed_errors() {
    let mut rng = SeqRng::new(4, 0);
    let (t, d, e, f) = (6, 4, 3, 5);
    let kept = plan(t, e, 1, &[], &mut rng);
    let o = Options {
        shared: None,
        scale: 1.0,
        bias: false,
    };
    let l = layer(
        bank(0, Activation::Silu, e, d, f, &mut rng),
        kept.clone(),
        o,
        &mut rng,
    );
    let x = rng.normal_matrix(t, d, 1.0);
    let mut dev = CpuBackend::new().upload(Arc::new(l)).expect("upload");
    let good = Array2::<f32>::ones((t, d));
    // No training forward yet.
    match dev.backward(good.view(), &[]) {
        Err(MoeError::Order { call, before }) => {
            assert_eq!(call, "backward");
            assert!(before.contains("forward_train"), "{before}");
        }
        other => panic!("expected an order error, got {other:?}"),
    }
    dev.forward(&RouterInput::new(x.view())).expect("forward");
    assert!(matches!(
        dev.backward(good.view(), &[]),
        Err(MoeError::Order { .. })
    ));
    dev.forward_train(&RouterInput::new(x.view()))
        .expect("forward_train");
    let wrong = Array2::<f32>::ones((t, d + 1));
    match dev.backward(wrong.view(), &[]) {
        Err(MoeError::Shape { tensor, .. }) => assert_eq!(tensor, "d_output"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let mut nan = good.clone();
    nan[[4, 2]] = f32::NAN;
    match dev.backward(nan.view(), &[]) {
        Err(MoeError::NonFinite { tensor, token, .. }) => {
            assert_eq!((tensor.as_str(), token), ("d_output", 4));
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    match dev.backward(good.view(), &[1.0]) {
        Err(MoeError::Shape { tensor, .. }) => assert_eq!(tensor, "d_aux"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    // Refused calls leave the forward's state: a good backward still runs, once.
    dev.backward(good.view(), &[]).expect("backward");
    assert!(matches!(
        dev.backward(good.view(), &[]),
        Err(MoeError::Order { .. })
    ));

    // A router without a backward.
    let fixed = FixedPlan {
        n_experts: e,
        d_model: d,
        kept: kept.clone(),
    };
    let l = MoeLayer::new(
        Box::new(NoBackward(fixed)),
        bank(2, Activation::Relu, e, d, f, &mut rng),
    )
    .expect("layer");
    let mut dev = CpuBackend::new().upload(Arc::new(l)).expect("upload");
    dev.forward_train(&RouterInput::new(x.view()))
        .expect("forward_train");
    match dev.backward(good.view(), &[]) {
        Err(err @ MoeError::Unsupported { .. }) => {
            assert!(err.to_string().contains("no-backward"), "{err}");
        }
        other => panic!("expected unsupported, got {other:?}"),
    }

    // Custom experts.
    let fixed = FixedPlan {
        n_experts: e,
        d_model: d,
        kept,
    };
    let experts: Vec<Box<dyn Expert>> = (0..e)
        .map(|_| Box::new(Doubler(d)) as Box<dyn Expert>)
        .collect();
    let l = MoeLayer::new(Box::new(fixed), ExpertBank::Custom(experts)).expect("layer");
    let mut dev = CpuBackend::new().upload(Arc::new(l)).expect("upload");
    dev.forward_train(&RouterInput::new(x.view()))
        .expect("forward_train");
    match dev.backward(good.view(), &[]) {
        Err(MoeError::Unsupported { owner, feature }) => {
            assert_eq!(
                (owner.as_str(), feature.as_str()),
                ("custom experts", "backward")
            );
        }
        other => panic!("expected unsupported, got {other:?}"),
    }
}

#[test]
fn an_sgd_step_lowers_the_loss() {
    let mut rng = SeqRng::new(8, 0);
    for kind in 0u8..5 {
        let (l, x, cot) = big_layer(kind, Activation::Silu, &mut rng);
        let mut dev = CpuBackend::with_threads(2)
            .upload(Arc::new(l))
            .expect("upload");
        let loss = |y: &Array2<f32>| -> f64 {
            y.iter()
                .zip(cot.iter())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let input = RouterInput::new(x.view());
        let before = loss(&dev.forward_train(&input).expect("forward_train").output);
        let grads = dev.backward(cot.view(), &[]).expect("backward");
        let mut sgd = moe_core::grad::sgd(1e-3);
        dev.apply_update(&grads.params, &mut sgd).expect("update");
        let after = loss(&dev.forward(&input).expect("forward").output);
        assert!(after < before, "bank {kind}: loss {before} -> {after}");
    }
}

/// The same bank with every weight tensor in column-major order: the grouped path does not run it, so a layer
/// uploaded while another holder keeps it (no re-layout at upload) takes the reference path.
fn column_major(bank: &ExpertBank) -> ExpertBank {
    use ndarray::ShapeBuilder;
    let f3 = |a: &Array3<f32>| {
        let mut o = Array3::<f32>::zeros(a.raw_dim().f());
        o.assign(a);
        o
    };
    match bank {
        ExpertBank::SwiGlu(b) => ExpertBank::SwiGlu(
            SwiGluBank::new(f3(b.gate_up()), f3(b.down()), b.act()).expect("bank"),
        ),
        ExpertBank::GptOss(b) => ExpertBank::GptOss(
            GptOssBank::new(
                f3(b.gate_up()),
                b.gate_up_bias().clone(),
                f3(b.down()),
                b.down_bias().clone(),
                b.alpha(),
                b.limit(),
            )
            .expect("bank"),
        ),
        ExpertBank::Mlp(b) => ExpertBank::Mlp(
            MlpBank::new(
                f3(b.w1()),
                b.b1().cloned(),
                f3(b.w2()),
                b.b2().cloned(),
                b.act(),
            )
            .expect("bank"),
        ),
        other => other.clone(),
    }
}

#[test]
fn grouped_backward_agrees_with_the_reference_backward() {
    let mut rng = SeqRng::new(21, 0);
    for kind in 0u8..4 {
        for act in ACTS {
            let (l, x, cot) = big_layer(kind, act, &mut rng);
            for kernels in [CpuKernels::Auto, CpuKernels::Portable] {
                let backend = CpuBackend::with_threads(2).with_kernels(kernels);
                let (y_fast, fast) = train_step(&backend, &l, &x, &cot);
                let mut slow_layer = l.clone();
                *slow_layer.experts_mut() = column_major(l.experts());
                let slow_layer = Arc::new(slow_layer);
                let keep = Arc::clone(&slow_layer);
                let mut dev = backend.upload(slow_layer).expect("upload");
                let y_ref = dev
                    .forward_train(&RouterInput::new(x.view()))
                    .expect("forward_train")
                    .output;
                let reference = dev.backward(cot.view(), &[]).expect("backward");
                drop(keep);
                let close = |what: &str,
                             a: ndarray::ArrayViewD<'_, f32>,
                             b: ndarray::ArrayViewD<'_, f32>| {
                    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                    for (i, (&p, &q)) in a.iter().zip(b.iter()).enumerate() {
                        assert!(
                            (p - q).abs() <= 1e-4 * scale,
                            "bank {kind} {act:?} {kernels:?} {what}[{i}]: {p} vs {q}"
                        );
                    }
                };
                close("output", y_fast.view().into_dyn(), y_ref.view().into_dyn());
                close(
                    "d_input",
                    fast.d_input.view().into_dyn(),
                    reference.d_input.view().into_dyn(),
                );
                assert_eq!(fast.params.len(), reference.params.len());
                for (a, b) in fast.params.iter().zip(&reference.params) {
                    assert_eq!(a.name, b.name);
                    let (da, db) = (a.to_dense().expect("dense"), b.to_dense().expect("dense"));
                    close(&a.name, da.view(), db.view());
                }
            }
        }
    }
}
