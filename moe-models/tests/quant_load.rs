//! Quantised and 16-bit checkpoints load packed: GPT-OSS MXFP4 blocks, DeepSeek-V3 FP8 block linears (routed and
//! shared, block rows dividing `f` or not) and BF16 Mixtral experts (fused and per-expert) become
//! `ExpertBank::Packed` banks whose decoded weights equal the values computed here from the codes and scales with
//! the formats' own formulas (not with the crate's decoder), bit for bit; the f32-widened load holds the same
//! weights; the router stays f32, so the routing is bit-identical; every malformed tensor is an error naming it.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::path::Path;

use moe_core::quant::{PackedBank, PackedFamily};
use moe_core::{ExpertBank, RouterInput, WeightFormat};
use moe_models::{ExpertWeights, LoadError, load_layer, load_layer_with};
use ndarray::{Array2, Array3};
use safetensors::tensor::{Dtype, TensorView};

/// The system allocator, recording the largest allocation of the threads that ask it to.
struct Tracking;

thread_local! {
    /// The largest allocation of this thread while tracking; `None` when not tracking.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

// SAFETY: every call is forwarded to `System`; the tracker is a thread-local `Cell` with a const initialiser,
// which does not allocate.
#[allow(
    unsafe_code,
    reason = "a global allocator is an unsafe trait; this one forwards every call to System"
)]
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().map(|n| n.max(layout.size()))));
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static TRACKING: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(Some(0)));
    let out = f();
    let largest = LARGEST.with(|c| c.take()).unwrap_or(0);
    (out, largest)
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// A fresh directory for one test, removed when dropped.
fn dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-quant-{test}-"))
        .tempdir()
        .expect("create the test directory")
}

/// Writes `config.json` and `model.safetensors` into `dir`.
fn write_checkpoint(dir: &Path, config: &str, tensors: &[Raw]) {
    std::fs::write(dir.join("config.json"), config).expect("write config.json");
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, bytes)| {
            (
                n.clone(),
                TensorView::new(*dt, shape.clone(), bytes).expect("tensor view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("write model.safetensors");
}

/// xorshift64*: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// An FP8 E4M3 code that is not NaN.
    fn fp8(&mut self) -> u8 {
        loop {
            let b = self.byte();
            if b & 0x7F != 0x7F {
                return b;
            }
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

/// bf16 bits widened by hand: the upper half of an f32.
fn bf16_value(lo: u8, hi: u8) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([lo, hi])) << 16)
}

/// OCP MX E2M1 (the issue's table).
const E2M1: [f64; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// E8M0: `2^(s − 127)`.
fn e8m0(s: u8) -> f64 {
    2f64.powi(i32::from(s) - 127)
}

/// FP8 E4M3 (OCP; bias 7, no infinities): subnormal `m/8 · 2^-6`, normal `(1 + m/8) · 2^(e−7)`.
fn e4m3(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = i32::from((b >> 3) & 0xF);
    let m = f64::from(b & 7);
    sign * if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

fn packed(bank: &ExpertBank) -> &PackedBank {
    match bank {
        ExpertBank::Packed(p) => p,
        other => panic!("expected a packed bank, found {}", other.kind()),
    }
}

/// Bitwise equality of two f32 arrays, with the first difference in the message.
fn assert_bits(found: &Array3<f32>, want: &Array3<f32>, what: &str) {
    assert_eq!(found.dim(), want.dim(), "{what}: shape");
    for (i, (a, b)) in found.iter().zip(want.iter()).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: value {i}: {a} vs {b}");
    }
}

/// The routing of two layers on the same tokens is bit-identical.
fn assert_same_routing(a: &moe_core::MoeLayer, b: &moe_core::MoeLayer, seed: u64) {
    let d = a.d_model();
    let mut rng = Rng(seed);
    let x = Array2::from_shape_fn((9, d), |_| rng.unit());
    let ra = a.route(&RouterInput::new(x.view())).expect("route a");
    let rb = b.route(&RouterInput::new(x.view())).expect("route b");
    assert_eq!(ra, rb, "routing differs");
}

// ---------------------------------------------------------------------------------------------------- GPT-OSS

const GO_E: usize = 3;
const GO_D: usize = 64;
const GO_F: usize = 32;
const GO_PREFIX: &str = "model.layers.0.mlp.";

fn gpt_oss_config(quant: &str) -> String {
    format!(
        r#"{{"model_type": "gpt_oss", "num_local_experts": {GO_E}, "num_experts_per_tok": 2,
            "swiglu_limit": 7.0, "quantization_config": {quant}}}"#
    )
}

