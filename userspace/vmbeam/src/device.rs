//! `/dev/vmbeam`, the control device.

use std::{
    fs::{File, OpenOptions},
    os::fd::{AsRawFd, BorrowedFd},
};

use nix::errno::Errno;

use crate::{uapi, Error, Region, Transfer};

pub const DEVICE_PATH: &str = "/dev/vmbeam";

/// The largest block a region's pages are allocated in and mapped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Blocks {
    /// 4 KiB pages, ordinary mappings (GUP works).
    #[default]
    Page,
    /// 2 MiB blocks by PMD (`VMBEAM_CREATE_HUGE`).
    Huge2M,
    /// 1 GiB blocks by PUD, then 2 MiB (`VMBEAM_CREATE_HUGE_1G`).
    Huge1G,
}

// The ioctl table: numbers from the header (via bindgen), never retyped.
// Each needs an open /dev/vmbeam, i.e. root with CAP_SYS_ADMIN.
nix::ioctl_readwrite_bad!(ioctl_get_version, uapi::VMBEAM_IOCTL_GET_VERSION, uapi::vmbeam_version);
nix::ioctl_readwrite_bad!(ioctl_get_stats, uapi::VMBEAM_IOCTL_GET_STATS, uapi::vmbeam_stats);
nix::ioctl_write_ptr_bad!(ioctl_create_region, uapi::VMBEAM_IOCTL_CREATE_REGION, uapi::vmbeam_region_create);
nix::ioctl_write_ptr_bad!(ioctl_transfer, uapi::VMBEAM_IOCTL_TRANSFER, uapi::vmbeam_transfer);
nix::ioctl_write_ptr_bad!(ioctl_transfer_batch, uapi::VMBEAM_IOCTL_TRANSFER_BATCH, uapi::vmbeam_transfer_batch);
nix::ioctl_write_ptr_bad!(ioctl_gather, uapi::VMBEAM_IOCTL_GATHER, uapi::vmbeam_gather);
nix::ioctl_write_ptr_bad!(ioctl_bind, uapi::VMBEAM_IOCTL_BIND, uapi::vmbeam_bind);

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

    /// A new region of `size` zeroed bytes (a multiple of the page size),
    /// with no owner yet.
    pub fn create_region(&self, size: u64) -> Result<Region, Error> {
        self.create_region_flags(size, 0)
    }

    /// A new region of `size` bytes whose pages are all missing until
    /// [`Device::gather_into`] moves some in (`VMBEAM_CREATE_EMPTY`): a
    /// window a VMM maps ahead of time and must not touch before then.
    pub fn create_empty_region(&self, size: u64) -> Result<Region, Error> {
        self.create_region_flags(size, uapi::VMBEAM_CREATE_EMPTY)
    }

    /// A new region of `size` bytes in 2 MiB blocks, mapped by PMD where a
    /// mapping is 2 MiB-aligned (`VMBEAM_CREATE_HUGE`): one stage-2 entry
    /// and one revocation per 2 MiB; its pages are not reachable by GUP.
    pub fn create_huge_region(&self, size: u64) -> Result<Region, Error> {
        self.create_region_flags(size, uapi::VMBEAM_CREATE_HUGE)
    }

    /// A new region, empty ([`Device::create_empty_region`]) and/or in 2 MiB
    /// blocks ([`Device::create_huge_region`]): an empty huge region takes
    /// in whole blocks a gather moves there in order, and maps them by PMD.
    pub fn create_region_with(&self, size: u64, empty: bool, huge: bool) -> Result<Region, Error> {
        let blocks = if huge { Blocks::Huge2M } else { Blocks::Page };
        self.create_region_blocks(size, empty, blocks)
    }

    /// A new region, empty or not, in blocks of up to `blocks`. With
    /// [`Blocks::Huge1G`] (`VMBEAM_CREATE_HUGE_1G`) each whole GiB is first
    /// one aligned GiB (from the module's `gigantic_pool`, else sought with
    /// `alloc_contig_range()`: slower), mapped by PUD where a mapping is
    /// 1 GiB-aligned (mmap picks such an address for 1 GiB and more); not
    /// charged to the caller's memcg.
    pub fn create_region_blocks(&self, size: u64, empty: bool, blocks: Blocks) -> Result<Region, Error> {
        let flags = match blocks {
            Blocks::Page => 0,
            Blocks::Huge2M => uapi::VMBEAM_CREATE_HUGE,
            Blocks::Huge1G => uapi::VMBEAM_CREATE_HUGE | uapi::VMBEAM_CREATE_HUGE_1G,
        };
        self.create_region_flags(size, flags | if empty { uapi::VMBEAM_CREATE_EMPTY } else { 0 })
    }

    fn create_region_flags(&self, size: u64, flags: u32) -> Result<Region, Error> {
        let arg = uapi::vmbeam_region_create { size, flags, ..Default::default() };
        // SAFETY: /dev/vmbeam and the struct this command takes.
        let fd = unsafe { ioctl_create_region(self.file.as_raw_fd(), &arg) }
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_CREATE_REGION", errno })?;
        Ok(Region::from_raw_ioctl_result(fd))
    }

    /// Moves one region to another VM (`VMBEAM_TRANSFER`).
    pub fn transfer(&self, t: Transfer<'_>) -> Result<(), Error> {
        let arg = t.to_uapi();
        // SAFETY: /dev/vmbeam and the struct this command takes.
        unsafe { ioctl_transfer(self.file.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_TRANSFER", errno })
    }

    /// Moves every region, all or nothing: one revoke phase, one grant phase.
    pub fn transfer_batch(&self, transfers: &[Transfer<'_>]) -> Result<(), Error> {
        let entries: Vec<_> = transfers.iter().map(|t| t.to_uapi()).collect();
        let arg = uapi::vmbeam_transfer_batch {
            transfers: entries.as_ptr() as u64,
            count: u32::try_from(entries.len()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        // SAFETY: /dev/vmbeam, the struct this command takes, and `entries`
        // (alive across the call) holds `count` transfers.
        unsafe { ioctl_transfer_batch(self.file.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_TRANSFER_BATCH", errno })
    }

    /// A new region made of the pages of `src` at byte `offsets` (moved,
    /// not copied); `src` loses exactly those pages.
    pub fn gather(&self, src: BorrowedFd<'_>, offsets: &[u64]) -> Result<Region, Error> {
        let fd = self.gather_ioctl(src, offsets, 0, 0, 0, "VMBEAM_GATHER")?;
        Ok(Region::from_raw_ioctl_result(fd))
    }

    /// As [`Device::gather`], with `VMBEAM_GATHER_REPLACE`: fresh zeroed
    /// pages take the moved pages' places in `src`, so its owner may touch
    /// those addresses again (reading zeros) instead of getting SIGBUS.
    /// Costs `offsets.len()` new pages.
    pub fn gather_replacing(&self, src: BorrowedFd<'_>, offsets: &[u64]) -> Result<Region, Error> {
        let fd = self.gather_ioctl(src, offsets, uapi::VMBEAM_GATHER_REPLACE, 0, 0, "VMBEAM_GATHER(REPLACE)")?;
        Ok(Region::from_raw_ioctl_result(fd))
    }

    /// Moves the pages of `src` at byte `offsets` into the missing pages of
    /// `dst` from byte `dst_offset` on (`VMBEAM_GATHER_INTO`): `dst` keeps
    /// its owner, whose VMM faults them in; `src` loses them.
    pub fn gather_into(
        &self,
        src: BorrowedFd<'_>,
        offsets: &[u64],
        dst: BorrowedFd<'_>,
        dst_offset: u64,
    ) -> Result<(), Error> {
        let flags = uapi::VMBEAM_GATHER_INTO;
        self.gather_ioctl(src, offsets, flags, dst.as_raw_fd(), dst_offset, "VMBEAM_GATHER_INTO").map(drop)
    }

    /// As [`Device::gather_into`], the pages named as runs of consecutive
    /// pages, `[byte offset, pages]` each (`VMBEAM_GATHER_RUNS`, uAPI 7;
    /// [`crate::runs::encode`] with step 4096 makes them from offsets): a
    /// whole window is one run, so the module reads and checks one entry,
    /// not one per page.
    pub fn gather_runs_into(
        &self,
        src: BorrowedFd<'_>,
        runs: &[[u64; 2]],
        dst: BorrowedFd<'_>,
        dst_offset: u64,
    ) -> Result<(), Error> {
        let flags = uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_RUNS;
        self.gather_ioctl(src, runs.as_flattened(), flags, dst.as_raw_fd(), dst_offset, "VMBEAM_GATHER_INTO(RUNS)")
            .map(drop)
    }

    /// As [`Device::gather_runs_into`], with `VMBEAM_GATHER_REPLACE`: `src`
    /// keeps fresh zeroed pages where the runs were (its owner may go on
    /// writing there).
    pub fn gather_runs_into_replacing(
        &self,
        src: BorrowedFd<'_>,
        runs: &[[u64; 2]],
        dst: BorrowedFd<'_>,
        dst_offset: u64,
    ) -> Result<(), Error> {
        let flags = uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_RUNS | uapi::VMBEAM_GATHER_REPLACE;
        let op = "VMBEAM_GATHER_INTO(RUNS, REPLACE)";
        self.gather_ioctl(src, runs.as_flattened(), flags, dst.as_raw_fd(), dst_offset, op).map(drop)
    }

    /// As [`Device::gather`], the pages named as runs (`VMBEAM_GATHER_RUNS`):
    /// a new ownerless region of them. Dropping it frees the pages, so
    /// this is also how a range of a region is emptied again.
    pub fn gather_runs(&self, src: BorrowedFd<'_>, runs: &[[u64; 2]]) -> Result<Region, Error> {
        let fd = self.gather_ioctl(src, runs.as_flattened(), uapi::VMBEAM_GATHER_RUNS, 0, 0, "VMBEAM_GATHER(RUNS)")?;
        Ok(Region::from_raw_ioctl_result(fd))
    }

    /// As [`Device::gather_into`], with `VMBEAM_GATHER_REPLACE`: `src`
    /// gets fresh zeroed pages in place of the moved ones (an aged L1 may
    /// go on using those guest frames).
    pub fn gather_into_replacing(
        &self,
        src: BorrowedFd<'_>,
        offsets: &[u64],
        dst: BorrowedFd<'_>,
        dst_offset: u64,
    ) -> Result<(), Error> {
        let flags = uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_REPLACE;
        self.gather_ioctl(src, offsets, flags, dst.as_raw_fd(), dst_offset, "VMBEAM_GATHER_INTO(REPLACE)").map(drop)
    }

    /// Moves the first `dst_offsets.len()` pages of `src` (its bytes from
    /// 0 on) into the missing pages of `dst` at byte `dst_offsets`, page i
    /// to `dst_offsets[i]` (`VMBEAM_GATHER_INTO | VMBEAM_GATHER_SCATTER`,
    /// uAPI 6): the reverse of [`Device::gather_into`], in one call. Fills
    /// the holes a gather left with a fresh region's pages, or puts a
    /// window's pages back where they came from. `dst` keeps its owner,
    /// whose VMM faults them in; `src` loses them.
    pub fn scatter_into(&self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>, dst_offsets: &[u64]) -> Result<(), Error> {
        let flags = uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_SCATTER;
        self.gather_ioctl(src, dst_offsets, flags, dst.as_raw_fd(), 0, "VMBEAM_GATHER_INTO(SCATTER)").map(drop)
    }

    /// `VMBEAM_GATHER` with these flags and destination; `op` names it in
    /// errors. `words` are the offsets, or with `VMBEAM_GATHER_RUNS` the
    /// runs' `{offset, pages}` pairs flattened. Returns the ioctl's result
    /// (a new region fd, or 0).
    fn gather_ioctl(
        &self,
        src: BorrowedFd<'_>,
        words: &[u64],
        flags: u32,
        dst_fd: i32,
        dst_offset: u64,
        op: &'static str,
    ) -> Result<i32, Error> {
        let per_entry = if flags & uapi::VMBEAM_GATHER_RUNS != 0 { 2 } else { 1 };
        let arg = uapi::vmbeam_gather {
            offsets: words.as_ptr() as u64,
            count: (words.len() / per_entry) as u64,
            src_fd: src.as_raw_fd(),
            flags,
            dst_fd,
            dst_offset,
            ..Default::default()
        };
        // SAFETY: /dev/vmbeam, the struct this command takes, and `words`
        // (alive across the call) holds `count` entries of `per_entry` u64s.
        unsafe { ioctl_gather(self.file.as_raw_fd(), &arg) }.map_err(|errno| Error::Ioctl { op, errno })
    }

    /// Binds `region` to the KVM VM behind `vm`, which any process may have
    /// created (`VMBEAM_BIND`): how a region becomes the memory of a QEMU,
    /// whose VM fd comes from `pidfd_getfd`.
    pub fn bind(&self, region: BorrowedFd<'_>, vm: BorrowedFd<'_>) -> Result<(), Error> {
        let arg = uapi::vmbeam_bind { region_fd: region.as_raw_fd(), vm_fd: vm.as_raw_fd(), ..Default::default() };
        // SAFETY: /dev/vmbeam and the struct this command takes.
        unsafe { ioctl_bind(self.file.as_raw_fd(), &arg) }
            .map(drop)
            .map_err(|errno| Error::Ioctl { op: "VMBEAM_BIND", errno })
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
