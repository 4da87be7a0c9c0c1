//! Host-side request timing, per queue (virtio-blk virtqueue or NVMe I/O SQ).
//!
//! Each request carries monotonic timestamps taken on the worker that serves its queue:
//! notification seen (the worker's pass that fetched it began), parsed, handed to the backend
//! (SQE queued; the kernel sees it at the worker's next `io_uring_enter`), backend completed,
//! published (used ring / CQ entry written). When the worker ends its batch it decides on the
//! interrupt, stamps it on every request published in that batch, and hands the batch over
//! under one short lock. The worker never touches a histogram: whoever reads the numbers (the
//! VMM's sampler thread every few milliseconds, a report) records the handed-over requests
//! into the queue's HdrHistograms, one per [`Phase`], first. Requests whose batch raised no
//! interrupt (EVENT_IDX said the driver is still polling) end at their publication: they add
//! no `interrupt` sample and their `total` stops at `published`.
//!
//! Counters and the in-flight depth are kept whether or not timing is on; histograms are
//! allocated at a queue's first timed request and grow with the largest value seen, so idle
//! queues of a 500-disk guest cost a few hundred bytes each.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use hdrhistogram::Histogram;

static CLOCK: OnceLock<Clock> = OnceLock::new();
/// Whether queues created from now on take timestamps (see [`set_timing`]).
static TIMING: AtomicBool = AtomicBool::new(true);

/// Turns per-request timing on or off for queues created afterwards (the VMM's
/// `--timing off`, to measure what timing costs). Counters are kept either way.
pub fn set_timing(on: bool) {
    TIMING.store(on, Ordering::Relaxed);
}

/// The timestamp source. With an invariant TSC (constant rate, ticking in every C-state,
/// as Linux reports it in /proc/cpuinfo) a timestamp is one RDTSC, about a third of a
/// clock_gettime, scaled by a rate measured against the monotonic clock at start;
/// otherwise the monotonic clock itself.
struct Clock {
    epoch: Instant,
    tsc: Option<TscScale>,
}

struct TscScale {
    epoch: u64,
    ns_per_tick: f64,
}

/// How long the TSC rate is measured for. Each end is a TSC read bracketed by two monotonic
/// clock reads at most [`TSC_PAIR_WINDOW`] apart (a preempted attempt is retried), so the
/// rate is off by 2e-4 at most.
const TSC_CALIBRATION: std::time::Duration = std::time::Duration::from_millis(10);
const TSC_PAIR_WINDOW: std::time::Duration = std::time::Duration::from_micros(2);

fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it touches no memory. x86_64 always has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn invariant_tsc() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .find(|line| line.starts_with("flags"))
            .is_some_and(|flags| {
                let has = |flag: &str| flags.split_whitespace().any(|word| word == flag);
                has("constant_tsc") && has("nonstop_tsc")
            })
    })
}

/// A TSC value and the monotonic time it was read at, both within [`TSC_PAIR_WINDOW`].
fn tsc_and_instant() -> Option<(u64, Instant)> {
    (0..1000).find_map(|_| {
        let before = Instant::now();
        let tsc = rdtsc();
        let window = before.elapsed();
        (window <= TSC_PAIR_WINDOW).then(|| (tsc, before + window / 2))
    })
}

impl Clock {
    fn start() -> Clock {
        let tsc = invariant_tsc()
            .then(|| {
                let (first_tsc, first) = tsc_and_instant()?;
                std::thread::sleep(TSC_CALIBRATION);
                let (last_tsc, last) = tsc_and_instant()?;
                let ticks = last_tsc.checked_sub(first_tsc).filter(|&ticks| ticks > 0)?;
                Some((
                    first,
                    TscScale {
                        epoch: first_tsc,
                        ns_per_tick: (last - first).as_nanos() as f64 / ticks as f64,
                    },
                ))
            })
            .flatten();
        match tsc {
            Some((epoch, tsc)) => Clock {
                epoch,
                tsc: Some(tsc),
            },
            None => Clock {
                epoch: Instant::now(),
                tsc: None,
            },
        }
    }

    fn now_ns(&self) -> u64 {
        match &self.tsc {
            // A thread that migrates to a CPU whose TSC lags reads an earlier time; the
            // intervals built from it saturate at 0.
            Some(tsc) => (rdtsc().saturating_sub(tsc.epoch) as f64 * tsc.ns_per_tick) as u64,
            // u64 nanoseconds last 584 years.
            None => self.epoch.elapsed().as_nanos() as u64,
        }
    }
}

