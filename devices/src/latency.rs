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
//!
//! With timing on, requests are also split by direction ([`Op`]: read, write, other): the
//! `backend` and `total` phases of each direction get histograms of their own, and every
//! request at the backend has a word in its queue's [`InFlightTable`] (its notification time
//! and direction, stored when it goes to the backend and cleared when the backend is done:
//! two plain stores per request, no lock). The sampler scans the table each tick for the
//! count and the age of the oldest request of each direction, so a series shows writes that
//! wait for seconds while reads come and go.

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

/// Which way a request moves data: the per-direction numbers split requests by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// virtio-blk IN, NVMe Read.
    Read,
    /// virtio-blk OUT, NVMe Write.
    Write,
    /// Everything else: flush, discard, write zeroes, GET_ID, Dataset Management, and
    /// requests whose type is unknown or could not be read.
    #[default]
    Other,
}

pub const OP_COUNT: usize = 3;

impl Op {
    pub const ALL: [Op; OP_COUNT] = [Op::Read, Op::Write, Op::Other];

    /// Position in [`Op::ALL`] and in every per-direction array.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Other => "other",
        }
    }
}

/// One request's timestamps ([`now_ns`]); 0 while timing is off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTimes {
    /// The request's direction, once parsed ([`Op::Other`] until then).
    pub op: Op,
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

/// The phases kept per direction.
pub const OP_PHASES: [Phase; 2] = [Phase::Backend, Phase::Total];

/// HdrHistograms of one direction of one queue, in nanoseconds, indexed like [`OP_PHASES`].
pub type OpHistograms = [Histogram<u32>; OP_PHASES.len()];

/// One queue's [`OpHistograms`] per direction, indexed like [`Op::ALL`]; `None` for a
/// direction without a timed request.
pub type HistogramsByOp = [Option<Box<OpHistograms>>; OP_COUNT];

/// Every histogram of one queue.
#[derive(Debug, Clone, Default)]
pub struct QueueHistograms {
    /// `None` before the first timed request.
    pub phases: Option<Box<PhaseHistograms>>,
    pub by_op: HistogramsByOp,
}

fn new_histogram() -> Histogram<u32> {
    Histogram::new(SIGNIFICANT_DIGITS).expect("2 significant digits are valid")
}

fn record(histogram: &mut Histogram<u32>, nanoseconds: u64) {
    // `record` grows the histogram to the value; it fails only when a u32 count would
    // overflow (4 billion samples in one bucket): then saturate.
    if histogram.record(nanoseconds).is_err() {
        histogram.saturating_record(nanoseconds);
    }
}

/// Significant digits of every histogram: 1% resolution.
const SIGNIFICANT_DIGITS: u8 = 2;
/// Handed-over requests a queue holds before its worker records them itself.
const MAX_HANDED_OVER: usize = 1 << 16;

/// What the sampler saw of one direction at one tick: requests at the backend, and the age
/// of the oldest of them (the sampler's [`now_ns`] minus its notification time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpSample {
    pub count: u32,
    /// Microseconds, saturating (71 minutes); 0 with nothing in flight or timing off.
    pub oldest_us: u32,
}

impl OpSample {
    fn max(self, other: OpSample) -> OpSample {
        OpSample {
            count: self.count.max(other.count),
            oldest_us: self.oldest_us.max(other.oldest_us),
        }
    }
}

/// One direction of an [`InFlightSeries`]: one value per sample, each the largest of the
/// sampler ticks the sample covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpSeries {
    /// Requests of this direction at the backend.
    pub max_count: Vec<u32>,
    /// Age of the oldest of them, microseconds.
    pub max_oldest_us: Vec<u32>,
}

/// Neighbouring values merged pairwise, keeping the larger.
fn merge_pairs(values: &mut Vec<u32>) {
    let merged: Vec<u32> = values
        .chunks(2)
        .map(|pair| pair.iter().copied().max().unwrap_or(0))
        .collect();
    *values = merged;
}

