//! Reaching another process's fds and mappings: how vmbeamctl finds what a
//! QEMU holds. QEMU creates its KVM VM and opens its RAM's mem-path itself,
//! so the VM fd and the region fds to name in ioctls are QEMU's; the
//! holder of `/dev/vmbeam` (root) takes copies with `pidfd_getfd(2)`.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

/// A pidfd of process `pid` (`pidfd_open(2)`): names that process and no
/// later one that reuses its number.
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd as i32) })
}

/// Blocks until the process behind `pidfd` has exited (its pidfd polls
/// readable then), however it ended; any process, not only a child.
pub fn wait_exit(pidfd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(pidfd.as_fd(), nix::poll::PollFlags::POLLIN)];
    loop {
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A copy of fd `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`;
/// needs ptrace access to the process: root).
pub fn take_fd(pid: u32, fd: i32) -> io::Result<OwnedFd> {
    let pidfd = pidfd(pid)?;
    // SAFETY: pidfd_getfd(2) with our pidfd, the target's fd number and no
    // flags; returns a new close-on-exec fd or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// The numbers of `pid`'s fds whose link reads `target` (e.g.
/// `anon_inode:kvm-vm` for KVM VM fds).
pub fn fds_linking_to(pid: u32, target: &str) -> io::Result<Vec<i32>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        if link.as_os_str() == target {
            if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                found.push(n);
            }
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The number of a fd of `pid` open on the file with inode `ino` (stat
/// through `/proc/PID/fd/N` follows to the file: anon inodes included).
pub fn fd_of_inode(pid: u32, ino: u64) -> io::Result<Option<i32>> {
    use std::os::unix::fs::MetadataExt;
    let mut found = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.ino() == ino) {
            let n: Option<i32> = entry.file_name().to_str().and_then(|s| s.parse().ok());
            found = found.min(n).or(n);
        }
    }
    Ok(found)
}

/// The start address of `pid`'s first mapping of the file with inode
/// `ino` (a region's), from `/proc/PID/maps`.
pub fn mapping_of_inode(pid: u32, ino: u64) -> io::Result<Option<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let inode: u64 = f.nth(3)?.parse().ok()?;
        (inode == ino).then(|| u64::from_str_radix(range.split('-').next()?, 16).ok()).flatten()
    }))
}
