//! The training loop of the `charlm` task: batches from the corpus, the model's forward and backward, gradient
//! clipping, AdamW with the schedule, the routers' state updates, evaluation every `eval_interval` steps,
//! diagnostics, checkpoints. A whole run executes inside a rayon pool of `threads` threads; every result is
//! independent of that number (fixed tiling, fixed reduction orders), so curves are bit-identical on 1 and 2
//! threads, and a run resumed from a checkpoint continues the curve of the uninterrupted run.

use std::path::PathBuf;
use std::time::Instant;

use moe_core::RouterRegistry;
use moe_core::rng::splitmix64;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Meta};
use crate::config::{FfnKind, LmConfig, TrainConfig};
use crate::data::{Batch, Corpus, train_batch, val_batches};
use crate::error::TrainError;
use crate::model::{AuxOverride, Lm, StepStats};
use crate::optim::{AdamW, clip_factor, lr_at};
use crate::report::{CurvePoint, Progress, RunReport};

/// One language-model run.
#[derive(Debug, Clone)]
pub struct LmRun<'a> {
    /// Where routers are found (built-ins and plugins).
    pub registry: &'a RouterRegistry,
    /// The model.
    pub model: LmConfig,
    /// The loop.
    pub train: TrainConfig,
    /// Threads (a rayon pool of this size runs the whole run; results do not depend on it).
    pub threads: usize,
    /// Write a checkpoint here at every evaluation and at the end.
    pub save: Option<PathBuf>,
    /// Start from this checkpoint (its step, weights and optimizer state).
    pub resume: Option<PathBuf>,
    /// Stop after this many steps (counted from 0, as if interrupted; the schedule still spans `train.steps`).
    pub stop_after: Option<usize>,
}

/// What the loop accumulates between evaluations and over the run (saved in checkpoints).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RunState {
    curve: Vec<CurvePoint>,
    /// Seconds spent in training steps (evaluations excluded), and in the whole run.
    train_s: f64,
    wall_s: f64,
    /// Training steps done and their sums of load CV and dropped fraction (means over layers).
    steps: usize,
    cv_sum: f64,
    dropped_sum: f64,
    max_logit: f64,
    /// Since the last evaluation: steps, loss sum, CV and dropped sums, kept counts per layer and expert.
    window_steps: usize,
    window_loss: f64,
    window_cv: f64,
    window_dropped: f64,
    window_counts: Vec<Vec<usize>>,
    /// Dead experts at the last evaluation.
    dead: usize,
}

impl RunState {
    fn record(&mut self, s: &StepStats) {
        let n = s.layers.len().max(1) as f64;
        let cv = s.layers.iter().map(|l| l.cv).sum::<f64>() / n;
        let dropped = s.layers.iter().map(|l| l.dropped).sum::<f64>() / n;
        self.steps += 1;
        self.cv_sum += cv;
        self.dropped_sum += dropped;
        self.window_steps += 1;
        self.window_loss += s.ce;
        self.window_cv += cv;
        self.window_dropped += dropped;
        if self.window_counts.len() != s.layers.len() {
            self.window_counts = s.layers.iter().map(|l| vec![0; l.counts.len()]).collect();
        }
        for (acc, l) in self.window_counts.iter_mut().zip(&s.layers) {
            for (a, &c) in acc.iter_mut().zip(&l.counts) {
                *a += c;
            }
            self.max_logit = self.max_logit.max(l.max_logit);
        }
    }

