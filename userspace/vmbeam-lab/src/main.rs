//! vmbeam-lab: a lab L1 hypervisor for vmbeam.
//!
//! One KVM VM stands where an L1's QEMU would. Its RAM and each of its L2
//! VMs' memory are vmbeam regions; each L2 is a window of the L1's
//! guest-physical space and a vCPU running a workload that verifies and
//! rewrites every dword of the window, pass after pass, so a pause, a move
//! and a resume are observable and any lost or changed byte is caught.
//! `vmbeamctl` drives it over a control socket (see `vmbeam::control`).
//!
//! ```text
//! vmbeam-lab --socket /run/aged.sock --name aged --l2 4 --l2-size 64M &
//! vmbeam-lab --socket /run/clean.sock --name clean --l2 0 &
//! vmbeamctl migrate-all --from /run/aged.sock --to /run/clean.sock
//! ```

use std::{os::unix::net::UnixListener, path::PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use vmbeam_lab::{l1, probe, server};

#[derive(Debug, Parser)]
#[command(version, about = "A lab L1 hypervisor whose RAM and L2 VMs live in vmbeam regions")]
struct Cli {
    /// Control socket to listen on (newline-delimited JSON, QMP style).
    #[arg(long)]
    socket: PathBuf,
    /// Name of this L1 in reports; its L2s are named NAME-vm0, NAME-vm1, …
    #[arg(long, default_value = "lab")]
    name: String,
    /// L2 VMs to start with.
    #[arg(long = "l2", default_value_t = 0)]
    l2_count: usize,
    /// Memory of each L2 (K, M or G suffix).
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    l2_size: u64,
    /// Create the L2 windows with VMBEAM_CREATE_HUGE: 2 MiB blocks mapped
    /// by PMD, and so by KVM with 2 MiB stage-2 entries. Their frames are
    /// not in /proc/PID/pagemap, so migrate-all cannot compare them.
    #[arg(long)]
    huge: bool,
    /// The L1's own RAM (holds the workload code).
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    ram_size: u64,
}

/// "64M" → 64 MiB; a plain number is bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.trim().chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64M, 1G)"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s} is too large"))
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    probe::install_handlers().context("signal handlers")?;
    let mut l1 = l1::L1::new(cli.name.clone(), cli.ram_size)?;
    l1.huge_windows = cli.huge;
    for i in 0..cli.l2_count {
        l1.add_l2(format!("{}-vm{i}", cli.name), cli.l2_size).with_context(|| format!("starting L2 {i}"))?;
    }
    let listener = listen(&cli.socket)?;
    tracing::info!(socket = %cli.socket.display(), l2 = cli.l2_count, l2_size = cli.l2_size, "lab L1 {} ready", cli.name);
    let served = server::serve(listener, l1);
    let _ = std::fs::remove_file(&cli.socket);
    served
}

/// Binds the socket; a stale socket file (nobody listening) is replaced.
fn listen(path: &PathBuf) -> Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running server", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
