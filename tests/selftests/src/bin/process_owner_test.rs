//! A region owned by a process (`VMBEAM_BIND_PROCESS`, uAPI 5), as an L1's
//! RAM is at L0: a launcher binds the region to itself and execs the VMM
//! (this binary again, `--vmm FD`: same pid, new image), which maps
//! `/proc/self/fd/N`, creates its VM afterwards and runs a guest on it.
//!
//! - the guest reads what was written into the region and writes back, on
//!   the same page frames; REGION_INFO says OWNED, and MINE to the owner;
//! - everyone else is refused: mmap `EACCES`, binds `EBUSY`, a bind with
//!   the flag and a VM fd `EINVAL`, a transfer `EPERM` (also inside a batch,
//!   where it moves nothing else); the owner gives it to its own VM;
//! - once the owner has exited (a zombie has) the region is ownerless and
//!   binds again, to another process or a VM, data intact;
//! - `VMBEAM_GATHER_INTO` out of it while the owner maps it moves the very
//!   frames, in order; the owner then gets SIGBUS / `EFAULT` there, or with
//!   `VMBEAM_GATHER_REPLACE` reads zeros there (4 KiB and huge regions)
//!   while its other pages keep their data; counters stay exact; a bad
//!   entry moves and allocates nothing.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::{
    errno::Errno,
    sys::{signal::Signal, wait::waitpid},
};
use vmbeam::{uapi, Blocks, Device, Region, Transfer};
use vmbeam_selftests::{
    check, exe,
    guest::{programs::fill_sum, TestVm},
    require::{self, errno_is},
    vmm::{pfns, serve_if_exec_vmm, Program, Request, Vmm},
    Tap, TestResult,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const DWORDS: usize = (PAGE / 4) as usize;
const GPA: u64 = 0x100_0000;
const SLOT: u32 = 1;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A guest program over `size` bytes of `vmm`'s slot from `offset`, every
/// dword; the raw result (errno `EFAULT`: KVM_RUN could not reach a page).
fn guest(vmm: &mut Vmm, program: Program, offset: u64, size: u64) -> Result<u32, (i32, String)> {
    let count = (size / 4) as u32;
    vmm.call(&Request::Run { slot: SLOT, program, offset, count, stride: 4 }, &[]).map(|(v, _)| v as u32)
}

fn run(vmm: &mut Vmm, program: Program, offset: u64, size: u64) -> Result<u32, String> {
    guest(vmm, program, offset, size).map_err(|(errno, what)| format!("VMM {} guest: {what} (errno {errno})", vmm.pid))
}

/// The VMM's own load of the first byte of page `page`: `None` on SIGBUS
/// (the probe then leaves a private page there: probe moved pages last).
fn touch(vmm: &mut Vmm, page: u64) -> Result<Option<u8>, String> {
    match vmm.call(&Request::Touch { slot: SLOT, offset: page * PAGE }, &[]) {
        Ok((byte, _)) => Ok(Some(byte as u8)),
        Err((_, what)) if what == "SIGBUS" => Ok(None),
        Err((errno, what)) => Err(format!("touch page {page}: {what} (errno {errno})")),
    }
}

/// What the FILL program writes from `seed`: dword k of the region.
fn fill_values(seed: u32, dwords: usize) -> Vec<u32> {
    let mut v = seed;
    (0..dwords)
        .map(|_| {
            let now = v;
            v = v.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            now
        })
        .collect()
}

fn page_sum(values: &[u32], page: u64) -> u32 {
    let first = page as usize * DWORDS;
    values[first..first + DWORDS].iter().fold(0u32, |a, &v| a.wrapping_add(v))
}

fn info(region: &impl AsFd) -> Result<vmbeam::RegionInfo, String> {
    Region::from_fd(region.as_fd().try_clone_to_owned().map_err(err)?).info().map_err(err)
}

/// `VMBEAM_REGION_BIND` with any arguments.
fn raw_region_bind(region: BorrowedFd<'_>, vm_fd: i32, flags: u32, reserved: [u64; 2]) -> Result<(), Errno> {
    let arg = uapi::vmbeam_region_bind { vm_fd, flags, reserved };
    // SAFETY: a region fd and the struct VMBEAM_REGION_BIND reads.
    Errno::result(unsafe { libc::ioctl(region.as_raw_fd(), uapi::VMBEAM_IOCTL_REGION_BIND as libc::c_ulong, &arg) })
        .map(drop)
}

fn map(region: &impl AsFd) -> Result<(), Errno> {
    // SAFETY: a new shared mapping at an address the kernel picks,
    // unmapped at once; nothing is touched.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, region.as_fd().as_raw_fd(), 0)
    };
    if addr == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // SAFETY: the mapping just made.
    unsafe { libc::munmap(addr, 4096) };
    Ok(())
}

