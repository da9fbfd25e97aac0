// SPDX-License-Identifier: GPL-2.0

//! Gather: pages move from one region into another, bytes untouched.
//!
//! `VMBEAM_GATHER` makes a new region of chosen pages of a source;
//! `VMBEAM_GATHER_INTO` moves them into the missing slots of an existing
//! region whose owner may already map it (a window plugged into the clean
//! L1 ahead of a migration); with `VMBEAM_GATHER_SCATTER` the other way
//! round: the source's first pages go to chosen missing slots of the
//! destination (holes refilled, a window's pages put back). Every check is
//! made before a page moves, and the source's mappings of the moved pages
//! are zapped under its lock, as in a transfer's revoke phase. With
//! `VMBEAM_GATHER_REPLACE` fresh zeroed pages, allocated before anything
//! moves, take the moved pages' slots in the source, so its owner faults
//! zeros there instead of SIGBUS. The pages are named by offset, or with
//! `VMBEAM_GATHER_RUNS` by runs of consecutive pages; either way they are
//! handled as runs, so a window (one run) costs no per-page reading,
//! sorting or checking, only the moves of its page pointers.
//!
//! Gathers are serialised by one module-wide lock. So the two region locks
//! are taken one after the other, never nested (lockdep would see one lock
//! class taken twice), and no other gather can fill a destination slot or
//! empty a source slot between the checks and the move.

use core::{ffi::c_long, sync::atomic::Ordering::Relaxed};

use kernel::{alloc::flags::GFP_KERNEL, alloc::KVVec, prelude::*, uaccess::UserSlice};

use crate::{
    device::check_unused,
    pages::{BlockSize, Pages, BLOCK_PAGES, PAGE_SIZE},
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

/// Reads `count` u64 words from userspace at `ptr`, handing each to `f`.
fn read_words(ptr: u64, count: usize, mut f: impl FnMut(u64) -> Result) -> Result {
    const WORD: usize = core::mem::size_of::<u64>();
    let mut reader = UserSlice::new(ptr as usize, count.checked_mul(WORD).ok_or(EINVAL)?).reader();
    // 64 words per copy, not one: each copy opens and closes a user
    // access window, and a gather may name a million pages.
    let mut buf = [0u8; 64 * WORD];
    let mut left = count;
    while left > 0 {
        let bytes = &mut buf[..left.min(64) * WORD];
        reader.read_slice(bytes)?;
        for word in bytes.chunks_exact(WORD) {
            let mut raw = [0u8; WORD];
            raw.copy_from_slice(word);
            f(u64::from_ne_bytes(raw))?;
        }
        left -= bytes.len() / WORD;
    }
    Ok(())
}

/// The page index of byte `offset` of a region of `size` bytes: page
/// aligned and in range, else `EINVAL`.
fn page_of(offset: u64, size: u64) -> Result<usize> {
    if offset % PAGE_SIZE != 0 || offset >= size {
        return Err(EINVAL);
    }
    usize::try_from(offset / PAGE_SIZE).map_err(|_| EINVAL)
}

/// Reads `count` byte offsets from userspace into a region of `size`
/// bytes: page aligned, in range, distinct (else `EINVAL`). Returns them
/// as page indexes, in order.
fn read_pages(offsets: u64, count: usize, size: u64) -> Result<KVVec<usize>> {
    let mut indexes = KVVec::with_capacity(count, GFP_KERNEL)?;
    read_words(offsets, count, |o| {
        Ok(indexes.push(page_of(o, size)?, GFP_KERNEL)?)
    })?;
    let mut sorted = KVVec::with_capacity(count, GFP_KERNEL)?;
    for &i in indexes.iter() {
        sorted.push(i, GFP_KERNEL)?;
    }
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(EINVAL);
    }
    Ok(indexes)
}

/// Consecutive source pages `first..first + len`.
#[derive(Clone, Copy)]
struct Run {
    first: usize,
    len: usize,
}

impl Run {
    fn end(&self) -> usize {
        self.first + self.len
    }
}

/// Appends `run` to `runs`, merged into the last one if it goes on from it.
fn push_run(runs: &mut KVVec<Run>, run: Run) -> Result {
    match runs.last_mut() {
        Some(last) if last.end() == run.first => last.len += run.len,
        _ => runs.push(run, GFP_KERNEL)?,
    }
    Ok(())
}

