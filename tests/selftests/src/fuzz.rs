//! The engine of `fuzz_test`: a shared pool of fds of every kind and the
//! workers that call the module with them (see the binary's doc).
//!
//! A worker picks its fds under the pool lock and works on `dup`s of them,
//! so the kind it believes a fd has is the kind it has and the errno oracle
//! holds; one call in ten uses the pool's own number instead, which another
//! thread may be closing or reusing at that moment (the module must cope;
//! the oracle is off for that call).

use std::{
    ffi::c_void,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use rand::{rngs::SmallRng, Rng};
use vmbeam::uapi;

use crate::guest::{programs, TestVm};

/// What a pool fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Region,
    Vm,
    Vcpu,
    Kvm,
    Device,
    Memfd,
    Pipe,
    /// A number nothing is open on (as far as the pool knows).
    Closed,
}

#[derive(Debug, Clone, Copy)]
pub struct Fd {
    pub raw: RawFd,
    pub kind: Kind,
    /// The pool's number this is a dup of (itself for pool entries).
    origin: RawFd,
}

impl Fd {
    fn new(raw: RawFd, kind: Kind) -> Self {
        Self { raw, kind, origin: raw }
    }
}

/// How far the fuzzer got: successful calls of each kind. A run that never
/// moved a region has not fuzzed the paths that matter.
#[derive(Debug, Default)]
pub struct Reached {
    pub regions: AtomicU64,
    pub binds: AtomicU64,
    pub transfers: AtomicU64,
    pub batches: AtomicU64,
    pub gathers: AtomicU64,
    pub maps: AtomicU64,
    pub guest_runs: AtomicU64,
    pub children_killed: AtomicU64,
}

