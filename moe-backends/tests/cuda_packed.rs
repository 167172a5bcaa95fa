//! The CUDA backend on packed low-precision expert weights (issue 18): int8 (row scales), FP8 E4M3 (block scales,
//! DeepSeek-V3's 128 × 128 and odd shapes with partial blocks) and MXFP4 (E8M0 per 32), SwiGLU, GPT-OSS
//! (interleaved gate / up rows, biases, clamp) and MLP banks, routed and shared.
//!
//! - Decode: [`CudaBackend::decode_packed`] (the products' own decode) equals moe-core's
//!   `PackedMatrix::dequantize` bit for bit, on every code of each format, FP8 subnormals, int8 −128, and E8M0
//!   codes 0 (the f32 subnormal 2^-127) and 254.
//! - Forward: a layer whose bank is `ExpertBank::Packed` (or an f32 layer uploaded with `dtype` int8 / fp8 /
//!   mxfp4, quantised at upload) against the CPU backend on the same layer with the bank replaced by
//!   `PackedBank::dequantize()`: the decoded weights are the same bits, only the f32 sums run in another order, so
//!   the output is held to the f32 tolerance, `max |cuda − cpu| ≤ 1e-5 · max(max |cpu|, 1)`, and the routing
//!   (f32 router) to `device_parity::compare_routing` (same experts, ranks, drops; weights to 1e-5).
//!
//! Without a GPU every test prints why and returns, unless `MOE_REQUIRE_GPU=cuda` is set: then a missing GPU
//! fails the test (scripts/cuda-device.sh sets it on the GPU machine).
#![cfg(feature = "cuda")]

mod device_parity;

use std::sync::{Arc, OnceLock};

use moe_backends::cpu::CpuBackend;
use moe_backends::cuda::{CudaBackend, Dtype};
use moe_core::quant::Scales;
use moe_core::rng::SeqRng;
use moe_core::{
    Activation, Backend, ExpertBank, GptOssBank, LayerOutput, MoeError, MoeLayer, PackedBank,
    PackedFamily, PackedMatrix, RouterInput, RouterPath, SharedExperts,
};
use moe_routers::TopKPreset;
use ndarray::Array2;

use device_parity::{compare, matrix, mlp, rng, swiglu, tensor3, topk_router, vector};

/// The shared backend (f32 weights), or `None` (after printing why) when this machine has no GPU.
fn backend() -> Option<CudaBackend> {
    static B: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    moe_core::testing::backend_or_skip(
        "cuda",
        B.get_or_init(|| CudaBackend::new().map_err(|e| e.to_string())),
    )
}

const PACKED: [Dtype; 3] = [Dtype::Int8, Dtype::Fp8, Dtype::Mxfp4];

/// Routed bank family of a case.
#[derive(Debug, Clone, Copy)]
enum Family {
    SwiGlu,
    GptOss,
    Mlp,
}

/// Layer dimensions `(E, d, f, k, T)`.
type Shape = (usize, usize, usize, usize, usize);

/// A seeded layer (the same seed gives the same router, banks and input) with its routed and shared banks passed
/// through `map`.
fn layer_of(
    seed: u64,
    family: Family,
    (e, d, f, k, t): Shape,
    map: &dyn Fn(&ExpertBank) -> ExpertBank,
) -> (MoeLayer, Array2<f32>) {
    let mut r = rng(seed);
    let router = topk_router(&mut r, e, d, k, TopKPreset::Qwen2Moe.config());
    let bank = match family {
        Family::SwiGlu => swiglu(&mut r, e, d, f, Activation::Silu),
        Family::Mlp => mlp(&mut r, e, d, f, Activation::Gelu, true),
        Family::GptOss => ExpertBank::GptOss(
            GptOssBank::new(
                tensor3(&mut r, e, d, 2 * f, 0.3),
                matrix(&mut r, e, 2 * f, 0.3),
                tensor3(&mut r, e, f, d, 0.1),
                matrix(&mut r, e, d, 0.3),
                1.702,
                7.0,
            )
            .expect("bank"),
        ),
    };
    let shared = swiglu(&mut r, 1, d, 64, Activation::Silu);
    let gate = vector(&mut r, d, 0.3);
    let layer = MoeLayer::new(router, map(&bank))
        .and_then(|l| l.with_shared(SharedExperts::new(map(&shared), Some(gate))?))
        .expect("layer");
    (layer, matrix(&mut r, t, d, 1.0))
}

