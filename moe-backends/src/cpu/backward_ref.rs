//! The reference backward of an expert bank: per expert, ndarray products on its gathered rows, the forward's
//! intermediates recomputed from the input (the same f32 operations as [`expert_forward`]). Every bank kind:
//! SwiGLU, GPT-OSS, MLP, and PEER with sparse row gradients (only the experts a batch touched, never O(N) work).
//! The grouped path's backward (`cpu/grouped_train.rs`) is tested against it.
//!
//! Formulas (torch autograd through the same expressions): for `y = h · W2ᵀ + b2`, `dW2 = dyᵀ · h`, `db2 = Σ dy`,
//! `dh = dy · W2`; the activation's backward per row (`cpu/activation.rs`); for `p = x · W1ᵀ + b1`,
//! `dW1 = dpᵀ · x`, `db1 = Σ dp`, `dx = dp · W1` (GPT-OSS's transposed layouts likewise). PEER: `a = u_e · x`,
//! `y = act(a) v_e`: `dv_e = Σ act(a) dy`, `da = act'(a) ⟨dy, v_e⟩`, `du_e = Σ da x`, `dx = da u_e`.

use ndarray::{Array2, Array3, ArrayView2, Axis};

use moe_core::{ExpertBank, Grad, GradValue, MoeError};

use super::activation::{Act, act_grad, backward_row, hidden_row};
use super::experts::activate;
use super::internal;

/// Gradients of a bank's tensors, filled expert by expert.
#[derive(Debug)]
pub(crate) enum BankGrads {
    /// SwiGLU, GPT-OSS and MLP: the first projection (`gate_up` / `w1`), its bias, the second (`down` / `w2`) and
    /// its bias, each of its parameter's shape (biases where the bank has them).
    Dense {
        /// The bank's kind, for the names.
        kind: &'static str,
        /// `gate_up` / `w1`.
        w1: Array3<f32>,
        /// `gate_up_bias` / `b1`.
        b1: Option<Array2<f32>>,
        /// `down` / `w2`.
        w2: Array3<f32>,
        /// `down_bias` / `b2`.
        b2: Option<Array2<f32>>,
    },
    /// PEER: rows of `u` and `v` for the touched experts `rows` (ascending).
    Peer {
        /// `N`, `d`.
        shape: [usize; 2],
        /// Touched experts, ascending.
        rows: Vec<u32>,
        /// `[rows, d]`.
        du: Array2<f32>,
        /// `[rows, d]`.
        dv: Array2<f32>,
    },
}

impl BankGrads {
    /// Zero gradients for `bank`; for PEER, rows for the experts `touched` (ascending).
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for custom experts.
    pub(crate) fn zeros(bank: &ExpertBank, touched: &[u32]) -> Result<Self, MoeError> {
        let z3 = |a: &Array3<f32>| Array3::<f32>::zeros(a.raw_dim());
        let z2 = |a: &Array2<f32>| Array2::<f32>::zeros(a.raw_dim());
        Ok(match bank {
            ExpertBank::SwiGlu(b) => BankGrads::Dense {
                kind: "swiglu",
                w1: z3(b.gate_up()),
                b1: None,
                w2: z3(b.down()),
                b2: None,
            },
            ExpertBank::GptOss(b) => BankGrads::Dense {
                kind: "gpt_oss",
                w1: z3(b.gate_up()),
                b1: Some(z2(b.gate_up_bias())),
                w2: z3(b.down()),
                b2: Some(z2(b.down_bias())),
            },
            ExpertBank::Mlp(b) => BankGrads::Dense {
                kind: "mlp",
                w1: z3(b.w1()),
                b1: b.b1().map(z2),
                w2: z3(b.w2()),
                b2: b.b2().map(z2),
            },
            ExpertBank::Peer(b) => BankGrads::Peer {
                shape: [b.u().nrows(), b.u().ncols()],
                rows: touched.to_vec(),
                du: Array2::zeros((touched.len(), b.u().ncols())),
                dv: Array2::zeros((touched.len(), b.u().ncols())),
            },
            _ => return Err(custom_unsupported()),
        })
    }

