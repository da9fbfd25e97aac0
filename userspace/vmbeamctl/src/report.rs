//! The migration report: one JSON object (`--json`) or a short table.

use serde::Serialize;
use vmbeam::control::{Client, L2Info, Probe, Window};

use crate::migrate::Step;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub dry_run: bool,
    /// The regions reached the clean L1 (past the point of rollback);
    /// `--one-at-a-time`: those of at least one L2.
    pub committed: bool,
    pub from: Option<Endpoint>,
    pub to: Option<Endpoint>,
    pub l2: Vec<L2Report>,
    /// L2s not moved, with their state.
    pub skipped: Vec<String>,
    pub totals: Totals,
    /// Wall time of each step, in the order they ran.
    #[serde(serialize_with = "phases_as_object")]
    pub phases_ms: Vec<(Step, f64)>,
    pub module: Option<ModuleDelta>,
    pub failed_step: Option<Step>,
    pub error: Option<String>,
    pub rolled_back: Option<String>,
    pub warnings: Vec<String>,
    /// What the eBPF probes saw (`--trace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<vmbeam_probes::Summary>,
}

impl Report {
    /// Adds `took` ms to `step`'s time (a step that runs again adds up).
    pub fn add_phase(&mut self, step: Step, took: f64) {
        match self.phases_ms.iter_mut().find(|(s, _)| *s == step) {
            Some((_, t)) => *t += took,
            None => self.phases_ms.push((step, took)),
        }
    }

