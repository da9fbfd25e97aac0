//! Two real L1s as a [`Pair`].
//!
//! The clean L1 was booted with empty windows (vmbeam regions without
//! pages, mapped by its QEMU and plugged in before it booted), so nothing
//! is hot-plugged during the move. An L2 on the aged L1 runs on a window
//! (its pages are that window's region) or on ordinary L1 memory (they
//! are scattered over the aged L1's RAM region: the *gather* path,
//! [`super::gather`]); the pair picks the path per L2. The steps:
//!
//! | step     | what happens |
//! |----------|--------------|
//! | plan     | every running L2 gets an empty window of its size on the clean L1 |
//! | prepare  | the clean agent starts each L2's receiving QEMU on its window (`-incoming defer`): out of the downtime |
//! | pause    | the aged agent stops every L2 at once and saves their CPU + devices side by side (QEMU migration, `x-ignore-shared`: no RAM); for the gather path it reports the L1 frames of the L2's RAM, which are checked |
//! | transfer | `VMBEAM_GATHER_INTO`: each L2's pages leave the aged L1's window region, or its RAM region at the reported frames, for the clean L1's window |
//! | receive  | the clean agent loads every state into its prepared QEMU, side by side, and resumes each L2 once its own has loaded |
//! | verify   | a full workload pass on the clean L1, the same page frames at L0, nothing of the L2 left mapped by the aged L1 |
//! | retire   | the aged copies are killed; gathered frames are first filled with fresh zeroed pages (unless `--gather-holes`) |
//!
//! From `prepare` on, a journal at L0 and its witness settle the migration
//! if vmbeamctl dies ([`super::journal`]).
//!
//! Downtime of an L2 is placed on L0's clock: the stop is the save reply's
//! arrival less the agent's own time since the stop; the first instruction
//! on the clean L1 is the restore request's departure plus the agent's own
//! time to `cont`. Each is off by at most one agent round trip.

use std::{os::fd::AsFd, path::Path, time::Duration};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vmbeam::control::{
    agent::{
        AgentL2, AgentL2State, AgentStatus, FramesQuery, L2Frames, Names, PrepareL2, Restored, SaveL2s, Saved, StateAt,
        Workload, MAX_FRAMES_PER_REPLY,
    },
    Probe,
};

use super::{gather, journal, QemuL1, RamRegion, Window};
use crate::{
    l1::{monotonic_ns, Pair},
    report::{Endpoint, L2Report, Report},
};

/// Where an L2's pages are on the aged L1.
enum Source {
    /// All of this window's region, in order.
    Window(u32),
    /// The aged L1's RAM region at these byte offsets, in the L2's
    /// guest-physical order (known once it is paused).
    Ordinary { offsets: Vec<u64> },
}

/// One L2 on its way.
struct Move {
    name: String,
    source: Source,
    to: u32,
    pages: u64,
    /// Page frames at L0 behind the aged QEMU's mapping of a window's pages
    /// (an L2 on ordinary memory: [`QemuPair::frames_before`]).
    frames: Vec<u64>,
    saved: Option<Saved>,
    /// Its state reached the clean agent ahead of the load (`stage-l2`).
    staged: bool,
    /// Where its state arrived in the clean L1's state window (`send`).
    arrived: Option<StateAt>,
    /// Its state is in the receiving QEMU (`load-l2` answered): what is
    /// left is to resume it; the inbox no longer holds the state for it.
    loaded: bool,
    gathered: bool,
}

impl Move {
    fn is_ordinary(&self) -> bool {
        matches!(self.source, Source::Ordinary { .. })
    }
}

pub struct QemuPair {
    dev: vmbeam::Device,
    aged: QemuL1,
    clean: QemuL1,
    moves: Vec<Move>,
    options: gather::Options,
    /// The aged RAM region's pages before the move (the gather path).
    ram_present_before: Option<u64>,
    /// The L0 frames behind the aged QEMU's mapping of its RAM region, per
    /// page, read before the pause (the gather path; for the report's
    /// frame comparison): region pages stay where they are, and reading
    /// the whole region's pagemap is work per page of the L1.
    aged_ram_frames: Vec<u64>,
    /// The journal on disk from `prepare` on (its witness settles the
    /// migration if this process dies; [`recover`]).
    journal: Option<journal::JournalFile>,
    /// Both L1s have a state window, and the states go through them.
    states_in_windows: bool,
    /// And the clean agent begins every load in one request (`load-l2s`;
    /// an older agent does not).
    loads_in_one_request: bool,
}

