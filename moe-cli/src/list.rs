//! `moe list`: routers with their options and defaults, the backends this build can run, and the presets.

use clap::Args;
use moe_core::RouterRegistry;
use serde::Serialize;

use crate::CliError;
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Output format (`table` or `json`).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Serialize)]
struct BackendInfo {
    name: &'static str,
    available: bool,
    detail: String,
}

#[derive(Serialize)]
struct PresetInfo {
    /// `softmax-topk:preset=NAME` router presets, or `hf:MODEL_TYPE` checkpoint families.
    name: String,
    /// Where it is used.
    kind: &'static str,
}

#[derive(Serialize)]
struct ListReport<'a> {
    routers: &'a [moe_core::RouterEntry],
    backends: Vec<BackendInfo>,
    presets: Vec<PresetInfo>,
}

/// Router presets (options of `softmax-topk`) and Hugging Face families (`moe verify`, `moe inspect`).
fn presets() -> Vec<PresetInfo> {
    let mut v: Vec<PresetInfo> = ["mixtral", "qwen2_moe", "olmoe", "granite", "deepseek_v3"]
        .iter()
        .map(|p| PresetInfo {
            name: format!("softmax-topk:preset={p}"),
            kind: "router preset",
        })
        .collect();
    v.extend(moe_models::Family::ALL.iter().map(|f| PresetInfo {
        name: format!("hf:{}", f.model_type()),
        kind: "Hugging Face family, by config.json model_type",
    }));
    v
}

pub(crate) fn run(registry: &RouterRegistry, a: &ListArgs) -> Result<(), CliError> {
    let backends: Vec<BackendInfo> = moe_backends::availability()
        .into_iter()
        .map(|(name, r)| match r {
            Ok(dev) => BackendInfo {
                name,
                available: true,
                detail: dev,
            },
            Err(why) => BackendInfo {
                name,
                available: false,
                detail: why,
            },
        })
        .collect();
    if a.format == Format::Json {
        let r = ListReport {
            routers: registry.describe(),
            backends,
            presets: presets(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    println!("routers:");
    for r in registry.describe() {
        let causal = if r.causal { "" } else { " [not causal]" };
        println!("  {}{causal}: {}", r.name, r.description);
        for o in &r.options {
            println!("      {} (default {}): {}", o.name, o.default, o.doc);
        }
    }
    println!("backends:");
    for b in &backends {
        let state = if b.available {
            "available"
        } else {
            "unavailable"
        };
        println!("  {}: {state}, {}", b.name, b.detail);
    }
    println!("presets:");
    for p in presets() {
        println!("  {} ({})", p.name, p.kind);
    }
    Ok(())
}