/// A GPT-OSS MXFP4 layer's tensors: router (f32), blocks and scales (U8), biases (BF16).
fn gpt_oss_tensors(seed: u64) -> Vec<Raw> {
    let mut rng = Rng(seed);
    let n = |s: &str| format!("{GO_PREFIX}{s}");
    let mut bytes = |len: usize| (0..len).map(|_| rng.byte()).collect::<Vec<u8>>();
    let gu_blocks = bytes(GO_E * 2 * GO_F * GO_D / 2);
    let dn_blocks = bytes(GO_E * GO_D * GO_F / 2);
    let mut rng = Rng(seed ^ 0xABCD);
    // Exponents 118..=136 (2^-9 .. 2^9), all valid.
    let mut scales = |len: usize| {
        (0..len)
            .map(|_| 118 + (rng.byte() % 19))
            .collect::<Vec<u8>>()
    };
    let gu_scales = scales(GO_E * 2 * GO_F * GO_D / 32);
    let dn_scales = scales(GO_E * GO_D * GO_F / 32);
    let mut rng = Rng(seed ^ 0x1234);
    let mut vals = |len: usize| (0..len).map(|_| rng.unit()).collect::<Vec<f32>>();
    vec![
        (
            n("router.weight"),
            Dtype::F32,
            vec![GO_E, GO_D],
            f32_bytes(&vals(GO_E * GO_D)),
        ),
        (
            n("router.bias"),
            Dtype::F32,
            vec![GO_E],
            f32_bytes(&vals(GO_E)),
        ),
        (
            n("experts.gate_up_proj_blocks"),
            Dtype::U8,
            vec![GO_E, 2 * GO_F, GO_D / 32, 16],
            gu_blocks,
        ),
        (
            n("experts.gate_up_proj_scales"),
            Dtype::U8,
            vec![GO_E, 2 * GO_F, GO_D / 32],
            gu_scales,
        ),
        (
            n("experts.gate_up_proj_bias"),
            Dtype::BF16,
            vec![GO_E, 2 * GO_F],
            bf16_bytes(&vals(GO_E * 2 * GO_F)),
        ),
        (
            n("experts.down_proj_blocks"),
            Dtype::U8,
            vec![GO_E, GO_D, GO_F / 32, 16],
            dn_blocks,
        ),
        (
            n("experts.down_proj_scales"),
            Dtype::U8,
            vec![GO_E, GO_D, GO_F / 32],
            dn_scales,
        ),
        (
            n("experts.down_proj_bias"),
            Dtype::BF16,
            vec![GO_E, GO_D],
            bf16_bytes(&vals(GO_E * GO_D)),
        ),
    ]
}

fn find<'t>(tensors: &'t [Raw], suffix: &str) -> &'t Raw {
    tensors
        .iter()
        .find(|t| t.0.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor {suffix}"))
}

fn find_mut<'t>(tensors: &'t mut [Raw], suffix: &str) -> &'t mut Raw {
    tensors
        .iter_mut()
        .find(|t| t.0.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor {suffix}"))
}

/// `[E, rows, cols]` from MXFP4 blocks `[E, rows, cols/32, 16]` and scales `[E, rows, cols/32]`, by the
/// issue's formula: element `2i` in the low nibble of byte `i`, value `LUT[nibble] · 2^(scale − 127)`.
fn mxfp4_expected(blocks: &[u8], scales: &[u8], e: usize, rows: usize, cols: usize) -> Array3<f32> {
    Array3::from_shape_fn((e, rows, cols), |(x, r, c)| {
        let row = x * rows + r;
        let byte = blocks[row * cols / 2 + c / 2];
        let nib = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
        (E2M1[nib as usize] * e8m0(scales[row * cols / 32 + c / 32])) as f32
    })
}

