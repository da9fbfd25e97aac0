//! The two kinds of L1 hypervisor `migrate-all` moves L2s between, behind
//! one trait: the lab L1 ([`lab`], `vmbeam-lab`) and a real L1 ([`qemu`]:
//! Linux + KVM + QEMU run by a QEMU at L0, driven through QMP and the
//! in-L1 agent). The flow, its rollback rules, its testing hooks and its
//! report live once, in `crate::migrate`; an implementation says how each
//! step is done for its kind.

use std::{path::Path, time::Instant};

use anyhow::Result;

use crate::report::Report;

pub mod cli;
pub mod lab;
pub mod qemu;

/// An aged and a clean L1 of one kind, connected, with the migration's
/// state between the steps. Every step fills its part of the report.
pub trait Pair {
    /// Queries both L1s and places every L2 that can move (with `only`,
    /// that one alone): the report's endpoints, its rows and its skipped
    /// list. Changes nothing. A pair may run several migrations in turn
    /// (`--one-at-a-time`): each begins here, afresh.
    fn plan(&mut self, report: &mut Report, only: Option<&str>) -> Result<()>;
    /// Out of the downtime: readies the clean side for what comes.
    fn prepare(&mut self, report: &mut Report) -> Result<()>;
    /// Stops every planned L2 on the aged L1; its row gets `paused_at_ns`.
    fn pause(&mut self, report: &mut Report) -> Result<()>;
    /// Takes from the aged L1 what moves besides memory.
    fn send(&mut self, report: &mut Report) -> Result<()>;
    /// Moves the L2s' memory at L0, all or nothing.
    fn move_memory(&mut self, report: &mut Report) -> Result<()>;
    /// Starts the L2s on the clean L1; their rows get `resumed_at_ns` when
    /// known here.
    fn receive(&mut self, report: &mut Report) -> Result<()>;
    /// Waits for the first instruction of every L2 on the clean L1 and,
    /// with `full`, for a verified workload pass; compares page frames and
    /// checks the aged L1 can reach nothing. Fills the rows.
    fn verify(&mut self, report: &mut Report, full: bool, deadline: Instant) -> Result<()>;
    /// After a move: the aged L1's stopped copies never run again.
    fn retire(&mut self, report: &mut Report);
    /// Rollback after `move_memory`: the memory goes back to the aged L1.
    fn move_back(&mut self, report: &mut Report);
    /// Rollback: every stopped L2 runs again on the aged L1 (and whatever
    /// `prepare` started on the clean one goes). Returns how many resumed.
    fn resume_aged(&mut self, report: &mut Report) -> Result<usize>;
}

/// Whether `path` is a QEMU's QMP socket (a real L1) rather than a lab L1's
/// control socket: QMP greets with `{"QMP": ...}`.
pub fn is_qmp(path: &Path) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(s) = std::os::unix::net::UnixStream::connect(path) else { return false };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.trim_start().starts_with("{\"QMP\"")
}

/// CLOCK_MONOTONIC in ns: every L0-side stamp of a migration.
pub use vmbeam::clock::monotonic_ns;
