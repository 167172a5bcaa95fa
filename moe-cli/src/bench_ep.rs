//! `moe bench --ep-ranks R` (R thread ranks in this process) and `mpirun -np R moe bench --ep` (one rank per MPI
//! process, feature `mpi`): the expert-parallel layer's step time, all-to-all time, bytes and messages per rank
//! and expert-load imbalance, against the single-rank layer on the same tokens. Each rank takes `T` tokens of one
//! workload of `R · T` tokens (rank `r` rows `r·T ..`), builds the same layer from the seed and keeps its experts.

use std::sync::Arc;
use std::time::Instant;

use moe_core::{Backend, MoeError, MoeLayer, RouterInput, WorkloadConfig};
use moe_ep::{Communicator, EpLayer, EpOptions, ThreadComm};
use serde::{Deserialize, Serialize};

use crate::CliError;
use crate::output::{Format, Table};

/// Message sizes of the link calibration, bytes.
const CALIBRATION_SIZES: &[usize] = &[8, 1 << 10, 1 << 16, 1 << 18, 1 << 20, 1 << 22];

/// What one rank measured for one `T`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RankRow {
    step_ms: Vec<f64>,
    /// Per step: ms in the dispatch and in the combine all-to-all.
    dispatch_ms: Vec<f64>,
    combine_ms: Vec<f64>,
    dispatch_bytes: u64,
    combine_bytes: u64,
    messages: u64,
    rows_run: u64,
    dropped: u64,
    single_ms: f64,
    identical: bool,
    /// Per owner: (groups, rows) this rank's plan sends it.
    owners: Vec<(usize, usize)>,
    /// The measured link (ranks 0 and 1).
    link: Option<moe_ep::Link>,
}

/// One row of the report (one `T`).
#[derive(Debug, Serialize)]
struct EpRow {
    tokens_per_rank: usize,
    step_median_ms: f64,
    single_rank_median_ms: f64,
    all_to_all_median_ms: f64,
    bytes_sent_per_rank_max: u64,
    bytes_sent_per_rank_mean: f64,
    messages_per_rank_max: u64,
    imbalance: f64,
    dropped: u64,
    identical_to_one_rank: bool,
    /// The cost model's all-to-all ms of one step (dispatch + combine) on the calibrated link.
    predicted_all_to_all_ms: f64,
    /// The cost model's bytes sent by the busiest rank (equal to the measured when nothing is dropped).
    predicted_bytes_per_rank_max: u64,
}

/// The bench's inputs, from `moe bench`'s flags.
pub(crate) struct EpBench<'a> {
    pub(crate) layer: &'a MoeLayer,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) tokens: &'a [usize],
    pub(crate) repeats: usize,
    pub(crate) seed: u64,
    pub(crate) skew: f64,
    pub(crate) clusters: usize,
    pub(crate) rank_capacity: Option<f32>,
    pub(crate) timeout: Option<std::time::Duration>,
    pub(crate) format: Format,
}

/// The size of the MPI job this process belongs to, from the environment `mpirun` gives its ranks (OpenMPI's
/// `OMPI_COMM_WORLD_SIZE`, MPICH's and Slurm's `PMI_SIZE`); `None` outside `mpirun`.
pub(crate) fn mpirun_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Runs the bench on `ranks` thread ranks.
pub(crate) fn run_threads(b: &EpBench<'_>, ranks: usize) -> Result<(), CliError> {
    let per_rank = ThreadComm::run(ranks, |comm| rank_main(b, Box::new(comm)))
        .map_err(|e| CliError::Other(e.into()))?;
    let per_rank = per_rank.into_iter().collect::<Result<Vec<_>, MoeError>>()?;
    print(b, "threads", ranks, &per_rank)
}

/// Runs the bench as one rank of an MPI job; rank 0 prints.
#[cfg(feature = "mpi")]
pub(crate) fn run_mpi(b: &EpBench<'_>) -> Result<(), CliError> {
    let comm = moe_ep::mpi::MpiComm::world()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let (mine, mut ep) = rank_layer(b, Box::new(comm))?;
    let bytes = serde_json::to_vec(&mine).map_err(|e| CliError::Other(e.into()))?;
    let all = ep.comm_mut().all_gather(&bytes)?;
    if rank != 0 {
        return Ok(());
    }
    let per_rank = (0..all.sources())
        .map(|s| serde_json::from_slice(all.from(s)).map_err(|e| CliError::Other(e.into())))
        .collect::<Result<Vec<Vec<RankRow>>, CliError>>()?;
    print(b, "mpi", ranks, &per_rank)
}

/// One rank's part: the EP layer made once, then every `T`.
fn rank_main(b: &EpBench<'_>, comm: Box<dyn Communicator>) -> Result<Vec<RankRow>, MoeError> {
    rank_layer(b, comm).map(|(rows, _)| rows)
}

