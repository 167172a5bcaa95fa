//! Writes a seeded random MoE block's experts (and router gate) as a safetensors file in the Hub's names, streaming
//! tensor by tensor with bounded memory, for the disk store's tests and benches; reads the gate back.

use std::io::Write;
use std::path::{Path, PathBuf};

use moe_core::rng::CounterRng;
use ndarray::Array2;

use crate::checkpoint::Checkpoint;
use crate::error::LoadError;
use crate::store::{DiskDtype, Layout};

/// Values generated and written at a time: 64 Ki values, at most 256 KiB of buffer.
const CHUNK: usize = 1 << 16;

/// What fills a run of values: a role (gate, up, down, ...), an expert and a count.
#[derive(Debug, Clone, Copy)]
struct Run {
    seed: u64,
    role: u64,
    expert: usize,
    values: usize,
    scale: f32,
}

/// One tensor to write: its name, shape and the runs filling it in order.
#[derive(Debug)]
struct Planned {
    name: String,
    shape: Vec<usize>,
    runs: Vec<Run>,
}

/// Roles: the stream of [`CounterRng`] is `role << 32 | expert`, so an expert's gate, up and down values are the
/// same whichever layout writes them.
const GATE: u64 = 1;
const UP: u64 = 2;
const DOWN: u64 = 3;
const OSS_GATE_UP: u64 = 4;
const OSS_GATE_UP_BIAS: u64 = 5;
const OSS_DOWN: u64 = 6;
const OSS_DOWN_BIAS: u64 = 7;
const ROUTER: u64 = 8;
const ROUTER_BIAS: u64 = 9;

/// The tensors of `layout` for `n` experts of widths `d`, `f`, plus the router when `with_gate`.
fn plan(
    prefix: &str,
    seed: u64,
    layout: Layout,
    n: usize,
    d: usize,
    f: usize,
    with_gate: bool,
) -> Vec<Planned> {
    let (sd, sf) = (1.0 / (d as f32).sqrt(), 1.0 / (f as f32).sqrt());
    let run = |role, expert, values, scale| Run {
        seed,
        role,
        expert,
        values,
        scale,
    };
    let one = |name: String, shape: Vec<usize>, runs: Vec<Run>| Planned { name, shape, runs };
    let mut out = Vec::new();
    if with_gate {
        let name = if layout == Layout::GptOss {
            "router.weight"
        } else {
            "gate.weight"
        };
        out.push(one(
            format!("{prefix}{name}"),
            vec![n, d],
            vec![run(ROUTER, 0, n * d, sd)],
        ));
        if layout == Layout::GptOss {
            out.push(one(
                format!("{prefix}router.bias"),
                vec![n],
                vec![run(ROUTER_BIAS, 0, n, 0.1)],
            ));
        }
    }
    let fd = f * d;
    match layout {
        Layout::PerExpert | Layout::Mixtral => {
            let [g, u, dn] = layout
                .projections()
                .unwrap_or(["gate_proj", "up_proj", "down_proj"]);
            for e in 0..n {
                let name = |proj: &str| format!("{prefix}experts.{e}.{proj}.weight");
                out.push(one(name(g), vec![f, d], vec![run(GATE, e, fd, sd)]));
                out.push(one(name(u), vec![f, d], vec![run(UP, e, fd, sd)]));
                out.push(one(name(dn), vec![d, f], vec![run(DOWN, e, fd, sf)]));
            }
        }
        Layout::Fused => {
            let gu = (0..n).flat_map(|e| [run(GATE, e, fd, sd), run(UP, e, fd, sd)]);
            out.push(one(
                format!("{prefix}experts.gate_up_proj"),
                vec![n, 2 * f, d],
                gu.collect(),
            ));
            let dn = (0..n).map(|e| run(DOWN, e, fd, sf)).collect();
            out.push(one(format!("{prefix}experts.down_proj"), vec![n, d, f], dn));
        }
        Layout::GptOss => {
            let per = |role, values, scale| (0..n).map(|e| run(role, e, values, scale)).collect();
            let p = format!("{prefix}experts.");
            out.push(one(
                format!("{p}gate_up_proj"),
                vec![n, d, 2 * f],
                per(OSS_GATE_UP, 2 * fd, sd),
            ));
            out.push(one(
                format!("{p}gate_up_proj_bias"),
                vec![n, 2 * f],
                per(OSS_GATE_UP_BIAS, 2 * f, 0.1),
            ));
            out.push(one(
                format!("{p}down_proj"),
                vec![n, f, d],
                per(OSS_DOWN, fd, sf),
            ));
            out.push(one(
                format!("{p}down_proj_bias"),
                vec![n, d],
                per(OSS_DOWN_BIAS, d, 0.1),
            ));
        }
    }
    out
}

