//! The decoder-only language model around MoE layers (`docs/TRAINING.md` has the whole contract):
//!
//! ```text
//! x = tok_emb[inputs] + pos_emb[c]                                  [T, d], T = B · C
//! per block: x = x + attn(rmsnorm(x) ⊙ attn_norm);  x = x + ffn(rmsnorm(x) ⊙ ffn_norm)
//! logits = (rmsnorm(x) ⊙ norm) · tok_embᵀ                           [T, V] (tied output projection)
//! loss = mean CE + Σ_layers Σ_i c_i · aux_i
//! ```
//! The FFN of every block is an MoE layer resident on the CPU backend (`forward_train` / `backward_into`), routed
//! by any registered router; the dense baseline is the same layer with one expert of width `k · F` that every
//! token takes ([`DenseRouter`]). Everything else is `crate::ops`, by hand.

use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::rng::{SeqRng, splitmix64};
use moe_core::{
    AuxLossKind, Backend, DeviceLayer, ExpertBank, LayerGrads, MlpBank, Mode, MoeError, MoeLayer,
    PeerBank, Router, RouterArgs, RouterInput, RouterRegistry, Routing, SwiGluBank,
};
use ndarray::{Array1, Array2, Array3, ArrayViewD, ArrayViewMutD};

use crate::config::{BankKind, FfnKind, LmConfig};
use crate::data::Batch;
use crate::dense::DenseRouter;
use crate::error::TrainError;
use crate::ops::{self, AttnShape};
use crate::optim::AdamW;

/// Standard deviation of the initial weights (GPT-2, nanoGPT).
pub const INIT_STD: f32 = 0.02;

/// The parameters of one block outside its FFN.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockParams {
    /// RMSNorm weight before attention `[d]`.
    pub attn_norm: Array1<f32>,
    /// `[3d, d]`: q, k, v projections stacked.
    pub qkv: Array2<f32>,
    /// Output projection `[d, d]`.
    pub proj: Array2<f32>,
    /// RMSNorm weight before the FFN `[d]`.
    pub ffn_norm: Array1<f32>,
}

/// The parameters outside the MoE layers (or their gradients, same shapes).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseParams {
    /// Token embedding `[V, d]`, also the output projection.
    pub tok_emb: Array2<f32>,
    /// Learned positions `[C, d]`.
    pub pos_emb: Array2<f32>,
    /// The blocks.
    pub blocks: Vec<BlockParams>,
    /// Final RMSNorm weight `[d]`.
    pub norm: Array1<f32>,
}

impl DenseParams {
    /// Initial values: normal(0, 0.02), output projections normal(0, 0.02 / √(2L)) (GPT-2), norm weights 1.
    fn init(cfg: &LmConfig, seed: u64) -> Self {
        let (v, d, c, l) = (cfg.vocab, cfg.d_model, cfg.context, cfg.n_layers);
        let out_std = INIT_STD / (2.0 * l as f32).sqrt();
        let blocks = (0..l)
            .map(|i| BlockParams {
                attn_norm: Array1::ones(d),
                qkv: SeqRng::new(seed, stream(i, 0)).normal_matrix(3 * d, d, INIT_STD),
                proj: SeqRng::new(seed, stream(i, 1)).normal_matrix(d, d, out_std),
                ffn_norm: Array1::ones(d),
            })
            .collect();
        DenseParams {
            tok_emb: SeqRng::new(seed, 1).normal_matrix(v, d, INIT_STD),
            pos_emb: SeqRng::new(seed, 2).normal_matrix(c, d, INIT_STD),
            blocks,
            norm: Array1::ones(d),
        }
    }

    fn zeros_like(&self) -> Self {
        let z2 = |a: &Array2<f32>| Array2::zeros(a.raw_dim());
        let z1 = |a: &Array1<f32>| Array1::zeros(a.raw_dim());
        DenseParams {
            tok_emb: z2(&self.tok_emb),
            pos_emb: z2(&self.pos_emb),
            blocks: self
                .blocks
                .iter()
                .map(|b| BlockParams {
                    attn_norm: z1(&b.attn_norm),
                    qkv: z2(&b.qkv),
                    proj: z2(&b.proj),
                    ffn_norm: z1(&b.ffn_norm),
                })
                .collect(),
            norm: z1(&self.norm),
        }
    }