/// In-flight depth over time: one sample (the deepest seen) per `stride` sampler ticks. When
/// full, neighbouring samples merge and the stride doubles, so a run of any length fits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlightSeries {
    /// [`now_ns`] of the first sample.
    pub start_ns: u64,
    /// Sampler ticks per sample.
    pub stride: u32,
    pub max_depth: Vec<u32>,
    /// Per direction, indexed like [`Op::ALL`]: `None` until a tick saw a request of that
    /// direction at the backend (timing on only); then as long as `max_depth`, with zeros
    /// for the samples before.
    pub by_op: [Option<OpSeries>; OP_COUNT],
    pending_max: u32,
    pending_ticks: u32,
    pending_ops: [OpSample; OP_COUNT],
}

impl InFlightSeries {
    pub const CAPACITY: usize = 1024;

    fn tick(&mut self, depth: u32, ops: [OpSample; OP_COUNT]) {
        if self.stride == 0 {
            self.start_ns = now_ns();
            self.stride = 1;
        }
        self.pending_max = self.pending_max.max(depth);
        for (pending, sample) in self.pending_ops.iter_mut().zip(ops) {
            *pending = pending.max(sample);
        }
        self.pending_ticks += 1;
        if self.pending_ticks < self.stride {
            return;
        }
        if self.max_depth.len() == Self::CAPACITY {
            merge_pairs(&mut self.max_depth);
            for series in self.by_op.iter_mut().flatten() {
                merge_pairs(&mut series.max_count);
                merge_pairs(&mut series.max_oldest_us);
            }
            self.stride *= 2;
        }
        let earlier = self.max_depth.len();
        self.max_depth.push(self.pending_max);
        for (series, pending) in self.by_op.iter_mut().zip(self.pending_ops) {
            if series.is_none() && pending != OpSample::default() {
                *series = Some(OpSeries {
                    max_count: vec![0; earlier],
                    max_oldest_us: vec![0; earlier],
                });
            }
            if let Some(series) = series {
                series.max_count.push(pending.count);
                series.max_oldest_us.push(pending.oldest_us);
            }
        }
        self.pending_max = 0;
        self.pending_ticks = 0;
        self.pending_ops = [OpSample::default(); OP_COUNT];
    }
}

/// Largest slot index an [`InFlightTable`] covers, exclusive: above any queue's in-flight
/// limit (virtio: the queue size, at most 32768; NVMe: the CQ's entries, at most 65536).
const MAX_TABLE_SLOTS: usize = 1 << 16;
/// Smallest table a queue that grows one on demand (NVMe) starts with.
const MIN_TABLE_SLOTS: usize = 64;
/// Notification times above this do not fit a table word (146 years of uptime).
const MAX_TABLE_TIME: u64 = u64::MAX >> 2;

/// The requests of one queue handler that are at the backend: one word per request slot of
/// the handler, 0 while the slot is not at the backend, else its notification time (shifted
/// left by two) and its direction (`Op::index() + 1`, the low two bits). Only the handler's
/// worker stores; the sampler reads.
pub struct InFlightTable {
    slots: Box<[AtomicU64]>,
}

