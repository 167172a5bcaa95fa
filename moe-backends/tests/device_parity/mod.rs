//! Parity cases shared by the device backends' tests (`wgpu_parity.rs`, `cuda_parity.rs`; `cpu_set_router.rs` runs
//! the `set_router` case on the CPU backend): seeded random layers run on the CPU reference and on a device
//! backend, outputs and plans compared.
//!
//! Tolerances: f32 weights, `max |device − cpu| ≤ 1e-5 · max(max |cpu|, 1)` (f32 sums in another order); 16-bit
//! weights, `≤ 1e-2 · max |cpu|` (weights and activations rounded before each product, f32 accumulation). Routing
//! weights to 1e-5; chosen experts, ranks and drops identical (the router stays f32, and the seeded cases have no
//! near ties). Each test binary uses only some of these items.
#![allow(
    dead_code,
    unused_macros,
    reason = "each test binary uses only some of the shared items (cpu_set_router not the macro)"
)]

use std::sync::Arc;

use ndarray::{Array1, Array2, Array3};

use moe_backends::Dtype;
use moe_backends::cpu::CpuBackend;
use moe_core::{
    Activation, Assignment, Backend, ExpertBank, GptOssBank, LayerOutput, MlpBank, MoeError,
    MoeLayer, PeerBank, Router, RouterArgs, RouterInput, RouterPath, Routing, SharedExperts,
    SwiGluBank, rng::SeqRng,
};
use moe_routers::{SoftmaxTopKConfig, SwitchTop1Config, TopKPreset};

/// Output tolerance of f32 weights, relative to `max(max |ref|, 1)`.
pub const OUT_TOL: f32 = 1e-5;
/// Output tolerance of 16-bit weights, relative to `max |ref|`.
pub const HALF_TOL: f32 = 1e-2;
/// Routing weight tolerance, absolute.
pub const W_TOL: f32 = 1e-5;

/// The shared cases as `#[test]`s: each takes its backend from `$backend()` (`None`: skip) and makes the device
/// under test with `$device(&backend)`.
macro_rules! shared_cases {
    ($backend:ident, $device:ident) => {
        shared_cases!(@each $backend, $device, topk_presets_random_shapes,
            group_limited_sigmoid_with_correction_bias, mlp_banks_every_activation,
            gpt_oss_bank_with_gate_bias, shared_experts_scale_and_bias, switch_capacity_drops,
            host_path_routers, errors_empty_input_and_reuse, activations_match_f64_reference,
            set_router_keeps_the_bank, saturated_ties_rank_by_the_logit);
    };
    (@each $backend:ident, $device:ident, $($case:ident),*) => {
        $(#[test]
        fn $case() {
            if let Some(b) = $backend() {
                device_parity::$case(&$device(&b));
            }
        })*
    };
}

/// A device backend under test.
pub struct Device<'a> {
    /// The backend.
    pub backend: &'a dyn Backend,
    /// The precision its layers keep their expert weights in (sets the tolerance).
    pub dtype: Dtype,
    /// Where a Switch spec routes on it (wgpu runs it natively, cuda on the host).
    pub switch_path: RouterPath,
}

pub fn rng(seed: u64) -> SeqRng {
    SeqRng::new(seed, 77)
}

pub fn matrix(r: &mut SeqRng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    r.normal_matrix(rows, cols, scale)
}

pub fn tensor3(r: &mut SeqRng, a: usize, b: usize, c: usize, scale: f32) -> Array3<f32> {
    let m = r.normal_matrix(a * b, c, scale);
    Array3::from_shape_vec((a, b, c), m.into_iter().collect()).expect("shape")
}

pub fn vector(r: &mut SeqRng, n: usize, scale: f32) -> Array1<f32> {
    r.normal_matrix(1, n, scale).into_iter().collect()
}

pub fn swiglu(r: &mut SeqRng, e: usize, d: usize, f: usize, act: Activation) -> ExpertBank {
    let s1 = 1.0 / (d as f32).sqrt();
    let s2 = 1.0 / (f as f32).sqrt();
    ExpertBank::SwiGlu(
        SwiGluBank::new(tensor3(r, e, 2 * f, d, s1), tensor3(r, e, d, f, s2), act).expect("bank"),
    )
}

