//! The host-side view of every disk's interrupt setup (SCENARIOS.md S1): which MSI-X vectors
//! the guest enabled, masked and fired, which queues share a vector, and whether the driver
//! reached DRIVER_OK at all. A monitor thread prints probe progress while the guest boots; at
//! exit a closing report classifies every disk and sums them up.
//!
//! The classification follows Linux's choice in vp_find_vqs (drivers/virtio/
//! virtio_pci_common.c): one MSI-X vector per queue plus one for config changes; else one
//! config vector and one vector all queues share (IRQ names ending in "-virtqueues"); else
//! INTx; else probe fails before DRIVER_OK. With a single queue the first two look the same
//! from the host, so such a disk counts as per-queue.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, LineWriter, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::pci::PciAddress;
use devices::virtio::pci::{STATUS_DRIVER_OK, VIRTIO_MSI_NO_VECTOR};
use irq::msix::MsixSnapshot;

use crate::pci::{NvmeFunction, VirtioFunction};
use crate::vcpu::VcpuActivity;

/// How often the monitor looks at every disk while the guest probes them.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Progress lines are rate-limited: the console is slow in the lab.
const MIN_PROGRESS_GAP: Duration = Duration::from_millis(500);

/// A transport or monitor lock stays usable after a panic elsewhere: reports only read.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn reached_driver_ok(status: u8) -> bool {
    status & STATUS_DRIVER_OK != 0
}

/// How the guest driver takes a disk's interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// Every enabled queue has a vector of its own (Linux's first choice).
    PerQueueMsix,
    /// Several queues signal through one vector (Linux's "-virtqueues" fallback).
    SharedMsix,
    /// DRIVER_OK with MSI-X disabled: the driver took the legacy INTx path.
    Intx,
    /// DRIVER_OK with MSI-X enabled, yet no enabled queue has a vector: not something Linux's
    /// virtio_pci does (its queues all have callbacks), so it is counted apart.
    MsixWithoutQueueVectors,
    /// The driver never set DRIVER_OK: probe failed, or has not finished.
    NeverDriverOk,
}

impl InterruptMode {
    /// The value of `mode=` in the `@@vmm disk` line.
    pub fn name(self) -> &'static str {
        match self {
            InterruptMode::PerQueueMsix => "per-queue-msix",
            InterruptMode::SharedMsix => "shared-msix",
            InterruptMode::Intx => "intx",
            InterruptMode::MsixWithoutQueueVectors => "msix-no-queue-vector",
            InterruptMode::NeverDriverOk => "no-driver-ok",
        }
    }
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectorView {
    /// Enabled, unmasked and routed: an interrupt now reaches the guest.
    pub live: bool,
    pub masked: bool,
    pub pending: bool,
    /// The vCPU the guest aimed the vector at (from the message address).
    pub destination_apic_id: u32,
    pub injected: u64,
}

/// One queue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    pub enabled: bool,
    /// None: VIRTIO_MSI_NO_VECTOR.
    pub msix_vector: Option<u16>,
}

/// Queues of one disk that signal through the same vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVector {
    pub vector: u16,
    pub queues: Vec<u16>,
}

/// One disk's interrupt setup at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInterrupts {
    pub address: PciAddress,
    /// Virtio device status: the STATUS_* bits of devices::virtio::pci.
    pub status: u8,
    pub msix_enabled: bool,
    pub function_masked: bool,
    pub config_vector: Option<u16>,
    /// One per MSI-X table entry.
    pub vectors: Vec<VectorView>,
    /// One per queue the device offers.
    pub queues: Vec<QueueView>,
    /// Set when this view is from the last time the driver had DRIVER_OK and the device was
    /// reset since (e.g. by the guest's shutdown): the status at the end.
    pub status_at_exit: Option<u8>,
    pub mode: InterruptMode,
    /// The function's INTx line, if it has one.
    pub intx: Option<IntxView>,
}

/// A function's INTx line: its GSI and how often it was asserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntxView {
    pub gsi: u32,
    /// Assertions by the device, plus re-assertions at EOI while ISR was still set.
    pub asserts: u64,
}

fn vector_or_none(vector: u16) -> Option<u16> {
    (vector != VIRTIO_MSI_NO_VECTOR).then_some(vector)
}

/// Groups of two or more enabled queues on one vector, by vector: which queues of a
/// `shared-msix` disk share.
pub fn shared_vectors(queues: &[QueueView]) -> Vec<SharedVector> {
    let mut by_vector: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
    for (index, queue) in (0u16..).zip(queues) {
        if let (true, Some(vector)) = (queue.enabled, queue.msix_vector) {
            by_vector.entry(vector).or_default().push(index);
        }
    }
    by_vector
        .into_iter()
        .filter(|(_, queues)| queues.len() > 1)
        .map(|(vector, queues)| SharedVector { vector, queues })
        .collect()
}

fn classify(status: u8, msix_enabled: bool, queues: &[QueueView]) -> InterruptMode {
    if !reached_driver_ok(status) {
        InterruptMode::NeverDriverOk
    } else if !msix_enabled {
        InterruptMode::Intx
    } else if !queues.iter().any(|q| q.enabled && q.msix_vector.is_some()) {
        InterruptMode::MsixWithoutQueueVectors
    } else if shared_vectors(queues).is_empty() {
        InterruptMode::PerQueueMsix
    } else {
        InterruptMode::SharedMsix
    }
}

impl DiskInterrupts {
    /// Reads one disk, holding its transport lock only to copy a few registers (the MSI-X
    /// state is read afterwards under its own lock).
    pub fn capture(function: &VirtioFunction) -> Self {
        let (status, routing, msix, intx) = {
            let transport = lock(&function.transport);
            (
                transport.device_status(),
                transport.interrupt_routing(),
                transport.msix().cloned(),
                transport.intx().cloned(),
            )
        };
        // A function without MSI-X looks like one whose MSI-X stays disabled, with no table.
        let msix = msix.map_or_else(
            || MsixSnapshot {
                enabled: false,
                function_masked: false,
                vectors: Vec::new(),
                counters: Default::default(),
            },
            |msix| msix.snapshot(),
        );
        let intx = intx.map(|line| {
            let counters = line.counters();
            IntxView {
                gsi: line.gsi(),
                asserts: counters.asserts + counters.reasserts,
            }
        });
        let queues: Vec<QueueView> = routing
            .queues
            .iter()
            .map(|queue| QueueView {
                enabled: queue.enabled,
                msix_vector: vector_or_none(queue.msix_vector),
            })
            .collect();
        Self {
            address: function.address,
            status,
            msix_enabled: msix.enabled,
            function_masked: msix.function_masked,
            config_vector: vector_or_none(routing.config_vector),
            vectors: msix
                .vectors
                .iter()
                .map(|vector| VectorView {
                    live: vector.state.live,
                    masked: vector.state.masked,
                    pending: vector.state.pending,
                    destination_apic_id: vector.state.message.destination_apic_id(),
                    injected: vector.injected,
                })
                .collect(),
            mode: classify(status, msix.enabled, &queues),
            queues,
            status_at_exit: None,
            intx,
        }
    }

