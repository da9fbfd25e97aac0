//! Ordinary L1 memory as an L2's RAM: the L2's QEMU maps it itself
//! (`memory-backend-ram,share=on`: a shared anonymous mapping, shown as
//! `/dev/zero (deleted)` in its maps), locks it (`-overcommit mem-lock=on`)
//! and the agent reaches it only through `/proc/PID`: the header through
//! `mem`, the frames through `pagemap`, huge pages through `smaps`.

use std::{fs, os::unix::fs::FileExt};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vmbeam::control::agent::Workload;

use crate::header::{self, HEADER_BYTES, HEADER_GPA};

/// Where the L1's shmem transparent huge pages are chosen.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
/// 0: compaction leaves locked pages where they are, so an L2's frames
/// stay put between the report and the gather at L0.
const COMPACT_UNEVICTABLE: &str = "/proc/sys/vm/compact_unevictable_allowed";

/// Readies the L1 for an L2 on ordinary memory: transparent huge pages for
/// its RAM (`thp`) or none, and no compaction of locked pages. `always`,
/// not `advise`: QEMU locks its RAM (populating it) before it advises
/// huge pages, so only `always` backs it with them from the start.
pub fn prepare(thp: bool) -> Result<()> {
    fs::write(SHMEM_THP, if thp { "always" } else { "never" }).with_context(|| SHMEM_THP.to_string())?;
    fs::write(COMPACT_UNEVICTABLE, "0").with_context(|| COMPACT_UNEVICTABLE.to_string())
}

/// The start of QEMU `pid`'s RAM mapping of `size` bytes: its only shared,
/// writable, anonymous mapping of exactly that size.
pub fn find(pid: u32, size: u64) -> Result<u64> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("/proc/{pid}/maps"))?;
    let found: Vec<u64> = maps
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let path = f.nth(3).unwrap_or("");
            let (start, end) = range.split_once('-')?;
            let (start, end) = (u64::from_str_radix(start, 16).ok()?, u64::from_str_radix(end, 16).ok()?);
            let anon_shared = path == "/dev/zero" || path.starts_with("/SYSV") || path.starts_with("/memfd:");
            (perms == "rw-s" && anon_shared && end - start == size).then_some(start)
        })
        .collect();
    match found[..] {
        [start] => Ok(start),
        [] => bail!("QEMU {pid} has no shared anonymous mapping of {size} bytes (its RAM)"),
        _ => bail!("QEMU {pid} has {} shared anonymous mappings of {size} bytes: which is RAM is unclear", found.len()),
    }
}

/// The workload header of the L2 whose RAM QEMU `pid` maps at `hva`.
pub fn read_header(pid: u32, hva: u64) -> Result<Workload> {
    let mem = fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut raw = [0u8; HEADER_BYTES];
    mem.read_exact_at(&mut raw, hva + HEADER_GPA).with_context(|| format!("reading QEMU {pid}'s RAM"))?;
    Ok(header::parse(|i| u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])))
}

/// The L1 frame behind each page of the RAM (0: not present).
pub fn frames(pid: u32, hva: u64, size: u64) -> Result<Vec<u64>> {
    vmbeam::pagemap::frames(pid, hva, size).with_context(|| format!("/proc/{pid}/pagemap"))
}

/// Bytes of the mapping at `hva` that transparent huge pages map
/// (`ShmemPmdMapped` in its smaps entry).
pub fn thp_bytes(pid: u32, hva: u64) -> Result<u64> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).with_context(|| format!("/proc/{pid}/smaps"))?;
    let head = format!("{hva:x}-");
    // An entry: its maps line, then `Field:  value` lines up to the next.
    let entry = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| l.split_whitespace().next().is_some_and(|f| f.ends_with(':')))
        .find(|l| l.starts_with("ShmemPmdMapped:"))
        .ok_or_else(|| anyhow!("no smaps entry at {hva:#x} in QEMU {pid}"))?;
    let kb: u64 = entry.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    ensure!(kb.is_multiple_of(2048), "ShmemPmdMapped {kb} kB is not whole 2 MiB pages");
    Ok(kb * 1024)
}
