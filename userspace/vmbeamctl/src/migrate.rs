//! `vmbeamctl migrate-all`: move every L2 VM from an aged L1 hypervisor to
//! a clean one, handing over their memory instead of copying it.
//!
//! Steps, and what a failure at each leaves behind:
//!
//! | step     | what happens                                    | on failure                          |
//! |----------|-------------------------------------------------|-------------------------------------|
//! | plan     | query both L1s, place every L2's window          | nothing changed                     |
//! | pause    | the aged L1 stops the L2s' vCPUs                 | L2s resumed on the aged L1          |
//! | send     | the aged L1 hands over region fds + vCPU state   | L2s resumed on the aged L1          |
//! | transfer | one `VMBEAM_TRANSFER_BATCH`: revoke, then grant  | all or nothing: resumed on the aged |
//! | receive  | the clean L1 maps the regions, resumes the L2s   | regions transferred back, resumed on the aged |
//! | verify   | a full workload pass on the clean L1, the aged L1 denied, same page frames | reported |
//!
//! Downtime of an L2 is measured, not estimated: from the moment its vCPU
//! stopped on the aged L1 to its first guest instruction on the clean L1,
//! both CLOCK_MONOTONIC stamps taken by the L1s in the same kernel.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vmbeam::control::{
    Client, CodecError, ControlError, Handoff, L1Status, L2Info, L2State, Paused, Probe, ReceiveArgs, Selection, Sent,
    Window,
};

use crate::report::{self, Endpoint, L2Report, ModuleDelta, Report};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Control socket of the aged L1 (the L2 VMs leave it).
    #[arg(long, value_name = "AGED_SOCKET")]
    pub from: PathBuf,
    /// Control socket of the clean L1 (the L2 VMs move in).
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
    /// Testing: SIGSTOP ourselves after this step.
    #[arg(long, hide = true, value_enum)]
    pub stop_at: Option<Step>,
    /// Testing: fail right after this step, as if it had failed.
    #[arg(long, hide = true, value_enum)]
    pub inject_failure: Option<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Plan,
    Pause,
    Send,
    Transfer,
    Receive,
    Verify,
}

