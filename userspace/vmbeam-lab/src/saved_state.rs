//! An L2's CPU state kept in its own window, so that it moves with the
//! memory: `pause` with `save_state` writes it on the aged L1, and the L1
//! the region is transferred to reads it when it starts the L2
//! (`commit-staged` of handoffs staged without registers). No round trip
//! between the L1s is then left inside the downtime but the commit, as the
//! real L1s' state windows do for QEMU's device state.
//!
//! Where: the second half of the header page, which the workload never
//! touches (its header is 32 bytes, its data starts at the next page). The
//! guest could write there, but only its own state: the receiver checks
//! the registers as it checks any handoff's.

use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress};
use vmbeam::control::Regs;

use crate::workload::HEADER_BYTES;

/// Offset of the saved state in the window.
pub const OFFSET: u64 = 0x800;
const MAGIC: u64 = u64::from_le_bytes(*b"VMBSTATE");
/// magic, ten registers, paused_at_ns, passes.
const WORDS: usize = 13;
// Past the workload's 8-dword header, before its data (the next page).
const _: () = assert!(OFFSET >= 32 && OFFSET + 8 * WORDS as u64 <= HEADER_BYTES);

/// What a paused L2 needs to run on elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedState {
    pub regs: Regs,
    pub paused_at_ns: u64,
    pub passes: u64,
}

impl SavedState {
    fn words(&self) -> [u64; WORDS] {
        let r = &self.regs;
        [MAGIC, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.rip, r.rflags, self.paused_at_ns, self.passes]
    }

    /// Writes it into the window mapped at `mem` (which must be the
    /// writer's: its region owned by this L1).
    pub fn write(&self, mem: &GuestRegionMmap<()>) -> Result<(), vm_memory::GuestMemoryError> {
        // The magic last, so a state is never seen half written.
        let words = self.words();
        for (i, w) in words.iter().enumerate().skip(1) {
            mem.write_obj(*w, MemoryRegionAddress(OFFSET + 8 * i as u64))?;
        }
        mem.write_obj(words[0], MemoryRegionAddress(OFFSET))
    }

    /// The state saved in the window, or `None` if there is none.
    pub fn read(mem: &GuestRegionMmap<()>) -> Result<Option<Self>, vm_memory::GuestMemoryError> {
        let mut w = [0u64; WORDS];
        for (i, word) in w.iter_mut().enumerate() {
            *word = mem.read_obj(MemoryRegionAddress(OFFSET + 8 * i as u64))?;
        }
        let [magic, rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, rip, rflags, paused_at_ns, passes] = w;
        if magic != MAGIC {
            return Ok(None);
        }
        let regs = Regs { rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, rip, rflags };
        Ok(Some(Self { regs, paused_at_ns, passes }))
    }

    /// Forgets the state in the window (a resumed L2's is stale at once).
    pub fn clear(mem: &GuestRegionMmap<()>) -> Result<(), vm_memory::GuestMemoryError> {
        mem.write_obj(0u64, MemoryRegionAddress(OFFSET))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, MmapRegion};

    use super::*;

    fn window() -> GuestRegionMmap<()> {
        GuestRegionMmap::new(MmapRegion::new(2 * HEADER_BYTES as usize).unwrap(), GuestAddress(0x1000_0000)).unwrap()
    }

    #[test]
    fn a_saved_state_reads_back_until_cleared() {
        let mem = window();
        assert_eq!(SavedState::read(&mem).unwrap(), None, "a fresh window has no state");
        let state = SavedState {
            regs: Regs { rip: 0x1043, rsi: 0x1000_0000, rflags: 2, rax: u64::MAX, ..Default::default() },
            paused_at_ns: 123,
            passes: 9,
        };
        state.write(&mem).unwrap();
        assert_eq!(SavedState::read(&mem).unwrap(), Some(state));
        SavedState::clear(&mem).unwrap();
        assert_eq!(SavedState::read(&mem).unwrap(), None);
    }
}
