//! What a real L1 (a QEMU at L0) needs of regions: a region fd reopened
//! through `/proc/PID/fd/N` is the same region (QEMU's memory-backend-file
//! opens its mem-path itself); `VMBEAM_BIND` gives a region to a VM the
//! caller did not create (QEMU creates its own), and only a holder of
//! `/dev/vmbeam` may; an empty region is mapped ahead of time and
//! `VMBEAM_GATHER_INTO` moves another region's pages into it, zero copy,
//! and back, with the source losing every way in; scattered pages gathered
//! out of a mapped source are all unmapped there while the pages that stay
//! read right (refaulted if a zap took them along); `VMBEAM_GATHER_SCATTER`
//! moves a region's first pages to named slots of another (uAPI 6);
//! `VMBEAM_GATHER_RUNS` names the same pages as runs (uAPI 7).

use std::{
    fs::OpenOptions,
    io::Seek,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitStatus},
    unistd::{fork, setgid, setuid, ForkResult, Gid, Uid},
};
use vmbeam::{Blocks, Device, Region};
use vmbeam_selftests::{
    check,
    guest::programs::fill_sum,
    require::{self, errno_is},
    vmm::{pfns, Program, Request, Vmm},
    Tap, TestResult,
};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const GPA: u64 = 0x100_0000;
const SLOT: u32 = 1;
const SLOT2: u32 = 2;

fn run(vmm: &mut Vmm, slot: u32, program: Program, size: u64) -> Result<u32, String> {
    let count = (size / 4) as u32;
    let (v, _) = vmm.ok(&Request::Run { slot, program, offset: 0, count, stride: 4 }, &[])?;
    Ok(v as u32)
}

/// Expects the VMM's own load from `slot` at `offset` to get SIGBUS.
fn expect_sigbus(vmm: &mut Vmm, slot: u32, offset: u64, what: &str) -> TestResult {
    match vmm.call(&Request::Touch { slot, offset }, &[]) {
        Err((_, w)) if w == "SIGBUS" => Ok(()),
        other => Err(format!("{what}: expected SIGBUS, got {other:?}")),
    }
}

/// A fd of the same file, opened anew through `/proc/self/fd/N`.
fn reopen(fd: &impl AsFd) -> std::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
}

/// A VMM process with a VM, and the VM's fd.
fn vmm_with_vm() -> Result<(Vmm, OwnedFd), String> {
    let mut vmm = Vmm::spawn();
    let (_, fd) = vmm.ok(&Request::CreateVm, &[])?;
    Ok((vmm, fd.ok_or("no VM fd")?))
}

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(11);
    tap.test("reopened_region_fd_is_the_same_region", || reopened(&dev));
    tap.test("reopen_outlives_the_first_fd", || reopen_after_close(&dev));
    tap.test("bind_to_a_vm_the_caller_did_not_create", || bind_any(&dev));
    tap.test("bind_refused_without_dev_vmbeam", || bind_unprivileged(&dev));
    tap.test("gather_into_a_window_mapped_ahead", || gather_into(&dev));
    tap.test("gather_into_bad_arguments_move_nothing", || gather_into_errors(&dev));
    tap.test("scattered_gather_unmaps_every_moved_page_the_rest_reads_right", || scattered_gather(&dev, false));
    tap.test("the_same_gather_by_runs_out_of_order", || scattered_gather(&dev, true));
    tap.test("scatter_into_named_slots_same_frames", || scatter(&dev));
    tap.test("scatter_bad_arguments_move_nothing", || scatter_errors(&dev));
    tap.test("counters_return_to_zero", || {
        let st = dev.stats().map_err(|e| e.to_string())?;
        check(st.regions == 0 && st.pages_owned == 0 && st.bytes_copied == 0, || format!("{st:?}"))
    });
    tap.finish()
}