/// Reads a gather's source pages from userspace, as runs in destination
/// order: `count` byte offsets, or with `VMBEAM_GATHER_RUNS` `count`
/// `{offset, pages}` pairs, into a source of `size` bytes. `EINVAL` for an
/// offset out of range or unaligned, an empty run, a page named twice.
fn read_runs(ptr: u64, count: usize, size: u64, pairs: bool) -> Result<KVVec<Run>> {
    let mut runs = KVVec::new();
    if !pairs {
        read_words(ptr, count, |o| {
            push_run(
                &mut runs,
                Run {
                    first: page_of(o, size)?,
                    len: 1,
                },
            )
        })?;
        return Ok(runs);
    }
    let mut first = None;
    read_words(ptr, count.checked_mul(2).ok_or(EINVAL)?, |w| {
        let Some(at) = first.take() else {
            first = Some(page_of(w, size)?);
            return Ok(());
        };
        let len = usize::try_from(w).map_err(|_| EINVAL)?;
        let end = at.checked_add(len).ok_or(EINVAL)?;
        if len == 0 || end as u64 > size / PAGE_SIZE {
            return Err(EINVAL);
        }
        push_run(&mut runs, Run { first: at, len })
    })?;
    Ok(runs)
}

/// Most pages that stay in the source between two moved ones whose
/// mappings one zap may take along: 2 MiB, one fault-around window (one
/// PMD in a huge region), so the owner's own loads map a bridged gap
/// again in at most two faults.
const BRIDGE_MAX: usize = BLOCK_PAGES;

/// Which gaps between runs of moved source pages a zap bridges: all gaps
/// shorter than `below` pages, and the first `at` gaps of exactly `below`.
///
/// The rule: the shortest gaps first, none over [`BRIDGE_MAX`], and the
/// pages in them (pages that stay but lose their mapping, and are faulted
/// back in) add up to at most the pages that move. A zap call saved is an
/// MMU-notifier invalidation and a TLB flush saved, KVM's too; a bridged
/// page costs its owner at most one fault when it touches the page again
/// (a KVM stage-2 fault per 4 KiB; its VMM's own loads map 2 MiB per
/// fault). So a gather of close pages zaps in few calls, and what it
/// leaves its owner to fault back stays below what it moved, wherever the
/// pages lie.
#[derive(Clone, Copy)]
struct Bridges {
    below: usize,
    at: usize,
}

impl Bridges {
    /// The bridges for moving the `sorted` runs (disjoint, ascending) of
    /// `pages` pages in all.
    fn plan(sorted: &[Run], pages: usize) -> Result<Self> {
        // How many gaps of each length up to BRIDGE_MAX.
        let mut gaps = KVVec::from_elem(0usize, BRIDGE_MAX + 1, GFP_KERNEL)?;
        for w in sorted.windows(2) {
            if let Some(n) = gaps.get_mut(w[1].first - w[0].end()) {
                *n += 1;
            }
        }
        let mut budget = pages;
        for (len, &n) in gaps.iter().enumerate().skip(1) {
            if n * len > budget {
                // `len` is at least 1: `checked_div` says so without a
                // panic path, which objtool on 6.12 takes for a fall-through.
                let at = budget.checked_div(len).unwrap_or(0);
                return Ok(Self { below: len, at });
            }
            budget -= n * len;
        }
        Ok(Self {
            below: BRIDGE_MAX + 1,
            at: 0,
        })
    }

    /// Whether the next gap, of `len` pages, is bridged (0: no gap).
    fn bridge(&mut self, len: usize) -> bool {
        if len == self.below && self.at > 0 {
            self.at -= 1;
            return true;
        }
        len < self.below
    }
}

/// The source pages to move, as runs in destination order; the same
/// sorted (to check them, and to find what to zap) unless they are sorted
/// already.
struct Selection {
    runs: KVVec<Run>,
    sorted: Option<KVVec<Run>>,
    pages: usize,
    bridges: Bridges,
}

impl Selection {
    /// The pages read from userspace (see [`read_runs`]), checked against
    /// a source of `src_size` bytes: `EINVAL` if one is named twice.
    fn read(ptr: u64, count: usize, src_size: u64, pairs: bool) -> Result<Self> {
        let runs = read_runs(ptr, count, src_size, pairs)?;
        let mut pages = 0usize;
        let mut sorted = KVVec::with_capacity(runs.len(), GFP_KERNEL)?;
        for &r in runs.iter() {
            pages += r.len; // at most 2^20 runs, each inside the source: no overflow
            sorted.push(r, GFP_KERNEL)?;
        }
        sorted.sort_unstable_by_key(|r| r.first);
        if sorted.windows(2).any(|w| w[0].end() > w[1].first) {
            return Err(EINVAL);
        }
        let bridges = Bridges::plan(&sorted, pages)?;
        Ok(Self {
            runs,
            sorted: Some(sorted),
            pages,
            bridges,
        })
    }

