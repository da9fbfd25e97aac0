//! What the probes saw, gathered into one serializable summary.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    hist::Hist,
    probes::{comm, Error, Kind, Phase, Probes},
};

/// Histograms by kind, then by phase.
pub type Faults = BTreeMap<Kind, BTreeMap<Phase, Hist>>;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// CLOCK_MONOTONIC ns of the first transfer's start and of the end of
    /// the first successful one, while attached.
    pub move_start_ns: Option<u64>,
    pub move_done_ns: Option<u64>,
    pub processes: Vec<ProcessImpact>,
    pub threads: Vec<ThreadImpact>,
    pub regions: Vec<RegionImpact>,
    pub events: Vec<EventRecord>,
    /// Probes that could not attach (what they probe is absent).
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessImpact {
    pub pid: u32,
    pub comm: String,
    pub faults: Faults,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ThreadImpact {
    pub tid: u32,
    pub pid: u32,
    pub comm: String,
    pub guest_entries: u64,
    pub guest_exits: u64,
    /// The vCPU's last guest exit before the first transfer began.
    pub last_exit_before_move_ns: Option<u64>,
    /// Its first guest entry after the first transfer completed.
    pub first_entry_after_move_ns: Option<u64>,
    pub faults: Faults,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionImpact {
    pub inode: u64,
    pub revoked_pages: u64,
    pub faults: u64,
    /// From its first revocation to the first fault that mapped it again.
    pub revoke_to_first_fault_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub ts_ns: u64,
    pub event: &'static str,
    pub tid: u32,
    pub pid: u32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

impl Summary {
    /// Reads everything the probes hold now (events are consumed).
    pub fn gather(p: &Probes) -> Result<Self, Error> {
        let (move_start_ns, move_done_ns) = p.move_times();
        let mut threads: BTreeMap<u32, ThreadImpact> = p
            .threads()
            .into_iter()
            .map(|(tid, t)| {
                let nonzero = |v: u64| (v != 0).then_some(v);
                let row = ThreadImpact {
                    tid,
                    pid: t.tgid,
                    comm: comm(&t),
                    guest_entries: t.entries,
                    guest_exits: t.exits,
                    last_exit_before_move_ns: nonzero(t.last_exit_before_move_ns),
                    first_entry_after_move_ns: nonzero(t.first_entry_after_move_ns),
                    faults: Faults::new(),
                };
                (tid, row)
            })
            .collect();
        let mut processes: BTreeMap<u32, ProcessImpact> = BTreeMap::new();
        for ((tid, pid, kind, phase), raw) in p.hists() {
            // A thread that faulted but never entered a guest has no record.
            let thread = threads.entry(tid).or_insert_with(|| ThreadImpact {
                tid,
                pid,
                comm: comm_of(tid),
                ..Default::default()
            });
            thread.faults.entry(kind).or_default().entry(phase).or_default().add(&raw);
            let pid = thread.pid;
            let process = processes.entry(pid).or_insert_with(|| ProcessImpact {
                pid,
                comm: comm_of(pid),
                faults: Faults::new(),
            });
            process.faults.entry(kind).or_default().entry(phase).or_default().add(&raw);
        }
        let regions = p
            .regions()
            .into_iter()
            .map(|(inode, r)| RegionImpact {
                inode,
                revoked_pages: r.revoked_pages,
                faults: r.faults,
                revoke_to_first_fault_us: (r.revoked_ns != 0 && r.first_fault_after_ns >= r.revoked_ns)
                    .then(|| (r.first_fault_after_ns - r.revoked_ns) as f64 / 1e3),
            })
            .collect();
        let events = p
            .drain_events(std::time::Duration::ZERO)?
            .into_iter()
            .map(|e| EventRecord {
                ts_ns: e.ts_ns,
                event: Probes::event_name(e.kind),
                tid: e.tid,
                pid: e.tgid,
                a: e.a,
                b: e.b,
                c: e.c,
            })
            .collect();
        Ok(Self {
            move_start_ns,
            move_done_ns,
            processes: processes.into_values().collect(),
            threads: threads.into_values().collect(),
            regions,
            events,
            missing: p.missing.clone(),
        })
    }

    pub fn thread(&self, tid: u32) -> Option<&ThreadImpact> {
        self.threads.iter().find(|t| t.tid == tid)
    }

    /// Downtime of a VM whose vCPU ran on thread `old_tid` before the move
    /// and on `new_tid` after it: last guest exit to first guest entry.
    pub fn downtime_ms(&self, old_tid: u32, new_tid: u32) -> Option<f64> {
        let stopped = self.thread(old_tid)?.last_exit_before_move_ns?;
        let started = self.thread(new_tid)?.first_entry_after_move_ns?;
        (started > stopped).then(|| (started - stopped) as f64 / 1e6)
    }

    /// Counts of `kind` for one thread, by phase.
    pub fn thread_counts(&self, tid: u32, kind: Kind) -> BTreeMap<Phase, u64> {
        self.thread(tid)
            .and_then(|t| t.faults.get(&kind))
            .map(|by_phase| by_phase.iter().map(|(p, h)| (*p, h.count)).collect())
            .unwrap_or_default()
    }

    /// The bcc-style text: per process, per kind (and phase, when there
    /// was a migration), count, mean and histogram.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let phased = self.move_start_ns.is_some();
        for p in &self.processes {
            let _ = writeln!(out, "pid {} ({})", p.pid, p.comm);
            write_faults(&mut out, &p.faults, phased, "  ");
        }
        if self.processes.is_empty() {
            out.push_str("no faults seen\n");
        }
        for r in self.regions.iter().filter(|r| r.revoked_pages > 0) {
            let gap = r.revoke_to_first_fault_us.map_or("no fault after it".into(), |us| format!("{us:.0} us"));
            let _ = writeln!(
                out,
                "region inode {}: {} pages revoked, {} faults, revoke to first fault: {gap}",
                r.inode, r.revoked_pages, r.faults
            );
        }
        if !self.missing.is_empty() {
            let _ = writeln!(out, "not traced (absent here): {}", self.missing.join(", "));
        }
        out
    }
}

/// Per kind: one line and histogram per phase (or one for all when
/// `phased` is false).
pub fn write_faults(out: &mut String, faults: &Faults, phased: bool, indent: &str) {
    for (kind, by_phase) in faults {
        if !kind.timed() {
            let counts: Vec<String> = by_phase.iter().map(|(phase, h)| format!("{phase:?} {}", h.count)).collect();
            let all: u64 = by_phase.values().map(|h| h.count).sum();
            let split = if phased { format!(" ({})", counts.join(", ")) } else { String::new() };
            let _ = writeln!(out, "{indent}{}: {all}{split}, counted, not timed", kind.label());
            continue;
        }
        if phased {
            for (phase, h) in by_phase {
                let _ = writeln!(out, "{indent}{} {phase:?}: {} (mean {:.1} us)", kind.label(), h.count, h.mean_us());
                out.push_str(&h.render(indent));
            }
        } else {
            let mut all = Hist::default();
            for h in by_phase.values() {
                all.merge(h);
            }
            let _ = writeln!(out, "{indent}{}: {} (mean {:.1} us)", kind.label(), all.count, all.mean_us());
            out.push_str(&all.render(indent));
        }
    }
}

fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default()
}
