//! S4 (../shared/SCENARIOS.md) as `bash run.sh s4` runs it: a disk with one actuator (every
//! read and write occupies it for ~12 ms on average, one queue of 32), ext4 on it,
//! mq-deadline, a random-read flood at full rate (2 jobs x QD 32, 40 s, 2 vCPUs), a
//! buffered writer (256 MiB) and a committer that appends 4 KiB and runs `sync` every
//! 0.5 s. Beside it a control: the same disk, writer and committer without the flood.
//!
//! Checks that the scenario is what it claims (mq-deadline, ext4, the detector's timeout
//! lowered, both directions in flight during the flood), that the flood starves writeback
//! until the guest logs hung-task warnings for a task blocked in writeback, that the host
//! timed the writes that waited beside the reads, and that the host's report lines up with
//! the guest's view. The control's numbers are printed beside the flood's, not asserted:
//! a test asserts no timings (docs/s4-writeback-starvation.md has measured runs).

use std::time::Duration;

use harness::report::{guest_disk, requests_and_samples};
use harness::{guest_with_ctl, scratch_dir, GuestOutcome, GuestSpec, Mode, SharedRun};

/// The flood's length: long enough for several hung-task checks (every HUNG_SECS).
const RUNTIME_SECS: u64 = 40;
/// The guest's hung-task timeout.
const HUNG_SECS: u64 = 5;

fn s4_spec(name: &str, mode: Mode, flood: bool) -> GuestSpec {
    let image = format!("{}/s4.img", scratch_dir(name, mode));
    let spec = GuestSpec::new(name, "writeback-starvation")
        .cpus(2, 2)
        .memory_mib(1024)
        .timeout(Duration::from_secs(400))
        .cmdline(&format!(
            "blkswarm.iodepth=32 blkswarm.numjobs=2 blkswarm.runtime={RUNTIME_SECS} \
             blkswarm.write_mb=256 blkswarm.hung_secs={HUNG_SECS} blkswarm.s4_fs=ext4 \
             blkswarm.s4_commit_ms=500 blkswarm.s4_commit=sync \
             blkswarm.dirty_background_kib=16384 blkswarm.s4_flood={}",
            u8::from(flood)
        ))
        .arg("--disk")
        .arg(format!(
            "path={image},num_queues=1,queue_size=32,fault_service_time=exp:55ms"
        ));
    let setup = format!("dd if=/dev/zero of={image} bs=1M count=0 seek=1024 2>/dev/null");
    guest_with_ctl(name, mode, spec, &setup, &[]).self_contained()
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    vec![
        s4_spec("s4", mode, true),
        s4_spec("s4-control", mode, false),
    ]
}

static RUN: SharedRun = SharedRun::new(specs);

/// `key=value` words of one result line.
fn fields(line: &str) -> Vec<(&str, &str)> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .collect()
}

