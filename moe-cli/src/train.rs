//! `moe train`: one small model per router plus the dense baseline at equal active parameters, trained with
//! `moe-train`, and what each learned: validation loss, balance while learning, cost.
//!
//! This module parses, checks sizes before anything is allocated, calls [`moe_train::trainer::train_lm`] (task
//! `charlm`) or [`moe_train::teacher::train_teacher`] (task `teacher`) once per run, and prints; it holds no math.
//!
//! Exit status: 0 when every run finished. A run that fails (a router that cannot be trained, a NaN) is a row
//! with its error, and the other runs go on; at the end the command exits 2 when every failure was the user's
//! input ([`moe_train::TrainError::is_bad_input`]: an untrainable router named in `--routers`, a NaN at this
//! learning rate, a checkpoint of another shape) and 1 when any was the machine's (a file that cannot be
//! written). With the default `--routers all`, routers that cannot train this configuration (a plugin without a
//! backward, options this shape does not allow) are rows with the reason and do not change the exit status,
//! unless no run finished.
//! When the command has one run only, its error is the command's error, printed alone.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use moe_core::{MoeError, RouterRegistry};
use moe_train::config::{BankKind, FfnConfig, FfnKind, LmConfig, TrainConfig};
use moe_train::teacher::TeacherConfig;
use moe_train::{Corpus, RunReport, TrainError};
use serde::Serialize;

use crate::CliError;
use crate::output::{Format, Table};
use crate::progress::TrainProgress;
use crate::workload::{MemoryEstimate, check_range};

/// Largest `--steps`, `--warmup`, `--eval-interval` and `--stop-after`.
const MAX_STEPS: usize = 100_000_000;
/// Largest `--batch`.
const MAX_BATCH: usize = 1 << 16;
/// Largest `--context`, `--d-model` (the model's own limits, `LmConfig::validate`).
const MAX_WIDTH: usize = 8192;
/// Largest `--layers`.
const MAX_LAYERS: usize = 64;
/// Largest `--heads`.
const MAX_HEADS: usize = 256;
/// Largest `--experts` and `--expert-width`.
const MAX_EXPERTS: usize = 1 << 16;
/// Largest `--eval-batches`.
const MAX_EVAL_BATCHES: usize = 100_000;
/// Bytes of the `generated` corpus (its 10 % validation part holds 100 KiB).
const GENERATED_BYTES: usize = 1 << 20;

/// What the models learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Task {
    /// A byte-level decoder-only language model on a corpus, scored by validation loss in nats and bits per byte.
    Charlm,
    /// A student MoE layer learns the function of a seeded teacher MoE, scored by MSE and by the adjusted Rand
    /// index of its routing against the teacher's (seconds per run).
    Teacher,
}

#[derive(Debug, Args)]
#[command(after_help = defaults_help())]
pub(crate) struct TrainArgs {
    /// What the models learn.
    #[arg(long, value_enum, default_value_t = Task::Charlm)]
    task: Task,
    /// Routers to train: `all` (every registered router, plugins included), a comma list of
    /// `name[:key=value,...]`, or `dense` (the dense baseline alone).
    #[arg(long, default_value = "all")]
    routers: String,
    /// Leave out the dense baseline (one expert of width k · expert width, at equal active parameters).
    #[arg(long)]
    no_dense: bool,
    /// Text of the `charlm` task: `shakespeare` or `jargon` (fetched once with `--fetch-corpus NAME`), `generated`
    /// (a small seeded synthetic text, for tests) or a path to a text file. Split 90 / 10, train / validation
    /// [default: shakespeare].
    #[arg(long, value_name = "NAME|PATH")]
    corpus: Option<String>,
    /// Install corpus NAME (`shakespeare`, `jargon`) into the cache ($MOE_CACHE_DIR, else
    /// $XDG_CACHE_HOME/moe-rs/corpora, else ~/.cache/moe-rs/corpora) and exit.
    #[arg(long, value_name = "NAME")]
    fetch_corpus: Option<String>,
    /// Optimizer steps per run (the defaults of this and every size below: moe-train's charlm configuration,
    /// listed at the end of `--help`).
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per batch B (tokens per step B · C); teacher task: samples per step.
    #[arg(long)]
    batch: Option<usize>,
    /// Context C: tokens per sequence.
    #[arg(long)]
    context: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Model width d; teacher task: the width of the inputs and targets.
    #[arg(long)]
    d_model: Option<usize>,
    /// Attention heads (a divisor of d).
    #[arg(long)]
    heads: Option<usize>,
    /// Experts per layer E.
    #[arg(long)]
    experts: Option<usize>,
    /// Experts per token k (routers with their own k option may override it).
    #[arg(short = 'k', long = "top-k")]
    top_k: Option<usize>,
    /// Hidden width F of one expert (the dense baseline's is k · F).
    #[arg(long)]
    expert_width: Option<usize>,
    /// Experts' kind: `mlp` (GELU) or `swiglu`.
    #[arg(long)]
    bank: Option<String>,
    /// Peak learning rate (AdamW).
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, allow_negative_numbers = true)]
    min_lr: Option<f32>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Decoupled weight decay of matrices and embeddings.
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f32>,
    /// Largest global gradient norm (0 disables clipping).
    #[arg(long, allow_negative_numbers = true)]
    grad_clip: Option<f32>,
    /// Replaces every router's load-balancing aux-loss coefficient [default: each router's own].
    #[arg(long, allow_negative_numbers = true)]
    aux_coef: Option<f32>,
    /// Replaces every router's z-loss coefficient [default: each router's own].
    #[arg(long, allow_negative_numbers = true)]
    z_coef: Option<f32>,
    /// Rate of the updates learned without gradient (DeepSeek-V3's correction bias).
    #[arg(long, allow_negative_numbers = true)]
    bias_rate: Option<f32>,
    /// Steps between validation passes (the last step is always evaluated).
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Batches of the fixed validation set.
    #[arg(long)]
    eval_batches: Option<usize>,
    /// Seed of the weights, the batches and the routers' noise.
    #[arg(long)]
    seed: Option<u64>,
    /// CPU threads, 1 to 4 × the cores (at most 1024) [default: all cores]; results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Write the validation-loss curves and the load CV over training as one SVG of two panels.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Save a checkpoint of each run as DIR/<label>.safetensors (the label with characters other than letters,
    /// digits, `.`, `-` and `_` replaced by `_`), at every evaluation and at the end.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Resume each run from DIR/<label>.safetensors, as written by `--save`.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Stop each run after this many steps, as if interrupted (the schedule still spans `--steps`); with `--save`,
    /// `--resume` continues it.
    #[arg(long)]
    stop_after: Option<usize>,
    /// After each routed run (task charlm), record a routing trace of the trained model on the fixed validation
    /// set in eval mode (one step per validation batch; per layer the experts each token used and, for layers
    /// l ≥ 1, the experts layer l's router predicts from layer l−1's FFN input) for `moe cache-sim`. With several
    /// routers, one file per router: FILE with the label inserted before the extension (`trace.moetrace` →
    /// `trace.softmax-topk.moetrace`). The dense baseline has no trace (one expert, nothing to cache).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

