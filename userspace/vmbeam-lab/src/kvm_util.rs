//! KVM set-up shared by the lab L1 and the selftests' VMMs (as
//! `tools/testing/selftests/kvm/lib/kvm_util.c` is for KVM's own tests).

use kvm_bindings::{kvm_enable_cap, kvm_segment, kvm_userspace_memory_region, KVM_CAP_DISABLE_QUIRKS2};
use std::os::fd::AsRawFd;

use kvm_ioctls::{VcpuFd, VmFd};

/// 32-bit protected mode, flat 4 GiB segments, no paging: guest code
/// addresses guest-physical memory directly.
pub fn set_flat_protected_mode(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let flat = |selector, type_| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x08, 0xb); // execute/read, accessed
    let data = flat(0x10, 0x3); // read/write, accessed
    (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs) = (data, data, data, data, data);
    sregs.cr0 |= 1; // PE; paging stays off
    vcpu.set_sregs(&sregs)
}

/// Registers `size` bytes at host address `hva` as memslot `slot` at `gpa`;
/// size 0 deletes the slot.
///
/// # Safety
///
/// `hva..hva+size` must stay mapped while the slot exists.
pub unsafe fn set_memslot(vm: &VmFd, slot: u32, gpa: u64, hva: u64, size: u64) -> Result<(), kvm_ioctls::Error> {
    let region =
        kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: gpa, memory_size: size, userspace_addr: hva };
    // SAFETY: the caller keeps the memory mapped.
    unsafe { vm.set_user_memory_region(region) }
}

/// `KVM_X86_QUIRK_SLOT_ZAP_ALL` (uapi/asm/kvm.h, 6.12): not in kvm-bindings
/// 0.10 yet.
const KVM_X86_QUIRK_SLOT_ZAP_ALL: u64 = 1 << 7;

/// Makes deleting a memslot zap only that slot's stage-2 entries instead
/// of every entry of the VM (the default quirk). A lab L1 adds and removes
/// L2 windows while its other L2s run; with the quirk each removal makes
/// every running L2 fault all of its memory back in, and under TCG's
/// emulated SVM a vCPU taking that many nested page faults sometimes
/// resumes at a wild rip (`vcpu_churn_test`, README "Tests"). Returns false
/// where the kernel does not have the quirk to disable.
pub fn zap_only_deleted_slots(vm: &VmFd) -> bool {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_DISABLE_QUIRKS2, ..Default::default() };
    cap.args[0] = KVM_X86_QUIRK_SLOT_ZAP_ALL;
    vm.enable_cap(&cap).is_ok()
}

/// `struct kvm_pre_fault_memory` (uapi/linux/kvm.h, 6.10): not in
/// kvm-bindings 0.10 yet.
#[repr(C)]
#[derive(Default)]
struct PreFaultMemory {
    gpa: u64,
    size: u64,
    flags: u64,
    padding: [u64; 5],
}

/// `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = 0xc040_aed5;

/// Maps `size` bytes of guest memory at `gpa` into the VM's stage-2 tables
/// from the host (`KVM_PRE_FAULT_MEMORY`), so its vCPUs find them mapped
/// instead of taking one nested page fault (a VM exit) per page. The
/// memslot must be there and its host mapping populated or faultable; the
/// vCPU must not be running. Restarts where KVM stopped part-way (a signal,
/// `EAGAIN`). `Err` names the address KVM could not map and its errno
/// (`EFAULT`: the host mapping refused the page, e.g. a revoked region).
pub fn pre_fault_memory(vcpu: &VcpuFd, gpa: u64, size: u64) -> Result<(), PreFaultError> {
    let mut range = PreFaultMemory { gpa, size, ..Default::default() };
    while range.size > 0 {
        // SAFETY: a vCPU fd and the struct this command takes; KVM advances
        // `gpa` and shrinks `size` by what it mapped.
        let r = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_PRE_FAULT_MEMORY, &mut range) };
        if r < 0 {
            let error = std::io::Error::last_os_error();
            if !matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                return Err(PreFaultError { gpa: range.gpa, error });
            }
        }
    }
    Ok(())
}

/// Where and why [`pre_fault_memory`] stopped.
#[derive(Debug)]
pub struct PreFaultError {
    pub gpa: u64,
    pub error: std::io::Error,
}

impl std::fmt::Display for PreFaultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KVM_PRE_FAULT_MEMORY at {:#x}: {}", self.gpa, self.error)
    }
}