fn cpu_forward(layer: MoeLayer, x: &Array2<f32>) -> LayerOutput {
    CpuBackend::new()
        .upload(Arc::new(layer))
        .expect("cpu upload")
        .forward(&RouterInput::new(x.view()))
        .expect("cpu forward")
}

fn cuda_forward(b: &CudaBackend, layer: MoeLayer, x: &Array2<f32>) -> LayerOutput {
    let got = b
        .upload(Arc::new(layer))
        .unwrap_or_else(|e| panic!("cuda upload: {e}"))
        .forward(&RouterInput::new(x.view()))
        .unwrap_or_else(|e| panic!("cuda forward: {e}"));
    assert_eq!(got.router_path, RouterPath::Native);
    got
}

fn packed(bank: &ExpertBank, format: Dtype) -> ExpertBank {
    ExpertBank::Packed(PackedBank::quantize(bank, format).expect("quantise"))
}

fn dequantized(bank: &ExpertBank) -> ExpertBank {
    match bank {
        ExpertBank::Packed(p) => p.dequantize().expect("dequantise"),
        other => other.clone(),
    }
}

/// One forward case: the layer the GPU runs, its input and the CPU's output on the decoded weights.
struct Case {
    what: String,
    layer: MoeLayer,
    x: Array2<f32>,
    want: LayerOutput,
    /// The backend's dtype (f32 for a packed layer, the format for an f32 layer quantised at upload).
    dtype: Dtype,
}

/// Runs each case on the GPU (after the CPU references are made, so a machine without a GPU still checks
/// everything but the device) and compares.
fn run_cases(cases: Vec<Case>) {
    let Some(b) = backend() else { return };
    for c in cases {
        eprintln!("{}", c.what);
        let dev = if c.dtype == Dtype::F32 {
            b.clone()
        } else {
            CudaBackend::with_dtype(c.dtype).expect("the GPU opened once already")
        };
        compare(&c.want, &cuda_forward(&dev, c.layer, &c.x));
    }
}

/// Every packed format and family, routed and shared banks packed, T = 1 and 5 (decode) and 300 (several 64-row
/// tiles per expert): packed on the GPU against the CPU on the decoded weights; and the f32 layer uploaded with
/// the format as `dtype` (quantised at upload) gives the same.
#[test]
fn packed_banks_match_the_cpu_on_their_decoded_weights() {
    let mut cases = Vec::new();
    for (fi, family) in [Family::SwiGlu, Family::GptOss, Family::Mlp]
        .into_iter()
        .enumerate()
    {
        for format in PACKED {
            // MXFP4 rows are multiples of 32; the others cross the 16-wide k steps with a tail.
            let (d, f) = if format == Dtype::Mxfp4 {
                (64, 96)
            } else {
                (70, 100)
            };
            for t in [1, 5, 300] {
                let seed = 4000 + 10 * fi as u64 + t as u64;
                let shape = (6, d, f, 2, t);
                let (decoded, x) =
                    layer_of(seed, family, shape, &|bk| dequantized(&packed(bk, format)));
                let want = cpu_forward(decoded, &x);
                let (packed_layer, _) = layer_of(seed, family, shape, &|bk| packed(bk, format));
                let (layer, _) = layer_of(seed, family, shape, &|bk| bk.clone());
                for (how, layer, dtype) in [
                    ("packed", packed_layer, Dtype::F32),
                    ("at upload", layer, format),
                ] {
                    cases.push(Case {
                        what: format!("{family:?} {format} T={t} {how}"),
                        layer,
                        x: x.clone(),
                        want: want.clone(),
                        dtype,
                    });
                }
            }
        }
    }
    run_cases(cases);
}

