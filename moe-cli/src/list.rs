//! `moe list`: routers with their options and defaults, the backends this build can run, and the presets.

use clap::Args;
use moe_core::{Causality, RouterRegistry};
use serde::Serialize;

use crate::CliError;
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Output format (`table`, `json`, or one table of routers, options, backends and presets as `csv` / `markdown`).
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

/// A registered router as `moe list` reports it: the entry (name, description, options) and its causality,
/// derived from its options.
#[derive(Serialize)]
struct RouterInfo<'a> {
    #[serde(flatten)]
    entry: &'a moe_core::RouterEntry,
    /// `causal`, `not_causal`, or `{"depends_on": [options]}`.
    causality: Causality,
}

#[derive(Serialize)]
struct ListReport<'a> {
    routers: Vec<RouterInfo<'a>>,
    backends: Vec<BackendInfo>,
    presets: Vec<PresetInfo>,
}

/// Every router with its causality over all its option combinations.
fn routers(registry: &RouterRegistry) -> Result<Vec<RouterInfo<'_>>, CliError> {
    registry
        .describe()
        .iter()
        .map(|entry| {
            Ok(RouterInfo {
                entry,
                causality: entry.causality()?,
            })
        })
        .collect()
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
    let routers = routers(registry)?;
    if a.format == Format::Json {
        let r = ListReport {
            routers,
            backends,
            presets: presets(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    if matches!(a.format, Format::Csv | Format::Markdown) {
        // One table, so that CSV stays one CSV document: a row per router option, backend and preset.
        let mut t = crate::output::Table::new(&["kind", "name", "option", "default", "detail"]);
        for RouterInfo {
            entry: r,
            causality,
        } in &routers
        {
            t.push(vec![
                "router".into(),
                r.name.to_string(),
                String::new(),
                String::new(),
                format!("[{causality}] {}", r.description),
            ]);
            for o in &r.options {
                t.push(vec![
                    "router option".into(),
                    r.name.to_string(),
                    o.name.to_string(),
                    o.default.to_string(),
                    format!("{} [{}]", o.doc, o.values.join(" | ")),
                ]);
            }
        }
        for b in &backends {
            let state = if b.available {
                "available"
            } else {
                "unavailable"
            };
            t.push(vec![
                "backend".into(),
                b.name.to_string(),
                String::new(),
                String::new(),
                format!("{state}, {}", b.detail),
            ]);
        }
        for p in presets() {
            t.push(vec![
                "preset".into(),
                p.name.to_string(),
                String::new(),
                String::new(),
                p.kind.to_string(),
            ]);
        }
        print!("{}", t.render(a.format));
        return Ok(());
    }
    println!("routers:");
    for RouterInfo {
        entry: r,
        causality,
    } in &routers
    {
        println!("  {} [{causality}]: {}", r.name, r.description);
        for o in &r.options {
            // Booleans need no list of values; an enum's values are printed after its doc.
            let values = if o.values.len() > 2 || o.values.first().is_some_and(|&v| v != "false") {
                format!(" [{}]", o.values.join(" | "))
            } else {
                String::new()
            };
            println!(
                "      {} (default {}): {}{values}",
                o.name, o.default, o.doc
            );
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
