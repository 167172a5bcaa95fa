//! End-to-end tests of the `moe` binary: every subcommand and format, and the errors users see.

mod common;

use common::{moe, scratch, stderr, stdout};

use std::process::Command;

#[test]
fn help_and_version() {
    let o = moe(&["--help"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("compare"));
    let o = moe(&["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("moe "), "{}", stdout(&o));
}

#[test]
fn compare_table_lists_every_router() {
    let o = moe(&["compare", "--num-tokens", "256", "--d-model", "32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for name in moe_routers::builtin().names() {
        assert!(out.contains(&name), "{name} missing from\n{out}");
    }
    assert!(out.contains("tokens per expert"));
}

#[test]
fn compare_json_is_typed_and_consistent() {
    let o = moe(&[
        "compare",
        "--num-tokens",
        "300",
        "--d-model",
        "16",
        "--experts",
        "8",
        "--top-k",
        "2",
        "--routers",
        "softmax-topk",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert_eq!(v["workload"]["tokens"], 300);
    let row = &v["rows"][0];
    assert_eq!(row["router"], "softmax-topk");
    // softmax-topk keeps every assignment: 300 tokens x k = 2.
    assert_eq!(row["kept"], 600);
    let loads: Vec<u64> = row["loads"]
        .as_array()
        .expect("loads")
        .iter()
        .map(|x| x.as_u64().expect("count"))
        .collect();
    assert_eq!(loads.len(), 8);
    assert_eq!(loads.iter().sum::<u64>(), 600);
}

#[test]
fn compare_csv_and_markdown() {
    let o = moe(&[
        "compare",
        "--num-tokens",
        "64",
        "--d-model",
        "8",
        "--routers",
        "softmax-topk:preset=olmoe",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("router,min,max"), "{out}");
    // A label with a comma is quoted, one without is not.
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("softmax-topk:preset=olmoe,")),
        "{out}"
    );
    let o = moe(&[
        "compare",
        "--num-tokens",
        "64",
        "--d-model",
        "8",
        "--routers",
        "softmax-topk",
        "--format",
        "markdown",
    ]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("| router | min |"));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    for args in [
        vec!["compare", "--routers", "nope"],
        vec!["compare", "--routers", "softmax-topk:preset=gpt5"],
        vec!["compare", "--routers", "softmax-topk:bogus=1"],
        vec!["compare", "--top-k", "17"],
        vec!["compare", "--num-tokens", "many"],
    ] {
        let o = moe(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?}: {err}"
        );
        assert!(err.starts_with("error"), "{args:?}: {err}");
    }
    let o = moe(&["compare", "--routers", "nope"]);
    assert!(
        stderr(&o).contains("valid routers: softmax-topk"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn list_shows_routers_options_and_backends() {
    let o = moe(&["list"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("softmax-topk"));
    assert!(out.contains("preset (default none)"));
    assert!(out.contains("cpu: available"));
    assert!(out.contains("cuda: unavailable"), "{out}");
    assert!(out.contains("softmax-topk:preset=deepseek_v3"), "{out}");
    assert!(out.contains("hf:gpt_oss"), "{out}");
    let o = moe(&["list", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert!(v["routers"].as_array().is_some_and(|r| !r.is_empty()));
    assert_eq!(v["backends"][0]["name"], "cpu");
    assert_eq!(v["presets"].as_array().map(Vec::len), Some(14));
}

#[test]
fn route_prints_experts_and_tokens() {
    let o = moe(&[
        "route",
        "switch-top1:capacity=fixed,expert_capacity=2",
        "-t",
        "20",
        "-d",
        "8",
        "-e",
        "4",
        "--tokens",
        "--limit",
        "0",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    // A fixed capacity of 2 per expert over 4 experts keeps at most 8 of the 20 tokens.
    assert!(v["diagnostics"]["kept"].as_u64().expect("kept") <= 8);
    assert_eq!(
        v["diagnostics"]["kept"].as_u64().expect("kept")
            + v["diagnostics"]["dropped"].as_u64().expect("dropped"),
        20
    );
    assert_eq!(v["tokens"].as_array().expect("tokens").len(), 20);
    assert_eq!(v["experts"].as_array().expect("experts").len(), 4);
    let o = moe(&["route", "softmax-topk", "-t", "10", "-d", "8", "--tokens"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains("experts (expert:weight)"));
    let o = moe(&["route", "softmax-topk,hash"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bench_reports_throughput() {
    let o = moe(&[
        "bench",
        "-d",
        "32",
        "--ffn",
        "64",
        "-e",
        "4",
        "-k",
        "2",
        "-t",
        "1,7,33",
        "--repeats",
        "2",
        "--threads",
        "1",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert!(r["median_ms"].as_f64().expect("ms") > 0.0);
        assert!(r["gflops"].as_f64().expect("gflops") > 0.0);
    }
    assert_eq!(rows[2]["tokens"], 33);
}

#[test]
fn unavailable_backend_is_a_usage_error() {
    let o = moe(&["bench", "--backend", "cuda", "-t", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cuda"), "{}", stderr(&o));
    let o = moe(&["compare", "--backend", "tpu", "-t", "8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cpu, cuda, wgpu"), "{}", stderr(&o));
}

/// `--dtype`: a name outside f32 / bf16 / f16, 16-bit weights on a backend that runs only f32, and `--threads`
/// off the cpu backend are usage errors that say what to change.
#[test]
fn dtype_and_threads_are_checked() {
    let o = moe(&["bench", "--dtype", "fp4", "-t", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("f32, bf16, f16, int8, fp8, mxfp4"),
        "{}",
        stderr(&o)
    );
    // The cpu backend runs every format; MXFP4 needs widths that are multiples of 32.
    let o = moe(&["bench", "--dtype", "mxfp4", "-d", "40", "-t", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("32"), "{}", stderr(&o));
    let o = moe(&["bench", "--backend", "wgpu", "--threads", "2", "-t", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn plot_and_config_file() {
    let dir = scratch("plot-config");
    let cfg = dir.join("routers.toml");
    std::fs::write(
        &cfg,
        "[[router]]\nname = \"switch-top1\"\nlabel = \"switch cf 2\"\noptions = { capacity_factor = 2.0 }\n\n[[router]]\nname = \"softmax-topk\"\n",
    )
    .expect("write config");
    let svg = dir.join("loads.svg");
    let o = moe(&[
        "compare",
        "--config",
        cfg.to_str().expect("utf-8 path"),
        "-t",
        "128",
        "-d",
        "8",
        "--no-layer",
        "--plot",
        svg.to_str().expect("utf-8 path"),
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["rows"][0]["router"], "switch cf 2");
    assert!(v["rows"][0]["layer_ms"].is_null());
    let text = std::fs::read_to_string(&svg).expect("svg written");
    assert!(
        text.starts_with("<svg")
            && text.contains("switch cf 2")
            && text.trim_end().ends_with("</svg>")
    );
    // A config naming an unknown router is a usage error.
    std::fs::write(&cfg, "[[router]]\nname = \"nope\"\n").expect("write config");
    let o = moe(&["compare", "--config", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(o.status.code(), Some(2));
}

/// A safetensors file written by hand: `hidden_states [t, d]` F32 and `token_ids [t]` I64.
fn safetensors_bytes(t: usize, d: usize) -> Vec<u8> {
    let n = t * d * 4;
    let header = format!(
        r#"{{"hidden_states":{{"dtype":"F32","shape":[{t},{d}],"data_offsets":[0,{n}]}},"token_ids":{{"dtype":"I64","shape":[{t}],"data_offsets":[{n},{}]}}}}"#,
        n + 8 * t
    );
    let mut h = header.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    for i in 0..t * d {
        b.extend_from_slice(&(((i * 7919) % 23) as f32 / 7.0 - 1.5).to_le_bytes());
    }
    for i in 0..t {
        b.extend_from_slice(&((i % 5) as i64).to_le_bytes());
    }
    b
}

#[test]
fn input_files_safetensors_and_npy() {
    let dir = scratch("input-files");
    let st = dir.join("x.safetensors");
    std::fs::write(&st, safetensors_bytes(40, 6)).expect("write");
    let o = moe(&[
        "compare",
        "--input",
        st.to_str().expect("utf-8"),
        "--routers",
        "hash,softmax-topk",
        "-e",
        "4",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["workload"]["tokens"], 40);
    assert_eq!(v["workload"]["d_model"], 6);
    // Token ids are i mod 5; the hash router sends each id to one expert, so all 40 tokens are kept.
    assert_eq!(v["rows"][0]["kept"], 40);
    // A .npy file has no token ids: hash routing says so (exit 2), softmax-topk works.
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    npy.extend_from_slice(&(h.len() as u16).to_le_bytes());
    npy.extend_from_slice(h.as_bytes());
    for v in [1.0f32, 0.0, 0.0, 1.0, 0.5, 0.5] {
        npy.extend_from_slice(&v.to_le_bytes());
    }
    let np = dir.join("x.npy");
    std::fs::write(&np, npy).expect("write");
    let o = moe(&[
        "route",
        "softmax-topk",
        "--input",
        np.to_str().expect("utf-8"),
        "-e",
        "2",
        "-k",
        "1",
        "--tokens",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["tokens"].as_array().expect("tokens").len(), 3);
    let o = moe(&[
        "route",
        "hash",
        "--input",
        np.to_str().expect("utf-8"),
        "-e",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("token ids"), "{}", stderr(&o));
    // Unreadable and truncated files: one line, exit 2.
    let o = moe(&[
        "compare",
        "--input",
        dir.join("missing.safetensors").to_str().expect("utf-8"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    std::fs::write(&st, &safetensors_bytes(40, 6)[..100]).expect("write");
    let o = moe(&["compare", "--input", st.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// A reader that closes the pipe early (`moe compare | head -c 10`) ends `moe` quietly: no panic from `println!`
/// on the closed pipe (it used to exit 101 with "failed printing to stdout").
#[test]
fn closed_output_pipe_is_not_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["compare", "-t", "256", "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the moe binary runs");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("moe ends");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_ne!(o.status.code(), Some(101), "{}", stderr(&o));
}

/// A router that gives tokens a variable number of experts is judged by experts per token: expert choice with a
/// tiny capacity leaves most tokens with none (capacity `C = ceil(T·c/E) = ceil(512·0.01/8) = 1` per expert, so at
/// most 8 of 512 tokens get an expert), which the load columns alone would hide.
#[test]
fn compare_shows_experts_per_token() {
    let o = moe(&[
        "compare",
        "--routers",
        "expert-choice:capacity_factor=0.01,softmax-topk",
        "--num-tokens",
        "512",
        "--d-model",
        "32",
        "--experts",
        "8",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let ec = &v["rows"][0];
    assert_eq!(ec["experts_per_token_min"], 0, "{ec}");
    let none = ec["tokens_without_expert"]
        .as_u64()
        .expect("tokens_without_expert");
    assert!(none >= 512 - 8, "{ec}");
    assert!(ec["experts_per_token_mean"].as_f64().expect("mean") <= 8.0 / 512.0 + 1e-12);
    let topk = &v["rows"][1];
    assert_eq!(topk["experts_per_token_min"], 2, "{topk}");
    assert_eq!(topk["experts_per_token_max"], 2, "{topk}");
    assert_eq!(topk["experts_per_token_mean"], 2.0, "{topk}");
    assert_eq!(topk["tokens_without_expert"], 0, "{topk}");
    let o = moe(&[
        "compare",
        "--routers",
        "softmax-topk",
        "-t",
        "64",
        "--d-model",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("no expert"), "{}", stdout(&o));
}

/// `--cpu-kernels portable` runs the kernels of CPUs without AVX-512 on any machine, and the device line says
/// which kernels ran; a bad name or the option on another backend is a usage error.
#[test]
fn bench_cpu_kernels() {
    let o = moe(&[
        "bench",
        "-d",
        "32",
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
        "--cpu-kernels",
        "portable",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        v["device"]
            .as_str()
            .expect("device")
            .contains("gemm kernels"),
        "{v}"
    );
    let o = moe(&["bench", "--cpu-kernels", "avx9", "-t", "1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("auto, avx2, portable"),
        "{}",
        stderr(&o)
    );
    let o = moe(&[
        "bench",
        "--backend",
        "wgpu",
        "--cpu-kernels",
        "portable",
        "-t",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
