//! The messages and the data the commands carry.
//!
//! | command           | arguments                 | returns          | fds          |
//! |-------------------|---------------------------|------------------|--------------|
//! | `query-commands`  | –                         | `[name]`         | –            |
//! | `query-status`    | –                         | [`L1Status`]     | –            |
//! | `query-vms`       | –                         | `[`[`L2Info`]`]` | –            |
//! | `pause`           | [`PauseArgs`]             | `[`[`Paused`]`]` | –            |
//! | `resume`          | [`Selection`]             | `[name]`         | –            |
//! | `get-vm-fd`       | –                         | `{}`             | out: VM fd   |
//! | `send-regions`    | [`Selection`] (paused)    | [`Sent`]         | out: VM fd, then one region fd per L2 |
//! | `lend-regions`    | [`Selection`] (any state) | [`Sent`] (no registers) | out: VM fd, then one region fd per L2 |
//! | `receive-regions` | [`ReceiveArgs`]           | `[`[`Window`]`]` | in: one region fd per L2 |
//! | `stage-regions`   | [`ReceiveArgs`]           | `[`[`Window`]`]` | in: one region fd per L2 |
//! | `commit-staged`   | –                         | `[`[`Window`]`]` | –            |
//! | `drop-staged`     | –                         | count            | –            |
//! | `probe`           | [`Selection`] (not running) | `[`[`Probe`]`]` | –          |
//! | `quit`            | –                         | `{}`             | –            |
//!
//! A pause lasts as long as the connection that asked for it: when that
//! connection closes, the L2s it paused that still belong to the L1 resume
//! (a migration whose driver died leaves no VM stopped).
//!
//! Two ways to hand an L2 over. `send-regions` (paused L2s) returns the
//! registers with the fds, and the receiver gets both in one
//! `receive-regions` once the memory is its own, or `stage-regions` before
//! and `commit-staged` after the transfer. Or, keeping every round trip
//! but one out of the L2's downtime: `lend-regions` while the L2 still
//! runs, `stage-regions` of handoffs without registers, then `pause` with
//! `save_state`, which writes the registers into the L2's own window (they
//! move with the memory, as the real L1s' state windows do), the transfer,
//! and `commit-staged`, which reads them there.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every command a server of this protocol answers.
pub const COMMANDS: &[&str] = &[
    "query-commands",
    "query-status",
    "query-vms",
    "pause",
    "resume",
    "get-vm-fd",
    "send-regions",
    "lend-regions",
    "receive-regions",
    "stage-regions",
    "commit-staged",
    "drop-staged",
    "probe",
    "quit",
];

/// The server's first line: `{"greeting": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Greeting {
    pub greeting: ServerInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerInfo {
    pub service: String,
    pub version: String,
    pub name: String,
    pub pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub execute: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub arguments: Value,
    /// Echoed in the reply, as in QMP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// `{"return": ...}` or `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    #[serde(rename = "return", default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl Reply {
    pub fn ok(value: Value, id: Option<Value>) -> Self {
        Self { ret: Some(value), error: None, id }
    }

    pub fn err(error: ErrorBody, id: Option<Value>) -> Self {
        Self { ret: None, error: Some(error), id }
    }
}

/// QMP's error classes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub class: ErrorClass,
    pub desc: String,
    /// The errno behind the error, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
}

impl ErrorBody {
    pub fn generic(desc: impl Into<String>) -> Self {
        Self { class: ErrorClass::GenericError, desc: desc.into(), errno: None }
    }

    pub fn with_errno(desc: impl Into<String>, errno: i32) -> Self {
        Self { class: ErrorClass::GenericError, desc: desc.into(), errno: Some(errno) }
    }
}

/// A guest-physical window of an L1: where one L2's RAM appears.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Window {
    pub gpa: u64,
    pub size: u64,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn overlaps(&self, other: &Window) -> bool {
        self.gpa < other.end() && other.gpa < self.end()
    }
}

