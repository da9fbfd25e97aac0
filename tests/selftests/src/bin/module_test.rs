//! vmbeam.ko's lifetime: an open fd pins the module, unload and reload work,
//! each says one line in the kernel log, and vmbeamctl explains a missing
//! module. Needs VMBEAM_KO (path to vmbeam.ko); leaves the module loaded.

use std::{
    ffi::CString,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
};

use nix::errno::Errno;
use vmbeam::{Device, DEVICE_PATH};
use vmbeam_selftests::{check, Tap, TestResult};

const NAME: &str = "vmbeam";

fn delete_module() -> Result<(), Errno> {
    let name = CString::new(NAME).unwrap();
    // SAFETY: a NUL-terminated name; O_NONBLOCK, as rmmod uses.
    Errno::result(unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) }).map(drop)
}

fn load_module(ko: &Path) -> Result<(), String> {
    let file = File::open(ko).map_err(|e| format!("open {}: {e}", ko.display()))?;
    let params = CString::new("").unwrap();
    // SAFETY: a valid fd and an empty parameter string.
    Errno::result(unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) })
        .map(drop)
        .map_err(|e| format!("finit_module: {e} ({})", e.desc()))
}

fn module_loaded() -> bool {
    Path::new("/sys/module").join(NAME).exists()
}

/// Kernel log lines from `vmbeam:` printed since `skip` lines.
fn kmsg_lines() -> Vec<String> {
    let out = Command::new("dmesg").output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).lines().filter(|l| l.contains("vmbeam: ")).map(str::to_owned).collect()
}

fn vmbeamctl() -> PathBuf {
    std::env::current_exe().unwrap().with_file_name("vmbeamctl")
}

fn main() {
    let Some(ko) = std::env::var_os("VMBEAM_KO").map(PathBuf::from) else {
        Tap::skip_all("VMBEAM_KO is not set (path to vmbeam.ko)");
    };
    if !module_loaded() {
        Tap::skip_all("vmbeam.ko is not loaded");
    }
    let mut tap = Tap::new(7);

    tap.test("rmmod_refused_while_fd_open", || {
        let dev = Device::open().map_err(|e| e.to_string())?;
        let got = delete_module();
        drop(dev);
        // delete_module says EWOULDBLOCK (== EAGAIN) for a module in use.
        check(got == Err(Errno::EWOULDBLOCK), || format!("expected EWOULDBLOCK, got {got:?}"))?;
        check(module_loaded(), || "module vanished".into())
    });

    tap.test("rmmod_refused_while_a_region_exists", || {
        let region = Device::open().and_then(|dev| dev.create_region(4096)).map_err(|e| e.to_string())?;
        // /dev/vmbeam is closed now; only the region fd pins the module.
        let got = delete_module();
        drop(region);
        check(got == Err(Errno::EWOULDBLOCK), || format!("expected EWOULDBLOCK with a region alive, got {got:?}"))
    });

    let before = kmsg_lines().len();
    tap.test("rmmod_allowed_after_close", || {
        delete_module().map_err(|e| format!("delete_module: {e} ({})", e.desc()))?;
        check(!module_loaded(), || "module still in /sys/module".into())?;
        check(!Path::new(DEVICE_PATH).exists(), || format!("{DEVICE_PATH} still exists"))
    });

    tap.test("vmbeamctl_explains_missing_module", || -> TestResult {
        let out = Command::new(vmbeamctl()).arg("status").output().map_err(|e| e.to_string())?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        check(out.status.code() == Some(1), || format!("exit {:?}, expected 1", out.status.code()))?;
        check(stderr.contains("not loaded") && stderr.contains("insmod"), || format!("unhelpful message: {stderr}"))
    });

    tap.test("reload_creates_device", || {
        load_module(&ko)?;
        check(module_loaded(), || "not in /sys/module after finit_module".into())?;
        let dev = Device::open().map_err(|e| e.to_string())?;
        dev.api_version().map(drop).map_err(|e| e.to_string())
    });

    tap.test("one_log_line_on_unload_and_one_on_load", || {
        let new: Vec<_> = kmsg_lines().into_iter().skip(before).collect();
        let unload = new.iter().filter(|l| l.contains("unloading")).count();
        let load = new.iter().filter(|l| l.contains("loaded: /dev/vmbeam")).count();
        check(unload == 1 && load == 1, || format!("expected one unload and one load line, got:\n{}", new.join("\n")))
    });

    tap.test("modinfo_has_license_author_description", || {
        let out = Command::new("modinfo").arg(&ko).output().map_err(|e| format!("modinfo: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        for key in ["license:", "author:", "description:"] {
            check(text.lines().any(|l| l.starts_with(key)), || format!("no {key} in modinfo:\n{text}"))?;
        }
        check(text.contains("GPL"), || format!("license is not GPL:\n{text}"))
    });

    tap.finish()
}
