//! The canonical packed weight layout of the device backends (wgpu and CUDA), made on the host at upload from any
//! bank they run: every product is `out = a · Wᵀ` with `W` row-major `[out, in]`, and gated banks keep their gate
//! rows before their up rows. GPT-OSS banks (stored `[E, d, 2f]`, gate and up interleaved) are transposed and
//! de-interleaved here, so the kernels of both backends know one layout. Values are never changed, only moved; the
//! CUDA backend chooses the precision after ([`crate::Dtype`]).
//!
//! Per expert `e` (`U = f` for a single-product bank, `2f` for a gated one):
//! - `up[e]`: `[U, d]`; rows `[0, f)` are the gate (or the MLP's `W₁`), rows `[f, 2f)` the up projection.
//! - `up_bias[e]`: `[U]`, the same row order (GPT-OSS: gate biases, then up biases; MLP: `b₁`).
//! - `down[e]`: `[d, f]`; `down_bias[e]`: `[d]`.
//!
//! The first product's epilogue is chosen by [`PackedBank::mode`]: [`MODE_SINGLE`] `act(a·W₁ᵀ + b₁)`,
//! [`MODE_GATED`] `act(g) ⊙ u`, [`MODE_GPT_OSS`] `(clamp(u + b_u, ±limit) + 1) ⊙ glu(min(g + b_g, limit))`
//! with `glu(g) = g · σ(alpha · g)` (the formula of transformers' `GptOssExperts`).

#[cfg(test)]
use ndarray::Array2;
use ndarray::Array3;

use moe_core::{Activation, ExpertBank};

/// Epilogue of the first product of a single-product bank (MLP): `act(a·W₁ᵀ + b₁)`.
pub(crate) const MODE_SINGLE: u32 = 0;
/// Epilogue of a gated bank (SwiGLU): `act(g) ⊙ u`.
pub(crate) const MODE_GATED: u32 = 1;
/// Epilogue of a GPT-OSS bank: the clamped GLU with biases.
pub(crate) const MODE_GPT_OSS: u32 = 2;

/// Activation code of the kernels (0 is identity): 1 SiLU, 2 ReLU, 3 exact GELU, 4 GELU tanh.
pub(crate) fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Silu => 1,
        Activation::Relu => 2,
        Activation::Gelu => 3,
        Activation::GeluTanh => 4,
    }
}

/// A bank in canonical layout, f32, on the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PackedBank {
    /// [`MODE_SINGLE`], [`MODE_GATED`] or [`MODE_GPT_OSS`].
    pub mode: u32,
    /// Experts `E`.
    pub n_experts: usize,
    /// Width `d`.
    pub d: usize,
    /// FFN width `f`.
    pub f: usize,
    /// `[E, U, d]`: U = f (single) or 2f (gate rows, then up rows).
    pub up: Vec<f32>,
    /// `[E, U]`.
    pub up_bias: Option<Vec<f32>>,
    /// `[E, d, f]`.
    pub down: Vec<f32>,
    /// `[E, d]`.
    pub down_bias: Option<Vec<f32>>,
    /// Activation code ([`act_code`]; 0 for GPT-OSS, whose GLU is fixed).
    pub act: u32,
    /// GPT-OSS's GLU slope (0 otherwise).
    pub alpha: f32,
    /// GPT-OSS's clamp (0 otherwise).
    pub limit: f32,
}

impl PackedBank {
    /// Rows of one expert's first weight (`U`).
    pub fn up_rows(&self) -> usize {
        if self.mode == MODE_SINGLE {
            self.f
        } else {
            2 * self.f
        }
    }

    /// Values of one expert's first weight (`U · d`).
    pub fn up_per_expert(&self) -> usize {
        self.up_rows() * self.d
    }

    /// Values of one expert's second weight (`d · f`).
    pub fn down_per_expert(&self) -> usize {
        self.d * self.f
    }
}

fn values<D: ndarray::Dimension>(a: &ndarray::Array<f32, D>) -> Vec<f32> {
    a.iter().copied().collect()
}