    /// Adds one migration of a `--one-at-a-time` move (its L2's row, its
    /// steps' times, what it warned of; where it failed and what rolled
    /// back) to the report of the whole. The whole keeps the first plan's
    /// endpoints and skipped list; its totals are counted over all.
    pub fn absorb(&mut self, one: Report) {
        self.l2.extend(one.l2);
        self.committed |= one.committed;
        for (step, took) in one.phases_ms {
            self.add_phase(step, took);
        }
        if let Some(t) = one.totals.transfer_ms {
            *self.totals.transfer_ms.get_or_insert(0.0) += t;
        }
        self.warnings.extend(one.warnings);
        if !one.ok {
            self.failed_step = one.failed_step;
            self.rolled_back = one.rolled_back;
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub socket: String,
    pub name: String,
    pub pid: u32,
}

impl Endpoint {
    pub fn of(c: &Client) -> Self {
        Self { socket: c.path().display().to_string(), name: c.server().name.clone(), pid: c.server().pid }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct L2Report {
    pub name: String,
    /// How its memory moved (real L1s): `window` (its window's region went
    /// whole) or `gather` (its pages were gathered out of the aged L1's RAM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Gather path: bytes of its RAM the aged L1 backed with transparent
    /// huge pages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thp_bytes: Option<u64>,
    /// Gather path: the aged L1's guest-physical addresses that held three
    /// of its pages (its first, the one at 2 MiB: the workload's header,
    /// and its last), for a look from L0 at what the aged L1 sees there now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aged_l1_gpas: Option<Vec<u64>>,
    pub pages: u64,
    pub bytes: u64,
    pub from_window: Option<Window>,
    pub to_window: Option<Window>,
    /// Pages whose frame was compared (present on both sides) and how
    /// many were the same frame: zero copy means all.
    pub frames_compared: u64,
    pub frames_same: u64,
    /// Bytes whose page frame changed: (compared - same) pages; None when
    /// frames could not be read (not root).
    pub bytes_copied: Option<u64>,
    pub paused_at_ns: u64,
    pub resumed_at_ns: Option<u64>,
    pub downtime_ms: Option<f64>,
    /// Real L1s: of the downtime, the aged agent's save (from the L2's
    /// stop to its state's reply leaving the agent, the saves of all L2s
    /// side by side)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_ms: Option<f64>,
    /// Of the save, QEMU's own migration of the L2's CPU and devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_save_ms: Option<u64>,
    /// The size of that state (QEMU's stream; its RAM stays in place).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// How the state went: "state window" (moved with the pages at L0) or
    /// "link" (over the agents' virtio-serial links).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_via: Option<String>,
    /// ... and the clean agent's restore (from its `restore-l2s` request
    /// to this L2's `cont`; the states were sent before, with `load-l2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<f64>,
    pub passes_at_pause: u64,
    pub passes_after: Option<u64>,
    pub errors: Option<u64>,
    pub checksum: Option<u32>,
    pub checksum_ok: Option<bool>,
    /// What the aged L1 could still read after the move (nothing).
    pub old_owner: Option<Probe>,
    /// The threads that ran its vCPU on each side (lab L1s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_vcpu_tid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_vcpu_tid: Option<u32>,
    /// What the eBPF probes saw of it (`--trace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<crate::trace::L2Trace>,
    /// Real L1s: its downtime from the L1 kernels' kvm events (the agents'
    /// marks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_marks: Option<GuestMarks>,
}

/// An L2's downtime as its L1s' kernels saw it: the last `kvm_exit` or
/// `kvm_userspace_exit` of its vCPU threads in the aged L1 (a halted vCPU
/// leaves `KVM_RUN` at the stop without a guest exit) to their first
/// `kvm_entry` in the clean L1,
/// both placed on L0's CLOCK_MONOTONIC (the clock of `paused_at_ns`).
#[derive(Debug, Default, Serialize)]
pub struct GuestMarks {
    pub downtime_ms: Option<f64>,
    pub last_guest_exit_ns: Option<u64>,
    pub first_guest_entry_ns: Option<u64>,
    /// How far off the two L1 clocks may be placed, together (half the
    /// shortest `query-clock` round trip to each agent, summed).
    pub clock_error_ms: f64,
    /// Why a mark is missing.
    pub error: Option<String>,
}

impl L2Report {
    /// Compares the page frames that backed the L2 on the aged side with
    /// the clean side's (0: not present): zero copy means all the same.
    pub fn compare_frames(&mut self, aged: &[u64], clean: &[u64]) {
        let both: Vec<_> = aged.iter().zip(clean).filter(|(a, c)| **a != 0 && **c != 0).collect();
        self.frames_compared = both.len() as u64;
        self.frames_same = both.iter().filter(|(a, c)| a == c).count() as u64;
        self.bytes_copied = (self.frames_compared > 0).then(|| (self.frames_compared - self.frames_same) * 4096);
    }

    pub fn planned(vm: &L2Info, target: Window) -> Self {
        let pages = vm.region.map_or(vm.window.size / 4096, |r| r.pages_present);
        Self {
            name: vm.name.clone(),
            pages,
            bytes: vm.window.size,
            from_window: Some(vm.window),
            to_window: Some(target),
            // Overwritten by the count at the pause.
            passes_at_pause: vm.passes,
            from_vcpu_tid: vm.vcpu_tid,
            ..Default::default()
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub l2: usize,
    pub pages: u64,
    pub bytes: u64,
    /// The module's own count (VMBEAM_GET_STATS) over the migration.
    pub bytes_copied: Option<u64>,
    pub downtime_ms_max: Option<f64>,
    pub downtime_ms_mean: Option<f64>,
    /// The VMBEAM_TRANSFER_BATCH ioctl alone.
    pub transfer_ms: Option<f64>,
    pub wall_ms: Option<f64>,
}

/// Module counters over the migration.
#[derive(Debug, Serialize)]
pub struct ModuleDelta {
    pub transfers: u64,
    pub pages_transferred: u64,
    pub revocations: u64,
    pub bytes_copied: u64,
    /// Pages the module holds after less before: the memory the move
    /// added at L0 (the fresh pages filling gathered frames; 0 otherwise).
    pub pages_owned_change: i64,
}

impl ModuleDelta {
    pub fn between(a: &vmbeam::Stats, b: &vmbeam::Stats) -> Self {
        Self {
            transfers: b.transfers.saturating_sub(a.transfers),
            pages_transferred: b.pages_transferred.saturating_sub(a.pages_transferred),
            revocations: b.revocations.saturating_sub(a.revocations),
            bytes_copied: b.bytes_copied.saturating_sub(a.bytes_copied),
            pages_owned_change: b.pages_owned as i64 - a.pages_owned as i64,
        }
    }
}

fn phases_as_object<S: serde::Serializer>(phases: &[(Step, f64)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(phases.len()))?;
    for (step, took) in phases {
        map.serialize_entry(step, took)?;
    }
    map.end()
}

pub fn print(report: &mut Report, json: bool) {
    report.totals.l2 = report.l2.len();
    report.totals.pages = report.l2.iter().map(|l| l.pages).sum();
    report.totals.bytes = report.l2.iter().map(|l| l.bytes).sum();
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmbeamctl: report: {e}"),
        }
    } else {
        print_text(report);
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1 << 30))
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn print_text(r: &Report) {
    let name = |e: &Option<Endpoint>| e.as_ref().map_or("?".to_string(), |e| format!("{} (pid {})", e.name, e.pid));
    let what = if r.dry_run { "migrate-all --dry-run" } else { "migrate-all" };
    println!("{what}: {} -> {}: {} L2 VMs, {}", name(&r.from), name(&r.to), r.totals.l2, mib(r.totals.bytes));
    if !r.l2.is_empty() {
        println!(
            "  {:<14} {:>6} {:>7} {:>23} {:>11} {:>6} {:>10} {:>8}  workload check",
            "L2", "pages", "size", "window aged -> clean", "same frame", "copied", "downtime", "passes"
        );
    }
    for l in &r.l2 {
        let windows = match (l.from_window, l.to_window) {
            (Some(a), Some(b)) => format!("{:#x} -> {:#x}", a.gpa, b.gpa),
            // Gathered out of the aged L1's RAM (real L1s).
            (None, Some(b)) if l.path.as_deref() == Some("gather") => format!("RAM -> {:#x}", b.gpa),
            _ => "-".into(),
        };
        let frames =
            if l.frames_compared > 0 { format!("{}/{}", l.frames_same, l.frames_compared) } else { "-".into() };
        let down = l.downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms"));
        let passes = l.passes_after.map_or(format!("{}", l.passes_at_pause), |a| format!("{}->{a}", l.passes_at_pause));
        let check = match (l.errors, l.checksum_ok) {
            (Some(0), Some(true)) => format!("ok, checksum {:#010x}", l.checksum.unwrap_or(0)),
            (Some(e), ok) => format!("{e} errors, checksum ok: {}", opt(ok)),
            (None, _) => "-".into(),
        };
        let copied = l.bytes_copied.map_or("-".into(), |b| format!("{b} B"));
        println!(
            "  {:<14} {:>6} {:>7} {:>23} {:>11} {:>6} {:>10} {:>8}  {check}",
            l.name,
            l.pages,
            mib(l.bytes),
            windows,
            frames,
            copied,
            down,
            passes
        );
    }
    let t = &r.totals;
    if !r.dry_run && r.committed {
        println!(
            "  total: {} pages moved, bytes copied {}, downtime max {} / mean {}, transfer ioctl {}, wall {}",
            t.pages,
            opt(t.bytes_copied),
            t.downtime_ms_max.map_or("-".into(), |d| format!("{d:.2} ms")),
            t.downtime_ms_mean.map_or("-".into(), |d| format!("{d:.2} ms")),
            t.transfer_ms.map_or("-".into(), |d| format!("{d:.2} ms")),
            t.wall_ms.map_or("-".into(), |d| format!("{d:.0} ms")),
        );
    }
    if !r.phases_ms.is_empty() && !r.dry_run {
        let phases: Vec<String> =
            r.phases_ms.iter().map(|(s, t)| format!("{} {t:.1}", format!("{s:?}").to_lowercase())).collect();
        println!("  steps (ms): {}", phases.join(", "));
    }
    // Real L1s: where each L2's downtime went, as its agents timed it.
    let split: Vec<String> =
        r.l2.iter()
            .filter_map(|l| {
                let qemu = match (l.qemu_save_ms, l.state_bytes) {
                    (Some(ms), Some(b)) => format!(
                        " (QEMU's {ms}, {} KiB state by {})",
                        b.div_ceil(1024),
                        l.state_via.as_deref().unwrap_or("?")
                    ),
                    _ => String::new(),
                };
                Some(format!("{} save {:.0}{qemu} + restore {:.0}", l.name, l.save_ms?, l.restore_ms?))
            })
            .collect();
    if !split.is_empty() {
        println!("  downtime (ms, the agents' clocks): {}", split.join("; "));
    }
    let marked: Vec<String> =
        r.l2.iter()
            .filter_map(|l| {
                let m = l.guest_marks.as_ref()?;
                Some(match (m.downtime_ms, &m.error) {
                    (Some(d), _) => format!("{} {d:.0} ± {:.1}", l.name, m.clock_error_ms),
                    (None, e) => format!("{} – ({})", l.name, e.as_deref().unwrap_or("no mark")),
                })
            })
            .collect();
    if !marked.is_empty() {
        println!("  downtime (ms, the L1 kernels' last exit → first kvm_entry of its vCPUs): {}", marked.join("; "));
    }
    let probed: Vec<&Probe> = r.l2.iter().filter_map(|l| l.old_owner.as_ref()).collect();
    if !probed.is_empty() {
        let pages: u64 = probed.iter().map(|p| p.pages).sum();
        let vmm: u64 = probed.iter().map(|p| p.vmm_denied).sum();
        let guest: u64 = probed.iter().map(|p| p.guest_denied).sum();
        println!("  aged L1 after the move: its VMM denied {vmm}/{pages} pages (SIGBUS), its guest {guest}/{pages} (KVM_RUN EFAULT)");
    }
    if let Some(m) = &r.module {
        println!(
            "  vmbeam.ko: +{} transfers, +{} pages transferred, +{} revocations, +{} bytes copied, {:+} pages owned",
            m.transfers, m.pages_transferred, m.revocations, m.bytes_copied, m.pages_owned_change
        );
    }
    if let Some(summary) = &r.trace {
        print_trace(r, summary);
    }
    for s in &r.skipped {
        println!("  skipped: {s}");
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    if let Some(rb) = &r.rolled_back {
        println!("  rolled back: {rb}");
    }
    match (&r.error, r.ok) {
        (Some(e), _) => {
            println!("FAILED{}: {e}", r.failed_step.map(|s| format!(" at {s:?}")).unwrap_or_default().to_lowercase())
        }
        (None, true) if r.dry_run => println!("OK: the plan checks out; nothing was changed"),
        (None, true) => println!("OK"),
        (None, false) => println!("FAILED"),
    }
}

/// `--trace`: per L2 the kernel's downtime and its vCPUs' faults by phase,
/// then each L1 process's histograms.
fn print_trace(r: &Report, summary: &vmbeam_probes::Summary) {
    use vmbeam_probes::{Kind, Phase};
    // Real L1s: at L0 an L2's vCPU is one of its L1's vCPU threads, so
    // the probes have no thread of its own to follow.
    if r.l2.iter().all(|l| l.from_vcpu_tid.is_none() && l.to_vcpu_tid.is_none()) {
        println!(
            "  eBPF probes (--trace) at L0, per L1 QEMU: an L2's vCPU runs inside its L1's vCPU threads, so its downtime is the L1 kernels' line above"
        );
    } else {
        println!(
            "  eBPF probes (--trace): downtime = last guest exit on the aged L1 -> first guest entry on the clean L1"
        );
        println!("  {:<14} {:>10}   faults of its vCPU threads before / during / after", "L2", "downtime");
    }
    for l in r.l2.iter().filter(|l| l.from_vcpu_tid.is_some() || l.to_vcpu_tid.is_some()) {
        let Some(t) = &l.trace else { continue };
        let down = t.downtime_ms.map_or("-".into(), |d| format!("{d:.2} ms"));
        let counts: Vec<String> = Kind::ALL
            .iter()
            .map(|k| {
                let by = t.faults.get(k);
                let n: Vec<String> =
                    Phase::ALL.iter().map(|p| by.and_then(|b| b.get(p)).map_or(0, |h| h.count).to_string()).collect();
                format!("{} {}", k.label(), n.join("/"))
            })
            .collect();
        println!("  {:<14} {:>10}   {}", l.name, down, counts.join(", "));
    }
    for p in &summary.processes {
        println!("  pid {} ({}):", p.pid, p.comm);
        let mut text = String::new();
        vmbeam_probes::write_faults(&mut text, &p.faults, true, "    ");
        print!("{text}");
    }
    for region in summary.regions.iter().filter(|x| x.revoked_pages > 0) {
        let gap = region.revoke_to_first_fault_us.map_or("none".into(), |us| format!("{:.2} ms", us / 1e3));
        println!(
            "  region inode {}: {} pages revoked; revoke to its first fault after: {gap}",
            region.inode, region.revoked_pages
        );
    }
    if !summary.missing.is_empty() {
        println!("  not traced (absent here): {}", summary.missing.join(", "));
    }
}