    /// Vectors the driver pointed the config change or an enabled queue at.
    pub fn vectors_in_use(&self) -> BTreeSet<u16> {
        let queues = self
            .queues
            .iter()
            .filter(|q| q.enabled)
            .filter_map(|q| q.msix_vector);
        self.config_vector.into_iter().chain(queues).collect()
    }

    pub fn live_vectors(&self) -> usize {
        self.vectors.iter().filter(|v| v.live).count()
    }

    /// Vectors in use that cannot fire now because their entry or the whole function is
    /// masked: interrupts for them only set pending bits.
    pub fn masked_vectors_in_use(&self) -> usize {
        if !self.msix_enabled {
            return 0;
        }
        self.vectors_in_use()
            .into_iter()
            .filter_map(|index| self.vectors.get(usize::from(index)))
            .filter(|vector| self.function_masked || vector.masked)
            .count()
    }

    pub fn injected(&self) -> u64 {
        self.vectors.iter().map(|v| v.injected).sum()
    }

    /// `@@vmm disk pci=0000:00:01.0 mode=per-queue-msix status=0x0f live=3/3 masked=0
    /// qvec=1,2 injected=42`: live is live vectors / table size, qvec each queue's vector
    /// (`-`: none; a repeated number is a shared vector).
    pub fn line(&self) -> String {
        let queue_vectors: Vec<String> = self
            .queues
            .iter()
            .map(|q| {
                q.msix_vector
                    .map_or_else(|| "-".to_string(), |v| v.to_string())
            })
            .collect();
        let mut line = format!(
            "@@vmm disk pci={} mode={} status={:#04x} live={}/{} masked={} qvec={} injected={}",
            self.address,
            self.mode.name(),
            self.status,
            self.live_vectors(),
            self.vectors.len(),
            self.masked_vectors_in_use(),
            queue_vectors.join(","),
            self.injected()
        );
        if let Some(status) = self.status_at_exit {
            line.push_str(&format!(" status_at_exit={status:#04x}"));
        }
        if let Some(intx) = self.intx {
            line.push_str(&format!(
                " intx_gsi={} intx_asserts={}",
                intx.gsi, intx.asserts
            ));
        }
        line
    }

    /// One line per vector in use that is masked or has its pending bit set at the end: an
    /// interrupt that may never have reached the guest.
    fn stuck_vector_lines(&self) -> Vec<String> {
        self.vectors_in_use()
            .into_iter()
            .filter_map(|index| Some((index, self.vectors.get(usize::from(index))?)))
            .filter(|(_, v)| self.msix_enabled && (v.pending || v.masked || self.function_masked))
            .map(|(index, v)| {
                format!(
                    "@@vmm vector pci={} vector={index} apic={} masked={} pending={} injected={}",
                    self.address,
                    v.destination_apic_id,
                    u8::from(v.masked || self.function_masked),
                    u8::from(v.pending),
                    v.injected
                )
            })
            .collect()
    }

    /// This view (taken under DRIVER_OK) with the interrupt counts of `now`, which shows the
    /// device reset since.
    fn with_later_state(mut self, now: &DiskInterrupts) -> Self {
        for (vector, later) in self.vectors.iter_mut().zip(&now.vectors) {
            vector.injected = later.injected;
        }
        // The latched view may predate the device's first interrupt (the monitor stops
        // watching once every disk reached DRIVER_OK): its line's count must be the final one.
        if let (Some(intx), Some(later)) = (self.intx.as_mut(), now.intx) {
            intx.asserts = later.asserts;
        }
        self.status_at_exit = Some(now.status);
        self
    }
}

/// How many disks ended up in each mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub per_queue_msix: usize,
    pub shared_msix: usize,
    pub intx: usize,
    pub msix_without_queue_vectors: usize,
    pub never_driver_ok: usize,
}

impl Summary {
    pub fn of(disks: &[DiskInterrupts]) -> Self {
        let mut summary = Summary {
            total: disks.len(),
            ..Summary::default()
        };
        for disk in disks {
            let count = match disk.mode {
                InterruptMode::PerQueueMsix => &mut summary.per_queue_msix,
                InterruptMode::SharedMsix => &mut summary.shared_msix,
                InterruptMode::Intx => &mut summary.intx,
                InterruptMode::MsixWithoutQueueVectors => &mut summary.msix_without_queue_vectors,
                InterruptMode::NeverDriverOk => &mut summary.never_driver_ok,
            };
            *count += 1;
        }
        summary
    }

    pub fn line(&self) -> String {
        format!(
            "@@vmm disks total={} per_queue_msix={} shared_msix={} intx={} never_driver_ok={} \
             msix_no_queue_vector={}",
            self.total,
            self.per_queue_msix,
            self.shared_msix,
            self.intx,
            self.never_driver_ok,
            self.msix_without_queue_vectors
        )
    }

    pub fn human_line(&self) -> String {
        let mut line = format!(
            "blkswarm: {} disks: {} per-queue MSI-X, {} shared, {} INTx, {} never reached DRIVER_OK",
            self.total, self.per_queue_msix, self.shared_msix, self.intx, self.never_driver_ok
        );
        if self.msix_without_queue_vectors > 0 {
            line.push_str(&format!(
                ", {} MSI-X without queue vectors",
                self.msix_without_queue_vectors
            ));
        }
        line
    }
}

/// Interrupts injected by every disk together, by the destination APIC id each vector has at
/// the end: `@@vmm irqs_by_apic 0=1234 1=5678`. None when nothing was injected.
fn injections_by_apic_line(disks: &[DiskInterrupts]) -> Option<String> {
    let mut by_apic: BTreeMap<u32, u64> = BTreeMap::new();
    for vector in disks.iter().flat_map(|d| &d.vectors) {
        if vector.injected > 0 {
            *by_apic.entry(vector.destination_apic_id).or_default() += vector.injected;
        }
    }
    if by_apic.is_empty() {
        return None;
    }
    let counts: Vec<String> = by_apic
        .iter()
        .map(|(apic, count)| format!("{apic}={count}"))
        .collect();
    Some(format!("@@vmm irqs_by_apic {}", counts.join(" ")))
}

