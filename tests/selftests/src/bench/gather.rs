//! Gathering an L2's scattered pages out of an L1's RAM region (the gather
//! path of issue 11), as L0 does it: this process owns a RAM region of
//! twice the size (`VMBEAM_BIND_PROCESS`, as an L1's QEMU does), maps it
//! and writes every page; then every other page, in a shuffled order,
//! moves into an empty region with one `VMBEAM_GATHER_INTO` (its mapping
//! zapped), and the holes are filled with a fresh zeroed region's pages,
//! all in one `VMBEAM_GATHER_SCATTER` (uAPI 6: the fresh region's page i
//! into the i-th hole; no two holes are adjacent). The scatter is also
//! timed alone: a migration can create the fresh region ahead of time.

use std::{num::NonZeroUsize, os::fd::AsFd};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::bench::{
    memwatch::{peak, MemWatch},
    timed, Sample,
};

const PAGE: u64 = 4096;

/// The gather alone, the scatter into the holes alone, and gather + fill
/// (gather, fresh region, scatter).
pub struct GatherRun {
    pub gather: Sample,
    pub scatter: Sample,
    pub filled: Sample,
}

pub fn gather(dev: &vmbeam::Device, size: u64) -> Result<GatherRun, String> {
    fn e(what: &'static str) -> impl Fn(vmbeam::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let ram = dev.create_region(2 * size).map_err(e("RAM region"))?;
    ram.bind_process().map_err(e("bind to this process"))?;
    let len = NonZeroUsize::new((2 * size) as usize).ok_or("size 0")?;
    // SAFETY: a fresh shared mapping of the RAM region, touched only here
    // and unmapped before returning.
    let base = unsafe {
        mmap(
            None,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
            ram.as_fd(),
            0,
        )
    }
    .map_err(|err| format!("mmap RAM: {err}"))?;
    let words = base.as_ptr().cast::<u64>();
    let npages = 2 * size / PAGE;
    for p in 0..npages {
        // SAFETY: page p of the mapping, inside it.
        unsafe { words.add((p * PAGE / 8) as usize).write_volatile(p | 1 << 63) };
    }
    // Every other page, shuffled (xorshift): scattered like an L2's RAM.
    let mut offsets: Vec<u64> = (0..size / PAGE).map(|k| (2 * k + 1) * PAGE).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..offsets.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        offsets.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let dst = dev.create_empty_region(size).map_err(e("destination"))?;
    let copied0 = dev.stats().map_err(e("stats"))?.bytes_copied;
    let watch = MemWatch::start();
    let (moved, mut gather) = timed(|| dev.gather_into(ram.as_fd(), &offsets, dst.as_fd(), 0));
    moved.map_err(e("gather"))?;
    gather.peak_extra_mib = peak(&watch);
    let (fresh, create) = timed(|| dev.create_region(size));
    let fresh = fresh.map_err(e("fresh region"))?;
    let scatter_watch = MemWatch::start();
    let (filled, mut scatter) = timed(|| dev.scatter_into(fresh.as_fd(), ram.as_fd(), &offsets));
    filled.map_err(e("fill"))?;
    scatter.peak_extra_mib = peak(&scatter_watch);
    // The fill's fresh region is its extra memory: the watch since the gather.
    let fill_peak = peak(&watch);
    // The filled holes read zeros, the rest of the RAM what was written.
    let (hole, kept) = (offsets[0], offsets[0] - PAGE);
    // SAFETY: both inside the mapping; the hole now maps a fresh page.
    let (hole_word, kept_word) =
        unsafe { (words.add((hole / 8) as usize).read_volatile(), words.add((kept / 8) as usize).read_volatile()) };
    // SAFETY: the mapping made above, unmapped once.
    unsafe { munmap(base, (2 * size) as usize) }.map_err(|err| format!("munmap: {err}"))?;
    if hole_word != 0 || kept_word != (kept / PAGE) | 1 << 63 {
        return Err(format!("after the fill: hole reads {hole_word:#x}, kept page {kept_word:#x}"));
    }
    let copied = dev.stats().map_err(e("stats"))?.bytes_copied - copied0;
    let with_copied = |s: Sample| Sample { bytes_copied: copied, ..s };
    let filled = Sample {
        wall_ms: gather.wall_ms + create.wall_ms + scatter.wall_ms,
        cpu_s: gather.cpu_s + create.cpu_s + scatter.cpu_s,
        peak_extra_mib: fill_peak,
        ..gather
    };
    Ok(GatherRun { gather: with_copied(gather), scatter: with_copied(scatter), filled: with_copied(filled) })
}
