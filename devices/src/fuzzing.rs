//! Entry points that feed arbitrary bytes to the guest-facing request paths: the fuzz targets
//! in `fuzz/` (cargo-fuzz, libFuzzer) call them, and so does a bounded random smoke test
//! here. Each builds guest memory from the input, runs the path, and checks what must hold
//! whatever the guest wrote: no panic, and every buffer handed to a backend lies inside
//! guest RAM.

use std::sync::{Arc, OnceLock};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::io::{BlockBackend, BlockIo, IoPool};
use crate::nvme::nvm::{self, IoContext, Namespace, Operation, Prepared};
use crate::nvme::queue::SubmissionEntry;
use crate::nvme::{ControllerConfig, NamespaceConfig, NvmeController, NvmeInterrupt};
use crate::virtio::block::request::{collect_chain, parse, status_address, DiskLimits};

/// Guest RAM of every target: small, so that random addresses often land inside.
const MEMORY_BYTES: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const DESCRIPTOR_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;

/// Guest memory holding `data` from address 0 (the rest zero).
fn memory_from(data: &[u8]) -> GuestMemoryMmap {
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_BYTES)]).expect("1 MiB of memory");
    let len = data.len().min(MEMORY_BYTES);
    memory
        .write_slice(&data[..len], GuestAddress(0))
        .expect("inside memory");
    memory
}

/// Asserts that every buffer of `io` lies in `memory`'s single region.
fn assert_in_guest_ram(memory: &GuestMemoryMmap, io: &BlockIo) {
    let region = memory.iter().next().expect("one region");
    let start = region.as_ptr() as usize;
    let end = start + MEMORY_BYTES;
    for iovec in io.iovecs() {
        let base = iovec.iov_base as usize;
        assert!(
            base >= start && base + iovec.iov_len <= end,
            "buffer {base:#x}+{} outside guest RAM {start:#x}..{end:#x}",
            iovec.iov_len
        );
    }
}

/// A virtio-blk request: `data` is guest memory with the descriptor table at 0, the avail
/// ring at 0x1000 (its index and first entry from the input) and whatever the descriptors
/// point at; the chain is walked and parsed as the queue handler does.
pub fn virtio_request(data: &[u8]) {
    let memory = memory_from(data);
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue size");
    queue
        .try_set_desc_table_address(GuestAddress(DESCRIPTOR_TABLE))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    queue.set_ready(true);
    let limits = DiskLimits {
        capacity_bytes: 1 << 30,
        read_only: data.first().is_some_and(|b| b & 1 != 0),
        discard: true,
        write_zeroes: true,
        max_discard_sectors: 1 << 16,
        max_write_zeroes_sectors: 1 << 16,
        serial: [b's'; 20],
    };
    let mut descriptors = Vec::new();
    let mut io = BlockIo::default();
    // At most a queue's worth of chains, as one pass of the handler.
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&memory) else {
            break;
        };
        let head = chain.head_index();
        if collect_chain(chain, &mut descriptors, usize::from(QUEUE_SIZE) * 2).is_err() {
            continue;
        }
        if status_address(&memory, &descriptors).is_none() {
            continue;
        }
        let (_, parsed) = parse(&memory, &descriptors, &limits, &mut io);
        if parsed.is_ok() {
            assert_in_guest_ram(&memory, &io);
        }
        // Returning the head exercises the used ring with a guest-chosen index.
        let _ = queue.add_used(&memory, head, 1);
    }
}

struct NoInterrupt;

impl NvmeInterrupt for NoInterrupt {
    fn notify_completion_queue(&self, _cq_id: u16, _vector: u16) {}
}

fn namespaces() -> Vec<NamespaceConfig> {
    NamespaceConfig::carve(Arc::new(BlockBackend::null(1 << 24, None)), 2, 1)
}

