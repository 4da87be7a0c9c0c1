//! S3 (../shared/SCENARIOS.md): an NVM subsystem of two controllers sharing one namespace
//! (an image file), with ANA. The guest builds one multipath disk over both paths and runs
//! fio with crc32c verification on it while the host, through the control socket, makes
//! the preferred path inaccessible, brings it back through the change state, then fails
//! it (fatal status) so the guest resets it; later the guest resets that controller itself
//! (sysfs `reset_controller`). A second guest has the path held down past its I/O timeout,
//! then the whole subsystem reset (NSSR) under I/O. fio must finish without an error;
//! nvme-cli must show the topology and ANA states; the host's report must hold each event,
//! the host's and the guest's resets, with the stall it caused and show the failed path
//! serving again. A third guest sees a group left in the change state past its ANA
//! transition time (ANATT 2 s) and resets the controller, as Linux does after 2 x ANATT,
//! then the other path non-optimized and in persistent loss. A fourth has four null
//! namespaces dealt into two ANA groups (`ana_groups=2`) and sees each group's namespaces
//! change state together, on one path at a time.

use std::time::Duration;

use harness::{guest_with_ctl, scratch_dir, words, GuestOutcome, GuestSpec, Mode, SharedRun};

const PATH_A: &str = "0000:00:01.0";
const PATH_B: &str = "0000:00:02.0";

/// fio verify over the multipath disk of a two-controller subsystem on a fresh image while
/// `requests` go to the control socket (each after its delay in seconds); `nvme_keys` are
/// added to the controllers' option. fio runs for 30 s; the requests start 4 s into it.
fn multipath_guest(
    name: &str,
    mode: Mode,
    (cmdline, nvme_keys): (&str, &str),
    requests: &[(u32, &str)],
) -> GuestSpec {
    let image = format!("{}/shared.img", scratch_dir(name, mode));
    let guest = GuestSpec::new("multipath", "multipath")
        .cpus(2, 2)
        // About a minute in the lab (30 s of fio, boot, setup); a lab that hangs is
        // noticed at this plus the harness's grace, then retried.
        .timeout(Duration::from_secs(180))
        // fio at full rate (no rate cap): every transition finds requests in flight on
        // both paths.
        .cmdline("nvme_core.io_timeout=5 blkswarm.iodepth=8 blkswarm.runtime=30")
        .cmdline(cmdline)
        .arg("--nvme")
        .arg(format!(
            "path={image},controllers=2,max_ioqpairs=2{nvme_keys}"
        ));
    let setup = format!("dd if=/dev/zero of={image} bs=1M count=0 seek=64 2>/dev/null");
    // Its setup makes the image it uses: it may run again alone after a lab failure.
    guest_with_ctl(name, mode, guest, &setup, requests).self_contained()
}

