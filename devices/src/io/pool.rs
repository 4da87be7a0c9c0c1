//! The I/O worker pool: a fixed number of threads, each owning one io_uring and serving a set of
//! queues (DESIGN.md 4: no thread per queue, no single event loop for everything).
//!
//! Everything a worker waits for is an io_uring completion: guest notifications (a poll on each
//! queue's notifier eventfd, multishot when the kernel has it, re-armed otherwise), backend I/O,
//! and control messages (a poll on the worker's own eventfd). An idle worker sleeps in
//! `submit_and_wait(1)`; no epoll thread and no thread hop sit between a guest kick and the
//! request's submission, nor between a completion and the used ring.
//!
//! # Control protocol (adding and removing queues) and why no wake-up is lost (S5)
//!
//! The vCPU thread (or whoever activates or resets a device) talks to a worker through an inbox
//! (a mutex-protected queue of [`Control`] messages) and a doorbell (the worker's eventfd):
//!
//! 1. the sender pushes the message into the inbox, *then* writes the doorbell;
//! 2. the worker always has a poll armed on the doorbell; each doorbell completion makes it
//!    drain the inbox completely (in one-shot poll mode it first clears the eventfd counter,
//!    then re-arms, then drains).
//!
//! A message can only be missed if the worker finishes draining before the message is in the
//! inbox and then sleeps without a doorbell completion pending. But the doorbell write comes
//! after the push, so it happens after that drain's view of the inbox was taken or it is seen
//! by it: in the first case the eventfd is signalled after the worker's last clear, so the
//! armed poll completes (a multishot poll posts a completion per wake-up; a re-armed one-shot
//! poll sees the readable eventfd at once) and the worker drains again. Extra drains find an
//! empty inbox and cost nothing. The same argument covers guest kicks: the worker processes a
//! queue's avail ring after each notifier completion, and the notifier poll is armed before the
//! first processing at activation, so a kick either lands before a processing pass (which sees
//! its avail entries) or signals the armed poll.
//!
//! Removal must guarantee that nothing of the queue touches guest memory afterwards: the worker
//! stops delivering events to the handler, cancels the notifier poll and every in-flight backend
//! operation (IORING_OP_ASYNC_CANCEL; operations already running in the kernel are simply
//! waited for), and drops the handler (which owns the buffers, iovecs and guest memory the
//! kernel might still write) only after the last completion of the queue has arrived. Only then
//! does it answer the waiting caller.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::user_data::{OpKind, UserData, MAX_QUEUE_SLOTS};

