//! Shadow doorbell tests: the test driver plays Linux's `nvme_dbbuf_*` side (shadow store,
//! EventIdx check, MMIO only when needed) against the controller and a real I/O pool.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::admin::*;
use super::nvm::OPC_READ;
use super::registers::*;
use super::testing::*;
use super::{ControllerConfig, Status};

const READ_BUFFER: u64 = 0x60_0000;

fn read_command() -> super::queue::SubmissionEntry {
    command(OPC_READ).nsid(1).prp1(READ_BUFFER).build()
}

fn driver() -> TestDriver {
    let mut driver = TestDriver::new(ControllerConfig {
        namespaces: vec![null_namespace(1 << 16, 1)],
        ..ControllerConfig::default()
    });
    assert!(driver.enable(16, 16));
    driver
}

/// Doorbell buffers configured first, then CQ 1 and SQ 1 of the given sizes.
fn shadow_driver(cq_entries: u16, sq_entries: u16) -> TestDriver {
    let mut driver = driver();
    assert_eq!(
        driver.configure_doorbell_buffers(SHADOW_DOORBELLS, EVENT_INDEXES),
        Status::SUCCESS
    );
    assert_eq!(driver.create_cq(1, cq_entries, 1), Status::SUCCESS);
    // The new SQ's handler looks at the shadow tail once and publishes its EventIdx. Until
    // it has, a submission may be served without a ring (it saw the tail first): the tests
    // counting rings wait for that look, marked by the EventIdx overwriting a sentinel.
    let tail_event_index = slot(EVENT_INDEXES, Doorbell::SubmissionTail(1));
    put32(&driver, tail_event_index, 0xDEAD);
    assert_eq!(driver.create_sq(1, sq_entries, 1), Status::SUCCESS);
    wait_for_event_index(&driver, Doorbell::SubmissionTail(1), 0);
    driver
}

/// MMIO tail doorbell writes the controller saw on SQ 1.
fn sq_doorbell_writes(driver: &TestDriver) -> u64 {
    driver.controller.io_queue_stats()[0].doorbell_writes
}

fn put32(driver: &TestDriver, address: u64, value: u32) {
    driver
        .memory
        .write_obj(value, GuestAddress(address))
        .unwrap();
}

fn slot(buffer: u64, doorbell: Doorbell) -> u64 {
    buffer + doorbell.index() * DOORBELL_STRIDE
}

