//! End-to-end tests: a [`TestQueue`] plays the guest driver against a real [`Block`] on a real
//! [`IoPool`], with a counting interrupt.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::latency::{assert_only_the_backend_phase_is_slow, Phase};
use crate::virtio::testing::{Buffer, FakeInterrupt, TestQueue, UsedElement};

const REGION_BYTES: u64 = 64 << 20;
/// Two adjacent regions, so buffers can straddle a region boundary.
const REGION_BOUNDARY: u64 = REGION_BYTES;
const RINGS_BASE: u64 = 0x1_0000;
const RING_AREA_BYTES: u64 = 0x1_0000;
/// Per-request scratch: header at +0, status at +16, indirect table at +64, data at +4096.
const AREAS_BASE: u64 = 8 << 20;
const AREA_BYTES: u64 = 8 << 10;
const AREAS_PER_QUEUE: u64 = 256;
const DATA_OFFSET: u64 = 4096;
const WAIT: Duration = Duration::from_secs(10);
const SERIAL: &str = "blkswarm-disk-0";

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_BYTES as usize),
        (GuestAddress(REGION_BOUNDARY), REGION_BYTES as usize),
    ])
    .unwrap()
}

/// A file under the system temp directory, removed on drop.
struct TempImage {
    path: PathBuf,
}

impl TempImage {
    fn new(dir: &std::path::Path, size: u64, fill: impl Fn(u64) -> u8) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "blkswarm-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = dir.join(name);
        let content: Vec<u8> = (0..size).map(&fill).collect();
        std::fs::write(&path, content).unwrap();
        TempImage { path }
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let file = OpenOptions::new().read(true).open(&self.path).unwrap();
        let mut buffer = vec![0u8; len];
        file.read_exact_at(&mut buffer, offset).unwrap();
        buffer
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

struct Options {
    num_queues: u16,
    queue_size: u16,
    read_only: bool,
    event_idx: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 64,
            read_only: false,
            event_idx: false,
        }
    }
}

struct Harness {
    memory: GuestMemoryMmap,
    block: Block,
    interrupt: Arc<FakeInterrupt>,
    queues: Vec<TestQueue>,
    /// Next scratch area per queue (rotating).
    next_area: Vec<u64>,
    options: Options,
    pool: Arc<IoPool>,
}

impl Harness {
    fn new(backend: BlockBackend, options: Options) -> Self {
        Self::with_pool(Arc::new(IoPool::new(2).unwrap()), backend, options)
    }

    fn with_pool(pool: Arc<IoPool>, backend: BlockBackend, options: Options) -> Self {
        let block = Block::new(
            BlockConfig {
                backend,
                num_queues: options.num_queues,
                queue_size: options.queue_size,
                read_only: options.read_only,
                serial: SERIAL.into(),
            },
            pool.clone(),
        )
        .unwrap();
        let mut harness = Harness {
            memory: memory(),
            block,
            interrupt: FakeInterrupt::new(options.num_queues),
            queues: Vec::new(),
            next_area: vec![0; usize::from(options.num_queues)],
            options,
            pool,
        };
        harness.activate();
        harness
    }

    /// Fresh rings and a fresh interrupt, then DRIVER_OK.
    fn activate(&mut self) {
        self.interrupt = FakeInterrupt::new(self.options.num_queues);
        self.queues = (0..self.options.num_queues)
            .map(|index| {
                let base = GuestAddress(RINGS_BASE + RING_AREA_BYTES * u64::from(index));
                TestQueue::new(
                    &self.memory,
                    base,
                    self.options.queue_size,
                    self.options.event_idx,
                )
            })
            .collect();
        let active = (0u16..)
            .zip(&self.queues)
            .map(|(index, queue)| queue.active_queue(index))
            .collect();
        let features = self.block.device_features();
        self.block
            .activate(
                self.memory.clone(),
                features,
                self.interrupt.clone(),
                active,
            )
            .unwrap();
    }

    fn area(&mut self, queue: u16) -> GuestAddress {
        let next = &mut self.next_area[usize::from(queue)];
        let slot = *next % AREAS_PER_QUEUE;
        *next += 1;
        GuestAddress(AREAS_BASE + (u64::from(queue) * AREAS_PER_QUEUE + slot) * AREA_BYTES)
    }

    /// Writes a header and a poisoned status byte in `area`; returns the header and status
    /// buffers.
    fn header(&self, area: GuestAddress, request_type: u32, sector: u64) -> (Buffer, Buffer) {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.memory.write_slice(&header, area).unwrap();
        let status = area.unchecked_add(16);
        self.memory.write_obj(0xffu8, status).unwrap();
        (Buffer::readable(area, 16), Buffer::writable(status, 1))
    }

    fn status(&self, area: GuestAddress) -> u8 {
        self.memory.read_obj(area.unchecked_add(16)).unwrap()
    }

    /// Publishes `buffers` on `queue`, kicks, and waits for the used element.
    fn run_chain(&mut self, queue: u16, buffers: &[Buffer]) -> UsedElement {
        let q = &mut self.queues[usize::from(queue)];
        let head = q.add_chain(buffers);
        q.publish(head);
        q.kick();
        let used = q.wait_used(1, WAIT)[0];
        assert_eq!(used.id, u32::from(head));
        used
    }

    /// A request with one data buffer of `len` bytes at the area's data offset.
    fn request(
        &mut self,
        queue: u16,
        request_type: u32,
        sector: u64,
        data: Option<(u32, bool)>,
    ) -> (UsedElement, u8, GuestAddress) {
        let area = self.area(queue);
        let (header, status) = self.header(area, request_type, sector);
        let mut buffers = vec![header];
        if let Some((len, device_writes)) = data {
            let addr = area.unchecked_add(DATA_OFFSET);
            buffers.push(Buffer {
                addr,
                len,
                device_writes,
            });
        }
        buffers.push(status);
        let used = self.run_chain(queue, &buffers);
        (used, self.status(area), area.unchecked_add(DATA_OFFSET))
    }

    fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let (used, status, data) = self.request(0, VIRTIO_BLK_T_IN, sector, Some((len, true)));
        if status == VIRTIO_BLK_S_OK {
            assert_eq!(used.len, len + 1);
        }
        let mut buffer = vec![0u8; len as usize];
        self.memory.read_slice(&mut buffer, data).unwrap();
        (status, buffer)
    }

    fn write(&mut self, sector: u64, content: &[u8]) -> u8 {
        let area = self.area(0);
        let data = area.unchecked_add(DATA_OFFSET);
        self.memory.write_slice(content, data).unwrap();
        let (header, status) = self.header(area, VIRTIO_BLK_T_OUT, sector);
        let used = self.run_chain(
            0,
            &[header, Buffer::readable(data, content.len() as u32), status],
        );
        assert_eq!(used.len, 1);
        self.status(area)
    }

    fn range_command(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let area = self.area(0);
        let segment_addr = area.unchecked_add(DATA_OFFSET);
        let mut segment = [0u8; 16];
        segment[0..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&sectors.to_le_bytes());
        segment[12..16].copy_from_slice(&flags.to_le_bytes());
        self.memory.write_slice(&segment, segment_addr).unwrap();
        let (header, status) = self.header(area, request_type, 0);
        let used = self.run_chain(0, &[header, Buffer::readable(segment_addr, 16), status]);
        assert_eq!(used.len, 1);
        self.status(area)
    }

    fn counters(&self) -> BlockCountersSnapshot {
        self.block.counters().snapshot()
    }

    /// Waits until queue `queue` has raised `interrupts` interrupts and its worker has ended
    /// the batch that raised the last: the used entry is published before the interrupt,
    /// and the batch's counters after it, so a test that saw the entry must wait for both.
    fn wait_interrupts(&self, queue: u16, interrupts: u64) {
        let latency = &self.block.queue_latency()[usize::from(queue)];
        assert!(
            eventually(|| latency.counts().interrupts >= interrupts),
            "queue {queue}: {} of {interrupts} interrupts",
            latency.counts().interrupts
        );
    }

    /// A good read still works (after a bad request).
    fn assert_still_serving(&mut self) {
        let (status, _) = self.read(0, 512);
        assert_eq!(status, VIRTIO_BLK_S_OK);
    }
}

fn raw_file(image: &TempImage, direct: bool, read_only: bool) -> BlockBackend {
    BlockBackend::open_raw_file(&image.path, direct, read_only).unwrap()
}

#[test]
fn features_and_config_space() {
    let pool = Arc::new(IoPool::new(1).unwrap());
    let block = Block::new(
        BlockConfig {
            backend: BlockBackend::null(1 << 30, None),
            num_queues: 4,
            queue_size: 128,
            read_only: false,
            serial: "x".into(),
        },
        pool.clone(),
    )
    .unwrap();
    let features = block.device_features();
    for feature in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(features & feature, 0, "{feature:#x}");
    }
    assert_eq!(features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(block.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(block.num_queues(), 4);
    assert_eq!(block.max_queue_size(), 128);
    let mut config = [0u8; CONFIG_SPACE_BYTES];
    block.read_config(0, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        1 << 21
    );
    assert_eq!(
        u32::from_le_bytes(config[8..12].try_into().unwrap()),
        MAX_SEGMENT_BYTES
    );
    assert_eq!(u32::from_le_bytes(config[12..16].try_into().unwrap()), 126);
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes([config[34], config[35]]), 4);

    let read_only = Block::new(
        BlockConfig {
            backend: BlockBackend::null(4096, None),
            num_queues: 1,
            queue_size: 8,
            read_only: true,
            serial: String::new(),
        },
        pool.clone(),
    )
    .unwrap();
    let features = read_only.device_features();
    assert_ne!(features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(
        features & (VIRTIO_BLK_F_MQ | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );

    let config = |num_queues, queue_size, serial: &str| BlockConfig {
        backend: BlockBackend::null(4096, None),
        num_queues,
        queue_size,
        read_only: false,
        serial: serial.into(),
    };
    assert_eq!(
        Block::new(config(0, 8, ""), pool.clone()).err(),
        Some(BlockError::NoQueues)
    );
    assert_eq!(
        Block::new(config(1, 100, ""), pool.clone()).err(),
        Some(BlockError::QueueSize(100))
    );
    assert!(matches!(
        Block::new(config(1, 8, "012345678901234567890"), pool.clone()),
        Err(BlockError::SerialTooLong(_))
    ));
}

#[test]
fn read_write_flush_on_a_raw_file() {
    let image = TempImage::new(&std::env::temp_dir(), 1 << 20, pattern);
    let mut harness = Harness::new(raw_file(&image, false, false), Options::default());
    assert_eq!(harness.block.capacity_sectors(), 2048);

    let (status, data) = harness.read(3, 4096);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data, image.read_at(3 * 512, 4096));

    let content: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(harness.write(100, &content), VIRTIO_BLK_S_OK);
    let (used, status, _) = harness.request(0, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!((used.len, status), (1, VIRTIO_BLK_S_OK));
    assert_eq!(image.read_at(100 * 512, 8192), content);
    // The last sector is addressable.
    let (status, _) = harness.read(2047, 512);
    assert_eq!(status, VIRTIO_BLK_S_OK);

    harness.wait_interrupts(0, 4);
    let counters = harness.counters();
    assert_eq!(counters.requests_in, 2);
    assert_eq!(counters.requests_out, 1);
    assert_eq!(counters.requests_flush, 1);
    assert_eq!(counters.bytes_read, 4096 + 512);
    assert_eq!(counters.bytes_written, 8192);
    assert_eq!(counters.errors(), 0);
    assert_eq!(counters.interrupts, 4);
    assert_eq!(harness.interrupt.count(0), 4);
}

#[test]
fn data_spanning_regions_and_descriptors() {
    let image = TempImage::new(&std::env::temp_dir(), 1 << 20, pattern);
    let mut harness = Harness::new(raw_file(&image, false, false), Options::default());
    // 3 KiB buffer straddling the two guest memory regions + a 1 KiB second descriptor.
    let first = GuestAddress(REGION_BOUNDARY - 1024);
    let second = GuestAddress(REGION_BOUNDARY + 0x10_0000);
    let area = harness.area(0);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, 8);
    let used = harness.run_chain(
        0,
        &[
            header,
            Buffer::writable(first, 3072),
            Buffer::writable(second, 1024),
            status,
        ],
    );
    assert_eq!(used.len, 4097);
    assert_eq!(harness.status(area), VIRTIO_BLK_S_OK);
    let mut data = vec![0u8; 4096];
    harness.memory.read_slice(&mut data[..3072], first).unwrap();
    harness
        .memory
        .read_slice(&mut data[3072..], second)
        .unwrap();
    assert_eq!(data, image.read_at(8 * 512, 4096));
}

#[test]
fn get_id_returns_the_padded_serial() {
    let mut harness = Harness::new(BlockBackend::null(1 << 20, None), Options::default());
    let (used, status, data) = harness.request(0, VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
    assert_eq!((used.len, status), (21, VIRTIO_BLK_S_OK));
    let mut serial = [0xffu8; 20];
    harness.memory.read_slice(&mut serial, data).unwrap();
    let mut expected = [0u8; 20];
    expected[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    assert_eq!(serial, expected);
    assert_eq!(harness.counters().requests_get_id, 1);
}

#[test]
fn discard_and_write_zeroes_on_a_raw_file() {
    // ext4 or similar zeroes ranges itself; tmpfs refuses ZERO_RANGE and exercises the
    // write-zeroes fallback.
    let mut dirs = vec![std::env::temp_dir()];
    if std::path::Path::new("/dev/shm").is_dir() {
        dirs.push("/dev/shm".into());
    }
    for dir in dirs {
        let image = TempImage::new(&dir, 1 << 20, |_| 0xaa);
        let mut harness = Harness::new(raw_file(&image, false, false), Options::default());
        let zero_flag = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_WRITE_ZEROES, 16, 8, 0),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(image.read_at(16 * 512, 4096), vec![0; 4096], "{dir:?}");
        assert_eq!(image.read_at(15 * 512, 512), vec![0xaa; 512]);
        assert_eq!(image.read_at(24 * 512, 512), vec![0xaa; 512]);
        // Second time goes straight to the remembered method.
        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_WRITE_ZEROES, 40, 1, zero_flag),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(image.read_at(40 * 512, 512), vec![0; 512]);

        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_DISCARD, 64, 16, 0),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(image.read_at(64 * 512, 8192), vec![0; 8192], "{dir:?}");
        assert_eq!(std::fs::metadata(&image.path).unwrap().len(), 1 << 20);

        // Unmap on a discard is UNSUPP; too many sectors and out of range are IOERR.
        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_DISCARD, 0, 1, zero_flag),
            VIRTIO_BLK_S_UNSUPP
        );
        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_WRITE_ZEROES, 0, u32::MAX, 0),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            harness.range_command(VIRTIO_BLK_T_DISCARD, 2047, 2, 0),
            VIRTIO_BLK_S_IOERR
        );
        let counters = harness.counters();
        assert_eq!(counters.requests_discard, 3);
        assert_eq!(counters.requests_write_zeroes, 3);
        assert_eq!(counters.errors_unsupported, 1);
        assert_eq!(counters.errors_bad_segment, 1);
        assert_eq!(counters.errors_out_of_range, 1);
    }
}