mod recover;
mod save;
pub use recover::recover;

impl QemuPair {
    pub fn connect(from: &Path, to: &Path, timeout: Duration, options: gather::Options) -> Result<Self> {
        let dev = vmbeam::Device::open()?;
        let aged = QemuL1::connect(from, timeout).context("the aged L1 (--from)")?;
        let clean = QemuL1::connect(to, timeout).context("the clean L1 (--to)")?;
        Ok(Self::new(dev, aged, clean, options))
    }

    pub fn new(dev: vmbeam::Device, aged: QemuL1, clean: QemuL1, options: gather::Options) -> Self {
        Self {
            dev,
            aged,
            clean,
            moves: Vec::new(),
            options,
            ram_present_before: None,
            aged_ram_frames: Vec::new(),
            journal: None,
            states_in_windows: false,
            loads_in_one_request: false,
        }
    }

    /// The aged L1, to shut down once its L2s left.
    pub fn into_aged(self) -> QemuL1 {
        self.aged
    }

    /// Whether frames of the aged L1's RAM were left empty: it must then be
    /// destroyed, not shut down.
    pub fn left_holes(&self) -> bool {
        self.options.holes && self.moves.iter().any(|m| m.gathered && m.is_ordinary())
    }

    fn aged_ram(&self) -> Result<&RamRegion> {
        self.aged.ram.as_ref().ok_or_else(|| anyhow!("{}'s RAM is not a vmbeam region", self.aged.name))
    }

    /// Moves an L2's pages to the clean window, or (`back`) back again.
    fn gather(&self, m: &Move, back: bool) -> Result<()> {
        let dst = window(&self.clean, m.to)?;
        match (&m.source, back) {
            // A window moves whole: one run of all its pages.
            (Source::Window(from), false) => {
                let all = [[0, m.pages]];
                self.dev.gather_runs_into(window(&self.aged, *from)?.region.as_fd(), &all, dst.region.as_fd(), 0)?;
            }
            (Source::Window(from), true) => {
                let all = [[0, m.pages]];
                self.dev.gather_runs_into(dst.region.as_fd(), &all, window(&self.aged, *from)?.region.as_fd(), 0)?;
            }
            // Scattered pages, in long runs where the L1 backed the L2
            // with huge pages.
            (Source::Ordinary { offsets }, false) => {
                let runs = vmbeam::runs::encode(offsets, 4096, false);
                self.dev.gather_runs_into(self.aged_ram()?.region.as_fd(), &runs, dst.region.as_fd(), 0)?;
            }
            (Source::Ordinary { offsets }, true) => {
                gather::into_slots(&self.dev, &dst.region, self.aged_ram()?, offsets)?;
            }
        }
        Ok(())
    }

    /// For an L2 on ordinary memory, just paused: its frames from the aged
    /// agent, checked, as offsets in the aged RAM region, and the L0 frames
    /// behind them. Nothing has moved if this fails.
    fn locate(&mut self, i: usize, report: &mut Report) -> Result<()> {
        let name = self.moves[i].name.clone();
        let mut f = l2_frames(&mut self.aged.agent, &name)?;
        let ram = self.aged_ram()?;
        if let Some(c) = self.options.corrupt {
            c.apply(&mut f.frames, ram.size);
        }
        ensure!(
            f.frames.len() as u64 == self.moves[i].pages,
            "{name}: the agent reported {} frames for {} pages",
            f.frames.len(),
            self.moves[i].pages
        );
        let offsets = gather::offsets(&name, &f.frames, ram.size)?;
        if let Some(l) = report.l2.iter_mut().find(|l| l.name == name) {
            l.thp_bytes = Some(f.thp_bytes);
            let pages = f.frames.len();
            l.aged_l1_gpas = Some(
                [0, 512, pages.saturating_sub(1)].iter().filter_map(|&i| f.frames.get(i).map(|f| f * 4096)).collect(),
            );
        }
        // Its L0 frames, for the report, are looked up after the pause
        // (`frames_before`): per page, so not in the downtime.
        self.moves[i].source = Source::Ordinary { offsets };
        Ok(())
    }

