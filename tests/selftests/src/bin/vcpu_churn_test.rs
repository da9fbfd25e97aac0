//! Does a running vCPU survive what the lab L1 does around it, with no
//! vmbeam in the picture? Two vCPU threads of one KVM VM sum anonymous
//! memory again and again, each checking every result, while the main
//! thread adds and removes memslots of the same VM (what receiving and
//! forgetting L2s does) and kicks the vCPUs out of KVM_RUN with a signal
//! (what pausing does).
//!
//! Under TCG's emulated SVM a vCPU here sometimes leaves KVM_RUN with a
//! wild rip (an MMIO exit at a data value, a shutdown, an emulation
//! failure) though nothing touched its memory or registers: the lab L2
//! failures `make stress` sees are this, not vmbeam. The test reports it as
//! a TAP skip with the count (an environment fault, not ours), and fails
//! only if a sum is wrong while the vCPU looked healthy, which would be
//! memory corruption.
//!
//!   vcpu_churn_test [--seconds S] [--region | --memfd | --no-thp] [--zap-slot-only]
//!
//! `--region` backs the summed memory by a vmbeam region (as the lab's L2
//! windows are) instead of anonymous memory; `--memfd` by a shmem memfd
//! (4 KiB pages, as a region's, and no vmbeam); `--no-thp` asks for 4 KiB
//! anonymous pages. `--zap-slot-only` disables KVM_X86_QUIRK_SLOT_ZAP_ALL,
//! as the lab L1 does.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use kvm_ioctls::{Kvm, VcpuExit};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use vmbeam_lab::{kvm_util, probe};
use vmbeam_selftests::{check, guest::programs, Tap};

const CODE_GPA: u64 = 0x1000;
const DATA_GPA: u64 = 0x100_0000;
const DATA_BYTES: usize = 8 << 20;
const CHURN_GPA: u64 = 0x4000_0000;
const PORT: u16 = 0x10;

