//! Packed expert weights (`moe_core::quant`): the error bound of every format's quantiser, exact round trips of
//! representable values, every refusal of `PackedMatrix::from_parts` naming its tensor, expert selection, packed
//! banks of every family (GPT-OSS's transposition included), and `MoeLayer::quantized` leaving the routing alone.
//!
//! Error bounds (round to nearest, ties to even, per value `w`, decoded `ŵ`):
//! - bf16: 8 significant bits, `|ŵ − w| ≤ 2^-8 |w|` (half an ulp) for normal values.
//! - f16: 11 significant bits, `|ŵ − w| ≤ 2^-11 |w|` for `|w|` in the normal range `[2^-14, 65504]`, and
//!   `≤ 2^-25` (half the subnormal step 2^-24) below it.
//! - int8 (per row `s = max|w| / 127`): `|ŵ − w| ≤ s / 2`.
//! - FP8 E4M3 (per 128 × 128 block `s = max|w| / 448`, `v = w / s`, `|v| ≤ 448`): 4 significant bits, so
//!   `|v̂ − v| ≤ 2^-4 |v|` for `|v| ≥ 2^-6` (normal) and `≤ 2^-10` (half the subnormal step 2^-9) below:
//!   `|ŵ − w| ≤ max(|w| / 16, s / 1024)`.
//! - MXFP4 (per 32 values `X = 2^(⌊log2 max|w|⌋ − 2)`, `v = w / X`, `|v| < 8`): E2M1's grid is 0.5 apart on
//!   `[0, 2]`, 1 on `[2, 4]`, 2 on `[4, 6]`, and codes saturate at 6, so `|v̂ − v| ≤ 0.25, 0.5, 1` on those ranges
//!   and `|v| − 6 < 2` above 6 (the saturation at `6 · 2^(e − 2)`, `e = ⌊log2 max|w|⌋`); `|ŵ| ≤ 6X`.
//!
//! Each bound gets an f32 slack of `2^-20` relative (the division `w / s` and the product `q · s` round once
//! each in f32).

use moe_core::quant::codec::{E2M1_VALUES, fp8_e4m3_to_f32};
use moe_core::quant::{PackedBank, PackedFamily, PackedMatrix, Scales, WeightFormat};
use moe_core::rng::SeqRng;
use moe_core::{
    Activation, Assignment, ExpertBank, GptOssBank, MlpBank, MoeError, MoeLayer, Router,
    RouterInput, Routing, SharedExperts, SwiGluBank,
};
use ndarray::{Array2, Array3, s};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const SLACK: f32 = 1.0 / (1 << 20) as f32;

fn cfg(cases: u32, seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        ..ProptestConfig::default()
    }
}

/// `[e, r, c]` normal values of magnitude about `2^mag`, with a few exact zeros and, in `zero_row`, a row of zeros.
fn weights(e: usize, r: usize, c: usize, mag: i32, seed: u64) -> Array3<f32> {
    let mut rng = SeqRng::new(seed, 18);
    let scale = 2f32.powi(mag);
    let mut w = Array3::from_shape_simple_fn((e, r, c), || {
        if rng.below(17) == 0 {
            0.0
        } else {
            rng.normal() as f32 * scale
        }
    });
    if r > 1 {
        w.slice_mut(s![0, r - 1, ..]).fill(0.0);
    }
    w
}

fn packed(w: &Array3<f32>, f: WeightFormat) -> (PackedMatrix, Array3<f32>) {
    let m = PackedMatrix::quantize("w", w.view(), f).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert_eq!(m.format(), f);
    let (e, r, c) = w.dim();
    assert_eq!(m.dims(), [e, r, c]);
    let back = m.dequantize();
    (m, back)
}

