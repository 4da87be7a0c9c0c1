//! Disks from the command line: backends opened, virtio-blk devices created and placed on
//! PCI, all served by one I/O worker pool.

use std::sync::Arc;
use std::time::Duration;

use devices::io::{BackendError, BlockBackend, IoPool, IoPoolError};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use irq::intx::IntxResamplerHandle;

use crate::config::{DiskBackendConfig, DiskConfig};
use crate::pci::{PciError, PciSegment, VirtioFunction};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("I/O worker pool: {0}")]
    Pool(#[from] IoPoolError),
    #[error("disk {index}: {source}")]
    Backend {
        index: usize,
        #[source]
        source: BackendError,
    },
    #[error("disk {index}: {source}")]
    Block {
        index: usize,
        #[source]
        source: BlockError,
    },
    /// Refused here too, so a configuration built without the CLI cannot half-work.
    #[error("disk {index}: msix_vectors=0 needs intx=on, or the function has no interrupt")]
    NoInterrupt { index: usize },
    #[error("INTx resampler: {0}")]
    IntxResampler(#[source] PciError),
    #[error("disk {index}: {source}")]
    Pci {
        index: usize,
        #[source]
        source: PciError,
    },
}

/// Worker threads when `--io-threads` is not given: one per host CPU.
pub fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn open_backend(disk: &DiskConfig) -> Result<BlockBackend, BackendError> {
    match &disk.backend {
        DiskBackendConfig::File { path, direct } => {
            BlockBackend::open_raw_file(path, *direct, disk.read_only)
        }
        DiskBackendConfig::Null {
            size_bytes,
            latency_us,
        } => Ok(BlockBackend::null(
            *size_bytes,
            (*latency_us > 0).then(|| Duration::from_micros(*latency_us)),
        )),
    }
}

/// The disks of a VM and the pool serving them.
pub struct Disks {
    pub pool: Arc<IoPool>,
    /// One per disk of `--disk` and `--disks`, in command-line order.
    pub functions: Vec<VirtioFunction>,
    /// The thread re-asserting INTx lines at EOI, when a disk has INTx.
    pub intx_resampler: Option<IntxResamplerHandle>,
}

/// Creates every disk on `pci`. Linear in the number of disks: each is opened and placed once.
pub fn create_disks(
    disks: &[DiskConfig],
    io_threads: usize,
    pci: &mut PciSegment,
) -> Result<Disks, DiskError> {
    // Checked for every disk before the first is created: refuse, never half-start.
    if let Some(index) = disks
        .iter()
        .position(|disk| disk.msix_vectors == 0 && !disk.intx)
    {
        return Err(DiskError::NoInterrupt { index });
    }
    let pool = Arc::new(IoPool::new(io_threads)?);
    let mut functions = Vec::with_capacity(disks.len());
    for (index, disk) in disks.iter().enumerate() {
        let backend = open_backend(disk).map_err(|source| DiskError::Backend { index, source })?;
        let block = Block::new(
            BlockConfig {
                backend,
                num_queues: disk.num_queues,
                queue_size: disk.queue_size,
                read_only: disk.read_only,
                serial: format!("blkswarm{index}"),
            },
            pool.clone(),
        )
        .map_err(|source| DiskError::Block { index, source })?;
        let function = pci
            .add_virtio(Box::new(block), disk.msix_vectors, disk.intx)
            .map_err(|source| DiskError::Pci { index, source })?;
        functions.push(function);
    }
    let intx_resampler = pci
        .start_intx_resampler()
        .map_err(DiskError::IntxResampler)?;
    Ok(Disks {
        pool,
        functions,
        intx_resampler,
    })
}
