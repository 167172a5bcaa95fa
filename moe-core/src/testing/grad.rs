//! The gradient checker: a router's or a layer's backward against central finite differences.
//!
//! # Method
//! A random linear loss is built around the forward: for a router, `L = Σ_s c_s · w_s + Σ_i a_i · aux_i` (one
//! seeded `N(0, 1)` coefficient per kept weight and per auxiliary loss); for a layer,
//! `L = Σ output ⊙ C + Σ_i a_i · aux_i`. The analytic gradient of `L` (the backward with `d_weights = c` or
//! `d_output = C`, `d_aux = a`) is compared with `(L(θ + h) − L(θ − h)) / 2h`, `L` summed in f64 from the f32
//! forward, for sampled coordinates of the hidden states and of every trainable parameter: half of them where the
//! analytic gradient is largest in magnitude (so sparse gradients, PEER's, are checked where they live), half
//! uniformly at random.
//!
//! # Discontinuities
//! Routing is piecewise smooth: top-k, capacity and drops switch at ties. A coordinate whose `± h` forwards
//! change the plan (which token went to which expert, which were dropped) straddles such a switch; it is skipped
//! and counted ([`GradReport::skipped`]), and the check fails if more than half the coordinates of a tensor are
//! skipped. Kinks inside the experts (ReLU at 0, GPT-OSS's clamps) make the one-sided slopes differ: the analytic
//! value passes if it matches the central difference or either one-sided difference (autograd takes one side at a
//! kink).
//!
//! # Tolerance
//! `|analytic − fd| ≤ ATOL · s + RTOL · |fd|` with `s = max(1, max |analytic|)` over the tensor, `h = 1e-2 ·
//! max(1, |θ|)`. Why these bounds: the truncation error of a central difference is `h² / 6 · |L'''|`, about
//! `2e-5` for the unit-scale inputs the checks use; the rounding error of the f32 forward is about
//! `1e-7 · Σ|terms| / 2h`, under `1e-4` for the sizes checked (T ≤ 256); together far below `ATOL = 2e-3` of the
//! tensor's scale. A missing term, a wrong sign or a factor of 2 is off by the order of the scale itself, so it
//! fails.

use ndarray::{Array2, ArrayD};

use crate::backend::Backend;
use crate::grad::{Grad, RouterBackward};
use crate::layer::MoeLayer;
use crate::rng::SeqRng;
use crate::router::{Router, RouterInput};
use crate::routing::Routing;

/// Absolute tolerance, as a fraction of the tensor's scale (see the module docs).
pub const ATOL: f64 = 2e-3;
/// Relative tolerance.
pub const RTOL: f64 = 1e-2;
/// Coordinates checked per tensor.
const PER_TENSOR: usize = 12;

/// What a gradient check did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GradReport {
    /// Coordinates compared.
    pub checked: usize,
    /// Coordinates skipped because `± h` changed the plan.
    pub skipped: usize,
    /// The largest `|analytic − fd| / (ATOL · s + RTOL · |fd|)` seen (below 1 passes).
    pub worst: f64,
}

/// One coordinate's three differences and its verdict.
fn judge(an: f64, up: f64, mid: f64, down: f64, h: f64, scale: f64) -> (bool, f64) {
    let central = (up - down) / (2.0 * h);
    let fwd = (up - mid) / h;
    let bwd = (mid - down) / h;
    let ratio = [central, fwd, bwd]
        .iter()
        .map(|fd| (an - fd).abs() / (ATOL * scale + RTOL * fd.abs()))
        .fold(f64::INFINITY, f64::min);
    (ratio <= 1.0, ratio)
}

