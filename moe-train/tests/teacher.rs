//! The teacher task end to end: a `softmax-topk` student learns the teacher's routing (ARI ≥ 0.9) and its MSE
//! falls, in seconds on 2 cores; the report is bit-identical on 1 and 2 threads; bad configurations are errors.

use moe_train::config::{BankKind, FfnConfig, FfnKind, OptimConfig, TrainConfig};
use moe_train::teacher::{TeacherConfig, train_teacher};
use moe_train::{NoProgress, RunReport, TrainError};

thread_local! {
    static SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn unsafe_set(s: u64) {
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
fn explore() {
    let routers = std::env::var("T_ROUTERS").unwrap_or_else(|_| "softmax-topk".into());
    let seeds: u64 = env_or("T_SEEDS", 0);
    if seeds > 0 {
        for r in routers.split(',') {
            let mut aris = Vec::new();
            for s in 1..=seeds {
                unsafe_set(s);
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
