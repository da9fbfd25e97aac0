// SPDX-License-Identifier: GPL-2.0

//! Regions: guest memory the module owns, mapped by one owner at a time.
//!
//! A region is a set of pages ([`crate::pages`]) and a file (an anon inode
//! of its own) through which the owner's VMM maps them; the owner is a VM
//! or a process ([`crate::owner`]). The owner's faults insert the region's
//! own pages; anyone else's get SIGBUS. The transfer path
//! ([`crate::transfer`]) changes the owner and zaps the old owner's
//! mappings under the region lock, so no fault can slip a stale mapping in
//! between.

use core::{
    ffi::{c_int, c_long, c_uint, c_ulong, c_void},
    ptr::{self, NonNull},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

use kernel::{
    alloc::flags::GFP_KERNEL,
    error::{from_err_ptr, to_result},
    new_condvar, new_mutex,
    prelude::*,
    sync::{
        lock::{mutex::MutexBackend, Guard},
        Arc, ArcBorrow, CondVar, Mutex,
    },
};

use crate::{
    device::{check_unused, read_arg, with_arg, Commands},
    frames,
    owner::{region_bind, Mm, Owner},
    pages::{BlockSize, Page, Pages, PAGE_SIZE},
    stats::STATS,
    uapi,
};

/// Opaque `struct file`.
#[repr(C)]
pub(crate) struct File {
    _private: [u8; 0],
}

/// Opaque `struct vm_fault`.
#[repr(C)]
pub(crate) struct VmFault {
    _private: [u8; 0],
}

/// Opaque `struct vm_area_struct`.
#[repr(C)]
pub(crate) struct Vma {
    _private: [u8; 0],
}

extern "C" {
    fn vmbeam_totalram_pages() -> c_ulong;
    fn vmbeam_vma_insert_page(vma: *mut Vma, addr: c_ulong, page: *mut Page) -> c_int;
    fn vmbeam_vmf_insert_huge(vmf: *mut VmFault, pfn: c_ulong, order: c_uint) -> c_int;
    fn vmbeam_region_file(region: *const c_void, size: i64) -> *mut File;
    fn vmbeam_fd_reserve() -> c_int;
    fn vmbeam_fd_unreserve(fd: c_int);
    fn vmbeam_fd_install(fd: c_int, file: *mut File);
    fn vmbeam_region_fget(fd: c_int, filep: *mut *mut File) -> *mut c_void;
    fn vmbeam_fput(file: *mut File);
    fn vmbeam_revoke(file: *mut File, first: c_ulong, count: c_ulong);
}

/// The region lock, held.
pub(crate) type RegionGuard<'a> = Guard<'a, RegionState, MutexBackend>;

/// What the region lock protects.
pub(crate) struct RegionState {
    pub(crate) pages: Pages,
    /// Who may map the region: a VM's creator process, or a process.
    pub(crate) owner: Option<Owner>,
    /// A transfer claimed the region and has not finished: faults and mmaps
    /// wait for its outcome ([`Region::lock_settled`]). Cleared only by
    /// [`Region::end_move`].
    pub(crate) moving: bool,
}

// SAFETY: the raw page pointers are owned (see `Pages`) and only touched
// under the region lock.
unsafe impl Send for RegionState {}

impl RegionState {
    /// Whether a process with address space `mm` may map the region now
    /// (callers hold the lock from [`Region::lock_settled`]).
    fn may_map(&self, mm: *mut Mm) -> bool {
        !self.moving && self.owner.as_ref().is_some_and(|o| o.may_map(mm))
    }
}

/// A region of guest memory.
///
/// # Invariants
///
/// `size == state.pages.len() * PAGE_SIZE` and never changes.
/// `settled` is notified whenever `state.moving` goes back to false.
/// `open_files` counts the open files of the region; each holds one `Arc`
/// reference. Its changes that matter to a reopen (the first file, the
/// last close) happen where no open can race: before the first file is
/// published, or under the inode's `i_lock` (see `vmbeam_region_open`).
#[pin_data(PinnedDrop)]
pub(crate) struct Region {
    size: u64,
    /// The largest block its pages were allocated in and its mappings use
    /// (`VMBEAM_CREATE_HUGE`: PMD, `_HUGE_1G`: PUD); PFNMAP if not `Page`.
    blocks: BlockSize,
    open_files: AtomicUsize,
    #[pin]
    state: Mutex<RegionState>,
    /// A move of the region ended (committed or aborted).
    #[pin]
    settled: CondVar,
}

impl Region {
    /// A region of `pages`, counted in the module's statistics.
    pub(crate) fn new(pages: Pages, blocks: BlockSize) -> Result<Arc<Self>> {
        let npages = pages.len() as u64;
        let present = pages.present() as u64;
        let region = Arc::pin_init(
            pin_init!(Self {
                size: npages * PAGE_SIZE,
                blocks,
                open_files: AtomicUsize::new(0),
                state <- new_mutex!(RegionState { pages, owner: None, moving: false }),
                settled <- new_condvar!("vmbeam::Region::settled"),
            }),
            GFP_KERNEL,
        )?;
        STATS.regions.fetch_add(1, Relaxed);
        STATS.pages_owned.fetch_add(present, Relaxed);
        Ok(region)
    }

    /// `VMBEAM_CREATE_REGION`: a region of `size` zeroed bytes, or of
    /// `size` bytes of missing pages if `empty`.
    pub(crate) fn create(size: u64, empty: bool, blocks: BlockSize) -> Result<Arc<Self>> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(EINVAL);
        }
        let npages = size / PAGE_SIZE;
        // SAFETY: no preconditions.
        if npages > unsafe { vmbeam_totalram_pages() } as u64 {
            return Err(ENOMEM);
        }
        let npages = usize::try_from(npages).map_err(|_| ENOMEM)?;
        let pages = if empty {
            Pages::empty(npages)?
        } else {
            Pages::alloc(npages, blocks)?
        };
        Self::new(pages, blocks)
    }

    /// Makes `owner` the region's owner, unless it is moving or has a live
    /// owner that does not yield to it ([`Owner::yields_to`]): `EBUSY`. Who
    /// may name which VM is the caller's check.
    pub(crate) fn bind(&self, owner: Owner) -> Result<c_long> {
        let mut state = self.lock();
        if state.moving || state.owner.as_ref().is_some_and(|o| !o.yields_to(&owner)) {
            return Err(EBUSY);
        }
        let dead = state.owner.replace(owner);
        drop(state);
        drop(dead); // may destroy a VM: outside the lock
        Ok(0)
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether its mappings are PFNMAP, by PMD (or PUD) where a block allows.
    pub(crate) fn is_huge(&self) -> bool {
        self.blocks != BlockSize::Page
    }

    pub(crate) fn npages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub(crate) fn lock(&self) -> RegionGuard<'_> {
        self.state.lock()
    }

    /// The region lock, taken once no move is in progress. A fault or mmap
    /// that meets a move waits for its outcome instead of failing: a move
    /// that is aborted must be invisible, and one that commits decides who
    /// may map. Moves never sleep on anything a faulting task holds (no
    /// `mmap_lock`, no KVM lock), so the wait is bounded by the move.
    pub(crate) fn lock_settled(&self) -> RegionGuard<'_> {
        let mut state = self.lock();
        while state.moving {
            self.settled.wait(&mut state);
        }
        state
    }

    /// Ends a move, committed or aborted, and wakes the faults and mmaps
    /// waiting for its outcome.
    pub(crate) fn end_move(&self, state: &mut RegionGuard<'_>) {
        state.moving = false;
        self.settled.notify_all();
    }

    /// A file and a reserved fd for the region; the fd becomes visible to
    /// userspace only through [`PendingFd::install`].
    pub(crate) fn pending_fd(self: Arc<Self>) -> Result<PendingFd> {
        // SAFETY: no preconditions.
        let fd = unsafe { vmbeam_fd_reserve() };
        to_result(fd)?;
        // Sizes are checked against RAM at creation: far below i64::MAX.
        let size = i64::try_from(self.size).unwrap_or(i64::MAX);
        // The region's first file: no other file exists to race with.
        self.open_files.fetch_add(1, Relaxed);
        let raw = Arc::into_raw(self);
        // SAFETY: `raw` is a live region; on success the file owns that
        // reference and gives it back in `vmbeam_rs_region_release`.
        match from_err_ptr(unsafe { vmbeam_region_file(raw.cast(), size) }) {
            Ok(file) => Ok(PendingFd { fd, file }),
            Err(err) => {
                // SAFETY: the file was not created: the reference is still
                // ours, taken back once; the fd was reserved above.
                unsafe {
                    (*raw).open_files.fetch_sub(1, Relaxed);
                    drop(Arc::from_raw(raw));
                    vmbeam_fd_unreserve(fd);
                }
                Err(err)
            }
        }
    }
}

