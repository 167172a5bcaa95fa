//! The teacher task: a seeded teacher MoE layer generates targets `y = teacher(x)` from inputs drawn from `E`
//! clusters, one per teacher expert; a student MoE layer (any registered router, or the dense baseline) learns to
//! imitate it. The student is scored by the validation MSE and by the agreement of its routing with the teacher's
//! (the adjusted Rand index of the two top-1 partitions of the held-out inputs). It runs in seconds, so CI checks
//! that learning happens.
//!
//! The generator (all from [`TeacherConfig::seed`], counter-based, so any sample depends only on the seed and its
//! index):
//! - centres `c_e`, `e < E`: standard normal vectors of width `d`, rescaled to norm `√d` (about one per
//!   component): random directions, nearly orthogonal for `d ≫ 1`;
//! - a sample: a cluster `e` uniform in `0..E`, then `x = c_e + noise · z` with `z ~ N(0, I_d)`, and a token id
//!   uniform in `0..256` that carries no information about the cluster (for routers that route by id: hash);
//! - the teacher: `softmax-topk` with `k = 1` (its single weight renormalises to 1, so `y = expert_e(x)` exactly)
//!   and gate rows `g_e = c_e / √d` (so the logit of the own cluster is about `√d`, of the others about `±1`: each
//!   cluster goes to its own expert); experts of the bank kind of [`FfnConfig::bank`] and width
//!   [`FfnConfig::expert_width`] with independent weights `N(0, 1/d)` (first layer) and `N(0, gain²/F)` (second),
//!   so different experts compute clearly different functions of the same input;
//! - training batch `s`: samples `s·B .. (s+1)·B` of the training stream; the held-out set: the first
//!   [`TeacherConfig::val_samples`] samples of another stream, the same for every student.
//!
//! The student: an MoE layer of `E` experts of width `F` routed by the router under test with the layer's `k`
//! (the dense baseline: one expert of width `k·F` that every sample takes with weight 1), on the CPU backend,
//! initialised from [`TrainConfig::seed`]; AdamW with the schedule, clipping and aux losses of the
//! [`TrainConfig`], the router's state learned without gradient updated once per step, train mode (noise, jitter)
//! while training and eval mode for validation. Loss: `mean((y − target)²)` over the `B·d` values (aux losses are
//! added to the gradient, not to the reported loss).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, Array3, ArrayView2};
use serde::{Deserialize, Serialize};

use moe_backends::cpu::CpuBackend;
use moe_core::rng::{CounterRng, SeqRng};
use moe_core::{
    Backend, DeviceLayer, ExpertBank, LayerGrads, MlpBank, Mode, MoeError, MoeLayer, Router,
    RouterArgs, RouterInput, RouterRegistry, Routing, SwiGluBank,
};

use crate::config::{BankKind, FfnConfig, FfnKind, TrainConfig};
use crate::dense::DenseRouter;
use crate::error::TrainError;
use crate::model::AuxOverride;
use crate::optim::{AdamW, clip_factor, lr_at, sum_sq};
use crate::report::{CurvePoint, Progress, RunReport};

/// Stream of the cluster centres and the teacher's weights.
const TEACHER_STREAM: u64 = 0x7EAC;
/// Stream of the training samples.
const TRAIN_STREAM: u64 = 0x7EA1;
/// Stream of the held-out samples.
const VAL_STREAM: u64 = 0x7EA2;
/// Stream of the student's expert weights.
const STUDENT_STREAM: u64 = 0x57D7;
/// Stream of the per-step seeds of the routers' noise.
const NOISE_STREAM: u64 = 0x4015;
/// Token ids of the samples are uniform in `0..ID_VOCAB`.
const ID_VOCAB: u64 = 256;
/// Largest width, batch and held-out set accepted.
const MAX_SIZE: usize = 1 << 20;

/// The teacher task's data and teacher (the student's shape is the [`FfnConfig`], its loop the
/// [`TrainConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeacherConfig {
    /// Width `d` of the inputs and targets. Default 32.
    pub d_model: usize,
    /// Samples per training step `B` (fresh samples every step). Default 256.
    pub batch: usize,
    /// Held-out samples for the validation MSE and the ARI. Default 2048.
    pub val_samples: usize,
    /// Standard deviation of the noise around a centre, per component (centres have about 1 per component).
    /// Default 0.5.
    pub noise: f32,
    /// Scale of the teacher's second-layer weights: `N(0, gain²/F)`. Default 1.
    pub gain: f32,
    /// Scale of the student's expert weights relative to the teacher's (`N(0, (init·1)²/d)` and
    /// `N(0, (init·gain)²/F)`). Default 0.5.
    pub student_init: f32,
    /// Seed of the centres, the teacher and the samples (the student's weights and noise come from
    /// [`TrainConfig::seed`]). Default 0.
    pub seed: u64,
}

