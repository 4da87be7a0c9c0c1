//! Command line of the `blkswarm` binary, in Cloud Hypervisor's idiom: `--cpus boot=2,max=8`,
//! `--memory size=1G`, one option per concern, each taking a `key=value` list.

use std::path::PathBuf;
use std::sync::Arc;

use devices::io::FaultSettings;
use devices::nvme::ana::ANA_TRANSITION_TIME_SECS;

/// Upper bound on vCPUs: the MADT uses xAPIC entries (8-bit APIC ids, 0xff is broadcast).
pub const MAX_VCPUS: u32 = 254;
/// Default guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Guests smaller than this cannot hold the kernel, its decompression buffer and an initramfs.
pub const MIN_MEMORY_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuConfig {
    /// vCPUs online at boot.
    pub boot: u32,
    /// vCPUs the guest may ever see (present + hot-pluggable): its `possible` mask.
    pub max: u32,
}

/// Where a disk's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackendConfig {
    /// A raw image file; `direct` opens it with O_DIRECT (no host page cache).
    File { path: PathBuf, direct: bool },
    /// No storage: reads return zeroes, writes are dropped, every request completes after
    /// `latency_us` (0: at once).
    Null { size_bytes: u64, latency_us: u64 },
}

/// Defaults of a virtio-blk disk: one queue of 256 entries, like QEMU's.
pub const DEFAULT_NUM_QUEUES: u16 = 1;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most queues per disk: the transport gives each its own MSI-X vector plus one for config,
/// and MSI-X tables hold at most 2048 entries.
pub const MAX_NUM_QUEUES: u16 = 256;
/// Virtqueue sizes are powers of two up to 32768 (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest MSI-X table a function may have (PCI: Table Size is an 11-bit field).
pub const MAX_MSIX_VECTORS: u16 = irq::msix::MSIX_MAX_VECTORS as u16;
/// Most disks on one command line. Only guards the memory spent expanding `--disks` groups
/// before the resource budget runs; the PCI topology's real limit is lower and the budget
/// names it.
pub const MAX_DISKS: usize = 1 << 16;
/// Longest artificial latency of a null disk: a minute, past any guest I/O timeout worth
/// testing.
pub const MAX_LATENCY_US: u64 = 60_000_000;
/// Placeholder `--disks path=` patterns must contain, replaced by the disk's index in its group.
pub const DISK_INDEX_PLACEHOLDER: &str = "%d";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub backend: DiskBackendConfig,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// MSI-X table size of the disk's PCI function; fewer than `num_queues + 1` makes the
    /// guest share vectors or fail (S1).
    pub msix_vectors: u16,
    /// Whether the function has a legacy INTx line (S1's fallback path).
    pub intx: bool,
    /// Injected faults at start, as `(setting, value)` of [`devices::io::FaultSettings::set`]
    /// (the `fault_*` keys without their prefix); shared by a group's disks, None without.
    pub faults: Option<Arc<[(String, String)]>>,
}

impl DiskConfig {
    /// What Linux asks for first: one vector per queue plus one for configuration changes.
    pub fn default_msix_vectors(num_queues: u16) -> u16 {
        num_queues + 1
    }
}

/// Defaults of an NVMe controller: eight I/O queue pairs of 1024 entries (what Linux asks
/// for at most by default), 512 KiB transfers (MDTS 7 with 4 KiB pages), as QEMU's.
pub const DEFAULT_NVME_IO_QUEUE_PAIRS: u16 = 8;
pub const DEFAULT_NVME_QUEUE_SIZE: u16 = 1024;
pub const DEFAULT_NVME_MDTS: u8 = 7;
/// I/O queue pairs per controller: queue ids are 16 bits, but every pair needs doorbells in
/// BAR 0 and a notifier on the host; 1024 is past any guest's CPU count worth testing.
pub const MAX_NVME_IO_QUEUE_PAIRS: u16 = 1024;
/// Namespaces per controller.
pub const MAX_NVME_NAMESPACES: u32 = 256;
/// Controllers of one subsystem (`controllers=N`): paths of a multipath disk.
pub const MAX_NVME_CONTROLLERS_PER_SUBSYSTEM: u16 = 16;
/// MDTS is a power of two of the 4 KiB page; 2^15 pages (128 MiB) is beyond any backend's use.
pub const MAX_NVME_MDTS: u8 = 15;
/// NVMe queues hold at most 65536 entries (CAP.MQES is 16 bits, 0's based).
pub const MAX_NVME_QUEUE_SIZE: u32 = 65536;

/// One NVMe controller (PCI function) of `--nvme` or `--nvmes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeConfig {
    /// What backs each namespace: a file backs one namespace; null backs each of them.
    pub backend: DiskBackendConfig,
    pub read_only: bool,
    pub namespaces: u32,
    pub max_io_queue_pairs: u16,
    /// Entries per queue the controller allows (CAP.MQES + 1).
    pub queue_size: u32,
    pub msix_vectors: u16,
    pub mdts: u8,
    /// Serial number in Identify Controller; None: derived from the controller's index.
    pub serial: Option<String>,
    /// Injected faults at start, as for [`DiskConfig::faults`]; shared by every namespace.
    pub faults: Option<Arc<[(String, String)]>>,
    /// `controllers=N`: the option asked for N controllers of one subsystem.
    pub controllers: u16,
    /// `anatt=S`: ANATT of a multi-controller subsystem, in seconds.
    pub ana_transition_time_secs: u8,
    /// `ana_groups=G`: ANA groups the namespaces are dealt into, round-robin; None: one
    /// per namespace.
    pub ana_groups: Option<u32>,
    /// This controller's place in a multi-controller subsystem (set when the option is
    /// expanded into its controllers); None for a controller alone in its subsystem.
    pub subsystem: Option<SubsystemMember>,
}

/// A controller of an NVM subsystem with several: they share the namespaces (and their
/// backends and injected faults), serial number and NQN, and report ANA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubsystemMember {
    /// Which multi-controller subsystem of the VM, in command-line order.
    pub id: usize,
    /// 0-based position among its controllers; controller 0 creates the namespaces.
    pub controller: u16,
    pub controllers: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpuConfig,
    pub memory_bytes: u64,
    pub disks: Vec<DiskConfig>,
    pub nvmes: Vec<NvmeConfig>,
    /// I/O worker threads; None: one per host CPU.
    pub io_threads: Option<usize>,
    /// Build the whole VM, then exit before the first guest instruction: measures the
    /// VMM's own creation cost (time, memory) without a guest.
    pub dry_run: bool,
    /// Per-request timing (histograms); counters are kept either way.
    pub timing: bool,
    /// Where the measurement report (report.json and SVG plots) is written at exit.
    pub report_dir: Option<PathBuf>,
    /// A Unix socket answering `stats` with the report's JSON while the guest runs.
    pub api_socket: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(VmConfig),
    /// `blkswarm ctl --api-socket PATH REQUEST`: asks a running blkswarm.
    Ctl {
        socket: PathBuf,
        request: String,
    },
    /// `blkswarm plot REPORT.json DIR`: draws a report's SVG plots.
    Plot {
        report: PathBuf,
        out_dir: PathBuf,
    },
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unknown option {0:?} (see --help)")]
    UnknownOption(String),
    #[error("option {0} needs a value")]
    MissingValue(String),
    #[error("--kernel is required")]
    MissingKernel,
    #[error("{option}: unknown key {key:?}")]
    UnknownKey { option: String, key: String },
    #[error("{option}: {key}={value:?} is not valid: {why}")]
    BadValue {
        option: String,
        key: String,
        value: String,
        why: String,
    },
    #[error("--cpus: boot={boot} and max={max} need 1 <= boot <= max <= {MAX_VCPUS}")]
    BadCpuCount { boot: u32, max: u32 },
    #[error("--memory: {0} bytes is below the minimum of {MIN_MEMORY_BYTES}")]
    MemoryTooSmall(u64),
    #[error(
        "{option}: msix_vectors=0 leaves the function without any interrupt; add intx=on \
         (or give it MSI-X vectors)"
    )]
    NoInterrupt { option: String },
    #[error("{disks} disks: at most {MAX_DISKS} fit on one command line")]
    TooManyDisks { disks: usize },
    #[error("--memory: {0} bytes would overlap the PCI MMIO window; the maximum is {max}", max = crate::layout::MAX_RAM_BYTES)]
    MemoryTooLarge(u64),
}

