//! I/O queues served by the I/O worker pool.
//!
//! Each I/O SQ is a [`QueueHandler`] on one pool worker: the vCPU thread's tail doorbell
//! stores the tail in [`IoSubmissionQueueShared`] and writes the SQ's notifier eventfd, which
//! the worker polls. The handler fetches commands, hands them to the namespace's backend, and
//! posts completions into the SQ's [`IoCompletionQueue`], which several SQs (on different
//! workers) and the controller (head doorbell, deletion) share behind a short mutex.
//!
//! A CQ never overflows: a handler fetches a command only after reserving a CQ entry for its
//! completion (entries posted + reserved stay below the queue's capacity). When none is free
//! the handler registers its notifier with the CQ and stops; the next head doorbell that
//! frees entries wakes every registered SQ. Registration and the doorbell's look at the
//! waiters happen under the same lock, so no wake-up is lost.
//!
//! With shadow doorbells ([`super::shadow`]) the SQ handler reads its tail from the shadow
//! buffer and the CQ reads its head there when it runs out of room; the MMIO doorbells, rung
//! only when the host passes an EventIdx, just wake them.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::nvm::{self, IoContext, Operation, Prepared};
use super::prp::Segment;
use super::queue::{Completion, CompletionQueue, InvalidDoorbellValue, SubmissionEntry};
use super::shadow::ShadowDoorbell;
use super::{Status, SUBMISSION_ENTRY_BYTES};
use crate::io::{IoSubmitter, QueueHandler, Submitted};
use crate::latency::{LatencyRecorder, Op, QueueLatency, RequestTimes};

/// Commands one SQ fetches per pass before yielding to the worker's other queues.
const MAX_COMMANDS_PER_PASS: u32 = 256;

struct CompletionQueueState {
    ring: CompletionQueue,
    /// Entries promised to fetched commands whose completion is not posted yet.
    reserved: u32,
    /// Notifiers of SQs that found no free entry; woken by the next head doorbell.
    waiters: Vec<Arc<EventFd>>,
    /// SQs bound to this CQ: deletion is refused while any remain.
    bound_submission_queues: usize,
    /// The head's shadow slot, once the host configured doorbell buffers.
    shadow: Option<ShadowDoorbell>,
}

impl CompletionQueueState {
    fn has_room(&self) -> bool {
        self.ring.room() > self.reserved
    }

