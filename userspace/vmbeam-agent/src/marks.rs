//! When an L2's vCPUs last left and first entered guest mode, as this L1's
//! kernel saw it: the agent's markers of an L2's downtime, taken from
//! kernel events rather than from what QEMU's `stop` and `cont` replies
//! say. L0's eBPF probes cannot see them (at L0, an L2's vCPU is just
//! the L1's vCPU thread), so the L1's own tracefs does it: one trace
//! instance per L2 (`instances/vmbeam-NAME-QEMUPID`) with KVM's events filtered
//! on the L2 QEMU's vCPU threads, on the `mono` clock (CLOCK_MONOTONIC,
//! which L0 relates to its own with `query-clock`).
//!
//! Before a save, the last `kvm_exit` *or* `kvm_userspace_exit`: a vCPU
//! halted in its guest (`hlt`) left guest mode before tracing began, and
//! QEMU's stop only takes it out of `KVM_RUN` (a userspace exit, no guest
//! exit); from then on it could not run even if woken. After a resume,
//! the first `kvm_entry`.
//!
//! A last exit needs the newest events (the ring overwrites the oldest); a
//! first entry needs the oldest (it must not be overwritten: `overwrite`
//! off, and once the first one is in nothing else matters).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const TRACEFS: &str = "/sys/kernel/tracing";

/// Which moment of the vCPUs an instance records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The last `kvm_exit` or `kvm_userspace_exit`: when the L2 last left
    /// `KVM_RUN` (before a save).
    LastExit,
    /// The first `kvm_entry`: when the L2 ran again (after a resume).
    FirstEntry,
}

impl Mark {
    fn events(self) -> &'static [&'static str] {
        match self {
            Mark::LastExit => &["kvm_exit", "kvm_userspace_exit"],
            Mark::FirstEntry => &["kvm_entry"],
        }
    }
}

/// A trace instance recording one [`Mark`] of one L2's vCPU threads.
///
/// # Invariants
///
/// `dir` is an instance this agent made, removed when this is dropped.
pub struct GuestMarks {
    dir: PathBuf,
    mark: Mark,
}

impl GuestMarks {
    /// Starts recording `mark` for the threads `tids` (the vCPU threads of
    /// L2 `l2`'s QEMU `qemu_pid`, from `query-cpus-fast`). The instance is
    /// named after both: a new QEMU of the same name (an L2 that comes back
    /// after a move) never shares it with one still held by its old one.
    pub fn start(l2: &str, qemu_pid: u32, mark: Mark, tids: &[u32]) -> Result<Self> {
        if tids.is_empty() {
            bail!("L2 {l2}: no vCPU threads to trace");
        }
        let root = Path::new(TRACEFS);
        if !root.join("instances").is_dir() {
            bail!("{TRACEFS} is not mounted (tracefs), or this kernel has no tracing");
        }
        let dir = root.join("instances").join(format!("vmbeam-{l2}-{qemu_pid}"));
        std::fs::create_dir(&dir).with_context(|| format!("making trace instance {}", dir.display()))?;
        let marks = Self { dir, mark };
        let filter = tids.iter().map(|t| format!("common_pid == {t}")).collect::<Vec<_>>().join(" || ");
        // Small: each L1 has little RAM, and a mark needs few events.
        marks.write("buffer_size_kb", "64")?;
        marks.write("trace_clock", "mono")?;
        marks.write("options/overwrite", if mark == Mark::LastExit { "1" } else { "0" })?;
        for event in mark.events() {
            let event = marks.dir.join("events/kvm").join(event);
            std::fs::write(event.join("filter"), &filter).with_context(|| format!("filter {filter}"))?;
            std::fs::write(event.join("enable"), "1")
                .with_context(|| format!("enabling {} (kvm loaded?)", event.display()))?;
        }
        Ok(marks)
    }

    pub fn mark(&self) -> Mark {
        self.mark
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.dir.join(file), value).with_context(|| format!("{}/{file} = {value}", self.dir.display()))
    }

    /// The mark (CLOCK_MONOTONIC ns of this L1), if an event came. For a
    /// first entry, waits up to `wait` for it.
    pub fn read(&self, wait: Duration) -> Result<Option<u64>> {
        let deadline = Instant::now() + wait;
        loop {
            let trace = std::fs::read_to_string(self.dir.join("trace")).context("reading the trace instance")?;
            let stamps = self.mark.events().iter().flat_map(|e| timestamps(&trace, e));
            let found = match self.mark {
                Mark::LastExit => stamps.max(),
                Mark::FirstEntry => stamps.min(),
            };
            if found.is_some() || Instant::now() >= deadline {
                return Ok(found);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for GuestMarks {
    fn drop(&mut self) {
        for event in self.mark.events() {
            let _ = std::fs::write(self.dir.join("events/kvm").join(event).join("enable"), "0");
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The timestamps (ns) of `event` in a tracefs `trace` file: lines like
/// `  CPU 0/KVM-211  [001] d..2.  1234.567890: kvm_exit: ...` (the task's
/// name may hold spaces; the stamp is the word before `: EVENT:`).
fn timestamps<'a>(trace: &'a str, event: &'a str) -> impl Iterator<Item = u64> + 'a {
    let tag = format!(": {event}:");
    trace.lines().filter(|l| !l.starts_with('#')).filter_map(move |line| {
        let before = &line[..line.find(&tag)?];
        let stamp = before.split_whitespace().last()?;
        let (secs, frac) = stamp.split_once('.')?;
        // `mono` prints microseconds; be exact about any width.
        let frac_ns: u64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
        Some(secs.parse::<u64>().ok()? * 1_000_000_000 + frac_ns)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_from_trace_lines() {
        let trace = "# tracer: nop\n#\n\
            \x20 CPU 0/KVM-211     [001] d..2.   12.000100: kvm_exit: vcpu 0 reason npf\n\
            \x20 CPU 0/KVM-211     [000] d..2.   12.500000: kvm_entry: vcpu 0, rip 0x1000\n\
            \x20 CPU 0/KVM-211     [001] d..2.   13.250001: kvm_exit: vcpu 0 reason hlt\n\
            \x20 CPU 0/KVM-211     [001] .....   14.000002: kvm_userspace_exit: reason KVM_EXIT_INTR (10)\n";
        let exits: Vec<u64> = timestamps(trace, "kvm_exit").collect();
        assert_eq!(exits, [12_000_100_000, 13_250_001_000]);
        assert_eq!(timestamps(trace, "kvm_entry").collect::<Vec<_>>(), [12_500_000_000]);
        // `: kvm_exit:` is not a prefix match of `: kvm_userspace_exit:`.
        assert_eq!(timestamps(trace, "kvm_userspace_exit").collect::<Vec<_>>(), [14_000_002_000]);
        assert_eq!(timestamps("# only a header\n", "kvm_exit").count(), 0);
    }
}
