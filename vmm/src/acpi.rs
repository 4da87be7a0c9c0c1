// SPDX-License-Identifier: Apache-2.0
//
//! ACPI tables for a firmware-less direct boot of an x86-64 Linux guest.
//!
//! There is no firmware to build ACPI tables, so the VMM writes them into
//! guest memory itself before the first vCPU runs. The RSDP is placed at
//! [`ACPI_TABLES_START`], inside the 0xE0000..0xFFFFF range that Linux scans
//! for the "RSD PTR " signature; the VMM should also pass the address in
//! `boot_params.acpi_rsdp_addr` so no scan is needed. All other tables follow
//! the RSDP in the same window, which Linux always treats as reserved (it
//! never hands 640K..1M to the page allocator), so the tables survive boot.
//!
//! The platform is described as *HW-reduced ACPI*: no PM1/GPE register blocks,
//! no SCI and no FACS. Power-off and reset go through two I/O ports that the
//! VMM's power device emulates (`devices::legacy::power`).
//!
//! Guest-visible consequence of HW-reduced mode on x86 Linux: the kernel
//! installs a null legacy PIC, so ISA IRQs 0-15 get no implicit identity
//! mapping to I/O APIC pins. Any device that relies on a fixed ISA IRQ (for
//! example a 16550 UART on IRQ 4) has to be described in the DSDT with its
//! interrupt in `_CRS`, as COM1 is here.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::legacy::{power, serial};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Guest physical address of the RSDP. It lies in the BIOS read-only area
/// that Linux scans for the RSDP signature (0xE0000..0xFFFFF, 16-byte
/// aligned); the remaining tables are placed right after it.
pub const ACPI_TABLES_START: u64 = 0xE_0000;

/// First guest physical address past the window available for the tables.
/// Above it starts the kernel's load area (1 MiB), so nothing may spill over.
pub const ACPI_TABLES_END: u64 = 0x10_0000;

/// The sleep and reset registers the FADT describes are emulated by the power device;
/// Linux's hw-reduced power-off writes `(SLP_TYP << 2) | SLP_EN` to the sleep control
/// register, with SLP_TYP taken from the DSDT's `\_S5_` package.
const ACPI_SLEEP_PORT: u16 = power::SLEEP_PORT as u16;
const ACPI_RESET_PORT: u16 = power::RESET_PORT as u16;
const ACPI_RESET_VALUE: u8 = power::RESET_VALUE;
const S5_SLEEP_TYPE: u8 = power::S5_SLEEP_TYPE;

/// The console UART, described in the DSDT: in HW-reduced mode Linux has no legacy PIC and
/// gives ISA IRQs no implicit I/O APIC mapping, so without a `_CRS` naming IRQ 4 the
/// 8250 driver never gets its interrupt and user-space console output stalls.
const COM1_PORT: u16 = serial::COM1_PORT as u16;
const COM1_PORT_COUNT: u8 = serial::UART_PORT_COUNT as u8;
const COM1_GSI: u32 = serial::COM1_GSI;

/// Most CPUs (possible, i.e. boot plus hot-pluggable) the MADT describes.
///
/// CPUs get APIC id = index; ids up to 254 use xAPIC entries, higher ids use
/// x2APIC entries, so the table format itself is not the limit. 1024 is
/// KVM's default `KVM_MAX_VCPUS` on x86; it also keeps the MADT (~16 KiB)
/// well inside the 128 KiB table window. The VMM should still check the
/// host's `KVM_CAP_MAX_VCPUS`, and guests need x2APIC mode (with interrupt
/// remapping or KVM's extended destination id) to use APIC ids above 254.
pub const MAX_CPUS: u32 = 1024;

/// Physical address of every CPU's local APIC (architectural default).
const LOCAL_APIC_ADDR: u32 = crate::layout::LAPIC_START as u32;
/// The single KVM in-kernel I/O APIC: id, MMIO base and first GSI.
const IOAPIC_ID: u8 = 0;
const IOAPIC_ADDR: u32 = crate::layout::IOAPIC_START as u32;
const IOAPIC_GSI_BASE: u32 = 0;

/// Largest APIC id that may use a (8-bit) Processor Local APIC entry: 0xFF
/// means "broadcast" and the ACPI spec requires x2APIC entries from 255 on.
const MAX_XAPIC_ID: u32 = 254;

const OEM_ID: [u8; 6] = *b"BLKSWM";
const OEM_TABLE_ID: [u8; 8] = *b"BLKSWARM";
const OEM_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity": lets the guest tell which VMM built
/// the tables.
const HYPERVISOR_VENDOR_ID: u64 = u64::from_le_bytes(*b"BLKSWARM");

/// Tables are 8-byte aligned so that their 64-bit fields are naturally
/// aligned; the RSDP itself must be 16-byte aligned to be found by the scan.
const TABLE_ALIGN: u64 = 8;

/// FADT IA-PC boot architecture flags.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Deliberately *not* set: bit 0 (legacy ISA devices) and bit 1 (8042
/// present), so Linux skips PnP BIOS and i8042 probing, and bit 3 (MSI not
/// supported), which would disable MSI/MSI-X for every PCI device.
const IAPC_BOOT_ARCH: u16 = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;

