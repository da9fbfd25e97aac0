//! /dev/vmbeam: permissions, version, counters, and the module's answer to
//! every kind of bad argument.

use std::{
    io::Seek,
    os::unix::fs::{FileTypeExt, MetadataExt},
};

use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitStatus},
    unistd::{fork, setgid, setuid, ForkResult, Gid, Uid},
};
use vmbeam::{uapi, Device, DEVICE_PATH};
use vmbeam_selftests::{check, Tap, TestResult};

/// `cmd` with its size field replaced by `size`.
fn with_size(cmd: u32, size: u32) -> u32 {
    const SIZE_SHIFT: u32 = 16;
    const SIZE_MASK: u32 = 0x3fff << SIZE_SHIFT;
    (cmd & !SIZE_MASK) | (size << SIZE_SHIFT)
}

fn expect_errno(what: &str, got: Result<i32, Errno>, want: Errno) -> TestResult {
    check(got == Err(want), || format!("{what}: expected {want} ({}), got {got:?}", want.desc()))
}

fn main() {
    let dev = match Device::open() {
        Ok(dev) => dev,
        Err(e) => Tap::skip_all(&format!("{e}")),
    };
    let mut tap = Tap::new(14);

    tap.test("device_is_root_owned_char_device_mode_0600", || {
        let md = std::fs::metadata(DEVICE_PATH).map_err(|e| e.to_string())?;
        check(md.file_type().is_char_device(), || "not a character device".into())?;
        check(md.mode() & 0o7777 == 0o600, || format!("mode {:o}, expected 600", md.mode() & 0o7777))?;
        check(md.uid() == 0 && md.gid() == 0, || format!("owner {}:{}, expected 0:0", md.uid(), md.gid()))
    });

    tap.test("region_fd_reports_its_size_in_fstat_and_lseek", || {
        // VMMs (vm-memory, QEMU's memory-backend-file) check the file size.
        let region = dev.create_region(3 << 20).map_err(|e| e.to_string())?;
        let file = std::fs::File::from(region.into_fd());
        let md = file.metadata().map_err(|e| e.to_string())?;
        check(md.len() == 3 << 20, || format!("fstat size {}, expected {}", md.len(), 3 << 20))?;
        let end = (&file).seek(std::io::SeekFrom::End(0)).map_err(|e| e.to_string())?;
        check(end == 3 << 20, || format!("lseek(SEEK_END) {end}, expected {}", 3 << 20))
    });

    tap.test("get_version_returns_api_version", || {
        let v = dev.api_version().map_err(|e| e.to_string())?;
        check(v == uapi::VMBEAM_API_VERSION, || format!("module says {v}, header says {}", uapi::VMBEAM_API_VERSION))
    });

    tap.test("stats_are_zero_without_regions", || {
        // What lives is 0 whatever ran before; the counters since the
        // module's load are 0 only when this runs first after insmod.
        let st = dev.stats().map_err(|e| e.to_string())?;
        let live = [st.regions, st.pages_owned, st.bytes_copied];
        check(live.iter().all(|&c| c == 0), || format!("expected no region, no page, no byte copied: {st:?}"))
    });

    tap.test("foreign_ioctl_is_enotty", || {
        let mut buf = [0u8; 64];
        // TCGETS: a tty ioctl, not ours.
        // SAFETY: buf is 64 writable bytes, more than any command here needs.
        let got = unsafe { dev.raw_ioctl(libc::TCGETS as u32, buf.as_mut_ptr().cast()) };
        expect_errno("TCGETS", got, Errno::ENOTTY)
    });

    tap.test("unknown_vmbeam_command_is_enotty", || {
        let mut buf = [0u8; 64];
        let cmd = (uapi::VMBEAM_IOCTL_GET_STATS & !0xff) | 0x7f; // our magic, unused nr
                                                                 // SAFETY: as above.
        let got = unsafe { dev.raw_ioctl(cmd, buf.as_mut_ptr().cast()) };
        expect_errno("nr 0x7f", got, Errno::ENOTTY)
    });

    tap.test("wrong_size_is_einval", || {
        let mut buf = [0u8; 256];
        for (name, cmd) in
            [("GET_VERSION", uapi::VMBEAM_IOCTL_GET_VERSION), ("GET_STATS", uapi::VMBEAM_IOCTL_GET_STATS)]
        {
            for size in [0, 8, 200] {
                // SAFETY: buf is 256 writable bytes >= any size here.
                let got = unsafe { dev.raw_ioctl(with_size(cmd, size), buf.as_mut_ptr().cast()) };
                expect_errno(&format!("{name} with size {size}"), got, Errno::EINVAL)?;
            }
        }
        Ok(())
    });

    tap.test("wrong_direction_is_einval", || {
        let mut buf = [0u8; 256];
        let read_only = uapi::VMBEAM_IOCTL_GET_STATS & !(1 << 30); // drop _IOC_WRITE
                                                                   // SAFETY: as above.
        let got = unsafe { dev.raw_ioctl(read_only, buf.as_mut_ptr().cast()) };
        expect_errno("GET_STATS as _IOR", got, Errno::EINVAL)
    });

    tap.test("unknown_flags_are_einval", || {
        let mut ver = uapi::vmbeam_version { flags: 1, ..Default::default() };
        // SAFETY: ver is the struct GET_VERSION takes.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_VERSION, (&raw mut ver).cast()) };
        expect_errno("GET_VERSION flags=1", got, Errno::EINVAL)?;
        let mut st = uapi::vmbeam_stats { flags: 1 << 31, ..Default::default() };
        // SAFETY: st is the struct GET_STATS takes.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_STATS, (&raw mut st).cast()) };
        expect_errno("GET_STATS flags=1<<31", got, Errno::EINVAL)
    });

    tap.test("nonzero_reserved_or_pad_is_einval", || {
        let mut ver = uapi::vmbeam_version::default();
        ver.reserved[2] = 1;
        // SAFETY: ver is the struct GET_VERSION takes.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_VERSION, (&raw mut ver).cast()) };
        expect_errno("GET_VERSION reserved[2]=1", got, Errno::EINVAL)?;
        let mut st = uapi::vmbeam_stats { pad: 1, ..Default::default() };
        // SAFETY: st is the struct GET_STATS takes.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_STATS, (&raw mut st).cast()) };
        expect_errno("GET_STATS pad=1", got, Errno::EINVAL)?;
        let mut st = uapi::vmbeam_stats::default();
        st.reserved[3] = u64::MAX;
        // SAFETY: as above.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_STATS, (&raw mut st).cast()) };
        expect_errno("GET_STATS reserved[3]", got, Errno::EINVAL)
    });

    tap.test("rejected_argument_is_left_untouched", || {
        let mut st = uapi::vmbeam_stats { flags: 2, regions: 0xdead, ..Default::default() };
        // SAFETY: st is the struct GET_STATS takes.
        let _ = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_STATS, (&raw mut st).cast()) };
        check(st.regions == 0xdead, || format!("module wrote {:#x} into a rejected argument", st.regions))
    });

    tap.test("bad_pointer_is_efault", || {
        // SAFETY: the module must not touch user memory at a kernel address;
        // this process's memory is not involved.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_STATS, 0xffff_8000_0000_0000usize as *mut _) };
        expect_errno("GET_STATS at a kernel address", got, Errno::EFAULT)?;
        // SAFETY: NULL is never dereferenced by this process.
        let got = unsafe { dev.raw_ioctl(uapi::VMBEAM_IOCTL_GET_VERSION, std::ptr::null_mut()) };
        expect_errno("GET_VERSION at NULL", got, Errno::EFAULT)
    });

    tap.test("non_root_open_is_refused", || {
        let status = match unsafe { fork() }.map_err(|e| e.to_string())? {
            ForkResult::Child => {
                let code = (|| {
                    setgid(Gid::from_raw(65534)).ok()?;
                    setuid(Uid::from_raw(65534)).ok()?;
                    match Device::open() {
                        Err(e) if e.errno() == Some(Errno::EACCES) => Some(0),
                        Err(_) => Some(2),
                        Ok(_) => Some(3),
                    }
                })()
                .unwrap_or(1);
                // SAFETY: leaving the forked child without running the
                // parent's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).map_err(|e| e.to_string())?,
        };
        let what = match status {
            WaitStatus::Exited(_, 0) => return Ok(()),
            WaitStatus::Exited(_, 1) => "could not drop to uid 65534".to_string(),
            WaitStatus::Exited(_, 2) => "open failed, but not with EACCES".to_string(),
            WaitStatus::Exited(_, 3) => "uid 65534 opened /dev/vmbeam".to_string(),
            other => format!("child: {other:?}"),
        };
        Err(what)
    });

    tap.test("root_without_cap_sys_admin_is_eperm", || {
        let status = match unsafe { fork() }.map_err(|e| e.to_string())? {
            ForkResult::Child => {
                // Stay uid 0 (mode 0600 lets us in) but drop CAP_SYS_ADMIN.
                let dropped = caps::drop(None, caps::CapSet::Effective, caps::Capability::CAP_SYS_ADMIN).is_ok();
                let code = match (dropped, Device::open()) {
                    (false, _) => 1,
                    (true, Err(e)) if e.errno() == Some(Errno::EPERM) => 0,
                    (true, Err(_)) => 2,
                    (true, Ok(_)) => 3,
                };
                // SAFETY: as in the test above.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).map_err(|e| e.to_string())?,
        };
        match status {
            WaitStatus::Exited(_, 0) => Ok(()),
            WaitStatus::Exited(_, 1) => Err("could not drop CAP_SYS_ADMIN".into()),
            WaitStatus::Exited(_, 2) => Err("open failed, but not with EPERM".into()),
            WaitStatus::Exited(_, 3) => Err("opened /dev/vmbeam without CAP_SYS_ADMIN".into()),
            other => Err(format!("child: {other:?}")),
        }
    });

    tap.finish()
}
