//! Submission and completion queues in guest memory (NVMe 1.4, 4.1 - 4.6): 64-byte SQ
//! entries, 16-byte CQ entries with a phase tag, circular head/tail indexes.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::{Status, COMPLETION_ENTRY_BYTES, SUBMISSION_ENTRY_BYTES};

/// A doorbell value the queue cannot accept (NVMe "Invalid Doorbell Write Value").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidDoorbellValue;

/// One 64-byte submission queue entry, as 16 little-endian dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubmissionEntry {
    pub dwords: [u32; 16],
}

impl SubmissionEntry {
    pub fn from_bytes(bytes: &[u8; 64]) -> Self {
        let mut dwords = [0u32; 16];
        for (dword, chunk) in dwords.iter_mut().zip(bytes.chunks_exact(4)) {
            *dword = u32::from_le_bytes(chunk.try_into().unwrap());
        }
        SubmissionEntry { dwords }
    }

    pub fn to_bytes(&self) -> [u8; 64] {
        let mut bytes = [0u8; 64];
        for (dword, chunk) in self.dwords.iter().zip(bytes.chunks_exact_mut(4)) {
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
        bytes
    }

    pub fn opcode(&self) -> u8 {
        self.dwords[0] as u8
    }

    /// Fused operation (CDW0 bits 9:8); 0 for a normal command.
    pub fn fuse(&self) -> u8 {
        ((self.dwords[0] >> 8) & 0b11) as u8
    }

    /// PRP or SGL for Data Transfer (CDW0 bits 15:14); 0 selects PRPs.
    pub fn data_transfer_kind(&self) -> u8 {
        ((self.dwords[0] >> 14) & 0b11) as u8
    }

    pub fn command_id(&self) -> u16 {
        (self.dwords[0] >> 16) as u16
    }

    pub fn namespace_id(&self) -> u32 {
        self.dwords[1]
    }

    pub fn prp1(&self) -> u64 {
        u64::from(self.dwords[6]) | u64::from(self.dwords[7]) << 32
    }

    pub fn prp2(&self) -> u64 {
        u64::from(self.dwords[8]) | u64::from(self.dwords[9]) << 32
    }

    /// Command dword 10..=15.
    pub fn cdw(&self, index: usize) -> u32 {
        debug_assert!((10..=15).contains(&index));
        self.dwords[index]
    }
}

/// A completion queue entry before it gets its phase tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result (DW0).
    pub result: u32,
    pub sq_head: u16,
    pub sq_id: u16,
    pub command_id: u16,
    pub status: Status,
}

impl Completion {
    /// The 16-byte entry; DW3 holds CID, the phase tag (bit 16) and the status field.
    pub fn to_dwords(&self, phase: bool) -> [u32; 4] {
        let status_and_phase = u32::from(self.status.field()) | u32::from(phase);
        [
            self.result,
            0,
            u32::from(self.sq_head) | u32::from(self.sq_id) << 16,
            u32::from(self.command_id) | status_and_phase << 16,
        ]
    }
}

fn advance(index: u32, size: u32) -> u32 {
    if index + 1 == size {
        0
    } else {
        index + 1
    }
}

pub struct SubmissionQueue {
    id: u16,
    base: GuestAddress,
    /// Entries (not 0's based), 2..=65536.
    size: u32,
    head: u32,
    tail: u32,
    completion_queue_id: u16,
}

