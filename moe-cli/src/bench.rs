//! `moe bench`: full-layer forward throughput on a backend over a range of T, as tokens/s, GFLOP/s and GB/s of
//! expert weights (PERFORMANCE.md conventions), median of repeated runs. Backends with a device clock (CUDA) are
//! timed by it, with the input already on the device; the others by the host's wall clock around `forward`.
//! `--backward` also times a training step (`forward_train` then `backward`, host wall clock) and the backward
//! alone, and reports the backward's time over the forward's; a backend or router without training exits with its
//! `Unsupported` error (exit code 2). `--ep-ranks R` and `--ep` (under `mpirun`) time the expert-parallel layer
//! (`bench_ep.rs`); `--from` a stack whose experts live on disk (`bench_store.rs`); `--dtype` with a comma list
//! times the layer in each weight format, with its accuracy against f32 (`bench_dtype.rs`).

#[path = "bench_dtype.rs"]
mod bench_dtype;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use moe_backends::cpu::CpuKernels;
use moe_backends::{BackendOptions, Dtype};
use moe_core::{
    DeviceLayer, MoeLayer, RouterInput, RouterRegistry, WorkloadConfig,
    workload::random_swiglu_bank,
};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};

/// Named layer shapes (PERFORMANCE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// d 1024, ffn 3584, E 8, k 2.
    MixtralLike,
    /// d 2048, ffn 1408, E 64, k 6.
    OlmoeLike,
    /// d 4096, ffn 14336, E 8, k 2.
    Mixtral8x7b,
    /// d 2048, ffn 768, E 128, k 8.
    Qwen3_30bA3b,
    /// d 2880, ffn 2880, E 8, k 4: GPT-OSS-20B's expert shape and top-4 with 8 of its 32 experts (`-e 32` is the
    /// whole layer, 3.2 GB of f32 weights), as a GPT-OSS bank (interleaved gate/up, biases, clamped GLU).
    GptOssLike,
}

impl Shape {
    fn dims(self) -> (usize, usize, usize, usize) {
        match self {
            Shape::MixtralLike => (1024, 3584, 8, 2),
            Shape::OlmoeLike => (2048, 1408, 64, 6),
            Shape::Mixtral8x7b => (4096, 14336, 8, 2),
            Shape::Qwen3_30bA3b => (2048, 768, 128, 8),
            Shape::GptOssLike => (2880, 2880, 8, 4),
        }
    }

