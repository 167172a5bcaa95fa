//! `cargo xtask fuzz`: builds and runs the cargo-fuzz targets of `fuzz/` (a crate outside the workspace, with its
//! own `Cargo.lock`), each for a time budget, prints the executions per target (libFuzzer's closing
//! `Done N runs` line) and fails on any crash, out-of-memory, timeout or leak.
//!
//! The toolchain: `cargo +nightly fuzz` when a nightly toolchain is installed, else `cargo fuzz` with
//! `RUSTC_BOOTSTRAP=1` (cargo-fuzz needs `-Z` flags). New inputs go to `fuzz/target/corpus/<target>` (ignored by
//! git); the committed seeds in `fuzz/corpus/<target>` are read, never written. Every run has libFuzzer's
//! `-rss_limit_mb=2048 -malloc_limit_mb=2048`, so an input that makes a loader allocate more than 2 GiB is a
//! finding.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The targets, as `fuzz/Cargo.toml` lists them.
pub const TARGETS: &[&str] = &[
    "checkpoint_file",
    "checkpoint_sharded",
    "hidden_safetensors",
    "hidden_npy",
    "config_json",
    "fixture_manifest",
    "router_options",
    "router_toml",
];

/// `cargo xtask fuzz --help`.
pub const USAGE: &str = "usage: cargo xtask fuzz [--time SECS] [--target NAME] [--smoke]

Builds the cargo-fuzz targets of fuzz/ and runs each (or NAME) for SECS seconds (default 60), one after
another, with -rss_limit_mb=2048 -malloc_limit_mb=2048; prints the executions per target and fails on any
crash, out-of-memory, timeout or leak (the input is left in fuzz/artifacts/<target>/).
--smoke runs each target for 20000 executions or 10 s, whichever comes first (what `cargo xtask ci` runs).
Needs cargo-fuzz (`cargo install cargo-fuzz --locked --version 0.13.1`) and a nightly toolchain, or a stable
one driven with RUSTC_BOOTSTRAP=1.
targets: checkpoint_file checkpoint_sharded hidden_safetensors hidden_npy config_json fixture_manifest
         router_options router_toml";

/// Memory limits passed to every run (MiB).
const LIMITS: [&str; 2] = ["-rss_limit_mb=2048", "-malloc_limit_mb=2048"];

/// What to run.
struct Plan {
    targets: Vec<String>,
    /// `-max_total_time` per target.
    secs: u64,
    /// `-runs` per target (smoke).
    runs: Option<u64>,
}

