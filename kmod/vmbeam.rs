// SPDX-License-Identifier: GPL-2.0

//! vmbeam: zero-copy ownership transfer of KVM guest memory.
//!
//! The crate root only wires the modules together; `/dev/vmbeam` and its
//! ioctls live in [`device`], regions in [`region`] (their pages in
//! [`pages`]), their owners in [`owner`], transfer in [`transfer`], gather
//! in [`gather`], the frames an owner maps in [`frames`], the uAPI mirror
//! in [`uapi`], counters in [`stats`].

use kernel::prelude::*;

mod device;
mod frames;
mod gather;
mod owner;
mod pages;
mod region;
mod stats;
mod trace;
mod transfer;
mod uapi;

module! {
    type: VmBeam,
    name: "vmbeam",
    author: "vmbeam developers",
    description: "Zero-copy ownership transfer of KVM guest memory between VMs",
    license: "GPL",
}

struct VmBeam {
    _device: device::Registration,
}

impl kernel::Module for VmBeam {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let pool = pages::pool_fill();
        let device = device::Registration::new().inspect_err(|_| pages::pool_drain())?;
        pr_info!(
            "loaded: /dev/vmbeam, uAPI version {}, {pool} GiB in the 1 GiB pool\n",
            uapi::VMBEAM_API_VERSION
        );
        Ok(VmBeam { _device: device })
    }
}

impl Drop for VmBeam {
    fn drop(&mut self) {
        // Regions pin the module: none is left, so the pool is whole.
        pages::pool_drain();
        pr_info!("unloading\n");
    }
}
