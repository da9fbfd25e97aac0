// SPDX-License-Identifier: GPL-2.0

//! Module-wide counters, reported by `VMBEAM_GET_STATS`.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::uapi::vmbeam_stats;

/// Counters updated by the region and transfer paths. Each is exact on its
/// own; a snapshot of several is not atomic as a whole.
pub(crate) struct Stats {
    pub(crate) regions: AtomicU64,
    pub(crate) pages_owned: AtomicU64,
    pub(crate) transfers: AtomicU64,
    pub(crate) pages_transferred: AtomicU64,
    pub(crate) revocations: AtomicU64,
    /// Stays 0: no vmbeam path copies guest memory. Kept to prove it.
    pub(crate) bytes_copied: AtomicU64,
}

pub(crate) static STATS: Stats = Stats {
    regions: AtomicU64::new(0),
    pages_owned: AtomicU64::new(0),
    transfers: AtomicU64::new(0),
    pages_transferred: AtomicU64::new(0),
    revocations: AtomicU64::new(0),
    bytes_copied: AtomicU64::new(0),
};

impl Stats {
    /// Fills the output fields of `out`.
    pub(crate) fn snapshot(&self, out: &mut vmbeam_stats) {
        out.regions = self.regions.load(Relaxed);
        out.pages_owned = self.pages_owned.load(Relaxed);
        out.transfers = self.transfers.load(Relaxed);
        out.pages_transferred = self.pages_transferred.load(Relaxed);
        out.revocations = self.revocations.load(Relaxed);
        out.bytes_copied = self.bytes_copied.load(Relaxed);
    }
}