pub fn mlp(
    r: &mut SeqRng,
    e: usize,
    d: usize,
    f: usize,
    act: Activation,
    biases: bool,
) -> ExpertBank {
    let s1 = 1.0 / (d as f32).sqrt();
    let s2 = 1.0 / (f as f32).sqrt();
    let w1 = tensor3(r, e, f, d, s1);
    let w2 = tensor3(r, e, d, f, s2);
    let (b1, b2) = if biases {
        (Some(matrix(r, e, f, 0.5)), Some(matrix(r, e, d, 0.5)))
    } else {
        (None, None)
    };
    ExpertBank::Mlp(MlpBank::new(w1, b1, w2, b2, act).expect("bank"))
}

pub fn topk_router(
    r: &mut SeqRng,
    e: usize,
    d: usize,
    k: usize,
    cfg: SoftmaxTopKConfig,
) -> Box<dyn Router> {
    Box::new(cfg.build(matrix(r, e, d, 1.0), k).expect("router"))
}

/// Runs `layer` on the CPU backend and on `dev`, checks outputs and plans, and returns the device's output.
pub fn check_on(
    dev: &Device<'_>,
    layer: MoeLayer,
    input: &RouterInput<'_>,
    path: RouterPath,
) -> Option<LayerOutput> {
    let layer = Arc::new(layer);
    let want = CpuBackend::new()
        .upload(Arc::clone(&layer))
        .expect("cpu upload")
        .forward(input)
        .expect("cpu forward");
    let name = dev.backend.name().to_string();
    let got = dev
        .backend
        .upload(layer)
        .unwrap_or_else(|e| panic!("{name} upload: {e}"))
        .forward(input)
        .unwrap_or_else(|e| panic!("{name} forward: {e}"));
    assert_eq!(got.router_path, path, "router path");
    let tol = match dev.dtype {
        Dtype::F32 => OUT_TOL * want.output.iter().fold(1.0f32, |m, v| m.max(v.abs())),
        _ => HALF_TOL * want.output.iter().fold(0.0f32, |m, v| m.max(v.abs())),
    };
    compare_tol(&want, &got, tol);
    Some(got)
}

pub fn compare(want: &LayerOutput, got: &LayerOutput) {
    let scale = want.output.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    compare_tol(want, got, OUT_TOL * scale);
}

pub fn compare_tol(want: &LayerOutput, got: &LayerOutput, tol: f32) {
    assert_eq!(want.output.dim(), got.output.dim());
    let diff = want
        .output
        .iter()
        .zip(&got.output)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= tol, "max |device - cpu| = {diff:e} > {tol:e}");
    compare_routing(&want.routing, &got.routing);
}

pub fn compare_routing(want: &Routing, got: &Routing) {
    assert_eq!(want.n_tokens(), got.n_tokens());
    assert_eq!(want.n_experts(), got.n_experts());
    assert_eq!(want.n_real_tokens(), got.n_real_tokens());
    let (a, b) = (want.per_token(), got.per_token());
    for (t, (x, y)) in a.iter().zip(&b).enumerate() {
        let ex: Vec<(usize, u16)> = x.iter().map(|p| (p.0, p.2)).collect();
        let ey: Vec<(usize, u16)> = y.iter().map(|p| (p.0, p.2)).collect();
        assert_eq!(ex, ey, "token {t}: experts and ranks");
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p.1 - q.1).abs() <= W_TOL,
                "token {t}: weight {} vs {}",
                p.1,
                q.1
            );
        }
    }
    let key = |v: &[Assignment]| -> Vec<(u32, u32)> {
        let mut k: Vec<(u32, u32)> = v.iter().map(|a| (a.token, a.expert)).collect();
        k.sort_unstable();
        k
    };
    assert_eq!(key(want.dropped()), key(got.dropped()), "dropped");
    assert_eq!(want.offsets(), got.offsets());
    assert_eq!(want.slot_tokens(), got.slot_tokens());
    if let (Some(l1), Some(l2)) = (want.logits(), got.logits()) {
        let s = l1.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let dl = l1
            .iter()
            .zip(l2)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(dl <= OUT_TOL * s, "logits differ by {dl:e}");
    }
}

