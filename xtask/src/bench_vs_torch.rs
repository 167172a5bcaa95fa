//! `cargo xtask bench-vs-torch`: our CPU backend and PyTorch's Hugging Face MoE blocks timed on the same machine
//! in one run, interleaved, with the sgemm peak and the memory read bandwidth measured in the same run.
//!
//! PyTorch runs as a worker (`scripts/bench_vs_torch.py --serve`) that answers one JSON request per line, so its
//! import cost is paid once; ours runs as `moe bench --format json` per shape. Each round times every shape on both
//! sides, alternating which goes first; the table reports medians over rounds of the per-round medians.
//!
//! With `--backward`, rows with `T >= 512` also time a training step: ours `moe bench --backward` (`forward_train`
//! then `backward`), PyTorch's the forward with autograd on and `sum(output * cotangent).backward()` through the
//! same HF block (eager and grouped_mm), side by side in the same rounds.
//!
//! `--dtypes bf16,int8` (the default) adds low-precision rows on the shapes' `low_tokens`: ours `moe bench --dtype
//! bf16,int8` (experts packed at upload, router f32) against PyTorch's best bf16 block (the HF block converted to
//! bf16, eager or grouped_mm) and PyTorch's weight-only int8 CPU kernel (`aten._weight_int8pack_mm`, per-row
//! scales, f32 or bf16 activations, the better of the two), with ratio = PyTorch's best ms / ours.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// One benchmark shape: the `moe bench --shape` name, the python block kind, dims and token counts.
struct Shape {
    bench: &'static str,
    block: &'static str,
    d: usize,
    ffn: usize,
    e: usize,
    k: usize,
    tokens: &'static [usize],
    /// Token counts of the low-precision rows (`--dtypes`).
    low_tokens: &'static [usize],
}

const SHAPES: &[Shape] = &[
    Shape {
        bench: "mixtral-like",
        block: "mixtral",
        d: 1024,
        ffn: 3584,
        e: 8,
        k: 2,
        tokens: &[16, 128, 512, 2048],
        low_tokens: &[1, 16, 128],
    },
    Shape {
        bench: "olmoe-like",
        block: "olmoe",
        d: 2048,
        ffn: 1408,
        e: 64,
        k: 6,
        tokens: &[128, 512, 2048],
        low_tokens: &[16, 128],
    },
];

/// Options of the task.
struct Opts {
    threads: usize,
    rounds: usize,
    repeats: usize,
    python: String,
    backward: bool,
    /// Low-precision formats to compare (`bf16`, `int8`); empty: the f32 rows only.
    dtypes: Vec<String>,
}

/// The formats PyTorch runs on a CPU that `--dtypes` takes.
const LOW_DTYPES: &[&str] = &["bf16", "int8"];

/// Rows from this many tokens up also time a training step under `--backward`.
const TRAIN_MIN_TOKENS: usize = 512;

/// Usage of `cargo xtask bench-vs-torch`.
pub(crate) const USAGE: &str = "usage: cargo xtask bench-vs-torch [--threads N] [--rounds N] [--repeats N] [--python PATH] [--backward] [--dtypes bf16,int8|none]\n\ntimes our CPU backend (the release moe binary under CARGO_TARGET_DIR, default target/) and PyTorch's HF blocks side by side; needs python3 with torch (MOE_PYTHON or --python); --backward adds forward+backward rows (T >= 512) against PyTorch autograd; --dtypes (default bf16,int8) adds low-precision rows against PyTorch's bf16 blocks and its int8 weight-only kernel";

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        threads: 2,
        rounds: 3,
        repeats: 5,
        python: std::env::var("MOE_PYTHON").unwrap_or_else(|_| "python3".into()),
        backward: false,
        dtypes: LOW_DTYPES.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--threads" => o.threads = val("--threads")?.parse()?,
            "--rounds" => o.rounds = val("--rounds")?.parse()?,
            "--repeats" => o.repeats = val("--repeats")?.parse()?,
            "--python" => o.python = val("--python")?,
            "--backward" => o.backward = true,
            "--dtypes" => {
                let v = val("--dtypes")?;
                o.dtypes = if v == "none" {
                    Vec::new()
                } else {
                    v.split(',').map(|s| s.trim().to_string()).collect()
                };
                if let Some(bad) = o.dtypes.iter().find(|d| !LOW_DTYPES.contains(&d.as_str())) {
                    bail!(
                        "--dtypes takes bf16, int8 or none (the formats PyTorch runs on a CPU), got {bad}"
                    );
                }
            }
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if o.threads == 0 || o.rounds == 0 || o.repeats == 0 {
        bail!("--threads, --rounds and --repeats must be >= 1");
    }
    Ok(o)
}