fn field(line: &str, key: &str) -> u64 {
    fields(line)
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

fn samples(o: &GuestOutcome) -> Vec<&str> {
    o.get_all("s4_sample")
}

#[test]
fn the_guest_runs_the_scenario_it_claims() {
    let o = RUN.clean("s4");
    o.expect_result("s4_scheduler", "mq-deadline");
    o.expect_result("s4_hung_task_timeout_secs", &HUNG_SECS.to_string());
    o.expect_result("s4_flood_rc", "0");
    let fs = o.get("s4_fs").expect("s4_fs");
    assert!(fs.starts_with("ext4 "), "s4_fs={fs}");
    let writer = o.get("s4_writer_rc").expect("s4_writer_rc");
    assert!(
        writer.starts_with("0 "),
        "the writer failed: {writer} {:?}",
        o.get("s4_writer_error")
    );
    let commits = o.get("s4_commits").expect("s4_commits");
    assert!(
        field(&format!("n={commits}"), "n") > 0 && field(commits, "failed") == 0,
        "the committer: {commits}"
    );
    let iops: u64 = o.get("fio_read_iops").unwrap().parse().unwrap();
    assert!(iops > 0, "the flood read nothing");

    // About once a second (the guest's own work stretches the interval) while the flood or
    // the writer ran: the flood alone lasts RUNTIME_SECS.
    let samples = samples(o);
    let last_ms = samples.last().map_or(0, |s| field(s, "t_ms"));
    assert!(
        samples.len() as u64 >= RUNTIME_SECS / 4 && last_ms >= (RUNTIME_SECS - 2) * 1000,
        "{} samples, the last at {last_ms} ms: {samples:?}",
        samples.len()
    );
    let during_flood: Vec<&&str> = samples.iter().filter(|s| field(s, "flood") == 1).collect();
    assert!(
        during_flood.iter().any(|s| field(s, "inflight_reads") > 0),
        "no read in flight during the flood: {samples:?}"
    );
    assert!(
        during_flood
            .iter()
            .any(|s| field(s, "inflight_writes") > 0 || field(s, "writeback_kib") > 0),
        "the writer's pages never reached the block layer during the flood: {samples:?}"
    );

    let control = RUN.clean("s4-control");
    assert!(
        control.get("s4_flood_rc").is_none() && control.get("fio_read_iops").is_none(),
        "the control ran a flood"
    );
    let control_writer = control.get("s4_writer_rc").expect("control s4_writer_rc");
    assert!(
        control_writer.starts_with("0 "),
        "the control's writer failed: {control_writer}"
    );
}

/// The hung-task detector fires for a task blocked in writeback while the flood runs.
#[test]
fn the_read_flood_starves_writeback_until_hung_task_warnings() {
    let o = RUN.clean("s4");
    let control = RUN.clean("s4-control");
    let warnings: u64 = o.get("s4_hung_task_warnings").unwrap().parse().unwrap();
    let tasks = o.get_all("s4_hung_task");
    eprintln!(
        "s4: {warnings} hung-task warning(s) {tasks:?}; committer {}; writer {}; control: \
         {} warning(s), committer {}, writer {}",
        o.get("s4_commits").unwrap_or("?"),
        o.get("s4_writer_rc").unwrap_or("?"),
        control.get("s4_hung_task_warnings").unwrap_or("?"),
        control.get("s4_commits").unwrap_or("?"),
        control.get("s4_writer_rc").unwrap_or("?"),
    );
    assert!(
        warnings > 0,
        "the guest logged no hung-task warning (timeout {HUNG_SECS} s); committer {:?}, \
         samples {:?}",
        o.get("s4_commits"),
        samples(o)
    );
    assert_eq!(
        tasks.len() as u64,
        warnings.min(5),
        "one s4_hung_task line per warning (the first 5): {tasks:?}"
    );
    // Where the task slept: waiting for writeback or for the journal, not anywhere else.
    const WRITEBACK_WAITS: [&str; 7] = [
        "wb_wait_for_completion",
        "sync_inodes_sb",
        "folio_wait_writeback",
        "jbd2_log_wait_commit",
        "wait_transaction_locked",
        "blk_mq_get_tag",
        "balance_dirty_pages",
    ];
    assert!(
        tasks.iter().any(|t| {
            let stack = t.split_once("stack=").map_or("", |(_, s)| s);
            stack.split('<').any(|f| WRITEBACK_WAITS.contains(&f))
        }),
        "no warning's task was blocked in writeback: {tasks:?}"
    );
}

/// The host timed the writes the flood held back, beside the reads it served.
#[test]
fn the_host_saw_the_writes_wait_beside_the_reads() {
    let o = RUN.clean("s4");
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    let by_op = &disk["latency_by_op"];
    let (reads, writes) = (&by_op["read"], &by_op["write"]);
    let count = |op: &serde_json::Value| op["count"].as_u64().unwrap_or(0);
    assert!(
        count(reads) > 0 && count(writes) > 0,
        "the host timed {} reads and {} writes",
        count(reads),
        count(writes)
    );
    for (name, op) in [("read", reads), ("write", writes)] {
        let total = &op["latency_ns"]["total"];
        assert_eq!(
            total["count"].as_u64(),
            Some(count(op)),
            "{name}: one total latency per request: {op}"
        );
        assert!(
            op["max_in_flight"].as_u64().unwrap_or(0) > 0
                && op["max_oldest_in_flight_ms"].as_f64().unwrap_or(0.0) > 0.0,
            "{name}: the host sampled none in flight: {op}"
        );
    }
    // Writes waited at the device beside the flood's reads: some sample of a queue's
    // in-flight series has both directions at the backend.
    let beside = disk["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|queue| {
            let by_op = &queue["in_flight_series"]["by_op"];
            let counts = |op: &str| -> Vec<u64> {
                by_op[op]["max_count"]
                    .as_array()
                    .map(|v| v.iter().map(|c| c.as_u64().unwrap_or(0)).collect())
                    .unwrap_or_default()
            };
            let (r, w) = (counts("read"), counts("write"));
            r.iter().zip(&w).any(|(r, w)| *r > 0 && *w > 0)
        });
    assert!(
        beside,
        "no sample with reads and writes at the backend at once: {}",
        disk["queues"]
    );
    eprintln!(
        "s4 host: writes {} (total p50 {} ms, max {} ms, oldest waiting {} ms); reads {} \
         (p50 {} ms, max {} ms)",
        count(writes),
        writes["latency_ns"]["total"]["p50"].as_u64().unwrap_or(0) / 1_000_000,
        writes["latency_ns"]["total"]["max"].as_u64().unwrap_or(0) / 1_000_000,
        writes["max_oldest_in_flight_ms"],
        count(reads),
        reads["latency_ns"]["total"]["p50"].as_u64().unwrap_or(0) / 1_000_000,
        reads["latency_ns"]["total"]["max"].as_u64().unwrap_or(0) / 1_000_000,
    );
}

#[test]
fn the_host_report_lines_up_with_the_guest_view() {
    let o = RUN.clean("s4");
    let disk = guest_disk(o).unwrap_or_else(|e| panic!("{e}"));
    let guest_requests: u64 = o.get("disk_requests").unwrap().parse().unwrap();
    let guest_flushes: u64 = o.get("disk_flushes").unwrap().parse().unwrap();
    let (host_requests, per_queue) = requests_and_samples(&disk);
    // Linux accounts an fsync twice: the empty PREFLUSH write it issues (as a write) and the
    // flush the driver sends (as a flush). The device sees the flush only.
    assert!(
        host_requests <= guest_requests && guest_requests - host_requests <= guest_flushes,
        "every request the guest completed was served and timed by the host: host \
         {host_requests}, guest {guest_requests} with {guest_flushes} flushes"
    );
    for (queue, requests, samples) in &per_queue {
        assert_eq!(requests, samples, "queue {queue}: one timing per request");
    }
    let delayed = disk["faults_injected"]["delayed"].as_u64().unwrap_or(0);
    assert!(
        delayed > 0 && delayed <= host_requests,
        "delayed {delayed} of {host_requests}: {}",
        disk["faults_injected"]
    );
    let series: Vec<&serde_json::Value> = disk["queues"]
        .as_array()
        .map(|queues| {
            queues
                .iter()
                .filter_map(|q| q["in_flight_series"]["max_depth"].as_array())
                .flatten()
                .collect()
        })
        .unwrap_or_default();
    assert!(
        series.iter().any(|depth| depth.as_u64().unwrap_or(0) > 1),
        "the host saw no queueing over time: {series:?}"
    );
}
