//! End-to-end tests of `moe train` (and of `moe inspect` on its checkpoints) through the built binary: a tiny
//! `charlm` run on the generated corpus in every format, the plot, checkpoints, and the errors users see.
//!
//! Tiny configuration everywhere (d 32, 2 layers, 2 heads, context 16, batch 4, 4 experts of width 32, 20 steps)
//! so that each run takes well under a second of training.

mod common;

use common::{moe, scratch, stderr, stdout};

use std::path::Path;
use std::process::{Command, Output};

/// The tiny configuration, on the generated corpus.
const TINY: &[&str] = &[
    "train",
    "--corpus",
    "generated",
    "--steps",
    "20",
    "--batch",
    "4",
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
    "32",
    "--warmup",
    "5",
    "--eval-interval",
    "10",
    "--eval-batches",
    "2",
];

/// The tiny configuration with `extra`: a flag of the configuration given again replaces its value there.
fn tiny_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args: Vec<&str> = TINY.to_vec();
    let mut i = 0;
    while i < extra.len() {
        let known = extra[i].starts_with("--") && i + 1 < extra.len();
        match args.iter().position(|a| *a == extra[i]).filter(|_| known) {
            Some(at) => {
                args[at + 1] = extra[i + 1];
                i += 2;
            }
            _ => {
                args.push(extra[i]);
                i += 1;
            }
        }
    }
    args
}

