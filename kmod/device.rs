// SPDX-License-Identifier: GPL-2.0

//! `/dev/vmbeam`: the control device and its ioctls.
//!
//! The device is mode 0600 and `open` also requires `CAP_SYS_ADMIN`. Every
//! command takes one struct from `include/uapi/vmbeam.h`; the rules are the
//! same for all of them:
//!
//! | error     | when                                                        |
//! |-----------|-------------------------------------------------------------|
//! | `ENOTTY`  | the command is not a vmbeam command                         |
//! | `EINVAL`  | a vmbeam command with the wrong size or direction, unknown `flags`, nonzero `reserved`/`pad` |
//! | `EFAULT`  | the argument pointer is not readable/writable               |
//!
//! A complete userspace program:
//!
//! ```c
//! #include <fcntl.h>
//! #include <stdio.h>
//! #include <sys/ioctl.h>
//! #include <unistd.h>
//! #include "vmbeam.h"
//!
//! int main(void)
//! {
//!     struct vmbeam_version ver = { 0 };
//!     struct vmbeam_stats st = { 0 };
//!     int fd = open("/dev/vmbeam", O_RDWR | O_CLOEXEC);
//!
//!     if (fd < 0) {
//!         perror("open /dev/vmbeam (is vmbeam.ko loaded? are you root?)");
//!         return 1;
//!     }
//!     if (ioctl(fd, VMBEAM_GET_VERSION, &ver) || ioctl(fd, VMBEAM_GET_STATS, &st)) {
//!         perror("ioctl");
//!         return 1;
//!     }
//!     printf("uAPI %u: %llu regions, %llu pages owned, %llu bytes copied\n",
//!            ver.api_version, st.regions, st.pages_owned, st.bytes_copied);
//!     close(fd);
//!     return 0;
//! }
//! ```

use core::ffi::c_long;

