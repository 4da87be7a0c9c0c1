//! PCI: configuration space, the root complex (ECAM and ports 0xCF8/0xCFC), and BARs.

pub mod config;
pub mod root;

/// A PCI function's address on its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

/// Segment 0 in Linux's notation, `0000:bb:dd.f`, so host reports match the guest's sysfs.
impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A memory BAR as the VMM placed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegion {
    pub index: u8,
    pub address: u64,
    pub size: u64,
}

/// A PCI function: its configuration space and the BARs it decodes.
pub trait PciDevice: Send {
    /// Reads configuration space at `offset` (up to 4 KiB with ECAM).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space. Returns the BAR whose address the guest changed, if any,
    /// so the VMM can move what it registered there (MMIO routing, ioeventfds).
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion>;
    /// The memory BARs, at their current addresses.
    fn bars(&self) -> Vec<BarRegion>;
    /// An access inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
}
