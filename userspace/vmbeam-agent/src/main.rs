//! vmbeam-agent: runs inside a real L1 hypervisor (Linux + KVM + QEMU) and
//! drives its L2 QEMUs for L0's `vmbeamctl`: starts L2s on windows, saves
//! an L2's CPU and device state, restores one on a window, kills the ones
//! that moved away, replaces an L2's QEMU in place (`upgrade-l2s`). It
//! speaks `vmbeam::control::agent` over a virtio-serial port
//! (`vmbeam.agent`), which the L1's QEMU exposes at L0 as a Unix socket.
//!
//! ```text
//! vmbeam-agent [--port NAME | --listen SOCKET] [--name L1NAME]
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vmbeam::control::{
    agent::{
        AgentClock, AgentL2, AgentL2State, AgentStatus, AgentWindow, FramesQuery, L2Marks, Named, Names, PrepareL2,
        RestoreL2, RestoreL2s, Restored, SaveL2s, Saved, StartL2, AGENT_COMMANDS, AGENT_SERVICE,
    },
    ErrorBody, ErrorClass, Greeting, Reply, Request, ServerInfo, MAX_LINE,
};

mod header;
mod l2;
mod marks;
mod port;
mod ram;
mod request_log;
mod state;
mod state_window;
mod stream;
mod upgrade;
mod window;

use l2::{Config, Ram, L2};
use request_log::RequestLog;
use state_window::StateWindow;

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The virtio-serial port's name (found in /sys/class/virtio-ports).
    #[arg(long, default_value = "vmbeam.agent")]
    port: String,
    /// Serve on this Unix socket instead (tests at L0).
    #[arg(long)]
    listen: Option<PathBuf>,
    /// This L1's name in the greeting (default: `vmbeam.name=` on the
    /// kernel command line, else "l1").
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
    /// The L2 guest image (`-kernel`).
    #[arg(long, default_value = "/l2/workload.elf")]
    guest: PathBuf,
    #[arg(long, default_value = "/sys/bus/pci/devices")]
    sys_pci: PathBuf,
    #[arg(long, default_value = "/run/vmbeam")]
    run_dir: PathBuf,
    /// Seconds any QEMU operation may take.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

/// RAM of an L2 on ordinary memory unless `start-l2` says.
const DEFAULT_L2_SIZE: u64 = 16 << 20;
/// The workload's header sits at 2 MiB, its data above it.
const MIN_L2_SIZE: u64 = 4 << 20;

struct Agent {
    args: Args,
    cfg: Config,
    l2s: BTreeMap<String, L2>,
    /// This L1's state window, once found (L0 plugs it before the L1 boots).
    state_window: Option<StateWindow>,
    /// The L2s `save-l2s` began saving into the state window.
    saving_into_window: BTreeSet<String>,
    log: RequestLog,
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.name.is_none() {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        args.name = cmdline.split_whitespace().find_map(|a| a.strip_prefix("vmbeam.name=")).map(Into::into);
    }
    std::fs::create_dir_all(&args.run_dir)?;
    let cfg = Config {
        qemu: args.qemu.clone(),
        guest: args.guest.clone(),
        run_dir: args.run_dir.clone(),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let mut agent = Agent {
        args,
        cfg,
        l2s: BTreeMap::new(),
        state_window: None,
        saving_into_window: BTreeSet::new(),
        log: RequestLog::default(),
    };
    let mut link = match &agent.args.listen {
        Some(path) => port::Link::listen(path)?,
        None => port::Link::virtio(&agent.args.port)?,
    };
    loop {
        let stream = link.accept()?;
        let served = agent.serve(stream);
        agent.log.flush();
        if let Err(e) = served {
            eprintln!("vmbeam-agent: session ended: {e:#}");
        }
    }
}

impl Agent {
    /// One session: greeting, then request after request until the peer
    /// goes away.
    fn serve(&mut self, stream: port::Stream) -> Result<()> {
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let greeting = Greeting {
            greeting: ServerInfo {
                service: AGENT_SERVICE.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                name: self.name(),
                pid: std::process::id(),
            },
        };
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = Read::by_ref(&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(()); // the peer closed
            }
            if line.last() != Some(&b'\n') {
                if n > MAX_LINE {
                    send(&mut writer, &Reply::err(ErrorBody::generic("message too long"), None))?;
                    skip_line(&mut reader)?;
                    continue;
                }
                return Ok(()); // closed mid-line
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue; // a client ending a line a dead one left half-written
            }
            let req = match serde_json::from_slice::<Request>(&line) {
                Ok(req) => req,
                Err(e) => {
                    send(&mut writer, &Reply::err(ErrorBody::generic(format!("malformed request: {e}")), None))?;
                    continue;
                }
            };
            if req.execute == "greeting" {
                send(&mut writer, &serde_json::json!({"greeting": greeting.greeting, "id": req.id}))?;
                continue;
            }
            let reply = match self.dispatch(&req) {
                Ok(v) => Reply::ok(v, req.id.clone()),
                Err(e) => Reply::err(e, req.id.clone()),
            };
            let sent = send(&mut writer, &reply);
            self.log.served(&req.execute);
            sent?;
            if req.execute == "poweroff" && reply.error.is_none() {
                self.log.flush();
                poweroff(); // after the reply: L0 learns it was taken
            }
        }
    }

