//! The disk tier of the expert store: [`DiskSource`], an [`ExpertSource`] that reads one expert at a time from a
//! safetensors file with positioned reads, and [`write_expert_checkpoint`] / [`read_gate`] for tests and benches.
//!
//! # What is read when
//! - [`DiskSource::open`] reads the 8-byte header length and the JSON header (at most [`MAX_HEADER_BYTES`]), and
//!   nothing else: the tensor data is neither read nor memory-mapped. It detects the layout of the block under the
//!   prefix, checks that every expert's tensors exist with one dtype and consistent shapes, and records the byte
//!   range of each expert's slice of each tensor. One [`File`] stays open.
//! - [`ExpertSource::load`] reads exactly expert `e`'s byte ranges with `pread` (`read_exact_at`, so several threads
//!   may load at once through the one file), through a buffer reused per thread (no allocation after a thread's
//!   first load: a test counts them), and converts them to `f32` into the destination slices.
//!
//! # Layouts
//! Detected from the names under `prefix`, in this order (`E` experts, `d` hidden, `f` expert width):
//! 1. [`Layout::PerExpert`], the Hub's per-expert names (Qwen2/3-MoE, OLMoE, DeepSeek):
//!    `{prefix}experts.{e}.gate_proj.weight` `[f, d]`, `up_proj` `[f, d]`, `down_proj` `[d, f]`;
//! 2. [`Layout::Mixtral`]: `{prefix}experts.{e}.w1.weight` (gate), `w3` (up), `w2` (down), same shapes (the
//!    prefix is `model.layers.{i}.block_sparse_moe.`);
//! 3. [`Layout::GptOss`], when `{prefix}experts.gate_up_proj_bias` exists: `experts.gate_up_proj` `[E, d, 2f]`
//!    (gate and up columns interleaved), `experts.gate_up_proj_bias` `[E, 2f]`, `experts.down_proj` `[E, f, d]`,
//!    `experts.down_proj_bias` `[E, d]`, with `alpha` 1.702 and `limit` 7.0 ([`DiskSource::with_gpt_oss_glu`]
//!    changes them);
//! 4. [`Layout::Fused`], transformers v5: `{prefix}experts.gate_up_proj` `[E, 2f, d]` (gate rows, then up rows),
//!    `{prefix}experts.down_proj` `[E, d, f]`.
//!
//! The first three are SwiGLU experts (SiLU), loaded as one expert of a [`moe_core::SwiGluBank`]: `gate_up`
//! `[2f, d]` = the gate rows then the up rows, `down` `[d, f]`, as the Mixtral and Qwen presets build the bank;
//! GPT-OSS experts load as one expert of a [`moe_core::GptOssBank`], in the file's layout. A stored expert's values
//! equal the resident bank's bit for bit (the same `bf16`/`f16` to `f32` conversion as [`crate::Checkpoint`]).
//! `E` is the rows of the router gate (`{prefix}gate.weight` or `{prefix}router.weight`) when the file has one,
//! else the highest expert index plus one (per-expert layouts) or the leading axis (fused layouts).
//!
//! # Cold reads
//! To measure reads from the device rather than from the page cache, [`DiskSource::drop_page_cache`] calls
//! `posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`, which drops the file's clean cached pages without root (unlike
//! `echo 3 > /proc/sys/vm/drop_caches`); [`DiskSource::with_cold_reads`] sets `POSIX_FADV_RANDOM` (no readahead
//! past the requested range) and drops each expert's ranges (widened to 64 KiB boundaries) right after reading
//! them, so every load reads from the device. `O_DIRECT` was not used: it needs the file offset, the length and the
//! buffer aligned to the device's block size, and a safetensors tensor starts at `8 + header length + offset`,
//! which is not aligned; some file systems (tmpfs) refuse it. Dirty pages are not dropped by `DONTNEED` (the writer
//! syncs its file), and the pages of a file on tmpfs are its storage: there, cold reads are memory reads. A virtual
//! machine's disk may also be cached by its host, below this process's view.
//!
//! # Errors
//! Opening returns a [`LoadError`] naming the file and the tensor: [`LoadError::MissingTensor`] for a missing
//! expert tensor (or, when nothing under the prefix looks like experts, every name that was tried),
//! [`LoadError::Shape`] with both shapes, [`LoadError::Dtype`] for a dtype other than `F32`, `BF16`, `F16` or one
//! that differs from the first expert's, and the header errors of [`crate::Checkpoint::open`]. A load returns
//! [`MoeError::Expert`] naming the expert, the tensor and the file for a read error (a file truncated after it
//! was opened, an I/O error); nothing it wrote is to be used.

