//! The in-kernel-test methods: memcpy, vmbeam's transfer (alone, then with
//! the new owner mapping it, pre-faulting it into its VM or not, and its
//! guest touching every page) and the memfd hand-over peer on the same VMM
//! code path.

use std::os::fd::{AsFd, BorrowedFd};

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

/// What one hand-over cost, step by step, each sample cumulative (the
/// time and CPU of every step before it included).
pub struct Handover {
    /// vmbeam's `VMBEAM_TRANSFER_BATCH` ioctl: revoke from the aged VMM and
    /// VM, grant to the clean VM (`None` for the memfd peer: nothing to
    /// revoke, the fd just goes over the socket).
    pub transfer: Option<Sample>,
    /// + the clean VMM maps it (`MAP_POPULATE`) as a memslot.
    pub mapped: Sample,
    /// + `KVM_PRE_FAULT_MEMORY` over the memslot, when asked for (eager).
    pub prefaulted: Option<Sample>,
    /// + the clean guest reads every page: one KVM stage-2 fault per page
    ///   (per 2 MiB block when huge) unless pre-faulted.
    pub touched: Sample,
}

/// Aged VMM fills a region of `size` through its guest; the clean VMM
/// takes it over. The region's pages come in `blocks` (4 KiB, 2 MiB or
/// 1 GiB); with `eager`, the clean VMM pre-faults it into its VM before the
/// guest runs.
pub fn vmbeam(dev: &vmbeam::Device, size: u64, blocks: vmbeam::Blocks, eager: bool) -> Result<Handover, String> {
    let mut pair = Pair::with_pages(size, PAGE, 0xbe4c_0001, blocks)?;
    let copied0 = dev.stats().map_err(|e| e.to_string())?.bytes_copied;
    let watch = MemWatch::start();
    let (moved, mut transfer) = timed(|| dev.transfer_batch(&[pair.transfer()]));
    moved.map_err(|e| format!("transfer: {e}"))?;
    transfer.peak_extra_mib = peak(&watch);
    let steps = take_over(&mut pair.clean, pair.region.as_fd(), size, eager, pair.written, &watch)?;
    let copied = dev.stats().map_err(|e| e.to_string())?.bytes_copied - copied0;
    pair.finish();
    let with_copied = |s: Sample| Sample { bytes_copied: copied, ..s };
    let after = |s: Sample| {
        with_copied(Sample { peak_extra_mib: s.peak_extra_mib, host_faults: s.host_faults, ..add(transfer, s) })
    };
    Ok(Handover {
        transfer: Some(with_copied(transfer)),
        mapped: after(steps.mapped),
        prefaulted: steps.prefaulted.map(after),
        touched: after(steps.touched),
    })
}

/// What one memfd hand-over cost, step by step as for vmbeam. Nothing is
/// revoked: the aged VMM keeps its access.
pub fn memfd(size: u64, eager: bool) -> Result<Handover, String> {
    let mut aged = Vmm::spawn();
    let mut clean = Vmm::spawn();
    aged.ok(&Request::CreateVm, &[])?;
    clean.ok(&Request::CreateVm, &[])?;
    let (_, fd) = aged.ok(&Request::CreateMemfd { size, slot: SLOT, gpa: crate::pair::AGED_GPA }, &[])?;
    let fd = fd.ok_or("no memfd came back")?;
    let written = run(&mut aged, Program::Fill { seed: 0xbe4c_0002 }, 0, count(size, PAGE), PAGE)?;
    let watch = MemWatch::start();
    let steps = take_over(&mut clean, fd.as_fd(), size, eager, written, &watch);
    aged.quit();
    clean.quit();
    steps
}

/// The clean VMM's side of a hand-over of `fd`: map it as a memslot,
/// pre-fault it if `eager`, have its guest sum every page and check the
/// sum against what the aged guest `written`. Samples cumulative from the
/// map on; peaks from `watch`.
fn take_over(
    clean: &mut Vmm,
    fd: BorrowedFd<'_>,
    size: u64,
    eager: bool,
    written: u32,
    watch: &Option<MemWatch>,
) -> Result<Handover, String> {
    let (mapped_ok, mut mapped) =
        timed(|| clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[fd]).map(|_| ()));
    mapped_ok?;
    mapped.peak_extra_mib = peak(watch);
    let mut before_touch = mapped;
    let prefaulted = if eager {
        let (done, prefault_only) = timed(|| clean.ok(&Request::PreFault { slot: SLOT }, &[]).map(|_| ()));
        done?;
        before_touch = Sample { peak_extra_mib: peak(watch), ..add(mapped, prefault_only) };
        Some(before_touch)
    } else {
        None
    };
    // KVM's count of stage-2 faults, read outside the clock: the reads'
    // share of it is what the moved VM pays in host faults. A first run
    // over the last page alone maps the guest's own code (one fault that
    // is not the moved memory's), so a lazy count is one page short.
    run(clean, Program::Sum, size - u64::from(PAGE), 1, PAGE)?;
    let faults_before = clean.kvm_stat("pf_taken", true)?;
    let (sum, touch_only) = timed(|| run(clean, Program::Sum, 0, count(size, PAGE), PAGE));
    let sum = sum?;
    if sum != written {
        return Err(format!("clean guest summed {sum:#x}, aged wrote {written:#x}"));
    }
    let host_faults = Some(clean.kvm_stat("pf_taken", true)? - faults_before);
    let touched = Sample { peak_extra_mib: peak(watch), host_faults, ..add(before_touch, touch_only) };
    Ok(Handover { transfer: None, mapped, prefaulted, touched })
}

fn add(a: Sample, b: Sample) -> Sample {
    Sample { wall_ms: a.wall_ms + b.wall_ms, cpu_s: a.cpu_s + b.cpu_s, ..a }
}
