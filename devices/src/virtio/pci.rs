//! The virtio 1.x modern PCI transport (virtio 1.2, 4.1), without the legacy interface.
//!
//! Everything lives in one 64-bit memory BAR (BAR 0), laid out by [`Bar0Layout`]:
//!
//! | offset | what |
//! |---|---|
//! | 0x0000 | common configuration (0x38 bytes) |
//! | 0x0100 | ISR status (4 bytes) |
//! | 0x0200 | device-specific configuration (0xe00 bytes, forwarded to the device) |
//! | 0x1000 | notifications: queue i at 0x1000 + 4 * i |
//! | next 4 KiB boundary | MSI-X table (16 bytes per vector) |
//! | next 4 KiB boundary | MSI-X PBA |
//!
//! and the BAR size is the next power of two (16 KiB for up to 1024 queues and 256 vectors).
//! The queue notify addresses are fixed per queue, so the VMM can back each one with a KVM
//! ioeventfd before the guest runs; a notification that still reaches the transport (no
//! ioeventfd, e.g. in tests) writes the queue's eventfd here.
//!
//! Interrupts: the device gets an `Arc<dyn VirtioInterrupt>` holding the queue-to-vector map in
//! atomics, so I/O threads signal without touching the transport's lock.
//!
//! A function may have an MSI-X capability (a table of 1..=2048 vectors), a legacy INTx line
//! (interrupt pin INTA), or both. Without MSI-X vectors there is no MSI-X capability and no
//! table or PBA in BAR 0, so the guest must use INTx. In INTx mode (MSI-X absent or disabled,
//! and INTx not disabled in the command register) an interrupt sets its ISR bit and asserts
//! the line; the line is level-triggered, and KVM asks at each EOI whether it is still
//! pending, which it is while ISR is non-zero (the guest's ISR read clears it). With MSI-X
//! enabled INTx never fires.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};

use irq::msix::{Msix, MsixError, MSIX_NO_VECTOR};
use irq::{IntxLine, IntxSource, MsiVector};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::pci::config::{
    PciConfigError, PciConfigSpace, PciIds, MSIX_CAP_CONTROL, PCI_COMMAND, PCI_INTERRUPT_PIN_INTA,
};
use crate::pci::{BarRegion, PciDevice};

/// PCI identity of virtio devices (virtio 1.2, 4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device id.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision 1 or later tells drivers there is no legacy interface.
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// Subsystem id QEMU gives its virtio devices; drivers ignore it.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Class codes: mass storage "other" for block (what QEMU uses), "unclassified" otherwise.
pub const VIRTIO_PCI_CLASS_BLOCK: u32 = 0x01_80_00;
pub const VIRTIO_PCI_CLASS_OTHER: u32 = 0xff_00_00;
/// "No vector" in config_msix_vector and queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = MSIX_NO_VECTOR;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 0x01;
pub const STATUS_DRIVER: u8 = 0x02;
pub const STATUS_DRIVER_OK: u8 = 0x04;
pub const STATUS_FEATURES_OK: u8 = 0x08;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// ISR status bits: a queue interrupt, a configuration change.
pub const ISR_QUEUE: u8 = 0x1;
pub const ISR_CONFIG: u8 = 0x2;

/// Virtio capability types (virtio 1.2, 4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
pub const PCI_CAP_ID_VENDOR: u8 = 0x09;
pub use crate::pci::config::PCI_CAP_ID_MSIX;

/// Fixed part of the BAR 0 layout.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x0100;
pub const ISR_LEN: u64 = 4;
pub const DEVICE_CFG_OFFSET: u64 = 0x0200;
pub const DEVICE_CFG_LEN: u64 = 0x0e00;
pub const NOTIFY_OFFSET: u64 = 0x1000;
/// Queue i notifies at NOTIFY_OFFSET + i * NOTIFY_OFF_MULTIPLIER.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// MSI-X structures start on their own pages (PCI 3.0 recommends not sharing them).
const MSIX_ALIGNMENT: u64 = 0x1000;
/// The BAR holding every structure.
pub const VIRTIO_PCI_BAR: u8 = 0;

// Common configuration fields (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Bytes of a virtio capability after the id and next pointer: cap_len, cfg_type, bar, id,
/// padding[2], offset, length.
const VIRTIO_CAP_BODY_LEN: usize = 14;
/// Where, in a PCI_CFG capability, the bar, offset, length and data fields sit.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("a virtio device needs at least one queue")]
    NoQueues,
    #[error("maximum queue size {0} is not a power of two in 1..=32768")]
    BadMaxQueueSize(u16),
    #[error("virtio device type {0} has no PCI device id")]
    BadDeviceType(u32),
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    #[error("configuration space: {0}")]
    Config(#[from] PciConfigError),
    #[error("cannot create a queue notifier: {0}")]
    Notifier(#[source] io::Error),
}

/// Where the structures of BAR 0 are, for a given queue and vector count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar0Layout {
    pub notify_len: u64,
    pub msix_table_offset: u64,
    pub msix_table_len: u64,
    pub msix_pba_offset: u64,
    pub msix_pba_len: u64,
    /// Power of two: the BAR's size and the alignment of its address.
    pub size: u64,
}

impl Bar0Layout {
    pub fn new(num_queues: u16, vectors: u16) -> Self {
        let notify_len = u64::from(num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER);
        let msix_table_offset = (NOTIFY_OFFSET + notify_len).next_multiple_of(MSIX_ALIGNMENT);
        let msix_table_len = u64::from(vectors) * 16;
        let msix_pba_offset = (msix_table_offset + msix_table_len).next_multiple_of(MSIX_ALIGNMENT);
        let msix_pba_len = u64::from(vectors).div_ceil(64) * 8;
        Self {
            notify_len,
            msix_table_offset,
            msix_table_len,
            msix_pba_offset,
            msix_pba_len,
            size: (msix_pba_offset + msix_pba_len).next_power_of_two(),
        }
    }
}

/// Guest mistakes the transport ignored, and activation failures, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioPciCounters {
    /// BAR or configuration-space accesses of a size, offset or moment the transport ignores.
    pub ignored_accesses: u64,
    /// queue_size writes that were not a power of two up to the maximum.
    pub bad_queue_sizes: u64,
    /// FEATURES_OK requests refused (features not offered, or no VERSION_1).
    pub rejected_features: u64,
    /// Status writes that cleared bits, or set DRIVER_OK without FEATURES_OK.
    pub bad_status_writes: u64,
    /// Vector numbers outside the MSI-X table (read back as NO_VECTOR).
    pub bad_vectors: u64,
    /// DRIVER_OK that failed to start the device (DEVICE_NEEDS_RESET set).
    pub failed_activations: u64,
    /// Notifications for queues that do not exist.
    pub bad_notifications: u64,
}

/// Where the driver pointed a device's interrupts, as it wrote them into the common
/// configuration; [`VIRTIO_MSI_NO_VECTOR`] means "no vector".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterruptRouting {
    pub config_vector: u16,
    /// One per queue the device offers, in queue order.
    pub queues: Vec<QueueRouting>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRouting {
    pub enabled: bool,
    pub msix_vector: u16,
}

/// A queue with requests in flight: the driver published up to `avail_idx`, the device
/// returned up to `used_idx` (both free-running 16-bit counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutstandingRequests {
    pub queue: u16,
    pub avail_idx: u16,
    pub used_idx: u16,
}

/// The driver's configuration of one queue.
#[derive(Debug, Clone, Copy)]
struct QueueSetup {
    size: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// What device I/O threads use to raise interrupts; shared with the transport, which writes
/// the vector map.
struct TransportInterrupt {
    /// None: the function has no MSI-X capability.
    msix: Option<Arc<Msix>>,
    /// None: the function has no INTx pin.
    intx: Option<Arc<IntxLine>>,
    /// The command register's INTx disable bit, mirrored for I/O threads.
    intx_disabled: AtomicBool,
    queue_vectors: Box<[AtomicU16]>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    config_generation: AtomicU8,
    bad_queue_signals: AtomicU64,
}

impl VirtioInterrupt for TransportInterrupt {
    fn notify_queue(&self, queue: u16) {
        let Some(vector) = self.queue_vectors.get(usize::from(queue)) else {
            self.bad_queue_signals.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        self.signal(vector.load(Ordering::Acquire));
    }

    fn notify_config(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        self.signal(self.config_vector.load(Ordering::Acquire));
    }
}

impl TransportInterrupt {
    fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|msix| msix.is_enabled())
    }

    /// The INTx line, when it is the function's interrupt now: MSI-X absent or disabled and
    /// INTx not disabled by the driver.
    fn active_intx(&self) -> Option<&IntxLine> {
        let line = self.intx.as_deref()?;
        let usable = !self.intx_disabled.load(Ordering::Acquire) && !self.msix_enabled();
        usable.then_some(line)
    }

    /// Raises `vector` through MSI-X, or asserts INTx when that is the function's mode. The
    /// ISR bit is already set.
    fn signal(&self, vector: u16) {
        if let Some(line) = self.active_intx() {
            line.assert();
        } else if let Some(msix) = &self.msix {
            msix.signal(vector);
        }
    }
}

