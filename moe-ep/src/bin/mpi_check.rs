//! `mpi_check`: checks expert parallelism's MPI transport ([`MpiComm`]) under `mpirun`, one process per rank
//! (feature `mpi`; `moe-ep/tests/mpi.rs` runs it at 2 and 4 ranks).
//!
//! ```text
//! mpirun --oversubscribe --allow-run-as-root -np 4 mpi_check comm --expect-size 4
//! mpirun ... -np 2 mpi_check comm --timeout-ms 2000 --stall 1   # the others fail within the timeout: exit 3
//! mpirun ... -np 2 mpi_check comm --die 1                       # mpirun ends the job, non-zero
//! ```
//!
//! Checks (the first argument; `comm` when none):
//! - `comm`: four rounds of `all_to_all_v` with a distinct size and content per (source, destination) pair,
//!   empty messages among them, one of 5 MiB, and a round where rank 0 sends and receives nothing; `all_reduce_sum` gives every rank the same bits, those of the
//!   rank-order sum; ranks with different `all_reduce_sum` lengths, and one rank with wrong counts, make every
//!   rank fail (no hang) and leave the communicator usable; `barrier`.
//!
//! Faults, before the first collective: `--stall RANK` makes that rank sleep for four timeouts (at least 2 s);
//! `--die RANK` makes it leave at once with `std::process::exit(1)`, without `MPI_Finalize`.
//!
//! Exit codes: 0 every check passed (each rank prints one `ok` line); 2 bad arguments; 3 a communication error
//! (each rank that saw it prints one `error:` line, then `MPI_Abort` ends the job and `mpirun` exits 3);
//! 4 a check found a wrong result; 1 MPI could not start.

use std::process::ExitCode;
use std::time::Duration;

use moe_core::MoeError;
use moe_ep::{Communicator, MpiComm};

const USAGE: &str = "usage: mpirun -np N mpi_check [comm] [--expect-size N] [--timeout-ms MS] [--stall RANK] [--die RANK]

checks:
  comm   all_to_all_v (distinct sizes per pair, empty and 5 MiB messages), all_reduce_sum, barrier, refused bad calls

options:
  --expect-size N   fail unless mpirun started N ranks
  --timeout-ms MS   the communicator's timeout (default 60000)
  --stall RANK      that rank sleeps for four timeouts before the first collective
  --die RANK        that rank exits at once (exit code 1, no MPI_Finalize) before the first collective

exit codes: 0 ok, 1 MPI did not start, 2 bad arguments, 3 communication error, 4 wrong result";

/// Exit code (through `MPI_Abort`) after a [`MoeError::Communication`].
const EXIT_COMMUNICATION: i32 = 3;
/// Exit code (through `MPI_Abort`) after a check found a wrong result.
const EXIT_WRONG: i32 = 4;
/// Exit code for bad arguments.
const EXIT_USAGE: i32 = 2;

/// The size of the one large message of the `comm` check, in bytes (5 MiB).
const LARGE_MESSAGE: usize = 5 << 20;

/// What to check. (The expert-parallel layer's check joins as another mode.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Comm,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::Comm => "comm",
        }
    }
}

#[derive(Debug)]
struct Args {
    check: Check,
    expect_size: Option<usize>,
    timeout: Option<Duration>,
    stall: Option<usize>,
    die: Option<usize>,
}

/// Why a check failed: the transport, or a wrong result.
#[derive(Debug)]
enum Failure {
    Comm(MoeError),
    Wrong(String),
    Usage(String),
}

