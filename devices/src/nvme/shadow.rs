//! Shadow doorbells (Doorbell Buffer Config, NVMe 1.4 5.8), the emulated-controller
//! extension Linux uses when OACS bit 8 is set.
//!
//! The host gives two page-aligned buffers laid out like the doorbell registers: the
//! shadow doorbell buffer, where it stores every SQ tail and CQ head it would ring, and the
//! EventIdx buffer, where the controller says which value it wants to hear about. The host
//! writes the MMIO doorbell only when its new value passes the EventIdx (Linux's
//! `nvme_dbbuf_need_event`, the virtio EVENT_IDX rule). The controller therefore reads
//! indexes from the shadow buffer, and before it stops looking at a queue it publishes the
//! index it has reached, fences, and reads the shadow once more: a value the host stored
//! before seeing the new EventIdx is caught by that read, any later one rings.
//!
//! The admin queue keeps MMIO doorbells (Linux never gives it shadow slots).

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::registers::{Doorbell, DOORBELL_STRIDE};

/// The two buffers of a successful Doorbell Buffer Config, until the next reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorbellBuffers {
    pub shadow: GuestAddress,
    pub event_index: GuestAddress,
}

impl DoorbellBuffers {
    /// Bytes of each buffer that the doorbells of queues up to `max_queue_id` use.
    pub fn bytes_used(max_queue_id: u16) -> u64 {
        (u64::from(max_queue_id) + 1) * 2 * DOORBELL_STRIDE
    }

    /// The shadow and EventIdx slots of one doorbell.
    pub fn slot(&self, doorbell: Doorbell) -> ShadowDoorbell {
        let offset = doorbell.index() * DOORBELL_STRIDE;
        ShadowDoorbell {
            value: GuestAddress(self.shadow.0 + offset),
            event_index: GuestAddress(self.event_index.0 + offset),
        }
    }
}

/// A shadow slot could not be read or written: it left guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowMemoryError;

/// One doorbell's slots in the two buffers. Both are 4-byte aligned (page-aligned buffers,
/// 4-byte slots), so the accesses below are single atomic loads and stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowDoorbell {
    value: GuestAddress,
    event_index: GuestAddress,
}

impl ShadowDoorbell {
    /// The index the host last stored.
    pub fn read(&self, memory: &GuestMemoryMmap) -> Result<u32, ShadowMemoryError> {
        // Acquire: queue entries the host wrote before storing this index are visible.
        memory
            .load::<u32>(self.value, Ordering::Acquire)
            .map(u32::from_le)
            .map_err(|_| ShadowMemoryError)
    }

    /// Asks the host to ring once its index moves past `index`, then fences so that the
    /// caller's next [`Self::read`] cannot be ordered before this store.
    pub fn publish_event_index(
        &self,
        memory: &GuestMemoryMmap,
        index: u32,
    ) -> Result<(), ShadowMemoryError> {
        memory
            .store(index.to_le(), self.event_index, Ordering::Release)
            .map_err(|_| ShadowMemoryError)?;
        // Store-load ordering against the host, which stores its index and then loads ours.
        fence(Ordering::SeqCst);
        Ok(())
    }
}