/// Where a run saves its checkpoint and where it resumes from.
type CheckpointPaths = (Option<PathBuf>, Option<PathBuf>);

/// The defaults of the size and optimizer flags, read from moe-train (`LmConfig::charlm`, `FfnConfig::charlm`,
/// `TrainConfig::default()`, `TeacherConfig::default()`), for `--help`.
fn defaults_help() -> String {
    let m = LmConfig::charlm(FfnConfig::charlm(FfnKind::Dense));
    let (f, t, tc) = (&m.ffn, TrainConfig::default(), TeacherConfig::default());
    let (tf, tt) = (
        moe_train::teacher::default_ffn(FfnKind::Dense),
        moe_train::teacher::default_train(),
    );
    let o = &t.optim;
    format!(
        "Defaults (moe-train's charlm configuration): --steps {} --batch {} --context {} --layers {} --d-model {} \
         --heads {} --experts {} -k {} --expert-width {} --bank {} --lr {} --min-lr {} --warmup {} --weight-decay {} \
         --grad-clip {} --bias-rate {} --eval-interval {} --eval-batches {} --seed {}; task teacher: --d-model {} \
         --batch {} --steps {} --experts {} -k {} --expert-width {} --lr {} --min-lr {} --warmup {} --weight-decay {} \
         --eval-interval {} --seed {}.",
        t.steps,
        t.batch,
        m.context,
        m.n_layers,
        m.d_model,
        m.n_heads,
        f.experts,
        f.top_k,
        f.expert_width,
        f.bank.name(),
        o.lr,
        o.min_lr,
        o.warmup,
        o.weight_decay,
        o.grad_clip,
        t.bias_rate,
        t.eval_interval,
        t.eval_batches,
        t.seed,
        tc.d_model,
        tc.batch,
        tt.steps,
        tf.experts,
        tf.top_k,
        tf.expert_width,
        tt.optim.lr,
        tt.optim.min_lr,
        tt.optim.warmup,
        tt.optim.weight_decay,
        tt.eval_interval,
        tt.seed,
    )
}

/// One run to do: its label (the dense baseline's is `dense`) and its FFN.
#[derive(Debug, Clone)]
struct RunSpec {
    label: String,
    ffn: FfnConfig,
}

/// Everything resolved from the flags, before any run.
#[derive(Debug, Clone)]
struct Plan {
    task: Task,
    runs: Vec<RunSpec>,
    /// The model of the first run (every run has it, with its own FFN).
    model: LmConfig,
    train: TrainConfig,
    threads: usize,
    /// Whether the routers are the default set (`all`): those that cannot train this configuration do not change
    /// the exit status.
    all: bool,
    /// The teacher task's data and teacher (task `teacher` only; `model` then carries the FFN alone).
    teacher: Option<TeacherConfig>,
    /// `--trace FILE` (task charlm).
    trace: Option<PathBuf>,
}

/// How one run ended.
#[derive(Debug)]
enum Outcome {
    Done(Box<RunReport>),
    Failed(FailedRun),
}

/// A run that did not finish, in the output.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FailedRun {
    /// The run's label.
    label: String,
    /// The error, as printed.
    error: String,
    /// Whether the error is the user's input (exit 2) rather than the machine's (exit 1).
    bad_input: bool,
    /// Whether the router cannot train this configuration at all (a plugin without a backward, options this
    /// shape does not allow), rather than failing while training.
    untrainable: bool,
}

/// The corpus of a `charlm` run, in the output.
#[derive(Debug, Clone, Serialize)]
struct CorpusInfo {
    name: String,
    bytes: usize,
    train_bytes: usize,
    val_bytes: usize,
}

/// The configuration in the JSON document: `{"model": LmConfig, "train": TrainConfig}` (`charlm`; the model of
/// the first router, every run has it with its own FFN, the dense baseline with FFN kind `dense`) or
/// `{"ffn": FfnConfig, "teacher": TeacherConfig, "train": TrainConfig}` (`teacher`).
#[derive(Debug, Serialize)]
struct ConfigDoc<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a LmConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ffn: Option<&'a FfnConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher: Option<&'a TeacherConfig>,
    train: &'a TrainConfig,
}

/// The `--format json` document.
#[derive(Debug, Serialize)]
struct TrainDoc<'a> {
    task: Task,
    config: ConfigDoc<'a>,
    corpus: Option<CorpusInfo>,
    cpu: String,
    threads: usize,
    runs: Vec<&'a RunReport>,
    failed: Vec<&'a FailedRun>,
}