/// A router that returns a fixed plan (no spec), so a test controls the dispatch exactly.
pub type Fixed = moe_core::testing::FixedPlan;

/// Seeded random shapes through every top-k preset: T = 1 and T not a multiple of a row tile, E up to 16
/// (so many experts get no tokens at small T), k up to 4, SwiGLU banks with each activation.
pub fn topk_presets_random_shapes(b: &Device<'_>) {
    let acts = [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
    ];
    let presets = [
        TopKPreset::Mixtral,
        TopKPreset::Qwen2Moe,
        TopKPreset::Olmoe,
        TopKPreset::Granite,
    ];
    let shapes = [
        (1, 8, 16, 16, 1),
        (1, 24, 20, 8, 4),
        (7, 16, 36, 4, 2),
        (33, 40, 16, 16, 4),
        (70, 24, 40, 8, 2),
        (45, 8, 8, 1, 1),
        (3, 32, 24, 16, 3),
        (64, 16, 32, 6, 2),
    ];
    for (i, &(t, d, f, e, k)) in shapes.iter().enumerate() {
        let mut r = rng(100 + i as u64);
        let cfg = presets[i % presets.len()].config();
        let layer = MoeLayer::new(
            topk_router(&mut r, e, d, k, cfg),
            swiglu(&mut r, e, d, f, acts[i % acts.len()]),
        )
        .expect("layer");
        let x = matrix(&mut r, t, d, 1.0);
        check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
    }
}

/// DeepSeek-V3 routing: sigmoid scores, a random correction bias (selection only), groups with top-2 group scores,
/// renormalisation and scaling 2.5; plus sqrt-softplus scores without renormalisation.
pub fn group_limited_sigmoid_with_correction_bias(b: &Device<'_>) {
    for (i, &(t, d, e, k, n_group, topk_group)) in [
        (37, 16, 16, 4, 4, 2),
        (9, 24, 8, 2, 4, 1),
        (50, 16, 16, 3, 8, 3),
        (1, 8, 4, 2, 2, 1),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(200 + i as u64);
        let cfg = SoftmaxTopKConfig {
            n_group: Some(n_group),
            topk_group: Some(topk_group),
            ..TopKPreset::DeepseekV3.config()
        };
        let router = cfg
            .build(matrix(&mut r, e, d, 1.0), k)
            .expect("router")
            .with_correction_bias(vector(&mut r, e, 0.3))
            .expect("bias");
        let layer = MoeLayer::new(Box::new(router), swiglu(&mut r, e, d, 24, Activation::Silu))
            .expect("layer");
        let x = matrix(&mut r, t, d, 1.0);
        check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
    }
    let mut r = rng(250);
    let cfg = SoftmaxTopKConfig {
        score: Some(moe_core::ScoreFn::SqrtSoftplus),
        renormalize: Some(false),
        scaling: Some(1.5),
        ..Default::default()
    };
    let layer = MoeLayer::new(
        topk_router(&mut r, 8, 16, 2, cfg),
        swiglu(&mut r, 8, 16, 16, Activation::Silu),
    )
    .expect("layer");
    let x = matrix(&mut r, 21, 16, 2.0);
    check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
}

/// MLP banks with every activation (exact GELU through the device's erf), with and without biases.
pub fn mlp_banks_every_activation(b: &Device<'_>) {
    for (i, act) in [
        Activation::Relu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
    ]
    .into_iter()
    .enumerate()
    {
        for biases in [false, true] {
            let mut r = rng(300 + 2 * i as u64 + u64::from(biases));
            let (t, d, f, e, k) = (19, 24, 40, 8, 2);
            let layer = MoeLayer::new(
                topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config()),
                mlp(&mut r, e, d, f, act, biases),
            )
            .expect("layer");
            let x = matrix(&mut r, t, d, 2.0);
            check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
        }
    }
}

