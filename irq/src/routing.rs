//! MSI vectors delivered through KVM: GSI routes allocated on demand, irqfds, and batched
//! routing-table updates.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so it is never issued per MSI-X table write:
//! configuring a vector only edits our copy and bumps a generation number; the table is
//! pushed to KVM once, lazily, by the first injection that needs a route newer than the last
//! commit. A probe burst that configures many vectors therefore costs one commit, not one per
//! vector. Vectors past the route budget are delivered with KVM_SIGNAL_MSI instead: slower
//! (an ioctl per interrupt) but correct, and counted.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::msi::{MsiMessage, MsiPath, MsiVector};
use crate::recent::{InterruptSource, RecentInterrupts};

/// KVM's limit on routing-table entries per VM (KVM_MAX_IRQ_ROUTES).
pub const KVM_MAX_ROUTES: usize = kvm_bindings::KVM_MAX_IRQ_ROUTES;
/// GSIs 0-23 are the in-kernel IOAPIC's pins; MSI routes start above them.
pub const IOAPIC_PINS: u32 = 24;
/// ISA IRQs also routed to the in-kernel 8259 pair, as KVM's default table does.
const PIC_IRQS: u32 = 16;
/// Routing entries the legacy (pin) interrupts occupy: every IOAPIC pin, plus the PIC lines.
pub const LEGACY_ROUTES: usize = (IOAPIC_PINS + PIC_IRQS) as usize;

/// The KVM operations routing needs, so the logic is testable without a VM.
pub trait KvmIrqOps: Send + Sync {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> io::Result<()>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    fn signal_msi(&self, message: MsiMessage) -> io::Result<()>;
}

fn os_error(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl KvmIrqOps for VmFd {
    fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> io::Result<()> {
        let table = KvmIrqRouting::from_entries(entries)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        VmFd::set_gsi_routing(self, &table).map_err(os_error)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::register_irqfd(self, fd, gsi).map_err(os_error)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::unregister_irqfd(self, fd, gsi).map_err(os_error)
    }
    fn signal_msi(&self, message: MsiMessage) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: message.address as u32,
            address_hi: (message.address >> 32) as u32,
            data: message.data,
            ..Default::default()
        };
        // A return of 0 means the guest blocked the interrupt (e.g. APIC disabled), which is
        // its business, not an error.
        VmFd::signal_msi(self, msi).map(|_| ()).map_err(os_error)
    }
}

/// Counters for the report.
#[derive(Debug, Default)]
pub struct RoutingStats {
    pub commits: AtomicU64,
    pub irqfd_injections: AtomicU64,
    pub signal_msi_injections: AtomicU64,
    /// Vectors that could not get a route because the budget was spent.
    pub route_budget_misses: AtomicU64,
    pub errors: AtomicU64,
}

struct Table {
    msi_routes: BTreeMap<u32, MsiMessage>,
    free_gsis: Vec<u32>,
    next_gsi: u32,
    /// Bumped on every change of `msi_routes`.
    generation: u64,
}