/// Submission ring entries per worker: SQEs are staged in a backlog first, so this bounds
/// only how many go to the kernel per `io_uring_enter`, not how many may be in flight.
const SUBMISSION_ENTRIES: u32 = 256;
/// Completion ring entries per worker: room for a burst from many queues; beyond it the kernel
/// keeps completions on its overflow list (IORING_FEAT_NODROP, required).
const COMPLETION_ENTRIES: u32 = 8192;
/// Upper bound on worker threads: one per host CPU is the default; more is a configuration error.
pub const MAX_WORKERS: usize = 1024;
/// A notifier poll that fails this many times in a row is not re-armed again.
const MAX_CONSECUTIVE_POLL_FAILURES: u8 = 16;
/// Pause after an unexpected `io_uring_enter` failure, so a persistent one cannot spin a CPU.
const ENTER_ERROR_BACKOFF: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum IoPoolError {
    #[error("an I/O pool needs 1..={MAX_WORKERS} workers, not {0}")]
    WorkerCount(usize),
    #[error("cannot create the control eventfd of I/O worker {worker}")]
    ControlEventFd {
        worker: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the io_uring of I/O worker {worker}")]
    Ring {
        worker: usize,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's io_uring lacks IORING_FEAT_NODROP (needs Linux 5.5 or later)")]
    NoDropUnsupported,
    #[error("cannot start I/O worker thread {worker}")]
    Spawn {
        worker: usize,
        #[source]
        source: io::Error,
    },
    #[error("I/O worker {0} has stopped")]
    WorkerGone(usize),
    #[error("I/O worker {0} serves the most queues it can address")]
    TooManyQueues(usize),
}

/// One queue served by the pool, e.g. a virtqueue of a virtio-blk device.
///
/// All methods run on the queue's worker thread, never concurrently.
pub trait QueueHandler: Send {
    /// The eventfd the guest's notifications (doorbell writes) signal. It must stay open while
    /// the handler exists; the pool switches it to non-blocking mode.
    fn notifier_fd(&self) -> RawFd;
    /// The queue may have new work: called once when the queue is added, after every
    /// notification, and again soon after a call that asked for it with
    /// [`IoSubmitter::run_again`].
    fn process_notification(&mut self, io: &mut IoSubmitter<'_>);
    /// The operation submitted for `request` through `io` completed with `result` (an io_uring
    /// result: non-negative on success, `-errno` on failure).
    fn complete(&mut self, request: u32, result: i32, io: &mut IoSubmitter<'_>);
    /// The worker finished a batch of events that touched this queue: a good moment to signal
    /// the guest once for everything completed in the batch.
    fn end_batch(&mut self);
    /// Appends the request ids that have an operation in the ring, so a removal can cancel them.
    fn in_flight_requests(&self, requests: &mut Vec<u32>);
}

/// Hands operations of one queue to its worker's ring.
pub struct IoSubmitter<'a> {
    backlog: &'a mut VecDeque<squeue::Entry>,
    slot: u32,
    generation: u16,
    ops_in_flight: &'a mut u32,
    run_again: bool,
}

impl IoSubmitter<'_> {
    /// The handler stopped with work left (it used up its budget, to be fair to the other
    /// queues of the worker): call `process_notification` again after the next batch, without
    /// waiting for a notification.
    pub fn run_again(&mut self) {
        self.run_again = true;
    }

    /// Queues `entry` for submission on behalf of `request`; its completion comes back through
    /// [`QueueHandler::complete`] with the same `request`.
    ///
    /// # Safety
    ///
    /// Every buffer, iovec array and timespec `entry` points to must stay valid until that
    /// completion has been delivered or the queue has been removed (removal waits for the
    /// completion and then drops the handler, so memory owned by the handler qualifies).
    /// Memory the kernel writes must not be accessed through Rust references meanwhile.
    pub(crate) unsafe fn push(&mut self, request: u32, entry: squeue::Entry) {
        let user_data = UserData::io(self.slot, self.generation, request).encode();
        self.backlog.push_back(entry.user_data(user_data));
        *self.ops_in_flight += 1;
    }
}

enum Control {
    Add {
        key: u64,
        handler: Box<dyn QueueHandler>,
    },
    Remove {
        key: u64,
        done: mpsc::Sender<()>,
    },
    Shutdown,
}

/// A queue added to the pool; give it back to [`IoPool::remove_queues`] to stop serving it.
#[derive(Debug)]
#[must_use = "a queue registration is needed to remove the queue"]
pub struct QueueRegistration {
    worker: usize,
    key: u64,
}

impl QueueRegistration {
    /// The worker thread serving the queue (index into the pool).
    pub fn worker(&self) -> usize {
        self.worker
    }
}

/// Worker state shared with the pool handle.
struct WorkerShared {
    inbox: Mutex<VecDeque<Control>>,
    doorbell: EventFd,
    /// False once the worker thread has stopped (normally or by panic): nobody drains the inbox.
    alive: AtomicBool,
    queues: AtomicUsize,
    /// Completions whose user data did not name a live queue (should stay zero).
    stale_completions: AtomicU64,
    /// `io_uring_enter` failures other than EINTR/EAGAIN/EBUSY.
    enter_errors: AtomicU64,
    /// Notifier polls that failed (each is re-armed, up to a limit of failures in a row).
    poll_errors: AtomicU64,
}

impl WorkerShared {
    fn inbox(&self) -> MutexGuard<'_, VecDeque<Control>> {
        // A panic while holding the lock leaves a valid VecDeque: keep going.
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct WorkerHandle {
    shared: Arc<WorkerShared>,
    thread: Option<JoinHandle<()>>,
}

/// Counters of one worker, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub queues: usize,
    pub stale_completions: u64,
    pub enter_errors: u64,
    pub poll_errors: u64,
}

/// A fixed set of I/O worker threads; see the module documentation.
pub struct IoPool {
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    next_key: AtomicU64,
}

impl IoPool {
    /// Starts `workers` threads, each with its own io_uring. The VMM passes the host CPU count
    /// by default.
    pub fn new(workers: usize) -> Result<Self, IoPoolError> {
        Self::build(workers, true)
    }

    /// A pool whose workers re-arm one-shot polls, as on kernels without multishot poll
    /// (before 5.13), so tests cover that path on any kernel.
    #[cfg(test)]
    pub(crate) fn with_one_shot_polls(workers: usize) -> Result<Self, IoPoolError> {
        Self::build(workers, false)
    }

    fn build(workers: usize, multishot: bool) -> Result<Self, IoPoolError> {
        if workers == 0 || workers > MAX_WORKERS {
            return Err(IoPoolError::WorkerCount(workers));
        }
        // Built incrementally: on error, dropping the partial pool stops the started workers.
        let mut pool = IoPool {
            workers: Vec::with_capacity(workers),
            next_worker: AtomicUsize::new(0),
            next_key: AtomicU64::new(0),
        };
        for index in 0..workers {
            pool.workers.push(spawn_worker(index, multishot)?);
        }
        Ok(pool)
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Starts serving a queue on the next worker (round robin). Returns at once; the worker
    /// checks the queue for work as soon as it picks the message up.
    pub fn add_queue(
        &self,
        handler: Box<dyn QueueHandler>,
    ) -> Result<QueueRegistration, IoPoolError> {
        let worker = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let shared = &self.workers[worker].shared;
        if shared.queues.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUE_SLOTS as usize {
            shared.queues.fetch_sub(1, Ordering::SeqCst);
            return Err(IoPoolError::TooManyQueues(worker));
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        if !self.send(worker, Control::Add { key, handler }) {
            shared.queues.fetch_sub(1, Ordering::SeqCst);
            return Err(IoPoolError::WorkerGone(worker));
        }
        Ok(QueueRegistration { worker, key })
    }

    /// Stops serving the queues and blocks until every one of them is quiesced: no operation
    /// of theirs is in the kernel, their handlers are dropped, and nothing of theirs will touch
    /// guest memory or signal an interrupt any more. In-flight requests are dropped unanswered.
    /// The removals run in parallel on their workers.
    pub fn remove_queues(&self, registrations: Vec<QueueRegistration>) {
        let waits: Vec<_> = registrations
            .into_iter()
            .map(|registration| {
                let (done, wait) = mpsc::channel();
                let key = registration.key;
                self.send(registration.worker, Control::Remove { key, done });
                wait
            })
            .collect();
        for wait in waits {
            // An error means the worker has stopped and dropped the message: its queues, ring
            // and pending operations are gone with it.
            let _ = wait.recv();
        }
    }

    /// Per-worker counters, in worker order.
    pub fn stats(&self) -> Vec<WorkerStats> {
        self.workers
            .iter()
            .map(|worker| WorkerStats {
                queues: worker.shared.queues.load(Ordering::SeqCst),
                stale_completions: worker.shared.stale_completions.load(Ordering::Relaxed),
                enter_errors: worker.shared.enter_errors.load(Ordering::Relaxed),
                poll_errors: worker.shared.poll_errors.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Delivers a control message: message first, doorbell second (see the module docs).
    /// Returns false if the worker has stopped (the message is then dropped).
    fn send(&self, worker: usize, message: Control) -> bool {
        let shared = &self.workers[worker].shared;
        shared.inbox().push_back(message);
        // The eventfd counter cannot overflow at one increment per message, so a write error
        // would mean a closed descriptor; the alive check below covers a stopped worker.
        let _ = shared.doorbell.write(1);
        if !shared.alive.load(Ordering::SeqCst) {
            // The worker's exit guard may have drained the inbox before our push: drop what
            // is left so that waiters see their senders disconnect instead of hanging.
            shared.inbox().clear();
            return false;
        }
        true
    }
}

impl Drop for IoPool {
    /// Graceful shutdown: every worker quiesces its queues (as in `remove_queues`), then exits.
    fn drop(&mut self) {
        for worker in 0..self.workers.len() {
            self.send(worker, Control::Shutdown);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                // A panicked worker has already reported itself on stderr.
                let _ = thread.join();
            }
        }
    }
}

fn spawn_worker(index: usize, multishot: bool) -> Result<WorkerHandle, IoPoolError> {
    let doorbell = EventFd::new(EFD_NONBLOCK).map_err(|source| IoPoolError::ControlEventFd {
        worker: index,
        source,
    })?;
    let shared = Arc::new(WorkerShared {
        inbox: Mutex::new(VecDeque::new()),
        doorbell,
        alive: AtomicBool::new(true),
        queues: AtomicUsize::new(0),
        stale_completions: AtomicU64::new(0),
        enter_errors: AtomicU64::new(0),
        poll_errors: AtomicU64::new(0),
    });
    let (ready, started) = mpsc::channel();
    let worker_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("blkswarm-io{index}"))
        .spawn(move || {
            let _exit = ExitGuard(worker_shared.clone());
            match Worker::new(index, worker_shared, multishot) {
                Ok(worker) => {
                    let _ = ready.send(Ok(()));
                    worker.run();
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            }
        })
        .map_err(|source| IoPoolError::Spawn {
            worker: index,
            source,
        })?;
    let mut handle = WorkerHandle {
        shared,
        thread: Some(thread),
    };
    match started.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(error)) => {
            if let Some(thread) = handle.thread.take() {
                let _ = thread.join();
            }
            Err(error)
        }
        Err(_) => Err(IoPoolError::WorkerGone(index)),
    }
}

/// Marks a worker stopped and drops undelivered messages (waking their waiters), also when the
/// worker thread unwinds from a panic.
struct ExitGuard(Arc<WorkerShared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.inbox().clear();
    }
}

/// A queue living on a worker.
struct QueueEntry {
    key: u64,
    handler: Box<dyn QueueHandler>,
    /// A poll on the notifier is in the ring (or in the backlog).
    notify_armed: bool,
    /// Backend operations submitted and not yet completed.
    ops_in_flight: u32,
    /// Set when removal started; holds the waiter to answer once quiesced.
    removal: Option<Option<mpsc::Sender<()>>>,
    /// Listed in the worker's `touched` for this batch.
    in_batch: bool,
    /// Listed in the worker's `runnable`.
    runnable: bool,
    /// Notifier polls that failed in a row.
    poll_failures: u8,
}

struct Slot {
    generation: u16,
    entry: Option<QueueEntry>,
}

struct Worker {
    ring: IoUring,
    shared: Arc<WorkerShared>,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    by_key: HashMap<u64, u32>,
    live_entries: usize,
    /// SQEs waiting for room in the submission ring, in order.
    backlog: VecDeque<squeue::Entry>,
    /// Slots that saw events in the current batch.
    touched: Vec<u32>,
    /// Slots whose handler asked to run again (it stopped at its budget).
    runnable: VecDeque<u32>,
    /// Multishot polls work on this kernel (assumed until one fails with EINVAL).
    multishot: bool,
    control_armed: bool,
    exiting: bool,
    scratch: Vec<u32>,
}

impl Worker {
    fn new(index: usize, shared: Arc<WorkerShared>, multishot: bool) -> Result<Self, IoPoolError> {
        let ring = IoUring::builder()
            .setup_cqsize(COMPLETION_ENTRIES)
            .setup_clamp()
            .build(SUBMISSION_ENTRIES)
            .map_err(|source| IoPoolError::Ring {
                worker: index,
                source,
            })?;
        if !ring.params().is_feature_nodrop() {
            return Err(IoPoolError::NoDropUnsupported);
        }
        Ok(Worker {
            ring,
            shared,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            live_entries: 0,
            backlog: VecDeque::new(),
            touched: Vec::new(),
            runnable: VecDeque::new(),
            multishot,
            control_armed: false,
            exiting: false,
            scratch: Vec::new(),
        })
    }

    fn run(mut self) {
        self.arm_control();
        let mut completions: Vec<cqueue::Entry> = Vec::new();
        loop {
            if self.exiting && self.live_entries == 0 {
                break;
            }
            let backlogged = self.flush_backlog();
            // With SQEs still waiting for ring space or queues waiting to run, only submit;
            // otherwise sleep until at least one completion (already-posted ones return at
            // once).
            let entered = if backlogged || !self.runnable.is_empty() {
                self.ring.submit()
            } else {
                self.ring.submit_and_wait(1)
            };
            if let Err(error) = entered {
                match error.raw_os_error() {
                    // EBUSY: completions are backed up; reaping below makes room.
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        self.shared.enter_errors.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(ENTER_ERROR_BACKOFF);
                    }
                }
            }
            completions.clear();
            completions.extend(self.ring.completion());
            for completion in &completions {
                self.dispatch(completion);
            }
            // Only the queues listed before this point: one pass each per iteration.
            for _ in 0..self.runnable.len() {
                let Some(slot) = self.runnable.pop_front() else {
                    break;
                };
                if let Some(entry) = self.slots[slot as usize].entry.as_mut() {
                    entry.runnable = false;
                }
                self.process_queue(slot);
            }
            self.end_batch();
        }
    }

    /// Moves backlogged SQEs into the submission ring; true if some did not fit.
    fn flush_backlog(&mut self) -> bool {
        let mut submission = self.ring.submission();
        while let Some(entry) = self.backlog.front() {
            // SAFETY: every backlogged entry was queued either by `IoSubmitter::push`, whose
            // contract keeps its buffers valid until the completion, or by this worker for
            // polls and cancels, which reference no memory.
            if unsafe { submission.push(entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
        }
        !self.backlog.is_empty()
    }

    fn poll_entry(&self, fd: RawFd, user_data: UserData) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(self.multishot)
            .build()
            .user_data(user_data.encode())
    }

    fn arm_control(&mut self) {
        let entry = self.poll_entry(self.shared.doorbell.as_raw_fd(), UserData::control());
        self.backlog.push_back(entry);
        self.control_armed = true;
    }

    fn dispatch(&mut self, completion: &cqueue::Entry) {
        let Some(data) = UserData::decode(completion.user_data()) else {
            self.shared
                .stale_completions
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let result = completion.result();
        let more = cqueue::more(completion.flags());
        match data.kind {
            OpKind::Control => self.on_control(result, more),
            OpKind::Notify => self.on_notify(data, result, more),
            OpKind::Io => self.on_io(data, result),
            OpKind::Cancel => {}
        }
    }

    fn on_control(&mut self, result: i32, more: bool) {
        if !more {
            self.control_armed = false;
        }
        if result == -libc::EINVAL && self.multishot {
            self.multishot = false;
        }
        if !self.control_armed {
            if !self.multishot {
                // A one-shot poll on a still-readable eventfd would fire at once forever.
                let _ = self.shared.doorbell.read();
            }
            self.arm_control();
        }
        self.drain_inbox();
    }

    fn drain_inbox(&mut self) {
        loop {
            // Take one message at a time: the lock is never held while handling it.
            let message = self.shared.inbox().pop_front();
            match message {
                None => break,
                Some(Control::Add { key, handler }) => self.add_queue(key, handler),
                Some(Control::Remove { key, done }) => self.begin_removal(key, Some(done)),
                Some(Control::Shutdown) => {
                    self.exiting = true;
                    let keys: Vec<u64> = self.by_key.keys().copied().collect();
                    for key in keys {
                        self.begin_removal(key, None);
                    }
                }
            }
        }
    }

    fn add_queue(&mut self, key: u64, handler: Box<dyn QueueHandler>) {
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                // The pool's per-worker count keeps this below MAX_QUEUE_SLOTS.
                let slot = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                if slot >= MAX_QUEUE_SLOTS {
                    self.shared.queues.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                slot
            }
        };
        let fd = handler.notifier_fd();
        set_nonblocking(fd);
        let index = slot as usize;
        let generation = self.slots[index].generation;
        // Arm the notifier before the first look at the queue: a kick that lands after that
        // look then completes the poll (see the module docs).
        let poll = self.poll_entry(fd, UserData::notify(slot, generation));
        self.backlog.push_back(poll);
        self.slots[index].entry = Some(QueueEntry {
            key,
            handler,
            notify_armed: true,
            ops_in_flight: 0,
            removal: None,
            in_batch: false,
            runnable: false,
            poll_failures: 0,
        });
        self.by_key.insert(key, slot);
        self.live_entries += 1;
        self.process_queue(slot);
    }

    /// Lets the handler of a live, not-removing queue look for work.
    fn process_queue(&mut self, slot: u32) {
        let Slot { generation, entry } = &mut self.slots[slot as usize];
        let Some(entry) = entry.as_mut().filter(|entry| entry.removal.is_none()) else {
            return;
        };
        if !entry.in_batch {
            entry.in_batch = true;
            self.touched.push(slot);
        }
        let mut io = IoSubmitter {
            backlog: &mut self.backlog,
            slot,
            generation: *generation,
            ops_in_flight: &mut entry.ops_in_flight,
            run_again: false,
        };
        entry.handler.process_notification(&mut io);
        if io.run_again && !entry.runnable {
            entry.runnable = true;
            self.runnable.push_back(slot);
        }
    }

    /// The live entry in `slot` if `generation` is still current.
    fn entry_mut(&mut self, slot: u32, generation: u16) -> Option<&mut QueueEntry> {
        let found = self
            .slots
            .get_mut(slot as usize)
            .filter(|found| found.generation == generation)
            .and_then(|found| found.entry.as_mut());
        if found.is_none() {
            self.shared
                .stale_completions
                .fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn on_notify(&mut self, data: UserData, result: i32, more: bool) {
        let multishot = self.multishot;
        let Some(entry) = self.entry_mut(data.slot, data.generation) else {
            return;
        };
        if !more {
            entry.notify_armed = false;
        }
        if entry.removal.is_some() {
            self.finish_removal_if_quiet(data.slot);
            return;
        }
        let fd = entry.handler.notifier_fd();
        let rearm = !entry.notify_armed;
        if result == -libc::EINVAL && multishot {
            self.multishot = false;
        } else if result < 0 {
            // The poll failed (e.g. -ECANCELED or -ENOMEM from the kernel). A queue without a
            // poll never hears the guest again and its requests hang, so re-arm; only a poll
            // that keeps failing (a closed eventfd) is given up, so as not to spin.
            entry.poll_failures = entry.poll_failures.saturating_add(1);
            let give_up = entry.poll_failures > MAX_CONSECUTIVE_POLL_FAILURES;
            self.shared.poll_errors.fetch_add(1, Ordering::Relaxed);
            if give_up {
                self.process_queue(data.slot);
                return;
            }
        } else {
            entry.poll_failures = 0;
        }
        if rearm {
            if !self.multishot {
                // Clear the counter before re-arming a one-shot poll; a kick after this read
                // leaves the eventfd readable, so the new poll completes at once.
                clear_eventfd(fd);
            }
            let poll = self.poll_entry(fd, UserData::notify(data.slot, data.generation));
            self.backlog.push_back(poll);
            if let Some(entry) = self.entry_mut(data.slot, data.generation) {
                entry.notify_armed = true;
            }
        }
        // Also after a failed poll: a kick may have been lost with it.
        self.process_queue(data.slot);
    }

    fn on_io(&mut self, data: UserData, result: i32) {
        let Slot { generation, entry } = match self.slots.get_mut(data.slot as usize) {
            Some(slot) if slot.generation == data.generation && slot.entry.is_some() => slot,
            _ => {
                self.shared
                    .stale_completions
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(entry) = entry.as_mut() else {
            return;
        };
        entry.ops_in_flight = entry.ops_in_flight.saturating_sub(1);
        if entry.removal.is_some() {
            self.finish_removal_if_quiet(data.slot);
            return;
        }
        if !entry.in_batch {
            entry.in_batch = true;
            self.touched.push(data.slot);
        }
        let mut io = IoSubmitter {
            backlog: &mut self.backlog,
            slot: data.slot,
            generation: *generation,
            ops_in_flight: &mut entry.ops_in_flight,
            run_again: false,
        };
        entry.handler.complete(data.request, result, &mut io);
        if io.run_again && !entry.runnable {
            entry.runnable = true;
            self.runnable.push_back(data.slot);
        }
    }

    fn begin_removal(&mut self, key: u64, done: Option<mpsc::Sender<()>>) {
        let Some(slot) = self.by_key.remove(&key) else {
            // Unknown or already removed: nothing to wait for (dropping `done` answers).
            return;
        };
        let Slot { generation, entry } = &mut self.slots[slot as usize];
        let generation = *generation;
        let Some(entry) = entry.as_mut() else {
            return;
        };
        entry.removal = Some(done);
        self.scratch.clear();
        entry.handler.in_flight_requests(&mut self.scratch);
        let cancel_data = UserData::cancel(slot, generation).encode();
        for &request in &self.scratch {
            let target = UserData::io(slot, generation, request).encode();
            self.backlog.push_back(
                opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(cancel_data),
            );
        }
        if entry.notify_armed {
            let target = UserData::notify(slot, generation).encode();
            self.backlog.push_back(
                opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(cancel_data),
            );
        }
        self.finish_removal_if_quiet(slot);
    }

    /// Drops a removing queue once the kernel holds nothing of it, then answers the waiter.
    fn finish_removal_if_quiet(&mut self, slot: u32) {
        let found = &mut self.slots[slot as usize];
        let quiet = found.entry.as_ref().is_some_and(|entry| {
            entry.removal.is_some() && entry.ops_in_flight == 0 && !entry.notify_armed
        });
        if !quiet {
            return;
        }
        let Some(entry) = found.entry.take() else {
            return;
        };
        found.generation = found.generation.wrapping_add(1);
        self.free_slots.push(slot);
        self.live_entries -= 1;
        self.shared.queues.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(!self.by_key.contains_key(&entry.key));
        let QueueEntry {
            handler, removal, ..
        } = entry;
        // The handler owns the request buffers and the guest memory mapping: drop it before
        // telling the caller the queue is gone.
        drop(handler);
        if let Some(Some(done)) = removal {
            let _ = done.send(());
        }
    }

    fn end_batch(&mut self) {
        for slot in self.touched.drain(..) {
            if let Some(entry) = self.slots[slot as usize].entry.as_mut() {
                let was_listed = std::mem::replace(&mut entry.in_batch, false);
                if was_listed && entry.removal.is_none() {
                    entry.handler.end_batch();
                }
            }
        }
    }
}

/// Makes `fd` non-blocking, so that clearing an eventfd can never block the worker.
fn set_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL/F_SETFL only read and write the file status flags of `fd`, which the
    // handler keeps open; an invalid fd makes them fail harmlessly.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Resets an eventfd's counter (non-blocking; a zero counter leaves it untouched).
fn clear_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reads at most 8 bytes into a local u64; `fd` is a non-blocking eventfd the
    // handler keeps open.
    unsafe {
        libc::read(fd, std::ptr::addr_of_mut!(value).cast(), 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler that counts what it is told and submits NOPs on demand.
    struct CountingHandler {
        notifier: Arc<EventFd>,
        notifications: Arc<AtomicU64>,
        completions: Arc<AtomicU64>,
        nops_per_notification: u32,
        next_request: u32,
    }

    impl QueueHandler for CountingHandler {
        fn notifier_fd(&self) -> RawFd {
            self.notifier.as_raw_fd()
        }
        fn process_notification(&mut self, io: &mut IoSubmitter<'_>) {
            self.notifications.fetch_add(1, Ordering::SeqCst);
            for _ in 0..self.nops_per_notification {
                // SAFETY: a NOP references no memory.
                unsafe { io.push(self.next_request, opcode::Nop::new().build()) };
                self.next_request = (self.next_request + 1) % 1024;
            }
        }
        fn complete(&mut self, _request: u32, result: i32, _io: &mut IoSubmitter<'_>) {
            assert_eq!(result, 0);
            self.completions.fetch_add(1, Ordering::SeqCst);
        }
        fn end_batch(&mut self) {}
        fn in_flight_requests(&self, _requests: &mut Vec<u32>) {}
    }

    fn wait_for(what: &str, condition: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn rejects_bad_worker_counts() {
        assert!(matches!(IoPool::new(0), Err(IoPoolError::WorkerCount(0))));
        assert!(IoPool::new(MAX_WORKERS + 1).is_err());
    }

    #[test]
    fn notifications_and_completions_reach_the_handler() {
        notifications_and_completions(IoPool::new(2).unwrap());
    }

    #[test]
    fn notifications_and_completions_with_one_shot_polls() {
        notifications_and_completions(IoPool::with_one_shot_polls(2).unwrap());
    }

    fn notifications_and_completions(pool: IoPool) {
        let notifier = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let notifications = Arc::new(AtomicU64::new(0));
        let completions = Arc::new(AtomicU64::new(0));
        let registration = pool
            .add_queue(Box::new(CountingHandler {
                notifier: notifier.clone(),
                notifications: notifications.clone(),
                completions: completions.clone(),
                nops_per_notification: 3,
                next_request: 0,
            }))
            .unwrap();
        // The initial look at the queue counts as one notification.
        wait_for("initial processing", || {
            notifications.load(Ordering::SeqCst) == 1
        });
        for expected in 2..=20 {
            notifier.write(1).unwrap();
            wait_for("kick", || notifications.load(Ordering::SeqCst) >= expected);
        }
        wait_for("completions", || {
            completions.load(Ordering::SeqCst) == 3 * notifications.load(Ordering::SeqCst)
        });
        assert_eq!(pool.stats()[registration.worker()].queues, 1);
        pool.remove_queues(vec![registration]);
        assert!(pool.stats().iter().all(|stats| stats.queues == 0));
        // Kicks after removal reach nobody.
        let before = notifications.load(Ordering::SeqCst);
        notifier.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(notifications.load(Ordering::SeqCst), before);
        assert!(pool
            .stats()
            .iter()
            .all(|stats| stats.stale_completions == 0));
    }

    /// A queue whose notifier is not a valid descriptor: every poll on it fails.
    struct BrokenNotifierHandler {
        notifications: Arc<AtomicU64>,
    }

    impl QueueHandler for BrokenNotifierHandler {
        fn notifier_fd(&self) -> RawFd {
            -1
        }
        fn process_notification(&mut self, _io: &mut IoSubmitter<'_>) {
            self.notifications.fetch_add(1, Ordering::SeqCst);
        }
        fn complete(&mut self, _request: u32, _result: i32, _io: &mut IoSubmitter<'_>) {}
        fn end_batch(&mut self) {}
        fn in_flight_requests(&self, _requests: &mut Vec<u32>) {}
    }

    #[test]
    fn failed_polls_are_re_armed_a_bounded_number_of_times() {
        for pool in [
            IoPool::new(1).unwrap(),
            IoPool::with_one_shot_polls(1).unwrap(),
        ] {
            let notifications = Arc::new(AtomicU64::new(0));
            let registration = pool
                .add_queue(Box::new(BrokenNotifierHandler {
                    notifications: notifications.clone(),
                }))
                .unwrap();
            let limit = u64::from(MAX_CONSECUTIVE_POLL_FAILURES) + 1;
            wait_for("the last failed poll", || {
                pool.stats()[0].poll_errors == limit
            });
            // Every failure also looked at the queue, in case a kick was lost with the poll.
            wait_for("a pass per failure", || {
                notifications.load(Ordering::SeqCst) == 1 + limit
            });
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(pool.stats()[0].poll_errors, limit, "given up, not spinning");
            pool.remove_queues(vec![registration]);
            assert_eq!(pool.stats()[0].queues, 0);
        }
    }

    #[test]
    fn queues_are_spread_round_robin_and_shutdown_is_clean() {
        let pool = IoPool::new(3).unwrap();
        let mut registrations = Vec::new();
        for _ in 0..7 {
            registrations.push(
                pool.add_queue(Box::new(CountingHandler {
                    notifier: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    notifications: Arc::default(),
                    completions: Arc::default(),
                    nops_per_notification: 0,
                    next_request: 0,
                }))
                .unwrap(),
            );
        }
        let workers: Vec<usize> = registrations.iter().map(|r| r.worker()).collect();
        assert_eq!(workers, [0, 1, 2, 0, 1, 2, 0]);
        // Dropping the pool with live queues quiesces them and joins every worker.
        drop(registrations);
        drop(pool);
    }
}
