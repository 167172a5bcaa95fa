//! Workload flags shared by `compare` and `route`: the embedded synthetic workload and its parameters.

use std::path::PathBuf;

use clap::Args;
use moe_core::{Mode, RouterInput, WorkloadConfig};
use ndarray::Array2;

use crate::CliError;

/// The synthetic workload: a seeded Gaussian mixture with Zipf-distributed cluster sizes and Zipf token ids.
#[derive(Debug, Clone, Args)]
pub(crate) struct WorkloadArgs {
    /// Tokens T of the workload.
    #[arg(long = "num-tokens", short = 't', default_value_t = 4096)]
    pub tokens: usize,
    /// Hidden width d.
    #[arg(long, short = 'd', default_value_t = 512)]
    pub d_model: usize,
    /// Experts E.
    #[arg(long, short = 'e', default_value_t = 16)]
    pub experts: usize,
    /// Experts per token k (routers may override it through their options).
    #[arg(long, short = 'k', default_value_t = 2)]
    pub top_k: usize,
    /// Zipf exponent of cluster sizes and token ids (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    pub skew: f64,
    /// Number of Gaussian clusters in the workload.
    #[arg(long, default_value_t = 32)]
    pub clusters: usize,
    /// Seed of the workload and of the routers' and experts' parameters.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Route in training mode with this noise seed (noise, jitter); eval mode if absent.
    #[arg(long)]
    pub train_seed: Option<u64>,
    /// Real hidden states instead of the synthetic workload: a safetensors file with a `[T, d]` (or `[B, S, d]`)
    /// tensor `hidden_states` and optional `token_ids`, or a `.npy` float array. T and d come from the file.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// The tokens to route: hidden states `[T, d]` and, when known, token ids.
pub(crate) struct Tokens {
    pub hidden: Array2<f32>,
    pub token_ids: Option<Vec<u32>>,
    /// `synthetic-gaussian-mixture` or `file:PATH`.
    pub source: String,
}

impl Tokens {
    /// The router input over these tokens.
    pub(crate) fn input(&self, mode: Mode) -> RouterInput<'_> {
        let i = RouterInput::new(self.hidden.view()).with_mode(mode);
        match &self.token_ids {
            Some(ids) => i.with_token_ids(ids),
            None => i,
        }
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.hidden.nrows()
    }

    pub(crate) fn d_model(&self) -> usize {
        self.hidden.ncols()
    }
}

impl WorkloadArgs {
    /// Checks the flags and generates the workload, or reads `--input`.
    pub(crate) fn generate(&self) -> Result<Tokens, CliError> {
        if self.experts == 0 {
            return Err(CliError::Usage("--experts must be at least 1".into()));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(CliError::Usage(format!(
                "--top-k must be between 1 and --experts ({}), got {}",
                self.experts, self.top_k
            )));
        }
        if let Some(path) = &self.input {
            let h = moe_models::hidden::load_hidden(path)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            return Ok(Tokens {
                hidden: h.hidden,
                token_ids: h.token_ids,
                source: format!("file:{}", path.display()),
            });
        }
        let cfg = WorkloadConfig {
            tokens: self.tokens,
            d_model: self.d_model,
            clusters: self.clusters,
            skew: self.skew,
            seed: self.seed,
            ..Default::default()
        };
        let w = cfg.generate()?;
        Ok(Tokens {
            hidden: w.hidden,
            token_ids: Some(w.token_ids),
            source: "synthetic-gaussian-mixture".into(),
        })
    }

    /// Train or eval.
    pub(crate) fn mode(&self) -> Mode {
        match self.train_seed {
            Some(seed) => Mode::Train { seed },
            None => Mode::Eval,
        }
    }

    /// `eval` or `train (seed N)`.
    pub(crate) fn mode_name(&self) -> String {
        match self.mode() {
            Mode::Eval => "eval".into(),
            Mode::Train { seed } => format!("train (seed {seed})"),
        }
    }
}