#[test]
fn gpt_oss_mxfp4_loads_packed_and_decodes_to_the_formula() {
    let tmp = dir("gpt-oss");
    let d = tmp.path();
    let tensors = gpt_oss_tensors(7);
    write_checkpoint(d, &gpt_oss_config(r#"{"quant_method": "mxfp4"}"#), &tensors);
    let (layer, largest) = largest_allocation(|| {
        load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load")
    });
    // No f32 (or bf16) copy of a weight tensor: every allocation is smaller than the bf16 gate_up would be.
    assert!(
        largest < 2 * GO_E * 2 * GO_F * GO_D,
        "an allocation of {largest} bytes while loading packed"
    );
    let bank = packed(layer.experts());
    assert_eq!(bank.format(), WeightFormat::Mxfp4);
    assert!(
        matches!(bank.family(), PackedFamily::GptOss { limit, .. } if limit == 7.0),
        "{:?}",
        bank.family()
    );
    let up_want = mxfp4_expected(
        &find(&tensors, "gate_up_proj_blocks").3,
        &find(&tensors, "gate_up_proj_scales").3,
        GO_E,
        2 * GO_F,
        GO_D,
    );
    let down_want = mxfp4_expected(
        &find(&tensors, "down_proj_blocks").3,
        &find(&tensors, "down_proj_scales").3,
        GO_E,
        GO_D,
        GO_F,
    );
    assert_bits(&bank.up().dequantize(), &up_want, "gate_up");
    assert_bits(&bank.down().dequantize(), &down_want, "down");
    // Packed bytes per expert: 4-bit codes plus one scale byte per 32, and f32 biases.
    let per = (2 * GO_F * GO_D + GO_D * GO_F) / 2 + (2 * GO_F * GO_D + GO_D * GO_F) / 32;
    assert_eq!(bank.bytes_per_expert(), per + 4 * (2 * GO_F + GO_D));
    let bias = &find(&tensors, "gate_up_proj_bias").3;
    let want_bias = Array2::from_shape_fn((GO_E, 2 * GO_F), |(e, j)| {
        let i = 2 * (e * 2 * GO_F + j);
        bf16_value(bias[i], bias[i + 1])
    });
    assert_eq!(bank.up_bias(), Some(&want_bias));

    // The f32 load holds the same weights in GPT-OSS's `[E, d, 2f]` layout, and the same router.
    let wide = load_layer_with(d, 0, ExpertWeights::F32).expect("f32 load");
    let ExpertBank::GptOss(g) = wide.experts() else {
        panic!("expected a GPT-OSS bank, found {}", wide.experts().kind());
    };
    let t = up_want
        .permuted_axes([0, 2, 1])
        .as_standard_layout()
        .into_owned();
    assert_bits(g.gate_up(), &t, "f32 gate_up");
    assert_same_routing(&layer, &wide, 3);
    // The plain loader widens, as before.
    let plain = load_layer(d, 0).expect("plain load");
    assert_eq!(plain.experts().kind(), wide.experts().kind());
}

/// Loads `tensors` under `config` and returns the error.
fn load_err(test: &str, config: &str, tensors: &[Raw]) -> LoadError {
    let tmp = dir(test);
    let d = tmp.path();
    write_checkpoint(d, config, tensors);
    load_layer_with(d, 0, ExpertWeights::Checkpoint).expect_err(test)
}

/// The tensor an error names (`Shape`, `Dtype`, `MissingTensor`, `BadTensor`).
fn named(e: &LoadError) -> String {
    match e {
        LoadError::Shape { tensor, .. }
        | LoadError::Dtype { tensor, .. }
        | LoadError::MissingTensor { tensor, .. }
        | LoadError::BadTensor { tensor, .. } => tensor.clone(),
        other => panic!("an error that names no tensor: {other}"),
    }
}

#[test]
fn bad_mxfp4_tensors_are_named() {
    let cfg = gpt_oss_config(r#"{"quant_method": "mxfp4"}"#);
    // Scales of the wrong shape.
    let mut t = gpt_oss_tensors(1);
    let s = find_mut(&mut t, "gate_up_proj_scales");
    s.2 = vec![GO_E, GO_F, 2 * GO_D / 32];
    let e = load_err("mx-scale-shape", &cfg, &t);
    assert!(matches!(e, LoadError::Shape { .. }), "{e}");
    assert!(named(&e).ends_with("experts.gate_up_proj_scales"), "{e}");
    // E8M0 255 is NaN.
    let mut t = gpt_oss_tensors(1);
    find_mut(&mut t, "down_proj_scales").3[5] = 255;
    let e = load_err("mx-scale-nan", &cfg, &t);
    assert!(matches!(e, LoadError::BadTensor { .. }), "{e}");
    assert!(named(&e).ends_with("experts.down_proj_scales"), "{e}");
    // Blocks that are not U8.
    let mut t = gpt_oss_tensors(1);
    find_mut(&mut t, "gate_up_proj_blocks").1 = Dtype::I8;
    let e = load_err("mx-blocks-dtype", &cfg, &t);
    assert!(matches!(e, LoadError::Dtype { .. }), "{e}");
    assert!(named(&e).ends_with("experts.gate_up_proj_blocks"), "{e}");
    // Blocks of the wrong byte length per block.
    let mut t = gpt_oss_tensors(1);
    find_mut(&mut t, "down_proj_blocks").2 = vec![GO_E, GO_D, GO_F / 16, 8];
    let e = load_err("mx-blocks-len", &cfg, &t);
    assert!(named(&e).ends_with("experts.down_proj_blocks"), "{e}");
    // Missing scales.
    let mut t = gpt_oss_tensors(1);
    t.retain(|x| !x.0.ends_with("down_proj_scales"));
    let e = load_err("mx-no-scales", &cfg, &t);
    assert!(matches!(e, LoadError::MissingTensor { .. }), "{e}");
    assert!(named(&e).ends_with("experts.down_proj_scales"), "{e}");
    // An unknown quant_method and a method the family cannot carry: config errors naming the key.
    let t = gpt_oss_tensors(1);
    let e = load_err(
        "mx-method",
        &gpt_oss_config(r#"{"quant_method": "awq"}"#),
        &t,
    );
    assert!(
        matches!(&e, LoadError::Config { field, .. } if field == "quantization_config.quant_method"),
        "{e}"
    );
    let e = load_err(
        "mx-fp8-on-gpt-oss",
        &gpt_oss_config(r#"{"quant_method": "fp8"}"#),
        &t,
    );
    assert!(
        matches!(&e, LoadError::Config { field, .. } if field == "quantization_config.quant_method"),
        "{e}"
    );
}

// ------------------------------------------------------------------------------------------------ DeepSeek-V3

const DS_E: usize = 4;
const DS_PREFIX: &str = "model.layers.0.mlp.";

/// A DeepSeek-V3 FP8 layer: `E = 4`, width `d`, expert width `f`, shared width `fs`, block `[br, bc]`.
struct Ds {
    d: usize,
    f: usize,
    fs: usize,
    block: [usize; 2],
}

impl Ds {
    fn config(&self) -> String {
        format!(
            r#"{{"model_type": "deepseek_v3", "n_routed_experts": {DS_E}, "num_experts_per_tok": 2,
                "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
                "quantization_config": {{"quant_method": "fp8", "fmt": "e4m3",
                    "weight_block_size": [{}, {}], "activation_scheme": "dynamic"}}}}"#,
            self.block[0], self.block[1]
        )
    }

    /// One FP8 linear `[rows, cols]` and its `weight_scale_inv`.
    fn linear(&self, rng: &mut Rng, name: &str, rows: usize, cols: usize) -> [Raw; 2] {
        let q: Vec<u8> = (0..rows * cols).map(|_| rng.fp8()).collect();
        let g = [rows.div_ceil(self.block[0]), cols.div_ceil(self.block[1])];
        let s: Vec<f32> = (0..g[0] * g[1])
            .map(|_| 2f32.powi((rng.byte() % 9) as i32 - 8) * (1.0 + rng.unit().abs()))
            .collect();
        [
            (
                format!("{name}.weight"),
                Dtype::F8_E4M3,
                vec![rows, cols],
                q,
            ),
            (
                format!("{name}.weight_scale_inv"),
                Dtype::F32,
                g.to_vec(),
                f32_bytes(&s),
            ),
        ]
    }

    fn tensors(&self, seed: u64) -> Vec<Raw> {
        let mut rng = Rng(seed);
        let (d, f, fs) = (self.d, self.f, self.fs);
        let n = |s: &str| format!("{DS_PREFIX}{s}");
        let gate: Vec<f32> = (0..DS_E * d).map(|_| rng.unit()).collect();
        let bias: Vec<f32> = (0..DS_E).map(|_| rng.unit() * 0.1).collect();
        let mut t = vec![
            (
                n("gate.weight"),
                Dtype::BF16,
                vec![DS_E, d],
                bf16_bytes(&gate),
            ),
            (
                n("gate.e_score_correction_bias"),
                Dtype::F32,
                vec![DS_E],
                f32_bytes(&bias),
            ),
        ];
        for e in 0..DS_E {
            for (p, r, c) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)] {
                t.extend(self.linear(&mut rng, &n(&format!("experts.{e}.{p}")), r, c));
            }
        }
        for (p, r, c) in [
            ("gate_proj", fs, d),
            ("up_proj", fs, d),
            ("down_proj", d, fs),
        ] {
            t.extend(self.linear(&mut rng, &n(&format!("shared_experts.{p}")), r, c));
        }
        t
    }

    /// `W[i, j] = q[i, j] · s[i / br, j / bc]` of linear `name`.
    fn decode(&self, tensors: &[Raw], name: &str) -> Array2<f32> {
        let w = find(tensors, &format!("{name}.weight"));
        let s = find(tensors, &format!("{name}.weight_scale_inv"));
        let (rows, cols) = (w.2[0], w.2[1]);
        let gc = s.2[1];
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let k = 4 * ((i / self.block[0]) * gc + j / self.block[1]);
            let scale = f32::from_le_bytes([s.3[k], s.3[k + 1], s.3[k + 2], s.3[k + 3]]);
            (e4m3(w.3[i * cols + j]) * f64::from(scale)) as f32
        })
    }

    /// The expected `[E, 2f, d]` (gate rows, then up rows) and `[E, d, f]` of experts `names(e)`.
    fn expected(
        &self,
        tensors: &[Raw],
        n: usize,
        names: impl Fn(usize, &str) -> String,
    ) -> (Array3<f32>, Array3<f32>) {
        let g: Vec<_> = (0..n)
            .map(|e| self.decode(tensors, &names(e, "gate_proj")))
            .collect();
        let u: Vec<_> = (0..n)
            .map(|e| self.decode(tensors, &names(e, "up_proj")))
            .collect();
        let dn: Vec<_> = (0..n)
            .map(|e| self.decode(tensors, &names(e, "down_proj")))
            .collect();
        let f = g[0].nrows();
        let up = Array3::from_shape_fn((n, 2 * f, self.d), |(e, r, c)| {
            if r < f {
                g[e][[r, c]]
            } else {
                u[e][[r - f, c]]
            }
        });
        let down = Array3::from_shape_fn((n, self.d, f), |(e, r, c)| dn[e][[r, c]]);
        (up, down)
    }
}

