//! `moe route`: one router on one workload, a per-expert summary, and per-token assignments on request.

use std::path::PathBuf;

use clap::Args;
use moe_core::store::trace::{LayerRecord, RoutingTrace, TraceHeader};
use moe_core::{Diagnostics, RouterRegistry, Routing};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};
use crate::spec::parse_one;
use crate::workload::WorkloadArgs;

#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// The router, `name[:key=value,...]` (see `moe list`).
    #[arg(default_value = "softmax-topk")]
    router: String,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Also print each token's assignments (expert, weight, choice rank). (`--tokens` is an older spelling; the
    /// token count is `-t/--num-tokens`.)
    #[arg(long = "per-token", alias = "tokens")]
    per_token: bool,
    /// With `--per-token`, print at most this many tokens (0 = all).
    #[arg(long, default_value_t = 32)]
    limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Also write the plan as a routing trace (one layer, one step: the experts each token kept) for
    /// `moe cache-sim`; written atomically (a temporary file, then a rename). Extension `.moetrace` by convention.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

/// One expert's row.
#[derive(Debug, Serialize)]
struct ExpertRow {
    expert: usize,
    tokens: usize,
    share_pct: f64,
    dropped: usize,
}

/// One token's assignments.
#[derive(Debug, Serialize)]
struct TokenRow {
    token: usize,
    token_id: Option<u32>,
    /// `(expert, weight, rank)`, by rank.
    experts: Vec<(usize, f32, u16)>,
    dropped: Vec<usize>,
}

#[derive(Debug, Serialize)]
struct RouteReport {
    router: String,
    causal: bool,
    diagnostics: Diagnostics,
    experts: Vec<ExpertRow>,
    tokens: Option<Vec<TokenRow>>,
}

/// Refuses flag combinations before any work: a number where the router goes, `--per-token` with CSV.
fn check_args(a: &RouteArgs) -> Result<(), CliError> {
    if !a.router.is_empty() && a.router.chars().all(|c| c.is_ascii_digit()) {
        return Err(CliError::Usage(format!(
            "{:?} is not a router: the token count is -t/--num-tokens {0} (--per-token, once spelled --tokens, prints each token)",
            a.router
        )));
    }
    if a.per_token && a.format == Format::Csv {
        return Err(CliError::Usage(
            "--per-token with --format csv would write two tables in one CSV; use --format json or markdown, or leave out --per-token".into(),
        ));
    }
    if let Some(path) = &a.trace {
        crate::cache_sim::check_output("--trace", path)?;
    }
    Ok(())
}

/// The plan as a one-layer, one-step trace: header `n_layers = 1`, `E`, `k`, expert bytes unknown (0: `moe route`
/// builds no experts), `model` naming the workload and seed, `router` the router's label.
fn route_trace(
    a: &RouteArgs,
    label: &str,
    source: &str,
    plan: &Routing,
) -> Result<RoutingTrace, CliError> {
    let w = &a.workload;
    let model = if source.starts_with("file:") {
        format!(
            "moe route {source}: T {}, seed {}, {}",
            plan.n_tokens(),
            w.seed,
            w.mode_name()
        )
    } else {
        format!(
            "moe route {source}: T {}, d {}, clusters {}, skew {}, seed {}, {}",
            plan.n_tokens(),
            w.d_model,
            w.clusters,
            w.skew,
            w.seed,
            w.mode_name()
        )
    };
    let mut trace = RoutingTrace::new(TraceHeader {
        n_layers: 1,
        n_experts: plan.n_experts(),
        top_k: w.top_k,
        expert_bytes: 0,
        model,
        router: label.to_string(),
    })?;
    trace.push_step(vec![LayerRecord::from_routing(plan)])?;
    Ok(trace)
}

pub(crate) fn run(registry: &RouterRegistry, a: &RouteArgs) -> Result<(), CliError> {
    check_args(a)?;
    let c = parse_one(&a.router, registry, "route")?;
    let wa = &a.workload;
    let w = wa.generate()?;
    if let Some(note) = crate::workload::structure_note(&c.options, &w) {
        eprintln!("note: {}: {note}", c.label);
    }
    let router = registry
        .create(&c.name, &c.args(w.d_model(), wa.experts, wa.top_k, wa.seed))
        .map_err(c.error_mapper(registry))?;
    if !router.is_causal() {
        eprintln!(
            "warning: {} is not causal: it leaks future tokens in autoregressive decoding",
            c.label
        );
    }
    let plan = router.route(&w.input(wa.mode()))?;
    if let Some(path) = &a.trace {
        crate::cache_sim::write_trace(path, &route_trace(a, &c.label, &w.source, &plan)?)?;
        eprintln!("wrote {}", path.display());
    }
    let counts = plan.expert_counts();
    let mut dropped = vec![0usize; plan.n_experts()];
    for d in plan.dropped() {
        dropped[d.expert as usize] += 1;
    }
    let kept = plan.n_slots().max(1) as f64;
    let experts: Vec<ExpertRow> = counts
        .iter()
        .enumerate()
        .map(|(e, &n)| ExpertRow {
            expert: e,
            tokens: n,
            share_pct: 100.0 * n as f64 / kept,
            dropped: dropped[e],
        })
        .collect();
    let tokens = a.per_token.then(|| {
        let mut dropped_by_token = vec![Vec::new(); plan.n_tokens()];
        for d in plan.dropped() {
            dropped_by_token[d.token as usize].push(d.expert as usize);
        }
        let limit = if a.limit == 0 { usize::MAX } else { a.limit };
        plan.per_token()
            .into_iter()
            .zip(dropped_by_token)
            .enumerate()
            .take(limit)
            .map(|(t, (experts, dropped))| TokenRow {
                token: t,
                token_id: w.token_ids.as_ref().and_then(|ids| ids.get(t).copied()),
                experts,
                dropped,
            })
            .collect::<Vec<_>>()
    });
    let report = RouteReport {
        router: c.label.clone(),
        causal: router.is_causal(),
        diagnostics: plan.diagnostics(),
        experts,
        tokens,
    };
    if a.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    let d = &report.diagnostics;
    if a.format == Format::Table {
        println!(
            "{}: {} tokens, E = {}; kept {}, dropped {} ({:.2} %); cv {:.3}, max/mean {:.2}, dead {}, entropy {:.3}, top-20 % share {:.1} %",
            report.router,
            d.tokens,
            d.experts,
            d.kept,
            d.dropped,
            100.0 * d.dropped_fraction,
            d.cv,
            d.max_over_mean,
            d.dead_experts,
            d.load_entropy,
            100.0 * d.top20_share
        );
        println!();
    }
    let mut t = Table::new(&["expert", "tokens", "share %", "dropped"]);
    for r in &report.experts {
        t.push(vec![
            r.expert.to_string(),
            r.tokens.to_string(),
            format!("{:.2}", r.share_pct),
            r.dropped.to_string(),
        ]);
    }
    print!("{}", t.render(a.format));
    if let Some(rows) = &report.tokens {
        let mut t = Table::new(&["token", "token id", "experts (expert:weight)", "dropped"]);
        for r in rows {
            let ex: Vec<String> = r
                .experts
                .iter()
                .map(|(e, w, _)| format!("{e}:{w:.4}"))
                .collect();
            let dr: Vec<String> = r.dropped.iter().map(|e| e.to_string()).collect();
            t.push(vec![
                r.token.to_string(),
                r.token_id.map_or("-".into(), |i| i.to_string()),
                ex.join(" "),
                dr.join(" "),
            ]);
        }
        println!();
        print!("{}", t.render(a.format));
    }
    Ok(())
}