//! # Example: a layer whose experts stay on disk
//! ```
//! use std::sync::Arc;
//!
//! use moe_backends::cpu::CpuBackend;
//! use moe_core::store::{Capacity, StoreConfig, StoredBank, policy::PolicyKind};
//! use moe_core::{Backend, ExpertBank, MoeLayer, RouterInput};
//! use moe_models::store::{DiskDtype, DiskSource, Layout, read_gate, write_expert_checkpoint};
//! use moe_routers::softmax_topk::SoftmaxTopKConfig;
//!
//! let dir = std::env::temp_dir().join(format!("moe-store-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("block.safetensors");
//! let prefix = "model.layers.0.mlp.";
//! // 8 SwiGLU experts of d = 32, f = 64 in the Hub's per-expert names, BF16, with the router gate.
//! write_expert_checkpoint(&path, prefix, Layout::PerExpert, 8, 32, 64, DiskDtype::Bf16, 0, true)?;
//!
//! // The experts stay in the file; at most 3 are resident, least recently used evicted first.
//! let source = Arc::new(DiskSource::open(&path, prefix)?);
//! let config = StoreConfig { capacity: Capacity::Experts(3), policy: PolicyKind::Lru, frequencies: None };
//! let bank = ExpertBank::Stored(StoredBank::new(source, config)?);
//! // Top-2 softmax routing over the checkpoint's gate `[E, d]`.
//! let router = SoftmaxTopKConfig::default().build(read_gate(&path, prefix)?, 2)?;
//! let layer = MoeLayer::new(Box::new(router), bank)?;
//!
//! let mut resident = CpuBackend::new().upload(Arc::new(layer))?;
//! let x = moe_core::ndarray::Array2::<f32>::from_elem((4, 32), 0.1);
//! let out = resident.forward(&RouterInput::new(x.view()))?;
//! let stats = resident.store_stats().expect("a stored layer has store stats");
//! assert_eq!(out.output.dim(), (4, 32));
//! assert_eq!(stats.bytes_read, stats.cache.loads * 3 * 32 * 64 * 2);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//! A layer loaded whole by a preset ([`crate::load_layer`]) keeps its router, shared experts and biases when its
//! experts move to a store: `layer.with_experts(ExpertBank::Stored(bank))`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use moe_core::store::{ExpertForm, ExpertSource, Tier, check_load_dst};
use moe_core::{Activation, MoeError};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::error::LoadError;
use crate::files::{first_duplicate_key, require_regular};

pub use crate::store_write::{
    read_gate, read_gate_in, write_expert_checkpoint, write_layers_checkpoint,
};

/// The largest safetensors header read: 100 MB, the `safetensors` crate's own limit.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Cold reads drop each range widened to this boundary (a multiple of every page size in use: 4, 16, 64 KiB).
const DROP_ALIGN: u64 = 64 << 10;

/// How a block's experts are laid out in a safetensors file (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `{prefix}experts.{e}.gate_proj|up_proj|down_proj.weight`: `[f, d]`, `[f, d]`, `[d, f]`.
    PerExpert,
    /// `{prefix}experts.{e}.w1|w3|w2.weight` (gate, up, down): `[f, d]`, `[f, d]`, `[d, f]`.
    Mixtral,
    /// `{prefix}experts.gate_up_proj` `[E, 2f, d]`, `{prefix}experts.down_proj` `[E, d, f]`.
    Fused,
    /// `{prefix}experts.gate_up_proj` `[E, d, 2f]` and `_bias` `[E, 2f]`, `experts.down_proj` `[E, f, d]` and
    /// `_bias` `[E, d]`.
    GptOss,
}

