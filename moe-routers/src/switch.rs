//! Switch top-1 (Fedus et al. 2021, arXiv 2101.03961; docs/ROUTERS.md §3) with the ST-MoE extras: capacity with a named rounding, four
//! drop policies, multiplicative input jitter in training, the HF Switch load-balancing loss and the router z-loss.
//!
//! # Routing
//! `l = x · W_gᵀ + b` (`[T, E]`, f32; the gate bias `b` is optional, see [`SwitchTop1::with_gate_bias`], as HF
//! `router_bias = true`), `p = softmax(l)`; each real (non-padding) token goes to `argmax p` (ties to the
//! larger logit, then the lower expert id) with weight `p_max`, not renormalised. Each expert then keeps at most `C` tokens of every
//! capacity group (one group per sequence with `per_sequence = true`, as HF Switch; otherwise the whole batch). A
//! dropped token keeps no expert: it is listed in [`Routing::dropped`] with the weight it would have had, and its
//! MoE output is 0 (the residual carries it; transformers v4 returned `p · x` instead).
//!
//! # Capacity (`T` = real tokens of the group, `cf` = `capacity_factor`)
//! | `capacity` | `C` | source |
//! | --- | --- | --- |
//! | `megatron` | `ceil(T / E · cf)` | Megatron-LM `get_capacity` (k = 1) |
//! | `deepspeed` | `max(ceil(T / E · cf), min_capacity)` | DeepSpeed `_capacity` |
//! | `fairseq` | `floor(cf · ceil(T / E))` | fairseq `top1gating` (`int(...)`; 0 is possible for `cf < 1`) |
//! | `fixed` | `expert_capacity` | HF Switch |
//!
//! Each product is evaluated in the reference's order and precision, so `C` matches it exactly even where the
//! product lands next to an integer: Megatron and fairseq use Python doubles (`ceil(50 / 4 · 1.2) = 15`), current
//! DeepSpeed multiplies by a float32 tensor (`torch.tensor(capacity_factor)`), so its product is rounded to f32
//! (`12.5 · 1.2 = 15.000001`, `C = 16`); DeepSpeed releases that used `math.ceil` agree with Megatron instead.
//! `T` counts real tokens only, whereas fairseq and DeepSpeed count padding tokens too.
//!
//! # Drop policies ([`DropPolicy`])
//! Within a group, tokens are visited in an order and each keeps its expert while that expert has fewer than `C`
//! kept tokens:
//! - `position`: token order (HF Switch, fairseq: first come, first served);
//! - `probability`: descending `p_max`, ties to the earlier token (Megatron `probs`: an expert keeps its `C` most
//!   confident tokens);
//! - `batch_prioritized`: descending max probability, then position. With one choice per token this visits tokens
//!   in the same order as `probability`, so the two policies give the same plan here (they differ for top-2);
//! - `random`: descending `CounterRng::new(seed, DROP_STREAM).u64_at(t)` for global token index `t`, ties to the
//!   earlier token (DeepSpeed random token selection). `seed` is the step seed in `Mode::Train { seed }` and
//!   [`EVAL_DROP_SEED`] in eval, so eval routing stays deterministic.
//!
//! # Jitter
//! In `Mode::Train { seed }` only, with `ε = jitter > 0`: `x'[t, j] = x[t, j] · (1 − ε + 2ε · u)`, with
//! `u = CounterRng::new(seed, JITTER_STREAM).uniform_at(t · d + j)`, so the noise is the same on any thread count.
//! Only the routing sees `x'`: the experts get the original `x`. The attached logits, the weights and both losses
//! come from the jittered logits (as in HF, where the router returns the logits it computed).
//!
//! # Losses (padding tokens excluded)
//! - `LoadBalance(HfSwitch)`: `E² · mean_e(f_e · P_e)` per sequence, averaged over the sequences with at least one
//!   real token ([`loss::load_balance_grouped`]). `f` counts the argmax choices **before** capacity, as
//!   transformers v5 does. Coefficient `aux_coefficient`, default 1e-2 (the paper; HF uses 1e-3).
//! - `RouterZ`: `mean_t (logsumexp_e l_e(t))²` ([`loss::z_loss`]), coefficient `z_coefficient`, default 1e-3.
//!
//! # Reproducing HF `SwitchTransformersSparseMLP`
//! Options `capacity=fixed expert_capacity=<n> per_sequence=true drop=position aux_coefficient=0.001` with the
//! sequences passed as `seq_lens` (all `S` for a `[B, S, d]` batch), or [`SwitchTop1Config::hf_switch`]. HF
//! ignores the attention mask here, so its padding tokens are routed and take capacity: pass no padding mask to
//! reproduce that. A checkpoint with `router.classifier.bias` adds it with [`SwitchTop1::with_gate_bias`].
//!
//! # Device spec
//! [`Router::spec`] is `Some` only when a [`SwitchSpec`] describes the routing completely: `capacity = fixed` (the
//! spec holds one resolved capacity, so a `T`-dependent rounding cannot be expressed), `jitter = 0` (the spec has
//! no jitter, and a backend running it in training would silently skip it) and a drop policy other than `random`
//! (the spec carries no seed), and no gate bias (the spec has no bias field). Every other configuration takes the
//! host path.
//!
//! Ranking: the argmax is by probability, then the raw logit, then the lower id ([`kit::rank_cmp`]). Memory:
//! routing holds one `[T, E]` buffer, the logits (probabilities per token in a scratch row; the losses work on the
//! logits in place), plus one `[T_real, E]` copy when the plan keeps the logits (`E <= KEEP_LOGITS_MAX_EXPERTS`).
//! The `probability` drop orders compare probabilities across tokens, then `Σ_{j ≠ e} e^{l_j − l_max}` (smaller
//! first: the larger exact probability), then the lower token.

use std::cmp::Reverse;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use moe_core::kit::{self, GATE_STREAM};
use moe_core::rng::CounterRng;
use moe_core::{
    Assignment, AuxLoss, AuxLossKind, DropPolicy, Grad, KEEP_LOGITS_MAX_EXPERTS, LbNorm, Mode,
    MoeError, Param, ParamMut, Router, RouterArgs, RouterBackward, RouterConfig, RouterEntry,
    RouterGrads, RouterInput, RouterRegistry, RouterSpec, Routing, SwitchSpec, loss,
};

