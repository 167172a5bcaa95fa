//! Safetensors checkpoints, memory-mapped: one file, or shards listed by `model.safetensors.index.json`. Tensors
//! are decoded once to `f32` (from `F32`, `BF16` or `F16`, little-endian) with bounds-checked reads; nothing in a
//! file can make the loader panic. [`Weights`] walks names under a prefix, like candle's `VarBuilder::pp`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use ndarray::{Array1, Array2, Array3};
use safetensors::tensor::{Dtype, TensorInfo};

use crate::error::LoadError;
use crate::files::{confined_path, first_duplicate_key, read_json, require_regular};

/// The file name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The file name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One memory-mapped safetensors file and its parsed header.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    metadata: Option<HashMap<String, String>>,
}

/// A tensor decoded to `f32`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major (`[i, j, k]` of `[I, J, K]` at `(i*J + j)*K + k`).
    pub data: Vec<f32>,
}

/// A tensor's bytes as stored (little-endian, row-major), with its dtype and shape, borrowed from the memory map:
/// what packed loading copies once into a `moe_core::PackedMatrix` (no f32 copy).
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The dtype in the file.
    pub dtype: Dtype,
    /// The shape.
    pub shape: &'a [usize],
    /// `numel · dtype size` bytes (checked against dtype and shape).
    pub bytes: &'a [u8],
}

/// A checkpoint: one or several memory-mapped safetensors files and where each tensor lives.
#[derive(Debug)]
pub struct Checkpoint {
    /// What the user opened (file, index or directory), for messages.
    origin: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name to shard index.
    names: BTreeMap<String, usize>,
}

