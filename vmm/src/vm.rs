//! VM lifecycle: KVM objects, guest memory, devices, vCPU threads, and the reason the VM ended.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use devices::legacy::{power, serial, AcpiPowerDevice, PowerEvent, SerialConsole};
use devices::nvme::GuestReset;
use devices::Bus;
use irq::{GsiRouter, IrqLine, RecentInterrupts};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::acpi::{self, AcpiConfig, PciHostBridge};
use crate::boot::{self, BootError};
use crate::budget::{self, BudgetError, HostLimits};
use crate::config::VmConfig;
use crate::cpuid::{self, VcpuIdentity};
use crate::disks::{self, DiskError};
use crate::layout;
use crate::path_events::{Origin, PathEvents};
use crate::pci::{self, PciError, PciSegment};
use crate::report;
use crate::vcpu::{self, VcpuActivity, VcpuContext, VcpuError};
use crate::{api, plots, stats};

/// KVM_GET_SUPPORTED_CPUID needs a buffer at least as large as its answer.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest entered ACPI S5 (`poweroff`).
    PowerOff,
    /// The guest asked for a reset (`reboot`, or `panic=-1` after a panic).
    Reset,
    /// The guest cannot go on.
    Fault { vcpu: u32, cause: String },
    /// `--dry-run`: the VM was built and never ran.
    DryRun,
    /// SIGTERM or SIGINT (e.g. a harness's timeout): the reports were printed, then exit.
    Signal(i32),
}

impl VmExit {
    /// The process exit status for this outcome (documented in `--help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::PowerOff | VmExit::DryRun => 0,
            VmExit::Reset => 2,
            VmExit::Fault { .. } => 3,
            // The shell's convention for "ended by signal N".
            VmExit::Signal(signal) => 128 + signal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0:?}, which blkswarm needs")]
    MissingCapability(Cap),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {bytes} bytes of guest memory: {source}")]
    Memory {
        bytes: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("boot: {0}")]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device setup: {0}")]
    Device(String),
    #[error("resource budget: {0}")]
    Budget(#[from] BudgetError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Capabilities every blkswarm VM relies on.
const REQUIRED_CAPS: [Cap; 5] = [
    Cap::Irqchip,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::UserMemory,
    Cap::ExtCpuid,
];

fn create_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
        bytes: size,
        source,
    })?;
    for (slot, region) in memory.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live anonymous mapping owned by `memory`, which outlives the
        // VM (both are dropped only when the process exits), and slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

/// Peak resident set size of this process (getrusage), for the creation report.
fn peak_rss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointed-to buffer, which is large enough
    // and zero-initialised; we read it only when the call succeeded.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
    if ok {
        // SAFETY: initialised by the successful getrusage above.
        unsafe { usage.assume_init() }.ru_maxrss
    } else {
        -1
    }
}

/// SIGTERM and SIGINT, blocked in every thread so that one thread can wait for them and end
/// the run with its reports instead of dying silently (a harness timeout then still shows
/// where each vCPU and queue was).
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the local set they are given.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks the stop signals in the calling thread; threads it spawns afterwards inherit it.
fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: pthread_sigmask reads the set and changes only this thread's signal mask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// A thread that turns the first stop signal into a VM exit.
fn spawn_signal_waiter(exits: mpsc::Sender<VmExit>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = stop_signals();
            let mut signal = 0;
            // SAFETY: sigwait reads the set and writes the signal number into `signal`; the
            // signals are blocked in every thread, so none is delivered any other way.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                let _ = exits.send(VmExit::Signal(signal));
            }
        })
        .map(|_| ())
}

/// A vCPU inside KVM_RUN this long is kicked out and enters again (see
/// [`VcpuActivity::kick_idle`]).
const IDLE_KICK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The thread that kicks vCPUs idle in KVM_RUN; returns the kick counter.
fn spawn_vcpu_watchdog(
    activity: Arc<VcpuActivity>,
) -> std::io::Result<Arc<std::sync::atomic::AtomicU64>> {
    let kicks = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = kicks.clone();
    std::thread::Builder::new()
        .name("vcpu-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(IDLE_KICK_AFTER / 2);
            let kicked = activity.kick_idle(IDLE_KICK_AFTER);
            counter.fetch_add(kicked as u64, std::sync::atomic::Ordering::Relaxed);
        })?;
    Ok(kicks)
}

