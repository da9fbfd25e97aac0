//! The control socket: one client at a time, one reply per request. A bad
//! request gets an error object and the connection stays usable; only a
//! message too long to frame ends the connection.

use std::{
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc, Mutex, MutexGuard,
    },
};

use anyhow::Result;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vmbeam::control::{
    CodecError, Connection, ErrorBody, ErrorClass, Greeting, Handoff, L2State, PauseArgs, Paused, Probe, ReceiveArgs,
    Reply, Request, Selection, Sent, ServerInfo, COMMANDS,
};

use crate::l1::L1;

/// What a command did: a value to return (with fds), or quit.
enum Outcome {
    Return(Value, Vec<OwnedFd>),
    Quit,
}

type Handled = Result<Outcome, ErrorBody>;

/// Serves every client, each in a thread of its own (a status query need
/// not wait for a migration); each request runs with the L1 locked.
/// Returns when a client sent `quit`.
pub fn serve(listener: UnixListener, l1: L1) -> Result<()> {
    let l1 = Arc::new(Mutex::new(l1));
    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let (l1, quit_tx) = (l1.clone(), quit_tx.clone());
                    std::thread::spawn(move || {
                        if session(stream, &l1) {
                            let _ = quit_tx.send(());
                        }
                    });
                }
                Err(e) => tracing::warn!("accept: {e}"),
            }
        }
    });
    quit_rx.recv().map_err(|_| anyhow::anyhow!("the listening socket closed"))
}

/// Serves one client; true when it asked us to quit.
///
/// A pause lasts as long as the connection that asked for it: when the
/// connection closes, its paused L2s that still belong to this L1 resume.
/// A migration whose driver died must not leave VMs stopped; one that
/// completed left nothing here to resume. Likewise L2s the connection
/// staged here and did not commit start here if their memory came (the
/// transfer happened) and are forgotten if it did not: the region's owner
/// decides, so exactly one L1 runs each L2 whenever the driver dies.
fn session(stream: UnixStream, l1: &Mutex<L1>) -> bool {
    static SESSIONS: AtomicU64 = AtomicU64::new(1);
    let id = SESSIONS.fetch_add(1, Relaxed);
    let mut paused_here = Vec::new();
    let quit = serve_client(stream, l1, id, &mut paused_here);
    let mut l1 = lock(l1);
    l1.settle(id);
    for name in paused_here {
        match resume(&mut l1, &name) {
            Ok(true) => tracing::warn!("{name}: resumed: the connection that paused it closed"),
            Ok(false) => {}
            Err(e) => tracing::info!("{name}: left as it is: {}", e.desc),
        }
    }
    quit
}

fn lock(l1: &Mutex<L1>) -> MutexGuard<'_, L1> {
    l1.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve_client(stream: UnixStream, l1: &Mutex<L1>, session: u64, paused_here: &mut Vec<String>) -> bool {
    let mut conn = Connection::new(stream);
    let greeting = Greeting {
        greeting: ServerInfo {
            service: "vmbeam-lab".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            name: lock(l1).name.clone(),
            pid: std::process::id(),
        },
    };
    if conn.send(&greeting, &[]).is_err() {
        return false;
    }
    loop {
        let (line, fds) = match conn.recv_line() {
            Ok(got) => got,
            Err(CodecError::Closed | CodecError::Truncated) => return false,
            Err(e @ CodecError::TooLong) => {
                let _ = conn.send(&Reply::err(ErrorBody::generic(e.to_string()), None), &[]);
                return false;
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return false;
            }
        };
        let (reply, out_fds, quit) = match serde_json::from_slice::<Request>(&line) {
            Err(e) => (Reply::err(ErrorBody::generic(format!("malformed request: {e}")), None), Vec::new(), false),
            Ok(req) => {
                tracing::debug!(command = %req.execute, fds = fds.len(), "request");
                let handled = handle(&mut lock(l1), session, &req, fds);
                if let (Ok(Outcome::Return(v, _)), "pause") = (&handled, req.execute.as_str()) {
                    let paused: Vec<Paused> = serde_json::from_value(v.clone()).unwrap_or_default();
                    paused_here.extend(paused.into_iter().map(|p| p.name));
                }
                match handled {
                    Ok(Outcome::Return(v, out)) => (Reply::ok(v, req.id), out, false),
                    Ok(Outcome::Quit) => (Reply::ok(json!({}), req.id), Vec::new(), true),
                    Err(e) => {
                        tracing::info!(command = %req.execute, "error: {}", e.desc);
                        (Reply::err(e, req.id), Vec::new(), false)
                    }
                }
            }
        };
        let borrowed: Vec<_> = out_fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = conn.send(&reply, &borrowed) {
            tracing::warn!("reply: {e}");
            return quit;
        }
        if quit {
            return true;
        }
    }
}

