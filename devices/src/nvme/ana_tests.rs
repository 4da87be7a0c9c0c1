//! Multi-controller subsystems and Asymmetric Namespace Access, driven in-process through the
//! test-side NVMe driver (no KVM).

use vm_memory::{Bytes, GuestAddress};

use super::admin::*;
use super::ana::*;
use super::nvm::{OPC_READ, OPC_WRITE};
use super::queue::SubmissionEntry;
use super::registers::{CSTS_CFS, CSTS_RDY};
use super::testing::*;
use super::{ControllerConfig, NamespaceConfig, Status};

const NQN: &str = "nqn.2024-01.dev.blkswarm:subsystem:ana-tests";
const BLOCK: usize = 512;
/// One-block I/O buffers, away from the queues and the admin data buffer.
const WRITE_BUFFER: u64 = 0x40_0000;
const READ_BUFFER: u64 = 0x60_0000;
/// What the read buffer holds before a read: a read that fails must leave it so.
const POISON: u8 = 0xEE;
/// Spec encodings, written out rather than taken from the code under test.
const OAES_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
const OAES_ANA_CHANGE: u32 = 1 << 11;
const STATE_OPTIMIZED: u8 = 0x01;
const STATE_INACCESSIBLE: u8 = 0x03;
/// Asynchronous Event Request DW0 of an ANA change: Notice (2), ANA change (0x03), log 0x0C.
const ANA_CHANGE_EVENT: u32 = 0x000C_0302;

/// One controller of the shared subsystem [`NQN`], reporting ANA.
fn ana_config(controller_id: u16, namespaces: Vec<NamespaceConfig>) -> ControllerConfig {
    ControllerConfig {
        serial: format!("ANA-{controller_id}"),
        controller_id,
        subsystem_nqn: Some(NQN.to_string()),
        multi_controller: true,
        ana_reporting: true,
        namespaces,
        ..ControllerConfig::default()
    }
}

fn two_null_namespaces() -> Vec<NamespaceConfig> {
    vec![null_namespace(1 << 16, 1), null_namespace(1 << 17, 2)]
}

fn enabled(config: ControllerConfig) -> TestDriver {
    let mut driver = TestDriver::new(config);
    assert!(driver.enable(16, 16));
    driver
}

/// CQ 1 and SQ 1 on an enabled controller.
fn create_queue_pair(driver: &mut TestDriver) {
    assert_eq!(driver.create_cq(1, 64, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 64, 1), Status::SUCCESS);
}

fn with_queue_pair(config: ControllerConfig) -> TestDriver {
    let mut driver = enabled(config);
    create_queue_pair(&mut driver);
    driver
}

/// A one-block Read or Write of `nsid` at `lba` through a single PRP.
fn one_block(opcode: u8, nsid: u32, lba: u64, buffer: u64) -> SubmissionEntry {
    command(opcode)
        .nsid(nsid)
        .prp1(buffer)
        .cdw(10, lba as u32)
        .cdw(11, (lba >> 32) as u32)
        .build()
}

/// Reads one block through queue pair 1: the status and what landed in the read buffer.
fn read_block(driver: &mut TestDriver, nsid: u32, lba: u64) -> (Status, Vec<u8>) {
    driver
        .memory
        .write_slice(&[POISON; BLOCK], GuestAddress(READ_BUFFER))
        .unwrap();
    let status = driver
        .io(1, 1, one_block(OPC_READ, nsid, lba, READ_BUFFER))
        .status;
    let mut data = vec![0; BLOCK];
    driver
        .memory
        .read_slice(&mut data, GuestAddress(READ_BUFFER))
        .unwrap();
    (status, data)
}

/// Writes one block of `fill` through queue pair 1.
fn write_block(driver: &mut TestDriver, nsid: u32, lba: u64, fill: u8) -> Status {
    driver
        .memory
        .write_slice(&[fill; BLOCK], GuestAddress(WRITE_BUFFER))
        .unwrap();
    driver
        .io(1, 1, one_block(OPC_WRITE, nsid, lba, WRITE_BUFFER))
        .status
}

