//! Controller tests through the test-side driver in [`super::testing`].

use vm_memory::Bytes;

use super::admin::*;
use super::registers::*;
use super::testing::*;
use super::{ControllerConfig, Status};

fn config() -> ControllerConfig {
    ControllerConfig {
        namespaces: vec![
            null_namespace(1 << 20, 1),
            null_namespace(1 << 21, 2),
            null_namespace(1 << 22, 3),
        ],
        ..ControllerConfig::default()
    }
}

fn enabled(config: ControllerConfig) -> TestDriver {
    let mut driver = TestDriver::new(config);
    assert!(driver.enable(16, 16));
    driver
}

/// The controller still answers admin commands.
fn assert_usable(driver: &mut TestDriver) {
    let (status, data) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(le32(&data, 80), VERSION_1_4);
}

#[test]
fn registers_after_construction() {
    let mut driver = TestDriver::new(config());
    let cap = driver.read64(REG_CAP);
    assert_eq!(cap & 0xFFFF, 1023, "MQES from max_queue_entries");
    assert_eq!(driver.read32(REG_CAP) as u64, cap & 0xFFFF_FFFF);
    assert_eq!(driver.read32(0x04) as u64, cap >> 32);
    assert_eq!(driver.read32(REG_VS), 0x0001_0400);
    assert_eq!(driver.csts(), 0);
    assert_eq!(driver.controller.bar_size(), 0x4000);
}

#[test]
fn admin_queue_bring_up() {
    let mut driver = TestDriver::new(config());
    assert!(driver.enable(32, 8));
    assert_eq!(driver.csts(), CSTS_RDY);
    assert_eq!(driver.read32(REG_AQA), 7 << 16 | 31);
    assert_eq!(driver.read64(REG_ASQ), ADMIN_SQ_BASE);
    assert_eq!(driver.read64(REG_ACQ), ADMIN_CQ_BASE);
    assert_usable(&mut driver);
    assert_eq!(
        driver.interrupt.take(),
        vec![(0, 0)],
        "admin CQ signals vector 0"
    );
}

#[test]
fn invalid_admin_queue_setup_sets_fatal_status() {
    let cases: [(u64, u64, u16, u16); 5] = [
        (0, ADMIN_CQ_BASE, 16, 16),
        (ADMIN_SQ_BASE, ADMIN_CQ_BASE + 0x200, 16, 16),
        (ADMIN_SQ_BASE, ADMIN_CQ_BASE, 1, 16),
        (ADMIN_SQ_BASE, ADMIN_CQ_BASE, 16, 1),
        (ADMIN_SQ_BASE, MEMORY_BYTES, 16, 16),
    ];
    for (sq, cq, sq_entries, cq_entries) in cases {
        let mut driver = TestDriver::new(config());
        assert!(!driver.enable_at(sq, cq, sq_entries, cq_entries));
        assert_eq!(
            driver.csts(),
            CSTS_CFS,
            "case {sq:#x} {cq:#x} {sq_entries} {cq_entries}"
        );
        driver.disable();
        assert_eq!(driver.csts(), 0, "reset clears CFS");
        assert!(driver.enable(16, 16), "usable after fixing the setup");
        assert_usable(&mut driver);
    }
}

#[test]
fn enable_requires_nvm_entry_sizes_and_page_size() {
    for cc in [
        CC_EN,
        TestDriver::enabled_cc() | 1 << CC_MPS_SHIFT,
        TestDriver::enabled_cc() | 1 << CC_CSS_SHIFT,
    ] {
        let mut driver = TestDriver::new(config());
        driver.write32(REG_AQA, 0x000F_000F);
        driver.write64(REG_ASQ, ADMIN_SQ_BASE);
        driver.write64(REG_ACQ, ADMIN_CQ_BASE);
        driver.write32(REG_CC, cc);
        assert_eq!(driver.csts(), CSTS_CFS, "CC {cc:#x}");
    }
}

