//! A real L1's state window at L0 (`vmbeam::control::state_window`): the
//! small region whose outbox the aged agent writes saved L2 states into,
//! and whose inbox receives them on the clean L1, so that a state moves
//! with the L2's pages instead of crossing two virtio-serial links.
//!
//! At L0 it is QEMU object [`BACKEND_ID`] (a `memory-backend-file` on the
//! region's fd, as a window is), shown to the L1 as `ivshmem-plain` device
//! [`DEVICE_ID`] behind root port [`PORT_ID`] at root-bus slot [`SLOT`].
//! `l1 start` plugs it with every page of its outbox present and every
//! page of its inbox missing; a move keeps it that way (the states leave
//! the outbox with `VMBEAM_GATHER_REPLACE`, and leave the inbox again once
//! the L2s run).

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};
use serde_json::json;
pub use vmbeam::control::state_window::{BACKEND_ID, DEVICE_ID, PORT_ID};
use vmbeam::{
    control::state_window::{lay_out, StateAt, HALF, INBOX, SIZE, SLOT},
    qmp::Qmp,
    Device, Region,
};

const PAGE: u64 = 4096;
/// The root port's chassis number (the windows' ports have 1 ..= 8).
const CHASSIS: u32 = 0x20;

/// An L1's state window, as a fd of its region.
pub struct StateWindow {
    pub region: Region,
}

/// The `-device` argument of its root port, on the L1's QEMU command line.
pub fn root_port() -> String {
    format!("pcie-root-port,id={PORT_ID},bus=pcie.0,chassis={CHASSIS},addr={SLOT:#x},pref64-reserve={SIZE}")
}

/// A new state window for QEMU's VM `vm`: its outbox's pages present, its
/// inbox's missing. The caller plugs it in ([`super::plug_region`]).
pub fn create(dev: &Device, vm: BorrowedFd<'_>) -> Result<Region> {
    let region = dev.create_region(SIZE).context("the state window's region")?;
    // Emptied by moving its pages to a region that is dropped at once.
    drop(dev.gather_runs(region.as_fd(), &[[INBOX, HALF / PAGE]]).context("emptying the state window's inbox")?);
    dev.bind(region.as_fd(), vm)?;
    Ok(region)
}

impl StateWindow {
    /// The state window of the L1 whose QEMU (`pid`) serves `qmp`, if it
    /// has one (an L1 booted by an older vmbeamctl has none).
    pub fn find(qmp: &mut Qmp, pid: u32) -> Result<Option<Self>> {
        let objects = qmp.execute("qom-list", json!({"path": "/objects"}))?;
        if !objects.as_array().into_iter().flatten().any(|o| o["name"] == BACKEND_ID) {
            return Ok(None);
        }
        let (region, size, _) = super::backend_region(qmp, pid, BACKEND_ID).context("the state window")?;
        anyhow::ensure!(size == SIZE, "the state window is {size} bytes, not {SIZE}");
        Ok(Some(Self { region }))
    }

    /// Whether it holds as many pages as its outbox has (so, as between
    /// moves, the outbox whole and the inbox empty).
    pub fn holds_just_its_outbox(&self) -> bool {
        self.region.info().is_ok_and(|i| i.pages_present == HALF / PAGE)
    }

    /// Makes sure every page of the inbox is missing, as a move into this
    /// L1 needs: they are, unless a move's vmbeamctl and its witness both
    /// died before emptying it. Then each page left is taken out, one by
    /// one (the region says how many it holds, not which).
    pub fn ready_inbox(&self, dev: &Device) -> Result<()> {
        let present = self.region.info()?.pages_present;
        if present <= HALF / PAGE {
            return Ok(());
        }
        for page in 0..HALF / PAGE {
            // A missing page is refused (EINVAL) and stays missing.
            if let Ok(left) = dev.gather_runs(self.region.as_fd(), &[[INBOX + page * PAGE, 1]]) {
                drop(left);
            }
        }
        Ok(())
    }

    /// Empties the inbox where `states` arrived, once they are loaded.
    pub fn clear(&self, dev: &Device, states: &[StateAt]) -> Result<()> {
        let runs: Vec<[u64; 2]> = states.iter().map(StateAt::run).collect();
        if !runs.is_empty() {
            drop(dev.gather_runs(self.region.as_fd(), &runs).context("emptying the state window's inbox")?);
        }
        Ok(())
    }
}

/// Moves the states at `states` in `aged`'s outbox into `clean`'s inbox,
/// one after another, in one `VMBEAM_GATHER_INTO` (the aged outbox keeps
/// fresh pages): where each arrived. All or nothing, as every gather.
pub fn send(dev: &Device, aged: &StateWindow, clean: &StateWindow, states: &[StateAt]) -> Result<Vec<StateAt>> {
    let arrived: Vec<StateAt> = lay_out(INBOX, states.iter().map(|s| s.bytes))
        .into_iter()
        .collect::<Option<_>>()
        .context("the states do not fit in the clean L1's inbox")?;
    let runs: Vec<[u64; 2]> = states.iter().map(StateAt::run).collect();
    dev.gather_runs_into_replacing(aged.region.as_fd(), &runs, clean.region.as_fd(), INBOX)
        .context("moving the saved states into the clean L1's state window")?;
    Ok(arrived)
}