/// Four null namespaces in two ANA groups (odd nsids in group 1, even in group 2) on both
/// controllers. No I/O (null namespaces hold no data to verify): the guest watches its eight
/// paths while A's group 2 becomes inaccessible and B's group 1 non-optimized.
fn grouped_guest(mode: Mode) -> GuestSpec {
    let guest = GuestSpec::new("multipath", "multipath")
        .cpus(2, 2)
        .timeout(Duration::from_secs(150))
        .cmdline("blkswarm.mp_watch=1 blkswarm.runtime=10")
        .arg("--nvme")
        .arg("backend=null,size=64M,namespaces=4,controllers=2,max_ioqpairs=2,ana_groups=2");
    let requests = [
        format!("ana group=2 state=inaccessible pci={PATH_A}"),
        format!("ana group=1 state=non-optimized pci={PATH_B}"),
    ];
    let requests = [(0, requests[0].as_str()), (1, requests[1].as_str())];
    guest_with_ctl("multipath_groups", mode, guest, "true", &requests).self_contained()
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    let a = |request: &str| format!("{request} pci={PATH_A}");
    let b = |request: &str| format!("{request} pci={PATH_B}");
    let (inaccessible, back, fatal) = (
        a("ana group=1 state=inaccessible"),
        a("ana group=1 state=optimized via_change_ms=1500"),
        a("fatal"),
    );
    let (fail, restore, reset) = (a("fail"), a("restore"), a("reset"));
    vec![
        // Inaccessible at 4 s, optimized again at 9.5 s, fatal at 13 s (the guest resets A
        // at its I/O timeout, about 18 s); the guest resets A itself after 21 s.
        multipath_guest(
            "multipath",
            mode,
            (&format!("blkswarm.reset={PATH_A}@21"), ""),
            &[(0, &inaccessible), (4, &back), (5, &fatal)],
        ),
        // A path down for longer than the guest's I/O timeout: its reset waits for the
        // controller to become ready (up to CAP.TO, 15 s), which it does at the restore
        // (13 s). At 18 s the whole subsystem resets: both paths lose their commands until
        // the guest's I/O timeout.
        multipath_guest(
            "multipath_down",
            mode,
            ("", ""),
            &[(0, &fail), (9, &restore), (5, &reset)],
        ),
        // A's group changing from 4 s to 11 s with ANATT 2 s: Linux arms a 2 x ANATT timer
        // when it reads the change state and resets A when it fires (about 8 s), then finds
        // the group still changing; at 11 s it is optimized again. Then B goes through the
        // two states no other guest sees: non-optimized (13 s), persistent loss (15 s), and
        // back to optimized (17 s).
        multipath_guest(
            "multipath_anatt",
            mode,
            ("blkswarm.runtime=24", ",anatt=2"),
            &[
                (0, &a("ana group=1 state=change")),
                (7, &a("ana group=1 state=optimized")),
                (2, &b("ana group=1 state=non-optimized")),
                (2, &b("ana group=1 state=persistent-loss")),
                (2, &b("ana group=1 state=optimized")),
            ],
        ),
        grouped_guest(mode),
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

/// fio finished without an error, the guest logged a controller reset, and both paths
/// ended optimized and live.
fn assert_fio_clean_and_paths_back(o: &GuestOutcome) {
    o.expect_result("nvme_io_timeout", "5");
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
}

/// The report's path events made `by` the host or the guest, and the control socket's
/// answers (none an error).
fn path_events(o: &GuestOutcome, by: &str) -> Vec<serde_json::Value> {
    let answers = o.get_all("ctl_answer");
    assert!(
        answers.iter().all(|a| !a.contains("\"error\"")),
        "{answers:?}"
    );
    let events = o.report_json()["path_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for event in &events {
        assert!(event["subsystem_stall_ms"].as_f64().is_some(), "{event}");
    }
    events.into_iter().filter(|e| e["by"] == by).collect()
}

fn names(events: &[serde_json::Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["event"].as_str()).collect()
}

/// `event: stall ms, back ms` for each event, for the test's output.
fn stalls(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {}: stall {} ms, back {} ms",
                e["pci"].as_str().unwrap_or("?"),
                e["event"].as_str().unwrap_or("?"),
                e["subsystem_stall_ms"],
                e["controller_back_ms"]
            )
        })
        .collect()
}