/// MADT revision 5 (ACPI 6.3+): the first one that defines the Online
/// Capable processor flag.
const MADT_REVISION: u8 = 5;
/// MADT flag: the platform also has dual 8259 PICs (KVM emulates them).
const MADT_PCAT_COMPAT: u32 = 1 << 0;
const MADT_HEADER_LEN: u32 = 44;

/// MADT interrupt controller structure types.
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IO_APIC: u8 = 1;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_TYPE_LOCAL_X2APIC: u8 = 9;
const MADT_TYPE_LOCAL_X2APIC_NMI: u8 = 0xA;

/// Local APIC flags: Enabled (running at boot) and Online Capable (may be
/// hot-added later; Linux counts it as a possible CPU only with this bit).
const LAPIC_ENABLED: u32 = 1 << 0;
const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

/// Processor UID meaning "all processors" in the NMI structures.
const ALL_PROCESSORS_UID: u8 = 0xFF;
const ALL_PROCESSORS_X2APIC_UID: u32 = 0xFFFF_FFFF;
/// Local APIC NMI wiring: LINT1, flags 0 = bus-default polarity and trigger.
const NMI_LINT: u8 = 1;
const NMI_FLAGS: u16 = 0;

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
const SDT_HEADER_LEN: u32 = 36;

/// CPU topology described to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs running at boot (APIC ids `0..boot_cpus`).
    pub boot_cpus: u32,
    /// Possible vCPUs, including hot-pluggable ones (APIC ids `0..max_cpus`).
    pub max_cpus: u32,
    /// The PCI host bridge of segment 0.
    pub pci: PciHostBridge,
}

/// What the guest needs to know about PCI segment 0: where its ECAM is (MCFG, and a
/// motherboard resource reserving it), which buses exist, and the MMIO windows the host
/// bridge forwards (its `_CRS`), inside which the VMM placed every BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHostBridge {
    pub ecam_base: u64,
    /// Last bus number; ECAM covers buses `0..=last_bus`, 1 MiB each.
    pub last_bus: u8,
    /// Root buses `0..root_buses`, one ACPI host bridge each: more than 32 devices need more
    /// than one bus, and separate root bridges need no PCI-to-PCI bridge programming.
    pub root_buses: u8,
    /// 32-bit window (bus 0 only).
    pub mmio32: (u32, u32),
    /// Start of the 64-bit window; root bus n forwards `[start + n * bus_window, +bus_window)`.
    pub mmio64_start: u64,
    pub bus_window: u64,
    /// Whether some function has an INTx pin: then every host bridge gets a `_PRT` mapping
    /// each device's INTA to its GSI ([`irq::intx::intx_gsi`]).
    pub intx: bool,
}

impl PciHostBridge {
    fn ecam_size(&self) -> u64 {
        (u64::from(self.last_bus) + 1) << 20
    }
}

/// Where the tables were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiTables {
    /// Address of the RSDP, for `boot_params.acpi_rsdp_addr`.
    pub rsdp_addr: GuestAddress,
    /// First byte after the last table.
    pub end: GuestAddress,
}

/// Errors from [`write_acpi_tables`].
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// `boot_cpus` is zero or larger than `max_cpus`.
    #[error("invalid CPU counts: boot_cpus={boot_cpus}, max_cpus={max_cpus} (need 1 <= boot_cpus <= max_cpus)")]
    InvalidCpuCount { boot_cpus: u32, max_cpus: u32 },
    /// `max_cpus` exceeds [`MAX_CPUS`].
    #[error("too many CPUs: max_cpus={max_cpus}, limit is {limit}")]
    TooManyCpus { max_cpus: u32, limit: u32 },
    /// The tables would extend past [`ACPI_TABLES_END`].
    #[error("ACPI tables do not fit below {ACPI_TABLES_END:#x}: {len}-byte table at {addr:#x}")]
    TablesTooLarge { addr: u64, len: u64 },
    /// Guest memory does not cover a table's range.
    #[error("ACPI table range {addr:#x}+{len:#x} is not backed by guest memory")]
    NotInGuestMemory { addr: u64, len: usize },
    /// Writing a table into guest memory failed.
    #[error("failed to write ACPI table at {addr:#x}")]
    GuestMemoryWrite {
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
}

