//! # moe-cli
//!
//! The `moe` command, as a library so that a plugin crate can build its own `moe` with extra routers:
//!
//! ```no_run
//! # mod my_router {
//! #     pub fn register(_: &mut moe_core::RouterRegistry) -> Result<(), moe_core::MoeError> { Ok(()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     let mut registry = moe_routers::builtin();
//!     // Your router's `register` (see examples/custom-router); a duplicate name is an error, not a panic.
//!     if let Err(e) = my_router::register(&mut registry) {
//!         eprintln!("error: {e}");
//!         return std::process::ExitCode::FAILURE;
//!     }
//!     moe_cli::run(registry)
//! }
//! ```
//!
//! The example is compiled by `cargo test --doc` (`no_run`: running it would parse the test harness's arguments).
//!
//! This crate parses, composes the other crates and prints; it holds no math.

mod bench;
mod bench_ep;
mod bench_store;
mod cache_sim;
mod compare;
mod ep;
mod ep_cost;
mod inspect;
mod list;
mod output;
mod plot;
mod progress;
mod route;
mod spec;
mod train;
mod verify;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moe_core::RouterRegistry;

pub use compare::{CompareReport, CompareRow, WorkloadReport};
pub use ep::EpRow;

/// Entry points for the fuzz targets in `fuzz/` (not a stable API): the parsers of `--routers` text and of
/// `--config` TOML files, as the commands call them, without touching the file system.
#[doc(hidden)]
pub mod fuzzing {
    use moe_core::{RouterArgs, RouterRegistry};

    fn finish(
        choices: Result<Vec<crate::spec::RouterChoice>, crate::CliError>,
        dims: (usize, usize, usize, u64),
    ) -> Result<Vec<(String, RouterArgs)>, String> {
        let (d, e, k, seed) = dims;
        match choices {
            Ok(cs) => Ok(cs
                .into_iter()
                .map(|c| {
                    let args = c.args(d, e, k, seed);
                    (c.name, args)
                })
                .collect()),
            Err(crate::CliError::Usage(m)) => Err(m),
            Err(crate::CliError::Other(e)) => Err(format!("{e:#}")),
        }
    }

    /// Parses `--routers` text (`name[:key=value,...][,name...]` or `all`) against `registry`: each router's name
    /// and its factory arguments for `dims = (d_model, n_experts, top_k, seed)`, or the usage error's message.
    ///
    /// # Errors
    /// The message of the usage error the CLI would print (unknown router, `key` without `=value`, no router).
    pub fn parse_router_list(
        text: &str,
        registry: &RouterRegistry,
        dims: (usize, usize, usize, u64),
    ) -> Result<Vec<(String, RouterArgs)>, String> {
        finish(crate::spec::parse_routers(text, registry), dims)
    }

    /// Parses the text of a `--config` TOML router file against `registry`, as [`parse_router_list`] does.
    ///
    /// # Errors
    /// The message of the usage error the CLI would print (bad TOML, unknown key or router, non-finite value).
    pub fn parse_router_config(
        text: &str,
        registry: &RouterRegistry,
        dims: (usize, usize, usize, u64),
    ) -> Result<Vec<(String, RouterArgs)>, String> {
        let path = std::path::Path::new("routers.toml");
        finish(crate::spec::parse_config_text(text, path, registry), dims)
    }
}

/// Exit code for usage errors (bad flags, unknown routers, bad option values).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "moe", version, about = "Compare Mixture-of-Experts routers and run MoE layers", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Route one workload through several routers and compare their load balance and speed.
    Compare(compare::CompareArgs),
    /// Route one workload with one router and print a per-expert summary (`--tokens` prints each token).
    Route(route::RouteArgs),
    /// Time a full MoE layer forward on a backend over a range of T.
    Bench(bench::BenchArgs),
    /// List routers (with options and defaults) and backends.
    List(list::ListArgs),
    /// Check MoE presets against a directory of Hugging Face golden fixtures (exit 0 only if every case passes).
    Verify(verify::VerifyArgs),
    /// Show the family, MoE config and per-block tensors of a checkpoint.
    Inspect(inspect::InspectArgs),
    /// Train a small model per router plus the dense baseline and compare what they learn (loss, balance, cost).
    Train(Box<train::TrainArgs>),
    /// Replay a routing trace (`moe route --trace`, `moe train --trace`) through an expert cache: hit rate against
    /// slots per layer for each eviction policy, beside Belady's bound.
    CacheSim(cache_sim::CacheSimArgs),
    /// Predict the expert-parallel all-to-all cost of routing traces on R ranks (bytes, messages, expert load,
    /// time per model step on a network preset): the cost model of `moe compare --ep-ranks`, for 64–1024 ranks.
    EpCost(ep_cost::EpCostArgs),
}

