//! The NVM command set's I/O commands (NVMe 1.4, 6): Flush, Write, Read, Write Zeroes and
//! Dataset Management, validated and turned into backend operations. Pure decoding; the queue
//! handler in [`super::io_queue`] submits what this prepares.
//!
//! Namespaces map onto block backends: each namespace is a byte range of an
//! `Arc<BlockBackend>` ([`super::NamespaceConfig::backend_offset`] and `size_blocks`), so a
//! controller can give every namespace its own backend or carve several out of one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::ana::AnaGroups;
use super::prp::{self, Segment};
use super::queue::SubmissionEntry;
use super::{NamespaceConfig, NvmeInterrupt, Status};
use crate::io::backend::MAX_IO_BUFFERS;
use crate::io::{BackendError, BlockBackend, BlockIo, BlockIoKind};

pub const OPC_FLUSH: u8 = 0x00;
pub const OPC_WRITE: u8 = 0x01;
pub const OPC_READ: u8 = 0x02;
pub const OPC_WRITE_ZEROES: u8 = 0x08;
pub const OPC_DATASET_MANAGEMENT: u8 = 0x09;

/// Dataset Management CDW11 attribute: deallocate the ranges (IDR/IDW are mere hints).
pub const DSM_ATTRIBUTE_DEALLOCATE: u32 = 1 << 2;
/// One Dataset Management range: context attributes, length in blocks, starting LBA.
pub const DSM_RANGE_BYTES: usize = 16;
/// NR is 8 bits, 0's based.
pub const MAX_DSM_RANGES: usize = 256;
/// CDW12 of Read, Write and Write Zeroes: Force Unit Access.
pub const FORCE_UNIT_ACCESS: u32 = 1 << 30;

/// A namespace as the I/O path sees it.
#[derive(Debug)]
pub struct Namespace {
    pub backend: Arc<BlockBackend>,
    pub backend_offset: u64,
    pub size_blocks: u64,
    pub block_size_shift: u8,
}

impl Namespace {
    pub fn new(config: &NamespaceConfig) -> Self {
        Namespace {
            backend: config.backend.clone(),
            backend_offset: config.backend_offset,
            size_blocks: config.size_blocks,
            block_size_shift: config.block_size_shift,
        }
    }

    /// The backend byte range of `blocks` blocks from `first_block`, if inside the namespace.
    fn byte_range(&self, first_block: u64, blocks: u64) -> Result<(u64, u64), Status> {
        let end = first_block
            .checked_add(blocks)
            .ok_or(Status::LBA_OUT_OF_RANGE)?;
        if end > self.size_blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        // Construction keeps size_blocks << shift inside the backend, so no overflow here.
        let offset = self.backend_offset + (first_block << self.block_size_shift);
        Ok((offset, blocks << self.block_size_shift))
    }

    fn check_writable(&self) -> Result<(), Status> {
        if self.backend.read_only() {
            return Err(Status::NAMESPACE_WRITE_PROTECTED);
        }
        Ok(())
    }
}

/// Everything the I/O queue handlers of one controller share with it.
pub struct IoContext {
    pub memory: GuestMemoryMmap,
    pub interrupt: Arc<dyn NvmeInterrupt>,
    /// Index nsid - 1.
    pub namespaces: Vec<Namespace>,
    pub max_transfer_bytes: u64,
    /// The host turned the volatile write cache off (or there is none): every write is
    /// followed by a flush before it completes.
    pub write_through: AtomicBool,
    /// An I/O queue could not read its SQ or write its CQ in guest memory: the controller
    /// turns this into CSTS.CFS at the next register read.
    pub fatal: AtomicBool,
    /// Shadow doorbell values beyond their queue, ignored (see [`super::shadow`]).
    pub invalid_shadow_doorbell_values: AtomicU64,
    /// CSTS.CFS is set: the I/O queues fetch no more commands until the host resets the
    /// controller, as a failed controller would (commands already at the backend finish).
    pub halted: AtomicBool,
    /// This controller's ANA state of each namespace's group, when it reports ANA.
    pub ana: Option<Arc<AnaGroups>>,
}

