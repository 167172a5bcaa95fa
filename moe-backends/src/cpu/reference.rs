//! The reference forward: per-expert ndarray products, the fast path's oracle.

use ndarray::Array2;
use rayon::prelude::*;

use moe_core::{LayerOutput, MoeError, MoeLayer, RouterInput};

use super::{combine, expert_forward, finish, internal};

/// The reference forward: per-expert ndarray products on freshly gathered rows, the same combine order. Slow and
/// simple; the fast path is tested against it. Banks the fast path does not run use the same per-expert code
/// (PEER its own path; custom experts in the fast forward's frame, `cpu/remote.rs`).
///
/// # Errors
/// As [`moe_core::DeviceLayer::forward`].
pub fn reference_forward(
    layer: &MoeLayer,
    input: &RouterInput<'_>,
) -> Result<LayerOutput, MoeError> {
    let routing = layer.route(input)?;
    let (t, d) = input.hidden.dim();
    // Expert outputs per slot, expert-major: each active expert owns a contiguous block of rows.
    let mut slot_out = Array2::<f32>::zeros((routing.n_slots(), d));
    {
        let mut blocks = Vec::with_capacity(routing.active_experts().len());
        let mut rest = slot_out
            .as_slice_mut()
            .ok_or_else(|| internal("slot buffer is not contiguous"))?;
        for g in routing.groups() {
            let (head, tail) = rest.split_at_mut(g.tokens.len() * d);
            blocks.push((g, head));
            rest = tail;
        }
        blocks.into_par_iter().try_for_each(|(g, out)| {
            let xg = input.hidden.select(
                ndarray::Axis(0),
                &g.tokens.iter().map(|&t| t as usize).collect::<Vec<_>>(),
            );
            let y = expert_forward(layer.experts(), g.expert, xg.view())?;
            let ys = y
                .as_slice()
                .ok_or_else(|| internal("expert output is not contiguous"))?;
            out.copy_from_slice(ys);
            Ok::<(), MoeError>(())
        })?;
    }
    let (offsets, slots) = routing.token_slots();
    let ys = slot_out
        .as_slice()
        .ok_or_else(|| internal("slot buffer is not contiguous"))?;
    let mut output = combine::combine(
        &offsets,
        &slots,
        routing.slot_weights(),
        ys,
        t,
        d,
        layer.output_scale(),
    )?;
    if let Some(shared) = layer.shared() {
        let ys = expert_forward(shared.bank(), 0, input.hidden)?;
        combine::add_shared(&mut output, input.hidden, ys.view(), shared.gate());
    }
    Ok(finish(layer, output, routing))
}