/// `[E, a, b]` → `[E, b, a]`.
fn transpose_experts(w: &Array3<f32>) -> Vec<f32> {
    let mut t = w.view();
    t.swap_axes(1, 2);
    t.iter().copied().collect()
}

/// `[.., 2f]` interleaved (gate at even, up at odd) → gate half then up half, along the last axis.
fn deinterleave_rows(v: &[f32], f: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(2 * f) {
        out.extend(row.iter().step_by(2));
        out.extend(row.iter().skip(1).step_by(2));
    }
    out
}

/// Packs `bank`, or names why the device backend `backend` (`"wgpu"`, `"cuda"`) cannot run it.
pub(crate) fn pack(bank: &ExpertBank, backend: &str) -> Result<PackedBank, String> {
    let (e, d, f) = (bank.n_experts(), bank.d_model(), bank.ffn());
    let p = match bank {
        ExpertBank::SwiGlu(b) => PackedBank {
            mode: MODE_GATED,
            n_experts: e,
            d,
            f,
            up: values(b.gate_up()),
            up_bias: None,
            down: values(b.down()),
            down_bias: None,
            act: act_code(b.act()),
            alpha: 0.0,
            limit: 0.0,
        },
        ExpertBank::GptOss(b) => {
            // gate_up [E, d, 2f] → [E, 2f, d] → rows de-interleaved: [E, (gate f, up f), d].
            let t = transpose_experts(b.gate_up());
            let mut up = Vec::with_capacity(t.len());
            for ex in t.chunks(2 * f * d) {
                for j in (0..2 * f).step_by(2) {
                    up.extend_from_slice(&ex[j * d..(j + 1) * d]);
                }
                for j in (1..2 * f).step_by(2) {
                    up.extend_from_slice(&ex[j * d..(j + 1) * d]);
                }
            }
            PackedBank {
                mode: MODE_GPT_OSS,
                n_experts: e,
                d,
                f,
                up,
                up_bias: Some(deinterleave_rows(&values(b.gate_up_bias()), f)),
                // down [E, f, d] → [E, d, f].
                down: transpose_experts(b.down()),
                down_bias: Some(values(b.down_bias())),
                act: 0,
                alpha: b.alpha(),
                limit: b.limit(),
            }
        }
        ExpertBank::Mlp(b) => PackedBank {
            mode: MODE_SINGLE,
            n_experts: e,
            d,
            f,
            up: values(b.w1()),
            up_bias: b.b1().map(values::<ndarray::Ix2>),
            down: values(b.w2()),
            down_bias: b.b2().map(values::<ndarray::Ix2>),
            act: act_code(b.act()),
            alpha: 0.0,
            limit: 0.0,
        },
        other => {
            return Err(format!(
                "the {backend} backend runs swiglu, gpt_oss and mlp expert banks; this one is {}: run the \
                 layer on the cpu backend",
                other.kind()
            ));
        }
    };
    debug_assert_eq!(p.up.len(), e * p.up_per_expert());
    debug_assert_eq!(p.down.len(), e * p.down_per_expert());
    Ok(p)
}

/// Views of one expert's canonical weights, for the host-side check of the layout.
#[cfg(test)]
fn expert_matrices(p: &PackedBank, e: usize) -> (Array2<f32>, Array2<f32>) {
    let u = p.up_rows();
    let up = Array2::from_shape_vec((u, p.d), p.up[e * u * p.d..(e + 1) * u * p.d].to_vec())
        .expect("packed up shape");
    let down = Array2::from_shape_vec(
        (p.d, p.f),
        p.down[e * p.d * p.f..(e + 1) * p.d * p.f].to_vec(),
    )
    .expect("packed down shape");
    (up, down)
}

