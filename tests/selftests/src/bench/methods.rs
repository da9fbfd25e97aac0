//! The in-kernel-test methods: memcpy, vmbeam's transfer (alone, then with
//! the new owner mapping and its guest touching every page) and the memfd
//! hand-over peer on the same VMM code path.

use std::os::fd::AsFd;

use crate::{
    bench::{
        memwatch::{peak, MemWatch},
        timed, Sample,
    },
    pair::{count, run, Pair, CLEAN_GPA, SLOT},
    vmm::{Program, Request, Vmm},
};

const PAGE: u32 = 4096;

/// memcpy of `size` bytes between two buffers whose pages are present.
pub fn memcpy(size: u64) -> Sample {
    let mut src = vec![0u8; size as usize];
    for (i, page) in src.chunks_mut(PAGE as usize).enumerate() {
        page[0] = i as u8 | 1;
    }
    // The destination is the copy's extra memory (the time is the copy's
    // alone: its pages are present before the clock starts).
    let watch = MemWatch::start();
    let mut dst = vec![0u8; size as usize];
    for page in dst.chunks_mut(PAGE as usize) {
        page[0] = 1;
    }
    let ((), mut s) = timed(|| dst.copy_from_slice(&src));
    std::hint::black_box(&dst);
    s.bytes_copied = size;
    s.peak_extra_mib = peak(&watch);
    s
}

/// What one vmbeam hand-over cost, step by step (each a cumulative sample).
pub struct VmbeamRun {
    /// The `VMBEAM_TRANSFER_BATCH` ioctl: revoke from the aged VMM and VM,
    /// grant to the clean VM.
    pub transfer: Sample,
    /// + the clean VMM maps the region (`MAP_POPULATE`) as a memslot.
    pub mapped: Sample,
    /// + the clean guest reads every page (KVM stage-2 faults).
    pub touched: Sample,
}

/// Aged VMM fills a region of `size` through its guest; the clean VMM
/// takes it over. With `huge`, the region is `VMBEAM_CREATE_HUGE`.
pub fn vmbeam(dev: &vmbeam::Device, size: u64, huge: bool) -> Result<VmbeamRun, String> {
    let mut pair = Pair::with_pages(size, PAGE, 0xbe4c_0001, huge)?;
    let copied0 = dev.stats().map_err(|e| e.to_string())?.bytes_copied;
    let watch = MemWatch::start();
    let (moved, mut transfer) = timed(|| dev.transfer_batch(&[pair.transfer()]));
    moved.map_err(|e| format!("transfer: {e}"))?;
    transfer.peak_extra_mib = peak(&watch);
    let (mapped_ok, map_only) =
        timed(|| pair.clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[pair.region.as_fd()]).map(|_| ()));
    mapped_ok?;
    let map_peak = peak(&watch);
    let (sum, touch_only) = timed(|| run(&mut pair.clean, Program::Sum, 0, count(size, PAGE), PAGE));
    let sum = sum?;
    let touch_peak = peak(&watch);
    if sum != pair.written {
        return Err(format!("clean guest summed {sum:#x}, aged wrote {:#x}", pair.written));
    }
    let copied = dev.stats().map_err(|e| e.to_string())?.bytes_copied - copied0;
    pair.finish();
    let mapped = Sample { peak_extra_mib: map_peak, ..add(transfer, map_only) };
    let touched = Sample { peak_extra_mib: touch_peak, ..add(mapped, touch_only) };
    let with_copied = |s: Sample| Sample { bytes_copied: copied, ..s };
    Ok(VmbeamRun { transfer: with_copied(transfer), mapped: with_copied(mapped), touched: with_copied(touched) })
}

/// What one memfd hand-over cost: mapped (populated) and touched, as for
/// vmbeam. Nothing is revoked: the aged VMM keeps its access.
pub fn memfd(size: u64) -> Result<(Sample, Sample), String> {
    let mut aged = Vmm::spawn();
    let mut clean = Vmm::spawn();
    aged.ok(&Request::CreateVm, &[])?;
    clean.ok(&Request::CreateVm, &[])?;
    let (_, fd) = aged.ok(&Request::CreateMemfd { size, slot: SLOT, gpa: crate::pair::AGED_GPA }, &[])?;
    let fd = fd.ok_or("no memfd came back")?;
    let written = run(&mut aged, Program::Fill { seed: 0xbe4c_0002 }, 0, count(size, PAGE), PAGE)?;
    let watch = MemWatch::start();
    let (mapped_ok, mut mapped) =
        timed(|| clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[fd.as_fd()]).map(|_| ()));
    mapped_ok?;
    mapped.peak_extra_mib = peak(&watch);
    let (sum, touch_only) = timed(|| run(&mut clean, Program::Sum, 0, count(size, PAGE), PAGE));
    let sum = sum?;
    let touch_peak = peak(&watch);
    aged.quit();
    clean.quit();
    if sum != written {
        return Err(format!("clean guest summed {sum:#x}, aged wrote {written:#x}"));
    }
    Ok((mapped, Sample { peak_extra_mib: touch_peak, ..add(mapped, touch_only) }))
}

fn add(a: Sample, b: Sample) -> Sample {
    Sample { wall_ms: a.wall_ms + b.wall_ms, cpu_s: a.cpu_s + b.cpu_s, ..a }
}
