//! A VMM in a process of its own, driven over a socketpair: what an L1's
//! VMM is to vmbeam. KVM accepts VM ioctls only from the VM's creator, and
//! vmbeam lets only the owner VM's creator map a region, so the tests need
//! real separate processes. Requests and replies are JSON lines; fds travel
//! with them over SCM_RIGHTS.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    sync::atomic::{AtomicUsize, Ordering},
};

use nix::{
    errno::Errno,
    sys::{
        mman::{mmap, MapFlags, ProtFlags},
        signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal},
        socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags},
        wait::{waitpid, WaitStatus},
    },
    unistd::{fork, ForkResult, Pid},
};
use serde::{Deserialize, Serialize};

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
    /// Create a region of `size` bytes, bind it to our VM and attach it.
    /// The reply carries the region fd.
    CreateRegion { size: u64, slot: u32, gpa: u64 },
    /// Bind the region fd sent along to our VM and attach it.
    Bind { slot: u32, gpa: u64 },
    /// Map the region fd sent along (MAP_SHARED|MAP_POPULATE) and register
    /// it as memslot `slot` at `gpa`; replies with the host address.
    Attach { slot: u32, gpa: u64 },
    /// Run `program` over `count` dwords of memslot `slot`, one every
    /// `stride` bytes; replies with what the guest reported.
    Run { slot: u32, program: Program, offset: u64, count: u32, stride: u32 },
    /// Read one byte of memslot `slot`'s mapping from the VMM itself.
    /// Replies with the byte, or `Err` "SIGBUS" if the access faulted.
    Touch { slot: u32, offset: u64 },
    /// mmap the slot's region again; replies with the errno on failure.
    Remap { slot: u32 },
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
}

/// The child process.
pub struct Vmm {
    pub pid: Pid,
    sock: UnixStream,
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
            ForkResult::Parent { child: pid } => Self { pid, sock: parent },
        }
    }

    /// Sends `req` (with `fds`), waits for the reply; returns it with any fd
    /// that came back.
    pub fn call(&mut self, req: &Request, fds: &[RawFd]) -> Result<(u64, Option<OwnedFd>), (i32, String)> {
        send(&self.sock, &serde_json::to_vec(req).unwrap(), fds).map_err(|e| (e as i32, format!("send: {e}")))?;
        let (bytes, fd) = recv(&self.sock).map_err(|e| (e as i32, format!("recv from VMM {}: {e}", self.pid)))?;
        if bytes.is_empty() {
            return Err((0, format!("VMM {} died: {:?}", self.pid, waitpid(self.pid, None))));
        }
        match serde_json::from_slice(&bytes).map_err(|e| (0, format!("bad reply: {e}")))? {
            Reply::Ok(v) => Ok((v, fd)),
            Reply::Err { errno, what } => Err((errno, what)),
        }
    }

    /// Sends `req` without waiting; [`Vmm::wait`] collects the reply.
    pub fn start(&mut self, req: &Request) -> Result<(), String> {
        send(&self.sock, &serde_json::to_vec(req).unwrap(), &[]).map_err(|e| format!("send: {e}"))
    }

    /// The reply to a request sent with [`Vmm::start`], or `None` after
    /// `timeout`.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Option<Result<u64, (i32, String)>> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let got = recv(&self.sock);
        self.sock.set_read_timeout(None).ok()?;
        let (bytes, _) = got.ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Reply::Ok(v) => Some(Ok(v)),
            Reply::Err { errno, what } => Some(Err((errno, what))),
        }
    }

    /// Like `call`, with errors as text for a test's `Err`.
    pub fn ok(&mut self, req: &Request, fds: &[RawFd]) -> Result<(u64, Option<OwnedFd>), String> {
        self.call(req, fds).map_err(|(errno, what)| format!("VMM {} {req:?}: {what} (errno {errno})", self.pid))
    }

    /// Kills the process and reaps it.
    pub fn kill(self) -> WaitStatus {
        let _ = nix::sys::signal::kill(self.pid, Signal::SIGKILL);
        waitpid(self.pid, None).unwrap_or(WaitStatus::StillAlive)
    }

    /// Asks the process to exit and reaps it.
    pub fn quit(mut self) -> WaitStatus {
        let _ = self.call(&Request::Quit, &[]);
        waitpid(self.pid, None).unwrap_or(WaitStatus::StillAlive)
    }
}

fn send(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let len = (bytes.len() as u32).to_le_bytes();
    let iov = [IoSlice::new(&len), IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    if sent != 4 + bytes.len() {
        return Err(Errno::EMSGSIZE);
    }
    Ok(())
}

/// One message; empty bytes on EOF.
fn recv(sock: &UnixStream) -> nix::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; 1 << 16];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: fresh fds received with this message, owned by us now.
            fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
        }
    }
    let n = msg.bytes;
    if n < 4 {
        return Ok((Vec::new(), fd));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    Ok((buf[4..4 + len.min(n - 4)].to_vec(), fd))
}

