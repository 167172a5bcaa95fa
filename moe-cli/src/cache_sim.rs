//! `moe cache-sim`: replays a routing trace (`.moetrace`, written by `moe route --trace` or `moe train --trace`)
//! through the expert store's slot cache under each eviction policy and slot count, and reports hit rates, loads
//! and bytes moved beside Belady's bound. Also the trace-file helpers `moe route` and `moe train` write with.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use moe_core::MoeError;
use moe_core::store::cache::CacheStats;
use moe_core::store::policy::PolicyKind;
use moe_core::store::sim;
use moe_core::store::trace::{RoutingTrace, TraceHeader};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};

/// Refuses an output path (`--trace`, `--plot`, `--write-checkpoint`) before any work: a missing directory, or
/// something other than a regular file already there (a directory, symlink, device, pipe: never replaced).
pub(crate) fn check_output(flag: &str, path: &Path) -> Result<(), CliError> {
    moe_models::files::check_output_file(path).map_err(|e| CliError::Usage(format!("{flag}: {e}")))
}

/// Writes `trace` to `path` atomically: a temporary file beside it (`.NAME.tmp-PID`), then a rename, so a reader
/// never sees a partial trace. Errors name the file.
pub(crate) fn write_trace(path: &Path, trace: &RoutingTrace) -> Result<(), CliError> {
    check_output("--trace", path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "trace".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let fail = |what: &str, e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        CliError::Other(anyhow::anyhow!("{what} {}: {e}", path.display()))
    };
    std::fs::write(&tmp, trace.to_bytes()).map_err(|e| fail("writing the trace", e))?;
    std::fs::rename(&tmp, path).map_err(|e| fail("writing the trace", e))?;
    Ok(())
}

/// The trace file of one run when a command writes several: `FILE` with `name` inserted before the extension
/// (`trace.moetrace` + `softmax-topk` → `trace.softmax-topk.moetrace`; without an extension, `trace` →
/// `trace.softmax-topk`).
pub(crate) fn per_run_path(path: &Path, name: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = match path.extension() {
        Some(ext) => format!("{stem}.{name}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{name}"),
    };
    path.with_file_name(file)
}

/// Largest trace file read: 4 GiB (about 2 × 10⁹ token-layer records of top-2 routing over E ≤ 256).
pub(crate) const MAX_TRACE_BYTES: u64 = 4 << 30;
/// Largest slot-count list: every value up to this many.
const MAX_SLOT_COUNTS: usize = 4096;

#[derive(Debug, Args)]
pub(crate) struct CacheSimArgs {
    /// The routing trace (`.moetrace`), as written by `moe route --trace` or `moe train --trace`.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// Eviction policies, comma-separated: lru, lfu, lfru, pin (the most frequent experts of the whole trace
    /// pinned, an oracle profile; LRU for the rest), stale (least-stale), belady (Belady's MIN, offline), or all.
    /// Belady's bound is computed and printed beside every row whether or not it is listed.
    #[arg(long, default_value = "all")]
    policy: String,
    /// Slots per layer (resident experts): values `2,4,8`, inclusive ranges `2..8`, and `E` for the trace's expert
    /// count (`2..E`) [default: every value 1..=E when E ≤ 16, else the powers of two below E, and E].
    #[arg(long)]
    slots: Option<String>,
    /// What one cache request is: `token` (each token's experts, token after token, every layer in order:
    /// decoding with batch 1) or `step` (the union of a step's experts per layer: one batched forward).
    #[arg(long, value_enum, default_value_t = GranularityArg::Token)]
    granularity: GranularityArg,
    /// Prefetch before each layer's request: `none`; `gate` (the experts the trace predicted for that layer, from
    /// the next-layer gate; needs a trace with predictions, as `moe train --trace` writes); `frequency` or
    /// `frequency:N` (the N experts, default the trace's k, most often used in that layer after the previous
    /// layer's experts of the same token, counted over the trace so far). Belady's bound is without prefetch.
    #[arg(long, default_value = "none")]
    prefetch: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write hit rate against slots per layer, one line per policy, Belady's bound dashed, as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// `--granularity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum GranularityArg {
    /// Each token's experts are one request.
    Token,
    /// Each step's union of experts per layer is one request.
    Step,
}

