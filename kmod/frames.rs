// SPDX-License-Identifier: GPL-2.0

//! `VMBEAM_REGION_FRAMES`: the page frames a region's owner maps, read
//! from the owner's page tables.
//!
//! `/proc/PID/pagemap` does not walk PFNMAP mappings, and a huge region's
//! mappings are PFNMAP, so without this a migration could not show from
//! the outside that a huge region's new owner maps the very frames its
//! old owner mapped. The answer comes from the page tables (a PMD maps
//! 512 frames in a row), never from the region's own list of pages: it is
//! evidence about what the owner can reach, not the module's claim.

use core::ffi::{c_int, c_long, c_ulong, c_void};

use kernel::{
    alloc::flags::GFP_KERNEL, alloc::KVVec, error::to_result, prelude::*, uaccess::UserSlice,
};

use crate::{
    device::check_unused,
    owner::{Mm, Owner},
    pages::PAGE_SIZE,
    region::Region,
    uapi,
};

extern "C" {
    fn vmbeam_capable_sys_admin() -> c_int;
    fn vmbeam_mapped_pfns(
        mm: *mut Mm,
        region: *const c_void,
        first: c_ulong,
        count: c_ulong,
        pfns: *mut u64,
    ) -> c_int;
}

/// `VMBEAM_REGION_FRAMES` on `region`'s fd.
pub(crate) fn region_frames(region: &Region, arg: &uapi::vmbeam_region_frames) -> Result<c_long> {
    check_unused(arg.flags, u64::from(arg.pad), &arg.reserved)?;
    if !region.is_huge() {
        // Ordinary pages: pagemap shows them. (No `EOPNOTSUPP` constant in
        // the kernel crate on 6.12; `ENOTSUPP` is kernel-internal.)
        return Err(Error::from_errno(-(kernel::bindings::EOPNOTSUPP as i32)));
    }
    // SAFETY: no preconditions; process context.
    if unsafe { vmbeam_capable_sys_admin() } == 0 {
        return Err(EPERM); // frame numbers are privileged, as in pagemap
    }
    let count = usize::try_from(arg.count).map_err(|_| EINVAL)?;
    if count == 0 || count > uapi::VMBEAM_FRAMES_MAX as usize || arg.offset % PAGE_SIZE != 0 {
        return Err(EINVAL);
    }
    let first = arg.offset / PAGE_SIZE;
    if first.checked_add(arg.count).ok_or(EINVAL)? > region.npages() {
        return Err(EINVAL);
    }
    // The owner's address space, held; the region lock is not held during
    // the walk: the walk takes the owner's mmap lock, under which a fault
    // waits for the region lock.
    let mm = region
        .lock()
        .owner
        .as_ref()
        .and_then(Owner::address_space)
        .ok_or(ESRCH)?;
    let mut pfns = KVVec::from_elem(0u64, count, GFP_KERNEL)?;
    // SAFETY: `mm` is held with a user reference; `region` is only
    // compared with the VMAs' files; `pfns` has room for `count` entries,
    // and `first + count` is inside the region (checked above).
    to_result(unsafe {
        vmbeam_mapped_pfns(
            mm.as_ptr(),
            core::ptr::from_ref(region).cast(),
            first as c_ulong,
            count as c_ulong,
            pfns.as_mut_ptr(),
        )
    })?;
    drop(mm);
    // Copied out after the owner's mmap lock is dropped: the copy may
    // fault in the caller's address space, which may be the owner's.
    // SAFETY: `pfns` holds `count` initialised u64s, viewed as bytes.
    let bytes = unsafe { core::slice::from_raw_parts(pfns.as_ptr().cast::<u8>(), count * 8) };
    UserSlice::new(arg.frames as usize, bytes.len())
        .writer()
        .write_slice(bytes)?;
    Ok(0)
}