    /// Whether the shape's experts are a GPT-OSS bank (else SwiGLU).
    fn is_gpt_oss(self) -> bool {
        self == Shape::GptOssLike
    }
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// A named shape; `--d-model`, `--ffn`, `--experts`, `--top-k` override its parts.
    #[arg(long, value_enum, default_value_t = Shape::MixtralLike)]
    shape: Shape,
    /// Hidden width d.
    #[arg(long, short = 'd')]
    d_model: Option<usize>,
    /// Expert FFN width f.
    #[arg(long)]
    ffn: Option<usize>,
    /// Experts E.
    #[arg(long, short = 'e')]
    experts: Option<usize>,
    /// Experts per token k.
    #[arg(long, short = 'k')]
    top_k: Option<usize>,
    /// Token counts T to time, comma-separated.
    #[arg(
        long = "num-tokens",
        short = 't',
        value_delimiter = ',',
        default_value = "16,128,512,2048"
    )]
    tokens: Vec<usize>,
    /// Router, `name[:key=value,...]`.
    #[arg(long, default_value = "softmax-topk")]
    router: String,
    /// Backend.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Precision of the resident expert weights: f32, bf16, f16, int8, fp8 or mxfp4 (the cpu backend quantises
    /// at upload, as does cuda; wgpu takes f32). A comma list (`f32,bf16,int8,fp8,mxfp4`) times each format in turn
    /// with its accuracy against the f32 layer on the same tokens and its bytes streamed (docs/LOWPREC.md). The
    /// router stays f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// CPU threads, 1 to 4 × the cores (at most 1024); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// CPU kernels: `auto` (for few rows per expert the AVX-512 dot kernel where the CPU has it, else AVX2's),
    /// `avx2` (the AVX2 dot kernel even on an AVX-512 CPU) or `portable` (the `gemm` crate for every product; packed
    /// formats decoded by the scalar reference, much slower).
    #[arg(long, default_value = "auto")]
    cpu_kernels: String,
    /// bf16 weights multiply bf16-rounded activations (AVX-512 BF16 `vdpbf16ps`, as PyTorch's bf16 blocks):
    /// about twice the compute rate of the default f32 activations on compute-bound rows; other formats and f32
    /// weights are unchanged. cpu backend with `--cpu-kernels auto` on a CPU with AVX-512 BF16 only (else exit 2).
    #[arg(long)]
    bf16_activations: bool,
    /// Timed runs per T (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=10000))]
    repeats: u32,
    /// Seed of weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Zipf exponent of the input clusters (0: every cluster equally likely, so expert loads stay near balanced,
    /// like HF blocks fed random inputs).
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// Input clusters the tokens are drawn around.
    #[arg(long, default_value_t = 256)]
    clusters: usize,
    /// Also measure the memory read bandwidth (a read-only pass over 1 GiB on the same threads), to judge
    /// weight-streaming rows against (backends with a bandwidth probe: cpu). The timed forwards then start with
    /// cold caches (a 128 MiB read, untimed, before each), so every weight byte comes from memory, as in decoding
    /// where each layer's experts differ: without it, a layer whose hit experts fit the last-level cache (2 MXFP4
    /// or int8 experts of the Mixtral-like shape do) is timed from that cache.
    #[arg(long)]
    bandwidth: bool,
    /// Also time the training step: `forward_train` + `backward_into` (the input's mode, `d_output` = ones, the
    /// routers' own aux-loss coefficients, gradients reused from step to step as a training loop does), and the
    /// backward alone, reported beside the forward with the ratio backward / forward (cpu backend). The backward
    /// does twice the forward's products, so about 2 is the floor; this project's target is at most 2.2 at
    /// T >= 512.
    #[arg(long)]
    backward: bool,
    /// Run a stack of MoE layers whose experts live in this safetensors file (every block with
    /// `experts.0.gate_proj.weight`, `experts.0.w1.weight` or `experts.gate_up_proj`, and its `gate.weight`),
    /// reading experts from disk as the routing selects them; `-t` tokens a step, `--repeats` steps per row on fresh
    /// tokens (cpu backend).
    #[arg(long, value_name = "CHECKPOINT")]
    from: Option<PathBuf>,
    /// With `--from`: experts resident per layer (default: all E).
    #[arg(long, value_name = "N")]
    resident_experts: Option<usize>,
    /// With `--from`: eviction policy, lru (the default), lfu, lfru, stale or pin (with `--profile`); belady
    /// needs the future (`moe cache-sim` runs it on a trace).
    #[arg(long, value_name = "POLICY")]
    policy: Option<String>,
    /// With `--from --policy pin`: a routing trace of this model (`moe route/train --trace`) whose per-layer
    /// expert counts say which experts to pin.
    #[arg(long, value_name = "TRACE")]
    profile: Option<PathBuf>,
    /// With `--from`: write the routing of every step (warm-up included; every layer, the next-layer gate's
    /// predictions with `--prefetch gate`) as a routing trace, for `moe cache-sim` or `--profile`.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With `--from`: prefetch each next layer's experts, predicted by its gate on the current layer's input, on
    /// a background thread (`gate`), or not (`none`).
    #[arg(long, value_enum, default_value_t = PrefetchArg::None)]
    prefetch: PrefetchArg,
    /// With `--from`: read every expert from the device, not the page cache (the file's cached pages are dropped
    /// with posix_fadvise before the run and after each expert's read).
    #[arg(long)]
    cold: bool,
    /// Write a random stack of `--layers` MoE blocks of the shape (BF16, the Hub's per-expert names, with gates)
    /// to this safetensors file, for `--from`, and exit.
    #[arg(long, value_name = "FILE")]
    write_checkpoint: Option<PathBuf>,
    /// With `--write-checkpoint`: MoE blocks to write (default 4).
    #[arg(long)]
    layers: Option<usize>,
    /// Expert parallelism on R thread ranks of this process: each rank takes `-t` tokens of one workload, owns
    /// E/R experts (contiguous blocks), and runs the layer with a dispatch and a combine all-to-all; reports step
    /// and all-to-all ms, bytes and messages per rank, load imbalance, and whether every output equals the
    /// single-rank layer's bit for bit (cpu backend).
    #[arg(long, value_name = "R")]
    ep_ranks: Option<usize>,
    /// Expert parallelism with one rank per MPI process: run as `mpirun -np R moe bench --ep ...` (a `moe` built
    /// with `--features mpi`); as `--ep-ranks` otherwise.
    #[arg(long)]
    ep: bool,
    /// With `--ep` / `--ep-ranks`: a per-rank capacity factor c (an owner runs at most ⌈c · S / R⌉ rows a step of S
    /// slots; the rest are dropped).
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    rank_capacity: Option<f32>,
    /// With `--ep` / `--ep-ranks`: seconds a rank waits for the others in a collective before it fails (a rank
    /// that died or stalls); default 60.
    #[arg(long, value_name = "SECONDS")]
    ep_timeout: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// `--prefetch` of the store bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrefetchArg {
    /// Load experts when the routing selects them.
    None,
    /// Prefetch each next layer's experts by its gate.
    Gate,
}

