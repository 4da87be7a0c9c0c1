//! The MSI-X state of one PCI function: vector table, pending bit array (PBA), and the enable
//! and function-mask bits of the capability's message control word.
//!
//! The device's BAR handler forwards table and PBA accesses here, the PCI configuration code
//! forwards message control writes, and device I/O threads call [`Msix::signal`]. A vector is
//! *live* when MSI-X is enabled, the function is not masked, and its table entry is not masked;
//! the [`MsiVector`] behind it is configured only on real changes of its liveness or message,
//! because Linux rewrites entries far more often than they change.
//!
//! One short mutex per function covers the table, the PBA and the delivery decision: `signal`
//! and an unmask take the same lock, so a signal that finds the vector masked always leaves
//! its pending bit where the unmask will see it, and no interrupt is lost between the two.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::msi::{MsiMessage, MsiPath, MsiVector};

/// Bytes per MSI-X table entry: address low, address high, data, vector control.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// The message control word's table size field is 11 bits wide (PCI 3.0, 6.8.2.3).
pub const MSIX_MAX_VECTORS: usize = 2048;
/// "No vector": what virtio (VIRTIO_MSI_NO_VECTOR) and others write to mean "do not signal".
pub const MSIX_NO_VECTOR: u16 = 0xffff;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask (all vectors masked, whatever their entries say).
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: table size minus one.
pub const MSIX_CONTROL_TABLE_SIZE_MASK: u16 = 0x07ff;

/// Vector control bit 0; the other bits are reserved and read as zero.
const ENTRY_CONTROL_MASKED: u32 = 1;
const DWORD_ADDRESS_LOW: usize = 0;
const DWORD_ADDRESS_HIGH: usize = 1;
const DWORD_DATA: usize = 2;
const DWORD_VECTOR_CONTROL: usize = 3;
const PBA_BITS_PER_QWORD: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    /// The table must hold between 1 and [`MSIX_MAX_VECTORS`] entries.
    #[error("MSI-X table size {0} is outside 1..={MSIX_MAX_VECTORS}")]
    BadTableSize(usize),
}

/// Delivery counters of one function, for the run report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsixCounters {
    /// Calls to [`MsiVector::inject`], including pending bits delivered on unmask.
    pub injected: u64,
    /// The part of `injected` that delivered a pending bit when its vector became live.
    pub pending_delivered: u64,
    /// Signals that found their vector masked and set (or found set) its pending bit.
    pub pended: u64,
    /// Signals for a vector index outside the table, or [`MSIX_NO_VECTOR`].
    pub dropped_invalid: u64,
    /// Signals while MSI-X is disabled: the function would use INTx, which it does not have.
    pub dropped_disabled: u64,
    /// Signals for a live vector whose message does not target the LAPIC range, or whose
    /// delivery path refused the message.
    pub dropped_unroutable: u64,
    /// `configure` or `inject` calls that returned an error.
    pub delivery_errors: u64,
    /// Table or PBA accesses of the wrong size, alignment or range, and PBA writes.
    pub ignored_accesses: u64,
}

/// What the guest programmed into one vector, for reports (e.g. its destination APIC id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixVectorState {
    pub message: MsiMessage,
    pub masked: bool,
    pub pending: bool,
    /// The delivery path is configured with `message` and unmasked.
    pub live: bool,
}

/// One vector in a [`MsixSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixVectorSnapshot {
    pub state: MsixVectorState,
    /// Interrupts this vector delivered, including pending bits delivered on unmask.
    pub injected: u64,
    /// The part of `injected` that went through an irqfd; the rest used KVM_SIGNAL_MSI.
    pub through_irqfd: u64,
    /// Signals that found the vector masked (or MSI-X function-masked) and left it pending.
    pub pended: u64,
    /// `injected` by destination APIC id (the message the guest wrote when each was sent),
    /// in order of first use.
    pub by_destination: Vec<(u32, u64)>,
}

/// Delivery counts of one vector.
#[derive(Debug, Clone, Default)]
struct VectorDelivery {
    injected: u64,
    through_irqfd: u64,
    pended: u64,
    by_destination: Vec<(u32, u64)>,
}