/// Get Log Page of the ANA log into a poisoned 4 KiB buffer; `groups_only` sets LSP bit 0.
fn get_ana_log(
    driver: &mut TestDriver,
    groups_only: bool,
    retain_event: bool,
) -> (Status, Vec<u8>) {
    const LEN: usize = 4096;
    driver
        .memory
        .write_slice(&[0xAA; LEN], GuestAddress(DATA_BASE))
        .unwrap();
    let numd = (LEN / 4 - 1) as u32;
    let cdw10 = numd << 16 | u32::from(retain_event) << 15 | u32::from(groups_only) << 8 | 0x0C;
    let cqe = driver.admin(
        command(OPC_GET_LOG_PAGE)
            .nsid(u32::MAX)
            .prp1(DATA_BASE)
            .cdw(10, cdw10)
            .build(),
    );
    (cqe.status, driver.read_data(LEN))
}

#[derive(Debug, PartialEq, Eq)]
struct GroupDescriptor {
    group: u32,
    change_count: u64,
    state: u8,
    nsids: Vec<u32>,
}

#[derive(Debug)]
struct AnaLog {
    change_count: u64,
    groups: Vec<GroupDescriptor>,
    /// Bytes the header and descriptors take.
    len: usize,
}

/// Decodes the ANA log (NVMe 1.4 figure 201/202), checking that reserved bytes are zero and
/// that the controller wrote nothing past the log's end.
fn parse_ana_log(data: &[u8]) -> AnaLog {
    let change_count = le64(data, 0);
    let descriptors = le16(data, 8);
    assert!(
        data[10..16].iter().all(|b| *b == 0),
        "header reserved bytes"
    );
    let mut offset = 16;
    let mut groups = Vec::new();
    for _ in 0..descriptors {
        let nnsids = le32(data, offset + 4) as usize;
        assert!(
            data[offset + 17..offset + 32].iter().all(|b| *b == 0),
            "descriptor reserved bytes at {offset}"
        );
        groups.push(GroupDescriptor {
            group: le32(data, offset),
            change_count: le64(data, offset + 8),
            state: data[offset + 16],
            nsids: (0..nnsids)
                .map(|index| le32(data, offset + 32 + 4 * index))
                .collect(),
        });
        offset += 32 + 4 * nnsids;
    }
    assert!(
        data[offset..].iter().all(|b| *b == 0xAA),
        "nothing written past the log's {offset} bytes"
    );
    AnaLog {
        change_count,
        groups,
        len: offset,
    }
}

fn read_ana_log(driver: &mut TestDriver, groups_only: bool) -> AnaLog {
    let (status, data) = get_ana_log(driver, groups_only, false);
    assert_eq!(status, Status::SUCCESS);
    parse_ana_log(&data)
}

fn group_state(log: &AnaLog, group: u32) -> u8 {
    log.groups
        .iter()
        .find(|descriptor| descriptor.group == group)
        .unwrap_or_else(|| panic!("no descriptor of group {group}"))
        .state
}

/// Queues an Asynchronous Event Request, which must stay outstanding.
fn queue_async_event_request(driver: &mut TestDriver) -> u16 {
    let command_id = driver.queue_command(0, command(OPC_ASYNC_EVENT_REQUEST).build(), true);
    assert_eq!(driver.reap(0), None, "held until an event");
    command_id
}

fn assert_path_error(status: Status, expected: Status, what: &str) {
    assert_eq!(status, expected, "{what}");
    assert_eq!(status.code_type, 3, "{what}: path related status");
    assert!(!status.do_not_retry, "{what}: another path may serve it");
}

#[test]
fn identify_controller_reports_a_multi_controller_ana_subsystem() {
    let mut driver = enabled(ana_config(5, two_null_namespaces()));
    let (status, data) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(data[76], 0b1010, "CMIC: multi-controller and ANA reporting");
    let oaes = le32(&data, 92);
    assert_ne!(oaes & OAES_ANA_CHANGE, 0, "OAES: ANA change notices");
    assert_ne!(
        oaes & OAES_NAMESPACE_ATTRIBUTE,
        0,
        "OAES: namespace notices"
    );
    assert_eq!(data[342], ANA_TRANSITION_TIME_SECS, "ANATT");
    assert_ne!(data[342], 0, "Linux needs a transition time");
    let mut config = ana_config(5, two_null_namespaces());
    config.ana_transition_time_secs = 2;
    let mut short = enabled(config);
    assert_eq!(
        short.identify(CNS_CONTROLLER, 0).1[342],
        2,
        "ANATT as configured"
    );
    assert_eq!(data[343], ANA_CAPABILITIES, "ANACAP");
    assert_eq!(data[343] & 0b1_1111, 0b1_1111, "every state is reported");
    assert_eq!(le32(&data, 344), 2, "ANAGRPMAX");
    assert_eq!(le32(&data, 348), 2, "NANAGRPID");
    let mnan = le32(&data, 540);
    assert_eq!(mnan, 2, "MNAN");
    assert!(mnan <= le32(&data, 516), "MNAN within NN");
    let subnqn = &data[768..1024];
    assert_eq!(&subnqn[..NQN.len()], NQN.as_bytes(), "SUBNQN");
    assert!(
        subnqn[NQN.len()..].iter().all(|b| *b == 0),
        "NUL terminated"
    );
    assert_eq!(le16(&data, 78), 5, "CNTLID");
}

