//! Disks from the command line: backends opened, virtio-blk devices created and placed on
//! PCI, all served by one I/O worker pool.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use devices::io::{BackendError, BlockBackend, FaultSettings, Faults, IoPool, IoPoolError};
use devices::nvme::{ControllerConfig, NamespaceConfig};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use irq::intx::IntxResamplerHandle;

use crate::config::{DiskBackendConfig, DiskConfig, NvmeConfig};
use crate::pci::{NvmeFunction, PciError, PciSegment, VirtioFunction};
use crate::stats::{DiskKind, MeasuredDisk, MeasuredQueue};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing runs in the guest yet: a poisoned lock only means a panic elsewhere.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

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
    #[error("NVMe controller {index}: {source}")]
    NvmeBackend {
        index: usize,
        #[source]
        source: BackendError,
    },
    #[error("NVMe controller {index}: {source}")]
    NvmePci {
        index: usize,
        #[source]
        source: PciError,
    },
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

fn open_backend(disk: &DiskConfig, faults: &Arc<Faults>) -> Result<BlockBackend, BackendError> {
    open(&disk.backend, disk.read_only).map(|backend| backend.with_faults(faults.clone()))
}

/// A disk's faults from its `fault_*` keys (checked when parsed); `seed` makes each disk's
/// random draws its own.
fn faults(settings: Option<&[(String, String)]>, seed: u64) -> Arc<Faults> {
    let mut fault_settings = FaultSettings::default();
    for (key, value) in settings.unwrap_or_default() {
        // Parsing checked every setting: a failure here is a bug, and must not start a VM
        // with less than it was asked for.
        fault_settings
            .set(key, value)
            .unwrap_or_else(|e| panic!("fault setting {key}={value}: {e}"));
    }
    Arc::new(Faults::new(fault_settings, seed))
}

