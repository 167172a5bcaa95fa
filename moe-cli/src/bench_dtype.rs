//! `moe bench --dtype f32,bf16,int8,fp8,mxfp4`: one random layer timed with its experts resident in each weight
//! format of the list (the backend is opened with that `dtype` and quantises the f32 layer at upload), with the
//! weight stream as a share of the run's measured read bandwidth, whether each row is memory- or compute-bound,
//! and each format's accuracy against the f32 layer on the same tokens. docs/LOWPREC.md defines the columns.
//!
//! A child module of `bench.rs` (it shares its arguments and its timing loop).

use std::sync::Arc;

use moe_backends::cpu::CpuKernels;
use moe_backends::{BackendOptions, Dtype};
use moe_core::{
    Backend, DeviceLayer, ExpertBank, GptOssBank, MoeError, MoeLayer, PackedBank, RouterInput,
    RouterRegistry, WorkloadConfig, workload::random_swiglu_bank,
};
use ndarray::{Array2, Array3};
use serde::Serialize;

use super::{BenchArgs, BenchRow, time_row};
use crate::CliError;
use crate::output::{Format, Table};

/// Rows per expert of the compute probe (`--bandwidth`): enough for the grouped products to run at their
/// compute rate.
const PROBE_ROWS_PER_EXPERT: usize = 256;

/// GPT-OSS's GLU slope and clamp (transformers `GptOssExperts`: `alpha = 1.702`, `limit = 7.0`).
const GPT_OSS_ALPHA: f32 = 1.702;
/// See [`GPT_OSS_ALPHA`].
const GPT_OSS_LIMIT: f32 = 7.0;

/// Parses `--dtype`: one [`Dtype`] name or a comma list of distinct names.
///
/// # Errors
/// [`CliError::Usage`] for an unknown or repeated name.
pub(super) fn parse_list(s: &str) -> Result<Vec<Dtype>, CliError> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim) {
        let d = Dtype::parse(name).map_err(|e| CliError::Usage(format!("--dtype: {e}")))?;
        if out.contains(&d) {
            return Err(CliError::Usage(format!("--dtype lists {name} twice")));
        }
        out.push(d);
    }
    Ok(out)
}

/// The random f32 bank of a bench shape, seeded: SwiGLU (`random_swiglu_bank`), or for `gpt_oss` a GPT-OSS bank
/// (interleaved gate/up `[E, d, 2f]`, `[E, f, d]` down, small biases, alpha 1.702, limit 7) holding the same
/// random weights.
///
/// # Errors
/// As `random_swiglu_bank`; [`MoeError::Shape`] never for a bank built here.
pub(super) fn random_bank(
    gpt_oss: bool,
    (e, d, f): (usize, usize, usize),
    seed: u64,
) -> Result<ExpertBank, MoeError> {
    let bank = random_swiglu_bank(e, d, f, seed)?;
    if !gpt_oss {
        return Ok(bank);
    }
    let ExpertBank::SwiGlu(s) = &bank else {
        return Err(MoeError::config("bench bank", bank.kind(), "a SwiGLU bank"));
    };
    let (gu, dn) = (s.gate_up(), s.down());
    // Column 2j of GPT-OSS's gate_up is gate row j of the SwiGLU bank, column 2j + 1 its up row f + j.
    let gate_up = Array3::from_shape_fn((e, d, 2 * f), |(x, i, c)| {
        gu[[x, if c % 2 == 0 { c / 2 } else { f + c / 2 }, i]]
    });
    let down = Array3::from_shape_fn((e, f, d), |(x, j, i)| dn[[x, i, j]]);
    // Small deterministic biases in [-0.03, 0.03].
    let bias = |n: usize| {
        Array2::from_shape_fn((e, n), |(x, j)| {
            ((x * 31 + j * 17) % 13) as f32 * 0.005 - 0.03
        })
    };
    drop(bank);
    Ok(ExpertBank::GptOss(GptOssBank::new(
        gate_up,
        bias(2 * f),
        down,
        bias(d),
        GPT_OSS_ALPHA,
        GPT_OSS_LIMIT,
    )?))
}

