//! Gradients: what a backward pass returns and how an optimizer applies it.
//!
//! Semantics (MegaBlocks, ScatterMoE, torch autograd through the Hugging Face blocks): the gradient reaches the
//! router only through the kept assignments' combine weights (`dL/dw_s = output_scale · ⟨expert_e(x_t), dY_t⟩`
//! for slot `s` = token `t`, expert `e`) and through its auxiliary losses; expert indices, capacity and drop
//! decisions get none (top-k, argmax and masks are not differentiable).
//!
//! - [`Grad`]: one parameter's gradient, named as in the parameter views ([`Param`](crate::params::Param)),
//!   dense or as touched rows ([`GradValue::Rows`], PEER's product keys and singleton experts, where a dense
//!   `[N, d]` gradient would be O(N) work per step).
//! - [`RouterBackward`]: what [`Router::backward`](crate::router::Router::backward) is given; [`RouterGrads`]:
//!   what it returns.
//! - [`LayerGrads`]: what [`DeviceLayer::backward`](crate::backend::DeviceLayer::backward) returns: `dL/dx` `[T, d]`
//!   and a gradient for every trainable parameter of the layer.
//! - [`apply_update`]: the optimizer-facing walk that pairs every gradient with the mutable view of its parameter
//!   (shapes checked, frozen state refused): any optimizer is a closure on it ([`sgd`] is one; AdamW is a closure
//!   that keeps its moments by parameter name).

use ndarray::{Array2, ArrayD, ArrayViewD, ArrayViewMutD, Axis, IxDyn};

use crate::error::MoeError;
use crate::params::ParamMut;
use crate::router::RouterInput;
use crate::routing::Routing;

/// A gradient's values: dense, in the parameter's shape, or the rows a sparse update touched.
#[derive(Debug, Clone, PartialEq)]
pub enum GradValue {
    /// The full gradient, in the parameter's shape.
    Dense(ArrayD<f32>),
    /// Rows of a 2-D (or higher) parameter viewed as `[R, C]` (`C` = the product of the trailing axes): row
    /// `rows[i]` of the gradient is `values[i]`, every other row is 0. Rows are ascending and distinct.
    Rows {
        /// The parameter's full shape.
        shape: Vec<usize>,
        /// Touched rows, ascending, distinct.
        rows: Vec<u32>,
        /// `[rows.len(), C]`.
        values: Array2<f32>,
    },
}

/// The gradient of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Grad {
    /// The parameter's name, as its owner's [`Param::name`](crate::params::Param::name) (`gate`; `router.gate`
    /// once the layer prefixed it).
    pub name: String,
    /// The checkpoint name of the parameter, where a preset loaded it (filled by the layer).
    pub hf_name: Option<String>,
    /// The values.
    pub value: GradValue,
}

impl Grad {
    /// A dense gradient named `name`.
    pub fn dense<D: ndarray::Dimension>(name: &str, value: ndarray::Array<f32, D>) -> Self {
        Grad {
            name: name.to_string(),
            hf_name: None,
            value: GradValue::Dense(value.into_dyn()),
        }
    }

    /// The parameter's shape.
    pub fn shape(&self) -> &[usize] {
        match &self.value {
            GradValue::Dense(a) => a.shape(),
            GradValue::Rows { shape, .. } => shape,
        }
    }

    /// The gradient as a dense array (a sparse one is scattered into zeros).
    ///
    /// # Errors
    /// [`MoeError::Shape`] for sparse values inconsistent with the shape.
    pub fn to_dense(&self) -> Result<ArrayD<f32>, MoeError> {
        match &self.value {
            GradValue::Dense(a) => Ok(a.clone()),
            GradValue::Rows {
                shape,
                rows,
                values,
            } => {
                let mut out = ArrayD::<f32>::zeros(IxDyn(shape));
                scatter_rows(&self.name, &mut out.view_mut(), rows, values, 1.0)?;
                Ok(out)
            }
        }
    }

    /// Adds `scale ·` this gradient to `target` (a parameter's values or an accumulator of its shape).
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming the parameter when the shapes differ.
    pub fn add_to(&self, target: &mut ArrayViewMutD<'_, f32>, scale: f32) -> Result<(), MoeError> {
        if target.shape() != self.shape() {
            return Err(MoeError::shape(
                format!("gradient of {}", self.name),
                format!("{:?}", target.shape()),
                self.shape(),
            ));
        }
        match &self.value {
            GradValue::Dense(a) => {
                target.zip_mut_with(a, |t, &g| *t += scale * g);
                Ok(())
            }
            GradValue::Rows { rows, values, .. } => {
                scatter_rows(&self.name, target, rows, values, scale)
            }
        }
    }

    /// The largest absolute value (0 for an empty gradient).
    pub fn max_abs(&self) -> f32 {
        let a = match &self.value {
            GradValue::Dense(a) => a.view(),
            GradValue::Rows { values, .. } => values.view().into_dyn(),
        };
        a.iter().fold(0.0f32, |m, &v| m.max(v.abs()))
    }
}

