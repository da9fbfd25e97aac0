//! `/dev/vmbeam`, the control device.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
};

use nix::errno::Errno;

use crate::{uapi, Error};

pub const DEVICE_PATH: &str = "/dev/vmbeam";

// The ioctl table: numbers from the header (via bindgen), never retyped.
// Each needs an open /dev/vmbeam, i.e. root with CAP_SYS_ADMIN.
nix::ioctl_readwrite_bad!(ioctl_get_version, uapi::VMBEAM_IOCTL_GET_VERSION, uapi::vmbeam_version);
nix::ioctl_readwrite_bad!(ioctl_get_stats, uapi::VMBEAM_IOCTL_GET_STATS, uapi::vmbeam_stats);

/// An open `/dev/vmbeam`.
#[derive(Debug)]
pub struct Device {
    file: File,
}

impl Device {
    /// Opens `/dev/vmbeam` (read-write, close-on-exec).
    pub fn open() -> Result<Self, Error> {
        match OpenOptions::new().read(true).write(true).open(DEVICE_PATH) {
            Ok(file) => Ok(Self { file }),
            Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => Err(Error::NotLoaded { path: DEVICE_PATH }),
                errno => Err(Error::Open { path: DEVICE_PATH, errno }),
            },
        }
    }

    /// The module's `VMBEAM_API_VERSION`.
    pub fn api_version(&self) -> Result<u32, Error> {
        let mut ver = uapi::vmbeam_version::default();
        // SAFETY: the fd is /dev/vmbeam and `ver` is the struct this command
        // takes, writable for its whole size.
        unsafe { ioctl_get_version(self.file.as_raw_fd(), &mut ver) }
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_GET_VERSION", errno })?;
        Ok(ver.api_version)
    }

    /// Module-wide counters.
    pub fn stats(&self) -> Result<uapi::vmbeam_stats, Error> {
        let mut st = uapi::vmbeam_stats::default();
        // SAFETY: as in `api_version`, for `vmbeam_stats`.
        unsafe { ioctl_get_stats(self.file.as_raw_fd(), &mut st) }
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_GET_STATS", errno })?;
        Ok(st)
    }

    /// Issues a raw ioctl on the device; for tests of the module's argument
    /// checking. Returns the ioctl's result or its errno.
    ///
    /// # Safety
    ///
    /// `arg` must be valid for whatever `cmd` reads or writes.
    pub unsafe fn raw_ioctl(&self, cmd: u32, arg: *mut libc::c_void) -> Result<i32, Errno> {
        // SAFETY: the caller guarantees `arg` fits `cmd`.
        Errno::result(unsafe { libc::ioctl(self.file.as_raw_fd(), cmd as libc::c_ulong, arg) })
    }
}
