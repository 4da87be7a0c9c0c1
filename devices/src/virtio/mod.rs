//! Virtio devices and their PCI transport.
//!
//! The transport (`pci`) owns everything guest-visible about virtio-over-PCI: capabilities,
//! the common configuration structure, notification addresses, ISR, MSI-X. A device model
//! (`block`) sees only [`VirtioDevice`]: its features, its configuration space, and, once the
//! driver sets DRIVER_OK, its queues with their notifiers and an interrupt handle.

pub mod block;
pub mod pci;
/// Also outside tests: the device-path benchmark drives queues with it.
pub mod testing;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device ids (virtio 1.2, 5).
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Feature bits every modern device offers (virtio 1.2, 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// How a device raises interrupts; implemented by the transport, which maps a queue to the
/// MSI-X vector the driver chose for it and handles masking and pending bits.
pub trait VirtioInterrupt: Send + Sync {
    /// A used-buffer notification for queue `queue`. The device has already applied
    /// notification suppression (EVENT_IDX); this always signals.
    fn notify_queue(&self, queue: u16);
    /// The device configuration changed (e.g. capacity).
    fn notify_config(&self);
}

/// One queue handed to a device at activation.
pub struct ActiveQueue {
    pub index: u16,
    /// Configured by the driver (size, ring addresses, EVENT_IDX per negotiated features) and
    /// marked ready.
    pub queue: Queue,
    /// Written by the guest's notification (an ioeventfd under KVM, the transport's MMIO
    /// handler otherwise): the device waits on it.
    pub notifier: Arc<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not usable: {1}")]
    BadQueue(u16, String),
    #[error("device cannot start: {0}")]
    Device(String),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id, e.g. [`VIRTIO_ID_BLOCK`].
    fn device_type(&self) -> u32;
    /// Number of queues the device offers.
    fn num_queues(&self) -> u16;
    /// Largest size the driver may give each queue.
    fn max_queue_size(&self) -> u16;
    /// Features offered (including [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads the device-specific configuration structure. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration structure (most fields are read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` (only those the driver enabled) with the features
    /// the driver accepted.
    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        acked_features: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Device reset: stop serving; when this returns, no thread of the device touches guest
    /// memory or signals interrupts for the old queues any more. In-flight requests are
    /// dropped (their buffers are never marked used).
    fn reset(&mut self);
}
