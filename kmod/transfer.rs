// SPDX-License-Identifier: GPL-2.0

//! Transfer of regions between VMs.
//!
//! A batch runs in three phases. *Check*: every entry is validated and its
//! region marked moving; any failure unmarks them all and returns, so no
//! region changed owner or lost a mapping. *Revoke*: each region loses its
//! owner and every mapping of it is zapped (KVM's MMU notifier drops the old
//! VM's stage-2 entries with them). *Grant*: each region gets its new owner,
//! whose VMM maps the same pages. Revoke and grant cannot fail: everything
//! that could was done in the check phase.

use core::{ffi::c_long, sync::atomic::Ordering::Relaxed};

use kernel::{
    alloc::{flags::GFP_KERNEL, KVVec, KVec},
    prelude::*,
    uaccess::UserSlice,
};

use crate::{device::check_unused, owner::Owner, region::RegionFile, stats::STATS, trace, uapi};

/// One checked transfer: its region is marked moving.
struct Move {
    file: RegionFile,
    to: Option<Owner>,
    /// The previous owner, kept to be dropped after all locks are released.
    from: Option<Owner>,
}

impl Move {
    fn check(t: &uapi::vmbeam_transfer) -> Result<Self> {
        check_unused(t.flags, 0, &t.reserved)?;
        let file = RegionFile::get(t.region_fd)?;
        let from = Owner::from_vm_fd(t.from_vm_fd)?;
        let to = Owner::from_vm_fd(t.to_vm_fd)?;
        if from.same_vm(&to) {
            return Err(EINVAL);
        }
        let mut state = file.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        if !state
            .owner
            .as_ref()
            .is_some_and(|owner| owner.same_vm(&from))
        {
            return Err(EPERM);
        }
        state.moving = true;
        drop(state);
        Ok(Self {
            file,
            to: Some(to),
            from: None,
        })
    }

    /// Undoes `check`.
    fn abort(&self) {
        self.file.region().lock().moving = false;
    }

    fn revoke(&mut self) {
        let region = self.file.region();
        let mut state = region.lock();
        self.from = state.owner.take();
        self.file.revoke(&state, 0, region.npages());
        drop(state);
        STATS.revocations.fetch_add(1, Relaxed);
    }

    /// Returns the pages granted.
    fn grant(&mut self) -> u64 {
        let mut state = self.file.region().lock();
        state.owner = self.to.take();
        state.moving = false;
        let pages = state.pages.present() as u64;
        drop(state);
        STATS.transfers.fetch_add(1, Relaxed);
        STATS.pages_transferred.fetch_add(pages, Relaxed);
        pages
    }
}

/// Transfers every entry, all or nothing (see the module doc).
pub(crate) fn transfer(entries: &[uapi::vmbeam_transfer]) -> Result<c_long> {
    trace::transfer_start(entries.len());
    let ret = transfer_all(entries);
    let pages = ret.as_ref().map_or(0, |&pages| pages);
    trace::transfer_done(
        entries.len(),
        pages,
        ret.as_ref().err().map_or(0, |e| e.to_errno()),
    );
    ret.map(|_| 0)
}

/// Returns the number of pages transferred.
fn transfer_all(entries: &[uapi::vmbeam_transfer]) -> Result<u64> {
    let mut moves = KVec::with_capacity(entries.len(), GFP_KERNEL)?;
    for entry in entries {
        let checked =
            Move::check(entry).and_then(|m| moves.push(m, GFP_KERNEL).map_err(Into::into));
        if let Err(err) = checked {
            moves.iter().for_each(Move::abort);
            return Err(err);
        }
    }
    moves.iter_mut().for_each(Move::revoke);
    let pages = moves.iter_mut().map(Move::grant).sum();
    drop(moves); // drops old owners (may destroy VMs) and file references
    Ok(pages)
}

/// `VMBEAM_TRANSFER_BATCH`: reads the entries and transfers them.
pub(crate) fn transfer_batch(batch: &uapi::vmbeam_transfer_batch) -> Result<c_long> {
    check_unused(batch.flags, 0, &batch.reserved)?;
    let count = batch.count as usize;
    if count == 0 || count > uapi::VMBEAM_TRANSFER_BATCH_MAX as usize {
        return Err(EINVAL);
    }
    let mut entries = KVVec::with_capacity(count, GFP_KERNEL)?;
    let mut reader = UserSlice::new(
        batch.transfers as usize,
        count * core::mem::size_of::<uapi::vmbeam_transfer>(),
    )
    .reader();
    for _ in 0..count {
        entries.push(reader.read::<uapi::vmbeam_transfer>()?, GFP_KERNEL)?;
    }
    transfer(&entries)
}
