//! The `charlm` loop end to end on a small corpus: the loss falls, curves are bit-identical on 1 and 2 threads,
//! a resumed run continues the uninterrupted curve, and bad runs stop with clear errors.

use moe_train::trainer::{LmRun, train_lm};
use moe_train::{
    BankKind, Corpus, FfnConfig, FfnKind, LmConfig, NoProgress, OptimConfig, TrainConfig,
};

/// Text with structure a tiny model learns within 50 steps.
fn corpus() -> Corpus {
    let words = [
        "the ", "cat ", "sat ", "on ", "mat ", "and ", "a ", "dog ", "ran ", "far ", "away. ",
    ];
    let mut text = String::new();
    let mut x = 7u64;
    for _ in 0..6000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 33) as usize % words.len()]);
    }
    Corpus::from_bytes("generated", text.into_bytes(), 64).expect("corpus")
}

fn model(kind: FfnKind) -> LmConfig {
    LmConfig {
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
    }
}

fn moe(router: &str) -> FfnKind {
    FfnKind::Moe {
        router: router.into(),
        options: Default::default(),
    }
}

fn train(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch: 8,
        eval_interval: 10,
        eval_batches: 4,
        seed: 5,
        optim: OptimConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 5,
            ..OptimConfig::default()
        },
        ..TrainConfig::default()
    }
}

fn run<'a>(
    registry: &'a moe_core::RouterRegistry,
    kind: FfnKind,
    steps: usize,
    threads: usize,
) -> LmRun<'a> {
    LmRun {
        registry,
        model: model(kind),
        train: train(steps),
        threads,
        save: None,
        resume: None,
        stop_after: None,
    }
}

#[test]
fn fifty_steps_lower_the_loss_for_dense_and_moe() {
    let registry = moe_routers::builtin();
    let c = corpus();
    for kind in [FfnKind::Dense, moe("softmax-topk"), moe("switch-top1")] {
        let r = train_lm(&run(&registry, kind, 50, 2), &c, &mut NoProgress).expect("train");
        let first = r.curve[0].val_loss;
        eprintln!(
            "{}: val {first:.4} -> {:.4} nats/byte, {:.0} tokens/s, cv {:.3}",
            r.label, r.final_val_loss, r.tokens_per_s, r.load_cv
        );
        assert_eq!(r.curve.len(), 5);
        assert!(
            r.final_val_loss < 0.8 * first,
            "{}: {first} -> {}",
            r.label,
            r.final_val_loss
        );
        assert!(r.final_val_loss < 3.0, "{}: {}", r.label, r.final_val_loss);
        assert!(r.active_params <= r.total_params);
    }
}

#[test]
fn curves_are_bit_identical_on_one_and_two_threads() {
    let registry = moe_routers::builtin();
    let c = corpus();
    for kind in [moe("softmax-topk"), moe("noisy-topk")] {
        let a =
            train_lm(&run(&registry, kind.clone(), 20, 1), &c, &mut NoProgress).expect("1 thread");
        let b = train_lm(&run(&registry, kind, 20, 2), &c, &mut NoProgress).expect("2 threads");
        let bits = |r: &moe_train::RunReport| -> Vec<(u64, u64)> {
            r.curve
                .iter()
                .map(|p| (p.train_loss.to_bits(), p.val_loss.to_bits()))
                .collect()
        };
        assert_eq!(bits(&a), bits(&b), "{}", a.label);
    }
}