#[test]
fn identify_controller_of_a_single_controller_reports_no_ana() {
    let mut driver = enabled(ControllerConfig {
        namespaces: two_null_namespaces(),
        ..ControllerConfig::default()
    });
    let (status, data) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(data[76], 0, "CMIC");
    assert_eq!(le32(&data, 92) & OAES_ANA_CHANGE, 0, "OAES without ANA");
    assert_eq!(le32(&data, 540), 0, "MNAN");
    assert_eq!(
        (data[342], data[343], le32(&data, 344), le32(&data, 348)),
        (0, 0, 0, 0),
        "no ANA fields"
    );
    assert!(driver.controller.ana_groups().is_none());
    let (status, data) = get_ana_log(&mut driver, false, false);
    assert_eq!(status, Status::INVALID_LOG_PAGE);
    assert!(data.iter().all(|b| *b == 0xAA), "nothing transferred");
}

#[test]
fn identify_namespace_reports_sharing_and_one_ana_group_per_namespace() {
    let mut driver = enabled(ana_config(1, two_null_namespaces()));
    for nsid in 1..=2 {
        let (status, data) = driver.identify(CNS_NAMESPACE, nsid);
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(data[30] & 1, 1, "NMIC: shared, namespace {nsid}");
        assert_eq!(le32(&data, 92), nsid, "ANAGRPID of namespace {nsid}");
    }

    // Without ANA: NMIC follows multi_controller alone, and there are no groups.
    for multi_controller in [false, true] {
        let mut driver = enabled(ControllerConfig {
            multi_controller,
            namespaces: two_null_namespaces(),
            ..ControllerConfig::default()
        });
        let (_, controller) = driver.identify(CNS_CONTROLLER, 0);
        assert_eq!(controller[76], u8::from(multi_controller) << 1, "CMIC");
        for nsid in 1..=2 {
            let (status, data) = driver.identify(CNS_NAMESPACE, nsid);
            assert_eq!(status, Status::SUCCESS);
            let what = format!("namespace {nsid}, multi-controller {multi_controller}");
            assert_eq!(data[30], u8::from(multi_controller), "NMIC, {what}");
            assert_eq!(le32(&data, 92), 0, "ANAGRPID, {what}");
        }
    }
}

#[test]
fn namespaces_share_groups_when_fewer_are_configured() {
    // Five namespaces in two groups, as an array whose two ports each own some volumes.
    let namespaces = (1..=5).map(|seed| null_namespace(1 << 12, seed)).collect();
    let mut config = ana_config(1, namespaces);
    config.ana_groups = Some(2);
    let mut driver = with_queue_pair(config);
    let (_, controller) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(le32(&controller, 344), 2, "ANAGRPMAX");
    assert_eq!(le32(&controller, 348), 2, "NANAGRPID");
    assert_eq!(
        le32(&controller, 540),
        5,
        "MNAN: every namespace may be listed"
    );
    for (nsid, group) in [(1, 1), (2, 2), (3, 1), (4, 2), (5, 1)] {
        let (status, data) = driver.identify(CNS_NAMESPACE, nsid);
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(le32(&data, 92), group, "ANAGRPID of namespace {nsid}");
    }

    assert_eq!(
        driver.controller.set_ana_state(2, AnaState::Inaccessible),
        Ok(true)
    );
    assert!(driver
        .controller
        .set_ana_state(3, AnaState::Optimized)
        .is_err());
    let log = read_ana_log(&mut driver, false);
    assert_eq!(
        log.groups,
        [
            GroupDescriptor {
                group: 1,
                change_count: 0,
                state: STATE_OPTIMIZED,
                nsids: vec![1, 3, 5],
            },
            GroupDescriptor {
                group: 2,
                change_count: 1,
                state: STATE_INACCESSIBLE,
                nsids: vec![2, 4],
            },
        ]
    );
    let max_len = 16 + 2 * 32 + 5 * 4;
    assert_eq!(log.len, max_len, "within what NANAGRPID and MNAN size");
    // Every namespace of the inaccessible group refuses I/O on this path; the others serve.
    for nsid in 1..=5 {
        let status = write_block(&mut driver, nsid, 0, 0x20 + nsid as u8);
        if nsid % 2 == 0 {
            assert_path_error(
                status,
                Status::ANA_INACCESSIBLE,
                &format!("namespace {nsid}"),
            );
        } else {
            assert_eq!(status, Status::SUCCESS, "namespace {nsid}");
        }
    }
}

