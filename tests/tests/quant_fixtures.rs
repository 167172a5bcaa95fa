//! Packed low-precision experts against transformers' own code (tests/fixtures/quant, written by
//! `scripts/gen_quant_fixtures.py`): our MXFP4 and FP8 decoding is bit-exact against transformers'
//! dequantisation, and the GPT-OSS MXFP4 and DeepSeek-V3 FP8 blocks match transformers' forward at 1e-5.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::quant::{PackedBank, PackedFamily, PackedMatrix, Scales, WeightFormat};
use moe_core::{Backend, ExpertBank, MoeLayer, RouterInput};
use moe_routers::{SoftmaxTopK, SoftmaxTopKConfig, TopKPreset};
use moe_verify::{self as verify, TOLERANCE};
use ndarray::{Array1, Array2, Array3};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quant")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture file")
}

/// A tensor's raw bytes, checked to be of `dtype` and `shape`.
fn raw<'a>(st: &'a SafeTensors<'a>, name: &str, dtype: Dtype, shape: &[usize]) -> &'a [u8] {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), dtype, "{name} dtype");
    assert_eq!(t.shape(), shape, "{name} shape");
    t.data()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn shape_of(st: &SafeTensors<'_>, name: &str) -> Vec<usize> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .shape()
        .to_vec()
}

/// An MXFP4 matrix `[E, R, C]` from GPT-OSS-style `blocks [E, R, C/32, 16]` and `scales [E, R, C/32]`.
fn mxfp4(st: &SafeTensors<'_>, blocks: &str, scales: &str) -> PackedMatrix {
    let s = shape_of(st, blocks);
    let [e, r, g, sixteen] = s[..] else {
        panic!("{blocks}: rank {}", s.len())
    };
    assert_eq!(sixteen, 16);
    let data = raw(st, blocks, Dtype::U8, &[e, r, g, 16]).to_vec();
    let sc = raw(st, scales, Dtype::U8, &[e, r, g]).to_vec();
    PackedMatrix::from_parts(
        blocks,
        scales,
        WeightFormat::Mxfp4,
        [e, r, g * 32],
        data,
        Scales::E8m0(sc),
    )
    .expect("valid MXFP4 tensors")
}

/// An FP8 matrix from `weight [.., R, C]` (F8_E4M3, rank 2 or 3) and `weight_scale_inv [.., ⌈R/128⌉, ⌈C/128⌉]`.
fn fp8(st: &SafeTensors<'_>, weight: &str, scale: &str) -> PackedMatrix {
    let s = shape_of(st, weight);
    let dims = match s[..] {
        [e, r, c] => [e, r, c],
        [r, c] => [1, r, c],
        _ => panic!("{weight}: rank {}", s.len()),
    };
    let [_, r, c] = dims;
    let grid = shape_of(st, scale);
    assert_eq!(grid.len(), s.len(), "{scale} rank");
    let n = grid.len();
    assert_eq!(
        grid[n - 2..],
        [r.div_ceil(128), c.div_ceil(128)],
        "{scale} grid"
    );
    let data = raw(st, weight, Dtype::F8_E4M3, &s).to_vec();
    let values = f32s(raw(st, scale, Dtype::F32, &grid));
    PackedMatrix::from_parts(
        weight,
        scale,
        WeightFormat::Fp8,
        dims,
        data,
        Scales::Blocks {
            block_rows: 128,
            block_cols: 128,
            values,
        },
    )
    .expect("valid FP8 tensors")
}

