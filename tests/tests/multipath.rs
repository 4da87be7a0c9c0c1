//! S3 (../shared/SCENARIOS.md): an NVM subsystem of two controllers sharing one namespace
//! (an image file), with ANA. The guest builds one multipath disk over both paths and runs
//! fio with crc32c verification on it while the host, through the control socket, makes
//! the preferred path inaccessible, brings it back through the change state, then fails
//! it (fatal status) so the guest resets it. fio must finish without an error; nvme-cli
//! must show the topology and ANA states; the host's report must hold each event with the
//! stall it caused and show the failed path serving again.

use std::time::Duration;

use harness::{guest_with_ctl, scratch_dir, words, GuestOutcome, GuestSpec, Mode, SharedRun};

const PATH_A: &str = "0000:00:01.0";
const PATH_B: &str = "0000:00:02.0";

/// fio verify over the multipath disk of a two-controller subsystem on a fresh image while
/// `requests` go to the control socket (each after its delay in seconds).
fn multipath_guest(name: &str, mode: Mode, requests: &[(u32, &str)]) -> GuestSpec {
    let image = format!("{}/shared.img", scratch_dir(name, mode));
    let guest = GuestSpec::new("multipath", "multipath")
        .cpus(2, 2)
        .timeout(Duration::from_secs(240))
        .cmdline("nvme_core.io_timeout=5 blkswarm.iodepth=8 blkswarm.runtime=24")
        .arg("--nvme")
        .arg(format!("path={image},controllers=2,max_ioqpairs=2"));
    let setup = format!("dd if=/dev/zero of={image} bs=1M count=0 seek=64 2>/dev/null");
    guest_with_ctl(name, mode, guest, &setup, requests)
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    let a = |request: &str| format!("{request} pci={PATH_A}");
    let (inaccessible, back, fatal) = (
        a("ana group=1 state=inaccessible"),
        a("ana group=1 state=optimized via_change_ms=1500"),
        a("fatal"),
    );
    let (fail, restore) = (a("fail"), a("restore"));
    vec![
        multipath_guest(
            "multipath",
            mode,
            &[(0, &inaccessible), (4, &back), (5, &fatal)],
        ),
        // A path down for longer than the guest's I/O timeout: its reset waits for the
        // controller to become ready (up to CAP.TO, 15 s), which it does at the restore.
        multipath_guest("multipath_down", mode, &[(0, &fail), (9, &restore)]),
    ]
}

static RUN: SharedRun = SharedRun::new(specs);

fn run() -> &'static GuestOutcome {
    RUN.clean("multipath")
}

#[test]
fn the_guest_builds_one_multipath_disk_over_both_controllers() {
    let o = run();
    let subsystem = o.get("mp_subsys").expect("an nvme-subsystem in sysfs");
    let fields = words(subsystem);
    assert_eq!(fields.get("controllers"), Some(&"2"), "{subsystem}");
    assert_eq!(fields.get("iopolicy"), Some(&"round-robin"), "{subsystem}");
    assert!(
        fields
            .get("nqn")
            .is_some_and(|nqn| nqn.starts_with("nqn.2024-01.dev.blkswarm:subsys:")),
        "{subsystem}"
    );
    assert_eq!(o.get_all("mp_subsys").len(), 1, "one subsystem");
    // Both paths of namespace 1, optimized and live before anything happened.
    let before = o.get("mp_paths_before").unwrap();
    let paths = words(before);
    assert_eq!(paths.len(), 2, "{before}");
    assert!(
        paths.values().all(|state| *state == "optimized/live"),
        "{before}"
    );
    // nvme-cli sees the same: the subsystem's two PCIe paths and each controller's ANA log.
    let listed = o.get("mp_list_subsys_before").unwrap();
    for address in [PATH_A, PATH_B] {
        assert!(listed.contains(address), "{address} in {listed}");
    }
    let logs = o.get_all("mp_ana_log_before");
    assert_eq!(logs.len(), 2, "{logs:?}");
    for log in logs {
        assert!(
            log.contains("grpid:1") && log.contains("state:optimized"),
            "{log}"
        );
    }
}

