//! Direct Linux boot: the bzImage, initramfs and command line go into guest memory, with the
//! zero page (`boot_params`, e820 map) and the identity page tables and GDT the 64-bit entry
//! point expects (Documentation/arch/x86/boot.rst, "64-bit boot protocol").

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::kvm_segment;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// e820 entry types (arch/x86/include/asm/e820/types.h).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// The zero page holds at most this many e820 entries.
const E820_MAX_ZEROPAGE: usize = 128;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// loadflags bit: the kernel may use the heap up to heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;
/// xloadflags bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const STARTUP_64_OFFSET: u64 = 0x200;
/// The 64-bit boot protocol (with acpi_rsdp_addr) needs version 2.14.
const MIN_BOOT_PROTOCOL: u16 = 0x020e;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel: {0}")]
    Kernel(#[from] linux_loader::loader::Error),
    #[error("kernel boot protocol {0:#x} is older than 2.14 or lacks the 64-bit entry point")]
    OldKernel(u16),
    #[error("command line is {len} bytes; the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("initramfs of {size} bytes does not fit in guest RAM below {limit:#x} above the kernel (ends {kernel_end:#x}); give the guest more --memory")]
    InitramfsTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("cannot read the initramfs: {0}")]
    InitramfsRead(std::io::Error),
    #[error("writing {what} to guest memory failed: {source}")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing the zero page failed: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    #[error("more than {E820_MAX_ZEROPAGE} e820 entries")]
    TooManyE820Entries,
}

/// Where the boot vCPU starts and what it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point (startup_64).
    pub rip: GuestAddress,
    /// The zero page, passed in RSI.
    pub boot_params: GuestAddress,
}

/// The guest's e820 map for `ram_size` bytes of RAM laid out by [`layout::ram_ranges`].
pub fn e820_map(ram_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        // EBDA, VGA hole and BIOS area; the ACPI tables live in the last, so it must not be RAM.
        entry(
            layout::EBDA_START,
            layout::HIGH_MEMORY_START.0 - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    // MCFG's ECAM range must be reserved, or Linux refuses to use it for config space.
    map.push(entry(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        E820_RESERVED,
    ));
    for (start, size) in layout::ram_ranges(ram_size) {
        let (start, size) = if start.0 == 0 {
            // The first range also covers the low megabyte, described above.
            (
                layout::HIGH_MEMORY_START.0,
                size - layout::HIGH_MEMORY_START.0,
            )
        } else {
            (start.0, size)
        };
        map.push(entry(start, size, E820_RAM));
    }
    map.sort_by_key(|e| e.addr);
    map
}

/// Fills the zero page from the kernel's own setup header plus what the VMM placed.
pub fn build_boot_params(
    header: setup_header,
    cmdline: (GuestAddress, usize),
    initramfs: Option<(GuestAddress, u64)>,
    e820: &[boot_e820_entry],
    rsdp: GuestAddress,
) -> Result<boot_params, BootError> {
    if e820.len() > E820_MAX_ZEROPAGE {
        return Err(BootError::TooManyE820Entries);
    }
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= CAN_USE_HEAP;
    // Addresses below 4 GiB by construction of the layout.
    params.hdr.cmd_line_ptr = cmdline.0 .0 as u32;
    params.hdr.cmdline_size = cmdline.1 as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(e820);
    Ok(params)
}

/// Highest page-aligned address that holds `size` bytes below `limit` and above `floor`.
pub fn place_initramfs(size: u64, floor: u64, limit: u64) -> Option<GuestAddress> {
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= floor).then_some(GuestAddress(start))
}

/// GDT entries for the boot vCPU: null, 64-bit code, data, TSS (the kernel loads its own).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_SEGMENT_INDEX: u16 = 1;
pub const DATA_SEGMENT_INDEX: u16 = 2;
pub const TSS_SEGMENT_INDEX: u16 = 3;

