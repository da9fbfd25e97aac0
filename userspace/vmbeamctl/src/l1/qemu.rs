//! A real L1 hypervisor: Linux + KVM + QEMU (the in-L1 agent drives the L2
//! QEMUs), run by a QEMU at L0 whose windows are vmbeam regions; and a pair
//! of them as a [`Pair`].
//!
//! Window `K` of an L1 is, at L0, QEMU object `winK` (a
//! `memory-backend-file` whose mem-path is `/proc/self/fd/N`, a region fd
//! handed over with `getfd`) shown to the L1 as `ivshmem-plain` device
//! `ivK` behind PCIe root port `rpK`. The L1's own RAM is object `ram0`,
//! a region too ([`ram`]), so the pages of L2s on ordinary L1 memory can
//! be gathered out of it. Everything vmbeamctl needs is found again from
//! QEMU itself (QMP, `/proc`), so no state lives outside it.

use std::{
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::{net::UnixStream, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use vmbeam::{
    control::{
        agent::{AgentL2, Named, AGENT_SERVICE},
        Client,
    },
    procfs::{self, FileId},
    qmp::Qmp,
    Device, Region,
};

pub mod gather;
pub mod journal;
mod marks;
mod pair;
pub mod ram;
pub mod state_window;
pub use pair::{recover, QemuPair};
pub use ram::RamRegion;
pub use state_window::StateWindow;

/// The chardev QEMU exposes the agent's virtio-serial port through.
pub const AGENT_CHARDEV: &str = "vmbeam-agent";
/// Root ports an L1 gets: its most windows.
pub const MAX_WINDOWS: u32 = 8;

/// One window as L0 sees it.
#[derive(Debug)]
pub struct Window {
    pub index: u32,
    pub size: u64,
    /// A fd of the region (taken from QEMU).
    pub region: Region,
    /// The region's file: names QEMU's mapping of it in `/proc/PID/maps`.
    pub file: FileId,
    /// In 2 MiB blocks, mapped by PMD (`l1 start --huge-windows`).
    pub huge: bool,
}

impl Window {
    /// Page frames behind QEMU's mapping of this window (0: not present);
    /// `qemu_pid` must be the window's owner (a huge window's frames are
    /// read from the owner's page tables by the module).
    pub fn frames(&self, qemu_pid: u32) -> Result<Vec<u64>> {
        let hva = procfs::mapping_of_file(qemu_pid, self.file)?
            .ok_or_else(|| anyhow!("QEMU {qemu_pid} does not map window {}", self.index))?;
        Ok(self.region.owner_frames(qemu_pid, hva, 0, self.size)?)
    }
}

/// A connected real L1.
pub struct QemuL1 {
    pub name: String,
    pub pid: u32,
    pub qmp_path: PathBuf,
    pub qmp: Qmp,
    pub agent: Client,
    pub windows: Vec<Window>,
    /// Its RAM, when that is a vmbeam region (`l1 start` makes it one).
    pub ram: Option<RamRegion>,
    /// Where saved L2 states move with the pages (`l1 start` plugs one).
    pub state_window: Option<StateWindow>,
}

impl QemuL1 {
    /// Connects to the L1 whose QEMU serves QMP at `qmp_path`, and to its
    /// agent (QEMU's `vmbeam-agent` chardev names the socket).
    pub fn connect(qmp_path: &Path, timeout: Duration) -> Result<Self> {
        let mut qmp = Qmp::connect(qmp_path, timeout)?;
        let pid = peer_pid(qmp_path)?;
        let name = qmp.execute("query-name", json!({}))?["name"].as_str().unwrap_or("l1").to_string();
        let agent_path = agent_socket(&mut qmp)?;
        let agent = Client::connect_agent(&agent_path, timeout)
            .with_context(|| format!("{name}: the agent at {}", agent_path.display()))?;
        ensure!(
            agent.server().service == AGENT_SERVICE,
            "{}: not a vmbeam agent ({})",
            agent_path.display(),
            agent.server().service
        );
        let windows = windows(&mut qmp, pid)?;
        let ram = RamRegion::find(&mut qmp, pid)?;
        let state_window = StateWindow::find(&mut qmp, pid)?;
        Ok(Self { name, pid, qmp_path: qmp_path.to_path_buf(), qmp, agent, windows, ram, state_window })
    }

    /// Ends L2 `name`'s QEMU in this L1 (its agent's `kill-l2`).
    pub fn kill_l2(&mut self, name: &str) -> Result<()> {
        self.agent.call::<Value>("kill-l2", Named { name: name.into() })?;
        Ok(())
    }

    /// Runs a stopped L2 on again where it is (its agent's `resume-l2`).
    pub fn resume_l2(&mut self, name: &str) -> Result<()> {
        self.agent.call::<AgentL2>("resume-l2", Named { name: name.into() })?;
        Ok(())
    }

    pub fn window(&self, index: u32) -> Option<&Window> {
        self.windows.iter().find(|w| w.index == index)
    }

    /// Asks the agent to power the L1 off, then waits for its QEMU to exit
    /// (QMP `quit` if it does not).
    pub fn shut_down(mut self, timeout: Duration) -> Result<()> {
        let _ = self.agent.call::<Value>("poweroff", ());
        self.wait_exit(timeout)
    }

    /// Ends the L1 at L0 (QMP `quit`) without letting it run another
    /// instruction: for an L1 that holds empty frames of RAM.
    pub fn destroy(mut self, timeout: Duration) -> Result<()> {
        let _ = self.qmp.execute("quit", json!({}));
        self.wait_exit(timeout)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Path::new(&format!("/proc/{}", self.pid)).exists() {
            if Instant::now() > deadline {
                let _ = self.qmp.execute("quit", json!({}));
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// The pid of the process serving a Unix socket (SO_PEERCRED).
fn peer_pid(path: &Path) -> Result<u32> {
    let s = UnixStream::connect(path)?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.pid() as u32)
}

fn agent_socket(qmp: &mut Qmp) -> Result<PathBuf> {
    let chardevs = qmp.execute("query-chardev", json!({}))?;
    let filename = chardevs
        .as_array()
        .and_then(|a| a.iter().find(|c| c["label"] == AGENT_CHARDEV))
        .and_then(|c| c["filename"].as_str())
        .ok_or_else(|| anyhow!("QEMU has no chardev `{AGENT_CHARDEV}`: not a vmbeam L1"))?;
    // "[disconnected:]unix:/path,server=on" (QEMU 7.2: state, then options).
    let path = filename
        .split_once("unix:")
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("chardev {AGENT_CHARDEV} is {filename}, not a Unix socket"))?;
    Ok(PathBuf::from(path.split(',').next().unwrap_or(path)))
}

/// The L1's windows: its `win<K>` memory backends, with their region fds.
fn windows(qmp: &mut Qmp, pid: u32) -> Result<Vec<Window>> {
    let objects = qmp.execute("qom-list", json!({"path": "/objects"}))?;
    let mut windows = Vec::new();
    for obj in objects.as_array().into_iter().flatten() {
        let Some(index) = obj["name"].as_str().and_then(|n| n.strip_prefix("win")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        let (region, size, file) =
            backend_region(qmp, pid, &format!("win{index}")).with_context(|| format!("window {index}"))?;
        let huge = region.info().with_context(|| format!("window {index}"))?.huge;
        windows.push(Window { index, size, region, file, huge });
    }
    windows.sort_by_key(|w| w.index);
    Ok(windows)
}

/// The region behind QEMU memory backend `id` (its mem-path is
/// `/proc/self/fd/N`, a region fd): a fd of it taken from QEMU, its size
/// and its file (which names QEMU's mapping of it in `/proc/PID/maps`).
pub(crate) fn backend_region(qmp: &mut Qmp, pid: u32, id: &str) -> Result<(Region, u64, FileId)> {
    let path = format!("/objects/{id}");
    let mem_path = qmp.execute("qom-get", json!({"path": path, "property": "mem-path"}))?;
    let size = qmp.execute("qom-get", json!({"path": path, "property": "size"}))?.as_u64().unwrap_or(0);
    let fd: i32 = mem_path
        .as_str()
        .and_then(|p| p.strip_prefix("/proc/self/fd/"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("mem-path {mem_path} is not a region fd"))?;
    let region = Region::from_fd(procfs::take_fd(pid, fd).with_context(|| format!("pidfd_getfd({pid}, {fd})"))?);
    let info = region.info().with_context(|| format!("QEMU's fd {fd} is not a vmbeam region"))?;
    ensure!(info.size == size, "a region of {} bytes behind a {size}-byte backend", info.size);
    let file = FileId::of(region.as_fd())?;
    Ok((region, size, file))
}

/// What `vmbeamctl l1 start` boots.
#[derive(Debug, Clone, clap::Args)]
pub struct LaunchArgs {
    /// The L1's name (QEMU `-name`, the agent's greeting).
    #[arg(long)]
    pub name: String,
    /// Directory for its QMP socket, agent socket, console and log.
    #[arg(long, default_value = "/run/vmbeam")]
    pub dir: PathBuf,
    /// Window sizes (one ivshmem window each, e.g. `16M,16M`): the RAM of
    /// the L2s this L1 can hold. Powers of two.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, required = true)]
    pub windows: Vec<u64>,
    /// Give empty windows (pages arrive with a migration) instead of fresh
    /// zeroed ones: how a clean L1 is booted.
    #[arg(long)]
    pub empty: bool,
    /// Windows of 2 MiB blocks (`VMBEAM_CREATE_HUGE`), mapped at L0 by PMD:
    /// a migration zaps one entry per 2 MiB and L0's KVM maps the L1's
    /// view of them with 2 MiB entries. Their frames are read from the
    /// owner's page tables by the module (pagemap shows none); GUP, and so
    /// vhost or O_DIRECT at L0, cannot reach them.
    #[arg(long)]
    pub huge_windows: bool,
    /// L1 RAM.
    #[arg(long, default_value = "384M", value_parser = parse_bytes)]
    pub memory: u64,
    /// Let QEMU allocate the L1's RAM itself (anonymous memory) instead of
    /// making it a vmbeam region: then L2s on ordinary memory of this L1
    /// cannot be gathered out of it (only L2s on windows move).
    #[arg(long)]
    pub anonymous_ram: bool,
    /// The L1's RAM region in 2 MiB blocks (`VMBEAM_CREATE_HUGE`): L0 maps
    /// the L1 by PMD, and an L2 the L1 backs with 2 MiB pages is gathered
    /// in whole blocks (into a huge window it maps by PMD again). GUP, so
    /// vhost or `O_DIRECT` at L0, cannot reach the L1's RAM then.
    #[arg(long, conflicts_with = "anonymous_ram")]
    pub huge_ram: bool,
    /// The L1 kernel (default: $VMBEAM_L1_KERNEL).
    #[arg(long, env = "VMBEAM_L1_KERNEL")]
    pub kernel: PathBuf,
    /// The L1 initramfs (default: $VMBEAM_L1_INITRD; `make l1-image`).
    #[arg(long, env = "VMBEAM_L1_INITRD")]
    pub initrd: PathBuf,
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Seconds the L1 may take to boot to its agent.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout_s: u64,
}

/// A size in bytes, with an optional K, M or G suffix.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 16M)"))?;
    n.checked_mul(1 << shift)
        .filter(|b| b % 4096 == 0 && *b > 0)
        .ok_or_else(|| format!("`{s}`: not a whole number of pages"))
}

/// A window size: a power of two of at least 4 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if !bytes.is_power_of_two() || bytes < 4 << 20 {
        return Err(format!("`{s}`: a window is a power of two of at least 4M (a PCI BAR)"));
    }
    Ok(bytes)
}

/// Boots an L1 and plugs its windows before it runs (`-S`, then `cont`), so
/// the L1 finds them at boot and no hot-plug is needed. Returns the pid.
pub fn launch(a: &LaunchArgs) -> Result<QemuL1> {
    ensure!(a.windows.len() as u32 <= MAX_WINDOWS, "at most {MAX_WINDOWS} windows");
    std::fs::create_dir_all(&a.dir)?;
    let file = |ext: &str| a.dir.join(format!("{}.{ext}", a.name));
    let (qmp_path, agent_path) = (file("qmp"), file("agent"));
    for p in [&qmp_path, &agent_path] {
        let _ = std::fs::remove_file(p);
    }
    let dev = Device::open()?;
    // The RAM region goes to QEMU as an inherited fd, bound to its process
    // by `l1 exec-owning` before QEMU runs.
    let ram = if a.anonymous_ram {
        None
    } else {
        let region = dev.create_region_with(a.memory, false, a.huge_ram).context("the L1's RAM region")?;
        ram::inheritable(&region)?;
        Some(region)
    };
    // Under a shell that logs how QEMU ended: a QEMU killed by a signal
    // writes nothing itself.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#""$@"; echo "vmbeam: QEMU exited with status $? (over 128: killed by signal status-128)" >&2"#)
        .arg("sh");
    if let Some(region) = &ram {
        let fd = region.as_fd().as_raw_fd();
        cmd.arg(std::env::current_exe().context("finding vmbeamctl itself")?)
            .args(["l1", "exec-owning", "--region-fd", &fd.to_string(), "--"])
            .arg(&a.qemu)
            .args(ram::qemu_args(fd, a.memory, a.huge_ram));
    } else {
        cmd.arg(&a.qemu);
    }
    cmd.args(["-enable-kvm", "-cpu", "host,-tsc-deadline", "-M", "q35", "-smp", "1", "-m"])
        .arg(format!("{}M", a.memory >> 20))
        .args(["-nodefaults", "-nographic", "-no-reboot", "-S", "-name", &a.name])
        .arg("-kernel")
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&a.initrd)
        .args(["-append", &format!("quiet console=ttyS0 panic=-1 vmbeam.name={}", a.name)])
        .arg("-serial")
        .arg(format!("file:{}", file("console").display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .arg("-chardev")
        .arg(format!("socket,id={AGENT_CHARDEV},path={},server=on,wait=off", agent_path.display()))
        .args(["-device", &format!("virtserialport,chardev={AGENT_CHARDEV},name=vmbeam.agent")]);
    for (k, size) in a.windows.iter().enumerate() {
        cmd.args([
            "-device",
            &format!("pcie-root-port,id=rp{k},bus=pcie.0,chassis={},addr={:#x},pref64-reserve={size}", k + 1, 0x10 + k),
        ]);
    }
    cmd.args(["-device", &state_window::root_port()]);
    let log = std::fs::File::create(file("log"))?;
    // SAFETY: setsid() in the child before exec: async-signal-safe.
    let child = unsafe {
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from))
    }
    .spawn()
    .with_context(|| format!("starting {}", a.qemu.display()))?;
    drop(ram); // QEMU has its own fd of it now
               // The shell leads its own session: its process group is QEMU's too.
    let pid = child.id();
    let fail = |e: anyhow::Error| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-(pid as i32)), nix::sys::signal::Signal::SIGKILL);
        let log = std::fs::read_to_string(file("log")).unwrap_or_default();
        e.context(format!("L1 {}: QEMU log: {}", a.name, log.trim()))
    };
    let mut qmp = wait_for_qmp(&qmp_path, pid, Duration::from_secs(30)).map_err(fail)?;
    let qemu_pid = peer_pid(&qmp_path).map_err(fail)?;
    plug_windows(&dev, &mut qmp, qemu_pid, a).map_err(fail)?;
    qmp.execute("cont", json!({})).map_err(|e| fail(e.into()))?;
    drop(qmp);
    let deadline = Instant::now() + Duration::from_secs(a.boot_timeout_s);
    loop {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(fail(anyhow!("QEMU exited while the L1 booted")));
        }
        match QemuL1::connect(&qmp_path, Duration::from_secs(10)) {
            Ok(l1) => return Ok(l1),
            Err(e) if Instant::now() > deadline => return Err(fail(e.context("the L1's agent did not answer"))),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

fn wait_for_qmp(path: &Path, pid: u32, timeout: Duration) -> Result<Qmp> {
    let deadline = Instant::now() + timeout;
    loop {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("QEMU exited at start");
        }
        if let Ok(q) = Qmp::connect(path, timeout) {
            return Ok(q);
        }
        ensure!(Instant::now() < deadline, "no QMP socket at {} after {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Regions bound to QEMU's VM, handed over with `getfd`, shown as
/// ivshmem-plain devices behind the root ports; then the state window.
fn plug_windows(dev: &Device, qmp: &mut Qmp, pid: u32, a: &LaunchArgs) -> Result<()> {
    let vm_fds = procfs::fds_linking_to(pid, "anon_inode:kvm-vm")?;
    let [vm_fd] = vm_fds[..] else { bail!("QEMU {pid} has {} KVM VM fds, expected 1", vm_fds.len()) };
    let vm: OwnedFd = procfs::take_fd(pid, vm_fd).context("taking QEMU's VM fd (pidfd_getfd)")?;
    for (k, &size) in a.windows.iter().enumerate() {
        let region = dev.create_region_with(size, a.empty, a.huge_windows)?;
        dev.bind(region.as_fd(), vm.as_fd())?;
        // A huge window's mapping must be 2 MiB-aligned for its PMDs: QEMU
        // maps a file backend with MAP_FIXED inside a reservation aligned
        // to `align`, so the region's own aligned mmap address is not used.
        let align = a.huge_windows.then_some(2u64 << 20);
        let ids = Ivshmem { backend: &format!("win{k}"), device: &format!("iv{k}"), port: &format!("rp{k}") };
        plug_region(qmp, pid, &region, &ids, align).with_context(|| format!("window {k}"))?;
    }
    let region = state_window::create(dev, vm.as_fd())?;
    let ids =
        Ivshmem { backend: state_window::BACKEND_ID, device: state_window::DEVICE_ID, port: state_window::PORT_ID };
    plug_region(qmp, pid, &region, &ids, None).context("the state window")
}

/// The QEMU ids of a region shown as an ivshmem-plain device.
struct Ivshmem<'a> {
    backend: &'a str,
    device: &'a str,
    port: &'a str,
}

/// Hands `region` to QEMU (`getfd`) and shows it to the L1 as an
/// ivshmem-plain device behind an empty root port.
fn plug_region(qmp: &mut Qmp, pid: u32, region: &Region, ids: &Ivshmem<'_>, align: Option<u64>) -> Result<()> {
    // A named monitor fd (`getfd`) stays open in QEMU for its life (an
    // `add-fd` fdset entry is closed once no monitor is connected), so
    // `/proc/self/fd/N` names this region for as long as QEMU runs and
    // a later vmbeamctl finds it again from the backend's mem-path.
    qmp.execute_with_fds("getfd", json!({"fdname": ids.backend}), &[region.as_fd()])?;
    let fd = procfs::fd_of_file(pid, FileId::of(region.as_fd())?)?
        .ok_or_else(|| anyhow!("QEMU {pid} did not keep {}'s fd", ids.backend))?;
    let size = region.info()?.size;
    let mut backend = json!({"qom-type": "memory-backend-file", "id": ids.backend,
                             "mem-path": format!("/proc/self/fd/{fd}"), "share": true, "size": size});
    if let Some(align) = align {
        backend["align"] = json!(align);
    }
    qmp.execute("object-add", backend)?;
    qmp.execute(
        "device_add",
        json!({"driver": "ivshmem-plain", "memdev": ids.backend, "bus": ids.port, "id": ids.device}),
    )?;
    Ok(())
}