/// `target[rows[i], ..] += scale · values[i]`, the parameter viewed as `[R, C]`.
fn scatter_rows(
    name: &str,
    target: &mut ArrayViewMutD<'_, f32>,
    rows: &[u32],
    values: &Array2<f32>,
    scale: f32,
) -> Result<(), MoeError> {
    let shape = target.shape().to_vec();
    let r = shape.first().copied().unwrap_or(0);
    let c: usize = shape.iter().skip(1).product();
    if values.dim() != (rows.len(), c) || rows.iter().any(|&i| i as usize >= r) {
        return Err(MoeError::shape(
            format!("sparse gradient of {name}"),
            format!("[rows < {r}, {c}]"),
            values.shape(),
        ));
    }
    let mut flat = target
        .view_mut()
        .into_shape_with_order((r, c))
        .map_err(|e| MoeError::shape(format!("gradient of {name} ({e})"), "contiguous", &shape))?;
    for (i, &row) in rows.iter().enumerate() {
        flat.row_mut(row as usize)
            .zip_mut_with(&values.row(i), |t, &g| *t += scale * g);
    }
    Ok(())
}

/// What [`Router::backward`](crate::router::Router::backward) is given: the forward's input and plan, and the
/// gradient of the loss with respect to each kept weight and each auxiliary loss.
#[derive(Debug, Clone)]
pub struct RouterBackward<'a, 'x> {
    /// The input the plan was routed from (same hidden states, ids, padding, mode and seed).
    pub input: &'a RouterInput<'x>,
    /// The plan the router returned for `input`.
    pub routing: &'a Routing,
    /// `dL/dw_s` for every slot `s` of `routing`, in the plan's slot order: expert-major (the slots of expert
    /// `active_experts()[g]` are `offsets()[g]..offsets()[g + 1]`, ascending token within an expert), as
    /// [`Routing::slot_tokens`], [`Routing::slot_experts`] and [`Routing::slot_weights`] list them.
    pub d_weights: &'a [f32],
    /// `dL/d(aux_i)` for every auxiliary loss of `routing`, in the order of [`Routing::aux_losses`]: the
    /// coefficient each loss enters the training loss with ([`Routing::aux_coefficients`] for the routers' own;
    /// 0 leaves a loss out).
    pub d_aux: &'a [f32],
}

impl RouterBackward<'_, '_> {
    /// Checks the lengths against the plan: `d_weights` one per slot, `d_aux` one per auxiliary loss, all finite,
    /// and the plan's size against the input.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming `d_weights` or `d_aux`; [`MoeError::NonFinite`] for a NaN or infinity;
    /// [`MoeError::Mismatch`] for a plan of another `T`.
    pub fn validate(&self) -> Result<(), MoeError> {
        let slots = self.routing.n_slots();
        if self.d_weights.len() != slots {
            return Err(MoeError::shape(
                "d_weights",
                format!("[{slots}] (one per kept assignment)"),
                &[self.d_weights.len()],
            ));
        }
        let n_aux = self.routing.aux_losses().len();
        if self.d_aux.len() != n_aux {
            return Err(MoeError::shape(
                "d_aux",
                format!("[{n_aux}] (one per auxiliary loss of the plan)"),
                &[self.d_aux.len()],
            ));
        }
        for (name, v) in [("d_weights", self.d_weights), ("d_aux", self.d_aux)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(MoeError::NonFinite {
                    tensor: name.into(),
                    token: i,
                    column: 0,
                    value: v[i],
                });
            }
        }
        if self.routing.n_tokens() != self.input.n_tokens() {
            return Err(MoeError::mismatch(
                "router backward",
                "plan tokens",
                self.routing.n_tokens(),
                "input tokens",
                self.input.n_tokens(),
            ));
        }
        Ok(())
    }

    /// `dL/d(aux)` of the first auxiliary loss of `kind` in the plan (0 when the plan has none).
    pub fn d_aux_of(&self, kind: crate::loss::AuxLossKind) -> f32 {
        self.routing
            .aux_losses()
            .iter()
            .zip(self.d_aux)
            .filter(|(a, _)| a.kind == kind)
            .map(|(_, &g)| g)
            .sum()
    }
}

/// What a router's backward returns.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterGrads {
    /// `dL/d(hidden)` `[T, d]` (zeros for routers that do not read the hidden states, such as hash routing by id).
    pub d_hidden: Array2<f32>,
    /// Gradients of the router's trainable parameters, named as in [`Router::params`](crate::router::Router::params)
    /// (frozen state such as a correction bias gets none).
    pub params: Vec<Grad>,
}

/// What a layer's backward returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGrads {
    /// `dL/dx` `[T, d]`.
    pub d_input: Array2<f32>,
    /// A gradient for every trainable parameter, named and ordered as in
    /// [`MoeLayer::params`](crate::layer::MoeLayer::params) (`router.gate`, `experts.gate_up`, `shared.down`,
    /// `output_bias`, ...), with the checkpoint names.
    pub params: Vec<Grad>,
}

