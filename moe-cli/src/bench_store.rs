//! `moe bench --from CHECKPOINT --resident-experts N`: a stack of MoE layers whose experts live in a safetensors
//! file on disk, at most N resident per layer, run step after step on fresh tokens; reports tokens/s, hit rate,
//! bytes read, load and wait times, the gate prefetch's precision and recall, and the peak RSS against the
//! resident experts' bytes. `--write-checkpoint FILE` writes a random layer stack of the shape for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use moe_core::store::stack::{PredictionCounts, StackPrefetch, forward_stack};
use moe_core::store::trace::{LayerRecord, RoutingTrace, TraceHeader};
use moe_core::store::{
    Capacity, ExpertSource, StoreConfig, StoreStats, StoredBank, policy::PolicyKind,
};
use moe_core::{DeviceLayer, ExpertBank, MoeLayer, RouterRegistry, WorkloadConfig};
use moe_models::store::{DiskDtype, DiskSource, Layout, read_gate_in, write_layers_checkpoint};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};

/// What `moe bench` passes to the store bench.
pub(crate) struct StoreBench<'a> {
    pub from: &'a Path,
    pub resident: Option<usize>,
    pub policy: &'a str,
    pub profile: Option<&'a Path>,
    pub trace: Option<&'a Path>,
    pub prefetch: bool,
    pub cold: bool,
    pub router: &'a str,
    pub top_k: usize,
    pub tokens: &'a [usize],
    pub repeats: u32,
    pub seed: u64,
    pub skew: f64,
    pub clusters: usize,
    pub threads: Option<usize>,
    pub format: Format,
}

/// One row: `repeats` steps of `tokens` fresh tokens through the stack, after one warm-up step.
#[derive(Debug, Serialize)]
struct StoreRow {
    tokens: usize,
    /// Median wall time of one step through every layer, ms.
    median_ms: f64,
    tokens_per_s: f64,
    /// Hits over accesses in the timed steps (every layer).
    hit_rate: f64,
    /// Experts loaded per step (demand loads and prefetches, every layer).
    loads_per_step: f64,
    /// Loads per step that evicted a resident expert (0 when every expert fits).
    evictions_per_step: f64,
    /// Bytes read from the file per step, MB (10⁶ bytes).
    read_mb_per_step: f64,
    /// Bytes read over the timed steps' wall time, GB/s.
    read_gb_per_s: f64,
    /// Time forwards spent loading experts themselves, ms per step.
    demand_load_ms: f64,
    /// Time the prefetch thread spent loading, ms per step.
    prefetch_load_ms: f64,
    /// Time forwards waited for prefetches in flight, ms per step.
    wait_ms: f64,

    /// Experts the next layer's gate predicted that the layer used, over those predicted (with `--prefetch gate`).
    prefetch_precision: Option<f64>,
    /// Experts the layer used that were predicted, over those used.
    prefetch_recall: Option<f64>,
}

#[derive(Debug, Serialize)]
struct StoreReport {
    checkpoint: String,
    layers: usize,
    layout: String,
    dtype: String,
    d_model: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    router: String,
    resident_experts: usize,
    policy: String,
    prefetch: StackPrefetch,
    cold_reads: bool,
    /// Bytes of one expert in the file.
    expert_file_bytes: u64,
    /// Bytes of one expert resident (f32).
    expert_resident_bytes: u64,
    /// layers × resident experts × resident bytes: what the slots hold.
    resident_bound_bytes: u64,
    /// Staging buffers beside the slots (0 on the CPU backend: prefetches load into their slots).
    staging_bytes: u64,
    /// Peak resident set size of this process (VmHWM), bytes.
    peak_rss_bytes: Option<u64>,
    /// Peak RSS minus the slots and the staging buffers: the binary, thread stacks, hidden states, workspaces.
    overhead_bytes: Option<i64>,
    rows: Vec<StoreRow>,
}

