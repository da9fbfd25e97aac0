//! Page frame numbers from `/proc/PID/pagemap`: how to show that two
//! mappings use the same physical pages (zero copy). Real PFNs need
//! CAP_SYS_ADMIN; without it the kernel reports 0.

use std::os::unix::fs::FileExt;

const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

/// The PFN behind each 4 KiB page of `len` bytes at `addr` in process
/// `pid`; 0 for a page not present.
pub fn frames(pid: u32, addr: u64, len: u64) -> std::io::Result<Vec<u64>> {
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut raw = vec![0u8; (len / 4096) as usize * 8];
    f.read_exact_at(&mut raw, addr / 4096 * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap_or_default());
            if e & PRESENT != 0 {
                e & PFN_MASK
            } else {
                0
            }
        })
        .collect())
}
