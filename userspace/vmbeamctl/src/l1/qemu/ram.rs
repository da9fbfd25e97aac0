//! An L1's own RAM as a vmbeam region, so that the pages of an L2 on
//! ordinary L1 memory can be gathered out of it at L0.
//!
//! QEMU maps its RAM backend at start-up, right after it creates its KVM
//! VM, with nothing in between that vmbeamctl could wait for; so the
//! region is owned by the *process* before QEMU exists: `l1 start` runs
//! QEMU through `vmbeamctl l1 exec-owning --region-fd N -- qemu ...`, which
//! binds region fd N to itself (`VMBEAM_BIND_PROCESS`) and then execs QEMU
//! (the same process), whose `memory-backend-file` `ram0` opens
//! `/proc/self/fd/N` and maps it.

use std::{
    ffi::OsString,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::Command,
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use vmbeam::{
    procfs::{self, FileId},
    qmp::Qmp,
    Region,
};

/// The QEMU object id of an L1's RAM backend.
pub const RAM_ID: &str = "ram0";

/// The L1's RAM region, as L0 sees it.
#[derive(Debug)]
pub struct RamRegion {
    /// A fd of the region (taken from QEMU).
    pub region: Region,
    pub size: u64,
    /// The region inode: names QEMU's mapping of it in `/proc/PID/maps`.
    pub file: FileId,
}

impl RamRegion {
    /// The L1's RAM region, if its RAM backend is one.
    pub fn find(qmp: &mut Qmp, pid: u32) -> Result<Option<Self>> {
        let objects = qmp.execute("qom-list", json!({"path": "/objects"}))?;
        let has_ram = objects.as_array().into_iter().flatten().any(|o| o["name"] == RAM_ID);
        if !has_ram {
            return Ok(None);
        }
        let (region, size, file) = super::backend_region(qmp, pid, RAM_ID).context("the L1's RAM")?;
        Ok(Some(Self { region, size, file }))
    }

    /// The L0 page frames behind QEMU `qemu_pid`'s mapping of the RAM, page
    /// by page (0: not present).
    pub fn frames(&self, qemu_pid: u32) -> Result<Vec<u64>> {
        let hva = procfs::mapping_of_file(qemu_pid, self.file)?
            .ok_or_else(|| anyhow!("QEMU {qemu_pid} does not map its RAM region"))?;
        Ok(self.region.owner_frames(qemu_pid, hva, 0, self.size)?)
    }

    /// [`Self::frames`] at byte `offsets` of the RAM.
    pub fn frames_at(&self, qemu_pid: u32, offsets: &[u64]) -> Result<Vec<u64>> {
        let all = self.frames(qemu_pid)?;
        Ok(offsets.iter().map(|&o| all.get((o / 4096) as usize).copied().unwrap_or(0)).collect())
    }
}

/// The byte offset in an L1's RAM region of `size` bytes of its
/// guest-physical frame `frame`, on QEMU 7.2's q35 layout
/// (`hw/i386/pc_q35.c`): RAM below 4 GiB up to `lowmem` (2 GiB when RAM is
/// 2.75 GiB or more, else 2.75 GiB), the rest from 4 GiB. None: not RAM.
pub fn offset_of_frame(size: u64, frame: u64) -> Option<u64> {
    const FOUR_GIB: u64 = 1 << 32;
    let lowmem: u64 = if size >= 0xb000_0000 { 0x8000_0000 } else { 0xb000_0000 };
    let below_4g = size.min(lowmem);
    let gpa = frame.checked_mul(4096)?;
    if gpa < below_4g {
        Some(gpa)
    } else if gpa >= FOUR_GIB && gpa - FOUR_GIB < size - below_4g {
        Some(below_4g + (gpa - FOUR_GIB))
    } else {
        None
    }
}

/// QEMU's arguments for RAM of `size` bytes backed by the region at fd
/// `fd` (which the process has, without close-on-exec); a `huge` region
/// is mapped 2 MiB-aligned, so its blocks map by PMD.
pub fn qemu_args(fd: i32, size: u64, huge: bool) -> Vec<String> {
    let align = if huge { ",align=2M" } else { "" };
    vec![
        "-object".into(),
        format!("memory-backend-file,id={RAM_ID},mem-path=/proc/self/fd/{fd},share=on,size={size}{align}"),
        "-machine".into(),
        format!("memory-backend={RAM_ID}"),
    ]
}

/// Makes a region fd survive exec (QEMU opens it as `/proc/self/fd/N`).
pub fn inheritable(fd: &impl AsFd) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).context("clearing FD_CLOEXEC")?;
    Ok(())
}

/// `vmbeamctl l1 exec-owning`: binds region fd `fd` to this process, then
/// execs `command` in it, the fd kept open. Returns only on failure.
pub fn exec_owning(fd: i32, command: &[OsString]) -> Result<()> {
    let Some((program, args)) = command.split_first() else { bail!("no command to run") };
    // SAFETY: the fd number comes from our parent (`l1 start`), which
    // handed it over open for exactly this; nothing else here owns it.
    let region = Region::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    region.bind_process().with_context(|| format!("binding region fd {fd} to this process"))?;
    let _kept_open = region.into_fd().into_raw_fd();
    let err = Command::new(program).args(args).exec();
    Err(anyhow!(err).context(format!("exec {}", program.to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::offset_of_frame;

    #[test]
    fn q35_layout() {
        let small = 384 << 20;
        assert_eq!(offset_of_frame(small, 0x100), Some(0x10_0000));
        assert_eq!(offset_of_frame(small, (small / 4096) - 1), Some(small - 4096));
        assert_eq!(offset_of_frame(small, small / 4096), None);
        let big = 4u64 << 30; // 2 GiB below 4 GiB, 2 GiB above
        assert_eq!(offset_of_frame(big, 0x7ffff), Some(0x7fff_f000));
        assert_eq!(offset_of_frame(big, 0x80000), None); // the PCI hole
        assert_eq!(offset_of_frame(big, 0x100000), Some(0x8000_0000));
        assert_eq!(offset_of_frame(big, 0x17ffff), Some(big - 4096));
        assert_eq!(offset_of_frame(big, 0x180000), None);
    }
}
