//! vmbeamctl: control vmbeam.ko.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod status;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the module's uAPI version and counters.
    Status(status::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on a usage error
    let result = match cli.command {
        Command::Status(args) => status::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("vmbeamctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn status_json_flag_parses() {
        let cli = Cli::try_parse_from(["vmbeamctl", "status", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Status(_)));
    }

    #[test]
    fn unknown_subcommand_is_a_usage_error() {
        let err = Cli::try_parse_from(["vmbeamctl", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
