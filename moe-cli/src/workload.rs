//! Workload flags shared by `compare` and `route`: the embedded synthetic workload and its parameters.

use clap::Args;
use moe_core::{Mode, Workload, WorkloadConfig};

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
}

impl WorkloadArgs {
    /// Checks the flags and generates the workload.
    pub(crate) fn generate(&self) -> Result<Workload, CliError> {
        if self.experts == 0 {
            return Err(CliError::Usage("--experts must be at least 1".into()));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(CliError::Usage(format!(
                "--top-k must be between 1 and --experts ({}), got {}",
                self.experts, self.top_k
            )));
        }
        let cfg = WorkloadConfig {
            tokens: self.tokens,
            d_model: self.d_model,
            clusters: self.clusters,
            skew: self.skew,
            seed: self.seed,
            ..Default::default()
        };
        Ok(cfg.generate()?)
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
