//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst
//! 4.133): the counters a test reads to show what KVM did, e.g. how many
//! stage-2 faults a vCPU took (`pf_taken`) and at what size the VM's memory
//! is mapped (`pages_4k`, `pages_2m`, `pages_1g`).
//!
//! ```no_run
//! # fn f(vm: &kvm_ioctls::VmFd, vcpu: &kvm_ioctls::VcpuFd) -> std::io::Result<()> {
//! use vmbeam_lab::kvm_stats::Stats;
//! let faults = Stats::of(vcpu)?.read()?["pf_taken"];
//! let huge = Stats::of(vm)?.read()?["pages_2m"];
//! # Ok(()) }
//! ```

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::FileExt,
    },
};

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};

/// `_IO(KVMIO, 0xce)`: on a VM or vCPU fd, returns a stats fd.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

/// A VM's or a vCPU's stats fd.
pub struct Stats(std::fs::File);

impl Stats {
    /// Opens the stats of the VM or vCPU behind `fd` (`VmFd`, `VcpuFd`).
    pub fn of(fd: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: an ioctl without argument on a VM or vCPU fd.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: KVM just gave us this fd; nothing else owns it.
        Ok(Self(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(r) })))
    }

    /// Every statistic by name: its first value (a counter's, a gauge's;
    /// a histogram's first bucket). Read afresh on every call.
    pub fn read(&self) -> std::io::Result<BTreeMap<String, u64>> {
        let mut header = [0u8; std::mem::size_of::<kvm_stats_header>()];
        self.0.read_exact_at(&mut header, 0)?;
        let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        // kvm_stats_header: flags, name_size, num_desc, id_offset,
        // desc_offset, data_offset (u32 each).
        let (name_size, count, desc_offset, data_offset) =
            (word(&header, 4) as usize, word(&header, 8) as usize, word(&header, 16), word(&header, 20));
        let desc_size = std::mem::size_of::<kvm_stats_desc>() + name_size;
        let mut descs = vec![0u8; desc_size * count];
        self.0.read_exact_at(&mut descs, u64::from(desc_offset))?;
        let mut stats = BTreeMap::new();
        for desc in descs.chunks_exact(desc_size) {
            // kvm_stats_desc: flags u32, exponent i16, size u16, offset
            // u32, bucket_size u32, then the name.
            let offset = word(desc, 8);
            let name = &desc[16..];
            let name = String::from_utf8_lossy(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())]);
            let mut value = [0u8; 8];
            self.0.read_exact_at(&mut value, u64::from(data_offset) + u64::from(offset))?;
            stats.insert(name.into_owned(), u64::from_ne_bytes(value));
        }
        Ok(stats)
    }

    /// One statistic; `Err` `NotFound` if this kernel has none of that name.
    pub fn get(&self, name: &str) -> std::io::Result<u64> {
        self.read()?
            .get(name)
            .copied()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no KVM statistic {name}")))
    }
}
