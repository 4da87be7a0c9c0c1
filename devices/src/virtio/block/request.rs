//! Parsing one virtio-blk request (virtio 1.2, 5.2.6) from a descriptor chain the guest wrote.
//!
//! Everything here is hostile input. The framing this device accepts is the one Linux uses:
//! the first descriptor is the 16-byte request header (device-readable), the last descriptor's
//! last byte is the status (device-writable), and the descriptors between carry the data with
//! the direction the request type implies. Anything else fails the request with IOERR (or
//! UNSUPP for a type or flag the device does not implement) and counts the reason; a chain
//! without a writable status byte is returned with used length 0.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, Le32, Le64,
};

use crate::io::backend::MAX_IO_BUFFERS;
use crate::io::{BackendError, BlockIo, BlockIoKind};
use crate::latency::Op;

/// Request types (virtio 1.2, 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `flags` of a discard / write-zeroes segment.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Sectors are 512 bytes in the virtio-blk protocol, whatever `blk_size` says.
pub const SECTOR_BYTES: u64 = 512;
/// GET_ID returns exactly this many bytes, NUL padded (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_BYTES: usize = 20;
/// Largest data transfer of one IN/OUT request. Linux sends at most `max_sectors_kb` (1280 KiB
/// by default); the cap bounds what one guest request can make the host do and keeps the used
/// length (data + status) inside a u32.
pub const MAX_REQUEST_DATA_BYTES: u64 = 1 << 30;

const HEADER_BYTES: u32 = 16;
const SEGMENT_BYTES: u64 = 16;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RequestHeader {
    request_type: Le32,
    reserved: Le32,
    sector: Le64,
}

// SAFETY: plain-old-data of three little-endian integers without padding; any bit pattern is
// valid.
unsafe impl ByteValued for RequestHeader {}

/// Why a request failed; each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The chain could not be walked: a loop, too many descriptors, a bad next index or
    /// indirect table, or a descriptor outside guest memory.
    BadChain,
    /// The first descriptor is not a 16-byte device-readable header.
    BadHeader,
    /// The last descriptor is not device-writable (or has no byte in guest memory).
    MissingStatus,
    /// A data descriptor has the wrong direction for the request type.
    BadDirection,
    /// Data length not a multiple of 512, too large, or a GET_ID/segment area of the wrong size.
    BadLength,
    /// Sector range beyond the capacity (or overflowing).
    OutOfRange,
    /// A buffer is not inside guest memory.
    BadAddress,
    /// A discard / write-zeroes segment asks for too many sectors or segments.
    BadSegment,
    /// A write to a read-only device.
    ReadOnly,
    /// Unknown request type, or a flag this device does not implement.
    Unsupported,
    /// O_DIRECT backend and a buffer, length or offset not 512-aligned.
    Unaligned,
    /// More host buffers than one vectored operation takes.
    TooManyBuffers,
    /// The backend reported an I/O error or a short transfer.
    Backend,
}

