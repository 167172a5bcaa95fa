//! The config-defaults table: for each family (and Qwen3-MoE's own config class), every `config.json` field the
//! preset reads, with transformers 5.23.0's default (read from `MixtralConfig()`, `Qwen2MoeConfig()`, ... in
//! `/work/venv`), checked field by field: absent gives the default, a wrong JSON type is an error naming the field
//! and the expected type, and aliases follow transformers' precedence.

use std::path::Path;

use moe_models::{HfConfig, LoadError, MoeConfig};
use serde_json::{Value, json};

/// `(model_type, [(hf names in precedence order, MoeConfig field, transformers default)])`.
type Row = (&'static [&'static str], &'static str, Value);

fn table() -> Vec<(&'static str, Vec<Row>)> {
    vec![
        (
            "mixtral",
            vec![
                (
                    &["num_experts", "num_local_experts"][..],
                    "n_experts",
                    json!(8),
                ),
                (&["num_experts_per_tok"], "top_k", json!(2)),
            ],
        ),
        (
            "qwen2_moe",
            vec![
                (&["num_experts"][..], "n_experts", json!(60)),
                (&["num_experts_per_tok"], "top_k", json!(4)),
                (&["norm_topk_prob"], "renormalize", json!(false)),
                (
                    &["shared_expert_intermediate_size"],
                    "shared_expert_size",
                    json!(5632),
                ),
            ],
        ),
        (
            "qwen3_moe",
            vec![
                (
                    &["num_local_experts", "num_experts"][..],
                    "n_experts",
                    json!(128),
                ),
                (&["num_experts_per_tok"], "top_k", json!(8)),
                (&["norm_topk_prob"], "renormalize", json!(false)),
            ],
        ),
        (
            "olmoe",
            vec![
                (
                    &["num_local_experts", "num_experts"][..],
                    "n_experts",
                    json!(64),
                ),
                (&["num_experts_per_tok"], "top_k", json!(8)),
                (&["norm_topk_prob"], "renormalize", json!(false)),
            ],
        ),
        (
            "deepseek_v3",
            vec![
                (
                    &["num_local_experts", "n_routed_experts"][..],
                    "n_experts",
                    json!(256),
                ),
                (&["num_experts_per_tok"], "top_k", json!(8)),
                (&["norm_topk_prob"], "renormalize", json!(true)),
                (&["n_group"], "n_group", json!(8)),
                (&["topk_group"], "topk_group", json!(4)),
                (
                    &["routed_scaling_factor"],
                    "routed_scaling_factor",
                    json!(2.5),
                ),
                (&["n_shared_experts"], "n_shared_experts", json!(1)),
            ],
        ),
        (
            "switch_transformers",
            vec![
                (&["num_experts"][..], "n_experts", json!(8)),
                (&["expert_capacity"], "expert_capacity", json!(64)),
                (&["router_bias"], "router_bias", json!(false)),
            ],
        ),
        (
            "nllb_moe",
            vec![
                (&["num_experts"][..], "n_experts", json!(128)),
                (&["expert_capacity"], "expert_capacity", json!(64)),
                (&["router_bias"], "router_bias", json!(false)),
                (
                    &["moe_eval_capacity_token_fraction"],
                    "capacity_fraction",
                    json!(1.0),
                ),
                (&["moe_token_dropout"], "token_dropout", json!(0.2)),
                (
                    &["batch_prioritized_routing"],
                    "batch_prioritized",
                    json!(false),
                ),
                (
                    &["normalize_router_prob_before_dropping"],
                    "normalize_before_dropping",
                    json!(false),
                ),
            ],
        ),
        (
            "granitemoe",
            vec![
                (&["num_local_experts"][..], "n_experts", json!(8)),
                (&["num_experts_per_tok"], "top_k", json!(2)),
            ],
        ),
        (
            "jetmoe",
            vec![
                (&["num_local_experts"][..], "n_experts", json!(8)),
                (&["num_experts_per_tok"], "top_k", json!(2)),
            ],
        ),
        (
            "gpt_oss",
            vec![
                (
                    &["num_experts", "num_local_experts"][..],
                    "n_experts",
                    json!(128),
                ),
                (&["num_experts_per_tok"], "top_k", json!(4)),
                (&["swiglu_limit"], "swiglu_limit", json!(7.0)),
                (&["swiglu_alpha"], "swiglu_alpha", json!(1.702)),
            ],
        ),
    ]
}

