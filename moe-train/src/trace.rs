//! Routing traces of a trained language model for `moe cache-sim`: the model runs in eval mode over the fixed
//! validation batches (those the trainer's evaluation uses), one trace step per batch; for every block, the
//! experts each token used and, for blocks `l >= 1`, the experts block `l`'s router predicts from block `l − 1`'s
//! FFN input (the mixtral-offloading next-layer prediction; [`Lm::predict_plan`]).

use moe_core::MoeError;
use moe_core::store::trace::{LayerRecord, RoutingTrace, TraceHeader};

use crate::config::FfnKind;
use crate::data::{Batch, Corpus, val_batches};
use crate::error::TrainError;
use crate::model::{Lm, ffn_shape};
use crate::trainer::LmRun;

/// The header of a trace of `lm` over `tokens` validation tokens: `n_layers = L`, `E` and the experts a token
/// uses as sized by [`ffn_shape`], `expert_bytes` one expert's f32 bytes (`4 · expert_params(d, width)`; PEER's
/// singletons `4 · 2d`), `model` = `moe train charlm <label> d.. L.. E.. k.. seed .. (validation set, N tokens)`.
pub fn trace_header(lm: &Lm, seed: u64, tokens: usize) -> TraceHeader {
    let cfg = lm.config();
    let shape = ffn_shape(cfg);
    let label = cfg.ffn.label();
    let values = if shape.peer {
        2 * cfg.d_model
    } else {
        cfg.ffn.bank.expert_params(cfg.d_model, shape.width)
    };
    TraceHeader {
        n_layers: cfg.n_layers,
        n_experts: shape.experts,
        top_k: shape.per_token,
        expert_bytes: 4 * values as u64,
        model: format!(
            "moe train charlm {label} d{} L{} E{} k{} seed {seed} (validation set, {tokens} tokens)",
            cfg.d_model, cfg.n_layers, shape.experts, shape.per_token
        ),
        router: label,
    }
}

/// Records the trace of `lm` over `val` (eval mode; one step per batch, `T = B · C` tokens per step).
///
/// # Errors
/// [`MoeError::InvalidConfig`] for the dense baseline (one expert every token takes: nothing to cache);
/// the forward's errors ([`TrainError::NonFinite`], the routers' own).
pub fn record_trace_on(lm: &mut Lm, val: &[Batch], seed: u64) -> Result<RoutingTrace, TrainError> {
    if matches!(lm.config().ffn.kind, FfnKind::Dense) {
        return Err(MoeError::config(
            "routing trace",
            "dense",
            "a routed model (the dense baseline has one expert that every token takes)",
        )
        .into());
    }
    let tokens = val.iter().map(|b| b.inputs.len()).sum();
    let mut trace = RoutingTrace::new(trace_header(lm, seed, tokens))?;
    for batch in val {
        let plans = lm.eval_plans(batch)?;
        let mut layers = Vec::with_capacity(plans.len());
        for (l, plan) in plans.iter().enumerate() {
            let record = LayerRecord::from_routing(plan);
            layers.push(match lm.predict_plan(l)? {
                Some(predicted) => record.with_predicted(&predicted)?,
                None => record,
            });
        }
        trace.push_step(layers)?;
    }
    Ok(trace)
}

/// Records the trace of a model trained by `run` on `corpus`'s fixed validation batches (`eval_batches` batches
/// of `batch` windows of `context` bytes, as the trainer's evaluation), in a rayon pool of `run.threads` threads
/// (the trace does not depend on that number).
///
/// # Errors
/// As [`record_trace_on`]; [`MoeError::Backend`] when the thread pool cannot be built.
pub fn record_trace(
    lm: &mut Lm,
    run: &LmRun<'_>,
    corpus: &Corpus,
) -> Result<RoutingTrace, TrainError> {
    let t = &run.train;
    let val = val_batches(corpus, t.eval_batches, t.batch, lm.config().context);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(run.threads.max(1))
        .build()
        .map_err(|e| {
            TrainError::Moe(MoeError::Backend {
                backend: "cpu".into(),
                reason: format!("thread pool: {e}"),
            })
        })?;
    pool.install(|| record_trace_on(lm, &val, t.seed))
}