/// What the kernels compute for one expert on rows `x`, on the host in f32, from the canonical layout: the oracle of the
/// layout transform (compared with the CPU backend's expert forward in the tests below).
#[cfg(test)]
pub(crate) fn canonical_forward(p: &PackedBank, e: usize, x: &Array2<f32>) -> Array2<f32> {
    let (up, down) = expert_matrices(p, e);
    let z = x.dot(&up.t());
    let (n, f) = (x.nrows(), p.f);
    let ub = |j: usize| p.up_bias.as_ref().map_or(0.0, |b| b[e * p.up_rows() + j]);
    let act = |code: u32, v: f32| match code {
        1 => v / (1.0 + (-v).exp()),
        2 => v.max(0.0),
        3 => (0.5 * f64::from(v) * (1.0 + moe_core::math::erf(f64::from(v) / 2f64.sqrt()))) as f32,
        4 => 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044_715 * v * v * v)).tanh()),
        _ => v,
    };
    let mut h = Array2::<f32>::zeros((n, f));
    for r in 0..n {
        for j in 0..f {
            h[[r, j]] = match p.mode {
                MODE_SINGLE => act(p.act, z[[r, j]] + ub(j)),
                MODE_GATED => act(p.act, z[[r, j]]) * z[[r, f + j]],
                _ => {
                    let g = (z[[r, j]] + ub(j)).min(p.limit);
                    let u = (z[[r, f + j]] + ub(f + j)).clamp(-p.limit, p.limit);
                    (u + 1.0) * (g / (1.0 + (-(g * p.alpha)).exp()))
                }
            };
        }
    }
    let mut y = h.dot(&down.t());
    if let Some(b) = &p.down_bias {
        y += &ndarray::ArrayView1::from(&b[e * p.d..(e + 1) * p.d]);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::{GptOssBank, MlpBank, PeerBank, SwiGluBank};
    use ndarray::Axis;

    fn arr3(e: usize, a: usize, b: usize, seed: u32) -> Array3<f32> {
        Array3::from_shape_fn((e, a, b), |(i, j, k)| {
            let h = (i * 7919 + j * 104_729 + k * 1_299_709 + seed as usize * 15_485_863) % 1000;
            (h as f32 / 1000.0 - 0.5) * 0.4
        })
    }

    fn check(bank: &ExpertBank) {
        let p = pack(bank, "test").expect("packs");
        let (e, d) = (bank.n_experts(), bank.d_model());
        let x = Array2::from_shape_fn((5, d), |(i, j)| {
            ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5
        });
        for ex in 0..e {
            let want = crate::cpu::expert_forward(bank, ex, x.view()).expect("cpu expert");
            let got = canonical_forward(&p, ex, &x);
            for (a, b) in want.iter().zip(got.iter()) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "expert {ex}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn canonical_layout_computes_what_each_bank_computes() {
        let (e, d, f) = (3, 6, 5);
        check(&ExpertBank::SwiGlu(
            SwiGluBank::new(arr3(e, 2 * f, d, 1), arr3(e, d, f, 2), Activation::Silu)
                .expect("bank"),
        ));
        check(&ExpertBank::GptOss(
            GptOssBank::new(
                arr3(e, d, 2 * f, 3),
                arr3(1, e, 2 * f, 4).index_axis(Axis(0), 0).to_owned(),
                arr3(e, f, d, 5),
                arr3(1, e, d, 6).index_axis(Axis(0), 0).to_owned(),
                1.702,
                0.3,
            )
            .expect("bank"),
        ));
        for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
            check(&ExpertBank::Mlp(
                MlpBank::new(
                    arr3(e, f, d, 7),
                    Some(arr3(1, e, f, 8).index_axis(Axis(0), 0).to_owned()),
                    arr3(e, d, f, 9),
                    Some(arr3(1, e, d, 10).index_axis(Axis(0), 0).to_owned()),
                    act,
                )
                .expect("bank"),
            ));
        }
    }

    /// Banks without a canonical form are refused with the backend's name and the bank's kind.
    #[test]
    fn peer_banks_are_refused_by_name() {
        let m = |seed| arr3(1, 4, 6, seed).index_axis(Axis(0), 0).to_owned();
        let bank = ExpertBank::Peer(PeerBank::new(m(11), m(12), Activation::Gelu).expect("bank"));
        let e = pack(&bank, "wgpu").expect_err("peer has no packed layout");
        assert!(e.contains("wgpu") && e.contains("peer"), "{e}");
    }
}