fn parse(args: &[String]) -> Result<Plan> {
    let mut plan = Plan {
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        secs: 60,
        runs: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--time" => {
                let v = it.next().context("--time needs a number of seconds")?;
                plan.secs = v
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--time {v:?}: expected seconds >= 1"))?;
            }
            "--target" => {
                let v = it.next().context("--target needs a target name")?;
                if !TARGETS.contains(&v.as_str()) {
                    bail!("unknown fuzz target {v:?}; targets: {}", TARGETS.join(", "));
                }
                plan.targets = vec![v.clone()];
            }
            "--smoke" => {
                plan.secs = 10;
                plan.runs = Some(20_000);
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    Ok(plan)
}

/// How to call cargo-fuzz here: the cargo arguments before `fuzz` and whether `RUSTC_BOOTSTRAP=1` is needed, or
/// why it cannot run.
pub struct Toolchain {
    prefix: Vec<String>,
    bootstrap: bool,
    /// The command, in words (`cargo +nightly fuzz`).
    pub description: String,
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Finds cargo-fuzz and a toolchain that can build its targets.
///
/// # Errors
/// Why not: cargo-fuzz missing, or no nightly and a stable that cannot be driven with `RUSTC_BOOTSTRAP=1`.
pub fn toolchain() -> Result<Toolchain> {
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        bail!("cargo-fuzz is not installed (cargo install cargo-fuzz --locked --version 0.13.1)");
    }
    let nightly = succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    if nightly {
        return Ok(Toolchain {
            prefix: vec!["+nightly".into()],
            bootstrap: false,
            description: "cargo +nightly fuzz".into(),
        });
    }
    let bootstrap = succeeds(
        Command::new("rustc")
            .args(["-Z", "help"])
            .env("RUSTC_BOOTSTRAP", "1"),
    );
    if !bootstrap {
        bail!("no nightly toolchain, and this rustc refuses -Z flags even with RUSTC_BOOTSTRAP=1");
    }
    Ok(Toolchain {
        prefix: Vec::new(),
        bootstrap: true,
        description: "RUSTC_BOOTSTRAP=1 cargo fuzz (stable)".into(),
    })
}

impl Toolchain {
    fn cargo(&self, fuzz_dir: &Path) -> Command {
        let mut c = Command::new("cargo");
        c.current_dir(fuzz_dir).args(&self.prefix).arg("fuzz");
        // The fuzz crate has its own target dir (fuzz/target): a workspace CARGO_TARGET_DIR would mix
        // sanitizer builds into it.
        c.env_remove("CARGO_TARGET_DIR");
        if self.bootstrap {
            c.env("RUSTC_BOOTSTRAP", "1");
        }
        c
    }
}

/// `Done N runs` from libFuzzer's output.
fn executions(output: &str) -> Option<u64> {
    output.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("Done ")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Runs one target; returns its executions.
fn run_target(tc: &Toolchain, fuzz_dir: &Path, target: &str, plan: &Plan) -> Result<u64> {
    let work = fuzz_dir.join("target").join("corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut c = tc.cargo(fuzz_dir);
    c.args(["run", "-O", "--debug-assertions", target])
        .arg(&work)
        .arg(Path::new("corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={}", plan.secs))
        .arg("-timeout=25")
        .args(LIMITS);
    if let Some(r) = plan.runs {
        c.arg(format!("-runs={r}"));
    }
    let out = c
        .output()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // libFuzzer exits non-zero on a finding and names the file it wrote; either one fails the target.
    let finding = text.contains("Test unit written to");
    match (out.status.success(), executions(&text)) {
        (true, Some(n)) if !finding => Ok(n),
        _ => {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("{}", tail.join("\n"));
            bail!(
                "fuzz target {target} failed ({}); the input is in fuzz/artifacts/{target}/, reproduce with `cd fuzz && {} run -O --debug-assertions {target} <file>`",
                out.status,
                tc.description
            )
        }
    }
}

/// `cargo xtask fuzz [--time SECS] [--target NAME] [--smoke]`.
///
/// # Errors
/// A bad option, a missing toolchain, a build failure or any finding.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let plan = parse(args)?;
    let tc = toolchain()?;
    run_plan(root, &tc, &plan)
}

fn run_plan(root: &Path, tc: &Toolchain, plan: &Plan) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    println!("building the fuzz targets with {}", tc.description);
    let status = tc
        .cargo(&fuzz_dir)
        .args(["build", "-O", "--debug-assertions"])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let mut total = 0u64;
    for t in &plan.targets {
        let n = run_target(tc, &fuzz_dir, t, plan)?;
        println!("fuzz {t:<20} {n:>12} executions, 0 crashes");
        total += n;
    }
    println!(
        "fuzz total {:>27} executions, 0 crashes, 0 out-of-memory",
        total
    );
    Ok(())
}

/// The smoke `cargo xtask ci` runs: every target briefly when cargo-fuzz and a toolchain that builds it are
/// present (and `MOE_FUZZ_SMOKE` is not `0`); otherwise it says it skipped, and why.
///
/// # Errors
/// A build failure or a finding (a missing toolchain is not an error).
pub fn ci_smoke(root: &Path) -> Result<()> {
    if std::env::var("MOE_FUZZ_SMOKE").is_ok_and(|v| v == "0") {
        println!("fuzz smoke SKIPPED: MOE_FUZZ_SMOKE=0");
        return Ok(());
    }
    match toolchain() {
        Ok(tc) => run_plan(root, &tc, &parse(&["--smoke".to_string()])?),
        Err(e) => {
            println!(
                "fuzz smoke SKIPPED: {e:#}. Run `cargo xtask fuzz --smoke` where cargo-fuzz is installed."
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_done_line() {
        let out = "#1024 pulse\nDone 211926 runs in 16 second(s)\n";
        assert_eq!(executions(out), Some(211_926));
        assert_eq!(executions("==1== ERROR: libFuzzer: deadly signal"), None);
    }

    #[test]
    fn options_parse() -> Result<()> {
        let p = parse(&[
            "--time".into(),
            "5".into(),
            "--target".into(),
            "hidden_npy".into(),
        ])?;
        assert_eq!((p.secs, p.targets.len(), p.runs), (5, 1, None));
        let s = parse(&["--smoke".into()])?;
        assert_eq!(
            (s.secs, s.targets.len(), s.runs),
            (10, TARGETS.len(), Some(20_000))
        );
        assert!(parse(&["--target".into(), "nope".into()]).is_err());
        assert!(parse(&["--time".into(), "0".into()]).is_err());
        Ok(())
    }
}
