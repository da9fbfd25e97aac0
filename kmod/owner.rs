// SPDX-License-Identifier: GPL-2.0

//! The owner of a region: a KVM VM (named by a VM fd), or a process
//! (`VMBEAM_BIND_PROCESS`: a VMM that maps its RAM before it has a VM),
//! and the checks every path makes against it: who may map, whether it
//! lives, whether a bind may replace it.

use core::{
    ffi::{c_int, c_long},
    ptr::NonNull,
};

use kernel::{error::to_result, prelude::*};

use crate::{device::check_unused, region::Region, uapi};

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

/// Opaque `struct pid`.
#[repr(C)]
pub(crate) struct Pid {
    _private: [u8; 0],
}

extern "C" {
    fn vmbeam_kvm_get(fd: c_int, kvmp: *mut *mut Kvm) -> c_int;
    fn vmbeam_kvm_put(kvm: *mut Kvm);
    fn vmbeam_kvm_mm(kvm: *mut Kvm) -> *mut Mm;
    fn vmbeam_kvm_creator_alive(kvm: *mut Kvm) -> c_int;
    fn vmbeam_current_mm() -> *mut Mm;
    fn vmbeam_pid_get_current() -> *mut Pid;
    fn vmbeam_pid_put(pid: *mut Pid);
    fn vmbeam_pid_alive(pid: *mut Pid) -> c_int;
    fn vmbeam_pid_mm_is(pid: *mut Pid, mm: *mut Mm) -> c_int;
    fn vmbeam_pid_is_current(pid: *mut Pid) -> c_int;
    fn vmbeam_kvm_mmget(kvm: *mut Kvm) -> *mut Mm;
    fn vmbeam_pid_mmget(pid: *mut Pid) -> *mut Mm;
    fn vmbeam_mmput(mm: *mut Mm);
}

/// An address space held with a user reference: its page tables stay
/// while this lives.
///
/// # Invariants
///
/// `mm` holds one `mm_users` reference, dropped only in `Drop`.
pub(crate) struct MmUser {
    mm: NonNull<Mm>,
}

impl MmUser {
    /// # Safety
    ///
    /// `mm` is null or holds a user reference that the result takes over.
    unsafe fn from_raw(mm: *mut Mm) -> Option<Self> {
        // INVARIANT: the caller's guarantee.
        NonNull::new(mm).map(|mm| Self { mm })
    }

    pub(crate) fn as_ptr(&self) -> *mut Mm {
        self.mm.as_ptr()
    }
}

impl Drop for MmUser {
    fn drop(&mut self) {
        // SAFETY: the reference held by the type invariant, dropped once;
        // process context (mmput may sleep).
        unsafe { vmbeam_mmput(self.mm.as_ptr()) };
    }
}

/// A counted reference to a KVM VM.
///
/// # Invariants
///
/// `kvm` holds one reference taken with `kvm_get_kvm_safe`, dropped only in
/// `Drop`; so the VM, and the `mm` it was created in, outlive this value.
pub(crate) struct Vm {
    kvm: NonNull<Kvm>,
}

// SAFETY: a counted `struct kvm` reference may be used and dropped from any
// thread; `kvm_put_kvm` may sleep and is only called from process context.
unsafe impl Send for Vm {}
// SAFETY: `&Vm` only reads fields KVM never changes after creation.
unsafe impl Sync for Vm {}

impl Vm {
    /// The VM behind `fd`: `EBADF` if no such fd, `EINVAL` if it is not a
    /// KVM VM fd, `ESRCH` if the VM is being destroyed.
    pub(crate) fn from_fd(fd: i32) -> Result<Self> {
        let mut kvm = core::ptr::null_mut();
        // SAFETY: `kvm` is a valid out pointer; the C side checks the fd.
        to_result(unsafe { vmbeam_kvm_get(fd, &mut kvm) })?;
        let kvm = NonNull::new(kvm).ok_or(EINVAL)?;
        // INVARIANT: vmbeam_kvm_get succeeded, so we hold a reference.
        Ok(Self { kvm })
    }

    /// The address space of the process that created the VM.
    fn mm(&self) -> *mut Mm {
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
    fn is_alive(&self) -> bool {
        // SAFETY: the VM (and its mm_struct, which it holds with mmgrab) is
        // alive by the type invariant.
        unsafe { vmbeam_kvm_creator_alive(self.kvm.as_ptr()) != 0 }
    }

    /// The creator's address space, unless the creator has exited.
    fn address_space(&self) -> Option<MmUser> {
        // SAFETY: the VM (and its mm_struct) is alive by the type
        // invariant; the C helper returns null or a user reference, which
        // `MmUser` takes over.
        unsafe { MmUser::from_raw(vmbeam_kvm_mmget(self.kvm.as_ptr())) }
    }

    /// Whether both name the same VM.
    pub(crate) fn same_vm(&self, other: &Vm) -> bool {
        self.kvm == other.kvm
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: we hold one reference by the type invariant; dropped once.
        unsafe { vmbeam_kvm_put(self.kvm.as_ptr()) };
    }
}

/// A counted reference to a thread group's `struct pid`: the process stays
/// the same one across `execve`, while its `mm` does not.
///
/// # Invariants
///
/// `pid` holds one reference taken with `get_pid`, dropped only in `Drop`.
pub(crate) struct Process {
    pid: NonNull<Pid>,
}

// SAFETY: a counted `struct pid` reference may be used and dropped from any
// thread (`put_pid` does not sleep).
unsafe impl Send for Process {}
// SAFETY: `&Process` only passes the pointer to C helpers that take their
// own locks (RCU, `task_lock`).
unsafe impl Sync for Process {}

impl Process {
    /// The calling process.
    pub(crate) fn current() -> Result<Self> {
        // SAFETY: no preconditions; process context (an ioctl).
        let pid = NonNull::new(unsafe { vmbeam_pid_get_current() }).ok_or(ESRCH)?;
        // INVARIANT: get_pid took a reference to a non-null pid.
        Ok(Self { pid })
    }

