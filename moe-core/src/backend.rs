//! The backend contract: a backend uploads a layer's weights once ([`Backend::upload`]) and runs forwards on the
//! resident copy ([`DeviceLayer::forward`]). Core knows no backend; `moe-backends` implements this.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};

use crate::error::MoeError;
use crate::expert::ExpertBank;
use crate::grad::{Grad, LayerGrads};
use crate::layer::MoeLayer;
use crate::params::ParamMut;
use crate::remote::{RemoteExperts, ResidentExperts};
use crate::router::{Router, RouterInput};
use crate::routing::Routing;
use crate::store::StoreStats;

/// Where the routing of a forward was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPath {
    /// The backend executed the router's [`RouterSpec`](crate::router::RouterSpec) on its device.
    Native,
    /// The backend called [`Router::route`] on the host.
    Host,
}

/// What a backend can do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// The device, in words (`cpu (2 threads)`, an adapter name, a GPU name).
    pub device: String,
    /// Weight dtypes it runs (`f32`, `bf16`, `f16`).
    pub dtypes: Vec<String>,
    /// Router spec kinds it runs natively (`topk`, `switch`); others take the host path.
    pub native_specs: Vec<String>,
    /// Expert bank kinds it runs grouped (`swiglu`, `gpt_oss`, `mlp`, `peer`, `custom`).
    pub banks: Vec<String>,
}

/// The result of one layer forward.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// `[T, d]` layer output.
    pub output: Array2<f32>,
    /// The dispatch plan that was executed.
    pub routing: Routing,
    /// Where the routing ran.
    pub router_path: RouterPath,
}

/// A compute backend (CPU, CUDA, wgpu).
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Short name: `cpu`, `cuda`, `wgpu`.
    fn name(&self) -> &str;

    /// What this backend runs.
    fn capabilities(&self) -> Capabilities;

    /// Uploads the layer's weights once and returns the resident layer.
    ///
    /// # Errors
    /// [`MoeError`] if the layer cannot be run here (unsupported bank, out of device memory).
    fn upload(&self, layer: Arc<MoeLayer>) -> Result<Box<dyn DeviceLayer>, MoeError>;

    /// The memory read bandwidth of the backend's device in GB/s (10⁹ bytes/s), measured now: the median of
    /// `repeats` read-only passes over a buffer of `bytes` bytes, on the threads or device the forwards use. It
    /// gives weight-streaming figures their floor (a forward with few tokens per expert reads every weight once).
    /// `Ok(None)`, the default, means the backend has no such probe.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for a size or repeat count the probe does not take; a device error.
    fn read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<Option<f64>, MoeError> {
        let _ = (bytes, repeats);
        Ok(None)
    }
    /// Uploads a bank of experts with no router: the experts one expert-parallel rank owns
    /// ([`ExpertBank::select`]), run on groups of rows that other ranks' plans send ([`ResidentExperts`]). The
    /// default returns [`MoeError::Unsupported`] naming the backend.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] for a backend or bank kind that does not run resident experts alone; as
    /// [`Backend::upload`].
    fn upload_experts(&self, bank: Arc<ExpertBank>) -> Result<Box<dyn ResidentExperts>, MoeError> {
        let _ = bank;
        Err(MoeError::Unsupported {
            owner: format!("backend {}", self.name()),
            feature:
                "resident experts without a layer (expert parallelism; the cpu backend runs them)"
                    .into(),
        })
    }
}

/// A layer resident on a backend.
pub trait DeviceLayer: Send {
    /// The layer this was uploaded from.
    fn layer(&self) -> &MoeLayer;

    /// The name of the backend the layer is resident on (`cpu`, `wgpu`, `cuda`), for messages; the default says
    /// only that it is a backend.
    fn backend(&self) -> &str {
        "this backend"
    }

