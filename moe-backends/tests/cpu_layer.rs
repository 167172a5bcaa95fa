//! The CPU layer against hand-computed cases and against a naive per-token reference written with plain loops.

use std::sync::Arc;

use ndarray::{Array1, Array2, Array3, ArrayView2, array};
use proptest::prelude::*;

use moe_backends::cpu::CpuBackend;
use moe_core::{
    Activation, Assignment, Backend, Expert, ExpertBank, GptOssBank, MlpBank, MoeError, MoeLayer,
    RouterInput, SharedExperts, SwiGluBank, rng::SeqRng,
};
use moe_routers::{SoftmaxTopKConfig, TopKPreset};

/// A router that returns a fixed plan (no spec), so a test controls the dispatch exactly.
type Fixed = moe_core::testing::FixedPlan;

/// An expert that fails if it is ever called: proves the backend skips experts with no tokens.
#[derive(Clone, Debug)]
struct MustNotRun(usize);

impl Expert for MustNotRun {
    fn d_model(&self) -> usize {
        self.0
    }
    fn forward(&self, _x: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Err(MoeError::Expert {
            expert: 1,
            reason: "an expert with no tokens was run".into(),
        })
    }
}

/// Doubles its input.
#[derive(Clone, Debug)]
struct Double(usize);

impl Expert for Double {
    fn d_model(&self) -> usize {
        self.0
    }
    fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, MoeError> {
        Ok(x.mapv(|v| 2.0 * v))
    }
}

fn run(layer: MoeLayer, x: &Array2<f32>) -> Result<moe_core::LayerOutput, MoeError> {
    CpuBackend::new()
        .upload(Arc::new(layer))?
        .forward(&RouterInput::new(x.view()))
}

fn identity_gate(e: usize) -> Array2<f32> {
    Array2::eye(e)
}

#[test]
fn hand_computed_two_experts() {
    // Identity gate, d = E = 2, k = 2 (Mixtral routing). x = [ln 3, 0] -> logits [ln 3, 0] -> softmax [0.75, 0.25].
    // MLP experts with w1 = I, ReLU, w2 = c_e I, c = [1, 2]: expert_e(x) = c_e relu(x) = [c_e ln 3, 0].
    // y = 0.75 * 1 * ln 3 + 0.25 * 2 * ln 3 = 1.25 ln 3 = 1.373265 in column 0, 0 in column 1.
    let router = TopKPreset::Mixtral
        .config()
        .build(identity_gate(2), 2)
        .expect("router");
    let w1 = Array3::from_shape_fn((2, 2, 2), |(_, i, j)| if i == j { 1.0 } else { 0.0 });
    let w2 = Array3::from_shape_fn(
        (2, 2, 2),
        |(e, i, j)| if i == j { (e + 1) as f32 } else { 0.0 },
    );
    let bank = MlpBank::new(w1, None, w2, None, Activation::Relu).expect("bank");
    let layer = MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank)).expect("layer");
    let x = array![[3f32.ln(), 0.0]];
    let out = run(layer, &x).expect("forward");
    assert!(
        (out.output[[0, 0]] - 1.25 * 3f32.ln()).abs() < 1e-6,
        "{}",
        out.output
    );
    assert_eq!(out.output[[0, 1]], 0.0);
}

