//! `vmbeamctl status`: module version and counters.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;
use vmbeam::control::{Client, L1Status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also show this L1 (its control socket; repeat for several).
    #[arg(long = "l1", value_name = "SOCKET")]
    l1: Vec<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let dev = vmbeam::Device::open()?;
    let version = dev.api_version().context("reading the module version")?;
    let stats = dev.stats().context("reading the module counters")?;
    let mut l1s: Vec<L1Status> = Vec::new();
    for path in &args.l1 {
        l1s.push(Client::connect(path, Duration::from_secs(5))?.call("query-status", ())?);
    }

    if args.json {
        let mut counters = serde_json::to_value(stats)?;
        if let Some(map) = counters.as_object_mut() {
            // Input-only words of the uAPI struct: not counters.
            for key in ["flags", "pad", "reserved"] {
                map.remove(key);
            }
        }
        println!("{}", json!({ "device": vmbeam::DEVICE_PATH, "api_version": version, "stats": counters, "l1s": l1s }));
        return Ok(());
    }

    println!("vmbeam: {} (uAPI version {version})", vmbeam::DEVICE_PATH);
    let rows = [
        ("regions", stats.regions),
        ("pages owned", stats.pages_owned),
        ("transfers", stats.transfers),
        ("pages transferred", stats.pages_transferred),
        ("revocations", stats.revocations),
        ("bytes copied", stats.bytes_copied),
    ];
    for (name, value) in rows {
        println!("  {name:<18} {value}");
    }
    for s in &l1s {
        println!(
            "L1 {} (pid {}): {} L2 VMs, {} running, RAM {} MiB, windows {:#x}..{:#x}",
            s.name,
            s.pid,
            s.l2_vms,
            s.running,
            s.ram_bytes >> 20,
            s.window_base,
            s.window_limit
        );
    }
    Ok(())
}
