//! I/O command set tests: the controller with its I/O queues served by a real I/O pool.
//! Completions arrive asynchronously; the driver polls CQ phase tags with a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::admin::*;
use super::nvm::*;
use super::registers::*;
use super::testing::*;
use super::{ControllerConfig, NamespaceConfig, NvmeConfigError, Status};
use crate::io::BlockBackend;
use crate::latency::{assert_only_the_backend_phase_is_slow, Phase, QueueLatency};

const BLOCK: u64 = 512;
/// Guest buffers for I/O data, away from queues (0x10_0000..) and the admin data buffer.
const WRITE_BUFFER: u64 = 0x40_0000;
const READ_BUFFER: u64 = 0x60_0000;
/// PRP lists.
const LIST_BASE: u64 = 0x80_0000;
/// Dataset Management ranges.
const RANGES_BASE: u64 = 0x81_0000;
/// Scattered data pages for PRP lists.
const SCATTER_BASE: u64 = 0x90_0000;
const BACKEND_BYTES: u64 = 8 << 20;

fn config_with(namespaces: Vec<NamespaceConfig>) -> ControllerConfig {
    ControllerConfig {
        namespaces,
        ..ControllerConfig::default()
    }
}

/// Enabled, with CQ 1 (vector 1) and SQ 1 of 64 entries.
fn with_queue_pair(config: ControllerConfig) -> TestDriver {
    let mut driver = TestDriver::new(config);
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 64, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
    driver
}

fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32, prp1: u64, prp2: u64) -> CommandBuilder {
    command(opcode)
        .nsid(nsid)
        .prp1(prp1)
        .prp2(prp2)
        .cdw(10, lba as u32)
        .cdw(11, (lba >> 32) as u32)
        .cdw(12, blocks - 1)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn put(driver: &TestDriver, address: u64, data: &[u8]) {
    driver
        .memory
        .write_slice(data, GuestAddress(address))
        .unwrap();
}

fn get(driver: &TestDriver, address: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    driver
        .memory
        .read_slice(&mut data, GuestAddress(address))
        .unwrap();
    data
}

fn write_list(driver: &TestDriver, at: u64, entries: &[u64]) {
    for (i, entry) in entries.iter().enumerate() {
        driver
            .memory
            .write_obj(entry.to_le(), GuestAddress(at + 8 * i as u64))
            .unwrap();
    }
}

/// How a transfer's buffer is described.
enum Layout {
    /// One buffer inside a page, at an offset.
    Prp1Only,
    /// Two pages: PRP1 at an offset, PRP2 the next page.
    Prp1AndPrp2,
    /// Sixteen scattered pages through a PRP list, in reverse address order.
    PrpList,
}

/// Writes `data` through `layout` at `lba`, reads it back the same way, returns what came
/// back from guest memory (the read buffers are poisoned first).
fn round_trip(driver: &mut TestDriver, layout: Layout, lba: u64, data: &[u8]) -> Vec<u8> {
    let blocks = (data.len() as u64 / BLOCK) as u32;
    let pages = |base: u64| -> Vec<u64> { (0..16).rev().map(|i| base + i * 2 * PAGE).collect() };
    let describe =
        |driver: &TestDriver, base: u64, list_at: u64| -> (u64, u64, Vec<(u64, usize)>) {
            match layout {
                Layout::Prp1Only => (base + 0x200, 0, vec![(base + 0x200, data.len())]),
                Layout::Prp1AndPrp2 => {
                    let first = (PAGE - 0x800) as usize;
                    (
                        base + 0x800,
                        base + 4 * PAGE,
                        vec![(base + 0x800, first), (base + 4 * PAGE, data.len() - first)],
                    )
                }
                Layout::PrpList => {
                    let pages = pages(base);
                    write_list(driver, list_at, &pages[1..]);
                    let chunks = pages.iter().map(|page| (*page, PAGE as usize)).collect();
                    (pages[0], list_at, chunks)
                }
            }
        };
    let (prp1, prp2, chunks) = describe(driver, WRITE_BUFFER, LIST_BASE);
    let mut at = 0;
    for (address, len) in &chunks {
        put(driver, *address, &data[at..at + len]);
        at += len;
    }
    let cqe = driver.io(1, 1, rw(OPC_WRITE, 1, lba, blocks, prp1, prp2).build());
    assert_eq!(cqe.status, Status::SUCCESS, "write");
    let (prp1, prp2, chunks) = describe(driver, READ_BUFFER, LIST_BASE + PAGE);
    for (address, len) in &chunks {
        put(driver, *address, &vec![0xEE; *len]);
    }
    let cqe = driver.io(1, 1, rw(OPC_READ, 1, lba, blocks, prp1, prp2).build());
    assert_eq!(cqe.status, Status::SUCCESS, "read");
    chunks
        .iter()
        .flat_map(|(address, len)| get(driver, *address, *len))
        .collect()
}

#[test]
fn write_then_read_back_through_every_prp_form_on_a_raw_file() {
    let image = TempImage::new(BACKEND_BYTES);
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(
        image.backend(false),
        1,
    )]));
    let cases = [
        (Layout::Prp1Only, 3, 1024),
        (Layout::Prp1AndPrp2, 40, 4096),
        (Layout::PrpList, 1000, 16 * 4096),
    ];
    let mut bytes = 0;
    for (seed, (layout, lba, len)) in cases.into_iter().enumerate() {
        let data = pattern(len, seed as u8);
        let back = round_trip(&mut driver, layout, lba, &data);
        assert!(back == data, "case {seed}: read back what was written");
        assert_eq!(
            image.read_at(lba * BLOCK, len),
            data,
            "case {seed}: the file holds it"
        );
        bytes += len as u64;
    }
    let stats = driver.controller.io_queue_stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].sq_id, stats[0].cq_id, stats[0].vector),
        (1, 1, Some(1))
    );
    assert_eq!(stats[0].commands, 6);
    assert_eq!(
        (stats[0].bytes_written, stats[0].bytes_read),
        (bytes, bytes)
    );
    assert_eq!(stats[0].errors, 0);
}