/// What the monitor saw: each disk's last view while its driver had DRIVER_OK, so the
/// closing report still knows the setup if the guest resets devices on its way down.
pub struct ProbeHistory {
    driver_ok_views: Vec<Option<DiskInterrupts>>,
}

impl ProbeHistory {
    fn new(disks: usize) -> Self {
        Self {
            driver_ok_views: vec![None; disks],
        }
    }

    fn observe(&mut self, functions: &[VirtioFunction]) {
        for (function, latched) in functions.iter().zip(self.driver_ok_views.iter_mut()) {
            // Most polls find most disks still probing: a status read is all they cost. A
            // transport busy right now is looked at next time (its holder may be stuck, and
            // the stall report must still come out).
            let status = match function.transport.try_lock() {
                Ok(transport) => transport.device_status(),
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().device_status(),
                Err(TryLockError::WouldBlock) => continue,
            };
            if !reached_driver_ok(status) {
                continue;
            }
            let view = DiskInterrupts::capture(function);
            if reached_driver_ok(view.status) {
                *latched = Some(view);
            }
        }
    }

    fn driver_ok_count(&self) -> usize {
        self.driver_ok_views.iter().filter(|v| v.is_some()).count()
    }
}

/// Decides when a progress line is due: on a change, at most every `min_gap`, except that
/// the final count (all disks, or the count when stopped) always goes out.
struct ProgressLimiter {
    total: usize,
    min_gap: Duration,
    last_count: usize,
    last_printed_at: Option<Instant>,
}

impl ProgressLimiter {
    fn new(total: usize, min_gap: Duration) -> Self {
        Self {
            total,
            min_gap,
            last_count: 0,
            last_printed_at: None,
        }
    }

    /// Whether `count`, seen at `now`, should be printed now.
    fn due(&mut self, count: usize, now: Instant) -> bool {
        if count == self.last_count {
            return false;
        }
        let gap_over = self
            .last_printed_at
            .is_none_or(|at| now.duration_since(at) >= self.min_gap);
        if count == self.total || gap_over {
            self.printed(count, now);
            return true;
        }
        false
    }

    /// Whether the count at stop time still needs printing (once at least, even if zero).
    fn due_at_stop(&mut self, count: usize, now: Instant) -> bool {
        let due = count != self.last_count || self.last_printed_at.is_none();
        if due {
            self.printed(count, now);
        }
        due
    }

    fn printed(&mut self, count: usize, now: Instant) {
        self.last_count = count;
        self.last_printed_at = Some(now);
    }
}

#[derive(Debug, Clone, Copy)]
struct MonitorTiming {
    poll: Duration,
    min_gap: Duration,
    /// No probe progress for this long prints the stall report.
    stall_after: Duration,
}

/// The probe monitor thread; [`ProbeMonitor::stop`] ends it and hands back what it saw.
pub struct ProbeMonitor {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<ProbeHistory>,
}

impl ProbeMonitor {
    /// Stops the monitor (printing the final count unless already printed) and returns the
    /// history the closing report needs. Returns at once if every disk already reached
    /// DRIVER_OK, which ends the monitor by itself.
    pub fn stop(self) -> ProbeHistory {
        // The thread may have ended already; then there is nobody to tell.
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_else(|_| ProbeHistory::new(0))
    }
}

/// Starts watching `functions` while the guest probes them, printing to stderr
/// `@@vmm probe driver_ok=312 total=500 elapsed_ms=N` when the number of disks that reached
/// DRIVER_OK changes (at most every 500 ms, and the final count). Ends by itself once all
/// reached DRIVER_OK, else when stopped. Elapsed time counts from this call.
pub fn spawn_probe_monitor(
    functions: Vec<VirtioFunction>,
    vcpus: Arc<VcpuActivity>,
) -> io::Result<ProbeMonitor> {
    spawn_monitor(
        functions,
        vcpus,
        Box::new(LineWriter::new(io::stderr())),
        MonitorTiming {
            poll: POLL_INTERVAL,
            min_gap: MIN_PROGRESS_GAP,
            stall_after: STALL_REPORT_AFTER,
        },
    )
}

fn spawn_monitor(
    functions: Vec<VirtioFunction>,
    vcpus: Arc<VcpuActivity>,
    out: Box<dyn Write + Send>,
    timing: MonitorTiming,
) -> io::Result<ProbeMonitor> {
    let (stop, stop_requests) = mpsc::channel();
    let thread = thread::Builder::new()
        .name("probe-monitor".into())
        .spawn(move || watch_probe(&functions, &vcpus, out, timing, &stop_requests))?;
    Ok(ProbeMonitor { stop, thread })
}

/// Probing that makes no progress for this long gets a one-time report of every disk with
/// requests in flight: a guest hung on a lost completion or interrupt shows where it waits.
const STALL_REPORT_AFTER: Duration = Duration::from_secs(15);

/// One line per queue with outstanding requests (nothing when every device is idle, as after
/// a probe that simply finished with failures), with the queue's MSI-X vector state.
///
/// First each vCPU's state: a vCPU stuck handling an exit points at the VMM (a transport it
/// holds locked is then listed as busy), while vCPUs all inside KVM_RUN point at the guest or
/// KVM (a lost interrupt, a halted CPU nobody wakes).
fn report_stall(
    functions: &[VirtioFunction],
    vcpus: &VcpuActivity,
    out: &mut Box<dyn Write + Send>,
    elapsed: Duration,
) {
    for vcpu in vcpus.snapshot() {
        let _ = writeln!(
            out,
            "@@vmm stall_vcpu index={} state={} address={:#x} for_ms={} elapsed_ms={}",
            vcpu.index,
            vcpu.state.name(),
            vcpu.address,
            vcpu.for_duration.as_millis(),
            elapsed.as_millis()
        );
    }
    for function in functions {
        // Never wait for a transport here: the vCPU holding it may be what is stuck.
        let transport = match function.transport.try_lock() {
            Ok(transport) => transport,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                let _ = writeln!(
                    out,
                    "@@vmm stall_busy pci={} lock=held elapsed_ms={}",
                    function.address,
                    elapsed.as_millis()
                );
                continue;
            }
        };
        let outstanding = transport.outstanding_requests();
        if outstanding.is_empty() {
            continue;
        }
        let routing = transport.interrupt_routing();
        let msix = transport.msix().cloned();
        drop(transport);
        for queue in outstanding {
            let vector = routing
                .queues
                .get(usize::from(queue.queue))
                .map_or(u16::MAX, |q| q.msix_vector);
            let state = msix.as_ref().and_then(|m| m.vector_state(vector));
            let _ = writeln!(
                out,
                "@@vmm stall elapsed_ms={} pci={} queue={} avail_idx={} used_idx={} vector={} live={} masked={} pending={}",
                elapsed.as_millis(),
                function.address,
                queue.queue,
                queue.avail_idx,
                queue.used_idx,
                vector,
                state.is_some_and(|s| s.live),
                state.is_some_and(|s| s.masked),
                state.is_some_and(|s| s.pending),
            );
        }
    }
}

