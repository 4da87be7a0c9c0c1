//! Host-side events on NVMe paths and the I/O stall each caused: what the host did through
//! the control socket (ANA state changes, failed, restored and reset controllers) and the
//! resets the guest made (its error recovery, or `reset_controller` in sysfs).
//!
//! A stall is measured on the event's subsystem (every controller sharing its namespaces):
//! the longest interval, from the event until the next event on the subsystem or
//! [`EVENT_WINDOW`], in which none of its queues published a completion (errors included:
//! a path error the guest fails over on is progress). Under a steady load (fio) that is
//! the pause the guest saw; an idle guest stalls the whole window, so read it with the
//! in-flight series beside it. A guest reset is usually the consequence of a host event, so
//! the two are measured side by side: the next host event on the subsystem closes every
//! window (a new cause, whose stall must not count for the earlier ones), a guest reset
//! closes only the window of the same controller's previous guest reset. Also measured:
//! how long the event's own controller took to complete a command with success again
//! ("path back": a path error, of an inaccessible ANA group say, is not the path serving).
//! Resolution: the in-flight sampler's interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devices::latency::{now_ns, QueueLatency};
use serde::{Deserialize, Serialize};

use crate::stats::MeasuredDisk;

/// How long after an event its stall is looked for, unless another event on the same
/// subsystem comes first.
pub const EVENT_WINDOW_NS: u64 = 30_000_000_000;

/// Events kept; later ones are only counted. A guest that resets its controllers in a loop
/// must not grow the VMM's memory, nor the vCPU's time spent recording, without bound.
pub const MAX_EVENTS: usize = 1024;

/// One controller: its PCI address and I/O queues.
struct Controller {
    address: String,
    queues: Vec<Arc<QueueLatency>>,
}

/// Controllers sharing namespaces (one, for a controller alone in its subsystem).
struct Subsystem {
    nqn: String,
    controllers: Vec<Controller>,
}

impl Subsystem {
    fn completions(&self) -> u64 {
        self.controllers.iter().map(Controller::completions).sum()
    }
}

impl Controller {
    fn completions(&self) -> u64 {
        self.queues
            .iter()
            .map(|queue| queue.counts().requests)
            .sum()
    }

    fn successes(&self) -> u64 {
        self.queues
            .iter()
            .map(|queue| queue.counts().succeeded())
            .sum()
    }
}

/// Who made an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Through the control socket.
    Host,
    /// A register write of the guest's driver.
    Guest,
}

impl Origin {
    /// As in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Host => "host",
            Origin::Guest => "guest",
        }
    }
}

/// One event and what has been measured of it so far.
struct Event {
    at_ns: u64,
    by: Origin,
    subsystem: usize,
    controller: usize,
    what: String,
    window_end_ns: u64,
    open: bool,
    subsystem_completions: u64,
    controller_successes: u64,
    /// Start of the current interval without subsystem completions.
    quiet_since_ns: u64,
    longest_quiet_ns: u64,
    controller_back_ns: Option<u64>,
    /// The controller was failed: commands it had fetched may still complete, so it is
    /// back only with a completion after the guest's reset of it.
    back_after_guest_reset: bool,
}

/// An event as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathEventReport {
    /// Milliseconds since the VMM started.
    pub at_ms: f64,
    pub pci: String,
    pub subsystem: String,
    pub by: Origin,
    /// Host: `ana group=1 state=inaccessible`, `fatal`, `fail`, `restore`, `reset`
    /// (subsystem). Guest: `reset` (CC.EN 1 -> 0), `subsystem reset` (NSSR).
    pub event: String,
    /// Longest interval without a completion on the subsystem after the event (see the
    /// module documentation), so far if the window is still open.
    pub subsystem_stall_ms: f64,
    /// Until the event's controller completed a command with success again; None if it
    /// has not (yet).
    pub controller_back_ms: Option<f64>,
    /// Still being measured.
    pub open: bool,
}

/// Every NVMe subsystem's events.
pub struct PathEvents {
    subsystems: Vec<Subsystem>,
    events: Mutex<Vec<Event>>,
    /// Events past [`MAX_EVENTS`].
    not_recorded: AtomicU64,
}

fn milliseconds(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1e6
}