/// One row: a dtype at one T.
#[derive(Debug, Serialize)]
struct DtypeRow {
    /// The weight format of the experts.
    dtype: String,
    /// The timing (as the single-dtype bench's rows; `weight_gb_per_s` at the packed size).
    #[serde(flatten)]
    timing: BenchRow,
    /// Expert weight bytes one forward streams: `experts_hit · bytes_per_expert` (packed weights, scales,
    /// biases).
    weight_bytes: f64,
    /// `weight_gb_per_s / read_bandwidth_gb_per_s` (with `--bandwidth`).
    bandwidth_fraction: Option<f64>,
    /// `weight_bytes / read bandwidth`, ms: the time streaming the weights once takes at the measured bandwidth
    /// (with `--bandwidth`).
    memory_floor_ms: Option<f64>,
    /// `flops / peak_gflops` of this dtype, ms (with `--bandwidth`).
    compute_floor_ms: Option<f64>,
    /// `memory` when `memory_floor_ms >= compute_floor_ms`, else `compute` (with `--bandwidth`).
    bound: Option<&'static str>,
    /// `max |y − y_f32| / max |y_f32|` over the output on the same tokens (0 when `y_f32` is all zero).
    output_max_rel_err: f64,
    /// `‖y − y_f32‖₂ / ‖y_f32‖₂` (0 when `y_f32` is all zero).
    output_rel_rms: f64,
    /// Whether the routing equals the f32 layer's (the router stays f32, so it should).
    routing_identical: bool,
}

/// What one dtype's resident weights are.
#[derive(Debug, Serialize)]
struct DtypeSummary {
    dtype: String,
    /// Bytes of one expert as resident (packed weights, scales, f32 biases).
    bytes_per_expert: f64,
    /// `bytes_per_expert` over the f32 layer's.
    bytes_vs_f32: f64,
    /// Largest `|W − Ŵ|` over the expert weights (`PackedBank::error_against`).
    weight_max_abs_err: f64,
    /// `‖W − Ŵ‖₂ / ‖W‖₂` over the expert weights.
    weight_rel_rms: f64,
    /// With `--bandwidth`: T of the compute probe (about 256 rows per expert).
    compute_probe_tokens: Option<usize>,
    /// With `--bandwidth`: GFLOP/s this dtype's forward reaches at `compute_probe_tokens`, the "peak" its rows'
    /// compute floors use.
    peak_gflops: Option<f64>,
}

#[derive(Debug, Serialize)]
struct DtypeReport {
    shape: String,
    backend: String,
    device: String,
    clock: String,
    router: String,
    d_model: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    repeats: u32,
    skew: f64,
    clusters: usize,
    /// `--bf16-activations`: bf16 weights multiplied by bf16-rounded activations.
    bf16_activations: bool,
    /// Memory read bandwidth measured in the same run, GB/s (with `--bandwidth`).
    read_bandwidth_gb_per_s: Option<f64>,
    dtypes: Vec<DtypeSummary>,
    rows: Vec<DtypeRow>,
}

/// The layer, its f32 residency and the f32 outputs every dtype is compared with.
struct Reference {
    resident: Box<dyn DeviceLayer>,
    /// Per T of `--num-tokens`: the f32 output and routing.
    outputs: Vec<moe_core::LayerOutput>,
    bytes_per_expert: f64,
}