    /// Every tensor with its name, in checkpoint order.
    pub fn named(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        let mut out = vec![
            ("tok_emb".to_string(), self.tok_emb.view().into_dyn()),
            ("pos_emb".to_string(), self.pos_emb.view().into_dyn()),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("blocks.{l}.attn_norm"),
                b.attn_norm.view().into_dyn(),
            ));
            out.push((format!("blocks.{l}.attn.qkv"), b.qkv.view().into_dyn()));
            out.push((format!("blocks.{l}.attn.proj"), b.proj.view().into_dyn()));
            out.push((format!("blocks.{l}.ffn_norm"), b.ffn_norm.view().into_dyn()));
        }
        out.push(("norm".to_string(), self.norm.view().into_dyn()));
        out
    }

    /// As [`DenseParams::named`], mutable.
    pub fn named_mut(&mut self) -> Vec<(String, ArrayViewMutD<'_, f32>)> {
        let mut out = vec![
            ("tok_emb".to_string(), self.tok_emb.view_mut().into_dyn()),
            ("pos_emb".to_string(), self.pos_emb.view_mut().into_dyn()),
        ];
        for (l, b) in self.blocks.iter_mut().enumerate() {
            out.push((
                format!("blocks.{l}.attn_norm"),
                b.attn_norm.view_mut().into_dyn(),
            ));
            out.push((format!("blocks.{l}.attn.qkv"), b.qkv.view_mut().into_dyn()));
            out.push((
                format!("blocks.{l}.attn.proj"),
                b.proj.view_mut().into_dyn(),
            ));
            out.push((
                format!("blocks.{l}.ffn_norm"),
                b.ffn_norm.view_mut().into_dyn(),
            ));
        }
        out.push(("norm".to_string(), self.norm.view_mut().into_dyn()));
        out
    }
}

/// The RNG stream of block `l`'s tensor `j`.
fn stream(l: usize, j: u64) -> u64 {
    100 + 10 * l as u64 + j
}

/// What one block's forward keeps for its backward.
#[derive(Debug, Default)]
struct BlockActs {
    /// Block input `[T, d]`.
    x_in: Array2<f32>,
    inv1: Vec<f32>,
    a: Array2<f32>,
    qkv: Array2<f32>,
    probs: Vec<f32>,
    o: Array2<f32>,
    x_mid: Array2<f32>,
    inv2: Vec<f32>,
    f: Array2<f32>,
}

/// Reused buffers: the activations of the last forward and the backward's temporaries.
#[derive(Debug, Default)]
struct Workspace {
    rows: usize,
    blocks: Vec<BlockActs>,
    x_out: Array2<f32>,
    inv_f: Vec<f32>,
    h: Array2<f32>,
    logits: Array2<f32>,
    scratch: Vec<f32>,
    dx: Array2<f32>,
    dh: Array2<f32>,
    d_o: Array2<f32>,
    d_qkv: Array2<f32>,
    d_a: Array2<f32>,
    tokens: Vec<u32>,
    seq_lens: Vec<usize>,
}

impl Workspace {
    fn ensure(&mut self, cfg: &LmConfig, batch: usize) {
        let (t, d, h, c) = (batch * cfg.context, cfg.d_model, cfg.n_heads, cfg.context);
        if self.rows == t && self.blocks.len() == cfg.n_layers {
            return;
        }
        let z = |cols: usize| Array2::<f32>::zeros((t, cols));
        self.blocks = (0..cfg.n_layers)
            .map(|_| BlockActs {
                x_in: z(d),
                inv1: vec![0.0; t],
                a: z(d),
                qkv: z(3 * d),
                probs: vec![0.0; batch * h * c * c],
                o: z(d),
                x_mid: z(d),
                inv2: vec![0.0; t],
                f: z(d),
            })
            .collect();
        self.x_out = z(d);
        self.inv_f = vec![0.0; t];
        self.h = z(d);
        self.logits = z(cfg.vocab);
        self.dx = z(d);
        self.dh = z(d);
        self.d_o = z(d);
        self.d_qkv = z(3 * d);
        self.d_a = z(d);
        self.rows = t;
    }
}

/// What one MoE layer did in a training step.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// Kept assignments per expert `[E]`.
    pub counts: Vec<usize>,
    /// Load CV (std / mean of `counts`).
    pub cv: f64,
    /// Fraction of assignments dropped.
    pub dropped: f64,
    /// Largest |router logit| (0 where the router reports none).
    pub max_logit: f64,
}

/// What a forward reported.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy, nats per byte.
    pub ce: f64,
    /// `Σ c_i · aux_i` over layers.
    pub aux: f64,
    /// Per MoE layer.
    pub layers: Vec<LayerStats>,
}

/// Coefficients replacing the routers' own (see [`TrainConfig::aux_coef`](crate::TrainConfig::aux_coef)).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AuxOverride {
    /// For every load-balancing loss (load balance, importance, smooth load).
    pub balance: Option<f32>,
    /// For every z-loss.
    pub z: Option<f32>,
}

