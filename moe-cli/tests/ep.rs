//! End-to-end tests of `moe compare --ep-ranks`: the per-router expert-parallel columns in every format, bytes
//! checked by hand on a case where every token goes to every expert, and bad values as usage errors.

mod common;

use common::{moe, stderr, stdout};

fn compare(extra: &[&str]) -> std::process::Output {
    let mut args = vec!["compare", "--no-layer", "--repeats", "1", "-d", "8"];
    args.extend_from_slice(extra);
    moe(&args)
}

#[test]
fn table_has_a_row_per_router_and_rank_count() {
    let o = compare(&[
        "-t",
        "256",
        "--routers",
        "softmax-topk,switch-top1",
        "--ep-ranks",
        "2,4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("expert parallelism"), "{out}");
    assert!(out.contains("network shm"), "{out}");
    for h in ["sent max", "sent mean", "msgs max", "imbalance", "a2a ms"] {
        assert!(out.contains(h), "{h} missing from\n{out}");
    }
    let ep_lines: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("expert parallelism"))
        .filter(|l| l.starts_with("softmax-topk") || l.starts_with("switch-top1"))
        .collect();
    assert_eq!(ep_lines.len(), 4, "{out}");
    // Ranks 2 then 4 per router; 256 tokens give 128 and 64 per rank.
    let cells: Vec<Vec<&str>> = ep_lines
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!((cells[0][1], cells[0][2]), ("2", "128"));
    assert_eq!((cells[1][1], cells[1][2]), ("4", "64"));
    assert_eq!((cells[3][0], cells[3][1]), ("switch-top1", "4"));
}

#[test]
fn bytes_by_hand_when_every_token_goes_to_every_expert() {
    // E = k = 2 over R = 2 ranks of 32 tokens, d = 8: each rank sends the other rank's expert all its 32 tokens:
    // dispatch 12 + 8 (one group) + 32·8·4 = 1044 bytes, combine back 4 + 1024 = 1028: 2072 sent per rank, 2
    // messages; each rank's expert gets 32 own + 32 remote rows.
    let o = compare(&[
        "-t",
        "64",
        "-e",
        "2",
        "-k",
        "2",
        "--routers",
        "softmax-topk",
        "--ep-ranks",
        "1,2",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let ep = &v["rows"][0]["ep"];
    let one = &ep[0];
    assert_eq!(one["ranks"], 1);
    assert_eq!(one["bytes_sent_max"], 0);
    assert_eq!(one["messages_max"], 0);
    assert_eq!(one["rows_max"], 128);
    assert_eq!(one["all_to_all_ms"], 0.0);
    let two = &ep[1];
    assert_eq!(two["ranks"], 2);
    assert_eq!(two["tokens_per_rank_max"], 32);
    assert_eq!(two["bytes_sent_max"], 2072);
    assert_eq!(two["bytes_received_max"], 2072);
    assert_eq!(two["messages_max"], 2);
    assert_eq!(two["rows_max"], 64);
    assert_eq!(two["imbalance"], 1.0);
    // shm: α 0.5 µs, 10 GB/s = 1e4 B/µs; one round: dispatch 0.5 + 0.1044 µs, combine 0.5 + 0.1028 µs.
    let f = |k: &str| two[k].as_f64().expect("number");
    assert!((f("dispatch_ms") - 0.6044e-3).abs() < 1e-12, "{two}");
    assert!((f("combine_ms") - 0.6028e-3).abs() < 1e-12, "{two}");
    assert_eq!(v["ep_network"]["name"], "shm");
}

#[test]
fn json_rows_are_consistent_and_absent_without_the_flag() {
    let o = compare(&[
        "-t",
        "300",
        "--routers",
        "softmax-topk",
        "--ep-ranks",
        "3,16",
        "--ep-network",
        "ib-hdr",
        "--ep-ranks-per-node",
        "4",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["ep_network"]["ranks_per_node"], 4);
    for x in v["rows"][0]["ep"].as_array().expect("ep rows") {
        let f = |k: &str| x[k].as_f64().expect("number");
        // softmax-topk keeps every token's k = 2 experts whatever the block: the ranks' loads sum to T·k = 600.
        assert!((f("rows_mean") * f("ranks") - 600.0).abs() < 1e-9, "{x}");
        assert!(
            (f("imbalance") - f("rows_max") / f("rows_mean")).abs() < 1e-9,
            "{x}"
        );
        assert!(
            (f("all_to_all_ms") - f("dispatch_ms") - f("combine_ms")).abs() < 1e-12,
            "{x}"
        );
        assert!(f("bytes_sent_mean") <= f("bytes_sent_max"));
    }
    // 300 tokens over 16 ranks: 19 for the first 12, 18 for the other 4.
    assert_eq!(v["rows"][0]["ep"][1]["tokens_per_rank_min"], 18);
    assert_eq!(v["rows"][0]["ep"][1]["tokens_per_rank_max"], 19);
    let o = compare(&["-t", "64", "--routers", "softmax-topk", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert!(v.get("ep_network").is_none());
    assert!(v["rows"][0].get("ep").is_none());
}

#[test]
fn csv_appends_columns_per_rank_count() {
    let o = compare(&[
        "-t",
        "128",
        "--routers",
        "softmax-topk,hash",
        "--ep-ranks",
        "2,4",
        "--format",
        "csv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("ep2 bytes sent max") && lines[0].contains("ep4 a2a ms"),
        "{out}"
    );
    let n = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == n), "{out}");
}

#[test]
fn many_ranks_run_on_a_big_enough_workload() {
    // 64 ranks need at least 64 tokens and 64 experts; 2048 tokens give 32 per rank.
    let o = compare(&[
        "-t",
        "2048",
        "-e",
        "64",
        "--routers",
        "switch-top1",
        "--ep-ranks",
        "64",
        "--ep-network",
        "dgx-h100",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("network dgx-h100"), "{}", stdout(&o));
}

#[test]
fn bad_values_are_usage_errors() {
    for (args, needle) in [
        (vec!["--ep-ranks", "0"], "at least 1"),
        (vec!["--ep-ranks", "2,17"], "16 experts"),
        (vec!["-t", "8", "--ep-ranks", "9", "-e", "16"], "8 tokens"),
        (
            vec!["--ep-ranks", "2", "--ep-network", "token-ring"],
            "--ep-network must be one of",
        ),
        (
            vec!["--ep-ranks", "2", "--ep-ranks-per-node", "0"],
            "--ep-ranks-per-node",
        ),
        (vec!["--ep-ranks", "two"], "--ep-ranks"),
        (vec!["--ep-network", "shm"], "--ep-ranks"),
    ] {
        let mut a = vec!["--routers", "softmax-topk"];
        a.extend_from_slice(&args);
        if !a.contains(&"-t") {
            a.extend_from_slice(&["-t", "64"]);
        }
        let o = compare(&a);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{args:?}: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(stdout(&o).is_empty(), "{args:?}");
    }
}

fn bench(extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "bench",
        "-d",
        "32",
        "--ffn",
        "64",
        "-e",
        "4",
        "-k",
        "2",
        "--repeats",
        "2",
    ];
    args.extend_from_slice(extra);
    moe(&args)
}

#[test]
fn bench_on_thread_ranks_is_identical_and_its_bytes_are_the_models() {
    let o = bench(&["--ep-ranks", "2", "-t", "0,16", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(v["transport"], "threads");
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["identical_to_one_rank"], true, "{r}");
        assert_eq!(
            r["bytes_sent_per_rank_max"], r["predicted_bytes_per_rank_max"],
            "{r}"
        );
    }
    // CSV is a header and rows, nothing else.
    let o = bench(&["--ep-ranks", "2", "-t", "16", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("T/rank,"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn bench_refuses_wrong_expert_parallel_flags() {
    for (args, want) in [
        (vec!["--ep", "-t", "16"], "start it with mpirun"),
        (vec!["--rank-capacity", "1", "-t", "16"], "add --ep-ranks R"),
        (vec!["--ep", "--ep-ranks", "2", "-t", "16"], "not both"),
        (vec!["--ep-ranks", "5", "-t", "16"], "between 1 and E = 4"),
        (vec!["--ep-ranks", "0", "-t", "16"], "between 1 and E = 4"),
        (
            vec!["--ep-ranks", "2", "--rank-capacity", "-1", "-t", "16"],
            "above 0",
        ),
        (
            vec!["--ep-ranks", "2", "--rank-capacity", "nan", "-t", "16"],
            "above 0",
        ),
        (
            vec!["--ep-ranks", "2", "--ep-timeout", "0", "-t", "16"],
            "--ep-timeout",
        ),
        (
            vec!["--ep-ranks", "2", "--from", "x.safetensors", "-t", "16"],
            "store's flags",
        ),
        (
            vec!["--ep-ranks", "2", "--write-checkpoint", "x.safetensors"],
            "store's flags",
        ),
        (
            vec!["--ep-ranks", "2", "--backward", "-t", "16"],
            "--backward",
        ),
    ] {
        let o = bench(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn ep_cost_predicts_from_traces_and_refuses_bad_input() {
    let dir = common::scratch("ep-cost");
    let trace = dir.join("r.moetrace");
    let t = trace.to_string_lossy().into_owned();
    let o = moe(&[
        "route",
        "softmax-topk",
        "-t",
        "512",
        "-e",
        "16",
        "-k",
        "2",
        "-d",
        "16",
        "--trace",
        &t,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moe(&[
        "ep-cost",
        &t,
        "--ranks",
        "2,16",
        "--tokens-per-rank",
        "64",
        "-d",
        "128",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    let tr = &v["traces"][0];
    assert_eq!(tr["router"], "softmax-topk");
    // 2 ranks × 64 tokens fit the trace's 512; 16 × 64 = 1024 do not: dealt again from the start.
    assert_eq!(tr["wrapped"], serde_json::json!([false, true]));
    let ep = tr["ep"].as_array().cloned().unwrap_or_default();
    assert_eq!(ep.len(), 2);
    // 2 ranks, 64 tokens each, top-2: 256 slots in all land on the two ranks' experts.
    let rows = ep[0]["rows_mean"].as_f64().unwrap_or(0.0) * 2.0;
    assert_eq!(rows, 256.0, "{}", ep[0]);
    for (args, want) in [
        (
            vec!["--ranks", "17", "--tokens-per-rank", "8", "-d", "8"],
            "E = 16",
        ),
        (
            vec!["--ranks", "2", "--tokens-per-rank", "0", "-d", "8"],
            "--tokens-per-rank",
        ),
        (
            vec![
                "--ranks",
                "2",
                "--tokens-per-rank",
                "8",
                "-d",
                "8",
                "--network",
                "x",
            ],
            "--network",
        ),
    ] {
        let mut a = vec!["ep-cost", t.as_str()];
        a.extend(args.iter().copied());
        let o = moe(&a);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{a:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{a:?}: {err}"
        );
    }
    let missing = dir.join("missing.moetrace");
    let o = moe(&[
        "ep-cost",
        &missing.to_string_lossy(),
        "--ranks",
        "2",
        "--tokens-per-rank",
        "8",
        "-d",
        "8",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
