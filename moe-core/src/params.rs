//! Named, shaped parameter views: what an optimizer, a checkpoint writer or a gradient check walks over. Every
//! owner of weights (routers, expert banks, shared experts, the layer) lists its tensors under stable names, with
//! the Hugging Face name where a preset loaded them; mutable views keep each tensor's shape, so an update can
//! change values but never break a shape invariant the owner checked on construction.

use ndarray::{ArrayViewD, ArrayViewMutD, Dimension};

/// A read-only view of one parameter tensor.
#[derive(Debug, Clone)]
pub struct Param<'a> {
    /// Name within its owner (`gate`, `gate_up`); [`MoeLayer::params`](crate::layer::MoeLayer::params) prefixes
    /// the owner (`router.gate`, `experts.gate_up`, `shared.down`, `output_bias`).
    pub name: String,
    /// The checkpoint's name of the tensor (`block_sparse_moe.gate.weight`) where a preset loaded it.
    pub hf_name: Option<String>,
    /// Whether an optimizer updates it. State that is not learned by gradient (DeepSeek-V3's selection-only
    /// correction bias, updated by its own rule) is listed with `trainable: false`.
    pub trainable: bool,
    /// The values, in the owner's layout (shape as documented by the owner).
    pub value: ArrayViewD<'a, f32>,
}

/// A mutable view of one parameter tensor (values only: the shape is fixed).
#[derive(Debug)]
pub struct ParamMut<'a> {
    /// As [`Param::name`].
    pub name: String,
    /// As [`Param::hf_name`].
    pub hf_name: Option<String>,
    /// As [`Param::trainable`].
    pub trainable: bool,
    /// The values.
    pub value: ArrayViewMutD<'a, f32>,
}

impl<'a> Param<'a> {
    /// A trainable parameter named `name`.
    pub fn new<D: Dimension>(name: &str, value: ndarray::ArrayView<'a, f32, D>) -> Self {
        Param {
            name: name.to_string(),
            hf_name: None,
            trainable: true,
            value: value.into_dyn(),
        }
    }

    /// Marks it as state an optimizer must not update.
    pub fn frozen(mut self) -> Self {
        self.trainable = false;
        self
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
}

impl<'a> ParamMut<'a> {
    /// A trainable parameter named `name`.
    pub fn new<D: Dimension>(name: &str, value: ndarray::ArrayViewMut<'a, f32, D>) -> Self {
        ParamMut {
            name: name.to_string(),
            hf_name: None,
            trainable: true,
            value: value.into_dyn(),
        }
    }

    /// Marks it as state an optimizer must not update.
    pub fn frozen(mut self) -> Self {
        self.trainable = false;
        self
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
}
