//! `moe inspect`'s resolved values ([`moe_models::inspect::effective`]) are the ones the builders use: every HF
//! golden fixture is built and its router's spec compared with them, and a Mixtral config prints
//! `renormalize true` (transformers' Mixtral always renormalises).

use std::path::Path;

use moe_core::RouterSpec;
use moe_models::fixture::{FixtureCase, Manifest};
use moe_models::inspect::effective;
use moe_models::{Family, MoeConfig};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf");

fn value<'a>(eff: &'a [moe_models::inspect::Effective], name: &str) -> &'a str {
    eff.iter()
        .find(|e| e.name == name)
        .map(|e| e.value.as_str())
        .unwrap_or_else(|| panic!("{name} missing from {eff:?}"))
}

#[test]
fn effective_values_match_the_built_routers() {
    let dir = Path::new(FIXTURES);
    let manifest = Manifest::read(dir).expect("manifest");
    let mut topk_cases = 0;
    for case in &manifest.cases {
        let fx = FixtureCase::load(dir, case).expect("fixture loads");
        let eff = effective(&fx.config);
        assert_eq!(value(&eff, "experts"), fx.layer.n_experts().to_string());
        if let Some(RouterSpec::TopK(s)) = fx.layer.router().spec() {
            topk_cases += 1;
            let name = &case.name;
            assert_eq!(value(&eff, "top_k"), s.k.to_string(), "{name}");
            assert_eq!(
                value(&eff, "renormalize"),
                s.renormalize.to_string(),
                "{name}"
            );
            assert_eq!(value(&eff, "scaling"), s.scaling.to_string(), "{name}");
            let snake = |v: serde_json::Value| v.as_str().map(str::to_string);
            assert_eq!(
                Some(value(&eff, "score").to_string()),
                snake(serde_json::to_value(s.score).expect("json")),
                "{name}"
            );
            assert_eq!(
                Some(value(&eff, "order").to_string()),
                snake(serde_json::to_value(s.order).expect("json")),
                "{name}"
            );
            if let Some(g) = s.groups {
                assert_eq!(value(&eff, "n_group"), g.n_group.to_string(), "{name}");
                assert_eq!(
                    value(&eff, "topk_group"),
                    g.topk_group.to_string(),
                    "{name}"
                );
            }
        }
    }
    assert!(topk_cases >= 7, "{topk_cases} top-k fixture cases");
}

#[test]
fn mixtral_resolves_renormalize_true() {
    let eff = effective(&MoeConfig::new(Family::Mixtral, 8, 2));
    assert_eq!(value(&eff, "renormalize"), "true");
    let eff = effective(&MoeConfig::new(Family::Qwen2Moe, 8, 2));
    assert_eq!(value(&eff, "renormalize"), "false");
}