#[test]
fn ana_log_reports_states_change_counts_and_nsid_lists() {
    let mut driver = enabled(ana_config(1, two_null_namespaces()));
    let log = read_ana_log(&mut driver, false);
    assert_eq!(log.change_count, 0);
    let initial: Vec<GroupDescriptor> = (1..=2)
        .map(|group| GroupDescriptor {
            group,
            change_count: 0,
            state: STATE_OPTIMIZED,
            nsids: vec![group],
        })
        .collect();
    assert_eq!(
        log.groups, initial,
        "every group optimized, listing its namespace"
    );
    assert_eq!(log.len, 16 + 2 * (32 + 4));

    assert_eq!(
        driver.controller.set_ana_state(2, AnaState::Inaccessible),
        Ok(true)
    );
    let log = read_ana_log(&mut driver, false);
    assert_eq!(log.change_count, 1, "header change count");
    assert_eq!(log.groups[0], initial[0], "group 1 untouched");
    assert_eq!(
        log.groups[1],
        GroupDescriptor {
            group: 2,
            change_count: 1,
            state: STATE_INACCESSIBLE,
            nsids: vec![2],
        }
    );

    // Return Groups Only: the same descriptors without their NSID lists.
    let groups_only = read_ana_log(&mut driver, true);
    assert_eq!(groups_only.change_count, 1);
    assert_eq!(groups_only.len, 16 + 2 * 32, "shorter by the NSID lists");
    let expected: Vec<(u32, u64, u8)> = vec![(1, 0, STATE_OPTIMIZED), (2, 1, STATE_INACCESSIBLE)];
    let actual: Vec<(u32, u64, u8)> = groups_only
        .groups
        .iter()
        .map(|descriptor| {
            assert!(
                descriptor.nsids.is_empty(),
                "NNSIDS of group {}",
                descriptor.group
            );
            (descriptor.group, descriptor.change_count, descriptor.state)
        })
        .collect();
    assert_eq!(actual, expected);
    assert_eq!(driver.controller.counters().ana_changes, 1);
}

#[test]
fn io_through_a_path_follows_its_group_state() {
    let image = TempImage::new(2 << 20);
    let namespaces = NamespaceConfig::carve(image.backend(false), 2, 1);
    let namespace_2_offset = namespaces[1].backend_offset;
    let mut driver = with_queue_pair(ana_config(1, namespaces));

    let mut fill = 0x10;
    for state in [AnaState::Optimized, AnaState::NonOptimized] {
        driver.controller.set_ana_state(1, state).unwrap();
        fill += 1;
        assert_eq!(
            write_block(&mut driver, 1, 3, fill),
            Status::SUCCESS,
            "{state:?}"
        );
        assert_eq!(
            read_block(&mut driver, 1, 3),
            (Status::SUCCESS, vec![fill; BLOCK]),
            "{state:?}"
        );
    }

    let failing = [
        (AnaState::Inaccessible, Status::ANA_INACCESSIBLE),
        (AnaState::PersistentLoss, Status::ANA_PERSISTENT_LOSS),
        (AnaState::Change, Status::ANA_TRANSITION),
    ];
    for (state, expected) in failing {
        assert_eq!(driver.controller.set_ana_state(1, state), Ok(true));
        let what = format!("{state:?}");
        // Refused before the backend: nothing read into the buffer, nothing written.
        let (status, data) = read_block(&mut driver, 1, 3);
        assert_path_error(status, expected, &format!("read, {what}"));
        assert_eq!(data, vec![POISON; BLOCK], "read, {what}: no data moved");
        let status = write_block(&mut driver, 1, 3, 0x77);
        assert_path_error(status, expected, &format!("write, {what}"));
        assert_eq!(
            image.read_at(3 * BLOCK as u64, BLOCK),
            vec![fill; BLOCK],
            "{what}"
        );
        // Namespace 2 is another group: still reachable through this controller.
        assert_eq!(
            write_block(&mut driver, 2, 5, 0x60),
            Status::SUCCESS,
            "{what}"
        );
        assert_eq!(
            read_block(&mut driver, 2, 5),
            (Status::SUCCESS, vec![0x60; BLOCK]),
            "{what}"
        );
    }
    assert_eq!(
        image.read_at(namespace_2_offset + 5 * BLOCK as u64, BLOCK),
        vec![0x60; BLOCK]
    );

    assert_eq!(
        driver.controller.set_ana_state(1, AnaState::Optimized),
        Ok(true)
    );
    assert_eq!(write_block(&mut driver, 1, 3, 0x42), Status::SUCCESS);
    assert_eq!(
        read_block(&mut driver, 1, 3),
        (Status::SUCCESS, vec![0x42; BLOCK])
    );
    assert_eq!(image.read_at(3 * BLOCK as u64, BLOCK), vec![0x42; BLOCK]);
    // The host's measurements tell the path errors from the commands served.
    let (_, latency) = driver.controller.io_queue_latency().next().unwrap();
    let counts = latency.counts();
    assert_eq!((counts.requests, counts.errors), (18, 6));
    assert_eq!(counts.succeeded(), 12);
}

