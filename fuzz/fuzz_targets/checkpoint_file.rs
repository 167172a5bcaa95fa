//! Fuzz target: one safetensors file through the checkpoint loader (`Checkpoint::open`, every tensor read) and
//! `moe_models::inspect::inspect` (as `moe inspect` does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_fuzz::{fresh_dir, read_every_tensor, write};

fuzz_target!(|data: &[u8]| {
    let dir = fresh_dir("checkpoint_file");
    let file = dir.join("model.safetensors");
    write(&file, data);
    if let Ok(ckpt) = moe_models::Checkpoint::open(&file) {
        read_every_tensor(&ckpt);
    }
    let _ = moe_models::inspect::inspect(&dir);
});
