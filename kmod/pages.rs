// SPDX-License-Identifier: GPL-2.0

//! The pages of a region: order-0 pages the module allocated, by page
//! offset, each owned by exactly one [`Pages`]; moved between regions by
//! transfers' owners and by gathers, freed when the last region holding
//! them goes.

use core::{
    cell::Cell,
    ffi::{c_int, c_uint, c_ulong},
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
    fn vmbeam_page_alloc_gigantic(pages: *mut *mut Page) -> c_int;
    fn vmbeam_page_free_gigantic(first: *mut Page);
    fn vmbeam_pool_fill() -> c_uint;
    fn vmbeam_pool_drain();
    fn vmbeam_page_to_pfn(page: *mut Page) -> c_ulong;
}

pub(crate) const PAGE_SIZE: u64 = 4096;
/// Pages in a 2 MiB block: what one PMD maps.
pub(crate) const BLOCK_PAGES: usize = 512;
/// Pages in a 1 GiB block: what one PUD maps.
pub(crate) const GIGANTIC_PAGES: usize = 512 * BLOCK_PAGES;

/// The largest physically contiguous block a region's pages are allocated
/// in, and mapped by: a region's mappings use entries up to this size.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum BlockSize {
    /// 4 KiB pages; ordinary (refcounted, GUP-able) mappings.
    Page,
    /// 2 MiB blocks by PMD (`VMBEAM_CREATE_HUGE`); PFNMAP mappings.
    Pmd,
    /// 1 GiB blocks by PUD (`VMBEAM_CREATE_HUGE_1G`), then as `Pmd`.
    Pud,
}

impl BlockSize {
    /// The page order of its entries (0, `PMD_ORDER`, `PUD_ORDER`).
    pub(crate) fn order(self) -> u32 {
        match self {
            Self::Page => 0,
            Self::Pmd => BLOCK_PAGES.trailing_zeros(),
            Self::Pud => GIGANTIC_PAGES.trailing_zeros(),
        }
    }

    /// Pages in one block of this size.
    pub(crate) fn pages(self) -> usize {
        1 << self.order()
    }
}

/// What is known of an aligned block's slots: nothing yet, or that they
/// are (or are not) one naturally aligned run of physical memory.
const UNKNOWN: u8 = 0;
const WHOLE: u8 = 1;
const BROKEN: u8 = 2;

/// The pages of a region, by page offset. A null entry is a page that was
/// gathered away into another region.
///
/// # Invariants
///
/// Every non-null entry of `slots` is an order-0 page the module allocated
/// (alone or in a block) and referenced by no other `Pages`; it is freed
/// only by `Drop`. Once `alloc` returns, `present` is the number of
/// non-null entries (so a transfer counts a GiB's pages without walking
/// them). An entry of `pmd_known` (`pud_known`) other than `UNKNOWN` says
/// what a walk of its aligned 2 MiB (1 GiB) block of slots would find now:
/// every change of a slot forgets its blocks.
pub(crate) struct Pages {
    slots: KVVec<*mut Page>,
    present: usize,
    /// Per aligned 2 MiB block: whether it is whole. A huge fault asks
    /// this of its block each time, and walking it costs a call per page
    /// (262,144 per GiB: ~1 ms per 1 GiB fault under TCG, and as much per
    /// GiB of 2 MiB faults); so once per block and change.
    pmd_known: KVVec<Cell<u8>>,
    /// Per aligned 1 GiB block, the same.
    pud_known: KVVec<Cell<u8>>,
}

impl Pages {
    /// `n` missing pages.
    pub(crate) fn empty(n: usize) -> Result<Self> {
        // INVARIANT: no non-null entry, none present, nothing known.
        Ok(Self {
            slots: KVVec::from_elem(ptr::null_mut(), n, GFP_KERNEL)?,
            present: 0,
            pmd_known: KVVec::from_elem(Cell::new(UNKNOWN), n.div_ceil(BLOCK_PAGES), GFP_KERNEL)?,
            pud_known: KVVec::from_elem(
                Cell::new(UNKNOWN),
                n.div_ceil(GIGANTIC_PAGES),
                GFP_KERNEL,
            )?,
        })
    }

    /// What is known of the aligned block of `size` starting at `first`.
    fn known(&self, first: usize, size: BlockSize) -> Option<&Cell<u8>> {
        match size {
            BlockSize::Page => None,
            BlockSize::Pmd if first % BLOCK_PAGES == 0 => self.pmd_known.get(first / BLOCK_PAGES),
            BlockSize::Pud if first % GIGANTIC_PAGES == 0 => {
                self.pud_known.get(first / GIGANTIC_PAGES)
            }
            _ => None,
        }
    }

    /// Slot `index` changed: its blocks must be walked again.
    fn forget(&self, index: usize) {
        // INVARIANT: what was known of the blocks holding `index` is gone.
        if let Some(k) = self.pmd_known.get(index / BLOCK_PAGES) {
            k.set(UNKNOWN);
        }
        if let Some(k) = self.pud_known.get(index / GIGANTIC_PAGES) {
            k.set(UNKNOWN);
        }
    }

    /// `n` fresh zeroed pages: each whole 1 GiB (`BlockSize::Pud`, not
    /// charged to a memcg) and then each whole 2 MiB (`Pmd` and up) of them
    /// a naturally aligned block where the allocator has one, the rest 4 KiB
    /// pages charged to the caller's memcg.
    pub(crate) fn alloc(n: usize, size: BlockSize) -> Result<Self> {
        let mut pages = Self::empty(n)?;
        if size == BlockSize::Pud {
            pages.alloc_blocks(GIGANTIC_PAGES, vmbeam_page_alloc_gigantic)?;
        }
        if size >= BlockSize::Pmd {
            pages.alloc_blocks(BLOCK_PAGES, vmbeam_page_alloc_block)?;
        }
        for (i, slot) in pages
            .slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.is_null())
        {
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
        // INVARIANT: every slot is filled.
        pages.present = n;
        Ok(pages)
    }

