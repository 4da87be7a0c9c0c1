//! The measurement report: per-queue phase latencies, counts and in-flight depth over time,
//! per-vector interrupt accounting, as one JSON document (schema in `docs/report.md`).
//!
//! Everything here reads shared counters and copies histograms; nothing stops a queue. The
//! same [`Report`] is written at exit, returned by the control socket while the guest runs,
//! and drawn as SVG by [`crate::plots`].

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::io::Faults;
use devices::latency::{
    now_ns, HistogramsByOp, InFlightSeries, Op, OpHistograms, Phase, PhaseHistograms, QueueLatency,
    OP_COUNT, OP_PHASES,
};
use devices::nvme::ana::AnaState;
use devices::nvme::pci::NvmePciFunction;
use devices::nvme::NvmeController;

use crate::path_events::{PathEventReport, PathEvents};
use devices::pci::PciAddress;
use hdrhistogram::Histogram;
use irq::msix::Msix;
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "blkswarm-report/1";
/// In-flight depth is sampled this often (each series then coarsens as the run goes on).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Quantiles of the whole-run CDF of each phase.
const CDF_QUANTILES: [f64; 17] = [
    0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    VirtioBlk,
    Nvme,
}

/// One queue whose numbers the report shows.
pub struct MeasuredQueue {
    /// `q0`, `q1`... (virtqueue index) or `sq1`, `sq2`... (NVMe I/O SQ id).
    pub name: String,
    pub latency: Arc<QueueLatency>,
}

/// One disk (PCI function) as the report sees it: its queues' shared numbers and its MSI-X.
pub struct MeasuredDisk {
    pub address: PciAddress,
    pub kind: DiskKind,
    pub queues: Vec<MeasuredQueue>,
    pub msix: Option<Arc<Msix>>,
    /// The disk's injected faults (every namespace of an NVMe controller shares them).
    pub faults: Arc<Faults>,
    /// The NVMe controller's function, for its counts and for controller faults.
    pub nvme: Option<Arc<Mutex<NvmePciFunction>>>,
    /// NVMe controllers: their subsystem's NQN.
    pub subsystem_nqn: Option<String>,
}

