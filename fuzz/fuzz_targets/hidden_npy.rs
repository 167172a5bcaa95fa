//! Fuzz target: a NumPy `.npy` hidden-states file through `moe_models::hidden::load_hidden` (`--input x.npy`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_fuzz::{scratch, write};

fuzz_target!(|data: &[u8]| {
    let file = scratch().join("hidden.npy");
    write(&file, data);
    let _ = moe_models::hidden::load_hidden(&file);
});
