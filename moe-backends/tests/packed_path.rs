//! Packed (low-precision) banks on the CPU backend: for every format, family, kernel set and thread count, the
//! output equals, bit for bit, the same layer whose bank holds the decoded weights in f32 (packed layout,
//! format f32): the kernels decode exactly `ExpertMatrix::decode_row`'s values and reduce in the f32 kernels'
//! order. Row counts per expert cross every kernel class (register decode up to 16 rows, a decoded panel with the
//! dot kernel up to 48, transposed `gemm` up to 256, `gemm` above); widths cross SIMD tails and FP8's 128-wide
//! blocks. Also: the f32 packed layout equals the f32 banks (bit for bit where the layout is the same), the
//! routing never changes, shared experts quantise, training is refused.

use std::sync::Arc;

use ndarray::{Array2, Array3};

use moe_backends::cpu::{CpuBackend, CpuKernels};
use moe_core::quant::{PackedBank, PackedFamily, PackedMatrix, Scales, WeightFormat};
use moe_core::testing::random_bank;
use moe_core::{
    Activation, Assignment, Backend, ExpertBank, MoeError, MoeLayer, RouterInput, SharedExperts,
    rng::SeqRng,
};

type Fixed = moe_core::testing::FixedPlan;

/// A plan giving expert `e` exactly `rows[e]` tokens (token `t` goes to the experts whose count it is below).
fn plan(t: usize, rows: &[usize], rng: &mut SeqRng) -> Vec<Assignment> {
    let mut kept = Vec::new();
    for (e, &r) in rows.iter().enumerate() {
        for token in 0..r.min(t) {
            kept.push(Assignment {
                token: token as u32,
                expert: e as u32,
                weight: rng.uniform() as f32 + 0.1,
                rank: 0,
            });
        }
    }
    kept.sort_by_key(|a| (a.token, a.expert));
    let mut last = (u32::MAX, 0u16);
    for a in &mut kept {
        last = if a.token == last.0 {
            (a.token, last.1 + 1)
        } else {
            (a.token, 0)
        };
        a.rank = last.1;
    }
    kept
}

fn layer_with(bank: ExpertBank, kept: &[Assignment]) -> MoeLayer {
    let (e, d) = (bank.n_experts(), bank.d_model());
    MoeLayer::new(
        Box::new(Fixed {
            n_experts: e,
            d_model: d,
            kept: kept.to_vec(),
        }),
        bank,
    )
    .unwrap_or_else(|err| panic!("layer: {err}"))
}

fn run(layer: MoeLayer, x: &Array2<f32>, kernels: CpuKernels, threads: usize) -> Array2<f32> {
    let backend = CpuBackend::with_threads(threads).with_kernels(kernels);
    let mut dev = backend
        .upload(Arc::new(layer))
        .unwrap_or_else(|err| panic!("upload: {err}"));
    dev.forward(&RouterInput::new(x.view()))
        .unwrap_or_else(|err| panic!("forward: {err}"))
        .output
}

fn packed(bank: &ExpertBank, format: WeightFormat) -> PackedBank {
    PackedBank::quantize(bank, format).unwrap_or_else(|err| panic!("quantize {format}: {err}"))
}