impl RequestError {
    pub fn status(self) -> u8 {
        match self {
            Self::Unsupported => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

impl From<&BackendError> for RequestError {
    fn from(error: &BackendError) -> Self {
        match error {
            BackendError::Unaligned => Self::Unaligned,
            BackendError::TooManyBuffers => Self::TooManyBuffers,
            BackendError::Unsupported => Self::Unsupported,
            BackendError::ReadOnly => Self::ReadOnly,
            _ => Self::Backend,
        }
    }
}

/// What the device is and allows, as far as requests are concerned.
#[derive(Debug, Clone)]
pub struct DiskLimits {
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub serial: [u8; SERIAL_BYTES],
}

/// The request types, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unknown,
}

impl RequestType {
    /// The direction the per-direction latency numbers file the request under.
    pub fn op(self) -> Op {
        match self {
            Self::In => Op::Read,
            Self::Out => Op::Write,
            _ => Op::Other,
        }
    }

    fn from_raw(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            _ => Self::Unknown,
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// `io` is prepared for the backend; on success the used length is `data_written` + 1.
    Backend { data_written: u32 },
    /// Answered already (GET_ID): `data_written` bytes went to the guest.
    Answered { data_written: u32 },
}

/// Walks `chain` into `descriptors` (cleared first), following indirect tables.
///
/// virtio-queue ends the walk silently on a loop (its TTL runs out), on an out-of-range next
/// index, a bad indirect table or an unreadable descriptor; in all those cases the last
/// descriptor yielded still has NEXT set, which is how they are told from a proper end.
/// Indirect descriptors are followed whether or not the driver acked INDIRECT_DESC (a driver
/// that uses them without acking is out of spec but harmless).
pub fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    descriptors: &mut Vec<Descriptor>,
    max_descriptors: usize,
) -> Result<(), RequestError> {
    descriptors.clear();
    for descriptor in chain {
        if descriptors.len() == max_descriptors {
            return Err(RequestError::BadChain);
        }
        descriptors.push(descriptor);
    }
    match descriptors.last() {
        Some(last) if !last.has_next() => Ok(()),
        _ => Err(RequestError::BadChain),
    }
}

/// Where the status byte goes: the last byte of the last descriptor, if device-writable and
/// in guest memory.
pub fn status_address(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
) -> Option<GuestAddress> {
    let last = descriptors.last()?;
    if !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let address = last.addr().checked_add(u64::from(last.len()) - 1)?;
    memory.check_range(address, 1).then_some(address)
}

/// Validates the request in `descriptors` (a complete chain with a status byte) and either
/// answers it or prepares `io`. Returns the request type for counting whatever the outcome.
pub fn parse(
    memory: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    limits: &DiskLimits,
    io: &mut BlockIo,
) -> (RequestType, Result<Parsed, RequestError>) {
    let Some((header_descriptor, rest)) = descriptors.split_first() else {
        return (RequestType::Unknown, Err(RequestError::BadChain));
    };
    if header_descriptor.is_write_only() || header_descriptor.len() != HEADER_BYTES {
        return (RequestType::Unknown, Err(RequestError::BadHeader));
    }
    let header: RequestHeader = match memory.read_obj(header_descriptor.addr()) {
        Ok(header) => header,
        Err(_) => return (RequestType::Unknown, Err(RequestError::BadAddress)),
    };
    // The status descriptor is the last one; with a one-descriptor chain there is none left.
    let data = rest.split_last().map_or(&[][..], |(_, data)| data);
    let request_type = RequestType::from_raw(header.request_type.to_native());
    let sector = header.sector.to_native();
    let result = match request_type {
        RequestType::In => data_transfer(memory, data, limits, BlockIoKind::Read, sector, io),
        RequestType::Out if limits.read_only => Err(RequestError::ReadOnly),
        RequestType::Out => data_transfer(memory, data, limits, BlockIoKind::Write, sector, io),
        RequestType::Flush => {
            // Linux sends no data with a flush; any data descriptors are ignored.
            io.reset(BlockIoKind::Flush, 0, 0);
            Ok(Parsed::Backend { data_written: 0 })
        }
        RequestType::GetId => get_id(memory, data, limits),
        RequestType::Discard if limits.discard => {
            range_command(memory, data, limits, BlockIoKind::Discard, io)
        }
        RequestType::WriteZeroes if limits.write_zeroes => {
            range_command(memory, data, limits, BlockIoKind::WriteZeroes, io)
        }
        // Types not offered (DISCARD/WRITE_ZEROES on a read-only disk) and unknown ones.
        _ => Err(RequestError::Unsupported),
    };
    (request_type, result)
}

/// Checks that `[sector * 512, + len)` is inside the disk; returns the byte offset.
fn checked_range(sector: u64, len: u64, limits: &DiskLimits) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_BYTES)
        .ok_or(RequestError::OutOfRange)?;
    let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
    if end > limits.capacity_bytes {
        return Err(RequestError::OutOfRange);
    }
    Ok(offset)
}

