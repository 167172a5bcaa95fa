//! End-to-end tests of issue 17's CLI cases (shared cases `fidelity/switch-input-batch` and `reliability/F-*`):
//! each checks the exit code and the message or the right value.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("the moe binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 2 with exactly one `error:` line on stderr containing every one of `needles`.
fn usage_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "stderr: {err}\nstdout: {}",
        stdout(o)
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-issue17-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A `.npy` file with the raw header text `dict` and `data`.
fn npy(dir: &Path, name: &str, dict: &str, data: &[u8]) -> String {
    let mut h = dict.as_bytes().to_vec();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    let p = dir.join(name);
    std::fs::write(&p, b).expect("write npy");
    p.to_string_lossy().into_owned()
}

fn f32s(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn case_file(case: &str, file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cases")
        .join(case)
        .join(file)
        .to_string_lossy()
        .into_owned()
}

/// Case fidelity/switch-input-batch: `[2, 8, 16]` stays two sequences; capacity 1 per sequence keeps 0, 1, 8, 9.
#[test]
fn switch_input_batch_keeps_sequences() {
    let f = case_file("switch-input-batch", "b2s8.safetensors");
    let o = moe(&[
        "route",
        "switch-top1:capacity=fixed,expert_capacity=1,per_sequence=true",
        "-e",
        "2",
        "-k",
        "1",
        "--input",
        &f,
        "--per-token",
        "--limit",
        "0",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let tokens = v["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), 16);
    let kept: Vec<u64> = tokens
        .iter()
        .filter(|t| !t["experts"].as_array().expect("experts").is_empty())
        .map(|t| t["token"].as_u64().expect("token"))
        .collect();
    assert_eq!(kept, vec![0, 1, 8, 9]);
    assert!(
        !stderr(&o).contains("treated as one sequence"),
        "{}",
        stderr(&o)
    );
}

/// A flat `[T, d]` input with `per_sequence=true` is one sequence, and the CLI says so.
#[test]
fn per_sequence_on_flat_input_says_one_sequence() {
    let d = scratch("flat");
    let f = npy(
        &d,
        "flat.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }",
        &f32s((0..8).map(|i| i as f32)),
    );
    let o = moe(&[
        "route",
        "switch-top1:capacity=fixed,expert_capacity=1,per_sequence=true",
        "-e",
        "2",
        "-k",
        "1",
        "--input",
        &f,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("treated as one sequence"),
        "{}",
        stderr(&o)
    );
}

/// F-03: `--clusters 10000000` is refused before any allocation (compare and bench).
#[test]
fn f03_clusters_bounded() {
    for cmd in ["compare", "bench"] {
        let o = moe(&[cmd, "--clusters", "10000000", "-t", "16"]);
        usage_error(&o, &["--clusters", "10000000"]);
    }
}

/// F-04 and F-16: `--threads 100000` and `--threads 0` are refused.
#[test]
fn f04_f16_threads_bounded() {
    let o = moe(&["bench", "--threads", "100000"]);
    usage_error(&o, &["--threads", "100000"]);
    let o = moe(&["bench", "--threads", "0"]);
    usage_error(&o, &["--threads", "at least 1"]);
}

/// F-05: T·E routing memory and T·d past 2^32 are refused by the estimate, naming the limit.
#[test]
fn f05_memory_estimate() {
    let o = moe(&[
        "route",
        "softmax-topk",
        "-d",
        "1",
        "-e",
        "1048576",
        "-t",
        "65536",
    ]);
    usage_error(&o, &["memory", "routing 4·T·E"]);
    let o = moe(&["route", "-d", "65536", "-t", "65537"]);
    usage_error(&o, &["2^32"]);
    let o = moe(&["route", "-e", "2000000"]);
    usage_error(&o, &["--experts"]);
}

/// F-25: `route --tokens 1000` says where the token count goes.
#[test]
fn f25_tokens_flag_meaning() {
    let o = moe(&["route", "--tokens", "1000"]);
    usage_error(&o, &["-t/--num-tokens", "not a router"]);
}

/// F-24: the default router set runs on a `.npy` input (no token ids) and on a non-square E, with a note.
#[test]
fn f24_default_routers_skip_with_note() {
    let d = scratch("f24");
    let f = npy(
        &d,
        "x.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (8, 4), }",
        &f32s((0..32).map(|i| (i as f32 * 0.37).sin())),
    );
    let o = moe(&["compare", "--input", &f, "--no-layer"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("note: skipping hash"), "{}", stderr(&o));
    let o = moe(&["compare", "-e", "8", "-t", "256", "-d", "16", "--no-layer"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("note: skipping peer"), "{}", stderr(&o));
    // Asked for by name, a router that cannot run fails the command.
    let o = moe(&["compare", "--input", &f, "--no-layer", "--routers", "hash"]);
    usage_error(&o, &["token ids"]);
}

/// F-07: per-token times divide by the tokens of the input file, not `--num-tokens`.
#[test]
fn f07_per_token_time_uses_file_tokens() {
    let d = scratch("f07");
    let f = npy(
        &d,
        "x.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (64, 8), }",
        &f32s((0..512).map(|i| (i as f32 * 0.11).cos())),
    );
    let o = moe(&[
        "compare",
        "--input",
        &f,
        "--routers",
        "softmax-topk",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let row = &v["rows"][0];
    let ms = row["route_ms"].as_f64().expect("route_ms");
    let us = row["route_us_per_token"].as_f64().expect("us");
    assert!(
        (us - ms * 1e3 / 64.0).abs() <= 1e-9 * (1.0 + us),
        "{ms} ms, {us} us/token"
    );
    let lms = row["layer_ms"].as_f64().expect("layer_ms");
    let lus = row["layer_us_per_token"].as_f64().expect("layer us");
    assert!((lus - lms * 1e3 / 64.0).abs() <= 1e-9 * (1.0 + lus));
}
