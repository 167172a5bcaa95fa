//! `cargo xtask <task>`: the project's automation, in Rust.
//!
//! - `ci`: every check CI runs, cheapest first: that MPI is present, rustfmt, clippy (`-D warnings`, without and
//!   with the device backends' features, wgpu and cuda, and moe-ep's `mpi`), tidy (see [`tidy`]: `//!` lines,
//!   function and file lengths, a reason on every `allow`), rustdoc with `-D warnings`, the whole workspace's
//!   tests (unit, integration, doc) with those features on (moe-ep's mpirun runs at 1, 2 and 4 ranks among them:
//!   OpenMPI must be installed, or `MOE_SKIP_MPI=1` leaves MPI out on a developer's machine), the default
//!   `moe compare` and a small `moe bench --backend wgpu` as smoke tests, `moe list` with the cuda backend built
//!   (it must name why it cannot run here), and `cargo bench --no-run`.
//! - `fuzz`: builds and runs the cargo-fuzz targets of `fuzz/` for a time budget each (see [`fuzz`]); `ci` runs
//!   its `--smoke` when cargo-fuzz and a toolchain that builds it are present, and says why when it skips.
//! - `bench-vs-torch`: our CPU backend against PyTorch's Hugging Face blocks, in one run on this machine (see
//!   [`bench_vs_torch`]); a benchmark, not part of CI.
//! - `bench-train-vs-torch`: training tokens/s of `moe train` against the PyTorch reference of the same model
//!   (`scripts/train_reference.py --bench`), on the same threads (see [`bench_train`]); a benchmark, not part of CI.
//! - `train-ref-fixture`: regenerates `tests/fixtures/train-ref` (moe-train writes the configuration, initial
//!   weights and batches; `scripts/train_reference.py` trains them in PyTorch when a python with torch is found).

mod bench_train;
mod bench_vs_torch;
mod fuzz;
mod tidy;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

const USAGE: &str = "usage: cargo xtask <task> [--help]\n\ntasks:\n  ci              run every check CI runs\n  tidy            house rules: //! lines, function and file lengths, reasons on allows\n  fuzz            run the cargo-fuzz targets (--time SECS, --target NAME, --smoke)\n  bench-vs-torch  time our CPU backend and PyTorch's HF blocks side by side (needs torch)\n  bench-train-vs-torch  training tokens/s of `moe train` and its PyTorch reference side by side (needs torch)\n  train-ref-fixture  regenerate tests/fixtures/train-ref (moe-train's inputs, then PyTorch's losses: needs torch)";

/// Whether `args` ask for help (`--help`, `-h`).
fn wants_help(args: &[String]) -> bool {
    args.iter().any(|a| a == "--help" || a == "-h")
}

