// SPDX-License-Identifier: GPL-2.0

//! Transfer of regions between VMs.
//!
//! A batch runs in four phases. *Check*: every entry is validated (fds,
//! owner, no region twice) without touching any region, so a refused batch
//! is invisible: nobody's fault or mmap even waits. *Claim*: each region is
//! marked moving; this fails only if a concurrent call took or rebound one
//! since the check, and then the claimed ones are released again (faults
//! that met them waited, and go on as if nothing happened). *Revoke*: each
//! region loses its owner and every mapping of it is zapped (KVM's MMU
//! notifier drops the old VM's stage-2 entries with them). *Grant*: each
//! region gets its new owner, whose VMM maps the same pages, and the move
//! ends. Revoke and grant cannot fail: everything that could was done
//! before.
//!
//! A fault or mmap that meets a moving region waits for the move's outcome
//! ([`Region::lock_settled`]): the new owner then maps, the old one gets
//! SIGBUS (KVM_RUN `EFAULT`), as if it had come after the move.

use core::{ffi::c_long, sync::atomic::Ordering::Relaxed};

use kernel::{
    alloc::{flags::GFP_KERNEL, KVVec, KVec},
    prelude::*,
    uaccess::UserSlice,
};

use crate::{
    device::check_unused,
    owner::{Owner, Vm},
    region::{Region, RegionFile},
    stats::STATS,
    trace, uapi,
};

/// One checked transfer.
struct Move {
    file: RegionFile,
    from: Vm,
    to: Option<Owner>,
    /// The previous owner, kept to be dropped after all locks are released.
    old: Option<Owner>,
}

impl Move {
    /// Validates an entry; changes nothing.
    fn check(t: &uapi::vmbeam_transfer) -> Result<Self> {
        check_unused(t.flags, 0, &t.reserved)?;
        let file = RegionFile::get(t.region_fd)?;
        let from = Vm::from_fd(t.from_vm_fd)?;
        let to = Vm::from_fd(t.to_vm_fd)?;
        if from.same_vm(&to) {
            return Err(EINVAL);
        }
        let state = file.region().lock();
        let moving = state.moving;
        // A process-owned region has no owner VM to name: EPERM, here,
        // before any region of the batch is claimed.
        let owned_by_from = state.owner.as_ref().is_some_and(|o| o.is_vm(&from));
        drop(state);
        if moving {
            return Err(EBUSY);
        }
        if !owned_by_from {
            return Err(EPERM);
        }
        Ok(Self {
            file,
            from,
            to: Some(Owner::Vm(to)),
            old: None,
        })
    }

    fn region(&self) -> &Region {
        self.file.region()
    }

    /// Marks the region moving, checking again what a concurrent call may
    /// have changed since [`Move::check`].
    fn claim(&self) -> Result {
        let mut state = self.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        if !state.owner.as_ref().is_some_and(|o| o.is_vm(&self.from)) {
            return Err(EPERM);
        }
        state.moving = true;
        Ok(())
    }

    /// Undoes [`Move::claim`].
    fn release(&self) {
        let region = self.region();
        region.end_move(&mut region.lock());
    }

    fn revoke(&mut self) {
        let region = self.file.region();
        let mut state = region.lock();
        self.old = state.owner.take();
        self.file.revoke(&state, 0, region.npages());
        drop(state);
        STATS.revocations.fetch_add(1, Relaxed);
    }

    /// Returns the pages granted.
    fn grant(&mut self) -> u64 {
        let region = self.file.region();
        let mut state = region.lock();
        state.owner = self.to.take();
        region.end_move(&mut state);
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

/// `EBUSY` if two moves name the same region (through any of its files).
fn check_distinct(moves: &[Move]) -> Result {
    let mut regions = KVVec::with_capacity(moves.len(), GFP_KERNEL)?;
    for m in moves {
        regions.push(m.region() as *const Region as usize, GFP_KERNEL)?;
    }
    regions.sort_unstable();
    if regions.windows(2).any(|w| w[0] == w[1]) {
        return Err(EBUSY);
    }
    Ok(())
}

/// Returns the number of pages transferred.
fn transfer_all(entries: &[uapi::vmbeam_transfer]) -> Result<u64> {
    let mut moves = KVec::with_capacity(entries.len(), GFP_KERNEL)?;
    for entry in entries {
        moves.push(Move::check(entry)?, GFP_KERNEL)?;
    }
    check_distinct(&moves)?;
    for (claimed, m) in moves.iter().enumerate() {
        if let Err(err) = m.claim() {
            moves[..claimed].iter().for_each(Move::release);
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