/// Maps a file read-only.
#[allow(
    unsafe_code,
    reason = "memmap2's `Mmap::map` is unsafe: the map aliases the file; confined to this function"
)]
fn map_file(path: &Path) -> Result<Mmap, LoadError> {
    let io = |source| LoadError::Io {
        file: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and owned by the `Shard` that holds it; every read from it goes through
    // bounds-checked slices. Like every mmap-based safetensors loader (the crate's own docs, candle), this relies on
    // the file not being truncated or rewritten by another process while it is mapped; that is documented on
    // `Checkpoint::open` as unsupported.
    unsafe { Mmap::map(&file) }.map_err(io)
}

fn open_shard(path: &Path) -> Result<Shard, LoadError> {
    let len = require_regular(path)?.len();
    if len < 8 {
        return Err(LoadError::Truncated {
            file: path.to_path_buf(),
            found: len,
            what: "the 8-byte header length is missing".into(),
        });
    }
    let map = map_file(path)?;
    let mut head = [0u8; 8];
    head.copy_from_slice(map.get(..8).unwrap_or(&[0u8; 8]));
    let header_len = u64::from_le_bytes(head);
    if header_len.saturating_add(8) > map.len() as u64 {
        return Err(LoadError::HeaderPastEnd {
            file: path.to_path_buf(),
            header_len,
            file_len: map.len() as u64,
        });
    }
    let (n, meta) =
        safetensors::SafeTensors::read_metadata(&map).map_err(|source| match source {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => LoadError::Truncated {
                file: path.to_path_buf(),
                found: len,
                what: "the tensor data is shorter or longer than the header says".into(),
            },
            source => LoadError::Header {
                file: path.to_path_buf(),
                source,
            },
        })?;
    // The crate's header map keeps the last of two definitions of a name: refused instead (bytes `8..8 + n` are
    // the header the crate just parsed).
    if let Some(key) = map.get(8..8 + n).and_then(first_duplicate_key) {
        return Err(LoadError::Duplicate {
            file: path.to_path_buf(),
            key,
            place: "safetensors header".into(),
        });
    }
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(Shard {
        path: path.to_path_buf(),
        data_start: n + 8,
        tensors,
        metadata: meta.metadata().clone(),
        map,
    })
}

/// `model.safetensors.index.json`: the part the loader reads.
#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `model.safetensors.index.json` (its shards are read from the
    /// same directory), or a directory holding either (the index wins).
    ///
    /// The files are memory-mapped: they must not be modified while the checkpoint is open.
    ///
    /// # Errors
    /// [`LoadError::Io`], [`LoadError::NotRegular`], [`LoadError::Truncated`], [`LoadError::HeaderPastEnd`],
    /// [`LoadError::Header`] for a bad file; [`LoadError::Duplicate`] for a tensor defined twice in a header or a
    /// repeated key in the index; [`LoadError::Json`] or [`LoadError::TooLarge`] for a bad index;
    /// [`LoadError::OutsideDir`] when the index names a shard outside its directory (`..`, an absolute path, a
    /// symlink resolving elsewhere: not opened); [`LoadError::MissingShard`] when it names a missing file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        if path.is_dir() {
            let index = path.join(INDEX_FILE);
            // Anything at the index's name is the index: one that is not a regular file is an error, not skipped.
            if index.symlink_metadata().is_ok() {
                return Self::open_index(&index);
            }
            return Self::open_files(path, &[path.join(SINGLE_FILE)]);
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Self::open_index(path);
        }
        Self::open_files(path, &[path.to_path_buf()])
    }

    /// Opens the shards that an index file lists.
    fn open_index(index_path: &Path) -> Result<Self, LoadError> {
        let index: Index = read_json(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut shards = Vec::new();
        let mut names = BTreeMap::new();
        for (tensor, shard) in &index.weight_map {
            let i = match shard_of.get(shard.as_str()) {
                Some(&i) => i,
                None => {
                    // Confined to the index's directory before anything is opened.
                    let p = confined_path(dir, shard, index_path)?;
                    if p.symlink_metadata().is_err() {
                        return Err(LoadError::MissingShard {
                            index: index_path.to_path_buf(),
                            shard: shard.clone(),
                            tensor: tensor.clone(),
                        });
                    }
                    shards.push(open_shard(&p)?);
                    shard_of.insert(shard, shards.len() - 1);
                    shards.len() - 1
                }
            };
            names.insert(tensor.clone(), i);
        }
        Ok(Checkpoint {
            origin: index_path.to_path_buf(),
            shards,
            names,
        })
    }

    /// Opens safetensors files as one checkpoint (a later file's tensor of the same name wins).
    fn open_files(origin: &Path, files: &[PathBuf]) -> Result<Self, LoadError> {
        let mut shards = Vec::new();
        let mut names = BTreeMap::new();
        for f in files {
            let s = open_shard(f)?;
            for k in s.tensors.keys() {
                names.insert(k.clone(), shards.len());
            }
            shards.push(s);
        }
        Ok(Checkpoint {
            origin: origin.to_path_buf(),
            shards,
            names,
        })
    }

    /// What was opened (file, index or directory).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.names.keys().map(String::as_str)
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The `__metadata__` entry `key` of the first file that has it.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.shards
            .iter()
            .find_map(|s| s.metadata.as_ref()?.get(key).map(String::as_str))
    }

    /// The file, dtype and shape of `name`, without reading its data.
    fn info(&self, name: &str) -> Result<(&Shard, &TensorInfo), LoadError> {
        let missing = || LoadError::MissingTensor {
            file: self.origin.clone(),
            tensor: name.to_string(),
        };
        let shard = self
            .names
            .get(name)
            .and_then(|&i| self.shards.get(i))
            .ok_or_else(missing)?;
        let info = shard
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor {
                file: shard.path.clone(),
                tensor: name.to_string(),
            })?;
        Ok((shard, info))
    }

    /// The shape of `name`.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`].
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        Ok(self.info(name)?.1.shape.clone())
    }

    /// The dtype of `name` as safetensors writes it (`F32`, `BF16`).
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`].
    pub fn dtype(&self, name: &str) -> Result<String, LoadError> {
        Ok(format!("{:?}", self.info(name)?.1.dtype))
    }

    /// The raw little-endian bytes of `name`, checked against its dtype and shape.
    fn raw(&self, name: &str) -> Result<(&Shard, &TensorInfo, &[u8]), LoadError> {
        let (shard, info) = self.info(name)?;
        let (a, b) = info.data_offsets;
        let bytes = shard
            .data_start
            .checked_add(a)
            .zip(shard.data_start.checked_add(b))
            .and_then(|(a, b)| shard.map.get(a..b))
            .ok_or_else(|| LoadError::Truncated {
                file: shard.path.clone(),
                found: shard.map.len() as u64,
                what: format!("tensor {name} ends past the end of the file"),
            })?;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s));
        let want = numel.and_then(|n| n.checked_mul(info.dtype.bitsize() / 8));
        if want != Some(bytes.len()) {
            return Err(LoadError::Truncated {
                file: shard.path.clone(),
                found: shard.map.len() as u64,
                what: format!(
                    "tensor {name} holds {} bytes, its dtype and shape {:?} need {:?}",
                    bytes.len(),
                    info.shape,
                    want
                ),
            });
        }
        Ok((shard, info, bytes))
    }

    /// The bytes of `name` as stored, without conversion ([`RawTensor`]).
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::Truncated`] for bytes that do not match the dtype and shape.
    pub fn raw_tensor(&self, name: &str) -> Result<RawTensor<'_>, LoadError> {
        let (_, info, bytes) = self.raw(name)?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: &info.shape,
            bytes,
        })
    }

    /// Reads `name` as `f32`, converting `BF16` and `F16` once.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::Dtype`] for other dtypes, [`LoadError::Truncated`].
    pub fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        let (shard, info, bytes) = self.raw(name)?;
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
            other => {
                return Err(LoadError::Dtype {
                    file: shard.path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                    expected: "F32, BF16 or F16".into(),
                });
            }
        };
        Ok(Tensor {
            shape: info.shape.clone(),
            data,
        })
    }

    /// Reads an integer tensor (`I64`, `I32` or `U8`, as the fixtures' indices and masks) as `i64`.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::Dtype`], [`LoadError::Truncated`].
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>), LoadError> {
        let (shard, info, bytes) = self.raw(name)?;
        let data: Vec<i64> = match info.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            Dtype::U8 | Dtype::BOOL => bytes.iter().map(|&b| b as i64).collect(),
            other => {
                return Err(LoadError::Dtype {
                    file: shard.path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                    expected: "I64, I32, U8 or BOOL".into(),
                });
            }
        };
        Ok((info.shape.clone(), data))
    }

    /// The file holding `name` (the checkpoint's origin if it is missing), for messages.
    pub fn file_of(&self, name: &str) -> &Path {
        self.info(name)
            .map(|(s, _)| s.path.as_path())
            .unwrap_or(&self.origin)
    }

    /// A view of the tensors under `prefix` (`model.layers.3.block_sparse_moe.`).
    pub fn weights(&self, prefix: &str) -> Weights<'_> {
        Weights {
            ckpt: self,
            prefix: prefix.to_string(),
        }
    }
}

