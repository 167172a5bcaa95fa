//! `moe compare`: one workload, several routers, one row each.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use moe_core::{AuxLoss, Mode, RouterInput, RouterRegistry, WorkloadConfig};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};
use crate::spec::parse_routers;

/// Loads per expert are printed (and kept in JSON) up to this many experts.
const MAX_LOAD_COLUMNS: usize = 64;

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Routers to compare: `all`, or a comma list of `name[:key=value,...]`
    /// (e.g. `softmax-topk:preset=deepseek_v3,switch-top1:capacity_factor=1.25`).
    #[arg(long, default_value = "all")]
    routers: String,
    /// Tokens T of the synthetic workload.
    #[arg(long, short = 't', default_value_t = 4096)]
    tokens: usize,
    /// Hidden width d.
    #[arg(long, short = 'd', default_value_t = 512)]
    d_model: usize,
    /// Experts E.
    #[arg(long, short = 'e', default_value_t = 16)]
    experts: usize,
    /// Experts per token k (routers may override it through their options).
    #[arg(long, short = 'k', default_value_t = 2)]
    top_k: usize,
    /// Zipf exponent of cluster sizes and token ids (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    skew: f64,
    /// Number of Gaussian clusters in the workload.
    #[arg(long, default_value_t = 32)]
    clusters: usize,
    /// Seed of the workload and of the routers' parameters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Route in training mode with this noise seed (noise, jitter); eval mode if absent.
    #[arg(long)]
    train_seed: Option<u64>,
    /// Timed repetitions of each routing (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeats: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// The workload of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// Always `synthetic-gaussian-mixture` for now.
    pub kind: String,
    /// Tokens T.
    pub tokens: usize,
    /// Hidden width d.
    pub d_model: usize,
    /// Experts E.
    pub experts: usize,
    /// Default experts per token k.
    pub top_k: usize,
    /// Zipf exponent.
    pub skew: f64,
    /// Seed.
    pub seed: u64,
    /// `eval` or `train`.
    pub mode: String,
}

/// One router's row: load statistics of its plan and its routing time.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Router label (`name` or `name:options`).
    pub router: String,
    /// Whether the router is causal.
    pub causal: bool,
    /// Kept assignments.
    pub kept: usize,
    /// Smallest tokens-per-expert.
    pub min_load: usize,
    /// Largest tokens-per-expert.
    pub max_load: usize,
    /// Mean tokens-per-expert.
    pub mean_load: f64,
    /// Coefficient of variation of the loads.
    pub cv: f64,
    /// Max load over mean load.
    pub max_over_mean: f64,
    /// Dropped assignments over all assignments, in percent.
    pub dropped_pct: f64,
    /// Experts with no token.
    pub dead_experts: usize,
    /// Load entropy / ln E.
    pub load_entropy: f64,
    /// Share of assignments on the busiest 20 % of experts.
    pub top20_share: f64,
    /// Median routing time, milliseconds.
    pub route_ms: f64,
    /// Median routing time per token, microseconds.
    pub route_us_per_token: f64,
    /// Auxiliary losses the router reported.
    pub aux_losses: Vec<AuxLoss>,
    /// Tokens per expert (omitted above 64 experts).
    pub loads: Option<Vec<usize>>,
}

/// The `--format json` document of `moe compare`.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The workload.
    pub workload: WorkloadReport,
    /// One row per router, in the order asked for.
    pub rows: Vec<CompareRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

