//! The module's commands, with valid, near-valid and random arguments.

use rand::Rng;
use vmbeam::uapi;

use super::{
    pool::{bump, Fd, Kind, POOL_MAX, REGIONS_MAX, REGION_MAX_PAGES},
    worker::Worker,
};

impl Worker {
    pub(super) fn create_region(&mut self) {
        if self.pool.len() >= POOL_MAX || self.pool.count(Kind::Region) >= REGIONS_MAX {
            return self.pool.close_kind(&mut self.rng, Kind::Region);
        }
        let arg = uapi::vmbeam_region_create {
            size: self.size(),
            flags: self.flags(uapi::VMBEAM_CREATE_EMPTY | uapi::VMBEAM_CREATE_HUGE | uapi::VMBEAM_CREATE_HUGE_1G),
            pad: u32::from(self.rng.gen_range(0..30) == 0),
            reserved: self.reserved(),
        };
        let addr = self.place(arg);
        let dev = self.pool.device;
        if let Ok(fd) = self.ioctl(dev, uapi::VMBEAM_IOCTL_CREATE_REGION, addr, true) {
            bump(&self.pool.reached.regions);
            self.pool.add(Fd::new(fd, Kind::Region));
        }
    }

    pub(super) fn bind(&mut self, dups: &mut Vec<Fd>) {
        let (region, region_kind) = self.fd_arg(Kind::Region, dups);
        let region_fd = dups.last().copied();
        let (vm, vm_kind) = self.fd_arg(Kind::Vm, dups);
        let vm_fd = dups.last().copied();
        let mut to_process = false;
        let bound = if self.rng.gen_bool(0.5) {
            // To the fuzzer itself, mostly well formed (vm_fd -1); its
            // regions then go only to its own VMs (every pool VM is one).
            let flags = self.flags(uapi::VMBEAM_BIND_PROCESS);
            to_process = flags == uapi::VMBEAM_BIND_PROCESS;
            let vm_fd = if to_process && self.rng.gen_bool(0.8) { -1 } else { vm };
            let arg = uapi::vmbeam_region_bind { vm_fd, flags, reserved: self.reserved() };
            let addr = self.place(arg);
            let oracle = Self::oracle(region_kind, &[vm_kind]);
            self.ioctl(region, uapi::VMBEAM_IOCTL_REGION_BIND, addr, oracle).is_ok()
        } else {
            let arg = uapi::vmbeam_bind {
                region_fd: region,
                vm_fd: vm,
                flags: self.flags(0),
                pad: 0,
                reserved: self.reserved(),
            };
            let addr = self.place(arg);
            let dev = self.pool.device;
            let oracle = Self::oracle(Some(Kind::Device), &[region_kind, vm_kind]);
            self.ioctl(dev, uapi::VMBEAM_IOCTL_BIND, addr, oracle).is_ok()
        };
        if bound && to_process {
            bump(&self.pool.reached.process_binds);
            if let (Some(r), Some(Kind::Region)) = (region_fd, region_kind) {
                self.pool.note_unowned(r);
            }
        } else if bound {
            bump(&self.pool.reached.binds);
            if let (Some(r), Some(v), Some(Kind::Region), Some(Kind::Vm)) = (region_fd, vm_fd, region_kind, vm_kind) {
                self.pool.note_owner(r, v);
            }
        }
    }

    pub(super) fn info(&mut self, dups: &mut Vec<Fd>) {
        let (region, kind) = self.fd_arg(Kind::Region, dups);
        let arg = uapi::vmbeam_region_info { flags: self.flags(0), reserved: self.reserved(), ..Default::default() };
        let addr = self.place(arg);
        let _ = self.ioctl(region, uapi::VMBEAM_IOCTL_REGION_INFO, addr, Self::oracle(kind, &[]));
    }