impl InFlightTable {
    fn new(slots: usize) -> Self {
        InFlightTable {
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn word(times: &RequestTimes) -> u64 {
        (times.notified.min(MAX_TABLE_TIME) << 2) | (times.op.index() as u64 + 1)
    }

    /// The direction and notification time of a word; `None` for a free slot.
    fn decode(word: u64) -> Option<(Op, u64)> {
        let op = match word & 3 {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Other,
            _ => return None,
        };
        Some((op, word >> 2))
    }

    /// Adds this table's requests to `counts` and lowers `oldest` (notification times) to
    /// theirs, per direction.
    fn scan(&self, counts: &mut [u32; OP_COUNT], oldest: &mut [u64; OP_COUNT]) {
        for slot in self.slots.iter() {
            if let Some((op, notified)) = Self::decode(slot.load(Ordering::Relaxed)) {
                let index = op.index();
                counts[index] = counts[index].saturating_add(1);
                oldest[index] = oldest[index].min(notified);
            }
        }
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
    histograms: Mutex<QueueHistograms>,
    series: Mutex<InFlightSeries>,
    /// The in-flight tables of this queue's live handlers (one, or two while an NVMe SQ id
    /// is created again before the old handler's last completion). Locked by the sampler,
    /// and by a handler only when it starts, grows its table or ends.
    tables: Mutex<Vec<Arc<InFlightTable>>>,
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
            histograms: Mutex::new(QueueHistograms::default()),
            series: Mutex::new(InFlightSeries::default()),
            tables: Mutex::new(Vec::new()),
        }
    }

    pub fn timing(&self) -> bool {
        self.timing
    }

    /// A queue as `--timing off` makes it, whatever the global setting.
    #[cfg(test)]
    fn untimed() -> Self {
        QueueLatency {
            timing: false,
            ..Self::new()
        }
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
        lock(&self.histograms).phases.clone()
    }

    /// A copy of every histogram (all requests by phase, and by direction), every
    /// handed-over request included.
    pub fn queue_histograms(&self) -> QueueHistograms {
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
        let QueueHistograms { phases, by_op } = &mut *histograms;
        let phases =
            phases.get_or_insert_with(|| Box::new(std::array::from_fn(|_| new_histogram())));
        for times in &requests {
            let values = times.phases();
            for (histogram, value) in phases.iter_mut().zip(values) {
                if let Some(nanoseconds) = value {
                    record(histogram, nanoseconds);
                }
            }
            let op = by_op[times.op.index()]
                .get_or_insert_with(|| Box::new(std::array::from_fn(|_| new_histogram())));
            for (histogram, phase) in op.iter_mut().zip(OP_PHASES) {
                if let Some(nanoseconds) = values[phase.index()] {
                    record(histogram, nanoseconds);
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

    /// Requests at the backend now, and the age of the oldest, per direction (indexed like
    /// [`Op::ALL`]). Empty with timing off (nothing is tracked then).
    pub fn in_flight_by_op(&self) -> [OpSample; OP_COUNT] {
        self.in_flight_by_op_at(now_ns())
    }

    /// [`Self::in_flight_by_op`] with ages as of `now`.
    fn in_flight_by_op_at(&self, now: u64) -> [OpSample; OP_COUNT] {
        let mut counts = [0u32; OP_COUNT];
        let mut oldest = [u64::MAX; OP_COUNT];
        for table in lock(&self.tables).iter() {
            table.scan(&mut counts, &mut oldest);
        }
        let mut samples = [OpSample::default(); OP_COUNT];
        for ((sample, count), notified) in samples.iter_mut().zip(counts).zip(oldest) {
            if count > 0 {
                let age_us = now.saturating_sub(notified) / 1_000;
                *sample = OpSample {
                    count,
                    oldest_us: u32::try_from(age_us).unwrap_or(u32::MAX),
                };
            }
        }
        samples
    }

    /// Swaps a handler's in-flight tables: `old` (its previous one, or the one of a handler
    /// that ends) leaves, `new` (a first or grown one) comes.
    fn replace_table(&self, old: Option<&Arc<InFlightTable>>, new: Option<Arc<InFlightTable>>) {
        let mut tables = lock(&self.tables);
        if let Some(old) = old {
            tables.retain(|table| !Arc::ptr_eq(table, old));
        }
        tables.extend(new);
    }

    /// One sampler tick: records the deepest in-flight count since the last tick, the
    /// requests at the backend by direction and their oldest's age, and the handed-over
    /// requests into the histograms. Queues that never had a request keep no series.
    pub fn sample_in_flight(&self) {
        self.sample_in_flight_at(now_ns);
    }

    /// [`Self::sample_in_flight`] with ages as of `now()`.
    fn sample_in_flight_at(&self, now: impl FnOnce() -> u64) {
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
        // Nothing fetched and unpublished: no table has a word set (a handler clears a word
        // before it publishes the request), so skip the scan.
        let by_op = if depth > 0 {
            self.in_flight_by_op_at(now())
        } else {
            [OpSample::default(); OP_COUNT]
        };
        lock(&self.series).tick(peak, by_op);
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
    /// This handler's requests at the backend (timing on only), registered with `queue`
    /// until the recorder is dropped.
    table: Option<Arc<InFlightTable>>,
}

impl LatencyRecorder {
    /// A recorder whose in-flight table grows with the slots it is given (NVMe: a handler's
    /// request table grows on demand too).
    pub fn new(queue: Arc<QueueLatency>) -> Self {
        LatencyRecorder {
            queue,
            published: Vec::new(),
            table: None,
        }
    }

    /// A recorder for a handler with a fixed number of request slots (a virtqueue's size):
    /// its in-flight table is allocated now, never on the request path.
    pub fn with_slots(queue: Arc<QueueLatency>, slots: usize) -> Self {
        let mut recorder = Self::new(queue);
        if recorder.queue.timing && slots > 0 {
            let table = Arc::new(InFlightTable::new(slots.min(MAX_TABLE_SLOTS)));
            recorder.queue.replace_table(None, Some(table.clone()));
            recorder.table = Some(table);
        }
        recorder
    }

    /// The request in handler slot `slot` went to the backend (again, for a later step of a
    /// multi-step command: harmless). Its direction and notification time are in `times`.
    pub fn backend_started(&mut self, slot: u32, times: &RequestTimes) {
        if !self.queue.timing {
            return;
        }
        let slot = slot as usize;
        if !matches!(&self.table, Some(table) if slot < table.len()) {
            self.grow_table(slot);
        }
        if let Some(word) = self.table.as_ref().and_then(|table| table.slots.get(slot)) {
            word.store(InFlightTable::word(times), Ordering::Relaxed);
        }
    }

    /// The backend is done with the request in handler slot `slot` (or it never went
    /// there: then this clears a word that is already clear).
    pub fn backend_finished(&self, slot: u32) {
        if let Some(word) = self
            .table
            .as_ref()
            .and_then(|table| table.slots.get(slot as usize))
        {
            word.store(0, Ordering::Relaxed);
        }
    }

    /// A table that covers `slot` (the next power of two), with the words of the old one,
    /// in its place. Slots past [`MAX_TABLE_SLOTS`] are not tracked.
    #[cold]
    fn grow_table(&mut self, slot: usize) {
        if slot >= MAX_TABLE_SLOTS {
            return;
        }
        let len = (slot + 1)
            .next_power_of_two()
            .clamp(MIN_TABLE_SLOTS, MAX_TABLE_SLOTS);
        let table = Arc::new(InFlightTable::new(len));
        if let Some(old) = &self.table {
            for (new, old) in table.slots.iter().zip(old.slots.iter()) {
                new.store(old.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        self.queue
            .replace_table(self.table.as_ref(), Some(table.clone()));
        self.table = Some(table);
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

impl Drop for LatencyRecorder {
    /// The handler is gone: requests still in its table will never be published (their
    /// queue was removed), so the sampler stops seeing them.
    fn drop(&mut self) {
        if let Some(table) = self.table.take() {
            self.queue.replace_table(Some(&table), None);
        }
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

    /// A request of direction `op` notified at `notified`, at the backend in `slot`.
    fn at_backend(recorder: &mut LatencyRecorder, slot: u32, op: Op, notified: u64) {
        recorder.fetched();
        recorder.backend_started(
            slot,
            &RequestTimes {
                op,
                notified,
                ..RequestTimes::default()
            },
        );
    }

    #[test]
    fn table_words_keep_direction_and_time_and_zero_is_free() {
        for op in Op::ALL {
            for notified in [0, 1, 123_456_789, MAX_TABLE_TIME, u64::MAX] {
                let word = InFlightTable::word(&RequestTimes {
                    op,
                    notified,
                    ..RequestTimes::default()
                });
                assert_ne!(word, 0, "an occupied slot is never free");
                assert_eq!(
                    InFlightTable::decode(word),
                    Some((op, notified.min(MAX_TABLE_TIME)))
                );
            }
        }
        assert_eq!(InFlightTable::decode(0), None);
    }

    #[test]
    fn the_sampler_sees_each_direction_at_the_backend_and_its_oldest() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::with_slots(queue.clone(), 8);
        const MS: u64 = 1_000_000;
        let t = 10_000 * MS;
        // As seen at t + 3 s: two writes waiting 3 s and 1 s, a read of 5 ms, a flush of 1 ms.
        at_backend(&mut recorder, 0, Op::Write, t);
        at_backend(&mut recorder, 1, Op::Read, t + 2_995 * MS);
        at_backend(&mut recorder, 5, Op::Write, t + 2_000 * MS);
        at_backend(&mut recorder, 7, Op::Other, t + 2_999 * MS);
        let now = t + 3_000 * MS;
        let [read, write, other] = queue.in_flight_by_op_at(now);
        let sample = |count, oldest_us| OpSample { count, oldest_us };
        assert_eq!(read, sample(1, 5_000));
        assert_eq!(write, sample(2, 3_000_000));
        assert_eq!(other, sample(1, 1_000));
        // The oldest write leaves: the other is the oldest now.
        recorder.backend_finished(0);
        assert_eq!(
            queue.in_flight_by_op_at(now)[Op::Write.index()],
            sample(1, 1_000_000)
        );
        // A clock read before a notification (another CPU's TSC) is an age of 0.
        assert_eq!(queue.in_flight_by_op_at(t)[Op::Write.index()], sample(1, 0));
        queue.sample_in_flight_at(|| now);
        let series = queue.in_flight_series();
        assert_eq!(series.max_depth, [4], "fetched, none published");
        let writes = series.by_op[Op::Write.index()].as_ref().expect("writes");
        assert_eq!(writes.max_count, [1]);
        assert_eq!(writes.max_oldest_us, [1_000_000]);
        // Slots the table does not have are ignored, not a panic.
        recorder.backend_finished(u32::MAX);
        // The handler goes (a device reset): what it had in flight is no longer seen.
        drop(recorder);
        assert_eq!(queue.in_flight_by_op(), [OpSample::default(); OP_COUNT]);
    }

    #[test]
    fn a_table_grows_with_its_slots_and_keeps_what_it_holds() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::new(queue.clone());
        assert_eq!(queue.in_flight_by_op(), [OpSample::default(); OP_COUNT]);
        let now = now_ns();
        at_backend(&mut recorder, 3, Op::Read, now);
        assert_eq!(lock(&queue.tables)[0].len(), MIN_TABLE_SLOTS);
        at_backend(&mut recorder, 1000, Op::Write, now);
        assert_eq!(
            lock(&queue.tables).len(),
            1,
            "the grown table replaced the first"
        );
        assert_eq!(lock(&queue.tables)[0].len(), 1024);
        let [read, write, _] = queue.in_flight_by_op();
        assert_eq!((read.count, write.count), (1, 1), "the read moved over");
        // Beyond any queue's limit: not tracked, no allocation.
        at_backend(&mut recorder, MAX_TABLE_SLOTS as u32, Op::Write, now);
        assert_eq!(lock(&queue.tables)[0].len(), 1024);
        // A second handler of the same queue (an NVMe SQ id created again) adds its own.
        let mut second = LatencyRecorder::new(queue.clone());
        at_backend(&mut second, 0, Op::Write, now);
        assert_eq!(queue.in_flight_by_op()[Op::Write.index()].count, 2);
        drop(recorder);
        assert_eq!(queue.in_flight_by_op()[Op::Write.index()].count, 1);
        assert_eq!(queue.in_flight_by_op()[Op::Read.index()].count, 0);
    }

    #[test]
    fn without_timing_nothing_is_tracked_by_direction() {
        let queue = Arc::new(QueueLatency::untimed());
        let mut recorder = LatencyRecorder::with_slots(queue.clone(), 16);
        at_backend(&mut recorder, 2, Op::Write, 0);
        assert!(lock(&queue.tables).is_empty());
        queue.sample_in_flight();
        let series = queue.in_flight_series();
        assert_eq!(series.max_depth, [1]);
        assert_eq!(series.by_op, [None, None, None]);
    }

    #[test]
    fn direction_series_start_when_seen_and_coarsen_with_the_depth() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::with_slots(queue.clone(), 4);
        recorder.fetched();
        recorder.published(RequestTimes::default());
        // Two ticks with nothing at the backend: no direction series yet.
        queue.sample_in_flight();
        queue.sample_in_flight();
        assert_eq!(queue.in_flight_series().by_op, [None, None, None]);
        const TICK: u64 = 10_000_000;
        let start = 1_000 * TICK;
        at_backend(&mut recorder, 0, Op::Write, start - 200 * TICK);
        // Ticks 2.. of the series: 1498 of them, 10 ms apart.
        for tick in 0..1498 {
            // A read at the backend during these ticks 100..=101 only.
            if tick == 100 {
                at_backend(&mut recorder, 1, Op::Read, start + 99 * TICK);
            }
            if tick == 102 {
                recorder.backend_finished(1);
                recorder.published(RequestTimes::default());
            }
            queue.sample_in_flight_at(|| start + tick * TICK);
        }
        let series = queue.in_flight_series();
        assert_eq!(series.stride, 2);
        let writes = series.by_op[Op::Write.index()].as_ref().expect("writes");
        let reads = series.by_op[Op::Read.index()].as_ref().expect("reads");
        assert!(series.by_op[Op::Other.index()].is_none());
        for one in [writes, reads] {
            assert_eq!(one.max_count.len(), series.max_depth.len());
            assert_eq!(one.max_oldest_us.len(), series.max_depth.len());
        }
        // The first two ticks (merged into sample 0) had no write; every later one had it.
        assert_eq!(writes.max_count[0], 0);
        assert!(writes.max_count[1..].iter().all(|&count| count == 1));
        // Sample 1 covers the series' ticks 2 and 3: the write is 2.01 s old at the later.
        assert_eq!(writes.max_oldest_us[1], 2_010_000);
        assert!(writes
            .max_oldest_us
            .windows(2)
            .all(|pair| pair[0] < pair[1]));
        // The series' ticks 102 and 103 (this loop's 100 and 101) saw the read: sample 51.
        let read_samples: Vec<usize> = (0..reads.max_count.len())
            .filter(|&i| reads.max_count[i] > 0)
            .collect();
        assert_eq!(read_samples, [51]);
        assert_eq!(
            reads.max_oldest_us[51], 20_000,
            "two ticks after its notification"
        );
    }

    #[test]
    fn histograms_by_direction_keep_the_backend_and_total_phases() {
        let queue = Arc::new(QueueLatency::new());
        let mut recorder = LatencyRecorder::new(queue.clone());
        let start = now_ns();
        let request = |op: Op, backend_ns: u64| RequestTimes {
            op,
            notified: start,
            parsed: start + 1_000,
            submitted: start + 2_000,
            completed: start + 2_000 + backend_ns,
            ..RequestTimes::default()
        };
        for _ in 0..10 {
            recorder.fetched();
            recorder.published(request(Op::Read, 50_000));
        }
        for _ in 0..3 {
            recorder.fetched();
            recorder.published(request(Op::Write, 2_000_000_000));
        }
        recorder.batch_ended(true);
        let all = queue.queue_histograms();
        assert_eq!(all.phases.expect("timed")[Phase::Total.index()].len(), 13);
        let by_op = |op: Op| all.by_op[op.index()].as_ref();
        assert!(by_op(Op::Other).is_none());
        let (reads, writes) = (by_op(Op::Read).unwrap(), by_op(Op::Write).unwrap());
        let backend = OP_PHASES.iter().position(|&p| p == Phase::Backend).unwrap();
        let total = OP_PHASES.iter().position(|&p| p == Phase::Total).unwrap();
        assert_eq!((reads[total].len(), writes[total].len()), (10, 3));
        assert_eq!(reads[backend].len(), 10);
        assert!(reads[total].max() < 1_000_000);
        assert!(reads[backend].max() <= 50_500);
        assert!(writes[backend].min() >= 1_980_000_000);
    }
}
