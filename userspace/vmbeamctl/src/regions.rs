//! `vmbeamctl regions`: the regions behind each L2 VM of the L1s named.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use serde_json::json;
use vmbeam::control::{Client, L2Info};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// An L1's control socket (repeat for several).
    #[arg(long = "l1", value_name = "SOCKET", required = true)]
    pub l1: Vec<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let mut all = Vec::new();
    for path in &args.l1 {
        let mut c = Client::connect(path, Duration::from_secs(5))?;
        let vms: Vec<L2Info> = c.call("query-vms", ())?;
        all.push((c.server().name.clone(), vms));
    }
    if args.json {
        let l1s: Vec<_> = all.iter().map(|(name, vms)| json!({"l1": name, "vms": vms})).collect();
        println!("{}", json!({ "l1s": l1s }));
        return Ok(());
    }
    println!("{:<10} {:<14} {:<10} {:>12} {:>9} {:>8}  owner", "L1", "L2", "state", "window", "size", "pages");
    for (l1, vms) in &all {
        for vm in vms {
            let owner = match vm.region {
                Some(r) if r.moving => "moving",
                Some(r) if r.mine => "this L1",
                Some(r) if r.owned => "another VM",
                Some(_) => "none",
                None => "?",
            };
            println!(
                "{:<10} {:<14} {:<10} {:>#12x} {:>6} MiB {:>8}  {owner}",
                l1,
                vm.name,
                format!("{:?}", vm.state).to_lowercase(),
                vm.window.gpa,
                vm.window.size >> 20,
                vm.region.map_or(0, |r| r.pages_present),
            );
        }
    }
    Ok(())
}
