//! [`MoeLayer`]: a router, an expert bank, optional shared experts, output scaling and bias. The layer is data; a
//! [`Backend`](crate::backend::Backend) uploads it and runs it.

use std::collections::BTreeMap;
use std::sync::Arc;

use ndarray::Array1;

use crate::error::MoeError;
use crate::expert::{ExpertBank, SharedExperts};
use crate::grad::Grad;
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

    /// This layer with its routed experts held elsewhere: `experts` are the same experts in another home (router,
    /// shared experts, output scale and bias and checkpoint names kept), e.g. put in a store with
    /// `layer.with_experts(ExpertBank::Stored(StoredBank::new(source, config)?))`.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] when `experts` has another expert count or width than the router;
    /// [`MoeError::InvalidConfig`] when both banks have a [`ExpertForm`](crate::store::ExpertForm) and the forms
    /// differ (another family, FFN width, activation, biases, or GPT-OSS `alpha` / `limit`): the experts would
    /// compute something else.
    pub fn with_experts(&self, experts: ExpertBank) -> Result<Self, MoeError> {
        check_router_fits(self.router.as_ref(), &experts)?;
        use crate::store::ExpertForm;
        if let (Ok(old), Ok(new)) = (ExpertForm::of(&self.experts), ExpertForm::of(&experts))
            && old != new
        {
            return Err(MoeError::config(
                "experts",
                format!("{new:?}"),
                format!("the layer's experts are {old:?}: the same experts must keep their form"),
            ));
        }
        Ok(MoeLayer {
            router: self.router_box(),
            experts: Arc::new(experts),
            shared: self.shared.clone(),
            output_scale: self.output_scale,
            output_bias: self.output_bias.clone(),
            hf_names: self.hf_names.clone(),
        })
    }

    /// This layer with its routed and shared experts' weights in `format`: SwiGLU, GPT-OSS and MLP banks are
    /// quantised ([`PackedBank::quantize`](crate::quant::PackedBank::quantize)); a bank already packed in
    /// `format` is kept. `WeightFormat::F32` returns the layer unchanged. The router, the shared-expert gate and
    /// every bias stay f32, so the routing is bit-identical.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a bank packed in another format (quantising twice compounds the error:
    /// dequantise it first); [`MoeError::Unsupported`] for PEER, custom and stored banks; the quantiser's errors
    /// (MXFP4 needs `d` and `f` multiples of 32).
    pub fn quantized(&self, format: crate::quant::WeightFormat) -> Result<Self, MoeError> {
        use crate::quant::{PackedBank, WeightFormat};
        if format == WeightFormat::F32 {
            return Ok(self.clone());
        }
        let convert = |bank: &ExpertBank| -> Result<ExpertBank, MoeError> {
            match bank {
                ExpertBank::Packed(b) if b.format() == format => Ok(bank.clone()),
                ExpertBank::Packed(b) => Err(MoeError::config(
                    "dtype",
                    format.name(),
                    format!(
                        "the experts are already packed in {} (dequantise them before quantising again)",
                        b.format()
                    ),
                )),
                other => Ok(ExpertBank::Packed(PackedBank::quantize(other, format)?)),
            }
        };
        let experts = convert(&self.experts)?;
        let shared = match &self.shared {
            Some(s) => Some(Arc::new(SharedExperts::new(
                convert(s.bank())?,
                s.gate().cloned(),
            )?)),
            None => None,
        };
        Ok(MoeLayer {
            router: self.router_box(),
            experts: Arc::new(experts),
            shared,
            output_scale: self.output_scale,
            output_bias: self.output_bias.clone(),
            hf_names: self.hf_names.clone(),
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

    /// A copy of the router (to update its state and give it back with `DeviceLayer::set_router`).
    pub fn router_box(&self) -> Box<dyn Router> {
        self.router.clone()
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

    /// Names an owner's gradients as [`MoeLayer::params`] names its parameters: `owner` is `router`, `experts` or
    /// `shared` (each gradient's name becomes `owner.name`), or empty for the layer's own (`output_bias`); the
    /// checkpoint name is attached where a preset recorded one.
    pub fn name_grads(&self, owner: &str, grads: Vec<Grad>) -> Vec<Grad> {
        grads
            .into_iter()
            .map(|g| {
                let name = if owner.is_empty() {
                    g.name
                } else {
                    format!("{owner}.{}", g.name)
                };
                let hf_name = self.hf_names.get(&name).cloned();
                Grad { name, hf_name, ..g }
            })
            .collect()
    }

    /// Applies `update(param, grad)` to every parameter `grads` names ([`crate::grad::apply_update`] over
    /// [`MoeLayer::params_mut`]; a bank shared with another layer is copied first).
    ///
    /// # Errors
    /// As [`crate::grad::apply_update`]: unknown or frozen names, wrong shapes, the callback's errors.
    pub fn apply_update(
        &mut self,
        grads: &[Grad],
        update: &mut dyn FnMut(&mut ParamMut<'_>, &Grad) -> Result<(), MoeError>,
    ) -> Result<(), MoeError> {
        crate::grad::apply_update(self.params_mut(), grads, update)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FixedPlan;
    use crate::workload::random_swiglu_bank;

    fn fixed(e: usize, d: usize) -> Box<dyn Router> {
        Box::new(FixedPlan {
            n_experts: e,
            d_model: d,
            kept: Vec::new(),
        })
    }

    fn layer() -> MoeLayer {
        let bank = random_swiglu_bank(4, 8, 6, 0).unwrap_or_else(|e| panic!("{e}"));
        let shared_bank = random_swiglu_bank(1, 8, 5, 1).unwrap_or_else(|e| panic!("{e}"));
        let shared = SharedExperts::new(shared_bank, Some(Array1::from_elem(8, 0.5)))
            .unwrap_or_else(|e| panic!("{e}"));
        MoeLayer::new(fixed(4, 8), bank)
            .and_then(|l| l.with_shared(shared))
            .and_then(|l| l.with_output_bias(Array1::zeros(8)))
            .unwrap_or_else(|e| panic!("{e}"))
            .with_hf_names([("experts.gate_up", "mlp.experts.gate_up_proj".to_string())])
    }

    #[test]
    fn params_are_named_shaped_and_carry_hf_names() {
        let l = layer();
        let got: Vec<(String, Vec<usize>, Option<String>)> = l
            .params()
            .into_iter()
            .map(|p| (p.name.clone(), p.shape().to_vec(), p.hf_name.clone()))
            .collect();
        let want = vec![
            (
                "experts.gate_up".to_string(),
                vec![4, 12, 8],
                Some("mlp.experts.gate_up_proj".to_string()),
            ),
            ("experts.down".to_string(), vec![4, 8, 6], None),
            ("shared.gate_up".to_string(), vec![1, 10, 8], None),
            ("shared.down".to_string(), vec![1, 8, 5], None),
            ("shared.gate".to_string(), vec![8], None),
            ("output_bias".to_string(), vec![8], None),
        ];
        assert_eq!(got, want);
        let names: Vec<String> = layer().params_mut().into_iter().map(|p| p.name).collect();
        assert_eq!(names, want.iter().map(|w| w.0.clone()).collect::<Vec<_>>());
    }

    #[test]
    fn params_mut_copies_a_shared_bank_before_writing() {
        let a = layer();
        let mut b = a.clone();
        assert!(Arc::ptr_eq(a.experts_arc(), b.experts_arc()));
        for mut p in b.params_mut() {
            if p.name == "experts.down" {
                p.value.fill(1.0);
            }
        }
        assert!(!Arc::ptr_eq(a.experts_arc(), b.experts_arc()));
        let down = |l: &MoeLayer| match l.experts() {
            ExpertBank::SwiGlu(s) => s.down().clone(),
            _ => panic!("bank kind changed"),
        };
        assert!(down(&b).iter().all(|&v| v == 1.0));
        assert!(
            down(&a).iter().any(|&v| v != 1.0),
            "the other layer was changed"
        );
    }

    #[test]
    fn set_router_keeps_the_bank_and_refuses_a_router_that_does_not_fit() {
        let mut l = layer();
        let bank = Arc::clone(l.experts_arc());
        l.set_router(fixed(4, 8)).unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&bank, l.experts_arc()));
        assert!(matches!(
            l.set_router(fixed(5, 8)),
            Err(MoeError::Mismatch { .. })
        ));
        assert!(matches!(
            l.set_router(fixed(4, 9)),
            Err(MoeError::Mismatch { .. })
        ));
    }
}
