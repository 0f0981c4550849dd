//! The `vellum` command line: scoring, generation, model inspection and conversion.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // RUST_LOG-style filters (e.g. RUST_LOG=info, RUST_LOG=vellum_engine=debug); warnings by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