impl Layout {
    /// The layout's name: `per-expert`, `mixtral`, `fused`, `gpt-oss`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::PerExpert => "per-expert",
            Layout::Mixtral => "mixtral",
            Layout::Fused => "fused",
            Layout::GptOss => "gpt-oss",
        }
    }

    /// The per-expert projection names (gate, up, down) of the two per-expert layouts.
    pub(crate) fn projections(self) -> Option<[&'static str; 3]> {
        match self {
            Layout::PerExpert => Some(["gate_proj", "up_proj", "down_proj"]),
            Layout::Mixtral => Some(["w1", "w3", "w2"]),
            Layout::Fused | Layout::GptOss => None,
        }
    }
}

/// The dtype of the expert tensors in the file (all of them share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskDtype {
    /// IEEE single precision, 4 bytes.
    F32,
    /// bfloat16, 2 bytes.
    Bf16,
    /// IEEE half precision, 2 bytes.
    F16,
}

impl DiskDtype {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            DiskDtype::F32 => 4,
            DiskDtype::Bf16 | DiskDtype::F16 => 2,
        }
    }

    /// The name safetensors writes: `F32`, `BF16`, `F16`.
    pub fn name(self) -> &'static str {
        match self {
            DiskDtype::F32 => "F32",
            DiskDtype::Bf16 => "BF16",
            DiskDtype::F16 => "F16",
        }
    }

    fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(DiskDtype::F32),
            Dtype::BF16 => Some(DiskDtype::Bf16),
            Dtype::F16 => Some(DiskDtype::F16),
            _ => None,
        }
    }

    /// Converts little-endian values `src` (`out.len()` of them) into `out`, as [`crate::Checkpoint`] does.
    fn convert(self, src: &[u8], out: &mut [f32]) {
        match self {
            DiskDtype::F32 => {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            DiskDtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            DiskDtype::F16 => {
                for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }
}

/// One contiguous byte range of one expert: `values` values of tensor `names[name]` at file offset `offset`, into
/// destination slice `dst` from value `at`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    name: usize,
    offset: u64,
    values: usize,
    dst: usize,
    at: usize,
}

/// A parsed safetensors header.
#[derive(Debug)]
struct Header {
    path: PathBuf,
    /// File offset of the data section (8 + header length).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl Header {
    /// The info of `name`, or [`LoadError::MissingTensor`].
    fn get(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                file: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// `name`'s shape, checked to have `rank` axes, each at least 1.
    fn shape(&self, name: &str, rank: usize) -> Result<&[usize], LoadError> {
        let shape = &self.get(name)?.shape;
        if shape.len() != rank || shape.contains(&0) {
            return Err(self.shape_err(name, format!("{rank} axes, each at least 1"), shape));
        }
        Ok(shape)
    }

    /// Checks that `name` has shape `want`; `like` says where `want` comes from.
    fn expect(&self, name: &str, want: &[usize], like: &str) -> Result<(), LoadError> {
        let shape = &self.get(name)?.shape;
        if shape != want {
            return Err(self.shape_err(name, format!("{want:?} ({like})"), shape));
        }
        Ok(())
    }

    fn shape_err(&self, name: &str, expected: String, found: &[usize]) -> LoadError {
        LoadError::Shape {
            file: self.path.clone(),
            tensor: name.to_string(),
            expected,
            found: found.to_vec(),
        }
    }

    /// `name`'s dtype: F32, BF16 or F16, and `first`'s when given (named `first_name`).
    fn dtype(&self, name: &str, first: Option<(DiskDtype, &str)>) -> Result<DiskDtype, LoadError> {
        let found = self.get(name)?.dtype;
        let err = |expected: String| LoadError::Dtype {
            file: self.path.clone(),
            tensor: name.to_string(),
            found: format!("{found:?}"),
            expected,
        };
        let dtype = DiskDtype::of(found).ok_or_else(|| err("F32, BF16 or F16".into()))?;
        match first {
            Some((want, first_name)) if want != dtype => Err(err(format!(
                "{} (as {first_name}): one dtype for every expert",
                want.name()
            ))),
            _ => Ok(dtype),
        }
    }

    /// The absolute file offset of `name`'s data plus `skip` bytes.
    fn offset(&self, name: &str, skip: u64) -> Result<u64, LoadError> {
        let start = self.get(name)?.data_offsets.0 as u64;
        Ok(self.data_start + start + skip)
    }
}

/// Reads and checks the header of the safetensors file `file` (opened from `path`), without its data.
fn read_header(path: &Path, file: &File) -> Result<Header, LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io)?.len();
    if len < 8 {
        return Err(LoadError::Truncated {
            file: path.to_path_buf(),
            found: len,
            what: "the 8-byte header length is missing".into(),
        });
    }
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, 0).map_err(io)?;
    let header_len = u64::from_le_bytes(head);
    if header_len > MAX_HEADER_BYTES {
        return Err(LoadError::TooLarge {
            file: path.to_path_buf(),
            size: header_len,
            limit: MAX_HEADER_BYTES,
            what: "a safetensors header".into(),
        });
    }
    if header_len + 8 > len {
        return Err(LoadError::HeaderPastEnd {
            file: path.to_path_buf(),
            header_len,
            file_len: len,
        });
    }
    // At most `MAX_HEADER_BYTES`, and within the file: checked above.
    let mut bytes = vec![0u8; header_len as usize];
    file.read_exact_at(&mut bytes, 8).map_err(io)?;
    if let Some(key) = first_duplicate_key(&bytes) {
        return Err(LoadError::Duplicate {
            file: path.to_path_buf(),
            key,
            place: "safetensors header".into(),
        });
    }
    // `Metadata`'s own deserializer checks that the offsets are contiguous and match each dtype and shape.
    let meta: Metadata = serde_json::from_slice(&bytes).map_err(|e| LoadError::Header {
        file: path.to_path_buf(),
        source: safetensors::SafeTensorError::InvalidHeaderDeserialization(e),
    })?;
    let data_start = header_len + 8;
    if data_start + meta.data_len() as u64 != len {
        return Err(LoadError::Truncated {
            file: path.to_path_buf(),
            found: len,
            what: "the tensor data is shorter or longer than the header says".into(),
        });
    }
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(Header {
        path: path.to_path_buf(),
        data_start,
        tensors,
    })
}