/// One command's backend work: a first operation, then possibly more Deallocate ranges and a
/// flush (FUA or write-through), run one after the other by the queue handler.
#[derive(Debug, Default)]
pub struct Operation {
    pub namespace: usize,
    pub io: BlockIo,
    /// Further Deallocate ranges (offset, length in bytes), taken from the back.
    pub discards: Vec<(u64, u64)>,
    pub flush_after: bool,
    /// What the command moves, counted on success.
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl Operation {
    /// Moves to the next step; false when the command is finished.
    pub fn next_step(&mut self) -> bool {
        if let Some((offset, len)) = self.discards.pop() {
            self.io.reset(BlockIoKind::Discard, offset, len);
            return true;
        }
        if std::mem::take(&mut self.flush_after) {
            self.io.reset(BlockIoKind::Flush, 0, 0);
            return true;
        }
        false
    }
}

/// What a validated command needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// `Operation::io` is ready for the backend.
    Backend,
    /// Nothing for the backend to do: complete with success.
    Complete,
}

/// Validates `command` and prepares `operation` for it. `segments` is scratch space.
pub fn prepare(
    context: &IoContext,
    command: &SubmissionEntry,
    operation: &mut Operation,
    segments: &mut Vec<Segment>,
) -> Result<Prepared, Status> {
    // No fused operations, no SGLs (Identify SGLS = 0), no metadata pointer needed (no
    // metadata formats).
    if command.fuse() != 0 || command.data_transfer_kind() != 0 {
        return Err(Status::INVALID_FIELD);
    }
    let opcode = command.opcode();
    if !matches!(
        opcode,
        OPC_FLUSH | OPC_WRITE | OPC_READ | OPC_WRITE_ZEROES | OPC_DATASET_MANAGEMENT
    ) {
        return Err(Status::INVALID_OPCODE);
    }
    // Flush with NSID FFFFFFFFh is not supported (Identify VWC bits 2:1 = 10b).
    let nsid = command.namespace_id();
    let index = nsid
        .checked_sub(1)
        .map(|index| index as usize)
        .filter(|index| *index < context.namespaces.len())
        .ok_or(Status::INVALID_NAMESPACE)?;
    // A path that cannot reach the namespace's group says so; the host retries elsewhere.
    if let Some(status) = context
        .ana
        .as_ref()
        .and_then(|ana| ana.namespace_state(nsid))
        .and_then(|state| state.io_status())
    {
        return Err(status);
    }
    let namespace = &context.namespaces[index];
    operation.namespace = index;
    operation.discards.clear();
    operation.flush_after = false;
    operation.bytes_read = 0;
    operation.bytes_written = 0;
    let write_through = context.write_through.load(Ordering::Relaxed);
    match opcode {
        OPC_FLUSH => {
            operation.io.reset(BlockIoKind::Flush, 0, 0);
            Ok(Prepared::Backend)
        }
        OPC_READ | OPC_WRITE => {
            let write = opcode == OPC_WRITE;
            if write {
                namespace.check_writable()?;
            }
            let (offset, len) = namespace.byte_range(lba(command), block_count(command))?;
            if len > context.max_transfer_bytes {
                return Err(Status::INVALID_FIELD);
            }
            prp::map_prps_into(
                &context.memory,
                command.prp1(),
                command.prp2(),
                len,
                Some(context.max_transfer_bytes),
                segments,
            )?;
            let kind = if write {
                BlockIoKind::Write
            } else {
                BlockIoKind::Read
            };
            operation.io.reset(kind, offset, len);
            push_guest_buffers(&context.memory, segments, &mut operation.io)?;
            if write {
                operation.bytes_written = len;
                operation.flush_after = write_through || command.cdw(12) & FORCE_UNIT_ACCESS != 0;
            } else {
                operation.bytes_read = len;
            }
            Ok(Prepared::Backend)
        }
        OPC_WRITE_ZEROES => {
            namespace.check_writable()?;
            let (offset, len) = namespace.byte_range(lba(command), block_count(command))?;
            operation.io.reset(BlockIoKind::WriteZeroes, offset, len);
            operation.flush_after = write_through || command.cdw(12) & FORCE_UNIT_ACCESS != 0;
            Ok(Prepared::Backend)
        }
        _ => prepare_dataset_management(context, command, namespace, operation, segments),
    }
}

