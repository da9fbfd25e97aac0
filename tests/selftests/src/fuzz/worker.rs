//! One fuzzing thread: its state, the argument helpers, and the dispatch.

use std::{
    ffi::c_void,
    os::fd::RawFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
};

use rand::{rngs::SmallRng, Rng};

use super::pool::{close, raw_or, Fd, Kind, Pool, REGION_MAX_PAGES};
use crate::guest::TestVm;

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
    libc::ESRCH,
    libc::EOPNOTSUPP,
];

/// A mapping of a region this worker made.
pub(super) struct Mapping {
    pub(super) addr: u64,
    pub(super) len: u64,
}

pub struct Worker {
    pub(super) pool: Arc<Pool>,
    pub(super) rng: SmallRng,
    pub(super) issued: Arc<AtomicU64>,
    pub(super) undocumented: Arc<Mutex<Vec<String>>>,
    pub(super) vm: Option<TestVm>,
    pub(super) maps: Vec<Mapping>,
    /// Two pages, the second PROT_NONE: arguments placed to straddle them
    /// are partly unreadable.
    pub(super) arg_page: u64,
    pub(super) mem: std::fs::File,
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
    pub(super) fn ioctl(&mut self, fd: RawFd, cmd: u32, arg: u64, oracle: bool) -> Result<i32, i32> {
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
    pub(super) fn arg_addr(&mut self, size: usize) -> u64 {
        match self.rng.gen_range(0..20) {
            0 => 0,
            1 => 0xffff_8000_0000_0000,
            2 => self.arg_page + 4096 - (size as u64 / 2).max(1),
            3 => self.arg_page + 4096,
            _ => self.arg_page + 4096 - size as u64,
        }
    }

    /// Writes `value` where [`Worker::arg_addr`] said, if it is writable.
    pub(super) fn place<T: Copy>(&mut self, value: T) -> u64 {
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

    pub(super) fn flags(&mut self, valid: u32) -> u32 {
        match self.rng.gen_range(0..10) {
            0 => self.rng.gen(),
            1 => 1 << self.rng.gen_range(0..32),
            _ if valid != 0 && self.rng.gen_bool(0.5) => valid,
            _ => 0,
        }
    }

    pub(super) fn reserved<const N: usize>(&mut self) -> [u64; N] {
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
    pub(super) fn fd_arg(&mut self, kind: Kind, dups: &mut Vec<Fd>) -> (i32, Option<Kind>) {
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
    pub(super) fn oracle(target: Option<Kind>, args: &[Option<Kind>]) -> bool {
        matches!(target, Some(Kind::Device | Kind::Region)) && args.iter().all(Option::is_some)
    }

    pub(super) fn size(&mut self) -> u64 {
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
            18..=20 => self.info(&mut dups),
            21..=23 => self.frames(&mut dups),
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
}
