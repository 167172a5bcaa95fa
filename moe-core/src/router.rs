//! The router contract: what a router gets ([`RouterInput`]), what it returns ([`Routing`]), and the optional
//! device-executable description of a built-in router ([`RouterSpec`]).

use ndarray::{Array1, Array2, ArrayView2};

use crate::error::{MoeError, check_finite};
use crate::grad::{RouterBackward, RouterGrads};
use crate::params::{Param, ParamMut};
use crate::routing::Routing;

/// Whether the layer runs for training (noise, jitter, seeded) or inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Inference: no noise, no jitter, fully deterministic.
    #[default]
    Eval,
    /// Training: noise and jitter drawn from a counter-based generator keyed by `seed`, so the same seed gives the
    /// same routing on any thread count.
    Train {
        /// The seed of this step's noise.
        seed: u64,
    },
}

/// Everything a router sees, on the host. Build it with [`RouterInput::new`] and the `with_*` methods.
///
/// - `hidden`: `[T, d]` hidden states.
/// - `token_ids`: `[T]` vocabulary ids (hash routing needs them).
/// - `seq_lens`: lengths of the consecutive sequences that make up the `T` rows (sum = `T`); absent means one
///   sequence. Per-sequence capacity (Switch) uses them.
/// - `padding`: `[T]`, `true` marks a padding token. Padding tokens get no assignment (their MoE output is 0) and
///   are left out of losses and diagnostics.
#[derive(Debug, Clone)]
pub struct RouterInput<'a> {
    /// Hidden states `[T, d]`.
    pub hidden: ArrayView2<'a, f32>,
    /// Token ids `[T]`, if known.
    pub token_ids: Option<&'a [u32]>,
    /// Sequence lengths summing to `T`, if the batch holds several sequences.
    pub seq_lens: Option<&'a [usize]>,
    /// Padding mask `[T]` (`true` = padding), if any.
    pub padding: Option<&'a [bool]>,
    /// Train or eval.
    pub mode: Mode,
}

impl<'a> RouterInput<'a> {
    /// An eval-mode input of hidden states `[T, d]` alone.
    pub fn new(hidden: ArrayView2<'a, f32>) -> Self {
        RouterInput {
            hidden,
            token_ids: None,
            seq_lens: None,
            padding: None,
            mode: Mode::Eval,
        }
    }

    /// Adds token ids `[T]`.
    pub fn with_token_ids(mut self, ids: &'a [u32]) -> Self {
        self.token_ids = Some(ids);
        self
    }

    /// Adds sequence lengths (sum = `T`).
    pub fn with_seq_lens(mut self, lens: &'a [usize]) -> Self {
        self.seq_lens = Some(lens);
        self
    }

    /// Adds a padding mask `[T]` (`true` = padding).
    pub fn with_padding(mut self, padding: &'a [bool]) -> Self {
        self.padding = Some(padding);
        self
    }

    /// Sets the mode.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Number of tokens `T`.
    pub fn n_tokens(&self) -> usize {
        self.hidden.nrows()
    }

    /// Hidden width `d`.
    pub fn d_model(&self) -> usize {
        self.hidden.ncols()
    }

    /// Whether token `t` is padding.
    pub fn is_padding(&self, t: usize) -> bool {
        self.padding
            .is_some_and(|p| p.get(t).copied().unwrap_or(false))
    }

    /// Sequence lengths, or one sequence of `T` tokens.
    pub fn sequences(&self) -> Vec<usize> {
        match self.seq_lens {
            Some(l) => l.to_vec(),
            None => vec![self.n_tokens()],
        }
    }

