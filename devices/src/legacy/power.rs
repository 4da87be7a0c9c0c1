//! ACPI hardware-reduced sleep and reset registers.
//!
//! A firmware-less guest powers off through ACPI: the FADT points its sleep control register
//! and reset register at these ports, the DSDT's `\_S5_` package names [`S5_SLEEP_TYPE`], and
//! Linux's `acpi_hw_extended_sleep` writes `SLP_TYP << 2 | SLP_EN` to the control register.
//! This device turns those writes into [`PowerEvent`]s for the VMM.

use crate::BusDevice;

/// Port of the sleep control register (writes) and sleep status register (reads).
pub const SLEEP_PORT: u64 = 0x600;
/// Port of the reset register, right after the sleep register.
pub const RESET_PORT: u64 = 0x601;
/// Ports the device decodes, starting at [`SLEEP_PORT`].
pub const POWER_PORT_COUNT: u64 = 2;
/// Value the FADT tells the guest to write to [`RESET_PORT`] to reset the machine.
pub const RESET_VALUE: u8 = 0x1;
/// Sleep type of the S5 (soft off) state, as the DSDT's `\_S5_` package announces it.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control register fields (ACPI 6.5, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest entered S5.
    PowerOff,
    /// The guest wrote the reset value.
    Reset,
}

/// Decodes a sleep control register write; `None` for writes that do not enter S5.
pub fn decode_sleep_write(value: u8) -> Option<PowerEvent> {
    let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
    (value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE).then_some(PowerEvent::PowerOff)
}

/// The sleep and reset registers, reporting events through a callback.
pub struct AcpiPowerDevice {
    on_event: Box<dyn Fn(PowerEvent) + Send>,
    /// Writes that matched no event: sleep states we do not announce, or wrong reset values.
    ignored_writes: u64,
}

impl AcpiPowerDevice {
    pub fn new(on_event: Box<dyn Fn(PowerEvent) + Send>) -> Self {
        Self {
            on_event,
            ignored_writes: 0,
        }
    }

    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: no wake event is ever pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let event = match offset {
            0 => decode_sleep_write(value),
            1 if value == RESET_VALUE => Some(PowerEvent::Reset),
            _ => None,
        };
        match event {
            Some(event) => (self.on_event)(event),
            None => self.ignored_writes += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn device() -> (AcpiPowerDevice, mpsc::Receiver<PowerEvent>) {
        let (tx, rx) = mpsc::channel();
        let device = AcpiPowerDevice::new(Box::new(move |e| {
            let _ = tx.send(e);
        }));
        (device, rx)
    }

    #[test]
    fn linux_s5_write_powers_off() {
        let (mut dev, rx) = device();
        // What acpi_hw_extended_sleep writes for SLP_TYP 5.
        dev.write(SLEEP_PORT - SLEEP_PORT, &[(5 << 2) | 0x20]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::PowerOff));
    }

    #[test]
    fn other_sleep_writes_are_ignored_and_counted() {
        let (mut dev, rx) = device();
        dev.write(0, &[5 << 2]); // SLP_EN clear
        dev.write(0, &[(3 << 2) | 0x20]); // S3 is not announced
        dev.write(1, &[0xfe]); // wrong reset value
        dev.write(0, &[]);
        assert!(rx.try_recv().is_err());
        assert_eq!(dev.ignored_writes(), 3);
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, rx) = device();
        dev.write(RESET_PORT - SLEEP_PORT, &[RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
    }

    #[test]
    fn status_reads_zero() {
        let (mut dev, _rx) = device();
        let mut status = [0xffu8];
        dev.read(0, &mut status);
        assert_eq!(status, [0]);
    }
}
