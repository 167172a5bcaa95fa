//! What a training run is: the model ([`LmConfig`], [`FfnConfig`]), the optimizer ([`OptimConfig`]) and the loop
//! ([`TrainConfig`]). Defaults are the `charlm` configuration of `moe train` (see the crate docs for why).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use moe_core::{Activation, MoeError};

/// The experts' kind, shared by the MoE layers and the dense baseline (one expert of width `k · F`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BankKind {
    /// Two-layer MLP `act(x · w1ᵀ) · w2ᵀ`, no biases (nanoGPT's MLP without biases); `act` GELU (exact erf).
    Mlp,
    /// SwiGLU `(silu(x · gateᵀ) ⊙ (x · upᵀ)) · downᵀ` (Mixtral, Qwen, OLMoE).
    Swiglu,
}

impl BankKind {
    /// Parses `mlp` or `swiglu`.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] for another name.
    pub fn parse(name: &str) -> Result<Self, MoeError> {
        match name {
            "mlp" => Ok(BankKind::Mlp),
            "swiglu" => Ok(BankKind::Swiglu),
            other => Err(MoeError::config("bank", other, "one of: mlp, swiglu")),
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            BankKind::Mlp => "mlp",
            BankKind::Swiglu => "swiglu",
        }
    }

    /// The hidden activation.
    pub fn activation(self) -> Activation {
        match self {
            BankKind::Mlp => Activation::Gelu,
            BankKind::Swiglu => Activation::Silu,
        }
    }

    /// Parameters of one expert of width `f` on width `d` (`2·f·d` for an MLP, `3·f·d` for SwiGLU).
    pub fn expert_params(self, d: usize, f: usize) -> usize {
        match self {
            BankKind::Mlp => 2 * f * d,
            BankKind::Swiglu => 3 * f * d,
        }
    }
}

/// The FFN of every block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FfnKind {
    /// One expert of width `top_k · expert_width` that every token takes with weight 1: the dense baseline at
    /// equal active parameters.
    Dense,
    /// An MoE layer routed by a registered router (built-in or plugin).
    Moe {
        /// The router's registry name.
        router: String,
        /// Its options, as `name:key=value` on the command line.
        options: Map<String, Value>,
    },
}

/// The FFN of every block: its kind and the experts' shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FfnConfig {
    /// Dense or MoE.
    pub kind: FfnKind,
    /// Experts' kind.
    pub bank: BankKind,
    /// Experts per layer `E` (ignored by the dense baseline).
    pub experts: usize,
    /// Experts per token `k`: the dense baseline's width is `k · expert_width`.
    pub top_k: usize,
    /// Hidden width of one expert `F`.
    pub expert_width: usize,
}

impl FfnConfig {
    /// The default `charlm` FFN of kind `kind`: 8 MLP experts of width 256, top-2 (the MoE measurement;
    /// the dense baseline is then one MLP of width 512, nanoGPT's `4 · d` at d = 128).
    pub fn charlm(kind: FfnKind) -> Self {
        FfnConfig {
            kind,
            bank: BankKind::Mlp,
            experts: 8,
            top_k: 2,
            expert_width: 256,
        }
    }

    /// A label for tables: the router spec as typed, or `dense`.
    pub fn label(&self) -> String {
        match &self.kind {
            FfnKind::Dense => "dense".into(),
            FfnKind::Moe { router, options } if options.is_empty() => router.clone(),
            FfnKind::Moe { router, options } => {
                let opts: Vec<String> = options
                    .iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        v => format!("{k}={v}"),
                    })
                    .collect();
                format!("{router}:{}", opts.join(","))
            }
        }
    }
}

/// The decoder-only language model (and, for the teacher task, the student's width and experts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmConfig {
    /// Vocabulary: 256 (bytes).
    pub vocab: usize,
    /// Width `d`.
    pub d_model: usize,
    /// Blocks.
    pub n_layers: usize,
    /// Attention heads (`d` divisible by it).
    pub n_heads: usize,
    /// Context length `C` (tokens per sequence; learned positions `[C, d]`).
    pub context: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// The FFN of every block.
    pub ffn: FfnConfig,
}