    fn dispatch(&mut self, req: &Request) -> Result<Value, ErrorBody> {
        let generic = |e: anyhow::Error| ErrorBody::generic(format!("{e:#}"));
        match req.execute.as_str() {
            "query-commands" => Ok(json!(AGENT_COMMANDS)),
            "query-status" => self.status().map(|s| json!(s)).map_err(generic),
            "query-vms" => Ok(json!(self.l2s.values_mut().map(L2::info).collect::<Vec<_>>())),
            "start-l2" => {
                let a: StartL2 = args(req)?;
                self.start(&a).map_err(generic)
            }
            "save-l2" => {
                let a: Named = args(req)?;
                self.save(&a.name)?.map(|s| json!(s)).map_err(generic)
            }
            "save-l2s" => {
                let a: SaveL2s = args(req)?;
                self.begin_saves(&a.names, a.state_window).map(|s| json!(s)).map_err(generic)
            }
            "stage-l2" => {
                let a: RestoreL2 = args(req)?;
                self.stage(&a).map(|()| json!({})).map_err(generic)
            }
            "load-l2" => {
                let a: RestoreL2 = args(req)?;
                self.load(&a).map(|i| json!(i)).map_err(generic)
            }
            "load-l2s" => {
                let a: RestoreL2s = args(req)?;
                self.load_all(&a.l2s).map(|i| json!(i)).map_err(generic)
            }
            "restore-l2s" => {
                let a: Names = args(req)?;
                self.resume_loaded(&a.names).map(|r| json!(r)).map_err(generic)
            }
            "query-l2-frames" => {
                let a: FramesQuery = args(req)?;
                self.l2(&a.name)?.frames(a.first, a.count).map(|f| json!(f)).map_err(generic)
            }
            "resume-l2" => {
                let a: Named = args(req)?;
                let l2 = self.l2(&a.name)?;
                l2.resume().map_err(generic)?;
                Ok(json!(l2.info()))
            }
            "prepare-l2" => {
                let a: PrepareL2 = args(req)?;
                self.prepare(&a).map(|i| json!(i)).map_err(generic)
            }
            "restore-l2" => {
                let a: RestoreL2 = args(req)?;
                self.restore(&a).map(|r| json!(r)).map_err(generic)
            }
            "kill-l2" => {
                let a: Named = args(req)?;
                self.l2(&a.name)?.kill();
                Ok(json!({}))
            }
            "mark-l2s" => {
                let a: Names = args(req)?;
                for name in &a.names {
                    self.l2(name)?.mark_before_save().map_err(generic)?;
                }
                Ok(json!({}))
            }
            "query-clock" => Ok(json!(AgentClock { monotonic_ns: vmbeam::clock::monotonic_ns() })),
            "query-l2-marks" => {
                let a: Names = args(req)?;
                // A resumed vCPU enters its guest within a moment; a
                // missing entry after a second is reported as missing.
                let marks: Result<Vec<L2Marks>, ErrorBody> =
                    a.names.iter().map(|n| Ok(self.l2(n)?.marks(Duration::from_secs(1)))).collect();
                marks.map(|m| json!(m))
            }
            "upgrade-l2s" => {
                let a: Names = args(req)?;
                self.check_names(&a.names).map_err(generic)?;
                upgrade::upgrade(&self.cfg, &mut self.l2s, &a.names).map(|u| json!(u)).map_err(generic)
            }
            "poweroff" => {
                for l2 in self.l2s.values_mut() {
                    l2.kill();
                }
                Ok(json!({}))
            }
            other => Err(ErrorBody {
                class: ErrorClass::CommandNotFound,
                desc: format!("the agent has no command `{other}` (query-commands lists them)"),
                errno: None,
            }),
        }
    }

