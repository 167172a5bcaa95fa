//! Fuzz target: a `--config` TOML router file as the CLI parses it, each router then built from its options by
//! the built-in registry and run on a tiny batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_fuzz::{DIMS, builtin_registry, create_and_route};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = builtin_registry();
    if let Ok(parsed) = moe_cli::fuzzing::parse_router_config(text, registry, DIMS) {
        create_and_route(registry, &parsed);
    }
});
