//! `vmbeamctl migrate-all` end to end between two lab L1s (`vmbeam-lab`
//! processes): the data each L2's workload wrote is verified by the same
//! workload on the clean L1, page frames are compared, the aged L1 is shown
//! to have lost access; dry runs, failures part-way, malformed control
//! messages and an L1 killed mid-migration leave every L2 intact somewhere.

use std::{
    os::{
        fd::{AsFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::{
        signal::{kill, Signal},
        wait::{waitpid, WaitPidFlag, WaitStatus},
    },
    unistd::Pid,
};
use serde_json::{json, Value};
use vmbeam::{
    control::{
        Client, ControlError, ErrorClass, Handoff, L1Status, L2Info, L2State, PauseArgs, ReceiveArgs, Selection, Sent,
    },
    Device,
};
use vmbeam_selftests::{check, exe, Tap, TestResult};

const L2_SIZE: &str = "8M";
const TIMEOUT: Duration = Duration::from_secs(20);
/// What vmbeam-lab adds to an L2's failure when its vCPU left the workload's
/// code: TCG's emulated SVM, not vmbeam (README, "A lab L2 vCPU sometimes
/// left KVM_RUN with a wild rip"); such a test runs once more.
const WILD_RIP: &str = "WILD_RIP";

/// A `vmbeam-lab` process; killed when dropped.
struct Lab {
    child: Child,
    socket: PathBuf,
}

impl Lab {
    fn start(name: &str, l2: usize) -> Result<Self, String> {
        Self::start_with(name, l2, &[])
    }

    fn start_with(name: &str, l2: usize, extra: &[&str]) -> Result<Self, String> {
        let socket = std::env::temp_dir().join(format!("vmbeam-test-{name}-{}.sock", std::process::id()));
        let child = Command::new(exe("vmbeam-lab"))
            .args(["--socket".as_ref(), socket.as_os_str()])
            .args(["--name", name, "--l2", &l2.to_string(), "--l2-size", L2_SIZE])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn vmbeam-lab: {e}"))?;
        let lab = Self { child, socket };
        let deadline = Instant::now() + TIMEOUT;
        while UnixStream::connect(&lab.socket).is_err() {
            if Instant::now() > deadline {
                return Err(format!("{name}: no control socket within {TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(lab)
    }

    fn client(&self) -> Result<Client, String> {
        Client::connect(&self.socket, TIMEOUT).map_err(|e| e.to_string())
    }

    fn vms(&self) -> Result<Vec<L2Info>, String> {
        self.client()?.call("query-vms", ()).map_err(|e| e.to_string())
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits until every L2 has completed at least `passes` verified passes
    /// more than now, with no error.
    fn progresses(&self, passes: u64) -> TestResult {
        let start: Vec<L2Info> = self.vms()?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = self.vms()?;
            let bad: Vec<_> = now.iter().filter(|v| v.errors != 0 || v.state != L2State::Running).collect();
            check(bad.is_empty(), || format!("L2s not healthy: {bad:?}"))?;
            let behind = now
                .iter()
                .filter(|v| start.iter().find(|s| s.name == v.name).is_some_and(|s| v.passes < s.passes + passes))
                .count();
            if behind == 0 {
                return check(now.iter().all(|v| v.checksum_ok == Some(true)), || format!("checksums: {now:?}"));
            }
            check(Instant::now() < deadline, || format!("{behind} L2s made no progress in {TIMEOUT:?}"))?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn migrate(from: &Lab, to: &Lab, extra: &[&str]) -> Result<(Option<i32>, Value, Output), String> {
    let out = Command::new(exe("vmbeamctl"))
        .arg("migrate-all")
        .args(["--from".as_ref(), from.socket.as_os_str(), "--to".as_ref(), to.socket.as_os_str()])
        .args(["--json", "--timeout-s", "60"])
        .args(extra)
        .output()
        .map_err(|e| format!("run vmbeamctl: {e}"))?;
    let v = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("report is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok((out.status.code(), v, out))
}

/// `vmbeamctl migrate-all --json` stopped (SIGSTOP) right after `step`.
fn stopped_migration(from: &Lab, to: &Lab, step: &str) -> Result<Child, String> {
    let child = Command::new(exe("vmbeamctl"))
        .arg("migrate-all")
        .args(["--from".as_ref(), from.socket.as_os_str(), "--to".as_ref(), to.socket.as_os_str()])
        .args(["--json", "--stop-at", step])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut child = child;
    let stopped = waitpid(Pid::from_raw(child.id() as i32), Some(WaitPidFlag::WUNTRACED)).map_err(|e| e.to_string())?;
    if !matches!(stopped, WaitStatus::Stopped(..)) {
        // Its report says why (and carries WILD_RIP when that was it).
        let mut report = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut report);
        }
        return Err(format!("vmbeamctl did not stop after {step}: {stopped:?}: {report}"));
    }
    Ok(child)
}

/// The KVM vCPUs a lab L1 holds (its `anon_inode:kvm-vcpu:N` fds).
fn vcpu_fds(lab: &Lab) -> Result<usize, String> {
    let dir = std::fs::read_dir(format!("/proc/{}/fd", lab.child.id())).map_err(|e| e.to_string())?;
    Ok(dir
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("anon_inode:kvm-vcpu"))
        .count())
}

fn regions_alive(dev: &Device) -> Result<u64, String> {
    Ok(dev.stats().map_err(|e| e.to_string())?.regions)
}

/// Every L2 of `lab` runs, owns its region and keeps verifying.
fn all_home(lab: &Lab, count: usize) -> TestResult {
    let vms = lab.vms()?;
    check(vms.len() == count, || format!("{} L2s, expected {count}", vms.len()))?;
    for v in &vms {
        check(v.state == L2State::Running, || format!("{} is {:?}: {:?}", v.name, v.state, v.detail))?;
        check(v.region.is_some_and(|r| r.mine), || format!("{}: region not its own: {:?}", v.name, v.region))?;
    }
    lab.progresses(1)
}

/// A report row of an L2 that moved whole and zero copy (every page frame
/// on the clean side the aged one, 0 bytes copied) and whose workload
/// verified every dword on the clean L1.
fn moved_whole_zero_copy(row: &Value, pages: u64) -> TestResult {
    let name = &row["name"];
    check(row["pages"] == pages && row["frames_compared"] == pages && row["frames_same"] == pages, || {
        format!("{name}: frames {row}")
    })?;
    check(row["bytes_copied"] == 0, || format!("{name}: bytes copied {}", row["bytes_copied"]))?;
    check(row["errors"] == 0 && row["checksum_ok"] == true, || format!("{name}: workload {row}"))
}

/// The clean L1 runs all `count` L2s on, the aged one lists them as gone.
fn all_moved(aged: &Lab, clean: &Lab, count: usize) -> TestResult {
    all_home(clean, count)?;
    let gone = aged.vms()?;
    check(gone.iter().all(|v| v.state == L2State::Migrated), || format!("aged: {gone:?}"))
}

fn main() {
    let dev = match Device::open() {
        Ok(dev) => dev,
        Err(e) => Tap::skip_all(&format!("{e}")),
    };
    if !Path::new("/dev/kvm").exists() {
        Tap::skip_all("no /dev/kvm");
    }
    let mut tap = Tap::new(22);

    tap.test_retrying_on(WILD_RIP, "migrate_all_moves_every_l2_with_data_frames_and_access", || {
        let (aged, clean) = (Lab::start("aged", 3)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let before = dev.stats().map_err(|e| e.to_string())?;
        let (code, r, out) = migrate(&aged, &clean, &[])?;
        check(code == Some(0), || format!("exit {code:?}: {r}\n{}", String::from_utf8_lossy(&out.stderr)))?;
        check(r["ok"] == true && r["committed"] == true && r["error"].is_null(), || format!("report: {r}"))?;
        let rows = r["l2"].as_array().ok_or("no l2 rows")?;
        check(rows.len() == 3, || format!("{} rows", rows.len()))?;
        let pages = (8 << 20) / 4096;
        for row in rows {
            let name = &row["name"];
            moved_whole_zero_copy(row, pages)?;
            let (before, after) = (row["passes_at_pause"].as_u64(), row["passes_after"].as_u64());
            check(after >= before.map(|b| b + 2), || format!("{name}: passes {before:?} -> {after:?}"))?;
            let down = row["downtime_ms"].as_f64().unwrap_or(-1.0);
            check(down > 0.0, || format!("{name}: downtime {down}"))?;
            check(row["resumed_at_ns"].as_u64() > row["paused_at_ns"].as_u64(), || format!("{name}: stamps {row}"))?;
            let old = &row["old_owner"];
            check(
                old["pages"].as_u64() > Some(0)
                    && old["vmm_denied"] == old["pages"]
                    && old["guest_denied"] == old["pages"],
                || format!("{name}: the aged L1 could still read: {old}"),
            )?;
        }
        let t = &r["totals"];
        check(t["l2"] == 3 && t["pages"] == 3 * pages && t["bytes_copied"] == 0, || format!("totals {t}"))?;
        check(t["downtime_ms_max"].as_f64() >= t["downtime_ms_mean"].as_f64(), || format!("totals {t}"))?;
        let m = &r["module"];
        check(m["transfers"] == 3 && m["pages_transferred"] == 3 * pages && m["bytes_copied"] == 0, || {
            format!("module {m}")
        })?;
        let after = dev.stats().map_err(|e| e.to_string())?;
        check(after.transfers - before.transfers == 3 && after.bytes_copied == before.bytes_copied, || {
            format!("counters moved by {} transfers", after.transfers - before.transfers)
        })?;
        all_moved(&aged, &clean, 3)
    });

    tap.test_retrying_on(WILD_RIP, "trace_sees_each_l2_stop_and_start_in_the_kernel", || {
        let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let (code, r, out) = migrate(&aged, &clean, &["--trace"])?;
        check(code == Some(0), || format!("exit {code:?}: {r}\n{}", String::from_utf8_lossy(&out.stderr)))?;
        for row in r["l2"].as_array().ok_or("no l2 rows")? {
            let name = &row["name"];
            let t = &row["trace"];
            check(t["from_vcpu_tid"].is_u64() && t["to_vcpu_tid"].is_u64(), || format!("{name}: vCPU threads {t}"))?;
            let (probed, measured) =
                (t["downtime_ms"].as_f64().unwrap_or(-1.0), row["downtime_ms"].as_f64().unwrap_or(-1.0));
            // The kernel's span is the guest's own: its last exit before the
            // move and its first entry after. vmbeamctl's stamps are taken
            // by the vCPU thread back in userspace after each, so in one
            // clock each kernel moment comes first; between the two, only
            // scheduling differs (two vCPUs under TCG: a few ms; with
            // downtimes now ~30 ms a quarter alone is too tight: 34.9 ms by
            // the probes against 27.6 failed a CI run at d06bc10).
            let (exit, paused) = (t["last_guest_exit_ns"].as_u64(), row["paused_at_ns"].as_u64());
            let (entry, resumed) = (t["first_guest_entry_ns"].as_u64(), row["resumed_at_ns"].as_u64());
            check(exit.is_some() && exit <= paused && entry.is_some() && entry <= resumed, || {
                format!("{name}: guest exit {exit:?} / pause stamp {paused:?}, guest entry {entry:?} / resume stamp {resumed:?}")
            })?;
            check(probed > 0.0 && (probed - measured).abs() <= 0.25 * measured + 10.0, || {
                format!("{name}: downtime {probed} ms by the probes, {measured} ms by vmbeamctl")
            })?;
            println!("# {name}: downtime {probed:.2} ms (probes), {measured:.2} ms (vmbeamctl)");
        }
        // The aged L1's probe of its old windows (verify) was refused by the
        // module, and the kernel saw each refusal.
        let denied_by_vmm: u64 = r["l2"]
            .as_array()
            .map_or(0, |rows| rows.iter().filter_map(|row| row["old_owner"]["vmm_denied"].as_u64()).sum());
        let aged_pid = &r["from"]["pid"];
        let aged_faults = r["trace"]["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| &p["pid"] == aged_pid))
            .map(|p| p["faults"]["region_denied"].clone())
            .unwrap_or_default();
        let refused: u64 = aged_faults.as_object().map_or(0, |o| o.values().filter_map(|h| h["count"].as_u64()).sum());
        check(denied_by_vmm > 0 && refused >= denied_by_vmm, || {
            format!("aged L1: {denied_by_vmm} reads denied, {refused} refused faults traced: {aged_faults}")
        })?;
        let events: Vec<&str> =
            r["trace"]["events"].as_array().map_or(vec![], |e| e.iter().filter_map(|e| e["event"].as_str()).collect());
        for want in ["transfer_start", "transfer_done", "revoke", "first_guest_entry_after_move"] {
            check(events.contains(&want), || format!("event {want} missing: {events:?}"))?;
        }
        Ok(())
    });

    tap.test_retrying_on(WILD_RIP, "huge_windows_move_and_run_on", || {
        let (aged, clean) = (Lab::start_with("aged", 2, &["--huge"])?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let before = dev.stats().map_err(|e| e.to_string())?;
        let (code, r, out) = migrate(&aged, &clean, &[])?;
        check(code == Some(0) && r["committed"] == true, || {
            format!("exit {code:?}: {r}\n{}", String::from_utf8_lossy(&out.stderr))
        })?;
        for row in r["l2"].as_array().ok_or("no l2 rows")? {
            check(row["errors"] == 0 && row["checksum_ok"] == true, || format!("workload {row}"))?;
            let old = &row["old_owner"];
            check(old["pages"].as_u64() > Some(0) && old["vmm_denied"] == old["pages"], || format!("old owner {old}"))?;
        }
        // pagemap cannot see PFNMAP mappings: the frames come from the
        // owners' page tables (VMBEAM_REGION_FRAMES), page for page the
        // same on both sides.
        for row in r["l2"].as_array().ok_or("no l2 rows")? {
            check(row["frames_compared"] == 2048 && row["frames_same"] == row["frames_compared"], || {
                format!("frames: {} of {} the same", row["frames_same"], row["frames_compared"])
            })?;
        }
        let after = dev.stats().map_err(|e| e.to_string())?;
        check(
            after.bytes_copied == before.bytes_copied && after.pages_transferred - before.pages_transferred == 2 * 2048,
            || {
                format!(
                    "{} pages transferred, {} bytes copied",
                    after.pages_transferred - before.pages_transferred,
                    after.bytes_copied - before.bytes_copied
                )
            },
        )?;
        all_home(&clean, 2)
    });

    tap.test_retrying_on(WILD_RIP, "round_trips_there_and_back_keep_every_byte_and_reuse_vcpus", || {
        let (a, b) = (Lab::start("a", 2)?, Lab::start("b", 0)?);
        for (from, to) in [(&a, &b), (&b, &a)].repeat(3) {
            let (code, r, _) = migrate(from, to, &[])?;
            check(code == Some(0) && r["totals"]["bytes_copied"] == 0, || format!("{code:?} {r}"))?;
        }
        // KVM frees a vCPU only with its VM: an L1 that made one for every
        // L2 it received would hold 8 here, and run out after ~1,000.
        for lab in [&a, &b] {
            let vcpus = vcpu_fds(lab)?;
            check(vcpus <= 3, || format!("{vcpus} vCPUs in one lab L1 after 3 round trips of 2 L2s"))?;
        }
        // An L2 that failed on either side is named with its detail first:
        // a wild exit under TCG carries WILD_RIP, and the test runs once
        // more (CI at 5c6d459 counted only "1 L2s, expected 2" and failed).
        let failed: Vec<String> = a
            .vms()?
            .iter()
            .chain(&b.vms()?)
            .filter(|v| v.state == L2State::Failed)
            .map(|v| format!("{}: {:?}", v.name, v.detail))
            .collect();
        check(failed.is_empty(), || format!("failed L2s: {}", failed.join("; ")))?;
        // Back home: the entries it left behind were replaced, not doubled.
        all_home(&a, 2)?;
        let there = b.vms()?;
        check(there.iter().all(|v| v.state == L2State::Migrated), || format!("b: {there:?}"))
    });

    tap.test_retrying_on(WILD_RIP, "one_at_a_time_each_l2_stops_after_the_one_before_runs_again", || {
        let (aged, clean) = (Lab::start("aged", 3)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let (code, r, out) = migrate(&aged, &clean, &["--one-at-a-time"])?;
        check(code == Some(0), || format!("exit {code:?}: {r}\n{}", String::from_utf8_lossy(&out.stderr)))?;
        check(r["ok"] == true && r["committed"] == true && r["error"].is_null(), || format!("report: {r}"))?;
        let mut rows: Vec<&Value> = r["l2"].as_array().ok_or("no l2 rows")?.iter().collect();
        check(rows.len() == 3, || format!("{} rows", rows.len()))?;
        let pages = (8 << 20) / 4096;
        for row in &rows {
            moved_whole_zero_copy(row, pages)?;
        }
        // Each in its own pause: one stops only once the one before it
        // runs on the clean L1.
        rows.sort_by_key(|row| row["paused_at_ns"].as_u64());
        for pair in rows.windows(2) {
            let (before, next) = (pair[0], pair[1]);
            check(next["paused_at_ns"].as_u64() > before["resumed_at_ns"].as_u64(), || {
                format!("{} paused before {} ran again: {before} {next}", next["name"], before["name"])
            })?;
        }
        let (t, m) = (&r["totals"], &r["module"]);
        check(t["l2"] == 3 && t["downtime_ms_max"].as_f64() >= t["downtime_ms_mean"].as_f64(), || format!("{t}"))?;
        check(m["transfers"] == 3 && m["bytes_copied"] == 0, || format!("module {m}"))?;
        all_moved(&aged, &clean, 3)
    });

    tap.test_retrying_on(WILD_RIP, "one_at_a_time_a_failed_first_move_leaves_every_l2_on_the_aged_l1", || {
        let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let (code, r, _) = migrate(&aged, &clean, &["--one-at-a-time", "--inject-failure", "transfer"])?;
        let error = r["error"].as_str().unwrap_or("");
        check(code == Some(1) && r["failed_step"] == "transfer" && r["rolled_back"].is_string(), || {
            format!("{code:?} {r}")
        })?;
        check(error.contains("the first of 2 L2s one at a time"), || format!("error: {error}"))?;
        check(r["l2"].as_array().map(Vec::len) == Some(1), || format!("rows: {r}"))?;
        check(clean.vms()?.is_empty(), || "the clean L1 got L2s".into())?;
        all_home(&aged, 2)
    });

    tap.test_retrying_on(WILD_RIP, "dry_run_changes_nothing", || {
        let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        let before = dev.stats().map_err(|e| e.to_string())?;
        let (code, r, _) = migrate(&aged, &clean, &["--dry-run"])?;
        check(code == Some(0) && r["ok"] == true && r["dry_run"] == true && r["committed"] == false, || {
            format!("{code:?} {r}")
        })?;
        check(r["l2"].as_array().map(Vec::len) == Some(2), || format!("plan: {r}"))?;
        let after = dev.stats().map_err(|e| e.to_string())?;
        check(after.transfers == before.transfers && after.revocations == before.revocations, || {
            "counters moved".into()
        })?;
        check(clean.vms()?.is_empty(), || "the clean L1 got L2s".into())?;
        all_home(&aged, 2)
    });

    for step in ["pause", "send"] {
        tap.test_retrying_on(WILD_RIP, &format!("failure_after_{step}_resumes_every_l2_on_the_aged_l1"), || {
            let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
            let before = dev.stats().map_err(|e| e.to_string())?;
            let (code, r, _) = migrate(&aged, &clean, &["--inject-failure", step])?;
            check(code == Some(1) && r["ok"] == false && r["committed"] == false, || format!("{code:?} {r}"))?;
            check(r["failed_step"] == step && r["rolled_back"].is_string(), || format!("report: {r}"))?;
            let after = dev.stats().map_err(|e| e.to_string())?;
            check(after.transfers == before.transfers && after.revocations == before.revocations, || {
                "a region changed owner".into()
            })?;
            check(clean.vms()?.is_empty(), || "the clean L1 got L2s".into())?;
            all_home(&aged, 2)
        });
    }

    tap.test_retrying_on(WILD_RIP, "downtime_budget_exceeded_before_the_transfer_rolls_back", || {
        let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        // Paused for at least some ns by the time the transfer would start.
        let (code, r, _) = migrate(&aged, &clean, &["--downtime-ms", "0"])?;
        let error = r["error"].as_str().unwrap_or("");
        check(code == Some(1) && r["committed"] == false && error.contains("--downtime-ms"), || {
            format!("{code:?} {r}")
        })?;
        check(clean.vms()?.is_empty(), || "the clean L1 got L2s".into())?;
        all_home(&aged, 2)
    });

    tap.test_retrying_on(WILD_RIP, "failure_after_the_grant_transfers_back_and_resumes_on_the_aged_l1", || {
        let (aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let (code, r, _) = migrate(&aged, &clean, &["--inject-failure", "transfer"])?;
        check(code == Some(1) && r["failed_step"] == "transfer" && r["rolled_back"].is_string(), || {
            format!("{code:?} {r}")
        })?;
        check(clean.vms()?.is_empty(), || "the clean L1 got L2s".into())?;
        all_home(&aged, 2)
    });

    tap.test_retrying_on(WILD_RIP, "malformed_control_messages_get_errors_and_change_nothing", || {
        let lab = Lab::start("lab", 2)?;
        let mut c = lab.client()?;
        let cases: [(&[u8], &str); 5] = [
            (b"this is not json\n", "GenericError"),
            (b"{\"execute\": \"reboot-the-world\"}\n", "CommandNotFound"),
            (b"{\"execute\": \"pause\", \"arguments\": {\"vms\": 7}}\n", "GenericError"),
            (b"{\"execute\": \"pause\", \"arguments\": {\"vms\": [\"nobody\"]}}\n", "DeviceNotFound"),
            (b"{\"execute\": \"receive-regions\", \"arguments\": {\"vms\": []}}\n", "GenericError"),
        ];
        for (bytes, class) in cases {
            let reply = c.raw(bytes).map_err(|e| e.to_string())?;
            check(reply["error"]["class"] == class && reply["error"]["desc"].is_string(), || {
                format!("{}: reply {reply}, expected {class}", String::from_utf8_lossy(bytes).trim())
            })?;
        }
        // A region fd that is not a region, fds to a command that takes none.
        let null = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
        let handoff = json!({"vms": [{"name": "x", "window": {"gpa": 0x3000_0000u64, "size": 8 << 20}, "regs": {
            "rax": 0, "rbx": 0, "rcx": 0, "rdx": 0, "rsi": 0x3000_0000u64, "rdi": 0, "rbp": 0, "rsp": 0, "rip": 0x1043, "rflags": 2},
            "paused_at_ns": 0, "passes": 0, "fd": 0}]});
        let args: ReceiveArgs = serde_json::from_value(handoff).map_err(|e| e.to_string())?;
        let got = c.call_with_fds::<Value>("receive-regions", &args, &[null.as_fd()]);
        check(matches!(&got, Err(vmbeam::control::ControlError::Remote { desc, .. }) if desc.contains("not a vmbeam region")), || {
            format!("non-region fd: {got:?}")
        })?;
        let got = c.call_with_fds::<Value>("query-status", (), &[null.as_fd()]);
        check(matches!(&got, Err(vmbeam::control::ControlError::Remote { errno: Some(libc::EINVAL), .. })), || {
            format!("fds to query-status: {got:?}")
        })?;
        // One L2 paused, one running: send-regions of both fails and marks
        // neither as sent.
        c.call::<Value>("pause", Selection::of(["lab-vm0"])).map_err(|e| e.to_string())?;
        let got = c.call::<Value>("send-regions", ());
        check(matches!(&got, Err(vmbeam::control::ControlError::Remote { class: ErrorClass::GenericError, .. })), || {
            format!("send-regions of a running L2: {got:?}")
        })?;
        let states: Vec<L2State> = lab.vms()?.iter().map(|v| v.state).collect();
        check(states == [L2State::Paused, L2State::Running], || format!("after a failed send-regions: {states:?}"))?;
        c.call::<Value>("resume", Selection::all()).map_err(|e| e.to_string())?;

        // An endless line ends that connection, not the server.
        let long = vec![b'x'; vmbeam::control::MAX_LINE + 2];
        let reply = c.raw(&long);
        check(matches!(&reply, Ok(v) if v["error"].is_object()), || format!("long line: {reply:?}"))?;
        let status: L1Status = lab.client()?.call("query-status", ()).map_err(|e| e.to_string())?;
        check(status.l2_vms == 2 && status.running == 2, || format!("after bad input: {status:?}"))?;
        all_home(&lab, 2)?;
        // `quit` ends the L1 cleanly.
        let mut lab = lab;
        lab.client()?.call::<Value>("quit", ()).map_err(|e| e.to_string())?;
        let status = lab.child.wait().map_err(|e| e.to_string())?;
        check(status.success(), || format!("after quit: {status}"))
    });

    // The lab's downtime path: lent while running, staged without
    // registers, which must then come in the window (`pause` with
    // `save_state`). Without them the commit fails and loses nothing.
    tap.test_retrying_on(WILD_RIP, "a_commit_without_a_saved_state_fails_and_loses_nothing", || {
        let (aged, clean) = (Lab::start("aged", 1)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let (mut a, mut c) = (aged.client()?, clean.client()?);
        let (lent, fds): (Sent, Vec<OwnedFd>) =
            a.call_with_fds("lend-regions", Selection::all(), &[]).map_err(|e| e.to_string())?;
        check(lent.vms.len() == 1 && fds.len() == 2 && lent.vms[0].regs.is_none(), || format!("lent: {lent:?}"))?;
        let state = aged.vms()?[0].state;
        check(state == L2State::Running, || format!("lent L2 is {state:?}, not running on"))?;
        let (_, mut vm) = c.call_with_fds::<Value>("get-vm-fd", (), &[]).map_err(|e| e.to_string())?;
        let clean_vm = vm.pop().ok_or("get-vm-fd: no fd")?;
        let staged = ReceiveArgs { vms: vec![Handoff { fd: 0, ..lent.vms[0].clone() }] };
        c.call_with_fds::<Value>("stage-regions", &staged, &[fds[1].as_fd()]).map_err(|e| e.to_string())?;
        a.call::<Value>("pause", PauseArgs::of([&lent.vms[0].name], false)).map_err(|e| e.to_string())?;
        let move_to = |from: &OwnedFd, to: &OwnedFd| {
            let t = vmbeam::Transfer { region: fds[1].as_fd(), from_vm: from.as_fd(), to_vm: to.as_fd() };
            dev.transfer_batch(&[t]).map_err(|e| e.to_string())
        };
        move_to(&fds[0], &clean_vm)?;
        let got = c.call::<Value>("commit-staged", ());
        let no_state = matches!(&got, Err(ControlError::Remote { desc, .. }) if desc.contains("no CPU state"));
        move_to(&clean_vm, &fds[0])?;
        check(no_state, || format!("commit without registers in the window: {got:?}"))?;
        let left = clean.vms()?;
        check(left.is_empty(), || format!("the clean L1 kept {left:?}"))?;
        a.call::<Value>("resume", Selection::all()).map_err(|e| e.to_string())?;
        all_home(&aged, 1)
    });

    tap.test_retrying_on(WILD_RIP, "clean_l1_killed_mid_migration_every_l2_back_on_the_aged", || {
        let (aged, mut clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let child = stopped_migration(&aged, &clean, "transfer")?;
        let pid = Pid::from_raw(child.id() as i32);
        // The regions belong to the clean L1 now; it dies before mapping them.
        let _ = clean.child.kill();
        let _ = clean.child.wait();
        kill(pid, Signal::SIGCONT).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        check(out.status.code() == Some(1) && r["rolled_back"].is_string(), || format!("{:?} {r}", out.status.code()))?;
        all_home(&aged, 2)?;
        // Nothing leaked: the aged L1's regions (RAM + 2 L2s) are all there is.
        let alive = regions_alive(&dev)?;
        check(alive == 3, || format!("{alive} regions alive, expected 3 (the aged L1's)"))
    });

    tap.test_retrying_on(WILD_RIP, "aged_l1_killed_mid_migration_its_l2s_live_on_in_the_clean", || {
        let (mut aged, clean) = (Lab::start("aged", 2)?, Lab::start("clean", 0)?);
        aged.progresses(1)?;
        let child = stopped_migration(&aged, &clean, "send")?;
        let pid = Pid::from_raw(child.id() as i32);
        // The L2s' state and region fds are out; the aged L1 dies.
        let aged_pid = aged.pid();
        let _ = aged.child.kill();
        let _ = aged.child.wait();
        kill(pid, Signal::SIGCONT).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let r: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        check(out.status.code() == Some(0) && r["committed"] == true, || {
            format!("{:?} {r} (aged was {aged_pid})", out.status.code())
        })?;
        all_home(&clean, 2)?;
        let alive = regions_alive(&dev)?;
        check(alive == 3, || format!("{alive} regions alive, expected 3 (the clean L1's)"))
    });

    // SIGKILL of vmbeamctl after each step: the region's owner decides
    // where the L2s run (the transfer is the one commit point), and no L2
    // is left stopped or lost.
    for (step, lands_in_clean) in
        [("plan", false), ("prepare", false), ("pause", false), ("send", false), ("transfer", true), ("receive", true)]
    {
        let side = if lands_in_clean { "run_on_in_the_clean" } else { "resume_on_the_aged" };
        tap.test_retrying_on(WILD_RIP, &format!("vmbeamctl_killed_after_{step}_its_l2s_{side}"), || {
            let (aged, clean) = (Lab::start("aged", 1)?, Lab::start("clean", 0)?);
            aged.progresses(1)?;
            let mut child = stopped_migration(&aged, &clean, step)?;
            child.kill().map_err(|e| e.to_string())?;
            let _ = child.wait();
            let (home, away) = if lands_in_clean { (&clean, &aged) } else { (&aged, &clean) };
            let deadline = Instant::now() + TIMEOUT;
            while home.vms()?.iter().filter(|v| v.state == L2State::Running).count() != 1 {
                check(Instant::now() < deadline, || format!("no L2 running where it should: {:?}", home.vms()))?;
                std::thread::sleep(Duration::from_millis(20));
            }
            let elsewhere: Vec<_> = away.vms()?.into_iter().filter(|v| v.state == L2State::Running).collect();
            check(elsewhere.is_empty(), || format!("also running on the other L1: {elsewhere:?}"))?;
            all_home(home, 1)
        });
    }

    tap.test_retrying_on(WILD_RIP, "no_region_outlives_the_lab_l1s", || {
        let alive = regions_alive(&dev)?;
        check(alive == 0, || format!("{alive} regions alive after every lab L1 exited"))
    });

    tap.finish()
}