impl IntxSource for TransportInterrupt {
    fn pending(&self) -> bool {
        self.isr.load(Ordering::SeqCst) != 0 && self.active_intx().is_some()
    }
}

/// A virtio device behind the modern PCI transport.
pub struct VirtioPciDevice {
    config: PciConfigSpace,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    layout: Bar0Layout,
    /// Offset of the MSI-X capability; None without MSI-X.
    msix_cap: Option<u8>,
    pci_cfg_cap: u8,
    interrupt: Arc<TransportInterrupt>,
    notifiers: Box<[Arc<EventFd>]>,
    queues: Box<[QueueSetup]>,
    max_queue_size: u16,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    active: bool,
    activation_error: Option<ActivateError>,
    counters: VirtioPciCounters,
}

impl VirtioPciDevice {
    /// Wraps `device` with one MSI-X vector per element of `msix_vectors` (typically one per
    /// queue plus one for configuration changes) and BAR 0 at `bar0_address`, which must be
    /// aligned to `Bar0Layout::new(num_queues, vectors).size`. `memory` is handed to the
    /// device when the driver starts it. No INTx pin.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        msix_vectors: Vec<Arc<dyn MsiVector>>,
        bar0_address: u64,
    ) -> Result<Self, VirtioPciError> {
        Self::with_intx(device, memory, msix_vectors, None, bar0_address)
    }

    /// Like [`VirtioPciDevice::new`], with an INTx line (interrupt pin INTA) when `intx` is
    /// given. An empty `msix_vectors` means no MSI-X capability at all.
    pub fn with_intx(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        msix_vectors: Vec<Arc<dyn MsiVector>>,
        intx: Option<Arc<IntxLine>>,
        bar0_address: u64,
    ) -> Result<Self, VirtioPciError> {
        let num_queues = device.num_queues();
        if num_queues == 0 {
            return Err(VirtioPciError::NoQueues);
        }
        let max_queue_size = device.max_queue_size();
        if Queue::new(max_queue_size).is_err() {
            return Err(VirtioPciError::BadMaxQueueSize(max_queue_size));
        }
        let device_type = device.device_type();
        let device_id = u16::try_from(device_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(VirtioPciError::BadDeviceType(device_type))?;
        let msix = if msix_vectors.is_empty() {
            None
        } else {
            Some(Arc::new(Msix::new(msix_vectors)?))
        };
        let layout = Bar0Layout::new(num_queues, msix.as_ref().map_or(0, |m| m.table_size()));

        let mut config = PciConfigSpace::new(PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: VIRTIO_PCI_REVISION,
            class_code: match device_type {
                VIRTIO_ID_BLOCK => VIRTIO_PCI_CLASS_BLOCK,
                _ => VIRTIO_PCI_CLASS_OTHER,
            },
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_memory_bar64(VIRTIO_PCI_BAR, bar0_address, layout.size, false)?;
        let (msix_cap, pci_cfg_cap) = add_capabilities(&mut config, &layout, msix.as_deref())?;
        if intx.is_some() {
            config.set_interrupt_pin(PCI_INTERRUPT_PIN_INTA);
        }

        let notifiers = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::Notifier)?;
        let interrupt = Arc::new(TransportInterrupt {
            msix,
            intx,
            intx_disabled: AtomicBool::new(false),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            bad_queue_signals: AtomicU64::new(0),
        });
        if let Some(line) = &interrupt.intx {
            let source: Weak<TransportInterrupt> = Arc::downgrade(&interrupt);
            line.connect(source);
        }
        let device_features = device.device_features();
        Ok(Self {
            config,
            device,
            memory,
            layout,
            msix_cap,
            pci_cfg_cap,
            interrupt,
            notifiers: notifiers.into_boxed_slice(),
            queues: vec![QueueSetup::reset(max_queue_size); usize::from(num_queues)]
                .into_boxed_slice(),
            max_queue_size,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            active: false,
            activation_error: None,
            counters: VirtioPciCounters::default(),
        })
    }

    pub fn layout(&self) -> Bar0Layout {
        self.layout
    }

    /// BAR 0's current guest address.
    pub fn bar0_address(&self) -> u64 {
        self.config.bar(VIRTIO_PCI_BAR).map_or(0, |bar| bar.address)
    }

    /// Each queue's notify address at the current BAR 0 address, with the eventfd a guest
    /// write there must signal. Linux writes the queue index as 16 bits; register the
    /// ioeventfds without a data match.
    pub fn notify_addresses(&self) -> Vec<(u64, Arc<EventFd>)> {
        let base = self.bar0_address() + NOTIFY_OFFSET;
        (0u64..)
            .zip(self.notifiers.iter())
            .map(|(queue, notifier)| {
                let offset = queue * u64::from(NOTIFY_OFF_MULTIPLIER);
                (base + offset, notifier.clone())
            })
            .collect()
    }

    /// The function's MSI-X state, for reports (per-vector destinations, counters); None
    /// when the function has no MSI-X capability.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.interrupt.msix.as_ref()
    }

    /// The function's INTx line, if it has one.
    pub fn intx(&self) -> Option<&Arc<IntxLine>> {
        self.interrupt.intx.as_ref()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_status(&self) -> u8 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Why the last DRIVER_OK failed to start the device, if it did.
    pub fn activation_error(&self) -> Option<&ActivateError> {
        self.activation_error.as_ref()
    }

    pub fn counters(&self) -> VirtioPciCounters {
        let mut counters = self.counters;
        counters.bad_notifications += self.interrupt.bad_queue_signals.load(Ordering::Relaxed);
        counters
    }

    /// Queues whose driver has published requests the device has not yet returned, read
    /// from the rings in guest memory (avail idx vs used idx): what a stalled guest is
    /// waiting for. Empty while the device is not active.
    pub fn outstanding_requests(&self) -> Vec<OutstandingRequests> {
        if !self.active {
            return Vec::new();
        }
        // virtq_avail and virtq_used both start with a 16-bit flags word, then idx.
        let ring_idx = |ring: u64| -> Option<u16> {
            let address = GuestAddress(ring.checked_add(2)?);
            vm_memory::Bytes::read_obj::<u16>(&self.memory, address).ok()
        };
        (0u16..)
            .zip(self.queues.iter())
            .filter(|(_, queue)| queue.enabled)
            .filter_map(|(index, queue)| {
                let avail_idx = ring_idx(queue.driver)?;
                let used_idx = ring_idx(queue.device)?;
                (avail_idx != used_idx).then_some(OutstandingRequests {
                    queue: index,
                    avail_idx,
                    used_idx,
                })
            })
            .collect()
    }

    /// The config and per-queue vectors the driver chose, for reports (e.g. which queues
    /// share a vector).
    pub fn interrupt_routing(&self) -> InterruptRouting {
        InterruptRouting {
            config_vector: self.interrupt.config_vector.load(Ordering::Acquire),
            queues: self
                .queues
                .iter()
                .zip(self.interrupt.queue_vectors.iter())
                .map(|(queue, vector)| QueueRouting {
                    enabled: queue.enabled,
                    msix_vector: vector.load(Ordering::Acquire),
                })
                .collect(),
        }
    }

    fn selected_queue(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn ignored(&mut self) {
        self.counters.ignored_accesses += 1;
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let queue = self.selected_queue().copied();
        let queue_vector = self
            .interrupt
            .queue_vectors
            .get(usize::from(self.queue_select))
            .map(|v| v.load(Ordering::Acquire));
        let value: Option<u64> = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => Some(self.device_feature_select.into()),
            (DEVICE_FEATURE, 4) => Some(feature_page(
                self.device_features,
                self.device_feature_select,
            )),
            (DRIVER_FEATURE_SELECT, 4) => Some(self.driver_feature_select.into()),
            (DRIVER_FEATURE, 4) => Some(feature_page(
                self.driver_features,
                self.driver_feature_select,
            )),
            (CONFIG_MSIX_VECTOR, 2) => {
                Some(self.interrupt.config_vector.load(Ordering::Acquire).into())
            }
            (NUM_QUEUES, 2) => Some(self.queues.len() as u64),
            (DEVICE_STATUS, 1) => Some(self.status.into()),
            (CONFIG_GENERATION, 1) => Some(
                self.interrupt
                    .config_generation
                    .load(Ordering::SeqCst)
                    .into(),
            ),
            (QUEUE_SELECT, 2) => Some(self.queue_select.into()),
            // A queue that does not exist reads as size 0: "not available".
            (QUEUE_SIZE, 2) => Some(queue.map_or(0, |q| q.size.into())),
            (QUEUE_MSIX_VECTOR, 2) => Some(queue_vector.unwrap_or(VIRTIO_MSI_NO_VECTOR).into()),
            (QUEUE_ENABLE, 2) => Some(queue.is_some_and(|q| q.enabled).into()),
            (QUEUE_NOTIFY_OFF, 2) => Some(queue.map_or(0, |_| self.queue_select.into())),
            (QUEUE_DESC..QUEUE_DEVICE_END, 4 | 8) if offset.is_multiple_of(4) => {
                queue.and_then(|q| q.address_part(offset, data.len()))
            }
            _ => None,
        };
        match value {
            Some(value) => {
                let bytes = value.to_le_bytes();
                let len = data.len().min(bytes.len());
                data[..len].copy_from_slice(&bytes[..len]);
            }
            None => {
                self.ignored();
                data.fill(0);
            }
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = match data.len() {
            1 | 2 | 4 | 8 => {
                let mut bytes = [0u8; 8];
                bytes[..data.len()].copy_from_slice(data);
                u64::from_le_bytes(bytes)
            }
            _ => return self.ignored(),
        };
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_SIZE, 2) => self.write_queue_size(value as u16),
            (QUEUE_MSIX_VECTOR, 2) => self.write_queue_vector(value as u16),
            (QUEUE_ENABLE, 2) => self.write_queue_enable(value as u16),
            (QUEUE_DESC..QUEUE_DEVICE_END, 4 | 8) if offset.is_multiple_of(4) => {
                self.write_queue_address(offset, data.len(), value)
            }
            _ => self.ignored(),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are fixed once FEATURES_OK is set (virtio 1.2, 3.1.1).
        if self.status & STATUS_FEATURES_OK != 0 {
            return self.ignored();
        }
        let value = u64::from(value);
        self.driver_features = match self.driver_feature_select {
            0 => (self.driver_features & !0xffff_ffff) | value,
            1 => (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => return self.ignored(),
        };
    }

    fn checked_vector(&mut self, vector: u16) -> u16 {
        let table_size = self.interrupt.msix.as_ref().map_or(0, |m| m.table_size());
        if vector == VIRTIO_MSI_NO_VECTOR || vector < table_size {
            vector
        } else {
            // The driver reads it back and sees the mapping failed (virtio 1.2, 4.1.4.3.2).
            self.counters.bad_vectors += 1;
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The selected queue, if the driver may still configure it.
    fn configurable_queue(&mut self) -> Option<&mut QueueSetup> {
        let running = self.status & STATUS_DRIVER_OK != 0;
        match self.queues.get_mut(usize::from(self.queue_select)) {
            Some(queue) if !queue.enabled && !running => Some(queue),
            _ => {
                self.counters.ignored_accesses += 1;
                None
            }
        }
    }

    fn write_queue_size(&mut self, size: u16) {
        let max = self.max_queue_size;
        let valid = size.is_power_of_two() && size <= max;
        let Some(queue) = self.configurable_queue() else {
            return;
        };
        if valid {
            queue.size = size;
        } else {
            self.counters.bad_queue_sizes += 1;
        }
    }

    fn write_queue_vector(&mut self, vector: u16) {
        let vector = self.checked_vector(vector);
        match self
            .interrupt
            .queue_vectors
            .get(usize::from(self.queue_select))
        {
            Some(slot) => slot.store(vector, Ordering::Release),
            None => self.ignored(),
        }
    }

    fn write_queue_enable(&mut self, value: u16) {
        // Writing 0 is not how a queue is stopped (that needs VIRTIO_F_RING_RESET).
        if value != 1 {
            return self.ignored();
        }
        if let Some(queue) = self.configurable_queue() {
            queue.enabled = true;
        }
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, value: u64) {
        if let Some(queue) = self.configurable_queue() {
            queue.set_address_part(offset, len, value);
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            return self.reset();
        }
        // DEVICE_NEEDS_RESET is the device's to set; the driver cannot clear other bits.
        let requested = value & !STATUS_DEVICE_NEEDS_RESET;
        let driver_bits = self.status & !STATUS_DEVICE_NEEDS_RESET;
        if requested & driver_bits != driver_bits {
            self.counters.bad_status_writes += 1;
            return;
        }
        let newly_set = requested & !driver_bits;
        let mut status = requested | (self.status & STATUS_DEVICE_NEEDS_RESET);
        if newly_set & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            self.counters.rejected_features += 1;
            status &= !STATUS_FEATURES_OK;
        }
        let starting = newly_set & STATUS_DRIVER_OK != 0;
        if starting && status & STATUS_FEATURES_OK == 0 {
            self.counters.bad_status_writes += 1;
            status &= !STATUS_DRIVER_OK;
        }
        self.status = status;
        if starting && status & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let result = self.build_queues().and_then(|queues| {
            self.device.activate(
                self.memory.clone(),
                self.driver_features,
                self.interrupt.clone(),
                queues,
            )
        });
        match result {
            Ok(()) => {
                self.active = true;
                self.activation_error = None;
            }
            Err(error) => {
                self.counters.failed_activations += 1;
                self.activation_error = Some(error);
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.interrupt.notify_config();
            }
        }
    }

    fn build_queues(&self) -> Result<Vec<ActiveQueue>, ActivateError> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let enabled = (0u16..)
            .zip(self.queues.iter().zip(self.notifiers.iter()))
            .filter(|(_, (setup, _))| setup.enabled);
        let mut active = Vec::new();
        for (index, (setup, notifier)) in enabled {
            let bad = |what: &str| ActivateError::BadQueue(index, what.to_string());
            let mut queue = Queue::new(self.max_queue_size).map_err(|e| bad(&e.to_string()))?;
            queue
                .try_set_size(setup.size)
                .map_err(|e| bad(&e.to_string()))?;
            queue
                .try_set_desc_table_address(GuestAddress(setup.desc))
                .map_err(|e| bad(&e.to_string()))?;
            queue
                .try_set_avail_ring_address(GuestAddress(setup.driver))
                .map_err(|e| bad(&e.to_string()))?;
            queue
                .try_set_used_ring_address(GuestAddress(setup.device))
                .map_err(|e| bad(&e.to_string()))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&self.memory) {
                return Err(bad("rings are not inside guest memory"));
            }
            active.push(ActiveQueue {
                index,
                queue,
                notifier: notifier.clone(),
            });
        }
        Ok(active)
    }

    /// Device reset (status 0): the device stops, and every transport register the driver
    /// wrote returns to its initial value. MSI-X is configuration-space state and stays.
    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.activation_error = None;
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.queues.fill(QueueSetup::reset(self.max_queue_size));
        for vector in self.interrupt.queue_vectors.iter() {
            vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.interrupt
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        self.interrupt.isr.store(0, Ordering::SeqCst);
    }

    fn notify(&mut self, offset: u64) {
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        let notifier = usize::try_from(queue)
            .ok()
            .and_then(|q| self.notifiers.get(q));
        match notifier.map(|n| n.write(1)) {
            Some(Ok(())) => {}
            _ => self.counters.bad_notifications += 1,
        }
    }

    /// The PCI_CFG capability's window: the driver names a BAR range in the capability and
    /// accesses it through pci_cfg_data (virtio 1.2, 4.1.4.9).
    fn pci_cfg_window(&self) -> std::ops::Range<u16> {
        let data = u16::from(self.pci_cfg_cap) + PCI_CFG_DATA as u16;
        data..data + 4
    }

    /// The BAR access the PCI_CFG capability currently describes, if it is one the transport
    /// performs: BAR 0, 1/2/4 bytes, aligned.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let cap = usize::from(self.pci_cfg_cap);
        let bar = self.config.register_u32(cap + PCI_CFG_BAR) & 0xff;
        let offset = u64::from(self.config.register_u32(cap + PCI_CFG_OFFSET));
        let length = self.config.register_u32(cap + PCI_CFG_LENGTH) as usize;
        let valid = bar == u32::from(VIRTIO_PCI_BAR)
            && matches!(length, 1 | 2 | 4)
            && offset % length as u64 == 0;
        valid.then_some((offset, length))
    }

    fn pci_cfg_read(&mut self, offset: u16, data: &mut [u8]) {
        let mut window = [0u8; 4];
        if let Some((bar_offset, length)) = self.pci_cfg_target() {
            self.bar_read(VIRTIO_PCI_BAR, bar_offset, &mut window[..length]);
        } else {
            self.ignored();
        }
        let start = usize::from(offset - self.pci_cfg_window().start);
        match window.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0xff),
        }
    }

    fn pci_cfg_write(&mut self, offset: u16, data: &[u8]) {
        let at_window_start = offset == self.pci_cfg_window().start;
        match self.pci_cfg_target() {
            Some((bar_offset, length)) if at_window_start && data.len() == length => {
                self.bar_write(VIRTIO_PCI_BAR, bar_offset, data);
            }
            _ => self.ignored(),
        }
    }
}