impl From<MoeError> for Failure {
    fn from(e: MoeError) -> Self {
        Failure::Comm(e)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut comm = match MpiComm::world() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(t) = args.timeout {
        comm.set_timeout(t);
    }
    let (rank, size) = (comm.rank(), comm.size());
    match run(&mut comm, &args) {
        Ok(summary) => {
            println!(
                "mpi_check {}: rank {rank} of {size}: ok ({summary})",
                args.check.name()
            );
            ExitCode::SUCCESS
        }
        Err(Failure::Comm(e)) => {
            eprintln!("error: {e}");
            comm.abort(EXIT_COMMUNICATION)
        }
        Err(Failure::Wrong(m)) => {
            eprintln!("error: rank {rank}: {m}");
            comm.abort(EXIT_WRONG)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            comm.abort(EXIT_USAGE)
        }
    }
}

/// Parses the arguments after the program name.
fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args {
        check: Check::Comm,
        expect_size: None,
        timeout: None,
        stall: None,
        die: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| -> Result<usize, String> {
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            v.parse::<usize>()
                .map_err(|_| format!("{flag} {v:?}: expected a whole number"))
        };
        match a.as_str() {
            "comm" => out.check = Check::Comm,
            "--expect-size" => out.expect_size = Some(value("--expect-size")?),
            "--timeout-ms" => {
                let ms = value("--timeout-ms")?;
                if ms == 0 {
                    return Err("--timeout-ms 0: at least 1".into());
                }
                out.timeout = Some(Duration::from_millis(ms as u64));
            }
            "--stall" => out.stall = Some(value("--stall")?),
            "--die" => out.die = Some(value("--die")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(out)
}

/// Checks the world, injects the asked-for fault, runs the check; returns the `ok` line's summary.
fn run(comm: &mut MpiComm, args: &Args) -> Result<String, Failure> {
    let (rank, size) = (comm.rank(), comm.size());
    if comm.name() != "mpi" {
        return Err(Failure::Wrong(format!(
            "the communicator calls itself {:?}",
            comm.name()
        )));
    }
    if let Some(n) = args.expect_size
        && n != size
    {
        return Err(Failure::Wrong(format!(
            "mpirun started {size} ranks, expected {n}"
        )));
    }
    for (flag, r) in [("--stall", args.stall), ("--die", args.die)] {
        if let Some(r) = r
            && r >= size
        {
            return Err(Failure::Usage(format!("{flag} {r}: ranks are 0..{size}")));
        }
    }
    if args.die == Some(rank) {
        eprintln!("mpi_check: rank {rank} exits now (--die)");
        std::process::exit(1);
    }
    if args.stall == Some(rank) {
        let nap = (comm.timeout() * 4).max(Duration::from_secs(2));
        eprintln!(
            "mpi_check: rank {rank} sleeps {:.1} s (--stall)",
            nap.as_secs_f64()
        );
        std::thread::sleep(nap);
    }
    match args.check {
        Check::Comm => check_comm(comm),
    }
}

/// The `comm` check (see the file's docs).
fn check_comm(comm: &mut MpiComm) -> Result<String, Failure> {
    for round in 0..ROUNDS {
        check_all_to_all(comm, round)?;
    }
    check_all_reduce(comm)?;
    check_refusals(comm)?;
    comm.barrier()?;
    Ok(format!(
        "{ROUNDS} all_to_all_v rounds with a {LARGE_MESSAGE}-byte message and a rank without any, all_reduce_sum bit-identical, bad calls refused on every rank, barrier; MPI threading {:?}",
        comm.threading()
    ))
}

/// The `all_to_all_v` rounds of the `comm` check (a fifth runs after the refusals).
const ROUNDS: usize = 4;

/// The length of the message from `src` to `dst` in `round`: distinct per pair, empty for some, one of
/// [`LARGE_MESSAGE`] bytes (round 1, rank 0 to the last rank); in round 2 rank 0 sends and receives nothing
/// (a rank without tokens for anyone).
fn message_len(round: usize, src: usize, dst: usize, size: usize) -> usize {
    if round == 1 && src == 0 && dst == size - 1 {
        LARGE_MESSAGE
    } else if (round == 2 && (src == 0 || dst == 0)) || (src + dst + round).is_multiple_of(3) {
        0
    } else {
        1 + (src * 131 + dst * 17 + round * 7) % 4096
    }
}

/// The message from `src` to `dst` in `round`.
fn message(round: usize, src: usize, dst: usize, size: usize) -> Vec<u8> {
    (0..message_len(round, src, dst, size))
        .map(|i| ((src * 7 + dst * 13 + round * 29 + i * 31) % 251) as u8)
        .collect()
}

fn check_all_to_all(comm: &mut MpiComm, round: usize) -> Result<(), Failure> {
    let (rank, size) = (comm.rank(), comm.size());
    let messages: Vec<Vec<u8>> = (0..size).map(|d| message(round, rank, d, size)).collect();
    let counts: Vec<usize> = messages.iter().map(Vec::len).collect();
    let got = comm.all_to_all_v(&messages.concat(), &counts)?;
    if got.sources() != size {
        return Err(Failure::Wrong(format!(
            "all_to_all_v round {round}: {} sources, expected {size}",
            got.sources()
        )));
    }
    for src in 0..size {
        let want = message(round, src, rank, size);
        let have = got.from(src);
        if have != want.as_slice() {
            let first = have.iter().zip(&want).position(|(a, b)| a != b);
            return Err(Failure::Wrong(format!(
                "all_to_all_v round {round}: the message from rank {src} has {} bytes (expected {}), first difference at {first:?}",
                have.len(),
                want.len()
            )));
        }
    }
    Ok(())
}

/// Rank `r`'s values for the all-reduce: sums of them depend on the order of the additions.
fn reduce_values(r: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i * 37 + r * 101) % 1000) as f32 * 1e-3 + ((i as f32 + 0.5).sqrt() / (r as f32 + 3.0))
        })
        .collect()
}

