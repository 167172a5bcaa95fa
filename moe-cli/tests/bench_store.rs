//! `moe bench --from CHECKPOINT --resident-experts N` end to end: a checkpoint written by `--write-checkpoint`
//! runs as a stack of stored layers (hit rate, bytes read, prefetch precision and recall, peak RSS within the
//! resident bound plus a stated overhead), and bad input exits 2 with one `error:` line.

mod common;

use std::path::Path;

use common::{moe, scratch, stderr, stdout};

/// One `error:` line on stderr and exit code 2.
fn assert_usage(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "want {needle:?} in {err}");
}

/// Writes a `layers`-block checkpoint of E experts of `d × f` (bf16) to `path`.
fn write(path: &Path, layers: &str, d: &str, f: &str, e: &str) {
    let p = path.to_string_lossy().into_owned();
    let o = moe(&[
        "bench",
        "--write-checkpoint",
        &p,
        "--layers",
        layers,
        "-d",
        d,
        "--ffn",
        f,
        "-e",
        e,
        "-k",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn bench(path: &Path, extra: &[&str]) -> std::process::Output {
    let p = path.to_string_lossy().into_owned();
    let mut args = vec!["bench", "--from", &p, "-k", "2", "--repeats", "3"];
    args.extend_from_slice(extra);
    moe(&args)
}

#[test]
fn a_stored_stack_reports_hits_bytes_and_predictions() {
    let dir = scratch("bench-store");
    let ckpt = dir.join("stack.safetensors");
    write(&ckpt, "3", "32", "48", "8");
    let r = json(&bench(
        &ckpt,
        &[
            "--resident-experts",
            "3",
            "-t",
            "1,4",
            "--prefetch",
            "gate",
            "--format",
            "json",
        ],
    ));
    assert_eq!(r["layers"], 3);
    assert_eq!(r["experts"], 8);
    assert_eq!(r["resident_experts"], 3);
    assert_eq!(r["layout"], "per-expert");
    assert_eq!(r["dtype"], "BF16");
    // One expert: gate and up [48, 32] and down [32, 48], 2 bytes each in the file, 4 resident.
    let per = 3 * 32 * 48;
    assert_eq!(r["expert_file_bytes"], 2 * per);
    assert_eq!(r["expert_resident_bytes"], 4 * per);
    assert_eq!(r["resident_bound_bytes"], 3 * 3 * 4 * per);
    let rows = r["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for row in rows {
        let hit = row["hit_rate"].as_f64().expect("hit rate");
        assert!((0.0..=1.0).contains(&hit), "{row}");
        let p = row["prefetch_precision"].as_f64().expect("precision");
        let rc = row["prefetch_recall"].as_f64().expect("recall");
        assert!(
            (0.0..=1.0).contains(&p) && (0.0..=1.0).contains(&rc),
            "{row}"
        );
        // Loads read the file's bytes: every load or prefetch reads one expert at its bf16 size.
        let loads = row["loads_per_step"].as_f64().expect("loads");
        let mb = row["read_mb_per_step"].as_f64().expect("read");
        assert!((mb - loads * (2 * per) as f64 / 1e6).abs() < 1e-9, "{row}");
    }
    // Every expert resident: loads only fill free slots, nothing is evicted; with 2 slots LRU evicts.
    let all = json(&bench(
        &ckpt,
        &["--resident-experts", "8", "-t", "2", "--format", "json"],
    ));
    let row = &all["rows"][0];
    assert_eq!(row["evictions_per_step"], 0.0, "{row}");
    let two = json(&bench(
        &ckpt,
        &["--resident-experts", "2", "-t", "2", "--format", "json"],
    ));
    let row = &two["rows"][0];
    assert!(
        row["evictions_per_step"].as_f64().expect("evictions") > 0.0,
        "{row}"
    );
    // The table names the checkpoint and the policy.
    let t = bench(
        &ckpt,
        &["--resident-experts", "2", "-t", "1", "--policy", "lfu"],
    );
    assert!(t.status.success(), "{}", stderr(&t));
    assert!(
        stdout(&t).contains("2 of 8 experts resident per layer, policy lfu"),
        "{}",
        stdout(&t)
    );
}

#[test]
fn peak_rss_stays_within_the_resident_experts_plus_overhead() {
    // 2 blocks of 32 experts, d 256, f 1024: 3 MiB per expert resident, 201 MB if every expert were resident.
    let dir = scratch("bench-store-rss");
    let ckpt = dir.join("big.safetensors");
    write(&ckpt, "2", "256", "1024", "32");
    let r = json(&bench(
        &ckpt,
        &["--resident-experts", "2", "-t", "1,8", "--format", "json"],
    ));
    let bound = r["resident_bound_bytes"].as_u64().expect("bound");
    let peak = r["peak_rss_bytes"].as_u64().expect("peak RSS (Linux)");
    let all = 2 * 32 * r["expert_resident_bytes"].as_u64().expect("expert bytes");
    // The stated overhead (docs/STORE.md): the binary, thread stacks, hidden states and the grouped workspaces,
    // at most 64 MiB at these sizes.
    let overhead = 64 << 20;
    assert!(
        peak <= bound + overhead,
        "peak RSS {peak} > bound {bound} + {overhead}"
    );
    assert!(
        peak < all,
        "peak RSS {peak} not below all experts resident {all}"
    );
}

#[test]
fn bad_input_exits_2() {
    let dir = scratch("bench-store-bad");
    let ckpt = dir.join("s.safetensors");
    write(&ckpt, "2", "16", "24", "4");
    assert_usage(
        &bench(&ckpt, &["--resident-experts", "0", "-t", "1"]),
        "--resident-experts",
    );
    assert_usage(
        &bench(&ckpt, &["--resident-experts", "5", "-t", "1"]),
        "E = 4",
    );
    assert_usage(&bench(&ckpt, &["--policy", "belady", "-t", "1"]), "belady");
    assert_usage(
        &bench(&ckpt, &["--policy", "nope", "-t", "1"]),
        "eviction policy",
    );
    assert_usage(&bench(&ckpt, &["--policy", "pin", "-t", "1"]), "--profile");
    // A profile traced on another model (E = 16, one layer).
    let trace = dir.join("other.moetrace");
    let tp = trace.to_string_lossy().into_owned();
    let o = moe(&["route", "-t", "64", "-d", "16", "-e", "16", "--trace", &tp]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_usage(
        &bench(&ckpt, &["--policy", "pin", "--profile", &tp, "-t", "1"]),
        "another model",
    );
    // Not a checkpoint; a directory; no experts in it.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").expect("write");
    assert_usage(&bench(&junk, &["-t", "1"]), "junk.safetensors");
    assert_usage(&bench(&dir, &["-t", "1"]), "");
    // Store flags without --from, and flags that do not go together.
    assert_usage(&moe(&["bench", "--resident-experts", "2"]), "--from");
    assert_usage(&moe(&["bench", "--policy", "lfu"]), "--from");
    let cp = ckpt.to_string_lossy().into_owned();
    assert_usage(&moe(&["bench", "--layers", "3"]), "--write-checkpoint");
    assert_usage(
        &moe(&["bench", "--from", &cp, "--write-checkpoint", &cp]),
        "second command",
    );
    assert_usage(
        &bench(&ckpt, &["--profile", &tp, "-t", "1"]),
        "--policy pin",
    );
    assert_usage(&bench(&ckpt, &["-e", "16", "-t", "1"]), "from its file");
    assert_usage(&bench(&ckpt, &["--bandwidth", "-t", "1"]), "--bandwidth");
    assert_usage(
        &moe(&["bench", "--from", &cp, "-k", "5", "-t", "1"]),
        "E = 4",
    );
    assert_usage(&bench(&dir, &["-t", "1"]), "is a directory");
}

#[test]
fn outputs_never_replace_what_is_not_a_regular_file() {
    let dir = scratch("bench-store-outputs");
    // A symbolic link: refused, its target untouched.
    let target = dir.join("target.txt");
    std::fs::write(&target, b"keep me").expect("write");
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let lp = link.to_string_lossy().into_owned();
    let o = moe(&[
        "bench",
        "--write-checkpoint",
        &lp,
        "-d",
        "8",
        "--ffn",
        "8",
        "-e",
        "2",
        "-k",
        "1",
    ]);
    assert_usage(&o, "symbolic link");
    assert!(
        link.symlink_metadata()
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&target).expect("target"), b"keep me");
    // A named pipe: refused before anything is routed or written.
    let fifo = dir.join("pipe.moetrace");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let fp = fifo.to_string_lossy().into_owned();
        assert_usage(
            &moe(&["route", "-t", "8", "-d", "8", "--trace", &fp]),
            "FIFO",
        );
        assert!(!fifo.symlink_metadata().expect("fifo").is_file());
    }
    // A missing directory.
    let nowhere = dir
        .join("missing/x.moetrace")
        .to_string_lossy()
        .into_owned();
    assert_usage(
        &moe(&["route", "-t", "8", "-d", "8", "--trace", &nowhere]),
        "does not exist",
    );
}

#[test]
fn a_bench_trace_records_every_step_and_serves_as_a_pin_profile() {
    let dir = scratch("bench-store-trace");
    let ckpt = dir.join("t.safetensors");
    write(&ckpt, "3", "16", "24", "8");
    let trace = dir.join("t.moetrace");
    let tp = trace.to_string_lossy().into_owned();
    let o = bench(
        &ckpt,
        &[
            "--resident-experts",
            "3",
            "-t",
            "2,5",
            "--prefetch",
            "gate",
            "--trace",
            &tp,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&trace).expect("trace");
    let tr = moe_core::store::trace::RoutingTrace::from_bytes(&bytes).expect("parses");
    assert_eq!((tr.header().n_layers, tr.header().n_experts), (3, 8));
    // Two rows of 3 timed steps after one warm-up each.
    assert_eq!(tr.steps().len(), 8);
    for step in tr.steps() {
        assert!(step[0].predicted.is_none());
        assert!(step[1..].iter().all(|r| r.predicted.is_some()));
    }
    // The trace pins the same model's experts; cache-sim replays it.
    let p = bench(
        &ckpt,
        &[
            "--resident-experts",
            "3",
            "-t",
            "2",
            "--policy",
            "pin",
            "--profile",
            &tp,
        ],
    );
    assert!(p.status.success(), "{}", stderr(&p));
    let sim = moe(&["cache-sim", &tp, "--prefetch", "gate", "--format", "json"]);
    assert!(sim.status.success(), "{}", stderr(&sim));
}
