//! [`LoadError`], the one error type of the loader: every message names the file and, where there is one, the
//! tensor, with the expected and the found shape or dtype. A message is one complete line that ends with its cause
//! (the OS's, the parser's, the core's), and [`std::error::Error::source`] is `None`, so a report that walks the
//! chain (`anyhow`'s `{:#}`) prints each cause once. Names read from files (tensors, shards, keys) and paths are
//! printed with control characters escaped.

use std::fmt;
use std::path::{Path, PathBuf};

use moe_core::MoeError;

/// Errors of loading a checkpoint, a config or a fixture directory, and of building a layer from them. The
/// `Display` message includes the cause; `source()` is `None` (see the module docs).
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// The file cannot be opened or read.
    Io {
        /// The file.
        file: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file ends before its header length, its header or its tensor data.
    Truncated {
        /// The file.
        file: PathBuf,
        /// The file's length in bytes.
        found: u64,
        /// What was expected: `the 8-byte header length is missing`, `the tensor data ends early`.
        what: String,
    },
    /// The 8-byte header length points past the end of the file.
    HeaderPastEnd {
        /// The file.
        file: PathBuf,
        /// The header length read from the first 8 bytes.
        header_len: u64,
        /// The file's length in bytes.
        file_len: u64,
    },
    /// The safetensors header is not valid (bad JSON, bad offsets, bad UTF-8).
    Header {
        /// The file.
        file: PathBuf,
        /// The parser's error.
        source: safetensors::SafeTensorError,
    },
    /// A tensor has a dtype the loader does not take here.
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
    MissingTensor {
        /// The checkpoint (file, index or directory).
        file: PathBuf,
        /// The tensor's full name (or the names tried, separated by ` | `).
        tensor: String,
    },
    /// `config.json` names a `model_type` that is not one of the families.
    UnknownFamily {
        /// The config file.
        file: PathBuf,
        /// The `model_type` found.
        model_type: String,
        /// The known `model_type` strings, comma-separated.
        known: String,
    },
    /// A sharded checkpoint's index names a shard file that does not exist.
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
    OutsideDir {
        /// The file that names it (index or manifest).
        file: PathBuf,
        /// The name as written there.
        name: String,
        /// Why: `it contains ..`, `it is an absolute path`, `it resolves outside ...`.
        reason: String,
    },
    /// A path that must be a regular file is something else (a directory, a device, a FIFO, a socket).
    NotRegular {
        /// The path.
        file: PathBuf,
        /// What it is: `a directory`, `a character device`.
        what: String,
    },
    /// A file is larger than the cap for its kind (text inputs are read whole, so they are capped).
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
    Json {
        /// The file.
        file: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A config field is missing or has a value the family does not allow.
    Config {
        /// The config (or manifest) file.
        file: PathBuf,
        /// The field, under its HF name.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A hidden-states input file (`.npy`, safetensors) whose contents are not what the reader takes: the header,
    /// the dtype, the shape.
    Input {
        /// The input file.
        file: PathBuf,
        /// The part that is wrong (`npy header`, `hidden_states`).
        part: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's contents are malformed: a packed weight of the wrong byte length, a NaN code (FP8 `0x7F` /
    /// `0xFF`, E8M0 255), a non-finite scale, a scale grid that does not cover its weight.
    BadTensor {
        /// The file.
        file: PathBuf,
        /// The tensor's full name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensors loaded but moe-core rejected the layer built from them, or running it failed.
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

    /// Wraps a core error as [`LoadError::layer`] does, except that `MoeError::BadTensor` (a malformed packed
    /// tensor, named by its checkpoint name) becomes [`LoadError::BadTensor`].
    pub fn from_core(
        file: impl Into<PathBuf>,
        context: impl Into<String>,
        source: MoeError,
    ) -> Self {
        match source {
            MoeError::BadTensor { tensor, reason } => LoadError::BadTensor {
                file: file.into(),
                tensor,
                reason,
            },
            other => LoadError::layer(file, context, other),
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

/// `s` with control characters escaped (`\n`, `\u{1b}`), nothing else changed: a name read from a file cannot
/// break the line or drive the terminal. Used by every [`LoadError`] message and by `moe inspect`.
pub fn esc(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A path for a message, control characters escaped.
fn p(path: &Path) -> String {
    esc(&path.display().to_string())
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LoadError as E;
        match self {
            E::Io { file, source } => write!(f, "cannot read {}: {source}", p(file)),
            E::Truncated { file, found, what } => {
                write!(f, "{} is truncated: {found} bytes, {}", p(file), esc(what))
            }
            E::HeaderPastEnd {
                file,
                header_len,
                file_len,
            } => write!(
                f,
                "{}: header length {header_len} points past the end of the file ({file_len} bytes)",
                p(file)
            ),
            E::Header { file, source } => {
                write!(f, "{}: invalid safetensors header: {source}", p(file))
            }
            E::Dtype {
                file,
                tensor,
                found,
                expected,
            } => write!(
                f,
                "{}: tensor {} has dtype {}, expected {expected}",
                p(file),
                esc(tensor),
                esc(found)
            ),
            E::Shape {
                file,
                tensor,
                expected,
                found,
            } => write!(
                f,
                "{}: expected {} {expected}, found {found:?}",
                p(file),
                esc(tensor)
            ),
            E::MissingTensor { file, tensor } => {
                write!(f, "{}: missing tensor {}", p(file), esc(tensor))
            }
            E::UnknownFamily {
                file,
                model_type,
                known,
            } => write!(
                f,
                "{}: unknown MoE family {model_type:?} (known: {known})",
                p(file)
            ),
            E::MissingShard {
                index,
                shard,
                tensor,
            } => write!(
                f,
                "{}: shard {} (holding {}) does not exist",
                p(index),
                esc(shard),
                esc(tensor)
            ),
            E::Duplicate { .. }
            | E::OutsideDir { .. }
            | E::NotRegular { .. }
            | E::TooLarge { .. }
            | E::Integrity { .. } => self.fmt_file_rule(f),
            E::Json { file, source } => write!(f, "{}: bad JSON: {source}", p(file)),
            E::Config {
                file,
                field,
                reason,
            } => write!(
                f,
                "{}: config field {}: {}",
                p(file),
                esc(field),
                esc(reason)
            ),
            E::BadTensor {
                file,
                tensor,
                reason,
            } => write!(f, "{}: tensor {}: {}", p(file), esc(tensor), esc(reason)),
            E::Input { file, part, reason } => {
                write!(f, "{}: {}: {}", p(file), esc(part), esc(reason))
            }
            E::Layer {
                file,
                context,
                source,
            } => write!(f, "{}: {}: {source}", p(file), esc(context)),
        }
    }
}

impl LoadError {
    /// The messages of the file rules (duplicates, confinement, regular files, size caps, integrity).
    fn fmt_file_rule(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LoadError as E;
        match self {
            E::Duplicate { file, key, place } => write!(
                f,
                "{}: {key:?} is defined more than once in the {place}",
                p(file)
            ),
            E::OutsideDir { file, name, reason } => {
                write!(f, "{}: {name:?} is refused: {}", p(file), esc(reason))
            }
            E::NotRegular { file, what } => {
                write!(f, "{} is {what}, not a regular file", p(file))
            }
            E::TooLarge {
                file,
                size,
                limit,
                what,
            } => write!(
                f,
                "{} is {size} bytes, more than the {limit}-byte limit for {what}",
                p(file)
            ),
            E::Integrity {
                file,
                manifest,
                field,
                expected,
                found,
            } => write!(
                f,
                "{}: {field} is {} in {}, the file has {found}",
                p(file),
                esc(expected),
                p(manifest)
            ),
            // Only the variants above are sent here (see `fmt`).
            _ => Ok(()),
        }
    }
}

/// The message already ends with the cause; `source()` is `None` so that chains print it once.
impl std::error::Error for LoadError {}