/// The f32 packed bank of `p`'s decoded weights.
fn decoded_f32(p: &PackedBank) -> ExpertBank {
    let back = p
        .dequantize()
        .unwrap_or_else(|err| panic!("dequantize: {err}"));
    ExpertBank::Packed(packed(&back, WeightFormat::F32))
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

const KERNELS: [CpuKernels; 3] = [CpuKernels::Auto, CpuKernels::Avx2, CpuKernels::Portable];

#[test]
fn every_format_equals_its_decoded_f32_bit_for_bit() {
    let mut rng = SeqRng::new(18, 0);
    // Rows per expert: register decode (1 to 4 in 1-, 2- and 4-row tiles for every format, 5 and 16 for 16-bit
    // ones), decoded panel + dot (5 and 16 for int8 / FP8 / MXFP4, 17, 48), transposed gemm (49), gemm (300).
    let rows = [1usize, 0, 2, 3, 4, 5, 16, 17, 48, 49, 300];
    // (d, f): multiples of 32 (every format), then widths with SIMD tails and partial / several FP8 blocks.
    check_decoded(64, 160, &WeightFormat::ALL, &rows, &mut rng);
    let no_mxfp4 = [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
    ];
    check_decoded(37, 141, &no_mxfp4, &rows, &mut rng);
}

/// Reductions long enough (2080 values) that the dot kernel's decoded panel is taken 12 rows at a time: the first
/// product (k = d) and the second (k = f) split into several panels and a short last one, bit for bit as one.
#[test]
fn long_reductions_split_the_decoded_panel_bit_for_bit() {
    let mut rng = SeqRng::new(18, 1);
    let rows = [5usize, 17, 48];
    check_decoded(2080, 96, &WeightFormat::ALL, &rows, &mut rng);
    check_decoded(64, 2080, &WeightFormat::ALL, &rows, &mut rng);
}

/// For each bank kind and format, the packed bank's output equals that of the f32 bank of its decoded weights bit
/// for bit, on every kernel set and on 1 and 2 threads; expert `e` gets `rows[e]` tokens.
fn check_decoded(d: usize, f: usize, formats: &[WeightFormat], rows: &[usize], rng: &mut SeqRng) {
    let t = rows.iter().copied().max().unwrap_or(0).max(1);
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    for kind in [0u8, 1, 4, 5] {
        let bank = random_bank(kind, rows.len(), d, f, rng);
        let kept = plan(t, rows, rng);
        for &format in formats {
            let p = packed(&bank, format);
            let want_layer = layer_with(decoded_f32(&p), &kept);
            let got_layer = layer_with(ExpertBank::Packed(p), &kept);
            for kernels in KERNELS {
                let want = run(want_layer.clone(), &x, kernels, 1);
                for threads in [1, 2] {
                    let got = run(got_layer.clone(), &x, kernels, threads);
                    assert!(
                        bits(&got) == bits(&want),
                        "kind {kind}, {format}, d {d}, f {f}, {kernels:?}, {threads} threads: packed \
                         differs from its decoded f32"
                    );
                }
            }
        }
    }
}

#[test]
fn f32_packed_layout_equals_the_f32_banks() {
    let mut rng = SeqRng::new(7, 0);
    let (t, d, f) = (120, 48, 80);
    let rows = [3usize, 16, 40, 120];
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    for kind in 0..moe_core::testing::BANK_KINDS {
        let bank = random_bank(kind, rows.len(), d, f, &mut rng);
        let kept = plan(t, &rows, &mut rng);
        let p = ExpertBank::Packed(packed(&bank, WeightFormat::F32));
        for kernels in KERNELS {
            let want = run(layer_with(bank.clone(), &kept), &x, kernels, 2);
            let got = run(layer_with(p.clone(), &kept), &x, kernels, 2);
            if kind == 1 {
                // GPT-OSS's f32 bank is `[E, d, 2f]` (x · W): another layout, so another kernel; equal to
                // rounding.
                let scale = want.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-5 * scale, "gpt-oss {kernels:?}: {err} vs {scale}");
            } else {
                assert!(bits(&got) == bits(&want), "kind {kind} {kernels:?}");
            }
        }
    }
}

