//! The control socket: one client at a time, one reply per request. A bad
//! request gets an error object and the connection stays usable; only a
//! message too long to frame ends the connection.

use std::os::{
    fd::{AsFd, OwnedFd},
    unix::net::{UnixListener, UnixStream},
};

use anyhow::{bail, Result};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use vmbeam::control::{
    CodecError, Connection, ErrorBody, ErrorClass, Greeting, Handoff, L2State, Paused, Probe, ReceiveArgs, Reply,
    Request, Selection, Sent, ServerInfo, COMMANDS,
};

use crate::l1::L1;

/// What a command did: a value to return (with fds), or quit.
enum Outcome {
    Return(Value, Vec<OwnedFd>),
    Quit,
}

type Handled = Result<Outcome, ErrorBody>;

pub fn serve(listener: &UnixListener, l1: &mut L1) -> Result<()> {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        if session(stream, l1)? {
            return Ok(());
        }
    }
    bail!("the listening socket closed")
}

/// Serves one client; true when it asked us to quit.
fn session(stream: UnixStream, l1: &mut L1) -> Result<bool> {
    let mut conn = Connection::new(stream);
    let greeting = Greeting {
        greeting: ServerInfo {
            service: "vmbeam-lab".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            name: l1.name.clone(),
            pid: std::process::id(),
        },
    };
    if conn.send(&greeting, &[]).is_err() {
        return Ok(false);
    }
    loop {
        let (line, fds) = match conn.recv_line() {
            Ok(got) => got,
            Err(CodecError::Closed | CodecError::Truncated) => return Ok(false),
            Err(e @ CodecError::TooLong) => {
                let _ = conn.send(&Reply::err(ErrorBody::generic(e.to_string()), None), &[]);
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return Ok(false);
            }
        };
        let (reply, out_fds, quit) = match serde_json::from_slice::<Request>(&line) {
            Err(e) => (Reply::err(ErrorBody::generic(format!("malformed request: {e}")), None), Vec::new(), false),
            Ok(req) => {
                tracing::debug!(command = %req.execute, fds = fds.len(), "request");
                match handle(l1, &req, fds) {
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
            return Ok(quit);
        }
        if quit {
            return Ok(true);
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

/// The L2s a selection names (all when it names none); unknown names are
/// an error.
fn select(l1: &L1, sel: &Selection) -> Result<Vec<String>, ErrorBody> {
    match &sel.vms {
        None => Ok(l1.l2s.iter().map(|l| l.name.clone()).collect()),
        Some(names) => {
            for n in names {
                if l1.l2s.iter().all(|l| &l.name != n) {
                    return Err(ErrorBody {
                        class: ErrorClass::DeviceNotFound,
                        desc: format!("no L2 named {n}"),
                        errno: None,
                    });
                }
            }
            Ok(names.clone())
        }
    }
}

fn handle(l1: &mut L1, req: &Request, fds: Vec<OwnedFd>) -> Handled {
    let no_fds = |fds: &Vec<OwnedFd>| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(ErrorBody::with_errno(format!("{} takes no fds ({} sent)", req.execute, fds.len()), libc::EINVAL))
        }
    };
    if req.execute != "receive-regions" {
        no_fds(&fds)?;
    }
    match req.execute.as_str() {
        "query-commands" => ret(COMMANDS),
        "query-status" => ret(l1.status()),
        "query-vms" => ret(l1.l2s.iter_mut().map(|l| l.info()).collect::<Vec<_>>()),
        "pause" => {
            let names = select(l1, &args(req)?)?;
            let names: Vec<String> = names.into_iter().filter(|n| l1.find(n).is_some_and(|l| !l.sent)).collect();
            for name in &names {
                l1.find(name).expect("selected").request_pause();
            }
            let mut paused = Vec::new();
            for name in names {
                let l2 = l1.find(&name).expect("selected");
                let at = l2.wait_paused().map_err(|e| ErrorBody::generic(format!("pausing {name}: {e}")))?;
                l2.refresh();
                paused.push(Paused { name, paused_at_ns: at, passes: l2.header().passes() });
            }
            ret(paused)
        }
        "resume" => {
            let names = select(l1, &args(req)?)?;
            let vm = l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
            let mut resumed = Vec::new();
            for name in names {
                let l2 = l1.find(&name).expect("selected");
                let info = l2.info();
                if info.state == L2State::Running {
                    continue;
                }
                let region = info.region.ok_or_else(|| ErrorBody::generic(format!("{name}: no region info")))?;
                if !region.mine {
                    if region.owned {
                        return Err(ErrorBody::with_errno(
                            format!("{name}: its region belongs to another VM now; transfer it back first"),
                            libc::EPERM,
                        ));
                    }
                    // Its new owner died: take it back.
                    l2.region.bind(vm.as_fd()).map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
                    tracing::info!("{name}: region was ownerless; bound to this L1 again");
                }
                l2.resume().map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
                resumed.push(name);
            }
            ret(resumed)
        }
        "get-vm-fd" => {
            let fd = l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
            Ok(Outcome::Return(json!({}), vec![fd]))
        }
        "send-regions" => {
            let names = select(l1, &args(req)?)?;
            let mut out = vec![l1.vm_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?];
            let mut vms = Vec::new();
            for name in names {
                let l2 = l1.find(&name).expect("selected");
                let info = l2.info();
                if !matches!(info.state, L2State::Paused | L2State::Sent) {
                    return Err(ErrorBody::generic(format!("{name} is {:?}: pause it first", info.state)));
                }
                let regs = l2.regs().map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
                let fd = l2.region.as_fd().try_clone_to_owned().map_err(|e| ErrorBody::generic(e.to_string()))?;
                vms.push(Handoff {
                    name: name.clone(),
                    window: l2.window,
                    regs,
                    paused_at_ns: info.paused_at_ns.unwrap_or(0),
                    passes: info.passes,
                    fd: out.len(),
                    target_gpa: None,
                });
                out.push(fd);
                l2.sent = true;
            }
            if out.len() > vmbeam::control::MAX_FDS {
                return Err(ErrorBody::generic(format!(
                    "{} L2s: send at most {} at a time",
                    vms.len(),
                    vmbeam::control::MAX_FDS - 1
                )));
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
        "probe" => {
            let names = select(l1, &args(req)?)?;
            let mut out = Vec::new();
            for name in names {
                let l2 = l1.find(&name).expect("selected");
                let (pages, vmm_denied, guest_denied) =
                    l2.probe().map_err(|e| ErrorBody::generic(format!("{name}: {e}")))?;
                out.push(Probe { name, pages, vmm_denied, guest_denied });
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
