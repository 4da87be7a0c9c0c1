//! The VM's resource budget: what its configuration will take from KVM and the host, computed
//! before any KVM object exists, printed as one block, and enforced. When a limit cannot be
//! met blkswarm refuses to start, naming the limit and what to change; it never half-starts
//! (DESIGN.md 3).
//!
//! Vector counts are worst cases: GSI routes and irqfds are taken lazily, only for the vectors
//! the guest enables. Past KVM's route limit, vectors are delivered with KVM_SIGNAL_MSI: slower
//! but correct, so that is reported, not refused.

use std::fmt;
use std::io;

use devices::nvme::pci::NvmeBarLayout;
use devices::pci::root::PCI_DEVICES_PER_BUS;
use devices::virtio::pci::Bar0Layout;
use irq::intx;
use irq::routing::{KVM_MAX_ROUTES, LEGACY_ROUTES};

use crate::config::{DiskBackendConfig, VmConfig};
use crate::layout::{PCI_BUS_WINDOW_BYTES, PCI_ROOT_BUSES_MAX};

/// Root buses the 64-bit BAR window has slices for.
const ROOT_BUSES_MAX: usize = PCI_ROOT_BUSES_MAX as usize;
/// Devices on root bus 0: device 0 is the host bridge.
pub const DEVICES_ON_FIRST_BUS: usize = PCI_DEVICES_PER_BUS as usize - 1;
/// Devices on every later root bus: it has no host bridge function of its own.
pub const DEVICES_ON_LATER_BUS: usize = PCI_DEVICES_PER_BUS as usize;
/// MSI routes KVM can hold besides the legacy pin routes every table keeps.
pub const MSI_ROUTE_LIMIT: usize = KVM_MAX_ROUTES - LEGACY_ROUTES;
/// Legacy lines with an irqfd: COM1.
const LEGACY_IRQFDS: u64 = 1;
/// Each I/O worker owns an io_uring and a doorbell eventfd.
const FILES_PER_IO_WORKER: u64 = 2;
/// /dev/kvm and the VM; vCPUs come on top.
const KVM_FILES: u64 = 2;
/// stdin, stdout, stderr.
const STDIO_FILES: u64 = 3;
/// Files outside the budget: kernel and initramfs while loading, /proc and /sys reads, the
/// control socket and report files. Generous, since running short mid-boot would half-start.
const OPEN_FILES_MARGIN: u64 = 64;
/// Assumed when getrlimit fails (it should not): Linux's default soft limit.
const FALLBACK_OPEN_FILES_LIMIT: u64 = 1024;

/// What the host allows this process, read once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// RLIMIT_NOFILE soft limit: what open() enforces.
    pub open_files_soft: u64,
    /// RLIMIT_NOFILE hard limit: how far an unprivileged process may raise the soft one.
    pub open_files_hard: u64,
    /// I/O workers when `--io-threads` is not given.
    pub host_cpus: usize,
}

impl HostLimits {
    pub fn probe() -> Self {
        let (open_files_soft, open_files_hard) =
            open_files_limits().unwrap_or((FALLBACK_OPEN_FILES_LIMIT, FALLBACK_OPEN_FILES_LIMIT));
        Self {
            open_files_soft,
            open_files_hard,
            host_cpus: crate::disks::default_io_threads(),
        }
    }
}

fn open_files_limits() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

fn set_open_files_limits(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The PCI topology's limits, a parameter so tests can reach them with few disks.
#[derive(Debug, Clone, Copy)]
struct PciLimits {
    root_buses_max: usize,
    bus_window_bytes: u64,
}

const PCI_LIMITS: PciLimits = PciLimits {
    root_buses_max: ROOT_BUSES_MAX,
    bus_window_bytes: PCI_BUS_WINDOW_BYTES,
};

/// What became of raising the soft RLIMIT_NOFILE to the budget's need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFilesRaise {
    Raised { from: u64 },
    Refused { to: u64, error: String },
}

