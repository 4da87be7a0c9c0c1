//! A test-side NVMe driver over a `GuestMemoryMmap`, playing the guest: it programs the
//! admin queue registers, enables the controller, builds commands, rings doorbells and reaps
//! completions by phase tag. Plus an [`NvmeInterrupt`] that records every notification.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::admin::*;
use super::queue::SubmissionEntry;
use super::registers::*;
use super::{ControllerConfig, NamespaceConfig, NvmeController, NvmeInterrupt, Status};
use crate::io::{BlockBackend, IoPool};

/// How long a test waits for the I/O workers before failing.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A namespace of `size_blocks` 512-byte blocks on its own null backend.
pub fn null_namespace(size_blocks: u64, seed: u64) -> NamespaceConfig {
    NamespaceConfig::with_seed(Arc::new(BlockBackend::null(size_blocks << 9, None)), seed)
}

pub const MEMORY_BYTES: u64 = 16 << 20;
pub const ADMIN_SQ_BASE: u64 = 0x1_0000;
pub const ADMIN_CQ_BASE: u64 = 0x2_0000;
/// I/O queue memory: SQ y at IO_QUEUES_BASE + y * 2 * IO_QUEUE_STRIDE, its CQ right after.
pub const IO_QUEUES_BASE: u64 = 0x10_0000;
pub const IO_QUEUE_STRIDE: u64 = 0x1_0000;
/// Data buffer for Identify and log pages.
pub const DATA_BASE: u64 = 0xC0_0000;
pub const PAGE: u64 = 4096;
/// Shadow doorbell and EventIdx buffers, one page each.
pub const SHADOW_DOORBELLS: u64 = 0xE0_0000;
pub const EVENT_INDEXES: u64 = 0xE0_1000;

/// Whether a host moving its index from `old` to `new` must ring the MMIO doorbell:
/// `event_index` lies in [old, new), in 16-bit modular arithmetic (Linux's
/// `nvme_dbbuf_need_event`, the virtio EVENT_IDX rule).
pub fn need_event(event_index: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_index).wrapping_sub(1) < new.wrapping_sub(old)
}

#[derive(Default)]
pub struct RecordingInterrupt {
    pub notifications: Mutex<Vec<(u16, u16)>>,
}

impl RecordingInterrupt {
    pub fn take(&self) -> Vec<(u16, u16)> {
        std::mem::take(&mut self.notifications.lock().unwrap())
    }
}

impl NvmeInterrupt for RecordingInterrupt {
    fn notify_completion_queue(&self, cq_id: u16, vector: u16) {
        self.notifications.lock().unwrap().push((cq_id, vector));
    }
}

/// A reaped completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub command_id: u16,
    pub status: Status,
}

struct DriverSq {
    base: u64,
    size: u16,
    tail: u16,
}

struct DriverCq {
    base: u64,
    size: u16,
    head: u16,
    phase: bool,
}

pub struct TestDriver {
    pub controller: NvmeController,
    pub memory: GuestMemoryMmap,
    pub interrupt: Arc<RecordingInterrupt>,
    pub pool: Arc<IoPool>,
    submission_queues: HashMap<u16, DriverSq>,
    completion_queues: HashMap<u16, DriverCq>,
    next_command_id: u16,
    /// Shadow doorbell and EventIdx buffers after a successful Doorbell Buffer Config: I/O
    /// doorbells then go there and to MMIO only when the EventIdx asks, as Linux does.
    doorbell_buffers: Option<(u64, u64)>,
    /// MMIO writes of I/O queue doorbells (tail and head).
    pub io_doorbell_mmio_writes: u64,
    /// I/O queue doorbell updates, whether they went to MMIO or only to the shadow buffer.
    pub io_doorbell_updates: u64,
}

