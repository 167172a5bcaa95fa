//! The CPU backend's PEER path (`cpu/peer.rs`): its forward gives the reference forward's bits, its training
//! forward and backward the same bits on 1 and 3 threads, and (ignored, run by hand) the time of one training
//! step of the `moe train` PEER layer (T = 768, d = 128, N = 2025, 16 heads × k = 32, GELU) on 1 thread.

use std::time::Instant;

use ndarray::Array2;

use moe_backends::cpu::{CpuBackend, reference_forward};
use moe_core::rng::SeqRng;
use moe_core::{
    Activation, Backend, ExpertBank, Grad, Mode, MoeLayer, PeerBank, RouterArgs, RouterInput,
};

/// A PEER layer as `moe train` builds it: `n²` experts, `heads` heads of `k`, width `d`, GELU.
fn peer_layer(d: usize, n: usize, heads: usize, k: usize, seed: u64) -> MoeLayer {
    let mut args = RouterArgs::new(d, n * n, 2, seed);
    args.n_experts = n * n;
    args.options.insert("heads".into(), heads.into());
    args.options.insert("k".into(), k.into());
    let router = moe_routers::builtin()
        .create("peer", &args)
        .expect("peer router");
    let mut rng = SeqRng::new(seed, 1);
    let bank = PeerBank::new(
        rng.normal_matrix(n * n, d, 0.02),
        rng.normal_matrix(n * n, d, 0.02 / 8f32.sqrt()),
        Activation::Gelu,
    )
    .expect("bank");
    MoeLayer::new(router, ExpertBank::Peer(bank))
        .and_then(|l| l.with_output_scale(0.9))
        .expect("layer")
}

/// One training forward and backward on `threads` threads: the output and the gradients.
fn step(
    l: &MoeLayer,
    x: &Array2<f32>,
    dy: &Array2<f32>,
    threads: usize,
) -> (Array2<f32>, Array2<f32>, Vec<Grad>) {
    let mut dl = CpuBackend::with_threads(threads)
        .upload(std::sync::Arc::new(l.clone()))
        .expect("upload");
    let mut input = RouterInput::new(x.view());
    input.mode = Mode::Train { seed: 1 };
    let out = dl.forward_train(&input).expect("forward_train");
    let aux = out.routing.aux_coefficients();
    let g = dl.backward(dy.view(), &aux).expect("backward");
    (out.output, g.d_input, g.params)
}

#[test]
fn forward_is_the_reference_forward_bit_for_bit() {
    let l = peer_layer(20, 6, 3, 4, 3);
    let x = SeqRng::new(4, 0).normal_matrix(37, 20, 1.0);
    let input = RouterInput::new(x.view());
    let want = reference_forward(&l, &input).expect("reference");
    let mut dl = CpuBackend::with_threads(2)
        .upload(std::sync::Arc::new(l.clone()))
        .expect("upload");
    let got = dl.forward(&input).expect("forward");
    assert_eq!(got.output, want.output);
    assert_eq!(got.routing, want.routing);
}

#[test]
fn training_step_is_bit_identical_on_one_and_three_threads() {
    let l = peer_layer(24, 7, 4, 5, 5);
    let mut rng = SeqRng::new(6, 0);
    let (x, dy) = (
        rng.normal_matrix(53, 24, 1.0),
        rng.normal_matrix(53, 24, 1.0),
    );
    let (y1, dx1, g1) = step(&l, &x, &dy, 1);
    let (y3, dx3, g3) = step(&l, &x, &dy, 3);
    assert_eq!(y1, y3);
    assert_eq!(dx1, dx3);
    assert_eq!(g1, g3);
    // The training forward's output is the forward's.
    let want = reference_forward(&l, &RouterInput::new(x.view())).expect("reference");
    assert_eq!(y1, want.output);
}

/// Run by hand: `cargo test --release -p moe-backends --test peer_path -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check: run by hand in release"]
fn time_one_training_step_of_the_moe_train_peer_layer() {
    let (t, d) = (768, 128);
    let l = peer_layer(d, 45, 16, 32, 7);
    let mut rng = SeqRng::new(8, 0);
    let (x, dy) = (rng.normal_matrix(t, d, 1.0), rng.normal_matrix(t, d, 1.0));
    let mut dl = CpuBackend::with_threads(1)
        .upload(std::sync::Arc::new(l.clone()))
        .expect("upload");
    let mut input = RouterInput::new(x.view());
    input.mode = Mode::Train { seed: 1 };
    let reps = 5;
    let (mut route, mut fwd, mut bwd) = (0.0, 0.0, 0.0);
    for i in 0..=reps {
        let t0 = Instant::now();
        let plan = l.route(&input).expect("route");
        let t1 = Instant::now();
        let out = dl.forward_train(&input).expect("forward_train");
        let t2 = Instant::now();
        let _g = dl
            .backward(dy.view(), &out.routing.aux_coefficients())
            .expect("backward");
        let t3 = Instant::now();
        assert_eq!(plan.n_slots(), t * 16 * 32);
        if i > 0 {
            route += (t1 - t0).as_secs_f64();
            fwd += (t2 - t1).as_secs_f64();
            bwd += (t3 - t2).as_secs_f64();
        }
    }
    let ms = |s: f64| 1e3 * s / reps as f64;
    println!(
        "PEER layer, 1 thread, mean of {reps}: route {:.1} ms, forward_train {:.1} ms, backward {:.1} ms",
        ms(route),
        ms(fwd),
        ms(bwd)
    );
}
