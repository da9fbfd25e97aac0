//! The L2 workload's header (`guests/l2/workload.S`): where it sits in an
//! L2's RAM and how its words read, whichever way the RAM is reached.

use vmbeam::control::agent::Workload;

/// Guest-physical address of the workload header in an L2's RAM.
pub const HEADER_GPA: u64 = 0x20_0000;
/// Bytes of the header that are read.
pub const HEADER_BYTES: usize = 36;

/// The header from its dwords, `word(i)` reading dword `i`.
pub fn parse(word: impl Fn(usize) -> u32) -> Workload {
    Workload {
        magic: word(0),
        seed: word(1),
        pass: word(2),
        dwords: word(3),
        checksum: word(4),
        errors: word(5),
        bad_address: word(6),
        bad_value: word(7),
        heartbeat: word(8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_says_whether_a_dword_changed_or_the_l2_rebooted() {
        // magic, seed, pass, dwords, checksum, errors, bad address, bad value, heartbeat
        let changed = [0x324c_4d56, 1, 61, 100, 0, 1, 0x20_3000, 0xdead, 9];
        let w = parse(|i| changed[i]);
        assert_eq!((w.pass, w.errors, w.bad_address, w.bad_value, w.heartbeat), (61, 1, 0x20_3000, 0xdead, 9));
        assert_eq!(w.error_cause(), " (first bad dword at 0x203000: 0xdead)");
        let rebooted = [0x324c_4d56, 1, 61, 100, 0, 1, Workload::REBOOTED, 61, 9];
        assert_eq!(parse(|i| rebooted[i]).error_cause(), " (the L2 booted afresh over its RAM at pass 61)");
        let fine = [0x324c_4d56, 1, 61, 100, 0, 0, 0, 0, 9];
        assert_eq!(parse(|i| fine[i]).error_cause(), "");
    }
}