pub const USAGE: &str = "\
usage: blkswarm --kernel BZIMAGE [--initramfs CPIO] [--cmdline STR]
                [--cpus boot=N[,max=M]] [--memory size=SIZE]
                [--disk KEYS]... [--disks count=N,KEYS]... [--nvme KEYS]...
                [--nvmes count=N,KEYS]... [--io-threads N]

  --kernel PATH          bzImage to boot directly (no firmware), or a kernel build
                         tree (its arch/x86/boot/bzImage)
  --initramfs PATH       initramfs handed to the kernel
  --cmdline STR          kernel command line
  --cpus boot=N,max=M    N vCPUs online at boot, M possible (default boot=1, max=boot)
  --memory size=SIZE     guest RAM, e.g. 512M or 2G (default 512M)
  --disk path=IMG[,readonly=on][,direct=on][,DISK_KEYS]
  --disk backend=null,size=SIZE[,latency_us=N][,DISK_KEYS]
                         a virtio-blk PCI disk; repeatable
  --disks count=N,path=/dir/disk%d.img[,readonly=on][,direct=on][,DISK_KEYS]
  --disks count=N,dir=/dir[,readonly=on][,direct=on][,DISK_KEYS]
  --disks count=N,backend=null,size=SIZE[,latency_us=N][,DISK_KEYS]
                         a group of N identical disks; %d in path= is the index in the
                         group (0-based), dir= means files disk0.img..disk<N-1>.img;
                         repeatable, mixes with --disk in command-line order
      DISK_KEYS: num_queues=N     virtqueues (default 1, at most 256)
                 queue_size=N     entries per queue, a power of two (default 256)
                 msix_vectors=N   MSI-X table size, 0..=2048 (default num_queues+1);
                                  fewer than num_queues+1 makes the guest share vectors;
                                  0: no MSI-X capability at all (needs intx=on)
                 intx=on|off      a legacy INTx line (INTA, level-triggered, IOAPIC GSI
                                  16-23, shared) the guest falls back to (default off)
      FAULT_KEYS (disks and NVMe controllers; also at run time: blkswarm ctl ... fault):
                 fault_read_latency=D, fault_write_latency=D
                                  extra latency before each read / write; D is
                                  fixed:1ms, uniform:100us-5ms or exp:10ms (its p99)
                 fault_error_rate=F  fraction of reads and writes that fail (EIO on
                                  virtio-blk, a media error on NVMe)
                 fault_error_sectors=START-END  reads and writes there fail
                 fault_stuck_rate=F  fraction of reads and writes that never complete
                 fault_read_bandwidth=R, fault_write_bandwidth=R
                                  bytes per second (500K, 20M, 1G) each direction moves
                 fault_service_time=D  each read and write occupies the disk for D,
                                  one at a time, both directions in one line (a
                                  single actuator: a read flood takes writes' time)
  --nvme path=IMG[,readonly=on][,direct=on][,NVME_KEYS]
  --nvme backend=null,size=SIZE[,latency_us=N][,NVME_KEYS]
                         an NVMe PCI controller; repeatable
  --nvmes count=N,path=/dir/nvme%d.img|dir=/dir|backend=null,size=SIZE[,...][,NVME_KEYS]
                         a group of N identical controllers, as --disks
      NVME_KEYS: namespaces=N     namespaces, each of size= (null backend only; default 1)
                 max_ioqpairs=Q   I/O queue pairs offered (default 8, at most 1024)
                 queue_size=N     largest queue, in entries (CAP.MQES+1; default 1024)
                 msix_vectors=V   MSI-X table size, 1..=2048 (default max_ioqpairs+1)
                 mdts=M           largest transfer: 4 KiB << M (default 7; 0: no limit)
                 serial=S         serial number, up to 20 characters
                 controllers=N    N controllers (PCI functions) of one NVM subsystem
                                  sharing the namespaces, with ANA: the guest sees one
                                  multipath disk per namespace (default 1, at most 16)
                 anatt=S          ANA transition time, 1..=255 s (default 10): the longest
                                  ctl ana ... via_change_ms may hold the change state
                 ana_groups=G     ANA groups, 1..=namespaces (default: one per
                                  namespace); namespace n is in group ((n-1) mod G)+1
  --dry-run              build the VM, print its creation time and RSS, exit before it runs
  --io-threads N         I/O worker threads serving every queue (default: host CPUs)
  --report DIR           write the measurement report at exit: DIR/report.json (schema in
                         docs/report.md) and SVG plots (latency CDF per phase, interrupts
                         per vCPU, in-flight requests over time)
  --api-socket PATH      a Unix socket answering `stats` with the same JSON while the
                         guest runs
  --timing on|off        per-request timestamps and latency histograms (default on);
                         counters and interrupt accounting are kept either way

       blkswarm ctl --api-socket PATH stats
                         print the JSON report of the blkswarm serving PATH
       blkswarm ctl --api-socket PATH fault pci=ADDRESS [clear] [KEY=VALUE]...
                         change a disk's injected faults (FAULT_KEYS without fault_)
       blkswarm ctl --api-socket PATH fatal pci=ADDRESS
                         set an NVMe controller's fatal status (CSTS.CFS): it fetches
                         nothing more until the guest resets it
       blkswarm ctl --api-socket PATH fail pci=ADDRESS | restore pci=ADDRESS
                         fail an NVMe controller as fatal does, and keep it from becoming
                         ready again after the guest resets it, until restore
       blkswarm ctl --api-socket PATH reset pci=ADDRESS
                         force an NVM Subsystem Reset (of every controller of ADDRESS's
                         subsystem): queues vanish, commands in flight never complete,
                         CSTS.NSSRO is set
       blkswarm ctl --api-socket PATH ana pci=ADDRESS group=NSID state=STATE [via_change_ms=N]
                         set a controller's ANA state of a namespace's group (optimized,
                         non-optimized, inaccessible, persistent-loss, change), through
                         the change state for N ms (at most ANATT, 10 s) if given
       blkswarm plot REPORT.json DIR
                         draw the SVG plots of a report into DIR

The guest's serial console (COM1) is stdout. VMM messages go to stderr; machine-readable
ones start with '@@vmm '. Exit status: 0 guest powered off, 1 VMM error, 2 guest reset,
3 guest fault (triple fault, KVM internal error, failed entry), 128+N stopped by signal N
(SIGTERM/SIGINT: the vCPUs' states, queues in flight and the closing report are printed
first).
";

pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut kernel = None;
    let mut initramfs = None;
    let mut cmdline = String::new();
    let mut cpus = None;
    let mut memory_bytes = DEFAULT_MEMORY_BYTES;
    let mut disks = Vec::new();
    let mut nvmes: Vec<NvmeConfig> = Vec::new();
    let mut subsystems = 0;
    let mut io_threads = None;
    let mut dry_run = false;
    let mut timing = true;
    let mut report_dir = None;
    let mut api_socket = None;

    let mut args = args.into_iter().peekable();
    match args.peek().map(String::as_str) {
        Some("ctl") => return parse_ctl(args.skip(1)),
        Some("plot") => return parse_plot(args.skip(1)),
        _ => {}
    }
    while let Some(arg) = args.next() {
        let (name, inline_value) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline_value
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| ConfigError::MissingValue(name.clone()))
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => kernel = Some(kernel_image(PathBuf::from(value()?))),
            "--initramfs" => initramfs = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = value()?,
            "--cpus" => cpus = Some(parse_cpus(&value()?)?),
            "--memory" => memory_bytes = parse_memory(&value()?)?,
            "--disk" => {
                if disks.len() >= MAX_DISKS {
                    return Err(ConfigError::TooManyDisks {
                        disks: disks.len() + 1,
                    });
                }
                disks.push(parse_disk(&value()?)?)
            }
            "--disks" => {
                let group = parse_disk_group(&value()?)?;
                if disks.len() + group.count > MAX_DISKS {
                    return Err(ConfigError::TooManyDisks {
                        disks: disks.len() + group.count,
                    });
                }
                disks.extend(group.expand());
            }
            "--nvme" => push_controllers(&mut nvmes, parse_nvme(&value()?)?, &mut subsystems)?,
            "--nvmes" => {
                let (count, template, images) = parse_nvme_group(&value()?)?;
                let functions = count * usize::from(template.controllers);
                if nvmes.len() + functions > MAX_DISKS {
                    return Err(ConfigError::TooManyDisks {
                        disks: nvmes.len() + functions,
                    });
                }
                for index in 0..count {
                    let mut nvme = template.clone();
                    if let (Some(images), DiskBackendConfig::File { path, .. }) =
                        (&images, &mut nvme.backend)
                    {
                        *path = images.path(index);
                    }
                    push_controllers(&mut nvmes, nvme, &mut subsystems)?;
                }
            }
            "--dry-run" => dry_run = true,
            "--report" => report_dir = Some(PathBuf::from(value()?)),
            "--api-socket" => api_socket = Some(PathBuf::from(value()?)),
            "--timing" => {
                let text = value()?;
                timing = parse_on_off(&text)
                    .ok_or_else(|| bad_value("--timing", "", &text, "expected on or off"))?;
            }
            "--io-threads" => {
                let text = value()?;
                let threads = text
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1024).contains(n))
                    .ok_or_else(|| bad_value("--io-threads", "", &text, "expected 1..=1024"))?;
                io_threads = Some(threads);
            }
            _ => return Err(ConfigError::UnknownOption(arg)),
        }
    }
    Ok(Command::Run(VmConfig {
        kernel: kernel.ok_or(ConfigError::MissingKernel)?,
        initramfs,
        cmdline,
        cpus: cpus.unwrap_or(CpuConfig { boot: 1, max: 1 }),
        memory_bytes,
        disks,
        nvmes,
        io_threads,
        dry_run,
        timing,
        report_dir,
        api_socket,
    }))
}