/// The largest `|ŵ − w| / bound` of a format over `w` (≤ 1 passes), per the bounds in the module doc.
fn worst_ratio(w: &Array3<f32>, back: &Array3<f32>, f: WeightFormat) -> f32 {
    let (e, r, c) = w.dim();
    let mut worst = 0f32;
    for ei in 0..e {
        for ri in 0..r {
            let row = w.slice(s![ei, ri, ..]);
            let row_amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for ci in 0..c {
                let (x, y) = (w[[ei, ri, ci]], back[[ei, ri, ci]]);
                let err = (x - y).abs();
                let bound = match f {
                    WeightFormat::F32 => 0.0,
                    WeightFormat::Bf16 => x.abs() * 2f32.powi(-8),
                    WeightFormat::F16 => {
                        if x.abs() >= 2f32.powi(-14) {
                            x.abs() * 2f32.powi(-11)
                        } else {
                            2f32.powi(-25)
                        }
                    }
                    WeightFormat::Int8 => row_amax / 127.0 / 2.0,
                    WeightFormat::Fp8 => {
                        let (br, bc) = (ri / 128 * 128, ci / 128 * 128);
                        let blk = w.slice(s![ei, br..(br + 128).min(r), bc..(bc + 128).min(c)]);
                        let s = blk.iter().fold(0f32, |m, v| m.max(v.abs())) / 448.0;
                        (x.abs() / 16.0).max(s / 1024.0)
                    }
                    WeightFormat::Mxfp4 => {
                        let b0 = ci / 32 * 32;
                        let blk = w.slice(s![ei, ri, b0..b0 + 32]);
                        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                        if amax == 0.0 {
                            0.0
                        } else {
                            let xs = 2f32.powi(amax.log2().floor() as i32 - 2);
                            assert!(
                                y.abs() <= 6.0 * xs,
                                "MXFP4 decoded {y} above 6X = {}",
                                6.0 * xs
                            );
                            let v = x.abs() / xs;
                            let dv = if v <= 2.0 {
                                0.25
                            } else if v <= 4.0 {
                                0.5
                            } else if v <= 6.0 {
                                1.0
                            } else {
                                v - 6.0
                            };
                            dv * xs
                        }
                    }
                };
                let bound = bound + SLACK * (x.abs() + bound);
                if err > bound {
                    return f32::INFINITY.min(err / bound.max(f32::MIN_POSITIVE));
                }
                if bound > 0.0 {
                    worst = worst.max(err / bound);
                }
            }
        }
    }
    worst
}

fn lossy_formats() -> impl Strategy<Value = WeightFormat> {
    prop::sample::select(vec![
        WeightFormat::Bf16,
        WeightFormat::F16,
        WeightFormat::Int8,
        WeightFormat::Fp8,
        WeightFormat::Mxfp4,
    ])
}

proptest! {
    #![proptest_config(cfg(48, 0x18_01))]

    /// dequantize(quantize(w)) is within the format's bound for every value (shapes with partial FP8 blocks too).
    #[test]
    fn quantisation_error_is_within_the_format_bound(
        f in lossy_formats(),
        e in 1usize..3,
        r in 1usize..140,
        c32 in 1usize..6,
        extra in 0usize..140,
        mag in -8i32..6,
        seed in any::<u64>(),
    ) {
        // MXFP4 rows are multiples of 32; the others get any length, up to two FP8 column blocks.
        let c = if f == WeightFormat::Mxfp4 { 32 * c32 } else { 32 * c32 + extra };
        let w = weights(e, r, c, mag, seed);
        let (_, back) = packed(&w, f);
        let worst = worst_ratio(&w, &back, f);
        prop_assert!(worst <= 1.0, "{f} [{e}, {r}, {c}] 2^{mag}: error {worst} x the bound");
        // Zeros stay zero.
        for (x, y) in w.iter().zip(back.iter()) {
            if *x == 0.0 {
                prop_assert_eq!(*y, 0.0);
            }
        }
    }

    /// Values the format represents come back bit for bit.
    #[test]
    fn representable_values_round_trip_exactly(
        f in lossy_formats(),
        r in 1usize..140,
        c32 in 1usize..6,
        extra in 0usize..140,
        k in -12i32..8,
        seed in any::<u64>(),
    ) {
        let c = if f == WeightFormat::Mxfp4 { 32 * c32 } else { 32 * c32 + extra };
        let w = representable(f, 2, r, c, k, seed);
        let (_, back) = packed(&w, f);
        for ((i, x), y) in w.indexed_iter().zip(back.iter()) {
            prop_assert_eq!(x.to_bits(), y.to_bits(), "{} at {:?}: {} -> {}", f, i, x, y);
        }
    }
}

