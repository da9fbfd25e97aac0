//! `upgrade-l2s`: QEMU's own local upgrade of L2s on windows, inside this
//! L1. A new QEMU starts on the same window with `-incoming defer` (before
//! any L2 stops: starting touches none of the RAM), the old one stops and
//! saves its CPU and device state with `x-ignore-shared` (the window is
//! shared RAM, which the stream skips), the new one loads it and runs on
//! the same pages. The L2s are stopped, saved and loaded side by side, as
//! a move between L1s does them, so the downtime compares with a move's:
//! what is left is what QEMU itself needs at this level, without the trips
//! to L0 and the pages' move.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use vmbeam::control::agent::{AgentL2State, Upgraded};

use crate::l2::{Config, Ram, SavedStream, L2};

/// How long a replaced QEMU's first guest entry is waited for, after its
/// `cont` (a vCPU enters within a moment).
const FIRST_ENTRY_WAIT: Duration = Duration::from_secs(1);

/// Replaces the QEMU of every L2 named (each once, each on a window and
/// running). Nothing stops unless every new QEMU started. An L2 whose save
/// or load fails runs on in its old QEMU (the new one killed); the others
/// are upgraded, and the error names the ones that were not.
pub fn upgrade(cfg: &Config, l2s: &mut BTreeMap<String, L2>, names: &[String]) -> Result<Vec<Upgraded>> {
    for name in names {
        let Some(l2) = l2s.get_mut(name) else { bail!("no L2 named `{name}`") };
        if !matches!(l2.ram, Ram::Window(_)) {
            bail!(
                "L2 {name} is on ordinary memory: a local upgrade needs RAM that both QEMUs map (a window); \
                 nothing started or stopped"
            );
        }
        let state = l2.info().state;
        if state != AgentL2State::Running {
            bail!("L2 {name} is {state:?}, not running; nothing started or stopped");
        }
    }
    let mut pairs = start_new_qemus(cfg, l2s, names)?;
    // Every L2 stops before any save is waited for: the saves run side by
    // side, each in its old QEMU's migration thread.
    for i in 0..pairs.len() {
        if let Err(e) = pairs[i].old.begin_save(cfg) {
            // (The one that failed resumed itself, if it had stopped.)
            for (j, mut p) in pairs.into_iter().enumerate() {
                if j < i {
                    let _ = p.old.resume();
                }
                p.new.kill();
                l2s.insert(p.name, p.old);
            }
            return Err(e.context("no L2 stays stopped; each runs on in its old QEMU"));
        }
    }
    let saved: Vec<Result<SavedStream>> = pairs.iter_mut().map(|p| p.old.collect_save(cfg)).collect();
    let mut failed = Vec::new();
    let mut loading = Vec::new();
    for (mut p, saved) in pairs.into_iter().zip(saved) {
        let begun = saved.and_then(|SavedStream { bytes, stopped, qemu_save_ms }| {
            let state_bytes = bytes.len() as u64;
            p.new.begin_restore(Some(bytes), 0)?;
            Ok(Loading { stopped, qemu_save_ms, state_bytes })
        });
        match begun {
            Ok(s) => loading.push((p, s)),
            Err(e) => failed.push(give_back(p, e)),
        }
    }
    // Each resumes as soon as its own state has loaded; the marks are read
    // and the old QEMUs killed only once every L2 runs (neither may hold
    // up the next one's resume).
    let mut resumed = Vec::new();
    for (mut p, s) in loading {
        match p.new.finish_restore(cfg) {
            Ok(_) => {
                let downtime_us = s.stopped.elapsed().as_micros() as u64;
                resumed.push((p, s, downtime_us));
            }
            Err(e) => failed.push(give_back(p, e)),
        }
    }
    let mut done = Vec::new();
    for (mut p, s, downtime_us) in resumed {
        let marks = p.new.marks_after(&mut p.old, FIRST_ENTRY_WAIT);
        let old_pid = p.old.pid();
        p.old.kill();
        done.push(Upgraded {
            l2: p.new.info(),
            old_pid,
            downtime_us,
            qemu_save_ms: s.qemu_save_ms,
            state_bytes: s.state_bytes,
            marks,
        });
        l2s.insert(p.name, p.new);
    }
    // The ones not upgraded run on in their old QEMU.
    let not_upgraded: Vec<String> = failed
        .into_iter()
        .map(|(p, e)| {
            let line = format!("{}: {e:#}", p.name);
            l2s.insert(p.name, p.old);
            line
        })
        .collect();
    if !not_upgraded.is_empty() {
        let upgraded: Vec<&str> = done.iter().map(|u| u.l2.name.as_str()).collect();
        bail!(
            "not upgraded (they run on in their old QEMU): {}; upgraded: {}",
            not_upgraded.join("; "),
            if upgraded.is_empty() { "none".into() } else { upgraded.join(", ") }
        );
    }
    Ok(done)
}

/// A saved L2 whose new QEMU loads its state.
struct Loading {
    stopped: Instant,
    qemu_save_ms: Option<u64>,
    state_bytes: u64,
}

/// An L2 being upgraded: its old QEMU, taken out of the agent's table
/// until it is settled, and its new one.
struct Pair {
    name: String,
    old: L2,
    new: L2,
}

/// Starts a new QEMU for every L2 named, waiting on its window; if one
/// cannot start, kills the ones that did and puts every old one back.
fn start_new_qemus(cfg: &Config, l2s: &mut BTreeMap<String, L2>, names: &[String]) -> Result<Vec<Pair>> {
    let mut pairs: Vec<Pair> = Vec::new();
    for name in names {
        let Some(old) = l2s.remove(name) else { continue };
        // Its own QMP socket and log: the old QEMU keeps `name`'s.
        let files = format!("{name}.after-{}", old.pid());
        match L2::start_as(cfg, name, &files, &old.ram, true) {
            Ok(new) => pairs.push(Pair { name: name.clone(), old, new }),
            Err(e) => {
                l2s.insert(name.clone(), old);
                for mut p in pairs {
                    p.new.kill();
                    l2s.insert(p.name, p.old);
                }
                return Err(e.context(format!("starting L2 {name}'s new QEMU (nothing stopped)")));
            }
        }
    }
    Ok(pairs)
}

/// An L2 whose new QEMU failed: killed, the old one resumed (a failed save
/// resumed it already).
fn give_back(mut p: Pair, e: anyhow::Error) -> (Pair, anyhow::Error) {
    p.new.kill();
    if p.old.info().state == AgentL2State::Saved {
        if let Err(again) = p.old.resume() {
            return (p, e.context(format!("and resuming its old QEMU failed too: {again:#}")));
        }
    }
    (p, e)
}
