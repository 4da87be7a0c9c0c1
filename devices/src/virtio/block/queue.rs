//! One virtio-blk virtqueue as served by an I/O worker: pops descriptor chains, validates them,
//! hands I/O to the backend, and returns used entries (in completion order, which io_uring
//! does not keep) with EVENT_IDX-aware interrupts.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::request::{collect_chain, parse, status_address, Parsed, RequestError, VIRTIO_BLK_S_OK};
use super::BlockShared;
use crate::io::{BlockIo, BlockIoKind, IoSubmitter, QueueHandler, Submitted};
use crate::latency::{LatencyRecorder, RequestTimes};
use crate::virtio::VirtioInterrupt;

/// A request handed to the backend and not finished yet. Slots are reused, never freed, so a
/// queue allocates nothing per request once warm.
#[derive(Default)]
struct RequestSlot {
    busy: bool,
    head: u16,
    status: Option<GuestAddress>,
    /// Bytes the device writes into the guest's data buffers on success.
    data_written: u32,
    io: BlockIo,
    times: RequestTimes,
}

pub(super) struct BlockQueue {
    index: u16,
    queue: Queue,
    /// Kept open while the pool polls it.
    notifier: Arc<EventFd>,
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    device: Arc<BlockShared>,
    /// One slot per possible in-flight request: a well-behaved driver never has more than the
    /// queue size outstanding; a driver that republishes heads is throttled here.
    requests: Vec<RequestSlot>,
    free: Vec<u32>,
    /// Scratch for the chain being parsed.
    descriptors: Vec<Descriptor>,
    max_chain_descriptors: usize,
    /// Stopped popping because every slot was busy; a completion resumes.
    stalled: bool,
    /// Used entries added since the last interrupt decision.
    used_pending: bool,
    latency: LatencyRecorder,
    /// When the current pass over the avail ring began: the requests it pops were notified
    /// then (or earlier, unseen: with ioeventfd the guest's write itself is not observable).
    pass_started: u64,
}

impl BlockQueue {
    pub(super) fn new(
        index: u16,
        queue: Queue,
        notifier: Arc<EventFd>,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        device: Arc<BlockShared>,
    ) -> Self {
        let size = usize::from(queue.size());
        let requests = (0..size).map(|_| RequestSlot::default()).collect();
        // Pop lowest slots first (cosmetic: easier to read in traces).
        let free = (0..size as u32).rev().collect();
        // Indirect tables may be longer than the queue; a Linux request needs seg_max + 2.
        let max_chain_descriptors = size.max(device.seg_max as usize + 2);
        let latency = LatencyRecorder::with_slots(device.latency[usize::from(index)].clone(), size);
        BlockQueue {
            index,
            queue,
            notifier,
            memory,
            interrupt,
            device,
            requests,
            free,
            descriptors: Vec::new(),
            max_chain_descriptors,
            stalled: false,
            used_pending: false,
            latency,
            pass_started: 0,
        }
    }

