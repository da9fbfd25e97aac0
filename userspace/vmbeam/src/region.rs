//! Regions and transfers.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{uapi, Error};

nix::ioctl_write_ptr_bad!(ioctl_region_bind, uapi::VMBEAM_IOCTL_REGION_BIND, uapi::vmbeam_region_bind);
nix::ioctl_readwrite_bad!(ioctl_region_info, uapi::VMBEAM_IOCTL_REGION_INFO, uapi::vmbeam_region_info);

/// A region of guest memory owned by vmbeam.ko (a region fd).
#[derive(Debug)]
pub struct Region {
    fd: OwnedFd,
}

/// A region's state, from `VMBEAM_REGION_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    pub pages_present: u64,
    /// Bound to a VM whose process runs, or to a process that runs.
    pub owned: bool,
    /// Owned by a VM of the calling process, or by the calling process.
    pub mine: bool,
    /// Between the revoke and grant phases of a transfer.
    pub moving: bool,
}

impl Region {
    /// Wraps a region fd (e.g. received over SCM_RIGHTS). The module checks
    /// it on every use: a fd that is not a region gets `EINVAL`.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub(crate) fn from_raw_ioctl_result(fd: i32) -> Self {
        // SAFETY: the module returned a new fd that nothing else owns.
        Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }

    /// Makes the KVM VM behind `vm` the owner; the caller must have created it.
    pub fn bind(&self, vm: BorrowedFd<'_>) -> Result<(), Error> {
        let arg = uapi::vmbeam_region_bind { vm_fd: vm.as_raw_fd(), ..Default::default() };
        // SAFETY: a region fd and the struct this command takes.
        unsafe { ioctl_region_bind(self.fd.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_REGION_BIND", errno })
    }

    /// Makes the calling process itself the owner (`VMBEAM_BIND_PROCESS`):
    /// then only this process (also after it `execve`s: the same pid) may
    /// map the region, through its current address space, and KVM maps it
    /// for the VMs it creates. For a launcher that binds a VMM's RAM and
    /// then execs the VMM, which maps `/proc/self/fd/N` (keep the fd open
    /// across the exec). The region cannot be transferred, only gathered
    /// from; it is ownerless again once the process has exited.
    pub fn bind_process(&self) -> Result<(), Error> {
        let arg = uapi::vmbeam_region_bind { vm_fd: -1, flags: uapi::VMBEAM_BIND_PROCESS, ..Default::default() };
        // SAFETY: a region fd and the struct this command takes.
        unsafe { ioctl_region_bind(self.fd.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_REGION_BIND(VMBEAM_BIND_PROCESS)", errno })
    }

    pub fn info(&self) -> Result<RegionInfo, Error> {
        let mut arg = uapi::vmbeam_region_info::default();
        // SAFETY: a region fd and the struct this command takes.
        unsafe { ioctl_region_info(self.fd.as_raw_fd(), &mut arg) }
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_REGION_INFO", errno })?;
        Ok(RegionInfo {
            size: arg.size,
            pages_present: arg.pages_present,
            owned: arg.state & uapi::VMBEAM_REGION_OWNED != 0,
            mine: arg.state & uapi::VMBEAM_REGION_MINE != 0,
            moving: arg.state & uapi::VMBEAM_REGION_MOVING != 0,
        })
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Region {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One transfer of a batch: `region` moves from VM `from` to VM `to`.
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    pub region: BorrowedFd<'a>,
    pub from_vm: BorrowedFd<'a>,
    pub to_vm: BorrowedFd<'a>,
}

impl Transfer<'_> {
    pub(crate) fn to_uapi(self) -> uapi::vmbeam_transfer {
        uapi::vmbeam_transfer {
            region_fd: self.region.as_raw_fd(),
            from_vm_fd: self.from_vm.as_raw_fd(),
            to_vm_fd: self.to_vm.as_raw_fd(),
            ..Default::default()
        }
    }
}