impl AuxOverride {
    /// The overrides of a run ([`TrainConfig::aux_coef`](crate::TrainConfig::aux_coef), `z_coef`).
    pub fn of(train: &crate::TrainConfig) -> Self {
        AuxOverride {
            balance: train.aux_coef,
            z: train.z_coef,
        }
    }

    /// The coefficient of every aux loss of `routing`.
    pub fn coefficients(&self, routing: &Routing) -> Vec<f32> {
        routing
            .aux_losses()
            .iter()
            .map(|a| match a.kind {
                AuxLossKind::RouterZ => self.z.unwrap_or(a.coefficient),
                _ => self.balance.unwrap_or(a.coefficient),
            })
            .collect()
    }
}

/// The language model: parameters, resident MoE layers, gradients and workspaces.
pub struct Lm {
    cfg: LmConfig,
    /// Parameters outside the MoE layers.
    pub params: DenseParams,
    /// Their gradients after [`Lm::forward_backward`].
    pub grads: DenseParams,
    ffn: Vec<Box<dyn DeviceLayer>>,
    /// The MoE layers' gradients after [`Lm::forward_backward`].
    pub ffn_grads: Vec<LayerGrads>,
    /// The last training forward's plans (for `update_state`).
    routings: Vec<Option<Routing>>,
    /// While [`Lm::eval_plans`] runs: the eval forward's plans, by layer.
    captured: Option<Vec<Routing>>,
    ws: Workspace,
    causal: bool,
}

impl std::fmt::Debug for Lm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lm").field("cfg", &self.cfg).finish()
    }
}

/// How the FFN of every block is sized for its router, so that every router uses `k · F` hidden units per token
/// (equal active parameters): the experts' count and width, the experts a token uses, and the router options the
/// trainer sets where the user did not (docs/TRAINING.md, "Equal active parameters").
///
/// - dense: one expert of width `k · F`, taken by every token;
/// - `switch-top1` (one expert per token by definition): `E` experts of width `k · F`;
/// - `hash`: `k` (its own option, default 1) set to the model's `k`;
/// - `expert-choice`: `capacity_factor` (tokens per expert `T · c / E`, so `c` experts per token on average) set
///   to `k`;
/// - `peer`: `N = n²` singleton experts with `n = round(√(E · F))` (about the hidden units of the others' layers),
///   `h` heads (the smallest power of two with `h · n ≥ k · F`) keeping `k · F / h` experts each, sub-keys of
///   width `d_key = d / 8`;
/// - every other router (softmax-topk, noisy-topk, plugins): `E` experts of width `F`, `k` per token.
#[derive(Debug, Clone, PartialEq)]
pub struct FfnShape {
    /// Experts per layer.
    pub experts: usize,
    /// Hidden width of one expert (1 for PEER's singletons).
    pub width: usize,
    /// Experts a token uses (on average for expert choice).
    pub per_token: usize,
    /// The router's options: the user's, plus those the sizing sets.
    pub options: serde_json::Map<String, serde_json::Value>,
    /// PEER's singleton experts, when the router is `peer`.
    pub peer: bool,
}

/// The sizing of `cfg`'s FFN ([`FfnShape`]).
pub fn ffn_shape(cfg: &LmConfig) -> FfnShape {
    let ffn = &cfg.ffn;
    let (k, f, e) = (ffn.top_k, ffn.expert_width, ffn.experts);
    let shape = |experts, width, per_token, options| FfnShape {
        experts,
        width,
        per_token,
        options,
        peer: false,
    };
    let (router, user) = match &ffn.kind {
        FfnKind::Dense => return shape(1, k * f, 1, Default::default()),
        FfnKind::Moe { router, options } => (router.as_str(), options.clone()),
    };
    let mut options = user;
    let uint = |o: &serde_json::Map<String, serde_json::Value>, key: &str, default: usize| {
        o.get(key)
            .and_then(|v| v.as_u64())
            .map_or(default, |v| v as usize)
    };
    match router {
        "switch-top1" => shape(e, k * f, 1, options),
        "hash" => {
            options.entry("k").or_insert_with(|| k.into());
            let per = uint(&options, "k", k);
            shape(e, f, per, options)
        }
        "expert-choice" => {
            options
                .entry("capacity_factor")
                .or_insert_with(|| (k as f64).into());
            shape(e, f, k, options)
        }
        "peer" => {
            let n = ((e * f) as f64).sqrt().round().max(1.0) as usize;
            let active = k * f;
            let heads = uint(&options, "heads", active.div_ceil(n).next_power_of_two()).max(1);
            options.entry("heads").or_insert_with(|| heads.into());
            options
                .entry("k")
                .or_insert_with(|| (active / heads).clamp(1, n).into());
            // The query of a head is [2 · d_key]; the paper's d_key = 128 is for widths of 1024 and more: at
            // d = 128 it would make the query projection (h · 2 · d_key · d) as large as the experts.
            options
                .entry("d_key")
                .or_insert_with(|| (cfg.d_model / 8).max(4).into());
            let per_head = uint(&options, "k", 1);
            FfnShape {
                experts: n * n,
                width: 1,
                per_token: heads * per_head,
                options,
                peer: true,
            }
        }
        // A router's own `k` option (softmax-topk, noisy-topk) wins over the model's k: count what it takes.
        _ => {
            let per = uint(&options, "k", k);
            shape(e, f, per, options)
        }
    }
}

