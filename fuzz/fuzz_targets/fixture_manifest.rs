//! Fuzz target: a golden-fixture directory (`moe verify`). The input is `manifest.json`, then optionally one case
//! file written as `case.safetensors`, separated by [`moe_fuzz::FILE_SEPARATOR`]. Every case's config, token
//! count and path are read, the case is loaded (its layer built from the file) and its input routed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_core::RouterInput;
use moe_fuzz::{fresh_dir, split_files, write};
use moe_models::fixture::{FixtureCase, Manifest, case_config};

/// Largest `T · d` routed (larger loaded cases are only built).
const MAX_ROUTED: usize = 1 << 14;

fuzz_target!(|data: &[u8]| {
    let dir = fresh_dir("fixture_manifest");
    let files = split_files(data);
    let manifest_path = dir.join("manifest.json");
    write(&manifest_path, files[0]);
    if let Some(case) = files.get(1) {
        write(&dir.join("case.safetensors"), case);
    }
    let Ok(manifest) = Manifest::read(&dir) else {
        return;
    };
    for case in manifest.cases.iter().take(4) {
        let _ = case.model_type();
        let _ = case.n_tokens(&manifest_path);
        let _ = case_config(case, &manifest_path);
        let _ = case.checked_path(&dir);
        if let Ok(fc) = FixtureCase::load(&dir, case) {
            let _ = fc.reference_names();
            if fc.input.len() <= MAX_ROUTED {
                let lens = fc.seq_lens();
                let _ = fc
                    .layer
                    .route(&RouterInput::new(fc.input.view()).with_seq_lens(&lens));
            }
        }
    }
});
