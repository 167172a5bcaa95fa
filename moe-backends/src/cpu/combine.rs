//! Weighted combine of expert outputs into token rows, in a fixed order, and the shared-expert addition.

use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

use moe_core::MoeError;

/// `y[t] = scale · Σ_{slots s of t, ascending expert} w_s · slot_out[s]`, `[T, d]`, from the token-major slot index
/// (`token_offsets [T + 1]`, `token_slots`) and the slot outputs (`[slots, d]`, row-major). Tokens with no slot
/// get 0. Each token's sum runs in one fixed order on one thread, so the result does not depend on the thread
/// count.
pub(super) fn combine(
    token_offsets: &[usize],
    token_slots: &[usize],
    weights: &[f32],
    slot_out: &[f32],
    t: usize,
    d: usize,
    scale: f32,
) -> Result<Array2<f32>, MoeError> {
    let mut y = Array2::<f32>::zeros((t, d));
    if t == 0 || d == 0 {
        return Ok(y);
    }
    let buf = y.as_slice_mut().ok_or_else(|| MoeError::Backend {
        backend: "cpu".into(),
        reason: "output not contiguous".into(),
    })?;
    buf.par_chunks_mut(d).enumerate().for_each(|(tok, row)| {
        for &s in &token_slots[token_offsets[tok]..token_offsets[tok + 1]] {
            let w = weights[s];
            for (a, &b) in row.iter_mut().zip(&slot_out[s * d..(s + 1) * d]) {
                *a += w * b;
            }
        }
        if scale != 1.0 {
            row.iter_mut().for_each(|v| *v *= scale);
        }
    });
    Ok(y)
}

/// `y += gate(x) · shared`, with `gate(x) = sigmoid(x · g)` when a gate vector is given, else 1.
pub(super) fn add_shared(
    y: &mut Array2<f32>,
    x: ArrayView2<'_, f32>,
    shared: ArrayView2<'_, f32>,
    gate: Option<&Array1<f32>>,
) {
    match gate {
        None => *y += &shared,
        Some(g) => {
            let logits = x.dot(g);
            for ((mut row, s), &l) in y
                .outer_iter_mut()
                .zip(shared.outer_iter())
                .zip(logits.iter())
            {
                let gv = 1.0 / (1.0 + (-l).exp());
                row.zip_mut_with(&s, |a, &b| *a += gv * b);
            }
        }
    }
}
