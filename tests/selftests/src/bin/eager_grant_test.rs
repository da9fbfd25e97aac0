//! The eager grant at KVM's level: a new owner's VMM maps a region it was
//! just given into its VM's stage-2 tables from the host
//! (`KVM_PRE_FAULT_MEMORY`, 6.10), so its guest's first touch of every page
//! is not a VM exit. Counted by KVM's own statistics: the vCPU's
//! `pf_taken` (stage-2 faults it exited for) and the VM's `pages_4k` /
//! `pages_2m` (stage-2 entries by size). Without the pre-fault, the same
//! read takes one fault per 4 KiB page (per 2 MiB block for a huge
//! region): the control that shows the counter counts. A revoked owner
//! cannot pre-fault the region (`EFAULT`), and that costs the new owner
//! nothing. `make bench` has the time it saves ("KVM pre-fault" rows).

use vmbeam::Blocks;
use vmbeam_selftests::{
    check,
    pair::{count, run, Pair, CLEAN_GPA, MIB, SLOT},
    require,
    vmm::{Program, Request},
    Tap, TestResult,
};

const SIZE: u64 = 16 * MIB;
const PAGE: u64 = 4096;
const BLOCK: u64 = 2 * MIB;

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(5);
    for (huge, pages) in [(Blocks::Page, "4k"), (Blocks::Huge2M, "2m")] {
        for (eager, name, seed) in [
            (true, "a_pre_faulted_new_owner_takes_no_stage2_fault", 0xea6e_0001),
            (false, "without_it_each_first_touch_is_a_stage2_fault", 0xea6e_0002),
        ] {
            tap.test(&format!("{name}_{pages}"), || {
                let mut pair = Pair::with_pages(SIZE, PAGE as u32, seed, huge)?;
                dev.transfer_batch(&[pair.transfer()]).map_err(|e| e.to_string())?;
                let result = take_over(&mut pair, eager, huge);
                pair.finish();
                result
            });
        }
    }
    tap.test("a_revoked_owner_cannot_pre_fault_and_the_new_owner_loses_nothing", || {
        let mut pair = Pair::with_pages(SIZE, PAGE as u32, 0xea6e_0003, Blocks::Page)?;
        dev.transfer_batch(&[pair.transfer()]).map_err(|e| e.to_string())?;
        let refused = pair.aged.call(&Request::PreFault { slot: SLOT }, &[]);
        let result = check(matches!(refused, Err((libc::EFAULT, _))), || {
            format!("the aged VMM pre-faulted a region it lost: {refused:?} (expected EFAULT)")
        })
        .and_then(|()| take_over(&mut pair, true, Blocks::Page));
        pair.finish();
        result
    });
    tap.finish();
}

/// The clean VMM maps the region it was given, pre-faults it if `eager`,
/// and its guest sums every page while KVM counts the vCPU's stage-2
/// faults: none when eager, one per page (per block when `huge`) when not.
fn take_over(pair: &mut Pair, eager: bool, blocks: Blocks) -> TestResult {
    let huge = blocks != Blocks::Page;
    pair.clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[std::os::fd::AsFd::as_fd(&pair.region)])?;
    // A first run over the region's first page maps the guest's code page
    // (and that page), so the count below is the rest of the region's.
    run(&mut pair.clean, Program::Sum, 0, 1, PAGE as u32)?;
    if eager {
        pair.clean.ok(&Request::PreFault { slot: SLOT }, &[])?;
        let (stat, entries) = if huge { ("pages_2m", SIZE / BLOCK) } else { ("pages_4k", SIZE / PAGE) };
        let mapped = pair.clean.kvm_stat(stat, false)?;
        println!("# pre-faulted: {mapped} stage-2 entries counted in {stat}, {entries} for the region");
        check(mapped >= entries, || format!("{stat} {mapped} after the pre-fault, the region needs {entries}"))?;
    }
    let faults0 = pair.clean.kvm_stat("pf_taken", true)?;
    let sum = run(&mut pair.clean, Program::Sum, 0, count(SIZE, PAGE as u32), PAGE as u32)?;
    let faults = pair.clean.kvm_stat("pf_taken", true)? - faults0;
    check(sum == pair.written, || format!("clean guest summed {sum:#x}, aged wrote {:#x}", pair.written))?;
    let expected = match (eager, huge) {
        (true, _) => 0,
        (false, false) => SIZE / PAGE - 1,
        (false, true) => SIZE / BLOCK - 1,
    };
    println!("# the guest read {} pages taking {faults} stage-2 faults (expected {expected})", SIZE / PAGE);
    // Lazily, a fault KVM had to retry (an invalidation racing it) counts
    // twice: a little slack above, none below, none at all when eager.
    let slack = if eager { 0 } else { expected / 8 + 2 };
    check((expected..=expected + slack).contains(&faults), || {
        format!("{faults} stage-2 faults reading {} pages, expected {expected}", SIZE / PAGE)
    })
}
