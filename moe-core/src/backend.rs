//! The backend contract: a backend uploads a layer's weights once ([`Backend::upload`]) and runs forwards on the
//! resident copy ([`DeviceLayer::forward`]). Core knows no backend; `moe-backends` implements this.

use std::sync::Arc;

use ndarray::Array2;

use crate::error::MoeError;
use crate::layer::MoeLayer;
use crate::router::{Router, RouterInput};
use crate::routing::Routing;

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
}

/// A layer resident on a backend.
pub trait DeviceLayer: Send {
    /// The layer this was uploaded from.
    fn layer(&self) -> &MoeLayer;

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