#[pinned_drop]
impl PinnedDrop for Region {
    fn drop(self: Pin<&mut Self>) {
        let present = self.state.lock().pages.present() as u64;
        STATS.regions.fetch_sub(1, Relaxed);
        STATS.pages_owned.fetch_sub(present, Relaxed);
    }
}

/// A region file whose fd is reserved but not yet installed.
///
/// # Invariants
///
/// `fd` is reserved and `file` holds one reference until `install` or drop.
pub(crate) struct PendingFd {
    fd: c_int,
    file: *mut File,
}

impl PendingFd {
    /// Publishes the fd to userspace; returns it.
    pub(crate) fn install(self) -> c_int {
        let fd = self.fd;
        // SAFETY: by the type invariant; the fd table takes the reference.
        unsafe { vmbeam_fd_install(fd, self.file) };
        core::mem::forget(self);
        fd
    }
}

impl Drop for PendingFd {
    fn drop(&mut self) {
        // SAFETY: by the type invariant; never installed.
        unsafe {
            vmbeam_fd_unreserve(self.fd);
            vmbeam_fput(self.file);
        }
    }
}

/// A region looked up from a userspace fd.
///
/// # Invariants
///
/// `file` is a region file we hold a reference to; `region` is its region,
/// alive at least as long as the file.
pub(crate) struct RegionFile {
    file: NonNull<File>,
    region: NonNull<Region>,
}

