//! `moe inspect PATH`: the detected family, the MoE config and the tensors of each MoE block of a checkpoint
//! (file, index or directory), as `moe-models` reads them.

use std::path::PathBuf;

use clap::Args;

use crate::CliError;
use crate::output::Format;

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding one (and `config.json`).
    path: PathBuf,
    /// Output format (`table` or `json`).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub(crate) fn run(a: &InspectArgs) -> Result<(), CliError> {
    // Every `LoadError` is about the file the user named (unreadable, malformed, impossible config): exit 2.
    let ins = moe_models::inspect::inspect(&a.path).map_err(|e| CliError::Usage(e.to_string()))?;
    if a.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ins).map_err(|e| CliError::Other(e.into()))?
        );
        return Ok(());
    }
    println!("path: {}", ins.path.display());
    match ins.family {
        Some(f) => println!("family: {}", f.model_type()),
        None => println!("family: unknown"),
    }
    if ins.config.is_some() {
        // The values the preset builds with, defaults resolved (Mixtral: renormalize true).
        let values: Vec<String> = ins
            .effective
            .iter()
            .map(|e| format!("{} {}", e.name, e.value))
            .collect();
        println!("config: {}", values.join(", "));
    } else {
        println!("config: none (no config.json next to the checkpoint)");
    }
    println!(
        "tensors: {}, MoE blocks: {}",
        ins.n_tensors,
        ins.blocks.len()
    );
    for b in &ins.blocks {
        let prefix = if b.prefix.is_empty() {
            "(no prefix)"
        } else {
            &b.prefix
        };
        println!("{prefix}: {} tensors", b.tensors.len());
        for t in &b.tensors {
            println!("    {} {} {:?}", t.name, t.dtype, t.shape);
        }
    }
    Ok(())
}
