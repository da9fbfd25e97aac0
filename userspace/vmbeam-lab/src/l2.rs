//! One L2 VM on a lab L1: a window (a vmbeam region mapped into the L1 at a
//! guest-physical address) and a vCPU of the L1 that runs the workload over
//! it in a thread of its own.
//!
//! Pausing kicks the vCPU thread out of KVM_RUN with SIGUSR1 (installed
//! without SA_RESTART, so KVM_RUN returns EINTR) until it reports that it
//! stopped; the time it stopped is the start of the L2's downtime.

use std::{
    os::unix::thread::JoinHandleExt,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestRegionMmap;
use vmbeam::{
    control::{L2Info, L2State, RegionState, Regs, Window},
    Region,
};

use crate::{
    cpu, kvm_util, probe,
    saved_state::SavedState,
    workload::{self, Header},
};

/// The longest a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuState {
    Running,
    Paused,
    Corrupt,
    Failed,
}

#[derive(Debug)]
struct Ctl {
    want: Want,
    state: VcpuState,
    paused_at_ns: Option<u64>,
    resumed_at_ns: Option<u64>,
    /// Where the workload continues after the resume stub (see `start`).
    resume_rip: Option<u64>,
    detail: Option<String>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// The vCPU thread's id, for tracing its guest entries and exits.
    tid: std::sync::OnceLock<u32>,
    /// Held by the vCPU thread while it is in KVM_RUN; others take it only
    /// while the vCPU is paused. Never taken while holding `ctl`.
    vcpu: Mutex<VcpuFd>,
}

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vcpu(&self) -> MutexGuard<'_, VcpuFd> {
        self.vcpu.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop_with(&self, state: VcpuState, detail: String) {
        tracing::warn!(?state, "{detail}");
        let mut ctl = self.ctl();
        ctl.state = state;
        ctl.detail = Some(detail);
        if ctl.want == Want::Run {
            ctl.want = Want::Pause;
        }
        self.cv.notify_all();
    }
}

pub struct L2 {
    pub name: String,
    pub window: Window,
    pub slot: u32,
    pub region: Region,
    pub memory: GuestRegionMmap<()>,
    /// Its state went out (`send-regions`, or `pause` with `save_state`):
    /// whoever holds its region fds may take the memory at any moment.
    pub sent: bool,
    /// The header as last read (kept for when the window is not ours).
    last: Header,
    /// What the window held at the dword `last` says was changed, when
    /// that header was read (see [`Header::explain_bad`]).
    bad_now: Option<u32>,
    runner: Runner,
}

