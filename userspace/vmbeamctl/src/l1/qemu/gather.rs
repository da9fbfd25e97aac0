//! The gather path for an L2 on ordinary L1 memory: its RAM is scattered
//! over the aged L1's RAM region; the agent reports which L1 frames hold
//! it, vmbeamctl checks them and turns them into region offsets, and
//! `VMBEAM_GATHER_INTO` moves those pages, in the L2's guest-physical
//! order, into a window the clean L1 plugged in ahead.
//!
//! What the aged L1 sees at those frames afterwards: nothing (holes; its
//! QEMU gets `EFAULT` from `KVM_RUN` if the L1 touches one) until
//! [`fill`] scatters fresh zeroed pages of a new region into them. With
//! holes, the moved L2's stopped QEMU must stay alive in the aged L1 (its
//! locked pages are what keeps the L1's kernel off those frames) until the
//! aged L1 is destroyed; with the fill, it may be killed and the L1 go on.

use std::os::fd::AsFd;

use anyhow::{bail, Result};
use vmbeam::Device;

use super::{ram::offset_of_frame, RamRegion};

/// How a real-L1 migration runs (`migrate-all` options): the gather path,
/// and how the states travel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Leave gathered frames empty in the aged L1 (`--gather-holes`).
    pub holes: bool,
    /// Carry the states over the agents' links even between L1s with
    /// state windows (`--states-over-link`: to compare).
    pub states_over_link: bool,
    /// Testing: spoil each frame list this way.
    pub corrupt: Option<Corruption>,
}

/// A way a frame list can be wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Corruption {
    /// A page not present.
    Missing,
    /// A frame that another page has too.
    Repeated,
    /// A frame past the end of the L1's RAM.
    Outside,
}

impl Corruption {
    /// Spoils the second entry of `frames`.
    pub fn apply(self, frames: &mut [u64], ram_size: u64) {
        if frames.len() < 2 {
            return;
        }
        frames[1] = match self {
            Corruption::Missing => 0,
            Corruption::Repeated => frames[0],
            Corruption::Outside => ram_size / 4096 + 1,
        };
    }
}

/// Checks an L2's frame list against the L1's RAM of `ram_size` bytes and
/// returns the region offsets, in the same order. Refuses a page not
/// present, a frame twice, or one outside RAM, naming how many and the
/// first of each.
///
/// One pass, no sort (this runs inside the L2's downtime, and a 1 GiB L2
/// is 262,144 frames): a bitmap of the RAM's pages finds repeats.
pub fn offsets(name: &str, frames: &[u64], ram_size: u64) -> Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(frames.len());
    let mut seen = vec![0u64; (ram_size / 4096).div_ceil(64) as usize];
    let (mut missing, mut outside, mut repeated) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &f) in frames.iter().enumerate() {
        let Some(offset) = offset_of_frame(ram_size, f).filter(|_| f != 0) else {
            if f == 0 {
                missing.push(i);
            } else {
                outside.push(f);
            }
            continue;
        };
        let page = (offset / 4096) as usize;
        let (word, bit) = (page / 64, 1u64 << (page % 64));
        if seen[word] & bit != 0 {
            repeated.push(f);
        }
        seen[word] |= bit;
        offsets.push(offset);
    }
    let mut problems = Vec::new();
    if let Some(first) = missing.first() {
        problems.push(format!("{} pages not present (the first: L2 page {first})", missing.len()));
    }
    if let Some(first) = outside.first() {
        problems.push(format!("{} frames outside the L1's RAM (the first: {first:#x})", outside.len()));
    }
    if let Some(first) = repeated.first() {
        problems.push(format!("{} frames repeated (the first: {first:#x})", repeated.len()));
    }
    if !problems.is_empty() {
        bail!("{name}: the aged L1's frame list is refused, nothing moved: {}", problems.join("; "));
    }
    Ok(offsets)
}

/// Moves the pages of `src` (its page i = list entry i) into the RAM
/// region's slots at `offsets`, which must be holes: one
/// `VMBEAM_GATHER_SCATTER`, the reverse of the gather.
pub fn into_slots(dev: &Device, src: &impl AsFd, ram: &RamRegion, offsets: &[u64]) -> Result<()> {
    dev.scatter_into(src.as_fd(), ram.region.as_fd(), offsets)?;
    Ok(())
}

/// Fills the holes at `offsets` with the fresh zeroed pages of a new
/// region: the aged L1 may touch those frames again. Costs that much
/// memory at L0 until the aged L1 is gone.
pub fn fill(dev: &Device, ram: &RamRegion, offsets: &[u64]) -> Result<()> {
    let fresh = dev.create_region(offsets.len() as u64 * 4096)?;
    into_slots(dev, &fresh, ram, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_frame_lists_are_refused() {
        let ram = 64 << 20;
        assert_eq!(offsets("vm", &[3, 1, 2], ram).unwrap(), vec![0x3000, 0x1000, 0x2000]);
        let err = |f: &[u64]| offsets("vm", f, ram).unwrap_err().to_string();
        assert!(err(&[3, 0, 2]).contains("1 pages not present"));
        assert!(err(&[3, 3, 2]).contains("1 frames repeated (the first: 0x3)"));
        assert!(err(&[3, 0x4000, 2]).contains("1 frames outside the L1's RAM (the first: 0x4000)"));
    }
}
