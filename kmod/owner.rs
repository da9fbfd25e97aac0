// SPDX-License-Identifier: GPL-2.0

//! The owner of a region: a KVM VM, named by a VM fd.

use core::{ffi::c_int, ptr::NonNull};

use kernel::{error::to_result, prelude::*};

/// Opaque `struct kvm`.
#[repr(C)]
pub(crate) struct Kvm {
    _private: [u8; 0],
}

/// Opaque `struct mm_struct`: compared, never dereferenced in Rust.
#[repr(C)]
pub(crate) struct Mm {
    _private: [u8; 0],
}

extern "C" {
    fn vmbeam_kvm_get(fd: c_int, kvmp: *mut *mut Kvm) -> c_int;
    fn vmbeam_kvm_put(kvm: *mut Kvm);
    fn vmbeam_kvm_mm(kvm: *mut Kvm) -> *mut Mm;
    fn vmbeam_kvm_creator_alive(kvm: *mut Kvm) -> c_int;
    fn vmbeam_current_mm() -> *mut Mm;
}

/// A counted reference to a KVM VM.
///
/// # Invariants
///
/// `kvm` holds one reference taken with `kvm_get_kvm_safe`, dropped only in
/// `Drop`; so the VM, and the `mm` it was created in, outlive this value.
pub(crate) struct Owner {
    kvm: NonNull<Kvm>,
}

// SAFETY: a counted `struct kvm` reference may be used and dropped from any
// thread; `kvm_put_kvm` may sleep and is only called from process context.
unsafe impl Send for Owner {}
// SAFETY: `&Owner` only reads fields KVM never changes after creation.
unsafe impl Sync for Owner {}

impl Owner {
    /// The VM behind `fd`: `EBADF` if no such fd, `EINVAL` if it is not a
    /// KVM VM fd, `ESRCH` if the VM is being destroyed.
    pub(crate) fn from_vm_fd(fd: i32) -> Result<Self> {
        let mut kvm = core::ptr::null_mut();
        // SAFETY: `kvm` is a valid out pointer; the C side checks the fd.
        to_result(unsafe { vmbeam_kvm_get(fd, &mut kvm) })?;
        let kvm = NonNull::new(kvm).ok_or(EINVAL)?;
        // INVARIANT: vmbeam_kvm_get succeeded, so we hold a reference.
        Ok(Self { kvm })
    }

    /// The address space of the process that created the VM.
    pub(crate) fn mm(&self) -> *mut Mm {
        // SAFETY: the VM is alive by the type invariant.
        unsafe { vmbeam_kvm_mm(self.kvm.as_ptr()) }
    }

    /// Whether the calling process created this VM (KVM itself refuses VM
    /// ioctls from any other process).
    pub(crate) fn created_by_current(&self) -> bool {
        // SAFETY: no preconditions.
        self.mm() == unsafe { vmbeam_current_mm() }
    }

    /// Whether the VM's creator process still runs. When it has exited the
    /// VM is dead to its users: it owns nothing any more.
    pub(crate) fn is_alive(&self) -> bool {
        // SAFETY: the VM (and its mm_struct, which it holds with mmgrab) is
        // alive by the type invariant.
        unsafe { vmbeam_kvm_creator_alive(self.kvm.as_ptr()) != 0 }
    }

    /// Whether both name the same VM.
    pub(crate) fn same_vm(&self, other: &Owner) -> bool {
        self.kvm == other.kvm
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // SAFETY: we hold one reference by the type invariant; dropped once.
        unsafe { vmbeam_kvm_put(self.kvm.as_ptr()) };
    }
}