impl Default for TeacherConfig {
    fn default() -> Self {
        TeacherConfig {
            d_model: 32,
            batch: 256,
            val_samples: 2048,
            noise: 0.5,
            gain: 1.0,
            student_init: 0.5,
            seed: 0,
        }
    }
}

impl TeacherConfig {
    /// Checks the sizes and scales.
    ///
    /// # Errors
    /// [`MoeError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<(), MoeError> {
        let size = |name: &str, v: usize, min: usize| {
            if v < min || v > MAX_SIZE {
                Err(MoeError::config(
                    name,
                    v,
                    format!("an integer in [{min}, {MAX_SIZE}]"),
                ))
            } else {
                Ok(())
            }
        };
        size("teacher.d_model", self.d_model, 1)?;
        size("teacher.batch", self.batch, 1)?;
        size("teacher.val_samples", self.val_samples, 2)?;
        for (name, v) in [
            ("teacher.noise", self.noise),
            ("teacher.gain", self.gain),
            ("teacher.student_init", self.student_init),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(MoeError::config(name, v, "finite and >= 0"));
            }
        }
        Ok(())
    }
}

/// The adjusted Rand index of two partitions of the same items (Hubert & Arabie 1985, "Comparing partitions",
/// J. Classification 2: 193–218), from their contingency table `n_ij` with row sums `a_i`, column sums `b_j` and
/// `n` items:
/// ```text
/// index = Σ_ij C(n_ij, 2)    expected = Σ_i C(a_i, 2) · Σ_j C(b_j, 2) / C(n, 2)
/// max   = (Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) / 2
/// ARI   = (index − expected) / (max − expected)
/// ```
/// 1 for identical partitions up to relabelling, about 0 for independent random ones, negative below chance.
/// Labels are any `u32` values (only equality matters). Degenerate cases (`max = expected`: fewer than 2 items,
/// both partitions one cluster, or both all singletons, which are then identical) give 1, as scikit-learn's
/// `adjusted_rand_score` does. Partitions of different lengths give NaN.
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let pairs = |c: u64| u128::from(c) * u128::from(c.saturating_sub(1)) / 2;
    let mut table: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    let mut rows: BTreeMap<u32, u64> = BTreeMap::new();
    let mut cols: BTreeMap<u32, u64> = BTreeMap::new();
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_default() += 1;
        *cols.entry(y).or_default() += 1;
    }
    let index = table.values().map(|&c| pairs(c)).sum::<u128>() as f64;
    let sum_a = rows.values().map(|&c| pairs(c)).sum::<u128>() as f64;
    let sum_b = cols.values().map(|&c| pairs(c)).sum::<u128>() as f64;
    let total = pairs(a.len() as u64) as f64;
    if total == 0.0 {
        return 1.0;
    }
    let expected = sum_a * sum_b / total;
    let max = (sum_a + sum_b) / 2.0;
    if max == expected {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// Each token's top-1 expert: the slot with the largest weight, ties to the lower expert id; a token with no
/// kept slot (dropped, or not chosen by any expert) gets the label `E`.
pub fn top1_experts(routing: &Routing) -> Vec<u32> {
    let e = routing.n_experts() as u32;
    let mut best: Vec<(u32, f32)> = vec![(e, f32::NEG_INFINITY); routing.n_tokens()];
    for g in routing.groups() {
        for (&t, &w) in g.tokens.iter().zip(g.weights) {
            let b = &mut best[t as usize];
            let x = g.expert as u32;
            if w > b.1 || (w == b.1 && x < b.0) {
                *b = (x, w);
            }
        }
    }
    best.into_iter().map(|(x, _)| x).collect()
}

/// `[n, a, b]` normal weights with standard deviation `std`.
fn normal3(
    rng: &mut SeqRng,
    n: usize,
    a: usize,
    b: usize,
    std: f32,
) -> Result<Array3<f32>, MoeError> {
    rng.normal_matrix(n * a, b, std)
        .into_shape_with_order((n, a, b))
        .map_err(|e| MoeError::config("expert weights", format!("[{n}, {a}, {b}]"), e.to_string()))
}

/// A bank of `n` experts of width `f` on width `d`: first layer `N(0, s1²)`, second `N(0, s2²)`.
fn make_bank(
    kind: BankKind,
    rng: &mut SeqRng,
    (n, f, d): (usize, usize, usize),
    (s1, s2): (f32, f32),
) -> Result<ExpertBank, MoeError> {
    Ok(match kind {
        BankKind::Mlp => {
            let w1 = normal3(rng, n, f, d, s1)?;
            let w2 = normal3(rng, n, d, f, s2)?;
            ExpertBank::Mlp(MlpBank::new(w1, None, w2, None, kind.activation())?)
        }
        BankKind::Swiglu => {
            let gate_up = normal3(rng, n, 2 * f, d, s1)?;
            let down = normal3(rng, n, d, f, s2)?;
            ExpertBank::SwiGlu(SwiGluBank::new(gate_up, down, kind.activation())?)
        }
    })
}

/// The backend of a run: its own pool of `threads`, or rayon's current pool for 0.
fn backend(threads: usize) -> CpuBackend {
    if threads == 0 {
        CpuBackend::new()
    } else {
        CpuBackend::with_threads(threads)
    }
}

/// The data generator and the resident teacher.
struct Task {
    /// `[E, d]` cluster centres.
    centres: Array2<f32>,
    noise: f32,
    seed: u64,
    teacher: Box<dyn DeviceLayer>,
}

/// A batch of samples.
struct Samples {
    /// `[n, d]` inputs.
    x: Array2<f32>,
    /// `[n]` token ids (uninformative).
    ids: Vec<u32>,
}

impl Task {
    fn new(ffn: &FfnConfig, cfg: &TeacherConfig, threads: usize) -> Result<Self, MoeError> {
        let (d, e, f) = (cfg.d_model, ffn.experts, ffn.expert_width);
        let mut rng = SeqRng::new(cfg.seed, TEACHER_STREAM);
        let mut centres = rng.normal_matrix(e, d, 1.0);
        for mut row in centres.rows_mut() {
            let norm = row
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            row.mapv_inplace(|v| v * (d as f32).sqrt() / norm);
        }
        let bank = make_bank(
            ffn.bank,
            &mut rng,
            (e, f, d),
            (1.0 / (d as f32).sqrt(), cfg.gain / (f as f32).sqrt()),
        )?;
        let router =
            moe_routers::builtin().create("softmax-topk", &RouterArgs::new(d, e, 1, cfg.seed))?;
        let mut layer = MoeLayer::new(router, bank)?;
        let gate = centres.mapv(|v| v / (d as f32).sqrt());
        for mut p in layer.params_mut() {
            if p.name == "router.gate" {
                p.value.assign(&gate.view().into_dyn());
            }
        }
        let teacher = backend(threads).upload(Arc::new(layer))?;
        Ok(Task {
            centres,
            noise: cfg.noise,
            seed: cfg.seed,
            teacher,
        })
    }

    /// Samples `first .. first + n` of `stream`.
    fn samples(&self, stream: u64, first: u64, n: usize) -> Samples {
        let (e, d) = self.centres.dim();
        let rng = CounterRng::new(self.seed, stream);
        let per = d as u64 + 2;
        let mut x = Array2::zeros((n, d));
        let mut ids = Vec::with_capacity(n);
        for (i, mut row) in x.rows_mut().into_iter().enumerate() {
            let base = (first + i as u64) * per;
            let c = (rng.u64_at(base) % e as u64) as usize;
            ids.push((rng.u64_at(base + 1) % ID_VOCAB) as u32);
            for (j, v) in row.iter_mut().enumerate() {
                *v = self.centres[[c, j]] + self.noise * rng.normal_at(base + 2 + j as u64) as f32;
            }
        }
        Samples { x, ids }
    }

    /// The teacher's outputs and top-1 experts for `s`.
    fn targets(&mut self, s: &Samples) -> Result<(Array2<f32>, Vec<u32>), MoeError> {
        let out = self
            .teacher
            .forward(&RouterInput::new(s.x.view()).with_token_ids(&s.ids))?;
        let top = top1_experts(&out.routing);
        Ok((out.output, top))
    }
}

/// The student layer, its label and causality.
struct Student {
    layer: Box<dyn DeviceLayer>,
    label: String,
    causal: bool,
    dense: bool,
    active_params: usize,
    router_params: usize,
    total_params: usize,
}

fn build_student(
    registry: &RouterRegistry,
    ffn: &FfnConfig,
    cfg: &TeacherConfig,
    train: &TrainConfig,
    threads: usize,
) -> Result<Student, TrainError> {
    let (d, k, f) = (cfg.d_model, ffn.top_k, ffn.expert_width);
    let (router, causal, n, width): (Box<dyn Router>, bool, usize, usize) = match &ffn.kind {
        FfnKind::Dense => (Box::new(DenseRouter { d_model: d }), true, 1, k * f),
        FfnKind::Moe { router, options } => {
            let mut args = RouterArgs::new(d, ffn.experts, k, train.seed);
            args.options = options.clone();
            let entry = registry
                .get(router)
                .ok_or_else(|| MoeError::UnknownRouter {
                    name: router.clone(),
                    known: registry.names().join(", "),
                })?;
            let causal = entry.is_causal(&args)?;
            (registry.create(router, &args)?, causal, ffn.experts, f)
        }
    };
    let mut rng = SeqRng::new(train.seed, STUDENT_STREAM);
    let s = cfg.student_init;
    let bank = make_bank(
        ffn.bank,
        &mut rng,
        (n, width, d),
        (s / (d as f32).sqrt(), s * cfg.gain / (width as f32).sqrt()),
    )?;
    let layer = MoeLayer::new(router, bank)?;
    let router_params: usize = layer.router().params().iter().map(|p| p.value.len()).sum();
    let per_expert = layer.experts().params_per_expert();
    let dense = matches!(ffn.kind, FfnKind::Dense);
    let active_experts = if dense { 1 } else { k.min(n) };
    Ok(Student {
        active_params: router_params + active_experts * per_expert,
        router_params,
        total_params: router_params + n * per_expert,
        layer: backend(threads).upload(Arc::new(layer))?,
        label: ffn.label(),
        causal,
        dense,
    })
}

/// `mean((y − t)²)` and its gradient `2 (y − t) / n`.
fn mse(y: ArrayView2<'_, f32>, t: ArrayView2<'_, f32>) -> (f64, Array2<f32>) {
    let n = y.len().max(1);
    let loss = y
        .iter()
        .zip(t.iter())
        .map(|(&a, &b)| f64::from(a - b) * f64::from(a - b))
        .sum::<f64>()
        / n as f64;
    let grad = ndarray::Zip::from(&y)
        .and(&t)
        .map_collect(|&a, &b| 2.0 * (a - b) / n as f32);
    (loss, grad)
}

/// What the steps since the last curve point saw.
#[derive(Debug, Default)]
struct Interval {
    steps: usize,
    loss: f64,
    cv: f64,
    dropped: f64,
    counts: Vec<usize>,
}

impl Interval {
    fn add(&mut self, loss: f64, routing: &Routing) {
        let diag = routing.diagnostics();
        self.steps += 1;
        self.loss += loss;
        self.cv += diag.cv;
        self.dropped += 100.0 * diag.dropped_fraction;
        let counts = routing.expert_counts();
        if self.counts.len() != counts.len() {
            self.counts = vec![0; counts.len()];
        }
        for (a, c) in self.counts.iter_mut().zip(counts) {
            *a += c;
        }
    }

    fn shares(&self) -> Vec<f64> {
        let total = self.counts.iter().sum::<usize>().max(1) as f64;
        self.counts.iter().map(|&c| c as f64 / total).collect()
    }
}

/// The held-out set with the teacher's answers.
struct Validation {
    chunks: Vec<Samples>,
    targets: Vec<Array2<f32>>,
    teacher_top1: Vec<u32>,
}

fn validation(task: &mut Task, cfg: &TeacherConfig) -> Result<Validation, MoeError> {
    let mut v = Validation {
        chunks: Vec::new(),
        targets: Vec::new(),
        teacher_top1: Vec::new(),
    };
    let mut first = 0;
    while first < cfg.val_samples {
        let n = cfg.batch.min(cfg.val_samples - first);
        let s = task.samples(VAL_STREAM, first as u64, n);
        let (y, top) = task.targets(&s)?;
        v.chunks.push(s);
        v.targets.push(y);
        v.teacher_top1.extend(top);
        first += n;
    }
    Ok(v)
}

/// Validation MSE (eval mode, in chunks of the training batch) and the student's top-1 experts.
fn evaluate(student: &mut Student, val: &Validation) -> Result<(f64, Vec<u32>), MoeError> {
    let (mut sum, mut n, mut top) = (0.0, 0usize, Vec::new());
    for (s, t) in val.chunks.iter().zip(&val.targets) {
        let out = student
            .layer
            .forward(&RouterInput::new(s.x.view()).with_token_ids(&s.ids))?;
        let (loss, _) = mse(out.output.view(), t.view());
        sum += loss * t.len() as f64;
        n += t.len();
        top.extend(top1_experts(&out.routing));
    }
    Ok((sum / n.max(1) as f64, top))
}

/// One training step: forward in train mode, MSE, backward with the aux coefficients, clipping, AdamW, the
/// router's state. Returns the MSE and the plan.
fn train_step(
    student: &mut Student,
    opt: &mut AdamW,
    grads: &mut LayerGrads,
    s: &Samples,
    target: &Array2<f32>,
    (step, train): (usize, &TrainConfig),
) -> Result<(f64, Routing), TrainError> {
    let seed = CounterRng::new(train.seed, NOISE_STREAM).u64_at(step as u64);
    let input = RouterInput::new(s.x.view())
        .with_token_ids(&s.ids)
        .with_mode(Mode::Train { seed });
    // A NaN or infinity the layer refuses names the step, like the loss and gradient checks below.
    let at_step = |e: MoeError| match e {
        MoeError::NonFinite { .. } => TrainError::NonFinite {
            step: step + 1,
            layer: Some(0),
            what: format!("value in the MoE layer ({e})"),
        },
        other => other.into(),
    };
    let out = student.layer.forward_train(&input).map_err(at_step)?;
    let (loss, d_out) = mse(out.output.view(), target.view());
    if !loss.is_finite() {
        return Err(TrainError::NonFinite {
            step: step + 1,
            layer: Some(0),
            what: "loss".into(),
        });
    }
    let d_aux = AuxOverride::of(train).coefficients(&out.routing);
    student
        .layer
        .backward_into(d_out.view(), &d_aux, grads)
        .map_err(at_step)?;
    let norm = grads.params.iter().map(sum_sq).sum::<f64>().sqrt();
    if !norm.is_finite() {
        return Err(TrainError::NonFinite {
            step: step + 1,
            layer: Some(0),
            what: "gradient".into(),
        });
    }
    let scale = clip_factor(norm, train.optim.grad_clip);
    opt.begin_step(lr_at(&train.optim, step, train.steps));
    student.layer.apply_update(&grads.params, &mut |p, g| {
        opt.update_layer_param("", p, g, scale)
    })?;
    student
        .layer
        .update_state(&input, &out.routing, train.bias_rate)?;
    Ok((loss, out.routing))
}

/// The student's default experts on the teacher task: 8 MLP experts of width 32, top-2 (`kind` is the caller's).
pub fn default_ffn(kind: crate::config::FfnKind) -> FfnConfig {
    FfnConfig {
        kind,
        bank: crate::config::BankKind::Mlp,
        experts: 8,
        top_k: 2,
        expert_width: 32,
    }
}

/// The default loop of the teacher task: 300 steps, AdamW 1e-2 → 1e-3 with 20 warm-up steps and no weight decay,
/// evaluation every 50 steps, seed 1 (`batch` and `eval_batches` are unused: [`TeacherConfig`] sizes the
/// samples). With [`TeacherConfig::default`] and [`default_ffn`] a `softmax-topk` student reaches ARI 0.998 in
/// about a second (`moe-train/tests/teacher.rs`).
pub fn default_train() -> TrainConfig {
    TrainConfig {
        steps: 300,
        batch: 1,
        eval_interval: 50,
        eval_batches: 1,
        seed: 1,
        optim: crate::config::OptimConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup: 20,
            weight_decay: 0.0,
            ..crate::config::OptimConfig::default()
        },
        ..TrainConfig::default()
    }
}