fn check_deepseek(test: &str, ds: &Ds) {
    let tmp = dir(test);
    let d = tmp.path();
    let tensors = ds.tensors(11);
    write_checkpoint(d, &ds.config(), &tensors);
    let (layer, largest) = largest_allocation(|| {
        load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load")
    });
    // No f32 copy of the stacked weights: nothing as large as the f32 `[E, 2f, d]`.
    assert!(
        largest < DS_E * 2 * ds.f * ds.d * 4 / 2,
        "an allocation of {largest} bytes while loading packed"
    );
    let bank = packed(layer.experts());
    assert_eq!(bank.format(), WeightFormat::Fp8);
    let (up, down) = ds.expected(&tensors, DS_E, |e, p| format!("{DS_PREFIX}experts.{e}.{p}"));
    assert_bits(&bank.up().dequantize(), &up, "gate_up");
    assert_bits(&bank.down().dequantize(), &down, "down");
    let shared = layer.shared().expect("shared experts");
    let sbank = packed(shared.bank());
    assert_eq!(sbank.format(), WeightFormat::Fp8);
    let (sup, sdown) = ds.expected(&tensors, 1, |_, p| format!("{DS_PREFIX}shared_experts.{p}"));
    assert_bits(&sbank.up().dequantize(), &sup, "shared gate_up");
    assert_bits(&sbank.down().dequantize(), &sdown, "shared down");

    let wide = load_layer_with(d, 0, ExpertWeights::F32).expect("f32 load");
    let ExpertBank::SwiGlu(s) = wide.experts() else {
        panic!("expected a SwiGLU bank, found {}", wide.experts().kind());
    };
    assert_bits(s.gate_up(), &up, "f32 gate_up");
    assert_bits(s.down(), &down, "f32 down");
    assert_same_routing(&layer, &wide, 5);
}