/// Where the open files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// Queue notifiers (the ioeventfds).
    pub notifiers: u64,
    /// One eventfd per MSI-X vector, made with the function whether or not it gets a route,
    /// an irqfd and a resamplefd per INTx line (and the resampler's epoll and stop eventfd
    /// when there is one), plus the legacy lines'.
    pub interrupt_eventfds: u64,
    pub image_files: u64,
    pub io_worker_files: u64,
    /// /dev/kvm, the VM and one per possible vCPU.
    pub kvm_files: u64,
    pub stdio_and_margin: u64,
}

impl OpenFiles {
    pub fn total(&self) -> u64 {
        self.notifiers
            + self.interrupt_eventfds
            + self.image_files
            + self.io_worker_files
            + self.kvm_files
            + self.stdio_and_margin
    }
}

/// The fullest root bus: its BARs against its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusMmio {
    pub bus: usize,
    /// From the window's start to the end of the last BAR, alignment gaps included.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// virtio-blk disks.
    pub disks: usize,
    pub nvme_controllers: usize,
    pub vcpus: u32,
    pub io_workers: usize,
    /// One per queue.
    pub ioeventfds: u64,
    pub msix_vectors: u64,
    /// Vectors that get a GSI route (and an irqfd) when the guest enables them all.
    pub routed_vectors: u64,
    /// Vectors past the route limit, delivered with KVM_SIGNAL_MSI.
    pub signal_msi_vectors: u64,
    /// Disks with an INTx line (`intx=on`): one resample irqfd each, on GSIs 16-23.
    pub intx_lines: u64,
    /// Routed vectors, INTx lines and the legacy lines.
    pub irqfds: u64,
    /// Routing-table entries: the legacy pin routes plus the routed vectors.
    pub gsi_routes: u64,
    pub gsi_route_limit: u64,
    pub open_files: OpenFiles,
    pub open_files_limit: u64,
    pub open_files_hard_limit: u64,
    pub open_files_raise: Option<OpenFilesRaise>,
    /// Sum of the BAR sizes.
    pub mmio_bytes: u64,
    pub fullest_bus: BusMmio,
    pub bus_window_bytes: u64,
    pub pci_buses: usize,
    pub pci_buses_max: usize,
    pub guest_memory_bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BudgetError {
    #[error(
        "{disks} disks and NVMe controllers need {needed} PCI root buses, but blkswarm has at \
         most {max} ({max_devices} devices: {DEVICES_ON_FIRST_BUS} on bus 0, \
         {DEVICES_ON_LATER_BUS} on each other); use at most {max_devices} disks and controllers"
    )]
    TooManyPciBuses {
        disks: usize,
        needed: usize,
        max: usize,
        max_devices: usize,
    },
    #[error(
        "the BARs on PCI root bus {bus} need {needed} bytes, but each bus has a {window}-byte \
         window; give its disks fewer queues or msix_vectors"
    )]
    MmioWindow {
        bus: usize,
        needed: u64,
        window: u64,
    },
    #[error(
        "blkswarm needs {needed} open files, but RLIMIT_NOFILE allows {soft} (hard limit \
         {hard}){raise}; run `ulimit -n {needed}` first (raising the hard limit needs \
         privilege), or use fewer disks, queues, msix_vectors or --io-threads"
    )]
    OpenFiles {
        needed: u64,
        soft: u64,
        hard: u64,
        /// Why raising the limit ourselves did not help, if we tried.
        raise: String,
    },
}

/// Root buses for `devices` devices; bus 0 always exists. Like `pci::root_buses_for`, which
/// places them, but exact past 255 so the error names the real need.
pub fn pci_buses_for(devices: usize) -> usize {
    1 + devices
        .saturating_sub(DEVICES_ON_FIRST_BUS)
        .div_ceil(DEVICES_ON_LATER_BUS)
}

/// Most devices `buses` root buses hold.
pub fn pci_devices_on(buses: usize) -> usize {
    DEVICES_ON_FIRST_BUS + buses.saturating_sub(1) * DEVICES_ON_LATER_BUS
}

/// The budget of `config` on a host with `limits`. Pure: nothing is created or changed.
pub fn compute(config: &VmConfig, limits: &HostLimits) -> Budget {
    compute_with(config, limits, PCI_LIMITS)
}

