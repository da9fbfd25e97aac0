//! Reading a byte that may have been revoked, without dying of it.
//!
//! A revoked region page raises SIGBUS in the VMM. While a probe runs, the
//! handler puts a private zero page over the faulting page, so the load
//! completes, and records that it faulted. Any other SIGBUS is a real bug:
//! the handler restores the default action and the retried access kills the
//! process as it would have.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static PROBING: AtomicBool = AtomicBool::new(false);
static FAULTED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if !PROBING.load(Ordering::SeqCst) {
        // SAFETY: resetting a disposition is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let page = unsafe { (*info).si_addr() } as usize & !0xfff;
    FAULTED.store(page, Ordering::SeqCst);
    // SAFETY: replaces exactly the faulting page of the mapping under probe;
    // mmap is async-signal-safe.
    unsafe {
        libc::mmap(
            page as *mut _,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the SIGBUS handler and the no-op SIGUSR1 handler that kicks
/// vCPU threads out of KVM_RUN (no SA_RESTART: KVM_RUN returns EINTR).
pub fn install_handlers() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let bus = SigAction::new(SigHandler::SigAction(on_sigbus), SaFlags::SA_SIGINFO, SigSet::empty());
    let kick = SigAction::new(SigHandler::Handler(on_kick), SaFlags::empty(), SigSet::empty());
    // SAFETY: both handlers only touch atomics and call async-signal-safe
    // functions.
    unsafe {
        sigaction(Signal::SIGBUS, &bus)?;
        sigaction(Signal::SIGUSR1, &kick)?;
    }
    Ok(())
}

/// Reads the byte at `addr`; `None` if the access raised SIGBUS (the page
/// is then a private zero page: probe only memory you have given up).
///
/// # Safety
///
/// `addr` must lie in a live mapping of this process, and only one thread
/// may probe at a time.
pub unsafe fn read_byte(addr: *const u8) -> Option<u8> {
    FAULTED.store(0, Ordering::SeqCst);
    PROBING.store(true, Ordering::SeqCst);
    // SAFETY: the caller guarantees a live mapping; SIGBUS is handled above.
    let byte = unsafe { std::ptr::read_volatile(addr) };
    PROBING.store(false, Ordering::SeqCst);
    (FAULTED.load(Ordering::SeqCst) == 0).then_some(byte)
}
