//! The admin command set (NVMe 1.4, 5): executed synchronously against the controller state
//! when the admin SQ doorbell rings. Asynchronous Event Requests are the exception: they
//! stay outstanding until an event arrives.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ana::{
    AEC_ANA_CHANGE, ANA_CAPABILITIES, LOG_ANA, LSP_RETURN_GROUPS_ONLY, NOTICE_ANA_CHANGE,
};
use super::io_queue::{IoCompletionQueue, IoSubmissionQueueHandler, IoSubmissionQueueShared};
use super::prp;
use super::queue::{CompletionQueue, SubmissionEntry};
use super::registers::{Doorbell, VERSION_1_4};
use super::shadow::DoorbellBuffers;
use super::{
    ControllerConfig, IoSubmissionQueueSlot, NvmeController, Status, ADMIN_QUEUE_ID,
    COMPLETION_ENTRY_BYTES, COMPLETION_ENTRY_SHIFT, PAGE_SIZE, SUBMISSION_ENTRY_BYTES,
    SUBMISSION_ENTRY_SHIFT,
};

pub const OPC_DELETE_IO_SQ: u8 = 0x00;
pub const OPC_CREATE_IO_SQ: u8 = 0x01;
pub const OPC_GET_LOG_PAGE: u8 = 0x02;
pub const OPC_DELETE_IO_CQ: u8 = 0x04;
pub const OPC_CREATE_IO_CQ: u8 = 0x05;
pub const OPC_IDENTIFY: u8 = 0x06;
pub const OPC_ABORT: u8 = 0x08;
pub const OPC_SET_FEATURES: u8 = 0x09;
pub const OPC_GET_FEATURES: u8 = 0x0A;
pub const OPC_ASYNC_EVENT_REQUEST: u8 = 0x0C;
pub const OPC_DOORBELL_BUFFER_CONFIG: u8 = 0x7C;

/// OACS bit 8: Doorbell Buffer Config supported.
pub const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;

pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NAMESPACES: u8 = 0x02;
pub const CNS_NAMESPACE_DESCRIPTORS: u8 = 0x03;

pub const FID_ARBITRATION: u8 = 0x01;
pub const FID_POWER_MANAGEMENT: u8 = 0x02;
pub const FID_TEMPERATURE_THRESHOLD: u8 = 0x04;
/// Error Recovery: the time-limited error recovery (TLER) the host asks for; mandatory.
pub const FID_ERROR_RECOVERY: u8 = 0x05;
pub const FID_VOLATILE_WRITE_CACHE: u8 = 0x06;
pub const FID_NUMBER_OF_QUEUES: u8 = 0x07;
pub const FID_INTERRUPT_COALESCING: u8 = 0x08;
/// Interrupt Vector Configuration: coalescing disable per vector; mandatory on PCIe.
pub const FID_INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
/// Write Atomicity Normal: whether the host needs AWUN/NAWUN (bit 0 set: it does not);
/// mandatory.
pub const FID_WRITE_ATOMICITY_NORMAL: u8 = 0x0A;
pub const FID_ASYNC_EVENT_CONFIG: u8 = 0x0B;

pub const LOG_ERROR: u8 = 0x01;
pub const LOG_SMART: u8 = 0x02;
pub const LOG_FIRMWARE_SLOT: u8 = 0x03;
pub const LOG_CHANGED_NAMESPACES: u8 = 0x04;

pub const IDENTIFY_BYTES: usize = 4096;
/// Identify Namespace Identification Descriptor types.
pub const NIDT_NGUID: u8 = 2;
pub const NIDT_UUID: u8 = 3;

/// Asynchronous event types and the Error type's information values (NVMe 1.4, 5.2).
pub const EVENT_TYPE_ERROR: u8 = 0;
pub const EVENT_TYPE_NOTICE: u8 = 2;
pub const ERROR_INVALID_DOORBELL_REGISTER: u8 = 0x00;
pub const ERROR_INVALID_DOORBELL_VALUE: u8 = 0x01;
pub const NOTICE_NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
/// Async Event Configuration bit enabling Namespace Attribute Notices.
pub const AEC_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;

