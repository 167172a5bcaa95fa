//! [`MoeLayer`]: a router, an expert bank, optional shared experts, output scaling and bias. The layer is data; a
//! [`Backend`](crate::backend::Backend) uploads it and runs it.

use ndarray::Array1;

use crate::error::MoeError;
use crate::expert::{ExpertBank, SharedExperts};
use crate::router::Router;

/// A Mixture-of-Experts layer:
/// `y = output_scale · Σ_{(e, w) ∈ route(x)} w · expert_e(x) + shared(x) + output_bias`.
///
/// The output scale multiplies the routed part only (NLLB's eval token-dropout factor `1 − p`).
#[derive(Debug, Clone)]
pub struct MoeLayer {
    router: Box<dyn Router>,
    experts: ExpertBank,
    shared: Option<SharedExperts>,
    output_scale: f32,
    output_bias: Option<Array1<f32>>,
}

impl MoeLayer {
    /// Joins a router and an expert bank.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when the router's expert count or width differs from the bank's.
    pub fn new(router: Box<dyn Router>, experts: ExpertBank) -> Result<Self, MoeError> {
        if router.n_experts() != experts.n_experts() {
            return Err(MoeError::mismatch(
                "router and experts disagree",
                "router experts",
                router.n_experts(),
                "bank experts",
                experts.n_experts(),
            ));
        }
        if let Some(d) = router.d_model()
            && d != experts.d_model()
        {
            return Err(MoeError::mismatch(
                "router and experts disagree",
                "router d",
                d,
                "experts d",
                experts.d_model(),
            ));
        }
        Ok(MoeLayer {
            router,
            experts,
            shared: None,
            output_scale: 1.0,
            output_bias: None,
        })
    }

    /// Adds shared experts.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when their width differs from the routed experts'.
    pub fn with_shared(mut self, shared: SharedExperts) -> Result<Self, MoeError> {
        if shared.bank.d_model() != self.d_model() {
            return Err(MoeError::mismatch(
                "shared experts",
                "shared d",
                shared.bank.d_model(),
                "layer d",
                self.d_model(),
            ));
        }
        self.shared = Some(shared);
        Ok(self)
    }

    /// Multiplies the routed part by `scale`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a non-finite scale.
    pub fn with_output_scale(mut self, scale: f32) -> Result<Self, MoeError> {
        if !scale.is_finite() {
            return Err(MoeError::config("output_scale", scale, "must be finite"));
        }
        self.output_scale = scale;
        Ok(self)
    }

    /// Adds a bias `[d]` to every token's output (JetMoE).
    ///
    /// # Errors
    /// [`MoeError::Shape`] for a wrong length.
    pub fn with_output_bias(mut self, bias: Array1<f32>) -> Result<Self, MoeError> {
        if bias.len() != self.d_model() {
            return Err(MoeError::shape(
                "bias",
                format!("[{}]", self.d_model()),
                &[bias.len()],
            ));
        }
        self.output_bias = Some(bias);
        Ok(self)
    }

    /// The router.
    pub fn router(&self) -> &dyn Router {
        self.router.as_ref()
    }

    /// The router, mutably (for training-time updates such as the aux-loss-free bias).
    pub fn router_mut(&mut self) -> &mut Box<dyn Router> {
        &mut self.router
    }

    /// The routed experts.
    pub fn experts(&self) -> &ExpertBank {
        &self.experts
    }

    /// The shared experts, if any.
    pub fn shared(&self) -> Option<&SharedExperts> {
        self.shared.as_ref()
    }

    /// The routed-part scale (1 unless set).
    pub fn output_scale(&self) -> f32 {
        self.output_scale
    }

    /// The output bias, if any.
    pub fn output_bias(&self) -> Option<&Array1<f32>> {
        self.output_bias.as_ref()
    }

    /// Moves the routed and shared experts' weight tensors to allocations aligned to `bytes` (see
    /// [`ExpertBank::align_weights`]); values and shapes are unchanged.
    pub fn align_weights(&mut self, bytes: usize) {
        self.experts.align_weights(bytes);
        if let Some(shared) = &mut self.shared {
            shared.bank.align_weights(bytes);
        }
    }

    /// Model width `d`.
    pub fn d_model(&self) -> usize {
        self.experts.d_model()
    }

    /// Number of routed experts `E`.
    pub fn n_experts(&self) -> usize {
        self.experts.n_experts()
    }
}
