//! S4 (../shared/SCENARIOS.md) as `bash run.sh s4` runs it, shorter: a slow disk (reads
//! delayed, writes under a bandwidth cap), mq-deadline in the guest, a random-read flood at
//! full rate (2 jobs x QD 32, 30 s, 2 vCPUs) and a buffered writer that fsyncs. Checks that
//! the scenario is what it claims (the scheduler really is mq-deadline, the detector's
//! timeout was lowered, both directions were in flight while the flood ran) and that the
//! host's report of the same run can be lined up against the guest's view: every request
//! the guest's block layer completed was timed by the host, the injected delays are
//! counted, and the disk has an in-flight series over time. Timings are printed, never
//! asserted. The guest logs no hung-task warning here (docs/s4-writeback-starvation.md says
//! why).

use std::time::Duration;

use harness::report::{guest_disk, requests_and_samples};
use harness::{GuestOutcome, GuestSpec, Mode, SharedRun};

/// The flood's length: long enough for several hung-task checks (every HUNG_SECS).
const RUNTIME_SECS: u64 = 30;
/// The guest's hung-task timeout.
const HUNG_SECS: u64 = 5;

fn specs(_: Mode) -> Vec<GuestSpec> {
    vec![GuestSpec::new("s4", "writeback-starvation")
        .cpus(2, 2)
        .timeout(Duration::from_secs(300))
        .cmdline(&format!(
            "blkswarm.iodepth=32 blkswarm.numjobs=2 blkswarm.runtime={RUNTIME_SECS} \
             blkswarm.write_mb=128 blkswarm.hung_secs={HUNG_SECS}"
        ))
        .arg("--disk")
        .arg("backend=null,size=512M,num_queues=2,fault_read_latency=exp:20ms,fault_write_bandwidth=8M")]
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
    let writer = o.get("s4_writer_rc").expect("s4_writer_rc");
    assert!(
        writer.starts_with("0 "),
        "the writer failed: {writer} {:?}",
        o.get("s4_writer_error")
    );
    let iops: u64 = o.get("fio_read_iops").unwrap().parse().unwrap();
    assert!(iops > 0, "the flood read nothing");

    // About once a second (the guest's own work stretches the interval) while the flood or
    // the writer ran: the flood alone lasts RUNTIME_SECS.
    let samples = samples(o);
    let last_ms = samples.last().map_or(0, |s| field(s, "t_ms"));
    assert!(
        samples.len() as u64 >= RUNTIME_SECS / 2 && last_ms >= (RUNTIME_SECS - 2) * 1000,
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
    eprintln!(
        "s4: writer {writer}; hung-task warnings {}; flood {iops} IOPS, clat p99 {} us",
        o.get("s4_hung_task_warnings").unwrap_or("?"),
        o.get("fio_read_clat_p99_us").unwrap_or("?")
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
