//! `cargo xtask bench-train-vs-torch`: training throughput of `moe train` (the charlm language model) side by side
//! with the PyTorch reference of the same model (`scripts/train_reference.py --bench`), on the same threads, in
//! one run on this machine.
//!
//! Both sides train the same model (d 128, 4 layers, 4 heads, context 64, batch 12; MoE: 8 experts, top-2, expert
//! width 256, MLP bank; dense: one expert of width 512, equal active parameters) on windows of the same byte file
//! (written to `target/bench-train-corpus.txt` unless `--corpus` names one), for `--steps` steps of which the
//! first `--warmup` are not timed:
//! - PyTorch times every step after the warm-up itself (one process per router and round; import and set-up are
//!   outside the timing).
//! - `moe train --format json` reports `tokens_per_s` over all of a run's training steps (evaluations excluded).
//!   To leave out the warm-up, each round runs it twice, the full run (`--steps S`) and its first `W` steps
//!   (`--steps S --stop-after W`, same schedule), and takes `(S − W) · tokens / (S · tokens / a − W · tokens / b)`
//!   with `a`, `b` their tokens/s: the time of steps `W..S` alone.
//!
//! Each round runs both sides, alternating which goes first; the table holds medians over rounds and the ratio
//! ours / PyTorch (above 1: we are faster). All figures go to `target/bench-train-vs-torch.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::bench_vs_torch::median;

/// Usage of `cargo xtask bench-train-vs-torch`.
pub(crate) const USAGE: &str = "usage: cargo xtask bench-train-vs-torch [--threads N] [--rounds N] [--steps N] [--warmup N] [--routers LIST] [--corpus PATH] [--python PATH]\n\ntimes training steps of `moe train` (the release moe binary under CARGO_TARGET_DIR, default target/) and of the PyTorch reference of the same model (scripts/train_reference.py --bench) side by side; needs python3 with torch (MOE_PYTHON or --python)\n\n  --threads N    threads of both sides (default 2)\n  --rounds N     rounds, alternating which side goes first; medians over rounds (default 3)\n  --steps N      training steps per run (default 60)\n  --warmup N     first steps left out of the timing (default 10)\n  --routers LIST comma-separated: dense and router names (default dense,softmax-topk,switch-top1,noisy-topk,hash,expert-choice)\n  --corpus PATH  a byte file both sides train on (default: a generated text written to target/bench-train-corpus.txt)";

/// The default rows: the dense baseline and the routers the reference implements (PEER is not in it).
const DEFAULT_ROUTERS: &[&str] = &[
    "dense",
    "softmax-topk",
    "switch-top1",
    "noisy-topk",
    "hash",
    "expert-choice",
];

/// The model both sides train: `(flag of moe train, flag of train_reference.py, value)`.
const MODEL: &[(&str, &str, &str)] = &[
    ("--d-model", "--d-model", "128"),
    ("--layers", "--layers", "4"),
    ("--heads", "--heads", "4"),
    ("--context", "--context", "64"),
    ("--batch", "--batch", "12"),
    ("--experts", "--experts", "8"),
    ("-k", "--top-k", "2"),
    ("--expert-width", "--expert-width", "256"),
    ("--bank", "--bank", "mlp"),
];

/// Tokens per training step of [`MODEL`] (batch · context).
const TOKENS_PER_STEP: f64 = 12.0 * 64.0;

/// Options of the task.
#[derive(Debug, Clone, PartialEq)]
struct Opts {
    threads: usize,
    rounds: usize,
    steps: usize,
    warmup: usize,
    routers: Vec<String>,
    corpus: Option<PathBuf>,
    python: String,
}

