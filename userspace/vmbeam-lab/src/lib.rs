//! vmbeam-lab: a lab L1 hypervisor for vmbeam (library: the binary's parts,
//! and the KVM set-up and probing the selftests share).
//!
//! One KVM VM stands where an L1's QEMU would. Its RAM and each of its L2
//! VMs' memory are vmbeam regions; each L2 is a window of the L1's
//! guest-physical space and a vCPU running a workload that verifies and
//! rewrites every dword of the window, pass after pass, so a pause, a move
//! and a resume are observable and any lost or changed byte is caught.
//! `vmbeamctl` drives it over a control socket (see `vmbeam::control`).
//!
//! ```text
//! vmbeam-lab --socket /run/aged.sock --name aged --l2 4 --l2-size 64M &
//! vmbeam-lab --socket /run/clean.sock --name clean --l2 0 &
//! vmbeamctl migrate-all --from /run/aged.sock --to /run/clean.sock
//! ```

pub mod cpu;
pub mod kvm_stats;
pub mod kvm_util;
pub mod l1;
pub mod l2;
pub mod probe;
pub mod saved_state;
pub mod server;
pub mod workload;
