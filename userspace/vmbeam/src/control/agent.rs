//! The messages of the in-L1 agent (`vmbeam-agent`): the same framing,
//! greeting and reply shapes as the lab protocol, other commands. An agent
//! runs inside a real L1 (Linux + KVM + QEMU) and drives the L2 QEMUs there;
//! L0 reaches it over a virtio-serial port that QEMU exposes as a Unix
//! socket, so no fd ever travels on this protocol.
//!
//! | command        | arguments        | returns            |
//! |----------------|------------------|--------------------|
//! | `query-commands` | –              | `[name]`           |
//! | `query-status` | –                | [`AgentStatus`]    |
//! | `query-vms`    | –                | `[`[`AgentL2`]`]`  |
//! | `start-l2`     | [`StartL2`]      | [`AgentL2`]        |
//! | `save-l2`      | [`Named`]        | [`Saved`]          |
//! | `save-l2s`     | [`SaveL2s`]      | `[`[`AgentL2`]`]`  |
//! | `query-l2-frames` | [`FramesQuery`] | [`L2Frames`]     |
//! | `resume-l2`    | [`Named`]        | [`AgentL2`]        |
//! | `prepare-l2`   | [`PrepareL2`]    | [`AgentL2`]        |
//! | `restore-l2`   | [`RestoreL2`]    | [`Restored`]       |
//! | `stage-l2`     | [`RestoreL2`]    | `{}`               |
//! | `load-l2`      | [`RestoreL2`]    | [`AgentL2`]        |
//! | `load-l2s`     | [`RestoreL2s`]   | `[`[`AgentL2`]`]`  |
//! | `restore-l2s`  | [`Names`]        | `[`[`Restored`]`]` |
//! | `kill-l2`      | [`Named`]        | `{}`               |
//! | `mark-l2s`     | [`Names`]        | `{}`               |
//! | `query-clock`  | –                | [`AgentClock`]     |
//! | `query-l2-marks` | [`Names`]      | `[`[`L2Marks`]`]`  |
//! | `upgrade-l2s`  | [`Names`]        | `[`[`Upgraded`]`]` |
//! | `poweroff`     | –                | `{}` (then the L1 powers off) |
//!
//! Several L2s move side by side, so that one's downtime does not hold
//! another's: `save-l2s` stops them all, then their QEMUs save at the
//! same time (each in its own migration thread), and `save-l2` collects
//! each state (all or nothing: if one cannot begin, the others run
//! again); `load-l2` starts loading one state and returns, and
//! `restore-l2s` resumes each as soon as its own has loaded. Every message
//! carries at most one state (a line is at most `MAX_LINE` bytes).
//! `stage-l2` sends a state ahead to its prepared QEMU, so that L0 passes
//! each state on while the aged L1 still saves the next, and the
//! `load-l2` that follows carries none (an empty `state`). Between L1s
//! that both have a state window ([`state_window`]) no state crosses the
//! links at all: the aged agent leaves it in its window, L0 moves those
//! pages into the clean L1's, and `load-l2` names where they arrived.
//! There `load-l2s` begins every load in one request (none may carry a
//! state): the loads come one after the other inside every L2's downtime,
//! and under TCG each request costs 15–45 ms of trips through two L1
//! QEMUs' serial ports. (The saves' `save-l2`s need no such batch: each
//! waits while the next L2 still saves; one `save-all` request for the
//! whole pause was tried and left the L1 kernels' downtime as it was.)
//!
//! `save-l2` stops the L2 and saves its CPU and device state with QEMU's
//! own migration and the `x-ignore-shared` capability: its RAM is the
//! window, which the stream skips. The L2 stays stopped until `resume-l2`
//! (a rollback) or `kill-l2` (it moved). `prepare-l2` starts the receiving
//! QEMU on a window with `-incoming defer`, before the pause, and has it
//! listen for its state there and then (`migrate-incoming`: one QMP round
//! trip less in the downtime): starting touches none of its RAM, so the
//! window may still be empty. `restore-l2`
//! loads the state into that QEMU (or starts one, if none was prepared)
//! and resumes it. It runs once the window's pages have arrived: loading a
//! state writes guest RAM (kvmvapic patches its ROM copy at 0xc0000).
//!
//! The agent marks each L2's downtime with kernel events of its L1 (a
//! tracefs instance per L2, filtered on its vCPU threads): `mark-l2s`,
//! before the pause, starts tracing their last guest exit (`save-l2s`
//! does, if nothing asked before); `prepare-l2` (or `load-l2`) their
//! first guest entry. `query-l2-marks` returns both on the L1's
//! CLOCK_MONOTONIC, and `query-clock` lets L0 relate that clock to its own
//! (the round trip bounds the error).
//!
//! `upgrade-l2s` replaces the QEMU of L2s on windows with a new one in the
//! same L1: QEMU's own local upgrade (`x-ignore-shared` from one QEMU to
//! the next, both mapping the window), no pages moved at L0. It is what
//! rejuvenating only the L2s' QEMU costs, and the peer that `migrate-all`
//! is measured against at the same level (`make bench`): the new QEMUs
//! start before any L2 stops, then the stops, saves, loads and `cont`s run
//! as in a move, without the trips to L0 and the pages' move between.
//!
//! An L2 started without a window runs on *ordinary* memory of the L1
//! (`memory-backend-ram,share=on`, locked with `-overcommit mem-lock=on`):
//! what an operator's existing L2s look like. `query-l2-frames` tells L0
//! which L1 guest-physical frames hold its RAM, so L0 can gather them out
//! of the L1's own RAM region. Its RAM must be shared because QEMU 7.2's
//! `x-ignore-shared` skips only shared RAM blocks: a private one would go
//! through the migration stream, a copy.

