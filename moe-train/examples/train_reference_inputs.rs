//! Writes the inputs of a PyTorch reference directory (`tests/fixtures/train-ref/`): our initial weights, the
//! first `steps` batches of a generated corpus, the configuration. Usage:
//! `cargo run --release -p moe-train --example train_reference_inputs -- DIR dense|ROUTER [steps]`
//! then `python scripts/train_reference.py --dir DIR`.

use std::path::PathBuf;

use moe_train::{BankKind, Corpus, FfnConfig, FfnKind, LmConfig, OptimConfig, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: DIR dense|ROUTER [steps]")?);
    let ffn = args.next().ok_or("usage: DIR dense|ROUTER [steps]")?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let kind = match ffn.as_str() {
        "dense" => FfnKind::Dense,
        router => FfnKind::Moe {
            router: router.to_string(),
            options: Default::default(),
        },
    };
    let model = LmConfig {
        vocab: 256,
        d_model: 32,
        n_layers: 2,
        n_heads: 2,
        context: 16,
        norm_eps: 1e-5,
        ffn: FfnConfig {
            kind,
            bank: BankKind::Mlp,
            experts: 4,
            top_k: 2,
            expert_width: 32,
        },
    };
    let train = TrainConfig {
        steps,
        batch: 4,
        eval_interval: 10,
        eval_batches: 2,
        seed: 1,
        optim: OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 5,
            ..OptimConfig::default()
        },
        ..TrainConfig::default()
    };
    let text =
        b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
            .repeat(200);
    let corpus = Corpus::from_bytes("generated", text, model.context + 2)?;
    let registry = moe_routers::builtin();
    moe_train::reference::write_inputs(&dir, &registry, &model, &train, &corpus)?;
    println!("wrote {}", dir.display());
    Ok(())
}