/// Random stream of the training jitter multipliers.
pub const JITTER_STREAM: u64 = 0x5357_4A49_5454_4552;

/// Random stream of the `random` drop policy's token priorities.
pub const DROP_STREAM: u64 = 0x5357_4452_4F50_0000;

/// Seed of the `random` drop policy in `Mode::Eval`, which carries no seed.
pub const EVAL_DROP_SEED: u64 = 0;

const DEFAULT_CAPACITY_FACTOR: f64 = 1.25;
const DEFAULT_MIN_CAPACITY: usize = 4;
const DEFAULT_JITTER: f32 = 1e-2;
const DEFAULT_AUX_COEFFICIENT: f32 = 1e-2;
const DEFAULT_Z_COEFFICIENT: f32 = 1e-3;

/// How a system turns `T / E · capacity_factor` into an integer capacity `C` per expert and group. A plain name, so
/// that it is one CLI option (`capacity=deepspeed`); its parameters are the separate options `capacity_factor`,
/// `min_capacity` and `expert_capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityRounding {
    /// Megatron-LM: `C = ceil(T / E · cf)`.
    #[default]
    Megatron,
    /// DeepSpeed: `C = max(ceil(T / E · cf), min_capacity)`, the product in f32 as DeepSpeed computes it.
    #[serde(rename = "deepspeed", alias = "deep_speed")]
    DeepSpeed,
    /// fairseq: `C = floor(cf · ceil(T / E))`.
    Fairseq,
    /// HF Switch: `C = expert_capacity`, whatever `T`.
    Fixed,
}

moe_core::router_options! {
    /// Options of [`SwitchTop1`]; every field is optional and unset fields take the defaults stated.
    pub struct SwitchTop1Config {
        /// Capacity rounding: megatron ceil(T/E·cf), deepspeed max(ceil(T/E·cf), min_capacity), fairseq
        /// floor(cf·ceil(T/E)), fixed expert_capacity (T = real tokens of the group).
        capacity: CapacityRounding = CapacityRounding::Megatron,
        /// cf of the T-dependent roundings, finite and > 0; not allowed with capacity = fixed.
        capacity_factor: f64 = DEFAULT_CAPACITY_FACTOR,
        /// Lower bound of capacity = deepspeed; only allowed with it.
        min_capacity: usize = DEFAULT_MIN_CAPACITY,
        /// Tokens per expert and group for capacity = fixed (HF expert_capacity, >= 1); required with it, not
        /// allowed otherwise.
        expert_capacity: usize,
        /// Count capacity per sequence of seq_lens (HF Switch) instead of over the whole batch.
        per_sequence: bool = false,
        /// Drop order when an expert overflows: position is first come, first served (causal); the others sort
        /// the group first (not causal).
        drop: DropPolicy = DropPolicy::Position,
        /// Training-only jitter ε in [0, 1) of the routing input, x ⊙ U(1 − ε, 1 + ε); 0 disables.
        jitter: f32 = DEFAULT_JITTER,
        /// Coefficient reported with the HF-Switch load-balancing loss (the paper's 1e-2; HF uses 1e-3).
        aux_coefficient: f32 = DEFAULT_AUX_COEFFICIENT,
        /// Coefficient reported with the router z-loss.
        z_coefficient: f32 = DEFAULT_Z_COEFFICIENT,
    }
}

impl RouterConfig for SwitchTop1Config {
    /// Causal exactly with `drop = position`: tokens claim capacity in token order, so a later token never takes
    /// an earlier token's place (the capacity itself may depend on the token count `T`, not on later tokens'
    /// values). `probability`, `batch_prioritized` and `random` sort the group first, so a later token can
    /// displace an earlier one.
    fn is_causal(&self) -> bool {
        self.drop() == DropPolicy::Position
    }
}

/// Switch top-1 router with capacity (see the module docs for the formulas).
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchTop1 {
    gate: Array2<f32>,
    gate_bias: Option<Array1<f32>>,
    rounding: CapacityRounding,
    capacity_factor: f64,
    min_capacity: usize,
    expert_capacity: usize,
    per_sequence: bool,
    drop: DropPolicy,
    jitter: f32,
    aux_coefficient: f32,
    z_coefficient: f32,
}

/// The routing choice of one real token: its index, expert and `p_max`, and `rest = Σ_{j ≠ expert} e^{l_j − l_max}`
/// (so `p_max = 1 / (1 + rest)` exactly): the tie-break key of probabilities compared across tokens, which keeps
/// saturated rows apart (`p_max` is 1.0 in f32 for both when every other logit is ~17 below).
#[derive(Debug, Clone, Copy)]
struct Choice {
    token: usize,
    expert: usize,
    weight: f32,
    rest: f32,
}

impl SwitchTop1Config {
    /// HF `SwitchTransformersSparseMLP` semantics: `fixed` capacity `expert_capacity` per sequence, position drops,
    /// jitter 1e-2 (training only), load-balancing coefficient 1e-3 (`router_aux_loss_coef`), z-loss 1e-3.
    pub fn hf_switch(expert_capacity: usize) -> Self {
        SwitchTop1Config {
            capacity: Some(CapacityRounding::Fixed),
            expert_capacity: Some(expert_capacity),
            per_sequence: Some(true),
            drop: Some(DropPolicy::Position),
            jitter: Some(1e-2),
            aux_coefficient: Some(1e-3),
            z_coefficient: Some(1e-3),
            ..Default::default()
        }
    }