impl TestDriver {
    pub fn new(config: ControllerConfig) -> Self {
        let memory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_BYTES as usize)]).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::default());
        let pool = Arc::new(IoPool::new(2).unwrap());
        let controller =
            NvmeController::new(config, memory.clone(), interrupt.clone(), pool.clone());
        TestDriver {
            controller,
            memory,
            interrupt,
            pool,
            submission_queues: HashMap::new(),
            completion_queues: HashMap::new(),
            next_command_id: 0,
            doorbell_buffers: None,
            io_doorbell_mmio_writes: 0,
            io_doorbell_updates: 0,
        }
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.controller.mmio_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn read64(&mut self, offset: u64) -> u64 {
        let mut data = [0u8; 8];
        self.controller.mmio_read(offset, &mut data);
        u64::from_le_bytes(data)
    }

    pub fn write32(&mut self, offset: u64, value: u32) {
        self.controller.mmio_write(offset, &value.to_le_bytes());
    }

    pub fn write64(&mut self, offset: u64, value: u64) {
        self.controller.mmio_write(offset, &value.to_le_bytes());
    }

    pub fn csts(&mut self) -> u32 {
        self.read32(REG_CSTS)
    }

    /// CC with EN and the entry sizes Linux programs.
    pub fn enabled_cc() -> u32 {
        CC_EN | 6 << CC_IOSQES_SHIFT | 4 << CC_IOCQES_SHIFT
    }

    /// Programs admin queues at the default bases and sets CC.EN; true when RDY.
    pub fn enable(&mut self, sq_entries: u16, cq_entries: u16) -> bool {
        self.enable_at(ADMIN_SQ_BASE, ADMIN_CQ_BASE, sq_entries, cq_entries)
    }

    pub fn enable_at(
        &mut self,
        sq_base: u64,
        cq_base: u64,
        sq_entries: u16,
        cq_entries: u16,
    ) -> bool {
        // Like Linux, start from a zeroed CQ so stale entries of a previous life don't look new.
        if cq_base < MEMORY_BYTES {
            let bytes = (u64::from(cq_entries) * 16).min(MEMORY_BYTES - cq_base);
            self.memory
                .write_slice(&vec![0; bytes as usize], GuestAddress(cq_base))
                .unwrap();
        }
        let aqa =
            u32::from(cq_entries.wrapping_sub(1)) << 16 | u32::from(sq_entries.wrapping_sub(1));
        self.write32(REG_AQA, aqa);
        self.write64(REG_ASQ, sq_base);
        self.write64(REG_ACQ, cq_base);
        self.write32(REG_CC, Self::enabled_cc());
        self.submission_queues.insert(
            0,
            DriverSq {
                base: sq_base,
                size: sq_entries,
                tail: 0,
            },
        );
        self.completion_queues.insert(
            0,
            DriverCq {
                base: cq_base,
                size: cq_entries,
                head: 0,
                phase: true,
            },
        );
        self.csts() & CSTS_RDY != 0
    }

    /// Clears CC.EN and forgets all driver-side queues.
    pub fn disable(&mut self) {
        self.write32(REG_CC, 0);
        self.submission_queues.clear();
        self.completion_queues.clear();
        self.doorbell_buffers = None;
    }

    /// Doorbell Buffer Config with the given buffers; on success the driver uses them for
    /// every I/O queue, existing ones included (Linux's `nvme_dbbuf_set`).
    pub fn configure_doorbell_buffers(&mut self, shadow: u64, event_index: u64) -> Status {
        let status = self
            .admin(
                command(OPC_DOORBELL_BUFFER_CONFIG)
                    .prp1(shadow)
                    .prp2(event_index)
                    .build(),
            )
            .status;
        if status.is_success() {
            self.doorbell_buffers = Some((shadow, event_index));
        }
        status
    }

    /// Writes an I/O doorbell as Linux does: with doorbell buffers, store the value in the
    /// shadow slot, then ring MMIO only if the controller's EventIdx lies in [old, new).
    fn write_io_doorbell(&mut self, doorbell: Doorbell, value: u16) {
        self.io_doorbell_updates += 1;
        if let Some((shadow, event_index)) = self.doorbell_buffers {
            let slot = doorbell.index() * DOORBELL_STRIDE;
            let old: u32 = self.memory.read_obj(GuestAddress(shadow + slot)).unwrap();
            self.memory
                .write_obj(u32::from(value), GuestAddress(shadow + slot))
                .unwrap();
            fence(Ordering::SeqCst);
            let wanted: u32 = self
                .memory
                .read_obj(GuestAddress(event_index + slot))
                .unwrap();
            if !need_event(wanted as u16, value, old as u16) {
                return;
            }
        }
        self.io_doorbell_mmio_writes += 1;
        self.write32(doorbell.offset(), u32::from(value));
    }

    /// Reads one doorbell's slot of the EventIdx buffer.
    pub fn event_index(&self, doorbell: Doorbell) -> u32 {
        let (_, event_index) = self.doorbell_buffers.expect("no doorbell buffers");
        self.memory
            .read_obj(GuestAddress(
                event_index + doorbell.index() * DOORBELL_STRIDE,
            ))
            .unwrap()
    }

    /// Writes `entry` at the SQ tail with a fresh command id; rings the doorbell if `ring`.
    pub fn queue_command(&mut self, qid: u16, mut entry: SubmissionEntry, ring: bool) -> u16 {
        let command_id = self.next_command_id;
        self.next_command_id = self.next_command_id.wrapping_add(1);
        entry.dwords[0] = (entry.dwords[0] & 0xFFFF) | u32::from(command_id) << 16;
        let sq = self.submission_queues.get_mut(&qid).expect("no such SQ");
        let address = GuestAddress(sq.base + u64::from(sq.tail) * 64);
        self.memory.write_slice(&entry.to_bytes(), address).unwrap();
        sq.tail = (sq.tail + 1) % sq.size;
        if ring {
            self.ring_sq(qid);
        }
        command_id
    }

    pub fn ring_sq(&mut self, qid: u16) {
        let tail = self.submission_queues[&qid].tail;
        if qid == 0 {
            self.write32(Doorbell::SubmissionTail(qid).offset(), u32::from(tail));
        } else {
            self.write_io_doorbell(Doorbell::SubmissionTail(qid), tail);
        }
    }

    /// Takes the next completion if its phase tag says it is new, without ringing the CQ head.
    pub fn reap_quietly(&mut self, qid: u16) -> Option<Cqe> {
        let cq = self.completion_queues.get_mut(&qid).expect("no such CQ");
        let address = cq.base + u64::from(cq.head) * 16;
        // As a driver must: the phase tag (DW3) first, the rest only once it says the entry
        // is new (the device writes DW3 last). Read before it, DW2 could still be the last
        // lap's entry: another SQ's id beside this command id.
        let mut dwords = [0u32; 4];
        dwords[3] = self.memory.read_obj(GuestAddress(address + 12)).unwrap();
        if ((dwords[3] >> 16) & 1 != 0) != cq.phase {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        for (i, dword) in dwords[..3].iter_mut().enumerate() {
            *dword = self
                .memory
                .read_obj(GuestAddress(address + 4 * i as u64))
                .unwrap();
        }
        cq.head = (cq.head + 1) % cq.size;
        if cq.head == 0 {
            cq.phase = !cq.phase;
        }
        Some(Cqe {
            result: dwords[0],
            sq_head: dwords[2] as u16,
            sq_id: (dwords[2] >> 16) as u16,
            command_id: dwords[3] as u16,
            status: Status::from_field((dwords[3] >> 16) as u16),
        })
    }

    /// Waits (polling the phase tag, as the workers complete asynchronously) for the next
    /// completion of CQ `qid`; does not ring the head doorbell.
    pub fn wait_quietly(&mut self, qid: u16) -> Option<Cqe> {
        self.wait_quietly_for(qid, IO_TIMEOUT)
    }

    /// [`Self::wait_quietly`] with its own timeout.
    pub fn wait_quietly_for(&mut self, qid: u16, timeout: Duration) -> Option<Cqe> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(cqe) = self.reap_quietly(qid) {
                return Some(cqe);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits for the next completion of CQ `qid` and rings its head doorbell.
    pub fn wait(&mut self, qid: u16) -> Cqe {
        let cqe = self
            .wait_quietly(qid)
            .unwrap_or_else(|| panic!("no completion on CQ {qid} within {IO_TIMEOUT:?}"));
        self.ring_cq(qid);
        cqe
    }

    /// Submits an I/O command to SQ `sq` and waits for its completion on CQ `cq`.
    pub fn io(&mut self, sq: u16, cq: u16, entry: SubmissionEntry) -> Cqe {
        let command_id = self.queue_command(sq, entry, true);
        let cqe = self.wait(cq);
        assert_eq!((cqe.sq_id, cqe.command_id), (sq, command_id));
        cqe
    }

    pub fn ring_cq(&mut self, qid: u16) {
        let head = self.completion_queues[&qid].head;
        if qid == 0 {
            self.write32(Doorbell::CompletionHead(qid).offset(), u32::from(head));
        } else {
            self.write_io_doorbell(Doorbell::CompletionHead(qid), head);
        }
    }

    /// Reaps one completion and rings the CQ head doorbell.
    pub fn reap(&mut self, qid: u16) -> Option<Cqe> {
        let cqe = self.reap_quietly(qid)?;
        self.ring_cq(qid);
        Some(cqe)
    }

    /// Submits an admin command and returns its completion, which must be there at once.
    pub fn admin(&mut self, entry: SubmissionEntry) -> Cqe {
        let command_id = self.queue_command(0, entry, true);
        let cqe = self.reap(0).expect("admin command did not complete");
        assert_eq!(cqe.command_id, command_id);
        assert_eq!(cqe.sq_id, 0);
        cqe
    }

    pub fn read_data(&self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.memory
            .read_slice(&mut data, GuestAddress(DATA_BASE))
            .unwrap();
        data
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> (Status, Vec<u8>) {
        self.memory
            .write_slice(&[0xAA; 4096], GuestAddress(DATA_BASE))
            .unwrap();
        let cqe = self.admin(
            command(OPC_IDENTIFY)
                .nsid(nsid)
                .prp1(DATA_BASE)
                .cdw(10, u32::from(cns))
                .build(),
        );
        (cqe.status, self.read_data(4096))
    }

    pub fn create_cq(&mut self, qid: u16, entries: u16, vector: u16) -> Status {
        self.create_cq_with_interrupts(qid, entries, vector, true)
    }

    /// Where the I/O CQ `qid` lives in guest memory.
    pub fn cq_base(qid: u16) -> u64 {
        IO_QUEUES_BASE + u64::from(qid) * 2 * IO_QUEUE_STRIDE + IO_QUEUE_STRIDE
    }

    pub fn create_cq_with_interrupts(
        &mut self,
        qid: u16,
        entries: u16,
        vector: u16,
        interrupts: bool,
    ) -> Status {
        let base = Self::cq_base(qid);
        let cdw11 = u32::from(vector) << 16 | u32::from(interrupts) << 1 | 1;
        // Ids the controller must reject may lie outside memory: nothing to clear then.
        let _ = self
            .memory
            .write_slice(&vec![0; usize::from(entries) * 16], GuestAddress(base));
        let status = self.create_cq_raw(qid, entries, base, cdw11);
        if status.is_success() {
            self.completion_queues.insert(
                qid,
                DriverCq {
                    base,
                    size: entries,
                    head: 0,
                    phase: true,
                },
            );
        }
        status
    }

    pub fn create_cq_raw(&mut self, qid: u16, entries: u16, base: u64, cdw11: u32) -> Status {
        let cdw10 = u32::from(entries.wrapping_sub(1)) << 16 | u32::from(qid);
        self.admin(
            command(OPC_CREATE_IO_CQ)
                .prp1(base)
                .cdw(10, cdw10)
                .cdw(11, cdw11)
                .build(),
        )
        .status
    }

    pub fn create_sq(&mut self, qid: u16, entries: u16, cq_id: u16) -> Status {
        let base = IO_QUEUES_BASE + u64::from(qid) * 2 * IO_QUEUE_STRIDE;
        let status = self.create_sq_raw(qid, entries, base, u32::from(cq_id) << 16 | 1);
        if status.is_success() {
            self.submission_queues.insert(
                qid,
                DriverSq {
                    base,
                    size: entries,
                    tail: 0,
                },
            );
        }
        status
    }

    pub fn create_sq_raw(&mut self, qid: u16, entries: u16, base: u64, cdw11: u32) -> Status {
        let cdw10 = u32::from(entries.wrapping_sub(1)) << 16 | u32::from(qid);
        self.admin(
            command(OPC_CREATE_IO_SQ)
                .prp1(base)
                .cdw(10, cdw10)
                .cdw(11, cdw11)
                .build(),
        )
        .status
    }

    pub fn delete_sq(&mut self, qid: u16) -> Status {
        let status = self
            .admin(command(OPC_DELETE_IO_SQ).cdw(10, u32::from(qid)).build())
            .status;
        if status.is_success() {
            self.submission_queues.remove(&qid);
        }
        status
    }

    pub fn delete_cq(&mut self, qid: u16) -> Status {
        let status = self
            .admin(command(OPC_DELETE_IO_CQ).cdw(10, u32::from(qid)).build())
            .status;
        if status.is_success() {
            self.completion_queues.remove(&qid);
        }
        status
    }

    pub fn set_feature(&mut self, fid: u8, value: u32) -> Cqe {
        self.admin(
            command(OPC_SET_FEATURES)
                .cdw(10, u32::from(fid))
                .cdw(11, value)
                .build(),
        )
    }

    pub fn get_feature(&mut self, fid: u8, select: u32) -> Cqe {
        self.admin(
            command(OPC_GET_FEATURES)
                .cdw(10, select << 8 | u32::from(fid))
                .build(),
        )
    }

    /// Get Log Page of `len` bytes into the data buffer.
    pub fn get_log_page(
        &mut self,
        log_page: u8,
        len: u32,
        retain_event: bool,
    ) -> (Status, Vec<u8>) {
        let numd = len / 4 - 1;
        let cdw10 = (numd & 0xFFFF) << 16 | u32::from(retain_event) << 15 | u32::from(log_page);
        self.memory
            .write_slice(&vec![0xAA; len as usize], GuestAddress(DATA_BASE))
            .unwrap();
        let entry = command(OPC_GET_LOG_PAGE)
            .nsid(u32::MAX)
            .prp1(DATA_BASE)
            .prp2(DATA_BASE + PAGE)
            .cdw(10, cdw10)
            .cdw(11, numd >> 16)
            .build();
        let status = self.admin(entry).status;
        (status, self.read_data(len as usize))
    }
}

/// Builds a submission entry.
pub struct CommandBuilder(SubmissionEntry);

pub fn command(opcode: u8) -> CommandBuilder {
    let mut entry = SubmissionEntry::default();
    entry.dwords[0] = u32::from(opcode);
    CommandBuilder(entry)
}

impl CommandBuilder {
    pub fn nsid(mut self, nsid: u32) -> Self {
        self.0.dwords[1] = nsid;
        self
    }

    pub fn prp1(mut self, address: u64) -> Self {
        self.0.dwords[6] = address as u32;
        self.0.dwords[7] = (address >> 32) as u32;
        self
    }

    pub fn prp2(mut self, address: u64) -> Self {
        self.0.dwords[8] = address as u32;
        self.0.dwords[9] = (address >> 32) as u32;
        self
    }

    pub fn cdw(mut self, index: usize, value: u32) -> Self {
        self.0.dwords[index] = value;
        self
    }

    /// Sets CDW0 bits other than the opcode and command id (FUSE, PSDT).
    pub fn flags(mut self, bits: u32) -> Self {
        self.0.dwords[0] |= bits & 0xFF00;
        self
    }

    pub fn build(self) -> SubmissionEntry {
        self.0
    }
}

pub fn le16(data: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(data[offset..offset + 2].try_into().unwrap())
}

pub fn le32(data: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(data[offset..offset + 4].try_into().unwrap())
}

pub fn le64(data: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(data[offset..offset + 8].try_into().unwrap())
}

/// A raw image file in the temporary directory, deleted when dropped.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(bytes: u64) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "blkswarm-nvme-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(bytes).unwrap();
        TempImage { path }
    }

    pub fn backend(&self, read_only: bool) -> Arc<BlockBackend> {
        Arc::new(BlockBackend::open_raw_file(&self.path, false, read_only).unwrap())
    }

    pub fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let file = OpenOptions::new().read(true).open(&self.path).unwrap();
        let mut data = vec![0; len];
        file.read_exact_at(&mut data, offset).unwrap();
        data
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) {
        let file = OpenOptions::new().write(true).open(&self.path).unwrap();
        file.write_all_at(data, offset).unwrap();
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
