//! Weighted combine of expert outputs into token rows, in a fixed order, and the shared-expert addition.

use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

use moe_core::{MoeError, Routing};

/// `y[t] = scale · Σ_{slots s of t, ascending expert} w_s · slot_out[s]`, `[T, d]`. Tokens with no slot get 0.
/// Each token's sum runs in one fixed order on one thread, so the result does not depend on the thread count.
pub(super) fn combine(
    routing: &Routing,
    slot_out: ArrayView2<'_, f32>,
    scale: f32,
) -> Result<Array2<f32>, MoeError> {
    let t = routing.n_tokens();
    let d = slot_out.ncols();
    let (offsets, slots) = routing.token_slots();
    let weights = routing.slot_weights();
    let mut y = Array2::<f32>::zeros((t, d));
    let buf = y.as_slice_mut().ok_or_else(|| MoeError::Backend {
        backend: "cpu".into(),
        reason: "output not contiguous".into(),
    })?;
    buf.par_chunks_mut(d.max(1))
        .enumerate()
        .for_each(|(tok, row)| {
            for &s in &slots[offsets[tok]..offsets[tok + 1]] {
                let w = weights[s];
                for (a, &b) in row.iter_mut().zip(slot_out.row(s).iter()) {
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
