//! The root complex of PCI segment 0: a host bridge at 00:00.0, the functions on its buses,
//! configuration access through ECAM and through ports 0xCF8/0xCFC, and the routing of MMIO
//! accesses in the BAR window to the function whose BAR decodes them.
//!
//! Functions are keyed by [`PciAddress`], so more buses (behind bridges or as more root buses)
//! are a matter of inserting at other addresses. The BAR map is a sorted tree of
//! non-overlapping ranges: lookups are O(log n) with hundreds of functions, and a guest
//! moving a BAR updates it on the config write that moved it.
//!
//! Locking: the function table and BAR map sit behind one `RwLock` taken briefly for lookups;
//! each function has its own mutex, never held while the table lock is taken, so accesses to
//! different functions only share the read lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::config::{PciConfigSpace, PciIds};
use super::{BarRegion, PciAddress, PciDevice};
use crate::BusDevice;

/// Host bridge identity: the ids Cloud Hypervisor uses, which Linux binds no driver to.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Class: bridge, host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;
/// Device numbers per bus (5 bits) and functions per device (3 bits).
pub const PCI_DEVICES_PER_BUS: u8 = 32;
pub const PCI_FUNCTIONS_PER_DEVICE: u8 = 8;
/// ECAM gives each bus 1 MiB: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
pub const ECAM_MAX_BUSES: u64 = 256;
/// Legacy configuration mechanism #1: address register at 0xCF8, data at 0xCFC-0xCFF.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// Ports the [`PciConfigPorts`] device decodes, starting at [`CONFIG_ADDRESS_PORT`].
pub const CONFIG_PORTS_LEN: u64 = 8;

/// CONFIG_ADDRESS: bit 31 enables the data port; bits 30:24 are reserved; bits 1:0 are zero.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_WRITABLE: u32 = 0x80ff_fffc;
const CONFIG_DATA_OFFSET: u64 = 4;

/// A function shared between the root complex and the VMM (which may keep it for reports).
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A guest-physical MMIO range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioRange {
    pub base: u64,
    pub size: u64,
}

impl MmioRange {
    fn contains(&self, address: u64, size: u64) -> bool {
        let end = address.checked_add(size);
        let window_end = self.base.checked_add(self.size);
        address >= self.base && matches!((end, window_end), (Some(e), Some(w)) if e <= w)
    }
}

/// A guest moved a BAR: the VMM moves what it registered at the old address (ioeventfds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub function: PciAddress,
    /// Where the BAR was before this write.
    pub from: BarRegion,
    pub to: BarRegion,
    /// Whether the root routes MMIO to the new place: false while it lies outside the BAR
    /// window or overlaps another BAR (typically mid-sizing, with all-ones written).
    pub routed: bool,
}

pub type BarMoveListener = Box<dyn Fn(BarMove) + Send + Sync>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error(
        "ECAM range {base:#x}+{size:#x} is not a whole number of buses (1 MiB each, at most 256)"
    )]
    BadEcamRange { base: u64, size: u64 },
    #[error("BAR window {base:#x}+{size:#x} is empty or wraps")]
    BadBarWindow { base: u64, size: u64 },
    #[error("no free device number on bus 0")]
    BusFull,
    #[error("{0:?} is not an address this segment decodes")]
    BadAddress(PciAddress),
    #[error("{0:?} is already in use")]
    AddressInUse(PciAddress),
    #[error("BAR {index} of {function:?} at {address:#x}+{size:#x} is outside the BAR window or overlaps another BAR")]
    BarPlacement {
        function: PciAddress,
        index: u8,
        address: u64,
        size: u64,
    },
}

/// Counters of guest accesses that reached nothing, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciRootCounters {
    /// Config accesses to absent functions (the read-as-all-ones probe of bus scans).
    pub absent_function_accesses: u64,
    /// BAR window accesses no BAR decodes.
    pub unrouted_bar_accesses: u64,
    /// BAR moves the root could not route (outside the window or overlapping).
    pub unrouted_bar_moves: u64,
    /// Port accesses of the wrong size, or data accesses with the enable bit clear.
    pub ignored_port_accesses: u64,
}

#[derive(Clone)]
struct RoutedBar {
    function: PciAddress,
    index: u8,
    size: u64,
    device: SharedPciDevice,
}

