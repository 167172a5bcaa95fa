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
    /// Real hidden states instead of the synthetic workload. safetensors: `hidden_states` (or `hidden`, `x`, or
    /// the only float tensor) shaped `[T, d]` or `[B, S, d]` (B sequences of S tokens), optional `token_ids` /
    /// `input_ids` (`[T]` or `[B, S]`), `attention_mask` (1 = token, 0 = padding) or `padding_mask` (1 =
    /// padding), and `seq_lens` / `sequence_lengths` (`[B]`: tokens per sequence; with `[T, d]` they split the
    /// rows). `.npy`: a float32/float64 `[T, d]` or `[B, S, d]` array alone. T and d come from the file; without
    /// sequence boundaries a `[T, d]` file is one sequence, and hash routing needs token ids.
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// Largest `--clusters`.
pub(crate) const MAX_CLUSTERS: usize = 1 << 20;
/// Largest `--experts`.
pub(crate) const MAX_EXPERTS: usize = 1 << 20;
/// Hard ceiling of the memory estimate when the available memory cannot be read (64 GiB).
const MAX_ESTIMATE_BYTES: u128 = 1 << 36;

/// The memory a run will need, by part, checked before any allocation against the available memory.
#[derive(Debug, Default)]
pub(crate) struct MemoryEstimate {
    parts: Vec<(String, u128)>,
}

impl MemoryEstimate {
    /// Adds `values` f32 values (×`copies`) for `what`.
    pub(crate) fn add(&mut self, what: &str, values: u128, copies: u128) -> &mut Self {
        self.parts.push((what.to_string(), values * copies * 4));
        self
    }

    /// Total bytes.
    pub(crate) fn total(&self) -> u128 {
        self.parts.iter().map(|(_, b)| *b).sum()
    }

    /// Refuses (usage error) when the total exceeds the available memory (`MemAvailable` of /proc/meminfo) or,
    /// where that cannot be read, 64 GiB; the message names the largest part and the limit.
    pub(crate) fn check(&self) -> Result<(), CliError> {
        let (limit, name) = match available_memory() {
            Some(b) => (b.min(MAX_ESTIMATE_BYTES), "the available memory"),
            None => (MAX_ESTIMATE_BYTES, "the 64 GiB limit"),
        };
        let total = self.total();
        if total <= limit {
            return Ok(());
        }
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|(_, b)| *b >= 1 << 20)
            .map(|(w, b)| format!("{w} {}", gib(*b)))
            .collect();
        Err(CliError::Usage(format!(
            "this run needs about {} of memory ({}), over {name} ({}); use fewer tokens, experts or a smaller width",
            gib(total),
            parts.join(", "),
            gib(limit)
        )))
    }
}

fn gib(b: u128) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks a count flag against `1..=max` as a usage error naming the flag.
pub(crate) fn check_range(flag: &str, v: usize, min: usize, max: usize) -> Result<(), CliError> {
    if v < min || v > max {
        // Without a real upper bound (the memory estimate decides), say only the lower one.
        return Err(CliError::Usage(if max == usize::MAX {
            format!("{flag} must be at least {min}, got {v}")
        } else {
            format!("{flag} must be between {min} and {max}, got {v}")
        }));
    }
    Ok(())
}

/// The routing part of an estimate: the hidden states, the gate `[E, d]`, and logits, scores and ranking
/// buffers `[T, E]` (counted four times, the routers' peak).
pub(crate) fn routing_estimate(t: usize, d: usize, e: usize) -> MemoryEstimate {
    let mut m = MemoryEstimate::default();
    m.add("hidden states T·d", t as u128 * d as u128, 1)
        .add("gate E·d", e as u128 * d as u128, 1)
        .add("routing 4·T·E", t as u128 * e as u128, 4);
    m
}

