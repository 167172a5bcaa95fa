//! Helpers shared by the fuzz targets: a per-process scratch directory for the path-based loaders, splitting one
//! input into several files, reading every tensor of a checkpoint, and routing a tiny batch through a router.
//!
//! A target must end every input with `Ok` or a typed `Err`: a panic, an abort or an allocation over libFuzzer's
//! `-malloc_limit_mb` is a finding.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use moe_core::{Router, RouterArgs, RouterInput, RouterRegistry};
use moe_models::Checkpoint;
use ndarray::Array2;

/// Separates the files packed into one input of the multi-file targets (index + shards, manifest + case file).
pub const FILE_SEPARATOR: &[u8] = b"#@FILE@#";

/// Router dimensions the router targets build with (E = 16 = 4², so `peer` builds too): `(d_model, n_experts, top_k, seed)`.
pub const DIMS: (usize, usize, usize, u64) = (8, 16, 2, 0);

/// Tokens routed through each router the router targets build.
pub const TOKENS: usize = 16;

/// This process's scratch directory (`$MOE_FUZZ_TMP`, else `/dev/shm` when present, else the temp dir), created
/// on first use. Workers of one `-jobs` run are separate processes, so they never share one.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("MOE_FUZZ_TMP")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("moe-fuzz-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            // The harness itself is broken, not the input: stop loudly.
            panic!(
                "cannot create the fuzz scratch directory {}: {e}",
                dir.display()
            );
        }
        dir
    })
}

/// A fresh, empty subdirectory `name` of [`scratch`].
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Writes `bytes` to `path` (a harness failure panics: it is not the input's fault).
pub fn write(path: &Path, bytes: &[u8]) {
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("cannot write {}: {e}", path.display());
    }
}

/// Splits `data` at each [`FILE_SEPARATOR`].
pub fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest
        .windows(FILE_SEPARATOR.len())
        .position(|w| w == FILE_SEPARATOR)
    {
        out.push(&rest[..i]);
        rest = &rest[i + FILE_SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// Reads every tensor of `ckpt` as the presets do (shape, dtype, `f32` data, and `i64` data), ignoring the
/// typed errors: only a panic or an abort is a finding.
pub fn read_every_tensor(ckpt: &Checkpoint) {
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for n in &names {
        let _ = ckpt.shape(n);
        let _ = ckpt.dtype(n);
        let _ = ckpt.tensor(n);
        let _ = ckpt.tensor_i64(n);
        let _ = ckpt.file_of(n);
    }
    let _ = ckpt.metadata("format");
}

/// A tiny deterministic batch `[TOKENS, d]` with token ids, for routing.
pub fn tiny_batch(d: usize) -> (Array2<f32>, Vec<u32>) {
    let x = Array2::from_shape_fn((TOKENS, d), |(t, j)| {
        ((t * 31 + j * 17) % 13) as f32 / 6.5 - 1.0
    });
    let ids = (0..TOKENS as u32).map(|t| t * 7 % 50).collect();
    (x, ids)
}

/// Routes [`tiny_batch`] through `router` (as one sequence, then as two), ignoring typed errors.
pub fn route_tiny(router: &dyn Router, d: usize) {
    let (x, ids) = tiny_batch(d);
    let lens = [TOKENS / 2, TOKENS - TOKENS / 2];
    let _ = router.route(&RouterInput::new(x.view()).with_token_ids(&ids));
    let _ = router.route(
        &RouterInput::new(x.view())
            .with_token_ids(&ids)
            .with_seq_lens(&lens),
    );
}

/// Builds each parsed router through `registry` (where option text ends up) and routes a tiny batch with it.
pub fn create_and_route(registry: &RouterRegistry, parsed: &[(String, RouterArgs)]) {
    for (name, args) in parsed {
        if let Ok(router) = registry.create(name, args) {
            let _ = router.is_causal();
            route_tiny(router.as_ref(), args.d_model);
        }
    }
}

/// The built-in routers, built once per process.
pub fn builtin_registry() -> &'static RouterRegistry {
    static REG: OnceLock<RouterRegistry> = OnceLock::new();
    REG.get_or_init(moe_routers::builtin)
}
