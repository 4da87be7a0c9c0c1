//! The NVMe controller as a PCI function: class 01:08:02 (NVM Express), one 64-bit memory BAR
//! holding the controller's registers and doorbells followed by the MSI-X table and PBA, and
//! an MSI-X capability. Linux's nvme driver binds by class code.
//!
//! BAR 0 layout ([`NvmeBarLayout`]):
//!
//! | offset | contents |
//! |---|---|
//! | 0 | controller registers (CAP .. ACQ) |
//! | 0x1000 | doorbells, one SQ tail and one CQ head per queue id |
//! | registers length (a power of two, >= 16 KiB) | MSI-X table |
//! | next 4 KiB boundary | MSI-X PBA |
//!
//! Interrupts are MSI-X only: the function has no INTx pin. Each completion queue signals the
//! vector the guest chose when it created the queue (admin CQ: vector 0); masking, pending
//! bits and routes are the [`Msix`] table's business.

use std::sync::Arc;

use irq::msi::MsiVector;
use irq::msix::{Msix, MsixError, MSIX_CONTROL_TABLE_SIZE_MASK};
use vm_memory::GuestMemoryMmap;

use super::registers::{DOORBELL_BASE, DOORBELL_STRIDE};
use super::{ControllerConfig, NvmeConfigError, NvmeController, NvmeInterrupt};
use crate::io::IoPool;
use crate::pci::config::{
    PciConfigError, PciConfigSpace, PciIds, MSIX_CAP_CONTROL, PCI_INTERRUPT_PIN_NONE,
};
use crate::pci::{BarRegion, PciDevice};

