//! [`MoeLayer`]: a router, an expert bank, optional shared experts, output scaling and bias. The layer is data; a
//! [`Backend`](crate::backend::Backend) uploads it and runs it.

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::Array1;

use crate::error::MoeError;
use crate::expert::{ExpertBank, SharedExperts};
use crate::params::{Param, ParamMut};
use crate::router::{Router, RouterInput};
use crate::routing::Routing;

/// A Mixture-of-Experts layer:
/// `y = output_scale · Σ_{(e, w) ∈ route(x)} w · expert_e(x) + shared(x) + output_bias`.
///
/// The output scale multiplies the routed part only (NLLB's eval token-dropout factor `1 − p`).
///
/// The experts and shared experts are held behind `Arc`s: cloning a layer (or giving it another router with
/// [`MoeLayer::set_router`]) shares the bank instead of copying it, and [`MoeLayer::experts_mut`] copies it only
/// when it is shared (copy on write).
#[derive(Debug, Clone)]
pub struct MoeLayer {
    router: Box<dyn Router>,
    experts: Arc<ExpertBank>,
    shared: Option<Arc<SharedExperts>>,
    output_scale: f32,
    output_bias: Option<Array1<f32>>,
    hf_names: BTreeMap<String, String>,
}

impl MoeLayer {
    /// Joins a router and an expert bank.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when the router's expert count or width differs from the bank's.
    pub fn new(router: Box<dyn Router>, experts: ExpertBank) -> Result<Self, MoeError> {
        check_router_fits(router.as_ref(), &experts)?;
        Ok(MoeLayer {
            router,
            experts: Arc::new(experts),
            shared: None,
            output_scale: 1.0,
            output_bias: None,
            hf_names: BTreeMap::new(),
        })
    }

