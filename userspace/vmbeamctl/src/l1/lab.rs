//! The lab L1 (`vmbeam-lab`) as a [`Pair`]: each L2 is a window of the
//! L1's RAM plus a vCPU; its region fds and registers travel over the
//! control socket (SCM_RIGHTS) and its memory changes owner in one
//! `VMBEAM_TRANSFER_BATCH`.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vmbeam::control::{
    Client, CodecError, ControlError, Handoff, L1Status, L2Info, L2State, PauseArgs, Paused, Probe, ReceiveArgs,
    Selection, Sent, Window,
};

use super::Pair;
use crate::report::{Endpoint, L2Report, Report};

struct Moving {
    info: L2Info,
    target: Window,
    /// Page frames on the aged L1, read before the pause.
    frames: Option<Vec<u64>>,
}

pub struct LabPair {
    dev: vmbeam::Device,
    aged: Client,
    clean: Client,
    moving: Vec<Moving>,
    names: Vec<String>,
    clean_vm: Option<OwnedFd>,
    /// What `lend-regions` returned: the aged VM fd, then the region fds.
    sent: Option<(Sent, Vec<OwnedFd>)>,
}

impl LabPair {
    pub fn connect(from: &Path, to: &Path, timeout: Duration) -> Result<Self> {
        let dev = vmbeam::Device::open()?;
        let aged = Client::connect(from, timeout)?;
        let clean = Client::connect(to, timeout)?;
        Ok(Self { dev, aged, clean, moving: Vec::new(), names: Vec::new(), clean_vm: None, sent: None })
    }

    fn sent(&self) -> Result<&(Sent, Vec<OwnedFd>)> {
        self.sent.as_ref().ok_or_else(|| anyhow!("no region fds from the aged L1"))
    }
}

impl Pair for LabPair {
    fn plan(&mut self, report: &mut Report, only: Option<&str>) -> Result<()> {
        // What an earlier migration of this pair kept (the region fds it
        // lent) goes: it has ended.
        (self.moving, self.names, self.clean_vm, self.sent) = (Vec::new(), Vec::new(), None, None);
        let api = self.dev.api_version().context("reading the module's uAPI version")?;
        report.from = Some(Endpoint::of(&self.aged));
        report.to = Some(Endpoint::of(&self.clean));
        let (aged_pid, clean_pid) = (self.aged.server().pid, self.clean.server().pid);
        ensure!(aged_pid != clean_pid, "--from and --to are the same L1 (pid {aged_pid})");
        let aged_status: L1Status = self.aged.call("query-status", ())?;
        let clean_status: L1Status = self.clean.call("query-status", ())?;
        for s in [&aged_status, &clean_status] {
            ensure!(s.api_version == api, "{} runs against vmbeam uAPI {}, the module is {api}", s.name, s.api_version);
        }
        let mut vms: Vec<L2Info> = self.aged.call("query-vms", ())?;
        vms.retain(|vm| only.is_none() || only == Some(vm.name.as_str()));
        self.moving = plan(&vms, &clean_status, report)?;
        for m in &mut self.moving {
            m.frames = window_frames(aged_pid, m.info.hva, m.info.window.size).ok();
        }
        self.names = self.moving.iter().map(|m| m.info.name.clone()).collect();
        if self.moving.is_empty() {
            report.warnings.push(format!("{} has no L2 VM to move", aged_status.name));
        }
        Ok(())
    }