/// `moe train` with the tiny configuration and `extra`.
fn tiny(extra: &[&str]) -> Output {
    moe(&tiny_args(extra))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Asserts exit 2, no panic, and every one of `needles` in the error.
fn refused(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{}{err}", stdout(o));
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}

#[test]
fn tiny_run_prints_every_format() {
    let o = tiny(&["--routers", "softmax-topk", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(doc["task"], "charlm");
    assert!(doc["threads"].as_u64().is_some_and(|t| t >= 1));
    assert_eq!(doc["config"]["model"]["d_model"], 32);
    assert_eq!(doc["config"]["train"]["steps"], 20);
    assert_eq!(doc["corpus"]["name"], "generated");
    assert!(doc["cpu"].is_string());
    let runs = doc["runs"].as_array().expect("runs");
    let labels: Vec<&str> = runs.iter().filter_map(|r| r["label"].as_str()).collect();
    assert_eq!(labels, ["dense", "softmax-topk"]);
    for r in runs {
        let val = r["final_val_loss"].as_f64().expect("val loss");
        // A byte model at initialisation predicts about uniformly: ln 256 ≈ 5.55 nats; 20 steps must not be worse.
        assert!(val.is_finite() && val > 0.0 && val < 5.6, "{r}");
        assert_eq!(r["steps"], 20);
        assert!(r["tokens_per_s"].as_f64().expect("tok/s") > 0.0);
        assert!(!r["curve"].as_array().expect("curve").is_empty());
    }
    assert!(doc["failed"].as_array().expect("failed").is_empty());

    let o = tiny(&["--routers", "softmax-topk"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "task charlm on corpus generated",
        "val nats/B",
        "val bits/B",
        "softmax-topk",
        "dense",
        "baseline",
        "at equal active parameters",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from\n{out}");
    }

    let o = tiny(&["--routers", "softmax-topk", "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "one header line and one line per run:\n{out}"
    );
    assert!(
        lines[0].starts_with("run,final_val_loss,final_val_bits_per_byte,best_val_loss,best_step"),
        "{out}"
    );
    assert!(lines[1].starts_with("dense,") && lines[2].starts_with("softmax-topk,"));
    let cols = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == cols), "{out}");
    // Unrounded numbers, one per column: the loss reads back as the JSON's.
    let loss: f64 = lines[2]
        .split(',')
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(loss.is_finite() && loss > 0.0, "{out}");

    let o = tiny(&["--routers", "softmax-topk", "--format", "markdown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("| run | val nats/B |"), "{out}");
    assert!(out.contains("| softmax-topk |"), "{out}");
}

#[test]
fn plot_writes_one_svg_of_two_panels() {
    let dir = scratch("train-plot");
    let svg = dir.join("curves.svg");
    let o = tiny(&["--routers", "softmax-topk", "--plot", s(&svg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).expect("svg written");
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(text.contains("validation loss") && text.contains("load CV"));
    // Validation loss: dense and softmax-topk; load CV: softmax-topk alone.
    assert_eq!(text.matches("<polyline").count(), 3, "{text}");
    assert!(text.contains(">softmax-topk<") && text.contains(">dense<"));
}

#[test]
fn save_then_inspect_prints_the_checkpoint_in_every_format() {
    let dir = scratch("train-save");
    let o = tiny(&["--routers", "softmax-topk", "--save", s(&dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ckpt = dir.join("softmax-topk.safetensors");
    assert!(ckpt.is_file() && dir.join("dense.safetensors").is_file());

    let o = moe(&["inspect", s(&ckpt)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in [
        "label: softmax-topk",
        "step: 20 of 20",
        "d 32, 2 layers",
        "tok_emb",
        "blocks.1.ffn.router.gate",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from\n{out}");
    }

    let o = moe(&["inspect", s(&ckpt), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(doc["kind"], "moe-train");
    assert_eq!(doc["label"], "softmax-topk");
    assert_eq!(doc["step"], 20);
    assert_eq!(doc["model"]["n_layers"], 2);
    let tensors = doc["tensors"].as_array().expect("tensors");
    assert!(
        tensors
            .iter()
            .any(|t| t["name"] == "tok_emb" && t["shape"] == serde_json::json!([256, 32])),
        "{doc}"
    );

    let o = moe(&["inspect", s(&ckpt), "--format", "csv"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().next(), Some("tensor,shape"));
    assert_eq!(out.lines().count(), tensors.len() + 1);

    let o = moe(&["inspect", s(&ckpt), "--format", "markdown"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("- **label**: softmax-topk"));
}

#[test]
fn stop_then_resume_continues_the_run() {
    let dir = scratch("train-resume");
    let o = tiny(&[
        "--routers",
        "softmax-topk",
        "--no-dense",
        "--save",
        s(&dir),
        "--stop-after",
        "10",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = moe(&["inspect", s(&dir.join("softmax-topk.safetensors"))]);
    assert!(stdout(&o).contains("step: 10 of 20"), "{}", stdout(&o));
    let o = tiny(&[
        "--routers",
        "softmax-topk",
        "--no-dense",
        "--resume",
        s(&dir),
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    let o = tiny(&[
        "--routers",
        "softmax-topk",
        "--no-dense",
        "--format",
        "json",
    ]);
    let whole: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(
        resumed["runs"][0]["final_val_loss"], whole["runs"][0]["final_val_loss"],
        "a resumed run ends where an uninterrupted one does"
    );
}

#[test]
fn teacher_task_reports_mse_and_ari() {
    let o = moe(&[
        "train",
        "--task",
        "teacher",
        "--routers",
        "softmax-topk",
        "--experts",
        "4",
        "--steps",
        "20",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("val MSE") && out.contains("ARI"), "{out}");
    assert!(
        out.contains("softmax-topk") && out.contains("dense"),
        "{out}"
    );
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--threads", "0"], &["--threads must be at least 1"]),
        (&["--steps", "0"], &["--steps must be between 1"]),
        (&["--batch", "0"], &["--batch must be between 1"]),
        (&["--context", "0"], &["--context must be between 1"]),
        (&["--layers", "65"], &["--layers must be between 1 and 64"]),
        (
            &["--d-model", "100000"],
            &["--d-model must be between 1 and 8192"],
        ),
        (
            &["--heads", "3"],
            &["--heads must divide --d-model (32), got 3"],
        ),
        (
            &["--top-k", "5"],
            &["--top-k must be between 1 and 4, got 5"],
        ),
        (&["--experts", "0"], &["--experts must be between 1"]),
        (
            &["--expert-width", "0"],
            &["--expert-width must be between 1"],
        ),
        (
            &["--eval-batches", "0"],
            &["--eval-batches must be between 1"],
        ),
        (
            &["--stop-after", "21"],
            &["--stop-after must be between 1 and 20"],
        ),
        (&["--lr", "nan"], &["--lr must be a finite number"]),
        (&["--lr", "inf"], &["--lr must be a finite number"]),
        (&["--lr", "0"], &["--lr must be > 0"]),
        (
            &["--min-lr", "1"],
            &["--min-lr (1) must not exceed --lr (0.002)"],
        ),
        (
            &["--weight-decay", "-1"],
            &["--weight-decay must be a finite number"],
        ),
        (
            &["--grad-clip", "NaN"],
            &["--grad-clip must be a finite number"],
        ),
        (
            &["--aux-coef", "inf"],
            &["--aux-coef must be a finite number"],
        ),
        (&["--z-coef", "-0.5"], &["--z-coef must be a finite number"]),
        (
            &["--bias-rate", "nan"],
            &["--bias-rate must be a finite number"],
        ),
        (&["--bank", "moe"], &["--bank must be one of: mlp, swiglu"]),
        (&["--routers", "nope"], &["unknown router \"nope\""]),
        (
            &["--routers", "softmax-topk,softmax-topk"],
            &["softmax-topk is listed twice"],
        ),
        (&["--routers", "dense", "--no-dense"], &["nothing to train"]),
        (&["--task", "vision"], &["invalid value 'vision'"]),
        (
            &["--corpus", "/nonexistent/moe/corpus.txt"],
            &["/nonexistent/moe/corpus.txt"],
        ),
        (
            &[
                "--layers",
                "64",
                "--d-model",
                "8192",
                "--experts",
                "65536",
                "--expert-width",
                "65536",
            ],
            &["of memory"],
        ),
    ];
    for (extra, needles) in cases {
        let o = tiny(extra);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        refused(&o, needles);
    }
}

/// A NaN stops its run, naming the step and the layer in the run's row; the command exits 2 after printing.
#[test]
fn a_diverging_run_is_a_row_naming_step_and_layer() {
    let o = tiny(&[
        "--routers",
        "softmax-topk",
        "--no-dense",
        "--lr",
        "1e30",
        "--min-lr",
        "0",
        "--warmup",
        "0",
        "--grad-clip",
        "0",
    ]);
    // One run: its error is the command's.
    refused(&o, &["non-finite", "at step", "in layer"]);
    let o = tiny(&[
        "--routers",
        "softmax-topk",
        "--lr",
        "1e30",
        "--min-lr",
        "0",
        "--warmup",
        "0",
        "--grad-clip",
        "0",
        "--format",
        "csv",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let out = stdout(&o);
    let row = out
        .lines()
        .find(|l| l.starts_with("softmax-topk,"))
        .expect("a row for the run");
    assert!(
        row.contains("failed: non-finite") && row.contains("at step") && row.contains("in layer"),
        "{row}"
    );
    assert!(stderr(&o).contains("2 of 2 runs failed"), "{}", stderr(&o));
}

#[test]
fn teacher_task_refuses_the_language_model_flags() {
    for flag in [
        "--context",
        "--layers",
        "--heads",
        "--eval-batches",
        "--stop-after",
    ] {
        let o = moe(&["train", "--task", "teacher", flag, "2"]);
        refused(&o, &[flag, "applies to --task charlm only"]);
    }
    let o = moe(&["train", "--task", "teacher", "--corpus", "generated"]);
    refused(&o, &["--corpus applies to --task charlm only"]);
}

#[test]
fn resume_without_a_checkpoint_names_the_file() {
    let dir = scratch("train-resume-missing");
    let o = tiny(&["--routers", "softmax-topk", "--resume", s(&dir)]);
    refused(
        &o,
        &[
            "dense.safetensors",
            "for run dense",
            "write one with --save",
        ],
    );
}

#[test]
fn missing_corpus_says_how_to_fetch_it() {
    let cache = scratch("train-empty-cache");
    let args = tiny_args(&["--corpus", "shakespeare"]);
    let o = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(&args)
        .env("MOE_CACHE_DIR", &*cache)
        .output()
        .expect("the moe binary runs");
    refused(&o, &["corpus shakespeare", "--fetch-corpus shakespeare"]);
}

/// A plugin router without a backward: token `i` takes expert `i mod E` with weight 1.
mod no_backward {
    use moe_core::{
        Assignment, MoeError, Router, RouterArgs, RouterConfig, RouterEntry, RouterInput,
        RouterRegistry, Routing,
    };

    moe_core::router_options! {
        /// Options of `round-robin`.
        pub struct RoundRobinConfig {
            /// Unused.
            unused: f64 = 1.0,
        }
    }

    impl RouterConfig for RoundRobinConfig {
        fn is_causal(&self) -> bool {
            true
        }
    }

    #[derive(Clone, Debug)]
    struct RoundRobin {
        d: usize,
        e: usize,
    }

    impl Router for RoundRobin {
        fn name(&self) -> &str {
            "round-robin"
        }
        fn n_experts(&self) -> usize {
            self.e
        }
        fn d_model(&self) -> Option<usize> {
            Some(self.d)
        }
        fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
            let t = input.n_tokens();
            let kept = (0..t)
                .map(|i| Assignment {
                    token: i as u32,
                    expert: (i % self.e) as u32,
                    weight: 1.0,
                    rank: 0,
                })
                .collect();
            Routing::new(t, self.e, t, kept, Vec::new())
        }
    }

    fn factory(a: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
        Ok(Box::new(RoundRobin {
            d: a.d_model,
            e: a.n_experts,
        }))
    }

    /// The built-in routers plus `round-robin`.
    pub fn registry() -> RouterRegistry {
        let mut reg = moe_routers::builtin();
        reg.register(RouterEntry::new::<RoundRobinConfig>(
            "round-robin",
            "test plugin without a backward",
            factory,
        ))
        .expect("registers");
        reg
    }
}

/// A plugin without a backward is a row with the reason: named in `--routers` next to another router, the other
/// runs and the command exits 2; alone, its error is the command's (exit 2); in `all`, the command exits 0.
#[test]
fn a_router_without_backward_is_a_row_not_the_end() {
    use std::process::ExitCode;
    let run = |extra: &[&str]| {
        let mut args = vec!["moe"];
        args.extend(tiny_args(extra));
        moe_cli::run_from(no_backward::registry(), args)
    };
    assert_eq!(
        run(&["--routers", "round-robin,softmax-topk", "--format", "csv"]),
        ExitCode::from(2)
    );
    assert_eq!(
        run(&["--routers", "round-robin", "--no-dense", "--format", "csv"]),
        ExitCode::from(2)
    );
    // In the default set (`all`), a router that cannot be trained is a row and the command succeeds.
    assert_eq!(run(&["--format", "csv"]), ExitCode::SUCCESS);
}

/// A file whose header says `moe-train/1` but lacks the rest is refused by the checkpoint reader, exit 2, naming
/// the file and what is missing (not handed to the Hugging Face reader).
#[test]
fn inspect_refuses_a_broken_train_checkpoint() {
    let dir = scratch("train-broken-ckpt");
    let p = dir.join("broken.safetensors");
    let header = r#"{"__metadata__":{"format":"moe-train/1"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    std::fs::write(&p, common::raw_safetensors(header, &1f32.to_le_bytes())).expect("write");
    let o = moe(&["inspect", s(&p)]);
    refused(&o, &["broken.safetensors", "metadata has no"]);
}

/// `--help` lists the defaults as moe-train defines them (one source of the numbers).
#[test]
fn help_lists_the_defaults_of_moe_train() {
    let o = moe(&["train", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let t = moe_train::TrainConfig::default();
    let ffn = moe_train::FfnConfig::charlm(moe_train::FfnKind::Dense);
    let m = moe_train::LmConfig::charlm(ffn.clone());
    for needle in [
        format!("--steps {}", t.steps),
        format!("--d-model {}", m.d_model),
        format!("--experts {}", ffn.experts),
        format!("--expert-width {}", ffn.expert_width),
        "--fetch-corpus".to_string(),
    ] {
        assert!(out.contains(&needle), "{needle:?} missing from\n{out}");
    }
}

#[test]
fn a_bad_router_option_fails_before_any_run_trains() {
    // 1,000,000 steps of dense would take hours: the error must come before the first run.
    let started = std::time::Instant::now();
    let o = tiny(&["--steps", "1000000", "--routers", "softmax-topk:bogus=1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unknown field `bogus`"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed().as_secs() < 30, "it trained first");
}
