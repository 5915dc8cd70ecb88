//! `mqplug`: parses its arguments, sets up logging and runs the command
//! (each in the library's [`mqplug::cli`]).

use clap::Parser;
use mqplug::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    mqplug::cli::logging::init(&cli);
    let error_code = cli.command.error_code();
    match mqplug::cli::execute(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            error_code
        }
    }
}