    /// Whether a task of the process has not exited yet.
    fn is_alive(&self) -> bool {
        // SAFETY: the pid is alive by the type invariant.
        unsafe { vmbeam_pid_alive(self.pid.as_ptr()) != 0 }
    }

    /// Whether `mm` is the process's address space now (after any execve).
    fn mm_is(&self, mm: *mut Mm) -> bool {
        // SAFETY: the pid is alive by the type invariant; `mm` is only
        // compared.
        unsafe { vmbeam_pid_mm_is(self.pid.as_ptr(), mm) != 0 }
    }

    /// The process's address space, unless it has exited.
    fn address_space(&self) -> Option<MmUser> {
        // SAFETY: the pid is alive by the type invariant; the C helper
        // returns null or a user reference, which `MmUser` takes over.
        unsafe { MmUser::from_raw(vmbeam_pid_mmget(self.pid.as_ptr())) }
    }

    /// Whether the caller is a task of this process.
    fn is_current(&self) -> bool {
        // SAFETY: the pid is alive by the type invariant.
        unsafe { vmbeam_pid_is_current(self.pid.as_ptr()) != 0 }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: we hold one reference by the type invariant; dropped once.
        unsafe { vmbeam_pid_put(self.pid.as_ptr()) };
    }
}

/// Whoever may map a region: the process that created a VM, or a process.
pub(crate) enum Owner {
    Vm(Vm),
    Process(Process),
}

impl Owner {
    /// Whether the owner still runs; a dead owner owns nothing.
    pub(crate) fn is_alive(&self) -> bool {
        match self {
            Owner::Vm(vm) => vm.is_alive(),
            Owner::Process(p) => p.is_alive(),
        }
    }

    /// Whether a process with address space `mm` may map the region (an
    /// mmap, or a fault of the process itself, or KVM's or anyone's GUP
    /// on its behalf).
    pub(crate) fn may_map(&self, mm: *mut Mm) -> bool {
        match self {
            Owner::Vm(vm) => vm.mm() == mm,
            Owner::Process(p) => p.mm_is(mm),
        }
    }

    /// The address space whose mappings of the region count (see
    /// [`Owner::may_map`]), held; `None` once the owner has exited.
    pub(crate) fn address_space(&self) -> Option<MmUser> {
        match self {
            Owner::Vm(vm) => vm.address_space(),
            Owner::Process(p) => p.address_space(),
        }
    }

    /// Whether `vm` is the owner (a transfer's proof of ownership).
    pub(crate) fn is_vm(&self, vm: &Vm) -> bool {
        matches!(self, Owner::Vm(own) if own.same_vm(vm))
    }

    /// Whether a bind may make `new` the owner in place of this one: when
    /// this one has died, or when a live owner process gives the region to
    /// a VM of its own (the mappings stay right: one address space).
    pub(crate) fn yields_to(&self, new: &Owner) -> bool {
        match (self, new) {
            (Owner::Process(p), Owner::Vm(vm)) if p.mm_is(vm.mm()) => true,
            _ => !self.is_alive(),
        }
    }

    /// `VMBEAM_REGION_OWNED` and `VMBEAM_REGION_MINE` as the caller sees
    /// them.
    pub(crate) fn state_flags(&self) -> u32 {
        if !self.is_alive() {
            return 0;
        }
        let mine = match self {
            Owner::Vm(vm) => vm.created_by_current(),
            Owner::Process(p) => p.is_current(),
        };
        uapi::VMBEAM_REGION_OWNED | if mine { uapi::VMBEAM_REGION_MINE } else { 0 }
    }
}

/// `VMBEAM_REGION_BIND`: only to a VM the caller created (`VMBEAM_BIND`
/// on `/dev/vmbeam` names any VM), or with `VMBEAM_BIND_PROCESS` to the
/// calling process itself.
pub(crate) fn region_bind(region: &Region, arg: &uapi::vmbeam_region_bind) -> Result<c_long> {
    let process = arg.flags & uapi::VMBEAM_BIND_PROCESS != 0;
    check_unused(arg.flags & !uapi::VMBEAM_BIND_PROCESS, 0, &arg.reserved)?;
    let owner = if process {
        if arg.vm_fd != -1 {
            return Err(EINVAL);
        }
        Owner::Process(Process::current()?)
    } else {
        let vm = Vm::from_fd(arg.vm_fd)?;
        if !vm.created_by_current() {
            return Err(EPERM);
        }
        Owner::Vm(vm)
    };
    region.bind(owner)
}