#[derive(Default)]
struct Topology {
    functions: BTreeMap<PciAddress, SharedPciDevice>,
    /// Where every BAR of every function currently is, routed or not.
    placements: BTreeMap<(PciAddress, u8), BarRegion>,
    /// Routed BARs by base address; never overlapping.
    routes: BTreeMap<u64, RoutedBar>,
}

impl Topology {
    /// The routed BAR containing `[address, address + len)`, and the offset into it.
    fn route(&self, address: u64, len: u64) -> Option<(&RoutedBar, u64)> {
        let (base, bar) = self.routes.range(..=address).next_back()?;
        let offset = address - base;
        let fits = offset.checked_add(len).is_some_and(|end| end <= bar.size);
        fits.then_some((bar, offset))
    }

    fn overlaps_route(&self, region: &BarRegion) -> bool {
        let Some(end) = region.address.checked_add(region.size) else {
            return true;
        };
        // Routes do not overlap, so the last one starting before `end` ends last among them.
        self.routes
            .range(..end)
            .next_back()
            .is_some_and(|(base, bar)| base + bar.size > region.address)
    }

    fn unroute(&mut self, function: PciAddress, region: &BarRegion) {
        let ours = self
            .routes
            .get(&region.address)
            .is_some_and(|bar| bar.function == function && bar.index == region.index);
        if ours {
            self.routes.remove(&region.address);
        }
    }
}

/// The root complex of segment 0. Share it as an `Arc`; the bus devices from
/// [`PciRoot::ecam_device`], [`PciRoot::config_ports_device`] and [`PciRoot::bar_window_device`]
/// are what the VMM inserts into its MMIO and port buses.
pub struct PciRoot {
    ecam: MmioRange,
    bar_window: MmioRange,
    topology: RwLock<Topology>,
    bar_move_listener: OnceLock<BarMoveListener>,
    absent_function_accesses: AtomicU64,
    unrouted_bar_accesses: AtomicU64,
    unrouted_bar_moves: AtomicU64,
    ignored_port_accesses: AtomicU64,
}

impl PciRoot {
    /// A segment whose configuration space is at `ecam` (1 MiB per bus, starting with bus 0)
    /// and whose BARs live in `bar_window`, with the host bridge at 00:00.0.
    pub fn new(ecam: MmioRange, bar_window: MmioRange) -> Result<Arc<Self>, PciRootError> {
        let buses = ecam.size / ECAM_BUS_SIZE;
        if !ecam.size.is_multiple_of(ECAM_BUS_SIZE)
            || !(1..=ECAM_MAX_BUSES).contains(&buses)
            || ecam.base.checked_add(ecam.size).is_none()
        {
            return Err(PciRootError::BadEcamRange {
                base: ecam.base,
                size: ecam.size,
            });
        }
        if bar_window.size == 0 || bar_window.base.checked_add(bar_window.size).is_none() {
            return Err(PciRootError::BadBarWindow {
                base: bar_window.base,
                size: bar_window.size,
            });
        }
        let root = Arc::new(Self {
            ecam,
            bar_window,
            topology: RwLock::default(),
            bar_move_listener: OnceLock::new(),
            absent_function_accesses: AtomicU64::new(0),
            unrouted_bar_accesses: AtomicU64::new(0),
            unrouted_bar_moves: AtomicU64::new(0),
            ignored_port_accesses: AtomicU64::new(0),
        });
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        root.add_device_at(HOST_BRIDGE_ADDRESS, host_bridge)?;
        Ok(root)
    }

    pub fn ecam_range(&self) -> MmioRange {
        self.ecam
    }

    pub fn bar_window(&self) -> MmioRange {
        self.bar_window
    }

    /// Number of buses the ECAM range covers.
    pub fn bus_count(&self) -> u64 {
        self.ecam.size / ECAM_BUS_SIZE
    }

    /// Plugs `device` into the first free device number on bus 0 (function 0).
    pub fn add_device(&self, device: SharedPciDevice) -> Result<PciAddress, PciRootError> {
        let free = {
            let topology = self.read_topology();
            (1..PCI_DEVICES_PER_BUS)
                .map(|device| PciAddress {
                    bus: 0,
                    device,
                    function: 0,
                })
                .find(|address| !topology.functions.contains_key(address))
        };
        let address = free.ok_or(PciRootError::BusFull)?;
        self.add_device_at(address, device)?;
        Ok(address)
    }