#[test]
fn ana_change_notices_complete_an_async_event_request_once_per_log_read() {
    let mut driver = enabled(ana_config(1, two_null_namespaces()));
    assert_eq!(
        driver
            .set_feature(FID_ASYNC_EVENT_CONFIG, OAES_ANA_CHANGE)
            .status,
        Status::SUCCESS
    );
    let first = queue_async_event_request(&mut driver);
    let second = queue_async_event_request(&mut driver);
    driver.interrupt.take();

    assert_eq!(
        driver.controller.set_ana_state(1, AnaState::Inaccessible),
        Ok(true)
    );
    let cqe = driver.reap(0).expect("ANA change notice");
    assert_eq!((cqe.command_id, cqe.status), (first, Status::SUCCESS));
    assert_eq!(cqe.result, ANA_CHANGE_EVENT);
    assert_eq!(driver.interrupt.take(), vec![(0, 0)], "admin CQ interrupt");

    // Until the host reads the ANA log, further changes are masked (and coalesced).
    driver
        .controller
        .set_ana_state(2, AnaState::Change)
        .unwrap();
    driver
        .controller
        .set_ana_state(2, AnaState::NonOptimized)
        .unwrap();
    assert_eq!(driver.reap(0), None, "masked");
    assert!(driver.interrupt.take().is_empty());
    // Retain Asynchronous Event keeps the mask.
    let (status, _) = get_ana_log(&mut driver, false, true);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(driver.reap(0), None, "still masked after a read with RAE");

    let (status, _) = get_ana_log(&mut driver, false, false);
    assert_eq!(status, Status::SUCCESS);
    let cqe = driver.reap(0).expect("unmasked by the log read");
    assert_eq!((cqe.command_id, cqe.result), (second, ANA_CHANGE_EVENT));
    let third = queue_async_event_request(&mut driver);
    assert_eq!(driver.controller.outstanding_async_event_requests(), 1);

    // The masked changes made one notice: nothing left for the third request.
    let (status, _) = get_ana_log(&mut driver, false, false);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(
        driver.reap(0),
        None,
        "no second notice for the masked changes"
    );
    driver
        .controller
        .set_ana_state(1, AnaState::Optimized)
        .unwrap();
    let cqe = driver.reap(0).expect("a new change after the log read");
    assert_eq!((cqe.command_id, cqe.result), (third, ANA_CHANGE_EVENT));
    assert_eq!(driver.controller.counters().ana_changes, 4);
}

