//! Around the commands: mappings and touches, unmaps, reopens, new VMs,
//! guest reads, and children killed mid-call.

use std::{ffi::c_void, os::fd::RawFd, sync::atomic::Ordering::Relaxed};

use rand::Rng;
use vmbeam::uapi;

use super::{
    pool::{bump, close, open, Fd, Kind, KVM_CREATE_VCPU, KVM_CREATE_VM, OTHERS_MAX, POOL_MAX, REGIONS_MAX, VMS_MAX},
    worker::{Mapping, Worker},
};
use crate::guest::programs;

impl Worker {
    pub(super) fn map_and_touch(&mut self) {
        if self.maps.len() < 16 {
            let Some(fd) = self.pool.pick(&mut self.rng, Some(Kind::Region)) else { return };
            let len = self.rng.gen_range(1..=64u64) * 4096;
            let offset = self.rng.gen_range(0..4u64) * 4096;
            let flags = if self.rng.gen_range(0..10) == 0 { libc::MAP_PRIVATE } else { libc::MAP_SHARED };
            // SAFETY: a new mapping at an address the kernel picks.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd.raw,
                    offset as i64,
                )
            };
            close(fd);
            if addr != libc::MAP_FAILED {
                bump(&self.pool.reached.maps);
                self.maps.push(Mapping { addr: addr as u64, len });
            }
        }
        if self.maps.is_empty() {
            return;
        }
        let m = &self.maps[self.rng.gen_range(0..self.maps.len())];
        let at = m.addr + self.rng.gen_range(0..m.len / 4096) * 4096;
        // Through /proc/self/mem: a fault the module refuses is an EIO
        // here, not a SIGBUS in whichever thread touched it.
        let mut byte = [0u8; 1];
        if self.rng.gen_bool(0.5) {
            let _ = std::os::unix::fs::FileExt::read_at(&self.mem, &mut byte, at);
        } else {
            let _ = std::os::unix::fs::FileExt::write_at(&self.mem, &[0x5a], at);
        }
    }

    pub(super) fn unmap(&mut self) {
        if self.maps.is_empty() {
            return;
        }
        let m = self.maps.swap_remove(self.rng.gen_range(0..self.maps.len()));
        // SAFETY: a mapping this worker made and no memslot refers to.
        unsafe { libc::munmap(m.addr as *mut c_void, m.len as usize) };
    }

    pub(super) fn reopen(&mut self) {
        let Some(fd) = self.pool.pick(&mut self.rng, None) else { return };
        let room = match fd.kind {
            Kind::Region => REGIONS_MAX,
            Kind::Vm => VMS_MAX,
            _ => OTHERS_MAX,
        };
        if self.pool.len() < POOL_MAX && self.pool.count(fd.kind) < room {
            if let Ok(new) = open(&format!("/proc/self/fd/{}", fd.raw)) {
                self.pool.add(Fd::new(new, fd.kind));
            }
        }
        close(fd);
    }

    pub(super) fn new_vm(&mut self) {
        if self.pool.count(Kind::Vm) >= VMS_MAX {
            return self.pool.close_kind(&mut self.rng, Kind::Vm);
        }
        if self.pool.len() >= POOL_MAX {
            // Make room, but never at the VMs' expense: without VMs nothing
            // binds or moves.
            self.pool.close_kind(&mut self.rng, Kind::Region);
        }
        // Another worker may have closed the last /dev/kvm fd: open one
        // again, or the pool runs out of VMs for good and nothing moves
        // (a run at seed 956673 made 11 binds and no transfer that way).
        let kvm = match self.pool.pick(&mut self.rng, Some(Kind::Kvm)) {
            Some(kvm) => kvm,
            None => {
                let Ok(raw) = open("/dev/kvm") else { return };
                self.pool.add(Fd::new(raw, Kind::Kvm));
                let Some(kvm) = self.pool.pick(&mut self.rng, Some(Kind::Kvm)) else { return };
                kvm
            }
        };
        if let Ok(vm) = self.ioctl(kvm.raw, KVM_CREATE_VM, 0, false) {
            if self.rng.gen_bool(0.3) {
                let id = self.rng.gen_range(0..4);
                if let Ok(vcpu) = self.ioctl(vm, KVM_CREATE_VCPU, id, false) {
                    if self.pool.count(Kind::Vcpu) < OTHERS_MAX {
                        self.pool.add(Fd::new(vcpu, Kind::Vcpu));
                    } else {
                        close(Fd::new(vcpu, Kind::Vcpu));
                    }
                }
            }
            self.pool.add(Fd::new(vm, Kind::Vm));
        }
        close(kvm);
    }

    /// A child process creates a VM and a region, binds, maps, touches and
    /// transfers it to a pool VM, again and again, and is SIGKILLed at a
    /// random moment, possibly inside a call. Every other round it binds
    /// the region to itself instead (`VMBEAM_BIND_PROCESS`) and gathers
    /// pages out of it with `VMBEAM_GATHER_REPLACE` while it maps them.
    pub(super) fn fork_and_kill(&mut self) {
        let target = self.pool.pick(&mut self.rng, Some(Kind::Vm));
        let dev = self.pool.device;
        let delay = std::time::Duration::from_micros(self.rng.gen_range(0..3000));
        // SAFETY: the child only makes syscalls on fds it inherited or
        // opened, touches memory it mapped, and leaves with _exit.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: see above.
                unsafe { child(dev, target.map_or(-1, |f| f.raw)) };
            }
            pid if pid > 0 => {
                std::thread::sleep(delay);
                self.issued.fetch_add(1, Relaxed); // at least one call, cut short
                bump(&self.pool.reached.children_killed);
                // SAFETY: our child; reaped right after.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
            _ => {}
        }
        if let Some(fd) = target {
            close(fd);
        }
    }

    /// This worker's guest sums up to 16 pages of one of its mappings.
    pub(super) fn guest_read(&mut self) {
        let (Some(vm), false) = (self.vm.as_mut(), self.maps.is_empty()) else { return };
        let m = &self.maps[self.rng.gen_range(0..self.maps.len())];
        const GPA: u64 = 0x1000_0000;
        // SAFETY: the mapping stays until the memslot is removed below.
        if unsafe { vm.add_memslot(1, GPA, m.addr, m.len) }.is_err() {
            return;
        }
        let pages = (m.len / 4096).min(16);
        if vm.load(programs::SUM, [0, 0, pages, 0, 4096, GPA]).is_ok() {
            self.issued.fetch_add(1, Relaxed);
            let _ = vm.run();
            bump(&self.pool.reached.guest_runs);
        }
        // SAFETY: size 0 deletes the memslot.
        let _ = unsafe { vm.add_memslot(1, GPA, m.addr, 0) };
    }
}