/// Packs a segment descriptor from access/flag bits (`flags`: byte 5 in bits 0-7, the flags
/// nibble in bits 12-15), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The KVM view of GDT entry `index` of [`BOOT_GDT`].
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granular = bit(55) == 1;
    kvm_segment {
        base,
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and page tables identity-mapping the first GiB with 2 MiB
/// pages: enough for the decompressor, which builds its own mappings for the rest.
fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let write = |what, result: Result<(), vm_memory::GuestMemoryError>| {
        result.map_err(|source| BootError::GuestMemory { what, source })
    };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(
            "GDT",
            mem.write_obj(*entry, layout::GDT_START.unchecked_add(i as u64 * 8)),
        )?;
    }
    write("IDT", mem.write_obj(0u64, layout::IDT_START))?;
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    write(
        "PML4",
        mem.write_obj(layout::PDPT_START.0 | PRESENT_WRITABLE, layout::PML4_START),
    )?;
    write(
        "PDPT",
        mem.write_obj(layout::PD_START.0 | PRESENT_WRITABLE, layout::PDPT_START),
    )?;
    let mut pd = [0u8; 4096];
    for (i, slot) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | HUGE_PAGE | PRESENT_WRITABLE;
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    write("PD", mem.write_slice(&pd, layout::PD_START))
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Loads kernel, initramfs and command line, and writes the zero page and boot structures.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let mut kernel_file = open(kernel)?;
    let loaded = BzImage::load(mem, None, &mut kernel_file, Some(layout::HIGH_MEMORY_START))?;
    let header = loaded
        .setup_header
        .ok_or(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        ))?;
    if header.version < MIN_BOOT_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::OldKernel(header.version));
    }

    let cmdline_max = (header.cmdline_size as usize).min(layout::CMDLINE_MAX_BYTES - 1);
    if cmdline.len() > cmdline_max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, layout::CMDLINE_START)
        .map_err(|source| BootError::GuestMemory {
            what: "command line",
            source,
        })?;

    let initramfs = match initramfs {
        Some(path) => Some(load_initramfs(mem, ram_size, path, &loaded, &header)?),
        None => None,
    };

    write_boot_structures(mem)?;
    let params = build_boot_params(
        header,
        (layout::CMDLINE_START, cmdline.len()),
        initramfs,
        &e820_map(ram_size),
        rsdp,
    )?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, layout::ZERO_PAGE_START),
        mem,
    )
    .map_err(|e| match e {
        linux_loader::configurator::Error::Linux(e) => BootError::ZeroPage(e.into()),
        other => BootError::ZeroPage(other),
    })?;
    Ok(BootEntry {
        rip: loaded.kernel_load.unchecked_add(STARTUP_64_OFFSET),
        boot_params: layout::ZERO_PAGE_START,
    })
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    path: &Path,
    loaded: &linux_loader::loader::KernelLoaderResult,
    header: &setup_header,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = open(path)?;
    let size = file
        .seek(SeekFrom::End(0))
        .and_then(|size| file.seek(SeekFrom::Start(0)).map(|_| size))
        .map_err(BootError::InitramfsRead)?;
    // The kernel decompresses itself in place up to init_size past its load address.
    let kernel_end = loaded.kernel_load.0 + u64::from(header.init_size);
    let limit = ram_size
        .min(layout::MMIO_GAP_START)
        .min(u64::from(header.initrd_addr_max) + 1);
    let addr = place_initramfs(size, kernel_end, limit).ok_or(BootError::InitramfsTooLarge {
        size,
        limit,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|source| BootError::GuestMemory {
            what: "initramfs",
            source,
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_a_small_guest() {
        let map = e820_map(512 << 20);
        let summary: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            summary,
            vec![
                (0, 0x9_fc00, E820_RAM),
                (0x9_fc00, 0x6_0400, E820_RESERVED),
                (0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
                (0xe000_0000, 0x1000_0000, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn e820_for_a_guest_above_4g_skips_the_gap() {
        let map = e820_map(6 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything except the 384 KiB hole between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, (6 << 30) - (0x10_0000 - 0x9_fc00));
        let last = map.last().unwrap();
        assert_eq!({ last.addr }, 1 << 32);
        assert_eq!({ last.size }, (6 << 30) - layout::MMIO_GAP_START);
        let mut sorted: Vec<_> = map.iter().map(|e| (e.addr, e.size)).collect();
        sorted.sort();
        for pair in sorted.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        assert!(map.iter().all(|e| e.r#type != E820_RAM
            || e.addr + e.size <= layout::MMIO_GAP_START
            || e.addr >= layout::MMIO_GAP_END));
    }

    #[test]
    fn boot_params_carry_what_the_vmm_placed() {
        let header = setup_header {
            version: 0x020f,
            loadflags: 0x1,
            init_size: 0x200_0000,
            ..Default::default()
        };
        let e820 = e820_map(1 << 30);
        let params = build_boot_params(
            header,
            (layout::CMDLINE_START, 42),
            Some((GuestAddress(0x3000_0000), 0x1234)),
            &e820,
            GuestAddress(0xe_0000),
        )
        .unwrap();
        // Copy out of the packed struct before comparing.
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags, 0x81);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries as usize, e820.len());
        let table = params.e820_table;
        assert_eq!({ table[2].addr }, 0x10_0000);
        assert_eq!({ table[2].r#type }, E820_RAM);
    }

    #[test]
    fn too_many_e820_entries_is_an_error() {
        let e820 = vec![boot_e820_entry::default(); E820_MAX_ZEROPAGE + 1];
        assert!(matches!(
            build_boot_params(
                setup_header::default(),
                (layout::CMDLINE_START, 0),
                None,
                &e820,
                GuestAddress(0)
            ),
            Err(BootError::TooManyE820Entries)
        ));
    }

    #[test]
    fn initramfs_goes_to_the_top_page_aligned() {
        assert_eq!(
            place_initramfs(0x1800, 0x10_0000, 0x2000_0000),
            Some(GuestAddress(0x1fff_e000))
        );
        // Does not fit above the kernel.
        assert_eq!(place_initramfs(0x1000_0000, 0x1800_0000, 0x2000_0000), None);
        assert_eq!(place_initramfs(u64::MAX, 0, 0x2000_0000), None);
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let code = segment_from_gdt(BOOT_GDT[1], CODE_SEGMENT_INDEX);
        assert_eq!((code.selector, code.l, code.db, code.present), (8, 1, 0, 1));
        assert_eq!((code.type_, code.s, code.g), (0xb, 1, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[2], DATA_SEGMENT_INDEX);
        assert_eq!((data.selector, data.l, data.db, data.type_), (16, 0, 1, 3));
        let tss = segment_from_gdt(BOOT_GDT[3], TSS_SEGMENT_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (24, 0xb, 0));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn boot_structures_land_in_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(layout::PML4_START).unwrap();
        assert_eq!(pml4, layout::PDPT_START.0 | 3);
        let pd_last: u64 = mem
            .read_obj(layout::PD_START.unchecked_add(511 * 8))
            .unwrap();
        assert_eq!(pd_last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(layout::GDT_START.unchecked_add(8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }
}