fn anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping, alive for the process.
    unsafe {
        mmap_anonymous(
            None,
            len.try_into().expect("len"),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    }
    .expect("mmap")
    .as_ptr()
    .cast()
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        Tap::skip_all("no /dev/kvm");
    }
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.windows(2).find(|w| w[0] == "--seconds").and_then(|w| w[1].parse().ok()).unwrap_or(20);
    probe::install_handlers().expect("signal handlers");
    let mut tap = Tap::new(1);
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    if args.iter().any(|a| a == "--zap-slot-only") {
        assert!(kvm_util::zap_only_deleted_slots(&vm), "cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL");
    }
    let code = anon(4096);
    // SAFETY: SUM fits the fresh code page.
    unsafe { std::ptr::copy_nonoverlapping(programs::SUM.as_ptr(), code, programs::SUM.len()) };
    let _region; // keeps the region alive
    let data = if args.iter().any(|a| a == "--region") {
        let dev = vmbeam::Device::open().expect("/dev/vmbeam");
        let region = dev.create_region(DATA_BYTES as u64).expect("region");
        // SAFETY: the VM fd outlives the borrow.
        let vm_fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(std::os::fd::AsRawFd::as_raw_fd(&*vm)) };
        region.bind(vm_fd).expect("bind");
        // SAFETY: a shared mapping of our own region, alive for the process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                DATA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&region)),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap region");
        _region = Some(region);
        p.cast::<u8>()
    } else if args.iter().any(|a| a == "--memfd") {
        _region = None;
        // SAFETY: plain syscalls; the shared shmem mapping (4 KiB pages)
        // lives as long as the process.
        unsafe {
            let fd = libc::memfd_create(c"churn".as_ptr(), 0);
            assert!(fd >= 0 && libc::ftruncate(fd, DATA_BYTES as i64) == 0, "memfd");
            let p = libc::mmap(
                std::ptr::null_mut(),
                DATA_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap memfd");
            p.cast::<u8>()
        }
    } else {
        _region = None;
        let p = anon(DATA_BYTES);
        if args.iter().any(|a| a == "--no-thp") {
            // SAFETY: advice on our own fresh mapping.
            unsafe { libc::madvise(p.cast(), DATA_BYTES, libc::MADV_NOHUGEPAGE) };
        }
        p
    };
    for i in 0..DATA_BYTES / 4 {
        // SAFETY: inside the data mapping.
        unsafe { data.cast::<u32>().add(i).write((i as u32).wrapping_mul(0x9e37_79b9)) };
    }
    // SAFETY: both mappings live as long as the process.
    unsafe {
        kvm_util::set_memslot(&vm, 0, CODE_GPA, code as u64, 4096).expect("code slot");
        kvm_util::set_memslot(&vm, 1, DATA_GPA, data as u64, DATA_BYTES as u64).expect("data slot");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (wild, wrong, rounds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stripe = DATA_BYTES / 2;
    let threads: Vec<_> = (0..2u64)
        .map(|id| {
            let vcpu = vm.create_vcpu(id).expect("KVM_CREATE_VCPU");
            kvm_util::set_flat_protected_mode(&vcpu).expect("sregs");
            let base = data as usize + id as usize * stripe;
            let want = (0..stripe / 4).fold(0u32, |s, i| {
                // SAFETY: inside the data mapping.
                s.wrapping_add(unsafe { (base as *const u32).add(i).read() })
            });
            let (stop, wild, wrong, rounds) = (stop.clone(), wild.clone(), wrong.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut vcpu = vcpu;
                let gpa = DATA_GPA + id * stripe as u64;
                let mut first_wild = None;
                while !stop.load(Relaxed) {
                    let mut r = vcpu.get_regs().expect("regs");
                    [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi] = [0, 0, (stripe / 4) as u64, 0, 4, gpa];
                    (r.rip, r.rflags) = (CODE_GPA, 2);
                    vcpu.set_regs(&r).expect("set regs");
                    loop {
                        match vcpu.run() {
                            Ok(VcpuExit::IoOut(PORT, d)) => {
                                let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                                if got != want {
                                    wrong.fetch_add(1, Relaxed);
                                }
                                rounds.fetch_add(1, Relaxed);
                                break;
                            }
                            Err(e) if e.errno() == libc::EINTR => continue, // kicked: go on
                            other => {
                                let what = format!("{other:?}");
                                let regs = vcpu.get_regs().map(|r| format!("rip {:#x} rdi {:#x}", r.rip, r.rdi));
                                first_wild.get_or_insert(format!("vCPU {id}: {what}, {regs:?}"));
                                wild.fetch_add(1, Relaxed);
                                return first_wild; // its state is gone: this vCPU is done
                            }
                        }
                    }
                }
                first_wild
            })
        })
        .collect();

    let churn = anon(64 << 10);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut churns = 0u64;
    while Instant::now() < deadline {
        // SAFETY: the churn mapping lives as long as the process; size 0
        // deletes the slot.
        unsafe {
            let _ = kvm_util::set_memslot(&vm, 2, CHURN_GPA, churn as u64, 64 << 10);
            let _ = kvm_util::set_memslot(&vm, 2, CHURN_GPA, churn as u64, 0);
        }
        for t in &threads {
            // SAFETY: the thread is alive until joined below.
            unsafe { libc::pthread_kill(std::os::unix::thread::JoinHandleExt::as_pthread_t(t), libc::SIGUSR1) };
        }
        churns += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    stop.store(true, Relaxed);
    let firsts: Vec<String> = threads.into_iter().filter_map(|t| t.join().ok().flatten()).collect();
    let (wild, wrong, rounds) = (wild.load(Relaxed), wrong.load(Relaxed), rounds.load(Relaxed));
    println!("# {seconds} s: {churns} memslot add/remove + kicks, {rounds} checked sums, {wild} wild exits, {wrong} wrong sums");
    tap.test("sums_stay_right_under_memslot_churn_and_kicks", || {
        check(wrong == 0, || format!("{wrong} wrong sums from a vCPU that looked healthy"))
    });
    if wild > 0 {
        println!("# wild vCPU exits (the environment, not vmbeam): {firsts:?}");
    }
    tap.finish()
}