/// GPT-OSS experts (transposed, interleaved, clamped GLU with biases) behind a router with a gate bias.
pub fn gpt_oss_bank_with_gate_bias(b: &Device<'_>) {
    let mut r = rng(400);
    let (t, d, f, e, k) = (35, 16, 24, 8, 4);
    let router = TopKPreset::Granite
        .config()
        .build(matrix(&mut r, e, d, 1.0), k)
        .expect("router")
        .with_gate_bias(vector(&mut r, e, 0.5))
        .expect("bias");
    let bank = GptOssBank::new(
        tensor3(&mut r, e, d, 2 * f, 0.5),
        matrix(&mut r, e, 2 * f, 0.5),
        tensor3(&mut r, e, f, d, 0.3),
        matrix(&mut r, e, d, 0.5),
        1.702,
        7.0,
    )
    .expect("bank");
    let layer = MoeLayer::new(Box::new(router), ExpertBank::GptOss(bank)).expect("layer");
    // Large inputs so that the clamp at the limit is exercised.
    let x = matrix(&mut r, t, d, 4.0);
    check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
}

/// Shared experts (SwiGLU with the Qwen2-MoE sigmoid gate, MLP without), output scale and output bias.
pub fn shared_experts_scale_and_bias(b: &Device<'_>) {
    for gated in [true, false] {
        let mut r = rng(500 + u64::from(gated));
        let (t, d, f, e, k) = (29, 16, 24, 8, 2);
        let shared_bank = if gated {
            swiglu(&mut r, 1, d, 40, Activation::Silu)
        } else {
            mlp(&mut r, 1, d, 20, Activation::Gelu, true)
        };
        let gate = gated.then(|| vector(&mut r, d, 0.5));
        let layer = MoeLayer::new(
            topk_router(&mut r, e, d, k, TopKPreset::Qwen2Moe.config()),
            swiglu(&mut r, e, d, f, Activation::Silu),
        )
        .and_then(|l| l.with_shared(SharedExperts::new(shared_bank, gate)?))
        .and_then(|l| l.with_output_scale(0.75))
        .and_then(|l| l.with_output_bias(vector(&mut r, d, 1.0)))
        .expect("layer");
        let x = matrix(&mut r, t, d, 1.0);
        check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native);
    }
}

/// Switch top-1 with fixed capacity that drops tokens (native or host path: `Device::switch_path`): per sequence
/// by position (HF), per batch by probability and batch-prioritised, with padding tokens that take no capacity.
pub fn switch_capacity_drops(b: &Device<'_>) {
    let (d, f, e) = (16, 32, 4);
    let cases = [
        (true, moe_core::DropPolicy::Position, 2),
        (false, moe_core::DropPolicy::Probability, 5),
        (false, moe_core::DropPolicy::BatchPrioritized, 3),
        (true, moe_core::DropPolicy::Probability, 1),
    ];
    for (i, &(per_sequence, drop, cap)) in cases.iter().enumerate() {
        let mut r = rng(600 + i as u64);
        let router = SwitchTop1Config {
            jitter: Some(0.0),
            per_sequence: Some(per_sequence),
            drop: Some(drop),
            ..SwitchTop1Config::hf_switch(cap)
        }
        .build(matrix(&mut r, e, d, 1.0))
        .expect("router");
        assert!(router.spec().is_some());
        let layer = MoeLayer::new(
            Box::new(router),
            mlp(&mut r, e, d, f, Activation::Relu, false),
        )
        .expect("layer");
        let x = matrix(&mut r, 40, d, 1.0);
        let lens = [16, 9, 15];
        let pad: Vec<bool> = (0..40).map(|t| t % 7 == 3).collect();
        let input = RouterInput::new(x.view())
            .with_seq_lens(&lens)
            .with_padding(&pad);
        let got = check_on(b, layer, &input, b.switch_path).expect("ran");
        assert!(!got.routing.dropped().is_empty(), "case {i} drops nothing");
    }
}

