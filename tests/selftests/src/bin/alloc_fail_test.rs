//! Allocation failure at every allocation of every module path, with the
//! kernel's own fault injection (failslab, fail_page_alloc): region
//! creation, bind, gather (new region and into a window, each also with
//! `VMBEAM_GATHER_REPLACE` out of a process-owned region), scatter (a fresh
//! region's pages into the holes of a mapped one), transfer batch.
//!
//! For each path, `/proc/thread-self/fail-nth` makes the 1st, 2nd, 3rd ...
//! fault-injectable allocation of the call fail, until a call runs through
//! with no allocation left to fail. Every injected failure must end in a
//! clean result (success, if the path has a fallback, or -ENOMEM) that
//! moved and lost nothing: the source keeps every page, the owner keeps its
//! region and its data, and once the fds close the module holds nothing.
//! The harness fails the run on any WARNING, BUG or leak report in dmesg.

use std::{
    io::{Read, Write},
    os::fd::{AsFd, AsRawFd},
};

use nix::errno::Errno;
use vmbeam::{Device, Region, Transfer};
use vmbeam_selftests::{check, guest::TestVm, require, Tap, TestResult};

const PAGES: u64 = 64;
/// Far more allocations than any one call makes: a path still failing
/// after this many is looping.
const MAX_NTH: u32 = 4000;

/// The debugfs knobs that let failslab and fail_page_alloc fail the
/// GFP_KERNEL, order-0 allocations the module makes, quietly (a stack dump
/// per failure would read as an error in dmesg), and only when fail-nth
/// asks (probability 0).
fn setup_fault_injection() -> Result<(), String> {
    let debugfs = "/sys/kernel/debug";
    if !std::path::Path::new(&format!("{debugfs}/failslab")).exists() {
        let _ = std::process::Command::new("mount").args(["-t", "debugfs", "none", debugfs]).status();
    }
    let settings = [
        ("failslab/ignore-gfp-wait", "N"),
        ("failslab/verbose", "0"),
        ("failslab/probability", "0"),
        ("fail_page_alloc/ignore-gfp-wait", "N"),
        ("fail_page_alloc/ignore-gfp-highmem", "N"),
        ("fail_page_alloc/min-order", "0"),
        ("fail_page_alloc/verbose", "0"),
        ("fail_page_alloc/probability", "0"),
    ];
    for (knob, value) in settings {
        std::fs::write(format!("{debugfs}/{knob}"), value).map_err(|e| format!("{debugfs}/{knob}: {e}"))?;
    }
    Ok(())
}

/// `/proc/thread-self/fail-nth`: this thread's n-th injectable
/// allocation fails. The file cannot seek and is read once per open, so
/// each arming opens a fresh reader first (that open's own allocations
/// happen before the count starts).
struct FailNth {
    writer: std::fs::File,
    reader: Option<std::fs::File>,
}

fn open_fail_nth() -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/thread-self/fail-nth")
        .map_err(|e| format!("/proc/thread-self/fail-nth: {e}"))
}

impl FailNth {
    fn open() -> Result<Self, String> {
        Ok(Self { writer: open_fail_nth()?, reader: None })
    }

    fn arm(&mut self, n: u32) -> Result<(), String> {
        self.reader = Some(open_fail_nth()?);
        self.writer.write_all(n.to_string().as_bytes()).map_err(|e| format!("arm fail-nth: {e}"))
    }

    /// Disarms; returns whether the failure was injected.
    fn fired(&mut self) -> Result<bool, String> {
        let mut buf = [0u8; 16];
        let mut reader = self.reader.take().ok_or("fail-nth not armed")?;
        let n = reader.read(&mut buf).map_err(|e| format!("read fail-nth: {e}"))?;
        self.writer.write_all(b"0").map_err(|e| format!("disarm fail-nth: {e}"))?;
        let text = String::from_utf8_lossy(&buf[..n]);
        let left: u32 = text.trim().parse().map_err(|e| format!("fail-nth says {text:?}: {e}"))?;
        Ok(left == 0)
    }
}

/// Runs `op` with its 1st, 2nd, ... allocation failing until it runs
/// through; `check_after` judges each outcome. Returns how many
/// allocations the path has.
fn every_nth<S>(
    fail: &mut FailNth,
    mut setup: impl FnMut() -> Result<S, String>,
    mut op: impl FnMut(&mut S) -> Result<(), vmbeam::Error>,
    mut check_after: impl FnMut(&mut S, bool) -> TestResult,
) -> Result<u32, String> {
    for n in 1..=MAX_NTH {
        let mut state = setup()?;
        fail.arm(n)?;
        let got = op(&mut state);
        let fired = fail.fired()?;
        match &got {
            Ok(()) => {}
            Err(e) if e.errno() == Some(Errno::ENOMEM) && fired => {}
            Err(e) => return Err(format!("allocation {n} (injected: {fired}): {e}")),
        }
        check_after(&mut state, got.is_ok()).map_err(|e| format!("after allocation {n} failed: {e}"))?;
        if !fired {
            return Ok(n - 1);
        }
    }
    Err(format!("still failing after {MAX_NTH} allocations"))
}

