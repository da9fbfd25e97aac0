//! `vmbeamctl migrate-all` between two real L1s (QEMU + KVM at L0, the test
//! kernel with QEMU and vmbeam-agent inside, as `make demo` boots them):
//! per-L2 downtime against the L2's size. Two L2s of that size move at
//! once, as in the demo: one on a window (its pages move whole) and one on
//! ordinary L1 memory (its pages are gathered out of the aged L1's RAM).
//! With `huge`, both L1s' windows and RAM are 2 MiB blocks (`l1 start
//! --huge-windows --huge-ram`): the gathered L2, backed by THP in the aged
//! L1, comes out of it in whole blocks and lands in a huge window. With
//! `over_link`, the saved states go over the agents' virtio-serial links
//! (`--states-over-link`) instead of moving with the pages through the
//! L1s' state windows: what the state windows took out of the downtime.
//! With `one_at_a_time`, `migrate-all --one-at-a-time` moves the two L2s in
//! a migration each, the second after the first resumed: each L2's own
//! downtime without the other's save and load beside it.
//!
//! Needs VMBEAM_L1_KERNEL and VMBEAM_L1_INITRD (tests/run.sh sets them).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

use crate::{
    bench::{
        memwatch::{peak, MemWatch},
        size_name, timed, Sample,
    },
    exe,
};

/// One migration's two L2s: the window one and the gathered one; then
/// QEMU's local upgrade of both in the clean L1, one sample per L2 (empty
/// if it failed, the move's samples standing on their own, or not run:
/// states over the links).
pub struct RealRun {
    pub window: Sample,
    pub gathered: Sample,
    pub upgrade: Vec<Sample>,
}

/// How the two L1s are started and how `migrate-all` moves their L2s.
#[derive(Clone, Copy)]
pub struct Setup {
    /// 2 MiB windows and L1 RAM (`--huge-windows --huge-ram`).
    pub huge: bool,
    /// The saved states over the agents' links (`--states-over-link`).
    pub over_link: bool,
    /// A migration per L2 (`--one-at-a-time`).
    pub one_at_a_time: bool,
}

impl Setup {
    /// Every setup the bench runs, in its order.
    pub const ALL: [Setup; 4] = [
        Setup { huge: false, over_link: false, one_at_a_time: false },
        Setup { huge: true, over_link: false, one_at_a_time: false },
        Setup { huge: true, over_link: true, one_at_a_time: false },
        Setup { huge: true, over_link: false, one_at_a_time: true },
    ];

    /// The rows' name, up to the L2 it is about (the names of the first
    /// three are those of earlier tables, which a resumed bench matches).
    pub fn method(&self) -> String {
        let huge = if self.huge { ", 2M windows and RAM" } else { "" };
        let link = if self.over_link { ", states over the links" } else { "" };
        let how = if self.one_at_a_time { "one at a time" } else { "at once" };
        format!("real-L1 migrate-all{huge}{link}, 2 L2s of this size {how}")
    }

    /// Only a move with state windows is followed by the local upgrade,
    /// its peer; one per window size is enough.
    pub fn upgrades(&self) -> bool {
        !self.over_link && !self.one_at_a_time
    }
}

/// A directory of L1s (QMP sockets, consoles, logs) whose QEMUs are killed
/// when it is dropped, whatever state the run left them in.
struct L1Dir(PathBuf);

