//! Fault injection seen from a real Linux guest: blkswarm fails the reads and writes of a
//! sector range (set at start with `fault_error_sectors`), the guest's O_DIRECT requests to
//! those sectors fail, its kernel logs each one, every other request succeeds, the VMM stays
//! up, and the host's count of injected errors is what the guest saw.

use std::time::Duration;

use harness::report::guest_disk;
use harness::{GuestOutcome, GuestSpec, Mode, SharedRun};

/// Sectors 64..72: the guest's 4-KiB block 8.
const BAD_SECTORS: &str = "64-72";

fn fault_io(name: &str, option: &str, disk: &str) -> GuestSpec {
    GuestSpec::new(name, "fault-io")
        .cpus(1, 1)
        .timeout(Duration::from_secs(120))
        .arg(option)
        .arg(format!("{disk},fault_error_sectors={BAD_SECTORS}"))
}

fn specs(_mode: Mode) -> Vec<GuestSpec> {
    vec![
        fault_io("virtio_faults", "--disk", "backend=null,size=64M"),
        fault_io(
            "nvme_faults",
            "--nvme",
            "backend=null,size=64M,max_ioqpairs=1",
        ),
    ]
}

static RUN: SharedRun = SharedRun::new(specs);

fn check(o: &GuestOutcome) {
    // Block 8, and only it, fails both ways.
    assert_eq!(o.get_all("read_failed"), ["8"], "{}", o.describe_tail());
    assert_eq!(o.get_all("write_failed"), ["8"]);
    o.expect_result("failed_reads", "1");
    o.expect_result("failed_writes", "1");
    let logged: u64 = o.get("kernel_io_errors").unwrap().parse().unwrap();
    assert_eq!(logged, 2, "the guest kernel logged each failed request");
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        disk["faults_injected"]["errors"], 2,
        "host injections = guest failures: {}",
        disk["faults_injected"]
    );
    // Everything else was served: 32 requests of the scenario minus the 2 that failed
    // reached the guest's block layer accounting as completed, and the host agrees.
    let guest_requests: u64 = o.get("disk_requests").unwrap().parse().unwrap();
    let (host_requests, _) = harness::report::requests_and_samples(&disk);
    assert_eq!(host_requests, guest_requests);
}

#[test]
fn virtio_blk_fails_the_injected_sectors_and_nothing_else() {
    check(RUN.clean("virtio_faults"));
}

#[test]
fn nvme_fails_the_injected_sectors_with_media_errors() {
    check(RUN.clean("nvme_faults"));
}