pub(crate) fn run(registry: &RouterRegistry, a: &TrainArgs) -> Result<(), CliError> {
    if let Some(name) = &a.fetch_corpus {
        let cache = moe_train::data::cache_dir();
        let path = moe_train::fetch::fetch(name, &cache).map_err(train_error)?;
        eprintln!("corpus {name} is installed at {}", path.display());
        return Ok(());
    }
    if let Some(p) = &a.plot {
        crate::cache_sim::check_output("--plot", p)?;
    }
    let plan = plan(registry, a)?;
    estimate(&plan)?;
    let corpus = match plan.task {
        Task::Charlm => Some(load_corpus(
            a.corpus.as_deref().unwrap_or("shakespeare"),
            &plan,
        )?),
        Task::Teacher => None,
    };
    let paths = checkpoint_paths(&plan, a)?;
    check_trace(&plan)?;
    let early = early_checks(registry, &plan)?;
    let (outcomes, trace_errors) = run_all(
        registry,
        &plan,
        corpus.as_ref(),
        &paths,
        a.stop_after,
        early,
    );
    if let [Outcome::Failed(f)] = outcomes.as_slice() {
        return Err(if f.bad_input {
            CliError::Usage(f.error.clone())
        } else {
            CliError::Other(anyhow::anyhow!("{}", f.error))
        });
    }
    let config = ConfigDoc {
        model: (plan.task == Task::Charlm).then_some(&plan.model),
        ffn: (plan.task == Task::Teacher).then_some(&plan.model.ffn),
        teacher: plan.teacher.as_ref(),
        train: &plan.train,
    };
    let doc = TrainDoc {
        task: plan.task,
        config,
        corpus: corpus.as_ref().map(|c| CorpusInfo {
            name: c.name.clone(),
            bytes: c.bytes().len(),
            train_bytes: c.train().len(),
            val_bytes: c.val().len(),
        }),
        cpu: cpu_name(),
        threads: plan.threads,
        runs: outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Done(r) => Some(r.as_ref()),
                Outcome::Failed(_) => None,
            })
            .collect(),
        failed: outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Failed(f) => Some(f),
                Outcome::Done(_) => None,
            })
            .collect(),
    };
    // The results first: a plot that cannot be written must not lose them.
    print(&doc, &plan, &outcomes, a.format)?;
    if let Some(path) = &a.plot {
        write_plot(path, &plan, &doc.runs)?;
    }
    if !trace_errors.is_empty() {
        return Err(CliError::Other(anyhow::anyhow!(
            "{}",
            trace_errors.join("; ")
        )));
    }
    exit_status(&plan, &doc.failed)
}

/// Refuses `--trace` before any run trains: a path that cannot be written, or no routed run to trace.
fn check_trace(plan: &Plan) -> Result<(), CliError> {
    let Some(path) = &plan.trace else {
        return Ok(());
    };
    crate::cache_sim::check_output("--trace", path)?;
    if plan.runs.iter().all(|r| r.ffn.kind == FfnKind::Dense) {
        return Err(CliError::Usage(
            "--trace: no routed run to trace (the dense baseline has one expert that every token takes)".into(),
        ));
    }
    Ok(())
}

/// Records and writes the trace of one finished routed run (see `--trace`): the file's path, or the error as a
/// line naming the run. The dense baseline has none.
fn write_run_trace(
    plan: &Plan,
    spec: &RunSpec,
    run: &moe_train::trainer::LmRun<'_>,
    lm: &mut moe_train::model::Lm,
    corpus: &Corpus,
) -> Result<Option<PathBuf>, String> {
    let Some(file) = &plan.trace else {
        return Ok(None);
    };
    if spec.ffn.kind == FfnKind::Dense {
        return Ok(None);
    }
    let routed = plan
        .runs
        .iter()
        .filter(|r| r.ffn.kind != FfnKind::Dense)
        .count();
    let path = if routed > 1 {
        crate::cache_sim::per_run_path(file, &sanitise(&spec.label))
    } else {
        file.clone()
    };
    let fail = |e: String| format!("{}: trace {}: {e}", spec.label, path.display());
    let trace = moe_train::trace::record_trace(lm, run, corpus).map_err(|e| fail(e.to_string()))?;
    crate::cache_sim::write_trace(&path, &trace).map_err(|e| match e {
        CliError::Usage(m) => fail(m),
        CliError::Other(e) => fail(format!("{e:#}")),
    })?;
    Ok(Some(path))
}

/// The command's result once every row is printed: see the module docs.
fn exit_status(plan: &Plan, failed: &[&FailedRun]) -> Result<(), CliError> {
    let none_finished = failed.len() == plan.runs.len();
    let counted: Vec<&&FailedRun> = failed
        .iter()
        .filter(|f| none_finished || !(plan.all && f.untrainable))
        .collect();
    if counted.is_empty() {
        return Ok(());
    }
    let labels: Vec<&str> = counted.iter().map(|f| f.label.as_str()).collect();
    let msg = format!(
        "{} of {} runs failed: {} (see their rows)",
        counted.len(),
        plan.runs.len(),
        labels.join(", ")
    );
    if counted.iter().all(|f| f.bad_input) {
        Err(CliError::Usage(msg))
    } else {
        Err(CliError::Other(anyhow::anyhow!(msg)))
    }
}

/// A training error as a CLI error: the user's input exits 2, the machine's 1.
fn train_error(e: TrainError) -> CliError {
    if e.is_bad_input() {
        CliError::Usage(e.to_string())
    } else {
        CliError::Other(e.into())
    }
}

/// Whether `e` says the router cannot train this configuration at all (rather than failing while training).
fn is_untrainable(e: &TrainError) -> bool {
    matches!(
        e,
        TrainError::Untrainable { .. }
            | TrainError::Moe(MoeError::Unsupported { .. } | MoeError::InvalidConfig { .. })
    )
}

/// Refuses a non-finite value, or one below `min`, naming the flag.
fn check_float(flag: &str, v: f32, min: f32) -> Result<f32, CliError> {
    if !v.is_finite() || v < min {
        return Err(CliError::Usage(format!(
            "{flag} must be a finite number ≥ {min}, got {v}"
        )));
    }
    Ok(v)
}

/// The FFN: moe-train's defaults of the task (`charlm`, or the teacher task's) with the flags given.
fn ffn_config(a: &TrainArgs) -> Result<FfnConfig, CliError> {
    let mut ffn = match a.task {
        Task::Charlm => FfnConfig::charlm(FfnKind::Dense),
        Task::Teacher => moe_train::teacher::default_ffn(FfnKind::Dense),
    };
    if let Some(b) = &a.bank {
        ffn.bank = BankKind::parse(b).map_err(|_| {
            CliError::Usage(format!("--bank must be one of: mlp, swiglu; got {b:?}"))
        })?;
    }
    ffn.experts = a.experts.unwrap_or(ffn.experts);
    ffn.top_k = a.top_k.unwrap_or(ffn.top_k);
    ffn.expert_width = a.expert_width.unwrap_or(ffn.expert_width);
    check_range("--experts", ffn.experts, 1, MAX_EXPERTS)?;
    check_range("--top-k", ffn.top_k, 1, ffn.experts)?;
    check_range("--expert-width", ffn.expert_width, 1, MAX_EXPERTS)?;
    Ok(ffn)
}

