//! Windows: the ivshmem-plain BARs that L0 backs with vmbeam regions.
//!
//! L0 plugs window `K` behind PCIe root port `rpK`, which sits at slot
//! `0x10 + K` of the root bus; so the device's parent in sysfs names the
//! window whatever bus number the L1 kernel gave it.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use vmbeam::control::agent::Workload;

use crate::header::{self, HEADER_GPA};

/// ivshmem's PCI ids.
const IVSHMEM: (&str, &str) = ("0x1af4", "0x1110");
/// The root-bus slot of root port 0.
const FIRST_PORT_SLOT: u32 = 0x10;

#[derive(Debug, Clone)]
pub struct Window {
    pub index: u32,
    pub pci: String,
    pub size: u64,
    /// `resource2`: the BAR, mappable, the L2 QEMU's mem-path.
    pub bar: PathBuf,
}

/// Every window of this L1, by index.
pub fn scan(sys_pci: &Path) -> Result<Vec<Window>> {
    let mut windows = Vec::new();
    for dev in ivshmem_devices(sys_pci)? {
        let Some(index) = dev.slot.checked_sub(FIRST_PORT_SLOT) else { continue };
        windows.push(Window { index, pci: dev.pci, size: dev.size, bar: dev.bar });
    }
    windows.sort_by_key(|w| w.index);
    Ok(windows)
}

/// An ivshmem device behind a root port of the root bus.
pub struct Ivshmem {
    /// The root port's slot on the root bus.
    pub slot: u32,
    pub pci: String,
    pub size: u64,
    /// `resource2`: its BAR, mappable.
    pub bar: PathBuf,
}

/// Every ivshmem device of this L1 behind a root-bus root port: the
/// windows (slots 0x10 + index) and the state window
/// ([`vmbeam::control::state_window::SLOT`]).
pub fn ivshmem_devices(sys_pci: &Path) -> Result<Vec<Ivshmem>> {
    let mut found = Vec::new();
    let entries = fs::read_dir(sys_pci).with_context(|| format!("reading {}", sys_pci.display()))?;
    for entry in entries.flatten() {
        let dev = entry.path();
        let id = |f: &str| fs::read_to_string(dev.join(f)).map(|s| s.trim().to_string()).unwrap_or_default();
        if (id("vendor").as_str(), id("device").as_str()) != IVSHMEM {
            continue;
        }
        let Some(slot) = port_slot(&dev) else { continue };
        let bar = dev.join("resource2");
        let size = fs::metadata(&bar).with_context(|| format!("{}", bar.display()))?.len();
        found.push(Ivshmem { slot, pci: entry.file_name().to_string_lossy().into_owned(), size, bar });
    }
    Ok(found)
}

/// The root-bus slot of the root port a device sits behind.
fn port_slot(dev: &Path) -> Option<u32> {
    let real = fs::canonicalize(dev).ok()?;
    let parent = real.parent()?.file_name()?.to_str()?.to_string(); // 0000:00:10.0
    let slot = parent.rsplit(':').next()?.split('.').next()?;
    u32::from_str_radix(slot, 16).ok()
}

/// Reads the workload header of the L2 whose RAM is `window`. Only ever
/// called for a window that holds an L2: a window whose pages have not
/// arrived at L0 must not be touched.
pub fn read_header(window: &Window) -> Result<Workload> {
    if window.size < HEADER_GPA + 4096 {
        bail!("window {} is too small for an L2", window.index);
    }
    let file = fs::OpenOptions::new().read(true).open(&window.bar).with_context(|| window.bar.display().to_string())?;
    let len = std::num::NonZeroUsize::new(4096).expect("nonzero");
    // SAFETY: a fresh read-only shared mapping of one page of the BAR,
    // read below and unmapped before returning.
    let ptr = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, file.as_fd(), HEADER_GPA as i64) }
        .with_context(|| format!("mmap {}", window.bar.display()))?;
    let words = ptr.as_ptr().cast::<u32>();
    // SAFETY: the page is mapped and readable; volatile, as the L2 writes it.
    let word = |i: usize| unsafe { words.add(i).read_volatile() };
    let header = header::parse(word);
    // SAFETY: the mapping made above, unmapped once.
    unsafe { munmap(ptr, 4096) }.context("munmap")?;
    Ok(header)
}
