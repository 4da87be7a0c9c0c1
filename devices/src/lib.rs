//! Device models of blkswarm.
//!
//! Every model here is plain Rust over byte-level register accesses, so it can be driven in
//! process by a test without KVM. The VMM owns the buses and wires the models to KVM exits.

pub mod bus;
pub mod fuzzing;
pub mod io;
pub mod latency;
pub mod legacy;
pub mod nvme;
pub mod pci;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