impl Drop for L1Dir {
    fn drop(&mut self) {
        let _ = Command::new("pkill").args(["-9", "-f"]).arg(&self.0).status();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vmbeamctl(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(exe("vmbeamctl")).args(args).output().map_err(|e| format!("vmbeamctl: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("vmbeamctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Boots an aged L1 with one L2 of `size` on a window and one on its own
/// memory, a clean L1 with an empty window, and moves both L2s. A failed
/// run's error ends with where the L1s stand ([`L1Dir::where_things_stand`]).
pub fn migrate_all(size: u64, setup: Setup) -> Result<RealRun, String> {
    let dir = L1Dir(std::env::temp_dir().join(format!("vmbeam-bench-real-{}", std::process::id())));
    one_run(&dir, size, setup).map_err(|e| format!("{e}\n{}", dir.where_things_stand()))
}

impl L1Dir {
    /// The last lines of both L1s' consoles (the agents log every request
    /// there) and where their vCPUs are (tests/nested/l1-cpus.py; the bench
    /// runs from the project root): is a silent L1 hung or busy?
    fn where_things_stand(&self) -> String {
        let tail = |name: &str| {
            let console = std::fs::read_to_string(self.0.join(format!("{name}.console"))).unwrap_or_default();
            let lines: Vec<&str> = console.lines().collect();
            lines[lines.len().saturating_sub(8)..].join(" | ")
        };
        let cpus = std::process::Command::new("python3")
            .arg("tests/nested/l1-cpus.py")
            .args(["aged", "clean"].map(|n| self.0.join(format!("{n}.qmp"))).iter().filter(|p| p.exists()))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("  aged console: {}\n  clean console: {}\n{}", tail("aged"), tail("clean"), cpus.trim_end())
    }
}

fn one_run(dir: &L1Dir, size: u64, setup: Setup) -> Result<RealRun, String> {
    let Setup { huge, over_link, one_at_a_time } = setup;
    std::fs::create_dir_all(&dir.0).map_err(|e| format!("{}: {e}", dir.0.display()))?;
    let d = path(&dir.0);
    let mib = format!("{}M", size >> 20);
    // The L1's own 640 MiB (kernel, initramfs with QEMU, the L2 QEMUs) +
    // the gathered L2, which its QEMU locks (with 384 MiB beside a locked
    // 1 GiB L2 its start timed out 4 times in 5; with 640 MiB it still
    // does now and then, as a 64 MiB one did: not a matter of memory).
    let l1_ram = format!("{}M", 640 + (size >> 20));
    let (aged_qmp, clean_qmp) = (dir.0.join("aged.qmp"), dir.0.join("clean.qmp"));
    // The clean L1 has a window for each L2 (the gathered one lands in one).
    let two_windows = format!("{mib},{mib}");
    let start = |name: &str, empty: bool| {
        let windows = if empty { &two_windows } else { &mib };
        let mut args = vec!["l1", "start", "--name", name, "--dir", d, "--windows", windows, "--memory", &l1_ram];
        if empty {
            args.push("--empty");
        }
        if huge {
            args.extend(["--huge-windows", "--huge-ram"]);
        }
        vmbeamctl(&args).map(drop)
    };
    start("aged", false)?;
    let aged = path(&aged_qmp);
    vmbeamctl(&["l1", "start-l2", "--qmp", aged, "--name", "vm0", "--window", "0"])?;
    vmbeamctl(&["l1", "start-l2", "--qmp", aged, "--name", "vm1", "--memory", &mib, "--thp"])?;
    start("clean", true)?;
    let watch = MemWatch::start();
    let (out, sample) = timed(|| {
        Command::new(exe("vmbeamctl"))
            .args(["migrate-all", "--from", aged, "--to", path(&clean_qmp), "--json", "--no-verify"])
            // Bounds every agent reply too: an L1 that TCG left silent
            // costs this run 3 minutes, not 10 (a whole 1 GiB move took 13 s).
            .args(["--timeout-s", "180"])
            .args(over_link.then_some("--states-over-link"))
            .args(one_at_a_time.then_some("--one-at-a-time"))
            .output()
    });
    let out = out.map_err(|e| format!("vmbeamctl: {e}"))?;
    let r: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("report: {e}: {}", String::from_utf8_lossy(&out.stderr).trim()))?;
    if r["ok"] != true {
        return Err(format!("migrate-all of 2 L2s of {} failed: {}", size_name(size), r["error"]));
    }
    // Where the time went, for the note beside the table.
    let l2s: Vec<String> = r["l2"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "{} save {} (QEMU's {}) restore {} kernel-marked {}",
                l["name"], l["save_ms"], l["qemu_save_ms"], l["restore_ms"], l["guest_marks"]["downtime_ms"]
            )
        })
        .collect();
    eprintln!("bench: {}, {}: steps (ms) {}; {}", setup.method(), size_name(size), r["phases_ms"], l2s.join("; "));
    let sample = Sample {
        bytes_copied: r["module"]["bytes_copied"].as_u64().unwrap_or(0),
        peak_extra_mib: peak(&watch),
        ..sample
    };
    let of = |name: &str| -> Result<Sample, String> {
        let l2 = r["l2"].as_array().and_then(|l| l.iter().find(|l| l["name"] == name)).ok_or(format!("no {name}"))?;
        let downtime = l2["downtime_ms"].as_f64().ok_or(format!("{name}: no downtime"))?;
        Ok(Sample { downtime_ms: Some(downtime), ..sample })
    };
    let (window, gathered) = (of("vm0")?, of("vm1")?);
    let upgrade = if !setup.upgrades() {
        Vec::new()
    } else {
        local_upgrade(&clean_qmp, size).unwrap_or_else(|e| {
            eprintln!("bench: real L1s {}: the local upgrade: {e}\n{}", size_name(size), dir.where_things_stand());
            Vec::new()
        })
    };
    Ok(RealRun { window, gathered, upgrade })
}

/// QEMU's own local upgrade (`vmbeamctl l1 upgrade-l2s`: x-ignore-shared
/// from each L2's QEMU to a new one on the same window) of every L2 in the
/// L1 that just received them: what the same L1 needs to restart the
/// L2s' QEMU with nothing moved at L0, the peer of the move at its level.
/// One sample per L2: its downtime (stop to `cont`, the agent's clock).
fn local_upgrade(qmp: &Path, size: u64) -> Result<Vec<Sample>, String> {
    let watch = MemWatch::start();
    let (out, sample) = timed(|| vmbeamctl(&["l1", "upgrade-l2s", "--qmp", path(qmp), "--json"]));
    let upgraded: Value = serde_json::from_slice(&out?.stdout).map_err(|e| format!("upgrade-l2s' reply: {e}"))?;
    let l2s = upgraded.as_array().ok_or("upgrade-l2s' reply is no list")?;
    let line: Vec<String> = l2s
        .iter()
        .map(|u| {
            let marks = &u["marks"];
            let kernel = match (marks["last_guest_exit_ns"].as_u64(), marks["first_guest_entry_ns"].as_u64()) {
                (Some(exit), Some(entry)) => format!("{:.1}", entry.saturating_sub(exit) as f64 / 1e6),
                _ => "-".into(),
            };
            format!(
                "{} downtime {:.1} qemu_save {} state {} KiB kernel-marked {kernel}",
                u["l2"]["name"],
                u["downtime_us"].as_f64().unwrap_or(0.0) / 1e3,
                u["qemu_save_ms"],
                u["state_bytes"].as_u64().unwrap_or(0) >> 10
            )
        })
        .collect();
    eprintln!("bench: real L1s {}: local upgrade in the clean L1 (ms): {}", size_name(size), line.join("; "));
    let sample = Sample { peak_extra_mib: peak(&watch), ..sample };
    l2s.iter()
        .map(|u| {
            let downtime = u["downtime_us"].as_f64().ok_or("no downtime_us")? / 1e3;
            Ok(Sample { downtime_ms: Some(downtime), ..sample })
        })
        .collect()
}
