//! The L2 VMs: one QEMU each, whose RAM is a window or ordinary memory.
//!
//! On a window, an L2's QEMU takes the window's BAR as
//! `memory-backend-file,share=on` RAM; on ordinary memory, it maps its own
//! (`memory-backend-ram,share=on`, locked: [`crate::ram`]). Either way it
//! boots the workload image with `-kernel`, and the RAM backend is `mem0`,
//! so a state saved on one kind loads on the other. Saving and restoring
//! use QEMU's own migration with `x-ignore-shared`: the stream carries CPU
//! and device state, and skips the shared RAM, which stays where it is.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use vmbeam::{
    control::agent::{start_timeout, AgentL2, AgentL2State, L2Frames, Saved, Workload, MAX_FRAMES_PER_REPLY},
    qmp::Qmp,
};

mod tracing;

use crate::{
    marks::Mark,
    ram,
    state_window::StateWindow,
    stream,
    window::{self, Window},
};

const PAGE: u64 = 4096;

/// Where an L2's RAM is.
#[derive(Debug, Clone)]
pub enum Ram {
    /// A window: a BAR that L0 backs with a vmbeam region.
    Window(Window),
    /// Ordinary L1 memory of `size` bytes, mapped by the L2's QEMU.
    Ordinary { size: u64, thp: bool },
}

impl Ram {
    pub fn size(&self) -> u64 {
        match self {
            Ram::Window(w) => w.size,
            Ram::Ordinary { size, .. } => *size,
        }
    }

    pub fn window_index(&self) -> Option<u32> {
        match self {
            Ram::Window(w) => Some(w.index),
            Ram::Ordinary { .. } => None,
        }
    }

    /// QEMU's `-object` for its RAM backend `mem0`.
    fn backend(&self) -> String {
        match self {
            Ram::Window(w) => {
                format!("memory-backend-file,id=mem0,mem-path={},share=on,size={}", w.bar.display(), w.size)
            }
            Ram::Ordinary { size, .. } => format!("memory-backend-ram,id=mem0,share=on,size={size}"),
        }
    }
}

/// How the agent runs QEMU; tests and the image set the paths.
#[derive(Debug, Clone)]
pub struct Config {
    pub qemu: PathBuf,
    pub guest: PathBuf,
    pub run_dir: PathBuf,
    pub timeout: Duration,
}

pub struct L2 {
    pub name: String,
    pub ram: Ram,
    /// Where QEMU maps ordinary RAM (None for a window).
    hva: Option<u64>,
    child: Child,
    qmp: Qmp,
    state: AgentL2State,
    detail: Option<String>,
    /// The workload as the last save left it: a saved L2's RAM may have
    /// left this L1 at L0, and touching it then would kill the L1.
    saved_workload: Option<Workload>,
    /// A save or a load QEMU is doing in the background.
    pending: Option<Pending>,
    /// Its downtime as this L1's kernel saw it (`query-l2-marks`).
    marks: tracing::Marks,
    /// A state sent ahead (`stage-l2`) for an incoming L2, decoded, until
    /// `load-l2` loads it.
    staged: Option<Vec<u8>>,
    /// Where an incoming QEMU listens for its state (`migrate-incoming`
    /// is given at its start, out of the downtime).
    incoming: Option<PathBuf>,
}

/// A state [`L2::collect_save`] collected.
pub struct SavedStream {
    /// QEMU's migration stream: CPU and devices, no shared RAM.
    pub bytes: Vec<u8>,
    /// When the L2 stopped.
    pub stopped: Instant,
    /// QEMU's own migration (its `total-time`).
    pub qemu_save_ms: Option<u64>,
}

/// What an L2's QEMU is doing in the background, begun by `save-l2s` or
/// `load-l2`, until `save-l2` or `restore-l2s` collects it.
enum Pending {
    /// Saving its state into `out` since it stopped at `stopped`.
    Save { stopped: Instant, out: stream::Outgoing },
    /// Loading a state from `into`; its QEMU took `start_us` to start (0:
    /// prepared).
    Load { start_us: u64, into: stream::Incoming },
}

