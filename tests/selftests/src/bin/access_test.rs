//! Who may do what with a region (README, "Threat model"), tried by the
//! processes that must be refused:
//!
//! - a root process that is not the owner's VMM, holding the region fd,
//!   cannot map it (EACCES), bind it while its owner lives (EBUSY), bind
//!   it to a VM it did not create (EPERM), or take it with a VM fd that is
//!   not the owner's (EPERM);
//! - an unprivileged process (nobody) handed the region fd cannot map it,
//!   cannot bind it to another process's VM, cannot open /dev/vmbeam, and
//!   cannot reopen a root process's region fd through /proc;
//! - a region owned by a process (`VMBEAM_BIND_PROCESS`) refuses every
//!   other process the same way, its own forked child and nobody included
//!   (mmap `EACCES`, binds `EBUSY`, transfers `EPERM`);
//! - none of these refusals changes the region: its owner still reads what
//!   its guest wrote.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitStatus},
    unistd::{fork, setgid, setuid, ForkResult, Gid, Uid},
};
use vmbeam::{Device, Region, Transfer};
use vmbeam_selftests::{
    check,
    pair::{count, run, Pair},
    require::{self, errno_is},
    vmm::Program,
    Tap, TestResult,
};

fn map(region: &impl AsFd) -> Result<(), Errno> {
    // SAFETY: a new shared mapping at an address the kernel picks,
    // unmapped at once; nothing is touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            region.as_fd().as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // SAFETY: the mapping just made.
    unsafe { libc::munmap(addr, 4096) };
    Ok(())
}

/// Runs `body` in a child that dropped to nobody; its `Err` comes back as
/// the test's error.
fn as_nobody(what: &str, body: impl FnOnce() -> Result<(), String>) -> TestResult {
    as_child(what, Some(Uid::from_raw(65534)), body)
}

/// Runs `body` in a forked child, as `uid` (and its group) if given; its
/// `Err` comes back as the test's error.
fn as_child(what: &str, uid: Option<Uid>, body: impl FnOnce() -> Result<(), String>) -> TestResult {
    let (read, write) = nix::unistd::pipe().map_err(|e| e.to_string())?;
    // SAFETY: the selftest is single-threaded; the child only makes
    // syscalls, writes its verdict and leaves with _exit.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => {
            drop(read);
            let drop_to = |uid: Uid| setgid(Gid::from_raw(uid.as_raw())).and_then(|_| setuid(uid));
            let verdict = uid.map_or(Ok(()), drop_to).map_err(|e| format!("setuid {uid:?}: {e}")).and_then(|_| body());
            let msg = verdict.err().unwrap_or_default();
            let _ = nix::unistd::write(&write, msg.as_bytes());
            // SAFETY: leave without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(write);
            let mut msg = String::new();
            let _ = std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut msg);
            let status = waitpid(child, None).map_err(|e| e.to_string())?;
            check(status == WaitStatus::Exited(child, 0), || format!("{what}: child {status:?}"))?;
            check(msg.is_empty(), || format!("{what}: {msg}"))
        }
    }
}

fn expect(what: &str, got: Result<(), Errno>, want: Errno) -> Result<(), String> {
    match got {
        Err(e) if e == want => Ok(()),
        other => Err(format!("{what}: expected {want} ({}), got {other:?}", want.desc())),
    }
}

