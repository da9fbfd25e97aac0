//! The pair's side of the journal (`super::super::journal`): what it writes
//! while the flow runs, and how a witness settles a migration whose
//! vmbeamctl died.

use std::{path::Path, time::Duration};

use anyhow::{bail, Result};
use vmbeam::control::agent::{AgentL2, AgentL2State, Names, RestoreL2, Restored, Saved, StateAt};

use super::{window, Move, QemuPair, Source};
use crate::{
    l1::{
        qemu::{gather, journal},
        Pair,
    },
    report::Report,
};

impl QemuPair {
    /// The journal as things stand.
    fn journal(&self) -> journal::Journal {
        journal::Journal {
            aged: self.aged.qmp_path.clone(),
            clean: self.clean.qmp_path.clone(),
            holes: self.options.holes,
            moves: self.moves.iter().map(Move::entry).collect(),
        }
    }

    /// Before the first step that changes anything: the journal is written
    /// and its witness waits for this process to end.
    pub(super) fn begin_journal(&mut self) -> Result<()> {
        self.journal = Some(journal::JournalFile::begin(&self.journal())?);
        Ok(())
    }

    /// Once the L2s are paused: their states and frames go in, before any
    /// page moves.
    pub(super) fn update_journal(&self) -> Result<()> {
        match &self.journal {
            Some(file) => file.write(&self.journal()),
            None => Ok(()),
        }
    }
}

impl Move {
    fn entry(&self) -> journal::Entry {
        let (from_window, offsets) = match &self.source {
            Source::Window(k) => (Some(*k), Vec::new()),
            Source::Ordinary { offsets } => (None, offsets.clone()),
        };
        journal::Entry {
            name: self.name.clone(),
            from_window,
            offsets,
            to: self.to,
            pages: self.pages,
            state: self.saved.as_ref().map(|s| s.state.clone()),
            state_at: self.arrived,
            loaded: self.loaded,
        }
    }

    fn from_entry(e: journal::Entry) -> Self {
        let source = match e.from_window {
            Some(k) => Source::Window(k),
            None => Source::Ordinary { offsets: e.offsets },
        };
        let saved = e.state.map(|state| Saved {
            name: e.name.clone(),
            window: e.from_window,
            state_bytes: state.len() as u64,
            state,
            state_at: None,
            stopped_us_ago: 0,
            qemu_save_ms: None,
            workload: None,
        });
        Self {
            name: e.name,
            source,
            to: e.to,
            pages: e.pages,
            frames: Vec::new(),
            saved,
            staged: false,
            arrived: e.state_at,
            loaded: e.loaded,
            gathered: false,
        }
    }
}

