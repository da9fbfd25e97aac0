//! vmbeamctl: control vmbeam.ko.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod l1;
mod migrate;
mod regions;
mod rejuvenate;
mod report;
mod status;
mod trace;

#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the module's uAPI version and counters, and the L1s named.
    Status(status::Args),
    /// List the regions of the L2 VMs on the L1s named.
    Regions(regions::Args),
    /// Move every L2 VM from an aged L1 to a clean one without copying
    /// their memory; report pages moved, bytes copied and downtime.
    MigrateAll(migrate::Args),
    /// Real L1 hypervisors (QEMU at L0): boot one, start L2s in it.
    #[command(subcommand)]
    L1(l1::cli::Command),
    /// Boot a clean L1 shaped like the aged one, move every L2 into it
    /// without copying their memory, shut the aged L1 down.
    Rejuvenate(rejuvenate::RejuvenateArgs),
    /// Count and time page faults (vmbeam regions, KVM stage-2, user) and
    /// guest entries with eBPF, per process and thread, until Ctrl-C.
    Trace(trace::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse(); // exits 2 on a usage error
    let result = match cli.command {
        Command::Status(args) => status::run(&args),
        Command::Regions(args) => regions::run(&args),
        Command::MigrateAll(args) => return migrate::run(&args),
        Command::L1(cmd) => l1::cli::run(&cmd),
        Command::Rejuvenate(args) => return rejuvenate::rejuvenate(&args),
        Command::Trace(args) => trace::run(&args),
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
    fn migrate_all_needs_both_sockets() {
        let err = Cli::try_parse_from(["vmbeamctl", "migrate-all", "--from", "/a"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let cli =
            Cli::try_parse_from(["vmbeamctl", "migrate-all", "--from", "/a", "--to", "/b", "--dry-run", "--json"]);
        assert!(matches!(cli.unwrap().command, Command::MigrateAll(a) if a.dry_run && a.json && a.timeout_s == 60));
    }

    #[test]
    fn a_zero_timeout_is_a_usage_error() {
        let err = Cli::try_parse_from(["vmbeamctl", "migrate-all", "--from", "/a", "--to", "/b", "--timeout-s", "0"]);
        assert_eq!(err.unwrap_err().exit_code(), 2);
    }

    #[test]
    fn unknown_subcommand_is_a_usage_error() {
        let err = Cli::try_parse_from(["vmbeamctl", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
