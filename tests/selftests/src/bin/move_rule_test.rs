//! The rule for faults and mmaps around a transfer (uAPI 3, see struct
//! vmbeam_transfer in the header):
//!
//! - a refused transfer is invisible: while batches whose later entry is
//!   bad (every kind of bad) are refused over and over, the owner's VMM and
//!   its guest fault the region's pages afresh and not one fault fails, not
//!   one mmap is refused;
//! - a fault or mmap that meets a transfer that goes through waits for it:
//!   with the region moving back and forth between two VMs while both
//!   VMMs fault it afresh, every read returns what the guest wrote (never
//!   another page, never a zero page), and whoever owns it at the end
//!   reads all of it.

use std::{
    os::fd::{AsFd, BorrowedFd},
    time::Duration,
};

use nix::errno::Errno;
use vmbeam::{Device, Region, Transfer};
use vmbeam_selftests::{
    check,
    pair::{count, run, Pair, CLEAN_GPA, SLOT},
    require,
    vmm::{Program, Request},
    Tap, TestResult,
};

/// How long each churn runs: long enough for thousands of refused batches.
const CHURN_MS: u64 = 1500;

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(3);
    tap.test("refused_batches_are_invisible_to_vmm_faults", || refused_batches(&dev, false));
    tap.test("refused_batches_are_invisible_to_guest_faults", || refused_batches(&dev, true));
    tap.test("faults_meeting_real_moves_wait_and_read_the_right_data", || real_moves(&dev));
    tap.finish()
}

/// A fd number that is not open in this process.
fn closed_fd() -> BorrowedFd<'static> {
    let fd = 1000;
    assert!(nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err(), "fd {fd} is open");
    // SAFETY: only ever passed to the module as a number, which looks it up
    // (and finds nothing); never used as a fd here.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// While `p`'s VMM (or its guest) churns the region, batches of `p`'s good
/// transfer followed by a bad entry are refused again and again.
fn refused_batches(dev: &Device, guest: bool) -> TestResult {
    let mut p = Pair::new(256 * 1024, 4, 0x5eed)?;
    let other = Pair::new(64 * 1024, 4, 0xfeed)?;
    let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
    p.aged.ok(&Request::Snapshot { slot: SLOT }, &[])?;
    p.aged.start(&Request::Churn { slot: SLOT, millis: CHURN_MS, guest, revocable: false })?;

    let good = Transfer { region: p.region.as_fd(), from_vm: p.aged_vm.as_fd(), to_vm: p.clean_vm.as_fd() };
    let kinds: [(&str, Transfer<'_>, Errno); 4] = [
        ("a closed fd", Transfer { region: closed_fd(), ..good }, Errno::EBADF),
        ("a non-region fd", Transfer { region: null.as_fd(), ..good }, Errno::EINVAL),
        ("another VM's region", Transfer { region: other.region.as_fd(), ..good }, Errno::EPERM),
        ("the same region twice", good, Errno::EBUSY),
    ];
    let mut refused = 0u64;
    let reply = loop {
        for (what, bad, want) in &kinds {
            let got = dev.transfer_batch(&[good, *bad]);
            require::errno_is(&format!("batch ending in {what}"), got, *want)?;
            refused += 1;
        }
        if let Some(reply) = p.aged.wait(Duration::from_millis(1)) {
            break reply;
        }
    };
    let rounds = reply.map_err(|(errno, what)| {
        format!("after {refused} refused batches the owner's {} faults failed (errno {errno}): {what}", side(guest))
    })?;
    check(rounds > 0 && refused >= 4, || format!("{rounds} churn rounds, {refused} refused batches"))?;
    let info = Region::from_fd(p.region.try_clone().map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    check(info.owned && !info.mine && !info.moving, || format!("region after the refusals: {info:?}"))?;
    let sum = run(&mut p.aged, Program::Sum, 0, count(p.size, p.stride), p.stride)?;
    check(sum == p.written, || format!("aged guest sums {sum:#x}, wrote {:#x}", p.written))?;
    tap_note(&format!("{refused} refused batches, {rounds} clean {} rounds", side(guest)));
    p.finish();
    other.finish();
    Ok(())
}

fn side(guest: bool) -> &'static str {
    if guest {
        "guest"
    } else {
        "VMM"
    }
}

fn tap_note(line: &str) {
    println!("# {line}");
}

/// The region moves aged -> clean -> aged ... while both VMMs fault it
/// afresh (the aged one from its own thread, the clean one from its
/// guest): reads may fail (the region is not theirs at that moment) but
/// never return wrong data; the final owner (aged) reads everything.
fn real_moves(dev: &Device) -> TestResult {
    let mut p = Pair::new(256 * 1024, 4, 0xabcd)?;
    p.aged.ok(&Request::Snapshot { slot: SLOT }, &[])?;
    // The clean VMM needs its own slot on the region: it takes the region
    // once, maps and snapshots it, and gives it back.
    dev.transfer(p.transfer()).map_err(|e| e.to_string())?;
    p.clean.ok(&Request::Attach { slot: SLOT, gpa: CLEAN_GPA }, &[p.region.as_fd()])?;
    p.clean.ok(&Request::Snapshot { slot: SLOT }, &[])?;
    let back = Transfer { region: p.region.as_fd(), from_vm: p.clean_vm.as_fd(), to_vm: p.aged_vm.as_fd() };
    dev.transfer(back).map_err(|e| e.to_string())?;

    let churn = |guest| Request::Churn { slot: SLOT, millis: CHURN_MS, guest, revocable: true };
    p.aged.start(&churn(false))?;
    p.clean.start(&churn(true))?;
    // Move until both churns have ended and the region is back with aged.
    let (mut moves, mut aged, mut clean) = (0usize, None, None);
    while aged.is_none() || clean.is_none() || moves % 2 == 1 {
        let t = if moves % 2 == 0 { p.transfer() } else { back };
        dev.transfer(t).map_err(|e| format!("move {moves}: {e}"))?;
        moves += 1;
        aged = aged.or_else(|| p.aged.wait(Duration::from_millis(1)));
        clean = clean.or_else(|| p.clean.wait(Duration::from_millis(1)));
    }
    let whole = |reply: Option<Result<u64, (i32, String)>>, who: &str| {
        reply.unwrap_or(Ok(0)).map_err(|(e, w)| format!("{who} read wrong data (errno {e}): {w}"))
    };
    let aged_rounds = whole(aged, "aged VMM")?;
    let clean_rounds = whole(clean, "clean guest")?;
    tap_note(&format!("{moves} moves: aged VMM {aged_rounds} whole rounds, clean guest {clean_rounds} whole rounds"));
    // The final owner maps afresh and its guest reads everything.
    p.aged.ok(&Request::Attach { slot: SLOT + 1, gpa: CLEAN_GPA }, &[p.region.as_fd()])?;
    let (sum, _) = p.aged.ok(
        &Request::Run {
            slot: SLOT + 1,
            program: Program::Sum,
            offset: 0,
            count: count(p.size, p.stride),
            stride: p.stride,
        },
        &[],
    )?;
    check(sum as u32 == p.written, || format!("aged guest sums {sum:#x} at the end, wrote {:#x}", p.written))?;
    p.finish();
    Ok(())
}
