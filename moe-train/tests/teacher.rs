//! The teacher task end to end: a `softmax-topk` student learns the teacher's routing (ARI ≥ 0.9) and its MSE
//! falls, in seconds on 2 cores; the report is bit-identical on 1 and 2 threads; bad configurations are errors.
//!
//! The pinned configuration (E = 8, k = 2, F = 32, d = 32, 256 samples a step, 300 steps, AdamW 1e-2 → 1e-3,
//! train seed 1, teacher seed 0) reaches ARI 0.998 and a validation MSE of 0.010 (0.073 after 50 steps) in about
//! 1.3 s here. Other seeds of the same configuration often end in a local optimum where two clusters share a
//! top-1 expert (ARI about 0.83): top-k routing only compares the k experts it chose. `explore` (ignored) prints
//! runs for other settings: `T_SEEDS=6 T_ROUTERS=softmax-topk,noisy-topk cargo test -p moe-train --test teacher
//! -- --ignored --nocapture`.

use moe_train::config::{BankKind, FfnConfig, FfnKind, OptimConfig, TrainConfig};
use moe_train::teacher::{TeacherConfig, train_teacher};
use moe_train::{NoProgress, RunReport, TrainError};

thread_local! {
    static SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn set_seed(s: u64) {
    SEED.with(|c| c.set(Some(s)));
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ffn(router: &str) -> FfnConfig {
    FfnConfig {
        kind: if router == "dense" {
            FfnKind::Dense
        } else {
            FfnKind::Moe {
                router: router.into(),
                options: std::env::var("T_OPTS")
                    .ok()
                    .and_then(|v| serde_json::from_str(&v).ok())
                    .unwrap_or_default(),
            }
        },
        bank: BankKind::Mlp,
        experts: env_or("T_E", 8),
        top_k: env_or("T_K", 2),
        expert_width: env_or("T_F", 32),
    }
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        steps: env_or("T_STEPS", 300),
        batch: 1,
        eval_interval: 50,
        eval_batches: 1,
        seed: SEED
            .with(|c| c.get())
            .unwrap_or_else(|| env_or("T_SEED", 1)),
        optim: OptimConfig {
            lr: env_or("T_LR", 1e-2),
            min_lr: env_or("T_LR", 1e-2) / 10.0,
            warmup: 20,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
        aux_coef: std::env::var("T_AUX").ok().and_then(|v| v.parse().ok()),
        ..TrainConfig::default()
    }
}

fn run(router: &str, threads: usize) -> Result<RunReport, TrainError> {
    let cfg = TeacherConfig {
        noise: env_or("T_NOISE", TeacherConfig::default().noise),
        student_init: env_or("T_INIT", TeacherConfig::default().student_init),
        seed: SEED
            .with(|c| c.get())
            .unwrap_or_else(|| env_or("T_TSEED", 0)),
        d_model: env_or("T_D", TeacherConfig::default().d_model),
        gain: env_or("T_GAIN", TeacherConfig::default().gain),
        batch: env_or("T_B", TeacherConfig::default().batch),
        ..TeacherConfig::default()
    };
    train_teacher(
        &moe_routers::builtin(),
        &ffn(router),
        &cfg,
        &train_cfg(),
        threads,
        &mut NoProgress,
    )
}

fn show(r: &RunReport) {
    eprintln!(
        "{}: ari {:?} val {:.4} (best {:.4} @ {}) train {:.4} cv {:.3} dead {} logit {:.2} {:.0} samples/s {:.2} s",
        r.label,
        r.ari,
        r.final_val_loss,
        r.best_val_loss,
        r.best_step,
        r.final_train_loss,
        r.load_cv,
        r.dead_experts,
        r.max_router_logit,
        r.tokens_per_s,
        r.wall_s
    );
    for p in &r.curve {
        eprintln!(
            "  step {:4} train {:.4} val {:.4} cv {:.3}",
            p.step, p.train_loss, p.val_loss, p.load_cv
        );
    }
}

#[test]
#[ignore = "tuning aid: prints runs for the settings in T_* variables"]
fn explore() {
    let routers = std::env::var("T_ROUTERS").unwrap_or_else(|_| "softmax-topk".into());
    let seeds: u64 = env_or("T_SEEDS", 0);
    if seeds > 0 {
        for r in routers.split(',') {
            let mut aris = Vec::new();
            for s in 1..=seeds {
                set_seed(s);
                let rep = run(r, 2).expect("run");
                aris.push(format!(
                    "{:.3}/{:.4}",
                    rep.ari.unwrap_or(f64::NAN),
                    rep.final_val_loss
                ));
            }
            eprintln!("{r}: {}", aris.join(" "));
        }
        return;
    }
    for r in routers.split(',') {
        match run(r, 2) {
            Ok(rep) => show(&rep),
            Err(e) => eprintln!("{r}: {e}"),
        }
    }
}

/// The report without its timings (the only fields that depend on the machine).
fn timeless(mut r: RunReport) -> RunReport {
    r.tokens_per_s = 0.0;
    r.wall_s = 0.0;
    r
}

fn pinned(router: &str, steps: usize, threads: usize) -> Result<RunReport, TrainError> {
    let train = TrainConfig {
        steps,
        ..train_cfg_pinned()
    };
    train_teacher(
        &moe_routers::builtin(),
        &ffn_pinned(router),
        &TeacherConfig::default(),
        &train,
        threads,
        &mut NoProgress,
    )
}

fn ffn_pinned(router: &str) -> FfnConfig {
    FfnConfig {
        kind: if router == "dense" {
            FfnKind::Dense
        } else {
            FfnKind::Moe {
                router: router.into(),
                options: Default::default(),
            }
        },
        bank: BankKind::Mlp,
        experts: 8,
        top_k: 2,
        expert_width: 32,
    }
}

fn train_cfg_pinned() -> TrainConfig {
    TrainConfig {
        steps: 300,
        batch: 1,
        eval_interval: 50,
        eval_batches: 1,
        seed: 1,
        optim: OptimConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup: 20,
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
        ..TrainConfig::default()
    }
}

#[test]
fn softmax_topk_student_learns_the_teachers_routing_and_its_mse_falls() {
    let t0 = std::time::Instant::now();
    let r = pinned("softmax-topk", 300, 2).expect("train");
    show(&r);
    let secs = t0.elapsed().as_secs_f64();
    let ari = r.ari.expect("the teacher task reports an ARI");
    assert!(ari >= 0.9, "ARI {ari}");
    assert_eq!(r.curve.len(), 6);
    let first = &r.curve[0];
    assert!(
        r.final_val_loss < 0.3 * first.val_loss,
        "validation MSE {} -> {}",
        first.val_loss,
        r.final_val_loss
    );
    assert!(r.final_train_loss < 0.3 * first.train_loss);
    assert!(r.best_val_loss <= r.final_val_loss && r.best_step == 300);
    assert_eq!(
        (r.steps, r.tokens_per_step, r.label.as_str()),
        (300, 256, "softmax-topk")
    );
    assert!(r.causal && r.leak.is_none());
    assert_eq!(r.dead_experts, 0);
    assert!(r.max_router_logit > 0.0 && r.load_cv.is_finite() && r.dropped_pct == 0.0);
    for p in &r.curve {
        assert_eq!(p.load.len(), 1);
        assert!((p.load[0].iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
    assert!(r.active_params < r.total_params);
    assert!(secs < 30.0, "{secs:.1} s");
}

#[test]
fn reports_are_bit_identical_on_1_and_2_threads() {
    for router in ["softmax-topk", "noisy-topk"] {
        let one = timeless(pinned(router, 60, 1).expect("1 thread"));
        let two = timeless(pinned(router, 60, 2).expect("2 threads"));
        assert_eq!(one, two, "{router}");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let current = pool
            .install(|| pinned(router, 60, 0))
            .expect("current pool");
        assert_eq!(one, timeless(current), "{router} on the current pool");
    }
}

#[test]
fn the_dense_baseline_trains_and_has_no_routing_to_agree_with() {
    let r = pinned("dense", 60, 2).expect("dense");
    assert_eq!(r.label, "dense");
    assert_eq!(r.ari, Some(0.0));
    assert!(r.curve.iter().all(|p| p.load.is_empty()));
    assert!(r.final_val_loss < r.curve[0].train_loss);
    assert_eq!(r.active_params, r.total_params);
    assert_eq!(r.active_params, 2 * 64 * 32);
}

#[test]
fn bad_configurations_are_clear_errors() {
    let msg = pinned("nope", 10, 1).expect_err("unknown").to_string();
    assert!(
        msg.contains("nope") && msg.contains("softmax-topk"),
        "{msg}"
    );
    let msg = pinned("peer", 10, 1)
        .expect_err("8 is not a square")
        .to_string();
    assert!(msg.contains("square"), "{msg}");
    let reg = moe_routers::builtin();
    let mut ffn = ffn_pinned("softmax-topk");
    ffn.top_k = 9;
    let train = TrainConfig {
        steps: 5,
        ..train_cfg_pinned()
    };
    let err = train_teacher(
        &reg,
        &ffn,
        &TeacherConfig::default(),
        &train,
        1,
        &mut NoProgress,
    )
    .expect_err("k > E");
    assert!(err.to_string().contains("top_k"), "{err}");
    let cfg = TeacherConfig {
        noise: f32::NAN,
        ..TeacherConfig::default()
    };
    let err = train_teacher(
        &reg,
        &ffn_pinned("softmax-topk"),
        &cfg,
        &train,
        1,
        &mut NoProgress,
    )
    .expect_err("NaN noise");
    assert!(err.to_string().contains("teacher.noise"), "{err}");
    assert!(err.is_bad_input());
}
