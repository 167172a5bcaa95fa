use moe_train::trainer::{LmRun, train_lm};
use moe_train::*;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let router = args.get(1).cloned().unwrap_or("dense".into());
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let text = std::fs::read("/tmp/corpus.txt").expect("corpus");
    let c = Corpus::from_bytes("x", text, 100).expect("c");
    let kind = if router == "dense" {
        FfnKind::Dense
    } else {
        FfnKind::Moe {
            router: router.clone(),
            options: Default::default(),
        }
    };
    let model = LmConfig::charlm(FfnConfig {
        kind,
        bank: BankKind::Mlp,
        experts: 8,
        top_k: 2,
        expert_width: 256,
    });
    let registry = moe_routers::builtin();
    let train = TrainConfig {
        steps,
        eval_interval: steps,
        eval_batches: 2,
        ..TrainConfig::default()
    };
    let r = train_lm(
        &LmRun {
            registry: &registry,
            model,
            train,
            threads,
            save: None,
            resume: None,
            stop_after: None,
        },
        &c,
        &mut NoProgress,
    )
    .expect("run");
    println!(
        "{router}: {:.0} tokens/s, val {:.4}, {:.1}s, active {} total {}",
        r.tokens_per_s, r.final_val_loss, r.wall_s, r.active_params, r.total_params
    );
}
