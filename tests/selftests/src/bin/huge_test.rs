//! Huge regions (`VMBEAM_CREATE_HUGE`): pages in naturally aligned 2 MiB
//! blocks, mapped by PMD, and so by KVM with 2 MiB stage-2 entries: a new
//! owner's guest reading every page of 16 MiB takes one stage-2 fault per
//! 2 MiB instead of one per 4 KiB (counted by the eBPF probes), on the
//! same pages (nothing copied), and the old owner is refused as with 4 KiB.
//! (Whether a block is one aligned 2 MiB of physical memory shows in the
//! stage-2 faults: a block that is not falls back to 4 KiB entries.)
//! `VMBEAM_REGION_FRAMES` reads the frames from the owner's page tables,
//! which pagemap does not walk for PFNMAP mappings: the new owner maps the
//! old owner's frames, each block with one PMD.

use std::os::{
    fd::{AsFd, AsRawFd, OwnedFd},
    unix::fs::FileExt,
};

use vmbeam::{uapi, Blocks, MappedFrame, Region};

use vmbeam_probes::{Kind, Options, Probes, Summary};
use vmbeam_selftests::{
    check,
    pair::{Pair, CLEAN_GPA, MIB, SLOT},
    require,
    vmm::{Program, Request},
    Tap,
};