#[test]
fn hand_computed_swiglu_three_experts_with_shared_and_bias() {
    // d = 1, f = 1, E = 3. Expert e: gate weight g_e, up weight u_e, down weight 1:
    // expert_e(x) = silu(g_e x) * (u_e x). With x = 1: silu(g) = g * sigmoid(g).
    // Fixed plan: token 0 -> expert 0 (w 0.5) and expert 2 (w 0.25); expert 1 gets nothing.
    // g = [1, 9, 2], u = [3, 9, 5]: expert_0(1) = 0.731059 * 3 = 2.193176, expert_2(1) = 2 * 0.880797 * 5 = 8.807971.
    // Routed: 0.5 * 2.193176 + 0.25 * 8.807971 = 3.298581; output scale 2 -> 6.597162.
    // Shared expert (g = 1, u = 1) gated by sigmoid(x * 0) = 0.5: 0.5 * 0.731059 = 0.365529. Bias 0.1.
    // y = 6.597162 + 0.365529 + 0.1 = 7.062691.
    let gate_up =
        Array3::from_shape_vec((3, 2, 1), vec![1.0, 3.0, 9.0, 9.0, 2.0, 5.0]).expect("shape");
    let down = Array3::from_elem((3, 1, 1), 1.0);
    let bank = SwiGluBank::new(gate_up, down, Activation::Silu).expect("bank");
    let kept = vec![
        Assignment {
            token: 0,
            expert: 0,
            weight: 0.5,
            rank: 0,
        },
        Assignment {
            token: 0,
            expert: 2,
            weight: 0.25,
            rank: 1,
        },
    ];
    let shared_bank = SwiGluBank::new(
        Array3::from_elem((1, 2, 1), 1.0),
        Array3::from_elem((1, 1, 1), 1.0),
        Activation::Silu,
    )
    .expect("shared");
    let shared = SharedExperts::new(ExpertBank::SwiGlu(shared_bank), Some(Array1::zeros(1)))
        .expect("shared");
    let layer = MoeLayer::new(
        Box::new(Fixed {
            n_experts: 3,
            d_model: 1,
            kept,
        }),
        ExpertBank::SwiGlu(bank),
    )
    .and_then(|l| l.with_shared(shared))
    .and_then(|l| l.with_output_scale(2.0))
    .and_then(|l| l.with_output_bias(array![0.1]))
    .expect("layer");
    let out = run(layer, &array![[1.0f32]]).expect("forward");
    assert!(
        (out.output[[0, 0]] - 7.062_691).abs() < 1e-5,
        "{}",
        out.output
    );
    assert_eq!(out.routing.active_experts(), &[0, 2]);
}

#[test]
fn empty_experts_are_skipped() {
    // Expert 1 errors if called; the plan gives it no token, so the forward must succeed: y = 0.5 * 2x.
    let experts: Vec<Box<dyn Expert>> = vec![Box::new(Double(2)), Box::new(MustNotRun(2))];
    let kept = vec![Assignment {
        token: 0,
        expert: 0,
        weight: 0.5,
        rank: 0,
    }];
    let layer = MoeLayer::new(
        Box::new(Fixed {
            n_experts: 2,
            d_model: 2,
            kept,
        }),
        ExpertBank::Custom(experts),
    )
    .expect("layer");
    let out = run(layer, &array![[1.0f32, -3.0], [5.0, 5.0]]).expect("forward");
    assert_eq!(out.output, array![[1.0f32, -3.0], [0.0, 0.0]]);
}

#[test]
fn empty_batch_gives_empty_output() {
    let router = SoftmaxTopKConfig::default()
        .build(identity_gate(3), 2)
        .expect("router");
    let bank = SwiGluBank::new(
        Array3::zeros((3, 4, 3)),
        Array3::zeros((3, 3, 2)),
        Activation::Silu,
    )
    .expect("bank");
    let layer = MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).expect("layer");
    let out = run(layer, &Array2::zeros((0, 3))).expect("forward");
    assert_eq!(out.output.dim(), (0, 3));
    assert_eq!(out.routing.n_slots(), 0);
}

#[test]
fn k_above_e_and_wrong_width_are_typed_errors() {
    assert!(matches!(
        SoftmaxTopKConfig::default().build(identity_gate(3), 4),
        Err(MoeError::TopK { k: 4, n_experts: 3 })
    ));
    let router = SoftmaxTopKConfig::default()
        .build(identity_gate(3), 2)
        .expect("router");
    let bank = SwiGluBank::new(
        Array3::zeros((3, 4, 3)),
        Array3::zeros((3, 3, 2)),
        Activation::Silu,
    )
    .expect("bank");
    let layer = MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).expect("layer");
    let err = run(layer, &Array2::zeros((2, 5))).expect_err("width 5 into d = 3");
    assert_eq!(err.to_string(), "expected hidden [T, 3], found [2, 5]");
    // A bank whose shapes disagree is refused with both shapes named.
    let err = SwiGluBank::new(
        Array3::zeros((3, 4, 3)),
        Array3::zeros((3, 2, 3)),
        Activation::Silu,
    )
    .expect_err("bad down");
    assert_eq!(
        err.to_string(),
        "expected experts.down_proj [3, 3, 2], found [3, 2, 3]"
    );
    // A router and a bank with different expert counts are refused.
    let router = SoftmaxTopKConfig::default()
        .build(identity_gate(4), 2)
        .expect("router");
    let bank = SwiGluBank::new(
        Array3::zeros((3, 4, 4)),
        Array3::zeros((3, 4, 2)),
        Activation::Silu,
    )
    .expect("bank");
    assert!(matches!(
        MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)),
        Err(MoeError::Mismatch { .. })
    ));
}

