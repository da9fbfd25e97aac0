//! The client side: connect, check the greeting, call commands.

use std::{
    os::{
        fd::{BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

use super::{CodecError, Connection, ErrorClass, Greeting, Reply, Request, ServerInfo};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("{}: no vmbeam control greeting ({detail}); is this an L1 control socket?", path.display())]
    NotAnL1 { path: PathBuf, detail: String },
    #[error("{name}: `{command}`: {source}")]
    Codec { name: String, command: String, source: CodecError },
    #[error("{name}: `{command}` failed: {desc}{}", errno.map(|e| format!(" ({})", nix::errno::Errno::from_raw(e).desc())).unwrap_or_default())]
    Remote { name: String, command: String, class: ErrorClass, desc: String, errno: Option<i32> },
    #[error("{name}: `{command}`: unexpected reply: {detail}")]
    BadReply { name: String, command: String, detail: String },
}

/// A connection to one L1's control socket.
#[derive(Debug)]
pub struct Client {
    conn: Connection,
    server: ServerInfo,
    path: PathBuf,
}

impl Client {
    /// Connects and reads the greeting; every later reply must come within
    /// `timeout`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ControlError> {
        let path = path.as_ref().to_path_buf();
        let mut conn = open(&path, timeout)?;
        let server = match conn.recv::<Greeting>() {
            Ok((g, _)) => g.greeting,
            Err(e) => return Err(ControlError::NotAnL1 { path, detail: e.to_string() }),
        };
        Ok(Self { conn, server, path })
    }

    /// Connects to an in-L1 agent (`vmbeam-agent`) through its
    /// virtio-serial socket. A virtio port carries no connections: the agent
    /// cannot tell a new client from the last, so it greets only when asked,
    /// and the client asks with a nonce and skips whatever a client before
    /// it left unread (or half-written: the newline first ends that line).
    pub fn connect_agent(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, ControlError> {
        let path = path.as_ref().to_path_buf();
        let mut conn = open(&path, timeout)?;
        let nonce = format!("{}.{:?}", std::process::id(), std::time::SystemTime::now());
        let not_an_agent = |detail: String| ControlError::NotAnL1 { path: path.clone(), detail };
        let hello =
            Request { execute: "greeting".into(), arguments: Value::Null, id: Some(Value::from(nonce.clone())) };
        // Asked again every couple of seconds: a request that reached the
        // agent between two clients may have been taken for the last one's.
        let deadline = std::time::Instant::now() + timeout;
        let retry = Duration::from_secs(2).min(timeout);
        let _ = conn.stream().set_read_timeout(Some(retry));
        while std::time::Instant::now() < deadline {
            conn.send_raw(b"\n", &[]).map_err(|e| not_an_agent(e.to_string()))?;
            conn.send(&hello, &[]).map_err(|e| not_an_agent(e.to_string()))?;
            loop {
                match conn.recv::<Value>() {
                    Ok((v, _)) if v.get("id") == Some(&Value::from(nonce.clone())) => {
                        let g: Greeting = serde_json::from_value(v).map_err(|e| not_an_agent(e.to_string()))?;
                        let _ = conn.stream().set_read_timeout(Some(timeout));
                        // Replies to our repeated requests may follow: the
                        // next call skips lines without its own shape.
                        return Ok(Self { conn, server: g.greeting, path });
                    }
                    Ok(_) | Err(CodecError::Json(_)) => continue, // left by an earlier client
                    Err(CodecError::Timeout) => break,
                    Err(e) => return Err(not_an_agent(e.to_string())),
                }
            }
        }
        Err(not_an_agent(format!("no greeting within {timeout:?}")))
    }

    /// Who answered.
    pub fn server(&self) -> &ServerInfo {
        &self.server
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the reply timeout.
    pub fn set_timeout(&self, timeout: Duration) {
        let _ = self.conn.stream().set_read_timeout(Some(timeout));
    }

    /// Runs `command` and parses its return value.
    pub fn call<T: DeserializeOwned>(&mut self, command: &str, arguments: impl Serialize) -> Result<T, ControlError> {
        Ok(self.call_with_fds(command, arguments, &[])?.0)
    }

    /// Runs `command` with `fds` attached; returns the value and the fds
    /// that came back.
    pub fn call_with_fds<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: impl Serialize,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(T, Vec<OwnedFd>), ControlError> {
        let codec = |source| ControlError::Codec { name: self.server.name.clone(), command: command.into(), source };
        let bad =
            |detail: String| ControlError::BadReply { name: self.server.name.clone(), command: command.into(), detail };
        let arguments = serde_json::to_value(arguments).map_err(|e| bad(e.to_string()))?;
        let request = Request { execute: command.into(), arguments, id: None };
        self.conn.send(&request, fds).map_err(codec)?;
        let (reply, fds): (Reply, _) = loop {
            let (value, fds): (Value, _) = self.conn.recv().map_err(codec)?;
            // A greeting here answers a repeated `greeting` request of
            // `connect_agent`: not this command's reply.
            if value.get("greeting").is_none() {
                break (serde_json::from_value(value).map_err(|e| codec(CodecError::Json(e)))?, fds);
            }
        };
        match (reply.ret, reply.error) {
            (_, Some(e)) => Err(ControlError::Remote {
                name: self.server.name.clone(),
                command: command.into(),
                class: e.class,
                desc: e.desc,
                errno: e.errno,
            }),
            (Some(v), None) => Ok((serde_json::from_value(v).map_err(|e| bad(e.to_string()))?, fds)),
            (None, None) => Err(bad("neither `return` nor `error`".into())),
        }
    }

    /// Sends raw bytes and returns the raw reply (for tests of bad input).
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value, CodecError> {
        self.conn.send_raw(bytes, &[])?;
        Ok(self.conn.recv::<Value>()?.0)
    }
}

/// A connection to the socket at `path` whose reads and writes time out.
fn open(path: &Path, timeout: Duration) -> Result<Connection, ControlError> {
    let connect = |source| ControlError::Connect { path: path.to_path_buf(), source };
    let stream = UnixStream::connect(path).map_err(connect)?;
    stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout))).map_err(connect)?;
    Ok(Connection::new(stream))
}
