//! How the saved states travel. Between L1s that both have a state window
//! ([`super::super::state_window`]) the aged agent leaves each in its
//! outbox and `send` moves the pages into the clean L1's inbox at L0, with
//! no byte crossing a link, and every load begins with one request to the
//! clean agent (`load-l2s`): each request costs every L2's downtime a trip
//! through both L1 QEMUs' serial ports, 15–45 ms under TCG. Where one has
//! none (or `--states-over-link`), over the links:
//!
//! The pause's two links at once: each L2's saved state is collected from
//! the aged agent (`save-l2`, after `save-l2s` stopped them all) and passed
//! on to the clean agent (`stage-l2`) as soon as it arrives, while the aged
//! L1 still saves the next L2. The clean agent keeps it for the load, which
//! must wait for the pages; the `load-l2` that follows then carries none.
//!
//! Every state crosses two virtio-serial links (aged L1 to L0, L0 to the
//! clean L1), and both used to lie end to end inside the downtime: the
//! receive step carried each state again (0.45–0.65 s for two L2s of
//! ~310 KB states); staged, it is ~0.27 s.

use anyhow::{anyhow, Context, Result};
use vmbeam::control::{
    agent::{AgentL2, Named, RestoreL2, RestoreL2s, Saved, StateAt},
    Client, ControlError,
};

use super::{Move, QemuPair};
use crate::{
    l1::{
        monotonic_ns,
        qemu::{state_window, QemuL1},
    },
    report::Report,
};