#[test]
fn null_backend_accepts_writes_and_reads_zeroes_through_every_prp_form() {
    let mut driver = with_queue_pair(config_with(vec![null_namespace(1 << 16, 1)]));
    for (layout, len) in [
        (Layout::Prp1Only, 512),
        (Layout::Prp1AndPrp2, 4096),
        (Layout::PrpList, 16 * 4096),
    ] {
        let back = round_trip(&mut driver, layout, 8, &pattern(len, 7));
        assert!(back.iter().all(|byte| *byte == 0), "{len} bytes of zeroes");
    }
    assert_eq!(driver.controller.io_queue_stats()[0].errors, 0);
}

#[test]
fn flush_and_write_through_writes() {
    let image = TempImage::new(BACKEND_BYTES);
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(
        image.backend(false),
        1,
    )]));
    let cqe = driver.io(1, 1, command(OPC_FLUSH).nsid(1).build());
    assert_eq!(cqe.status, Status::SUCCESS);
    // FUA writes, and all writes once the host turns the cache off, flush before completing.
    put(&driver, WRITE_BUFFER, &pattern(512, 1));
    let fua = rw(OPC_WRITE, 1, 0, 1, WRITE_BUFFER, 0)
        .cdw(12, FORCE_UNIT_ACCESS)
        .build();
    assert_eq!(driver.io(1, 1, fua).status, Status::SUCCESS);
    assert_eq!(
        driver.set_feature(FID_VOLATILE_WRITE_CACHE, 0).status,
        Status::SUCCESS
    );
    let write = rw(OPC_WRITE, 1, 1, 1, WRITE_BUFFER, 0).build();
    assert_eq!(driver.io(1, 1, write).status, Status::SUCCESS);
    assert_eq!(image.read_at(0, 512), pattern(512, 1));
    assert_eq!(image.read_at(512, 512), pattern(512, 1));
    // Flush of all namespaces is not supported (Identify VWC bits 2:1 = 10b).
    let all = driver.io(1, 1, command(OPC_FLUSH).nsid(u32::MAX).build());
    assert_eq!(all.status, Status::INVALID_NAMESPACE);
    assert_eq!(driver.identify(CNS_CONTROLLER, 0).1[525], 0b101);
}

#[test]
fn write_zeroes_reads_back_zeroes() {
    let image = TempImage::new(BACKEND_BYTES);
    image.write_at(0, &pattern(64 * 512, 9));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(
        image.backend(false),
        1,
    )]));
    let zeroes = command(OPC_WRITE_ZEROES)
        .nsid(1)
        .cdw(10, 8)
        .cdw(12, 16 - 1)
        .build();
    assert_eq!(driver.io(1, 1, zeroes).status, Status::SUCCESS);
    write_list(
        &driver,
        LIST_BASE,
        &[
            READ_BUFFER + PAGE,
            READ_BUFFER + 2 * PAGE,
            READ_BUFFER + 3 * PAGE,
        ],
    );
    let cqe = driver.io(1, 1, rw(OPC_READ, 1, 0, 32, READ_BUFFER, LIST_BASE).build());
    assert_eq!(cqe.status, Status::SUCCESS);
    let back = get(&driver, READ_BUFFER, 32 * 512);
    let expected = pattern(64 * 512, 9);
    assert_eq!(back[..8 * 512], expected[..8 * 512]);
    assert!(back[8 * 512..24 * 512].iter().all(|byte| *byte == 0));
    assert_eq!(back[24 * 512..], expected[24 * 512..32 * 512]);
    assert!(image.read_at(8 * 512, 16 * 512).iter().all(|b| *b == 0));
}

fn dsm_ranges(driver: &TestDriver, ranges: &[(u64, u32)]) {
    for (index, (lba, blocks)) in ranges.iter().enumerate() {
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&blocks.to_le_bytes());
        range[8..16].copy_from_slice(&lba.to_le_bytes());
        put(driver, RANGES_BASE + 16 * index as u64, &range);
    }
}

fn dsm(ranges: usize, attributes: u32) -> super::queue::SubmissionEntry {
    command(OPC_DATASET_MANAGEMENT)
        .nsid(1)
        .prp1(RANGES_BASE)
        .cdw(10, ranges as u32 - 1)
        .cdw(11, attributes)
        .build()
}