impl PathEvents {
    /// Groups the NVMe controllers of `disks` by subsystem NQN.
    pub fn new(disks: &[MeasuredDisk]) -> Self {
        let mut subsystems: Vec<Subsystem> = Vec::new();
        for disk in disks {
            let Some(nqn) = &disk.subsystem_nqn else {
                continue;
            };
            let controller = Controller {
                address: disk.address.to_string(),
                queues: disk.queues.iter().map(|q| q.latency.clone()).collect(),
            };
            match subsystems.iter_mut().find(|s| &s.nqn == nqn) {
                Some(subsystem) => subsystem.controllers.push(controller),
                None => subsystems.push(Subsystem {
                    nqn: nqn.clone(),
                    controllers: vec![controller],
                }),
            }
        }
        PathEvents {
            subsystems,
            events: Mutex::new(Vec::new()),
            not_recorded: AtomicU64::new(0),
        }
    }

    fn find(&self, pci: &str) -> Option<(usize, usize)> {
        self.subsystems
            .iter()
            .enumerate()
            .find_map(|(s, subsystem)| {
                subsystem
                    .controllers
                    .iter()
                    .position(|controller| controller.address == pci)
                    .map(|c| (s, c))
            })
    }

    /// The PCI addresses of every controller in `pci`'s subsystem (itself included).
    pub fn subsystem_of(&self, pci: &str) -> Vec<String> {
        self.find(pci)
            .map(|(s, _)| {
                self.subsystems[s]
                    .controllers
                    .iter()
                    .map(|controller| controller.address.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records `what`, made `by` the host or the guest, happening to the controller at
    /// `pci` now; closes the measurement of the earlier events it supersedes (see the module
    /// documentation). Unknown addresses are ignored.
    pub fn record(&self, pci: &str, by: Origin, what: String) {
        self.record_at(pci, by, what, now_ns(), false);
    }

    /// Records `what` the host did to take the controller at `pci` down (a fatal status):
    /// it counts as back at its first completion after the guest has reset it, not at the
    /// completion of a command it had fetched before.
    pub fn record_down(&self, pci: &str, what: String) {
        self.record_at(pci, Origin::Host, what, now_ns(), true);
    }

    fn record_at(
        &self,
        pci: &str,
        by: Origin,
        what: String,
        at_ns: u64,
        back_after_guest_reset: bool,
    ) {
        let Some((subsystem, controller)) = self.find(pci) else {
            return;
        };
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() >= MAX_EVENTS {
            self.not_recorded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let subsystem_ref = &self.subsystems[subsystem];
        let controller_successes = subsystem_ref.controllers[controller].successes();
        for event in events.iter_mut() {
            if by == Origin::Guest
                && event.back_after_guest_reset
                && event.subsystem == subsystem
                && event.controller == controller
            {
                event.back_after_guest_reset = false;
                event.controller_successes = controller_successes;
            }
            let superseded = event.subsystem == subsystem
                && match by {
                    Origin::Host => true,
                    Origin::Guest => event.by == Origin::Guest && event.controller == controller,
                };
            if event.open && superseded {
                close(event, at_ns);
            }
        }
        events.push(Event {
            at_ns,
            by,
            subsystem,
            controller,
            what,
            window_end_ns: at_ns.saturating_add(EVENT_WINDOW_NS),
            open: true,
            subsystem_completions: subsystem_ref.completions(),
            controller_successes,
            quiet_since_ns: at_ns,
            longest_quiet_ns: 0,
            controller_back_ns: None,
            back_after_guest_reset,
        });
    }

    /// Called by the in-flight sampler each interval.
    pub fn tick(&self) {
        self.tick_at(now_ns());
    }

    fn tick_at(&self, now: u64) {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events.iter_mut().filter(|event| event.open) {
            let subsystem = &self.subsystems[event.subsystem];
            let completions = subsystem.completions();
            if completions != event.subsystem_completions {
                event.subsystem_completions = completions;
                event.longest_quiet_ns = event
                    .longest_quiet_ns
                    .max(now - event.quiet_since_ns.min(now));
                event.quiet_since_ns = now;
            }
            if event.controller_back_ns.is_none()
                && !event.back_after_guest_reset
                && subsystem.controllers[event.controller].successes() != event.controller_successes
            {
                event.controller_back_ns = Some(now.saturating_sub(event.at_ns));
            }
            if now >= event.window_end_ns {
                close(event, event.window_end_ns);
            }
        }
    }

    /// Events that came after [`MAX_EVENTS`] had been recorded.
    pub fn not_recorded(&self) -> u64 {
        self.not_recorded.load(Ordering::Relaxed)
    }

    /// Every event so far, in order.
    pub fn report(&self) -> Vec<PathEventReport> {
        let now = now_ns();
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events
            .iter()
            .map(|event| {
                let ongoing = if event.open {
                    now.saturating_sub(event.quiet_since_ns)
                } else {
                    0
                };
                PathEventReport {
                    at_ms: milliseconds(event.at_ns),
                    pci: self.subsystems[event.subsystem].controllers[event.controller]
                        .address
                        .clone(),
                    subsystem: self.subsystems[event.subsystem].nqn.clone(),
                    by: event.by,
                    event: event.what.clone(),
                    subsystem_stall_ms: milliseconds(event.longest_quiet_ns.max(ongoing)),
                    controller_back_ms: event.controller_back_ns.map(milliseconds),
                    open: event.open,
                }
            })
            .collect()
    }
}

/// Ends an event's window at `end_ns`: a quiet interval still running counts up to there.
fn close(event: &mut Event, end_ns: u64) {
    event.longest_quiet_ns = event
        .longest_quiet_ns
        .max(end_ns.saturating_sub(event.quiet_since_ns));
    event.open = false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::latency::{LatencyRecorder, RequestTimes};

    fn two_controller_subsystem() -> (PathEvents, [Arc<QueueLatency>; 2]) {
        let queues = [Arc::new(QueueLatency::new()), Arc::new(QueueLatency::new())];
        let events = PathEvents {
            subsystems: vec![Subsystem {
                nqn: "nqn.test".into(),
                controllers: vec![
                    Controller {
                        address: "0000:00:01.0".into(),
                        queues: vec![queues[0].clone()],
                    },
                    Controller {
                        address: "0000:00:02.0".into(),
                        queues: vec![queues[1].clone()],
                    },
                ],
            }],
            events: Mutex::new(Vec::new()),
            not_recorded: AtomicU64::new(0),
        };
        (events, queues)
    }

    /// One request through `queue`, as a worker counts it.
    fn complete(queue: &Arc<QueueLatency>) {
        let mut recorder = LatencyRecorder::new(queue.clone());
        recorder.fetched();
        recorder.published(RequestTimes::default());
        recorder.batch_ended(false);
    }

    /// One request through `queue` that the device failed (a path error, say).
    fn fail(queue: &Arc<QueueLatency>) {
        let mut recorder = LatencyRecorder::new(queue.clone());
        recorder.fetched();
        recorder.published_error(RequestTimes::default());
        recorder.batch_ended(false);
    }

    /// A host change (not a controller taken down) at `at_ms`.
    fn host_change_at(events: &PathEvents, pci: &str, what: &str, at_ms: u64) {
        events.record_at(pci, Origin::Host, what.into(), at_ms * 1_000_000, false);
    }

    #[test]
    fn path_errors_end_a_stall_but_the_path_is_back_only_when_it_serves() {
        let (events, queues) = two_controller_subsystem();
        let ms = 1_000_000;
        host_change_at(
            &events,
            "0000:00:01.0",
            "ana group=1 state=inaccessible",
            1000,
        );
        // A answers its commands with ANA inaccessible (progress: the guest fails over).
        fail(&queues[0]);
        events.tick_at(1010 * ms);
        complete(&queues[1]);
        events.tick_at(1020 * ms);
        let report = &events.report()[0];
        assert_eq!(
            report.controller_back_ms, None,
            "a path error is not A serving"
        );
        assert_eq!(queues[0].counts().errors, 1);
        assert_eq!(queues[0].counts().requests, 1);
        complete(&queues[0]);
        events.tick_at(1500 * ms);
        assert_eq!(events.report()[0].controller_back_ms, Some(500.0));
        host_change_at(&events, "0000:00:02.0", "fail", 1600);
        assert_eq!(events.report()[0].subsystem_stall_ms, 480.0);
    }

    #[test]
    fn stall_is_the_longest_quiet_interval_and_the_path_comes_back() {
        let (events, queues) = two_controller_subsystem();
        let ms = 1_000_000;
        host_change_at(&events, "0000:00:01.0", "fatal", 1000);
        // The other path goes on for 20 ms, then nothing completes for 300 ms.
        complete(&queues[1]);
        events.tick_at(1010 * ms);
        complete(&queues[1]);
        events.tick_at(1020 * ms);
        events.tick_at(1200 * ms);
        complete(&queues[0]);
        events.tick_at(1320 * ms);
        let report = &events.report()[0];
        assert_eq!(report.controller_back_ms, Some(320.0));
        assert!(report.open);
        // The next event closes this one: 80 ms quiet before it, less than the 300.
        events.record_at(
            "0000:00:02.0",
            Origin::Host,
            "ana group=1 state=inaccessible".into(),
            1400 * ms,
            false,
        );
        let report = events.report();
        assert!(!report[0].open);
        assert_eq!(report[0].subsystem_stall_ms, 300.0);
        assert_eq!(report[1].pci, "0000:00:02.0");
        assert_eq!(report[1].event, "ana group=1 state=inaccessible");
        assert_eq!(report[1].controller_back_ms, None);
    }

    #[test]
    fn unknown_controllers_are_ignored_and_windows_close() {
        let (events, _) = two_controller_subsystem();
        events.record_at("0000:00:09.0", Origin::Host, "fatal".into(), 5, false);
        assert!(events.report().is_empty());
        events.record_at("0000:00:01.0", Origin::Host, "reset".into(), 0, false);
        events.tick_at(EVENT_WINDOW_NS + 1);
        let report = &events.report()[0];
        assert!(!report.open);
        assert_eq!(report.subsystem_stall_ms, milliseconds(EVENT_WINDOW_NS));
        assert_eq!(
            events.subsystem_of("0000:00:02.0"),
            ["0000:00:01.0", "0000:00:02.0"]
        );
        assert!(events.subsystem_of("0000:00:09.0").is_empty());
    }

    #[test]
    fn guest_resets_are_measured_beside_the_host_event_that_caused_them() {
        let (events, queues) = two_controller_subsystem();
        let ms = 1_000_000;
        let (a, b) = ("0000:00:01.0", "0000:00:02.0");
        events.record_at(a, Origin::Host, "reset".into(), 0, false);
        // The guest notices at its command timeout and resets both controllers.
        events.record_at(a, Origin::Guest, "reset".into(), 5000 * ms, false);
        events.record_at(b, Origin::Guest, "reset".into(), 5001 * ms, false);
        complete(&queues[1]);
        events.tick_at(5100 * ms);
        complete(&queues[0]);
        events.tick_at(5200 * ms);
        let report = events.report();
        assert!(report.iter().all(|event| event.open), "{report:#?}");
        assert_eq!(report[0].controller_back_ms, Some(5200.0));
        assert_eq!(report[1].controller_back_ms, Some(200.0));
        assert_eq!(report[2].controller_back_ms, Some(99.0), "B's own reset");
        // Another guest reset of A closes A's earlier one only.
        events.record_at(a, Origin::Guest, "reset".into(), 6000 * ms, false);
        let open: Vec<bool> = events.report().iter().map(|event| event.open).collect();
        assert_eq!(open, [true, false, true, true]);
        // A host event closes every window on the subsystem: a stall from now on is its.
        events.record_at(b, Origin::Host, "fatal".into(), 7000 * ms, false);
        let open: Vec<bool> = events.report().iter().map(|event| event.open).collect();
        assert_eq!(open, [false, false, false, false, true]);
    }

    #[test]
    fn a_guest_resetting_in_a_loop_is_counted_past_the_cap_not_kept() {
        let (events, _) = two_controller_subsystem();
        for n in 0..MAX_EVENTS as u64 + 10 {
            events.record_at(
                "0000:00:01.0",
                Origin::Guest,
                "reset".into(),
                n * 1_000,
                false,
            );
        }
        let report = events.report();
        assert_eq!(report.len(), MAX_EVENTS);
        assert_eq!(events.not_recorded(), 10);
        // Each reset closed the one before it: only the last kept one is measured still.
        assert_eq!(report.iter().filter(|event| event.open).count(), 1);
    }

    #[test]
    fn a_failed_controller_is_back_only_after_the_guest_reset_it() {
        let (events, queues) = two_controller_subsystem();
        let ms = 1_000_000;
        let a = "0000:00:01.0";
        events.record_at(a, Origin::Host, "fatal".into(), 0, true);
        // A command A had fetched before the fatal status completes: A is not back.
        complete(&queues[0]);
        events.tick_at(4 * ms);
        assert_eq!(events.report()[0].controller_back_ms, None);
        // The guest resets A at its I/O timeout; A serves again 60 ms later.
        events.record_at(a, Origin::Guest, "reset".into(), 5000 * ms, false);
        events.tick_at(5030 * ms);
        assert_eq!(events.report()[0].controller_back_ms, None);
        complete(&queues[0]);
        events.tick_at(5060 * ms);
        let report = events.report();
        assert_eq!(report[0].controller_back_ms, Some(5060.0));
        assert_eq!(report[1].controller_back_ms, Some(60.0));
    }
}