/// The model: moe-train's `charlm` defaults with the flags given.
fn model_config(a: &TrainArgs, ffn: FfnConfig) -> Result<LmConfig, CliError> {
    let mut m = LmConfig::charlm(ffn);
    m.d_model = a.d_model.unwrap_or(m.d_model);
    m.n_layers = a.layers.unwrap_or(m.n_layers);
    m.n_heads = a.heads.unwrap_or(m.n_heads);
    m.context = a.context.unwrap_or(m.context);
    check_range("--d-model", m.d_model, 1, MAX_WIDTH)?;
    check_range("--layers", m.n_layers, 1, MAX_LAYERS)?;
    check_range("--heads", m.n_heads, 1, MAX_HEADS.min(m.d_model))?;
    if !m.d_model.is_multiple_of(m.n_heads) {
        return Err(CliError::Usage(format!(
            "--heads must divide --d-model ({}), got {}",
            m.d_model, m.n_heads
        )));
    }
    check_range("--context", m.context, 1, MAX_WIDTH)?;
    m.validate()?;
    Ok(m)
}

/// The loop: moe-train's defaults with the flags given.
fn train_config(a: &TrainArgs) -> Result<TrainConfig, CliError> {
    let mut t = match a.task {
        Task::Charlm => TrainConfig::default(),
        Task::Teacher => moe_train::teacher::default_train(),
    };
    t.steps = a.steps.unwrap_or(t.steps);
    t.batch = a.batch.unwrap_or(t.batch);
    t.eval_interval = a.eval_interval.unwrap_or(t.eval_interval);
    t.eval_batches = a.eval_batches.unwrap_or(t.eval_batches);
    t.seed = a.seed.unwrap_or(t.seed);
    t.optim.warmup = a.warmup.unwrap_or(t.optim.warmup);
    check_range("--steps", t.steps, 1, MAX_STEPS)?;
    check_range("--batch", t.batch, 1, MAX_BATCH)?;
    check_range("--eval-interval", t.eval_interval, 1, MAX_STEPS)?;
    check_range("--eval-batches", t.eval_batches, 1, MAX_EVAL_BATCHES)?;
    check_range("--warmup", t.optim.warmup, 0, MAX_STEPS)?;
    if let Some(n) = a.stop_after {
        check_range("--stop-after", n, 1, t.steps)?;
    }
    let o = &mut t.optim;
    o.lr = check_float("--lr", a.lr.unwrap_or(o.lr), 0.0)?;
    if o.lr == 0.0 {
        return Err(CliError::Usage("--lr must be > 0, got 0".into()));
    }
    o.min_lr = check_float("--min-lr", a.min_lr.unwrap_or(o.min_lr), 0.0)?;
    if o.min_lr > o.lr {
        return Err(CliError::Usage(format!(
            "--min-lr ({}) must not exceed --lr ({})",
            o.min_lr, o.lr
        )));
    }
    o.weight_decay = check_float(
        "--weight-decay",
        a.weight_decay.unwrap_or(o.weight_decay),
        0.0,
    )?;
    o.grad_clip = check_float("--grad-clip", a.grad_clip.unwrap_or(o.grad_clip), 0.0)?;
    t.bias_rate = check_float("--bias-rate", a.bias_rate.unwrap_or(t.bias_rate), 0.0)?;
    t.aux_coef = a
        .aux_coef
        .map(|v| check_float("--aux-coef", v, 0.0))
        .transpose()?;
    t.z_coef = a
        .z_coef
        .map(|v| check_float("--z-coef", v, 0.0))
        .transpose()?;
    Ok(t)
}

/// `--threads` bounded to 1..=4 × the cores (at most 1024); default all cores.
fn threads(a: &TrainArgs) -> Result<usize, CliError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match a.threads {
        None => Ok(cores),
        Some(0) => Err(CliError::Usage(
            "--threads must be at least 1 (leave it out to use all cores)".into(),
        )),
        Some(t) => {
            check_range("--threads", t, 1, (4 * cores).min(1024))?;
            Ok(t)
        }
    }
}

/// Resolves the flags into runs: the dense baseline first (unless `--no-dense`), then each router in the order
/// of `--routers`.
fn plan(registry: &RouterRegistry, a: &TrainArgs) -> Result<Plan, CliError> {
    let ffn = ffn_config(a)?;
    let mut train = train_config(a)?;
    let threads = threads(a)?;
    let (model, teacher) = match a.task {
        Task::Charlm => (model_config(a, ffn)?, None),
        Task::Teacher => {
            let t = teacher_config(a)?;
            train.batch = t.batch;
            // Only the FFN of this model is used: the student is one MoE layer of width `t.d_model`.
            let holder = LmConfig {
                d_model: t.d_model,
                n_layers: 1,
                n_heads: 1,
                ..LmConfig::charlm(ffn)
            };
            (holder, Some(t))
        }
    };
    let dense_only = a.routers.trim() == "dense" && registry.get("dense").is_none();
    if dense_only && a.no_dense {
        return Err(CliError::Usage(
            "nothing to train: --no-dense with --routers dense".into(),
        ));
    }
    let mut runs = Vec::new();
    if !a.no_dense {
        let ffn = FfnConfig {
            kind: FfnKind::Dense,
            ..model.ffn.clone()
        };
        runs.push(RunSpec {
            label: ffn.label(),
            ffn,
        });
    }
    if !dense_only {
        for c in crate::spec::parse_routers(&a.routers, registry)? {
            let ffn = FfnConfig {
                kind: FfnKind::Moe {
                    router: c.name.clone(),
                    options: c.options.clone(),
                },
                ..model.ffn.clone()
            };
            runs.push(RunSpec {
                label: ffn.label(),
                ffn,
            });
        }
    }
    for (i, r) in runs.iter().enumerate() {
        if runs[..i].iter().any(|q| q.label == r.label) {
            return Err(CliError::Usage(format!(
                "run {} is listed twice; give each run different options",
                r.label
            )));
        }
    }
    let model = match runs.iter().find(|r| r.ffn.kind != FfnKind::Dense) {
        Some(first) => LmConfig {
            ffn: first.ffn.clone(),
            ..model
        },
        None => model,
    };
    Ok(Plan {
        task: a.task,
        runs,
        model,
        train,
        threads,
        all: a.routers.trim() == "all",
        teacher,
        trace: a.trace.clone(),
    })
}

