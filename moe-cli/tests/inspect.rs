//! End-to-end tests of `moe inspect` (and of the checkpoint loader through `moe route --input`) on hostile or
//! careless checkpoints: the reliability cases of issue 17 (/work/shared/cases/reliability, built here), each
//! checked for exit 2 and a one-line message naming the file and the cause.

mod common;

use common::{moe, raw_safetensors, safetensors, scratch, stderr, stdout};

use std::path::Path;
use std::process::{Command, Output};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Asserts exit 2, one error line containing every one of `needles`, and no panic.
fn refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{}{err}", stdout(o));
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
    no_repeated_cause(&err);
}

/// Asserts that no `: `-separated part of an error line is printed twice (a cause repeated by its chain).
fn no_repeated_cause(err: &str) {
    let parts: Vec<&str> = err.trim_end().split(": ").map(str::trim).collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts.iter().skip(i + 1).any(|q| q == p),
            "cause repeated: {err}"
        );
    }
}

/// An unreadable path: the OS's reason once, after the path.
#[test]
fn io_errors_print_their_cause_once() {
    let d = scratch("io-once");
    let o = moe(&["inspect", s(&d.join("absent.safetensors"))]);
    refused(&o, &["absent.safetensors", "No such file or directory"]);
    assert_eq!(
        stderr(&o).matches("No such file").count(),
        1,
        "{}",
        stderr(&o)
    );
}

/// F-12: a header defining "hidden_states" twice ([8, 4], then [4, 8]) was accepted, the last one winning.
#[test]
fn f12_duplicate_tensor_in_a_header_is_refused() {
    let dir = scratch("f12");
    let data: Vec<u8> = (0..32)
        .flat_map(|i| ((i % 5) as f32 - 2.0).to_le_bytes())
        .collect();
    let p = dir.join("dup_key.safetensors");
    std::fs::write(
        &p,
        raw_safetensors(
            r#"{"hidden_states":{"dtype":"F32","shape":[8,4],"data_offsets":[0,128]},"hidden_states":{"dtype":"F32","shape":[4,8],"data_offsets":[0,128]}}"#,
            &data,
        ),
    )
    .expect("write");
    for args in [vec!["route", "--input", s(&p)], vec!["inspect", s(&p)]] {
        let o = moe(&args);
        refused(
            &o,
            &[
                "dup_key.safetensors",
                "\"hidden_states\" is defined more than once",
            ],
        );
    }
}

/// The index of a sharded checkpoint: `gate.weight` in `a.safetensors`, `experts.down_proj` in `shard`.
fn sharded(dir: &Path, shard: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join("a.safetensors"),
        safetensors(&[("gate.weight", vec![2, 2], vec![1.0, 0.0, 0.0, 1.0])]),
    )
    .expect("write");
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"gate.weight": "a.safetensors", "experts.down_proj": shard}})
            .to_string(),
    )
    .expect("write");
}

/// F-13: shard names escaping the checkpoint directory (`..`, absolute, a symlink out) are refused before the
/// file is opened: nothing of it is printed.
#[test]
fn f13_index_shards_stay_in_their_directory() {
    let base = scratch("f13");
    // A file outside the checkpoint directory whose first bytes would show in a header-length message.
    let secret = base.join("secret.txt");
    std::fs::write(&secret, b"root:x:0:0:root:/root:/bin/bash\n").expect("write");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "dotdot",
            "../../../../../../../../etc/passwd".into(),
            "contains `..`",
        ),
        ("dotdot2", "../secret.txt".into(), "contains `..`"),
        ("absolute", s(&secret).to_string(), "absolute path"),
    ];
    for (name, shard, why) in &cases {
        let d = base.join(name).join("ckpt");
        sharded(&d, shard);
        let o = moe(&["inspect", s(&d)]);
        refused(&o, &["model.safetensors.index.json", why, "is refused"]);
        assert!(!stderr(&o).contains("header length"), "{}", stderr(&o));
    }
    #[cfg(unix)]
    {
        let d = base.join("symlink").join("ckpt");
        sharded(&d, "b.safetensors");
        std::os::unix::fs::symlink(&secret, d.join("b.safetensors")).expect("symlink");
        let o = moe(&["inspect", s(&d)]);
        refused(&o, &["\"b.safetensors\" is refused", "resolves to"]);
        assert!(!stderr(&o).contains("header length"), "{}", stderr(&o));
    }
}

