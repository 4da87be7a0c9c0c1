//! NVMe controller core (NVMe 1.4 base specification), as an in-process device model.
//!
//! [`NvmeController`] owns everything guest-visible behind BAR 0: the register file
//! ([`registers`]), the admin queue ([`queue`], [`admin`]) and the table of I/O queues. It
//! runs on vCPU threads (behind the PCI function's lock) and never does I/O there: each I/O
//! submission queue is a handler on the I/O worker pool ([`io_queue`]), which executes the NVM
//! command set ([`nvm`]) against the namespaces' block backends and posts completions into
//! I/O completion queues shared with the controller. Interrupts go out through
//! [`NvmeInterrupt`], implemented by the PCI function's MSI-X table.
//!
//! Namespaces: each [`NamespaceConfig`] names a block backend and a byte range of it, so
//! namespaces can have a backend each or be carved out of one ([`NamespaceConfig::carve`]).

pub mod admin;
pub mod ana;
#[cfg(test)]
mod ana_tests;
pub mod io_queue;
#[cfg(test)]
mod io_tests;
pub mod nvm;
pub mod pci;
pub mod prp;
pub mod queue;
pub mod registers;
pub mod shadow;
#[cfg(test)]
mod shadow_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::io::backend::MAX_IO_BUFFERS;
use crate::io::{BlockBackend, IoPool, QueueRegistration};
use crate::latency::QueueLatency;
use admin::{AsyncEvents, Features};
use ana::{AnaGroups, AnaState};
use io_queue::{IoCompletionQueue, IoQueueStats, IoSubmissionQueueShared};
use nvm::{IoContext, Namespace};
use queue::{Completion, CompletionQueue, SubmissionQueue};
use registers::{Doorbell, RegisterFile, RegisterWrite};
use shadow::DoorbellBuffers;

/// Memory page size: CAP.MPSMIN = CAP.MPSMAX = 0, so CC.MPS can only select 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
pub const SUBMISSION_ENTRY_BYTES: u64 = 64;
pub const COMPLETION_ENTRY_BYTES: u64 = 16;
/// CC.IOSQES / CC.IOCQES as log2 of the entry sizes above.
pub const SUBMISSION_ENTRY_SHIFT: u32 = 6;
pub const COMPLETION_ENTRY_SHIFT: u32 = 4;
pub const ADMIN_QUEUE_ID: u16 = 0;
/// Admin queues are sized by 12-bit AQA fields (0's based).
pub const MAX_ADMIN_QUEUE_ENTRIES: u32 = 4096;
/// Largest MDTS the controller reports and enforces (2 MiB): a transfer of 2^9 pages plus an
/// unaligned first page stays far below the backend's limit of [`MAX_IO_BUFFERS`] buffers.
pub const MAX_MDTS: u8 = 9;
const _: () = assert!((1usize << MAX_MDTS) + 1 < MAX_IO_BUFFERS);
/// Logical block sizes a namespace may have: 512 bytes to one page.
pub const BLOCK_SIZE_SHIFTS: std::ops::RangeInclusive<u8> = 9..=12;

/// How the controller raises interrupts; implemented by the PCI function, which owns the
/// MSI-X table (masking, pending bits) and the routes behind each vector.
pub trait NvmeInterrupt: Send + Sync {
    /// Completion queue `cq_id` has new entries and was created with interrupts enabled on
    /// `vector` (the guest's choice in Create I/O CQ; vector 0 for the admin CQ). Called on
    /// vCPU threads (admin CQ) and on I/O worker threads (I/O CQs).
    fn notify_completion_queue(&self, cq_id: u16, vector: u16);
}

/// A completion status: Status Code Type, Status Code and Do Not Retry (NVMe 1.4, 4.6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code_type: u8,
    pub code: u8,
    pub do_not_retry: bool,
}

