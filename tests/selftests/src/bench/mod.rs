//! `make bench`: handing memory over with vmbeam against copying it and
//! against the peers that hand it over without revoking (a memfd passed
//! over a Unix socket, QEMU's migrations), side by side in one run of the
//! test kernel. Absolute times under TCG mean little; the ratios to a
//! memcpy of the same bytes, taken in the same boot, are the result.

pub mod gather;
pub mod lab;
pub mod memwatch;
pub mod methods;
pub mod output;
pub mod qemu;
pub mod real;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One timed run of one method at one size.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub wall_ms: f64,
    /// CPU time of the whole machine (every process and the kernel).
    pub cpu_s: f64,
    /// Bytes the method copied (0 for a hand-over).
    pub bytes_copied: u64,
    /// Downtime, where the method has one (migrations).
    pub downtime_ms: Option<f64>,
    /// The machine's memory in use beyond what it held when the method
    /// began, at its peak ([`memwatch::MemWatch`]).
    pub peak_extra_mib: Option<f64>,
    /// Stage-2 page faults KVM took for the VM that received the memory
    /// while its guest read every page (KVM's `pf_taken` of its vCPU;
    /// its code and the last page were mapped by a run before): the host
    /// faults a moved VM pays after the move. `None` where no such guest
    /// ran.
    pub host_faults: Option<u64>,
}

/// The median of several runs of one method at one size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub method: String,
    pub size: u64,
    pub runs: usize,
    pub wall_ms: f64,
    pub cpu_s: f64,
    pub bytes_copied: u64,
    pub downtime_ms: Option<f64>,
    #[serde(default)]
    pub peak_extra_mib: Option<f64>,
    #[serde(default)]
    pub host_faults: Option<u64>,
    /// wall_ms / memcpy's wall_ms at the same size, in this run.
    pub ratio_to_memcpy: Option<f64>,
}

impl Row {
    pub fn of(method: &str, size: u64, samples: &[Sample]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let downs: Vec<f64> = samples.iter().filter_map(|s| s.downtime_ms).collect();
        let peaks: Vec<f64> = samples.iter().filter_map(|s| s.peak_extra_mib).collect();
        let faults: Vec<f64> = samples.iter().filter_map(|s| s.host_faults).map(|n| n as f64).collect();
        Some(Self {
            method: method.to_string(),
            size,
            runs: samples.len(),
            wall_ms: median(samples.iter().map(|s| s.wall_ms).collect()),
            cpu_s: median(samples.iter().map(|s| s.cpu_s).collect()),
            bytes_copied: samples.iter().map(|s| s.bytes_copied).max().unwrap_or(0),
            downtime_ms: (!downs.is_empty()).then(|| median(downs)),
            peak_extra_mib: (!peaks.is_empty()).then(|| median(peaks)),
            host_faults: (!faults.is_empty()).then(|| median(faults).round() as u64),
            ratio_to_memcpy: None,
        })
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Busy CPU time of the whole machine so far, in seconds (/proc/stat).
pub fn machine_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    // cpu user nice system idle iowait irq softirq steal guest guest_nice:
    // busy is user + nice + system + irq + softirq. Not steal (time this
    // machine's host took), not guest and guest_nice (KVM guests' time,
    // already inside user and nice: counting them again inflated every row
    // with a running guest).
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy as f64 / hz
}

/// Times `f`: wall and machine CPU.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Sample) {
    let (cpu0, t0) = (machine_cpu_s(), Instant::now());
    let out = f();
    let wall = t0.elapsed();
    let sample = Sample { wall_ms: ms(wall), cpu_s: machine_cpu_s() - cpu0, ..Default::default() };
    (out, sample)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn size_name(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// `64M`, `1G`, `512M`: sizes as the bench's options take them.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    match unit {
        "" => Some(n),
        "K" | "k" => Some(n << 10),
        "M" | "m" => Some(n << 20),
        "G" | "g" => Some(n << 30),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1T"), None);
        assert_eq!(size_name(256 << 20), "256 MiB");
        assert_eq!(size_name(2 << 30), "2 GiB");
    }
}
