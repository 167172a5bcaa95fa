//! `moe bench --dtype f32,bf16,int8,fp8,mxfp4`: every format's rows with finite figures, the bytes each streams,
//! its accuracy against the f32 layer in a sane order, the routing untouched; bad lists exit 2 with one line.

mod common;

use common::{moe, stderr, stdout};
use serde_json::Value;

/// A small SwiGLU shape (d and f multiples of 32 for MXFP4; one FP8 block column).
const SMALL: &[&str] = &[
    "bench",
    "-d",
    "64",
    "--ffn",
    "128",
    "-e",
    "4",
    "-k",
    "2",
    "-t",
    "1,5",
    "--repeats",
    "2",
    "--threads",
    "1",
];

const ALL: &str = "f32,bf16,int8,fp8,mxfp4";

fn run_json(extra: &[&str]) -> Value {
    let mut args = SMALL.to_vec();
    args.extend(extra);
    args.extend(["--format", "json"]);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("the report is JSON")
}

/// The summary of `dtype`.
fn summary<'a>(v: &'a Value, dtype: &str) -> &'a Value {
    v["dtypes"]
        .as_array()
        .expect("dtypes")
        .iter()
        .find(|s| s["dtype"] == dtype)
        .unwrap_or_else(|| panic!("no summary for {dtype}: {v}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// The largest output error of `dtype` over its rows.
fn output_err(v: &Value, dtype: &str, key: &str) -> f64 {
    v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["dtype"] == dtype)
        .map(|r| num(r, key))
        .fold(0.0, f64::max)
}

#[test]
fn every_dtype_has_its_rows_bytes_and_accuracy() {
    let v = run_json(&["--dtype", ALL]);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 10, "5 dtypes x 2 T: {v}");
    for (i, r) in rows.iter().enumerate() {
        let dtype = ALL.split(',').nth(i / 2).expect("dtype");
        assert_eq!(r["dtype"], dtype, "rows follow the list: {r}");
        assert_eq!(r["tokens"], if i % 2 == 0 { 1 } else { 5 });
        for key in [
            "median_ms",
            "min_ms",
            "tokens_per_s",
            "gflops",
            "weight_gb_per_s",
            "weight_bytes",
            "output_max_rel_err",
            "output_rel_rms",
        ] {
            let x = num(r, key);
            assert!(x.is_finite() && x >= 0.0, "{key} = {x} in {r}");
        }
        assert!(num(r, "median_ms") > 0.0);
        assert_eq!(r["routing_identical"], true, "the router stays f32: {r}");
        // Without --bandwidth there is no floor to judge against.
        assert!(
            r["bandwidth_fraction"].is_null() && r["bound"].is_null(),
            "{r}"
        );
        let per_expert = num(summary(&v, dtype), "bytes_per_expert");
        let hit = r["experts_hit"].as_u64().expect("experts hit") as f64;
        assert_eq!(num(r, "weight_bytes"), hit * per_expert);
    }
    // f32 is the reference: no error at all.
    assert_eq!(output_err(&v, "f32", "output_max_rel_err"), 0.0);
    assert_eq!(output_err(&v, "f32", "output_rel_rms"), 0.0);
    assert_eq!(num(summary(&v, "f32"), "weight_rel_rms"), 0.0);
    assert_eq!(
        num(summary(&v, "f32"), "bytes_per_expert"),
        (3 * 64 * 128 * 4) as f64
    );
    // Bytes: bf16 half of f32; int8 a quarter plus a row scale (4 bytes a row of 64 or 128); fp8 a quarter plus
    // three 128 x 128 block scales; MXFP4 4.25 bits a weight, 17/128 of f32 exactly.
    let ratio = |d: &str| num(summary(&v, d), "bytes_vs_f32");
    assert_eq!(ratio("f32"), 1.0);
    assert_eq!(ratio("bf16"), 0.5);
    let int8 = (3.0 * 64.0 * 128.0 + 4.0 * (2.0 * 128.0 + 64.0)) / (12.0 * 64.0 * 128.0);
    assert!((ratio("int8") - int8).abs() < 1e-12, "{}", ratio("int8"));
    let fp8 = (3.0 * 64.0 * 128.0 + 4.0 * 3.0) / (12.0 * 64.0 * 128.0);
    assert!((ratio("fp8") - fp8).abs() < 1e-12, "{}", ratio("fp8"));
    assert!(
        (ratio("mxfp4") - 17.0 / 128.0).abs() < 1e-12,
        "{}",
        ratio("mxfp4")
    );
    // Accuracy: bf16 (8 significant bits) < int8 (per-row, 255 levels) and fp8 (4 significant bits) < mxfp4.
    let w = |d: &str| num(summary(&v, d), "weight_rel_rms");
    assert!(w("bf16") > 0.0 && w("bf16") < w("int8") && w("bf16") < w("fp8"));
    assert!(w("int8") < w("mxfp4") && w("fp8") < w("mxfp4"));
    assert!(
        w("int8") < 0.02 && w("fp8") < 0.05,
        "8-bit weights within a few %"
    );
    assert!(w("mxfp4") < 0.2, "mxfp4 weights off by {}", w("mxfp4"));
    let y = |d: &str| output_err(&v, d, "output_rel_rms");
    assert!(y("bf16") > 0.0 && y("bf16") < y("int8") && y("bf16") < y("fp8"));
    assert!(y("int8") < y("mxfp4") && y("fp8") < y("mxfp4"));
    // MXFP4's weights are off by about 12 % (E2M1 with one power-of-two scale per 32); two products compound it.
    assert!(y("mxfp4") < 0.5, "mxfp4 output off by {}", y("mxfp4"));
}

