//! Layers and tokens the expert-parallel checks share (the thread-rank tests and the MPI example): every grouped
//! bank kind, five routers, shared experts, output scale and bias, each rank's own tokens.

#![allow(dead_code, reason = "each user takes the helpers it needs")]

use ndarray::Array2;

use moe_core::rng::SeqRng;
use moe_core::testing::random_bank;
use moe_core::{Mode, MoeLayer, Router, RouterArgs, RouterInput, SharedExperts};

/// The routers [`router`] builds.
pub const ROUTERS: u8 = 5;

/// softmax-topk, switch-top1 with drops, expert-choice, noisy-topk (trained with noise), hash, by `which`.
pub fn router(which: u8, d: usize, e: usize, k: usize, seed: u64) -> Box<dyn Router> {
    let (name, k, opts): (&str, usize, &[(&str, &str)]) = match which {
        0 => ("softmax-topk", k, &[]),
        1 => ("switch-top1", 1, &[("capacity_factor", "0.5")]),
        2 => ("expert-choice", k, &[]),
        3 => ("noisy-topk", k, &[]),
        _ => ("hash", 1, &[]),
    };
    let mut args = RouterArgs::new(d, e, k, seed);
    for (key, v) in opts {
        args.set_option_str(key, v);
    }
    moe_routers::builtin()
        .create(name, &args)
        .unwrap_or_else(|err| panic!("{name}: {err}"))
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: u8,
    pub router: u8,
    pub e: usize,
    pub k: usize,
    pub d: usize,
    pub f: usize,
    pub shared: bool,
    pub bias: bool,
    pub scale: bool,
    pub seed: u64,
}

pub fn layer(s: &Spec) -> MoeLayer {
    let mut rng = SeqRng::new(s.seed, 11);
    let bank = random_bank(s.kind, s.e, s.d, s.f, &mut rng);
    let mut l = MoeLayer::new(router(s.router, s.d, s.e, s.k, s.seed), bank)
        .unwrap_or_else(|err| panic!("layer: {err}"));
    if s.shared {
        let sb = random_bank(s.kind, 1, s.d, s.f, &mut rng);
        let gate = s
            .seed
            .is_multiple_of(2)
            .then(|| rng.normal_matrix(1, s.d, 0.3).row(0).to_owned());
        let shared = SharedExperts::new(sb, gate).unwrap_or_else(|err| panic!("shared: {err}"));
        l = l.with_shared(shared).unwrap_or_else(|err| panic!("{err}"));
    }
    if s.bias {
        l = l
            .with_output_bias(rng.normal_matrix(1, s.d, 0.1).row(0).to_owned())
            .unwrap_or_else(|err| panic!("{err}"));
    }
    if s.scale {
        l = l
            .with_output_scale(0.75)
            .unwrap_or_else(|err| panic!("{err}"));
    }
    l
}

/// Rank `r`'s tokens: `[t, d]` and token ids.
pub fn tokens(seed: u64, r: usize, t: usize, d: usize) -> (Array2<f32>, Vec<u32>) {
    let mut rng = SeqRng::new(seed ^ 0x5eed, 100 + r as u64);
    let x = rng.normal_matrix(t, d, 1.0);
    let ids = (0..t).map(|i| ((i * 7 + r * 13) % 50) as u32).collect();
    (x, ids)
}

pub fn input<'a>(x: &'a Array2<f32>, ids: &'a [u32], train: bool) -> RouterInput<'a> {
    let i = RouterInput::new(x.view()).with_token_ids(ids);
    if train {
        i.with_mode(Mode::Train { seed: 77 })
    } else {
        i
    }
}
