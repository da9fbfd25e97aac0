//! The agent's link to L0: a virtio-serial port, or a Unix socket in tests.
//!
//! A virtio-serial port has no `accept`: the guest side sees the host side
//! connect as `poll` stopping to report `POLLHUP`, and disconnect as a read
//! of 0 bytes (drivers/char/virtio_console.c); a client that leaves and the
//! next that comes can fall between two reads unseen. So the agent never
//! greets unasked: each client starts with a `greeting` request whose id
//! it waits for (`vmbeam::control::Client::connect_agent`).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::{
        fd::AsFd,
        unix::net::{UnixListener, UnixStream},
    },
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub enum Link {
    Virtio(File),
    Unix(UnixListener),
}

pub enum Stream {
    Virtio(File),
    Unix(UnixStream),
}

impl Link {
    /// The virtio-serial port named `name`, opened once for the agent's
    /// life (it allows one opener at a time).
    pub fn virtio(name: &str) -> Result<Self> {
        let dir = Path::new("/sys/class/virtio-ports");
        for _ in 0..100 {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let named = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
                if named.trim() == name {
                    let dev = Path::new("/dev").join(entry.file_name());
                    let file = OpenOptions::new().read(true).write(true).open(&dev);
                    return Ok(Link::Virtio(file.with_context(|| dev.display().to_string())?));
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

    /// Waits for L0 to connect. A virtio port has no connections to tell
    /// apart: this waits until a host side is there, and L0 clients open
    /// each session with a `greeting` request carrying a nonce, so whatever
    /// a client before them left behind is told apart by its id.
    pub fn accept(&mut self) -> Result<Stream> {
        match self {
            Link::Unix(l) => Ok(Stream::Unix(l.accept()?.0)),
            Link::Virtio(file) => loop {
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(1000u16))?;
                let hup = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP));
                if !hup {
                    return Ok(Stream::Virtio(file.try_clone()?));
                }
                std::thread::sleep(Duration::from_millis(50));
            },
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