impl Status {
    pub const SUCCESS: Status = Status {
        code_type: 0,
        code: 0,
        do_not_retry: false,
    };
    // Generic command status (SCT 0), NVMe 1.4 figure 128.
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0B);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0C);
    pub const INTERNAL_ERROR: Status = Status::generic(0x06);
    pub const PRP_OFFSET_INVALID: Status = Status::generic(0x13);
    /// Writes to a namespace whose backend is read-only (Identify Namespace NSATTR bit 0),
    /// as Linux's target does; SCT 1 0x82 (Attempted Write to Read Only Range) is for LBA
    /// Range Type ranges, which this controller does not have.
    pub const NAMESPACE_WRITE_PROTECTED: Status = Status::generic(0x20);
    // Generic command status of the NVM command set (NVMe 1.4 figure 129).
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    // Command specific status (SCT 1), NVMe 1.4 figure 130.
    pub const COMPLETION_QUEUE_INVALID: Status = Status::command_specific(0x00);
    pub const INVALID_QUEUE_IDENTIFIER: Status = Status::command_specific(0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::command_specific(0x02);
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = Status::command_specific(0x05);
    pub const INVALID_INTERRUPT_VECTOR: Status = Status::command_specific(0x08);
    pub const INVALID_LOG_PAGE: Status = Status::command_specific(0x09);
    pub const INVALID_QUEUE_DELETION: Status = Status::command_specific(0x0C);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::command_specific(0x0D);
    // Media and data integrity errors (SCT 2), NVMe 1.4 figure 133: host-side I/O errors.
    // Retrying may help (the host file system may recover), so Do Not Retry stays clear.
    pub const WRITE_FAULT: Status = Status::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);
    // Path related status (SCT 3), NVMe 1.4 figure 134: the command may succeed on another
    // controller of the subsystem.
    pub const ANA_PERSISTENT_LOSS: Status = Status::path(0x01);
    pub const ANA_INACCESSIBLE: Status = Status::path(0x02);
    pub const ANA_TRANSITION: Status = Status::path(0x03);

    /// Errors caused by the command itself: retrying the same command cannot succeed.
    const fn generic(code: u8) -> Status {
        Status {
            code_type: 0,
            code,
            do_not_retry: true,
        }
    }

    const fn command_specific(code: u8) -> Status {
        Status {
            code_type: 1,
            code,
            do_not_retry: true,
        }
    }

    const fn path(code: u8) -> Status {
        Status {
            code_type: 3,
            code,
            do_not_retry: false,
        }
    }

    const fn media(code: u8) -> Status {
        Status {
            code_type: 2,
            code,
            do_not_retry: false,
        }
    }

    pub fn is_success(self) -> bool {
        self.code_type == 0 && self.code == 0
    }

    /// The Status Field as it sits in CQE DW3 bits 31:17, shifted down to bits 15:1 (bit 0
    /// is the phase tag, left clear): SC in 8:1, SCT in 11:9, DNR in 15.
    pub fn field(self) -> u16 {
        (u16::from(self.code) << 1)
            | (u16::from(self.code_type & 0x7) << 9)
            | (u16::from(self.do_not_retry) << 15)
    }

    /// Inverse of [`Status::field`] (the phase bit is ignored).
    pub fn from_field(field: u16) -> Status {
        Status {
            code: (field >> 1) as u8,
            code_type: ((field >> 9) & 0x7) as u8,
            do_not_retry: field & (1 << 15) != 0,
        }
    }
}

/// One namespace of the controller: `size_blocks` logical blocks stored in `backend` from
/// byte `backend_offset` on.
#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    pub backend: Arc<BlockBackend>,
    /// Where the namespace starts in its backend, in bytes (a multiple of the block size).
    pub backend_offset: u64,
    pub size_blocks: u64,
    /// log2 of the logical block size (9 = 512 bytes, 12 = 4 KiB).
    pub block_size_shift: u8,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
}

impl NamespaceConfig {
    /// A namespace covering all of `backend` in 512-byte blocks, with identifiers derived
    /// from `seed`, so that identifiers differ between namespaces and controllers.
    pub fn with_seed(backend: Arc<BlockBackend>, seed: u64) -> Self {
        let size_blocks = backend.size() >> 9;
        Self::range(backend, 0, size_blocks, seed)
    }

    /// `count` namespaces of equal size carved out of one backend, in order, with seeds
    /// `seed`, `seed + 1`, ... A remainder smaller than one namespace stays unused.
    pub fn carve(backend: Arc<BlockBackend>, count: u32, seed: u64) -> Vec<Self> {
        let blocks_each = (backend.size() >> 9) / u64::from(count.max(1));
        (0..u64::from(count))
            .map(|index| {
                let offset = index * (blocks_each << 9);
                Self::range(backend.clone(), offset, blocks_each, seed + index)
            })
            .collect()
    }

    fn range(backend: Arc<BlockBackend>, backend_offset: u64, size_blocks: u64, seed: u64) -> Self {
        let mut nguid = [0u8; 16];
        nguid[..8].copy_from_slice(&0x626c_6b73_7761_726d_u64.to_be_bytes()); // "blkswarm"
        nguid[8..].copy_from_slice(&seed.to_be_bytes());
        let mut uuid = nguid;
        // RFC 4122 version 4 / variant 1 bits, so tools accept it as a UUID.
        uuid[6] = (uuid[6] & 0x0F) | 0x40;
        uuid[8] = (uuid[8] & 0x3F) | 0x80;
        NamespaceConfig {
            backend,
            backend_offset,
            size_blocks,
            block_size_shift: 9,
            nguid,
            uuid,
        }
    }

    pub fn block_size(&self) -> u64 {
        1 << self.block_size_shift
    }
}

