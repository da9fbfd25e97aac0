//! Shared helpers of the vmbeam selftests (the `lib/` of KVM's selftests).
//!
//! Each selftest binary prints TAP 13, exits 0 when every test passed, 1
//! when one failed, and 4 (the kselftest skip code) when it cannot run here.

pub mod bench;
mod churn;
mod exe;
pub mod fuzz;
pub mod guest;
pub mod pair;
pub mod require;
pub mod tap;
pub mod vmm;

pub use exe::exe;
pub use tap::{check, Tap, TestResult};
