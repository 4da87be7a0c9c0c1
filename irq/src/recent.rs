//! The last interrupts userspace sent toward each vCPU, for fault dumps.
//!
//! When a guest dies (a triple fault, say), the interrupts that reached its vCPU just before
//! are often the first suspect. Each vCPU (keyed by destination APIC id, which blkswarm gives
//! equal to the vCPU index) has a small ring of the last [`RECENT_PER_VCPU`] interrupts sent
//! to it. Recording is on the hot path of every MSI-X injection, so it costs one relaxed
//! `fetch_add` and two relaxed stores: no lock, no allocation. Each stored word carries a tag
//! of the ticket that wrote it, so a reader that races a writer (or two writers that race for
//! the same slot after the ring wrapped) sees a torn entry as a tag mismatch and skips it.
//!
//! What is and is not seen: only what userspace hands to KVM is recorded, at the moment it
//! does (the irqfd write, or the KVM_SIGNAL_MSI ioctl), keyed by the destination the guest
//! programmed into the message (physical destination decoding, as the rest of blkswarm's
//! per-vCPU reports). KVM may deliver later (the vCPU runs with interrupts off, or the vector
//! waits behind a higher-priority one in the IRR), or not at all (the guest's LAPIC is
//! disabled or the message was logical/broadcast and went elsewhere). Interrupts KVM raises
//! by itself never pass through here: LAPIC timer, IPIs between vCPUs, the PIT, and every
//! IOAPIC pin (the COM1 line, PCI INTx), whose destination lives in KVM's IOAPIC
//! redirection table and is unknown to userspace when the line is asserted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Entries kept per vCPU.
pub const RECENT_PER_VCPU: usize = 16;

/// Bits of each stored word that tag it with its writer's ticket.
const TAG_SHIFT: u32 = 40;
const TAG_MASK: u64 = (1 << (64 - TAG_SHIFT)) - 1;
/// Below the tag: microseconds since the epoch (2^40 us is about 12.7 days; it wraps after).
const TIME_MASK: u64 = (1 << TAG_SHIFT) - 1;
/// Below the tag in the first word: vector, source kind, source detail (a GSI).
const VECTOR_SHIFT: u32 = 32;
const KIND_SHIFT: u32 = 28;
const KIND_MASK: u64 = 0xf;
const DETAIL_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// How an interrupt left userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptSource {
    /// An MSI-X vector's irqfd written; KVM delivers through GSI route `gsi`.
    MsixIrqfd { gsi: u32 },
    /// An MSI-X vector delivered with KVM_SIGNAL_MSI (no route, or its route not committed).
    SignalMsi,
}

impl InterruptSource {
    fn encode(self) -> (u64, u64) {
        match self {
            InterruptSource::MsixIrqfd { gsi } => (1, u64::from(gsi) & DETAIL_MASK),
            InterruptSource::SignalMsi => (2, 0),
        }
    }

    fn decode(kind: u64, detail: u64) -> Option<Self> {
        match kind {
            1 => Some(InterruptSource::MsixIrqfd { gsi: detail as u32 }),
            2 => Some(InterruptSource::SignalMsi),
            _ => None,
        }
    }
}

impl std::fmt::Display for InterruptSource {
    /// `key=value` words, as fault dumps print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InterruptSource::MsixIrqfd { gsi } => write!(f, "source=msix_irqfd gsi={gsi}"),
            InterruptSource::SignalMsi => f.write_str("source=signal_msi"),
        }
    }
}

/// One recorded interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentInterrupt {
    /// Position among everything recorded for this vCPU (0 is the first ever).
    pub sequence: u64,
    pub vector: u8,
    pub source: InterruptSource,
    /// Destination APIC id decoded from the message (also the ring it was found in).
    pub destination: u32,
    /// Microseconds since the epoch given to [`RecentInterrupts::new`] (modulo 2^40).
    pub at_us: u64,
}

#[derive(Default)]
struct Slot {
    /// Tag, vector, source kind and detail.
    what: AtomicU64,
    /// Tag and time.
    when: AtomicU64,
}