/// Per NVMe controller one `@@vmm nvme` line (ready, MSI-X, interrupts injected, live I/O
/// queues) and per I/O SQ id it ever had one `@@vmm nvme_queue` line with what it carried
/// (deleted queues included: a guest deletes them at shutdown), e.g. to see which of S2's
/// queues the online CPUs used.
pub fn write_nvme_report(functions: &[NvmeFunction], out: &mut impl Write) -> io::Result<()> {
    for function in functions {
        let (ready, live_queues, history, counters, msix, shadow_doorbells) = {
            let guard = lock(&function.function);
            let controller = guard.controller();
            (
                controller.is_ready(),
                controller.io_queue_stats().len(),
                controller.io_queue_history(),
                controller.counters(),
                guard.msix().snapshot(),
                controller.doorbell_buffers().is_some(),
            )
        };
        writeln!(
            out,
            "@@vmm nvme pci={} ready={} io_queues_live={} io_queues_ever={} msix_enabled={} \
             injected={} admin_commands={} shadow_doorbells={} invalid_doorbells={} \
             invalid_shadow_doorbells={} fatal_errors={} resets={} subsystem_resets={}",
            function.address,
            u8::from(ready),
            live_queues,
            history.len(),
            u8::from(msix.enabled),
            msix.counters.injected,
            counters.admin_commands,
            u8::from(shadow_doorbells),
            counters.invalid_doorbell_registers + counters.invalid_doorbell_values,
            counters.invalid_shadow_doorbell_values,
            counters.fatal_errors,
            counters.resets,
            counters.subsystem_resets
        )?;
        for queue in history {
            writeln!(
                out,
                "@@vmm nvme_queue pci={} sq={} cq={} vector={} worker={} commands={} \
                 doorbell_writes={} read_bytes={} written_bytes={} errors={} cq_full={}",
                function.address,
                queue.sq_id,
                queue.cq_id,
                queue
                    .vector
                    .map_or_else(|| "-".to_string(), |v| v.to_string()),
                queue.worker,
                queue.commands,
                queue.doorbell_writes,
                queue.bytes_read,
                queue.bytes_written,
                queue.errors,
                queue.completion_queue_full
            )?;
        }
    }
    out.flush()
}

/// The NVMe report on stderr; call once the guest has stopped.
pub fn print_nvme_report(functions: &[NvmeFunction]) {
    // A report that cannot be written is no reason to fail the run.
    let _ = write_nvme_report(functions, &mut BufWriter::new(io::stderr().lock()));
}

/// The stall report's lines (vCPU states, queues with requests in flight) on stderr, for a
/// run ended from outside, e.g. by a harness timeout.
pub fn print_hang_report(functions: &[VirtioFunction], vcpus: &VcpuActivity) {
    let mut out: Box<dyn Write + Send> = Box::new(LineWriter::new(io::stderr()));
    report_stall(functions, vcpus, &mut out, Duration::ZERO);
    let _ = out.flush();
}