#[test]
fn bandwidth_gives_floors_and_a_bound_per_row() {
    let v = run_json(&["--dtype", "f32,mxfp4", "--bandwidth"]);
    let bw = num(&v, "read_bandwidth_gb_per_s");
    assert!(bw > 0.0 && bw.is_finite());
    for s in v["dtypes"].as_array().expect("dtypes") {
        // 256 rows per expert: 256 * E / k tokens.
        assert_eq!(s["compute_probe_tokens"], 512, "{s}");
        let p = num(s, "peak_gflops");
        assert!(p > 0.0 && p.is_finite(), "{s}");
    }
    for r in v["rows"].as_array().expect("rows") {
        let (m, c) = (num(r, "memory_floor_ms"), num(r, "compute_floor_ms"));
        assert!(m > 0.0 && c > 0.0, "{r}");
        assert!((num(r, "memory_floor_ms") - num(r, "weight_bytes") / bw / 1e6).abs() <= 1e-9 * m);
        let frac = num(r, "bandwidth_fraction");
        assert!((frac - num(r, "weight_gb_per_s") / bw).abs() <= 1e-9 * frac.max(1.0));
        let bound = r["bound"].as_str().expect("bound");
        assert_eq!(bound, if m >= c { "memory" } else { "compute" }, "{r}");
    }
}

#[test]
fn gpt_oss_shape_keeps_biases_in_f32() {
    let mut args = vec![
        "bench",
        "--shape",
        "gpt-oss-like",
        "-d",
        "64",
        "--ffn",
        "64",
        "-e",
        "4",
        "-k",
        "2",
        "-t",
        "3",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--dtype",
        "f32,bf16,mxfp4",
        "--format",
        "json",
    ];
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["shape"], "custom");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["routing_identical"] == true));
    // Weights 3 d f, biases 2 f + d stay f32.
    let (w, b) = (3.0 * 64.0 * 64.0, 2.0 * 64.0 + 64.0);
    assert_eq!(num(summary(&v, "f32"), "bytes_per_expert"), 4.0 * (w + b));
    assert_eq!(
        num(summary(&v, "bf16"), "bytes_per_expert"),
        2.0 * w + 4.0 * b
    );
    assert_eq!(
        num(summary(&v, "mxfp4"), "bytes_per_expert"),
        w / 2.0 + w / 32.0 + 4.0 * b
    );
    let y = |d: &str| output_err(&v, d, "output_rel_rms");
    assert!(y("bf16") > 0.0 && y("bf16") < y("mxfp4") && y("mxfp4") < 0.5);
    // The table names every format.
    args.truncate(args.len() - 2);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for d in ["f32", "bf16", "mxfp4", "out rel RMS", "weight rel RMS"] {
        assert!(out.contains(d), "{d} missing from\n{out}");
    }
}

#[test]
fn csv_and_markdown_have_one_line_a_row() {
    for (format, lines) in [("csv", 1 + 4), ("markdown", 2 + 4)] {
        let mut args = SMALL.to_vec();
        args.extend(["--dtype", "bf16,int8", "--format", format]);
        let o = moe(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.lines().count(), lines, "{out}");
        assert!(
            out.lines().next().is_some_and(|h| h.contains("dtype")),
            "{out}"
        );
        assert_eq!(
            out.lines().filter(|l| l.contains("int8")).count(),
            2,
            "{out}"
        );
    }
}

