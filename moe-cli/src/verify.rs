//! `moe verify DIR [--backend cpu|wgpu|cuda]`: runs the golden-fixture verifier (`moe-verify`) on a directory
//! (`manifest.json` plus one safetensors file per case) on a backend and prints one row per case, with the format
//! its experts ran in (`f32`, `mxfp4 (packed)`, ...). Exit code 0 only if every case passes; 2 when the backend
//! cannot run here (a build without it, no adapter, no driver) or a case file cannot be loaded (a malformed
//! tensor, scale or config: bad input); 1 when a case ran and failed.

use std::path::PathBuf;

use clap::Args;
use moe_verify::{CaseReport, Measure, Side};

use crate::CliError;
use crate::output::{Format, Table};

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Fixture directory holding `manifest.json` and the case files.
    dir: PathBuf,
    /// Backend to run the cases on (`cpu`, `wgpu`, `cuda`); references it does not compute are checked on the
    /// host (see `moe-verify`).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Output format: `table`, `json`, `csv` (the case table alone) or `markdown`.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub(crate) fn run(a: &VerifyArgs) -> Result<(), CliError> {
    let backend =
        moe_verify::open_backend(&a.backend).map_err(|e| CliError::Usage(e.to_string()))?;
    let reports =
        // A manifest that cannot be read, parsed or lists no case is bad input: exit 2.
        moe_verify::verify_dir(&a.dir, backend.as_ref()).map_err(|e| CliError::Usage(e.to_string()))?;
    if a.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).map_err(|e| CliError::Other(e.into()))?
        );
    } else if a.format == Format::Csv {
        // CSV: the case table alone, so that every line is CSV.
        print_table(&reports, a.format);
    } else {
        print_table(&reports, a.format);
        if a.format == Format::Markdown {
            println!();
        }
        println!(
            "tolerance: max|ours - ref| / max|ref| <= {:e}; discrete quantities must match exactly",
            moe_verify::TOLERANCE
        );
        println!(
            "backend: {}, device: {}{}",
            backend.name(),
            backend.capabilities().device,
            host_note(&reports)
        );
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    let bad = reports.iter().filter(|r| r.bad_input).count();
    if bad > 0 {
        return Err(CliError::Usage(format!(
            "{failed} of {} cases failed; {bad} could not be loaded (bad input, named in the table)",
            reports.len()
        )));
    }
    if failed > 0 || reports.is_empty() {
        return Err(CliError::Other(anyhow::anyhow!(
            "{failed} of {} cases failed",
            reports.len()
        )));
    }
    Ok(())
}

/// Cases with more quantities than this list only the failing ones in the table (all are in `--format json`).
const MAX_LISTED: usize = 12;

fn print_table(reports: &[CaseReport], format: Format) {
    let mut t = Table::new(&[
        "case",
        "family",
        "experts",
        "tokens",
        "max rel err",
        "quantities",
        "result",
    ]);
    for r in reports {
        let quantities = match &r.error {
            Some(e) if r.quantities.is_empty() => format!("error: {e}"),
            _ => {
                // Many quantities (a gradient fixture compares dozens): a count and the failing ones; the JSON
                // output has them all.
                let shown: Vec<&moe_verify::Quantity> = if r.quantities.len() > MAX_LISTED {
                    r.quantities.iter().filter(|q| !q.passed).collect()
                } else {
                    r.quantities.iter().collect()
                };
                let mut text = shown
                    .iter()
                    .map(|q| match q.measure {
                        Measure::RelErr => format!("{}={:.1e}", q.name, q.value),
                        Measure::Mismatches => format!("{}={} mismatches", q.name, q.value),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                if r.quantities.len() > MAX_LISTED {
                    let grads = r
                        .quantities
                        .iter()
                        .filter(|q| q.name.starts_with("grad"))
                        .count();
                    let summary = format!(
                        "{} quantities ({grads} gradients), {} within tolerance",
                        r.quantities.len(),
                        r.quantities.iter().filter(|q| q.passed).count()
                    );
                    text = if text.is_empty() {
                        summary
                    } else {
                        format!("{summary}; {text}")
                    };
                }
                text + &r
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            }
        };
        t.push(vec![
            r.name.clone(),
            r.family.clone(),
            r.experts.clone(),
            r.tokens.to_string(),
            format!("{:.2e}", r.max_rel_err()),
            quantities,
            if r.passed { "pass" } else { "FAIL" }.to_string(),
        ]);
    }
    print!("{}", t.render(format));
}

/// `; on the host: a, b` for the quantities computed on the host, or nothing.
fn host_note(reports: &[CaseReport]) -> String {
    let mut names: Vec<&str> = reports
        .iter()
        .flat_map(|r| &r.quantities)
        .filter(|q| q.on == Side::Host)
        .map(|q| q.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        String::new()
    } else {
        format!("; on the host: {}", names.join(", "))
    }
}