/// Outstanding Asynchronous Event Requests allowed (Identify AERL + 1).
pub const ASYNC_EVENT_REQUEST_LIMIT: usize = 4;
/// Concurrent Abort commands advertised (Identify ACL + 1); aborts complete at once anyway.
const ABORT_COMMAND_LIMIT: u8 = 4;
/// Error Information log entries (Identify ELPE + 1).
const ERROR_LOG_ENTRIES: usize = 1;
const ERROR_LOG_ENTRY_BYTES: usize = 64;
const SMART_LOG_BYTES: usize = 512;
const FIRMWARE_SLOT_LOG_BYTES: usize = 512;
/// The Changed Namespace List holds 1024 NSIDs; more than that reads as 0xFFFFFFFF.
const CHANGED_NAMESPACE_LIST_ENTRIES: usize = 1024;
/// 40 C and the warning/critical thresholds of 70 C / 100 C, in kelvin.
const COMPOSITE_TEMPERATURE_KELVIN: u16 = 313;
const WARNING_TEMPERATURE_KELVIN: u16 = 343;
const CRITICAL_TEMPERATURE_KELVIN: u16 = 373;
/// Power state 0's maximum power, in centiwatts.
const POWER_STATE_0_CENTIWATTS: u16 = 2500;
/// Get Features "supported capabilities": changeable, not saveable, not per namespace.
const FEATURE_CHANGEABLE: u32 = 1 << 2;
/// ... and namespace specific (Error Recovery).
const FEATURE_NAMESPACE_SPECIFIC: u32 = 1 << 1;
/// Error Recovery's Deallocated or Unwritten Logical Block Error Enable: not supported.
const ERROR_RECOVERY_DULBE: u32 = 1 << 16;

/// Current feature values; a controller reset returns them to [`Features::defaults`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    pub arbitration: u32,
    pub power_management: u32,
    pub temperature_over_threshold: u16,
    pub temperature_under_threshold: u16,
    pub volatile_write_cache: bool,
    /// I/O submission / completion queues granted by Number of Queues (not 0's based).
    pub io_submission_queues: u16,
    pub io_completion_queues: u16,
    pub interrupt_coalescing: u32,
    pub async_event_config: u32,
    /// Error Recovery's TLER (bits 15:0), one value for every namespace.
    pub error_recovery: u32,
    /// Interrupt Vector Configuration's Coalescing Disable, per MSI-X vector.
    pub coalescing_disabled: Vec<bool>,
    pub write_atomicity_normal: u32,
}

