//! An L2 in its downtime goes first on the L1's CPUs.
//!
//! While one L2 is stopped for a move or an upgrade, the others keep
//! running in the same L1, and with an equal share of its vCPUs they slow
//! the save or the load the stopped L2 is waiting for (measured, one vCPU
//! per L1, `migrate-all --one-at-a-time` with two L2s: the first L2's save
//! took 250–330 ms beside the other L2's workload and 140–180 ms for the
//! second, with nothing else running). So from its stop to its `cont` the
//! L2's QEMU runs at [`IN_DOWNTIME`], and the agent itself, whose requests
//! are all inside some L2's downtime when it has any work, always does.
//!
//! Linux keeps a nice value per thread, and a new thread starts with its
//! creator's: [`set`] renices every thread of a QEMU, and the migration
//! thread QEMU starts for a save (from its main thread) inherits it.

use std::{io, os::unix::process::CommandExt, process::Command};

/// The nice value of a QEMU whose L2 is stopped (CFS weight 9,548 against
/// 1,024 at 0: about nine tenths of a contended vCPU), and of the agent.
pub const IN_DOWNTIME: i32 = -10;
/// Every other QEMU's.
pub const RUNNING: i32 = 0;

/// Sets the nice value of every thread of process `pid`.
pub fn set(pid: u32, nice: i32) -> io::Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(tid) = entry?.file_name().to_string_lossy().parse::<libc::id_t>() else { continue };
        // SAFETY: setpriority takes plain integers and touches no memory
        // of ours; on Linux PRIO_PROCESS with a thread id sets that thread.
        let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        // A thread that ended since the listing is no error.
        if ret != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the process `cmd` starts begin at [`RUNNING`], not at the
/// agent's own value (a child inherits its parent's).
pub fn start_running(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec; it
    // makes one system call (async-signal-safe) and allocates nothing.
    // Its failure (an unprivileged agent above 0 cannot come down) leaves
    // the child where the agent is, below the L2s' priority in downtime.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, RUNNING);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_begins_at_running_and_every_thread_gets_a_value() {
        // Lowering priority needs no privilege: 5 here, then our own 0 is
        // out of reach unprivileged, so a child process is the subject.
        let nice_of = |pid: u32| -> i32 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            // Field 19 is nice; the fields after the command's ")" start at 3.
            stat.rsplit_once(')').unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap()
        };
        let ours = nice_of(std::process::id());
        let mut child = start_running(Command::new("sleep").arg("5")).spawn().unwrap();
        let started = nice_of(child.id());
        set(child.id(), 5).unwrap();
        let set_to = nice_of(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        let can_come_down = ours <= RUNNING || nix::unistd::geteuid().is_root();
        assert_eq!((started, set_to), (if can_come_down { RUNNING } else { ours }, 5));
    }
}
