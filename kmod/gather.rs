// SPDX-License-Identifier: GPL-2.0

//! Gather: pages move from one region into another, bytes untouched.
//!
//! `VMBEAM_GATHER` makes a new region of chosen pages of a source;
//! `VMBEAM_GATHER_INTO` moves them into the missing slots of an existing
//! region whose owner may already map it (a window plugged into the clean
//! L1 ahead of a migration). Every check is made before a page moves, and
//! the source's mappings of the moved pages are zapped under its lock, as
//! in a transfer's revoke phase. With `VMBEAM_GATHER_REPLACE` fresh zeroed
//! pages, allocated before anything moves, take the moved pages' slots in
//! the source, so its owner faults zeros there instead of SIGBUS.
//!
//! Gathers are serialised by one module-wide lock. So the two region locks
//! are taken one after the other, never nested (lockdep would see one lock
//! class taken twice), and no other gather can fill a destination slot or
//! empty a source slot between the checks and the move.

use core::{ffi::c_long, sync::atomic::Ordering::Relaxed};

use kernel::{alloc::flags::GFP_KERNEL, alloc::KVVec, prelude::*, uaccess::UserSlice};

use crate::{
    device::check_unused,
    pages::{Pages, PAGE_SIZE},
    region::{Region, RegionFile, RegionGuard},
    stats::STATS,
    uapi,
};

extern "C" {
    fn vmbeam_gather_lock();
    fn vmbeam_gather_unlock();
}

/// The module-wide gather lock, held.
struct GatherLock(());

impl GatherLock {
    fn lock() -> Self {
        // SAFETY: no preconditions; released in `Drop`.
        unsafe { vmbeam_gather_lock() };
        Self(())
    }
}

impl Drop for GatherLock {
    fn drop(&mut self) {
        // SAFETY: taken in `lock`, released once.
        unsafe { vmbeam_gather_unlock() };
    }
}

/// The source pages to move, by page index, in destination order, and the
/// same indexes sorted (to find repeats and runs to revoke).
struct Selection {
    indexes: KVVec<usize>,
    sorted: KVVec<usize>,
}

impl Selection {
    /// Reads `count` byte offsets from userspace and checks them against a
    /// source of `src_size` bytes: page aligned, in range, distinct.
    fn read(offsets: u64, count: usize, src_size: u64) -> Result<Self> {
        let mut indexes = KVVec::with_capacity(count, GFP_KERNEL)?;
        let mut reader =
            UserSlice::new(offsets as usize, count * core::mem::size_of::<u64>()).reader();
        for _ in 0..count {
            let offset = reader.read::<u64>()?;
            if offset % PAGE_SIZE != 0 || offset >= src_size {
                return Err(EINVAL);
            }
            indexes.push((offset / PAGE_SIZE) as usize, GFP_KERNEL)?;
        }
        let mut sorted = KVVec::with_capacity(count, GFP_KERNEL)?;
        for &i in indexes.iter() {
            sorted.push(i, GFP_KERNEL)?;
        }
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(EINVAL);
        }
        Ok(Self { indexes, sorted })
    }

    /// With `replace`, the fresh pages for the source's emptied slots, one
    /// per selected page: allocated before anything moves, so a gather
    /// that cannot have them (`ENOMEM`, `EINTR`) moves nothing.
    fn fresh(&self, replace: bool) -> Result<Option<Pages>> {
        replace
            .then(|| Pages::alloc(self.indexes.len(), false))
            .transpose()
    }

    /// Takes the selected pages out of the source into `moved` (slot i =
    /// the i-th selected page), puts page i of `fresh` (if any) in the
    /// i-th selected page's place, and zaps the source's mappings of the
    /// moved pages, one call per run of consecutive pages. `EBUSY` if the
    /// source is moving, `EINVAL` if a page is gone already: then nothing
    /// moved (and `fresh` is freed).
    fn take(&self, src: &RegionFile, moved: &mut Pages, mut fresh: Option<Pages>) -> Result {
        let mut state: RegionGuard<'_> = src.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        if self.sorted.iter().any(|&i| state.pages.get(i).is_none()) {
            return Err(EINVAL);
        }
        for (to, &from) in self.indexes.iter().enumerate() {
            moved.take_from(to, &mut state.pages, from);
            if let Some(fresh) = fresh.as_mut() {
                state.pages.take_from(from, fresh, to);
            }
        }
        // The zap comes after the swap, still under the lock: no mapping of
        // a moved page survives it, and the next fault maps the fresh one.
        let sorted = &self.sorted;
        let mut run_start = 0;
        for k in 1..=sorted.len() {
            if k == sorted.len() || sorted[k] != sorted[k - 1] + 1 {
                src.revoke(&state, sorted[run_start] as u64, (k - run_start) as u64);
                run_start = k;
            }
        }
        drop(state);
        STATS.revocations.fetch_add(1, Relaxed);
        if fresh.is_some() {
            // New pages in a region: the moved ones are counted already.
            STATS
                .pages_owned
                .fetch_add(self.indexes.len() as u64, Relaxed);
        }
        Ok(())
    }
}

