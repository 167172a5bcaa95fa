//! The fixture verifier: reads a directory in the golden-fixture format (`manifest.json` plus one safetensors file
//! per case holding the block's HF state dict and `ref.*` tensors), builds each case's preset from the manifest's
//! `routing` and the file's unprefixed state dict, runs it on `ref.input` through the CPU backend, and compares
//! every reference the file has.
//!
//! Continuous quantities report the relative error
//! `rel = max_i |ours_i − ref_i| / max(max_i |ref_i|, 1e-30)` and pass when `rel ≤ 1e-5` ([`TOLERANCE`]).
//! Discrete quantities (chosen experts, dropped tokens, masks, counts) report the number of mismatching tokens
//! and pass only at 0. Routing is compared as sets of `(expert, weight)` pairs per token, so the order inside a
//! row does not matter (DeepSeek-V3's `topk(sorted=False)`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::{CpuBackend, expert_forward};
use moe_core::{AuxLossKind, Backend, LayerOutput, MoeLayer, RouterInput, Routing};
use ndarray::{Array2, ArrayView2};

use crate::Family;
use crate::checkpoint::{Checkpoint, read_json};
use crate::config::MoeConfig;
use crate::error::LoadError;
use crate::presets::build_layer;

/// Relative tolerance of f32 parity with transformers: an independent float64 re-implementation matches the
/// references to ≤ 6e-7 relative, so 1e-5 leaves a wide margin for summation-order differences.
pub const TOLERANCE: f64 = 1e-5;

/// How a quantity is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Relative error `max |ours − ref| / max |ref|`; passes at ≤ [`TOLERANCE`].
    RelErr,
    /// Number of mismatching tokens (or experts); passes at 0.
    Mismatches,
}

/// One compared quantity of a case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Quantity {
    /// The reference's name without `ref.` (`output`, `topk_weights`, `aux.lb_loss`).
    pub name: String,
    /// How `value` is measured.
    pub measure: Measure,
    /// The relative error or the mismatch count.
    pub value: f64,
    /// Whether it is within tolerance.
    pub passed: bool,
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CaseReport {
    /// The case name from the manifest.
    pub name: String,
    /// The HF `model_type` of the case.
    pub family: String,
    /// The case file.
    pub file: PathBuf,
    /// Number of tokens `T = B · S`.
    pub tokens: usize,
    /// Every compared quantity.
    pub quantities: Vec<Quantity>,
    /// References in the file that the verifier does not compare (with the reason).
    pub skipped: Vec<String>,
    /// Why the case could not run, if it could not.
    pub error: Option<String>,
    /// Whether the case ran and every quantity passed.
    pub passed: bool,
}

impl CaseReport {
    /// The largest relative error over the continuous quantities (0 if there are none).
    pub fn max_rel_err(&self) -> f64 {
        self.quantities
            .iter()
            .filter(|q| q.measure == Measure::RelErr)
            .map(|q| q.value)
            .fold(0.0, f64::max)
    }
}

/// `manifest.json`: the part the verifier reads.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    /// The cases.
    pub cases: Vec<ManifestCase>,
}

/// One case of the manifest.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ManifestCase {
    /// Case name (`mixtral`).
    pub name: String,
    /// The safetensors file, relative to the directory.
    pub file: String,
    /// The HF `model_type` (defaults to the name).
    #[serde(default)]
    pub model_family: Option<String>,
    /// Batch size `B`.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Sequence length `S`.
    #[serde(default)]
    pub seq_len: Option<usize>,
    /// The routing config.
    #[serde(default)]
    pub routing: serde_json::Value,
}

/// Verifies every case of `dir/manifest.json`. A case that cannot be built or run is reported with its error
/// (and fails); the others still run.
///
/// # Errors
/// [`LoadError`] when the manifest cannot be read or parsed.
pub fn verify_dir(dir: impl AsRef<Path>) -> Result<Vec<CaseReport>, LoadError> {
    let dir = dir.as_ref();
    let manifest: Manifest = read_json(&dir.join("manifest.json"))?;
    Ok(manifest
        .cases
        .iter()
        .map(|c| {
            verify_case(dir, c).unwrap_or_else(|e| CaseReport {
                name: c.name.clone(),
                family: c.model_family.clone().unwrap_or_else(|| c.name.clone()),
                file: dir.join(&c.file),
                tokens: c.batch.unwrap_or(0) * c.seq_len.unwrap_or(0),
                quantities: Vec::new(),
                skipped: Vec::new(),
                error: Some(e.to_string()),
                passed: false,
            })
        })
        .collect())
}