fn parse(args: &[String], python: String) -> Result<Opts> {
    let mut o = Opts {
        threads: 2,
        rounds: 3,
        steps: 60,
        warmup: 10,
        routers: DEFAULT_ROUTERS.iter().map(|s| s.to_string()).collect(),
        corpus: None,
        python,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        let num = |name: &str, v: String| {
            v.parse::<usize>()
                .with_context(|| format!("{name} {v:?}: expected a whole number"))
        };
        match a.as_str() {
            "--threads" => o.threads = num("--threads", val("--threads")?)?,
            "--rounds" => o.rounds = num("--rounds", val("--rounds")?)?,
            "--steps" => o.steps = num("--steps", val("--steps")?)?,
            "--warmup" => o.warmup = num("--warmup", val("--warmup")?)?,
            "--routers" => {
                o.routers = val("--routers")?
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            "--corpus" => o.corpus = Some(PathBuf::from(val("--corpus")?)),
            "--python" => o.python = val("--python")?,
            other => bail!("unknown option {other}\n{USAGE}"),
        }
    }
    if o.threads == 0 || o.rounds == 0 {
        bail!("--threads and --rounds must be >= 1");
    }
    if o.warmup >= o.steps {
        bail!(
            "--warmup {} must be below --steps {}: no step would be timed",
            o.warmup,
            o.steps
        );
    }
    if o.routers.is_empty() {
        bail!("--routers lists nothing");
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = o.routers.iter().find(|r| !seen.insert(r.as_str())) {
        bail!("--routers lists {dup} twice");
    }
    Ok(o)
}

/// The CPU's model name from `/proc/cpuinfo` text (`model name : ...`), `None` if absent.
fn cpu_name_from(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The CPU's model name, or `unknown CPU`.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| cpu_name_from(&s))
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A seeded English-like text of `len` bytes (sentences of common words from an LCG): learnable, so the routers
/// see realistic, unbalanced token statistics; the same bytes on every machine.
fn generated_text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as",
        "his", "on", "be", "at", "by", "i", "this", "had", "not", "are", "but", "from", "or",
        "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there", "would",
        "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out",
        "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other",
        "new", "some", "could", "time", "these", "two", "may", "then", "do", "first",
    ];
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % n as u64) as usize
    };
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let words = 4 + next(8);
        for w in 0..words {
            let word = WORDS[next(WORDS.len())].as_bytes();
            if w == 0 {
                out.push(word[0].to_ascii_uppercase());
                out.extend_from_slice(&word[1..]);
            } else {
                out.push(b' ');
                out.extend_from_slice(word);
            }
        }
        out.extend_from_slice(if next(6) == 0 { b".\n" } else { b". " });
    }
    out.truncate(len);
    out
}

/// `tokens_per_s` of every run of a `moe train --format json` answer (`{"runs": [RunReport..]}`), by label; a run
/// without one (a row that failed) is left out, and the caller names what is missing.
fn ours_rates(stdout: &[u8]) -> Result<BTreeMap<String, f64>> {
    let v: Value = serde_json::from_slice(stdout).context("moe train did not print JSON")?;
    let runs = v["runs"]
        .as_array()
        .context("moe train's JSON has no `runs` array")?;
    let mut out = BTreeMap::new();
    for r in runs {
        let label = r["label"].as_str().context("a run without `label`")?;
        if let Some(tps) = r["tokens_per_s"].as_f64() {
            out.insert(label.to_string(), tps);
        }
    }
    Ok(out)
}

/// Tokens/s of steps `warmup..steps` alone from the rate `full` of all `steps` and the rate `head` of the first
/// `warmup` (NaN when they do not leave a positive time).
fn timed_rate(steps: usize, warmup: usize, full: f64, head: f64) -> f64 {
    if warmup == 0 {
        return full;
    }
    let t_full = steps as f64 * TOKENS_PER_STEP / full;
    let t_head = warmup as f64 * TOKENS_PER_STEP / head;
    let t = t_full - t_head;
    if t > 0.0 && t.is_finite() {
        (steps - warmup) as f64 * TOKENS_PER_STEP / t
    } else {
        f64::NAN
    }
}