/// The safetensors header of `tensors` at `dtype`, padded with spaces to a multiple of 8 bytes.
fn header(tensors: &[Planned], dtype: DiskDtype) -> Result<Vec<u8>, serde_json::Error> {
    let mut s = String::from("{");
    let mut offset = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.shape.iter().product::<usize>() as u64 * dtype.bytes() as u64;
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&t.name)?,
            dtype.name(),
            serde_json::to_string(&t.shape)?,
            offset + bytes
        ));
        offset += bytes;
    }
    s.push('}');
    while s.len() % 8 != 0 {
        s.push(' ');
    }
    Ok(s.into_bytes())
}

/// Writes the runs of `t` to `out` as `dtype`, `CHUNK` values at a time.
fn write_tensor(
    out: &mut impl Write,
    t: &Planned,
    dtype: DiskDtype,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    for r in &t.runs {
        let rng = CounterRng::new(r.seed, (r.role << 32) | r.expert as u64);
        let mut i = 0usize;
        while i < r.values {
            let n = CHUNK.min(r.values - i);
            buf.clear();
            for j in i..i + n {
                let v = (2.0 * rng.uniform_at(j as u64) - 1.0) as f32 * r.scale;
                match dtype {
                    DiskDtype::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    DiskDtype::Bf16 => {
                        buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
                    }
                    DiskDtype::F16 => {
                        buf.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
                    }
                }
            }
            out.write_all(buf)?;
            i += n;
        }
    }
    Ok(())
}