/// Flat indices to check in a tensor of `n` values: the largest `|analytic|` first, then random ones.
fn pick(analytic: &[f32], rng: &mut SeqRng) -> Vec<usize> {
    let n = analytic.len();
    if n <= PER_TENSOR {
        return (0..n).collect();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| {
        analytic[b]
            .abs()
            .total_cmp(&analytic[a].abs())
            .then(a.cmp(&b))
    });
    let mut out: Vec<usize> = idx[..PER_TENSOR / 2].to_vec();
    while out.len() < PER_TENSOR {
        let i = rng.below(n as u64) as usize;
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Whether two plans route identically (kept slots and dropped assignments; weights may differ).
fn same_plan(a: &Routing, b: &Routing) -> bool {
    a.active_experts() == b.active_experts()
        && a.offsets() == b.offsets()
        && a.slot_tokens() == b.slot_tokens()
        && a.dropped().len() == b.dropped().len()
        && a.dropped()
            .iter()
            .zip(b.dropped())
            .all(|(x, y)| (x.token, x.expert) == (y.token, y.expert))
}

/// Checks every coordinate chosen for one tensor with the loss `eval(flat index, value) -> Some(L)` (`None` when
/// the plan changed).
fn check_tensor(
    what: &str,
    value: &[f32],
    analytic: &[f32],
    rng: &mut SeqRng,
    report: &mut GradReport,
    eval: &mut dyn FnMut(usize, f32) -> Result<Option<f64>, String>,
) -> Result<(), String> {
    if value.len() != analytic.len() {
        return Err(format!(
            "{what}: gradient has {} values, the tensor {}",
            analytic.len(),
            value.len()
        ));
    }
    let scale = analytic.iter().fold(1.0f64, |m, &v| m.max(v.abs() as f64));
    let picks = pick(analytic, rng);
    let mut skipped = 0;
    for &i in &picks {
        let theta = value[i];
        let h = 1e-2 * theta.abs().max(1.0);
        let (hi, lo) = (theta + h, theta - h);
        let hh = ((hi - lo) as f64) / 2.0;
        let (Some(up), Some(mid), Some(down)) = (eval(i, hi)?, eval(i, theta)?, eval(i, lo)?)
        else {
            skipped += 1;
            continue;
        };
        let an = analytic[i] as f64;
        let (ok, ratio) = judge(an, up, mid, down, hh, scale);
        report.worst = report.worst.max(ratio);
        report.checked += 1;
        if !ok {
            return Err(format!(
                "{what}[{i}]: analytic {an:.6e}, finite differences {:.6e} (central), {:.6e} / {:.6e} \
                 (one-sided); tolerance {ATOL} x scale {scale:.3e} + {RTOL} x |fd|",
                (up - down) / (2.0 * hh),
                (up - mid) / hh,
                (mid - down) / hh
            ));
        }
    }
    report.skipped += skipped;
    if skipped * 2 > picks.len() {
        return Err(format!(
            "{what}: {skipped} of {} coordinates changed the plan at ± h; the check proves nothing here \
             (use an input with larger routing margins)",
            picks.len()
        ));
    }
    Ok(())
}

/// The router loss `Σ c_s w_s + Σ a_i aux_i` of a plan, or `None` when it routes differently from `base`.
fn router_loss(base: &Routing, plan: &Routing, c: &[f32], a: &[f32]) -> Option<f64> {
    if !same_plan(base, plan) || plan.aux_losses().len() != a.len() {
        return None;
    }
    let w: f64 = plan
        .slot_weights()
        .iter()
        .zip(c)
        .map(|(&w, &c)| w as f64 * c as f64)
        .sum();
    let aux: f64 = plan
        .aux_losses()
        .iter()
        .zip(a)
        .map(|(l, &a)| l.value as f64 * a as f64)
        .sum();
    Some(w + aux)
}

/// Dense values of a gradient, or an error naming it.
fn dense(g: &Grad) -> Result<ArrayD<f32>, String> {
    g.to_dense().map_err(|e| format!("{}: {e}", g.name))
}

/// Seeded `N(0, 1)` coefficients.
fn coefficients(rng: &mut SeqRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Checks `router.backward` against central finite differences on `input` (see the module docs for the loss,
/// the sampling, the treatment of plan switches and the tolerance): `dL/d(hidden)` and the gradient of every
/// trainable parameter of [`Router::params`], which must each have one gradient of the parameter's shape.
/// `seed` draws the loss coefficients and the coordinates. The input's mode is used as it is (train mode
/// re-draws the same noise from its seed, so the loss is a smooth function of the parameters).
///
/// # Errors
/// A description of the first coordinate out of tolerance, a missing or misshapen gradient, a failing backward,
/// or a tensor where most coordinates straddle a plan switch.
pub fn check_router_grad(
    router: &dyn Router,
    input: &RouterInput<'_>,
    seed: u64,
) -> Result<GradReport, String> {
    let name = router.name().to_string();
    let base = router
        .route(input)
        .map_err(|e| format!("{name}: route failed: {e}"))?;
    let mut rng = SeqRng::new(seed, 0x6AD);
    let c = coefficients(&mut rng, base.n_slots());
    let a = coefficients(&mut rng, base.aux_losses().len());
    let grads = router
        .backward(&RouterBackward {
            input,
            routing: &base,
            d_weights: &c,
            d_aux: &a,
        })
        .map_err(|e| format!("{name}: backward failed: {e}"))?;
    let mut report = GradReport::default();
    if grads.d_hidden.dim() != input.hidden.dim() {
        return Err(format!(
            "{name}: d_hidden is {:?}, the input {:?}",
            grads.d_hidden.shape(),
            input.hidden.shape()
        ));
    }
    // The hidden states.
    let x0 = input.hidden.to_owned();
    let flat_x: Vec<f32> = x0.iter().copied().collect();
    let flat_dx: Vec<f32> = grads.d_hidden.iter().copied().collect();
    let mut eval_x = |i: usize, v: f32| -> Result<Option<f64>, String> {
        let mut x = x0.clone();
        if let Some(slot) = x.as_slice_mut().and_then(|s| s.get_mut(i)) {
            *slot = v;
        }
        let inp = RouterInput {
            hidden: x.view(),
            ..input.clone()
        };
        let plan = router
            .route(&inp)
            .map_err(|e| format!("{name}: route failed at a perturbed input: {e}"))?;
        Ok(router_loss(&base, &plan, &c, &a))
    };
    check_tensor(
        &format!("{name}: d_hidden"),
        &flat_x,
        &flat_dx,
        &mut rng,
        &mut report,
        &mut eval_x,
    )?;
    // Every trainable parameter.
    for (pi, p) in router.params().iter().enumerate() {
        if !p.trainable {
            if grads.params.iter().any(|g| g.name == p.name) {
                return Err(format!("{name}: frozen state {} got a gradient", p.name));
            }
            continue;
        }
        let g = grads
            .params
            .iter()
            .find(|g| g.name == p.name)
            .ok_or_else(|| format!("{name}: no gradient for parameter {}", p.name))?;
        if g.shape() != p.shape() {
            return Err(format!(
                "{name}: gradient of {} is {:?}, the parameter {:?}",
                p.name,
                g.shape(),
                p.shape()
            ));
        }
        let an: Vec<f32> = dense(g)?.iter().copied().collect();
        let val: Vec<f32> = p.value.iter().copied().collect();
        let mut eval_p = |i: usize, v: f32| -> Result<Option<f64>, String> {
            let mut r = dyn_clone::clone_box(router);
            if let Some(mut pm) = r.params_mut().into_iter().nth(pi)
                && let Some(slot) = pm.value.iter_mut().nth(i)
            {
                *slot = v;
            }
            let plan = r
                .route(input)
                .map_err(|e| format!("{name}: route failed at a perturbed parameter: {e}"))?;
            Ok(router_loss(&base, &plan, &c, &a))
        };
        check_tensor(
            &format!("{name}: {}", p.name),
            &val,
            &an,
            &mut rng,
            &mut report,
            &mut eval_p,
        )?;
    }
    Ok(report)
}

/// Checks a layer's backward on `backend` against central finite differences on `input`: `dL/dx` and the gradient
/// of every trainable parameter of [`MoeLayer::params`] (router, experts, shared experts, output bias), for
/// `L = Σ output ⊙ C + Σ_i a_i · aux_i` with seeded `C` and `a` (see the module docs).
///
/// # Errors
/// A description of the first coordinate out of tolerance, a missing or misshapen gradient, a failing call, or a
/// tensor where most coordinates straddle a plan switch.
pub fn check_layer_grad(
    backend: &dyn Backend,
    layer: &MoeLayer,
    input: &RouterInput<'_>,
    seed: u64,
) -> Result<GradReport, String> {
    let what = format!(
        "layer ({} / {})",
        layer.router().name(),
        layer.experts().kind()
    );
    let mut dev = backend
        .upload(std::sync::Arc::new(layer.clone()))
        .map_err(|e| format!("{what}: upload failed: {e}"))?;
    let out = dev
        .forward_train(input)
        .map_err(|e| format!("{what}: forward_train failed: {e}"))?;
    let mut rng = SeqRng::new(seed, 0x6AE);
    let (t, d) = out.output.dim();
    let cot =
        Array2::from_shape_vec((t, d), coefficients(&mut rng, t * d)).map_err(|e| e.to_string())?;
    let a = coefficients(&mut rng, out.routing.aux_losses().len());
    let grads = dev
        .backward(cot.view(), &a)
        .map_err(|e| format!("{what}: backward failed: {e}"))?;
    let base = out.routing;
    let loss = |l: &MoeLayer, inp: &RouterInput<'_>| -> Result<Option<f64>, String> {
        let mut dev = backend
            .upload(std::sync::Arc::new(l.clone()))
            .map_err(|e| format!("{what}: upload failed: {e}"))?;
        let o = dev
            .forward(inp)
            .map_err(|e| format!("{what}: forward failed at a perturbed point: {e}"))?;
        if !same_plan(&base, &o.routing) || o.routing.aux_losses().len() != a.len() {
            return Ok(None);
        }
        let y: f64 = o
            .output
            .iter()
            .zip(cot.iter())
            .map(|(&y, &c)| y as f64 * c as f64)
            .sum();
        let aux: f64 = o
            .routing
            .aux_losses()
            .iter()
            .zip(&a)
            .map(|(l, &a)| l.value as f64 * a as f64)
            .sum();
        Ok(Some(y + aux))
    };
    let mut report = GradReport::default();
    if grads.d_input.dim() != (t, d) {
        return Err(format!("{what}: d_input is {:?}", grads.d_input.shape()));
    }
    let x0 = input.hidden.to_owned();
    let flat_x: Vec<f32> = x0.iter().copied().collect();
    let flat_dx: Vec<f32> = grads.d_input.iter().copied().collect();
    let mut eval_x = |i: usize, v: f32| -> Result<Option<f64>, String> {
        let mut x = x0.clone();
        if let Some(slot) = x.as_slice_mut().and_then(|s| s.get_mut(i)) {
            *slot = v;
        }
        let inp = RouterInput {
            hidden: x.view(),
            ..input.clone()
        };
        loss(layer, &inp)
    };
    check_tensor(
        &format!("{what}: d_input"),
        &flat_x,
        &flat_dx,
        &mut rng,
        &mut report,
        &mut eval_x,
    )?;
    check_layer_params(
        &what,
        layer,
        &grads,
        &mut rng,
        &mut report,
        &mut |l: &MoeLayer| loss(l, input),
    )?;
    Ok(report)
}

/// The parameter half of [`check_layer_grad`]: every trainable parameter has a gradient of its shape and name,
/// within tolerance of finite differences of `loss`; frozen state has none; no gradient names anything else.
fn check_layer_params(
    what: &str,
    layer: &MoeLayer,
    grads: &crate::grad::LayerGrads,
    rng: &mut SeqRng,
    report: &mut GradReport,
    loss: &mut dyn FnMut(&MoeLayer) -> Result<Option<f64>, String>,
) -> Result<(), String> {
    let params = layer.params();
    for (pi, p) in params.iter().enumerate() {
        let g = grads.get(&p.name);
        if !p.trainable {
            if g.is_some() {
                return Err(format!("{what}: frozen state {} got a gradient", p.name));
            }
            continue;
        }
        let g = g.ok_or_else(|| format!("{what}: no gradient for parameter {}", p.name))?;
        if g.shape() != p.shape() {
            return Err(format!(
                "{what}: gradient of {} is {:?}, the parameter {:?}",
                p.name,
                g.shape(),
                p.shape()
            ));
        }
        if g.hf_name != p.hf_name {
            return Err(format!(
                "{what}: gradient of {} carries checkpoint name {:?}, the parameter {:?}",
                p.name, g.hf_name, p.hf_name
            ));
        }
        let an: Vec<f32> = dense(g)?.iter().copied().collect();
        let val: Vec<f32> = p.value.iter().copied().collect();
        let mut eval_p = |i: usize, v: f32| -> Result<Option<f64>, String> {
            let mut l = layer.clone();
            if let Some(mut pm) = l.params_mut().into_iter().nth(pi)
                && let Some(slot) = pm.value.iter_mut().nth(i)
            {
                *slot = v;
            }
            loss(&l)
        };
        check_tensor(
            &format!("{what}: {}", p.name),
            &val,
            &an,
            rng,
            report,
            &mut eval_p,
        )?;
    }
    if let Some(extra) = grads
        .params
        .iter()
        .find(|g| !params.iter().any(|p| p.name == g.name))
    {
        return Err(format!(
            "{what}: gradient {} names no parameter",
            extra.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_accepts_one_sided_slopes_at_a_kink_and_rejects_wrong_values() {
        // relu(x) at x = 0 with h = 0.01: up = 0.01, mid = 0, down = 0; autograd says 0 (the left slope).
        assert!(judge(0.0, 0.01, 0.0, 0.0, 0.01, 1.0).0);
        assert!(judge(1.0, 0.01, 0.0, 0.0, 0.01, 1.0).0);
        assert!(!judge(0.3, 0.01, 0.0, 0.0, 0.01, 1.0).0);
        // A smooth function: x² at 1, slope 2.
        let (up, mid, down) = (1.01f64 * 1.01, 1.0, 0.99 * 0.99);
        assert!(judge(2.0, up, mid, down, 0.01, 2.0).0);
        assert!(!judge(1.0, up, mid, down, 0.01, 2.0).0);
        assert!(!judge(-2.0, up, mid, down, 0.01, 2.0).0);
    }

    #[test]
    fn pick_takes_the_largest_and_random_coordinates() {
        let mut rng = SeqRng::new(1, 2);
        let mut v = vec![0.0f32; 100];
        v[37] = 5.0;
        v[90] = -7.0;
        let p = pick(&v, &mut rng);
        assert_eq!(p.len(), PER_TENSOR);
        assert_eq!(&p[..2], &[90, 37]);
        assert_eq!(pick(&[1.0, 2.0], &mut rng), vec![0, 1]);
    }
}
