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
    find_in(&maps, size).with_context(|| format!("QEMU {pid}"))
}

/// [`find`] over the text of a `/proc/PID/maps`.
fn find_in(maps: &str, size: u64) -> Result<u64> {
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
        [] => bail!("no shared anonymous mapping of {size} bytes (its RAM)"),
        _ => bail!("{} shared anonymous mappings of {size} bytes: which is RAM is unclear", found.len()),
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
    thp_bytes_in(&smaps, hva).with_context(|| format!("QEMU {pid}"))
}

/// [`thp_bytes`] over the text of a `/proc/PID/smaps`.
fn thp_bytes_in(smaps: &str, hva: u64) -> Result<u64> {
    let head = format!("{hva:x}-");
    // An entry: its maps line, then `Field:  value` lines up to the next.
    let entry = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&head))
        .skip(1)
        .take_while(|l| l.split_whitespace().next().is_some_and(|f| f.ends_with(':')))
        .find(|l| l.starts_with("ShmemPmdMapped:"))
        .ok_or_else(|| anyhow!("no smaps entry at {hva:#x}"))?;
    let kb: u64 = entry.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    ensure!(kb.is_multiple_of(2048), "ShmemPmdMapped {kb} kB is not whole 2 MiB pages");
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from a QEMU 7.2 with `memory-backend-ram,share=on,size=16M`.
    const MAPS: &str = "\
55d0c1a00000-55d0c1b00000 r--p 00000000 fe:01 131 /usr/bin/qemu-system-x86_64
7fb190400000-7fb190600000 rw-p 00000000 00:00 0
7fb190600000-7fb191600000 rw-s 00000000 00:01 1450                       /dev/zero (deleted)
7fb191800000-7fb192800000 rw-p 00000000 00:00 0
7fb192a00000-7fb192a20000 rw-s 00000000 00:01 1452                       /dev/zero (deleted)
";

    #[test]
    fn ram_is_the_shared_anonymous_mapping_of_its_size() {
        assert_eq!(find_in(MAPS, 16 << 20).unwrap(), 0x7fb1_9060_0000);
        assert!(find_in(MAPS, 32 << 20).unwrap_err().to_string().contains("no shared anonymous mapping"));
        let twice = format!("{MAPS}7fb1a0000000-7fb1a1000000 rw-s 00000000 00:01 9 /dev/zero (deleted)\n");
        assert!(find_in(&twice, 16 << 20).unwrap_err().to_string().contains("2 shared anonymous mappings"));
    }

    #[test]
    fn thp_bytes_come_from_the_mappings_own_entry() {
        let smaps = "\
7fb190600000-7fb191600000 rw-s 00000000 00:01 1450                       /dev/zero (deleted)
Size:              16384 kB
Rss:               16384 kB
ShmemPmdMapped:    12288 kB
Locked:            16384 kB
7fb192a00000-7fb192a20000 rw-s 00000000 00:01 1452                       /dev/zero (deleted)
Size:                128 kB
ShmemPmdMapped:     2048 kB
";
        assert_eq!(thp_bytes_in(smaps, 0x7fb1_9060_0000).unwrap(), 12 << 20);
        assert_eq!(thp_bytes_in(smaps, 0x7fb1_92a0_0000).unwrap(), 2 << 20);
        assert!(thp_bytes_in(smaps, 0x1000).is_err());
    }
}