impl L2 {
    /// Starts an L2 on `ram`; with `incoming`, one that waits for a
    /// migration stream (`-incoming defer`) instead of booting.
    pub fn start(cfg: &Config, name: &str, ram: &Ram, incoming: bool) -> Result<Self> {
        Self::start_as(cfg, name, name, ram, incoming)
    }

    /// [`Self::start`], with its QMP socket and log named `files` in the
    /// run directory: a second QEMU of the same L2 (`upgrade-l2s`) starts
    /// while the first still has `name`'s.
    pub fn start_as(cfg: &Config, name: &str, files: &str, ram: &Ram, incoming: bool) -> Result<Self> {
        let qmp_path = cfg.run_dir.join(format!("{files}.qmp"));
        let log_path = cfg.run_dir.join(format!("{files}.log"));
        let _ = std::fs::remove_file(&qmp_path);
        let size = ram.size();
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(["-enable-kvm", "-cpu", "host", "-M", "pc", "-nodefaults", "-display", "none", "-m"])
            .arg(format!("{}M", size >> 20))
            .arg("-object")
            .arg(ram.backend())
            .args(["-machine", "memory-backend=mem0", "-kernel"])
            .arg(&cfg.guest)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-name", name]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        if let Ram::Ordinary { thp, .. } = ram {
            ram::prepare(*thp)?;
            // Locked, so its frames neither swap out nor move while L0
            // gathers them.
            cmd.args(["-overcommit", "mem-lock=on"]);
        }
        let log = std::fs::File::create(&log_path)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", cfg.qemu.display()))?;
        let ordinary = if let Ram::Ordinary { size, .. } = ram { *size } else { 0 };
        let qmp = match connect_when_ready(&qmp_path, &mut child, start_timeout(cfg.timeout, ordinary)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(e.context(format!("L2 {name}: QEMU log: {}", log.trim())));
            }
        };
        // QMP answers once QEMU's start-up is over, RAM mapped.
        let hva = match ram {
            Ram::Ordinary { size, .. } => match ram::find(child.id(), *size) {
                Ok(hva) => Some(hva),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
            },
            Ram::Window(_) => None,
        };
        let mut l2 = Self {
            name: name.into(),
            ram: ram.clone(),
            hva,
            child,
            qmp,
            state: AgentL2State::Running,
            detail: None,
            saved_workload: None,
            pending: None,
            marks: tracing::Marks::default(),
            staged: None,
            incoming: None,
        };
        if incoming {
            l2.state = AgentL2State::Incoming;
            // Its vCPU threads exist and wait for `cont`: tracing their
            // first entry now keeps the set-up out of the downtime.
            l2.trace_marks(Mark::FirstEntry);
        }
        // A QEMU that cannot be set up is ended here: returned as an error,
        // it would run on with nothing left to manage it.
        if let Err(e) = l2.take_part_in_migrations(cfg, files, incoming) {
            l2.kill();
            return Err(e.context(format!("L2 {name}: setting its QEMU up for migration (killed)")));
        }
        Ok(l2)
    }

    /// Both sides of a move skip the shared RAM, and say when a save or
    /// load ends (`MIGRATION` events: no `query-migrate` every 10 ms on
    /// the vCPU doing it); an incoming QEMU listens for its state from now
    /// on, so the load only connects and writes (a `migrate-incoming` in
    /// the load was a QMP round trip inside the downtime: 27-52 ms in an
    /// L1 under TCG).
    fn take_part_in_migrations(&mut self, cfg: &Config, files: &str, incoming: bool) -> Result<()> {
        self.qmp.set_migration_capabilities(&["x-ignore-shared", "events"])?;
        if incoming {
            let path = cfg.run_dir.join(format!("{files}.in.sock"));
            let _ = std::fs::remove_file(&path);
            self.qmp.execute("migrate-incoming", json!({"uri": stream::Incoming::uri(&path)}))?;
            self.incoming = Some(path);
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether this is a QEMU started by `prepare-l2` on window `index`,
    /// waiting for its state.
    pub fn is_waiting_on(&mut self, index: u32) -> bool {
        self.poll();
        self.is_prepared_on(index)
    }

    /// [`Self::is_waiting_on`], for an L2 the caller only looks at (its
    /// exit, if any, is noticed at the next request).
    pub fn is_prepared_on(&self, index: u32) -> bool {
        self.state == AgentL2State::Incoming && self.ram.window_index() == Some(index)
    }

    /// Notices an exited QEMU.
    pub fn poll(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.state = AgentL2State::Exited;
            self.detail.get_or_insert_with(|| format!("QEMU exited: {status}"));
        }
    }

    /// The workload header, read from the L2's RAM.
    fn read_header(&self) -> Result<Workload> {
        match (&self.ram, self.hva) {
            (Ram::Window(w), _) => window::read_header(w),
            (Ram::Ordinary { .. }, Some(hva)) => ram::read_header(self.pid(), hva),
            (Ram::Ordinary { .. }, None) => bail!("L2 {}: its RAM was not found", self.name),
        }
    }

    pub fn info(&mut self) -> AgentL2 {
        self.poll();
        // Only a running L2's RAM is sure to be here: a saved one's may
        // have been gathered away at L0 (its last header is kept), an
        // exited one's handed away, an incoming one's not arrived yet.
        // Touching RAM without pages kills this L1.
        let workload = match self.state {
            AgentL2State::Running => self.read_header().ok(),
            AgentL2State::Saved => self.saved_workload,
            AgentL2State::Incoming | AgentL2State::Exited => None,
        };
        AgentL2 {
            name: self.name.clone(),
            window: self.ram.window_index(),
            size: self.ram.size(),
            pid: self.pid(),
            state: self.state,
            workload,
            detail: self.detail.clone(),
        }
    }

    /// Stops the L2 and saves its CPU and device state (no RAM); or, after
    /// [`Self::begin_save`], waits for that save. With `into`, the state
    /// goes in that state window's outbox if it fits (the reply says
    /// where), else in the reply.
    pub fn save(&mut self, cfg: &Config, into: Option<&mut StateWindow>) -> Result<Saved> {
        if !matches!(self.pending, Some(Pending::Save { .. })) {
            self.begin_save(cfg)?;
        }
        self.finish_save(cfg, into)
    }

    /// Stops the L2 and starts QEMU's save of its state (QEMU's migration
    /// thread sends it, a thread of ours reads it) without waiting: saves
    /// begun on several L2s run at once, and [`Self::save`] collects each.
    pub fn begin_save(&mut self, cfg: &Config) -> Result<()> {
        if self.state != AgentL2State::Running {
            bail!("L2 {} is {:?}, not running", self.name, self.state);
        }
        let out = stream::Outgoing::listen(cfg.run_dir.join(format!("{}.out.sock", self.name)))?;
        // Begun by `mark-l2s` before the pause, where a migration asks: a
        // trace instance costs its ring buffers, not to be paid stopped.
        if !self.is_marking(Mark::LastExit) {
            self.trace_marks(Mark::LastExit);
        }
        self.qmp.execute("stop", json!({}))?;
        let stopped = Instant::now();
        self.state = AgentL2State::Saved;
        if let Err(e) = self.qmp.migrate(&out.uri()) {
            let _ = out.collect(false);
            let _ = self.resume();
            return Err(anyhow::Error::from(e).context(format!("saving L2 {} (resumed)", self.name)));
        }
        self.pending = Some(Pending::Save { stopped, out });
        Ok(())
    }

    /// Waits for the save [`Self::begin_save`] started; resumes the L2 if
    /// it failed.
    fn finish_save(&mut self, cfg: &Config, into: Option<&mut StateWindow>) -> Result<Saved> {
        let SavedStream { bytes, stopped, qemu_save_ms } = self.collect_save(cfg)?;
        let state_at = into.and_then(|w| w.put(&bytes));
        let state = if state_at.is_some() { String::new() } else { crate::state::encode(&bytes)? };
        Ok(Saved {
            name: self.name.clone(),
            window: self.ram.window_index(),
            state,
            state_at,
            state_bytes: bytes.len() as u64,
            workload: self.saved_workload,
            stopped_us_ago: stopped.elapsed().as_micros() as u64,
            qemu_save_ms,
        })
    }

    /// Which L1 frames hold the RAM of this stopped L2 on ordinary memory,
    /// in its guest-physical order. Read only while it is stopped: then
    /// nothing in it changes its memory, and its QEMU keeps it locked.
    /// `count` pages from page `first` (at most [`MAX_FRAMES_PER_REPLY`]).
    pub fn frames(&mut self, first: u64, count: Option<u64>) -> Result<L2Frames> {
        self.poll();
        let (Ram::Ordinary { size, .. }, Some(hva)) = (&self.ram, self.hva) else {
            bail!("L2 {}'s RAM is a window, not ordinary memory: L0 knows its frames", self.name);
        };
        if self.state != AgentL2State::Saved {
            bail!("L2 {} is {:?}: its frames are read only while it is stopped (save-l2)", self.name, self.state);
        }
        let pages = size / PAGE;
        if first >= pages {
            bail!("L2 {} has {pages} pages: no page {first}", self.name);
        }
        let count = count.unwrap_or(MAX_FRAMES_PER_REPLY).min(MAX_FRAMES_PER_REPLY).min(pages - first);
        Ok(L2Frames {
            name: self.name.clone(),
            size: *size,
            first,
            frames: ram::frames(self.pid(), hva + first * PAGE, count * PAGE)?,
            // Read once, with the first part: smaps walks every page table
            // of the QEMU, and this runs inside the L2's downtime.
            thp_bytes: if first == 0 { ram::thp_bytes(self.pid(), hva)? } else { 0 },
        })
    }

    /// Waits for the save [`Self::begin_save`] started and returns its
    /// stream; resumes the L2 if it failed.
    pub fn collect_save(&mut self, cfg: &Config) -> Result<SavedStream> {
        let Some(Pending::Save { stopped, out }) = self.pending.take() else {
            bail!("L2 {} has no save under way", self.name);
        };
        let migrated = self.qmp.wait_migration(cfg.timeout);
        let qemu_save_ms = migrated.as_ref().ok().and_then(|info| info["total-time"].as_u64());
        let saved = out.collect(migrated.is_ok()).and_then(|bytes| {
            migrated?;
            anyhow::Ok(bytes)
        });
        let bytes = match saved {
            Ok(b) => b,
            Err(e) => {
                let _ = self.resume();
                return Err(e.context(format!("saving L2 {} (resumed)", self.name)));
            }
        };
        self.saved_workload = self.read_header().ok();
        Ok(SavedStream { bytes, stopped, qemu_save_ms })
    }

    /// Resumes a saved L2 where it was (a migration rolled back).
    pub fn resume(&mut self) -> Result<()> {
        self.poll();
        if self.state == AgentL2State::Exited {
            bail!("L2 {}: its QEMU has exited", self.name);
        }
        if let Some(Pending::Save { out, .. }) = self.pending.take() {
            // A save nobody collected: let it end before the L2 runs again.
            let migrated = self.qmp.wait_migration(Duration::from_secs(60));
            let _ = out.collect(migrated.is_ok());
        }
        self.qmp.execute("cont", json!({}))?;
        self.state = AgentL2State::Running;
        // It runs on here: a last exit traced for a move means nothing now.
        self.marks = tracing::Marks::default();
        Ok(())
    }

    /// Starts loading a saved state (QEMU's stream: `given`, else the one
    /// staged) into an L2 started with `incoming` (QEMU loads it in the
    /// background; its QEMU took `start_us` to start);
    /// [`Self::finish_restore`] runs it.
    pub fn begin_restore(&mut self, given: Option<Vec<u8>>, start_us: u64) -> Result<()> {
        let bytes = match (given, self.staged.take()) {
            (Some(given), _) => given,
            (None, Some(staged)) => staged,
            (None, None) => bail!("L2 {}: no state given and none staged (stage-l2)", self.name),
        };
        let Some(path) = self.incoming.clone() else {
            bail!("L2 {} was not started to take a state (-incoming)", self.name);
        };
        let into = stream::Incoming::send(path, bytes);
        self.pending = Some(Pending::Load { start_us, into });
        if !self.is_marking(Mark::FirstEntry) {
            self.trace_marks(Mark::FirstEntry);
        }
        Ok(())
    }

    /// Keeps `state` for the load to come: it arrived ahead, while the
    /// pages it needs were still on their way.
    pub fn stage(&mut self, state: &str) -> Result<()> {
        if self.state != AgentL2State::Incoming || self.is_loading() {
            bail!("L2 {} is {:?}: only a prepared L2 (prepare-l2) takes a state ahead", self.name, self.state);
        }
        // Empty means "the staged one" to `load-l2`: staging it would load
        // an empty stream.
        if state.is_empty() {
            bail!("L2 {}: stage-l2 needs a state (the `state` of save-l2)", self.name);
        }
        self.staged = Some(crate::state::decode(state)?);
        Ok(())
    }

    /// Whether a load begun by [`Self::begin_restore`] waits to be finished.
    pub fn is_loading(&self) -> bool {
        matches!(self.pending, Some(Pending::Load { .. }))
    }

    /// Waits for the load [`Self::begin_restore`] started, then resumes.
    /// Returns how long its QEMU took to start.
    pub fn finish_restore(&mut self, cfg: &Config) -> Result<u64> {
        let Some(Pending::Load { start_us, into }) = self.pending.take() else {
            bail!("L2 {} has no state loading (load-l2)", self.name);
        };
        let loaded = (|| {
            self.qmp.wait_migration(cfg.timeout)?;
            into.finish()?;
            self.qmp.execute("cont", json!({}))?;
            anyhow::Ok(())
        })();
        if let Some(path) = self.incoming.take() {
            let _ = std::fs::remove_file(path);
        }
        loaded.with_context(|| format!("restoring L2 {}", self.name))?;
        self.state = AgentL2State::Running;
        Ok(start_us)
    }

    /// Ends the QEMU at once (its L2 moved: it must never run again here).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = self.incoming.take() {
            let _ = std::fs::remove_file(path);
        }
        self.state = AgentL2State::Exited;
        self.detail = Some("moved away; QEMU killed".into());
        // Its trace instance goes with it (a migration reads its marks
        // before it retires the aged copy).
        self.marks = tracing::Marks::default();
    }
}

fn connect_when_ready(path: &Path, child: &mut Child, timeout: Duration) -> Result<Qmp> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut next_word = start + Duration::from_secs(10);
    loop {
        // A start that takes long says, on the console, where QEMU is.
        if Instant::now() > next_word {
            next_word += Duration::from_secs(10);
            eprintln!("vmbeam-agent: QEMU {} not up after {:?}: {}", child.id(), start.elapsed(), where_is(child.id()));
        }
        if let Some(status) = child.try_wait()? {
            bail!("QEMU exited at start: {status}");
        }
        if path.exists() {
            if let Ok(q) = Qmp::connect(path, timeout) {
                return Ok(q);
            }
        }
        if Instant::now() > deadline {
            bail!("QEMU's QMP socket {} did not come up in {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's state and the kernel function it waits in (`wchan`).
fn where_is(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command's closing parenthesis.
    let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').next()).unwrap_or("?").to_string();
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            let w = std::fs::read_to_string(t.path().join("wchan")).ok()?;
            (!w.is_empty() && w != "0").then(|| format!("{}:{w}", t.file_name().to_string_lossy()))
        })
        .collect();
    format!("state {state}, wchan {}, threads {}", if wchan.is_empty() { "-" } else { &wchan }, threads.join(" "))
}