/// A VMM started the launcher's way: forked, bound the region to itself,
/// exec'd; it created its VM and maps the region through /proc/self/fd/N.
struct Launched {
    vmm: Vmm,
    vm: OwnedFd,
    hva: u64,
}

fn launch(region: &OwnedFd) -> Result<Launched, String> {
    let dup = region.try_clone().map_err(err)?;
    let mut vmm = Vmm::spawn_exec(&exe("process_owner_test"), &[region.as_fd()], move || {
        Region::from_fd(dup).bind_process().is_ok()
    });
    let (_, vm) = vmm.ok(&Request::CreateVm, &[])?;
    let path = format!("/proc/self/fd/{}", region.as_raw_fd());
    let (hva, _) = vmm.ok(&Request::AttachPath { slot: SLOT, gpa: GPA, path }, &[])?;
    Ok(Launched { vmm, vm: vm.ok_or("no VM fd")?, hva })
}

/// A process-owned region of `size` bytes that its owner's guest filled
/// from `seed`; with the values written.
fn owner_with_data(dev: &Device, size: u64, seed: u32, huge: bool) -> Result<(OwnedFd, Launched, Vec<u32>), String> {
    let region = if huge { dev.create_huge_region(size) } else { dev.create_region(size) };
    let region = region.map_err(err)?.into_fd();
    let mut owner = launch(&region)?;
    let written = run(&mut owner.vmm, Program::Fill { seed }, 0, size)?;
    let values = fill_values(seed, (size / 4) as usize);
    let want = values.iter().fold(0u32, |a, &v| a.wrapping_add(v));
    check(written == want, || format!("owner's guest filled {written:#x}, host computes {want:#x}"))?;
    Ok((region, owner, values))
}

/// A VMM with a VM and an empty region of `pages` pages bound to it and
/// mapped (a window plugged in ahead of a gather).
fn window(dev: &Device, pages: u64) -> Result<(Vmm, OwnedFd, OwnedFd, u64), String> {
    let mut vmm = Vmm::spawn();
    let (_, vm) = vmm.ok(&Request::CreateVm, &[])?;
    let vm = vm.ok_or("no VM fd")?;
    let w = dev.create_empty_region(pages * PAGE).map_err(err)?;
    dev.bind(w.as_fd(), vm.as_fd()).map_err(err)?;
    let w = w.into_fd();
    let (hva, _) = vmm.ok(&Request::Attach { slot: SLOT, gpa: GPA }, &[w.as_fd()])?;
    Ok((vmm, vm, w, hva))
}