/// A controller configuration the controller cannot serve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NvmeConfigError {
    #[error("queues of {0} entries: CAP.MQES allows 2..=65536")]
    QueueEntries(u32),
    #[error("namespace {nsid}: logical block size 2^{shift} is not 512..=4096 bytes")]
    BlockSize { nsid: u32, shift: u8 },
    #[error("namespace {nsid}: backend offset {offset} is not a multiple of the block size")]
    UnalignedOffset { nsid: u32, offset: u64 },
    #[error("namespace {nsid}: {blocks} blocks from byte {offset} do not fit its {backend_size}-byte backend")]
    BeyondBackend {
        nsid: u32,
        offset: u64,
        blocks: u64,
        backend_size: u64,
    },
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Largest queue the guest may create, in entries (CAP.MQES + 1), at least 2.
    pub max_queue_entries: u32,
    /// I/O queue pairs offered through Number of Queues; I/O queue ids run 1..=this.
    pub max_io_queue_pairs: u16,
    /// MSI-X vectors of the PCI function: Create I/O CQ rejects vectors beyond this.
    pub interrupt_vectors: u16,
    /// Maximum Data Transfer Size as a power of two of the page size; 0 (no limit) and values
    /// above [`MAX_MDTS`] mean [`MAX_MDTS`].
    pub mdts: u8,
    /// PCI vendor and subsystem vendor ids, repeated in Identify Controller.
    pub vendor_id: u16,
    pub subsystem_vendor_id: u16,
    pub serial: String,
    pub model: String,
    pub firmware_revision: String,
    pub controller_id: u16,
    /// The subsystem's NQN (Identify SUBNQN), shared by its controllers; None: one derived
    /// from the serial number.
    pub subsystem_nqn: Option<String>,
    /// One of several controllers of the subsystem (CMIC bit 1), sharing its namespaces
    /// (Identify Namespace NMIC bit 0): Linux builds one multipath disk over them.
    pub multi_controller: bool,
    /// Asymmetric Namespace Access reporting (CMIC bit 3): ANA groups, each with this
    /// controller's state, the ANA log and ANA change events (see [`ana`]).
    pub ana_reporting: bool,
    /// ANA groups the namespaces are dealt into, round-robin; None: one per namespace.
    pub ana_groups: Option<u32>,
    /// ANATT (with `ana_reporting`): the longest the host keeps a group in the change
    /// state, in seconds, 1..=255.
    pub ana_transition_time_secs: u8,
    /// Report a volatile write cache (Identify VWC): writes complete once in the backend
    /// (the host page cache for raw files) and Flush makes them durable. Without it, or when
    /// the host turns the cache off, every write is flushed before it completes.
    pub volatile_write_cache: bool,
    pub namespaces: Vec<NamespaceConfig>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            max_queue_entries: 1024,
            max_io_queue_pairs: 4,
            interrupt_vectors: 5,
            mdts: 7,
            vendor_id: 0x1b36,
            subsystem_vendor_id: 0x1b36,
            serial: "blkswarm-nvme-0".to_string(),
            model: "blkswarm NVMe controller".to_string(),
            firmware_revision: "0.1".to_string(),
            controller_id: 0,
            subsystem_nqn: None,
            multi_controller: false,
            ana_reporting: false,
            ana_groups: None,
            ana_transition_time_secs: ana::ANA_TRANSITION_TIME_SECS,
            volatile_write_cache: true,
            namespaces: vec![NamespaceConfig::with_seed(
                Arc::new(BlockBackend::null(1 << 30, None)),
                1,
            )],
        }
    }
}

impl ControllerConfig {
    /// The MDTS the controller reports and enforces.
    pub fn effective_mdts(&self) -> u8 {
        if self.mdts == 0 {
            MAX_MDTS
        } else {
            self.mdts.min(MAX_MDTS)
        }
    }

    /// Bytes the largest allowed transfer covers.
    pub fn max_transfer_bytes(&self) -> Option<u64> {
        Some(PAGE_SIZE << self.effective_mdts())
    }

    /// The subsystem NQN in Identify Controller.
    pub fn subsystem_nqn(&self) -> String {
        self.subsystem_nqn
            .clone()
            .unwrap_or_else(|| format!("nqn.2024-01.dev.blkswarm:nvme:{}", self.serial))
    }

    /// Highest queue id any doorbell may name.
    pub fn max_queue_id(&self) -> u16 {
        self.max_io_queue_pairs
    }

    /// Checks what [`NvmeController::new`] relies on.
    pub fn validate(&self) -> Result<(), NvmeConfigError> {
        if !(2..=1 << 16).contains(&self.max_queue_entries) {
            return Err(NvmeConfigError::QueueEntries(self.max_queue_entries));
        }
        for (nsid, namespace) in (1u32..).zip(&self.namespaces) {
            let shift = namespace.block_size_shift;
            if !BLOCK_SIZE_SHIFTS.contains(&shift) {
                return Err(NvmeConfigError::BlockSize { nsid, shift });
            }
            let offset = namespace.backend_offset;
            if !offset.is_multiple_of(namespace.block_size()) {
                return Err(NvmeConfigError::UnalignedOffset { nsid, offset });
            }
            let backend_size = namespace.backend.size();
            let fits = namespace
                .size_blocks
                .checked_mul(namespace.block_size())
                .is_some_and(|len| nvm::fits_backend(offset, len, backend_size));
            if !fits {
                return Err(NvmeConfigError::BeyondBackend {
                    nsid,
                    offset,
                    blocks: namespace.size_blocks,
                    backend_size,
                });
            }
        }
        Ok(())
    }
}

