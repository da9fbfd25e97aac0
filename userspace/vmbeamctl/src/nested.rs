//! `migrate-all` between real L1s, and `rejuvenate`.
//!
//! The clean L1 was booted with empty windows (vmbeam regions without
//! pages, mapped by its QEMU and plugged in before it booted), so nothing
//! is hot-plugged during the move. Per L2:
//!
//! | step     | what happens                                          | on failure                      |
//! |----------|-------------------------------------------------------|---------------------------------|
//! | plan     | every running L2 on the aged L1 gets an empty window of its size on the clean L1, where the agent starts its receiving QEMU (`-incoming`) | those QEMUs are killed |
//! | pause    | the aged agent stops the L2 and saves CPU + devices (QEMU migration, `x-ignore-shared`: no RAM) | the L2s resume on the aged L1 |
//! | transfer | `VMBEAM_GATHER_INTO`: the window's pages leave the aged L1's region for the clean L1's | the pages moved go back; the L2s resume on the aged L1 |
//! | receive  | the clean agent starts a QEMU on the window with `-incoming`, loads the state, resumes | the clean QEMU is killed, the pages go back, the L2s resume on the aged L1 |
//! | verify   | a full workload pass on the clean L1, same page frames at L0, the aged L1's view of the windows empty; the aged L2 QEMUs are killed | reported |
//!
//! Downtime of an L2 is placed on L0's clock: the stop is the save reply's
//! arrival less the agent's own time since the stop; the first instruction
//! on the clean L1 is the restore request's departure plus the agent's own
//! time to `cont`. Both errors are one agent round trip at most.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use std::os::fd::AsFd;

use anyhow::{anyhow, bail, ensure, Context, Result};
use vmbeam::control::agent::{
    AgentL2, AgentL2State, AgentStatus, Named, RestoreL2, Restored, Saved, StartL2, Workload,
};

use crate::{
    migrate::Step,
    qemu_l1::{LaunchArgs, QemuL1},
    report::{self, Endpoint, L2Report, ModuleDelta, Report},
};

/// One L2 on its way.
struct Move {
    name: String,
    from: u32,
    to: u32,
    pages: u64,
    frames: Vec<u64>,
    saved: Option<Saved>,
    stopped_at: Option<Instant>,
    gathered: bool,
}

pub struct Flags<'a> {
    pub dry_run: bool,
    pub timeout: Duration,
    pub inject_failure: Option<Step>,
    pub report: &'a mut Report,
}