#[test]
fn deepseek_fp8_blocks_dividing_f_load_packed() {
    check_deepseek(
        "ds-divides",
        &Ds {
            d: 64,
            f: 64,
            fs: 32,
            block: [32, 32],
        },
    );
}

#[test]
fn deepseek_fp8_partial_blocks_load_packed() {
    // f = 48 and fs = 40 are not multiples of the 32 block rows; d = 80 ends in a partial block column.
    check_deepseek(
        "ds-partial",
        &Ds {
            d: 80,
            f: 48,
            fs: 40,
            block: [32, 32],
        },
    );
    // DeepSeek's own 128 × 128 blocks, larger than every dimension here.
    check_deepseek(
        "ds-128",
        &Ds {
            d: 64,
            f: 48,
            fs: 48,
            block: [128, 128],
        },
    );
}

#[test]
fn bad_fp8_tensors_are_named() {
    let ds = Ds {
        d: 64,
        f: 48,
        fs: 32,
        block: [32, 32],
    };
    let cfg = ds.config();
    // An FP8 NaN code.
    let mut t = ds.tensors(2);
    find_mut(&mut t, "experts.2.up_proj.weight").3[17] = 0xFF;
    let e = load_err("fp8-nan", &cfg, &t);
    assert!(matches!(e, LoadError::BadTensor { .. }), "{e}");
    assert!(named(&e).ends_with("experts.2.up_proj.weight"), "{e}");
    // Non-finite scales.
    for (bad, test) in [
        (f32::NAN, "fp8-scale-nan"),
        (f32::INFINITY, "fp8-scale-inf"),
    ] {
        let mut t = ds.tensors(2);
        find_mut(&mut t, "experts.1.down_proj.weight_scale_inv").3[..4]
            .copy_from_slice(&bad.to_le_bytes());
        let e = load_err(test, &cfg, &t);
        assert!(matches!(e, LoadError::BadTensor { .. }), "{e}");
        assert!(
            named(&e).ends_with("experts.1.down_proj.weight_scale_inv"),
            "{e}"
        );
    }
    // A scale grid that does not cover the weight (one block row short).
    let mut t = ds.tensors(2);
    let s = find_mut(&mut t, "experts.0.gate_proj.weight_scale_inv");
    s.2 = vec![1, 2];
    s.3.truncate(8);
    let e = load_err("fp8-grid", &cfg, &t);
    assert!(matches!(e, LoadError::Shape { .. }), "{e}");
    assert!(
        named(&e).ends_with("experts.0.gate_proj.weight_scale_inv"),
        "{e}"
    );
    // A missing scale.
    let mut t = ds.tensors(2);
    t.retain(|x| !x.0.ends_with("shared_experts.down_proj.weight_scale_inv"));
    let e = load_err("fp8-no-scale", &cfg, &t);
    assert!(matches!(e, LoadError::MissingTensor { .. }), "{e}");
    assert!(
        named(&e).ends_with("shared_experts.down_proj.weight_scale_inv"),
        "{e}"
    );
    // One expert weight of another dtype.
    let mut t = ds.tensors(2);
    find_mut(&mut t, "experts.3.down_proj.weight").1 = Dtype::U8;
    let e = load_err("fp8-dtype", &cfg, &t);
    assert!(matches!(e, LoadError::Dtype { .. }), "{e}");
    assert!(named(&e).ends_with("experts.3.down_proj.weight"), "{e}");
    // FP8 weights without a quantization_config.
    let plain = cfg.replace(
        r#""quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                    "weight_block_size": [32, 32], "activation_scheme": "dynamic"}"#,
        r#""quantization_config": null"#,
    );
    assert_ne!(plain, cfg);
    let e = load_err("fp8-no-config", &plain, &ds.tensors(2));
    assert!(matches!(&e, LoadError::Config { .. }), "{e}");
    assert!(e.to_string().contains("experts.0.gate_proj.weight"), "{e}");
    // A block size that is not two positive integers, and fmt / activation_scheme not supported.
    for (from, to, key) in [
        ("[32, 32]", "[32, 0]", "weight_block_size"),
        (r#""e4m3""#, r#""e5m2""#, "fmt"),
        (r#""dynamic""#, r#""static""#, "activation_scheme"),
    ] {
        let bad = cfg.replace(from, to);
        let e = load_err(&format!("fp8-cfg-{key}"), &bad, &ds.tensors(2));
        let want = format!("quantization_config.{key}");
        assert!(
            matches!(&e, LoadError::Config { field, .. } if *field == want),
            "{e}"
        );
    }
}

// ------------------------------------------------------------------------------------------------ BF16 Mixtral

const MX_E: usize = 4;
const MX_D: usize = 16;
const MX_F: usize = 12;
const MX_PREFIX: &str = "model.layers.0.block_sparse_moe.";

fn mixtral_tensors(seed: u64, fused: bool) -> Vec<Raw> {
    let mut rng = Rng(seed);
    let mut vals = |len: usize| (0..len).map(|_| rng.unit()).collect::<Vec<f32>>();
    let n = |s: &str| format!("{MX_PREFIX}{s}");
    let mut t = vec![(
        n("gate.weight"),
        Dtype::BF16,
        vec![MX_E, MX_D],
        bf16_bytes(&vals(MX_E * MX_D)),
    )];
    if fused {
        t.push((
            n("experts.gate_up_proj"),
            Dtype::BF16,
            vec![MX_E, 2 * MX_F, MX_D],
            bf16_bytes(&vals(MX_E * 2 * MX_F * MX_D)),
        ));
        t.push((
            n("experts.down_proj"),
            Dtype::BF16,
            vec![MX_E, MX_D, MX_F],
            bf16_bytes(&vals(MX_E * MX_D * MX_F)),
        ));
    } else {
        for e in 0..MX_E {
            for (w, r, c) in [("w1", MX_F, MX_D), ("w3", MX_F, MX_D), ("w2", MX_D, MX_F)] {
                t.push((
                    n(&format!("experts.{e}.{w}.weight")),
                    Dtype::BF16,
                    vec![r, c],
                    bf16_bytes(&vals(r * c)),
                ));
            }
        }
    }
    t
}

/// The bf16 values of `[rows, cols]` tensor `name`, widened by hand.
fn bf16_matrix(tensors: &[Raw], name: &str) -> Vec<f32> {
    find(tensors, name)
        .3
        .chunks_exact(2)
        .map(|b| bf16_value(b[0], b[1]))
        .collect()
}

#[test]
fn bf16_mixtral_stays_16_bit() {
    let cfg = format!(
        r#"{{"model_type": "mixtral", "num_local_experts": {MX_E}, "num_experts_per_tok": 2}}"#
    );
    for fused in [true, false] {
        let tmp = dir(&format!("mixtral-{fused}"));
        let d = tmp.path();
        let tensors = mixtral_tensors(21, fused);
        write_checkpoint(d, &cfg, &tensors);
        let layer = load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load");
        let bank = packed(layer.experts());
        assert_eq!(bank.format(), WeightFormat::Bf16);
        assert!(matches!(bank.family(), PackedFamily::SwiGlu { .. }));
        assert_eq!(bank.bytes_per_expert(), 2 * 3 * MX_F * MX_D);
        let (up, down) = if fused {
            let gu = bf16_matrix(&tensors, "experts.gate_up_proj");
            let dn = bf16_matrix(&tensors, "experts.down_proj");
            (
                Array3::from_shape_vec((MX_E, 2 * MX_F, MX_D), gu).expect("shape"),
                Array3::from_shape_vec((MX_E, MX_D, MX_F), dn).expect("shape"),
            )
        } else {
            let m = |e: usize, w: &str| bf16_matrix(&tensors, &format!("experts.{e}.{w}.weight"));
            let up = Array3::from_shape_fn((MX_E, 2 * MX_F, MX_D), |(e, r, c)| {
                if r < MX_F {
                    m(e, "w1")[r * MX_D + c]
                } else {
                    m(e, "w3")[(r - MX_F) * MX_D + c]
                }
            });
            let down =
                Array3::from_shape_fn((MX_E, MX_D, MX_F), |(e, r, c)| m(e, "w2")[r * MX_F + c]);
            (up, down)
        };
        assert_bits(&bank.up().dequantize(), &up, "gate_up");
        assert_bits(&bank.down().dequantize(), &down, "down");
        // The default load widens to f32, as before, with the same values and routing.
        let wide = load_layer(d, 0).expect("f32 load");
        let ExpertBank::SwiGlu(s) = wide.experts() else {
            panic!("expected a SwiGLU bank, found {}", wide.experts().kind());
        };
        assert_bits(s.gate_up(), &up, "f32 gate_up");
        assert_bits(s.down(), &down, "f32 down");
        assert_same_routing(&layer, &wide, 9);
    }
}

#[test]
fn bf16_gpt_oss_stays_16_bit_transposed() {
    let tmp = dir("gpt-oss-bf16");
    let d = tmp.path();
    let mut rng = Rng(4);
    let mut vals = |len: usize| (0..len).map(|_| rng.unit()).collect::<Vec<f32>>();
    let n = |s: &str| format!("{GO_PREFIX}{s}");
    let (e, dm, f) = (2, 8, 6);
    let tensors: Vec<Raw> = vec![
        (
            n("router.weight"),
            Dtype::BF16,
            vec![e, dm],
            bf16_bytes(&vals(e * dm)),
        ),
        (n("router.bias"), Dtype::BF16, vec![e], bf16_bytes(&vals(e))),
        (
            n("experts.gate_up_proj"),
            Dtype::BF16,
            vec![e, dm, 2 * f],
            bf16_bytes(&vals(e * dm * 2 * f)),
        ),
        (
            n("experts.gate_up_proj_bias"),
            Dtype::BF16,
            vec![e, 2 * f],
            bf16_bytes(&vals(e * 2 * f)),
        ),
        (
            n("experts.down_proj"),
            Dtype::BF16,
            vec![e, f, dm],
            bf16_bytes(&vals(e * f * dm)),
        ),
        (
            n("experts.down_proj_bias"),
            Dtype::BF16,
            vec![e, dm],
            bf16_bytes(&vals(e * dm)),
        ),
    ];
    write_checkpoint(
        d,
        r#"{"model_type": "gpt_oss", "num_local_experts": 2, "num_experts_per_tok": 1}"#,
        &tensors,
    );
    let layer = load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load");
    let bank = packed(layer.experts());
    assert_eq!(bank.format(), WeightFormat::Bf16);
    let gu = bf16_matrix(&tensors, "experts.gate_up_proj");
    let want = Array3::from_shape_fn((e, 2 * f, dm), |(x, r, c)| gu[(x * dm + c) * 2 * f + r]);
    assert_bits(&bank.up().dequantize(), &want, "gate_up transposed");
    let wide = load_layer(d, 0).expect("f32 load");
    let back = bank.dequantize().expect("dequantize");
    let (ExpertBank::GptOss(a), ExpertBank::GptOss(b)) = (wide.experts(), &back) else {
        panic!("expected GPT-OSS banks");
    };
    assert_bits(a.gate_up(), b.gate_up(), "gate_up");
    assert_bits(a.down(), b.down(), "down");
    assert_same_routing(&layer, &wide, 2);
}

#[test]
fn qwen3_fp8_experts_load_packed() {
    // Qwen3-MoE FP8 checkpoints ship the same per-expert linears; the DeepSeek-only tensors are not read.
    let ds = Ds {
        d: 64,
        f: 48,
        fs: 32,
        block: [32, 32],
    };
    let tmp = dir("qwen3-fp8");
    let d = tmp.path();
    let tensors = ds.tensors(13);
    let cfg = format!(
        r#"{{"model_type": "qwen3_moe", "num_experts": {DS_E}, "num_experts_per_tok": 2,
            "quantization_config": {{"quant_method": "fp8", "weight_block_size": [32, 32]}}}}"#
    );
    write_checkpoint(d, &cfg, &tensors);
    let layer = load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load");
    let bank = packed(layer.experts());
    assert_eq!(bank.format(), WeightFormat::Fp8);
    let (up, down) = ds.expected(&tensors, DS_E, |e, p| format!("{DS_PREFIX}experts.{e}.{p}"));
    assert_bits(&bank.up().dequantize(), &up, "gate_up");
    assert_bits(&bank.down().dequantize(), &down, "down");
    assert!(layer.shared().is_none());
    let wide = load_layer(d, 0).expect("f32 load");
    assert_same_routing(&layer, &wide, 8);
}

