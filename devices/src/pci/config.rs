//! The configuration space of a PCI type-0 function: the standard header, 64-bit memory BARs
//! with the sizing protocol, and a capability list.
//!
//! A device model owns one [`PciConfigSpace`] and forwards guest config accesses to it, after
//! handling any registers whose value it computes itself (e.g. a capability window onto its
//! BAR). Accesses follow what hardware does: 1, 2 or 4 bytes, naturally aligned, inside the
//! 4 KiB of ECAM space; anything else reads as all-ones and writes are dropped. Bytes past the
//! 256-byte header read as zero, which tells Linux the extended capability list is empty.

use super::BarRegion;

/// Bytes of the conventional configuration space, where the header and capabilities live.
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;
/// Bytes of configuration space per function reachable through ECAM.
pub const PCI_EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// A type-0 header has six BAR registers.
pub const PCI_BAR_COUNT: usize = 6;
/// Smallest memory BAR the sizing protocol can express (its low 4 bits are flags).
pub const PCI_MIN_MEMORY_BAR_SIZE: u64 = 16;
/// Capability id of MSI-X (PCI 3.0, 6.8.2).
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// MSI-X capability: message control at +2 (the body starts after id and next pointer).
pub const MSIX_CAP_CONTROL: usize = 2;
/// Message control, table offset/BIR and PBA offset/BIR.
const MSIX_CAP_BODY_LEN: usize = 10;
/// The BAR indicator sits in the low 3 bits of the table and PBA offsets.
const MSIX_BIR_MASK: u32 = 0x7;

// Header register offsets (PCI 3.0, 6.1).
pub const PCI_VENDOR_ID: usize = 0x00;
pub const PCI_DEVICE_ID: usize = 0x02;
pub const PCI_COMMAND: usize = 0x04;
pub const PCI_STATUS: usize = 0x06;
pub const PCI_REVISION_ID: usize = 0x08;
pub const PCI_CLASS_PROG: usize = 0x09;
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
pub const PCI_HEADER_TYPE: usize = 0x0e;
pub const PCI_BAR0: usize = 0x10;
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const PCI_SUBSYSTEM_ID: usize = 0x2e;
pub const PCI_CAPABILITY_LIST: usize = 0x34;
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
pub const PCI_INTERRUPT_PIN: usize = 0x3d;
/// Interrupt pin register values: none, or INTA (the only pin a single-function device uses).
pub const PCI_INTERRUPT_PIN_NONE: u8 = 0;
pub const PCI_INTERRUPT_PIN_INTA: u8 = 1;
/// Command register bit that stops the function from asserting INTx (set by drivers that
/// use MSI or MSI-X).
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x0400;

/// Command register bits a guest may set: memory space, bus master, parity error response,
/// SERR# enable, INTx disable. I/O space stays 0: these functions have no I/O BARs.
pub const PCI_COMMAND_WRITABLE: u16 = 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
pub const PCI_COMMAND_MEMORY: u16 = 0x0002;
/// Status bit: the capability pointer at 0x34 is valid.
pub const PCI_STATUS_CAPABILITY_LIST: u16 = 1 << 4;
/// The first byte after the standard header, where capabilities start.
pub const PCI_CAPABILITIES_START: usize = 0x40;

/// Memory BAR low-dword flags: type 64-bit (bits 2:1 = 10b), prefetchable (bit 3).
const BAR_MEMORY_TYPE_64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;
const BAR_MEMORY_FLAGS_MASK: u64 = 0xf;
const BAR_REGISTERS_END: usize = PCI_BAR0 + 4 * PCI_BAR_COUNT;
/// A capability header: its id and the pointer to the next capability.
const CAPABILITY_HEADER_LEN: usize = 2;

/// Identity of a function as its header announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class, subclass and programming interface: 0xBBSSPP.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// A 64-bit BAR takes two registers, so its index must be 0..=4.
    #[error("BAR index {0} cannot hold a 64-bit BAR")]
    BadBarIndex(u8),
    /// BAR sizes are powers of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two >= 16")]
    BadBarSize(u64),
    /// A BAR decodes only addresses aligned to its size.
    #[error("BAR address {address:#x} is not aligned to its size {size:#x}")]
    MisalignedBar { address: u64, size: u64 },
    /// The BAR's registers are used by another BAR.
    #[error("BAR index {0} is already in use")]
    BarInUse(u8),
    /// The capability does not fit in the 256-byte configuration space.
    #[error("no room for a {0}-byte capability")]
    NoRoomForCapability(usize),
    /// The writable mask must be empty or as long as the capability body.
    #[error("writable mask of {mask} bytes for a {body}-byte capability body")]
    MaskLength { mask: usize, body: usize },
}