    /// Runs the layer on `input` (`[T, d]`), returning `[T, d]` and the plan.
    ///
    /// # Errors
    /// Routing errors (bad width, NaN naming the token, `k > E`), expert errors; `T = 0` gives an empty output.
    fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError>;

    /// Replaces the router of the resident layer, keeping the uploaded experts: several routers run on one
    /// resident bank without uploading it again (`moe compare`). The router must fit the layer
    /// ([`MoeLayer::set_router`]).
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for a router of another `E` or `d`; a device error while uploading the router's own
    /// parameters.
    fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError>;

    /// A training forward: as [`DeviceLayer::forward`], and keeps what [`DeviceLayer::backward`] needs (the
    /// input, the plan, the experts' inputs and pre-activations) until that backward. The mode of `input` (eval or train with a seed)
    /// is the router's as always; noise and jitter are on in train mode. The default returns
    /// [`MoeError::Unsupported`] naming the backend.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward`]; [`MoeError::Unsupported`] on a backend without training.
    fn forward_train(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
        let _ = input;
        Err(unsupported(self.backend(), "forward_train and backward"))
    }

    /// The backward of the last [`DeviceLayer::forward_train`]: for the loss
    /// `L = Σ (output ⊙ d_output) + Σ_i d_aux[i] · aux_i`, returns `dL/dx` `[T, d]` and the gradient of every
    /// trainable parameter (named as in [`MoeLayer::params`]). `d_output` is `[T, d]`; `d_aux` has one entry per
    /// auxiliary loss of the forward's plan ([`Routing::aux_coefficients`] trains with the routers' own
    /// coefficients; zeros leave them out). A backward consumes its training forward's state (as torch frees the
    /// graph; the CPU backend overwrites the saved pre-activations with their gradients), so each backward follows
    /// its own training forward.
    ///
    /// # Errors
    /// [`MoeError::Order`] without a training forward before it; [`MoeError::Shape`] naming `d_output` or `d_aux`;
    /// [`MoeError::NonFinite`] naming `d_output` and the token; [`MoeError::Unsupported`] naming the router when it
    /// has no backward, or the backend.
    fn backward(
        &mut self,
        d_output: ArrayView2<'_, f32>,
        d_aux: &[f32],
    ) -> Result<LayerGrads, MoeError> {
        let _ = (d_output, d_aux);
        Err(unsupported(self.backend(), "forward_train and backward"))
    }

    /// [`DeviceLayer::backward`] writing into `grads`, whose tensors (a previous step's result, after the optimizer
    /// used them) are reused where a gradient of the same name and shape is needed: a training loop then allocates
    /// its gradients once instead of every step (for an OLMoE-like layer they are 2.2 GB). The default calls
    /// [`DeviceLayer::backward`] and replaces `grads`.
    ///
    /// # Errors
    /// As [`DeviceLayer::backward`]; on an error `grads` is left as it was.
    fn backward_into(
        &mut self,
        d_output: ArrayView2<'_, f32>,
        d_aux: &[f32],
        grads: &mut LayerGrads,
    ) -> Result<(), MoeError> {
        *grads = self.backward(d_output, d_aux)?;
        Ok(())
    }

