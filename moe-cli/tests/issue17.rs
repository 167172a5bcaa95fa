//! End-to-end tests of issue 17's CLI cases (shared cases `fidelity/switch-input-batch` and `reliability/F-*`):
//! each checks the exit code and the message or the right value.

mod common;

use common::{moe, scratch, stderr, stdout};

use std::path::Path;
use std::process::Output;

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

/// A `.npy` file with the raw header text `dict` and `data`.
fn npy(dir: &Path, name: &str, dict: &str, data: &[u8]) -> String {
    let mut h = dict.as_bytes().to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
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

/// F-06: text and `.npy` inputs must be regular files; `/dev/zero` is refused at once.
#[test]
fn f06_unbounded_reads_refused() {
    let o = moe(&["compare", "--config", "/dev/zero", "-t", "64", "--no-layer"]);
    usage_error(&o, &["/dev/zero", "not a regular file"]);
    let d = scratch("f06");
    let link = d.join("zero.npy");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        let o = moe(&["route", "--input", &link.to_string_lossy()]);
        usage_error(&o, &["zero.npy", "not a regular file"]);
    }
}

/// F-08: TOML `nan` / `inf` / `-inf` option values are refused as on the command line.
#[test]
fn f08_toml_non_finite_refused() {
    let d = scratch("f08");
    for v in ["nan", "inf", "-inf"] {
        let p = d.join(format!("cf_{v}.toml"));
        std::fs::write(
            &p,
            format!("[[router]]\nname = \"switch-top1\"\noptions = {{ capacity_factor = {v} }}\n"),
        )
        .expect("write");
        let o = moe(&[
            "compare",
            "--config",
            &p.to_string_lossy(),
            "-t",
            "256",
            "--no-layer",
        ]);
        usage_error(&o, &["capacity_factor", "finite"]);
    }
}

/// F-09: a header numpy refuses (an extra key holding a fake descr) is refused; F-26: messages say what is wrong;
/// F-20: width 0 names the file and tensor; f64 overflow of f32 is reported as such.
#[test]
fn f09_f20_f26_npy_reader_messages() {
    let d = scratch("npy");
    let fake = npy(
        &d,
        "fake_descr.npy",
        "{'note': \"'descr': '<f4', 'fortran_order': False, 'shape': (8, 4)\", 'descr': '<i4', 'fortran_order': False, 'shape': (8, 4), }",
        &[0u8; 128],
    );
    let o = moe(&["route", "--input", &fake]);
    usage_error(&o, &["fake_descr.npy", "exactly the keys"]);
    let magic = d.join("magic_only.npy");
    std::fs::write(&magic, b"\x93NUMPY").expect("write");
    let o = moe(&["route", "--input", &magic.to_string_lossy()]);
    usage_error(&o, &["magic_only.npy", "truncated", "version"]);
    let structured = npy(
        &d,
        "structured.npy",
        "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (8, 2), }",
        &[0u8; 64],
    );
    let o = moe(&["route", "--input", &structured]);
    usage_error(&o, &["structured.npy", "structured dtype"]);
    for shape in ["(8, 0)", "(1000000000000, 0)"] {
        let z = npy(
            &d,
            "zero_d.npy",
            &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
            &[],
        );
        let o = moe(&["route", "--input", &z]);
        usage_error(&o, &["zero_d.npy", "array", "width d is 0"]);
    }
    let big: Vec<u8> = [1e300f64, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f = npy(
        &d,
        "big.npy",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2), }",
        &big,
    );
    let o = moe(&["route", "--input", &f]);
    usage_error(&o, &["big.npy", "overflows float32"]);
}

/// F-17: `list` supports every format it accepts (CSV is one CSV table); `route --per-token --format csv` is
/// refused rather than writing two tables.
#[test]
fn f17_formats_supported_or_refused() {
    let o = moe(&["list", "--format", "markdown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.lines().all(|l| l.starts_with('|')), "{out}");
    let o = moe(&["list", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("kind,name,option,default,detail\n"),
        "{out}"
    );
    assert!(!out.contains("\n\n"), "{out}");
    let o = moe(&[
        "route",
        "-t",
        "8",
        "-d",
        "4",
        "--per-token",
        "--format",
        "csv",
    ]);
    usage_error(&o, &["--per-token", "csv"]);
}

/// F-18: `--plot` draws more than 64 experts (grouped bars above 256).
#[test]
fn f18_plot_any_e() {
    let d = scratch("f18");
    for e in ["128", "1000"] {
        let p = d.join(format!("e{e}.svg"));
        let o = moe(&[
            "compare",
            "-e",
            e,
            "-t",
            "512",
            "-d",
            "8",
            "--no-layer",
            "--routers",
            "softmax-topk",
            "--plot",
            &p.to_string_lossy(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let svg = std::fs::read_to_string(&p).expect("svg");
        let bars = svg.matches("<rect").count() - 1;
        assert!(
            bars >= 128.min(e.parse().expect("e")) && bars <= 256,
            "{bars} bars for E = {e}"
        );
    }
}

/// F-28: a newline (and `|`) in a TOML label is escaped in markdown and table output, quoted in CSV.
#[test]
fn f28_labels_escaped_everywhere() {
    let d = scratch("f28");
    let p = d.join("label.toml");
    std::fs::write(
        &p,
        "[[router]]\nname = \"hash\"\nlabel = \"a|b\\nnew,line\"\n",
    )
    .expect("write");
    let cfg = p.to_string_lossy().into_owned();
    let o = moe(&[
        "compare",
        "--config",
        &cfg,
        "-t",
        "64",
        "--no-layer",
        "--format",
        "markdown",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("a\\|b\\nnew,line"), "{out}");
    let o = moe(&[
        "compare",
        "--config",
        &cfg,
        "-t",
        "64",
        "--no-layer",
        "--format",
        "csv",
    ]);
    assert!(stdout(&o).contains("\"a|b\nnew,line\""), "{}", stdout(&o));
    let o = moe(&["compare", "--config", &cfg, "-t", "64", "--no-layer"]);
    assert!(stdout(&o).contains("a|b\\nnew,line"), "{}", stdout(&o));
}

/// F-19: a NaN in the hidden states is bad input: exit 2, one line naming the token.
#[test]
fn f19_non_finite_input_exits_2() {
    let d = scratch("f19");
    let f = npy(
        &d,
        "nan.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }",
        &f32s([0.0, 1.0, 2.0, f32::NAN, 4.0, 5.0, 6.0, 7.0]),
    );
    let o = moe(&["route", "--input", &f]);
    usage_error(&o, &["NaN", "token 1"]);
}