/// Random codes of `format` (no NaN codes), `[e, rows, cols]`, with scales that keep weights near ±0.3.
fn raw_matrix(
    r: &mut SeqRng,
    format: Dtype,
    [e, rows, cols]: [usize; 3],
    block: [usize; 2],
) -> PackedMatrix {
    let n = e * rows * format.row_bytes(cols);
    let mut byte = || r.below(256) as u8;
    let data: Vec<u8> = (0..n)
        .map(|_| {
            let b = byte();
            if format == Dtype::Fp8 && b & 0x7F == 0x7F {
                b & 0xF0
            } else {
                b
            }
        })
        .collect();
    let scales = match format {
        Dtype::Int8 => Scales::Rows(
            (0..e * rows)
                .map(|i| 0.3 / 127.0 * (1.0 + (i % 5) as f32 * 0.1))
                .collect(),
        ),
        Dtype::Fp8 => {
            let g = e * rows.div_ceil(block[0]) * cols.div_ceil(block[1]);
            Scales::Blocks {
                block_rows: block[0],
                block_cols: block[1],
                values: (0..g)
                    .map(|i| 0.3 / 448.0 * (1.0 + (i % 7) as f32 * 0.1))
                    .collect(),
            }
        }
        _ => Scales::E8m0(
            (0..e * rows * cols / 32)
                .map(|i| 121 + (i % 4) as u8)
                .collect(),
        ),
    };
    PackedMatrix::from_parts("w", "w scales", format, [e, rows, cols], data, scales)
        .expect("matrix")
}

