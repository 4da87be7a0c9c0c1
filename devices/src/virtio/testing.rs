//! A test-side virtio split-queue driver over a `GuestMemoryMmap`, playing the guest: it lays out
//! the rings, builds direct and indirect chains, publishes them, kicks the notifier, and reads
//! the used ring back, with EVENT_IDX on both sides (it writes `used_event`, reads
//! `avail_event`). Plus a [`VirtioInterrupt`] that counts and lets a thread wait for interrupts.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActiveQueue, VirtioInterrupt};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

const DESCRIPTOR_BYTES: u64 = 16;

/// One buffer of a chain, as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub device_writes: bool,
}

impl Buffer {
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writes: false,
        }
    }

    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writes: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElement {
    pub id: u32,
    pub len: u32,
}

/// The driver side of one split virtqueue.
pub struct TestQueue {
    memory: GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    event_idx: bool,
    free_descriptors: Vec<u16>,
    /// Descriptors of each published chain, freed when the chain comes back used.
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    /// avail_idx at the last kick decision (for EVENT_IDX's vring_need_event).
    kicked_at: u16,
    last_used: u16,
    pub notifier: Arc<EventFd>,
}

impl TestQueue {
    /// Bytes the rings of a queue of `size` occupy from their base address.
    pub fn footprint(size: u16) -> u64 {
        let size = u64::from(size);
        let used = align_up(DESCRIPTOR_BYTES * size + 6 + 2 * size, 4);
        used + 6 + 8 * size
    }

    /// Lays out (and zeroes) the rings of a queue of `size` entries at `base`.
    pub fn new(memory: &GuestMemoryMmap, base: GuestAddress, size: u16, event_idx: bool) -> Self {
        assert!(size.is_power_of_two());
        let desc_table = base;
        let avail_ring = base.unchecked_add(DESCRIPTOR_BYTES * u64::from(size));
        let used_ring = GuestAddress(align_up(
            avail_ring.raw_value() + 6 + 2 * u64::from(size),
            4,
        ));
        let zeroes = vec![0u8; Self::footprint(size) as usize];
        memory.write_slice(&zeroes, base).expect("rings in memory");
        TestQueue {
            memory: memory.clone(),
            size,
            desc_table,
            avail_ring,
            used_ring,
            event_idx,
            free_descriptors: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            kicked_at: 0,
            last_used: 0,
            notifier: Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device-side queue, configured and ready, as the transport would build it.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).expect("queue size");
        queue
            .try_set_desc_table_address(self.desc_table)
            .expect("desc table");
        queue
            .try_set_avail_ring_address(self.avail_ring)
            .expect("avail ring");
        queue
            .try_set_used_ring_address(self.used_ring)
            .expect("used ring");
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        queue
    }