    /// Gradients for a dense bank built from `recycle` (a previous step's gradients, named with `prefix`, such as
    /// `experts.`) where a dense tensor of the same name and shape is there, zeros otherwise; the values are left
    /// as they were, for a path that overwrites every one of them (the grouped backward does). PEER and custom
    /// experts get [`BankGrads::zeros`].
    ///
    /// # Errors
    /// As [`BankGrads::zeros`].
    pub(crate) fn reuse(
        bank: &ExpertBank,
        recycle: &mut Vec<Grad>,
        prefix: &str,
    ) -> Result<Self, MoeError> {
        let (kind, w1, b1, w2, b2) = match bank {
            ExpertBank::SwiGlu(b) => ("swiglu", b.gate_up().dim(), None, b.down().dim(), None),
            ExpertBank::GptOss(b) => (
                "gpt_oss",
                b.gate_up().dim(),
                Some(b.gate_up_bias().dim()),
                b.down().dim(),
                Some(b.down_bias().dim()),
            ),
            ExpertBank::Mlp(b) => (
                "mlp",
                b.w1().dim(),
                b.b1().map(|a| a.dim()),
                b.w2().dim(),
                b.b2().map(|a| a.dim()),
            ),
            _ => return BankGrads::zeros(bank, &[]),
        };
        let names = Self::names(kind);
        let name = |i: usize| format!("{prefix}{}", names[i]);
        Ok(BankGrads::Dense {
            kind,
            w1: take3(recycle, &name(0), w1),
            b1: b1.map(|sh| take2(recycle, &name(1), sh)),
            w2: take3(recycle, &name(2), w2),
            b2: b2.map(|sh| take2(recycle, &name(3), sh)),
        })
    }

    /// The names of a dense bank's tensors: first projection, its bias, second projection, its bias.
    fn names(kind: &str) -> [&'static str; 4] {
        match kind {
            "swiglu" => ["gate_up", "", "down", ""],
            "gpt_oss" => ["gate_up", "gate_up_bias", "down", "down_bias"],
            _ => ["w1", "b1", "w2", "b2"],
        }
    }

    /// The gradients named as [`ExpertBank::params`] names the tensors, in that order.
    pub(crate) fn into_grads(self) -> Vec<Grad> {
        match self {
            BankGrads::Dense {
                kind,
                w1,
                b1,
                w2,
                b2,
            } => {
                let names = Self::names(kind);
                let mut out = vec![Grad::dense(names[0], w1)];
                out.extend(b1.map(|b| Grad::dense(names[1], b)));
                out.push(Grad::dense(names[2], w2));
                out.extend(b2.map(|b| Grad::dense(names[3], b)));
                out
            }
            BankGrads::Peer {
                shape,
                rows,
                du,
                dv,
            } => {
                let sparse = |name: &str, values: Array2<f32>| Grad {
                    name: name.into(),
                    hf_name: None,
                    value: GradValue::Rows {
                        shape: shape.to_vec(),
                        rows: rows.clone(),
                        values,
                    },
                };
                vec![sparse("u", du), sparse("v", dv)]
            }
        }
    }
}

/// The dense gradient `name` of shape `shape` taken from `recycle`, or zeros of that shape.
fn take3(recycle: &mut Vec<Grad>, name: &str, shape: (usize, usize, usize)) -> Array3<f32> {
    take(recycle, name, &[shape.0, shape.1, shape.2])
        .and_then(|a| a.into_dimensionality::<ndarray::Ix3>().ok())
        .unwrap_or_else(|| Array3::zeros(shape))
}

/// As [`take3`] for a 2-D gradient.
fn take2(recycle: &mut Vec<Grad>, name: &str, shape: (usize, usize)) -> Array2<f32> {
    take(recycle, name, &[shape.0, shape.1])
        .and_then(|a| a.into_dimensionality::<ndarray::Ix2>().ok())
        .unwrap_or_else(|| Array2::zeros(shape))
}

/// Removes and returns the dense, standard-layout gradient `name` of shape `shape` from `recycle`.
fn take(recycle: &mut Vec<Grad>, name: &str, shape: &[usize]) -> Option<ndarray::ArrayD<f32>> {
    let i = recycle.iter().position(|g| {
        g.name == name
            && matches!(&g.value, GradValue::Dense(a) if a.shape() == shape && a.is_standard_layout())
    })?;
    match recycle.swap_remove(i).value {
        GradValue::Dense(a) => Some(a),
        GradValue::Rows { .. } => None,
    }
}

/// The error of a backward through custom experts.
pub(crate) fn custom_unsupported() -> MoeError {
    MoeError::Unsupported {
        owner: "custom experts".into(),
        feature: "backward".into(),
    }
}

