//! The project's other binaries (vmbeamctl, vmbeam-lab), found next to the
//! running selftest: they are built into the same target directory.

use std::path::PathBuf;

/// The path of binary `name` beside this one (or `name`, for `$PATH`).
pub fn exe(name: &str) -> PathBuf {
    std::env::current_exe().map(|p| p.with_file_name(name)).unwrap_or_else(|_| name.into())
}
