//! This L1's state window (`vmbeam::control::state_window`): where the
//! agent leaves each saved L2 state for L0 to move with the pages, and
//! reads the states L0 moved in.
//!
//! The outbox is mapped once and written only; the inbox is mapped a state
//! at a time, for exactly the pages L0 says arrived (a page that did not
//! must never be touched), and unmapped again.

use std::{
    fs,
    num::NonZeroUsize,
    os::fd::AsFd,
    path::{Path, PathBuf},
    ptr::NonNull,
};

use anyhow::{bail, Context, Result};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vmbeam::control::state_window::{self, StateAt, HALF, INBOX, OUTBOX, SLOT};

use crate::window;

const PAGE: u64 = 4096;
/// What one L2's saved state takes in the outbox, about: QEMU 7.2's
/// stream of our L2 machine is 311 KiB (mostly its ROMs).
const EXPECTED_STATE_BYTES: u64 = 384 << 10;

/// The state window's BAR, its outbox mapped.
///
/// # Invariants
///
/// `outbox` is a shared read-write mapping of the BAR's bytes `OUTBOX ..
/// OUTBOX + HALF`, made here and unmapped on drop; `next` is a page
/// aligned offset within the outbox.
pub struct StateWindow {
    bar: PathBuf,
    size: u64,
    outbox: NonNull<std::ffi::c_void>,
    next: u64,
}

// SAFETY: the mapping is owned by this value alone (no other reference to
// it exists), so moving it to another thread moves the only user.
unsafe impl Send for StateWindow {}

impl StateWindow {
    /// The state window of this L1, if L0 plugged one.
    pub fn find(sys_pci: &Path) -> Result<Option<Self>> {
        let Some(dev) = window::ivshmem_devices(sys_pci)?.into_iter().find(|d| d.slot == SLOT) else {
            return Ok(None);
        };
        if dev.size != state_window::SIZE {
            bail!("the state window ({}) is {} bytes, not {}", dev.pci, dev.size, state_window::SIZE);
        }
        Self::open(dev.bar, dev.size).map(Some)
    }

    /// The state window whose BAR (or, in tests, a file of its size) is
    /// `bar`: its outbox mapped.
    fn open(bar: PathBuf, size: u64) -> Result<Self> {
        let file =
            fs::OpenOptions::new().read(true).write(true).open(&bar).with_context(|| bar.display().to_string())?;
        let len = NonZeroUsize::new(HALF as usize).context("empty outbox")?;
        // SAFETY: a fresh shared mapping of the outbox, whose pages are all
        // present at L0; kept (and unmapped on drop) as the invariant says.
        let outbox = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                OUTBOX as i64,
            )
        }
        .with_context(|| format!("mmap {}", bar.display()))?;
        Ok(Self { bar, size, outbox, next: 0 })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Starts a new set of `states` states (`save-l2s`), before any L2
    /// stops: the outbox's earlier ones have been moved out or are no
    /// longer wanted, and the pages the new ones will take are touched
    /// ([`Self::prefault`]).
    pub fn begin(&mut self, states: usize) {
        self.next = 0;
        self.prefault(states as u64 * EXPECTED_STATE_BYTES);
    }

    /// Touches the outbox's first `bytes` (each page read and written back
    /// as it is), before the L2s stop: L0 maps this L1's view of a page at
    /// its first touch, and the pages a move took away were replaced by
    /// pages this L1 never touched. At `put` those ~80 faults per state
    /// (~40 µs each under TCG) fell inside the downtime, on the vCPU the
    /// other L2s' saves need; here they come before it.
    ///
    /// Only for an outbox that L0 said is whole (`save-l2s` asks for the
    /// state window only then): touching a page missing at L0 stops the L1.
    fn prefault(&mut self, bytes: u64) {
        let base = self.outbox.as_ptr().cast::<u8>();
        for page in 0..bytes.min(HALF).div_ceil(PAGE) {
            // SAFETY: inside the outbox (at most HALF bytes, the length of
            // the read-write mapping of the invariant); volatile, so that
            // the touches are made, and the byte written is the one read.
            unsafe {
                let at = base.add((page * PAGE) as usize);
                at.write_volatile(at.read_volatile());
            }
        }
    }

    /// Writes `stream` into the outbox after the states before it, page
    /// aligned: where it went, or `None` if it does not fit (it goes over
    /// the link then).
    pub fn put(&mut self, stream: &[u8]) -> Option<StateAt> {
        let at = StateAt { offset: OUTBOX + self.next, bytes: stream.len() as u64 };
        if !at.is_within(OUTBOX) {
            return None;
        }
        // SAFETY: `at` lies inside the outbox (checked just above), which
        // is mapped read-write (the invariant); nothing else in this
        // process maps it, and `stream` is ordinary memory apart from it.
        unsafe {
            let dst = self.outbox.as_ptr().cast::<u8>().add((at.offset - OUTBOX) as usize);
            std::ptr::copy_nonoverlapping(stream.as_ptr(), dst, stream.len());
        }
        self.next = at.offset - OUTBOX + at.pages() * PAGE;
        Some(at)
    }

    /// Reads the state L0 moved into the inbox at `at`.
    pub fn take(&self, at: StateAt) -> Result<Vec<u8>> {
        if !at.is_within(INBOX) {
            bail!(
                "no state at {:#x} (+{} bytes): states arrive in the inbox, {INBOX:#x} .. {:#x}",
                at.offset,
                at.bytes,
                INBOX + HALF
            );
        }
        let file = fs::File::open(&self.bar).with_context(|| self.bar.display().to_string())?;
        let len = NonZeroUsize::new((at.pages() * PAGE) as usize).context("empty state")?;
        // SAFETY: a fresh read-only shared mapping of exactly the pages L0
        // moved there, read below and unmapped before returning.
        let ptr =
            unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, file.as_fd(), at.offset as i64) }
                .with_context(|| format!("mmap {}", self.bar.display()))?;
        // SAFETY: the mapping made above is `len` >= `at.bytes` readable bytes.
        let stream = unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), at.bytes as usize) }.to_vec();
        // SAFETY: the mapping made above, unmapped once; `stream` is a copy.
        unsafe { munmap(ptr, len.get()) }.context("munmap")?;
        Ok(stream)
    }
}