/// Waits until the controller published `value` as `doorbell`'s EventIdx: it does so when
/// the queue goes idle, just after posting the completion the driver saw.
fn wait_for_event_index(driver: &TestDriver, doorbell: Doorbell, value: u32) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while driver.event_index(doorbell) != value {
        assert!(
            Instant::now() < deadline,
            "{doorbell:?}: EventIdx {} never became {value}",
            driver.event_index(doorbell)
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

#[test]
fn need_event_is_the_event_index_rule() {
    assert!(
        need_event(0, 1, 0),
        "the first update after EventIdx 0 rings"
    );
    assert!(need_event(5, 9, 3), "passing the EventIdx rings");
    assert!(!need_event(5, 5, 3), "reaching it does not");
    assert!(
        !need_event(2, 9, 3),
        "an EventIdx behind the old value does not"
    );
    assert!(need_event(0xFFFF, 2, 0xFFF0), "16-bit wrap");
}

#[test]
fn doorbell_buffer_config_is_advertised_and_checks_its_buffers() {
    let mut driver = driver();
    let (status, identify) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(le16(&identify, 256), OACS_DOORBELL_BUFFER_CONFIG, "OACS");
    let refused = [
        (
            SHADOW_DOORBELLS + 8,
            EVENT_INDEXES,
            "shadow buffer not page aligned",
        ),
        (
            SHADOW_DOORBELLS,
            EVENT_INDEXES + 0x800,
            "EventIdx buffer not page aligned",
        ),
        (
            MEMORY_BYTES,
            EVENT_INDEXES,
            "shadow buffer outside guest memory",
        ),
        (
            SHADOW_DOORBELLS,
            MEMORY_BYTES << 4,
            "EventIdx buffer outside guest memory",
        ),
    ];
    for (shadow, event_index, why) in refused {
        assert_eq!(
            driver.configure_doorbell_buffers(shadow, event_index),
            Status::INVALID_FIELD,
            "{why}"
        );
        assert_eq!(driver.controller.doorbell_buffers(), None, "{why}");
    }
    assert_eq!(
        driver.configure_doorbell_buffers(SHADOW_DOORBELLS, EVENT_INDEXES),
        Status::SUCCESS
    );
    let buffers = driver.controller.doorbell_buffers().expect("configured");
    assert_eq!(buffers.shadow, GuestAddress(SHADOW_DOORBELLS));
    assert_eq!(buffers.event_index, GuestAddress(EVENT_INDEXES));
    // The admin queue keeps its MMIO doorbells: this command needed one to run at all.
    assert_eq!(driver.identify(CNS_CONTROLLER, 0).0, Status::SUCCESS);
}

#[test]
fn an_idle_queue_asks_for_a_ring_at_the_next_submission() {
    let mut driver = shadow_driver(64, 64);
    let tail = Doorbell::SubmissionTail(1);
    for done in 1..=5u32 {
        assert_eq!(driver.io(1, 1, read_command()).status, Status::SUCCESS);
        wait_for_event_index(&driver, tail, done);
    }
    assert_eq!(
        sq_doorbell_writes(&driver),
        5,
        "each submission found the queue idle"
    );
    // A batch stored at once rings once.
    let ids: Vec<u16> = (0..7)
        .map(|_| driver.queue_command(1, read_command(), false))
        .collect();
    driver.ring_sq(1);
    let reaped: Vec<u16> = ids.iter().map(|_| driver.wait(1).command_id).collect();
    assert_eq!(reaped, ids);
    assert_eq!(sq_doorbell_writes(&driver), 6);
    wait_for_event_index(&driver, tail, 12);
}

/// An SQ stopped for lack of CQ room is busy: it keeps its old EventIdx, so the host's
/// submissions meanwhile go to the shadow buffer only, and none of them is lost.
#[test]
fn submissions_to_a_busy_queue_ring_no_doorbell_and_are_all_served() {
    let mut driver = shadow_driver(4, 64); // CQ room for 3.
    let tail = Doorbell::SubmissionTail(1);
    let mut ids = Vec::new();
    let mut reaped = Vec::new();
    for done in 1..=3 {
        ids.push(driver.queue_command(1, read_command(), true));
        reaped.push(driver.wait_quietly(1).expect("a completion").command_id);
        wait_for_event_index(&driver, tail, done);
    }
    // The CQ is full and the SQ idle at EventIdx 3: the next submission rings and stops the
    // SQ on the full CQ; the four after it find the EventIdx behind them and stay silent.
    for _ in 0..5 {
        ids.push(driver.queue_command(1, read_command(), true));
    }
    assert_eq!(sq_doorbell_writes(&driver), 4, "3 idle submissions + 1");
    assert_eq!(driver.event_index(tail), 3);
    // Consuming the CQ entries wakes the SQ (through the CQ's EventIdx, which asked for it).
    driver.ring_cq(1);
    while reaped.len() < ids.len() {
        reaped.push(driver.wait(1).command_id);
    }
    assert_eq!(reaped, ids, "in order, none lost");
    assert_eq!(driver.controller.io_queue_stats()[0].commands, 8);
    assert_eq!(sq_doorbell_writes(&driver), 4);
}

#[test]
fn a_completion_queue_head_is_read_from_the_shadow_buffer_without_a_ring() {
    let mut driver = shadow_driver(4, 16);
    // An EventIdx the host's head will not pass: it never rings the CQ head doorbell.
    put32(
        &driver,
        slot(EVENT_INDEXES, Doorbell::CompletionHead(1)),
        0x8000,
    );
    for round in 0..4 {
        let ids: Vec<u16> = (0..3)
            .map(|_| driver.queue_command(1, read_command(), true))
            .collect();
        let reaped: Vec<u16> = ids.iter().map(|_| driver.wait(1).command_id).collect();
        assert_eq!(reaped, ids, "round {round}");
    }
    // Linux's rule works on 16-bit indexes while queue indexes wrap at the queue size, so a
    // head wrapping from 3 to 0 passes any EventIdx: one ring per lap of the 4-entry CQ.
    let laps = 12 / 4;
    assert_eq!(
        driver.io_doorbell_mmio_writes - sq_doorbell_writes(&driver),
        laps,
        "CQ head doorbells: one per lap, yet the full CQ was reused every round"
    );
    assert_eq!(driver.controller.io_queue_stats()[0].commands, 12);
}

/// Linux creates its I/O queues first and sends Doorbell Buffer Config afterwards.
#[test]
fn queues_created_before_the_config_switch_to_shadow_doorbells() {
    let mut driver = driver();
    assert_eq!(driver.create_cq(1, 64, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
    for _ in 0..3 {
        assert_eq!(driver.io(1, 1, read_command()).status, Status::SUCCESS);
    }
    // Linux's shadow slots hold the values it rang so far; its EventIdx buffer is zeroed.
    put32(
        &driver,
        slot(SHADOW_DOORBELLS, Doorbell::SubmissionTail(1)),
        3,
    );
    put32(
        &driver,
        slot(SHADOW_DOORBELLS, Doorbell::CompletionHead(1)),
        3,
    );
    assert_eq!(
        driver.configure_doorbell_buffers(SHADOW_DOORBELLS, EVENT_INDEXES),
        Status::SUCCESS
    );
    // With EventIdx 0 the next tail (3 -> 4) would not ring; the controller must already
    // have published the tail it reached.
    for _ in 0..20 {
        assert_eq!(driver.io(1, 1, read_command()).status, Status::SUCCESS);
    }
    wait_for_event_index(&driver, Doorbell::SubmissionTail(1), 23);
    assert_eq!(driver.controller.io_queue_stats()[0].commands, 23);
}

#[test]
fn a_shadow_tail_beyond_the_queue_is_counted_and_ignored() {
    let mut driver = shadow_driver(64, 64);
    let tail = Doorbell::SubmissionTail(1);
    driver.queue_command(1, read_command(), false);
    put32(&driver, slot(SHADOW_DOORBELLS, tail), 200);
    driver.write32(tail.offset(), 1);
    assert_eq!(driver.wait_quietly_for(1, Duration::from_millis(100)), None);
    assert!(driver.controller.counters().invalid_shadow_doorbell_values >= 1);
    assert_eq!(driver.controller.io_queue_stats()[0].commands, 0);
    // The host stores a good value and rings: the command runs, nothing else broke.
    put32(&driver, slot(SHADOW_DOORBELLS, tail), 0);
    driver.ring_sq(1);
    assert_eq!(driver.wait(1).status, Status::SUCCESS);
    assert_eq!(driver.io(1, 1, read_command()).status, Status::SUCCESS);
    assert_eq!(driver.csts() & CSTS_CFS, 0);
}

#[test]
fn a_reset_forgets_the_doorbell_buffers() {
    let mut driver = driver();
    assert_eq!(
        driver.configure_doorbell_buffers(SHADOW_DOORBELLS, EVENT_INDEXES),
        Status::SUCCESS
    );
    driver.disable();
    assert!(driver.enable(16, 16));
    assert_eq!(driver.controller.doorbell_buffers(), None);
    assert_eq!(driver.create_cq(1, 64, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
    // A stale shadow value must not be read: MMIO doorbells carry the tail again.
    put32(
        &driver,
        slot(SHADOW_DOORBELLS, Doorbell::SubmissionTail(1)),
        40,
    );
    for _ in 0..4 {
        assert_eq!(driver.io(1, 1, read_command()).status, Status::SUCCESS);
    }
    let stats = driver.controller.io_queue_stats()[0];
    assert_eq!((stats.commands, stats.doorbell_writes), (4, 4));
}

/// The store / EventIdx / fence / re-read protocol under load: a window of 32 commands kept
/// full on a queue pair whose CQ is smaller than the SQ, every doorbell through the shadow
/// buffer. A lost wake-up shows as a completion that never comes (`wait` panics).
#[test]
fn thousands_of_commands_through_shadow_doorbells_lose_no_wake_up() {
    const COMMANDS: usize = 5000;
    const WINDOW: usize = 32;
    let mut driver = shadow_driver(24, 128);
    let mut outstanding = VecDeque::new();
    let mut submitted = 0;
    let mut completed = 0;
    while completed < COMMANDS {
        while submitted < COMMANDS && outstanding.len() < WINDOW {
            outstanding.push_back(driver.queue_command(1, read_command(), true));
            submitted += 1;
        }
        let cqe = driver.wait(1);
        assert_eq!(cqe.status, Status::SUCCESS);
        assert_eq!(Some(cqe.command_id), outstanding.pop_front(), "in order");
        completed += 1;
    }
    let stats = driver.controller.io_queue_stats()[0];
    assert_eq!(stats.commands, COMMANDS as u64);
    assert!(stats.doorbell_writes <= COMMANDS as u64);
    assert_eq!(driver.io_doorbell_updates, 2 * COMMANDS as u64);
    eprintln!(
        "{COMMANDS} commands: {} SQ tail and {} CQ head MMIO writes for {} doorbell updates",
        stats.doorbell_writes,
        driver.io_doorbell_mmio_writes - stats.doorbell_writes,
        driver.io_doorbell_updates
    );
}