fn open(backend: &DiskBackendConfig, read_only: bool) -> Result<BlockBackend, BackendError> {
    match backend {
        DiskBackendConfig::File { path, direct } => {
            BlockBackend::open_raw_file(path, *direct, read_only)
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
    /// One per controller of `--nvme` and `--nvmes`, in command-line order, placed after
    /// the virtio disks.
    pub nvme_functions: Vec<NvmeFunction>,
    /// The thread re-asserting INTx lines at EOI, when a disk has INTx.
    pub intx_resampler: Option<IntxResamplerHandle>,
    /// Every disk's queue timing and MSI-X, for the measurement report.
    pub measured: Vec<MeasuredDisk>,
}

/// The namespaces of the `index`th controller: one per file, or with the null backend one
/// null disk of `size` each.
fn nvme_namespaces(
    index: usize,
    nvme: &NvmeConfig,
    faults: &Arc<Faults>,
) -> Result<Vec<NamespaceConfig>, BackendError> {
    let seed = (index as u64) << 16;
    let open_namespace = || {
        open(&nvme.backend, nvme.read_only)
            .map(|backend| Arc::new(backend.with_faults(faults.clone())))
    };
    match &nvme.backend {
        DiskBackendConfig::File { .. } => Ok(vec![NamespaceConfig::with_seed(
            open_namespace()?,
            seed + 1,
        )]),
        DiskBackendConfig::Null { .. } => (1..=u64::from(nvme.namespaces))
            .map(|nsid| {
                open_namespace().map(|backend| NamespaceConfig::with_seed(backend, seed + nsid))
            })
            .collect(),
    }
}

/// The controller `nvme` describes, the `index`th of the VM, over `namespaces`. Controllers
/// of one subsystem share the serial number of its first (`first_index`) and the NQN, have
/// controller ids 1, 2, ... and report ANA.
fn nvme_controller_config(
    index: usize,
    nvme: &NvmeConfig,
    namespaces: Vec<NamespaceConfig>,
) -> ControllerConfig {
    let first_index = index - nvme.subsystem.map_or(0, |m| usize::from(m.controller));
    let serial = nvme
        .serial
        .clone()
        .unwrap_or_else(|| format!("blkswarm-nvme-{first_index}"));
    let member = nvme.subsystem;
    ControllerConfig {
        max_queue_entries: nvme.queue_size,
        max_io_queue_pairs: nvme.max_io_queue_pairs,
        interrupt_vectors: nvme.msix_vectors,
        mdts: nvme.mdts,
        controller_id: member.map_or(0, |m| m.controller + 1),
        subsystem_nqn: member.map(|_| format!("nqn.2024-01.dev.blkswarm:subsys:{serial}")),
        multi_controller: member.is_some(),
        ana_reporting: member.is_some(),
        ana_transition_time_secs: nvme.ana_transition_time_secs,
        ana_groups: nvme.ana_groups,
        serial,
        namespaces,
        ..ControllerConfig::default()
    }
}

/// Creates every disk on `pci`. Linear in the number of disks: each is opened and placed once.
pub fn create_disks(
    disks: &[DiskConfig],
    nvmes: &[NvmeConfig],
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
    let mut measured = Vec::with_capacity(disks.len() + nvmes.len());
    for (index, disk) in disks.iter().enumerate() {
        let disk_faults = faults(disk.faults.as_deref(), index as u64);
        let backend = open_backend(disk, &disk_faults)
            .map_err(|source| DiskError::Backend { index, source })?;
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
        let queues = (0..)
            .zip(block.queue_latency())
            .map(|(queue, latency)| MeasuredQueue {
                name: format!("q{queue}"),
                latency: latency.clone(),
            })
            .collect();
        let function = pci
            .add_virtio(Box::new(block), disk.msix_vectors, disk.intx)
            .map_err(|source| DiskError::Pci { index, source })?;
        measured.push(MeasuredDisk {
            address: function.address,
            kind: DiskKind::VirtioBlk,
            queues,
            msix: lock(&function.transport).msix().cloned(),
            faults: disk_faults,
            nvme: None,
            subsystem_nqn: None,
        });
        functions.push(function);
    }
    let mut nvme_functions = Vec::with_capacity(nvmes.len());
    // The namespaces and faults of the subsystem being built, shared by its controllers.
    let mut subsystem: Option<(Vec<NamespaceConfig>, Arc<Faults>)> = None;
    for (index, nvme) in nvmes.iter().enumerate() {
        let joins_subsystem = nvme.subsystem.is_some_and(|m| m.controller > 0);
        let (namespaces, controller_faults) = match (&subsystem, joins_subsystem) {
            (Some(shared), true) => shared.clone(),
            _ => {
                let faults = faults(nvme.faults.as_deref(), (1 << 32) | index as u64);
                let namespaces = nvme_namespaces(index, nvme, &faults)
                    .map_err(|source| DiskError::NvmeBackend { index, source })?;
                (namespaces, faults)
            }
        };
        subsystem = nvme
            .subsystem
            .map(|_| (namespaces.clone(), controller_faults.clone()));
        let config = nvme_controller_config(index, nvme, namespaces);
        // Every controller, alone or not, has a subsystem: path events are measured on it.
        let subsystem_nqn = Some(config.subsystem_nqn());
        let function = pci
            .add_nvme(config, nvme.msix_vectors, pool.clone())
            .map_err(|source| DiskError::NvmePci { index, source })?;
        {
            let guard = lock(&function.function);
            measured.push(MeasuredDisk {
                address: function.address,
                kind: DiskKind::Nvme,
                queues: guard
                    .controller()
                    .io_queue_latency()
                    .map(|(sq, latency)| MeasuredQueue {
                        name: format!("sq{sq}"),
                        latency: latency.clone(),
                    })
                    .collect(),
                msix: Some(guard.msix().clone()),
                faults: controller_faults,
                nvme: Some(function.function.clone()),
                subsystem_nqn,
            });
        }
        nvme_functions.push(function);
    }
    let intx_resampler = pci
        .start_intx_resampler()
        .map_err(DiskError::IntxResampler)?;
    Ok(Disks {
        pool,
        functions,
        nvme_functions,
        intx_resampler,
        measured,
    })
}