    pub fn active_queue(&self, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.queue(),
            notifier: self.notifier.clone(),
        }
    }

    /// Writes descriptor `index` verbatim (for hostile chains).
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: GuestAddress,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self
            .desc_table
            .unchecked_add(DESCRIPTOR_BYTES * u64::from(index));
        write_raw_descriptor(&self.memory, at, addr, len, flags, next);
    }

    pub fn free_descriptors(&self) -> usize {
        self.free_descriptors.len()
    }

    /// Builds a chain of direct descriptors; returns its head. Panics when out of descriptors.
    pub fn add_chain(&mut self, buffers: &[Buffer]) -> u16 {
        assert!(!buffers.is_empty());
        assert!(
            self.free_descriptors.len() >= buffers.len(),
            "out of descriptors"
        );
        let indices: Vec<u16> = (0..buffers.len())
            .map(|_| self.free_descriptors.pop().expect("checked"))
            .collect();
        for (position, buffer) in buffers.iter().enumerate() {
            let last = position + 1 == buffers.len();
            let mut flags = if buffer.device_writes {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let next = if last {
                0
            } else {
                flags |= VIRTQ_DESC_F_NEXT;
                indices[position + 1]
            };
            self.write_descriptor(indices[position], buffer.addr, buffer.len, flags, next);
        }
        let head = indices[0];
        self.chains.insert(head, indices);
        head
    }

    /// Builds a chain through an indirect table written at `table`; returns its head.
    pub fn add_indirect_chain(&mut self, table: GuestAddress, buffers: &[Buffer]) -> u16 {
        for (position, buffer) in buffers.iter().enumerate() {
            let last = position + 1 == buffers.len();
            let mut flags = if buffer.device_writes {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let at = table.unchecked_add(DESCRIPTOR_BYTES * position as u64);
            let next = if last { 0 } else { position as u16 + 1 };
            write_raw_descriptor(&self.memory, at, buffer.addr, buffer.len, flags, next);
        }
        let head = self.free_descriptors.pop().expect("out of descriptors");
        let table_len = DESCRIPTOR_BYTES as u32 * buffers.len() as u32;
        self.write_descriptor(head, table, table_len, VIRTQ_DESC_F_INDIRECT, 0);
        self.chains.insert(head, vec![head]);
        head
    }

    /// Makes `head` available to the device (does not kick).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.memory
            .write_obj(head.to_le(), self.avail_ring.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.memory
            .store(
                self.avail_idx.to_le(),
                self.avail_ring.unchecked_add(2),
                Ordering::Release,
            )
            .expect("avail idx");
    }

    /// Sets the avail index to `avail_idx` whatever was published (for hostile drivers).
    pub fn set_avail_idx(&mut self, avail_idx: u16) {
        self.avail_idx = avail_idx;
        self.memory
            .store(
                avail_idx.to_le(),
                self.avail_ring.unchecked_add(2),
                Ordering::Release,
            )
            .expect("avail idx");
    }

    /// Notifies the device unconditionally.
    pub fn kick(&mut self) {
        self.kicked_at = self.avail_idx;
        self.notifier.write(1).expect("kick");
    }

    /// Notifies the device only if it asked for it (avail_event with EVENT_IDX, the used
    /// ring's NO_NOTIFY flag otherwise), like Linux's virtqueue_kick_prepare.
    pub fn kick_if_needed(&mut self) -> bool {
        // The avail index store must be visible before reading the device's wishes.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let event = self.avail_event();
            let new = self.avail_idx;
            let old = self.kicked_at;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        self.kicked_at = self.avail_idx;
        if needed {
            self.notifier.write(1).expect("kick");
        }
        needed
    }

    pub fn used_idx(&self) -> u16 {
        let idx: u16 = self
            .memory
            .load(self.used_ring.unchecked_add(2), Ordering::Acquire)
            .expect("used idx");
        u16::from_le(idx)
    }

    pub fn used_flags(&self) -> u16 {
        let flags: u16 = self
            .memory
            .load(self.used_ring, Ordering::Acquire)
            .expect("used flags");
        u16::from_le(flags)
    }

    /// The device's `avail_event` (EVENT_IDX): kick when publishing past it.
    pub fn avail_event(&self) -> u16 {
        let at = self.used_ring.unchecked_add(4 + 8 * u64::from(self.size));
        u16::from_le(
            self.memory
                .load(at, Ordering::Acquire)
                .expect("avail_event"),
        )
    }

    /// Sets `used_event` (EVENT_IDX): interrupt when the used index moves past it.
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
        self.memory
            .store(value.to_le(), at, Ordering::Release)
            .expect("used_event");
        fence(Ordering::SeqCst);
    }

    /// Used entries seen so far by this driver.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Takes the next used element, if any, and frees its descriptors.
    pub fn pop_used(&mut self) -> Option<UsedElement> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let at = self.used_ring.unchecked_add(4 + 8 * slot);
        let id = u32::from_le(self.memory.read_obj(at).expect("used elem"));
        let len = u32::from_le(
            self.memory
                .read_obj(at.unchecked_add(4))
                .expect("used elem"),
        );
        self.last_used = self.last_used.wrapping_add(1);
        if let Some(indices) = u16::try_from(id)
            .ok()
            .and_then(|id| self.chains.remove(&id))
        {
            self.free_descriptors.extend(indices);
        }
        Some(UsedElement { id, len })
    }

    /// Waits (polling) until `count` used elements arrived; panics after `timeout`.
    pub fn wait_used(&mut self, count: usize, timeout: Duration) -> Vec<UsedElement> {
        let deadline = Instant::now() + timeout;
        let mut used = Vec::with_capacity(count);
        while used.len() < count {
            match self.pop_used() {
                Some(element) => used.push(element),
                None => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out with {} of {count} used elements",
                        used.len()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        used
    }
}

fn write_raw_descriptor(
    memory: &GuestMemoryMmap,
    at: GuestAddress,
    addr: GuestAddress,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = [0u8; DESCRIPTOR_BYTES as usize];
    raw[0..8].copy_from_slice(&addr.raw_value().to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    memory.write_slice(&raw, at).expect("descriptor in memory");
}

fn align_up(value: u64, alignment: u64) -> u64 {
    value.div_ceil(alignment) * alignment
}

/// Counts interrupts per queue and lets a test wait for the next one.
pub struct FakeInterrupt {
    queues: Vec<AtomicU64>,
    config: AtomicU64,
    lock: Mutex<()>,
    signalled: Condvar,
}

impl FakeInterrupt {
    pub fn new(num_queues: u16) -> Arc<Self> {
        Arc::new(FakeInterrupt {
            queues: (0..num_queues).map(|_| AtomicU64::new(0)).collect(),
            config: AtomicU64::new(0),
            lock: Mutex::new(()),
            signalled: Condvar::new(),
        })
    }

    pub fn count(&self, queue: u16) -> u64 {
        self.queues[usize::from(queue)].load(Ordering::SeqCst)
    }

    pub fn total(&self) -> u64 {
        self.queues
            .iter()
            .map(|count| count.load(Ordering::SeqCst))
            .sum()
    }

    pub fn config_count(&self) -> u64 {
        self.config.load(Ordering::SeqCst)
    }

    /// Waits until queue `queue` has had more than `seen` interrupts; false on timeout.
    pub fn wait_past(&self, queue: u16, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.lock.lock().expect("lock");
        while self.count(queue) <= seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .signalled
                .wait_timeout(guard, deadline - now)
                .expect("lock")
                .0;
        }
        true
    }
}

impl VirtioInterrupt for FakeInterrupt {
    fn notify_queue(&self, queue: u16) {
        if let Some(count) = self.queues.get(usize::from(queue)) {
            count.fetch_add(1, Ordering::SeqCst);
        }
        // Taking the lock orders this wake-up after a waiter's check (no lost wake-up).
        let _guard = self.lock.lock().expect("lock");
        self.signalled.notify_all();
    }

    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}
