//! blkswarm's measurement report (docs/report.md) next to what the guest saw: the disk the
//! guest's fio ran on, its requests and interrupts counted on both sides, and the guest's
//! completion latency against the host's device latency.

use serde_json::Value;

use crate::{words, GuestOutcome};

/// The report's entry for the disk the guest named with `@@guest disk_pci=`.
pub fn guest_disk(outcome: &GuestOutcome) -> Result<Value, String> {
    let pci = outcome
        .get("disk_pci")
        .filter(|pci| !pci.is_empty())
        .ok_or("the guest printed no disk_pci")?;
    let report = outcome.report_json();
    report["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|disk| disk["pci"] == pci))
        .cloned()
        .ok_or_else(|| format!("no disk {pci} in the report"))
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// Host requests (all queues of the disk) and the histogram samples of each queue's `total`
/// phase, which must equal its requests.
pub fn requests_and_samples(disk: &Value) -> (u64, Vec<(String, u64, u64)>) {
    let queues = disk["queues"].as_array().cloned().unwrap_or_default();
    let total = queues.iter().map(|q| count(&q["requests"])).sum();
    let per_queue = queues
        .iter()
        .map(|q| {
            (
                q["queue"].as_str().unwrap_or("?").to_string(),
                count(&q["requests"]),
                count(&q["latency_ns"]["total"]["count"]),
            )
        })
        .collect();
    (total, per_queue)
}

/// `(guest count, host count)` per interrupt source of the guest's disk: for virtio-blk the
/// whole device (the guest names vectors by queue, the host by table index), for NVMe each
/// queue's vector (`nvme0qN` is vector N).
pub fn interrupt_pairs(outcome: &GuestOutcome, disk: &Value) -> Vec<(String, u64, u64)> {
    let vectors = disk["vectors"].as_array().cloned().unwrap_or_default();
    let host_vector = |index: u64| {
        vectors
            .iter()
            .find(|v| count(&v["vector"]) == index)
            .map_or(0, |v| count(&v["injected"]))
    };
    let guest: Vec<(String, u64)> = outcome
        .get_all("disk_irq")
        .into_iter()
        .filter_map(|line| {
            // `virtio0-req.0 count=5`
            let (name, rest) = line.split_once(' ')?;
            Some((name.to_string(), words(rest).get("count")?.parse().ok()?))
        })
        .collect();
    if disk["kind"] == "nvme" {
        guest
            .into_iter()
            .filter_map(|(name, guest_count)| {
                let queue: u64 = name.rsplit_once('q')?.1.parse().ok()?;
                Some((name, guest_count, host_vector(queue)))
            })
            .collect()
    } else {
        let guest_total = guest.iter().map(|(_, c)| c).sum();
        let host_total = vectors.iter().map(|v| count(&v["injected"])).sum();
        vec![("all vectors".to_string(), guest_total, host_total)]
    }
}

/// Lines putting the guest's fio completion latency next to the host's device latency of
/// the same disk and run (`total`: notification seen to interrupt injected) and their
/// difference, the virtualization overhead; `None` without both.
pub fn latency_comparison(outcome: &GuestOutcome) -> Option<Vec<String>> {
    let disk = guest_disk(outcome).ok()?;
    let queues = disk["queues"].as_array()?;
    // The busiest queue stands for the disk (fio here runs one job on one queue).
    let busiest = queues.iter().max_by_key(|q| count(&q["requests"]))?;
    let host = &busiest["latency_ns"]["total"];
    let mut lines = Vec::new();
    for direction in ["read", "write"] {
        for (guest_key, host_key) in [("p50", "p50"), ("p99", "p99"), ("p999", "p999")] {
            let Some(guest_us) = outcome
                .get(&format!("fio_{direction}_clat_{guest_key}_us"))
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            let host_us = host[host_key].as_f64()? / 1e3;
            lines.push(format!(
                "@@compare disk={} dir={direction} pct={guest_key} guest_clat_us={guest_us:.1} \
                 host_device_us={host_us:.1} overhead_us={:.1}",
                disk["pci"].as_str().unwrap_or("?"),
                guest_us - host_us
            ));
        }
    }
    (!lines.is_empty()).then_some(lines)
}

/// S4 (docs/s4-writeback-starvation.md): the host's view of the guest's disk by direction,
/// one line each for reads and writes side by side: requests published, their `total`
/// latency (notification to interrupt), the most at the device at once and the age of the
/// oldest the host held (sampled every 10 ms), and, when the guest sampled its block layer
/// (`s4_sample` lines), the most it held in flight. `None` unless the report has numbers
/// by direction (`latency_by_op`, docs/report.md) for both reads and writes.
pub fn direction_comparison(outcome: &GuestOutcome) -> Option<Vec<String>> {
    let disk = guest_disk(outcome).ok()?;
    let by_op = disk["latency_by_op"].as_object()?;
    let guest_samples = outcome.get_all("s4_sample");
    let us = |ns: &Value| {
        ns.as_f64()
            .map_or("-".to_string(), |ns| format!("{:.1}", ns / 1e3))
    };
    let mut lines = Vec::new();
    for (op, guest_key) in [("read", "inflight_reads"), ("write", "inflight_writes")] {
        let host = by_op.get(op)?;
        let total = &host["latency_ns"]["total"];
        let mut line = format!(
            "@@compare disk={} host_op={op} count={} host_total_p50_us={} host_total_p99_us={} \
             host_total_max_us={} host_max_in_flight={} host_oldest_in_flight_max_ms={:.1}",
            disk["pci"].as_str().unwrap_or("?"),
            count(&host["count"]),
            us(&total["p50"]),
            us(&total["p99"]),
            us(&total["max"]),
            count(&host["max_in_flight"]),
            host["max_oldest_in_flight_ms"].as_f64().unwrap_or(0.0)
        );
        let guest_max = guest_samples
            .iter()
            .filter_map(|sample| words(sample).get(guest_key)?.parse::<u64>().ok())
            .max();
        if let Some(guest_max) = guest_max {
            line.push_str(&format!(" guest_max_inflight={guest_max}"));
        }
        lines.push(line);
    }
    Some(lines)
}
