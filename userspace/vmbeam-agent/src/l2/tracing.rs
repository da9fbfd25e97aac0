//! An L2's downtime marks as this L1's kernel sees them ([`crate::marks`]):
//! tracing its vCPU threads' last guest exit before a save and first guest
//! entry after a load, and reading them back for `query-l2-marks`.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::json;
use vmbeam::control::agent::{AgentL2State, L2Marks};

use super::L2;
use crate::marks::{GuestMarks, Mark};

/// The kernel-event marks of one L2 ([`crate::marks`]): what is being
/// traced, and what was read.
#[derive(Default)]
pub(super) struct Marks {
    tracing: Option<GuestMarks>,
    last_guest_exit_ns: Option<u64>,
    first_guest_entry_ns: Option<u64>,
    error: Option<String>,
}

impl L2 {
    /// Starts tracing its last guest exit ahead of a save (`mark-l2s`).
    pub fn mark_before_save(&mut self) -> Result<()> {
        if self.state != AgentL2State::Running {
            bail!("L2 {} is {:?}, not running", self.name, self.state);
        }
        self.trace_marks(Mark::LastExit);
        Ok(())
    }

    pub(super) fn is_marking(&self, mark: Mark) -> bool {
        self.marks.tracing.as_ref().is_some_and(|t| t.mark() == mark)
    }

    /// Starts tracing `mark` of this L2's vCPU threads (forgetting earlier
    /// marks); a failure is kept for `query-l2-marks` to report, never
    /// fails the move. The trace is read by [`Self::marks`], after the
    /// downtime: a stopped vCPU makes no new exit, and a first entry is
    /// never overwritten.
    pub(super) fn trace_marks(&mut self, mark: Mark) {
        self.marks = Marks::default();
        let pid = self.pid();
        let started = self.vcpu_threads().and_then(|tids| GuestMarks::start(&self.name, pid, mark, &tids));
        match started {
            Ok(t) => self.marks.tracing = Some(t),
            Err(e) => self.marks.error = Some(format!("{e:#}")),
        }
    }

    /// Reads the mark being traced (waiting up to `wait` for a first
    /// entry) and stops tracing it.
    fn read_marks(&mut self, wait: Duration) {
        let Some(tracing) = self.marks.tracing.take() else { return };
        let mark = tracing.mark();
        match tracing.read(wait) {
            Ok(Some(ns)) if mark == Mark::LastExit => self.marks.last_guest_exit_ns = Some(ns),
            Ok(Some(ns)) => self.marks.first_guest_entry_ns = Some(ns),
            Ok(None) => {
                let events = match mark {
                    Mark::LastExit => "kvm_exit or kvm_userspace_exit",
                    Mark::FirstEntry => "kvm_entry",
                };
                self.marks.error = Some(format!("no {events} of L2 {}'s vCPU threads traced", self.name));
            }
            Err(e) => self.marks.error = Some(format!("{e:#}")),
        }
    }

    /// The downtime marks (`query-l2-marks`): waits up to `wait` for a
    /// first guest entry still being traced.
    pub fn marks(&mut self, wait: Duration) -> L2Marks {
        self.read_marks(wait);
        L2Marks {
            name: self.name.clone(),
            last_guest_exit_ns: self.marks.last_guest_exit_ns,
            first_guest_entry_ns: self.marks.first_guest_entry_ns,
            error: self.marks.error.clone(),
        }
    }

    /// The threads of its QEMU that run its vCPUs.
    fn vcpu_threads(&mut self) -> Result<Vec<u32>> {
        let cpus = self.qmp.execute("query-cpus-fast", json!({}))?;
        let tids: Vec<u32> = cpus
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["thread-id"].as_u64()).map(|t| t as u32).collect())
            .unwrap_or_default();
        if tids.is_empty() {
            bail!("L2 {}: query-cpus-fast named no vCPU thread", self.name);
        }
        Ok(tids)
    }

    /// This QEMU's downtime marks, for an L2 that `old` ran until it was
    /// saved into this one (`upgrade-l2s`): `old`'s last guest exit, this
    /// one's first entry (waiting up to `wait` for it). Kept, so that
    /// `query-l2-marks` reports both.
    pub fn marks_after(&mut self, old: &mut L2, wait: Duration) -> L2Marks {
        let exit = old.marks(Duration::ZERO);
        self.read_marks(wait);
        self.marks.last_guest_exit_ns = exit.last_guest_exit_ns;
        if let Some(e) = exit.error {
            self.marks.error = Some(self.marks.error.take().map_or(e.clone(), |mine| format!("{mine}; {e}")));
        }
        // Nothing is traced any more: this only reports.
        self.marks(Duration::ZERO)
    }
}
