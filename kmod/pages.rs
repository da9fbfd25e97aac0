// SPDX-License-Identifier: GPL-2.0

//! The pages of a region: order-0 pages the module allocated, by page
//! offset, each owned by exactly one [`Pages`]; moved between regions by
//! transfers' owners and by gathers, freed when the last region holding
//! them goes.

use core::{
    ffi::{c_int, c_ulong},
    ptr,
};

use kernel::{
    alloc::{flags::GFP_KERNEL, KVVec},
    prelude::*,
};

/// Opaque `struct page`.
#[repr(C)]
pub(crate) struct Page {
    _private: [u8; 0],
}

extern "C" {
    fn vmbeam_page_alloc() -> *mut Page;
    fn vmbeam_page_free(page: *mut Page);
    fn vmbeam_should_stop() -> c_int;
    fn vmbeam_page_alloc_block(pages: *mut *mut Page) -> c_int;
    fn vmbeam_page_to_pfn(page: *mut Page) -> c_ulong;
}

pub(crate) const PAGE_SIZE: u64 = 4096;
/// Pages in a 2 MiB block: what one PMD maps.
pub(crate) const BLOCK_PAGES: usize = 512;

/// The pages of a region, by page offset. A null entry is a page that was
/// gathered away into another region.
///
/// # Invariants
///
/// Every non-null entry is an order-0 page allocated by `vmbeam_page_alloc`
/// and referenced by no other `Pages`; it is freed only by `Drop`.
pub(crate) struct Pages(KVVec<*mut Page>);

impl Pages {
    /// `n` missing pages.
    pub(crate) fn empty(n: usize) -> Result<Self> {
        // INVARIANT: no non-null entry.
        Ok(Self(KVVec::from_elem(ptr::null_mut(), n, GFP_KERNEL)?))
    }

    /// `n` fresh zeroed pages, charged to the caller's memcg; with `huge`,
    /// each whole 2 MiB of them a naturally aligned block where the
    /// allocator has one (else 4 KiB pages, as without).
    pub(crate) fn alloc(n: usize, huge: bool) -> Result<Self> {
        let mut pages = Self::empty(n)?;
        let mut blocks = pages.0.chunks_exact_mut(BLOCK_PAGES);
        for block in blocks.by_ref().take(if huge { n / BLOCK_PAGES } else { 0 }) {
            // SAFETY: no preconditions; process context.
            if unsafe { vmbeam_should_stop() } != 0 {
                return Err(EINTR);
            }
            // SAFETY: `block` has room for the 512 page pointers written.
            // INVARIANT: on success, 512 fresh order-0 pages (a split
            // block), each in one slot only; on failure nothing is written.
            if unsafe { vmbeam_page_alloc_block(block.as_mut_ptr()) } != 0 {
                break; // fragmented: the rest comes page by page
            }
        }
        for (i, slot) in pages.0.iter_mut().enumerate().filter(|(_, s)| s.is_null()) {
            // SAFETY: no preconditions; process context.
            if i % 512 == 0 && unsafe { vmbeam_should_stop() } != 0 {
                return Err(EINTR); // `pages` frees what was allocated
            }
            // SAFETY: no preconditions.
            let page = unsafe { vmbeam_page_alloc() };
            if page.is_null() {
                return Err(ENOMEM);
            }
            // INVARIANT: a fresh page, in this slot only.
            *slot = page;
        }
        Ok(pages)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn get(&self, index: usize) -> Option<*mut Page> {
        self.0.get(index).copied().filter(|p| !p.is_null())
    }

    /// The first pfn of pages `first..first + 512` if they are one
    /// naturally aligned 2 MiB block of physical memory.
    pub(crate) fn block_pfn(&self, first: usize) -> Option<c_ulong> {
        let block = self.0.get(first..first.checked_add(BLOCK_PAGES)?)?;
        // SAFETY: non-null entries are live pages (type invariant).
        let pfn = |p: *mut Page| (!p.is_null()).then(|| unsafe { vmbeam_page_to_pfn(p) });
        let base = pfn(block[0])?;
        let contiguous = block
            .iter()
            .enumerate()
            .all(|(i, &p)| pfn(p) == Some(base + i as c_ulong));
        (base % BLOCK_PAGES as c_ulong == 0 && contiguous).then_some(base)
    }

    pub(crate) fn present(&self) -> usize {
        self.0.iter().filter(|p| !p.is_null()).count()
    }

    /// Whether every slot in `range` is missing (and in range).
    pub(crate) fn all_missing(&self, range: core::ops::Range<usize>) -> bool {
        self.0
            .get(range)
            .is_some_and(|s| s.iter().all(|p| p.is_null()))
    }

    /// Moves page `from` of `src` into slot `to` of `self`. Both slots must be
    /// in range, `from` present and `to` empty.
    pub(crate) fn take_from(&mut self, to: usize, src: &mut Pages, from: usize) {
        // INVARIANT: the page moves; exactly one `Pages` refers to it.
        self.0[to] = core::mem::take(&mut src.0[from]);
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        for &page in self.0.iter().filter(|p| !p.is_null()) {
            // SAFETY: ours alone, by the type invariant; freed once.
            unsafe { vmbeam_page_free(page) };
        }
    }
}
