//! The expert store on real checkpoints: each Hugging Face fixture's layer (written by transformers) run with its
//! routed experts read from the fixture's own safetensors file (`moe_models::store::DiskSource`, prefix `""`), at
//! every capacity from 1 expert to E and every live policy, gives the all-resident layer's output bit for bit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moe_backends::cpu::CpuBackend;
use moe_core::store::policy::PolicyKind;
use moe_core::store::{Capacity, ExpertSource, StoreConfig, StoredBank};
use moe_core::{Backend, ExpertBank, RouterInput};
use moe_models::fixture::{FixtureCase, Manifest};
use moe_models::store::DiskSource;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf")
}

fn bits(a: &ndarray::Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn fixture_layers_read_from_disk_match_the_resident_layers_bit_for_bit() {
    let dir = fixtures();
    let manifest = Manifest::read(&dir).expect("manifest");
    let mut ran = Vec::new();
    for name in ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"] {
        let case = manifest
            .cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("case {name}"));
        let fx = FixtureCase::load(&dir, case).unwrap_or_else(|e| panic!("{name}: {e}"));
        let seq = fx.seq_lens();
        let input = RouterInput::new(fx.input.view()).with_seq_lens(&seq);
        let backend = CpuBackend::with_threads(2);
        let want = backend
            .upload(Arc::new(fx.layer.clone()))
            .and_then(|mut l| l.forward(&input))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut disk = DiskSource::open(&fx.path, "").unwrap_or_else(|e| panic!("{name}: {e}"));
        // GPT-OSS's GLU constants come from config.json, not the safetensors file.
        if let ExpertBank::GptOss(b) = fx.layer.experts() {
            disk = disk
                .with_gpt_oss_glu(b.alpha(), b.limit())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let source: Arc<dyn ExpertSource> = Arc::new(disk);
        let e = source.n_experts();
        for slots in [1, e / 2, e] {
            for policy in [PolicyKind::Lru, PolicyKind::Lfu, PolicyKind::Stale] {
                let config = StoreConfig {
                    capacity: Capacity::Experts(slots.max(1)),
                    policy,
                    frequencies: None,
                };
                let bank = StoredBank::new(Arc::clone(&source), config).expect("stored bank");
                let stored = fx
                    .layer
                    .with_experts(ExpertBank::Stored(bank))
                    .expect("layer");
                let mut dev = backend.upload(Arc::new(stored)).expect("upload");
                // Twice: cold slots, then whatever the policy kept.
                for round in 0..2 {
                    let got = dev
                        .forward(&input)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(
                        bits(&got.output),
                        bits(&want.output),
                        "{name}: {slots} slots, {policy}, round {round}"
                    );
                    assert_eq!(got.routing.active_experts(), want.routing.active_experts());
                }
                let s = dev.store_stats().expect("stored layer stats");
                assert!(s.bytes_read > 0 && s.cache.loads > 0, "{name}: {s:?}");
            }
        }
        // Without the config's constants the forms differ, and the layer refuses the bank instead of computing
        // something else.
        if let ExpertBank::GptOss(b) = fx.layer.experts()
            && b.limit() != 7.0
        {
            let plain = DiskSource::open(&fx.path, "").expect("open");
            let bank = StoredBank::new(Arc::new(plain), StoreConfig::lru(1)).expect("bank");
            assert!(fx.layer.with_experts(ExpertBank::Stored(bank)).is_err());
        }
        ran.push(format!("{name} (E = {e})"));
    }
    println!("ran: {}", ran.join(", "));
}