/// Exit code 2 and exactly one line on stderr, starting `error:` and containing `needle`, for `SMALL` and
/// `extra` (a leading `FLAG VALUE` in `extra` whose flag SMALL has replaces SMALL's value).
fn assert_usage(extra: &[&str], needle: &str) {
    let mut args = SMALL.to_vec();
    let mut extra = extra;
    if let [flag, value, rest @ ..] = extra
        && let Some(j) = args.iter().position(|x| x == flag)
    {
        args[j + 1] = value;
        extra = rest;
    }
    args.extend(extra);
    let o = moe(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{extra:?}: {err}");
    assert!(err.starts_with("error:"), "{extra:?}: {err}");
    assert!(err.contains(needle), "{extra:?}: {needle} not in {err}");
    assert!(o.stdout.is_empty(), "{extra:?}: no report on bad input");
}

#[test]
fn bad_lists_exit_2_with_one_line() {
    assert_usage(&["--dtype", "f32,fp9"], "fp9");
    assert_usage(&["--dtype", "f32,,bf16"], "dtype");
    assert_usage(&["--dtype", "bf16,int8,bf16"], "twice");
    assert_usage(&["--dtype", "f32,bf16", "--backward"], "--backward");
    // MXFP4 needs d and f multiples of 32: the upload's error names the tensor.
    assert_usage(&["-d", "48", "--dtype", "f32,mxfp4"], "gate_up");
    assert_usage(&["--ffn", "80", "--dtype", "bf16,mxfp4"], "down");
    // A backend that does not take the format (wgpu: f32 only; without the feature, not built). Without
    // SMALL's `--threads` (a cpu-only flag, refused first on other backends).
    let o = moe(&[
        "bench",
        "-d",
        "64",
        "--ffn",
        "128",
        "-e",
        "4",
        "-k",
        "2",
        "-t",
        "1",
        "--dtype",
        "int8,bf16",
        "--backend",
        "wgpu",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error:") && err.contains("wgpu"), "{err}");
    assert!(o.stdout.is_empty(), "no report on bad input");
}

/// `--bf16-activations`: where the CPU has AVX-512 BF16, the bf16 rows move by the activations' rounding (more
/// than the weights' alone, still small) and every other format's rows stay as they are; elsewhere, and with other
/// kernels or backends, exit 2 with one line naming the option.
#[test]
fn bf16_activations_move_bf16_rows_only_or_are_refused() {
    let avx512bf16 = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512bf16");
    let mut refused = vec![
        vec![
            "--cpu-kernels",
            "avx2",
            "--bf16-activations",
            "--dtype",
            "bf16",
        ],
        vec![
            "--cpu-kernels",
            "portable",
            "--bf16-activations",
            "--dtype",
            "bf16",
        ],
        vec!["--backend", "wgpu", "--bf16-activations", "--dtype", "f32"],
        // Expert parallelism times the f32 layer: the flag is named among those to leave out.
        vec!["--ep-ranks", "2", "--bf16-activations"],
    ];
    if !avx512bf16 {
        refused.push(vec!["--bf16-activations", "--dtype", ALL]);
    }
    for extra in refused {
        let o = moe(&[SMALL, extra.as_slice()].concat());
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        // wgpu: "set only for the cpu backend", or unavailable in a build without it; exit 2 either way.
        if !extra.contains(&"wgpu") {
            let e = stderr(&o);
            assert!(
                e.contains("bf16 activations") || e.contains("--bf16-activations"),
                "{e}"
            );
        }
    }
    if !avx512bf16 {
        return;
    }
    let off = run_json(&["--dtype", ALL]);
    let on = run_json(&["--dtype", ALL, "--bf16-activations"]);
    let (e_off, e_on) = (
        output_err(&off, "bf16", "output_rel_rms"),
        output_err(&on, "bf16", "output_rel_rms"),
    );
    assert!(
        e_on > e_off && e_on < 2e-2,
        "bf16 rel RMS: {e_off:e} off, {e_on:e} on"
    );
    for dtype in ["f32", "int8", "fp8", "mxfp4"] {
        assert_eq!(
            output_err(&off, dtype, "output_rel_rms"),
            output_err(&on, dtype, "output_rel_rms"),
            "{dtype}"
        );
    }
}
