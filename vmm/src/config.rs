//! Command line of the `blkswarm` binary, in Cloud Hypervisor's idiom: `--cpus boot=2,max=8`,
//! `--memory size=1G`, one option per concern, each taking a `key=value` list.

use std::path::PathBuf;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub backend: DiskBackendConfig,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: CpuConfig,
    pub memory_bytes: u64,
    pub disks: Vec<DiskConfig>,
    /// I/O worker threads; None: one per host CPU.
    pub io_threads: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(VmConfig),
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
    #[error("--memory: {0} bytes would overlap the PCI MMIO window; the maximum is {max}", max = crate::layout::MAX_RAM_BYTES)]
    MemoryTooLarge(u64),
}

pub const USAGE: &str = "\
usage: blkswarm --kernel BZIMAGE [--initramfs CPIO] [--cmdline STR]
                [--cpus boot=N[,max=M]] [--memory size=SIZE]

  --kernel PATH          bzImage to boot directly (no firmware)
  --initramfs PATH       initramfs handed to the kernel
  --cmdline STR          kernel command line
  --cpus boot=N,max=M    N vCPUs online at boot, M possible (default boot=1, max=boot)
  --memory size=SIZE     guest RAM, e.g. 512M or 2G (default 512M)
  --disk path=IMG[,readonly=on][,direct=on][,num_queues=N][,queue_size=N]
  --disk backend=null,size=SIZE[,latency_us=N][,num_queues=N][,queue_size=N]
                         a virtio-blk PCI disk; repeatable
  --io-threads N         I/O worker threads serving every queue (default: host CPUs)

The guest's serial console (COM1) is stdout. VMM messages go to stderr; machine-readable
ones start with '@@vmm '. Exit status: 0 guest powered off, 1 VMM error, 2 guest reset,
3 guest fault (triple fault, KVM internal error, failed entry).
";

pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ConfigError> {
    let mut kernel = None;
    let mut initramfs = None;
    let mut cmdline = String::new();
    let mut cpus = None;
    let mut memory_bytes = DEFAULT_MEMORY_BYTES;
    let mut disks = Vec::new();
    let mut io_threads = None;

    let mut args = args.into_iter();
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
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initramfs" => initramfs = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = value()?,
            "--cpus" => cpus = Some(parse_cpus(&value()?)?),
            "--memory" => memory_bytes = parse_memory(&value()?)?,
            "--disk" => disks.push(parse_disk(&value()?)?),
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
        io_threads,
    }))
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

fn parse_disk(list: &str) -> Result<DiskConfig, ConfigError> {
    const OPT: &str = "--disk";
    let mut path = None;
    let mut backend = None;
    let mut size = None;
    let mut latency_us = 0;
    let mut direct = false;
    let mut read_only = false;
    let mut num_queues = DEFAULT_NUM_QUEUES;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    for (key, value) in key_values(list) {
        let number = |max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| bad_value(OPT, key, value, format!("expected 0..={max}")))
        };
        match key {
            "path" => path = Some(PathBuf::from(value)),
            "backend" => backend = Some(value.to_string()),
            "size" => {
                size = Some(
                    parse_size(value)
                        .ok_or_else(|| bad_value(OPT, key, value, "expected a size like 1G"))?,
                )
            }
            "latency_us" => latency_us = number(60_000_000)?,
            "direct" => direct = on_off(OPT, key, value)?,
            "readonly" => read_only = on_off(OPT, key, value)?,
            "num_queues" => {
                num_queues = number(u64::from(MAX_NUM_QUEUES))? as u16;
                if num_queues == 0 {
                    return Err(bad_value(OPT, key, value, "a disk needs a queue"));
                }
            }
            "queue_size" => {
                queue_size = number(u64::from(MAX_QUEUE_SIZE))? as u16;
                if !queue_size.is_power_of_two() {
                    return Err(bad_value(OPT, key, value, "expected a power of two"));
                }
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    option: OPT.into(),
                    key: key.into(),
                })
            }
        }
    }
    let backend = match (backend.as_deref(), path) {
        (None | Some("file"), Some(path)) => {
            if size.is_some() || latency_us != 0 {
                return Err(bad_value(
                    OPT,
                    "path",
                    &path.display().to_string(),
                    "size= and latency_us= belong to backend=null",
                ));
            }
            DiskBackendConfig::File { path, direct }
        }
        (Some("null"), None) => {
            let size_bytes =
                size.ok_or_else(|| bad_value(OPT, "size", "", "backend=null needs size="))?;
            if size_bytes == 0 || size_bytes % 512 != 0 {
                return Err(bad_value(
                    OPT,
                    "size",
                    &size_bytes.to_string(),
                    "expected a non-zero multiple of 512",
                ));
            }
            DiskBackendConfig::Null {
                size_bytes,
                latency_us,
            }
        }
        (Some(other), _) if other != "null" && other != "file" => {
            return Err(bad_value(OPT, "backend", other, "expected file or null"))
        }
        _ => {
            return Err(bad_value(
                OPT,
                "path",
                list,
                "give path=IMG (file) or backend=null,size=SIZE",
            ))
        }
    };
    Ok(DiskConfig {
        backend,
        read_only,
        num_queues,
        queue_size,
    })
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
        assert_eq!(config.initramfs, Some(PathBuf::from("/i")));
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.cpus, CpuConfig { boot: 2, max: 8 });
        assert_eq!(config.memory_bytes, 1 << 30);
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
                },
                DiskConfig {
                    backend: DiskBackendConfig::Null {
                        size_bytes: 1 << 30,
                        latency_us: 100
                    },
                    read_only: false,
                    num_queues: DEFAULT_NUM_QUEUES,
                    queue_size: DEFAULT_QUEUE_SIZE,
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
        ] {
            assert!(parse(&["--kernel", "/k", "--disk", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["--kernel", "/k", "--io-threads", "0"]).is_err());
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
}