    /// `VMBEAM_REGION_FRAMES`: the walk of an owner's page tables, with
    /// counts and offsets mostly in range and an output buffer that is
    /// mostly the writable argument page (room for 512 frames).
    pub(super) fn frames(&mut self, dups: &mut Vec<Fd>) {
        let (region, kind) = self.fd_arg(Kind::Region, dups);
        let count = match self.rng.gen_range(0..10) {
            0 => 0,
            1 => self.rng.gen(),
            2 => u64::from(uapi::VMBEAM_FRAMES_MAX) + 1,
            _ => self.rng.gen_range(1..=512),
        };
        let offset = match self.rng.gen_range(0..10) {
            0 => self.rng.gen(),
            1 => self.rng.gen_range(1..4096),
            _ => self.rng.gen_range(0..REGION_MAX_PAGES) * 4096,
        };
        let frames = self.arg_addr(count.min(512) as usize * 8);
        let arg = uapi::vmbeam_region_frames {
            offset,
            count,
            frames,
            flags: self.flags(0),
            pad: u32::from(self.rng.gen_range(0..30) == 0),
            reserved: self.reserved(),
        };
        let addr = self.place(arg);
        let _ = self.ioctl(region, uapi::VMBEAM_IOCTL_REGION_FRAMES, addr, Self::oracle(kind, &[]));
    }

    /// One transfer entry; half the time naming a region's real owner (so
    /// that transfers go through), and the (region, new owner) it names.
    pub(super) fn entry(&mut self, dups: &mut Vec<Fd>) -> (uapi::vmbeam_transfer, bool, Option<(Fd, Fd)>) {
        let owned = if self.rng.gen_bool(0.7) { self.pool.pick_owned(&mut self.rng) } else { None };
        let (region_fd, a, from_vm_fd, b) = match owned {
            Some((region, from)) => {
                dups.extend([region, from]);
                (region.raw, Some(region.kind), from.raw, Some(from.kind))
            }
            None => {
                let (r, a) = self.fd_arg(Kind::Region, dups);
                let (f, b) = self.fd_arg(Kind::Vm, dups);
                (r, a, f, b)
            }
        };
        let region = dups.iter().find(|f| f.raw == region_fd).copied();
        let (to_vm_fd, c) = self.fd_arg(Kind::Vm, dups);
        let to = dups.last().copied().filter(|f| f.raw == to_vm_fd);
        let t =
            uapi::vmbeam_transfer { region_fd, from_vm_fd, to_vm_fd, flags: self.flags(0), reserved: self.reserved() };
        let moved = match (region, to) {
            (Some(r), Some(v)) if r.kind == Kind::Region && v.kind == Kind::Vm => Some((r, v)),
            _ => None,
        };
        (t, Self::oracle(Some(Kind::Device), &[a, b, c]), moved)
    }

    pub(super) fn transfer(&mut self, dups: &mut Vec<Fd>) {
        let (t, oracle, moved) = self.entry(dups);
        let addr = self.place(t);
        let dev = self.pool.device;
        if self.ioctl(dev, uapi::VMBEAM_IOCTL_TRANSFER, addr, oracle).is_ok() {
            bump(&self.pool.reached.transfers);
            if let Some((r, v)) = moved {
                self.pool.note_owner(r, v);
            }
        }
    }

    pub(super) fn batch(&mut self, dups: &mut Vec<Fd>) {
        let n = if self.rng.gen_bool(0.8) { self.rng.gen_range(1..=2) } else { self.rng.gen_range(3..=6) };
        let mut oracle = true;
        let mut entries = Vec::with_capacity(n);
        let mut moves = Vec::with_capacity(n);
        for _ in 0..n {
            let (t, o, moved) = self.entry(dups);
            oracle &= o;
            entries.push(t);
            moves.push(moved);
        }
        let count = match self.rng.gen_range(0..15) {
            0 => 0,
            1 => uapi::VMBEAM_TRANSFER_BATCH_MAX + 1,
            2 => n as u32 + 1, // reads past the entries (EFAULT or garbage)
            _ => n as u32,
        };
        let transfers = if self.rng.gen_range(0..15) == 0 { 0x10 } else { entries.as_ptr() as u64 };
        let arg = uapi::vmbeam_transfer_batch { transfers, count, flags: self.flags(0), reserved: self.reserved() };
        let addr = self.place(arg);
        let dev = self.pool.device;
        if self.ioctl(dev, uapi::VMBEAM_IOCTL_TRANSFER_BATCH, addr, oracle).is_ok() {
            bump(&self.pool.reached.batches);
            for (r, v) in moves.into_iter().flatten() {
                self.pool.note_owner(r, v);
            }
        }
    }