fn reopened(dev: &Device) -> TestResult {
    let (mut vmm, vm) = vmm_with_vm()?;
    let (hva, region) =
        vmm.ok(&Request::CreateRegion { size: MIB, slot: SLOT, gpa: GPA, blocks: Blocks::Page }, &[])?;
    let region = region.ok_or("no region fd")?;
    let written = run(&mut vmm, SLOT, Program::Fill { seed: 7 }, MIB)?;
    check(written == fill_sum(7, (MIB / 4) as u32), || format!("fill reported {written:#x}"))?;

    let again = reopen(&region).map_err(|e| format!("open /proc/self/fd/N of a region: {e}"))?;
    let mut file = std::fs::File::from(again.try_clone().map_err(|e| e.to_string())?);
    let end = file.seek(std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?;
    check(end == MIB, || format!("reopened fd: lseek(SEEK_END) {end}, expected {MIB}"))?;
    let info = Region::from_fd(again.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    check(info.size == MIB && info.owned && info.pages_present == MIB / PAGE, || format!("reopened: {info:?}"))?;
    // Only the owner's process may map it, through any of its fds.
    // SAFETY: a fresh shared mapping attempt; unmapped at once if it works.
    let ours = unsafe {
        libc::mmap(std::ptr::null_mut(), MIB as usize, libc::PROT_READ, libc::MAP_SHARED, again.as_raw_fd(), 0)
    };
    check(ours == libc::MAP_FAILED && Errno::last() == Errno::EACCES, || {
        format!("a non-owner mapped a reopened region fd ({ours:?}, {})", Errno::last())
    })?;
    // The owner maps the reopened fd as a second view: same bytes, same frames.
    let (hva2, _) = vmm.ok(&Request::Attach { slot: SLOT2, gpa: GPA + 16 * MIB }, &[again.as_fd()])?;
    let sum = run(&mut vmm, SLOT2, Program::Sum, MIB)?;
    check(sum == written, || format!("second view sums {sum:#x}, first wrote {written:#x}"))?;
    let (a, b) = (pfns(vmm.pid, hva, MIB)?, pfns(vmm.pid, hva2, MIB)?);
    check(a == b && a.iter().all(|&p| p != 0), || "the two views map different frames".into())?;
    // Revocation reaches mappings made through the reopened fd too.
    let (other, other_vm) = vmm_with_vm()?;
    dev.transfer(vmbeam::Transfer { region: region.as_fd(), from_vm: vm.as_fd(), to_vm: other_vm.as_fd() })
        .map_err(|e| e.to_string())?;
    expect_sigbus(&mut vmm, SLOT2, 0, "view through the reopened fd after transfer")?;
    expect_sigbus(&mut vmm, SLOT, 0, "first view after transfer")?;
    vmm.quit();
    other.quit();
    Ok(())
}

fn reopen_after_close(dev: &Device) -> TestResult {
    let region = dev.create_region(64 * PAGE).map_err(|e| e.to_string())?;
    let first: OwnedFd = region.into_fd();
    let second = reopen(&first).map_err(|e| e.to_string())?;
    drop(first);
    let third = reopen(&second).map_err(|e| format!("reopen after the first fd closed: {e}"))?;
    let info = Region::from_fd(third).info().map_err(|e| e.to_string())?;
    check(info.size == 64 * PAGE && info.pages_present == 64, || format!("{info:?}"))?;
    let st = dev.stats().map_err(|e| e.to_string())?;
    check(st.regions == 1, || format!("one region expected alive, stats {st:?}"))?;
    drop(second);
    let st = dev.stats().map_err(|e| e.to_string())?;
    check(st.regions == 0, || format!("region outlived all its fds: {st:?}"))
}

fn bind_any(dev: &Device) -> TestResult {
    let (mut vmm, vm) = vmm_with_vm()?;
    let region = dev.create_region(MIB).map_err(|e| e.to_string())?;
    errno_is("REGION_BIND to a VM the caller did not create", region.bind(vm.as_fd()), Errno::EPERM)?;
    let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
    errno_is("BIND of /dev/null as region", dev.bind(null.as_fd(), vm.as_fd()), Errno::EINVAL)?;
    errno_is("BIND to /dev/null as VM", dev.bind(region.as_fd(), null.as_fd()), Errno::EINVAL)?;
    // SAFETY: fd 999 is not open here; the module only looks it up.
    let closed = unsafe { std::os::fd::BorrowedFd::borrow_raw(999) };
    errno_is("BIND of a closed fd", dev.bind(closed, vm.as_fd()), Errno::EBADF)?;
    dev.bind(region.as_fd(), vm.as_fd()).map_err(|e| e.to_string())?;
    errno_is("BIND of an owned region", dev.bind(region.as_fd(), vm.as_fd()), Errno::EBUSY)?;
    // The VM's process maps it (a reopened fd, as QEMU would) and its guest
    // fills it.
    let again = reopen(&region).map_err(|e| e.to_string())?;
    vmm.ok(&Request::Attach { slot: SLOT, gpa: GPA }, &[again.as_fd()])?;
    let written = run(&mut vmm, SLOT, Program::Fill { seed: 9 }, MIB)?;
    check(written == fill_sum(9, (MIB / 4) as u32), || format!("guest fill reported {written:#x}"))?;
    let info = region.info().map_err(|e| e.to_string())?;
    check(info.owned && !info.mine, || format!("after BIND: {info:?}"))?;
    vmm.quit();
    Ok(())
}

fn bind_unprivileged(dev: &Device) -> TestResult {
    let (vmm, vm) = vmm_with_vm()?;
    let region = dev.create_region(MIB).map_err(|e| e.to_string())?;
    // SAFETY: single-threaded here; the child only makes syscalls and exits.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            let code = (|| {
                setgid(Gid::from_raw(65534)).ok()?;
                setuid(Uid::from_raw(65534)).ok()?;
                // No /dev/vmbeam for nobody, so no VMBEAM_BIND...
                let open = Device::open().err()?.errno()?;
                if open != Errno::EACCES && open != Errno::EPERM {
                    return None;
                }
                // ...and the inherited region fd binds only to its own VMs.
                (region.bind(vm.as_fd()).err()?.errno()? == Errno::EPERM).then_some(())
            })();
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(if code.is_some() { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).map_err(|e| e.to_string())?;
            check(status == WaitStatus::Exited(child, 0), || {
                format!(
                    "as nobody: open /dev/vmbeam must fail with EACCES/EPERM and REGION_BIND with EPERM ({status:?})"
                )
            })?;
        }
    }
    let info = region.info().map_err(|e| e.to_string())?;
    check(!info.owned, || format!("refused binds changed the region: {info:?}"))?;
    vmm.quit();
    Ok(())
}