    /// Resolves the defaults and builds the router around `gate` (`[E, d]`, `nn.Linear` layout).
    ///
    /// # Errors
    /// [`MoeError::Shape`] / [`MoeError::NonFinite`] for an empty or non-finite gate; [`MoeError::TooLarge`] past
    /// [`kit::MAX_DENSE_EXPERTS`] experts; [`MoeError::InvalidConfig`] for `capacity_factor` not finite and > 0,
    /// `fixed` without `expert_capacity` or with 0, an option that the chosen rounding does not use, `jitter`
    /// outside `[0, 1)`, or a coefficient that is not finite and >= 0.
    pub fn build(&self, gate: Array2<f32>) -> Result<SwitchTop1, MoeError> {
        kit::check_gate("router.classifier.weight", &gate)?;
        kit::check_dense_experts(gate.nrows())?;
        let rounding = self.capacity();
        let fixed = rounding == CapacityRounding::Fixed;
        if let (true, Some(cf)) = (fixed, self.capacity_factor) {
            return Err(MoeError::config(
                "capacity_factor",
                cf,
                "not used with capacity = fixed",
            ));
        }
        if let (false, Some(c)) = (fixed, self.expert_capacity) {
            return Err(MoeError::config(
                "expert_capacity",
                c,
                "only used with capacity = fixed",
            ));
        }
        if let (false, Some(m)) = (rounding == CapacityRounding::DeepSpeed, self.min_capacity) {
            return Err(MoeError::config(
                "min_capacity",
                m,
                "only used with capacity = deepspeed",
            ));
        }
        let capacity_factor = self.capacity_factor();
        if !capacity_factor.is_finite() || capacity_factor <= 0.0 {
            return Err(MoeError::config(
                "capacity_factor",
                capacity_factor,
                "must be finite and > 0",
            ));
        }
        let expert_capacity = match (fixed, self.expert_capacity) {
            (true, None) => {
                return Err(MoeError::config(
                    "expert_capacity",
                    "none",
                    "capacity = fixed needs expert_capacity",
                ));
            }
            (true, Some(0)) => return Err(MoeError::config("expert_capacity", 0, "must be >= 1")),
            (_, c) => c.unwrap_or(0),
        };
        let jitter = self.jitter();
        if !jitter.is_finite() || !(0.0..1.0).contains(&jitter) {
            return Err(MoeError::config("jitter", jitter, "must be in [0, 1)"));
        }
        let (aux_coefficient, z_coefficient) = (self.aux_coefficient(), self.z_coefficient());
        for (name, c) in [
            ("aux_coefficient", aux_coefficient),
            ("z_coefficient", z_coefficient),
        ] {
            if !c.is_finite() || c < 0.0 {
                return Err(MoeError::config(name, c, "must be finite and >= 0"));
            }
        }
        Ok(SwitchTop1 {
            gate,
            gate_bias: None,
            rounding,
            capacity_factor,
            min_capacity: self.min_capacity(),
            expert_capacity,
            per_sequence: self.per_sequence(),
            drop: self.drop(),
            jitter,
            aux_coefficient,
            z_coefficient,
        })
    }
}

impl SwitchTop1 {
    /// The gate matrix `W_g`, `[E, d]`.
    pub fn gate(&self) -> ArrayView2<'_, f32> {
        self.gate.view()
    }

    /// The gate bias `b` (`[E]`) added to the logits, if any.
    pub fn gate_bias(&self) -> Option<&Array1<f32>> {
        self.gate_bias.as_ref()
    }

    /// Sets the gate bias `b` (`[E]`) added to the logits, `l = x · W_gᵀ + b` (HF Switch `router_bias = true`,
    /// `router.classifier.bias`). A router with a bias has no [`Router::spec`]: [`SwitchSpec`] cannot carry it.
    ///
    /// # Errors
    /// [`MoeError::Shape`] when `bias` does not have `E` entries; [`MoeError::InvalidConfig`] for a non-finite
    /// entry.
    pub fn with_gate_bias(mut self, bias: Array1<f32>) -> Result<Self, MoeError> {
        let e = self.gate.nrows();
        if bias.len() != e {
            return Err(MoeError::shape(
                "router.classifier.bias",
                format!("[{e}]"),
                &[bias.len()],
            ));
        }
        if let Some((i, v)) = bias.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(MoeError::config(
                "router.classifier.bias",
                v,
                format!("non-finite at expert {i}"),
            ));
        }
        self.gate_bias = Some(bias);
        Ok(self)
    }

    /// The capacity rounding.
    pub fn rounding(&self) -> CapacityRounding {
        self.rounding
    }

    /// The drop policy.
    pub fn drop_policy(&self) -> DropPolicy {
        self.drop
    }

    /// Whether capacity is counted per sequence.
    pub fn per_sequence(&self) -> bool {
        self.per_sequence
    }

    /// The training jitter `ε`.
    pub fn jitter(&self) -> f32 {
        self.jitter
    }

    /// Capacity `C` per expert of a group holding `n_tokens` real tokens, by the configured rounding (module docs).
    pub fn capacity_for(&self, n_tokens: usize) -> usize {
        let e = self.gate.nrows().max(1);
        let cf = self.capacity_factor;
        // Same operations as the references: (T / E) * cf, then ceil or truncation.
        let t_over_e = n_tokens as f64 / e as f64;
        match self.rounding {
            // Python doubles.
            CapacityRounding::Megatron => (t_over_e * cf).ceil() as usize,
            // A Python double times a float32 0-dim tensor: both rounded to f32, product in f32.
            CapacityRounding::DeepSpeed => {
                ((t_over_e as f32 * cf as f32).ceil() as usize).max(self.min_capacity)
            }
            CapacityRounding::Fairseq => (cf * n_tokens.div_ceil(e) as f64) as usize,
            CapacityRounding::Fixed => self.expert_capacity,
        }
    }

    /// The routing input in training: `x ⊙ U(1 − ε, 1 + ε)` with counter-based noise (module docs).
    fn jittered(&self, x: ArrayView2<'_, f32>, seed: u64) -> Array2<f32> {
        let mut out = self.jitter_factors(x.nrows(), x.ncols(), seed);
        out.zip_mut_with(&x, |m, &v| *m *= v);
        out
    }

    /// The jitter multipliers `(1 − ε + 2ε · u)` (`[T, d]`, f32) of step `seed`, `u = CounterRng::new(seed,
    /// JITTER_STREAM).uniform_at(t · d + j)`: what the forward multiplies the routing input by, and the factor the
    /// backward carries to `dL/dx`.
    fn jitter_factors(&self, t: usize, d: usize, seed: u64) -> Array2<f32> {
        let rng = CounterRng::new(seed, JITTER_STREAM);
        let eps = f64::from(self.jitter);
        Array2::from_shape_fn((t, d), |(i, j)| {
            let u = rng.uniform_at(i as u64 * d as u64 + j as u64);
            (1.0 - eps + 2.0 * eps * u) as f32
        })
    }

    /// Capacity: each group's choices claim slots in the policy's order; an expert keeps at most `C` per group.
    /// Returns the kept and the dropped assignments (dropped sorted by token).
    fn apply_capacity(
        &self,
        choices: &[Option<Choice>],
        groups: &[(usize, usize)],
        drop_seed: u64,
    ) -> (Vec<Assignment>, Vec<Assignment>) {
        let mut used = vec![0usize; self.n_experts()];
        let mut kept = Vec::with_capacity(choices.len());
        let mut dropped = Vec::new();
        for &(start, end) in groups {
            let mut group: Vec<Choice> = choices
                .get(start..end)
                .unwrap_or(&[])
                .iter()
                .flatten()
                .copied()
                .collect();
            let cap = self.capacity_for(group.len());
            self.order(&mut group, drop_seed);
            for c in &group {
                match used.get_mut(c.expert) {
                    Some(n) if *n < cap => {
                        *n += 1;
                        kept.push(assignment(c));
                    }
                    _ => dropped.push(assignment(c)),
                }
            }
            for c in &group {
                if let Some(n) = used.get_mut(c.expert) {
                    *n = 0;
                }
            }
        }
        dropped.sort_unstable_by_key(|a| a.token);
        (kept, dropped)
    }

    /// The order in which a group's choices claim capacity.
    fn order(&self, choices: &mut [Choice], seed: u64) {
        match self.drop {
            DropPolicy::Position => {}
            DropPolicy::Probability | DropPolicy::BatchPrioritized => {
                // Exact-arithmetic order: p_max, then the smaller rest (the larger exact p_max), then the token.
                choices.sort_by(|a, b| {
                    b.weight
                        .total_cmp(&a.weight)
                        .then(a.rest.total_cmp(&b.rest))
                        .then(a.token.cmp(&b.token))
                });
            }
            DropPolicy::Random => {
                let rng = CounterRng::new(seed, DROP_STREAM);
                choices.sort_by_cached_key(|c| (Reverse(rng.u64_at(c.token as u64)), c.token));
            }
        }
    }
}

