//! The lab L1: one KVM VM whose RAM is a vmbeam region (holding the
//! workload code) and whose L2 windows are vmbeam regions mapped at
//! guest-physical windows above the RAM.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, MmapRegion};
use vmbeam::{
    control::{Handoff, L1Status, Regs, Window},
    Device, Region,
};

use crate::{
    cpu, kvm_util,
    l2::{Runner, L2},
    saved_state::SavedState,
    workload,
};

/// L2 windows start here (above the L1's RAM) and end below 4 GiB: the
/// workload runs in 32-bit flat mode.
pub const WINDOW_BASE: u64 = 0x1000_0000;
pub const WINDOW_LIMIT: u64 = 0xf000_0000;
/// Window sizes and addresses are multiples of this.
pub const PAGE: u64 = 4096;

pub struct L1 {
    pub name: String,
    vm: VmFd,
    dev: Device,
    ram: GuestRegionMmap<()>,
    _ram_region: Region,
    pub l2s: Vec<L2>,
    /// New L2 windows are VMBEAM_CREATE_HUGE regions (`--huge`).
    pub huge_windows: bool,
    /// L2s handed over ahead of their memory (`stage-regions`), checked and
    /// held, not running; each with the control session that staged it.
    staged: Vec<(u64, Checked)>,
    next_slot: u32,
    next_vcpu: u64,
    /// A vCPU that never runs: it maps L2 memory into the VM while their
    /// own vCPUs already run (`KVM_PRE_FAULT_MEMORY` is a vCPU ioctl, and a
    /// running vCPU holds its own). Set up in the L2s' flat mode, so its
    /// stage-2 root is theirs. Made on first use.
    prefaulter: Option<VcpuFd>,
    /// Paused vCPU threads of L2s that left, for the next L2s (`give_back`).
    spare_runners: Vec<Runner>,
    seed: u32,
}

impl L1 {
    pub fn new(name: String, ram_bytes: u64) -> Result<Self> {
        ensure!((2 * PAGE..=WINDOW_BASE).contains(&ram_bytes), "RAM must be 8 KiB .. 256 MiB");
        let kvm = Kvm::new().context("opening /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        if !kvm_util::zap_only_deleted_slots(&vm) {
            tracing::debug!("KVM_X86_QUIRK_SLOT_ZAP_ALL cannot be disabled here: removing a window zaps every L2");
        }
        let dev = Device::open()?;
        let ram_region = dev.create_region(ram_bytes).context("creating the L1 RAM region")?;
        ram_region.bind(borrow(&vm)).context("binding the L1 RAM region")?;
        let ram = map(&ram_region, 0, ram_bytes)?;
        // Every byte of RAM but the code is `hlt`: a vCPU that leaves the
        // code (a wild rip under TCG's emulated SVM: README, Tests) stops
        // at its first instruction outside it, where in zeroes it would
        // run on: `00 00` is `add [eax], al`, a write to whatever byte eax
        // names, another L2's window as well (all lab L2s are vCPUs of
        // this one VM).
        let hlt_page = [workload::HLT; PAGE as usize];
        for page in (0..ram_bytes).step_by(PAGE as usize) {
            let len = (ram_bytes - page).min(PAGE) as usize;
            ram.write_slice(&hlt_page[..len], MemoryRegionAddress(page)).context("filling RAM with hlt")?;
        }
        ram.write_slice(workload::CODE, MemoryRegionAddress(workload::CODE_GPA)).context("loading the workload")?;
        let mut l1 = Self {
            name,
            vm,
            dev,
            ram,
            _ram_region: ram_region,
            l2s: Vec::new(),
            huge_windows: false,
            staged: Vec::new(),
            next_slot: 0,
            next_vcpu: 0,
            prefaulter: None,
            spare_runners: Vec::new(),
            seed: cpu::monotonic_ns() as u32 | 1,
        };
        let ram_ptr = l1.ram.as_ptr() as u64;
        // SAFETY: the RAM mapping lives as long as the VM (both in `l1`).
        unsafe { l1.set_memslot(0, 0, ram_ptr, ram_bytes) }.context("RAM memslot")?;
        l1.next_slot = 1;
        Ok(l1)
    }