impl LmConfig {
    /// The default `charlm` model with the given FFN: nanoGPT's CPU configuration (4 layers, 4 heads, width 128,
    /// context 64), byte-level.
    pub fn charlm(ffn: FfnConfig) -> Self {
        LmConfig {
            vocab: 256,
            d_model: 128,
            n_layers: 4,
            n_heads: 4,
            context: 64,
            norm_eps: 1e-5,
            ffn,
        }
    }

    /// Checks the sizes (before anything is allocated).
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), MoeError> {
        let check = |name: &str, v: usize, min: usize, max: usize| {
            if v < min || v > max {
                Err(MoeError::config(
                    name,
                    v.to_string(),
                    format!("an integer in [{min}, {max}]"),
                ))
            } else {
                Ok(())
            }
        };
        check("vocab", self.vocab, 2, 1 << 16)?;
        check("d_model", self.d_model, 1, 8192)?;
        check("layers", self.n_layers, 1, 64)?;
        check("heads", self.n_heads, 1, 256)?;
        check("context", self.context, 1, 8192)?;
        check("experts", self.ffn.experts, 1, 1 << 16)?;
        check("top_k", self.ffn.top_k, 1, self.ffn.experts.max(1))?;
        check("expert_width", self.ffn.expert_width, 1, 1 << 16)?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(MoeError::config(
                "heads",
                self.n_heads.to_string(),
                format!("a divisor of d_model = {}", self.d_model),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(MoeError::config(
                "norm_eps",
                self.norm_eps.to_string(),
                "finite and > 0",
            ));
        }
        Ok(())
    }
}

/// AdamW with decoupled weight decay (Loshchilov & Hutter 2019; `torch.optim.AdamW`), a linear warm-up and a cosine
/// decay to `min_lr` (nanoGPT's schedule), and clipping of the global gradient norm (`torch.nn.utils.clip_grad_norm_`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f32,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f32,
    /// Warm-up steps (linear from `lr / warmup` to `lr`).
    pub warmup: usize,
    /// Adam β₁.
    pub beta1: f32,
    /// Adam β₂.
    pub beta2: f32,
    /// Adam ε.
    pub eps: f32,
    /// Decoupled weight decay, applied to matrices and embeddings (parameters of 2 or more axes), not to norms.
    pub weight_decay: f32,
    /// Largest global gradient L2 norm; 0 disables clipping.
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    /// nanoGPT's `shakespeare_char` settings (100 warm-up steps, β = (0.9, 0.99), weight decay 0.1, clip 1.0)
    /// with twice its learning rate, 2e-3 → 2e-4: on the 42 plays, 2,000 steps, the same batches and validation
    /// set, the dense baseline ends at 1.814 nats/byte with 2e-3 against 1.881 with nanoGPT's 1e-3 (our model has
    /// RMSNorm and no biases).
    fn default() -> Self {
        OptimConfig {
            lr: 2e-3,
            min_lr: 2e-4,
            warmup: 100,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// The training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per batch `B` (tokens per step = `B · C`).
    pub batch: usize,
    /// Steps between validation passes (and the last step).
    pub eval_interval: usize,
    /// Batches of the fixed validation set.
    pub eval_batches: usize,
    /// Seed of the initial weights, the batches and the routers' noise.
    pub seed: u64,
    /// Rate of the routers' updates learned without gradient (DeepSeek-V3's correction bias `γ`).
    pub bias_rate: f32,
    /// Replaces the coefficient of every load-balancing aux loss (`None`: each router's own).
    pub aux_coef: Option<f32>,
    /// Replaces the coefficient of every z-loss (`None`: each router's own).
    pub z_coef: Option<f32>,
    /// The optimizer.
    pub optim: OptimConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 2000,
            batch: 12,
            eval_interval: 250,
            eval_batches: 20,
            seed: 1337,
            bias_rate: 1e-3,
            aux_coef: None,
            z_coef: None,
            optim: OptimConfig::default(),
        }
    }
}
