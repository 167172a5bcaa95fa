//! Random expert banks of every grouped kind, for tests that compare two ways of running the same experts.

use ndarray::Array3;

use crate::expert::{Activation, ExpertBank, GptOssBank, MlpBank, SwiGluBank};
use crate::rng::SeqRng;

/// The grouped bank kinds with their bias variants, by `kind`: 0 SwiGLU, 1 GPT-OSS, 2 MLP with `b1` (GELU), 3 MLP
/// with `b2` (ReLU), 4 MLP with both biases (SiLU), 5 MLP without biases (GELU).
pub const BANK_KINDS: u8 = 6;

fn a3(rng: &mut SeqRng, sh: (usize, usize, usize), s: f32) -> Array3<f32> {
    Array3::from_shape_simple_fn(sh, || rng.normal() as f32 * s)
}

/// A random bank of kind `kind` (`0..BANK_KINDS`, see [`BANK_KINDS`]; a larger kind is 5) with `e` experts, width `d`, hidden `f`;
/// weights `N(0, 1/d)`, biases `N(0, 0.01)`.
///
/// # Panics
/// Never for `e, d, f ≥ 1` (the shapes are consistent by construction).
#[allow(
    clippy::panic,
    reason = "a test helper: the shapes are consistent by construction"
)]
pub fn random_bank(kind: u8, e: usize, d: usize, f: usize, rng: &mut SeqRng) -> ExpertBank {
    let s = 1.0 / (d as f32).sqrt();
    let built = match kind {
        0 => SwiGluBank::new(
            a3(rng, (e, 2 * f, d), s),
            a3(rng, (e, d, f), s),
            Activation::Silu,
        )
        .map(ExpertBank::SwiGlu),
        1 => GptOssBank::new(
            a3(rng, (e, d, 2 * f), s),
            rng.normal_matrix(e, 2 * f, 0.1),
            a3(rng, (e, f, d), s),
            rng.normal_matrix(e, d, 0.1),
            1.702,
            7.0,
        )
        .map(ExpertBank::GptOss),
        2 => MlpBank::new(
            a3(rng, (e, f, d), s),
            Some(rng.normal_matrix(e, f, 0.1)),
            a3(rng, (e, d, f), s),
            None,
            Activation::Gelu,
        )
        .map(ExpertBank::Mlp),
        3 => MlpBank::new(
            a3(rng, (e, f, d), s),
            None,
            a3(rng, (e, d, f), s),
            Some(rng.normal_matrix(e, d, 0.1)),
            Activation::Relu,
        )
        .map(ExpertBank::Mlp),
        4 => MlpBank::new(
            a3(rng, (e, f, d), s),
            Some(rng.normal_matrix(e, f, 0.1)),
            a3(rng, (e, d, f), s),
            Some(rng.normal_matrix(e, d, 0.1)),
            Activation::Silu,
        )
        .map(ExpertBank::Mlp),
        _ => MlpBank::new(
            a3(rng, (e, f, d), s),
            None,
            a3(rng, (e, d, f), s),
            None,
            Activation::Gelu,
        )
        .map(ExpertBank::Mlp),
    };
    built.unwrap_or_else(|err| panic!("bank: {err}"))
}