/// Routers without a device spec run on the host and their plans run on the device: hash (token ids), expert
/// choice (variable experts per token), Switch with random drops, noisy top-k in training, and a plugin plan that
/// leaves experts empty.
pub fn host_path_routers(b: &Device<'_>) {
    let reg = moe_routers::builtin();
    let (t, d, f, e, k) = (26, 16, 24, 8, 2);
    let x = matrix(&mut rng(700), t, d, 1.0);
    let ids: Vec<u32> = (0..t as u32).map(|i| i * 7 + 3).collect();
    for (name, opts) in [
        ("hash", vec![]),
        ("expert-choice", vec![]),
        ("switch-top1", vec![("drop", "random")]),
        ("noisy-topk", vec![]),
    ] {
        let mut args = RouterArgs::new(d, e, k, 3);
        for (key, v) in opts {
            args.set_option_str(key, v);
        }
        let router = reg.create(name, &args).expect("router");
        let layer =
            MoeLayer::new(router, swiglu(&mut rng(701), e, d, f, Activation::Silu)).expect("layer");
        let input = RouterInput::new(x.view())
            .with_token_ids(&ids)
            .with_mode(moe_core::Mode::Train { seed: 9 });
        check_on(b, layer, &input, RouterPath::Host);
    }
    // Experts 1, 4 and 5 get nothing; token 2 gets nothing; token 0 goes to three experts.
    let kept = [
        (0, 0, 0.5),
        (0, 2, 0.25),
        (0, 7, 1.5),
        (1, 3, 1.0),
        (3, 0, 2.0),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(tok, ex, w))| Assignment {
        token: tok,
        expert: ex,
        weight: w,
        rank: i as u16,
    })
    .collect();
    let router = Fixed {
        n_experts: e,
        d_model: d,
        kept,
    };
    let layer = MoeLayer::new(
        Box::new(router),
        swiglu(&mut rng(702), e, d, f, Activation::Silu),
    )
    .expect("layer");
    let x4 = matrix(&mut rng(703), 4, d, 1.0);
    let got = check_on(b, layer, &RouterInput::new(x4.view()), RouterPath::Host).expect("ran");
    assert!(got.output.row(2).iter().all(|&v| v == 0.0));
}

/// Bad input is a typed error; T = 0 is an empty output; PEER banks are refused at upload; buffers are reused
/// across forwards of different T.
pub fn errors_empty_input_and_reuse(b: &Device<'_>) {
    let mut r = rng(900);
    let (d, f, e, k) = (16, 24, 8, 2);
    let layer = Arc::new(
        MoeLayer::new(
            topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config()),
            swiglu(&mut r, e, d, f, Activation::Silu),
        )
        .expect("layer"),
    );
    let mut dev = b.backend.upload(Arc::clone(&layer)).expect("upload");
    let mut cpu = CpuBackend::new().upload(Arc::clone(&layer)).expect("cpu");
    let wrong = Array2::<f32>::zeros((3, d + 1));
    assert!(matches!(
        dev.forward(&RouterInput::new(wrong.view())),
        Err(MoeError::Shape { .. })
    ));
    let mut nan = matrix(&mut r, 4, d, 1.0);
    nan[[2, 5]] = f32::NAN;
    assert!(matches!(
        dev.forward(&RouterInput::new(nan.view())),
        Err(MoeError::NonFinite {
            token: 2,
            column: 5,
            ..
        })
    ));
    let bad_pad = [false; 3];
    let x4 = matrix(&mut r, 4, d, 1.0);
    assert!(matches!(
        dev.forward(&RouterInput::new(x4.view()).with_padding(&bad_pad)),
        Err(MoeError::Shape { .. })
    ));
    let empty = Array2::<f32>::zeros((0, d));
    let out = dev.forward(&RouterInput::new(empty.view())).expect("T = 0");
    assert_eq!(out.output.dim(), (0, d));
    for t in [50, 3, 64, 1, 50] {
        let x = matrix(&mut r, t, d, 1.0);
        let input = RouterInput::new(x.view());
        compare(
            &cpu.forward(&input).expect("cpu"),
            &dev.forward(&input).expect("device"),
        );
    }
    let peer = PeerBank::new(
        matrix(&mut r, e, d, 1.0),
        matrix(&mut r, e, d, 1.0),
        Activation::Gelu,
    )
    .expect("peer");
    let layer = MoeLayer::new(
        topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config()),
        ExpertBank::Peer(peer),
    )
    .expect("layer");
    let e = b
        .backend
        .upload(Arc::new(layer))
        .err()
        .expect("peer is refused");
    assert!(e.to_string().contains("peer"), "{e}");
}

