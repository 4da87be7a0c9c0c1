//! The VMM side of PCI segment 0: the root complex on the buses, BAR placement in the 64-bit
//! window, MSI-X vectors backed by KVM routes, INTx lines as level-triggered irqfds with
//! resamplefds (GSIs 16-23, the mapping the ACPI `_PRT` announces), and virtio notify
//! addresses as ioeventfds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::io::IoPool;
use devices::nvme::pci::{NvmeBarLayout, NvmePciError, NvmePciFunction};
use devices::nvme::ControllerConfig;
use devices::pci::root::{BarMove, MmioRange, PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use devices::pci::PciAddress;
use devices::virtio::pci::{Bar0Layout, VirtioPciDevice, NOTIFY_OFFSET, VIRTIO_PCI_BAR};
use devices::virtio::VirtioDevice;
use devices::Bus;
use irq::intx::{intx_gsi, IntxResamplerHandle};
use irq::{GsiRouter, IntxLine, IntxResampler, MsiVector};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI root: {0}")]
    Root(#[from] devices::pci::root::PciRootError),
    #[error("bus: {0}")]
    Bus(#[from] devices::BusError),
    #[error("the window of PCI bus {bus} ({size:#x} bytes) is full")]
    WindowFull { bus: u8, size: u64 },
    #[error("all {max} PCI root buses are full")]
    BusesFull { max: u64 },
    #[error("virtio-pci: {0}")]
    Transport(#[from] devices::virtio::pci::VirtioPciError),
    #[error("NVMe PCI function: {0}")]
    Nvme(#[from] NvmePciError),
    #[error("MSI-X vector: {0}")]
    Vector(std::io::Error),
    #[error("INTx line on GSI {gsi}: {source}")]
    Intx {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_IOEVENTFD at {address:#x}: {source}")]
    Ioeventfd {
        address: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A virtio function on the segment, kept by the VMM for its host-side view.
/// An NVMe controller's PCI function.
#[derive(Clone)]
pub struct NvmeFunction {
    pub address: PciAddress,
    pub function: Arc<Mutex<NvmePciFunction>>,
}

#[derive(Clone)]
pub struct VirtioFunction {
    pub address: PciAddress,
    pub transport: Arc<Mutex<VirtioPciDevice>>,
}

/// A function's ioeventfds, as offsets into its BAR 0, so they can follow a BAR move.
type NotifyMap = HashMap<PciAddress, Vec<(u64, Arc<EventFd>)>>;

/// Device numbers on bus 0 start after the host bridge (00:00.0).
const FIRST_DEVICE_ON_BUS_0: u8 = 1;
const DEVICES_PER_BUS: u8 = 32;

/// Root buses needed for `devices` functions: bus 0 holds 31 (after the host bridge), every
/// further bus 32. Always at least one.
pub fn root_buses_for(devices: usize) -> u8 {
    let on_bus_0 = usize::from(DEVICES_PER_BUS - FIRST_DEVICE_ON_BUS_0);
    let extra = devices
        .saturating_sub(on_bus_0)
        .div_ceil(usize::from(DEVICES_PER_BUS));
    (1 + extra).min(usize::from(u8::MAX)) as u8
}

fn bus_window_start(bus: u8) -> u64 {
    layout::PCI_MMIO64_START + u64::from(bus) * layout::PCI_BUS_WINDOW_BYTES
}

pub struct PciSegment {
    root: Arc<PciRoot>,
    vm: Arc<VmFd>,
    router: Arc<GsiRouter>,
    memory: GuestMemoryMmap,
    /// Where the next function goes: devices fill bus 0, then bus 1, and so on, each bus's
    /// BARs inside that bus's slice of the 64-bit window.
    next_slot: PciAddress,
    next_bar: u64,
    notifiers: Arc<Mutex<NotifyMap>>,
    /// Waits on the INTx lines' resamplefds once started; None until the first line.
    resampler: Option<IntxResampler>,
}

fn register_ioeventfd(vm: &VmFd, address: u64, event: &EventFd) -> Result<(), PciError> {
    vm.register_ioevent(event, &IoEventAddress::Mmio(address), NoDatamatch)
        .map_err(|source| PciError::Ioeventfd { address, source })
}

impl PciSegment {
    /// The root complex of segment 0, reachable through ECAM, ports 0xCF8-0xCFF and its BAR
    /// window.
    pub fn new(
        vm: Arc<VmFd>,
        router: Arc<GsiRouter>,
        memory: GuestMemoryMmap,
        pio: &mut Bus,
        mmio: &mut Bus,
    ) -> Result<Self, PciError> {
        let root = PciRoot::new(
            MmioRange {
                base: layout::PCI_ECAM_START,
                size: layout::PCI_ECAM_SIZE,
            },
            MmioRange {
                base: layout::PCI_MMIO64_START,
                size: layout::PCI_MMIO64_SIZE,
            },
        )?;
        mmio.insert(
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
            Arc::new(Mutex::new(root.ecam_device())),
        )?;
        mmio.insert(
            layout::PCI_MMIO64_START,
            layout::PCI_MMIO64_SIZE,
            Arc::new(Mutex::new(root.bar_window_device())),
        )?;
        pio.insert(
            CONFIG_ADDRESS_PORT,
            CONFIG_PORTS_LEN,
            Arc::new(Mutex::new(root.config_ports_device())),
        )?;

        let notifiers: Arc<Mutex<NotifyMap>> = Arc::default();
        let listener_vm = vm.clone();
        let listener_notifiers = notifiers.clone();
        // Linux keeps the BARs we assign; should a guest move one, its ioeventfds follow it.
        let _ = root.set_bar_move_listener(Box::new(move |moved: BarMove| {
            if moved.from.index != VIRTIO_PCI_BAR {
                return;
            }
            let map = listener_notifiers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(events) = map.get(&moved.function) else {
                return;
            };
            for (offset, event) in events {
                let _ = listener_vm.unregister_ioevent(
                    event,
                    &IoEventAddress::Mmio(moved.from.address + offset),
                    NoDatamatch,
                );
                if moved.routed {
                    let _ = register_ioeventfd(&listener_vm, moved.to.address + offset, event);
                }
            }
        }));
        Ok(Self {
            root,
            vm,
            router,
            memory,
            next_slot: PciAddress {
                bus: 0,
                device: FIRST_DEVICE_ON_BUS_0,
                function: 0,
            },
            next_bar: bus_window_start(0),
            notifiers,
            resampler: None,
        })
    }

    /// The next free slot, and a naturally aligned place for a BAR of `size` bytes (a power
    /// of two) in its bus's window.
    fn allocate(&mut self, size: u64) -> Result<(PciAddress, u64), PciError> {
        if self.next_slot.device == DEVICES_PER_BUS {
            let bus = self.next_slot.bus + 1;
            if u64::from(bus) >= layout::PCI_ROOT_BUSES_MAX {
                return Err(PciError::BusesFull {
                    max: layout::PCI_ROOT_BUSES_MAX,
                });
            }
            self.next_slot = PciAddress {
                bus,
                device: 0,
                function: 0,
            };
            self.next_bar = bus_window_start(bus);
        }
        let slot = self.next_slot;
        let address = self.next_bar.next_multiple_of(size);
        let window_end = bus_window_start(slot.bus) + layout::PCI_BUS_WINDOW_BYTES;
        if address.checked_add(size).is_none_or(|end| end > window_end) {
            return Err(PciError::WindowFull {
                bus: slot.bus,
                size: layout::PCI_BUS_WINDOW_BYTES,
            });
        }
        self.next_bar = address + size;
        self.next_slot.device += 1;
        Ok((slot, address))
    }

    /// Starts the thread that re-asserts INTx lines at EOI, if any function has one. Call
    /// once, after the last function is added.
    pub fn start_intx_resampler(&mut self) -> Result<Option<IntxResamplerHandle>, PciError> {
        let Some(resampler) = self.resampler.take() else {
            return Ok(None);
        };
        resampler
            .spawn()
            .map(Some)
            .map_err(|source| PciError::Intx { gsi: 0, source })
    }

    /// A level-triggered line for the function at `slot`, bound to its GSI and watched by the
    /// resampler.
    fn intx_line(&mut self, slot: PciAddress) -> Result<Arc<IntxLine>, PciError> {
        let gsi = intx_gsi(slot.bus, slot.device);
        let error = |source| PciError::Intx { gsi, source };
        let line = IntxLine::new(gsi).map_err(error)?;
        line.attach(self.vm.as_ref()).map_err(error)?;
        let resampler = match &mut self.resampler {
            Some(resampler) => resampler,
            None => self.resampler.insert(IntxResampler::new().map_err(error)?),
        };
        resampler.add(line.clone()).map_err(error)?;
        Ok(line)
    }

    /// Adds a virtio device with `vectors` MSI-X vectors (0: no MSI-X capability) and, with
    /// `intx`, an INTA line, behind a virtio-pci transport, in the order [`root_buses_for`]
    /// assumes.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        vectors: u16,
        intx: bool,
    ) -> Result<VirtioFunction, PciError> {
        let layout = Bar0Layout::new(device.num_queues(), vectors);
        let (slot, bar0) = self.allocate(layout.size)?;
        let msix_vectors = (0..vectors)
            .map(|_| {
                self.router
                    .new_vector()
                    .map(|v| Arc::new(v) as Arc<dyn MsiVector>)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(PciError::Vector)?;
        let intx = if intx {
            Some(self.intx_line(slot)?)
        } else {
            None
        };
        let transport =
            VirtioPciDevice::with_intx(device, self.memory.clone(), msix_vectors, intx, bar0)?;
        // Ioeventfds are registered before the guest runs: each one copies KVM's I/O bus.
        let mut events = Vec::new();
        for (address, event) in transport.notify_addresses() {
            register_ioeventfd(&self.vm, address, &event)?;
            events.push((address - bar0, event));
        }
        debug_assert!(events.iter().all(|(offset, _)| *offset >= NOTIFY_OFFSET));
        let transport = Arc::new(Mutex::new(transport));
        let address = slot;
        self.root.add_device_at(address, transport.clone())?;
        self.notifiers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address, events);
        Ok(VirtioFunction { address, transport })
    }

    /// Adds an NVMe controller configured as `config` with `vectors` MSI-X vectors, its I/O
    /// queues served by `pool`, in the order [`root_buses_for`] assumes.
    pub fn add_nvme(
        &mut self,
        mut config: ControllerConfig,
        vectors: u16,
        pool: Arc<IoPool>,
    ) -> Result<NvmeFunction, PciError> {
        config.interrupt_vectors = vectors;
        let layout = NvmeBarLayout::for_config(&config);
        let (address, bar0) = self.allocate(layout.size)?;
        let msix_vectors = (0..vectors)
            .map(|_| {
                self.router
                    .new_vector()
                    .map(|v| Arc::new(v) as Arc<dyn MsiVector>)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(PciError::Vector)?;
        let function = NvmePciFunction::new(config, self.memory.clone(), pool, msix_vectors, bar0)?;
        let function = Arc::new(Mutex::new(function));
        self.root.add_device_at(address, function.clone())?;
        Ok(NvmeFunction { address, function })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_buses_fill_bus_0_after_the_host_bridge() {
        assert_eq!(root_buses_for(0), 1);
        assert_eq!(root_buses_for(31), 1);
        assert_eq!(root_buses_for(32), 2);
        assert_eq!(root_buses_for(63), 2);
        assert_eq!(root_buses_for(64), 3);
        assert_eq!(root_buses_for(500), 16);
        assert_eq!(root_buses_for(1000), 32);
    }

    #[test]
    fn bus_windows_are_disjoint_slices_of_the_64_bit_window() {
        assert_eq!(bus_window_start(0), layout::PCI_MMIO64_START);
        assert_eq!(
            bus_window_start((layout::PCI_ROOT_BUSES_MAX - 1) as u8) + layout::PCI_BUS_WINDOW_BYTES,
            layout::PCI_MMIO64_START + layout::PCI_MMIO64_SIZE
        );
    }
}
