//! `moe ep-cost TRACE...`: the all-to-all cost model of `moe_ep::cost` on routing traces (`moe route --trace`,
//! `moe train --trace`): per trace (its router) and rank count, every layer's tokens dealt to the ranks
//! (`cost::predict_trace`), and one model step's bytes, messages, expert load and predicted time summed over the
//! layers.

use std::path::PathBuf;

use clap::Args;
use moe_ep::{EpCost, cost};
use serde::Serialize;

use crate::CliError;
use crate::ep::EpRow;
use crate::output::{Format, Table};

#[derive(Debug, Args)]
pub(crate) struct EpCostArgs {
    /// Routing traces (`.moetrace`), one per router to compare.
    #[arg(required = true, value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// Rank counts (comma list; each at most the traces' experts E: every rank owns an expert).
    #[arg(long, value_delimiter = ',', required = true, value_name = "R[,R...]")]
    ranks: Vec<usize>,
    /// Tokens each rank routes per step; a trace with fewer than R × this many tokens per layer is dealt again
    /// from its start (the table says so).
    #[arg(long, required = true, value_name = "N")]
    tokens_per_rank: usize,
    /// Hidden width d of the rows sent (the trace records experts, not widths).
    #[arg(long, short = 'd', required = true)]
    d_model: usize,
    /// Network preset (nominal): shm, ib-hdr, ethernet-100g, dgx-h100.
    #[arg(long, default_value = "ib-hdr")]
    network: String,
    /// Ranks per node, replacing the preset's.
    #[arg(long)]
    ranks_per_node: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// One trace's rows.
#[derive(Debug, Serialize)]
struct TraceRows {
    trace: String,
    router: String,
    model: String,
    layers: usize,
    /// Whether a rank count needed more tokens than the trace has per layer (dealt again from the start).
    wrapped: Vec<bool>,
    ep: Vec<EpRow>,
}

/// The largest sizes the command accepts (a step's tables are `R²` per layer).
const MAX_TOKENS_PER_RANK: usize = 1 << 20;

pub(crate) fn run(a: &EpCostArgs) -> Result<(), CliError> {
    use crate::workload::check_range;
    check_range(
        "--tokens-per-rank",
        a.tokens_per_rank,
        1,
        MAX_TOKENS_PER_RANK,
    )?;
    check_range("--d-model", a.d_model, 1, 1 << 20)?;
    let mut network = moe_ep::Network::preset(&a.network).map_err(|_| {
        CliError::Usage(format!(
            "--network must be one of {}, got {}",
            moe_ep::network::PRESETS.join(", "),
            a.network
        ))
    })?;
    if let Some(n) = a.ranks_per_node {
        network = network.with_ranks_per_node(n).map_err(|_| {
            CliError::Usage(format!("--ranks-per-node must be at least 1, got {n}"))
        })?;
    }
    let mut out = Vec::with_capacity(a.traces.len());
    for path in &a.traces {
        let trace = crate::cache_sim::read_trace(path)?;
        let h = trace.header();
        let mut rows = TraceRows {
            trace: path.display().to_string(),
            router: h.router.clone(),
            model: h.model.clone(),
            layers: h.n_layers,
            wrapped: Vec::new(),
            ep: Vec::new(),
        };
        for &r in &a.ranks {
            cost::check_ranks(h.n_experts, r)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
            let mut costs = Vec::with_capacity(h.n_layers);
            let mut wrapped = false;
            for layer in 0..h.n_layers {
                let (c, w) =
                    cost::predict_trace(&trace, layer, r, a.tokens_per_rank, a.d_model, &network)
                        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
                wrapped |= w;
                costs.push(c);
            }
            rows.wrapped.push(wrapped);
            rows.ep.push(step_row(r, a.tokens_per_rank, &costs));
        }
        out.push(rows);
    }
    print(a, &network, &out)
}

/// One model step over every layer: each rank's bytes, messages and rows summed over the layers, then the max and
/// mean over ranks; the layers' all-to-alls one after the other.
fn step_row(ranks: usize, tokens: usize, costs: &[EpCost]) -> EpRow {
    let sum = |f: fn(&EpCost) -> &Vec<u64>| -> Vec<u64> {
        (0..ranks)
            .map(|r| costs.iter().map(|c| f(c)[r]).sum())
            .collect()
    };
    let (sent, recv, msgs, rows) = (
        sum(|c| &c.bytes_sent_per_rank),
        sum(|c| &c.bytes_received_per_rank),
        sum(|c| &c.messages_per_rank),
        sum(|c| &c.rows_per_rank),
    );
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / ranks.max(1) as f64;
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    let rows_mean = mean(&rows);
    let dispatch_ms: f64 = costs.iter().map(|c| c.dispatch_ms).sum();
    let combine_ms: f64 = costs.iter().map(|c| c.combine_ms).sum();
    EpRow {
        ranks,
        tokens_per_rank_min: tokens,
        tokens_per_rank_max: tokens,
        bytes_sent_max: max(&sent),
        bytes_sent_mean: mean(&sent),
        bytes_received_max: max(&recv),
        messages_max: max(&msgs),
        messages_mean: mean(&msgs),
        rows_max: max(&rows),
        rows_mean,
        imbalance: if rows_mean > 0.0 {
            max(&rows) as f64 / rows_mean
        } else {
            1.0
        },
        dispatch_ms,
        combine_ms,
        all_to_all_ms: dispatch_ms + combine_ms,
    }
}

fn print(a: &EpCostArgs, network: &moe_ep::Network, out: &[TraceRows]) -> Result<(), CliError> {
    if a.format == Format::Json {
        let report = serde_json::json!({ "network": network, "tokens_per_rank": a.tokens_per_rank,
            "d_model": a.d_model, "traces": out });
        let text = serde_json::to_string_pretty(&report).map_err(|e| CliError::Other(e.into()))?;
        println!("{text}");
        return Ok(());
    }
    // The router names the row; where two traces have the same router, their file names tell them apart.
    let repeated = |t: &TraceRows| out.iter().filter(|o| o.router == t.router).count() > 1;
    let labelled: Vec<(String, &[EpRow])> = out
        .iter()
        .map(|t| {
            let label = if repeated(t) {
                let stem = std::path::Path::new(&t.trace)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{} ({stem})", t.router)
            } else {
                t.router.clone()
            };
            (label, t.ep.as_slice())
        })
        .collect();
    let mut table: Table = crate::ep::table(&labelled);
    table.headers.push("wrapped".into());
    let wrapped = out.iter().flat_map(|t| t.wrapped.iter());
    for (row, w) in table.rows.iter_mut().zip(wrapped) {
        row.push(w.to_string());
    }
    if a.format == Format::Table {
        println!(
            "{}; one model step = every layer's dispatch and combine, one after the other",
            crate::ep::describe(network)
        );
        for t in out {
            println!("{}: {} ({} layers)", t.trace, t.model, t.layers);
        }
    }
    print!("{}", table.render(a.format));
    Ok(())
}