/// A tensor of values `format` holds exactly as `quantize` would scale them: bf16 / f16 values; int8 `q · 2^k`
/// with a ±127 in every row; FP8 `E4M3 · 2^k` with a ±448 in every 128 × 128 block; MXFP4 `E2M1 · 2^k` with a ±6
/// or ±4 in every 32-block.
fn representable(f: WeightFormat, e: usize, r: usize, c: usize, k: i32, seed: u64) -> Array3<f32> {
    let mut rng = SeqRng::new(seed, 7);
    let p = 2f32.powi(k);
    let sign = |rng: &mut SeqRng| if rng.below(2) == 0 { 1.0 } else { -1.0 };
    let mut w = Array3::from_shape_simple_fn((e, r, c), || match f {
        WeightFormat::Bf16 => half::bf16::from_f32(rng.normal() as f32 * p).to_f32(),
        WeightFormat::F16 => half::f16::from_f32(rng.normal() as f32 * p).to_f32(),
        WeightFormat::Int8 => (rng.below(255) as f32 - 127.0) * p,
        WeightFormat::Fp8 => {
            let code = rng.below(256) as u8;
            fp8_e4m3_to_f32(code).unwrap_or(0.0) * p
        }
        WeightFormat::Mxfp4 => E2M1_VALUES[rng.below(16) as usize] * p,
        WeightFormat::F32 => rng.normal() as f32,
    });
    for ei in 0..e {
        match f {
            WeightFormat::Int8 => {
                for ri in 0..r {
                    w[[ei, ri, rng.below(c as u64) as usize]] = 127.0 * p * sign(&mut rng);
                }
            }
            WeightFormat::Fp8 => {
                for br in (0..r).step_by(128) {
                    for bc in (0..c).step_by(128) {
                        w[[ei, br, bc]] = 448.0 * p * sign(&mut rng);
                    }
                }
            }
            WeightFormat::Mxfp4 => {
                for ri in 0..r {
                    for b in (0..c).step_by(32) {
                        let top = if rng.below(2) == 0 { 6.0 } else { 4.0 };
                        w[[ei, ri, b + rng.below(32) as usize]] = top * p * sign(&mut rng);
                    }
                }
            }
            _ => {}
        }
    }
    w
}

#[test]
fn f32_format_is_the_identity_and_sizes_are_the_packed_sizes() {
    let w = weights(3, 64, 96, 0, 1);
    let (m, back) = packed(&w, WeightFormat::F32);
    assert_eq!(back, w);
    // Bytes per expert: weights plus scales.
    let per = 64 * 96;
    for (f, want) in [
        (WeightFormat::F32, 4 * per),
        (WeightFormat::Bf16, 2 * per),
        (WeightFormat::F16, 2 * per),
        (WeightFormat::Int8, per + 4 * 64),
        (WeightFormat::Fp8, per + 4),
        (WeightFormat::Mxfp4, per / 2 + per / 32),
    ] {
        assert_eq!(packed(&w, f).0.bytes_per_expert(), want, "{f}");
    }
    assert_eq!(m.data().len(), 3 * 4 * per);
}

#[test]
fn quantize_refuses_non_finite_weights_and_bad_mxfp4_rows() {
    let mut w = weights(1, 4, 64, 0, 2);
    w[[0, 2, 5]] = f32::NAN;
    for f in WeightFormat::ALL {
        let err = PackedMatrix::quantize("experts.w1", w.view(), f).expect_err("NaN weight");
        assert!(
            matches!(&err, MoeError::BadTensor { tensor, .. } if tensor == "experts.w1"),
            "{f}: {err}"
        );
        assert!(err.to_string().contains("experts.w1"), "{err}");
    }
    let w = weights(1, 4, 48, 0, 3);
    let err =
        PackedMatrix::quantize("experts.w2", w.view(), WeightFormat::Mxfp4).expect_err("48 % 32");
    assert!(
        matches!(&err, MoeError::BadTensor { tensor, reason } if tensor == "experts.w2" && reason.contains("32")),
        "{err}"
    );
}