/// Reads and parses a trace: a regular file of at most [`MAX_TRACE_BYTES`] in the format of
/// [`moe_core::store::trace`]; usage errors name the file.
pub(crate) fn read_trace(path: &Path) -> Result<RoutingTrace, CliError> {
    let bytes = moe_models::files::read_capped(path, MAX_TRACE_BYTES, "a routing trace")
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let trace = RoutingTrace::from_bytes(&bytes)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    if trace.steps().is_empty() {
        return Err(CliError::Usage(format!(
            "{}: the trace has no steps (nothing to simulate)",
            path.display()
        )));
    }
    Ok(trace)
}

/// Parses `--policy`: names of [`PolicyKind::name`] or `all`, in the given order, without repeats.
fn parse_policies(text: &str) -> Result<Vec<PolicyKind>, CliError> {
    if text.trim() == "all" {
        return Ok(PolicyKind::ALL.to_vec());
    }
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim) {
        if name == "all" {
            return Err(CliError::Usage(
                "--policy: all means every policy; give it alone, not in a list".into(),
            ));
        }
        let p = PolicyKind::parse(name).map_err(|_| {
            CliError::Usage(format!(
                "--policy: unknown policy {name:?}; choose from lru, lfu, lfru, pin, stale, belady, or all"
            ))
        })?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// One number of `--slots`, or `E`.
fn slot_value(text: &str, e: usize) -> Result<usize, CliError> {
    let t = text.trim();
    if t == "E" || t == "e" {
        return Ok(e);
    }
    t.parse().map_err(|_| {
        let why = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            "is too large"
        } else {
            "is not a number"
        };
        CliError::Usage(format!(
            "--slots: {t:?} {why} (give values 2,4,8, ranges 2..8, or E)"
        ))
    })
}

