//! `moe inspect PATH`: the detected family, the MoE config and the tensors of each MoE block of a checkpoint
//! (file, index or directory), as `moe-models` reads them; or, for a checkpoint written by `moe train --save`,
//! its run's label, step, model and training configs and tensors (`moe_train::checkpoint::read_info`).

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
    // A moe-train checkpoint is recognised from the `format` of its header's metadata alone (not by reading the
    // whole file, which may be a large Hugging Face checkpoint); anything else goes to the Hugging Face reader.
    if is_train_checkpoint(&a.path) {
        let info = moe_train::checkpoint::read_info(&a.path).map_err(|e| {
            if e.is_bad_input() {
                CliError::Usage(e.to_string())
            } else {
                CliError::Other(e.into())
            }
        })?;
        return print_train_checkpoint(&info, a.format);
    }
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

/// Largest safetensors header read to recognise a `moe train` checkpoint (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Whether `path` is a regular safetensors file whose header metadata has a `format` of `moe-train/...` (written
/// by `moe train --save`). Reads the header alone; any failure means no.
fn is_train_checkpoint(path: &std::path::Path) -> bool {
    use std::io::Read;
    let header = || -> Option<serde_json::Value> {
        if !std::fs::metadata(path).ok()?.is_file() {
            return None;
        }
        let mut f = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES {
            return None;
        }
        let mut text = Vec::new();
        f.take(n).read_to_end(&mut text).ok()?;
        serde_json::from_slice(&text).ok()
    };
    header().is_some_and(|h| {
        h.get("__metadata__")
            .and_then(|m| m.get("format"))
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.starts_with("moe-train/"))
    })
}

/// A `moe train` checkpoint, as `--format json` prints it.
#[derive(Debug, serde::Serialize)]
struct TrainCheckpoint<'a> {
    /// Always `moe-train`.
    kind: &'static str,
    path: String,
    label: &'a str,
    step: usize,
    model: &'a moe_train::LmConfig,
    train: &'a moe_train::TrainConfig,
    tensors: Vec<TrainTensor<'a>>,
}

#[derive(Debug, serde::Serialize)]
struct TrainTensor<'a> {
    name: &'a str,
    shape: &'a [usize],
}

/// Prints a `moe train` checkpoint in `format`: a summary (label, step, model, training config) and one row per
/// tensor (CSV: the tensor table alone).
fn print_train_checkpoint(
    info: &moe_train::checkpoint::CheckpointInfo,
    format: Format,
) -> Result<(), CliError> {
    // Model parameters first, then the optimizer's moments (`adamw.*`), each by name.
    let mut tensors: Vec<&(String, Vec<usize>)> = info.tensors.iter().collect();
    tensors.sort_by_key(|(name, _)| (name.starts_with("adamw."), name.as_str()));
    let mut t = Table::new(&["tensor", "shape"]);
    for (name, shape) in &tensors {
        t.push(vec![esc(name), format!("{shape:?}")]);
    }
    let (m, f, tr) = (&info.model, &info.model.ffn, &info.train);
    let summary = [
        ("path", esc(&info.path.display().to_string())),
        (
            "kind",
            "moe-train checkpoint (moe train --save)".to_string(),
        ),
        ("label", esc(&info.label)),
        ("step", format!("{} of {}", info.step, tr.steps)),
        (
            "model",
            format!(
                "vocab {}, d {}, {} layers, {} heads, context {}, ffn {} ({} {} experts of width {}, top-{})",
                m.vocab,
                m.d_model,
                m.n_layers,
                m.n_heads,
                m.context,
                esc(&f.label()),
                f.experts,
                f.bank.name(),
                f.expert_width,
                f.top_k
            ),
        ),
        (
            "train",
            format!(
                "batch {}, AdamW lr {} → {}, warm-up {}, weight decay {}, clip {}, seed {}",
                tr.batch,
                tr.optim.lr,
                tr.optim.min_lr,
                tr.optim.warmup,
                tr.optim.weight_decay,
                tr.optim.grad_clip,
                tr.seed
            ),
        ),
        ("tensors", info.tensors.len().to_string()),
    ];
    match format {
        Format::Json => {
            let doc = TrainCheckpoint {
                kind: "moe-train",
                path: info.path.display().to_string(),
                label: &info.label,
                step: info.step,
                model: &info.model,
                train: &info.train,
                tensors: tensors
                    .iter()
                    .map(|(name, shape)| TrainTensor { name, shape })
                    .collect(),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&doc).map_err(|e| CliError::Other(e.into()))?
            );
        }
        Format::Csv => print!("{}", t.render(Format::Csv)),
        Format::Markdown => {
            for (k, v) in &summary {
                println!("- **{k}**: {}", v.replace('|', "\\|"));
            }
            println!();
            print!("{}", t.render(Format::Markdown));
        }
        Format::Table => {
            for (k, v) in &summary {
                println!("{k}: {v}");
            }
            for (name, shape) in &tensors {
                println!("    {} {shape:?}", esc(name));
            }
        }
    }
    Ok(())
}