#[test]
fn null_backend_reads_zeroes_and_drops_writes() {
    let mut harness = Harness::new(BlockBackend::null(1 << 30, None), Options::default());
    // Poison the data area the read will land in.
    let area = GuestAddress(AREAS_BASE + DATA_OFFSET);
    harness.memory.write_slice(&[0x5a; 4096], area).unwrap();
    let (status, data) = harness.read(12345, 4096);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data, vec![0; 4096]);
    assert_eq!(harness.write(7, &[1u8; 1024]), VIRTIO_BLK_S_OK);
    let (_, status, _) = harness.request(0, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(
        harness.range_command(VIRTIO_BLK_T_DISCARD, 0, 8, 0),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(harness.counters().errors(), 0);
}

#[test]
fn null_latency_completes_after_the_latency_not_before() {
    let latency = Duration::from_millis(60);
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, Some(latency)),
        Options::default(),
    );
    let area = harness.area(0);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, 0);
    let data = Buffer::writable(area.unchecked_add(DATA_OFFSET), 512);
    let start = Instant::now();
    let q = &mut harness.queues[0];
    let head = q.add_chain(&[header, data, status]);
    q.publish(head);
    q.kick();
    std::thread::sleep(Duration::from_millis(20));
    assert!(q.pop_used().is_none(), "completed before the latency");
    let used = q.wait_used(1, WAIT)[0];
    let elapsed = start.elapsed();
    assert!(elapsed >= latency, "{elapsed:?}");
    assert_eq!(used.len, 513);
    assert_eq!(harness.status(area), VIRTIO_BLK_S_OK);
    // The worker is not blocked meanwhile: many requests overlap their latencies.
    let start = Instant::now();
    let q = &mut harness.queues[0];
    for _ in 0..32 {
        let head = q.add_chain(&[header, status]);
        q.publish(head);
    }
    q.kick();
    q.wait_used(32, WAIT);
    assert!(start.elapsed() < latency * 8, "{:?}", start.elapsed());
}

#[test]
fn event_idx_interrupts_only_when_used_event_is_passed() {
    const REQUESTS: u16 = 8;
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, None),
        Options {
            event_idx: true,
            ..Options::default()
        },
    );
    // Interrupt only once the 8th used entry (index 7) is written.
    harness.queues[0].set_used_event(REQUESTS - 1);
    for sent in 1..=REQUESTS {
        let area = harness.area(0);
        let (header, status) = harness.header(area, VIRTIO_BLK_T_FLUSH, 0);
        let q = &mut harness.queues[0];
        let head = q.add_chain(&[header, status]);
        q.publish(head);
        // The device asked for a kick at every new entry (avail_event = next avail).
        assert!(q.kick_if_needed());
        q.wait_used(1, WAIT);
        assert_eq!(q.avail_event(), sent);
        let expected = u64::from(sent == REQUESTS);
        harness.wait_interrupts(0, expected);
        assert_eq!(harness.interrupt.count(0), expected, "after {sent}");
    }
    let counters = harness.counters();
    assert_eq!(counters.interrupts, 1);
    assert_eq!(counters.interrupts_suppressed, u64::from(REQUESTS) - 1);

    // Without EVENT_IDX every completion batch interrupts.
    let mut harness = Harness::new(BlockBackend::null(1 << 20, None), Options::default());
    for _ in 0..REQUESTS {
        harness.request(0, VIRTIO_BLK_T_FLUSH, 0, None);
    }
    harness.wait_interrupts(0, u64::from(REQUESTS));
    assert_eq!(harness.interrupt.count(0), u64::from(REQUESTS));
    assert_eq!(harness.counters().interrupts_suppressed, 0);
}

#[test]
fn a_full_ring_is_served_in_budgeted_passes() {
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, None),
        Options {
            queue_size: 16,
            ..Options::default()
        },
    );
    let area = harness.area(0);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_FLUSH, 0);
    let table = area.unchecked_add(64);
    // The activation pass first (a worker that starts late would otherwise find the chains
    // there and take the kick with them).
    assert!(eventually(|| harness.counters().queue_notifications == 1));
    let q = &mut harness.queues[0];
    // Sixteen one-descriptor (indirect) chains fill the ring; they share one table. The pass
    // that pops the 16th has spent its budget, so the worker comes back without a kick.
    for _ in 0..16 {
        let head = q.add_indirect_chain(table, &[header, status]);
        q.publish(head);
    }
    q.kick();
    q.wait_used(16, WAIT);
    // The continuation may follow the last used entry, and the interrupt its count.
    eventually(|| harness.counters().queue_notifications >= 3);
    eventually(|| harness.interrupt.count(0) == harness.counters().interrupts);
    let counters = harness.counters();
    assert_eq!(counters.requests_flush, 16);
    assert_eq!(counters.errors(), 0);
    assert_eq!(harness.interrupt.count(0), counters.interrupts);
    assert!(counters.interrupts >= 1);
    // Activation, the kick, and the continuation.
    assert_eq!(counters.queue_notifications, 3, "{counters:?}");
}