fn err(e: vmbeam::Error) -> String {
    e.to_string()
}

/// A VM with a region of PAGES pages bound to it (or to this process),
/// mapped, every page's first byte set to its index.
struct Owned {
    vm: TestVm,
    region: Region,
    map: *mut u8,
}

impl Owned {
    fn new(dev: &Device) -> Result<Self, String> {
        Self::with_owner(dev, false)
    }

    /// With `process`, the region is bound to this process itself
    /// (`VMBEAM_BIND_PROCESS`), not to the VM.
    fn with_owner(dev: &Device, process: bool) -> Result<Self, String> {
        let vm = TestVm::new()?;
        let region = dev.create_region(PAGES * 4096).map_err(err)?;
        if process {
            region.bind_process().map_err(err)?;
        } else {
            region.bind(vm.vm_borrowed()).map_err(err)?;
        }
        // SAFETY: a fresh shared mapping of the region, unmapped in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (PAGES * 4096) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                region.as_fd().as_raw_fd(),
                0,
            )
        };
        check(map != libc::MAP_FAILED, || format!("mmap: {}", std::io::Error::last_os_error()))?;
        let map = map.cast::<u8>();
        for page in 0..PAGES {
            // SAFETY: inside the mapping.
            unsafe { map.add((page * 4096) as usize).write_volatile(page as u8) };
        }
        Ok(Self { vm, region, map })
    }

    /// Every page present, owned, and holding its index.
    fn intact(&self) -> TestResult {
        self.replaced(&[])
    }

    /// Every page present and owned; `zeroed` ones (fresh pages of a
    /// replacing gather) hold 0, the others their index.
    fn replaced(&self, zeroed: &[u64]) -> TestResult {
        let info = self.region.info().map_err(err)?;
        check(info.owned && info.pages_present == PAGES, || format!("source region now {info:?}"))?;
        for page in 0..PAGES {
            // SAFETY: inside the mapping; the region is ours (checked).
            let got = unsafe { self.map.add((page * 4096) as usize).read_volatile() };
            let want = if zeroed.contains(&page) { 0 } else { page as u8 };
            check(got == want, || format!("page {page} holds {got}, expected {want}"))?;
        }
        Ok(())
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.map.cast(), (PAGES * 4096) as usize) };
    }
}