/// Boots the guest described by `config` and returns once it stops.
pub fn run(config: &VmConfig, launched: Instant) -> Result<VmExit, VmError> {
    block_stop_signals();
    // Before any KVM object: a VM that cannot fit refuses to start rather than half-start.
    let mut budget = budget::compute(config, &HostLimits::probe());
    budget.raise_open_files_limit();
    eprint!("{budget}");
    budget.check()?;

    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    if let Some(cap) = REQUIRED_CAPS.into_iter().find(|c| !kvm.check_extension(*c)) {
        return Err(VmError::MissingCapability(cap));
    }
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The PIT calibrates timers early in boot; its speaker port is not emulated.
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let memory = create_memory(&vm, config.memory_bytes)?;
    let tables = acpi::write_acpi_tables(
        &memory,
        &AcpiConfig {
            boot_cpus: config.cpus.boot,
            max_cpus: config.cpus.max,
            pci: PciHostBridge {
                ecam_base: layout::PCI_ECAM_START,
                last_bus: (layout::PCI_ECAM_BUSES - 1) as u8,
                root_buses: pci::root_buses_for(config.disks.len() + config.nvmes.len()),
                mmio32: (
                    layout::PCI_MMIO32_START as u32,
                    layout::PCI_MMIO32_SIZE as u32,
                ),
                mmio64_start: layout::PCI_MMIO64_START,
                bus_window: layout::PCI_BUS_WINDOW_BYTES,
                intx: config.disks.iter().any(|disk| disk.intx),
            },
        },
    )?;
    let entry = boot::load_linux(
        &memory,
        config.memory_bytes,
        &config.kernel,
        config.initramfs.as_deref(),
        &config.cmdline,
        tables.rsdp_addr,
    )?;

    let (exit_tx, exit_rx) = mpsc::channel();
    let mut pio = Bus::new();
    let com1_irq = IrqLine::new(serial::COM1_GSI).map_err(|e| VmError::Device(e.to_string()))?;
    com1_irq
        .attach(&vm)
        .map_err(|e| VmError::Device(format!("COM1 irqfd: {e}")))?;
    let console = Arc::new(Mutex::new(SerialConsole::new(com1_irq, std::io::stdout())));
    pio.insert(serial::COM1_PORT, serial::UART_PORT_COUNT, console.clone())
        .map_err(|e| VmError::Device(e.to_string()))?;
    let power_tx = exit_tx.clone();
    let power_device = AcpiPowerDevice::new(Box::new(move |event| {
        let _ = power_tx.send(match event {
            PowerEvent::PowerOff => VmExit::PowerOff,
            PowerEvent::Reset => VmExit::Reset,
        });
    }));
    pio.insert(
        power::SLEEP_PORT,
        power::POWER_PORT_COUNT,
        Arc::new(Mutex::new(power_device)),
    )
    .map_err(|e| VmError::Device(e.to_string()))?;
    let mut mmio = Bus::new();
    // Keyed by APIC id, which is the vCPU index (cpuid::adjust_for_vcpu).
    let recent_interrupts = Arc::new(RecentInterrupts::new(config.cpus.max as usize, launched));
    let router = GsiRouter::with_recent_interrupts(
        vm.clone(),
        irq::routing::KVM_MAX_ROUTES,
        recent_interrupts.clone(),
    );
    let mut pci = PciSegment::new(vm.clone(), router, memory.clone(), &mut pio, &mut mmio)?;
    let io_threads = config.io_threads.unwrap_or_else(disks::default_io_threads);
    devices::latency::set_timing(config.timing);
    // Kept alive until the process exits: the pool's workers serve every queue.
    let mut disks = disks::create_disks(&config.disks, &config.nvmes, io_threads, &mut pci)?;
    let measured = Arc::new(std::mem::take(&mut disks.measured));
    if let (Some(first), Some(last)) = (disks.nvme_functions.first(), disks.nvme_functions.last()) {
        eprintln!(
            "@@vmm nvmes count={} io_threads={} first_pci={} last_pci={}",
            disks.nvme_functions.len(),
            disks.pool.worker_count(),
            first.address,
            last.address
        );
    }
    if let (Some(first), Some(last)) = (disks.functions.first(), disks.functions.last()) {
        eprintln!(
            "@@vmm disks count={} io_threads={} first_pci={} last_pci={}",
            disks.functions.len(),
            disks.pool.worker_count(),
            first.address,
            last.address
        );
    }
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);

    let supported = kvm
        .get_supported_cpuid(MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.cpus.boot as usize);
    for index in 0..config.cpus.boot {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut entries = supported.as_slice().to_vec();
        cpuid::adjust_for_vcpu(
            &mut entries,
            VcpuIdentity {
                apic_id: index,
                max_cpus: config.cpus.max,
            },
        );
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| VmError::Device(format!("CPUID table: {e:?}")))?;
        vcpu::configure(&fd, index, &cpuid, (index == 0).then_some(entry))?;
        vcpus.push(fd);
    }
    if config.dry_run {
        eprintln!(
            "@@vmm dry_run created_us={} rss_kib={}",
            launched.elapsed().as_micros(),
            peak_rss_kib()
        );
        return Ok(VmExit::DryRun);
    }
    let activity = Arc::new(VcpuActivity::new(vcpus.len()));
    vcpu::install_kick_handler().map_err(VmError::Thread)?;
    let kicks = spawn_vcpu_watchdog(activity.clone()).map_err(VmError::Thread)?;
    let probe_monitor = report::spawn_probe_monitor(disks.functions.clone(), activity.clone())
        .map_err(VmError::Thread)?;
    let path_events = Arc::new(PathEvents::new(&measured));
    observe_guest_resets(&measured, &path_events);
    let sampler = stats::InFlightSampler::spawn(
        measured
            .iter()
            .flat_map(|disk| disk.queues.iter().map(|queue| queue.latency.clone()))
            .collect(),
        path_events.clone(),
    )
    .map_err(VmError::Thread)?;
    let _api_server = match &config.api_socket {
        Some(path) => Some(
            api::spawn(
                path,
                api::ApiState {
                    disks: measured.clone(),
                    timing: config.timing,
                    path_events: path_events.clone(),
                },
            )
            .map_err(|e| VmError::Device(format!("--api-socket {}: {e}", path.display())))?,
        ),
        None => None,
    };
    for (index, fd) in (0u32..).zip(vcpus) {
        let ctx = VcpuContext {
            index,
            activity: activity.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            exits: exit_tx.clone(),
            launched: (index == 0).then_some(launched),
            memory: memory.clone(),
            recent_interrupts: recent_interrupts.clone(),
        };
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu::run(fd, ctx))
            .map_err(VmError::Thread)?;
    }
    spawn_signal_waiter(exit_tx.clone()).map_err(VmError::Thread)?;
    drop(exit_tx);

    let exit = exit_rx.recv().unwrap_or(VmExit::Fault {
        vcpu: 0,
        cause: "every vCPU thread ended without a reason".into(),
    });
    if let Ok(mut console) = console.lock() {
        let _ = console.flush();
    }
    let _ = std::io::stdout().flush();
    let probe_history = probe_monitor.stop();
    if let VmExit::Signal(signal) = exit {
        eprintln!("@@vmm signal={signal}: where everything was");
        report::print_hang_report(&disks.functions, &activity);
    }
    report::print_closing_report(&disks.functions, &probe_history);
    report::print_nvme_report(&disks.nvme_functions);
    sampler.stop();
    write_measurement_report(&measured, config, &path_events);
    eprintln!(
        "@@vmm vcpu_kicks={} (vCPUs idle in KVM_RUN for {} ms, entered again)",
        kicks.load(std::sync::atomic::Ordering::Relaxed),
        IDLE_KICK_AFTER.as_millis()
    );
    // A notifier poll that failed leaves its queue deaf: the first thing to check when a
    // guest's I/O hangs.
    for (worker, stats) in disks.pool.stats().iter().enumerate() {
        eprintln!(
            "@@vmm io_worker index={worker} queues={} poll_errors={} enter_errors={} stale_completions={}",
            stats.queues, stats.poll_errors, stats.enter_errors, stats.stale_completions
        );
    }
    if let Some(resampler) = disks.intx_resampler {
        resampler.stop();
    }
    Ok(exit)
}

