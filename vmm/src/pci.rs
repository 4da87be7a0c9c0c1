//! The VMM side of PCI segment 0: the root complex on the buses, BAR placement in the 64-bit
//! window, MSI-X vectors backed by KVM routes, and virtio notify addresses as ioeventfds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::root::{BarMove, MmioRange, PciRoot, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use devices::pci::PciAddress;
use devices::virtio::pci::{Bar0Layout, VirtioPciDevice, NOTIFY_OFFSET, VIRTIO_PCI_BAR};
use devices::virtio::VirtioDevice;
use devices::Bus;
use irq::{GsiRouter, MsiVector};
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
    #[error("the 64-bit PCI window ({size:#x} bytes) is full")]
    WindowFull { size: u64 },
    #[error("virtio-pci: {0}")]
    Transport(#[from] devices::virtio::pci::VirtioPciError),
    #[error("MSI-X vector: {0}")]
    Vector(std::io::Error),
    #[error("KVM_IOEVENTFD at {address:#x}: {source}")]
    Ioeventfd {
        address: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A function's ioeventfds, as offsets into its BAR 0, so they can follow a BAR move.
type NotifyMap = HashMap<PciAddress, Vec<(u64, Arc<EventFd>)>>;

pub struct PciSegment {
    root: Arc<PciRoot>,
    vm: Arc<VmFd>,
    router: Arc<GsiRouter>,
    memory: GuestMemoryMmap,
    next_bar: u64,
    notifiers: Arc<Mutex<NotifyMap>>,
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
            next_bar: layout::PCI_MMIO64_START,
            notifiers,
        })
    }

    /// Places a BAR of `size` bytes (a power of two), naturally aligned.
    fn allocate_bar(&mut self, size: u64) -> Result<u64, PciError> {
        let address = self.next_bar.next_multiple_of(size);
        let end = layout::PCI_MMIO64_START + layout::PCI_MMIO64_SIZE;
        if address.checked_add(size).is_none_or(|e| e > end) {
            return Err(PciError::WindowFull {
                size: layout::PCI_MMIO64_SIZE,
            });
        }
        self.next_bar = address + size;
        Ok(address)
    }

    /// Adds a virtio device with `vectors` MSI-X vectors behind a virtio-pci transport.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        vectors: u16,
    ) -> Result<PciAddress, PciError> {
        let layout = Bar0Layout::new(device.num_queues(), vectors);
        let bar0 = self.allocate_bar(layout.size)?;
        let msix_vectors = (0..vectors)
            .map(|_| {
                self.router
                    .new_vector()
                    .map(|v| Arc::new(v) as Arc<dyn MsiVector>)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(PciError::Vector)?;
        let transport = VirtioPciDevice::new(device, self.memory.clone(), msix_vectors, bar0)?;
        // Ioeventfds are registered before the guest runs: each one copies KVM's I/O bus.
        let mut events = Vec::new();
        for (address, event) in transport.notify_addresses() {
            register_ioeventfd(&self.vm, address, &event)?;
            events.push((address - bar0, event));
        }
        debug_assert!(events.iter().all(|(offset, _)| *offset >= NOTIFY_OFFSET));
        let address = self.root.add_device(Arc::new(Mutex::new(transport)))?;
        self.notifiers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address, events);
        Ok(address)
    }
}