/// `VMBEAM_GATHER`: returns a new region's fd, or 0 with `VMBEAM_GATHER_INTO`.
pub(crate) fn gather(g: &uapi::vmbeam_gather) -> Result<c_long> {
    let into = g.flags & uapi::VMBEAM_GATHER_INTO != 0;
    let replace = g.flags & uapi::VMBEAM_GATHER_REPLACE != 0;
    let known = uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_REPLACE;
    check_unused(g.flags & !known, u64::from(g.pad), &[])?;
    if !into && (g.dst_fd != 0 || g.dst_offset != 0) {
        return Err(EINVAL);
    }
    let count = usize::try_from(g.count).map_err(|_| EINVAL)?;
    if count == 0 || count > uapi::VMBEAM_GATHER_MAX as usize {
        return Err(EINVAL);
    }
    let src = RegionFile::get(g.src_fd)?;
    let selection = Selection::read(g.offsets, count, src.region().size())?;
    if into {
        gather_into(&src, &selection, replace, g.dst_fd, g.dst_offset)
    } else {
        gather_new(&src, &selection, replace)
    }
}

fn gather_new(src: &RegionFile, selection: &Selection, replace: bool) -> Result<c_long> {
    let count = selection.indexes.len();
    // Everything that can fail, but the source's checks, before a page moves.
    let mut moved = Pages::empty(count)?;
    let dst = Region::new(Pages::empty(count)?, false)?;
    let fd = dst.clone().pending_fd()?;
    let fresh = selection.fresh(replace)?;
    {
        let _serial = GatherLock::lock();
        selection.take(src, &mut moved, fresh)?;
    }
    // The new region is not published yet: only we can lock it.
    core::mem::swap(&mut dst.lock().pages, &mut moved);
    Ok(fd.install() as c_long)
}

fn gather_into(
    src: &RegionFile,
    selection: &Selection,
    replace: bool,
    dst_fd: i32,
    dst_offset: u64,
) -> Result<c_long> {
    let count = selection.indexes.len();
    let dst = RegionFile::get(dst_fd)?;
    if dst.same_region(src) || dst_offset % PAGE_SIZE != 0 {
        return Err(EINVAL);
    }
    let first = usize::try_from(dst_offset / PAGE_SIZE).map_err(|_| EINVAL)?;
    let slots = first..first.checked_add(count).ok_or(EINVAL)?;
    if slots.end as u64 > dst.region().npages() {
        return Err(EINVAL);
    }
    let mut moved = Pages::empty(count)?;
    let fresh = selection.fresh(replace)?;

    let _serial = GatherLock::lock();
    {
        let state = dst.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        if !state.pages.all_missing(slots.clone()) {
            return Err(EEXIST);
        }
    }
    // From here on nothing fails: no other gather runs, so the destination
    // slots stay missing; a transfer may change the destination's owner
    // meanwhile, and the pages then go with the region.
    selection.take(src, &mut moved, fresh)?;
    let mut state = dst.region().lock();
    for (i, slot) in slots.clone().enumerate() {
        state.pages.take_from(slot, &mut moved, i);
    }
    // The slots were missing, so nothing maps them; zapping keeps that
    // exact should a mapper ever install something for a missing page.
    dst.revoke(&state, first as u64, count as u64);
    drop(state);
    Ok(0)
}