/// One row of `moe bench`.
#[derive(Debug, Serialize)]
struct BenchRow {
    tokens: usize,
    median_ms: f64,
    min_ms: f64,
    tokens_per_s: f64,
    /// `2 · slots · 3 · d · f / time`, slots = the kept assignments of the plan (`T · k` for top-k without drops);
    /// router and activation not counted.
    gflops: f64,
    /// Distinct experts that received tokens.
    experts_hit: usize,
    /// `experts_hit · 3 · d · f · bytes per weight / time`.
    weight_gb_per_s: f64,
    /// With `--backward`: median of `forward_train` + `backward`, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    train_step_median_ms: Option<f64>,
    /// With `--backward`: median of `backward` alone, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    backward_median_ms: Option<f64>,
    /// With `--backward`: `backward_median_ms / median_ms` (the target: at most 2.2 at T >= 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    backward_over_forward: Option<f64>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    /// The named shape (`custom` when a dimension was overridden).
    shape: String,
    backend: String,
    device: String,
    /// Expert weight precision.
    dtype: String,
    /// `--bf16-activations`: bf16 weights multiplied by bf16-rounded activations.
    bf16_activations: bool,
    /// What timed the runs: `device events` (the backend's own clock, input already on the device) or
    /// `host wall clock` (whole forward calls, copies included).
    clock: String,
    router: String,
    d_model: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    repeats: u32,
    /// Input cluster skew and count.
    skew: f64,
    /// See `skew`.
    clusters: usize,
    /// Memory read bandwidth measured in the same run, GB/s (with `--bandwidth`).
    read_bandwidth_gb_per_s: Option<f64>,
    rows: Vec<BenchRow>,
}