#[test]
fn identify_controller_fields() {
    let mut driver = enabled(ControllerConfig {
        serial: "SERIAL-42".to_string(),
        mdts: 5,
        controller_id: 7,
        ..config()
    });
    let (status, data) = driver.identify(CNS_CONTROLLER, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(le16(&data, 0), 0x1b36);
    assert_eq!(le16(&data, 2), 0x1b36);
    assert_eq!(&data[4..24], b"SERIAL-42           ");
    assert!(data[24..64].starts_with(b"blkswarm NVMe controller "));
    assert_eq!(&data[64..72], b"0.1     ");
    assert_eq!(data[77], 5, "MDTS");
    assert_eq!(le16(&data, 78), 7, "CNTLID");
    assert_eq!(le32(&data, 80), VERSION_1_4);
    assert_eq!(data[111], 1, "I/O controller");
    assert_eq!(
        le16(&data, 256),
        OACS_DOORBELL_BUFFER_CONFIG,
        "OACS: Doorbell Buffer Config only"
    );
    assert_eq!(data[259] as usize + 1, ASYNC_EVENT_REQUEST_LIMIT);
    assert_eq!(data[512], 0x66, "SQES");
    assert_eq!(data[513], 0x44, "CQES");
    assert_eq!(le32(&data, 516), 3, "NN");
    assert_eq!(le16(&data, 520) & 0b1100, 0b1100, "ONCS DSM + Write Zeroes");
    assert_eq!(data[525] & 1, 1, "VWC");
    assert_eq!(le32(&data, 536), 0, "no SGLs");
    assert!(data[768..].starts_with(b"nqn.2024-01.dev.blkswarm:nvme:SERIAL-42\0"));
}

#[test]
fn identify_namespaces() {
    let mut driver = enabled(config());
    let (status, data) = driver.identify(CNS_NAMESPACE, 2);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(le64(&data, 0), 1 << 21, "NSZE");
    assert_eq!(le64(&data, 8), 1 << 21, "NCAP");
    assert_eq!(data[25], 0, "NLBAF");
    assert_eq!(data[26], 0, "FLBAS");
    assert_eq!((le32(&data, 128) >> 16) & 0xFF, 9, "LBADS 512");
    assert_eq!(&data[104..120], &config().namespaces[1].nguid);

    let (status, data) = driver.identify(CNS_ACTIVE_NAMESPACES, 0);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(
        [
            le32(&data, 0),
            le32(&data, 4),
            le32(&data, 8),
            le32(&data, 12)
        ],
        [1, 2, 3, 0]
    );
    let (_, data) = driver.identify(CNS_ACTIVE_NAMESPACES, 2);
    assert_eq!([le32(&data, 0), le32(&data, 4)], [3, 0]);

    let (status, data) = driver.identify(CNS_NAMESPACE_DESCRIPTORS, 3);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!((data[0], data[1]), (NIDT_NGUID, 16));
    assert_eq!(&data[4..20], &config().namespaces[2].nguid);
    assert_eq!((data[20], data[21]), (NIDT_UUID, 16));
    assert_eq!(&data[24..40], &config().namespaces[2].uuid);
    assert_eq!(data[40], 0, "list ends");

    for (cns, nsid) in [
        (CNS_NAMESPACE, 0),
        (CNS_NAMESPACE, 4),
        (CNS_NAMESPACE, u32::MAX),
        (CNS_NAMESPACE_DESCRIPTORS, 9),
        (CNS_ACTIVE_NAMESPACES, 0xFFFF_FFFE),
    ] {
        let (status, data) = driver.identify(cns, nsid);
        assert_eq!(
            status,
            Status::INVALID_NAMESPACE,
            "CNS {cns} NSID {nsid:#x}"
        );
        assert!(data.iter().all(|b| *b == 0xAA), "nothing transferred");
    }
    assert_eq!(
        driver.identify(0x1F, 0).0,
        Status::INVALID_FIELD,
        "unknown CNS"
    );
    assert_usable(&mut driver);
}

#[test]
fn invalid_opcodes_and_command_fields() {
    let mut driver = enabled(config());
    for opcode in [0x03, 0x07, 0x10, 0x18, 0x7D, 0x80, 0xFF] {
        let cqe = driver.admin(command(opcode).build());
        assert_eq!(cqe.status, Status::INVALID_OPCODE, "opcode {opcode:#x}");
        assert!(cqe.status.do_not_retry);
    }
    let fused = command(OPC_IDENTIFY)
        .prp1(DATA_BASE)
        .cdw(10, 1)
        .flags(1 << 8)
        .build();
    assert_eq!(driver.admin(fused).status, Status::INVALID_FIELD);
    let sgl = command(OPC_IDENTIFY)
        .prp1(DATA_BASE)
        .cdw(10, 1)
        .flags(1 << 14)
        .build();
    assert_eq!(driver.admin(sgl).status, Status::INVALID_FIELD);
    assert_usable(&mut driver);
}

#[test]
fn identify_with_bad_data_pointers() {
    let mut driver = enabled(config());
    let misaligned = command(OPC_IDENTIFY).prp1(DATA_BASE + 2).cdw(10, 1).build();
    assert_eq!(driver.admin(misaligned).status, Status::PRP_OFFSET_INVALID);
    let outside = command(OPC_IDENTIFY).prp1(MEMORY_BYTES).cdw(10, 1).build();
    assert_eq!(driver.admin(outside).status, Status::DATA_TRANSFER_ERROR);
    // 4 KiB from an offset spills into PRP2, which must be page aligned.
    let spill = command(OPC_IDENTIFY)
        .prp1(DATA_BASE + 0x800)
        .prp2(DATA_BASE + 0x1800)
        .cdw(10, 1)
        .build();
    assert_eq!(driver.admin(spill).status, Status::PRP_OFFSET_INVALID);
    let spill = command(OPC_IDENTIFY)
        .prp1(DATA_BASE + 0x800)
        .prp2(DATA_BASE + 0x2000)
        .cdw(10, 1)
        .build();
    assert_eq!(driver.admin(spill).status, Status::SUCCESS);
    assert_eq!(le32(&driver.read_data(0x1000), 0x800 + 80), VERSION_1_4);
    assert_usable(&mut driver);
}

#[test]
fn create_and_delete_io_queues() {
    let mut driver = enabled(config());
    for qid in 1..=4 {
        assert_eq!(driver.create_cq(qid, 64, qid), Status::SUCCESS);
        assert_eq!(driver.create_sq(qid, 64, qid), Status::SUCCESS);
    }
    // Two SQs may share one CQ.
    assert_eq!(driver.delete_sq(4), Status::SUCCESS);
    assert_eq!(driver.create_sq(4, 64, 1), Status::SUCCESS);
    assert_eq!(driver.delete_cq(1), Status::INVALID_QUEUE_DELETION);
    assert_eq!(driver.delete_sq(1), Status::SUCCESS);
    assert_eq!(
        driver.delete_cq(1),
        Status::INVALID_QUEUE_DELETION,
        "SQ 4 still bound"
    );
    assert_eq!(driver.delete_sq(4), Status::SUCCESS);
    assert_eq!(driver.delete_cq(1), Status::SUCCESS);
    assert_eq!(driver.delete_cq(4), Status::SUCCESS);
    assert_eq!(
        driver.delete_sq(1),
        Status::INVALID_QUEUE_IDENTIFIER,
        "already deleted"
    );
    assert_eq!(driver.delete_cq(1), Status::INVALID_QUEUE_IDENTIFIER);
    // Ids become reusable.
    assert_eq!(driver.create_cq(1, 2, 0), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 2, 1), Status::SUCCESS);
    assert_usable(&mut driver);
}

