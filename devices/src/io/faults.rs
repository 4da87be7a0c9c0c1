//! Fault and latency injection for a block backend, settable at start (disk options) and at
//! run time (the control socket): per-direction latency distributions and bandwidth caps, a
//! service time shared by both directions (a disk that does one request at a time), an
//! error rate, a sector range that always fails, and requests that never complete.
//!
//! A backend asks [`Faults::decide`] once per read or write before doing it. Settings are
//! read under a short lock only while some fault is set; a disk without faults pays one
//! atomic load per request.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::backend::BlockIoKind;
use crate::latency::now_ns;

/// Bytes per sector in `error_sectors`.
const SECTOR_BYTES: u64 = 512;
/// [`Faults::free_at`] index of the line both directions share (`service_time`); 0 and 1
/// are the reads' and writes' bandwidth.
const ACTUATOR_LINE: usize = 2;

/// How long an injected delay lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyDistribution {
    Fixed(Duration),
    /// Uniform between `low` and `high`.
    Uniform {
        low: Duration,
        high: Duration,
    },
    /// Exponential with the given 99th percentile (mean = p99 / ln 100).
    Exponential {
        p99: Duration,
    },
}

impl LatencyDistribution {
    /// `fixed:1ms`, `uniform:100us-5ms`, `exp:10ms` (the p99).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?}: expected fixed:D, uniform:D-D or exp:P99"))?;
        match kind {
            "fixed" => Ok(Self::Fixed(parse_duration(value)?)),
            "uniform" => {
                let (low, high) = value
                    .split_once('-')
                    .ok_or_else(|| format!("{value:?}: expected LOW-HIGH"))?;
                let (low, high) = (parse_duration(low)?, parse_duration(high)?);
                if low > high {
                    return Err(format!("{value:?}: low above high"));
                }
                Ok(Self::Uniform { low, high })
            }
            "exp" => Ok(Self::Exponential {
                p99: parse_duration(value)?,
            }),
            other => Err(format!("{other:?}: expected fixed, uniform or exp")),
        }
    }

    /// One delay, from `uniform` in [0, 1).
    fn sample(&self, uniform: f64) -> Duration {
        match *self {
            Self::Fixed(delay) => delay,
            Self::Uniform { low, high } => low + (high - low).mul_f64(uniform),
            Self::Exponential { p99 } => {
                let mean = p99.as_secs_f64() / 100f64.ln();
                Duration::from_secs_f64(-mean * (1.0 - uniform).ln())
            }
        }
    }
}

/// `250us`, `3ms`, `1s`, `1500ns`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: give a unit (ns, us, ms, s)"))?;
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: not a number"))?;
    let nanos = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(format!("{text:?}: unit must be ns, us, ms or s")),
    };
    value
        .checked_mul(nanos)
        .map(Duration::from_nanos)
        .ok_or_else(|| format!("{text:?}: too long"))
}

/// `none`, or bytes per second with an optional K, M or G (powers of 1024).
fn bandwidth(key: &str, value: &str) -> Result<Option<u64>, String> {
    if value == "none" {
        return Ok(None);
    }
    let (digits, multiplier) = match value.as_bytes().last() {
        Some(b'K') => (&value[..value.len() - 1], 1 << 10),
        Some(b'M') => (&value[..value.len() - 1], 1 << 20),
        Some(b'G') => (&value[..value.len() - 1], 1 << 30),
        _ => (value, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|&rate| rate > 0)
        .map(Some)
        .ok_or_else(|| format!("{key}={value:?}: expected bytes per second like 20M, or none"))
}

/// What to inject, for one disk (every namespace of an NVMe controller).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultSettings {
    pub read_latency: Option<LatencyDistribution>,
    pub write_latency: Option<LatencyDistribution>,
    /// Fraction of reads and writes that fail (EIO / media error), 0..=1.
    pub error_rate: f64,
    /// Reads and writes touching these sectors fail.
    pub error_sectors: Option<Range<u64>>,
    /// Fraction of reads and writes that never complete, 0..=1.
    pub stuck_rate: f64,
    /// Bytes per second reads (writes) may move: each waits its turn behind the bytes
    /// before it, as on a disk that has nothing faster.
    pub read_bandwidth: Option<u64>,
    pub write_bandwidth: Option<u64>,
    /// How long each read or write occupies the disk, one at a time in arrival order, both
    /// directions in one line (a single actuator): a request waits for every one before
    /// it, so a read flood takes the disk's time from writes and the other way round.
    pub service_time: Option<LatencyDistribution>,
}

