//! A small QMP client: QEMU's monitor protocol over a Unix socket.
//!
//! QMP frames one JSON object per line, as `vmbeam::control` does, so the
//! same [`Connection`] carries it, fds included (`add-fd` and `getfd` take
//! their fd as SCM_RIGHTS with the command). Asynchronous events that
//! arrive between a command and its reply are kept in [`Qmp::events`]
//! (the newest [`MAX_EVENTS`]).
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

/// Events a session keeps: it lives as long as its QEMU, and QEMU sends
/// some at every `stop`, `cont` and migration.
pub const MAX_EVENTS: usize = 256;

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    conn: Connection,
    /// QEMU's version from the greeting, e.g. "7.2.22".
    pub version: String,
    /// Events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
    /// QEMU sends `MIGRATION` events (the `events` capability is on).
    migration_events: bool,
    /// When [`Qmp::migrate`] last started an outgoing migration.
    migrate_sent: Option<Instant>,
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
        let mut qmp = Self { conn, version, events: Vec::new(), migration_events: false, migrate_sent: None };
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
                self.keep_event(reply);
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

    fn keep_event(&mut self, event: Value) {
        if self.events.len() >= MAX_EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    /// Turns on these migration capabilities (`migrate-set-capabilities`).
    /// With `events` among them, [`Qmp::wait_migration`] sleeps until
    /// QEMU's `MIGRATION` event says the migration ended, instead of
    /// asking every 10 ms: each `query-migrate` is a round trip through
    /// QEMU's main loop, under nested TCG on the vCPU that is saving or
    /// loading the very state waited for.
    pub fn set_migration_capabilities(&mut self, names: &[&str]) -> Result<(), QmpError> {
        let caps: Vec<Value> = names.iter().map(|name| json!({"capability": name, "state": true})).collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        self.migration_events |= names.contains(&"events");
        Ok(())
    }

    /// Starts an outgoing migration to `uri` (`migrate`), which
    /// [`Qmp::wait_migration`] then waits for.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.migrate_sent = Some(Instant::now());
        self.execute("migrate", json!({ "uri": uri })).map(drop)
    }

    /// Waits until the migration has completed and returns its
    /// `query-migrate` (its `total-time` and so on); fails on
    /// `failed`/`cancelled` or after `timeout`. With `MIGRATION` events
    /// on, asks once QEMU said it ended; without, every 10 ms.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        if self.migration_events {
            self.wait_migration_event(deadline)?;
        }
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => return Ok(self.with_total_time(info)),
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

    /// QEMU sets `total-time` only after its `completed` event, so the
    /// query right after the event can read 0: then the time since
    /// [`Qmp::migrate`], within a QMP round trip of QEMU's own.
    fn with_total_time(&self, mut info: Value) -> Value {
        if let (0, Some(sent)) = (info["total-time"].as_u64().unwrap_or(0), self.migrate_sent) {
            info["total-time"] = json!(sent.elapsed().as_millis() as u64);
        }
        info
    }

    /// Reads events until a `MIGRATION` one with an end state (completed,
    /// failed, cancelled), kept or new, or `deadline`. The one found and
    /// the `MIGRATION` events before it are used up; a stale one (a
    /// migration that ended before) costs one `query-migrate`, which then
    /// polls as without events.
    fn wait_migration_event(&mut self, deadline: Instant) -> Result<(), QmpError> {
        let is_migration = |e: &Value| e["event"] == "MIGRATION";
        let ended = |e: &Value| {
            is_migration(e) && matches!(e["data"]["status"].as_str(), Some("completed" | "failed" | "cancelled"))
        };
        if let Some(at) = self.events.iter().position(ended) {
            let (used, rest) = self.events.split_at(at + 1);
            self.events = used.iter().filter(|e| !is_migration(e)).chain(rest).cloned().collect();
            return Ok(());
        }
        // The session's own bound (`connect`'s timeout) for each read, so
        // that the deadline is checked at least that often.
        let usual = self.conn.stream().read_timeout().ok().flatten();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(QmpError::Timeout { command: "migrate".into(), what: "its MIGRATION event".into() });
            }
            // Fails only for a zero duration, which `left` is not.
            let _ = self.conn.stream().set_read_timeout(Some(usual.map_or(left, |u| u.min(left))));
            match self.conn.recv::<Value>() {
                Ok((event, _)) if ended(&event) => break Ok(()),
                Ok((event, _)) if event.get("event").is_some() && !is_migration(&event) => self.keep_event(event),
                // Another state of the migration, or a reply to no command.
                Ok(_) => {}
                Err(CodecError::Timeout) => {}
                Err(source) => break Err(QmpError::Codec { command: "migrate".into(), source }),
            }
        };
        let _ = self.conn.stream().set_read_timeout(usual);
        found
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        os::unix::net::UnixListener,
        thread,
    };

    use super::*;

    /// A QEMU that answers the session's set-up, `migrate` and
    /// `query-migrate` (completed, `total_time`), sends `events` (after
    /// `delay`, following the reply to `migrate`, or before it with
    /// `early`), and returns how many `query-migrate`s it was asked.
    fn fake_qemu(
        listener: UnixListener,
        events: &'static [&'static str],
        delay: Duration,
        early: bool,
        total_time: u64,
    ) -> usize {
        let (stream, _) = listener.accept().unwrap();
        let mut out = stream.try_clone().unwrap();
        let mut say = |v: Value| writeln!(out, "{v}").unwrap();
        say(json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}}}));
        let mut queries = 0;
        for line in BufReader::new(stream).lines() {
            let cmd: Value = serde_json::from_str(&line.unwrap()).unwrap();
            let send_events = |say: &mut dyn FnMut(Value)| {
                for status in events {
                    say(json!({"event": "MIGRATION", "data": {"status": status}}));
                }
            };
            match cmd["execute"].as_str().unwrap() {
                "migrate" if early => {
                    send_events(&mut say);
                    say(json!({"return": {}}));
                }
                "migrate" => {
                    say(json!({"return": {}}));
                    thread::sleep(delay);
                    send_events(&mut say);
                }
                "query-migrate" => {
                    queries += 1;
                    say(json!({"return": {"status": "completed", "total-time": total_time}}));
                }
                _ => say(json!({"return": {}})),
            }
        }
        queries
    }

    fn session(
        events: &'static [&'static str],
        delay: Duration,
        early: bool,
        total_time: u64,
    ) -> (Qmp, thread::JoinHandle<usize>) {
        static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmbeam-qmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let qemu = thread::spawn(move || fake_qemu(listener, events, delay, early, total_time));
        let mut qmp = Qmp::connect(&path, Duration::from_millis(100)).unwrap();
        qmp.set_migration_capabilities(&["x-ignore-shared", "events"]).unwrap();
        (qmp, qemu)
    }

    #[test]
    fn with_events_a_migration_is_waited_for_not_polled() {
        // Longer than the session's 100 ms read bound: the wait reads on.
        let (mut qmp, qemu) = session(&["setup", "active", "completed"], Duration::from_millis(350), false, 42);
        qmp.migrate("unix:/nowhere").unwrap();
        let t = Instant::now();
        let info = qmp.wait_migration(Duration::from_secs(5)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300), "returned before the event: {:?}", t.elapsed());
        assert_eq!(info["total-time"], 42);
        drop(qmp);
        assert_eq!(qemu.join().unwrap(), 1, "one query-migrate, after the event");
    }

    #[test]
    fn a_total_time_qemu_has_not_set_yet_is_the_time_since_migrate() {
        let (mut qmp, qemu) = session(&["completed"], Duration::from_millis(200), false, 0);
        qmp.migrate("unix:/nowhere").unwrap();
        let info = qmp.wait_migration(Duration::from_secs(5)).unwrap();
        let ms = info["total-time"].as_u64().unwrap();
        assert!((200..5000).contains(&ms), "total-time {ms} ms");
        drop(qmp);
        assert_eq!(qemu.join().unwrap(), 1);
    }

    #[test]
    fn an_event_that_came_with_a_reply_is_not_waited_for_again() {
        let (mut qmp, qemu) = session(&["active", "completed"], Duration::ZERO, true, 42);
        qmp.migrate("unix:/nowhere").unwrap();
        assert_eq!(qmp.events.len(), 2, "kept while waiting for the reply");
        qmp.wait_migration(Duration::from_secs(5)).unwrap();
        assert!(qmp.events.is_empty(), "the migration's events are used up: {:?}", qmp.events);
        drop(qmp);
        assert_eq!(qemu.join().unwrap(), 1);
    }

    #[test]
    fn no_end_event_is_a_timeout_not_a_hang() {
        let (mut qmp, qemu) = session(&["active"], Duration::ZERO, false, 42);
        qmp.migrate("unix:/nowhere").unwrap();
        let t = Instant::now();
        let err = qmp.wait_migration(Duration::from_millis(250)).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(qmp);
        assert_eq!(qemu.join().unwrap(), 0);
    }
}
