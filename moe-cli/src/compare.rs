//! `moe compare`: one workload, several routers, one row each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use moe_core::{
    AuxLoss, DeviceLayer, MoeLayer, RouterRegistry, Routing, workload::random_swiglu_bank,
};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};
use crate::spec::{parse_config_file, parse_routers};
use crate::workload::WorkloadArgs;

/// Loads per expert are printed (and kept in JSON) up to this many experts.
const MAX_LOAD_COLUMNS: usize = 64;

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Routers to compare: `all`, or a comma list of `name[:key=value,...]`
    /// (e.g. `softmax-topk:preset=deepseek_v3,switch-top1:capacity_factor=1.25,drop=probability`).
    #[arg(long, default_value = "all", conflicts_with = "config")]
    routers: String,
    /// A TOML file of router configs (`[[router]]` tables with `name`, optional `label` and `options`).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    ep: crate::ep::EpArgs,
    /// Backend that runs the full layer (`cpu`; `cuda`, `wgpu` where built).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// FFN width f of the synthetic SwiGLU experts used for the full-layer time.
    #[arg(long, default_value_t = 256)]
    ffn: usize,
    /// Skip the full-layer timing (routing only).
    #[arg(long)]
    no_layer: bool,
    /// Timed repetitions of each routing (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeats: u32,
    /// Timed repetitions of each full-layer forward (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    layer_repeats: u32,
    /// Write each router's load per expert as an SVG bar chart.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// The workload of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    /// `synthetic-gaussian-mixture` or `file:PATH` (`--input`).
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
    /// `eval` or `train (seed N)`.
    pub mode: String,
    /// Backend of the full-layer timing.
    pub backend: String,
    /// FFN width of the synthetic experts (full-layer timing).
    pub ffn: usize,
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
    /// Mean kept experts per (non-padding) token.
    pub experts_per_token_mean: f64,
    /// Fewest kept experts of any token.
    pub experts_per_token_min: usize,
    /// Most kept experts of any token.
    pub experts_per_token_max: usize,
    /// Tokens that got no expert at all (their routed output is 0).
    pub tokens_without_expert: usize,
    /// Median routing time, milliseconds.
    pub route_ms: f64,
    /// Median routing time per token, microseconds.
    pub route_us_per_token: f64,
    /// Median full-layer forward time (routing + experts + combine), milliseconds; absent with `--no-layer`.
    pub layer_ms: Option<f64>,
    /// Median full-layer time per token, microseconds.
    pub layer_us_per_token: Option<f64>,
    /// Where the backend ran the routing in the layer forward (`native` or `host`).
    pub router_path: Option<String>,
    /// Auxiliary losses the router reported.
    pub aux_losses: Vec<AuxLoss>,
    /// Tokens per expert (omitted above 64 experts).
    pub loads: Option<Vec<usize>>,
    /// Expert-parallel cost per `--ep-ranks` value, in that order (omitted without the flag).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ep: Vec<crate::ep::EpRow>,
}