fn args<T: DeserializeOwned + Default>(req: &Request) -> Result<T, ErrorBody> {
    if req.arguments.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(req.arguments.clone())
        .map_err(|e| ErrorBody::generic(format!("invalid arguments for {}: {e}", req.execute)))
}

fn ret(v: impl serde::Serialize) -> Handled {
    Ok(Outcome::Return(serde_json::to_value(v).map_err(|e| ErrorBody::generic(e.to_string()))?, Vec::new()))
}

/// Indices of the L2s a selection names (all when it names none); an
/// unknown name is an error.
fn select(l1: &L1, sel: &Selection) -> Result<Vec<usize>, ErrorBody> {
    let Some(names) = &sel.vms else { return Ok((0..l1.l2s.len()).collect()) };
    names
        .iter()
        .map(|n| {
            l1.l2s.iter().position(|l| &l.name == n).ok_or_else(|| ErrorBody {
                class: ErrorClass::DeviceNotFound,
                desc: format!("no L2 named {n}"),
                errno: None,
            })
        })
        .collect()
}

fn handle(l1: &mut L1, session: u64, req: &Request, fds: Vec<OwnedFd>) -> Handled {
    let no_fds = |fds: &Vec<OwnedFd>| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(ErrorBody::with_errno(format!("{} takes no fds ({} sent)", req.execute, fds.len()), libc::EINVAL))
        }
    };
    if !matches!(req.execute.as_str(), "receive-regions" | "stage-regions") {
        no_fds(&fds)?;
    }
    match req.execute.as_str() {
        "query-commands" => ret(COMMANDS),
        "query-status" => ret(l1.status()),
        "query-vms" => ret(l1.l2s.iter_mut().map(|l| l.info()).collect::<Vec<_>>()),
        "pause" => pause(l1, &args(req)?),
        "resume" => {
            let names: Vec<String> = select(l1, &args(req)?)?.into_iter().map(|i| l1.l2s[i].name.clone()).collect();
            let mut resumed = Vec::new();
            for name in names {
                if resume(l1, &name)? {
                    resumed.push(name);
                }
            }
            ret(resumed)
        }
        "get-vm-fd" => {
            let fd = l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
            Ok(Outcome::Return(json!({}), vec![fd]))
        }
        "send-regions" | "lend-regions" => {
            // Every check before any L2 is marked sent: an error changes
            // nothing. Lent L2s run on, unmarked: their registers will come
            // in their windows (`pause` with `save_state`).
            let lend = req.execute == "lend-regions";
            let picked = select(l1, &args(req)?)?;
            if picked.len() >= vmbeam::control::MAX_FDS {
                return Err(ErrorBody::generic(format!(
                    "{} L2s: send at most {} at a time",
                    picked.len(),
                    vmbeam::control::MAX_FDS - 1
                )));
            }
            let mut out = vec![l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?];
            let mut vms = Vec::new();
            for &i in &picked {
                let l2 = &mut l1.l2s[i];
                let info = l2.info();
                let ready = if lend {
                    matches!(info.state, L2State::Running | L2State::Paused | L2State::Sent)
                } else {
                    matches!(info.state, L2State::Paused | L2State::Sent)
                };
                if !ready {
                    // A vCPU stopped for good says why; pausing would not help.
                    let why = info.detail.as_deref().unwrap_or("pause it first");
                    return Err(ErrorBody::generic(format!("{} is {:?}: {why}", l2.name, info.state)));
                }
                let regs = if lend {
                    None
                } else {
                    Some(l2.regs().map_err(|e| ErrorBody::generic(format!("{}: {e}", l2.name)))?)
                };
                let fd = l2.region.as_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
                vms.push(Handoff {
                    name: l2.name.clone(),
                    window: l2.window,
                    regs,
                    paused_at_ns: info.paused_at_ns.unwrap_or(0),
                    passes: info.passes,
                    fd: out.len(),
                    target_gpa: None,
                });
                out.push(fd);
            }
            for i in picked.into_iter().filter(|_| !lend) {
                l1.l2s[i].sent = true;
            }
            let v = serde_json::to_value(Sent { vm_fd: 0, vms }).map_err(|e| ErrorBody::generic(e.to_string()))?;
            Ok(Outcome::Return(v, out))
        }
        "receive-regions" => {
            let a: ReceiveArgs = serde_json::from_value(req.arguments.clone())
                .map_err(|e| ErrorBody::generic(format!("invalid arguments for receive-regions: {e}")))?;
            let windows = l1.receive(&a.vms, fds).map_err(|e| ErrorBody::generic(format!("{e:#}")))?;
            tracing::info!(count = windows.len(), "received L2s");
            ret(windows)
        }
        "stage-regions" => {
            let a: ReceiveArgs = serde_json::from_value(req.arguments.clone())
                .map_err(|e| ErrorBody::generic(format!("invalid arguments for stage-regions: {e}")))?;
            let windows = l1.stage(session, &a.vms, fds).map_err(|e| ErrorBody::generic(format!("{e:#}")))?;
            tracing::info!(count = windows.len(), "staged L2s");
            ret(windows)
        }
        "commit-staged" => {
            let windows = l1.commit(session).map_err(|e| ErrorBody::generic(format!("{e:#}")))?;
            tracing::info!(count = windows.len(), "started staged L2s");
            ret(windows)
        }
        "drop-staged" => ret(l1.drop_staged(session)),
        "probe" => {
            let mut out = Vec::new();
            for i in select(l1, &args(req)?)? {
                let l2 = &l1.l2s[i];
                let (pages, vmm_denied, guest_denied) =
                    l2.probe().map_err(|e| ErrorBody::generic(format!("{}: {e}", l2.name)))?;
                out.push(Probe { name: l2.name.clone(), pages, vmm_denied, guest_denied });
            }
            ret(out)
        }
        "quit" => Ok(Outcome::Quit),
        other => Err(ErrorBody {
            class: ErrorClass::CommandNotFound,
            desc: format!("the command {other} has not been found (query-commands lists them)"),
            errno: None,
        }),
    }
}