#[test]
fn fio_verify_runs_clean_through_the_ana_flips_and_the_resets() {
    let o = run();
    assert_fio_clean_and_paths_back(o);
    // The guest saw the inaccessible path while it lasted, and logged the reset.
    let samples = o.get_all("mp_sample");
    assert!(
        samples.iter().any(|s| s.contains("=inaccessible/")),
        "no sample saw the inaccessible path: {samples:#?}"
    );
    // The guest's kernel logged each ANA state it read from the controllers: A's
    // inaccessible and change states, and optimized again.
    let logged = o.get_all("mp_kernel");
    for state in ["inaccessible", "change", "optimized"] {
        let line = format!("ANA group 1: {state}.");
        assert!(
            logged.iter().any(|l| l.contains(&line)),
            "the guest never logged {line:?}: {logged:#?}"
        );
    }
    eprintln!("multipath: the guest logged {logged:#?}");
    // The guest's own reset of A, under fio, brought it back live.
    let reset = o.get("mp_guest_reset").expect("the guest reset A");
    let fields = words(reset);
    assert_eq!(fields.get("pci"), Some(&PATH_A), "{reset}");
    assert_eq!(fields.get("rc"), Some(&"0"), "{reset}");
    assert_eq!(fields.get("state"), Some(&"live"), "{reset}");
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
    assert_eq!(o.get_all("ctl_answer").len(), 3);
    let host = path_events(o, "host");
    assert_eq!(
        names(&host),
        [
            "ana group=1 state=inaccessible",
            "ana group=1 state=change",
            "ana group=1 state=optimized",
            "fatal",
        ],
        "{host:#?}"
    );
    assert!(host.iter().all(|e| e["pci"] == PATH_A), "{host:#?}");
    // The failed controller was reset by the guest and served commands again.
    let fatal = &host[3];
    assert!(
        fatal["controller_back_ms"].as_f64().is_some(),
        "path A never came back: {fatal}"
    );
    // The guest's resets of A: its recovery from the fatal status, then its own through
    // sysfs; after each, A served again.
    let guest = path_events(o, "guest");
    let resets: Vec<_> = guest
        .iter()
        .filter(|e| e["pci"] == PATH_A && e["event"] == "reset")
        .collect();
    assert!(resets.len() >= 2, "{guest:#?}");
    for reset in &resets {
        assert!(
            reset["controller_back_ms"].as_f64().is_some(),
            "A did not serve after the guest's reset: {reset}"
        );
    }
    let report = o.report_json();
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
        "multipath: host {:#?}\nguest {:#?}",
        stalls(&host),
        stalls(&guest)
    );
}

#[test]
fn a_path_held_down_then_a_subsystem_reset_under_io() {
    let o = RUN.clean("multipath_down");
    assert_fio_clean_and_paths_back(o);
    let answers = o.get_all("ctl_answer");
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(answers[0].contains("\"held_down\":true"), "{answers:?}");
    assert!(answers[1].contains("\"held_down\":false"), "{answers:?}");
    let host = path_events(o, "host");
    assert_eq!(
        names(&host),
        ["fail", "restore", "reset (subsystem, 2 controllers)"],
        "{host:#?}"
    );
    for event in &host[1..] {
        assert!(
            event["controller_back_ms"].as_f64().is_some(),
            "path A served nothing after: {event}"
        );
    }
    let report = o.report_json();
    for disk in report["disks"].as_array().unwrap() {
        assert_eq!(disk["controller"]["subsystem_resets"], 1, "{disk}");
    }
    eprintln!(
        "multipath_down: host {:#?}\nguest {:#?}",
        stalls(&host),
        stalls(&path_events(o, "guest"))
    );
}