/// `Σ_{j ≠ e} e^{l_j − l_e}` of a logits row, in index order (the wgpu kernel sums the same way).
fn rest_of(row: ArrayView1<'_, f32>, e: usize) -> f32 {
    let m = row.get(e).copied().unwrap_or(0.0);
    row.iter()
        .enumerate()
        .filter(|&(j, _)| j != e)
        .map(|(_, &l)| (l - m).exp())
        .sum()
}

/// Row-wise softmax in place (`[T, E]`), parallel over rows, each row by [`kit::softmax_in_place`].
fn softmax_rows_in_place(p: &mut ndarray::ArrayViewMut2<'_, f32>) {
    let e = p.ncols().max(1);
    if let Some(s) = p.as_slice_mut() {
        s.par_chunks_mut(e).for_each(kit::softmax_in_place);
    } else {
        for mut row in p.outer_iter_mut() {
            let mut v = row.to_vec();
            kit::softmax_in_place(&mut v);
            row.assign(&ArrayView1::from(&v));
        }
    }
}

/// The losses over the real tokens: the load-balancing loss per sequence (`seqs`) with pre-capacity counts, and the
/// z-loss. Returns `(load balance, z, number of real tokens)`.
///
/// Memory: one `[T_real, E]` work buffer. When the logits are kept (`keep`), it is a copy of their real rows;
/// otherwise the real rows are moved to the front of `logits` and the work is done there in place (the logits are
/// then spent). The z-loss is taken on the work rows first, then they are softmaxed in place for the balance loss.
fn losses(
    logits: &mut Array2<f32>,
    keep: bool,
    choices: &[Option<Choice>],
    seqs: &[(usize, usize)],
) -> (f32, f32, usize) {
    let (t, e) = logits.dim();
    let mut real = Vec::with_capacity(t);
    let mut seq_lens = Vec::with_capacity(seqs.len());
    let mut counts_per_seq = Vec::with_capacity(seqs.len());
    for &(start, end) in seqs {
        let mut counts = vec![0usize; e];
        let before = real.len();
        for c in choices.get(start..end).unwrap_or(&[]).iter().flatten() {
            if let Some(n) = counts.get_mut(c.expert) {
                *n += 1;
            }
            real.push(c.token);
        }
        if real.len() > before {
            seq_lens.push(real.len() - before);
            counts_per_seq.push(counts);
        }
    }
    let lb = |p: ArrayView2<'_, f32>| {
        loss::load_balance_grouped(p, &seq_lens, &counts_per_seq, 1, LbNorm::HfSwitch)
    };
    let n = real.len();
    let mut copy;
    let mut work = if keep {
        copy = logits.select(Axis(0), &real);
        copy.view_mut()
    } else {
        for (r, &i) in real.iter().enumerate() {
            if r != i {
                let (mut dst, src) =
                    logits.multi_slice_mut((ndarray::s![r, ..], ndarray::s![i, ..]));
                dst.assign(&src);
            }
        }
        logits.slice_mut(ndarray::s![..n, ..])
    };
    let z = loss::z_loss(work.view());
    softmax_rows_in_place(&mut work);
    (lb(work.view()), z, n)
}

/// `(argmax, max)` of a probability row by the exact-arithmetic order ([`kit::rank_cmp`]): the larger probability,
/// then the larger logit (`logits`, the same row's raw logits: softmax underflow or rounding never ties distinct
/// logits), then the lower index.
fn argmax(row: ArrayView1<'_, f32>, logits: ArrayView1<'_, f32>) -> (usize, f32) {
    let mut best: Option<(usize, f32, f32)> = None;
    for (j, (&p, &l)) in row.iter().zip(logits.iter()).enumerate() {
        let better = match best {
            None => true,
            Some((_, bp, bl)) => p > bp || (p == bp && l > bl),
        };
        if better {
            best = Some((j, p, l));
        }
    }
    best.map_or((0, f32::NEG_INFINITY), |(j, p, _)| (j, p))
}