/// [`rank_main`], keeping the layer (its communicator gathers the ranks' rows under MPI).
fn rank_layer(
    b: &EpBench<'_>,
    comm: Box<dyn Communicator>,
) -> Result<(Vec<RankRow>, EpLayer), MoeError> {
    let (rank, ranks) = (comm.rank(), comm.size());
    let mut comm = comm;
    if let Some(t) = b.timeout {
        comm.set_timeout(t);
    }
    check_same_run(b, comm.as_mut())?;
    let d = b.layer.d_model();
    let options = EpOptions {
        placement: moe_ep::Placement::contiguous(b.layer.n_experts(), ranks)?,
        rank_capacity: b.rank_capacity,
    };
    let mut ep = EpLayer::new(b.backend.as_ref(), b.layer, options.clone(), comm)?;
    // The link the cost model predicts with, measured through the same communicator.
    let link = if ranks > 1 {
        Some(moe_ep::network::calibrate(
            ep.comm_mut(),
            CALIBRATION_SIZES,
            15,
        )?)
    } else {
        None
    };
    let mut single = b.backend.upload(Arc::new(b.layer.clone()))?;
    let mut rows = Vec::with_capacity(b.tokens.len());
    for &t in b.tokens {
        let w = WorkloadConfig {
            tokens: t * ranks,
            d_model: d,
            seed: b.seed,
            skew: b.skew,
            clusters: b.clusters,
            ..Default::default()
        }
        .generate()?;
        let x = w.hidden.slice(ndarray::s![rank * t..(rank + 1) * t, ..]);
        let ids = &w.token_ids[rank * t..(rank + 1) * t];
        let input = RouterInput::new(x).with_token_ids(ids);
        let warm = ep.forward(&input)?;
        let want = single.forward(&input)?;
        let identical = warm
            .output
            .iter()
            .map(|v| v.to_bits())
            .eq(want.output.iter().map(|v| v.to_bits()));
        let mut single_ms = Vec::with_capacity(b.repeats);
        for _ in 0..b.repeats {
            let t0 = Instant::now();
            single.forward(&input)?;
            single_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let before = ep.stats().clone();
        let plan = moe_ep::plan::dispatch_plan(&warm.routing, &options.placement);
        let mut row = RankRow {
            identical,
            single_ms: median(single_ms),
            owners: plan.owners.iter().map(|g| (g.groups(), g.rows())).collect(),
            link,
            ..RankRow::default()
        };
        for _ in 0..b.repeats {
            let (d0, c0) = (ep.stats().dispatch_ms, ep.stats().combine_ms);
            let t0 = Instant::now();
            let out = ep.forward(&input)?;
            row.step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            row.identical &= out
                .output
                .iter()
                .map(|v| v.to_bits())
                .eq(want.output.iter().map(|v| v.to_bits()));
            row.dispatch_ms.push(ep.stats().dispatch_ms - d0);
            row.combine_ms.push(ep.stats().combine_ms - c0);
        }
        let s = ep.stats();
        let n = b.repeats.max(1) as u64;
        row.dispatch_bytes = (s.dispatch_bytes - before.dispatch_bytes) / n;
        row.combine_bytes = (s.combine_bytes - before.combine_bytes) / n;
        row.messages = (s.messages - before.messages) / n;
        row.rows_run = (s.rows_run - before.rows_run) / n;
        row.dropped = (s.dropped - before.dropped) / n;
        rows.push(row);
    }
    Ok((rows, ep))
}

/// Every rank must time the same run: a rank given other `-t`, `--repeats`, `--seed`, workload or capacity flags
/// (an MPMD `mpirun` line) would desynchronise the collectives or time other tokens. The layer itself is
/// compared by `EpLayer::new`.
fn check_same_run(b: &EpBench<'_>, comm: &mut dyn Communicator) -> Result<(), MoeError> {
    let mine = format!(
        "-t {:?} --repeats {} --seed {} --skew {} --clusters {} --rank-capacity {:?}",
        b.tokens, b.repeats, b.seed, b.skew, b.clusters, b.rank_capacity
    );
    let all = comm.all_gather(mine.as_bytes())?;
    for src in 0..all.sources() {
        let theirs = String::from_utf8_lossy(all.from(src));
        if theirs != mine {
            return Err(MoeError::config(
                "moe bench --ep",
                format!("rank {src}'s flags"),
                format!(
                    "every rank must run the same bench: rank {src} has `{theirs}`, rank {} `{mine}`",
                    comm.rank()
                ),
            ));
        }
    }
    Ok(())
}

/// The cost model on the ranks' plans and the measured link (`None` on one rank).
fn predict(rows: &[&RankRow], d: usize) -> Result<Option<moe_ep::EpCost>, CliError> {
    let Some(link) = rows.first().and_then(|r| r.link) else {
        return Ok(None);
    };
    let mut traffic = moe_ep::Traffic::new(rows.len())?;
    for (s, r) in rows.iter().enumerate() {
        traffic.add_counts(s, &r.owners, d)?;
    }
    let network = moe_ep::Network {
        name: "measured".into(),
        intra: link,
        inter: link,
        ranks_per_node: None,
    };
    Ok(Some(moe_ep::cost::estimate(&traffic, &network)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn print(
    b: &EpBench<'_>,
    transport: &str,
    ranks: usize,
    per_rank: &[Vec<RankRow>],
) -> Result<(), CliError> {
    let mut out = Vec::new();
    for (i, &t) in b.tokens.iter().enumerate() {
        let rows: Vec<&RankRow> = per_rank.iter().filter_map(|r| r.get(i)).collect();
        // A step takes as long as its slowest rank.
        let steps = (0..b.repeats)
            .map(|j| {
                rows.iter()
                    .map(|r| r.step_ms.get(j).copied().unwrap_or(0.0))
                    .fold(0.0, f64::max)
            })
            .collect();
        // Each all-to-all as the rank that arrived last saw it (the others also wait for it): the exchange itself.
        let last_in = |v: fn(&RankRow) -> &Vec<f64>, j: usize| {
            rows.iter()
                .map(|r| v(r).get(j).copied().unwrap_or(0.0))
                .fold(f64::INFINITY, f64::min)
        };
        let a2a = (0..b.repeats)
            .map(|j| last_in(|r| &r.dispatch_ms, j) + last_in(|r| &r.combine_ms, j))
            .collect();
        let bytes: Vec<u64> = rows
            .iter()
            .map(|r| r.dispatch_bytes + r.combine_bytes)
            .collect();
        let load: Vec<f64> = rows.iter().map(|r| r.rows_run as f64).collect();
        let mean_load = load.iter().sum::<f64>() / load.len().max(1) as f64;
        let predicted = predict(&rows, b.layer.d_model())?;
        out.push(EpRow {
            tokens_per_rank: t,
            step_median_ms: median(steps),
            single_rank_median_ms: rows.iter().map(|r| r.single_ms).fold(0.0, f64::max),
            all_to_all_median_ms: median(a2a),
            bytes_sent_per_rank_max: bytes.iter().copied().max().unwrap_or(0),
            bytes_sent_per_rank_mean: bytes.iter().sum::<u64>() as f64 / bytes.len().max(1) as f64,
            messages_per_rank_max: rows.iter().map(|r| r.messages).max().unwrap_or(0),
            imbalance: if mean_load > 0.0 {
                load.iter().copied().fold(0.0, f64::max) / mean_load
            } else {
                1.0
            },
            dropped: rows.iter().map(|r| r.dropped).sum(),
            identical_to_one_rank: rows.iter().all(|r| r.identical),
            predicted_all_to_all_ms: predicted.as_ref().map_or(0.0, |c| c.total_ms),
            predicted_bytes_per_rank_max: predicted.as_ref().map_or(0, |c| c.max_bytes_sent()),
        });
    }
    match b.format {
        Format::Json => {
            let link = per_rank
                .first()
                .and_then(|r| r.first())
                .and_then(|r| r.link);
            let report = serde_json::json!({
                "transport": transport, "ranks": ranks, "repeats": b.repeats, "measured_link": link, "rows": out,
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(|e| CliError::Other(e.into()))?
            );
        }
        Format::Csv | Format::Markdown => print!("{}", table(&out).render(b.format)),
        Format::Table => {
            println!(
                "expert parallelism: {ranks} ranks ({transport}), median of {} steps; a step is its slowest rank",
                b.repeats
            );
            if let Some(l) = per_rank
                .first()
                .and_then(|r| r.first())
                .and_then(|r| r.link.as_ref())
            {
                println!(
                    "measured link (ranks 0 and 1, through the same all-to-all): {:.1} us + bytes / {:.2} GB/s; \
                     predicted = the cost model's pairwise exchange on it (docs/EP.md)",
                    l.latency_us, l.bandwidth_gb_s
                );
            }
            print!("{}", table(&out).render(b.format));
        }
    }
    Ok(())
}

/// The report's rows as a table.
fn table(out: &[EpRow]) -> Table {
    let mut table = Table::new(&[
        "T/rank",
        "step ms",
        "1-rank ms",
        "a2a ms (last in)",
        "predicted a2a ms",
        "bytes/rank max",
        "predicted bytes max",
        "bytes/rank mean",
        "msgs max",
        "imbalance",
        "dropped",
        "identical",
    ]);
    for r in out {
        table.push(vec![
            r.tokens_per_rank.to_string(),
            format!("{:.3}", r.step_median_ms),
            format!("{:.3}", r.single_rank_median_ms),
            format!("{:.3}", r.all_to_all_median_ms),
            format!("{:.3}", r.predicted_all_to_all_ms),
            r.bytes_sent_per_rank_max.to_string(),
            r.predicted_bytes_per_rank_max.to_string(),
            format!("{:.0}", r.bytes_sent_per_rank_mean),
            r.messages_per_rank_max.to_string(),
            format!("{:.3}", r.imbalance),
            r.dropped.to_string(),
            r.identical_to_one_rank.to_string(),
        ]);
    }
    table
}