/// Runs the sweep over `dtypes` and prints it.
///
/// # Errors
/// Usage errors (exit code 2) for `--backward` with a list, a dtype the backend does not take, a bank the
/// format cannot hold (MXFP4 needs `d` and `f` multiples of 32); backend errors.
pub(super) fn run(
    registry: &RouterRegistry,
    a: &BenchArgs,
    (d, f, e, k): (usize, usize, usize, usize),
    dtypes: &[Dtype],
    shape: String,
) -> Result<(), CliError> {
    if a.backward {
        return Err(CliError::Usage(
            "--backward times the f32 training step: give --dtype one format (packed experts are not trained)"
                .into(),
        ));
    }
    let base = BackendOptions {
        threads: a.threads,
        cpu_kernels: CpuKernels::parse(&a.cpu_kernels)
            .map_err(|e| CliError::Usage(e.to_string()))?,
        bf16_activations: a.bf16_activations,
        ..BackendOptions::default()
    };
    let open = |dtype| crate::open_backend_with(&a.backend, BackendOptions { dtype, ..base });
    // Every backend first: a dtype the backend does not take fails before any work.
    let backends = dtypes
        .iter()
        .map(|&t| open(t))
        .collect::<Result<Vec<_>, _>>()?;
    let f32_backend = open(Dtype::F32)?;
    let c = crate::spec::parse_one(&a.router, registry, "bench")?;
    let router = registry
        .create(&c.name, &c.args(d, e, k, a.seed))
        .map_err(c.error_mapper(registry))?;
    let layer = MoeLayer::new(
        router,
        random_bank(a.shape.is_gpt_oss(), (e, d, f), a.seed)?,
    )?;
    let mut reference = f32_reference(f32_backend.as_ref(), layer, a, d)?;
    let read_bw = if a.bandwidth {
        let bw = f32_backend.read_bandwidth(1 << 30, 5)?;
        if bw.is_none() {
            return Err(CliError::Usage(format!(
                "--bandwidth: the {} backend has no memory bandwidth probe",
                f32_backend.name()
            )));
        }
        bw
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut summaries = Vec::new();
    let mut clock = "host wall clock";
    for (&dtype, backend) in dtypes.iter().zip(&backends) {
        let mut owned = None;
        if dtype != Dtype::F32 {
            let layer = Arc::new(reference.resident.layer().clone());
            owned = Some(backend.upload(layer)?);
        }
        let summary = summarise(
            dtype,
            owned.as_deref(),
            &reference,
            read_bw.is_some(),
            (e, k),
        )?;
        let resident = match owned.as_mut() {
            Some(r) => r.as_mut(),
            None => reference.resident.as_mut(),
        };
        let (probe_gflops, device_clock) = match summary.compute_probe_tokens {
            Some(tp) => {
                let repeats = a.repeats.min(3) as usize;
                let (row, dc) = time_row(resident, a, tp, (d, f), 0.0, repeats)?;
                (Some(row.gflops), dc)
            }
            None => (None, false),
        };
        let summary = DtypeSummary {
            peak_gflops: probe_gflops,
            ..summary
        };
        for (i, &t) in a.tokens.iter().enumerate() {
            let row = dtype_row(
                resident,
                a,
                (t, d, f),
                &reference.outputs[i],
                &summary,
                read_bw,
            )?;
            clock = if row.1 { "device events" } else { clock };
            rows.push(row.0);
        }
        if device_clock {
            clock = "device events";
        }
        summaries.push(summary);
    }
    let report = DtypeReport {
        shape,
        backend: f32_backend.name().to_string(),
        device: f32_backend.capabilities().device,
        clock: clock.to_string(),
        router: c.label,
        d_model: d,
        ffn: f,
        experts: e,
        top_k: k,
        repeats: a.repeats,
        skew: a.skew,
        clusters: a.clusters,
        bf16_activations: a.bf16_activations,
        read_bandwidth_gb_per_s: read_bw,
        dtypes: summaries,
        rows,
    };
    print_report(&report, a.format)
}

/// Uploads the f32 layer (as its only owner, so the backend may align its weights) and runs it once at every T.
fn f32_reference(
    backend: &dyn Backend,
    layer: MoeLayer,
    a: &BenchArgs,
    d: usize,
) -> Result<Reference, CliError> {
    let mut resident = backend.upload(Arc::new(layer))?;
    let mut outputs = Vec::with_capacity(a.tokens.len());
    for &t in &a.tokens {
        let w = workload(a, t, d)?;
        let input = RouterInput::new(w.hidden.view()).with_token_ids(&w.token_ids);
        outputs.push(resident.forward(&input)?);
    }
    let bytes_per_expert = expert_bytes(resident.layer().experts(), Dtype::F32);
    Ok(Reference {
        resident,
        outputs,
        bytes_per_expert,
    })
}

/// The workload of `t` tokens every dtype runs (the one `time_row` times: same seed, skew and clusters).
fn workload(a: &BenchArgs, t: usize, d: usize) -> Result<moe_core::Workload, CliError> {
    Ok(WorkloadConfig {
        tokens: t,
        d_model: d,
        seed: a.seed,
        skew: a.skew,
        clusters: a.clusters,
        ..Default::default()
    }
    .generate()?)
}

/// Bytes one expert of `bank` streams: a packed bank's `bytes_per_expert`; else every tensor's share of one
/// expert at `dtype`'s width for the weights (`[E, _, _]`) and f32 for biases (`[E, _]`), as a backend that
/// converts 16-bit weights itself (cuda) holds them.
pub(super) fn expert_bytes(bank: &ExpertBank, dtype: Dtype) -> f64 {
    if let ExpertBank::Packed(b) = bank {
        return b.bytes_per_expert() as f64;
    }
    let e = bank.n_experts().max(1);
    let width = if matches!(dtype, Dtype::Bf16 | Dtype::F16) {
        2
    } else {
        4
    };
    bank.params()
        .iter()
        .map(|p| {
            let per_expert = p.value.len() / e;
            per_expert * if p.value.ndim() >= 3 { width } else { 4 }
        })
        .sum::<usize>() as f64
}

/// A dtype's resident bytes and weight error (the packed bank's `error_against` the f32 bank; for a backend that
/// keeps its own 16-bit copy, the error of the same rounding done here), and its compute probe's T.
fn summarise(
    dtype: Dtype,
    resident: Option<&dyn DeviceLayer>,
    reference: &Reference,
    probe: bool,
    (e, k): (usize, usize),
) -> Result<DtypeSummary, CliError> {
    let original = reference.resident.layer().experts();
    let (bytes, err) = match resident.map(|r| r.layer().experts()) {
        None => (reference.bytes_per_expert, None),
        Some(ExpertBank::Packed(b)) => (
            b.bytes_per_expert() as f64,
            Some(b.error_against(original)?),
        ),
        Some(bank) => (
            expert_bytes(bank, dtype),
            Some(PackedBank::quantize(original, dtype)?.error_against(original)?),
        ),
    };
    Ok(DtypeSummary {
        dtype: dtype.name().to_string(),
        bytes_per_expert: bytes,
        bytes_vs_f32: bytes / reference.bytes_per_expert,
        weight_max_abs_err: err.map_or(0.0, |q| f64::from(q.max_abs)),
        weight_rel_rms: err.map_or(0.0, |q| q.rel_rms),
        compute_probe_tokens: probe.then(|| (PROBE_ROWS_PER_EXPERT * e).div_ceil(k).max(1)),
        peak_gflops: None,
    })
}

/// Times one dtype at `t` tokens and compares its output with the f32 layer's: the row, and whether the device
/// clock timed it.
fn dtype_row(
    resident: &mut dyn DeviceLayer,
    a: &BenchArgs,
    (t, d, f): (usize, usize, usize),
    f32_out: &moe_core::LayerOutput,
    summary: &DtypeSummary,
    read_bw: Option<f64>,
) -> Result<(DtypeRow, bool), CliError> {
    let w = workload(a, t, d)?;
    let input = RouterInput::new(w.hidden.view()).with_token_ids(&w.token_ids);
    let out = resident.forward(&input)?;
    let (max_rel, rel_rms) = output_error(&out.output, &f32_out.output);
    let routing_identical = out.routing == f32_out.routing;
    drop(out);
    let (timing, device_clock) = time_row(
        resident,
        a,
        t,
        (d, f),
        summary.bytes_per_expert,
        a.repeats as usize,
    )?;
    let weight_bytes = timing.experts_hit as f64 * summary.bytes_per_expert;
    let flops = timing.gflops * timing.median_ms * 1e6;
    let memory_floor_ms = read_bw.map(|bw| weight_bytes / bw / 1e6);
    let compute_floor_ms = summary.peak_gflops.map(|p| flops / p / 1e6);
    let bound = match (memory_floor_ms, compute_floor_ms) {
        (Some(m), Some(c)) => Some(if m >= c { "memory" } else { "compute" }),
        _ => None,
    };
    let row = DtypeRow {
        dtype: summary.dtype.clone(),
        bandwidth_fraction: read_bw.map(|bw| timing.weight_gb_per_s / bw),
        timing,
        weight_bytes,
        memory_floor_ms,
        compute_floor_ms,
        bound,
        output_max_rel_err: max_rel,
        output_rel_rms: rel_rms,
        routing_identical,
    };
    Ok((row, device_clock))
}

/// `(max |y − r| / max |r|, ‖y − r‖₂ / ‖r‖₂)`, each 0 when `r` is all zero; infinite for a non-finite `y`.
fn output_error(y: &Array2<f32>, r: &Array2<f32>) -> (f64, f64) {
    let (mut max_diff, mut max_ref, mut num, mut den) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in y.iter().zip(r.iter()) {
        let diff = if a.is_finite() {
            f64::from(a - b).abs()
        } else {
            f64::INFINITY
        };
        max_diff = max_diff.max(diff);
        max_ref = max_ref.max(f64::from(b).abs());
        num += diff * diff;
        den += f64::from(b) * f64::from(b);
    }
    let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
    (ratio(max_diff, max_ref), ratio(num, den).sqrt())
}

/// Prints the report in `format`.
fn print_report(report: &DtypeReport, format: Format) -> Result<(), CliError> {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    if format == Format::Table {
        println!(
            "{} on {}: d = {}, f = {}, E = {}, k = {}, router {}, median of {} runs ({}); accuracy against the f32 layer on the same tokens",
            report.backend,
            report.device,
            report.d_model,
            report.ffn,
            report.experts,
            report.top_k,
            report.router,
            report.repeats,
            report.clock
        );
        if let Some(bw) = report.read_bandwidth_gb_per_s {
            println!("memory read bandwidth (1 GiB, same threads): {bw:.1} GB/s");
        }
        for s in &report.dtypes {
            if let (Some(tp), Some(p)) = (s.compute_probe_tokens, s.peak_gflops) {
                println!("{} compute rate at T = {tp}: {p:.1} GFLOP/s", s.dtype);
            }
        }
        println!();
    }
    let mut t = Table::new(&[
        "dtype",
        "T",
        "median ms",
        "weights MB",
        "weights GB/s",
        "% of bandwidth",
        "GFLOP/s",
        "bound",
        "out max rel err",
        "out rel RMS",
        "weight rel RMS",
        "routing = f32",
    ]);
    let opt = |v: Option<f64>, scale: f64, prec: usize| {
        v.map_or("-".to_string(), |x| format!("{:.*}", prec, x * scale))
    };
    // Errors: `0` when exact (the f32 row), else three significant digits.
    let err = |v: f64| {
        if v == 0.0 {
            "0".to_string()
        } else {
            format!("{v:.2e}")
        }
    };
    for r in &report.rows {
        let weight_rms = report
            .dtypes
            .iter()
            .find(|s| s.dtype == r.dtype)
            .map(|s| s.weight_rel_rms);
        t.push(vec![
            r.dtype.clone(),
            r.timing.tokens.to_string(),
            format!("{:.3}", r.timing.median_ms),
            format!("{:.1}", r.weight_bytes / 1e6),
            format!("{:.2}", r.timing.weight_gb_per_s),
            opt(r.bandwidth_fraction, 100.0, 0),
            format!("{:.1}", r.timing.gflops),
            r.bound.unwrap_or("-").to_string(),
            err(r.output_max_rel_err),
            err(r.output_rel_rms),
            weight_rms.map_or("-".into(), err),
            if r.routing_identical { "yes" } else { "no" }.to_string(),
        ]);
    }
    print!("{}", t.render(format));
    Ok(())
}
