//! Fuzz target: a sharded checkpoint. The input is `model.safetensors.index.json`, then up to four shards
//! (`model-0000N-of-00004.safetensors`), separated by [`moe_fuzz::FILE_SEPARATOR`]; the directory is opened as
//! the loader opens one (the index wins) and every tensor is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moe_fuzz::{fresh_dir, read_every_tensor, split_files, write};

fuzz_target!(|data: &[u8]| {
    let dir = fresh_dir("checkpoint_sharded");
    let files = split_files(data);
    write(&dir.join("model.safetensors.index.json"), files[0]);
    for (i, shard) in files.iter().skip(1).take(4).enumerate() {
        write(
            &dir.join(format!("model-{:05}-of-00004.safetensors", i + 1)),
            shard,
        );
    }
    if let Ok(ckpt) = moe_models::Checkpoint::open(&dir) {
        read_every_tensor(&ckpt);
    }
    let _ = moe_models::inspect::inspect(&dir);
});