    /// Adds shared experts.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when their width differs from the routed experts'.
    pub fn with_shared(mut self, shared: SharedExperts) -> Result<Self, MoeError> {
        if shared.bank().d_model() != self.d_model() {
            return Err(MoeError::mismatch(
                "shared experts",
                "shared d",
                shared.bank().d_model(),
                "layer d",
                self.d_model(),
            ));
        }
        self.shared = Some(Arc::new(shared));
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

    /// The routed experts, shared: another layer built around the same bank holds no copy.
    pub fn experts_arc(&self) -> &Arc<ExpertBank> {
        &self.experts
    }

    /// The routed experts, mutably (a copy is made first if another layer shares them).
    pub fn experts_mut(&mut self) -> &mut ExpertBank {
        Arc::make_mut(&mut self.experts)
    }

    /// The shared experts, if any.
    pub fn shared(&self) -> Option<&SharedExperts> {
        self.shared.as_deref()
    }

    /// Records the checkpoint name of parameters (`("router.gate", "block_sparse_moe.gate.weight")`), reported
    /// by [`MoeLayer::params`] as [`Param::hf_name`]. Presets call this for every tensor they load.
    pub fn with_hf_names<'a>(mut self, names: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        for (ours, hf) in names {
            self.hf_names.insert(ours.to_string(), hf);
        }
        self
    }

    /// Named views of every parameter of the layer, in a fixed order: the router's (`router.*`, see
    /// [`Router::params`]), the routed experts' (`experts.*`, see [`ExpertBank::params`]), the shared experts'
    /// (`shared.*`) and `output_bias` `[d]`; with the checkpoint names where a preset loaded them.
    pub fn params<'a>(&'a self) -> Vec<Param<'a>> {
        let mut out = Vec::new();
        let names = &self.hf_names;
        let named = |prefix: &str, p: Param<'a>| -> Param<'a> {
            let name = format!("{prefix}.{}", p.name);
            let hf_name = names.get(&name).cloned();
            Param { name, hf_name, ..p }
        };
        out.extend(self.router.params().into_iter().map(|p| named("router", p)));
        out.extend(
            self.experts
                .params()
                .into_iter()
                .map(|p| named("experts", p)),
        );
        if let Some(s) = &self.shared {
            out.extend(s.params().into_iter().map(|p| named("shared", p)));
        }
        if let Some(b) = &self.output_bias {
            let mut p = Param::new("output_bias", b.view());
            p.hf_name = self.hf_names.get("output_bias").cloned();
            out.push(p);
        }
        out
    }

    /// Mutable views of the same parameters, in the same order as [`MoeLayer::params`]. Banks shared with
    /// another layer are copied first (copy on write), so an update never changes another layer.
    pub fn params_mut<'a>(&'a mut self) -> Vec<ParamMut<'a>> {
        let names = &self.hf_names;
        let named = |prefix: &str, p: ParamMut<'a>| -> ParamMut<'a> {
            let name = format!("{prefix}.{}", p.name);
            let hf_name = names.get(&name).cloned();
            ParamMut { name, hf_name, ..p }
        };
        let mut out = Vec::new();
        out.extend(
            self.router
                .params_mut()
                .into_iter()
                .map(|p| named("router", p)),
        );
        out.extend(
            Arc::make_mut(&mut self.experts)
                .params_mut()
                .into_iter()
                .map(|p| named("experts", p)),
        );
        if let Some(s) = &mut self.shared {
            out.extend(
                Arc::make_mut(s)
                    .params_mut()
                    .into_iter()
                    .map(|p| named("shared", p)),
            );
        }
        if let Some(b) = &mut self.output_bias {
            let mut p = ParamMut::new("output_bias", b.view_mut());
            p.hf_name = names.get("output_bias").cloned();
            out.push(p);
        }
        out
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
    /// Banks another layer shares are left where they are (moving them would copy them).
    pub fn align_weights(&mut self, bytes: usize) {
        if let Some(b) = Arc::get_mut(&mut self.experts) {
            b.align_weights(bytes);
        }
        if let Some(shared) = self.shared.as_mut().and_then(Arc::get_mut) {
            shared.align_weights(bytes);
        }
    }

    /// Replaces the router, keeping the experts (one resident bank, many routers).
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when the new router's expert count or width differs from the bank's.
    pub fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError> {
        check_router_fits(router.as_ref(), &self.experts)?;
        self.router = router;
        Ok(())
    }

    /// Checks that `input` has the layer's width `d`.
    ///
    /// # Errors
    /// [`MoeError::Shape`] naming `hidden` with the expected and found shapes.
    pub fn check_width(&self, input: &RouterInput<'_>) -> Result<(), MoeError> {
        let (t, d) = input.hidden.dim();
        if d != self.d_model() {
            return Err(MoeError::shape(
                "hidden",
                format!("[T, {}]", self.d_model()),
                &[t, d],
            ));
        }
        Ok(())
    }

    /// Routes `input` on the host with the layer's router and checks the plan's size against the layer: what
    /// every backend's host path runs.
    ///
    /// # Errors
    /// A wrong width ([`MoeLayer::check_width`]), the router's own errors (NaN naming the token, bad padding),
    /// [`MoeError::Mismatch`] for a plan of the wrong size (a plugin's bug).
    pub fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        self.check_width(input)?;
        let t = input.hidden.nrows();
        let routing = self.router.route(input)?;
        if routing.n_tokens() != t || routing.n_experts() != self.n_experts() {
            return Err(MoeError::mismatch(
                format!(
                    "router {} returned a plan of the wrong size",
                    self.router.name()
                ),
                "plan tokens x experts",
                routing.n_tokens() * routing.n_experts(),
                "input tokens x layer experts",
                t * self.n_experts(),
            ));
        }
        Ok(routing)
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

/// Checks that a router routes to the bank's experts at the bank's width.
fn check_router_fits(router: &dyn Router, experts: &ExpertBank) -> Result<(), MoeError> {
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
    Ok(())
}
