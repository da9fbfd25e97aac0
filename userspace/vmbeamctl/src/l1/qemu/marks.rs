//! Each L2's downtime as its L1s' kernels saw it, on L0's clock: the last
//! guest exit of its vCPU threads in the aged L1 to their first guest
//! entry in the clean L1 (the agents' marks, `query-l2-marks`). L0's eBPF
//! probes cannot see an L2's vCPU (at L0 it is the L1's vCPU thread), and
//! each L1 has a clock of its own: `query-clock` round trips place each
//! L1's CLOCK_MONOTONIC on L0's, to within half the shortest round trip.

use anyhow::{ensure, Result};
use vmbeam::control::{
    agent::{AgentClock, L2Marks, Names},
    Client,
};

use crate::{l1::monotonic_ns, report::GuestMarks};

/// How many `query-clock` round trips: the shortest one is used.
const ROUND_TRIPS: usize = 5;

/// An L1's CLOCK_MONOTONIC placed on L0's: `l0 = l1 + offset_ns`, give or
/// take `error_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSync {
    pub offset_ns: i128,
    pub error_ns: u64,
}

impl ClockSync {
    /// The agent read its clock somewhere between our send and our
    /// receipt: the midpoint of the shortest round trip, off by at most
    /// half of it.
    pub fn measure(agent: &mut Client) -> Result<Self> {
        let mut best: Option<Self> = None;
        for _ in 0..ROUND_TRIPS {
            let sent = monotonic_ns();
            let clock: AgentClock = agent.call("query-clock", ())?;
            let received = monotonic_ns();
            let sync = Self::from_round_trip(sent, clock.monotonic_ns, received);
            if best.is_none_or(|b| sync.error_ns < b.error_ns) {
                best = Some(sync);
            }
        }
        best.ok_or_else(|| anyhow::anyhow!("no query-clock round trip"))
    }

    fn from_round_trip(sent: u64, l1_ns: u64, received: u64) -> Self {
        let half = received.saturating_sub(sent) / 2;
        Self { offset_ns: i128::from(sent + half) - i128::from(l1_ns), error_ns: half }
    }

    pub fn to_l0(self, l1_ns: u64) -> u64 {
        u64::try_from(i128::from(l1_ns) + self.offset_ns).unwrap_or(0)
    }
}

/// The marks of `names` from both agents, as [`GuestMarks`] on L0's clock
/// (one per name, in order).
pub fn guest_downtime(aged: &mut Client, clean: &mut Client, names: &[String]) -> Result<Vec<GuestMarks>> {
    let (aged_clock, clean_clock) = (ClockSync::measure(aged)?, ClockSync::measure(clean)?);
    let ask = Names { names: names.to_vec() };
    let exits: Vec<L2Marks> = aged.call("query-l2-marks", &ask)?;
    let entries: Vec<L2Marks> = clean.call("query-l2-marks", &ask)?;
    ensure!(exits.len() == names.len() && entries.len() == names.len(), "query-l2-marks: a reply per name expected");
    Ok(exits.iter().zip(&entries).map(|(exit, entry)| combine(exit, entry, aged_clock, clean_clock)).collect())
}

fn combine(exit: &L2Marks, entry: &L2Marks, aged: ClockSync, clean: ClockSync) -> GuestMarks {
    let last_exit = exit.last_guest_exit_ns.map(|ns| aged.to_l0(ns));
    let first_entry = entry.first_guest_entry_ns.map(|ns| clean.to_l0(ns));
    let missing: Vec<String> = [("aged", &exit.error), ("clean", &entry.error)]
        .into_iter()
        .filter_map(|(side, e)| Some(format!("{side} L1: {}", e.as_deref()?)))
        .collect();
    GuestMarks {
        downtime_ms: match (last_exit, first_entry) {
            (Some(x), Some(e)) => Some(e.saturating_sub(x) as f64 / 1e6),
            _ => None,
        },
        last_guest_exit_ns: last_exit,
        first_guest_entry_ns: first_entry,
        clock_error_ms: (aged.error_ns + clean.error_ns) as f64 / 1e6,
        error: (!missing.is_empty()).then(|| missing.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_places_the_l1_clock_at_its_midpoint() {
        // Sent at 1000, received at 1400; the L1 read 50 then.
        let s = ClockSync::from_round_trip(1000, 50, 1400);
        assert_eq!(s, ClockSync { offset_ns: 1150, error_ns: 200 });
        assert_eq!(s.to_l0(60), 1210);
    }

    #[test]
    fn downtime_runs_from_the_aged_exit_to_the_clean_entry() {
        let aged = ClockSync { offset_ns: 1_000_000_000, error_ns: 1_000 };
        let clean = ClockSync { offset_ns: -500_000_000, error_ns: 2_000 };
        let exit = L2Marks { name: "vm0".into(), last_guest_exit_ns: Some(4_000_000_000), ..Default::default() };
        let entry = L2Marks { name: "vm0".into(), first_guest_entry_ns: Some(7_000_000_000), ..Default::default() };
        let m = combine(&exit, &entry, aged, clean);
        // Exit at 5.0 s on L0, entry at 6.5 s on L0.
        assert_eq!(m.downtime_ms, Some(1500.0));
        assert_eq!(m.clock_error_ms, 0.003);
        assert_eq!(m.error, None);
        let no_entry = L2Marks { name: "vm0".into(), error: Some("no tracefs".into()), ..Default::default() };
        let m = combine(&exit, &no_entry, aged, clean);
        assert_eq!((m.downtime_ms, m.error.as_deref()), (None, Some("clean L1: no tracefs")));
    }
}