fn main() {
    let dev = require::vmbeam_and_kvm();
    if let Err(why) = setup_fault_injection() {
        Tap::skip_all(&format!("no fault injection in this kernel (CONFIG_FAULT_INJECTION_DEBUG_FS): {why}"));
    }
    let mut fail = FailNth::open().unwrap_or_else(|e| Tap::skip_all(&e));
    let stats0 = dev.stats().expect("stats");
    let mut tap = Tap::new(9);
    let note = |what: &str, n: u32| println!("# {what}: {n} injectable allocations on its path, each failed once");

    tap.test("create_region_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok(None),
            |made: &mut Option<Region>| dev.create_region(PAGES * 4096).map(|r| *made = Some(r)),
            |made, ok| {
                let st = dev.stats().map_err(err)?;
                let want = stats0.regions + u64::from(ok);
                check(st.regions == want, || format!("{} regions, expected {want}", st.regions))?;
                *made = None;
                Ok(())
            },
        )?;
        note("create", n);
        Ok(())
    });

    tap.test("bind_fails_cleanly_at_every_allocation", || {
        let vm = TestVm::new()?;
        let n = every_nth(
            &mut fail,
            || dev.create_region(4096).map_err(err),
            |r| r.bind(vm.vm_borrowed()),
            |r, ok| {
                let info = r.info().map_err(err)?;
                check(info.owned == ok, || format!("bind {}: region {info:?}", if ok { "succeeded" } else { "failed" }))
            },
        )?;
        note("bind", n);
        Ok(())
    });

    tap.test("gather_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok((Owned::new(&dev)?, None)),
            |(s, out): &mut (Owned, Option<Region>)| {
                dev.gather(s.region.as_fd(), &[5 * 4096, 2 * 4096, 9 * 4096]).map(|r| *out = Some(r))
            },
            |(s, out), ok| {
                if ok {
                    let got = out.take().ok_or("no region")?.info().map_err(err)?;
                    check(got.pages_present == 3, || format!("gathered region {got:?}"))
                } else {
                    s.intact()
                }
            },
        )?;
        note("gather", n);
        Ok(())
    });

    tap.test("gather_into_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok((Owned::new(&dev)?, dev.create_empty_region(8 * 4096).map_err(err)?)),
            |(s, dst)| dev.gather_into(s.region.as_fd(), &[4096, 7 * 4096], dst.as_fd(), 4096),
            |(s, dst), ok| {
                let got = dst.info().map_err(err)?;
                if ok {
                    check(got.pages_present == 2, || format!("window after gather-into: {got:?}"))
                } else {
                    check(got.pages_present == 0, || format!("window after a failed gather-into: {got:?}"))?;
                    s.intact()
                }
            },
        )?;
        note("gather-into", n);
        Ok(())
    });

    // Out of a region this process owns and maps: the fresh pages come
    // before anything moves, so a failure leaves the source whole and the
    // counters where they were; a success leaves zeros where pages left.
    let pages_owned = || dev.stats().map(|s| s.pages_owned).map_err(err);
    tap.test("gather_replace_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok((Owned::with_owner(&dev, true)?, None, pages_owned()?)),
            |(s, out, _): &mut (Owned, Option<Region>, u64)| {
                dev.gather_replacing(s.region.as_fd(), &[5 * 4096, 2 * 4096]).map(|r| *out = Some(r))
            },
            |(s, out, owned0), ok| {
                let owned = pages_owned()?;
                if ok {
                    let got = out.take().ok_or("no region")?.info().map_err(err)?;
                    check(got.pages_present == 2 && owned == *owned0 + 2, || {
                        format!("gathered region {got:?}, pages owned {owned0} -> {owned}")
                    })?;
                    s.replaced(&[5, 2])
                } else {
                    check(owned == *owned0, || format!("a failed gather: pages owned {owned0} -> {owned}"))?;
                    s.intact()
                }
            },
        )?;
        note("gather with REPLACE", n);
        Ok(())
    });

    tap.test("gather_into_replace_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok((Owned::with_owner(&dev, true)?, dev.create_empty_region(8 * 4096).map_err(err)?, pages_owned()?)),
            |(s, dst, _)| dev.gather_into_replacing(s.region.as_fd(), &[4096, 7 * 4096], dst.as_fd(), 4096),
            |(s, dst, owned0), ok| {
                let (got, owned) = (dst.info().map_err(err)?, pages_owned()?);
                if ok {
                    check(got.pages_present == 2 && owned == *owned0 + 2, || {
                        format!("window after gather-into: {got:?}, pages owned {owned0} -> {owned}")
                    })?;
                    s.replaced(&[1, 7])
                } else {
                    check(got.pages_present == 0 && owned == *owned0, || {
                        format!("window after a failed gather-into: {got:?}, pages owned {owned0} -> {owned}")
                    })?;
                    s.intact()
                }
            },
        )?;
        note("gather-into with REPLACE", n);
        Ok(())
    });

    // Holes refilled with a fresh region's pages: a failure leaves the
    // holes and the fresh region as they were; a success leaves zeros.
    let holes = [9 * 4096, 2 * 4096, 5 * 4096];
    tap.test("scatter_into_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || {
                let s = Owned::new(&dev)?;
                let gone = dev.gather(s.region.as_fd(), &holes).map_err(err)?;
                Ok((s, gone, dev.create_region(3 * 4096).map_err(err)?))
            },
            |(s, _, fresh)| dev.scatter_into(fresh.as_fd(), s.region.as_fd(), &holes),
            |(s, _, fresh), ok| {
                let (dst, src) = (s.region.info().map_err(err)?, fresh.info().map_err(err)?);
                if ok {
                    check(src.pages_present == 0, || format!("fresh region after the scatter: {src:?}"))?;
                    s.replaced(&[9, 2, 5])
                } else {
                    check(dst.pages_present == PAGES - 3 && src.pages_present == 3, || {
                        format!("a failed scatter: region {dst:?}, fresh region {src:?}")
                    })
                }
            },
        )?;
        note("scatter", n);
        Ok(())
    });

    tap.test("transfer_batch_fails_cleanly_at_every_allocation", || {
        let n = every_nth(
            &mut fail,
            || Ok((Owned::new(&dev)?, Owned::new(&dev)?, TestVm::new()?)),
            |(one, two, to)| {
                let (one_vm, two_vm) = (one.vm.vm_borrowed(), two.vm.vm_borrowed());
                dev.transfer_batch(&[
                    Transfer { region: one.region.as_fd(), from_vm: one_vm, to_vm: to.vm_borrowed() },
                    Transfer { region: two.region.as_fd(), from_vm: two_vm, to_vm: to.vm_borrowed() },
                ])
            },
            |(one, two, to), ok| {
                if ok {
                    return Ok(());
                }
                one.intact()?;
                two.intact()?;
                // Still the old owners': they can give the regions away.
                let back =
                    Transfer { region: one.region.as_fd(), from_vm: one.vm.vm_borrowed(), to_vm: to.vm_borrowed() };
                dev.transfer(back).map_err(|e| format!("the old owner cannot move its region any more: {e}"))
            },
        )?;
        note("transfer batch", n);
        Ok(())
    });

    tap.test("counters_return_to_baseline", || {
        let st = dev.stats().map_err(err)?;
        check(st.regions == stats0.regions && st.pages_owned == stats0.pages_owned, || format!("{st:?}"))
    });
    tap.finish()
}