/// An aged VMM whose guest filled a region, and a clean VMM that mapped an
/// empty window of the same size ahead of time.
struct Windows {
    aged: Vmm,
    clean: Vmm,
    region: OwnedFd,
    window: OwnedFd,
    aged_hva: u64,
    clean_hva: u64,
    written: u32,
    _vms: [OwnedFd; 2],
}

impl Windows {
    fn new(dev: &Device, size: u64, seed: u32) -> Result<Self, String> {
        let (mut aged, aged_vm) = vmm_with_vm()?;
        let (mut clean, clean_vm) = vmm_with_vm()?;
        let (aged_hva, region) =
            aged.ok(&Request::CreateRegion { size, slot: SLOT, gpa: GPA, blocks: Blocks::Page }, &[])?;
        let written = run(&mut aged, SLOT, Program::Fill { seed }, size)?;
        let window = dev.create_empty_region(size).map_err(|e| e.to_string())?;
        let info = window.info().map_err(|e| e.to_string())?;
        check(info.pages_present == 0 && info.size == size, || format!("empty region: {info:?}"))?;
        dev.bind(window.as_fd(), clean_vm.as_fd()).map_err(|e| e.to_string())?;
        let window = window.into_fd();
        let (clean_hva, _) = clean.ok(&Request::Attach { slot: SLOT, gpa: GPA }, &[window.as_fd()])?;
        Ok(Self {
            aged,
            clean,
            region: region.ok_or("no region fd")?,
            window,
            aged_hva,
            clean_hva,
            written,
            _vms: [aged_vm, clean_vm],
        })
    }

    fn finish(self) {
        self.aged.quit();
        self.clean.quit();
    }
}

