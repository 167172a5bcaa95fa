//! `moe-custom`: the whole `moe` CLI with the plugin router registered beside the built-ins.

fn main() -> std::process::ExitCode {
    let mut registry = moe_routers::builtin();
    if let Err(e) = custom_router::register(&mut registry) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    moe_cli::run(registry)
}
