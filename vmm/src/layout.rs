//! Guest physical memory layout for a firmware-less x86_64 Linux boot.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT (boot-time, replaced by the kernel)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  identity page tables (PML4, PDPT, PD: first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA start: RAM ends here in the low megabyte
//! 0x000e_0000  ACPI tables (RSDP inside the BIOS area Linux scans)
//! 0x0010_0000  kernel (code32_start), then RAM up to the 32-bit MMIO gap
//! 0xc000_0000  32-bit MMIO gap: PCI 32-bit window, then
//! 0xe000_0000  PCI ECAM (256 buses x 1 MiB), IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than fits below the gap
//! 0x40_0000_0000 PCI 64-bit MMIO window (BARs), 64 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const IDT_START: GuestAddress = GuestAddress(0x520);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPT_START: GuestAddress = GuestAddress(0xa000);
pub const PD_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x2_0000);
/// Longest command line we place; the kernel's own limit (setup header) may be lower.
pub const CMDLINE_MAX_BYTES: usize = 0x1_0000;
/// End of usable RAM in the first megabyte: the EBDA and the BIOS area follow.
pub const EBDA_START: u64 = 0x9_fc00;
pub const HIGH_MEMORY_START: GuestAddress = GuestAddress(0x10_0000);
/// Start of the 32-bit MMIO gap: RAM below 4 GiB stops here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// 32-bit PCI MMIO window, announced to the guest; the VMM places BARs in the 64-bit window.
pub const PCI_MMIO32_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM) of segment 0: 1 MiB per bus.
pub const PCI_ECAM_START: u64 = PCI_MMIO32_START + PCI_MMIO32_SIZE;
pub const PCI_ECAM_BUSES: u64 = 256;
pub const PCI_ECAM_SIZE: u64 = PCI_ECAM_BUSES << 20;
/// 64-bit PCI MMIO window for BARs. Below 1 TiB: nested guests under QEMU TCG see 40
/// physical address bits.
pub const PCI_MMIO64_START: u64 = 0x40_0000_0000;
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;
/// Each root bus (one ACPI host bridge each) forwards its own slice of the 64-bit window:
/// host bridges' windows must not overlap, and 1 GiB holds 32 devices of any BAR size we use.
pub const PCI_BUS_WINDOW_BYTES: u64 = 1 << 30;
/// Root buses the 64-bit window has slices for; 64 x 32 devices is well past 1000 disks.
pub const PCI_ROOT_BUSES_MAX: u64 = PCI_MMIO64_SIZE / PCI_BUS_WINDOW_BYTES;
/// Guest RAM must end below the 64-bit PCI window.
pub const MAX_RAM_BYTES: u64 = PCI_MMIO64_START - MMIO_GAP_END + MMIO_GAP_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM on Intel needs three pages for the real-mode TSS and one for the identity map,
/// below 4 GiB and outside RAM; they sit just under the IOAPIC.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// The RAM ranges of a guest with `size` bytes: below the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
const _: () = assert!(PCI_ROOT_BUSES_MAX <= PCI_ECAM_BUSES);

// The boot stack grows down from between the zero page and the page tables.
const _: () = assert!(BOOT_STACK_TOP < PML4_START.0 && BOOT_STACK_TOP > ZERO_PAGE_START.0 + 0x1000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
            ]
        );
        assert_eq!(ranges.iter().map(|r| r.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut regions = [
            (GDT_START.0, 0x20),
            (IDT_START.0, 8),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x1000),
            (PDPT_START.0, 0x1000),
            (PD_START.0, 0x1000),
            (CMDLINE_START.0, CMDLINE_MAX_BYTES as u64),
        ];
        regions.sort();
        for pair in regions.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        let last = regions.last().unwrap();
        assert!(last.0 + last.1 <= EBDA_START);
    }
}
