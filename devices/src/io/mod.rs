//! Host-side I/O: a fixed pool of worker threads, each driving one io_uring, and the block
//! backends whose operations those rings carry.
//!
//! Devices never see io_uring: a device's queue is a [`QueueHandler`] that the pool calls on
//! guest notifications and on completions, and block requests reach the ring only through a
//! [`BlockBackend`].

pub mod backend;
pub mod faults;
pub mod pool;
mod user_data;

pub use backend::{BackendError, BlockBackend, BlockIo, BlockIoKind, Submitted};
pub use faults::{FaultCounts, FaultSettings, Faults};
pub use pool::{IoPool, IoPoolError, IoSubmitter, QueueHandler, QueueRegistration};