/// The preset config of a manifest case, from its `routing` object.
///
/// # Errors
/// [`LoadError::UnknownFamily`], [`LoadError::Config`] for a missing `num_experts` / `top_k`.
pub fn case_config(case: &ManifestCase, manifest: &Path) -> Result<MoeConfig, LoadError> {
    let model_type = case
        .model_family
        .clone()
        .unwrap_or_else(|| case.name.clone());
    let family = Family::from_model_type(&model_type).ok_or_else(|| LoadError::UnknownFamily {
        file: manifest.to_path_buf(),
        model_type: model_type.clone(),
        known: Family::ALL.map(Family::model_type).join(", "),
    })?;
    let r = &case.routing;
    let usize_of = |k: &str| {
        r.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|v| v as usize)
    };
    let f32_of = |k: &str| {
        r.get(k)
            .and_then(serde_json::Value::as_f64)
            .map(|v| v as f32)
    };
    let bool_of = |k: &str| r.get(k).and_then(serde_json::Value::as_bool);
    let field = |k: &str| {
        usize_of(k).ok_or_else(|| {
            LoadError::config(
                manifest,
                format!("cases[{}].routing.{k}", case.name),
                "missing",
            )
        })
    };
    let mut c = MoeConfig::new(family, field("num_experts")?, field("top_k")?);
    c.renormalize = bool_of("norm_topk_prob");
    c.n_group = usize_of("n_group");
    c.topk_group = usize_of("topk_group");
    c.routed_scaling_factor = f32_of("routed_scaling_factor");
    if let Some(v) = f32_of("swiglu_limit") {
        c.swiglu_limit = v;
    }
    if let Some(v) = f32_of("swiglu_alpha") {
        c.swiglu_alpha = v;
    }
    c.expert_capacity = usize_of("capacity").or(usize_of("expert_capacity"));
    c.capacity_fraction = r
        .get("moe_eval_capacity_token_fraction")
        .and_then(serde_json::Value::as_f64);
    c.token_dropout = f32_of("moe_token_dropout").unwrap_or(0.0);
    c.batch_prioritized = bool_of("batch_prioritized_routing").unwrap_or(false);
    c.normalize_before_dropping = bool_of("normalize_router_prob_before_dropping").unwrap_or(false);
    Ok(c)
}

