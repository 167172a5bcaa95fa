//! Fuzz target: a `config.json` through the presets' config reading (`MoeConfig::from_file`: size cap, repeated
//! keys, the family's config table, validation), then the block prefix of a few layers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_fuzz::{scratch, write};

fuzz_target!(|data: &[u8]| {
    let file = scratch().join("config.json");
    write(&file, data);
    if let Ok(cfg) = moe_models::MoeConfig::from_file(&file) {
        for layer in [0, 1, usize::MAX] {
            let _ = cfg.layer_prefix(layer);
        }
    }
});