fn parse_on_off(text: &str) -> Option<bool> {
    match text {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// `ctl --api-socket PATH REQUEST`.
fn parse_ctl(mut args: impl Iterator<Item = String>) -> Result<Command, ConfigError> {
    let mut socket = None;
    let mut request = None;
    while let Some(arg) = args.next() {
        match arg.split_once('=') {
            Some(("--api-socket", path)) => socket = Some(PathBuf::from(path)),
            _ if arg == "--api-socket" => {
                let path = args
                    .next()
                    .ok_or_else(|| ConfigError::MissingValue(arg.clone()))?;
                socket = Some(PathBuf::from(path));
            }
            _ if arg.starts_with('-') => return Err(ConfigError::UnknownOption(arg)),
            // The request's words, e.g. `fault pci=0000:00:01.0 error_rate=0.1`.
            _ => {
                let words: &mut String = request.get_or_insert_with(String::new);
                if !words.is_empty() {
                    words.push(' ');
                }
                words.push_str(&arg);
            }
        }
    }
    Ok(Command::Ctl {
        socket: socket.ok_or_else(|| ConfigError::MissingValue("ctl --api-socket".into()))?,
        request: request.ok_or_else(|| ConfigError::MissingValue("ctl REQUEST".into()))?,
    })
}

/// `plot REPORT.json DIR`.
fn parse_plot(mut args: impl Iterator<Item = String>) -> Result<Command, ConfigError> {
    let report = args
        .next()
        .ok_or_else(|| ConfigError::MissingValue("plot REPORT.json".into()))?;
    let out_dir = args
        .next()
        .ok_or_else(|| ConfigError::MissingValue("plot DIR".into()))?;
    if let Some(extra) = args.next() {
        return Err(ConfigError::UnknownOption(extra));
    }
    Ok(Command::Plot {
        report: PathBuf::from(report),
        out_dir: PathBuf::from(out_dir),
    })
}

/// Splits `k1=v1,k2=v2` into pairs; a bare word is a key with an empty value.
fn key_values(list: &str) -> impl Iterator<Item = (&str, &str)> {
    list.split(',')
        .filter(|item| !item.is_empty())
        .map(|item| item.split_once('=').unwrap_or((item, "")))
}

fn bad_value(option: &str, key: &str, value: &str, why: impl ToString) -> ConfigError {
    ConfigError::BadValue {
        option: option.into(),
        key: key.into(),
        value: value.into(),
        why: why.to_string(),
    }
}

fn parse_cpus(list: &str) -> Result<CpuConfig, ConfigError> {
    let mut boot = 1;
    let mut max = None;
    for (key, value) in key_values(list) {
        let number = || {
            value
                .parse::<u32>()
                .map_err(|e| bad_value("--cpus", key, value, e))
        };
        match key {
            "boot" => boot = number()?,
            "max" => max = Some(number()?),
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: "--cpus".into(),
                    key: key.into(),
                })
            }
        }
    }
    let max = max.unwrap_or(boot);
    if boot == 0 || boot > max || max > MAX_VCPUS {
        return Err(ConfigError::BadCpuCount { boot, max });
    }
    Ok(CpuConfig { boot, max })
}

fn parse_memory(list: &str) -> Result<u64, ConfigError> {
    let mut size = DEFAULT_MEMORY_BYTES;
    for (key, value) in key_values(list) {
        match key {
            "size" => {
                size = parse_size(value).ok_or_else(|| {
                    bad_value("--memory", key, value, "expected a size like 512M or 2G")
                })?
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: "--memory".into(),
                    key: key.into(),
                })
            }
        }
    }
    if size < MIN_MEMORY_BYTES {
        return Err(ConfigError::MemoryTooSmall(size));
    }
    if size > crate::layout::MAX_RAM_BYTES {
        return Err(ConfigError::MemoryTooLarge(size));
    }
    Ok(size)
}

fn on_off(option: &str, key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "1" | "" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(bad_value(option, key, value, "expected on or off")),
    }
}

/// The keys of `--disk` and `--disks`, read but not yet checked against each other.
struct DiskKeys<'a> {
    option: &'static str,
    count: Option<usize>,
    path: Option<&'a str>,
    dir: Option<&'a str>,
    backend: Option<&'a str>,
    size: Option<u64>,
    latency_us: u64,
    direct: bool,
    read_only: bool,
    num_queues: u16,
    queue_size: u16,
    msix_vectors: Option<u16>,
    intx: bool,
    /// NVMe only (`--nvme`, `--nvmes`).
    namespaces: u32,
    max_io_queue_pairs: u16,
    nvme_queue_size: u32,
    mdts: u8,
    serial: Option<&'a str>,
    controllers: u16,
    ana_transition_time_secs: u8,
    ana_groups: Option<u32>,
    /// `fault_*` keys, without the prefix, checked.
    faults: Option<Arc<[(String, String)]>>,
}