fn main() {
    serve_if_exec_vmm();
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(14);
    tap.test("launcher_binds_execs_and_the_guest_uses_the_region", || launcher(&dev));
    tap.test("bind_process_with_a_vm_fd_or_unknown_flags_is_einval", || flag_rules(&dev));

    // One process-owned region for the refusals, its owner alive.
    let size = MIB;
    let (region, owner, values) = owner_with_data(&dev, size, 0x0a11_7e57, false).expect("set-up");
    let Launched { vmm: mut owner_vmm, vm: owner_vm, .. } = owner;
    let written = values.iter().fold(0u32, |a, &v| a.wrapping_add(v));
    let mut stranger = Vmm::spawn();
    let stranger_vm = stranger.ok(&Request::CreateVm, &[]).expect("VM").1.expect("VM fd");
    tap.test("region_info_is_owned_and_mine_to_the_owner_only", || {
        let i = info(&region)?;
        check(i.owned && !i.mine && !i.moving, || format!("REGION_INFO in the test: {i:?}"))?;
        let (state, _) = owner_vmm.ok(&Request::Info { slot: SLOT }, &[])?;
        let want = u64::from(uapi::VMBEAM_REGION_OWNED | uapi::VMBEAM_REGION_MINE);
        check(state == want, || format!("REGION_INFO in the owner: {state:#x}, expected {want:#x}"))
    });
    tap.test("other_processes_cannot_map_it", || {
        errno_is("mmap by the test (holds the fd, not the owner)", map(&region).map_err(ioctl_err), Errno::EACCES)?;
        match stranger.call(&Request::Attach { slot: SLOT, gpa: GPA }, &[region.as_fd()]) {
            Err((errno, _)) if errno == libc::EACCES => Ok(()),
            other => Err(format!("mmap by another VMM: expected EACCES, got {other:?}")),
        }
    });
    tap.test("binds_while_the_owner_lives_are_ebusy", || {
        let r = Region::from_fd(region.try_clone().map_err(err)?);
        errno_is("BIND_PROCESS by another process", r.bind_process(), Errno::EBUSY)?;
        let vm = TestVm::new()?;
        errno_is("REGION_BIND to the caller's VM", r.bind(vm.vm_borrowed()), Errno::EBUSY)?;
        errno_is("VMBEAM_BIND to another process's VM", dev.bind(region.as_fd(), stranger_vm.as_fd()), Errno::EBUSY)?;
        errno_is("VMBEAM_BIND to the test's VM", dev.bind(region.as_fd(), vm.vm_borrowed()), Errno::EBUSY)
    });
    tap.test("transfer_of_a_process_owned_region_is_eperm_and_moves_nothing", || {
        transfers(&dev, &region, &owner_vm, &mut stranger, &stranger_vm)
    });
    tap.test("refusals_changed_nothing_the_owner_reads_its_data", || {
        let sum = run(&mut owner_vmm, Program::Sum, 0, size)?;
        check(sum == written, || format!("owner's guest sums {sum:#x}, wrote {written:#x}"))
    });
    tap.test("after_the_owner_exits_the_region_is_ownerless_and_binds_again", || {
        owner_exit(&dev, &region, owner_vmm, &mut stranger, &stranger_vm, written)
    });
    stranger.quit();
    drop((region, owner_vm, stranger_vm));

    tap.test("the_owner_gives_its_region_to_its_own_vm", || promotion(&dev));
    tap.test("gather_into_a_window_moves_the_owner_frames_owner_gets_sigbus", || gather(&dev, false));
    tap.test("gather_replace_leaves_zeros_for_the_owner_and_keeps_the_rest", || gather(&dev, true));
    tap.test("gather_replace_with_a_bad_entry_moves_and_allocates_nothing", || replace_errors(&dev));
    tap.test("gather_replace_out_of_a_huge_region", || replace_huge(&dev));
    tap.test("counters_return_to_zero", || {
        let st = dev.stats().map_err(err)?;
        check(st.regions == 0 && st.pages_owned == 0 && st.bytes_copied == 0, || format!("{st:?}"))
    });
    tap.finish()
}

fn ioctl_err(e: Errno) -> vmbeam::Error {
    vmbeam::Error::Ioctl { op: "mmap", errno: e }
}

