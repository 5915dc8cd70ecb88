//! `mqplug`: parses its arguments, sets up logging and runs the command
//! (each in the library's [`mqplug::cli`]).

use clap::Parser;
use mqplug::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("MQPLUG_LOG")
        .unwrap_or_else(|_| EnvFilter::new(cli.command.default_log_filter()));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    let error_code = cli.command.error_code();
    match mqplug::cli::execute(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            error_code
        }
    }
}