/// Polls `condition` until it holds or [`WAIT`] passes; whether it held.
fn eventually(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn indirect_descriptors() {
    let image = TempImage::new(&std::env::temp_dir(), 1 << 20, pattern);
    let mut harness = Harness::new(raw_file(&image, false, false), Options::default());
    let area = harness.area(0);
    let table = area.unchecked_add(64);
    let data = area.unchecked_add(DATA_OFFSET);
    let content = [0x42u8; 2048];
    harness.memory.write_slice(&content, data).unwrap();
    let (header, status) = harness.header(area, VIRTIO_BLK_T_OUT, 4);
    let q = &mut harness.queues[0];
    let head = q.add_indirect_chain(
        table,
        &[
            header,
            Buffer::readable(data, 1024),
            Buffer::readable(data.unchecked_add(1024), 1024),
            status,
        ],
    );
    q.publish(head);
    q.kick();
    let used = q.wait_used(1, WAIT)[0];
    assert_eq!((used.id, used.len), (u32::from(head), 1));
    assert_eq!(harness.status(area), VIRTIO_BLK_S_OK);
    assert_eq!(image.read_at(4 * 512, 2048), content);

    // Read it back through an indirect table too.
    let area = harness.area(0);
    let table = area.unchecked_add(64);
    let data = area.unchecked_add(DATA_OFFSET);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, 4);
    let q = &mut harness.queues[0];
    let head = q.add_indirect_chain(table, &[header, Buffer::writable(data, 2048), status]);
    q.publish(head);
    q.kick();
    assert_eq!(q.wait_used(1, WAIT)[0].len, 2049);
    let mut back = [0u8; 2048];
    harness.memory.read_slice(&mut back, data).unwrap();
    assert_eq!(back, content);
}

/// One malformed request: what the guest gets back and which counter moves.
fn bad_request_case(
    name: &str,
    read_only: bool,
    build: impl FnOnce(&mut Harness, GuestAddress) -> u16,
    expected_status: Option<u8>,
    counter: impl Fn(&BlockCountersSnapshot) -> u64,
) {
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, None),
        Options {
            read_only,
            ..Options::default()
        },
    );
    let area = harness.area(0);
    let head = build(&mut harness, area);
    let q = &mut harness.queues[0];
    q.publish(head);
    q.kick();
    let used = q.wait_used(1, WAIT)[0];
    assert_eq!(used.id, u32::from(head), "{name}");
    match expected_status {
        Some(status) => {
            assert_eq!(used.len, 1, "{name}");
            assert_eq!(harness.status(area), status, "{name}");
        }
        None => {
            assert_eq!(used.len, 0, "{name}");
            assert_eq!(harness.status(area), 0xff, "{name}: status written");
        }
    }
    harness.wait_interrupts(0, 1);
    let counters = harness.counters();
    assert_eq!(counter(&counters), 1, "{name}: {counters:?}");
    assert_eq!(counters.errors(), 1, "{name}: {counters:?}");
    assert_eq!(harness.interrupt.count(0), 1, "{name}");
    harness.assert_still_serving();
}

#[test]
fn bad_requests_fail_cleanly_and_the_device_keeps_serving() {
    let ioerr = Some(VIRTIO_BLK_S_IOERR);
    let data = |area: GuestAddress| area.unchecked_add(DATA_OFFSET);

    bad_request_case(
        "header only",
        false,
        |h, area| {
            let (header, _) = h.header(area, VIRTIO_BLK_T_IN, 0);
            h.queues[0].add_chain(&[header])
        },
        None,
        |c| c.errors_missing_status,
    );
    bad_request_case(
        "status not writable",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].add_chain(&[header, Buffer::readable(status.addr, 1)])
        },
        None,
        |c| c.errors_missing_status,
    );
    bad_request_case(
        "short header",
        false,
        |h, area| {
            let (_, status) = h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].add_chain(&[Buffer::readable(area, 8), status])
        },
        ioerr,
        |c| c.errors_bad_header,
    );
    bad_request_case(
        "writable header",
        false,
        |h, area| {
            let (_, status) = h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].add_chain(&[Buffer::writable(area, 16), status])
        },
        ioerr,
        |c| c.errors_bad_header,
    );
    bad_request_case(
        "read into a device-readable buffer",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            h.queues[0].add_chain(&[header, Buffer::readable(data(area), 512), status])
        },
        ioerr,
        |c| c.errors_bad_direction,
    );
    bad_request_case(
        "write from a device-writable buffer",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_OUT, 0);
            h.queues[0].add_chain(&[header, Buffer::writable(data(area), 512), status])
        },
        ioerr,
        |c| c.errors_bad_direction,
    );
    bad_request_case(
        "sector beyond capacity",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 2048);
            h.queues[0].add_chain(&[header, Buffer::writable(data(area), 512), status])
        },
        ioerr,
        |c| c.errors_out_of_range,
    );
    bad_request_case(
        "range crossing the end",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 2047);
            h.queues[0].add_chain(&[header, Buffer::writable(data(area), 1024), status])
        },
        ioerr,
        |c| c.errors_out_of_range,
    );
    bad_request_case(
        "sector overflowing u64 bytes",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, u64::MAX / 256);
            h.queues[0].add_chain(&[header, Buffer::writable(data(area), 512), status])
        },
        ioerr,
        |c| c.errors_out_of_range,
    );
    bad_request_case(
        "length not a multiple of 512",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            h.queues[0].add_chain(&[header, Buffer::writable(data(area), 1000), status])
        },
        ioerr,
        |c| c.errors_bad_length,
    );
    bad_request_case(
        "descriptor loop",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            let q = &h.queues[0];
            // 0 -> 1 -> 2 -> 1 -> ...: the "status" descriptor points back at the data.
            q.write_descriptor(0, header.addr, 16, 1, 1);
            q.write_descriptor(1, data(area), 512, 1 | 2, 2);
            q.write_descriptor(2, status.addr, 1, 1 | 2, 1);
            0
        },
        None,
        |c| c.errors_bad_chain,
    );
    bad_request_case(
        "next index beyond the queue",
        false,
        |h, area| {
            let (header, _) = h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].write_descriptor(0, header.addr, 16, 1, 1000);
            0
        },
        None,
        |c| c.errors_bad_chain,
    );
    bad_request_case(
        "data outside guest RAM",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            let outside = GuestAddress(2 * REGION_BYTES + 0x1000);
            h.queues[0].add_chain(&[header, Buffer::writable(outside, 512), status])
        },
        ioerr,
        |c| c.errors_bad_address,
    );
    bad_request_case(
        "data running off the end of guest RAM",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            let tail = GuestAddress(2 * REGION_BYTES - 512);
            h.queues[0].add_chain(&[header, Buffer::writable(tail, 1024), status])
        },
        ioerr,
        |c| c.errors_bad_address,
    );
    bad_request_case(
        "header outside guest RAM",
        false,
        |h, area| {
            let (_, status) = h.header(area, VIRTIO_BLK_T_IN, 0);
            let outside = GuestAddress(1 << 40);
            h.queues[0].add_chain(&[Buffer::readable(outside, 16), status])
        },
        ioerr,
        |c| c.errors_bad_address,
    );
    bad_request_case(
        "status outside guest RAM",
        false,
        |h, area| {
            let (header, _) = h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].add_chain(&[header, Buffer::writable(GuestAddress(1 << 40), 1)])
        },
        None,
        |c| c.errors_missing_status,
    );
    bad_request_case(
        "unknown type",
        false,
        |h, area| {
            let (header, status) = h.header(area, 99, 0);
            h.queues[0].add_chain(&[header, status])
        },
        Some(VIRTIO_BLK_S_UNSUPP),
        |c| c.errors_unsupported,
    );
    bad_request_case(
        "write to a read-only disk",
        true,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_OUT, 0);
            h.queues[0].add_chain(&[header, Buffer::readable(data(area), 512), status])
        },
        ioerr,
        |c| c.errors_read_only,
    );
    bad_request_case(
        "discard on a read-only disk (not offered)",
        true,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_DISCARD, 0);
            h.queues[0].add_chain(&[header, Buffer::readable(data(area), 16), status])
        },
        Some(VIRTIO_BLK_S_UNSUPP),
        |c| c.errors_unsupported,
    );
    bad_request_case(
        "GET_ID into a device-readable buffer",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_GET_ID, 0);
            h.queues[0].add_chain(&[header, Buffer::readable(data(area), 20), status])
        },
        ioerr,
        |c| c.errors_bad_direction,
    );
    bad_request_case(
        "two discard segments",
        false,
        |h, area| {
            let (header, status) = h.header(area, VIRTIO_BLK_T_DISCARD, 0);
            h.memory.write_slice(&[0u8; 32], data(area)).unwrap();
            h.queues[0].add_chain(&[header, Buffer::readable(data(area), 32), status])
        },
        ioerr,
        |c| c.errors_bad_segment,
    );
    bad_request_case(
        "indirect table with a bad length",
        false,
        |h, area| {
            h.header(area, VIRTIO_BLK_T_FLUSH, 0);
            h.queues[0].write_descriptor(0, area.unchecked_add(64), 17, 4, 0);
            0
        },
        None,
        |c| c.errors_bad_chain,
    );
}