/// Things the guest did wrong that the controller ignored; the guest cannot see these.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NvmeCounters {
    /// Register accesses of a size or offset the specification does not allow.
    pub invalid_register_accesses: u64,
    /// Doorbell writes for a queue that does not exist (or before CSTS.RDY).
    pub invalid_doorbell_registers: u64,
    /// Doorbell values beyond the queue size, or a CQ head past the posted entries.
    pub invalid_doorbell_values: u64,
    /// Admin completions held back because the admin CQ was full.
    pub completions_held: u64,
    pub admin_commands: u64,
    /// Times the controller set CSTS.CFS.
    pub fatal_errors: u64,
    /// Create I/O SQ commands that failed because the I/O pool refused the queue.
    pub io_queue_registration_failures: u64,
    /// Shadow doorbell values beyond their queue (or a CQ head past the posted entries).
    pub invalid_shadow_doorbell_values: u64,
    /// Controller Level Resets: by the host (CC.EN 1 -> 0) or by a subsystem reset.
    pub resets: u64,
    /// NVM Subsystem Resets (NSSR written by the guest, or `blkswarm ctl reset`).
    pub subsystem_resets: u64,
    /// ANA state changes of this controller's groups.
    pub ana_changes: u64,
}

/// A reset the guest made, told to the VMM as it happens (it records path events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestReset {
    /// CC.EN 1 -> 0: a Controller Level Reset (Linux: error recovery, `reset_controller`).
    Controller,
    /// NSSR written with "NVMe".
    Subsystem,
}

/// Called with each [`GuestReset`], from the vCPU thread that wrote the register, with the
/// controller locked: it must not take the controller's lock.
pub type GuestResetObserver = Box<dyn Fn(GuestReset) + Send>;

/// An I/O SQ: the state shared with its handler, its CQ, and its place in the pool.
struct IoSubmissionQueueSlot {
    shared: Arc<IoSubmissionQueueShared>,
    cq: Arc<IoCompletionQueue>,
    registration: QueueRegistration,
}

/// The NVMe controller behind BAR 0.
pub struct NvmeController {
    config: ControllerConfig,
    memory: GuestMemoryMmap,
    pool: Arc<IoPool>,
    io: Arc<IoContext>,
    registers: RegisterFile,
    admin_submission_queue: Option<SubmissionQueue>,
    admin_completion_queue: Option<CompletionQueue>,
    /// Indexed by queue id; slot 0 (the admin queue id) stays empty.
    io_submission_queues: Vec<Option<IoSubmissionQueueSlot>>,
    /// Counters of deleted I/O SQs, by id (see `io_queue_history`).
    retired_io_queues: BTreeMap<u16, IoQueueStats>,
    io_completion_queues: Vec<Option<Arc<IoCompletionQueue>>>,
    features: Features,
    events: AsyncEvents,
    counters: NvmeCounters,
    /// The admin CQ got entries during the current register write: signalled once at its end.
    admin_completions_to_signal: bool,
    /// Shadow doorbells of the I/O queues (Doorbell Buffer Config), forgotten at reset.
    doorbell_buffers: Option<DoorbellBuffers>,
    /// Timing and counts per I/O SQ id (index 0 unused), kept across queue deletions.
    io_queue_latency: Vec<Arc<QueueLatency>>,
    /// Failed by the host ([`Self::fail`]): enabling does not make it ready.
    held_down: bool,
    guest_reset_observer: Option<GuestResetObserver>,
}