    /// Closes the window with a validation loss.
    fn point(&mut self, step: usize, lr: f32, val_loss: f64, dense: bool) {
        let w = self.window_steps.max(1) as f64;
        let load: Vec<Vec<f64>> = if dense {
            Vec::new()
        } else {
            self.window_counts
                .iter()
                .map(|c| {
                    let total = c.iter().sum::<usize>().max(1) as f64;
                    c.iter().map(|&x| x as f64 / total).collect()
                })
                .collect()
        };
        self.dead = if dense {
            0
        } else {
            self.window_counts
                .iter()
                .map(|c| c.iter().filter(|&&x| x == 0).count())
                .sum()
        };
        self.curve.push(CurvePoint {
            step,
            lr,
            train_loss: self.window_loss / w,
            val_loss,
            load_cv: self.window_cv / w,
            dropped_pct: 100.0 * self.window_dropped / w,
            load,
        });
        self.window_steps = 0;
        self.window_loss = 0.0;
        self.window_cv = 0.0;
        self.window_dropped = 0.0;
        self.window_counts.iter_mut().for_each(|c| c.fill(0));
    }
}

/// Checks the loop's sizes before anything is allocated.
fn validate(run: &LmRun<'_>, corpus: &Corpus) -> Result<(), TrainError> {
    run.model.validate()?;
    let t = &run.train;
    let check = |name: &str, v: usize, min: usize, max: usize| {
        if v < min || v > max {
            Err(moe_core::MoeError::config(
                name,
                v.to_string(),
                format!("an integer in [{min}, {max}]"),
            ))
        } else {
            Ok(())
        }
    };
    check("steps", t.steps, 1, 10_000_000)?;
    check("batch", t.batch, 1, 65_536)?;
    check("eval_interval", t.eval_interval, 1, usize::MAX)?;
    check("eval_batches", t.eval_batches, 1, 100_000)?;
    check("threads", run.threads, 1, 1024)?;
    if let Some(n) = run.stop_after {
        check("stop_after", n, 1, t.steps)?;
    }
    let o = &t.optim;
    for (name, v) in [
        ("lr", o.lr),
        ("min_lr", o.min_lr),
        ("beta1", o.beta1),
        ("beta2", o.beta2),
        ("eps", o.eps),
        ("weight_decay", o.weight_decay),
        ("grad_clip", o.grad_clip),
        ("bias_rate", t.bias_rate),
        ("aux_coef", t.aux_coef.unwrap_or(0.0)),
        ("z_coef", t.z_coef.unwrap_or(0.0)),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(moe_core::MoeError::config(name, v.to_string(), "finite and >= 0").into());
        }
    }
    if !(o.beta1 < 1.0 && o.beta2 < 1.0) {
        return Err(moe_core::MoeError::config(
            "beta",
            format!("({}, {})", o.beta1, o.beta2),
            "below 1",
        )
        .into());
    }
    let need = run.model.context + 1;
    if corpus.train().len() <= need || corpus.val().len() <= need {
        return Err(TrainError::Corpus {
            name: corpus.name.clone(),
            reason: format!(
                "{} training and {} validation bytes; each part needs more than context + 1 = {need}",
                corpus.train().len(),
                corpus.val().len()
            ),
        });
    }
    Ok(())
}

/// The seed of the routers' noise at `step`.
fn step_seed(seed: u64, step: usize) -> u64 {
    splitmix64(seed ^ splitmix64(0x5EED_0000 + step as u64))
}

/// Why a non-causal router leaks, for the report.
fn leak_note(causal: bool) -> Option<String> {
    (!causal).then(|| {
        "not causal: a token's experts depend on later tokens of the batch (the validation loss is optimistic)"
            .to_string()
    })
}

/// Trains one model on `corpus`.
///
/// # Errors
/// See [`TrainError`]: a bad configuration or corpus, a router that cannot be trained, a non-finite loss or
/// gradient (naming the step and layer or tensor), an unreadable checkpoint or one of another model.
pub fn train_lm(
    run: &LmRun<'_>,
    corpus: &Corpus,
    progress: &mut dyn Progress,
) -> Result<RunReport, TrainError> {
    Ok(train_lm_model(run, corpus, progress)?.0)
}