pub(crate) fn run(registry: &RouterRegistry, a: &BenchArgs) -> Result<(), CliError> {
    let (d0, f0, e0, k0) = a.shape.dims();
    let (d, f, e, k) = (
        a.d_model.unwrap_or(d0),
        a.ffn.unwrap_or(f0),
        a.experts.unwrap_or(e0),
        a.top_k.unwrap_or(k0),
    );
    if e == 0 {
        return Err(CliError::Usage("--experts must be at least 1".into()));
    }
    if k == 0 || k > e {
        return Err(CliError::Usage(format!(
            "--top-k must be between 1 and --experts ({e}), got {k}"
        )));
    }
    if a.ep || a.ep_ranks.is_some() || a.rank_capacity.is_some() {
        check_sizes(a, (d, f, e))?;
        return run_ep(registry, a, (d, f, e, k));
    }
    if let Some(done) = run_store(registry, a, (d, f, e, k)) {
        return done;
    }
    check_sizes(a, (d, f, e))?;
    let dtypes = bench_dtype::parse_list(&a.dtype)?;
    if dtypes.len() > 1 {
        return bench_dtype::run(registry, a, (d, f, e, k), &dtypes, shape_name(a));
    }
    let dtype = Dtype::parse(&a.dtype).map_err(|e| CliError::Usage(e.to_string()))?;
    let cpu_kernels =
        CpuKernels::parse(&a.cpu_kernels).map_err(|e| CliError::Usage(e.to_string()))?;
    let backend = crate::open_backend_with(
        &a.backend,
        BackendOptions {
            dtype,
            threads: a.threads,
            cpu_kernels,
            bf16_activations: a.bf16_activations,
        },
    )?;
    let c = crate::spec::parse_one(&a.router, registry, "bench")?;
    let router = registry
        .create(&c.name, &c.args(d, e, k, a.seed))
        .map_err(c.error_mapper(registry))?;
    let bank = bench_dtype::random_bank(a.shape.is_gpt_oss(), (e, d, f), a.seed)?;
    let layer = MoeLayer::new(router, bank)?;
    let mut resident = backend.upload(Arc::new(layer))?;
    // Bytes one expert streams: the packed size where the backend packed the bank (cpu), else 16 or 32 bits a
    // weight (cuda converts bf16 / f16 itself).
    let expert_bytes = bench_dtype::expert_bytes(resident.layer().experts(), dtype);
    let mut rows = Vec::new();
    let mut clock = "host wall clock";
    for &t in &a.tokens {
        let (row, device_clock) = time_row(
            resident.as_mut(),
            a,
            t,
            (d, f),
            expert_bytes,
            a.repeats as usize,
        )?;
        if device_clock {
            clock = "device events";
        }
        rows.push(row);
    }
    let read_bandwidth_gb_per_s = if a.bandwidth {
        let bw = backend.read_bandwidth(1 << 30, 5)?;
        if bw.is_none() {
            return Err(CliError::Usage(format!(
                "--bandwidth: the {} backend has no memory bandwidth probe",
                backend.name()
            )));
        }
        bw
    } else {
        None
    };
    let report = BenchReport {
        shape: shape_name(a),
        backend: backend.name().to_string(),
        device: backend.capabilities().device,
        dtype: a.dtype.clone(),
        bf16_activations: a.bf16_activations,
        clock: clock.to_string(),
        router: c.label,
        d_model: d,
        ffn: f,
        experts: e,
        top_k: k,
        repeats: a.repeats,
        skew: a.skew,
        clusters: a.clusters,
        read_bandwidth_gb_per_s,
        rows,
    };
    print_report(&report, a)
}

/// The `--shape` name, or `custom` when a dimension was overridden.
fn shape_name(a: &BenchArgs) -> String {
    let overridden =
        a.d_model.is_some() || a.ffn.is_some() || a.experts.is_some() || a.top_k.is_some();
    match a.shape.to_possible_value() {
        Some(v) if !overridden => v.get_name().to_string(),
        _ => "custom".to_string(),
    }
}