/// (a) transformers' `convert_moe_packed_tensors` returns `[E, C, R]` (the unpacked `[E, R, C]` transposed): our
/// decode equals its f32 output bit for bit. Every MXFP4 value (a 2-bit significand times a power of two) is a
/// bf16 value, so its default bf16 output, widened, is the same bits too. Where transformers decodes scale code
/// 254 times a magnitude of 2 or more to infinity, we refuse the tensor (naming the block): the comparison runs on
/// the file with those codes' magnitude bit cleared, skipping exactly those values.
#[test]
fn mxfp4_dequant_is_bit_exact_against_transformers() {
    let bytes = read("mxfp4_dequant.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let s = shape_of(&st, "blocks");
    let [e, r, g] = [s[0], s[1], s[2]];
    let mut data = raw(&st, "blocks", Dtype::U8, &[e, r, g, 16]).to_vec();
    let codes = raw(&st, "scales", Dtype::U8, &[e, r, g]).to_vec();
    let refused = PackedMatrix::from_parts(
        "blocks",
        "scales",
        WeightFormat::Mxfp4,
        [e, r, g * 32],
        data.clone(),
        Scales::E8m0(codes.clone()),
    )
    .expect_err("code 254 times 2 or more decodes to infinity");
    assert!(
        refused.to_string().contains("scales") && refused.to_string().contains("infinity"),
        "{refused}"
    );
    // Clear the magnitude bit 2 (values 2..6 become 0..1.5) of every code in a block of scale 254.
    let mut skipped = std::collections::HashSet::new();
    for (block, &code) in codes.iter().enumerate() {
        if code == 254 {
            for (i, b) in data[block * 16..(block + 1) * 16].iter_mut().enumerate() {
                let col = (block % g) * 32 + 2 * i;
                let row = block / g;
                if *b & 0x04 != 0 {
                    skipped.insert((row, col));
                }
                if *b & 0x40 != 0 {
                    skipped.insert((row, col + 1));
                }
                *b &= 0xBB;
            }
        }
    }
    assert!(
        !skipped.is_empty(),
        "no overflow of scale code 254 in the file"
    );
    let m = PackedMatrix::from_parts(
        "blocks",
        "scales",
        WeightFormat::Mxfp4,
        [e, r, g * 32],
        data,
        Scales::E8m0(codes),
    )
    .expect("valid MXFP4 tensors");
    let [e, r, c] = m.dims();
    let ours = m.dequantize();
    let want32 = f32s(raw(&st, "ref.dequant_f32", Dtype::F32, &[e, c, r]));
    let want16 = f32s(raw(&st, "ref.dequant_bf16", Dtype::F32, &[e, c, r]));
    let (mut n, mut inf) = (0usize, 0usize);
    for ((ei, ri, ci), &v) in ours.indexed_iter() {
        let i = (ei * c + ci) * r + ri;
        if skipped.contains(&(ei * r + ri, ci)) {
            assert!(
                want32[i].is_infinite(),
                "transformers overflows at [{ei}, {ri}, {ci}]"
            );
            inf += 1;
            continue;
        }
        assert_eq!(
            v.to_bits(),
            want32[i].to_bits(),
            "f32 at [{ei}, {ri}, {ci}]: ours {v:e}, transformers {:e}",
            want32[i]
        );
        assert_eq!(
            half::bf16::from_f32(v).to_f32().to_bits(),
            want16[i].to_bits(),
            "bf16 at [{ei}, {ri}, {ci}]"
        );
        assert_eq!(
            v.to_bits(),
            want16[i].to_bits(),
            "bf16 exact at [{ei}, {ri}, {ci}]"
        );
        assert!(v.is_finite());
        n += 1;
    }
    assert_eq!(n + inf, e * r * c);
    // The file covers what it says: every scale code asked for, every nibble, and the overflow of code 254.
    let Scales::E8m0(codes) = m.scales() else {
        panic!("E8M0 scales")
    };
    for code in [0u8, 1, 126, 127, 128, 254] {
        assert!(codes.contains(&code), "scale code {code} missing");
    }
    for nib in 0..16u8 {
        assert!(m.data().iter().any(|b| b & 0xF == nib), "low nibble {nib}");
        assert!(m.data().iter().any(|b| b >> 4 == nib), "high nibble {nib}");
    }
    assert_eq!(inf, skipped.len());
}

/// (b) transformers' `_dequantize_fp8_weight(w, s, [128, 128], float32)` on a weight with partial blocks and one
/// of whole blocks: our decode is bit-exact (`e4m3(q) · s`, one f32 rounding) and every non-NaN code occurs.
#[test]
fn fp8_dequant_is_bit_exact_against_transformers() {
    let bytes = read("fp8_dequant.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    for name in ["partial", "full"] {
        let m = fp8(
            &st,
            &format!("{name}.weight"),
            &format!("{name}.weight_scale_inv"),
        );
        let [e, r, c] = m.dims();
        let want = f32s(raw(
            &st,
            &format!("ref.{name}.dequant"),
            Dtype::F32,
            &[e, r, c],
        ));
        let ours = m.dequantize();
        let ours = ours.as_slice().expect("standard layout");
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name} at {i}: ours {a:e}, transformers {b:e}"
            );
        }
        let codes: std::collections::BTreeSet<u8> = m.data().iter().copied().collect();
        assert_eq!(codes.len(), 254, "{name}: every non-NaN E4M3 code");
    }
    // The partial weight really has partial blocks, the full one does not.
    assert_eq!(shape_of(&st, "partial.weight")[1] % 128, 8);
    assert_eq!(shape_of(&st, "full.weight")[1] % 128, 0);
}

