//! `moe compare --ep-ranks`: per router and rank count R, the workload's tokens split into R contiguous blocks,
//! each routed as that rank's own batch, and the all-to-all cost model of `moe_ep::cost` on them (bytes,
//! messages, expert load per rank, predicted dispatch and combine times).

use clap::Args;
use moe_core::{Mode, MoeError, Router, RouterInput};
use moe_ep::{Network, Placement, Traffic, cost, plan::dispatch_plan};
use ndarray::s;
use serde::Serialize;

use crate::CliError;
use crate::output::Table;
use crate::workload::Tokens;

/// The expert-parallel flags of `moe compare`.
#[derive(Debug, Clone, Args)]
pub(crate) struct EpArgs {
    /// Cost expert parallelism on these rank counts (comma list, e.g. `2,4,64`): the T tokens are split into R
    /// contiguous blocks (the first T mod R one token longer), each routed as its rank's own batch, experts in
    /// contiguous blocks (needs R <= T and R <= E).
    #[arg(long, value_delimiter = ',', value_name = "R[,R...]")]
    ep_ranks: Vec<usize>,
    /// Network of the predicted all-to-all time (nominal presets): shm, ib-hdr, ethernet-100g, dgx-h100.
    #[arg(long, default_value = "shm", requires = "ep_ranks")]
    ep_network: String,
    /// Ranks per node, replacing the preset's (shm: all on one node; the others: 8).
    #[arg(long, requires = "ep_ranks")]
    ep_ranks_per_node: Option<usize>,
}

/// One router's expert-parallel cost at one rank count (`moe_ep::cost::EpCost`, summarised over ranks).
#[derive(Debug, Clone, Serialize)]
pub struct EpRow {
    /// Ranks R.
    pub ranks: usize,
    /// Fewest tokens of one rank.
    pub tokens_per_rank_min: usize,
    /// Most tokens of one rank.
    pub tokens_per_rank_max: usize,
    /// Most bytes one rank sends (dispatch + combine, its messages to itself excluded).
    pub bytes_sent_max: u64,
    /// Mean bytes sent per rank.
    pub bytes_sent_mean: f64,
    /// Most bytes one rank receives (dispatch + combine, from itself excluded).
    pub bytes_received_max: u64,
    /// Most non-empty messages one rank sends (dispatch + combine).
    pub messages_max: u64,
    /// Mean messages sent per rank.
    pub messages_mean: f64,
    /// Most rows (slots) one rank's experts receive: the largest expert load of a rank.
    pub rows_max: u64,
    /// Mean rows received per rank.
    pub rows_mean: f64,
    /// `rows_max / rows_mean` (1 when nothing is routed).
    pub imbalance: f64,
    /// Predicted dispatch all-to-all, milliseconds.
    pub dispatch_ms: f64,
    /// Predicted combine all-to-all, milliseconds.
    pub combine_ms: f64,
    /// Predicted dispatch + combine, milliseconds.
    pub all_to_all_ms: f64,
}

impl EpArgs {
    /// Checks the flags against the workload (`1 <= R <= T`, `R <= E`) and opens the network; `None` without
    /// `--ep-ranks`.
    pub(crate) fn network(
        &self,
        n_tokens: usize,
        n_experts: usize,
    ) -> Result<Option<Network>, CliError> {
        if self.ep_ranks.is_empty() {
            return Ok(None);
        }
        for &r in &self.ep_ranks {
            if r == 0 {
                return Err(CliError::Usage(
                    "--ep-ranks must be at least 1, got 0".into(),
                ));
            }
            if r > n_tokens {
                return Err(CliError::Usage(format!(
                    "--ep-ranks {r} is more than the workload's {n_tokens} tokens (every rank needs a token; raise --num-tokens)"
                )));
            }
            if r > n_experts {
                return Err(CliError::Usage(format!(
                    "--ep-ranks {r} is more than the {n_experts} experts (every rank owns at least one expert; raise --experts)"
                )));
            }
            cost::check_ranks(n_experts, r)?;
        }
        let mut net = Network::preset(&self.ep_network).map_err(|_| {
            CliError::Usage(format!(
                "--ep-network must be one of {}, got {}",
                moe_ep::network::PRESETS.join(", "),
                self.ep_network
            ))
        })?;
        if let Some(n) = self.ep_ranks_per_node {
            net = net.with_ranks_per_node(n).map_err(|_| {
                CliError::Usage(format!("--ep-ranks-per-node must be at least 1, got {n}"))
            })?;
        }
        Ok(Some(net))
    }

