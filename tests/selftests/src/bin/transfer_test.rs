//! Region transfer between two KVM VMs in two VMM processes: the aged VM's
//! guest writes, the clean VM's guest reads the same bytes at its own
//! guest-physical address, the page frames are the same (zero copy), and
//! the aged side has lost every way in. Plus every error path, batch abort,
//! gather, racing and concurrent transfers, dead owners, and counters.

use std::{
    os::fd::{AsFd, OwnedFd},
    time::{Duration, Instant},
};

use vmbeam::{Device, Region, Transfer};
use vmbeam_selftests::{
    check,
    pair::{count, run, Pair, CLEAN_GPA, MIB, SLOT},
    require::{self, errno_is},
    vmm::{pfns, Program, Request, Vmm},
    Tap, TestResult,
};

fn main() {
    let dev = require::vmbeam_and_kvm();
    let mut tap = Tap::new(19);
    let stats0 = dev.stats().expect("stats");
    let tracing = enable_tracepoints();

    // --- the main path, in steps that each assert one thing ---
    let mut pair = Pair::new(16 * MIB, 64, 0x1234_5678).map_err(|e| panic!("set-up: {e}")).unwrap();
    let before = pfns(pair.aged.pid, pair.aged_hva, pair.size).unwrap_or_default();
    let mut clean_hva = 0;

    tap.test("batch_transfer_moves_ownership", || {
        dev.transfer_batch(&[pair.transfer()]).map_err(|e| e.to_string())?;
        let info = Region::from_fd(pair.region.try_clone().unwrap()).info().map_err(|e| e.to_string())?;
        check(info.owned && !info.moving && !info.mine, || format!("after transfer: {info:?}"))
    });

    tap.test("clean_guest_reads_what_aged_guest_wrote", || {
        let (hva, sum) = pair.clean_reads()?;
        clean_hva = hva;
        check(sum == pair.written, || format!("clean guest summed {sum:#x}, aged guest wrote {:#x}", pair.written))
    });

    tap.test("same_page_frames_before_and_after", || {
        let after = pfns(pair.clean.pid, clean_hva, pair.size)?;
        check(before.len() as u64 == pair.size / 4096 && before.iter().all(|&p| p != 0), || {
            format!(
                "aged mapping not fully present before: {} of {} pages",
                before.iter().filter(|&&p| p != 0).count(),
                before.len()
            )
        })?;
        let same = before.iter().zip(&after).filter(|(a, b)| a == b).count();
        check(same == before.len(), || {
            format!("{same} of {} PFNs equal; first: {:#x} vs {:#x}", before.len(), before[0], after[0])
        })
    });

    tap.test("bytes_copied_stays_zero_and_counters_follow", || {
        let st = dev.stats().map_err(|e| e.to_string())?;
        check(st.bytes_copied == 0, || format!("bytes_copied = {}", st.bytes_copied))?;
        check(st.transfers == stats0.transfers + 1, || format!("transfers {} -> {}", stats0.transfers, st.transfers))?;
        check(st.pages_transferred == stats0.pages_transferred + pair.size / 4096, || {
            format!("pages_transferred {}", st.pages_transferred)
        })?;
        check(st.revocations == stats0.revocations + 1, || format!("revocations {}", st.revocations))?;
        check(st.regions == stats0.regions + 1 && st.pages_owned == stats0.pages_owned + pair.size / 4096, || {
            format!("{st:?}")
        })
    });

    tap.test("old_owner_vmm_access_gets_sigbus", || {
        match pair.aged.call(&Request::Touch { slot: SLOT, offset: 4096 }, &[]) {
            Err((_, what)) if what == "SIGBUS" => Ok(()),
            other => Err(format!("aged VMM read of revoked memory: expected SIGBUS, got {other:?}")),
        }
    });

    tap.test("old_owner_kvm_run_fails_with_efault", || {
        match pair
            .aged
            .call(&Request::Run { slot: SLOT, program: Program::Sum, offset: 0, count: 16, stride: 4096 }, &[])
        {
            Err((errno, _)) if errno == libc::EFAULT => Ok(()),
            other => Err(format!("aged KVM_RUN over revoked memory: expected EFAULT, got {other:?}")),
        }
    });

    tap.test("old_owner_remap_is_eacces", || match pair.aged.call(&Request::Remap { slot: SLOT }, &[]) {
        Err((errno, _)) if errno == libc::EACCES => Ok(()),
        other => Err(format!("aged re-mmap: expected EACCES, got {other:?}")),
    });

    tap.test("transfer_back_with_single_ioctl", || {
        let back =
            Transfer { region: pair.region.as_fd(), from_vm: pair.clean_vm.as_fd(), to_vm: pair.aged_vm.as_fd() };
        dev.transfer(back).map_err(|e| e.to_string())?;
        // The owner again, it may map the region anew (its old mapping had
        // a page replaced by the SIGBUS probe above).
        let fd = pair.region.as_fd();
        pair.aged.ok(&Request::Attach { slot: SLOT + 1, gpa: CLEAN_GPA }, &[fd])?;
        let (sum, _) = pair.aged.ok(
            &Request::Run {
                slot: SLOT + 1,
                program: Program::Sum,
                offset: 0,
                count: count(pair.size, pair.stride),
                stride: pair.stride,
            },
            &[],
        )?;
        let sum = sum as u32;
        check(sum == pair.written, || {
            format!("aged guest summed {sum:#x} after the return, expected {:#x}", pair.written)
        })
    });
    pair.finish();

    tap.test("tracepoints_fire", || {
        let dir = tracing.clone()?;
        let trace = std::fs::read_to_string(format!("{dir}/trace")).map_err(|e| format!("read trace: {e}"))?;
        let _ = std::fs::write(format!("{dir}/events/vmbeam/enable"), "0");
        for event in ["transfer_start: regions=1", "transfer_done: regions=1", "revoke: region=", "fault: region="] {
            check(trace.contains(event), || {
                format!("no '{event}' in the trace:\n{}", trace.lines().rev().take(20).collect::<Vec<_>>().join("\n"))
            })?;
        }
        Ok(())
    });

    tap.test("bad_arguments_get_their_errno", || bad_arguments(&dev));
    tap.test("failed_batch_leaves_everything_with_old_owner", || failed_batch(&dev));
    tap.test("gather_moves_exactly_those_pages", || gather(&dev));
    tap.test("racing_transfers_one_wins", || racing(&dev));
    tap.test("two_pairs_transfer_concurrently", || concurrent(&dev));
    tap.test("dead_owner_leaves_region_bindable", || dead_owner(&dev));
    tap.test("kvm_run_in_flight_is_stopped_by_revoke", || in_flight(&dev));
    tap.test("sizes_one_page_to_1gib", || sizes(&dev));
    tap.test("vmm_killed_mid_migration_loses_nothing", || killed(&dev));
    tap.test("counters_return_to_zero", || {
        let st = dev.stats().map_err(|e| e.to_string())?;
        check(st.regions == 0 && st.pages_owned == 0 && st.bytes_copied == 0, || {
            format!("after all fds closed: {st:?}")
        })
    });
    tap.finish()
}

