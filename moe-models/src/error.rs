//! [`LoadError`], the one error type of the loader: every message names the file and, where there is one, the
//! tensor, with the expected and the found shape or dtype.

use std::path::PathBuf;

use moe_core::MoeError;
use thiserror::Error;

/// Errors of loading a checkpoint, a config or a fixture directory, and of building a layer from them.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file cannot be opened or read.
    #[error("cannot read {file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file ends before its header length, its header or its tensor data.
    #[error("{file} is truncated: {found} bytes, {what}")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// The file's length in bytes.
        found: u64,
        /// What was expected: `the 8-byte header length is missing`, `the tensor data ends early`.
        what: String,
    },
    /// The 8-byte header length points past the end of the file.
    #[error(
        "{file}: header length {header_len} points past the end of the file ({file_len} bytes)"
    )]
    HeaderPastEnd {
        /// The file.
        file: PathBuf,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file's length in bytes.
        file_len: u64,
    },
    /// The safetensors header is not valid (bad JSON, bad offsets, bad UTF-8).
    #[error("{file}: invalid safetensors header: {source}")]
    Header {
        /// The file.
        file: PathBuf,
        /// The parser's error.
        source: safetensors::SafeTensorError,
    },
    /// A tensor has a dtype the loader does not take here.
    #[error("{file}: tensor {tensor} has dtype {found}, expected {expected}")]
    Dtype {
        /// The file.
        file: PathBuf,
        /// The tensor's full name.
        tensor: String,
        /// The dtype in the file.
        found: String,
        /// The accepted dtypes: `F32, BF16 or F16`.
        expected: String,
    },
    /// A tensor has the wrong shape: `expected experts.gate_up_proj [8, 256, 64], found [8, 64, 256]`.
    #[error("{file}: expected {tensor} {expected}, found {found:?}")]
    Shape {
        /// The file.
        file: PathBuf,
        /// The tensor's full name.
        tensor: String,
        /// The expected shape.
        expected: String,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor the family needs is not in the checkpoint.
    #[error("{file}: missing tensor {tensor}")]
    MissingTensor {
        /// The checkpoint (file, index or directory).
        file: PathBuf,
        /// The tensor's full name (or the names tried, separated by ` | `).
        tensor: String,
    },
    /// `config.json` names a `model_type` that is not one of the families.
    #[error("{file}: unknown MoE family {model_type:?} (known: {known})")]
    UnknownFamily {
        /// The config file.
        file: PathBuf,
        /// The `model_type` found.
        model_type: String,
        /// The known `model_type` strings, comma-separated.
        known: String,
    },
    /// A sharded checkpoint's index names a shard file that does not exist.
    #[error("{index}: shard {shard} (holding {tensor}) does not exist")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name as written in the index.
        shard: String,
        /// One tensor the index places in that shard.
        tensor: String,
    },
    /// A name is defined more than once: a tensor in a safetensors header, or a key of a JSON object (config,
    /// index, manifest). Parsers keep the last definition silently; the loader refuses to guess.
    #[error("{file}: {key:?} is defined more than once in the {place}")]
    Duplicate {
        /// The file.
        file: PathBuf,
        /// The repeated name (a nested JSON key as `outer.inner`).
        key: String,
        /// Where: `safetensors header` or `JSON`.
        place: String,
    },
    /// A file name read from a file (a shard in an index, a case file in a manifest) points outside the directory
    /// it must stay in: `..`, an absolute path, or a symlink resolving elsewhere. The file is not opened.
    #[error("{file}: {name:?} is refused: {reason}")]
    OutsideDir {
        /// The file that names it (index or manifest).
        file: PathBuf,
        /// The name as written there.
        name: String,
        /// Why: `it contains ..`, `it is an absolute path`, `it resolves outside ...`.
        reason: String,
    },
    /// A path that must be a regular file is something else (a directory, a device, a FIFO, a socket).
    #[error("{file} is {what}, not a regular file")]
    NotRegular {
        /// The path.
        file: PathBuf,
        /// What it is: `a directory`, `a character device`.
        what: String,
    },
    /// A file is larger than the cap for its kind (text inputs are read whole, so they are capped).
    #[error("{file} is {size} bytes, more than the {limit}-byte limit for {what}")]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// Its size in bytes (at least; a file growing while read is stopped at the limit).
        size: u64,
        /// The limit in bytes.
        limit: u64,
        /// What kind of file: `a JSON file`.
        what: String,
    },
    /// A file does not match the size or SHA-256 digest its manifest records for it.
    #[error("{file}: {field} is {expected} in {manifest}, the file has {found}")]
    Integrity {
        /// The checked file.
        file: PathBuf,
        /// The manifest that records the value.
        manifest: PathBuf,
        /// The field: `bytes` or `sha256`.
        field: String,
        /// The recorded value.
        expected: String,
        /// The file's value.
        found: String,
    },
    /// A JSON file (config, index, manifest) is not valid JSON or does not have the expected structure.
    #[error("{file}: bad JSON: {source}")]
    Json {
        /// The file.
        file: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A config field is missing or has a value the family does not allow.
    #[error("{file}: config field {field}: {reason}")]
    Config {
        /// The config (or manifest) file.
        file: PathBuf,
        /// The field, under its HF name.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensors loaded but moe-core rejected the layer built from them, or running it failed.
    #[error("{file}: {context}: {source}")]
    Layer {
        /// The checkpoint or fixture file.
        file: PathBuf,
        /// What was being done: `building the mixtral layer`, `running case mixtral`.
        context: String,
        /// The core error (boxed to keep `LoadError` small).
        source: Box<MoeError>,
    },
}

impl LoadError {
    /// Wraps a core error with the file and what was being done.
    pub fn layer(file: impl Into<PathBuf>, context: impl Into<String>, source: MoeError) -> Self {
        LoadError::Layer {
            file: file.into(),
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// A config field error.
    pub fn config(
        file: impl Into<PathBuf>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        LoadError::Config {
            file: file.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