    pub fn vm_fd(&self) -> BorrowedFd<'_> {
        borrow(&self.vm)
    }

    pub fn status(&self) -> L1Status {
        L1Status {
            name: self.name.clone(),
            pid: std::process::id(),
            api_version: self.dev.api_version().unwrap_or(0),
            ram_bytes: self.ram.len(),
            l2_vms: self.l2s.len(),
            running: self.l2s.iter().filter(|l| l.is_running()).count(),
            windows: self.holding_windows().map(|l| l.window).collect(),
            window_base: WINDOW_BASE,
            window_limit: WINDOW_LIMIT,
        }
    }

    /// The L2s whose windows are taken: all but those that left for
    /// another VM (sent, their regions another's), which the next stage or
    /// start forgets (`forget_sent`), so that an L2 can come back to where
    /// it was, or another take its place.
    fn holding_windows(&self) -> impl Iterator<Item = &L2> {
        self.l2s.iter().filter(|l| !l.has_left())
    }

    pub fn find(&mut self, name: &str) -> Option<&mut L2> {
        self.l2s.iter_mut().find(|l| l.name == name)
    }

    /// The lowest free window of `size` bytes.
    pub fn free_window(&self, size: u64) -> Option<Window> {
        let mut used: Vec<Window> = self.holding_windows().map(|l| l.window).collect();
        used.sort_by_key(|w| w.gpa);
        let mut gpa = WINDOW_BASE;
        for w in used {
            if gpa + size <= w.gpa {
                break;
            }
            gpa = gpa.max(w.end().next_multiple_of(2 << 20));
        }
        (gpa + size <= WINDOW_LIMIT).then_some(Window { gpa, size })
    }

    /// Why `w` cannot be a new window here, if it cannot.
    pub fn check_window(&self, w: &Window) -> Result<()> {
        ensure!(
            w.size >= 2 * PAGE && w.size.is_multiple_of(PAGE),
            "window size {:#x}: a multiple of 4 KiB, at least 8 KiB",
            w.size
        );
        ensure!(w.gpa.is_multiple_of(PAGE), "window GPA {:#x} is not 4 KiB aligned", w.gpa);
        ensure!(
            w.gpa >= WINDOW_BASE && w.end() <= WINDOW_LIMIT,
            "window {:#x}+{:#x} is outside {WINDOW_BASE:#x}..{WINDOW_LIMIT:#x}",
            w.gpa,
            w.size
        );
        if let Some(other) = self.holding_windows().find(|l| l.window.overlaps(w)) {
            bail!("window {:#x}+{:#x} overlaps {}'s", w.gpa, w.size, other.name);
        }
        Ok(())
    }

    /// A new L2 with a fresh region of `size` bytes, running its workload.
    pub fn add_l2(&mut self, name: String, size: u64) -> Result<()> {
        ensure!(size >= 2 * PAGE && size.is_multiple_of(PAGE), "L2 size must be a multiple of 4 KiB, at least 8 KiB");
        let window = self.free_window(size).ok_or_else(|| anyhow!("no free window of {size} bytes below 4 GiB"))?;
        // 4 KiB pages unless asked: a huge region's PFNMAP mappings are
        // invisible to /proc/PID/pagemap, which is how migrate-all proves
        // that the same frames back both sides.
        let region = if self.huge_windows { self.dev.create_huge_region(size) } else { self.dev.create_region(size) };
        let region = region.context("VMBEAM_CREATE_REGION")?;
        region.bind(borrow(&self.vm)).context("VMBEAM_REGION_BIND")?;
        self.seed = self.seed.wrapping_mul(0x2c9277b5).wrapping_add(0xac564b05);
        let regs = Regs { rsi: window.gpa, rip: workload::CODE_GPA + workload::INIT, ..Default::default() };
        let l2 = self.attach(name, window, region, Some(self.seed), None)?;
        if let Err(e) = l2.prefault() {
            tracing::warn!("{}: {e}", l2.name);
        }
        l2.start(&regs, false).context("starting the workload")?;
        self.l2s.push(l2);
        Ok(())
    }

    /// Maps `region` at `window`, registers it, and gives it a paused
    /// vCPU: `runner` (made ahead, by `stage`) or a new one. With `seed`,
    /// writes a fresh workload header first.
    fn attach(
        &mut self,
        name: String,
        window: Window,
        region: Region,
        seed: Option<u32>,
        runner: Option<Runner>,
    ) -> Result<L2> {
        let runner = match runner {
            Some(r) => r,
            None => self.new_runner()?,
        };
        let mapped = (|| {
            let memory = map(&region, window.gpa, window.size)?;
            if let Some(seed) = seed {
                workload::Header::new(seed, window.size).write(&memory).context("writing the workload header")?;
            }
            let slot = self.next_slot;
            // SAFETY: the mapping is owned by the L2 built below, which
            // removes the memslot before it is dropped (see `detach`), or
            // lives as long as the VM.
            unsafe { self.set_memslot(slot, window.gpa, memory.as_ptr() as u64, window.size) }
                .with_context(|| format!("memslot for {name}"))?;
            self.next_slot += 1;
            Ok((memory, slot))
        })();
        match mapped {
            Ok((memory, slot)) => Ok(L2::new(name, window, slot, region, memory, runner)),
            Err(e) => {
                self.keep_runner(runner);
                Err(e)
            }
        }
    }

    /// A vCPU in the workload's flat mode. KVM never frees a vCPU before
    /// its VM, so each one made here is for good: L2s give theirs back
    /// (`give_back`) for the next.
    fn new_vcpu(&mut self) -> Result<VcpuFd> {
        let vcpu = self.vm.create_vcpu(self.next_vcpu).context("KVM_CREATE_VCPU")?;
        self.next_vcpu += 1;
        kvm_util::set_flat_protected_mode(&vcpu).context("KVM_SET_SREGS")?;
        Ok(vcpu)
    }

    /// A vCPU with its thread, for an L2: one an L2 that left gave back,
    /// or a new one.
    fn new_runner(&mut self) -> Result<Runner> {
        if let Some(r) = self.spare_runners.pop() {
            return Ok(r);
        }
        let id = self.next_vcpu;
        let vcpu = self.new_vcpu()?;
        Runner::spawn(id, vcpu).context("spawning a vCPU thread")
    }

    /// Keeps the vCPUs of L2s that are gone for the next ones: KVM frees a
    /// vCPU only with its VM, so an L1 that made one per L2 it received
    /// would run out (`KVM_MAX_VCPUS`, 1,024) after about a thousand.
    fn give_back(&mut self, gone: Vec<L2>) {
        for l2 in gone {
            self.keep_runner(l2.into_runner());
        }
    }

    /// The same for L2s staged and never started (dropped, or forgotten).
    fn keep_runners(&mut self, staged: Vec<Checked>) {
        for runner in staged.into_iter().filter_map(|c| c.runner) {
            self.keep_runner(runner);
        }
    }

    fn keep_runner(&mut self, runner: Runner) {
        if runner.recycle() {
            self.spare_runners.push(runner);
        }
    }

    /// Drops the L2s that were sent away and now belong to another VM, or
    /// are coming back (`incoming`): memslot first, then the vCPU thread and
    /// the mapping. Their names and windows are free again.
    /// Returns them, for their vCPUs to be given back when convenient.
    #[must_use]
    fn forget_sent(&mut self, incoming: &[&str]) -> Vec<L2> {
        let (gone, kept): (Vec<L2>, Vec<L2>) = std::mem::take(&mut self.l2s)
            .into_iter()
            .partition(|l| (l.sent && incoming.contains(&l.name.as_str())) || l.has_left());
        self.l2s = kept;
        for l2 in &gone {
            tracing::info!("{}: forgotten (it lives in another VM now)", l2.name);
            self.remove_memslot(l2.slot, l2.window.gpa);
        }
        gone
    }

    fn remove_memslot(&self, slot: u32, gpa: u64) {
        // SAFETY: size 0 deletes the slot; no memory is referenced.
        let _ = unsafe { self.set_memslot(slot, gpa, 0, 0) };
    }

    /// Takes in L2s sent by another L1 (their regions already transferred
    /// to this VM, or ownerless), all or none: every check runs before any
    /// L2 is set up, and none starts before all are. Returns their windows.
    pub fn receive(&mut self, handoffs: &[Handoff], fds: Vec<OwnedFd>) -> Result<Vec<Window>> {
        let checked = self.check_handoffs(handoffs, fds, true)?;
        self.start(checked)
    }

    /// The first half of a receive, before the memory moves: the L2s are
    /// checked as `receive` does (their regions may still be the sender's)
    /// and held for `session`. Nothing runs until [`L1::commit`]; if the
    /// session ends first, [`L1::settle`] decides. Returns their windows.
    pub fn stage(&mut self, session: u64, handoffs: &[Handoff], fds: Vec<OwnedFd>) -> Result<Vec<Window>> {
        ensure!(!self.staged.iter().any(|(s, _)| *s == session), "L2s are staged already: commit or drop them first");
        // L2s that left for good take their memslots (and vCPU threads)
        // with them now, not in `commit`: deleting a memslot of GiBs is
        // milliseconds of the downtime of an L2 coming back to its window.
        let gone = self.forget_sent(&[]);
        self.give_back(gone);
        let mut checked = self.check_handoffs(handoffs, fds, false)?;
        // Their vCPUs and threads now, out of the downtime (`commit` runs
        // inside it: 0.7 ms for the vCPU, as much for the thread, per L2).
        for c in &mut checked {
            c.runner = Some(self.new_runner().with_context(|| c.handoff.name.clone())?);
        }
        let windows = checked.iter().map(|c| c.window).collect();
        self.staged.extend(checked.into_iter().map(|c| (session, c)));
        Ok(windows)
    }

    /// Starts the L2s `session` staged, all or none; their regions must be
    /// this VM's now (or ownerless: bound here).
    pub fn commit(&mut self, session: u64) -> Result<Vec<Window>> {
        let staged = self.take_staged(session);
        ensure!(!staged.is_empty(), "no L2 staged by this connection");
        for c in &staged {
            let info = c.region.info()?;
            ensure!(!info.owned || info.mine, "{}: its region is not this L1's (no transfer yet?)", c.handoff.name);
        }
        self.start(staged)
    }

    /// Forgets what `session` staged; returns how many.
    pub fn drop_staged(&mut self, session: u64) -> usize {
        let dropped = self.take_staged(session);
        let n = dropped.len();
        self.keep_runners(dropped);
        n
    }

    /// The session that staged L2s ended without committing or dropping
    /// them (its driver died). The memory decides, so that exactly one L1
    /// runs each L2: those whose regions came here (the transfer happened,
    /// or the sender died) start here; the others are forgotten and the
    /// sender resumes them.
    pub fn settle(&mut self, session: u64) {
        let (ours, theirs): (Vec<_>, Vec<_>) =
            self.take_staged(session).into_iter().partition(|c| c.region.info().is_ok_and(|i| i.mine || !i.owned));
        for c in &theirs {
            tracing::warn!("{}: staged, but its memory never came: forgotten", c.handoff.name);
        }
        self.keep_runners(theirs);
        if ours.is_empty() {
            return;
        }
        let names: Vec<String> = ours.iter().map(|c| c.handoff.name.clone()).collect();
        match self.start(ours) {
            Ok(_) => tracing::warn!("{names:?}: their memory is here and their driver is gone: started here"),
            Err(e) => tracing::error!("{names:?}: their memory is here but they cannot start: {e:#}"),
        }
    }

    fn take_staged(&mut self, session: u64) -> Vec<Checked> {
        let (mine, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.staged).into_iter().partition(|(s, _)| *s == session);
        self.staged = rest;
        mine.into_iter().map(|(_, c)| c).collect()
    }

    /// Every check of a receive, before anything changes. With `ours`, each
    /// region must already be this VM's (or ownerless).
    fn check_handoffs(&self, handoffs: &[Handoff], fds: Vec<OwnedFd>, ours: bool) -> Result<Vec<Checked>> {
        ensure!(!handoffs.is_empty(), "no L2 to receive");
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        let mut checked: Vec<Checked> = Vec::new();
        for h in handoffs {
            let here = self.l2s.iter().any(|l| l.name == h.name && !l.sent)
                || self.staged.iter().any(|(_, c)| c.handoff.name == h.name);
            ensure!(!here, "an L2 named {} is already here", h.name);
            ensure!(handoffs.iter().filter(|o| o.name == h.name).count() == 1, "{} is listed twice", h.name);
            let fd = fds
                .get_mut(h.fd)
                .and_then(Option::take)
                .ok_or_else(|| anyhow!("{}: fd index {} is missing or used twice", h.name, h.fd))?;
            let region = Region::from_fd(fd);
            let info = region.info().with_context(|| format!("{}: fd {} is not a vmbeam region", h.name, h.fd))?;
            ensure!(info.size == h.window.size, "{}: region is {} bytes, window {}", h.name, info.size, h.window.size);
            ensure!(
                !ours || info.mine || !info.owned,
                "{}: the region belongs to another VM (transfer it to this L1 first)",
                h.name
            );
            ensure!(!info.moving, "{}: the region is in the middle of a transfer", h.name);
            let window = Window { gpa: h.target_gpa.unwrap_or(h.window.gpa), size: h.window.size };
            self.check_window(&window).with_context(|| h.name.clone())?;
            let staged_windows = self.staged.iter().map(|(_, c)| &c.window);
            if checked.iter().map(|c| &c.window).chain(staged_windows).any(|w| w.overlaps(&window)) {
                bail!("{}: its window overlaps another L2 received or staged with it", h.name);
            }
            if let Some(regs) = &h.regs {
                check_regs(regs, h)?;
            }
            checked.push(Checked { handoff: h.clone(), window, region, runner: None });
        }
        Ok(checked)
    }

    /// Sets up and starts checked L2s whose regions are this VM's (or
    /// ownerless: bound here), all or none.
    ///
    /// Inside the L2s' downtime: as little as can be. The old L2s it
    /// replaces (an L2 coming back) lose their memslots first but give
    /// their vCPUs back after; windows of 2 MiB (1 GiB) blocks are mapped into
    /// the VM after their vCPUs run (their first instructions wait for a
    /// few nested faults at most), 4 KiB windows before (one fault per
    /// page otherwise, and under TCG a storm of them now and then resumes
    /// a vCPU at a wild rip: README, Known flakiness).
    fn start(&mut self, checked: Vec<Checked>) -> Result<Vec<Window>> {
        let incoming: Vec<&str> = checked.iter().map(|c| c.handoff.name.as_str()).collect();
        let replaced = self.forget_sent(&incoming);
        let mut ready = Vec::new();
        for Checked { handoff: h, window, region, runner } in checked {
            let set_up = (|| -> Result<(L2, Regs, bool)> {
                let info = region.info()?;
                if !info.owned {
                    region.bind(borrow(&self.vm)).context("VMBEAM_REGION_BIND")?;
                }
                let l2 = self.attach(h.name.clone(), window, region, None, runner)?;
                match registers(&h, &l2) {
                    Ok(regs) => Ok((l2, relocate(&regs, h.window.gpa, window.gpa), info.huge)),
                    Err(e) => {
                        self.remove_memslot(l2.slot, l2.window.gpa);
                        Err(e)
                    }
                }
            })();
            match set_up {
                Ok(ready_l2) => ready.push(ready_l2),
                Err(e) => {
                    for (l2, _, _) in &ready {
                        self.remove_memslot(l2.slot, l2.window.gpa);
                    }
                    self.give_back(ready.into_iter().map(|(l2, _, _)| l2).collect());
                    return Err(e.context(format!("setting up {}", h.name)));
                }
            }
        }
        let windows = ready.iter().map(|(l2, _, _)| l2.window).collect();
        for (l2, _, huge) in &ready {
            if !huge {
                if let Err(e) = l2.prefault() {
                    tracing::warn!("{}: {e}", l2.name);
                }
            }
        }
        let mut after = Vec::new();
        for (l2, regs, huge) in ready {
            // Read: a state left in the window would be stale once it runs.
            if let Err(e) = l2.clear_saved_state() {
                tracing::warn!("{}: {e}", l2.name);
            }
            l2.start(&regs, true).with_context(|| format!("starting {}", l2.name))?;
            if huge {
                after.push(l2.window);
            }
            self.l2s.push(l2);
        }
        for w in after {
            let mapped = self
                .prefaulter()
                .and_then(|v| kvm_util::pre_fault_memory(v, w.gpa, w.size).map_err(|e| anyhow!("{e}")));
            if let Err(e) = mapped {
                tracing::warn!("the window at {:#x}: {e}", w.gpa);
            }
        }
        self.give_back(replaced);
        Ok(windows)
    }

    fn prefaulter(&mut self) -> Result<&VcpuFd> {
        if self.prefaulter.is_none() {
            self.prefaulter = Some(self.new_vcpu().context("the prefaulter")?);
        }
        self.prefaulter.as_ref().ok_or_else(|| anyhow!("no prefaulter vCPU"))
    }

    /// # Safety
    ///
    /// `hva..hva+size` must stay mapped while the slot exists.
    unsafe fn set_memslot(&self, slot: u32, gpa: u64, hva: u64, size: u64) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: the caller keeps the memory mapped.
        unsafe { kvm_util::set_memslot(&self.vm, slot, gpa, hva, size) }
    }
}