impl RegionFile {
    /// `EBADF` if `fd` is not open, `EINVAL` if it is not a region.
    pub(crate) fn get(fd: i32) -> Result<Self> {
        let mut file = ptr::null_mut();
        // SAFETY: `file` is a valid out pointer; the C side checks the fd.
        let region = from_err_ptr(unsafe { vmbeam_region_fget(fd, &mut file) })?;
        // INVARIANT: on success C took a file reference and returned the
        // region that file owns.
        Ok(Self {
            file: NonNull::new(file).ok_or(EBADF)?,
            region: NonNull::new(region.cast()).ok_or(EBADF)?,
        })
    }

    pub(crate) fn region(&self) -> &Region {
        // SAFETY: alive while we hold the file, by the type invariant.
        unsafe { self.region.as_ref() }
    }

    /// Whether both name the same region (through any of its files).
    pub(crate) fn same_region(&self, other: &RegionFile) -> bool {
        self.region == other.region
    }

    /// Zaps every user mapping of `count` pages from page `first`. Callers
    /// hold the region lock, so no fault maps them again before the state
    /// says who may.
    pub(crate) fn revoke(&self, _state: &RegionGuard<'_>, first: u64, count: u64) {
        // SAFETY: a live region file, by the type invariant.
        unsafe { vmbeam_revoke(self.file.as_ptr(), first as c_ulong, count as c_ulong) };
    }
}

impl Drop for RegionFile {
    fn drop(&mut self) {
        // SAFETY: the reference taken in `get`, dropped once.
        unsafe { vmbeam_fput(self.file.as_ptr()) };
    }
}

/// # Safety
///
/// `region` must be the `private_data` of a live region file.
unsafe fn region_of<'a>(region: *mut c_void) -> &'a Region {
    // SAFETY: the caller's guarantee; the file holds an `Arc` reference.
    unsafe { &*region.cast::<Region>() }
}

