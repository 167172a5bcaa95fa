//! Running one forward's work: the dispatches with their typed parameters are encoded into one compute pass
//! (after zeroing the buffers that need it), submitted, and the requested buffers are read back through one
//! staging buffer. Device errors (validation, out of memory, lost device) become [`MoeError::Backend`].

use ::wgpu as wg;

use moe_core::MoeError;

use super::device::{Ctx, Pool, err};
use super::params::{KernelParams, PARAMS_BYTES};

/// One kernel launch: pipeline, its parameter block, storage buffers by binding, workgroups.
pub(super) struct Dispatch<'a> {
    pipe: &'a wg::ComputePipeline,
    params: [u8; PARAMS_BYTES],
    bufs: Vec<(u32, wg::Buffer)>,
    groups: (u32, u32, u32),
}

impl<'a> Dispatch<'a> {
    /// A launch of `pipe` with `params` (bound at binding 0) and `bufs`.
    pub fn new<P: KernelParams>(
        pipe: &'a wg::ComputePipeline,
        params: &P,
        bufs: Vec<(u32, wg::Buffer)>,
        groups: (u32, u32, u32),
    ) -> Self {
        let mut block = [0u8; PARAMS_BYTES];
        let bytes = bytemuck::bytes_of(params);
        // Every parameter struct fits (a compile-time check in `params`).
        block[..bytes.len()].copy_from_slice(bytes);
        Dispatch {
            pipe,
            params: block,
            bufs,
            groups,
        }
    }
}

/// The device work of one forward.
#[derive(Default)]
pub(super) struct Batch<'a> {
    /// Buffers zeroed before the first dispatch.
    pub clears: Vec<wg::Buffer>,
    /// Dispatches, in order.
    pub dispatches: Vec<Dispatch<'a>>,
    /// Buffers read back after the last dispatch, with their lengths in bytes.
    pub reads: Vec<(wg::Buffer, u64)>,
}

/// Encodes `batch`, submits it and returns the bytes of each of its reads.
///
/// # Errors
/// A device error (validation, out of memory, lost device) or a failed read-back.
pub(super) fn execute(
    ctx: &Ctx,
    pool: &mut Pool,
    batch: &Batch<'_>,
) -> Result<Vec<Vec<u8>>, MoeError> {
    let dev = &ctx.device;
    let scope_v = dev.push_error_scope(wg::ErrorFilter::Validation);
    let scope_m = dev.push_error_scope(wg::ErrorFilter::OutOfMemory);
    let groups = bind_groups(ctx, pool, &batch.dispatches)?;
    let mut enc = dev.create_command_encoder(&wg::CommandEncoderDescriptor { label: None });
    for b in &batch.clears {
        enc.clear_buffer(b, 0, None);
    }
    {
        let mut pass = enc.begin_compute_pass(&wg::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for (d, g) in batch.dispatches.iter().zip(&groups) {
            pass.set_pipeline(d.pipe);
            pass.set_bind_group(0, g, &[]);
            pass.dispatch_workgroups(d.groups.0, d.groups.1, d.groups.2);
        }
    }
    let total: u64 = batch.reads.iter().map(|r| r.1.next_multiple_of(4)).sum();
    let staging = pool.get(
        ctx,
        "staging",
        total,
        wg::BufferUsages::MAP_READ | wg::BufferUsages::COPY_DST,
    )?;
    let mut at = 0u64;
    for (src, n) in &batch.reads {
        if *n > 0 {
            enc.copy_buffer_to_buffer(src, 0, &staging, at, n.next_multiple_of(4));
        }
        at += n.next_multiple_of(4);
    }
    ctx.queue.submit([enc.finish()]);
    let oom = pollster::block_on(scope_m.pop());
    let invalid = pollster::block_on(scope_v.pop());
    if let Some(e) = oom.or(invalid) {
        return Err(err(format!("device error: {e}")));
    }
    let out = read_back(ctx, &staging, &batch.reads, total)?;
    let lost = ctx.take_uncaptured();
    if !lost.is_empty() {
        return Err(err(format!("device error: {}", lost.join("; "))));
    }
    Ok(out)
}

/// Writes every dispatch's parameter block into one uniform buffer (at the adapter's offset alignment) and makes
/// the bind groups.
fn bind_groups(
    ctx: &Ctx,
    pool: &mut Pool,
    dispatches: &[Dispatch<'_>],
) -> Result<Vec<wg::BindGroup>, MoeError> {
    let stride = ctx.uniform_align;
    let ubuf = pool.get(
        ctx,
        "params",
        stride * dispatches.len().max(1) as u64,
        wg::BufferUsages::UNIFORM | wg::BufferUsages::COPY_DST,
    )?;
    let mut blob = vec![0u8; (stride as usize) * dispatches.len().max(1)];
    for (i, d) in dispatches.iter().enumerate() {
        let at = i * stride as usize;
        blob[at..at + PARAMS_BYTES].copy_from_slice(&d.params);
    }
    ctx.queue.write_buffer(&ubuf, 0, &blob);
    Ok(dispatches
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut entries = vec![wg::BindGroupEntry {
                binding: 0,
                resource: wg::BindingResource::Buffer(wg::BufferBinding {
                    buffer: &ubuf,
                    offset: i as u64 * stride,
                    size: wg::BufferSize::new(PARAMS_BYTES as u64),
                }),
            }];
            for (b, buf) in &d.bufs {
                entries.push(wg::BindGroupEntry {
                    binding: *b,
                    resource: buf.as_entire_binding(),
                });
            }
            ctx.device.create_bind_group(&wg::BindGroupDescriptor {
                label: None,
                layout: &d.pipe.get_bind_group_layout(0),
                entries: &entries,
            })
        })
        .collect())
}