/// `--write-checkpoint` and `--from` (`bench_store.rs`): `Some` with their result when either is given; refuses
/// the store's flags without `--from`.
fn run_store(
    registry: &RouterRegistry,
    a: &BenchArgs,
    (d, f, e, k): (usize, usize, usize, usize),
) -> Option<Result<(), CliError>> {
    let run = || -> Result<Option<()>, CliError> {
        let usage = |m: &str| Err(CliError::Usage(m.into()));
        let store_flags = a.resident_experts.is_some()
            || a.cold
            || a.prefetch != PrefetchArg::None
            || a.profile.is_some()
            || a.policy.is_some()
            || a.trace.is_some();
        if a.write_checkpoint.is_some() && a.from.is_some() {
            return usage(
                "--write-checkpoint writes a checkpoint and exits: run --from FILE in a second command",
            );
        }
        if a.layers.is_some() && a.write_checkpoint.is_none() {
            return usage(
                "--layers is the number of blocks --write-checkpoint writes (a --from run takes every block of its file)",
            );
        }
        if a.from.is_none() && store_flags {
            return usage(
                "--resident-experts, --policy, --profile, --trace, --cold and --prefetch need --from CHECKPOINT (write one with --write-checkpoint)",
            );
        }
        if a.write_checkpoint.is_some() || a.from.is_some() {
            // Flags only (threads, clusters, T·d); the experts stay on disk.
            check_sizes(a, (d, f, 1))?;
        }
        if let Some(path) = &a.write_checkpoint {
            let layers = a.layers.unwrap_or(4);
            return crate::bench_store::write_checkpoint(path, layers, (d, f, e), a.seed).map(Some);
        }
        let Some(from) = &a.from else {
            return Ok(None);
        };
        if a.dtype != "f32" || a.backend != "cpu" || a.backward || a.bandwidth || a.bf16_activations
        {
            return usage(
                "--from runs on the cpu backend with f32 resident experts, forward only (leave out --dtype, --backend, --backward, --bandwidth and --bf16-activations)",
            );
        }
        if a.d_model.is_some() || a.ffn.is_some() || a.experts.is_some() {
            return usage(
                "-d, --ffn and -e describe the shape --write-checkpoint writes; --from reads them from its file",
            );
        }
        let policy = a.policy.as_deref().unwrap_or("lru");
        if a.profile.is_some() && policy != "pin" {
            return usage(
                "--profile gives the pin policy its expert counts: use it with --policy pin",
            );
        }
        crate::bench_store::run(
            registry,
            &crate::bench_store::StoreBench {
                from,
                resident: a.resident_experts,
                policy,
                profile: a.profile.as_deref(),
                trace: a.trace.as_deref(),
                prefetch: a.prefetch == PrefetchArg::Gate,
                cold: a.cold,
                router: &a.router,
                top_k: k,
                tokens: &a.tokens,
                repeats: a.repeats,
                seed: a.seed,
                skew: a.skew,
                clusters: a.clusters,
                threads: a.threads,
                format: a.format,
            },
        )
        .map(Some)
    };
    run().transpose()
}