/// Moves every running L2 from `aged` to `clean`.
pub fn migrate(aged: &mut QemuL1, clean: &mut QemuL1, f: Flags<'_>) -> Result<()> {
    let started = Instant::now();
    let report = f.report;
    report.dry_run = f.dry_run;
    report.from = Some(endpoint(aged));
    report.to = Some(endpoint(clean));
    let dev = vmbeam::Device::open()?;
    let mut phase = Phase::new(report, Step::Plan);
    let vms: Vec<AgentL2> = aged.agent.call("query-vms", ())?;
    let clean_status: AgentStatus = clean.agent.call("query-status", ())?;
    let mut moves = plan(aged, clean, &vms, &clean_status, phase.report)?;
    inject(f.inject_failure, Step::Plan)?;
    if f.dry_run || moves.is_empty() {
        if moves.is_empty() {
            phase.report.warnings.push(format!("{} has no running L2 VM to move", aged.name));
        }
        phase.report.failed_step = None;
        phase.report.ok = true;
        return Ok(());
    }
    let stats_before = dev.stats()?;
    // The receiving QEMUs start now, out of the downtime; they touch their
    // (still empty) windows only once the state is loaded.
    for m in &moves {
        let prepared: Result<AgentL2> =
            clean.agent.call("prepare-l2", StartL2 { name: m.name.clone(), window: m.to }).map_err(Into::into);
        if let Err(e) = prepared {
            return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e.context("preparing the clean L1")));
        }
    }

    phase.enter(Step::Pause);
    for m in &mut moves {
        let asked = Instant::now();
        let saved: Result<Saved> = aged.agent.call("save-l2", Named { name: m.name.clone() }).map_err(Into::into);
        match saved {
            Ok(s) => {
                m.stopped_at = asked.elapsed().checked_sub(Duration::from_micros(s.stopped_us_ago)).map(|d| asked + d);
                m.saved = Some(s);
            }
            Err(e) => return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e)),
        }
    }
    if let Err(e) = inject(f.inject_failure, Step::Pause) {
        return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e));
    }

    phase.enter(Step::Transfer);
    let t0 = Instant::now();
    for i in 0..moves.len() {
        let m = &moves[i];
        let (src, dst) = (window(aged, m.from)?, window(clean, m.to)?);
        let offsets: Vec<u64> = (0..m.pages).map(|p| p * 4096).collect();
        if let Err(e) = dev.gather_into(src.region.as_fd(), &offsets, dst.region.as_fd(), 0) {
            return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e.into()));
        }
        moves[i].gathered = true;
    }
    phase.report.totals.transfer_ms = Some(ms(t0.elapsed()));
    if let Err(e) = inject(f.inject_failure, Step::Transfer) {
        return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e));
    }

    phase.enter(Step::Receive);
    let mut restored = Vec::new();
    for m in &moves {
        let saved = m.saved.as_ref().ok_or_else(|| anyhow!("{}: not saved", m.name))?;
        let asked = Instant::now();
        let args = RestoreL2 { name: m.name.clone(), window: m.to, state: saved.state.clone() };
        match clean.agent.call::<Restored>("restore-l2", args) {
            Ok(r) => restored.push((m.name.clone(), asked + Duration::from_micros(r.resumed_after_us), r)),
            Err(e) => return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e.into())),
        }
    }
    if let Err(e) = inject(f.inject_failure, Step::Receive) {
        return Err(rollback(aged, clean, &dev, &mut moves, phase.report, e));
    }
    phase.report.committed = true;
    // The moved L2s must never run again on the aged L1.
    for m in &moves {
        let _ = aged.agent.call::<serde_json::Value>("kill-l2", Named { name: m.name.clone() });
    }
    for (name, resumed_at, _) in &restored {
        if let (Some(l), Some(m)) =
            (phase.report.l2.iter_mut().find(|l| &l.name == name), moves.iter().find(|m| &m.name == name))
        {
            l.downtime_ms = m.stopped_at.map(|s| ms(resumed_at.saturating_duration_since(s)));
        }
    }

    phase.enter(Step::Verify);
    verify(aged, clean, &moves, phase.report, f.timeout)?;
    let stats_after = dev.stats()?;
    phase.report.module = Some(ModuleDelta::between(&stats_before, &stats_after));
    phase.report.totals.bytes_copied = Some(stats_after.bytes_copied - stats_before.bytes_copied);
    let downs: Vec<f64> = phase.report.l2.iter().filter_map(|l| l.downtime_ms).collect();
    phase.report.totals.downtime_ms_max = downs.iter().copied().reduce(f64::max);
    phase.report.totals.downtime_ms_mean = (!downs.is_empty()).then(|| downs.iter().sum::<f64>() / downs.len() as f64);
    phase.report.totals.wall_ms = Some(ms(started.elapsed()));
    phase.report.failed_step = None;
    phase.report.ok = true;
    Ok(())
}

/// Times the steps into the report.
struct Phase<'r> {
    report: &'r mut Report,
    step: Step,
    since: Instant,
}

impl<'r> Phase<'r> {
    fn new(report: &'r mut Report, step: Step) -> Self {
        report.failed_step = Some(step);
        Self { report, step, since: Instant::now() }
    }

    fn enter(&mut self, step: Step) {
        self.close();
        self.step = step;
        self.report.failed_step = Some(step);
    }

