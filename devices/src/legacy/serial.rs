//! The 16550 UART at COM1, used as the guest console.

use std::io::{self, Write};

use irq::LineTrigger;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::BusDevice;

/// COM1's port base and IRQ, where Linux's 8250 driver looks without being told.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// A 16550 decodes eight consecutive ports.
pub const UART_PORT_COUNT: u64 = 8;

/// Adapts a [`LineTrigger`] to vm-superio's trigger trait.
pub struct UartIrq<L: LineTrigger>(pub L);

impl<L: LineTrigger> Trigger for UartIrq<L> {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The guest console: what the guest writes to COM1 goes to `out`.
pub struct SerialConsole<L: LineTrigger, W: Write + Send> {
    uart: Serial<UartIrq<L>, NoEvents, W>,
    /// Interrupt delivery failures are counted, not fatal: the console must never stop the guest.
    irq_errors: u64,
}

impl<L: LineTrigger, W: Write + Send> SerialConsole<L, W> {
    pub fn new(line: L, out: W) -> Self {
        Self {
            uart: Serial::new(UartIrq(line), out),
            irq_errors: 0,
        }
    }

    pub fn irq_errors(&self) -> u64 {
        self.irq_errors
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }

    pub fn output(&self) -> &W {
        self.uart.writer()
    }
}

impl<L: LineTrigger, W: Write + Send> BusDevice for SerialConsole<L, W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers only; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if self.uart.write(reg, value).is_err() {
            self.irq_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct CountingLine(Arc<AtomicU32>);

    impl LineTrigger for CountingLine {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    #[test]
    fn guest_bytes_reach_the_output_in_order() {
        let mut console = SerialConsole::new(CountingLine::default(), Vec::new());
        for b in b"@@guest done\n" {
            console.write(THR, &[*b]);
        }
        assert_eq!(console.output().as_slice(), b"@@guest done\n");
    }

    #[test]
    fn transmit_interrupt_fires_only_when_enabled() {
        let line = CountingLine::default();
        let mut console = SerialConsole::new(line.clone(), Vec::new());
        console.write(THR, b"a");
        assert_eq!(line.0.load(Ordering::SeqCst), 0);
        // IER bit 1: interrupt when the transmit holding register is empty.
        console.write(IER, &[0x02]);
        // Reading IIR acknowledges the pending THR-empty interrupt, as Linux's handler does.
        let mut iir = [0u8];
        console.read(IIR, &mut iir);
        let after_enable = line.0.load(Ordering::SeqCst);
        console.write(THR, b"b");
        assert!(line.0.load(Ordering::SeqCst) > after_enable);
        assert_eq!(console.irq_errors(), 0);
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut console = SerialConsole::new(CountingLine::default(), Vec::new());
        let mut lsr = [0u8; 1];
        console.read(LSR, &mut lsr);
        // THRE (bit 5) and TEMT (bit 6): Linux waits for these before each byte.
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let mut console = SerialConsole::new(CountingLine::default(), Vec::new());
        console.write(0x1_0000, b"x");
        let mut wide = [0xffu8; 2];
        console.read(0x1_0000, &mut wide);
        assert_eq!(wide, [0, 0]);
        assert!(console.output().is_empty());
    }
}