    pub(super) fn gather(&mut self, dups: &mut Vec<Fd>) {
        let (src_fd, a) = self.fd_arg(Kind::Region, dups);
        let into = self.rng.gen_bool(0.5);
        let replace = if self.rng.gen_bool(0.3) { uapi::VMBEAM_GATHER_REPLACE } else { 0 };
        // A scatter: the source's first pages to the slots named, mostly
        // without REPLACE and with dst_offset 0 (else EINVAL).
        let scatter = into && self.rng.gen_bool(0.3);
        let flags = match (into, scatter) {
            (true, true) if self.rng.gen_range(0..10) != 0 => uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_SCATTER,
            (true, true) => uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_SCATTER | replace,
            (true, false) => uapi::VMBEAM_GATHER_INTO | replace,
            (false, _) => self.flags(replace | uapi::VMBEAM_GATHER_SCATTER),
        };
        // Pages named as runs ({offset, pages} pairs) a third of the time,
        // a scatter's slots too (EINVAL).
        let runs = self.rng.gen_range(0..3) == 0;
        let flags = if runs { flags | uapi::VMBEAM_GATHER_RUNS } else { flags };
        let (dst_fd, b) = if into { self.fd_arg(Kind::Region, dups) } else { (0, Some(Kind::Closed)) };
        let n = self.rng.gen_range(1..=32);
        let offsets: Vec<u64> = (0..n)
            .map(|i| match self.rng.gen_range(0..20) {
                0 => self.rng.gen(),
                1 => self.rng.gen_range(0..REGION_MAX_PAGES * 4096),
                _ if runs && i % 2 == 1 => self.rng.gen_range(0..8), // a run's length
                _ => self.rng.gen_range(0..64) * 4096,
            })
            .collect();
        let count = match self.rng.gen_range(0..15) {
            0 => 0,
            1 => u64::from(uapi::VMBEAM_GATHER_MAX) + 1,
            2 => self.rng.gen(),
            _ if runs => n / 2, // pairs; 0 when n is 1
            _ => n,
        };
        let arg = uapi::vmbeam_gather {
            offsets: if self.rng.gen_range(0..15) == 0 { 0x10 } else { offsets.as_ptr() as u64 },
            count,
            src_fd,
            flags,
            dst_fd,
            pad: u32::from(self.rng.gen_range(0..30) == 0),
            dst_offset: match (into, scatter) {
                (true, true) if self.rng.gen_range(0..10) != 0 => 0,
                (true, _) => self.rng.gen_range(0..64) * 4096,
                (false, _) => 0,
            },
        };
        let addr = self.place(arg);
        let dev = self.pool.device;
        let oracle = Self::oracle(Some(Kind::Device), &[a, b]);
        if let Ok(fd) = self.ioctl(dev, uapi::VMBEAM_IOCTL_GATHER, addr, oracle) {
            bump(&self.pool.reached.gathers);
            if flags & uapi::VMBEAM_GATHER_REPLACE != 0 {
                bump(&self.pool.reached.replacing_gathers);
            }
            if flags & uapi::VMBEAM_GATHER_SCATTER != 0 {
                bump(&self.pool.reached.scatters);
            }
            if fd > 0 {
                self.pool.add(Fd::new(fd, Kind::Region));
            }
        }
    }

