//! The L1 control protocol: how `vmbeamctl` drives an L1 hypervisor's VMM.
//!
//! Newline-delimited JSON over a Unix stream socket, in the style of QEMU's
//! QMP: the server greets, then each request `{"execute": NAME,
//! "arguments": {...}}` gets exactly one reply, `{"return": ...}` or
//! `{"error": {"class": ..., "desc": ...}}`. File descriptors (VM fds, region
//! fds) travel with a message as SCM_RIGHTS; the message names them by index.
//!
//! ```no_run
//! use vmbeam::control::{Client, L1Status};
//! let mut l1 = Client::connect("/run/vmbeam/aged.sock", std::time::Duration::from_secs(5))?;
//! let status: L1Status = l1.call("query-status", serde_json::Value::Null)?;
//! println!("{} hosts {} L2 VMs", status.name, status.l2_vms);
//! # Ok::<(), vmbeam::control::ControlError>(())
//! ```
//!
//! The lab VMM (`vmbeam-lab`) serves the L1 commands ([`COMMANDS`]); the
//! agent inside a real L1 (`vmbeam-agent`) serves [`agent`]'s.

pub mod agent;
mod client;
mod codec;
mod protocol;
pub mod state_window;

pub use client::{Client, ControlError};
pub use codec::{CodecError, Connection, MAX_FDS, MAX_LINE};
pub use protocol::*;