    /// The L0 frames the aged QEMU mapped behind `m`'s pages before the
    /// move: read at the plan for a window; for an L2 on ordinary memory,
    /// looked up in the RAM region's frames read before the pause.
    fn frames_before(&self, m: &Move) -> Vec<u64> {
        match &m.source {
            Source::Window(_) => m.frames.clone(),
            Source::Ordinary { offsets } => {
                offsets.iter().map(|&o| self.aged_ram_frames.get((o / 4096) as usize).copied().unwrap_or(0)).collect()
            }
        }
    }

    /// Each L2's downtime from the L1 kernels' events (the agents' marks);
    /// a mark that cannot be had is a warning, never a failed move.
    fn mark_downtime(&mut self, report: &mut Report) {
        let names: Vec<String> = self.moves.iter().map(|m| m.name.clone()).collect();
        match super::marks::guest_downtime(&mut self.aged.agent, &mut self.clean.agent, &names) {
            Ok(marks) => {
                for (name, m) in names.iter().zip(marks) {
                    if let Some(l) = report.l2.iter_mut().find(|l| &l.name == name) {
                        l.guest_marks = Some(m);
                    }
                }
            }
            Err(e) => report.warnings.push(format!("the L1 kernels' downtime marks: {e:#}")),
        }
    }
}

/// All the frames of an L2 on ordinary memory, a reply's worth at a time
/// (an L2 of 1 GiB is 262,144 frames: four replies).
fn l2_frames(agent: &mut vmbeam::control::Client, name: &str) -> Result<L2Frames> {
    let mut ask = |first: u64| -> Result<L2Frames> {
        let part: L2Frames = agent
            .call("query-l2-frames", FramesQuery { name: name.into(), first, count: Some(MAX_FRAMES_PER_REPLY) })?;
        ensure!(
            part.first == first && !part.frames.is_empty(),
            "{name}: asked for frames from page {first}, got {} from page {}",
            part.frames.len(),
            part.first
        );
        Ok(part)
    };
    let mut all = ask(0)?;
    while (all.frames.len() as u64) * 4096 < all.size {
        let part = ask(all.frames.len() as u64)?;
        all.frames.extend(part.frames);
    }
    Ok(all)
}

fn window(l1: &QemuL1, index: u32) -> Result<&Window> {
    l1.window(index).ok_or_else(|| anyhow!("{} has no window {index} at L0", l1.name))
}

fn endpoint(l1: &QemuL1) -> Endpoint {
    Endpoint { socket: l1.qmp_path.display().to_string(), name: l1.name.clone(), pid: l1.pid }
}

