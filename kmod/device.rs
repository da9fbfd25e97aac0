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

use crate::{stats::STATS, uapi};

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

/// Every command this module knows. A command with a known type and number
/// but another size or direction is a vmbeam command misused: `EINVAL`.
const COMMANDS: [u32; 2] = [uapi::VMBEAM_IOCTL_GET_VERSION, uapi::VMBEAM_IOCTL_GET_STATS];

/// `unlocked_ioctl` of `/dev/vmbeam`, called by `glue.c`.
#[no_mangle]
extern "C" fn vmbeam_rs_ioctl(cmd: u32, arg: usize) -> c_long {
    match ioctl(cmd, arg) {
        Ok(ret) => ret,
        Err(err) => err.to_errno() as c_long,
    }
}

fn ioctl(cmd: u32, arg: usize) -> Result<c_long> {
    match cmd {
        uapi::VMBEAM_IOCTL_GET_VERSION => with_arg(arg, get_version),
        uapi::VMBEAM_IOCTL_GET_STATS => with_arg(arg, get_stats),
        _ if is_misused_command(cmd) => Err(EINVAL),
        _ => Err(ENOTTY),
    }
}

fn is_misused_command(cmd: u32) -> bool {
    COMMANDS
        .iter()
        .any(|&known| _IOC_TYPE(known) == _IOC_TYPE(cmd) && _IOC_NR(known) == _IOC_NR(cmd))
}

/// Reads the command's struct from `arg`, runs `f` on it and writes it back.
fn with_arg<T: FromBytes + AsBytes>(arg: usize, f: impl FnOnce(&mut T) -> Result<c_long>) -> Result<c_long> {
    let (mut reader, mut writer) = UserSlice::new(arg, core::mem::size_of::<T>()).reader_writer();
    let mut val: T = reader.read()?;
    let ret = f(&mut val)?;
    writer.write(&val)?;
    Ok(ret)
}

fn get_version(ver: &mut uapi::vmbeam_version) -> Result<c_long> {
    if ver.flags != 0 || ver.reserved.iter().any(|&r| r != 0) {
        return Err(EINVAL);
    }
    ver.api_version = uapi::VMBEAM_API_VERSION;
    Ok(0)
}

fn get_stats(st: &mut uapi::vmbeam_stats) -> Result<c_long> {
    if st.flags != 0 || st.pad != 0 || st.reserved.iter().any(|&r| r != 0) {
        return Err(EINVAL);
    }
    STATS.snapshot(st);
    Ok(0)
}