#[test]
fn a_group_changing_past_anatt_makes_the_guest_reset_the_controller() {
    let o = RUN.clean("multipath_anatt");
    assert_fio_clean_and_paths_back(o);
    let logged = o.get_all("mp_kernel");
    assert!(
        logged
            .iter()
            .any(|l| l.contains("ANATT timeout, resetting controller")),
        "the guest did not time out the transition: {logged:#?}"
    );
    let host = path_events(o, "host");
    assert_eq!(
        names(&host),
        [
            "ana group=1 state=change",
            "ana group=1 state=optimized",
            "ana group=1 state=non-optimized",
            "ana group=1 state=persistent-loss",
            "ana group=1 state=optimized",
        ],
        "{host:#?}"
    );
    // The guest saw B non-optimized, then lost, and logged each state it read.
    let samples = o.get_all("mp_sample");
    for state in ["non-optimized", "persistent-loss"] {
        assert!(
            samples.iter().any(|s| s.contains(&format!("={state}/"))),
            "no sample saw a {state} path: {samples:#?}"
        );
        let line = format!("ANA group 1: {state}.");
        assert!(
            logged.iter().any(|l| l.contains(&line)),
            "the guest never logged {line:?}: {logged:#?}"
        );
    }
    // The guest reset A while its group was changing (between the two host events).
    let guest = path_events(o, "guest");
    let (changed, optimized) = (host[0]["at_ms"].as_f64(), host[1]["at_ms"].as_f64());
    assert!(
        guest.iter().any(|e| e["pci"] == PATH_A
            && e["event"] == "reset"
            && e["at_ms"].as_f64() > changed
            && e["at_ms"].as_f64() < optimized),
        "no guest reset of A while it was changing: {guest:#?}"
    );
    assert!(
        host[1]["controller_back_ms"].as_f64().is_some(),
        "A served nothing once optimized: {:#?}",
        host[1]
    );
    eprintln!(
        "multipath_anatt: host {:#?}\nguest {:#?}\nthe guest logged {logged:#?}",
        stalls(&host),
        stalls(&guest)
    );
}

#[test]
fn namespaces_of_one_ana_group_change_state_together() {
    let o = RUN.clean("multipath_groups");
    eprintln!(
        "multipath_groups: {:#?}",
        o.results
            .iter()
            .filter(|(key, _)| key.starts_with("mp_") || key == "ctl_answer")
            .collect::<Vec<_>>()
    );
    let host = path_events(o, "host");
    assert_eq!(
        names(&host),
        [
            "ana group=2 state=inaccessible",
            "ana group=1 state=non-optimized"
        ],
        "{host:#?}"
    );
    // Controller instance (nvme1) -> PCI address, from nvme-cli's list-subsys.
    let listed = o.get("mp_list_subsys_after").expect("list-subsys");
    let tokens: Vec<&str> = listed.split_whitespace().collect();
    let addresses: std::collections::BTreeMap<&str, &str> = tokens
        .windows(2)
        .filter_map(|pair| {
            let name = pair[0].strip_prefix("Name:")?;
            Some((name, pair[1].strip_prefix("Address:")?))
        })
        .collect();
    assert_eq!(addresses.len(), 2, "{listed}");
    // Each controller's ANA log, as nvme-cli read it: both groups with this path's states.
    for log in o.get_all("mp_ana_log_after") {
        let controller = log.split_whitespace().next().unwrap();
        let expected = match addresses[controller] {
            PATH_A => "grpid:1 state:optimized grpid:2 state:inaccessible",
            _ => "grpid:1 state:non-optimized grpid:2 state:optimized",
        };
        assert!(
            log.trim_end().ends_with(expected),
            "{log}: expected {expected}"
        );
    }
    let states = words(o.get("mp_paths_after").expect("paths"));
    let groups = o.get_all("mp_path_group");
    assert_eq!(groups.len(), 8, "4 namespaces x 2 paths: {groups:?}");
    for line in groups {
        let fields = words(line);
        let path = line.split_whitespace().next().unwrap();
        let nsid: u32 = fields["nsid"].parse().unwrap();
        let group: u32 = fields["grpid"].parse().unwrap();
        assert_eq!(group, (nsid - 1) % 2 + 1, "ANAGRPID Linux read: {line}");
        // nvme<S>c<C>n<N>: the path through controller nvme<C>.
        let controller = format!(
            "nvme{}",
            &path[path.find('c').unwrap() + 1..path.rfind('n').unwrap()]
        );
        let address = addresses[controller.as_str()];
        let expected = match (address, group) {
            (PATH_A, 2) => "inaccessible/live",
            (PATH_B, 1) => "non-optimized/live",
            _ => "optimized/live",
        };
        assert_eq!(
            states.get(path),
            Some(&expected),
            "{path} ({address}, group {group})"
        );
    }
}
