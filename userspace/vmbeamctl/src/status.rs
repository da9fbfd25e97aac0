//! `vmbeamctl status`: module version and counters.

use anyhow::{Context, Result};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let dev = vmbeam::Device::open()?;
    let version = dev.api_version().context("reading the module version")?;
    let stats = dev.stats().context("reading the module counters")?;

    if args.json {
        let mut counters = serde_json::to_value(stats)?;
        if let Some(map) = counters.as_object_mut() {
            // Input-only words of the uAPI struct: not counters.
            for key in ["flags", "pad", "reserved"] {
                map.remove(key);
            }
        }
        println!("{}", json!({ "device": vmbeam::DEVICE_PATH, "api_version": version, "stats": counters }));
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
    Ok(())
}