/// The body of [`Worker::fork_and_kill`]'s child: raw syscalls only (no
/// allocation: another thread may have held the allocator at the fork).
///
/// # Safety
///
/// Call only in a freshly forked child; it never returns.
unsafe fn child(dev: RawFd, target_vm: RawFd) -> ! {
    // SAFETY: syscalls on fds this process owns, memory it maps itself.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR);
        let vm = libc::ioctl(kvm, KVM_CREATE_VM as libc::c_ulong, 0);
        let mut round = 0u32;
        loop {
            round += 1;
            let to_process = round.is_multiple_of(2);
            let create = uapi::vmbeam_region_create { size: 64 * 4096, ..Default::default() };
            let region = libc::ioctl(dev, uapi::VMBEAM_IOCTL_CREATE_REGION as libc::c_ulong, &create);
            let bind = if to_process {
                uapi::vmbeam_region_bind { vm_fd: -1, flags: uapi::VMBEAM_BIND_PROCESS, ..Default::default() }
            } else {
                uapi::vmbeam_region_bind { vm_fd: vm, ..Default::default() }
            };
            libc::ioctl(region, uapi::VMBEAM_IOCTL_REGION_BIND as libc::c_ulong, &bind);
            let p = libc::mmap(
                std::ptr::null_mut(),
                64 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                region,
                0,
            );
            if p != libc::MAP_FAILED {
                for i in 0..64 {
                    std::ptr::write_volatile(p.cast::<u8>().add(i * 4096), i as u8);
                }
                if to_process {
                    // Pages leave under the mapping; fresh zeroed ones take
                    // their places, so touching them again is safe.
                    let offsets = [4096u64, 9 * 4096];
                    let g = uapi::vmbeam_gather {
                        offsets: offsets.as_ptr() as u64,
                        count: 2,
                        src_fd: region,
                        flags: uapi::VMBEAM_GATHER_REPLACE,
                        ..Default::default()
                    };
                    let out = libc::ioctl(dev, uapi::VMBEAM_IOCTL_GATHER as libc::c_ulong, &g);
                    std::ptr::write_volatile(p.cast::<u8>().add(9 * 4096), 9);
                    if out >= 0 {
                        libc::close(out);
                    }
                }
            }
            let t =
                uapi::vmbeam_transfer { region_fd: region, from_vm_fd: vm, to_vm_fd: target_vm, ..Default::default() };
            libc::ioctl(dev, uapi::VMBEAM_IOCTL_TRANSFER as libc::c_ulong, &t);
            // The old owner's page is gone now: no more touching.
            libc::close(region);
        }
    }
}