/// F-23: a shard that is a directory or a device, an index that is not a regular file: say what it is.
#[test]
fn f23_non_regular_shards_and_index_say_what_they_are() {
    let base = scratch("f23");
    let d = base.join("dir_shard");
    sharded(&d, "b.safetensors");
    std::fs::create_dir_all(d.join("b.safetensors")).expect("dir");
    refused(
        &moe(&["inspect", s(&d)]),
        &["b.safetensors is a directory, not a regular file"],
    );
    #[cfg(unix)]
    {
        let d = base.join("dev_shard");
        sharded(&d, "b.safetensors");
        std::os::unix::fs::symlink("/dev/zero", d.join("b.safetensors")).expect("symlink");
        // /dev/zero is outside the directory: refused before anything is read from it.
        refused(&moe(&["inspect", s(&d)]), &["b.safetensors", "is refused"]);
        let d = base.join("dev_index");
        std::fs::create_dir_all(&d).expect("dir");
        std::os::unix::fs::symlink("/dev/null", d.join("model.safetensors.index.json"))
            .expect("symlink");
        refused(
            &moe(&["inspect", s(&d)]),
            &["model.safetensors.index.json is a character device, not a regular file"],
        );
        refused(
            &moe(&["inspect", "/dev/null"]),
            &["/dev/null is a character device, not a regular file"],
        );
    }
    let d = base.join("dir_index");
    std::fs::create_dir_all(d.join("model.safetensors.index.json")).expect("dir");
    refused(
        &moe(&["inspect", s(&d)]),
        &["model.safetensors.index.json is a directory, not a regular file"],
    );
}

/// An index repeating a key (the same tensor mapped twice) is refused, as a header repeating a tensor is.
#[test]
fn index_with_a_repeated_tensor_is_refused() {
    let d = scratch("dup-index");
    sharded(&d, "a.safetensors");
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"gate.weight": "a.safetensors", "gate.weight": "b.safetensors"}}"#,
    )
    .expect("write");
    refused(
        &moe(&["inspect", s(&d)]),
        &["\"weight_map.gate.weight\" is defined more than once in the JSON"],
    );
}

/// A directory with `config.json` and a `model.safetensors` holding an `[8, 4]` `gate.weight`.
fn with_config(name: &str, cfg: &serde_json::Value) -> common::Scratch {
    let d = scratch(name);
    std::fs::write(
        d.join("model.safetensors"),
        safetensors(&[("gate.weight", vec![8, 4], vec![0.1; 32])]),
    )
    .expect("write");
    std::fs::write(d.join("config.json"), cfg.to_string()).expect("write");
    d
}