/// Parses `--slots` against the trace's `E` (see [`CacheSimArgs::slots`]): ascending distinct values in `1..=E`.
fn parse_slots(text: Option<&str>, e: usize) -> Result<Vec<usize>, CliError> {
    let Some(text) = text else {
        return Ok(default_slots(e));
    };
    let mut out = Vec::new();
    for item in text.split(',') {
        let (lo, hi) = match item.split_once("..") {
            Some((a, b)) => (
                slot_value(a, e)?,
                slot_value(b.strip_prefix('=').unwrap_or(b), e)?,
            ),
            None => {
                let v = slot_value(item, e)?;
                (v, v)
            }
        };
        if lo == 0 {
            return Err(CliError::Usage(
                "--slots: zero slots cannot hold an expert; give at least 1".into(),
            ));
        }
        if hi > e || lo > e {
            return Err(CliError::Usage(format!(
                "--slots: {} slots for a trace of E = {e} experts; give at most E",
                hi.max(lo)
            )));
        }
        if lo > hi {
            return Err(CliError::Usage(format!(
                "--slots: the range {lo}..{hi} is empty"
            )));
        }
        if out.len() + (hi - lo + 1) > MAX_SLOT_COUNTS {
            return Err(CliError::Usage(format!(
                "--slots: more than {MAX_SLOT_COUNTS} slot counts; give fewer"
            )));
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The default slot counts: every value `1..=E` when `E <= 16`, else the powers of two below `E`, and `E`.
fn default_slots(e: usize) -> Vec<usize> {
    if e <= 16 {
        return (1..=e).collect();
    }
    let mut out: Vec<usize> = std::iter::successors(Some(1usize), |&p| p.checked_mul(2))
        .take_while(|&p| p < e)
        .collect();
    out.push(e);
    out
}

/// Parses `--prefetch` against the trace: `gate` needs predictions; `frequency:N` needs `1 <= N <= E`.
fn parse_prefetch(text: &str, trace: &RoutingTrace) -> Result<Prefetch, CliError> {
    let h = trace.header();
    let (name, arg) = match text.trim().split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (text.trim(), None),
    };
    match (name, arg) {
        ("none", None) => Ok(Prefetch::None),
        ("gate", None) => {
            let predicted = trace
                .steps()
                .iter()
                .flatten()
                .any(|r| r.predicted.is_some());
            if predicted {
                Ok(Prefetch::Gate)
            } else {
                Err(CliError::Usage(
                    "--prefetch gate: the trace has no predicted experts (record one with `moe train --trace`, whose layers \
                     l ≥ 1 carry the next-layer gate's prediction)"
                        .into(),
                ))
            }
        }
        ("frequency", arg) => {
            let top = match arg {
                Some(a) => a.trim().parse::<usize>().map_err(|_| {
                    CliError::Usage(format!("--prefetch frequency:{a}: want a count of experts"))
                })?,
                None => h.top_k.clamp(1, h.n_experts),
            };
            if top == 0 || top > h.n_experts {
                return Err(CliError::Usage(format!(
                    "--prefetch frequency:{top}: want 1 to E = {} experts",
                    h.n_experts
                )));
            }
            Ok(Prefetch::Frequency { top })
        }
        _ => Err(CliError::Usage(format!(
            "--prefetch: unknown {text:?}; choose none, gate, frequency or frequency:N"
        ))),
    }
}

/// `--prefetch`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefetch {
    None,
    Gate,
    Frequency { top: usize },
}

impl Prefetch {
    fn name(self) -> String {
        match self {
            Prefetch::None => "none".into(),
            Prefetch::Gate => "gate".into(),
            Prefetch::Frequency { top } => format!("frequency:{top}"),
        }
    }
}

/// One simulated `(policy, slots)` point, as the simulator reports it.
#[derive(Debug, Clone)]
struct SimPoint {
    policy: PolicyKind,
    slots: usize,
    total: CacheStats,
    bytes_moved: u64,
    precision: Option<f64>,
    recall: Option<f64>,
}

/// The adapter to [`moe_core::store::sim::sweep`]: every `(policy, slots)` point of `policies × slots`,
/// policy-major (none for no policies).
fn run_sweep(
    trace: &RoutingTrace,
    policies: &[PolicyKind],
    slots: &[usize],
    granularity: GranularityArg,
    prefetch: Prefetch,
) -> Result<Vec<SimPoint>, MoeError> {
    if policies.is_empty() {
        return Ok(Vec::new());
    }
    let granularity = match granularity {
        GranularityArg::Token => sim::Granularity::Token,
        GranularityArg::Step => sim::Granularity::Step,
    };
    let prefetch = match prefetch {
        Prefetch::None => sim::Prefetch::None,
        Prefetch::Gate => sim::Prefetch::Gate,
        Prefetch::Frequency { top } => sim::Prefetch::Frequency { top },
    };
    Ok(sim::sweep(trace, policies, slots, granularity, prefetch)?
        .into_iter()
        .map(|r| SimPoint {
            policy: r.policy,
            slots: r.slots,
            total: r.result.total,
            bytes_moved: r.result.bytes_moved,
            precision: r.result.prefetch_precision,
            recall: r.result.prefetch_recall,
        })
        .collect())
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    policy: PolicyKind,
    /// Slots per layer.
    slots: usize,
    /// Hits over accesses, %.
    hit_rate_pct: f64,
    accesses: u64,
    hits: u64,
    /// Demand loads (misses).
    loads: u64,
    /// Experts loaded by prefetch.
    prefetches: u64,
    /// `(loads + prefetches) · expert_bytes`, bytes; `null` when the trace does not know an expert's size.
    bytes_moved: Option<u64>,
    /// Belady's MIN at this slot count, always without prefetch (with `--prefetch`, hit rates may pass it), %.
    belady_pct: f64,
    /// `belady_pct − hit_rate_pct`, percentage points.
    gap_points: f64,
    /// Predicted experts that were used, over predicted (prefetch gate or frequency).
    prefetch_precision: Option<f64>,
    /// Used experts that were predicted, over used.
    prefetch_recall: Option<f64>,
}

/// The rows of `policies × slots`, each beside Belady's bound at its slot count (computed once, without
/// prefetch; Belady with prefetch is not defined by the simulator).
fn rows(
    trace: &RoutingTrace,
    policies: &[PolicyKind],
    slots: &[usize],
    granularity: GranularityArg,
    prefetch: Prefetch,
) -> Result<Vec<Row>, CliError> {
    let online: Vec<PolicyKind> = policies
        .iter()
        .copied()
        .filter(|&p| p != PolicyKind::Belady)
        .collect();
    let bound = run_sweep(
        trace,
        &[PolicyKind::Belady],
        slots,
        granularity,
        Prefetch::None,
    )?;
    let mut points = run_sweep(trace, &online, slots, granularity, prefetch)?;
    points.extend(bound.iter().cloned());
    let known = trace.header().expert_bytes > 0;
    let mut out = Vec::with_capacity(policies.len() * slots.len());
    for &p in policies {
        for &s in slots {
            let find = |policy| points.iter().find(|q| q.policy == policy && q.slots == s);
            let (Some(q), Some(b)) = (find(p), find(PolicyKind::Belady)) else {
                return Err(CliError::Other(anyhow::anyhow!(
                    "the simulator returned no row for {p} at {s} slots"
                )));
            };
            let hit = 100.0 * q.total.hit_rate();
            let belady = 100.0 * b.total.hit_rate();
            out.push(Row {
                policy: p,
                slots: s,
                hit_rate_pct: hit,
                accesses: q.total.accesses,
                hits: q.total.hits,
                loads: q.total.loads,
                prefetches: q.total.prefetches,
                bytes_moved: known.then_some(q.bytes_moved),
                belady_pct: belady,
                gap_points: belady - hit,
                prefetch_precision: q.precision,
                prefetch_recall: q.recall,
            });
        }
    }
    Ok(out)
}

/// Which online policy wins: the highest mean hit rate over the slot counts.
#[derive(Debug, Clone, Serialize)]
struct Verdict {
    /// The winning policy (`None` when only Belady was simulated).
    winner: Option<PolicyKind>,
    /// Its mean hit rate over the slot counts, %.
    mean_hit_pct: f64,
    /// Its mean lead over LRU in points (when LRU was simulated and is not the winner).
    over_lru_points: Option<f64>,
    /// Its mean lead over the next best policy in points (when there is one).
    over_next_points: Option<f64>,
    /// Belady's mean hit rate minus the winner's, points.
    below_belady_points: f64,
    /// At each slot count, the policy with the highest hit rate (ties: the first listed).
    best_at: Vec<(usize, PolicyKind)>,
    /// The verdict in words.
    text: String,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// The verdict over `rows`; with `prefetch`, Belady's column is the demand-only bound (hits may pass it: a
/// prefetch turns a load into a hit ahead of use), and the text says so.
fn verdict(rows: &[Row], slots: &[usize], prefetch: bool) -> Verdict {
    let mut by_policy: Vec<(PolicyKind, f64)> = Vec::new();
    for r in rows.iter().filter(|r| r.policy != PolicyKind::Belady) {
        if !by_policy.iter().any(|(p, _)| *p == r.policy) {
            let m = mean(
                rows.iter()
                    .filter(|q| q.policy == r.policy)
                    .map(|q| q.hit_rate_pct),
            );
            by_policy.push((r.policy, m));
        }
    }
    let belady = mean(
        slots
            .iter()
            .filter_map(|s| rows.iter().find(|r| r.slots == *s).map(|r| r.belady_pct)),
    );
    let best_at: Vec<(usize, PolicyKind)> = slots
        .iter()
        .filter_map(|&s| {
            rows.iter()
                .filter(|r| r.slots == s && r.policy != PolicyKind::Belady)
                .fold(None::<&Row>, |b, r| match b {
                    Some(b) if b.hit_rate_pct >= r.hit_rate_pct => Some(b),
                    _ => Some(r),
                })
                .map(|r| (s, r.policy))
        })
        .collect();
    let Some(&(winner, win)) = by_policy
        .iter()
        .fold(None::<&(PolicyKind, f64)>, |b, x| match b {
            Some(b) if b.1 >= x.1 => Some(b),
            _ => Some(x),
        })
    else {
        return Verdict {
            winner: None,
            mean_hit_pct: belady,
            over_lru_points: None,
            over_next_points: None,
            below_belady_points: 0.0,
            best_at,
            text: format!(
                "only Belady's bound was simulated: mean hit rate {belady:.1} % over {} slot counts",
                slots.len()
            ),
        };
    };
    let lru = by_policy
        .iter()
        .find(|(p, _)| *p == PolicyKind::Lru && winner != PolicyKind::Lru)
        .map(|(_, m)| win - m);
    let next = by_policy
        .iter()
        .filter(|(p, _)| *p != winner)
        .map(|(p, m)| (*p, win - m))
        .fold(None::<(PolicyKind, f64)>, |b, x| match b {
            Some(b) if b.1 <= x.1 => Some(b),
            _ => Some(x),
        });
    let wins = best_at.iter().filter(|(_, p)| *p == winner).count();
    // Within 0.05 points of the next best, the means are equal at the printed precision: a tie, not a win.
    let tied = next.is_some_and(|(_, d)| d < 0.05);
    let mut text = format!(
        "{winner} {}: mean hit rate {win:.1} % over {} slot counts (best at {wins} of them)",
        if tied { "ties for first" } else { "wins" },
        slots.len()
    );
    if let Some(d) = lru {
        text.push_str(&format!(", {d:+.1} points over lru"));
    }
    if let Some((p, d)) = next.filter(|(p, _)| *p != PolicyKind::Lru || lru.is_none()) {
        text.push_str(&format!(", {d:+.1} over the next best ({p})"));
    }
    if prefetch {
        text.push_str(&format!(
            "; Belady's bound without prefetch: {belady:.1} % (prefetched experts are hits, so with prefetch \
             hit rates can pass it: compare GB moved)"
        ));
    } else {
        text.push_str(&format!(
            "; {:.1} points below Belady's bound ({belady:.1} %)",
            belady - win
        ));
    }
    Verdict {
        winner: Some(winner),
        mean_hit_pct: win,
        over_lru_points: lru,
        over_next_points: next.map(|(_, d)| d),
        below_belady_points: belady - win,
        best_at,
        text,
    }
}

/// The JSON document of `--format json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    trace: TraceInfo<'a>,
    granularity: GranularityArg,
    prefetch: String,
    slots: &'a [usize],
    rows: &'a [Row],
    verdict: &'a Verdict,
    /// With `pin` among the policies: where its expert counts come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pin_profile: Option<&'static str>,
}

/// What the simulator's pin policy pins by.
const PIN_ORACLE: &str = "pin pins each layer's most frequent experts over the whole trace: an oracle profile (counts known in advance)";

/// What the trace is of.
#[derive(Debug, Serialize)]
struct TraceInfo<'a> {
    path: String,
    header: &'a TraceHeader,
    steps: usize,
    /// Tokens over all steps (each passes every layer).
    tokens: usize,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{:.1}", 100.0 * x))
}

