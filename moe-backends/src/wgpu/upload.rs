//! Uploading an expert bank: the bank is packed into the canonical layout ([`crate::packed`]) on the host and
//! its two weights are uploaded in chunks of whole experts that each fit one storage binding.

use ::wgpu as wg;

use moe_core::{ExpertBank, MoeError};

use super::device::{Ctx, bytes_of, err, human};
use crate::packed::{PackedBank, pack};

/// Weights of the experts `[e0, e1)` in one buffer.
#[derive(Debug)]
pub(super) struct Chunk {
    pub e0: u32,
    pub e1: u32,
    pub buf: wg::Buffer,
}

/// An expert bank resident on the device, in the canonical layout.
#[derive(Debug)]
pub(super) struct DeviceBank {
    /// Epilogue of the first product ([`crate::packed::MODE_SINGLE`], ...).
    pub mode: u32,
    pub n_experts: usize,
    pub d: usize,
    pub f: usize,
    /// Activation code ([`crate::packed::act_code`]).
    pub act: u32,
    /// `[E, U, d]` in chunks; `up_stride = U · d` values per expert.
    pub up: Vec<Chunk>,
    pub up_stride: usize,
    /// `[E, U]`.
    pub up_bias: Option<wg::Buffer>,
    /// `[E, d, f]` in chunks; `down_stride = d · f` values per expert.
    pub down: Vec<Chunk>,
    pub down_stride: usize,
    /// `[E, d]`.
    pub down_bias: Option<wg::Buffer>,
    pub alpha: f32,
    pub limit: f32,
}

impl DeviceBank {
    /// Packs and uploads `bank` (`what`: "routed" or "shared", for errors).
    ///
    /// # Errors
    /// A bank this backend does not run (PEER, custom), an expert larger than one binding, a device error.
    pub fn upload(ctx: &Ctx, bank: &ExpertBank, what: &str) -> Result<Self, MoeError> {
        let p: PackedBank = pack(bank, "wgpu").map_err(|r| err(format!("{what} experts: {r}")))?;
        let bias = |name: &str, b: Option<&Vec<f32>>| {
            b.map(|b| ctx.storage_init(name, bytes_of(b))).transpose()
        };
        Ok(DeviceBank {
            mode: p.mode,
            n_experts: p.n_experts,
            d: p.d,
            f: p.f,
            act: p.act,
            up: upload_chunks(ctx, "experts.up", &p.up, p.n_experts)?,
            up_stride: p.up_per_expert(),
            up_bias: bias("experts.up_bias", p.up_bias.as_ref())?,
            down: upload_chunks(ctx, "experts.down", &p.down, p.n_experts)?,
            down_stride: p.down_per_expert(),
            down_bias: bias("experts.down_bias", p.down_bias.as_ref())?,
            alpha: p.alpha,
            limit: p.limit,
        })
    }
}

/// Uploads `data` (`n_experts` equal parts) in chunks of whole experts that each fit one binding.
fn upload_chunks(
    ctx: &Ctx,
    name: &str,
    data: &[f32],
    n_experts: usize,
) -> Result<Vec<Chunk>, MoeError> {
    let per = data.len() / n_experts.max(1);
    let per_bytes = (per as u64) * 4;
    let limit = ctx.max_weight_binding.min(ctx.max_buffer);
    if per_bytes > limit {
        return Err(err(format!(
            "one expert's {name} is {}, over the largest weight binding ({}): the layer is too large for \
             the wgpu backend here",
            human(per_bytes),
            human(limit)
        )));
    }
    let per_chunk = ((limit / per_bytes.max(1)) as usize).clamp(1, n_experts.max(1));
    let mut chunks = Vec::new();
    let mut e0 = 0usize;
    while e0 < n_experts {
        let e1 = (e0 + per_chunk).min(n_experts);
        let buf = ctx.storage_init(name, bytes_of(&data[e0 * per..e1 * per]))?;
        chunks.push(Chunk {
            e0: e0 as u32,
            e1: e1 as u32,
            buf,
        });
        e0 = e1;
    }
    Ok(chunks)
}