pub(crate) fn run(registry: &RouterRegistry, a: &CompareArgs) -> Result<(), CliError> {
    let choices = parse_routers(&a.routers, registry)?;
    if a.top_k == 0 || a.top_k > a.experts {
        return Err(CliError::Usage(format!(
            "--top-k must be between 1 and --experts ({}), got {}",
            a.experts, a.top_k
        )));
    }
    let cfg = WorkloadConfig {
        tokens: a.tokens,
        d_model: a.d_model,
        clusters: a.clusters,
        skew: a.skew,
        seed: a.seed,
        ..Default::default()
    };
    let w = cfg.generate()?;
    let mode = match a.train_seed {
        Some(seed) => Mode::Train { seed },
        None => Mode::Eval,
    };
    let mut rows = Vec::with_capacity(choices.len());
    for c in &choices {
        let router = registry
            .create(&c.name, &c.args(a.d_model, a.experts, a.top_k, a.seed))
            .map_err(|e| match e {
                moe_core::MoeError::InvalidConfig { .. } => {
                    let opts = registry
                        .get(&c.name)
                        .map(|r| {
                            r.options
                                .iter()
                                .map(|o| o.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    CliError::Usage(format!("{}: {e}; its options are: {opts}", c.label))
                }
                other => CliError::from(other),
            })?;
        if !router.is_causal() {
            eprintln!(
                "warning: {} is not causal: it routes each token using the whole batch, so it leaks future tokens in autoregressive decoding",
                c.label
            );
        }
        let input = RouterInput::new(w.hidden.view())
            .with_token_ids(&w.token_ids)
            .with_mode(mode);
        let mut times = Vec::with_capacity(a.repeats as usize);
        let mut plan = None;
        for _ in 0..a.repeats {
            let t0 = Instant::now();
            let p = router
                .route(&input)
                .map_err(CliError::from)
                .map_err(|e| match e {
                    CliError::Usage(m) => CliError::Usage(format!("{}: {m}", c.label)),
                    CliError::Other(o) => {
                        CliError::Other(o.context(format!("routing with {}", c.label)))
                    }
                })?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            plan = Some(p);
        }
        let plan = plan.context("no routing was run")?;
        let d = plan.diagnostics();
        let ms = median(times);
        rows.push(CompareRow {
            router: c.label.clone(),
            causal: router.is_causal(),
            kept: d.kept,
            min_load: d.min_load,
            max_load: d.max_load,
            mean_load: d.mean_load,
            cv: d.cv,
            max_over_mean: d.max_over_mean,
            dropped_pct: 100.0 * d.dropped_fraction,
            dead_experts: d.dead_experts,
            load_entropy: d.load_entropy,
            top20_share: d.top20_share,
            route_ms: ms,
            route_us_per_token: if a.tokens > 0 {
                ms * 1e3 / a.tokens as f64
            } else {
                0.0
            },
            aux_losses: plan.aux_losses().to_vec(),
            loads: (plan.n_experts() <= MAX_LOAD_COLUMNS).then(|| plan.expert_counts()),
        });
    }
    let report = CompareReport {
        workload: WorkloadReport {
            kind: "synthetic-gaussian-mixture".into(),
            tokens: a.tokens,
            d_model: a.d_model,
            experts: a.experts,
            top_k: a.top_k,
            skew: a.skew,
            seed: a.seed,
            mode: match mode {
                Mode::Eval => "eval".into(),
                Mode::Train { seed } => format!("train (seed {seed})"),
            },
        },
        rows,
    };
    print(&report, a.format)
}

fn print(r: &CompareReport, format: Format) -> Result<(), CliError> {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).context("serialising the report")?
        );
        return Ok(());
    }
    let mut t = Table::new(&[
        "router",
        "min",
        "max",
        "mean",
        "cv",
        "max/mean",
        "dropped %",
        "dead",
        "entropy",
        "top20 %",
        "route ms",
        "us/token",
    ]);
    for row in &r.rows {
        t.push(vec![
            row.router.clone(),
            row.min_load.to_string(),
            row.max_load.to_string(),
            format!("{:.1}", row.mean_load),
            format!("{:.3}", row.cv),
            format!("{:.2}", row.max_over_mean),
            format!("{:.2}", row.dropped_pct),
            row.dead_experts.to_string(),
            format!("{:.3}", row.load_entropy),
            format!("{:.1}", 100.0 * row.top20_share),
            format!("{:.2}", row.route_ms),
            format!("{:.3}", row.route_us_per_token),
        ]);
    }
    if format == Format::Table {
        let w = &r.workload;
        println!(
            "workload: {} tokens, d = {}, E = {}, k = {}, Zipf skew {}, seed {}, {}",
            w.tokens, w.d_model, w.experts, w.top_k, w.skew, w.seed, w.mode
        );
        println!();
    }
    print!("{}", t.render(format));
    if format == Format::Table {
        if let Some(e) = r
            .rows
            .iter()
            .find_map(|row| row.loads.as_ref().map(Vec::len))
        {
            let mut headers = vec!["tokens per expert".to_string()];
            headers.extend((0..e).map(|i| i.to_string()));
            let mut lt = Table {
                headers,
                rows: Vec::new(),
            };
            for row in &r.rows {
                if let Some(l) = &row.loads {
                    let mut cells = vec![row.router.clone()];
                    cells.extend(l.iter().map(|c| c.to_string()));
                    lt.push(cells);
                }
            }
            println!();
            print!("{}", lt.render(format));
        }
    }
    Ok(())
}