    /// Pops and starts requests until the avail ring is empty (or every slot is busy, or the
    /// budget is spent), with driver notifications off meanwhile; re-enables them and checks
    /// once more before giving up, so that a request published just before re-enabling is not
    /// left behind.
    ///
    /// The budget (one queue size per pass) keeps a guest that publishes as fast as requests
    /// complete inline from monopolising the worker, and keeps the used entries added between
    /// two interrupt decisions below 2^16 (virtio-queue's EVENT_IDX check counts them in a u16).
    fn drain_available(&mut self, io: &mut IoSubmitter<'_>) {
        let device = self.device.clone();
        let counters = &device.counters;
        let mut budget = self.requests.len();
        self.pass_started = self.latency.stamp();
        loop {
            if self.queue.disable_notification(&self.memory).is_err() {
                counters.used_ring_errors.fetch_add(1, Ordering::Relaxed);
            }
            let mut popped_any = false;
            while !self.free.is_empty() {
                if budget == 0 {
                    // Notifications stay off: the worker runs us again after this batch.
                    io.run_again();
                    return;
                }
                let Some(chain) = self.queue.pop_descriptor_chain(&self.memory) else {
                    break;
                };
                budget -= 1;
                popped_any = true;
                self.latency.fetched();
                let head = chain.head_index();
                let walked =
                    collect_chain(chain, &mut self.descriptors, self.max_chain_descriptors);
                self.start_request(head, walked, io);
            }
            if self.free.is_empty() {
                // Notifications stay off: the next completion calls us again.
                self.stalled = true;
                return;
            }
            match self.queue.enable_notification(&self.memory) {
                Ok(true) if popped_any => continue,
                Ok(true) => {
                    // The avail index claims entries that cannot be popped (it ran more than a
                    // queue size ahead): the driver is broken; do not spin on it.
                    counters.bad_avail_index.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(false) => return,
                Err(_) => {
                    counters.used_ring_errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn start_request(
        &mut self,
        head: u16,
        walked: Result<(), RequestError>,
        io: &mut IoSubmitter<'_>,
    ) {
        let mut times = RequestTimes {
            notified: self.pass_started,
            ..RequestTimes::default()
        };
        if let Err(error) = walked {
            // Without a proper end there is no status byte to trust.
            return self.finish_unsubmitted(head, None, Err(error), times);
        }
        let Some(status) = status_address(&self.memory, &self.descriptors) else {
            return self.finish_unsubmitted(head, None, Err(RequestError::MissingStatus), times);
        };
        let Some(slot_index) = self.free.pop() else {
            // drain_available only pops with a free slot.
            return self.finish_unsubmitted(head, Some(status), Err(RequestError::BadChain), times);
        };
        let device = &self.device;
        let slot = &mut self.requests[slot_index as usize];
        let (request_type, parsed) = parse(
            &self.memory,
            &self.descriptors,
            &device.limits,
            &mut slot.io,
        );
        device.counters.count_request(request_type);
        times.op = request_type.op();
        let data_written = match parsed {
            Ok(Parsed::Backend { data_written }) => data_written,
            Ok(Parsed::Answered { data_written }) => {
                self.free.push(slot_index);
                return self.finish_unsubmitted(head, Some(status), Ok(data_written), times);
            }
            Err(error) => {
                self.free.push(slot_index);
                return self.finish_unsubmitted(head, Some(status), Err(error), times);
            }
        };
        times.parsed = self.latency.stamp();
        // SAFETY: `slot.io` stays in `self.requests` untouched until the backend reports it
        // done (the slot is busy until then); its buffers are guest memory, mapped as long as
        // `self.memory` lives, i.e. as long as this handler, which the pool drops only after
        // the last completion of this queue.
        let submitted = unsafe { device.backend.submit(slot_index, &mut slot.io, io) };
        times.submitted = self.latency.stamp();
        match submitted {
            Submitted::Pending => {
                slot.busy = true;
                slot.head = head;
                slot.status = Some(status);
                slot.data_written = data_written;
                slot.times = times;
                self.latency.backend_started(slot_index, &times);
            }
            Submitted::Done(result) => {
                times.completed = times.submitted;
                let kind = slot.io.kind();
                let len = slot.io.len();
                self.free.push(slot_index);
                let outcome = self.account(kind, len, data_written, result);
                self.finish(head, Some(status), outcome, times);
            }
        }
    }

    /// Finishes a request that never reached the backend.
    fn finish_unsubmitted(
        &mut self,
        head: u16,
        status: Option<GuestAddress>,
        outcome: Result<u32, RequestError>,
        mut times: RequestTimes,
    ) {
        times.parsed = self.latency.stamp();
        times.answered_at_parse();
        self.finish(head, status, outcome, times);
    }

    /// Turns a backend result into the request outcome, counting bytes moved.
    fn account(
        &self,
        kind: BlockIoKind,
        len: u64,
        data_written: u32,
        result: Result<u64, crate::io::BackendError>,
    ) -> Result<u32, RequestError> {
        let counters = &self.device.counters;
        match result {
            Ok(_) => {
                match kind {
                    BlockIoKind::Read => counters.bytes_read.fetch_add(len, Ordering::Relaxed),
                    BlockIoKind::Write => counters.bytes_written.fetch_add(len, Ordering::Relaxed),
                    _ => 0,
                };
                Ok(data_written)
            }
            Err(error) => Err(RequestError::from(&error)),
        }
    }

    /// Writes the status byte (if there is one) and returns the chain to the driver.
    fn finish(
        &mut self,
        head: u16,
        status: Option<GuestAddress>,
        outcome: Result<u32, RequestError>,
        times: RequestTimes,
    ) {
        let counters = &self.device.counters;
        let failed = outcome.is_err();
        let (status_byte, data_written) = match outcome {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(error) => {
                counters.count_error(error);
                (error.status(), 0)
            }
        };
        let used_len = match status {
            Some(address) if self.memory.write_obj(status_byte, address).is_ok() => {
                data_written + 1
            }
            _ => 0,
        };
        match self.queue.add_used(&self.memory, head, used_len) {
            Ok(()) => {
                self.used_pending = true;
                if failed {
                    self.latency.published_error(times);
                } else {
                    self.latency.published(times);
                }
            }
            // A head index beyond the queue: nothing can be returned to the driver.
            Err(_) => {
                counters.used_ring_errors.fetch_add(1, Ordering::Relaxed);
                self.latency.abandoned();
            }
        }
    }
}

impl QueueHandler for BlockQueue {
    fn notifier_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }

    fn process_notification(&mut self, io: &mut IoSubmitter<'_>) {
        self.device
            .counters
            .queue_notifications
            .fetch_add(1, Ordering::Relaxed);
        self.latency.queue().count_notification();
        if !self.stalled {
            self.drain_available(io);
        }
    }

    fn complete(&mut self, request: u32, result: i32, io: &mut IoSubmitter<'_>) {
        let device = &self.device;
        let Some(slot) = self
            .requests
            .get_mut(request as usize)
            .filter(|slot| slot.busy)
        else {
            device
                .counters
                .stale_completions
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        // SAFETY: as in `start_request`: the slot is busy, so `slot.io` and its buffers are
        // still valid and untouched.
        let submitted = unsafe { device.backend.complete(request, &mut slot.io, result, io) };
        let Submitted::Done(result) = submitted else {
            return;
        };
        slot.busy = false;
        self.latency.backend_finished(request);
        slot.times.completed = self.latency.stamp();
        let (head, status, data_written) = (slot.head, slot.status, slot.data_written);
        let (kind, len, times) = (slot.io.kind(), slot.io.len(), slot.times);
        self.free.push(request);
        let outcome = self.account(kind, len, data_written, result);
        self.finish(head, status, outcome, times);
        if self.stalled {
            self.stalled = false;
            self.drain_available(io);
        }
    }

    fn end_batch(&mut self) {
        if !std::mem::take(&mut self.used_pending) {
            return;
        }
        let counters = &self.device.counters;
        // On a used-ring read error, err on the side of an interrupt.
        let interrupted = self.queue.needs_notification(&self.memory).unwrap_or(true);
        if interrupted {
            self.interrupt.notify_queue(self.index);
            counters.interrupts.fetch_add(1, Ordering::Relaxed);
        } else {
            counters
                .interrupts_suppressed
                .fetch_add(1, Ordering::Relaxed);
        }
        self.latency.batch_ended(interrupted);
    }

    fn in_flight_requests(&self, requests: &mut Vec<u32>) {
        requests.extend(
            (0u32..)
                .zip(&self.requests)
                .filter(|(_, slot)| slot.busy)
                .map(|(index, _)| index),
        );
    }
}

impl Drop for BlockQueue {
    /// The queue was removed (device reset) with requests at the backend: they will never be
    /// published, so they leave the in-flight depth.
    fn drop(&mut self) {
        let busy = self.requests.iter().filter(|slot| slot.busy).count();
        self.latency.queue().abandon(busy as u32);
    }
}
