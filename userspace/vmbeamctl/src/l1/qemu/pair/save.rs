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
    agent::{Named, RestoreL2, Saved},
    Client, ControlError,
};

use super::Move;
use crate::{l1::monotonic_ns, report::Report};

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
            l.passes_at_pause = s.workload.map_or(0, |w| u64::from(w.pass));
            // A stager that ended on an error has dropped its end: the
            // error comes out of the join below.
            let _ = states.send(RestoreL2 { name: m.name.clone(), window: m.to, state: s.state.clone() });
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