/// Every reset a guest makes of an NVMe controller becomes a path event.
fn observe_guest_resets(measured: &[stats::MeasuredDisk], path_events: &Arc<PathEvents>) {
    for disk in measured {
        let Some(function) = &disk.nvme else {
            continue;
        };
        let (events, pci) = (path_events.clone(), disk.address.to_string());
        let observer = move |reset: GuestReset| {
            let what = match reset {
                GuestReset::Controller => "reset",
                GuestReset::Subsystem => "subsystem reset",
            };
            events.record(&pci, Origin::Guest, what.to_string());
        };
        function
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .controller_mut()
            .observe_guest_resets(Box::new(observer));
    }
}

/// The measurement report at exit: a short summary on stderr, and with `--report DIR` the
/// JSON and its plots (their paths on `@@vmm report_*` lines).
fn write_measurement_report(
    measured: &[stats::MeasuredDisk],
    config: &VmConfig,
    path_events: &PathEvents,
) {
    let report = stats::collect(measured, config.timing, path_events);
    for line in stats::summary_lines(&report) {
        eprintln!("{line}");
    }
    let Some(dir) = &config.report_dir else {
        return;
    };
    match stats::write_json(&report, dir) {
        Ok(path) => eprintln!("@@vmm report_json={}", path.display()),
        Err(e) => eprintln!("blkswarm: --report {}: {e}", dir.display()),
    }
    match plots::render(&report, dir) {
        Ok(files) => {
            for file in files {
                eprintln!("@@vmm report_svg={}", file.display());
            }
        }
        Err(e) => eprintln!("blkswarm: --report {}: plots: {e}", dir.display()),
    }
}
