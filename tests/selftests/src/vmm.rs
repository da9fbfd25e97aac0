//! A VMM in a process of its own, driven over a socketpair: what an L1's
//! VMM is to vmbeam. KVM accepts VM ioctls only from the VM's creator, and
//! vmbeam lets only the owner VM's creator map a region, so the tests need
//! real separate processes. Requests and replies are JSON lines; fds travel
//! with them over SCM_RIGHTS (`vmbeam::control::Connection`).

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
};

use nix::{
    sys::{
        mman::{mmap, MapFlags, ProtFlags},
        signal::Signal,
        wait::{waitpid, WaitStatus},
    },
    unistd::{fork, ForkResult, Pid},
};
use serde::{Deserialize, Serialize};

use vmbeam::control::{CodecError, Connection};
use vmbeam_lab::{kvm_stats::Stats, kvm_util, probe};

use crate::guest::{programs, Exit, TestVm};

/// A guest program to run over a memslot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Program {
    /// Write the pseudo-random sequence from `seed`.
    Fill { seed: u32 },
    /// Sum what is there.
    Sum,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Create this VMM's VM; the reply carries its fd.
    CreateVm,
    /// Create a region of `size` bytes in `blocks` (4 KiB pages by
    /// default), bind it to our VM and attach it. The reply carries the
    /// region fd.
    CreateRegion {
        size: u64,
        slot: u32,
        gpa: u64,
        #[serde(default)]
        blocks: vmbeam::Blocks,
    },
    /// Create a plain shmem memfd of `size` bytes and attach it like a
    /// region (the fd-handover peer in `make bench`). The reply carries it.
    CreateMemfd { size: u64, slot: u32, gpa: u64 },
    /// Bind the region fd sent along to our VM and attach it.
    Bind { slot: u32, gpa: u64 },
    /// Map the region fd sent along (MAP_SHARED|MAP_POPULATE) and register
    /// it as memslot `slot` at `gpa`; replies with the host address.
    Attach { slot: u32, gpa: u64 },
    /// Like `Attach`, for a file this VMM opens itself (read-write): a
    /// region fd it holds, reopened as `/proc/self/fd/N`, as QEMU's
    /// `memory-backend-file mem-path=` does.
    AttachPath { slot: u32, gpa: u64, path: String },
    /// `VMBEAM_REGION_INFO` of slot `slot`'s region as this VMM sees it:
    /// replies with its `VMBEAM_REGION_*` state bits.
    Info { slot: u32 },
    /// Run `program` over `count` dwords of memslot `slot`, one every
    /// `stride` bytes; replies with what the guest reported.
    Run { slot: u32, program: Program, offset: u64, count: u32, stride: u32 },
    /// Map all of memslot `slot` into the VM's stage-2 tables from the host
    /// (`KVM_PRE_FAULT_MEMORY`): the eager grant at KVM's level, so the
    /// guest's first touch of each page is no VM exit.
    PreFault { slot: u32 },
    /// One of KVM's binary statistics (`KVM_GET_STATS_FD`) of this VMM's VM
    /// (`vcpu: false`, e.g. `pages_2m`) or its vCPU (`pf_taken`).
    KvmStat { name: String, vcpu: bool },
    /// Read one byte of memslot `slot`'s mapping from the VMM itself.
    /// Replies with the byte, or `Err` "SIGBUS" if the access faulted.
    Touch { slot: u32, offset: u64 },
    /// mmap the slot's region again; replies with the errno on failure.
    Remap { slot: u32 },
    /// Remember the first dword of every page of slot `slot` (read through
    /// its mapping now) as what [`Request::Churn`] must find.
    Snapshot { slot: u32 },
    /// For `millis`, round after round: mmap slot `slot`'s region afresh
    /// (no populate), read the first dword of every page, munmap. The reads
    /// are this process's own (`guest: false`: every page a fresh user
    /// fault) or its guest's through a temporary memslot (`guest: true`:
    /// every page a fresh KVM fault). Replies with the rounds made, or
    /// `Err` counting refused mmaps, SIGBUS, KVM_RUN errors and values that
    /// differ from the [`Request::Snapshot`]. With `revocable`, losing the
    /// region is expected (refused mmaps, SIGBUS, KVM_RUN `EFAULT` are not
    /// failures, wrong values still are) and the reply counts the rounds
    /// in which every read succeeded.
    Churn { slot: u32, millis: u64, guest: bool, revocable: bool },
    /// Exit.
    Quit,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Ok(u64),
    Err { errno: i32, what: String },
}