#[test]
fn fio_verify_runs_clean_through_the_ana_flips_and_the_reset() {
    let o = run();
    o.expect_result("nvme_io_timeout", "5");
    o.expect_result("fio_rc", "0");
    o.expect_result("fio_errors", "0");
    // The guest saw the inaccessible path while it lasted, and logged the reset.
    let samples = o.get_all("mp_sample");
    assert!(
        samples.iter().any(|s| s.contains("=inaccessible/")),
        "no sample saw the inaccessible path: {samples:#?}"
    );
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(resets >= 1, "the guest logged no controller reset");
    assert!(!o.get_all("mp_kernel").is_empty(), "nothing logged");
    // At the end both paths are back: optimized and live.
    let after = o.get("mp_paths_after").unwrap();
    assert!(
        words(after)
            .values()
            .all(|state| *state == "optimized/live"),
        "{after}"
    );
    // Both paths carried I/O (the host moved it off A, then A's reset moved it again).
    let per_path = o.get_all("mp_path_requests");
    assert_eq!(per_path.len(), 2, "{per_path:?}");
    for line in per_path {
        let requests: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(requests > 0, "a path that carried nothing: {line}");
    }
}

#[test]
fn the_host_report_holds_each_event_and_its_stall() {
    let o = run();
    let answers = o.get_all("ctl_answer");
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers.iter().all(|a| !a.contains("\"error\"")),
        "{answers:?}"
    );
    let report = o.report_json();
    let events = report["path_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        names,
        [
            "ana group=1 state=inaccessible",
            "ana group=1 state=change",
            "ana group=1 state=optimized",
            "fatal",
        ],
        "{events:#?}"
    );
    for event in &events {
        assert_eq!(event["pci"], PATH_A);
        assert!(event["subsystem_stall_ms"].as_f64().is_some(), "{event}");
    }
    // The failed controller was reset by the guest and served commands again.
    let fatal = &events[3];
    assert!(
        fatal["controller_back_ms"].as_f64().is_some(),
        "path A never came back: {fatal}"
    );
    for disk in report["disks"].as_array().unwrap() {
        let controller = &disk["controller"];
        assert_eq!(controller["ana_states"], serde_json::json!(["optimized"]));
        assert!(controller["subsystem"].as_str().is_some(), "{controller}");
    }
    let a = report["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["pci"] == PATH_A)
        .unwrap();
    assert_eq!(a["controller"]["fatal_errors"], 1);
    assert_eq!(a["controller"]["ana_changes"], 3);
    eprintln!(
        "multipath: stalls (ms) {:?}; path A back after {} ms",
        events
            .iter()
            .map(|e| (
                e["event"].as_str().unwrap_or("?"),
                e["subsystem_stall_ms"].as_f64()
            ))
            .collect::<Vec<_>>(),
        fatal["controller_back_ms"]
    );
}

#[test]
fn a_path_held_down_past_the_io_timeout_comes_back_at_its_restore() {
    let o = RUN.clean("multipath_down");
    o.expect_result("fio_rc", "0");
    o.expect_result("fio_errors", "0");
    let resets: u64 = o.get("kernel_resets").unwrap().parse().unwrap();
    assert!(resets >= 1, "the guest logged no controller reset");
    let after = o.get("mp_paths_after").unwrap();
    assert!(
        words(after)
            .values()
            .all(|state| *state == "optimized/live"),
        "{after}"
    );
    let answers = o.get_all("ctl_answer");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(answers[0].contains("\"held_down\":true"), "{answers:?}");
    assert!(answers[1].contains("\"held_down\":false"), "{answers:?}");
    let report = o.report_json();
    let events = report["path_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["fail", "restore"], "{events:#?}");
    assert!(
        events[1]["controller_back_ms"].as_f64().is_some(),
        "path A served nothing after its restore: {:#?}",
        events[1]
    );
    eprintln!(
        "multipath_down: stall after fail {:?} ms, after restore {:?} ms; path A back {:?} ms after the restore",
        events[0]["subsystem_stall_ms"], events[1]["subsystem_stall_ms"], events[1]["controller_back_ms"]
    );
}
