//! Framing: one JSON value per line, fds attached as SCM_RIGHTS.
//!
//! Both sides keep at most one message in flight (request, then reply), so
//! the fds that arrive while a line is read belong to that line.

use std::{
    io::{IoSlice, IoSliceMut},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::{
    errno::Errno,
    sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags},
};

/// Longest line accepted (bytes, newline excluded).
pub const MAX_LINE: usize = 1 << 20;
/// Most fds in one message: the kernel's SCM_MAX_FD.
pub const MAX_FDS: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("message longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("{count} fds in one message (at most {MAX_FDS})")]
    TooManyFds { count: usize },
    #[error("no reply within the timeout")]
    Timeout,
    #[error("socket: {errno} ({})", errno.desc())]
    Socket { errno: Errno },
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One end of a control connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Connection {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream, buf: Vec::new(), fds: Vec::new() }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `value` as one line, with `fds` attached.
    pub fn send(&self, value: &impl serde::Serialize, fds: &[BorrowedFd<'_>]) -> Result<(), CodecError> {
        if fds.len() > MAX_FDS {
            return Err(CodecError::TooManyFds { count: fds.len() });
        }
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        self.send_raw(&line, fds)
    }

    /// Sends `bytes` as they are (tests use it for malformed input).
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), CodecError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            let cmsg = [ControlMessage::ScmRights(&raw)];
            // The fds ride with the first chunk only.
            let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() { &cmsg } else { &[] };
            let iov = [IoSlice::new(&bytes[sent..])];
            match sendmsg::<()>(self.stream.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(CodecError::Timeout),
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(CodecError::Closed),
                Err(errno) => return Err(CodecError::Socket { errno }),
            }
        }
        Ok(())
    }

    /// The next line and the fds that came with it.
    pub fn recv_line(&mut self) -> Result<(Vec<u8>, Vec<OwnedFd>), CodecError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                return Ok((line, std::mem::take(&mut self.fds)));
            }
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                return Err(CodecError::TooLong);
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let msg =
                match recvmsg::<()>(self.stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                    Ok(msg) => msg,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return Err(CodecError::Timeout),
                    Err(Errno::ECONNRESET) => return Err(CodecError::Closed),
                    Err(errno) => return Err(CodecError::Socket { errno }),
                };
            let n = msg.bytes;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: fds just received with this message: nothing
                        // else owns them.
                        self.fds.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
            }
            if n == 0 {
                return Err(if self.buf.is_empty() { CodecError::Closed } else { CodecError::Truncated });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next line, parsed.
    pub fn recv<T: serde::de::DeserializeOwned>(&mut self) -> Result<(T, Vec<OwnedFd>), CodecError> {
        let (line, fds) = self.recv_line()?;
        Ok((serde_json::from_slice(&line)?, fds))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use serde_json::{json, Value};

    use super::*;

    fn pair() -> (Connection, Connection) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a), Connection::new(b))
    }

    #[test]
    fn a_line_and_its_fds_arrive_together() {
        let (a, mut b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(&json!({"execute": "x"}), &[file.as_fd(), file.as_fd()]).unwrap();
        let (v, fds): (Value, _) = b.recv().unwrap();
        assert_eq!(v, json!({"execute": "x"}));
        assert_eq!(fds.len(), 2);
    }

    #[test]
    fn lines_split_and_joined_by_the_stream_parse_one_by_one() {
        let (a, mut b) = pair();
        a.send_raw(b"{\"a\":1}\n{\"b\"", &[]).unwrap();
        a.send_raw(b":2}\n", &[]).unwrap();
        assert_eq!(b.recv::<Value>().unwrap().0, json!({"a": 1}));
        assert_eq!(b.recv::<Value>().unwrap().0, json!({"b": 2}));
    }

    #[test]
    fn garbage_is_a_json_error_and_the_next_line_still_parses() {
        let (a, mut b) = pair();
        a.send_raw(b"\x00\xffnot json\n{}\n", &[]).unwrap();
        assert!(matches!(b.recv::<Value>(), Err(CodecError::Json(_))));
        assert_eq!(b.recv::<Value>().unwrap().0, json!({}));
    }

    #[test]
    fn eof_mid_line_is_truncated_and_clean_eof_is_closed() {
        let (a, mut b) = pair();
        a.send_raw(b"{\"half\":", &[]).unwrap();
        drop(a);
        assert!(matches!(b.recv_line(), Err(CodecError::Truncated)));
        let (a, mut b) = pair();
        drop(a);
        assert!(matches!(b.recv_line(), Err(CodecError::Closed)));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let (a, mut b) = pair();
        let writer = std::thread::spawn(move || {
            let big = vec![b'x'; MAX_LINE + 64 * 1024];
            let _ = a.send_raw(&big, &[]);
            a
        });
        assert!(matches!(b.recv_line(), Err(CodecError::TooLong)));
        drop(b);
        let _ = writer.join();
    }

    #[test]
    fn too_many_fds_are_refused_before_sending() {
        let (a, _b) = pair();
        let file = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![file.as_fd(); MAX_FDS + 1];
        assert!(matches!(a.send(&json!({}), &fds), Err(CodecError::TooManyFds { count }) if count == MAX_FDS + 1));
    }

    #[test]
    fn a_read_timeout_is_reported_as_such() {
        let (_a, mut b) = pair();
        b.stream().set_read_timeout(Some(std::time::Duration::from_millis(20))).unwrap();
        assert!(matches!(b.recv_line(), Err(CodecError::Timeout)));
    }
}