    /// The source's first `count` pages, in order (a scatter): one run.
    fn first(count: usize) -> Result<Self> {
        let mut runs = KVVec::new();
        runs.push(
            Run {
                first: 0,
                len: count,
            },
            GFP_KERNEL,
        )?;
        let bridges = Bridges { below: 1, at: 0 };
        Ok(Self {
            runs,
            sorted: None,
            pages: count,
            bridges,
        })
    }

    /// Pages in all.
    fn len(&self) -> usize {
        self.pages
    }

    fn sorted(&self) -> &[Run] {
        self.sorted.as_deref().unwrap_or(&self.runs)
    }

    /// The selected source pages, in destination order.
    fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(|r| r.first..r.end())
    }

    /// With `replace`, the fresh pages for the source's emptied slots, one
    /// per selected page: allocated before anything moves, so a gather
    /// that cannot have them (`ENOMEM`, `EINTR`) moves nothing.
    fn fresh(&self, replace: bool) -> Result<Option<Pages>> {
        replace
            .then(|| Pages::alloc(self.len(), BlockSize::Page))
            .transpose()
    }

    /// Takes the selected pages out of the source into `moved` (slot i =
    /// the i-th selected page), puts page i of `fresh` (if any) in the
    /// i-th selected page's place, and zaps the source's mappings of the
    /// moved pages ([`Selection::zap`]). `EBUSY` if the source is moving,
    /// `EINVAL` if a page is gone already: then nothing moved (and `fresh`
    /// is freed).
    fn take(&self, src: &RegionFile, moved: &mut Pages, mut fresh: Option<Pages>) -> Result {
        let mut state: RegionGuard<'_> = src.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        let gone = |r: &Run| (r.first..r.end()).any(|i| state.pages.get(i).is_none());
        if self.sorted().iter().any(gone) {
            return Err(EINVAL);
        }
        for (to, from) in self.pages().enumerate() {
            moved.take_from(to, &mut state.pages, from);
            if let Some(fresh) = fresh.as_mut() {
                state.pages.take_from(from, fresh, to);
            }
        }
        // The zap comes after the swap, still under the lock: no mapping of
        // a moved page survives it, and the next fault maps the fresh one.
        self.zap(src, &state);
        drop(state);
        STATS.revocations.fetch_add(1, Relaxed);
        if fresh.is_some() {
            // New pages in a region: the moved ones are counted already.
            STATS.pages_owned.fetch_add(self.len() as u64, Relaxed);
        }
        Ok(())
    }

    /// Zaps every mapping of the moved pages: one call per run of
    /// consecutive pages, where runs separated by a bridged gap
    /// ([`Bridges`]) share the call. A bridged page stays in the region
    /// and keeps its bytes; only its mapping goes, and the owner's next
    /// fault maps it again (its 2 MiB window, by fault-around).
    fn zap(&self, src: &RegionFile, state: &RegionGuard<'_>) {
        let Some((head, rest)) = self.sorted().split_first() else {
            return;
        };
        let mut bridges = self.bridges;
        let (mut first, mut end) = (head.first, head.end());
        for r in rest {
            if !bridges.bridge(r.first - end) {
                src.revoke(state, first as u64, (end - first) as u64);
                first = r.first;
            }
            end = r.end();
        }
        src.revoke(state, first as u64, (end - first) as u64);
    }
}

/// Where the moved pages go in an existing region: page i into slot
/// `first + i`, or into the i-th listed slot (a scatter).
enum Slots {
    Run(usize),
    Listed(KVVec<usize>),
}

impl Slots {
    fn slot(&self, i: usize) -> usize {
        match self {
            Slots::Run(first) => first + i,
            Slots::Listed(slots) => slots[i],
        }
    }
}