/// What one PCI function (a virtio-blk disk or an NVMe controller) costs.
#[derive(Debug, Clone, Copy)]
struct FunctionNeeds {
    bar_size: u64,
    msix_vectors: u64,
    /// Queue notifier eventfds: ioeventfds of virtio queues, or the NVMe SQs' (at most one
    /// per I/O queue pair the controller offers).
    notifiers: u64,
    image_files: u64,
    intx: bool,
}

/// Every function of `config`, in placement order: `--disk`/`--disks`, then NVMe controllers.
fn function_needs(config: &VmConfig) -> Vec<FunctionNeeds> {
    let disks = config.disks.iter().map(|disk| FunctionNeeds {
        bar_size: Bar0Layout::new(disk.num_queues, disk.msix_vectors).size,
        msix_vectors: u64::from(disk.msix_vectors),
        notifiers: u64::from(disk.num_queues),
        image_files: u64::from(matches!(disk.backend, DiskBackendConfig::File { .. })),
        intx: disk.intx,
    });
    let nvmes = config.nvmes.iter().map(|nvme| FunctionNeeds {
        bar_size: NvmeBarLayout::new(nvme.max_io_queue_pairs, nvme.msix_vectors).size,
        msix_vectors: u64::from(nvme.msix_vectors),
        notifiers: u64::from(nvme.max_io_queue_pairs),
        image_files: u64::from(matches!(nvme.backend, DiskBackendConfig::File { .. })),
        intx: false,
    });
    disks.chain(nvmes).collect()
}

fn compute_with(config: &VmConfig, limits: &HostLimits, pci: PciLimits) -> Budget {
    let functions = function_needs(config);
    let io_workers = config.io_threads.unwrap_or(limits.host_cpus);
    let ioeventfds: u64 = functions.iter().map(|f| f.notifiers).sum();
    let msix_vectors: u64 = functions.iter().map(|f| f.msix_vectors).sum();
    let routed_vectors = msix_vectors.min(MSI_ROUTE_LIMIT as u64);
    let intx_lines = functions.iter().filter(|f| f.intx).count() as u64;
    let intx_files = if intx_lines > 0 {
        intx_lines * intx::EVENTFDS_PER_LINE + intx::RESAMPLER_FILES
    } else {
        0
    };
    let image_files = functions.iter().map(|f| f.image_files).sum();
    let open_files = OpenFiles {
        notifiers: ioeventfds,
        interrupt_eventfds: msix_vectors + intx_files + LEGACY_IRQFDS,
        image_files,
        io_worker_files: io_workers as u64 * FILES_PER_IO_WORKER,
        kvm_files: KVM_FILES + u64::from(config.cpus.max),
        stdio_and_margin: STDIO_FILES + OPEN_FILES_MARGIN,
    };

    // Functions fill bus 0, then each next bus, in command-line order; on each bus BARs are
    // placed one after the other at their natural (power-of-two) alignment.
    let mut mmio_bytes = 0;
    let mut fullest_bus = BusMmio { bus: 0, bytes: 0 };
    let mut bus = BusMmio { bus: 0, bytes: 0 };
    let mut on_bus = 0;
    for function in &functions {
        let bus_capacity = if bus.bus == 0 {
            DEVICES_ON_FIRST_BUS
        } else {
            DEVICES_ON_LATER_BUS
        };
        if on_bus == bus_capacity {
            bus = BusMmio {
                bus: bus.bus + 1,
                bytes: 0,
            };
            on_bus = 0;
        }
        let bar_size = function.bar_size;
        mmio_bytes += bar_size;
        bus.bytes = bus.bytes.next_multiple_of(bar_size) + bar_size;
        on_bus += 1;
        if bus.bytes > fullest_bus.bytes {
            fullest_bus = bus;
        }
    }

    Budget {
        disks: config.disks.len(),
        nvme_controllers: config.nvmes.len(),
        vcpus: config.cpus.max,
        io_workers,
        ioeventfds,
        msix_vectors,
        routed_vectors,
        signal_msi_vectors: msix_vectors - routed_vectors,
        intx_lines,
        irqfds: routed_vectors + intx_lines + LEGACY_IRQFDS,
        gsi_routes: LEGACY_ROUTES as u64 + routed_vectors,
        gsi_route_limit: KVM_MAX_ROUTES as u64,
        open_files,
        open_files_limit: limits.open_files_soft,
        open_files_hard_limit: limits.open_files_hard,
        open_files_raise: None,
        mmio_bytes,
        fullest_bus,
        bus_window_bytes: pci.bus_window_bytes,
        pci_buses: pci_buses_for(functions.len()),
        pci_buses_max: pci.root_buses_max,
        guest_memory_bytes: config.memory_bytes,
    }
}