/// Enables the vmbeam:* tracepoints (mounting tracefs if needed); returns
/// the tracefs directory.
fn enable_tracepoints() -> Result<String, String> {
    let dir = "/sys/kernel/tracing";
    if !std::path::Path::new(&format!("{dir}/events")).exists() {
        let status = std::process::Command::new("mount").args(["-t", "tracefs", "nodev", dir]).status();
        check(matches!(status, Ok(s) if s.success()), || format!("mount tracefs: {status:?}"))?;
    }
    std::fs::write(format!("{dir}/trace"), "").map_err(|e| format!("clear trace: {e}"))?;
    std::fs::write(format!("{dir}/events/vmbeam/enable"), "1").map_err(|e| format!("enable vmbeam events: {e}"))?;
    Ok(dir.to_string())
}

fn bad_arguments(dev: &Device) -> TestResult {
    use nix::errno::Errno::*;
    errno_is("create size 0", dev.create_region(0), EINVAL)?;
    errno_is("create size 4097", dev.create_region(4097), EINVAL)?;
    errno_is("create 1 PiB", dev.create_region(1 << 50), ENOMEM)?;
    let pair = Pair::new(MIB, 4096, 7)?;
    let region = Region::from_fd(pair.region.try_clone().unwrap());
    let null = std::fs::File::open("/dev/null").unwrap();
    errno_is("bind /dev/null", region.bind(null.as_fd()), EINVAL)?;
    errno_is("bind a region fd as VM", region.bind(pair.region.as_fd()), EINVAL)?;
    errno_is("bind another process's VM", region.bind(pair.clean_vm.as_fd()), EPERM)?;
    let t = |r, f, to| Transfer { region: r, from_vm: f, to_vm: to };
    let (r, a, c) = (pair.region.as_fd(), pair.aged_vm.as_fd(), pair.clean_vm.as_fd());
    errno_is("transfer from a non-owner", dev.transfer(t(r, c, a)), EPERM)?;
    errno_is("transfer from == to", dev.transfer(t(r, a, a)), EINVAL)?;
    errno_is("transfer of /dev/null", dev.transfer(t(null.as_fd(), a, c)), EINVAL)?;
    errno_is("transfer to /dev/null", dev.transfer(t(r, a, null.as_fd())), EINVAL)?;
    // SAFETY: fd 999 is not open in this test; the module only looks it up.
    let closed = unsafe { std::os::fd::BorrowedFd::borrow_raw(999) };
    errno_is("transfer of a closed fd", dev.transfer(t(closed, a, c)), EBADF)?;
    errno_is("empty batch", dev.transfer_batch(&[]), EINVAL)?;
    let many = vec![t(r, a, c); vmbeam::uapi::VMBEAM_TRANSFER_BATCH_MAX as usize + 1];
    errno_is("batch over the limit", dev.transfer_batch(&many), EINVAL)?;
    errno_is("same region twice in a batch", dev.transfer_batch(&[t(r, a, c), t(r, a, c)]), EBUSY)?;
    errno_is("gather unaligned", dev.gather(r, &[100]), EINVAL)?;
    errno_is("gather out of range", dev.gather(r, &[MIB]), EINVAL)?;
    errno_is("gather repeated", dev.gather(r, &[4096, 4096]), EINVAL)?;
    errno_is("gather nothing", dev.gather(r, &[]), EINVAL)?;
    // After all that the region is still the aged VM's, intact.
    let info = region.info().map_err(|e| e.to_string())?;
    check(info.owned && !info.moving && info.pages_present == MIB / 4096, || format!("after bad calls: {info:?}"))?;
    let mut pair = pair;
    let sum = run(&mut pair.aged, Program::Sum, 0, count(MIB, 4096), 4096)?;
    check(sum == pair.written, || format!("aged data changed: {sum:#x} != {:#x}", pair.written))?;
    pair.finish();
    Ok(())
}