use serde::{Deserialize, Serialize};

pub use super::state_window::{self, StateAt};

/// Every command the agent answers.
pub const AGENT_COMMANDS: &[&str] = &[
    "query-commands",
    "query-status",
    "query-vms",
    "start-l2",
    "save-l2",
    "save-l2s",
    "query-l2-frames",
    "resume-l2",
    "prepare-l2",
    "restore-l2",
    "stage-l2",
    "load-l2",
    "load-l2s",
    "restore-l2s",
    "kill-l2",
    "mark-l2s",
    "query-clock",
    "query-l2-marks",
    "upgrade-l2s",
    "poweroff",
];

/// The `service` an agent's greeting names.
pub const AGENT_SERVICE: &str = "vmbeam-agent";

/// One window of the L1: a PCI BAR (ivshmem-plain behind root port
/// `index`) that L0 backs with a vmbeam region.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentWindow {
    /// The root port's number: port `rp<index>` at L0, slot 0x10 + index.
    pub index: u32,
    /// PCI address inside the L1, e.g. `0000:01:00.0`.
    pub pci: String,
    pub size: u64,
    /// The L2 whose RAM it is, if any.
    pub l2: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentStatus {
    pub name: String,
    pub kernel: String,
    pub qemu: String,
    pub windows: Vec<AgentWindow>,
    /// The size of its state window ([`state_window`]), if it has one
    /// (an L1 booted by an older vmbeamctl has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_window: Option<u64>,
}

/// The L2 workload's header, read from its RAM (`guests/l2/workload.S`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Workload {
    pub magic: u32,
    pub seed: u32,
    /// The pass in progress; the ones before it are complete.
    pub pass: u32,
    pub dwords: u32,
    /// Sum of the dwords the last complete pass verified.
    pub checksum: u32,
    pub errors: u32,
    /// Where the first error was: the changed dword's guest-physical
    /// address, or [`Workload::REBOOTED`].
    #[serde(default)]
    pub bad_address: u32,
    /// The value found there (for a reboot: the pass the header held).
    #[serde(default)]
    pub bad_value: u32,
    pub heartbeat: u32,
}

impl Workload {
    /// [`Workload::bad_address`] of a workload that booted afresh over RAM
    /// it had already filled (its L2 reset, or was started instead of
    /// restored), not of a changed dword.
    pub const REBOOTED: u32 = 0xFFFF_FFFF;