/// One vCPU's ring, on its own cache line(s) so vCPUs' recorders do not share lines.
#[repr(align(64))]
#[derive(Default)]
struct Ring {
    /// Tickets handed out so far; ticket `t` writes slot `t % RECENT_PER_VCPU`.
    claimed: AtomicU64,
    slots: [Slot; RECENT_PER_VCPU],
}

/// Every vCPU's ring of recent interrupts.
pub struct RecentInterrupts {
    epoch: Instant,
    rings: Box<[Ring]>,
    /// Interrupts whose destination has no ring (out of range, or broadcast).
    unknown_destination: AtomicU64,
}

fn tag(ticket: u64) -> u64 {
    // Plus one, so that a never-written slot (all zeros) matches no ticket until 2^24 have
    // been handed out, by which time every slot has been written.
    (ticket.wrapping_add(1) & TAG_MASK) << TAG_SHIFT
}

impl RecentInterrupts {
    /// Rings for APIC ids `0..apic_ids`; times count from `epoch`.
    pub fn new(apic_ids: usize, epoch: Instant) -> Self {
        Self {
            epoch,
            rings: (0..apic_ids).map(|_| Ring::default()).collect(),
            unknown_destination: AtomicU64::new(0),
        }
    }

    /// Microseconds since the epoch, on the clock entries are stamped with.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records that `vector` was just sent toward APIC id `destination`. Lock-free and
    /// allocation-free: safe to call on every injection.
    pub fn record(&self, destination: u32, vector: u8, source: InterruptSource) {
        let Some(ring) = usize::try_from(destination)
            .ok()
            .and_then(|index| self.rings.get(index))
        else {
            self.unknown_destination.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let at_us = self.now_us() & TIME_MASK;
        let ticket = ring.claimed.fetch_add(1, Ordering::Relaxed);
        let slot = &ring.slots[(ticket % RECENT_PER_VCPU as u64) as usize];
        let (kind, detail) = source.encode();
        let what =
            tag(ticket) | (u64::from(vector) << VECTOR_SHIFT) | (kind << KIND_SHIFT) | detail;
        slot.what.store(what, Ordering::Relaxed);
        slot.when.store(tag(ticket) | at_us, Ordering::Relaxed);
    }

    /// How many interrupts were ever recorded toward `destination`.
    pub fn recorded(&self, destination: u32) -> u64 {
        usize::try_from(destination)
            .ok()
            .and_then(|index| self.rings.get(index))
            .map_or(0, |ring| ring.claimed.load(Ordering::Relaxed))
    }

    /// Interrupts whose destination had no ring.
    pub fn unknown_destination(&self) -> u64 {
        self.unknown_destination.load(Ordering::Relaxed)
    }

    /// The last interrupts recorded toward `destination`, oldest first. Entries being
    /// written while this reads are left out.
    pub fn recent(&self, destination: u32) -> Vec<RecentInterrupt> {
        let Some(ring) = usize::try_from(destination)
            .ok()
            .and_then(|index| self.rings.get(index))
        else {
            return Vec::new();
        };
        let claimed = ring.claimed.load(Ordering::Relaxed);
        let first = claimed.saturating_sub(RECENT_PER_VCPU as u64);
        (first..claimed)
            .filter_map(|ticket| {
                let slot = &ring.slots[(ticket % RECENT_PER_VCPU as u64) as usize];
                let what = slot.what.load(Ordering::Relaxed);
                let when = slot.when.load(Ordering::Relaxed);
                let expected = tag(ticket);
                if what & !(TIME_MASK) != expected || when & !TIME_MASK != expected {
                    return None;
                }
                Some(RecentInterrupt {
                    sequence: ticket,
                    vector: (what >> VECTOR_SHIFT) as u8,
                    source: InterruptSource::decode(
                        (what >> KIND_SHIFT) & KIND_MASK,
                        what & DETAIL_MASK,
                    )?,
                    destination,
                    at_us: when & TIME_MASK,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn keeps_the_last_entries_per_destination_oldest_first() {
        let recent = RecentInterrupts::new(2, Instant::now());
        assert!(recent.recent(0).is_empty());
        for i in 0..20u32 {
            recent.record(
                1,
                0x20 + i as u8,
                InterruptSource::MsixIrqfd { gsi: 24 + i },
            );
        }
        recent.record(0, 0x41, InterruptSource::SignalMsi);
        recent.record(2, 0x42, InterruptSource::SignalMsi); // no such vCPU
        recent.record(u32::MAX, 0x43, InterruptSource::SignalMsi);

        let one = recent.recent(1);
        assert_eq!(one.len(), RECENT_PER_VCPU);
        assert_eq!(recent.recorded(1), 20);
        let sequences: Vec<u64> = one.iter().map(|e| e.sequence).collect();
        assert_eq!(sequences, (4..20).collect::<Vec<_>>());
        assert_eq!(one[0].vector, 0x24);
        assert_eq!(one[0].source, InterruptSource::MsixIrqfd { gsi: 28 });
        assert_eq!(one[15].vector, 0x33);
        assert!(one.iter().all(|e| e.destination == 1));
        assert!(one.windows(2).all(|w| w[0].at_us <= w[1].at_us));

        let zero = recent.recent(0);
        assert_eq!(zero.len(), 1);
        assert_eq!(
            (zero[0].vector, zero[0].source),
            (0x41, InterruptSource::SignalMsi)
        );
        assert_eq!(recent.unknown_destination(), 2);
        assert!(recent.recent(2).is_empty());
        assert_eq!(recent.recorded(7), 0);
    }

    #[test]
    fn sources_print_as_key_value_words() {
        assert_eq!(
            InterruptSource::MsixIrqfd { gsi: 40 }.to_string(),
            "source=msix_irqfd gsi=40"
        );
        assert_eq!(InterruptSource::SignalMsi.to_string(), "source=signal_msi");
    }

    #[test]
    fn a_ring_with_no_vcpus_only_counts() {
        let recent = RecentInterrupts::new(0, Instant::now());
        recent.record(0, 0x30, InterruptSource::SignalMsi);
        assert_eq!(recent.unknown_destination(), 1);
        assert!(recent.recent(0).is_empty());
    }

    /// Several writers hammer one ring while a reader reads it: every entry the reader
    /// returns must be one a writer wrote whole (vector and GSI agree), in ticket order, and
    /// at the end the ring holds exactly the last tickets.
    #[test]
    fn concurrent_writers_never_show_torn_entries() {
        const WRITERS: u32 = 4;
        const PER_WRITER: u32 = 20_000;
        let recent = Arc::new(RecentInterrupts::new(1, Instant::now()));
        // The GSI encodes writer and count; the vector is derived from it, so a mix of two
        // writers' words shows as a mismatch.
        let vector_of = |gsi: u32| (gsi.wrapping_mul(31) >> 3) as u8;
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let recent = recent.clone();
                thread::spawn(move || {
                    for count in 0..PER_WRITER {
                        let gsi = writer * PER_WRITER + count;
                        recent.record(0, vector_of(gsi), InterruptSource::MsixIrqfd { gsi });
                    }
                })
            })
            .collect();
        let mut reads = 0;
        while recent.recorded(0) < u64::from(WRITERS * PER_WRITER) {
            let entries = recent.recent(0);
            assert!(entries.len() <= RECENT_PER_VCPU);
            assert!(entries.windows(2).all(|w| w[0].sequence < w[1].sequence));
            for entry in entries {
                let InterruptSource::MsixIrqfd { gsi } = entry.source else {
                    panic!("{entry:?}");
                };
                assert_eq!(entry.vector, vector_of(gsi), "{entry:?}");
            }
            reads += 1;
        }
        for writer in writers {
            writer.join().unwrap();
        }
        assert!(reads > 0);
        // A writer preempted between taking its ticket and storing may land its words on a
        // slot a newer ticket already wrote: that slot then reads as torn and is left out.
        // Everything shown is among the last tickets, in order.
        let total = u64::from(WRITERS * PER_WRITER);
        let last = recent.recent(0);
        assert!(last.len() >= RECENT_PER_VCPU / 2, "{last:?}");
        assert!(last.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert!(last
            .iter()
            .all(|e| e.sequence >= total - RECENT_PER_VCPU as u64 && e.sequence < total));
    }
}