/// The expert index `e` of `rest` = `experts.{e}.{proj}.weight` when `proj` is one of `projections`.
fn expert_index(rest: &str, projections: [&str; 3]) -> Option<usize> {
    let tail = rest.strip_prefix("experts.")?;
    let (e, proj) = tail.split_once('.')?;
    let proj = proj.strip_suffix(".weight")?;
    if !projections.contains(&proj) || e.is_empty() || !e.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    e.parse().ok()
}

/// What the detection found: the layout and, for per-expert layouts, the highest expert index named.
fn detect(h: &Header, prefix: &str) -> Result<(Layout, Option<usize>), LoadError> {
    for layout in [Layout::PerExpert, Layout::Mixtral] {
        let Some(projections) = layout.projections() else {
            continue;
        };
        let top = h
            .tensors
            .keys()
            .filter_map(|k| expert_index(k.strip_prefix(prefix)?, projections))
            .max();
        if top.is_some() {
            return Ok((layout, top));
        }
    }
    let fused = format!("{prefix}experts.gate_up_proj");
    if h.tensors.contains_key(&fused) {
        if h.tensors.contains_key(&format!("{fused}_bias")) {
            return Ok((Layout::GptOss, None));
        }
        return Ok((Layout::Fused, None));
    }
    let under = h.tensors.keys().filter(|k| k.starts_with(prefix)).count();
    Err(LoadError::MissingTensor {
        file: h.path.clone(),
        tensor: format!(
            "{prefix}experts.{{e}}.gate_proj.weight | {prefix}experts.{{e}}.w1.weight | {fused} \
             (no expert tensors under the prefix; {under} tensors start with it)"
        ),
    })
}

/// The router gate's rows and columns (`{prefix}gate.weight` or `{prefix}router.weight`), if the file has one.
fn gate_dims(h: &Header, prefix: &str) -> Result<Option<(String, usize, usize)>, LoadError> {
    for name in ["gate.weight", "router.weight"] {
        let full = format!("{prefix}{name}");
        if h.tensors.contains_key(&full) {
            let s = h.shape(&full, 2)?;
            return Ok(Some((full, s[0], s[1])));
        }
    }
    Ok(None)
}