/// The teacher task's configuration: moe-train's defaults with `--d-model` and `--batch`; the flags of the
/// language model are refused.
fn teacher_config(a: &TrainArgs) -> Result<TeacherConfig, CliError> {
    let lm_only = [
        ("--context", a.context.is_some()),
        ("--layers", a.layers.is_some()),
        ("--heads", a.heads.is_some()),
        ("--corpus", a.corpus.is_some()),
        ("--eval-batches", a.eval_batches.is_some()),
        ("--save", a.save.is_some()),
        ("--resume", a.resume.is_some()),
        ("--stop-after", a.stop_after.is_some()),
        ("--trace", a.trace.is_some()),
    ];
    if let Some((flag, _)) = lm_only.iter().find(|(_, given)| *given) {
        return Err(CliError::Usage(format!(
            "{flag} applies to --task charlm only (the teacher task trains one MoE layer on generated samples)"
        )));
    }
    let mut t = TeacherConfig::default();
    t.d_model = a.d_model.unwrap_or(t.d_model);
    t.batch = a.batch.unwrap_or(t.batch);
    check_range("--d-model", t.d_model, 1, MAX_WIDTH)?;
    check_range("--batch", t.batch, 1, MAX_BATCH)?;
    t.validate()?;
    Ok(t)
}

/// Checks the memory one run needs before anything is allocated: the parameters with their gradients and the
/// optimizer's two moments (4 copies), and the activations of one step kept for the backward (per block: about
/// 16 · T · d, the attention probabilities B · H · C², the experts' hidden activations 3 · T · k · F, the
/// routing 4 · T · E; the logits 2 · T · V).
fn estimate(plan: &Plan) -> Result<(), CliError> {
    if let Some(t) = &plan.teacher {
        return estimate_teacher(plan, t);
    }
    let m = &plan.model;
    let f = &m.ffn;
    let (d, l, v, c) = (
        m.d_model as u128,
        m.n_layers as u128,
        m.vocab as u128,
        m.context as u128,
    );
    let (e, k, w) = (f.experts as u128, f.top_k as u128, f.expert_width as u128);
    let t = plan.train.batch as u128 * c;
    let expert = f.bank.expert_params(m.d_model, f.expert_width) as u128;
    let params = v * d + c * d + d + l * (4 * d * d + 2 * d + e * d + e * expert);
    let mut est = MemoryEstimate::default();
    est.add("parameters, gradients and AdamW moments", params, 4)
        .add("activations per block 16·T·d", l * t * d, 16)
        .add(
            "attention probabilities B·H·C² per block",
            l * plan.train.batch as u128 * m.n_heads as u128 * c * c,
            2,
        )
        .add("expert activations 3·T·k·F per block", l * t * k * w, 3)
        .add("routing 4·T·E per block", l * t * e, 4)
        .add("logits T·V", t * v, 2);
    est.check()
}

/// The teacher task's memory: the teacher's and the student's experts (the student's with gradients and moments),
/// a batch and the held-out set with their targets, and the experts' activations.
fn estimate_teacher(plan: &Plan, t: &TeacherConfig) -> Result<(), CliError> {
    let f = &plan.model.ffn;
    let (d, e, k) = (t.d_model as u128, f.experts as u128, f.top_k as u128);
    let expert = f.bank.expert_params(t.d_model, f.expert_width) as u128;
    let samples = (t.batch + t.val_samples) as u128;
    let mut est = MemoryEstimate::default();
    est.add("teacher experts E·expert", e * expert, 1)
        .add(
            "student experts, gradients and moments",
            e * expert + e * d,
            4,
        )
        .add("samples and targets", samples * d, 4)
        .add(
            "expert activations 3·B·k·F",
            samples * k * f.expert_width as u128,
            3,
        );
    est.check()
}

/// The corpus of the `charlm` task, checked to hold one window of context + 1 bytes in each part.
fn load_corpus(name: &str, plan: &Plan) -> Result<Corpus, CliError> {
    let context = plan.model.context;
    if name == "generated" {
        let bytes = moe_train::data::generated(plan.train.seed, GENERATED_BYTES);
        return Corpus::from_bytes("generated", bytes, context + 2).map_err(train_error);
    }
    moe_train::data::load(name, &moe_train::data::cache_dir(), context).map_err(train_error)
}

/// `label` as a file name: letters, digits, `.`, `-` and `_` kept, anything else `_`.
pub(crate) fn sanitise(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The checkpoint paths of each run `(save, resume)`: `--save` creates its directory; `--resume` needs every
/// run's file. Two labels with the same file name are refused.
fn checkpoint_paths(plan: &Plan, a: &TrainArgs) -> Result<Vec<CheckpointPaths>, CliError> {
    let names: Vec<String> = plan
        .runs
        .iter()
        .map(|r| format!("{}.safetensors", sanitise(&r.label)))
        .collect();
    for (i, n) in names.iter().enumerate() {
        if let Some(j) = names[..i].iter().position(|m| m == n) {
            return Err(CliError::Usage(format!(
                "runs {} and {} would share the checkpoint file {n}",
                plan.runs[j].label, plan.runs[i].label
            )));
        }
    }
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the --save directory {}", dir.display()))?;
    }
    let mut out = Vec::with_capacity(names.len());
    for (n, r) in names.iter().zip(&plan.runs) {
        let resume = match &a.resume {
            Some(dir) => {
                let p = dir.join(n);
                if !p.is_file() {
                    return Err(CliError::Usage(format!(
                        "--resume {}: no checkpoint {n} for run {} (write one with --save)",
                        dir.display(),
                        r.label
                    )));
                }
                Some(p)
            }
            None => None,
        };
        out.push((a.save.as_ref().map(|d| d.join(n)), resume));
    }
    Ok(out)
}

/// Builds every run's router and experts once before the first run trains (`charlm`): with routers the user
/// named, a bad one (an unknown option, experts that do not fit) is the command's error at once, before minutes
/// of other runs; under `--routers all` it becomes that run's failed row. One entry per run.
fn early_checks(
    registry: &RouterRegistry,
    plan: &Plan,
) -> Result<Vec<Option<moe_train::TrainError>>, CliError> {
    let mut out = Vec::with_capacity(plan.runs.len());
    for spec in &plan.runs {
        let err = match plan.task {
            Task::Charlm => moe_train::model::check_ffn(
                registry,
                &LmConfig {
                    ffn: spec.ffn.clone(),
                    ..plan.model.clone()
                },
            )
            .err(),
            Task::Teacher => None,
        };
        if let Some(e) = &err
            && !plan.all
            && e.is_bad_input()
        {
            return Err(CliError::Usage(format!("{}: {e}", spec.label)));
        }
        out.push(err);
    }
    Ok(out)
}