/// Verifies one case of the directory `dir`.
///
/// # Errors
/// [`LoadError`] when the file or its tensors cannot be read, the preset cannot be built, or the run fails.
pub fn verify_case(dir: &Path, case: &ManifestCase) -> Result<CaseReport, LoadError> {
    let path = dir.join(&case.file);
    let cfg = case_config(case, &dir.join("manifest.json"))?;
    let ckpt = Checkpoint::open(&path)?;
    let layer = build_layer(&cfg, &ckpt.weights(""))?;
    let input = ckpt.tensor("ref.input")?;
    let d = layer.d_model();
    let (b, s) = match (case.batch, case.seq_len, input.shape.as_slice()) {
        (Some(b), Some(s), _) => (b, s),
        (_, _, [b, s, _]) => (*b, *s),
        _ => (1, input.data.len() / d.max(1)),
    };
    let t = b * s;
    let x = Array2::from_shape_vec((t, d), input.data).map_err(|_| LoadError::Shape {
        file: path.clone(),
        tensor: "ref.input".into(),
        expected: format!("[{b}, {s}, {d}]"),
        found: input.shape.clone(),
    })?;
    let seq_lens = vec![s; b];
    let run_err = |e| LoadError::layer(&path, format!("running case {}", case.name), e);
    let run = |layer: MoeLayer| -> Result<LayerOutput, LoadError> {
        let mut dev = CpuBackend::new().upload(Arc::new(layer)).map_err(run_err)?;
        dev.forward(&RouterInput::new(x.view()).with_seq_lens(&seq_lens))
            .map_err(run_err)
    };
    let out = run(layer.clone())?;
    let mut rep = Compare {
        ckpt: &ckpt,
        quantities: Vec::new(),
        skipped: Vec::new(),
        t,
    };
    let names: Vec<String> = ckpt
        .names()
        .filter(|n| n.starts_with("ref."))
        .map(str::to_string)
        .collect();
    for name in &names {
        let short = name.trim_start_matches("ref.");
        match short {
            "input" => {}
            "output" => rep.dense(short, out.output.view())?,
            "routed_output" => {
                let router = layer.clone().router_mut().clone();
                let routed = MoeLayer::new(router, layer.experts().clone())
                    .and_then(|l| l.with_output_scale(layer.output_scale()))
                    .map_err(run_err)?;
                let r = run(routed)?;
                rep.dense(short, r.output.view())?;
            }
            "router_logits" => match out.routing.logits() {
                Some(l) => rep.dense(short, l.view())?,
                None => rep.skip(short, "the router keeps no logits"),
            },
            "router_probs" => match out.routing.logits() {
                Some(l) => rep.dense(short, softmax_rows(l.view()).view())?,
                None => rep.skip(short, "the router keeps no logits"),
            },
            "topk_indices" | "topk_weights" => {
                if short == "topk_indices" {
                    rep.topk(&out.routing, ckpt.contains("ref.topk_weights"))?;
                }
            }
            "shared_expert_output" | "shared_expert_gate_logit" => match layer.shared() {
                Some(sh) => {
                    if short == "shared_expert_output" {
                        let y = expert_forward(sh.bank(), 0, x.view()).map_err(run_err)?;
                        rep.dense(short, y.view())?;
                    } else if let Some(g) = sh.gate() {
                        let l = x.dot(g).insert_axis(ndarray::Axis(1));
                        rep.dense(short, l.view())?;
                    } else {
                        rep.skip(short, "the shared expert has no gate");
                    }
                }
                None => rep.skip(short, "the layer has no shared expert"),
            },
            "aux.lb_loss" => rep.loss(short, &out.routing, |k| {
                matches!(k, AuxLossKind::LoadBalance(_))
            })?,
            "aux.z_loss" => rep.loss(short, &out.routing, |k| matches!(k, AuxLossKind::RouterZ))?,
            "dropped" => {
                let (_, r) = ckpt.tensor_i64(name)?;
                let ours = dropped_tokens(&out.routing);
                rep.discrete(short, &r, &ours);
            }
            "dispatch_mask" | "top1_mask" => {
                let (_, r) = ckpt.tensor_i64(name)?;
                let ours = kept_mask(&out.routing, short == "top1_mask");
                rep.discrete(short, &r, &ours);
            }
            "combine_weights" => {
                let dense = kept_dense(&out.routing);
                rep.dense(short, dense.view())?;
            }
            "jetmoe.expert_size" => {
                let (_, r) = ckpt.tensor_i64(name)?;
                let ours: Vec<i64> = out
                    .routing
                    .expert_counts()
                    .iter()
                    .map(|&c| c as i64)
                    .collect();
                rep.discrete(short, &r, &ours);
            }
            "output_hf_v5_buggy" => rep.skip(short, "transformers 5.23 dispatch bug, not a target"),
            "aux.lb_loss_v4_convention" => rep.skip(
                short,
                "transformers v4 convention (dropped tokens count as expert 0)",
            ),
            other => rep.skip(other, "not compared"),
        }
    }
    let passed = rep.quantities.iter().all(|q| q.passed) && !rep.quantities.is_empty();
    Ok(CaseReport {
        name: case.name.clone(),
        family: cfg.family.model_type().to_string(),
        file: path,
        tokens: t,
        quantities: rep.quantities,
        skipped: rep.skipped,
        error: None,
        passed,
    })
}

/// Row-wise softmax of `[T, E]`.
fn softmax_rows(l: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut p = l.to_owned();
    for mut row in p.outer_iter_mut() {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.mapv_inplace(|v| (v - m).exp());
        let s: f32 = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    p
}

/// `[T]`: 1 where a token lost an assignment to capacity and kept none.
fn dropped_tokens(r: &Routing) -> Vec<i64> {
    let mut kept = vec![false; r.n_tokens()];
    for &t in r.slot_tokens() {
        if let Some(k) = kept.get_mut(t as usize) {
            *k = true;
        }
    }
    let mut out = vec![0i64; r.n_tokens()];
    for a in r.dropped() {
        if let (Some(o), Some(false)) = (out.get_mut(a.token as usize), kept.get(a.token as usize))
        {
            *o = 1;
        }
    }
    out
}

/// `[T, E]` 0/1 mask of the kept assignments (only rank 0 with `first_only`).
fn kept_mask(r: &Routing, first_only: bool) -> Vec<i64> {
    let e = r.n_experts();
    let mut m = vec![0i64; r.n_tokens() * e];
    for (t, picks) in r.per_token().iter().enumerate() {
        for &(ex, _, rank) in picks {
            if (!first_only || rank == 0)
                && let Some(v) = m.get_mut(t * e + ex)
            {
                *v = 1;
            }
        }
    }
    m
}

/// `[T, E]` dense kept weights.
fn kept_dense(r: &Routing) -> Array2<f32> {
    let mut m = Array2::<f32>::zeros((r.n_tokens(), r.n_experts()));
    for (t, picks) in r.per_token().iter().enumerate() {
        for &(ex, w, _) in picks {
            if let Some(v) = m.get_mut((t, ex)) {
                *v += w;
            }
        }
    }
    m
}

/// Accumulates the quantities of one case.
struct Compare<'a> {
    ckpt: &'a Checkpoint,
    quantities: Vec<Quantity>,
    skipped: Vec<String>,
    t: usize,
}