/// Disk keys starting with this set injected faults (`fault_error_rate=0.01`).
const FAULT_KEY_PREFIX: &str = "fault_";

/// Whether an option describes NVMe controllers (else virtio-blk disks).
fn is_nvme_option(option: &str) -> bool {
    option.starts_with("--nvme")
}

/// Reads a disk option's keys; `count` and `dir` exist only for groups, NVMe keys only for
/// `--nvme`/`--nvmes`, virtio-blk queue and INTx keys only for `--disk`/`--disks`.
fn read_disk_keys<'a>(
    option: &'static str,
    list: &'a str,
    group: bool,
) -> Result<DiskKeys<'a>, ConfigError> {
    let mut keys = DiskKeys {
        option,
        count: None,
        path: None,
        dir: None,
        backend: None,
        size: None,
        latency_us: 0,
        direct: false,
        read_only: false,
        num_queues: DEFAULT_NUM_QUEUES,
        queue_size: DEFAULT_QUEUE_SIZE,
        msix_vectors: None,
        intx: false,
        namespaces: 1,
        max_io_queue_pairs: DEFAULT_NVME_IO_QUEUE_PAIRS,
        nvme_queue_size: u32::from(DEFAULT_NVME_QUEUE_SIZE),
        mdts: DEFAULT_NVME_MDTS,
        serial: None,
        controllers: 1,
        ana_transition_time_secs: ANA_TRANSITION_TIME_SECS,
        ana_groups: None,
        faults: None,
    };
    let mut faults = Vec::new();
    let nvme = is_nvme_option(option);
    for (key, value) in key_values(list) {
        let number = |min: u64, max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| bad_value(option, key, value, format!("expected {min}..={max}")))
        };
        match key {
            "count" if group => keys.count = Some(number(1, MAX_DISKS as u64)? as usize),
            "dir" if group => keys.dir = Some(value),
            "path" => keys.path = Some(value),
            "backend" => keys.backend = Some(value),
            "size" => {
                keys.size = Some(
                    parse_size(value)
                        .ok_or_else(|| bad_value(option, key, value, "expected a size like 1G"))?,
                )
            }
            "latency_us" => keys.latency_us = number(0, MAX_LATENCY_US)?,
            "direct" => keys.direct = on_off(option, key, value)?,
            "readonly" => keys.read_only = on_off(option, key, value)?,
            "num_queues" if !nvme => keys.num_queues = number(1, u64::from(MAX_NUM_QUEUES))? as u16,
            "namespaces" if nvme => {
                keys.namespaces = number(1, u64::from(MAX_NVME_NAMESPACES))? as u32
            }
            "max_ioqpairs" if nvme => {
                keys.max_io_queue_pairs = number(1, u64::from(MAX_NVME_IO_QUEUE_PAIRS))? as u16
            }
            "mdts" if nvme => keys.mdts = number(0, u64::from(MAX_NVME_MDTS))? as u8,
            "anatt" if nvme => keys.ana_transition_time_secs = number(1, 255)? as u8,
            "ana_groups" if nvme => {
                keys.ana_groups = Some(number(1, u64::from(MAX_NVME_NAMESPACES))? as u32)
            }
            "controllers" if nvme => {
                keys.controllers = number(1, u64::from(MAX_NVME_CONTROLLERS_PER_SUBSYSTEM))? as u16
            }
            "serial" if nvme => {
                // Identify Controller's SN field: 20 printable ASCII characters.
                let printable = value.bytes().all(|b| b.is_ascii_graphic());
                if value.is_empty() || value.len() > 20 || !printable {
                    return Err(bad_value(
                        option,
                        key,
                        value,
                        "expected 1..=20 printable ASCII characters",
                    ));
                }
                keys.serial = Some(value)
            }
            "queue_size" if nvme => {
                // A queue needs two entries to hold one command (one slot stays empty).
                keys.nvme_queue_size = number(2, u64::from(MAX_NVME_QUEUE_SIZE))? as u32
            }
            "queue_size" => {
                keys.queue_size = number(1, u64::from(MAX_QUEUE_SIZE))? as u16;
                if !keys.queue_size.is_power_of_two() {
                    return Err(bad_value(option, key, value, "expected a power of two"));
                }
            }
            // 0: a function without an MSI-X capability (then it needs intx=on).
            "msix_vectors" => {
                // NVMe has no INTx here: a controller needs at least one vector.
                let least = u64::from(nvme);
                keys.msix_vectors = Some(number(least, u64::from(MAX_MSIX_VECTORS))? as u16)
            }
            "intx" if !nvme => keys.intx = on_off(option, key, value)?,
            _ if key.starts_with(FAULT_KEY_PREFIX) => {
                let setting = &key[FAULT_KEY_PREFIX.len()..];
                FaultSettings::default()
                    .set(setting, value)
                    .map_err(|why| bad_value(option, key, value, why))?;
                faults.push((setting.to_string(), value.to_string()));
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: option.into(),
                    key: key.into(),
                })
            }
        }
    }
    keys.faults = (!faults.is_empty()).then(|| Arc::from(faults));
    if keys.msix_vectors == Some(0) && !keys.intx {
        return Err(ConfigError::NoInterrupt {
            option: option.into(),
        });
    }
    Ok(keys)
}

impl DiskKeys<'_> {
    /// An NVMe controller with every setting but the backend's.
    fn nvme(&self, backend: DiskBackendConfig) -> Result<NvmeConfig, ConfigError> {
        if self.namespaces > 1 && matches!(backend, DiskBackendConfig::File { .. }) {
            return Err(bad_value(
                self.option,
                "namespaces",
                &self.namespaces.to_string(),
                "an image file backs one namespace; several need backend=null",
            ));
        }
        if let Some(groups) = self.ana_groups {
            let why = if self.controllers < 2 {
                Some("ANA needs controllers=2 or more".to_string())
            } else if groups > self.namespaces {
                Some(format!(
                    "at most one group per namespace ({} namespaces)",
                    self.namespaces
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(bad_value(
                    self.option,
                    "ana_groups",
                    &groups.to_string(),
                    why,
                ));
            }
        }
        Ok(NvmeConfig {
            backend,
            read_only: self.read_only,
            namespaces: self.namespaces,
            max_io_queue_pairs: self.max_io_queue_pairs,
            queue_size: self.nvme_queue_size,
            // What Linux asks for: one vector per I/O queue plus the admin queue's.
            msix_vectors: self.msix_vectors.unwrap_or(self.max_io_queue_pairs + 1),
            mdts: self.mdts,
            serial: self.serial.map(str::to_string),
            faults: self.faults.clone(),
            controllers: self.controllers,
            ana_transition_time_secs: self.ana_transition_time_secs,
            ana_groups: self.ana_groups,
            subsystem: None,
        })
    }
}

impl DiskKeys<'_> {
    /// A disk with every setting but the backend's, which `backend` fills in.
    fn disk(&self, backend: DiskBackendConfig) -> DiskConfig {
        DiskConfig {
            backend,
            read_only: self.read_only,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            msix_vectors: self
                .msix_vectors
                .unwrap_or(DiskConfig::default_msix_vectors(self.num_queues)),
            intx: self.intx,
            faults: self.faults.clone(),
        }
    }

    /// The null backend's settings, when `backend=null` was given.
    fn null_backend(&self) -> Result<Option<DiskBackendConfig>, ConfigError> {
        match self.backend {
            None | Some("file") => return Ok(None),
            Some("null") => {}
            Some(other) => {
                return Err(bad_value(
                    self.option,
                    "backend",
                    other,
                    "expected file or null",
                ))
            }
        }
        if self.path.is_some() || self.dir.is_some() {
            return Err(bad_value(
                self.option,
                "backend",
                "null",
                "backend=null takes no path= or dir=",
            ));
        }
        let size_bytes = self
            .size
            .ok_or_else(|| bad_value(self.option, "size", "", "backend=null needs size="))?;
        if size_bytes == 0 || size_bytes % 512 != 0 {
            return Err(bad_value(
                self.option,
                "size",
                &size_bytes.to_string(),
                "expected a non-zero multiple of 512",
            ));
        }
        Ok(Some(DiskBackendConfig::Null {
            size_bytes,
            latency_us: self.latency_us,
        }))
    }

    /// Refuses the null backend's keys on an image file.
    fn check_file_keys(&self, location: &str) -> Result<(), ConfigError> {
        if self.size.is_some() || self.latency_us != 0 {
            return Err(bad_value(
                self.option,
                "path",
                location,
                "size= and latency_us= belong to backend=null",
            ));
        }
        Ok(())
    }
}