#[test]
fn hostile_ring_indices_do_not_wedge_the_device() {
    let mut harness = Harness::new(BlockBackend::null(1 << 20, None), Options::default());
    // A head beyond the queue: nothing can be returned, the device moves on.
    harness.queues[0].publish(1000);
    harness.queues[0].kick();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(harness.counters().used_ring_errors, 1);
    assert_eq!(harness.counters().errors_bad_chain, 1);
    harness.assert_still_serving();

    // An avail index more than a queue size ahead: counted, not spun on.
    let mut harness = Harness::new(BlockBackend::null(1 << 20, None), Options::default());
    harness.queues[0].set_avail_idx(500);
    harness.queues[0].kick();
    let deadline = Instant::now() + WAIT;
    while harness.counters().bad_avail_index == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(harness.queues[0].used_idx(), 0);
}

#[test]
fn direct_io_reads_writes_and_rejects_unaligned_buffers() {
    let image = TempImage::new(&std::env::temp_dir(), 1 << 20, pattern);
    let backend = match BlockBackend::open_raw_file(&image.path, true, false) {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("skipping: O_DIRECT not available in the temp dir: {error}");
            return;
        }
    };
    let mut harness = Harness::new(backend, Options::default());
    let (status, data) = harness.read(1, 4096);
    assert_eq!(status, VIRTIO_BLK_S_OK);
    assert_eq!(data, image.read_at(512, 4096));
    assert_eq!(harness.write(16, &[9u8; 1024]), VIRTIO_BLK_S_OK);
    assert_eq!(image.read_at(16 * 512, 1024), vec![9u8; 1024]);

    let area = harness.area(0);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, 0);
    let unaligned = Buffer::writable(area.unchecked_add(DATA_OFFSET + 8), 512);
    let used = harness.run_chain(0, &[header, unaligned, status]);
    assert_eq!(used.len, 1);
    assert_eq!(harness.status(area), VIRTIO_BLK_S_IOERR);
    assert_eq!(harness.counters().errors_unaligned, 1);
    harness.assert_still_serving();
}

#[test]
fn reset_with_requests_in_flight_drops_them_and_reactivation_works() {
    let latency = Duration::from_millis(300);
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, Some(latency)),
        Options {
            num_queues: 2,
            ..Options::default()
        },
    );
    for queue in 0..2u16 {
        for _ in 0..4 {
            let area = harness.area(queue);
            let (header, status) = harness.header(area, VIRTIO_BLK_T_FLUSH, 0);
            let q = &mut harness.queues[usize::from(queue)];
            let head = q.add_chain(&[header, status]);
            q.publish(head);
        }
        harness.queues[usize::from(queue)].kick();
    }
    // Let the workers pick the requests up and put their timeouts in the ring.
    let deadline = Instant::now() + WAIT;
    while harness.counters().requests_flush < 8 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    harness.block.reset();
    assert!(
        start.elapsed() < latency,
        "reset waited for the latency instead of cancelling: {:?}",
        start.elapsed()
    );
    assert_eq!(harness.block.active_queues(), 0);
    assert!(harness.pool.stats().iter().all(|stats| stats.queues == 0));
    std::thread::sleep(latency + Duration::from_millis(100));
    assert_eq!(harness.interrupt.total(), 0);
    assert_eq!(harness.queues[0].used_idx(), 0);
    assert_eq!(harness.queues[1].used_idx(), 0);
    // Kicks after reset reach nobody.
    harness.queues[0].kick();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(harness.queues[0].used_idx(), 0);

    harness.activate();
    let start = Instant::now();
    let (used, status, _) = harness.request(1, VIRTIO_BLK_T_FLUSH, 0, None);
    assert_eq!((used.len, status), (1, VIRTIO_BLK_S_OK));
    assert!(start.elapsed() >= latency);
    harness.wait_interrupts(1, 1);
    assert_eq!(harness.interrupt.count(1), 1);
    assert_eq!(harness.counters().stale_completions, 0);
    assert!(harness
        .pool
        .stats()
        .iter()
        .all(|stats| stats.stale_completions == 0));
}