impl Pair for QemuPair {
    fn plan(&mut self, report: &mut Report, only: Option<&str>) -> Result<()> {
        // An earlier migration of this pair has ended: its moves and its
        // journal go (dropping the journal removes its file).
        self.moves.clear();
        (self.ram_present_before, self.aged_ram_frames, self.journal) = (None, Vec::new(), None);
        report.from = Some(endpoint(&self.aged));
        report.to = Some(endpoint(&self.clean));
        ensure!(self.aged.pid != self.clean.pid, "--from and --to are the same L1 (pid {})", self.aged.pid);
        let journal = journal::path_for(&self.clean.qmp_path);
        ensure!(
            !journal.exists(),
            "a migration into {} is in flight or was never settled ({}): let its witness end, or run `vmbeamctl l1 recover --journal {}`",
            self.clean.name,
            journal.display(),
            journal.display()
        );
        let vms: Vec<AgentL2> = self.aged.agent.call("query-vms", ())?;
        let clean_status: AgentStatus = self.clean.agent.call("query-status", ())?;
        // An L2 on the clean L1 under a moving L2's name is refused, so that
        // any clean L2 of that name a rollback or the witness stops is the
        // one this migration started.
        let clean_vms: Vec<AgentL2> = self.clean.agent.call("query-vms", ())?;
        let mut taken: Vec<u32> = clean_status.windows.iter().filter(|w| w.l2.is_some()).map(|w| w.index).collect();
        for vm in vms.into_iter().filter(|vm| only.is_none() || only == Some(vm.name.as_str())) {
            if vm.state != AgentL2State::Running {
                report.skipped.push(format!("{} ({:?})", vm.name, vm.state));
                continue;
            }
            if clean_vms.iter().any(|c| c.name == vm.name && c.state != AgentL2State::Exited) {
                bail!("{}: {} has an L2 of that name already", vm.name, self.clean.name);
            }
            if vm.window.is_none() && self.aged.ram.is_none() {
                report.skipped.push(format!(
                    "{} (on ordinary memory of {}, whose RAM is not a vmbeam region: boot L1s without --anonymous-ram)",
                    vm.name, self.aged.name
                ));
                continue;
            }
            let size = match vm.window {
                Some(k) => window(&self.aged, k)?.size,
                None => vm.size,
            };
            let free = |w: &&Window| {
                w.size == size
                    && !taken.contains(&w.index)
                    && w.region.info().is_ok_and(|i| i.pages_present == 0)
                    && clean_status.windows.iter().any(|cw| cw.index == w.index)
            };
            // Its own window number when that one is free, else any that fits.
            let target = self
                .clean
                .windows
                .iter()
                .filter(free)
                .min_by_key(|w| (Some(w.index) != vm.window, w.index))
                .ok_or_else(|| {
                anyhow!(
                    "{}: no empty {size}-byte window on {} (boot it with --windows to match)",
                    vm.name,
                    self.clean.name
                )
            })?;
            taken.push(target.index);
            let (source, pages, frames) = match vm.window {
                Some(k) => {
                    let src = window(&self.aged, k)?;
                    let pages = src.region.info()?.pages_present;
                    ensure!(pages == size / 4096, "{}: window {k} has {pages} of {} pages", vm.name, size / 4096);
                    (Source::Window(k), pages, src.frames(self.aged.pid).unwrap_or_default())
                }
                // Its frames are known once it is paused.
                None => (Source::Ordinary { offsets: Vec::new() }, size / 4096, Vec::new()),
            };
            let w = |i: u32| vmbeam::control::Window { gpa: u64::from(i), size };
            report.l2.push(L2Report {
                name: vm.name.clone(),
                path: Some(if vm.window.is_some() { "window" } else { "gather" }.into()),
                pages,
                bytes: size,
                from_window: vm.window.map(w),
                to_window: Some(w(target.index)),
                passes_at_pause: vm.workload.map_or(0, |w| u64::from(w.pass)),
                ..Default::default()
            });
            self.moves.push(Move {
                name: vm.name.clone(),
                source,
                to: target.index,
                pages,
                frames,
                saved: None,
                staged: false,
                arrived: None,
                loaded: false,
                gathered: false,
            });
        }
        if self.moves.is_empty() {
            report.warnings.push(format!("{} has no running L2 VM to move", self.aged.name));
        }
        self.plan_states(clean_status.state_window.is_some(), report)
    }

    fn prepare(&mut self, _report: &mut Report) -> Result<()> {
        // The windows were plugged into the clean L1 when it booted; the
        // receiving QEMUs start now, on windows still empty: a QEMU waiting
        // with `-incoming defer` touches none of its RAM. Loading the state
        // does (kvmvapic writes guest RAM), so that waits for the pages.
        self.begin_journal()?;
        for m in &self.moves {
            let args = PrepareL2 { name: m.name.clone(), window: m.to };
            self.clean.agent.call::<AgentL2>("prepare-l2", args)?;
        }
        // The aged agent sets up its downtime marks now, not in the pause.
        let names = Names { names: self.moves.iter().map(|m| m.name.clone()).collect() };
        self.aged.agent.call::<serde_json::Value>("mark-l2s", names)?;
        if self.moves.iter().any(Move::is_ordinary) {
            let ram = self.aged_ram()?;
            self.aged_ram_frames = ram.frames(self.aged.pid).unwrap_or_default();
        }
        Ok(())
    }

    fn pause(&mut self, report: &mut Report) -> Result<()> {
        // All stop at once and save side by side: one L2's save does not
        // lengthen another's downtime.
        let names = self.moves.iter().map(|m| m.name.clone()).collect();
        self.aged.agent.call::<Vec<AgentL2>>("save-l2s", SaveL2s { names, state_window: self.states_in_windows })?;
        save::collect_and_stage(&mut self.aged.agent, &mut self.clean.agent, &mut self.moves, report)?;
        for i in 0..self.moves.len() {
            if self.moves[i].is_ordinary() {
                self.locate(i, report)?;
            }
        }
        if self.moves.iter().any(Move::is_ordinary) {
            self.ram_present_before = Some(self.aged_ram()?.region.info()?.pages_present);
        }
        self.update_journal()
    }