    fn close(&mut self) {
        let took = ms(std::mem::replace(&mut self.since, Instant::now()).elapsed());
        self.report.phases_ms.push((self.step, took));
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

fn endpoint(l1: &QemuL1) -> Endpoint {
    Endpoint { socket: l1.qmp_path.display().to_string(), name: l1.name.clone(), pid: l1.pid }
}

fn window(l1: &QemuL1, index: u32) -> Result<&crate::qemu_l1::Window> {
    l1.window(index).ok_or_else(|| anyhow!("{} has no window {index} at L0", l1.name))
}

fn inject(at: Option<Step>, step: Step) -> Result<()> {
    ensure!(at != Some(step), "injected failure after {step:?} (--inject-failure)");
    Ok(())
}

/// Gives every running L2 an empty window of its size on the clean L1.
fn plan(
    aged: &QemuL1,
    clean: &QemuL1,
    vms: &[AgentL2],
    clean_status: &AgentStatus,
    report: &mut Report,
) -> Result<Vec<Move>> {
    let mut taken: Vec<u32> = clean_status.windows.iter().filter(|w| w.l2.is_some()).map(|w| w.index).collect();
    let mut moves = Vec::new();
    for vm in vms {
        if vm.state != AgentL2State::Running {
            report.skipped.push(format!("{} ({:?})", vm.name, vm.state));
            continue;
        }
        let src = window(aged, vm.window)?;
        let free = |w: &&crate::qemu_l1::Window| {
            w.size == src.size
                && !taken.contains(&w.index)
                && w.region.info().is_ok_and(|i| i.pages_present == 0)
                && clean_status.windows.iter().any(|cw| cw.index == w.index)
        };
        // Its own window number when that one is free, else any that fits.
        let target =
            clean.windows.iter().filter(free).min_by_key(|w| (w.index != vm.window, w.index)).ok_or_else(|| {
                anyhow!(
                    "{}: no empty {}-byte window on {} (boot it with --windows to match)",
                    vm.name,
                    src.size,
                    clean.name
                )
            })?;
        taken.push(target.index);
        let pages = src.region.info()?.pages_present;
        ensure!(pages == src.size / 4096, "{}: window {} has {pages} of {} pages", vm.name, vm.window, src.size / 4096);
        let frames = src.frames(aged.pid).unwrap_or_default();
        let w = |i: u32, size| vmbeam::control::Window { gpa: u64::from(i), size };
        report.l2.push(L2Report {
            name: vm.name.clone(),
            pages,
            bytes: src.size,
            from_window: Some(w(vm.window, src.size)),
            to_window: Some(w(target.index, src.size)),
            passes_at_pause: vm.workload.map_or(0, |w| u64::from(w.pass)),
            ..Default::default()
        });
        moves.push(Move {
            name: vm.name.clone(),
            from: vm.window,
            to: target.index,
            pages,
            frames,
            saved: None,
            stopped_at: None,
            gathered: false,
        });
    }
    report.totals.l2 = moves.len();
    report.totals.pages = moves.iter().map(|m| m.pages).sum();
    report.totals.bytes = moves.iter().map(|m| m.pages * 4096).sum();
    Ok(moves)
}

/// Before the L2s run on the clean L1: pages back, aged L2s resumed.
fn rollback(
    aged: &mut QemuL1,
    clean: &mut QemuL1,
    dev: &vmbeam::Device,
    moves: &mut [Move],
    report: &mut Report,
    cause: anyhow::Error,
) -> anyhow::Error {
    let mut trouble = Vec::new();
    for m in moves.iter_mut() {
        let _ = clean.agent.call::<serde_json::Value>("kill-l2", Named { name: m.name.clone() });
        if m.gathered {
            let back = (|| {
                let (src, dst) = (window(clean, m.to)?, window(aged, m.from)?);
                let offsets: Vec<u64> = (0..m.pages).map(|p| p * 4096).collect();
                dev.gather_into(src.region.as_fd(), &offsets, dst.region.as_fd(), 0)?;
                anyhow::Ok(())
            })();
            match back {
                Ok(()) => m.gathered = false,
                Err(e) => trouble.push(format!("{}: pages not moved back: {e:#}", m.name)),
            }
        }
    }
    let mut resumed = 0;
    for m in moves.iter().filter(|m| m.saved.is_some() && !m.gathered) {
        match aged.agent.call::<AgentL2>("resume-l2", Named { name: m.name.clone() }) {
            Ok(_) => resumed += 1,
            Err(e) => trouble.push(format!("{}: not resumed: {e}", m.name)),
        }
    }
    report.rolled_back = Some(format!("{resumed} L2 VMs resumed on {}", aged.name));
    if trouble.is_empty() {
        cause
    } else {
        cause.context(format!("and the rollback had trouble: {}", trouble.join("; ")))
    }
}

/// A full verified pass on the clean L1, the same frames at L0, nothing
/// left for the aged L1.
fn verify(aged: &QemuL1, clean: &mut QemuL1, moves: &[Move], report: &mut Report, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut bad = Vec::new();
    for m in moves {
        let at_pause = m.saved.as_ref().and_then(|s| s.workload).unwrap_or_default();
        let after = loop {
            let vms: Vec<AgentL2> = clean.agent.call("query-vms", ())?;
            let vm = vms.into_iter().find(|v| v.name == m.name).ok_or_else(|| anyhow!("{} vanished", m.name))?;
            let w = vm.workload.unwrap_or_default();
            if vm.state != AgentL2State::Running || w.errors != 0 || w.pass >= at_pause.pass + 2 {
                break vm;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no full pass on {} within {timeout:?} (pass {} at pause, {} now)",
                    m.name,
                    clean.name,
                    at_pause.pass,
                    w.pass
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let w = after.workload.unwrap_or_default();
        let dst = window(clean, m.to)?;
        let src = window(aged, m.from)?;
        let frames = dst.frames(clean.pid).unwrap_or_default();
        let l = report.l2.iter_mut().find(|l| l.name == m.name).context("report row")?;
        l.passes_at_pause = u64::from(at_pause.pass);
        l.passes_after = Some(u64::from(w.pass));
        l.errors = Some(u64::from(w.errors));
        l.checksum = Some(w.checksum);
        l.checksum_ok = Some(w.checksum == expected_checksum(&w));
        let both: Vec<_> = m.frames.iter().zip(&frames).filter(|(a, c)| **a != 0 && **c != 0).collect();
        l.frames_compared = both.len() as u64;
        l.frames_same = both.iter().filter(|(a, c)| a == c).count() as u64;
        l.bytes_copied = Some((l.frames_compared - l.frames_same) * 4096);
        // The aged L1's region holds nothing and its QEMU maps nothing.
        let left = src.region.info()?.pages_present;
        let mapped = src.frames(aged.pid).map(|f| f.iter().filter(|&&p| p != 0).count()).unwrap_or(0);
        l.old_owner = Some(vmbeam::control::Probe {
            name: m.name.clone(),
            pages: m.pages,
            vmm_denied: m.pages - mapped as u64,
            guest_denied: m.pages - left,
        });
        if after.state != AgentL2State::Running || w.errors != 0 || l.checksum_ok != Some(true) {
            bad.push(format!("{} is {:?} with {} errors, checksum {:#x}", m.name, after.state, w.errors, w.checksum));
        }
        if l.frames_compared == 0 || l.frames_same != l.frames_compared {
            bad.push(format!("{}: {} of {} page frames the same", m.name, l.frames_same, l.frames_compared));
        }
        if left != 0 || mapped != 0 {
            bad.push(format!("{}: the aged L1 still has {left} pages, maps {mapped}", m.name));
        }
    }
    ensure!(bad.is_empty(), "after the move: {}", bad.join("; "));
    Ok(())
}

/// The checksum the workload must have reported for its last complete
/// pass: the sum of what that pass verified (`guests/l2/workload.S`).
pub fn expected_checksum(w: &Workload) -> u32 {
    const K: u32 = 0x9e37_79b9;
    const M: u32 = 0x0100_0193;
    // Pass p-1 verified B(p-2) + i*K, i < dwords.
    let verified = w.pass.wrapping_sub(2);
    let base = w.seed.wrapping_add(verified.wrapping_mul(M));
    let n = w.dwords;
    // sum(base + i*K) = n*base + K * n(n-1)/2, all mod 2^32.
    let tri = (u64::from(n) * u64::from(n.wrapping_sub(1)) / 2) as u32;
    n.wrapping_mul(base).wrapping_add(K.wrapping_mul(tri))
}

#[derive(Debug, clap::Args)]
pub struct RejuvenateArgs {
    /// The aged L1's QMP socket.
    #[arg(long, value_name = "QMP_SOCKET")]
    pub aged: PathBuf,
    /// Name of the clean L1 (default: the aged one's with `-clean`).
    #[arg(long)]
    pub clean_name: Option<String>,
    /// Directory for the clean L1's sockets and logs.
    #[arg(long, default_value = "/run/vmbeam")]
    pub dir: PathBuf,
    /// Kernel and initramfs of the clean L1 (a newer one, or the same).
    #[arg(long, env = "VMBEAM_L1_KERNEL")]
    pub kernel: PathBuf,
    #[arg(long, env = "VMBEAM_L1_INITRD")]
    pub initrd: PathBuf,
    #[arg(long, default_value = "384M")]
    pub memory: String,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,
}

/// The whole cycle: boot a clean L1 shaped like the aged one, move every
/// L2, shut the aged L1 down.
pub fn rejuvenate(a: &RejuvenateArgs) -> ExitCode {
    let mut report = Report::default();
    let started = Instant::now();
    let result = (|| {
        let timeout = Duration::from_secs(a.timeout_s);
        let mut aged = QemuL1::connect(&a.aged, timeout).context("the aged L1")?;
        let name = a.clean_name.clone().unwrap_or_else(|| format!("{}-clean", aged.name));
        eprintln!("rejuvenate: booting clean L1 `{name}` with {} empty windows", aged.windows.len());
        let boot = Instant::now();
        let launch = LaunchArgs {
            name,
            dir: a.dir.clone(),
            windows: aged.windows.iter().map(|w| w.size).collect(),
            empty: true,
            memory: a.memory.clone(),
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            boot_timeout_s: a.timeout_s,
        };
        let mut clean = crate::qemu_l1::launch(&launch)?;
        report.warnings.push(format!("clean L1 {} booted in {:.1} s", clean.name, boot.elapsed().as_secs_f64()));
        eprintln!("rejuvenate: moving every L2 from {} to {}", aged.name, clean.name);
        migrate(&mut aged, &mut clean, Flags { dry_run: false, timeout, inject_failure: None, report: &mut report })?;
        let name = aged.name.clone();
        aged.shut_down(Duration::from_secs(30))?;
        report
            .warnings
            .push(format!("aged L1 {name} shut down; rejuvenation took {:.1} s", started.elapsed().as_secs_f64()));
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        report.ok = false;
        report.error = Some(format!("{e:#}"));
    }
    report::print(&mut report, a.json);
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Whether `path` is a QEMU's QMP socket (a real L1) rather than a lab L1's
/// control socket: QMP greets with `{"QMP": ...}`.
pub fn is_qmp(path: &Path) -> bool {
    use std::io::{BufRead, BufReader};
    let Ok(s) = std::os::unix::net::UnixStream::connect(path) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.trim_start().starts_with("{\"QMP\"")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_a_direct_sum() {
        let w = Workload { seed: 0x1234, pass: 5, dwords: 1000, ..Default::default() };
        let base = 0x1234u32.wrapping_add(3u32.wrapping_mul(0x0100_0193));
        let direct = (0..1000u32).fold(0u32, |s, i| s.wrapping_add(base.wrapping_add(i.wrapping_mul(0x9e37_79b9))));
        assert_eq!(expected_checksum(&w), direct);
    }
}