impl Drop for StateWindow {
    fn drop(&mut self) {
        // SAFETY: the outbox mapping of the invariant, unmapped only here.
        let _ = unsafe { munmap(self.outbox, HALF as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file the size of a state window stands in for its BAR.
    fn fake_window(name: &str) -> (StateWindow, PathBuf) {
        let path = std::env::temp_dir().join(format!("vmbeam-state-window-{name}-{}", std::process::id()));
        fs::File::create(&path).unwrap().set_len(state_window::SIZE).unwrap();
        (StateWindow::open(path.clone(), state_window::SIZE).unwrap(), path)
    }

    #[test]
    fn states_go_into_the_outbox_page_by_page_until_it_is_full() {
        let (mut w, path) = fake_window("put");
        let a = w.put(&[7; 5000]).unwrap();
        let b = w.put(b"QEVM").unwrap();
        assert_eq!((a.offset, a.bytes, b.offset, b.bytes), (0, 5000, 8192, 4));
        let bytes = fs::read(&path).unwrap();
        assert!(bytes[..5000].iter().all(|&x| x == 7) && bytes[5000..8192].iter().all(|&x| x == 0));
        assert_eq!(&bytes[8192..8196], b"QEVM");
        assert!(w.put(&vec![1; HALF as usize]).is_none(), "past the outbox's end");
        w.begin(0);
        w.prefault(HALF + 4096);
        assert_eq!(fs::read(&path).unwrap(), bytes, "prefaulting changes no byte");
        assert_eq!(w.put(&vec![1; HALF as usize]).map(|a| a.offset), Some(0), "a new set starts over");
        let _ = fs::remove_file(path);
    }

    #[test]
    fn a_state_is_read_from_the_inbox_and_nowhere_else() {
        let (w, path) = fake_window("take");
        let mut bytes = fs::read(&path).unwrap();
        bytes[INBOX as usize..INBOX as usize + 6].copy_from_slice(b"QEVM\x00\x03");
        fs::write(&path, &bytes).unwrap();
        assert_eq!(w.take(StateAt { offset: INBOX, bytes: 6 }).unwrap(), b"QEVM\x00\x03");
        let outside = [
            StateAt { offset: 0, bytes: 6 },
            StateAt { offset: INBOX + 1, bytes: 6 },
            StateAt { offset: INBOX, bytes: HALF + 1 },
        ];
        for bad in outside {
            let refused = w.take(bad).unwrap_err().to_string();
            assert!(refused.contains("states arrive in the inbox"), "{refused}");
        }
        let _ = fs::remove_file(path);
    }
}