impl FaultSettings {
    fn any(&self) -> bool {
        self.read_latency.is_some()
            || self.write_latency.is_some()
            || self.error_rate > 0.0
            || self.error_sectors.is_some()
            || self.stuck_rate > 0.0
            || self.read_bandwidth.is_some()
            || self.write_bandwidth.is_some()
            || self.service_time.is_some()
    }

    /// Applies one `key=value` setting (the disk option and control socket syntax):
    /// `read_latency`, `write_latency` (a distribution or `none`), `error_rate`,
    /// `stuck_rate` (fractions), `error_sectors` (`START-END`, end excluded, or `none`),
    /// `read_bandwidth`, `write_bandwidth` (bytes per second: `500K`, `20M`, `1G`, or `none`),
    /// `service_time` (a distribution or `none`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let fraction = |value: &str| {
            value
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| format!("{key}={value:?}: expected a fraction in 0..=1"))
        };
        let latency = |value: &str| match value {
            "none" => Ok(None),
            _ => LatencyDistribution::parse(value).map(Some),
        };
        match key {
            "read_latency" => self.read_latency = latency(value)?,
            "write_latency" => self.write_latency = latency(value)?,
            "error_rate" => self.error_rate = fraction(value)?,
            "stuck_rate" => self.stuck_rate = fraction(value)?,
            "read_bandwidth" => self.read_bandwidth = bandwidth(key, value)?,
            "write_bandwidth" => self.write_bandwidth = bandwidth(key, value)?,
            "service_time" => self.service_time = latency(value)?,
            "error_sectors" if value == "none" => self.error_sectors = None,
            "error_sectors" => {
                let range = value
                    .split_once('-')
                    .and_then(|(start, end)| Some(start.parse().ok()?..end.parse().ok()?))
                    .filter(|range: &Range<u64>| range.start < range.end)
                    .ok_or_else(|| format!("{key}={value:?}: expected START-END sectors"))?;
                self.error_sectors = Some(range);
            }
            _ => return Err(format!("unknown fault setting {key:?}")),
        }
        Ok(())
    }
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Fail it (EIO on virtio-blk, a media error on NVMe); `persistent` when a retry would
    /// fail again (the sectors are in the bad range).
    Fail {
        persistent: bool,
    },
    /// Never complete it: the guest's timeout handling takes over.
    Stick,
    /// Do it after this delay.
    Delay(Duration),
}

/// What a disk injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub errors: u64,
    pub stuck: u64,
    pub delayed: u64,
    pub delay_ns: u64,
}

/// A disk's fault settings and counts.
#[derive(Debug, Default)]
pub struct Faults {
    active: AtomicBool,
    settings: Mutex<FaultSettings>,
    /// xorshift state: decisions need no lock of their own (a lost update only repeats a
    /// random number).
    random: AtomicU64,
    /// When each line is free again ([`now_ns`]): reads' bandwidth, writes' bandwidth, and
    /// the disk's one actuator (`service_time`).
    free_at: [AtomicU64; 3],
    errors: AtomicU64,
    stuck: AtomicU64,
    delayed: AtomicU64,
    delay_ns: AtomicU64,
}

