//! What every end-to-end test of the `moe` binary shares: running it and reading its output.

#![allow(
    dead_code,
    reason = "each test file uses its own subset of these helpers"
)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `moe` binary built for this test run with `args`.
pub fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("the moe binary runs")
}

/// Its standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh scratch directory for one test, `moe-cli-<name>-XXXXXX` under the system's temporary directory, removed
/// with everything in it when dropped (also when the test fails). Dereferences to its path.
pub struct Scratch(tempfile::TempDir);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

/// A fresh [`Scratch`] directory for one test.
pub fn scratch(name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("moe-cli-{name}-"))
        .tempdir()
        .expect("scratch dir");
    Scratch(dir)
}

/// A safetensors file from a raw header (padded with spaces to a multiple of 8 bytes) and data.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// A safetensors file of F32 tensors `(name, shape, values)`; empty `values` write a header-only tensor.
pub fn safetensors(tensors: &[(&str, Vec<u64>, Vec<f32>)]) -> Vec<u8> {
    let mut hdr = serde_json::Map::new();
    let mut blob = Vec::new();
    for (name, shape, vals) in tensors {
        let start = blob.len();
        for v in vals {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        hdr.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, blob.len()]}),
        );
    }
    raw_safetensors(&serde_json::to_string(&hdr).expect("header"), &blob)
}
