//! `moe inspect PATH`: the detected family, the MoE config and the tensors of each MoE block of a checkpoint
//! (file, index or directory), as `moe-models` reads them.

use std::path::PathBuf;

use clap::Args;

use moe_models::error::esc;
use moe_models::inspect::Inspection;

use crate::CliError;
use crate::output::{Format, Table};

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding one (and `config.json`).
    path: PathBuf,
    /// Output format: `table` (text), `json`, `csv` (the tensor table alone) or `markdown` (a summary list and the
    /// tensor table).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub(crate) fn run(a: &InspectArgs) -> Result<(), CliError> {
    // Every `LoadError` is about the file the user named (unreadable, malformed, impossible config): exit 2.
    let ins = moe_models::inspect::inspect(&a.path).map_err(|e| CliError::Usage(e.to_string()))?;
    match a.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&ins).map_err(|e| CliError::Other(e.into()))?
        ),
        // CSV: the tensor table alone, one row per tensor, so that every line is CSV.
        Format::Csv => print!("{}", tensor_table(&ins).render(Format::Csv)),
        Format::Markdown => {
            for (k, v) in summary(&ins) {
                println!("- **{k}**: {}", v.replace('|', "\\|"));
            }
            println!();
            print!("{}", tensor_table(&ins).render(Format::Markdown));
        }
        Format::Table => print_text(&ins),
    }
    Ok(())
}

/// `path`, `family`, `config` (the values the preset uses, defaults resolved) and `tensors`, as text.
fn summary(ins: &Inspection) -> Vec<(&'static str, String)> {
    let config = if ins.config.is_some() {
        ins.effective
            .iter()
            .map(|e| format!("{} {}", e.name, e.value))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        "none (no config.json next to the checkpoint)".to_string()
    };
    vec![
        ("path", esc(&ins.path.display().to_string())),
        (
            "family",
            ins.family.map_or("unknown", |f| f.model_type()).to_string(),
        ),
        ("config", config),
        (
            "tensors",
            format!("{}, MoE blocks: {}", ins.n_tensors, ins.blocks.len()),
        ),
    ]
}

/// One row per tensor of each block: block prefix, name, dtype, shape (names escaped).
fn tensor_table(ins: &Inspection) -> Table {
    let mut t = Table::new(&["block", "tensor", "dtype", "shape"]);
    for b in &ins.blocks {
        for x in &b.tensors {
            t.push(vec![
                esc(&b.prefix),
                esc(&x.name),
                esc(&x.dtype),
                format!("{:?}", x.shape),
            ]);
        }
    }
    t
}

fn print_text(ins: &Inspection) {
    for (k, v) in summary(ins) {
        println!("{k}: {v}");
    }
    for b in &ins.blocks {
        let prefix = if b.prefix.is_empty() {
            "(no prefix)".to_string()
        } else {
            esc(&b.prefix)
        };
        println!("{prefix}: {} tensors", b.tensors.len());
        for t in &b.tensors {
            println!("    {} {} {:?}", esc(&t.name), esc(&t.dtype), t.shape);
        }
    }
}