/// Trains a student on the teacher task and reports it (see the module docs for the task). Samples per second
/// count the training steps only (data generation, the teacher and evaluations excluded); `wall_s` is the whole
/// run. Everything else in the report is a function of the configurations alone, the same on any thread count.
/// `threads` = 0 runs on rayon's current pool.
///
/// # Errors
/// [`TrainError::Moe`] for an invalid configuration (naming the field), an unknown router, a router that does not
/// fit the experts; [`TrainError::Untrainable`] for a router without a backward; [`TrainError::NonFinite`] for a
/// NaN or infinite loss or gradient, naming the step.
pub fn train_teacher(
    registry: &RouterRegistry,
    ffn: &FfnConfig,
    cfg: &TeacherConfig,
    train: &TrainConfig,
    threads: usize,
    progress: &mut dyn Progress,
) -> Result<RunReport, TrainError> {
    let start = Instant::now();
    check(ffn, cfg, train)?;
    let mut task = Task::new(ffn, cfg, threads)?;
    let val = validation(&mut task, cfg)?;
    let mut student = build_student(registry, ffn, cfg, train, threads)?;
    let mut opt = AdamW::new(train.optim);
    let mut grads = LayerGrads::empty();
    let mut report = empty_report(&student, train, cfg);
    let (mut interval, mut train_s) = (Interval::default(), 0.0f64);
    let (mut cv_sum, mut dropped_sum) = (0.0, 0.0);
    let every = train.eval_interval.max(1);
    for step in 0..train.steps {
        let s = task.samples(TRAIN_STREAM, (step * cfg.batch) as u64, cfg.batch);
        let (target, _) = task.targets(&s)?;
        let t0 = Instant::now();
        let (loss, routing) = train_step(
            &mut student,
            &mut opt,
            &mut grads,
            &s,
            &target,
            (step, train),
        )
        .map_err(|e| crate::trainer::untrainable(e, &student.label))?;
        train_s += t0.elapsed().as_secs_f64();
        if let Some(l) = routing.logits() {
            let m = l.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            report.max_router_logit = report.max_router_logit.max(f64::from(m));
        }
        interval.add(loss, &routing);
        progress.step(step + 1, train.steps, loss);
        if (step + 1) % every == 0 || step + 1 == train.steps {
            let (val_loss, _) = evaluate(&mut student, &val)?;
            progress.eval(step + 1, val_loss);
            cv_sum += interval.cv;
            dropped_sum += interval.dropped;
            close_interval(&mut report, &interval, step, val_loss, train, student.dense);
            interval = Interval::default();
        }
    }
    let (_, top) = evaluate(&mut student, &val)?;
    report.ari = Some(adjusted_rand_index(&top, &val.teacher_top1));
    report.load_cv = cv_sum / train.steps as f64;
    report.dropped_pct = dropped_sum / train.steps as f64;
    report.tokens_per_s = (train.steps * cfg.batch) as f64 / train_s.max(1e-9);
    report.wall_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Checks the three configurations before anything is allocated.
fn check(ffn: &FfnConfig, cfg: &TeacherConfig, train: &TrainConfig) -> Result<(), MoeError> {
    cfg.validate()?;
    let sized = |name: &str, v: usize, max: usize| {
        if v == 0 || v > max {
            Err(MoeError::config(
                name,
                v,
                format!("an integer in [1, {max}]"),
            ))
        } else {
            Ok(())
        }
    };
    sized("experts", ffn.experts, 1 << 16)?;
    sized("top_k", ffn.top_k, ffn.experts.max(1))?;
    sized("expert_width", ffn.expert_width, 1 << 16)?;
    sized("steps", train.steps, 1 << 30)?;
    let values =
        cfg.d_model as u128 * ffn.expert_width as u128 * ffn.experts.max(ffn.top_k) as u128;
    if values > 1 << 31 {
        return Err(MoeError::TooLarge {
            what: "teacher expert weights d · F · E".into(),
            size: values,
            limit: 1 << 31,
        });
    }
    Ok(())
}

fn empty_report(student: &Student, train: &TrainConfig, cfg: &TeacherConfig) -> RunReport {
    RunReport {
        label: student.label.clone(),
        causal: student.causal,
        leak: (!student.causal)
            .then(|| "a sample's experts depend on the other samples of its batch".to_string()),
        active_params: student.active_params,
        router_params: student.router_params,
        total_params: student.total_params,
        steps: train.steps,
        tokens_per_step: cfg.batch,
        final_val_loss: f64::NAN,
        best_val_loss: f64::INFINITY,
        best_step: 0,
        final_train_loss: f64::NAN,
        tokens_per_s: 0.0,
        wall_s: 0.0,
        load_cv: 0.0,
        dropped_pct: 0.0,
        dead_experts: 0,
        max_router_logit: 0.0,
        ari: None,
        curve: Vec::new(),
    }
}

/// Adds the curve point after `step` (0-based) and updates the final and best losses and dead experts.
fn close_interval(
    report: &mut RunReport,
    interval: &Interval,
    step: usize,
    val_loss: f64,
    train: &TrainConfig,
    dense: bool,
) {
    let n = interval.steps.max(1) as f64;
    let train_loss = interval.loss / n;
    report.curve.push(CurvePoint {
        step: step + 1,
        lr: lr_at(&train.optim, step, train.steps),
        train_loss,
        val_loss,
        load_cv: interval.cv / n,
        dropped_pct: interval.dropped / n,
        load: if dense {
            Vec::new()
        } else {
            vec![interval.shares()]
        },
    });
    report.final_val_loss = val_loss;
    report.final_train_loss = train_loss;
    if val_loss < report.best_val_loss {
        report.best_val_loss = val_loss;
        report.best_step = step + 1;
    }
    report.dead_experts = interval.counts.iter().filter(|&&c| c == 0).count();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_of_identical_partitions_is_one_up_to_relabelling() {
        let a = [0, 0, 1, 1, 2, 2, 2];
        let b = [5, 5, 9, 9, 1, 1, 1];
        assert_eq!(adjusted_rand_index(&a, &a), 1.0);
        assert_eq!(adjusted_rand_index(&a, &b), 1.0);
    }

    /// By hand: a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]. Table rows {0: (2,1,0), 1: (0,1,2)}: index = 1 + 1 = 2;
    /// a_i = (3,3): Σ C = 6; b_j = (2,2,2): Σ C = 3; C(6,2) = 15; expected = 18/15 = 1.2; max = 4.5;
    /// ARI = 0.8 / 3.3 = 0.242424… (checked by brute-force pair counting; scikit-learn is not installed here).
    #[test]
    fn ari_matches_a_hand_computed_value() {
        let a = [0, 0, 0, 1, 1, 1];
        let b = [0, 0, 1, 1, 2, 2];
        let want = 0.8 / 3.3;
        assert!((adjusted_rand_index(&a, &b) - want).abs() < 1e-12);
        assert!((adjusted_rand_index(&b, &a) - want).abs() < 1e-12);
    }

    #[test]
    fn ari_is_invariant_under_permuting_items_and_labels() {
        let a = [0, 1, 1, 2, 0, 3, 3, 1, 2, 0];
        let b = [1, 1, 0, 2, 2, 3, 0, 1, 2, 0];
        let v = adjusted_rand_index(&a, &b);
        let perm = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6];
        let pa: Vec<u32> = perm.iter().map(|&i| a[i] * 7 + 100).collect();
        let pb: Vec<u32> = perm.iter().map(|&i| 3 - b[i]).collect();
        assert!((adjusted_rand_index(&pa, &pb) - v).abs() < 1e-12);
    }

    #[test]
    fn ari_of_independent_partitions_is_near_zero_and_degenerate_cases_are_defined() {
        let rng = CounterRng::new(1, 2);
        let a: Vec<u32> = (0..20_000)
            .map(|i| (rng.u64_at(2 * i) % 8) as u32)
            .collect();
        let b: Vec<u32> = (0..20_000)
            .map(|i| (rng.u64_at(2 * i + 1) % 8) as u32)
            .collect();
        assert!(adjusted_rand_index(&a, &b).abs() < 0.01);
        assert_eq!(adjusted_rand_index(&[], &[]), 1.0);
        assert_eq!(adjusted_rand_index(&[4], &[2]), 1.0);
        assert_eq!(adjusted_rand_index(&[1, 1, 1], &[0, 0, 0]), 1.0);
        assert_eq!(adjusted_rand_index(&[0, 1, 2], &[2, 0, 1]), 1.0);
        // One cluster against several: 0.
        assert_eq!(adjusted_rand_index(&[0, 0, 0, 0], &[0, 0, 1, 1]), 0.0);
        assert!(adjusted_rand_index(&[0, 1], &[0]).is_nan());
    }
}
