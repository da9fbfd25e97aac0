//! `vmbeamctl trace` and `migrate-all --trace`: the eBPF probes of
//! `vmbeam-probes` (page faults on regions, KVM stage-2 faults, user page
//! faults, guest entries and exits), attached for a while or for a
//! migration.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::sys::signal::{self, SigHandler, Signal};
use serde::Serialize;
use vmbeam_probes::{Faults, Options, Phase, Probes, Summary};

use crate::report::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trace only this process (a VMM, a lab L1, an L1's QEMU); repeat for
    /// more. Every process when none is given.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Stop after this many seconds; without it, at Ctrl-C.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Print what was gathered as one JSON object.
    #[arg(long)]
    pub json: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn run(args: &Args) -> Result<()> {
    // Before the probes load (seconds under TCG): a Ctrl-C meanwhile ends
    // the trace once they are in, and still prints what they saw.
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        signal::signal(Signal::SIGINT, SigHandler::Handler(on_interrupt))?;
        signal::signal(Signal::SIGTERM, SigHandler::Handler(on_interrupt))?;
    }
    let probes = Probes::attach(&Options { pids: args.pids.clone() }).context("vmbeamctl trace")?;
    // On stderr even with --json: it says when tracing began.
    let whom = if args.pids.is_empty() { "every process".to_string() } else { format!("pids {:?}", args.pids) };
    let until = args.duration.map_or("Ctrl-C".to_string(), |s| format!("{s} s or Ctrl-C"));
    eprintln!("Tracing page faults and guest entries of {whom} until {until}.");
    let deadline = args.duration.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    while !INTERRUPTED.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = Summary::gather(&probes)?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    Ok(())
}

/// What the probes saw of one L2 in a migration.
#[derive(Debug, Default, Serialize)]
pub struct L2Trace {
    /// Last guest exit of its vCPU on the aged L1 before the transfer to
    /// the first guest entry of its vCPU on the clean L1 after it.
    pub downtime_ms: Option<f64>,
    /// Those two moments (CLOCK_MONOTONIC ns, the clock of `paused_at_ns`
    /// and `resumed_at_ns`): each comes before the userspace stamp.
    pub last_guest_exit_ns: Option<u64>,
    pub first_guest_entry_ns: Option<u64>,
    pub from_vcpu_tid: Option<u32>,
    pub to_vcpu_tid: Option<u32>,
    /// Faults taken by its two vCPU threads (region faults, KVM stage-2
    /// faults, user faults), by phase.
    pub faults: Faults,
}

/// The probes attached around one migration.
pub struct MigrationTrace {
    probes: Probes,
}

impl MigrationTrace {
    /// Attaches to both L1 processes.
    pub fn attach(pids: Vec<u32>) -> Result<Self> {
        let probes = Probes::attach(&Options { pids }).context("--trace")?;
        Ok(Self { probes })
    }

    pub fn phase(&mut self, phase: Phase) {
        self.probes.set_phase(phase);
    }

    /// Adds what the probes saw to the report: per L2, and the whole.
    pub fn finish(self, report: &mut Report) -> Result<()> {
        let summary = Summary::gather(&self.probes)?;
        for l in &mut report.l2 {
            let mut t = L2Trace { from_vcpu_tid: l.from_vcpu_tid, to_vcpu_tid: l.to_vcpu_tid, ..Default::default() };
            if let (Some(old), Some(new)) = (l.from_vcpu_tid, l.to_vcpu_tid) {
                t.downtime_ms = summary.downtime_ms(old, new);
            }
            t.last_guest_exit_ns = l.from_vcpu_tid.and_then(|tid| summary.thread(tid)?.last_exit_before_move_ns);
            t.first_guest_entry_ns = l.to_vcpu_tid.and_then(|tid| summary.thread(tid)?.first_entry_after_move_ns);
            for thread in [l.from_vcpu_tid, l.to_vcpu_tid].into_iter().flatten().filter_map(|tid| summary.thread(tid)) {
                for (kind, by_phase) in &thread.faults {
                    for (phase, h) in by_phase {
                        t.faults.entry(*kind).or_default().entry(*phase).or_default().merge(h);
                    }
                }
            }
            l.trace = Some(t);
        }
        report.trace = Some(summary);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::Args,
    }

    #[test]
    fn pids_repeat_and_duration_is_seconds() {
        let cli = Cli::try_parse_from(["t", "--pid", "1", "--pid", "22", "--duration", "0.5", "--json"]).unwrap();
        assert_eq!(cli.args.pids, [1, 22]);
        assert_eq!(cli.args.duration, Some(0.5));
        assert!(cli.args.json);
        assert!(Cli::try_parse_from(["t", "--pid", "x"]).is_err());
    }
}