#[test]
fn dataset_management_deallocates_ranges_of_a_raw_file() {
    let image = TempImage::new(BACKEND_BYTES);
    let data = pattern(1 << 20, 3);
    image.write_at(0, &data);
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(
        image.backend(false),
        1,
    )]));
    // Page-sized, page-aligned ranges, so that any file system can punch them.
    dsm_ranges(&driver, &[(8, 8), (64, 0), (256, 24)]);
    assert_eq!(
        driver.io(1, 1, dsm(3, 0b011)).status,
        Status::SUCCESS,
        "hints only"
    );
    assert_eq!(image.read_at(0, 1 << 20), data, "hints change nothing");
    assert_eq!(
        driver.io(1, 1, dsm(3, DSM_ATTRIBUTE_DEALLOCATE)).status,
        Status::SUCCESS
    );
    let after = image.read_at(0, 1 << 20);
    let zero = |from: usize, blocks: usize| {
        after[from * 512..(from + blocks) * 512]
            .iter()
            .all(|b| *b == 0)
    };
    assert!(
        zero(8, 8) && zero(256, 24),
        "deallocated blocks read as zeroes"
    );
    assert_eq!(after[..8 * 512], data[..8 * 512]);
    assert_eq!(after[16 * 512..256 * 512], data[16 * 512..256 * 512]);
    assert_eq!(after[280 * 512..], data[280 * 512..]);
    // A range past the end fails the whole command before anything is deallocated.
    dsm_ranges(&driver, &[(0, 8), ((BACKEND_BYTES / 512) - 4, 8)]);
    assert_eq!(
        driver.io(1, 1, dsm(2, DSM_ATTRIBUTE_DEALLOCATE)).status,
        Status::LBA_OUT_OF_RANGE
    );
    assert_eq!(image.read_at(0, 4096), data[..4096]);
}

#[test]
fn hostile_commands_get_their_status_and_the_controller_stays_usable() {
    let image = TempImage::new(BACKEND_BYTES);
    let mut driver = with_queue_pair(ControllerConfig {
        mdts: 5,
        ..config_with(vec![
            NamespaceConfig::with_seed(image.backend(false), 1),
            NamespaceConfig::with_seed(image.backend(true), 2),
        ])
    });
    let blocks = BACKEND_BYTES / BLOCK;
    let read = |lba: u64, count: u32| rw(OPC_READ, 1, lba, count, READ_BUFFER, 0);
    write_list(
        &driver,
        LIST_BASE,
        &[READ_BUFFER + PAGE, READ_BUFFER + 0x2010],
    );
    let cases: Vec<(&str, super::queue::SubmissionEntry, Status)> = vec![
        (
            "opcode",
            command(0x7F).nsid(1).build(),
            Status::INVALID_OPCODE,
        ),
        (
            "opcode 0x04",
            command(0x04).nsid(1).build(),
            Status::INVALID_OPCODE,
        ),
        (
            "nsid 0",
            read(0, 1).nsid(0).build(),
            Status::INVALID_NAMESPACE,
        ),
        (
            "nsid 3",
            read(0, 1).nsid(3).build(),
            Status::INVALID_NAMESPACE,
        ),
        (
            "nsid all",
            read(0, 1).nsid(u32::MAX).build(),
            Status::INVALID_NAMESPACE,
        ),
        (
            "past the end",
            read(blocks - 1, 2).build(),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "lba overflow",
            read(u64::MAX, 2).build(),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "write zeroes past the end",
            command(OPC_WRITE_ZEROES)
                .nsid(1)
                .cdw(10, blocks as u32)
                .build(),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "above MDTS",
            rw(OPC_READ, 1, 0, 257, READ_BUFFER, LIST_BASE).build(),
            Status::INVALID_FIELD,
        ),
        (
            "PRP1 offset",
            rw(OPC_READ, 1, 0, 1, READ_BUFFER + 2, 0).build(),
            Status::PRP_OFFSET_INVALID,
        ),
        (
            "PRP2 offset",
            rw(OPC_READ, 1, 0, 8, READ_BUFFER + 0x800, READ_BUFFER + 0x1200).build(),
            Status::PRP_OFFSET_INVALID,
        ),
        (
            "misaligned list pointer",
            rw(OPC_READ, 1, 0, 24, READ_BUFFER, LIST_BASE + 4).build(),
            Status::PRP_OFFSET_INVALID,
        ),
        (
            "misaligned list entry",
            rw(OPC_READ, 1, 0, 24, READ_BUFFER, LIST_BASE).build(),
            Status::PRP_OFFSET_INVALID,
        ),
        (
            "PRP1 outside RAM",
            rw(OPC_READ, 1, 0, 1, MEMORY_BYTES, 0).build(),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "PRP2 outside RAM",
            rw(OPC_READ, 1, 0, 16, READ_BUFFER, MEMORY_BYTES + PAGE).build(),
            Status::DATA_TRANSFER_ERROR,
        ),
        (
            "write to read-only",
            rw(OPC_WRITE, 2, 0, 1, WRITE_BUFFER, 0).build(),
            Status::NAMESPACE_WRITE_PROTECTED,
        ),
        (
            "write zeroes to read-only",
            command(OPC_WRITE_ZEROES).nsid(2).build(),
            Status::NAMESPACE_WRITE_PROTECTED,
        ),
        (
            "deallocate on read-only",
            command(OPC_DATASET_MANAGEMENT)
                .nsid(2)
                .prp1(RANGES_BASE)
                .cdw(11, DSM_ATTRIBUTE_DEALLOCATE)
                .build(),
            Status::NAMESPACE_WRITE_PROTECTED,
        ),
        (
            "fused",
            read(0, 1).flags(1 << 8).build(),
            Status::INVALID_FIELD,
        ),
        (
            "SGL",
            read(0, 1).flags(1 << 14).build(),
            Status::INVALID_FIELD,
        ),
    ];
    let poisoned = vec![0xEE; 4 * PAGE as usize];
    put(&driver, READ_BUFFER, &poisoned);
    for (name, entry, expected) in &cases {
        let cqe = driver.io(1, 1, *entry);
        assert_eq!(cqe.status, *expected, "{name}");
    }
    assert_eq!(
        get(&driver, READ_BUFFER, poisoned.len()),
        poisoned,
        "failed reads transferred nothing"
    );
    let stats = driver.controller.io_queue_stats()[0];
    assert_eq!(stats.errors, cases.len() as u64);
    assert_eq!((stats.bytes_read, stats.bytes_written), (0, 0));
    // Reads of the read-only namespace work, and Identify says it is write protected.
    assert_eq!(
        driver.io(1, 1, read(0, 1).nsid(2).build()).status,
        Status::SUCCESS
    );
    assert_eq!(driver.identify(CNS_NAMESPACE, 2).1[99] & 1, 1);
    assert_eq!(driver.identify(CNS_NAMESPACE, 1).1[99] & 1, 0);
    assert_eq!(driver.identify(CNS_CONTROLLER, 0).1[77], 5, "MDTS");
    // Exactly MDTS is fine.
    let list: Vec<u64> = (1..32).map(|i| SCATTER_BASE + i * PAGE).collect();
    write_list(&driver, LIST_BASE, &list);
    let max = rw(OPC_READ, 1, 0, 256, SCATTER_BASE, LIST_BASE).build();
    assert_eq!(driver.io(1, 1, max).status, Status::SUCCESS);
    assert_eq!(driver.controller.counters().fatal_errors, 0);
    assert_eq!(driver.csts(), CSTS_RDY);
}