use kernel::{
    ioctl::{_IOC_NR, _IOC_TYPE},
    prelude::*,
    types::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

use crate::{
    gather,
    owner::{Owner, Vm},
    pages::BlockSize,
    region::{Region, RegionFile},
    stats::STATS,
    transfer, uapi,
};

/// The registered misc device.
///
/// # Invariants
///
/// `/dev/vmbeam` is registered for as long as this value lives.
pub(crate) struct Registration(());

extern "C" {
    fn vmbeam_misc_register() -> core::ffi::c_int;
    fn vmbeam_misc_deregister();
}

impl Registration {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: called once, from module init; the C side registers a
        // static miscdevice whose fops belong to this module.
        kernel::error::to_result(unsafe { vmbeam_misc_register() })?;
        // INVARIANT: registration succeeded above.
        Ok(Self(()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: registered, by the type invariant; deregistered only here.
        unsafe { vmbeam_misc_deregister() };
    }
}

/// A table of the commands one kind of fd knows.
pub(crate) type Commands = &'static [u32];

/// Commands on `/dev/vmbeam`.
const DEVICE_COMMANDS: Commands = &[
    uapi::VMBEAM_IOCTL_GET_VERSION,
    uapi::VMBEAM_IOCTL_GET_STATS,
    uapi::VMBEAM_IOCTL_CREATE_REGION,
    uapi::VMBEAM_IOCTL_TRANSFER,
    uapi::VMBEAM_IOCTL_TRANSFER_BATCH,
    uapi::VMBEAM_IOCTL_GATHER,
    uapi::VMBEAM_IOCTL_BIND,
];

/// The error for a command not in `known`: a command with a known type and
/// number but another size or direction is a vmbeam command misused
/// (`EINVAL`); anything else is not ours (`ENOTTY`).
pub(crate) fn unknown_command(known: Commands, cmd: u32) -> Error {
    let misused = known
        .iter()
        .any(|&k| _IOC_TYPE(k) == _IOC_TYPE(cmd) && _IOC_NR(k) == _IOC_NR(cmd));
    if misused {
        EINVAL
    } else {
        ENOTTY
    }
}

/// `unlocked_ioctl` of `/dev/vmbeam`, called by `glue.c`.
#[no_mangle]
extern "C" fn vmbeam_rs_ioctl(cmd: u32, arg: usize) -> c_long {
    ioctl(cmd, arg).unwrap_or_else(|err| err.to_errno() as c_long)
}

fn ioctl(cmd: u32, arg: usize) -> Result<c_long> {
    match cmd {
        uapi::VMBEAM_IOCTL_GET_VERSION => with_arg(arg, get_version),
        uapi::VMBEAM_IOCTL_GET_STATS => with_arg(arg, get_stats),
        uapi::VMBEAM_IOCTL_CREATE_REGION => create_region(&read_arg(arg)?),
        uapi::VMBEAM_IOCTL_TRANSFER => transfer::transfer(core::slice::from_ref(&read_arg(arg)?)),
        uapi::VMBEAM_IOCTL_TRANSFER_BATCH => transfer::transfer_batch(&read_arg(arg)?),
        uapi::VMBEAM_IOCTL_GATHER => gather::gather(&read_arg(arg)?),
        uapi::VMBEAM_IOCTL_BIND => bind(&read_arg(arg)?),
        _ => Err(unknown_command(DEVICE_COMMANDS, cmd)),
    }
}

/// Every argument's input-only words: unknown `flags`, a nonzero `pad` or
/// `reserved` word get `EINVAL`, so later versions can give them meaning.
pub(crate) fn check_unused(flags: u32, pad: u64, reserved: &[u64]) -> Result {
    if flags != 0 || pad != 0 || reserved.iter().any(|&r| r != 0) {
        return Err(EINVAL);
    }
    Ok(())
}

/// Reads an `_IOW` command's struct from `arg`.
pub(crate) fn read_arg<T: FromBytes>(arg: usize) -> Result<T> {
    UserSlice::new(arg, core::mem::size_of::<T>())
        .reader()
        .read()
}

/// Reads an `_IOWR` command's struct from `arg`, runs `f` on it and, if `f`
/// succeeded, writes it back.
pub(crate) fn with_arg<T: FromBytes + AsBytes>(
    arg: usize,
    f: impl FnOnce(&mut T) -> Result<c_long>,
) -> Result<c_long> {
    let (mut reader, mut writer) = UserSlice::new(arg, core::mem::size_of::<T>()).reader_writer();
    let mut val: T = reader.read()?;
    let ret = f(&mut val)?;
    writer.write(&val)?;
    Ok(ret)
}

fn get_version(ver: &mut uapi::vmbeam_version) -> Result<c_long> {
    check_unused(ver.flags, 0, &ver.reserved)?;
    ver.api_version = uapi::VMBEAM_API_VERSION;
    Ok(0)
}

fn get_stats(st: &mut uapi::vmbeam_stats) -> Result<c_long> {
    check_unused(st.flags, u64::from(st.pad), &st.reserved)?;
    STATS.snapshot(st);
    Ok(0)
}

fn create_region(arg: &uapi::vmbeam_region_create) -> Result<c_long> {
    let empty = arg.flags & uapi::VMBEAM_CREATE_EMPTY != 0;
    let blocks = match arg.flags & (uapi::VMBEAM_CREATE_HUGE | uapi::VMBEAM_CREATE_HUGE_1G) {
        0 => BlockSize::Page,
        uapi::VMBEAM_CREATE_HUGE => BlockSize::Pmd,
        _ => BlockSize::Pud, // _HUGE_1G implies _HUGE
    };
    check_unused(
        arg.flags
            & !(uapi::VMBEAM_CREATE_EMPTY | uapi::VMBEAM_CREATE_HUGE | uapi::VMBEAM_CREATE_HUGE_1G),
        u64::from(arg.pad),
        &arg.reserved,
    )?;
    let fd = Region::create(arg.size, empty, blocks)?.pending_fd()?;
    Ok(fd.install() as c_long)
}

/// `VMBEAM_BIND`: binds a region to any process's VM. Holding
/// `/dev/vmbeam` (`CAP_SYS_ADMIN` at open) is the permission: QEMU creates
/// its VM itself, so whoever hands it a region did not. A region owned by
/// a live process goes only to a VM of that process ([`Owner::yields_to`]).
fn bind(arg: &uapi::vmbeam_bind) -> Result<c_long> {
    check_unused(arg.flags, u64::from(arg.pad), &arg.reserved)?;
    let file = RegionFile::get(arg.region_fd)?;
    let vm = Vm::from_fd(arg.vm_fd)?;
    file.region().bind(Owner::Vm(vm))
}