/// Builds the first block's router and experts of `cfg` and drops them: an unknown router, an option it refuses
/// or experts that do not fit it are found before any run trains (a list of runs fails early, not after the
/// runs before it).
///
/// # Errors
/// As [`Lm::new`].
pub fn check_ffn(registry: &RouterRegistry, cfg: &LmConfig) -> Result<(), TrainError> {
    cfg.validate()?;
    let shape = ffn_shape(cfg);
    let router = make_router(registry, cfg, &shape, 0, 0)?;
    MoeLayer::new(router, make_bank(cfg, &shape, 0, 0)?)?;
    Ok(())
}

/// The router of block `l` (dense: [`DenseRouter`]).
fn make_router(
    registry: &RouterRegistry,
    cfg: &LmConfig,
    shape: &FfnShape,
    seed: u64,
    l: usize,
) -> Result<Box<dyn Router>, TrainError> {
    match &cfg.ffn.kind {
        FfnKind::Dense => Ok(Box::new(DenseRouter {
            d_model: cfg.d_model,
        })),
        FfnKind::Moe { router, .. } => {
            let mut args = RouterArgs::new(
                cfg.d_model,
                shape.experts,
                cfg.ffn.top_k,
                splitmix64(seed ^ (l as u64 + 1)),
            );
            args.options = shape.options.clone();
            Ok(registry.create(router, &args)?)
        }
    }
}

/// The experts of block `l` ([`FfnShape`]): `E` experts of the bank's kind, or PEER's singletons.
fn make_bank(
    cfg: &LmConfig,
    shape: &FfnShape,
    seed: u64,
    l: usize,
) -> Result<ExpertBank, MoeError> {
    let ffn = &cfg.ffn;
    if shape.peer {
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f32).sqrt();
        let d = cfg.d_model;
        return Ok(ExpertBank::Peer(PeerBank::new(
            SeqRng::new(seed, stream(l, 2)).normal_matrix(shape.experts, d, INIT_STD),
            SeqRng::new(seed, stream(l, 3)).normal_matrix(shape.experts, d, out_std),
            ffn.bank.activation(),
        )?));
    }
    let (e, f) = (shape.experts, shape.width);
    let d = cfg.d_model;
    let out_std = INIT_STD / (2.0 * cfg.n_layers as f32).sqrt();
    let a3 = |rows: usize, cols: usize, std: f32, j: u64| -> Result<Array3<f32>, MoeError> {
        SeqRng::new(seed, stream(l, j))
            .normal_matrix(e * rows, cols, std)
            .into_shape_with_order((e, rows, cols))
            .map_err(|err| {
                MoeError::shape(
                    "experts",
                    format!("[{e}, {rows}, {cols}]"),
                    &[err.to_string().len()],
                )
            })
    };
    Ok(match ffn.bank {
        BankKind::Mlp => ExpertBank::Mlp(MlpBank::new(
            a3(f, d, INIT_STD, 2)?,
            None,
            a3(d, f, out_std, 3)?,
            None,
            BankKind::Mlp.activation(),
        )?),
        BankKind::Swiglu => ExpertBank::SwiGlu(SwiGluBank::new(
            a3(2 * f, d, INIT_STD, 2)?,
            a3(d, f, out_std, 3)?,
            BankKind::Swiglu.activation(),
        )?),
    })
}

impl Lm {
    /// A freshly initialised model (weights from `seed`), its MoE layers resident on the CPU backend.
    ///
    /// # Errors
    /// [`TrainError::Moe`] for a bad configuration or a router that cannot be built for it.
    pub fn new(registry: &RouterRegistry, cfg: &LmConfig, seed: u64) -> Result<Self, TrainError> {
        Self::build(registry, cfg, seed, |_| Ok(()))
    }