#[test]
fn nan_input_names_the_token() {
    let router = SoftmaxTopKConfig::default()
        .build(identity_gate(3), 2)
        .expect("router");
    let bank = SwiGluBank::new(
        Array3::zeros((3, 4, 3)),
        Array3::zeros((3, 3, 2)),
        Activation::Silu,
    )
    .expect("bank");
    let layer = MoeLayer::new(Box::new(router), ExpertBank::SwiGlu(bank)).expect("layer");
    let mut x = Array2::zeros((4, 3));
    x[[2, 1]] = f32::NAN;
    assert!(matches!(
        run(layer, &x),
        Err(MoeError::NonFinite {
            token: 2,
            column: 1,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------------------------
// Naive reference: per token, per assignment, per expert, with plain loops and f64 accumulation.

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

fn naive_expert(bank: &ExpertBank, e: usize, x: &[f32]) -> Vec<f64> {
    let d = x.len();
    match bank {
        ExpertBank::SwiGlu(b) => {
            let f = b.down().dim().2;
            let h: Vec<f64> = (0..f)
                .map(|j| {
                    let g: f64 = (0..d)
                        .map(|i| b.gate_up()[[e, j, i]] as f64 * x[i] as f64)
                        .sum();
                    let u: f64 = (0..d)
                        .map(|i| b.gate_up()[[e, f + j, i]] as f64 * x[i] as f64)
                        .sum();
                    silu(g) * u
                })
                .collect();
            (0..d)
                .map(|o| (0..f).map(|j| b.down()[[e, o, j]] as f64 * h[j]).sum())
                .collect()
        }
        ExpertBank::GptOss(b) => {
            let f = b.down().dim().1;
            let h: Vec<f64> = (0..f)
                .map(|j| {
                    let z = |c: usize| -> f64 {
                        (0..d)
                            .map(|i| x[i] as f64 * b.gate_up()[[e, i, c]] as f64)
                            .sum::<f64>()
                            + b.gate_up_bias()[[e, c]] as f64
                    };
                    let g = z(2 * j).min(b.limit() as f64);
                    let u = z(2 * j + 1).clamp(-(b.limit() as f64), b.limit() as f64);
                    (u + 1.0) * g / (1.0 + (-(g * b.alpha() as f64)).exp())
                })
                .collect();
            (0..d)
                .map(|o| {
                    (0..f)
                        .map(|j| h[j] * b.down()[[e, j, o]] as f64)
                        .sum::<f64>()
                        + b.down_bias()[[e, o]] as f64
                })
                .collect()
        }
        ExpertBank::Mlp(b) => {
            let f = b.w1().dim().1;
            let h: Vec<f64> = (0..f)
                .map(|j| {
                    let mut v: f64 = (0..d).map(|i| b.w1()[[e, j, i]] as f64 * x[i] as f64).sum();
                    if let Some(b1) = b.b1() {
                        v += b1[[e, j]] as f64;
                    }
                    v.max(0.0)
                })
                .collect();
            (0..d)
                .map(|o| {
                    let mut v: f64 = (0..f).map(|j| b.w2()[[e, o, j]] as f64 * h[j]).sum();
                    if let Some(b2) = b.b2() {
                        v += b2[[e, o]] as f64;
                    }
                    v
                })
                .collect()
        }
        _ => unreachable!("the property test builds only these banks"),
    }
}

fn random_bank(kind: u8, e: usize, d: usize, f: usize, rng: &mut SeqRng) -> ExpertBank {
    let s = 1.0 / (d as f32).sqrt();
    let a3 = |rng: &mut SeqRng, sh: (usize, usize, usize)| {
        Array3::from_shape_simple_fn(sh, || rng.normal() as f32 * s)
    };
    match kind {
        0 => ExpertBank::SwiGlu(
            SwiGluBank::new(a3(rng, (e, 2 * f, d)), a3(rng, (e, d, f)), Activation::Silu)
                .expect("bank"),
        ),
        1 => ExpertBank::GptOss(
            GptOssBank::new(
                a3(rng, (e, d, 2 * f)),
                rng.normal_matrix(e, 2 * f, 0.1),
                a3(rng, (e, f, d)),
                rng.normal_matrix(e, d, 0.1),
                1.702,
                0.8,
            )
            .expect("bank"),
        ),
        _ => ExpertBank::Mlp(
            MlpBank::new(
                a3(rng, (e, f, d)),
                Some(rng.normal_matrix(e, f, 0.1)),
                a3(rng, (e, d, f)),
                Some(rng.normal_matrix(e, d, 0.1)),
                Activation::Relu,
            )
            .expect("bank"),
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..ProptestConfig::default() })]

    /// The grouped forward equals the naive per-token reference to 1e-5 (relative to the output's scale), for
    /// random T (including 0 and 1), d, E, k, weights, banks and presets.
    #[test]
    fn grouped_equals_naive(t in 0usize..40, d in 1usize..12, e in 1usize..9, kf in 0.0f64..1.0, f in 1usize..10,
                            kind in 0u8..3, preset in 0usize..4, seed in 0u64..1000) {
        let k = 1 + ((e - 1) as f64 * kf) as usize;
        let mut rng = SeqRng::new(seed, 0);
        let gate = rng.normal_matrix(e, d, 1.0);
        let preset = [TopKPreset::Mixtral, TopKPreset::Qwen2Moe, TopKPreset::Olmoe, TopKPreset::Granite][preset];
        let router = preset.config().build(gate, k).expect("router");
        let bank = random_bank(kind, e, d, f, &mut rng);
        let layer = MoeLayer::new(Box::new(router), bank.clone()).expect("layer");
        let x = rng.normal_matrix(t, d, 1.0);
        let out = run(layer, &x).expect("forward");
        prop_assert_eq!(out.output.dim(), (t, d));
        for (tok, choices) in out.routing.per_token().iter().enumerate() {
            prop_assert_eq!(choices.len(), k);
            let xr: Vec<f32> = x.row(tok).to_vec();
            let mut want = vec![0.0f64; d];
            for &(ex, w, _) in choices {
                for (acc, v) in want.iter_mut().zip(naive_expert(&bank, ex, &xr)) {
                    *acc += w as f64 * v;
                }
            }
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (j, &wv) in want.iter().enumerate() {
                let got = out.output[[tok, j]] as f64;
                prop_assert!((got - wv).abs() <= 1e-5 * scale, "token {} col {}: {} vs {}", tok, j, got, wv);
            }
        }
    }
}

#[test]
fn one_and_two_threads_are_bit_identical() {
    let mut rng = SeqRng::new(11, 0);
    let (t, d, e, f) = (97, 24, 6, 40);
    let gate = rng.normal_matrix(e, d, 1.0);
    let router = TopKPreset::Mixtral.config().build(gate, 2).expect("router");
    let layer = Arc::new(
        MoeLayer::new(Box::new(router), random_bank(0, e, d, f, &mut rng)).expect("layer"),
    );
    let x = rng.normal_matrix(t, d, 1.0);
    let a = CpuBackend::with_threads(1)
        .upload(layer.clone())
        .and_then(|mut l| l.forward(&RouterInput::new(x.view())))
        .expect("1 thread");
    let b = CpuBackend::with_threads(2)
        .upload(layer)
        .and_then(|mut l| l.forward(&RouterInput::new(x.view())))
        .expect("2 threads");
    assert_eq!(a.output, b.output);
    assert_eq!(a.routing, b.routing);
}

#[test]
fn peer_bank_and_gelu_hand_computed() {
    // PEER singletons e_i(x) = act(u_i · x) v_i with d = 2, N = 3.
    // u = [[1, 0], [0, 1], [1, 1]], v = [[1, 2], [3, 4], [5, 6]], x = [1, -2].
    // u·x = [1, -2, -1]. ReLU: [1, 0, 0]; exact GELU: 1·Φ(1) = 0.841344746, -2·Φ(-2) = -0.045500264,
    // -1·Φ(-1) = -0.158655254.
    // Plan: token 0 -> expert 0 (w 0.5), expert 1 (w 0.25), expert 2 (w 0.25).
    // ReLU: 0.5 · 1 · [1, 2] = [0.5, 1.0].
    // GELU: 0.5·0.841345·[1, 2] + 0.25·(-0.045500)·[3, 4] + 0.25·(-0.158655)·[5, 6]
    //     = [0.420672 - 0.034125 - 0.198319, 0.841345 - 0.045500 - 0.237983] = [0.188228, 0.557862].
    let u = array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
    let v = array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]];
    let kept = vec![
        Assignment {
            token: 0,
            expert: 0,
            weight: 0.5,
            rank: 0,
        },
        Assignment {
            token: 0,
            expert: 1,
            weight: 0.25,
            rank: 1,
        },
        Assignment {
            token: 0,
            expert: 2,
            weight: 0.25,
            rank: 2,
        },
    ];
    let x = array![[1.0f32, -2.0]];
    for (act, want) in [
        (Activation::Relu, [0.5f32, 1.0]),
        (Activation::Gelu, [0.188_228, 0.557_862]),
    ] {
        let bank = moe_core::PeerBank::new(u.clone(), v.clone(), act).expect("bank");
        let layer = MoeLayer::new(
            Box::new(Fixed {
                n_experts: 3,
                d_model: 2,
                kept: kept.clone(),
            }),
            ExpertBank::Peer(bank),
        )
        .expect("layer");
        let out = run(layer, &x).expect("forward");
        for j in 0..2 {
            assert!(
                (out.output[[0, j]] - want[j]).abs() < 2e-6,
                "{act:?}: {} vs {want:?}",
                out.output
            );
        }
    }
}

/// One resident bank, many routers: `set_router` on an uploaded layer gives what a fresh upload with that router
/// gives (native top-k, Switch with capacity, hash on the host), keeps the very same bank (no copy), and refuses a
/// router of another expert count.
#[test]
fn set_router_swaps_the_router_and_keeps_the_bank() {
    let (d, e, f, t) = (24, 6, 20, 40);
    let reg = moe_routers::builtin();
    let bank =
        moe_core::workload::random_swiglu_bank(e, d, f, 3).unwrap_or_else(|err| panic!("{err}"));
    let make = |name: &str, opts: &[(&str, &str)], seed: u64| {
        let mut args = moe_core::RouterArgs::new(d, e, 2, seed);
        for (k, v) in opts {
            args.set_option_str(k, v);
        }
        reg.create(name, &args)
            .unwrap_or_else(|err| panic!("{name}: {err}"))
    };
    let first =
        MoeLayer::new(make("softmax-topk", &[], 0), bank).unwrap_or_else(|err| panic!("{err}"));
    let bank_ptr = Arc::clone(first.experts_arc());
    let mut resident = CpuBackend::with_threads(2)
        .upload(Arc::new(first))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut rng = SeqRng::new(11, 0);
    let x = rng.normal_matrix(t, d, 1.0);
    let ids: Vec<u32> = (0..t as u32).collect();
    let input = RouterInput::new(x.view()).with_token_ids(&ids);
    for (name, opts, seed) in [
        ("switch-top1", &[("capacity_factor", "1.0")][..], 5),
        ("hash", &[][..], 0),
        ("softmax-topk", &[][..], 9),
    ] {
        let router = make(name, opts, seed);
        resident
            .set_router(router.clone())
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(
            Arc::ptr_eq(&bank_ptr, resident.layer().experts_arc()),
            "{name}: the bank was copied"
        );
        let got = resident
            .forward(&input)
            .unwrap_or_else(|err| panic!("{err}"));
        let fresh =
            MoeLayer::new(router, (*bank_ptr).clone()).unwrap_or_else(|err| panic!("{err}"));
        let want = CpuBackend::with_threads(2)
            .upload(Arc::new(fresh))
            .and_then(|mut l| l.forward(&input))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(got.output, want.output, "{name}: output");
        assert_eq!(got.routing, want.routing, "{name}: routing");
    }
    let other = moe_routers::builtin()
        .create("softmax-topk", &moe_core::RouterArgs::new(d, e + 1, 2, 0))
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(matches!(
        resident.set_router(other),
        Err(MoeError::Mismatch { .. })
    ));
}