#[test]
fn ana_change_notices_need_async_event_configuration_bit_11() {
    let mut driver = enabled(ana_config(1, two_null_namespaces()));
    queue_async_event_request(&mut driver);
    // Bit 8 alone (namespace notices) is not enough.
    driver.set_feature(FID_ASYNC_EVENT_CONFIG, OAES_NAMESPACE_ATTRIBUTE);
    driver.interrupt.take();
    assert_eq!(
        driver.controller.set_ana_state(1, AnaState::Inaccessible),
        Ok(true)
    );
    assert_eq!(driver.reap(0), None);
    assert!(driver.interrupt.take().is_empty());
    assert_eq!(driver.controller.outstanding_async_event_requests(), 1);
    // Turning notices on later does not report the change made while they were off.
    driver.set_feature(FID_ASYNC_EVENT_CONFIG, OAES_ANA_CHANGE);
    let (status, _) = get_ana_log(&mut driver, false, false);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(driver.reap(0), None);
    assert_eq!(driver.controller.outstanding_async_event_requests(), 1);
}

#[test]
fn set_ana_state_reports_no_change_and_rejects_unknown_groups() {
    let mut driver = enabled(ana_config(1, two_null_namespaces()));
    driver.set_feature(FID_ASYNC_EVENT_CONFIG, OAES_ANA_CHANGE);
    queue_async_event_request(&mut driver);

    // Already optimized: no change, no event, no change count.
    assert_eq!(
        driver.controller.set_ana_state(1, AnaState::Optimized),
        Ok(false)
    );
    assert!(driver
        .controller
        .set_ana_state(0, AnaState::Inaccessible)
        .is_err());
    assert!(driver
        .controller
        .set_ana_state(3, AnaState::Inaccessible)
        .is_err());
    assert_eq!(driver.reap(0), None, "nothing raised");
    assert_eq!(driver.controller.counters().ana_changes, 0);
    let log = read_ana_log(&mut driver, false);
    assert_eq!(log.change_count, 0);
    assert!(log
        .groups
        .iter()
        .all(|group| group.state == STATE_OPTIMIZED && group.change_count == 0));

    // A controller without ANA has no groups to set, even with the notice bit enabled.
    let mut single = with_queue_pair(ControllerConfig::default());
    single.set_feature(FID_ASYNC_EVENT_CONFIG, OAES_ANA_CHANGE);
    queue_async_event_request(&mut single);
    assert!(single
        .controller
        .set_ana_state(1, AnaState::Inaccessible)
        .is_err());
    assert_eq!(single.reap(0), None, "nothing raised");
    assert_eq!(single.controller.counters().ana_changes, 0);
    assert_eq!(read_block(&mut single, 1, 0).0, Status::SUCCESS);
}

#[test]
fn ana_states_survive_a_controller_reset() {
    let mut driver = with_queue_pair(ana_config(1, two_null_namespaces()));
    driver
        .controller
        .set_ana_state(1, AnaState::Inaccessible)
        .unwrap();
    driver.disable();
    assert!(driver.enable(16, 16));
    create_queue_pair(&mut driver);
    assert_eq!(driver.controller.counters().resets, 1);

    assert_eq!(
        driver.controller.ana_groups().unwrap().state(1),
        Some(AnaState::Inaccessible)
    );
    let log = read_ana_log(&mut driver, false);
    assert_eq!(
        (log.change_count, group_state(&log, 1)),
        (1, STATE_INACCESSIBLE)
    );
    assert_path_error(
        read_block(&mut driver, 1, 0).0,
        Status::ANA_INACCESSIBLE,
        "read after the reset",
    );
    assert_eq!(read_block(&mut driver, 2, 0).0, Status::SUCCESS);
}