/// `query-status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct L1Status {
    pub name: String,
    pub pid: u32,
    /// The vmbeam uAPI version the L1's VMM runs against.
    pub api_version: u32,
    /// The L1's own RAM (a vmbeam region too).
    pub ram_bytes: u64,
    pub l2_vms: usize,
    pub running: usize,
    /// Windows in use: where L2 RAM is mapped.
    pub windows: Vec<Window>,
    /// Windows must lie in `[window_base, window_limit)`.
    pub window_base: u64,
    pub window_limit: u64,
}

/// Where an L2 is in its life on one L1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum L2State {
    Running,
    Paused,
    /// Paused, its state handed out (`send-regions`, or `pause` with
    /// `save_state`); resumable until the regions change owner.
    Sent,
    /// Its regions belong to another VM now.
    Migrated,
    /// The workload found a byte it did not write.
    Corrupt,
    /// The vCPU stopped on an error (see `detail`).
    Failed,
}

/// A region's ownership, from `VMBEAM_REGION_INFO`, as the L1 sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionState {
    pub owned: bool,
    pub mine: bool,
    pub moving: bool,
    pub pages_present: u64,
}

/// `query-vms`: one L2.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct L2Info {
    pub name: String,
    pub state: L2State,
    pub window: Window,
    /// Workload passes completed: each verifies every dword of the window
    /// and rewrites it.
    pub passes: u64,
    /// Dwords the workload found changed.
    pub errors: u64,
    /// Sum of the dwords the last pass verified.
    pub checksum: u32,
    /// Whether `checksum` is what the pattern sums to (None before the
    /// first verifying pass).
    pub checksum_ok: Option<bool>,
    /// Where the L1's VMM maps the window (for `/proc/PID/pagemap`).
    pub hva: u64,
    /// CLOCK_MONOTONIC ns when the vCPU stopped for the last pause.
    pub paused_at_ns: Option<u64>,
    /// CLOCK_MONOTONIC ns of the first guest instruction after it was
    /// received here.
    pub resumed_at_ns: Option<u64>,
    /// The thread that runs its vCPU (lab L1s), for tracing at L0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_tid: Option<u32>,
    pub region: Option<RegionState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Which L2s a command applies to; all (that the command can act on) when
/// `vms` is absent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
}

impl Selection {
    pub fn all() -> Self {
        Self { vms: None }
    }

    pub fn of(names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self { vms: Some(names.into_iter().map(Into::into).collect()) }
    }
}

/// `pause`: which L2s, and whether to write each one's CPU state into its
/// own window once stopped (for a receiver that staged it without
/// registers; the L2 then counts as sent, see [`L2State::Sent`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PauseArgs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub save_state: bool,
}

impl PauseArgs {
    pub fn of(names: impl IntoIterator<Item = impl Into<String>>, save_state: bool) -> Self {
        Self { vms: Selection::of(names).vms, save_state }
    }

    pub fn selection(&self) -> Selection {
        Selection { vms: self.vms.clone() }
    }
}

/// `pause`: one L2 stopped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Paused {
    pub name: String,
    pub paused_at_ns: u64,
    pub passes: u64,
}

/// An L2's vCPU registers: all the CPU state the lab workload has (its
/// segments are the fixed flat mode every lab L1 sets up).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// One L2 on its way: everything but its memory, which is the region fd
/// `fd` (an index into the message's fds).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    pub name: String,
    /// The window on the sending L1.
    pub window: Window,
    /// Absent from `lend-regions`: the registers then come in the window,
    /// written by `pause` with `save_state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regs: Option<Regs>,
    pub paused_at_ns: u64,
    pub passes: u64,
    pub fd: usize,
    /// Where the receiver maps it; the sender's window GPA when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_gpa: Option<u64>,
}

/// `send-regions`: fd `vm_fd` is the sender's VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sent {
    pub vm_fd: usize,
    pub vms: Vec<Handoff>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReceiveArgs {
    pub vms: Vec<Handoff>,
}