    fn send(&mut self, _report: &mut Report) -> Result<()> {
        // States over the links came with the pause; the rest move now.
        save::send_through_windows(&self.dev, &self.aged, &self.clean, &mut self.moves)?;
        self.update_journal()
    }

    fn move_memory(&mut self, report: &mut Report) -> Result<()> {
        let t0 = std::time::Instant::now();
        for i in 0..self.moves.len() {
            if let Err(e) = self.gather(&self.moves[i], false) {
                self.move_back(report);
                return Err(e);
            }
            self.moves[i].gathered = true;
        }
        report.totals.transfer_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }

    fn receive(&mut self, report: &mut Report) -> Result<()> {
        // Every state starts loading, then each L2 resumes once its own has.
        self.begin_loads()?;
        // `load-l2` read each state out of the inbox before it answered:
        // empty the inbox now, while the clean L1 runs none of these L2s.
        // A zap at L0 while an L1 runs an L2 makes L0's KVM kick the L1's
        // vCPU out of the L2 and flush; under TCG's emulated SVM the L1
        // that received L2s then hung or triple-faulted at its VMRUN in
        // four boots of four (README, Known flakiness). The journal says
        // so first: a witness must resume these, not read the inbox.
        for m in &mut self.moves {
            m.loaded = true;
        }
        self.update_journal()?;
        self.clear_inbox(report);
        let names = Names { names: self.moves.iter().map(|m| m.name.clone()).collect() };
        let asked = monotonic_ns();
        let restored: Vec<Restored> = self.clean.agent.call("restore-l2s", names)?;
        for r in restored {
            if let Some(l) = report.l2.iter_mut().find(|l| l.name == r.l2.name) {
                l.resumed_at_ns = Some(asked + r.resumed_after_us * 1000);
                l.restore_ms = Some(r.resumed_after_us as f64 / 1e3);
            }
        }
        Ok(())
    }

