//! vCPU registers as the control protocol carries them, and the clock the
//! downtime is measured with.

use kvm_bindings::kvm_regs;
use vmbeam::control::Regs;

pub fn from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        rip: r.rip,
        rflags: r.rflags | 2, // bit 1 is always set
        ..Default::default()
    }
}

/// CLOCK_MONOTONIC in ns: comparable between the processes of one kernel,
/// which is what downtime across two L1s needs.
pub use vmbeam::clock::monotonic_ns;