/// F-15: the config is checked as loading checks it, including the expert count against the router tensor.
#[test]
fn f15_expert_count_is_checked_against_the_gate() {
    let d = with_config(
        "f15-e",
        &serde_json::json!({"model_type": "mixtral", "num_local_experts": 1_000_000_000_000u64,
            "num_experts_per_tok": 2}),
    );
    refused(
        &moe(&["inspect", s(&d)]),
        &[
            "config.json",
            "num_local_experts",
            "1000000000000 experts",
            "gate.weight has shape [8, 4]",
        ],
    );
    let d = with_config(
        "f15-dropout",
        &serde_json::json!({"model_type": "nllb_moe", "num_experts": 8, "moe_token_dropout": 1.5}),
    );
    refused(
        &moe(&["inspect", s(&d)]),
        &["moe_token_dropout", "outside [0, 1)"],
    );
    // A negative capacity fraction is what transformers takes as "off": said so, with the capacity used.
    let d = with_config(
        "f15-frac",
        &serde_json::json!({"model_type": "nllb_moe", "num_experts": 8,
            "moe_eval_capacity_token_fraction": -1.0}),
    );
    let o = moe(&["inspect", s(&d)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("capacity 64 per expert (fraction -1 ≤ 0 is off"),
        "{}",
        stdout(&o)
    );
}

/// `moe inspect` prints the values the preset builds with, defaults resolved: Mixtral renormalises whatever the
/// config says (MixtralConfig has no `norm_topk_prob`).
#[test]
fn inspect_prints_resolved_values() {
    let d = with_config(
        "resolved",
        &serde_json::json!({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": false}),
    );
    let o = moe(&["inspect", s(&d)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("config: experts 8, top_k 2, score softmax, order score_then_top_k, renormalize true, scaling 1"),
        "{out}"
    );
    let o = moe(&["inspect", s(&d), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let eff = v["effective"].as_array().expect("effective values");
    assert!(
        eff.iter()
            .any(|e| e["name"] == "renormalize" && e["value"] == "true"),
        "{v}"
    );
}

/// F-19: a truncated file, a config that is not JSON, a config that is a directory: all bad input, exit 2.
#[test]
fn f19_inspect_bad_input_exits_2() {
    let d = scratch("f19");
    let mut b = safetensors(&[("hidden_states", vec![8, 4], vec![0.5; 32])]);
    b.truncate(b.len() - 5);
    let p = d.join("trunc.safetensors");
    std::fs::write(&p, b).expect("write");
    refused(
        &moe(&["inspect", s(&p)]),
        &["trunc.safetensors", "truncated"],
    );
    let d = with_config("f19-cfg", &serde_json::json!({}));
    std::fs::write(d.join("config.json"), "{not json").expect("write");
    refused(&moe(&["inspect", s(&d)]), &["config.json", "bad JSON"]);
    std::fs::remove_file(d.join("config.json")).expect("rm");
    std::fs::create_dir(d.join("config.json")).expect("mkdir");
    refused(
        &moe(&["inspect", s(&d)]),
        &["config.json is a directory, not a regular file"],
    );
    refused(
        &moe(&["inspect", s(&d.join("absent.safetensors"))]),
        &["absent.safetensors"],
    );
}

/// An index named without a directory (`moe inspect model.safetensors.index.json` inside the checkpoint): its
/// shards are found next to it, in the current directory.
#[test]
fn index_in_the_current_directory() {
    let d = scratch("cwd-index");
    sharded(&d, "a.safetensors");
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"gate.weight": "a.safetensors"}}).to_string(),
    )
    .expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["inspect", "model.safetensors.index.json"])
        .current_dir(&d)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("gate.weight F32 [2, 2]"),
        "{}",
        stdout(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(["inspect", "a.safetensors"])
        .current_dir(&d)
        .output()
        .expect("runs");
    assert!(o.status.success(), "{}", stderr(&o));
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf");

/// F-17: every format `moe inspect` and `moe verify` accept is honoured; CSV output holds CSV lines only.
#[test]
fn f17_every_accepted_format_is_honoured() {
    let file = format!("{FIXTURES}/mixtral.safetensors");
    let o = moe(&["inspect", &file, "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"block,tensor,dtype,shape"), "{out}");
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines.contains(&",gate.weight,F32,\"[8, 64]\""), "{out}");
    let o = moe(&["inspect", &file, "--format", "markdown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("- **family**: mixtral"), "{out}");
    assert!(out.contains("| block | tensor | dtype | shape |"), "{out}");
    assert!(out.contains("|  | gate.weight | F32 | [8, 64] |"), "{out}");
    let o = moe(&["verify", FIXTURES, "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10, "header + 9 cases only:\n{out}");
    assert!(lines.iter().all(|l| l.contains(',')), "{out}");
    assert!(!out.contains("tolerance:"), "{out}");
    let o = moe(&["verify", FIXTURES, "--format", "markdown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("| case | family |"),
        "{}",
        stdout(&o)
    );
}

/// Tensor names from a file are printed with control characters escaped.
#[test]
fn inspect_escapes_control_characters_in_names() {
    let d = scratch("esc");
    let p = d.join("x.safetensors");
    std::fs::write(
        &p,
        safetensors(&[
            ("gate.weight\n\u{1b}[2J", vec![2, 2], vec![0.0; 4]),
            ("gate.weight", vec![2, 2], vec![0.0; 4]),
        ]),
    )
    .expect("write");
    let o = moe(&["inspect", s(&p)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(out.contains("gate.weight\\n\\u{1b}[2J"), "{out}");
}
