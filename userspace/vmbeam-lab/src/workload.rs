//! The L2 workload: guest code a lab L1 runs over each L2 window (source:
//! `workload.S`), and the window's header.

use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress};

/// Guest-physical address the code is loaded at, in the L1's RAM.
pub const CODE_GPA: u64 = 0x1000;
/// What the rest of the L1's RAM holds (`hlt`), so that a vCPU that left
/// the code stops there.
pub const HLT: u8 = 0xf4;
/// Entry points, as offsets into [`CODE`].
pub const INIT: u64 = 0x00;
pub const RESUME: u64 = 0x7c;
pub const PROBE: u64 = 0x7f;

/// `out` ports: a pass completed (eax = its number), a changed dword found
/// (eax = its address), the first instruction after a resume, a probe read.
pub const PORT_PASS: u16 = 0x10;
pub const PORT_CORRUPT: u16 = 0x11;
pub const PORT_RESUMED: u16 = 0x12;
pub const PORT_PROBE: u16 = 0x13;

/// Bytes of the window before the data: the header page.
pub const HEADER_BYTES: u64 = 4096;
pub const MAGIC: u32 = u32::from_le_bytes(*b"VMBL");
const K: u32 = 0x9e37_79b9;
const M: u32 = 0x0100_0193;

/// `llvm-mc -triple=i386 -filetype=obj workload.S`, its .text.
#[rustfmt::skip]
pub const CODE: &[u8] = &[
    0x8b, 0x5e, 0x04, 0x8d, 0xbe, 0x00, 0x10, 0x00, 0x00, 0x8b, 0x4e, 0x0c, 0x89, 0x1f, 0x81, 0xc3,
    0xb9, 0x79, 0x37, 0x9e, 0x83, 0xc7, 0x04, 0x49, 0x75, 0xf2, 0xc7, 0x46, 0x08, 0x01, 0x00, 0x00,
    0x00, 0x31, 0xc0, 0xe7, 0x10, 0x8b, 0x5e, 0x08, 0x4b, 0x69, 0xdb, 0x93, 0x01, 0x00, 0x01, 0x03,
    0x5e, 0x04, 0x8d, 0x93, 0x93, 0x01, 0x00, 0x01, 0x8d, 0xbe, 0x00, 0x10, 0x00, 0x00, 0x8b, 0x4e,
    0x0c, 0x31, 0xed, 0x8b, 0x07, 0x39, 0xd8, 0x75, 0x23, 0x01, 0xc5, 0x89, 0x17, 0x81, 0xc3, 0xb9,
    0x79, 0x37, 0x9e, 0x81, 0xc2, 0xb9, 0x79, 0x37, 0x9e, 0x83, 0xc7, 0x04, 0x49, 0x75, 0xe4, 0x89,
    0x6e, 0x10, 0x8b, 0x46, 0x08, 0xff, 0x46, 0x08, 0xe7, 0x10, 0xeb, 0xb9, 0xff, 0x46, 0x14, 0x89,
    0x7e, 0x18, 0x89, 0x46, 0x1c, 0x89, 0xf8, 0xe7, 0x11, 0xf4, 0xeb, 0xf0, 0xe6, 0x12, 0xf4, 0x8b,
    0x07, 0xe7, 0x13, 0xf4,
];

/// The window header (little-endian dwords at the window's start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub seed: u32,
    /// The pass in progress; passes before it are complete.
    pub pass: u32,
    pub dwords: u32,
    /// Sum of the dwords the last complete pass verified.
    pub checksum: u32,
    pub errors: u32,
    pub bad_addr: u32,
    pub bad_value: u32,
}

impl Header {
    /// A fresh header for a window of `size` bytes.
    pub fn new(seed: u32, size: u64) -> Self {
        let dwords = ((size - HEADER_BYTES) / 4) as u32;
        Self { magic: MAGIC, seed, dwords, ..Default::default() }
    }

    fn words(&self) -> [u32; 8] {
        [self.magic, self.seed, self.pass, self.dwords, self.checksum, self.errors, self.bad_addr, self.bad_value]
    }

    pub fn write(&self, mem: &GuestRegionMmap<()>) -> Result<(), vm_memory::GuestMemoryError> {
        for (i, w) in self.words().into_iter().enumerate() {
            mem.write_obj(w, MemoryRegionAddress(4 * i as u64))?;
        }
        Ok(())
    }