/// Trains every run in turn; a failed run is an outcome, not the end. `early` holds the errors
/// [`early_checks`] found (those runs do not train).
fn run_all(
    registry: &RouterRegistry,
    plan: &Plan,
    corpus: Option<&Corpus>,
    paths: &[CheckpointPaths],
    stop_after: Option<usize>,
    mut early: Vec<Option<moe_train::TrainError>>,
) -> (Vec<Outcome>, Vec<String>) {
    let per_run = stop_after.unwrap_or(plan.train.steps) as u64;
    let mut progress = TrainProgress::new(per_run * plan.runs.len() as u64);
    let mut out = Vec::with_capacity(plan.runs.len());
    let mut trace_errors = Vec::new();
    let model = |spec: &RunSpec| LmConfig {
        ffn: spec.ffn.clone(),
        ..plan.model.clone()
    };
    for (i, (spec, (save, resume))) in plan.runs.iter().zip(paths).enumerate() {
        progress.start_run(&spec.label, per_run * i as u64);
        let result = match (plan.task, corpus, early[i].take()) {
            (_, _, Some(e)) => Err(e),
            (Task::Charlm, Some(corpus), None) => {
                let run = moe_train::trainer::LmRun {
                    registry,
                    model: model(spec),
                    train: plan.train.clone(),
                    threads: plan.threads,
                    save: save.clone(),
                    resume: resume.clone(),
                    stop_after,
                };
                moe_train::trainer::train_lm_model(&run, corpus, &mut progress).map(
                    |(report, mut lm)| {
                        match write_run_trace(plan, spec, &run, &mut lm, corpus) {
                            Ok(Some(p)) => progress.println(&format!("wrote {}", p.display())),
                            Ok(None) => {}
                            Err(e) => trace_errors.push(e),
                        }
                        report
                    },
                )
            }
            _ => moe_train::teacher::train_teacher(
                registry,
                &spec.ffn,
                plan.teacher.as_ref().unwrap_or(&TeacherConfig::default()),
                &plan.train,
                plan.threads,
                &mut progress,
            ),
        };
        out.push(match result {
            Ok(r) => Outcome::Done(Box::new(r)),
            Err(e) => {
                if plan.runs.len() > 1 {
                    progress.println(&format!("{}: {e}", spec.label));
                }
                Outcome::Failed(FailedRun {
                    label: spec.label.clone(),
                    error: e.to_string(),
                    bad_input: e.is_bad_input(),
                    // The dense baseline is no router: its failure always counts.
                    untrainable: spec.ffn.kind != FfnKind::Dense && is_untrainable(&e),
                })
            }
        });
    }
    progress.finish();
    (out, trace_errors)
}

/// The CPU's model name (`model name` of /proc/cpuinfo), or `unknown`.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The dense baseline's report, if it ran.
fn dense_of<'a>(runs: &[&'a RunReport]) -> Option<&'a RunReport> {
    runs.iter().copied().find(|r| r.label == "dense")
}

