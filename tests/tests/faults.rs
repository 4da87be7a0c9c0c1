//! Fault injection seen from a real Linux guest: blkswarm fails the reads and writes of a
//! sector range (set at start with `fault_error_sectors`), the guest's O_DIRECT requests to
//! those sectors fail, its kernel logs each one, every other request succeeds, the VMM stays
//! up, and the host's count of injected errors is what the guest saw. And at run time: an
//! NVMe controller put in fatal status through the control socket while fio runs is reset
//! by the guest, and fio finishes without an error; a controller that completes nothing
//! for a second sends the guest through its timeout path (abort, reset) and serves I/O
//! afterwards; a host-forced NVM Subsystem Reset is noticed and recovered from the same way.

use std::time::Duration;

use harness::report::guest_disk;
use harness::{guest_with_ctl, GuestOutcome, GuestSpec, Mode, SharedRun};

/// Sectors 64..72: the guest's 4-KiB block 8.
const BAD_SECTORS: &str = "64-72";

fn fault_io(name: &str, option: &str, disk: &str) -> GuestSpec {
    GuestSpec::new(name, "fault-io")
        .cpus(1, 1)
        .timeout(Duration::from_secs(120))
        .arg(option)
        .arg(format!("{disk},fault_error_sectors={BAD_SECTORS}"))
        .self_contained()
}

/// fio on an NVMe controller (the guest times I/O out after 5 s); once it runs, `requests`
/// go to blkswarm's control socket, a second apart. fio runs at full rate with 16 commands in
/// flight, each taking 1 ms in the backend: the host's request always finds commands in
/// flight (with the backend's bare microseconds the host often held none), and the guest
/// submits as fast as the lab lets it.
fn nvme_fio_then_ctl(name: &str, mode: Mode, requests: &[&str]) -> GuestSpec {
    let guest = GuestSpec::new("fio", "fio")
        .cpus(2, 2)
        .timeout(Duration::from_secs(150))
        .cmdline(
            "nvme_core.io_timeout=5 blkswarm.rw=randread blkswarm.bs=4k blkswarm.iodepth=16 \
             blkswarm.numjobs=1 blkswarm.runtime=25 blkswarm.ioengine=libaio blkswarm.direct=1",
        )
        .arg("--nvme")
        .arg("backend=null,size=64M,max_ioqpairs=2,latency_us=1000");
    let requests: Vec<(u32, &str)> = (0..)
        .zip(requests)
        .map(|(index, request)| (u32::from(index > 0), *request))
        .collect();
    guest_with_ctl(name, mode, guest, "", &requests).self_contained()
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    vec![
        fault_io("virtio_faults", "--disk", "backend=null,size=64M"),
        fault_io(
            "nvme_faults",
            "--nvme",
            "backend=null,size=64M,max_ioqpairs=1",
        ),
        nvme_fio_then_ctl("nvme_fatal_during_fio", mode, &["fatal pci=0000:00:01.0"]),
        // For a second no command completes: the guest's timeout handling (abort, then a
        // controller reset) fails them and must leave the disk serving I/O.
        nvme_fio_then_ctl(
            "nvme_stuck_during_fio",
            mode,
            &[
                "fault pci=0000:00:01.0 stuck_rate=1",
                "fault pci=0000:00:01.0 clear",
            ],
        ),
        // The host resets the NVM subsystem under fio: the commands in flight are gone, the
        // guest finds CSTS.NSSRO at its next timeout and brings the controller up again.
        nvme_fio_then_ctl(
            "nvme_subsystem_reset_during_fio",
            mode,
            &["reset pci=0000:00:01.0"],
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

#[test]
fn an_nvme_controller_failed_at_run_time_is_reset_by_the_guest_and_io_resumes() {
    let o = RUN.clean("nvme_fatal_during_fio");
    let answer = o.get("ctl_answer").expect("ctl_answer");
    assert!(answer.contains("\"fatal_errors\":1"), "{answer}");
    o.expect_result("fio_rc", "0");
    o.expect_result("fio_errors", "0");
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(resets >= 1, "the guest logged no controller reset");
    // The host saw the guest's reset (CC.EN 1 -> 0 after the fatal status; the guest's
    // shutdown at power-off may add one) and the controller served I/O again.
    let controller = o.vmm_line("nvme").expect("an @@vmm nvme line");
    assert_eq!(controller.get("fatal_errors"), Some(&"1"), "{controller:?}");
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        disk["controller"]["resets"].as_u64().unwrap_or(0) >= 1,
        "{}",
        disk["controller"]
    );
    let guest_requests: u64 = o.get("disk_requests").unwrap().parse().unwrap();
    let (host_requests, _) = harness::report::requests_and_samples(&disk);
    assert!(guest_requests > 0 && host_requests >= guest_requests);
}

/// Linux fails a command that timed out and needed a controller reset: fio either finished
/// or stopped at that EIO (it would go on with continue_on_error); nothing else.
fn fio_ended_or_met_eio(o: &GuestOutcome) {
    let fio_rc = o.get("fio_rc").unwrap_or("?");
    assert!(
        fio_rc == "0" || o.get("fio_error") == Some("5"),
        "fio_rc={fio_rc} fio_error={:?}",
        o.get("fio_error")
    );
}

#[test]
fn nvme_commands_that_never_complete_go_through_the_guest_timeout_path() {
    let o = RUN.clean("nvme_stuck_during_fio");
    let answer = o.get("ctl_answer").expect("ctl_answer");
    assert!(answer.contains("stuck_rate: 0.0"), "cleared: {answer}");
    fio_ended_or_met_eio(o);
    let timeouts: u64 = o.get("kernel_timeouts").unwrap().parse().unwrap();
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(
        timeouts >= 1 && resets >= 1,
        "timeouts {timeouts}, resets {resets}"
    );
    o.expect_result("read_after", "ok");
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    let stuck = disk["faults_injected"]["stuck"].as_u64().unwrap_or(0);
    assert!(stuck >= 1, "nothing got stuck: {}", disk["faults_injected"]);
    assert!(disk["controller"]["resets"].as_u64().unwrap_or(0) >= 1);
}

#[test]
fn a_host_forced_subsystem_reset_is_recovered_by_the_guest() {
    let o = RUN.clean("nvme_subsystem_reset_during_fio");
    let answer = o.get("ctl_answer").expect("ctl_answer");
    assert!(answer.contains("\"subsystem_resets\":1"), "{answer}");
    // The reads in flight at the reset never complete: Linux times them out, reads CSTS,
    // sees NSSRO ("will reset") and resets the controller.
    fio_ended_or_met_eio(o);
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(resets >= 1, "the guest logged no controller reset");
    o.expect_result("read_after", "ok");
    let controller = o.vmm_line("nvme").expect("an @@vmm nvme line");
    assert_eq!(
        controller.get("subsystem_resets"),
        Some(&"1"),
        "{controller:?}"
    );
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        disk["controller"]["subsystem_resets"], 1,
        "{}",
        disk["controller"]
    );
}
