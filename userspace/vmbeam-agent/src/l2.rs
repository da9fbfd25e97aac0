//! The L2 VMs: one QEMU each, whose RAM is a window.
//!
//! An L2's QEMU takes the window's BAR as `memory-backend-file,share=on`
//! RAM and boots the workload image with `-kernel`. Saving and restoring
//! use QEMU's own migration with `x-ignore-shared`: the stream carries CPU
//! and device state, and skips the shared RAM, which stays in the window.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use base64::{engine::general_purpose::STANDARD, Engine};
use serde_json::json;
use vmbeam::{
    control::agent::{AgentL2, AgentL2State, Saved},
    qmp::Qmp,
};

use crate::window::{self, Window};

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
    pub window: Window,
    child: Child,
    qmp: Qmp,
    state: AgentL2State,
    detail: Option<String>,
}

impl L2 {
    /// Starts an L2 on `window`; with `incoming`, one that waits for a
    /// migration stream (`-incoming defer`) instead of booting.
    pub fn start(cfg: &Config, name: &str, window: &Window, incoming: bool) -> Result<Self> {
        let qmp_path = cfg.run_dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let size = window.size;
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(["-enable-kvm", "-cpu", "host", "-M", "pc", "-nodefaults", "-display", "none", "-m"])
            .arg(format!("{}M", size >> 20))
            .arg("-object")
            .arg(format!("memory-backend-file,id=mem0,mem-path={},share=on,size={size}", window.bar.display()))
            .args(["-machine", "memory-backend=mem0", "-kernel"])
            .arg(&cfg.guest)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-name", name]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let log = std::fs::File::create(cfg.run_dir.join(format!("{name}.log")))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", cfg.qemu.display()))?;
        let qmp = match connect_when_ready(&qmp_path, &mut child, cfg.timeout) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(cfg.run_dir.join(format!("{name}.log"))).unwrap_or_default();
                return Err(e.context(format!("L2 {name}: QEMU log: {}", log.trim())));
            }
        };
        let mut l2 =
            Self { name: name.into(), window: window.clone(), child, qmp, state: AgentL2State::Running, detail: None };
        if incoming {
            l2.state = AgentL2State::Incoming;
        }
        // Both sides of a move skip the shared RAM.
        l2.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
        )?;
        Ok(l2)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Notices an exited QEMU.
    pub fn poll(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.state = AgentL2State::Exited;
            self.detail.get_or_insert_with(|| format!("QEMU exited: {status}"));
        }
    }

    pub fn info(&mut self) -> AgentL2 {
        self.poll();
        // Only a running or saved L2's window holds its pages: an exited
        // one's may have been handed away, an incoming one's has not
        // arrived. Touching a window without pages kills this L1.
        let holds_pages = matches!(self.state, AgentL2State::Running | AgentL2State::Saved);
        let workload = holds_pages.then(|| window::read_header(&self.window).ok()).flatten();
        AgentL2 {
            name: self.name.clone(),
            window: self.window.index,
            size: self.window.size,
            pid: self.pid(),
            state: self.state,
            workload,
            detail: self.detail.clone(),
        }
    }

    /// Stops the L2 and saves its CPU and device state (no RAM).
    pub fn save(&mut self, cfg: &Config) -> Result<Saved> {
        if self.state != AgentL2State::Running {
            bail!("L2 {} is {:?}, not running", self.name, self.state);
        }
        let path = cfg.run_dir.join(format!("{}.state", self.name));
        self.qmp.execute("stop", json!({}))?;
        let stopped = Instant::now();
        self.state = AgentL2State::Saved;
        let saved = (|| {
            let uri = format!("exec:cat > {}", path.display());
            self.qmp.execute("migrate", json!({"uri": uri}))?;
            self.qmp.wait_migration(cfg.timeout)?;
            let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
            let _ = std::fs::remove_file(&path);
            anyhow::Ok(bytes)
        })();
        let bytes = match saved {
            Ok(b) => b,
            Err(e) => {
                let _ = self.resume();
                return Err(e.context(format!("saving L2 {} (resumed)", self.name)));
            }
        };
        Ok(Saved {
            name: self.name.clone(),
            window: self.window.index,
            state: STANDARD.encode(&bytes),
            state_bytes: bytes.len() as u64,
            workload: window::read_header(&self.window).ok(),
            stopped_us_ago: stopped.elapsed().as_micros() as u64,
        })
    }

    /// Resumes a saved L2 where it was (a migration rolled back).
    pub fn resume(&mut self) -> Result<()> {
        self.poll();
        if self.state == AgentL2State::Exited {
            bail!("L2 {}: its QEMU has exited", self.name);
        }
        self.qmp.execute("cont", json!({}))?;
        self.state = AgentL2State::Running;
        Ok(())
    }

    /// Loads a saved state into an L2 started with `incoming` and runs it.
    pub fn restore(&mut self, cfg: &Config, state: &str) -> Result<()> {
        let bytes = STANDARD.decode(state).context("the state is not base64")?;
        let path = cfg.run_dir.join(format!("{}.incoming", self.name));
        std::fs::write(&path, &bytes)?;
        let loaded = (|| {
            self.qmp.execute("migrate-incoming", json!({"uri": format!("exec:cat {}", path.display())}))?;
            self.qmp.wait_migration(cfg.timeout)?;
            self.qmp.execute("cont", json!({}))?;
            anyhow::Ok(())
        })();
        if loaded.is_ok() {
            self.state = AgentL2State::Running;
        }
        let _ = std::fs::remove_file(&path);
        loaded.with_context(|| format!("restoring L2 {}", self.name))
    }

    /// Ends the QEMU at once (its L2 moved: it must never run again here).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.state = AgentL2State::Exited;
        self.detail = Some("moved away; QEMU killed".into());
    }
}

fn connect_when_ready(path: &Path, child: &mut Child, timeout: Duration) -> Result<Qmp> {
    let deadline = Instant::now() + timeout;
    loop {
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