/// Writes `header` and `tensors` to `tmp`, synced to the device.
fn write_file(
    tmp: &Path,
    header: &[u8],
    tensors: &[Planned],
    dtype: DiskDtype,
) -> std::io::Result<()> {
    let file = std::fs::File::create(tmp)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header)?;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for t in tensors {
        write_tensor(&mut out, t, dtype, &mut buf)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Writes a random MoE block's experts to the safetensors file `path` in `layout`'s names under `prefix`
/// (`model.layers.0.mlp.`): `n_experts` SwiGLU experts of hidden width `d` and expert width `f` (GPT-OSS experts
/// with biases for [`Layout::GptOss`]), every tensor in `dtype`, plus the router gate `{prefix}gate.weight`
/// `[E, d]` when `with_gate` (GPT-OSS: `router.weight` `[E, d]` and `router.bias` `[E]`).
///
/// Values are uniform in `[-s, s)` with `s = 1/√d` (gate, up, router) or `1/√f` (down), 0.1 for biases: value `i`
/// of an expert's gate, up or down matrix is value `i` of the [`CounterRng`] stream of `(seed, role, expert)`, so
/// the per-expert, Mixtral and fused layouts hold the same experts for one seed. The header is written first, then
/// each tensor streamed in 64 Ki-value chunks: memory stays bounded whatever the size (a Qwen3-30B-A3B layer,
/// `128 × 3 × 2048 × 768` values, is 1.2 GB in BF16). The file is written to a temporary name beside `path`, synced
/// and renamed: a reader never sees a partial file.
///
/// # Errors
/// [`LoadError::Config`] for a zero `n_experts`, `d` or `f` or a file over `u64` bytes; [`LoadError::Io`] naming
/// the file (the temporary file is removed).
pub fn write_expert_checkpoint(
    path: impl AsRef<Path>,
    prefix: &str,
    layout: Layout,
    n_experts: usize,
    d: usize,
    f: usize,
    dtype: DiskDtype,
    seed: u64,
    with_gate: bool,
) -> Result<(), LoadError> {
    write_layers_checkpoint(
        path,
        &[prefix.to_string()],
        layout,
        n_experts,
        d,
        f,
        dtype,
        seed,
        with_gate,
    )
}

/// [`write_expert_checkpoint`] for several MoE blocks in one file, one per prefix (`model.layers.{i}.mlp.`): block
/// `i` is written with seed `seed + i` (so block 0 equals [`write_expert_checkpoint`]'s block for `seed`).
///
/// # Errors
/// As [`write_expert_checkpoint`]; [`LoadError::Config`] for no prefixes.
#[expect(
    clippy::too_many_arguments,
    reason = "the shape, layout, dtype and seed of a written checkpoint"
)]
pub fn write_layers_checkpoint(
    path: impl AsRef<Path>,
    prefixes: &[String],
    layout: Layout,
    n_experts: usize,
    d: usize,
    f: usize,
    dtype: DiskDtype,
    seed: u64,
    with_gate: bool,
) -> Result<(), LoadError> {
    let path = path.as_ref();
    crate::files::check_output_file(path)?;
    if prefixes.is_empty() {
        return Err(LoadError::config(
            path,
            "prefixes",
            "at least one MoE block",
        ));
    }
    for (field, v) in [("n_experts", n_experts), ("d", d), ("f", f)] {
        if v == 0 {
            return Err(LoadError::config(path, field, "must be at least 1"));
        }
    }
    // Every tensor's bytes, and the total, must fit in u64 (and its values in usize).
    let per = (f as u128 * d as u128 * 3 + 2 * f as u128 + d as u128 + d as u128 + 1)
        * n_experts as u128
        * prefixes.len() as u128;
    if per * dtype.bytes() as u128 > u64::MAX as u128 / 2 || per > usize::MAX as u128 / 2 {
        return Err(LoadError::config(
            path,
            "n_experts",
            format!("{n_experts} experts of {d} x {f} are too large"),
        ));
    }
    let tensors: Vec<Planned> = prefixes
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            plan(
                p,
                seed.wrapping_add(i as u64),
                layout,
                n_experts,
                d,
                f,
                with_gate,
            )
        })
        .collect();
    let header = header(&tensors, dtype).map_err(|source| LoadError::Json {
        file: path.to_path_buf(),
        source,
    })?;
    let tmp = temp_name(path);
    write_file(&tmp, &header, &tensors, dtype)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            LoadError::Io {
                file: path.to_path_buf(),
                source,
            }
        })
}

/// `dir/.name.tmp-{pid}` beside `path`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Reads the router gate `{prefix}gate.weight` `[E, d]` (or GPT-OSS's `{prefix}router.weight`) of the safetensors
/// file `path`, as `f32`.
///
/// # Errors
/// As [`Checkpoint::open`] and [`crate::Weights::get2`]; [`LoadError::MissingTensor`] naming both names when
/// neither exists.
pub fn read_gate(path: impl AsRef<Path>, prefix: &str) -> Result<Array2<f32>, LoadError> {
    read_gate_in(&Checkpoint::open(path)?, prefix)
}

/// [`read_gate`] in an open checkpoint (a caller reading several blocks' gates opens the file once).
///
/// # Errors
/// As [`crate::Weights::get2`]; [`LoadError::MissingTensor`] naming both names when neither exists.
pub fn read_gate_in(ckpt: &Checkpoint, prefix: &str) -> Result<Array2<f32>, LoadError> {
    let w = ckpt.weights(prefix);
    let name = w.first_of(&["gate.weight", "router.weight"])?;
    w.get2(name, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_offsets_are_contiguous_and_padded() {
        let t = plan("p.", 0, Layout::Fused, 2, 4, 3, true);
        let h = header(&t, DiskDtype::Bf16).expect("header");
        assert_eq!(h.len() % 8, 0);
        let v: serde_json::Value = serde_json::from_slice(&h).expect("json");
        // gate [2, 4] = 8 values = 16 bytes; gate_up [2, 6, 4] = 48 values = 96 bytes; down [2, 4, 3] = 48 bytes.
        assert_eq!(
            v["p.gate.weight"]["data_offsets"],
            serde_json::json!([0, 16])
        );
        assert_eq!(
            v["p.experts.gate_up_proj"]["data_offsets"],
            serde_json::json!([16, 112])
        );
        assert_eq!(
            v["p.experts.down_proj"]["data_offsets"],
            serde_json::json!([112, 160])
        );
    }
}