/// transformers' `FP8Experts` state dict: fused `experts.gate_up_proj` F8_E4M3 `[E, 2f, d]` with
/// `experts.gate_up_proj_scale_inv` `[E, 2f / br, ⌈d / bc⌉]`, and `experts.down_proj` likewise.
fn fused_fp8_tensors(ds: &Ds, seed: u64) -> Vec<Raw> {
    let mut rng = Rng(seed);
    let (d, f) = (ds.d, ds.f);
    let [br, bc] = ds.block;
    let n = |s: &str| format!("{DS_PREFIX}{s}");
    let gate: Vec<f32> = (0..DS_E * d).map(|_| rng.unit()).collect();
    let mut t = vec![
        (
            n("gate.weight"),
            Dtype::F32,
            vec![DS_E, d],
            f32_bytes(&gate),
        ),
        (
            n("gate.e_score_correction_bias"),
            Dtype::F32,
            vec![DS_E],
            f32_bytes(&[0.0; DS_E]),
        ),
    ];
    for (name, rows, cols) in [
        ("experts.gate_up_proj", 2 * f, d),
        ("experts.down_proj", d, f),
    ] {
        let q: Vec<u8> = (0..DS_E * rows * cols).map(|_| rng.fp8()).collect();
        let g = [rows.div_ceil(br), cols.div_ceil(bc)];
        let s: Vec<f32> = (0..DS_E * g[0] * g[1])
            .map(|_| 2f32.powi((rng.byte() % 9) as i32 - 8))
            .collect();
        t.push((n(name), Dtype::F8_E4M3, vec![DS_E, rows, cols], q));
        t.push((
            n(&format!("{name}_scale_inv")),
            Dtype::F32,
            vec![DS_E, g[0], g[1]],
            f32_bytes(&s),
        ));
    }
    t
}