/// The whole function as one consistent picture, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixSnapshot {
    pub enabled: bool,
    pub function_masked: bool,
    /// One per table entry.
    pub vectors: Vec<MsixVectorSnapshot>,
    pub counters: MsixCounters,
}

#[derive(Debug, Clone, Copy)]
struct TableEntry {
    dwords: [u32; 4],
}

impl TableEntry {
    /// Entries come out of reset masked (PCI 3.0, 6.8.2.9).
    const RESET: Self = Self {
        dwords: [0, 0, 0, ENTRY_CONTROL_MASKED],
    };

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.dwords[DWORD_ADDRESS_HIGH]) << 32)
                | u64::from(self.dwords[DWORD_ADDRESS_LOW]),
            data: self.dwords[DWORD_DATA],
        }
    }

    fn masked(&self) -> bool {
        self.dwords[DWORD_VECTOR_CONTROL] & ENTRY_CONTROL_MASKED != 0
    }

    fn write_dword(&mut self, index: usize, value: u32) {
        let value = if index == DWORD_VECTOR_CONTROL {
            value & ENTRY_CONTROL_MASKED
        } else {
            value
        };
        if let Some(dword) = self.dwords.get_mut(index) {
            *dword = value;
        }
    }
}

struct MsixRegisters {
    enabled: bool,
    function_masked: bool,
    entries: Box<[TableEntry]>,
    pending: Box<[u64]>,
    /// What each vector's delivery path was last configured with: it gates `inject`, and
    /// comparing against it keeps `configure` calls to real changes.
    configured: Box<[Option<MsiMessage>]>,
    counters: MsixCounters,
    /// Per-vector shares of the counters: reports show which vector (and so which queue and
    /// vCPU) carried the interrupts.
    per_vector: Box<[VectorDelivery]>,
}

impl MsixRegisters {
    fn is_pending(&self, index: usize) -> bool {
        self.pending
            .get(index / PBA_BITS_PER_QWORD)
            .is_some_and(|qword| qword & (1 << (index % PBA_BITS_PER_QWORD)) != 0)
    }

    fn set_pending(&mut self, index: usize, pending: bool) {
        if let Some(qword) = self.pending.get_mut(index / PBA_BITS_PER_QWORD) {
            let bit = 1 << (index % PBA_BITS_PER_QWORD);
            if pending {
                *qword |= bit;
            } else {
                *qword &= !bit;
            }
        }
    }

    fn entry_unmasked(&self, index: usize) -> bool {
        self.entries.get(index).is_some_and(|e| !e.masked())
    }

    fn is_live(&self, index: usize) -> bool {
        self.enabled && !self.function_masked && self.entry_unmasked(index)
    }
}

/// The MSI-X table, PBA and control bits of one PCI function, and the delivery paths of its
/// vectors.
pub struct Msix {
    vectors: Box<[Arc<dyn MsiVector>]>,
    registers: Mutex<MsixRegisters>,
}

impl Msix {
    /// A function with one table entry per element of `vectors`, all masked, MSI-X disabled.
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Result<Self, MsixError> {
        let count = vectors.len();
        if count == 0 || count > MSIX_MAX_VECTORS {
            return Err(MsixError::BadTableSize(count));
        }
        Ok(Self {
            vectors: vectors.into_boxed_slice(),
            registers: Mutex::new(MsixRegisters {
                enabled: false,
                function_masked: false,
                entries: vec![TableEntry::RESET; count].into_boxed_slice(),
                pending: vec![0; count.div_ceil(PBA_BITS_PER_QWORD)].into_boxed_slice(),
                configured: vec![None; count].into_boxed_slice(),
                counters: MsixCounters::default(),
                per_vector: vec![VectorDelivery::default(); count].into_boxed_slice(),
            }),
        })
    }

    /// Number of table entries.
    pub fn table_size(&self) -> u16 {
        // At most MSIX_MAX_VECTORS (checked in `new`), so it fits.
        self.vectors.len() as u16
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the PBA occupies in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        self.vectors.len().div_ceil(PBA_BITS_PER_QWORD) as u64 * 8
    }

    /// The read-only part of the message control word: table size minus one.
    pub fn control_table_size_field(&self) -> u16 {
        (self.table_size() - 1) & MSIX_CONTROL_TABLE_SIZE_MASK
    }