    /// Fills each empty aligned run of `block` slots with one block from
    /// `alloc` (C: writes `block` fresh order-0 pages of one naturally
    /// aligned range, or nothing and `-ENOMEM`/`-EINTR`), until the
    /// allocator has none.
    fn alloc_blocks(
        &mut self,
        block: usize,
        alloc: unsafe extern "C" fn(*mut *mut Page) -> c_int,
    ) -> Result {
        let mut whole = KVVec::new();
        for (i, run) in self.slots.chunks_exact_mut(block).enumerate() {
            let first = i * block;
            if !run[0].is_null() {
                continue; // a bigger block holds it
            }
            // SAFETY: no preconditions; process context.
            if unsafe { vmbeam_should_stop() } != 0 {
                return Err(EINTR);
            }
            // SAFETY: `run` has room for the `block` page pointers written.
            // INVARIANT: on success, `block` fresh order-0 pages, each in
            // one slot only; on failure nothing is written.
            match unsafe { alloc(run.as_mut_ptr()) } {
                0 => whole.push(first, GFP_KERNEL)?,
                e if e == EINTR.to_errno() => return Err(EINTR),
                _ => break, // fragmented: the rest in smaller blocks
            }
        }
        // INVARIANT: each block the allocator gave is one naturally aligned
        // run, and so is each 2 MiB of a 1 GiB one.
        for first in whole {
            for sub in (first..first + block).step_by(BLOCK_PAGES) {
                if let Some(k) = self.known(sub, BlockSize::Pmd) {
                    k.set(WHOLE);
                }
            }
            if let Some(k) = self
                .known(first, BlockSize::Pud)
                .filter(|_| block == GIGANTIC_PAGES)
            {
                k.set(WHOLE);
            }
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn get(&self, index: usize) -> Option<*mut Page> {
        self.slots.get(index).copied().filter(|p| !p.is_null())
    }

    /// The first pfn of pages `first..first + size.pages()` if they are
    /// one naturally aligned block of that size of physical memory.
    /// Walks the block once per change of its slots (`pmd_known`).
    pub(crate) fn block_pfn(&self, first: usize, size: BlockSize) -> Option<c_ulong> {
        let pages = size.pages();
        let block = self.slots.get(first..first.checked_add(pages)?)?;
        // SAFETY: non-null entries are live pages (type invariant).
        let pfn = |p: *mut Page| (!p.is_null()).then(|| unsafe { vmbeam_page_to_pfn(p) });
        let known = self.known(first, size);
        match known.map(Cell::get) {
            Some(WHOLE) => return pfn(block[0]),
            Some(BROKEN) => return None,
            _ => {}
        }
        let base = pfn(block[0]);
        let whole = base.filter(|&base| {
            base % pages as c_ulong == 0
                && block
                    .iter()
                    .enumerate()
                    .all(|(i, &p)| pfn(p) == Some(base + i as c_ulong))
        });
        // INVARIANT: what the walk just found.
        if let Some(k) = known {
            k.set(if whole.is_some() { WHOLE } else { BROKEN });
        }
        whole
    }

    pub(crate) fn present(&self) -> usize {
        self.present
    }

    /// Whether every slot in `range` is missing (and in range).
    pub(crate) fn all_missing(&self, range: core::ops::Range<usize>) -> bool {
        self.slots
            .get(range)
            .is_some_and(|s| s.iter().all(|p| p.is_null()))
    }

    /// Moves page `from` of `src` into slot `to` of `self`. Both slots must be
    /// in range, `from` present and `to` empty.
    pub(crate) fn take_from(&mut self, to: usize, src: &mut Pages, from: usize) {
        // INVARIANT: the page moves; exactly one `Pages` refers to it, and
        // each count follows it.
        let page = core::mem::take(&mut src.slots[from]);
        if !page.is_null() {
            src.present -= 1;
            self.present += 1;
        }
        self.slots[to] = page;
        src.forget(from);
        self.forget(to);
    }
}

/// Takes the 1 GiB pool (`gigantic_pool=` at load); how many GiBs it holds.
pub(crate) fn pool_fill() -> u32 {
    // SAFETY: no preconditions; module init (process context).
    unsafe { vmbeam_pool_fill() }
}

/// Gives the pool back; at unload, when no region (no `Pages`) is left.
pub(crate) fn pool_drain() {
    // SAFETY: no preconditions; module exit.
    unsafe { vmbeam_pool_drain() }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // Each GiB still whole goes back whole (to the pool, if it has room).
        for first in (0..self.slots.len()).step_by(GIGANTIC_PAGES) {
            if self.block_pfn(first, BlockSize::Pud).is_some() {
                // SAFETY: the GiB's pages are ours alone (type invariant)
                // and an aligned run of physical memory (just checked);
                // its slots are cleared so none is freed twice.
                unsafe { vmbeam_page_free_gigantic(self.slots[first]) };
                self.slots[first..first + GIGANTIC_PAGES].fill(ptr::null_mut());
                self.forget(first);
            }
        }
        for &page in self.slots.iter().filter(|p| !p.is_null()) {
            // SAFETY: ours alone, by the type invariant; freed once.
            unsafe { vmbeam_page_free(page) };
        }
    }
}