/// The tokens to route: hidden states `[T, d]` and, when known, token ids, sequence lengths and padding.
pub(crate) struct Tokens {
    pub hidden: Array2<f32>,
    pub token_ids: Option<Vec<u32>>,
    pub seq_lens: Option<Vec<usize>>,
    pub padding: Option<Vec<bool>>,
    /// `synthetic-gaussian-mixture` or `file:PATH`.
    pub source: String,
}

impl Tokens {
    /// The router input over these tokens.
    pub(crate) fn input(&self, mode: Mode) -> RouterInput<'_> {
        let mut i = RouterInput::new(self.hidden.view()).with_mode(mode);
        if let Some(ids) = &self.token_ids {
            i = i.with_token_ids(ids);
        }
        if let Some(l) = &self.seq_lens {
            i = i.with_seq_lens(l);
        }
        if let Some(p) = &self.padding {
            i = i.with_padding(p);
        }
        i
    }

    /// Whether the input says where its sequences begin (`[B, S, d]` or sequence lengths).
    pub(crate) fn has_sequences(&self) -> bool {
        self.seq_lens.is_some()
    }

    pub(crate) fn n_tokens(&self) -> usize {
        self.hidden.nrows()
    }

    pub(crate) fn d_model(&self) -> usize {
        self.hidden.ncols()
    }
}

/// A note when a router option needs structure the input lacks: `per_sequence=true` on an input without sequence
/// boundaries (it then counts capacity over one sequence of T tokens).
pub(crate) fn structure_note(
    options: &serde_json::Map<String, serde_json::Value>,
    w: &Tokens,
) -> Option<String> {
    let per_seq = options.get("per_sequence").is_some_and(|v| {
        v.as_bool() == Some(true) || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("true"))
    });
    (per_seq && !w.has_sequences()).then(|| {
        format!(
            "per_sequence=true, but the input has no sequence boundaries ({}), so its {} tokens are treated as one sequence",
            if w.source.starts_with("file:") {
                "a [T, d] tensor without seq_lens; give [B, S, d] or a seq_lens tensor"
            } else {
                "the synthetic workload is one sequence"
            },
            w.n_tokens()
        )
    })
}

impl WorkloadArgs {
    /// Checks the flags and generates the workload, or reads `--input`.
    pub(crate) fn generate(&self) -> Result<Tokens, CliError> {
        self.generate_with(&MemoryEstimate::default())
    }

    /// [`Self::generate`], with `extra` (expert weights, outputs) added to the memory estimate checked first.
    pub(crate) fn generate_with(&self, extra: &MemoryEstimate) -> Result<Tokens, CliError> {
        check_range("--experts", self.experts, 1, MAX_EXPERTS)?;
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(CliError::Usage(format!(
                "--top-k must be between 1 and --experts ({}), got {}",
                self.experts, self.top_k
            )));
        }
        if let Some(path) = &self.input {
            let h = moe_models::hidden::load_hidden(path)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let (t, d) = h.hidden.dim();
            let mut m = routing_estimate(t, d, self.experts);
            m.parts.extend(extra.parts.iter().cloned());
            m.check()?;
            return Ok(Tokens {
                hidden: h.hidden,
                token_ids: h.token_ids,
                seq_lens: h.seq_lens,
                padding: h.padding,
                source: format!("file:{}", path.display()),
            });
        }
        check_range("--d-model", self.d_model, 1, usize::MAX)?;
        check_range("--clusters", self.clusters, 1, MAX_CLUSTERS)?;
        let values = self.tokens as u128 * self.d_model as u128;
        if values > moe_core::workload::MAX_WORKLOAD_VALUES {
            return Err(CliError::Usage(format!(
                "--num-tokens × --d-model = {values} values, over the limit of 2^32 (T·d)"
            )));
        }
        let mut m = routing_estimate(self.tokens, self.d_model, self.experts);
        m.add(
            "workload centres clusters·d",
            self.clusters as u128 * self.d_model as u128,
            1,
        );
        m.parts.extend(extra.parts.iter().cloned());
        m.check()?;
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
            seq_lens: None,
            padding: None,
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
