//! The MPI transport under `mpirun` (feature `mpi`): the `mpi_check` binary's checks pass at 1, 2 and 4 ranks,
//! a stalled rank makes the others fail within the timeout, a rank that dies ends the job non-zero. Each run is
//! bounded in wall-clock time: past [`LIMIT`] mpirun is killed and the test fails, it never hangs.
//!
//! Needs OpenMPI's `mpirun` on PATH (`.ci/run` installs `openmpi-bin`); without it these tests fail, they do not
//! skip (the feature cannot even build without `libopenmpi-dev`).
#![cfg(feature = "mpi")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The check binary, built by cargo for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_mpi_check");

/// The most one mpirun run may take before it is killed and the test fails.
const LIMIT: Duration = Duration::from_secs(60);

/// One mpirun at a time: the machine has few cores and every run oversubscribes them.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Debug)]
struct Outcome {
    /// mpirun's exit code (`None`: ended by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Reads a pipe to its end on a thread of its own (so a full pipe never blocks the ranks).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Runs `mpirun --oversubscribe --allow-run-as-root -np NP mpi_check ARGS`, killing it (and failing the test)
/// past [`LIMIT`].
fn mpirun(np: usize, args: &[&str]) -> Outcome {
    mpirun_bin(BIN, np, args)
}

/// The `ep_mpi` example (the expert-parallel layer under MPI), built next to this test by `cargo test`, or built
/// now when a filtered run (`--test mpi`) left it out.
fn ep_example() -> String {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    // target/<profile>/deps/mpi-<hash> -> target/<profile>/examples/ep_mpi
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("no target directory above {}", exe.display()))
        .join("examples");
    let path = dir.join("ep_mpi");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-p",
            "moe-ep",
            "--features",
            "mpi",
            "--example",
            "ep_mpi",
        ]);
        if dir
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release")
        {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cargo build --example ep_mpi: {e}"));
        assert!(status.success(), "cargo build --example ep_mpi failed");
    }
    path.to_string_lossy().into_owned()
}

/// [`mpirun`] of another binary.
fn mpirun_bin(bin: &str, np: usize, args: &[&str]) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let mut child = Command::new("mpirun")
        .args(["--oversubscribe", "--allow-run-as-root", "-np", &np.to_string(), bin])
        .args(args)
        // Containers often forbid the cross-process memory access (CMA) OpenMPI's shared-memory transport uses
        // for large messages ("Read -1, expected 5242880, errno = 1"): copy through shared memory instead.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start mpirun ({e}): install OpenMPI (apt-get install openmpi-bin libopenmpi-dev)")
        });
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                // SIGTERM first: mpirun then takes its ranks down with it; SIGKILL if it does not end.
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(3));
                let _ = child.kill();
                let _ = child.wait();
                panic!("mpirun -np {np} {bin} {args:?} ran past {LIMIT:?} and was killed: a hang");
            }
        }
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

#[test]
fn the_comm_check_passes_at_1_2_and_4_ranks() {
    for np in [1, 2, 4] {
        let n = np.to_string();
        let o = mpirun(np, &["comm", "--expect-size", &n]);
        assert_eq!(o.code, Some(0), "-np {np}: {o:#?}");
        for r in 0..np {
            let ok = format!("mpi_check comm: rank {r} of {np}: ok");
            assert!(o.stdout.contains(&ok), "-np {np}: no {ok:?} line: {o:#?}");
        }
        assert_eq!(
            o.stdout.lines().count(),
            np,
            "-np {np}: one line per rank: {o:#?}"
        );
    }
}