impl LayerGrads {
    /// No gradients yet: the buffer a training loop hands to
    /// [`DeviceLayer::backward_into`](crate::backend::DeviceLayer::backward_into) on its first step.
    pub fn empty() -> Self {
        LayerGrads {
            d_input: Array2::zeros((0, 0)),
            params: Vec::new(),
        }
    }

    /// The gradient of parameter `name` (`experts.down`).
    pub fn get(&self, name: &str) -> Option<&Grad> {
        self.params.iter().find(|g| g.name == name)
    }
}

/// Pairs every gradient with the mutable view of its parameter (by name) and calls `update(param, grad)`:
/// the one walk every optimizer uses. Parameters without a gradient are left alone.
///
/// # Errors
/// [`MoeError::InvalidConfig`] for a gradient naming no parameter or a frozen one (state an optimizer must not
/// touch, such as DeepSeek-V3's correction bias); [`MoeError::Shape`] for a gradient of another shape; whatever
/// `update` returns.
pub fn apply_update(
    params: Vec<ParamMut<'_>>,
    grads: &[Grad],
    update: &mut dyn FnMut(&mut ParamMut<'_>, &Grad) -> Result<(), MoeError>,
) -> Result<(), MoeError> {
    let mut params = params;
    for g in grads {
        let p = params
            .iter_mut()
            .find(|p| p.name == g.name)
            .ok_or_else(|| {
                MoeError::config("gradient", &g.name, "names no parameter of the layer")
            })?;
        if !p.trainable {
            return Err(MoeError::config(
                "gradient",
                &g.name,
                "names frozen state, which an optimizer must not update",
            ));
        }
        if p.shape() != g.shape() {
            return Err(MoeError::shape(
                format!("gradient of {}", g.name),
                format!("{:?}", p.shape()),
                g.shape(),
            ));
        }
        update(p, g)?;
    }
    Ok(())
}

/// Plain gradient descent, `θ ← θ − lr · g`, as an [`apply_update`] callback.
pub fn sgd(lr: f32) -> impl FnMut(&mut ParamMut<'_>, &Grad) -> Result<(), MoeError> {
    move |p, g| g.add_to(&mut p.value, -lr)
}

/// `Σ_i a_i · b_i` over two views of one shape, in f64 (for checks and reports).
pub fn dot(a: ArrayViewD<'_, f32>, b: ArrayViewD<'_, f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| x as f64 * y as f64)
        .sum()
}

/// Sums the rows of `a` (`[T, n]`) into `[n]` in ascending row order (bias gradients).
pub fn sum_rows(a: ndarray::ArrayView2<'_, f32>) -> ndarray::Array1<f32> {
    a.sum_axis(Axis(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn sparse_rows_scatter_and_add() {
        let g = Grad {
            name: "u".into(),
            hf_name: None,
            value: GradValue::Rows {
                shape: vec![4, 2],
                rows: vec![1, 3],
                values: array![[1.0, 2.0], [3.0, 4.0]],
            },
        };
        let dense = g.to_dense().expect("dense");
        assert_eq!(
            dense,
            array![[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]].into_dyn()
        );
        let mut p = ArrayD::<f32>::ones(IxDyn(&[4, 2]));
        g.add_to(&mut p.view_mut(), -1.0).expect("add");
        assert_eq!(p[[3, 1]], -3.0);
        assert_eq!(g.max_abs(), 4.0);
        let mut wrong = ArrayD::<f32>::ones(IxDyn(&[4, 3]));
        assert!(matches!(
            g.add_to(&mut wrong.view_mut(), 1.0),
            Err(MoeError::Shape { .. })
        ));
    }

    #[test]
    fn apply_update_checks_names_shapes_and_frozen_state() {
        let mut w = array![1.0f32, 2.0];
        let mut b = array![0.5f32];
        let grads = vec![Grad::dense("w", array![1.0f32, 1.0])];
        apply_update(
            vec![
                ParamMut::new("w", w.view_mut()),
                ParamMut::new("b", b.view_mut()).frozen(),
            ],
            &grads,
            &mut sgd(0.5),
        )
        .expect("update");
        assert_eq!(w, array![0.5, 1.5]);
        let frozen = vec![Grad::dense("b", array![1.0f32])];
        let err = apply_update(
            vec![ParamMut::new("b", b.view_mut()).frozen()],
            &frozen,
            &mut sgd(1.0),
        );
        assert!(matches!(err, Err(MoeError::InvalidConfig { .. })));
        let unknown = vec![Grad::dense("nope", array![1.0f32])];
        assert!(apply_update(vec![], &unknown, &mut sgd(1.0)).is_err());
        let wrong = vec![Grad::dense("w", array![1.0f32])];
        assert!(matches!(
            apply_update(
                vec![ParamMut::new("w", w.view_mut())],
                &wrong,
                &mut sgd(1.0)
            ),
            Err(MoeError::Shape { .. })
        ));
    }
}
