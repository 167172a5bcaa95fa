//! The gradient references of a case (`ref.grad.*`, `ref.grad_lb.*`, `ref.grad_z.*`, format in
//! tests/fixtures/hf-grad/README.md): for each loss the file has gradients of, a training forward and a backward on
//! the backend, and every gradient compared with its reference.
//!
//! - `grad`: `L_out = Σ output ⊙ ref.cotangent` (`d_output` = the cotangent, every aux loss's `d_aux` = 0);
//! - `grad_lb`: the load-balancing loss alone (`d_output` = 0, `d_aux` = 1 for the plan's load-balancing loss);
//! - `grad_z`: the router z-loss alone.
//!
//! `ref.<loss>.input` is compared with `dL/dx`; each parameter gradient is split into the checkpoint's tensors by
//! the name the preset recorded ([`moe_models::hf_names::split_by_hf_name`]) and each piece compared with
//! `ref.<loss>.<checkpoint name>`. A piece without a reference must be zero: the producer stores no gradient that
//! is identically zero, so those pieces are measured together as one quantity (`grad_lb: 32 tensors torch stores
//! as zero`), their largest |value| relative to the largest reference of that loss. A
//! reference no gradient of ours maps to fails the case. A backend without training (wgpu, CUDA today) has the
//! gradient references skipped, with its error as the reason.

use std::collections::BTreeSet;
use std::sync::Arc;

use moe_core::{AuxLossKind, Backend, LayerGrads, MoeError};
use moe_models::LoadError;
use moe_models::fixture::FixtureCase;
use moe_models::hf_names::split_by_hf_name;
use ndarray::Array2;

use crate::compare::Compare;
use crate::{Measure, Side};

/// Picks the aux loss a gradient reference differentiates.
type AuxPick = fn(&AuxLossKind) -> bool;

/// The losses a fixture may hold gradients of: reference prefix, and the aux loss it differentiates (`None`:
/// the output loss).
const LOSSES: [(&str, Option<AuxPick>); 3] = [
    ("grad", None),
    (
        "grad_lb",
        Some(|k| matches!(k, AuxLossKind::LoadBalance(_))),
    ),
    ("grad_z", Some(|k| matches!(k, AuxLossKind::RouterZ))),
];

/// Whether `short` (a reference name without `ref.`) is one this module compares.
pub(crate) fn is_gradient_reference(short: &str) -> bool {
    short == "cotangent"
        || LOSSES
            .iter()
            .any(|(p, _)| short.starts_with(&format!("{p}.")))
}

/// Runs the backward of every loss the case has gradients of on `backend` and compares them.
///
/// # Errors
/// [`LoadError`] when a reference cannot be read or a call other than an unsupported one fails.
pub(crate) fn check(
    fx: &FixtureCase,
    name: &str,
    backend: &dyn Backend,
    rep: &mut Compare<'_>,
) -> Result<(), LoadError> {
    let refs = fx.reference_names();
    for (prefix, aux) in LOSSES {
        let wanted: Vec<&str> = refs
            .iter()
            .filter_map(|r| r.strip_prefix("ref."))
            .filter(|s| s.starts_with(&format!("{prefix}.")))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let err = |e: MoeError| LoadError::layer(&fx.path, format!("backward of case {name}"), e);
        let grads = match backward(fx, backend, aux) {
            Ok(g) => g,
            Err(MoeError::Unsupported { owner, feature }) => {
                let why = format!("{owner} does not support {feature} yet");
                for w in wanted {
                    rep.skip(w, &why);
                }
                continue;
            }
            Err(e) => return Err(err(e)),
        };
        compare_loss(fx, prefix, &wanted, &grads, rep)?;
    }
    Ok(())
}