    fn verify(&mut self, report: &mut Report, full: bool, deadline: std::time::Instant) -> Result<()> {
        self.mark_downtime(report);
        let mut bad = Vec::new();
        for m in &self.moves {
            let at_pause = m.saved.as_ref().and_then(|s| s.workload).unwrap_or_default();
            let want_pass = if full { at_pause.pass + 2 } else { 0 };
            let after = loop {
                let vms: Vec<AgentL2> = self.clean.agent.call("query-vms", ())?;
                let vm = vms.into_iter().find(|v| v.name == m.name).ok_or_else(|| anyhow!("{} vanished", m.name))?;
                let w = vm.workload.unwrap_or_default();
                if vm.state != AgentL2State::Running || w.errors != 0 || w.pass >= want_pass {
                    break vm;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "{}: no full pass on {} in time (pass {} at pause, {} now)",
                        m.name,
                        self.clean.name,
                        at_pause.pass,
                        w.pass
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let w = after.workload.unwrap_or_default();
            let dst = window(&self.clean, m.to)?;
            let l = report.l2.iter_mut().find(|l| l.name == m.name).context("report row")?;
            l.passes_after = Some(u64::from(w.pass));
            l.errors = Some(u64::from(w.errors));
            l.checksum = Some(w.checksum);
            l.checksum_ok = Some(w.checksum == expected_checksum(&w));
            l.compare_frames(&self.frames_before(m), &dst.frames(self.clean.pid).unwrap_or_default());
            // Nothing is left for the aged L1: its QEMU maps none of the
            // L2's pages, and its region holds none of them.
            let (left, mapped) = self.left_on_aged(m)?;
            l.old_owner = Some(Probe {
                name: m.name.clone(),
                pages: m.pages,
                vmm_denied: m.pages - mapped.min(m.pages),
                guest_denied: m.pages - left.min(m.pages),
            });
            if !full {
                continue;
            }
            if after.state != AgentL2State::Running || w.errors != 0 || l.checksum_ok != Some(true) {
                bad.push(format!(
                    "{} is {:?} with {} errors, checksum {:#x}",
                    m.name, after.state, w.errors, w.checksum
                ));
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

    fn retire(&mut self, report: &mut Report) {
        // The moved L2s must never run again on the aged L1.
        for m in &self.moves {
            if let Source::Ordinary { offsets } = &m.source {
                if self.options.holes {
                    // Its locked pages keep the aged L1's kernel off the
                    // empty frames: the QEMU stays, stopped, until the
                    // aged L1 is destroyed.
                    report.warnings.push(format!(
                        "{}: its frames in {} are empty and its stopped QEMU is kept: destroy {} (QMP quit), never let it run on",
                        m.name, self.aged.name, self.aged.name
                    ));
                    continue;
                }
                if let Err(e) = self.aged_ram().and_then(|ram| gather::fill(&self.dev, ram, offsets)) {
                    report.warnings.push(format!(
                        "{}: its frames in {} were not refilled ({e:#}); its stopped QEMU is kept",
                        m.name, self.aged.name
                    ));
                    continue;
                }
            }
            if let Err(e) = self.aged.kill_l2(&m.name) {
                report.warnings.push(format!("{}: its stopped QEMU on {} was not killed: {e}", m.name, self.aged.name));
            }
        }
        // Settled: nothing is left for a witness to do.
        self.journal = None;
    }

    fn move_back(&mut self, report: &mut Report) {
        self.clear_inbox(report);
        for i in 0..self.moves.len() {
            if !self.moves[i].gathered {
                continue;
            }
            // The clean L2 first: it must not run on pages that leave.
            let _ = self.clean.kill_l2(&self.moves[i].name);
            match self.gather(&self.moves[i], true) {
                Ok(()) => self.moves[i].gathered = false,
                Err(e) => report.warnings.push(format!("{}: pages not moved back: {e:#}", self.moves[i].name)),
            }
        }
    }

    fn resume_aged(&mut self, report: &mut Report) -> Result<usize> {
        self.clear_inbox(report);
        for m in &self.moves {
            // Its receiving QEMU (prepare), or what a restore that failed
            // half-way left there (plan made sure the name is ours).
            let _ = self.clean.kill_l2(&m.name);
        }
        // Every L2 the aged agent holds stopped, whether or not its save's
        // reply reached us (a timeout, a reply too long).
        let aged_vms: Vec<AgentL2> = self.aged.agent.call("query-vms", ())?;
        let stopped = |name: &str| aged_vms.iter().any(|v| v.name == name && v.state == AgentL2State::Saved);
        let mut resumed = 0;
        let mut trouble = Vec::new();
        for m in self.moves.iter().filter(|m| stopped(&m.name)) {
            if m.gathered {
                trouble.push(format!("{}: its pages are on {}", m.name, self.clean.name));
                continue;
            }
            match self.aged.resume_l2(&m.name) {
                Ok(_) => resumed += 1,
                Err(e) => trouble.push(format!("{}: not resumed: {e}", m.name)),
            }
        }
        if !trouble.is_empty() {
            report.warnings.extend(trouble.iter().cloned());
            bail!("{}", trouble.join("; "));
        }
        Ok(resumed)
    }
}

impl QemuPair {
    /// What the aged L1 still has of a moved L2: pages in its region at the
    /// L2's place, and pages its QEMU maps there.
    fn left_on_aged(&self, m: &Move) -> Result<(u64, u64)> {
        let present = |f: &[u64]| f.iter().filter(|&&p| p != 0).count() as u64;
        match &m.source {
            Source::Window(from) => {
                let src = window(&self.aged, *from)?;
                let mapped = src.frames(self.aged.pid).map(|f| present(&f)).unwrap_or(0);
                Ok((src.region.info()?.pages_present, mapped))
            }
            Source::Ordinary { offsets } => {
                let ram = self.aged_ram()?;
                let mapped = ram.frames_at(self.aged.pid, offsets).map(|f| present(&f)).unwrap_or(0);
                // Per region, not per page: every gathered L2's pages must
                // have left it, so the count dropped by all of them.
                let gathered: u64 = self.moves.iter().filter(|m| m.is_ordinary() && m.gathered).map(|m| m.pages).sum();
                let now = ram.region.info()?.pages_present;
                let before = self.ram_present_before.unwrap_or(now);
                let left = if before.saturating_sub(now) == gathered { 0 } else { m.pages };
                Ok((left, mapped))
            }
        }
    }
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