/// A parameter count with a k / M suffix.
fn params(n: usize) -> String {
    match n {
        n if n >= 10_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// The note of a finished run: the dense baseline, or what a non-causal router leaks.
fn note(r: &RunReport) -> String {
    if r.curve.is_empty() && !r.final_val_loss.is_finite() {
        return format!(
            "stopped at step {} before the first evaluation (--eval-interval)",
            r.steps
        );
    }
    if r.label == "dense" {
        return "baseline".into();
    }
    if r.causal {
        return String::new();
    }
    match &r.leak {
        Some(l) if l.starts_with("not causal") => l.clone(),
        Some(l) => format!("not causal: {l}"),
        None => "not causal: routing sees later tokens of the batch".into(),
    }
}

/// One row per run, in the order trained.
fn table(task: Task, outcomes: &[Outcome], dense: Option<&RunReport>) -> Table {
    let (loss, unit2, best, train, thr) = match task {
        Task::Charlm => (
            "val nats/B",
            "val bits/B",
            "best val (step)",
            "train",
            "tok/s",
        ),
        Task::Teacher => (
            "val MSE",
            "ARI",
            "best MSE (step)",
            "train MSE",
            "samples/s",
        ),
    };
    let mut t = Table::new(&[
        "run",
        loss,
        unit2,
        best,
        train,
        "vs dense",
        thr,
        "wall s",
        "load cv",
        "dropped %",
        "dead",
        "max logit",
        "active/total params",
        "note",
    ]);
    for o in outcomes {
        let r = match o {
            Outcome::Done(r) => r,
            Outcome::Failed(f) => {
                let mut row = vec![f.label.clone()];
                row.extend(std::iter::repeat_n("-".to_string(), 12));
                row.push(format!("failed: {}", f.error));
                t.push(row);
                continue;
            }
        };
        let second = match task {
            Task::Charlm => format!("{:.4}", r.final_val_bpb()),
            // Rounded before printing so that a tiny negative ARI shows as 0.000, not -0.000.
            Task::Teacher => r.ari.map_or("-".into(), |a| {
                format!("{:.3}", (a * 1e3).round() / 1e3 + 0.0)
            }),
        };
        // A run stopped (`--stop-after`) before its first evaluation has no loss to show.
        let loss = |v: f64| {
            if v.is_finite() {
                format!("{v:.4}")
            } else {
                "-".into()
            }
        };
        let vs = match dense {
            Some(d) if d.label != r.label => {
                let diff = r.final_val_loss - d.final_val_loss;
                if diff.is_finite() {
                    format!("{diff:+.4}")
                } else {
                    "-".into()
                }
            }
            _ => "-".into(),
        };
        let second = if r.final_val_loss.is_finite() {
            second
        } else {
            "-".into()
        };
        t.push(vec![
            r.label.clone(),
            loss(r.final_val_loss),
            second,
            if r.best_val_loss.is_finite() {
                format!("{:.4} ({})", r.best_val_loss, r.best_step)
            } else {
                "-".into()
            },
            loss(r.final_train_loss),
            vs,
            format!("{:.0}", r.tokens_per_s),
            format!("{:.1}", r.wall_s),
            format!("{:.3}", r.load_cv),
            format!("{:.2}", r.dropped_pct),
            r.dead_experts.to_string(),
            format!("{:.2}", r.max_router_logit),
            format!("{}/{}", params(r.active_params), params(r.total_params)),
            note(r),
        ]);
    }
    t
}

/// The CSV rows: every figure unrounded, one column each (the table's cells are rounded and combined for
/// reading). Losses are nats per byte (charlm) or MSE (teacher); empty cells where a run failed or a figure does
/// not apply.
fn csv_table(outcomes: &[Outcome], dense: Option<&RunReport>) -> Table {
    let mut t = Table::new(&[
        "run",
        "final_val_loss",
        "final_val_bits_per_byte",
        "best_val_loss",
        "best_step",
        "final_train_loss",
        "val_loss_minus_dense",
        "tokens_per_s",
        "wall_s",
        "load_cv",
        "dropped_pct",
        "dead_experts",
        "max_router_logit",
        "active_params",
        "total_params",
        "ari",
        "causal",
        "note",
    ]);
    for o in outcomes {
        let r = match o {
            Outcome::Done(r) => r,
            Outcome::Failed(f) => {
                let mut row = vec![f.label.clone()];
                row.extend(std::iter::repeat_n(String::new(), 16));
                row.push(format!("failed: {}", f.error));
                t.push(row);
                continue;
            }
        };
        let vs = match dense {
            Some(d) if d.label != r.label => (r.final_val_loss - d.final_val_loss).to_string(),
            _ => String::new(),
        };
        t.push(vec![
            r.label.clone(),
            r.final_val_loss.to_string(),
            r.final_val_bpb().to_string(),
            r.best_val_loss.to_string(),
            r.best_step.to_string(),
            r.final_train_loss.to_string(),
            vs,
            r.tokens_per_s.to_string(),
            r.wall_s.to_string(),
            r.load_cv.to_string(),
            r.dropped_pct.to_string(),
            r.dead_experts.to_string(),
            r.max_router_logit.to_string(),
            r.active_params.to_string(),
            r.total_params.to_string(),
            r.ari.map_or(String::new(), |a| a.to_string()),
            r.causal.to_string(),
            note(r),
        ]);
    }
    t
}

/// The lines above the table: task, corpus, model, loop, machine.
fn header(doc: &TrainDoc<'_>, plan: &Plan) -> Vec<String> {
    let (m, t, f) = (&plan.model, &plan.train, &plan.model.ffn);
    let mut lines = Vec::new();
    match &doc.corpus {
        Some(c) => lines.push(format!(
            "task charlm on corpus {} ({} bytes: {} train, {} validation)",
            c.name, c.bytes, c.train_bytes, c.val_bytes
        )),
        None => lines.push("task teacher (student MoE layer vs a seeded teacher MoE)".into()),
    }
    if let Some(tc) = &plan.teacher {
        lines.push(format!(
            "teacher: d {}, {} held-out samples, noise {}, seed {}",
            tc.d_model, tc.val_samples, tc.noise, tc.seed
        ));
    }
    if plan.task == Task::Charlm {
        lines.push(format!(
            "model: d {}, {} layers, {} heads, context {}",
            m.d_model, m.n_layers, m.n_heads, m.context
        ));
    }
    lines.push(format!(
        "ffn: {} {} experts of width {}, top-{} (dense baseline: one expert of width {})",
        f.experts,
        f.bank.name(),
        f.expert_width,
        f.top_k,
        f.top_k * f.expert_width
    ));
    let o = &t.optim;
    let eval = match plan.task {
        Task::Charlm => format!(
            "eval every {} steps on {} batches",
            t.eval_interval, t.eval_batches
        ),
        Task::Teacher => format!("eval every {} steps", t.eval_interval),
    };
    lines.push(format!(
        "train: {} steps × batch {}, AdamW lr {} → {}, warm-up {}, weight decay {}, clip {}, {eval}, seed {}",
        t.steps, t.batch, o.lr, o.min_lr, o.warmup, o.weight_decay, o.grad_clip, t.seed
    ));
    lines.push(format!("cpu: {}, {} threads", doc.cpu, doc.threads));
    if o.warmup >= t.steps {
        lines.push(format!(
            "note: the warm-up ({} steps) is not shorter than the run ({} steps): the learning rate never reaches \
             --lr {} (set --warmup)",
            o.warmup, t.steps, o.lr
        ));
    }
    lines
}

/// Active parameters outside the routers within this fraction of the dense baseline's count as equal (the sizing
/// of `moe_train::model::ffn_shape` makes them equal; a user's option such as `softmax-topk:k=3` does not).
const EQUAL_ACTIVE: f64 = 0.01;

/// The lines under the table: which routers beat dense at equal active parameters (within [`EQUAL_ACTIVE`]), and
/// which had a lower loss with more active parameters (PEER's product keys, for example), said apart.
fn verdict(task: Task, runs: &[&RunReport], dense: &RunReport) -> Vec<String> {
    let unit = match task {
        Task::Charlm => "nats/byte",
        Task::Teacher => "MSE",
    };
    let (mut equal, mut more) = (Vec::new(), Vec::new());
    for r in runs
        .iter()
        .filter(|r| r.label != dense.label && r.final_val_loss < dense.final_val_loss)
    {
        // The experts a token uses (the routers' own parameters apart: a gate of E · d per layer is not FFN work).
        let experts = |x: &RunReport| x.active_params.saturating_sub(x.router_params).max(1) as f64;
        let ratio = experts(r) / experts(dense);
        let diff = r.final_val_loss - dense.final_val_loss;
        // A router that is not causal sees later tokens: its lower loss is no win on its own.
        let leak = if r.causal {
            ""
        } else {
            ", not causal: optimistic"
        };
        if (ratio - 1.0).abs() <= EQUAL_ACTIVE {
            equal.push(format!("{} ({diff:+.4}{leak})", r.label));
        } else {
            more.push(format!(
                "{} ({diff:+.4} with {ratio:.2}× the active parameters{leak})",
                r.label
            ));
        }
    }
    let mut lines = vec![if equal.is_empty() {
        format!(
            "no router beat dense ({:.4} {unit}) at equal active parameters",
            dense.final_val_loss
        )
    } else {
        format!(
            "beat dense ({:.4} {unit}) at equal active parameters and steps: {}",
            dense.final_val_loss,
            equal.join(", ")
        )
    }];
    if !more.is_empty() {
        lines.push(format!(
            "lower than dense, but not at equal active parameters: {}",
            more.join(", ")
        ));
    }
    lines
}

fn print(
    doc: &TrainDoc<'_>,
    plan: &Plan,
    outcomes: &[Outcome],
    format: Format,
) -> Result<(), CliError> {
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(doc).context("serialising the report")?
        );
        return Ok(());
    }
    let dense = dense_of(&doc.runs);
    if format == Format::Csv {
        print!("{}", csv_table(outcomes, dense).render(format));
        return Ok(());
    }
    let t = table(plan.task, outcomes, dense);
    for line in header(doc, plan) {
        println!("{line}");
    }
    println!();
    print!("{}", t.render(format));
    if let Some(d) = dense
        && doc.runs.len() > 1
        && d.final_val_loss.is_finite()
    {
        println!();
        for line in verdict(plan.task, &doc.runs, d) {
            println!("{line}");
        }
    }
    Ok(())
}