    /// Applies `update(param, grad)` to every parameter of the resident layer that `grads` names
    /// ([`grad::apply_update`](crate::grad::apply_update)), keeping the resident copy in step. The default returns
    /// [`MoeError::Unsupported`].
    ///
    /// # Errors
    /// As [`grad::apply_update`](crate::grad::apply_update); [`MoeError::Unsupported`] on a backend without
    /// training.
    fn apply_update(
        &mut self,
        grads: &[Grad],
        update: &mut dyn FnMut(&mut ParamMut<'_>, &Grad) -> Result<(), MoeError>,
    ) -> Result<(), MoeError> {
        let _ = (grads, update);
        Err(unsupported(self.backend(), "parameter updates"))
    }

    /// The once-per-step update of the resident router's state learned without gradient
    /// ([`Router::update_state`]: a correction bias, running statistics) from the step's input and plan; returns
    /// whether the router has such state. The default updates a copy of the router and puts it back with
    /// [`DeviceLayer::set_router`] (the experts stay resident).
    ///
    /// # Errors
    /// As [`Router::update_state`] and [`DeviceLayer::set_router`].
    fn update_state(
        &mut self,
        input: &RouterInput<'_>,
        routing: &Routing,
        bias_rate: f32,
    ) -> Result<bool, MoeError> {
        let mut router = self.layer().router_box();
        if !router.update_state(input, routing, bias_rate)? {
            return Ok(false);
        }
        self.set_router(router)?;
        Ok(true)
    }

    /// What the layer's expert store did so far, when its routed bank is an
    /// [`ExpertBank::Stored`]; `None` (the default) for a layer whose experts are all
    /// resident.
    fn store_stats(&self) -> Option<StoreStats> {
        None
    }

    /// Hints that `experts` (ids `< E`) will be needed soon (the next layer's experts predicted by its gate on this
    /// layer's input): a layer with a stored bank places them in its slots now, as
    /// [`SlotCache::prefetch`](crate::store::cache::SlotCache::prefetch) says, and loads them on a background
    /// thread while the caller computes; the next forward waits for loads still in flight. Outputs do not depend
    /// on prefetches. The default (all experts resident) does nothing.
    ///
    /// # Errors
    /// A failed earlier background load ([`MoeError::Expert`] naming the expert): the next forward or prefetch
    /// collects every load in flight first and reports a failed one, its slot emptied (nothing partial is used).
    fn prefetch(&mut self, experts: &[u32]) -> Result<(), MoeError> {
        let _ = experts;
        Ok(())
    }

    /// [`DeviceLayer::forward`] with the routed experts' products done by `experts` (an expert-parallel layer):
    /// the layer routes `input`, gathers each slot's row, hands the rows to [`RemoteExperts::forward`], and
    /// combines the outputs it gets back with shared experts and output bias exactly as its own forward does. The
    /// resident routed bank is not used (an expert-parallel rank holds placeholders there). With outputs that
    /// equal the experts' own, the result is bit-identical to [`DeviceLayer::forward`]. The default returns
    /// [`MoeError::Unsupported`] naming the backend.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward`]; whatever `experts` reports; [`MoeError::Shape`] for outputs that are not
    /// `[slots, d]`.
    fn forward_remote(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        let _ = (input, experts);
        Err(MoeError::Unsupported {
            owner: format!("backend {}", self.backend()),
            feature: "remote experts (expert parallelism; the cpu backend runs them)".into(),
        })
    }

    /// The training twin of [`DeviceLayer::forward_remote`] ([`DeviceLayer::forward_train`] with
    /// `experts.forward(.., train = true)`): keeps what [`DeviceLayer::backward_remote`] needs.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward_remote`] and [`DeviceLayer::forward_train`].
    fn forward_train_remote(
        &mut self,
        input: &RouterInput<'_>,
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerOutput, MoeError> {
        let _ = (input, experts);
        Err(unsupported(
            self.backend(),
            "forward_train_remote and backward_remote",
        ))
    }

    /// The backward of the last [`DeviceLayer::forward_train_remote`], as [`DeviceLayer::backward`] with the
    /// routed experts' backward done by [`RemoteExperts::backward`]: returns `dL/dx` and the gradients of the
    /// router, shared experts and output bias. The routed experts' weight gradients stay with their owners
    /// ([`ResidentExperts::take_grads`]); `params` lists none of them.
    ///
    /// # Errors
    /// As [`DeviceLayer::backward`]; whatever `experts` reports.
    fn backward_remote(
        &mut self,
        d_output: ArrayView2<'_, f32>,
        d_aux: &[f32],
        experts: &mut dyn RemoteExperts,
    ) -> Result<LayerGrads, MoeError> {
        let _ = (d_output, d_aux, experts);
        Err(unsupported(
            self.backend(),
            "forward_train_remote and backward_remote",
        ))
    }

    /// Runs `work(i, n)` once on each of the layer's `n` host worker threads at the same time (`i` in `0..n`) and
    /// returns when all have. The default runs `work(0, 1)` on the calling thread; the CPU backend runs it on its
    /// thread pool. `moe bench --bandwidth` evicts the caches this way before each timed forward: from every core
    /// that runs the forward, and with those workers left awake, as a model's other work between two layers
    /// leaves them (workers that went to sleep first pay their wake-up inside the next forward).
    fn on_workers(&self, work: &(dyn Fn(usize, usize) + Sync)) {
        work(0, 1);
    }

    /// Times `repeats` forwards of `input` by the device's own clock, in milliseconds each, with the input copied
    /// to the device once beforehand and the output left there (CUDA events on a GPU). `Ok(None)`, the default,
    /// means the backend has no device clock: time [`DeviceLayer::forward`] on the host instead.
    ///
    /// # Errors
    /// As [`DeviceLayer::forward`].
    fn device_times(
        &mut self,
        input: &RouterInput<'_>,
        repeats: usize,
    ) -> Result<Option<Vec<f64>>, MoeError> {
        let _ = (input, repeats);
        Ok(None)
    }
}

/// The error of a training call on a backend that has none: `backend wgpu does not support training
/// (forward_train and backward; the cpu backend trains) yet`.
fn unsupported(backend: &str, what: &str) -> MoeError {
    MoeError::Unsupported {
        owner: format!("backend {backend}"),
        feature: format!("training ({what}; the cpu backend trains)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FixedPlan;
    use crate::workload::random_swiglu_bank;

    /// A resident layer that only forwards: the training defaults name its backend.
    struct ForwardOnly(MoeLayer);

    impl DeviceLayer for ForwardOnly {
        fn layer(&self) -> &MoeLayer {
            &self.0
        }
        fn backend(&self) -> &str {
            "mock"
        }
        fn forward(&mut self, input: &RouterInput<'_>) -> Result<LayerOutput, MoeError> {
            let routing = self.0.route(input)?;
            Ok(LayerOutput {
                output: Array2::zeros(input.hidden.dim()),
                routing,
                router_path: RouterPath::Host,
            })
        }
        fn set_router(&mut self, router: Box<dyn Router>) -> Result<(), MoeError> {
            self.0.set_router(router)
        }
    }

    #[test]
    fn training_defaults_name_the_backend_and_update_state_goes_through_set_router() {
        let bank = random_swiglu_bank(2, 4, 3, 0).unwrap_or_else(|e| panic!("{e}"));
        let router = FixedPlan {
            n_experts: 2,
            d_model: 4,
            kept: Vec::new(),
        };
        let mut dev =
            ForwardOnly(MoeLayer::new(Box::new(router), bank).unwrap_or_else(|e| panic!("{e}")));
        let x = Array2::<f32>::zeros((3, 4));
        let input = RouterInput::new(x.view());
        let want = |e: MoeError| match e {
            MoeError::Unsupported { owner, .. } => assert_eq!(owner, "backend mock"),
            other => panic!("{other:?}"),
        };
        want(
            dev.forward_train(&input)
                .err()
                .unwrap_or_else(|| panic!("trained")),
        );
        want(
            dev.backward(x.view(), &[])
                .err()
                .unwrap_or_else(|| panic!("trained")),
        );
        want(
            dev.apply_update(&[], &mut |_, _| Ok(()))
                .err()
                .unwrap_or_else(|| panic!("updated")),
        );
        let out = dev.forward(&input).unwrap_or_else(|e| panic!("{e}"));
        // FixedPlan has no state learned without gradient.
        assert_eq!(dev.update_state(&input, &out.routing, 0.1), Ok(false));
    }
}