    /// Everything but the CPU state, while the L2s still run: the clean
    /// VM's fd, the aged L1's VM and region fds (`lend-regions`), staged on
    /// the clean L1 without registers. From then on, whichever L1 owns a
    /// region runs its L2 if this process dies (`settle` in the lab L1):
    /// the transfer is the one commit point.
    fn prepare(&mut self, _report: &mut Report) -> Result<()> {
        let (_, mut fds) = self.clean.call_with_fds::<serde_json::Value>("get-vm-fd", (), &[])?;
        let name = &self.clean.server().name;
        self.clean_vm = Some(fds.pop().ok_or_else(|| anyhow!("{name}: get-vm-fd sent no fd"))?);
        let (lent, fds): (Sent, Vec<OwnedFd>) =
            self.aged.call_with_fds("lend-regions", Selection::of(&self.names), &[])?;
        ensure!(fds.len() == lent.vms.len() + 1, "lend-regions: {} fds for {} L2s", fds.len(), lent.vms.len());
        let (lent, fds) = self.sent.insert((lent, fds));
        let handoffs: Vec<Handoff> = lent
            .vms
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let target = self.moving.iter().find(|m| m.info.name == h.name).map(|m| m.target.gpa);
                Handoff { fd: i, target_gpa: target, ..h.clone() }
            })
            .collect();
        let region_fds: Vec<_> = lent.vms.iter().map(|h| fds[h.fd].as_fd()).collect();
        self.clean.call_with_fds::<Vec<Window>>("stage-regions", ReceiveArgs { vms: handoffs }, &region_fds)?;
        Ok(())
    }

    /// Stops the L2s; each one's registers go into its own window, to move
    /// with its memory (so no round trip between the L1s is left inside
    /// the downtime but the clean L1's `commit-staged`).
    fn pause(&mut self, report: &mut Report) -> Result<()> {
        let paused: Vec<Paused> = self.aged.call("pause", PauseArgs::of(&self.names, true))?;
        for p in paused {
            if let Some(l) = report.l2.iter_mut().find(|l| l.name == p.name) {
                l.paused_at_ns = p.paused_at_ns;
                l.passes_at_pause = p.passes;
            }
        }
        Ok(())
    }

    /// Nothing left to send: the fds went and were staged ahead
    /// (`prepare`), the registers went into the windows (`pause`).
    fn send(&mut self, _report: &mut Report) -> Result<()> {
        self.sent().map(|_| ())
    }

    fn move_memory(&mut self, report: &mut Report) -> Result<()> {
        let (sent, fds) = self.sent()?;
        let clean_vm = self.clean_vm.as_ref().ok_or_else(|| anyhow!("no clean VM fd"))?;
        let aged_vm = &fds[sent.vm_fd];
        let transfers: Vec<vmbeam::Transfer<'_>> = sent
            .vms
            .iter()
            .map(|h| vmbeam::Transfer { region: fds[h.fd].as_fd(), from_vm: aged_vm.as_fd(), to_vm: clean_vm.as_fd() })
            .collect();
        let t0 = Instant::now();
        let batch = self.dev.transfer_batch(&transfers);
        report.totals.transfer_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        let Err(e) = batch else { return Ok(()) };
        let orphaned = sent.vms.iter().all(|h| {
            fds[h.fd].try_clone().ok().map(vmbeam::Region::from_fd).is_some_and(|r| r.info().is_ok_and(|i| !i.owned))
        });
        ensure!(orphaned, e);
        // The aged L1 died after handing over its L2s: their regions have no
        // owner, and the clean L1 binds them as it receives them.
        report.warnings.push(format!("{e}: the aged L1 exited; its regions are ownerless and go to the clean L1"));
        Ok(())
    }

    fn receive(&mut self, _report: &mut Report) -> Result<()> {
        self.clean.call::<Vec<Window>>("commit-staged", ())?;
        Ok(())
    }

    fn verify(&mut self, report: &mut Report, full: bool, deadline: Instant) -> Result<()> {
        let resumed = wait_for(&mut self.clean, &self.names, deadline, |vm| vm.resumed_at_ns.is_some())?;
        for vm in &resumed {
            if let Some(l) = report.l2.iter_mut().find(|l| l.name == vm.name) {
                l.resumed_at_ns = vm.resumed_at_ns;
                l.to_vcpu_tid = vm.vcpu_tid;
            }
        }
        if !full {
            return Ok(());
        }
        let (sent, fds) = self.sent.as_ref().ok_or_else(|| anyhow!("no region fds from the aged L1"))?;
        let passes_at_pause: BTreeMap<String, u64> =
            report.l2.iter().map(|l| (l.name.clone(), l.passes_at_pause)).collect();
        let after = wait_for(&mut self.clean, &self.names, deadline, |vm| {
            vm.state != L2State::Running || vm.passes >= passes_at_pause[&vm.name] + 2
        })?;
        let clean_pid = self.clean.server().pid;
        let clean_frames = |vm: &L2Info| {
            let h = sent.vms.iter().find(|h| h.name == vm.name)?;
            let region = vmbeam::Region::from_fd(fds.get(h.fd)?.try_clone().ok()?);
            region.owner_frames(clean_pid, vm.hva, 0, vm.window.size).ok()
        };
        verify_clean(report, &after, &self.moving, clean_frames)?;
        match self.aged.call::<Vec<Probe>>("probe", Selection::of(&self.names)) {
            Ok(probes) => verify_denied(report, &probes),
            // Its process exited mid-migration: no old owner is left.
            Err(ControlError::Codec { source: CodecError::Closed | CodecError::Truncated, .. }) => {
                report.warnings.push("the aged L1 exited during the migration: nothing left to probe".into());
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn retire(&mut self, _report: &mut Report) {
        // The aged lab L1 keeps nothing that could run: its L2s are marked
        // migrated there and their windows belong to the clean VM.
    }

    fn move_back(&mut self, report: &mut Report) {
        let Ok((sent, fds)) = self.sent() else { return };
        let Some(clean_vm) = self.clean_vm.as_ref() else { return };
        let aged_vm = &fds[sent.vm_fd];
        let back: Vec<vmbeam::Transfer<'_>> = sent
            .vms
            .iter()
            .map(|h| vmbeam::Transfer { region: fds[h.fd].as_fd(), from_vm: clean_vm.as_fd(), to_vm: aged_vm.as_fd() })
            .collect();
        if let Err(e) = self.dev.transfer_batch(&back) {
            // Ownerless regions (the clean L1 died) are taken back by `resume`.
            report.warnings.push(format!("transfer back: {e}"));
        }
    }

    fn resume_aged(&mut self, report: &mut Report) -> Result<usize> {
        if self.sent.is_some() {
            if let Err(e) = self.clean.call::<usize>("drop-staged", ()) {
                report.warnings.push(format!("dropping what the clean L1 staged: {e}"));
            }
        }
        let resumed: Vec<String> = self.aged.call("resume", Selection::of(&self.names))?;
        Ok(resumed.len().max(self.names.len()))
    }
}

/// The frames behind the aged lab L1's mapping of the window at `hva`,
/// read before the pause: through the L1's region fd that maps there,
/// reopened via `/proc/PID/fd` (a huge window's frames come from
/// `VMBEAM_REGION_FRAMES`: pagemap shows none of a PFNMAP mapping);
/// pagemap if no region fd maps there.
fn window_frames(pid: u32, hva: u64, size: u64) -> Result<Vec<u64>> {
    for fd in vmbeam::procfs::fds_linking_to(pid, "anon_inode:[vmbeam-region]")? {
        let path = format!("/proc/{pid}/fd/{fd}");
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if vmbeam::procfs::mapping_of_file(pid, (&meta).into())? == Some(hva) {
            let file = std::fs::File::open(&path)?;
            return Ok(vmbeam::Region::from_fd(file.into()).owner_frames(pid, hva, 0, size)?);
        }
    }
    Ok(vmbeam::pagemap::frames(pid, hva, size)?)
}

/// Checks each moved L2 on the clean L1; `clean_frames` reads the frames
/// behind its window there (the clean L1 is the region's owner now).
fn verify_clean(
    report: &mut Report,
    vms: &[L2Info],
    moving: &[Moving],
    clean_frames: impl Fn(&L2Info) -> Option<Vec<u64>>,
) -> Result<()> {
    let mut bad = Vec::new();
    let mut report_warnings = Vec::new();
    for vm in vms {
        let Some(l) = report.l2.iter_mut().find(|l| l.name == vm.name) else { continue };
        l.passes_after = Some(vm.passes);
        l.errors = Some(vm.errors);
        l.checksum = Some(vm.checksum);
        l.checksum_ok = vm.checksum_ok;
        let aged = moving.iter().find(|m| m.info.name == vm.name).and_then(|m| m.frames.as_ref());
        let clean = clean_frames(vm);
        if let (Some(a), Some(c)) = (aged, clean) {
            l.compare_frames(a, &c);
        }
        if l.frames_compared == 0 {
            report_warnings.push(format!("{}: no page frame to compare (frame numbers need root)", vm.name));
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
    report.warnings.extend(report_warnings);
    ensure!(bad.is_empty(), "after the move: {}", bad.join("; "));
    Ok(())
}

fn verify_denied(report: &mut Report, probes: &[Probe]) -> Result<()> {
    let mut readable = Vec::new();
    for p in probes {
        if let Some(l) = report.l2.iter_mut().find(|l| l.name == p.name) {
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
            vcpu_tid: None,
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