fn failed_batch(dev: &Device) -> TestResult {
    let mut one = Pair::new(2 * MIB, 256, 11)?;
    let two = Pair::new(2 * MIB, 256, 22)?;
    let null = std::fs::File::open("/dev/null").unwrap();
    let bad = Transfer { region: null.as_fd(), from_vm: one.aged_vm.as_fd(), to_vm: one.clean_vm.as_fd() };
    let got = dev.transfer_batch(&[one.transfer(), bad, two.transfer()]);
    errno_is("batch with a bad entry in the middle", got, nix::errno::Errno::EINVAL)?;
    for (name, p) in [("first", &one), ("last", &two)] {
        let info = Region::from_fd(p.region.try_clone().unwrap()).info().map_err(|e| e.to_string())?;
        check(info.owned && !info.moving, || format!("{name} region after abort: {info:?}"))?;
    }
    // Still mapped and intact on the aged side.
    let byte = one.aged.ok(&Request::Touch { slot: SLOT, offset: 0 }, &[])?;
    let sum = run(&mut one.aged, Program::Sum, 0, count(one.size, one.stride), one.stride)?;
    check(sum == one.written, || format!("aged data after abort: {sum:#x} != {:#x} (touch {byte:?})", one.written))?;
    // And the same batch without the bad entry goes through.
    dev.transfer_batch(&[one.transfer(), two.transfer()]).map_err(|e| e.to_string())?;
    let (_, sum) = one.clean_reads()?;
    check(sum == one.written, || format!("clean read {sum:#x} != {:#x}", one.written))?;
    one.finish();
    two.finish();
    Ok(())
}

