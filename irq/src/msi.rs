//! MSI messages and the per-vector delivery path behind them.
//!
//! The guest-visible MSI-X table (mask bits, PBA) lives in `msix`; how a vector reaches the
//! guest (an irqfd on a KVM GSI route, or KVM_SIGNAL_MSI) is behind [`MsiVector`], so device
//! models and their tests never depend on KVM.

use std::io;

/// Address bits 31:20 of every x86 MSI: the LAPIC MMIO range.
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_BASE_MASK: u64 = 0xfff0_0000;

/// An MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    /// Whether the address targets the LAPIC range; anything else is a guest bug, and the
    /// message is not delivered.
    pub fn is_valid(&self) -> bool {
        self.address & MSI_ADDRESS_BASE_MASK == MSI_ADDRESS_BASE
    }

    /// Destination APIC id: address bits 19:12, plus bits 11:5 when Linux uses the
    /// extended destination id (KVM_FEATURE_MSI_EXT_DEST_ID, for APIC ids above 255).
    pub fn destination_apic_id(&self) -> u32 {
        let low = ((self.address >> 12) & 0xff) as u32;
        let extended = ((self.address >> 5) & 0x7f) as u32;
        (extended << 8) | low
    }

    /// Interrupt vector in the destination CPU's IDT (data bits 7:0).
    pub fn vector(&self) -> u8 {
        (self.data & 0xff) as u8
    }
}

/// How an interrupt reached KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiPath {
    /// An irqfd write on the vector's GSI route.
    Irqfd,
    /// KVM_SIGNAL_MSI: the vector has no route (past the route budget) or its route is not
    /// committed yet.
    SignalMsi,
}

/// The delivery path of one MSI-X vector into the VM.
pub trait MsiVector: Send + Sync {
    /// The guest enabled and unmasked the vector with `message` (Some), or masked or disabled
    /// it (None). Called from the vCPU thread that wrote the table; the implementation may
    /// defer and batch the work (e.g. KVM route updates) as long as a later [`inject`] delivers
    /// with the latest message.
    ///
    /// [`inject`]: MsiVector::inject
    fn configure(&self, message: Option<MsiMessage>) -> io::Result<()>;

    /// Delivers the interrupt now, returning the path it took. Only called while the vector
    /// is configured and unmasked.
    fn inject(&self) -> io::Result<MsiPath>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_destination_and_vector() {
        let msg = MsiMessage {
            address: 0xfee0_3000,
            data: 0x4023,
        };
        assert!(msg.is_valid());
        assert_eq!(msg.destination_apic_id(), 3);
        assert_eq!(msg.vector(), 0x23);
        let extended = MsiMessage {
            address: 0xfee0_1000 | (0x2 << 5),
            data: 0,
        };
        assert_eq!(extended.destination_apic_id(), 0x201);
        assert!(!MsiMessage {
            address: 0xdead_0000,
            data: 0
        }
        .is_valid());
    }
}