#[test]
fn reset_waits_for_backend_io_in_flight() {
    let image = TempImage::new(&std::env::temp_dir(), 4 << 20, pattern);
    let mut harness = Harness::new(
        raw_file(&image, false, false),
        Options {
            queue_size: 256,
            ..Options::default()
        },
    );
    for i in 0..80u64 {
        let area = harness.area(0);
        let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, i * 8);
        let data = Buffer::writable(area.unchecked_add(DATA_OFFSET), 4096);
        let q = &mut harness.queues[0];
        let head = q.add_chain(&[header, data, status]);
        q.publish(head);
    }
    harness.queues[0].kick();
    harness.block.reset();
    // Whatever completed before the reset is in the used ring; nothing moves afterwards.
    let used = harness.queues[0].used_idx();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(harness.queues[0].used_idx(), used);
    assert!(harness.pool.stats().iter().all(|s| s.queues == 0));
}

#[test]
fn many_queues_on_fewer_workers() {
    let pool = Arc::new(IoPool::new(2).unwrap());
    let mut harnesses: Vec<Harness> = (0..3)
        .map(|_| {
            Harness::with_pool(
                pool.clone(),
                BlockBackend::null(1 << 30, None),
                Options {
                    num_queues: 4,
                    ..Options::default()
                },
            )
        })
        .collect();
    let stats = pool.stats();
    assert_eq!(stats.iter().map(|s| s.queues).sum::<usize>(), 12);
    assert_eq!(stats[0].queues, 6);
    for harness in &mut harnesses {
        for queue in 0..4u16 {
            for i in 0..50 {
                let (used, status, _) =
                    harness.request(queue, VIRTIO_BLK_T_IN, i, Some((512, true)));
                assert_eq!((used.len, status), (513, VIRTIO_BLK_S_OK));
            }
        }
        assert_eq!(harness.counters().requests_in, 200);
    }
    drop(harnesses);
    assert!(pool.stats().iter().all(|s| s.queues == 0));
}

/// Drives one queue like a Linux guest: keeps up to `depth` requests in flight, kicks only when
/// the device asks (EVENT_IDX avail_event), sleeps only on interrupts (used_event set to the
/// next entry), and fails if an interrupt does not come within the timeout. A lost kick or a
/// lost interrupt anywhere in the pool makes this time out.
fn drive_queue(
    memory: &GuestMemoryMmap,
    mut q: TestQueue,
    interrupt: &FakeInterrupt,
    queue: u16,
    area_base: u64,
    requests: u32,
    depth: u16,
) {
    let mut sent = 0u32;
    let mut done = 0u32;
    let mut in_flight = 0u16;
    let mut next_area = 0u64;
    while done < requests {
        while sent < requests && in_flight < depth {
            let area = GuestAddress(area_base + (next_area % u64::from(depth) * 64));
            next_area += 1;
            let mut header = [0u8; 16];
            let request_type = if sent.is_multiple_of(3) {
                VIRTIO_BLK_T_FLUSH
            } else {
                VIRTIO_BLK_T_GET_ID
            };
            header[0..4].copy_from_slice(&request_type.to_le_bytes());
            memory.write_slice(&header, area).unwrap();
            let head = if request_type == VIRTIO_BLK_T_FLUSH {
                q.add_chain(&[
                    Buffer::readable(area, 16),
                    Buffer::writable(area.unchecked_add(16), 1),
                ])
            } else {
                q.add_chain(&[
                    Buffer::readable(area, 16),
                    Buffer::writable(area.unchecked_add(24), 20),
                    Buffer::writable(area.unchecked_add(16), 1),
                ])
            };
            q.publish(head);
            sent += 1;
            in_flight += 1;
        }
        q.kick_if_needed();
        loop {
            let seen = interrupt.count(queue);
            // Ask for an interrupt at the next used entry, then look once more before sleeping.
            q.set_used_event(q.last_used());
            let mut reaped = 0;
            while q.pop_used().is_some() {
                reaped += 1;
            }
            if reaped > 0 {
                done += reaped;
                in_flight -= reaped as u16;
                break;
            }
            assert!(
                interrupt.wait_past(queue, seen, WAIT),
                "queue {queue}: no interrupt for {WAIT:?} with {in_flight} in flight, \
                 {done}/{requests} done: lost wake-up"
            );
        }
    }
}

#[test]
fn stress_no_lost_wakeups() {
    stress(Arc::new(IoPool::new(2).unwrap()), "multishot polls");
}

#[test]
fn stress_no_lost_wakeups_with_one_shot_polls() {
    stress(
        Arc::new(IoPool::with_one_shot_polls(2).unwrap()),
        "one-shot polls",
    );
}