#[test]
fn a_resumed_run_continues_the_uninterrupted_curve() {
    let registry = moe_routers::builtin();
    let c = corpus();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ckpt.safetensors");
    let kind = moe("softmax-topk");
    let whole = train_lm(&run(&registry, kind.clone(), 30, 2), &c, &mut NoProgress).expect("whole");
    let mut first = run(&registry, kind.clone(), 30, 2);
    first.save = Some(path.clone());
    first.stop_after = Some(20);
    train_lm(&first, &c, &mut NoProgress).expect("first part");
    let info = moe_train::checkpoint::read_info(&path).expect("info");
    assert_eq!(info.step, 20);
    let mut second = run(&registry, kind, 30, 1);
    second.resume = Some(path.clone());
    let resumed = train_lm(&second, &c, &mut NoProgress).expect("resumed");
    let bits = |r: &moe_train::RunReport| -> Vec<(usize, u64, u64)> {
        r.curve
            .iter()
            .map(|p| (p.step, p.train_loss.to_bits(), p.val_loss.to_bits()))
            .collect()
    };
    assert_eq!(bits(&whole), bits(&resumed));
    // A checkpoint of another shape is refused with the field that differs.
    let mut other = run(&registry, moe("softmax-topk"), 30, 1);
    other.model.d_model = 48;
    other.resume = Some(path.clone());
    let e = train_lm(&other, &c, &mut NoProgress).expect_err("another shape");
    assert!(
        e.to_string()
            .contains("d_model is 32 in the checkpoint, 48 in this run"),
        "{e}"
    );
    // So is one of another loop: its batches and schedule would not continue the saved curve.
    let mut other = run(&registry, moe("softmax-topk"), 30, 1);
    other.train.batch += 1;
    other.resume = Some(path.clone());
    let e = train_lm(&other, &c, &mut NoProgress).expect_err("another loop");
    assert!(
        e.to_string()
            .contains("another training configuration (batch is "),
        "{e}"
    );
}

#[test]
fn a_nan_stops_the_run_naming_the_step() {
    let registry = moe_routers::builtin();
    let mut r = run(&registry, FfnKind::Dense, 20, 1);
    r.train.optim.lr = 1e30;
    r.train.optim.grad_clip = 0.0;
    r.train.optim.warmup = 0;
    let e = train_lm(&r, &corpus(), &mut NoProgress).expect_err("diverges");
    assert!(matches!(e, moe_train::TrainError::NonFinite { .. }), "{e}");
    assert!(e.to_string().contains("at step"), "{e}");
}

#[test]
fn non_causal_routers_train_with_the_leak_stated() {
    let registry = moe_routers::builtin();
    let r = train_lm(
        &run(&registry, moe("expert-choice"), 10, 2),
        &corpus(),
        &mut NoProgress,
    )
    .expect("train");
    assert!(!r.causal);
    assert!(r.leak.as_deref().is_some_and(|l| l.contains("not causal")));
}

#[test]
fn peer_is_sized_for_equal_active_parameters_and_trains() {
    let registry = moe_routers::builtin();
    let r = train_lm(
        &run(&registry, moe("peer"), 10, 2),
        &corpus(),
        &mut NoProgress,
    )
    .expect("peer trains");
    let dense = train_lm(
        &run(&registry, FfnKind::Dense, 10, 2),
        &corpus(),
        &mut NoProgress,
    )
    .expect("dense");
    eprintln!(
        "peer: active {} total {}; dense active {}",
        r.active_params, r.total_params, dense.active_params
    );
    // k · F = 64 hidden units per token in both; PEER's query projections and keys add router parameters.
    assert!(
        r.active_params >= dense.active_params,
        "{} < {}",
        r.active_params,
        dense.active_params
    );
    assert!(r.final_val_loss.is_finite());
}

#[test]
fn a_routers_own_k_counts_in_the_active_parameters() {
    let mut options = serde_json::Map::new();
    options.insert("k".into(), 3.into());
    let mut m = model(moe("softmax-topk"));
    m.ffn.kind = FfnKind::Moe {
        router: "softmax-topk".into(),
        options,
    };
    assert_eq!(moe_train::model::ffn_shape(&m).per_token, 3);
    assert_eq!(
        moe_train::model::ffn_shape(&model(moe("softmax-topk"))).per_token,
        m.ffn.top_k
    );
}