fn parse_disk(list: &str) -> Result<DiskConfig, ConfigError> {
    const OPT: &str = "--disk";
    let keys = read_disk_keys(OPT, list, false)?;
    if let Some(null) = keys.null_backend()? {
        return Ok(keys.disk(null));
    }
    let path = keys.path.filter(|path| !path.is_empty()).ok_or_else(|| {
        bad_value(
            OPT,
            "path",
            list,
            "give path=IMG (file) or backend=null,size=SIZE",
        )
    })?;
    keys.check_file_keys(path)?;
    Ok(keys.disk(DiskBackendConfig::File {
        path: PathBuf::from(path),
        direct: keys.direct,
    }))
}

/// Where the image files of a `--disks` group are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GroupImages {
    /// `path=` with [`DISK_INDEX_PLACEHOLDER`] where the index goes.
    Pattern(String),
    /// `dir=`: `disk<index>.img` in that directory.
    Directory(PathBuf),
}

impl GroupImages {
    fn path(&self, index: usize) -> PathBuf {
        match self {
            GroupImages::Pattern(pattern) => {
                PathBuf::from(pattern.replacen(DISK_INDEX_PLACEHOLDER, &index.to_string(), 1))
            }
            GroupImages::Directory(dir) => dir.join(format!("disk{index}.img")),
        }
    }
}

/// A `--disks` group: `count` disks that differ only in their image file, if any.
#[derive(Debug)]
struct DiskGroup {
    count: usize,
    template: DiskConfig,
    images: Option<GroupImages>,
}

impl DiskGroup {
    fn expand(self) -> impl Iterator<Item = DiskConfig> {
        (0..self.count).map(move |index| {
            let mut disk = self.template.clone();
            if let (Some(images), DiskBackendConfig::File { path, .. }) =
                (&self.images, &mut disk.backend)
            {
                *path = images.path(index);
            }
            disk
        })
    }
}

fn parse_disk_group(list: &str) -> Result<DiskGroup, ConfigError> {
    const OPT: &str = "--disks";
    let keys = read_disk_keys(OPT, list, true)?;
    let count = keys
        .count
        .ok_or_else(|| bad_value(OPT, "count", "", "a group needs count=N"))?;
    if let Some(null) = keys.null_backend()? {
        return Ok(DiskGroup {
            count,
            template: keys.disk(null),
            images: None,
        });
    }
    let images = group_images(&keys, list)?;
    // The template's path is replaced by every disk's own.
    let template = keys.disk(DiskBackendConfig::File {
        path: PathBuf::new(),
        direct: keys.direct,
    });
    Ok(DiskGroup {
        count,
        template,
        images: Some(images),
    })
}

/// Where a group's image files are: `path=` with one `%d`, or `dir=`.
fn group_images(keys: &DiskKeys<'_>, list: &str) -> Result<GroupImages, ConfigError> {
    let option = keys.option;
    match (keys.path, keys.dir) {
        (Some(pattern), None) => {
            if pattern.matches(DISK_INDEX_PLACEHOLDER).count() != 1 {
                return Err(bad_value(
                    option,
                    "path",
                    pattern,
                    "expected one %d, replaced by the disk's index in the group",
                ));
            }
            keys.check_file_keys(pattern)?;
            Ok(GroupImages::Pattern(pattern.to_string()))
        }
        (None, Some(dir)) if !dir.is_empty() => {
            keys.check_file_keys(dir)?;
            Ok(GroupImages::Directory(PathBuf::from(dir)))
        }
        (Some(_), Some(_)) => Err(bad_value(
            option,
            "dir",
            keys.dir.unwrap_or_default(),
            "give path= or dir=, not both",
        )),
        _ => Err(bad_value(
            option,
            "path",
            list,
            "give path=/dir/disk%d.img, dir=/dir or backend=null,size=SIZE",
        )),
    }
}

/// Appends the PCI functions `nvme` asks for: itself, or with controllers=N the N
/// controllers of one new subsystem.
fn push_controllers(
    nvmes: &mut Vec<NvmeConfig>,
    nvme: NvmeConfig,
    subsystems: &mut usize,
) -> Result<(), ConfigError> {
    let count = usize::from(nvme.controllers);
    if nvmes.len() + count > MAX_DISKS {
        return Err(ConfigError::TooManyDisks {
            disks: nvmes.len() + count,
        });
    }
    if count == 1 {
        nvmes.push(nvme);
        return Ok(());
    }
    let id = *subsystems;
    *subsystems += 1;
    nvmes.extend((0..nvme.controllers).map(|controller| NvmeConfig {
        subsystem: Some(SubsystemMember {
            id,
            controller,
            controllers: nvme.controllers,
        }),
        ..nvme.clone()
    }));
    Ok(())
}

fn parse_nvme(list: &str) -> Result<NvmeConfig, ConfigError> {
    const OPT: &str = "--nvme";
    let keys = read_disk_keys(OPT, list, false)?;
    if let Some(null) = keys.null_backend()? {
        return keys.nvme(null);
    }
    let path = keys.path.filter(|path| !path.is_empty()).ok_or_else(|| {
        bad_value(
            OPT,
            "path",
            list,
            "give path=IMG (file) or backend=null,size=SIZE",
        )
    })?;
    keys.check_file_keys(path)?;
    keys.nvme(DiskBackendConfig::File {
        path: PathBuf::from(path),
        direct: keys.direct,
    })
}

/// A `--nvmes` group: its count, the controller every member copies, and where the members'
/// image files are (None for null backends).
fn parse_nvme_group(list: &str) -> Result<(usize, NvmeConfig, Option<GroupImages>), ConfigError> {
    const OPT: &str = "--nvmes";
    let keys = read_disk_keys(OPT, list, true)?;
    let count = keys
        .count
        .ok_or_else(|| bad_value(OPT, "count", "", "a group needs count=N"))?;
    if let Some(null) = keys.null_backend()? {
        return Ok((count, keys.nvme(null)?, None));
    }
    let images = group_images(&keys, list)?;
    let template = keys.nvme(DiskBackendConfig::File {
        path: PathBuf::new(),
        direct: keys.direct,
    })?;
    Ok((count, template, Some(images)))
}

/// Parses `4096`, `64K`, `512M`, `2G` or `1T` (binary units) into bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 10),
        (i, 'M' | 'm') => (&text[..i], 20),
        (i, 'G' | 'g') => (&text[..i], 30),
        (i, 'T' | 't') => (&text[..i], 40),
        _ => (text, 0),
    };
    let number: u64 = digits.parse().ok()?;
    number.checked_mul(1u64 << shift)
}

