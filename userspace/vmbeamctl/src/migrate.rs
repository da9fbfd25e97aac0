//! `vmbeamctl migrate-all`: move every L2 VM from an aged L1 hypervisor to
//! a clean one, handing over their memory instead of copying it. The flow
//! is the same for both kinds of L1 (`crate::l1::Pair`: the lab L1, or a
//! real one named by its QMP socket); steps, and what a failure at each
//! leaves behind:
//!
//! | step     | what happens                                    | on failure                          |
//! |----------|-------------------------------------------------|-------------------------------------|
//! | plan     | query both L1s, place every L2                   | nothing changed                     |
//! | prepare  | ready the clean side out of the downtime (real: the receiving L2 QEMUs start, `-incoming defer`; lab: the region fds are lent and staged) | what it started goes |
//! | pause    | the aged L1 stops the L2s (lab: and writes each one's registers into its window) | L2s resumed on the aged L1 |
//! | send     | the aged L1 hands over what moves besides memory; the clean L1 holds it (lab: nothing left) | L2s resumed on the aged L1 |
//! | transfer | the memory moves at L0 (lab: one `VMBEAM_TRANSFER_BATCH`; real: `VMBEAM_GATHER_INTO` into windows plugged ahead) | all or nothing: resumed on the aged |
//! | receive  | the clean L1 takes the L2s and resumes them      | memory moved back, resumed on the aged |
//! | verify   | a full workload pass on the clean L1, the aged L1 denied, same page frames | reported |
//!
//! If vmbeamctl itself dies, the L1s settle without it: the lab L1 that
//! owns an L2's region runs it (the aged one resumes what it still owns,
//! the clean one starts what it staged and now owns); real L1s cannot ask
//! the module, so a witness process at L0 reads it for them and settles
//! each L2 from a journal (`l1::qemu::journal`). Either way the memory
//! move is the one commit point and no single death leaves an L2 without a
//! hypervisor (README, "Kill points").
//!
//! Downtime of an L2 is measured, not estimated: from the moment it
//! stopped on the aged L1 to its first instruction on the clean L1, both
//! CLOCK_MONOTONIC stamps in L0's clock (how each kind takes them: its
//! `Pair` implementation).

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    l1::{self, lab::LabPair, monotonic_ns, qemu::QemuPair, Pair},
    report::{self, ModuleDelta, Report},
    trace::MigrationTrace,
};
use vmbeam_probes::Phase;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The aged L1 (the L2 VMs leave it): a lab L1's control socket, or a
    /// real L1's QMP socket.
    #[arg(long, value_name = "AGED_SOCKET")]
    pub from: PathBuf,
    /// The clean L1 (the L2 VMs move in), of the same kind.
    #[arg(long, value_name = "CLEAN_SOCKET")]
    pub to: PathBuf,
    /// Print the plan and check it; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Roll back (every L2 resumed on the aged L1) unless the transfer can
    /// start within this many seconds; also bounds every reply.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,
    /// Roll back instead of transferring if the L2s have already been
    /// paused this long when the transfer would start (the last moment a
    /// rollback costs nothing).
    #[arg(long, value_name = "MS")]
    pub downtime_ms: Option<u64>,
    /// Skip the checks after the move (a full verified workload pass on the
    /// clean L1, the aged L1 denied every page, same page frames).
    #[arg(long)]
    pub no_verify: bool,
    /// Attach eBPF probes to both L1 processes for the migration: each
    /// L2's downtime as the kernel saw it (its vCPU's last guest exit on
    /// the aged L1 to its first guest entry on the clean one) and the page
    /// faults of its vCPUs before, during and after the move, added to the
    /// report. Needs root and a kernel with BTF.
    #[arg(long)]
    pub trace: bool,
    /// Real L1s: after an L2 on ordinary memory is gathered out of the aged
    /// L1's RAM, leave its frames there empty instead of filling them with
    /// fresh zeroed pages. Saves that much memory at L0, but the aged L1
    /// must then never run on (its moved L2 QEMUs are kept stopped, and it
    /// must be destroyed, as `rejuvenate --gather-holes` does).
    #[arg(long)]
    pub gather_holes: bool,
    /// Real L1s: send the L2s' saved states over the agents' virtio-serial
    /// links, as between L1s without state windows, instead of moving them
    /// with the pages through the L1s' state windows (to compare).
    #[arg(long)]
    pub states_over_link: bool,
    /// Move the L2s one at a time, each in a migration of its own (its own
    /// pause, transfer and commit point), in the order the aged L1 lists
    /// them. An L2's downtime is then its own save and load, not those of
    /// every L2 in turn on the L1s' vCPUs; the whole takes longer. Each
    /// L2's move is all or nothing: if one fails, it resumes on the aged
    /// L1, the ones before it stay moved and the rest are not tried (the
    /// error names which moved).
    #[arg(long, conflicts_with = "trace")]
    pub one_at_a_time: bool,
    /// Testing: spoil the aged agent's frame list of each L2 on ordinary
    /// memory this way, as a faulty or hostile L1 might.
    #[arg(long, hide = true, value_enum)]
    pub corrupt_frames: Option<crate::l1::qemu::gather::Corruption>,
    /// Testing: SIGSTOP ourselves after this step.
    #[arg(long, hide = true, value_enum)]
    pub stop_at: Option<Step>,
    /// Testing: fail right after this step, as if it had failed.
    #[arg(long, hide = true, value_enum)]
    pub inject_failure: Option<Step>,
}