/// Tensors under a name prefix, read with expected shapes.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// The same checkpoint under `prefix + sub` (`sub` gets a trailing `.` if it has none).
    pub fn pp(&self, sub: &str) -> Weights<'a> {
        let mut prefix = format!("{}{sub}", self.prefix);
        if !prefix.is_empty() && !prefix.ends_with('.') {
            prefix.push('.');
        }
        Weights {
            ckpt: self.ckpt,
            prefix,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The checkpoint.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// The full name of `name`.
    pub fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether `name` exists under the prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.full(name))
    }

    /// The first of `names` that exists under the prefix.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`] listing every name tried.
    pub fn first_of<'n>(&self, names: &[&'n str]) -> Result<&'n str, LoadError> {
        names
            .iter()
            .copied()
            .find(|n| self.contains(n))
            .ok_or_else(|| LoadError::MissingTensor {
                file: self.ckpt.origin.clone(),
                tensor: names
                    .iter()
                    .map(|n| self.full(n))
                    .collect::<Vec<_>>()
                    .join(" | "),
            })
    }

    /// Reads `name`; `expected` holds `Some(size)` for the checked axes and `None` for free ones (whose size is
    /// returned in the tensor's shape).
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::Dtype`], [`LoadError::Shape`] naming the expected and found
    /// shapes (also for an axis of size 0: a layer parameter never has one).
    pub fn get(&self, name: &str, expected: &[Option<usize>]) -> Result<Tensor, LoadError> {
        let full = self.checked(name, expected)?;
        self.ckpt.tensor(&full)
    }

    /// The bytes of `name` as stored ([`RawTensor`]), its shape checked as [`Weights::get`] checks it.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`], [`LoadError::Shape`], [`LoadError::Truncated`].
    pub fn get_raw(
        &self,
        name: &str,
        expected: &[Option<usize>],
    ) -> Result<RawTensor<'a>, LoadError> {
        let full = self.checked(name, expected)?;
        self.ckpt.raw_tensor(&full)
    }

    /// The dtype of `name` under the prefix.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`].
    pub fn dtype(&self, name: &str) -> Result<Dtype, LoadError> {
        Ok(self.ckpt.info(&self.full(name))?.1.dtype)
    }

    /// The shape of `name` under the prefix.
    ///
    /// # Errors
    /// [`LoadError::MissingTensor`].
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        self.ckpt.shape(&self.full(name))
    }

    /// Checks that `name` exists with a shape matching `expected` (no zero axis); returns its full name.
    fn checked(&self, name: &str, expected: &[Option<usize>]) -> Result<String, LoadError> {
        let full = self.full(name);
        let shape = self.ckpt.shape(&full)?;
        if shape.contains(&0) {
            // A layer parameter of zero width (d = 0, f = 0, E = 0) holds no bytes whatever its other axes say:
            // refused before any size is taken from it.
            return Err(LoadError::Shape {
                file: self.ckpt.file_of(&full).to_path_buf(),
                tensor: full,
                expected: "every axis at least 1".into(),
                found: shape,
            });
        }
        let ok = shape.len() == expected.len()
            && shape
                .iter()
                .zip(expected)
                .all(|(s, e)| e.is_none_or(|e| e == *s));
        if !ok {
            let exp: Vec<String> = expected
                .iter()
                .map(|e| e.map_or("_".to_string(), |v| v.to_string()))
                .collect();
            return Err(LoadError::Shape {
                file: self.ckpt.file_of(&full).to_path_buf(),
                tensor: full,
                expected: format!("[{}]", exp.join(", ")),
                found: shape,
            });
        }
        Ok(full)
    }

    /// Reads a `[a]` tensor.
    ///
    /// # Errors
    /// As [`Weights::get`].
    pub fn get1(&self, name: &str, a: Option<usize>) -> Result<Array1<f32>, LoadError> {
        let t = self.get(name, &[a])?;
        Ok(Array1::from_vec(t.data))
    }

    /// Reads a `[a, b]` tensor.
    ///
    /// # Errors
    /// As [`Weights::get`].
    pub fn get2(
        &self,
        name: &str,
        a: Option<usize>,
        b: Option<usize>,
    ) -> Result<Array2<f32>, LoadError> {
        let t = self.get(name, &[a, b])?;
        let (r, c) = (
            t.shape.first().copied().unwrap_or(0),
            t.shape.get(1).copied().unwrap_or(0),
        );
        Array2::from_shape_vec((r, c), t.data).map_err(|_| self.shape_err(name, &t.shape))
    }

    /// Reads a `[a, b, c]` tensor.
    ///
    /// # Errors
    /// As [`Weights::get`].
    pub fn get3(
        &self,
        name: &str,
        a: Option<usize>,
        b: Option<usize>,
        c: Option<usize>,
    ) -> Result<Array3<f32>, LoadError> {
        let t = self.get(name, &[a, b, c])?;
        let dims = (
            t.shape.first().copied().unwrap_or(0),
            t.shape.get(1).copied().unwrap_or(0),
            t.shape.get(2).copied().unwrap_or(0),
        );
        Array3::from_shape_vec(dims, t.data).map_err(|_| self.shape_err(name, &t.shape))
    }

    fn shape_err(&self, name: &str, found: &[usize]) -> LoadError {
        let full = self.full(name);
        LoadError::Shape {
            file: self.ckpt.file_of(&full).to_path_buf(),
            expected: "a shape matching its data".into(),
            tensor: full,
            found: found.to_vec(),
        }
    }
}