/// The arguments of `moe train` for `routers` (dense is a row of its own unless absent: `--no-dense`).
fn ours_args(o: &Opts, corpus: &Path, stop_after: Option<usize>) -> Vec<String> {
    let moe: Vec<&str> = o
        .routers
        .iter()
        .map(String::as_str)
        .filter(|r| *r != "dense")
        .collect();
    let mut a: Vec<String> = ["train", "--task", "charlm", "--format", "json", "--corpus"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(corpus.display().to_string());
    // Without an MoE router in the list, softmax-topk runs too (its row is not shown): --routers needs one.
    a.extend([
        "--routers".into(),
        if moe.is_empty() {
            "softmax-topk".into()
        } else {
            moe.join(",")
        },
    ]);
    if !o.routers.iter().any(|r| r == "dense") {
        a.push("--no-dense".into());
    }
    for (flag, _, value) in MODEL {
        a.extend([flag.to_string(), value.to_string()]);
    }
    let n = |v: usize| v.to_string();
    a.extend([
        "--steps".into(),
        n(o.steps),
        "--threads".into(),
        n(o.threads),
    ]);
    // One evaluation, at the end, of one batch: evaluations are outside tokens/s but cost wall time.
    a.extend([
        "--eval-interval".into(),
        n(o.steps),
        "--eval-batches".into(),
        "1".into(),
    ]);
    if let Some(w) = stop_after {
        a.extend(["--stop-after".into(), n(w)]);
    }
    a
}

/// The arguments of `scripts/train_reference.py --bench` for one router.
fn torch_args(o: &Opts, script: &Path, corpus: &Path, router: &str) -> Vec<String> {
    let mut a = vec![
        script.display().to_string(),
        "--bench".into(),
        "--router".into(),
        router.into(),
    ];
    for (_, flag, value) in MODEL {
        a.extend([flag.to_string(), value.to_string()]);
    }
    let n = |v: usize| v.to_string();
    a.extend(["--steps".into(), n(o.steps), "--warmup".into(), n(o.warmup)]);
    a.extend([
        "--threads".into(),
        n(o.threads),
        "--corpus".into(),
        corpus.display().to_string(),
    ]);
    a
}

/// Runs a command and returns its stdout, or an error with its stderr.
fn output(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let p = cmd.output().with_context(|| format!("starting {what}"))?;
    if !p.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&p.stderr).trim()
        );
    }
    Ok(p.stdout)
}

/// Per-round figures of every row: ours and PyTorch's tokens/s.
#[derive(Debug, Default, Clone)]
struct Rows {
    ours: BTreeMap<String, Vec<f64>>,
    torch: BTreeMap<String, Vec<f64>>,
}

/// One round of our side: the full runs and their warm-up heads, every router in one process each.
fn ours_round(o: &Opts, moe: &Path, corpus: &Path, rows: &mut Rows) -> Result<()> {
    let full = ours_rates(&output(
        Command::new(moe).args(ours_args(o, corpus, None)),
        "moe train",
    )?)?;
    let head = if o.warmup > 0 {
        ours_rates(&output(
            Command::new(moe).args(ours_args(o, corpus, Some(o.warmup))),
            "moe train --stop-after",
        )?)?
    } else {
        full.clone()
    };
    for r in &o.routers {
        let (a, b) = (full.get(r), head.get(r));
        let (Some(&a), Some(&b)) = (a, b) else {
            bail!(
                "moe train printed no tokens/s for {r} (runs with one: {:?}); `moe train --routers {r}` says why",
                full.keys()
            );
        };
        rows.ours
            .entry(r.clone())
            .or_default()
            .push(timed_rate(o.steps, o.warmup, a, b));
    }
    Ok(())
}

/// One round of PyTorch's side: one process per router.
fn torch_round(o: &Opts, root: &Path, corpus: &Path, rows: &mut Rows) -> Result<()> {
    let script = root.join("scripts/train_reference.py");
    for r in &o.routers {
        let out = output(
            Command::new(&o.python).args(torch_args(o, &script, corpus, r)),
            &format!("train_reference.py --bench --router {r}"),
        )?;
        let line = String::from_utf8_lossy(&out);
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("train_reference.py said: {line}"))?;
        let tps = v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        rows.torch.entry(r.clone()).or_default().push(tps);
    }
    Ok(())
}

