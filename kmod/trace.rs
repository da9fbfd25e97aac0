// SPDX-License-Identifier: GPL-2.0

//! Safe wrappers over the tracepoints defined in `vmbeam_trace.h`.
//! `vmbeam:revoke` and `vmbeam:fault` fire in `glue.c`, next to the calls
//! they describe.

use core::ffi::{c_int, c_uint, c_ulong};

extern "C" {
    fn vmbeam_trace_transfer_start(regions: c_uint);
    fn vmbeam_trace_transfer_done(regions: c_uint, pages: c_ulong, ret: c_int);
}

/// `vmbeam:transfer_start`: a transfer of `regions` regions begins.
pub(crate) fn transfer_start(regions: usize) {
    // SAFETY: no preconditions; a no-op unless the tracepoint is enabled.
    unsafe { vmbeam_trace_transfer_start(regions as c_uint) };
}

/// `vmbeam:transfer_done`: it ended with `ret` (0 or -errno).
pub(crate) fn transfer_done(regions: usize, pages: u64, ret: c_int) {
    // SAFETY: as above.
    unsafe { vmbeam_trace_transfer_done(regions as c_uint, pages as c_ulong, ret) };
}