/// (c) `moe verify tests/fixtures/quant`: both blocks load packed and pass at 1e-5. Needs the loader that reads
/// packed checkpoint tensors (GPT-OSS `*_blocks` / `*_scales`, DeepSeek-V3 `weight` + `weight_scale_inv`).
#[test]
fn verify_dir_passes_the_packed_blocks() {
    let reports = verify::verify_dir(fixtures(), &CpuBackend::new()).expect("manifest reads");
    assert_eq!(reports.len(), 2);
    // The verifier loads the experts as the file holds them: packed, in the file's format (the packed kernels are
    // what this compares with transformers).
    let manifest = moe_models::fixture::Manifest::read(&fixtures()).expect("manifest");
    for (case, want) in manifest
        .cases
        .iter()
        .zip([WeightFormat::Mxfp4, WeightFormat::Fp8])
    {
        let fx = moe_models::fixture::FixtureCase::load_with(
            &fixtures(),
            case,
            moe_models::ExpertWeights::Checkpoint,
        )
        .expect("case loads");
        match fx.layer.experts() {
            moe_core::ExpertBank::Packed(b) => assert_eq!(b.format(), want, "{}", case.name),
            other => panic!("{}: a {} bank, not packed", case.name, other.kind()),
        }
    }
    for rep in &reports {
        assert!(rep.passed, "{rep:#?}");
        assert!(rep.max_rel_err() <= TOLERANCE, "{rep:#?}");
        for must in ["output", "topk_indices", "router_logits"] {
            assert!(
                rep.quantities.iter().any(|q| q.name == must),
                "{}: {must} not compared",
                rep.name
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Independent of the packed loader: each block case rewritten as an f32 golden fixture whose expert weights are
// OUR decode of the packed tensors, run through the existing f32 loader and verifier.

/// Tensors to write: name, dtype, shape, little-endian bytes.
type Raw = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// A fresh, unique temporary directory, removed when dropped.
fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("moe-quant-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

fn push_f32(out: &mut Raw, name: &str, shape: &[usize], v: impl IntoIterator<Item = f32>) {
    out.push((name.into(), Dtype::F32, shape.to_vec(), f32_bytes(v)));
}

/// Copies `names` (and every `ref.*` tensor) unchanged.
fn copy_tensors(st: &SafeTensors<'_>, names: &[&str], out: &mut Raw) {
    for (name, t) in st.tensors() {
        if names.contains(&name.as_str()) || name.starts_with("ref.") {
            out.push((name, t.dtype(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
}

/// Writes `tensors` as `dir/{case}.safetensors` and a one-case manifest with the quant manifest's entry for
/// `case`, its `routing` without `quantization_config`; runs the verifier and asserts every quantity passes.
fn verify_as_f32(case: &str, tensors: &Raw) {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest");
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("manifest parses");
    let mut entry = manifest["cases"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == case))
        .unwrap_or_else(|| panic!("case {case} in the manifest"))
        .clone();
    let routing = entry["routing"].as_object_mut().expect("routing");
    assert!(
        routing.remove("quantization_config").is_some(),
        "{case}: routing names its quantization_config"
    );
    let obj = entry.as_object_mut().expect("case object");
    obj.remove("bytes");
    obj.remove("sha256");
    let dir_guard = temp_dir(case);
    let dir = dir_guard.path();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(
        views,
        None,
        &dir.join(entry["file"].as_str().expect("file")),
    )
    .expect("write");
    let m = serde_json::json!({ "cases": [entry] });
    std::fs::write(dir.join("manifest.json"), m.to_string()).expect("write manifest");
    let reports = verify::verify_dir(dir, &CpuBackend::new()).expect("verify");
    assert_eq!(reports.len(), 1);
    let rep = &reports[0];
    eprintln!("{case} decoded by us: max rel err {:e}", rep.max_rel_err());
    assert!(rep.passed, "{rep:#?}");
    assert!(rep.max_rel_err() <= TOLERANCE, "{rep:#?}");
    for must in ["output", "topk_indices", "router_logits"] {
        assert!(
            rep.quantities.iter().any(|q| q.name == must),
            "{case}: {must} not compared"
        );
    }
}

/// `[E, R, C]` → `[E, C, R]` (GPT-OSS's `x · W` layout), flattened.
fn transposed(a: &Array3<f32>) -> Vec<f32> {
    a.view()
        .permuted_axes([0, 2, 1])
        .as_standard_layout()
        .iter()
        .copied()
        .collect()
}

/// GPT-OSS MXFP4: our decode of the blocks, written in GptOssMLP's f32 names, passes the f32 verifier at 1e-5
/// against transformers' forward on ITS decode: the fixture and our decode agree now, before the packed loader.
#[test]
fn gpt_oss_mxfp4_decoded_by_us_matches_transformers() {
    let bytes = read("gpt_oss_mxfp4.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let up = mxfp4(
        &st,
        "experts.gate_up_proj_blocks",
        "experts.gate_up_proj_scales",
    );
    let down = mxfp4(&st, "experts.down_proj_blocks", "experts.down_proj_scales");
    let ([e, u, d], [_, _, f]) = (up.dims(), down.dims());
    let mut out = Raw::new();
    push_f32(
        &mut out,
        "experts.gate_up_proj",
        &[e, d, u],
        transposed(&up.dequantize()),
    );
    push_f32(
        &mut out,
        "experts.down_proj",
        &[e, f, d],
        transposed(&down.dequantize()),
    );
    copy_tensors(
        &st,
        &[
            "router.weight",
            "router.bias",
            "experts.gate_up_proj_bias",
            "experts.down_proj_bias",
        ],
        &mut out,
    );
    verify_as_f32("gpt_oss_mxfp4", &out);
}

/// DeepSeek-V3 FP8: our decode of every per-expert and shared FP8 linear, merged into DeepseekV3MoE's fused f32
/// names (gate rows then up rows), passes the f32 verifier at 1e-5 (output, routed and shared outputs, routing).
#[test]
fn deepseek_v3_fp8_decoded_by_us_matches_transformers() {
    let bytes = read("deepseek_v3_fp8.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let dec = |p: &str| {
        fp8(
            &st,
            &format!("{p}.weight"),
            &format!("{p}.weight_scale_inv"),
        )
        .dequantize()
    };
    let n_experts = (0..)
        .take_while(|e| st.tensor(&format!("experts.{e}.gate_proj.weight")).is_ok())
        .count();
    assert!(n_experts >= 4);
    let mut gate_up = Vec::new();
    let mut down = Vec::new();
    let (mut f, mut d) = (0, 0);
    for e in 0..n_experts {
        let (g, u, dn) = (
            dec(&format!("experts.{e}.gate_proj")),
            dec(&format!("experts.{e}.up_proj")),
            dec(&format!("experts.{e}.down_proj")),
        );
        (_, f, d) = g.dim();
        gate_up.extend(g.iter().chain(u.iter()).copied());
        down.extend(dn.iter().copied());
    }
    let mut out = Raw::new();
    push_f32(
        &mut out,
        "experts.gate_up_proj",
        &[n_experts, 2 * f, d],
        gate_up,
    );
    push_f32(&mut out, "experts.down_proj", &[n_experts, d, f], down);
    for p in ["gate_proj", "up_proj", "down_proj"] {
        let w = dec(&format!("shared_experts.{p}"));
        let (_, r, c) = w.dim();
        push_f32(
            &mut out,
            &format!("shared_experts.{p}.weight"),
            &[r, c],
            w.iter().copied(),
        );
    }
    copy_tensors(
        &st,
        &["gate.weight", "gate.e_score_correction_bias"],
        &mut out,
    );
    verify_as_f32("deepseek_v3_fp8", &out);
}

/// The GPT-OSS case built by hand with the core API: [`PackedBank::new`] on the packed tensors (rows interleaved as
/// in the checkpoint, no transposition) and GPT-OSS's router (top-k of `x · Wᵀ + b`, softmax over the k). Returns
/// the bank, the layer's router, `ref.input` as `[T, d]` and `ref.output` flattened.
fn gpt_oss_by_hand() -> (PackedBank, SoftmaxTopK, Array2<f32>, Vec<f32>) {
    let bytes = read("gpt_oss_mxfp4.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let up = mxfp4(
        &st,
        "experts.gate_up_proj_blocks",
        "experts.gate_up_proj_scales",
    );
    let down = mxfp4(&st, "experts.down_proj_blocks", "experts.down_proj_scales");
    let [e, u, d] = up.dims();
    let mat = |name: &str, rows: usize, cols: usize| {
        Array2::from_shape_vec(
            (rows, cols),
            f32s(raw(&st, name, Dtype::F32, &[rows, cols])),
        )
        .expect("shape")
    };
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest"),
    )
    .expect("parses");
    let case = &manifest["cases"][0];
    assert_eq!(case["name"], "gpt_oss_mxfp4");
    let r = &case["routing"];
    let (alpha, limit) = (
        r["swiglu_alpha"].as_f64().expect("alpha") as f32,
        r["swiglu_limit"].as_f64().expect("limit") as f32,
    );
    let k = r["top_k"].as_u64().expect("top_k") as usize;
    let bank = PackedBank::new(
        PackedFamily::GptOss { alpha, limit },
        up,
        Some(mat("experts.gate_up_proj_bias", e, u)),
        down,
        Some(mat("experts.down_proj_bias", e, d)),
    )
    .expect("packed bank");
    assert_eq!(bank.format(), WeightFormat::Mxfp4);
    let router = SoftmaxTopKConfig {
        preset: Some(TopKPreset::Granite),
        k: Some(k),
        ..Default::default()
    }
    .build(mat("router.weight", e, d), k)
    .expect("router")
    .with_gate_bias(Array1::from(f32s(raw(
        &st,
        "router.bias",
        Dtype::F32,
        &[e],
    ))))
    .expect("bias");
    let input = f32s(raw(
        &st,
        "ref.input",
        Dtype::F32,
        &shape_of(&st, "ref.input"),
    ));
    let x = Array2::from_shape_vec((input.len() / d, d), input).expect("input");
    let want = f32s(raw(
        &st,
        "ref.output",
        Dtype::F32,
        &shape_of(&st, "ref.output"),
    ));
    (bank, router, x, want)
}

fn forward(router: SoftmaxTopK, bank: ExpertBank, x: &Array2<f32>) -> Array2<f32> {
    let layer = MoeLayer::new(Box::new(router), bank).expect("layer");
    let mut dev = CpuBackend::new().upload(Arc::new(layer)).expect("upload");
    dev.forward(&RouterInput::new(x.view()))
        .expect("forward")
        .output
}

/// The hand-built GPT-OSS layer with [`PackedBank::dequantize`]'s f32 bank: the CPU forward matches
/// transformers' `ref.output` at 1e-5.
#[test]
fn gpt_oss_mxfp4_dequantised_bank_by_hand() {
    let (bank, router, x, want) = gpt_oss_by_hand();
    let out = forward(router, bank.dequantize().expect("dequantize"), &x);
    let err = verify::rel_err(out.iter().copied(), &want);
    eprintln!("dequantised bank by hand: rel err {err:e}");
    assert!(err <= TOLERANCE, "dequantised bank: rel err {err:e}");
}

/// The same layer with the bank kept packed (`ExpertBank::Packed`), run by the CPU backend's packed kernels:
/// the output matches `ref.output` at 1e-5. Needs the CPU backend to run packed banks.
#[test]
fn gpt_oss_mxfp4_packed_bank_by_hand() {
    let (bank, router, x, want) = gpt_oss_by_hand();
    let out = forward(router, ExpertBank::Packed(bank), &x);
    let err = verify::rel_err(out.iter().copied(), &want);
    assert!(err <= TOLERANCE, "packed bank: rel err {err:e}");
}
