//! The stress suite in CI's short form (`bash run.sh stress --short` runs the same guests;
//! `bash run.sh stress` the full one): fio at full rate on every disk of 16 raw images and of
//! 4 NVMe controllers x 8 queues (crc32c verify, then randrw 70/30), randrw on 100 null disks; fio verify on a multipath disk
//! through ANA flips and a controller failure; 300 disks booting to a count. Each guest must
//! complete with no fio error and no kernel I/O error; lab failures are retried by the
//! harness, and counted and printed (`harness: LAB FAILURE ...`).

use harness::stress::{self, RunEnd, StressConfig, Vmm};
use harness::{words, GuestOutcome, Mode, SharedRun};

fn config() -> StressConfig {
    StressConfig {
        runs: 1,
        vmms: vec![Vmm::Blkswarm],
        runtime_s: 10,
        short: true,
        only: Vec::new(),
    }
}

static RUN: SharedRun = SharedRun::new(|mode: Mode| stress::plan(&config(), mode, None).specs);

fn completed(guest: &str) -> &'static GuestOutcome {
    let o = RUN.clean(&format!("{guest}-blkswarm-1"));
    assert_eq!(
        stress::classify(o, Vmm::Blkswarm),
        RunEnd::Completed,
        "{}",
        o.describe_tail()
    );
    o
}

/// The `stress_phase=PHASE ...` line's words.
fn phase<'a>(o: &'a GuestOutcome, name: &str) -> std::collections::BTreeMap<&'a str, &'a str> {
    o.get_all("stress_phase")
        .into_iter()
        .map(|v| (v, words(v)))
        .find(|(v, _)| v.split_whitespace().next() == Some(name))
        .map(|(_, w)| w)
        .unwrap_or_else(|| panic!("no stress_phase={name} line: {:?}", o.results))
}

fn num(words: &std::collections::BTreeMap<&str, &str>, key: &str) -> u64 {
    words
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {words:?}"))
}

/// Each phase ran one job per disk, every job succeeded, the verify phase (if any) read
/// back what it wrote, and the kernel logged no I/O error, timeout or reset.
fn check_fio_on_every_disk(guest: &str, disks: u64, phases: &[&str]) {
    let o = completed(guest);
    for &name in phases {
        let p = phase(o, name);
        assert_eq!(num(&p, "jobs"), disks, "{name}: {p:?}");
        assert_eq!(num(&p, "jobs_failed"), 0, "{name}: {p:?}");
        assert!(num(&p, "write_ios") > 0, "{name}: {p:?}");
        assert!(num(&p, "read_ios") > 0, "{name}: {p:?}");
    }
    if phases.contains(&"verify") {
        assert_eq!(phase(o, "verify").get("verify"), Some(&"ok"));
    }
    for key in [
        "kernel_io_errors",
        "kernel_timeouts",
        "kernel_resets",
        "read_after_failed",
    ] {
        o.expect_result(key, "0");
    }
}

#[test]
fn raw16_fio_verify_and_randrw_on_16_raw_images() {
    check_fio_on_every_disk("raw16", 16, &["verify", "randrw"]);
}

#[test]
fn null100_fio_randrw_on_100_disks() {
    check_fio_on_every_disk("null100", 100, &["randrw"]);
}

#[test]
fn nvme4x8_fio_on_every_namespace_of_4_controllers_with_8_queues() {
    check_fio_on_every_disk("nvme4x8", 4, &["verify", "randrw"]);
    // The guest's 4 vCPUs each got an I/O queue on every controller.
    let o = completed("nvme4x8");
    let live: Vec<u64> = o
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm nvme "))
        .filter_map(|l| words(l).get("io_queues_ever").and_then(|v| v.parse().ok()))
        .collect();
    assert_eq!(live.len(), 4, "{live:?}");
    assert!(live.iter().all(|&q| q >= 4), "{live:?}");
}

#[test]
fn multipath_fio_verify_at_full_rate_through_ana_flips_and_a_fatal_controller() {
    let o = completed("multipath");
    // verify_fatal: the first bad block would have failed fio.
    o.expect_result("fio_rc", "0");
    o.expect_result("fio_errors", "0");
    // Both paths carried I/O: the host moved it off A and back.
    let per_path = o.get_all("mp_path_requests");
    assert_eq!(per_path.len(), 2, "{per_path:?}");
    for line in per_path {
        let requests: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(requests > 0, "a path that carried nothing: {line}");
    }
    let answers = o.get_all("ctl_answer");
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers.iter().all(|a| !a.contains("\"error\"")),
        "{answers:?}"
    );
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(
        resets >= 1,
        "the guest logged no reset of the fatal controller"
    );
}

#[test]
fn disks300_boot_to_a_count() {
    let o = completed("disks1000");
    let seen: u64 = o.get("disks").and_then(|v| v.parse().ok()).unwrap_or(0);
    let host = o
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix("@@vmm disks total="))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok());
    assert_eq!(host, Some(300), "{}", o.describe_tail());
    // Two vCPUs hold interrupt vectors for about 134 disks (S1): the rest fail probe.
    assert!((100..=300).contains(&seen), "the guest saw {seen} disks");
}