/// `[start, end)` ranges of consecutive sequences of the given lengths.
fn ranges(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut start = 0usize;
    lens.iter()
        .map(|&l| {
            let r = (start, start + l);
            start += l;
            r
        })
        .collect()
}

/// The plan's record of a choice (rank 0: Switch has one choice per token).
fn assignment(c: &Choice) -> Assignment {
    Assignment {
        token: c.token as u32,
        expert: c.expert as u32,
        weight: c.weight,
        rank: 0,
    }
}

impl Router for SwitchTop1 {
    fn name(&self) -> &str {
        "switch-top1"
    }

    fn n_experts(&self) -> usize {
        self.gate.nrows()
    }

    fn d_model(&self) -> Option<usize> {
        Some(self.gate.ncols())
    }

    /// [`SwitchTop1Config::is_causal`] of this router's drop policy: `true` exactly with `drop = position`.
    fn is_causal(&self) -> bool {
        SwitchTop1Config {
            drop: Some(self.drop),
            ..Default::default()
        }
        .is_causal()
    }

    /// `gate`: the classifier `W_g` (HF `router.classifier.weight`), `[E, d]`; `gate_bias`: `[E]` (HF
    /// `router.classifier.bias`), when set.
    fn params(&self) -> Vec<Param<'_>> {
        let mut v = vec![Param::new("gate", self.gate.view())];
        v.extend(
            self.gate_bias
                .iter()
                .map(|b| Param::new("gate_bias", b.view())),
        );
        v
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_>> {
        let mut v = vec![ParamMut::new("gate", self.gate.view_mut())];
        v.extend(
            self.gate_bias
                .iter_mut()
                .map(|b| ParamMut::new("gate_bias", b.view_mut())),
        );
        v
    }

    /// `None` unless [`SwitchSpec`] describes the routing completely (module docs): in particular `None` with a
    /// gate bias, which the spec cannot carry.
    fn spec(&self) -> Option<RouterSpec> {
        let expressible = self.rounding == CapacityRounding::Fixed
            && self.jitter == 0.0
            && self.drop != DropPolicy::Random
            && self.gate_bias.is_none();
        expressible.then(|| {
            RouterSpec::Switch(SwitchSpec {
                gate: self.gate.clone(),
                capacity: self.expert_capacity,
                per_sequence: self.per_sequence,
                drop: self.drop,
            })
        })
    }

    fn route(&self, input: &RouterInput<'_>) -> Result<Routing, MoeError> {
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, 1)?;
        let t = input.n_tokens();
        let jittered = match input.mode {
            Mode::Train { seed } if self.jitter > 0.0 => Some(self.jittered(input.hidden, seed)),
            _ => None,
        };
        let hidden = jittered.as_ref().map_or(input.hidden, |j| j.view());
        let mut logits = kit::gate_logits(hidden, self.gate.view(), self.gate_bias.as_ref())?;
        // Each token's probabilities in a per-thread scratch row: routing holds one [T, E] buffer, the logits.
        let choices: Vec<Option<Choice>> = (0..t)
            .into_par_iter()
            .map_init(Vec::new, |scratch: &mut Vec<f32>, token| {
                (!input.is_padding(token)).then(|| {
                    let lrow = logits.row(token);
                    scratch.clear();
                    scratch.extend(lrow.iter().copied());
                    kit::softmax_in_place(scratch);
                    let (expert, weight) = argmax(ArrayView1::from(&scratch[..]), lrow);
                    Choice {
                        token,
                        expert,
                        weight,
                        rest: rest_of(lrow, expert),
                    }
                })
            })
            .collect();

        let seqs = ranges(&input.sequences());
        let groups = if self.per_sequence {
            seqs.clone()
        } else {
            vec![(0, t)]
        };
        let drop_seed = match input.mode {
            Mode::Train { seed } => seed,
            Mode::Eval => EVAL_DROP_SEED,
        };
        let (kept, dropped) = self.apply_capacity(&choices, &groups, drop_seed);
        let keep_logits = e <= KEEP_LOGITS_MAX_EXPERTS;
        let (lb, z, n_real) = losses(&mut logits, keep_logits, &choices, &seqs);
        let mut routing = Routing::new(t, e, n_real, kept, dropped)?;
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::LoadBalance(LbNorm::HfSwitch),
            value: lb,
            coefficient: self.aux_coefficient,
        });
        routing.push_aux(AuxLoss {
            kind: AuxLossKind::RouterZ,
            value: z,
            coefficient: self.z_coefficient,
        });
        if keep_logits {
            routing.set_logits(logits);
        }
        Ok(routing)
    }

    /// The exact derivative of [`Router::route`], recomputed from `grad.input` (same jitter from the same seed):
    /// - a kept slot's weight `p_max = softmax(l)_e` takes `dw` through the softmax over all `E`
    ///   ([`kit::softmax_backward`]); capacity and drops get none (a dropped token has no slot);
    /// - `LoadBalance(HfSwitch)`: per sequence, through `softmax(l)` of its real tokens, with the pre-capacity
    ///   counts constant ([`kit::load_balance_backward`]), divided by the number of sequences averaged;
    /// - `RouterZ`: through `logsumexp` of every real token ([`kit::z_loss_backward`]);
    /// - the gate ([`kit::gate_backward`]) on the routing input `x' = x ⊙ m`: `dL/dx = (dL/dx') ⊙ m` with the
    ///   jitter multipliers `m` (1 in eval or with `jitter = 0`), `gate` `= d_lᵀ · x'`, and `gate_bias` when set.
    ///
    /// # Errors
    /// [`RouterBackward::validate`]'s errors; the input's errors as in [`Router::route`];
    /// [`MoeError::Mismatch`] for a plan of another `E`.
    fn backward(&self, grad: &RouterBackward<'_, '_>) -> Result<RouterGrads, MoeError> {
        grad.validate()?;
        let (input, routing) = (grad.input, grad.routing);
        let e = self.n_experts();
        kit::check_input(input, self.d_model(), e, 1)?;
        if routing.n_experts() != e {
            return Err(MoeError::mismatch(
                "switch-top1 backward",
                "plan experts",
                routing.n_experts(),
                "router experts",
                e,
            ));
        }
        let (t, d) = input.hidden.dim();
        let factors = match input.mode {
            Mode::Train { seed } if self.jitter > 0.0 => Some(self.jitter_factors(t, d, seed)),
            _ => None,
        };
        let jittered = factors.as_ref().map(|m| m * &input.hidden);
        let hidden = jittered.as_ref().map_or(input.hidden, |j| j.view());
        let logits = kit::gate_logits(hidden, self.gate.view(), self.gate_bias.as_ref())?;
        let mut d_logits = Array2::<f32>::zeros((t, e));
        let mut p = vec![0.0f32; e];
        let (mut dp, mut dl) = (vec![0.0f32; e], vec![0.0f32; e]);
        for g in routing.groups() {
            for (j, &tok) in g.tokens.iter().enumerate() {
                let tok = tok as usize;
                p.clear();
                p.extend(logits.row(tok).iter().copied());
                kit::softmax_in_place(&mut p);
                dp.fill(0.0);
                dp[g.expert] = grad.d_weights[g.slot_start + j];
                kit::softmax_backward(&p, &dp, &mut dl);
                d_logits
                    .row_mut(tok)
                    .zip_mut_with(&ArrayView1::from(&dl[..]), |o, &v| *o += v);
            }
        }
        let d_lb = grad.d_aux_of(AuxLossKind::LoadBalance(LbNorm::HfSwitch));
        let d_z = grad.d_aux_of(AuxLossKind::RouterZ);
        losses_backward(input, &logits, d_lb, d_z, &mut d_logits);
        let g = kit::gate_backward(hidden, self.gate.view(), d_logits.view())?;
        let mut d_hidden = g.d_x;
        if let Some(m) = &factors {
            d_hidden *= m;
        }
        let mut params = vec![Grad::dense("gate", g.d_gate)];
        if self.gate_bias.is_some() {
            params.push(Grad::dense("gate_bias", g.d_bias));
        }
        Ok(RouterGrads { d_hidden, params })
    }
}