/// The MoE block prefixes of `path` in layer order: every `P` with `P` + `experts.0.gate_proj.weight`,
/// `experts.0.w1.weight` or `experts.gate_up_proj` present, sorted by the layer number in `P`.
fn block_prefixes(path: &Path) -> Result<(moe_models::Checkpoint, Vec<String>), CliError> {
    if path.is_dir() {
        return Err(CliError::Usage(format!(
            "--from {}: is a directory; give the .safetensors file (the disk tier reads one file; sharded checkpoints are not supported yet)",
            path.display()
        )));
    }
    let ckpt = moe_models::Checkpoint::open(path).map_err(bad_file)?;
    let mut out: Vec<String> = ckpt
        .names()
        .filter_map(|n| {
            [
                "experts.0.gate_proj.weight",
                "experts.0.w1.weight",
                "experts.gate_up_proj",
            ]
            .iter()
            .find_map(|s| n.strip_suffix(s))
        })
        .map(str::to_string)
        .collect();
    out.sort_by_key(|p| (layer_number(p), p.clone()));
    out.dedup();
    if out.is_empty() {
        return Err(CliError::Usage(format!(
            "--from {}: no MoE experts found (looked for *experts.0.gate_proj.weight, *experts.0.w1.weight, *experts.gate_up_proj)",
            path.display()
        )));
    }
    Ok((ckpt, out))
}

/// The first number between dots in `prefix` (`model.layers.12.mlp.` -> 12).
fn layer_number(prefix: &str) -> usize {
    prefix
        .split('.')
        .find_map(|s| s.parse::<usize>().ok())
        .unwrap_or(0)
}

/// The uploaded layers, their disk sources (in layer order) and the router's label.
type Stack = (Vec<Box<dyn DeviceLayer>>, Vec<Arc<DiskSource>>, String);

/// Builds the stored layers of `path`, uploaded to the CPU backend.
fn open_stack(
    registry: &RouterRegistry,
    b: &StoreBench<'_>,
    ckpt: &moe_models::Checkpoint,
    prefixes: &[String],
) -> Result<Stack, CliError> {
    let policy =
        PolicyKind::parse(b.policy).map_err(|e| CliError::Usage(format!("--policy: {e}")))?;
    if policy == PolicyKind::Belady {
        return Err(CliError::Usage(
            "--policy belady: Belady's MIN is offline (it needs the future accesses): run it on a trace with moe cache-sim".into(),
        ));
    }
    let backend = crate::open_backend_with(
        "cpu",
        moe_backends::BackendOptions {
            threads: b.threads,
            ..Default::default()
        },
    )?;
    let c = crate::spec::parse_one(b.router, registry, "bench")?;
    let mut sources = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        let src = Arc::new(
            DiskSource::open(b.from, p)
                .and_then(|s| s.with_cold_reads(b.cold))
                .map_err(bad_file)?,
        );
        if b.cold {
            src.drop_page_cache()?;
        }
        sources.push(src);
    }
    let profile = match b.profile {
        Some(path) => Some(read_profile(path, prefixes.len(), sources[0].n_experts())?),
        None if policy == PolicyKind::Pin => {
            return Err(CliError::Usage(
                "--policy pin pins each layer's most frequent experts: give their frequencies with --profile TRACE (a routing trace of this model: moe route/train --trace)".into(),
            ));
        }
        None => None,
    };
    let mut layers = Vec::with_capacity(prefixes.len());
    for (l, (p, src)) in prefixes.iter().zip(&sources).enumerate() {
        let (e, d) = (src.n_experts(), src.form().d_model());
        if b.top_k > e {
            return Err(CliError::Usage(format!(
                "-k/--top-k {} is more than the experts of {p} in the file (E = {e})",
                b.top_k
            )));
        }
        note_unrun_parts(ckpt, p);
        let slots = b.resident.unwrap_or(e);
        if slots == 0 || slots > e {
            return Err(CliError::Usage(format!(
                "--resident-experts must be between 1 and E = {e}, got {slots}"
            )));
        }
        let gate = read_gate_in(ckpt, p).map_err(bad_file)?;
        let mut router = registry
            .create(&c.name, &c.args(d, e, b.top_k, b.seed))
            .map_err(c.error_mapper(registry))?;
        set_gate(router.as_mut(), gate, p)?;
        let bank = StoredBank::new(
            Arc::clone(src) as Arc<dyn ExpertSource>,
            StoreConfig {
                capacity: Capacity::Experts(slots),
                policy,
                frequencies: profile.as_ref().and_then(|f| f.get(l).cloned()),
            },
        )?;
        let layer = MoeLayer::new(router, ExpertBank::Stored(bank))?;
        layers.push(backend.upload(Arc::new(layer))?);
    }
    Ok((layers, sources, c.label))
}