fn stress(pool: Arc<IoPool>, label: &str) {
    const DEVICES: usize = 4;
    const QUEUES: u16 = 4;
    const REQUESTS_PER_QUEUE: u32 = 3000;
    const DEPTH: u16 = 16;
    let memory = memory();
    let mut blocks = Vec::new();
    let mut drivers = Vec::new();
    for device in 0..DEVICES {
        // Half the devices complete inline, half through io_uring timeouts.
        let latency = (device % 2 == 1).then_some(Duration::from_micros(20));
        let mut block = Block::new(
            BlockConfig {
                backend: BlockBackend::null(1 << 30, latency),
                num_queues: QUEUES,
                queue_size: 64,
                read_only: false,
                serial: format!("stress{device}"),
            },
            pool.clone(),
        )
        .unwrap();
        let interrupt = FakeInterrupt::new(QUEUES);
        let mut active = Vec::new();
        for queue in 0..QUEUES {
            let index = device * usize::from(QUEUES) + usize::from(queue);
            let base = GuestAddress(RINGS_BASE + RING_AREA_BYTES * index as u64);
            let q = TestQueue::new(&memory, base, 64, true);
            active.push(q.active_queue(queue));
            let area_base = AREAS_BASE + index as u64 * 0x1_0000;
            drivers.push((q, interrupt.clone(), queue, area_base));
        }
        let features = block.device_features();
        block
            .activate(memory.clone(), features, interrupt, active)
            .unwrap();
        blocks.push(block);
    }

    // Meanwhile, a device is reset and re-activated over and over on the same workers: the
    // control path races with the traffic.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let pool = pool.clone();
        let memory = memory.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut block = Block::new(
                BlockConfig {
                    backend: BlockBackend::null(1 << 20, None),
                    num_queues: 2,
                    queue_size: 16,
                    read_only: false,
                    serial: String::new(),
                },
                pool,
            )
            .unwrap();
            let mut cycles = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let interrupt = FakeInterrupt::new(2);
                let queues: Vec<TestQueue> = (0..2)
                    .map(|i| {
                        TestQueue::new(
                            &memory,
                            GuestAddress(RINGS_BASE + RING_AREA_BYTES * (40 + i)),
                            16,
                            false,
                        )
                    })
                    .collect();
                let active = (0u16..)
                    .zip(&queues)
                    .map(|(i, q)| q.active_queue(i))
                    .collect();
                block
                    .activate(memory.clone(), 0, interrupt, active)
                    .unwrap();
                for q in &queues {
                    q.notifier.write(1).unwrap();
                }
                block.reset();
                cycles += 1;
            }
            cycles
        })
    };

    let start = Instant::now();
    let threads: Vec<_> = drivers
        .into_iter()
        .map(|(q, interrupt, queue, area_base)| {
            let memory = memory.clone();
            std::thread::spawn(move || {
                drive_queue(
                    &memory,
                    q,
                    &interrupt,
                    queue,
                    area_base,
                    REQUESTS_PER_QUEUE,
                    DEPTH,
                )
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("driver thread failed");
    }
    stop.store(true, Ordering::SeqCst);
    let cycles = churn.join().unwrap();
    let elapsed = start.elapsed();

    let mut total = 0;
    for block in &blocks {
        let counters = block.counters().snapshot();
        assert_eq!(counters.errors(), 0, "{counters:?}");
        assert_eq!(counters.stale_completions, 0);
        total += counters.requests_flush + counters.requests_get_id;
    }
    assert_eq!(
        total,
        DEVICES as u64 * u64::from(QUEUES) * u64::from(REQUESTS_PER_QUEUE)
    );
    assert!(pool.stats().iter().all(|s| s.stale_completions == 0));
    eprintln!(
        "stress ({label}): {total} requests on {} queues over 2 workers in {elapsed:?}, \
         {cycles} reset/activate cycles alongside",
        DEVICES * usize::from(QUEUES)
    );
}

/// Histogram sample counts of queue 0, by phase.
fn phase_counts(harness: &Harness) -> Vec<(Phase, u64)> {
    let histograms = harness.block.queue_latency()[0]
        .histograms()
        .expect("timed requests");
    Phase::ALL
        .iter()
        .map(|&phase| (phase, histograms[phase.index()].len()))
        .collect()
}

#[test]
fn every_request_leaves_one_sample_in_each_phase_it_went_through() {
    const READS: u32 = 40;
    let mut harness = Harness::new(BlockBackend::null(1 << 20, None), Options::default());
    for sector in 0..READS {
        assert_eq!(harness.read(u64::from(sector), 512).0, VIRTIO_BLK_S_OK);
    }
    // Refused at parse: they count too, with empty submit and backend phases.
    for _ in 0..3 {
        let (_, status, _) = harness.request(0, 0xdead, 0, None);
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP);
    }
    let requests = u64::from(READS) + 3;
    harness.wait_interrupts(0, requests);
    let latency = &harness.block.queue_latency()[0];
    let counts = latency.counts();
    assert_eq!(counts.requests, requests);
    assert_eq!(counts.errors, 3, "the refused requests");
    // One per kick, plus the pool's first look at a queue it starts serving unless that
    // merged with the first kick.
    assert!(
        (requests..=requests + 1).contains(&counts.notifications),
        "{} notifications",
        counts.notifications
    );
    assert_eq!(counts.in_flight, 0);
    assert_eq!(counts.interrupts, harness.interrupt.count(0));
    for (phase, count) in phase_counts(&harness) {
        // Without EVENT_IDX every batch interrupts: the interrupt phase has them all too.
        assert_eq!(count, requests, "{phase:?}");
    }

    // With EVENT_IDX the driver asks for one interrupt per 8 completions: the others end at
    // their publication and add no interrupt sample.
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, None),
        Options {
            event_idx: true,
            ..Options::default()
        },
    );
    harness.queues[0].set_used_event(7);
    for _ in 0..8 {
        let area = harness.area(0);
        let (header, status) = harness.header(area, VIRTIO_BLK_T_FLUSH, 0);
        let q = &mut harness.queues[0];
        let head = q.add_chain(&[header, status]);
        q.publish(head);
        q.kick_if_needed();
        q.wait_used(1, WAIT);
    }
    let counts: Vec<(Phase, u64)> = phase_counts(&harness);
    for (phase, count) in counts {
        let want = if phase == Phase::Interrupt { 1 } else { 8 };
        assert_eq!(count, want, "{phase:?}");
    }
    let counts = harness.block.queue_latency()[0].counts();
    assert_eq!((counts.interrupts, counts.interrupts_suppressed), (1, 7));
    assert_eq!(counts.interrupts_coalesced(), 7);
}

#[test]
fn injected_backend_latency_shows_in_the_backend_phase_only() {
    const LATENCY_NS: u64 = 1_000_000;
    let mut harness = Harness::new(
        BlockBackend::null(1 << 20, Some(Duration::from_nanos(LATENCY_NS))),
        Options::default(),
    );
    for sector in 0..30 {
        assert_eq!(harness.read(sector, 4096).0, VIRTIO_BLK_S_OK);
    }
    let histograms = harness.block.queue_latency()[0]
        .histograms()
        .expect("timed requests");
    assert_only_the_backend_phase_is_slow(&histograms, LATENCY_NS);
}

fn faulty(settings: &[(&str, &str)]) -> (BlockBackend, Arc<crate::io::Faults>) {
    let mut fault_settings = crate::io::FaultSettings::default();
    for (key, value) in settings {
        fault_settings.set(key, value).unwrap();
    }
    let faults = Arc::new(crate::io::Faults::new(fault_settings, 1));
    (
        BlockBackend::null(1 << 20, None).with_faults(faults.clone()),
        faults,
    )
}

