//! Safe Rust API over `/dev/vmbeam`.
//!
//! Types and ioctl numbers come from `kmod/include/uapi/vmbeam.h` through
//! bindgen ([`uapi`]); this crate adds safe wrappers whose errors carry the
//! errno and what it means for that call.
//!
//! ```no_run
//! let dev = vmbeam::Device::open()?;
//! let stats = dev.stats()?;
//! println!("uAPI {}, {} regions", dev.api_version()?, stats.regions);
//! # Ok::<(), vmbeam::Error>(())
//! ```

pub mod clock;
pub mod control;
mod device;
mod error;
pub mod pagemap;
pub mod procfs;
pub mod qmp;
mod region;
pub mod runs;
pub mod uapi;

pub use device::{Blocks, Device, DEVICE_PATH};
pub use error::Error;
pub use region::{MappedFrame, Region, RegionInfo, Transfer};
pub use uapi::vmbeam_stats as Stats;