impl Features {
    pub fn defaults(config: &ControllerConfig) -> Self {
        Features {
            arbitration: 0,
            power_management: 0,
            temperature_over_threshold: WARNING_TEMPERATURE_KELVIN,
            temperature_under_threshold: 0,
            volatile_write_cache: config.volatile_write_cache,
            io_submission_queues: config.max_io_queue_pairs,
            io_completion_queues: config.max_io_queue_pairs,
            interrupt_coalescing: 0,
            async_event_config: 0,
            error_recovery: 0,
            coalescing_disabled: vec![false; usize::from(config.interrupt_vectors)],
            write_atomicity_normal: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AsyncEvent {
    event_type: u8,
    info: u8,
    log_page: u8,
}

impl AsyncEvent {
    /// Completion DW0 of an Asynchronous Event Request.
    fn result(self) -> u32 {
        u32::from(self.event_type) | u32::from(self.info) << 8 | u32::from(self.log_page) << 16
    }
}

/// Asynchronous events waiting for a request, and requests waiting for an event.
#[derive(Debug, Default)]
pub struct AsyncEvents {
    requests: VecDeque<u16>,
    pending: VecDeque<AsyncEvent>,
    /// Log pages whose event was reported: further events for them wait until the host
    /// reads the page without Retain Asynchronous Event.
    masked_log_pages: BTreeSet<u8>,
    changed_namespaces: BTreeSet<u32>,
}

impl AsyncEvents {
    fn push(&mut self, event: AsyncEvent) {
        if !self.pending.contains(&event) {
            self.pending.push_back(event);
        }
    }

    pub fn error(&mut self, info: u8) {
        self.push(AsyncEvent {
            event_type: EVENT_TYPE_ERROR,
            info,
            log_page: LOG_ERROR,
        });
    }

    pub fn namespace_changed(&mut self, nsid: u32, features: &Features) {
        self.changed_namespaces.insert(nsid);
        if features.async_event_config & AEC_NAMESPACE_ATTRIBUTE != 0 {
            self.push(AsyncEvent {
                event_type: EVENT_TYPE_NOTICE,
                info: NOTICE_NAMESPACE_ATTRIBUTE_CHANGED,
                log_page: LOG_CHANGED_NAMESPACES,
            });
        }
    }

    pub fn ana_changed(&mut self, features: &Features) {
        if features.async_event_config & AEC_ANA_CHANGE != 0 {
            self.push(AsyncEvent {
                event_type: EVENT_TYPE_NOTICE,
                info: NOTICE_ANA_CHANGE,
                log_page: LOG_ANA,
            });
        }
    }

    pub fn outstanding_requests(&self) -> usize {
        self.requests.len()
    }

    /// The next request and deliverable event, paired.
    fn next_delivery(&mut self) -> Option<(u16, AsyncEvent)> {
        if self.requests.is_empty() {
            return None;
        }
        let index = self
            .pending
            .iter()
            .position(|event| !self.masked_log_pages.contains(&event.log_page))?;
        let event = self.pending.remove(index)?;
        self.masked_log_pages.insert(event.log_page);
        Some((self.requests.pop_front()?, event))
    }
}

/// Little-endian writers into a zeroed data structure.
struct DataBuffer(Vec<u8>);

impl DataBuffer {
    fn new(len: usize) -> Self {
        DataBuffer(vec![0; len])
    }

    fn bytes(&mut self, offset: usize, value: &[u8]) {
        self.0[offset..offset + value.len()].copy_from_slice(value);
    }

    fn u8(&mut self, offset: usize, value: u8) {
        self.0[offset] = value;
    }

    fn u16(&mut self, offset: usize, value: u16) {
        self.bytes(offset, &value.to_le_bytes());
    }

    fn u32(&mut self, offset: usize, value: u32) {
        self.bytes(offset, &value.to_le_bytes());
    }

    fn u64(&mut self, offset: usize, value: u64) {
        self.bytes(offset, &value.to_le_bytes());
    }

    /// ASCII fields are space padded, not NUL terminated.
    fn ascii(&mut self, offset: usize, len: usize, value: &str) {
        let field = &mut self.0[offset..offset + len];
        field.fill(b' ');
        let value = value.as_bytes();
        let n = value.len().min(len);
        field[..n].copy_from_slice(&value[..n]);
    }
}

type AdminResult = Result<u32, Status>;

impl NvmeController {
    /// Executes one admin command: `Some((status, DW0))` to complete now, `None` when the
    /// command stays outstanding (Asynchronous Event Request).
    pub(super) fn execute_admin(&mut self, command: &SubmissionEntry) -> Option<(Status, u32)> {
        // No fused operations and no SGLs for admin commands (Identify SGLS = 0).
        let result = if command.fuse() != 0 || command.data_transfer_kind() != 0 {
            Err(Status::INVALID_FIELD)
        } else {
            match command.opcode() {
                OPC_DELETE_IO_SQ => self.delete_io_submission_queue(command),
                OPC_CREATE_IO_SQ => self.create_io_submission_queue(command),
                OPC_GET_LOG_PAGE => self.get_log_page(command),
                OPC_DELETE_IO_CQ => self.delete_io_completion_queue(command),
                OPC_CREATE_IO_CQ => self.create_io_completion_queue(command),
                OPC_IDENTIFY => self.identify(command),
                // Commands complete synchronously, so there is never one left to abort:
                // DW0 bit 0 set reports "not aborted".
                OPC_ABORT => Ok(1),
                OPC_SET_FEATURES => self.set_features(command),
                OPC_GET_FEATURES => self.get_features(command),
                OPC_ASYNC_EVENT_REQUEST => return self.async_event_request(command),
                OPC_DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(command),
                _ => Err(Status::INVALID_OPCODE),
            }
        };
        Some(match result {
            Ok(value) => (Status::SUCCESS, value),
            Err(status) => (status, 0),
        })
    }

    fn namespace_count(&self) -> u32 {
        self.config.namespaces.len() as u32
    }

    fn is_active_namespace(&self, nsid: u32) -> bool {
        (1..=self.namespace_count()).contains(&nsid)
    }

    fn transfer_to_host(&self, command: &SubmissionEntry, data: &[u8]) -> Result<(), Status> {
        let segments = prp::map_prps(
            &self.memory,
            command.prp1(),
            command.prp2(),
            data.len() as u64,
            self.config.max_transfer_bytes(),
        )?;
        prp::write_to_segments(&self.memory, &segments, data)
    }

    fn identify(&mut self, command: &SubmissionEntry) -> AdminResult {
        let nsid = command.namespace_id();
        let data = match command.cdw(10) as u8 {
            CNS_NAMESPACE => {
                if !self.is_active_namespace(nsid) {
                    return Err(Status::INVALID_NAMESPACE);
                }
                self.identify_namespace(nsid)
            }
            CNS_CONTROLLER => self.identify_controller(),
            CNS_ACTIVE_NAMESPACES => {
                // The list holds NSIDs above `nsid`; the two highest values cannot start one.
                if nsid >= 0xFFFF_FFFE {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let mut data = DataBuffer::new(IDENTIFY_BYTES);
                let active =
                    (nsid.saturating_add(1)..=self.namespace_count()).take(IDENTIFY_BYTES / 4);
                for (slot, id) in active.enumerate() {
                    data.u32(slot * 4, id);
                }
                data
            }
            CNS_NAMESPACE_DESCRIPTORS => {
                if !self.is_active_namespace(nsid) {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let namespace = &self.config.namespaces[nsid as usize - 1];
                let mut data = DataBuffer::new(IDENTIFY_BYTES);
                for (index, (kind, id)) in
                    [(NIDT_NGUID, namespace.nguid), (NIDT_UUID, namespace.uuid)]
                        .into_iter()
                        .enumerate()
                {
                    let at = index * 20;
                    data.u8(at, kind);
                    data.u8(at + 1, 16);
                    data.bytes(at + 4, &id);
                }
                data
            }
            _ => return Err(Status::INVALID_FIELD),
        };
        self.transfer_to_host(command, &data.0)?;
        Ok(0)
    }

    fn identify_controller(&self) -> DataBuffer {
        let config = &self.config;
        let mut data = DataBuffer::new(IDENTIFY_BYTES);
        data.u16(0, config.vendor_id);
        data.u16(2, config.subsystem_vendor_id);
        data.ascii(4, 20, &config.serial);
        data.ascii(24, 40, &config.model);
        data.ascii(64, 8, &config.firmware_revision);
        data.u8(77, config.effective_mdts());
        data.u16(78, config.controller_id);
        data.u32(80, VERSION_1_4);
        // CMIC: several controllers (bit 1), ANA reporting (bit 3).
        data.u8(
            76,
            u8::from(config.multi_controller) << 1 | u8::from(config.ana_reporting) << 3,
        );
        // OAES: Namespace Attribute Notices, ANA Change Notices when reporting ANA.
        let ana_notices = if config.ana_reporting {
            AEC_ANA_CHANGE
        } else {
            0
        };
        data.u32(92, AEC_NAMESPACE_ATTRIBUTE | ana_notices);
        // CNTRLTYPE: I/O controller.
        data.u8(111, 1);
        data.u16(256, OACS_DOORBELL_BUFFER_CONFIG);
        data.u8(258, ABORT_COMMAND_LIMIT - 1);
        data.u8(259, ASYNC_EVENT_REQUEST_LIMIT as u8 - 1);
        // FRMW: one firmware slot, slot 1 read-only.
        data.u8(260, 0b0011);
        // LPA: extended data for Get Log Page (NUMDU, LPOL/LPOU).
        data.u8(261, 1 << 2);
        data.u8(262, ERROR_LOG_ENTRIES as u8 - 1);
        // NPSS = 0: one power state.
        data.u16(266, WARNING_TEMPERATURE_KELVIN);
        data.u16(268, CRITICAL_TEMPERATURE_KELVIN);
        // SQES/CQES: required (low nibble) and maximum (high nibble) entry sizes.
        data.u8(
            512,
            (SUBMISSION_ENTRY_SHIFT as u8) << 4 | SUBMISSION_ENTRY_SHIFT as u8,
        );
        data.u8(
            513,
            (COMPLETION_ENTRY_SHIFT as u8) << 4 | COMPLETION_ENTRY_SHIFT as u8,
        );
        data.u32(516, self.namespace_count());
        // ONCS: Dataset Management (bit 2), Write Zeroes (bit 3), Save/Select in features (bit 4).
        data.u16(520, 1 << 2 | 1 << 3 | 1 << 4);
        // VWC: present (bit 0); Flush with NSID FFFFFFFFh not supported (bits 2:1 = 10b).
        if config.volatile_write_cache {
            data.u8(525, 0b101);
        }
        if let Some(ana) = self.io.ana.as_ref() {
            data.u8(342, config.ana_transition_time_secs);
            data.u8(343, ANA_CAPABILITIES);
            data.u32(344, ana.groups()); // ANAGRPMAX
            data.u32(348, ana.groups()); // NANAGRPID
            data.u32(540, self.namespace_count()); // MNAN: sizes Linux's ANA log buffer
        }
        let nqn = config.subsystem_nqn();
        data.ascii(768, 256, &nqn);
        data.0[768 + nqn.len().min(255)..1024].fill(0); // SUBNQN is NUL terminated, not padded.
        data.u16(2048, POWER_STATE_0_CENTIWATTS);
        data
    }

    fn identify_namespace(&self, nsid: u32) -> DataBuffer {
        let namespace = &self.config.namespaces[nsid as usize - 1];
        let mut data = DataBuffer::new(IDENTIFY_BYTES);
        data.u64(0, namespace.size_blocks); // NSZE
        data.u64(8, namespace.size_blocks); // NCAP
        data.u64(16, namespace.size_blocks); // NUSE
                                             // NLBAF = 0 (one format), FLBAS = 0 (format 0, no metadata).
                                             // DLFEAT: deallocated blocks read as zeroes.
        data.u8(33, 0b001);
        // NSATTR: write protected when the backend is read-only (Linux then sets the disk
        // read-only).
        data.u8(99, u8::from(namespace.backend.read_only()));
        // NMIC: shared by the subsystem's controllers; ANAGRPID: the namespace's group.
        data.u8(30, u8::from(self.config.multi_controller));
        if let Some(group) = self.io.ana.as_ref().and_then(|ana| ana.group_of(nsid)) {
            data.u32(92, group);
        }
        data.bytes(104, &namespace.nguid);
        // LBA format 0: LBADS in bits 23:16, no metadata, best relative performance.
        data.u32(128, u32::from(namespace.block_size_shift) << 16);
        data
    }

    /// Validates the queue id of a Create command: 1..=granted count, not in use.
    fn check_new_queue_id(&self, qid: u16, granted: u16, in_use: bool) -> Result<(), Status> {
        if qid == ADMIN_QUEUE_ID || qid > granted || in_use {
            return Err(Status::INVALID_QUEUE_IDENTIFIER);
        }
        Ok(())
    }

    /// Queue size (0's based in CDW10 bits 31:16) as entries, within 2..=CAP.MQES + 1.
    fn check_queue_size(&self, command: &SubmissionEntry) -> Result<u32, Status> {
        let entries = (command.cdw(10) >> 16) + 1;
        if entries < 2 || entries > self.config.max_queue_entries {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        Ok(entries)
    }

    /// Physically contiguous queue memory (CAP.CQR = 1): PC must be set and PRP1 must be a
    /// page-aligned base of a range inside guest memory.
    fn check_queue_memory(
        &self,
        command: &SubmissionEntry,
        bytes: u64,
    ) -> Result<GuestAddress, Status> {
        let base = command.prp1();
        if !base.is_multiple_of(PAGE_SIZE) {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        if command.cdw(11) & 1 == 0 {
            return Err(Status::INVALID_FIELD);
        }
        if !self.in_guest_memory(base, bytes) {
            return Err(Status::INVALID_FIELD);
        }
        Ok(GuestAddress(base))
    }

    fn create_io_completion_queue(&mut self, command: &SubmissionEntry) -> AdminResult {
        let qid = command.cdw(10) as u16;
        let in_use = self.io_completion_queue(qid).is_some();
        self.check_new_queue_id(qid, self.features.io_completion_queues, in_use)?;
        let entries = self.check_queue_size(command)?;
        let interrupts_enabled = command.cdw(11) & 0b10 != 0;
        let vector = (command.cdw(11) >> 16) as u16;
        if interrupts_enabled && vector >= self.config.interrupt_vectors {
            return Err(Status::INVALID_INTERRUPT_VECTOR);
        }
        let base = self.check_queue_memory(command, u64::from(entries) * COMPLETION_ENTRY_BYTES)?;
        let ring = CompletionQueue::new(qid, base, entries, vector, interrupts_enabled);
        let cq = Arc::new(IoCompletionQueue::new(ring));
        if let Some(buffers) = self.doorbell_buffers {
            cq.attach_shadow(buffers.slot(Doorbell::CompletionHead(qid)), &self.io);
        }
        self.io_completion_queues[usize::from(qid)] = Some(cq);
        Ok(0)
    }

    /// Creates the SQ and starts serving it on the I/O pool.
    fn create_io_submission_queue(&mut self, command: &SubmissionEntry) -> AdminResult {
        let qid = command.cdw(10) as u16;
        let cq_id = (command.cdw(11) >> 16) as u16;
        let cq = match self.io_completion_queue(cq_id) {
            Some(cq) => cq.clone(),
            None => return Err(Status::COMPLETION_QUEUE_INVALID),
        };
        let in_use = self.io_submission_queue(qid).is_some();
        self.check_new_queue_id(qid, self.features.io_submission_queues, in_use)?;
        let entries = self.check_queue_size(command)?;
        let base = self.check_queue_memory(command, u64::from(entries) * SUBMISSION_ENTRY_BYTES)?;
        // QPRIO (bits 2:1) only matters under weighted round robin, which CAP.AMS does not offer.
        let notifier = EventFd::new(EFD_NONBLOCK).map_err(|_| {
            self.counters.io_queue_registration_failures += 1;
            Status::INTERNAL_ERROR
        })?;
        let shared = Arc::new(IoSubmissionQueueShared::new(
            qid,
            entries,
            Arc::new(notifier),
            self.io_queue_latency[usize::from(qid)].clone(),
        ));
        let handler =
            IoSubmissionQueueHandler::new(shared.clone(), base, cq.clone(), self.io.clone());
        let registration = self.pool.add_queue(Box::new(handler)).map_err(|_| {
            self.counters.io_queue_registration_failures += 1;
            Status::INTERNAL_ERROR
        })?;
        cq.bind_submission_queue();
        if let Some(buffers) = self.doorbell_buffers {
            shared.attach_shadow(buffers.slot(Doorbell::SubmissionTail(qid)));
        }
        self.io_submission_queues[usize::from(qid)] = Some(IoSubmissionQueueSlot {
            shared,
            cq,
            registration,
        });
        Ok(0)
    }

    /// Stops serving the SQ (waiting until it is quiesced). Commands still in flight end
    /// without completions: the host sees them implicitly completed by the deletion.
    fn delete_io_submission_queue(&mut self, command: &SubmissionEntry) -> AdminResult {
        let qid = command.cdw(10) as u16;
        if qid == ADMIN_QUEUE_ID {
            return Err(Status::INVALID_QUEUE_IDENTIFIER);
        }
        let slot = self
            .io_submission_queues
            .get_mut(usize::from(qid))
            .and_then(Option::take)
            .ok_or(Status::INVALID_QUEUE_IDENTIFIER)?;
        let worker = slot.registration.worker();
        self.pool.remove_queues(vec![slot.registration]);
        self.retire_io_queue(slot.shared.stats(&slot.cq, worker));
        slot.cq.unbind_submission_queue();
        Ok(0)
    }

    /// Doorbell Buffer Config: PRP1 is the shadow doorbell buffer, PRP2 the EventIdx buffer,
    /// both page aligned. I/O queues that exist already switch to them at once (Linux sends
    /// the command after creating its queues); the admin queue keeps MMIO doorbells.
    fn doorbell_buffer_config(&mut self, command: &SubmissionEntry) -> AdminResult {
        let buffers = DoorbellBuffers {
            shadow: GuestAddress(command.prp1()),
            event_index: GuestAddress(command.prp2()),
        };
        let bytes = DoorbellBuffers::bytes_used(self.config.max_queue_id());
        for base in [buffers.shadow.0, buffers.event_index.0] {
            if !base.is_multiple_of(PAGE_SIZE) || !self.in_guest_memory(base, bytes) {
                return Err(Status::INVALID_FIELD);
            }
        }
        self.doorbell_buffers = Some(buffers);
        for cq in self.io_completion_queues.iter().flatten() {
            cq.attach_shadow(buffers.slot(Doorbell::CompletionHead(cq.id())), &self.io);
        }
        for slot in self.io_submission_queues.iter().flatten() {
            let qid = slot.shared.id;
            slot.shared
                .attach_shadow(buffers.slot(Doorbell::SubmissionTail(qid)));
        }
        Ok(0)
    }

    fn delete_io_completion_queue(&mut self, command: &SubmissionEntry) -> AdminResult {
        let qid = command.cdw(10) as u16;
        let cq = self
            .io_completion_queue(qid)
            .ok_or(Status::INVALID_QUEUE_IDENTIFIER)?;
        if cq.bound_submission_queues() > 0 {
            return Err(Status::INVALID_QUEUE_DELETION);
        }
        self.io_completion_queues[usize::from(qid)] = None;
        Ok(0)
    }

    fn set_features(&mut self, command: &SubmissionEntry) -> AdminResult {
        let save = command.cdw(10) >> 31 != 0;
        let fid = command.cdw(10) as u8;
        let value = command.cdw(11);
        if save {
            return Err(Status::FEATURE_NOT_SAVEABLE);
        }
        let features = &mut self.features;
        match fid {
            FID_ARBITRATION => features.arbitration = value,
            FID_POWER_MANAGEMENT => {
                // Only power state 0 exists (NPSS = 0).
                if value & 0x1F != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                features.power_management = value & 0xFF;
            }
            FID_TEMPERATURE_THRESHOLD => {
                let threshold = value as u16;
                match temperature_threshold_select(value)? {
                    ThresholdKind::Over => features.temperature_over_threshold = threshold,
                    ThresholdKind::Under => features.temperature_under_threshold = threshold,
                }
            }
            FID_VOLATILE_WRITE_CACHE => {
                if !self.config.volatile_write_cache {
                    return Err(Status::INVALID_FIELD);
                }
                features.volatile_write_cache = value & 1 != 0;
                // Cache off: writes reach stable storage before they complete.
                self.io
                    .write_through
                    .store(value & 1 == 0, Ordering::Relaxed);
            }
            FID_NUMBER_OF_QUEUES => return self.set_number_of_queues(value),
            FID_INTERRUPT_COALESCING => features.interrupt_coalescing = value & 0xFFFF,
            FID_ASYNC_EVENT_CONFIG => features.async_event_config = value,
            FID_ERROR_RECOVERY => {
                let nsid = command.namespace_id();
                if !(nsid == u32::MAX || self.is_active_namespace(nsid)) {
                    return Err(Status::INVALID_NAMESPACE);
                }
                if value & ERROR_RECOVERY_DULBE != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                self.features.error_recovery = value & 0xFFFF;
            }
            FID_INTERRUPT_VECTOR_CONFIG => {
                let vector = (value & 0xFFFF) as usize;
                let disabled = self
                    .features
                    .coalescing_disabled
                    .get_mut(vector)
                    .ok_or(Status::INVALID_FIELD)?;
                *disabled = value & (1 << 16) != 0;
            }
            FID_WRITE_ATOMICITY_NORMAL => self.features.write_atomicity_normal = value & 1,
            _ => return Err(Status::INVALID_FIELD),
        }
        Ok(0)
    }

    /// Number of Queues may only be set before any I/O queue exists; the grant is capped at
    /// the configured queue pairs. DW0 reports what was granted, 0's based.
    fn set_number_of_queues(&mut self, value: u32) -> AdminResult {
        let submission_requested = value & 0xFFFF;
        let completion_requested = value >> 16;
        if submission_requested == 0xFFFF || completion_requested == 0xFFFF {
            return Err(Status::INVALID_FIELD);
        }
        if self.any_io_queue() {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        let max = u32::from(self.config.max_io_queue_pairs);
        self.features.io_submission_queues = (submission_requested + 1).min(max) as u16;
        self.features.io_completion_queues = (completion_requested + 1).min(max) as u16;
        Ok(self.number_of_queues_result(&self.features.clone()))
    }

    fn number_of_queues_result(&self, features: &Features) -> u32 {
        let submission = u32::from(features.io_submission_queues.saturating_sub(1));
        let completion = u32::from(features.io_completion_queues.saturating_sub(1));
        completion << 16 | submission
    }

    fn get_features(&mut self, command: &SubmissionEntry) -> AdminResult {
        const SELECT_CURRENT: u32 = 0;
        const SELECT_DEFAULT: u32 = 1;
        const SELECT_SAVED: u32 = 2;
        const SELECT_CAPABILITIES: u32 = 3;
        let fid = command.cdw(10) as u8;
        let select = (command.cdw(10) >> 8) & 0b111;
        let defaults = Features::defaults(&self.config);
        let features = match select {
            SELECT_CURRENT => self.features.clone(),
            // Nothing is saveable, so the saved value is the default.
            SELECT_DEFAULT | SELECT_SAVED => defaults,
            SELECT_CAPABILITIES => {
                let supported = matches!(
                    fid,
                    FID_ARBITRATION
                        | FID_POWER_MANAGEMENT
                        | FID_TEMPERATURE_THRESHOLD
                        | FID_NUMBER_OF_QUEUES
                        | FID_INTERRUPT_COALESCING
                        | FID_ASYNC_EVENT_CONFIG
                        | FID_INTERRUPT_VECTOR_CONFIG
                        | FID_WRITE_ATOMICITY_NORMAL
                ) || (fid == FID_VOLATILE_WRITE_CACHE
                    && self.config.volatile_write_cache);
                if fid == FID_ERROR_RECOVERY {
                    return Ok(FEATURE_CHANGEABLE | FEATURE_NAMESPACE_SPECIFIC);
                }
                return if supported {
                    Ok(FEATURE_CHANGEABLE)
                } else {
                    Err(Status::INVALID_FIELD)
                };
            }
            _ => return Err(Status::INVALID_FIELD),
        };
        match fid {
            FID_ARBITRATION => Ok(features.arbitration),
            FID_POWER_MANAGEMENT => Ok(features.power_management),
            FID_TEMPERATURE_THRESHOLD => {
                let value = command.cdw(11);
                let threshold = match temperature_threshold_select(value)? {
                    ThresholdKind::Over => features.temperature_over_threshold,
                    ThresholdKind::Under => features.temperature_under_threshold,
                };
                Ok((value & 0x003F_0000) | u32::from(threshold))
            }
            FID_VOLATILE_WRITE_CACHE if self.config.volatile_write_cache => {
                Ok(u32::from(features.volatile_write_cache))
            }
            FID_NUMBER_OF_QUEUES => Ok(self.number_of_queues_result(&features)),
            FID_INTERRUPT_COALESCING => Ok(features.interrupt_coalescing),
            FID_ASYNC_EVENT_CONFIG => Ok(features.async_event_config),
            FID_ERROR_RECOVERY => {
                let nsid = command.namespace_id();
                if !self.is_active_namespace(nsid) {
                    return Err(Status::INVALID_NAMESPACE);
                }
                Ok(features.error_recovery)
            }
            FID_INTERRUPT_VECTOR_CONFIG => {
                let vector = command.cdw(11) & 0xFFFF;
                let disabled = features
                    .coalescing_disabled
                    .get(vector as usize)
                    .ok_or(Status::INVALID_FIELD)?;
                Ok(vector | u32::from(*disabled) << 16)
            }
            FID_WRITE_ATOMICITY_NORMAL => Ok(features.write_atomicity_normal),
            _ => Err(Status::INVALID_FIELD),
        }
    }

    fn get_log_page(&mut self, command: &SubmissionEntry) -> AdminResult {
        let cdw10 = command.cdw(10);
        let log_page = cdw10 as u8;
        let retain_event = cdw10 & (1 << 15) != 0;
        let dwords = (u64::from(command.cdw(11) & 0xFFFF) << 16 | u64::from(cdw10 >> 16)) + 1;
        let len = dwords * 4;
        let offset = u64::from(command.cdw(12)) | u64::from(command.cdw(13)) << 32;
        if !offset.is_multiple_of(4) {
            return Err(Status::INVALID_FIELD);
        }
        if self
            .config
            .max_transfer_bytes()
            .is_some_and(|max| len > max)
        {
            return Err(Status::INVALID_FIELD);
        }
        let content = match log_page {
            LOG_ERROR => vec![0; ERROR_LOG_ENTRIES * ERROR_LOG_ENTRY_BYTES],
            LOG_SMART => {
                let nsid = command.namespace_id();
                if !(nsid == 0 || nsid == u32::MAX || self.is_active_namespace(nsid)) {
                    return Err(Status::INVALID_NAMESPACE);
                }
                self.smart_log()
            }
            LOG_FIRMWARE_SLOT => {
                let mut data = DataBuffer::new(FIRMWARE_SLOT_LOG_BYTES);
                data.u8(0, 1); // AFI: slot 1 active.
                data.ascii(8, 8, &self.config.firmware_revision);
                data.0
            }
            LOG_CHANGED_NAMESPACES => self.changed_namespace_log(),
            LOG_ANA => {
                let lsp = (cdw10 >> 8) as u8 & 0xF;
                match self.io.ana.as_ref() {
                    Some(ana) => ana.log_page(lsp & LSP_RETURN_GROUPS_ONLY != 0),
                    None => return Err(Status::INVALID_LOG_PAGE),
                }
            }
            _ => return Err(Status::INVALID_LOG_PAGE),
        };
        let offset = usize::try_from(offset).map_err(|_| Status::INVALID_FIELD)?;
        if offset > content.len() {
            return Err(Status::INVALID_FIELD);
        }
        // Bytes past the end of the log are left as the host had them.
        let available = &content[offset..];
        let transferred = &available[..available.len().min(len as usize)];
        self.transfer_to_host(command, transferred)?;
        if log_page == LOG_CHANGED_NAMESPACES {
            self.events.changed_namespaces.clear();
        }
        if !retain_event {
            // Delivered after this command completes, by the admin queue loop.
            self.events.masked_log_pages.remove(&log_page);
        }
        Ok(0)
    }

    fn smart_log(&self) -> Vec<u8> {
        let mut data = DataBuffer::new(SMART_LOG_BYTES);
        data.u16(1, COMPOSITE_TEMPERATURE_KELVIN);
        data.u8(3, 100); // Available spare, percent.
        data.u8(4, 10); // Available spare threshold, percent.
        data.u64(112, 1); // Power cycles.
        data.0
    }

    fn changed_namespace_log(&self) -> Vec<u8> {
        let mut data = DataBuffer::new(CHANGED_NAMESPACE_LIST_ENTRIES * 4);
        let changed = &self.events.changed_namespaces;
        if changed.len() > CHANGED_NAMESPACE_LIST_ENTRIES {
            data.u32(0, u32::MAX);
        } else {
            for (slot, nsid) in changed.iter().enumerate() {
                data.u32(slot * 4, *nsid);
            }
        }
        data.0
    }

    fn async_event_request(&mut self, command: &SubmissionEntry) -> Option<(Status, u32)> {
        if self.events.requests.len() >= ASYNC_EVENT_REQUEST_LIMIT {
            return Some((Status::ASYNC_EVENT_LIMIT_EXCEEDED, 0));
        }
        self.events.requests.push_back(command.command_id());
        self.deliver_async_events();
        None
    }

    /// Completes outstanding Asynchronous Event Requests with pending, unmasked events.
    pub(super) fn deliver_async_events(&mut self) {
        while let Some((command_id, event)) = self.events.next_delivery() {
            self.post_admin_completion(command_id, Status::SUCCESS, event.result());
        }
    }

    pub fn outstanding_async_event_requests(&self) -> usize {
        self.events.outstanding_requests()
    }
}

enum ThresholdKind {
    Over,
    Under,
}

/// TMPSEL (bits 19:16) must name the composite temperature (0), the only sensor; THSEL
/// (bits 21:20) picks the over (0) or under (1) threshold.
fn temperature_threshold_select(value: u32) -> Result<ThresholdKind, Status> {
    if (value >> 16) & 0xF != 0 {
        return Err(Status::INVALID_FIELD);
    }
    match (value >> 20) & 0b11 {
        0 => Ok(ThresholdKind::Over),
        1 => Ok(ThresholdKind::Under),
        _ => Err(Status::INVALID_FIELD),
    }
}