#[derive(Debug, Clone, Copy)]
struct MemoryBar {
    address: u64,
    size: u64,
    prefetchable: bool,
}

impl MemoryBar {
    fn low_register(&self) -> u32 {
        let flags = BAR_MEMORY_TYPE_64
            | if self.prefetchable {
                BAR_PREFETCHABLE
            } else {
                0
            };
        (self.address as u32) | flags
    }

    fn high_register(&self) -> u32 {
        (self.address >> 32) as u32
    }

    /// Address bits below the size read back as zero: that is what turns the guest's all-ones
    /// write into the size mask of the sizing protocol.
    fn set_address(&mut self, address: u64) {
        self.address = address & !(self.size - 1) & !BAR_MEMORY_FLAGS_MASK;
    }
}

/// Whether an access of `len` bytes at `offset` is one a PCI function answers.
pub fn is_valid_config_access(offset: u16, len: usize) -> bool {
    let offset = usize::from(offset);
    matches!(len, 1 | 2 | 4) && offset % len == 0 && offset + len <= PCI_EXTENDED_CONFIG_SPACE_SIZE
}

/// The configuration space of one type-0 function.
pub struct PciConfigSpace {
    registers: [u8; PCI_CONFIG_SPACE_SIZE],
    /// Per byte, the bits a guest write may change.
    writable: [u8; PCI_CONFIG_SPACE_SIZE],
    /// 64-bit memory BARs, by the index of their low register.
    bars: [Option<MemoryBar>; PCI_BAR_COUNT],
    /// Offset of the last capability in the list (0 when the list is empty).
    last_capability: u8,
    next_capability_offset: usize,
    ignored_accesses: u32,
}