    /// Checks the input against a router that expects width `d_model` (`None`: any width): the lengths of the
    /// optional arrays, the sequence lengths, and that every hidden value is finite.
    ///
    /// # Errors
    /// [`MoeError::Shape`] for a wrong width or length, [`MoeError::NonFinite`] naming the first bad token.
    pub fn validate(&self, d_model: Option<usize>) -> Result<(), MoeError> {
        let (t, d) = self.hidden.dim();
        if let Some(want) = d_model
            && d != want
        {
            return Err(MoeError::shape("hidden", format!("[T, {want}]"), &[t, d]));
        }
        if let Some(ids) = self.token_ids
            && ids.len() != t
        {
            return Err(MoeError::shape("token_ids", format!("[{t}]"), &[ids.len()]));
        }
        if let Some(p) = self.padding
            && p.len() != t
        {
            return Err(MoeError::shape("padding", format!("[{t}]"), &[p.len()]));
        }
        if let Some(l) = self.seq_lens {
            let sum: usize = l.iter().sum();
            if sum != t || l.contains(&0) {
                return Err(MoeError::config(
                    "seq_lens",
                    format!("{l:?}"),
                    format!("sequence lengths must be positive and sum to T = {t}"),
                ));
            }
        }
        check_finite("hidden", self.hidden)
    }
}

/// A router: turns hidden states into a dispatch plan. Object-safe, `Send + Sync`, cloneable as
/// `Box<dyn Router>`; it owns its parameters (gate matrix, noise matrix, keys, tables).
///
/// Writing a plugin router needs nothing but this trait; register it in a
/// [`RouterRegistry`](crate::registry::RouterRegistry) to use it from the CLI.
pub trait Router: dyn_clone::DynClone + Send + Sync + std::fmt::Debug {
    /// Registry name, kebab-case: `softmax-topk`.
    fn name(&self) -> &str;

    /// Number of experts `E` this router routes to.
    fn n_experts(&self) -> usize;

    /// The hidden width `d` it expects, or `None` if it takes any width (hash routing).
    fn d_model(&self) -> Option<usize>;

    /// Whether the routing of a token depends only on that token and earlier ones. Expert choice looks at the
    /// whole batch, so it is not causal and leaks future tokens in autoregressive decoding.
    fn is_causal(&self) -> bool {
        true
    }

    /// Plans the dispatch for `input.hidden` (`[T, d]`).
    ///
    /// # Errors
    /// A typed [`MoeError`] for bad input (wrong width, NaN/Inf naming the token, missing token ids); never panics
    /// on user data.
    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError>;

    /// A description a backend can execute natively on its device; `None` (the default) means backends call
    /// [`Router::route`] on the host.
    fn spec(&self) -> Option<RouterSpec> {
        None
    }

    /// Named views of the router's parameters (`gate` `[E, d]`, biases, noise matrices, keys); the default is
    /// none. A router that lists its parameters can be trained and checkpointed through
    /// [`MoeLayer::params`](crate::layer::MoeLayer::params).
    fn params(&self) -> Vec<Param<'_>> {
        Vec::new()
    }

    /// Mutable views of the same parameters, in the same order as [`Router::params`].
    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        Vec::new()
    }

    /// The backward of [`Router::route`]: given the forward's input and plan, `dL/dw` for every kept assignment and
    /// `dL/d(aux)` for every auxiliary loss of the plan ([`RouterBackward`]), returns `dL/d(hidden)` `[T, d]` and
    /// the gradients of the router's trainable parameters, named as in [`Router::params`].
    ///
    /// The gradient reaches the router only through the kept weights and the auxiliary losses; which experts were
    /// chosen, capacity and drops get none. A router may recompute what its forward computed (logits, scores,
    /// seeded noise: the input carries the mode and seed), so it keeps no state between the two calls.
    /// [`kit`](crate::kit) has the backward of the common pieces (linear gate, score functions, top-k weights,
    /// renormalisation, scaling, the losses), and [`testing::check_router_grad`](crate::testing::check_router_grad)
    /// checks a backward against finite differences.
    ///
    /// The default returns [`MoeError::Unsupported`] naming the router, so a router without a backward still runs
    /// forward.
    ///
    /// # Errors
    /// [`MoeError::Unsupported`] (the default); [`RouterBackward::validate`]'s errors for inconsistent lengths or
    /// non-finite gradients.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        let _ = grad;
        Err(MoeError::Unsupported {
            owner: format!("router {}", self.name()),
            feature: "backward".into(),
        })
    }

    /// The once-per-step update of state learned without gradients, after the step's forward: the aux-loss-free
    /// correction bias of DeepSeek-V3 and Megatron (`b_e += bias_rate · sign(mean_load − load_e)` from the loads of
    /// `routing`; Wang et al. 2024, docs/ROUTERS.md) and running statistics (PEER's query BatchNorm running mean and
    /// variance, from the batch of `input` with PyTorch's momentum). An explicit call, once per training step, with
    /// the input and plan of that step's forward; such state is frozen for the optimizer and gets no gradient.
    /// Returns whether the router has such state; the default has none and returns `Ok(false)`.
    ///
    /// # Errors
    /// [`MoeError::Mismatch`] for a plan of another `E` or `T`; [`MoeError::InvalidConfig`] for a non-finite rate.
    fn update_state(
        &mut self,
        input: &RouterInput<'_>,
        routing: &Routing,
        bias_rate: f32,
    ) -> Result<bool, MoeError> {
        let _ = (input, routing, bias_rate);
        Ok(false)
    }
}

