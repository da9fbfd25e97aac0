//! `vmbeamctl rejuvenate`: the whole cycle an operator runs on an aged
//! real L1: boot a clean L1 shaped like it (the same windows, empty; a
//! newer kernel or image if given), move every L2 with the migrate-all
//! flow, then shut the aged L1 down.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use vmbeam::control::agent::{AgentL2, AgentL2State};

use crate::{
    l1::qemu::{self, LaunchArgs, QemuL1, QemuPair},
    migrate::{self, Migration},
};

#[derive(Debug, clap::Args)]
pub struct RejuvenateArgs {
    /// The aged L1's QMP socket.
    #[arg(long, value_name = "QMP_SOCKET")]
    pub aged: PathBuf,
    /// Name of the clean L1 (default: the aged one's with `-clean`).
    #[arg(long)]
    pub clean_name: Option<String>,
    /// Directory for the clean L1's sockets and logs.
    #[arg(long, default_value = "/run/vmbeam")]
    pub dir: PathBuf,
    /// Kernel and initramfs of the clean L1 (a newer one, or the same).
    #[arg(long, env = "VMBEAM_L1_KERNEL")]
    pub kernel: PathBuf,
    #[arg(long, env = "VMBEAM_L1_INITRD")]
    pub initrd: PathBuf,
    /// The clean L1's RAM (default: the aged L1's).
    #[arg(long, value_parser = qemu::parse_bytes)]
    pub memory: Option<u64>,
    /// Leave the moved L2s' frames empty in the aged L1 (see `migrate-all
    /// --gather-holes`): it is destroyed right after, so it never runs on.
    #[arg(long)]
    pub gather_holes: bool,
    #[arg(long)]
    pub json: bool,
    /// Attach the eBPF probes for the migration (see `migrate-all --trace`).
    #[arg(long)]
    pub trace: bool,
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_s: u64,
    /// Move the L2s one at a time (see `migrate-all --one-at-a-time`).
    #[arg(long, conflicts_with = "trace")]
    pub one_at_a_time: bool,
}

/// The whole cycle: boot a clean L1 shaped like the aged one, move every
/// L2, shut the aged L1 down.
pub fn rejuvenate(a: &RejuvenateArgs) -> ExitCode {
    let timeout = Duration::from_secs(a.timeout_s);
    let started = Instant::now();
    let aged = QemuL1::connect(&a.aged, timeout).context("the aged L1");
    let clean_name = aged.as_ref().map_or_else(
        |_| "clean".to_string(),
        |l1| a.clean_name.clone().unwrap_or_else(|| format!("{}-clean", l1.name)),
    );
    let args = migrate::Args {
        from: a.aged.clone(),
        to: a.dir.join(format!("{clean_name}.qmp")),
        dry_run: false,
        json: a.json,
        timeout_s: a.timeout_s,
        downtime_ms: None,
        no_verify: false,
        stop_at: None,
        inject_failure: None,
        trace: a.trace,
        gather_holes: a.gather_holes,
        states_over_link: false,
        corrupt_frames: None,
        one_at_a_time: a.one_at_a_time,
    };
    // The clean L1 boots first: its boot is not a step of the migration.
    let booted = aged.and_then(|mut aged| {
        // The same windows, and one more for each L2 on ordinary memory.
        let vms: Vec<AgentL2> = aged.agent.call("query-vms", ())?;
        let mut windows: Vec<u64> = aged.windows.iter().map(|w| w.size).collect();
        windows.extend(vms.iter().filter(|v| v.window.is_none() && v.state == AgentL2State::Running).map(|v| v.size));
        eprintln!("rejuvenate: booting clean L1 `{clean_name}` with {} empty windows", windows.len());
        let boot = Instant::now();
        let launch = LaunchArgs {
            name: clean_name.clone(),
            dir: a.dir.clone(),
            windows,
            empty: true,
            huge_windows: aged.windows.iter().any(|w| w.huge),
            memory: a.memory.or(aged.ram.as_ref().map(|r| r.size)).unwrap_or(384 << 20),
            anonymous_ram: aged.ram.is_none(),
            huge_ram: aged.ram.as_ref().is_some_and(|r| r.region.info().is_ok_and(|i| i.huge)),
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            boot_timeout_s: a.timeout_s,
        };
        // Nothing has moved yet: a clean L1 that does not come up is booted
        // once more before the rejuvenation gives up.
        let clean = qemu::launch(&launch).or_else(|e| {
            eprintln!("rejuvenate: the clean L1 did not come up ({e:#}); booting it once more");
            qemu::launch(&launch).context("the clean L1 did not come up twice")
        })?;
        anyhow::Ok((aged, clean, boot.elapsed()))
    });
    let mut m = Migration::new(&args);
    let result = booted.and_then(|(aged, clean, boot)| {
        m.report.warnings.push(format!("clean L1 {clean_name} booted in {:.1} s", boot.as_secs_f64()));
        eprintln!("rejuvenate: moving every L2 from {} to {clean_name}", aged.name);
        let mut pair = QemuPair::new(vmbeam::Device::open()?, aged, clean, args.gather_options());
        m.run(&mut pair)?;
        let holes = pair.left_holes();
        let aged = pair.into_aged();
        let name = aged.name.clone();
        if holes {
            // Frames of its RAM are empty: it must not run its shutdown.
            aged.destroy(Duration::from_secs(30))?;
        } else {
            aged.shut_down(Duration::from_secs(30))?;
        }
        m.report.warnings.push(format!(
            "aged L1 {name} shut down; the whole rejuvenation took {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        anyhow::Ok(())
    });
    migrate::finish(m, result, a.json)
}