impl Budget {
    /// BAR space the root buses announce to the guest.
    pub fn mmio_window_bytes(&self) -> u64 {
        self.pci_buses as u64 * self.bus_window_bytes
    }

    /// Raises the soft RLIMIT_NOFILE to what the budget needs, if it is short; the outcome
    /// shows in the block and in `check`. Some sandboxes refuse setrlimit.
    pub fn raise_open_files_limit(&mut self) {
        self.raise_open_files_limit_with(set_open_files_limits);
    }

    fn raise_open_files_limit_with(&mut self, set_limits: impl FnOnce(u64, u64) -> io::Result<()>) {
        let needed = self.open_files.total();
        if needed <= self.open_files_limit {
            return;
        }
        // Past the hard limit only a privileged process (CAP_SYS_RESOURCE) succeeds; trying
        // costs nothing.
        let hard = self.open_files_hard_limit.max(needed);
        match set_limits(needed, hard) {
            Ok(()) => {
                self.open_files_raise = Some(OpenFilesRaise::Raised {
                    from: self.open_files_limit,
                });
                self.open_files_limit = needed;
                self.open_files_hard_limit = hard;
            }
            Err(error) => {
                self.open_files_raise = Some(OpenFilesRaise::Refused {
                    to: needed,
                    error: error.to_string(),
                })
            }
        }
    }

    /// The first limit the VM would exceed, if any.
    pub fn check(&self) -> Result<(), BudgetError> {
        if self.pci_buses > self.pci_buses_max {
            return Err(BudgetError::TooManyPciBuses {
                disks: self.disks + self.nvme_controllers,
                needed: self.pci_buses,
                max: self.pci_buses_max,
                max_devices: pci_devices_on(self.pci_buses_max),
            });
        }
        if self.fullest_bus.bytes > self.bus_window_bytes {
            return Err(BudgetError::MmioWindow {
                bus: self.fullest_bus.bus,
                needed: self.fullest_bus.bytes,
                window: self.bus_window_bytes,
            });
        }
        let needed = self.open_files.total();
        if needed > self.open_files_limit {
            return Err(BudgetError::OpenFiles {
                needed,
                soft: self.open_files_limit,
                hard: self.open_files_hard_limit,
                raise: match &self.open_files_raise {
                    Some(OpenFilesRaise::Refused { to, error }) => {
                        format!(" and raising it to {to} was refused ({error})")
                    }
                    _ => String::new(),
                },
            });
        }
        Ok(())
    }
}

/// `1.5 MiB`, `64 GiB`: binary units, at most one decimal.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text} {}", UNITS[unit])
}