    pub fn read(mem: &GuestRegionMmap<()>) -> Result<Self, vm_memory::GuestMemoryError> {
        let mut w = [0u32; 8];
        for (i, word) in w.iter_mut().enumerate() {
            *word = mem.read_obj(MemoryRegionAddress(4 * i as u64))?;
        }
        let [magic, seed, pass, dwords, checksum, errors, bad_addr, bad_value] = w;
        Ok(Self { magic, seed, pass, dwords, checksum, errors, bad_addr, bad_value })
    }

    /// Passes completed and verified (pass 0 only fills the window).
    pub fn passes(&self) -> u64 {
        u64::from(self.pass.saturating_sub(1))
    }

    /// What the checksum of a complete verifying pass `pass` must be.
    pub fn expected_checksum(&self, pass: u32) -> u32 {
        let base = base(self.seed, pass.wrapping_sub(1));
        let n = self.dwords;
        // sum(base + i*K) = n*base + K*n*(n-1)/2, mod 2^32.
        let tri = (u64::from(n) * u64::from(n.saturating_sub(1)) / 2) as u32;
        n.wrapping_mul(base).wrapping_add(K.wrapping_mul(tri))
    }
}

impl Header {
    /// Whether the checksum is what the last verifying pass must have
    /// summed (None before the first one). Read while the guest runs, the
    /// header can be caught between its two stores at the end of a pass
    /// (the new checksum written, `pass` not yet incremented): that
    /// checksum belongs to the pass in progress, and is right too.
    pub fn checksum_ok(&self) -> Option<bool> {
        (self.pass >= 2).then(|| {
            self.checksum == self.expected_checksum(self.pass - 1) || self.checksum == self.expected_checksum(self.pass)
        })
    }

    /// Where in the window (bytes from its start) the workload found a
    /// changed dword; None without an error or with no data address.
    pub fn bad_offset(&self, window_gpa: u64) -> Option<u64> {
        let offset = u64::from(self.bad_addr).checked_sub(window_gpa)?;
        (self.errors > 0 && offset >= HEADER_BYTES && (offset - HEADER_BYTES) / 4 < u64::from(self.dwords))
            .then_some(offset)
    }

    /// What `mem` (the window at `window_gpa`) holds now at the dword the
    /// workload found changed.
    pub fn read_bad_dword(&self, mem: &GuestRegionMmap<()>, window_gpa: u64) -> Option<u32> {
        mem.read_obj(MemoryRegionAddress(self.bad_offset(window_gpa)?)).ok()
    }

    /// For a person, once the workload found a changed dword (window at
    /// `window_gpa`): the value found against the one the pass before
    /// wrote, and whose value it is, which tells a lost write (an
    /// earlier pass's value), a page of zeroes and a stranger's page
    /// apart. With `now`, what the memory holds at that dword since the
    /// workload stopped (it halts on the dword, unwritten): the value
    /// found says the memory changed; the expected one says the memory
    /// is intact and the vCPU read or kept it wrong. None without an
    /// error or with no address in the window.
    pub fn explain_bad(&self, window_gpa: u64, now: Option<u32>) -> Option<String> {
        let offset = self.bad_offset(window_gpa)? - HEADER_BYTES;
        let i = (offset / 4) as u32;
        let (found, wanted) = (self.bad_value, value(self.seed, self.pass.wrapping_sub(1), i));
        // The passes a page could be held back from, newest first.
        let whose = (self.pass.saturating_sub(64)..=self.pass.saturating_add(1))
            .rev()
            .find(|&p| value(self.seed, p, i) == found)
            .map(|p| format!("the value pass {p} wrote there"))
            .unwrap_or_else(|| if found == 0 { "zero".into() } else { "no pass's value for this dword".into() });
        let memory = match now {
            // Then the workload's other operand, a register, was wrong.
            _ if found == wanted => "; that is the right value: the vCPU's expected value was wrong".into(),
            None => String::new(),
            Some(v) if v == wanted => {
                format!("; the memory holds {v:#x} there: intact, the vCPU read or kept the value wrong")
            }
            Some(v) if v == found => "; the memory still holds it: the memory changed".into(),
            Some(v) => format!("; the memory holds {v:#x} there now: changed since"),
        };
        Some(format!(
            "in pass {}, data dword {i} (page {} of the data, byte {:#x}) held {found:#x} where pass {} wrote {wanted:#x}: {whose}{memory}",
            self.pass,
            offset / 4096,
            offset % 4096,
            self.pass.wrapping_sub(1)
        ))
    }
}

/// The value pass `pass` writes at dword 0.
fn base(seed: u32, pass: u32) -> u32 {
    seed.wrapping_add(pass.wrapping_mul(M))
}

