//! What every end-to-end test of the `moe` binary shares: running it and reading its output.

#![allow(
    dead_code,
    reason = "each test file uses its own subset of these helpers"
)]

use std::process::{Command, Output};

/// Runs the `moe` binary built for this test run with `args`.
pub fn moe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .output()
        .expect("the moe binary runs")
}

/// Its standard output, as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