impl PciConfigSpace {
    /// A header with `ids`, no BARs, no capabilities, no INTx pin.
    pub fn new(ids: PciIds) -> Self {
        let mut space = Self {
            registers: [0; PCI_CONFIG_SPACE_SIZE],
            writable: [0; PCI_CONFIG_SPACE_SIZE],
            bars: [None; PCI_BAR_COUNT],
            last_capability: 0,
            next_capability_offset: PCI_CAPABILITIES_START,
            ignored_accesses: 0,
        };
        space.put(PCI_VENDOR_ID, &ids.vendor_id.to_le_bytes());
        space.put(PCI_DEVICE_ID, &ids.device_id.to_le_bytes());
        space.put(PCI_REVISION_ID, &[ids.revision_id]);
        space.put(PCI_CLASS_PROG, &ids.class_code.to_le_bytes()[..3]);
        space.put(
            PCI_SUBSYSTEM_VENDOR_ID,
            &ids.subsystem_vendor_id.to_le_bytes(),
        );
        space.put(PCI_SUBSYSTEM_ID, &ids.subsystem_id.to_le_bytes());
        space.allow_writes(PCI_COMMAND, &PCI_COMMAND_WRITABLE.to_le_bytes());
        space.allow_writes(PCI_CACHE_LINE_SIZE, &[0xff]);
        space.allow_writes(PCI_INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Declares BAR `index` (with `index + 1` as its high half) as a 64-bit memory BAR of
    /// `size` bytes at `address`.
    pub fn add_memory_bar64(
        &mut self,
        index: u8,
        address: u64,
        size: u64,
        prefetchable: bool,
    ) -> Result<(), PciConfigError> {
        let slot = usize::from(index);
        if slot + 1 >= PCI_BAR_COUNT {
            return Err(PciConfigError::BadBarIndex(index));
        }
        if !size.is_power_of_two() || size < PCI_MIN_MEMORY_BAR_SIZE {
            return Err(PciConfigError::BadBarSize(size));
        }
        if address & (size - 1) != 0 {
            return Err(PciConfigError::MisalignedBar { address, size });
        }
        let used = |i: usize| self.bars[i].is_some() || (i > 0 && self.bars[i - 1].is_some());
        if used(slot) || used(slot + 1) {
            return Err(PciConfigError::BarInUse(index));
        }
        self.bars[slot] = Some(MemoryBar {
            address,
            size,
            prefetchable,
        });
        Ok(())
    }

    /// Appends a capability with `id` and `body` (the bytes after the id and next pointer) to
    /// the list, and returns its offset. `writable` holds, per body byte, the bits a guest may
    /// change; empty means read-only.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u8, PciConfigError> {
        if !writable.is_empty() && writable.len() != body.len() {
            return Err(PciConfigError::MaskLength {
                mask: writable.len(),
                body: body.len(),
            });
        }
        let len = CAPABILITY_HEADER_LEN + body.len();
        let offset = self.next_capability_offset;
        if offset + len > PCI_CONFIG_SPACE_SIZE {
            return Err(PciConfigError::NoRoomForCapability(len));
        }
        self.put(offset, &[id, 0]);
        self.put(offset + CAPABILITY_HEADER_LEN, body);
        self.allow_writes(offset + CAPABILITY_HEADER_LEN, writable);
        // Below PCI_CONFIG_SPACE_SIZE (checked above), so it fits a byte.
        let offset_byte = offset as u8;
        let link = if self.last_capability == 0 {
            PCI_CAPABILITY_LIST
        } else {
            usize::from(self.last_capability) + 1
        };
        self.put(link, &[offset_byte]);
        self.last_capability = offset_byte;
        let status = self.register_u16(PCI_STATUS) | PCI_STATUS_CAPABILITY_LIST;
        self.put(PCI_STATUS, &status.to_le_bytes());
        // Capabilities start on dword boundaries (PCI 3.0, 6.7).
        self.next_capability_offset = (offset + len).next_multiple_of(4);
        Ok(offset_byte)
    }

    /// Appends an MSI-X capability for a table of `table_size_field + 1` entries at
    /// `table_offset` and a PBA at `pba_offset`, both in BAR `bar`; only the enable and
    /// function-mask bits of message control are writable. Returns the capability's offset.
    pub fn add_msix_capability(
        &mut self,
        table_size_field: u16,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Result<u8, PciConfigError> {
        let bir = u32::from(bar) & MSIX_BIR_MASK;
        let mut body = Vec::with_capacity(MSIX_CAP_BODY_LEN);
        body.extend_from_slice(&table_size_field.to_le_bytes());
        body.extend_from_slice(&(table_offset | bir).to_le_bytes());
        body.extend_from_slice(&(pba_offset | bir).to_le_bytes());
        let mut writable = [0u8; MSIX_CAP_BODY_LEN];
        // Enable and function mask: bits 15 and 14 of message control.
        writable[1] = 0xc0;
        self.add_capability(PCI_CAP_ID_MSIX, &body, &writable)
    }

    /// A guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        if !is_valid_config_access(offset, data.len()) {
            self.ignored_accesses = self.ignored_accesses.saturating_add(1);
            data.fill(0xff);
            return;
        }
        for (position, byte) in data.iter_mut().enumerate() {
            *byte = self.byte_at(usize::from(offset) + position);
        }
    }

