//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A bus is built before the vCPUs start and is read-only afterwards, so lookups take no lock on
//! the bus itself: each device carries its own lock, and only accesses to the same device
//! serialize.

use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`]. Offsets are relative to the start of the range the
/// device was inserted at.
pub trait BusDevice: Send {
    /// Fills `data` with the bytes read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Applies a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs to reach it (e.g. for a report).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of zero length cannot hold a device.
    #[error("empty range at {0:#x}")]
    EmptyRange(u64),
    /// The range wraps around the end of the address space.
    #[error("range {base:#x}+{len:#x} overflows the address space")]
    Overflow { base: u64, len: u64 },
    /// Two devices would answer the same address.
    #[error("range {base:#x}+{len:#x} overlaps an existing device at {existing:#x}")]
    Overlap { base: u64, len: u64, existing: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Sorted, non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let pos = self.entries.partition_point(|e| e.base < base);
        let overlaps_prev = pos > 0 && {
            let prev = &self.entries[pos - 1];
            prev.base + prev.len > base
        };
        let overlaps_next = self.entries.get(pos).is_some_and(|next| next.base < end);
        if overlaps_prev || overlaps_next {
            let existing = if overlaps_prev {
                self.entries[pos - 1].base
            } else {
                self.entries[pos].base
            };
            return Err(BusError::Overlap {
                base,
                len,
                existing,
            });
        }
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    /// The device answering `addr` for an access of `size` bytes, and the offset into it.
    /// An access that straddles the end of a device's range has no device.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let pos = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(pos.checked_sub(1)?)?;
        let offset = addr - entry.base;
        let fits = offset
            .checked_add(size as u64)
            .is_some_and(|end| end <= entry.len);
        fits.then_some((&entry.device, offset))
    }

    /// Reads from the device at `addr`. Returns false, leaving `data` untouched, when no device
    /// answers; the caller decides what an unclaimed access reads as.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false when no device answers.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking thread still holds consistent register state
/// for our models (they update state only after validating input), so we keep serving it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses so tests can see which offsets reached it.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.fill);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            fill,
            ..Default::default()
        }))
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = recorder(0xaa);
        let b = recorder(0xbb);
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x600, 2, b.clone()).unwrap();
        assert!(bus.write(0x3f9, &[1]));
        assert!(bus.write(0x601, &[2]));
        let mut byte = [0u8];
        assert!(bus.read(0x3ff, &mut byte));
        assert_eq!(byte, [0xaa]);
        assert_eq!(a.lock().unwrap().writes, vec![(1, vec![1])]);
        assert_eq!(b.lock().unwrap().writes, vec![(1, vec![2])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_reach_no_device() {
        let mut bus = Bus::new();
        bus.insert(0x100, 4, recorder(0)).unwrap();
        let mut word = [0x55u8; 4];
        assert!(!bus.read(0xff, &mut word));
        assert!(!bus.read(0x102, &mut word), "straddles the end");
        assert!(!bus.write(0x104, &[0]));
        assert_eq!(word, [0x55; 4]);
        assert!(bus.read(0x100, &mut word));
    }

    #[test]
    fn rejects_overlaps_empty_and_wrapping_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, recorder(0)),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                existing: 0x100
            })
        );
        assert!(matches!(
            bus.insert(0xf0, 0x11, recorder(0)),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(0x200, 0, recorder(0)),
            Err(BusError::EmptyRange(0x200))
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, recorder(0)),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(0x110, 1, recorder(0)).unwrap();
        bus.insert(0xff, 1, recorder(0)).unwrap();
    }
}