fn vmbeam_errno(r: Result<(), vmbeam::Error>) -> Result<(), Errno> {
    r.map_err(|e| e.errno().unwrap_or(Errno::UnknownErrno))
}

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(5);
    let mut pair = Pair::new(1 << 20, 64, 0xacce55).unwrap_or_else(|e| panic!("set-up: {e}"));
    let region = pair.region.try_clone().expect("dup region fd");
    let stranger_vm = vmbeam_selftests::guest::TestVm::new().unwrap_or_else(|e| panic!("VM: {e}"));

    tap.test("root_non_owner_with_the_region_fd_is_refused", || {
        expect("mmap by a root process that is not the owner's VMM", map(&region), Errno::EACCES)?;
        let r = Region::from_fd(region.try_clone().map_err(|e| e.to_string())?);
        errno_is("REGION_BIND while the owner lives", r.bind(stranger_vm.vm_borrowed()), Errno::EBUSY)?;
        errno_is("REGION_BIND to a VM another process created", r.bind(pair.clean_vm.as_fd()), Errno::EPERM)?;
        let steal =
            Transfer { region: region.as_fd(), from_vm: stranger_vm.vm_borrowed(), to_vm: pair.clean_vm.as_fd() };
        errno_is("TRANSFER naming a VM that is not the owner", dev.transfer(steal), Errno::EPERM)?;
        let info = r.info().map_err(|e| e.to_string())?;
        check(info.owned && !info.mine && !info.moving, || format!("region after the refusals: {info:?}"))
    });

    tap.test("unprivileged_process_with_the_region_fd_is_refused", || {
        let region = region.try_clone().map_err(|e| e.to_string())?;
        let other_vm: OwnedFd = pair.clean_vm.try_clone().map_err(|e| e.to_string())?;
        as_nobody("nobody", move || {
            expect("mmap by nobody", map(&region), Errno::EACCES)?;
            let open = Device::open().err().and_then(|e| e.errno());
            check(matches!(open, Some(Errno::EACCES | Errno::EPERM)), || {
                format!("nobody opened /dev/vmbeam: {open:?}")
            })?;
            let r = Region::from_fd(region);
            let got = vmbeam_errno(r.bind(other_vm.as_fd()));
            check(matches!(got, Err(Errno::EPERM | Errno::EBUSY)), || format!("nobody's REGION_BIND: {got:?}"))?;
            // Region info is harmless and allowed: size and state only.
            r.info().map(drop).map_err(|e| format!("REGION_INFO: {e}"))
        })
    });

    tap.test("unprivileged_process_cannot_reopen_a_root_region_fd", || {
        let path = format!("/proc/{}/fd/{}", std::process::id(), region.as_raw_fd());
        as_nobody("nobody", move || {
            let got = std::fs::OpenOptions::new().read(true).write(true).open(&path);
            check(got.as_ref().err().and_then(std::io::Error::raw_os_error) == Some(libc::EACCES), || {
                format!("nobody opened {path}: {got:?}")
            })
        })
    });

    tap.test("a_process_owned_region_refuses_every_other_process", || {
        let owned = dev.create_region(1 << 20).map_err(|e| e.to_string())?;
        owned.bind_process().map_err(|e| e.to_string())?;
        map(&owned).map_err(|e| format!("the owner process cannot map its region: {e}"))?;
        let fd = owned.as_fd().try_clone_to_owned().map_err(|e| e.to_string())?;
        let to_vm: OwnedFd = pair.clean_vm.try_clone().map_err(|e| e.to_string())?;
        let steal = Transfer { region: owned.as_fd(), from_vm: stranger_vm.vm_borrowed(), to_vm: to_vm.as_fd() };
        errno_is("TRANSFER of a process-owned region", dev.transfer(steal), Errno::EPERM)?;
        errno_is("VMBEAM_BIND to another process's VM", dev.bind(owned.as_fd(), to_vm.as_fd()), Errno::EBUSY)?;
        // The owner's own child (root) and nobody: a fork is another process.
        as_child("the owner's forked child", None, {
            let fd = fd.try_clone().map_err(|e| e.to_string())?;
            move || {
                expect("mmap by the owner's child", map(&fd), Errno::EACCES)?;
                errno_is("BIND_PROCESS by the owner's child", Region::from_fd(fd).bind_process(), Errno::EBUSY)
            }
        })?;
        as_nobody("nobody", move || {
            expect("mmap by nobody", map(&fd), Errno::EACCES)?;
            let r = Region::from_fd(fd);
            errno_is("BIND_PROCESS by nobody", r.bind_process(), Errno::EBUSY)?;
            let info = r.info().map_err(|e| format!("REGION_INFO: {e}"))?;
            check(info.owned && !info.mine, || format!("nobody's REGION_INFO: {info:?}"))
        })?;
        let info = owned.info().map_err(|e| e.to_string())?;
        check(info.owned && info.mine && info.pages_present == 256, || format!("the owner's REGION_INFO: {info:?}"))
    });

    tap.test("refusals_change_nothing_the_owner_still_reads_its_data", || {
        let sum = run(&mut pair.aged, Program::Sum, 0, count(pair.size, pair.stride), pair.stride)?;
        check(sum == pair.written, || format!("owner's guest sums {sum:#x}, wrote {:#x}", pair.written))?;
        Ok(())
    });
    pair.finish();
    tap.finish()
}