/// Owns the VM's GSI routing table.
pub struct GsiRouter {
    ops: Arc<dyn KvmIrqOps>,
    /// Most MSI routes, after the legacy ones, that may exist at once.
    msi_route_budget: usize,
    table: Mutex<Table>,
    /// The generation KVM has. Vectors configured at or before it can use their irqfd.
    committed_generation: AtomicU64,
    stats: RoutingStats,
    /// Every injection is recorded here, by destination, for fault dumps.
    recent: Arc<RecentInterrupts>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.address as u32;
    entry.u.msi.address_hi = (message.address >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// The routes KVM installs by default for the in-kernel irqchip; every table we push must
/// keep them, or legacy lines (the console's IRQ 4, the PIT) go dead.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(LEGACY_ROUTES);
    for irq in 0..PIC_IRQS {
        let (chip, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        routes.push(irqchip_entry(irq, chip, pin));
    }
    for pin in 0..IOAPIC_PINS {
        routes.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
    }
    routes
}

impl GsiRouter {
    /// A router that may hand out up to `max_routes - LEGACY_ROUTES` MSI routes, and keeps
    /// no record of recent interrupts.
    pub fn new(ops: Arc<dyn KvmIrqOps>, max_routes: usize) -> Arc<Self> {
        Self::with_recent_interrupts(
            ops,
            max_routes,
            Arc::new(RecentInterrupts::new(0, Instant::now())),
        )
    }

    /// Like [`GsiRouter::new`], recording every injection into `recent`.
    pub fn with_recent_interrupts(
        ops: Arc<dyn KvmIrqOps>,
        max_routes: usize,
        recent: Arc<RecentInterrupts>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ops,
            msi_route_budget: max_routes.saturating_sub(LEGACY_ROUTES),
            table: Mutex::new(Table {
                msi_routes: BTreeMap::new(),
                free_gsis: Vec::new(),
                next_gsi: IOAPIC_PINS,
                generation: 0,
            }),
            committed_generation: AtomicU64::new(0),
            stats: RoutingStats::default(),
            recent,
        })
    }

    pub fn stats(&self) -> &RoutingStats {
        &self.stats
    }

    /// MSI routes currently allocated.
    pub fn routes_in_use(&self) -> usize {
        lock(&self.table).msi_routes.len()
    }

    /// A new vector, with no route until the guest configures it.
    pub fn new_vector(self: &Arc<Self>) -> io::Result<KvmMsiVector> {
        Ok(KvmMsiVector {
            router: self.clone(),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(VectorState::default()),
        })
    }

    /// Allocates a GSI for `message`; None when the budget is spent.
    fn add_route(&self, message: MsiMessage) -> Option<(u32, u64)> {
        let mut table = lock(&self.table);
        if table.msi_routes.len() >= self.msi_route_budget {
            return None;
        }
        let gsi = match table.free_gsis.pop() {
            Some(gsi) => gsi,
            None => {
                let gsi = table.next_gsi;
                table.next_gsi += 1;
                gsi
            }
        };
        table.msi_routes.insert(gsi, message);
        table.generation += 1;
        Some((gsi, table.generation))
    }

    fn update_route(&self, gsi: u32, message: MsiMessage) -> u64 {
        let mut table = lock(&self.table);
        table.msi_routes.insert(gsi, message);
        table.generation += 1;
        table.generation
    }

    fn remove_route(&self, gsi: u32) {
        let mut table = lock(&self.table);
        if table.msi_routes.remove(&gsi).is_some() {
            table.free_gsis.push(gsi);
            table.generation += 1;
        }
    }

    fn is_committed(&self, generation: u64) -> bool {
        self.committed_generation.load(Ordering::Acquire) >= generation
    }

    /// Pushes the table to KVM if it changed since the last commit.
    pub fn commit(&self) -> io::Result<()> {
        let table = lock(&self.table);
        if self.is_committed(table.generation) {
            return Ok(());
        }
        let mut entries = legacy_routes();
        entries.extend(
            table
                .msi_routes
                .iter()
                .map(|(&gsi, &message)| msi_entry(gsi, message)),
        );
        self.ops.set_gsi_routing(&entries)?;
        self.committed_generation
            .store(table.generation, Ordering::Release);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Default)]
struct VectorState {
    message: Option<MsiMessage>,
    gsi: Option<u32>,
    /// Router generation that contains this vector's current route.
    generation: u64,
}

/// One MSI-X vector delivered through KVM.
pub struct KvmMsiVector {
    router: Arc<GsiRouter>,
    irqfd: EventFd,
    state: Mutex<VectorState>,
}

impl KvmMsiVector {
    /// The GSI the vector is routed through, if it has one (None: KVM_SIGNAL_MSI).
    pub fn gsi(&self) -> Option<u32> {
        lock(&self.state).gsi
    }

    fn release(&self, state: &mut VectorState) -> io::Result<()> {
        if let Some(gsi) = state.gsi.take() {
            self.router.remove_route(gsi);
            self.router.ops.unregister_irqfd(&self.irqfd, gsi)?;
        }
        Ok(())
    }
}

