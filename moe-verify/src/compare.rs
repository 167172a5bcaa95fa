//! The measures: relative error of continuous quantities, mismatch counts of discrete ones, and the plan-derived
//! tensors the fixtures hold (`dropped`, `dispatch_mask`, `combine_weights`, per-token top-k sets).

use std::collections::BTreeMap;

use moe_core::Routing;
use moe_models::{Checkpoint, LoadError};
use ndarray::{Array2, ArrayView2};

use crate::{Measure, Quantity, Side, TOLERANCE};

/// Accumulates the quantities of one case.
pub(crate) struct Compare<'a> {
    ckpt: &'a Checkpoint,
    pub(crate) quantities: Vec<Quantity>,
    pub(crate) skipped: Vec<String>,
    t: usize,
}

impl<'a> Compare<'a> {
    /// An empty comparison against the references of `ckpt`, for `t` tokens.
    pub(crate) fn new(ckpt: &'a Checkpoint, t: usize) -> Self {
        Compare {
            ckpt,
            quantities: Vec::new(),
            skipped: Vec::new(),
            t,
        }
    }

    /// Records that `ref.{name}` is not compared, and why.
    pub(crate) fn skip(&mut self, name: &str, why: &str) {
        self.skipped.push(format!("{name} ({why})"));
    }

    /// Records a measured quantity (passing by [`Measure`]'s rule).
    pub(crate) fn measured(&mut self, name: &str, measure: Measure, value: f64, on: Side) {
        let passed = match measure {
            Measure::RelErr => value <= TOLERANCE,
            Measure::Mismatches => value == 0.0,
        };
        self.quantities.push(Quantity {
            name: name.to_string(),
            measure,
            value,
            passed,
            on,
        });
    }

    /// Compares `ours` with `ref.{name}` element by element (any reference shape with the same element count).
    pub(crate) fn dense(
        &mut self,
        name: &str,
        ours: ArrayView2<'_, f32>,
        on: Side,
    ) -> Result<(), LoadError> {
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
        self.measured(name, Measure::RelErr, v, on);
        Ok(())
    }

    /// Compares `ours` with the integer tensor `ref.{name}`: the number of differing entries (all of them on a
    /// length mismatch).
    pub(crate) fn discrete(&mut self, name: &str, ours: &[i64], on: Side) -> Result<(), LoadError> {
        let (_, reference) = self.ckpt.tensor_i64(&format!("ref.{name}"))?;
        let n = if reference.len() != ours.len() {
            reference.len().max(ours.len())
        } else {
            reference.iter().zip(ours).filter(|(a, b)| a != b).count()
        };
        self.measured(name, Measure::Mismatches, n as f64, on);
        Ok(())
    }

    /// Compares the router's choices with `ref.topk_indices` (as sets per token; pre-capacity choices, so dropped
    /// assignments count) and, when present, `ref.topk_weights` matched by expert.
    pub(crate) fn topk(&mut self, routing: &Routing, on: Side) -> Result<(), LoadError> {
        let (shape, idx) = self.ckpt.tensor_i64("ref.topk_indices")?;
        let k = shape.get(1).copied().unwrap_or(1).max(1);
        let weights = if self.ckpt.contains("ref.topk_weights") {
            Some(self.ckpt.tensor("ref.topk_weights")?.data)
        } else {
            None
        };
        let ours = choices(routing, self.t);
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
        self.measured("topk_indices", Measure::Mismatches, mismatched as f64, on);
        if weights.is_some() {
            let v = rel_err(our_w.into_iter(), &ref_w);
            self.measured("topk_weights", Measure::RelErr, v, on);
        }
        Ok(())
    }

    /// Compares a scalar loss with `ref.{name}`.
    pub(crate) fn scalar(&mut self, name: &str, value: f32, on: Side) -> Result<(), LoadError> {
        let r = self.ckpt.tensor(&format!("ref.{name}"))?;
        let v = rel_err(std::iter::once(value), &r.data);
        self.measured(name, Measure::RelErr, v, on);
        Ok(())
    }
}

/// Per token, the chosen experts and their weights: kept assignments, then dropped ones (pre-capacity choices).
fn choices(routing: &Routing, t: usize) -> Vec<BTreeMap<i64, f32>> {
    let mut ours: Vec<BTreeMap<i64, f32>> = vec![BTreeMap::new(); t];
    for (tok, picks) in routing.per_token().iter().enumerate() {
        for &(e, w, _) in picks {
            if let Some(m) = ours.get_mut(tok) {
                m.insert(e as i64, w);
            }
        }
    }
    for a in routing.dropped() {
        if let Some(m) = ours.get_mut(a.token as usize) {
            m.entry(a.expert as i64).or_insert(a.weight);
        }
    }
    ours
}

/// Row-wise softmax of `[T, E]`.
pub(crate) fn softmax_rows(l: ArrayView2<'_, f32>) -> Array2<f32> {
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
pub(crate) fn dropped_tokens(r: &Routing) -> Vec<i64> {
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
pub(crate) fn kept_mask(r: &Routing, first_only: bool) -> Vec<i64> {
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
pub(crate) fn kept_dense(r: &Routing) -> Array2<f32> {
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

/// `max_i |ours_i − ref_i| / max(max_i |ref_i|, 1e-30)`; infinite on a length mismatch or a NaN.
pub fn rel_err(ours: impl Iterator<Item = f32>, reference: &[f32]) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_err_scales_by_the_reference() {
        assert_eq!(rel_err([1.0f32, 2.0].into_iter(), &[1.0, 2.0]), 0.0);
        assert!((rel_err([1.0f32, 2.5].into_iter(), &[1.0, 2.0]) - 0.25).abs() < 1e-12);
        assert_eq!(rel_err([1.0f32].into_iter(), &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(rel_err([f32::NAN].into_iter(), &[1.0]), f64::INFINITY);
    }
}