    /// Plugs `device` in at `address`. Its BARs must lie in the BAR window without overlapping
    /// any other BAR.
    pub fn add_device_at(
        &self,
        address: PciAddress,
        device: SharedPciDevice,
    ) -> Result<(), PciRootError> {
        if address.device >= PCI_DEVICES_PER_BUS
            || address.function >= PCI_FUNCTIONS_PER_DEVICE
            || u64::from(address.bus) >= self.bus_count()
        {
            return Err(PciRootError::BadAddress(address));
        }
        let bars = lock_device(&device).bars();
        let mut topology = self.write_topology();
        if topology.functions.contains_key(&address) {
            return Err(PciRootError::AddressInUse(address));
        }
        // Check every BAR against the map and against each other before changing anything.
        let mut added: Vec<u64> = Vec::with_capacity(bars.len());
        for bar in &bars {
            let fits = self.bar_window.contains(bar.address, bar.size);
            if !fits || topology.overlaps_route(bar) {
                for base in added {
                    topology.routes.remove(&base);
                }
                return Err(PciRootError::BarPlacement {
                    function: address,
                    index: bar.index,
                    address: bar.address,
                    size: bar.size,
                });
            }
            topology.routes.insert(
                bar.address,
                RoutedBar {
                    function: address,
                    index: bar.index,
                    size: bar.size,
                    device: device.clone(),
                },
            );
            added.push(bar.address);
        }
        for bar in bars {
            topology.placements.insert((address, bar.index), bar);
        }
        topology.functions.insert(address, device);
        Ok(())
    }

    /// The function at `address`, if present.
    pub fn device(&self, address: PciAddress) -> Option<SharedPciDevice> {
        self.read_topology().functions.get(&address).cloned()
    }

    /// Addresses of all present functions, host bridge included.
    pub fn addresses(&self) -> Vec<PciAddress> {
        self.read_topology().functions.keys().copied().collect()
    }

    /// Called after every BAR move a guest makes, with no lock of the root held. Set it once,
    /// before the guest runs; later calls return the listener back.
    pub fn set_bar_move_listener(&self, listener: BarMoveListener) -> Result<(), BarMoveListener> {
        self.bar_move_listener.set(listener)
    }

    pub fn counters(&self) -> PciRootCounters {
        PciRootCounters {
            absent_function_accesses: self.absent_function_accesses.load(Ordering::Relaxed),
            unrouted_bar_accesses: self.unrouted_bar_accesses.load(Ordering::Relaxed),
            unrouted_bar_moves: self.unrouted_bar_moves.load(Ordering::Relaxed),
            ignored_port_accesses: self.ignored_port_accesses.load(Ordering::Relaxed),
        }
    }