    /// A well-formed life of a region: created, bound to a pool VM, moved
    /// to another in a batch, some pages gathered out of it and, unless
    /// replaced, scattered back into their holes. Every call is valid when
    /// made; the other workers' calls race it.
    pub(super) fn valid_chain(&mut self, dups: &mut Vec<Fd>) {
        let (Some(a), Some(b)) =
            (self.pool.pick(&mut self.rng, Some(Kind::Vm)), self.pool.pick(&mut self.rng, Some(Kind::Vm)))
        else {
            return;
        };
        dups.extend([a, b]);
        let dev = self.pool.device;
        let pages = self.rng.gen_range(1..=64u64);
        let create = uapi::vmbeam_region_create { size: pages * 4096, ..Default::default() };
        let Ok(raw) = self.ioctl(dev, uapi::VMBEAM_IOCTL_CREATE_REGION, (&raw const create) as u64, true) else {
            return;
        };
        bump(&self.pool.reached.regions);
        let region = Fd::new(raw, Kind::Region);
        dups.push(region);
        let bind = uapi::vmbeam_bind { region_fd: region.raw, vm_fd: a.raw, ..Default::default() };
        if self.ioctl(dev, uapi::VMBEAM_IOCTL_BIND, (&raw const bind) as u64, true).is_err() {
            return;
        }
        bump(&self.pool.reached.binds);
        if a.origin == b.origin {
            return;
        }
        let entries =
            [uapi::vmbeam_transfer { region_fd: region.raw, from_vm_fd: a.raw, to_vm_fd: b.raw, ..Default::default() }];
        let batch = uapi::vmbeam_transfer_batch { transfers: entries.as_ptr() as u64, count: 1, ..Default::default() };
        if self.ioctl(dev, uapi::VMBEAM_IOCTL_TRANSFER_BATCH, (&raw const batch) as u64, true).is_err() {
            return;
        }
        bump(&self.pool.reached.batches);
        let offsets: Vec<u64> = (0..pages).filter(|_| self.rng.gen_bool(0.3)).map(|p| p * 4096).collect();
        if !offsets.is_empty() {
            let replace = self.rng.gen_bool(0.3);
            let gather = uapi::vmbeam_gather {
                offsets: offsets.as_ptr() as u64,
                count: offsets.len() as u64,
                src_fd: region.raw,
                flags: if replace { uapi::VMBEAM_GATHER_REPLACE } else { 0 },
                ..Default::default()
            };
            if let Ok(fd) = self.ioctl(dev, uapi::VMBEAM_IOCTL_GATHER, (&raw const gather) as u64, true) {
                bump(&self.pool.reached.gathers);
                if replace {
                    bump(&self.pool.reached.replacing_gathers);
                }
                dups.push(Fd::new(fd, Kind::Region));
                let back = uapi::vmbeam_gather {
                    src_fd: fd,
                    flags: uapi::VMBEAM_GATHER_INTO | uapi::VMBEAM_GATHER_SCATTER,
                    dst_fd: region.raw,
                    ..gather
                };
                if !replace && self.ioctl(dev, uapi::VMBEAM_IOCTL_GATHER, (&raw const back) as u64, true).is_ok() {
                    bump(&self.pool.reached.gathers);
                    bump(&self.pool.reached.scatters);
                }
            }
        }
        if self.pool.count(Kind::Region) < REGIONS_MAX {
            // SAFETY: a dup of our own region fd, now owned by the pool.
            let keep = unsafe { libc::dup(region.raw) };
            if keep >= 0 {
                self.pool.add(Fd::new(keep, Kind::Region));
                self.pool.note_owner(Fd::new(keep, Kind::Region), b);
            }
        }
    }

    /// A command number in vmbeam's range (or anywhere) with a random
    /// direction and size, on any kind of fd.
    pub(super) fn random_command(&mut self, dups: &mut Vec<Fd>) {
        let (fd, kind) = self.fd_arg(Kind::Device, dups);
        let oracle = Self::oracle(kind, &[]);
        let cmd = match self.rng.gen_range(0..4) {
            0 => self.rng.gen(),
            _ => {
                let dir: u32 = self.rng.gen_range(0..4);
                let size: u32 = self.rng.gen_range(0..256);
                let nr: u32 = self.rng.gen_range(0..24);
                (dir << 30) | (size << 16) | (0xBE << 8) | nr
            }
        };
        let addr = self.arg_addr(64);
        let _ = self.ioctl(fd, cmd, addr, oracle);
    }

    pub(super) fn version_or_stats(&mut self) {
        let dev = self.pool.device;
        if self.rng.gen_bool(0.5) {
            let arg = uapi::vmbeam_version { flags: self.flags(0), reserved: self.reserved(), ..Default::default() };
            let addr = self.place(arg);
            let _ = self.ioctl(dev, uapi::VMBEAM_IOCTL_GET_VERSION, addr, true);
        } else {
            let arg = uapi::vmbeam_stats { flags: self.flags(0), reserved: self.reserved(), ..Default::default() };
            let addr = self.place(arg);
            let _ = self.ioctl(dev, uapi::VMBEAM_IOCTL_GET_STATS, addr, true);
        }
    }
}