fn check_all_reduce(comm: &mut MpiComm) -> Result<(), Failure> {
    let (rank, size) = (comm.rank(), comm.size());
    let n = 1000;
    let mut values = reduce_values(rank, n);
    comm.all_reduce_sum(&mut values)?;
    let mut want = reduce_values(0, n);
    for r in 1..size {
        for (w, v) in want.iter_mut().zip(reduce_values(r, n)) {
            *w += v;
        }
    }
    if let Some(i) = (0..n).find(|&i| values[i].to_bits() != want[i].to_bits()) {
        return Err(Failure::Wrong(format!(
            "all_reduce_sum: value {i} is {}, the rank-order sum is {}",
            values[i], want[i]
        )));
    }
    let everyone = comm.all_gather(bytemuck::cast_slice(&values))?;
    if let Some(src) =
        (0..size).find(|&s| everyone.from(s) != bytemuck::cast_slice::<f32, u8>(&values))
    {
        return Err(Failure::Wrong(format!(
            "all_reduce_sum: rank {src} got other bits than this rank"
        )));
    }
    Ok(())
}

/// Bad calls fail on every rank, without a hang, and leave the communicator in step.
fn check_refusals(comm: &mut MpiComm) -> Result<(), Failure> {
    let (rank, size) = (comm.rank(), comm.size());
    if size > 1 {
        let mut values = vec![1.0f32; 3 + rank];
        match comm.all_reduce_sum(&mut values) {
            Err(MoeError::Communication { .. }) => {}
            other => {
                return Err(Failure::Wrong(format!(
                    "all_reduce_sum over lengths that differ across ranks gave {other:?}, expected a Communication error"
                )));
            }
        }
        // The last rank's counts do not add up to its buffer: it says so, and the others hear that it cannot send.
        let counts = vec![1usize; size];
        let send = vec![7u8; if rank == size - 1 { size + 1 } else { size }];
        match comm.all_to_all_v(&send, &counts) {
            Err(MoeError::Communication { reason, .. })
                if rank == size - 1
                    || reason.contains(&format!("rank {} cannot send", size - 1)) => {}
            other => {
                return Err(Failure::Wrong(format!(
                    "all_to_all_v with wrong counts on rank {} gave {other:?}, expected a Communication error",
                    size - 1
                )));
            }
        }
    }
    check_all_to_all(comm, ROUNDS)
}
