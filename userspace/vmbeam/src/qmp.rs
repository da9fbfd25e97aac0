//! A small QMP client: QEMU's monitor protocol over a Unix socket.
//!
//! QMP frames one JSON object per line, as `vmbeam::control` does, so the
//! same [`Connection`] carries it, fds included (`add-fd` and `getfd` take
//! their fd as SCM_RIGHTS with the command). Asynchronous events that
//! arrive between a command and its reply are kept in [`Qmp::events`].
//!
//! ```no_run
//! let mut qmp = vmbeam::qmp::Qmp::connect("/run/l1.qmp", std::time::Duration::from_secs(5))?;
//! let status = qmp.execute("query-status", serde_json::json!({}))?;
//! println!("running: {}", status["running"]);
//! # Ok::<(), vmbeam::qmp::QmpError>(())
//! ```

use std::{
    os::{fd::BorrowedFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::control::{CodecError, Connection};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}: {source}", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("{}: not a QMP socket (no QMP greeting: {detail})", path.display())]
    NotQmp { path: PathBuf, detail: String },
    #[error("QMP `{command}`: {source}")]
    Codec { command: String, source: CodecError },
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Failed { command: String, class: String, desc: String },
    #[error("QMP `{command}`: timed out waiting for {what}")]
    Timeout { command: String, what: String },
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    conn: Connection,
    /// QEMU's version from the greeting, e.g. "7.2.22".
    pub version: String,
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and enters command mode
    /// (`qmp_capabilities`); every reply must come within `timeout`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| QmpError::Connect { path: path.clone(), source })?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|source| QmpError::Connect { path: path.clone(), source })?;
        let mut conn = Connection::new(stream);
        let greeting: Value =
            conn.recv().map(|(v, _)| v).map_err(|e| QmpError::NotQmp { path: path.clone(), detail: e.to_string() })?;
        let Some(v) = greeting.get("QMP").and_then(|q| q.get("version")).and_then(|v| v.get("qemu")) else {
            return Err(QmpError::NotQmp { path, detail: format!("greeting {greeting}") });
        };
        let version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        let mut qmp = Self { conn, version, events: Vec::new() };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_fds(command, arguments, &[])
    }

    /// Runs `command` with `fds` attached (SCM_RIGHTS).
    pub fn execute_with_fds(
        &mut self,
        command: &str,
        arguments: Value,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Value, QmpError> {
        let codec = |source| QmpError::Codec { command: command.into(), source };
        self.conn.send(&json!({"execute": command, "arguments": arguments}), fds).map_err(codec)?;
        loop {
            let (reply, _): (Value, _) = self.conn.recv().map_err(codec)?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let err = &reply["error"];
            return Err(QmpError::Failed {
                command: command.into(),
                class: err["class"].as_str().unwrap_or("?").into(),
                desc: err["desc"].as_str().unwrap_or("no description").into(),
            });
        }
    }

    /// Polls `query-migrate` until the migration has completed; fails on
    /// `failed`/`cancelled` or after `timeout`.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(info),
                Some(s @ ("failed" | "cancelled")) => {
                    return Err(QmpError::Failed {
                        command: "migrate".into(),
                        class: s.into(),
                        desc: info["error-desc"].as_str().unwrap_or("no description").into(),
                    })
                }
                _ if Instant::now() > deadline => {
                    return Err(QmpError::Timeout { command: "query-migrate".into(), what: "completion".into() })
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}
