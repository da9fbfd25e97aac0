//! 1 GiB regions (`VMBEAM_CREATE_HUGE_1G`): a GiB of physically contiguous
//! memory from `alloc_contig_range()`, mapped by one PUD at a 1 GiB-aligned
//! address, and so by KVM with one 1 GiB stage-2 entry. The aged guest
//! fills the GiB; after the move the new owner's guest reads all of it at
//! the cost of one stage-2 fault, on the very frames the old owner mapped
//! (nothing copied), and the old owner is refused. A gather of one page
//! out of the GiB leaves the rest to its owner by PMD and PTE.

use std::os::fd::{AsFd, OwnedFd};

use vmbeam::{Blocks, MappedFrame, Region};

use vmbeam_selftests::{
    check,
    pair::{count, run, Pair, CLEAN_GPA, SLOT},
    require,
    vmm::{Program, Request},
    Tap,
};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
const PAGES: u64 = GIB / PAGE;

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(7);
    let mut pair = match Pair::with_pages(GIB, PAGE as u32, 0x1619_0001, Blocks::Huge1G) {
        Ok(p) => p,
        Err(e) => Tap::skip_all(&format!("set-up: {e}")),
    };
    let stats0 = dev.stats().expect("stats");
    let region = Region::from_fd(pair.region.try_clone().expect("dup the region fd"));

    let mut aged_frames = Vec::new();
    tap.test("a_1gib_region_is_one_aligned_gib_mapped_by_one_pud", || {
        let info = region.info().map_err(|e| e.to_string())?;
        check(info.huge && info.huge_1g, || format!("region info {info:?}: not a 1 GiB-block region"))?;
        check(pair.aged_hva % GIB == 0, || format!("the aged mapping at {:#x} is not 1 GiB aligned", pair.aged_hva))?;
        aged_frames = region.mapped_frames(0, PAGES).map_err(|e| e.to_string())?;
        one_gib_by_pud(&aged_frames)
    });

    tap.test("kvm_maps_the_aged_guests_gib_with_one_1gib_entry", || {
        let entries = pair.aged.kvm_stat("pages_1g", false)?;
        println!("# aged VM: {entries} 1 GiB stage-2 entries after its guest filled the GiB");
        check(entries == 1, || format!("{entries} 1 GiB stage-2 entries in the aged VM, expected 1"))
    });

    tap.test("a_new_owner_guest_reads_the_gib_after_one_stage2_fault", || {
        dev.transfer_batch(&[pair.transfer()]).map_err(|e| e.to_string())?;
        pair.clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[pair.region.as_fd()])?;
        // A first read of one page maps the guest's code and the GiB.
        let faults0 = pair.clean.kvm_stat("pf_taken", true)?;
        run(&mut pair.clean, Program::Sum, 0, 1, PAGE as u32)?;
        let faults1 = pair.clean.kvm_stat("pf_taken", true)?;
        let sum = run(&mut pair.clean, Program::Sum, 0, count(GIB, PAGE as u32), PAGE as u32)?;
        let faults2 = pair.clean.kvm_stat("pf_taken", true)?;
        let entries = pair.clean.kvm_stat("pages_1g", false)?;
        println!(
            "# first page: {} stage-2 faults (code + the GiB); the other {} pages: {}; {entries} 1 GiB entries",
            faults1 - faults0,
            PAGES - 1,
            faults2 - faults1
        );
        check(sum == pair.written, || format!("clean guest summed {sum:#x}, aged wrote {:#x}", pair.written))?;
        check(faults2 == faults1 && entries == 1, || {
            format!(
                "{} stage-2 faults reading the GiB after its first page, {entries} 1 GiB entries",
                faults2 - faults1
            )
        })
    });

    tap.test("the_new_owner_maps_the_old_owners_frames_by_pud_nothing_copied", || {
        let clean = region.mapped_frames(0, PAGES).map_err(|e| e.to_string())?;
        one_gib_by_pud(&clean)?;
        check(clean.first().map(|f| f.pfn) == aged_frames.first().map(|f| f.pfn), || {
            format!("the new owner maps pfn {:#x}, the old owner mapped {:#x}", clean[0].pfn, aged_frames[0].pfn)
        })?;
        let stats = dev.stats().map_err(|e| e.to_string())?;
        let moved = stats.pages_transferred - stats0.pages_transferred;
        check(stats.bytes_copied == stats0.bytes_copied && moved == PAGES, || {
            format!("{moved} pages transferred, {} bytes copied", stats.bytes_copied - stats0.bytes_copied)
        })
    });

    tap.test("the_old_owner_is_refused", || {
        let touched = pair.aged.call(&Request::Touch { slot: SLOT, offset: 4096 }, &[]);
        check(matches!(touched, Err((libc::EFAULT, _))), || format!("the aged VMM read after the move: {touched:?}"))
    });

    tap.test("a_gather_of_one_page_leaves_the_rest_of_the_gib_by_pmd_and_pte", || {
        let pick = 5u64;
        let want = run(&mut pair.clean, Program::Sum, pick * PAGE, 64, 64)?;
        let gathered = dev.gather(pair.region.as_fd(), &[pick * PAGE]).map_err(|e| e.to_string())?;
        let got = pair.clean.call(&Request::Touch { slot: SLOT, offset: pick * PAGE }, &[]);
        check(matches!(&got, Err((_, w)) if w == "SIGBUS"), || format!("page {pick} after the gather: {got:?}"))?;
        // The rest is still the owner's: its guest reads it all again.
        let rest = run(&mut pair.clean, Program::Sum, (pick + 1) * PAGE, count(GIB - (pick + 1) * PAGE, 64), 64)?;
        let frames = region.mapped_frames(0, PAGES).map_err(|e| e.to_string())?;
        let by_pud = frames.iter().filter(|f| f.huge_1g).count();
        let by_pmd = frames[512..].iter().filter(|f| f.huge && !f.huge_1g).count();
        println!(
            "# after the gather: {by_pud} pages by PUD, {by_pmd} of the other 511 blocks' by PMD; rest sums {rest:#x}"
        );
        check(by_pud == 0 && by_pmd == frames.len() - 512, || {
            format!("{by_pud} pages still by PUD, {by_pmd} of {} by PMD after a gather", frames.len() - 512)
        })?;
        let fd: OwnedFd = gathered.into_fd();
        let mut reader = vmbeam_selftests::vmm::Vmm::spawn();
        reader.ok(&Request::CreateVm, &[])?;
        reader.ok(&Request::Bind { slot: SLOT, gpa: CLEAN_GPA }, &[fd.as_fd()])?;
        let moved = run(&mut reader, Program::Sum, 0, 64, 64)?;
        reader.quit();
        check(moved == want, || format!("the gathered page sums {moved:#x}, it held {want:#x}"))
    });

    let first_frame = aged_frames.first().map_or(0, |f| f.pfn);
    pair.finish();

    // The harness loads the module with gigantic_pool=2: the GiB above came
    // from the pool and the gather broke it up; the next region takes the
    // pool's other GiB, gives it back whole when it goes, and the one after
    // it gets that GiB again, zeroed.
    tap.test("a_freed_gib_goes_back_to_the_pool_and_out_again_zeroed", || {
        let pool = std::fs::read_to_string("/sys/module/vmbeam/parameters/gigantic_pool").map_err(|e| e.to_string())?;
        if pool.trim() == "0" {
            println!("# no pool (gigantic_pool=0): each GiB is sought");
        }
        let mut again = Pair::with_pages(GIB, PAGE as u32, 0x1619_0002, Blocks::Huge1G)?;
        let region = Region::from_fd(again.region.try_clone().map_err(|e| e.to_string())?);
        let frames = region.mapped_frames(0, PAGES).map_err(|e| e.to_string())?;
        let result = one_gib_by_pud(&frames);
        // Every dword of its last page written, for the zeroing check below.
        run(&mut again.aged, Program::Fill { seed: 0x1619_0004 }, GIB - PAGE, 1024, 4)?;
        println!(
            "# gigantic_pool={}: the first GiB at pfn {first_frame:#x}, this one at {:#x}",
            pool.trim(),
            frames[0].pfn
        );
        drop(region); // the region's last fd: its GiB goes back now
        again.finish();
        result?;
        let mut third = Pair::with_pages(GIB, PAGE as u32, 0x1619_0003, Blocks::Huge1G)?;
        let region = Region::from_fd(third.region.try_clone().map_err(|e| e.to_string())?);
        let reused = region.mapped_frames(0, 1).map_err(|e| e.to_string())?[0].pfn;
        // Zeroed on the way out: what the last region wrote past the first
        // dword of its last page (this one's guest wrote only that dword).
        let stray = run(&mut third.aged, Program::Sum, GIB - PAGE + 4, 1023, 4)?;
        third.finish();
        check(pool.trim() == "0" || reused == frames[0].pfn, || {
            format!("a GiB back in the pool at {:#x}, the next region got {reused:#x}", frames[0].pfn)
        })?;
        check(stray == 0, || format!("a page of a reused GiB held {stray:#x}"))
    });
    tap.finish();
}

/// Every page mapped by a PUD, the GiB one aligned run of frames.
fn one_gib_by_pud(frames: &[MappedFrame]) -> Result<(), String> {
    let base = frames.first().map_or(0, |f| f.pfn);
    let by_pud = frames.iter().filter(|f| f.huge && f.huge_1g).count();
    let in_a_row = frames.iter().enumerate().all(|(i, f)| f.pfn == base + i as u64);
    check(base != 0 && base & (PAGES - 1) == 0 && by_pud == frames.len() && in_a_row, || {
        format!("first frame {base:#x}, {by_pud} of {} pages by PUD, in a row: {in_a_row}", frames.len())
    })
}