/// An L2 handed over, checked, not yet set up.
struct Checked {
    handoff: Handoff,
    window: Window,
    region: Region,
    /// Its vCPU and thread, made when it was staged.
    runner: Option<Runner>,
}

/// An L2's registers: those handed over, or else those its sender saved
/// in its window at the pause (`saved_state`), now readable here.
fn registers(h: &Handoff, l2: &L2) -> Result<Regs> {
    if let Some(regs) = h.regs {
        return Ok(regs);
    }
    let saved = SavedState::read(&l2.memory).context("reading the saved state")?;
    let saved = saved.ok_or_else(|| {
        anyhow!("{}: no CPU state in its window (handed over without registers, never paused with save_state)", h.name)
    })?;
    check_regs(&saved.regs, h)?;
    Ok(saved.regs)
}

/// The registers of a lab workload running over `h`'s window.
fn check_regs(regs: &Regs, h: &Handoff) -> Result<()> {
    let code = workload::CODE_GPA..workload::CODE_GPA + workload::CODE.len() as u64;
    ensure!(code.contains(&regs.rip), "{}: rip {:#x} is not in the workload", h.name, regs.rip);
    ensure!(regs.rsi == h.window.gpa, "{}: rsi is not its window (not a lab workload?)", h.name);
    Ok(())
}