    /// What its errors were, for a person: empty when there were none.
    pub fn error_cause(&self) -> String {
        match (self.errors, self.bad_address) {
            (0, _) => String::new(),
            (_, Self::REBOOTED) => format!(" (the L2 booted afresh over its RAM at pass {})", self.bad_value),
            (_, at) => format!(" (first bad dword at {at:#x}: {:#x})", self.bad_value),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AgentL2State {
    Running,
    /// Started with `-incoming`: its state is being loaded.
    Incoming,
    /// Stopped by `save-l2`, its state saved.
    Saved,
    /// Its QEMU exited.
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentL2 {
    pub name: String,
    /// The window that is its RAM; `None`: ordinary L1 memory.
    pub window: Option<u32>,
    pub size: u64,
    pub pid: u32,
    pub state: AgentL2State,
    pub workload: Option<Workload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How long starting an L2 may take, on both ends of `start-l2`: `base`,
/// plus a minute per GiB of ordinary memory, which its QEMU locks, so the
/// L1 faults in and zeroes every page of it before QEMU answers (an L2 of
/// 1 GiB took over a minute under TCG). A start that fails by timing out
/// is rather one that never ends: a 64 MiB L2 did too, its L1 alive (the
/// agent's console says where that QEMU waits, every 10 s).
pub fn start_timeout(base: std::time::Duration, ordinary_bytes: u64) -> std::time::Duration {
    base + std::time::Duration::from_secs(60 * ordinary_bytes.div_ceil(1 << 30))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartL2 {
    pub name: String,
    /// Its RAM: this window, or (`None`) `size` bytes of ordinary memory.
    #[serde(default)]
    pub window: Option<u32>,
    /// RAM size of an L2 on ordinary memory (default 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Ordinary memory only: back it with transparent huge pages (the
    /// L1's shmem THP set to `always` while its QEMU starts).
    #[serde(default)]
    pub thp: bool,
}

/// The most frames one `query-l2-frames` reply carries; an L2 of any size
/// is read in pages of this many. They travel as runs of consecutive
/// frames, at worst one run per frame: `[NNNNNNNNNN,1],` is 15 bytes for a
/// frame below 2^32 (an L1 of up to 16 TiB), 983,040 bytes for 65,536,
/// inside a message (`MAX_LINE`, 1 MiB).
pub const MAX_FRAMES_PER_REPLY: u64 = 1 << 16;

/// Which pages of an L2's RAM `query-l2-frames` reports: `count` pages
/// from page `first` (default: from 0, as many as one reply carries).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FramesQuery {
    pub name: String,
    #[serde(default)]
    pub first: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// Where an L2's RAM lives in the L1, for `query-l2-frames`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct L2Frames {
    pub name: String,
    /// The whole RAM's size (`frames` may be a part of it).
    pub size: u64,
    /// The page of the RAM that `frames[0]` is (0 for a reply that starts
    /// at the beginning).
    #[serde(default)]
    pub first: u64,
    /// The L1 guest-physical frame (page number) holding each 4 KiB page
    /// of the L2's RAM from page `first` on, in the order of the L2's
    /// guest-physical addresses (its QEMU's `/proc/PID/pagemap`); 0: not
    /// present. At most [`MAX_FRAMES_PER_REPLY`]. On the wire, as runs of
    /// consecutive frames (`frame_runs`, [`crate::runs`]): an L2 on huge
    /// pages is one run per 2 MiB.
    #[serde(rename = "frame_runs", with = "frame_runs")]
    pub frames: Vec<u64>,
    /// Bytes of the whole RAM in transparent huge pages (`ShmemPmdMapped`
    /// in smaps); only in the reply with `first` 0 (0 in the others).
    pub thp_bytes: u64,
}

/// [`L2Frames::frames`] on the wire: runs of frames that go up by one, a
/// run from 0 being absent pages; more than [`MAX_FRAMES_PER_REPLY`] is
/// refused before anything is allocated.
mod frame_runs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::MAX_FRAMES_PER_REPLY;
    use crate::runs;

    pub fn serialize<S: Serializer>(frames: &[u64], s: S) -> Result<S::Ok, S::Error> {
        runs::encode(frames, 1, true).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        let runs: Vec<[u64; 2]> = Vec::deserialize(d)?;
        runs::decode(&runs, 1, true, MAX_FRAMES_PER_REPLY).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Names {
    pub names: Vec<String>,
}

/// `save-l2s`: the L2s to stop and save.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SaveL2s {
    pub names: Vec<String>,
    /// Put each state in this L1's state window ([`state_window`]) where
    /// it fits, and have `save-l2` say where ([`Saved::state_at`]) instead
    /// of carrying it. Absent (an older vmbeamctl): every state is carried.
    #[serde(default)]
    pub state_window: bool,
}

/// The saved L2: its device state, and when it stopped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    pub name: String,
    pub window: Option<u32>,
    /// QEMU's migration stream (CPU and devices, no RAM), gzip, base64
    /// (a plain stream in base64 is read too); empty when it is in the
    /// state window (`state_at`).
    pub state: String,
    /// Where in this L1's state window's outbox the stream lies, when
    /// `save-l2s` asked for it there and it fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_at: Option<StateAt>,
    /// The stream's own size (before gzip).
    pub state_bytes: u64,
    /// Microseconds from the L2's stop to this reply leaving the agent:
    /// L0 subtracts it from the reply's arrival to place the stop on its
    /// own clock.
    pub stopped_us_ago: u64,
    /// The workload as the stop left it.
    pub workload: Option<Workload>,
    /// Of `stopped_us_ago`, QEMU's own migration (its `total-time`, or,
    /// where QEMU has not set that yet at its `completed` event, the time
    /// from `migrate` to that event: `Qmp::wait_migration`): the rest is
    /// the agent's wait for `save-l2` and the state's encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_save_ms: Option<u64>,
}

/// The receiving QEMU of an L2 that is to arrive on `window`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrepareL2 {
    pub name: String,
    pub window: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreL2 {
    pub name: String,
    pub window: u32,
    /// The [`Saved`] state; empty in a `load-l2` after `stage-l2`, or
    /// when `state_at` names it.
    pub state: String,
    /// Where in this L1's state window's inbox L0 put the state (the
    /// stream, as `save-l2`'s `state_at` said it): `load-l2` and
    /// `restore-l2` read it there. Only pages L0 moved there may be named:
    /// the agent cannot tell, and an L1 that touches a missing page of a
    /// region is stopped at L0 (as when a state is loaded into a window
    /// whose pages have not arrived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_at: Option<StateAt>,
}

/// `load-l2s`: loads to begin, each with its state in the state window
/// (`state_at`) or staged before (`stage-l2`), so that none carries one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreL2s {
    pub l2s: Vec<RestoreL2>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restored {
    pub l2: AgentL2,
    /// Microseconds from the request's arrival to the L2 running again.
    pub resumed_after_us: u64,
    /// Of those, the QEMU start (before the state is loaded): 0 when
    /// `prepare-l2` started it ahead.
    pub start_us: u64,
}

/// The L1's CLOCK_MONOTONIC when the agent answered.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentClock {
    pub monotonic_ns: u64,
}

/// An L2's downtime as its L1's kernel saw it (the L1's CLOCK_MONOTONIC):
/// the last guest exit of its vCPU threads before its save (on the aged
/// L1), the first guest entry after its resume (on the clean L1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct L2Marks {
    pub name: String,
    pub last_guest_exit_ns: Option<u64>,
    pub first_guest_entry_ns: Option<u64>,
    /// Why a mark is missing (no tracefs in this L1, no event yet).
    pub error: Option<String>,
}

/// An L2 whose QEMU `upgrade-l2s` replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Upgraded {
    /// The L2 as its new QEMU runs it.
    pub l2: AgentL2,
    /// The QEMU it left (killed).
    pub old_pid: u32,
    /// Microseconds from the old QEMU's `stop` to the new one's `cont`
    /// returning, on the agent's clock.
    pub downtime_us: u64,
    /// Of those, the old QEMU's own save (its `total-time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_save_ms: Option<u64>,
    /// The state stream's size: CPU and devices, none of the RAM.
    pub state_bytes: u64,
    /// The old QEMU's last guest exit and the new one's first entry.
    pub marks: L2Marks,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_travel_as_runs_and_too_many_are_refused() {
        let f = L2Frames {
            name: "g0".into(),
            size: 8 << 12,
            first: 0,
            frames: vec![9, 10, 11, 0, 0, 40, 41, 42],
            thp_bytes: 0,
        };
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["frame_runs"], serde_json::json!([[9, 3], [0, 2], [40, 3]]));
        assert_eq!(serde_json::from_value::<L2Frames>(json).unwrap(), f);
        let bomb = serde_json::json!({"name": "g0", "size": 0, "frame_runs": [[5, 1u64 << 32]], "thp_bytes": 0});
        let refused = serde_json::from_value::<L2Frames>(bomb).unwrap_err().to_string();
        assert!(refused.contains("more than the 65536 allowed"), "{refused}");
    }

    #[test]
    fn loads_in_one_request_name_where_each_state_arrived() {
        let loads = RestoreL2s {
            l2s: vec![RestoreL2 {
                name: "vm0".into(),
                window: 1,
                state: String::new(),
                state_at: Some(StateAt { offset: 8 << 20, bytes: 4096 }),
            }],
        };
        let json = serde_json::to_value(&loads).unwrap();
        assert_eq!(json["l2s"][0]["state_at"]["offset"], 8 << 20);
        assert_eq!(serde_json::from_value::<RestoreL2s>(json).unwrap(), loads);
    }
}