#[test]
fn io_doorbell_values_beyond_the_queue_are_refused() {
    let mut driver = with_queue_pair(config_with(vec![null_namespace(1 << 16, 1)]));
    let before = driver.controller.counters();
    driver.write32(Doorbell::SubmissionTail(1).offset(), 64);
    driver.write32(Doorbell::SubmissionTail(1).offset(), 0x1_0000);
    driver.write32(Doorbell::CompletionHead(1).offset(), 64);
    driver.write32(Doorbell::CompletionHead(1).offset(), 5); // Nothing posted yet.
    let after = driver.controller.counters();
    assert_eq!(
        after.invalid_doorbell_values - before.invalid_doorbell_values,
        4
    );
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        driver.controller.io_queue_stats()[0].commands,
        0,
        "nothing fetched"
    );
    let cqe = driver.io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
    assert_eq!(cqe.status, Status::SUCCESS, "the queue still works");
}

#[test]
fn full_completion_queue_stops_fetching_until_the_head_moves() {
    let mut driver = TestDriver::new(config_with(vec![null_namespace(1 << 16, 1)]));
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 4, 1), Status::SUCCESS); // Room for 3.
    assert_eq!(driver.create_sq(1, 16, 1), Status::SUCCESS);
    let ids: Vec<u16> = (0..8)
        .map(|_| driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), false))
        .collect();
    driver.ring_sq(1);
    let mut reaped: Vec<u16> = (0..3)
        .map(|_| driver.wait_quietly(1).expect("a completion").command_id)
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(driver.reap_quietly(1), None, "no fourth entry");
    let free_slot = get(&driver, TestDriver::cq_base(1) + 3 * 16, 16);
    assert!(
        free_slot.iter().all(|b| *b == 0),
        "the free slot stays free"
    );
    let stats = driver.controller.io_queue_stats()[0];
    assert_eq!(stats.commands, 3, "fetching stopped at the CQ's capacity");
    assert!(stats.completion_queue_full >= 1);
    driver.ring_cq(1);
    while reaped.len() < ids.len() {
        reaped.push(driver.wait(1).command_id);
    }
    assert_eq!(reaped, ids, "in order, none lost");
    assert_eq!(driver.controller.io_queue_stats()[0].commands, 8);
}

#[test]
fn two_submission_queues_share_a_small_completion_queue() {
    let mut driver = TestDriver::new(config_with(vec![null_namespace(1 << 16, 1)]));
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 5, 2), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 32, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(2, 32, 1), Status::SUCCESS);
    assert_eq!(driver.delete_cq(1), Status::INVALID_QUEUE_DELETION);
    let mut outstanding = std::collections::BTreeSet::new();
    let mut done = 0;
    for round in 0..10 {
        for sq in [1, 2] {
            for _ in 0..8 {
                let entry = rw(OPC_READ, 1, round, 1, READ_BUFFER, 0).build();
                outstanding.insert((sq, driver.queue_command(sq, entry, false)));
            }
            driver.ring_sq(sq);
        }
        while !outstanding.is_empty() {
            let cqe = driver.wait(1);
            assert_eq!(cqe.status, Status::SUCCESS);
            assert!(outstanding.remove(&(cqe.sq_id, cqe.command_id)), "{cqe:?}");
            done += 1;
        }
    }
    assert_eq!(done, 160);
    let stats = driver.controller.io_queue_stats();
    assert_eq!(stats.iter().map(|s| s.commands).sum::<u64>(), 160);
    assert!(stats.iter().all(|s| (s.cq_id, s.vector) == (1, Some(2))));
}

