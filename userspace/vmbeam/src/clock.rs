//! The one clock of every stamp in a migration: CLOCK_MONOTONIC, the
//! clock of KVM's and vmbeam's tracepoints (and of a tracefs instance on
//! `trace_clock=mono`), comparable between the processes of one kernel.

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}
