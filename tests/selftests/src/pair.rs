//! An aged VMM and a clean VMM, each with a VM, and a region the aged one
//! created, bound and filled through its guest: the set-up of every
//! transfer test.

use std::os::fd::{AsFd, OwnedFd};

use vmbeam::{Blocks, Transfer};

use crate::{
    check,
    guest::programs::fill_sum,
    vmm::{Program, Request, Vmm},
};

pub const MIB: u64 = 1 << 20;
pub const AGED_GPA: u64 = 0x100_0000; // 16 MiB
pub const CLEAN_GPA: u64 = 0x4000_0000; // 1 GiB: another address on purpose
/// A 1 GiB-block region's place in the aged VM: GiB-aligned, below 4 GiB
/// (the guest programs run in flat 32-bit mode), apart from CLEAN_GPA.
pub const AGED_GPA_1G: u64 = 0x8000_0000; // 2 GiB
pub const SLOT: u32 = 1;

/// Dwords a guest program visits over `size` bytes at `stride`.
pub fn count(size: u64, stride: u32) -> u32 {
    (size / u64::from(stride)) as u32
}

pub fn run(vmm: &mut Vmm, program: Program, offset: u64, count: u32, stride: u32) -> Result<u32, String> {
    let (v, _) = vmm.ok(&Request::Run { slot: SLOT, program, offset, count, stride }, &[])?;
    Ok(v as u32)
}

/// An aged VMM with a VM and a region it filled, and a clean VMM with a VM.
pub struct Pair {
    pub aged: Vmm,
    pub clean: Vmm,
    pub aged_vm: OwnedFd,
    pub clean_vm: OwnedFd,
    pub region: OwnedFd,
    pub aged_hva: u64,
    pub size: u64,
    pub stride: u32,
    pub written: u32,
}

impl Pair {
    pub fn new(size: u64, stride: u32, seed: u32) -> Result<Self, String> {
        Self::with_pages(size, stride, seed, Blocks::Page)
    }

    /// As [`Pair::new`], the region in `blocks` (`VMBEAM_CREATE_HUGE`,
    /// `_HUGE_1G`). A 1 GiB-block region sits at [`AGED_GPA_1G`] in the
    /// aged VM, so that KVM can map it with 1 GiB stage-2 entries there.
    pub fn with_pages(size: u64, stride: u32, seed: u32, blocks: Blocks) -> Result<Self, String> {
        let gpa = if blocks == Blocks::Huge1G { AGED_GPA_1G } else { AGED_GPA };
        let mut aged = Vmm::spawn();
        let mut clean = Vmm::spawn();
        let (_, aged_vm) = aged.ok(&Request::CreateVm, &[])?;
        let (_, clean_vm) = clean.ok(&Request::CreateVm, &[])?;
        let (aged_hva, region) = aged.ok(&Request::CreateRegion { size, slot: SLOT, gpa, blocks }, &[])?;
        let written = run(&mut aged, Program::Fill { seed }, 0, count(size, stride), stride)?;
        check(written == fill_sum(seed, count(size, stride)), || {
            format!("aged guest reported {written:#x}, host computes {:#x}", fill_sum(seed, count(size, stride)))
        })?;
        Ok(Self {
            aged,
            clean,
            aged_vm: aged_vm.ok_or("no VM fd")?,
            clean_vm: clean_vm.ok_or("no VM fd")?,
            region: region.ok_or("no region fd")?,
            aged_hva,
            size,
            stride,
            written,
        })
    }

    pub fn transfer(&self) -> Transfer<'_> {
        Transfer { region: self.region.as_fd(), from_vm: self.aged_vm.as_fd(), to_vm: self.clean_vm.as_fd() }
    }

    /// The clean VMM maps the region and its guest sums it.
    pub fn clean_reads(&mut self) -> Result<(u64, u32), String> {
        let (hva, _) = self.clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[self.region.as_fd()])?;
        let sum = run(&mut self.clean, Program::Sum, 0, count(self.size, self.stride), self.stride)?;
        Ok((hva, sum))
    }

    pub fn finish(self) {
        self.aged.quit();
        self.clean.quit();
    }
}