#[test]
fn delete_queues_in_order_with_io_in_flight() {
    let slow = Arc::new(BlockBackend::null(1 << 20, Some(Duration::from_secs(2))));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(slow, 1)]));
    for _ in 0..4 {
        driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), false);
    }
    driver.ring_sq(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        driver.delete_cq(1),
        Status::INVALID_QUEUE_DELETION,
        "SQ 1 bound"
    );
    let started = Instant::now();
    assert_eq!(driver.delete_sq(1), Status::SUCCESS);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "in-flight operations are cancelled, not waited for"
    );
    assert!(driver.pool.stats().iter().all(|worker| worker.queues == 0));
    assert_eq!(driver.delete_cq(1), Status::SUCCESS);
    let before = driver.controller.counters().invalid_doorbell_registers;
    driver.write32(Doorbell::SubmissionTail(1).offset(), 1);
    driver.write32(Doorbell::CompletionHead(1).offset(), 1);
    assert_eq!(
        driver.controller.counters().invalid_doorbell_registers,
        before + 2
    );
    assert!(driver.controller.io_queue_stats().is_empty());
    // The ids are free again and the new pair works (with a fast namespace read of 0 blocks
    // being impossible, use a Dataset Management hint, which needs no backend).
    assert_eq!(driver.create_cq(1, 8, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 8, 1), Status::SUCCESS);
    dsm_ranges(&driver, &[(0, 1)]);
    assert_eq!(driver.io(1, 1, dsm(1, 0)).status, Status::SUCCESS);
}

#[test]
fn controller_reset_with_io_in_flight_then_io_works_again() {
    let latency = Duration::from_millis(500);
    let slow = Arc::new(BlockBackend::null(1 << 20, Some(latency)));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(slow, 1)]));
    assert_eq!(driver.create_cq(2, 8, 2), Status::SUCCESS);
    assert_eq!(driver.create_sq(2, 8, 2), Status::SUCCESS);
    for sq in [1, 2] {
        for _ in 0..3 {
            driver.queue_command(sq, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), false);
        }
        driver.ring_sq(sq);
    }
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    driver.disable();
    assert!(started.elapsed() < latency, "reset cancels in-flight I/O");
    assert_eq!(driver.csts(), 0);
    assert!(driver.pool.stats().iter().all(|worker| worker.queues == 0));
    // Nothing of the old queues writes into guest memory after the reset.
    std::thread::sleep(latency + Duration::from_millis(100));
    for cq in [1, 2] {
        let ring = get(&driver, TestDriver::cq_base(cq), 8 * 16);
        assert!(ring.iter().all(|b| *b == 0), "CQ {cq} untouched");
    }
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 8, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 8, 1), Status::SUCCESS);
    let cqe = driver.io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
    assert_eq!(cqe.status, Status::SUCCESS);
    assert_eq!(cqe.sq_head, 1, "a fresh queue");
}

#[test]
fn interrupts_follow_each_completion_queue_vector() {
    let mut driver = TestDriver::new(config_with(vec![null_namespace(1 << 16, 1)]));
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 16, 1), Status::SUCCESS);
    assert_eq!(driver.create_cq(2, 16, 3), Status::SUCCESS);
    assert_eq!(
        driver.create_cq_with_interrupts(3, 16, 4, false),
        Status::SUCCESS
    );
    for qid in 1..=3 {
        assert_eq!(driver.create_sq(qid, 16, qid), Status::SUCCESS);
    }
    driver.interrupt.take();
    for qid in 1..=3 {
        let cqe = driver.io(qid, qid, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
        assert_eq!(cqe.status, Status::SUCCESS);
    }
    let mut seen = driver.interrupt.take();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, vec![(1, 1), (2, 3)], "CQ 3 has interrupts disabled");
    let stats = driver.controller.io_queue_stats();
    let vectors: Vec<_> = stats.iter().map(|s| (s.sq_id, s.vector)).collect();
    assert_eq!(vectors, vec![(1, Some(1)), (2, Some(3)), (3, None)]);
}

#[test]
fn dropping_the_controller_quiesces_its_queues() {
    let slow = Arc::new(BlockBackend::null(1 << 20, Some(Duration::from_secs(5))));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(slow, 1)]));
    driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), true);
    std::thread::sleep(Duration::from_millis(20));
    let pool = driver.pool.clone();
    assert_eq!(pool.stats().iter().map(|w| w.queues).sum::<usize>(), 1);
    let started = Instant::now();
    drop(driver);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(pool.stats().iter().all(|worker| worker.queues == 0));
}