    fn name(&self) -> String {
        self.args.name.clone().unwrap_or_else(|| "l1".into())
    }

    fn l2(&mut self, name: &str) -> Result<&mut L2, ErrorBody> {
        self.l2s.get_mut(name).ok_or_else(|| no_such_l2(name))
    }

    /// Collects an L2's save (`save-l2`), into the state window if
    /// `save-l2s` began it so.
    fn save(&mut self, name: &str) -> Result<Result<Saved>, ErrorBody> {
        let into_window = self.saving_into_window.remove(name);
        let cfg = self.cfg.clone();
        let l2 = self.l2s.get_mut(name).ok_or_else(|| no_such_l2(name))?;
        let into = if into_window { self.state_window.as_mut() } else { None };
        Ok(l2.save(&cfg, into))
    }

    /// The state window, looked for again until found.
    fn state_window(&mut self) -> Option<&mut StateWindow> {
        if self.state_window.is_none() {
            match StateWindow::find(&self.args.sys_pci) {
                Ok(w) => self.state_window = w,
                Err(e) => eprintln!("vmbeam-agent: the state window: {e:#}"),
            }
        }
        self.state_window.as_mut()
    }

    fn status(&mut self) -> Result<AgentStatus> {
        let windows = window::scan(&self.args.sys_pci)?;
        let taken: BTreeMap<u32, String> = self
            .l2s
            .values_mut()
            .filter_map(|l| {
                l.poll();
                let index = l.ram.window_index()?;
                (l.info().state != AgentL2State::Exited).then(|| (index, l.name.clone()))
            })
            .collect();
        Ok(AgentStatus {
            name: self.name(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into(),
            qemu: self.args.qemu.display().to_string(),
            windows: windows
                .into_iter()
                .map(|w| AgentWindow { index: w.index, pci: w.pci, size: w.size, l2: taken.get(&w.index).cloned() })
                .collect(),
            state_window: self.state_window().map(|w| w.size()),
        })
    }

    /// Refuses a name that a live L2 has.
    fn check_name_free(&mut self, name: &str) -> Result<()> {
        if let Some(old) = self.l2s.get_mut(name) {
            old.poll();
            if old.info().state != AgentL2State::Exited {
                bail!("an L2 named `{name}` exists already");
            }
        }
        Ok(())
    }

    /// The free window numbered `index`.
    fn free_window(&mut self, name: &str, index: u32) -> Result<window::Window> {
        self.check_name_free(name)?;
        let status = self.status()?;
        let w = status.windows.iter().find(|w| w.index == index).ok_or_else(|| {
            let have: Vec<_> = status.windows.iter().map(|w| w.index.to_string()).collect();
            anyhow!("no window {index} on this L1 (windows: {})", have.join(", "))
        })?;
        if let Some(l2) = &w.l2 {
            bail!("window {index} holds L2 `{l2}`");
        }
        window::scan(&self.args.sys_pci)?
            .into_iter()
            .find(|w| w.index == index)
            .ok_or_else(|| anyhow!("window {index} vanished"))
    }

    fn start(&mut self, a: &StartL2) -> Result<Value> {
        let ram = match a.window {
            Some(index) => {
                if a.size.is_some() || a.thp {
                    bail!("size and thp are for an L2 on ordinary memory; a window's size is its own");
                }
                Ram::Window(self.free_window(&a.name, index)?)
            }
            None => {
                self.check_name_free(&a.name)?;
                let size = a.size.unwrap_or(DEFAULT_L2_SIZE);
                if !size.is_multiple_of(2 << 20) || size < MIN_L2_SIZE {
                    bail!(
                        "an L2's RAM is a multiple of 2 MiB, at least {} MiB (asked: {size} bytes)",
                        MIN_L2_SIZE >> 20
                    );
                }
                Ram::Ordinary { size, thp: a.thp }
            }
        };
        let mut l2 = L2::start(&self.cfg, &a.name, &ram, false)?;
        let info = l2.info();
        self.l2s.insert(a.name.clone(), l2);
        Ok(json!(info))
    }

    /// Starts the QEMU an L2 will be restored into, ahead of the move: out
    /// of the L2's downtime.
    fn prepare(&mut self, a: &PrepareL2) -> Result<AgentL2> {
        let w = self.free_window(&a.name, a.window)?;
        let mut l2 = L2::start(&self.cfg, &a.name, &Ram::Window(w), true)?;
        let info = l2.info();
        self.l2s.insert(a.name.clone(), l2);
        Ok(info)
    }

    fn restore(&mut self, a: &RestoreL2) -> Result<Restored> {
        self.load(a)?;
        let mut done = self.resume_loaded(std::slice::from_ref(&a.name))?;
        done.pop().ok_or_else(|| anyhow!("nothing restored"))
    }

    /// Every name is an L2 here, once.
    fn check_names(&mut self, names: &[String]) -> Result<()> {
        for (i, name) in names.iter().enumerate() {
            self.l2(name).map_err(|e| anyhow!(e.desc))?;
            if names[..i].contains(name) {
                bail!("`{name}` is named twice");
            }
        }
        Ok(())
    }

    /// Stops every L2 named, then lets their QEMUs save side by side;
    /// `save-l2` collects each state (`into_window`: into the state
    /// window's outbox, from its start). All or nothing: if one cannot
    /// begin, the others run again.
    fn begin_saves(&mut self, names: &[String], into_window: bool) -> Result<Vec<AgentL2>> {
        self.check_names(names)?;
        self.saving_into_window.clear();
        if into_window {
            if let Some(w) = self.state_window() {
                w.begin(names.len());
                self.saving_into_window.extend(names.iter().cloned());
            }
        }
        let cfg = self.cfg.clone();
        for (i, name) in names.iter().enumerate() {
            let Some(l2) = self.l2s.get_mut(name) else { continue };
            if let Err(e) = l2.begin_save(&cfg) {
                for begun in &names[..i] {
                    if let Some(l2) = self.l2s.get_mut(begun) {
                        let _ = l2.resume();
                    }
                }
                return Err(e.context("no L2 stays stopped"));
            }
        }
        Ok(names.iter().filter_map(|n| self.l2s.get_mut(n).map(L2::info)).collect())
    }

    /// Keeps a state for the L2 `prepare-l2` started on its window, so
    /// that `load-l2` need not carry it: L0 sends it while the aged L1 is
    /// still saving the next L2.
    fn stage(&mut self, a: &RestoreL2) -> Result<()> {
        let Some(l2) = self.l2s.get_mut(&a.name).filter(|l| l.is_prepared_on(a.window)) else {
            bail!("no L2 {} prepared on window {} (prepare-l2)", a.name, a.window);
        };
        if a.state_at.is_some() {
            bail!("stage-l2 carries a state: one in the state window is read by load-l2");
        }
        l2.stage(&a.state)
    }

    /// `load-l2` for each, in one request; none may carry a state (a line
    /// holds one at most), and nothing begins if one does.
    fn load_all(&mut self, l2s: &[RestoreL2]) -> Result<Vec<AgentL2>> {
        for (i, a) in l2s.iter().enumerate() {
            if !a.state.is_empty() {
                bail!("load-l2s: {} carries its state (only load-l2 may)", a.name);
            }
            if l2s[..i].iter().any(|b| b.name == a.name) {
                bail!("load-l2s: `{}` is named twice", a.name);
            }
        }
        l2s.iter().map(|a| self.load(a)).collect()
    }

    /// Starts loading a state into its L2's receiving QEMU (the one
    /// `prepare-l2` started, or a new one) and returns: states load side
    /// by side, `restore-l2s` resumes them.
    fn load(&mut self, a: &RestoreL2) -> Result<AgentL2> {
        let arrived = Instant::now();
        // The state: where L0 put it in the state window, or in the
        // request, or (neither) the one staged.
        let given = match (a.state_at, a.state.is_empty()) {
            (Some(at), _) => {
                let w = self.state_window().context("this L1 has no state window to read a state from")?;
                w.take(at).map(Some)
            }
            (None, false) => state::decode(&a.state).map(Some),
            (None, true) => Ok(None),
        }
        .with_context(|| format!("L2 {}: its state (nothing started or stopped)", a.name))?;
        let prepared = self.l2s.get_mut(&a.name).is_some_and(|l| l.is_waiting_on(a.window) && !l.is_loading());
        let mut l2 = match prepared.then(|| self.l2s.remove(&a.name)).flatten() {
            Some(l2) => l2,
            None => {
                let w = self.free_window(&a.name, a.window)?;
                L2::start(&self.cfg, &a.name, &Ram::Window(w), true)?
            }
        };
        let start_us = if prepared { 0 } else { arrived.elapsed().as_micros() as u64 };
        let begun = l2.begin_restore(given, start_us);
        if begun.is_err() {
            l2.kill();
        }
        let info = l2.info();
        self.l2s.insert(a.name.clone(), l2);
        begun.map(|()| info)
    }

    /// Resumes every L2 named as soon as its own state has loaded. One that
    /// fails is killed; the others run. What the reply says of each is
    /// gathered once all run: reading an L2's header maps a page of its
    /// window, work that would otherwise delay the next L2's `cont`.
    fn resume_loaded(&mut self, names: &[String]) -> Result<Vec<Restored>> {
        let arrived = Instant::now();
        self.check_names(names)?;
        let cfg = self.cfg.clone();
        let mut resumed = Vec::new();
        let mut failed = None;
        for name in names {
            let Some(l2) = self.l2s.get_mut(name) else { continue };
            match l2.finish_restore(&cfg) {
                Ok(start_us) => resumed.push((name, arrived.elapsed().as_micros() as u64, start_us)),
                Err(e) => {
                    l2.kill();
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(resumed
            .into_iter()
            .filter_map(|(name, resumed_after_us, start_us)| {
                let l2 = self.l2s.get_mut(name)?.info();
                Some(Restored { l2, resumed_after_us, start_us })
            })
            .collect())
    }
}

fn no_such_l2(name: &str) -> ErrorBody {
    ErrorBody { class: ErrorClass::DeviceNotFound, desc: format!("no L2 named `{name}` on this L1"), errno: None }
}

fn args<T: DeserializeOwned>(req: &Request) -> Result<T, ErrorBody> {
    serde_json::from_value(req.arguments.clone())
        .map_err(|e| ErrorBody::generic(format!("bad arguments for `{}`: {e}", req.execute)))
}

fn send(w: &mut impl Write, value: &impl serde::Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    w.write_all(&line).context("writing to L0")?;
    w.flush().context("writing to L0")
}

fn skip_line(r: &mut impl BufRead) -> Result<()> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        r.consume(n);
    }
}

fn poweroff() {
    nix::unistd::sync();
    // SAFETY: reboot(2) with RB_POWER_OFF: the L1 stops here.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
}