/// The gradients of one loss: a training forward of the case's layer on `ref.input`, then the backward with
/// `d_output` = `ref.cotangent` (output loss) or 0, and `d_aux` = 1 on the first aux loss `aux` picks.
fn backward(
    fx: &FixtureCase,
    backend: &dyn Backend,
    aux: Option<AuxPick>,
) -> Result<LayerGrads, MoeError> {
    let seq_lens = fx.seq_lens();
    let input = moe_core::RouterInput::new(fx.input.view()).with_seq_lens(&seq_lens);
    let mut dev = backend.upload(Arc::new(fx.layer.clone()))?;
    let out = dev.forward_train(&input)?;
    let (t, d) = out.output.dim();
    let mut d_aux = vec![0.0f32; out.routing.aux_losses().len()];
    let d_output = match aux {
        None => {
            let c = fx
                .checkpoint
                .tensor("ref.cotangent")
                .map_err(|e| MoeError::config("ref.cotangent", "unreadable", e.to_string()))?;
            Array2::from_shape_vec((t, d), c.data).map_err(|_| {
                MoeError::shape("ref.cotangent", format!("[B, S, {d}] with B·S = {t}"), &[])
            })?
        }
        Some(pick) => {
            let i = out
                .routing
                .aux_losses()
                .iter()
                .position(|a| pick(&a.kind))
                .ok_or_else(|| {
                    MoeError::config(
                        "aux loss",
                        "absent",
                        "the fixture has its gradients but the router reports no such loss",
                    )
                })?;
            d_aux[i] = 1.0;
            Array2::zeros((t, d))
        }
    };
    dev.backward(d_output.view(), &d_aux)
}

/// Compares one loss's gradients with the references `wanted` (`grad.input`, `grad.gate.weight`, ...).
fn compare_loss(
    fx: &FixtureCase,
    prefix: &str,
    wanted: &[&str],
    grads: &LayerGrads,
    rep: &mut Compare<'_>,
) -> Result<(), LoadError> {
    let mut covered = BTreeSet::new();
    let input_ref = format!("{prefix}.input");
    if wanted.contains(&input_ref.as_str()) {
        rep.dense(&input_ref, grads.d_input.view(), Side::Backend)?;
        covered.insert(input_ref);
    }
    // Zero pieces are measured against the largest reference of this loss.
    let mut scale = 0.0f64;
    for w in wanted {
        let r = fx.checkpoint.tensor(&format!("ref.{w}"))?;
        scale = r.data.iter().fold(scale, |m, v| m.max(v.abs() as f64));
    }
    // Pieces without a reference, all measured as one quantity: the largest |value| among them.
    let (mut zero_pieces, mut zero_worst) = (0usize, 0.0f64);
    for g in &grads.params {
        let Some(hf) = &g.hf_name else {
            rep.skip(
                &format!("{prefix} of {}", g.name),
                "the parameter has no checkpoint name",
            );
            continue;
        };
        let dense = g
            .to_dense()
            .map_err(|e| LoadError::layer(&fx.path, format!("gradient {}", g.name), e))?;
        let pieces = split_by_hf_name(hf, dense.view())
            .map_err(|why| LoadError::config(&fx.path, format!("gradient {}", g.name), why))?;
        for (hf_piece, value) in pieces {
            let name = format!("{prefix}.{hf_piece}");
            let flat = value
                .view()
                .into_shape_with_order((1, value.len()))
                .map_err(|e| LoadError::config(&fx.path, name.clone(), e.to_string()))?;
            if wanted.contains(&name.as_str()) {
                rep.dense(&name, flat, Side::Backend)?;
                covered.insert(name);
            } else {
                zero_pieces += 1;
                zero_worst = value.iter().fold(zero_worst, |m, v| m.max(v.abs() as f64));
            }
        }
    }
    if zero_pieces > 0 {
        rep.measured(
            &format!("{prefix}: {zero_pieces} tensors torch stores as zero"),
            Measure::RelErr,
            zero_worst / scale.max(1e-30),
            Side::Backend,
        );
    }
    for w in wanted {
        if !covered.contains(*w) {
            rep.measured(
                &format!("{w} (no gradient of ours maps to it)"),
                Measure::Mismatches,
                1.0,
                Side::Backend,
            );
        }
    }
    Ok(())
}
