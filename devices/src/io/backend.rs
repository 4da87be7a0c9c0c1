//! Block backends: where a disk's blocks live, and how a request's operation becomes io_uring
//! submissions on the worker's ring.
//!
//! A device prepares a [`BlockIo`] (kind, byte offset, length, host buffers), hands it to
//! [`BlockBackend::submit`], and passes the completion result to [`BlockBackend::complete`];
//! either may finish the operation at once ([`Submitted::Done`]) or leave it in the ring
//! ([`Submitted::Pending`]). The backend hides short transfers (resubmitting the rest) and
//! fallbacks (writing zeroes when the file system refuses to zero a range).
//!
//! Choices:
//! - O_DIRECT needs buffers, lengths and offsets aligned to [`DIRECT_IO_ALIGNMENT`]; an
//!   unaligned request fails with [`BackendError::Unaligned`] (the device reports IOERR and
//!   counts it) rather than being bounced: Linux guests always send 512-aligned buffers.
//! - DISCARD punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); if the file system refuses,
//!   the request fails with [`BackendError::Unsupported`] (UNSUPP to the guest).
//! - WRITE_ZEROES zeroes the range (FALLOC_FL_ZERO_RANGE | KEEP_SIZE); if the file system
//!   refuses, the backend writes zeroes instead, from a shared zero buffer, and remembers to
//!   go straight to writing from then on.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use io_uring::{opcode, types};

use super::faults::{Fault, Faults};

use super::pool::IoSubmitter;