fn data_transfer(
    memory: &GuestMemoryMmap,
    data: &[Descriptor],
    limits: &DiskLimits,
    kind: BlockIoKind,
    sector: u64,
    io: &mut BlockIo,
) -> Result<Parsed, RequestError> {
    let device_writes = kind == BlockIoKind::Read;
    let mut total: u64 = 0;
    for descriptor in data {
        if descriptor.is_write_only() != device_writes {
            return Err(RequestError::BadDirection);
        }
        total += u64::from(descriptor.len());
    }
    if !total.is_multiple_of(SECTOR_BYTES) || total > MAX_REQUEST_DATA_BYTES {
        return Err(RequestError::BadLength);
    }
    let offset = checked_range(sector, total, limits)?;
    io.reset(kind, offset, total);
    for descriptor in data {
        // A descriptor may span guest memory regions: one host buffer per region piece.
        for slice in memory.get_slices(descriptor.addr(), descriptor.len() as usize) {
            let slice = slice.map_err(|_| RequestError::BadAddress)?;
            io.push_buffer(slice.ptr_guard_mut().as_ptr(), slice.len());
        }
    }
    if io.buffer_count() > MAX_IO_BUFFERS {
        return Err(RequestError::TooManyBuffers);
    }
    let data_written = if device_writes {
        // Bounded by MAX_REQUEST_DATA_BYTES.
        total as u32
    } else {
        0
    };
    Ok(Parsed::Backend { data_written })
}

fn get_id(
    memory: &GuestMemoryMmap,
    data: &[Descriptor],
    limits: &DiskLimits,
) -> Result<Parsed, RequestError> {
    if data.iter().any(|descriptor| !descriptor.is_write_only()) {
        return Err(RequestError::BadDirection);
    }
    let mut serial = &limits.serial[..];
    let mut written = 0u32;
    for descriptor in data {
        if serial.is_empty() {
            break;
        }
        let take = serial.len().min(descriptor.len() as usize);
        memory
            .write_slice(&serial[..take], descriptor.addr())
            .map_err(|_| RequestError::BadAddress)?;
        serial = &serial[take..];
        // At most SERIAL_BYTES.
        written += take as u32;
    }
    Ok(Parsed::Answered {
        data_written: written,
    })
}

/// DISCARD and WRITE_ZEROES: exactly one 16-byte segment (max_*_seg is 1).
fn range_command(
    memory: &GuestMemoryMmap,
    data: &[Descriptor],
    limits: &DiskLimits,
    kind: BlockIoKind,
    io: &mut BlockIo,
) -> Result<Parsed, RequestError> {
    let mut total = 0u64;
    for descriptor in data {
        if descriptor.is_write_only() {
            return Err(RequestError::BadDirection);
        }
        total += u64::from(descriptor.len());
    }
    if total == 0 || !total.is_multiple_of(SEGMENT_BYTES) {
        return Err(RequestError::BadLength);
    }
    if total > SEGMENT_BYTES {
        return Err(RequestError::BadSegment);
    }
    let mut segment = [0u8; SEGMENT_BYTES as usize];
    let mut filled = 0usize;
    for descriptor in data {
        let take = (segment.len() - filled).min(descriptor.len() as usize);
        memory
            .read_slice(&mut segment[filled..filled + take], descriptor.addr())
            .map_err(|_| RequestError::BadAddress)?;
        filled += take;
    }
    let sector = u64::from_le_bytes(segment[0..8].try_into().expect("8 bytes"));
    let sectors = u32::from_le_bytes(segment[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(segment[12..16].try_into().expect("4 bytes"));
    // Reserved flag bits, and unmap on a discard (virtio 1.2, 5.2.6.2), are UNSUPP.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        || (kind == BlockIoKind::Discard && flags != 0)
    {
        return Err(RequestError::Unsupported);
    }
    let max = match kind {
        BlockIoKind::Discard => limits.max_discard_sectors,
        _ => limits.max_write_zeroes_sectors,
    };
    if sectors > max {
        return Err(RequestError::BadSegment);
    }
    let len = u64::from(sectors) * SECTOR_BYTES;
    let offset = checked_range(sector, len, limits)?;
    io.reset(kind, offset, len);
    Ok(Parsed::Backend { data_written: 0 })
}