/// The page a SIGBUS handler patches over a faulting access (see `touch`).
static SIGBUS_ADDR: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize & !0xfff;
    SIGBUS_ADDR.store(addr, Ordering::SeqCst);
    // Put a private zero page over the faulting page so the access retries
    // and completes; the flag records that it faulted. mmap is a plain
    // syscall, safe in a handler.
    // SAFETY: replaces exactly the faulting page of a mapping being probed.
    unsafe {
        libc::mmap(
            addr as *mut _,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

fn serve(sock: UnixStream) {
    let handler = SigAction::new(SigHandler::SigAction(on_sigbus), SaFlags::SA_SIGINFO, SigSet::empty());
    // SAFETY: the handler only stores to an atomic and calls mmap.
    unsafe { sigaction(Signal::SIGBUS, &handler) }.expect("sigaction");
    let mut vm: Option<TestVm> = None;
    let mut slots = BTreeMap::new();
    loop {
        let Ok((bytes, fd)) = recv(&sock) else { return };
        if bytes.is_empty() {
            return;
        }
        let req: Request = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply(&sock, Err((0, format!("bad request: {e}"))), None);
                continue;
            }
        };
        if let Request::Quit = req {
            let _ = reply(&sock, Ok(0), None);
            return;
        }
        let mut out_fd = None;
        let result = handle(req, fd, &mut vm, &mut slots, &mut out_fd);
        let _ = reply(&sock, result, out_fd.as_ref().map(|f: &OwnedFd| f.as_raw_fd()));
    }
}

fn reply(sock: &UnixStream, result: Result<u64, (i32, String)>, fd: Option<RawFd>) -> nix::Result<()> {
    let r = match result {
        Ok(v) => Reply::Ok(v),
        Err((errno, what)) => Reply::Err { errno, what },
    };
    let fds: Vec<RawFd> = fd.into_iter().collect();
    send(sock, &serde_json::to_vec(&r).unwrap(), &fds)
}

type Res = Result<u64, (i32, String)>;

fn errno_of(e: &vmbeam::Error) -> i32 {
    e.errno().map_or(0, |e| e as i32)
}

fn map_region(fd: &OwnedFd, size: u64) -> Result<u64, (i32, String)> {
    // SAFETY: a fresh shared mapping of a region fd at an address the kernel
    // picks; it is only ever touched through this VMM's guest and `touch`.
    let addr = unsafe {
        mmap(
            None,
            std::num::NonZeroUsize::new(size as usize).ok_or((libc::EINVAL, "size 0".into()))?,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
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
        Request::CreateRegion { size, slot, gpa } => {
            need_vm(vm)?;
            let dev = vmbeam::Device::open().map_err(|e| (errno_of(&e), e.to_string()))?;
            let region = dev.create_region(size).map_err(|e| (errno_of(&e), e.to_string()))?;
            let vm_ref = vm.as_ref().unwrap();
            region.bind(vm_ref.vm_borrowed()).map_err(|e| (errno_of(&e), e.to_string()))?;
            let fd = region.into_fd();
            *out_fd = Some(fd.try_clone().map_err(|e| (0, e.to_string()))?);
            attach(vm_ref, slots, fd, slot, gpa)
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
        Request::Touch { slot, offset } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            if offset >= s.size {
                return Err((libc::EINVAL, "offset beyond slot".into()));
            }
            SIGBUS_ADDR.store(0, Ordering::SeqCst);
            // SAFETY: inside this VMM's mapping of the region; a revoked page
            // raises SIGBUS, which `on_sigbus` turns into a readable zero page.
            let byte = unsafe { std::ptr::read_volatile((s.hva + offset) as *const u8) };
            if SIGBUS_ADDR.load(Ordering::SeqCst) != 0 {
                return Err((libc::EFAULT, "SIGBUS".into()));
            }
            Ok(u64::from(byte))
        }
        Request::Remap { slot } => {
            let s = slots.get(&slot).ok_or((libc::ENOENT, format!("no slot {slot}")))?;
            map_region(&s.region, s.size)
        }
        Request::Quit => Ok(0),
    }
}

fn attach(vm: &TestVm, slots: &mut BTreeMap<u32, Slot>, region: OwnedFd, slot: u32, gpa: u64) -> Res {
    let size = vmbeam::Region::from_fd(region.try_clone().map_err(|e| (0, e.to_string()))?)
        .info()
        .map_err(|e| (errno_of(&e), e.to_string()))?
        .size;
    let hva = map_region(&region, size)?;
    // SAFETY: the mapping lives as long as this process (never unmapped).
    unsafe { vm.add_memslot(slot, gpa, hva, size) }
        .map_err(|e| (e.errno(), format!("KVM_SET_USER_MEMORY_REGION: {e}")))?;
    slots.insert(slot, Slot { region, hva, size, gpa });
    Ok(hva)
}

/// Page frame numbers behind `len` bytes at `hva` in process `pid`; 0 for a
/// page not present.
pub fn pfns(pid: Pid, hva: u64, len: u64) -> Result<Vec<u64>, String> {
    vmbeam::pagemap::frames(pid.as_raw() as u32, hva, len).map_err(|e| format!("pagemap: {e}"))
}