/// Summary of one phase's histogram, in nanoseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStats {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl PhaseStats {
    fn of(histogram: &Histogram<u32>) -> Self {
        PhaseStats {
            count: histogram.len(),
            min: histogram.min(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.5),
            p90: histogram.value_at_quantile(0.9),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// A phase over the whole run, all queues merged, with its CDF.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseCdf {
    #[serde(flatten)]
    pub stats: PhaseStats,
    /// `[quantile, nanoseconds]` points.
    pub cdf: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesReport {
    /// Milliseconds since the VMM started, of the first sample.
    pub start_ms: f64,
    /// Milliseconds between samples; each is the deepest seen in its interval.
    pub interval_ms: f64,
    pub max_depth: Vec<u32>,
    /// By direction name ("read", "write", "other"), for the directions the sampler saw at
    /// the backend (timing on). Absent in reports of earlier versions.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_op: BTreeMap<String, OpSeriesReport>,
}

/// One direction of a queue's in-flight series, sample for sample with `max_depth` (each
/// value the largest of the 10-ms ticks its interval covers). Both arrays end at the last
/// sample that is not 0 in either: the samples after it are 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpSeriesReport {
    /// Requests of this direction at the backend at a tick.
    pub max_count: Vec<u32>,
    /// Age of the oldest of them at a tick (now - notified), microseconds.
    pub max_oldest_us: Vec<u32>,
}

/// One direction of a disk's requests (or of every disk's): the `backend` and `total`
/// phases of those published, and the oldest the sampler saw at the backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpReport {
    /// Requests of this direction published (and timed).
    pub count: u64,
    /// By phase name (`backend`, `total`), as `latency_ns` of a queue; empty while none
    /// was published.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_ns: BTreeMap<String, PhaseStats>,
    /// The most requests of this direction at the backend at one 10-ms tick of one queue.
    pub max_in_flight: u32,
    /// The largest age of the oldest request of this direction at the backend, at any
    /// tick of any queue (now - notified), milliseconds: how long one waited at least.
    pub max_oldest_in_flight_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueReport {
    pub queue: String,
    pub requests: u64,
    /// Of `requests`, published with an error status. Absent in reports of earlier
    /// versions.
    #[serde(default)]
    pub errors: u64,
    pub notifications: u64,
    pub notifications_suppressed: u64,
    pub interrupts: u64,
    pub interrupts_suppressed: u64,
    pub interrupts_coalesced: u64,
    pub in_flight: u32,
    /// By phase name; empty before the first timed request or with timing off.
    pub latency_ns: BTreeMap<String, PhaseStats>,
    pub in_flight_series: Option<SeriesReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VectorReport {
    pub vector: u16,
    pub injected: u64,
    pub through_irqfd: u64,
    pub through_signal_msi: u64,
    pub pended_while_masked: u64,
    /// Injected interrupts by destination APIC id (= vCPU index here).
    pub by_vcpu: BTreeMap<u32, u64>,
    pub masked: bool,
    /// The destination the guest programmed last.
    pub destination_vcpu: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    pub pci: String,
    pub kind: DiskKind,
    /// Queues that served a request; the others are only counted (500-disk guests leave
    /// most queues idle).
    pub queues: Vec<QueueReport>,
    pub idle_queues: usize,
    /// Vectors that carried interrupts or are unmasked; others are left out.
    pub vectors: Vec<VectorReport>,
    pub faults_injected: FaultReport,
    /// By direction name ("read", "write", "other"; only those that occurred), every queue
    /// summed. Absent in reports of earlier versions and with timing off.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_op: BTreeMap<String, OpReport>,
    /// NVMe only: controller fatal errors (CSTS.CFS), controller resets and NVM subsystem
    /// resets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerReport {
    pub fatal_errors: u64,
    pub resets: u64,
    #[serde(default)]
    pub subsystem_resets: u64,
    /// The subsystem NQN; with controllers=N also this controller's ANA state of each
    /// group (group id = namespace id = index + 1) and how many times they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsystem: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ana_states: Vec<String>,
    #[serde(default)]
    pub ana_changes: u64,
}

/// What fault injection did to a disk's reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultReport {
    pub errors: u64,
    pub stuck: u64,
    pub delayed: u64,
    pub delay_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// Milliseconds since the VMM started.
    pub at_ms: f64,
    /// Per-request timing was on (`--timing on`, the default).
    pub timing: bool,
    pub requests: u64,
    pub interrupts: u64,
    /// Each phase over every queue of every disk.
    pub phases: BTreeMap<String, PhaseCdf>,
    /// By direction, every queue of every disk (as `latency_by_op` of a disk). Absent in
    /// reports of earlier versions and with timing off.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_op: BTreeMap<String, OpReport>,
    /// MSI-X interrupts of every disk by destination vCPU.
    pub interrupts_by_vcpu: BTreeMap<u32, u64>,
    pub disks: Vec<DiskReport>,
    /// Events on NVMe controllers set through the control socket, with the I/O stall each
    /// caused (see `path_events`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_events: Vec<PathEventReport>,
    /// Path events past the number kept (`path_events::MAX_EVENTS`), only counted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub path_events_not_recorded: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// A controller's ANA state of each group, by name; empty without ANA.
pub fn ana_state_names(controller: &NvmeController) -> Vec<&'static str> {
    controller.ana_groups().map_or_else(Vec::new, |groups| {
        (1..=groups.groups())
            .map(|group| groups.state(group).map_or("?", AnaState::name))
            .collect()
    })
}

fn milliseconds(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1e6
}

/// One direction's series without its trailing zeros.
fn op_series_report(series: &devices::latency::OpSeries) -> OpSeriesReport {
    let pairs = series.max_count.iter().zip(&series.max_oldest_us);
    let end = pairs
        .clone()
        .rposition(|(&count, &age)| count != 0 || age != 0)
        .map_or(0, |last| last + 1);
    OpSeriesReport {
        max_count: series.max_count[..end].to_vec(),
        max_oldest_us: series.max_oldest_us[..end].to_vec(),
    }
}

fn series_report(series: &InFlightSeries) -> Option<SeriesReport> {
    (series.stride > 0).then(|| SeriesReport {
        start_ms: milliseconds(series.start_ns),
        interval_ms: SAMPLE_INTERVAL.as_secs_f64() * 1e3 * f64::from(series.stride),
        max_depth: series.max_depth.clone(),
        by_op: Op::ALL
            .iter()
            .zip(&series.by_op)
            .filter_map(|(op, series)| Some((op.name().to_string(), series.as_ref()?)))
            .map(|(name, series)| (name, op_series_report(series)))
            .collect(),
    })
}

/// Per-direction numbers of several queues (a disk's, or every disk's) added up.
#[derive(Default)]
struct OpTotals {
    histograms: [Option<OpHistograms>; OP_COUNT],
    max_in_flight: [u32; OP_COUNT],
    max_oldest_us: [u32; OP_COUNT],
}

fn add_histograms(total: &mut Option<OpHistograms>, one: &OpHistograms) {
    match total {
        Some(total) => {
            for (total, one) in total.iter_mut().zip(one.iter()) {
                // Both auto-resize: adding cannot fail for lack of range.
                let _ = total.add(one);
            }
        }
        None => *total = Some(one.clone()),
    }
}

impl OpTotals {
    fn add_queue(&mut self, histograms: &HistogramsByOp, series: &InFlightSeries) {
        for (total, one) in self.histograms.iter_mut().zip(histograms) {
            if let Some(one) = one {
                add_histograms(total, one);
            }
        }
        for (index, series) in series.by_op.iter().enumerate() {
            if let Some(series) = series {
                let max = |values: &[u32]| values.iter().copied().max().unwrap_or(0);
                self.max_in_flight[index] = self.max_in_flight[index].max(max(&series.max_count));
                self.max_oldest_us[index] =
                    self.max_oldest_us[index].max(max(&series.max_oldest_us));
            }
        }
    }

    fn add(&mut self, other: &OpTotals) {
        for (total, one) in self.histograms.iter_mut().zip(&other.histograms) {
            if let Some(one) = one {
                add_histograms(total, one);
            }
        }
        for index in 0..OP_COUNT {
            self.max_in_flight[index] = self.max_in_flight[index].max(other.max_in_flight[index]);
            self.max_oldest_us[index] = self.max_oldest_us[index].max(other.max_oldest_us[index]);
        }
    }

    /// One entry per direction that was published or seen at the backend.
    fn report(&self) -> BTreeMap<String, OpReport> {
        Op::ALL
            .iter()
            .filter_map(|&op| {
                let index = op.index();
                let histograms = self.histograms[index].as_ref();
                // Every published request adds one sample to each phase kept per direction.
                let count = histograms.map_or(0, |histograms| {
                    histograms.iter().map(Histogram::len).max().unwrap_or(0)
                });
                if count == 0 && self.max_in_flight[index] == 0 {
                    return None;
                }
                let latency_ns = histograms
                    .map(|histograms| {
                        OP_PHASES
                            .iter()
                            .zip(histograms.iter())
                            .filter(|(_, histogram)| !histogram.is_empty())
                            .map(|(phase, histogram)| {
                                (phase.name().to_string(), PhaseStats::of(histogram))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some((
                    op.name().to_string(),
                    OpReport {
                        count,
                        latency_ns,
                        max_in_flight: self.max_in_flight[index],
                        max_oldest_in_flight_ms: f64::from(self.max_oldest_us[index]) / 1e3,
                    },
                ))
            })
            .collect()
    }
}

fn latency_map(histograms: &PhaseHistograms) -> BTreeMap<String, PhaseStats> {
    Phase::ALL
        .iter()
        .map(|&phase| (phase.name().to_string(), &histograms[phase.index()]))
        .filter(|(_, histogram)| !histogram.is_empty())
        .map(|(name, histogram)| (name, PhaseStats::of(histogram)))
        .collect()
}

fn queue_report(
    queue: &MeasuredQueue,
    merged: &mut Option<PhaseHistograms>,
    by_op: &mut OpTotals,
) -> QueueReport {
    let counts = queue.latency.counts();
    let all = queue.latency.queue_histograms();
    let series = queue.latency.in_flight_series();
    by_op.add_queue(&all.by_op, &series);
    let histograms = all.phases;
    if let Some(histograms) = &histograms {
        match merged {
            Some(merged) => {
                for (total, one) in merged.iter_mut().zip(histograms.iter()) {
                    // Both auto-resize: adding cannot fail for lack of range.
                    let _ = total.add(one);
                }
            }
            None => *merged = Some((**histograms).clone()),
        }
    }
    QueueReport {
        queue: queue.name.clone(),
        requests: counts.requests,
        errors: counts.errors,
        notifications: counts.notifications,
        notifications_suppressed: counts.notifications_suppressed(),
        interrupts: counts.interrupts,
        interrupts_suppressed: counts.interrupts_suppressed,
        interrupts_coalesced: counts.interrupts_coalesced(),
        in_flight: counts.in_flight,
        latency_ns: histograms.as_deref().map(latency_map).unwrap_or_default(),
        in_flight_series: series_report(&series),
    }
}

fn vector_reports(msix: &Msix) -> Vec<VectorReport> {
    (0u16..)
        .zip(msix.snapshot().vectors)
        .filter(|(_, vector)| vector.injected > 0 || vector.pended > 0 || !vector.state.masked)
        .map(|(index, vector)| VectorReport {
            vector: index,
            injected: vector.injected,
            through_irqfd: vector.through_irqfd,
            through_signal_msi: vector.injected - vector.through_irqfd,
            pended_while_masked: vector.pended,
            by_vcpu: vector.by_destination.iter().copied().collect(),
            masked: vector.state.masked,
            destination_vcpu: vector.state.message.destination_apic_id(),
        })
        .collect()
}

/// The report as of now.
pub fn collect(disks: &[MeasuredDisk], timing: bool, path_events: &PathEvents) -> Report {
    let mut merged: Option<PhaseHistograms> = None;
    let mut all_by_op = OpTotals::default();
    let mut interrupts_by_vcpu: BTreeMap<u32, u64> = BTreeMap::new();
    let disk_reports: Vec<DiskReport> = disks
        .iter()
        .map(|disk| {
            let vectors = disk.msix.as_deref().map(vector_reports).unwrap_or_default();
            for vector in &vectors {
                for (&vcpu, &count) in &vector.by_vcpu {
                    *interrupts_by_vcpu.entry(vcpu).or_default() += count;
                }
            }
            let active: Vec<&MeasuredQueue> = disk
                .queues
                .iter()
                .filter(|queue| {
                    let counts = queue.latency.counts();
                    counts.requests > 0 || counts.in_flight > 0
                })
                .collect();
            let mut by_op = OpTotals::default();
            let queues = active
                .iter()
                .map(|queue| queue_report(queue, &mut merged, &mut by_op))
                .collect();
            all_by_op.add(&by_op);
            DiskReport {
                pci: disk.address.to_string(),
                kind: disk.kind,
                idle_queues: disk.queues.len() - active.len(),
                queues,
                latency_by_op: by_op.report(),
                vectors,
                controller: disk.nvme.as_ref().map(|function| {
                    let function = function.lock().unwrap_or_else(PoisonError::into_inner);
                    let controller = function.controller();
                    let counters = controller.counters();
                    ControllerReport {
                        fatal_errors: counters.fatal_errors,
                        resets: counters.resets,
                        subsystem_resets: counters.subsystem_resets,
                        subsystem: disk.subsystem_nqn.clone(),
                        ana_states: ana_state_names(controller)
                            .into_iter()
                            .map(String::from)
                            .collect(),
                        ana_changes: counters.ana_changes,
                    }
                }),
                faults_injected: {
                    let counts = disk.faults.counts();
                    FaultReport {
                        errors: counts.errors,
                        stuck: counts.stuck,
                        delayed: counts.delayed,
                        delay_ms: milliseconds(counts.delay_ns),
                    }
                },
            }
        })
        .collect();
    let phases = merged
        .map(|histograms| {
            Phase::ALL
                .iter()
                .map(|&phase| (phase, &histograms[phase.index()]))
                .filter(|(_, histogram)| !histogram.is_empty())
                .map(|(phase, histogram)| {
                    let cdf = CDF_QUANTILES
                        .iter()
                        .map(|&q| (q, histogram.value_at_quantile(q)))
                        .collect();
                    let stats = PhaseStats::of(histogram);
                    (phase.name().to_string(), PhaseCdf { stats, cdf })
                })
                .collect()
        })
        .unwrap_or_default();
    let queues = disk_reports.iter().flat_map(|disk| &disk.queues);
    let requests = queues.clone().map(|queue| queue.requests).sum();
    let interrupts = queues.map(|queue| queue.interrupts).sum();
    Report {
        schema: SCHEMA.to_string(),
        at_ms: milliseconds(now_ns()),
        timing,
        requests,
        interrupts,
        phases,
        latency_by_op: all_by_op.report(),
        interrupts_by_vcpu,
        disks: disk_reports,
        path_events: path_events.report(),
        path_events_not_recorded: path_events.not_recorded(),
    }
}

/// Writes `report` as `dir/report.json` (creating `dir`), on one line: it may have to
/// travel through a console (the lab's).
pub fn write_json(report: &Report, dir: &Path) -> io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("report.json");
    let json = serde_json::to_vec(report).map_err(io::Error::other)?;
    std::fs::write(&path, json)?;
    Ok(path)
}

/// Samples every queue's in-flight depth each [`SAMPLE_INTERVAL`] until stopped, and
/// measures the stalls of path events on the same beat.
pub struct InFlightSampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl InFlightSampler {
    pub fn spawn(queues: Vec<Arc<QueueLatency>>, path_events: Arc<PathEvents>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("in-flight-sampler".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    for queue in &queues {
                        queue.sample_in_flight();
                    }
                    path_events.tick();
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })?;
        Ok(InFlightSampler {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A short text summary of `report` for the end of the console output.
pub fn summary_lines(report: &Report) -> Vec<String> {
    let mut lines = vec![format!(
        "@@vmm report requests={} interrupts={} disks={} timing={}",
        report.requests,
        report.interrupts,
        report.disks.len(),
        u8::from(report.timing)
    )];
    for phase in Phase::ALL {
        if let Some(cdf) = report.phases.get(phase.name()) {
            let stats = &cdf.stats;
            lines.push(format!(
                "@@vmm latency phase={} count={} p50_us={:.1} p99_us={:.1} max_us={:.1}",
                phase.name(),
                stats.count,
                stats.p50 as f64 / 1e3,
                stats.p99 as f64 / 1e3,
                stats.max as f64 / 1e3
            ));
        }
    }
    if !report.interrupts_by_vcpu.is_empty() {
        let by_vcpu: Vec<String> = report
            .interrupts_by_vcpu
            .iter()
            .map(|(vcpu, count)| format!("{vcpu}={count}"))
            .collect();
        lines.push(format!("@@vmm interrupts_by_vcpu {}", by_vcpu.join(" ")));
    }
    lines.extend(latency_by_op_lines(report));
    let shown = report.path_events.len().min(SUMMARY_PATH_EVENTS);
    for event in &report.path_events[..shown] {
        lines.push(path_event_line(event));
    }
    let more = (report.path_events.len() - shown) as u64 + report.path_events_not_recorded;
    if more > 0 {
        lines.push(format!("@@vmm path_events_not_shown={more}"));
    }
    lines
}

/// Disks whose per-direction latency the summary prints, at most: the busiest.
const SUMMARY_OP_DISKS: usize = 8;
/// ... of those with at least this many requests published, or a request that waited at
/// the backend for at least [`SUMMARY_OP_MIN_OLDEST_MS`].
const SUMMARY_OP_MIN_REQUESTS: u64 = 64;
const SUMMARY_OP_MIN_OLDEST_MS: f64 = 1000.0;

/// `@@vmm latency_by_op` lines: per direction, for each of the (at most
/// [`SUMMARY_OP_DISKS`]) busiest disks that saw more than a handful of requests, and for
/// every disk together (`disk=all`) when more than one disk has per-direction numbers.
fn latency_by_op_lines(report: &Report) -> Vec<String> {
    let requests =
        |disk: &DiskReport| -> u64 { disk.latency_by_op.values().map(|op| op.count).sum() };
    let mut busy: Vec<&DiskReport> = report
        .disks
        .iter()
        .filter(|disk| {
            requests(disk) >= SUMMARY_OP_MIN_REQUESTS
                || disk
                    .latency_by_op
                    .values()
                    .any(|op| op.max_oldest_in_flight_ms >= SUMMARY_OP_MIN_OLDEST_MS)
        })
        .collect();
    busy.sort_by_key(|disk| std::cmp::Reverse(requests(disk)));
    busy.truncate(SUMMARY_OP_DISKS);
    let mut lines = Vec::new();
    for disk in busy {
        lines.extend(op_lines(&disk.pci, &disk.latency_by_op));
    }
    let disks_with_ops = report
        .disks
        .iter()
        .filter(|disk| !disk.latency_by_op.is_empty())
        .count();
    if disks_with_ops > 1 {
        lines.extend(op_lines("all", &report.latency_by_op));
    }
    lines
}

/// One line per direction, in [`Op::ALL`] order; without percentiles for a direction that
/// was only seen in flight.
fn op_lines(disk: &str, by_op: &BTreeMap<String, OpReport>) -> Vec<String> {
    let us = |ns: u64| ns as f64 / 1e3;
    Op::ALL
        .iter()
        .filter_map(|op| Some((op.name(), by_op.get(op.name())?)))
        .map(|(name, op)| {
            let mut line = format!(
                "@@vmm latency_by_op disk={disk} op={name} count={}",
                op.count
            );
            if let Some(total) = op.latency_ns.get(Phase::Total.name()) {
                line.push_str(&format!(
                    " p50_us={:.1} p99_us={:.1} max_us={:.1}",
                    us(total.p50),
                    us(total.p99),
                    us(total.max)
                ));
            }
            if let Some(backend) = op.latency_ns.get(Phase::Backend.name()) {
                line.push_str(&format!(
                    " backend_p50_us={:.1} backend_p99_us={:.1}",
                    us(backend.p50),
                    us(backend.p99)
                ));
            }
            line.push_str(&format!(
                " max_in_flight={} max_oldest_in_flight_ms={:.1}",
                op.max_in_flight, op.max_oldest_in_flight_ms
            ));
            line
        })
        .collect()
}

/// Path events printed in the summary; the JSON report has up to `path_events::MAX_EVENTS`.
const SUMMARY_PATH_EVENTS: usize = 32;

/// One path event for the summary: when, where, by whom, and the stall it caused.
fn path_event_line(event: &PathEventReport) -> String {
    let back = event
        .controller_back_ms
        .map_or_else(|| "none".to_string(), |ms| format!("{ms:.1}"));
    format!(
        "@@vmm path_event at_ms={:.1} pci={} by={} stall_ms={:.1} back_ms={} open={} event={}",
        event.at_ms,
        event.pci,
        event.by.name(),
        event.subsystem_stall_ms,
        back,
        u8::from(event.open),
        event.event
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::latency::{LatencyRecorder, RequestTimes};
    use std::time::Duration;

    fn disk_with_requests(requests: u64) -> MeasuredDisk {
        let busy = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::new(busy.clone());
        for _ in 0..requests {
            recorder.fetched();
            let start = now_ns();
            recorder.published(RequestTimes {
                notified: start,
                parsed: start + 500,
                submitted: start + 1_000,
                completed: start + 50_000,
                ..RequestTimes::default()
            });
            recorder.batch_ended(true);
        }
        busy.sample_in_flight();
        MeasuredDisk {
            address: PciAddress {
                bus: 0,
                device: 3,
                function: 0,
            },
            kind: DiskKind::Nvme,
            queues: vec![
                MeasuredQueue {
                    name: "sq1".into(),
                    latency: busy,
                },
                MeasuredQueue {
                    name: "sq2".into(),
                    latency: Arc::new(QueueLatency::new()),
                },
            ],
            msix: None,
            faults: Arc::new(Faults::default()),
            nvme: None,
            subsystem_nqn: None,
        }
    }

    #[test]
    fn the_report_counts_every_request_once_and_survives_json() {
        let report = collect(
            &[disk_with_requests(20), disk_with_requests(5)],
            true,
            &PathEvents::new(&[]),
        );
        assert_eq!(report.schema, SCHEMA);
        assert_eq!((report.requests, report.interrupts), (25, 25));
        let disk = &report.disks[0];
        assert_eq!(
            (disk.queues.len(), disk.idle_queues),
            (1, 1),
            "sq2 served nothing"
        );
        let queue = &disk.queues[0];
        assert_eq!(queue.queue, "sq1");
        assert_eq!(queue.latency_ns["total"].count, 20);
        let backend = &queue.latency_ns["backend"];
        assert!((48_000..=50_000).contains(&backend.p50), "{backend:?}");
        assert_eq!(
            report.phases["backend"].stats.count, 25,
            "every queue merged"
        );
        let cdf = &report.phases["total"].cdf;
        assert_eq!(cdf.len(), CDF_QUANTILES.len());
        assert!(
            cdf.windows(2).all(|pair| pair[0].1 <= pair[1].1),
            "a CDF rises"
        );
        assert!(queue.in_flight_series.is_some());
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert!(summary_lines(&report)[0].contains("requests=25"));
    }

    #[test]
    fn plots_are_svg_files() {
        let report = collect(&[disk_with_requests(10)], true, &PathEvents::new(&[]));
        let dir = std::env::temp_dir().join(format!("blkswarm-plots-{}", std::process::id()));
        let files = crate::plots::render(&report, &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // No MSI-X in this report: no interrupts-per-vCPU plot.
        assert_eq!(names, ["latency_cdf.svg", "in_flight.svg"]);
        for file in &files {
            let svg = std::fs::read_to_string(file).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("</svg>"),
                "{}",
                file.display()
            );
        }
        let cdf = std::fs::read_to_string(&files[0]).unwrap();
        assert!(cdf.contains("backend"), "one line per phase, labelled");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn path_events_are_marked_on_the_in_flight_plot() {
        let mut report = collect(&[disk_with_requests(10)], true, &PathEvents::new(&[]));
        report.path_events = vec![PathEventReport {
            at_ms: 250.0,
            pci: "0000:00:03.0".into(),
            subsystem: "nqn.test".into(),
            by: crate::path_events::Origin::Host,
            event: "ana group=1 state=inaccessible".into(),
            subsystem_stall_ms: 20.0,
            controller_back_ms: Some(10.0),
            open: false,
        }];
        let dir = std::env::temp_dir().join(format!("blkswarm-marks-{}", std::process::id()));
        let files = crate::plots::render(&report, &dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("in_flight.svg")).unwrap();
        assert!(files.contains(&dir.join("in_flight.svg")));
        assert!(
            svg.contains("host ana group=1 state=inaccessible (0000:00:03.0)"),
            "the event is labelled on the plot"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_summary_names_each_path_event_and_counts_the_rest() {
        let mut report = collect(&[disk_with_requests(1)], true, &PathEvents::new(&[]));
        let event = PathEventReport {
            at_ms: 1500.5,
            pci: "0000:00:01.0".into(),
            subsystem: "nqn.test".into(),
            by: crate::path_events::Origin::Guest,
            event: "reset".into(),
            subsystem_stall_ms: 5096.0,
            controller_back_ms: None,
            open: false,
        };
        report.path_events = vec![event; SUMMARY_PATH_EVENTS + 2];
        report.path_events_not_recorded = 3;
        let lines = summary_lines(&report);
        let events: Vec<&String> = lines
            .iter()
            .filter(|line| line.starts_with("@@vmm path_event "))
            .collect();
        assert_eq!(events.len(), SUMMARY_PATH_EVENTS);
        assert_eq!(
            events[0],
            "@@vmm path_event at_ms=1500.5 pci=0000:00:01.0 by=guest stall_ms=5096.0 back_ms=none open=0 event=reset"
        );
        assert_eq!(lines.last().unwrap(), "@@vmm path_events_not_shown=5");
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.path_events_not_recorded, 3);
    }

    /// A virtio-blk disk whose one queue published `reads` reads of 50 us and `writes`
    /// writes of 800 ms, and holds one write at the backend, notified `held_ms` ago.
    fn disk_with_directions(device: u8, reads: u64, writes: u64, held_ms: u64) -> MeasuredDisk {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::with_slots(queue.clone(), 8);
        for (op, count, backend_ns) in [(Op::Read, reads, 50_000), (Op::Write, writes, 800_000_000)]
        {
            for _ in 0..count {
                recorder.fetched();
                let start = now_ns();
                recorder.published(RequestTimes {
                    op,
                    notified: start,
                    parsed: start + 500,
                    submitted: start + 1_000,
                    completed: start + 1_000 + backend_ns,
                    ..RequestTimes::default()
                });
                recorder.batch_ended(true);
            }
        }
        recorder.fetched();
        // The clock may have started less than `held_ms` ago: wait until it can be that old.
        while now_ns() < held_ms * 1_000_000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        recorder.backend_started(
            3,
            &RequestTimes {
                op: Op::Write,
                notified: now_ns() - held_ms * 1_000_000,
                ..RequestTimes::default()
            },
        );
        queue.sample_in_flight();
        // The recorder (the handler) lives on with the disk's queue; leak it for the test.
        std::mem::forget(recorder);
        MeasuredDisk {
            address: PciAddress {
                bus: 0,
                device,
                function: 0,
            },
            kind: DiskKind::VirtioBlk,
            queues: vec![MeasuredQueue {
                name: "q0".into(),
                latency: queue,
            }],
            msix: None,
            faults: Arc::new(Faults::default()),
            nvme: None,
            subsystem_nqn: None,
        }
    }

    #[test]
    fn each_direction_is_reported_per_disk_and_for_every_disk() {
        let report = collect(
            &[
                disk_with_directions(1, 100, 4, 30),
                disk_with_directions(2, 10, 1, 20),
            ],
            true,
            &PathEvents::new(&[]),
        );
        let disk = &report.disks[0];
        assert_eq!(
            disk.latency_by_op.keys().collect::<Vec<_>>(),
            ["read", "write"],
            "only the directions that occurred"
        );
        let (reads, writes) = (&disk.latency_by_op["read"], &disk.latency_by_op["write"]);
        assert_eq!((reads.count, writes.count), (100, 4));
        assert!(reads.latency_ns["backend"].max < 1_000_000);
        assert!(writes.latency_ns["backend"].min >= 790_000_000);
        assert!(writes.latency_ns["total"].count == 4);
        assert_eq!((reads.max_in_flight, writes.max_in_flight), (0, 1));
        assert!(writes.max_oldest_in_flight_ms >= 30.0, "{writes:?}");
        assert_eq!(reads.max_oldest_in_flight_ms, 0.0);
        // Every disk: counts added, the oldest the larger.
        let all = &report.latency_by_op;
        assert_eq!((all["read"].count, all["write"].count), (110, 5));
        assert_eq!(
            all["write"].max_oldest_in_flight_ms,
            writes.max_oldest_in_flight_ms
        );
        // The series of the held write; reads were never at the backend at a tick.
        let series = disk.queues[0].in_flight_series.as_ref().unwrap();
        assert_eq!(series.by_op.keys().collect::<Vec<_>>(), ["write"]);
        assert_eq!(series.by_op["write"].max_count, [1]);
        // Unchanged fields stay as they were.
        assert_eq!(disk.queues[0].latency_ns["total"].count, 104);
        assert_eq!(report.phases["total"].stats.count, 115);

        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);

        let lines = summary_lines(&report);
        let by_op: Vec<&String> = lines
            .iter()
            .filter(|line| line.starts_with("@@vmm latency_by_op "))
            .collect();
        // Disk 1 saw more than a handful of requests, disk 2 did not; then every disk.
        let heads: Vec<String> = by_op
            .iter()
            .map(|line| line.split(" count=").next().unwrap().to_string())
            .collect();
        assert_eq!(
            heads,
            [
                "@@vmm latency_by_op disk=0000:00:01.0 op=read",
                "@@vmm latency_by_op disk=0000:00:01.0 op=write",
                "@@vmm latency_by_op disk=all op=read",
                "@@vmm latency_by_op disk=all op=write",
            ]
        );
        assert!(
            by_op[1].starts_with("@@vmm latency_by_op disk=0000:00:01.0 op=write count=4 p50_us="),
            "{}",
            by_op[1]
        );
        for key in [
            "p99_us=",
            "max_us=",
            "backend_p50_us=8",
            "max_in_flight=1 ",
            "max_oldest_in_flight_ms=",
        ] {
            assert!(by_op[1].contains(key), "{key} in {}", by_op[1]);
        }
    }

    #[test]
    fn a_direction_only_seen_waiting_has_no_percentiles() {
        let report = collect(
            &[disk_with_directions(1, 0, 0, 1500)],
            true,
            &PathEvents::new(&[]),
        );
        let writes = &report.disks[0].latency_by_op["write"];
        assert_eq!((writes.count, writes.max_in_flight), (0, 1));
        assert!(writes.latency_ns.is_empty());
        let lines = summary_lines(&report);
        let line = lines
            .iter()
            .find(|line| line.starts_with("@@vmm latency_by_op "))
            .expect("a write that waited for seconds is worth a line");
        assert!(
            line.starts_with("@@vmm latency_by_op disk=0000:00:01.0 op=write count=0 max_in_flight=1 max_oldest_in_flight_ms=15"),
            "{line}"
        );
    }

    #[test]
    fn reports_without_directions_still_load() {
        let mut report = collect(&[disk_with_requests(3)], true, &PathEvents::new(&[]));
        assert!(
            report.latency_by_op.contains_key("other"),
            "RequestTimes' default"
        );
        report.latency_by_op.clear();
        report.disks[0].latency_by_op.clear();
        if let Some(series) = report.disks[0].queues[0].in_flight_series.as_mut() {
            series.by_op.clear();
        }
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("latency_by_op") && !json.contains("by_op"));
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn direction_series_drop_their_trailing_zeros() {
        let series = devices::latency::OpSeries {
            max_count: vec![0, 2, 1, 0, 0],
            max_oldest_us: vec![0, 40, 0, 0, 0],
        };
        let report = op_series_report(&series);
        assert_eq!(report.max_count, [0, 2, 1]);
        assert_eq!(report.max_oldest_us, [0, 40, 0]);
        assert_eq!(
            op_series_report(&devices::latency::OpSeries::default()),
            OpSeriesReport::default()
        );
    }

    #[test]
    fn the_by_direction_plot_is_drawn_when_a_queue_has_direction_series() {
        let report = collect(
            &[disk_with_directions(1, 5, 2, 40)],
            true,
            &PathEvents::new(&[]),
        );
        let dir = std::env::temp_dir().join(format!("blkswarm-by-op-{}", std::process::id()));
        let files = crate::plots::render(&report, &dir).unwrap();
        assert!(
            files.contains(&dir.join("in_flight_by_op.svg")),
            "{files:?}"
        );
        let svg = std::fs::read_to_string(dir.join("in_flight_by_op.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("0000:00:01.0 q0 write"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