    /// The rank counts asked for.
    pub(crate) fn ranks(&self) -> &[usize] {
        &self.ep_ranks
    }
}

/// Token rows of rank `r` of `ranks` over `t` tokens: `[start(r), start(r + 1))`,
/// `start(r) = r·⌊T/R⌋ + min(r, T mod R)`.
fn block(t: usize, ranks: usize, r: usize) -> (usize, usize) {
    let start = |r: usize| r * (t / ranks) + r.min(t % ranks);
    (start(r), start(r + 1))
}

/// The sequence lengths of `lens` cut to the rows `[a, b)`.
fn clip_lens(lens: &[usize], a: usize, b: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = 0;
    for &l in lens {
        let (x, y) = (s.max(a), (s + l).min(b));
        if x < y {
            out.push(y - x);
        }
        s += l;
    }
    out
}

/// The expert-parallel cost of `router` on the tokens `w` for each of `ranks`, each rank routing its own block.
///
/// # Errors
/// The router's error on a block; the cost model's (never for checked flags).
pub(crate) fn ep_rows(
    router: &dyn Router,
    w: &Tokens,
    mode: Mode,
    ranks: &[usize],
    network: &Network,
) -> Result<Vec<EpRow>, MoeError> {
    let (t, d) = (w.n_tokens(), w.d_model());
    let e = router.n_experts();
    let mut rows = Vec::with_capacity(ranks.len());
    for &rr in ranks {
        let placement = Placement::contiguous(e, rr)?;
        let mut traffic = Traffic::new(rr)?;
        for r in 0..rr {
            let (a, b) = block(t, rr, r);
            let lens = w.seq_lens.as_deref().map(|l| clip_lens(l, a, b));
            let mut input = RouterInput::new(w.hidden.slice(s![a..b, ..])).with_mode(mode);
            if let Some(ids) = &w.token_ids {
                input = input.with_token_ids(&ids[a..b]);
            }
            if let Some(p) = &w.padding {
                input = input.with_padding(&p[a..b]);
            }
            if let Some(l) = &lens {
                input = input.with_seq_lens(l);
            }
            let routing = router.route(&input)?;
            traffic.add_source(r, &dispatch_plan(&routing, &placement), d)?;
        }
        let c = cost::estimate(&traffic, network);
        let (lo, hi) = (block(t, rr, rr - 1), block(t, rr, 0));
        rows.push(EpRow {
            ranks: rr,
            tokens_per_rank_min: lo.1 - lo.0,
            tokens_per_rank_max: hi.1 - hi.0,
            bytes_sent_max: c.max_bytes_sent(),
            bytes_sent_mean: c.mean_bytes_sent(),
            bytes_received_max: c.bytes_received_per_rank.iter().copied().max().unwrap_or(0),
            messages_max: c.max_messages(),
            messages_mean: c.mean_messages(),
            rows_max: c.rows_per_rank.iter().copied().max().unwrap_or(0),
            rows_mean: c.rows_per_rank.iter().sum::<u64>() as f64 / rr as f64,
            imbalance: c.imbalance,
            dispatch_ms: c.dispatch_ms,
            combine_ms: c.combine_ms,
            all_to_all_ms: c.total_ms,
        });
    }
    Ok(rows)
}