/// An error with the exit code it should produce.
#[derive(Debug)]
pub(crate) enum CliError {
    /// Bad input from the user: exit code 2.
    Usage(String),
    /// Anything else: exit code 1.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Other(e)
    }
}

impl From<moe_core::MoeError> for CliError {
    fn from(e: moe_core::MoeError) -> Self {
        use moe_core::MoeError as E;
        match e {
            E::InvalidConfig { .. }
            | E::UnknownRouter { .. }
            | E::TopK { .. }
            | E::TooLarge { .. }
            | E::NonFinite { .. }
            | E::BadTensor { .. }
            | E::MissingInput { .. } => CliError::Usage(e.to_string()),
            other => CliError::Other(other.into()),
        }
    }
}

/// Opens a backend by name; an unknown or unavailable backend is a usage error naming the choices.
pub(crate) fn open_backend(name: &str) -> Result<Box<dyn moe_core::Backend>, CliError> {
    let kind =
        moe_backends::BackendKind::parse(name).map_err(|e| CliError::Usage(e.to_string()))?;
    moe_backends::open(kind).map_err(|e| CliError::Usage(e.to_string()))
}

/// Opens backend `name` with `options` (weight dtype, cpu threads), as a usage error when it cannot.
pub(crate) fn open_backend_with(
    name: &str,
    options: moe_backends::BackendOptions,
) -> Result<Box<dyn moe_core::Backend>, CliError> {
    let kind =
        moe_backends::BackendKind::parse(name).map_err(|e| CliError::Usage(e.to_string()))?;
    moe_backends::open_with(kind, options).map_err(|e| CliError::Usage(e.to_string()))
}

/// Runs the `moe` command line with the routers of `registry`, reading `std::env::args`. Prints errors as one
/// line on stderr; returns exit code 0 on success, 2 for usage errors, 1 otherwise. A closed output pipe
/// (`moe list | head`) ends the process quietly, as it does other Unix tools, instead of a panic in `println!`.
pub fn run(registry: RouterRegistry) -> ExitCode {
    restore_sigpipe();
    run_from(registry, std::env::args_os())
}

/// Gives SIGPIPE back its default action (end the process), which the Rust runtime sets to ignore.
#[cfg(unix)]
#[allow(
    unsafe_code,
    reason = "libc::signal has no safe wrapper; called once before any thread starts"
)]
fn restore_sigpipe() {
    // SAFETY: called at the start of the process, before any thread is spawned; `signal` with SIG_DFL installs
    // no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}

/// [`run`] with explicit arguments (the first is the program name).
pub fn run_from<I, T>(registry: RouterRegistry, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with code 0; real parse errors print clap's message with code 2.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Compare(a) => compare::run(&registry, &a),
        Command::Route(a) => route::run(&registry, &a),
        Command::Bench(a) => bench::run(&registry, &a),
        Command::List(a) => list::run(&registry, &a),
        Command::Verify(a) => verify::run(&a),
        Command::Inspect(a) => inspect::run(&a),
        Command::Train(a) => train::run(&registry, &a),
        Command::CacheSim(a) => cache_sim::run(&a),
        Command::EpCost(a) => ep_cost::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(msg)) => {
            eprintln!("error: {}", output::escape_control(&msg));
            ExitCode::from(EXIT_USAGE)
        }
        Err(CliError::Other(e)) => {
            eprintln!("error: {}", output::escape_control(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