/// Where each expert's bytes are: the result of checking a file's experts.
#[derive(Debug)]
struct Plan {
    form: ExpertForm,
    dtype: DiskDtype,
    n_experts: usize,
    /// Tensor names, indexed by [`Segment::name`].
    names: Vec<String>,
    /// `n_experts × per_expert` segments, expert-major.
    segments: Vec<Segment>,
    per_expert: usize,
}

/// Checks the router gate against `E` and `d`.
fn check_gate(
    h: &Header,
    gate: &Option<(String, usize, usize)>,
    e: usize,
    d: usize,
) -> Result<(), LoadError> {
    if let Some((name, _, _)) = gate {
        h.expect(name, &[e, d], "E experts by d")?;
    }
    Ok(())
}

/// The plan of a per-expert layout (`top` is the highest expert index named).
fn plan_per_expert(
    h: &Header,
    prefix: &str,
    layout: Layout,
    top: usize,
) -> Result<Plan, LoadError> {
    let [g, u, dn] = layout
        .projections()
        .unwrap_or(["gate_proj", "up_proj", "down_proj"]);
    let name = |e: usize, proj: &str| format!("{prefix}experts.{e}.{proj}.weight");
    let first = name(0, g);
    let s = h.shape(&first, 2)?;
    let (f, d) = (s[0], s[1]);
    let dtype = h.dtype(&first, None)?;
    let gate = gate_dims(h, prefix)?;
    let n_experts = gate.as_ref().map_or(top + 1, |(_, rows, _)| *rows);
    if let Some((gname, rows, cols)) = &gate
        && top >= *rows
    {
        let expected = format!("[{}, {d}] (the file holds {})", top + 1, name(top, g));
        return Err(h.shape_err(gname, expected, &[*rows, *cols]));
    }
    check_gate(h, &gate, n_experts, d)?;
    let fd = f * d;
    // Not preallocated from `E`: a gate's row count is not trusted before every expert is found.
    let mut names = Vec::new();
    let mut segments = Vec::new();
    let like = format!("as {first}");
    for e in 0..n_experts {
        for (i, (proj, shape)) in [(g, [f, d]), (u, [f, d]), (dn, [d, f])]
            .into_iter()
            .enumerate()
        {
            let full = name(e, proj);
            h.dtype(&full, Some((dtype, &first)))?;
            h.expect(&full, &shape, &like)?;
            segments.push(Segment {
                name: names.len(),
                offset: h.offset(&full, 0)?,
                values: fd,
                dst: usize::from(i == 2),
                at: if i == 1 { fd } else { 0 },
            });
            names.push(full);
        }
    }
    Ok(Plan {
        form: ExpertForm::SwiGlu {
            d,
            f,
            act: Activation::Silu,
        },
        dtype,
        n_experts,
        names,
        segments,
        per_expert: 3,
    })
}

/// The plan of a fused layout: `tensors` are `(name, per-expert shape, destination)` with the leading axis `E`.
fn plan_stacked(
    h: &Header,
    form: ExpertForm,
    tensors: &[(String, Vec<usize>)],
) -> Result<Plan, LoadError> {
    let (first, _) = tensors.first().ok_or_else(|| LoadError::MissingTensor {
        file: h.path.clone(),
        tensor: "expert tensors".into(),
    })?;
    let n_experts = h.get(first)?.shape.first().copied().unwrap_or(0);
    let dtype = h.dtype(first, None)?;
    let like = format!("E = {n_experts} as {first}");
    for (name, per) in tensors {
        h.dtype(name, Some((dtype, first)))?;
        let want: Vec<usize> = std::iter::once(n_experts)
            .chain(per.iter().copied())
            .collect();
        h.expect(name, &want, &like)?;
    }
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let mut segments = Vec::with_capacity(n_experts * tensors.len());
    for e in 0..n_experts {
        for (i, (name, per)) in tensors.iter().enumerate() {
            let values: usize = per.iter().product();
            let skip = (e * values * dtype.bytes()) as u64;
            segments.push(Segment {
                name: i,
                offset: h.offset(name, skip)?,
                values,
                dst: i,
                at: 0,
            });
        }
    }
    Ok(Plan {
        form,
        dtype,
        n_experts,
        names,
        segments,
        per_expert: tensors.len(),
    })
}

