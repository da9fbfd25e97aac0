//! Log2 histograms of microseconds, printed as bcc's libbpf-tools and
//! bpftrace print them.

use std::fmt::Write as _;

use serde::Serialize;

use crate::probes::RawHist;

/// One bucket: `lo_us ..= hi_us` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub lo_us: u64,
    pub hi_us: u64,
    pub count: u64,
}

/// Counts and latency of one kind of event.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Hist {
    pub count: u64,
    pub total_ns: u64,
    /// Buckets up to the last non-empty one.
    pub buckets: Vec<Bucket>,
}

impl Hist {
    pub fn from_raw(raw: &RawHist) -> Self {
        let mut h = Self::default();
        h.add(raw);
        h
    }

    /// Adds `raw`'s counts (merging threads into a process, or phases).
    pub fn add(&mut self, raw: &RawHist) {
        self.count += raw.count;
        self.total_ns += raw.total_ns;
        let last = raw.slots.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
        for (slot, &count) in raw.slots.iter().enumerate().take(last) {
            if self.buckets.len() <= slot {
                let lo = if slot == 0 { 0 } else { 1u64 << slot };
                self.buckets.push(Bucket { lo_us: lo, hi_us: (1u64 << (slot + 1)) - 1, count: 0 });
            }
            self.buckets[slot].count += u64::from(count);
        }
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Hist) {
        self.count += other.count;
        self.total_ns += other.total_ns;
        for (i, b) in other.buckets.iter().enumerate() {
            if self.buckets.len() <= i {
                self.buckets.push(Bucket { count: 0, ..*b });
            }
            self.buckets[i].count += b.count;
        }
    }

    /// Mean latency in microseconds.
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total_ns as f64 / self.count as f64 / 1e3
        }
    }

    /// `usecs : count | distribution` with bars of `*`, 40 wide.
    pub fn render(&self, indent: &str) -> String {
        let max = self.buckets.iter().map(|b| b.count).max().unwrap_or(0);
        let mut out = format!("{indent}{:>20} : {:<8} distribution\n", "usecs", "count");
        for b in &self.buckets {
            let stars = if max == 0 { 0 } else { (b.count * 40).div_ceil(max) as usize };
            let range = format!("{} -> {}", b.lo_us, b.hi_us);
            let _ = writeln!(out, "{indent}{range:>20} : {:<8} |{:<40}|", b.count, "*".repeat(stars));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(slots: &[(usize, u32)], total_ns: u64) -> RawHist {
        let mut r = RawHist::default();
        for &(s, c) in slots {
            r.slots[s] = c;
            r.count += u64::from(c);
        }
        r.total_ns = total_ns;
        r
    }

    #[test]
    fn buckets_are_bcc_log2_ranges_and_sum_to_the_count() {
        let h = Hist::from_raw(&raw(&[(0, 2), (3, 5)], 9_000));
        assert_eq!(h.count, 7);
        assert_eq!(h.buckets.len(), 4);
        assert_eq!((h.buckets[0].lo_us, h.buckets[0].hi_us), (0, 1));
        assert_eq!((h.buckets[3].lo_us, h.buckets[3].hi_us), (8, 15));
        assert_eq!(h.buckets.iter().map(|b| b.count).sum::<u64>(), h.count);
    }

    #[test]
    fn merging_adds_bucket_by_bucket() {
        let mut h = Hist::from_raw(&raw(&[(1, 1)], 2_000));
        h.add(&raw(&[(1, 2), (4, 1)], 20_000));
        assert_eq!(h.count, 4);
        assert_eq!(h.buckets[1].count, 3);
        assert_eq!(h.buckets[4].count, 1);
        assert!((h.mean_us() - 5.5).abs() < 1e-9);
    }

    #[test]
    fn render_draws_the_largest_bucket_full_width() {
        let text = Hist::from_raw(&raw(&[(0, 4), (2, 1)], 0)).render("");
        assert!(text.contains("0 -> 1"), "{text}");
        assert!(text.contains(&format!("|{}|", "*".repeat(40))), "{text}");
        assert!(text.contains("4 -> 7"), "{text}");
    }
}
