//! `vmbeamctl status` against the real module: text, JSON, exit codes.

use std::process::{Command, Output};

use vmbeam::Device;
use vmbeam_selftests::{check, Tap};

fn vmbeamctl(args: &[&str]) -> Result<Output, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("vmbeamctl");
    Command::new(&exe).args(args).output().map_err(|e| format!("run {}: {e}", exe.display()))
}

fn main() {
    let dev = match Device::open() {
        Ok(dev) => dev,
        Err(e) => Tap::skip_all(&format!("{e}")),
    };
    let mut tap = Tap::new(4);

    tap.test("status_text", || {
        let out = vmbeamctl(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        check(out.status.success(), || {
            format!("exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr))
        })?;
        let version = dev.api_version().map_err(|e| e.to_string())?;
        check(text.contains(&format!("uAPI version {version}")), || format!("no version in:\n{text}"))?;
        for row in ["regions", "pages owned", "transfers", "pages transferred", "revocations", "bytes copied"] {
            check(text.lines().any(|l| l.trim_start().starts_with(row)), || format!("no '{row}' row in:\n{text}"))?;
        }
        Ok(())
    });

    tap.test("status_json_matches_module", || {
        let out = vmbeamctl(&["status", "--json"])?;
        check(out.status.success(), || format!("exit {:?}", out.status.code()))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("not JSON: {e}"))?;
        let st = dev.stats().map_err(|e| e.to_string())?;
        let version = dev.api_version().map_err(|e| e.to_string())?;
        check(v["api_version"] == version, || format!("api_version {} != {version}", v["api_version"]))?;
        let want = [
            ("regions", st.regions),
            ("pages_owned", st.pages_owned),
            ("transfers", st.transfers),
            ("pages_transferred", st.pages_transferred),
            ("revocations", st.revocations),
            ("bytes_copied", st.bytes_copied),
        ];
        for (key, value) in want {
            check(v["stats"][key] == value, || format!("stats.{key} = {}, module says {value}", v["stats"][key]))?;
        }
        check(v["stats"].get("reserved").is_none(), || "input-only field 'reserved' in JSON".into())
    });

    tap.test("usage_error_exits_2", || {
        let out = vmbeamctl(&["no-such-command"])?;
        check(out.status.code() == Some(2), || format!("exit {:?}, expected 2", out.status.code()))
    });

    tap.test("help_lists_status", || {
        let out = vmbeamctl(&["--help"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        check(out.status.success() && text.contains("status"), || format!("help:\n{text}"))
    });

    tap.finish()
}