/// The plan of the transformers-v5 fused SwiGLU layout or of GPT-OSS.
fn plan_fused(h: &Header, prefix: &str, layout: Layout) -> Result<Plan, LoadError> {
    let gu = format!("{prefix}experts.gate_up_proj");
    let down = format!("{prefix}experts.down_proj");
    let s = h.shape(&gu, 3)?;
    let (e, a, b) = (s[0], s[1], s[2]);
    // Fused: [E, 2f, d]; GPT-OSS: [E, d, 2f].
    let (d, f2) = if layout == Layout::GptOss {
        (a, b)
    } else {
        (b, a)
    };
    if f2 % 2 != 0 {
        let want = if layout == Layout::GptOss {
            "[E, d, 2f] with 2f even"
        } else {
            "[E, 2f, d] with 2f even"
        };
        return Err(h.shape_err(&gu, want.into(), s));
    }
    let f = f2 / 2;
    check_gate(h, &gate_dims(h, prefix)?, e, d)?;
    let (form, tensors) = if layout == Layout::GptOss {
        let form = ExpertForm::GptOss {
            d,
            f,
            alpha: 1.702,
            limit: 7.0,
        };
        let tensors = vec![
            (gu.clone(), vec![d, f2]),
            (format!("{gu}_bias"), vec![f2]),
            (down.clone(), vec![f, d]),
            (format!("{down}_bias"), vec![d]),
        ];
        (form, tensors)
    } else {
        let form = ExpertForm::SwiGlu {
            d,
            f,
            act: Activation::Silu,
        };
        (form, vec![(gu.clone(), vec![f2, d]), (down, vec![d, f])])
    };
    plan_stacked(h, form, &tensors)
}

