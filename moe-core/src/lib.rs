//! # moe-core
//!
//! The contracts of moe-rs, the only crate a router plugin depends on:
//!
//! - [`Router`]: hidden states `[T, d]` (plus optional token ids, sequence lengths, padding, train/eval) in, a
//!   [`Routing`] out. Object-safe, `Send + Sync`, cloneable as `Box<dyn Router>`.
//! - [`Routing`]: the expert-major dispatch plan (kept assignments with weights, CSR over experts, dropped
//!   assignments, aux losses with their normalisation named, optional logits) and its [`Diagnostics`].
//! - [`RouterSpec`]: the optional device-executable description of a built-in router.
//! - [`Expert`] and [`ExpertBank`]: custom experts and the standard families (SwiGLU, GPT-OSS, MLP, PEER).
//! - [`quant`]: expert weights kept packed in bf16, f16, int8, FP8 blocks or MXFP4 ([`WeightFormat`],
//!   [`PackedMatrix`], [`PackedBank`]), the scalar codecs and the reference decode every kernel equals.
//! - [`Backend`] / [`DeviceLayer`]: upload a [`MoeLayer`] once, run forwards on it; train on it
//!   ([`DeviceLayer::forward_train`], [`DeviceLayer::backward`] returning [`LayerGrads`],
//!   [`DeviceLayer::apply_update`]).
//! - [`grad`]: gradients named as the parameter views ([`Grad`], dense or sparse rows), the router backward's
//!   input and output ([`RouterBackward`], [`RouterGrads`]; [`Router::backward`]) and the optimizer-facing
//!   [`grad::apply_update`].
//! - [`RouterRegistry`]: routers by name from serde options; [`router_options!`] declares a router's options once
//!   (serde config, defaults, the docs `moe list` prints) and [`RouterConfig::is_causal`] its causality.
//! - [`kit`]: the router kit, what a plugin needs to be as good as a built-in (seeded gate init, the linear gate,
//!   top-k with the documented tie order, softmax / sigmoid / sqrt-softplus, input checks,
//!   [`KEEP_LOGITS_MAX_EXPERTS`]) and the backward of each piece (so a router trains); every built-in router uses it.
//! - [`MoeError`]: one error type whose messages name the tensor and the expected and found shapes.
//!
//! Shapes use one alphabet: `T` tokens, `d` hidden, `E` experts, `k` per token, `f` expert FFN width. Formulas
//! cite the papers and `docs/ROUTERS.md` of the repository ("ROUTERS.md §n" is a section of that file).
//!
//! A plugin depends on this crate alone, under the name `moe-core`: it re-exports [`ndarray`], [`serde`] and
//! [`serde_json`] at the versions its signatures use. The repository's `examples/custom-router` is such a plugin,
//! and its README section shows the `Cargo.toml` of one outside the repository.
//!
//! ## A plugin router in a few lines
//!
//! ```
//! use moe_core::{Assignment, MoeError, Router, RouterInput, Routing};
//!
//! /// Sends real token `t` to expert `t mod E` with weight 1; padding tokens get no expert.
//! #[derive(Clone, Debug)]
//! struct RoundRobin { n_experts: usize }
//!
//! impl Router for RoundRobin {
//!     fn name(&self) -> &str { "round-robin" }
//!     fn n_experts(&self) -> usize { self.n_experts }
//!     fn d_model(&self) -> Option<usize> { None }
//!     fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
//!         input.validate(None)?;
//!         let t = input.n_tokens();
//!         let real: Vec<usize> = (0..t).filter(|&i| !input.is_padding(i)).collect();
//!         let kept = real
//!             .iter()
//!             .map(|&i| Assignment { token: i as u32, expert: (i % self.n_experts) as u32, weight: 1.0, rank: 0 })
//!             .collect();
//!         Routing::new(t, self.n_experts, real.len(), kept, Vec::new())
//!     }
//! }
//!
//! let x = moe_core::ndarray::Array2::<f32>::zeros((6, 4));
//! let plan = RoundRobin { n_experts: 3 }.route(&RouterInput::new(x.view()))?;
//! assert_eq!(plan.expert_counts(), vec![2, 2, 2]);
//! assert_eq!(plan.diagnostics().cv, 0.0);
//! let padded = RoundRobin { n_experts: 3 }
//!     .route(&RouterInput::new(x.view()).with_padding(&[false, true, false, false, false, true]))?;
//! assert_eq!((padded.n_slots(), padded.n_real_tokens()), (4, 4));
//! # Ok::<(), MoeError>(())
//! ```
//!
//! ## Features
//! - `testing`: the conformance suite for routers, [`testing::check_router`] (weights, determinism, empty input,
//!   NaN, width, padding, causality) and [`testing::check_registered`] (a registry entry over every combination of
//!   its enum and boolean options); plugin authors enable it in their dev-dependencies. Its docs are built
//!   whatever the features.

// What a plugin's signatures need, at the versions moe-core uses: a plugin depends on moe-core alone.
pub use ndarray;
pub use serde;
pub use serde_json;

// The serde attributes that `router_options!` generates name this crate `moe_core`, in plugins and here alike.
extern crate self as moe_core;

pub mod backend;
pub mod error;
pub mod expert;
pub mod grad;
pub mod kit;
pub mod layer;
pub mod loss;
pub mod math;
pub mod params;
pub mod quant;
pub mod registry;
pub mod remote;
pub mod rng;
pub mod router;
pub mod routing;
pub mod stats;
pub mod store;
// Documented in every doc build (`cfg(doc)`), so a plugin's `cargo doc` shows it; compiled for code with the feature.
#[cfg(any(test, doc, feature = "testing"))]
pub mod testing;
pub mod workload;

pub use backend::{Backend, Capabilities, DeviceLayer, LayerOutput, RouterPath};
pub use error::{MoeError, check_finite};
pub use expert::{
    Activation, Expert, ExpertBank, GptOssBank, MlpBank, PeerBank, SharedExperts, SwiGluBank,
};
pub use grad::{Grad, GradValue, LayerGrads, RouterBackward, RouterGrads};
pub use kit::KEEP_LOGITS_MAX_EXPERTS;
pub use layer::MoeLayer;
pub use loss::{AuxLoss, AuxLossKind, LbNorm};
pub use params::{Param, ParamMut};
pub use quant::{PackedBank, PackedFamily, PackedMatrix, WeightFormat};
pub use registry::{
    CausalFn, Causality, OptionDoc, RouterArgs, RouterConfig, RouterEntry, RouterFactory,
    RouterOptions, RouterRegistry,
};
pub use remote::{ExpertGroups, RemoteExperts, ResidentExperts};
pub use router::{
    DropPolicy, GroupLimit, Mode, Router, RouterInput, RouterSpec, ScoreFn, SwitchSpec, TopKOrder,
    TopKSpec,
};
pub use routing::{Assignment, ExpertGroup, Routing};
pub use stats::Diagnostics;
pub use workload::{Workload, WorkloadConfig};
