//! Routing traces end to end: `moe route --trace` writes a trace that parses back to the printed plan, refuses a
//! path it cannot write with exit 2; `moe cache-sim` replays traces in every format, draws its chart and refuses
//! bad input with exit 2 and one `error:` line.

mod common;

use std::path::Path;

use common::{moe, scratch, stderr, stdout};
use moe_core::store::trace::RoutingTrace;

/// Routes a small workload and writes its trace to `path`; returns the run's output.
fn route_trace(path: &Path, experts: &str) -> std::process::Output {
    let p = path.to_string_lossy().into_owned();
    moe(&[
        "route",
        "softmax-topk",
        "-t",
        "300",
        "-d",
        "16",
        "-e",
        experts,
        "-k",
        "2",
        "--format",
        "json",
        "--trace",
        &p,
    ])
}

fn read_trace(path: &Path) -> RoutingTrace {
    let bytes = std::fs::read(path).expect("trace file");
    RoutingTrace::from_bytes(&bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// One `error:` line on stderr and exit code 2.
fn assert_usage(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "want {needle:?} in {err}");
}

#[test]
fn route_writes_the_plan_as_a_one_layer_trace() {
    let dir = scratch("route-trace");
    let path = dir.join("r.moetrace");
    let o = route_trace(&path, "8");
    assert!(o.status.success(), "{}", stderr(&o));
    let tr = read_trace(&path);
    let h = tr.header();
    assert_eq!((h.n_layers, h.n_experts, h.top_k), (1, 8, 2));
    assert_eq!(h.router, "softmax-topk");
    assert!(h.model.contains("seed 0"), "{}", h.model);
    assert_eq!(tr.steps().len(), 1);
    let rec = &tr.steps()[0][0];
    assert_eq!(rec.n_tokens(), 300);
    assert!(rec.predicted.is_none());
    // Every token kept two distinct experts; the per-expert counts equal the printed ones.
    let mut counts = [0u64; 8];
    for t in 0..300 {
        let ex = rec.token(t);
        assert_eq!(ex.len(), 2, "token {t}: {ex:?}");
        for &e in ex {
            counts[e as usize] += 1;
        }
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let printed: Vec<u64> = v["experts"]
        .as_array()
        .expect("experts")
        .iter()
        .map(|r| r["tokens"].as_u64().expect("tokens"))
        .collect();
    assert_eq!(printed, counts.to_vec());
    // No temporary file is left beside it.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["r.moetrace".to_string()]);
}

#[test]
fn route_refuses_a_trace_path_it_cannot_write() {
    let dir = scratch("route-trace-bad");
    let o = route_trace(&dir, "8");
    assert_usage(&o, "is a directory");
    let o = route_trace(&dir.join("missing").join("t.moetrace"), "8");
    assert_usage(&o, "does not exist");
    assert!(stdout(&o).is_empty());
}

/// A trace of `moe route` (E = 8, one layer) in a fresh directory.
fn routed(name: &str) -> (common::Scratch, String) {
    let dir = scratch(name);
    let path = dir.join("r.moetrace");
    let o = route_trace(&path, "8");
    assert!(o.status.success(), "{}", stderr(&o));
    (dir, path.to_string_lossy().into_owned())
}

#[test]
fn cache_sim_reports_every_policy_beside_belady_in_every_format() {
    let (dir, trace) = routed("sim-formats");
    let o = moe(&["cache-sim", &trace, "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(doc["trace"]["header"]["n_experts"], 8);
    assert_eq!(doc["trace"]["tokens"], 300);
    // Default slot counts: every value 1..=E for E <= 16; default policies: all six.
    let slots: Vec<u64> = doc["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(slots, (1..=8).collect::<Vec<u64>>());
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 6 * 8);
    for r in rows {
        let (hit, bound) = (
            r["hit_rate_pct"].as_f64().expect("hit"),
            r["belady_pct"].as_f64().expect("bound"),
        );
        assert!(hit <= bound + 1e-9, "{r}");
        assert_eq!(r["accesses"], 600, "{r}");
        assert_eq!(
            r["hits"].as_u64().expect("hits") + r["loads"].as_u64().expect("loads"),
            600
        );
        // `moe route` knows no expert size: bytes moved unknown.
        assert!(r["bytes_moved"].is_null(), "{r}");
        if r["slots"] == 8 {
            // Every expert fits: only the first use of each expert misses, whatever the policy.
            assert_eq!(r["loads"], 8, "{r}");
            assert!((hit - bound).abs() < 1e-9);
        }
    }
    assert!(doc["verdict"]["winner"].is_string(), "{}", doc["verdict"]);
    assert!(
        doc["verdict"]["text"]
            .as_str()
            .expect("text")
            .contains("Belady")
    );

    let o = moe(&[
        "cache-sim",
        &trace,
        "--policy",
        "lru,belady",
        "--slots",
        "2,4..5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("Belady %") && out.contains("lru wins"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| (l.starts_with("lru ") || l.starts_with("belady ")) && !l.contains("wins"))
            .count(),
        6,
        "{out}"
    );

    let o = moe(&[
        "cache-sim",
        &trace,
        "--policy",
        "lru",
        "--slots",
        "2..E",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("policy,slots,hit %,loads,GB moved,Belady %,gap (points)\n"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1 + 7, "{out}");

    let o = moe(&[
        "cache-sim",
        &trace,
        "--policy",
        "lru",
        "--granularity",
        "step",
        "--format",
        "markdown",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("| policy | slots |") && out.contains("granularity step"),
        "{out}"
    );

    let svg = dir.join("hit.svg");
    let o = moe(&[
        "cache-sim",
        &trace,
        "--policy",
        "lru,lfu",
        "--plot",
        &svg.to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(
        text.starts_with("<svg") && text.contains("belady (bound)"),
        "{text}"
    );
    assert_eq!(text.matches("<polyline").count(), 3);
    assert_eq!(text.matches("stroke-dasharray=\"6 4\"").count(), 2);
}

#[test]
fn cache_sim_refuses_bad_input_with_exit_2() {
    let (dir, trace) = routed("sim-bad");
    let not_trace = dir.join("notes.txt");
    std::fs::write(&not_trace, "hello, not a trace").expect("write");
    assert_usage(
        &moe(&["cache-sim", &not_trace.to_string_lossy()]),
        "not a routing trace",
    );
    let bytes = std::fs::read(&trace).expect("trace");
    let cut = dir.join("cut.moetrace");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).expect("write");
    assert_usage(&moe(&["cache-sim", &cut.to_string_lossy()]), "truncated");
    assert_usage(&moe(&["cache-sim", &dir.to_string_lossy()]), "directory");
    assert_usage(
        &moe(&["cache-sim", &dir.join("missing.moetrace").to_string_lossy()]),
        "missing.moetrace",
    );
    assert_usage(&moe(&["cache-sim", &trace, "--slots", "0"]), "zero slots");
    assert_usage(&moe(&["cache-sim", &trace, "--slots", "2..9"]), "at most E");
    assert_usage(
        &moe(&["cache-sim", &trace, "--slots", "two"]),
        "not a number",
    );
    assert_usage(
        &moe(&["cache-sim", &trace, "--policy", "lru,fifo"]),
        "unknown policy",
    );
    assert_usage(
        &moe(&["cache-sim", &trace, "--prefetch", "gate"]),
        "no predicted experts",
    );
    assert_usage(
        &moe(&["cache-sim", &trace, "--prefetch", "frequency:9"]),
        "frequency:9",
    );
    assert_usage(
        &moe(&["cache-sim", &trace, "--plot", &dir.to_string_lossy()]),
        "--plot",
    );
}

#[test]
fn train_writes_one_trace_per_router_and_gate_prefetch_reads_it() {
    let dir = scratch("train-trace");
    let file = dir.join("t.moetrace");
    let o = moe(&[
        "train",
        "--corpus",
        "generated",
        "--steps",
        "4",
        "--batch",
        "2",
        "--context",
        "16",
        "--layers",
        "2",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--experts",
        "4",
        "--expert-width",
        "16",
        "--warmup",
        "1",
        "--eval-interval",
        "4",
        "--eval-batches",
        "2",
        "--threads",
        "1",
        "--routers",
        "softmax-topk,switch-top1",
        "--format",
        "json",
        "--trace",
        &file.to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Dense has no trace; each router its own file.
    assert!(!file.exists());
    assert!(!dir.join("t.dense.moetrace").exists());
    for (name, k) in [("softmax-topk", 2), ("switch-top1", 1)] {
        let tr = read_trace(&dir.join(format!("t.{name}.moetrace")));
        let h = tr.header();
        assert_eq!(
            (h.n_layers, h.n_experts, h.top_k, h.router.as_str()),
            (2, 4, k, name)
        );
        assert_eq!(tr.steps().len(), 2);
        for step in tr.steps() {
            assert_eq!(step[0].n_tokens(), 32);
            assert!(step[0].predicted.is_none() && step[1].predicted.is_some());
        }
    }
    let t = dir.join("t.softmax-topk.moetrace");
    let o = moe(&[
        "cache-sim",
        &t.to_string_lossy(),
        "--policy",
        "lru",
        "--prefetch",
        "gate",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rows = doc["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4);
    for r in rows {
        assert!(
            r["prefetch_precision"].is_number() && r["prefetch_recall"].is_number(),
            "{r}"
        );
        // Bytes moved: (loads + prefetches) × one expert's f32 bytes (2 · 32 · 16 · 4).
        let moved = r["bytes_moved"].as_u64().expect("bytes");
        let n = r["loads"].as_u64().expect("loads") + r["prefetches"].as_u64().expect("prefetches");
        assert_eq!(moved, n * 4096, "{r}");
    }
    // A path in a missing directory is refused before training.
    let o = moe(&[
        "train",
        "--corpus",
        "generated",
        "--steps",
        "1",
        "--trace",
        &dir.join("no/t.moetrace").to_string_lossy(),
    ]);
    assert_usage(&o, "does not exist");
    let o = moe(&[
        "train",
        "--corpus",
        "generated",
        "--steps",
        "1",
        "--routers",
        "dense",
        "--trace",
        &file.to_string_lossy(),
    ]);
    assert_usage(&o, "no routed run");
}