impl Reached {
    /// `(name, count)` of every kind.
    pub fn all(&self) -> [(&'static str, u64); 8] {
        [
            ("regions created", self.regions.load(Relaxed)),
            ("binds", self.binds.load(Relaxed)),
            ("transfers", self.transfers.load(Relaxed)),
            ("batches", self.batches.load(Relaxed)),
            ("gathers", self.gathers.load(Relaxed)),
            ("region mmaps", self.maps.load(Relaxed)),
            ("guest runs", self.guest_runs.load(Relaxed)),
            ("children killed", self.children_killed.load(Relaxed)),
        ]
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// `_IO(KVMIO, 0x01)` and `_IO(KVMIO, 0x41)`.
const KVM_CREATE_VM: u32 = 0xae01;
const KVM_CREATE_VCPU: u32 = 0xae41;

/// Most fds in the pool; past it, workers close rather than open.
const POOL_MAX: usize = 96;
/// Most regions and VMs in the pool, so neither kind crowds out the other.
const REGIONS_MAX: usize = 48;
const VMS_MAX: usize = 12;
/// Most fds of each other kind (vCPUs, /dev/kvm, memfds, pipes...).
const OTHERS_MAX: usize = 6;
/// Largest region a worker creates (keeps 4 workers far from OOM).
const REGION_MAX_PAGES: u64 = 1024;

struct PoolState {
    fds: Vec<Fd>,
    /// (region, VM) pool numbers: the VM a region was last bound or
    /// transferred to, so that some transfers name the real owner.
    owners: Vec<(RawFd, RawFd)>,
}

pub struct Pool {
    state: Mutex<PoolState>,
    device: RawFd,
    pub reached: Reached,
    /// (command, errno or 0) -> calls, for the calls the oracle checked.
    pub results: Mutex<std::collections::BTreeMap<(u32, i32), u64>>,
}

fn raw_or(ret: libc::c_int) -> Result<RawFd, i32> {
    if ret < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret)
    }
}

impl Pool {
    /// A pool with one fd of every kind.
    pub fn new() -> Result<Self, String> {
        let device = open(vmbeam::DEVICE_PATH).map_err(|e| format!("open {}: errno {e}", vmbeam::DEVICE_PATH))?;
        let pool = Self {
            state: Mutex::new(PoolState { fds: vec![Fd::new(device, Kind::Device)], owners: Vec::new() }),
            device,
            reached: Reached::default(),
            results: Mutex::default(),
        };
        let kvm = open("/dev/kvm").map_err(|e| format!("open /dev/kvm: {e}"))?;
        pool.add(Fd::new(kvm, Kind::Kvm));
        // SAFETY: plain syscalls on fds the pool then owns.
        unsafe {
            let memfd = libc::memfd_create(c"fuzz".as_ptr(), 0);
            if memfd >= 0 && libc::ftruncate(memfd, 1 << 20) == 0 {
                pool.add(Fd::new(memfd, Kind::Memfd));
            }
            let mut pipe = [0; 2];
            if libc::pipe(pipe.as_mut_ptr()) == 0 {
                pool.add(Fd::new(pipe[0], Kind::Pipe));
                pool.add(Fd::new(pipe[1], Kind::Pipe));
            }
        }
        pool.add(Fd::new(1000, Kind::Closed));
        Ok(pool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, fd: Fd) {
        self.lock().fds.push(fd);
    }

    fn len(&self) -> usize {
        self.lock().fds.len()
    }

    fn count(&self, kind: Kind) -> usize {
        self.lock().fds.iter().filter(|f| f.kind == kind).count()
    }

    /// Removes and closes a random fd of `kind`.
    fn close_kind(&self, rng: &mut SmallRng, kind: Kind) {
        let mut state = self.lock();
        let of_kind: Vec<usize> = (0..state.fds.len()).filter(|&i| state.fds[i].kind == kind).collect();
        if let Some(&i) = of_kind.get(rng.gen_range(0..of_kind.len().max(1))) {
            let fd = state.fds.swap_remove(i);
            state.owners.retain(|&(r, v)| r != fd.raw && v != fd.raw);
            // SAFETY: the pool owned it; removed before closing.
            unsafe { libc::close(fd.raw) };
        }
    }

    /// Remembers that `region` now belongs to `vm` (both dups or entries).
    fn note_owner(&self, region: Fd, vm: Fd) {
        let mut state = self.lock();
        state.owners.retain(|&(r, _)| r != region.origin);
        state.owners.push((region.origin, vm.origin));
    }

    /// A region and the VM it was last given to, both dup'ed.
    fn pick_owned(&self, rng: &mut SmallRng) -> Option<(Fd, Fd)> {
        let state = self.lock();
        let &(r, v) = state.owners.get(rng.gen_range(0..state.owners.len().max(1)))?;
        let find = |raw| state.fds.iter().find(|f| f.raw == raw).copied();
        let (region, vm) = (find(r)?, find(v)?);
        let dup = |fd: Fd| {
            // SAFETY: a pool fd, open while we hold the lock.
            let raw = unsafe { libc::dup(fd.raw) };
            (raw >= 0).then_some(Fd { raw, kind: fd.kind, origin: fd.raw })
        };
        let region = dup(region)?;
        match dup(vm) {
            Some(vm) => Some((region, vm)),
            None => {
                close(region);
                None
            }
        }
    }

    /// A fd of `kind` (any kind if `None`), as a `dup` the caller closes,
    /// or `None` if the pool has none.
    fn pick(&self, rng: &mut SmallRng, kind: Option<Kind>) -> Option<Fd> {
        let state = self.lock();
        let matching: Vec<&Fd> = state.fds.iter().filter(|f| kind.is_none_or(|k| f.kind == k)).collect();
        if matching.is_empty() {
            return None;
        }
        let fd = *matching[rng.gen_range(0..matching.len())];
        if fd.kind == Kind::Closed {
            return Some(fd);
        }
        // SAFETY: the pool's fd is open while we hold the lock.
        let raw = unsafe { libc::dup(fd.raw) };
        (raw >= 0).then_some(Fd { raw, kind: fd.kind, origin: fd.raw })
    }

    /// The pool's own number of a random fd (no dup: it may be closed or
    /// reused by the time it is used).
    fn pick_raw(&self, rng: &mut SmallRng) -> RawFd {
        let state = self.lock();
        state.fds[rng.gen_range(0..state.fds.len())].raw
    }

    /// Removes and closes a random fd (never /dev/vmbeam's).
    fn close_one(&self, rng: &mut SmallRng) {
        let mut state = self.lock();
        let i = rng.gen_range(0..state.fds.len());
        if state.fds[i].raw != self.device && state.fds[i].kind != Kind::Closed {
            let fd = state.fds.swap_remove(i);
            state.owners.retain(|&(r, v)| r != fd.raw && v != fd.raw);
            // SAFETY: the pool owned it; removed before closing.
            unsafe { libc::close(fd.raw) };
        }
    }

    /// Closes everything; returns how many fds it closed.
    pub fn close_all(self) -> usize {
        let state = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        let open: Vec<_> = state.fds.into_iter().filter(|f| f.kind != Kind::Closed).collect();
        for fd in &open {
            // SAFETY: the pool owned them and nobody else uses the pool now.
            unsafe { libc::close(fd.raw) };
        }
        open.len()
    }
}

fn open(path: &str) -> Result<RawFd, i32> {
    let path = std::ffi::CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: a NUL-terminated path.
    raw_or(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

fn close(fd: Fd) {
    if fd.kind != Kind::Closed {
        // SAFETY: a dup this worker owns.
        unsafe { libc::close(fd.raw) };
    }
}

/// The errnos the module documents for its commands.
const DOCUMENTED: &[i32] = &[
    libc::EBADF,
    libc::EINVAL,
    libc::EPERM,
    libc::EBUSY,
    libc::EEXIST,
    libc::EFAULT,
    libc::ENOMEM,
    libc::ENOTTY,
    libc::EACCES,
    libc::ENXIO,
    libc::EINTR,
];

/// A mapping of a region this worker made.
struct Mapping {
    addr: u64,
    len: u64,
}

pub struct Worker {
    pool: Arc<Pool>,
    rng: SmallRng,
    issued: Arc<AtomicU64>,
    undocumented: Arc<Mutex<Vec<String>>>,
    vm: Option<TestVm>,
    maps: Vec<Mapping>,
    /// Two pages, the second PROT_NONE: arguments placed to straddle them
    /// are partly unreadable.
    arg_page: u64,
    mem: std::fs::File,
}

impl Worker {
    pub fn new(pool: Arc<Pool>, rng: SmallRng, issued: Arc<AtomicU64>, undocumented: Arc<Mutex<Vec<String>>>) -> Self {
        // SAFETY: a fresh anonymous mapping this worker alone uses.
        let arg_page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(arg_page, libc::MAP_FAILED, "mmap argument pages");
        // SAFETY: the second page of the mapping above.
        unsafe { libc::mprotect(arg_page.cast::<u8>().add(4096).cast(), 4096, libc::PROT_NONE) };
        let mem = std::fs::OpenOptions::new().read(true).write(true).open("/proc/self/mem").expect("/proc/self/mem");
        let vm = TestVm::new().ok();
        if let Some(vm) = &vm {
            if let Ok(fd) = vm.vm_fd() {
                pool.add(Fd::new(std::os::fd::IntoRawFd::into_raw_fd(fd), Kind::Vm));
            }
        }
        Self { pool, rng, issued, undocumented, vm, maps: Vec::new(), arg_page: arg_page as u64, mem }
    }

    /// Issues `cmd` on `fd` with `arg`; checks the result against the
    /// documented errnos when `oracle`.
    fn ioctl(&mut self, fd: RawFd, cmd: u32, arg: u64, oracle: bool) -> Result<i32, i32> {
        self.issued.fetch_add(1, Relaxed);
        // SAFETY: the module (or whatever the fd is) validates `arg`; it
        // points into this process's own memory, or nowhere valid on
        // purpose, and nothing of ours lives at an address the kernel may
        // write to but the argument buffers.
        let ret = raw_or(unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg as *mut c_void) });
        if oracle {
            let mut results = self.pool.results.lock().unwrap_or_else(|e| e.into_inner());
            *results.entry((cmd, ret.err().unwrap_or(0))).or_insert(0) += 1;
        }
        if let Err(errno) = ret {
            if oracle && !DOCUMENTED.contains(&errno) {
                let mut bad = self.undocumented.lock().unwrap_or_else(|e| e.into_inner());
                bad.push(format!("cmd {cmd:#x} on fd {fd}: errno {errno}"));
            }
        }
        ret
    }

    /// Where to put an argument of `size` bytes: mostly a valid buffer,
    /// sometimes NULL, a kernel address, or straddling the PROT_NONE page.
    fn arg_addr(&mut self, size: usize) -> u64 {
        match self.rng.gen_range(0..20) {
            0 => 0,
            1 => 0xffff_8000_0000_0000,
            2 => self.arg_page + 4096 - (size as u64 / 2).max(1),
            3 => self.arg_page + 4096,
            _ => self.arg_page + 4096 - size as u64,
        }
    }

    /// Writes `value` where [`Worker::arg_addr`] said, if it is writable.
    fn place<T: Copy>(&mut self, value: T) -> u64 {
        let size = std::mem::size_of::<T>();
        let addr = self.arg_addr(size);
        if addr >= self.arg_page && addr + size as u64 <= self.arg_page + 4096 {
            // SAFETY: inside the first (writable) page of `arg_page`.
            unsafe { std::ptr::write_unaligned(addr as *mut T, value) };
        } else if addr >= self.arg_page && addr < self.arg_page + 4096 {
            let n = (self.arg_page + 4096 - addr) as usize;
            // SAFETY: the writable part of a straddling argument.
            unsafe { std::ptr::copy_nonoverlapping((&raw const value).cast::<u8>(), addr as *mut u8, n) };
        }
        addr
    }

    fn flags(&mut self, valid: u32) -> u32 {
        match self.rng.gen_range(0..10) {
            0 => self.rng.gen(),
            1 => 1 << self.rng.gen_range(0..32),
            _ if valid != 0 && self.rng.gen_bool(0.5) => valid,
            _ => 0,
        }
    }

    fn reserved<const N: usize>(&mut self) -> [u64; N] {
        let mut r = [0; N];
        if self.rng.gen_range(0..20) == 0 {
            r[self.rng.gen_range(0..N)] = self.rng.gen();
        }
        r
    }

    /// A fd number for an argument: mostly a pool fd of `kind` (dup'ed and
    /// pushed to `dups` to be closed after the call), sometimes of any kind
    /// (`Some` of the kind it has), sometimes the pool's raw number (`None`:
    /// it may be closed or reused meanwhile, so no oracle), or -1.
    fn fd_arg(&mut self, kind: Kind, dups: &mut Vec<Fd>) -> (i32, Option<Kind>) {
        let pick = match self.rng.gen_range(0..10) {
            0 => return (self.pool.pick_raw(&mut self.rng), None),
            1 | 2 => self.pool.pick(&mut self.rng, None),
            _ => self.pool.pick(&mut self.rng, Some(kind)),
        };
        match pick {
            Some(fd) => {
                dups.push(fd);
                (fd.raw, Some(fd.kind))
            }
            None => (-1, Some(Kind::Closed)),
        }
    }

    /// Whether a call's result is checked: every fd known, and the fd the
    /// command goes to one of the module's (others answer as they like).
    fn oracle(target: Option<Kind>, args: &[Option<Kind>]) -> bool {
        matches!(target, Some(Kind::Device | Kind::Region)) && args.iter().all(Option::is_some)
    }

    fn size(&mut self) -> u64 {
        match self.rng.gen_range(0..12) {
            0 => 0,
            1 => self.rng.gen_range(1..4096),
            2 => 1 << self.rng.gen_range(40..64),
            3 => self.rng.gen(),
            _ => self.rng.gen_range(1..=REGION_MAX_PAGES) * 4096,
        }
    }

    pub fn step(&mut self) {
        let mut dups = Vec::new();
        if self.pool.count(Kind::Vm) < 3 {
            self.new_vm();
        }
        match self.rng.gen_range(0..100) {
            0..=9 => self.create_region(),
            10..=17 => self.bind(&mut dups),
            18..=23 => self.info(&mut dups),
            24..=35 => self.transfer(&mut dups),
            36..=45 => self.batch(&mut dups),
            46..=55 => self.gather(&mut dups),
            56..=59 => self.random_command(&mut dups),
            60..=63 => self.valid_chain(&mut dups),
            64..=67 => self.version_or_stats(),
            68..=75 => self.map_and_touch(),
            76..=79 => self.unmap(),
            80..=85 => self.pool.close_one(&mut self.rng),
            86..=89 => self.reopen(),
            90..=92 => self.new_vm(),
            93..=97 => self.guest_read(),
            _ => self.fork_and_kill(),
        }
        dups.into_iter().for_each(close);
    }

    /// Unmaps what this worker mapped and drops its VM.
    pub fn finish(mut self) {
        while !self.maps.is_empty() {
            self.unmap();
        }
        self.vm = None;
    }

    fn create_region(&mut self) {
        if self.pool.len() >= POOL_MAX || self.pool.count(Kind::Region) >= REGIONS_MAX {
            return self.pool.close_kind(&mut self.rng, Kind::Region);
        }
        let arg = uapi::vmbeam_region_create {
            size: self.size(),
            flags: self.flags(uapi::VMBEAM_CREATE_EMPTY),
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

    fn bind(&mut self, dups: &mut Vec<Fd>) {
        let (region, region_kind) = self.fd_arg(Kind::Region, dups);
        let region_fd = dups.last().copied();
        let (vm, vm_kind) = self.fd_arg(Kind::Vm, dups);
        let vm_fd = dups.last().copied();
        let bound = if self.rng.gen_bool(0.5) {
            let arg = uapi::vmbeam_region_bind { vm_fd: vm, flags: self.flags(0), reserved: self.reserved() };
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
        if bound {
            bump(&self.pool.reached.binds);
            if let (Some(r), Some(v), Some(Kind::Region), Some(Kind::Vm)) = (region_fd, vm_fd, region_kind, vm_kind) {
                self.pool.note_owner(r, v);
            }
        }
    }

    fn info(&mut self, dups: &mut Vec<Fd>) {
        let (region, kind) = self.fd_arg(Kind::Region, dups);
        let arg = uapi::vmbeam_region_info { flags: self.flags(0), reserved: self.reserved(), ..Default::default() };
        let addr = self.place(arg);
        let _ = self.ioctl(region, uapi::VMBEAM_IOCTL_REGION_INFO, addr, Self::oracle(kind, &[]));
    }

    /// One transfer entry; half the time naming a region's real owner (so
    /// that transfers go through), and the (region, new owner) it names.
    fn entry(&mut self, dups: &mut Vec<Fd>) -> (uapi::vmbeam_transfer, bool, Option<(Fd, Fd)>) {
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

    fn transfer(&mut self, dups: &mut Vec<Fd>) {
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

    fn batch(&mut self, dups: &mut Vec<Fd>) {
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

    fn gather(&mut self, dups: &mut Vec<Fd>) {
        let (src_fd, a) = self.fd_arg(Kind::Region, dups);
        let into = self.rng.gen_bool(0.5);
        let (dst_fd, b) = if into { self.fd_arg(Kind::Region, dups) } else { (0, Some(Kind::Closed)) };
        let n = self.rng.gen_range(1..=32);
        let offsets: Vec<u64> = (0..n)
            .map(|_| match self.rng.gen_range(0..20) {
                0 => self.rng.gen(),
                1 => self.rng.gen_range(0..REGION_MAX_PAGES * 4096),
                _ => self.rng.gen_range(0..64) * 4096,
            })
            .collect();
        let count = match self.rng.gen_range(0..15) {
            0 => 0,
            1 => u64::from(uapi::VMBEAM_GATHER_MAX) + 1,
            2 => self.rng.gen(),
            _ => n,
        };
        let arg = uapi::vmbeam_gather {
            offsets: if self.rng.gen_range(0..15) == 0 { 0x10 } else { offsets.as_ptr() as u64 },
            count,
            src_fd,
            flags: if into { uapi::VMBEAM_GATHER_INTO } else { self.flags(0) },
            dst_fd,
            pad: u32::from(self.rng.gen_range(0..30) == 0),
            dst_offset: if into { self.rng.gen_range(0..64) * 4096 } else { 0 },
        };
        let addr = self.place(arg);
        let dev = self.pool.device;
        let oracle = Self::oracle(Some(Kind::Device), &[a, b]);
        if let Ok(fd) = self.ioctl(dev, uapi::VMBEAM_IOCTL_GATHER, addr, oracle) {
            bump(&self.pool.reached.gathers);
            if fd > 0 {
                self.pool.add(Fd::new(fd, Kind::Region));
            }
        }
    }

    /// A well-formed life of a region: created, bound to a pool VM, moved
    /// to another in a batch, some pages gathered out of it. Every call is
    /// valid when made; the other workers' calls race it.
    fn valid_chain(&mut self, dups: &mut Vec<Fd>) {
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
            let gather = uapi::vmbeam_gather {
                offsets: offsets.as_ptr() as u64,
                count: offsets.len() as u64,
                src_fd: region.raw,
                ..Default::default()
            };
            if let Ok(fd) = self.ioctl(dev, uapi::VMBEAM_IOCTL_GATHER, (&raw const gather) as u64, true) {
                bump(&self.pool.reached.gathers);
                dups.push(Fd::new(fd, Kind::Region));
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
    fn random_command(&mut self, dups: &mut Vec<Fd>) {
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

    fn version_or_stats(&mut self) {
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

    fn map_and_touch(&mut self) {
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

    fn unmap(&mut self) {
        if self.maps.is_empty() {
            return;
        }
        let m = self.maps.swap_remove(self.rng.gen_range(0..self.maps.len()));
        // SAFETY: a mapping this worker made and no memslot refers to.
        unsafe { libc::munmap(m.addr as *mut c_void, m.len as usize) };
    }

    fn reopen(&mut self) {
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

    fn new_vm(&mut self) {
        if self.pool.count(Kind::Vm) >= VMS_MAX {
            return self.pool.close_kind(&mut self.rng, Kind::Vm);
        }
        if self.pool.len() >= POOL_MAX {
            // Make room, but never at the VMs' expense: without VMs nothing
            // binds or moves.
            self.pool.close_kind(&mut self.rng, Kind::Region);
        }
        let Some(kvm) = self.pool.pick(&mut self.rng, Some(Kind::Kvm)) else { return };
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
    /// random moment, possibly inside a call.
    fn fork_and_kill(&mut self) {
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
    fn guest_read(&mut self) {
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
        loop {
            let create = uapi::vmbeam_region_create { size: 64 * 4096, ..Default::default() };
            let region = libc::ioctl(dev, uapi::VMBEAM_IOCTL_CREATE_REGION as libc::c_ulong, &create);
            let bind = uapi::vmbeam_region_bind { vm_fd: vm, ..Default::default() };
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
            }
            let t =
                uapi::vmbeam_transfer { region_fd: region, from_vm_fd: vm, to_vm_fd: target_vm, ..Default::default() };
            libc::ioctl(dev, uapi::VMBEAM_IOCTL_TRANSFER as libc::c_ulong, &t);
            // The old owner's page is gone now: no more touching.
            libc::close(region);
        }
    }
}