#[test]
fn namespaces_carved_from_one_backend() {
    let image = TempImage::new(BACKEND_BYTES);
    let namespaces = NamespaceConfig::carve(image.backend(false), 2, 5);
    assert_eq!(namespaces.len(), 2);
    assert_eq!(namespaces[1].backend_offset, BACKEND_BYTES / 2);
    assert_ne!(namespaces[0].nguid, namespaces[1].nguid);
    let mut driver = with_queue_pair(config_with(namespaces));
    put(&driver, WRITE_BUFFER, &pattern(512, 4));
    let write = rw(OPC_WRITE, 2, 1, 1, WRITE_BUFFER, 0).build();
    assert_eq!(driver.io(1, 1, write).status, Status::SUCCESS);
    assert_eq!(image.read_at(BACKEND_BYTES / 2 + 512, 512), pattern(512, 4));
    let half = BACKEND_BYTES / 2 / BLOCK;
    let (_, identify) = driver.identify(CNS_NAMESPACE, 2);
    assert_eq!(le64(&identify, 0), half);
    let past = rw(OPC_READ, 1, half, 1, READ_BUFFER, 0).build();
    assert_eq!(driver.io(1, 1, past).status, Status::LBA_OUT_OF_RANGE);
}

#[test]
fn configurations_that_do_not_fit_their_backend_are_refused() {
    let backend = Arc::new(BlockBackend::null(1 << 20, None));
    let mut namespace = NamespaceConfig::with_seed(backend, 1);
    assert_eq!(config_with(vec![namespace.clone()]).validate(), Ok(()));
    namespace.size_blocks += 1;
    assert!(matches!(
        config_with(vec![namespace.clone()]).validate(),
        Err(NvmeConfigError::BeyondBackend { nsid: 1, .. })
    ));
    namespace.size_blocks = 8;
    namespace.backend_offset = 100;
    assert!(matches!(
        config_with(vec![namespace.clone()]).validate(),
        Err(NvmeConfigError::UnalignedOffset {
            nsid: 1,
            offset: 100
        })
    ));
    namespace.backend_offset = 0;
    namespace.block_size_shift = 13;
    assert!(matches!(
        config_with(vec![namespace]).validate(),
        Err(NvmeConfigError::BlockSize { nsid: 1, shift: 13 })
    ));
    let unlimited = ControllerConfig {
        mdts: 0,
        ..ControllerConfig::default()
    };
    assert_eq!(unlimited.effective_mdts(), super::MAX_MDTS);
}

#[test]
fn four_kib_blocks() {
    let image = TempImage::new(BACKEND_BYTES);
    let mut namespace = NamespaceConfig::with_seed(image.backend(false), 1);
    namespace.block_size_shift = 12;
    namespace.size_blocks = BACKEND_BYTES >> 12;
    let mut driver = with_queue_pair(config_with(vec![namespace]));
    put(&driver, WRITE_BUFFER, &pattern(8192, 2));
    let write = rw(OPC_WRITE, 1, 3, 2, WRITE_BUFFER, WRITE_BUFFER + PAGE).build();
    assert_eq!(driver.io(1, 1, write).status, Status::SUCCESS);
    assert_eq!(image.read_at(3 * 4096, 8192), pattern(8192, 2));
    assert_eq!(
        (le32(&driver.identify(CNS_NAMESPACE, 1).1, 128) >> 16) & 0xFF,
        12
    );
}

#[test]
fn queue_history_keeps_the_counts_of_deleted_queues() {
    let disk = Arc::new(BlockBackend::null(1 << 20, None));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(disk, 1)]));
    dsm_ranges(&driver, &[(0, 1)]);
    for _ in 0..3 {
        assert_eq!(driver.io(1, 1, dsm(1, 0)).status, Status::SUCCESS);
    }
    assert_eq!(driver.delete_sq(1), Status::SUCCESS);
    assert!(driver.controller.io_queue_stats().is_empty());
    let history = driver.controller.io_queue_history();
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].sq_id, history[0].commands), (1, 3));
    // A new queue with the same id adds to the same line.
    assert_eq!(driver.create_sq(1, 8, 1), Status::SUCCESS);
    for _ in 0..2 {
        assert_eq!(driver.io(1, 1, dsm(1, 0)).status, Status::SUCCESS);
    }
    let history = driver.controller.io_queue_history();
    assert_eq!((history[0].sq_id, history[0].commands), (1, 5));
}

/// The timing of I/O SQ `sq`.
fn sq_latency(driver: &TestDriver, sq: u16) -> Arc<QueueLatency> {
    driver
        .controller
        .io_queue_latency()
        .find(|(id, _)| *id == sq)
        .map(|(_, latency)| latency.clone())
        .expect("an SQ id the controller offers")
}

#[test]
fn every_command_leaves_one_sample_in_each_phase() {
    let mut driver = with_queue_pair(config_with(vec![null_namespace(1 << 16, 1)]));
    for lba in 0..25 {
        let cqe = driver.io(1, 1, rw(OPC_READ, 1, lba, 1, READ_BUFFER, 0).build());
        assert_eq!(cqe.status, Status::SUCCESS);
    }
    // Refused while parsing: still one sample each.
    for _ in 0..2 {
        let cqe = driver.io(1, 1, command(0x7F).nsid(1).build());
        assert_eq!(cqe.status, Status::INVALID_OPCODE);
    }
    let latency = sq_latency(&driver, 1);
    let counts = latency.counts();
    assert_eq!(counts.requests, 27);
    assert_eq!(counts.notifications, 27, "one MMIO doorbell each");
    assert_eq!(counts.in_flight, 0);
    let histograms = latency.histograms().expect("timed commands");
    for phase in Phase::ALL {
        assert_eq!(histograms[phase.index()].len(), 27, "{phase:?}");
    }
    // Deleting and creating the SQ again keeps adding to the same SQ id's numbers.
    assert_eq!(driver.delete_sq(1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
    driver.io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
    assert_eq!(sq_latency(&driver, 1).counts().requests, 28);
    assert_eq!(sq_latency(&driver, 2).counts().requests, 0);
}

#[test]
fn injected_backend_latency_shows_in_the_nvme_backend_phase_only() {
    const LATENCY_NS: u64 = 1_000_000;
    let slow = Arc::new(BlockBackend::null(
        1 << 20,
        Some(Duration::from_nanos(LATENCY_NS)),
    ));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(slow, 1)]));
    for lba in 0..30 {
        let cqe = driver.io(1, 1, rw(OPC_READ, 1, lba, 8, READ_BUFFER, 0).build());
        assert_eq!(cqe.status, Status::SUCCESS);
    }
    let histograms = sq_latency(&driver, 1).histograms().expect("timed");
    assert_only_the_backend_phase_is_slow(&histograms, LATENCY_NS);
}