/// `--ep` / `--ep-ranks` (`bench_ep.rs`).
fn run_ep(
    registry: &RouterRegistry,
    a: &BenchArgs,
    (d, f, e, k): (usize, usize, usize, usize),
) -> Result<(), CliError> {
    let usage = |m: &str| Err(CliError::Usage(m.into()));
    if !a.ep && a.ep_ranks.is_none() {
        return usage(
            "--rank-capacity is an expert-parallel option: add --ep-ranks R (thread ranks) or --ep (under mpirun)",
        );
    }
    if a.ep && a.ep_ranks.is_some() {
        return usage(
            "expert parallelism runs either on MPI processes (--ep, under mpirun) or on thread ranks (--ep-ranks R), not both",
        );
    }
    let store_flags = a.from.is_some()
        || a.write_checkpoint.is_some()
        || a.resident_experts.is_some()
        || a.policy.is_some()
        || a.profile.is_some()
        || a.trace.is_some()
        || a.cold
        || a.prefetch != PrefetchArg::None;
    if a.dtype != "f32" || a.backward || a.bandwidth || a.bf16_activations || store_flags {
        return usage(
            "--ep / --ep-ranks time the f32 forward of a random layer (leave out --dtype, --backward, --bandwidth, --bf16-activations and the store's flags --from, --write-checkpoint, --resident-experts, --policy, --profile, --trace, --cold, --prefetch)",
        );
    }
    let mpi_size = crate::bench_ep::mpirun_size();
    if a.ep && mpi_size.is_none() {
        return usage(
            "--ep runs one rank per MPI process: start it with mpirun -np R (or use --ep-ranks R for thread ranks in this process)",
        );
    }
    if a.ep_ranks.is_some() && mpi_size.is_some_and(|n| n > 1) {
        return usage(
            "--ep-ranks runs thread ranks inside one process, but this is one of several mpirun processes: use --ep under mpirun",
        );
    }
    let ranks = a.ep_ranks.or(mpi_size).unwrap_or(1);
    moe_ep::cost::check_ranks(e, ranks).map_err(|err| {
        CliError::Usage(format!(
            "{err} (the bench places E / R experts on each rank)"
        ))
    })?;
    if let Some(t) = a.ep_timeout
        && !(t.is_finite() && t > 0.0 && t <= 86_400.0)
    {
        return Err(CliError::Usage(format!(
            "--ep-timeout must be between 0 and 86400 seconds, got {t}"
        )));
    }
    if let Some(c) = a.rank_capacity
        && !(c.is_finite() && c > 0.0)
    {
        return Err(CliError::Usage(format!(
            "--rank-capacity must be above 0, got {c}"
        )));
    }
    let cpu_kernels =
        CpuKernels::parse(&a.cpu_kernels).map_err(|e| CliError::Usage(e.to_string()))?;
    let threads = a.threads.or(a.ep_ranks.map(|_| 1));
    let backend = crate::open_backend_with(
        &a.backend,
        BackendOptions {
            dtype: Dtype::F32,
            threads,
            cpu_kernels,
            bf16_activations: a.bf16_activations,
        },
    )?;
    let c = crate::spec::parse_one(&a.router, registry, "bench")?;
    let router = registry
        .create(&c.name, &c.args(d, e, k, a.seed))
        .map_err(c.error_mapper(registry))?;
    let layer = MoeLayer::new(router, random_swiglu_bank(e, d, f, a.seed)?)?;
    let b = crate::bench_ep::EpBench {
        layer: &layer,
        backend: Arc::from(backend),
        tokens: &a.tokens,
        repeats: a.repeats as usize,
        seed: a.seed,
        skew: a.skew,
        clusters: a.clusters,
        rank_capacity: a.rank_capacity,
        timeout: a.ep_timeout.map(std::time::Duration::from_secs_f64),
        format: a.format,
    };
    match a.ep_ranks {
        Some(r) => {
            crate::workload::check_range("--ep-ranks", r, 1, 1024)?;
            crate::bench_ep::run_threads(&b, r)
        }
        None => run_mpi(&b),
    }
}

#[cfg(feature = "mpi")]
fn run_mpi(b: &crate::bench_ep::EpBench<'_>) -> Result<(), CliError> {
    crate::bench_ep::run_mpi(b)
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: &crate::bench_ep::EpBench<'_>) -> Result<(), CliError> {
    Err(CliError::Usage(
        "--ep needs a moe built with MPI: cargo build --release -p moe-cli --features mpi, then mpirun -np R target/release/moe bench --ep ... (or --ep-ranks R for thread ranks)".into(),
    ))
}

