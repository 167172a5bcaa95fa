//! The shared experts (every token, with the optional sigmoid gate) and the combine: `y[t] = scale · Σ w ·
//! out[slot]` over token `t`'s slots in ascending expert order, plus the (gated) shared output and the output
//! bias, one invocation per output value.

use ::wgpu as wg;

use moe_core::MoeError;

use super::execute::Encoder;
use super::gate::shared_gate;
use super::grouped::bank_products;
use super::params::CombineParams;
use super::sort::{Plan, Rows};
use super::upload::DeviceBank;

/// The shared experts' output and its gate, as the combine reads them.
pub(super) struct Shared {
    /// 0 none, 1 added, 2 added times `gate`.
    pub mode: u32,
    /// `[T, d]` (a placeholder when `mode` is 0).
    pub out: wg::Buffer,
    /// `[T]` (a placeholder unless `mode` is 2).
    pub gate: wg::Buffer,
}

/// Enqueues the shared experts over every token (`x`: `[T, d]`), if the layer has them.
pub(super) fn shared_experts(
    enc: &mut Encoder<'_>,
    shared: Option<&(DeviceBank, Option<wg::Buffer>)>,
    all_rows: &Rows,
    x: &wg::Buffer,
    t: usize,
    d: usize,
) -> Result<Shared, MoeError> {
    let mut s = Shared {
        mode: 0,
        out: enc.dummy.clone(),
        gate: enc.dummy.clone(),
    };
    let Some((bank, gate)) = shared else {
        return Ok(s);
    };
    let h = enc.storage("shared_hidden", (t * bank.f * 4) as u64)?;
    let out = enc.storage("shared_out", (t * d * 4) as u64)?;
    bank_products(enc, bank, all_rows, false, x, &h, &out);
    s.out = out;
    s.mode = 1;
    if let Some(g) = gate {
        let sg = enc.storage("shared_gate", (t * 4) as u64)?;
        shared_gate(enc, x, g, &sg, t, d);
        s.gate = sg;
        s.mode = 2;
    }
    Ok(s)
}

/// Enqueues the combine of the routed rows `slot_out` (per `plan`) and `shared` into `y` (`[T, d]`).
pub(super) fn combine(
    enc: &mut Encoder<'_>,
    plan: &Plan,
    slot_out: &wg::Buffer,
    shared: Shared,
    out_bias: Option<&wg::Buffer>,
    scale: f32,
    y: &wg::Buffer,
    (t, d): (usize, usize),
) {
    let params = CombineParams {
        t: t as u32,
        d: d as u32,
        fixed_k: plan.fixed_k,
        scale,
        shared_mode: shared.mode,
        has_bias: u32::from(out_bias.is_some()),
    };
    let (cx, cy) = enc.grid(((t * d) as u32).div_ceil(64));
    let bufs = vec![
        (1, slot_out.clone()),
        (2, plan.slot_weight.clone()),
        (3, plan.slots.clone()),
        (4, plan.offsets.clone()),
        (5, shared.out),
        (6, shared.gate),
        (7, out_bias.unwrap_or(&enc.dummy).clone()),
        (8, y.clone()),
    ];
    let p = enc.pipes();
    enc.push(&p.combine, &params, bufs, (cx, cy, 1));
}