fn parse(v: &Value) -> Result<MoeConfig, LoadError> {
    let hf: HfConfig = serde_json::from_value(v.clone()).expect("json object");
    MoeConfig::from_hf(&hf, Path::new("config.json"))
}

fn field(c: &MoeConfig, name: &str) -> Value {
    serde_json::to_value(c).expect("serialize")[name].clone()
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
        _ => a == b,
    }
}

/// A value of the wrong JSON type for a field whose default is `d`.
fn wrong_types(d: &Value) -> Vec<(Value, &'static str)> {
    match d {
        Value::Bool(_) => vec![
            (json!("true"), "true or false"),
            (json!(1), "true or false"),
        ],
        Value::Number(n) if n.is_u64() => vec![
            (json!(4.0), "a non-negative integer"),
            (json!("4"), "a non-negative integer"),
            (json!(-1), "a non-negative integer"),
        ],
        _ => vec![(json!("2.5"), "a number"), (json!(true), "a number")],
    }
}

#[test]
fn every_row_takes_transformers_default_and_refuses_wrong_types() {
    for (model_type, rows) in table() {
        for (names, setting, default) in &rows {
            // Every other field set to a valid value, this one absent: the default applies.
            let base = json!({"model_type": model_type});
            let c = parse(&base).unwrap_or_else(|e| panic!("{model_type}: {e}"));
            assert!(
                close(&field(&c, setting), default),
                "{model_type}.{setting}: {} != transformers' {default}",
                field(&c, setting)
            );
            // `null` is absent too.
            let mut v = base.clone();
            v[names[0]] = Value::Null;
            let c = parse(&v).unwrap_or_else(|e| panic!("{model_type}: {e}"));
            assert!(
                close(&field(&c, setting), default),
                "{model_type}.{setting} null"
            );
            for name in *names {
                for (bad, want) in wrong_types(default) {
                    let mut v = base.clone();
                    v[*name] = bad.clone();
                    let e = parse(&v).expect_err("wrong type");
                    assert!(
                        matches!(&e, LoadError::Config { field, .. } if field == name),
                        "{model_type}.{name}={bad}: {e}"
                    );
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("expected {want}")), "{msg}");
                }
            }
            // Aliases: the first name wins when several are given, as in transformers.
            if let [first, second] = names[..] {
                // Small expert counts need a k and groups that fit them.
                let mut base = base.clone();
                base["num_experts_per_tok"] = json!(1);
                base["n_group"] = json!(1);
                base["topk_group"] = json!(1);
                let mut v = base.clone();
                v[first] = json!(4);
                v[second] = json!(6);
                let c = parse(&v).expect("both names");
                assert_eq!(field(&c, setting), json!(4), "{model_type}: {first} wins");
                let mut v = base.clone();
                v[second] = json!(6);
                let c = parse(&v).expect("alias alone");
                assert_eq!(field(&c, setting), json!(6), "{model_type}: {second} alone");
            }
        }
    }
}

#[test]
fn keys_the_config_class_does_not_read_are_ignored() {
    // `MixtralConfig` has no `norm_topk_prob` (case fidelity/mixtral-norm-flag): ignored, even wrongly typed.
    for v in [json!(false), json!(true), json!("no")] {
        let c = parse(&json!({"model_type": "mixtral", "norm_topk_prob": v})).expect("ignored");
        assert_eq!(c.renormalize, None, "{v}");
    }
    // Granite, JetMoE and GPT-OSS read no `norm_topk_prob` either; Qwen3-MoE no shared expert size.
    for m in ["granitemoe", "jetmoe", "gpt_oss"] {
        let c = parse(&json!({"model_type": m, "norm_topk_prob": false})).expect("ignored");
        assert_eq!(c.renormalize, None, "{m}");
    }
    let c = parse(&json!({"model_type": "qwen3_moe", "shared_expert_intermediate_size": 64}))
        .expect("qwen3");
    assert_eq!(c.shared_expert_size, Some(0));
}