/// Settles the migration the journal at `path` describes (see the table in
/// `journal`): every L2 ends up running on exactly one L1. Returns what was
/// done, one line per L2; removes the journal once every L2 is settled.
pub fn recover(path: &Path, timeout: Duration) -> Result<Vec<String>> {
    let j = journal::read(path)?;
    let options = gather::Options { holes: j.holes, ..Default::default() };
    let mut pair = QemuPair::connect(&j.aged, &j.clean, timeout, options)?;
    let moves: Vec<Move> = j.moves.into_iter().map(Move::from_entry).collect();
    // States that reached the clean L1's state window and are still there:
    // each restore below empties its own out of the inbox before its L2
    // runs; what is left goes at the end.
    let mut in_inbox: Vec<StateAt> = moves.iter().filter(|m| !m.loaded).filter_map(|m| m.arrived).collect();
    let clean_vms: Vec<AgentL2> = pair.clean.agent.call("query-vms", ())?;
    let aged_vms: Vec<AgentL2> = pair.aged.agent.call("query-vms", ())?;
    let state_of = |vms: &[AgentL2], name: &str| vms.iter().find(|v| v.name == name).map(|v| v.state);
    let mut done = Vec::new();
    let mut trouble = Vec::new();
    let mut report = Report::default();
    for mut m in moves {
        let arrived = window(&pair.clean, m.to)?.region.info()?.pages_present;
        let (clean, aged) = (pair.clean.name.clone(), pair.aged.name.clone());
        if arrived != 0 && arrived != m.pages {
            trouble.push(format!(
                "{}: {arrived} of its {} pages in {clean}'s window {}: left as is",
                m.name, m.pages, m.to
            ));
            continue;
        }
        m.gathered = arrived == m.pages;
        if !m.gathered {
            // Not moved: the receiving QEMU goes, the L2 runs where it was.
            let _ = pair.clean.kill_l2(&m.name);
            if state_of(&aged_vms, &m.name) == Some(AgentL2State::Saved) {
                match pair.aged.resume_l2(&m.name) {
                    Ok(_) => done.push(format!("{}: its pages never left {aged}: resumed there", m.name)),
                    Err(e) => trouble.push(format!("{}: not resumed on {aged}: {e}", m.name)),
                }
            } else {
                done.push(format!("{}: its pages never left {aged}, where it runs", m.name));
            }
            continue;
        }
        // Moved: it runs on the clean L1, restored there if need be.
        if state_of(&clean_vms, &m.name) != Some(AgentL2State::Running) {
            if let Err(e) = restore(&mut pair, &m, &mut in_inbox) {
                let _ = pair.clean.kill_l2(&m.name);
                let back = pair.gather(&m, true).and_then(|()| pair.aged.resume_l2(&m.name));
                match back {
                    Ok(()) => done.push(format!("{}: not restored on {clean} ({e:#}): moved back, resumed on {aged}", m.name)),
                    Err(b) => trouble.push(format!("{}: not restored on {clean} ({e:#}), nor back on {aged} ({b:#}); its pages are in {clean}'s window {}", m.name, m.to)),
                }
                continue;
            }
            done.push(format!("{}: its pages were on {clean}: restored there", m.name));
        } else {
            done.push(format!("{}: runs on {clean}", m.name));
        }
        // Its aged copy never runs again (filled and killed, as retire does).
        pair.moves = vec![m];
        pair.retire(&mut report);
        pair.moves.clear();
    }
    if let Some(w) = &pair.clean.state_window {
        if !in_inbox.is_empty() {
            if let Err(e) = w.clear(&pair.dev, &in_inbox) {
                done.push(format!("{}'s state window not emptied: {e:#}", pair.clean.name));
            }
        }
    }
    done.extend(report.warnings);
    if !trouble.is_empty() {
        bail!("{}\n(done: {})", trouble.join("\n"), done.join("; "));
    }
    let _ = std::fs::remove_file(path);
    Ok(done)
}

/// Restores a moved L2 on the clean L1 from the journal's state, into the
/// QEMU prepared for it if that waits still. A state read out of the
/// clean L1's state window is emptied out of it (and out of `in_inbox`)
/// before the L2 resumes: no zap at L0 while the L1 runs it (see
/// `QemuPair::receive`).
fn restore(pair: &mut QemuPair, m: &Move, in_inbox: &mut Vec<StateAt>) -> Result<()> {
    let names = Names { names: vec![m.name.clone()] };
    if m.loaded {
        // vmbeamctl died between the loads and the resume: the state is in
        // the receiving QEMU (no longer in the state window).
        pair.clean.agent.call::<Vec<Restored>>("restore-l2s", names)?;
        return Ok(());
    }
    // The state is in the clean L1's state window, or in the journal.
    let state = m.saved.as_ref().map(|s| s.state.clone()).unwrap_or_default();
    if state.is_empty() && m.arrived.is_none() {
        bail!("the journal has no saved state for it");
    }
    let args = RestoreL2 { name: m.name.clone(), window: m.to, state, state_at: m.arrived };
    pair.clean.agent.call::<AgentL2>("load-l2", args)?;
    if let (Some(at), Some(w)) = (m.arrived, &pair.clean.state_window) {
        w.clear(&pair.dev, &[at])?;
        in_inbox.retain(|s| *s != at);
    }
    pair.clean.agent.call::<Vec<Restored>>("restore-l2s", names)?;
    Ok(())
}