/// The device's activations against f64 references on a grid over [-8, 8]: one MLP expert with `d = f = 1` and
/// unit weights, so the output is the activation itself. Exact GELU goes through the kernels' f32 `erf`; the
/// bound is `3e-7 · max(1, |x|)` (a few f32 ulps).
pub fn activations_match_f64_reference(b: &Device<'_>) {
    let xs: Vec<f32> = (0..=1600).map(|i| -8.0 + i as f32 * 0.01).collect();
    let x = Array2::from_shape_vec((xs.len(), 1), xs.clone()).expect("shape");
    type Reference = fn(f64) -> f64;
    let refs: [(Activation, Reference); 4] = [
        (Activation::Silu, |v| v / (1.0 + (-v).exp())),
        (Activation::Relu, |v| v.max(0.0)),
        (Activation::Gelu, |v| {
            0.5 * v * (1.0 + moe_core::math::erf(v / std::f64::consts::SQRT_2))
        }),
        (Activation::GeluTanh, |v| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        }),
    ];
    for (act, f) in refs {
        let bank = MlpBank::new(
            Array3::ones((1, 1, 1)),
            None,
            Array3::ones((1, 1, 1)),
            None,
            act,
        )
        .expect("bank");
        let router = TopKPreset::Mixtral
            .config()
            .build(Array2::ones((1, 1)), 1)
            .expect("router");
        let layer = MoeLayer::new(Box::new(router), ExpertBank::Mlp(bank)).expect("layer");
        let out = b
            .backend
            .upload(Arc::new(layer))
            .expect("upload")
            .forward(&RouterInput::new(x.view()))
            .expect("forward");
        let mut worst = 0.0f64;
        for (&v, &y) in xs.iter().zip(out.output.iter()) {
            let want = f(f64::from(v));
            let e = (f64::from(y) - want).abs() / f64::from(v.abs()).max(1.0);
            worst = worst.max(e);
        }
        assert!(worst <= 3e-7, "{act:?}: worst scaled error {worst:e}");
    }
}

