//! The shared pool of fds of every kind, and how far the fuzzer got.

use std::{
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
};

use rand::{rngs::SmallRng, Rng};

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
    pub(super) origin: RawFd,
}

impl Fd {
    pub(super) fn new(raw: RawFd, kind: Kind) -> Self {
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
    /// Regions bound to a process (`VMBEAM_BIND_PROCESS`).
    pub process_binds: AtomicU64,
    /// Gathers that left fresh pages in the source (`VMBEAM_GATHER_REPLACE`).
    pub replacing_gathers: AtomicU64,
    /// Gathers from a region's first pages to named slots (`VMBEAM_GATHER_SCATTER`).
    pub scatters: AtomicU64,
    pub maps: AtomicU64,
    pub guest_runs: AtomicU64,
    pub children_killed: AtomicU64,
}

impl Reached {
    /// Whether every path has succeeded at least once.
    pub fn every_path(&self) -> bool {
        self.all().iter().all(|(_, n)| *n > 0)
    }

    /// `(name, count)` of every kind.
    pub fn all(&self) -> [(&'static str, u64); 11] {
        [
            ("regions created", self.regions.load(Relaxed)),
            ("binds", self.binds.load(Relaxed)),
            ("transfers", self.transfers.load(Relaxed)),
            ("batches", self.batches.load(Relaxed)),
            ("gathers", self.gathers.load(Relaxed)),
            ("process binds", self.process_binds.load(Relaxed)),
            ("replacing gathers", self.replacing_gathers.load(Relaxed)),
            ("scatters", self.scatters.load(Relaxed)),
            ("region mmaps", self.maps.load(Relaxed)),
            ("guest runs", self.guest_runs.load(Relaxed)),
            ("children killed", self.children_killed.load(Relaxed)),
        ]
    }
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// `_IO(KVMIO, 0x01)` and `_IO(KVMIO, 0x41)`.
pub(super) const KVM_CREATE_VM: u32 = 0xae01;
pub(super) const KVM_CREATE_VCPU: u32 = 0xae41;

/// Most fds in the pool; past it, workers close rather than open.
pub(super) const POOL_MAX: usize = 96;
/// Most regions and VMs in the pool, so neither kind crowds out the other.
pub(super) const REGIONS_MAX: usize = 48;
pub(super) const VMS_MAX: usize = 12;
/// Most fds of each other kind (vCPUs, /dev/kvm, memfds, pipes...).
pub(super) const OTHERS_MAX: usize = 6;
/// Largest region a worker creates (keeps 4 workers far from OOM).
pub(super) const REGION_MAX_PAGES: u64 = 1024;

struct PoolState {
    fds: Vec<Fd>,
    /// (region, VM) pool numbers: the VM a region was last bound or
    /// transferred to, so that some transfers name the real owner.
    owners: Vec<(RawFd, RawFd)>,
}

pub struct Pool {
    state: Mutex<PoolState>,
    pub(super) device: RawFd,
    pub reached: Reached,
    /// (command, errno or 0) -> calls, for the calls the oracle checked.
    pub results: Mutex<std::collections::BTreeMap<(u32, i32), u64>>,
}

pub(super) fn raw_or(ret: libc::c_int) -> Result<RawFd, i32> {
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

    pub(super) fn add(&self, fd: Fd) {
        self.lock().fds.push(fd);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().fds.len()
    }

    pub(super) fn count(&self, kind: Kind) -> usize {
        self.lock().fds.iter().filter(|f| f.kind == kind).count()
    }

    /// Removes and closes a random fd of `kind`.
    pub(super) fn close_kind(&self, rng: &mut SmallRng, kind: Kind) {
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
    pub(super) fn note_owner(&self, region: Fd, vm: Fd) {
        let mut state = self.lock();
        state.owners.retain(|&(r, _)| r != region.origin);
        state.owners.push((region.origin, vm.origin));
    }

    /// Forgets the VM `region` was last given to (it went to a process).
    pub(super) fn note_unowned(&self, region: Fd) {
        self.lock().owners.retain(|&(r, _)| r != region.origin);
    }

    /// A region and the VM it was last given to, both dup'ed.
    pub(super) fn pick_owned(&self, rng: &mut SmallRng) -> Option<(Fd, Fd)> {
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
    pub(super) fn pick(&self, rng: &mut SmallRng, kind: Option<Kind>) -> Option<Fd> {
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
    pub(super) fn pick_raw(&self, rng: &mut SmallRng) -> RawFd {
        let state = self.lock();
        state.fds[rng.gen_range(0..state.fds.len())].raw
    }

    /// Removes and closes a random fd (never /dev/vmbeam's).
    pub(super) fn close_one(&self, rng: &mut SmallRng) {
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

pub(super) fn open(path: &str) -> Result<RawFd, i32> {
    let path = std::ffi::CString::new(path).map_err(|_| libc::EINVAL)?;
    // SAFETY: a NUL-terminated path.
    raw_or(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

pub(super) fn close(fd: Fd) {
    if fd.kind != Kind::Closed {
        // SAFETY: a dup this worker owns.
        unsafe { libc::close(fd.raw) };
    }
}