#[test]
fn quantised_layers_route_identically_and_shared_experts_quantise() {
    let mut rng = SeqRng::new(3, 0);
    let (t, d, f, e) = (40, 64, 96, 6);
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    let shared = SharedExperts::new(random_bank(0, 1, d, f, &mut rng), None)
        .unwrap_or_else(|err| panic!("shared: {err}"));
    let router = moe_routers::SoftmaxTopKConfig::default()
        .build(rng.normal_matrix(e, d, 1.0), 2)
        .unwrap_or_else(|err| panic!("router: {err}"));
    let base = MoeLayer::new(Box::new(router), random_bank(0, e, d, f, &mut rng))
        .and_then(|l| l.with_shared(shared))
        .unwrap_or_else(|err| panic!("{err}"));
    let f32_out = run(base.clone(), &x, CpuKernels::Auto, 2);
    let scale = f32_out.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
    let mut last_err = 0f32;
    for format in [WeightFormat::Bf16, WeightFormat::Int8, WeightFormat::Mxfp4] {
        let q = base.quantized(format).unwrap_or_else(|err| panic!("{err}"));
        assert!(matches!(q.experts(), ExpertBank::Packed(_)));
        assert!(matches!(
            q.shared().map(|s| s.bank()),
            Some(ExpertBank::Packed(_))
        ));
        let (r0, r1) = (
            base.route(&RouterInput::new(x.view())),
            q.route(&RouterInput::new(x.view())),
        );
        let (r0, r1) = (
            r0.unwrap_or_else(|e| panic!("{e}")),
            r1.unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(r0, r1, "{format}: routing changed");
        // The backend quantising at upload gives the same output as the layer quantised beforehand.
        let by_backend = {
            let backend = CpuBackend::with_threads(2).with_dtype(format);
            let mut dev = backend
                .upload(Arc::new(base.clone()))
                .unwrap_or_else(|err| panic!("{err}"));
            dev.forward(&RouterInput::new(x.view()))
                .unwrap_or_else(|err| panic!("{err}"))
                .output
        };
        let out = run(q, &x, CpuKernels::Auto, 2);
        assert!(bits(&by_backend) == bits(&out), "{format}");
        let err = out
            .iter()
            .zip(&f32_out)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        // Coarser formats are further from f32: bf16 < int8 < MXFP4, each below a loose ceiling.
        assert!(
            err > last_err && err < 0.3,
            "{format}: relative error {err}"
        );
        last_err = err;
    }
}

#[test]
fn packed_banks_are_not_trained_and_double_quantisation_is_refused() {
    let mut rng = SeqRng::new(5, 0);
    let kept = plan(8, &[4, 4], &mut rng);
    let layer = layer_with(random_bank(0, 2, 32, 32, &mut rng), &kept)
        .quantized(WeightFormat::Int8)
        .unwrap_or_else(|err| panic!("{err}"));
    let x = Array2::from_shape_fn((8, 32), |_| rng.normal() as f32);
    let mut dev = CpuBackend::new()
        .upload(Arc::new(layer.clone()))
        .unwrap_or_else(|err| panic!("{err}"));
    let err = dev.forward_train(&RouterInput::new(x.view())).err();
    assert!(matches!(err, Some(MoeError::Unsupported { .. })), "{err:?}");
    let again = layer.quantized(WeightFormat::Mxfp4).err();
    assert!(
        matches!(again, Some(MoeError::InvalidConfig { .. })),
        "{again:?}"
    );
    assert!(layer.quantized(WeightFormat::Int8).is_ok());
}

#[test]
fn fp8_blocks_of_any_shape_equal_their_decoded_f32() {
    use moe_core::quant::{PackedFamily, PackedMatrix, Scales};
    let mut rng = SeqRng::new(11, 0);
    let (e, d, f, t) = (3, 80, 72, 60);
    let rows = [2usize, 20, 60];
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    let kept = plan(t, &rows, &mut rng);
    // Per-row blocks (a checkpoint whose gate / up grids do not stack), blocks the SIMD kernels read (powers of
    // two) and blocks they do not (3 x 48: the decoded-panel path with the scalar decode).
    for [br, bc] in [[1usize, 128usize], [64, 32], [3, 48], [128, 128]] {
        let mut matrix = |name: &str, r: usize, c: usize| {
            // Random non-NaN codes and positive scales.
            let data: Vec<u8> = (0..e * r * c)
                .map(|_| {
                    let b = (rng.uniform() * 256.0) as u8;
                    if b & 0x7F == 0x7F { 0x3F } else { b }
                })
                .collect();
            let n = e * r.div_ceil(br) * c.div_ceil(bc);
            let values = (0..n).map(|_| rng.uniform() as f32 * 0.01 + 1e-3).collect();
            let scales = Scales::Blocks {
                block_rows: br,
                block_cols: bc,
                values,
            };
            PackedMatrix::from_parts(name, "scales", WeightFormat::Fp8, [e, r, c], data, scales)
                .unwrap_or_else(|err| panic!("{name}: {err}"))
        };
        let bank = PackedBank::new(
            PackedFamily::SwiGlu {
                act: moe_core::Activation::Silu,
            },
            matrix("gate_up", 2 * f, d),
            None,
            matrix("down", d, f),
            None,
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let want_layer = layer_with(decoded_f32(&bank), &kept);
        let got_layer = layer_with(ExpertBank::Packed(bank), &kept);
        for kernels in KERNELS {
            let want = run(want_layer.clone(), &x, kernels, 2);
            let got = run(got_layer.clone(), &x, kernels, 2);
            assert!(
                bits(&got) == bits(&want),
                "blocks [{br}, {bc}], {kernels:?}"
            );
        }
    }
}

/// Every code of each packed format through the SIMD decodes (in registers for 3 rows, in panels for 20; AVX-512
/// and AVX2): int8 and FP8 rows holding all 256 codes (FP8's two NaN codes as zero), MXFP4 rows holding every
/// nibble under every E8M0 code from 0 to 254. The layer equals the f32 layer of its decoded weights bit for bit,
/// so no code decodes differently from `decode_row` (a wrong one moves the first product's outputs).
#[test]
fn every_code_decodes_exactly() {
    let mut rng = SeqRng::new(18, 2);
    let (e, d, f) = (2, 256, 256);
    let codes: Vec<u8> = (0..e * f).flat_map(|_| 0..=255u8).collect();
    let int8 = PackedMatrix::from_parts(
        "up",
        "up scales",
        WeightFormat::Int8,
        [e, f, d],
        codes.clone(),
        Scales::Rows(
            (0..e * f)
                .map(|_| rng.uniform() as f32 * 0.1 + 1e-3)
                .collect(),
        ),
    )
    .expect("int8");
    let fp8 = PackedMatrix::from_parts(
        "up",
        "up scales",
        WeightFormat::Fp8,
        [e, f, d],
        codes
            .iter()
            .map(|&c| if c & 0x7F == 0x7F { 0 } else { c })
            .collect(),
        Scales::Blocks {
            block_rows: 128,
            block_cols: 128,
            values: (0..e * 2 * 2)
                .map(|_| rng.uniform() as f32 * 0.01 + 1e-4)
                .collect(),
        },
    )
    .expect("fp8");
    // MXFP4: block b of row r has E8M0 code (8r + b) mod 255 and bytes covering every nibble pair; under codes 253
    // and 254 only magnitudes up to 1.5 (4 · 2^126 and 2 · 2^127 are past f32's range).
    let blocks = d / 32;
    let scale_codes: Vec<u8> = (0..e * f * blocks).map(|i| (i % 255) as u8).collect();
    let data: Vec<u8> = (0..e * f * blocks)
        .flat_map(|i| {
            let code = scale_codes[i];
            (0..16u8).map(move |b| {
                let v = b.wrapping_mul(17).wrapping_add(i as u8);
                if code >= 253 { v & 0xBB } else { v }
            })
        })
        .collect();
    let mxfp4 = PackedMatrix::from_parts(
        "up",
        "up scales",
        WeightFormat::Mxfp4,
        [e, f, d],
        data,
        Scales::E8m0(scale_codes),
    )
    .expect("mxfp4");
    let down = Array3::from_shape_fn((e, d, f), |_| rng.normal() as f32 * 0.05);
    let t = 20;
    let x = Array2::from_shape_fn((t, d), |_| rng.normal() as f32);
    let kept = plan(t, &[3, 20], &mut rng);
    for up in [int8, fp8, mxfp4] {
        let format = up.format();
        let down = PackedMatrix::quantize("down", down.view(), format).expect("down");
        let bank = PackedBank::new(
            PackedFamily::Mlp {
                act: Activation::Gelu,
            },
            up,
            None,
            down,
            None,
        )
        .expect("bank");
        let want_layer = layer_with(decoded_f32(&bank), &kept);
        let got_layer = layer_with(ExpertBank::Packed(bank), &kept);
        for kernels in [CpuKernels::Auto, CpuKernels::Avx2] {
            let want = run(want_layer.clone(), &x, kernels, 1);
            let got = run(got_layer.clone(), &x, kernels, 2);
            assert!(
                bits(&got) == bits(&want),
                "{format}, {kernels:?}: a code decodes differently from decode_row"
            );
        }
    }
}