/// Adds to `d_logits` (`[T, E]`) the gradients of the two losses of [`losses`] times `d_lb` and `d_z`, from the
/// routing `logits`: the load-balancing loss per sequence of `input` (its real tokens; the pre-capacity argmax
/// counts, recomputed as the forward chose them, constant), averaged over the sequences holding a real token; the
/// z-loss over all real tokens.
fn losses_backward(
    input: &RouterInput<'_>,
    logits: &Array2<f32>,
    d_lb: f32,
    d_z: f32,
    d_logits: &mut Array2<f32>,
) {
    let e = logits.ncols();
    let real_of = |(start, end): (usize, usize)| -> Vec<usize> {
        (start..end).filter(|&t| !input.is_padding(t)).collect()
    };
    let seqs: Vec<Vec<usize>> = ranges(&input.sequences())
        .into_iter()
        .map(real_of)
        .filter(|r| !r.is_empty())
        .collect();
    let mut p = vec![0.0f32; e];
    let mut dl = vec![0.0f32; e];
    if d_lb != 0.0 && !seqs.is_empty() {
        let per_seq = d_lb / seqs.len() as f32;
        for real in &seqs {
            let mut probs = logits.select(Axis(0), real);
            let mut counts = vec![0usize; e];
            for (mut row, &tok) in probs.outer_iter_mut().zip(real) {
                if let Some(r) = row.as_slice_mut() {
                    kit::softmax_in_place(r);
                    let (expert, _) = argmax(ArrayView1::from(&r[..]), logits.row(tok));
                    counts[expert] += 1;
                }
            }
            let d_probs =
                kit::load_balance_backward(real.len(), &counts, e, 1, LbNorm::HfSwitch, per_seq);
            for ((row, d_row), &tok) in probs.outer_iter().zip(d_probs.outer_iter()).zip(real) {
                p.clear();
                p.extend(row.iter().copied());
                match d_row.as_slice() {
                    Some(dp) => kit::softmax_backward(&p, dp, &mut dl),
                    None => kit::softmax_backward(&p, &d_row.to_vec(), &mut dl),
                }
                d_logits
                    .row_mut(tok)
                    .zip_mut_with(&ArrayView1::from(&dl[..]), |o, &v| *o += v);
            }
        }
    }
    if d_z != 0.0 {
        let real: Vec<usize> = seqs.concat();
        let d_real = kit::z_loss_backward(logits.select(Axis(0), &real).view(), d_z);
        for (d_row, &tok) in d_real.outer_iter().zip(&real) {
            d_logits.row_mut(tok).zip_mut_with(&d_row, |o, &v| *o += v);
        }
    }
}

fn factory(args: &RouterArgs) -> Result<Box<dyn Router>, MoeError> {
    let cfg: SwitchTop1Config = args.parse("switch-top1")?;
    let gate = kit::init_gate(args.d_model, args.n_experts, args.seed, GATE_STREAM)?;
    Ok(Box::new(cfg.build(gate)?))
}

