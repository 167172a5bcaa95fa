//! `moe verify DIR`: runs the golden-fixture verifier of `moe-models` on a directory (`manifest.json` plus one
//! safetensors file per case) and prints one row per case. Exit code 0 only if every case passes.

use std::path::PathBuf;

use clap::Args;

use crate::CliError;
use crate::output::{Format, Table};

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Fixture directory holding `manifest.json` and the case files.
    dir: PathBuf,
    /// Output format (`table` or `json`).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub(crate) fn run(a: &VerifyArgs) -> Result<(), CliError> {
    let reports = moe_models::verify::verify_dir(&a.dir).map_err(|e| CliError::Other(e.into()))?;
    if a.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).map_err(|e| CliError::Other(e.into()))?
        );
    } else {
        let mut t = Table::new(&[
            "case",
            "family",
            "tokens",
            "max rel err",
            "quantities",
            "result",
        ]);
        for r in &reports {
            let quantities = match &r.error {
                Some(e) => format!("error: {e}"),
                None => r
                    .quantities
                    .iter()
                    .map(|q| match q.measure {
                        moe_models::verify::Measure::RelErr => {
                            format!("{}={:.1e}", q.name, q.value)
                        }
                        moe_models::verify::Measure::Mismatches => {
                            format!("{}={} mismatches", q.name, q.value)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            t.push(vec![
                r.name.clone(),
                r.family.clone(),
                r.tokens.to_string(),
                format!("{:.2e}", r.max_rel_err()),
                quantities,
                if r.passed { "pass" } else { "FAIL" }.to_string(),
            ]);
        }
        print!("{}", t.render(a.format));
        println!(
            "tolerance: max|ours - ref| / max|ref| <= {:e}; discrete quantities must match exactly",
            moe_models::verify::TOLERANCE
        );
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    if failed > 0 || reports.is_empty() {
        return Err(CliError::Other(anyhow::anyhow!(
            "{failed} of {} cases failed",
            reports.len()
        )));
    }
    Ok(())
}