/// Alignment of buffers, lengths and offsets for O_DIRECT: the logical block size of nearly
/// every device (4K-native devices additionally fail unaligned I/O with EINVAL, still IOERR).
pub const DIRECT_IO_ALIGNMENT: u64 = 512;
/// Most buffers in one vectored operation: the kernel's UIO_MAXIOV.
pub const MAX_IO_BUFFERS: usize = 1024;
/// Size of the shared zero buffer that backs WRITE_ZEROES when the file system cannot zero a
/// range: one iovec per chunk, so one write covers up to `MAX_IO_BUFFERS` chunks.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// Largest WRITE_ZEROES one operation can carry by writing zeroes.
pub const MAX_WRITE_ZEROES_BYTES: u64 = (ZERO_CHUNK_BYTES * MAX_IO_BUFFERS) as u64;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot determine the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("buffer, length or offset not aligned to {DIRECT_IO_ALIGNMENT} bytes for O_DIRECT")]
    Unaligned,
    #[error("more than {MAX_IO_BUFFERS} buffers in one operation")]
    TooManyBuffers,
    #[error("the backend cannot do this operation")]
    Unsupported,
    #[error("write to a read-only backend")]
    ReadOnly,
    #[error("the transfer stopped after {0} bytes (end of file?)")]
    ShortTransfer(u64),
    #[error("I/O error")]
    Io(#[source] io::Error),
    /// Fault injection failed the operation; `persistent`: it will fail again (a bad
    /// sector range), else it was a random transient error.
    #[error("injected fault")]
    Injected { persistent: bool },
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockIoKind {
    #[default]
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One operation of a request, owned by the device's request record from `submit` until the
/// backend reports it done. The iovecs point at guest memory (or the shared zero buffer).
#[derive(Debug, Default)]
pub struct BlockIo {
    kind: BlockIoKind,
    offset: u64,
    len: u64,
    iovecs: Vec<libc::iovec>,
    /// First iovec not completely transferred yet (short transfers advance it).
    first_iovec: usize,
    transferred: u64,
    /// WRITE_ZEROES is being done by writing from the zero buffer.
    writing_zeroes: bool,
    /// An injected delay (an io_uring timeout) runs before the operation itself. Boxed: the
    /// kernel reads the timespec when the ring is entered, after `BlockIo` may have moved.
    delay: Option<Box<types::Timespec>>,
    delaying: bool,
}

// SAFETY: the raw pointers in `iovecs` designate guest memory or the process-wide zero buffer,
// neither tied to a thread; whoever fills them guarantees their validity (see `submit`).
unsafe impl Send for BlockIo {}

impl BlockIo {
    /// Starts a new operation, reusing the iovec allocation of the previous one.
    pub fn reset(&mut self, kind: BlockIoKind, offset: u64, len: u64) {
        self.kind = kind;
        self.offset = offset;
        self.len = len;
        self.iovecs.clear();
        self.first_iovec = 0;
        self.transferred = 0;
        self.writing_zeroes = false;
        self.delaying = false;
    }

    /// Adds a host buffer to a read or write.
    pub fn push_buffer(&mut self, address: *mut u8, len: usize) {
        self.iovecs.push(libc::iovec {
            iov_base: address.cast(),
            iov_len: len,
        });
    }

    pub fn kind(&self) -> BlockIoKind {
        self.kind
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host buffers of a read or write.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    pub fn buffer_count(&self) -> usize {
        self.iovecs.len()
    }

    fn direct_io_aligned(&self) -> bool {
        let aligned = |value: u64| value.is_multiple_of(DIRECT_IO_ALIGNMENT);
        aligned(self.offset)
            && self
                .iovecs
                .iter()
                .all(|iovec| aligned(iovec.iov_base as u64) && aligned(iovec.iov_len as u64))
    }

    /// Accounts `bytes` transferred: skips finished iovecs and trims the first unfinished one.
    fn advance(&mut self, bytes: u64) {
        self.transferred += bytes;
        let mut left = bytes;
        while left > 0 && self.first_iovec < self.iovecs.len() {
            let iovec = &mut self.iovecs[self.first_iovec];
            let len = iovec.iov_len as u64;
            if left >= len {
                left -= len;
                self.first_iovec += 1;
            } else {
                // `left < len`, which came from a usize.
                let step = left as usize;
                // The pointer stays inside the same buffer (`step < iov_len`).
                iovec.iov_base = iovec.iov_base.cast::<u8>().wrapping_add(step).cast();
                iovec.iov_len -= step;
                left = 0;
            }
        }
    }

    fn remaining_iovecs(&self) -> (*const libc::iovec, u32) {
        let rest = &self.iovecs[self.first_iovec..];
        // `submit` checked the count against MAX_IO_BUFFERS.
        (rest.as_ptr(), rest.len() as u32)
    }
}

/// How far an operation got.
#[derive(Debug)]
pub enum Submitted {
    /// In the ring: its result comes to the queue handler's `complete`.
    Pending,
    /// Finished: bytes transferred, or why it failed.
    Done(Result<u64, BackendError>),
}

/// A raw disk image (regular file or block device).
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    direct: bool,
    read_only: bool,
    /// The file system refused FALLOC_FL_ZERO_RANGE once: write zeroes instead from now on.
    zero_range_refused: AtomicBool,
}

impl RawFile {
    pub fn open(path: &Path, direct: bool, read_only: bool) -> Result<Self, BackendError> {
        let mut options = OpenOptions::new();
        options.read(true).write(!read_only);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|source| BackendError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, direct, read_only).map_err(|source| BackendError::Size {
            path: path.to_owned(),
            source,
        })
    }

    /// Wraps an open file; `direct` must match how it was opened.
    pub fn from_file(mut file: File, direct: bool, read_only: bool) -> io::Result<Self> {
        // Works for block devices too, where the metadata length is zero.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawFile {
            file,
            size,
            direct,
            read_only,
            zero_range_refused: AtomicBool::new(false),
        })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.file.as_raw_fd())
    }

    /// # Safety
    ///
    /// As [`BlockBackend::submit`].
    unsafe fn submit(&self, request: u32, io: &mut BlockIo, ring: &mut IoSubmitter) -> Submitted {
        let entry = match io.kind {
            BlockIoKind::Read | BlockIoKind::Write => {
                if io.kind == BlockIoKind::Write && self.read_only {
                    return Submitted::Done(Err(BackendError::ReadOnly));
                }
                if io.iovecs.len() > MAX_IO_BUFFERS {
                    return Submitted::Done(Err(BackendError::TooManyBuffers));
                }
                if self.direct && !io.direct_io_aligned() {
                    return Submitted::Done(Err(BackendError::Unaligned));
                }
                if io.len == 0 {
                    return Submitted::Done(Ok(0));
                }
                self.vectored_entry(io)
            }
            BlockIoKind::Flush => opcode::Fsync::new(self.fd())
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            BlockIoKind::Discard | BlockIoKind::WriteZeroes => {
                if self.read_only {
                    return Submitted::Done(Err(BackendError::ReadOnly));
                }
                if io.len == 0 {
                    return Submitted::Done(Ok(0));
                }
                if io.kind == BlockIoKind::WriteZeroes
                    && self.zero_range_refused.load(Ordering::Relaxed)
                {
                    return self.write_zeroes(request, io, ring);
                }
                let mode = if io.kind == BlockIoKind::Discard {
                    libc::FALLOC_FL_PUNCH_HOLE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                opcode::Fallocate::new(self.fd(), io.len)
                    .offset(io.offset)
                    .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
        };
        // SAFETY: the caller keeps `io` (its iovecs) and the guest buffers valid until the
        // completion; fsync and fallocate reference no memory.
        unsafe { ring.push(request, entry) };
        Submitted::Pending
    }

    fn vectored_entry(&self, io: &BlockIo) -> io_uring::squeue::Entry {
        let (iovecs, count) = io.remaining_iovecs();
        let offset = io.offset + io.transferred;
        if io.kind == BlockIoKind::Read {
            opcode::Readv::new(self.fd(), iovecs, count)
                .offset(offset)
                .build()
        } else {
            opcode::Writev::new(self.fd(), iovecs, count)
                .offset(offset)
                .build()
        }
    }

    /// WRITE_ZEROES by writing the shared zero buffer over the range.
    ///
    /// # Safety
    ///
    /// As [`BlockBackend::submit`].
    unsafe fn write_zeroes(
        &self,
        request: u32,
        io: &mut BlockIo,
        ring: &mut IoSubmitter,
    ) -> Submitted {
        if io.len > MAX_WRITE_ZEROES_BYTES {
            return Submitted::Done(Err(BackendError::TooManyBuffers));
        }
        let zeroes = zero_buffer();
        io.iovecs.clear();
        io.first_iovec = 0;
        io.transferred = 0;
        io.writing_zeroes = true;
        let mut left = io.len;
        while left > 0 {
            let chunk = left.min(ZERO_CHUNK_BYTES as u64);
            // The zero buffer is only ever read from (by the kernel).
            io.push_buffer(zeroes.cast_mut(), chunk as usize);
            left -= chunk;
        }
        if self.direct && !io.direct_io_aligned() {
            return Submitted::Done(Err(BackendError::Unaligned));
        }
        let (iovecs, count) = io.remaining_iovecs();
        let entry = opcode::Writev::new(self.fd(), iovecs, count)
            .offset(io.offset)
            .build();
        // SAFETY: the iovecs live in `io`, kept by the caller until the completion, and point
        // at the zero buffer, which lives for the whole process.
        unsafe { ring.push(request, entry) };
        Submitted::Pending
    }

    /// # Safety
    ///
    /// As [`BlockBackend::submit`].
    unsafe fn complete(
        &self,
        request: u32,
        io: &mut BlockIo,
        result: i32,
        ring: &mut IoSubmitter,
    ) -> Submitted {
        let vectored = matches!(io.kind, BlockIoKind::Read | BlockIoKind::Write);
        if vectored || io.writing_zeroes {
            if result < 0 {
                return Submitted::Done(Err(BackendError::Io(io::Error::from_raw_os_error(
                    -result,
                ))));
            }
            if result == 0 {
                return Submitted::Done(Err(BackendError::ShortTransfer(io.transferred)));
            }
            io.advance(u64::from(result.unsigned_abs()));
            if io.transferred >= io.len {
                return Submitted::Done(Ok(io.len));
            }
            let (iovecs, count) = io.remaining_iovecs();
            let offset = io.offset + io.transferred;
            let entry = if io.kind == BlockIoKind::Read {
                opcode::Readv::new(self.fd(), iovecs, count)
                    .offset(offset)
                    .build()
            } else {
                opcode::Writev::new(self.fd(), iovecs, count)
                    .offset(offset)
                    .build()
            };
            // SAFETY: same buffers as the first submission, still owned by the caller.
            unsafe { ring.push(request, entry) };
            return Submitted::Pending;
        }
        match (io.kind, result) {
            (_, 0..) => Submitted::Done(Ok(0)),
            (BlockIoKind::WriteZeroes, error)
                if error == -libc::EOPNOTSUPP || error == -libc::EINVAL =>
            {
                self.zero_range_refused.store(true, Ordering::Relaxed);
                // SAFETY: forwarded from our caller.
                unsafe { self.write_zeroes(request, io, ring) }
            }
            (BlockIoKind::Discard, error) if error == -libc::EOPNOTSUPP => {
                Submitted::Done(Err(BackendError::Unsupported))
            }
            (_, error) => {
                Submitted::Done(Err(BackendError::Io(io::Error::from_raw_os_error(-error))))
            }
        }
    }
}

/// The process-wide, page-aligned buffer of zeroes that WRITE_ZEROES falls back to.
fn zero_buffer() -> *const u8 {
    struct ZeroBuffer(*const u8);
    // SAFETY: the buffer is never written after initialisation and never freed.
    unsafe impl Send for ZeroBuffer {}
    // SAFETY: as above; shared read-only access only.
    unsafe impl Sync for ZeroBuffer {}
    static ZEROES: OnceLock<ZeroBuffer> = OnceLock::new();
    ZEROES
        .get_or_init(|| {
            let layout = std::alloc::Layout::from_size_align(ZERO_CHUNK_BYTES, 4096)
                .expect("constant layout");
            // SAFETY: the layout has a non-zero size.
            let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
            if buffer.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            ZeroBuffer(buffer)
        })
        .0
}

/// A disk without storage: reads return zeroes, writes are dropped, every request completes
/// at once or after a fixed latency (an io_uring timeout, so the worker keeps serving others).
#[derive(Debug)]
pub struct NullDisk {
    size: u64,
    latency: Option<types::Timespec>,
}

impl NullDisk {
    pub fn new(size: u64, latency: Option<Duration>) -> Self {
        let latency = latency.filter(|latency| !latency.is_zero()).map(|latency| {
            types::Timespec::new()
                .sec(latency.as_secs())
                .nsec(latency.subsec_nanos())
        });
        NullDisk { size, latency }
    }

    /// # Safety
    ///
    /// As [`BlockBackend::submit`].
    unsafe fn submit(&self, request: u32, io: &mut BlockIo, ring: &mut IoSubmitter) -> Submitted {
        if io.kind == BlockIoKind::Read {
            for iovec in &io.iovecs {
                // SAFETY: the caller guarantees the iovecs designate writable host memory
                // (guest RAM) for their whole length.
                unsafe { std::ptr::write_bytes(iovec.iov_base.cast::<u8>(), 0, iovec.iov_len) };
            }
        }
        match &self.latency {
            None => Submitted::Done(Ok(io.len)),
            Some(latency) => {
                let entry = opcode::Timeout::new(latency).build();
                // SAFETY: the timespec lives in this backend, which the queue handler keeps
                // alive (through its Arc) until the completion; the kernel copies it on submit.
                unsafe { ring.push(request, entry) };
                Submitted::Pending
            }
        }
    }

    fn complete(&self, io: &BlockIo, result: i32) -> Submitted {
        // A pure timeout completes with -ETIME when it expires.
        if result == -libc::ETIME || result >= 0 {
            Submitted::Done(Ok(io.len))
        } else {
            Submitted::Done(Err(BackendError::Io(io::Error::from_raw_os_error(-result))))
        }
    }
}

/// Where a disk's blocks live.
#[derive(Debug)]
enum Store {
    RawFile(RawFile),
    Null(NullDisk),
}

/// A disk's storage, and the faults injected in front of it.
#[derive(Debug)]
pub struct BlockBackend {
    store: Store,
    faults: Arc<Faults>,
}

impl BlockBackend {
    /// Opens a raw image; `direct` bypasses the host page cache (O_DIRECT).
    pub fn open_raw_file(path: &Path, direct: bool, read_only: bool) -> Result<Self, BackendError> {
        RawFile::open(path, direct, read_only).map(|file| Self::from_store(Store::RawFile(file)))
    }

    pub fn null(size: u64, latency: Option<Duration>) -> Self {
        Self::from_store(Store::Null(NullDisk::new(size, latency)))
    }

    fn from_store(store: Store) -> Self {
        BlockBackend {
            store,
            faults: Arc::new(Faults::default()),
        }
    }

    /// Shares `faults` (settable at run time) with this backend.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Self {
        self.faults = faults;
        self
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match &self.store {
            Store::RawFile(file) => file.size,
            Store::Null(null) => null.size,
        }
    }

    /// The backend itself refuses writes (a raw file opened read-only).
    pub fn read_only(&self) -> bool {
        match &self.store {
            Store::RawFile(file) => file.read_only,
            Store::Null(_) => false,
        }
    }

    /// Starts `io` for `request` of the queue that owns `ring`.
    ///
    /// # Safety
    ///
    /// Until the backend reports the operation done (from this call or from `complete`), or
    /// the queue has been removed from the pool: `io` must not be dropped or modified (moving
    /// it is fine: the kernel sees only its heap-allocated iovec array), and every buffer its
    /// iovecs designate must stay valid host memory, writable for reads.
    pub unsafe fn submit(
        &self,
        request: u32,
        io: &mut BlockIo,
        ring: &mut IoSubmitter,
    ) -> Submitted {
        match self.faults.decide(io.kind, io.offset, io.len) {
            // SAFETY: forwarded from our caller.
            Fault::None => unsafe { self.submit_to_store(request, io, ring) },
            Fault::Fail { persistent } => {
                Submitted::Done(Err(BackendError::Injected { persistent }))
            }
            // Nothing goes to the ring: the request stays pending until its queue is removed.
            Fault::Stick => Submitted::Pending,
            Fault::Delay(delay) => {
                let timespec = io.delay.get_or_insert_with(Default::default);
                **timespec = types::Timespec::new()
                    .sec(delay.as_secs())
                    .nsec(delay.subsec_nanos());
                let entry = opcode::Timeout::new(&**timespec).build();
                io.delaying = true;
                // SAFETY: the timespec is boxed in `io`, which the caller keeps alive and
                // unmodified until the completion; the kernel copies it on submit.
                unsafe { ring.push(request, entry) };
                Submitted::Pending
            }
        }
    }

    /// # Safety
    ///
    /// As [`BlockBackend::submit`].
    unsafe fn submit_to_store(
        &self,
        request: u32,
        io: &mut BlockIo,
        ring: &mut IoSubmitter,
    ) -> Submitted {
        match &self.store {
            // SAFETY: forwarded from our caller.
            Store::RawFile(file) => unsafe { file.submit(request, io, ring) },
            // SAFETY: forwarded from our caller.
            Store::Null(null) => unsafe { null.submit(request, io, ring) },
        }
    }

    /// Takes the completion `result` of the pending operation `io`; the operation may continue
    /// (a short transfer, a fallback) and stay pending.
    ///
    /// # Safety
    ///
    /// As for [`BlockBackend::submit`].
    pub unsafe fn complete(
        &self,
        request: u32,
        io: &mut BlockIo,
        result: i32,
        ring: &mut IoSubmitter,
    ) -> Submitted {
        if std::mem::take(&mut io.delaying) {
            // The injected delay is over: now the operation itself.
            // SAFETY: forwarded from our caller.
            return unsafe { self.submit_to_store(request, io, ring) };
        }
        match &self.store {
            // SAFETY: forwarded from our caller.
            Store::RawFile(file) => unsafe { file.complete(request, io, result, ring) },
            Store::Null(null) => null.complete(io, result),
        }
    }
}