/// Mass storage, non-volatile memory controller, NVM Express (PCI code and ID assignment 1.x).
pub const NVME_CLASS_CODE: u32 = 0x01_08_02;
/// Device id under the controller's vendor id. Deliberately not QEMU's 1b36:0010, which Linux
/// quirks (it ignores that controller's namespace identifiers, among other things).
pub const NVME_PCI_DEVICE_ID: u16 = 0x5a01;
/// The only BAR.
pub const NVME_BAR: u8 = 0;
/// Linux maps at least this much of BAR 0 (NVME_REG_DBS plus a doorbell page).
const MIN_REGISTERS_LEN: u64 = 0x4000;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum NvmePciError {
    #[error("MSI-X: {0}")]
    Msix(#[from] MsixError),
    #[error("PCI configuration space: {0}")]
    Config(#[from] PciConfigError),
    #[error("BAR 0 at {address:#x} is not aligned to its size {size:#x}")]
    MisalignedBar { address: u64, size: u64 },
    #[error("controller: {0}")]
    Controller(#[from] NvmeConfigError),
}

/// Where registers, doorbells, MSI-X table and PBA sit in BAR 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeBarLayout {
    /// Registers and doorbells: what the controller decodes.
    pub registers_len: u64,
    pub msix_table_offset: u64,
    pub msix_table_len: u64,
    pub msix_pba_offset: u64,
    pub msix_pba_len: u64,
    /// The whole BAR: a power of two.
    pub size: u64,
}

impl NvmeBarLayout {
    /// The layout for a controller with queue ids up to `max_queue_id` and `vectors` MSI-X
    /// table entries.
    pub fn new(max_queue_id: u16, vectors: u16) -> Self {
        let doorbells = (u64::from(max_queue_id) + 1) * 2 * DOORBELL_STRIDE;
        let registers_len = (DOORBELL_BASE + doorbells)
            .next_power_of_two()
            .max(MIN_REGISTERS_LEN);
        let msix_table_offset = registers_len;
        let msix_table_len = u64::from(vectors) * irq::msix::MSIX_TABLE_ENTRY_SIZE;
        let msix_pba_offset = (msix_table_offset + msix_table_len).next_multiple_of(PAGE);
        let msix_pba_len = u64::from(vectors).div_ceil(64) * 8;
        let size = (msix_pba_offset + msix_pba_len).next_power_of_two();
        NvmeBarLayout {
            registers_len,
            msix_table_offset,
            msix_table_len,
            msix_pba_offset,
            msix_pba_len,
            size,
        }
    }

    /// The layout of a controller configured as `config`.
    pub fn for_config(config: &ControllerConfig) -> Self {
        Self::new(config.max_queue_id(), config.interrupt_vectors)
    }

    fn region(&self, offset: u64, len: usize) -> Option<BarArea> {
        let end = offset.checked_add(len as u64)?;
        let inside = |start: u64, area_len: u64| offset >= start && end <= start + area_len;
        if inside(0, self.registers_len) {
            Some(BarArea::Controller(offset))
        } else if inside(self.msix_table_offset, self.msix_table_len) {
            Some(BarArea::MsixTable(offset - self.msix_table_offset))
        } else if inside(self.msix_pba_offset, self.msix_pba_len) {
            Some(BarArea::MsixPba(offset - self.msix_pba_offset))
        } else {
            None
        }
    }
}

/// What a BAR access lands on, with the offset inside it.
enum BarArea {
    Controller(u64),
    MsixTable(u64),
    MsixPba(u64),
}

/// Completion queue interrupts through the function's MSI-X table.
struct MsixCompletionInterrupt {
    msix: Arc<Msix>,
}

impl NvmeInterrupt for MsixCompletionInterrupt {
    fn notify_completion_queue(&self, _cq_id: u16, vector: u16) {
        // Out-of-table vectors are refused at queue creation; Msix counts any that slip by.
        self.msix.signal(vector);
    }
}

/// Accesses the function ignored (wrong BAR, gaps, unsupported sizes), for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NvmePciCounters {
    pub ignored_accesses: u64,
}

/// An NVMe controller behind a PCI function.
pub struct NvmePciFunction {
    config: PciConfigSpace,
    controller: NvmeController,
    msix: Arc<Msix>,
    msix_cap: u8,
    layout: NvmeBarLayout,
    counters: NvmePciCounters,
}

impl NvmePciFunction {
    /// A function whose MSI-X table has one entry per element of `msix_vectors` (the
    /// controller config's `interrupt_vectors` is set to match), with BAR 0 at `bar0`, which
    /// must be aligned to [`NvmeBarLayout::for_config`]'s size.
    pub fn new(
        mut controller_config: ControllerConfig,
        memory: GuestMemoryMmap,
        pool: Arc<IoPool>,
        msix_vectors: Vec<Arc<dyn MsiVector>>,
        bar0: u64,
    ) -> Result<Self, NvmePciError> {
        controller_config.validate()?;
        let msix = Arc::new(Msix::new(msix_vectors)?);
        controller_config.interrupt_vectors = msix.table_size();
        let layout = NvmeBarLayout::for_config(&controller_config);
        if !bar0.is_multiple_of(layout.size) {
            return Err(NvmePciError::MisalignedBar {
                address: bar0,
                size: layout.size,
            });
        }
        let mut config = PciConfigSpace::new(PciIds {
            vendor_id: controller_config.vendor_id,
            device_id: NVME_PCI_DEVICE_ID,
            revision_id: 0,
            class_code: NVME_CLASS_CODE,
            subsystem_vendor_id: controller_config.subsystem_vendor_id,
            subsystem_id: NVME_PCI_DEVICE_ID,
        });
        config.add_memory_bar64(NVME_BAR, bar0, layout.size, false)?;
        config.set_interrupt_pin(PCI_INTERRUPT_PIN_NONE);
        let msix_cap = config.add_msix_capability(
            msix.control_table_size_field() & MSIX_CONTROL_TABLE_SIZE_MASK,
            NVME_BAR,
            layout.msix_table_offset as u32,
            layout.msix_pba_offset as u32,
        )?;
        let interrupt = Arc::new(MsixCompletionInterrupt { msix: msix.clone() });
        let controller = NvmeController::new(controller_config, memory, interrupt, pool);
        debug_assert_eq!(controller.bar_size(), layout.registers_len);
        Ok(NvmePciFunction {
            config,
            controller,
            msix,
            msix_cap,
            layout,
            counters: NvmePciCounters::default(),
        })
    }

    pub fn controller(&self) -> &NvmeController {
        &self.controller
    }

    /// For faults injected from outside (controller fatal status).
    pub fn controller_mut(&mut self) -> &mut NvmeController {
        &mut self.controller
    }

    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    pub fn layout(&self) -> NvmeBarLayout {
        self.layout
    }

    pub fn counters(&self) -> NvmePciCounters {
        self.counters
    }

    fn is_msix_control(&self, offset: u16, len: usize) -> bool {
        let control = usize::from(self.msix_cap) + MSIX_CAP_CONTROL;
        let start = usize::from(offset);
        start < control + 2 && start + len > control
    }
}

impl PciDevice for NvmePciFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarRegion> {
        let moved = self.config.write(offset, data);
        if self.is_msix_control(offset, data.len()) {
            let control = usize::from(self.msix_cap) + MSIX_CAP_CONTROL;
            self.msix.write_control(self.config.register_u16(control));
        }
        moved
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match (bar, self.layout.region(offset, data.len())) {
            (NVME_BAR, Some(BarArea::Controller(at))) => self.controller.mmio_read(at, data),
            (NVME_BAR, Some(BarArea::MsixTable(at))) => self.msix.table_read(at, data),
            (NVME_BAR, Some(BarArea::MsixPba(at))) => self.msix.pba_read(at, data),
            _ => {
                self.counters.ignored_accesses += 1;
                data.fill(0);
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match (bar, self.layout.region(offset, data.len())) {
            (NVME_BAR, Some(BarArea::Controller(at))) => self.controller.mmio_write(at, data),
            (NVME_BAR, Some(BarArea::MsixTable(at))) => self.msix.table_write(at, data),
            (NVME_BAR, Some(BarArea::MsixPba(at))) => self.msix.pba_write(at, data),
            _ => self.counters.ignored_accesses += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use irq::msi::MsiMessage;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::io::BlockBackend;
    use crate::nvme::registers::{REG_CAP, REG_CSTS};
    use crate::nvme::NamespaceConfig;

    #[derive(Default)]
    struct CountingVector {
        injects: AtomicU64,
    }

    impl MsiVector for CountingVector {
        fn configure(&self, _message: Option<MsiMessage>) -> std::io::Result<()> {
            Ok(())
        }
        fn inject(&self) -> std::io::Result<irq::MsiPath> {
            self.injects.fetch_add(1, Ordering::SeqCst);
            Ok(irq::MsiPath::Irqfd)
        }
    }

    const BAR0: u64 = 0x40_0000_0000;

    fn function(vectors: usize) -> (NvmePciFunction, Vec<Arc<CountingVector>>) {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let counting: Vec<Arc<CountingVector>> = (0..vectors)
            .map(|_| Arc::new(CountingVector::default()))
            .collect();
        let config = ControllerConfig {
            max_io_queue_pairs: 4,
            namespaces: vec![NamespaceConfig::with_seed(
                Arc::new(BlockBackend::null(1 << 20, None)),
                1,
            )],
            ..ControllerConfig::default()
        };
        let function = NvmePciFunction::new(
            config,
            memory,
            Arc::new(IoPool::new(1).unwrap()),
            counting
                .iter()
                .map(|v| v.clone() as Arc<dyn MsiVector>)
                .collect(),
            BAR0,
        )
        .unwrap();
        (function, counting)
    }

    fn config32(function: &mut NvmePciFunction, offset: u16) -> u32 {
        let mut data = [0u8; 4];
        function.config_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn linux_finds_an_nvme_class_function_with_one_bar_and_msix() {
        let (mut function, _) = function(5);
        // Class code 01:08:02 in the top three bytes of the revision dword.
        assert_eq!(config32(&mut function, 0x08) >> 8, NVME_CLASS_CODE);
        assert_eq!(config32(&mut function, 0x3c) >> 8 & 0xff, 0, "no INTx pin");
        let bars = function.bars();
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].address, BAR0);
        assert_eq!(bars[0].size, function.layout().size);
        // The capability list holds MSI-X with a 5-entry table in BAR 0.
        let cap = config32(&mut function, 0x34) as u16 & 0xff;
        let header = config32(&mut function, cap);
        assert_eq!(header & 0xff, 0x11, "MSI-X capability id");
        assert_eq!((header >> 16) & 0x7ff, 4, "table size - 1");
        let table = config32(&mut function, cap + 4);
        assert_eq!(u64::from(table & !7), function.layout().msix_table_offset);
        assert_eq!(table & 7, 0, "BIR 0");
    }

    #[test]
    fn layout_keeps_registers_table_and_pba_apart_in_a_power_of_two_bar() {
        let layout = NvmeBarLayout::new(4, 5);
        assert_eq!(layout.registers_len, 0x4000);
        assert_eq!(layout.msix_table_offset, 0x4000);
        assert_eq!(layout.msix_pba_offset, 0x5000);
        assert_eq!(layout.size, 0x8000);
        // 1024 queue pairs: doorbells up to 0x1000 + 1025 * 8 bytes, a 2048-entry table.
        let big = NvmeBarLayout::new(1024, 2048);
        assert_eq!(big.registers_len, 0x4000);
        assert!(big.msix_pba_offset >= big.msix_table_offset + 2048 * 16);
        assert!(big.size.is_power_of_two() && big.size >= big.msix_pba_offset + big.msix_pba_len);
    }

    #[test]
    fn bar_accesses_reach_the_controller_and_the_msix_table() {
        let (mut function, vectors) = function(5);
        let mut cap = [0u8; 8];
        function.bar_read(NVME_BAR, REG_CAP, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            function.controller().registers().cap
        );
        let mut csts = [0u8; 4];
        function.bar_read(NVME_BAR, REG_CSTS, &mut csts);
        assert_eq!(u32::from_le_bytes(csts), 0, "not ready before CC.EN");
        // Program and unmask vector 0 through the BAR, enable MSI-X in config space.
        let table = function.layout().msix_table_offset;
        function.bar_write(NVME_BAR, table, &0xfee0_0000u32.to_le_bytes());
        function.bar_write(NVME_BAR, table + 8, &0x41u32.to_le_bytes());
        function.bar_write(NVME_BAR, table + 12, &0u32.to_le_bytes());
        let mut data = [0u8; 4];
        function.bar_read(NVME_BAR, table + 8, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x41);
        let cap = config32(&mut function, 0x34) as u16 & 0xff;
        function.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert!(function.msix().is_enabled());
        // The controller's admin CQ interrupt (vector 0) goes out through the table.
        MsixCompletionInterrupt {
            msix: function.msix().clone(),
        }
        .notify_completion_queue(0, 0);
        assert_eq!(vectors[0].injects.load(Ordering::SeqCst), 1);
        // Outside every area: ignored and counted, reads as zero.
        let gap = function.layout().msix_table_offset + function.layout().msix_table_len + 16;
        let mut gap_data = [0xffu8; 4];
        function.bar_read(NVME_BAR, gap, &mut gap_data);
        assert_eq!(gap_data, [0; 4]);
        function.bar_write(1, 0, &[0; 4]);
        assert_eq!(function.counters().ignored_accesses, 2);
    }

    #[test]
    fn a_misaligned_bar_is_refused() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vector: Arc<dyn MsiVector> = Arc::new(CountingVector::default());
        let config = ControllerConfig {
            namespaces: vec![NamespaceConfig::with_seed(
                Arc::new(BlockBackend::null(1 << 20, None)),
                1,
            )],
            ..ControllerConfig::default()
        };
        let result = NvmePciFunction::new(
            config,
            memory,
            Arc::new(IoPool::new(1).unwrap()),
            vec![vector],
            BAR0 + 0x1000,
        );
        assert!(matches!(result, Err(NvmePciError::MisalignedBar { .. })));
    }
}
