//! Loading, attaching and reading the `impact` BPF object.

use std::{cell::RefCell, mem::MaybeUninit, os::unix::ffi::OsStrExt, path::Path, rc::Rc, time::Duration};

use libbpf_rs::{
    skel::{OpenSkel, SkelBuilder},
    Link, MapCore, MapFlags, OpenObject, RingBufferBuilder,
};
use plain::Plain;

use crate::skel::{types, ImpactSkel, ImpactSkelBuilder};

// SAFETY: plain C structs of integers (and a char array) from impact.h,
// with explicit padding: every byte pattern is a valid value.
unsafe impl Plain for types::impact_hist_key {}
// SAFETY: as above.
unsafe impl Plain for types::impact_hist {}
// SAFETY: as above.
unsafe impl Plain for types::impact_thread {}
// SAFETY: as above.
unsafe impl Plain for types::impact_region {}
// SAFETY: as above.
unsafe impl Plain for types::impact_event {}

pub use types::{
    impact_event as Event, impact_hist as RawHist, impact_region as RawRegion, impact_thread as RawThread,
};
use types::{impact_event_kind as EventKind, impact_kind, impact_phase};

/// Phase of a migration; the numbers are `impact.h`'s (from the skeleton).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Before = impact_phase::IMPACT_BEFORE.0 as isize,
    During = impact_phase::IMPACT_DURING.0 as isize,
    After = impact_phase::IMPACT_AFTER.0 as isize,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Before, Phase::During, Phase::After];
}

/// What a histogram times; the numbers are `impact.h`'s (from the skeleton).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Faults on vmbeam region mappings (`vmbeam:fault`).
    RegionFault = impact_kind::IMPACT_REGION_FAULT.0 as isize,
    /// KVM stage-2 faults, guest exit to guest entry.
    KvmFault = impact_kind::IMPACT_KVM_FAULT.0 as isize,
    /// User page faults (`exceptions:page_fault_user`), counted only.
    UserFault = impact_kind::IMPACT_USER_FAULT.0 as isize,
    /// Refused faults on regions (the old owner after a move).
    RegionDenied = impact_kind::IMPACT_REGION_DENIED.0 as isize,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::RegionFault, Kind::RegionDenied, Kind::KvmFault, Kind::UserFault];

    /// Whether its histogram has latencies (user faults are only counted).
    pub fn timed(self) -> bool {
        self != Kind::UserFault
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::RegionFault => "vmbeam region faults",
            Kind::KvmFault => "KVM stage-2 faults",
            Kind::UserFault => "user page faults",
            Kind::RegionDenied => "refused region faults",
        }
    }
}

/// Which processes to trace.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Thread-group ids (processes); every process when empty.
    pub pids: Vec<u32>,
}

/// Why the probes could not start, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no kernel BTF (/sys/kernel/btf/vmlinux is missing): the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("loading the BPF probes was refused ({0}): they need CAP_BPF and CAP_PERFMON (run as root)")]
    NotPermitted(libbpf_rs::Error),
    #[error("attaching {what}: {err}{hint}")]
    Attach { what: &'static str, err: libbpf_rs::Error, hint: &'static str },
    #[error("{what}: {err}")]
    Bpf { what: &'static str, err: libbpf_rs::Error },
}

fn bpf(what: &'static str) -> impl FnOnce(libbpf_rs::Error) -> Error {
    move |err| match err.kind() {
        libbpf_rs::ErrorKind::PermissionDenied => Error::NotPermitted(err),
        _ => Error::Bpf { what, err },
    }
}

/// The loaded and attached probes. Dropping it detaches and unloads
/// everything (links, programs, maps).
pub struct Probes {
    // Declared before `_object`: dropped first, while the storage the
    // skeleton borrows still exists.
    skel: Box<ImpactSkel<'static>>,
    links: Vec<Link>,
    /// Programs that could not attach because what they probe is absent
    /// (vmbeam.ko not loaded, a kernel without the tracepoint).
    pub missing: Vec<String>,
    _object: Box<MaybeUninit<OpenObject>>,
}