fn prepare_dataset_management(
    context: &IoContext,
    command: &SubmissionEntry,
    namespace: &Namespace,
    operation: &mut Operation,
    segments: &mut Vec<Segment>,
) -> Result<Prepared, Status> {
    if command.cdw(11) & DSM_ATTRIBUTE_DEALLOCATE == 0 {
        // Integral Dataset for Read/Write are hints: nothing to do.
        return Ok(Prepared::Complete);
    }
    namespace.check_writable()?;
    let ranges = (command.cdw(10) & 0xFF) as usize + 1;
    let mut data = [0u8; MAX_DSM_RANGES * DSM_RANGE_BYTES];
    let data = &mut data[..ranges * DSM_RANGE_BYTES];
    prp::map_prps_into(
        &context.memory,
        command.prp1(),
        command.prp2(),
        data.len() as u64,
        None,
        segments,
    )?;
    prp::read_from_segments(&context.memory, segments, data)?;
    for range in data.chunks_exact(DSM_RANGE_BYTES) {
        let blocks = u64::from(u32::from_le_bytes(range[4..8].try_into().unwrap()));
        let first = u64::from_le_bytes(range[8..16].try_into().unwrap());
        let (offset, len) = namespace.byte_range(first, blocks)?;
        if len > 0 {
            operation.discards.push((offset, len));
        }
    }
    // Steps are taken from the back: keep the guest's order.
    operation.discards.reverse();
    if operation.next_step() {
        Ok(Prepared::Backend)
    } else {
        Ok(Prepared::Complete)
    }
}

fn lba(command: &SubmissionEntry) -> u64 {
    u64::from(command.cdw(10)) | u64::from(command.cdw(11)) << 32
}

/// NLB: CDW12 bits 15:0, 0's based.
fn block_count(command: &SubmissionEntry) -> u64 {
    u64::from(command.cdw(12) & 0xFFFF) + 1
}

/// Points `io` at the guest memory of `segments`; a segment that spans guest memory regions
/// becomes one buffer per region.
fn push_guest_buffers(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    io: &mut BlockIo,
) -> Result<(), Status> {
    for segment in segments {
        let len = usize::try_from(segment.len).map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        for slice in memory.get_slices(GuestAddress(segment.address.0), len) {
            let slice = slice.map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            io.push_buffer(slice.ptr_guard_mut().as_ptr(), slice.len());
        }
    }
    if io.buffer_count() > MAX_IO_BUFFERS {
        // Only possible with guest memory split into very many regions: MDTS keeps the
        // page count below the limit.
        return Err(Status::DATA_TRANSFER_ERROR);
    }
    Ok(())
}

/// The completion status of a failed backend operation of `kind`.
pub fn backend_error_status(kind: BlockIoKind, error: &BackendError) -> Status {
    match error {
        BackendError::ReadOnly => Status::NAMESPACE_WRITE_PROTECTED,
        // A deallocate the file system refuses (Linux maps Invalid Field to BLK_STS_NOTSUPP).
        BackendError::Unsupported => Status::INVALID_FIELD,
        BackendError::Unaligned | BackendError::TooManyBuffers => Status::INVALID_FIELD,
        // A bad sector range fails every retry: say so, as a drive would with Do Not Retry.
        BackendError::Injected { persistent: true } => Status {
            do_not_retry: true,
            ..media_error(kind)
        },
        _ => media_error(kind),
    }
}

/// A host-side I/O error of a `kind` operation, as NVMe media status.
fn media_error(kind: BlockIoKind) -> Status {
    match kind {
        BlockIoKind::Read => Status::UNRECOVERED_READ_ERROR,
        _ => Status::WRITE_FAULT,
    }
}

/// Whether `len` bytes from `offset` fit into a backend of `backend_size` bytes.
pub fn fits_backend(offset: u64, len: u64, backend_size: u64) -> bool {
    offset
        .checked_add(len)
        .is_some_and(|end| end <= backend_size)
}