/// Stops the selected L2s together (and saves each one's state in its
/// window if asked). All or none: on an error the ones it stopped run on,
/// since only a pause that returned is undone when the connection closes.
fn pause(l1: &mut L1, a: &PauseArgs) -> Handled {
    let picked: Vec<usize> = select(l1, &a.selection())?.into_iter().filter(|&i| !l1.l2s[i].sent).collect();
    for &i in &picked {
        l1.l2s[i].request_pause();
    }
    let mut paused = Vec::new();
    let mut failed = None;
    for &i in &picked {
        let l2 = &mut l1.l2s[i];
        let stopped = l2.wait_paused().map_err(|e| format!("pausing {}: {e}", l2.name)).and_then(|at| {
            l2.refresh();
            if a.save_state {
                l2.save_state().map_err(|e| format!("{}: {e}", l2.name))?;
            }
            Ok(Paused { name: l2.name.clone(), paused_at_ns: at, passes: l2.header().passes() })
        });
        match stopped {
            Ok(p) => paused.push(p),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let Some(e) = failed else { return ret(paused) };
    let names: Vec<String> = picked.iter().map(|&i| l1.l2s[i].name.clone()).collect();
    for name in names {
        if let Err(r) = resume(l1, &name) {
            tracing::warn!("{name}: not resumed after a failed pause: {}", r.desc);
        }
    }
    Err(ErrorBody::generic(e))
}

/// Resumes one L2 unless it runs already (false then). Its region must be
/// this L1's again; an ownerless one (the VM it went to has exited) is
/// bound back first.
fn resume(l1: &mut L1, name: &str) -> Result<bool, ErrorBody> {
    let vm = l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
    let l2 = l1.find(name).ok_or_else(|| ErrorBody::generic(format!("no L2 named {name}")))?;
    let info = l2.info();
    if info.state == L2State::Running {
        return Ok(false);
    }
    let region = info.region.ok_or_else(|| ErrorBody::generic(format!("{name}: no region info")))?;
    if !region.mine {
        if region.owned {
            return Err(ErrorBody::with_errno(
                format!("{name}: its region belongs to another VM now; transfer it back first"),
                libc::EPERM,
            ));
        }
        l2.region.bind(vm.as_fd()).map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
        tracing::info!("{name}: its region was ownerless; bound to this L1 again");
    }
    // A state saved for a receiver (`pause` with `save_state`) is stale
    // once the L2 runs here again.
    if let Err(e) = l2.clear_saved_state() {
        tracing::warn!("{name}: {e}");
    }
    // Its memory may have been away (revoked, moved back): map it into the
    // VM again before the vCPU runs, not one nested page fault at a time.
    if let Err(e) = l2.prefault() {
        tracing::warn!("{name}: {e}");
    }
    l2.resume().map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
    Ok(true)
}