/// Bytes in decimal units: `812 B`, `3.4 KB`, `1.25 MB`, `2.10 GB`.
fn human_bytes(b: f64) -> String {
    if b < 1e3 {
        format!("{b:.0} B")
    } else if b < 1e6 {
        format!("{:.1} KB", b / 1e3)
    } else if b < 1e9 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.2} GB", b / 1e9)
    }
}

/// One line saying what the EP table is.
pub(crate) fn describe(n: &Network) -> String {
    let nodes = match n.ranks_per_node {
        None => "all ranks on one node".to_string(),
        Some(k) => format!(
            "{k} ranks per node, inter-node {} us, {} GB/s",
            n.inter.latency_us, n.inter.bandwidth_gb_s
        ),
    };
    format!(
        "expert parallelism: each rank routes its own contiguous block of tokens; network {} (nominal: intra-node {} us, {} GB/s; {nodes}); bytes exclude a rank's messages to itself; time = pairwise-exchange all-to-all, dispatch + combine",
        n.name, n.intra.latency_us, n.intra.bandwidth_gb_s
    )
}

/// The table/Markdown form: one row per (router, R).
pub(crate) fn table(rows: &[(String, &[EpRow])]) -> Table {
    let mut t = Table::new(&[
        "router",
        "ranks",
        "tok/rank",
        "sent max",
        "sent mean",
        "msgs max",
        "msgs mean",
        "rows max",
        "imbalance",
        "dispatch ms",
        "combine ms",
        "a2a ms",
    ]);
    for (label, eps) in rows {
        for x in eps.iter() {
            t.push(vec![
                label.clone(),
                x.ranks.to_string(),
                if x.tokens_per_rank_min == x.tokens_per_rank_max {
                    x.tokens_per_rank_max.to_string()
                } else {
                    format!("{}-{}", x.tokens_per_rank_min, x.tokens_per_rank_max)
                },
                human_bytes(x.bytes_sent_max as f64),
                human_bytes(x.bytes_sent_mean),
                x.messages_max.to_string(),
                format!("{:.1}", x.messages_mean),
                x.rows_max.to_string(),
                format!("{:.3}", x.imbalance),
                format!("{:.4}", x.dispatch_ms),
                format!("{:.4}", x.combine_ms),
                format!("{:.4}", x.all_to_all_ms),
            ]);
        }
    }
    t
}

/// The CSV form: columns `ep{R} ...` appended to each router's row of `t` (exact bytes, no units).
pub(crate) fn extend_csv(t: &mut Table, ranks: &[usize], rows: &[&[EpRow]]) {
    const COLS: [&str; 7] = [
        "bytes sent max",
        "bytes sent mean",
        "msgs max",
        "rows max",
        "imbalance",
        "dispatch ms",
        "a2a ms",
    ];
    for r in ranks {
        t.headers.extend(COLS.iter().map(|c| format!("ep{r} {c}")));
    }
    for (cells, eps) in t.rows.iter_mut().zip(rows) {
        for x in eps.iter() {
            cells.extend([
                x.bytes_sent_max.to_string(),
                format!("{:.1}", x.bytes_sent_mean),
                x.messages_max.to_string(),
                x.rows_max.to_string(),
                format!("{:.4}", x.imbalance),
                format!("{:.6}", x.dispatch_ms),
                format!("{:.6}", x.all_to_all_ms),
            ]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_tokens_and_clip_sequences() {
        // T = 10 over R = 4: 3, 3, 2, 2 tokens.
        let b: Vec<_> = (0..4).map(|r| block(10, 4, r)).collect();
        assert_eq!(b, vec![(0, 3), (3, 6), (6, 8), (8, 10)]);
        // Sequences of 4, 4, 2 cut to rows [3, 8): 1 row of the first, 4 of the second.
        assert_eq!(clip_lens(&[4, 4, 2], 3, 8), vec![1, 4]);
        assert_eq!(clip_lens(&[4, 4, 2], 8, 10), vec![2]);
        assert_eq!(human_bytes(999.0), "999 B");
        assert_eq!(human_bytes(1_250_000.0), "1.25 MB");
    }
}