/// Maps `staging` and splits its first `total` bytes into the reads' lengths.
fn read_back(
    ctx: &Ctx,
    staging: &wg::Buffer,
    reads: &[(wg::Buffer, u64)],
    total: u64,
) -> Result<Vec<Vec<u8>>, MoeError> {
    if total == 0 {
        return Ok(vec![Vec::new(); reads.len()]);
    }
    let slice = staging.slice(0..total);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wg::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.device
        .poll(wg::PollType::wait_indefinitely())
        .map_err(|e| err(format!("waiting for the device: {e}")))?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(err(format!("reading results back: {e}"))),
        Err(_) => return Err(err("reading results back: the map callback never ran")),
    }
    let mut out = Vec::with_capacity(reads.len());
    {
        let view = slice
            .get_mapped_range()
            .map_err(|e| err(format!("reading results back: {e}")))?;
        let mut at = 0usize;
        for (_, n) in reads {
            out.push(view[at..at + *n as usize].to_vec());
            at += n.next_multiple_of(4) as usize;
        }
    }
    staging.unmap();
    Ok(out)
}

/// What the stages of one forward share while they build its [`Batch`]: the device, the layer's workspace pool
/// and a placeholder for unused bindings.
pub(super) struct Encoder<'a> {
    pub ctx: &'a Ctx,
    pub pool: &'a mut Pool,
    pub dummy: wg::Buffer,
    pub batch: Batch<'a>,
}

impl<'a> Encoder<'a> {
    /// The compiled kernels.
    pub fn pipes(&self) -> &'a super::pipelines::Pipes {
        &self.ctx.pipes
    }

    /// A workspace storage buffer named `name` of at least `bytes` bytes (checked against the binding limit).
    pub fn storage(&mut self, name: &'static str, bytes: u64) -> Result<wg::Buffer, MoeError> {
        self.pool.storage(self.ctx, name, bytes)
    }

    /// A workspace storage buffer holding `data`.
    pub fn upload(&mut self, name: &'static str, data: &[u8]) -> Result<wg::Buffer, MoeError> {
        let b = self.storage(name, data.len() as u64)?;
        if !data.is_empty() {
            self.ctx.queue.write_buffer(&b, 0, data);
        }
        Ok(b)
    }

    /// Appends a dispatch of `pipe` with `params` and `bufs` (binding, buffer) over `groups` workgroups.
    pub fn push<P: KernelParams>(
        &mut self,
        pipe: &'a wg::ComputePipeline,
        params: &P,
        bufs: Vec<(u32, wg::Buffer)>,
        groups: (u32, u32, u32),
    ) {
        self.batch
            .dispatches
            .push(Dispatch::new(pipe, params, bufs, groups));
    }

    /// `(x, y)` workgroups covering `n` ([`Ctx::grid`]).
    pub fn grid(&self, n: u32) -> (u32, u32) {
        self.ctx.grid(n)
    }
}
