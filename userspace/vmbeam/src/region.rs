//! Regions and transfers.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{uapi, Error};

nix::ioctl_write_ptr_bad!(ioctl_region_bind, uapi::VMBEAM_IOCTL_REGION_BIND, uapi::vmbeam_region_bind);
nix::ioctl_readwrite_bad!(ioctl_region_info, uapi::VMBEAM_IOCTL_REGION_INFO, uapi::vmbeam_region_info);
nix::ioctl_write_ptr_bad!(ioctl_region_frames, uapi::VMBEAM_IOCTL_REGION_FRAMES, uapi::vmbeam_region_frames);

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
    /// Made with `VMBEAM_CREATE_HUGE`: mapped by PMD (PFNMAP), so
    /// `/proc/PID/pagemap` cannot show its frames ([`Region::mapped_frames`]
    /// can).
    pub huge: bool,
    /// Made with `VMBEAM_CREATE_HUGE_1G`: also mapped by PUD where a whole
    /// aligned GiB allows.
    pub huge_1g: bool,
}

/// One page of a mapping, from [`Region::mapped_frames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedFrame {
    /// The page frame number; 0: nothing mapped.
    pub pfn: u64,
    /// Mapped by a 2 MiB (PMD) or 1 GiB (PUD) entry, not a 4 KiB PTE.
    pub huge: bool,
    /// Mapped by a 1 GiB (PUD) entry.
    pub huge_1g: bool,
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
            huge: arg.state & uapi::VMBEAM_REGION_HUGE != 0,
            huge_1g: arg.state & uapi::VMBEAM_REGION_HUGE_1G != 0,
        })
    }

    /// The page frame each of `count` pages from byte `offset` is mapped to
    /// in the owner's address space, read by the module from the owner's
    /// page tables (`VMBEAM_REGION_FRAMES`; needs CAP_SYS_ADMIN). Only for
    /// a huge region: a 4 KiB region's frames are in `/proc/PID/pagemap`
    /// (`EOPNOTSUPP` here).
    pub fn mapped_frames(&self, offset: u64, count: u64) -> Result<Vec<MappedFrame>, Error> {
        let mut frames = vec![0u64; count as usize];
        let max = u64::from(uapi::VMBEAM_FRAMES_MAX);
        for (i, chunk) in frames.chunks_mut(max as usize).enumerate() {
            let arg = uapi::vmbeam_region_frames {
                offset: offset + i as u64 * max * 4096,
                count: chunk.len() as u64,
                frames: chunk.as_mut_ptr() as u64,
                ..Default::default()
            };
            // SAFETY: a region fd and the struct this command takes; the
            // module writes `arg.count` u64s at `arg.frames`, which `chunk`
            // has room for.
            unsafe { ioctl_region_frames(self.fd.as_raw_fd(), &arg) }
                .map_err(|errno| Error::Ioctl { op: "VMBEAM_REGION_FRAMES", errno })?;
        }
        Ok(frames
            .into_iter()
            .map(|e| MappedFrame {
                pfn: e & uapi::VMBEAM_FRAME_PFN_MASK,
                huge: e & uapi::VMBEAM_FRAME_HUGE as u64 != 0,
                huge_1g: e & uapi::VMBEAM_FRAME_HUGE_1G != 0,
            })
            .collect())
    }

    /// Of a huge region, how many pages its owner maps with a 2 MiB (or
    /// 1 GiB) entry ([`Region::mapped_frames`]); `None` for a 4 KiB region.
    pub fn pages_by_pmd(&self) -> Result<Option<u64>, Error> {
        let info = self.info()?;
        if !info.huge {
            return Ok(None);
        }
        let frames = self.mapped_frames(0, info.size / 4096)?;
        Ok(Some(frames.iter().filter(|f| f.huge).count() as u64))
    }

    /// The frames behind `len` bytes of this region from byte `offset`, as
    /// process `pid`, its owner, maps them at `hva` (0: not mapped): from
    /// `/proc/PID/pagemap` for a 4 KiB region, from the module's walk of
    /// the owner's page tables for a huge one (pagemap does not walk
    /// PFNMAP mappings).
    pub fn owner_frames(&self, pid: u32, hva: u64, offset: u64, len: u64) -> Result<Vec<u64>, Error> {
        if self.info()?.huge {
            Ok(self.mapped_frames(offset, len / 4096)?.into_iter().map(|f| f.pfn).collect())
        } else {
            crate::pagemap::frames(pid, hva, len).map_err(|e| Error::Pagemap { pid, source: e })
        }
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
