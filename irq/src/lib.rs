//! Interrupt delivery for blkswarm devices.
//!
//! Devices raise interrupts through small handles defined here and never talk to KVM themselves,
//! so device models stay testable without a VM. This issue provides legacy lines (an eventfd
//! bound to a GSI of the in-kernel IOAPIC through KVM irqfd); MSI-X routing builds on the same
//! irqfd mechanism, and PCI INTx lines are level-triggered irqfds with a resamplefd.

pub mod intx;
pub mod line;
pub mod msi;
pub mod msix;
pub mod recent;
pub mod routing;

pub use intx::{IntxLine, IntxResampler, IntxSource, KvmIntxOps};
pub use line::{IrqLine, LineTrigger};
pub use msi::{MsiMessage, MsiPath, MsiVector};
pub use recent::{InterruptSource, RecentInterrupt, RecentInterrupts};
pub use routing::{GsiRouter, KvmIrqOps, KvmMsiVector};