/// Runs the task; errors print as one `error:` line (no backtrace), exit 1; usage errors exit 2.
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let help = |text: &str| {
        println!("{text}");
        std::process::ExitCode::SUCCESS
    };
    let result = match args.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => return help(USAGE),
        Some("ci") if wants_help(&args[1..]) => {
            return help(
                "usage: cargo xtask ci\n\nruns rustfmt, clippy, rustdoc, tidy and the tests, as CI does\n\nenvironment:\n  MOE_SKIP_MPI=1  leave out the MPI checks (moe-ep feature mpi, the mpirun tests) on a machine without OpenMPI",
            );
        }
        Some("tidy") if wants_help(&args[1..]) => {
            return help(
                "usage: cargo xtask tidy\n\nchecks the house rules: a //! line opening every .rs file, function and file lengths, reasons on #[allow]",
            );
        }
        Some("bench-vs-torch") if wants_help(&args[1..]) => return help(bench_vs_torch::USAGE),
        Some("bench-train-vs-torch") if wants_help(&args[1..]) => return help(bench_train::USAGE),
        Some("fuzz") if wants_help(&args[1..]) => return help(fuzz::USAGE),
        Some("ci")
        | Some("tidy")
        | Some("bench-vs-torch")
        | Some("bench-train-vs-torch")
        | Some("train-ref-fixture")
        | Some("fuzz") => run_task(&args),
        Some(other) => {
            eprintln!("error: unknown task {other:?}\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
        None => {
            eprintln!("error: no task given\n{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_task(args: &[String]) -> Result<()> {
    let sh = Shell::new()?;
    let root = project_root();
    sh.change_dir(&root);
    match args.first().map(String::as_str) {
        Some("ci") => ci(&sh, &root),
        Some("tidy") => tidy::run(&root),
        Some("bench-vs-torch") => bench_vs_torch::run(&root, &args[1..]),
        Some("bench-train-vs-torch") => bench_train::run(&root, &args[1..]),
        Some("train-ref-fixture") => train_ref_fixture(&sh, &root),
        Some("fuzz") => fuzz::run(&root, &args[1..]),
        _ => bail!("no task given"),
    }
}

/// Regenerates `tests/fixtures/train-ref/{dense,softmax-topk}`: our side writes `config.json`, `init.safetensors`
/// and `batches.safetensors` (the `train_reference_inputs` example of moe-train), then the PyTorch script trains
/// them on one thread (`$MOE_PYTHON`, else `python3`) and writes `reference.json` and `final.safetensors`.
fn train_ref_fixture(sh: &Shell, root: &Path) -> Result<()> {
    let python = std::env::var("MOE_PYTHON").unwrap_or_else(|_| "python3".into());
    for ffn in ["dense", "softmax-topk"] {
        let dir = root.join("tests/fixtures/train-ref").join(ffn);
        cmd!(sh, "cargo run --release --locked -q -p moe-train --example train_reference_inputs -- {dir} {ffn} 20")
            .run()
            .with_context(|| format!("writing the inputs of {}", dir.display()))?;
        cmd!(
            sh,
            "{python} scripts/train_reference.py --dir {dir} --threads 1"
        )
        .run()
        .with_context(|| {
            format!(
                "PyTorch on {} (needs torch and safetensors: MOE_PYTHON=...)",
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// The cargo target directory: `CARGO_TARGET_DIR` (relative to `root` when relative), else `root/target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    target_dir_from(root, std::env::var_os("CARGO_TARGET_DIR"))
}

/// [`target_dir`] for a given value of `CARGO_TARGET_DIR`.
fn target_dir_from(root: &Path, var: Option<std::ffi::OsString>) -> PathBuf {
    match var {
        Some(d) if !d.is_empty() => root.join(PathBuf::from(d)),
        _ => root.join("target"),
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Features that CI turns on for clippy, rustdoc and the tests: the wgpu and cuda backends, their fixture tests
/// and the CLI's `--backend wgpu|cuda`. `.ci/run` installs Mesa's lavapipe so the wgpu tests run for real
/// (`MOE_REQUIRE_GPU=wgpu`), and NVRTC so the CUDA kernels are compiled (`MOE_REQUIRE_NVRTC=1`); the CUDA
/// parity tests need a GPU and print why they skip without one. `moe-ep/nccl` builds the NCCL communicator
/// (cudarc's NCCL bindings, libnccl loaded at run time); its GPU tests need two GPUs and skip without them.
const DEVICE_FEATURES: &str = concat!(
    "moe-backends/wgpu,moe-tests/wgpu,moe-cli/wgpu,moe-backends/cuda,moe-tests/cuda,moe-cli/cuda,",
    "moe-ep/nccl"
);

/// The features that build moe-ep's MPI communicator, its `mpi_check` binary and the mpirun tests
/// (`moe-ep/tests/mpi.rs`, at 1 to 4 ranks), and `moe bench --ep`; `ci` adds them to [`DEVICE_FEATURES`] in clippy, rustdoc and the
/// tests. It needs OpenMPI (`libopenmpi-dev`, `openmpi-bin`) and libclang (`libclang-dev`, for bindgen), which
/// `.ci/run` installs.
const MPI_FEATURE: &str = "moe-ep/mpi,moe-cli/mpi";

/// The environment variable that leaves the MPI checks out of `cargo xtask ci` on a machine without OpenMPI
/// (`MOE_SKIP_MPI=1`); CI never sets it, so there a missing `mpirun` fails the run.
const SKIP_MPI_VAR: &str = "MOE_SKIP_MPI";

/// The features `ci` turns on: [`DEVICE_FEATURES`] plus [`MPI_FEATURE`] unless `MOE_SKIP_MPI=1`. Fails when
/// `mpirun` does not run and the MPI checks were not skipped.
fn ci_features(sh: &Shell) -> Result<String> {
    let skip = std::env::var(SKIP_MPI_VAR).is_ok_and(|v| v == "1");
    mpi_features(skip, || {
        cmd!(sh, "mpirun --version")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .is_ok()
    })
}

/// [`ci_features`] with the skip setting and the `mpirun` probe given.
fn mpi_features(skip: bool, mpirun_runs: impl FnOnce() -> bool) -> Result<String> {
    if skip {
        println!(
            "xtask ci: {SKIP_MPI_VAR}=1: the MPI checks (feature {MPI_FEATURE}, the mpirun tests) are left out"
        );
        return Ok(DEVICE_FEATURES.to_string());
    }
    if !mpirun_runs() {
        bail!(
            "`mpirun --version` does not run: install OpenMPI and libclang (apt-get install libopenmpi-dev openmpi-bin libclang-dev, as .ci/run does), or set {SKIP_MPI_VAR}=1 to leave the MPI checks out on this machine"
        );
    }
    Ok(format!("{DEVICE_FEATURES},{MPI_FEATURE}"))
}

fn step(name: &str) {
    println!("\n==> xtask ci: {name}");
}

fn ci(sh: &Shell, root: &Path) -> Result<()> {
    step("MPI present (mpirun; MOE_SKIP_MPI=1 leaves the MPI checks out)");
    let features = ci_features(sh)?;
    step("rustfmt");
    cmd!(sh, "cargo fmt --all -- --check")
        .run()
        .context("rustfmt found unformatted code: run `cargo fmt --all`")?;
    step("clippy");
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --locked -- -D warnings"
    )
    .run()
    .context("clippy failed")?;
    step("clippy with the device backends (wgpu, cuda) and MPI");
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --locked --features {features} -- -D warnings"
    )
    .run()
    .context("clippy (device features) failed")?;
    step("tidy");
    tidy::run(root)?;
    step("rustdoc (broken links and missing docs are errors)");
    cmd!(
        sh,
        "cargo doc --workspace --no-deps --locked --features {features}"
    )
    .env("RUSTDOCFLAGS", "-D warnings")
    .run()
    .context("rustdoc found broken links or warnings")?;
    step(
        "tests (unit, integration, doc; wgpu, cuda and MPI on: moe-ep's mpirun runs at 1, 2 and 4 ranks)",
    );
    cmd!(sh, "cargo test --workspace --locked --features {features}")
        .run()
        .context("tests failed")?;
    step("smoke: the README's run command");
    cmd!(sh, "cargo run --release --locked -p moe-cli -- compare")
        .run()
        .context("`moe compare` failed")?;
    step("smoke: moe list and moe bench on the wgpu backend");
    cmd!(
        sh,
        "cargo run --release --locked -p moe-cli --features wgpu -- list"
    )
    .run()
    .context("`moe list` (wgpu) failed")?;
    cmd!(
        sh,
        "cargo run --release --locked -p moe-cli --features wgpu -- bench --backend wgpu -d 64 --ffn 128 -e 8 -k 2 -t 16,100 --repeats 3"
    )
    .run()
    .context("`moe bench --backend wgpu` failed")?;
    step("smoke: the HF fixtures on the wgpu backend (lavapipe without a GPU)");
    cmd!(
        sh,
        "cargo run --release --locked -p moe-cli --features wgpu -- verify tests/fixtures/hf --backend wgpu"
    )
    .run()
    .context("`moe verify --backend wgpu` failed")?;
    step("smoke: the packed (MXFP4, FP8) fixtures on the cpu backend");
    cmd!(
        sh,
        "cargo run --release --locked -p moe-cli -- verify tests/fixtures/quant"
    )
    .run()
    .context("`moe verify tests/fixtures/quant` failed")?;
    step("smoke: moe list with the cuda backend built");
    cmd!(
        sh,
        "cargo run --release --locked -p moe-cli --features cuda -- list"
    )
    .run()
    .context("`moe list` (cuda) failed")?;
    step("benches build");
    cmd!(sh, "cargo bench --workspace --locked --no-run")
        .run()
        .context("benches do not build")?;
    step("fuzz smoke (each target briefly, when cargo-fuzz and a toolchain for it are here)");
    fuzz::ci_smoke(root)?;
    println!("\nxtask ci: all checks passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_asked_for_anywhere_in_the_arguments() {
        assert!(wants_help(&[
            "--rounds".into(),
            "3".into(),
            "--help".into()
        ]));
        assert!(wants_help(&["-h".into()]));
        assert!(!wants_help(&["--threads".into(), "2".into()]));
    }

    #[test]
    fn mpi_is_required_unless_skipped() {
        assert_eq!(
            mpi_features(false, || true).ok(),
            Some(format!("{DEVICE_FEATURES},moe-ep/mpi,moe-cli/mpi"))
        );
        let missing = mpi_features(false, || false);
        assert!(
            matches!(&missing, Err(e) if e.to_string().contains("MOE_SKIP_MPI=1")),
            "{missing:?}"
        );
        let mut probed = false;
        assert_eq!(
            mpi_features(true, || {
                probed = true;
                false
            })
            .ok(),
            Some(DEVICE_FEATURES.to_string())
        );
        assert!(!probed, "a skipped MPI is not probed");
    }

    #[test]
    fn cargo_target_dir_is_respected() {
        let root = Path::new("/repo");
        assert_eq!(target_dir_from(root, None), PathBuf::from("/repo/target"));
        assert_eq!(
            target_dir_from(root, Some("".into())),
            PathBuf::from("/repo/target")
        );
        assert_eq!(
            target_dir_from(root, Some("/tmp/t".into())),
            PathBuf::from("/tmp/t")
        );
        assert_eq!(
            target_dir_from(root, Some("out".into())),
            PathBuf::from("/repo/out")
        );
    }
}
