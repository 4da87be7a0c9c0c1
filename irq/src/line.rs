//! Legacy (pin-based) interrupt lines.

use std::io;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a device needs to signal an interrupt, so device code can be tested with a fake.
pub trait LineTrigger: Send {
    /// Raises an edge on the line.
    fn trigger(&self) -> io::Result<()>;
}

/// An edge-triggered line into the in-kernel IOAPIC: writing the eventfd makes KVM pulse the GSI
/// without a userspace exit or a thread hop.
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    event: EventFd,
}

impl IrqLine {
    /// A line for `gsi`, not yet attached to a VM.
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self {
            gsi,
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Binds the line to the VM's GSI; needs the in-kernel irqchip.
    pub fn attach(&self, vm: &VmFd) -> io::Result<()> {
        vm.register_irqfd(&self.event, self.gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd behind the line, for tests that observe triggers.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl LineTrigger for IrqLine {
    fn trigger(&self) -> io::Result<()> {
        self.event.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_counts_on_the_eventfd() {
        let line = IrqLine::new(4).unwrap();
        assert_eq!(line.gsi(), 4);
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.event().read().unwrap(), 2);
        // Non-blocking: nothing pending now.
        assert!(line.event().read().is_err());
    }
}