#[test]
fn create_queue_invalid_cases() {
    let mut driver = enabled(config());
    let max = ControllerConfig::default().max_io_queue_pairs;
    let cq_base = IO_QUEUES_BASE;
    // Completion queues.
    assert_eq!(driver.create_cq(0, 16, 0), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(
        driver.create_cq(max + 1, 16, 0),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(
        driver.create_cq(0xFFFF, 16, 0),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(driver.create_cq(1, 1025, 0), Status::INVALID_QUEUE_SIZE);
    assert_eq!(driver.create_cq(1, 1, 0), Status::INVALID_QUEUE_SIZE);
    assert_eq!(
        driver.create_cq_raw(1, 16, cq_base, 0b10),
        Status::INVALID_FIELD,
        "PC = 0"
    );
    assert_eq!(
        driver.create_cq_raw(1, 16, cq_base + 8, 0b11),
        Status::PRP_OFFSET_INVALID
    );
    assert_eq!(
        driver.create_cq_raw(1, 16, MEMORY_BYTES, 0b11),
        Status::INVALID_FIELD
    );
    assert_eq!(driver.create_cq(1, 16, 5), Status::INVALID_INTERRUPT_VECTOR);
    assert_eq!(driver.create_cq(1, 1024, 4), Status::SUCCESS);
    assert_eq!(
        driver.create_cq(1, 16, 1),
        Status::INVALID_QUEUE_IDENTIFIER,
        "in use"
    );
    // Submission queues.
    assert_eq!(
        driver.create_sq(1, 16, 0),
        Status::COMPLETION_QUEUE_INVALID,
        "admin CQ"
    );
    assert_eq!(
        driver.create_sq(1, 16, 2),
        Status::COMPLETION_QUEUE_INVALID,
        "no CQ 2"
    );
    assert_eq!(
        driver.create_sq(1, 16, 0xFFFF),
        Status::COMPLETION_QUEUE_INVALID
    );
    assert_eq!(driver.create_sq(0, 16, 1), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(
        driver.create_sq(max + 1, 16, 1),
        Status::INVALID_QUEUE_IDENTIFIER
    );
    assert_eq!(driver.create_sq(1, 1025, 1), Status::INVALID_QUEUE_SIZE);
    assert_eq!(
        driver.create_sq_raw(1, 16, IO_QUEUES_BASE, 1 << 16),
        Status::INVALID_FIELD
    );
    assert_eq!(driver.create_sq(1, 16, 1), Status::SUCCESS);
    assert_eq!(
        driver.create_sq(1, 16, 1),
        Status::INVALID_QUEUE_IDENTIFIER,
        "in use"
    );
    // Deletion.
    assert_eq!(driver.delete_sq(0), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(driver.delete_cq(0), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(driver.delete_sq(max + 1), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(driver.delete_cq(0xFFFF), Status::INVALID_QUEUE_IDENTIFIER);
    assert_eq!(driver.delete_cq(1), Status::INVALID_QUEUE_DELETION);
    assert_usable(&mut driver);
}

#[test]
fn number_of_queues_feature() {
    let mut driver = enabled(config());
    let cqe = driver.get_feature(FID_NUMBER_OF_QUEUES, 0);
    assert_eq!(
        cqe.result,
        3 << 16 | 3,
        "defaults to the configured 4 pairs"
    );
    // Asking for 32 grants the configured 4; asking for fewer grants fewer.
    let cqe = driver.set_feature(FID_NUMBER_OF_QUEUES, 31 << 16 | 31);
    assert_eq!((cqe.status, cqe.result), (Status::SUCCESS, 3 << 16 | 3));
    let cqe = driver.set_feature(FID_NUMBER_OF_QUEUES, 1 << 16 | 1);
    assert_eq!((cqe.status, cqe.result), (Status::SUCCESS, 1 << 16 | 1));
    assert_eq!(
        driver.get_feature(FID_NUMBER_OF_QUEUES, 0).result,
        1 << 16 | 1
    );
    assert_eq!(
        driver.get_feature(FID_NUMBER_OF_QUEUES, 1).result,
        3 << 16 | 3,
        "default"
    );
    assert_eq!(
        driver.set_feature(FID_NUMBER_OF_QUEUES, 0xFFFF).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        driver.create_cq(3, 16, 0),
        Status::INVALID_QUEUE_IDENTIFIER,
        "beyond the grant"
    );
    assert_eq!(driver.create_cq(2, 16, 0), Status::SUCCESS);
    assert_eq!(
        driver.set_feature(FID_NUMBER_OF_QUEUES, 0).status,
        Status::COMMAND_SEQUENCE_ERROR,
        "only before I/O queues exist"
    );
}

#[test]
fn other_features() {
    let mut driver = enabled(config());
    assert_eq!(driver.get_feature(FID_VOLATILE_WRITE_CACHE, 0).result, 1);
    assert_eq!(
        driver.set_feature(FID_VOLATILE_WRITE_CACHE, 0).status,
        Status::SUCCESS
    );
    assert_eq!(driver.get_feature(FID_VOLATILE_WRITE_CACHE, 0).result, 0);
    assert_eq!(
        driver.set_feature(FID_INTERRUPT_COALESCING, 0x0A04).status,
        Status::SUCCESS
    );
    assert_eq!(
        driver.get_feature(FID_INTERRUPT_COALESCING, 0).result,
        0x0A04
    );
    assert_eq!(
        driver.set_feature(FID_ARBITRATION, 0x0303_0303).status,
        Status::SUCCESS
    );
    assert_eq!(driver.get_feature(FID_ARBITRATION, 0).result, 0x0303_0303);
    assert_eq!(
        driver.set_feature(FID_ASYNC_EVENT_CONFIG, 0x1FF).status,
        Status::SUCCESS
    );
    assert_eq!(driver.get_feature(FID_ASYNC_EVENT_CONFIG, 0).result, 0x1FF);
    assert_eq!(
        driver.set_feature(FID_POWER_MANAGEMENT, 1).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        driver.set_feature(FID_POWER_MANAGEMENT, 0).status,
        Status::SUCCESS
    );
    assert_eq!(driver.get_feature(FID_TEMPERATURE_THRESHOLD, 0).result, 343);
    assert_eq!(
        driver
            .set_feature(FID_TEMPERATURE_THRESHOLD, 1 << 20 | 270)
            .status,
        Status::SUCCESS
    );
    let under = driver.admin(
        command(OPC_GET_FEATURES)
            .cdw(10, 4)
            .cdw(11, 1 << 20)
            .build(),
    );
    assert_eq!(under.result & 0xFFFF, 270);
    assert_eq!(
        driver
            .set_feature(FID_TEMPERATURE_THRESHOLD, 1 << 16)
            .status,
        Status::INVALID_FIELD
    );
    // Capabilities, not saveable, unknown features.
    assert_eq!(
        driver.get_feature(FID_VOLATILE_WRITE_CACHE, 3).result,
        0b100
    );
    let save = driver.admin(
        command(OPC_SET_FEATURES)
            .cdw(10, 1 << 31 | 6)
            .cdw(11, 1)
            .build(),
    );
    assert_eq!(save.status, Status::FEATURE_NOT_SAVEABLE);
    assert_eq!(driver.set_feature(0x0C, 0).status, Status::INVALID_FIELD);
    assert_eq!(driver.get_feature(0x7F, 0).status, Status::INVALID_FIELD);
    assert_eq!(driver.get_feature(0x7F, 3).status, Status::INVALID_FIELD);
    assert_eq!(
        driver.get_feature(FID_ARBITRATION, 4).status,
        Status::INVALID_FIELD
    );
    // A controller reset restores defaults.
    driver.disable();
    assert!(driver.enable(16, 16));
    assert_eq!(driver.get_feature(FID_VOLATILE_WRITE_CACHE, 0).result, 1);
    assert_eq!(driver.get_feature(FID_INTERRUPT_COALESCING, 0).result, 0);
}

/// The features NVMe 1.4 makes mandatory for an I/O controller beside the others: Error
/// Recovery (per namespace), Interrupt Vector Configuration (per vector, PCIe), Write
/// Atomicity Normal. nvme-cli's get-feature found them answered with Invalid Field.
#[test]
fn error_recovery_interrupt_vector_config_and_write_atomicity() {
    let mut driver = enabled(config());
    let get_ns = |driver: &mut TestDriver, nsid: u32| {
        driver.admin(
            command(OPC_GET_FEATURES)
                .cdw(10, u32::from(FID_ERROR_RECOVERY))
                .nsid(nsid)
                .build(),
        )
    };
    assert_eq!(get_ns(&mut driver, 1).status, Status::SUCCESS);
    assert_eq!(get_ns(&mut driver, 1).result, 0);
    assert_eq!(get_ns(&mut driver, 9).status, Status::INVALID_NAMESPACE);
    let set = |driver: &mut TestDriver, nsid: u32, value: u32| {
        driver
            .admin(
                command(OPC_SET_FEATURES)
                    .cdw(10, u32::from(FID_ERROR_RECOVERY))
                    .cdw(11, value)
                    .nsid(nsid)
                    .build(),
            )
            .status
    };
    assert_eq!(set(&mut driver, 2, 30), Status::SUCCESS);
    assert_eq!(get_ns(&mut driver, 2).result, 30);
    assert_eq!(
        set(&mut driver, 1, 1 << 16),
        Status::INVALID_FIELD,
        "no DULBE"
    );
    assert_eq!(set(&mut driver, 7, 1), Status::INVALID_NAMESPACE);
    assert_eq!(
        driver.get_feature(FID_ERROR_RECOVERY, 3).result,
        0b110,
        "changeable, namespace specific"
    );
    // Interrupt vector configuration: per vector, within the MSI-X table.
    let vectors = u32::from(config().interrupt_vectors);
    let get_iv = |driver: &mut TestDriver, vector: u32| {
        driver.admin(
            command(OPC_GET_FEATURES)
                .cdw(10, u32::from(FID_INTERRUPT_VECTOR_CONFIG))
                .cdw(11, vector)
                .build(),
        )
    };
    assert_eq!(get_iv(&mut driver, 1).result, 1);
    let cqe = driver.set_feature(FID_INTERRUPT_VECTOR_CONFIG, 1 << 16 | 1);
    assert_eq!(cqe.status, Status::SUCCESS);
    assert_eq!(get_iv(&mut driver, 1).result, 1 << 16 | 1);
    assert_eq!(get_iv(&mut driver, 0).result, 0);
    assert_eq!(get_iv(&mut driver, vectors).status, Status::INVALID_FIELD);
    assert_eq!(
        driver
            .set_feature(FID_INTERRUPT_VECTOR_CONFIG, vectors)
            .status,
        Status::INVALID_FIELD
    );
    // Write atomicity normal: bit 0 only.
    assert_eq!(driver.get_feature(FID_WRITE_ATOMICITY_NORMAL, 0).result, 0);
    assert_eq!(
        driver.set_feature(FID_WRITE_ATOMICITY_NORMAL, 0xFF).status,
        Status::SUCCESS
    );
    assert_eq!(driver.get_feature(FID_WRITE_ATOMICITY_NORMAL, 0).result, 1);
    assert_eq!(driver.get_feature(FID_WRITE_ATOMICITY_NORMAL, 1).result, 0);
    // A reset restores the defaults.
    driver.disable();
    assert!(driver.enable(16, 16));
    assert_eq!(get_iv(&mut driver, 1).result, 1);
    assert_eq!(get_ns(&mut driver, 2).result, 0);
}

#[test]
fn features_without_volatile_write_cache() {
    let mut driver = enabled(ControllerConfig {
        volatile_write_cache: false,
        ..config()
    });
    assert_eq!(driver.identify(CNS_CONTROLLER, 0).1[525] & 1, 0);
    assert_eq!(
        driver.set_feature(FID_VOLATILE_WRITE_CACHE, 1).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        driver.get_feature(FID_VOLATILE_WRITE_CACHE, 0).status,
        Status::INVALID_FIELD
    );
}

#[test]
fn log_pages() {
    let mut driver = enabled(config());
    let (status, smart) = driver.get_log_page(LOG_SMART, 512, false);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(smart[0], 0, "no critical warning");
    assert_eq!(le16(&smart, 1), 313);
    assert_eq!(smart[3], 100);
    let (status, firmware) = driver.get_log_page(LOG_FIRMWARE_SLOT, 512, false);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(firmware[0] & 0b111, 1);
    assert_eq!(&firmware[8..16], b"0.1     ");
    let (status, errors) = driver.get_log_page(LOG_ERROR, 64, false);
    assert_eq!(status, Status::SUCCESS);
    assert!(errors.iter().all(|b| *b == 0));
    let (status, changed) = driver.get_log_page(LOG_CHANGED_NAMESPACES, 4096, false);
    assert_eq!(status, Status::SUCCESS);
    assert!(changed.iter().all(|b| *b == 0));
    // Shorter than the page: only what was asked is written.
    driver
        .memory
        .write_slice(&[0xAA; 8], vm_memory::GuestAddress(DATA_BASE))
        .unwrap();
    let (status, _) = driver.get_log_page(LOG_SMART, 4, false);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(driver.read_data(8)[4..8], [0xAA; 4]);
    assert_eq!(
        driver.get_log_page(0x70, 512, false).0,
        Status::INVALID_LOG_PAGE
    );
    // Past MDTS (128 pages by default).
    assert_eq!(
        driver.get_log_page(LOG_SMART, (512 << 10) + 4, false).0,
        Status::INVALID_FIELD
    );
    let bad_offset = command(OPC_GET_LOG_PAGE)
        .prp1(DATA_BASE)
        .cdw(10, 127 << 16 | 2)
        .cdw(12, 2)
        .build();
    assert_eq!(driver.admin(bad_offset).status, Status::INVALID_FIELD);
    let offset = command(OPC_GET_LOG_PAGE)
        .prp1(DATA_BASE)
        .cdw(10, 2)
        .cdw(12, 0)
        .build();
    assert_eq!(driver.admin(offset).status, Status::SUCCESS);
    let bad_ns = command(OPC_GET_LOG_PAGE)
        .nsid(7)
        .prp1(DATA_BASE)
        .cdw(10, 127 << 16 | 2)
        .build();
    assert_eq!(driver.admin(bad_ns).status, Status::INVALID_NAMESPACE);
    let outside = command(OPC_GET_LOG_PAGE)
        .prp1(MEMORY_BYTES)
        .cdw(10, 127 << 16 | 2)
        .build();
    assert_eq!(driver.admin(outside).status, Status::DATA_TRANSFER_ERROR);
    assert_usable(&mut driver);
}

#[test]
fn async_event_requests_wait_for_events() {
    let mut driver = enabled(config());
    let mut outstanding = Vec::new();
    for _ in 0..ASYNC_EVENT_REQUEST_LIMIT {
        outstanding.push(driver.queue_command(0, command(OPC_ASYNC_EVENT_REQUEST).build(), true));
        assert_eq!(driver.reap(0), None, "held until an event");
    }
    assert_eq!(
        driver.controller.outstanding_async_event_requests(),
        ASYNC_EVENT_REQUEST_LIMIT
    );
    let cqe = driver.admin(command(OPC_ASYNC_EVENT_REQUEST).build());
    assert_eq!(cqe.status, Status::ASYNC_EVENT_LIMIT_EXCEEDED);

    // A doorbell beyond the admin SQ completes one request with an Error event.
    driver.write32(Doorbell::SubmissionTail(0).offset(), 16);
    let cqe = driver.reap(0).expect("event delivered");
    assert_eq!(cqe.command_id, outstanding[0]);
    assert_eq!(cqe.status, Status::SUCCESS);
    assert_eq!(
        cqe.result,
        u32::from(ERROR_INVALID_DOORBELL_VALUE) << 8 | u32::from(LOG_ERROR) << 16
    );
    // Further error events wait until the error log is read without RAE.
    driver.write32(Doorbell::CompletionHead(3).offset(), 0);
    assert_eq!(driver.reap(0), None);
    assert_eq!(driver.get_log_page(LOG_ERROR, 64, true).0, Status::SUCCESS);
    assert_eq!(driver.reap(0), None, "RAE keeps the event masked");
    assert_eq!(driver.get_log_page(LOG_ERROR, 64, false).0, Status::SUCCESS);
    let cqe = driver.reap(0).expect("unmasked by the log read");
    assert_eq!(cqe.command_id, outstanding[1]);
    assert_eq!(
        cqe.result,
        u32::from(ERROR_INVALID_DOORBELL_REGISTER) << 8 | u32::from(LOG_ERROR) << 16
    );

    // Namespace notices need Async Event Config bit 8.
    driver.controller.notify_namespace_changed(2);
    assert_eq!(driver.reap(0), None);
    driver.set_feature(FID_ASYNC_EVENT_CONFIG, AEC_NAMESPACE_ATTRIBUTE);
    driver.controller.notify_namespace_changed(3);
    let cqe = driver.reap(0).expect("notice delivered");
    assert_eq!(cqe.command_id, outstanding[2]);
    assert_eq!(cqe.result, 2 | u32::from(LOG_CHANGED_NAMESPACES) << 16);
    let (_, changed) = driver.get_log_page(LOG_CHANGED_NAMESPACES, 4096, false);
    assert_eq!(
        [le32(&changed, 0), le32(&changed, 4), le32(&changed, 8)],
        [2, 3, 0]
    );
    let (_, changed) = driver.get_log_page(LOG_CHANGED_NAMESPACES, 4096, false);
    assert_eq!(le32(&changed, 0), 0, "cleared by reading");

    // A reset drops outstanding requests without completing them.
    driver.disable();
    assert!(driver.enable(16, 16));
    assert_eq!(driver.controller.outstanding_async_event_requests(), 0);
    assert_eq!(driver.reap(0), None);
}

#[test]
fn abort_reports_not_aborted() {
    let mut driver = enabled(config());
    let cqe = driver.admin(command(OPC_ABORT).cdw(10, 5 << 16).build());
    assert_eq!((cqe.status, cqe.result & 1), (Status::SUCCESS, 1));
}

#[test]
fn doorbell_values_beyond_queue_size_are_ignored_and_counted() {
    let mut driver = enabled(config());
    assert_eq!(driver.create_cq(1, 8, 1), Status::SUCCESS);
    assert_eq!(driver.create_sq(1, 8, 1), Status::SUCCESS);
    let before = driver.controller.counters();
    driver.write32(Doorbell::SubmissionTail(0).offset(), 16);
    driver.write32(Doorbell::SubmissionTail(1).offset(), 8);
    driver.write32(Doorbell::SubmissionTail(1).offset(), 0x1_0001);
    driver.write32(Doorbell::CompletionHead(1).offset(), 8);
    driver.write32(Doorbell::CompletionHead(1).offset(), 3); // Nothing posted to consume.
    let after = driver.controller.counters();
    assert_eq!(
        after.invalid_doorbell_values - before.invalid_doorbell_values,
        5
    );
    assert!(driver
        .controller
        .io_queue_stats()
        .iter()
        .all(|s| s.commands == 0));
    // Doorbells of queues that do not exist.
    driver.write32(Doorbell::SubmissionTail(2).offset(), 1);
    driver.write32(Doorbell::CompletionHead(4).offset(), 1);
    driver.write32(Doorbell::SubmissionTail(100).offset(), 1);
    assert_eq!(driver.controller.counters().invalid_doorbell_registers, 3);
    assert_usable(&mut driver);
}

#[test]
fn invalid_register_accesses_are_counted() {
    let mut driver = enabled(config());
    let mut byte = [0u8; 1];
    driver.controller.mmio_read(REG_CSTS, &mut byte);
    driver.controller.mmio_write(REG_CC, &[0]);
    driver.controller.mmio_write(REG_CC + 2, &[0; 4]);
    driver.controller.mmio_write(REG_CC, &[0; 8]);
    assert_eq!(driver.controller.counters().invalid_register_accesses, 4);
    assert_eq!(driver.csts(), CSTS_RDY, "ignored, still enabled");
    assert_usable(&mut driver);
}

#[test]
fn reset_with_io_queues_created() {
    let mut driver = enabled(config());
    for qid in 1..=3 {
        assert_eq!(driver.create_cq(qid, 16, qid), Status::SUCCESS);
        assert_eq!(driver.create_sq(qid, 16, qid), Status::SUCCESS);
    }
    driver.queue_command(1, command(0x02).nsid(1).build(), true);
    driver.disable();
    assert_eq!(driver.csts() & CSTS_RDY, 0);
    assert!(
        driver.controller.io_queue_stats().is_empty(),
        "reset removes the I/O queues"
    );
    assert!(driver.pool.stats().iter().all(|worker| worker.queues == 0));
    let before = driver.controller.counters().invalid_doorbell_registers;
    driver.write32(Doorbell::SubmissionTail(1).offset(), 1);
    assert_eq!(
        driver.controller.counters().invalid_doorbell_registers,
        before + 1
    );
    assert!(driver.enable(16, 16));
    for qid in 1..=3 {
        assert_eq!(
            driver.create_cq(qid, 16, qid),
            Status::SUCCESS,
            "ids free again"
        );
        assert_eq!(driver.create_sq(qid, 16, qid), Status::SUCCESS);
    }
    assert_usable(&mut driver);
}

#[test]
fn the_observer_hears_of_resets_the_guest_makes_and_only_those() {
    use std::sync::{Arc, Mutex};

    use super::GuestReset;

    let heard = Arc::new(Mutex::new(Vec::new()));
    let mut driver = TestDriver::new(config());
    let sink = heard.clone();
    driver
        .controller
        .observe_guest_resets(Box::new(move |reset| sink.lock().unwrap().push(reset)));
    // Bring-up clears CC.EN that was never set (Linux does): not a reset.
    driver.disable();
    assert!(driver.enable(16, 16));
    driver.disable();
    driver.disable();
    assert!(driver.enable(16, 16));
    driver.write32(REG_NSSR, NSSR_RESET_VALUE);
    // Forced by the host: the VMM records those itself.
    driver.controller.subsystem_reset();
    assert_eq!(
        *heard.lock().unwrap(),
        [GuestReset::Controller, GuestReset::Subsystem]
    );
    assert_eq!(driver.controller.counters().resets, 3);
}

#[test]
fn shutdown_notification() {
    let mut driver = enabled(config());
    driver.write32(REG_CC, TestDriver::enabled_cc() | 1 << CC_SHN_SHIFT);
    assert_eq!(driver.csts() & CSTS_SHST_MASK, CSTS_SHST_COMPLETE);
    driver.write32(REG_CC, TestDriver::enabled_cc());
    assert_eq!(driver.csts() & CSTS_SHST_MASK, 0);
    driver.write32(REG_CC, TestDriver::enabled_cc() | 2 << CC_SHN_SHIFT);
    assert_eq!(
        driver.csts() & CSTS_SHST_MASK,
        CSTS_SHST_COMPLETE,
        "abrupt shutdown too"
    );
    driver.disable();
    assert_eq!(driver.csts(), 0);
}

#[test]
fn completion_phase_wraps_over_several_rounds() {
    let mut driver = TestDriver::new(config());
    assert!(driver.enable(3, 4));
    for round in 0..20 {
        let (status, _) = driver.identify(CNS_CONTROLLER, 0);
        assert_eq!(status, Status::SUCCESS, "command {round}");
    }
    // 20 entries through a 4-entry CQ: the phase flipped 5 times, the driver kept up.
    assert_eq!(driver.controller.counters().completions_held, 0);
    assert_eq!(driver.interrupt.take().len(), 20);
}

#[test]
fn full_completion_queue_holds_completions() {
    let mut driver = TestDriver::new(config());
    assert!(driver.enable(8, 3)); // The CQ holds 2 entries.
    let ids: Vec<u16> = (0..5)
        .map(|_| driver.queue_command(0, command(OPC_ABORT).build(), false))
        .collect();
    driver.ring_sq(0);
    assert_eq!(driver.controller.counters().completions_held, 3);
    let mut reaped = Vec::new();
    while let Some(cqe) = driver.reap_quietly(0) {
        reaped.push(cqe);
    }
    assert_eq!(reaped.len(), 2, "unconsumed entries were not overwritten");
    driver.ring_cq(0);
    while reaped.len() < 5 {
        let cqe = driver
            .reap(0)
            .expect("held completion posted after head moved");
        reaped.push(cqe);
    }
    assert_eq!(reaped.iter().map(|c| c.command_id).collect::<Vec<_>>(), ids);
    assert_eq!(
        reaped.last().unwrap().sq_head,
        5,
        "SQ head as of the command's completion"
    );
    assert_usable(&mut driver);
}