    /// Applies the enable and function-mask bits of a message control word the guest wrote.
    pub fn write_control(&self, control: u16) {
        let mut regs = self.lock();
        regs.enabled = control & MSIX_CONTROL_ENABLE != 0;
        regs.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        for index in 0..self.vectors.len() {
            self.refresh(&mut regs, index);
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.lock().enabled
    }

    pub fn is_function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// Raises vector `vector`: delivers it if live, else records it in the PBA if masked.
    pub fn signal(&self, vector: u16) {
        let index = usize::from(vector);
        let mut regs = self.lock();
        if vector == MSIX_NO_VECTOR || index >= self.vectors.len() {
            regs.counters.dropped_invalid += 1;
            return;
        }
        if !regs.enabled {
            regs.counters.dropped_disabled += 1;
        } else if !regs.is_live(index) {
            regs.set_pending(index, true);
            regs.counters.pended += 1;
            if let Some(delivery) = regs.per_vector.get_mut(index) {
                delivery.pended += 1;
            }
        } else {
            self.inject(&mut regs, index);
        }
    }

    /// A guest read of the table at `offset` (4 or 8 bytes, naturally aligned).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let mut regs = self.lock();
        let Some((entry, first_dword)) = self.table_slot(offset, data.len()) else {
            regs.counters.ignored_accesses += 1;
            data.fill(0xff);
            return;
        };
        let Some(entry) = regs.entries.get(entry) else {
            data.fill(0xff);
            return;
        };
        for (chunk, dword) in data
            .chunks_mut(4)
            .zip(entry.dwords.iter().skip(first_dword))
        {
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
    }

    /// A guest write to the table at `offset` (4 or 8 bytes, naturally aligned). An 8-byte
    /// write updates both dwords before the vector is re-evaluated, so a 64-bit address write
    /// to a live entry reconfigures it once.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let mut regs = self.lock();
        let Some((index, first_dword)) = self.table_slot(offset, data.len()) else {
            regs.counters.ignored_accesses += 1;
            return;
        };
        let Some(entry) = regs.entries.get_mut(index) else {
            return;
        };
        for (position, chunk) in data.chunks_exact(4).enumerate() {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            entry.write_dword(first_dword + position, u32::from_le_bytes(bytes));
        }
        self.refresh(&mut regs, index);
    }