/// Moves the workload's window pointers (rsi: header, rdi: cursor) from
/// `from` to `to`; everything else in the registers is position-free.
fn relocate(regs: &Regs, from: u64, to: u64) -> Regs {
    let mut r = *regs;
    r.rsi = r.rsi.wrapping_sub(from).wrapping_add(to) & 0xffff_ffff;
    r.rdi = r.rdi.wrapping_sub(from).wrapping_add(to) & 0xffff_ffff;
    r
}

fn borrow(vm: &VmFd) -> BorrowedFd<'_> {
    // SAFETY: the VmFd outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) }
}

/// Maps a region (MAP_SHARED) as guest memory at `gpa`.
fn map(region: &Region, gpa: u64, size: u64) -> Result<GuestRegionMmap<()>> {
    let file = File::from(region.as_fd().try_clone_to_owned().context("dup region fd")?);
    let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize)
        .map_err(|e| anyhow!("mmap of the region: {e}"))?;
    GuestRegionMmap::new(mapping, GuestAddress(gpa)).map_err(|e| anyhow!("guest region: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relocation_moves_only_window_pointers() {
        let r = Regs { rsi: 0x1000_0000, rdi: 0x1000_2000, rbx: 7, rip: 0x1043, ..Default::default() };
        let moved = relocate(&r, 0x1000_0000, 0x3000_0000);
        assert_eq!((moved.rsi, moved.rdi, moved.rbx, moved.rip), (0x3000_0000, 0x3000_2000, 7, 0x1043));
    }
}