/// Writes the `--plot` SVG: validation loss per run over the steps, and the load CV of the routed runs.
fn write_plot(path: &Path, plan: &Plan, runs: &[&RunReport]) -> Result<(), CliError> {
    use crate::plot::{Panel, Series};
    let series = |f: &dyn Fn(&moe_train::CurvePoint) -> f64, routed: bool| -> Vec<Series> {
        runs.iter()
            .filter(|r| !routed || r.label != "dense")
            .map(|r| Series {
                label: r.label.clone(),
                points: r.curve.iter().map(|p| (p.step as f64, f(p))).collect(),
                dashed: false,
            })
            .collect()
    };
    let (loss, y) = match plan.task {
        Task::Charlm => ("validation loss", "nats per byte"),
        Task::Teacher => ("validation MSE", "MSE"),
    };
    let panels = [
        Panel {
            title: format!("{loss} (eval mode)"),
            y_label: y.into(),
            series: series(&|p| p.val_loss, false),
        },
        Panel {
            title: "load CV over training (std / mean of tokens per expert; 0 = balanced)".into(),
            y_label: "load CV".into(),
            series: series(&|p| p.load_cv, true),
        },
    ];
    let m = &plan.model;
    let title = match plan.task {
        Task::Charlm => format!(
            "moe train charlm: d {}, {} layers, context {}, E {}, k {}, F {}, batch {}",
            m.d_model,
            m.n_layers,
            m.context,
            m.ffn.experts,
            m.ffn.top_k,
            m.ffn.expert_width,
            plan.train.batch
        ),
        Task::Teacher => format!(
            "moe train teacher: E {}, k {}, F {}, batch {}",
            m.ffn.experts, m.ffn.top_k, m.ffn.expert_width, plan.train.batch
        ),
    };
    std::fs::write(path, crate::plot::curves_svg(&title, "step", &panels))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_become_file_names() {
        assert_eq!(sanitise("dense"), "dense");
        assert_eq!(
            sanitise("switch-top1:capacity_factor=1.0"),
            "switch-top1_capacity_factor_1.0"
        );
        assert_eq!(sanitise("a/../b c"), "a_.._b_c");
    }

    fn report(label: &str, val: f64, causal: bool) -> RunReport {
        RunReport {
            label: label.into(),
            causal,
            leak: None,
            active_params: 1000,
            router_params: 0,
            total_params: 2000,
            steps: 20,
            tokens_per_step: 64,
            final_val_loss: val,
            best_val_loss: val,
            best_step: 20,
            final_train_loss: val,
            tokens_per_s: 1e4,
            wall_s: 1.0,
            load_cv: 0.1,
            dropped_pct: 0.0,
            dead_experts: 0,
            max_router_logit: 1.0,
            ari: None,
            curve: Vec::new(),
        }
    }

    #[test]
    fn rows_compare_to_dense_and_failed_runs_keep_their_row() {
        let dense = report("dense", 2.0, true);
        let outcomes = vec![
            Outcome::Done(Box::new(dense.clone())),
            Outcome::Done(Box::new(report("softmax-topk", 1.9, true))),
            Outcome::Done(Box::new(report("expert-choice", 2.1, false))),
            Outcome::Failed(FailedRun {
                label: "mine".into(),
                error: "router mine cannot be trained: no backward".into(),
                bad_input: true,
                untrainable: true,
            }),
        ];
        let t = table(Task::Charlm, &outcomes, Some(&dense));
        assert_eq!(t.rows.len(), 4);
        assert!(t.rows.iter().all(|r| r.len() == t.headers.len()));
        assert_eq!(t.rows[1][5], "-0.1000");
        assert_eq!(t.rows[0][13], "baseline");
        assert!(t.rows[2][13].starts_with("not causal: "), "{:?}", t.rows[2]);
        assert_eq!(
            t.rows[3][13],
            "failed: router mine cannot be trained: no backward"
        );
        let runs: Vec<&RunReport> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Done(r) => Some(r.as_ref()),
                Outcome::Failed(_) => None,
            })
            .collect();
        let v = verdict(Task::Charlm, &runs, &dense);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].contains("softmax-topk (-0.1000)") && !v[0].contains("expert-choice"),
            "{v:?}"
        );
        // A router that is not causal and beats dense is said to be optimistic.
        let leaky = report("expert-choice", 1.9, false);
        let v = verdict(Task::Charlm, &[&dense, &leaky], &dense);
        assert!(
            v[0].contains("expert-choice (-0.1000, not causal: optimistic)"),
            "{v:?}"
        );
        let mut big = report("peer", 1.5, true);
        big.active_params = 3000;
        let v = verdict(Task::Charlm, &[&dense, &big], &dense);
        assert!(v[0].starts_with("no router beat dense"), "{v:?}");
        assert!(
            v[1].contains("peer (-0.5000 with 3.00× the active parameters)"),
            "{v:?}"
        );
    }

    #[test]
    fn parameter_counts_are_short() {
        assert_eq!(params(999), "999");
        assert_eq!(params(12_345), "12.3k");
        assert_eq!(params(1_234_567), "1.23M");
        assert_eq!(params(12_345_678), "12.3M");
    }
}
