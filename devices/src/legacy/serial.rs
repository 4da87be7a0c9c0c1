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

/// Holds the guest's bytes until a line is complete, then writes the line at once.
///
/// The UART flushes after every byte; written through as they come, a guest line could be
/// split by a VMM report line on stderr when both reach one terminal or console (the lab's).
/// Whole lines in single writes keep every line of both intact.
pub struct LineBuffered<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

/// A line longer than this goes out in pieces rather than growing the buffer.
const MAX_PENDING_BYTES: usize = 4096;

impl<W: Write> LineBuffered<W> {
    pub fn new(inner: W) -> Self {
        LineBuffered {
            inner,
            pending: Vec::new(),
        }
    }

    pub fn inner(&self) -> &W {
        &self.inner
    }

    /// Writes out a partial line too (at exit, or before the VMM prints a report).
    pub fn flush_all(&mut self) -> io::Result<()> {
        self.inner.write_all(&self.pending)?;
        self.pending.clear();
        self.inner.flush()
    }
}

impl<W: Write> Write for LineBuffered<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(bytes);
        let complete = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(end) => end + 1,
            None if self.pending.len() >= MAX_PENDING_BYTES => self.pending.len(),
            None => return Ok(bytes.len()),
        };
        self.inner.write_all(&self.pending[..complete])?;
        self.inner.flush()?;
        self.pending.drain(..complete);
        Ok(bytes.len())
    }

    /// Partial lines stay: see [`LineBuffered::flush_all`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest console: what the guest writes to COM1 goes to `out`, a line at a time.
pub struct SerialConsole<L: LineTrigger, W: Write + Send> {
    uart: Serial<UartIrq<L>, NoEvents, LineBuffered<W>>,
    /// Interrupt delivery failures are counted, not fatal: the console must never stop the guest.
    irq_errors: u64,
}

impl<L: LineTrigger, W: Write + Send> SerialConsole<L, W> {
    pub fn new(line: L, out: W) -> Self {
        Self {
            uart: Serial::new(UartIrq(line), LineBuffered::new(out)),
            irq_errors: 0,
        }
    }

    pub fn irq_errors(&self) -> u64 {
        self.irq_errors
    }

    /// Writes out everything, a partial last line included.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush_all()
    }

    pub fn output(&self) -> &W {
        self.uart.writer().inner()
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
    fn a_line_goes_out_whole_and_a_partial_one_at_flush() {
        let mut console = SerialConsole::new(CountingLine::default(), Vec::new());
        for b in b"login: " {
            console.write(THR, &[*b]);
        }
        assert!(console.output().is_empty(), "held until the line ends");
        for b in b"x\ny" {
            console.write(THR, &[*b]);
        }
        assert_eq!(console.output().as_slice(), b"login: x\n");
        console.flush().unwrap();
        assert_eq!(console.output().as_slice(), b"login: x\ny");
        // A line without end goes out once the buffer is full.
        for _ in 0..MAX_PENDING_BYTES {
            console.write(THR, b"z");
        }
        assert_eq!(
            console.output().len(),
            b"login: x\ny".len() + MAX_PENDING_BYTES
        );
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