/// An NVMe I/O command: the first 64 bytes of `data` are the SQ entry, all of `data` is
/// guest memory (PRP lists, Dataset Management ranges); the command is prepared as the SQ
/// handler does.
pub fn nvme_io_command(data: &[u8]) {
    let Some(entry) = data.get(..64) else {
        return;
    };
    let command = SubmissionEntry::from_bytes(entry.try_into().expect("64 bytes"));
    let memory = memory_from(data);
    let context = IoContext {
        memory: memory.clone(),
        interrupt: Arc::new(NoInterrupt),
        namespaces: namespaces().iter().map(Namespace::new).collect(),
        max_transfer_bytes: 4096 << 5,
        write_through: false.into(),
        fatal: false.into(),
        invalid_shadow_doorbell_values: 0.into(),
        halted: false.into(),
        // The first namespace's group inaccessible, the others optimized: both outcomes of
        // the path check are reached.
        ana: Some(Arc::new({
            let count = namespaces().len() as u32;
            let groups = crate::nvme::ana::AnaGroups::new(count, count);
            let _ = groups.set(1, crate::nvme::ana::AnaState::Inaccessible);
            groups
        })),
    };
    let mut operation = Operation::default();
    let mut segments = Vec::new();
    if let Ok(Prepared::Backend) = nvm::prepare(&context, &command, &mut operation, &mut segments) {
        assert_in_guest_ram(&memory, &operation.io);
    }
}

/// Admin commands: `data` is guest memory whose first page is a 16-entry admin SQ; the
/// controller is enabled on it and the tail doorbell rung past every entry, then register
/// accesses taken from the end of the input follow.
pub fn nvme_admin_commands(data: &[u8]) {
    static POOL: OnceLock<Arc<IoPool>> = OnceLock::new();
    let pool = POOL
        .get_or_init(|| Arc::new(IoPool::new(1).expect("an I/O worker")))
        .clone();
    let memory = memory_from(data);
    let config = ControllerConfig {
        namespaces: namespaces(),
        max_io_queue_pairs: 4,
        interrupt_vectors: 5,
        ..ControllerConfig::default()
    };
    let mut controller = NvmeController::new(config, memory, Arc::new(NoInterrupt), pool);
    let write32 = |controller: &mut NvmeController, offset: u64, value: u32| {
        controller.mmio_write(offset, &value.to_le_bytes())
    };
    // AQA: 16-entry SQ and CQ; ASQ at 0, ACQ at 0x1000 (both in the fuzzed memory).
    write32(&mut controller, 0x24, (15 << 16) | 15);
    controller.mmio_write(0x28, &0u64.to_le_bytes());
    controller.mmio_write(0x30, &0x1000u64.to_le_bytes());
    write32(&mut controller, 0x14, 1 | (6 << 16) | (4 << 20));
    // Every entry of the admin SQ.
    write32(&mut controller, 0x1000, 15);
    // Then the input's last bytes as (offset, value) register writes, doorbells included.
    for access in data.rchunks_exact(6).take(8) {
        let offset = u64::from(u16::from_le_bytes([access[0], access[1]])) & 0x1ffc;
        let value = u32::from_le_bytes([access[2], access[3], access[4], access[5]]);
        write32(&mut controller, offset, value);
        let mut read = [0u8; 4];
        controller.mmio_read(offset, &mut read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inputs (a fixed seed, so a failure repeats), with a page of structure: a few
    /// valid-looking descriptors and commands among the noise.
    fn inputs(count: usize, len: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..count).map(move |_| {
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Small values for lengths, addresses and indexes now and then.
            for byte in data.iter_mut().filter(|_| next() % 4 == 0) {
                *byte &= 0x1f;
            }
            data
        })
    }

    #[test]
    fn virtio_requests_from_random_memory_are_safe() {
        for data in inputs(3000, 0x3000, 1) {
            virtio_request(&data);
        }
    }

    #[test]
    fn nvme_io_commands_from_random_memory_are_safe() {
        for data in inputs(3000, 0x2000, 2) {
            nvme_io_command(&data);
        }
    }

    #[test]
    fn nvme_admin_commands_from_random_memory_are_safe() {
        for data in inputs(300, 0x3000, 3) {
            nvme_admin_commands(&data);
        }
    }
}