/// The PyTorch worker process.
struct Torch {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Torch {
    fn ask(&mut self, req: Value) -> Result<Value> {
        let stdin = self.child.stdin.as_mut().context("worker stdin closed")?;
        writeln!(stdin, "{req}")?;
        stdin.flush()?;
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            bail!("the PyTorch worker exited (request {req})");
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("worker said: {line}"))?;
        if v["ok"] != json!(true) {
            bail!("the PyTorch worker failed: {}", v["error"]);
        }
        Ok(v)
    }
}

/// The median of the finite values (the mean of the middle two for an even count), `None` when there are none.
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Runs the comparison and prints the table.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let probe = Command::new(&o.python)
        .args([
            "-c",
            "import torch, transformers; print(torch.__version__, transformers.__version__)",
        ])
        .output();
    let versions = match probe {
        Ok(p) if p.status.success() => String::from_utf8_lossy(&p.stdout).trim().to_string(),
        _ => bail!(
            "PyTorch and transformers are not importable by `{}`.\n\
             Install them (CPU wheels are enough): `python3 -m venv .venv && .venv/bin/pip install torch transformers`,\n\
             then run `MOE_PYTHON=.venv/bin/python cargo xtask bench-vs-torch` (or pass --python PATH).",
            o.python
        ),
    };
    println!("==> building the moe binary (release)");
    let st = Command::new("cargo")
        .args(["build", "--release", "--locked", "-p", "moe-cli"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("cargo build failed");
    }
    let moe = crate::target_dir(root).join("release/moe");
    let mut child = Command::new(&o.python)
        .arg(root.join("scripts/bench_vs_torch.py"))
        .args(["--serve", "--threads", &o.threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the PyTorch worker")?;
    let out = BufReader::new(child.stdout.take().context("worker stdout")?);
    let mut torch = Torch { child, out };

    let m = measure(&o, &moe, &mut torch)?;
    let _ = torch.child.kill();
    report(root, &o, &versions, &m)
}

/// Every round's figures, per row `(shape index, T)`.
struct Measured {
    rows: Vec<(usize, usize)>,
    ours: Vec<Vec<f64>>,
    eager: Vec<Vec<f64>>,
    grouped: Vec<Vec<f64>>,
    hit: Vec<u64>,
    /// Training steps (forward + backward), per row; empty without `--backward`.
    ours_train: Vec<Vec<f64>>,
    /// Ours: the backward alone over the forward (`backward_over_forward` of `moe bench --backward`).
    ours_bwd_ratio: Vec<Vec<f64>>,
    eager_train: Vec<Vec<f64>>,
    grouped_train: Vec<Vec<f64>>,
    sgemm: Vec<f64>,
    bandwidth: Vec<f64>,
    /// Low-precision rows (`--dtypes`).
    low: Vec<LowRow>,
}

/// One low-precision row: per-round figures of ours and of PyTorch's paths.
struct LowRow {
    shape: usize,
    dtype: String,
    tokens: usize,
    ours: Vec<f64>,
    /// Ours: output relative RMS against our f32 layer (`output_rel_rms`), last round.
    ours_rel_rms: f64,
    /// bf16 rows: ours with `--bf16-activations` (bf16-rounded activations, as PyTorch's bf16 block), per round;
    /// empty where the CPU lacks AVX-512 BF16.
    ours_act16: Vec<f64>,
    /// Its output relative RMS against our f32 layer, last round.
    ours_act16_rel_rms: f64,
    /// PyTorch's paths by name (bf16: `eager`, `grouped_mm`; int8: `int8_f32`, `int8_bf16`), per round.
    torch: Vec<(String, Vec<f64>)>,
    /// int8: PyTorch's kernel against the same loop on dequantised weights (`check_max_rel`), last round.
    torch_check: Option<f64>,
}

/// PyTorch's path names of a low-precision format.
fn torch_paths(dtype: &str) -> &'static [&'static str] {
    if dtype == "int8" {
        &["int8_f32", "int8_bf16"]
    } else {
        &["eager", "grouped_mm"]
    }
}

/// Runs the rounds: each shape timed by PyTorch and by `moe bench`, in alternating order.
fn measure(o: &Opts, moe: &Path, torch: &mut Torch) -> Result<Measured> {
    // Per row (shape, T): per-round figures.
    let rows: Vec<(usize, usize)> = SHAPES
        .iter()
        .enumerate()
        .flat_map(|(si, s)| s.tokens.iter().map(move |&t| (si, t)))
        .collect();
    let mut m = Measured {
        ours: vec![Vec::new(); rows.len()],
        eager: vec![Vec::new(); rows.len()],
        grouped: vec![Vec::new(); rows.len()],
        hit: vec![0u64; rows.len()],
        ours_train: vec![Vec::new(); rows.len()],
        ours_bwd_ratio: vec![Vec::new(); rows.len()],
        eager_train: vec![Vec::new(); rows.len()],
        grouped_train: vec![Vec::new(); rows.len()],
        sgemm: Vec::new(),
        bandwidth: Vec::new(),
        rows: Vec::new(),
        low: low_rows(o),
    };
    for round in 0..o.rounds {
        println!("==> round {} of {}", round + 1, o.rounds);
        m.sgemm.push(
            torch.ask(json!({"op": "sgemm", "repeats": o.repeats.max(15)}))?["gflops"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        for (si, s) in SHAPES.iter().enumerate() {
            let torch_first = (round + si) % 2 == 0;
            for side in 0..2 {
                if (side == 0) == torch_first {
                    for (ri, &(rsi, t)) in rows.iter().enumerate() {
                        if rsi != si {
                            continue;
                        }
                        let v = torch.ask(
                            json!({"op": "block", "block": s.block, "d": s.d, "ffn": s.ffn,
                            "e": s.e, "k": s.k, "t": t, "repeats": o.repeats}),
                        )?;
                        m.eager[ri].push(v["eager"].as_f64().unwrap_or(f64::NAN));
                        m.grouped[ri].push(v["grouped_mm"].as_f64().unwrap_or(f64::NAN));
                        if o.backward && t >= TRAIN_MIN_TOKENS {
                            let v = torch.ask(
                                json!({"op": "block_train", "block": s.block, "d": s.d, "ffn": s.ffn,
                                "e": s.e, "k": s.k, "t": t, "repeats": o.repeats}),
                            )?;
                            m.eager_train[ri].push(v["eager"].as_f64().unwrap_or(f64::NAN));
                            m.grouped_train[ri].push(v["grouped_mm"].as_f64().unwrap_or(f64::NAN));
                        }
                    }
                } else {
                    let ts: Vec<String> = s.tokens.iter().map(|t| t.to_string()).collect();
                    let mut cmd = Command::new(moe);
                    cmd.args(["bench", "--shape", s.bench, "--format", "json", "--threads"])
                        .arg(o.threads.to_string())
                        .args(["--repeats", &o.repeats.to_string(), "-t", &ts.join(",")]);
                    if si == 0 {
                        cmd.arg("--bandwidth");
                    }
                    if o.backward {
                        cmd.arg("--backward");
                    }
                    let p = cmd.output()?;
                    if !p.status.success() {
                        bail!("moe bench failed: {}", String::from_utf8_lossy(&p.stderr));
                    }
                    let v: Value = serde_json::from_slice(&p.stdout)?;
                    if let Some(bw) = v["read_bandwidth_gb_per_s"].as_f64() {
                        m.bandwidth.push(bw);
                    }
                    for r in v["rows"].as_array().into_iter().flatten() {
                        let t = r["tokens"].as_u64().unwrap_or(0) as usize;
                        if let Some(ri) = rows.iter().position(|&(a, b)| a == si && b == t) {
                            m.ours[ri].push(r["median_ms"].as_f64().unwrap_or(f64::NAN));
                            m.hit[ri] = r["experts_hit"].as_u64().unwrap_or(0);
                            if o.backward && t >= TRAIN_MIN_TOKENS {
                                m.ours_train[ri]
                                    .push(r["train_step_median_ms"].as_f64().unwrap_or(f64::NAN));
                                m.ours_bwd_ratio[ri]
                                    .push(r["backward_over_forward"].as_f64().unwrap_or(f64::NAN));
                            }
                        }
                    }
                }
            }
        }
        measure_low(o, moe, torch, round, &mut m.low)?;
    }
    m.rows = rows;
    Ok(m)
}

/// The low-precision rows of `--dtypes`, empty.
fn low_rows(o: &Opts) -> Vec<LowRow> {
    let mut out = Vec::new();
    for (si, s) in SHAPES.iter().enumerate() {
        for dtype in &o.dtypes {
            for &t in s.low_tokens {
                out.push(LowRow {
                    shape: si,
                    dtype: dtype.clone(),
                    tokens: t,
                    ours: Vec::new(),
                    ours_rel_rms: f64::NAN,
                    ours_act16: Vec::new(),
                    ours_act16_rel_rms: f64::NAN,
                    torch: torch_paths(dtype)
                        .iter()
                        .map(|p| (p.to_string(), Vec::new()))
                        .collect(),
                    torch_check: None,
                });
            }
        }
    }
    out
}

/// One round of the low-precision rows: per shape, `moe bench --dtype LIST` and PyTorch's requests, in
/// alternating order.
fn measure_low(
    o: &Opts,
    moe: &Path,
    torch: &mut Torch,
    round: usize,
    low: &mut [LowRow],
) -> Result<()> {
    if o.dtypes.is_empty() {
        return Ok(());
    }
    for (si, s) in SHAPES.iter().enumerate() {
        let torch_first = (round + si) % 2 == 1;
        for side in 0..2 {
            if (side == 0) == torch_first {
                for r in low.iter_mut().filter(|r| r.shape == si) {
                    let mut req = json!({"op": "block", "block": s.block, "d": s.d, "ffn": s.ffn,
                        "e": s.e, "k": s.k, "t": r.tokens, "repeats": o.repeats});
                    if r.dtype == "int8" {
                        req["op"] = json!("block_int8");
                    } else {
                        req["dtype"] = json!(r.dtype);
                    }
                    let v = torch.ask(req)?;
                    for (name, times) in &mut r.torch {
                        times.push(v[name.as_str()].as_f64().unwrap_or(f64::NAN));
                    }
                    r.torch_check = v["check_max_rel"].as_f64().or(r.torch_check);
                }
            } else {
                let ts: Vec<String> = s.low_tokens.iter().map(|t| t.to_string()).collect();
                let run = |dtypes: &str, act16: bool| -> Result<Option<Value>> {
                    let mut c = Command::new(moe);
                    c.args(["bench", "--shape", s.bench, "--format", "json", "--threads"])
                        .arg(o.threads.to_string())
                        .args(["--repeats", &o.repeats.to_string(), "-t", &ts.join(",")])
                        .args(["--dtype", dtypes]);
                    if act16 {
                        c.arg("--bf16-activations");
                    }
                    let p = c.output()?;
                    match p.status.code() {
                        Some(0) => Ok(Some(serde_json::from_slice(&p.stdout)?)),
                        // --bf16-activations on a CPU without AVX-512 BF16: a usage error, the rows stay empty.
                        Some(2) if act16 => Ok(None),
                        _ => bail!(
                            "moe bench --dtype failed: {}",
                            String::from_utf8_lossy(&p.stderr)
                        ),
                    }
                };
                // Each row of a `moe bench --format json` report into its low-precision row: the f32-activation
                // figures, or (`act16`) those with `--bf16-activations`.
                let mut record = |v: &Value, act16: bool| {
                    for row in v["rows"].as_array().into_iter().flatten() {
                        let t = row["tokens"].as_u64().unwrap_or(0) as usize;
                        let dtype = row["dtype"].as_str().unwrap_or("");
                        let Some(r) = low
                            .iter_mut()
                            .find(|r| r.shape == si && r.tokens == t && r.dtype == dtype)
                        else {
                            continue;
                        };
                        let ms = row["median_ms"].as_f64().unwrap_or(f64::NAN);
                        let rms = row["output_rel_rms"].as_f64().unwrap_or(f64::NAN);
                        let (times, rel_rms) = if act16 {
                            (&mut r.ours_act16, &mut r.ours_act16_rel_rms)
                        } else {
                            (&mut r.ours, &mut r.ours_rel_rms)
                        };
                        times.push(ms);
                        *rel_rms = rms;
                    }
                };
                if let Some(v) = run(&format!("f32,{}", o.dtypes.join(",")), false)? {
                    record(&v, false);
                }
                if o.dtypes.iter().any(|d| d == "bf16")
                    && let Some(v) = run("f32,bf16", true)?
                {
                    record(&v, true);
                }
            }
        }
    }
    Ok(())
}

/// Prints the table and writes `bench-vs-torch.json` in the target directory (`CARGO_TARGET_DIR`, default
/// `target/`).
fn report(root: &Path, o: &Opts, versions: &str, m: &Measured) -> Result<()> {
    let (rows, ours, eager, grouped, hit) = (&m.rows, &m.ours, &m.eager, &m.grouped, &m.hit);
    let (sgemm, bandwidth) = (&m.sgemm, &m.bandwidth);
    // A peak: the best of the rounds' medians (torch.mm's rate moves a lot between rounds on a shared machine).
    let peak = sgemm
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f64::NAN, f64::max);
    let bw = median(bandwidth.clone()).unwrap_or(f64::NAN);
    println!();
    println!(
        "PyTorch {versions} vs moe-rs CPU backend, {} threads, f32, median of {} rounds x {} runs, interleaved",
        o.threads, o.rounds, o.repeats
    );
    println!(
        "sgemm peak (torch.mm (2048x1024)@(1024x3584), best of the rounds' medians), same run: {peak:.1} GFLOP/s \
         (rounds: {})",
        sgemm
            .iter()
            .map(|g| format!("{g:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("memory read bandwidth (1 GiB read-only pass), same run: {bw:.1} GB/s");
    println!();
    println!(
        "| block | T | ours ms | eager ms | grouped_mm ms | ratio (torch best / ours) | ours GFLOP/s | % of sgemm peak | weights GB/s | % of bandwidth |"
    );
    println!("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |");
    let mut report = Vec::new();
    for (ri, &(si, t)) in rows.iter().enumerate() {
        let s = &SHAPES[si];
        let our = median(ours[ri].clone()).unwrap_or(f64::NAN);
        let ea = median(eager[ri].clone());
        let gr = median(grouped[ri].clone());
        let best = [ea, gr].into_iter().flatten().fold(f64::INFINITY, f64::min);
        let flops = 2.0 * t as f64 * s.k as f64 * 3.0 * (s.d * s.ffn) as f64;
        let gf = flops / our / 1e6;
        let gbs = hit[ri] as f64 * 3.0 * (s.d * s.ffn) as f64 * 4.0 / our / 1e6;
        let f = |v: Option<f64>| v.map_or("n/a".into(), |x| format!("{x:.1}"));
        println!(
            "| {} | {t} | {our:.1} | {} | {} | {:.2} | {gf:.1} | {:.0} % | {gbs:.1} | {:.0} % |",
            s.bench,
            f(ea),
            f(gr),
            best / our,
            100.0 * gf / peak,
            100.0 * gbs / bw
        );
        report.push(json!({"shape": s.bench, "tokens": t, "ours_ms": our, "eager_ms": ea, "grouped_mm_ms": gr,
            "ratio": best / our, "gflops": gf, "peak_fraction": gf / peak, "weights_gb_per_s": gbs,
            "bandwidth_fraction": gbs / bw, "rounds": {"ours": ours[ri], "eager": eager[ri], "grouped_mm": grouped[ri]}}));
    }
    let train = if o.backward {
        train_table(m)
    } else {
        Vec::new()
    };
    let low = low_table(m);
    let dir = crate::target_dir(root);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench-vs-torch.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &json!({"torch": versions, "threads": o.threads, "rounds": o.rounds,
            "repeats": o.repeats, "sgemm_gflops": sgemm, "bandwidth_gb_per_s": bandwidth, "rows": report, "train_rows": train, "lowprec_rows": low}),
        )?,
    )?;
    println!("\n(all figures: {})", path.display());
    Ok(())
}

/// Prints the low-precision table (`--dtypes`) and returns its rows for the JSON file.
fn low_table(m: &Measured) -> Vec<Value> {
    if m.low.is_empty() {
        return Vec::new();
    }
    println!();
    println!(
        "Low-precision experts (ours: moe bench --dtype, packed at upload, router f32; PyTorch bf16: the HF block in \
         bf16, eager / grouped_mm; PyTorch int8: aten._weight_int8pack_mm per expert, f32 / bf16 activations)"
    );
    println!(
        "| block | dtype | T | ours ms | PyTorch ms (per path) | ratio (torch best / ours) | ours out rel RMS vs f32 | ours bf16 act. ms | ratio (bf16 act.) | bf16 act. rel RMS vs f32 | torch int8 check |"
    );
    println!("| --- | --- | --: | --: | --- | --: | --: | --: | --: | --: | --: |");
    let mut out = Vec::new();
    for r in &m.low {
        let s = &SHAPES[r.shape];
        let our = median(r.ours.clone()).unwrap_or(f64::NAN);
        let paths: Vec<(&str, Option<f64>)> = r
            .torch
            .iter()
            .map(|(n, v)| (n.as_str(), median(v.clone())))
            .collect();
        let best = paths
            .iter()
            .filter_map(|p| p.1)
            .fold(f64::INFINITY, f64::min);
        let shown = paths
            .iter()
            .map(|(n, v)| format!("{n} {}", v.map_or("n/a".into(), |x| format!("{x:.1}"))))
            .collect::<Vec<_>>()
            .join(", ");
        let act16 = median(r.ours_act16.clone());
        println!(
            "| {} | {} | {} | {our:.2} | {shown} | {:.2} | {:.1e} | {} | {} | {} | {} |",
            s.bench,
            r.dtype,
            r.tokens,
            best / our,
            r.ours_rel_rms,
            act16.map_or("-".into(), |x| format!("{x:.2}")),
            act16.map_or("-".into(), |x| format!("{:.2}", best / x)),
            act16.map_or("-".into(), |_| format!("{:.1e}", r.ours_act16_rel_rms)),
            r.torch_check.map_or("-".into(), |c| format!("{c:.1e}")),
        );
        out.push(json!({"shape": s.bench, "dtype": r.dtype, "tokens": r.tokens, "ours_ms": our,
            "torch_ms": paths.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "ratio": best / our, "ours_output_rel_rms": r.ours_rel_rms, "torch_int8_check_max_rel": r.torch_check,
            "ours_bf16_activations_ms": act16, "ratio_bf16_activations": act16.map(|x| best / x),
            "ours_bf16_activations_output_rel_rms": act16.map(|_| r.ours_act16_rel_rms),
            "rounds": {"ours": r.ours, "ours_bf16_activations": r.ours_act16, "torch": r.torch.iter().map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>()}}));
    }
    out
}

/// Prints the forward+backward table (`--backward`) and returns its rows for the JSON file.
fn train_table(m: &Measured) -> Vec<Value> {
    println!();
    println!(
        "Training step (forward + backward; ours: forward_train + backward, PyTorch: autograd through the HF block)"
    );
    println!(
        "| block | T | ours fwd ms | ours fwd+bwd ms | eager fwd+bwd ms | grouped_mm fwd+bwd ms | ratio (torch best / ours) | ours bwd / fwd |"
    );
    println!("| --- | --: | --: | --: | --: | --: | --: | --: |");
    let mut out = Vec::new();
    for (ri, &(si, t)) in m.rows.iter().enumerate() {
        if t < TRAIN_MIN_TOKENS {
            continue;
        }
        let s = &SHAPES[si];
        let fwd = median(m.ours[ri].clone()).unwrap_or(f64::NAN);
        let our = median(m.ours_train[ri].clone()).unwrap_or(f64::NAN);
        let ea = median(m.eager_train[ri].clone());
        let gr = median(m.grouped_train[ri].clone());
        let best = [ea, gr].into_iter().flatten().fold(f64::INFINITY, f64::min);
        let bwd = median(m.ours_bwd_ratio[ri].clone()).unwrap_or(f64::NAN);
        let f = |v: Option<f64>| v.map_or("n/a".into(), |x| format!("{x:.1}"));
        println!(
            "| {} | {t} | {fwd:.1} | {our:.1} | {} | {} | {:.2} | {bwd:.2} |",
            s.bench,
            f(ea),
            f(gr),
            best / our,
        );
        out.push(json!({"shape": s.bench, "tokens": t, "ours_forward_ms": fwd, "ours_train_ms": our,
            "eager_train_ms": ea, "grouped_mm_train_ms": gr, "ratio": best / our, "ours_backward_over_forward": bwd,
            "rounds": {"ours": m.ours_train[ri], "eager": m.eager_train[ri], "grouped_mm": m.grouped_train[ri]}}));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{LOW_DTYPES, Opts, SHAPES, low_rows, median, parse};

    #[test]
    fn low_precision_rows_cover_every_shape_dtype_and_t() {
        let o: Opts = parse(&[]).expect("defaults");
        assert_eq!(o.dtypes, LOW_DTYPES);
        let rows = low_rows(&o);
        let per_shape: usize = SHAPES.iter().map(|s| s.low_tokens.len()).sum();
        assert_eq!(rows.len(), per_shape * LOW_DTYPES.len());
        for r in &rows {
            let paths: Vec<&str> = r.torch.iter().map(|(n, _)| n.as_str()).collect();
            let want: &[&str] = if r.dtype == "int8" {
                &["int8_f32", "int8_bf16"]
            } else {
                &["eager", "grouped_mm"]
            };
            assert_eq!(paths, want);
            assert!(SHAPES[r.shape].low_tokens.contains(&r.tokens));
        }
        let none = parse(&["--dtypes".into(), "none".into()]).expect("none");
        assert!(low_rows(&none).is_empty());
        assert!(parse(&["--dtypes".into(), "fp8".into()]).is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![636.8, 348.0]), Some(492.4));
        assert_eq!(median(vec![f64::NAN, 1.0]), Some(1.0));
        assert_eq!(median(vec![]), None);
    }
}
