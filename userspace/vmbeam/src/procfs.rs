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

/// Which file a fd or mapping is: its filesystem's device and its inode.
/// An inode number alone is not enough: filesystems count their inodes
/// apart, so a region's (on the anonymous-inode filesystem) may be the
/// number of another file QEMU holds, `/dev/kvm` on devtmpfs say, and a
/// match on it alone gives QEMU that fd as a window's `mem-path` (the
/// likely cause of one "unable to map backing store for guest RAM: No
/// such device": `/dev/kvm` has no `mmap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The file `fd` is open on.
    pub fn of(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self::from(&std::fs::File::from(fd.try_clone_to_owned()?).metadata()?))
    }

    /// Whether `/proc/PID/maps`' device field (`MM:mm`, hex) is this
    /// file's device.
    fn is_maps_dev(&self, field: &str) -> bool {
        let Some((major, minor)) = field.split_once(':') else { return false };
        let (Ok(major), Ok(minor)) = (u32::from_str_radix(major, 16), u32::from_str_radix(minor, 16)) else {
            return false;
        };
        libc::makedev(major, minor) == self.dev
    }
}

impl From<&std::fs::Metadata> for FileId {
    fn from(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self { dev: m.dev(), ino: m.ino() }
    }
}

/// The lowest number of a fd of `pid` open on `file` (stat through
/// `/proc/PID/fd/N` follows to the file: anon inodes included).
pub fn fd_of_file(pid: u32, file: FileId) -> io::Result<Option<i32>> {
    let mut found = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        if std::fs::metadata(entry.path()).is_ok_and(|m| FileId::from(&m) == file) {
            let n: Option<i32> = entry.file_name().to_str().and_then(|s| s.parse().ok());
            found = found.min(n).or(n);
        }
    }
    Ok(found)
}

/// The start address of `pid`'s first mapping of `file` (a region's),
/// from `/proc/PID/maps`.
pub fn mapping_of_file(pid: u32, file: FileId) -> io::Result<Option<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let range = f.next()?;
        let dev = f.nth(2)?;
        let inode: u64 = f.next()?.parse().ok()?;
        (inode == file.ino && file.is_maps_dev(dev))
            .then(|| u64::from_str_radix(range.split('-').next()?, 16).ok())
            .flatten()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_file_is_found_by_device_and_inode_not_by_inode_alone() {
        let exe = std::fs::File::open("/proc/self/exe").unwrap();
        let id = FileId::of(exe.as_fd()).unwrap();
        let pid = std::process::id();
        // This process holds it open (above) and maps it (its own code).
        assert!(fd_of_file(pid, id).unwrap().is_some());
        assert!(mapping_of_file(pid, id).unwrap().is_some());
        // The same inode number on another device is another file.
        let elsewhere = FileId { dev: id.dev ^ 1, ino: id.ino };
        assert_eq!(fd_of_file(pid, elsewhere).unwrap(), None);
        assert_eq!(mapping_of_file(pid, elsewhere).unwrap(), None);
    }
}