pub fn run(args: &Args) -> ExitCode {
    if crate::nested::is_qmp(&args.from) {
        return run_nested(args);
    }
    let mut m = Migration::new(args);
    if let Err(e) = m.run() {
        m.report.ok = false;
        m.report.error = Some(format!("{e:#}"));
    }
    m.close_step();
    m.progress.finish_and_clear();
    report::print(&mut m.report, args.json);
    if m.report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Both L1s are real (QEMU's QMP sockets named): `crate::nested`.
fn run_nested(args: &Args) -> ExitCode {
    let mut report = Report::default();
    let timeout = Duration::from_secs(args.timeout_s);
    let result = (|| {
        let mut aged = crate::qemu_l1::QemuL1::connect(&args.from, timeout).context("the aged L1 (--from)")?;
        let mut clean = crate::qemu_l1::QemuL1::connect(&args.to, timeout).context("the clean L1 (--to)")?;
        ensure!(aged.pid != clean.pid, "--from and --to are the same L1 (pid {})", aged.pid);
        let flags = crate::nested::Flags {
            dry_run: args.dry_run,
            timeout,
            inject_failure: args.inject_failure,
            report: &mut report,
        };
        crate::nested::migrate(&mut aged, &mut clean, flags)
    })();
    if let Err(e) = result {
        report.ok = false;
        report.error = Some(format!("{e:#}"));
    }
    report::print(&mut report, args.json);
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct Moving {
    info: L2Info,
    target: Window,
    /// Page frames on the aged L1, read before the pause.
    frames: Option<Vec<u64>>,
}

struct Migration<'a> {
    args: &'a Args,
    report: Report,
    progress: ProgressBar,
    step: Step,
    step_started: Instant,
}

impl<'a> Migration<'a> {
    fn new(args: &'a Args) -> Self {
        let progress = if std::io::stderr().is_terminal() && !args.json {
            let bar = ProgressBar::new(6);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        } else {
            ProgressBar::hidden()
        };
        let report = Report { dry_run: args.dry_run, ..Default::default() };
        Self { args, report, progress, step: Step::Plan, step_started: Instant::now() }
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
        match self.report.phases_ms.iter_mut().find(|(s, _)| *s == self.step) {
            Some((_, t)) => *t += took,
            None => self.report.phases_ms.push((self.step, took)),
        }
    }

    /// The testing hooks after `step`.
    fn after(&self, step: Step) -> Result<()> {
        if self.args.stop_at == Some(step) {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        }
        ensure!(self.args.inject_failure != Some(step), "injected failure after {step:?} (--inject-failure)");
        Ok(())
    }

    fn run(&mut self) -> Result<()> {
        let started = Instant::now();
        let timeout = Duration::from_secs(self.args.timeout_s);
        let deadline = started + timeout;
        self.enter(Step::Plan, "planning");
        let dev = vmbeam::Device::open()?;
        let api = dev.api_version().context("reading the module's uAPI version")?;
        let mut aged = Client::connect(&self.args.from, timeout)?;
        let mut clean = Client::connect(&self.args.to, timeout)?;
        self.report.from = Some(Endpoint::of(&aged));
        self.report.to = Some(Endpoint::of(&clean));
        ensure!(aged.server().pid != clean.server().pid, "--from and --to are the same L1 (pid {})", aged.server().pid);
        let aged_status: L1Status = aged.call("query-status", ())?;
        let clean_status: L1Status = clean.call("query-status", ())?;
        for s in [&aged_status, &clean_status] {
            ensure!(s.api_version == api, "{} runs against vmbeam uAPI {}, the module is {api}", s.name, s.api_version);
        }
        let vms: Vec<L2Info> = aged.call("query-vms", ())?;
        let mut moving = plan(&vms, &clean_status, &mut self.report)?;
        self.after(Step::Plan)?;
        if self.args.dry_run {
            self.report.failed_step = None;
            self.report.ok = true;
            return Ok(());
        }
        if moving.is_empty() {
            self.report.failed_step = None;
            self.report.ok = true;
            self.report.warnings.push(format!("{} has no L2 VM to move", aged_status.name));
            return Ok(());
        }
        for m in &mut moving {
            m.frames = vmbeam::pagemap::frames(aged.server().pid, m.info.hva, m.info.window.size).ok();
        }
        let names: Vec<String> = moving.iter().map(|m| m.info.name.clone()).collect();
        let (_, mut clean_fds) = clean.call_with_fds::<serde_json::Value>("get-vm-fd", (), &[])?;
        let clean_vm = clean_fds.pop().ok_or_else(|| anyhow!("{}: get-vm-fd sent no fd", clean_status.name))?;
        let stats_before = dev.stats()?;

        // Before the grant phase every failure resumes the L2s where they were.
        self.enter(Step::Pause, "pausing the L2 VMs on the aged L1");
        let paused: Result<Vec<Paused>> = aged.call("pause", Selection::of(&names)).map_err(Into::into);
        let (sent, fds) = match paused.and_then(|p| {
            self.note_paused(&p);
            self.after(Step::Pause)?;
            self.enter(Step::Send, "taking the region fds and vCPU state");
            let (sent, fds): (Sent, Vec<OwnedFd>) = aged.call_with_fds("send-regions", Selection::of(&names), &[])?;
            ensure!(fds.len() == sent.vms.len() + 1, "send-regions: {} fds for {} L2s", fds.len(), sent.vms.len());
            self.after(Step::Send)?;
            self.check_budget(deadline)?;
            Ok((sent, fds))
        }) {
            Ok(got) => got,
            Err(e) => return Err(self.resume_on_aged(&mut aged, &names, e)),
        };

        self.enter(Step::Transfer, "transferring ownership (one batch)");
        let aged_vm = &fds[sent.vm_fd];
        let transfers: Vec<vmbeam::Transfer<'_>> = sent
            .vms
            .iter()
            .map(|h| vmbeam::Transfer { region: fds[h.fd].as_fd(), from_vm: aged_vm.as_fd(), to_vm: clean_vm.as_fd() })
            .collect();
        let t0 = Instant::now();
        let batch = dev.transfer_batch(&transfers);
        self.report.totals.transfer_ms = Some(ms(t0.elapsed()));
        if let Err(e) = batch {
            let orphaned = sent.vms.iter().all(|h| {
                fds[h.fd]
                    .try_clone()
                    .ok()
                    .map(vmbeam::Region::from_fd)
                    .is_some_and(|r| r.info().is_ok_and(|i| !i.owned))
            });
            if !orphaned {
                return Err(self.resume_on_aged(&mut aged, &names, anyhow!(e)));
            }
            // The aged L1 died after handing over its L2s: their regions have
            // no owner, and the clean L1 binds them as it receives them.
            self.report
                .warnings
                .push(format!("{e}: the aged L1 exited; its regions are ownerless and go to the clean L1"));
        }
        if let Err(e) = self.after(Step::Transfer) {
            return Err(self.transfer_back(&dev, &mut aged, &fds, &sent, &clean_vm, &names, e));
        }

        self.enter(Step::Receive, "mapping and resuming on the clean L1");
        let handoffs: Vec<Handoff> = sent
            .vms
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let target = moving.iter().find(|m| m.info.name == h.name).map(|m| m.target.gpa);
                Handoff { fd: i, target_gpa: target, ..h.clone() }
            })
            .collect();
        let region_fds: Vec<_> = sent.vms.iter().map(|h| fds[h.fd].as_fd()).collect();
        let received =
            clean.call_with_fds::<Vec<Window>>("receive-regions", ReceiveArgs { vms: handoffs }, &region_fds);
        if let Err(e) = received {
            return Err(self.transfer_back(&dev, &mut aged, &fds, &sent, &clean_vm, &names, e.into()));
        }
        self.report.committed = true;
        self.after(Step::Receive)?;

        self.enter(Step::Verify, "waiting for the first instruction on the clean L1");
        let resumed = wait_for(&mut clean, &names, deadline, |vm| vm.resumed_at_ns.is_some())?;
        self.note_resumed(&resumed);
        if !self.args.no_verify {
            self.progress.set_message("verifying: a full workload pass on the clean L1");
            let passes_at_pause: BTreeMap<String, u64> = sent.vms.iter().map(|h| (h.name.clone(), h.passes)).collect();
            let verify_deadline = Instant::now() + timeout;
            let after = wait_for(&mut clean, &names, verify_deadline, |vm| {
                vm.state != L2State::Running || vm.passes >= passes_at_pause[&vm.name] + 2
            })?;
            self.verify(&after, &moving, clean.server().pid)?;
            match aged.call::<Vec<Probe>>("probe", Selection::of(&names)) {
                Ok(probes) => self.verify_denied(&probes)?,
                // Its process exited mid-migration: no old owner is left.
                Err(ControlError::Codec { source: CodecError::Closed | CodecError::Truncated, .. }) => {
                    self.report.warnings.push("the aged L1 exited during the migration: nothing left to probe".into())
                }
                Err(e) => return Err(e.into()),
            }
        }
        let stats_after = dev.stats()?;
        self.report.module = Some(ModuleDelta::between(&stats_before, &stats_after));
        self.report.totals.bytes_copied = Some(stats_after.bytes_copied - stats_before.bytes_copied);
        self.report.totals.wall_ms = Some(ms(started.elapsed()));
        self.report.failed_step = None;
        self.report.ok = true;
        Ok(())
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

    fn note_paused(&mut self, paused: &[Paused]) {
        for p in paused {
            if let Some(l) = self.report.l2.iter_mut().find(|l| l.name == p.name) {
                l.paused_at_ns = p.paused_at_ns;
                l.passes_at_pause = p.passes;
            }
        }
    }

    fn note_resumed(&mut self, vms: &[L2Info]) {
        for vm in vms {
            if let Some(l) = self.report.l2.iter_mut().find(|l| l.name == vm.name) {
                l.resumed_at_ns = vm.resumed_at_ns;
                l.downtime_ms = vm.resumed_at_ns.map(|r| r.saturating_sub(l.paused_at_ns) as f64 / 1e6);
            }
        }
        let downs: Vec<f64> = self.report.l2.iter().filter_map(|l| l.downtime_ms).collect();
        self.report.totals.downtime_ms_max = downs.iter().copied().reduce(f64::max);
        self.report.totals.downtime_ms_mean =
            (!downs.is_empty()).then(|| downs.iter().sum::<f64>() / downs.len() as f64);
    }

    fn verify(&mut self, vms: &[L2Info], moving: &[Moving], clean_pid: u32) -> Result<()> {
        let mut bad = Vec::new();
        for vm in vms {
            let Some(l) = self.report.l2.iter_mut().find(|l| l.name == vm.name) else { continue };
            l.passes_after = Some(vm.passes);
            l.errors = Some(vm.errors);
            l.checksum = Some(vm.checksum);
            l.checksum_ok = vm.checksum_ok;
            let aged = moving.iter().find(|m| m.info.name == vm.name).and_then(|m| m.frames.as_ref());
            let clean = vmbeam::pagemap::frames(clean_pid, vm.hva, vm.window.size).ok();
            if let (Some(a), Some(c)) = (aged, clean) {
                let both: Vec<_> = a.iter().zip(&c).filter(|(a, c)| **a != 0 && **c != 0).collect();
                l.frames_compared = both.len() as u64;
                l.frames_same = both.iter().filter(|(a, c)| a == c).count() as u64;
                l.bytes_copied = (l.frames_compared > 0).then(|| (l.frames_compared - l.frames_same) * 4096);
            }
            if vm.state != L2State::Running || vm.errors != 0 || vm.checksum_ok != Some(true) {
                bad.push(format!(
                    "{} is {:?} with {} errors{}",
                    vm.name,
                    vm.state,
                    vm.errors,
                    vm.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default()
                ));
            }
            if l.frames_compared > 0 && l.frames_same != l.frames_compared {
                bad.push(format!(
                    "{}: {} of {} page frames differ: memory was copied",
                    vm.name,
                    l.frames_compared - l.frames_same,
                    l.frames_compared
                ));
            }
        }
        ensure!(bad.is_empty(), "after the move: {}", bad.join("; "));
        Ok(())
    }

    fn verify_denied(&mut self, probes: &[Probe]) -> Result<()> {
        let mut readable = Vec::new();
        for p in probes {
            if let Some(l) = self.report.l2.iter_mut().find(|l| l.name == p.name) {
                l.old_owner = Some(p.clone());
            }
            if p.vmm_denied != p.pages || p.guest_denied != p.pages {
                readable.push(format!(
                    "{}: VMM denied {}/{}, guest denied {}/{}",
                    p.name, p.vmm_denied, p.pages, p.guest_denied, p.pages
                ));
            }
        }
        ensure!(readable.is_empty(), "the aged L1 can still read moved memory: {}", readable.join("; "));
        Ok(())
    }

    /// Before the grant phase: resume every L2 on the aged L1.
    fn resume_on_aged(&mut self, aged: &mut Client, names: &[String], cause: anyhow::Error) -> anyhow::Error {
        self.progress.set_message("rolling back: resuming on the aged L1");
        match aged.call::<Vec<String>>("resume", Selection::of(names)) {
            Ok(resumed) => {
                self.report.rolled_back =
                    Some(format!("{} L2 VMs resumed on {}", resumed.len().max(names.len()), aged.server().name));
                cause
            }
            Err(e) => cause.context(format!("and the rollback failed too: {e}")),
        }
    }

    /// After the grant phase: hand the regions back, then resume on the aged.
    #[allow(clippy::too_many_arguments)]
    fn transfer_back(
        &mut self,
        dev: &vmbeam::Device,
        aged: &mut Client,
        fds: &[OwnedFd],
        sent: &Sent,
        clean_vm: &OwnedFd,
        names: &[String],
        cause: anyhow::Error,
    ) -> anyhow::Error {
        self.progress.set_message("rolling back: transferring the regions back");
        let aged_vm = &fds[sent.vm_fd];
        let back: Vec<vmbeam::Transfer<'_>> = sent
            .vms
            .iter()
            .map(|h| vmbeam::Transfer { region: fds[h.fd].as_fd(), from_vm: clean_vm.as_fd(), to_vm: aged_vm.as_fd() })
            .collect();
        if let Err(e) = dev.transfer_batch(&back) {
            // Ownerless regions (the clean L1 died) are taken back by `resume`.
            self.report.warnings.push(format!("transfer back: {e}"));
        }
        self.resume_on_aged(aged, names, cause)
    }
}

/// Chooses each L2's window on the clean L1: its present address when free
/// there, else the lowest free one. Fills the report's plan.
fn plan(vms: &[L2Info], clean: &L1Status, report: &mut Report) -> Result<Vec<Moving>> {
    let mut used = clean.windows.clone();
    let mut moving = Vec::new();
    for vm in vms {
        if !matches!(vm.state, L2State::Running | L2State::Paused) {
            let why = vm.detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default();
            report.skipped.push(format!("{} ({:?}{why})", vm.name, vm.state));
            continue;
        }
        let fits = |w: &Window| {
            w.gpa >= clean.window_base && w.end() <= clean.window_limit && !used.iter().any(|u| u.overlaps(w))
        };
        let target = if fits(&vm.window) {
            vm.window
        } else {
            let mut w = Window { gpa: clean.window_base, size: vm.window.size };
            while !fits(&w) {
                w.gpa += 2 << 20;
                if w.end() > clean.window_limit {
                    bail!("{}: no room for {} bytes on {}", vm.name, w.size, clean.name);
                }
            }
            w
        };
        used.push(target);
        report.l2.push(L2Report::planned(vm, target));
        moving.push(Moving { info: vm.clone(), target, frames: None });
    }
    ensure!(
        moving.len() < vmbeam::control::MAX_FDS,
        "{} L2 VMs: at most {} per migration",
        moving.len(),
        vmbeam::control::MAX_FDS - 1
    );
    Ok(moving)
}

/// Polls `query-vms` until `done` holds for every named L2.
fn wait_for(
    client: &mut Client,
    names: &[String],
    deadline: Instant,
    done: impl Fn(&L2Info) -> bool,
) -> Result<Vec<L2Info>> {
    loop {
        let vms: Vec<L2Info> = client.call("query-vms", ())?;
        let ours: Vec<L2Info> = vms.into_iter().filter(|v| names.contains(&v.name)).collect();
        if ours.len() == names.len() && ours.iter().all(&done) {
            return Ok(ours);
        }
        if Instant::now() > deadline {
            let late: Vec<_> = ours
                .iter()
                .filter(|v| !done(v))
                .map(|v| format!("{} ({:?}, {} passes)", v.name, v.state, v.passes))
                .collect();
            bail!("timed out waiting on the clean L1 for: {}", late.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use vmbeam::control::RegionState;

    use super::*;

    fn vm(name: &str, gpa: u64, size: u64, state: L2State) -> L2Info {
        L2Info {
            name: name.into(),
            state,
            window: Window { gpa, size },
            passes: 0,
            errors: 0,
            checksum: 0,
            checksum_ok: None,
            hva: 0,
            paused_at_ns: None,
            resumed_at_ns: None,
            region: Some(RegionState { owned: true, mine: true, moving: false, pages_present: size / 4096 }),
            detail: None,
        }
    }

    fn clean(windows: Vec<Window>) -> L1Status {
        L1Status {
            name: "clean".into(),
            pid: 2,
            api_version: 1,
            ram_bytes: 2 << 20,
            l2_vms: windows.len(),
            running: windows.len(),
            windows,
            window_base: 0x1000_0000,
            window_limit: 0xf000_0000,
        }
    }

    #[test]
    fn windows_stay_put_when_free_and_move_past_clashes() {
        let vms = [vm("a", 0x1000_0000, 1 << 24, L2State::Running), vm("b", 0x1100_0000, 1 << 24, L2State::Paused)];
        let mut r = Report::default();
        let m = plan(&vms, &clean(vec![Window { gpa: 0x1100_0000, size: 1 << 20 }]), &mut r).unwrap();
        assert_eq!(m[0].target.gpa, 0x1000_0000);
        assert!(m[1].target.gpa >= 0x1120_0000 && !m[1].target.overlaps(&m[0].target));
    }

    #[test]
    fn stopped_l2s_are_skipped_not_moved() {
        let vms = [vm("a", 0x1000_0000, 1 << 24, L2State::Corrupt), vm("b", 0x2000_0000, 1 << 24, L2State::Migrated)];
        let mut r = Report::default();
        assert!(plan(&vms, &clean(vec![]), &mut r).unwrap().is_empty());
        assert_eq!(r.skipped.len(), 2);
    }

    #[test]
    fn a_clean_l1_without_room_fails_the_plan() {
        let vms = [vm("a", 0x1000_0000, 0xe000_0000, L2State::Running)];
        let mut r = Report::default();
        assert!(plan(&vms, &clean(vec![Window { gpa: 0x1000_0000, size: 4096 }]), &mut r).is_err());
    }
}