/// Collects every move's state from `aged` into `moves` (and its timing
/// into the report), staging each in `clean` as it comes. A stage the
/// clean agent refuses is a warning: that state goes with its `load-l2`.
/// A failed save, or a clean link that stopped answering (a late reply
/// would answer the next request), fails the pause.
pub(super) fn collect_and_stage(
    aged: &mut Client,
    clean: &mut Client,
    moves: &mut [Move],
    report: &mut Report,
) -> Result<()> {
    let staged = std::thread::scope(|scope| -> Result<Vec<(String, Option<String>)>> {
        let (states, to_stage) = std::sync::mpsc::channel::<RestoreL2>();
        let stager = scope.spawn(move || -> Result<Vec<(String, Option<String>)>> {
            let mut staged = Vec::new();
            for state in to_stage {
                match clean.call::<serde_json::Value>("stage-l2", &state) {
                    Ok(_) => staged.push((state.name, None)),
                    Err(e @ ControlError::Remote { .. }) => staged.push((state.name, Some(e.to_string()))),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(staged)
        });
        for m in moves.iter_mut() {
            let s: Saved = aged.call("save-l2", Named { name: m.name.clone() })?;
            let l = report.l2.iter_mut().find(|l| l.name == s.name).context("report row")?;
            l.paused_at_ns = monotonic_ns().saturating_sub(s.stopped_us_ago * 1000);
            l.save_ms = Some(s.stopped_us_ago as f64 / 1e3);
            l.qemu_save_ms = s.qemu_save_ms;
            l.state_bytes = Some(s.state_bytes);
            l.state_via = Some(if s.state_at.is_some() { "state window" } else { "link" }.into());
            l.passes_at_pause = s.workload.map_or(0, |w| u64::from(w.pass));
            // In a state window: it moves with the pages (`send`).
            if s.state_at.is_none() {
                // A stager that ended on an error has dropped its end: the
                // error comes out of the join below.
                let state = s.state.clone();
                let _ = states.send(RestoreL2 { name: m.name.clone(), window: m.to, state, state_at: None });
            }
            m.saved = Some(s);
        }
        drop(states);
        stager.join().map_err(|_| anyhow!("the thread staging states panicked"))?
    })?;
    for (name, refused) in staged {
        match refused {
            None => moves.iter_mut().filter(|m| m.name == name).for_each(|m| m.staged = true),
            Some(e) => report.warnings.push(format!("{name}: its state goes with the load: {e}")),
        }
    }
    Ok(())
}

/// Moves the states the aged agent left in its state window into the
/// clean L1's (one gather, all or nothing), and notes where each arrived.
pub(super) fn send_through_windows(
    dev: &vmbeam::Device,
    aged: &QemuL1,
    clean: &QemuL1,
    moves: &mut [Move],
) -> Result<()> {
    let in_window: Vec<(usize, StateAt)> =
        moves.iter().enumerate().filter_map(|(i, m)| Some((i, m.saved.as_ref()?.state_at?))).collect();
    if in_window.is_empty() {
        return Ok(());
    }
    let (Some(from), Some(to)) = (&aged.state_window, &clean.state_window) else {
        anyhow::bail!("a state was left in {}'s state window, but {} has none", aged.name, clean.name);
    };
    let states: Vec<StateAt> = in_window.iter().map(|&(_, at)| at).collect();
    let arrived = state_window::send(dev, from, to, &states)?;
    for ((i, _), at) in in_window.into_iter().zip(arrived) {
        moves[i].arrived = Some(at);
    }
    Ok(())
}

impl QemuPair {
    /// Whether the states go through the state windows: both L1s have
    /// one, and so does the clean agent (an older one could not read it).
    /// Both inboxes are made empty (pages a move whose vmbeamctl and
    /// witness both died left there), and the aged outbox must be whole:
    /// the aged agent writes it, and an L1 that touches a missing page of
    /// a region is stopped.
    pub(super) fn plan_states(&mut self, clean_agent_has_one: bool, report: &mut Report) -> Result<()> {
        self.states_in_windows = false;
        self.loads_in_one_request = false;
        if self.options.states_over_link || self.moves.is_empty() {
            return Ok(());
        }
        let (aged, clean) = (&self.aged.name, &self.clean.name);
        let why_not = match (&self.aged.state_window, &self.clean.state_window) {
            (None, _) => Some(format!("{aged} has no state window (boot L1s with this vmbeamctl)")),
            (_, None) => Some(format!("{clean} has no state window (boot L1s with this vmbeamctl)")),
            _ if !clean_agent_has_one => Some(format!("{clean}'s agent does not see its state window")),
            (Some(from), Some(to)) => {
                from.ready_inbox(&self.dev)?;
                to.ready_inbox(&self.dev)?;
                (!from.holds_just_its_outbox()).then(|| format!("{aged}'s state window has pages missing"))
            }
        };
        match why_not {
            Some(why) => report.warnings.push(format!("the states go over the agents' links: {why}")),
            None => self.states_in_windows = true,
        }
        if self.states_in_windows {
            // An agent that refuses to list its commands is an older one;
            // one that does not answer must fail the plan here, not leave
            // its late reply to answer the next request.
            let commands = match self.clean.agent.call::<Vec<String>>("query-commands", ()) {
                Ok(commands) => commands,
                Err(ControlError::Remote { .. }) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            self.loads_in_one_request = commands.iter().any(|c| c == "load-l2s");
        }
        Ok(())
    }

    /// Begins every move's load on the clean L1: in one request (`load-l2s`)
    /// where the agent takes it, but for a state that travels in its own
    /// `load-l2` (a line holds one state at most).
    pub(super) fn begin_loads(&mut self) -> Result<()> {
        let mut in_one = Vec::new();
        for m in &self.moves {
            let saved = m.saved.as_ref().ok_or_else(|| anyhow!("{}: not saved", m.name))?;
            let state = if m.staged || m.arrived.is_some() { String::new() } else { saved.state.clone() };
            let args = RestoreL2 { name: m.name.clone(), window: m.to, state, state_at: m.arrived };
            if self.loads_in_one_request && args.state.is_empty() {
                in_one.push(args);
            } else {
                self.clean.agent.call::<AgentL2>("load-l2", args)?;
            }
        }
        if !in_one.is_empty() {
            self.clean.agent.call::<Vec<AgentL2>>("load-l2s", RestoreL2s { l2s: in_one })?;
        }
        Ok(())
    }

    /// Empties the clean inbox of the states that arrived there (they are
    /// loaded, or the move is undone), so the next move finds it empty.
    pub(super) fn clear_inbox(&mut self, report: &mut Report) {
        let arrived: Vec<StateAt> = self.moves.iter_mut().filter_map(|m| m.arrived.take()).collect();
        if let (Some(w), false) = (&self.clean.state_window, arrived.is_empty()) {
            if let Err(e) = w.clear(&self.dev, &arrived) {
                report.warnings.push(format!("{}'s state window: {e:#}", self.clean.name));
            }
        }
    }
}