/// Builds the RSDP, XSDT, FADT, DSDT and MADT for `cfg` and writes them into
/// `mem` starting at [`ACPI_TABLES_START`].
///
/// Everything is built and every range checked before the first byte is
/// written, so on error guest memory is left untouched (barring a failure of
/// the write itself).
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<AcpiTables, AcpiError> {
    validate(cfg)?;

    let mut layout = Layout::new();
    let mut blobs: Vec<(GuestAddress, Vec<u8>)> = Vec::new();

    // The RSDP must be at the start of the window; it is filled in last, once
    // the XSDT's address is known.
    let rsdp_addr = layout.alloc(Rsdp::len())?;

    // The DSDT is not listed in the XSDT; the FADT points at it.
    let dsdt = build_dsdt(&cfg.pci);
    let dsdt_addr = layout.alloc(dsdt.len())?;
    blobs.push((dsdt_addr, dsdt));

    // Tables listed in the XSDT. Adding one (e.g. MCFG) is one more element.
    let xsdt_tables = [build_fadt(dsdt_addr), build_madt(cfg), build_mcfg(&cfg.pci)];

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in xsdt_tables {
        let addr = layout.alloc(table.len())?;
        xsdt.add_entry(addr.0);
        blobs.push((addr, table));
    }
    let xsdt = aml_bytes(&xsdt);
    let xsdt_addr = layout.alloc(xsdt.len())?;
    blobs.push((xsdt_addr, xsdt));

    blobs.push((rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0))));

    for (addr, bytes) in &blobs {
        if !mem.check_range(*addr, bytes.len(), Permissions::Write) {
            return Err(AcpiError::NotInGuestMemory {
                addr: addr.0,
                len: bytes.len(),
            });
        }
    }
    for (addr, bytes) in &blobs {
        mem.write_slice(bytes, *addr)
            .map_err(|source| AcpiError::GuestMemoryWrite {
                addr: addr.0,
                source,
            })?;
    }

    Ok(AcpiTables {
        rsdp_addr,
        end: GuestAddress(layout.end),
    })
}

fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.boot_cpus == 0 || cfg.boot_cpus > cfg.max_cpus {
        return Err(AcpiError::InvalidCpuCount {
            boot_cpus: cfg.boot_cpus,
            max_cpus: cfg.max_cpus,
        });
    }
    if cfg.max_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus {
            max_cpus: cfg.max_cpus,
            limit: MAX_CPUS,
        });
    }
    Ok(())
}

/// Bump allocator over the table window.
struct Layout {
    /// Next free (unaligned) address.
    end: u64,
}

impl Layout {
    fn new() -> Self {
        Layout {
            end: ACPI_TABLES_START,
        }
    }

    fn alloc(&mut self, len: usize) -> Result<GuestAddress, AcpiError> {
        let too_large = |addr| AcpiError::TablesTooLarge {
            addr,
            len: len as u64,
        };
        let addr = self
            .end
            .checked_next_multiple_of(TABLE_ALIGN)
            .ok_or_else(|| too_large(self.end))?;
        let end = addr
            .checked_add(len as u64)
            .filter(|&end| end <= ACPI_TABLES_END)
            .ok_or_else(|| too_large(addr))?;
        self.end = end;
        Ok(GuestAddress(addr))
    }
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// MCFG: the ECAM window of segment 0, so Linux reads config space with one MMIO access
/// instead of two port accesses (each an exit).
fn build_mcfg(pci: &PciHostBridge) -> Vec<u8> {
    let mut mcfg = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
    aml_bytes(&mcfg)
}

/// One host bridge per root bus (`\_SB_.PCI0` for bus 0, `PC01`.. after it), and
/// `\_SB_.MBRD`, the motherboard resource that reserves the ECAM (Linux ignores an MCFG region
/// that nothing reserves).
fn build_pci_devices(pci: &PciHostBridge, sink: &mut Vec<u8>) {
    for bus in 0..pci.root_buses {
        build_host_bridge(pci, bus, sink);
    }
    let ecam = aml::Memory32Fixed::new(false, pci.ecam_base as u32, pci.ecam_size() as u32);
    let mbrd_resources = aml::ResourceTemplate::new(vec![&ecam]);
    let mbrd_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02"));
    let mbrd_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let mbrd_crs = aml::Name::new("_CRS".into(), &mbrd_resources);
    aml::Device::new("_SB_.MBRD".into(), vec![&mbrd_hid, &mbrd_uid, &mbrd_crs]).to_aml_bytes(sink);
}

fn host_bridge_name(bus: u8) -> String {
    if bus == 0 {
        "_SB_.PCI0".to_string()
    } else {
        format!("_SB_.PC{bus:02X}")
    }
}

fn build_host_bridge(pci: &PciHostBridge, bus: u8, sink: &mut Vec<u8>) {
    let (mmio32_base, mmio32_size) = pci.mmio32;
    let mmio64_base = pci.mmio64_start + u64::from(bus) * pci.bus_window;
    let bus_range = aml::AddressSpace::new_bus_number(u16::from(bus), u16::from(bus));
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_base,
        mmio32_base + (mmio32_size - 1),
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_base,
        mmio64_base + (pci.bus_window - 1),
        None,
    );
    // Bus 0 also forwards the legacy config ports and the 32-bit window.
    let resources: Vec<&dyn Aml> = if bus == 0 {
        vec![&bus_range, &config_ports, &mmio32, &mmio64]
    } else {
        vec![&bus_range, &mmio64]
    };
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let uid = aml::Name::new("_UID".into(), &bus);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &bus);
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let prt = pci.intx.then(|| build_prt(bus));
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &uid, &seg, &bbn, &adr, &crs];
    if let Some(prt) = &prt {
        children.push(prt);
    }
    aml::Device::new(host_bridge_name(bus).as_str().into(), children).to_aml_bytes(sink);
}

