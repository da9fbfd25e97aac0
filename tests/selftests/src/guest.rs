//! Tiny KVM guests for the selftests, on rust-vmm's `kvm-ioctls`.
//!
//! A guest is one vCPU in 32-bit protected mode with flat segments and no
//! paging, so guest code addresses all of its first 4 GiB directly. Its code
//! lives in a private anonymous page at [`CODE_GPA`]; tests add memslots for
//! the memory under test. Guest programs report through `out` to [`PORT`].

use std::ptr::NonNull;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use vmbeam_lab::kvm_util;

/// Guest-physical address of the code page (slot 0).
pub const CODE_GPA: u64 = 0x1000;
/// The I/O port guest programs write their results to.
pub const PORT: u16 = 0x10;
const CODE_SIZE: usize = 0x1000;

/// What a guest run ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// `out PORT, eax`: the 4 bytes written.
    Out(u32),
    /// `hlt`.
    Hlt,
    /// Anything else, described.
    Other(String),
}

/// A one-vCPU VM with a code page.
pub struct TestVm {
    pub vm: VmFd,
    pub vcpu: VcpuFd,
    code: NonNull<u8>,
}

impl TestVm {
    /// Creates the VM and its vCPU; returns `Err` with a reason when KVM is
    /// not usable here.
    pub fn new() -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let code = unsafe {
            mmap_anonymous(
                None,
                CODE_SIZE.try_into().unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|e| format!("mmap code page: {e}"))?;
        let code = code.cast::<u8>();
        let mut this = Self { vcpu: vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?, vm, code };
        // SAFETY: `code` is a live mapping of CODE_SIZE bytes owned by this VM
        // for its whole life (never unmapped).
        unsafe { this.add_memslot(0, CODE_GPA, code.as_ptr() as u64, CODE_SIZE as u64) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION (code): {e}"))?;
        this.set_flat_protected_mode()?;
        Ok(this)
    }

    /// A duplicate of the VM fd (to send to another process).
    pub fn vm_fd(&self) -> Result<std::os::fd::OwnedFd, String> {
        self.vm_borrowed().try_clone_to_owned().map_err(|e| format!("dup VM fd: {e}"))
    }

    /// The VM fd, borrowed.
    pub fn vm_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the VmFd stays open as long as `self`.
        unsafe { BorrowedFd::borrow_raw(self.vm.as_raw_fd()) }
    }

    /// Registers `size` bytes at host address `hva` as memslot `slot` at `gpa`.
    ///
    /// # Safety
    ///
    /// `hva..hva+size` must stay mapped (or be removed from the VM) while the
    /// guest may touch it.
    pub unsafe fn add_memslot(&self, slot: u32, gpa: u64, hva: u64, size: u64) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: the caller keeps the memory valid.
        unsafe { kvm_util::set_memslot(&self.vm, slot, gpa, hva, size) }
    }

    fn set_flat_protected_mode(&mut self) -> Result<(), String> {
        kvm_util::set_flat_protected_mode(&self.vcpu).map_err(|e| format!("KVM_SET_SREGS: {e}"))
    }

    /// Loads `code` at [`CODE_GPA`], sets the given general registers
    /// (eax, ebx, ecx, edx, esi, edi) and runs from the first byte.
    pub fn load(&mut self, code: &[u8], regs: [u64; 6]) -> Result<(), String> {
        if code.len() > CODE_SIZE {
            return Err(format!("guest program of {} bytes > {CODE_SIZE}", code.len()));
        }
        // SAFETY: `code` fits in the CODE_SIZE-byte private mapping.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.code.as_ptr(), code.len()) };
        let mut r = self.vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi] = regs;
        r.rip = CODE_GPA;
        r.rflags = 2;
        r.rsp = CODE_GPA + CODE_SIZE as u64;
        self.vcpu.set_regs(&r).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// Runs the vCPU until its next exit; `Err` carries KVM_RUN's errno.
    pub fn run(&mut self) -> Result<Exit, kvm_ioctls::Error> {
        Ok(match self.vcpu.run()? {
            VcpuExit::IoOut(PORT, data) => {
                let mut word = [0u8; 4];
                word[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                Exit::Out(u32::from_le_bytes(word))
            }
            VcpuExit::Hlt => Exit::Hlt,
            other => Exit::Other(format!("{other:?}")),
        })
    }
}

/// Guest programs, hand-assembled 32-bit x86. Each ends `out PORT, eax; hlt`.
pub mod programs {
    /// `mov eax, 0x7e57_0042; out PORT, eax; hlt`.
    pub const HELLO: &[u8] = &[0xb8, 0x42, 0x00, 0x57, 0x7e, 0xe7, super::PORT as u8, 0xf4];
    /// The value [`HELLO`] reports.
    pub const HELLO_VALUE: u32 = 0x7e57_0042;

    /// Writes `ecx` dwords from address `edi`, one every `esi` bytes, a
    /// pseudo-random sequence from seed `eax`; reports the sum of what it
    /// wrote.
    pub const FILL: &[u8] = &[
        0x31,
        0xdb, //                       xor ebx, ebx
        0x89,
        0x07, //                 loop: mov [edi], eax
        0x01,
        0xc3, //                       add ebx, eax
        0x69,
        0xc0,
        0x0d,
        0x66,
        0x19,
        0x00, // imul eax, eax, 1664525
        0x05,
        0x5f,
        0xf3,
        0x6e,
        0x3c, //     add eax, 1013904223
        0x01,
        0xf7, //                       add edi, esi
        0x49, //                             dec ecx
        0x75,
        0xec, //                       jnz loop
        0x89,
        0xd8, //                       mov eax, ebx
        0xe7,
        super::PORT as u8, //          out PORT, eax
        0xf4,              //                             hlt
    ];

    /// Reads `ecx` dwords from address `edi`, one every `esi` bytes;
    /// reports their sum.
    pub const SUM: &[u8] = &[
        0x31,
        0xdb, //              xor ebx, ebx
        0x03,
        0x1f, //        loop: add ebx, [edi]
        0x01,
        0xf7, //              add edi, esi
        0x49, //                    dec ecx
        0x75,
        0xf9, //              jnz loop
        0x89,
        0xd8, //              mov eax, ebx
        0xe7,
        super::PORT as u8, // out PORT, eax
        0xf4,              //                    hlt
    ];

    /// What [`FILL`] reports: the same sequence, summed on the host.
    pub fn fill_sum(seed: u32, count: u32) -> u32 {
        let (mut value, mut sum) = (seed, 0u32);
        for _ in 0..count {
            sum = sum.wrapping_add(value);
            value = value.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        }
        sum
    }
}