    /// As [`Lm::new`], then `edit` may change each MoE layer (block index, layer) before it is uploaded (a
    /// checkpoint's values are written here).
    ///
    /// # Errors
    /// As [`Lm::new`] and `edit`'s.
    pub fn build(
        registry: &RouterRegistry,
        cfg: &LmConfig,
        seed: u64,
        mut edit: impl FnMut((usize, &mut MoeLayer)) -> Result<(), TrainError>,
    ) -> Result<Self, TrainError> {
        cfg.validate()?;
        let params = DenseParams::init(cfg, seed);
        let grads = params.zeros_like();
        let backend = CpuBackend::new();
        let mut ffn = Vec::with_capacity(cfg.n_layers);
        let mut causal = true;
        let shape = ffn_shape(cfg);
        for l in 0..cfg.n_layers {
            let router = make_router(registry, cfg, &shape, seed, l)?;
            causal &= router.is_causal();
            let mut layer = MoeLayer::new(router, make_bank(cfg, &shape, seed, l)?)?;
            edit((l, &mut layer))?;
            ffn.push(backend.upload(Arc::new(layer))?);
        }
        Ok(Lm {
            cfg: cfg.clone(),
            params,
            grads,
            ffn_grads: (0..cfg.n_layers).map(|_| LayerGrads::empty()).collect(),
            routings: vec![None; cfg.n_layers],
            captured: None,
            ffn,
            ws: Workspace::default(),
            causal,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    /// Whether every router is causal.
    pub fn is_causal(&self) -> bool {
        self.causal
    }

    /// The resident MoE layer of block `l`.
    pub fn ffn(&self, l: usize) -> Option<&dyn DeviceLayer> {
        self.ffn.get(l).map(|b| b.as_ref())
    }

    /// The resident MoE layers, mutable (optimizer updates).
    pub fn ffn_mut(&mut self) -> &mut [Box<dyn DeviceLayer>] {
        &mut self.ffn
    }

    /// Every parameter tensor with its name (dense parts, then each block's MoE layer as
    /// `blocks.{l}.ffn.NAME`, frozen state included), in checkpoint order.
    pub fn named_params(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        let mut out = self.params.named();
        for (l, layer) in self.ffn.iter().enumerate() {
            for p in layer.layer().params() {
                out.push((format!("blocks.{l}.ffn.{}", p.name), p.value));
            }
        }
        out
    }

    /// Parameters every token uses, and all parameters: `(active, total)`. An MoE layer's experts count `k` of
    /// `E` towards the active ones (the router's parameters count fully).
    pub fn param_counts(&self) -> (usize, usize) {
        let dense: usize = self.params.named().iter().map(|(_, a)| a.len()).sum();
        let (mut active, mut total) = (dense, dense);
        let per_token = ffn_shape(&self.cfg).per_token;
        for layer in &self.ffn {
            let e = layer.layer().n_experts().max(1);
            for p in layer.layer().params() {
                let n = p.value.len();
                total += n;
                active += if p.name.starts_with("experts.") {
                    n / e * per_token.min(e)
                } else {
                    n
                };
            }
        }
        (active, total)
    }

    /// The routers' own parameters, summed over layers (part of both counts of [`Lm::param_counts`]).
    pub fn router_param_count(&self) -> usize {
        self.ffn
            .iter()
            .map(|l| {
                l.layer()
                    .router()
                    .params()
                    .iter()
                    .map(|p| p.value.len())
                    .sum::<usize>()
            })
            .sum()
    }

    /// The training forward and backward of one batch: returns the loss terms and the routers' statistics;
    /// leaves the gradients in [`Lm::grads`] and [`Lm::ffn_grads`]. `seed` seeds the routers' noise of this step.
    ///
    /// # Errors
    /// [`TrainError::NonFinite`] naming the layer whose output is not finite (`step` for the message);
    /// [`TrainError::Moe`] from the MoE layers (a router without a backward is `Unsupported`).
    pub fn forward_backward(
        &mut self,
        batch: &Batch,
        seed: u64,
        aux: AuxOverride,
        step: usize,
    ) -> Result<StepStats, TrainError> {
        let (stats, d_aux) = self.forward(batch, Some(seed), aux, step)?;
        self.backward(&d_aux, step)?;
        Ok(stats)
    }

    /// The validation loss of one batch (eval mode: no noise, no jitter), nats per byte.
    ///
    /// # Errors
    /// As [`Lm::forward_backward`].
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f64, TrainError> {
        Ok(self.forward(batch, None, AuxOverride::default(), 0)?.0.ce)
    }

    /// The eval forward of one batch (as [`Lm::eval_loss`]), keeping each layer's plan: the plans `[L]`, each
    /// over the batch's `T = B · C` tokens. The FFN inputs of this forward stay for [`Lm::predict_plan`].
    ///
    /// # Errors
    /// As [`Lm::eval_loss`].
    pub fn eval_plans(&mut self, batch: &Batch) -> Result<Vec<Routing>, TrainError> {
        self.captured = Some(Vec::with_capacity(self.cfg.n_layers));
        let done = self.forward(batch, None, AuxOverride::default(), 0);
        let plans = self.captured.take().unwrap_or_default();
        done?;
        Ok(plans)
    }

    /// The experts block `l`'s router would choose before block `l − 1`'s FFN ran: its router applied (eval mode)
    /// to the FFN input of block `l − 1` of the last forward, `rmsnorm(x_mid) ⊙ ffn_norm` `[T, d]` (the
    /// mixtral-offloading prediction: the residual stream changes little between layers, Eliseev & Mazur 2023,
    /// arXiv 2312.17238). `None` for block 0, a block that does not exist, or before any forward.
    ///
    /// # Errors
    /// The router's own errors (a non-finite input names the token).
    pub fn predict_plan(&self, l: usize) -> Result<Option<Routing>, TrainError> {
        let (Some(prev), Some(layer)) = (
            l.checked_sub(1).and_then(|p| self.ws.blocks.get(p)),
            self.ffn.get(l),
        ) else {
            return Ok(None);
        };
        if self.ws.rows == 0 || prev.f.nrows() != self.ws.tokens.len() {
            return Ok(None);
        }
        let input = RouterInput::new(prev.f.view())
            .with_token_ids(&self.ws.tokens)
            .with_seq_lens(&self.ws.seq_lens)
            .with_mode(Mode::Eval);
        Ok(Some(layer.layer().route(&input)?))
    }

    /// The forward; `seed: Some` is a training forward (train mode, state kept for the backward, the
    /// cross-entropy's gradient left in the logits buffer). Returns the statistics and each layer's `d_aux`.
    fn forward(
        &mut self,
        batch: &Batch,
        seed: Option<u64>,
        aux: AuxOverride,
        step: usize,
    ) -> Result<(StepStats, Vec<Vec<f32>>), TrainError> {
        let cfg = self.cfg.clone();
        if batch.context != cfg.context || batch.inputs.len() != batch.batch * cfg.context {
            return Err(MoeError::shape(
                "batch",
                format!("[B, {}]", cfg.context),
                &[batch.batch, batch.context],
            )
            .into());
        }
        let t = batch.batch * cfg.context;
        self.ws.ensure(&cfg, batch.batch);
        let ws = &mut self.ws;
        ws.tokens.clone_from(&batch.inputs);
        ws.seq_lens = vec![cfg.context; batch.batch];
        let shape = AttnShape {
            batch: batch.batch,
            context: cfg.context,
            heads: cfg.n_heads,
            head_dim: cfg.d_model / cfg.n_heads,
        };
        ops::embed(
            ws.blocks[0].x_in.view_mut(),
            &batch.inputs,
            self.params.tok_emb.view(),
            self.params.pos_emb.view(),
        )?;
        let mut stats = StepStats {
            ce: 0.0,
            aux: 0.0,
            layers: Vec::with_capacity(cfg.n_layers),
        };
        let mut d_aux = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let (done, rest) = ws.blocks.split_at_mut(l + 1);
            let b = &mut done[l];
            attention_half(
                &self.params.blocks[l],
                b,
                &mut ws.scratch,
                shape,
                cfg.norm_eps,
            )?;
            let input = RouterInput::new(b.f.view())
                .with_token_ids(&ws.tokens)
                .with_seq_lens(&ws.seq_lens)
                .with_mode(match seed {
                    Some(s) => Mode::Train {
                        seed: splitmix64(s ^ splitmix64(l as u64)),
                    },
                    None => Mode::Eval,
                });
            let out = match seed {
                Some(_) => self.ffn[l].forward_train(&input),
                None => self.ffn[l].forward(&input),
            }
            .map_err(|e| non_finite_at(e, step, l, "value in the FFN's forward"))?;
            if !ops::all_finite(out.output.view()) {
                return Err(TrainError::NonFinite {
                    step,
                    layer: Some(l),
                    what: "MoE layer output".into(),
                });
            }
            let next = match rest.first_mut() {
                Some(n) => &mut n.x_in,
                None => &mut ws.x_out,
            };
            next.assign(&b.x_mid);
            ops::add_assign(next.view_mut(), out.output.view());
            let coefs = aux.coefficients(&out.routing);
            stats.aux += out
                .routing
                .aux_losses()
                .iter()
                .zip(&coefs)
                .map(|(a, &c)| f64::from(c) * f64::from(a.value))
                .sum::<f64>();
            stats.layers.push(layer_stats(&out.routing));
            d_aux.push(coefs);
            if seed.is_some() {
                self.routings[l] = Some(out.routing);
            } else if let Some(plans) = &mut self.captured {
                plans.push(out.routing);
            }
        }
        stats.ce = head_forward(
            ws,
            &self.params,
            &batch.targets,
            seed.is_some(),
            cfg.norm_eps,
            step,
        )?;
        debug_assert_eq!(ws.rows, t);
        Ok((stats, d_aux))
    }

    /// The backward of the last training forward (its cross-entropy gradient is in the logits buffer).
    fn backward(&mut self, d_aux: &[Vec<f32>], step: usize) -> Result<(), TrainError> {
        let cfg = &self.cfg;
        let ws = &mut self.ws;
        let (p, g) = (&self.params, &mut self.grads);
        let shape = AttnShape {
            batch: ws.rows / cfg.context,
            context: cfg.context,
            heads: cfg.n_heads,
            head_dim: cfg.d_model / cfg.n_heads,
        };
        // Head: logits = h · tok_embᵀ.
        ops::linear_backward(
            Some(ws.dh.view_mut()),
            g.tok_emb.view_mut(),
            ws.logits.view(),
            ws.h.view(),
            p.tok_emb.view(),
        )?;
        ws.dx.fill(0.0);
        ops::rmsnorm_backward(
            ws.dx.view_mut(),
            g.norm.view_mut(),
            ws.dh.view(),
            ws.x_out.view(),
            p.norm.view(),
            &ws.inv_f,
        );
        for l in (0..cfg.n_layers).rev() {
            let (b, pb, gb) = (&ws.blocks[l], &p.blocks[l], &mut g.blocks[l]);
            let grads = &mut self.ffn_grads[l];
            self.ffn[l]
                .backward_into(ws.dx.view(), &d_aux[l], grads)
                .map_err(|e| non_finite_at(e, step, l, "gradient reaching the FFN"))?;
            ops::rmsnorm_backward(
                ws.dx.view_mut(),
                gb.ffn_norm.view_mut(),
                grads.d_input.view(),
                b.x_mid.view(),
                pb.ffn_norm.view(),
                &b.inv2,
            );
            ops::linear_backward(
                Some(ws.d_o.view_mut()),
                gb.proj.view_mut(),
                ws.dx.view(),
                b.o.view(),
                pb.proj.view(),
            )?;
            ops::attention_backward(
                ws.d_qkv.view_mut(),
                &mut ws.scratch,
                ws.d_o.view(),
                &b.probs,
                b.qkv.view(),
                shape,
            )?;
            ops::linear_backward(
                Some(ws.d_a.view_mut()),
                gb.qkv.view_mut(),
                ws.d_qkv.view(),
                b.a.view(),
                pb.qkv.view(),
            )?;
            ops::rmsnorm_backward(
                ws.dx.view_mut(),
                gb.attn_norm.view_mut(),
                ws.d_a.view(),
                b.x_in.view(),
                pb.attn_norm.view(),
                &b.inv1,
            );
        }
        ops::embed_backward(
            g.tok_emb.view_mut(),
            g.pos_emb.view_mut(),
            ws.dx.view(),
            &ws.tokens,
        );
        Ok(())
    }

    /// `Σ g²` over every gradient of the last backward (f64), and the name of the first gradient with a
    /// non-finite value.
    pub fn grad_norm_sq(&self) -> (f64, Option<String>) {
        let mut total = 0.0f64;
        let mut bad = None;
        for (name, g) in self.grads.named() {
            let s: f64 = g.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            if !s.is_finite() && bad.is_none() {
                bad = Some(name);
            }
            total += s;
        }
        for (l, grads) in self.ffn_grads.iter().enumerate() {
            for g in &grads.params {
                let s = crate::optim::sum_sq(g);
                if !s.is_finite() && bad.is_none() {
                    bad = Some(format!("blocks.{l}.ffn.{}", g.name));
                }
                total += s;
            }
        }
        (total, bad)
    }

    /// One AdamW step on every parameter with the gradients of the last backward times `scale` (the clip
    /// factor); matrices and embeddings decay, norm weights do not. Call [`AdamW::begin_step`] first.
    ///
    /// # Errors
    /// As [`AdamW::update`] and [`DeviceLayer::apply_update`].
    pub fn apply_adamw(&mut self, opt: &mut AdamW, scale: f32) -> Result<(), TrainError> {
        for ((name, p), (_, g)) in self.params.named_mut().into_iter().zip(self.grads.named()) {
            let decay = p.ndim() >= 2;
            opt.update(&name, p, g, scale, decay)?;
        }
        for (l, layer) in self.ffn.iter_mut().enumerate() {
            let prefix = format!("blocks.{l}.ffn.");
            layer.apply_update(&self.ffn_grads[l].params, &mut |p, g| {
                opt.update_layer_param(&prefix, p, g, scale)
            })?;
        }
        Ok(())
    }

    /// The loss terms of one batch in train mode without a backward (for gradient checks): `ce + aux` is the
    /// loss whose gradient [`Lm::forward_backward`] computes.
    ///
    /// # Errors
    /// As [`Lm::forward_backward`].
    pub fn train_loss(
        &mut self,
        batch: &Batch,
        seed: u64,
        aux: AuxOverride,
    ) -> Result<StepStats, TrainError> {
        Ok(self.forward(batch, Some(seed), aux, 0)?.0)
    }

    /// The routers' once-per-step update of state learned without gradient (correction bias, running
    /// statistics) from the last training forward; call after the optimizer step.
    ///
    /// # Errors
    /// As [`DeviceLayer::update_state`].
    pub fn update_router_state(&mut self, seed: u64, bias_rate: f32) -> Result<(), TrainError> {
        for l in 0..self.cfg.n_layers {
            let Some(routing) = self.routings[l].take() else {
                continue;
            };
            let b = &self.ws.blocks[l];
            let input = RouterInput::new(b.f.view())
                .with_token_ids(&self.ws.tokens)
                .with_seq_lens(&self.ws.seq_lens)
                .with_mode(Mode::Train {
                    seed: splitmix64(seed ^ splitmix64(l as u64)),
                });
            self.ffn[l].update_state(&input, &routing, bias_rate)?;
        }
        Ok(())
    }
}

/// A block's attention half and the FFN's input: `a = rmsnorm(x_in) ⊙ attn_norm`, `qkv`, attention,
/// `x_mid = x_in + o · projᵀ`, `f = rmsnorm(x_mid) ⊙ ffn_norm`.
fn attention_half(
    p: &BlockParams,
    b: &mut BlockActs,
    scratch: &mut Vec<f32>,
    shape: AttnShape,
    eps: f32,
) -> Result<(), TrainError> {
    ops::rmsnorm(
        b.a.view_mut(),
        &mut b.inv1,
        b.x_in.view(),
        p.attn_norm.view(),
        eps,
    );
    ops::linear(b.qkv.view_mut(), b.a.view(), p.qkv.view())?;
    ops::attention(b.o.view_mut(), &mut b.probs, scratch, b.qkv.view(), shape)?;
    ops::linear(b.x_mid.view_mut(), b.o.view(), p.proj.view())?;
    ops::add_assign(b.x_mid.view_mut(), b.x_in.view());
    ops::rmsnorm(
        b.f.view_mut(),
        &mut b.inv2,
        b.x_mid.view(),
        p.ffn_norm.view(),
        eps,
    );
    Ok(())
}

/// The final norm, the tied head and the mean cross-entropy (its gradient left in `ws.logits` when `grad`); a
/// non-finite loss names the first block whose output is not finite.
fn head_forward(
    ws: &mut Workspace,
    p: &DenseParams,
    targets: &[u32],
    grad: bool,
    eps: f32,
    step: usize,
) -> Result<f64, TrainError> {
    ops::rmsnorm(
        ws.h.view_mut(),
        &mut ws.inv_f,
        ws.x_out.view(),
        p.norm.view(),
        eps,
    );
    ops::linear(ws.logits.view_mut(), ws.h.view(), p.tok_emb.view())?;
    let ce = ops::cross_entropy(ws.logits.view_mut(), targets, grad)?;
    if !ce.is_finite() {
        let layer = ws
            .blocks
            .iter()
            .skip(1)
            .map(|b| &b.x_in)
            .chain(std::iter::once(&ws.x_out))
            .position(|x| !ops::all_finite(x.view()));
        return Err(TrainError::NonFinite {
            step,
            layer,
            what: "loss".into(),
        });
    }
    Ok(ce)
}

/// A non-finite value an MoE layer (or the dense baseline's) refused becomes [`TrainError::NonFinite`] naming the step and the layer.
fn non_finite_at(e: MoeError, step: usize, layer: usize, what: &str) -> TrainError {
    match e {
        MoeError::NonFinite { .. } => TrainError::NonFinite {
            step,
            layer: Some(layer),
            what: format!("{what} ({e})"),
        },
        other => other.into(),
    }
}

/// The load statistics of one plan.
fn layer_stats(r: &Routing) -> LayerStats {
    let diag = r.diagnostics();
    let max_logit = r
        .logits()
        .map(|l| l.iter().fold(0.0f64, |m, &v| m.max(f64::from(v.abs()))))
        .unwrap_or(0.0);
    LayerStats {
        counts: r.expert_counts(),
        cv: diag.cv,
        dropped: diag.dropped_fraction,
        max_logit,
    }
}