#[test]
fn injected_faults_give_media_errors_stuck_commands_and_survive_a_reset() {
    let mut settings = crate::io::FaultSettings::default();
    settings.set("error_sectors", "8-9").unwrap();
    let faults = Arc::new(crate::io::Faults::new(settings, 1));
    let backend = Arc::new(BlockBackend::null(1 << 20, None).with_faults(faults.clone()));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(backend, 1)]));
    // A bad range fails every retry: media errors with Do Not Retry.
    let read = driver.io(1, 1, rw(OPC_READ, 1, 8, 1, READ_BUFFER, 0).build());
    assert_eq!(
        read.status,
        Status {
            do_not_retry: true,
            ..Status::UNRECOVERED_READ_ERROR
        }
    );
    let write = driver.io(1, 1, rw(OPC_WRITE, 1, 7, 2, WRITE_BUFFER, 0).build());
    assert_eq!(
        write.status,
        Status {
            do_not_retry: true,
            ..Status::WRITE_FAULT
        }
    );
    assert_eq!(
        driver
            .io(1, 1, rw(OPC_READ, 1, 9, 1, READ_BUFFER, 0).build())
            .status,
        Status::SUCCESS
    );
    assert_eq!(faults.counts().errors, 2);

    // A command that never completes: the host times out and resets the controller.
    let mut settings = crate::io::FaultSettings::default();
    settings.set("stuck_rate", "1").unwrap();
    faults.set(settings);
    driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), true);
    assert_eq!(driver.wait_quietly_for(1, Duration::from_millis(100)), None);
    assert_eq!(faults.counts().stuck, 1);
    faults.set(crate::io::FaultSettings::default());
    reset_and_read_again(&mut driver);
    let (_, latency) = driver.controller.io_queue_latency().next().unwrap();
    assert_eq!(
        latency.counts().in_flight,
        0,
        "the stuck command left with its queue"
    );
}

#[test]
fn a_fatal_controller_stops_fetching_until_the_host_resets_it() {
    let mut driver = with_queue_pair(config_with(vec![null_namespace(1 << 16, 1)]));
    assert_eq!(
        driver
            .io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build())
            .status,
        Status::SUCCESS
    );
    driver.controller.fatal_error();
    assert_ne!(driver.csts() & CSTS_CFS, 0);
    driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), true);
    assert_eq!(
        driver.wait_quietly_for(1, Duration::from_millis(100)),
        None,
        "a failed controller completes nothing"
    );
    // The host's timeout handling: reset, bring up again, I/O flows.
    reset_and_read_again(&mut driver);
    assert_eq!(driver.csts() & CSTS_CFS, 0);
    let counters = driver.controller.counters();
    assert_eq!((counters.fatal_errors, counters.resets), (1, 1));
}

/// What a host does after a timeout: reset the controller, bring up queue pair 1 again, and
/// read once (which must succeed).
fn reset_and_read_again(driver: &mut TestDriver) {
    driver.disable();
    assert!(driver.enable(16, 16));
    assert_eq!(driver.create_cq(1, 64, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
    let cqe = driver.io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
    assert_eq!(cqe.status, Status::SUCCESS);
}

#[test]
fn a_subsystem_reset_drops_the_queues_and_says_so_until_the_host_brings_it_up() {
    let mut settings = crate::io::FaultSettings::default();
    settings.set("stuck_rate", "1").unwrap();
    let faults = Arc::new(crate::io::Faults::new(settings, 1));
    let backend = Arc::new(BlockBackend::null(1 << 20, None).with_faults(faults.clone()));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(backend, 1)]));
    assert_ne!(
        driver.read64(REG_CAP) >> 36 & 1,
        0,
        "CAP.NSSRS: Linux only looks at NSSRO when it is set"
    );
    // A command in flight when the subsystem resets never completes.
    driver.queue_command(1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build(), true);
    assert_eq!(driver.wait_quietly_for(1, Duration::from_millis(50)), None);
    faults.set(crate::io::FaultSettings::default());

    driver.write32(REG_NSSR, 0x1234);
    assert_eq!(driver.csts(), CSTS_RDY, "any other NSSR value is ignored");
    driver.write32(REG_NSSR, NSSR_RESET_VALUE);
    assert_eq!(driver.csts(), CSTS_NSSRO, "not ready, and why");
    assert_eq!(driver.read32(REG_CC), 0);
    assert_eq!(
        driver.read32(REG_AQA),
        0,
        "registers back to power-on values"
    );
    // The old queues are gone: a doorbell for them is counted and ignored.
    let before = driver.controller.counters().invalid_doorbell_registers;
    driver.ring_sq(1);
    assert_eq!(
        driver.controller.counters().invalid_doorbell_registers,
        before + 1
    );
    assert_eq!(driver.wait_quietly_for(1, Duration::from_millis(50)), None);

    // Linux's reset work: clear NSSRO (write 1), then set up the controller from scratch.
    driver.write32(REG_CSTS, CSTS_NSSRO);
    assert_eq!(driver.csts(), 0);
    reset_and_read_again(&mut driver);
    let counters = driver.controller.counters();
    assert_eq!((counters.subsystem_resets, counters.resets), (1, 1));
    assert_eq!(faults.counts().stuck, 1);
    let (_, latency) = driver.controller.io_queue_latency().next().unwrap();
    assert_eq!(
        latency.counts().in_flight,
        0,
        "the stuck read left with its queue"
    );
}