fn launcher(dev: &Device) -> TestResult {
    let size = 2 * MIB;
    let pages: Vec<u64> = (0..size / PAGE).map(|p| p * PAGE).collect();
    // The test's data: a feeder VMM's guest writes it into a region of its
    // own, which then moves (zero copy) into the ownerless region.
    let mut feeder = Vmm::spawn();
    let (_, _feeder_vm) = feeder.ok(&Request::CreateVm, &[])?;
    let (feeder_hva, src) =
        feeder.ok(&Request::CreateRegion { size, slot: SLOT, gpa: GPA, blocks: Blocks::Page }, &[])?;
    let src = src.ok_or("no region fd")?;
    let written = run(&mut feeder, Program::Fill { seed: 0xfeed }, 0, size)?;
    let frames = pfns(feeder.pid, feeder_hva, size)?;
    let region = dev.create_empty_region(size).map_err(err)?.into_fd();
    dev.gather_into(src.as_fd(), &pages, region.as_fd(), 0).map_err(err)?;

    let mut owner = launch(&region)?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", owner.vmm.pid)).map_err(err)?;
    check(cmdline.windows(5).any(|w| w == b"--vmm"), || "the owner did not exec".into())?;
    let sum = run(&mut owner.vmm, Program::Sum, 0, size)?;
    check(sum == written, || format!("the owner's guest reads {sum:#x}, the test wrote {written:#x}"))?;
    let now = pfns(owner.vmm.pid, owner.hva, size)?;
    check(now == frames && frames.iter().all(|&f| f != 0), || "the owner maps other page frames".into())?;
    let info = info(&region)?;
    check(info.owned && !info.mine && info.pages_present == size / PAGE, || format!("{info:?}"))?;

    // The guest writes; the test reads it back through the feeder.
    let back = run(&mut owner.vmm, Program::Fill { seed: 0xbacc }, 0, size)?;
    check(back == fill_sum(0xbacc, (size / 4) as u32), || format!("the owner's guest filled {back:#x}"))?;
    dev.gather_into(region.as_fd(), &pages, src.as_fd(), 0).map_err(err)?;
    let sum = run(&mut feeder, Program::Sum, 0, size)?;
    check(sum == back, || format!("the test reads {sum:#x}, the owner's guest wrote {back:#x}"))?;
    match guest(&mut owner.vmm, Program::Sum, 0, PAGE) {
        Err((errno, _)) if errno == libc::EFAULT => {}
        other => return Err(format!("the owner's guest after its pages left: {other:?}, expected EFAULT")),
    }
    owner.vmm.quit();
    feeder.quit();
    Ok(())
}

fn flag_rules(dev: &Device) -> TestResult {
    let region = dev.create_region(16 * PAGE).map_err(err)?;
    let vm = TestVm::new()?;
    let r = region.as_fd();
    let vm_fd = vm.vm_borrowed().as_raw_fd();
    let process = uapi::VMBEAM_BIND_PROCESS;
    let cases = [
        ("BIND_PROCESS with a VM fd", vm_fd, process, [0, 0]),
        ("BIND_PROCESS with fd 0", 0, process, [0, 0]),
        ("an unknown flag", -1, 1 << 1, [0, 0]),
        ("BIND_PROCESS and an unknown flag", -1, process | 1 << 31, [0, 0]),
        ("BIND_PROCESS with a reserved word", -1, process, [0, 1]),
    ];
    for (what, fd, flags, reserved) in cases {
        let got = raw_region_bind(r, fd, flags, reserved);
        check(got == Err(Errno::EINVAL), || format!("{what}: expected EINVAL, got {got:?}"))?;
    }
    let i = region.info().map_err(err)?;
    check(!i.owned, || format!("refused binds changed the region: {i:?}"))?;
    // The caller itself may own it (and maps it then); the flag's bind is
    // then as busy as any other.
    region.bind_process().map_err(err)?;
    let i = region.info().map_err(err)?;
    check(i.owned && i.mine, || format!("bound to the test itself: {i:?}"))?;
    map(&region).map_err(|e| format!("the owner process cannot map: {e}"))?;
    errno_is("BIND_PROCESS again", region.bind_process(), Errno::EBUSY)?;
    // A VM the owner created: the region goes to it (same address space).
    region.bind(vm.vm_borrowed()).map_err(|e| format!("REGION_BIND to the owner's own VM: {e}"))?;
    errno_is("BIND_PROCESS over a live VM owner", region.bind_process(), Errno::EBUSY)
}