/// Starts the clock every timestamp is measured from (the first call wins; it takes a few
/// milliseconds to measure the TSC rate). The VMM calls it at start so that times in
/// reports are relative to its start.
pub fn start_clock() {
    CLOCK.get_or_init(Clock::start);
}

/// Monotonic nanoseconds since [`start_clock`].
pub fn now_ns() -> u64 {
    CLOCK.get_or_init(Clock::start).now_ns()
}

/// An interval of a request's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Notification seen -> request parsed (descriptor chain or SQ entry validated).
    Parse,
    /// Parsed -> handed to the backend.
    Submit,
    /// Handed to the backend -> backend completed.
    Backend,
    /// Backend completed -> used ring / CQ entry written.
    Publish,
    /// Published -> interrupt injected (irqfd written or KVM_SIGNAL_MSI returned).
    Interrupt,
    /// Notification seen -> interrupt injected (or published, without an interrupt).
    Total,
}

pub const PHASE_COUNT: usize = 6;

impl Phase {
    pub const ALL: [Phase; PHASE_COUNT] = [
        Phase::Parse,
        Phase::Submit,
        Phase::Backend,
        Phase::Publish,
        Phase::Interrupt,
        Phase::Total,
    ];

    /// Position in [`Phase::ALL`] and in [`PhaseHistograms`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Parse => "parse",
            Phase::Submit => "submit",
            Phase::Backend => "backend",
            Phase::Publish => "publish",
            Phase::Interrupt => "interrupt",
            Phase::Total => "total",
        }
    }
}

/// One request's timestamps ([`now_ns`]); 0 while timing is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTimes {
    pub notified: u64,
    pub parsed: u64,
    pub submitted: u64,
    pub completed: u64,
    pub published: u64,
    /// When the interrupt of the request's batch was injected; 0: its batch raised none.
    pub injected: u64,
}

impl RequestTimes {
    /// The request's phases, indexed like [`Phase::ALL`]; `None` for an interrupt it did not
    /// have.
    fn phases(&self) -> [Option<u64>; PHASE_COUNT] {
        let injected = (self.injected != 0).then_some(self.injected);
        let end = injected.unwrap_or(self.published);
        [
            Some(self.parsed.saturating_sub(self.notified)),
            Some(self.submitted.saturating_sub(self.parsed)),
            Some(self.completed.saturating_sub(self.submitted)),
            Some(self.published.saturating_sub(self.completed)),
            injected.map(|at| at.saturating_sub(self.published)),
            Some(end.saturating_sub(self.notified)),
        ]
    }
}

impl RequestTimes {
    /// A request that never reached the backend (answered by the device, or refused).
    pub fn answered_at_parse(&mut self) {
        self.submitted = self.parsed;
        self.completed = self.parsed;
    }
}

/// HdrHistograms of one queue, in nanoseconds, indexed like [`Phase::ALL`].
pub type PhaseHistograms = [Histogram<u32>; PHASE_COUNT];

/// Significant digits of every histogram: 1% resolution.
const SIGNIFICANT_DIGITS: u8 = 2;
/// Handed-over requests a queue holds before its worker records them itself.
const MAX_HANDED_OVER: usize = 1 << 16;

/// In-flight depth over time: one sample (the deepest seen) per `stride` sampler ticks. When
/// full, neighbouring samples merge and the stride doubles, so a run of any length fits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlightSeries {
    /// [`now_ns`] of the first sample.
    pub start_ns: u64,
    /// Sampler ticks per sample.
    pub stride: u32,
    pub max_depth: Vec<u32>,
    pending_max: u32,
    pending_ticks: u32,
}

impl InFlightSeries {
    pub const CAPACITY: usize = 1024;

    fn tick(&mut self, depth: u32) {
        if self.stride == 0 {
            self.start_ns = now_ns();
            self.stride = 1;
        }
        self.pending_max = self.pending_max.max(depth);
        self.pending_ticks += 1;
        if self.pending_ticks < self.stride {
            return;
        }
        if self.max_depth.len() == Self::CAPACITY {
            let merged: Vec<u32> = self
                .max_depth
                .chunks(2)
                .map(|pair| pair.iter().copied().max().unwrap_or(0))
                .collect();
            self.max_depth = merged;
            self.stride *= 2;
        }
        self.max_depth.push(self.pending_max);
        self.pending_max = 0;
        self.pending_ticks = 0;
    }
}