/// `mmap` of a region file (after C checked `MAP_SHARED`).
#[no_mangle]
extern "C" fn vmbeam_rs_region_mmap(
    region: *mut c_void,
    mm: *mut Mm,
    pgoff: c_ulong,
    npages: c_ulong,
) -> c_int {
    // SAFETY: called from the region file's mmap, so the file is live.
    let region = unsafe { region_of(region) };
    let in_range = pgoff
        .checked_add(npages)
        .is_some_and(|end| end <= region.npages());
    if !in_range {
        return EINVAL.to_errno();
    }
    if !region.lock_settled().may_map(mm) {
        return EACCES.to_errno();
    }
    0
}

/// Page fault in a mapping of a region: maps the region's own page if `mm`
/// belongs to the owner; otherwise (old owner, gathered page) SIGBUS. With
/// the page, the rest of the window around it that C chose (`around_pages`
/// pages from `around_addr`, region page `around_pgoff`, inside the VMA) is
/// mapped too, where the region has a page and nothing is mapped yet.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
extern "C" fn vmbeam_rs_region_fault(
    region: *mut c_void,
    vma: *mut Vma,
    mm: *mut Mm,
    pgoff: c_ulong,
    addr: c_ulong,
    around_addr: c_ulong,
    around_pgoff: c_ulong,
    around_pages: c_ulong,
) -> c_int {
    // SAFETY: the faulting VMA holds a reference to the region file.
    let region = unsafe { region_of(region) };
    let state = region.lock_settled();
    if !state.may_map(mm) {
        return EFAULT.to_errno();
    }
    let Some(page) = usize::try_from(pgoff).ok().and_then(|i| state.pages.get(i)) else {
        return EFAULT.to_errno();
    };
    // SAFETY: `vma` is the faulting VMA (mmap_lock held by the fault path);
    // the page stays in the region while we hold its lock, and the mapping
    // takes its own page reference.
    match unsafe { vmbeam_vma_insert_page(vma, addr, page) } {
        0 => {}
        e if e == EBUSY.to_errno() => {} // a racing fault mapped it already
        e if e == ENOMEM.to_errno() => return e,
        _ => return EFAULT.to_errno(),
    }
    // The neighbours: still under the region lock and for the same owner,
    // so exactly as allowed as the faulting page. Best effort: the fault
    // is answered whatever happens to them.
    for i in 0..around_pages {
        let (index, at) = (around_pgoff + i, around_addr + i * PAGE_SIZE as c_ulong);
        if index == pgoff {
            continue;
        }
        let Some(page) = usize::try_from(index).ok().and_then(|i| state.pages.get(i)) else {
            continue; // a gathered-away page: its own fault says SIGBUS
        };
        // SAFETY: as above; `at` is inside the faulting VMA (C clipped the
        // window to it) and maps region page `index` there.
        let r = unsafe { vmbeam_vma_insert_page(vma, at, page) };
        if r == ENOMEM.to_errno() {
            break;
        }
    }
    0
}

/// The page order of the largest entry the region's mappings may use (0:
/// ordinary 4 KiB mappings; else PFNMAP, by PMD or by PUD too).
#[no_mangle]
extern "C" fn vmbeam_rs_region_max_order(region: *mut c_void) -> c_uint {
    // SAFETY: called with a live file of the region (mmap, revocation,
    // address search), which holds a reference.
    unsafe { region_of(region) }.blocks.order()
}

/// A PMD- or PUD-sized fault (`order`) at region page `pgoff` (aligned to
/// it in the VMA, the whole block inside it: C checked): maps the block
/// with one entry if `mm` may map the region, the region maps by entries
/// that big, and the block is one aligned run of physical memory; 1 sends
/// the fault to the next size down.
#[no_mangle]
extern "C" fn vmbeam_rs_region_huge_fault(
    region: *mut c_void,
    vmf: *mut VmFault,
    mm: *mut Mm,
    pgoff: c_ulong,
    order: c_uint,
) -> c_int {
    // SAFETY: the faulting VMA holds a reference to the region file.
    let region = unsafe { region_of(region) };
    let size = match order {
        o if o == BlockSize::Pmd.order() => BlockSize::Pmd,
        o if o == BlockSize::Pud.order() => BlockSize::Pud,
        _ => return 1,
    };
    if size > region.blocks {
        return 1; // a 2 MiB region: no 1 GiB blocks to look for
    }
    let state = region.lock_settled();
    if !state.may_map(mm) {
        return EFAULT.to_errno();
    }
    let Some(pfn) = usize::try_from(pgoff)
        .ok()
        .filter(|p| p % size.pages() == 0)
        .and_then(|p| state.pages.block_pfn(p, size))
    else {
        return 1;
    };
    // SAFETY: `vmf` is the fault being handled (mmap or VMA lock held);
    // the block stays in the region while we hold its lock, so a
    // revocation (which takes the lock) zaps this PMD/PUD after it is
    // made; `order` is PMD_ORDER or PUD_ORDER.
    unsafe { vmbeam_vmf_insert_huge(vmf, pfn, order) }
}