impl NvmeController {
    /// # Panics
    ///
    /// If `config` fails [`ControllerConfig::validate`] (a VMM configuration error: check it
    /// first).
    pub fn new(
        config: ControllerConfig,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn NvmeInterrupt>,
        pool: Arc<IoPool>,
    ) -> Self {
        if let Err(error) = config.validate() {
            panic!("invalid NVMe controller configuration: {error}");
        }
        let slots = usize::from(config.max_queue_id()) + 1;
        let features = Features::defaults(&config);
        let io = Arc::new(IoContext {
            memory: memory.clone(),
            interrupt,
            namespaces: config.namespaces.iter().map(Namespace::new).collect(),
            max_transfer_bytes: PAGE_SIZE << config.effective_mdts(),
            write_through: AtomicBool::new(!features.volatile_write_cache),
            fatal: AtomicBool::new(false),
            invalid_shadow_doorbell_values: AtomicU64::new(0),
            halted: AtomicBool::new(false),
            ana: config.ana_reporting.then(|| {
                let namespaces = config.namespaces.len() as u32;
                Arc::new(AnaGroups::new(
                    config.ana_groups.unwrap_or(namespaces),
                    namespaces,
                ))
            }),
        });
        NvmeController {
            registers: RegisterFile::new(config.max_queue_entries),
            admin_submission_queue: None,
            admin_completion_queue: None,
            io_submission_queues: (0..slots).map(|_| None).collect(),
            retired_io_queues: BTreeMap::new(),
            io_completion_queues: (0..slots).map(|_| None).collect(),
            features,
            events: AsyncEvents::default(),
            counters: NvmeCounters::default(),
            admin_completions_to_signal: false,
            doorbell_buffers: None,
            io_queue_latency: (0..slots).map(|_| Arc::new(QueueLatency::new())).collect(),
            held_down: false,
            guest_reset_observer: None,
            config,
            memory,
            pool,
            io,
        }
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Tells `observer` of every reset the guest makes from now on (not of those the host
    /// forces through [`Self::subsystem_reset`]).
    pub fn observe_guest_resets(&mut self, observer: GuestResetObserver) {
        self.guest_reset_observer = Some(observer);
    }

    fn guest_reset(&self, reset: GuestReset) {
        if let Some(observer) = &self.guest_reset_observer {
            observer(reset);
        }
    }

    pub fn counters(&self) -> NvmeCounters {
        NvmeCounters {
            invalid_shadow_doorbell_values: self
                .io
                .invalid_shadow_doorbell_values
                .load(Ordering::Relaxed),
            ..self.counters
        }
    }

    /// Timing and counts of every I/O SQ id the controller offers, live or not.
    pub fn io_queue_latency(&self) -> impl Iterator<Item = (u16, &Arc<QueueLatency>)> {
        (1u16..).zip(self.io_queue_latency.iter().skip(1))
    }

    /// The buffers of the last successful Doorbell Buffer Config, until a reset.
    pub fn doorbell_buffers(&self) -> Option<DoorbellBuffers> {
        self.doorbell_buffers
    }

    pub fn registers(&self) -> &RegisterFile {
        &self.registers
    }

    /// Per I/O SQ counters of the queues that exist now, in queue id order.
    pub fn io_queue_stats(&self) -> Vec<IoQueueStats> {
        self.io_submission_queues
            .iter()
            .flatten()
            .map(|slot| slot.shared.stats(&slot.cq, slot.registration.worker()))
            .collect()
    }

    /// Per I/O SQ id, everything its queues carried since the controller was created, deleted
    /// ones included (a guest deletes its I/O queues at shutdown, before the VMM reports):
    /// counts summed, cq/vector/worker of the latest queue with that id.
    pub fn io_queue_history(&self) -> Vec<IoQueueStats> {
        let mut history = self.retired_io_queues.clone();
        for live in self.io_queue_stats() {
            history
                .entry(live.sq_id)
                .and_modify(|total| total.add(&live))
                .or_insert(live);
        }
        history.into_values().collect()
    }

    /// Keeps the counters of a queue that is going away, for [`Self::io_queue_history`].
    fn retire_io_queue(&mut self, stats: IoQueueStats) {
        self.retired_io_queues
            .entry(stats.sq_id)
            .and_modify(|total| total.add(&stats))
            .or_insert(stats);
    }

    /// BAR 0 size: registers plus one doorbell pair per queue, a power of two as PCI wants,
    /// and at least 16 KiB because Linux maps the doorbell page unconditionally.
    pub fn bar_size(&self) -> u64 {
        let doorbells = (u64::from(self.config.max_queue_id()) + 1) * 8;
        (registers::DOORBELL_BASE + doorbells)
            .next_power_of_two()
            .max(0x4000)
    }

    /// An MMIO read of BAR 0. Accesses the specification does not allow read as zero.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.check_io_fatal_error();
        match self.registers.read(offset, data.len()) {
            Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
            None => {
                self.counters.invalid_register_accesses += 1;
                data.fill(0);
            }
        }
    }

    /// An MMIO write of BAR 0.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        match self.registers.write(offset, data) {
            None => self.counters.invalid_register_accesses += 1,
            Some(RegisterWrite::Stored) => {}
            Some(RegisterWrite::ControllerConfiguration { old, new }) => {
                self.controller_configuration_changed(old, new)
            }
            Some(RegisterWrite::Doorbell { doorbell, value }) => {
                self.doorbell(doorbell, value);
                self.signal_admin_completions();
            }
            Some(RegisterWrite::SubsystemReset) => {
                self.subsystem_reset();
                self.guest_reset(GuestReset::Subsystem);
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        self.registers.csts & registers::CSTS_RDY != 0
    }

    /// A failed path: sets CSTS.CFS as [`Self::fatal_error`] does, and the controller does
    /// not become ready again (CSTS.RDY after CC.EN) until [`Self::restore`]. A host that
    /// resets it meanwhile waits for RDY (Linux: up to CAP.TO, 15 s, then it gives the
    /// controller up).
    pub fn fail(&mut self) {
        self.held_down = true;
        self.fatal_error();
    }

    /// Ends [`Self::fail`]: if the host already enabled the controller again, it becomes
    /// ready now. Returns whether it was held down.
    pub fn restore(&mut self) -> bool {
        let was_held = std::mem::take(&mut self.held_down);
        let enabled = self.registers.cc & registers::CC_EN != 0;
        if was_held && enabled && !self.is_ready() && self.registers.csts & registers::CSTS_CFS == 0
        {
            self.enable();
        }
        was_held
    }

    pub fn is_held_down(&self) -> bool {
        self.held_down
    }

    /// Sets CSTS.CFS: the host must reset the controller (CC.EN 1 -> 0) to use it again.
    /// Until then the I/O queues fetch nothing (the admin queue already stops on CFS).
    pub fn fatal_error(&mut self) {
        self.counters.fatal_errors += 1;
        self.registers.csts |= registers::CSTS_CFS;
        self.io.halted.store(true, Ordering::SeqCst);
    }

    /// This controller's ANA states, when it reports ANA.
    pub fn ana_groups(&self) -> Option<&Arc<AnaGroups>> {
        self.io.ana.as_ref()
    }

    /// Sets this controller's ANA state of `group` (a namespace id): I/O to the namespace
    /// through this controller follows the new state at once, and an ANA Change Notice goes
    /// out if the host enabled it. Ok(false) when the group already was in that state.
    pub fn set_ana_state(&mut self, group: u32, state: AnaState) -> Result<bool, String> {
        let ana = self
            .io
            .ana
            .as_ref()
            .ok_or("the controller does not report ANA (one controller per subsystem)")?;
        let changed = ana.set(group, state)?;
        if changed {
            self.counters.ana_changes += 1;
            self.events.ana_changed(&self.features);
            self.deliver_async_events();
            self.signal_admin_completions();
        }
        Ok(changed)
    }

    /// NVM Subsystem Reset, asked for by the guest (NSSR) or forced by the host (`blkswarm ctl
    /// reset`): the controller goes through a Controller Level Reset and its registers back
    /// to their power-on values, as if the subsystem had been power-cycled, except that
    /// CSTS.NSSRO says why. Commands in flight get no completion: the guest notices at its
    /// next command timeout, sees NSSRO (Linux: `nvme_should_reset`) and brings the
    /// controller up again from scratch.
    pub fn subsystem_reset(&mut self) {
        self.counters.subsystem_resets += 1;
        self.reset();
        self.registers = RegisterFile {
            csts: registers::CSTS_NSSRO,
            ..RegisterFile::new(self.config.max_queue_entries)
        };
    }

    /// An I/O queue lost its guest memory: report it as a controller fatal status.
    fn check_io_fatal_error(&mut self) {
        if self.io.fatal.swap(false, Ordering::SeqCst) {
            self.fatal_error();
        }
    }

    /// Namespace `nsid` changed (e.g. its capacity): record it in the Changed Namespace
    /// List log and raise the notice event if the host enabled it.
    pub fn notify_namespace_changed(&mut self, nsid: u32) {
        self.events.namespace_changed(nsid, &self.features);
        self.deliver_async_events();
        self.signal_admin_completions();
    }

    fn controller_configuration_changed(&mut self, old: u32, new: u32) {
        let was_enabled = old & registers::CC_EN != 0;
        let enabled = new & registers::CC_EN != 0;
        if was_enabled && !enabled {
            self.reset();
            self.guest_reset(GuestReset::Controller);
        } else if !was_enabled && enabled {
            self.enable();
        }
        let old_shutdown = registers::cc_shutdown_notification(old);
        let shutdown = registers::cc_shutdown_notification(new);
        if shutdown != 0 && old_shutdown == 0 {
            // Writes already completed are in the backends (the host page cache for raw
            // files); a host that wants them durable flushes first, as Linux does.
            self.registers.csts =
                (self.registers.csts & !registers::CSTS_SHST_MASK) | registers::CSTS_SHST_COMPLETE;
        } else if shutdown == 0 && old_shutdown != 0 {
            self.registers.csts &= !registers::CSTS_SHST_MASK;
        }
    }

    /// CC.EN 0 -> 1. An invalid admin queue setup sets CSTS.CFS instead of RDY, as QEMU does:
    /// the guest sees the failure at once rather than timing out waiting for RDY.
    fn enable(&mut self) {
        if self.held_down {
            return;
        }
        match self.validate_enable() {
            Ok((asq, acq)) => {
                self.admin_submission_queue = Some(asq);
                self.admin_completion_queue = Some(acq);
                self.registers.csts |= registers::CSTS_RDY;
            }
            Err(()) => self.fatal_error(),
        }
    }
    fn validate_enable(&self) -> Result<(SubmissionQueue, CompletionQueue), ()> {
        let regs = &self.registers;
        let cc = regs.cc;
        let command_set_nvm = registers::cc_field(cc, registers::CC_CSS_SHIFT, 0x7) == 0;
        let page_size_4k = registers::cc_field(cc, registers::CC_MPS_SHIFT, 0xF) == 0;
        let round_robin = registers::cc_field(cc, registers::CC_AMS_SHIFT, 0x7) == 0;
        // Linux sets IOSQES/IOCQES together with EN; QEMU checks them here too.
        let entry_sizes = registers::cc_field(cc, registers::CC_IOSQES_SHIFT, 0xF)
            == SUBMISSION_ENTRY_SHIFT
            && registers::cc_field(cc, registers::CC_IOCQES_SHIFT, 0xF) == COMPLETION_ENTRY_SHIFT;
        if !(command_set_nvm && page_size_4k && round_robin && entry_sizes) {
            return Err(());
        }
        // 0's based sizes: a value of 0 would be a 1-entry queue, which cannot hold anything.
        let sq_entries = (regs.aqa & 0xFFF) + 1;
        let cq_entries = ((regs.aqa >> 16) & 0xFFF) + 1;
        if sq_entries < 2 || cq_entries < 2 {
            return Err(());
        }
        let sq_base = regs.asq;
        let cq_base = regs.acq;
        if sq_base == 0
            || cq_base == 0
            || !sq_base.is_multiple_of(PAGE_SIZE)
            || !cq_base.is_multiple_of(PAGE_SIZE)
        {
            return Err(());
        }
        let sq_bytes = u64::from(sq_entries) * SUBMISSION_ENTRY_BYTES;
        let cq_bytes = u64::from(cq_entries) * COMPLETION_ENTRY_BYTES;
        if !self.in_guest_memory(sq_base, sq_bytes) || !self.in_guest_memory(cq_base, cq_bytes) {
            return Err(());
        }
        let sq = SubmissionQueue::new(
            ADMIN_QUEUE_ID,
            GuestAddress(sq_base),
            sq_entries,
            ADMIN_QUEUE_ID,
        );
        let cq = CompletionQueue::new(ADMIN_QUEUE_ID, GuestAddress(cq_base), cq_entries, 0, true);
        Ok((sq, cq))
    }

    fn in_guest_memory(&self, base: u64, len: u64) -> bool {
        usize::try_from(len)
            .is_ok_and(|len| GuestMemoryBackend::check_range(&self.memory, GuestAddress(base), len))
    }

    /// CC.EN 1 -> 0: a Controller Level Reset. I/O queues are removed from the pool (which
    /// waits until nothing of theirs is in flight) and their commands dropped without
    /// completions, as are outstanding Asynchronous Event Requests; features return to their
    /// defaults; the admin queue registers keep their values so the host can enable again.
    fn reset(&mut self) {
        self.remove_io_queues();
        self.admin_submission_queue = None;
        self.admin_completion_queue = None;
        self.features = Features::defaults(&self.config);
        self.io
            .write_through
            .store(!self.features.volatile_write_cache, Ordering::Relaxed);
        self.events = AsyncEvents::default();
        self.admin_completions_to_signal = false;
        self.doorbell_buffers = None;
        // A fatal error of the previous life is cleared by the reset.
        self.io.fatal.store(false, Ordering::SeqCst);
        self.io.halted.store(false, Ordering::SeqCst);
        self.registers.csts = 0;
        self.counters.resets += 1;
    }

    /// Stops serving every I/O SQ (blocking until each is quiesced) and drops all I/O queues.
    fn remove_io_queues(&mut self) {
        let slots: Vec<IoSubmissionQueueSlot> = self
            .io_submission_queues
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        let mut registrations: Vec<QueueRegistration> = Vec::with_capacity(slots.len());
        let mut retired = Vec::with_capacity(slots.len());
        for slot in slots {
            retired.push((
                slot.shared.clone(),
                slot.cq.clone(),
                slot.registration.worker(),
            ));
            registrations.push(slot.registration);
        }
        if !registrations.is_empty() {
            self.pool.remove_queues(registrations);
        }
        // Read after the removal: the counters are final once the queue is quiesced.
        for (shared, cq, worker) in retired {
            self.retire_io_queue(shared.stats(&cq, worker));
        }
        self.io_completion_queues
            .iter_mut()
            .for_each(|cq| *cq = None);
    }

    fn doorbell(&mut self, doorbell: Doorbell, value: u32) {
        let exists = match doorbell {
            Doorbell::SubmissionTail(ADMIN_QUEUE_ID) => self.admin_submission_queue.is_some(),
            Doorbell::CompletionHead(ADMIN_QUEUE_ID) => self.admin_completion_queue.is_some(),
            Doorbell::SubmissionTail(qid) => self.io_submission_queue(qid).is_some(),
            Doorbell::CompletionHead(qid) => self.io_completion_queue(qid).is_some(),
        };
        if !self.is_ready() || !exists {
            self.counters.invalid_doorbell_registers += 1;
            if self.is_ready() {
                self.events.error(admin::ERROR_INVALID_DOORBELL_REGISTER);
                self.deliver_async_events();
            }
            return;
        }
        // Bits 31:16 are reserved; a value there cannot be a valid index.
        let accepted = u16::try_from(value).ok().and_then(|value| match doorbell {
            Doorbell::SubmissionTail(ADMIN_QUEUE_ID) => self
                .admin_submission_queue
                .as_mut()
                .and_then(|sq| sq.set_tail(value).ok()),
            Doorbell::CompletionHead(ADMIN_QUEUE_ID) => self
                .admin_completion_queue
                .as_mut()
                .and_then(|cq| cq.set_head(value).ok()),
            // Stores the tail and wakes the SQ's worker: no I/O on this thread.
            Doorbell::SubmissionTail(qid) => self
                .io_submission_queue(qid)
                .and_then(|slot| slot.shared.ring(u32::from(value)).ok()),
            // Wakes SQs that stopped for lack of CQ entries.
            Doorbell::CompletionHead(qid) => self
                .io_completion_queue(qid)
                .and_then(|cq| cq.head_doorbell(value, &self.io).ok()),
        });
        if accepted.is_none() {
            self.counters.invalid_doorbell_values += 1;
            self.events.error(admin::ERROR_INVALID_DOORBELL_VALUE);
            self.deliver_async_events();
            return;
        }
        match doorbell {
            Doorbell::SubmissionTail(ADMIN_QUEUE_ID) => self.process_admin_queue(),
            Doorbell::CompletionHead(ADMIN_QUEUE_ID) => self.flush_held_admin_completions(),
            _ => {}
        }
    }

    fn io_submission_queue(&self, qid: u16) -> Option<&IoSubmissionQueueSlot> {
        self.io_submission_queues.get(usize::from(qid))?.as_ref()
    }

    fn io_completion_queue(&self, qid: u16) -> Option<&Arc<IoCompletionQueue>> {
        self.io_completion_queues.get(usize::from(qid))?.as_ref()
    }

    fn any_io_queue(&self) -> bool {
        self.io_submission_queues.iter().any(Option::is_some)
            || self.io_completion_queues.iter().any(Option::is_some)
    }

    fn process_admin_queue(&mut self) {
        loop {
            if self.registers.csts & registers::CSTS_CFS != 0 {
                return;
            }
            let Some(sq) = self.admin_submission_queue.as_mut() else {
                return;
            };
            let command = match sq.pop(&self.memory) {
                Ok(Some(command)) => command,
                Ok(None) => return,
                Err(_) => return self.fatal_error(),
            };
            self.counters.admin_commands += 1;
            if let Some((status, result)) = self.execute_admin(&command) {
                self.post_admin_completion(command.command_id(), status, result);
            }
            // A command may have made an event deliverable (a log page read unmasks its
            // type); its own completion goes first.
            self.deliver_async_events();
        }
    }

    /// Writes an admin completion (or holds it while the admin CQ is full).
    fn post_admin_completion(&mut self, command_id: u16, status: Status, result: u32) {
        let Some(sq) = self.admin_submission_queue.as_ref() else {
            return;
        };
        let completion = Completion {
            result,
            sq_head: sq.head(),
            sq_id: ADMIN_QUEUE_ID,
            command_id,
            status,
        };
        let Some(cq) = self.admin_completion_queue.as_mut() else {
            return;
        };
        match cq.post(&self.memory, completion) {
            Ok(true) => self.admin_completions_to_signal = true,
            Ok(false) => self.counters.completions_held += 1,
            Err(_) => self.fatal_error(),
        }
    }

    fn flush_held_admin_completions(&mut self) {
        let Some(cq) = self.admin_completion_queue.as_mut() else {
            return;
        };
        match cq.flush_held(&self.memory) {
            Ok(0) => {}
            Ok(_) => self.admin_completions_to_signal = true,
            Err(_) => self.fatal_error(),
        }
    }

    fn signal_admin_completions(&mut self) {
        if !std::mem::take(&mut self.admin_completions_to_signal) {
            return;
        }
        if let Some(vector) = self
            .admin_completion_queue
            .as_ref()
            .and_then(CompletionQueue::interrupt_vector)
        {
            self.io
                .interrupt
                .notify_completion_queue(ADMIN_QUEUE_ID, vector);
        }
    }
}

impl Drop for NvmeController {
    /// Quiesces every I/O queue: nothing of this controller touches guest memory afterwards.
    fn drop(&mut self) {
        self.remove_io_queues();
    }
}