struct Slot {
    region: OwnedFd,
    hva: u64,
    size: u64,
    gpa: u64,
    /// First dword of every page, from [`Request::Snapshot`].
    expected: Vec<u32>,
}

/// The child process.
pub struct Vmm {
    pub pid: Pid,
    conn: Connection,
}

impl Vmm {
    /// Forks a VMM process.
    pub fn spawn() -> Self {
        let (parent, child) = UnixStream::pair().expect("socketpair");
        // SAFETY: the selftests are single-threaded when they fork.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(parent);
                serve(child);
                // SAFETY: leave without running the parent's destructors.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child: pid } => Self { pid, conn: Connection::new(parent) },
        }
    }

    /// Sends `req` (with `fds`), waits for the reply; returns it with any fd
    /// that came back.
    pub fn call(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(u64, Option<OwnedFd>), (i32, String)> {
        self.conn.send(req, fds).map_err(|e| (0, format!("send: {e}")))?;
        match self.conn.recv::<Reply>() {
            Ok((Reply::Ok(v), fds)) => Ok((v, fds.into_iter().next())),
            Ok((Reply::Err { errno, what }, _)) => Err((errno, what)),
            Err(CodecError::Closed | CodecError::Truncated) => {
                Err((0, format!("VMM {} died: {:?}", self.pid, waitpid(self.pid, None))))
            }
            Err(e) => Err((0, format!("reply from VMM {}: {e}", self.pid))),
        }
    }

    /// Sends `req` without waiting; [`Vmm::wait`] collects the reply.
    pub fn start(&mut self, req: &Request) -> Result<(), String> {
        self.conn.send(req, &[]).map_err(|e| format!("send: {e}"))
    }

    /// The reply to a request sent with [`Vmm::start`], or `None` after
    /// `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<Result<u64, (i32, String)>> {
        self.conn.stream().set_read_timeout(Some(timeout)).ok()?;
        let got = self.conn.recv::<Reply>();
        self.conn.stream().set_read_timeout(None).ok()?;
        match got.ok()?.0 {
            Reply::Ok(v) => Some(Ok(v)),
            Reply::Err { errno, what } => Some(Err((errno, what))),
        }
    }

    /// Like `call`, with errors as text for a test's `Err`.
    pub fn ok(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(u64, Option<OwnedFd>), String> {
        self.call(req, fds).map_err(|(errno, what)| format!("VMM {} {req:?}: {what} (errno {errno})", self.pid))
    }

    /// KVM's binary statistic `name` of this VMM's VM, or of its vCPU.
    pub fn kvm_stat(&mut self, name: &str, vcpu: bool) -> Result<u64, String> {
        self.ok(&Request::KvmStat { name: name.into(), vcpu }, &[]).map(|(v, _)| v)
    }

    /// Kills the process and reaps it.
    pub fn kill(self) -> WaitStatus {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        waitpid(self.pid, None).unwrap_or(WaitStatus::StillAlive)
    }

    /// Forks a VMM that first runs `prepare` (e.g. binds a region to
    /// itself) and then execs `binary` (a selftest that calls
    /// [`serve_if_exec_vmm`] first) with `--vmm FD`: the same process, a new
    /// image, serving requests there. The fds in `keep` stay open across
    /// the exec at the same numbers. If `prepare` fails the child exits
    /// with status 3 (the first request then says the VMM died).
    pub fn spawn_exec(binary: &std::path::Path, keep: &[BorrowedFd<'_>], prepare: impl FnOnce() -> bool) -> Self {
        use std::{ffi::CString, os::fd::AsRawFd, os::unix::ffi::OsStrExt};
        let (parent, child) = UnixStream::pair().expect("socketpair");
        // Everything exec needs is allocated before the fork.
        let path = CString::new(binary.as_os_str().as_bytes()).expect("binary path");
        let args = [path.clone(), CString::from(c"--vmm"), CString::new(child.as_raw_fd().to_string()).expect("fd")];
        let keep: Vec<i32> = keep.iter().map(AsRawFd::as_raw_fd).chain([child.as_raw_fd()]).collect();
        // SAFETY: the selftests are single-threaded when they fork.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(parent);
                if !prepare() {
                    // SAFETY: leave without running the parent's destructors.
                    unsafe { libc::_exit(3) }
                }
                for fd in keep {
                    // SAFETY: clears FD_CLOEXEC on an fd this process holds.
                    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
                }
                let _ = nix::unistd::execv(&path, &args);
                // SAFETY: the exec failed; leave without the parent's destructors.
                unsafe { libc::_exit(127) }
            }
            ForkResult::Parent { child: pid } => Self { pid, conn: Connection::new(parent) },
        }
    }

    /// Asks the process to exit and reaps it.
    pub fn quit(mut self) -> WaitStatus {
        let _ = self.call(&Request::Quit, &[]);
        waitpid(self.pid, None).unwrap_or(WaitStatus::StillAlive)
    }
}