/// Counts of one queue, read without stopping it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Requests published (used ring / CQ entry written), errors included.
    pub requests: u64,
    /// Of those, published with an error status (virtio-blk IOERR/UNSUPP, NVMe status
    /// other than success: path errors of ANA states included).
    pub errors: u64,
    /// Guest notifications the device acted on (ioeventfd wake-ups, MMIO doorbell writes).
    pub notifications: u64,
    /// Interrupts injected for this queue.
    pub interrupts: u64,
    /// Batches of published requests that raised no interrupt (EVENT_IDX).
    pub interrupts_suppressed: u64,
    /// Requests fetched and not yet published, now.
    pub in_flight: u32,
}

impl QueueCounts {
    /// Requests that arrived without a notification of their own (EVENT_IDX, shadow
    /// doorbells, or several published before the device looked).
    pub fn notifications_suppressed(&self) -> u64 {
        self.requests.saturating_sub(self.notifications)
    }

    /// Requests published with success.
    pub fn succeeded(&self) -> u64 {
        self.requests - self.errors
    }

    /// Requests that shared their interrupt with others, or had none.
    pub fn interrupts_coalesced(&self) -> u64 {
        self.requests.saturating_sub(self.interrupts)
    }
}

/// What a queue's worker and the reporters share.
pub struct QueueLatency {
    timing: bool,
    /// Published with success and with an error status: one counter each, so a publish
    /// is one atomic add and a reader's count of successes never includes an error.
    succeeded: AtomicU64,
    errors: AtomicU64,
    notifications: AtomicU64,
    interrupts: AtomicU64,
    interrupts_suppressed: AtomicU64,
    in_flight: AtomicU32,
    /// The deepest `in_flight` since the sampler last looked: bursts shorter than a sample
    /// interval still show.
    in_flight_peak: AtomicU32,
    /// Requests whose batch ended, not yet in the histograms.
    handed_over: Mutex<Vec<RequestTimes>>,
    histograms: Mutex<Option<Box<PhaseHistograms>>>,
    series: Mutex<InFlightSeries>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update leaves the data consistent: a panic elsewhere cannot break it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Default for QueueLatency {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueLatency {
    /// Takes timestamps and fills histograms unless [`set_timing`] turned timing off.
    pub fn new() -> Self {
        QueueLatency {
            timing: TIMING.load(Ordering::Relaxed),
            succeeded: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            interrupts_suppressed: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            in_flight_peak: AtomicU32::new(0),
            handed_over: Mutex::new(Vec::new()),
            histograms: Mutex::new(None),
            series: Mutex::new(InFlightSeries::default()),
        }
    }

    pub fn timing(&self) -> bool {
        self.timing
    }

    pub fn counts(&self) -> QueueCounts {
        let errors = self.errors.load(Ordering::Relaxed);
        QueueCounts {
            requests: self.succeeded.load(Ordering::Relaxed) + errors,
            errors,
            notifications: self.notifications.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            interrupts_suppressed: self.interrupts_suppressed.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// A copy of the histograms, every handed-over request included; `None` before the
    /// first timed request.
    pub fn histograms(&self) -> Option<Box<PhaseHistograms>> {
        self.record_handed_over();
        lock(&self.histograms).clone()
    }

    /// Moves the requests the worker handed over into the histograms.
    pub fn record_handed_over(&self) {
        let requests = std::mem::take(&mut *lock(&self.handed_over));
        if requests.is_empty() {
            return;
        }
        let mut histograms = lock(&self.histograms);
        let histograms = histograms.get_or_insert_with(|| {
            Box::new(std::array::from_fn(|_| {
                Histogram::new(SIGNIFICANT_DIGITS).expect("2 significant digits are valid")
            }))
        });
        for times in &requests {
            for (histogram, phase) in histograms.iter_mut().zip(times.phases()) {
                if let Some(nanoseconds) = phase {
                    // `record` grows the histogram to the value; it fails only when a u32
                    // count would overflow (4 billion samples in one bucket): then saturate.
                    if histogram.record(nanoseconds).is_err() {
                        histogram.saturating_record(nanoseconds);
                    }
                }
            }
        }
        // Give the buffer back to the worker, so that it does not allocate anew.
        let mut handed_over = lock(&self.handed_over);
        if handed_over.is_empty() {
            let mut requests = requests;
            requests.clear();
            *handed_over = requests;
        }
    }

    pub fn in_flight_series(&self) -> InFlightSeries {
        lock(&self.series).clone()
    }

    /// One sampler tick: records the deepest in-flight count since the last tick, and the
    /// handed-over requests into the histograms. Queues that never had a request keep no
    /// series.
    pub fn sample_in_flight(&self) {
        // A queue that never saw a request (most of a 500-disk guest's, and the SQ ids of an
        // NVMe controller the guest never created) costs four loads: no lock, no store.
        if self.succeeded.load(Ordering::Relaxed) == 0
            && self.errors.load(Ordering::Relaxed) == 0
            && self.in_flight_peak.load(Ordering::Relaxed) == 0
            && self.in_flight.load(Ordering::Relaxed) == 0
        {
            return;
        }
        self.record_handed_over();
        let depth = self.in_flight.load(Ordering::Relaxed);
        let peak = self
            .in_flight_peak
            .swap(depth, Ordering::Relaxed)
            .max(depth);
        lock(&self.series).tick(peak);
    }

    pub fn count_notification(&self) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that will never be published (their queue was removed) leave the depth.
    pub fn abandon(&self, requests: u32) {
        self.in_flight.fetch_sub(requests, Ordering::Relaxed);
    }
}

/// A queue handler's side: stamps requests and records each batch.
pub struct LatencyRecorder {
    queue: Arc<QueueLatency>,
    /// Requests published since the last interrupt decision.
    published: Vec<RequestTimes>,
}

impl LatencyRecorder {
    pub fn new(queue: Arc<QueueLatency>) -> Self {
        LatencyRecorder {
            queue,
            published: Vec::new(),
        }
    }

    /// A timestamp, or 0 with timing off.
    pub fn stamp(&self) -> u64 {
        if self.queue.timing {
            now_ns()
        } else {
            0
        }
    }

    /// A request was fetched from the queue.
    pub fn fetched(&self) {
        let depth = self.queue.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.queue
            .in_flight_peak
            .fetch_max(depth, Ordering::Relaxed);
    }

    /// A fetched request could not be published (its head index was bad).
    pub fn abandoned(&self) {
        self.queue.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// A fetched request was published with success.
    pub fn published(&mut self, times: RequestTimes) {
        self.queue.succeeded.fetch_add(1, Ordering::Relaxed);
        self.publish(times);
    }

    /// A fetched request was published with an error status.
    pub fn published_error(&mut self, times: RequestTimes) {
        self.queue.errors.fetch_add(1, Ordering::Relaxed);
        self.publish(times);
    }

    fn publish(&mut self, mut times: RequestTimes) {
        self.queue.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.queue.timing {
            times.published = now_ns();
            self.published.push(times);
        }
    }

    /// The batch ended: `interrupted` says whether an interrupt was injected for it. Stamps
    /// the injection on the batch's requests and hands them over for recording.
    pub fn batch_ended(&mut self, interrupted: bool) {
        let counter = if interrupted {
            &self.queue.interrupts
        } else {
            &self.queue.interrupts_suppressed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.published.is_empty() {
            return;
        }
        if interrupted {
            let injected = now_ns();
            for times in &mut self.published {
                times.injected = injected;
            }
        }
        let backlog = {
            let mut handed_over = lock(&self.queue.handed_over);
            handed_over.append(&mut self.published);
            handed_over.len()
        };
        // Nobody reads (no sampler, e.g. in a test): record rather than grow without end.
        if backlog >= MAX_HANDED_OVER {
            self.queue.record_handed_over();
        }
    }

    /// The queue this recorder feeds.
    pub fn queue(&self) -> &QueueLatency {
        &self.queue
    }
}

/// Test check: a backend with `latency_ns` of injected latency shows it in the backend
/// phase (1% histogram resolution) and nowhere else but the total.
#[cfg(test)]
pub(crate) fn assert_only_the_backend_phase_is_slow(histograms: &PhaseHistograms, latency_ns: u64) {
    let backend = &histograms[Phase::Backend.index()];
    assert!(
        backend.min() >= latency_ns * 99 / 100,
        "backend min {}",
        backend.min()
    );
    for phase in [
        Phase::Parse,
        Phase::Submit,
        Phase::Publish,
        Phase::Interrupt,
    ] {
        let median = histograms[phase.index()].value_at_quantile(0.5);
        assert!(median < latency_ns / 2, "{phase:?} median {median} ns");
    }
    let total = &histograms[Phase::Total.index()];
    assert!(
        total.min() >= backend.min(),
        "the whole contains the backend phase"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_time_with_the_monotonic_clock() {
        start_clock();
        let (start, instant) = (now_ns(), Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (ours, theirs) = (now_ns() - start, instant.elapsed().as_nanos() as u64);
        // Both read at nearly the same moments: within 1% (plus scheduling slack).
        assert!(
            ours.abs_diff(theirs) < theirs / 100 + 200_000,
            "{ours} vs {theirs} ns"
        );
        let mut last = now_ns();
        for _ in 0..10_000 {
            let now = now_ns();
            assert!(now >= last, "monotonic on one thread");
            last = now;
        }
    }

    #[test]
    fn a_series_keeps_the_deepest_sample_as_it_coarsens() {
        let queue = QueueLatency::new();
        queue.sample_in_flight();
        assert_eq!(
            queue.in_flight_series().max_depth.len(),
            0,
            "idle queues keep nothing"
        );
        queue.in_flight.store(3, Ordering::Relaxed);
        let ticks = InFlightSeries::CAPACITY * 2 + 2;
        for tick in 0..ticks {
            // One spike of 40 among depths of 3.
            let depth = if tick == 7 { 40 } else { 3 };
            queue.in_flight.store(depth, Ordering::Relaxed);
            queue.sample_in_flight();
        }
        let series = queue.in_flight_series();
        assert_eq!(series.stride, 4);
        assert!(series.max_depth.len() <= InFlightSeries::CAPACITY);
        assert_eq!(
            series.max_depth.len(),
            ticks / 4 + 1,
            "{}",
            series.max_depth.len()
        );
        // 40 at tick 7 and (for all the sampler knows) until just before tick 8: the
        // intervals ending at ticks 7 and 8, merged into samples 1 (ticks 4-7) and 2 (8-11).
        assert_eq!(series.max_depth.iter().filter(|&&d| d == 40).count(), 2);
        assert_eq!(series.max_depth[1..3], [40, 40]);
        assert!(series.max_depth.iter().all(|&d| d == 3 || d == 40));
    }

    #[test]
    fn a_burst_between_two_samples_still_shows() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::new(queue.clone());
        queue.sample_in_flight();
        for _ in 0..5 {
            recorder.fetched();
        }
        for _ in 0..5 {
            recorder.published(RequestTimes::default());
        }
        queue.sample_in_flight();
        queue.sample_in_flight();
        assert_eq!(queue.in_flight_series().max_depth, [5, 0]);
    }

    #[test]
    fn each_published_request_adds_one_sample_to_every_phase_it_went_through() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::new(queue.clone());
        let start = now_ns();
        for answered in [false, false, true] {
            recorder.fetched();
            let mut times = RequestTimes {
                notified: start,
                parsed: start + 1_000,
                submitted: start + 3_000,
                completed: start + 10_000,
                ..RequestTimes::default()
            };
            if answered {
                times.answered_at_parse();
            }
            recorder.published(times);
        }
        recorder.batch_ended(true);
        recorder.fetched();
        recorder.published_error(RequestTimes {
            notified: start,
            ..RequestTimes::default()
        });
        recorder.batch_ended(false);
        let counts = queue.counts();
        assert_eq!(
            (
                counts.requests,
                counts.errors,
                counts.interrupts,
                counts.interrupts_suppressed
            ),
            (4, 1, 1, 1)
        );
        assert_eq!(counts.in_flight, 0);
        let histograms = queue.histograms().expect("timed");
        let count = |phase: Phase| histograms[phase.index()].len();
        assert_eq!(count(Phase::Total), 4);
        assert_eq!(
            count(Phase::Interrupt),
            3,
            "the last batch raised no interrupt"
        );
        let backend = &histograms[Phase::Backend.index()];
        // Two requests spent 7 us at the backend, the answered one and the last none.
        assert_eq!(backend.count_between(6_900, 7_100), 2);
        assert_eq!(backend.count_at(0), 2);
        let parse = &histograms[Phase::Parse.index()];
        assert_eq!(parse.count_between(990, 1_010), 3);
    }
}
