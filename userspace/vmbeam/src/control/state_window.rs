//! The state window: how an L2's saved CPU and device state moves between
//! real L1s with its memory, instead of over two virtio-serial links.
//!
//! Every real L1 that `vmbeamctl l1 start` boots has one more ivshmem
//! window besides the L2 windows: a small vmbeam region behind the root
//! port at root-bus slot [`SLOT`], which the agent maps (its BAR) and the
//! L2 windows' scan skips. Its first half is the *outbox*, its second the
//! *inbox*:
//!
//! - outbox: every page present. The aged agent writes each state it saves
//!   there (`save-l2s` with `state_window`), page aligned, one after the
//!   other, and `save-l2` answers where ([`StateAt`]) instead of carrying
//!   the state.
//! - inbox: every page missing. L0 gathers the states' pages from the aged
//!   outbox into the clean inbox (`VMBEAM_GATHER_INTO`, with
//!   `VMBEAM_GATHER_REPLACE` so the aged outbox stays whole), then
//!   `load-l2` names where each state arrived. Once the L2s run, L0
//!   gathers those pages out again, so the inbox is empty for the next
//!   move.
//!
//! Either L1 can be aged or clean, so each has both halves. A page of the
//! inbox that has not arrived must not be touched (an L1 that touches a
//! missing page of a region is stopped at L0): the agent reads exactly
//! the pages L0 names, and only after L0 moved them there.
//!
//! Under TCG this took the states' trips (gzip, base64, JSON over two
//! virtio-serial links: ~0.3 s per pause) out of an L2's downtime; see the
//! README's Performance section for what was measured.

use serde::{Deserialize, Serialize};

/// The region's size: room for the states of one move (a `-M pc` L2's is
/// about 310 KB; with VGA, its video RAM goes in the state too).
pub const SIZE: u64 = 16 << 20;
/// Each half.
pub const HALF: u64 = SIZE / 2;
/// The outbox: bytes `0 .. HALF`.
pub const OUTBOX: u64 = 0;
/// The inbox: bytes `HALF .. SIZE`.
pub const INBOX: u64 = HALF;
/// The root-bus slot of its root port (the L2 windows' are 0x10 + index).
pub const SLOT: u32 = 0x0f;
/// Its QEMU object and device ids at L0.
pub const BACKEND_ID: &str = "vmstate";
pub const DEVICE_ID: &str = "ivstate";
pub const PORT_ID: &str = "rpstate";

const PAGE: u64 = 4096;

/// Where a saved state lies in a state window: `bytes` from byte `offset`
/// (page aligned) of the window.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateAt {
    pub offset: u64,
    pub bytes: u64,
}

impl StateAt {
    /// The pages it spans.
    pub fn pages(&self) -> u64 {
        self.bytes.div_ceil(PAGE)
    }

    /// The one run of pages it spans, `[byte offset, pages]`
    /// (`VMBEAM_GATHER_RUNS`).
    pub fn run(&self) -> [u64; 2] {
        [self.offset, self.pages()]
    }

    /// Whether it is a state inside `half` (`OUTBOX` or `INBOX`): page
    /// aligned, not empty, within those `HALF` bytes. What an agent checks
    /// before it touches the window at L0's word.
    pub fn is_within(&self, half: u64) -> bool {
        self.offset & (PAGE - 1) == 0
            && self.bytes > 0
            && self.offset >= half
            && self.offset.checked_add(self.pages() * PAGE).is_some_and(|end| end <= half + HALF)
    }
}

/// Places states of `sizes` bytes one after another from `base`, each on
/// a page of its own: where each goes, or `None` once one does not fit in
/// that half.
pub fn lay_out(base: u64, sizes: impl IntoIterator<Item = u64>) -> Vec<Option<StateAt>> {
    let mut next = base;
    sizes
        .into_iter()
        .map(|bytes| {
            let at = StateAt { offset: next, bytes };
            if !at.is_within(base) {
                return None;
            }
            next += at.pages() * PAGE;
            Some(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_laid_out_page_by_page_and_what_does_not_fit_is_left_out() {
        let at = lay_out(INBOX, [1, 4096, 4097, HALF, 10]);
        assert_eq!(at[0], Some(StateAt { offset: INBOX, bytes: 1 }));
        assert_eq!(at[1], Some(StateAt { offset: INBOX + 4096, bytes: 4096 }));
        assert_eq!(at[2], Some(StateAt { offset: INBOX + 8192, bytes: 4097 }));
        assert_eq!(at[3], None, "half the window does not fit after three pages");
        assert_eq!(at[4], Some(StateAt { offset: INBOX + 4 * 4096, bytes: 10 }));
        assert_eq!(at[2].map(|a| a.run()), Some([INBOX + 8192, 2]));
    }

    #[test]
    fn a_state_must_lie_inside_its_half() {
        assert!(StateAt { offset: 0, bytes: HALF }.is_within(OUTBOX));
        assert!(!StateAt { offset: 0, bytes: HALF + 1 }.is_within(OUTBOX));
        assert!(!StateAt { offset: 0, bytes: 10 }.is_within(INBOX));
        assert!(!StateAt { offset: INBOX + 1, bytes: 10 }.is_within(INBOX));
        assert!(!StateAt { offset: INBOX, bytes: 0 }.is_within(INBOX));
        assert!(!StateAt { offset: !4095, bytes: 1 }.is_within(INBOX));
    }
}