#[test]
fn a_stalled_rank_makes_the_others_fail_within_the_timeout() {
    // The stalled rank sleeps 4 timeouts (8 s) before its first collective: ending sooner, with exit code 3 and
    // the timeout's message, is the others' timeout at work (a hang would run into LIMIT; no timeout at all
    // would finish the checks after the nap and exit 0).
    for np in [2, 4] {
        let stalled = (np - 1).to_string();
        let o = mpirun(np, &["comm", "--timeout-ms", "2000", "--stall", &stalled]);
        assert_eq!(o.code, Some(3), "-np {np}: {o:#?}");
        let timed_out = o.stderr.lines().filter(|l| {
            l.starts_with("error: all_to_all_v on rank ")
                && l.ends_with("failed: no answer within 2.0 s: a rank stalled or died")
        });
        assert!(
            timed_out.count() >= 1,
            "-np {np}: no timeout error line: {o:#?}"
        );
        assert!(
            !o.stderr
                .contains(&format!("error: all_to_all_v on rank {stalled} ")),
            "-np {np}: the stalled rank itself cannot have timed out: {o:#?}"
        );
        assert!(
            o.elapsed < Duration::from_secs(8),
            "-np {np}: took {:?}: more than the stalled rank's nap",
            o.elapsed
        );
        assert!(o.stdout.is_empty(), "-np {np}: no rank may pass: {o:#?}");
    }
}

#[test]
fn a_rank_that_dies_ends_the_job_non_zero_without_a_hang() {
    // OpenMPI 4.1: mpirun sees the rank exit (code 1, no MPI_Finalize), kills the others and exits non-zero
    // ("mpirun detected that one or more processes exited with non-zero status"), long before the ranks'
    // own 30 s timeout.
    for (np, dies) in [(2, 1), (4, 0)] {
        let o = mpirun(
            np,
            &["comm", "--timeout-ms", "30000", "--die", &dies.to_string()],
        );
        assert!(matches!(o.code, Some(c) if c != 0), "-np {np}: {o:#?}");
        assert!(
            o.elapsed < Duration::from_secs(20),
            "-np {np}: took {:?}: mpirun should end the job at once",
            o.elapsed
        );
        assert!(
            o.stderr
                .contains(&format!("mpi_check: rank {dies} exits now (--die)")),
            "-np {np}: {o:#?}"
        );
        assert!(
            !o.stdout.contains(": ok"),
            "-np {np}: no rank may pass: {o:#?}"
        );
    }
}

#[test]
fn bad_arguments_exit_2_with_one_error_line_before_mpi_starts() {
    for args in [
        &["--bogus"][..],
        &["--timeout-ms", "0"],
        &["--stall"],
        &["--die", "x"],
    ] {
        let o = Command::new(BIN)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error: ")).count(),
            1,
            "{args:?}: {stderr}"
        );
    }
}

/// Every rank's `ok` line, or the whole output in the failure message.
fn assert_every_rank_ok(o: &Outcome, np: usize, what: &str) {
    assert_eq!(o.code, Some(0), "{what} at {np} ranks: {o:?}");
    for r in 0..np {
        assert!(
            o.stdout.contains(&format!("rank {r}: ok")),
            "{what}: no ok line from rank {r}: {o:?}"
        );
    }
}

#[test]
fn the_expert_parallel_layer_equals_one_rank_on_2_and_4_mpi_ranks() {
    let bin = ep_example();
    for np in [2, 4] {
        let o = mpirun_bin(&bin, np, &["identity"]);
        assert_every_rank_ok(&o, np, "identity");
        assert!(
            o.stdout.contains("60 layers identical to one rank"),
            "{o:?}"
        );
    }
}

#[test]
fn a_rank_with_bad_input_is_named_by_the_others_and_the_next_step_runs() {
    let bin = ep_example();
    let o = mpirun_bin(&bin, 3, &["bad-input"]);
    assert_every_rank_ok(&o, 3, "bad-input");
    assert!(o.stdout.contains("rank 1 failed"), "{o:?}");
}

#[test]
fn ranks_with_different_layers_are_refused_at_start() {
    let bin = ep_example();
    let o = mpirun_bin(&bin, 2, &["mismatch"]);
    assert_every_rank_ok(&o, 2, "mismatch");
    assert!(o.stdout.contains("layer differs"), "{o:?}");
}