fn transfers(
    dev: &Device,
    region: &OwnedFd,
    owner_vm: &OwnedFd,
    stranger: &mut Vmm,
    stranger_vm: &OwnedFd,
) -> TestResult {
    let test_vm = TestVm::new()?;
    let t = Transfer { region: region.as_fd(), from_vm: owner_vm.as_fd(), to_vm: test_vm.vm_borrowed() };
    errno_is("TRANSFER naming the owner process's VM", dev.transfer(t), Errno::EPERM)?;
    let t2 = Transfer { region: region.as_fd(), from_vm: stranger_vm.as_fd(), to_vm: test_vm.vm_borrowed() };
    errno_is("TRANSFER naming another VM", dev.transfer(t2), Errno::EPERM)?;
    // In a batch with a valid entry, before and after it: nothing moves.
    let (_, other) =
        stranger.ok(&Request::CreateRegion { size: 16 * PAGE, slot: 2, gpa: 0x800_0000, blocks: Blocks::Page }, &[])?;
    let other = other.ok_or("no region fd")?;
    let valid = Transfer { region: other.as_fd(), from_vm: stranger_vm.as_fd(), to_vm: test_vm.vm_borrowed() };
    errno_is("a batch, valid entry first", dev.transfer_batch(&[valid, t]), Errno::EPERM)?;
    errno_is("a batch, valid entry last", dev.transfer_batch(&[t, valid]), Errno::EPERM)?;
    let o = info(&other)?;
    check(o.owned && !o.moving, || format!("the valid entry's region after the refusals: {o:?}"))?;
    let (byte, _) = stranger.ok(&Request::Touch { slot: 2, offset: 0 }, &[])?;
    let _ = byte; // still mapped by its owner: the batch moved nothing
    let i = info(region)?;
    check(i.owned && !i.moving && i.pages_present == MIB / PAGE, || format!("the region after the refusals: {i:?}"))
}