/// `VMBEAM_GATHER`: returns a new region's fd, or 0 with `VMBEAM_GATHER_INTO`.
pub(crate) fn gather(g: &uapi::vmbeam_gather) -> Result<c_long> {
    let into = g.flags & uapi::VMBEAM_GATHER_INTO != 0;
    let replace = g.flags & uapi::VMBEAM_GATHER_REPLACE != 0;
    let scatter = g.flags & uapi::VMBEAM_GATHER_SCATTER != 0;
    let pairs = g.flags & uapi::VMBEAM_GATHER_RUNS != 0;
    let known = uapi::VMBEAM_GATHER_INTO
        | uapi::VMBEAM_GATHER_REPLACE
        | uapi::VMBEAM_GATHER_SCATTER
        | uapi::VMBEAM_GATHER_RUNS;
    check_unused(g.flags & !known, u64::from(g.pad), &[])?;
    if !into && (g.dst_fd != 0 || g.dst_offset != 0) {
        return Err(EINVAL);
    }
    // A scatter moves the source's first pages, into an existing region;
    // its sources (a fresh region, a window given back) are dropped
    // afterwards, so fresh pages left in them would be wasted.
    if scatter && (!into || replace || pairs || g.dst_offset != 0) {
        return Err(EINVAL);
    }
    let count = usize::try_from(g.count).map_err(|_| EINVAL)?;
    if count == 0 || count > uapi::VMBEAM_GATHER_MAX as usize {
        return Err(EINVAL);
    }
    let src = RegionFile::get(g.src_fd)?;
    if scatter {
        return scatter_into(&src, g.offsets, count, g.dst_fd);
    }
    let selection = Selection::read(g.offsets, count, src.region().size(), pairs)?;
    if into {
        gather_into(&src, &selection, replace, g.dst_fd, g.dst_offset)
    } else {
        gather_new(&src, &selection, replace)
    }
}

fn gather_new(src: &RegionFile, selection: &Selection, replace: bool) -> Result<c_long> {
    let count = selection.len();
    // Everything that can fail, but the source's checks, before a page moves.
    let mut moved = Pages::empty(count)?;
    let dst = Region::new(Pages::empty(count)?, BlockSize::Page)?;
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
    let count = selection.len();
    let dst = RegionFile::get(dst_fd)?;
    if dst.same_region(src) || dst_offset % PAGE_SIZE != 0 {
        return Err(EINVAL);
    }
    let first = usize::try_from(dst_offset / PAGE_SIZE).map_err(|_| EINVAL)?;
    let end = first.checked_add(count).ok_or(EINVAL)?;
    if end as u64 > dst.region().npages() {
        return Err(EINVAL);
    }
    let fresh = selection.fresh(replace)?;
    move_into(src, selection, fresh, &dst, &Slots::Run(first))
}

/// `VMBEAM_GATHER_SCATTER`: the source's first `count` pages into the
/// destination's slots at the byte `offsets` read from userspace.
fn scatter_into(src: &RegionFile, offsets: u64, count: usize, dst_fd: i32) -> Result<c_long> {
    let dst = RegionFile::get(dst_fd)?;
    if dst.same_region(src) || count as u64 > src.region().npages() {
        return Err(EINVAL);
    }
    let slots = read_pages(offsets, count, dst.region().size())?;
    let selection = Selection::first(count)?;
    move_into(src, &selection, None, &dst, &Slots::Listed(slots))
}

/// Moves the selected source pages into `slots` of `dst`, which must all
/// be missing (`EEXIST`), after every other check.
fn move_into(
    src: &RegionFile,
    selection: &Selection,
    fresh: Option<Pages>,
    dst: &RegionFile,
    slots: &Slots,
) -> Result<c_long> {
    let count = selection.len();
    let mut moved = Pages::empty(count)?;

    let _serial = GatherLock::lock();
    {
        let state = dst.region().lock();
        if state.moving {
            return Err(EBUSY);
        }
        let missing = match slots {
            Slots::Run(first) => state.pages.all_missing(*first..first + count),
            Slots::Listed(slots) => slots.iter().all(|&s| state.pages.get(s).is_none()),
        };
        if !missing {
            return Err(EEXIST);
        }
    }
    // From here on nothing fails: no other gather runs, so the destination
    // slots stay missing; a transfer may change the destination's owner
    // meanwhile, and the pages then go with the region.
    selection.take(src, &mut moved, fresh)?;
    let mut state = dst.region().lock();
    for i in 0..count {
        state.pages.take_from(slots.slot(i), &mut moved, i);
    }
    // Nothing maps a missing slot: every path that empties a slot zaps it
    // under the region lock, and faults map only present pages. A run is
    // zapped all the same, in one call, to keep that exact should a mapper
    // ever install something for a missing page; scattered slots are not
    // (one call per slot is the cost scattering avoids), and the zap would
    // take the destination's mappings of the pages between them.
    if let Slots::Run(first) = slots {
        dst.revoke(&state, *first as u64, count as u64);
    }
    drop(state);
    Ok(0)
}