impl Probes {
    /// Loads the probes and attaches them, tracing `opts.pids`.
    pub fn attach(opts: &Options) -> Result<Self, Error> {
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(Error::NoBtf);
        }
        let mut object = Box::new(MaybeUninit::<OpenObject>::uninit());
        // SAFETY: the skeleton borrows the boxed storage, which lives on the
        // heap at a fixed address for as long as `Probes` does, and `Probes`
        // drops the skeleton before the box (field order).
        let storage: &'static mut MaybeUninit<OpenObject> = unsafe { &mut *(object.as_mut() as *mut _) };
        let mut open = ImpactSkelBuilder::default().open(storage).map_err(bpf("opening the BPF object"))?;
        if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
            rodata.filter_tgids = !opts.pids.is_empty();
        }
        let skel = Box::new(open.load().map_err(bpf("loading the BPF programs"))?);
        for pid in &opts.pids {
            skel.maps.tgids.update(&pid.to_ne_bytes(), &[1], MapFlags::ANY).map_err(bpf("filling the pid filter"))?;
        }
        let mut probes = Self { skel, links: Vec::new(), missing: Vec::new(), _object: object };
        probes.attach_all()?;
        Ok(probes)
    }

    fn attach_all(&mut self) -> Result<(), Error> {
        const NEEDS_MODULE: &str = " (is vmbeam.ko loaded? its tracepoints come with it)";
        let progs = &self.skel.progs;
        // (program, what it attaches to, required)
        let raw: [(&libbpf_rs::ProgramMut<'_>, &'static str, Option<&'static str>); 7] = [
            (&progs.vmbeam_transfer_start, "transfer_start", Some(NEEDS_MODULE)),
            (&progs.vmbeam_transfer_done, "transfer_done", Some(NEEDS_MODULE)),
            (&progs.vmbeam_revoke, "revoke", Some(NEEDS_MODULE)),
            (&progs.vmbeam_fault, "fault", Some(NEEDS_MODULE)),
            (&progs.kvm_exit, "kvm_exit", None),
            (&progs.kvm_page_fault, "kvm_page_fault", None),
            (&progs.kvm_entry, "kvm_entry", None),
        ];
        for (prog, tp, module_hint) in raw {
            match prog.attach_raw_tracepoint(tp) {
                Ok(link) => self.links.push(link),
                Err(err) if err.kind() == libbpf_rs::ErrorKind::PermissionDenied => {
                    return Err(Error::NotPermitted(err))
                }
                Err(err) => match module_hint {
                    Some(hint) => return Err(Error::Attach { what: tp, err, hint }),
                    // KVM built without its tracepoints (or not at all): the
                    // vCPU half of the report is empty, the rest still works.
                    None => self.missing.push(format!("kvm:{tp}")),
                },
            }
        }
        match progs.page_fault_user.attach_raw_tracepoint("page_fault_user") {
            Ok(link) => self.links.push(link),
            Err(_) => self.missing.push("exceptions:page_fault_user".into()),
        }
        Ok(())
    }

    /// Moves every later count into `phase`.
    pub fn set_phase(&mut self, phase: Phase) {
        if let Some(bss) = self.skel.maps.bss_data.as_deref_mut() {
            bss.phase = phase as u32;
        }
    }

    /// When the first transfer began and the first successful one ended
    /// (CLOCK_MONOTONIC ns), if they happened while attached.
    pub fn move_times(&self) -> (Option<u64>, Option<u64>) {
        let nonzero = |v: u64| (v != 0).then_some(v);
        match self.skel.maps.bss_data.as_deref() {
            Some(bss) => (nonzero(bss.move_start_ns), nonzero(bss.move_done_ns)),
            None => (None, None),
        }
    }

    /// Every traced thread, by thread id.
    pub fn threads(&self) -> Vec<(u32, RawThread)> {
        entries(&self.skel.maps.threads, |k: u32| k)
    }

    /// What an event's `kind` says, as `vmbeam_probes::EventRecord` names it.
    pub fn event_name(kind: u32) -> &'static str {
        match EventKind(kind) {
            EventKind::IMPACT_EV_TRANSFER_START => "transfer_start",
            EventKind::IMPACT_EV_TRANSFER_DONE => "transfer_done",
            EventKind::IMPACT_EV_REVOKE => "revoke",
            EventKind::IMPACT_EV_FIRST_FAULT => "first_fault_after_revoke",
            EventKind::IMPACT_EV_FIRST_ENTRY => "first_guest_entry_after_move",
            _ => "unknown",
        }
    }

    /// Every histogram: (thread id, process id, kind, phase) -> counts.
    pub fn hists(&self) -> Vec<((u32, u32, Kind, Phase), RawHist)> {
        entries(&self.skel.maps.hists, |k: types::impact_hist_key| k)
            .into_iter()
            .filter_map(|(k, h)| {
                let kind = *Kind::ALL.iter().find(|kind| **kind as u32 == k.kind)?;
                let phase = *Phase::ALL.iter().find(|phase| **phase as u32 == k.phase)?;
                Some(((k.tid, k.tgid, kind, phase), h))
            })
            .collect()
    }

    /// Regions that were revoked or faulted while attached, by inode.
    pub fn regions(&self) -> Vec<(u64, RawRegion)> {
        entries(&self.skel.maps.regions, |k: u64| k)
    }

    /// The milestone events queued so far (transfers, revokes, first
    /// faults and first guest entries after them).
    pub fn drain_events(&self, wait: Duration) -> Result<Vec<Event>, Error> {
        let got = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&got);
        let mut builder = RingBufferBuilder::new();
        builder
            .add(&self.skel.maps.events, move |data: &[u8]| {
                let mut e = Event::default();
                if plain::copy_from_bytes(&mut e, data).is_ok() {
                    sink.borrow_mut().push(e);
                }
                0
            })
            .map_err(bpf("reading the event ring"))?;
        let ring = builder.build().map_err(bpf("reading the event ring"))?;
        ring.poll(wait).map_err(bpf("reading the event ring"))?;
        ring.consume().map_err(bpf("reading the event ring"))?;
        drop(ring);
        Ok(Rc::try_unwrap(got).map(RefCell::into_inner).unwrap_or_default())
    }
}

/// Every (key, value) of a hash map, decoded.
fn entries<K: Plain + Default + Copy, V: Plain + Default, T>(
    map: &libbpf_rs::MapMut<'_>,
    key: impl Fn(K) -> T,
) -> Vec<(T, V)> {
    let mut out = Vec::new();
    for raw_key in map.keys() {
        let Ok(Some(raw_value)) = map.lookup(&raw_key, MapFlags::ANY) else { continue };
        let (mut k, mut v) = (K::default(), V::default());
        if plain::copy_from_bytes(&mut k, &raw_key).is_ok() && plain::copy_from_bytes(&mut v, &raw_value).is_ok() {
            out.push((key(k), v));
        }
    }
    out
}

/// A thread's name from its BPF record.
pub fn comm(t: &RawThread) -> String {
    let bytes: Vec<u8> = t.comm.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    std::ffi::OsStr::from_bytes(&bytes).to_string_lossy().into_owned()
}
