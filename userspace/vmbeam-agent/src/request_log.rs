//! The agent's log of the requests it serves, on its stderr (the L1's
//! serial console, which L0 keeps in a file).
//!
//! A line on a serial console costs an L1 one exit to L0 per byte, and
//! under nested virtualization each exit is dear: a 20-byte line took
//! 8-40 ms of the L1's one vCPU under TCG (measured inside the agent).
//! Written ahead of each request, such lines sat inside every moving L2's
//! downtime. So a line is written after its reply has gone, and the
//! lines of a migration's pause (the commands in [`PAUSE`]) wait until
//! the next request outside one: the log keeps every request, in order,
//! and no L2 waits for it.

use std::io::Write;

/// Commands sent while L2s are stopped for a move: their lines wait.
const PAUSE: &[&str] = &["save-l2s", "save-l2", "stage-l2", "query-l2-frames", "load-l2", "load-l2s", "restore-l2s"];

#[derive(Default)]
pub struct RequestLog {
    held: Vec<String>,
}

impl RequestLog {
    /// Logs a request whose reply has been sent.
    pub fn served(&mut self, command: &str) {
        self.held.push(format!("vmbeam-agent: {command}\n"));
        if !PAUSE.contains(&command) {
            self.flush();
        }
    }

    /// Writes every line held (a session that ends writes what it holds).
    pub fn flush(&mut self) {
        if self.held.is_empty() {
            return;
        }
        // One write for all: the console driver then moves them together.
        let _ = std::io::stderr().lock().write_all(self.held.concat().as_bytes());
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_logged_with_the_next_request_outside_it() {
        let mut log = RequestLog::default();
        log.served("save-l2s");
        log.served("save-l2");
        assert_eq!(log.held, ["vmbeam-agent: save-l2s\n", "vmbeam-agent: save-l2\n"]);
        log.served("query-clock");
        assert!(log.held.is_empty());
    }
}