/// In a selftest started by [`Vmm::spawn_exec`] (`--vmm FD`): serves as
/// that VMM and exits; otherwise returns at once. Call it first in `main`.
pub fn serve_if_exec_vmm() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, fd] = &args[..] {
        if flag == "--vmm" {
            let fd: i32 = fd.parse().expect("--vmm FD");
            // SAFETY: the socket `spawn_exec` kept open across the exec for
            // us; nothing else in this new image owns it.
            serve(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            std::process::exit(0);
        }
    }
}

fn serve(sock: UnixStream) {
    // A revoked page's SIGBUS becomes a failed `probe::read_byte`.
    probe::install_handlers().expect("signal handlers");
    let mut conn = Connection::new(sock);
    let mut vm: Option<TestVm> = None;
    let mut slots = BTreeMap::new();
    loop {
        let (req, fd) = match conn.recv::<Request>() {
            Ok((req, fds)) => (req, fds.into_iter().next()),
            Err(CodecError::Json(e)) => {
                let _ = reply(&conn, Err((0, format!("bad request: {e}"))), None);
                continue;
            }
            Err(_) => return,
        };
        if let Request::Quit = req {
            let _ = reply(&conn, Ok(0), None);
            return;
        }
        let mut out_fd = None;
        let result = handle(req, fd, &mut vm, &mut slots, &mut out_fd);
        let _ = reply(&conn, result, out_fd.as_ref().map(|f: &OwnedFd| f.as_fd()));
    }
}

fn reply(conn: &Connection, result: Res, fd: Option<BorrowedFd<'_>>) -> Result<(), CodecError> {
    let r = match result {
        Ok(v) => Reply::Ok(v),
        Err((errno, what)) => Reply::Err { errno, what },
    };
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    conn.send(&r, &fds)
}

type Res = Result<u64, (i32, String)>;

fn errno_of(e: &vmbeam::Error) -> i32 {
    e.errno().map_or(0, |e| e as i32)
}

fn map_region(fd: &OwnedFd, size: u64) -> Result<u64, (i32, String)> {
    map_region_with(fd, size, MapFlags::MAP_POPULATE)
}

fn map_region_with(fd: &OwnedFd, size: u64, extra: MapFlags) -> Result<u64, (i32, String)> {
    // SAFETY: a fresh shared mapping of a region fd at an address the kernel
    // picks; it is only ever touched through this VMM's guest and probes.
    let addr = unsafe {
        mmap(
            None,
            std::num::NonZeroUsize::new(size as usize).ok_or((libc::EINVAL, "size 0".into()))?,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | extra,
            fd,
            0,
        )
    }
    .map_err(|e| (e as i32, format!("mmap region: {e}")))?;
    Ok(addr.as_ptr() as u64)
}

