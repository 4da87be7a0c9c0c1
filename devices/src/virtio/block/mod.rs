//! virtio-blk (virtio 1.2, 5.2) over the I/O worker pool.
//!
//! [`Block`] is the [`VirtioDevice`] the transport sees. On activation each enabled virtqueue
//! becomes a queue handler on one of the pool's workers (round robin); that worker polls the
//! queue's notifier, parses requests, submits them to the backend on its own io_uring and
//! returns used entries as completions arrive. Reset removes the handlers and waits until
//! nothing of theirs is in flight.

mod config;
mod queue;
pub mod request;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

pub use config::{BlockConfigSpace, CONFIG_SPACE_BYTES};
pub use request::{
    RequestError, MAX_REQUEST_DATA_BYTES, SECTOR_BYTES, SERIAL_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use self::queue::BlockQueue;
use self::request::{DiskLimits, RequestType};
use super::{
    ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::io::backend::MAX_WRITE_ZEROES_BYTES;
use crate::io::{BlockBackend, IoPool, QueueRegistration};
use crate::latency::QueueLatency;

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Largest virtqueue (virtio 1.2, 2.7: sizes are powers of two up to 32768).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Upper bound on `seg_max`: QEMU's default (queue size 256 minus header and status); keeps a
/// request's host buffers far below UIO_MAXIOV even when segments split across memory regions.
pub const MAX_SEGMENTS: u32 = 254;
/// Largest segment (one descriptor's buffer) the driver should send, offered with SIZE_MAX:
/// seg_max segments of this size stay within MAX_REQUEST_DATA_BYTES. Longer descriptors are
/// still served; the limit only shapes what Linux builds.
pub const MAX_SEGMENT_BYTES: u32 = 1 << 20;
/// Logical block size advertised: what Linux guests and raw images assume by default.
pub const BLOCK_SIZE_BYTES: u32 = 512;
/// Largest DISCARD: bounds the work one guest request asks of the host file system.
pub const MAX_DISCARD_BYTES: u64 = 1 << 30;
/// Discard granularity in sectors: 4 KiB, the block size of host file systems, so holes are
/// punched in whole blocks.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// What the VMM configures for one disk.
#[derive(Debug)]
pub struct BlockConfig {
    pub backend: BlockBackend,
    /// Virtqueues offered (MQ is offered when more than one).
    pub num_queues: u16,
    /// Largest size the driver may give each queue: a power of two.
    pub queue_size: u16,
    /// Refuse writes (the disk is also read-only if the backend is).
    pub read_only: bool,
    /// Returned by GET_ID: at most 20 bytes, NUL padded.
    pub serial: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("a virtio-blk disk needs at least one queue")]
    NoQueues,
    #[error("queue size {0} is not a power of two in 1..={MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("serial {0:?} is longer than {SERIAL_BYTES} bytes")]
    SerialTooLong(String),
}

macro_rules! counters {
    ($(#[$meta:meta])* $name:ident, $(#[$snapshot_meta:meta])* $snapshot:ident {
        $($(#[$field_meta:meta])* $field:ident,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: AtomicU64,)*
        }

        $(#[$snapshot_meta])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct $snapshot {
            $($(#[$field_meta])* pub $field: u64,)*
        }

        impl $name {
            pub fn snapshot(&self) -> $snapshot {
                $snapshot {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Per-device counters, updated by the I/O workers.
    BlockCounters,
    /// A point-in-time copy of [`BlockCounters`].
    BlockCountersSnapshot {
        requests_in,
        requests_out,
        requests_flush,
        requests_get_id,
        requests_discard,
        requests_write_zeroes,
        requests_unknown_type,
        bytes_read,
        bytes_written,
        /// Passes over the avail ring: one per guest notification, one per activation, one
        /// per continuation after a pass used up its budget.
        queue_notifications,
        interrupts,
        /// Completions that did not interrupt because of EVENT_IDX (`used_event`).
        interrupts_suppressed,
        errors_bad_chain,
        errors_bad_header,
        errors_missing_status,
        errors_bad_direction,
        errors_bad_length,
        errors_out_of_range,
        errors_bad_address,
        errors_bad_segment,
        errors_read_only,
        errors_unsupported,
        errors_unaligned,
        errors_too_many_buffers,
        errors_backend,
        /// The driver's avail index ran more than a queue size ahead.
        bad_avail_index,
        /// Used ring updates that failed (head index beyond the queue, ring not in memory).
        used_ring_errors,
        /// Completions for a request slot that was not busy (should stay zero).
        stale_completions,
    }
}

impl BlockCounters {
    fn count_request(&self, request_type: RequestType) {
        let counter = match request_type {
            RequestType::In => &self.requests_in,
            RequestType::Out => &self.requests_out,
            RequestType::Flush => &self.requests_flush,
            RequestType::GetId => &self.requests_get_id,
            RequestType::Discard => &self.requests_discard,
            RequestType::WriteZeroes => &self.requests_write_zeroes,
            RequestType::Unknown => &self.requests_unknown_type,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count_error(&self, error: RequestError) {
        let counter = match error {
            RequestError::BadChain => &self.errors_bad_chain,
            RequestError::BadHeader => &self.errors_bad_header,
            RequestError::MissingStatus => &self.errors_missing_status,
            RequestError::BadDirection => &self.errors_bad_direction,
            RequestError::BadLength => &self.errors_bad_length,
            RequestError::OutOfRange => &self.errors_out_of_range,
            RequestError::BadAddress => &self.errors_bad_address,
            RequestError::BadSegment => &self.errors_bad_segment,
            RequestError::ReadOnly => &self.errors_read_only,
            RequestError::Unsupported => &self.errors_unsupported,
            RequestError::Unaligned => &self.errors_unaligned,
            RequestError::TooManyBuffers => &self.errors_too_many_buffers,
            RequestError::Backend => &self.errors_backend,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl BlockCountersSnapshot {
    /// Requests that failed, whatever the reason.
    pub fn errors(&self) -> u64 {
        self.errors_bad_chain
            + self.errors_bad_header
            + self.errors_missing_status
            + self.errors_bad_direction
            + self.errors_bad_length
            + self.errors_out_of_range
            + self.errors_bad_address
            + self.errors_bad_segment
            + self.errors_read_only
            + self.errors_unsupported
            + self.errors_unaligned
            + self.errors_too_many_buffers
            + self.errors_backend
    }
}

/// What every queue of a device shares.
struct BlockShared {
    backend: BlockBackend,
    limits: DiskLimits,
    seg_max: u32,
    counters: BlockCounters,
    /// Per queue index: timing and counts that outlive device resets.
    latency: Vec<Arc<QueueLatency>>,
}

/// A virtio-blk disk.
pub struct Block {
    shared: Arc<BlockShared>,
    num_queues: u16,
    queue_size: u16,
    features: u64,
    config_space: [u8; CONFIG_SPACE_BYTES],
    pool: Arc<IoPool>,
    /// Queues being served since the last activation.
    registrations: Vec<QueueRegistration>,
}

impl Block {
    pub fn new(config: BlockConfig, pool: Arc<IoPool>) -> Result<Self, BlockError> {
        let BlockConfig {
            backend,
            num_queues,
            queue_size,
            read_only,
            serial,
        } = config;
        if num_queues == 0 {
            return Err(BlockError::NoQueues);
        }
        if !queue_size.is_power_of_two() {
            return Err(BlockError::QueueSize(queue_size));
        }
        if serial.len() > SERIAL_BYTES {
            return Err(BlockError::SerialTooLong(serial));
        }
        let mut serial_bytes = [0u8; SERIAL_BYTES];
        serial_bytes[..serial.len()].copy_from_slice(serial.as_bytes());

        let read_only = read_only || backend.read_only();
        // A trailing partial sector of the image is not addressable.
        let capacity_sectors = backend.size() / SECTOR_BYTES;
        // Without indirect descriptors a request must fit in the queue (header + status).
        let seg_max = u32::from(queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS);
        let max_discard_sectors = (MAX_DISCARD_BYTES / SECTOR_BYTES) as u32;
        let max_write_zeroes_sectors = (MAX_WRITE_ZEROES_BYTES / SECTOR_BYTES) as u32;

        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if num_queues > 1 {
            features |= VIRTIO_BLK_F_MQ;
        }
        let config_space = BlockConfigSpace {
            capacity_sectors,
            size_max: MAX_SEGMENT_BYTES,
            seg_max,
            blk_size: BLOCK_SIZE_BYTES,
            writeback: 0,
            num_queues,
            max_discard_sectors,
            max_discard_seg: 1,
            discard_sector_alignment: DISCARD_SECTOR_ALIGNMENT,
            max_write_zeroes_sectors,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: false,
        }
        .to_bytes();
        let limits = DiskLimits {
            capacity_bytes: capacity_sectors * SECTOR_BYTES,
            read_only,
            discard: !read_only,
            write_zeroes: !read_only,
            max_discard_sectors,
            max_write_zeroes_sectors,
            serial: serial_bytes,
        };
        Ok(Block {
            shared: Arc::new(BlockShared {
                backend,
                limits,
                seg_max,
                counters: BlockCounters::default(),
                latency: (0..num_queues)
                    .map(|_| Arc::new(QueueLatency::new()))
                    .collect(),
            }),
            num_queues,
            queue_size,
            features,
            config_space,
            pool,
            registrations: Vec::new(),
        })
    }

    pub fn counters(&self) -> &BlockCounters {
        &self.shared.counters
    }

    /// Timing and counts of each queue, by queue index.
    pub fn queue_latency(&self) -> &[Arc<QueueLatency>] {
        &self.shared.latency
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.shared.limits.capacity_bytes / SECTOR_BYTES
    }

    pub fn read_only(&self) -> bool {
        self.shared.limits.read_only
    }

    /// Queues currently served (zero before activation and after reset).
    pub fn active_queues(&self) -> usize {
        self.registrations.len()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        config::read_bytes(&self.config_space, offset, data);
    }

    /// Every field is read-only without CONFIG_WCE (not offered): writes are ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        memory: GuestMemoryMmap,
        _acked_features: u64,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        // EVENT_IDX is already applied to each Queue by the transport; no other acked feature
        // changes how requests are served.
        if !self.registrations.is_empty() {
            self.reset();
        }
        for active in &queues {
            if active.index >= self.num_queues {
                return Err(ActivateError::BadQueue(
                    active.index,
                    format!("the device has {} queues", self.num_queues),
                ));
            }
            if active.queue.size() > self.queue_size || active.queue.size() == 0 {
                return Err(ActivateError::BadQueue(
                    active.index,
                    format!(
                        "size {} is not in 1..={}",
                        active.queue.size(),
                        self.queue_size
                    ),
                ));
            }
        }
        for active in queues {
            let handler = BlockQueue::new(
                active.index,
                active.queue,
                active.notifier,
                memory.clone(),
                interrupt.clone(),
                self.shared.clone(),
            );
            match self.pool.add_queue(Box::new(handler)) {
                Ok(registration) => self.registrations.push(registration),
                Err(error) => {
                    self.reset();
                    return Err(ActivateError::Device(error.to_string()));
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        let registrations = std::mem::take(&mut self.registrations);
        if !registrations.is_empty() {
            self.pool.remove_queues(registrations);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}
