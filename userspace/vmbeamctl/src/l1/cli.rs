//! `vmbeamctl l1`: boot a real L1 hypervisor with vmbeam windows, start L2s
//! in it, list them.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use anyhow::Result;
use serde_json::json;
use vmbeam::control::agent::{start_timeout, AgentL2, AgentL2State, AgentStatus, Names, StartL2, Upgraded};

use super::qemu::{self, LaunchArgs, QemuL1};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot an L1 (QEMU at L0, -enable-kvm) whose windows are vmbeam
    /// regions; returns once its agent answers. Prints its QMP socket.
    Start(LaunchArgs),
    /// Start an L2 VM in an L1 (its QEMU runs inside the L1): on window N,
    /// or (without --window) on ordinary L1 memory, as any QEMU would.
    StartL2 {
        /// The L1's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        #[arg(long)]
        name: String,
        /// Its RAM is this window.
        #[arg(long, conflicts_with_all = ["memory", "thp"])]
        window: Option<u32>,
        /// RAM on ordinary L1 memory (shared, locked), e.g. 16M.
        #[arg(long, value_parser = qemu::parse_bytes)]
        memory: Option<u64>,
        /// Back its ordinary memory with transparent huge pages in the L1.
        #[arg(long)]
        thp: bool,
    },
    /// Internal (`l1 start`): bind region fd N to this process, then exec
    /// the command in it, the fd kept open.
    #[command(hide = true)]
    ExecOwning {
        #[arg(long)]
        region_fd: i32,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Settle a migration between real L1s whose vmbeamctl died: each L2
    /// runs on the clean L1 if its pages got there (restored there if need
    /// be, its aged copy retired), else on the aged L1. `migrate-all` starts
    /// this itself as a witness; run it by hand only for a journal a witness
    /// left (it prints why).
    Recover {
        /// The journal, `NAME.migration.json` beside the clean L1's QMP socket.
        #[arg(long)]
        journal: PathBuf,
        /// Wait for this process (the vmbeamctl that runs the migration) to
        /// end first; do nothing if it removed the journal.
        #[arg(long, hide = true)]
        after_pid: Option<u32>,
    },
    /// Replace the QEMU of L2s on windows with a new QEMU in the same L1:
    /// QEMU's own local upgrade (x-ignore-shared; the RAM stays in its
    /// window, only CPU and device state is copied), nothing moved at L0.
    /// What rejuvenating just the L2s' QEMU costs: the peer of migrate-all
    /// at the same level. Prints each L2's downtime.
    UpgradeL2s {
        /// The L1's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// An L2 to upgrade (again for more); default: every running L2 on
        /// a window.
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show an L1's windows and L2 VMs (as its agent sees them).
    Status {
        #[arg(long)]
        qmp: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: &Command) -> Result<()> {
    let timeout = Duration::from_secs(60);
    match cmd {
        Command::Start(a) => {
            let l1 = qemu::launch(a)?;
            println!(
                "{}",
                json!({"name": l1.name, "pid": l1.pid, "qmp": l1.qmp_path,
                       "ram_region": l1.ram.as_ref().map(|r| r.size),
                       "windows": l1.windows.iter().map(|w| json!({"index": w.index, "size": w.size})).collect::<Vec<_>>()})
            );
        }
        Command::StartL2 { qmp, name, window, memory, thp } => {
            // The agent's own bound on the start, and the reply's trip.
            let timeout = start_timeout(timeout, memory.unwrap_or(0)) + Duration::from_secs(10);
            let mut l1 = QemuL1::connect(qmp, timeout)?;
            let args = StartL2 { name: name.clone(), window: *window, size: *memory, thp: *thp };
            let vm: AgentL2 = l1.agent.call("start-l2", args)?;
            println!("{}", serde_json::to_string(&vm)?);
        }
        Command::ExecOwning { region_fd, command } => qemu::ram::exec_owning(*region_fd, command)?,
        Command::Recover { journal, after_pid } => {
            if let Some(pid) = after_pid {
                // ESRCH: it is gone already.
                if let Ok(pidfd) = vmbeam::procfs::pidfd(*pid) {
                    vmbeam::procfs::wait_exit(&pidfd)?;
                }
                if !journal.exists() {
                    return Ok(()); // it ended in order
                }
                eprintln!("recover: vmbeamctl (pid {pid}) died mid-migration; settling {}", journal.display());
            }
            for line in qemu::recover(journal, timeout)? {
                println!("recover: {line}");
            }
        }
        Command::UpgradeL2s { qmp, names, json } => upgrade_l2s(qmp, names, *json, timeout)?,
        Command::Status { qmp, json } => {
            let mut l1 = QemuL1::connect(qmp, timeout)?;
            let status: AgentStatus = l1.agent.call("query-status", ())?;
            let vms: Vec<AgentL2> = l1.agent.call("query-vms", ())?;
            if *json {
                let ram = l1.ram.as_ref().map(|r| {
                    json!({"size": r.size, "pages_present": r.region.info().map_or(0, |i| i.pages_present),
                                    "pages_by_pmd": r.region.pages_by_pmd().ok().flatten()})
                });
                // The windows as L0 sees them: the region's pages, and for
                // a huge window how many the L1's QEMU maps by PMD.
                let l0_windows: Vec<_> = l1
                    .windows
                    .iter()
                    .map(|w| {
                        json!({"index": w.index, "size": w.size, "huge": w.huge,
                               "pages_present": w.region.info().map_or(0, |i| i.pages_present),
                               "pages_by_pmd": w.region.pages_by_pmd().ok().flatten()})
                    })
                    .collect();
                // Outbox present, inbox empty between moves.
                let state_window = l1.state_window.as_ref().map(|w| {
                    json!({"size": vmbeam::control::state_window::SIZE,
                           "pages_present": w.region.info().map_or(0, |i| i.pages_present)})
                });
                println!(
                    "{}",
                    json!({"pid": l1.pid, "status": status, "vms": vms, "ram": ram, "l0_windows": l0_windows,
                           "state_window": state_window})
                );
            } else {
                println!("{} (QEMU pid {}, kernel {}):", status.name, l1.pid, status.kernel);
                match &l1.ram {
                    Some(r) => println!(
                        "  RAM: {} MiB, a vmbeam region ({} pages at L0{})",
                        r.size >> 20,
                        r.region.info().map_or(0, |i| i.pages_present),
                        match r.region.pages_by_pmd() {
                            Ok(Some(n)) => format!(", 2 MiB blocks: {n} pages mapped by PMD"),
                            _ => String::new(),
                        }
                    ),
                    None => println!("  RAM: QEMU's own (anonymous): L2s on ordinary memory cannot be gathered"),
                }
                match &l1.state_window {
                    Some(w) => println!(
                        "  state window: {} MiB, {} pages at L0 (its outbox: {})",
                        vmbeam::control::state_window::SIZE >> 20,
                        w.region.info().map_or(0, |i| i.pages_present),
                        vmbeam::control::state_window::HALF / 4096
                    ),
                    None => println!("  no state window: saved L2 states go over the agent's link"),
                }
                for w in &status.windows {
                    let l0 = l1.window(w.index);
                    let pages = l0.and_then(|r| r.region.info().ok()).map_or(0, |i| i.pages_present);
                    let kind = match l0.map(|r| r.region.pages_by_pmd()) {
                        Some(Ok(Some(by_pmd))) => format!("2 MiB blocks ({by_pmd} pages mapped by PMD)"),
                        Some(Err(e)) => format!("2 MiB blocks (mapping unknown: {e:#})"),
                        _ => "4 KiB pages".into(),
                    };
                    println!(
                        "  window {} ({}): {} MiB, {pages} pages at L0, {kind}, {}",
                        w.index,
                        w.pci,
                        w.size >> 20,
                        w.l2.as_deref().unwrap_or("free")
                    );
                }
                for vm in &vms {
                    let w = vm.workload.unwrap_or_default();
                    let ram = vm
                        .window
                        .map_or_else(|| format!("{} MiB of ordinary memory", vm.size >> 20), |k| format!("window {k}"));
                    println!(
                        "  L2 {}: {:?}, {ram}, pass {}, checksum {:#x}, errors {}{}",
                        vm.name,
                        vm.state,
                        w.pass,
                        w.checksum,
                        w.errors,
                        w.error_cause()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `l1 upgrade-l2s`: the agent starts every new QEMU, then stops, saves,
/// loads and resumes the L2s side by side.
fn upgrade_l2s(qmp: &std::path::Path, names: &[String], json: bool, timeout: Duration) -> Result<()> {
    // The new QEMUs' start, the saves and the loads, and the reply's trip.
    let mut l1 = QemuL1::connect(qmp, 3 * timeout + Duration::from_secs(10))?;
    let names = if names.is_empty() {
        let vms: Vec<AgentL2> = l1.agent.call("query-vms", ())?;
        let on_windows: Vec<String> = vms
            .into_iter()
            .filter(|v| v.window.is_some() && v.state == AgentL2State::Running)
            .map(|v| v.name)
            .collect();
        anyhow::ensure!(!on_windows.is_empty(), "no running L2 on a window in this L1: nothing to upgrade");
        on_windows
    } else {
        names.to_vec()
    };
    let upgraded: Vec<Upgraded> = l1.agent.call("upgrade-l2s", Names { names })?;
    if json {
        println!("{}", serde_json::to_string(&upgraded)?);
        return Ok(());
    }
    for u in &upgraded {
        let kernel = match (u.marks.last_guest_exit_ns, u.marks.first_guest_entry_ns) {
            (Some(exit), Some(entry)) => format!("{:.1} ms", entry.saturating_sub(exit) as f64 / 1e6),
            _ => format!("not marked ({})", u.marks.error.as_deref().unwrap_or("no trace")),
        };
        println!(
            "{}: QEMU {} -> {}, downtime {:.1} ms (QEMU's save {} ms, state {} KiB; by the L1 kernel {kernel})",
            u.l2.name,
            u.old_pid,
            u.l2.pid,
            u.downtime_us as f64 / 1e3,
            u.qemu_save_ms.map_or("?".into(), |m| m.to_string()),
            u.state_bytes.div_ceil(1024),
        );
    }
    Ok(())
}