fn table(rows: &[Row], prefetch: Prefetch) -> Table {
    let mut head = vec!["policy", "slots", "hit %", "loads", "GB moved"];
    if prefetch != Prefetch::None {
        head.extend(["prefetches", "precision %", "recall %"]);
    }
    if prefetch == Prefetch::None {
        head.extend(["Belady %", "gap (points)"]);
    } else {
        head.extend(["Belady % (no prefetch)", "gap (points)"]);
    }
    let mut t = Table::new(&head);
    for r in rows {
        let mut row = vec![
            r.policy.to_string(),
            r.slots.to_string(),
            format!("{:.2}", r.hit_rate_pct),
            r.loads.to_string(),
            r.bytes_moved
                .map_or("-".into(), |b| format!("{:.3}", b as f64 / 1e9)),
        ];
        if prefetch != Prefetch::None {
            row.extend([
                r.prefetches.to_string(),
                pct(r.prefetch_precision),
                pct(r.prefetch_recall),
            ]);
        }
        row.extend([
            format!("{:.2}", r.belady_pct),
            format!("{:.2}", r.gap_points),
        ]);
        t.push(row);
    }
    t
}

pub(crate) fn run(a: &CacheSimArgs) -> Result<(), CliError> {
    let policies = parse_policies(&a.policy)?;
    if let Some(p) = &a.plot {
        check_output("--plot", p)?;
    }
    let trace = read_trace(&a.trace)?;
    let h = trace.header();
    let slots = parse_slots(a.slots.as_deref(), h.n_experts)?;
    let prefetch = parse_prefetch(&a.prefetch, &trace)?;
    let rows = rows(&trace, &policies, &slots, a.granularity, prefetch)?;
    let v = verdict(&rows, &slots, prefetch != Prefetch::None);
    let tokens: usize = trace
        .steps()
        .iter()
        .map(|s| s.first().map_or(0, |r| r.n_tokens()))
        .sum();
    let gran = match a.granularity {
        GranularityArg::Token => "token",
        GranularityArg::Step => "step",
    };
    match a.format {
        Format::Json => {
            let doc = Report {
                trace: TraceInfo {
                    path: a.trace.display().to_string(),
                    header: h,
                    steps: trace.steps().len(),
                    tokens,
                },
                granularity: a.granularity,
                prefetch: prefetch.name(),
                slots: &slots,
                rows: &rows,
                verdict: &v,
                pin_profile: rows
                    .iter()
                    .any(|r| r.policy == PolicyKind::Pin)
                    .then_some(PIN_ORACLE),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).map_err(|e| CliError::Other(e.into()))?
            );
        }
        Format::Csv => {
            print!("{}", table(&rows, prefetch).render(Format::Csv));
            eprintln!("{}", v.text);
        }
        Format::Table | Format::Markdown => {
            println!(
                "{}: {} ({}); {} layers, E = {}, k = {}; {} steps, {tokens} tokens; granularity {gran}, prefetch {}",
                a.trace.display(),
                crate::output::escape_control(&h.model),
                crate::output::escape_control(&h.router),
                h.n_layers,
                h.n_experts,
                h.top_k,
                trace.steps().len(),
                prefetch.name()
            );
            println!();
            print!("{}", table(&rows, prefetch).render(a.format));
            println!();
            println!("{}", v.text);
            if rows.iter().any(|r| r.policy == PolicyKind::Pin) {
                println!("{PIN_ORACLE}");
            }
        }
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "moe cache-sim: {} ({}), granularity {gran}, prefetch {}",
            h.model,
            h.router,
            prefetch.name()
        );
        std::fs::write(
            path,
            crate::plot::hit_rate_svg(&title, &rows_for_plot(&rows)),
        )
        .map_err(|e| CliError::Other(anyhow::anyhow!("writing {}: {e}", path.display())))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Per policy its `(slots, hit %)` points, and Belady's bound last.
fn rows_for_plot(rows: &[Row]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows.iter().filter(|r| r.policy != PolicyKind::Belady) {
        match out.iter_mut().find(|(p, _)| *p == r.policy.name()) {
            Some((_, pts)) => pts.push((r.slots as f64, r.hit_rate_pct)),
            None => out.push((
                r.policy.name().to_string(),
                vec![(r.slots as f64, r.hit_rate_pct)],
            )),
        }
    }
    let mut bound: Vec<(f64, f64)> = Vec::new();
    for r in rows {
        if !bound.iter().any(|(s, _)| *s == r.slots as f64) {
            bound.push((r.slots as f64, r.belady_pct));
        }
    }
    out.push(("belady (bound)".into(), bound));
    out
}