/// `W[e, i, j] = q[e, i, j] · s[e, i / br, j / bc]` of fused tensor `name`.
fn fused_expected(ds: &Ds, tensors: &[Raw], name: &str) -> Array3<f32> {
    let w = find(tensors, name);
    let s = find(tensors, &format!("{name}_scale_inv"));
    let (rows, cols) = (w.2[1], w.2[2]);
    let (gr, gc) = (s.2[1], s.2[2]);
    Array3::from_shape_fn((DS_E, rows, cols), |(e, i, j)| {
        let k = 4 * ((e * gr + i / ds.block[0]) * gc + j / ds.block[1]);
        let scale = f32::from_le_bytes([s.3[k], s.3[k + 1], s.3[k + 2], s.3[k + 3]]);
        (e4m3(w.3[(e * rows + i) * cols + j]) * f64::from(scale)) as f32
    })
}

#[test]
fn fused_fp8_experts_load_packed() {
    let ds = Ds {
        d: 80,
        f: 64,
        fs: 32,
        block: [32, 32],
    };
    let cfg = ds
        .config()
        .replace(r#""n_shared_experts": 1"#, r#""n_shared_experts": 0"#);
    let tmp = dir("fused-fp8");
    let d = tmp.path();
    let tensors = fused_fp8_tensors(&ds, 17);
    write_checkpoint(d, &cfg, &tensors);
    let layer = load_layer_with(d, 0, ExpertWeights::Checkpoint).expect("packed load");
    let bank = packed(layer.experts());
    assert_eq!(bank.format(), WeightFormat::Fp8);
    let up = fused_expected(&ds, &tensors, &format!("{DS_PREFIX}experts.gate_up_proj"));
    let down = fused_expected(&ds, &tensors, &format!("{DS_PREFIX}experts.down_proj"));
    assert_bits(&bank.up().dequantize(), &up, "gate_up");
    assert_bits(&bank.down().dequantize(), &down, "down");
    // With f not a multiple of the block rows, the fused grid is ambiguous: refused, naming the scales.
    let ds = Ds { f: 48, ..ds };
    let e = load_err("fused-fp8-ambiguous", &cfg, &fused_fp8_tensors(&ds, 17));
    assert!(matches!(e, LoadError::BadTensor { .. }), "{e}");
    assert!(named(&e).ends_with("experts.gate_up_proj_scale_inv"), "{e}");
}

#[test]
fn fixture_manifests_carry_a_quantization_config() {
    let routing = serde_json::json!({
        "num_experts": 4, "top_k": 2,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}
    });
    let c = moe_models::MoeConfig::from_manifest_routing(
        "deepseek_v3",
        &routing,
        Path::new("manifest.json"),
        "fp8",
    )
    .expect("routing");
    assert_eq!(
        c.quantization,
        Some(moe_models::QuantizationConfig::Fp8 {
            weight_block_size: [64, 32]
        })
    );
    assert_eq!(c.expert_weights, ExpertWeights::F32);
    let routing = serde_json::json!({
        "num_experts": 4, "top_k": 2,
        "quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}
    });
    let e = moe_models::MoeConfig::from_manifest_routing(
        "deepseek_v3",
        &routing,
        Path::new("manifest.json"),
        "fp8",
    )
    .expect_err("e5m2");
    assert!(
        matches!(&e, LoadError::Config { field, .. }
            if field == "cases[fp8].routing.quantization_config.fmt"),
        "{e}"
    );
}