/// f16 cannot hold 1e5: quantising to f16 is refused with an error naming the tensor, not turned into infinities.
#[test]
fn f16_overflow_is_refused_naming_the_tensor() {
    let mut w = weights(1, 2, 8, 0, 4);
    w[[0, 1, 3]] = 1.0e5;
    let err = PackedMatrix::quantize("big", w.view(), WeightFormat::F16).expect_err("overflow");
    assert!(
        matches!(&err, MoeError::BadTensor { tensor, .. } if tensor == "big"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------ from_parts

/// `from_parts` with the given parts must fail with `BadTensor` naming `who` (and its message names it too).
fn refused(
    who: &str,
    format: WeightFormat,
    dims: [usize; 3],
    data: Vec<u8>,
    scales: Scales,
    says: &str,
) {
    let err = PackedMatrix::from_parts("t.weight", "t.scale", format, dims, data, scales)
        .expect_err("refused");
    match &err {
        MoeError::BadTensor { tensor, reason } => {
            assert_eq!(tensor, who, "{format} {dims:?}: {err}");
            assert!(
                reason.contains(says),
                "{format} {dims:?}: {reason:?} lacks {says:?}"
            );
        }
        other => panic!("{format} {dims:?}: expected BadTensor, got {other}"),
    }
    assert!(err.to_string().contains(who), "{err}");
}

#[test]
fn from_parts_refuses_every_bad_input_naming_the_tensor() {
    use WeightFormat::*;
    let (w, s) = ("t.weight", "t.scale");
    let d = [2, 3, 64];
    let n = 2 * 3 * 64;
    // Byte length, for every format.
    for f in WeightFormat::ALL {
        let sc = match f {
            F32 | Bf16 | F16 => Scales::None,
            Int8 => Scales::Rows(vec![1.0; 6]),
            Fp8 => Scales::Blocks {
                block_rows: 128,
                block_cols: 128,
                values: vec![1.0; 2],
            },
            Mxfp4 => Scales::E8m0(vec![127; 12]),
        };
        let good = 2 * 3 * f.row_bytes(64);
        assert!(
            PackedMatrix::from_parts(w, s, f, d, vec![0; good], sc.clone()).is_ok(),
            "{f}: the good parts"
        );
        refused(w, f, d, vec![0; good + 1], sc.clone(), "bytes");
        refused(w, f, d, vec![0; good - 1], sc.clone(), "bytes");
        refused(w, f, [2, 0, 64], Vec::new(), sc.clone(), "zero");
        // The wrong kind of scales.
        let wrong = if matches!(sc, Scales::None) {
            Scales::Rows(vec![1.0; 6])
        } else {
            Scales::None
        };
        refused(s, f, d, vec![0; good], wrong, "take");
    }
    // Non-finite values of the float formats.
    let mut v = vec![0u8; 4 * n];
    v[4 * 7..4 * 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    refused(w, F32, d, v, Scales::None, "non-finite");
    let mut v = vec![0u8; 2 * n];
    v[2..4].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    refused(w, Bf16, d, v, Scales::None, "non-finite");
    let mut v = vec![0u8; 2 * n];
    v[2 * n - 2..].copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
    refused(w, F16, d, v, Scales::None, "non-finite");
    // int8 row scales: count, NaN, infinity.
    refused(s, Int8, d, vec![0; n], Scales::Rows(vec![1.0; 5]), "scales");
    refused(
        s,
        Int8,
        d,
        vec![0; n],
        Scales::Rows(vec![1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0]),
        "non-finite",
    );
    refused(
        s,
        Int8,
        d,
        vec![0; n],
        Scales::Rows(vec![1.0, 1.0, 1.0, 1.0, 1.0, f32::INFINITY]),
        "non-finite",
    );
    // FP8: block sizes, grid, non-finite scales, NaN codes.
    let blocks = |br, bc, values| Scales::Blocks {
        block_rows: br,
        block_cols: bc,
        values,
    };
    refused(s, Fp8, d, vec![0; n], blocks(0, 128, vec![1.0; 2]), "zero");
    refused(s, Fp8, d, vec![0; n], blocks(128, 0, vec![1.0; 2]), "zero");
    refused(
        s,
        Fp8,
        d,
        vec![0; n],
        blocks(128, 128, vec![1.0; 3]),
        "needs [2, 1, 1]",
    );
    refused(
        s,
        Fp8,
        d,
        vec![0; n],
        blocks(2, 32, vec![1.0; 2]),
        "needs [2, 2, 2]",
    );
    refused(
        s,
        Fp8,
        d,
        vec![0; n],
        blocks(128, 128, vec![1.0, f32::NEG_INFINITY]),
        "non-finite",
    );
    refused(
        s,
        Fp8,
        d,
        vec![0; n],
        blocks(128, 128, vec![f32::NAN, 1.0]),
        "non-finite",
    );
    for nan in [0x7Fu8, 0xFF] {
        let mut v = vec![0u8; n];
        v[n - 1] = nan;
        refused(w, Fp8, d, v, blocks(128, 128, vec![1.0; 2]), "NaN");
    }
    // MXFP4: row length, scale count, the E8M0 NaN code.
    refused(
        w,
        Mxfp4,
        [2, 3, 48],
        vec![0; 2 * 3 * 24],
        Scales::E8m0(vec![127; 6]),
        "32",
    );
    refused(
        s,
        Mxfp4,
        d,
        vec![0; n / 2],
        Scales::E8m0(vec![127; 11]),
        "scales",
    );
    let mut codes = vec![127u8; 12];
    codes[11] = 255;
    refused(s, Mxfp4, d, vec![0; n / 2], Scales::E8m0(codes), "255");
    // Sizes past the limit are refused before any allocation.
    let err = PackedMatrix::from_parts(
        w,
        s,
        Int8,
        [1 << 21, 1 << 20, 1 << 20],
        Vec::new(),
        Scales::None,
    )
    .expect_err("too large");
    assert!(matches!(err, MoeError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains(w), "{err}");
}

#[test]
fn from_parts_keeps_the_bytes_and_decodes_the_checkpoint_layout() {
    // MXFP4: column 2i in the low nibble of byte i; one scale per 32 along the row.
    let mut data = vec![0u8; 16];
    data[0] = 0x72; // col 0: code 2 (1.0), col 1: code 7 (6.0)
    data[15] = 0x9F; // col 30: code 15 (-6.0), col 31: code 9 (-0.5)
    let m = PackedMatrix::from_parts(
        "b",
        "s",
        WeightFormat::Mxfp4,
        [1, 1, 32],
        data.clone(),
        Scales::E8m0(vec![128]),
    )
    .expect("valid");
    assert_eq!(m.data(), &data[..]);
    let v = m.dequantize();
    assert_eq!(
        (v[[0, 0, 0]], v[[0, 0, 1]], v[[0, 0, 30]], v[[0, 0, 31]]),
        (2.0, 12.0, -12.0, -1.0)
    );
    // FP8: the scale of row r, column c is s[r / 128, c / 128], a multiplier.
    let (r, c) = (130, 3);
    let mut data = vec![0x38u8; r * c]; // 1.0
    data[129 * c + 2] = 0xB8; // -1.0
    let m = PackedMatrix::from_parts(
        "w",
        "w_scale_inv",
        WeightFormat::Fp8,
        [1, r, c],
        data,
        Scales::Blocks {
            block_rows: 128,
            block_cols: 128,
            values: vec![0.5, 3.0],
        },
    )
    .expect("valid");
    let v = m.dequantize();
    assert_eq!(
        (v[[0, 127, 0]], v[[0, 128, 0]], v[[0, 129, 2]]),
        (0.5, 3.0, -3.0)
    );
}

// ------------------------------------------------------------------------------------------------ banks

/// Equal banks (same family, equal tensors and settings).
fn same(a: &ExpertBank, b: &ExpertBank) -> bool {
    match (a, b) {
        (ExpertBank::SwiGlu(x), ExpertBank::SwiGlu(y)) => x == y,
        (ExpertBank::GptOss(x), ExpertBank::GptOss(y)) => x == y,
        (ExpertBank::Mlp(x), ExpertBank::Mlp(y)) => x == y,
        (ExpertBank::Packed(x), ExpertBank::Packed(y)) => x == y,
        _ => false,
    }
}

fn bf16_exact(a: Array3<f32>) -> Array3<f32> {
    a.mapv(|v| half::bf16::from_f32(v).to_f32())
}

fn a3(rng: &mut SeqRng, sh: (usize, usize, usize)) -> Array3<f32> {
    bf16_exact(Array3::from_shape_simple_fn(sh, || {
        rng.normal() as f32 * 0.1
    }))
}

/// The grouped families with bf16-representable weights: SwiGLU, GPT-OSS, MLP with both, one or no bias.
fn banks(e: usize, d: usize, f: usize) -> Vec<ExpertBank> {
    let mut rng = SeqRng::new(18, 3);
    let mut bias = |r, c| rng.normal_matrix(r, c, 0.1);
    let (b1, b2, b3, b4) = (bias(e, 2 * f), bias(e, d), bias(e, f), bias(e, d));
    let mut rng = SeqRng::new(18, 4);
    vec![
        ExpertBank::SwiGlu(
            SwiGluBank::new(
                a3(&mut rng, (e, 2 * f, d)),
                a3(&mut rng, (e, d, f)),
                Activation::Silu,
            )
            .expect("swiglu"),
        ),
        ExpertBank::GptOss(
            GptOssBank::new(
                a3(&mut rng, (e, d, 2 * f)),
                b1,
                a3(&mut rng, (e, f, d)),
                b2,
                1.702,
                7.0,
            )
            .expect("gpt-oss"),
        ),
        ExpertBank::Mlp(
            MlpBank::new(
                a3(&mut rng, (e, f, d)),
                Some(b3.clone()),
                a3(&mut rng, (e, d, f)),
                Some(b4.clone()),
                Activation::Gelu,
            )
            .expect("mlp"),
        ),
        ExpertBank::Mlp(
            MlpBank::new(
                a3(&mut rng, (e, f, d)),
                Some(b3),
                a3(&mut rng, (e, d, f)),
                None,
                Activation::Relu,
            )
            .expect("mlp b1"),
        ),
        ExpertBank::Mlp(
            MlpBank::new(
                a3(&mut rng, (e, f, d)),
                None,
                a3(&mut rng, (e, d, f)),
                Some(b4),
                Activation::Silu,
            )
            .expect("mlp b2"),
        ),
        ExpertBank::Mlp(
            MlpBank::new(
                a3(&mut rng, (e, f, d)),
                None,
                a3(&mut rng, (e, d, f)),
                None,
                Activation::GeluTanh,
            )
            .expect("mlp"),
        ),
    ]
}

/// Every family and format keeps its family, shapes, biases (f32, untouched); bf16 gives back bf16-representable
/// weights bit for bit, in the family's own layout (GPT-OSS's `[E, d, 2f]` goes through the packed `[E, 2f, d]`
/// and back).
#[test]
fn packed_banks_keep_family_shapes_and_layout() {
    let (e, d, f) = (3, 64, 32);
    for bank in banks(e, d, f) {
        for fmt in WeightFormat::ALL {
            let p = PackedBank::quantize(&bank, fmt)
                .unwrap_or_else(|err| panic!("{} {fmt}: {err}", bank.kind()));
            assert_eq!(
                (p.n_experts(), p.d_model(), p.ffn(), p.format()),
                (e, d, f, fmt)
            );
            let u = if matches!(bank, ExpertBank::Mlp(_)) {
                f
            } else {
                2 * f
            };
            assert_eq!(p.up().dims(), [e, u, d]);
            assert_eq!(p.down().dims(), [e, d, f]);
            let back = p.dequantize().expect("dequantize");
            assert_eq!(back.kind(), bank.kind());
            let shapes = |b: &ExpertBank| {
                b.params()
                    .iter()
                    .map(|q| (q.name.clone(), q.value.shape().to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(shapes(&back), shapes(&bank), "{} {fmt}", bank.kind());
            let err = p.error_against(&bank).expect("same family");
            if matches!(fmt, WeightFormat::F32 | WeightFormat::Bf16) {
                assert!(same(&back, &bank), "{} {fmt}: exact", bank.kind());
                assert_eq!((err.max_abs, err.rel_rms), (0.0, 0.0));
            } else if fmt == WeightFormat::F16 {
                // bf16 values are f16 values unless they fall below f16's normal range (2^-14).
                assert!(err.rel_rms < 1e-4, "{} {fmt}: {err:?}", bank.kind());
            } else {
                assert!(
                    err.max_abs > 0.0 && err.rel_rms < 0.2,
                    "{} {fmt}: {err:?}",
                    bank.kind()
                );
            }
            match (&bank, p.family()) {
                (ExpertBank::SwiGlu(b), PackedFamily::SwiGlu { act }) => {
                    assert_eq!(act, b.act());
                    assert!(p.up_bias().is_none() && p.down_bias().is_none());
                }
                (ExpertBank::GptOss(b), PackedFamily::GptOss { alpha, limit }) => {
                    assert_eq!((alpha, limit), (b.alpha(), b.limit()));
                    assert_eq!(p.up_bias(), Some(b.gate_up_bias()));
                    assert_eq!(p.down_bias(), Some(b.down_bias()));
                    // The packed up matrix is the transpose: row r is column r of [E, d, 2f] (r = 2j gate j).
                    let up = p.up().dequantize();
                    if fmt == WeightFormat::Bf16 {
                        for ei in 0..e {
                            assert_eq!(
                                up.slice(s![ei, .., ..]),
                                b.gate_up().slice(s![ei, .., ..]).t()
                            );
                            assert_eq!(
                                p.down().dequantize().slice(s![ei, .., ..]),
                                b.down().slice(s![ei, .., ..]).t()
                            );
                        }
                    }
                }
                (ExpertBank::Mlp(b), PackedFamily::Mlp { act }) => {
                    assert_eq!(act, b.act());
                    assert_eq!(p.up_bias(), b.b1());
                    assert_eq!(p.down_bias(), b.b2());
                }
                (b, fam) => panic!("{} became {fam:?}", b.kind()),
            }
            let packed = ExpertBank::Packed(p.clone());
            assert_eq!(packed.kind(), "packed");
            assert!(
                packed.params().is_empty(),
                "a packed bank lists no parameters"
            );
            assert_eq!((packed.n_experts(), packed.d_model()), (e, d));
        }
    }
}

/// `select` keeps the chosen experts' bytes and scales, in the order asked, for every format.
#[test]
fn selecting_experts_keeps_their_packed_weights() {
    let bank = &banks(4, 64, 32)[1];
    for fmt in WeightFormat::ALL {
        let p = PackedBank::quantize(bank, fmt).expect("quantize");
        let all = p.dequantize().expect("dequantize");
        let picked = ExpertBank::Packed(p.clone())
            .select(&[3, 0])
            .expect("select");
        let ExpertBank::Packed(q) = &picked else {
            panic!("select kept the bank packed")
        };
        assert_eq!(
            (q.n_experts(), q.format(), q.family()),
            (2, fmt, p.family())
        );
        for (i, &e) in [3usize, 0].iter().enumerate() {
            assert_eq!(
                q.up().expert(i).data,
                p.up().expert(e).data,
                "{fmt} up bytes of {e}"
            );
            assert_eq!(
                q.down().expert(i).data,
                p.down().expert(e).data,
                "{fmt} down bytes of {e}"
            );
        }
        let want = all.select(&[3, 0]).expect("select f32");
        assert!(same(&q.dequantize().expect("dequantize"), &want), "{fmt}");
        assert!(ExpertBank::Packed(p.clone()).select(&[4]).is_err());
        assert!(ExpertBank::Packed(p).select(&[1, 1]).is_err());
    }
}

#[test]
fn packed_bank_new_checks_its_parts() {
    let (e, d, f) = (2, 64, 32);
    let mut rng = SeqRng::new(5, 5);
    let m = |rng: &mut SeqRng, r, c, fmt| {
        PackedMatrix::quantize(
            "m",
            Array3::from_shape_simple_fn((e, r, c), || rng.normal() as f32).view(),
            fmt,
        )
        .expect("quantize")
    };
    let swiglu = PackedFamily::SwiGlu {
        act: Activation::Silu,
    };
    let gpt = PackedFamily::GptOss {
        alpha: 1.702,
        limit: 7.0,
    };
    let up = m(&mut rng, 2 * f, d, WeightFormat::Int8);
    let down = m(&mut rng, d, f, WeightFormat::Int8);
    assert!(PackedBank::new(swiglu, up.clone(), None, down.clone(), None).is_ok());
    // Shapes that do not fit, mixed formats, biases where none go or missing where they must.
    assert!(PackedBank::new(swiglu, down.clone(), None, down.clone(), None).is_err());
    let down8 = m(&mut rng, d, f, WeightFormat::Fp8);
    assert!(PackedBank::new(swiglu, up.clone(), None, down8, None).is_err());
    let bias = |c| Some(Array2::<f32>::zeros((e, c)));
    assert!(PackedBank::new(swiglu, up.clone(), bias(2 * f), down.clone(), None).is_err());
    assert!(PackedBank::new(gpt, up.clone(), bias(2 * f), down.clone(), None).is_err());
    assert!(PackedBank::new(gpt, up.clone(), bias(f), down.clone(), bias(d)).is_err());
    let mut nan = Array2::<f32>::zeros((e, d));
    nan[[1, 3]] = f32::NAN;
    assert!(PackedBank::new(gpt, up.clone(), bias(2 * f), down.clone(), Some(nan)).is_err());
    let bad = PackedFamily::GptOss {
        alpha: f32::NAN,
        limit: 7.0,
    };
    assert!(PackedBank::new(bad, up.clone(), bias(2 * f), down.clone(), bias(d)).is_err());
    assert!(PackedBank::new(gpt, up, bias(2 * f), down, bias(d)).is_ok());
}

// ------------------------------------------------------------------------------------------------ the layer

/// Top-1 of `x · Wᵀ` with weight `sigmoid(logit)`: a router with a gate, for the layer tests.
#[derive(Debug, Clone)]
struct Top1 {
    gate: Array2<f32>,
}

impl Router for Top1 {
    fn name(&self) -> &str {
        "top1"
    }
    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }
    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        input.validate(Some(self.gate.ncols()))?;
        let logits = input.hidden.dot(&self.gate.t());
        let t = logits.nrows();
        let kept = (0..t)
            .map(|i| {
                let (e, l) = logits.row(i).iter().copied().enumerate().fold(
                    (0, f32::NEG_INFINITY),
                    |b, (j, v)| if v > b.1 { (j, v) } else { b },
                );
                Assignment {
                    token: i as u32,
                    expert: e as u32,
                    weight: 1.0 / (1.0 + (-l).exp()),
                    rank: 0,
                }
            })
            .collect();
        Routing::new(t, self.n_experts(), t, kept, Vec::new())
    }
}

/// Quantising a layer packs its routed and shared experts and leaves the router, and so the routing, bit for
/// bit as it was.
#[test]
fn quantized_layer_keeps_the_routing_bit_identical() {
    let (e, d, f) = (4, 64, 32);
    let mut rng = SeqRng::new(9, 9);
    let router = Top1 {
        gate: rng.normal_matrix(e, d, 0.2),
    };
    let x = rng.normal_matrix(40, d, 1.0);
    let shared_bank = ExpertBank::SwiGlu(
        SwiGluBank::new(
            a3(&mut rng, (1, 2 * f, d)),
            a3(&mut rng, (1, d, f)),
            Activation::Silu,
        )
        .expect("shared"),
    );
    for bank in banks(e, d, f) {
        let layer = MoeLayer::new(Box::new(router.clone()), bank.clone())
            .expect("layer")
            .with_shared(
                SharedExperts::new(shared_bank.clone(), Some(ndarray::Array1::zeros(d)))
                    .expect("shared"),
            )
            .expect("with shared");
        let before = layer.route(&RouterInput::new(x.view())).expect("route");
        let unchanged = layer.quantized(WeightFormat::F32).expect("f32");
        assert!(same(unchanged.experts(), layer.experts()));
        for fmt in WeightFormat::ALL.into_iter().skip(1) {
            let q = layer
                .quantized(fmt)
                .unwrap_or_else(|err| panic!("{} {fmt}: {err}", bank.kind()));
            assert_eq!(
                q.route(&RouterInput::new(x.view())).expect("route"),
                before,
                "{fmt}"
            );
            let ExpertBank::Packed(p) = q.experts() else {
                panic!("{fmt}: routed experts packed")
            };
            assert_eq!(p.format(), fmt);
            let shared = q.shared().expect("shared kept");
            assert!(matches!(shared.bank(), ExpertBank::Packed(s) if s.format() == fmt));
            assert_eq!(shared.gate(), layer.shared().and_then(|s| s.gate()));
            // Quantising again to the same format keeps it; to another is refused.
            assert!(same(
                q.quantized(fmt).expect("same format").experts(),
                q.experts()
            ));
            let other = if fmt == WeightFormat::Int8 {
                WeightFormat::Fp8
            } else {
                WeightFormat::Int8
            };
            assert!(q.quantized(other).is_err(), "{fmt} then {other}");
        }
    }
}

#[test]
fn scales_that_decode_past_f32_are_refused_and_f16_overflow_says_so() {
    // MXFP4: code 254 (2^127) times 2.0 (code 4) is infinite; times 1.5 (code 3) is not.
    let mut blocks = vec![0u8; 16];
    blocks[5] = 0x40;
    refused(
        "t.scale",
        WeightFormat::Mxfp4,
        [1, 1, 32],
        blocks.clone(),
        Scales::E8m0(vec![254]),
        "decodes to infinity",
    );
    blocks[5] = 0x30;
    let ok = PackedMatrix::from_parts(
        "t.weight",
        "t.scale",
        WeightFormat::Mxfp4,
        [1, 1, 32],
        blocks,
        Scales::E8m0(vec![254]),
    )
    .expect("1.5 · 2^127 is finite");
    assert!(ok.dequantize().iter().all(|v| v.is_finite()));
    // int8 and FP8 scales whose largest code would overflow.
    refused(
        "t.scale",
        WeightFormat::Int8,
        [1, 1, 4],
        vec![1; 4],
        Scales::Rows(vec![f32::MAX / 100.0]),
        "past f32's range",
    );
    refused(
        "t.scale",
        WeightFormat::Fp8,
        [1, 1, 4],
        vec![1; 4],
        Scales::Blocks {
            block_rows: 128,
            block_cols: 128,
            values: vec![f32::MAX / 400.0],
        },
        "past f32's range",
    );
    let w = ndarray::Array3::from_elem((1, 1, 2), 70000.0f32);
    let err = PackedMatrix::quantize("big", w.view(), WeightFormat::F16).expect_err("overflow");
    assert!(err.to_string().contains("65504"), "{err}");
}

#[test]
fn negative_scales_are_refused() {
    refused(
        "t.scale",
        WeightFormat::Int8,
        [1, 2, 4],
        vec![1; 8],
        Scales::Rows(vec![0.5, -0.5]),
        "negative",
    );
    refused(
        "t.scale",
        WeightFormat::Fp8,
        [1, 1, 4],
        vec![1; 4],
        Scales::Blocks {
            block_rows: 128,
            block_cols: 128,
            values: vec![-0.01],
        },
        "negative",
    );
}
