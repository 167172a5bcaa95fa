//! The whole training step against PyTorch: `tests/fixtures/train-ref/{dense,softmax-topk}` hold our initial
//! weights, 20 batches and the per-step losses `scripts/train_reference.py` got from them with torch (the same
//! model, AdamW, schedule and clipping written in plain torch; README there). Our replay of the same 20 steps must
//! agree within 1e-4 relative at every step: an error anywhere in the forward, the backward, the optimizer or the
//! schedule shows by step 2.

use std::path::PathBuf;

use moe_train::reference::{read_reference, replay};

/// Relative agreement required at every step.
const RTOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    let root = std::env::var_os("MOE_TRAIN_REF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train-ref")
        });
    root.join(name)
}

fn check(name: &str) {
    let dir = fixture(name);
    let (ours, lm) = replay(&dir, &moe_routers::builtin()).expect("replay");
    let torch = read_reference(&dir).expect("reference.json");
    assert_eq!(ours.loss.len(), torch.loss.len(), "{name}: steps");
    assert!(ours.loss.len() >= 20, "{name}: fewer than 20 steps");
    let mut worst = 0.0f64;
    for (what, a, b) in [
        ("loss", &ours.loss, &torch.loss),
        ("ce", &ours.ce, &torch.ce),
        ("lr", &ours.lr, &torch.lr),
    ] {
        for (s, (x, y)) in a.iter().zip(b).enumerate() {
            let rel = (x - y).abs() / y.abs().max(1e-12);
            worst = worst.max(rel);
            assert!(
                rel <= RTOL,
                "{name}: step {s} {what}: ours {x}, torch {y} (relative {rel:.2e})"
            );
        }
    }
    // The aux term is small next to the cross-entropy: compare it to the loss's scale.
    for (s, (x, y)) in ours.aux.iter().zip(&torch.aux).enumerate() {
        assert!(
            (x - y).abs() <= RTOL * torch.loss[s].abs(),
            "{name}: step {s} aux: ours {x}, torch {y}"
        );
    }
    for (s, (x, y)) in ours.grad_norm.iter().zip(&torch.grad_norm).enumerate() {
        let rel = (x - y).abs() / y.abs().max(1e-12);
        assert!(
            rel <= 1e-3,
            "{name}: step {s} gradient norm: ours {x}, torch {y}"
        );
    }
    // The weights after the last step (`final.safetensors`, written by the script), tensor by tensor.
    let registry = moe_routers::builtin();
    let cfg = moe_train::reference::read_config(&dir).expect("config");
    let theirs = moe_train::checkpoint::load_weights(
        &dir.join("final.safetensors"),
        &registry,
        &cfg.model,
        0,
    )
    .expect("final weights");
    let mut worst_w = 0.0f32;
    for ((n, a), (m, b)) in lm.named_params().into_iter().zip(theirs.named_params()) {
        assert_eq!(n, m);
        let scale = b.iter().fold(0.0f32, |x, v| x.max(v.abs())).max(1e-3);
        let diff = a
            .iter()
            .zip(b.iter())
            .fold(0.0f32, |x, (p, q)| x.max((p - q).abs()));
        worst_w = worst_w.max(diff / scale);
        assert!(
            diff <= 1e-4 * scale,
            "{name}: {n} after training differs by {diff} (scale {scale})"
        );
    }
    eprintln!("{name}: worst relative weight difference after training {worst_w:.2e}");
    eprintln!(
        "{name}: {} steps, worst relative difference of the losses {worst:.2e}",
        ours.loss.len()
    );
}

#[test]
fn dense_training_steps_match_pytorch() {
    check("dense");
}

#[test]
fn softmax_topk_training_steps_match_pytorch() {
    check("softmax-topk");
}