/// `--kernel`: a kernel build tree stands for the bzImage it built.
fn kernel_image(path: PathBuf) -> PathBuf {
    if path.is_dir() {
        path.join("arch/x86/boot/bzImage")
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, ConfigError> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    fn run(args: &[&str]) -> VmConfig {
        match parse(args).unwrap() {
            Command::Run(config) => config,
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn full_command_line() {
        let config = run(&[
            "--kernel",
            "/k",
            "--initramfs=/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2,max=8",
            "--memory",
            "size=1G",
        ]);
        assert_eq!(config.kernel, PathBuf::from("/k"));
        // A directory is a kernel tree: its bzImage.
        let tree = std::env::temp_dir();
        let from_tree = run(&["--kernel", tree.to_str().unwrap()]);
        assert_eq!(from_tree.kernel, tree.join("arch/x86/boot/bzImage"));
        assert_eq!(config.initramfs, Some(PathBuf::from("/i")));
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.cpus, CpuConfig { boot: 2, max: 8 });
        assert_eq!(config.memory_bytes, 1 << 30);
    }

    #[test]
    fn fault_keys() {
        let config = run(&[
            "--kernel",
            "/k",
            "--disks",
            "count=3,backend=null,size=1G,fault_error_rate=0.01,fault_read_latency=exp:10ms",
            "--nvme",
            "backend=null,size=1G,fault_error_sectors=0-8,fault_stuck_rate=0.5",
        ]);
        let faults = config.disks[0].faults.clone().expect("fault keys");
        assert_eq!(
            &faults[..],
            [
                ("error_rate".to_string(), "0.01".to_string()),
                ("read_latency".to_string(), "exp:10ms".to_string())
            ]
        );
        assert!(
            Arc::ptr_eq(&faults, config.disks[2].faults.as_ref().unwrap()),
            "one copy per group"
        );
        assert_eq!(config.nvmes[0].faults.as_ref().map(|f| f.len()), Some(2));
        for bad in [
            "backend=null,size=1G,fault_error_rate=2",
            "backend=null,size=1G,fault_read_latency=slow",
            "backend=null,size=1G,fault_colour=red",
        ] {
            assert!(matches!(
                parse(&["--kernel", "/k", "--disk", bad]),
                Err(ConfigError::BadValue { .. })
            ));
        }
    }

    #[test]
    fn measurement_options_and_subcommands() {
        let config = run(&["--kernel", "/k"]);
        assert!(config.timing);
        assert_eq!((config.report_dir, config.api_socket), (None, None));
        let config = run(&[
            "--kernel",
            "/k",
            "--timing=off",
            "--report",
            "/r",
            "--api-socket",
            "/s",
        ]);
        assert!(!config.timing);
        assert_eq!(config.report_dir, Some(PathBuf::from("/r")));
        assert_eq!(config.api_socket, Some(PathBuf::from("/s")));
        assert!(matches!(
            parse(&["--kernel", "/k", "--timing", "maybe"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert_eq!(
            parse(&["ctl", "--api-socket", "/s", "stats"]),
            Ok(Command::Ctl {
                socket: PathBuf::from("/s"),
                request: "stats".into()
            })
        );
        assert_eq!(
            parse(&["ctl", "--api-socket=/s", "stats"]),
            parse(&["ctl", "--api-socket", "/s", "stats"])
        );
        assert!(parse(&["ctl", "stats"]).is_err(), "no socket");
        assert_eq!(
            parse(&[
                "ctl",
                "--api-socket",
                "/s",
                "fault",
                "pci=0000:00:01.0",
                "clear"
            ]),
            Ok(Command::Ctl {
                socket: PathBuf::from("/s"),
                request: "fault pci=0000:00:01.0 clear".into()
            })
        );
        assert!(parse(&["ctl", "--api-socket", "/s"]).is_err(), "no request");
        assert_eq!(
            parse(&["plot", "r.json", "out"]),
            Ok(Command::Plot {
                report: PathBuf::from("r.json"),
                out_dir: PathBuf::from("out")
            })
        );
        assert!(parse(&["plot", "r.json"]).is_err());
    }

    #[test]
    fn defaults() {
        let config = run(&["--kernel", "/k"]);
        assert_eq!(config.cpus, CpuConfig { boot: 1, max: 1 });
        assert_eq!(config.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(config.initramfs, None);
        assert_eq!(run(&["--kernel", "/k", "--cpus", "boot=4"]).cpus.max, 4);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(&[]), Err(ConfigError::MissingKernel));
        assert_eq!(
            parse(&["--kernel"]),
            Err(ConfigError::MissingValue("--kernel".into()))
        );
        assert!(matches!(
            parse(&["--kernel", "/k", "--frobnicate"]),
            Err(ConfigError::UnknownOption(_))
        ));
        for cpus in ["boot=0", "boot=3,max=2", "boot=1,max=255"] {
            assert!(
                matches!(
                    parse(&["--kernel", "/k", "--cpus", cpus]),
                    Err(ConfigError::BadCpuCount { .. })
                ),
                "{cpus}"
            );
        }
        assert!(matches!(
            parse(&["--kernel", "/k", "--cpus", "boot=x"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&["--kernel", "/k", "--cpus", "sockets=2"]),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse(&["--kernel", "/k", "--memory", "size=lots"]),
            Err(ConfigError::BadValue { .. })
        ));
        assert_eq!(
            parse(&["--kernel", "/k", "--memory", "size=1M"]),
            Err(ConfigError::MemoryTooSmall(1 << 20))
        );
        assert_eq!(
            parse(&["--kernel", "/k", "--memory", "size=1T"]),
            Err(ConfigError::MemoryTooLarge(1 << 40))
        );
    }

    #[test]
    fn disks() {
        let config = run(&[
            "--kernel",
            "/k",
            "--disk",
            "path=/img,readonly=on,num_queues=4,queue_size=128,direct=on",
            "--disk",
            "backend=null,size=1G,latency_us=100",
            "--io-threads",
            "3",
        ]);
        assert_eq!(
            config.disks,
            vec![
                DiskConfig {
                    backend: DiskBackendConfig::File {
                        path: PathBuf::from("/img"),
                        direct: true
                    },
                    read_only: true,
                    num_queues: 4,
                    queue_size: 128,
                    msix_vectors: 5,
                    intx: false,
                    faults: None,
                },
                DiskConfig {
                    backend: DiskBackendConfig::Null {
                        size_bytes: 1 << 30,
                        latency_us: 100
                    },
                    read_only: false,
                    num_queues: DEFAULT_NUM_QUEUES,
                    queue_size: DEFAULT_QUEUE_SIZE,
                    msix_vectors: DEFAULT_NUM_QUEUES + 1,
                    intx: false,
                    faults: None,
                }
            ]
        );
        assert_eq!(config.io_threads, Some(3));
        for bad in [
            "backend=null",
            "backend=null,size=1000",
            "backend=nvram,size=1G",
            "readonly=on",
            "path=/img,num_queues=0",
            "path=/img,queue_size=100",
            "path=/img,readonly=maybe",
            "path=/img,size=1G",
            "path=/img,colour=blue",
            "path=/img,count=2",
            "path=/img,dir=/d",
            "backend=null,size=1G,path=/img",
            "path=",
        ] {
            assert!(parse(&["--kernel", "/k", "--disk", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["--kernel", "/k", "--io-threads", "0"]).is_err());
    }

    fn disks_of(args: &[&str]) -> Vec<DiskConfig> {
        let mut line = vec!["--kernel", "/k"];
        line.extend_from_slice(args);
        run(&line).disks
    }

    fn error_of(args: &[&str]) -> String {
        let mut line = vec!["--kernel", "/k"];
        line.extend_from_slice(args);
        parse(&line).unwrap_err().to_string()
    }

    fn file_path(disk: &DiskConfig) -> &std::path::Path {
        match &disk.backend {
            DiskBackendConfig::File { path, .. } => path,
            other => panic!("expected a file disk, got {other:?}"),
        }
    }

    #[test]
    fn null_disk_group() {
        let disks = disks_of(&["--disks", "count=500,backend=null,size=1G,num_queues=2"]);
        assert_eq!(disks.len(), 500);
        let expected = DiskConfig {
            backend: DiskBackendConfig::Null {
                size_bytes: 1 << 30,
                latency_us: 0,
            },
            read_only: false,
            num_queues: 2,
            queue_size: DEFAULT_QUEUE_SIZE,
            msix_vectors: 3,
            intx: false,
            faults: None,
        };
        assert!(disks.iter().all(|disk| *disk == expected));
    }

    #[test]
    fn group_knobs() {
        let disks = disks_of(&[
            "--disks",
            "count=2,backend=null,size=64M,num_queues=4,queue_size=64,latency_us=250,\
             readonly=on,msix_vectors=2,intx=off",
        ]);
        assert_eq!(
            disks[1],
            DiskConfig {
                backend: DiskBackendConfig::Null {
                    size_bytes: 64 << 20,
                    latency_us: 250,
                },
                read_only: true,
                num_queues: 4,
                queue_size: 64,
                msix_vectors: 2,
                intx: false,
                faults: None,
            }
        );
        assert_eq!(disks[0], disks[1]);
        // A table larger than the default is allowed: the guest just leaves entries unused.
        let large = disks_of(&["--disk", "path=/img,msix_vectors=2048"]);
        assert_eq!(large[0].msix_vectors, MAX_MSIX_VECTORS);
        assert!(!disks_of(&["--disk", "path=/img,intx=off"])[0].intx);
    }

    #[test]
    fn image_group_with_pattern() {
        let disks = disks_of(&["--disks", "count=3,path=/images/d%d.raw,direct=on,readonly"]);
        let paths: Vec<_> = disks.iter().map(file_path).collect();
        assert_eq!(
            paths,
            ["/images/d0.raw", "/images/d1.raw", "/images/d2.raw"]
        );
        assert!(disks.iter().all(|disk| disk.read_only
            && disk.msix_vectors == 2
            && matches!(disk.backend, DiskBackendConfig::File { direct: true, .. })));
    }

    #[test]
    fn image_group_in_directory() {
        let disks = disks_of(&["--disks", "count=2,dir=/images,num_queues=2"]);
        let paths: Vec<_> = disks.iter().map(file_path).collect();
        assert_eq!(paths, ["/images/disk0.img", "/images/disk1.img"]);
        assert_eq!(disks[0].num_queues, 2);
        assert!(matches!(
            disks[0].backend,
            DiskBackendConfig::File { direct: false, .. }
        ));
    }

    #[test]
    fn groups_and_single_disks_keep_command_line_order() {
        let disks = disks_of(&[
            "--disk",
            "path=/first",
            "--disks",
            "count=2,path=/group%d",
            "--disk",
            "backend=null,size=1M",
            "--disks=count=1,dir=/d",
        ]);
        assert_eq!(disks.len(), 5);
        assert_eq!(file_path(&disks[0]), std::path::Path::new("/first"));
        assert_eq!(file_path(&disks[1]), std::path::Path::new("/group0"));
        assert_eq!(file_path(&disks[2]), std::path::Path::new("/group1"));
        assert!(matches!(disks[3].backend, DiskBackendConfig::Null { .. }));
        assert_eq!(file_path(&disks[4]), std::path::Path::new("/d/disk0.img"));
    }

    #[test]
    fn rejects_bad_groups() {
        for (group, message) in [
            ("backend=null,size=1G", "a group needs count=N"),
            ("count=0,backend=null,size=1G", "expected 1..=65536"),
            ("count=65537,backend=null,size=1G", "expected 1..=65536"),
            ("count=x,backend=null,size=1G", "expected 1..=65536"),
            ("count=2,path=/img", "expected one %d"),
            ("count=2,path=/img%d%d", "expected one %d"),
            ("count=2,path=/i%d,dir=/d", "not both"),
            ("count=2,dir=", "give path=/dir/disk%d.img, dir=/dir"),
            ("count=2", "give path=/dir/disk%d.img, dir=/dir"),
            ("count=2,dir=/d,size=1G", "belong to backend=null"),
            ("count=2,path=/i%d,latency_us=5", "belong to backend=null"),
            ("count=2,backend=null", "backend=null needs size="),
            (
                "count=2,backend=null,size=1G,dir=/d",
                "takes no path= or dir=",
            ),
            ("count=2,backend=tape,size=1G", "expected file or null"),
            ("count=2,dir=/d,num_queues=0", "expected 1..=256"),
            ("count=2,dir=/d,num_queues=257", "expected 1..=256"),
            ("count=2,dir=/d,queue_size=3", "power of two"),
            ("count=2,dir=/d,msix_vectors=2049", "expected 0..=2048"),
            ("count=2,dir=/d,intx=maybe", "expected on or off"),
            ("count=2,dir=/d,serial=x", "unknown key \"serial\""),
        ] {
            let error = error_of(&["--disks", group]);
            assert!(error.starts_with("--disks: "), "{group}: {error}");
            assert!(error.contains(message), "{group}: {error}");
        }
    }

    #[test]
    fn msix_vectors_zero_needs_intx() {
        for (option, list) in [
            ("--disk", "backend=null,size=1G,msix_vectors=0"),
            (
                "--disks",
                "count=1,backend=null,size=1G,msix_vectors=0,intx=off",
            ),
        ] {
            assert_eq!(
                parse(&["--kernel", "/k", option, list]),
                Err(ConfigError::NoInterrupt {
                    option: option.into()
                })
            );
            let error = error_of(&[option, list]);
            assert!(error.contains("add intx=on"), "{option}: {error}");
        }
        let disks = disks_of(&["--disk", "backend=null,size=1G,msix_vectors=0,intx=on"]);
        assert_eq!((disks[0].msix_vectors, disks[0].intx), (0, true));
        // Key order does not matter.
        let disks = disks_of(&[
            "--disks",
            "count=2,intx=on,backend=null,size=1G,msix_vectors=0",
        ]);
        assert!(disks.iter().all(|d| d.msix_vectors == 0 && d.intx));
    }

    #[test]
    fn intx_on_is_per_disk_and_group() {
        for (option, list) in [
            ("--disk", "backend=null,size=1G,intx=on"),
            ("--disks", "count=4,dir=/d,intx=on"),
            ("--disks", "count=4,dir=/d,intx"),
        ] {
            let disks = disks_of(&[option, list]);
            assert!(disks.iter().all(|d| d.intx), "{option} {list}");
            assert!(disks
                .iter()
                .all(|d| d.msix_vectors == DiskConfig::default_msix_vectors(d.num_queues)));
        }
        let mixed = disks_of(&[
            "--disk",
            "backend=null,size=1G",
            "--disk",
            "backend=null,size=1G,intx=on",
        ]);
        assert_eq!((mixed[0].intx, mixed[1].intx), (false, true));
    }

    #[test]
    fn too_many_disks() {
        let half = format!("count={},backend=null,size=1M", MAX_DISKS / 2);
        assert_eq!(
            disks_of(&["--disks", &half, "--disks", &half]).len(),
            MAX_DISKS
        );
        assert_eq!(
            parse(&["--kernel", "/k", "--disks", &half, "--disks", &half, "--disk", "path=/x"]),
            Err(ConfigError::TooManyDisks {
                disks: MAX_DISKS + 1
            })
        );
        assert_eq!(
            parse(&["--kernel", "/k", "--disk", "path=/x", "--disks", &half, "--disks", &half]),
            Err(ConfigError::TooManyDisks {
                disks: MAX_DISKS + 1
            })
        );
    }

    #[test]
    fn usage_documents_every_disk_key() {
        for key in [
            "count=",
            "path=",
            "dir=",
            "backend=null",
            "size=",
            "latency_us=",
            "readonly=",
            "direct=",
            "num_queues=",
            "queue_size=",
            "msix_vectors=",
            "intx=",
        ] {
            assert!(USAGE.contains(key), "{key}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["--kernel", "/k", "-V"]), Ok(Command::Version));
    }

    fn nvmes_of(args: &[&str]) -> Vec<NvmeConfig> {
        let mut line = vec!["--kernel", "/k"];
        line.extend_from_slice(args);
        run(&line).nvmes
    }

    #[test]
    fn controllers_expand_into_members_of_one_subsystem_each() {
        let nvmes = nvmes_of(&[
            "--nvme",
            "backend=null,size=1G,controllers=2",
            "--nvme",
            "backend=null,size=1G",
            "--nvmes",
            "count=2,backend=null,size=1G,controllers=3",
        ]);
        let members: Vec<Option<(usize, u16, u16)>> = nvmes
            .iter()
            .map(|nvme| nvme.subsystem.map(|m| (m.id, m.controller, m.controllers)))
            .collect();
        assert_eq!(
            members,
            [
                Some((0, 0, 2)),
                Some((0, 1, 2)),
                None,
                Some((1, 0, 3)),
                Some((1, 1, 3)),
                Some((1, 2, 3)),
                Some((2, 0, 3)),
                Some((2, 1, 3)),
                Some((2, 2, 3)),
            ]
        );
        let mut line = vec![
            "--kernel",
            "/k",
            "--nvme",
            "backend=null,size=1G,controllers=17",
        ];
        assert!(parse(&line).is_err(), "at most 16 controllers");
        line[3] = "path=/img,controllers=0";
        assert!(parse(&line).is_err());
        for anatt in [
            "backend=null,size=1G,anatt=0",
            "backend=null,size=1G,anatt=256",
        ] {
            line[3] = anatt;
            assert!(parse(&line).is_err(), "{anatt}");
        }
        let short = nvmes_of(&["--nvme", "backend=null,size=1G,controllers=2,anatt=2"]);
        assert!(short.iter().all(|nvme| nvme.ana_transition_time_secs == 2));
        for ana_groups in [
            "backend=null,size=1G,namespaces=4,ana_groups=2",
            "backend=null,size=1G,namespaces=4,controllers=2,ana_groups=5",
            "backend=null,size=1G,namespaces=4,controllers=2,ana_groups=0",
        ] {
            line[3] = ana_groups;
            assert!(parse(&line).is_err(), "{ana_groups}");
        }
        let grouped = nvmes_of(&[
            "--nvme",
            "backend=null,size=1G,namespaces=4,controllers=2,ana_groups=2",
        ]);
        assert_eq!(grouped.len(), 2);
        assert!(grouped.iter().all(|nvme| nvme.ana_groups == Some(2)));
        let too_many = format!("count={MAX_DISKS},backend=null,size=1G,controllers=2");
        assert!(matches!(
            parse(&["--kernel", "/k", "--nvmes", &too_many]),
            Err(ConfigError::TooManyDisks { .. })
        ));
    }

    #[test]
    fn nvme_controllers_with_defaults_and_every_key() {
        let nvmes = nvmes_of(&[
            "--nvme",
            "backend=null,size=1G",
            "--nvme",
            "path=/img,direct=on,readonly,max_ioqpairs=32,queue_size=64,msix_vectors=5,mdts=0,serial=SN-1",
            "--nvme=backend=null,size=64M,namespaces=4,latency_us=100",
        ]);
        assert_eq!(nvmes.len(), 3);
        assert_eq!(
            nvmes[0],
            NvmeConfig {
                backend: DiskBackendConfig::Null {
                    size_bytes: 1 << 30,
                    latency_us: 0
                },
                read_only: false,
                namespaces: 1,
                max_io_queue_pairs: 8,
                queue_size: 1024,
                msix_vectors: 9,
                mdts: 7,
                serial: None,
                faults: None,
                controllers: 1,
                ana_transition_time_secs: 10,
                ana_groups: None,
                subsystem: None,
            }
        );
        assert_eq!(
            nvmes[1].backend,
            DiskBackendConfig::File {
                path: "/img".into(),
                direct: true
            }
        );
        assert!(nvmes[1].read_only);
        assert_eq!(
            (
                nvmes[1].max_io_queue_pairs,
                nvmes[1].queue_size,
                nvmes[1].msix_vectors,
                nvmes[1].mdts
            ),
            (32, 64, 5, 0)
        );
        assert_eq!(nvmes[1].serial.as_deref(), Some("SN-1"));
        assert_eq!(nvmes[2].namespaces, 4);
        // Controllers and virtio disks are counted apart.
        assert!(disks_of(&["--nvme", "backend=null,size=1G"]).is_empty());
    }

    #[test]
    fn nvme_groups_expand_like_disk_groups() {
        let nvmes = nvmes_of(&["--nvmes", "count=3,path=/images/n%d.raw,max_ioqpairs=2"]);
        let paths: Vec<_> = nvmes
            .iter()
            .map(|n| match &n.backend {
                DiskBackendConfig::File { path, .. } => path.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            ["/images/n0.raw", "/images/n1.raw", "/images/n2.raw"].map(std::path::PathBuf::from)
        );
        assert!(nvmes
            .iter()
            .all(|n| n.max_io_queue_pairs == 2 && n.msix_vectors == 3));
        assert_eq!(
            nvmes_of(&["--nvmes", "count=100,backend=null,size=1G"]).len(),
            100
        );
    }

    #[test]
    fn bad_nvme_options_are_refused_with_the_reason() {
        for (args, expected) in [
            (
                &["--nvme", "backend=null,size=1G,num_queues=2"][..],
                "unknown key \"num_queues\"",
            ),
            (
                &["--nvme", "backend=null,size=1G,intx=on"],
                "unknown key \"intx\"",
            ),
            (
                &["--disk", "backend=null,size=1G,namespaces=2"],
                "unknown key \"namespaces\"",
            ),
            (
                &["--nvme", "backend=null,size=1G,max_ioqpairs=0"],
                "max_ioqpairs=\"0\"",
            ),
            (
                &["--nvme", "backend=null,size=1G,max_ioqpairs=1025"],
                "max_ioqpairs",
            ),
            (
                &["--nvme", "backend=null,size=1G,queue_size=1"],
                "queue_size",
            ),
            (
                &["--nvme", "backend=null,size=1G,queue_size=65537"],
                "queue_size",
            ),
            (&["--nvme", "backend=null,size=1G,mdts=16"], "mdts"),
            (
                &["--nvme", "backend=null,size=1G,namespaces=0"],
                "namespaces",
            ),
            (
                &[
                    "--nvme",
                    "backend=null,size=1G,serial=a-serial-much-too-long",
                ],
                "serial",
            ),
            (
                &["--nvme", "backend=null,size=1G,serial=with space"],
                "serial",
            ),
            (
                &["--nvme", "backend=null,size=1G,msix_vectors=0"],
                "msix_vectors=\"0\" is not valid: expected 1..=2048",
            ),
            (
                &["--nvme", "path=/img,namespaces=2"],
                "several need backend=null",
            ),
            (&["--nvme", "backend=null"], "needs size="),
            (&["--nvmes", "backend=null,size=1G"], "count=N"),
            (&["--nvmes", "count=2,path=/no-placeholder.img"], "one %d"),
        ] {
            let error = error_of(args);
            assert!(error.contains(expected), "{args:?}: {error}");
            assert!(error.starts_with(args[0]), "{args:?}: {error}");
        }
    }
}