/// Whether process `pid` is a zombie (has exited, not reaped).
fn zombie(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

fn owner_exit(
    dev: &Device,
    region: &OwnedFd,
    owner: Vmm,
    stranger: &mut Vmm,
    stranger_vm: &OwnedFd,
    written: u32,
) -> TestResult {
    // Killed, not reaped yet: a zombie owns nothing.
    nix::sys::signal::kill(owner.pid, Signal::SIGKILL).map_err(err)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !zombie(owner.pid) {
        check(std::time::Instant::now() < deadline, || "the owner did not die".into())?;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let i = info(region)?;
    check(!i.owned && i.pages_present == MIB / PAGE, || format!("the region with its owner a zombie: {i:?}"))?;
    waitpid(owner.pid, None).map_err(err)?;
    // Another process binds it, and reads the data.
    let mut second = launch(region)?;
    let sum = run(&mut second.vmm, Program::Sum, 0, MIB)?;
    check(sum == written, || format!("the second owner's guest sums {sum:#x}, expected {written:#x}"))?;
    second.vmm.kill();
    // Then a VM of another process (VMBEAM_BIND), which maps it.
    check(!info(region)?.owned, || "the second owner was killed, the region still owned".into())?;
    dev.bind(region.as_fd(), stranger_vm.as_fd()).map_err(|e| format!("VMBEAM_BIND after the owners died: {e}"))?;
    stranger.ok(&Request::Attach { slot: SLOT, gpa: GPA }, &[region.as_fd()])?;
    let sum = run(stranger, Program::Sum, 0, MIB)?;
    check(sum == written, || format!("the VM owner's guest sums {sum:#x}, expected {written:#x}"))
}

fn promotion(dev: &Device) -> TestResult {
    let (region, mut owner, values) = owner_with_data(dev, MIB, 0x9e0, false)?;
    let written = values.iter().fold(0u32, |a, &v| a.wrapping_add(v));
    let mut other = Vmm::spawn();
    let (_, other_vm) = other.ok(&Request::CreateVm, &[])?;
    let other_vm = other_vm.ok_or("no VM fd")?;
    errno_is("VMBEAM_BIND to another process's VM", dev.bind(region.as_fd(), other_vm.as_fd()), Errno::EBUSY)?;
    dev.bind(region.as_fd(), owner.vm.as_fd()).map_err(|e| format!("VMBEAM_BIND to the owner's own VM: {e}"))?;
    let i = info(&region)?;
    check(i.owned && !i.mine, || format!("after the bind to the owner's VM: {i:?}"))?;
    let sum = run(&mut owner.vmm, Program::Sum, 0, MIB)?;
    check(sum == written, || format!("the owner's guest after the bind: {sum:#x}, wrote {written:#x}"))?;
    // Now a VM's region: it transfers like any.
    let t = Transfer { region: region.as_fd(), from_vm: owner.vm.as_fd(), to_vm: other_vm.as_fd() };
    dev.transfer(t).map_err(|e| format!("transfer from the owner's VM: {e}"))?;
    check(touch(&mut owner.vmm, 0)?.is_none(), || "the old owner still reads after the transfer".into())?;
    other.ok(&Request::Attach { slot: SLOT, gpa: GPA }, &[region.as_fd()])?;
    let sum = run(&mut other, Program::Sum, 0, MIB)?;
    check(sum == written, || format!("the new owner's guest sums {sum:#x}, expected {written:#x}"))?;
    owner.vmm.quit();
    other.quit();
    Ok(())
}

/// Page indexes 0..n of a gather out of a 512-page region, in no order.
fn scattered(n: u64) -> Vec<u64> {
    (0..n).map(|i| (i * 37 + 5) % 512).collect()
}

fn gather(dev: &Device, replace: bool) -> TestResult {
    let size = 2 * MIB;
    let (region, mut owner, values) = owner_with_data(dev, size, if replace { 0x7e9 } else { 0x5bc }, false)?;
    let moved = scattered(64);
    let offsets: Vec<u64> = moved.iter().map(|p| p * PAGE).collect();
    let (mut dst, _dst_vm, w, dst_hva) = window(dev, moved.len() as u64)?;
    let before = pfns(owner.vmm.pid, owner.hva, size)?;
    check(before.iter().all(|&f| f != 0), || "the owner's mapping is not populated".into())?;
    let st0 = dev.stats().map_err(err)?;
    if replace {
        dev.gather_into_replacing(region.as_fd(), &offsets, w.as_fd(), 0).map_err(err)?;
    } else {
        dev.gather_into(region.as_fd(), &offsets, w.as_fd(), 0).map_err(err)?;
    }
    let st = dev.stats().map_err(err)?;
    let added = if replace { moved.len() as u64 } else { 0 };
    check(st.bytes_copied == 0 && st.pages_owned == st0.pages_owned + added, || format!("stats {st0:?} -> {st:?}"))?;

    // The window's owner maps the very frames, in the order asked for.
    let want: u32 = moved.iter().fold(0u32, |a, &p| a.wrapping_add(page_sum(&values, p)));
    let sum = run(&mut dst, Program::Sum, 0, moved.len() as u64 * PAGE)?;
    check(sum == want, || format!("the window's guest sums {sum:#x}, expected {want:#x}"))?;
    let after = pfns(dst.pid, dst_hva, moved.len() as u64 * PAGE)?;
    let expected: Vec<u64> = moved.iter().map(|&p| before[p as usize]).collect();
    check(after == expected, || {
        let differ = after.iter().zip(&expected).filter(|(a, b)| a != b).count();
        format!("{differ} of {} window frames are not the owner's frames in order", moved.len())
    })?;
    let i = info(&region)?;
    let present = if replace { size / PAGE } else { size / PAGE - moved.len() as u64 };
    check(i.owned && i.pages_present == present, || format!("the source after the gather: {i:?}"))?;

    // The owner's other pages keep their data (a page after the moved
    // ones' first, and the last page).
    for keep in [6, 511] {
        check(!moved.contains(&keep), || format!("page {keep} was moved"))?;
        let sum = run(&mut owner.vmm, Program::Sum, keep * PAGE, PAGE)?;
        check(sum == page_sum(&values, keep), || format!("the owner's page {keep} sums {sum:#x} after the gather"))?;
    }
    let gone = moved[0];
    if replace {
        // Its guest and its own loads find zeros, in fresh frames.
        let sum = run(&mut owner.vmm, Program::Sum, gone * PAGE, PAGE)?;
        check(sum == 0, || format!("the owner's guest sums {sum:#x} on a replaced page"))?;
        for &p in &moved[1..4] {
            check(touch(&mut owner.vmm, p)? == Some(0), || format!("the owner's load of replaced page {p}"))?;
            let f = pfns(owner.vmm.pid, owner.hva + p * PAGE, PAGE)?[0];
            check(f != 0 && f != before[p as usize], || format!("replaced page {p}: frame {f:#x}"))?;
        }
        // Writable too: the guest fills a replaced page and reads it back.
        let filled = run(&mut owner.vmm, Program::Fill { seed: 3 }, gone * PAGE, PAGE)?;
        let sum = run(&mut owner.vmm, Program::Sum, gone * PAGE, PAGE)?;
        check(sum == filled, || format!("a replaced page read {sum:#x} after a fill of {filled:#x}"))?;
        // A gather into a new region with REPLACE: the source stays whole.
        let keep = 6;
        let r = dev.gather_replacing(region.as_fd(), &[keep * PAGE]).map_err(err)?;
        let got = r.info().map_err(err)?;
        check(got.pages_present == 1 && info(&region)?.pages_present == size / PAGE, || format!("new region {got:?}"))?;
        check(touch(&mut owner.vmm, keep)? == Some(0), || "the owner's load after GATHER with REPLACE".into())?;
    } else {
        match guest(&mut owner.vmm, Program::Sum, gone * PAGE, PAGE) {
            Err((errno, _)) if errno == libc::EFAULT => {}
            other => return Err(format!("the owner's guest on a moved page: {other:?}, expected KVM_RUN EFAULT")),
        }
        for &p in &moved[1..4] {
            check(touch(&mut owner.vmm, p)?.is_none(), || format!("the owner's load of moved page {p}: no SIGBUS"))?;
        }
    }
    owner.vmm.quit();
    dst.quit();
    Ok(())
}

fn replace_errors(dev: &Device) -> TestResult {
    let size = 2 * MIB;
    let (region, mut owner, values) = owner_with_data(dev, size, 0xe44, false)?;
    let written = values.iter().fold(0u32, |a, &v| a.wrapping_add(v));
    let (dst, _dst_vm, w, _) = window(dev, 8)?;
    let (r, win) = (region.as_fd(), w.as_fd());
    // One valid gather, so that a destination slot is taken.
    dev.gather_into_replacing(r, &[9 * PAGE], win, 0).map_err(err)?;
    let st0 = dev.stats().map_err(err)?;
    let mem0 = st0.pages_owned;
    errno_is("a repeated page", dev.gather_into_replacing(r, &[PAGE, 2 * PAGE, PAGE], win, PAGE), Errno::EINVAL)?;
    errno_is("a page out of range", dev.gather_into_replacing(r, &[PAGE, size], win, PAGE), Errno::EINVAL)?;
    errno_is("an unaligned page", dev.gather_into_replacing(r, &[PAGE, 100], win, PAGE), Errno::EINVAL)?;
    errno_is("a taken destination slot", dev.gather_into_replacing(r, &[PAGE, 2 * PAGE], win, 0), Errno::EEXIST)?;
    errno_is("past the window's end", dev.gather_into_replacing(r, &[PAGE, 2 * PAGE], win, 7 * PAGE), Errno::EINVAL)?;
    errno_is("into itself", dev.gather_into_replacing(r, &[PAGE], r, 0), Errno::EINVAL)?;
    errno_is("a new region, a repeated page", dev.gather_replacing(r, &[PAGE, PAGE]), Errno::EINVAL)?;
    // An unknown flag beside REPLACE.
    let offsets = [PAGE];
    let mut arg = uapi::vmbeam_gather {
        offsets: offsets.as_ptr() as u64,
        count: 1,
        src_fd: r.as_raw_fd(),
        flags: uapi::VMBEAM_GATHER_REPLACE | 1 << 2,
        ..Default::default()
    };
    // SAFETY: the struct VMBEAM_GATHER takes, with a live offsets array.
    let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GATHER, (&raw mut arg).cast()) };
    check(got == Err(Errno::EINVAL), || format!("REPLACE with an unknown flag: {got:?}"))?;

    let st = dev.stats().map_err(err)?;
    check(st.pages_owned == mem0 && st.regions == st0.regions, || format!("refused gathers: stats {st0:?} -> {st:?}"))?;
    let (i, d) = (info(&region)?, info(&w)?);
    check(i.pages_present == size / PAGE && d.pages_present == 1, || format!("source {i:?}, window {d:?}"))?;
    // Everything but the one replaced page still holds the owner's data.
    let sum = run(&mut owner.vmm, Program::Sum, 0, size)?;
    let want = written.wrapping_sub(page_sum(&values, 9));
    check(sum == want, || format!("the owner's guest sums {sum:#x}, expected {want:#x}"))?;
    owner.vmm.quit();
    dst.quit();
    Ok(())
}

