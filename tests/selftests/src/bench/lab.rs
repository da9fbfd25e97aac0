//! `vmbeamctl migrate-all` between two lab L1s: per-L2 downtime against
//! the L2's size and the number of L2s moved at once.

use std::{
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    bench::{
        memwatch::{peak, MemWatch},
        timed, Sample,
    },
    exe,
};

struct Lab {
    child: Child,
    socket: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Lab {
    fn start(name: &str, l2: usize, size: u64, huge: bool) -> Result<Self, String> {
        let socket = std::env::temp_dir().join(format!("vmbeam-bench-{name}-{}.sock", std::process::id()));
        let child = Command::new(exe("vmbeam-lab"))
            .args(["--socket".as_ref(), socket.as_os_str()])
            .args(["--name", name, "--l2", &l2.to_string(), "--l2-size", &format!("{}M", size >> 20)])
            .args(huge.then_some("--huge"))
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("vmbeam-lab: {e}"))?;
        let lab = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(120);
        while UnixStream::connect(&lab.socket).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{name}: no control socket"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(lab)
    }
}

/// One migrate-all of `l2` L2s of `size` bytes (windows of 2 MiB blocks
/// with `huge`); the sample's downtime is
/// the mean over the L2s (as vmbeamctl measured it), its wall the whole
/// command's.
pub fn migrate_all(l2: usize, size: u64, huge: bool) -> Result<Sample, String> {
    let aged = Lab::start("aged", l2, size, huge)?;
    let clean = Lab::start("clean", 0, 0, false)?;
    // Let every L2 complete a verified pass first: a running workload.
    std::thread::sleep(Duration::from_millis(500));
    let watch = MemWatch::start();
    let (out, mut sample) = timed(|| {
        Command::new(exe("vmbeamctl"))
            .arg("migrate-all")
            .args(["--from".as_ref(), aged.socket.as_os_str(), "--to".as_ref(), clean.socket.as_os_str()])
            .args(["--json", "--no-verify", "--timeout-s", "600"])
            .output()
    });
    let out = out.map_err(|e| format!("vmbeamctl: {e}"))?;
    let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("report: {e}"))?;
    if r["ok"] != true {
        return Err(format!("migrate-all failed: {}", r["error"]));
    }
    // Downtime needs the resume stamp, which --no-verify still waits for.
    sample.downtime_ms = r["totals"]["downtime_ms_mean"].as_f64();
    sample.bytes_copied = r["module"]["bytes_copied"].as_u64().unwrap_or(0);
    sample.peak_extra_mib = peak(&watch);
    Ok(sample)
}