impl SubmissionQueue {
    pub fn new(id: u16, base: GuestAddress, size: u32, completion_queue_id: u16) -> Self {
        SubmissionQueue {
            id,
            base,
            size,
            head: 0,
            tail: 0,
            completion_queue_id,
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The head as reported in completions (SQ Head Pointer): entries before it are free.
    pub fn head(&self) -> u16 {
        self.head as u16
    }

    pub fn completion_queue_id(&self) -> u16 {
        self.completion_queue_id
    }

    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// A tail doorbell write. Only the range can be checked: a tail that overruns the head
    /// is indistinguishable from a legitimately filled queue.
    pub fn set_tail(&mut self, tail: u16) -> Result<(), InvalidDoorbellValue> {
        if u32::from(tail) >= self.size {
            return Err(InvalidDoorbellValue);
        }
        self.tail = u32::from(tail);
        Ok(())
    }

    /// Fetches the entry at the head and advances the head.
    pub fn pop(
        &mut self,
        memory: &GuestMemoryMmap,
    ) -> Result<Option<SubmissionEntry>, GuestMemoryError> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut bytes = [0u8; 64];
        let address = GuestAddress(self.base.0 + u64::from(self.head) * SUBMISSION_ENTRY_BYTES);
        memory.read_slice(&mut bytes, address)?;
        self.head = advance(self.head, self.size);
        Ok(Some(SubmissionEntry::from_bytes(&bytes)))
    }
}

pub struct CompletionQueue {
    id: u16,
    base: GuestAddress,
    size: u32,
    /// Next entry the host will consume (from its head doorbell).
    head: u32,
    /// Next entry the controller writes.
    tail: u32,
    /// Phase tag of the entries written in the current pass; flips at each wrap.
    phase: bool,
    vector: u16,
    interrupts_enabled: bool,
    /// Completions that found the queue full, posted in order as the host frees entries.
    held: VecDeque<Completion>,
    /// SQs bound to this CQ: deletion is refused while any remain.
    bound_submission_queues: usize,
}

impl CompletionQueue {
    pub fn new(
        id: u16,
        base: GuestAddress,
        size: u32,
        vector: u16,
        interrupts_enabled: bool,
    ) -> Self {
        CompletionQueue {
            id,
            base,
            size,
            head: 0,
            tail: 0,
            phase: true,
            vector,
            interrupts_enabled,
            held: VecDeque::new(),
            bound_submission_queues: 0,
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn interrupt_vector(&self) -> Option<u16> {
        self.interrupts_enabled.then_some(self.vector)
    }

    pub fn held_completions(&self) -> usize {
        self.held.len()
    }

    pub fn bound_submission_queues(&self) -> usize {
        self.bound_submission_queues
    }

    pub fn bind_submission_queue(&mut self) {
        self.bound_submission_queues += 1;
    }

    pub fn unbind_submission_queue(&mut self) {
        self.bound_submission_queues = self.bound_submission_queues.saturating_sub(1);
    }

    /// Next entry the host will consume, as of its last head update.
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Entries written and not yet consumed by the host.
    fn posted(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Entries the controller may still write before the queue is full.
    pub fn room(&self) -> u32 {
        self.size - 1 - self.posted()
    }

    /// One slot always stays empty, so that head == tail means empty (NVMe 1.4, 4.1.2).
    pub fn is_full(&self) -> bool {
        advance(self.tail, self.size) == self.head
    }

    /// A head doorbell write: it must stay inside the queue and may only consume entries
    /// the controller has posted.
    pub fn set_head(&mut self, head: u16) -> Result<(), InvalidDoorbellValue> {
        let head = u32::from(head);
        if head >= self.size {
            return Err(InvalidDoorbellValue);
        }
        let consumed = (head + self.size - self.head) % self.size;
        if consumed > self.posted() {
            return Err(InvalidDoorbellValue);
        }
        self.head = head;
        Ok(())
    }

    /// Writes `completion`, or holds it if the queue is full (or earlier ones are held, to
    /// keep the order). Returns whether it was written.
    pub fn post(
        &mut self,
        memory: &GuestMemoryMmap,
        completion: Completion,
    ) -> Result<bool, GuestMemoryError> {
        if !self.held.is_empty() || self.is_full() {
            self.held.push_back(completion);
            return Ok(false);
        }
        self.write_entry(memory, &completion)?;
        Ok(true)
    }

    /// Posts held completions into the space the host freed; returns how many.
    pub fn flush_held(&mut self, memory: &GuestMemoryMmap) -> Result<usize, GuestMemoryError> {
        let mut written = 0;
        while !self.is_full() {
            let Some(completion) = self.held.pop_front() else {
                break;
            };
            self.write_entry(memory, &completion)?;
            written += 1;
        }
        Ok(written)
    }

    fn write_entry(
        &mut self,
        memory: &GuestMemoryMmap,
        completion: &Completion,
    ) -> Result<(), GuestMemoryError> {
        let address = GuestAddress(self.base.0 + u64::from(self.tail) * COMPLETION_ENTRY_BYTES);
        let dwords = completion.to_dwords(self.phase);
        let mut body = [0u8; 12];
        for (chunk, dword) in body.chunks_exact_mut(4).zip(&dwords[..3]) {
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
        memory.write_slice(&body, address)?;
        // The host polls the phase tag in DW3: the rest of the entry must be visible first.
        fence(Ordering::Release);
        memory.write_obj(dwords[3], GuestAddress(address.0 + 12))?;
        self.tail = advance(self.tail, self.size);
        if self.tail == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn completion(command_id: u16) -> Completion {
        Completion {
            result: 0xAABB_CCDD,
            sq_head: 3,
            sq_id: 1,
            command_id,
            status: Status::INVALID_FIELD,
        }
    }

    fn read_entry(memory: &GuestMemoryMmap, base: u64, index: u64) -> [u32; 4] {
        let mut dwords = [0u32; 4];
        for (i, dword) in dwords.iter_mut().enumerate() {
            *dword = memory
                .read_obj(GuestAddress(base + index * 16 + 4 * i as u64))
                .unwrap();
        }
        dwords
    }

    #[test]
    fn completion_entry_layout() {
        let dwords = completion(0x1234).to_dwords(true);
        assert_eq!(dwords[0], 0xAABB_CCDD);
        assert_eq!(dwords[2], 3 | 1 << 16);
        assert_eq!(dwords[3] & 0xFFFF, 0x1234);
        assert_eq!((dwords[3] >> 16) & 1, 1, "phase");
        assert_eq!((dwords[3] >> 17) & 0xFF, 0x02, "SC");
        assert_eq!((dwords[3] >> 25) & 0x7, 0, "SCT");
        assert_eq!(dwords[3] >> 31, 1, "DNR");
        let specific = Completion {
            status: Status::INVALID_QUEUE_DELETION,
            ..completion(0)
        };
        let dw3 = specific.to_dwords(false)[3];
        assert_eq!((dw3 >> 17) & 0xFF, 0x0C);
        assert_eq!((dw3 >> 25) & 0x7, 1);
        assert_eq!(
            Status::from_field((dw3 >> 16) as u16),
            Status::INVALID_QUEUE_DELETION
        );
    }

    #[test]
    fn submission_tail_range_and_wrap() {
        let memory = memory();
        let mut sq = SubmissionQueue::new(1, GuestAddress(0x1000), 4, 1);
        assert_eq!(sq.set_tail(4), Err(InvalidDoorbellValue));
        for round in 0..3u32 {
            for slot in 0..4u32 {
                let mut entry = SubmissionEntry::default();
                entry.dwords[0] = (round * 4 + slot) << 16;
                memory
                    .write_slice(
                        &entry.to_bytes(),
                        GuestAddress(0x1000 + u64::from(slot) * 64),
                    )
                    .unwrap();
            }
            let tail = (u32::from(sq.head()) + 3) % 4;
            sq.set_tail(tail as u16).unwrap();
            let ids: Vec<u16> = std::iter::from_fn(|| sq.pop(&memory).unwrap())
                .map(|e| e.command_id())
                .collect();
            let first = round * 3;
            let expected: Vec<u16> = (first..first + 3)
                .map(|i| (i % 4 + round * 4) as u16)
                .collect();
            assert_eq!(ids, expected);
        }
        assert!(sq.is_empty());
    }

    #[test]
    fn completion_queue_holds_when_full_and_flips_phase() {
        let memory = memory();
        let base = 0x2000;
        let mut cq = CompletionQueue::new(1, GuestAddress(base), 3, 1, true);
        assert!(cq.post(&memory, completion(0)).unwrap());
        assert!(cq.post(&memory, completion(1)).unwrap());
        assert!(cq.is_full());
        assert!(
            !cq.post(&memory, completion(2)).unwrap(),
            "held, not overwritten"
        );
        assert_eq!(cq.held_completions(), 1);
        assert_eq!(read_entry(&memory, base, 2), [0; 4], "free slot untouched");
        // Consuming past what was posted is invalid.
        assert_eq!(cq.set_head(0), Ok(()));
        assert!(cq.set_head(3).is_err());
        cq.set_head(1).unwrap();
        assert_eq!(cq.flush_held(&memory).unwrap(), 1);
        assert_eq!(read_entry(&memory, base, 2)[3] & 0xFFFF, 2);
        assert_eq!((read_entry(&memory, base, 2)[3] >> 16) & 1, 1);
        cq.set_head(2).unwrap();
        assert!(cq.post(&memory, completion(3)).unwrap());
        let wrapped = read_entry(&memory, base, 0)[3];
        assert_eq!(wrapped & 0xFFFF, 3);
        assert_eq!((wrapped >> 16) & 1, 0, "second pass has phase 0");
        assert!(cq.set_head(2).is_ok(), "no-op head write is fine");
        cq.set_head(1).unwrap();
        assert!(cq.set_head(2).is_err(), "nothing left to consume");
    }
}