/// One resident bank, many routers: `set_router` on an uploaded layer swaps the router (softmax top-k, Switch
/// top-1, the host-path hash and expert-choice routers, a DeepSeek-V3 style top-k with another gate, and back),
/// and every forward after a swap gives exactly what a fresh upload of the layer with that router gives (output,
/// plan and router path), within the usual tolerance of the CPU reference. A router of another `E` or `d` is
/// refused with [`MoeError::Mismatch`] and leaves the resident layer as it was.
pub fn set_router_keeps_the_bank(b: &Device<'_>) {
    let (t, d, f, e, k) = (23, 16, 24, 8, 2);
    let mut r = rng(950);
    let bank = swiglu(&mut r, e, d, f, Activation::Silu);
    let first = topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config());
    let switch: Box<dyn Router> = Box::new(
        SwitchTop1Config {
            jitter: Some(0.0),
            ..SwitchTop1Config::hf_switch(4)
        }
        .build(matrix(&mut r, e, d, 1.0))
        .expect("switch"),
    );
    let reg = moe_routers::builtin();
    let hash = reg
        .create("hash", &RouterArgs::new(d, e, k, 3))
        .expect("hash");
    let expert_choice = reg
        .create("expert-choice", &RouterArgs::new(d, e, k, 4))
        .expect("expert-choice");
    let grouped: Box<dyn Router> = Box::new(
        SoftmaxTopKConfig {
            n_group: Some(4),
            topk_group: Some(2),
            ..TopKPreset::DeepseekV3.config()
        }
        .build(matrix(&mut r, e, d, 1.0), 3)
        .expect("router")
        .with_correction_bias(vector(&mut r, e, 0.3))
        .expect("bias"),
    );
    let x = matrix(&mut r, t, d, 1.0);
    let ids: Vec<u32> = (0..t as u32).map(|i| i * 5 + 1).collect();
    let lens = [12, 11];
    let input = RouterInput::new(x.view())
        .with_seq_lens(&lens)
        .with_token_ids(&ids);
    let name = b.backend.name().to_string();
    let fresh = |router: Box<dyn Router>| {
        let layer = MoeLayer::new(router, bank.clone()).expect("layer");
        let layer = Arc::new(layer);
        let want = CpuBackend::new()
            .upload(Arc::clone(&layer))
            .expect("cpu upload")
            .forward(&input)
            .expect("cpu forward");
        let got = b
            .backend
            .upload(layer)
            .unwrap_or_else(|e| panic!("{name} upload: {e}"))
            .forward(&input)
            .unwrap_or_else(|e| panic!("{name} forward: {e}"));
        (want, got)
    };
    let layer = MoeLayer::new(first.clone(), bank.clone()).expect("layer");
    let mut dev = b.backend.upload(Arc::new(layer)).expect("upload");
    let routers = [&first, &switch, &hash, &expert_choice, &grouped, &first];
    for (i, router) in routers.into_iter().enumerate() {
        if i > 0 {
            dev.set_router(router.clone())
                .unwrap_or_else(|e| panic!("{name}: set_router {}: {e}", router.name()));
        }
        assert_eq!(dev.layer().router().name(), router.name());
        let got = dev.forward(&input).expect("forward after set_router");
        let (cpu, want) = fresh(router.clone());
        assert_eq!(
            got.router_path,
            want.router_path,
            "{}: router path",
            router.name()
        );
        compare_tol(&want, &got, 0.0);
        let tol = match b.dtype {
            Dtype::F32 => OUT_TOL * cpu.output.iter().fold(1.0f32, |m, v| m.max(v.abs())),
            _ => HALF_TOL * cpu.output.iter().fold(0.0f32, |m, v| m.max(v.abs())),
        };
        compare_tol(&cpu, &got, tol);
    }
    // Routers of another E or d are refused, and the resident layer keeps the router it had.
    let before = dev.forward(&input).expect("forward");
    for wrong in [
        topk_router(&mut r, e + 1, d, k, TopKPreset::Mixtral.config()),
        topk_router(&mut r, e, d + 1, k, TopKPreset::Mixtral.config()),
    ] {
        let err = dev
            .set_router(wrong)
            .expect_err("a router that does not fit");
        assert!(matches!(err, MoeError::Mismatch { .. }), "{err}");
        assert_eq!(dev.layer().router().name(), first.name());
        compare_tol(&before, &dev.forward(&input).expect("forward"), 0.0);
    }
}

/// The experts of each token in rank order.
fn ranked_experts(r: &Routing) -> Vec<Vec<usize>> {
    r.per_token()
        .iter()
        .map(|t| t.iter().map(|a| a.0).collect())
        .collect()
}

/// One saturated-ties case: options, k, correction bias, hidden rows `[T, 4]` (identity gate), ranked experts.
type SaturatedCase = (
    SoftmaxTopKConfig,
    usize,
    Option<Array1<f32>>,
    Array2<f32>,
    Vec<Vec<usize>>,
);