/// As [`train_lm`], also handing back the trained model (for a routing trace of it, [`crate::trace`]).
///
/// # Errors
/// As [`train_lm`].
pub fn train_lm_model(
    run: &LmRun<'_>,
    corpus: &Corpus,
    progress: &mut dyn Progress,
) -> Result<(RunReport, Lm), TrainError> {
    validate(run, corpus)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(run.threads)
        .build()
        .map_err(|e| {
            TrainError::Moe(moe_core::MoeError::Backend {
                backend: "cpu".into(),
                reason: format!("thread pool: {e}"),
            })
        })?;
    pool.install(|| train_in_pool(run, corpus, progress))
}

fn train_in_pool(
    run: &LmRun<'_>,
    corpus: &Corpus,
    progress: &mut dyn Progress,
) -> Result<(RunReport, Lm), TrainError> {
    let started = Instant::now();
    let (cfg, t) = (&run.model, &run.train);
    let label = cfg.ffn.label();
    let opt = AdamW::new(t.optim);
    let (mut lm, mut opt, start, mut state) = match &run.resume {
        Some(path) => {
            let (lm, opt, meta) = checkpoint::load(path, run.registry, cfg, opt)?;
            // Another loop (steps, batch, seed, schedule) would not continue the saved curve: refuse it.
            if meta.train != *t {
                return Err(TrainError::Checkpoint {
                    path: path.clone(),
                    reason: format!(
                        "saved by a run with another training configuration ({}); resume with the saved run's \
                         flags (`moe inspect` shows them), or start a new run",
                        checkpoint::config_diff(&meta.train, t)
                    ),
                });
            }
            let state: RunState =
                serde_json::from_value(meta.state).map_err(|e| TrainError::Checkpoint {
                    path: path.clone(),
                    reason: format!("metadata `state`: {e}"),
                })?;
            (lm, opt, meta.step, state)
        }
        None => (
            Lm::new(run.registry, cfg, t.seed)?,
            opt,
            0,
            RunState::default(),
        ),
    };
    let dense = matches!(cfg.ffn.kind, FfnKind::Dense);
    let val = val_batches(corpus, t.eval_batches, t.batch, cfg.context);
    let stop = run.stop_after.unwrap_or(t.steps).min(t.steps);
    let wall_before = state.wall_s;
    for step in start..stop {
        let batch = train_batch(corpus, t.seed, step, t.batch, cfg.context);
        let t0 = Instant::now();
        let out = self::step(&mut lm, &mut opt, &batch, t, &label, step)?;
        state.record(&out.stats);
        let lr = out.lr;
        state.train_s += t0.elapsed().as_secs_f64();
        let done = step + 1;
        progress.step(
            done,
            t.steps,
            state.window_loss / state.window_steps.max(1) as f64,
        );
        if done % t.eval_interval == 0 || done == t.steps {
            let v = eval(&mut lm, &val)?;
            state.point(done, lr, v, dense);
            progress.eval(done, v);
        }
        if let Some(path) = &run.save
            && (done % t.eval_interval == 0 || done == stop)
        {
            state.wall_s = wall_before + started.elapsed().as_secs_f64();
            save(path, &lm, &opt, &label, done, run, &state)?;
        }
    }
    state.wall_s = wall_before + started.elapsed().as_secs_f64();
    let report = report(&lm, &state, label, run, stop);
    Ok((report, lm))
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The loss terms and the routers' statistics of the step's forward.
    pub stats: StepStats,
    /// Its learning rate.
    pub lr: f32,
    /// The global gradient L2 norm before clipping.
    pub grad_norm: f64,
}

