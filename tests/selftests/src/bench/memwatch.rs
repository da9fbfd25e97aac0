//! Peak extra memory of a method: what the whole machine had in use at its
//! busiest beyond what it had when the method began. Like the CPU column,
//! it counts every process and the kernel (a copy's destination, a second
//! QEMU's RAM, page tables, buffers), read from MemAvailable by a thread
//! every few milliseconds: a peak shorter than that can slip through, and
//! page-cache noise of a MiB or two is not a result.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

const PERIOD: Duration = Duration::from_millis(5);

/// MemAvailable in KiB (`/proc/meminfo`), or None if it cannot be read.
pub fn mem_available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Watches MemAvailable from [`MemWatch::start`] until it is dropped.
///
/// # Invariants
///
/// `lowest_kib` only goes down, and never above `start_kib`.
pub struct MemWatch {
    read: fn() -> Option<u64>,
    start_kib: u64,
    lowest_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MemWatch {
    /// None where /proc/meminfo has no MemAvailable: the column is then
    /// left empty rather than filled with a guess.
    pub fn start() -> Option<Self> {
        Self::start_with(mem_available_kib)
    }

    /// Watches what `read` says is available (KiB).
    fn start_with(read: fn() -> Option<u64>) -> Option<Self> {
        let start_kib = read()?;
        let lowest_kib = Arc::new(AtomicU64::new(start_kib));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (lowest_kib, stop) = (lowest_kib.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(now) = read() {
                        lowest_kib.fetch_min(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(PERIOD);
                }
            })
        };
        Some(Self { read, start_kib, lowest_kib, stop, thread: Some(thread) })
    }

    /// The peak so far, in MiB; reads MemAvailable once more itself, so
    /// memory held at this moment always counts.
    pub fn peak_mib(&self) -> f64 {
        if let Some(now) = (self.read)() {
            self.lowest_kib.fetch_min(now, Ordering::Relaxed);
        }
        self.start_kib.saturating_sub(self.lowest_kib.load(Ordering::Relaxed)) as f64 / 1024.0
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The peak of an optional watch (see [`MemWatch::start`]).
pub fn peak(watch: &Option<MemWatch>) -> Option<f64> {
    watch.as_ref().map(MemWatch::peak_mib)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    static READS: AtomicUsize = AtomicUsize::new(0);

    /// 1000 MiB available, then 936 for a moment, then 990 for good.
    fn dip_then_partial_recovery() -> Option<u64> {
        let n = READS.fetch_add(1, Ordering::SeqCst);
        Some(match n {
            0 => 1000 << 10,
            1 => 936 << 10,
            _ => 990 << 10,
        })
    }

    #[test]
    fn the_peak_is_the_deepest_dip_since_the_start() {
        let watch = MemWatch::start_with(dip_then_partial_recovery).expect("a reading");
        // The thread's readings and this one: the dip is seen whoever reads it.
        while READS.load(Ordering::SeqCst) < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(watch.peak_mib(), 64.0);
        assert_eq!(watch.peak_mib(), 64.0, "a peak does not fade");
    }

    #[test]
    fn no_meminfo_no_watch() {
        assert!(MemWatch::start_with(|| None).is_none());
    }

    #[test]
    fn this_machine_has_mem_available() {
        assert!(mem_available_kib().is_some_and(|k| k > 0));
    }
}