dyn_clone::clone_trait_object!(Router);

/// How token-choice routers turn logits into scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFn {
    /// `softmax(l)` over all experts (Mixtral, Qwen, OLMoE).
    #[default]
    Softmax,
    /// `sigmoid(l)` per expert (DeepSeek-V3).
    Sigmoid,
    /// `sqrt(softplus(l))` per expert (a Megatron option).
    SqrtSoftplus,
}

/// Whether scores are taken over all experts before top-k, or top-k is taken on logits and softmax over the k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopKOrder {
    /// Score all experts, then top-k of the scores (Mixtral, Qwen, OLMoE, DeepSeek-V3).
    #[default]
    ScoreThenTopK,
    /// Top-k of the raw logits, then softmax over those k (Granite, JetMoE, GPT-OSS, Megatron's default).
    TopKThenSoftmax,
}

/// Group-limited selection (DeepSeek-V3): `E` experts in `n_group` contiguous groups; a group's score is the sum
/// of its top-2 selection scores; only the best `topk_group` groups are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupLimit {
    /// Number of contiguous groups; must divide `E`.
    pub n_group: usize,
    /// Number of groups kept per token.
    pub topk_group: usize,
}

/// A token-choice top-k router, described as data so a device can run it: logits `x · gateᵀ (+ gate_bias)`,
/// score function, order, groups, selection-only correction bias, renormalisation and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKSpec {
    /// Gate matrix `[E, d]` (`nn.Linear` layout).
    pub gate: Array2<f32>,
    /// Optional gate bias `[E]` added to the logits (GPT-OSS).
    pub gate_bias: Option<Array1<f32>>,
    /// Experts per token.
    pub k: usize,
    /// Score function.
    pub score: ScoreFn,
    /// Score-then-top-k or top-k-then-softmax.
    pub order: TopKOrder,
    /// Renormalise the k weights to sum 1.
    pub renormalize: bool,
    /// Multiply the final weights by this (DeepSeek-V3 `routed_scaling_factor`; 1 otherwise).
    pub scaling: f32,
    /// Group-limited selection, if any.
    pub groups: Option<GroupLimit>,
    /// Selection-only bias `[E]` added to the scores before selection (DeepSeek-V3 `e_score_correction_bias`).
    pub correction_bias: Option<Array1<f32>>,
}

/// Drop order when an expert overflows its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// First come, first served in token order (HF Switch, fairseq).
    #[default]
    Position,
    /// Keep the most confident tokens (Megatron `probs`).
    Probability,
    /// Keep a seeded random subset (DeepSpeed random token selection).
    Random,
    /// Sort by max probability, then by position (batch-prioritised routing).
    BatchPrioritized,
}

/// A Switch-style top-1 router with capacity, described as data for device execution.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchSpec {
    /// Gate matrix `[E, d]`.
    pub gate: Array2<f32>,
    /// Capacity per expert for one routing group (sequence or batch), already resolved.
    pub capacity: usize,
    /// Capacity counted per sequence (`true`) or over the whole batch.
    pub per_sequence: bool,
    /// Drop order.
    pub drop: DropPolicy,
}

/// The device-executable description of a built-in router. Backends run the variants they support natively and
/// fall back to [`Router::route`] on the host for the rest.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RouterSpec {
    /// Token-choice top-k (softmax / sigmoid, groups, correction bias, renormalisation, scaling).
    TopK(TopKSpec),
    /// Switch top-1 with capacity.
    Switch(SwitchSpec),
}