impl Compare<'_> {
    fn skip(&mut self, name: &str, why: &str) {
        self.skipped.push(format!("{name} ({why})"));
    }

    fn push(&mut self, name: &str, measure: Measure, value: f64) {
        let passed = match measure {
            Measure::RelErr => value <= TOLERANCE,
            Measure::Mismatches => value == 0.0,
        };
        self.quantities.push(Quantity {
            name: name.to_string(),
            measure,
            value,
            passed,
        });
    }

    /// Compares `ours` with `ref.{name}` element by element (any reference shape with the same element count).
    fn dense(&mut self, name: &str, ours: ArrayView2<'_, f32>) -> Result<(), LoadError> {
        let r = self.ckpt.tensor(&format!("ref.{name}"))?;
        if r.data.len() != ours.len() {
            return Err(LoadError::Shape {
                file: self.ckpt.origin().to_path_buf(),
                tensor: format!("ref.{name}"),
                expected: format!("{:?} elements", ours.shape()),
                found: r.shape,
            });
        }
        let v = rel_err(ours.iter().copied(), &r.data);
        self.push(name, Measure::RelErr, v);
        Ok(())
    }

    fn discrete(&mut self, name: &str, reference: &[i64], ours: &[i64]) {
        let n = if reference.len() != ours.len() {
            reference.len().max(ours.len())
        } else {
            reference.iter().zip(ours).filter(|(a, b)| a != b).count()
        };
        self.push(name, Measure::Mismatches, n as f64);
    }

    /// Compares the routers' choices with `ref.topk_indices` (as sets per token; pre-capacity choices, so dropped
    /// assignments count) and, when present, `ref.topk_weights` matched by expert.
    fn topk(&mut self, routing: &Routing, with_weights: bool) -> Result<(), LoadError> {
        let (shape, idx) = self.ckpt.tensor_i64("ref.topk_indices")?;
        let k = shape.get(1).copied().unwrap_or(1).max(1);
        let weights = if with_weights {
            Some(self.ckpt.tensor("ref.topk_weights")?.data)
        } else {
            None
        };
        let mut ours: Vec<BTreeMap<i64, f32>> = vec![BTreeMap::new(); self.t];
        for (t, picks) in routing.per_token().iter().enumerate() {
            for &(e, w, _) in picks {
                if let Some(m) = ours.get_mut(t) {
                    m.insert(e as i64, w);
                }
            }
        }
        for a in routing.dropped() {
            if let Some(m) = ours.get_mut(a.token as usize) {
                m.entry(a.expert as i64).or_insert(a.weight);
            }
        }
        let mut mismatched = 0usize;
        let mut ref_w = Vec::new();
        let mut our_w = Vec::new();
        for (t, row) in idx.chunks(k).enumerate() {
            let mine = ours.get(t).cloned().unwrap_or_default();
            let mut want: Vec<i64> = row.to_vec();
            want.sort_unstable();
            let got: Vec<i64> = mine.keys().copied().collect();
            if want != got {
                mismatched += 1;
            }
            if let Some(w) = &weights {
                for (j, e) in row.iter().enumerate() {
                    ref_w.push(w.get(t * k + j).copied().unwrap_or(f32::NAN));
                    our_w.push(mine.get(e).copied().unwrap_or(0.0));
                }
            }
        }
        if idx.len() != self.t * k {
            mismatched = mismatched.max(1);
        }
        self.push("topk_indices", Measure::Mismatches, mismatched as f64);
        if weights.is_some() {
            let v = rel_err(our_w.into_iter(), &ref_w);
            self.push("topk_weights", Measure::RelErr, v);
        }
        Ok(())
    }

    fn loss(
        &mut self,
        name: &str,
        routing: &Routing,
        which: impl Fn(&AuxLossKind) -> bool,
    ) -> Result<(), LoadError> {
        let r = self.ckpt.tensor(&format!("ref.{name}"))?;
        match routing.aux_losses().iter().find(|a| which(&a.kind)) {
            Some(a) => {
                let v = rel_err(std::iter::once(a.value), &r.data);
                self.push(name, Measure::RelErr, v);
            }
            None => self.skip(name, "the router reports no such loss"),
        }
        Ok(())
    }
}

/// `max_i |ours_i − ref_i| / max(max_i |ref_i|, 1e-30)`; infinite on a length mismatch or a NaN.
fn rel_err(ours: impl Iterator<Item = f32>, reference: &[f32]) -> f64 {
    let scale = reference
        .iter()
        .map(|v| (*v as f64).abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    let mut n = 0usize;
    let mut worst = 0.0f64;
    for (a, b) in ours.zip(reference) {
        n += 1;
        let diff = (a as f64 - *b as f64).abs();
        if diff.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(diff);
    }
    if n != reference.len() {
        return f64::INFINITY;
    }
    worst / scale
}
