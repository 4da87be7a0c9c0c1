//! Legacy PCI INTx: level-triggered, shareable lines into the in-kernel IOAPIC.
//!
//! KVM gives level semantics to an irqfd registered with a resamplefd
//! (`KVM_IRQFD_FLAG_RESAMPLE`): a write to the irqfd asserts the GSI and leaves it asserted;
//! when the guest EOIs the interrupt, KVM de-asserts the GSI and signals the resamplefd of
//! every irqfd on that GSI. Each device must then assert again if it still has a reason to
//! interrupt (for virtio: its ISR is non-zero). The guest acknowledges a virtio device by
//! reading its ISR, which clears it, so a later resample finds nothing and leaves the line
//! down.
//!
//! Polarity: PCI INTx is active low, and Linux programs GSIs >= 16 from ACPI `_PRT` entries
//! as level, active low. KVM's IOAPIC stores the polarity bit but never applies it
//! (`ioapic_set_irq` takes the logical level), so an irqfd write means "asserted" whatever
//! the guest wrote into the redirection entry.
//!
//! One thread ([`IntxResampler`]) waits on every line's resamplefd with epoll: its cost per
//! device is one epoll registration, not a thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs 0-15 are ISA interrupts (COM1 is 4); PCI INTx uses the IOAPIC's pins 16-23.
pub const INTX_GSI_BASE: u32 = 16;
/// IOAPIC pins available to PCI INTx (KVM's IOAPIC has 24 pins).
pub const INTX_GSI_COUNT: u32 = 8;
/// Eventfds each INTx line holds: the irqfd and the resamplefd.
pub const EVENTFDS_PER_LINE: u64 = 2;
/// Files the resampler holds whatever the number of lines: its epoll and its stop eventfd.
pub const RESAMPLER_FILES: u64 = 2;

/// The KVM operation an INTx line needs, so the logic is testable without a VM.
pub trait KvmIntxOps: Send + Sync {
    /// Binds `irqfd` to `gsi` with level semantics: KVM de-asserts the GSI at the guest's EOI
    /// and signals `resamplefd`.
    fn register_resample_irqfd(
        &self,
        irqfd: &EventFd,
        resamplefd: &EventFd,
        gsi: u32,
    ) -> io::Result<()>;
}