fn limit_text(limit: u64) -> String {
    if limit == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        limit.to_string()
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files = &self.open_files;
        let nvme = if self.nvme_controllers > 0 {
            format!(" and {} NVMe controllers", self.nvme_controllers)
        } else {
            String::new()
        };
        writeln!(
            f,
            "resource budget: {} disks{nvme}, {} vCPUs possible, {} I/O workers",
            self.disks, self.vcpus, self.io_workers
        )?;
        writeln!(
            f,
            "  ioeventfds      {:>6}           one per queue (NVMe: per I/O queue pair offered)",
            self.ioeventfds
        )?;
        writeln!(
            f,
            "  MSI-X vectors   {:>6}           sum of msix_vectors",
            self.msix_vectors
        )?;
        writeln!(
            f,
            "  GSI routes      {:>6} / {:<6}  {LEGACY_ROUTES} legacy + {} MSI, if the guest enables every vector",
            self.gsi_routes, self.gsi_route_limit, self.routed_vectors
        )?;
        writeln!(
            f,
            "  KVM_SIGNAL_MSI  {:>6}           vectors past the route limit (slower, still correct)",
            self.signal_msi_vectors
        )?;
        writeln!(
            f,
            "  irqfds          {:>6}           routed vectors + INTx lines + COM1",
            self.irqfds
        )?;
        if self.intx_lines > 0 {
            writeln!(
                f,
                "  INTx lines      {:>6}           level-triggered, shared on GSIs 16-23: an irqfd + a resamplefd each",
                self.intx_lines
            )?;
        }
        let raise = match &self.open_files_raise {
            None => String::new(),
            Some(OpenFilesRaise::Raised { from }) => format!(", raised from {}", limit_text(*from)),
            Some(OpenFilesRaise::Refused { to, error }) => {
                format!(", raising to {to} refused: {error}")
            }
        };
        writeln!(
            f,
            "  open files      {:>6} / {:<6}  RLIMIT_NOFILE soft (hard {}{raise})",
            files.total(),
            limit_text(self.open_files_limit),
            limit_text(self.open_files_hard_limit)
        )?;
        writeln!(
            f,
            "                  = {} notifiers + {} interrupt eventfds + {} images + {} I/O workers \
             + {} KVM + {} stdio and margin",
            files.notifiers,
            files.interrupt_eventfds,
            files.image_files,
            files.io_worker_files,
            files.kvm_files,
            files.stdio_and_margin
        )?;
        writeln!(
            f,
            "  MMIO for BARs {:>8} / {:<6}  fullest bus {}: {} of its {} window",
            human_bytes(self.mmio_bytes),
            human_bytes(self.mmio_window_bytes()),
            self.fullest_bus.bus,
            human_bytes(self.fullest_bus.bytes),
            human_bytes(self.bus_window_bytes)
        )?;
        writeln!(
            f,
            "  PCI root buses  {:>6} / {:<6}  {DEVICES_ON_FIRST_BUS} devices on bus 0, {DEVICES_ON_LATER_BUS} on each other",
            self.pci_buses, self.pci_buses_max
        )?;
        writeln!(
            f,
            "  guest memory  {:>8}           not budgeted",
            human_bytes(self.guest_memory_bytes)
        )?;
        writeln!(
            f,
            "@@vmm budget ioeventfds={} irqfds={} gsi_routes={} gsi_route_limit={} \
             signal_msi_vectors={} open_files={} open_files_limit={} msix_vectors={} \
             intx_lines={} mmio_bytes={} mmio_window_bytes={} pci_buses={}",
            self.ioeventfds,
            self.irqfds,
            self.gsi_routes,
            self.gsi_route_limit,
            self.signal_msi_vectors,
            files.total(),
            self.open_files_limit,
            self.msix_vectors,
            self.intx_lines,
            self.mmio_bytes,
            self.mmio_window_bytes(),
            self.pci_buses
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_args, Command, DiskConfig};

    /// This sandbox's limit (DESIGN.md 3): 20000 open files, not raisable.
    const SANDBOX: HostLimits = HostLimits {
        open_files_soft: 20_000,
        open_files_hard: 20_000,
        host_cpus: 2,
    };

    fn config(args: &[&str]) -> VmConfig {
        let line = ["--kernel", "/k", "--cpus", "boot=2"].iter().chain(args);
        match parse_args(line.map(|s| s.to_string())).unwrap() {
            Command::Run(config) => config,
            other => panic!("expected a run, got {other:?}"),
        }
    }

    fn null_disks(count: usize, num_queues: u16) -> VmConfig {
        config(&[
            "--disks",
            &format!("count={count},backend=null,size=1G,num_queues={num_queues}"),
        ])
    }

    #[test]
    fn one_disk() {
        let budget = compute(&config(&["--disk", "path=/img"]), &SANDBOX);
        assert_eq!(budget.ioeventfds, 1);
        assert_eq!(budget.msix_vectors, 2);
        assert_eq!(budget.gsi_routes, 42);
        assert_eq!(budget.signal_msi_vectors, 0);
        assert_eq!(budget.irqfds, 3);
        assert_eq!(budget.pci_buses, 1);
        // BAR 0 of one queue and two vectors: notify at 4 KiB, table at 8 KiB, PBA at 12 KiB.
        assert_eq!(budget.mmio_bytes, 16 << 10);
        assert_eq!(budget.open_files.image_files, 1);
        assert_eq!(budget.open_files.total(), 1 + 3 + 1 + 4 + 4 + 67);
        assert_eq!(budget.check(), Ok(()));
    }

    #[test]
    fn nvme_controllers_count_with_the_disks() {
        let budget = compute(
            &config(&[
                "--disk",
                "path=/img",
                "--nvmes",
                "count=100,backend=null,size=1G,max_ioqpairs=4",
                "--nvme",
                "path=/n.img,max_ioqpairs=32",
            ]),
            &SANDBOX,
        );
        assert_eq!((budget.disks, budget.nvme_controllers), (1, 101));
        // A notifier per I/O queue pair offered, a vector per pair plus the admin queue's.
        assert_eq!(budget.ioeventfds, 1 + 100 * 4 + 32);
        assert_eq!(budget.msix_vectors, 2 + 100 * 5 + 33);
        assert_eq!(budget.open_files.image_files, 2);
        // 102 functions: 31 on bus 0, then 32 per bus.
        assert_eq!(budget.pci_buses, 4);
        // NVMe BAR 0: 16 KiB of registers and doorbells, the table, the PBA: 32 KiB each.
        assert_eq!(
            budget.mmio_bytes,
            (16 << 10) + 100 * (32 << 10) + (32 << 10)
        );
        assert!(budget
            .to_string()
            .starts_with("resource budget: 1 disks and 101 NVMe controllers, 2 vCPUs possible"));
        assert_eq!(budget.check(), Ok(()));
    }

    #[test]
    fn no_disks_still_needs_bus_0() {
        let budget = compute(&config(&[]), &SANDBOX);
        assert_eq!(budget.pci_buses, 1);
        assert_eq!(budget.mmio_bytes, 0);
        assert_eq!(budget.check(), Ok(()));
    }

    #[test]
    fn five_hundred_disks_with_two_queues() {
        let budget = compute(&null_disks(500, 2), &SANDBOX);
        assert_eq!(budget.ioeventfds, 1000);
        assert_eq!(budget.msix_vectors, 1500);
        assert_eq!(budget.gsi_routes, 1500 + 40);
        assert_eq!(budget.signal_msi_vectors, 0);
        assert_eq!(budget.irqfds, 1501);
        // 31 on bus 0, then 469 at 32 a bus.
        assert_eq!(budget.pci_buses, 16);
        assert_eq!(budget.open_files.image_files, 0);
        assert_eq!(
            budget.open_files.total(),
            1000 + 1501 + 2 * 2 + (2 + 2) + 3 + 64
        );
        assert_eq!(budget.check(), Ok(()));
    }

    #[test]
    fn thousand_disks_with_four_queues_spill_to_signal_msi() {
        let budget = compute(&null_disks(1000, 4), &SANDBOX);
        assert_eq!(budget.msix_vectors, 5000);
        assert_eq!(budget.gsi_routes, 4096);
        assert_eq!(budget.routed_vectors, 4096 - 40);
        assert_eq!(budget.signal_msi_vectors, 5000 - (4096 - 40));
        assert_eq!(budget.irqfds, 4096 - 40 + 1);
        assert_eq!(budget.pci_buses, 32);
        // Spilling past the route limit is slower, not wrong.
        assert_eq!(budget.check(), Ok(()));
        assert!(budget.to_string().contains("signal_msi_vectors=944 "));
    }

    #[test]
    fn image_files_count_against_the_fd_limit() {
        let budget = compute(
            &config(&["--disks", "count=300,dir=/images", "--disk", "path=/one"]),
            &SANDBOX,
        );
        assert_eq!(budget.open_files.image_files, 301);
        let explicit = config(&["--disks", "count=3,dir=/d", "--io-threads", "7"]);
        let budget = compute(&explicit, &SANDBOX);
        assert_eq!(budget.io_workers, 7);
        assert_eq!(budget.open_files.io_worker_files, 14);
    }

    #[test]
    fn fd_limit_too_low_names_ulimit() {
        let low = HostLimits {
            open_files_soft: 1024,
            open_files_hard: 1024,
            ..SANDBOX
        };
        let mut budget = compute(&null_disks(500, 2), &low);
        budget.raise_open_files_limit_with(|_, _| Err(io::Error::from_raw_os_error(libc::EPERM)));
        let error = budget.check().unwrap_err();
        assert!(matches!(
            error,
            BudgetError::OpenFiles {
                needed: 2576,
                soft: 1024,
                hard: 1024,
                ..
            }
        ));
        let message = error.to_string();
        assert!(message.contains("`ulimit -n 2576`"), "{message}");
        assert!(message.contains("refused"), "{message}");
        assert!(budget.to_string().contains("raising to 2576 refused"));
    }

    #[test]
    fn raising_the_soft_limit_lets_the_vm_start() {
        let low = HostLimits {
            open_files_soft: 1024,
            open_files_hard: 1 << 20,
            ..SANDBOX
        };
        let mut budget = compute(&null_disks(500, 2), &low);
        let mut asked = None;
        budget.raise_open_files_limit_with(|soft, hard| {
            asked = Some((soft, hard));
            Ok(())
        });
        assert_eq!(asked, Some((2576, 1 << 20)));
        assert_eq!(
            budget.open_files_raise,
            Some(OpenFilesRaise::Raised { from: 1024 })
        );
        assert_eq!(budget.check(), Ok(()));
        assert!(budget.to_string().contains("raised from 1024"));
    }

    #[test]
    fn enough_files_means_no_raise() {
        let mut budget = compute(&null_disks(500, 2), &SANDBOX);
        budget.raise_open_files_limit_with(|_, _| panic!("no setrlimit needed"));
        assert_eq!(budget.open_files_raise, None);
    }

    #[test]
    fn too_many_disks_for_the_buses() {
        let most = pci_devices_on(ROOT_BUSES_MAX);
        assert_eq!(most, 31 + 63 * 32);
        let fits = compute(&null_disks(most, 1), &SANDBOX);
        assert_eq!(fits.pci_buses, ROOT_BUSES_MAX);
        assert_eq!(fits.check(), Ok(()));
        let error = compute(&null_disks(most + 1, 1), &SANDBOX)
            .check()
            .unwrap_err();
        assert_eq!(
            error,
            BudgetError::TooManyPciBuses {
                disks: most + 1,
                needed: ROOT_BUSES_MAX + 1,
                max: ROOT_BUSES_MAX,
                max_devices: most,
            }
        );
        assert!(error.to_string().contains("use at most 2047 disks"));
    }

    #[test]
    fn bus_counts() {
        assert_eq!(pci_buses_for(0), 1);
        assert_eq!(pci_buses_for(31), 1);
        assert_eq!(pci_buses_for(32), 2);
        assert_eq!(pci_buses_for(63), 2);
        assert_eq!(pci_buses_for(64), 3);
        // The budget must count the buses the PCI segment will fill.
        for devices in 0..=pci_devices_on(ROOT_BUSES_MAX) + 100 {
            assert_eq!(
                pci_buses_for(devices),
                usize::from(crate::pci::root_buses_for(devices)),
                "{devices}"
            );
        }
    }

    #[test]
    fn bars_past_a_bus_window_are_refused() {
        // 64 KiB BARs: 32 of them fill a 2 MiB window; a 1 MiB window holds 16.
        let big = config(&[
            "--disks",
            "count=40,backend=null,size=1G,num_queues=256,msix_vectors=2048",
        ]);
        let small_window = PciLimits {
            root_buses_max: ROOT_BUSES_MAX,
            bus_window_bytes: 1 << 20,
        };
        let budget = compute_with(&big, &SANDBOX, small_window);
        assert_eq!(budget.mmio_bytes, 40 * (64 << 10));
        assert_eq!(
            budget.check(),
            Err(BudgetError::MmioWindow {
                bus: 0,
                needed: 31 * (64 << 10),
                window: 1 << 20
            })
        );
        // The real window holds them; 2048 vectors a disk do blow the fd limit, though.
        let plenty_of_files = HostLimits {
            open_files_soft: libc::RLIM_INFINITY,
            ..SANDBOX
        };
        assert_eq!(compute(&big, &plenty_of_files).check(), Ok(()));
    }

    #[test]
    fn bars_are_aligned_on_their_bus() {
        // A 16 KiB BAR after a 64 KiB one, then another 64 KiB one: it starts at 128 KiB.
        let mut mixed = null_disks(3, 1);
        mixed.disks[0].num_queues = 256;
        mixed.disks[0].msix_vectors = 2048;
        mixed.disks[2] = mixed.disks[0].clone();
        let budget = compute(&mixed, &SANDBOX);
        assert_eq!(budget.mmio_bytes, (64 + 16 + 64) << 10);
        assert_eq!(
            budget.fullest_bus,
            BusMmio {
                bus: 0,
                bytes: 192 << 10
            }
        );
    }

    #[test]
    fn machine_readable_line() {
        let text = compute(&null_disks(500, 2), &SANDBOX).to_string();
        let line = text.lines().last().unwrap();
        assert_eq!(
            line,
            "@@vmm budget ioeventfds=1000 irqfds=1501 gsi_routes=1540 gsi_route_limit=4096 \
             signal_msi_vectors=0 open_files=2576 open_files_limit=20000 msix_vectors=1500 \
             intx_lines=0 mmio_bytes=8192000 mmio_window_bytes=17179869184 pci_buses=16"
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("@@vmm")).count(), 1);
        assert!(!text.lines().any(|l| l.starts_with("  INTx lines")));
    }

    #[test]
    fn intx_lines_cost_two_eventfds_each_and_one_resampler() {
        let plain = compute(&null_disks(10, 2), &SANDBOX);
        let mut with_intx = null_disks(10, 2);
        for disk in &mut with_intx.disks[..4] {
            disk.intx = true;
        }
        with_intx.disks[0].msix_vectors = 0;
        let budget = compute(&with_intx, &SANDBOX);
        assert_eq!(budget.intx_lines, 4);
        assert_eq!(budget.msix_vectors, plain.msix_vectors - 3);
        assert_eq!(budget.irqfds, plain.irqfds - 3 + 4);
        assert_eq!(
            budget.open_files.interrupt_eventfds,
            plain.open_files.interrupt_eventfds - 3 + 4 * 2 + 2
        );
        let text = budget.to_string();
        assert!(text.contains("  INTx lines           4 "), "{text}");
        assert!(text.contains(" intx_lines=4 "), "{text}");
    }

    #[test]
    fn sizes_for_humans() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(16 << 10), "16 KiB");
        assert_eq!(human_bytes(8_192_000), "7.8 MiB");
        assert_eq!(human_bytes(64 << 30), "64 GiB");
    }

    /// The blocks quoted in issue 4: `cargo test -p blkswarm example_budget_blocks -- --nocapture`.
    #[test]
    fn example_budget_blocks() {
        for (count, queues) in [(500, 2), (1000, 4)] {
            let budget = compute(&null_disks(count, queues), &SANDBOX);
            eprintln!(
                "--disks count={count},backend=null,size=1G,num_queues={queues} --cpus boot=2"
            );
            eprint!("{budget}");
            assert_eq!(budget.to_string().lines().count(), 12);
        }
    }

    #[test]
    fn configuration_types_stay_small() {
        // 1000 disks expand into a Vec<DiskConfig>; keep the element small (a group's fault
        // keys are one shared pointer, not a copy per disk).
        assert!(std::mem::size_of::<DiskConfig>() <= 64);
    }
}