/// A region file was reopened (`/proc/PID/fd/N`): the new file takes a
/// reference. Called under the inode's `i_lock`, while `i_private` still
/// names the region, so at least one file holds a reference.
#[no_mangle]
extern "C" fn vmbeam_rs_region_file_get(region: *mut c_void) {
    // SAFETY: `region` came from `Arc::into_raw` and a file still holds
    // that reference (the caller's guarantee), so the count is not zero.
    let borrowed = unsafe { ArcBorrow::from_raw(region.cast::<Region>().cast_const()) };
    borrowed.open_files.fetch_add(1, Relaxed);
    // The new file owns this reference; `vmbeam_rs_region_release` drops it.
    let _ = Arc::into_raw(Arc::<Region>::from(borrowed));
}

/// A file of the region is being released (under the inode's `i_lock`);
/// returns 1 if it was the last one, so no open may find the region again.
#[no_mangle]
extern "C" fn vmbeam_rs_region_file_put(region: *mut c_void) -> c_int {
    // SAFETY: the releasing file still holds its reference.
    let region = unsafe { region_of(region) };
    c_int::from(region.open_files.fetch_sub(1, Relaxed) == 1)
}

/// Last close of a region file: drops the file's region reference.
#[no_mangle]
extern "C" fn vmbeam_rs_region_release(region: *mut c_void) {
    // SAFETY: `region` came from `Arc::into_raw` in `pending_fd`; the file
    // owned that reference and gives it back exactly once, here.
    drop(unsafe { Arc::from_raw(region.cast::<Region>().cast_const()) });
}

/// Commands on a region fd.
const REGION_COMMANDS: Commands = &[
    uapi::VMBEAM_IOCTL_REGION_BIND,
    uapi::VMBEAM_IOCTL_REGION_INFO,
    uapi::VMBEAM_IOCTL_REGION_FRAMES,
];

/// `unlocked_ioctl` of a region file.
#[no_mangle]
extern "C" fn vmbeam_rs_region_ioctl(region: *mut c_void, cmd: u32, arg: usize) -> c_long {
    // SAFETY: called from the region file's ioctl, so the file is live.
    let region = unsafe { region_of(region) };
    let ret = match cmd {
        uapi::VMBEAM_IOCTL_REGION_BIND => read_arg(arg).and_then(|a| region_bind(region, &a)),
        uapi::VMBEAM_IOCTL_REGION_INFO => with_arg(arg, |a| info(region, a)),
        uapi::VMBEAM_IOCTL_REGION_FRAMES => {
            read_arg(arg).and_then(|a| frames::region_frames(region, &a))
        }
        _ => Err(crate::device::unknown_command(REGION_COMMANDS, cmd)),
    };
    ret.unwrap_or_else(|err| err.to_errno() as c_long)
}

fn info(region: &Region, arg: &mut uapi::vmbeam_region_info) -> Result<c_long> {
    check_unused(arg.flags, 0, &arg.reserved)?;
    let state = region.lock();
    let mut flags = state.owner.as_ref().map_or(0, Owner::state_flags);
    if state.moving {
        flags |= uapi::VMBEAM_REGION_MOVING;
    }
    if region.is_huge() {
        flags |= uapi::VMBEAM_REGION_HUGE;
    }
    if region.blocks == BlockSize::Pud {
        flags |= uapi::VMBEAM_REGION_HUGE_1G;
    }
    arg.state = flags;
    arg.size = region.size();
    arg.pages_present = state.pages.present() as u64;
    Ok(0)
}