/// PCI devices per bus, each with a `_PRT` entry.
const PRT_DEVICES: u32 = 32;
/// `_PRT` address field: all functions of a device.
const PRT_ALL_FUNCTIONS: u32 = 0xffff;
/// `_PRT` pin field for INTA (0-based, unlike the config-space register).
const PRT_PIN_INTA: u8 = 0;
/// `_PRT` source field: 0 means "the last field is a GSI", no link device. Linux then programs
/// the GSI level-triggered, active low; KVM's IOAPIC ignores polarity, so an irqfd write
/// still means asserted.
const PRT_SOURCE_GSI: u8 = 0;

/// The PCI routing table of root bus `bus`: each device's INTA to the GSI the VMM binds its
/// line to. Only INTA: every function is a single-function device using pin A.
fn build_prt(bus: u8) -> aml::Name {
    let entries: Vec<(u32, u32)> = (0..PRT_DEVICES)
        .map(|device| {
            let gsi = irq::intx::intx_gsi(bus, device as u8);
            ((device << 16) | PRT_ALL_FUNCTIONS, gsi)
        })
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(address, gsi)| aml::Package::new(vec![address, &PRT_PIN_INTA, &PRT_SOURCE_GSI, gsi]))
        .collect();
    let children: Vec<&dyn Aml> = packages.iter().map(|p| p as &dyn Aml).collect();
    aml::Name::new("_PRT".into(), &aml::Package::new(children))
}

fn build_dsdt(pci: &PciHostBridge) -> Vec<u8> {
    // \_S5_ gives the SLP_TYP value for soft-off; without it Linux does not
    // register ACPI power-off. ACPICA accepts a one-element package (the
    // value's low byte is SLP_TYPa, the only one used in HW-reduced mode).
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_COUNT);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_resources = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_resources);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);
    let objects: [&dyn Aml; 2] = [&s5, &com1];

    let mut body = Vec::new();
    for object in objects {
        object.to_aml_bytes(&mut body);
    }
    build_pci_devices(pci, &mut body);
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// An 8-bit register in system I/O space.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