fn gather(dev: &Device) -> TestResult {
    let mut src = Pair::new(MIB, 4, 33)?; // every dword written
    let picks = [5u64, 2, 9, 255];
    let page_sums: Vec<u32> =
        picks.iter().map(|&p| run(&mut src.aged, Program::Sum, p * 4096, 1024, 4)).collect::<Result<_, _>>()?;
    let src_pfns = pfns(src.aged.pid, src.aged_hva, src.size)?;
    let offsets: Vec<u64> = picks.iter().map(|p| p * 4096).collect();
    let gathered = dev.gather(src.region.as_fd(), &offsets).map_err(|e| e.to_string())?;
    let info = gathered.info().map_err(|e| e.to_string())?;
    check(info.size == 4 * 4096 && info.pages_present == 4 && !info.owned, || format!("gathered: {info:?}"))?;
    let src_info = Region::from_fd(src.region.try_clone().unwrap()).info().map_err(|e| e.to_string())?;
    check(src_info.pages_present == 256 - 4, || format!("source: {src_info:?}"))?;
    // The source lost exactly those pages.
    for &p in &picks {
        match src.aged.call(&Request::Touch { slot: SLOT, offset: p * 4096 }, &[]) {
            Err((_, w)) if w == "SIGBUS" => {}
            other => return Err(format!("source page {p} after gather: expected SIGBUS, got {other:?}")),
        }
    }
    for p in [0u64, 3, 4, 6, 254] {
        src.aged
            .ok(&Request::Touch { slot: SLOT, offset: p * 4096 }, &[])
            .map_err(|e| format!("source page {p}: {e}"))?;
    }
    // The clean VM binds the gathered region: same data, same frames.
    let fd: OwnedFd = gathered.into_fd();
    let (hva, _) = src.clean.ok(&Request::Bind { slot: SLOT, gpa: CLEAN_GPA }, &[fd.as_fd()])?;
    for (i, &want) in page_sums.iter().enumerate() {
        let got = run(&mut src.clean, Program::Sum, i as u64 * 4096, 1024, 4)?;
        check(got == want, || format!("gathered page {i} (source page {}): sum {got:#x} != {want:#x}", picks[i]))?;
    }
    let dst_pfns = pfns(src.clean.pid, hva, 4 * 4096)?;
    for (i, &p) in picks.iter().enumerate() {
        check(dst_pfns[i] == src_pfns[p as usize], || {
            format!("page {p}: PFN {:#x} became {:#x}", src_pfns[p as usize], dst_pfns[i])
        })?;
    }
    src.finish();
    Ok(())
}