/// Bounds `--threads`, `--clusters` and the sizes, and checks the memory estimate of the largest T, before any
/// allocation.
fn check_sizes(a: &BenchArgs, (d, f, e): (usize, usize, usize)) -> Result<(), CliError> {
    use crate::workload::{MAX_CLUSTERS, MAX_EXPERTS, check_range, routing_estimate};
    if let Some(t) = a.threads {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max = (4 * cores).min(1024);
        if t == 0 {
            return Err(CliError::Usage(
                "--threads must be at least 1 (leave it out to use all cores)".into(),
            ));
        }
        check_range("--threads", t, 1, max)?;
    }
    check_range("--clusters", a.clusters, 1, MAX_CLUSTERS)?;
    check_range("--experts", e, 1, MAX_EXPERTS)?;
    check_range("--d-model", d, 1, usize::MAX)?;
    check_range("--ffn", f, 1, usize::MAX)?;
    if a.tokens.is_empty() {
        return Err(CliError::Usage(
            "--num-tokens needs at least one count".into(),
        ));
    }
    let t = a.tokens.iter().copied().max().unwrap_or(0);
    let values = t as u128 * d as u128;
    if values > moe_core::workload::MAX_WORKLOAD_VALUES {
        return Err(CliError::Usage(format!(
            "--num-tokens {t} × --d-model {d} = {values} values, over the limit of 2^32 (T·d)"
        )));
    }
    let mut m = routing_estimate(t, d, e);
    m.add(
        "expert weights 3·E·d·f",
        3 * e as u128 * d as u128 * f as u128,
        1,
    )
    .add("layer outputs T·d", t as u128 * d as u128, 2)
    .add(
        "workload centres clusters·d",
        a.clusters as u128 * d as u128,
        1,
    );
    m.check()
}

/// Times `repeats` forwards at `t` tokens (after one warm-up): the row, and whether the device clock timed it.
/// Bytes read before each timed forward with `--bandwidth` (cold caches): 4x the 32 MiB last-level cache of the
/// machines we measure on.
const EVICT_BYTES: usize = 128 << 20;

fn time_row(
    resident: &mut dyn DeviceLayer,
    a: &BenchArgs,
    t: usize,
    (d, f): (usize, usize),
    expert_bytes: f64,
    repeats: usize,
) -> Result<(BenchRow, bool), CliError> {
    let w = WorkloadConfig {
        tokens: t,
        d_model: d,
        seed: a.seed,
        skew: a.skew,
        clusters: a.clusters,
        ..Default::default()
    }
    .generate()?;
    let input = RouterInput::new(w.hidden.view()).with_token_ids(&w.token_ids);
    let warm = resident.forward(&input)?;
    let experts_hit = warm.routing.active_experts().len();
    // Kept assignments: T·k for top-k without drops, fewer or more for capacity, expert choice or PEER.
    let slots = warm.routing.n_slots();
    drop(warm);
    let device = resident.device_times(&input, repeats)?;
    let device_clock = device.is_some();
    let mut times = match device {
        Some(ms) => ms.into_iter().map(|v| v / 1e3).collect(),
        None => {
            let mut times = Vec::with_capacity(repeats);
            let evict = a.bandwidth.then(|| vec![1u64; EVICT_BYTES / 8]);
            for _ in 0..repeats {
                if let Some(e) = &evict {
                    // Untimed: a read larger than any last-level cache, shared out among the layer's workers,
                    // pushes the weights out of every cache the forward runs on and leaves the workers awake.
                    resident.on_workers(&|i, n| {
                        let part = e.len().div_ceil(n.max(1));
                        let lo = (i * part).min(e.len());
                        let hi = (lo + part).min(e.len());
                        std::hint::black_box(
                            e[lo..hi].iter().fold(0u64, |s, &v| s.wrapping_add(v)),
                        );
                    });
                }
                let t0 = Instant::now();
                let out = resident.forward(&input)?;
                times.push(t0.elapsed().as_secs_f64());
                drop(out);
            }
            times
        }
    };
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    let flops = 2.0 * slots as f64 * 3.0 * d as f64 * f as f64;
    let bytes = experts_hit as f64 * expert_bytes;
    let (train_step_median_ms, backward_median_ms) = if a.backward {
        let (step, back) = time_training(resident, &input, repeats)?;
        (Some(step * 1e3), Some(back * 1e3))
    } else {
        (None, None)
    };
    let row = BenchRow {
        tokens: t,
        median_ms: med * 1e3,
        min_ms: times[0] * 1e3,
        tokens_per_s: t as f64 / med,
        gflops: flops / med / 1e9,
        experts_hit,
        weight_gb_per_s: bytes / med / 1e9,
        train_step_median_ms,
        backward_median_ms,
        backward_over_forward: backward_median_ms.map(|b| b / (med * 1e3)),
    };
    Ok((row, device_clock))
}