impl Args {
    /// What the real-L1 gather path is told.
    pub fn gather_options(&self) -> crate::l1::qemu::gather::Options {
        crate::l1::qemu::gather::Options {
            holes: self.gather_holes,
            states_over_link: self.states_over_link,
            corrupt: self.corrupt_frames,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Plan,
    Prepare,
    Pause,
    Send,
    Transfer,
    Receive,
    Verify,
}

pub fn run(args: &Args) -> ExitCode {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut m = Migration::new(args);
    let connected: Result<Box<dyn Pair>> = if l1::is_qmp(&args.from) {
        QemuPair::connect(&args.from, &args.to, timeout, args.gather_options()).map(|p| Box::new(p) as Box<dyn Pair>)
    } else {
        LabPair::connect(&args.from, &args.to, timeout).map(|p| Box::new(p) as Box<dyn Pair>)
    };
    let result = connected.and_then(|mut pair| m.run(pair.as_mut()));
    finish(m, result, args.json)
}

/// Prints the report; the exit status.
pub fn finish(mut m: Migration<'_>, result: Result<()>, json: bool) -> ExitCode {
    if let Err(e) = result {
        m.report.ok = false;
        m.report.error = Some(format!("{e:#}"));
    }
    if let Some(trace) = m.trace.take() {
        if let Err(e) = trace.finish(&mut m.report) {
            m.report.warnings.push(format!("--trace: {e:#}"));
        }
    }
    m.close_step();
    m.progress.finish_and_clear();
    report::print(&mut m.report, json);
    if m.report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One migration: the flow, its hooks and its report.
pub struct Migration<'a> {
    args: &'a Args,
    pub report: Report,
    progress: ProgressBar,
    step: Step,
    step_started: Instant,
    trace: Option<MigrationTrace>,
}

impl<'a> Migration<'a> {
    pub fn new(args: &'a Args) -> Self {
        let progress = if std::io::stderr().is_terminal() && !args.json {
            let bar = ProgressBar::new(7);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        } else {
            ProgressBar::hidden()
        };
        let report = Report { dry_run: args.dry_run, failed_step: Some(Step::Plan), ..Default::default() };
        Self { args, report, progress, step: Step::Plan, step_started: Instant::now(), trace: None }
    }

    fn enter(&mut self, step: Step, what: &str) {
        self.close_step();
        self.step = step;
        self.report.failed_step = Some(step);
        self.progress.set_message(what.to_string());
        self.progress.inc(1);
    }

    /// Adds the time since the current step began to its phase time.
    fn close_step(&mut self) {
        let now = Instant::now();
        let took = ms(now - std::mem::replace(&mut self.step_started, now));
        self.report.add_phase(self.step, took);
    }

    /// The testing hooks after `step`.
    fn after(&self, step: Step) -> Result<()> {
        if self.args.stop_at == Some(step) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
        ensure!(self.args.inject_failure != Some(step), "injected failure after {step:?} (--inject-failure)");
        Ok(())
    }

    /// The flow (see the module doc): the same for every kind of L1; with
    /// `--one-at-a-time`, once per L2.
    pub fn run(&mut self, pair: &mut dyn Pair) -> Result<()> {
        if self.args.one_at_a_time {
            self.run_one_at_a_time(pair)
        } else {
            self.run_once(pair, None)
        }
    }

    /// Plans the whole move (changing nothing), then moves each planned L2
    /// in a migration of its own; the report holds them all.
    fn run_one_at_a_time(&mut self, pair: &mut dyn Pair) -> Result<()> {
        let started = Instant::now();
        if !self.plan(pair, None)? {
            return Ok(());
        }
        // Each migration plans its own L2 again (and reports it); what the
        // others skipped is in this plan's list already.
        let names: Vec<String> = self.report.l2.drain(..).map(|l| l.name).collect();
        self.progress.set_length(7 * names.len() as u64);
        let dev = vmbeam::Device::open()?;
        let stats_before = dev.stats()?;
        let mut moved: Vec<&str> = Vec::new();
        let mut result = Ok(());
        for name in &names {
            let whole = std::mem::take(&mut self.report);
            let one_result = self.run_once(pair, Some(name));
            let one = std::mem::replace(&mut self.report, whole);
            self.report.absorb(one);
            if let Err(e) = one_result {
                result = Err(e.context(match moved.is_empty() {
                    true => format!("moving {name}, the first of {} L2s one at a time", names.len()),
                    false => format!("moving {name} (moved before it, one at a time: {})", moved.join(", ")),
                }));
                break;
            }
            moved.push(name);
        }
        // Over every migration, also when one failed.
        self.note_downtime();
        self.note_totals(&dev, &stats_before, started)?;
        result?;
        self.report.failed_step = None;
        self.report.ok = true;
        Ok(())
    }

    /// One migration: every L2 the plan places, or `only` that one.
    fn run_once(&mut self, pair: &mut dyn Pair, only: Option<&str>) -> Result<()> {
        let started = Instant::now();
        let timeout = Duration::from_secs(self.args.timeout_s);
        let deadline = started + timeout;
        let dev = vmbeam::Device::open()?;
        if !self.plan(pair, only)? {
            return Ok(());
        }
        if self.args.trace {
            let pids = [&self.report.from, &self.report.to].into_iter().flatten().map(|e| e.pid).collect();
            self.trace = Some(MigrationTrace::attach(pids)?);
        }
        let stats_before = dev.stats()?;
        self.enter(Step::Prepare, "readying the clean L1");
        if let Err(e) = pair.prepare(&mut self.report).and_then(|()| self.after(Step::Prepare)) {
            return Err(self.resume_on_aged(pair, e));
        }

        // Before the memory moves every failure resumes the L2s where they were.
        self.enter(Step::Pause, "pausing the L2 VMs on the aged L1");
        self.set_trace_phase(Phase::During);
        let stopped = pair.pause(&mut self.report).and_then(|()| {
            self.after(Step::Pause)?;
            self.enter(Step::Send, "taking what moves besides memory");
            pair.send(&mut self.report)?;
            self.after(Step::Send)?;
            self.check_budget(deadline)
        });
        if let Err(e) = stopped {
            return Err(self.resume_on_aged(pair, e));
        }

        self.enter(Step::Transfer, "moving the memory at L0");
        if let Err(e) = pair.move_memory(&mut self.report) {
            return Err(self.resume_on_aged(pair, e));
        }
        if let Err(e) = self.after(Step::Transfer) {
            return Err(self.move_back(pair, e));
        }

        self.enter(Step::Receive, "resuming on the clean L1");
        if let Err(e) = pair.receive(&mut self.report) {
            return Err(self.move_back(pair, e));
        }
        self.report.committed = true;
        // The clean L1 has started them: what follows is "after".
        self.set_trace_phase(Phase::After);
        self.after(Step::Receive)?;

        self.enter(Step::Verify, "verifying on the clean L1");
        let verified = pair.verify(&mut self.report, !self.args.no_verify, Instant::now() + timeout);
        self.note_downtime();
        verified?;
        pair.retire(&mut self.report);
        self.note_totals(&dev, &stats_before, started)?;
        self.report.failed_step = None;
        self.report.ok = true;
        Ok(())
    }

    /// The plan step (every L2, or `only` that one). False when nothing is
    /// left to do: a dry run, or nothing to move (the report then says ok).
    fn plan(&mut self, pair: &mut dyn Pair, only: Option<&str>) -> Result<bool> {
        self.enter(Step::Plan, "planning");
        pair.plan(&mut self.report, only)?;
        self.after(Step::Plan)?;
        if self.args.dry_run || self.report.l2.is_empty() {
            self.report.failed_step = None;
            self.report.ok = true;
            return Ok(false);
        }
        Ok(true)
    }

    /// The module's counters since `before`, and the wall time since
    /// `started`, into the report's totals.
    fn note_totals(&mut self, dev: &vmbeam::Device, before: &vmbeam::Stats, started: Instant) -> Result<()> {
        let after = dev.stats()?;
        self.report.module = Some(ModuleDelta::between(before, &after));
        self.report.totals.bytes_copied = Some(after.bytes_copied - before.bytes_copied);
        self.report.totals.wall_ms = Some(ms(started.elapsed()));
        Ok(())
    }

    fn set_trace_phase(&mut self, phase: Phase) {
        if let Some(t) = &mut self.trace {
            t.phase(phase);
        }
    }

    fn check_budget(&self, deadline: Instant) -> Result<()> {
        ensure!(Instant::now() < deadline, "--timeout-s {} reached before the transfer", self.args.timeout_s);
        if let Some(budget) = self.args.downtime_ms {
            let first = self.report.l2.iter().map(|l| l.paused_at_ns).min().unwrap_or(0);
            let paused_ms = (monotonic_ns().saturating_sub(first)) as f64 / 1e6;
            ensure!(
                paused_ms <= budget as f64,
                "the L2s have been paused {paused_ms:.1} ms, over --downtime-ms {budget}, before the transfer"
            );
        }
        Ok(())
    }

    fn note_downtime(&mut self) {
        for l in &mut self.report.l2 {
            l.downtime_ms = l.resumed_at_ns.map(|r| r.saturating_sub(l.paused_at_ns) as f64 / 1e6);
        }
        let downs: Vec<f64> = self.report.l2.iter().filter_map(|l| l.downtime_ms).collect();
        self.report.totals.downtime_ms_max = downs.iter().copied().reduce(f64::max);
        self.report.totals.downtime_ms_mean =
            (!downs.is_empty()).then(|| downs.iter().sum::<f64>() / downs.len() as f64);
    }

    /// Before the memory moved: resume every L2 on the aged L1.
    fn resume_on_aged(&mut self, pair: &mut dyn Pair, cause: anyhow::Error) -> anyhow::Error {
        self.progress.set_message("rolling back: resuming on the aged L1");
        let aged = self.report.from.as_ref().map_or_else(|| "the aged L1".into(), |e| e.name.clone());
        match pair.resume_aged(&mut self.report) {
            Ok(n) => {
                self.report.rolled_back = Some(format!("{n} L2 VMs resumed on {aged}"));
                cause
            }
            Err(e) => cause.context(format!("and the rollback failed too: {e:#}")),
        }
    }

    /// After the memory moved: move it back, then resume on the aged L1.
    fn move_back(&mut self, pair: &mut dyn Pair, cause: anyhow::Error) -> anyhow::Error {
        self.progress.set_message("rolling back: moving the memory back");
        pair.move_back(&mut self.report);
        self.resume_on_aged(pair, cause)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