fn replace_huge(dev: &Device) -> TestResult {
    let size = 4 * MIB;
    let (region, mut owner, values) = owner_with_data(dev, size, 0x4e6e, true)?;
    check(owner.hva % (2 * MIB) == 0, || format!("the huge mapping at {:#x} is not 2 MiB aligned", owner.hva))?;
    let (mut dst, _dst_vm, w, _) = window(dev, 1)?;
    let page = 512 + 5; // inside the second 2 MiB block
    let st0 = dev.stats().map_err(err)?;
    dev.gather_into_replacing(region.as_fd(), &[page * PAGE], w.as_fd(), 0).map_err(err)?;
    let st = dev.stats().map_err(err)?;
    check(st.pages_owned == st0.pages_owned + 1 && st.bytes_copied == 0, || format!("stats {st0:?} -> {st:?}"))?;
    let sum = run(&mut dst, Program::Sum, 0, PAGE)?;
    check(sum == page_sum(&values, page), || format!("the window's guest sums {sum:#x}"))?;
    // The owner's block now maps by 4 KiB: zeros at the page, data around.
    let sum = run(&mut owner.vmm, Program::Sum, page * PAGE, PAGE)?;
    check(sum == 0, || format!("the owner's guest sums {sum:#x} on the replaced page"))?;
    let block_sum = |from: u64, to: u64| (from..to).fold(0u32, |a, p| a.wrapping_add(page_sum(&values, p)));
    for (from, to) in [(0, 512), (512, page), (page + 1, 1024)] {
        let sum = run(&mut owner.vmm, Program::Sum, from * PAGE, (to - from) * PAGE)?;
        check(sum == block_sum(from, to), || format!("the owner's pages {from}..{to} sum {sum:#x}"))?;
    }
    check(touch(&mut owner.vmm, page)? == Some(0), || "the owner's own load of the replaced page".into())?;
    owner.vmm.quit();
    dst.quit();
    Ok(())
}