/// Says on stderr which parts of the block under `prefix` the bench does not run (it measures the routed experts'
/// store): shared experts, a router bias, a correction bias.
fn note_unrun_parts(ckpt: &moe_models::Checkpoint, prefix: &str) {
    let unrun: Vec<&str> = ckpt
        .names()
        .filter_map(|n| n.strip_prefix(prefix))
        .filter(|n| {
            n.starts_with("shared_expert")
                || matches!(
                    *n,
                    "gate.bias" | "router.bias" | "gate.e_score_correction_bias"
                )
        })
        .collect();
    if !unrun.is_empty() {
        eprintln!(
            "note: {prefix}: the bench runs the router's gate and the routed experts only; not run: {}",
            unrun.join(", ")
        );
    }
}

/// Per layer, how often each expert was used in the routing trace `path`, which must be of a model with these
/// `layers` of `e` experts.
fn read_profile(path: &Path, layers: usize, e: usize) -> Result<Vec<Vec<u64>>, CliError> {
    let trace = crate::cache_sim::read_trace(path).map_err(|e| match e {
        CliError::Usage(m) => CliError::Usage(format!("--profile: {m}")),
        other => other,
    })?;
    trace
        .check_matches(layers, e)
        .map_err(|err| CliError::Usage(format!("--profile {}: {err}", path.display())))?;
    Ok(moe_core::store::sim::expert_frequencies(&trace))
}

/// Puts the checkpoint's gate `[E, d]` into the router's `gate` parameter.
fn set_gate(
    router: &mut dyn moe_core::Router,
    gate: ndarray::Array2<f32>,
    prefix: &str,
) -> Result<(), CliError> {
    let name = router.name().to_string();
    let mut params = router.params_mut();
    let p = params
        .iter_mut()
        .find(|p| p.name == "gate")
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--router {name}: it has no dense gate to load {prefix}gate.weight into"
            ))
        })?;
    if p.value.shape() != gate.shape() {
        return Err(CliError::Usage(format!(
            "{prefix}gate.weight is {:?}, the router's gate {:?}",
            gate.shape(),
            p.value.shape()
        )));
    }
    p.value.assign(&gate.into_dyn());
    Ok(())
}

/// A checkpoint error: about the file the user named (exit 2).
fn bad_file(e: moe_models::LoadError) -> CliError {
    CliError::Usage(e.to_string())
}

/// Sums of the store counters of every layer.
fn total_stats(layers: &[Box<dyn DeviceLayer>]) -> StoreStats {
    let mut t = StoreStats::default();
    for s in layers.iter().filter_map(|l| l.store_stats()) {
        t.slots += s.slots;
        t.cache.accesses += s.cache.accesses;
        t.cache.hits += s.cache.hits;
        t.cache.loads += s.cache.loads;
        t.cache.evictions += s.cache.evictions;
        t.cache.prefetches += s.cache.prefetches;
        t.cache.prefetch_hits += s.cache.prefetch_hits;
        t.bytes_read += s.bytes_read;
        t.demand_load_ms += s.demand_load_ms;
        t.prefetch_load_ms += s.prefetch_load_ms;
        t.wait_ms += s.wait_ms;
        t.staging_bytes += s.staging_bytes;
    }
    t
}