/// The backward of expert `e` of `bank` on rows `x` (`[n, d]`) with output gradient `dy` (`[n, d]`): writes the
/// expert's part of `grads` (`slot`: the expert's position among PEER's touched rows) and returns `dx` (`[n, d]`).
///
/// # Errors
/// [`MoeError::Unsupported`] for custom experts; [`MoeError::Backend`] for gradients of another bank.
pub(crate) fn expert_backward(
    bank: &ExpertBank,
    e: usize,
    slot: usize,
    x: ArrayView2<'_, f32>,
    dy: ArrayView2<'_, f32>,
    grads: &mut BankGrads,
) -> Result<Array2<f32>, MoeError> {
    if let (ExpertBank::Peer(b), BankGrads::Peer { du, dv, .. }) = (bank, &mut *grads) {
        let (u, v) = (b.u().row(e), b.v().row(e));
        let mut dx = Array2::<f32>::zeros(x.raw_dim());
        let (mut gu, mut gv) = (du.row_mut(slot), dv.row_mut(slot));
        for ((xr, dyr), mut dxr) in x.outer_iter().zip(dy.outer_iter()).zip(dx.outer_iter_mut()) {
            let a = xr.dot(&u);
            let h = activate(b.act(), a);
            gv.scaled_add(h, &dyr);
            let da = act_grad(b.act(), a) * dyr.dot(&v);
            gu.scaled_add(da, &xr);
            dxr.scaled_add(da, &u);
        }
        return Ok(dx);
    }
    let act = Act::of(bank).ok_or_else(custom_unsupported)?;
    let BankGrads::Dense { w1, b1, w2, b2, .. } = grads else {
        return Err(internal("gradients of another bank kind"));
    };
    let (n, f) = (x.nrows(), bank.ffn());
    // Pre-activations and hidden rows, as the forward computes them.
    let mut p = match bank {
        ExpertBank::SwiGlu(b) => x.dot(&b.gate_up().index_axis(Axis(0), e).t()),
        ExpertBank::GptOss(b) => {
            x.dot(&b.gate_up().index_axis(Axis(0), e)) + b.gate_up_bias().row(e)
        }
        ExpertBank::Mlp(b) => {
            let a = x.dot(&b.w1().index_axis(Axis(0), e).t());
            match b.b1() {
                Some(b1) => a + b1.row(e),
                None => a,
            }
        }
        _ => return Err(custom_unsupported()),
    };
    // Row slices below: the product's layout is ndarray's choice.
    if !p.is_standard_layout() {
        p = p.as_standard_layout().into_owned();
    }
    let mut h = Array2::<f32>::zeros((n, f));
    for (pr, mut hr) in p.outer_iter().zip(h.outer_iter_mut()) {
        let (pr, hr) = (
            pr.to_vec(),
            hr.as_slice_mut().ok_or_else(|| internal("hidden row"))?,
        );
        hidden_row(act, &pr, hr);
    }
    // The second product.
    let gpt = matches!(bank, ExpertBank::GptOss(_));
    let w2e = match bank {
        ExpertBank::SwiGlu(b) => b.down().index_axis(Axis(0), e),
        ExpertBank::GptOss(b) => b.down().index_axis(Axis(0), e),
        ExpertBank::Mlp(b) => b.w2().index_axis(Axis(0), e),
        _ => return Err(custom_unsupported()),
    };
    let dh = if gpt { dy.dot(&w2e.t()) } else { dy.dot(&w2e) };
    let gw2 = if gpt { h.t().dot(&dy) } else { dy.t().dot(&h) };
    w2.index_axis_mut(Axis(0), e).assign(&gw2);
    if let Some(b2) = b2 {
        b2.row_mut(e).assign(&dy.sum_axis(Axis(0)));
    }
    // The activation, row by row.
    for (mut pr, dhr) in p.outer_iter_mut().zip(dh.outer_iter()) {
        let pr = pr
            .as_slice_mut()
            .ok_or_else(|| internal("pre-activation row"))?;
        backward_row(act, pr, &dhr.to_vec());
    }
    // The first product.
    let w1e = match bank {
        ExpertBank::SwiGlu(b) => b.gate_up().index_axis(Axis(0), e),
        ExpertBank::GptOss(b) => b.gate_up().index_axis(Axis(0), e),
        ExpertBank::Mlp(b) => b.w1().index_axis(Axis(0), e),
        _ => return Err(custom_unsupported()),
    };
    let gw1 = if gpt { x.t().dot(&p) } else { p.t().dot(&x) };
    w1.index_axis_mut(Axis(0), e).assign(&gw1);
    if let Some(b1) = b1 {
        b1.row_mut(e).assign(&p.sum_axis(Axis(0)));
    }
    Ok(if gpt { p.dot(&w1e.t()) } else { p.dot(&w1e) })
}
