//! The engine of `fuzz_test`: a shared pool of fds of every kind and the
//! workers that call the module with them (see the binary's doc).
//!
//! A worker picks its fds under the pool lock and works on `dup`s of them,
//! so the kind it believes a fd has is the kind it has and the errno oracle
//! holds; one call in ten uses the pool's own number instead, which another
//! thread may be closing or reusing at that moment (the module must cope;
//! the oracle is off for that call).
//!
//! [`pool`] holds the fds; [`worker`] is a thread's state and its helpers;
//! [`calls`] are the module's commands it makes; [`memory`] the mappings,
//! fds, VMs, guest reads and killed children around them.

mod calls;
mod memory;
mod pool;
mod worker;

pub use pool::{Fd, Kind, Pool, Reached};
pub use worker::Worker;