    /// A guest write of `data` at `offset`. Returns the BAR whose address changed, if any.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion> {
        if !is_valid_config_access(offset, data.len()) {
            self.ignored_accesses = self.ignored_accesses.saturating_add(1);
            return None;
        }
        let offset = usize::from(offset);
        if offset >= PCI_CONFIG_SPACE_SIZE {
            // Nothing lives in extended space: it is read-only zero.
            return None;
        }
        if (PCI_BAR0..BAR_REGISTERS_END).contains(&offset) {
            return self.write_bar_register(offset, data);
        }
        for (position, value) in data.iter().enumerate() {
            let index = offset + position;
            if let (Some(register), Some(mask)) =
                (self.registers.get_mut(index), self.writable.get(index))
            {
                *register = (*register & !mask) | (value & mask);
            }
        }
        None
    }

    /// The memory BARs at their current addresses.
    pub fn bars(&self) -> Vec<BarRegion> {
        (0u8..)
            .zip(self.bars.iter())
            .filter_map(|(index, bar)| {
                bar.map(|bar| BarRegion {
                    index,
                    address: bar.address,
                    size: bar.size,
                })
            })
            .collect()
    }

    /// BAR `index` at its current address, if it is a declared BAR.
    pub fn bar(&self, index: u8) -> Option<BarRegion> {
        let bar = (*self.bars.get(usize::from(index))?)?;
        Some(BarRegion {
            index,
            address: bar.address,
            size: bar.size,
        })
    }

    /// A register as the guest would read it, for the owning device's own use. Offsets past
    /// the header read as zero.
    pub fn register_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte_at(offset), self.byte_at(offset + 1)])
    }

    pub fn register_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes([
            self.byte_at(offset),
            self.byte_at(offset + 1),
            self.byte_at(offset + 2),
            self.byte_at(offset + 3),
        ])
    }

    /// Declares the function's legacy interrupt pin (`PCI_INTERRUPT_PIN_INTA`) or none. The
    /// interrupt line register stays the guest's to write either way: it is informational.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.put(PCI_INTERRUPT_PIN, &[pin]);
    }

    /// Whether the guest set the command register's INTx disable bit.
    pub fn intx_disabled(&self) -> bool {
        self.register_u16(PCI_COMMAND) & PCI_COMMAND_INTX_DISABLE != 0
    }

    /// Sets a register's value, bypassing the writable mask: for the device model's own
    /// state shown in configuration space. Bytes past the header are dropped.
    pub fn set_register(&mut self, offset: usize, bytes: &[u8]) {
        self.put(offset, bytes);
    }

    /// Accesses the guest made with a bad size, alignment or range (ignored).
    pub fn ignored_accesses(&self) -> u32 {
        self.ignored_accesses
    }

    fn byte_at(&self, offset: usize) -> u8 {
        if (PCI_BAR0..BAR_REGISTERS_END).contains(&offset) {
            let register = self.bar_register((offset - PCI_BAR0) / 4);
            return register.to_le_bytes()[offset % 4];
        }
        self.registers.get(offset).copied().unwrap_or(0)
    }

    /// The value of BAR register `slot`: a BAR's low half, a 64-bit BAR's high half, or zero
    /// for an unimplemented BAR (which sizing reads as "not present").
    fn bar_register(&self, slot: usize) -> u32 {
        if let Some(Some(bar)) = self.bars.get(slot) {
            return bar.low_register();
        }
        match slot.checked_sub(1).and_then(|low| self.bars.get(low)) {
            Some(Some(bar)) => bar.high_register(),
            _ => 0,
        }
    }

    fn write_bar_register(&mut self, offset: usize, data: &[u8]) -> Option<BarRegion> {
        let slot = (offset - PCI_BAR0) / 4;
        let mut bytes = self.bar_register(slot).to_le_bytes();
        for (position, value) in data.iter().enumerate() {
            if let Some(byte) = bytes.get_mut(offset % 4 + position) {
                *byte = *value;
            }
        }
        let value = u64::from(u32::from_le_bytes(bytes));
        let writes_low_half = matches!(self.bars.get(slot), Some(Some(_)));
        let index = if writes_low_half {
            slot
        } else {
            // The high half of the BAR below, or an unimplemented register (ignored).
            slot.checked_sub(1)
                .filter(|low| matches!(self.bars.get(*low), Some(Some(_))))?
        };
        let bar = self.bars.get_mut(index)?.as_mut()?;
        let old_address = bar.address;
        if writes_low_half {
            bar.set_address((old_address & !0xffff_ffff) | value);
        } else {
            bar.set_address((value << 32) | (old_address & 0xffff_ffff));
        }
        (bar.address != old_address).then_some(BarRegion {
            // Below PCI_BAR_COUNT.
            index: index as u8,
            address: bar.address,
            size: bar.size,
        })
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(target) = self.registers.get_mut(offset..offset + bytes.len()) {
            target.copy_from_slice(bytes);
        }
    }

    fn allow_writes(&mut self, offset: usize, mask: &[u8]) {
        if let Some(target) = self.writable.get_mut(offset..offset + mask.len()) {
            target.copy_from_slice(mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAR_ADDRESS: u64 = 0x40_0000_0000;
    const BAR_SIZE: u64 = 0x4000;

    fn ids() -> PciIds {
        PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: 0x01_80_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn space_with_bar() -> PciConfigSpace {
        let mut space = PciConfigSpace::new(ids());
        space
            .add_memory_bar64(0, BAR_ADDRESS, BAR_SIZE, false)
            .unwrap();
        space
    }

    fn read32(space: &mut PciConfigSpace, offset: u16) -> u32 {
        let mut bytes = [0u8; 4];
        space.read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write32(space: &mut PciConfigSpace, offset: u16, value: u32) -> Option<BarRegion> {
        space.write(offset, &value.to_le_bytes())
    }

    #[test]
    fn header_shows_ids_and_keeps_read_only_fields() {
        let mut space = PciConfigSpace::new(ids());
        assert_eq!(read32(&mut space, 0x00), 0x1042_1af4);
        assert_eq!(read32(&mut space, 0x08), 0x0180_0001);
        assert_eq!(read32(&mut space, 0x2c), 0x1100_1af4);
        assert_eq!(read32(&mut space, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
        for offset in [0x00, 0x08, 0x2c, 0x34] {
            write32(&mut space, offset, 0xdead_beef);
        }
        assert_eq!(read32(&mut space, 0x00), 0x1042_1af4);
        assert_eq!(read32(&mut space, 0x08), 0x0180_0001);
        assert_eq!(read32(&mut space, 0x2c), 0x1100_1af4);
        assert_eq!(read32(&mut space, 0x34), 0);
        // Command takes only its writable bits; status (upper half) stays read-only.
        write32(&mut space, 0x04, 0xffff_ffff);
        assert_eq!(read32(&mut space, 0x04), u32::from(PCI_COMMAND_WRITABLE));
        space.write(0x3c, &[11]);
        let mut line = [0u8];
        space.read(0x3c, &mut line);
        assert_eq!(line, [11]);
    }

    #[test]
    fn interrupt_pin_is_read_only_and_intx_disable_is_the_guests() {
        let mut space = PciConfigSpace::new(ids());
        space.set_interrupt_pin(PCI_INTERRUPT_PIN_INTA);
        write32(&mut space, 0x3c, 0xffff_ff0b);
        assert_eq!(
            read32(&mut space, 0x3c) & 0xffff,
            0x010b,
            "pin INTA, line 11"
        );
        assert!(!space.intx_disabled());
        write32(&mut space, 0x04, u32::from(PCI_COMMAND_INTX_DISABLE));
        assert!(space.intx_disabled());
        write32(&mut space, 0x04, 0);
        assert!(!space.intx_disabled());
    }

    #[test]
    fn bar_sizing_protocol_reports_moves_and_restores() {
        let mut space = space_with_bar();
        assert_eq!(read32(&mut space, 0x10), 0x4, "64-bit, non-prefetchable");
        assert_eq!(read32(&mut space, 0x14), 0x40);

        // What Linux's __pci_read_base does: all-ones, read the mask, restore, per half.
        let moved = write32(&mut space, 0x10, 0xffff_ffff).unwrap();
        assert_eq!(moved.index, 0);
        assert_eq!(moved.address, 0x40_ffff_c000);
        let low_mask = read32(&mut space, 0x10);
        assert_eq!(low_mask, 0xffff_c004);
        assert!(write32(&mut space, 0x14, 0xffff_ffff).is_some());
        let high_mask = read32(&mut space, 0x14);
        assert_eq!(high_mask, 0xffff_ffff);
        let mask = (u64::from(high_mask) << 32) | u64::from(low_mask & !0xf);
        assert_eq!(!mask + 1, BAR_SIZE);
        write32(&mut space, 0x10, 0);
        let restored = write32(&mut space, 0x14, 0x40).unwrap();
        assert_eq!(restored.address, BAR_ADDRESS);
        assert_eq!(
            write32(&mut space, 0x14, 0x40),
            None,
            "no change, no report"
        );

        // The guest moves the BAR; low bits below the size are dropped.
        let moved = write32(&mut space, 0x10, 0x8000_1234).unwrap();
        assert_eq!(
            moved,
            BarRegion {
                index: 0,
                address: 0x40_8000_0000,
                size: BAR_SIZE
            }
        );
        assert_eq!(space.bars(), vec![moved]);
        assert_eq!(space.bar(0), Some(moved));
        assert_eq!(space.bar(1), None);
        // Byte writes to a BAR merge with the rest of the register.
        let moved = space.write(0x13, &[0x90]).unwrap();
        assert_eq!(moved.address, 0x40_9000_0000);

        // Unimplemented BARs read as zero, also after sizing: "not present".
        assert_eq!(write32(&mut space, 0x18, 0xffff_ffff), None);
        assert_eq!(read32(&mut space, 0x18), 0);
        assert_eq!(read32(&mut space, 0x24), 0);
    }

    #[test]
    fn rejects_bad_bars() {
        let mut space = PciConfigSpace::new(ids());
        assert_eq!(
            space.add_memory_bar64(5, 0, 0x1000, false),
            Err(PciConfigError::BadBarIndex(5))
        );
        assert_eq!(
            space.add_memory_bar64(0, 0, 0x1800, false),
            Err(PciConfigError::BadBarSize(0x1800))
        );
        assert_eq!(
            space.add_memory_bar64(0, 0, 8, false),
            Err(PciConfigError::BadBarSize(8))
        );
        assert!(matches!(
            space.add_memory_bar64(0, 0x1800, 0x1000, false),
            Err(PciConfigError::MisalignedBar { .. })
        ));
        space.add_memory_bar64(2, 0x1000, 0x1000, true).unwrap();
        assert_eq!(
            space.add_memory_bar64(1, 0, 0x1000, false),
            Err(PciConfigError::BarInUse(1))
        );
        assert_eq!(
            space.add_memory_bar64(3, 0, 0x1000, false),
            Err(PciConfigError::BarInUse(3))
        );
        assert_eq!(
            read32(&mut space, 0x18),
            0x1000 | 0xc,
            "prefetchable 64-bit"
        );
    }

    #[test]
    fn capability_list_walk_visits_every_capability() {
        let mut space = PciConfigSpace::new(ids());
        assert_eq!(read32(&mut space, 0x04) >> 16 & 0x10, 0);
        let first = space.add_capability(0x09, &[3, 1, 0], &[]).unwrap();
        let second = space
            .add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0; 10])
            .unwrap();
        let third = space.add_capability(0x05, &[0xaa], &[0x0f]).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48, "dword aligned");
        assert_eq!(third, 0x54);
        assert_eq!(
            read32(&mut space, 0x04) >> 16 & 0x10,
            0x10,
            "capability list bit"
        );

        let mut visited = Vec::new();
        let mut pointer = [0u8];
        space.read(0x34, &mut pointer);
        while pointer[0] != 0 && visited.len() < 48 {
            let mut id = [0u8];
            space.read(u16::from(pointer[0]), &mut id);
            visited.push((pointer[0], id[0]));
            space.read(u16::from(pointer[0]) + 1, &mut pointer);
        }
        assert_eq!(visited, vec![(0x40, 0x09), (0x48, 0x11), (0x54, 0x05)]);

        // Only the writable bits of a capability change, and never its header.
        space.write(0x54, &[0xff, 0xff, 0xff, 0xff]);
        let mut cap = [0u8; 3];
        space.read(0x54, &mut cap[..2]);
        space.read(0x56, &mut cap[2..]);
        assert_eq!(cap, [0x05, 0x00, 0xaf]);
    }

    #[test]
    fn capability_errors() {
        let mut space = PciConfigSpace::new(ids());
        assert_eq!(
            space.add_capability(0x09, &[0; 4], &[0; 3]),
            Err(PciConfigError::MaskLength { mask: 3, body: 4 })
        );
        assert_eq!(
            space.add_capability(0x09, &[0; 200], &[]),
            Err(PciConfigError::NoRoomForCapability(202))
        );
        assert_eq!(space.add_capability(0x09, &[0; 190], &[]), Ok(0x40));
        assert!(space.add_capability(0x09, &[0; 30], &[]).is_err());
    }

    #[test]
    fn access_sizes_alignment_and_range() {
        let mut space = space_with_bar();
        let mut byte = [0u8];
        space.read(0x01, &mut byte);
        assert_eq!(byte, [0x1a]);
        let mut word = [0u8; 2];
        space.read(0x02, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1042);
        space.read(0x11, &mut word);
        assert_eq!(word, [0xff; 2], "misaligned");
        let mut three = [0u8; 3];
        space.read(0, &mut three);
        assert_eq!(three, [0xff; 3], "bad size");
        let mut qword = [0u8; 8];
        space.read(0, &mut qword);
        assert_eq!(qword, [0xff; 8], "bad size");
        assert_eq!(read32(&mut space, 0x100), 0, "empty extended space");
        assert_eq!(read32(&mut space, 0xffc), 0);
        assert_eq!(read32(&mut space, 0x1000), 0xffff_ffff, "out of range");
        assert_eq!(write32(&mut space, 0x12, 0), None, "misaligned write");
        assert_eq!(space.write(0x10, &[0; 8]), None, "bad size write");
        assert_eq!(write32(&mut space, 0x200, 0xffff_ffff), None);
        assert_eq!(read32(&mut space, 0x200), 0);
        assert_eq!(space.bar(0).unwrap().address, BAR_ADDRESS);
        assert_eq!(space.ignored_accesses(), 6);
    }
}