/// Times `b.repeats` steps of `t` fresh tokens (after one warm-up step): every step's tokens are new rows of one
/// seeded workload, so hits come from the routing's reuse across tokens, not from repeating an input.
fn time_row(
    layers: &mut [Box<dyn DeviceLayer>],
    b: &StoreBench<'_>,
    t: usize,
    d: usize,
    mut trace: Option<&mut RoutingTrace>,
) -> Result<StoreRow, CliError> {
    let steps = b.repeats as usize + 1;
    let w = WorkloadConfig {
        tokens: t * steps,
        d_model: d,
        seed: b.seed,
        skew: b.skew,
        clusters: b.clusters,
        ..Default::default()
    }
    .generate()?;
    let prefetch = if b.prefetch {
        StackPrefetch::NextGate
    } else {
        StackPrefetch::None
    };
    let mut times = Vec::with_capacity(steps);
    let mut before = total_stats(layers);
    let mut counts = PredictionCounts::default();
    for s in 0..steps {
        let x = w.hidden.slice(ndarray::s![s * t..(s + 1) * t, ..]);
        let t0 = Instant::now();
        // A failed read of an expert names the file and the tensor: the checkpoint is the user's (exit 2).
        let run = forward_stack(layers, x, prefetch).map_err(|e| match e {
            moe_core::MoeError::Expert { .. } => CliError::Usage(e.to_string()),
            other => other.into(),
        })?;
        let c = run.counts;
        if let Some(tr) = trace.as_deref_mut() {
            let records = run
                .plans
                .iter()
                .zip(&run.predicted)
                .map(|(plan, pred)| {
                    let r = LayerRecord::from_routing(plan);
                    match pred {
                        Some(p) => r.with_predicted(p),
                        None => Ok(r),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            tr.push_step(records)?;
        }
        let dt = t0.elapsed().as_secs_f64();
        if s == 0 {
            before = total_stats(layers);
        } else {
            times.push(dt);
            counts.add(c);
        }
    }
    let after = total_stats(layers);
    let n = (steps - 1) as f64;
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let accesses = after.cache.accesses - before.cache.accesses;
    let hits = after.cache.hits - before.cache.hits;
    let bytes = (after.bytes_read - before.bytes_read) as f64;
    Ok(StoreRow {
        tokens: t,
        median_ms: med * 1e3,
        tokens_per_s: t as f64 / med,
        hit_rate: if accesses == 0 {
            0.0
        } else {
            hits as f64 / accesses as f64
        },
        loads_per_step: (after.cache.loads + after.cache.prefetches
            - before.cache.loads
            - before.cache.prefetches) as f64
            / n,
        evictions_per_step: (after.cache.evictions - before.cache.evictions) as f64 / n,
        read_mb_per_step: bytes / n / 1e6,
        read_gb_per_s: bytes / total / 1e9,
        demand_load_ms: (after.demand_load_ms - before.demand_load_ms) / n,
        prefetch_load_ms: (after.prefetch_load_ms - before.prefetch_load_ms) / n,
        wait_ms: (after.wait_ms - before.wait_ms) / n,
        // A one-layer stack predicts nothing: no figure rather than 0.
        prefetch_precision: (b.prefetch && counts.predicted > 0).then(|| counts.precision()),
        prefetch_recall: (b.prefetch && counts.predicted > 0).then(|| counts.recall()),
    })
}

/// The peak resident set size of this process (`VmHWM` of /proc/self/status), bytes.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the store bench.
pub(crate) fn run(registry: &RouterRegistry, b: &StoreBench<'_>) -> Result<(), CliError> {
    if b.tokens.is_empty() || b.tokens.contains(&0) {
        return Err(CliError::Usage(
            "--num-tokens needs counts of at least 1".into(),
        ));
    }
    let t_max = b.tokens.iter().copied().max().unwrap_or(1);
    if t_max > 1 << 16 {
        return Err(CliError::Usage(format!(
            "--num-tokens {t_max}: at most 65536 tokens a step with --from"
        )));
    }
    let (ckpt, prefixes) = block_prefixes(b.from)?;
    let (mut layers, sources, router) = open_stack(registry, b, &ckpt, &prefixes)?;
    let src = &sources[0];
    let form = src.form().clone();
    let slots = layers
        .first()
        .and_then(|l| l.store_stats())
        .map_or(0, |s| s.slots);
    let mut trace = match b.trace {
        Some(path) => {
            crate::cache_sim::check_output("--trace", path)?;
            Some(RoutingTrace::new(TraceHeader {
                n_layers: layers.len(),
                n_experts: src.n_experts(),
                top_k: b.top_k,
                expert_bytes: src.stored_bytes_per_expert(),
                model: format!(
                    "moe bench --from {} ({} blocks), workload seed {}, skew {}, {} clusters, T = {:?}",
                    b.from.display(),
                    layers.len(),
                    b.seed,
                    b.skew,
                    b.clusters,
                    b.tokens
                ),
                router: router.clone(),
            })?)
        }
        None => None,
    };
    let mut rows = Vec::new();
    for &t in b.tokens {
        rows.push(time_row(&mut layers, b, t, form.d_model(), trace.as_mut())?);
    }
    if let (Some(path), Some(tr)) = (b.trace, &trace) {
        crate::cache_sim::write_trace(path, tr)?;
        eprintln!("wrote {} ({} steps)", path.display(), tr.steps().len());
    }
    let bound = (layers.len() * slots) as u64 * form.resident_bytes();
    let staging = total_stats(&layers).staging_bytes;
    let peak = peak_rss_bytes();
    let report = StoreReport {
        checkpoint: b.from.display().to_string(),
        layers: layers.len(),
        layout: src.layout().name().to_string(),
        dtype: src.dtype().name().to_string(),
        d_model: form.d_model(),
        ffn: form.ffn(),
        experts: src.n_experts(),
        top_k: b.top_k,
        router,
        resident_experts: slots,
        policy: b.policy.to_string(),
        prefetch: if b.prefetch {
            StackPrefetch::NextGate
        } else {
            StackPrefetch::None
        },
        cold_reads: b.cold,
        expert_file_bytes: src.stored_bytes_per_expert(),
        expert_resident_bytes: form.resident_bytes(),
        resident_bound_bytes: bound,
        staging_bytes: staging,
        peak_rss_bytes: peak,
        overhead_bytes: peak.map(|p| p as i64 - (bound + staging) as i64),
        rows,
    };
    print_report(&report, b.format)
}

fn print_report(r: &StoreReport, format: Format) -> Result<(), CliError> {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    let mb = |b: u64| b as f64 / 1e6;
    if format != Format::Csv {
        println!(
            "{} ({} layers, {} {}): d = {}, f = {}, E = {}, k = {}, router {}; {} of {} experts resident per layer, policy {}, prefetch {}, {} reads",
            r.checkpoint,
            r.layers,
            r.layout,
            r.dtype,
            r.d_model,
            r.ffn,
            r.experts,
            r.top_k,
            r.router,
            r.resident_experts,
            r.experts,
            r.policy,
            if r.prefetch == StackPrefetch::NextGate {
                "next-layer gate"
            } else {
                "none"
            },
            if r.cold_reads {
                "cold (page cache dropped per expert)"
            } else {
                "page-cached"
            },
        );
        println!(
            "expert: {:.1} MB in the file, {:.1} MB resident; slots {:.1} MB + prefetch staging {:.1} MB; peak RSS {}",
            mb(r.expert_file_bytes),
            mb(r.expert_resident_bytes),
            mb(r.resident_bound_bytes),
            mb(r.staging_bytes),
            match (r.peak_rss_bytes, r.overhead_bytes) {
                (Some(p), Some(o)) => format!(
                    "{:.1} MB (slots + staging + {:.1} MB)",
                    mb(p),
                    o as f64 / 1e6
                ),
                _ => "unknown".into(),
            }
        );
        println!();
    }
    let mut t = Table::new(&[
        "T",
        "median ms",
        "tokens/s",
        "hit %",
        "loads/step",
        "evictions/step",
        "read MB/step",
        "read GB/s",
        "load ms",
        "prefetch ms",
        "wait ms",
        "precision",
        "recall",
    ]);
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    for row in &r.rows {
        t.push(vec![
            row.tokens.to_string(),
            format!("{:.2}", row.median_ms),
            format!("{:.1}", row.tokens_per_s),
            format!("{:.1}", 100.0 * row.hit_rate),
            format!("{:.1}", row.loads_per_step),
            format!("{:.1}", row.evictions_per_step),
            format!("{:.1}", row.read_mb_per_step),
            format!("{:.2}", row.read_gb_per_s),
            format!("{:.2}", row.demand_load_ms),
            format!("{:.2}", row.prefetch_load_ms),
            format!("{:.2}", row.wait_ms),
            opt(row.prefetch_precision),
            opt(row.prefetch_recall),
        ]);
    }
    print!("{}", t.render(format));
    Ok(())
}

/// `--write-checkpoint FILE --layers L`: a random stack of `layers` MoE blocks of the shape, BF16, in the Hub's
/// per-expert names (`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...) with each block's gate.
pub(crate) fn write_checkpoint(
    path: &Path,
    layers: usize,
    (d, f, e): (usize, usize, usize),
    seed: u64,
) -> Result<(), CliError> {
    crate::cache_sim::check_output("--write-checkpoint", path)?;
    if layers == 0 || layers > 1024 {
        return Err(CliError::Usage(format!(
            "--layers must be 1 to 1024, got {layers}"
        )));
    }
    let prefixes: Vec<String> = (0..layers)
        .map(|l| format!("model.layers.{l}.mlp."))
        .collect();
    write_layers_checkpoint(
        path,
        &prefixes,
        Layout::PerExpert,
        e,
        d,
        f,
        DiskDtype::Bf16,
        seed,
        true,
    )
    .map_err(bad_file)?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({layers} MoE blocks of E = {e}, d = {d}, f = {f}, bf16: {:.2} GB)",
        PathBuf::from(path).display(),
        bytes as f64 / 1e9
    );
    Ok(())
}