#[test]
fn two_controllers_share_a_namespace_with_their_own_ana_states() {
    let image = TempImage::new(1 << 20);
    let backend = image.backend(false);
    let mut a = with_queue_pair(ana_config(
        1,
        vec![NamespaceConfig::with_seed(backend.clone(), 1)],
    ));
    let mut b = with_queue_pair(ana_config(2, vec![NamespaceConfig::with_seed(backend, 1)]));

    // One subsystem, two controllers: Linux matches them by SUBNQN and tells them apart
    // by CNTLID.
    let (_, identify_a) = a.identify(CNS_CONTROLLER, 0);
    let (_, identify_b) = b.identify(CNS_CONTROLLER, 0);
    assert_eq!(identify_a[768..1024], identify_b[768..1024], "same SUBNQN");
    assert_eq!((le16(&identify_a, 78), le16(&identify_b, 78)), (1, 2));

    assert_eq!(write_block(&mut a, 1, 7, 0xA1), Status::SUCCESS);
    assert_eq!(
        read_block(&mut b, 1, 7),
        (Status::SUCCESS, vec![0xA1; BLOCK])
    );
    assert_eq!(write_block(&mut b, 1, 9, 0xB2), Status::SUCCESS);
    assert_eq!(
        read_block(&mut a, 1, 9),
        (Status::SUCCESS, vec![0xB2; BLOCK])
    );

    // Each controller is its own path: failing A's leaves B's alone.
    a.controller
        .set_ana_state(1, AnaState::Inaccessible)
        .unwrap();
    assert_path_error(
        read_block(&mut a, 1, 7).0,
        Status::ANA_INACCESSIBLE,
        "read through A",
    );
    assert_eq!(write_block(&mut b, 1, 7, 0xB3), Status::SUCCESS);
    assert_eq!(
        read_block(&mut b, 1, 7),
        (Status::SUCCESS, vec![0xB3; BLOCK])
    );
    assert_eq!(image.read_at(7 * BLOCK as u64, BLOCK), vec![0xB3; BLOCK]);
    let log_b = read_ana_log(&mut b, false);
    assert_eq!(
        (log_b.change_count, group_state(&log_b, 1)),
        (0, STATE_OPTIMIZED)
    );
    let log_a = read_ana_log(&mut a, false);
    assert_eq!(
        (log_a.change_count, group_state(&log_a, 1)),
        (1, STATE_INACCESSIBLE)
    );

    // Back on A, it sees what B wrote meanwhile.
    a.controller.set_ana_state(1, AnaState::Optimized).unwrap();
    assert_eq!(
        read_block(&mut a, 1, 7),
        (Status::SUCCESS, vec![0xB3; BLOCK])
    );
}

#[test]
fn a_failed_controller_stays_down_through_host_resets_until_restored() {
    let mut driver = with_queue_pair(ana_config(1, two_null_namespaces()));
    driver.controller.fail();
    assert!(driver.controller.is_held_down());
    assert_ne!(driver.csts() & CSTS_CFS, 0, "CFS tells the host");

    // The host resets and enables again, twice: the controller never becomes ready.
    for attempt in 0..2 {
        driver.disable();
        assert_eq!(driver.csts(), 0, "attempt {attempt}: the reset clears CFS");
        assert!(!driver.enable(16, 16), "attempt {attempt}");
        assert_eq!(
            driver.csts() & (CSTS_RDY | CSTS_CFS),
            0,
            "attempt {attempt}"
        );
        assert!(driver.controller.is_held_down());
    }

    assert!(driver.controller.restore());
    assert!(!driver.controller.is_held_down());
    assert_eq!(
        driver.csts(),
        CSTS_RDY,
        "ready at once: the host is waiting for it"
    );
    create_queue_pair(&mut driver);
    assert_eq!(read_block(&mut driver, 1, 0).0, Status::SUCCESS);
}

#[test]
fn restore_of_a_controller_that_is_not_held_changes_nothing() {
    let mut driver = with_queue_pair(ana_config(1, two_null_namespaces()));
    let counters = driver.controller.counters();
    assert!(!driver.controller.restore());
    assert_eq!(driver.csts(), CSTS_RDY);
    assert_eq!(driver.controller.counters(), counters);
    assert_eq!(read_block(&mut driver, 1, 0).0, Status::SUCCESS);

    // A fatal error that is not a held-down path stays until the host resets.
    driver.controller.fatal_error();
    assert!(!driver.controller.restore());
    assert_ne!(driver.csts() & CSTS_CFS, 0);

    let mut disabled = TestDriver::new(ana_config(1, two_null_namespaces()));
    assert!(!disabled.controller.restore());
    assert_eq!(disabled.csts(), 0, "restore does not enable a controller");
}

#[test]
fn restore_before_the_host_resets_lets_its_reset_bring_the_controller_up() {
    let mut driver = with_queue_pair(ana_config(1, two_null_namespaces()));
    driver.controller.fail();
    assert!(driver.controller.restore());
    assert!(!driver.controller.is_held_down());
    assert_ne!(
        driver.csts() & CSTS_CFS,
        0,
        "the failure stays visible until the host resets"
    );

    driver.disable();
    assert!(driver.enable(16, 16), "ready after the host's reset");
    assert_eq!(driver.csts(), CSTS_RDY);
    create_queue_pair(&mut driver);
    assert_eq!(read_block(&mut driver, 1, 0).0, Status::SUCCESS);
}