/// The `--format json` document of `moe compare`.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The workload.
    pub workload: WorkloadReport,
    /// One row per router, in the order asked for.
    pub rows: Vec<CompareRow>,
    /// The network of the expert-parallel cost (`--ep-network`; omitted without `--ep-ranks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ep_network: Option<moe_ep::Network>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn timed<T>(
    repeats: u32,
    mut f: impl FnMut() -> Result<T, CliError>,
) -> Result<(f64, T), CliError> {
    let mut times = Vec::with_capacity(repeats as usize);
    let mut last = None;
    for _ in 0..repeats.max(1) {
        let t0 = Instant::now();
        last = Some(f()?);
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let out = last.context("nothing was run")?;
    Ok((median(times), out))
}

pub(crate) fn run(registry: &RouterRegistry, a: &CompareArgs) -> Result<(), CliError> {
    if let Some(p) = &a.plot {
        crate::cache_sim::check_output("--plot", p)?;
    }
    let choices = match &a.config {
        Some(path) => parse_config_file(path, registry)?,
        None => parse_routers(&a.routers, registry)?,
    };
    let wa = &a.workload;
    let w = generate_checked(a)?;
    let (n_tokens, d_model) = (w.n_tokens(), w.d_model());
    let network = a.ep.network(n_tokens, wa.experts)?;
    // The default set skips the routers this input cannot run (hash without token ids, peer with a non-square
    // E) with a note; a router asked for by name fails the command instead.
    let skip_unrunnable = a.config.is_none() && a.routers.trim() == "all";
    let backend = if a.no_layer {
        None
    } else {
        Some(crate::open_backend(&a.backend)?)
    };
    let bank = match backend {
        Some(_) => Some(random_swiglu_bank(wa.experts, d_model, a.ffn, wa.seed)?),
        None => None,
    };
    // One resident bank for every router: uploaded with the first router, then only the router is swapped.
    let mut resident: Option<Box<dyn DeviceLayer>> = None;
    let input = w.input(wa.mode());
    let progress = crate::progress::Progress::new(choices.len() as u64);
    let mut rows = Vec::with_capacity(choices.len());
    let mut plot_rows: Vec<(String, Vec<usize>)> = Vec::new();
    for c in &choices {
        progress.step(&c.label);
        if let Some(note) = crate::workload::structure_note(&c.options, &w) {
            progress.println(&format!("note: {}: {note}", c.label));
        }
        let err = c.error_mapper(registry);
        let created = registry
            .create(&c.name, &c.args(d_model, wa.experts, wa.top_k, wa.seed))
            .map_err(&err)
            .and_then(|r| r.route(&input).map_err(&err).map(|_| r));
        let router = match created {
            Ok(r) => r,
            Err(CliError::Usage(msg)) if skip_unrunnable => {
                progress.println(&format!(
                    "note: skipping {} on this input: {}",
                    c.label,
                    msg.lines().next().unwrap_or_default()
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        if !router.is_causal() {
            progress.println(&format!(
                "warning: {} is not causal: it routes each token using the whole batch, so it leaks future tokens in autoregressive decoding",
                c.label
            ));
        }
        let (route_ms, plan) = timed(a.repeats, || router.route(&input).map_err(&err))?;
        let (mut layer_ms, mut path) = (None, None);
        if let (Some(b), Some(bank)) = (&backend, &bank) {
            let resident = match &mut resident {
                Some(r) => {
                    r.set_router(router.clone()).map_err(&err)?;
                    r
                }
                None => {
                    let layer = MoeLayer::new(router.clone(), bank.clone()).map_err(&err)?;
                    resident.insert(b.upload(Arc::new(layer)).map_err(&err)?)
                }
            };
            let (ms, out) = timed(a.layer_repeats, || resident.forward(&input).map_err(&err))?;
            layer_ms = Some(ms);
            path = Some(format!("{:?}", out.router_path).to_lowercase());
        }
        if a.plot.is_some() {
            plot_rows.push((c.label.clone(), plan.expert_counts()));
        }
        let mut row = compare_row(
            &c.label,
            router.is_causal(),
            &plan,
            route_ms,
            layer_ms,
            path,
            n_tokens,
        );
        if let Some(n) = &network {
            row.ep = crate::ep::ep_rows(router.as_ref(), &w, wa.mode(), a.ep.ranks(), n)
                .map_err(&err)?;
        }
        rows.push(row);
    }
    progress.finish();
    if rows.is_empty() {
        return Err(CliError::Usage(
            "none of the routers can run on this input (see the notes above)".into(),
        ));
    }
    let report = CompareReport {
        workload: workload_report(a, &w),
        rows,
        ep_network: network,
    };
    if let Some(path) = &a.plot {
        write_plot(path, &report.workload, plot_rows)?;
    }
    print(&report, a.format)
}

/// The workload part of the report.
fn workload_report(a: &CompareArgs, w: &crate::workload::Tokens) -> WorkloadReport {
    let wa = &a.workload;
    let (n_tokens, d_model) = (w.n_tokens(), w.d_model());
    WorkloadReport {
        kind: w.source.clone(),
        tokens: n_tokens,
        d_model,
        experts: wa.experts,
        top_k: wa.top_k,
        skew: wa.skew,
        seed: wa.seed,
        mode: wa.mode_name(),
        backend: if a.no_layer {
            "none".into()
        } else {
            a.backend.clone()
        },
        ffn: a.ffn,
    }
}

/// Generates or reads the workload after checking the memory estimate of the whole run (routing, and the expert
/// weights and outputs of the full layer unless `--no-layer`).
fn generate_checked(a: &CompareArgs) -> Result<crate::workload::Tokens, CliError> {
    let wa = &a.workload;
    let mut extra = crate::workload::MemoryEstimate::default();
    if !a.no_layer && wa.input.is_none() {
        let (e, d, f) = (wa.experts as u128, wa.d_model as u128, a.ffn as u128);
        extra.add("expert weights 3·E·d·f", 3 * e * d * f, 1).add(
            "layer outputs T·d",
            wa.tokens as u128 * d,
            2,
        );
    }
    let w = wa.generate_with(&extra)?;
    let (n_tokens, d_model) = (w.n_tokens(), w.d_model());
    if !a.no_layer && wa.input.is_some() {
        let (e, d, f, t) = (
            wa.experts as u128,
            d_model as u128,
            a.ffn as u128,
            n_tokens as u128,
        );
        let mut m = crate::workload::routing_estimate(n_tokens, d_model, wa.experts);
        m.add("expert weights 3·E·d·f", 3 * e * d * f, 1)
            .add("layer outputs T·d", t * d, 2);
        m.check()?;
    }
    Ok(w)
}

/// Writes the `--plot` SVG of each router's load per expert.
fn write_plot(
    path: &std::path::Path,
    w: &WorkloadReport,
    rows: Vec<(String, Vec<usize>)>,
) -> Result<(), CliError> {
    let title = format!(
        "tokens per expert: T = {}, d = {}, E = {}, k = {}, skew {}",
        w.tokens, w.d_model, w.experts, w.top_k, w.skew
    );
    std::fs::write(path, crate::plot::load_svg(&title, &rows))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One router's row from its plan and timings (`tokens` = T, for the per-token times).
fn compare_row(
    label: &str,
    causal: bool,
    plan: &Routing,
    route_ms: f64,
    layer_ms: Option<f64>,
    path: Option<String>,
    tokens: usize,
) -> CompareRow {
    let d = plan.diagnostics();
    let per_token = |ms: f64| {
        if tokens > 0 {
            ms * 1e3 / tokens as f64
        } else {
            0.0
        }
    };
    CompareRow {
        router: label.to_string(),
        causal,
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
        experts_per_token_mean: d.experts_per_token_mean,
        experts_per_token_min: d.experts_per_token_min,
        experts_per_token_max: d.experts_per_token_max,
        tokens_without_expert: d.tokens_without_expert,
        route_ms,
        route_us_per_token: per_token(route_ms),
        layer_ms,
        layer_us_per_token: layer_ms.map(per_token),
        router_path: path,
        aux_losses: plan.aux_losses().to_vec(),
        loads: (plan.n_experts() <= MAX_LOAD_COLUMNS).then(|| plan.expert_counts()),
        ep: Vec::new(),
    }
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
        "exp/tok",
        "min/tok",
        "max/tok",
        "no expert",
        "route ms",
        "route us/tok",
        "layer ms",
        "layer us/tok",
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
            format!("{:.2}", row.experts_per_token_mean),
            row.experts_per_token_min.to_string(),
            row.experts_per_token_max.to_string(),
            row.tokens_without_expert.to_string(),
            format!("{:.2}", row.route_ms),
            format!("{:.3}", row.route_us_per_token),
            row.layer_ms.map_or("-".into(), |v| format!("{v:.2}")),
            row.layer_us_per_token
                .map_or("-".into(), |v| format!("{v:.2}")),
        ]);
    }
    if format == Format::Csv && r.ep_network.is_some() {
        let eps: Vec<&[crate::ep::EpRow]> = r.rows.iter().map(|x| x.ep.as_slice()).collect();
        let ranks: Vec<usize> = r
            .rows
            .first()
            .map_or(Vec::new(), |x| x.ep.iter().map(|e| e.ranks).collect());
        crate::ep::extend_csv(&mut t, &ranks, &eps);
    }
    if format == Format::Table {
        let w = &r.workload;
        let layer = if w.backend == "none" {
            "layer: not run (--no-layer)".to_string()
        } else {
            format!("layer: SwiGLU f = {} on {}", w.ffn, w.backend)
        };
        println!(
            "workload: {} tokens, d = {}, E = {}, k = {}, Zipf skew {}, seed {}, {}; {layer}",
            w.tokens, w.d_model, w.experts, w.top_k, w.skew, w.seed, w.mode
        );
        println!();
    }
    print!("{}", t.render(format));
    if format == Format::Table
        && let Some(e) = r
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
    if let (Some(n), true) = (&r.ep_network, format != Format::Csv) {
        let eps: Vec<(String, &[crate::ep::EpRow])> = r
            .rows
            .iter()
            .map(|x| (x.router.clone(), x.ep.as_slice()))
            .collect();
        println!();
        if format == Format::Table {
            println!("{}", crate::ep::describe(n));
            println!();
        }
        print!("{}", crate::ep::table(&eps).render(format));
    }
    Ok(())
}