/// The end of the last common configuration field, queue_device.
const QUEUE_DEVICE_END: u64 = QUEUE_DEVICE + 8;

impl QueueSetup {
    fn reset(max_size: u16) -> Self {
        Self {
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    fn address_field(&mut self, offset: u64) -> Option<(&mut u64, u64)> {
        match offset {
            QUEUE_DESC..QUEUE_DRIVER => Some((&mut self.desc, offset - QUEUE_DESC)),
            QUEUE_DRIVER..QUEUE_DEVICE => Some((&mut self.driver, offset - QUEUE_DRIVER)),
            QUEUE_DEVICE..QUEUE_DEVICE_END => Some((&mut self.device, offset - QUEUE_DEVICE)),
            _ => None,
        }
    }

    /// Reads a 64-bit address field whole (8 bytes at its start) or by 32-bit halves.
    fn address_part(mut self, offset: u64, len: usize) -> Option<u64> {
        let (field, within) = self.address_field(offset)?;
        match (within, len) {
            (0, 8) => Some(*field),
            (0, 4) => Some(*field & 0xffff_ffff),
            (4, 4) => Some(*field >> 32),
            _ => None,
        }
    }

    fn set_address_part(&mut self, offset: u64, len: usize, value: u64) {
        if let Some((field, within)) = self.address_field(offset) {
            match (within, len) {
                (0, 8) => *field = value,
                (0, 4) => *field = (*field & !0xffff_ffff) | (value & 0xffff_ffff),
                (4, 4) => *field = (*field & 0xffff_ffff) | (value << 32),
                _ => {}
            }
        }
    }
}

/// The 32 feature bits selected by `select` (0: bits 0-31, 1: bits 32-63, else none).
fn feature_page(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

fn virtio_cap_body(cfg_type: u8, cap_len: usize, offset: u64, length: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(cap_len - 2);
    // cap_len counts the id and next bytes too; every capability here is < 256 bytes.
    body.extend_from_slice(&[cap_len as u8, cfg_type, VIRTIO_PCI_BAR, 0, 0, 0]);
    // BAR 0 is at most a few MiB (MSI-X tables of 2048 entries), so offsets fit 32 bits.
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body
}

/// Adds the virtio structure capabilities and, with `msix`, the MSI-X capability; returns the
/// offsets of the MSI-X and PCI_CFG capabilities.
fn add_capabilities(
    config: &mut PciConfigSpace,
    layout: &Bar0Layout,
    msix: Option<&Msix>,
) -> Result<(Option<u8>, u8), PciConfigError> {
    let plain = VIRTIO_CAP_BODY_LEN + 2;
    let extended = plain + 4;
    let common = virtio_cap_body(
        VIRTIO_PCI_CAP_COMMON_CFG,
        plain,
        COMMON_CFG_OFFSET,
        COMMON_CFG_LEN,
    );
    config.add_capability(PCI_CAP_ID_VENDOR, &common, &[])?;
    let mut notify = virtio_cap_body(
        VIRTIO_PCI_CAP_NOTIFY_CFG,
        extended,
        NOTIFY_OFFSET,
        layout.notify_len,
    );
    notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
    config.add_capability(PCI_CAP_ID_VENDOR, &notify, &[])?;
    let isr = virtio_cap_body(VIRTIO_PCI_CAP_ISR_CFG, plain, ISR_OFFSET, ISR_LEN);
    config.add_capability(PCI_CAP_ID_VENDOR, &isr, &[])?;
    let device = virtio_cap_body(
        VIRTIO_PCI_CAP_DEVICE_CFG,
        plain,
        DEVICE_CFG_OFFSET,
        DEVICE_CFG_LEN,
    );
    config.add_capability(PCI_CAP_ID_VENDOR, &device, &[])?;
    // PCI_CFG: bar, offset and length are the driver's to write; data is served live.
    let mut pci_cfg = virtio_cap_body(VIRTIO_PCI_CAP_PCI_CFG, extended, 0, 0);
    pci_cfg.extend_from_slice(&[0; 4]);
    let mut writable = vec![0u8; pci_cfg.len()];
    writable[PCI_CFG_BAR - 2] = 0xff;
    writable[PCI_CFG_OFFSET - 2..PCI_CFG_LENGTH + 2].fill(0xff);
    let pci_cfg_cap = config.add_capability(PCI_CAP_ID_VENDOR, &pci_cfg, &writable)?;

    let Some(msix) = msix else {
        return Ok((None, pci_cfg_cap));
    };
    // MSI-X: table and PBA in BAR 0.
    let msix_cap = config.add_msix_capability(
        msix.control_table_size_field(),
        VIRTIO_PCI_BAR,
        layout.msix_table_offset as u32,
        layout.msix_pba_offset as u32,
    )?;
    Ok((Some(msix_cap), pci_cfg_cap))
}

fn overlaps(offset: u16, len: usize, start: u16, end: u16) -> bool {
    let access_end = usize::from(offset) + len;
    usize::from(offset) < usize::from(end) && access_end > usize::from(start)
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let window = self.pci_cfg_window();
        let inside = usize::from(offset) + data.len() <= usize::from(window.end);
        if offset >= window.start && inside && !data.is_empty() {
            return self.pci_cfg_read(offset, data);
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion> {
        let window = self.pci_cfg_window();
        if overlaps(offset, data.len(), window.start, window.end) {
            self.pci_cfg_write(offset, data);
            return None;
        }
        let moved = self.config.write(offset, data);
        if let (Some(cap), Some(msix)) = (self.msix_cap, &self.interrupt.msix) {
            let control = u16::from(cap) + MSIX_CAP_CONTROL as u16;
            if overlaps(offset, data.len(), control, control + 2) {
                msix.write_control(self.config.register_u16(usize::from(control)));
            }
        }
        let command = PCI_COMMAND as u16;
        if overlaps(offset, data.len(), command, command + 2) {
            self.interrupt
                .intx_disabled
                .store(self.config.intx_disabled(), Ordering::Release);
        }
        // As on a real function, an interrupt raised while INTx was disabled (or MSI-X on)
        // asserts the line once INTx is usable again, if the driver has not read ISR yet.
        if self.interrupt.pending() {
            if let Some(line) = self.interrupt.active_intx() {
                line.assert();
            }
        }
        moved
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let layout = self.layout;
        let len = data.len() as u64;
        let within = |start: u64, size: u64| {
            offset >= start
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= start + size)
        };
        if bar != VIRTIO_PCI_BAR || data.is_empty() {
            self.ignored();
            data.fill(0xff);
        } else if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            self.common_read(offset - COMMON_CFG_OFFSET, data);
        } else if within(ISR_OFFSET, ISR_LEN) {
            // Reading ISR acknowledges it (virtio 1.2, 4.1.4.5).
            data.fill(0);
            if let (ISR_OFFSET, Some(first)) = (offset, data.first_mut()) {
                *first = self.interrupt.isr.swap(0, Ordering::SeqCst);
            }
        } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if let (true, Some(msix)) = (
            within(layout.msix_table_offset, layout.msix_table_len),
            &self.interrupt.msix,
        ) {
            msix.table_read(offset - layout.msix_table_offset, data);
        } else if let (true, Some(msix)) = (
            within(layout.msix_pba_offset, layout.msix_pba_len),
            &self.interrupt.msix,
        ) {
            msix.pba_read(offset - layout.msix_pba_offset, data);
        } else {
            // Notify area (write-only) and the gaps between structures read as zero.
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let layout = self.layout;
        let len = data.len() as u64;
        let within = |start: u64, size: u64| {
            offset >= start
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= start + size)
        };
        if bar != VIRTIO_PCI_BAR || data.is_empty() {
            self.ignored();
        } else if within(COMMON_CFG_OFFSET, COMMON_CFG_LEN) {
            self.common_write(offset - COMMON_CFG_OFFSET, data);
        } else if within(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(NOTIFY_OFFSET, layout.notify_len) {
            self.notify(offset - NOTIFY_OFFSET);
        } else if let (true, Some(msix)) = (
            within(layout.msix_table_offset, layout.msix_table_len),
            &self.interrupt.msix,
        ) {
            msix.table_write(offset - layout.msix_table_offset, data);
        } else if let (true, Some(msix)) = (
            within(layout.msix_pba_offset, layout.msix_pba_len),
            &self.interrupt.msix,
        ) {
            msix.pba_write(offset - layout.msix_pba_offset, data);
        } else {
            self.ignored();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use irq::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK};
    use irq::MsiMessage;

    use super::*;
    use crate::pci::config::PCI_CAPABILITY_LIST;

    const BAR0: u64 = 0x40_0000_0000;
    const MAX_QUEUE_SIZE: u16 = 256;
    const QUEUES: u16 = 2;
    const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 9);
    const MEMORY_SIZE: usize = 0x10_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    /// What the fake device saw at activation.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Activation {
        acked_features: u64,
        /// index, size, desc, avail, used, event_idx
        queues: Vec<(u16, u16, u64, u64, u64, bool)>,
    }

    #[derive(Default)]
    struct FakeState {
        activations: Vec<Activation>,
        resets: usize,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        notifiers: Vec<Arc<EventFd>>,
        fail_activation: bool,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        state: Arc<Mutex<FakeState>>,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn num_queues(&self) -> u16 {
            QUEUES
        }
        fn max_queue_size(&self) -> u16 {
            MAX_QUEUE_SIZE
        }
        fn device_features(&self) -> u64 {
            DEVICE_FEATURES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            // Byte i of the config space reads as 0x80 + i; past 16 bytes as zero.
            for (i, byte) in data.iter_mut().enumerate() {
                let at = offset + i as u64;
                *byte = if at < 16 { 0x80 + at as u8 } else { 0 };
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.state
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _memory: GuestMemoryMmap,
            acked_features: u64,
            interrupt: Arc<dyn VirtioInterrupt>,
            queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mut state = self.state.lock().unwrap();
            if state.fail_activation {
                return Err(ActivateError::Device("told to fail".into()));
            }
            state.activations.push(Activation {
                acked_features,
                queues: queues
                    .iter()
                    .map(|q| {
                        (
                            q.index,
                            q.queue.size(),
                            q.queue.desc_table(),
                            q.queue.avail_ring(),
                            q.queue.used_ring(),
                            q.queue.event_idx_enabled(),
                        )
                    })
                    .collect(),
            });
            state.notifiers = queues.iter().map(|q| q.notifier.clone()).collect();
            state.interrupt = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            let mut state = self.state.lock().unwrap();
            state.resets += 1;
            state.interrupt = None;
        }
    }

    #[derive(Default)]
    struct FakeVector {
        configured: Mutex<Option<MsiMessage>>,
        injects: AtomicU64,
    }

    impl MsiVector for FakeVector {
        fn configure(&self, message: Option<MsiMessage>) -> io::Result<()> {
            *self.configured.lock().unwrap() = message;
            Ok(())
        }
        fn inject(&self) -> io::Result<irq::MsiPath> {
            self.injects.fetch_add(1, Ordering::SeqCst);
            Ok(irq::MsiPath::Irqfd)
        }
    }

    impl FakeVector {
        fn injects(&self) -> u64 {
            self.injects.load(Ordering::SeqCst)
        }
    }

    /// Where the capabilities say the structures are, found the way Linux's
    /// virtio_pci_modern_probe does: walking the capability list.
    #[derive(Debug, Default)]
    struct Structures {
        common: u64,
        isr: u64,
        device: u64,
        notify: u64,
        notify_multiplier: u32,
        pci_cfg_cap: u16,
        msix_cap: u16,
        msix_table: u64,
        msix_pba: u64,
    }

    /// A test-side driver doing what Linux's virtio_pci_modern does, through the PciDevice
    /// interface only.
    struct Driver {
        dev: VirtioPciDevice,
        s: Structures,
        state: Arc<Mutex<FakeState>>,
        vectors: Vec<Arc<FakeVector>>,
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap()
    }

    impl Driver {
        fn new() -> Self {
            Self::with_vectors(usize::from(QUEUES) + 1)
        }

        fn with_vectors(count: usize) -> Self {
            Self::with_interrupts(count, None)
        }

        /// `count` MSI-X vectors (0: no MSI-X capability) and optionally an INTx line.
        fn with_interrupts(count: usize, intx: Option<Arc<IntxLine>>) -> Self {
            let state = Arc::new(Mutex::new(FakeState::default()));
            let vectors: Vec<Arc<FakeVector>> = (0..count).map(|_| Arc::default()).collect();
            let dev = VirtioPciDevice::with_intx(
                Box::new(FakeDevice {
                    state: state.clone(),
                }),
                memory(),
                vectors
                    .iter()
                    .map(|v| v.clone() as Arc<dyn MsiVector>)
                    .collect(),
                intx,
                BAR0,
            )
            .unwrap();
            let mut driver = Self {
                dev,
                s: Structures::default(),
                state,
                vectors,
            };
            driver.s = driver.find_structures();
            driver
        }

        fn cfg8(&mut self, offset: u16) -> u8 {
            let mut b = [0u8; 1];
            self.dev.config_read(offset, &mut b);
            b[0]
        }
        fn cfg16(&mut self, offset: u16) -> u16 {
            let mut b = [0u8; 2];
            self.dev.config_read(offset, &mut b);
            u16::from_le_bytes(b)
        }
        fn cfg32(&mut self, offset: u16) -> u32 {
            let mut b = [0u8; 4];
            self.dev.config_read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn find_structures(&mut self) -> Structures {
            let mut s = Structures::default();
            let mut cap = u16::from(self.cfg8(PCI_CAPABILITY_LIST as u16));
            let mut seen = 0;
            while cap != 0 && seen < 48 {
                seen += 1;
                match self.cfg8(cap) {
                    PCI_CAP_ID_VENDOR => {
                        let cfg_type = self.cfg8(cap + 3);
                        assert_eq!(self.cfg8(cap + 4), 0, "everything is in BAR 0");
                        let offset = u64::from(self.cfg32(cap + 8));
                        match cfg_type {
                            VIRTIO_PCI_CAP_COMMON_CFG => s.common = offset,
                            VIRTIO_PCI_CAP_ISR_CFG => s.isr = offset,
                            VIRTIO_PCI_CAP_DEVICE_CFG => s.device = offset,
                            VIRTIO_PCI_CAP_NOTIFY_CFG => {
                                s.notify = offset;
                                s.notify_multiplier = self.cfg32(cap + 16);
                            }
                            VIRTIO_PCI_CAP_PCI_CFG => s.pci_cfg_cap = cap,
                            other => panic!("unknown cfg_type {other}"),
                        }
                    }
                    PCI_CAP_ID_MSIX => {
                        s.msix_cap = cap;
                        let table = self.cfg32(cap + 4);
                        let pba = self.cfg32(cap + 8);
                        assert_eq!(table & 7, 0);
                        assert_eq!(pba & 7, 0);
                        s.msix_table = u64::from(table & !7);
                        s.msix_pba = u64::from(pba & !7);
                    }
                    other => panic!("unexpected capability {other:#x}"),
                }
                cap = u16::from(self.cfg8(cap + 1));
            }
            assert_eq!(cap, 0, "the list ends");
            assert_ne!(s.pci_cfg_cap, 0);
            assert_eq!(s.msix_cap != 0, self.dev.msix().is_some());
            s
        }

        fn read(&mut self, offset: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.bar_read(0, offset, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn write(&mut self, offset: u64, len: usize, value: u64) {
            self.dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
        }
        fn common_read(&mut self, field: u64, len: usize) -> u64 {
            self.read(self.s.common + field, len)
        }
        fn common_write(&mut self, field: u64, len: usize, value: u64) {
            self.write(self.s.common + field, len, value);
        }
        fn status(&mut self) -> u8 {
            self.common_read(DEVICE_STATUS, 1) as u8
        }
        fn set_status(&mut self, bits: u8) {
            let status = self.status() | bits;
            self.common_write(DEVICE_STATUS, 1, status.into());
        }

        fn device_features(&mut self) -> u64 {
            self.common_write(DEVICE_FEATURE_SELECT, 4, 0);
            let low = self.common_read(DEVICE_FEATURE, 4);
            self.common_write(DEVICE_FEATURE_SELECT, 4, 1);
            low | self.common_read(DEVICE_FEATURE, 4) << 32
        }

        fn write_features(&mut self, features: u64) {
            self.common_write(DRIVER_FEATURE_SELECT, 4, 0);
            self.common_write(DRIVER_FEATURE, 4, features & 0xffff_ffff);
            self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
            self.common_write(DRIVER_FEATURE, 4, features >> 32);
        }

        fn msix_control(&mut self, control: u16) {
            let offset = self.s.msix_cap + 2;
            let current = self.cfg16(offset) & 0x07ff;
            self.dev
                .config_write(offset, &(current | control).to_le_bytes());
        }

        /// Programs table entry `vector` for APIC id `apic_id`, and unmasks it.
        fn program_vector(&mut self, vector: u64, apic_id: u64) {
            let entry = self.s.msix_table + vector * 16;
            self.write(entry, 4, 0xfee0_0000 | apic_id << 12);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, 0x30 + vector);
            self.write(entry + 12, 4, 0);
        }

        /// Sets up queue `index` of `size` entries with rings at DESC/AVAIL/USED (spaced per
        /// queue), routed to MSI-X vector `vector`.
        fn setup_queue(&mut self, index: u16, size: u16, vector: u16) {
            let spacing = 0x10000 * u64::from(index);
            self.common_write(QUEUE_SELECT, 2, index.into());
            assert_eq!(self.common_read(QUEUE_SIZE, 2), u64::from(MAX_QUEUE_SIZE));
            self.common_write(QUEUE_SIZE, 2, size.into());
            self.common_write(QUEUE_MSIX_VECTOR, 2, vector.into());
            assert_eq!(self.common_read(QUEUE_MSIX_VECTOR, 2), u64::from(vector));
            for (field, address) in [
                (QUEUE_DESC, DESC),
                (QUEUE_DRIVER, AVAIL),
                (QUEUE_DEVICE, USED),
            ] {
                // Linux writes 64-bit fields as two 32-bit halves.
                let address = address + spacing;
                self.common_write(field, 4, address & 0xffff_ffff);
                self.common_write(field + 4, 4, address >> 32);
            }
            assert_eq!(
                self.common_read(QUEUE_NOTIFY_OFF, 2),
                u64::from(index),
                "notify_off"
            );
            self.common_write(QUEUE_ENABLE, 2, 1);
            assert_eq!(self.common_read(QUEUE_ENABLE, 2), 1);
        }

        /// The whole probe up to DRIVER_OK, with queue 0 only (queue 1 left disabled).
        fn bring_up(&mut self) {
            self.common_write(DEVICE_STATUS, 1, 0);
            assert_eq!(self.status(), 0);
            self.set_status(STATUS_ACKNOWLEDGE);
            self.set_status(STATUS_DRIVER);
            let offered = self.device_features();
            assert_eq!(offered, DEVICE_FEATURES);
            self.write_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            self.set_status(STATUS_FEATURES_OK);
            assert_ne!(self.status() & STATUS_FEATURES_OK, 0);

            // pci_msix_enable: enable with every vector masked, program, then unmask all.
            self.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
            self.program_vector(0, 1);
            self.program_vector(1, 2);
            self.msix_control(MSIX_CONTROL_ENABLE);
            self.common_write(CONFIG_MSIX_VECTOR, 2, 0);
            assert_eq!(self.common_read(CONFIG_MSIX_VECTOR, 2), 0);
            assert_eq!(self.common_read(NUM_QUEUES, 2), u64::from(QUEUES));
            self.setup_queue(0, 64, 1);
            self.set_status(STATUS_DRIVER_OK);
        }
    }

    impl Driver {
        /// vp_find_vqs_intx: no MSI-X, queue 0 with no vector, then DRIVER_OK.
        fn bring_up_intx(&mut self) {
            self.set_status(STATUS_ACKNOWLEDGE);
            self.set_status(STATUS_DRIVER);
            self.write_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
            self.set_status(STATUS_FEATURES_OK);
            self.setup_queue(0, 64, VIRTIO_MSI_NO_VECTOR);
            self.set_status(STATUS_DRIVER_OK);
            assert!(self.dev.is_active());
        }

        fn isr(&mut self) -> u8 {
            self.read(self.s.isr, 1) as u8
        }
    }

    fn intx_line() -> Arc<IntxLine> {
        IntxLine::new(irq::intx::INTX_GSI_BASE).unwrap()
    }

    /// irqfd writes since the last call (0 when none).
    fn asserts(line: &IntxLine) -> u64 {
        line.irqfd().read().unwrap_or(0)
    }

    /// KVM at the guest's EOI: the line goes down and the resamplefd is signalled.
    fn eoi(line: &IntxLine) -> bool {
        line.resamplefd().write(1).unwrap();
        line.resample()
    }

    #[test]
    fn without_msix_vectors_there_is_no_msix_capability() {
        let mut driver = Driver::with_interrupts(0, Some(intx_line()));
        assert!(driver.dev.msix().is_none());
        assert_eq!(driver.s.msix_cap, 0, "no MSI-X capability in the list");
        assert_eq!(driver.cfg8(0x3d), 1, "interrupt pin INTA");
        driver.dev.config_write(0x3c, &[21]);
        assert_eq!(driver.cfg8(0x3c), 21, "interrupt line is the guest's");
        assert_eq!(driver.cfg8(0x3d), 1);
        let layout = driver.dev.layout();
        assert_eq!(layout, Bar0Layout::new(QUEUES, 0));
        assert_eq!((layout.msix_table_len, layout.msix_pba_len), (0, 0));
        // Where a table would start, BAR 0 is empty: reads zero, writes are ignored.
        assert_eq!(driver.read(layout.msix_table_offset, 4), 0);
        let ignored = driver.dev.counters().ignored_accesses;
        driver.write(layout.msix_table_offset, 4, 0xfee0_0000);
        assert_eq!(driver.dev.counters().ignored_accesses, ignored + 1);
        // Every vector number is out of range: the driver reads NO_VECTOR back.
        driver.common_write(CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(
            driver.common_read(CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
    }

    #[test]
    fn intx_off_leaves_the_pin_at_zero() {
        let mut driver = Driver::new();
        assert_eq!(driver.cfg8(0x3d), 0);
        assert!(driver.dev.intx().is_none());
        // No MSI-X and no INTx: a function with no interrupt at all (the guest's probe fails).
        let mut driver = Driver::with_interrupts(0, None);
        assert_eq!(driver.cfg8(0x3d), 0);
        driver.bring_up_intx();
        ack_interrupt(&driver.state).notify_queue(0);
        assert_eq!(driver.isr(), ISR_QUEUE);
    }

    #[test]
    fn intx_sets_isr_asserts_and_resamples_until_the_guest_reads_isr() {
        let line = intx_line();
        let mut driver = Driver::with_interrupts(0, Some(line.clone()));
        driver.bring_up_intx();
        let interrupt = ack_interrupt(&driver.state);
        interrupt.notify_queue(0);
        assert_eq!(asserts(&line), 1);
        // EOI before the guest read ISR (e.g. another device's handler on the shared GSI):
        // still pending, asserted again.
        assert!(eoi(&line));
        assert_eq!(asserts(&line), 1);
        // The guest's handler reads ISR: that acknowledges and clears it.
        assert_eq!(driver.isr(), ISR_QUEUE);
        assert_eq!(driver.isr(), 0);
        assert!(!eoi(&line));
        assert_eq!(asserts(&line), 0);
        // A configuration change sets its own bit.
        interrupt.notify_config();
        assert_eq!(asserts(&line), 1);
        assert_eq!(driver.isr(), ISR_CONFIG);
        assert!(!eoi(&line));
        let counters = line.counters();
        assert_eq!((counters.asserts, counters.reasserts), (2, 1));
        // Reset clears ISR: nothing left to re-assert.
        interrupt.notify_queue(0);
        driver.common_write(DEVICE_STATUS, 1, 0);
        assert!(!eoi(&line));
    }

    #[test]
    fn msix_enabled_means_no_intx() {
        let line = intx_line();
        let mut driver = Driver::with_interrupts(usize::from(QUEUES) + 1, Some(line.clone()));
        assert_eq!(driver.cfg8(0x3d), 1);
        driver.bring_up();
        let interrupt = ack_interrupt(&driver.state);
        interrupt.notify_queue(0);
        assert_eq!(driver.vectors[1].injects(), 1);
        assert_eq!(asserts(&line), 0, "no INTx while MSI-X is enabled");
        // ISR is set (virtio sets it in any mode), but resample must not assert INTx.
        assert!(!eoi(&line));
        assert_eq!(asserts(&line), 0);
        // The driver turns MSI-X off (e.g. falling back): INTx takes over, at once for the
        // interrupt whose ISR bit is still set.
        driver.msix_control(0);
        assert_eq!(asserts(&line), 1);
        interrupt.notify_queue(0);
        assert_eq!(asserts(&line), 1);
        assert_eq!(driver.vectors[1].injects(), 1);
    }

    #[test]
    fn intx_disable_in_the_command_register_silences_the_line() {
        let line = intx_line();
        let mut driver = Driver::with_interrupts(0, Some(line.clone()));
        driver.bring_up_intx();
        let interrupt = ack_interrupt(&driver.state);
        let command = driver.cfg16(0x04);
        driver
            .dev
            .config_write(0x04, &(command | 0x0400).to_le_bytes());
        interrupt.notify_queue(0);
        assert_eq!(asserts(&line), 0);
        assert!(!eoi(&line));
        // Enabling INTx again with ISR still set asserts the line, as on real hardware.
        driver.dev.config_write(0x04, &command.to_le_bytes());
        assert_eq!(asserts(&line), 1);
        // And it stays up across EOIs until the guest reads ISR.
        assert!(eoi(&line));
        assert_eq!(asserts(&line), 1);
        assert_eq!(driver.isr(), ISR_QUEUE);
        assert!(!eoi(&line));
    }

    fn ack_interrupt(state: &Arc<Mutex<FakeState>>) -> Arc<dyn VirtioInterrupt> {
        state.lock().unwrap().interrupt.clone().unwrap()
    }

    #[test]
    fn header_identifies_a_modern_virtio_block_device() {
        let mut driver = Driver::new();
        assert_eq!(driver.cfg32(0x00), 0x1042_1af4);
        assert_eq!(driver.cfg32(0x08), 0x0180_0001);
        assert_eq!(driver.cfg32(0x2c), 0x1100_1af4);
        assert_eq!(driver.cfg32(0x10), 0x4, "64-bit memory BAR 0");
        assert_eq!(driver.cfg32(0x14), 0x40);
        assert_eq!(driver.cfg8(0x3d), 0, "no INTx");
        let layout = driver.dev.layout();
        assert_eq!(layout, Bar0Layout::new(QUEUES, QUEUES + 1));
        assert_eq!(layout.size, 0x4000);
        assert_eq!(driver.s.common, COMMON_CFG_OFFSET);
        assert_eq!(driver.s.isr, ISR_OFFSET);
        assert_eq!(driver.s.device, DEVICE_CFG_OFFSET);
        assert_eq!(driver.s.notify, NOTIFY_OFFSET);
        assert_eq!(driver.s.notify_multiplier, 4);
        assert_eq!(driver.s.msix_table, 0x2000);
        assert_eq!(driver.s.msix_pba, 0x3000);
        assert_eq!(driver.cfg16(driver.s.msix_cap + 2), 2, "table size 3");
        // Larger tables still fit: 64 queues, 65 vectors, a 32 KiB BAR.
        let big = Bar0Layout::new(64, 65);
        assert_eq!(
            (big.msix_table_offset, big.msix_pba_offset),
            (0x2000, 0x3000)
        );
        assert_eq!(Bar0Layout::new(1024, 2048).size, 0x10000);
    }

    #[test]
    fn outstanding_requests_compare_the_rings_in_guest_memory() {
        use vm_memory::Bytes;
        let mut driver = Driver::new();
        assert!(
            driver.dev.outstanding_requests().is_empty(),
            "not active yet"
        );
        driver.bring_up();
        assert!(
            driver.dev.outstanding_requests().is_empty(),
            "fresh rings are idle"
        );
        // The guest published two requests; the device returned none.
        driver
            .dev
            .memory
            .write_obj(2u16, GuestAddress(AVAIL + 2))
            .unwrap();
        assert_eq!(
            driver.dev.outstanding_requests(),
            vec![OutstandingRequests {
                queue: 0,
                avail_idx: 2,
                used_idx: 0
            }]
        );
        driver
            .dev
            .memory
            .write_obj(2u16, GuestAddress(USED + 2))
            .unwrap();
        assert!(driver.dev.outstanding_requests().is_empty());
    }

    #[test]
    fn linux_style_probe_activates_with_negotiated_queues_and_interrupts() {
        let mut driver = Driver::new();
        driver.bring_up();
        assert_eq!(driver.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert!(driver.dev.is_active());
        let activation = driver.state.lock().unwrap().activations.clone();
        assert_eq!(
            activation,
            vec![Activation {
                acked_features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
                queues: vec![(0, 64, DESC, AVAIL, USED, true)],
            }]
        );

        let interrupt = ack_interrupt(&driver.state);
        interrupt.notify_queue(0);
        assert_eq!(driver.vectors[1].injects(), 1);
        assert_eq!(driver.vectors[0].injects(), 0);
        let routed = driver.vectors[1].configured.lock().unwrap().unwrap();
        assert_eq!(routed.destination_apic_id(), 2);
        assert_eq!(
            driver
                .dev
                .msix()
                .unwrap()
                .vector_state(1)
                .unwrap()
                .message
                .destination_apic_id(),
            2
        );
        // ISR shows the queue interrupt and clears on read.
        assert_eq!(driver.read(driver.s.isr, 1), u64::from(ISR_QUEUE));
        assert_eq!(driver.read(driver.s.isr, 1), 0);

        let generation = driver.common_read(CONFIG_GENERATION, 1);
        interrupt.notify_config();
        assert_eq!(driver.vectors[0].injects(), 1);
        assert_ne!(driver.common_read(CONFIG_GENERATION, 1), generation);
        assert_eq!(driver.read(driver.s.isr, 1), u64::from(ISR_CONFIG));

        // Queue 1 has no vector: its signals go nowhere, and are counted.
        interrupt.notify_queue(1);
        interrupt.notify_queue(7);
        assert_eq!(driver.dev.msix().unwrap().counters().dropped_invalid, 1);
        assert_eq!(driver.dev.counters().bad_notifications, 1);

        // Masking the entry pends, unmasking delivers.
        let control = driver.s.msix_table + 16 + 12;
        driver.write(control, 4, 1);
        interrupt.notify_queue(0);
        assert_eq!(driver.vectors[1].injects(), 1);
        assert_eq!(driver.read(driver.s.msix_pba, 8), 0b10);
        driver.write(control, 4, 0);
        assert_eq!(driver.vectors[1].injects(), 2);
        assert_eq!(driver.read(driver.s.msix_pba, 8), 0);
    }

    #[test]
    fn interrupt_routing_shows_the_vectors_the_driver_chose() {
        let mut driver = Driver::new();
        let unrouted = QueueRouting {
            enabled: false,
            msix_vector: VIRTIO_MSI_NO_VECTOR,
        };
        assert_eq!(
            driver.dev.interrupt_routing(),
            InterruptRouting {
                config_vector: VIRTIO_MSI_NO_VECTOR,
                queues: vec![unrouted; usize::from(QUEUES)],
            }
        );
        driver.bring_up();
        let routing = driver.dev.interrupt_routing();
        assert_eq!(routing.config_vector, 0);
        assert_eq!(
            routing.queues,
            vec![
                QueueRouting {
                    enabled: true,
                    msix_vector: 1
                },
                unrouted
            ]
        );
    }

    #[test]
    fn notify_writes_signal_the_queue_eventfd() {
        let mut driver = Driver::new();
        driver.bring_up();
        let addresses = driver.dev.notify_addresses();
        assert_eq!(addresses.len(), usize::from(QUEUES));
        assert_eq!(addresses[0].0, BAR0 + NOTIFY_OFFSET);
        assert_eq!(addresses[1].0, BAR0 + NOTIFY_OFFSET + 4);
        let notifier = driver.state.lock().unwrap().notifiers[0].clone();
        assert!(Arc::ptr_eq(&notifier, &addresses[0].1));
        assert!(notifier.read().is_err(), "nothing yet");

        // vp_notify: the queue index, 16 bits, at notify base + notify_off * multiplier.
        driver.write(driver.s.notify, 2, 0);
        assert_eq!(notifier.read().unwrap(), 1);
        driver.write(driver.s.notify + 4, 2, 1);
        assert_eq!(addresses[1].1.read().unwrap(), 1);
        driver.write(driver.s.notify + 8, 2, 2);
        assert!(driver.dev.counters().ignored_accesses > 0);

        // The guest moves BAR 0: the notify addresses follow.
        let moved = driver
            .dev
            .config_write(0x10, &0x8000_0000u32.to_le_bytes())
            .unwrap();
        assert_eq!(moved.address, BAR0 + 0x8000_0000);
        assert_eq!(
            driver.dev.notify_addresses()[1].0,
            BAR0 + 0x8000_0000 + NOTIFY_OFFSET + 4
        );
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let mut driver = Driver::new();
        driver.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        driver.write_features(VIRTIO_F_VERSION_1 | 1 << 3);
        driver.set_status(STATUS_FEATURES_OK);
        assert_eq!(driver.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        driver.write_features(VIRTIO_RING_F_EVENT_IDX);
        driver.set_status(STATUS_FEATURES_OK);
        assert_eq!(driver.status() & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not start the device.
        driver.set_status(STATUS_DRIVER_OK);
        assert_eq!(driver.status() & STATUS_DRIVER_OK, 0);
        assert!(driver.state.lock().unwrap().activations.is_empty());
        let counters = driver.dev.counters();
        assert_eq!(counters.rejected_features, 2);
        assert_eq!(counters.bad_status_writes, 1);

        // Once FEATURES_OK sticks, feature writes are ignored and bits cannot be cleared.
        driver.write_features(VIRTIO_F_VERSION_1);
        driver.set_status(STATUS_FEATURES_OK);
        assert_ne!(driver.status() & STATUS_FEATURES_OK, 0);
        driver.write_features(DEVICE_FEATURES);
        driver.common_write(DRIVER_FEATURE_SELECT, 4, 0);
        assert_eq!(driver.common_read(DRIVER_FEATURE, 4), 0);
        driver.common_write(DEVICE_STATUS, 1, STATUS_ACKNOWLEDGE.into());
        assert_ne!(driver.status() & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn reset_stops_the_device_and_zeroes_transport_state() {
        let mut driver = Driver::new();
        driver.bring_up();
        driver.common_write(DEVICE_STATUS, 1, 0);
        assert_eq!(
            driver.state.lock().unwrap().resets,
            2,
            "bring_up resets too"
        );
        assert_eq!(driver.status(), 0);
        assert!(!driver.dev.is_active());
        assert_eq!(
            driver.common_read(CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        driver.common_write(QUEUE_SELECT, 2, 0);
        assert_eq!(driver.common_read(QUEUE_SELECT, 2), 0);
        assert_eq!(driver.common_read(QUEUE_SIZE, 2), u64::from(MAX_QUEUE_SIZE));
        assert_eq!(
            driver.common_read(QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        assert_eq!(driver.common_read(QUEUE_ENABLE, 2), 0);
        assert_eq!(driver.common_read(QUEUE_DESC, 8), 0);
        driver.common_write(DRIVER_FEATURE_SELECT, 4, 1);
        assert_eq!(driver.common_read(DRIVER_FEATURE, 4), 0);
        // MSI-X belongs to config space: a virtio reset leaves it enabled.
        assert!(driver.dev.msix().unwrap().is_enabled());
        assert_eq!(
            driver.cfg16(driver.s.msix_cap + 2) & MSIX_CONTROL_ENABLE,
            MSIX_CONTROL_ENABLE
        );

        // And the device can be brought up again.
        driver.bring_up();
        assert_eq!(driver.state.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn bad_queue_sizes_and_vectors_are_ignored() {
        let mut driver = Driver::new();
        driver.common_write(QUEUE_SELECT, 2, 0);
        for size in [0, 3, 100, 512] {
            driver.common_write(QUEUE_SIZE, 2, size);
        }
        assert_eq!(driver.common_read(QUEUE_SIZE, 2), u64::from(MAX_QUEUE_SIZE));
        driver.common_write(QUEUE_SIZE, 2, 128);
        assert_eq!(driver.common_read(QUEUE_SIZE, 2), 128);
        assert_eq!(driver.dev.counters().bad_queue_sizes, 4);

        // Vector 3 is past a 3-entry table: reads back NO_VECTOR, as Linux checks.
        driver.common_write(QUEUE_MSIX_VECTOR, 2, 3);
        assert_eq!(
            driver.common_read(QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        driver.common_write(CONFIG_MSIX_VECTOR, 2, 0x7fff);
        assert_eq!(
            driver.common_read(CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        assert_eq!(driver.dev.counters().bad_vectors, 2);

        // A queue that does not exist reads as unavailable and takes no writes.
        driver.common_write(QUEUE_SELECT, 2, 9);
        assert_eq!(driver.common_read(QUEUE_SIZE, 2), 0);
        driver.common_write(QUEUE_SIZE, 2, 64);
        driver.common_write(QUEUE_ENABLE, 2, 1);
        assert_eq!(driver.common_read(QUEUE_ENABLE, 2), 0);

        // An enabled queue's configuration is frozen.
        driver.common_write(QUEUE_SELECT, 2, 1);
        driver.common_write(QUEUE_ENABLE, 2, 1);
        driver.common_write(QUEUE_SIZE, 2, 16);
        assert_eq!(driver.common_read(QUEUE_SIZE, 2), u64::from(MAX_QUEUE_SIZE));
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_raises_the_config_interrupt() {
        let mut driver = Driver::new();
        driver.state.lock().unwrap().fail_activation = true;
        driver.bring_up();
        assert_ne!(driver.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(!driver.dev.is_active());
        assert!(matches!(
            driver.dev.activation_error(),
            Some(ActivateError::Device(_))
        ));
        assert_eq!(driver.vectors[0].injects(), 1);
        assert_eq!(driver.dev.counters().failed_activations, 1);
        // The driver cannot clear DEVICE_NEEDS_RESET; a reset does.
        driver.set_status(STATUS_FAILED);
        assert_ne!(driver.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        driver.common_write(DEVICE_STATUS, 1, 0);
        assert_eq!(driver.status(), 0);
    }

    #[test]
    fn rings_outside_guest_memory_fail_activation() {
        let mut driver = Driver::new();
        driver.common_write(DEVICE_STATUS, 1, 0);
        driver.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        driver.write_features(VIRTIO_F_VERSION_1);
        driver.set_status(STATUS_FEATURES_OK);
        driver.common_write(QUEUE_SELECT, 2, 1);
        driver.common_write(QUEUE_DESC, 8, MEMORY_SIZE as u64 - 0x10);
        driver.common_write(QUEUE_DRIVER, 8, AVAIL);
        driver.common_write(QUEUE_DEVICE, 8, USED);
        assert_eq!(
            driver.common_read(QUEUE_DESC, 8),
            MEMORY_SIZE as u64 - 0x10,
            "8-byte accesses to 64-bit fields work too"
        );
        driver.common_write(QUEUE_ENABLE, 2, 1);
        driver.set_status(STATUS_DRIVER_OK);
        assert_ne!(driver.status() & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(matches!(
            driver.dev.activation_error(),
            Some(ActivateError::BadQueue(1, _))
        ));
        assert!(driver.state.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn device_config_and_pci_cfg_capability_reach_the_bar() {
        let mut driver = Driver::new();
        assert_eq!(driver.read(driver.s.device + 2, 2), 0x8382);
        assert_eq!(driver.read(driver.s.device + 0x100, 4), 0);
        driver.write(driver.s.device + 4, 1, 0x5a);
        assert_eq!(
            driver.state.lock().unwrap().config_writes,
            vec![(4, vec![0x5a])]
        );

        // Through the PCI_CFG window: num_queues (2 bytes at common + 0x12).
        let cap = driver.s.pci_cfg_cap;
        driver.dev.config_write(cap + 4, &[0]);
        driver
            .dev
            .config_write(cap + 8, &(NUM_QUEUES as u32).to_le_bytes());
        driver.dev.config_write(cap + 12, &2u32.to_le_bytes());
        assert_eq!(driver.cfg32(cap + 8), NUM_QUEUES as u32);
        assert_eq!(driver.cfg16(cap + 16), QUEUES);
        // And a write through it: queue_select.
        driver
            .dev
            .config_write(cap + 8, &(QUEUE_SELECT as u32).to_le_bytes());
        driver.dev.config_write(cap + 16, &1u16.to_le_bytes());
        assert_eq!(driver.common_read(QUEUE_SELECT, 2), 1);
        // A BAR other than 0 reads as zero through the window.
        driver.dev.config_write(cap + 4, &[2]);
        assert_eq!(driver.cfg32(cap + 16), 0);
    }

    #[test]
    fn fewer_vectors_than_queues_is_allowed() {
        let mut driver = Driver::with_vectors(1);
        assert_eq!(driver.cfg16(driver.s.msix_cap + 2) & 0x7ff, 0);
        driver.common_write(QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(driver.common_read(QUEUE_MSIX_VECTOR, 2), 0);
        driver.common_write(QUEUE_SELECT, 2, 1);
        driver.common_write(QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(
            driver.common_read(QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
    }

    #[test]
    fn constructor_rejects_unusable_devices() {
        struct Shape(u16, u16);
        impl VirtioDevice for Shape {
            fn device_type(&self) -> u32 {
                VIRTIO_ID_BLOCK
            }
            fn num_queues(&self) -> u16 {
                self.0
            }
            fn max_queue_size(&self) -> u16 {
                self.1
            }
            fn device_features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }
            fn read_config(&self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(
                &mut self,
                _: GuestMemoryMmap,
                _: u64,
                _: Arc<dyn VirtioInterrupt>,
                _: Vec<ActiveQueue>,
            ) -> Result<(), ActivateError> {
                Ok(())
            }
            fn reset(&mut self) {}
        }
        let vector = || vec![Arc::new(FakeVector::default()) as Arc<dyn MsiVector>];
        let new = |q, s, v, bar| VirtioPciDevice::new(Box::new(Shape(q, s)), memory(), v, bar);
        assert!(matches!(
            new(0, 256, vector(), BAR0),
            Err(VirtioPciError::NoQueues)
        ));
        assert!(matches!(
            new(1, 100, vector(), BAR0),
            Err(VirtioPciError::BadMaxQueueSize(100))
        ));
        // No vectors is a function without MSI-X; more than the spec allows is refused.
        assert!(new(1, 256, Vec::new(), BAR0).is_ok_and(|dev| dev.msix().is_none()));
        let too_many = (0..=irq::msix::MSIX_MAX_VECTORS)
            .map(|_| Arc::new(FakeVector::default()) as Arc<dyn MsiVector>)
            .collect();
        assert!(matches!(
            new(1, 256, too_many, BAR0),
            Err(VirtioPciError::Msix(_))
        ));
        assert!(matches!(
            new(1, 256, vector(), BAR0 + 0x1000),
            Err(VirtioPciError::Config(_))
        ));
    }

    /// Whatever a guest throws at config space and BAR 0, nothing panics.
    #[test]
    fn arbitrary_guest_accesses_do_not_panic() {
        let mut driver = Driver::new();
        driver.bring_up();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut buffer = [0u8; 16];
        for _ in 0..200_000 {
            let r = next();
            let len = [0, 1, 2, 3, 4, 8, 16][(r % 7) as usize];
            // Near the start of each structure most of the time, anywhere otherwise.
            let bases = [
                0,
                ISR_OFFSET,
                DEVICE_CFG_OFFSET,
                NOTIFY_OFFSET,
                0x2000,
                0x3000,
            ];
            let offset = match bases.get((r >> 60) as usize) {
                Some(base) => base + (r >> 8) % 0x40,
                None => (r >> 8) % 0x5000,
            };
            let value = next();
            buffer[..8].copy_from_slice(&value.to_le_bytes());
            // Keep the device alive most of the time so the runtime paths get exercised.
            let status_write = offset == DEVICE_STATUS && len == 1;
            match (r >> 40) % 4 {
                0 => driver
                    .dev
                    .bar_read((r >> 50) as u8 % 2, offset, &mut buffer[..len]),
                1 if !status_write || value % 8 == 0 => {
                    driver
                        .dev
                        .bar_write((r >> 50) as u8 % 2, offset, &buffer[..len])
                }
                2 => driver
                    .dev
                    .config_read((offset % 0x1100) as u16, &mut buffer[..len]),
                3 => {
                    let _ = driver
                        .dev
                        .config_write((offset % 0x1100) as u16, &buffer[..len]);
                }
                _ => {}
            }
            if r % 1000 == 0 {
                if let Some(interrupt) = driver.state.lock().unwrap().interrupt.clone() {
                    interrupt.notify_queue((r >> 20) as u16 % 4);
                    interrupt.notify_config();
                }
            }
        }
        assert!(driver.dev.counters().ignored_accesses > 1000);
        assert!(driver.dev.msix().unwrap().counters().ignored_accesses > 100);
    }
}