/// Medians in seconds of `repeats` training steps (`forward_train` + `backward_into`, the gradients reused from
/// step to step) and of the backward alone, after one warm-up step. A backend or router without training is a usage error (exit code 2) with its message.
fn time_training(
    resident: &mut dyn DeviceLayer,
    input: &RouterInput<'_>,
    repeats: usize,
) -> Result<(f64, f64), CliError> {
    let unsupported = |e: moe_core::MoeError| match e {
        moe_core::MoeError::Unsupported { .. } => CliError::Usage(format!("--backward: {e}")),
        other => other.into(),
    };
    let d_output = ndarray::Array2::<f32>::ones(input.hidden.dim());
    // The gradients of one step are handed back to the next (as a training loop does), so a steady step does not
    // allocate them.
    let mut grads = moe_core::LayerGrads::empty();
    let mut step = || -> Result<(f64, f64), CliError> {
        let t0 = Instant::now();
        let out = resident.forward_train(input).map_err(unsupported)?;
        let d_aux = out.routing.aux_coefficients();
        drop(out);
        let t1 = Instant::now();
        resident
            .backward_into(d_output.view(), &d_aux, &mut grads)
            .map_err(unsupported)?;
        let end = Instant::now();
        Ok(((end - t0).as_secs_f64(), (end - t1).as_secs_f64()))
    };
    step()?;
    let (mut steps, mut backs) = (Vec::with_capacity(repeats), Vec::with_capacity(repeats));
    for _ in 0..repeats {
        let (s, b) = step()?;
        steps.push(s);
        backs.push(b);
    }
    steps.sort_by(f64::total_cmp);
    backs.sort_by(f64::total_cmp);
    Ok((steps[steps.len() / 2], backs[backs.len() / 2]))
}

/// Prints the report in `a.format`.
fn print_report(report: &BenchReport, a: &BenchArgs) -> Result<(), CliError> {
    if a.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    if a.format == Format::Table {
        println!(
            "{} on {}: d = {}, f = {}, E = {}, k = {}, router {}, {} weights, median of {} runs ({})",
            report.backend,
            report.device,
            report.d_model,
            report.ffn,
            report.experts,
            report.top_k,
            report.router,
            report.dtype,
            a.repeats,
            report.clock
        );
        if let Some(bw) = report.read_bandwidth_gb_per_s {
            println!("memory read bandwidth (1 GiB, same threads): {bw:.1} GB/s");
        }
        println!();
    }
    let mut head = vec![
        "T",
        "median ms",
        "min ms",
        "tokens/s",
        "GFLOP/s",
        "experts hit",
        "weights GB/s",
    ];
    if a.backward {
        head.extend(["train step ms", "backward ms", "backward/forward"]);
    }
    let mut t = Table::new(&head);
    for r in &report.rows {
        let mut row = vec![
            r.tokens.to_string(),
            format!("{:.3}", r.median_ms),
            format!("{:.3}", r.min_ms),
            format!("{:.0}", r.tokens_per_s),
            format!("{:.1}", r.gflops),
            r.experts_hit.to_string(),
            format!("{:.2}", r.weight_gb_per_s),
        ];
        if a.backward {
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
            row.extend([
                ms(r.train_step_median_ms),
                ms(r.backward_median_ms),
                r.backward_over_forward
                    .map_or("-".into(), |v| format!("{v:.2}")),
            ]);
        }
        t.push(row);
    }
    print!("{}", t.render(a.format));
    Ok(())
}