    /// A configuration read of function `address`; absent functions read as all-ones.
    pub fn config_read(&self, address: PciAddress, offset: u16, data: &mut [u8]) {
        match self.device(address) {
            Some(device) => lock_device(&device).config_read(offset, data),
            None => {
                self.absent_function_accesses
                    .fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// A configuration write to function `address`; moves the BAR route if the write moved a
    /// BAR.
    pub fn config_write(&self, address: PciAddress, offset: u16, data: &[u8]) {
        let Some(device) = self.device(address) else {
            self.absent_function_accesses
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let moved = lock_device(&device).config_write(offset, data);
        if let Some(to) = moved {
            self.move_bar(address, device, to);
        }
    }

    /// An MMIO read at guest-physical `address` inside the BAR window.
    pub fn bar_read(&self, address: u64, data: &mut [u8]) {
        match self.route(address, data.len()) {
            Some((device, index, offset)) => lock_device(&device).bar_read(index, offset, data),
            None => data.fill(0xff),
        }
    }

    /// An MMIO write at guest-physical `address` inside the BAR window.
    pub fn bar_write(&self, address: u64, data: &[u8]) {
        if let Some((device, index, offset)) = self.route(address, data.len()) {
            lock_device(&device).bar_write(index, offset, data);
        }
    }

    /// Bus device for the ECAM range; insert it at [`PciRoot::ecam_range`].
    pub fn ecam_device(self: &Arc<Self>) -> PciEcam {
        PciEcam { root: self.clone() }
    }

    /// Bus device for ports 0xCF8-0xCFF; insert it at [`CONFIG_ADDRESS_PORT`] with
    /// [`CONFIG_PORTS_LEN`] ports.
    pub fn config_ports_device(self: &Arc<Self>) -> PciConfigPorts {
        PciConfigPorts {
            root: self.clone(),
            address: 0,
        }
    }

    /// Bus device for the BAR window; insert it at [`PciRoot::bar_window`].
    pub fn bar_window_device(self: &Arc<Self>) -> PciBarWindow {
        PciBarWindow { root: self.clone() }
    }

    fn route(&self, address: u64, len: usize) -> Option<(SharedPciDevice, u8, u64)> {
        let found = self
            .read_topology()
            .route(address, len as u64)
            .map(|(bar, offset)| (bar.device.clone(), bar.index, offset));
        if found.is_none() {
            self.unrouted_bar_accesses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn move_bar(&self, function: PciAddress, device: SharedPciDevice, to: BarRegion) {
        let (from, routed) = {
            let mut topology = self.write_topology();
            let from = topology
                .placements
                .insert((function, to.index), to)
                .unwrap_or(to);
            topology.unroute(function, &from);
            let routed =
                self.bar_window.contains(to.address, to.size) && !topology.overlaps_route(&to);
            if routed {
                topology.routes.insert(
                    to.address,
                    RoutedBar {
                        function,
                        index: to.index,
                        size: to.size,
                        device,
                    },
                );
            }
            (from, routed)
        };
        if !routed {
            self.unrouted_bar_moves.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(listener) = self.bar_move_listener.get() {
            listener(BarMove {
                function,
                from,
                to,
                routed,
            });
        }
    }

    // The topology is only changed by whole-value inserts and removes, so a poisoned lock
    // still guards a consistent map.
    fn read_topology(&self) -> RwLockReadGuard<'_, Topology> {
        self.topology.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_topology(&self) -> RwLockWriteGuard<'_, Topology> {
        self.topology.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Device models validate guest input before changing state, so a function whose lock was
/// poisoned by a panicking thread is still consistent enough to serve.
fn lock_device(device: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Splits an ECAM offset into the function address and register: bus << 20 | device << 15 |
/// function << 12 | register.
fn decode_ecam_offset(offset: u64) -> Option<(PciAddress, u16)> {
    let address = PciAddress {
        bus: u8::try_from(offset >> 20).ok()?,
        device: ((offset >> 15) & 0x1f) as u8,
        function: ((offset >> 12) & 0x7) as u8,
    };
    Some((address, (offset & 0xfff) as u16))
}

/// ECAM: configuration space mapped into MMIO, 4 KiB per function.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match decode_ecam_offset(offset) {
            Some((address, register)) => self.root.config_read(address, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((address, register)) = decode_ecam_offset(offset) {
            self.root.config_write(address, register, data);
        }
    }
}

/// Configuration mechanism #1: ports 0xCF8 (address, dword accesses only) and 0xCFC-0xCFF
/// (data, any access within the dword). It reaches the 256-byte conventional space only.
pub struct PciConfigPorts {
    root: Arc<PciRoot>,
    /// The CONFIG_ADDRESS register.
    address: u32,
}

impl PciConfigPorts {
    /// The function and register a data port access of `len` bytes at port offset `offset`
    /// reaches, if the address register enables one and the access stays in the dword.
    fn target(&self, offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        let byte = offset.checked_sub(CONFIG_DATA_OFFSET)?;
        let fits = byte + len as u64 <= 4 && matches!(len, 1 | 2 | 4);
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || !fits {
            return None;
        }
        let function = PciAddress {
            bus: (self.address >> 16) as u8,
            device: ((self.address >> 11) & 0x1f) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        Some((function, (self.address & 0xfc) as u16 + byte as u16))
    }

    fn ignored(&self) {
        self.root
            .ignored_port_accesses
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl BusDevice for PciConfigPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if let Some((function, register)) = self.target(offset, data.len()) {
            self.root.config_read(function, register, data);
        } else {
            self.ignored();
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            match <[u8; 4]>::try_from(data) {
                Ok(bytes) => self.address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_WRITABLE,
                Err(_) => self.ignored(),
            }
        } else if let Some((function, register)) = self.target(offset, data.len()) {
            self.root.config_write(function, register, data);
        } else {
            self.ignored();
        }
    }
}

/// The BAR window: MMIO accesses routed to the function whose BAR decodes them.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
}

impl BusDevice for PciBarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.root.bar_window.base.checked_add(offset) {
            Some(address) => self.root.bar_read(address, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(address) = self.root.bar_window.base.checked_add(offset) {
            self.root.bar_write(address, data);
        }
    }
}

pub const HOST_BRIDGE_ADDRESS: PciAddress = PciAddress {
    bus: 0,
    device: 0,
    function: 0,
};

/// The host bridge at 00:00.0: a header and nothing else.
pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfigSpace::new(PciIds {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class_code: HOST_BRIDGE_CLASS,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion> {
        self.config.write(offset, data)
    }

    fn bars(&self) -> Vec<BarRegion> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECAM: MmioRange = MmioRange {
        base: 0xe000_0000,
        size: 16 * ECAM_BUS_SIZE,
    };
    const WINDOW: MmioRange = MmioRange {
        base: 0x40_0000_0000,
        size: 0x10_0000_0000,
    };
    const BAR_SIZE: u64 = 0x4000;

    /// A function with one 64-bit BAR that records the BAR accesses reaching it.
    struct FakeFunction {
        config: PciConfigSpace,
        accesses: Vec<(u8, u64, usize)>,
        fill: u8,
    }

    impl FakeFunction {
        fn shared(device_id: u16, bar_address: u64) -> Arc<Mutex<FakeFunction>> {
            let mut config = PciConfigSpace::new(PciIds {
                vendor_id: 0x1af4,
                device_id,
                revision_id: 1,
                class_code: 0x01_80_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            config
                .add_memory_bar64(0, bar_address, BAR_SIZE, false)
                .unwrap();
            Arc::new(Mutex::new(FakeFunction {
                config,
                accesses: Vec::new(),
                fill: device_id as u8,
            }))
        }
    }

    impl PciDevice for FakeFunction {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion> {
            self.config.write(offset, data)
        }
        fn bars(&self) -> Vec<BarRegion> {
            self.config.bars()
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            self.accesses.push((bar, offset, data.len()));
            data.fill(self.fill);
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.accesses.push((bar, offset, data.len()));
        }
    }

    fn ecam_offset(address: PciAddress, register: u64) -> u64 {
        u64::from(address.bus) << 20
            | u64::from(address.device) << 15
            | u64::from(address.function) << 12
            | register
    }

    fn ecam_read32(ecam: &mut PciEcam, address: PciAddress, register: u64) -> u32 {
        let mut bytes = [0u8; 4];
        ecam.read(ecam_offset(address, register), &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn config_address(address: PciAddress, register: u8) -> u32 {
        CONFIG_ADDRESS_ENABLE
            | u32::from(address.bus) << 16
            | u32::from(address.device) << 11
            | u32::from(address.function) << 8
            | u32::from(register & 0xfc)
    }

    fn port_read32(ports: &mut PciConfigPorts, address: PciAddress, register: u8) -> u32 {
        ports.write(0, &config_address(address, register).to_le_bytes());
        let mut bytes = [0u8; 4];
        ports.read(4, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn port_write32(ports: &mut PciConfigPorts, address: PciAddress, register: u8, value: u32) {
        ports.write(0, &config_address(address, register).to_le_bytes());
        ports.write(4, &value.to_le_bytes());
    }

    fn slot(device: u8) -> PciAddress {
        PciAddress {
            bus: 0,
            device,
            function: 0,
        }
    }

    #[test]
    fn validates_ranges() {
        let bad_ecam = MmioRange {
            base: 0xe000_0000,
            size: 0x1234,
        };
        assert!(matches!(
            PciRoot::new(bad_ecam, WINDOW),
            Err(PciRootError::BadEcamRange { .. })
        ));
        let too_big = MmioRange {
            base: 0,
            size: 257 * ECAM_BUS_SIZE,
        };
        assert!(PciRoot::new(too_big, WINDOW).is_err());
        let empty = MmioRange { base: 0, size: 0 };
        assert!(matches!(
            PciRoot::new(ECAM, empty),
            Err(PciRootError::BadBarWindow { .. })
        ));
    }

    #[test]
    fn ecam_and_ports_reach_the_same_config_space() {
        let root = PciRoot::new(ECAM, WINDOW).unwrap();
        let mut ecam = root.ecam_device();
        let mut ports = root.config_ports_device();
        let address = root
            .add_device(FakeFunction::shared(0x1042, WINDOW.base))
            .unwrap();
        assert_eq!(address, slot(1));

        assert_eq!(ecam_read32(&mut ecam, HOST_BRIDGE_ADDRESS, 0), 0x0d57_8086);
        assert_eq!(
            ecam_read32(&mut ecam, HOST_BRIDGE_ADDRESS, 8) >> 8,
            0x06_00_00
        );
        assert_eq!(port_read32(&mut ports, HOST_BRIDGE_ADDRESS, 0), 0x0d57_8086);
        assert_eq!(ecam_read32(&mut ecam, address, 0), 0x1042_1af4);
        assert_eq!(port_read32(&mut ports, address, 0), 0x1042_1af4);

        // Written through the ports, read through ECAM, and the other way round.
        port_write32(&mut ports, address, 0x3c, 0x0000_000b);
        assert_eq!(ecam_read32(&mut ecam, address, 0x3c) & 0xff, 0x0b);
        ecam.write(ecam_offset(address, 0x04), &0x0006u16.to_le_bytes());
        assert_eq!(port_read32(&mut ports, address, 0x04) & 0xffff, 0x0006);

        // Data port accesses smaller than a dword, at their byte offset in it.
        ports.write(0, &config_address(address, 0).to_le_bytes());
        let mut word = [0u8; 2];
        ports.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1042);
        let mut byte = [0u8];
        ports.read(5, &mut byte);
        assert_eq!(byte, [0x1a]);
        ports.read(7, &mut word);
        assert_eq!(word, [0xff; 2], "straddles the dword");
        let mut readback = [0u8; 4];
        ports.read(0, &mut readback);
        assert_eq!(u32::from_le_bytes(readback), config_address(address, 0));
    }

    #[test]
    fn absent_functions_and_disabled_ports_read_all_ones() {
        let root = PciRoot::new(ECAM, WINDOW).unwrap();
        let mut ecam = root.ecam_device();
        let mut ports = root.config_ports_device();
        assert_eq!(ecam_read32(&mut ecam, slot(5), 0), 0xffff_ffff);
        let function_1 = PciAddress {
            bus: 0,
            device: 0,
            function: 1,
        };
        assert_eq!(ecam_read32(&mut ecam, function_1, 0), 0xffff_ffff);
        assert_eq!(port_read32(&mut ports, slot(31), 0), 0xffff_ffff);
        ecam.write(ecam_offset(slot(5), 0x04), &[0xff; 4]);

        // Enable bit clear: the data port answers nothing.
        ports.write(0, &0x0000_0000u32.to_le_bytes());
        let mut bytes = [0u8; 4];
        ports.read(4, &mut bytes);
        assert_eq!(bytes, [0xff; 4]);
        // Only dword accesses reach the address register.
        ports.write(0, &[0x80]);
        ports.write(1, &[0x80]);
        ports.read(0, &mut bytes[..2]);
        assert_eq!(bytes[..2], [0xff; 2]);
        let counters = root.counters();
        assert_eq!(counters.absent_function_accesses, 4);
        assert_eq!(counters.ignored_port_accesses, 4);
    }

    #[test]
    fn slot_allocation_and_placement_errors() {
        let root = PciRoot::new(ECAM, WINDOW).unwrap();
        for device in 1..PCI_DEVICES_PER_BUS {
            let bar = WINDOW.base + u64::from(device) * BAR_SIZE;
            let address = root.add_device(FakeFunction::shared(0x1000, bar)).unwrap();
            assert_eq!(address, slot(device));
        }
        assert_eq!(
            root.add_device(FakeFunction::shared(0x1000, WINDOW.base + 0x100_0000)),
            Err(PciRootError::BusFull)
        );
        let bus1 = PciAddress {
            bus: 1,
            device: 0,
            function: 0,
        };
        assert!(matches!(
            root.add_device_at(bus1, FakeFunction::shared(0x1000, WINDOW.base + BAR_SIZE)),
            Err(PciRootError::BarPlacement { .. })
        ));
        assert!(matches!(
            root.add_device_at(bus1, FakeFunction::shared(0x1000, 0x1000_0000)),
            Err(PciRootError::BarPlacement { .. })
        ));
        let bus16 = PciAddress {
            bus: 16,
            device: 0,
            function: 0,
        };
        assert_eq!(
            root.add_device_at(bus16, FakeFunction::shared(0x1000, WINDOW.base)),
            Err(PciRootError::BadAddress(bus16))
        );
        assert_eq!(
            root.add_device_at(
                HOST_BRIDGE_ADDRESS,
                FakeFunction::shared(0x1000, WINDOW.base)
            ),
            Err(PciRootError::AddressInUse(HOST_BRIDGE_ADDRESS))
        );
        root.add_device_at(bus1, FakeFunction::shared(0x1000, WINDOW.base + 0x100_0000))
            .unwrap();
        assert_eq!(root.addresses().len(), 33);
    }

    #[test]
    fn bar_window_routes_to_the_right_function_and_follows_moves() {
        let root = PciRoot::new(ECAM, WINDOW).unwrap();
        let mut ecam = root.ecam_device();
        let mut ports = root.config_ports_device();
        let mut window = root.bar_window_device();
        let moves = Arc::new(Mutex::new(Vec::new()));
        let recorded = moves.clone();
        assert!(root
            .set_bar_move_listener(Box::new(move |m| recorded.lock().unwrap().push(m)))
            .is_ok());

        let first = FakeFunction::shared(0x11, WINDOW.base);
        let second = FakeFunction::shared(0x22, WINDOW.base + BAR_SIZE);
        let first_address = root.add_device(first.clone()).unwrap();
        let second_address = root.add_device(second.clone()).unwrap();

        let mut dword = [0u8; 4];
        window.read(0x10, &mut dword);
        assert_eq!(dword, [0x11; 4]);
        window.write(BAR_SIZE + 0x3ffc, &[0; 4]);
        window.read(BAR_SIZE - 2, &mut dword);
        assert_eq!(dword, [0xff; 4], "straddles two BARs");
        window.read(2 * BAR_SIZE, &mut dword);
        assert_eq!(dword, [0xff; 4], "no BAR there");
        assert_eq!(first.lock().unwrap().accesses, vec![(0, 0x10, 4)]);
        assert_eq!(second.lock().unwrap().accesses, vec![(0, 0x3ffc, 4)]);

        // Linux-style sizing through the ports: the BAR passes through unroutable places.
        port_write32(&mut ports, second_address, 0x10, 0xffff_ffff);
        port_write32(&mut ports, second_address, 0x14, 0xffff_ffff);
        port_write32(&mut ports, second_address, 0x10, BAR_SIZE as u32);
        port_write32(&mut ports, second_address, 0x14, (WINDOW.base >> 32) as u32);
        let routed: Vec<bool> = moves.lock().unwrap().iter().map(|m| m.routed).collect();
        assert_eq!(routed, vec![true, false, false, true]);
        let last = *moves.lock().unwrap().last().unwrap();
        assert_eq!(last.from.address, 0xffff_ffff_0000_4000);
        assert_eq!(last.to.address, WINDOW.base + BAR_SIZE);
        window.read(BAR_SIZE + 8, &mut dword);
        assert_eq!(dword, [0x22; 4], "routed again after the restore");

        // The guest moves the first function's BAR high up, via ECAM (high dword then low).
        let new_base = WINDOW.base + 0x8_0000_0000;
        ecam.write(
            ecam_offset(first_address, 0x14),
            &((new_base >> 32) as u32).to_le_bytes(),
        );
        ecam.write(
            ecam_offset(first_address, 0x10),
            &(new_base as u32).to_le_bytes(),
        );
        let last = *moves.lock().unwrap().last().unwrap();
        assert_eq!(last.function, first_address);
        assert_eq!(last.to.address, new_base);
        assert!(last.routed);
        window.read(0x10, &mut dword);
        assert_eq!(dword, [0xff; 4], "old place no longer routes");
        first.lock().unwrap().accesses.clear();
        window.read(new_base - WINDOW.base + 0x20, &mut dword);
        assert_eq!(dword, [0x11; 4]);
        assert_eq!(first.lock().unwrap().accesses, vec![(0, 0x20, 4)]);

        // A move onto another BAR is refused and leaves the other BAR reachable.
        ecam.write(
            ecam_offset(first_address, 0x14),
            &((WINDOW.base + BAR_SIZE) >> 32).to_le_bytes()[..4],
        );
        ecam.write(
            ecam_offset(first_address, 0x10),
            &((WINDOW.base + BAR_SIZE) as u32).to_le_bytes(),
        );
        assert!(!moves.lock().unwrap().last().unwrap().routed);
        window.read(BAR_SIZE, &mut dword);
        assert_eq!(dword, [0x22; 4]);
        assert!(root.counters().unrouted_bar_moves >= 2);
    }
}