/// The dword pass `pass` leaves at index `i`.
fn value(seed: u32, pass: u32, i: u32) -> u32 {
    base(seed, pass).wrapping_add(i.wrapping_mul(K))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_matches_its_source() {
        let dir = std::env::temp_dir().join(format!("vmbeam-workload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/workload.S");
        let obj = dir.join("w.o");
        let bin = dir.join("w.bin");
        let assembled =
            std::process::Command::new("llvm-mc").args(["-triple=i386", "-filetype=obj", src, "-o"]).arg(&obj).status();
        let Ok(status) = assembled else {
            eprintln!("llvm-mc not found: CODE not checked against workload.S");
            return;
        };
        assert!(status.success());
        let copied = std::process::Command::new("llvm-objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .unwrap();
        assert!(copied.success());
        assert_eq!(std::fs::read(&bin).unwrap(), CODE, "workload.rs CODE is stale: reassemble workload.S");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn entry_points_hold_the_expected_instructions() {
        assert_eq!(&CODE[RESUME as usize..][..2], &[0xe6, PORT_RESUMED as u8]);
        assert_eq!(&CODE[PROBE as usize..][..4], &[0x8b, 0x07, 0xe7, PORT_PROBE as u8]);
    }

    #[test]
    fn a_header_caught_between_the_checksum_and_the_pass_count_is_ok() {
        let mut h = Header::new(7, HEADER_BYTES + 4 * 100);
        h.pass = 5;
        h.checksum = h.expected_checksum(4); // pass 5 in progress
        assert_eq!(h.checksum_ok(), Some(true));
        h.checksum = h.expected_checksum(5); // pass 5 stored its sum, not yet counted
        assert_eq!(h.checksum_ok(), Some(true));
        h.checksum ^= 1;
        assert_eq!(h.checksum_ok(), Some(false));
    }

    #[test]
    fn a_changed_dword_is_explained_by_whose_value_it_holds() {
        let gpa = 0x2000_0000;
        let mut h = Header::new(7, HEADER_BYTES + 4 * 100_000);
        assert_eq!(h.explain_bad(gpa, None), None, "no error, nothing to explain");
        (h.pass, h.errors, h.bad_addr) = (9, 1, (gpa + HEADER_BYTES + 4 * 5000) as u32);
        h.bad_value = value(h.seed, 7, 5000); // pass 8's write lost
        let why = h.explain_bad(gpa, None).unwrap();
        assert!(
            why.contains("dword 5000 (page 4 of the data") && why.ends_with("the value pass 7 wrote there"),
            "{why}"
        );
        assert!(why.contains(&format!("where pass 8 wrote {:#x}", value(h.seed, 8, 5000))), "{why}");
        h.bad_value = 0;
        assert!(h.explain_bad(gpa, None).unwrap().ends_with(": zero"));
        h.bad_value = value(h.seed, 8, 5001); // a neighbour's value
        assert!(h.explain_bad(gpa, None).unwrap().ends_with("no pass's value for this dword"));
        // What the memory holds now tells a changed memory from a misread.
        let (found, wanted) = (h.bad_value, value(h.seed, 8, 5000));
        assert!(h.explain_bad(gpa, Some(found)).unwrap().ends_with("still holds it: the memory changed"));
        assert!(h.explain_bad(gpa, Some(wanted)).unwrap().ends_with("intact, the vCPU read or kept the value wrong"));
        assert!(h.explain_bad(gpa, Some(0)).unwrap().ends_with("holds 0x0 there now: changed since"));
        h.bad_value = wanted; // read right, compared against a wrong register
        assert!(h.explain_bad(gpa, Some(wanted)).unwrap().ends_with("the vCPU's expected value was wrong"));
        h.bad_addr = gpa as u32; // the header page is no data
        assert_eq!(h.explain_bad(gpa, Some(wanted)), None);
        h.bad_addr = (gpa + HEADER_BYTES + 4 * 100_000) as u32; // past the data
        assert_eq!(h.bad_offset(gpa), None);
    }

    #[test]
    fn the_checksum_formula_is_the_sum_of_the_pattern() {
        let h = Header::new(0xdead_beef, HEADER_BYTES + 4 * 1000);
        for pass in 1..4 {
            let sum = (0..h.dwords).fold(0u32, |s, i| s.wrapping_add(value(h.seed, pass - 1, i)));
            assert_eq!(h.expected_checksum(pass), sum);
        }
    }
}