fn handle(
    req: Request,
    fd: Option<OwnedFd>,
    vm: &mut Option<TestVm>,
    slots: &mut BTreeMap<u32, Slot>,
    out_fd: &mut Option<OwnedFd>,
) -> Res {
    let need_vm = |vm: &mut Option<TestVm>| -> Result<(), (i32, String)> {
        if vm.is_none() {
            return Err((libc::ENODEV, "no VM yet".into()));
        }
        Ok(())
    };
    match req {
        Request::CreateVm => {
            let new = TestVm::new().map_err(|e| (0, e))?;
            *out_fd = Some(new.vm_fd().map_err(|e| (0, e))?);
            *vm = Some(new);
            Ok(0)
        }
        Request::CreateRegion { size, slot, gpa, blocks } => {
            need_vm(vm)?;
            let dev = vmbeam::Device::open().map_err(|e| (errno_of(&e), e.to_string()))?;
            let region = dev.create_region_blocks(size, false, blocks);
            let region = region.map_err(|e| (errno_of(&e), e.to_string()))?;
            let vm_ref = vm.as_ref().unwrap();
            region.bind(vm_ref.vm_borrowed()).map_err(|e| (errno_of(&e), e.to_string()))?;
            let fd = region.into_fd();
            *out_fd = Some(fd.try_clone().map_err(|e| (0, e.to_string()))?);
            attach(vm_ref, slots, fd, slot, gpa)
        }
        Request::CreateMemfd { size, slot, gpa } => {
            need_vm(vm)?;
            let fd = nix::sys::memfd::memfd_create(c"vmbeam-bench", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
                .map_err(|e| (e as i32, format!("memfd_create: {e}")))?;
            nix::unistd::ftruncate(&fd, size as i64).map_err(|e| (e as i32, format!("ftruncate: {e}")))?;
            *out_fd = Some(fd.try_clone().map_err(|e| (0, e.to_string()))?);
            attach(vm.as_ref().unwrap(), slots, fd, slot, gpa)
        }
        Request::Bind { slot, gpa } => {
            need_vm(vm)?;
            let fd = fd.ok_or((libc::EBADF, "no region fd sent".into()))?;
            let region = vmbeam::Region::from_fd(fd);
            let vm_ref = vm.as_ref().unwrap();
            region.bind(vm_ref.vm_borrowed()).map_err(|e| (errno_of(&e), e.to_string()))?;
            attach(vm_ref, slots, region.into_fd(), slot, gpa)
        }
        Request::Attach { slot, gpa } => {
            need_vm(vm)?;
            let fd = fd.ok_or((libc::EBADF, "no region fd sent".into()))?;
            attach(vm.as_ref().unwrap(), slots, fd, slot, gpa)
        }
        Request::AttachPath { slot, gpa, path } => {
            need_vm(vm)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| (e.raw_os_error().unwrap_or(0), format!("open {path}: {e}")))?;
            attach(vm.as_ref().unwrap(), slots, file.into(), slot, gpa)
        }
        Request::Info { slot } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            let fd = s.region.try_clone().map_err(|e| (0, e.to_string()))?;
            let info = vmbeam::Region::from_fd(fd).info().map_err(|e| (errno_of(&e), e.to_string()))?;
            let bit = |on: bool, flag: u32| if on { u64::from(flag) } else { 0 };
            use vmbeam::uapi::{VMBEAM_REGION_MINE, VMBEAM_REGION_MOVING, VMBEAM_REGION_OWNED};
            Ok(bit(info.owned, VMBEAM_REGION_OWNED)
                | bit(info.mine, VMBEAM_REGION_MINE)
                | bit(info.moving, VMBEAM_REGION_MOVING))
        }
        Request::Run { slot, program, offset, count, stride } => {
            need_vm(vm)?;
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            let (code, seed) = match program {
                Program::Fill { seed } => (programs::FILL, seed),
                Program::Sum => (programs::SUM, 0),
            };
            let vm = vm.as_mut().unwrap();
            vm.load(code, [u64::from(seed), 0, u64::from(count), 0, u64::from(stride), s.gpa + offset])
                .map_err(|e| (0, e))?;
            match vm.run() {
                Ok(Exit::Out(v)) => Ok(u64::from(v)),
                Ok(other) => Err((0, format!("guest exit {other:?}"))),
                Err(e) => Err((e.errno(), format!("KVM_RUN: {e}"))),
            }
        }
        Request::PreFault { slot } => {
            need_vm(vm)?;
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            kvm_util::pre_fault_memory(&vm.as_ref().unwrap().vcpu, s.gpa, s.size)
                .map_err(|e| (e.error.raw_os_error().unwrap_or(0), e.to_string()))?;
            Ok(s.size)
        }
        Request::KvmStat { name, vcpu } => {
            need_vm(vm)?;
            let vm = vm.as_ref().unwrap();
            let stats = if vcpu { Stats::of(&vm.vcpu) } else { Stats::of(&vm.vm) };
            let errno = |e: std::io::Error| (e.raw_os_error().unwrap_or(libc::ENOENT), e.to_string());
            stats.and_then(|s| s.get(&name)).map_err(errno)
        }
        Request::Touch { slot, offset } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            if offset >= s.size {
                return Err((libc::EINVAL, "offset beyond slot".into()));
            }
            // SAFETY: inside this VMM's mapping of the region; only this
            // (single-threaded) process probes.
            let Some(byte) = (unsafe { probe::read_byte((s.hva + offset) as *const u8) }) else {
                return Err((libc::EFAULT, "SIGBUS".into()));
            };
            Ok(u64::from(byte))
        }
        Request::Remap { slot } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            map_region(&s.region, s.size)
        }
        Request::Snapshot { slot } => {
            let s = slots.get_mut(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            // SAFETY: the slot's own live mapping.
            s.expected = (0..s.size / 4096)
                .map(|page| unsafe { read_dword(s.hva + page * 4096) }.ok_or((libc::EFAULT, "SIGBUS".into())))
                .collect::<Result<_, _>>()?;
            Ok(s.expected.len() as u64)
        }
        Request::Churn { slot, millis, guest, revocable } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            let vm = if guest { Some(vm.as_mut().ok_or((libc::ENODEV, "no VM yet".into()))?) } else { None };
            crate::churn::run(s.region.as_fd(), &s.expected, millis, vm, revocable)
        }
        Request::Quit => Ok(0),
    }
}