fn racing(dev: &Device) -> TestResult {
    let pair = Pair::new(MIB, 4096, 44)?;
    let (third_vmm, third_vm) = {
        let mut v = Vmm::spawn();
        let (_, fd) = v.ok(&Request::CreateVm, &[])?;
        (v, fd.ok_or("no VM fd")?)
    };
    let to_clean = pair.transfer();
    let to_third = Transfer { to_vm: third_vm.as_fd(), ..to_clean };
    let results: Vec<_> = std::thread::scope(|s| {
        let a = s.spawn(|| dev.transfer(to_clean));
        let b = s.spawn(|| dev.transfer(to_third));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let loser = results.iter().find_map(|r| r.as_ref().err().and_then(vmbeam::Error::errno));
    third_vmm.quit();
    pair.finish();
    // In flight the loser sees the region moving (EBUSY); if the winner had
    // already finished, it sees that it no longer names the owner (EPERM).
    check(wins == 1 && matches!(loser, Some(nix::errno::Errno::EBUSY | nix::errno::Errno::EPERM)), || {
        format!("expected one success and one EBUSY/EPERM, got {results:?}")
    })
}

fn concurrent(dev: &Device) -> TestResult {
    let mut pairs = [Pair::new(4 * MIB, 512, 55)?, Pair::new(4 * MIB, 512, 66)?];
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = pairs.iter().map(|p| s.spawn(|| dev.transfer_batch(&[p.transfer()]))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    check(results.iter().all(Result::is_ok), || format!("{results:?}"))?;
    for p in pairs.iter_mut() {
        let (_, sum) = p.clean_reads()?;
        check(sum == p.written, || format!("clean read {sum:#x} != {:#x}", p.written))?;
    }
    pairs.into_iter().for_each(Pair::finish);
    Ok(())
}

fn dead_owner(dev: &Device) -> TestResult {
    let Pair { aged, mut clean, region, written, size, stride, .. } = Pair::new(MIB, 1024, 77)?;
    let status = aged.kill();
    let info = Region::from_fd(region.try_clone().unwrap()).info().map_err(|e| e.to_string())?;
    check(!info.owned, || format!("owner killed ({status:?}) but region says {info:?}"))?;
    clean.ok(&Request::Bind { slot: SLOT, gpa: CLEAN_GPA }, &[region.as_fd()])?;
    let sum = run(&mut clean, Program::Sum, 0, count(size, stride), stride)?;
    check(sum == written, || format!("after rebinding: {sum:#x} != {written:#x}"))?;
    let _ = dev;
    clean.quit();
    Ok(())
}

fn in_flight(dev: &Device) -> TestResult {
    let mut pair = Pair::new(MIB, 4096, 88)?;
    // The aged guest spins over its memory (stride 0: one address, ~forever).
    pair.aged.start(&Request::Run { slot: SLOT, program: Program::Sum, offset: 0, count: u32::MAX, stride: 0 })?;
    std::thread::sleep(Duration::from_millis(300));
    dev.transfer(pair.transfer()).map_err(|e| e.to_string())?;
    let got = pair.aged.wait(Duration::from_secs(120));
    let (_, sum) = pair.clean_reads()?;
    let result = match got {
        Some(Err((errno, _))) if errno == libc::EFAULT => Ok(()),
        other => Err(format!("running aged guest after revoke: expected KVM_RUN EFAULT, got {other:?}")),
    };
    check(sum == pair.written, || format!("clean read {sum:#x} != {:#x}", pair.written))?;
    pair.finish();
    result
}

fn sizes(dev: &Device) -> TestResult {
    for size in [4096, 2 * MIB, 64 * MIB, 1024 * MIB] {
        // Every page up to 64 MiB; every 16th of the GiB (16,384 per side):
        // under TCG each first touch is a stage-2 fault of ~80 us, and all
        // 262,144 pages took 42 s of make test. The whole GiB still moves:
        // the pages present before and after are compared.
        let stride = if size < 1024 * MIB { 4096 } else { 16 * 4096 };
        let mut pair = Pair::new(size, stride, size as u32 ^ 0x5a5a)?;
        let region = Region::from_fd(pair.region.try_clone().map_err(|e| e.to_string())?);
        let before = region.info().map_err(|e| e.to_string())?.pages_present;
        let start = Instant::now();
        dev.transfer_batch(&[pair.transfer()]).map_err(|e| format!("{size}: {e}"))?;
        let took = start.elapsed();
        let (_, sum) = pair.clean_reads()?;
        check(sum == pair.written, || format!("{} MiB: {sum:#x} != {:#x}", size / MIB, pair.written))?;
        let after = region.info().map_err(|e| e.to_string())?;
        check(after.owned && after.pages_present == before && before >= count(size, stride) as u64, || {
            format!("{} MiB: {before} pages present before the transfer, after: {after:?}", size / MIB)
        })?;
        if size == 1024 * MIB {
            // A figure for the record, not an assertion (make bench sets it
            // beside memcpy and the peers).
            println!("# 1 GiB: transfer {:.1} ms", took.as_secs_f64() * 1e3);
        }
        pair.finish();
    }
    Ok(())
}

fn killed(dev: &Device) -> TestResult {
    // The clean VMM dies after the transfer, before mapping: the region is
    // ownerless, its pages intact, and the aged VMM can take it back.
    let mut pair = Pair::new(2 * MIB, 512, 99)?;
    dev.transfer(pair.transfer()).map_err(|e| e.to_string())?;
    let Pair { aged, clean, region, written, size, stride, .. } = pair;
    clean.kill();
    let info = Region::from_fd(region.try_clone().unwrap()).info().map_err(|e| e.to_string())?;
    check(!info.owned && info.pages_present == size / 4096, || format!("after the clean VMM died: {info:?}"))?;
    pair = Pair {
        aged,
        clean: Vmm::spawn(),
        region,
        written,
        size,
        stride,
        aged_vm: pair.aged_vm,
        clean_vm: pair.clean_vm,
        aged_hva: 0,
    };
    pair.aged.ok(&Request::Bind { slot: SLOT + 1, gpa: CLEAN_GPA }, &[pair.region.as_fd()])?;
    let (v, _) = pair.aged.ok(
        &Request::Run { slot: SLOT + 1, program: Program::Sum, offset: 0, count: count(size, stride), stride },
        &[],
    )?;
    check(v as u32 == written, || format!("aged took it back: {:#x} != {written:#x}", v as u32))?;
    pair.finish();
    Ok(())
}