const SIZE: u64 = 16 * MIB;
const BLOCK: u64 = 2 * MIB;

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(7);
    let mut pair = match Pair::with_pages(SIZE, 4096, 0x4a9e_0001, Blocks::Huge2M) {
        Ok(p) => p,
        Err(e) => Tap::skip_all(&format!("set-up: {e}")),
    };
    let stats0 = dev.stats().expect("stats");

    tap.test("mappings_of_2mib_and_more_are_2mib_aligned", || {
        check(pair.aged_hva % BLOCK == 0, || format!("the aged mapping at {:#x} is not 2 MiB aligned", pair.aged_hva))
    });

    // A second fd of the region, for its frames (the pair keeps its own).
    let region = Region::from_fd(pair.region.try_clone().expect("dup the region fd"));
    let mut aged_frames = Vec::new();
    tap.test("the_owner_maps_each_2mib_block_with_one_pmd", || {
        aged_frames = region.mapped_frames(0, SIZE / 4096).map_err(|e| e.to_string())?;
        whole_blocks(&aged_frames)
    });

    let mut clean_hva = 0;
    tap.test("a_new_owner_guest_takes_one_stage2_fault_per_2mib", || {
        let clean_pid = pair.clean.pid.as_raw() as u32;
        let probes = Probes::attach(&Options { pids: vec![clean_pid] }).map_err(|e| e.to_string())?;
        dev.transfer_batch(&[pair.transfer()]).map_err(|e| e.to_string())?;
        let (hva, sum) = pair.clean_reads()?;
        clean_hva = hva;
        check(sum == pair.written, || format!("clean guest summed {sum:#x}, aged wrote {:#x}", pair.written))?;
        let s = Summary::gather(&probes).map_err(|e| e.to_string())?;
        let process = s.processes.iter().find(|p| p.pid == clean_pid).ok_or("no record of the clean VMM")?;
        let count = |kind| process.faults.get(&kind).map_or(0, |by| by.values().map(|h| h.count).sum::<u64>());
        let blocks = SIZE / BLOCK;
        println!(
            "# {} pages: {} region faults, {} KVM stage-2 faults ({blocks} blocks of 2 MiB)",
            SIZE / 4096,
            count(Kind::RegionFault),
            count(Kind::KvmFault)
        );
        check(hva % BLOCK == 0, || format!("the clean mapping at {hva:#x} is not 2 MiB aligned"))?;
        check(count(Kind::RegionFault) == blocks, || {
            format!("{} region faults for {blocks} blocks (one PMD each)", count(Kind::RegionFault))
        })?;
        // One per block, and one for the guest's code page (not a region's).
        check(count(Kind::KvmFault) <= blocks + 1, || {
            format!("{} KVM stage-2 faults for {blocks} blocks: not mapped at 2 MiB", count(Kind::KvmFault))
        })
    });

    tap.test("the_new_owner_maps_the_old_owners_frames_by_pmd_nothing_copied", || {
        // The frames from the new owner's page tables, against the old
        // owner's before the move: the same, page for page.
        let clean = region.mapped_frames(0, SIZE / 4096).map_err(|e| e.to_string())?;
        whole_blocks(&clean)?;
        let same = clean.iter().zip(&aged_frames).filter(|(c, a)| c.pfn == a.pfn).count();
        println!("# {same} of {} frames the same; first block at pfn {:#x}", clean.len(), clean[0].pfn);
        check(same == clean.len() && clean.len() == aged_frames.len(), || {
            format!("{same} of {} frames the same after the move", clean.len())
        })?;
        let stats = dev.stats().map_err(|e| e.to_string())?;
        let moved = stats.pages_transferred - stats0.pages_transferred;
        check(stats.bytes_copied == stats0.bytes_copied && moved == SIZE / 4096, || {
            format!("{moved} pages transferred, {} bytes copied", stats.bytes_copied - stats0.bytes_copied)
        })
    });

    tap.test("the_old_owner_is_refused_and_gup_cannot_reach_the_pages", || {
        let touched = pair.aged.call(&Request::Touch { slot: SLOT, offset: 4096 }, &[]);
        check(matches!(touched, Err((libc::EFAULT, _))), || format!("the aged VMM read after the move: {touched:?}"))?;
        // The documented cost of PFNMAP: no GUP, so /proc/PID/mem (like
        // O_DIRECT or process_vm_readv) cannot read the new owner's pages.
        let mem = std::fs::File::open(format!("/proc/{}/mem", pair.clean.pid)).map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        let read = mem.read_at(&mut byte, clean_hva);
        check(read.is_err(), || format!("/proc/PID/mem read a huge region's page: {read:?}"))
    });

    tap.test("region_frames_refuses_bad_requests_with_their_errno", || {
        let huge = pair.region.as_fd();
        let mut frames = [0u64; 4];
        let call = |fd: i32, offset: u64, count: u64, frames: u64, reserved: u64| {
            let arg =
                uapi::vmbeam_region_frames { offset, count, frames, reserved: [reserved, 0], ..Default::default() };
            // SAFETY: the struct this command takes; the module writes at
            // most `count` u64s at `frames`, and each call below names
            // `frames` with room for them, or an address it must refuse.
            let r = unsafe { libc::ioctl(fd, uapi::VMBEAM_IOCTL_REGION_FRAMES as _, &arg) };
            if r == 0 {
                0
            } else {
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
            }
        };
        let buf = frames.as_mut_ptr() as u64;
        let fd = huge.as_raw_fd();
        let cases = [
            ("count 0", call(fd, 0, 0, buf, 0), libc::EINVAL),
            ("unaligned offset", call(fd, 100, 1, buf, 0), libc::EINVAL),
            ("past the end", call(fd, SIZE - 4096, 2, buf, 0), libc::EINVAL),
            ("reserved word", call(fd, 0, 1, buf, 7), libc::EINVAL),
            ("kernel address", call(fd, 0, 1, 0xffff_8000_0000_0000, 0), libc::EFAULT),
            ("the last page", call(fd, SIZE - 4096, 1, buf, 0), 0),
        ];
        let four_k = dev.create_region(1 << 20).map_err(|e| e.to_string())?;
        let ownerless = dev.create_huge_region(4 << 20).map_err(|e| e.to_string())?;
        let more = [
            ("a 4 KiB region", call(four_k.as_fd().as_raw_fd(), 0, 1, buf, 0), libc::EOPNOTSUPP),
            ("an ownerless region", call(ownerless.as_fd().as_raw_fd(), 0, 1, buf, 0), libc::ESRCH),
        ];
        for (what, got, want) in cases.into_iter().chain(more) {
            check(got == want, || format!("{what}: errno {got}, expected {want}"))?;
        }
        check(frames[0] != 0, || "the last page: no frame".to_string())
    });

    pair.finish();

    tap.test("gather_takes_single_pages_out_of_a_block", || {
        let mut src = Pair::with_pages(4 * MIB, 64, 0x4a9e_0002, Blocks::Huge2M)?;
        // One page from each block, each summed first by the source guest.
        let picks = [5u64, 600];
        let sums: Vec<u32> = picks
            .iter()
            .map(|&p| vmbeam_selftests::pair::run(&mut src.aged, Program::Sum, p * 4096, 64, 64))
            .collect::<Result<_, _>>()?;
        let offsets: Vec<u64> = picks.iter().map(|p| p * 4096).collect();
        let gathered = dev.gather(src.region.as_fd(), &offsets).map_err(|e| e.to_string())?;
        // The blocks' PMDs went with them; the rest of each block is still
        // the source's, page by page.
        for p in picks {
            let got = src.aged.call(&Request::Touch { slot: SLOT, offset: p * 4096 }, &[]);
            check(matches!(&got, Err((_, w)) if w == "SIGBUS"), || format!("source page {p} after gather: {got:?}"))?;
        }
        for p in [0u64, 4, 6, 511, 512, 599, 601, 1023] {
            src.aged
                .ok(&Request::Touch { slot: SLOT, offset: p * 4096 }, &[])
                .map_err(|e| format!("source page {p}: {e}"))?;
        }
        let fd: OwnedFd = gathered.into_fd();
        src.clean.ok(&Request::Bind { slot: SLOT, gpa: CLEAN_GPA }, &[fd.as_fd()])?;
        for (i, &want) in sums.iter().enumerate() {
            let got = vmbeam_selftests::pair::run(&mut src.clean, Program::Sum, i as u64 * 4096, 64, 64)?;
            check(got == want, || format!("gathered page {i} (source page {}): {got:#x} != {want:#x}", picks[i]))?;
        }
        src.finish();
        Ok(())
    });

    tap.finish();
}

/// Every page mapped, by a PMD, each 2 MiB block one aligned run of frames.
fn whole_blocks(frames: &[MappedFrame]) -> Result<(), String> {
    let pages = (BLOCK / 4096) as usize;
    for (b, block) in frames.chunks(pages).enumerate() {
        let base = block[0].pfn;
        let whole = base != 0 && base % pages as u64 == 0 && block.iter().all(|f| f.huge);
        let in_a_row = block.iter().enumerate().all(|(i, f)| f.pfn == base + i as u64);
        check(whole && in_a_row, || {
            format!("block {b}: first frame {base:#x}, {} of {pages} pages by PMD, in a row: {in_a_row}", {
                block.iter().filter(|f| f.huge).count()
            })
        })?;
    }
    Ok(())
}
