//! The agent's link to L0: a virtio-serial port, or a Unix socket in tests.
//!
//! A virtio-serial port has no `accept`: the guest side sees the host side
//! connect as `poll` stopping to report `POLLHUP`, and disconnect as a read
//! of 0 bytes (drivers/char/virtio_console.c). So a session starts when
//! the hang-up clears and ends at end-of-file; then the port is reopened
//! (it allows one opener at a time) and the agent waits again.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub enum Link {
    Virtio(PathBuf),
    Unix(UnixListener),
}

pub enum Stream {
    Virtio(File),
    Unix(UnixStream),
}

impl Link {
    /// The virtio-serial port named `name`.
    pub fn virtio(name: &str) -> Result<Self> {
        let dir = Path::new("/sys/class/virtio-ports");
        for _ in 0..100 {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if named.trim() == name {
                    return Ok(Link::Virtio(Path::new("/dev").join(entry.file_name())));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(anyhow!("no virtio-serial port named {name} in {}", dir.display()))
    }

    pub fn listen(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        Ok(Link::Unix(UnixListener::bind(path).with_context(|| path.display().to_string())?))
    }

    /// Waits for L0 to connect.
    pub fn accept(&mut self) -> Result<Stream> {
        match self {
            Link::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
            Link::Virtio(dev) => {
                let file =
                    OpenOptions::new().read(true).write(true).open(&*dev).with_context(|| dev.display().to_string())?;
                loop {
                    let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
                    poll(&mut fds, PollTimeout::from(1000u16))?;
                    let hup = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP));
                    if !hup {
                        return Ok(Stream::Virtio(file));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Stream {
    pub fn try_clone(&self) -> Result<Stream> {
        Ok(match self {
            Stream::Virtio(f) => Stream::Virtio(f.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Virtio(f) => f.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Virtio(f) => f.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Virtio(f) => f.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}