fn build_fadt(dsdt_addr: GuestAddress) -> Vec<u8> {
    // FADTBuilder produces an ACPI 6.5 FADT: 6.3+ is what newer Linux checks
    // (instead of the MADT revision) before honouring Online Capable.
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr.0)
        .flag(FadtFlags::HwReducedAcpi)
        .flag(FadtFlags::ResetRegSup)
        // No fixed-feature power/sleep buttons (they would need PM1 blocks).
        .flag(FadtFlags::PwrButton)
        .flag(FadtFlags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_port_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    // Linux registers ACPI power-off in HW-reduced mode only if both
    // registers have a non-zero address.
    fadt.sleep_control_reg = io_port_gas(ACPI_SLEEP_PORT);
    fadt.sleep_status_reg = io_port_gas(ACPI_SLEEP_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_VENDOR_ID.into();
    aml_bytes(&fadt.finalize())
}

fn build_madt(cfg: &AcpiConfig) -> Vec<u8> {
    // Built by hand rather than with acpi_tables::madt::MADT, which fixes the
    // revision at 1, has no flags setter and lacks x2APIC/NMI structures.
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, LOCAL_APIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);

    // Collected first and appended once: Sdt recomputes the checksum over the
    // whole table on every append.
    let mut s = Vec::new();
    let mut has_x2apic = false;
    for cpu in 0..cfg.max_cpus {
        // APIC id = UID = CPU index; KVM gives vCPU n APIC id n by default.
        let flags = if cpu < cfg.boot_cpus {
            LAPIC_ENABLED
        } else {
            LAPIC_ONLINE_CAPABLE
        };
        match u8::try_from(cpu) {
            Ok(id) if cpu <= MAX_XAPIC_ID => {
                s.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, id, id]);
                s.extend_from_slice(&flags.to_le_bytes());
            }
            // APIC ids >= 255 need x2APIC entries. Linux ignores x2APIC
            // entries with ids < 255 when xAPIC entries exist, so the two
            // kinds must not overlap.
            _ => {
                has_x2apic = true;
                s.extend_from_slice(&[MADT_TYPE_LOCAL_X2APIC, 16, 0, 0]);
                s.extend_from_slice(&cpu.to_le_bytes());
                s.extend_from_slice(&flags.to_le_bytes());
                s.extend_from_slice(&cpu.to_le_bytes());
            }
        }
    }

    s.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, IOAPIC_ID, 0]);
    s.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    s.extend_from_slice(&IOAPIC_GSI_BASE.to_le_bytes());

    // NMIs arrive on LINT1 of every CPU (KVM's default LVT wiring).
    s.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID]);
    s.extend_from_slice(&NMI_FLAGS.to_le_bytes());
    s.push(NMI_LINT);
    if has_x2apic {
        s.extend_from_slice(&[MADT_TYPE_LOCAL_X2APIC_NMI, 12]);
        s.extend_from_slice(&NMI_FLAGS.to_le_bytes());
        s.extend_from_slice(&ALL_PROCESSORS_X2APIC_UID.to_le_bytes());
        s.extend_from_slice(&[NMI_LINT, 0, 0, 0]);
    }

    // No Interrupt Source Overrides: KVM routes GSI n to I/O APIC pin n, and
    // in HW-reduced mode Linux sets up neither the SCI nor legacy IRQ 0-15
    // mappings, so an ISO for IRQ 0 or 9 would have no effect.
    madt.append_slice(&s);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    // Field offsets, from the ACPI 6.5 specification.
    const RSDP_LEN: usize = 36;
    const FADT_LEN: usize = 276;
    const FADT_IAPC_BOOT_ARCH: usize = 109;
    const FADT_FLAGS: usize = 112;
    const FADT_RESET_REG: usize = 116;
    const FADT_RESET_VALUE: usize = 128;
    const FADT_MINOR_REVISION: usize = 131;
    const FADT_DSDT: usize = 40;
    const FADT_X_DSDT: usize = 140;
    const FADT_SLEEP_CONTROL_REG: usize = 244;
    const FADT_SLEEP_STATUS_REG: usize = 256;
    const FADT_HYPERVISOR_ID: usize = 268;

    const FADT_HW_REDUCED: u32 = 1 << 20;
    const FADT_RESET_REG_SUP: u32 = 1 << 10;

    fn guest_mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Decoded Generic Address Structure.
    #[derive(Debug, PartialEq)]
    struct Gas {
        space: u8,
        bit_width: u8,
        bit_offset: u8,
        access_size: u8,
        address: u64,
    }

    fn gas_at(b: &[u8], off: usize) -> Gas {
        Gas {
            space: b[off],
            bit_width: b[off + 1],
            bit_offset: b[off + 2],
            access_size: b[off + 3],
            address: u64_at(b, off + 4),
        }
    }

    fn io8(port: u16) -> Gas {
        Gas {
            space: 1,
            bit_width: 8,
            bit_offset: 0,
            access_size: 1,
            address: port.into(),
        }
    }

    /// Reads a whole system description table from guest memory, checking
    /// that its length is sane, it lies in the window and it sums to zero.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        assert!(addr >= ACPI_TABLES_START, "table at {addr:#x}");
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table length {len}");
        assert!(addr + len as u64 <= ACPI_TABLES_END);
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[..4]);
        table
    }

    struct Parsed {
        tables: AcpiTables,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        mcfg: Vec<u8>,
    }

    const TEST_PCI: PciHostBridge = PciHostBridge {
        ecam_base: 0xe000_0000,
        last_bus: 255,
        root_buses: 1,
        mmio32: (0xc000_0000, 0x2000_0000),
        mmio64_start: 0x40_0000_0000,
        bus_window: 1 << 30,
        intx: false,
    };

    fn config(boot_cpus: u32, max_cpus: u32) -> AcpiConfig {
        AcpiConfig {
            boot_cpus,
            max_cpus,
            pci: TEST_PCI,
        }
    }

    /// Writes the tables for `cfg` and follows the pointers from the RSDP.
    fn write_and_parse(boot_cpus: u32, max_cpus: u32) -> Parsed {
        let mem = guest_mem(2 << 20);
        let cfg = config(boot_cpus, max_cpus);
        let tables = write_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(tables.rsdp_addr, GuestAddress(ACPI_TABLES_START));
        assert!(tables.end.0 <= ACPI_TABLES_END);

        let rsdp = read(&mem, tables.rsdp_addr.0, RSDP_LEN);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20) as usize, RSDP_LEN);

        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!((xsdt.len() - 36) % 8, 0);
        let mut end = xsdt_addr + xsdt.len() as u64;

        let mut fadt = None;
        let mut madt = None;
        let mut mcfg = None;
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(entries.len(), 3);
        for addr in entries {
            let table = read_table(&mem, addr);
            end = end.max(addr + table.len() as u64);
            match &table[0..4] {
                b"FACP" => fadt = Some(table),
                b"APIC" => madt = Some(table),
                b"MCFG" => mcfg = Some(table),
                sig => panic!("unexpected table {sig:?}"),
            }
        }
        let fadt = fadt.expect("no FADT");
        let madt = madt.expect("no MADT");
        let mcfg = mcfg.expect("no MCFG");

        let dsdt_addr = u64_at(&fadt, FADT_X_DSDT);
        let dsdt = read_table(&mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        end = end.max(dsdt_addr + dsdt.len() as u64);
        assert_eq!(
            tables.end.0, end,
            "end is the first byte after the last table"
        );

        Parsed {
            tables,
            fadt,
            madt,
            dsdt,
            mcfg,
        }
    }

    #[test]
    fn mcfg_announces_the_ecam_of_segment_0() {
        let p = write_and_parse(1, 1);
        // Header (36) + reserved (8), then one allocation: base, segment, start and end bus.
        assert_eq!(p.mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&p.mcfg, 44), 0xe000_0000);
        assert_eq!(u16_at(&p.mcfg, 52), 0);
        assert_eq!((p.mcfg[54], p.mcfg[55]), (0, 255));
    }

    #[test]
    fn dsdt_has_the_pci_host_bridge_and_reserves_the_ecam() {
        let p = write_and_parse(1, 1);
        let body = &p.dsdt[36..];
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"PCI0") && contains(b"MBRD"));
        // EISAName PNP0A08 (host bridge) and PNP0C02 (motherboard resources).
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // Memory32Fixed over the whole ECAM: 256 buses x 1 MiB at 0xe0000000.
        assert!(contains(&[
            0x86, 0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x10
        ]));
        // The 64-bit window's minimum appears as a little-endian QWord.
        assert!(contains(&0x40_0000_0000u64.to_le_bytes()));
        assert!(!contains(b"PC01"), "one root bus configured");
    }

    #[test]
    fn each_root_bus_gets_a_host_bridge_with_its_own_window() {
        let mem = guest_mem(2 << 20);
        let cfg = AcpiConfig {
            boot_cpus: 1,
            max_cpus: 1,
            pci: PciHostBridge {
                root_buses: 17,
                ..TEST_PCI
            },
        };
        let tables = write_acpi_tables(&mem, &cfg).unwrap();
        let rsdp = read(&mem, tables.rsdp_addr.0, RSDP_LEN);
        let xsdt = read_table(&mem, u64_at(&rsdp, 24));
        let fadt = (36..xsdt.len())
            .step_by(8)
            .map(|o| read_table(&mem, u64_at(&xsdt, o)))
            .find(|t| &t[0..4] == b"FACP")
            .unwrap();
        let dsdt = read_table(&mem, u64_at(&fadt, FADT_X_DSDT));
        assert_eq!(sum(&dsdt), 0);
        let body = &dsdt[36..];
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        for bus in 1..17u64 {
            let name = format!("PC{bus:02X}");
            assert!(contains(name.as_bytes()), "{name}");
            let window = 0x40_0000_0000u64 + bus * (1 << 30);
            assert!(contains(&window.to_le_bytes()), "window of bus {bus}");
        }
        assert!(!contains(b"PC11"), "no 18th bridge");
    }

    #[test]
    fn intx_adds_a_prt_to_every_host_bridge() {
        let mem = guest_mem(2 << 20);
        let dsdt_of = |intx: bool, root_buses: u8| {
            let cfg = AcpiConfig {
                boot_cpus: 1,
                max_cpus: 1,
                pci: PciHostBridge {
                    root_buses,
                    intx,
                    ..TEST_PCI
                },
            };
            let tables = write_acpi_tables(&mem, &cfg).unwrap();
            let rsdp = read(&mem, tables.rsdp_addr.0, RSDP_LEN);
            let xsdt = read_table(&mem, u64_at(&rsdp, 24));
            let fadt = (36..xsdt.len())
                .step_by(8)
                .map(|o| read_table(&mem, u64_at(&xsdt, o)))
                .find(|t| &t[0..4] == b"FACP")
                .unwrap();
            read_table(&mem, u64_at(&fadt, FADT_X_DSDT))
        };
        let count = |body: &[u8], needle: &[u8]| {
            body.windows(needle.len()).filter(|w| *w == needle).count()
        };
        assert_eq!(count(&dsdt_of(false, 2), b"_PRT"), 0);
        let dsdt = dsdt_of(true, 2);
        assert_eq!(sum(&dsdt), 0);
        assert_eq!(count(&dsdt, b"_PRT"), 2, "one per host bridge");
        // Device 3 on bus 0: Package (4) { 0x0003FFFF, Zero, Zero, 16 + 3 }.
        let entry = |device: u32, gsi: u8| {
            let mut e = vec![0x12, 0x0b, 0x04, 0x0c];
            e.extend_from_slice(&((device << 16) | 0xffff).to_le_bytes());
            e.extend_from_slice(&[0x00, 0x00, 0x0a, gsi]);
            e
        };
        assert_eq!(count(&dsdt, &entry(3, 19)), 1);
        // Bus 1 shifts the swizzle: its device 3 is on GSI 20; device 31 of bus 1 on 16.
        assert_eq!(count(&dsdt, &entry(3, 20)), 1, "bus 1 device 3");
        assert_eq!(count(&dsdt, &entry(4, 20)), 1, "bus 0 device 4");
        assert_eq!(count(&dsdt, &entry(31, 16)), 1);
        // Device 0 has address 0x0000FFFF, a Word in AML.
        assert_eq!(
            count(
                &dsdt,
                &[0x12, 0x09, 0x04, 0x0b, 0xff, 0xff, 0x00, 0x00, 0x0a, 16]
            ),
            1
        );
    }

    #[derive(Debug, PartialEq)]
    enum MadtEntry {
        Lapic { uid: u8, id: u8, flags: u32 },
        X2apic { uid: u32, id: u32, flags: u32 },
        IoApic { id: u8, addr: u32, gsi_base: u32 },
        LapicNmi { uid: u8, flags: u16, lint: u8 },
        X2apicNmi { uid: u32, flags: u16, lint: u8 },
    }

    fn madt_entries(madt: &[u8]) -> Vec<MadtEntry> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len(), "bad entry at {off}");
            let e = &madt[off..off + len];
            entries.push(match (ty, len) {
                (0, 8) => MadtEntry::Lapic {
                    uid: e[2],
                    id: e[3],
                    flags: u32_at(e, 4),
                },
                (1, 12) => MadtEntry::IoApic {
                    id: e[2],
                    addr: u32_at(e, 4),
                    gsi_base: u32_at(e, 8),
                },
                (4, 6) => MadtEntry::LapicNmi {
                    uid: e[2],
                    flags: u16_at(e, 3),
                    lint: e[5],
                },
                (9, 16) => MadtEntry::X2apic {
                    id: u32_at(e, 4),
                    flags: u32_at(e, 8),
                    uid: u32_at(e, 12),
                },
                (10, 12) => MadtEntry::X2apicNmi {
                    flags: u16_at(e, 2),
                    uid: u32_at(e, 4),
                    lint: e[8],
                },
                _ => panic!("unexpected MADT entry type {ty} length {len}"),
            });
            off += len;
        }
        assert_eq!(off, madt.len());
        entries
    }

    fn ioapic_entry() -> MadtEntry {
        MadtEntry::IoApic {
            id: 0,
            addr: 0xFEC0_0000,
            gsi_base: 0,
        }
    }

    #[test]
    fn fadt_contents() {
        let p = write_and_parse(1, 1);
        let fadt = &p.fadt;
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!((fadt[8], fadt[FADT_MINOR_REVISION]), (6, 5));
        let flags = u32_at(fadt, FADT_FLAGS);
        assert_ne!(flags & FADT_HW_REDUCED, 0);
        assert_ne!(flags & FADT_RESET_REG_SUP, 0);
        assert_eq!(gas_at(fadt, FADT_RESET_REG), io8(ACPI_RESET_PORT));
        assert_eq!(fadt[FADT_RESET_VALUE], ACPI_RESET_VALUE);
        assert_eq!(gas_at(fadt, FADT_SLEEP_CONTROL_REG), io8(ACPI_SLEEP_PORT));
        assert_eq!(gas_at(fadt, FADT_SLEEP_STATUS_REG), io8(ACPI_SLEEP_PORT));

        // VGA and CMOS RTC not present; no legacy devices, no 8042, and MSI
        // must not be marked unsupported.
        let boot_arch = u16_at(fadt, FADT_IAPC_BOOT_ARCH);
        assert_eq!(boot_arch, (1 << 2) | (1 << 5));
        assert_eq!(boot_arch & ((1 << 0) | (1 << 1) | (1 << 3)), 0);

        assert_eq!(
            &fadt[FADT_HYPERVISOR_ID..FADT_HYPERVISOR_ID + 8],
            b"BLKSWARM"
        );
        assert_eq!(u32_at(fadt, FADT_DSDT), 0, "only X_DSDT is used");
        assert_ne!(u64_at(fadt, FADT_X_DSDT), 0);
    }

    #[test]
    fn dsdt_describes_com1_with_its_interrupt() {
        let p = write_and_parse(1, 1);
        let body = &p.dsdt[36..];
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"COM1"), "no COM1 device in {body:x?}");
        // EISAName("PNP0501") compresses to 0x41D00501, stored big-endian.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x05, 0x01]), "no PNP0501 _HID");
        // I/O port descriptor: decode16, min = max = 0x3f8, alignment 1, 8 ports.
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, GSI 4.
        assert!(contains(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
        ]));
    }

    #[test]
    fn dsdt_has_s5() {
        let p = write_and_parse(1, 1);
        let dsdt = &p.dsdt;
        assert_eq!(dsdt[8], 2, "DSDT revision");
        // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix S5_SLEEP_TYPE.
        let s5 = b"\x08_S5_\x12\x04\x01\x0A\x05";
        assert!(
            dsdt[36..].windows(s5.len()).any(|w| w == s5),
            "no _S5_ package in {:x?}",
            &dsdt[36..]
        );
    }

    #[test]
    fn madt_two_of_eight() {
        let p = write_and_parse(2, 8);
        let madt = &p.madt;
        assert_eq!(madt[8], 5, "MADT revision");
        assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");

        let entries = madt_entries(madt);
        let lapics: Vec<_> = entries
            .iter()
            .filter_map(|e| match e {
                MadtEntry::Lapic { uid, id, flags } => Some((*uid, *id, *flags)),
                _ => None,
            })
            .collect();
        assert_eq!(lapics.len(), 8);
        let ids: Vec<u8> = lapics.iter().map(|l| l.1).collect();
        assert_eq!(ids, (0..8).collect::<Vec<u8>>());
        let uids: Vec<u8> = lapics.iter().map(|l| l.0).collect();
        assert_eq!(uids, ids);
        let flags: Vec<u32> = lapics.iter().map(|l| l.2).collect();
        assert_eq!(flags, [1, 1, 2, 2, 2, 2, 2, 2]);

        let ioapics: Vec<_> = entries
            .iter()
            .filter(|e| matches!(e, MadtEntry::IoApic { .. }))
            .collect();
        assert_eq!(ioapics, [&ioapic_entry()]);
        assert!(entries.contains(&MadtEntry::LapicNmi {
            uid: 0xFF,
            flags: 0,
            lint: 1
        }));
        assert!(!entries
            .iter()
            .any(|e| matches!(e, MadtEntry::X2apic { .. } | MadtEntry::X2apicNmi { .. })));
    }

    #[test]
    fn madt_single_cpu() {
        let p = write_and_parse(1, 1);
        let entries = madt_entries(&p.madt);
        assert_eq!(
            entries,
            [
                MadtEntry::Lapic {
                    uid: 0,
                    id: 0,
                    flags: 1
                },
                ioapic_entry(),
                MadtEntry::LapicNmi {
                    uid: 0xFF,
                    flags: 0,
                    lint: 1
                },
            ]
        );
        assert_eq!(p.tables.rsdp_addr.0 % 16, 0);
    }

    #[test]
    fn madt_x2apic_above_254() {
        let p = write_and_parse(4, 300);
        let entries = madt_entries(&p.madt);
        let mut lapic_ids = Vec::new();
        let mut x2apic_ids = Vec::new();
        for e in &entries {
            match *e {
                MadtEntry::Lapic { uid, id, flags } => {
                    assert_eq!(uid, id);
                    assert_eq!(flags, if id < 4 { 1 } else { 2 });
                    lapic_ids.push(u32::from(id));
                }
                MadtEntry::X2apic { uid, id, flags } => {
                    assert_eq!((uid, flags), (id, 2));
                    x2apic_ids.push(id);
                }
                _ => {}
            }
        }
        assert_eq!(lapic_ids, (0..=254).collect::<Vec<u32>>());
        assert_eq!(x2apic_ids, (255..300).collect::<Vec<u32>>());
        assert!(entries.contains(&MadtEntry::X2apicNmi {
            uid: 0xFFFF_FFFF,
            flags: 0,
            lint: 1
        }));
    }

    #[test]
    fn max_cpus_fits_window() {
        let p = write_and_parse(MAX_CPUS, MAX_CPUS);
        assert!(p.tables.end.0 <= ACPI_TABLES_END);
        let enabled = madt_entries(&p.madt)
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    MadtEntry::Lapic { flags: 1, .. } | MadtEntry::X2apic { flags: 1, .. }
                )
            })
            .count();
        assert_eq!(enabled, MAX_CPUS as usize);
    }

    #[test]
    fn invalid_configs() {
        let mem = guest_mem(2 << 20);
        let write = |boot_cpus, max_cpus| write_acpi_tables(&mem, &config(boot_cpus, max_cpus));
        assert!(matches!(
            write(0, 4),
            Err(AcpiError::InvalidCpuCount { .. })
        ));
        assert!(matches!(
            write(0, 0),
            Err(AcpiError::InvalidCpuCount { .. })
        ));
        assert!(matches!(
            write(5, 4),
            Err(AcpiError::InvalidCpuCount { .. })
        ));
        assert!(matches!(
            write(1, MAX_CPUS + 1),
            Err(AcpiError::TooManyCpus { .. })
        ));
        // Nothing was written.
        assert_eq!(read(&mem, ACPI_TABLES_START, 8), [0; 8]);
    }

    #[test]
    fn guest_memory_too_small() {
        // Memory ends in the middle of the table window.
        let mem = guest_mem(0xE_0100);
        let err = write_acpi_tables(&mem, &config(1, 8)).unwrap_err();
        assert!(matches!(err, AcpiError::NotInGuestMemory { .. }), "{err}");
        // Checked before writing: the RSDP was not written either.
        assert_eq!(read(&mem, ACPI_TABLES_START, 8), [0; 8]);

        let mem = guest_mem(0x8_0000);
        let err = write_acpi_tables(&mem, &config(1, 1)).unwrap_err();
        assert!(matches!(err, AcpiError::NotInGuestMemory { .. }), "{err}");
    }

    #[test]
    fn layout_rejects_overflowing_window() {
        let mut layout = Layout::new();
        assert_eq!(layout.alloc(36).unwrap(), GuestAddress(ACPI_TABLES_START));
        // Aligned to 8 after the 36-byte RSDP.
        assert_eq!(
            layout.alloc(10).unwrap(),
            GuestAddress(ACPI_TABLES_START + 40)
        );
        let room = (ACPI_TABLES_END - layout.end.next_multiple_of(TABLE_ALIGN)) as usize;
        assert!(matches!(
            layout.alloc(room + 1),
            Err(AcpiError::TablesTooLarge { .. })
        ));
        assert_eq!(layout.alloc(room).unwrap().0 + room as u64, ACPI_TABLES_END);
        assert!(layout.alloc(1).is_err());
        assert!(Layout { end: u64::MAX }.alloc(1).is_err());
    }
}