fn gather_into(dev: &Device) -> TestResult {
    let size = 4 * MIB;
    let mut w = Windows::new(dev, size, 0x5eed)?;
    // A guest read of a missing page fails; nothing is mapped for it. (A
    // VMM probe would leave an anonymous page in place of the faulting one:
    // probes come last, on the last page only.)
    expect_efault(&mut w.clean, "the clean guest reading the empty window")?;
    let before = pfns(w.aged.pid, w.aged_hva, size)?;
    let offsets: Vec<u64> = (0..size / PAGE).map(|p| p * PAGE).collect();
    let st0 = dev.stats().map_err(|e| e.to_string())?;
    dev.gather_into(w.region.as_fd(), &offsets, w.window.as_fd(), 0).map_err(|e| e.to_string())?;

    // The clean guest reads what the aged guest wrote, from the same frames.
    let sum = run(&mut w.clean, SLOT, Program::Sum, size)?;
    check(sum == w.written, || format!("clean guest sums {sum:#x}, aged wrote {:#x}", w.written))?;
    let after = pfns(w.clean.pid, w.clean_hva, size)?;
    check(after == before && before.iter().all(|&p| p != 0), || {
        let moved = after.iter().zip(&before).filter(|(a, b)| a != b).count();
        format!("{moved} of {} page frames differ: bytes were copied", before.len())
    })?;
    let st = dev.stats().map_err(|e| e.to_string())?;
    check(st.bytes_copied == 0 && st.pages_owned == st0.pages_owned, || format!("stats {st0:?} -> {st:?}"))?;
    // The aged side lost every way in: its guest's reads, its VMM's loads.
    expect_efault(&mut w.aged, "the aged guest after the gather")?;
    expect_sigbus(&mut w.aged, SLOT, size - PAGE, "the aged VMM after the gather")?;
    let src = Region::from_fd(w.region.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    check(src.pages_present == 0, || format!("source after gather: {src:?}"))?;

    // And back (a rollback), the window named as one run (as vmbeamctl
    // moves a window): the aged guest reads on from the same frames (but
    // the last page, which the probe replaced in the VMM's view).
    let whole = [[0, size / PAGE]];
    dev.gather_runs_into(w.window.as_fd(), &whole, w.region.as_fd(), 0).map_err(|e| e.to_string())?;
    let kept = size - PAGE;
    let sum = run(&mut w.aged, SLOT, Program::Sum, kept)?;
    let want = fill_sum(0x5eed, (kept / 4) as u32);
    check(sum == want, || format!("aged guest after the way back sums {sum:#x}, expected {want:#x}"))?;
    let back = pfns(w.aged.pid, w.aged_hva, kept)?;
    check(back[..] == before[..back.len()], || "frames changed on the way back".into())?;
    expect_efault(&mut w.clean, "the clean guest after the pages went back")?;
    w.finish();
    Ok(())
}

/// Expects the VMM's guest reading its slot to get KVM_RUN EFAULT.
fn expect_efault(vmm: &mut Vmm, what: &str) -> TestResult {
    match vmm.call(&Request::Run { slot: SLOT, program: Program::Sum, offset: 0, count: 16, stride: 4 }, &[]) {
        Err((errno, _)) if errno == libc::EFAULT => Ok(()),
        other => Err(format!("{what}: expected KVM_RUN EFAULT, got {other:?}")),
    }
}

fn gather_into_errors(dev: &Device) -> TestResult {
    let size = MIB;
    let mut w = Windows::new(dev, size, 0xbad)?;
    let (r, win) = (w.region.as_fd(), w.window.as_fd());
    let all: Vec<u64> = (0..size / PAGE).map(|p| p * PAGE).collect();
    errno_is("into itself", dev.gather_into(r, &[0], r, PAGE), Errno::EINVAL)?;
    errno_is("unaligned destination", dev.gather_into(r, &[0], win, 100), Errno::EINVAL)?;
    errno_is("past the destination's end", dev.gather_into(r, &all, win, PAGE), Errno::EINVAL)?;
    errno_is("repeated source page", dev.gather_into(r, &[0, 0], win, 0), Errno::EINVAL)?;
    errno_is("source page out of range", dev.gather_into(r, &[size], win, 0), Errno::EINVAL)?;
    for (what, runs) in [
        ("an empty run", &[[0, 0]][..]),
        ("a run past the source's end", &[[PAGE, size / PAGE]]),
        ("overlapping runs", &[[PAGE, 2], [2 * PAGE, 1]]),
        ("an unaligned run", &[[100, 1]]),
    ] {
        errno_is(what, dev.gather_runs_into(r, runs, win, 0), Errno::EINVAL)?;
    }
    let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
    errno_is("destination not a region", dev.gather_into(r, &[0], null.as_fd(), 0), Errno::EINVAL)?;
    // A present destination page: move one in, then try that slot again.
    dev.gather_into(r, &[0], win, 0).map_err(|e| e.to_string())?;
    errno_is("present destination page", dev.gather_into(r, &[PAGE], win, 0), Errno::EEXIST)?;
    errno_is("source page gone", dev.gather_into(r, &[0], win, PAGE), Errno::EINVAL)?;
    // Unknown flags, and a destination without the flag.
    let mut arg = vmbeam::uapi::vmbeam_gather {
        offsets: all.as_ptr() as u64,
        count: 1,
        src_fd: r.as_raw_fd(),
        flags: 1 << 7,
        ..Default::default()
    };
    // SAFETY: the struct VMBEAM_GATHER takes, with a live offsets array.
    let got = unsafe {
        dev.raw_ioctl(vmbeam::uapi::VMBEAM_IOCTL_GATHER, (&mut arg as *mut vmbeam::uapi::vmbeam_gather).cast())
    };
    check(got == Err(Errno::EINVAL), || format!("unknown gather flag: {got:?}"))?;
    arg.flags = 0;
    arg.dst_offset = PAGE;
    // SAFETY: as above.
    let got = unsafe {
        dev.raw_ioctl(vmbeam::uapi::VMBEAM_IOCTL_GATHER, (&mut arg as *mut vmbeam::uapi::vmbeam_gather).cast())
    };
    check(got == Err(Errno::EINVAL), || format!("dst_offset without VMBEAM_GATHER_INTO: {got:?}"))?;
    // Only page 0 moved; the rest of the source is intact and mapped.
    let src = Region::from_fd(w.region.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    let dst = Region::from_fd(w.window.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    check(src.pages_present == size / PAGE - 1 && dst.pages_present == 1, || format!("src {src:?}, dst {dst:?}"))?;
    let (byte, _) = w.aged.ok(&Request::Touch { slot: SLOT, offset: PAGE }, &[])?;
    let _ = byte;
    w.finish();
    Ok(())
}

/// What the FILL program from `seed` left in pages `from..to`, summed.
fn pages_sum(seed: u32, from: u64, to: u64) -> u32 {
    let dwords = |p: u64| (p * PAGE / 4) as u32;
    fill_sum(seed, dwords(to)).wrapping_sub(fill_sum(seed, dwords(from)))
}

/// With `runs`, the same pages named as runs, in reverse order of runs.
fn scattered_gather(dev: &Device, runs: bool) -> TestResult {
    let (size, seed) = (4 * MIB, 0x5ca7);
    let mut w = Windows::new(dev, size, seed)?;
    // Close pages (every other one), a run, and two far apart: some gaps
    // a zap may take along, some it may not.
    let mut moved: Vec<u64> = (0..64).map(|k| 2 * k + 1).collect();
    moved.extend([300, 301, 302, 700, 1000]);
    let offsets: Vec<u64> = moved.iter().rev().map(|p| p * PAGE).collect();
    let before = pfns(w.aged.pid, w.aged_hva, size)?;
    check(before.iter().all(|&f| f != 0), || "the aged mapping is not populated".into())?;
    if runs {
        let ascending: Vec<u64> = moved.iter().map(|p| p * PAGE).collect();
        let mut runs = vmbeam::runs::encode(&ascending, PAGE, false);
        runs.reverse();
        dev.gather_runs_into(w.region.as_fd(), &runs, w.window.as_fd(), 0)
    } else {
        dev.gather_into(w.region.as_fd(), &offsets, w.window.as_fd(), 0)
    }
    .map_err(|e| e.to_string())?;

    // Every moved page is unmapped in the aged VMM; of the pages that stay,
    // at most as many as moved lost their mapping (the header's bound).
    let after = pfns(w.aged.pid, w.aged_hva, size)?;
    let kept_unmapped = (0..size / PAGE).filter(|p| !moved.contains(p) && after[*p as usize] == 0).count();
    let still = moved.iter().filter(|&&p| after[p as usize] != 0).count();
    check(still == 0, || format!("{still} moved pages are still mapped in the aged VMM"))?;
    check(kept_unmapped <= moved.len(), || format!("{kept_unmapped} pages that stay lost their mapping"))?;
    println!("# {kept_unmapped} pages that stay were unmapped along with {} moved ones", moved.len());

    // The aged guest reads every page that stayed, run by run (refaulted
    // where needed), from the frames it had.
    let mut from = 0;
    for &end in moved.iter().chain(&[size / PAGE]) {
        if end > from {
            let sum = run_at(&mut w.aged, from, end)?;
            check(sum == pages_sum(seed, from, end), || format!("aged guest, pages {from}..{end}: {sum:#x}"))?;
        }
        from = end + 1;
    }
    let now = pfns(w.aged.pid, w.aged_hva, size)?;
    let changed = (0..size / PAGE).filter(|p| !moved.contains(p) && now[*p as usize] != before[*p as usize]).count();
    check(changed == 0, || format!("{changed} pages that stay are mapped from other frames"))?;

    // The window's guest reads the moved pages, in the order asked for.
    let want = moved.iter().fold(0u32, |a, &p| a.wrapping_add(pages_sum(seed, p, p + 1)));
    let sum = run(&mut w.clean, SLOT, Program::Sum, moved.len() as u64 * PAGE)?;
    check(sum == want, || format!("the window's guest sums {sum:#x}, expected {want:#x}"))?;
    // The aged VMM's own loads of every moved page: SIGBUS (probes last).
    for &p in &moved {
        expect_sigbus(&mut w.aged, SLOT, p * PAGE, &format!("the aged VMM's load of moved page {p}"))?;
    }
    w.finish();
    Ok(())
}

/// The guest's sum of pages `from..to` of its slot.
fn run_at(vmm: &mut Vmm, from: u64, to: u64) -> Result<u32, String> {
    let req = Request::Run {
        slot: SLOT,
        program: Program::Sum,
        offset: from * PAGE,
        count: ((to - from) * PAGE / 4) as u32,
        stride: 4,
    };
    vmm.ok(&req, &[]).map(|(v, _)| v as u32)
}

/// The slots the source's page i goes to: scattered over 256 pages.
fn scatter_slots(n: u64) -> Vec<u64> {
    (0..n).map(|i| (i * 37 + 5) % 256 * PAGE).collect()
}

fn scatter(dev: &Device) -> TestResult {
    let (size, seed, n) = (MIB, 0x5ca1, 64);
    // The aged VMM's region is the source: its first n pages move to
    // scattered slots of the clean VMM's window, mapped ahead of time.
    let mut w = Windows::new(dev, size, seed)?;
    let slots = scatter_slots(n);
    let before = pfns(w.aged.pid, w.aged_hva, size)?;
    let st0 = dev.stats().map_err(|e| e.to_string())?;
    dev.scatter_into(w.region.as_fd(), w.window.as_fd(), &slots).map_err(|e| e.to_string())?;
    let st = dev.stats().map_err(|e| e.to_string())?;
    check(st.bytes_copied == 0 && st.pages_owned == st0.pages_owned, || format!("stats {st0:?} -> {st:?}"))?;

    // Page i of the source is the window's slot slots[i]: its guest reads
    // the bytes there (faulting them in), from the very frame.
    for (i, &slot) in slots.iter().enumerate() {
        let sum = run_at(&mut w.clean, slot / PAGE, slot / PAGE + 1)?;
        let want = pages_sum(seed, i as u64, i as u64 + 1);
        check(sum == want, || format!("the window's guest at slot {}: {sum:#x}, expected {want:#x}", slot / PAGE))?;
    }
    let after = pfns(w.clean.pid, w.clean_hva, size)?;
    for (i, &slot) in slots.iter().enumerate() {
        let (got, want) = (after[(slot / PAGE) as usize], before[i]);
        check(got == want && want != 0, || {
            format!("window slot {}: frame {got:#x}, source page {i} {want:#x}", slot / PAGE)
        })?;
    }
    let info =
        |fd: &OwnedFd| Region::from_fd(fd.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string());
    let (src, dst) = (info(&w.region)?, info(&w.window)?);
    check(src.pages_present == size / PAGE - n && dst.pages_present == n, || {
        format!("source {src:?}, window {dst:?}")
    })?;
    // The source's pages after the first n are untouched; the moved ones
    // are gone for its guest and its VMM.
    let sum = run_at(&mut w.aged, n, size / PAGE)?;
    check(sum == pages_sum(seed, n, size / PAGE), || format!("the aged guest's kept pages sum {sum:#x}"))?;
    expect_efault(&mut w.aged, "the aged guest on a scattered page")?;
    expect_sigbus(&mut w.aged, SLOT, (n - 1) * PAGE, "the aged VMM on a scattered page")?;
    w.finish();
    Ok(())
}

/// `VMBEAM_GATHER` with any flags and `dst_offset`.
fn raw_gather(dev: &Device, src: i32, offsets: &[u64], flags: u32, dst: i32, dst_offset: u64) -> Result<i32, Errno> {
    let mut arg = vmbeam::uapi::vmbeam_gather {
        offsets: offsets.as_ptr() as u64,
        count: offsets.len() as u64,
        src_fd: src,
        flags,
        dst_fd: dst,
        dst_offset,
        ..Default::default()
    };
    // SAFETY: the struct VMBEAM_GATHER takes, with a live offsets array.
    unsafe { dev.raw_ioctl(vmbeam::uapi::VMBEAM_IOCTL_GATHER, (&raw mut arg).cast()) }
}

fn scatter_errors(dev: &Device) -> TestResult {
    let (size, seed) = (MIB, 0x5ca2);
    let mut w = Windows::new(dev, size, seed)?;
    let (r, win) = (w.region.as_fd(), w.window.as_fd());
    // One slot of the window taken, by a valid scatter of page 0.
    dev.scatter_into(r, win, &[9 * PAGE]).map_err(|e| e.to_string())?;
    let slots = scatter_slots(4);
    errno_is("a slot that holds a page", dev.scatter_into(r, win, &[PAGE, 9 * PAGE]), Errno::EEXIST)?;
    errno_is("a repeated slot", dev.scatter_into(r, win, &[PAGE, 2 * PAGE, PAGE]), Errno::EINVAL)?;
    errno_is("an unaligned slot", dev.scatter_into(r, win, &[PAGE, 100]), Errno::EINVAL)?;
    errno_is("a slot out of range", dev.scatter_into(r, win, &[PAGE, size]), Errno::EINVAL)?;
    errno_is("into itself", dev.scatter_into(r, r, &[9 * PAGE]), Errno::EINVAL)?;
    // The source's page 0 is gone now: its first pages are not all there.
    errno_is("a source page gone", dev.scatter_into(r, win, &slots), Errno::EINVAL)?;
    let small = dev.create_region(2 * PAGE).map_err(|e| e.to_string())?;
    errno_is("more slots than source pages", dev.scatter_into(small.as_fd(), win, &slots[..3]), Errno::EINVAL)?;
    let (into, scatter) = (vmbeam::uapi::VMBEAM_GATHER_INTO, vmbeam::uapi::VMBEAM_GATHER_SCATTER);
    let raw =
        |flags, dst_offset| raw_gather(dev, small.as_fd().as_raw_fd(), &slots[..2], flags, win.as_raw_fd(), dst_offset);
    for (what, flags, dst_offset) in [
        ("a nonzero dst_offset", into | scatter, PAGE),
        ("with VMBEAM_GATHER_REPLACE", into | scatter | vmbeam::uapi::VMBEAM_GATHER_REPLACE, 0),
        ("with VMBEAM_GATHER_RUNS", into | scatter | vmbeam::uapi::VMBEAM_GATHER_RUNS, 0),
    ] {
        let got = raw(flags, dst_offset);
        check(got == Err(Errno::EINVAL), || format!("scatter {what}: {got:?}"))?;
    }
    let got = raw_gather(dev, small.as_fd().as_raw_fd(), &slots[..2], scatter, 0, 0);
    check(got == Err(Errno::EINVAL), || format!("scatter without VMBEAM_GATHER_INTO: {got:?}"))?;

    // Nothing moved but the one page: the rest reads as written.
    let info = |fd: BorrowedFd<'_>| {
        Region::from_fd(fd.try_clone_to_owned().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())
    };
    let (src, dst, fresh) = (info(r)?, info(win)?, small.info().map_err(|e| e.to_string())?);
    check(src.pages_present == size / PAGE - 1 && dst.pages_present == 1 && fresh.pages_present == 2, || {
        format!("source {src:?}, window {dst:?}, small source {fresh:?}")
    })?;
    let sum = run_at(&mut w.aged, 1, size / PAGE)?;
    check(sum == pages_sum(seed, 1, size / PAGE), || format!("the aged guest sums {sum:#x} after refused scatters"))?;
    w.finish();
    Ok(())
}