thread_local! {
    /// The read buffer of this thread's loads: grows to the largest range read, never shrinks.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The experts of one MoE block read on demand from one safetensors file (see the module docs).
#[derive(Debug)]
pub struct DiskSource {
    path: PathBuf,
    prefix: String,
    file: File,
    layout: Layout,
    plan: Plan,
    /// The values of each destination slice (from [`ExpertForm::tensors`]).
    sizes: Vec<usize>,
    cold: bool,
}

impl DiskSource {
    /// Opens the experts of the MoE block under `prefix` (`model.layers.0.mlp.`) in the safetensors file `path`:
    /// reads the header only (see the module docs for the layouts and checks).
    ///
    /// # Errors
    /// [`LoadError::Io`], [`LoadError::NotRegular`], [`LoadError::Truncated`], [`LoadError::HeaderPastEnd`],
    /// [`LoadError::TooLarge`], [`LoadError::Duplicate`], [`LoadError::Header`] for a bad file;
    /// [`LoadError::MissingTensor`] naming a missing expert tensor (or the names tried when there are no experts
    /// under `prefix`); [`LoadError::Shape`] naming the tensor with the expected and found shapes;
    /// [`LoadError::Dtype`] for a dtype other than F32, BF16 or F16, or differing from the first expert's.
    pub fn open(path: impl AsRef<Path>, prefix: &str) -> Result<Self, LoadError> {
        let path = path.as_ref();
        require_regular(path)?;
        let file = File::open(path).map_err(|source| LoadError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let h = read_header(path, &file)?;
        let (layout, top) = detect(&h, prefix)?;
        let plan = match (layout, top) {
            (Layout::PerExpert | Layout::Mixtral, Some(top)) => {
                plan_per_expert(&h, prefix, layout, top)?
            }
            _ => plan_fused(&h, prefix, layout)?,
        };
        Ok(DiskSource {
            path: path.to_path_buf(),
            prefix: prefix.to_string(),
            file,
            layout,
            sizes: plan.form.tensors().iter().map(|(_, n)| *n).collect(),
            plan,
            cold: false,
        })
    }

    /// Sets GPT-OSS's GLU `alpha` (1.702 by default) and clamp `limit` (7.0), as `swiglu_alpha` / `swiglu_limit`
    /// of its `config.json`.
    ///
    /// # Errors
    /// [`LoadError::Config`] when the experts are not GPT-OSS experts.
    pub fn with_gpt_oss_glu(mut self, alpha: f32, limit: f32) -> Result<Self, LoadError> {
        match &mut self.plan.form {
            ExpertForm::GptOss {
                alpha: a, limit: l, ..
            } => {
                *a = alpha;
                *l = limit;
                Ok(self)
            }
            other => Err(LoadError::config(
                &self.path,
                "swiglu_alpha",
                format!(
                    "the experts under {:?} are {} experts, not gpt_oss",
                    self.prefix,
                    other.kind()
                ),
            )),
        }
    }

    /// With `cold` true, every load reads from the device: readahead is turned off for this file
    /// (`POSIX_FADV_RANDOM`) and each expert's ranges are dropped from the page cache right after they are read
    /// (`POSIX_FADV_DONTNEED`). With `false`, the normal page-cached reads (`POSIX_FADV_NORMAL`).
    ///
    /// # Errors
    /// [`LoadError::Io`] when the kernel refuses the advice.
    pub fn with_cold_reads(mut self, cold: bool) -> Result<Self, LoadError> {
        let advice = if cold {
            libc::POSIX_FADV_RANDOM
        } else {
            libc::POSIX_FADV_NORMAL
        };
        fadvise(&self.file, 0, 0, advice).map_err(|source| LoadError::Io {
            file: self.path.clone(),
            source,
        })?;
        self.cold = cold;
        Ok(self)
    }

    /// Drops this file's clean pages from the page cache (`posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`; no root
    /// needed), so that the next loads read from the device. Pages another process keeps mapped or dirty stay.
    ///
    /// # Errors
    /// [`MoeError::Backend`] naming the file when the kernel refuses the advice.
    pub fn drop_page_cache(&self) -> Result<(), MoeError> {
        fadvise(&self.file, 0, 0, libc::POSIX_FADV_DONTNEED).map_err(|e| MoeError::Backend {
            backend: "disk store".into(),
            reason: format!("dropping the page cache of {}: {e}", self.path.display()),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The block prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The detected layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The dtype of the experts in the file.
    pub fn dtype(&self) -> DiskDtype {
        self.plan.dtype
    }

    /// Whether loads are cold reads ([`DiskSource::with_cold_reads`]).
    pub fn cold_reads(&self) -> bool {
        self.cold
    }

    /// The error of a failed read of `seg` for `expert`.
    fn read_err(&self, expert: usize, seg: &Segment, e: &std::io::Error) -> MoeError {
        let name = self.plan.names.get(seg.name).map_or("?", String::as_str);
        let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the file ends early (truncated after it was opened?)".to_string()
        } else {
            e.to_string()
        };
        MoeError::Expert {
            expert,
            reason: format!(
                "reading tensor {name} ({} bytes at offset {}) of {}: {why}",
                seg.values * self.plan.dtype.bytes(),
                seg.offset,
                self.path.display()
            ),
        }
    }
}

/// `posix_fadvise` on `file`'s range `[offset, offset + len)` (`len` 0: to the end).
#[allow(
    unsafe_code,
    reason = "libc's posix_fadvise is an FFI call; it takes a valid open descriptor and integers, and touches no memory"
)]
fn fadvise(file: &File, offset: u64, len: u64, advice: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let range = |v: u64| {
        libc::off_t::try_from(v).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (offset, len) = (range(offset)?, range(len)?);
    // SAFETY: the descriptor is open for as long as `file` is borrowed; the call reads no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// `[offset, offset + len)` widened to [`DROP_ALIGN`] boundaries: `(start, length)`.
fn widen(offset: u64, len: u64) -> (u64, u64) {
    let start = offset - offset % DROP_ALIGN;
    let end = (offset + len).div_ceil(DROP_ALIGN) * DROP_ALIGN;
    (start, end - start)
}

impl ExpertSource for DiskSource {
    fn form(&self) -> &ExpertForm {
        &self.plan.form
    }

    fn n_experts(&self) -> usize {
        self.plan.n_experts
    }

    fn tier(&self) -> Tier {
        Tier::Disk
    }

    fn stored_bytes_per_expert(&self) -> u64 {
        let per = &self.plan.segments[..self.plan.per_expert.min(self.plan.segments.len())];
        per.iter().map(|s| s.values as u64).sum::<u64>() * self.plan.dtype.bytes() as u64
    }

    fn describe(&self) -> String {
        format!(
            "file {} ({} {} experts under {:?})",
            self.path.display(),
            self.plan.dtype.name(),
            self.layout.name(),
            self.prefix
        )
    }

    fn load(&self, expert: usize, dst: &mut [&mut [f32]]) -> Result<(), MoeError> {
        // The sizes are checked without allocating (`check_load_dst` builds the form's list): it names the error.
        let sizes = &self.sizes;
        let fits = dst.len() == sizes.len() && dst.iter().zip(sizes).all(|(s, &n)| s.len() == n);
        if !fits {
            check_load_dst(&self.plan.form, dst)?;
        }
        let per = self.plan.per_expert;
        let segs = expert
            .checked_mul(per)
            .and_then(|a| self.plan.segments.get(a..a + per))
            .filter(|_| expert < self.plan.n_experts)
            .ok_or_else(|| MoeError::Expert {
                expert,
                reason: format!("{} holds {} experts", self.describe(), self.plan.n_experts),
            })?;
        let bytes = self.plan.dtype.bytes();
        READ_BUF.with_borrow_mut(|buf| {
            for seg in segs {
                let n = seg.values * bytes;
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                let raw = &mut buf[..n];
                self.file
                    .read_exact_at(raw, seg.offset)
                    .map_err(|e| self.read_err(expert, seg, &e))?;
                if self.cold {
                    let (start, len) = widen(seg.offset, n as u64);
                    fadvise(&self.file, start, len, libc::POSIX_FADV_DONTNEED)
                        .map_err(|e| self.read_err(expert, seg, &e))?;
                }
                let out = dst
                    .get_mut(seg.dst)
                    .and_then(|s| s.get_mut(seg.at..seg.at + seg.values))
                    .ok_or_else(|| MoeError::Expert {
                        expert,
                        reason: "the load plan does not match the destination (a bug)".into(),
                    })?;
                self.plan.dtype.convert(raw, out);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_index_parses_only_expert_names() {
        let p = ["gate_proj", "up_proj", "down_proj"];
        assert_eq!(expert_index("experts.12.up_proj.weight", p), Some(12));
        assert_eq!(expert_index("experts.0.gate_proj.weight", p), Some(0));
        assert_eq!(expert_index("experts.x.up_proj.weight", p), None);
        assert_eq!(expert_index("experts.+1.up_proj.weight", p), None);
        assert_eq!(expert_index("experts.1.up_proj.bias", p), None);
        assert_eq!(expert_index("experts.1.w1.weight", p), None);
        assert_eq!(expert_index("shared_expert.up_proj.weight", p), None);
        assert_eq!(expert_index("experts.gate_up_proj", p), None);
    }

    #[test]
    fn widen_covers_the_range_on_64k_boundaries() {
        // [70000, 70010) lies in the second 64 KiB block: [65536, 131072).
        assert_eq!(widen(70_000, 10), (65_536, 65_536));
        assert_eq!(widen(0, 65_536), (0, 65_536));
        // [65535, 65537) straddles the first boundary: two blocks.
        assert_eq!(widen(65_535, 2), (0, 131_072));
    }

    #[test]
    fn conversions_match_half() {
        let x = half::bf16::from_f32(-1.5).to_bits().to_le_bytes();
        let y = half::f16::from_f32(0.25).to_bits().to_le_bytes();
        let mut out = [0f32; 1];
        DiskDtype::Bf16.convert(&x, &mut out);
        assert_eq!(out[0], -1.5);
        DiskDtype::F16.convert(&y, &mut out);
        assert_eq!(out[0], 0.25);
        DiskDtype::F32.convert(&3.0f32.to_le_bytes(), &mut out);
        assert_eq!(out[0], 3.0);
    }
}
