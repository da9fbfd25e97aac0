//! eBPF probes for what a vmbeam migration costs the VMs it moves: page
//! faults on region mappings, KVM stage-2 faults and user page faults
//! (counts and log2 latency histograms, before / during / after the move),
//! and each VM's downtime from kernel events: its vCPU's last guest exit
//! before the transfer to its new vCPU's first guest entry after it.
//!
//! The BPF side is `bpf/impact.bpf.c` (with `bpf/impact.h`, shared), built
//! into a libbpf-rs skeleton by this crate's build script.
//!
//! ```no_run
//! use vmbeam_probes::{Options, Phase, Probes, Summary};
//!
//! // Root (CAP_BPF + CAP_PERFMON), a kernel with BTF, vmbeam.ko loaded.
//! let mut probes = Probes::attach(&Options { pids: vec![1234, 5678] })?;
//! probes.set_phase(Phase::During);
//! // ... pause, transfer, resume ...
//! probes.set_phase(Phase::After);
//! let summary = Summary::gather(&probes)?;
//! print!("{}", summary.render());
//! # Ok::<(), vmbeam_probes::Error>(())
//! ```

mod hist;
mod probes;
mod summary;

#[allow(clippy::all, clippy::pedantic, unused_imports, non_camel_case_types, dead_code)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/impact.skel.rs"));
}

pub use hist::{Bucket, Hist};
pub use probes::{Error, Kind, Options, Phase, Probes};
pub use summary::{write_faults, EventRecord, Faults, ProcessImpact, RegionImpact, Summary, ThreadImpact};