    /// Takes the head the host stored in the shadow buffer. An invalid value is counted and
    /// ignored: the host may still store a good one.
    fn refresh_head_from_shadow(&mut self, shadow: ShadowDoorbell, context: &IoContext) {
        match shadow.read(&context.memory) {
            Ok(head) => {
                let accepted = u16::try_from(head)
                    .ok()
                    .is_some_and(|head| self.ring.set_head(head).is_ok());
                if !accepted {
                    context
                        .invalid_shadow_doorbell_values
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => context.fatal.store(true, Ordering::SeqCst),
        }
    }

    /// Wakes every SQ that stopped for lack of room.
    fn wake_waiters(&mut self) {
        for waiter in self.waiters.drain(..) {
            // The counter cannot overflow at one increment per doorbell.
            let _ = waiter.write(1);
        }
    }
}

/// An I/O completion queue, shared by the controller and the SQ handlers posting into it.
pub struct IoCompletionQueue {
    id: u16,
    vector: u16,
    interrupts_enabled: bool,
    state: Mutex<CompletionQueueState>,
}

impl IoCompletionQueue {
    pub fn new(ring: CompletionQueue) -> Self {
        IoCompletionQueue {
            id: ring.id(),
            vector: ring.interrupt_vector().unwrap_or(0),
            interrupts_enabled: ring.interrupt_vector().is_some(),
            state: Mutex::new(CompletionQueueState {
                ring,
                reserved: 0,
                waiters: Vec::new(),
                bound_submission_queues: 0,
                shadow: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, CompletionQueueState> {
        // Every update leaves the state consistent: a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn interrupt_vector(&self) -> Option<u16> {
        self.interrupts_enabled.then_some(self.vector)
    }

    pub fn bound_submission_queues(&self) -> usize {
        self.state().bound_submission_queues
    }

    pub fn bind_submission_queue(&self) {
        self.state().bound_submission_queues += 1;
    }

    pub fn unbind_submission_queue(&self) {
        let mut state = self.state();
        state.bound_submission_queues = state.bound_submission_queues.saturating_sub(1);
    }

    /// A head doorbell write. On success, writes the notifiers of SQs waiting for room.
    ///
    /// With a shadow slot the head comes from the shadow buffer, which is at least as new as
    /// the MMIO value: a late MMIO write from another vCPU must not move the head back.
    pub fn head_doorbell(
        &self,
        head: u16,
        context: &IoContext,
    ) -> Result<(), InvalidDoorbellValue> {
        let mut state = self.state();
        match state.shadow {
            Some(shadow) => {
                if u32::from(head) >= state.ring.size() {
                    return Err(InvalidDoorbellValue);
                }
                state.refresh_head_from_shadow(shadow, context);
            }
            None => state.ring.set_head(head)?,
        }
        state.wake_waiters();
        Ok(())
    }

    /// Doorbell Buffer Config: the head lives in `shadow` from now on. An SQ already waiting
    /// for room needs the host to ring at its next head update.
    pub fn attach_shadow(&self, shadow: ShadowDoorbell, context: &IoContext) {
        let mut state = self.state();
        state.shadow = Some(shadow);
        if !state.waiters.is_empty() {
            let head = state.ring.head();
            if shadow.publish_event_index(&context.memory, head).is_err() {
                context.fatal.store(true, Ordering::SeqCst);
            }
            state.refresh_head_from_shadow(shadow, context);
            state.wake_waiters();
        }
    }

    /// Reserves an entry for one completion, or registers `waiter` to be woken when the
    /// host frees entries.
    fn reserve(&self, waiter: &Arc<EventFd>, context: &IoContext) -> bool {
        let mut state = self.state();
        let mut room = state.has_room();
        if !room {
            if let Some(shadow) = state.shadow {
                // The host may have consumed entries without ringing.
                state.refresh_head_from_shadow(shadow, context);
                room = state.has_room();
            }
        }
        if !room {
            if !state.waiters.iter().any(|known| Arc::ptr_eq(known, waiter)) {
                state.waiters.push(waiter.clone());
            }
            let Some(shadow) = state.shadow else {
                return false;
            };
            // Ask for a ring at the next head update, then look once more: a head stored
            // before the host could see the new EventIdx did not ring.
            let head = state.ring.head();
            if shadow.publish_event_index(&context.memory, head).is_err() {
                context.fatal.store(true, Ordering::SeqCst);
                return false;
            }
            state.refresh_head_from_shadow(shadow, context);
            if !state.has_room() {
                return false;
            }
            // Registered but no longer waiting: the next head doorbell wakes us for nothing.
        }
        state.reserved += 1;
        true
    }

    /// Gives back reservations of commands that will never complete (their SQ was removed).
    fn release(&self, count: u32) {
        let mut state = self.state();
        state.reserved = state.reserved.saturating_sub(count);
    }

    /// Posts a completion into an entry reserved for it. Err: guest memory failed.
    fn post_reserved(&self, context: &IoContext, completion: Completion) -> Result<(), ()> {
        let mut state = self.state();
        state.reserved = state.reserved.saturating_sub(1);
        // The reservation guarantees room, so `post` writes at once rather than holding.
        state
            .ring
            .post(&context.memory, completion)
            .map(drop)
            .map_err(drop)
    }
}

/// Counters of one I/O SQ.
#[derive(Debug, Default)]
pub struct SubmissionQueueCounters {
    pub commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Commands completed with a status other than success.
    pub errors: AtomicU64,
    /// Passes that stopped because the CQ had no free entry.
    pub completion_queue_full: AtomicU64,
    /// MMIO tail doorbell writes (with shadow doorbells, far fewer than commands).
    pub doorbell_writes: AtomicU64,
}

/// An I/O SQ's per-queue numbers, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoQueueStats {
    pub sq_id: u16,
    pub cq_id: u16,
    /// The CQ's MSI-X vector, `None` with interrupts disabled.
    pub vector: Option<u16>,
    /// The pool worker serving the queue.
    pub worker: usize,
    pub commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub completion_queue_full: u64,
    pub doorbell_writes: u64,
}

impl IoQueueStats {
    /// Adds the counts of a later queue with the same id; its placement replaces ours.
    pub fn add(&mut self, later: &IoQueueStats) {
        self.cq_id = later.cq_id;
        self.vector = later.vector;
        self.worker = later.worker;
        self.commands += later.commands;
        self.bytes_read += later.bytes_read;
        self.bytes_written += later.bytes_written;
        self.errors += later.errors;
        self.completion_queue_full += later.completion_queue_full;
        self.doorbell_writes += later.doorbell_writes;
    }
}

/// What the controller (vCPU thread) and an SQ's handler (worker) share.
pub struct IoSubmissionQueueShared {
    pub id: u16,
    pub size: u32,
    /// Last tail doorbell value, always below `size`.
    pub tail: AtomicU32,
    /// Written by the tail doorbell and by CQ head doorbells that free room.
    pub notifier: Arc<EventFd>,
    pub counters: SubmissionQueueCounters,
    /// The tail's shadow slot, once the host configured doorbell buffers.
    shadow: Mutex<Option<ShadowDoorbell>>,
    /// Timing and counts of this SQ id, kept across deletions and resets.
    pub latency: Arc<QueueLatency>,
    /// When the last MMIO tail doorbell was written ([`crate::latency::now_ns`]), until the
    /// handler's next pass takes it as the time its commands were notified; 0: none since.
    doorbell_at: AtomicU64,
}

impl IoSubmissionQueueShared {
    pub fn new(id: u16, size: u32, notifier: Arc<EventFd>, latency: Arc<QueueLatency>) -> Self {
        IoSubmissionQueueShared {
            id,
            size,
            tail: AtomicU32::new(0),
            notifier,
            counters: SubmissionQueueCounters::default(),
            shadow: Mutex::new(None),
            latency,
            doorbell_at: AtomicU64::new(0),
        }
    }

    fn shadow(&self) -> Option<ShadowDoorbell> {
        *self.shadow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Doorbell Buffer Config: the tail lives in `shadow` from now on. Wakes the handler, which
    /// reads it and publishes its EventIdx before it next goes idle.
    pub fn attach_shadow(&self, shadow: ShadowDoorbell) {
        *self.shadow.lock().unwrap_or_else(PoisonError::into_inner) = Some(shadow);
        let _ = self.notifier.write(1);
    }

    /// A tail doorbell write: stores the tail and wakes the handler (which reads the tail
    /// from the shadow slot instead, if there is one).
    pub fn ring(&self, tail: u32) -> Result<(), InvalidDoorbellValue> {
        if tail >= self.size {
            return Err(InvalidDoorbellValue);
        }
        self.counters
            .doorbell_writes
            .fetch_add(1, Ordering::Relaxed);
        self.latency.count_notification();
        if self.latency.timing() {
            // The first doorbell since the handler last looked is when it was told.
            let _ = self.doorbell_at.compare_exchange(
                0,
                crate::latency::now_ns(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        // Release: the handler that sees this tail also sees the entries the guest wrote
        // before ringing (the MMIO exit orders them before this store).
        self.tail.store(tail, Ordering::Release);
        let _ = self.notifier.write(1);
        Ok(())
    }

    pub fn stats(&self, cq: &IoCompletionQueue, worker: usize) -> IoQueueStats {
        let counters = &self.counters;
        IoQueueStats {
            sq_id: self.id,
            cq_id: cq.id(),
            vector: cq.interrupt_vector(),
            worker,
            commands: counters.commands.load(Ordering::Relaxed),
            bytes_read: counters.bytes_read.load(Ordering::Relaxed),
            bytes_written: counters.bytes_written.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            completion_queue_full: counters.completion_queue_full.load(Ordering::Relaxed),
            doorbell_writes: counters.doorbell_writes.load(Ordering::Relaxed),
        }
    }
}

/// The direction the per-direction latency numbers file an I/O command under.
fn op_of(opcode: u8) -> Op {
    match opcode {
        nvm::OPC_READ => Op::Read,
        nvm::OPC_WRITE => Op::Write,
        _ => Op::Other,
    }
}

/// A fetched command with backend work outstanding. Slots are reused, never freed.
#[derive(Default)]
struct Request {
    busy: bool,
    command_id: u16,
    operation: Operation,
    times: RequestTimes,
}

/// One I/O SQ as served by a pool worker.
pub struct IoSubmissionQueueHandler {
    shared: Arc<IoSubmissionQueueShared>,
    cq: Arc<IoCompletionQueue>,
    context: Arc<IoContext>,
    base: GuestAddress,
    head: u32,
    /// Grows up to the CQ's capacity: in-flight commands hold CQ reservations.
    requests: Vec<Request>,
    free: Vec<u32>,
    segments: Vec<Segment>,
    /// Completions posted since the last interrupt decision.
    posted: bool,
    latency: LatencyRecorder,
    /// When the current pass over the SQ began: the commands it fetches were notified then.
    pass_started: u64,
}

impl IoSubmissionQueueHandler {
    pub fn new(
        shared: Arc<IoSubmissionQueueShared>,
        base: GuestAddress,
        cq: Arc<IoCompletionQueue>,
        context: Arc<IoContext>,
    ) -> Self {
        let latency = LatencyRecorder::new(shared.latency.clone());
        IoSubmissionQueueHandler {
            shared,
            cq,
            context,
            base,
            head: 0,
            requests: Vec::new(),
            free: Vec::new(),
            segments: Vec::new(),
            posted: false,
            latency,
            pass_started: 0,
        }
    }

    fn fetch(&mut self) -> Result<SubmissionEntry, ()> {
        let mut bytes = [0u8; 64];
        // Inside the queue, which creation checked to lie in guest memory.
        let address = GuestAddress(self.base.0 + u64::from(self.head) * SUBMISSION_ENTRY_BYTES);
        self.context
            .memory
            .read_slice(&mut bytes, address)
            .map_err(drop)?;
        self.head = if self.head + 1 == self.shared.size {
            0
        } else {
            self.head + 1
        };
        Ok(SubmissionEntry::from_bytes(&bytes))
    }

    /// The host's tail: the last doorbell value, or the shadow slot's. An invalid shadow
    /// value is counted and read as "nothing new" until the host stores a good one.
    fn tail(&self, shadow: Option<ShadowDoorbell>) -> u32 {
        let Some(shadow) = shadow else {
            return self.shared.tail.load(Ordering::Acquire);
        };
        match shadow.read(&self.context.memory) {
            Ok(tail) if tail < self.shared.size => tail,
            Ok(_) => {
                self.context
                    .invalid_shadow_doorbell_values
                    .fetch_add(1, Ordering::Relaxed);
                self.head
            }
            Err(_) => {
                self.context.fatal.store(true, Ordering::SeqCst);
                self.head
            }
        }
    }

    fn drain(&mut self, io: &mut IoSubmitter<'_>) {
        if self.context.halted.load(Ordering::SeqCst) {
            // A failed controller: the host sees its commands time out and resets it.
            return;
        }
        let shadow = self.shared.shadow();
        let mut budget = MAX_COMMANDS_PER_PASS;
        // Commands rung in by an MMIO doorbell were notified when it was written (the wake-up
        // of this worker is part of their latency); others when this pass began.
        let doorbell = self.shared.doorbell_at.swap(0, Ordering::Relaxed);
        let now = self.latency.stamp();
        self.pass_started = if doorbell != 0 {
            doorbell.min(now)
        } else {
            now
        };
        loop {
            if self.head == self.tail(shadow) {
                let Some(shadow) = shadow else {
                    return;
                };
                // Going idle: ask for a ring at the next submission, then look once more,
                // since a tail stored before the host could see the new EventIdx did not ring.
                if shadow
                    .publish_event_index(&self.context.memory, self.head)
                    .is_err()
                {
                    self.context.fatal.store(true, Ordering::SeqCst);
                    return;
                }
                if self.head == self.tail(Some(shadow)) {
                    return;
                }
            }
            if budget == 0 {
                io.run_again();
                return;
            }
            if !self.cq.reserve(&self.shared.notifier, &self.context) {
                self.shared
                    .counters
                    .completion_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            budget -= 1;
            let Ok(command) = self.fetch() else {
                // The queue lay in guest memory when created; losing it is fatal.
                self.cq.release(1);
                self.context.fatal.store(true, Ordering::SeqCst);
                return;
            };
            self.start(&command, io);
        }
    }

    fn start(&mut self, command: &SubmissionEntry, io: &mut IoSubmitter<'_>) {
        self.shared
            .counters
            .commands
            .fetch_add(1, Ordering::Relaxed);
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.requests.push(Request::default());
                // Bounded by the CQ size (at most 65535 reservations).
                (self.requests.len() - 1) as u32
            }
        };
        self.latency.fetched();
        let request = &mut self.requests[index as usize];
        request.command_id = command.command_id();
        request.times = RequestTimes {
            op: op_of(command.opcode()),
            notified: self.pass_started,
            ..RequestTimes::default()
        };
        let prepared = nvm::prepare(
            &self.context,
            command,
            &mut request.operation,
            &mut self.segments,
        );
        request.times.parsed = self.latency.stamp();
        match prepared {
            Ok(Prepared::Backend) => self.submit(index, io),
            Ok(Prepared::Complete) => {
                request.times.answered_at_parse();
                self.finish(index, Status::SUCCESS)
            }
            Err(status) => {
                request.times.answered_at_parse();
                self.finish(index, status)
            }
        }
    }

    /// Submits the request's current step and follows its steps while they finish at once.
    fn submit(&mut self, index: u32, io: &mut IoSubmitter<'_>) {
        loop {
            let request = &mut self.requests[index as usize];
            let backend = &self.context.namespaces[request.operation.namespace].backend;
            // SAFETY: `request.operation.io` stays in `self.requests`, untouched, while the
            // request is busy (until the backend reports it done); its buffers are guest
            // memory that `self.context` keeps mapped as long as this handler lives, and the
            // pool drops the handler only after the queue's last completion.
            let submitted = unsafe { backend.submit(index, &mut request.operation.io, io) };
            // Multi-step commands (deallocate ranges, write + flush) keep their first step's
            // submission time: the backend phase covers every step.
            if request.times.submitted == 0 {
                request.times.submitted = self.latency.stamp();
            }
            if !self.step_done(index, submitted) {
                return;
            }
        }
    }

    /// Handles a step's outcome; true when another step is ready to submit.
    fn step_done(&mut self, index: u32, submitted: Submitted) -> bool {
        let request = &mut self.requests[index as usize];
        match submitted {
            Submitted::Pending => {
                request.busy = true;
                self.latency.backend_started(index, &request.times);
                false
            }
            Submitted::Done(Ok(_)) if request.operation.next_step() => true,
            Submitted::Done(Ok(_)) => {
                let counters = &self.shared.counters;
                counters
                    .bytes_read
                    .fetch_add(request.operation.bytes_read, Ordering::Relaxed);
                counters
                    .bytes_written
                    .fetch_add(request.operation.bytes_written, Ordering::Relaxed);
                self.finish(index, Status::SUCCESS);
                false
            }
            Submitted::Done(Err(error)) => {
                let status = nvm::backend_error_status(request.operation.io.kind(), &error);
                self.finish(index, status);
                false
            }
        }
    }

    /// Posts the request's completion into its reserved CQ entry and frees the slot.
    fn finish(&mut self, index: u32, status: Status) {
        let stamp = self.latency.stamp();
        self.latency.backend_finished(index);
        let request = &mut self.requests[index as usize];
        request.busy = false;
        if request.times.completed == 0 {
            request.times.completed = stamp;
        }
        let times = request.times;
        if !status.is_success() {
            self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        let completion = Completion {
            result: 0,
            sq_head: self.head as u16,
            sq_id: self.shared.id,
            command_id: request.command_id,
            status,
        };
        self.free.push(index);
        if self.cq.post_reserved(&self.context, completion).is_err() {
            self.context.fatal.store(true, Ordering::SeqCst);
            self.latency.abandoned();
        } else {
            self.posted = true;
            if status.is_success() {
                self.latency.published(times);
            } else {
                self.latency.published_error(times);
            }
        }
    }
}

impl QueueHandler for IoSubmissionQueueHandler {
    fn notifier_fd(&self) -> RawFd {
        self.shared.notifier.as_raw_fd()
    }

    fn process_notification(&mut self, io: &mut IoSubmitter<'_>) {
        self.drain(io);
    }

    fn complete(&mut self, request: u32, result: i32, io: &mut IoSubmitter<'_>) {
        let Some(slot) = self
            .requests
            .get_mut(request as usize)
            .filter(|slot| slot.busy)
        else {
            return;
        };
        let backend = &self.context.namespaces[slot.operation.namespace].backend;
        // SAFETY: as in `submit`: the request is busy, so its BlockIo and buffers are valid.
        let submitted = unsafe { backend.complete(request, &mut slot.operation.io, result, io) };
        if self.step_done(request, submitted) {
            self.submit(request, io);
        }
    }

    fn end_batch(&mut self) {
        if !std::mem::take(&mut self.posted) {
            return;
        }
        let vector = self.cq.interrupt_vector();
        if let Some(vector) = vector {
            self.context
                .interrupt
                .notify_completion_queue(self.cq.id(), vector);
        }
        self.latency.batch_ended(vector.is_some());
    }

    fn in_flight_requests(&self, requests: &mut Vec<u32>) {
        requests.extend(
            (0u32..)
                .zip(&self.requests)
                .filter(|(_, request)| request.busy)
                .map(|(index, _)| index),
        );
    }
}

impl Drop for IoSubmissionQueueHandler {
    /// The queue was removed with commands in flight: they never complete, so their CQ
    /// reservations go back (the CQ may outlive this SQ and serve others).
    fn drop(&mut self) {
        let in_flight = self.requests.iter().filter(|request| request.busy).count();
        self.cq.release(in_flight as u32);
        self.latency.queue().abandon(in_flight as u32);
    }
}