impl KvmIntxOps for VmFd {
    fn register_resample_irqfd(
        &self,
        irqfd: &EventFd,
        resamplefd: &EventFd,
        gsi: u32,
    ) -> io::Result<()> {
        VmFd::register_irqfd_with_resample(self, irqfd, resamplefd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// What a line asks its device at resample time.
pub trait IntxSource: Send + Sync {
    /// Whether the device still wants the line asserted (e.g. its ISR is non-zero and MSI-X
    /// is off).
    fn pending(&self) -> bool;
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntxCounters {
    /// Assertions the device made (each an irqfd write).
    pub asserts: u64,
    /// Resample signals from KVM (the guest EOIed the GSI).
    pub resamples: u64,
    /// Resamples that found the device still pending and asserted again.
    pub reasserts: u64,
    /// irqfd writes that failed.
    pub errors: u64,
}

/// One function's INTA line.
#[derive(Debug)]
pub struct IntxLine {
    gsi: u32,
    irqfd: EventFd,
    resamplefd: EventFd,
    source: OnceLock<Weak<dyn IntxSource>>,
    asserts: AtomicU64,
    resamples: AtomicU64,
    reasserts: AtomicU64,
    errors: AtomicU64,
}

impl std::fmt::Debug for dyn IntxSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntxSource")
    }
}

impl IntxLine {
    /// A line on `gsi`, not yet bound to a VM.
    pub fn new(gsi: u32) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            gsi,
            irqfd: EventFd::new(EFD_NONBLOCK)?,
            resamplefd: EventFd::new(EFD_NONBLOCK)?,
            source: OnceLock::new(),
            asserts: AtomicU64::new(0),
            resamples: AtomicU64::new(0),
            reasserts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }))
    }

    /// Binds the line to the VM's GSI with a resamplefd; needs the in-kernel irqchip.
    pub fn attach(&self, ops: &dyn KvmIntxOps) -> io::Result<()> {
        ops.register_resample_irqfd(&self.irqfd, &self.resamplefd, self.gsi)
    }

    /// Tells the line whom to ask at resample time; only the first call counts. Weak, since
    /// the source usually owns the line.
    pub fn connect(&self, source: Weak<dyn IntxSource>) -> bool {
        self.source.set(source).is_ok()
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The irqfd, for tests that observe assertions.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// The resamplefd KVM signals at EOI.
    pub fn resamplefd(&self) -> &EventFd {
        &self.resamplefd
    }

    /// Asserts the line; it stays asserted until the guest EOIs it.
    pub fn assert(&self) {
        self.asserts.fetch_add(1, Ordering::Relaxed);
        self.write_irqfd();
    }

    fn write_irqfd(&self) {
        if self.irqfd.write(1).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// KVM de-asserted the line at the guest's EOI: drains the resamplefd and asserts again
    /// if the device is still pending. Returns whether it did.
    pub fn resample(&self) -> bool {
        // Several EOIs may have been folded into one count: one check covers them all.
        let _ = self.resamplefd.read();
        self.resamples.fetch_add(1, Ordering::Relaxed);
        let pending = self
            .source
            .get()
            .and_then(Weak::upgrade)
            .is_some_and(|source| source.pending());
        if pending {
            self.reasserts.fetch_add(1, Ordering::Relaxed);
            self.write_irqfd();
        }
        pending
    }

    pub fn counters(&self) -> IntxCounters {
        IntxCounters {
            asserts: self.asserts.load(Ordering::Relaxed),
            resamples: self.resamples.load(Ordering::Relaxed),
            reasserts: self.reasserts.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// The GSI of a function's INTA: devices are spread over [`INTX_GSI_COUNT`] pins by device
/// and bus number (the PCI swizzle idea), so neighbours do not share a line. The ACPI `_PRT`
/// must announce the same mapping.
pub fn intx_gsi(bus: u8, device: u8) -> u32 {
    INTX_GSI_BASE + (u32::from(bus) + u32::from(device)) % INTX_GSI_COUNT
}

/// Epoll data of the stop eventfd; line indices are below it.
const STOP_TOKEN: u64 = u64::MAX;
/// Events handled per epoll_wait.
const EVENTS_PER_WAIT: usize = 64;

/// Waits on the resamplefds of every INTx line and resamples the lines KVM signals.
pub struct IntxResampler {
    epoll: Epoll,
    stop: Arc<EventFd>,
    lines: Vec<Arc<IntxLine>>,
}

/// The running resampler thread.
pub struct IntxResamplerHandle {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl IntxResampler {
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Self {
            epoll,
            stop,
            lines: Vec::new(),
        })
    }

    /// Watches `line`'s resamplefd.
    pub fn add(&mut self, line: Arc<IntxLine>) -> io::Result<()> {
        let token = self.lines.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            line.resamplefd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.lines.push(line);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Starts the thread; it runs until [`IntxResamplerHandle::stop`] or process exit.
    pub fn spawn(self) -> io::Result<IntxResamplerHandle> {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("intx-resample".into())
            .spawn(move || self.run())?;
        Ok(IntxResamplerHandle {
            stop,
            thread: Some(thread),
        })
    }

    fn run(self) {
        let mut events = vec![EpollEvent::default(); EVENTS_PER_WAIT];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in &events[..ready] {
                match event.data() {
                    STOP_TOKEN => return,
                    token => {
                        if let Some(line) =
                            usize::try_from(token).ok().and_then(|i| self.lines.get(i))
                        {
                            line.resample();
                        }
                    }
                }
            }
        }
    }
}

impl IntxResamplerHandle {
    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;

    /// A fake KVM GSI with resample semantics: the level is shared by every irqfd on it;
    /// `eoi` lowers it and signals every resamplefd, as KVM's irqfd resampler does.
    #[derive(Default)]
    struct FakeKvm {
        registered: Mutex<Vec<(u32, i32, i32)>>,
    }

    impl KvmIntxOps for FakeKvm {
        fn register_resample_irqfd(
            &self,
            irqfd: &EventFd,
            resamplefd: &EventFd,
            gsi: u32,
        ) -> io::Result<()> {
            self.registered
                .lock()
                .unwrap()
                .push((gsi, irqfd.as_raw_fd(), resamplefd.as_raw_fd()));
            Ok(())
        }
    }

    /// The guest's side of a shared GSI: whether the line is asserted now.
    struct Gsi {
        lines: Vec<Arc<IntxLine>>,
        level: bool,
    }

    impl Gsi {
        /// Folds irqfd writes into the level (KVM: irqfd_inject with level 1).
        fn poll(&mut self) -> bool {
            for line in &self.lines {
                if line.irqfd().read().is_ok() {
                    self.level = true;
                }
            }
            self.level
        }
        /// The guest EOIs: KVM de-asserts and signals every resamplefd on the GSI.
        fn eoi(&mut self) {
            self.level = false;
            for line in &self.lines {
                line.resamplefd().write(1).unwrap();
            }
        }
    }

    struct Device {
        isr: AtomicBool,
    }

    impl IntxSource for Device {
        fn pending(&self) -> bool {
            self.isr.load(Ordering::SeqCst)
        }
    }

    fn device() -> Arc<Device> {
        Arc::new(Device {
            isr: AtomicBool::new(false),
        })
    }

    #[test]
    fn attach_registers_irqfd_and_resamplefd_on_the_gsi() {
        let kvm = FakeKvm::default();
        let line = IntxLine::new(19).unwrap();
        line.attach(&kvm).unwrap();
        assert_eq!(
            *kvm.registered.lock().unwrap(),
            vec![(19, line.irqfd().as_raw_fd(), line.resamplefd().as_raw_fd())]
        );
    }

    #[test]
    fn assert_resample_and_acknowledge() {
        let dev = device();
        let line = IntxLine::new(16).unwrap();
        assert!(line.connect(Arc::downgrade(&dev) as Weak<dyn IntxSource>));
        let mut gsi = Gsi {
            lines: vec![line.clone()],
            level: false,
        };
        dev.isr.store(true, Ordering::SeqCst);
        line.assert();
        assert!(gsi.poll());
        // EOI with the ISR still set (a completion after the guest's read): asserted again.
        gsi.eoi();
        assert!(!gsi.poll());
        assert!(line.resample());
        assert!(gsi.poll());
        // The guest reads ISR (clears it), then EOIs: the line stays down.
        dev.isr.store(false, Ordering::SeqCst);
        gsi.eoi();
        assert!(!line.resample());
        assert!(!gsi.poll());
        assert_eq!(
            line.counters(),
            IntxCounters {
                asserts: 1,
                resamples: 2,
                reasserts: 1,
                errors: 0
            }
        );
    }

    #[test]
    fn shared_gsi_reasserts_only_for_pending_devices() {
        let (a, b) = (device(), device());
        let line_a = IntxLine::new(17).unwrap();
        let line_b = IntxLine::new(17).unwrap();
        line_a.connect(Arc::downgrade(&a) as Weak<dyn IntxSource>);
        line_b.connect(Arc::downgrade(&b) as Weak<dyn IntxSource>);
        let mut gsi = Gsi {
            lines: vec![line_a.clone(), line_b.clone()],
            level: false,
        };
        a.isr.store(true, Ordering::SeqCst);
        line_a.assert();
        assert!(gsi.poll());
        // The guest's shared handler acknowledges A; meanwhile B completes.
        a.isr.store(false, Ordering::SeqCst);
        b.isr.store(true, Ordering::SeqCst);
        line_b.assert();
        gsi.eoi();
        assert!(!line_a.resample());
        assert!(line_b.resample());
        assert!(gsi.poll());
    }

    #[test]
    fn a_line_without_a_live_source_never_reasserts() {
        let line = IntxLine::new(16).unwrap();
        line.resamplefd().write(1).unwrap();
        assert!(!line.resample());
        let dev = device();
        dev.isr.store(true, Ordering::SeqCst);
        line.connect(Arc::downgrade(&dev) as Weak<dyn IntxSource>);
        // Only the first source counts.
        assert!(!line.connect(Arc::downgrade(&device()) as Weak<dyn IntxSource>));
        drop(dev);
        assert!(!line.resample());
        assert!(line.irqfd().read().is_err());
    }

    #[test]
    fn gsis_spread_over_pins_16_to_23() {
        assert_eq!(intx_gsi(0, 0), 16);
        assert_eq!(intx_gsi(0, 1), 17);
        assert_eq!(intx_gsi(0, 7), 23);
        assert_eq!(intx_gsi(0, 8), 16);
        assert_eq!(intx_gsi(1, 0), 17);
        assert_eq!(intx_gsi(15, 31), 16 + (15 + 31) % 8);
        for bus in 0..=u8::MAX {
            for device in 0..32 {
                assert!((16..24).contains(&intx_gsi(bus, device)));
            }
        }
    }

    #[test]
    fn resampler_thread_reasserts_pending_lines() {
        let dev = device();
        let line = IntxLine::new(20).unwrap();
        line.connect(Arc::downgrade(&dev) as Weak<dyn IntxSource>);
        let idle = IntxLine::new(20).unwrap();
        let mut resampler = IntxResampler::new().unwrap();
        resampler.add(idle.clone()).unwrap();
        resampler.add(line.clone()).unwrap();
        assert_eq!(resampler.len(), 2);
        let handle = resampler.spawn().unwrap();
        dev.isr.store(true, Ordering::SeqCst);
        line.resamplefd().write(1).unwrap();
        idle.resamplefd().write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while line.counters().reasserts == 0 || idle.counters().resamples == 0 {
            assert!(Instant::now() < deadline, "resampler did not run");
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.stop();
        assert_eq!(line.irqfd().read().unwrap(), 1);
        assert_eq!(idle.counters().reasserts, 0);
        assert!(idle.irqfd().read().is_err());
    }
}