fn attach(vm: &TestVm, slots: &mut BTreeMap<u32, Slot>, region: OwnedFd, slot: u32, gpa: u64) -> Res {
    // A region knows its size; any other file (a memfd) says it in fstat.
    let size = match vmbeam::Region::from_fd(region.try_clone().map_err(|e| (0, e.to_string()))?).info() {
        Ok(info) => info.size,
        Err(e) => match nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&region)) {
            Ok(st) if st.st_size > 0 => st.st_size as u64,
            _ => return Err((errno_of(&e), e.to_string())),
        },
    };
    let hva = map_region(&region, size)?;
    // SAFETY: the mapping lives as long as this process (never unmapped).
    unsafe { vm.add_memslot(slot, gpa, hva, size) }
        .map_err(|e| (e.errno(), format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    slots.insert(slot, Slot { region, hva, size, gpa, expected: Vec::new() });
    Ok(hva)
}

/// Page frame numbers behind `len` bytes at `hva` in process `pid`; 0 for a
/// page not present.
pub fn pfns(pid: Pid, hva: u64, len: u64) -> Result<Vec<u64>, String> {
    vmbeam::pagemap::frames(pid.as_raw() as u32, hva, len).map_err(|e| format!("pagemap: {e}"))
}

/// Reads the dword at `addr` byte by byte through the SIGBUS probe.
///
/// # Safety
///
/// `addr..addr+4` must lie in a live mapping of this process.
pub(crate) unsafe fn read_dword(addr: u64) -> Option<u32> {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        // SAFETY: the caller's guarantee.
        *b = unsafe { probe::read_byte((addr + i as u64) as *const u8) }?;
    }
    Some(u32::from_le_bytes(bytes))
}

/// Maps `region` afresh without populating it (for [`crate::churn`]).
pub(crate) fn map_unpopulated(region: BorrowedFd<'_>, size: u64) -> Result<u64, (i32, String)> {
    let fd = region.try_clone_to_owned().map_err(|e| (0, e.to_string()))?;
    map_region_with(&fd, size, MapFlags::empty())
}
