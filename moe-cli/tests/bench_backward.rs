//! `moe bench --backward`: the training step and the backward timed beside the forward, with the ratio; a backend
//! without training exits with code 2 and its `Unsupported` message.

mod common;

use common::{moe, stderr};

const SMALL: &[&str] = &[
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
    "7,33",
    "--repeats",
    "2",
    "--threads",
    "1",
    "--backward",
];

#[test]
fn backward_rows_with_both_medians_and_the_ratio() {
    let mut args = SMALL.to_vec();
    args.extend(["--format", "json"]);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for r in rows {
        let fwd = r["median_ms"].as_f64().expect("forward ms");
        let step = r["train_step_median_ms"].as_f64().expect("train step ms");
        let back = r["backward_median_ms"].as_f64().expect("backward ms");
        let ratio = r["backward_over_forward"].as_f64().expect("ratio");
        assert!(fwd > 0.0 && step >= back && back > 0.0);
        assert!((ratio - back / fwd).abs() <= 1e-9 * ratio.max(1.0));
    }
    let mut args = SMALL.to_vec();
    args.extend(["--format", "table"]);
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("backward/forward"), "{out}");
}

#[test]
fn without_the_flag_rows_have_no_training_fields() {
    let args: Vec<&str> = SMALL[..SMALL.len() - 1]
        .iter()
        .copied()
        .chain(["--format", "json"])
        .collect();
    let o = moe(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    for r in v["rows"].as_array().expect("rows") {
        assert!(r.get("backward_median_ms").is_none());
    }
}

#[test]
fn device_backends_exit_2() {
    for backend in ["cuda", "wgpu"] {
        let o = moe(&["bench", "--backend", backend, "-t", "1", "--backward"]);
        assert_eq!(o.status.code(), Some(2), "{backend}: {}", stderr(&o));
        assert!(stderr(&o).contains(backend), "{}", stderr(&o));
    }
}
