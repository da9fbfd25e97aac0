//! Errors with the errno and its meaning for the call that failed.

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/vmbeam` does not exist.
    #[error(
        "{path} not found: vmbeam.ko is not loaded (load it with `insmod vmbeam.ko` as root; `make module` builds it)"
    )]
    NotLoaded { path: &'static str },
    /// Opening `/dev/vmbeam` failed.
    #[error("cannot open {path}: {errno} ({}): {}", errno.desc(), open_meaning(*errno))]
    Open { path: &'static str, errno: Errno },
    /// An ioctl failed.
    #[error("{op}: {errno} ({}): {}", errno.desc(), ioctl_meaning(*errno))]
    Ioctl { op: &'static str, errno: Errno },
    /// Reading `/proc/PID/pagemap` failed.
    #[error("/proc/{pid}/pagemap: {source}")]
    Pagemap { pid: u32, source: std::io::Error },
}

impl Error {
    /// The errno behind this error, if any.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::NotLoaded { .. } => Some(Errno::ENOENT),
            Error::Open { errno, .. } | Error::Ioctl { errno, .. } => Some(*errno),
            Error::Pagemap { source, .. } => source.raw_os_error().map(Errno::from_raw),
        }
    }
}

fn open_meaning(errno: Errno) -> &'static str {
    match errno {
        Errno::EACCES => "the device is mode 0600, owned by root: run as root",
        Errno::EPERM => "vmbeam needs CAP_SYS_ADMIN",
        _ => "unexpected error opening the device",
    }
}

fn ioctl_meaning(errno: Errno) -> &'static str {
    match errno {
        Errno::ENOTTY => "the module does not know this command (module and vmbeamctl from different versions?)",
        Errno::EINVAL => "the module rejected the argument (a fd that is not a region or KVM VM, a bad size or offset, unknown flags, nonzero reserved words, or a uAPI mismatch)",
        Errno::EFAULT => "the argument is not accessible memory",
        Errno::EBUSY => "the region is owned by a live VM or already moving",
        Errno::EBADF => "a file descriptor in the request is not open",
        Errno::ESRCH => "the KVM VM is being destroyed, or the region's owner has exited",
        Errno::EOPNOTSUPP => "not for this kind of region (a 4 KiB region's frames are in /proc/PID/pagemap)",
        Errno::EINTR => "interrupted by a fatal signal",
        Errno::ENOMEM => "out of memory",
        Errno::EPERM => "not permitted: the VM is not the region's owner, or the caller did not create it (frame numbers need CAP_SYS_ADMIN)",
        Errno::EACCES => "not permitted for this caller",
        Errno::EEXIST => "a destination page of the gather is present already (only missing pages can be filled)",
        _ => "unexpected error from the module",
    }
}
