//! One expert of a bank applied to a block of rows: two matrix products with the activation fused between them.

use ndarray::{Array2, ArrayView2, Axis};

use moe_core::{Activation, ExpertBank, MoeError};

/// Applies the activation in place.
pub(super) fn activate(act: Activation, v: f32) -> f32 {
    match act {
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Relu => v.max(0.0),
        // f32, branch-free (the same function as the training path's, so forward and forward_train agree).
        Activation::Gelu => super::activation::gelu(v),
        Activation::GeluTanh => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
        }
    }
}

/// Expert `e` of `bank` on rows `x` (`[n, d]`), returning `[n, d]`.
///
/// # Errors
/// [`MoeError::Expert`] when a custom expert fails or returns the wrong shape; [`MoeError::Shape`] for a wrong
/// width.
pub fn expert_forward(
    bank: &ExpertBank,
    e: usize,
    x: ArrayView2<'_, f32>,
) -> Result<Array2<f32>, MoeError> {
    let (n, d) = x.dim();
    if e >= bank.n_experts() {
        return Err(MoeError::Expert {
            expert: e,
            reason: format!("the bank has {} experts", bank.n_experts()),
        });
    }
    if d != bank.d_model() {
        return Err(MoeError::shape(
            "expert input",
            format!("[n, {}]", bank.d_model()),
            &[n, d],
        ));
    }
    let y = match bank {
        ExpertBank::SwiGlu(b) => {
            let f = b.down().dim().2;
            let gu = x.dot(&b.gate_up().index_axis(Axis(0), e).t());
            let mut h = Array2::<f32>::zeros((n, f));
            for ((mut hr, gr), _) in h.outer_iter_mut().zip(gu.outer_iter()).zip(0..n) {
                for j in 0..f {
                    hr[j] = activate(b.act(), gr[j]) * gr[f + j];
                }
            }
            h.dot(&b.down().index_axis(Axis(0), e).t())
        }
        ExpertBank::GptOss(b) => {
            let f = b.down().dim().1;
            let mut z = x.dot(&b.gate_up().index_axis(Axis(0), e));
            z += &b.gate_up_bias().row(e);
            let mut h = Array2::<f32>::zeros((n, f));
            for (mut hr, zr) in h.outer_iter_mut().zip(z.outer_iter()) {
                for j in 0..f {
                    let g = zr[2 * j].min(b.limit());
                    let u = zr[2 * j + 1].clamp(-b.limit(), b.limit());
                    let glu = g / (1.0 + (-(g * b.alpha())).exp());
                    hr[j] = (u + 1.0) * glu;
                }
            }
            let mut y = h.dot(&b.down().index_axis(Axis(0), e));
            y += &b.down_bias().row(e);
            y
        }
        ExpertBank::Mlp(b) => {
            let mut h = x.dot(&b.w1().index_axis(Axis(0), e).t());
            if let Some(b1) = b.b1() {
                h += &b1.row(e);
            }
            h.mapv_inplace(|v| activate(b.act(), v));
            let mut y = h.dot(&b.w2().index_axis(Axis(0), e).t());
            if let Some(b2) = b.b2() {
                y += &b2.row(e);
            }
            y
        }
        ExpertBank::Peer(b) => {
            let u = b.u().row(e);
            let v = b.v().row(e);
            let mut y = Array2::<f32>::zeros((n, d));
            for (mut yr, xr) in y.outer_iter_mut().zip(x.outer_iter()) {
                let a = activate(b.act(), xr.dot(&u));
                yr.assign(&v.mapv(|vv| a * vv));
            }
            y
        }
        ExpertBank::Packed(_) => packed_expert(bank, e, x)?,
        ExpertBank::Custom(experts) => {
            let ex = experts.get(e).ok_or(MoeError::Expert {
                expert: e,
                reason: "missing".into(),
            })?;
            let y = ex.forward(x).map_err(|err| MoeError::Expert {
                expert: e,
                reason: err.to_string(),
            })?;
            if y.dim() != (n, d) {
                return Err(MoeError::Expert {
                    expert: e,
                    reason: format!("returned shape {:?}, expected [{n}, {d}]", y.shape()),
                });
            }
            y
        }
        #[allow(
            unreachable_patterns,
            reason = "ExpertBank is non_exhaustive: a family added to moe-core is an error here, not a panic"
        )]
        _ => {
            return Err(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!("unsupported expert bank {}", bank.kind()),
            });
        }
    };
    // Callers copy the result as one slice: make the standard layout part of the contract.
    Ok(if y.is_standard_layout() {
        y
    } else {
        y.as_standard_layout().into_owned()
    })
}

/// Expert `e` of a packed bank on rows `x` through the grouped path's tiles (one group; the best kernels of
/// this CPU), which decode the packed weights inside the products.
fn packed_expert(
    bank: &ExpertBank,
    e: usize,
    x: ArrayView2<'_, f32>,
) -> Result<Array2<f32>, MoeError> {
    let (n, d) = x.dim();
    let x = x.as_standard_layout();
    let xs = x.as_slice().unwrap_or(&[]);
    let mut h = super::grouped::AlignedBuf::default();
    let mut y = vec![0f32; n * d];
    let kernels = super::kernels::Kernels::new(super::CpuKernels::Auto);
    super::grouped::run_bank(bank, &[e as u32], &[0, n], xs, &mut h, &mut y, kernels)?;
    Array2::from_shape_vec((n, d), y).map_err(|err| MoeError::Backend {
        backend: "cpu".into(),
        reason: err.to_string(),
    })
}