    /// A guest read of the PBA at `offset` (4 or 8 bytes, naturally aligned).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let mut regs = self.lock();
        let len = data.len() as u64;
        let valid = matches!(len, 4 | 8)
            && offset.is_multiple_of(len)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.pba_len());
        if !valid {
            regs.counters.ignored_accesses += 1;
            data.fill(0xff);
            return;
        }
        let Some(qword) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| regs.pending.get(i))
        else {
            data.fill(0xff);
            return;
        };
        let bytes = qword.to_le_bytes();
        let start = (offset % 8) as usize;
        match bytes.get(start..start + data.len()) {
            Some(part) => data.copy_from_slice(part),
            None => data.fill(0xff),
        }
    }

    /// The PBA is read-only: writes are ignored (and counted).
    pub fn pba_write(&self, _offset: u64, _data: &[u8]) {
        self.lock().counters.ignored_accesses += 1;
    }

    /// Back to the power-on state: MSI-X disabled, entries masked and zeroed, PBA clear.
    /// For a reset of the whole function (not a virtio device reset, which leaves MSI-X alone).
    pub fn reset(&self) {
        let mut regs = self.lock();
        regs.enabled = false;
        regs.function_masked = false;
        regs.entries.fill(TableEntry::RESET);
        regs.pending.fill(0);
        for index in 0..self.vectors.len() {
            self.refresh(&mut regs, index);
        }
    }

    /// The state of vector `index`, or None outside the table.
    pub fn vector_state(&self, index: u16) -> Option<MsixVectorState> {
        Self::vector_state_locked(&self.lock(), usize::from(index))
    }

    /// Control bits, every vector and the counters, read under one lock (a monitor reading
    /// hundreds of functions several times a second should not take one lock per vector).
    pub fn snapshot(&self) -> MsixSnapshot {
        let regs = self.lock();
        let vectors = (0..regs.entries.len())
            .filter_map(|index| {
                let delivery = regs.per_vector.get(index)?;
                Some(MsixVectorSnapshot {
                    state: Self::vector_state_locked(&regs, index)?,
                    injected: delivery.injected,
                    through_irqfd: delivery.through_irqfd,
                    pended: delivery.pended,
                    by_destination: delivery.by_destination.clone(),
                })
            })
            .collect();
        MsixSnapshot {
            enabled: regs.enabled,
            function_masked: regs.function_masked,
            vectors,
            counters: regs.counters,
        }
    }

    fn vector_state_locked(regs: &MsixRegisters, index: usize) -> Option<MsixVectorState> {
        let entry = regs.entries.get(index)?;
        Some(MsixVectorState {
            message: entry.message(),
            masked: entry.masked(),
            pending: regs.is_pending(index),
            live: regs.is_live(index) && regs.configured.get(index).is_some_and(Option::is_some),
        })
    }

    pub fn counters(&self) -> MsixCounters {
        self.lock().counters
    }

    /// The entry and first dword a table access of `len` bytes at `offset` touches, if the
    /// access is one the table accepts.
    fn table_slot(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let len = len as u64;
        let aligned = matches!(len, 4 | 8) && offset.is_multiple_of(len);
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.table_len());
        if !(aligned && in_range) {
            return None;
        }
        let entry = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        let dword = ((offset % MSIX_TABLE_ENTRY_SIZE) / 4) as usize;
        Some((entry, dword))
    }

    /// Brings vector `index`'s delivery path in line with the registers, and delivers its
    /// pending interrupt if it just became deliverable.
    fn refresh(&self, regs: &mut MsixRegisters, index: usize) {
        let (Some(entry), Some(vector)) = (regs.entries.get(index), self.vectors.get(index)) else {
            return;
        };
        let message = entry.message();
        let wanted = (regs.is_live(index) && message.is_valid()).then_some(message);
        let Some(configured) = regs.configured.get_mut(index) else {
            return;
        };
        if *configured != wanted {
            if vector.configure(wanted).is_err() {
                // Counted, but the vector follows the guest anyway: marking it unroutable would
                // drop every later interrupt and hang the guest's I/O; a vector that cannot
                // deliver reports that from inject().
                regs.counters.delivery_errors += 1;
            }
            *configured = wanted;
        }
        if regs.is_live(index) && regs.is_pending(index) {
            regs.set_pending(index, false);
            regs.counters.pending_delivered += 1;
            self.inject(regs, index);
        }
    }

    /// Delivers live vector `index`, which the caller checked.
    fn inject(&self, regs: &mut MsixRegisters, index: usize) {
        let routable = regs.configured.get(index).is_some_and(Option::is_some);
        let Some(vector) = self.vectors.get(index).filter(|_| routable) else {
            regs.counters.dropped_unroutable += 1;
            return;
        };
        let destination = regs
            .configured
            .get(index)
            .copied()
            .flatten()
            .map(|message| message.destination_apic_id());
        match vector.inject() {
            Ok(path) => {
                regs.counters.injected += 1;
                let Some(delivery) = regs.per_vector.get_mut(index) else {
                    return;
                };
                delivery.injected += 1;
                if path == MsiPath::Irqfd {
                    delivery.through_irqfd += 1;
                }
                if let Some(destination) = destination {
                    match delivery
                        .by_destination
                        .iter_mut()
                        .find(|(apic_id, _)| *apic_id == destination)
                    {
                        Some((_, count)) => *count += 1,
                        None => delivery.by_destination.push((destination, 1)),
                    }
                }
            }
            Err(_) => regs.counters.delivery_errors += 1,
        }
    }

    /// The registers stay consistent across a panic in another thread (every update is a
    /// plain store), so a poisoned lock is still served.
    fn lock(&self) -> MutexGuard<'_, MsixRegisters> {
        self.registers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Configure(Option<MsiMessage>),
        Inject,
    }

    /// Records calls, and checks the contract that `inject` only follows `configure(Some)`.
    #[derive(Default)]
    struct FakeVector {
        events: Mutex<Vec<Event>>,
        configured: AtomicBool,
        inject_while_unconfigured: AtomicBool,
    }

    impl FakeVector {
        fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }
        fn take_events(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
        fn injects(&self) -> usize {
            self.events()
                .iter()
                .filter(|e| **e == Event::Inject)
                .count()
        }
    }

    impl MsiVector for FakeVector {
        fn configure(&self, message: Option<MsiMessage>) -> io::Result<()> {
            self.configured.store(message.is_some(), Ordering::SeqCst);
            self.events.lock().unwrap().push(Event::Configure(message));
            Ok(())
        }
        fn inject(&self) -> io::Result<MsiPath> {
            if !self.configured.load(Ordering::SeqCst) {
                self.inject_while_unconfigured.store(true, Ordering::SeqCst);
            }
            self.events.lock().unwrap().push(Event::Inject);
            Ok(MsiPath::Irqfd)
        }
    }

    const ADDRESS: u64 = 0xfee0_1000;
    const DATA: u32 = 0x41;

    fn msix(count: usize) -> (Msix, Vec<Arc<FakeVector>>) {
        let fakes: Vec<Arc<FakeVector>> = (0..count).map(|_| Arc::default()).collect();
        let vectors = fakes
            .iter()
            .map(|f| f.clone() as Arc<dyn MsiVector>)
            .collect();
        (Msix::new(vectors).unwrap(), fakes)
    }

    fn program(msix: &Msix, index: u64, address: u64, data: u32) {
        let base = index * MSIX_TABLE_ENTRY_SIZE;
        msix.table_write(base, &address.to_le_bytes());
        msix.table_write(base + 8, &data.to_le_bytes());
    }

    fn set_masked(msix: &Msix, index: u64, masked: bool) {
        msix.table_write(index * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn read_u32(msix: &Msix, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        msix.table_read(offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn pba(msix: &Msix) -> u64 {
        let mut bytes = [0u8; 8];
        msix.pba_read(0, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn message() -> MsiMessage {
        MsiMessage {
            address: ADDRESS,
            data: DATA,
        }
    }

    #[test]
    fn rejects_bad_table_sizes() {
        assert_eq!(
            Msix::new(Vec::new()).err(),
            Some(MsixError::BadTableSize(0))
        );
        let (msix, _) = msix(MSIX_MAX_VECTORS);
        assert_eq!(msix.control_table_size_field(), 0x7ff);
        assert_eq!(msix.pba_len(), 256);
    }

    #[test]
    fn entries_reset_masked_and_read_back_what_was_written() {
        let (msix, fakes) = msix(3);
        assert_eq!(msix.table_len(), 48);
        assert_eq!(msix.pba_len(), 8);
        assert_eq!(read_u32(&msix, 12), 1, "entries come out of reset masked");
        program(&msix, 1, 0x1_fee0_2000, 0x1234);
        msix.table_write(28, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read_u32(&msix, 16), 0xfee0_2000);
        assert_eq!(read_u32(&msix, 20), 1);
        assert_eq!(read_u32(&msix, 24), 0x1234);
        assert_eq!(read_u32(&msix, 28), 1, "reserved control bits read as zero");
        let mut qword = [0u8; 8];
        msix.table_read(16, &mut qword);
        assert_eq!(u64::from_le_bytes(qword), 0x1_fee0_2000);
        assert!(
            fakes.iter().all(|f| f.events().is_empty()),
            "still disabled"
        );
    }

    #[test]
    fn ignores_bad_sizes_alignment_range_and_pba_writes() {
        let (msix, _) = msix(2);
        program(&msix, 0, ADDRESS, DATA);
        msix.table_write(0, &[1, 2]);
        msix.table_write(2, &[0; 4]);
        msix.table_write(4, &[0; 8]);
        msix.table_write(32, &[0; 4]);
        msix.table_write(u64::MAX - 3, &[0; 4]);
        msix.pba_write(0, &[0xff; 8]);
        assert_eq!(read_u32(&msix, 0), ADDRESS as u32);
        let mut word = [0u8; 2];
        msix.table_read(0, &mut word);
        assert_eq!(word, [0xff; 2]);
        let mut dword = [0u8; 4];
        msix.pba_read(8, &mut dword);
        assert_eq!(dword, [0xff; 4]);
        assert_eq!(msix.counters().ignored_accesses, 8);
    }

    #[test]
    fn configures_only_on_liveness_or_message_changes() {
        let (msix, fakes) = msix(2);
        let fake = &fakes[0];
        program(&msix, 0, ADDRESS, DATA);
        set_masked(&msix, 0, false);
        assert!(fake.events().is_empty(), "MSI-X still disabled");
        msix.write_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert!(fake.events().is_empty(), "function masked");
        msix.write_control(MSIX_CONTROL_ENABLE);
        assert_eq!(fake.take_events(), vec![Event::Configure(Some(message()))]);
        assert!(fakes[1].events().is_empty(), "entry 1 is still masked");

        // Rewriting the same message, or the same mask state, is not a change.
        program(&msix, 0, ADDRESS, DATA);
        set_masked(&msix, 0, false);
        msix.write_control(MSIX_CONTROL_ENABLE);
        assert!(fake.events().is_empty());

        // A new message on a live vector reconfigures it once per change.
        msix.table_write(8, &0x42u32.to_le_bytes());
        let moved = MsiMessage {
            address: ADDRESS,
            data: 0x42,
        };
        assert_eq!(fake.take_events(), vec![Event::Configure(Some(moved))]);
        // While masked, message changes do not reach the delivery path.
        set_masked(&msix, 0, true);
        program(&msix, 0, 0xfee0_3000, 0x43);
        assert_eq!(fake.take_events(), vec![Event::Configure(None)]);
        set_masked(&msix, 0, false);
        let state = msix.vector_state(0).unwrap();
        assert_eq!(state.message.destination_apic_id(), 3);
        assert!(state.live);
        assert_eq!(
            fake.take_events(),
            vec![Event::Configure(Some(state.message))]
        );

        msix.write_control(0);
        assert_eq!(fake.take_events(), vec![Event::Configure(None)]);
        assert!(!msix.vector_state(0).unwrap().live);
        assert_eq!(msix.vector_state(2), None);
    }

    #[test]
    fn masked_signals_pend_and_deliver_on_unmask() {
        let (msix, fakes) = msix(2);
        let fake = &fakes[1];
        program(&msix, 1, ADDRESS, DATA);
        msix.write_control(MSIX_CONTROL_ENABLE);
        msix.signal(1);
        msix.signal(1);
        assert_eq!(pba(&msix), 0b10);
        assert!(msix.vector_state(1).unwrap().pending);
        assert!(fake.events().is_empty());
        set_masked(&msix, 1, false);
        assert_eq!(
            fake.take_events(),
            vec![Event::Configure(Some(message())), Event::Inject],
            "two masked signals coalesce into one pending interrupt"
        );
        assert_eq!(pba(&msix), 0);
        msix.signal(1);
        assert_eq!(fake.take_events(), vec![Event::Inject]);

        // Function mask: pends even though the entry is unmasked, delivers on clear.
        msix.write_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        msix.signal(1);
        assert_eq!(pba(&msix), 0b10);
        let mut high = [0u8; 4];
        msix.pba_read(4, &mut high);
        assert_eq!(high, [0; 4]);
        msix.write_control(MSIX_CONTROL_ENABLE);
        assert_eq!(
            fake.take_events(),
            vec![
                Event::Configure(None),
                Event::Configure(Some(message())),
                Event::Inject
            ]
        );
        let counters = msix.counters();
        assert_eq!(counters.injected, 3);
        assert_eq!(counters.pended, 3);
    }

    #[test]
    fn snapshot_counts_injections_per_vector() {
        let (msix, _) = msix(3);
        program(&msix, 1, ADDRESS, DATA);
        program(&msix, 2, 0xfee0_2000, DATA);
        set_masked(&msix, 1, false);
        msix.write_control(MSIX_CONTROL_ENABLE);
        msix.signal(1);
        msix.signal(1);
        msix.signal(2);
        set_masked(&msix, 2, false);
        let snapshot = msix.snapshot();
        assert!(snapshot.enabled && !snapshot.function_masked);
        let injected: Vec<u64> = snapshot.vectors.iter().map(|v| v.injected).collect();
        assert_eq!(
            injected,
            vec![0, 2, 1],
            "vector 2's pending bit counts on unmask"
        );
        assert_eq!(snapshot.counters.injected, 3);
        assert_eq!(snapshot.vectors[2].state, msix.vector_state(2).unwrap());
        assert_eq!(snapshot.vectors[2].state.message.destination_apic_id(), 2);
        assert!(snapshot.vectors[0].state.masked && !snapshot.vectors[0].state.live);
        assert_eq!(snapshot.vectors[2].pended, 1, "signalled while masked");
        assert_eq!(snapshot.vectors[1].pended, 0);
        assert_eq!(snapshot.vectors[1].through_irqfd, 2);
        assert_eq!(snapshot.vectors[1].by_destination, [(1, 2)]);
        assert_eq!(snapshot.vectors[2].by_destination, [(2, 1)]);
        // The guest moves vector 1 to APIC 3 (as irqbalance does): counted per destination.
        program(&msix, 1, 0xfee0_3000, DATA);
        msix.signal(1);
        assert_eq!(msix.snapshot().vectors[1].by_destination, [(1, 2), (3, 1)]);
        msix.reset();
        assert_eq!(
            msix.snapshot().vectors[1].injected,
            3,
            "counts survive a reset"
        );
    }

    #[test]
    fn drops_invalid_disabled_and_unroutable_signals() {
        let (msix, fakes) = msix(2);
        msix.signal(MSIX_NO_VECTOR);
        msix.signal(2);
        msix.signal(0);
        msix.write_control(MSIX_CONTROL_ENABLE);
        // Unmasked with a zero address: a guest bug, never configured, never delivered.
        set_masked(&msix, 0, false);
        msix.signal(0);
        assert!(fakes[0].events().is_empty());
        let counters = msix.counters();
        assert_eq!(counters.dropped_invalid, 2);
        assert_eq!(counters.dropped_disabled, 1);
        assert_eq!(counters.dropped_unroutable, 1);
        assert_eq!(counters.injected, 0);
        assert_eq!(pba(&msix), 0);
    }

    #[test]
    fn reset_masks_everything_and_unconfigures() {
        let (msix, fakes) = msix(1);
        program(&msix, 0, ADDRESS, DATA);
        set_masked(&msix, 0, false);
        msix.write_control(MSIX_CONTROL_ENABLE);
        msix.write_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        msix.signal(0);
        fakes[0].take_events();
        msix.reset();
        assert!(fakes[0].events().is_empty(), "already unconfigured");
        assert!(!msix.is_enabled());
        assert_eq!(pba(&msix), 0);
        assert_eq!(read_u32(&msix, 0), 0);
        assert_eq!(read_u32(&msix, 12), 1);
    }

    /// One thread signals while another flips the mask: every signal must be injected or
    /// leave its pending bit set, and the final unmask must deliver what is pending.
    #[test]
    fn mask_races_lose_no_interrupt() {
        const SIGNALS: u64 = 20_000;
        let (msix, fakes) = msix(1);
        let msix = Arc::new(msix);
        program(&msix, 0, ADDRESS, DATA);
        msix.write_control(MSIX_CONTROL_ENABLE);
        let done = Arc::new(AtomicBool::new(false));
        let toggler = {
            let msix = msix.clone();
            let done = done.clone();
            thread::spawn(move || {
                let mut masked = false;
                while !done.load(Ordering::SeqCst) {
                    masked = !masked;
                    set_masked(&msix, 0, masked);
                }
                set_masked(&msix, 0, true);
            })
        };
        for _ in 0..SIGNALS {
            msix.signal(0);
        }
        done.store(true, Ordering::SeqCst);
        toggler.join().unwrap();
        // The toggler left the entry masked: this last signal must survive as a pending bit.
        msix.signal(0);
        assert_eq!(pba(&msix), 1);

        set_masked(&msix, 0, false);
        let counters = msix.counters();
        // Every signal was delivered at once or recorded as pending.
        assert_eq!(
            counters.injected - counters.pending_delivered + counters.pended,
            SIGNALS + 1
        );
        assert!(
            counters.pended > 1 && counters.pending_delivered > 0,
            "{counters:?}"
        );
        assert_eq!(fakes[0].events().last(), Some(&Event::Inject));
        assert_eq!(pba(&msix), 0);
        assert_eq!(fakes[0].injects() as u64, counters.injected);
        assert!(!fakes[0].inject_while_unconfigured.load(Ordering::SeqCst));
    }
}
