//! The `moe` binary: the built-in routers, run through [`moe_cli::run`].

fn main() -> std::process::ExitCode {
    moe_cli::run(moe_routers::builtin())
}