/// A vCPU and the thread that runs it, paused until an L2 starts it: made
/// with the L2, or ahead, when an L2 is staged (`L1::stage`), so that a
/// commit inside the L2's downtime neither creates a vCPU nor a thread.
/// Dropping it stops the thread.
pub struct Runner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Runner {
    /// A thread for `vcpu` (KVM's vCPU `id`, set up in the workload's flat
    /// mode), paused. Named after the vCPU, not an L2: it may run several.
    pub fn spawn(id: u64, vcpu: VcpuFd) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                want: Want::Pause,
                state: VcpuState::Paused,
                paused_at_ns: None,
                resumed_at_ns: None,
                resume_rip: None,
                detail: None,
            }),
            cv: Condvar::new(),
            tid: std::sync::OnceLock::new(),
            vcpu: Mutex::new(vcpu),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new().name(format!("vcpu-{id}")).spawn(move || vcpu_loop(&worker))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Readies a runner whose L2 left for another one; false if its vCPU
    /// stopped on an error (then it is dropped, not reused). Its registers
    /// are set when the next L2 starts; its segments are the flat mode
    /// every lab L2 runs in.
    /// A paused vCPU holds no pending `out` (`complete_pending_io`), so
    /// the next L2's first `out` cannot be taken for the last one's.
    pub fn recycle(&self) -> bool {
        let mut ctl = self.shared.ctl();
        if ctl.state != VcpuState::Paused || ctl.want != Want::Pause {
            return false;
        }
        ctl.paused_at_ns = None;
        ctl.resumed_at_ns = None;
        ctl.resume_rip = None;
        ctl.detail = None;
        true
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the thread is alive until joined in `drop`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shared.ctl().want = Want::Stop;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                // SAFETY: not joined yet, so the thread is alive.
                unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

impl L2 {
    /// An L2 over `memory`, run by `runner` (paused).
    pub fn new(
        name: String,
        window: Window,
        slot: u32,
        region: Region,
        memory: GuestRegionMmap<()>,
        runner: Runner,
    ) -> Self {
        let last = Header::read(&memory).unwrap_or_default();
        let bad_now = last.read_bad_dword(&memory, window.gpa);
        Self { name, window, slot, region, memory, sent: false, last, bad_now, runner }
    }

    /// Its vCPU and thread, for another L2 (the mapping and region go).
    pub fn into_runner(self) -> Runner {
        self.runner
    }

    /// Whether it left for another VM for good: sent, and its region now
    /// another's (not in the middle of a move). Its window is free then.
    pub fn has_left(&self) -> bool {
        self.sent && self.region.info().is_ok_and(|i| i.owned && !i.mine && !i.moving)
    }

    /// Loads `regs` and runs. With `via_resume_stub`, the first guest
    /// instruction is the workload's resume stub (`out PORT_RESUMED`), whose
    /// exit stamps the first instruction after the move; the vCPU then
    /// continues at `regs.rip`.
    pub fn start(&self, regs: &Regs, via_resume_stub: bool) -> Result<(), kvm_ioctls::Error> {
        let mut kvm_regs = cpu::to_kvm(regs);
        if via_resume_stub {
            kvm_regs.rip = workload::CODE_GPA + workload::RESUME;
        }
        self.runner.shared.vcpu().set_regs(&kvm_regs)?;
        let mut ctl = self.runner.shared.ctl();
        ctl.resume_rip = via_resume_stub.then_some(regs.rip);
        ctl.want = Want::Run;
        self.runner.shared.cv.notify_all();
        Ok(())
    }

    /// Asks the vCPU to stop and kicks it; [`L2::wait_paused`] waits for it.
    /// Pausing several L2s asks them all first, so they stop together.
    pub fn request_pause(&self) {
        let mut ctl = self.runner.shared.ctl();
        if ctl.state == VcpuState::Running {
            ctl.want = Want::Pause;
            drop(ctl);
            self.kick();
        }
    }

    /// Waits until the vCPU stopped; returns when (CLOCK_MONOTONIC ns).
    pub fn wait_paused(&self) -> Result<u64, String> {
        let mut ctl = self.runner.shared.ctl();
        if ctl.state == VcpuState::Running && ctl.want != Want::Pause {
            return Err("not asked to pause".into());
        }
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while ctl.state == VcpuState::Running {
            // Again and again: a kick that lands just before KVM_RUN is lost.
            self.kick();
            ctl =
                self.runner.shared.cv.wait_timeout(ctl, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
            if Instant::now() > deadline {
                return Err(format!("the vCPU did not stop within {PAUSE_TIMEOUT:?}"));
            }
        }
        match ctl.state {
            VcpuState::Paused => ctl.paused_at_ns.ok_or_else(|| "it never ran".to_string()),
            state => Err(format!("{state:?}: {}", self.detail(&ctl))),
        }
    }

    /// Why the vCPU stopped for good; for a changed dword also what the
    /// header (as last read) says of the value found.
    fn detail(&self, ctl: &Ctl) -> String {
        let detail = ctl.detail.as_deref().unwrap_or("?");
        match self.last.explain_bad(self.window.gpa, self.bad_now).filter(|_| ctl.state == VcpuState::Corrupt) {
            Some(why) => format!("{detail}; {why}"),
            None => detail.to_string(),
        }
    }

    /// Lets a paused vCPU run again where it stopped.
    pub fn resume(&mut self) -> Result<(), String> {
        let mut ctl = self.runner.shared.ctl();
        match ctl.state {
            VcpuState::Running => Ok(()),
            VcpuState::Paused => {
                ctl.want = Want::Run;
                self.runner.shared.cv.notify_all();
                self.sent = false;
                Ok(())
            }
            state => Err(format!("cannot resume a vCPU that is {state:?}: {}", self.detail(&ctl))),
        }
    }

    /// Maps the whole window into the VM's stage-2 tables from the host
    /// (`KVM_PRE_FAULT_MEMORY`, 6.10), so the vCPU starts without a nested
    /// page fault per page: its memory just came here (received, or back
    /// after a move) and nothing maps it in the VM yet. Faster to run, and
    /// under TCG's emulated SVM a storm of nested page faults now and then
    /// resumes a vCPU at a wild rip (README, Tests). The vCPU must be
    /// paused; `Err` says why not (the L2 then faults its pages in lazily).
    pub fn prefault(&self) -> Result<(), String> {
        kvm_util::pre_fault_memory(&self.runner.shared.vcpu(), self.window.gpa, self.window.size)
            .map_err(|e| e.to_string())
    }

    pub fn is_running(&self) -> bool {
        self.runner.shared.ctl().state == VcpuState::Running
    }

    /// Writes the paused L2's registers into its own window, for the L1
    /// its memory moves to (`pause` with `save_state`), and marks it sent:
    /// from now on whoever holds its region fds may take the memory.
    pub fn save_state(&mut self) -> Result<(), String> {
        // A region lent out could be taken before the pause; a store to a
        // revoked window would be a SIGBUS for the whole L1.
        let region = self.region.info().map_err(|e| format!("VMBEAM_REGION_INFO: {e}"))?;
        if !region.mine || region.moving {
            return Err("its region is no longer this L1's".into());
        }
        let paused_at_ns = self.runner.shared.ctl().paused_at_ns.ok_or("it never ran")?;
        let state = SavedState { regs: self.regs()?, paused_at_ns, passes: self.last.passes() };
        state.write(&self.memory).map_err(|e| format!("saving the state in the window: {e}"))?;
        self.sent = true;
        Ok(())
    }

    /// Forgets a state [`L2::save_state`] left in the window; for an L2
    /// about to run here again, whose region must be this L1's.
    pub fn clear_saved_state(&self) -> Result<(), String> {
        SavedState::clear(&self.memory).map_err(|e| format!("clearing the saved state: {e}"))
    }

    /// The paused vCPU's registers.
    pub fn regs(&self) -> Result<Regs, String> {
        if self.is_running() {
            return Err("the vCPU is running".into());
        }
        let regs = self.runner.shared.vcpu().get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        Ok(cpu::from_kvm(&regs))
    }

    /// Refreshes the cached header from the window, if the window is ours
    /// and not handed out.
    pub fn refresh(&mut self) -> Option<RegionState> {
        let region = self.region.info().ok().map(|i| RegionState {
            owned: i.owned,
            mine: i.mine,
            moving: i.moving,
            pages_present: i.pages_present,
        });
        // Not while sent: whoever holds the fds may revoke it at any moment,
        // and a read of a revoked page is a SIGBUS.
        if !self.sent && region.is_some_and(|r| r.mine && !r.moving) {
            if let Ok(h) = Header::read(&self.memory) {
                self.last = h;
                self.bad_now = h.read_bad_dword(&self.memory, self.window.gpa);
            }
        }
        region
    }

    pub fn header(&self) -> Header {
        self.last
    }

    pub fn info(&mut self) -> L2Info {
        let region = self.refresh();
        let ctl = self.runner.shared.ctl();
        let state = match ctl.state {
            VcpuState::Corrupt => L2State::Corrupt,
            VcpuState::Failed => L2State::Failed,
            _ if self.sent && region.is_some_and(|r| r.mine) => L2State::Sent,
            _ if self.sent => L2State::Migrated,
            VcpuState::Running => L2State::Running,
            VcpuState::Paused => L2State::Paused,
        };
        let h = self.last;
        L2Info {
            name: self.name.clone(),
            state,
            window: self.window,
            passes: h.passes(),
            errors: u64::from(h.errors),
            checksum: h.checksum,
            checksum_ok: h.checksum_ok(),
            hva: self.memory.as_ptr() as u64,
            paused_at_ns: ctl.paused_at_ns,
            resumed_at_ns: ctl.resumed_at_ns,
            vcpu_tid: self.runner.shared.tid.get().copied(),
            region,
            detail: ctl.detail.is_some().then(|| self.detail(&ctl)),
        }
    }

    /// Samples pages across the window (the first, one per MiB, the last)
    /// and reads each from the guest and from the VMM; returns the number
    /// sampled and how many each side could not read. The vCPU must be
    /// paused; its registers are restored afterwards.
    pub fn probe(&self) -> Result<(u64, u64, u64), String> {
        if self.is_running() {
            return Err("probe needs a paused L2".into());
        }
        let vcpu = &mut *self.runner.shared.vcpu();
        let saved = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let step = 1 << 20;
        let mut offsets: Vec<u64> = (0..self.window.size).step_by(step).collect();
        offsets.push(self.window.size - 4096);
        offsets.dedup();
        let (mut guest_denied, mut vmm_denied) = (0, 0);
        for &off in &offsets {
            let mut r = saved;
            r.rip = workload::CODE_GPA + workload::PROBE;
            r.rdi = self.window.gpa + off;
            vcpu.set_regs(&r).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            match vcpu.run() {
                Ok(VcpuExit::IoOut(workload::PORT_PROBE, _)) => {}
                Err(e) if e.errno() == libc::EFAULT => guest_denied += 1,
                Ok(other) => return Err(format!("probe: unexpected exit {other:?}")),
                Err(e) => return Err(format!("probe: KVM_RUN: {e}")),
            }
            let hva = self.memory.as_ptr() as usize + off as usize;
            // SAFETY: `hva` lies inside this L2's live mapping.
            if unsafe { probe::read_byte(hva as *const u8) }.is_none() {
                vmm_denied += 1;
            }
        }
        vcpu.set_regs(&saved).map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        Ok((offsets.len() as u64, vmm_denied, guest_denied))
    }

    fn kick(&self) {
        self.runner.kick();
    }
}

/// Completes the `out` a vCPU's last exit left pending, without entering
/// the guest (`immediate_exit`: KVM runs the completion, which steps rip
/// past the instruction, then returns EINTR). A paused vCPU must hold
/// none: its registers are saved for another L1 (the instruction would run
/// twice there), and a vCPU given to the next L2 (`Runner::recycle`) would
/// complete it on its first KVM_RUN, skipping the new L2's first `out` if
/// it sits at the same address (the resume stub: the last exit of an L2
/// paused right after it resumed). On the vCPU's own thread: a KVM_RUN
/// from another thread moves the vCPU's pid, and the move back costs a
/// `synchronize_rcu` inside the next L2's downtime (measured: 12–25 ms
/// under TCG).
fn complete_pending_io(shared: &Shared) {
    let mut vcpu = shared.vcpu();
    vcpu.set_kvm_immediate_exit(1);
    if let Err(e) = vcpu.run().map(|_| ()) {
        if e.errno() != libc::EINTR {
            tracing::warn!("completing the last out: KVM_RUN: {e}");
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

enum Exit {
    Out(u16, u32),
    Other(String),
}

fn vcpu_loop(shared: &Shared) {
    let _ = shared.tid.set(nix::unistd::gettid().as_raw() as u32);
    let mut stopped_at = cpu::monotonic_ns();
    // The last exit was an `out`, whose completion KVM keeps for the next
    // KVM_RUN (see `complete_pending_io`).
    let mut io_pending = false;
    loop {
        let resume_rip = {
            let mut ctl = shared.ctl();
            loop {
                match ctl.want {
                    Want::Stop => return,
                    Want::Run => break,
                    Want::Pause => {
                        if ctl.state == VcpuState::Running && io_pending {
                            // Not holding `ctl` (lock order), then look again.
                            drop(ctl);
                            complete_pending_io(shared);
                            io_pending = false;
                            ctl = shared.ctl();
                            continue;
                        }
                        if ctl.state == VcpuState::Running {
                            ctl.state = VcpuState::Paused;
                            ctl.paused_at_ns = Some(stopped_at);
                            shared.cv.notify_all();
                        }
                        ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
            ctl.state = VcpuState::Running;
            ctl.resume_rip.take()
        };
        let mut vcpu = shared.vcpu();
        let exit = vcpu.run().map(|exit| match exit {
            VcpuExit::IoOut(port, data) => {
                let mut word = [0u8; 4];
                let n = data.len().min(4);
                word[..n].copy_from_slice(&data[..n]);
                Exit::Out(port, u32::from_le_bytes(word))
            }
            VcpuExit::InternalError => Exit::Other(String::new()),
            // The workload halts only where its `out`s leave it stopped; any
            // other `hlt` is the fill around the code (`workload::HLT`).
            VcpuExit::Hlt => {
                Exit::Other("Hlt: it left the workload's code and stopped in the hlt fill at rip - 1".into())
            }
            other => Exit::Other(format!("{other:?}")),
        });
        let exit = exit.map(|e| match e {
            Exit::Other(what) if what.is_empty() => Exit::Other(internal_error(&mut vcpu)),
            e => e,
        });
        stopped_at = cpu::monotonic_ns();
        io_pending = matches!(exit, Ok(Exit::Out(..)));
        match exit {
            Ok(Exit::Out(workload::PORT_PASS, _)) => {}
            Ok(Exit::Out(workload::PORT_RESUMED, _)) => {
                let rip = resume_rip.unwrap_or(0);
                let set = vcpu.get_regs().and_then(|mut r| {
                    r.rip = rip;
                    vcpu.set_regs(&r)
                });
                drop(vcpu);
                if let Err(e) = set {
                    shared.stop_with(VcpuState::Failed, format!("resuming: KVM_SET_REGS: {e}"));
                    continue;
                }
                shared.ctl().resumed_at_ns = Some(stopped_at);
            }
            Ok(Exit::Out(workload::PORT_CORRUPT, addr)) => {
                drop(vcpu);
                shared.stop_with(VcpuState::Corrupt, format!("the workload found a changed dword at GPA {addr:#x}"));
            }
            Ok(Exit::Out(port, value)) => {
                drop(vcpu);
                shared.stop_with(VcpuState::Failed, format!("unexpected out {value:#x} to port {port:#x}"));
            }
            Ok(Exit::Other(what)) => {
                let regs = describe_regs(&vcpu);
                drop(vcpu);
                shared.stop_with(VcpuState::Failed, format!("unexpected vCPU exit {what}; {regs}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                drop(vcpu);
                let why = if e.errno() == libc::EFAULT { " (its memory was revoked?)" } else { "" };
                shared.stop_with(VcpuState::Failed, format!("KVM_RUN: {e}{why}"));
            }
        }
    }
}

/// KVM_EXIT_INTERNAL_ERROR with what KVM said about it (suberror 1 is an
/// instruction KVM could not emulate, 3 an event it could not deliver) and
/// where the guest was.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
    // the union member KVM filled in.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let rip = vcpu.get_regs().map_or_else(|e| format!("? ({e})"), |r| format!("{:#x}", r.rip));
    format!("InternalError: suberror {}, data {:x?}, rip {rip}", internal.suberror, &internal.data[..n])
}

/// The registers the workload uses, for a failure report: whether a wild
/// exit came from a wild jump (rip outside the code) or a wild pointer.
fn describe_regs(vcpu: &VcpuFd) -> String {
    match vcpu.get_regs() {
        Ok(r) => {
            let code = workload::CODE_GPA..=workload::CODE_GPA + workload::CODE.len() as u64;
            // The workload only ever jumps within its code, and its code is
            // not in the window, so a rip outside it is the CPU's doing, not
            // the memory's (README: "A lab L2 vCPU sometimes left KVM_RUN").
            let wild = if code.contains(&r.rip) { "" } else { "; WILD_RIP: rip outside the workload code" };
            format!(
                "rip {:#x} rsi {:#x} rdi {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rbp {:#x} rsp {:#x} rflags {:#x}{wild}",
                r.rip, r.rsi, r.rdi, r.rax, r.rbx, r.rcx, r.rdx, r.rbp, r.rsp, r.rflags
            )
        }
        Err(e) => format!("registers unreadable: {e}"),
    }
}
