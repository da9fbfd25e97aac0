//! An L2's migration stream between its QEMU and the agent, over a Unix
//! socket (QEMU's `unix:` migration URIs). No shell and no file: QEMU
//! 7.2's `exec:` URIs fork a shell and a `cat` per save and per load, a
//! cost inside the L2's downtime that an L1 under nested virtualization
//! pays dearly. Each transfer runs in a thread of its own, so several L2s
//! save or load side by side while the agent goes on serving requests.

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use anyhow::{anyhow, Context, Result};

/// A stream QEMU sends out (`migrate`), read by the agent.
pub struct Outgoing {
    path: PathBuf,
    reader: JoinHandle<std::io::Result<Vec<u8>>>,
}

impl Outgoing {
    /// Listens at `path`; QEMU's `migrate` to [`Self::uri`] connects.
    pub fn listen(path: PathBuf) -> Result<Self> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).with_context(|| path.display().to_string())?;
        let reader = std::thread::spawn(move || {
            let (mut from_qemu, _) = listener.accept()?;
            let mut stream = Vec::new();
            from_qemu.read_to_end(&mut stream)?;
            Ok(stream)
        });
        Ok(Self { path, reader })
    }

    pub fn uri(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// The stream, once QEMU's migration has ended: `completed` (its end
    /// closed the connection), or not, when QEMU may never have connected
    /// and the reader is let go with an empty stream.
    pub fn collect(self, completed: bool) -> Result<Vec<u8>> {
        if !completed {
            let _ = UnixStream::connect(&self.path);
        }
        let stream = self.reader.join().map_err(|_| anyhow!("the stream's reader panicked"))?;
        let _ = std::fs::remove_file(&self.path);
        stream.context("reading QEMU's migration stream")
    }
}

/// A stream written into a QEMU that listens (`migrate-incoming`).
pub struct Incoming {
    writer: JoinHandle<std::io::Result<()>>,
}

impl Incoming {
    /// The URI QEMU listens at: `path`.
    pub fn uri(path: &Path) -> String {
        format!("unix:{}", path.display())
    }

    /// Connects to the QEMU listening at `path` and writes the stream in
    /// the background.
    pub fn send(path: PathBuf, stream: Vec<u8>) -> Self {
        let writer = std::thread::spawn(move || {
            let mut to_qemu = UnixStream::connect(&path)?;
            to_qemu.write_all(&stream)
        });
        Self { writer }
    }

    /// Waits for the write to end (QEMU read it all, or closed on a failure).
    pub fn finish(self) -> Result<()> {
        let written = self.writer.join().map_err(|_| anyhow!("the stream's writer panicked"))?;
        written.context("writing the migration stream to QEMU")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_goes_out_and_in_whole() {
        let dir = std::env::temp_dir();
        let out = Outgoing::listen(dir.join(format!("vmbeam-out-{}.sock", std::process::id()))).unwrap();
        let path = out.path.clone();
        let sent: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        // As QEMU would: connect, write, close.
        let expected = sent.clone();
        let qemu = std::thread::spawn(move || UnixStream::connect(&path).unwrap().write_all(&expected).unwrap());
        qemu.join().unwrap();
        assert_eq!(out.collect(true).unwrap(), sent);

        let path = dir.join(format!("vmbeam-in-{}.sock", std::process::id()));
        let listener = UnixListener::bind(&path).unwrap();
        let incoming = Incoming::send(path.clone(), sent.clone());
        let mut got = Vec::new();
        listener.accept().unwrap().0.read_to_end(&mut got).unwrap();
        incoming.finish().unwrap();
        assert_eq!(got, sent);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_save_that_never_connects_lets_its_reader_go() {
        let path = std::env::temp_dir().join(format!("vmbeam-none-{}.sock", std::process::id()));
        let out = Outgoing::listen(path.clone()).unwrap();
        assert_eq!(out.collect(false).unwrap(), Vec::<u8>::new());
        assert!(!path.exists());
    }
}