/// A `quantization_config` is never ignored and packed tensors never load without one: a config declaring a
/// method over plain experts, MXFP4 blocks with no config (or an FP8 one), and a checkpoint holding both MXFP4
/// blocks and plain expert weights are refused, naming the key or the tensors.
#[test]
fn declared_and_stored_formats_must_agree() {
    // GPT-OSS: blocks under no config, and under an FP8 config.
    let no_config = format!(
        r#"{{"model_type": "gpt_oss", "num_local_experts": {GO_E}, "num_experts_per_tok": 2, "swiglu_limit": 7.0}}"#
    );
    let e = load_err("mx-no-config", &no_config, &gpt_oss_tensors(2));
    assert!(matches!(e, LoadError::Config { .. }), "{e}");
    assert!(e.to_string().contains("mxfp4"), "{e}");
    let e = load_err(
        "mx-fp8-config",
        &gpt_oss_config(r#"{"quant_method": "fp8"}"#),
        &gpt_oss_tensors(2),
    );
    assert!(e.to_string().contains("quantization_config"), "{e}");
    // GPT-OSS: blocks and a plain gate_up together.
    let mut t = gpt_oss_tensors(3);
    t.push((
        format!("{GO_PREFIX}experts.gate_up_proj"),
        Dtype::F32,
        vec![GO_E, GO_D, 2 * GO_F],
        f32_bytes(&vec![0.0; GO_E * GO_D * 2 * GO_F]),
    ));
    let e = load_err(
        "mx-and-plain",
        &gpt_oss_config(r#"{"quant_method": "mxfp4"}"#),
        &t,
    );
    assert!(matches!(e, LoadError::BadTensor { .. }), "{e}");
    assert!(e.to_string().contains("both"), "{e}");
    // DeepSeek-V3: the hf fixture's f32 experts under an FP8 config (the manifest's routing is its config).
    let hf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hf");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(hf.join("manifest.json")).expect("hf manifest"),
    )
    .expect("json");
    let case = manifest["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "deepseek_v3"))
        .expect("deepseek_v3 case")
        .clone();
    let tmp = dir("f32-under-fp8");
    let d = tmp.path();
    std::fs::copy(
        hf.join("deepseek_v3.safetensors"),
        d.join("deepseek_v3.safetensors"),
    )
    .expect("copy");
    let mut case = case;
    case["routing"]["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
    if let Some(c) = case.as_object_mut() {
        c.remove("sha256");
        c.remove("bytes");
    }
    let m: moe_models::fixture::ManifestCase = serde_json::from_value(case).expect("case");
    let Err(e) = moe_models::fixture::FixtureCase::load_with(d, &m, ExpertWeights::Checkpoint)
    else {
        panic!("f32 experts under an FP8 config load")
    };
    assert!(matches!(e, LoadError::Config { .. }), "{e}");
    assert!(
        e.to_string().contains("not quantised") && e.to_string().contains("experts.gate_up_proj"),
        "{e}"
    );
}