/// The exact-arithmetic ranking order on the device as on the CPU (score, then logit, then lower id): rows whose
/// distinct logits share one f32 score. DeepSeek-V3's saturated sigmoid rows of case `fidelity/sigmoid-saturation`
/// (identity gate, k 1: experts 1, 3, 0), the same with groups of 2 whose group scores tie too, sigmoid and
/// sqrt-softplus underflow, softmax underflow with k 3, and Switch's argmax of probabilities rounded equal.
pub fn saturated_ties_rank_by_the_logit(b: &Device<'_>) {
    let (e, d) = (4, 4);
    let eye = || Array2::<f32>::eye(e);
    let bank = |seed: u64| swiglu(&mut rng(seed), e, d, 8, Activation::Silu);
    let saturated = ndarray::array![
        [18.0f32, 20.0, 0.0, 0.0],
        [17.0, 0.0, 0.0, 25.0],
        [25.0, 0.0, 0.0, 17.0]
    ];
    let ds = SoftmaxTopKConfig {
        n_group: Some(1),
        topk_group: Some(1),
        ..TopKPreset::DeepseekV3.config()
    };
    let grouped = SoftmaxTopKConfig {
        n_group: Some(2),
        topk_group: Some(1),
        ..ds.clone()
    };
    let low = ndarray::array![
        [-300.0f32, -200.0, -400.0, -500.0],
        [-500.0, -400.0, -300.0, -200.0]
    ];
    let sigmoid = SoftmaxTopKConfig {
        score: Some(moe_core::ScoreFn::Sigmoid),
        ..Default::default()
    };
    let sqrt_softplus = SoftmaxTopKConfig {
        score: Some(moe_core::ScoreFn::SqrtSoftplus),
        ..Default::default()
    };
    let under = ndarray::array![
        [0.0f32, -200.0, -150.0, -300.0],
        [-300.0, -150.0, -200.0, 0.0]
    ];
    let cases: Vec<SaturatedCase> = vec![
        (
            ds,
            1,
            None,
            saturated.clone(),
            vec![vec![1], vec![3], vec![0]],
        ),
        (
            grouped,
            1,
            Some(Array1::from_elem(e, 0.1)),
            saturated,
            vec![vec![1], vec![3], vec![0]],
        ),
        (sigmoid, 1, None, low.clone(), vec![vec![1], vec![3]]),
        (sqrt_softplus, 1, None, low, vec![vec![1], vec![3]]),
        (
            TopKPreset::Qwen2Moe.config(),
            3,
            None,
            under,
            vec![vec![0, 2, 1], vec![3, 1, 2]],
        ),
    ];
    for (i, (cfg, k, bias, x, want)) in cases.into_iter().enumerate() {
        let mut router = cfg.build(eye(), k).expect("router");
        if let Some(bias) = bias {
            router = router.with_correction_bias(bias).expect("bias");
        }
        let layer = MoeLayer::new(Box::new(router), bank(700 + i as u64)).expect("layer");
        let got = check_on(b, layer, &RouterInput::new(x.view()), RouterPath::Native).expect("ran");
        assert_eq!(ranked_experts(&got.routing), want, "case {i}");
    }
    // Switch: e^{-1e-8} is 1.0 in f32, both probabilities round to 0.5 (or differ in the last bit on a device);
    // the larger logit wins either way.
    let router = SwitchTop1Config {
        jitter: Some(0.0),
        ..SwitchTop1Config::hf_switch(4)
    }
    .build(eye())
    .expect("router");
    let layer = MoeLayer::new(Box::new(router), bank(710)).expect("layer");
    let x = ndarray::array![[0.0f32, 1e-8, 0.0, 0.0], [0.0, 0.0, 1e-8, 0.0]];
    let got = check_on(b, layer, &RouterInput::new(x.view()), b.switch_path).expect("ran");
    assert_eq!(ranked_experts(&got.routing), vec![vec![1], vec![2]]);
    // Switch capacity 1 by probability: both p_max are 1.0 in f32 (every other logit 20 and 30 below); the exact
    // p_max = 1 / (1 + 3 e^-30) of token 1 is the larger, so token 0 is dropped.
    let router = SwitchTop1Config {
        jitter: Some(0.0),
        drop: Some(moe_core::DropPolicy::Probability),
        ..SwitchTop1Config::hf_switch(1)
    }
    .build(eye())
    .expect("router");
    let layer = MoeLayer::new(Box::new(router), bank(711)).expect("layer");
    let x = ndarray::array![[20.0f32, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]];
    let got = check_on(b, layer, &RouterInput::new(x.view()), b.switch_path).expect("ran");
    assert_eq!(ranked_experts(&got.routing), vec![vec![], vec![0]]);
    assert_eq!(got.routing.dropped().len(), 1);
    assert_eq!(got.routing.dropped()[0].token, 0);
}