/// Registers `switch-top1`. The layer's `top_k` is ignored: Switch routes each token to one expert.
///
/// # Errors
/// [`MoeError::DuplicateRouter`] if the name is taken.
pub fn register(reg: &mut RouterRegistry) -> Result<(), MoeError> {
    reg.register(RouterEntry::new::<SwitchTop1Config>(
        "switch-top1",
        "Switch top-1 with capacity (megatron / deepspeed / fairseq / fixed), drop policies, jitter, aux and z-loss",
        factory,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn router(cfg: SwitchTop1Config, e: usize) -> SwitchTop1 {
        cfg.build(Array2::eye(e)).expect("valid config")
    }

    fn rounding(capacity: CapacityRounding, cf: Option<f64>) -> SwitchTop1Config {
        SwitchTop1Config {
            capacity: Some(capacity),
            capacity_factor: cf,
            ..Default::default()
        }
    }

    #[test]
    fn capacity_per_rounding() {
        // E = 4, cf = 1.25.
        // T = 10: T/E = 2.5; 2.5 * 1.25 = 3.125 -> megatron ceil = 4; deepspeed max(4, 4) = 4;
        //         fairseq floor(1.25 * ceil(2.5) = 1.25 * 3 = 3.75) = 3.
        // T = 2:  0.5 * 1.25 = 0.625 -> megatron 1; deepspeed max(1, min 4) = 4; fairseq floor(1.25 * 1) = 1.
        // T = 0:  megatron 0; deepspeed 4; fairseq 0.
        let m = router(rounding(CapacityRounding::Megatron, None), 4);
        let ds = router(rounding(CapacityRounding::DeepSpeed, None), 4);
        let fs = router(rounding(CapacityRounding::Fairseq, None), 4);
        assert_eq!(
            [m.capacity_for(10), m.capacity_for(2), m.capacity_for(0)],
            [4, 1, 0]
        );
        assert_eq!(
            [ds.capacity_for(10), ds.capacity_for(2), ds.capacity_for(0)],
            [4, 4, 4]
        );
        assert_eq!(
            [fs.capacity_for(10), fs.capacity_for(2), fs.capacity_for(0)],
            [3, 1, 0]
        );
        // deepspeed with min_capacity 1, T = 10, cf = 2: ceil(2.5 * 2 = 5) = 5.
        let ds1 = SwitchTop1Config {
            min_capacity: Some(1),
            capacity_factor: Some(2.0),
            ..rounding(CapacityRounding::DeepSpeed, None)
        };
        assert_eq!(router(ds1, 4).capacity_for(10), 5);
        // fixed ignores T.
        let f = router(
            SwitchTop1Config {
                expert_capacity: Some(2),
                ..rounding(CapacityRounding::Fixed, None)
            },
            4,
        );
        assert_eq!([f.capacity_for(0), f.capacity_for(1000)], [2, 2]);
    }

    #[test]
    fn capacity_matches_python_doubles() {
        // Megatron, Python: math.ceil(50 / 4 * 1.2) == 15 (12.5 * 1.2 rounds to exactly 15.0 in double precision).
        // DeepSpeed: torch.ceil(12.5 * torch.tensor(1.2)) == 16, the float32 product being 15.000001.
        // Both agree where the product is not next to an integer: ceil(10 / 4 * 1.2 = 3.0) = 3.
        let m = router(rounding(CapacityRounding::Megatron, Some(1.2)), 4);
        assert_eq!(m.capacity_for(50), 15);
        assert_eq!(m.capacity_for(10), 3);
        let ds = SwitchTop1Config {
            min_capacity: Some(0),
            ..rounding(CapacityRounding::DeepSpeed, Some(1.2))
        };
        let ds = router(ds, 4);
        assert_eq!(ds.capacity_for(50), 16);
        assert_eq!(ds.capacity_for(10), 3);
        // Exact quotient: 12 / 4 * 1.0 = 3 (no ceil bump).
        assert_eq!(
            router(rounding(CapacityRounding::Megatron, Some(1.0)), 4).capacity_for(12),
            3
        );
        // fairseq can give 0 for cf < 1: int(0.5 * ceil(7 / 8) = 0.5) = 0; megatron ceil(7 / 8 * 0.5) = 1.
        assert_eq!(
            router(rounding(CapacityRounding::Fairseq, Some(0.5)), 8).capacity_for(7),
            0
        );
        assert_eq!(
            router(rounding(CapacityRounding::Megatron, Some(0.5)), 8).capacity_for(7),
            1
        );
    }

    #[test]
    fn bad_options_are_typed_errors() {
        let gate = || Array2::<f32>::eye(3);
        let bad = [
            SwitchTop1Config {
                capacity: Some(CapacityRounding::Fixed),
                ..Default::default()
            },
            SwitchTop1Config {
                expert_capacity: Some(0),
                ..rounding(CapacityRounding::Fixed, None)
            },
            SwitchTop1Config {
                expert_capacity: Some(2),
                ..rounding(CapacityRounding::Fixed, Some(1.0))
            },
            SwitchTop1Config {
                expert_capacity: Some(2),
                ..Default::default()
            },
            SwitchTop1Config {
                min_capacity: Some(2),
                ..Default::default()
            },
            rounding(CapacityRounding::Megatron, Some(0.0)),
            rounding(CapacityRounding::Megatron, Some(f64::NAN)),
            SwitchTop1Config {
                jitter: Some(1.0),
                ..Default::default()
            },
            SwitchTop1Config {
                jitter: Some(-0.1),
                ..Default::default()
            },
            SwitchTop1Config {
                aux_coefficient: Some(f32::INFINITY),
                ..Default::default()
            },
            SwitchTop1Config {
                z_coefficient: Some(-1.0),
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(
                matches!(cfg.build(gate()), Err(MoeError::InvalidConfig { .. })),
                "{cfg:?} was accepted"
            );
        }
        let nan_gate = array![[1.0f32, f32::NAN]];
        assert!(matches!(
            SwitchTop1Config::default().build(nan_gate),
            Err(MoeError::NonFinite { .. })
        ));
        assert!(matches!(
            SwitchTop1Config::default().build(Array2::zeros((0, 4))),
            Err(MoeError::Shape { .. })
        ));
    }

    #[test]
    fn registry_options_parse() {
        let mut reg = RouterRegistry::new();
        register(&mut reg).expect("register");
        let mut args = RouterArgs::new(8, 4, 2, 0);
        for (k, v) in [
            ("capacity", "fixed"),
            ("expert_capacity", "3"),
            ("per_sequence", "true"),
            ("drop", "random"),
        ] {
            args.set_option_str(k, v);
        }
        let r = reg.create("switch-top1", &args).expect("create");
        assert_eq!(
            (r.name(), r.n_experts(), r.d_model()),
            ("switch-top1", 4, Some(8))
        );
        // `deepspeed` and the LbNorm spelling `deep_speed` are both accepted.
        for spelling in ["deepspeed", "deep_speed"] {
            let cfg: SwitchTop1Config = RouterArgs::new(8, 4, 1, 0)
                .with_option("capacity", spelling)
                .parse("switch-top1")
                .expect("parse");
            assert_eq!(cfg.capacity, Some(CapacityRounding::DeepSpeed));
        }
        let unknown = RouterArgs::new(8, 4, 1, 0).with_option("capacity_factr", 2.0);
        assert!(matches!(
            reg.create("switch-top1", &unknown),
            Err(MoeError::InvalidConfig { .. })
        ));
        let wrong = RouterArgs::new(8, 4, 1, 0).with_option("capacity", "ceil");
        assert!(matches!(
            reg.create("switch-top1", &wrong),
            Err(MoeError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn spec_only_when_fully_expressible() {
        let hf_eval = SwitchTop1Config {
            jitter: Some(0.0),
            ..SwitchTop1Config::hf_switch(2)
        };
        match router(hf_eval.clone(), 3).spec() {
            Some(RouterSpec::Switch(s)) => {
                assert_eq!(
                    (s.capacity, s.per_sequence, s.drop),
                    (2, true, DropPolicy::Position)
                );
                assert_eq!(s.gate, Array2::<f32>::eye(3));
            }
            other => panic!("expected a switch spec, got {other:?}"),
        }
        // Jitter, a T-dependent rounding, or a seeded drop order cannot be expressed by SwitchSpec.
        assert!(router(SwitchTop1Config::hf_switch(2), 3).spec().is_none());
        assert!(
            router(
                SwitchTop1Config {
                    jitter: Some(0.0),
                    ..Default::default()
                },
                3
            )
            .spec()
            .is_none()
        );
        let random = SwitchTop1Config {
            drop: Some(DropPolicy::Random),
            ..hf_eval
        };
        assert!(router(random, 3).spec().is_none());
    }

    #[test]
    fn rounded_probabilities_rank_by_the_logit() {
        // Logits [0, 1e-8]: e^{-1e-8} is exactly 1.0 in f32, so both probabilities are 0.5; the larger logit has
        // the larger exact probability: expert 1.
        let x = array![[0.0f32, 1e-8], [1e-8, 0.0]];
        let r = router(SwitchTop1Config::hf_switch(4), 2);
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        let t = plan.per_token();
        assert_eq!((t[0][0].0, t[1][0].0), (1, 0));
        assert_eq!(t[0][0].1, 0.5);
    }

    #[test]
    fn saturated_probabilities_drop_by_the_exact_order() {
        // Capacity 1 by probability: p_max is 1.0 in f32 for both tokens; exactly, 1 / (1 + 3 e^-30) of token 1
        // is larger than 1 / (1 + 3 e^-20) of token 0, so token 0 is dropped (it used to be token 1, the later).
        let x = array![[20.0f32, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0]];
        let r = router(
            SwitchTop1Config {
                jitter: Some(0.0),
                drop: Some(DropPolicy::Probability),
                ..SwitchTop1Config::hf_switch(1)
            },
            4,
        );
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        assert_eq!(plan.per_token()[1][0].1, 1.0);
        let dropped: Vec<u32> = plan.dropped().iter().map(|a| a.token).collect();
        assert_eq!(dropped, vec![0]);
    }

    #[test]
    fn gate_bias_changes_the_argmax() {
        // Identity gate, x = [ln 3, 0] -> logits [ln 3, 0], p = [0.75, 0.25] -> expert 0 without a bias.
        // Bias [0, ln 6]: logits [ln 3, ln 6] -> p = [3/9, 6/9] = [1/3, 2/3] -> expert 1, weight 2/3.
        // z-loss = logsumexp(ln 3, ln 6)^2 = (ln 9)^2.
        let x = array![[3f32.ln(), 0.0]];
        let hf = || SwitchTop1Config {
            jitter: Some(0.0),
            ..SwitchTop1Config::hf_switch(1)
        };
        let plain = router(hf(), 2);
        let t = plain
            .route(&RouterInput::new(x.view()))
            .expect("route")
            .per_token()[0]
            .clone();
        assert_eq!(t[0].0, 0);
        assert!((t[0].1 - 0.75).abs() < 1e-6);
        assert!(plain.spec().is_some());

        let biased = router(hf(), 2)
            .with_gate_bias(array![0.0f32, 6f32.ln()])
            .expect("bias");
        assert_eq!(biased.gate_bias(), Some(&array![0.0f32, 6f32.ln()]));
        let plan = biased.route(&RouterInput::new(x.view())).expect("route");
        let t = &plan.per_token()[0];
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, 1);
        assert!((t[0].1 - 2.0 / 3.0).abs() < 1e-6);
        let l = plan.logits().expect("logits kept");
        assert!((l[[0, 0]] - 3f32.ln()).abs() < 1e-6);
        assert!((l[[0, 1]] - 6f32.ln()).abs() < 1e-6);
        let z = plan
            .aux_losses()
            .iter()
            .find(|a| a.kind == AuxLossKind::RouterZ)
            .expect("z-loss");
        assert!((z.value - 9f32.ln().powi(2)).abs() < 1e-5);
        // SwitchSpec has no bias field.
        assert!(biased.spec().is_none());

        // Wrong length and non-finite entries are rejected.
        assert!(matches!(
            router(hf(), 2).with_gate_bias(array![0.0f32]),
            Err(MoeError::Shape { .. })
        ));
        assert!(matches!(
            router(hf(), 2).with_gate_bias(array![0.0f32, f32::NAN]),
            Err(MoeError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn hand_computed_route() {
        // Identity gate, so logits = x. Token 0: logits [ln 3, 0] -> p = [0.75, 0.25] -> expert 0, weight 0.75.
        // Token 1: logits [0, 0] -> p = [0.5, 0.5], a tie -> expert 0 (lower id), weight 0.5.
        // Token 2: logits [0, ln 4] -> p = [0.2, 0.8] -> expert 1, weight 0.8.
        // Fixed capacity 1, position order: token 1 is the second token of expert 0 -> dropped.
        let r = router(SwitchTop1Config::hf_switch(1), 2);
        let x = array![[3f32.ln(), 0.0], [0.0, 0.0], [0.0, 4f32.ln()]];
        let plan = r.route(&RouterInput::new(x.view())).expect("route");
        let t = plan.per_token();
        assert_eq!(t[0].len(), 1);
        assert_eq!(t[0][0].0, 0);
        assert!((t[0][0].1 - 0.75).abs() < 1e-6);
        assert!(t[1].is_empty());
        assert_eq!(t[2][0].0, 1);
        assert!((t[2][0].1 - 0.8).abs() < 1e-6);
        let d = plan.dropped();
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].token, d[0].expert), (1, 0));
        assert!((d[0].weight - 0.5).abs() < 1e-6);
    }
}