impl MsiVector for KvmMsiVector {
    fn configure(&self, message: Option<MsiMessage>) -> io::Result<()> {
        let mut state = lock(&self.state);
        if state.message == message {
            return Ok(());
        }
        state.message = message;
        let Some(message) = message else {
            return self.release(&mut state);
        };
        match state.gsi {
            Some(gsi) => state.generation = self.router.update_route(gsi, message),
            None => match self.router.add_route(message) {
                Some((gsi, generation)) => {
                    if self.router.ops.register_irqfd(&self.irqfd, gsi).is_ok() {
                        state.gsi = Some(gsi);
                        state.generation = generation;
                    } else {
                        // Never lose the vector: without an irqfd it is still delivered,
                        // through KVM_SIGNAL_MSI with the message kept in `state`.
                        self.router.remove_route(gsi);
                        self.router.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    self.router
                        .stats
                        .route_budget_misses
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
        }
        Ok(())
    }

    fn inject(&self) -> io::Result<MsiPath> {
        let state = lock(&self.state);
        let Some(message) = state.message else {
            return Ok(MsiPath::SignalMsi);
        };
        let stats = &self.router.stats;
        let result = match state.gsi {
            Some(_) => {
                if self.router.is_committed(state.generation) || self.router.commit().is_ok() {
                    stats.irqfd_injections.fetch_add(1, Ordering::Relaxed);
                    self.irqfd.write(1).map(|()| MsiPath::Irqfd)
                } else {
                    // KVM does not have this vector's route yet, so an irqfd write would be
                    // dropped; the guest waits for this interrupt forever. Deliver it directly
                    // and retry the commit on the next injection.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    stats.signal_msi_injections.fetch_add(1, Ordering::Relaxed);
                    self.router
                        .ops
                        .signal_msi(message)
                        .map(|()| MsiPath::SignalMsi)
                }
            }
            None => {
                stats.signal_msi_injections.fetch_add(1, Ordering::Relaxed);
                self.router
                    .ops
                    .signal_msi(message)
                    .map(|()| MsiPath::SignalMsi)
            }
        };
        match result {
            // Recorded when handed to KVM: see `recent` for what this does and does not see.
            Ok(path) => {
                let source = match (path, state.gsi) {
                    (MsiPath::Irqfd, Some(gsi)) => InterruptSource::MsixIrqfd { gsi },
                    _ => InterruptSource::SignalMsi,
                };
                self.router
                    .recent
                    .record(message.destination_apic_id(), message.vector(), source);
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

impl Drop for KvmMsiVector {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        let _ = self.release(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn libc_ebusy() -> i32 {
        16
    }

    #[derive(Default)]
    struct FakeKvm {
        refuse_irqfds: std::sync::atomic::AtomicBool,
        refuse_routing: std::sync::atomic::AtomicBool,
        tables: Mutex<Vec<Vec<(u32, u32, u64)>>>,
        irqfds: Mutex<Vec<(bool, u32)>>,
        signalled: Mutex<Vec<MsiMessage>>,
    }

    impl KvmIrqOps for FakeKvm {
        fn set_gsi_routing(&self, entries: &[kvm_irq_routing_entry]) -> io::Result<()> {
            if self.refuse_routing.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(12)); // ENOMEM
            }
            let table = entries
                .iter()
                .map(|e| {
                    // SAFETY: the union member read matches the entry type written by us.
                    let address = unsafe {
                        if e.type_ == KVM_IRQ_ROUTING_MSI {
                            u64::from(e.u.msi.address_lo)
                        } else {
                            u64::from(e.u.irqchip.pin)
                        }
                    };
                    (e.gsi, e.type_, address)
                })
                .collect();
            self.tables.lock().unwrap().push(table);
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            if self.refuse_irqfds.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc_ebusy()));
            }
            self.irqfds.lock().unwrap().push((true, gsi));
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.irqfds.lock().unwrap().push((false, gsi));
            Ok(())
        }
        fn signal_msi(&self, message: MsiMessage) -> io::Result<()> {
            self.signalled.lock().unwrap().push(message);
            Ok(())
        }
    }

    fn message(apic: u64, vector: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000 | (apic << 12),
            data: vector,
        }
    }

    fn setup(max_routes: usize) -> (Arc<FakeKvm>, Arc<GsiRouter>) {
        let kvm = Arc::new(FakeKvm::default());
        let router = GsiRouter::new(kvm.clone(), max_routes);
        (kvm, router)
    }

    #[test]
    fn routes_are_committed_once_per_burst_and_keep_legacy_pins() {
        let (kvm, router) = setup(KVM_MAX_ROUTES);
        let vectors: Vec<_> = (0..8).map(|_| router.new_vector().unwrap()).collect();
        for (i, v) in vectors.iter().enumerate() {
            v.configure(Some(message(i as u64, 0x30 + i as u32)))
                .unwrap();
        }
        assert!(
            kvm.tables.lock().unwrap().is_empty(),
            "configure never commits"
        );
        for v in &vectors {
            v.inject().unwrap();
        }
        let tables = kvm.tables.lock().unwrap();
        assert_eq!(tables.len(), 1, "one commit for the whole burst");
        let table = &tables[0];
        assert_eq!(table.len(), LEGACY_ROUTES + 8);
        // The console's IRQ 4 stays on IOAPIC pin 4.
        assert!(table
            .iter()
            .any(|&(gsi, kind, pin)| gsi == 4 && kind == KVM_IRQ_ROUTING_IRQCHIP && pin == 4));
        let msi_gsis: Vec<u32> = table
            .iter()
            .filter(|e| e.1 == KVM_IRQ_ROUTING_MSI)
            .map(|e| e.0)
            .collect();
        assert_eq!(msi_gsis, (24..32).collect::<Vec<_>>());
        assert_eq!(router.stats().irqfd_injections.load(Ordering::Relaxed), 8);
        assert_eq!(router.stats().commits.load(Ordering::Relaxed), 1);
        // Each vector's irqfd was written once.
        for v in &vectors {
            assert_eq!(v.irqfd.read().unwrap(), 1);
        }
    }

    #[test]
    fn unchanged_messages_do_not_dirty_the_table() {
        let (kvm, router) = setup(KVM_MAX_ROUTES);
        let v = router.new_vector().unwrap();
        v.configure(Some(message(1, 0x40))).unwrap();
        v.inject().unwrap();
        v.configure(Some(message(1, 0x40))).unwrap();
        v.inject().unwrap();
        assert_eq!(kvm.tables.lock().unwrap().len(), 1);
        // A new destination needs a new commit before the irqfd is used.
        v.configure(Some(message(2, 0x40))).unwrap();
        v.inject().unwrap();
        assert_eq!(kvm.tables.lock().unwrap().len(), 2);
    }

    #[test]
    fn masking_releases_the_route_and_gsis_are_reused() {
        let (kvm, router) = setup(KVM_MAX_ROUTES);
        let a = router.new_vector().unwrap();
        let b = router.new_vector().unwrap();
        a.configure(Some(message(0, 0x30))).unwrap();
        b.configure(Some(message(0, 0x31))).unwrap();
        assert_eq!((a.gsi(), b.gsi()), (Some(24), Some(25)));
        a.configure(None).unwrap();
        assert_eq!(a.gsi(), None);
        assert_eq!(router.routes_in_use(), 1);
        let c = router.new_vector().unwrap();
        c.configure(Some(message(1, 0x32))).unwrap();
        assert_eq!(c.gsi(), Some(24), "freed GSI reused");
        assert_eq!(
            *kvm.irqfds.lock().unwrap(),
            vec![(true, 24), (true, 25), (false, 24), (true, 24)]
        );
        // A masked vector delivers nothing.
        a.inject().unwrap();
        assert_eq!(router.stats().irqfd_injections.load(Ordering::Relaxed), 0);
        drop(b);
        assert_eq!(router.routes_in_use(), 1);
    }

    #[test]
    fn past_the_budget_vectors_use_signal_msi() {
        let (kvm, router) = setup(LEGACY_ROUTES + 2);
        let vectors: Vec<_> = (0..3).map(|_| router.new_vector().unwrap()).collect();
        for (i, v) in vectors.iter().enumerate() {
            v.configure(Some(message(0, 0x30 + i as u32))).unwrap();
        }
        assert_eq!(vectors[2].gsi(), None);
        for v in &vectors {
            v.inject().unwrap();
        }
        assert_eq!(*kvm.signalled.lock().unwrap(), vec![message(0, 0x32)]);
        let stats = router.stats();
        assert_eq!(stats.route_budget_misses.load(Ordering::Relaxed), 1);
        assert_eq!(stats.signal_msi_injections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.irqfd_injections.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_refused_irqfd_falls_back_to_signal_msi_instead_of_losing_interrupts() {
        let (kvm, router) = setup(KVM_MAX_ROUTES);
        kvm.refuse_irqfds.store(true, Ordering::Relaxed);
        let v = router.new_vector().unwrap();
        v.configure(Some(message(1, 0x41))).unwrap();
        assert_eq!(v.gsi(), None);
        assert_eq!(router.routes_in_use(), 0, "the route was given back");
        v.inject().unwrap();
        assert_eq!(*kvm.signalled.lock().unwrap(), vec![message(1, 0x41)]);
        assert_eq!(router.stats().errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failed_commit_delivers_through_signal_msi_and_the_next_injection_retries() {
        let (kvm, router) = setup(KVM_MAX_ROUTES);
        let v = router.new_vector().unwrap();
        v.configure(Some(message(1, 0x42))).unwrap();
        kvm.refuse_routing.store(true, Ordering::Relaxed);
        v.inject().unwrap();
        assert_eq!(*kvm.signalled.lock().unwrap(), vec![message(1, 0x42)]);
        assert!(kvm.tables.lock().unwrap().is_empty());
        kvm.refuse_routing.store(false, Ordering::Relaxed);
        v.inject().unwrap();
        assert_eq!(
            kvm.tables.lock().unwrap().len(),
            1,
            "committed on the retry"
        );
        let stats = router.stats();
        assert_eq!(stats.signal_msi_injections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.irqfd_injections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.errors.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn injections_are_recorded_toward_their_destination_with_their_path() {
        let kvm = Arc::new(FakeKvm::default());
        let recent = Arc::new(RecentInterrupts::new(4, std::time::Instant::now()));
        let router =
            GsiRouter::with_recent_interrupts(kvm.clone(), LEGACY_ROUTES + 1, recent.clone());
        let routed = router.new_vector().unwrap();
        let unrouted = router.new_vector().unwrap();
        routed.configure(Some(message(2, 0x31))).unwrap();
        unrouted.configure(Some(message(2, 0x32))).unwrap();
        routed.inject().unwrap();
        unrouted.inject().unwrap();
        // Moved to APIC 3 (irqbalance): the next one is recorded there.
        routed.configure(Some(message(3, 0x31))).unwrap();
        routed.inject().unwrap();
        let two: Vec<_> = recent
            .recent(2)
            .iter()
            .map(|e| (e.vector, e.source))
            .collect();
        assert_eq!(
            two,
            [
                (0x31, InterruptSource::MsixIrqfd { gsi: 24 }),
                (0x32, InterruptSource::SignalMsi)
            ]
        );
        assert_eq!(recent.recent(3).len(), 1);
        // A masked vector sends nothing, so nothing is recorded.
        routed.configure(None).unwrap();
        routed.inject().unwrap();
        assert_eq!(recent.recorded(3), 1);
    }

    #[test]
    fn legacy_table_matches_kvm_defaults() {
        let routes = legacy_routes();
        assert_eq!(routes.len(), LEGACY_ROUTES);
        let ioapic_pins = routes
            .iter()
            // SAFETY: all legacy entries are irqchip entries.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .count();
        assert_eq!(ioapic_pins, 24);
    }
}
