//! What a selftest needs before it can run, or a TAP skip that says why.

use vmbeam::Device;

use crate::Tap;

/// `/dev/vmbeam` and `/dev/kvm`, or the whole program skipped (exit 4).
pub fn vmbeam_and_kvm() -> Device {
    let dev = match Device::open() {
        Ok(d) => d,
        Err(e) => Tap::skip_all(&e.to_string()),
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        Tap::skip_all("/dev/kvm missing");
    }
    dev
}

/// Fails unless `got` is the error `want`.
pub fn errno_is(
    what: &str,
    got: Result<impl std::fmt::Debug, vmbeam::Error>,
    want: nix::errno::Errno,
) -> crate::TestResult {
    match got {
        Err(e) if e.errno() == Some(want) => Ok(()),
        other => Err(format!("{what}: expected {want} ({}), got {other:?}", want.desc())),
    }
}