/// `probe`: pages sampled across one L2's window, and how many of them the
/// VMM (a load: SIGBUS) and the guest (KVM_RUN: EFAULT) could not read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    pub pages: u64,
    pub vmm_denied: u64,
    pub guest_denied: u64,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_read_like_qmp() {
        let r: Request =
            serde_json::from_value(json!({"execute": "pause", "arguments": {"vms": ["a"]}, "id": 7})).unwrap();
        assert_eq!(r.execute, "pause");
        let sel: Selection = serde_json::from_value(r.arguments).unwrap();
        assert_eq!(sel, Selection::of(["a"]));
        let bare: Request = serde_json::from_str(r#"{"execute":"quit"}"#).unwrap();
        assert!(bare.arguments.is_null());
        assert_eq!(serde_json::to_string(&bare).unwrap(), r#"{"execute":"quit"}"#);
    }

    #[test]
    fn unknown_request_fields_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"execute":"x","argumnets":{}}"#).is_err());
        assert!(serde_json::from_value::<Selection>(json!({"vm": ["a"]})).is_err());
    }

    #[test]
    fn replies_carry_return_or_error_and_the_id() {
        let ok = serde_json::to_value(Reply::ok(json!([1]), Some(json!("x")))).unwrap();
        assert_eq!(ok, json!({"return": [1], "id": "x"}));
        let err = serde_json::to_value(Reply::err(ErrorBody::with_errno("no", 1), None)).unwrap();
        assert_eq!(err, json!({"error": {"class": "GenericError", "desc": "no", "errno": 1}}));
        let back: Reply = serde_json::from_value(err).unwrap();
        assert_eq!(back.error.unwrap().class, ErrorClass::GenericError);
    }

    #[test]
    fn l2_states_are_kebab_case() {
        assert_eq!(serde_json::to_value(L2State::Migrated).unwrap(), json!("migrated"));
        assert_eq!(serde_json::from_value::<L2State>(json!("sent")).unwrap(), L2State::Sent);
    }

    #[test]
    fn handoffs_round_trip() {
        let h = Handoff {
            name: "vm0".into(),
            window: Window { gpa: 0x1000_0000, size: 1 << 24 },
            regs: Some(Regs { rip: 0x1043, rsi: 0x1000_0000, ..Default::default() }),
            paused_at_ns: 5,
            passes: 3,
            fd: 1,
            target_gpa: None,
        };
        let v = serde_json::to_value(&h).unwrap();
        assert!(v.get("target_gpa").is_none());
        assert_eq!(serde_json::from_value::<Handoff>(v).unwrap(), h);
        let lent = Handoff { regs: None, ..h };
        let v = serde_json::to_value(&lent).unwrap();
        assert!(v.get("regs").is_none(), "a lent handoff carries no registers: {v}");
        assert_eq!(serde_json::from_value::<Handoff>(v).unwrap(), lent);
    }

    #[test]
    fn pause_saves_state_only_when_asked() {
        let plain: PauseArgs = serde_json::from_value(json!({"vms": ["a"]})).unwrap();
        assert!(!plain.save_state);
        assert_eq!(plain.selection(), Selection::of(["a"]));
        let saving = PauseArgs::of(["a"], true);
        assert_eq!(serde_json::to_value(&saving).unwrap(), json!({"vms": ["a"], "save_state": true}));
        assert_eq!(serde_json::to_value(PauseArgs::of(["a"], false)).unwrap(), json!({"vms": ["a"]}));
        assert!(serde_json::from_value::<PauseArgs>(json!({"save": true})).is_err());
    }

    #[test]
    fn windows_overlap_only_when_they_share_bytes() {
        let a = Window { gpa: 0x1000, size: 0x1000 };
        assert!(a.overlaps(&Window { gpa: 0x1fff, size: 1 }));
        assert!(!a.overlaps(&Window { gpa: 0x2000, size: 0x1000 }));
        assert!(!a.overlaps(&Window { gpa: 0, size: 0x1000 }));
    }
}