/// The markdown table: one row per router, medians over rounds.
fn table(o: &Opts, rows: &Rows) -> (String, Vec<Value>) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| router | ours tokens/s | PyTorch tokens/s | ratio (ours / PyTorch) |"
    );
    let _ = writeln!(s, "| --- | --: | --: | --: |");
    let mut json_rows = Vec::new();
    for r in &o.routers {
        let ours = rows.ours.get(r).cloned().unwrap_or_default();
        let torch = rows.torch.get(r).cloned().unwrap_or_default();
        let (a, b) = (median(ours.clone()), median(torch.clone()));
        let f = |v: Option<f64>| v.map_or("n/a".into(), |x| format!("{x:.0}"));
        let ratio = a.zip(b).map(|(a, b)| a / b);
        let rs = ratio.map_or("n/a".into(), |x| format!("{x:.2}"));
        let _ = writeln!(s, "| {r} | {} | {} | {rs} |", f(a), f(b));
        json_rows.push(
            json!({"router": r, "ours_tokens_per_s": a, "torch_tokens_per_s": b, "ratio": ratio,
            "rounds": {"ours": ours, "torch": torch}}),
        );
    }
    (s, json_rows)
}

/// Runs the comparison and prints the table.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let python = std::env::var("MOE_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = parse(args, python)?;
    let probe = Command::new(&o.python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output();
    let version = match probe {
        Ok(p) if p.status.success() => String::from_utf8_lossy(&p.stdout).trim().to_string(),
        _ => bail!(
            "PyTorch is not importable by `{}`.\n\
             Install it (CPU wheels are enough): `python3 -m venv .venv && .venv/bin/pip install torch`,\n\
             then run `MOE_PYTHON=.venv/bin/python cargo xtask bench-train-vs-torch` (or pass --python PATH).",
            o.python
        ),
    };
    let target = crate::target_dir(root);
    let corpus = match &o.corpus {
        Some(p) => p.clone(),
        None => {
            let p = target.join("bench-train-corpus.txt");
            std::fs::create_dir_all(&target)?;
            std::fs::write(&p, generated_text(1, 1 << 20))
                .with_context(|| format!("writing {}", p.display()))?;
            p
        }
    };
    println!("==> building the moe binary (release)");
    let st = Command::new("cargo")
        .args(["build", "--release", "--locked", "-p", "moe-cli"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("cargo build failed");
    }
    let moe = target.join("release/moe");
    let mut rows = Rows::default();
    for round in 0..o.rounds {
        println!("==> round {} of {}", round + 1, o.rounds);
        if round % 2 == 0 {
            torch_round(&o, root, &corpus, &mut rows)?;
            ours_round(&o, &moe, &corpus, &mut rows)?;
        } else {
            ours_round(&o, &moe, &corpus, &mut rows)?;
            torch_round(&o, root, &corpus, &mut rows)?;
        }
    }
    let cpu = cpu_name();
    let (text, json_rows) = table(&o, &rows);
    println!();
    println!(
        "moe train vs PyTorch {version} (scripts/train_reference.py), training tokens/s, {} threads, {cpu}",
        o.threads
    );
    println!(
        "d 128, 4 layers, 4 heads, context 64, batch 12; MoE 8 experts top-2 width 256 (MLP), dense width 512; \
         {} steps, the first {} untimed; medians of {} rounds, alternating sides",
        o.steps, o.warmup, o.rounds
    );
    println!();
    print!("{text}");
    let path = target.join("bench-train-vs-torch.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"torch": version, "cpu": cpu, "threads": o.threads,
            "rounds": o.rounds, "steps": o.steps, "warmup": o.warmup, "corpus": corpus.display().to_string(),
            "rows": json_rows}))?,
    )?;
    println!("\n(all figures: {})", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn defaults_and_flags_parse() {
        let o = parse(&[], "py".into()).expect("defaults");
        assert_eq!((o.threads, o.rounds, o.steps, o.warmup), (2, 3, 60, 10));
        assert_eq!(o.routers, DEFAULT_ROUTERS);
        let o = parse(
            &args("--threads 1 --rounds 5 --steps 30 --warmup 0 --routers dense,hash --python p --corpus c"),
            "py".into(),
        )
        .expect("flags");
        assert_eq!((o.threads, o.rounds, o.steps, o.warmup), (1, 5, 30, 0));
        assert_eq!(o.routers, ["dense", "hash"]);
        assert_eq!(
            (o.python.as_str(), o.corpus),
            ("p", Some(PathBuf::from("c")))
        );
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            "--threads 0",
            "--rounds 0",
            "--steps 10 --warmup 10",
            "--routers ,",
            "--routers hash,hash",
            "--steps x",
            "--steps",
            "--frobnicate",
        ] {
            assert!(parse(&args(bad), "py".into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_name_is_read_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags : avx2\n";
        assert_eq!(cpu_name_from(info).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_name_from("processor : 0\n"), None);
    }

    #[test]
    fn generated_text_is_seeded_ascii_of_the_asked_length() {
        let a = generated_text(1, 5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a, generated_text(1, 5000));
        assert_ne!(a, generated_text(2, 5000));
        assert!(a.iter().all(|b| b.is_ascii()));
    }

    #[test]
    fn the_warm_up_is_subtracted_from_our_rate() {
        // 60 steps at 1000 tokens/s overall, the first 10 at 500 tokens/s: the last 50 took
        // 60·768/1000 − 10·768/500 = 30.72 s.
        let r = timed_rate(60, 10, 1000.0, 500.0);
        assert!((r - 50.0 * 768.0 / 30.72).abs() < 1e-9, "{r}");
        assert_eq!(timed_rate(60, 0, 1000.0, 1.0), 1000.0);
        assert!(timed_rate(60, 10, 1000.0, 100.0).is_nan());
    }

    #[test]
    fn our_json_is_read_by_label() {
        let j = br#"{"task": "charlm", "runs": [{"label": "dense", "tokens_per_s": 9000.5},
            {"label": "softmax-topk", "tokens_per_s": 7000.0}]}"#;
        let m = ours_rates(j).expect("rates");
        assert_eq!(m["dense"], 9000.5);
        assert_eq!(m["softmax-topk"], 7000.0);
        assert!(ours_rates(b"{}").is_err());
        assert!(ours_rates(b"not json").is_err());
        assert!(
            ours_rates(br#"{"runs": [{"label": "x", "error": "no backward"}]}"#)
                .expect("a failed row is left out")
                .is_empty()
        );
    }

    #[test]
    fn both_sides_get_the_same_model() {
        let o = parse(&args("--routers hash --steps 20 --warmup 5"), "py".into()).expect("opts");
        let ours = ours_args(&o, Path::new("c.txt"), Some(5)).join(" ");
        assert!(ours.contains("--routers hash --no-dense"), "{ours}");
        assert!(
            ours.contains("--d-model 128")
                && ours.contains("-k 2")
                && ours.contains("--stop-after 5")
        );
        assert!(ours.contains("--steps 20") && ours.contains("--corpus c.txt"));
        let torch = torch_args(&o, Path::new("s.py"), Path::new("c.txt"), "hash").join(" ");
        assert!(
            torch.contains("--top-k 2")
                && torch.contains("--d-model 128")
                && torch.contains("--warmup 5")
        );
        let o = parse(&args("--routers dense"), "py".into()).expect("opts");
        let ours = ours_args(&o, Path::new("c"), None).join(" ");
        assert!(
            ours.contains("--routers softmax-topk") && !ours.contains("--no-dense"),
            "{ours}"
        );
    }

    #[test]
    fn table_has_a_row_per_router_with_the_ratio() {
        let o = parse(&args("--routers dense,hash"), "py".into()).expect("opts");
        let mut rows = Rows::default();
        rows.ours
            .insert("dense".into(), vec![9000.0, 8000.0, 10000.0]);
        rows.torch
            .insert("dense".into(), vec![4500.0, 4000.0, 5000.0]);
        let (text, json) = table(&o, &rows);
        assert!(text.contains("| dense | 9000 | 4500 | 2.00 |"), "{text}");
        assert!(text.contains("| hash | n/a | n/a | n/a |"), "{text}");
        assert_eq!(json.len(), 2);
    }
}
