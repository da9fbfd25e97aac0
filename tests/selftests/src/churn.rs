//! Fresh faults on a region, round after round, counted: what a VMM and
//! its guest do to their memory while somebody else calls the module.
//!
//! Each round maps the region afresh without populating it, so every page
//! read is a new fault on the region: a user fault of this process, or a
//! KVM fault of its guest through a temporary memslot (KVM then faults the
//! page in through GUP, as for any guest RAM). Counting what fails shows
//! whether a call that should be invisible (a refused transfer) was.

use std::{
    os::fd::BorrowedFd,
    time::{Duration, Instant},
};

use nix::sys::mman::munmap;

use crate::{
    guest::{programs, Exit, TestVm},
    vmm::{map_unpopulated, read_dword},
};

/// The memslot and guest address a guest round uses.
const SLOT: u32 = 100;
const GPA: u64 = 0x8000_0000;

/// What went wrong over all rounds.
#[derive(Debug, Default)]
struct Failures {
    mmap_refused: u64,
    sigbus: u64,
    kvm_run: u64,
    wrong: u64,
    first_errno: i32,
}

impl Failures {
    fn none(&self) -> bool {
        self.access_failures() + self.wrong == 0
    }

    /// Failures a lost region explains.
    fn access_failures(&self) -> u64 {
        self.mmap_refused + self.sigbus + self.kvm_run
    }

    fn note(&mut self, errno: i32) {
        if self.first_errno == 0 {
            self.first_errno = errno;
        }
    }
}

/// Rounds over `region` for `millis`, reads checked against `expected`
/// (first dword of every page); through `vm`'s guest if given. Replies as
/// [`crate::vmm::Request::Churn`] says.
pub(crate) fn run(
    region: BorrowedFd<'_>,
    expected: &[u32],
    millis: u64,
    mut vm: Option<&mut TestVm>,
    revocable: bool,
) -> Result<u64, (i32, String)> {
    if expected.is_empty() {
        return Err((libc::EINVAL, "no Snapshot taken".into()));
    }
    let size = expected.len() as u64 * 4096;
    let want_sum = expected.iter().fold(0u32, |a, &v| a.wrapping_add(v));
    let deadline = Instant::now() + Duration::from_millis(millis);
    let (mut rounds, mut clean_rounds, mut failed) = (0u64, 0u64, Failures::default());
    while Instant::now() < deadline {
        rounds += 1;
        let before = failed.access_failures();
        let hva = match map_unpopulated(region, size) {
            Ok(hva) => hva,
            Err((errno, _)) => {
                failed.mmap_refused += 1;
                failed.note(errno);
                if revocable {
                    std::thread::yield_now(); // not ours now: let the mover run
                }
                continue;
            }
        };
        match vm.as_deref_mut() {
            Some(vm) => guest_round(vm, hva, size, want_sum, &mut failed)?,
            None => {
                for (page, &want) in expected.iter().enumerate() {
                    // SAFETY: inside the mapping made above, unmapped below.
                    match unsafe { read_dword(hva + page as u64 * 4096) } {
                        None => {
                            failed.sigbus += 1;
                            failed.note(libc::EFAULT);
                            break; // the rest of this mapping is as lost
                        }
                        Some(got) if got != want => failed.wrong += 1,
                        Some(_) => {}
                    }
                }
            }
        }
        // SAFETY: the mapping made above; nothing refers to it any more
        // (a guest round removed its memslot first).
        let _ =
            unsafe { munmap(std::ptr::NonNull::new(hva as *mut _).ok_or((0, "null map".to_string()))?, size as usize) };
        if failed.access_failures() == before && failed.wrong == 0 {
            clean_rounds += 1;
        }
    }
    if revocable && failed.wrong == 0 {
        return Ok(clean_rounds);
    }
    if failed.none() {
        return Ok(rounds);
    }
    Err((failed.first_errno, format!("{rounds} rounds: {failed:?}")))
}

/// One guest round: the guest sums the first dword of every page of a
/// fresh memslot over `hva`.
fn guest_round(vm: &mut TestVm, hva: u64, size: u64, want: u32, failed: &mut Failures) -> Result<(), (i32, String)> {
    // SAFETY: `hva..hva+size` stays mapped until the memslot is removed
    // below, before the caller unmaps it.
    unsafe { vm.add_memslot(SLOT, GPA, hva, size) }.map_err(|e| (e.errno(), format!("add memslot: {e}")))?;
    let pages = size / 4096;
    vm.load(programs::SUM, [0, 0, pages, 0, 4096, GPA]).map_err(|e| (0, e))?;
    match vm.run() {
        Ok(Exit::Out(got)) if got == want => {}
        Ok(Exit::Out(_)) => failed.wrong += 1,
        Ok(other) => return Err((0, format!("guest exit {other:?}"))),
        Err(e) => {
            failed.kvm_run += 1;
            failed.note(e.errno());
        }
    }
    // SAFETY: size 0 deletes the memslot.
    unsafe { vm.add_memslot(SLOT, GPA, hva, 0) }.map_err(|e| (e.errno(), format!("remove memslot: {e}")))
}