#[test]
fn writes_held_by_a_bandwidth_cap_show_in_their_own_direction_beside_fast_reads() {
    use crate::latency::{Op, OpSample, OP_PHASES};
    const READS: u64 = 20;
    // 4 KiB writes at 4 KiB/s: the first is done after 1 s, the second, behind it, after 2 s.
    let mut settings = crate::io::FaultSettings::default();
    settings.set("write_bandwidth", "4K").unwrap();
    let faults = Arc::new(crate::io::Faults::new(settings, 1));
    let backend = Arc::new(BlockBackend::null(1 << 20, None).with_faults(faults.clone()));
    let mut driver = with_queue_pair(config_with(vec![NamespaceConfig::with_seed(backend, 1)]));
    let latency = sq_latency(&driver, 1);
    let writes: Vec<u16> = (0..2)
        .map(|i| {
            driver.queue_command(
                1,
                rw(OPC_WRITE, 1, i * 8, 8, WRITE_BUFFER, 0).build(),
                false,
            )
        })
        .collect();
    let ringing = Instant::now();
    driver.ring_sq(1);
    let rung = Instant::now();
    for lba in 0..READS {
        let read = driver.queue_command(1, rw(OPC_READ, 1, lba, 1, READ_BUFFER, 0).build(), true);
        let cqe = driver.wait(1);
        assert_eq!(cqe.command_id, read, "a read, not a held write");
        assert_eq!(cqe.status, Status::SUCCESS);
    }
    let waited = rung.elapsed();
    let [reads, writes_now, other] = latency.in_flight_by_op();
    let after = ringing.elapsed();
    assert!(
        after < Duration::from_millis(900),
        "the machine is too slow for this test: {after:?}"
    );
    assert_eq!((reads, other), (OpSample::default(), OpSample::default()));
    assert_eq!(writes_now.count, 2, "both writes at the backend");
    // Notified at the doorbell write.
    let age = Duration::from_micros(u64::from(writes_now.oldest_us));
    assert!(
        age >= waited && age <= after,
        "oldest write {age:?}, between {waited:?} and {after:?}"
    );
    latency.sample_in_flight();

    let mut finished: Vec<u16> = (0..2).map(|_| driver.wait(1).command_id).collect();
    finished.sort_unstable();
    assert_eq!(finished, writes);
    assert_eq!(faults.counts().delayed, 2);
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
    // One second for the first, two for the one behind it (1% histogram resolution).
    assert!(
        writes[backend].min() >= 990_000_000,
        "{}",
        writes[backend].min()
    );
    assert!(
        writes[backend].max() >= 1_980_000_000,
        "{}",
        writes[backend].max()
    );
    assert!(writes[total].max() >= writes[backend].max());
    assert!(reads[total].max() < 500_000_000, "{}", reads[total].max());

    let series = latency.in_flight_series();
    let writes = series.by_op[Op::Write.index()]
        .as_ref()
        .expect("writes seen");
    assert_eq!(writes.max_count, [2]);
    assert!(u64::from(writes.max_oldest_us[0]) >= age.as_micros() as u64);
}

#[test]
fn commands_are_filed_by_direction_whatever_their_opcode() {
    use crate::latency::Op;
    let mut driver = with_queue_pair(config_with(vec![null_namespace(1 << 16, 1)]));
    driver.io(1, 1, rw(OPC_READ, 1, 0, 1, READ_BUFFER, 0).build());
    driver.io(1, 1, rw(OPC_WRITE, 1, 0, 1, WRITE_BUFFER, 0).build());
    driver.io(1, 1, command(OPC_FLUSH).nsid(1).build());
    // Hostile: an unknown opcode, and a read of a namespace that does not exist.
    driver.io(1, 1, command(0xFF).nsid(1).build());
    driver.io(1, 1, rw(OPC_READ, 77, 0, 1, READ_BUFFER, 0).build());
    let all = sq_latency(&driver, 1).queue_histograms();
    let count = |op: Op| all.by_op[op.index()].as_ref().map_or(0, |h| h[0].len());
    assert_eq!(
        (count(Op::Read), count(Op::Write), count(Op::Other)),
        (2, 1, 2)
    );
}