/// Checkpoint-like packed banks built from raw codes: FP8 blocks of odd shapes (partial blocks at both edges,
/// and DeepSeek-V3's 128 × 128 over a matrix smaller than one block), int8 −128, every MXFP4 nibble; SwiGLU and
/// GPT-OSS (interleaved rows) families; forward against the CPU on the decoded weights.
#[test]
fn raw_packed_banks_of_any_block_shape() {
    let (e, d, f, k, t) = (5, 96, 64, 2, 133);
    let mut cases = Vec::new();
    for (i, (format, block)) in [
        (Dtype::Fp8, [24, 40]),
        (Dtype::Fp8, [7, 13]),
        (Dtype::Fp8, [128, 128]),
        (Dtype::Int8, [1, 1]),
        (Dtype::Mxfp4, [1, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        for gpt_oss in [false, true] {
            let mut r = rng(5000 + i as u64);
            let up = raw_matrix(&mut r, format, [e, 2 * f, d], block);
            let down = raw_matrix(&mut r, format, [e, d, f], block);
            let (family, ub, db) = if gpt_oss {
                (
                    PackedFamily::GptOss {
                        alpha: 1.702,
                        limit: 7.0,
                    },
                    Some(matrix(&mut r, e, 2 * f, 0.3)),
                    Some(matrix(&mut r, e, d, 0.3)),
                )
            } else {
                (
                    PackedFamily::SwiGlu {
                        act: Activation::Silu,
                    },
                    None,
                    None,
                )
            };
            let pb = PackedBank::new(family, up, ub, down, db).expect("bank");
            let router = || {
                let mut r = rng(6000);
                topk_router(&mut r, e, d, k, TopKPreset::Mixtral.config())
            };
            let x = matrix(&mut r, t, d, 1.0);
            let decoded = pb.dequantize().expect("dequantise");
            let want = cpu_forward(MoeLayer::new(router(), decoded).expect("layer"), &x);
            cases.push(Case {
                what: format!("{format} blocks {block:?} gpt_oss {gpt_oss}"),
                layer: MoeLayer::new(router(), ExpertBank::Packed(pb)).expect("layer"),
                x,
                want,
                dtype: Dtype::F32,
            });
        }
    }
    run_cases(cases);
}

/// The device decode is moe-core's bit for bit: every int8 and FP8 code, every E2M1 nibble under every E8M0
/// code from 0 to 254, FP8 blocks of odd shapes.
#[test]
fn device_decode_is_bit_exact() {
    // int8 and fp8: all 256 codes in each row (fp8 NaN codes replaced by zero), two experts.
    let codes: Vec<u8> = (0..2 * 3).flat_map(|_| 0..=255u8).collect();
    let int8 = PackedMatrix::from_parts(
        "int8",
        "int8 scales",
        Dtype::Int8,
        [2, 3, 256],
        codes.clone(),
        Scales::Rows(vec![0.1, 1.0, 3.0e-3, 7.5, 1.0e-30, 2.0]),
    )
    .expect("int8");
    let fp8_codes = codes
        .iter()
        .map(|&c| if c & 0x7F == 0x7F { 0 } else { c })
        .collect();
    let fp8 = PackedMatrix::from_parts(
        "fp8",
        "fp8 scales",
        Dtype::Fp8,
        [2, 3, 256],
        fp8_codes,
        Scales::Blocks {
            block_rows: 2,
            block_cols: 100,
            values: vec![
                0.5, 1.0e-3, 3.3, 1.0, 1.0e-38, 2.0e5, 0.7, 1.5, 9.0, 1.0e-7, 4.0, 0.25,
            ],
        },
    )
    .expect("fp8");
    // mxfp4: 255 rows, row r has E8M0 code r in its one block and every nibble pair in its 16 bytes (code 254
    // only magnitudes below 2: 2^127 times 2 would be infinite, which `from_parts` refuses).
    let rows = 255;
    let data: Vec<u8> = (0..rows)
        .flat_map(|r| {
            (0..16u8).map(move |i| {
                let b = i.wrapping_mul(17).wrapping_add(r as u8);
                if r == 254 { b & 0xBB } else { b }
            })
        })
        .collect();
    let mx = PackedMatrix::from_parts(
        "mxfp4",
        "mxfp4 scales",
        Dtype::Mxfp4,
        [1, rows, 32],
        data,
        Scales::E8m0((0..rows as u8).collect()),
    )
    .expect("mxfp4");
    let mut r = rng(7000);
    let odd = raw_matrix(&mut r, Dtype::Fp8, [3, 50, 77], [9, 31]);
    let dense = PackedMatrix::quantize("w", tensor3(&mut r, 1, 2, 4, 1.0).view(), Dtype::Bf16)
        .expect("bf16");
    let Some(b) = backend() else { return };
    for m in [&int8, &fp8, &mx, &odd] {
        let got = b.decode_packed(m).expect("device decode");
        let want = m.dequantize();
        assert_eq!(got.dim(), want.dim());
        for ((i, w), g) in want.indexed_iter().zip(got.iter()) {
            assert_eq!(
                w.to_bits(),
                g.to_bits(),
                "{} at {i:?}: cpu {w:e}, cuda {g:e}",
                m.format()
            );
        }
    }
    assert!(matches!(
        b.decode_packed(&dense),
        Err(MoeError::Unsupported { .. })
    ));
}

/// Quantising at upload refuses what the format cannot hold with a typed error naming the tensor, not a panic:
/// MXFP4 of a width that is not a multiple of 32.
#[test]
fn mxfp4_upload_of_unaligned_widths_names_the_tensor() {
    let (layer, _) = layer_of(8000, Family::SwiGlu, (4, 70, 64, 2, 3), &|bk| bk.clone());
    if backend().is_none() {
        return;
    }
    let qb = CudaBackend::with_dtype(Dtype::Mxfp4).expect("the GPU opened once already");
    assert_eq!(qb.dtype(), Dtype::Mxfp4);
    match qb.upload(Arc::new(layer)) {
        Err(MoeError::BadTensor { tensor, reason }) => {
            assert!(tensor.contains("gate_up"), "{tensor}: {reason}");
            assert!(reason.contains("32"), "{reason}");
        }
        other => panic!(
            "expected a BadTensor error, got {:?}",
            other.map(|_| "a layer")
        ),
    }
}
