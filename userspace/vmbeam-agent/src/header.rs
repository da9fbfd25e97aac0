//! The L2 workload's header (`guests/l2/workload.S`): where it sits in an
//! L2's RAM and how its words read, whichever way the RAM is reached.

use vmbeam::control::agent::Workload;

/// Guest-physical address of the workload header in an L2's RAM.
pub const HEADER_GPA: u64 = 0x20_0000;
/// Bytes of the header that are read.
pub const HEADER_BYTES: usize = 36;

/// The header from its dwords, `word(i)` reading dword `i`.
pub fn parse(word: impl Fn(usize) -> u32) -> Workload {
    Workload {
        magic: word(0),
        seed: word(1),
        pass: word(2),
        dwords: word(3),
        checksum: word(4),
        errors: word(5),
        heartbeat: word(8),
    }
}