fn watch_probe(
    functions: &[VirtioFunction],
    vcpus: &VcpuActivity,
    mut out: Box<dyn Write + Send>,
    timing: MonitorTiming,
    stop_requests: &mpsc::Receiver<()>,
) -> ProbeHistory {
    let started = Instant::now();
    let total = functions.len();
    let mut history = ProbeHistory::new(total);
    let mut limiter = ProgressLimiter::new(total, timing.min_gap);
    let print = |out: &mut Box<dyn Write + Send>, count: usize, now: Instant| {
        // A lost progress line is no reason to disturb the VM.
        let _ = writeln!(
            out,
            "@@vmm probe driver_ok={count} total={total} elapsed_ms={}",
            now.duration_since(started).as_millis()
        );
    };
    let mut last_progress = (0, started);
    let mut stall_reported = false;
    loop {
        history.observe(functions);
        let count = history.driver_ok_count();
        let now = Instant::now();
        if limiter.due(count, now) {
            print(&mut out, count, now);
        }
        if count != last_progress.0 {
            last_progress = (count, now);
            stall_reported = false;
        } else if !stall_reported && now.duration_since(last_progress.1) >= timing.stall_after {
            stall_reported = true;
            report_stall(functions, vcpus, &mut out, now.duration_since(started));
        }
        if count == total {
            return history;
        }
        match stop_requests.recv_timeout(timing.poll) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    history.observe(functions);
    let count = history.driver_ok_count();
    let now = Instant::now();
    if limiter.due_at_stop(count, now) {
        print(&mut out, count, now);
    }
    history
}

/// Every disk's view for the closing report: as it is now, or, if its driver had DRIVER_OK
/// and the device was reset since, the setup it had then (with the final interrupt counts).
pub fn closing_views(functions: &[VirtioFunction], history: &ProbeHistory) -> Vec<DiskInterrupts> {
    functions
        .iter()
        .enumerate()
        .map(|(index, function)| {
            let now = DiskInterrupts::capture(function);
            let latched = history.driver_ok_views.get(index).and_then(Option::as_ref);
            match latched {
                Some(latched) if !reached_driver_ok(now.status) => {
                    latched.clone().with_later_state(&now)
                }
                _ => now,
            }
        })
        .collect()
}

/// Per disk one `@@vmm disk` line, a `@@vmm vector` line for each vector in use left masked
/// or pending, interrupts by destination APIC id, then the summary (`@@vmm disks ...` and a
/// human line), last so it is what a reader sees first at the end of the log.
pub fn write_closing_report(disks: &[DiskInterrupts], out: &mut impl Write) -> io::Result<()> {
    if disks.is_empty() {
        return Ok(());
    }
    for disk in disks {
        writeln!(out, "{}", disk.line())?;
        for line in disk.stuck_vector_lines() {
            writeln!(out, "{line}")?;
        }
    }
    if let Some(line) = injections_by_apic_line(disks) {
        writeln!(out, "{line}")?;
    }
    let summary = Summary::of(disks);
    writeln!(out, "{}", summary.line())?;
    writeln!(out, "{}", summary.human_line())?;
    out.flush()
}

/// The closing report of `functions` on stderr; call once the guest has stopped.
pub fn print_closing_report(functions: &[VirtioFunction], history: &ProbeHistory) {
    let views = closing_views(functions, history);
    // One buffered write instead of one syscall per line for hundreds of disks.
    let mut out = BufWriter::new(io::stderr().lock());
    let _ = write_closing_report(&views, &mut out);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use devices::pci::config::PCI_CAPABILITY_LIST;
    use devices::pci::PciDevice;
    use devices::virtio::pci::{
        VirtioPciDevice, COMMON_CFG_OFFSET, PCI_CAP_ID_MSIX, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
        STATUS_FAILED, STATUS_FEATURES_OK,
    };
    use devices::virtio::{
        ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
        VIRTIO_ID_BLOCK,
    };
    use irq::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_TABLE_ENTRY_SIZE};
    use irq::{MsiMessage, MsiPath, MsiVector};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    // Common configuration fields (virtio 1.2, 4.1.4.3), as a driver knows them.
    const DRIVER_FEATURE_SELECT: u64 = 0x08;
    const DRIVER_FEATURE: u64 = 0x0c;
    const CONFIG_MSIX_VECTOR: u64 = 0x10;
    const DEVICE_STATUS: u64 = 0x14;
    const QUEUE_SELECT: u64 = 0x16;
    const QUEUE_SIZE: u64 = 0x18;
    const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    const QUEUE_ENABLE: u64 = 0x1c;
    const QUEUE_DESC: u64 = 0x20;
    const QUEUE_DRIVER: u64 = 0x28;
    const QUEUE_DEVICE: u64 = 0x30;

    const BAR0: u64 = 0x40_0000_0000;
    const MEMORY_SIZE: usize = 0x10_0000;
    const QUEUE_SIZE_USED: u64 = 64;
    /// Rings of queue q at RINGS + q * RING_SPACING: descriptors, then avail, then used.
    const RINGS: u64 = 0x1_0000;
    const RING_SPACING: u64 = 0x1_0000;

    /// A block device that accepts activation and keeps the interrupt handle for the test.
    struct FakeDisk {
        queues: u16,
        interrupt: Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>,
    }

    impl VirtioDevice for FakeDisk {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn num_queues(&self) -> u16 {
            self.queues
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn device_features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _memory: GuestMemoryMmap,
            _acked_features: u64,
            interrupt: Arc<dyn VirtioInterrupt>,
            _queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            *lock(&self.interrupt) = Some(interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            *lock(&self.interrupt) = None;
        }
    }

    #[derive(Default)]
    struct FakeVector {
        injects: AtomicU64,
    }

    impl MsiVector for FakeVector {
        fn configure(&self, _message: Option<MsiMessage>) -> io::Result<()> {
            Ok(())
        }
        fn inject(&self) -> io::Result<MsiPath> {
            self.injects.fetch_add(1, Ordering::SeqCst);
            Ok(MsiPath::Irqfd)
        }
    }

    /// A disk on the test's PCI bus, and a guest driver doing what Linux's virtio_pci does.
    struct Guest {
        function: VirtioFunction,
        interrupt: Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>,
    }

    impl Guest {
        fn new(slot: u8, queues: u16, vectors: usize) -> Self {
            Self::with_intx(slot, queues, vectors, None)
        }

        fn with_intx(
            slot: u8,
            queues: u16,
            vectors: usize,
            intx: Option<Arc<irq::IntxLine>>,
        ) -> Self {
            let interrupt = Arc::new(Mutex::new(None));
            let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap();
            let transport = VirtioPciDevice::with_intx(
                Box::new(FakeDisk {
                    queues,
                    interrupt: interrupt.clone(),
                }),
                memory,
                (0..vectors)
                    .map(|_| Arc::new(FakeVector::default()) as Arc<dyn MsiVector>)
                    .collect(),
                intx,
                BAR0,
            )
            .unwrap();
            Self {
                function: VirtioFunction {
                    address: PciAddress {
                        bus: 0,
                        device: slot,
                        function: 0,
                    },
                    transport: Arc::new(Mutex::new(transport)),
                },
                interrupt,
            }
        }

        fn transport(&self) -> MutexGuard<'_, VirtioPciDevice> {
            lock(&self.function.transport)
        }

        fn write(&self, offset: u64, len: usize, value: u64) {
            self.transport()
                .bar_write(0, offset, &value.to_le_bytes()[..len]);
        }

        fn common_write(&self, field: u64, len: usize, value: u64) {
            self.write(COMMON_CFG_OFFSET + field, len, value);
        }

        fn status(&self) -> u8 {
            self.transport().device_status()
        }

        fn add_status(&self, bits: u8) {
            let status = self.status() | bits;
            self.common_write(DEVICE_STATUS, 1, status.into());
        }

        fn msix_control(&self, control: u16) {
            let mut transport = self.transport();
            let mut byte = [0u8; 1];
            transport.config_read(PCI_CAPABILITY_LIST as u16, &mut byte);
            let mut cap = u16::from(byte[0]);
            loop {
                assert_ne!(cap, 0, "no MSI-X capability");
                transport.config_read(cap, &mut byte);
                if byte[0] == PCI_CAP_ID_MSIX {
                    break;
                }
                transport.config_read(cap + 1, &mut byte);
                cap = u16::from(byte[0]);
            }
            transport.config_write(cap + 2, &control.to_le_bytes());
        }

        /// Programs table entry `vector` for `apic_id` and unmasks it.
        fn program_vector(&self, vector: u64, apic_id: u64) {
            let table = self.transport().layout().msix_table_offset;
            let entry = table + vector * MSIX_TABLE_ENTRY_SIZE;
            self.write(entry, 4, 0xfee0_0000 | apic_id << 12);
            self.write(entry + 4, 4, 0);
            self.write(entry + 8, 4, 0x30 + vector);
            self.write(entry + 12, 4, 0);
        }

        /// Up to FEATURES_OK, as virtio_dev_probe does before find_vqs.
        fn negotiate(&self) {
            self.common_write(DEVICE_STATUS, 1, 0);
            self.add_status(STATUS_ACKNOWLEDGE);
            self.add_status(STATUS_DRIVER);
            self.common_write(DRIVER_FEATURE_SELECT, 4, 1);
            self.common_write(DRIVER_FEATURE, 4, VIRTIO_F_VERSION_1 >> 32);
            self.add_status(STATUS_FEATURES_OK);
        }

        /// MSI-X on with `vectors` entries programmed (vector i to APIC id i % 2), the way
        /// pci_alloc_irq_vectors + request_irq leave it.
        fn enable_msix(&self, vectors: u64) {
            self.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
            for vector in 0..vectors {
                self.program_vector(vector, vector % 2);
            }
            self.msix_control(MSIX_CONTROL_ENABLE);
        }

        fn setup_queue(&self, index: u16, vector: u16) {
            let rings = RINGS + RING_SPACING * u64::from(index);
            self.common_write(QUEUE_SELECT, 2, index.into());
            self.common_write(QUEUE_SIZE, 2, QUEUE_SIZE_USED);
            self.common_write(QUEUE_MSIX_VECTOR, 2, vector.into());
            self.common_write(QUEUE_DESC, 8, rings);
            self.common_write(QUEUE_DRIVER, 8, rings + 0x1000);
            self.common_write(QUEUE_DEVICE, 8, rings + 0x2000);
            self.common_write(QUEUE_ENABLE, 2, 1);
        }

        /// vp_find_vqs's first choice: config on vector 0, queue q on vector q + 1.
        fn probe_per_queue(&self, queues: u16) {
            self.negotiate();
            self.enable_msix(u64::from(queues) + 1);
            self.common_write(CONFIG_MSIX_VECTOR, 2, 0);
            for queue in 0..queues {
                self.setup_queue(queue, queue + 1);
            }
            self.add_status(STATUS_DRIVER_OK);
        }

        /// The "-virtqueues" fallback: config on vector 0, every queue on vector 1.
        fn probe_shared(&self, queues: u16) {
            self.negotiate();
            self.enable_msix(2);
            self.common_write(CONFIG_MSIX_VECTOR, 2, 0);
            for queue in 0..queues {
                self.setup_queue(queue, 1);
            }
            self.add_status(STATUS_DRIVER_OK);
        }

        /// vp_find_vqs_intx: MSI-X stays off, no vectors.
        fn probe_intx(&self, queues: u16) {
            self.negotiate();
            for queue in 0..queues {
                self.setup_queue(queue, VIRTIO_MSI_NO_VECTOR);
            }
            self.add_status(STATUS_DRIVER_OK);
        }

        /// Every vp_find_vqs attempt failed (e.g. -ENOSPC): MSI-X freed again, FAILED set.
        fn probe_fails(&self) {
            self.negotiate();
            self.enable_msix(1);
            self.msix_control(0);
            self.add_status(STATUS_FAILED);
        }

        fn notify_queue(&self, queue: u16) {
            let interrupt = lock(&self.interrupt).clone().expect("device is active");
            interrupt.notify_queue(queue);
        }

        fn view(&self) -> DiskInterrupts {
            DiskInterrupts::capture(&self.function)
        }
    }

    fn functions(guests: &[&Guest]) -> Vec<VirtioFunction> {
        guests.iter().map(|g| g.function.clone()).collect()
    }

    #[test]
    fn per_queue_vectors_are_per_queue_msix() {
        let guest = Guest::new(1, 2, 3);
        guest.probe_per_queue(2);
        guest.notify_queue(0);
        guest.notify_queue(1);
        guest.notify_queue(1);
        let view = guest.view();
        assert_eq!(view.mode, InterruptMode::PerQueueMsix);
        assert_eq!(view.status, 0x0f);
        assert!(view.msix_enabled && !view.function_masked);
        assert_eq!(view.config_vector, Some(0));
        assert_eq!(
            view.queues,
            vec![
                QueueView {
                    enabled: true,
                    msix_vector: Some(1)
                },
                QueueView {
                    enabled: true,
                    msix_vector: Some(2)
                },
            ]
        );
        assert!(shared_vectors(&view.queues).is_empty());
        assert_eq!(view.live_vectors(), 3);
        let injected: Vec<u64> = view.vectors.iter().map(|v| v.injected).collect();
        assert_eq!(injected, vec![0, 1, 2]);
        let apic: Vec<u32> = view.vectors.iter().map(|v| v.destination_apic_id).collect();
        assert_eq!(apic, vec![0, 1, 0]);
        assert_eq!(
            view.line(),
            "@@vmm disk pci=0000:00:01.0 mode=per-queue-msix status=0x0f live=3/3 masked=0 \
             qvec=1,2 injected=3"
        );
        assert!(view.stuck_vector_lines().is_empty());
    }

    #[test]
    fn queues_on_one_vector_are_shared_msix() {
        let guest = Guest::new(2, 2, 3);
        guest.probe_shared(2);
        guest.notify_queue(0);
        guest.notify_queue(1);
        let view = guest.view();
        assert_eq!(view.mode, InterruptMode::SharedMsix);
        assert_eq!(
            shared_vectors(&view.queues),
            vec![SharedVector {
                vector: 1,
                queues: vec![0, 1]
            }]
        );
        assert_eq!(view.vectors_in_use(), BTreeSet::from([0, 1]));
        // Linux allocated two of the three entries; the third stays masked and unused.
        assert_eq!(view.live_vectors(), 2);
        assert!(view.vectors[2].masked);
        assert_eq!(view.masked_vectors_in_use(), 0);
        assert_eq!(view.vectors[1].injected, 2);
        assert_eq!(
            view.line(),
            "@@vmm disk pci=0000:00:02.0 mode=shared-msix status=0x0f live=2/3 masked=0 \
             qvec=1,1 injected=2"
        );
    }

    #[test]
    fn one_queue_on_its_own_vector_is_per_queue_whichever_fallback_linux_took() {
        let guest = Guest::new(3, 1, 2);
        guest.probe_shared(1);
        assert_eq!(guest.view().mode, InterruptMode::PerQueueMsix);
    }

    #[test]
    fn driver_ok_without_msix_is_intx() {
        let guest = Guest::new(4, 2, 3);
        guest.probe_intx(2);
        let view = guest.view();
        assert_eq!(view.mode, InterruptMode::Intx);
        assert!(!view.msix_enabled);
        assert_eq!(view.live_vectors(), 0);
        assert_eq!(
            view.line(),
            "@@vmm disk pci=0000:00:04.0 mode=intx status=0x0f live=0/3 masked=0 qvec=-,- \
             injected=0"
        );
    }

    #[test]
    fn a_function_without_msix_on_intx_shows_its_line() {
        let line = irq::IntxLine::new(18).unwrap();
        let guest = Guest::with_intx(2, 2, 0, Some(line.clone()));
        guest.probe_intx(2);
        guest.notify_queue(0);
        guest.notify_queue(1);
        let view = guest.view();
        assert_eq!(view.mode, InterruptMode::Intx);
        assert_eq!(
            view.intx,
            Some(IntxView {
                gsi: 18,
                asserts: 2
            })
        );
        assert_eq!(
            view.line(),
            "@@vmm disk pci=0000:00:02.0 mode=intx status=0x0f live=0/0 masked=0 qvec=-,- \
             injected=0 intx_gsi=18 intx_asserts=2"
        );
        assert_eq!(line.irqfd().read().unwrap(), 2);
    }

    #[test]
    fn failed_probe_never_reached_driver_ok() {
        let guest = Guest::new(5, 2, 3);
        guest.probe_fails();
        let view = guest.view();
        assert_eq!(view.mode, InterruptMode::NeverDriverOk);
        assert_eq!(view.status, 0x8b);
        assert!(!view.msix_enabled);
        assert_eq!(
            Guest::new(6, 2, 3).view().mode,
            InterruptMode::NeverDriverOk
        );
        assert_eq!(
            view.line(),
            "@@vmm disk pci=0000:00:05.0 mode=no-driver-ok status=0x8b live=0/3 masked=0 \
             qvec=-,- injected=0"
        );
    }

    #[test]
    fn msix_on_but_no_queue_vector_is_counted_apart() {
        let guest = Guest::new(7, 2, 3);
        guest.negotiate();
        guest.enable_msix(1);
        guest.common_write(CONFIG_MSIX_VECTOR, 2, 0);
        guest.setup_queue(0, VIRTIO_MSI_NO_VECTOR);
        guest.add_status(STATUS_DRIVER_OK);
        assert_eq!(guest.view().mode, InterruptMode::MsixWithoutQueueVectors);
    }

    #[test]
    fn masked_and_pending_vectors_in_use_are_reported() {
        let guest = Guest::new(8, 2, 3);
        guest.probe_per_queue(2);
        // The guest masks queue 1's entry; its interrupt waits in the PBA.
        let table = guest.transport().layout().msix_table_offset;
        guest.write(table + 2 * MSIX_TABLE_ENTRY_SIZE + 12, 4, 1);
        guest.notify_queue(1);
        let view = guest.view();
        assert_eq!(view.masked_vectors_in_use(), 1);
        assert_eq!(view.live_vectors(), 2);
        assert!(view.vectors[2].pending);
        assert_eq!(
            view.stuck_vector_lines(),
            vec![
                "@@vmm vector pci=0000:00:08.0 vector=2 apic=0 masked=1 pending=1 injected=0"
                    .to_string()
            ]
        );
        // Function mask: every vector in use counts as masked.
        guest.msix_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert_eq!(guest.view().masked_vectors_in_use(), 3);
    }

    #[test]
    fn summary_counts_every_mode() {
        let guests = [
            Guest::new(1, 2, 3),
            Guest::new(2, 2, 3),
            Guest::new(3, 2, 3),
            Guest::new(4, 2, 3),
            Guest::new(5, 2, 3),
        ];
        guests[0].probe_per_queue(2);
        guests[1].probe_per_queue(2);
        guests[2].probe_shared(2);
        guests[3].probe_intx(2);
        guests[4].probe_fails();
        guests[0].notify_queue(0);
        guests[1].notify_queue(1);
        guests[2].notify_queue(0);
        let views: Vec<DiskInterrupts> = guests.iter().map(Guest::view).collect();
        let summary = Summary::of(&views);
        assert_eq!(
            summary,
            Summary {
                total: 5,
                per_queue_msix: 2,
                shared_msix: 1,
                intx: 1,
                msix_without_queue_vectors: 0,
                never_driver_ok: 1,
            }
        );
        assert_eq!(
            summary.line(),
            "@@vmm disks total=5 per_queue_msix=2 shared_msix=1 intx=1 never_driver_ok=1 \
             msix_no_queue_vector=0"
        );
        assert_eq!(
            summary.human_line(),
            "blkswarm: 5 disks: 2 per-queue MSI-X, 1 shared, 1 INTx, 1 never reached DRIVER_OK"
        );

        let mut out = Vec::new();
        write_closing_report(&views, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5 + 3);
        assert!(lines[0].starts_with("@@vmm disk pci=0000:00:01.0 mode=per-queue-msix"));
        assert!(lines[4].starts_with("@@vmm disk pci=0000:00:05.0 mode=no-driver-ok"));
        // Queue 0 of disks 1 and 3 on vector 1 (APIC 1), queue 1 of disk 2 on vector 2 (APIC 0).
        assert_eq!(lines[5], "@@vmm irqs_by_apic 0=1 1=2");
        assert_eq!(lines[6], summary.line());
        assert_eq!(lines[7], summary.human_line());
        assert!(lines.iter().all(|l| l.len() <= 110), "{lines:?}");

        let mut empty = Vec::new();
        write_closing_report(&[], &mut empty).unwrap();
        assert!(empty.is_empty());
        let odd = Summary {
            total: 1,
            msix_without_queue_vectors: 1,
            ..Summary::default()
        };
        assert!(odd
            .human_line()
            .ends_with(", 1 MSI-X without queue vectors"));
    }

    #[test]
    fn progress_is_rate_limited_but_the_final_count_always_goes_out() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut limiter = ProgressLimiter::new(10, Duration::from_millis(500));
        assert!(!limiter.due(0, at(0)), "no change from zero");
        assert!(limiter.due(1, at(200)), "first change");
        assert!(!limiter.due(3, at(400)), "too soon");
        assert!(!limiter.due(4, at(600)), "still too soon");
        assert!(limiter.due(4, at(700)));
        assert!(!limiter.due(4, at(1400)), "no change");
        assert!(limiter.due(10, at(800)), "all disks: at once");
        assert!(!limiter.due_at_stop(10, at(900)), "already printed");

        let mut stopped = ProgressLimiter::new(10, Duration::from_millis(500));
        assert!(stopped.due(2, at(0)));
        assert!(!stopped.due(5, at(100)));
        assert!(stopped.due_at_stop(5, at(150)), "final count when stopped");
        let mut silent = ProgressLimiter::new(10, Duration::from_millis(500));
        assert!(
            silent.due_at_stop(0, at(0)),
            "at least one line, even for zero"
        );
    }

    /// Collects what the monitor prints.
    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<Vec<u8>>>);

    impl Write for Output {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Output {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(lock(&self.0).clone())
                .unwrap()
                .lines()
                .map(|line| {
                    // elapsed_ms varies from run to run.
                    line.split(" elapsed_ms=").next().unwrap().to_string()
                })
                .collect()
        }

        fn wait_for(&self, line: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.lines().iter().any(|l| l == line) {
                assert!(
                    Instant::now() < deadline,
                    "no {line:?} in {:?}",
                    self.lines()
                );
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn idle_vcpus() -> Arc<VcpuActivity> {
        Arc::new(VcpuActivity::new(1))
    }

    const FAST: MonitorTiming = MonitorTiming {
        poll: Duration::from_millis(2),
        min_gap: Duration::ZERO,
        stall_after: Duration::from_secs(3600),
    };

    #[test]
    fn monitor_reports_progress_and_ends_when_every_disk_is_up() {
        let (a, b) = (Guest::new(1, 2, 3), Guest::new(2, 2, 3));
        let out = Output::default();
        let monitor = spawn_monitor(
            functions(&[&a, &b]),
            idle_vcpus(),
            Box::new(out.clone()),
            FAST,
        )
        .unwrap();
        a.probe_per_queue(2);
        out.wait_for("@@vmm probe driver_ok=1 total=2");
        b.probe_shared(2);
        out.wait_for("@@vmm probe driver_ok=2 total=2");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !monitor.thread.is_finished() {
            assert!(Instant::now() < deadline, "the monitor ends by itself");
            thread::sleep(Duration::from_millis(1));
        }
        let history = monitor.stop();
        assert_eq!(history.driver_ok_count(), 2);
        assert_eq!(
            out.lines(),
            vec![
                "@@vmm probe driver_ok=1 total=2",
                "@@vmm probe driver_ok=2 total=2"
            ]
        );
    }

    #[test]
    fn stopped_monitor_prints_the_final_count() {
        let (a, b) = (Guest::new(1, 2, 3), Guest::new(2, 2, 3));
        let out = Output::default();
        let monitor = spawn_monitor(
            functions(&[&a, &b]),
            idle_vcpus(),
            Box::new(out.clone()),
            FAST,
        )
        .unwrap();
        b.probe_fails();
        let history = monitor.stop();
        assert_eq!(history.driver_ok_count(), 0);
        assert_eq!(out.lines(), vec!["@@vmm probe driver_ok=0 total=2"]);
        let full = out.0.lock().unwrap().clone();
        assert!(String::from_utf8(full).unwrap().contains(" elapsed_ms="));
    }

    #[test]
    fn closing_report_keeps_the_setup_of_disks_reset_after_driver_ok() {
        let (a, b, c) = (
            Guest::new(1, 2, 3),
            Guest::new(2, 2, 3),
            Guest::new(3, 2, 3),
        );
        a.probe_per_queue(2);
        b.probe_shared(2);
        c.probe_fails();
        let all = functions(&[&a, &b, &c]);
        let out = Output::default();
        let monitor =
            spawn_monitor(all.clone(), idle_vcpus(), Box::new(out.clone()), FAST).unwrap();
        out.wait_for("@@vmm probe driver_ok=2 total=3");
        let history = monitor.stop();
        // The guest shuts down: a resets its device after more I/O; b stays up.
        a.notify_queue(1);
        a.common_write(DEVICE_STATUS, 1, 0);
        let views = closing_views(&all, &history);
        assert_eq!(views[0].mode, InterruptMode::PerQueueMsix);
        assert_eq!(views[0].status, 0x0f);
        assert_eq!(views[0].status_at_exit, Some(0));
        assert_eq!(views[0].injected(), 1, "counts as of the end");
        assert!(views[0].line().ends_with("injected=1 status_at_exit=0x00"));
        assert_eq!(views[1].mode, InterruptMode::SharedMsix);
        assert_eq!(views[1].status_at_exit, None);
        assert_eq!(views[2].mode, InterruptMode::NeverDriverOk);
        let summary = Summary::of(&views);
        assert_eq!(
            (
                summary.per_queue_msix,
                summary.shared_msix,
                summary.never_driver_ok
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn closing_report_counts_intx_assertions_made_after_the_monitor_stopped() {
        let line = irq::IntxLine::new(18).unwrap();
        let disk = Guest::with_intx(2, 2, 0, Some(line.clone()));
        disk.probe_intx(2);
        let all = functions(&[&disk]);
        let out = Output::default();
        let monitor =
            spawn_monitor(all.clone(), idle_vcpus(), Box::new(out.clone()), FAST).unwrap();
        // The monitor ends by itself once every disk reached DRIVER_OK, before any I/O.
        out.wait_for("@@vmm probe driver_ok=1 total=1");
        let history = monitor.stop();
        // The partition scan's completions come later; then the guest resets the device.
        disk.notify_queue(0);
        disk.notify_queue(1);
        disk.common_write(DEVICE_STATUS, 1, 0);
        let views = closing_views(&all, &history);
        assert_eq!(views[0].mode, InterruptMode::Intx);
        assert_eq!(views[0].status_at_exit, Some(0));
        assert_eq!(views[0].intx.map(|intx| intx.asserts), Some(2));
    }

    #[test]
    fn a_stall_report_names_each_vcpus_state_and_never_waits_for_a_held_transport() {
        let disk = Guest::new(1, 2, 3);
        let vcpus = Arc::new(VcpuActivity::new(2));
        use crate::vcpu::VcpuState;
        vcpus.set(0, VcpuState::InKvmRun, 0);
        vcpus.set(1, VcpuState::MmioWrite, 0x40_0000_1000);
        let out = Output::default();
        let timing = MonitorTiming {
            stall_after: Duration::from_millis(50),
            ..FAST
        };
        // A vCPU stuck inside the transport holds its lock for good.
        let held = disk.function.transport.lock().unwrap();
        let monitor =
            spawn_monitor(functions(&[&disk]), vcpus, Box::new(out.clone()), timing).unwrap();
        let vcpu_line = |index: usize, state: &str, address: &str| {
            format!("@@vmm stall_vcpu index={index} state={state} address={address}")
        };
        let lines = || -> Vec<String> {
            out.lines()
                .iter()
                .map(|l| l.split(" for_ms=").next().unwrap().to_string())
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lines().iter().any(|l| l.starts_with("@@vmm stall_busy")) {
            assert!(
                Instant::now() < deadline,
                "no stall report: {:?}",
                out.lines()
            );
            thread::sleep(Duration::from_millis(5));
        }
        let lines = lines();
        assert!(
            lines.contains(&vcpu_line(0, "in_kvm_run", "0x0")),
            "{lines:?}"
        );
        assert!(
            lines.contains(&vcpu_line(1, "mmio_write", "0x4000001000")),
            "{lines:?}"
        );
        assert!(lines.contains(&"@@vmm stall_busy pci=0000:00:01.0 lock=held".to_string()));
        drop(held);
        monitor.stop();
    }

    #[test]
    fn no_disks_no_lines() {
        let out = Output::default();
        let monitor = spawn_monitor(Vec::new(), idle_vcpus(), Box::new(out.clone()), FAST).unwrap();
        assert!(monitor.stop().driver_ok_views.is_empty());
        assert!(out.lines().is_empty());
    }
}