fn lock(settings: &Mutex<FaultSettings>) -> MutexGuard<'_, FaultSettings> {
    settings.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Faults {
    pub fn new(settings: FaultSettings, seed: u64) -> Self {
        let faults = Faults {
            random: AtomicU64::new(seed | 1),
            ..Faults::default()
        };
        faults.set(settings);
        faults
    }

    pub fn set(&self, settings: FaultSettings) {
        let active = settings.any();
        *lock(&self.settings) = settings;
        self.active.store(active, Ordering::Release);
    }

    pub fn settings(&self) -> FaultSettings {
        lock(&self.settings).clone()
    }

    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            errors: self.errors.load(Ordering::Relaxed),
            stuck: self.stuck.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            delay_ns: self.delay_ns.load(Ordering::Relaxed),
        }
    }

    /// A number in [0, 1).
    fn uniform(&self) -> f64 {
        let mut x = self.random.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The fate of a `kind` request of `len` bytes at byte `offset`.
    pub fn decide(&self, kind: BlockIoKind, offset: u64, len: u64) -> Fault {
        if !self.active.load(Ordering::Acquire) {
            return Fault::None;
        }
        let settings = lock(&self.settings).clone();
        let (latency, bandwidth, direction) = match kind {
            BlockIoKind::Read => (settings.read_latency, settings.read_bandwidth, 0),
            BlockIoKind::Write => (settings.write_latency, settings.write_bandwidth, 1),
            _ => return Fault::None,
        };
        let first = offset / SECTOR_BYTES;
        let end = offset.saturating_add(len).div_ceil(SECTOR_BYTES);
        let in_bad_range = settings
            .error_sectors
            .as_ref()
            .is_some_and(|bad| first < bad.end && bad.start < end);
        if in_bad_range || (settings.error_rate > 0.0 && self.uniform() < settings.error_rate) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Fault::Fail {
                persistent: in_bad_range,
            };
        }
        if settings.stuck_rate > 0.0 && self.uniform() < settings.stuck_rate {
            self.stuck.fetch_add(1, Ordering::Relaxed);
            return Fault::Stick;
        }
        let mut delay = latency.map_or(Duration::ZERO, |distribution| {
            distribution.sample(self.uniform())
        });
        if let Some(rate) = bandwidth {
            let cost = (u128::from(len) * 1_000_000_000 / u128::from(rate)) as u64;
            delay += self.wait_in_line(direction, cost);
        }
        if let Some(service) = settings.service_time {
            let cost = service.sample(self.uniform()).as_nanos() as u64;
            delay += self.wait_in_line(ACTUATOR_LINE, cost);
        }
        if delay.is_zero() {
            return Fault::None;
        }
        self.delayed.fetch_add(1, Ordering::Relaxed);
        self.delay_ns
            .fetch_add(delay.as_nanos() as u64, Ordering::Relaxed);
        Fault::Delay(delay)
    }

    /// Books `cost_ns` of `line`'s time after everything booked before on it; returns how
    /// long the request waits for its turn to be done.
    fn wait_in_line(&self, line: usize, cost_ns: u64) -> Duration {
        let now = now_ns();
        let mut done_at = 0;
        let _ = self.free_at[line].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free_at| {
            done_at = free_at.max(now).saturating_add(cost_ns);
            Some(done_at)
        });
        Duration::from_nanos(done_at.saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_reject() {
        let mut settings = FaultSettings::default();
        settings.set("read_latency", "fixed:2ms").unwrap();
        settings.set("write_latency", "uniform:100us-5ms").unwrap();
        settings.set("error_rate", "0.25").unwrap();
        settings.set("error_sectors", "100-200").unwrap();
        settings.set("stuck_rate", "0").unwrap();
        assert_eq!(
            settings.read_latency,
            Some(LatencyDistribution::Fixed(Duration::from_millis(2)))
        );
        assert_eq!(settings.error_sectors, Some(100..200));
        for (key, value) in [
            ("read_latency", "fixed"),
            ("read_latency", "gauss:1ms"),
            ("write_latency", "uniform:5ms-1ms"),
            ("error_rate", "1.5"),
            ("error_sectors", "200-100"),
            ("stuck_rate", "x"),
            ("colour", "red"),
            ("read_latency", "fixed:10"),
        ] {
            assert!(settings.set(key, value).is_err(), "{key}={value}");
        }
        settings.set("read_latency", "none").unwrap();
        assert_eq!(settings.read_latency, None);
        assert_eq!(parse_duration("1500ns"), Ok(Duration::from_nanos(1500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn a_bandwidth_cap_queues_requests_behind_each_other() {
        let mut settings = FaultSettings::default();
        settings.set("read_bandwidth", "1M").unwrap();
        assert!(settings.clone().set("write_bandwidth", "fast").is_err());
        let faults = Faults::new(settings, 3);
        // Ten 100-KiB reads at once at 1 MiB/s: done after 0.1, 0.2, ... 1.0 s (roughly).
        let delays: Vec<Duration> = (0..10)
            .map(|_| match faults.decide(BlockIoKind::Read, 0, 100 << 10) {
                Fault::Delay(delay) => delay,
                other => panic!("{other:?}"),
            })
            .collect();
        for (index, delay) in delays.iter().enumerate() {
            let want = Duration::from_secs_f64((index + 1) as f64 * 100.0 / 1024.0);
            assert!(
                delay.abs_diff(want) < Duration::from_millis(5),
                "read {index}: {delay:?}, want {want:?}"
            );
        }
        assert_eq!(faults.decide(BlockIoKind::Write, 0, 100 << 10), Fault::None);
    }

    #[test]
    fn a_service_time_puts_reads_and_writes_in_one_line() {
        let mut settings = FaultSettings::default();
        settings.set("service_time", "fixed:10ms").unwrap();
        assert!(settings.clone().set("service_time", "soon").is_err());
        let faults = Faults::new(settings.clone(), 5);
        // Reads and writes alternate, all at once: each waits for every one before it,
        // whatever its direction (done after 10, 20, ... 60 ms).
        let kinds = [BlockIoKind::Read, BlockIoKind::Write];
        for index in 0..6 {
            let delay = match faults.decide(kinds[index % 2], 0, 4096) {
                Fault::Delay(delay) => delay,
                other => panic!("{other:?}"),
            };
            let want = Duration::from_millis(10 * (index as u64 + 1));
            assert!(
                delay.abs_diff(want) < Duration::from_millis(5),
                "request {index}: {delay:?}, want {want:?}"
            );
        }
        // Flushes do not occupy it.
        assert_eq!(faults.decide(BlockIoKind::Flush, 0, 0), Fault::None);
        settings.set("service_time", "none").unwrap();
        faults.set(settings);
        assert_eq!(faults.decide(BlockIoKind::Write, 0, 4096), Fault::None);
    }

    #[test]
    fn rates_ranges_and_directions() {
        let mut settings = FaultSettings::default();
        settings.set("error_sectors", "8-16").unwrap();
        let faults = Faults::new(settings, 7);
        // Sectors 8..16 are bytes 4096..8192.
        assert_eq!(faults.decide(BlockIoKind::Read, 0, 4096), Fault::None);
        assert_eq!(
            faults.decide(BlockIoKind::Read, 4096, 512),
            Fault::Fail { persistent: true }
        );
        assert_eq!(
            faults.decide(BlockIoKind::Write, 3584, 1024),
            Fault::Fail { persistent: true }
        );
        assert_eq!(faults.decide(BlockIoKind::Flush, 4096, 0), Fault::None);
        assert_eq!(faults.counts().errors, 2);

        let mut settings = FaultSettings::default();
        settings.set("error_rate", "0.1").unwrap();
        settings.set("stuck_rate", "0.05").unwrap();
        settings.set("read_latency", "exp:10ms").unwrap();
        faults.set(settings);
        let mut delays = Vec::new();
        let (mut failed, mut stuck) = (0, 0);
        for _ in 0..20_000 {
            match faults.decide(BlockIoKind::Read, 0, 4096) {
                Fault::Fail { persistent } => {
                    assert!(!persistent, "a random error may pass on retry");
                    failed += 1
                }
                Fault::Stick => stuck += 1,
                Fault::Delay(delay) => delays.push(delay),
                Fault::None => panic!("every surviving read is delayed"),
            }
        }
        // 10% fail, 5% of the rest stick: loose bounds for 20000 draws.
        assert!((1700..2300).contains(&failed), "{failed}");
        assert!((700..1100).contains(&stuck), "{stuck}");
        delays.sort();
        let p99 = delays[delays.len() * 99 / 100];
        assert!(
            (Duration::from_millis(8)..Duration::from_millis(12)).contains(&p99),
            "{p99:?}"
        );
        let counts = faults.counts();
        assert_eq!(counts.stuck, stuck);
        assert_eq!(counts.delayed, delays.len() as u64);
        // Writes have no latency set: only the rates apply to them.
        assert!(!(0..100)
            .any(|_| matches!(faults.decide(BlockIoKind::Write, 0, 4096), Fault::Delay(_))));
        faults.set(FaultSettings::default());
        assert_eq!(faults.decide(BlockIoKind::Read, 4096, 512), Fault::None);
    }
}
