//! Routing traces of a trained model: a tiny run's trace on the validation set parses back, has one step per
//! validation batch of `B · C` tokens per layer, predictions for layers `>= 1` only, a header naming the model,
//! does not depend on the thread count, and the dense baseline is refused.

use moe_core::store::trace::RoutingTrace;
use moe_train::trace::{record_trace, record_trace_on};
use moe_train::trainer::{LmRun, train_lm_model};
use moe_train::{
    BankKind, Corpus, FfnConfig, FfnKind, LmConfig, NoProgress, OptimConfig, TrainConfig,
};

fn corpus() -> Corpus {
    let text = moe_train::data::generated(3, 60_000);
    Corpus::from_bytes("generated", text, 64).expect("corpus")
}

fn run(registry: &moe_core::RouterRegistry, kind: FfnKind, threads: usize) -> LmRun<'_> {
    LmRun {
        registry,
        model: LmConfig {
            vocab: 256,
            d_model: 32,
            n_layers: 3,
            n_heads: 2,
            context: 16,
            norm_eps: 1e-5,
            ffn: FfnConfig {
                kind,
                bank: BankKind::Mlp,
                experts: 6,
                top_k: 2,
                expert_width: 16,
            },
        },
        train: TrainConfig {
            steps: 6,
            batch: 4,
            eval_interval: 3,
            eval_batches: 3,
            seed: 11,
            optim: OptimConfig {
                lr: 3e-3,
                warmup: 2,
                ..OptimConfig::default()
            },
            ..TrainConfig::default()
        },
        threads,
        save: None,
        resume: None,
        stop_after: None,
    }
}

fn moe(router: &str) -> FfnKind {
    FfnKind::Moe {
        router: router.into(),
        options: Default::default(),
    }
}

#[test]
fn a_trained_models_trace_has_every_layer_and_the_next_layer_predictions() {
    let registry = moe_routers::builtin();
    let c = corpus();
    let r = run(&registry, moe("softmax-topk"), 2);
    let (report, mut lm) = train_lm_model(&r, &c, &mut NoProgress).expect("train");
    assert_eq!(report.steps, 6);
    let trace = record_trace(&mut lm, &r, &c).expect("trace");
    let h = trace.header();
    assert_eq!((h.n_layers, h.n_experts, h.top_k), (3, 6, 2));
    assert_eq!(h.expert_bytes, 4 * 2 * 32 * 16);
    assert_eq!(h.router, "softmax-topk");
    assert_eq!(
        h.model,
        "moe train charlm softmax-topk d32 L3 E6 k2 seed 11 (validation set, 192 tokens)"
    );
    assert_eq!(trace.steps().len(), 3);
    let mut agree = 0usize;
    for step in trace.steps() {
        assert_eq!(step.len(), 3);
        for (l, rec) in step.iter().enumerate() {
            assert_eq!(rec.n_tokens(), 4 * 16);
            assert_eq!(rec.predicted.is_some(), l >= 1, "layer {l}");
            for t in 0..rec.n_tokens() {
                assert_eq!(rec.token(t).len(), 2);
                if l >= 1 {
                    let p = rec.predicted_token(t);
                    assert_eq!(p.len(), 2);
                    agree += p.iter().filter(|e| rec.token(t).contains(e)).count();
                }
            }
        }
    }
    eprintln!(
        "next-layer gate prediction: {agree} of {} used experts predicted",
        3 * 2 * 64 * 2
    );
    let back = RoutingTrace::from_bytes(&trace.to_bytes()).expect("parses");
    assert_eq!(back, trace);
    // The same model on one thread records the same trace; recording twice changes nothing.
    let one = run(&registry, moe("softmax-topk"), 1);
    let (_, mut lm1) = train_lm_model(&one, &c, &mut NoProgress).expect("train");
    assert_eq!(record_trace(&mut lm1, &one, &c).expect("trace"), trace);
    assert_eq!(record_trace(&mut lm, &r, &c).expect("trace"), trace);
}

#[test]
fn one_expert_routers_and_the_dense_baseline() {
    let registry = moe_routers::builtin();
    let c = corpus();
    let r = run(&registry, moe("switch-top1"), 1);
    let (_, mut lm) = train_lm_model(&r, &c, &mut NoProgress).expect("train");
    let trace = record_trace(&mut lm, &r, &c).expect("trace");
    assert_eq!(trace.header().top_k, 1);
    // switch-top1's experts are k · F wide (equal active parameters).
    assert_eq!(trace.header().expert_bytes, 4 * 2 * 32 * 32);
    for step in trace.steps() {
        for rec in step {
            assert!((0..rec.n_tokens()).all(|t| rec.token(t).len() <= 1));
        }
    }
    let d = run(&registry, FfnKind::Dense, 1);
    let (_, mut dense) = train_lm_model(&d, &c, &mut NoProgress).expect("train");
    let val = moe_train::data::val_batches(&c, 1, 4, 16);
    let err = record_trace_on(&mut dense, &val, 11).expect_err("dense has no trace");
    assert!(err.to_string().contains("dense"), "{err}");
}