#[test]
fn injected_errors_fail_their_sectors_with_ioerr_and_are_counted() {
    let (backend, faults) = faulty(&[("error_sectors", "16-24")]);
    let mut harness = Harness::new(backend, Options::default());
    assert_eq!(harness.read(0, 4096).0, VIRTIO_BLK_S_OK);
    assert_eq!(harness.read(16, 512).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(harness.write(20, &[1; 512]), VIRTIO_BLK_S_IOERR);
    assert_eq!(harness.read(24, 512).0, VIRTIO_BLK_S_OK);
    assert_eq!(faults.counts().errors, 2);
    assert_eq!(harness.counters().errors_backend, 2);
    // Cleared at run time: the same sectors work again.
    faults.set(crate::io::FaultSettings::default());
    assert_eq!(harness.read(16, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn stuck_requests_never_complete_and_a_reset_still_works() {
    let (backend, faults) = faulty(&[("stuck_rate", "1")]);
    let mut harness = Harness::new(backend, Options::default());
    let area = harness.area(0);
    let (header, status) = harness.header(area, VIRTIO_BLK_T_IN, 0);
    let data = Buffer::writable(area.unchecked_add(DATA_OFFSET), 512);
    let q = &mut harness.queues[0];
    let head = q.add_chain(&[header, data, status]);
    q.publish(head);
    q.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert!(harness.queues[0].pop_used().is_none(), "stuck");
    assert_eq!(faults.counts().stuck, 1);
    assert_eq!(harness.block.queue_latency()[0].counts().in_flight, 1);
    // The driver gives up and resets the device: the stuck request goes with the queue.
    faults.set(crate::io::FaultSettings::default());
    harness.block.reset();
    harness.activate();
    assert_eq!(harness.block.queue_latency()[0].counts().in_flight, 0);
    assert_eq!(harness.read(0, 512).0, VIRTIO_BLK_S_OK);
}

#[test]
fn injected_read_latency_delays_reads_only() {
    let (backend, faults) = faulty(&[("read_latency", "fixed:20ms")]);
    let mut harness = Harness::new(backend, Options::default());
    let start = Instant::now();
    assert_eq!(harness.read(0, 512).0, VIRTIO_BLK_S_OK);
    assert!(start.elapsed() >= Duration::from_millis(20));
    assert_eq!(harness.write(0, &[7; 512]), VIRTIO_BLK_S_OK);
    let counts = faults.counts();
    assert_eq!((counts.delayed, counts.delay_ns), (1, 20_000_000));
    let backend_phase =
        &harness.block.queue_latency()[0].histograms().unwrap()[Phase::Backend.index()];
    assert_eq!(backend_phase.len(), 2);
    assert!(backend_phase.max() >= 19_800_000, "{}", backend_phase.max());
}

/// Publishes one request (header, one data buffer, status) on queue 0 without kicking;
/// returns its head.
fn publish_request(harness: &mut Harness, request_type: u32, sector: u64, data: Buffer) -> u16 {
    let area = harness.area(0);
    let (header, status) = harness.header(area, request_type, sector);
    let data = Buffer {
        addr: area.unchecked_add(DATA_OFFSET),
        ..data
    };
    let q = &mut harness.queues[0];
    let head = q.add_chain(&[header, data, status]);
    q.publish(head);
    head
}

#[test]
fn slow_writes_show_in_their_own_direction_beside_fast_reads() {
    use crate::latency::{Op, OpSample, OP_PHASES};
    const READS: u64 = 20;
    const WRITE_DELAY: Duration = Duration::from_millis(1000);
    let (backend, faults) = faulty(&[("write_latency", "fixed:1000ms")]);
    let mut harness = Harness::new(backend, Options::default());
    let latency = harness.block.queue_latency()[0].clone();
    // Two writes the backend holds for a second, then reads one after another beside them.
    let writes: Vec<u16> = (0..2)
        .map(|i| {
            publish_request(
                &mut harness,
                VIRTIO_BLK_T_OUT,
                i * 8,
                Buffer::readable(GuestAddress(0), 4096),
            )
        })
        .collect();
    let kicked = Instant::now();
    harness.queues[0].kick();
    let mut first_read_done = None;
    for sector in 0..READS {
        let head = publish_request(
            &mut harness,
            VIRTIO_BLK_T_IN,
            sector,
            Buffer::writable(GuestAddress(0), 512),
        );
        let q = &mut harness.queues[0];
        q.kick();
        let used = q.wait_used(1, WAIT);
        assert_eq!(used[0].id, u32::from(head), "a read, not a held write");
        first_read_done.get_or_insert_with(Instant::now);
    }
    std::thread::sleep(Duration::from_millis(50));
    // The writes were notified before the first read was fetched, after the kick.
    let waited = first_read_done.expect("reads").elapsed();
    let [reads, writes_now, other] = latency.in_flight_by_op();
    let after = kicked.elapsed();
    assert!(
        after < WRITE_DELAY,
        "the machine is too slow for this test: {after:?}"
    );
    assert_eq!(reads, OpSample::default(), "every read came back");
    assert_eq!(other, OpSample::default());
    assert_eq!(writes_now.count, 2, "both writes at the backend");
    let age = Duration::from_micros(u64::from(writes_now.oldest_us));
    assert!(
        age >= waited && age <= after,
        "oldest write {age:?}, between {waited:?} and {after:?}"
    );
    latency.sample_in_flight();

    let rest = harness.queues[0].wait_used(2, WAIT);
    let mut finished: Vec<u32> = rest.iter().map(|used| used.id).collect();
    finished.sort_unstable();
    assert_eq!(
        finished,
        writes
            .iter()
            .map(|&head| u32::from(head))
            .collect::<Vec<_>>()
    );
    harness.wait_interrupts(0, READS + 1);
    assert_eq!(faults.counts().delayed, 2);
    latency.sample_in_flight();
    assert_eq!(latency.in_flight_by_op(), [OpSample::default(); 3]);

    let all = latency.queue_histograms();
    let by_op = |op: Op| {
        all.by_op[op.index()]
            .as_ref()
            .expect("a direction that occurred")
    };
    assert!(all.by_op[Op::Other.index()].is_none());
    let phase = |phase: Phase| OP_PHASES.iter().position(|&p| p == phase).unwrap();
    let (backend, total) = (phase(Phase::Backend), phase(Phase::Total));
    let (reads, writes) = (by_op(Op::Read), by_op(Op::Write));
    assert_eq!((reads[total].len(), writes[total].len()), (READS, 2));
    assert_eq!((reads[backend].len(), writes[backend].len()), (READS, 2));
    let delay_ns = WRITE_DELAY.as_nanos() as u64;
    assert!(
        writes[backend].min() >= delay_ns * 99 / 100,
        "{}",
        writes[backend].min()
    );
    assert!(writes[total].min() >= writes[backend].min());
    // The reads were not held behind the writes.
    assert!(reads[total].max() < delay_ns / 2, "{}", reads[total].max());
    // And the merged histograms have them all.
    let phases = all.phases.expect("timed");
    assert_eq!(phases[Phase::Total.index()].len(), READS + 2);

    let series = latency.in_flight_series();
    let writes = series.by_op[Op::Write.index()]
        .as_ref()
        .expect("writes seen");
    let oldest_write = writes.max_oldest_us.iter().copied().max().unwrap_or(0);
    assert!(u64::from(oldest_write) >= age.as_micros() as u64);
    assert_eq!(writes.max_count.iter().copied().max(), Some(2));
    assert!(
        series.by_op[Op::Read.index()].is_none(),
        "no read was in flight at a tick"
    );
}
