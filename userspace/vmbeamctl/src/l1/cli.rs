//! `vmbeamctl l1`: boot a real L1 hypervisor with vmbeam windows, start L2s
//! in it, list them.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use serde_json::json;
use vmbeam::control::agent::{AgentL2, AgentStatus, StartL2};

use super::qemu::{self, LaunchArgs, QemuL1};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Boot an L1 (QEMU at L0, -enable-kvm) whose windows are vmbeam
    /// regions; returns once its agent answers. Prints its QMP socket.
    Start(LaunchArgs),
    /// Start an L2 VM in window N of an L1 (its QEMU runs inside the L1).
    StartL2 {
        /// The L1's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        window: u32,
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
                       "windows": l1.windows.iter().map(|w| json!({"index": w.index, "size": w.size})).collect::<Vec<_>>()})
            );
        }
        Command::StartL2 { qmp, name, window } => {
            let mut l1 = QemuL1::connect(qmp, timeout)?;
            let vm: AgentL2 = l1.agent.call("start-l2", StartL2 { name: name.clone(), window: *window })?;
            println!("{}", serde_json::to_string(&vm)?);
        }
        Command::Status { qmp, json } => {
            let mut l1 = QemuL1::connect(qmp, timeout)?;
            let status: AgentStatus = l1.agent.call("query-status", ())?;
            let vms: Vec<AgentL2> = l1.agent.call("query-vms", ())?;
            if *json {
                println!("{}", json!({"pid": l1.pid, "status": status, "vms": vms}));
            } else {
                println!("{} (QEMU pid {}, kernel {}):", status.name, l1.pid, status.kernel);
                for w in &status.windows {
                    let pages = l1.window(w.index).and_then(|r| r.region.info().ok()).map_or(0, |i| i.pages_present);
                    println!(
                        "  window {} ({}): {} MiB, {pages} pages at L0, {}",
                        w.index,
                        w.pci,
                        w.size >> 20,
                        w.l2.as_deref().unwrap_or("free")
                    );
                }
                for vm in &vms {
                    let w = vm.workload.unwrap_or_default();
                    println!(
                        "  L2 {}: {:?}, window {}, pass {}, checksum {:#x}, errors {}",
                        vm.name, vm.state, vm.window, w.pass, w.checksum, w.errors
                    );
                }
            }
        }
    }
    Ok(())
}