/// One optimizer step of the loop on `batch` (0-based `step` of `train.steps`): the training forward and
/// backward, the global gradient norm and its clip factor, AdamW at the scheduled learning rate, the routers'
/// state updates. `label` names the run in errors.
///
/// # Errors
/// [`TrainError::NonFinite`] naming the step and the layer or tensor; [`TrainError::Untrainable`] for a router
/// without a backward; the MoE layers' errors.
pub fn step(
    lm: &mut Lm,
    opt: &mut AdamW,
    batch: &Batch,
    train: &TrainConfig,
    label: &str,
    step: usize,
) -> Result<StepOutcome, TrainError> {
    let seed = step_seed(train.seed, step);
    let aux = AuxOverride::of(train);
    let stats = lm
        .forward_backward(batch, seed, aux, step + 1)
        .map_err(|e| untrainable(e, label))?;
    let (norm_sq, bad) = lm.grad_norm_sq();
    if let Some(name) = bad {
        return Err(TrainError::NonFinite {
            step: step + 1,
            layer: name
                .strip_prefix("blocks.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse().ok()),
            what: format!("gradient of {name}"),
        });
    }
    let grad_norm = norm_sq.sqrt();
    let scale = clip_factor(grad_norm, train.optim.grad_clip);
    let lr = lr_at(&train.optim, step, train.steps);
    opt.begin_step(lr);
    lm.apply_adamw(opt, scale)?;
    lm.update_router_state(seed, train.bias_rate)?;
    Ok(StepOutcome {
        stats,
        lr,
        grad_norm,
    })
}

/// A router without a backward becomes [`TrainError::Untrainable`] naming it.
pub(crate) fn untrainable(e: TrainError, label: &str) -> TrainError {
    match e {
        TrainError::Moe(moe_core::MoeError::Unsupported { owner, feature }) => {
            TrainError::Untrainable {
                router: label.to_string(),
                reason: format!(
                    "{owner} has no {feature} (write `Router::backward` to train it; see docs/ROUTERS.md)"
                ),
            }
        }
        other => other,
    }
}

/// The mean validation loss over the fixed validation batches (eval mode).
fn eval(lm: &mut Lm, val: &[Batch]) -> Result<f64, TrainError> {
    let mut sum = 0.0;
    for b in val {
        sum += lm.eval_loss(b)?;
    }
    Ok(sum / val.len().max(1) as f64)
}

fn save(
    path: &std::path::Path,
    lm: &Lm,
    opt: &AdamW,
    label: &str,
    step: usize,
    run: &LmRun<'_>,
    state: &RunState,
) -> Result<(), TrainError> {
    let state = serde_json::to_value(state).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    checkpoint::save(
        path,
        lm,
        opt,
        &Meta {
            label: label.to_string(),
            step,
            model: run.model.clone(),
            train: run.train.clone(),
            state,
        },
    )
}

fn report(lm: &Lm, s: &RunState, label: String, run: &LmRun<'_>, steps: usize) -> RunReport {
    let (active, total) = lm.param_counts();
    let tokens_per_step = run.train.batch * run.model.context;
    let last = s.curve.last();
    let (best_val, best_step) = s.curve.iter().fold((f64::INFINITY, 0), |(b, bs), p| {
        if p.val_loss < b {
            (p.val_loss, p.step)
        } else {
            (b, bs)
        }
    });
    let n = s.steps.max(1) as f64;
    RunReport {
        label,
        causal: lm.is_causal(),
        leak: leak_note(lm.is_causal()),
        active_params: active,
        router_params: lm.router_param_count(),
        total_params: total,
        steps,
        tokens_per_step,
        final_val_loss: last.map_or(f64::NAN, |p| p.val_loss),
        best_val_loss: best_val,
        best_step,
        final_train_loss: last.map_or(f64::NAN, |p| p.train_loss),
        tokens_per_s: if s.train_s > 0.0 {
            (s.steps * tokens_per_step) as f64 / s.train_s
        } else {
            0.0
        },
        wall_s: s.wall_s,
        load_cv: s.cv_sum / n,
        dropped_pct: 100.0 * s.dropped_sum / n,
        dead_experts: s.dead,
        max_router_logit: s.max_logit,
        ari: None,
        curve: s.curve.clone(),
    }
}
