//! The peers: Debian's QEMU migrating a (paused) VM whose RAM holds `size`
//! bytes of random data to a second QEMU on the same machine, by plain
//! pre-copy over a Unix socket (every byte copied), and with the RAM in a
//! shared file and `x-ignore-shared` (QEMU's local-upgrade path: nothing
//! copied, nothing revoked either).

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use vmbeam::qmp::Qmp;

use crate::bench::{
    memwatch::{peak, MemWatch},
    timed, Sample,
};

const TIMEOUT: Duration = Duration::from_secs(600);

struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    /// A stopped VM with `size` bytes of RAM from `backend` (QEMU -object
    /// syntax, id ram0), optionally waiting for an incoming migration.
    fn start(dir: &Path, name: &str, size: u64, backend: &str, incoming: bool) -> Result<Self, String> {
        let sock = dir.join(format!("{name}.qmp"));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35,memory-backend=ram0", "-accel", "kvm", "-cpu", "qemu64"])
            .args(["-m", &format!("{}M", size >> 20), "-object", backend])
            .args(["-nodefaults", "-display", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = cmd.spawn().map_err(|e| format!("qemu-system-x86_64: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(qmp) = Qmp::connect(&sock, TIMEOUT) {
                return Ok(Self { child, qmp });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("QEMU {name} exited {status}: {err}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("QEMU {name}: no QMP socket within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn exec(&mut self, command: &str, args: Value) -> Result<Value, String> {
        self.qmp.execute(command, args).map_err(|e| e.to_string())
    }
}

/// `size` bytes of data no page of which is zero or equal to another: a
/// random 1 MiB block, each page stamped with its index.
fn fill_random(path: &Path, size: u64) -> Result<(), String> {
    let mut block = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom").and_then(|mut r| r.read_exact(&mut block)).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut page_index = 0u64;
    for _ in 0..size / block.len() as u64 {
        for page in block.chunks_mut(4096) {
            page[..8].copy_from_slice(&page_index.to_le_bytes());
            page_index += 1;
        }
        f.write_all(&block).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One migration from a source to a waiting destination; the sample's
/// downtime and bytes are QEMU's own (`query-migrate`).
///
/// `watch` began before the destination started: its RAM is the extra
/// memory of a copying migration.
fn migrate(
    src: &mut Qemu,
    dst: &mut Qemu,
    uri: &str,
    caps: &[&str],
    watch: &Option<MemWatch>,
) -> Result<Sample, String> {
    for q in [&mut *src, &mut *dst] {
        let caps: Vec<Value> = caps.iter().map(|c| json!({"capability": c, "state": true})).collect();
        if !caps.is_empty() {
            q.exec("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        }
    }
    dst.exec("migrate-incoming", json!({ "uri": uri }))?;
    let (done, mut sample) = timed(|| {
        src.exec("migrate", json!({ "uri": uri }))?;
        src.qmp.wait_migration(TIMEOUT).map_err(|e| e.to_string())
    });
    let info = done?;
    sample.downtime_ms = info["downtime"].as_f64();
    sample.bytes_copied = info["ram"]["transferred"].as_u64().unwrap_or(0);
    sample.peak_extra_mib = peak(watch);
    Ok(sample)
}

fn scratch(name: &str) -> PathBuf {
    // tmpfs: the RAM file is memory, as guest RAM is.
    PathBuf::from("/dev/shm").join(format!("vmbeam-bench-{}-{name}", std::process::id()))
}

/// Plain pre-copy: source RAM is the random file, the destination's is
/// anonymous; every byte crosses the socket.
pub fn precopy(size: u64) -> Result<Sample, String> {
    let (dir, ram) = (std::env::temp_dir(), scratch("precopy.ram"));
    fill_random(&ram, size)?;
    let src_backend = format!("memory-backend-file,id=ram0,size={size},mem-path={},share=on", ram.display());
    let result = (|| {
        let mut src = Qemu::start(&dir, "precopy-src", size, &src_backend, false)?;
        let watch = MemWatch::start();
        let mut dst = Qemu::start(&dir, "precopy-dst", size, &format!("memory-backend-ram,id=ram0,size={size}"), true)?;
        let uri = format!("unix:{}", dir.join(format!("vmbeam-bench-{}.mig", std::process::id())).display());
        migrate(&mut src, &mut dst, &uri, &[], &watch)
    })();
    let _ = std::fs::remove_file(&ram);
    result
}

/// Shared memory + `x-ignore-shared`: both QEMUs map the same file; only
/// device state crosses the socket.
pub fn ignore_shared(size: u64) -> Result<Sample, String> {
    let (dir, ram) = (std::env::temp_dir(), scratch("shared.ram"));
    fill_random(&ram, size)?;
    let backend = format!("memory-backend-file,id=ram0,size={size},mem-path={},share=on", ram.display());
    let result = (|| {
        let mut src = Qemu::start(&dir, "shared-src", size, &backend, false)?;
        let watch = MemWatch::start();
        let mut dst = Qemu::start(&dir, "shared-dst", size, &backend, true)?;
        let uri = format!("unix:{}", dir.join(format!("vmbeam-bench-{}-s.mig", std::process::id())).display());
        migrate(&mut src, &mut dst, &uri, &["x-ignore-shared"], &watch)
    })();
    let _ = std::fs::remove_file(&ram);
    result
}
