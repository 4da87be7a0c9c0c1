//! A user's own guest kernel: a bzImage or a kernel build tree, the modules that go with
//! it, and its configuration checked up front against what the test guest needs
//! (docs/own-kernel.md). Everything wrong is said before any guest boots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules the test guest loads at boot when they are not built in, in this order
/// (`GUEST_MODULES` in guests/build.sh, plus virtio_pci, which Debian's kernel has built
/// in and a user's may not).
pub const BOOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "nvme"];
/// Loaded only by the scenarios that mount a filesystem (`GUEST_ONDEMAND_MODULES`).
pub const ONDEMAND_MODULES: &[&str] = &["ext4"];

/// A kernel `.config`: option name (without `CONFIG_`) to value (`y`, `m`, a string);
/// options that are `not set` are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig(BTreeMap<String, String>);

impl KernelConfig {
    pub fn parse(text: &str) -> KernelConfig {
        let options = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("CONFIG_"))
            .filter_map(|l| l.split_once('='))
            .filter(|(_, v)| *v != "n")
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        KernelConfig(options)
    }

    pub fn get(&self, option: &str) -> Option<&str> {
        self.0.get(option).map(String::as_str)
    }
}

/// What the guest will be asked to do, as far as the kernel's config is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNeeds {
    pub virtio_blk: bool,
    pub nvme: bool,
    pub max_cpus: u32,
}

/// Each option the guest needs that `config` lacks, as `CONFIG_X (why; have: v)`.
/// Drivers may be modules (`m`); the rest must be built in.
pub fn missing_options(config: &KernelConfig, needs: GuestNeeds) -> Vec<String> {
    let mut want: Vec<(&str, bool, &str)> = vec![
        ("64BIT", false, "blkswarm boots a 64-bit kernel"),
        (
            "ACPI",
            false,
            "PCI host bridges, vCPUs and power-off are described in ACPI",
        ),
        ("PCI", false, "every disk is a PCI function"),
        (
            "PCI_MSI",
            false,
            "every disk's queues interrupt through MSI-X",
        ),
        ("SERIAL_8250", false, "the console is a 16550 UART"),
        ("SERIAL_8250_CONSOLE", false, "console=ttyS0"),
        (
            "BLK_DEV_INITRD",
            false,
            "the guest's userland is an initramfs",
        ),
        ("RD_GZIP", false, "the initramfs is gzip'd"),
        (
            "DEVTMPFS",
            false,
            "/init mounts devtmpfs for /dev/vd* and /dev/nvme*",
        ),
        ("PROC_FS", false, "/init reads /proc"),
        ("SYSFS", false, "/init finds disks in /sys/block"),
        ("BINFMT_ELF", false, "busybox and fio are ELF programs"),
        ("BINFMT_SCRIPT", false, "/init is a shell script"),
        ("AIO", false, "fio's libaio engine"),
        (
            "SYSVIPC",
            false,
            "fio keeps its jobs' state in System V shared memory",
        ),
        (
            "VIRTIO_PCI",
            true,
            "virtio-blk disks are virtio PCI functions",
        ),
    ];
    if needs.virtio_blk {
        want.push(("VIRTIO_BLK", true, "the guest has virtio-blk disks"));
    }
    if needs.nvme {
        want.push(("BLK_DEV_NVME", true, "the guest has NVMe controllers"));
    }
    if needs.max_cpus > 1 {
        want.push(("SMP", false, "the guest has more than one vCPU"));
    }
    let mut missing = Vec::new();
    let mut modules_needed = false;
    for (option, may_be_module, why) in want {
        match config.get(option) {
            Some("y") => {}
            Some("m") if may_be_module => modules_needed = true,
            other => missing.push(format!(
                "CONFIG_{option} ({why}; {})",
                other.map_or("not set".to_string(), |v| format!("is {v}, must be y"))
            )),
        }
    }
    if modules_needed && config.get("MODULES") != Some("y") {
        missing.push("CONFIG_MODULES (a driver the guest needs is a module)".to_string());
    }
    missing
}

/// The kernel release in a bzImage's setup header (`6.1.172-blkswarm-minimal`): the first
/// word of the string the header's `kernel_version` field points to (boot protocol 2.00+).
pub fn bzimage_release(image: &[u8]) -> Result<String, String> {
    let le16 = |at: usize| {
        image
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if le16(0x1fe) != Some(0xaa55) || image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no boot sector signature or `HdrS` setup header)".into());
    }
    let offset = match le16(0x20e) {
        Some(0) | None => return Err("the bzImage's header names no kernel version".into()),
        Some(o) => 0x200 + o as usize,
    };
    let text = image
        .get(offset..)
        .ok_or("the bzImage's kernel version offset is past its end")?;
    let end = text
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(text.len())
        .min(256);
    let version = String::from_utf8_lossy(&text[..end]);
    version
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "the bzImage's kernel version string is empty".into())
}

/// A kernel to boot, resolved from what the user named.
#[derive(Debug, Clone)]
pub struct UserKernel {
    pub bzimage: PathBuf,
    pub release: String,
    /// The build tree, when a tree was named.
    pub tree: Option<PathBuf>,
    /// The config and where it came from (the tree's `.config`, or `config-RELEASE`
    /// beside a bzImage).
    pub config: Option<(PathBuf, KernelConfig)>,
}

impl UserKernel {
    /// `path` is a bzImage or a kernel build tree (its `arch/x86/boot/bzImage`).
    pub fn open(path: &Path) -> Result<UserKernel, String> {
        let (bzimage, tree) = if path.is_dir() {
            let image = path.join("arch/x86/boot/bzImage");
            if !image.is_file() {
                let what = if path.join("Makefile").is_file() && path.join("Kconfig").is_file() {
                    "is a kernel tree that has not been built (run `make bzImage` in it)"
                } else {
                    "is neither a bzImage nor a kernel build tree"
                };
                return Err(format!(
                    "--kernel {}: {what}: there is no {}",
                    path.display(),
                    image.display()
                ));
            }
            (image, Some(path.to_path_buf()))
        } else if path.is_file() {
            (path.to_path_buf(), None)
        } else {
            return Err(format!(
                "--kernel {}: no such file or directory",
                path.display()
            ));
        };
        let data =
            std::fs::read(&bzimage).map_err(|e| format!("--kernel {}: {e}", bzimage.display()))?;
        let release =
            bzimage_release(&data).map_err(|e| format!("--kernel {}: {e}", bzimage.display()))?;
        let config_file = match &tree {
            Some(t) => Some(t.join(".config")),
            None => bzimage
                .parent()
                .map(|d| d.join(format!("config-{release}"))),
        };
        let config = match config_file {
            Some(f) if f.is_file() => {
                let text =
                    std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
                Some((f, KernelConfig::parse(&text)))
            }
            _ => None,
        };
        Ok(UserKernel {
            bzimage,
            release,
            tree,
            config,
        })
    }

    /// Errs naming every option the guest needs that the config lacks. Without a config
    /// (a bare bzImage with no `config-RELEASE` beside it) there is nothing to check: Ok
    /// with a warning for the caller to print.
    pub fn check_config(&self, needs: GuestNeeds) -> Result<Option<String>, String> {
        let Some((file, config)) = &self.config else {
            return Ok(Some(format!(
                "no config for {} (looked for config-{} beside it): options not checked",
                self.bzimage.display(),
                self.release
            )));
        };
        let missing = missing_options(config, needs);
        if missing.is_empty() {
            return Ok(None);
        }
        Err(format!(
            "kernel {} ({}) lacks what the test guest needs:\n  {}",
            self.release,
            file.display(),
            missing.join("\n  ")
        ))
    }

    /// Whether `module` is built as a module (`m`) in the config, when there is one.
    fn is_module(&self, option: &str) -> Option<bool> {
        self.config
            .as_ref()
            .map(|(_, c)| c.get(option) == Some("m"))
    }
}

/// The Kconfig option of each module the guest may load.
fn module_option(module: &str) -> Option<&'static str> {
    match module {
        "virtio_pci" => Some("VIRTIO_PCI"),
        "virtio_blk" => Some("VIRTIO_BLK"),
        "nvme" => Some("BLK_DEV_NVME"),
        "ext4" => Some("EXT4_FS"),
        _ => None,
    }
}

/// A module directory: `root/lib/modules/RELEASE` (modprobe's `-d root -S RELEASE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleDir {
    pub root: PathBuf,
    pub release: String,
}

impl ModuleDir {
    pub fn dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Finds the modules for `release` in what the user named with `--modules`: an
/// INSTALL_MOD_PATH root (with `lib/modules/RELEASE`), a `lib/modules` directory, or the
/// release directory itself. Errs when they belong to another kernel.
pub fn find_modules(named: &Path, release: &str, links: &Path) -> Result<ModuleDir, String> {
    let releases_in = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let other = |have: &[String]| {
        format!(
            "--modules {}: modules of another kernel ({}); the kernel is {release}",
            named.display(),
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        )
    };
    if !named.is_dir() {
        return Err(format!("--modules {}: not a directory", named.display()));
    }
    for lib_modules in [named.join("lib/modules"), named.to_path_buf()] {
        if lib_modules.join(release).is_dir() {
            let root = if lib_modules.ends_with("lib/modules") {
                lib_modules
                    .parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
            } else {
                None
            };
            // A `lib/modules` not under a `lib`: link it where modprobe looks.
            let root = match root {
                Some(r) => r,
                None => link_release_dir(&lib_modules.join(release), release, links)?,
            };
            return Ok(ModuleDir {
                root,
                release: release.to_string(),
            });
        }
        if lib_modules.ends_with("lib/modules") && lib_modules.is_dir() {
            return Err(other(&releases_in(&lib_modules)));
        }
    }
    // The release directory itself (has modules.order / modules.dep / kernel/).
    let looks_like_release_dir = ["modules.order", "modules.dep", "modules.builtin", "kernel"]
        .iter()
        .any(|f| named.join(f).exists());
    if looks_like_release_dir {
        let name = named
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name != release {
            return Err(other(&[name]));
        }
        let root = link_release_dir(named, release, links)?;
        return Ok(ModuleDir {
            root,
            release: release.to_string(),
        });
    }
    Err(format!(
        "--modules {}: no lib/modules/{release} in it, and it is not a module directory \
         (no modules.order, modules.dep or kernel/)",
        named.display()
    ))
}

/// `links/lib/modules/RELEASE -> dir`, so modprobe finds `dir` with `-d links`.
fn link_release_dir(dir: &Path, release: &str, links: &Path) -> Result<PathBuf, String> {
    let parent = links.join("lib/modules");
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let link = parent.join(release);
    let _ = std::fs::remove_file(&link);
    let target = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    std::os::unix::fs::symlink(&target, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    Ok(links.to_path_buf())
}

/// `make modules_install` of the tree into `dest` (skipped when the tree's modules did
/// not change since the last install there). None when the tree has no modules built.
/// Runners started at once (tests run in parallel) take turns on a lock beside `dest`,
/// and an install goes to a temporary directory moved into place when complete, so no
/// one reads a half-installed or half-removed directory.
pub fn install_tree_modules(kernel: &UserKernel, dest: &Path) -> Result<Option<ModuleDir>, String> {
    let Some(tree) = &kernel.tree else {
        return Ok(None);
    };
    let order = tree.join("modules.order");
    let built = std::fs::read_to_string(&order).unwrap_or_default();
    if built.trim().is_empty() {
        return Ok(None);
    }
    let dir = ModuleDir {
        root: dest.to_path_buf(),
        release: kernel.release.clone(),
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let lock_path = parent.join(".modules-install.lock");
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; the lock goes with the file.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "locking {}: {}",
                lock_path.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
    let stamp_file = dest.join(".installed-from");
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .map(|t| format!("{t:?}"))
            .unwrap_or_default()
    };
    let want = format!(
        "{}\n{}\n{}\n",
        tree.display(),
        stamp(&order),
        stamp(&kernel.bzimage)
    );
    if dir.dir().join("modules.dep").is_file()
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(want.as_str())
    {
        return Ok(Some(dir));
    }
    let staging = parent.join(".modules-install.tmp");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(tree)
        .arg("modules_install")
        .arg(format!("INSTALL_MOD_PATH={}", staging.display()))
        .arg("INSTALL_MOD_STRIP=1")
        .output()
        .map_err(|e| format!("make modules_install in {}: {e}", tree.display()))?;
    if !out.status.success() {
        return Err(format!(
            "make modules_install in {} failed ({}):\n{}",
            tree.display(),
            out.status,
            crate::tail(&String::from_utf8_lossy(&out.stderr), 20)
        ));
    }
    let installed = staging.join("lib/modules").join(&kernel.release);
    if !installed.is_dir() {
        return Err(format!(
            "make modules_install in {} made no {}: is {} the tree's release?",
            tree.display(),
            installed.display(),
            kernel.release
        ));
    }
    let staged_stamp = staging.join(".installed-from");
    std::fs::write(&staged_stamp, want).map_err(|e| format!("{}: {e}", staged_stamp.display()))?;
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&staging, dest)
        .map_err(|e| format!("{} -> {}: {e}", staging.display(), dest.display()))?;
    drop(lock);
    Ok(Some(dir))
}

/// The files (in load order, dependencies first) that load `module` from `dir`, or an
/// empty list when it is built in. Errs when it is neither.
pub fn module_files(dir: &ModuleDir, module: &str) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(&dir.root)
        .arg("-S")
        .arg(&dir.release)
        .arg("--show-depends")
        .arg(module)
        .output()
        .map_err(|e| format!("modprobe (from kmod): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "module {module} is not in {} and not built in: {}",
            dir.dir().display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("insmod "))
        .filter_map(|l| l.split_whitespace().next())
        .map(PathBuf::from)
        .collect())
}

/// The release a module was built for (the first word of its vermagic).
pub fn module_release(file: &Path) -> Result<String, String> {
    let out = Command::new("modinfo")
        .arg("-F")
        .arg("vermagic")
        .arg(file)
        .output()
        .map_err(|e| format!("modinfo (from kmod): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(r) if out.status.success() => Ok(r.to_string()),
        _ => Err(format!(
            "{}: no vermagic ({})",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Modules as `(name, file)` in load order.
pub type ModuleList = Vec<(String, PathBuf)>;

/// The guest's modules for `kernel`: (boot list, on-demand list). A module the config says
/// is built in, or that modprobe reports built in, needs no file. Errs on a module of
/// another version, and on a driver the guest needs that is a module with no file to load.
pub fn guest_modules(
    kernel: &UserKernel,
    dir: Option<&ModuleDir>,
    needs: GuestNeeds,
) -> Result<(ModuleList, ModuleList), String> {
    let needed = |m: &str| match m {
        "virtio_blk" | "virtio_pci" => needs.virtio_blk,
        "nvme" => needs.nvme,
        _ => false,
    };
    let mut lists = (Vec::new(), Vec::new());
    for (modules, ondemand) in [(BOOT_MODULES, false), (ONDEMAND_MODULES, true)] {
        for &m in modules {
            let as_module = module_option(m).and_then(|o| kernel.is_module(o));
            let files = match dir {
                Some(dir) => match module_files(dir, m) {
                    Ok(f) => f,
                    Err(e) if as_module == Some(true) && needed(m) => return Err(e),
                    Err(_) => Vec::new(),
                },
                None if as_module == Some(true) && needed(m) => {
                    return Err(format!(
                        "the kernel builds {m} as a module (CONFIG_{}=m), but there are no \
                         modules: build them (`make modules` in the tree) or name them \
                         with --modules DIR",
                        module_option(m).unwrap_or("?")
                    ))
                }
                None => Vec::new(),
            };
            for file in files {
                let built_for = module_release(&file)?;
                if built_for != kernel.release {
                    return Err(format!(
                        "module {} is built for {built_for}, the kernel is {}: modules of \
                         another version",
                        file.display(),
                        kernel.release
                    ));
                }
                let name = module_name(&file);
                if lists_contain(&lists.0, &name) || lists_contain(&lists.1, &name) {
                    continue;
                }
                if ondemand {
                    lists.1.push((name, file));
                } else {
                    lists.0.push((name, file));
                }
            }
        }
    }
    Ok(lists)
}

fn lists_contain(list: &ModuleList, name: &str) -> bool {
    list.iter().any(|(n, _)| n == name)
}

/// `nvme-core` for `.../nvme-core.ko.xz`.
pub fn module_name(file: &Path) -> String {
    let base = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base = ["xz", "zst", "gz"].iter().fold(base, |b, ext| {
        b.strip_suffix(&format!(".{ext}"))
            .map_or(b.clone(), str::to_string)
    });
    base.strip_suffix(".ko").unwrap_or(&base).to_string()
}

/// A module file's contents, decompressed (busybox insmod loads plain `.ko` only).
pub fn read_module(file: &Path) -> Result<Vec<u8>, String> {
    let name = file.to_string_lossy();
    let tool: Option<&[&str]> = if name.ends_with(".xz") {
        Some(&["xz", "-dc"])
    } else if name.ends_with(".zst") {
        Some(&["zstd", "-qdc"])
    } else if name.ends_with(".gz") {
        Some(&["gzip", "-dc"])
    } else {
        None
    };
    match tool {
        None => std::fs::read(file).map_err(|e| format!("{}: {e}", file.display())),
        Some(argv) => {
            let out = Command::new(argv[0])
                .args(&argv[1..])
                .arg(file)
                .output()
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if !out.status.success() {
                return Err(format!(
                    "{} {}: {}",
                    argv.join(" "),
                    file.display(),
                    out.status
                ));
            }
            Ok(out.stdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage_with(version: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 0x400 + version.len() + 1];
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x200u16.to_le_bytes());
        img[0x400..0x400 + version.len()].copy_from_slice(version);
        img
    }

    #[test]
    fn release_comes_from_the_setup_header() {
        let img = bzimage_with(b"6.1.172-blkswarm-minimal (root@x) #1 SMP");
        assert_eq!(bzimage_release(&img).unwrap(), "6.1.172-blkswarm-minimal");
        assert!(bzimage_release(b"not a kernel").is_err());
        let mut no_version = bzimage_with(b"x");
        no_version[0x20e..0x210].copy_from_slice(&[0, 0]);
        assert!(bzimage_release(&no_version)
            .unwrap_err()
            .contains("no kernel version"));
        let mut past_end = bzimage_with(b"x");
        past_end[0x20e..0x210].copy_from_slice(&0xfff0u16.to_le_bytes());
        assert!(bzimage_release(&past_end).is_err());
    }

    const GOOD: &str = "CONFIG_64BIT=y\nCONFIG_ACPI=y\nCONFIG_PCI=y\nCONFIG_PCI_MSI=y\n\
        CONFIG_SERIAL_8250=y\nCONFIG_SERIAL_8250_CONSOLE=y\nCONFIG_BLK_DEV_INITRD=y\n\
        CONFIG_RD_GZIP=y\nCONFIG_DEVTMPFS=y\nCONFIG_PROC_FS=y\nCONFIG_SYSFS=y\n\
        CONFIG_BINFMT_ELF=y\nCONFIG_BINFMT_SCRIPT=y\nCONFIG_AIO=y\nCONFIG_SYSVIPC=y\n\
        CONFIG_VIRTIO_PCI=y\n\
        CONFIG_VIRTIO_BLK=y\nCONFIG_BLK_DEV_NVME=m\nCONFIG_MODULES=y\nCONFIG_SMP=y\n\
        CONFIG_LOCALVERSION=\"-x\"\n";
    const ALL: GuestNeeds = GuestNeeds {
        virtio_blk: true,
        nvme: true,
        max_cpus: 2,
    };

    #[test]
    fn a_complete_config_passes() {
        assert_eq!(
            missing_options(&KernelConfig::parse(GOOD), ALL),
            Vec::<String>::new()
        );
        assert_eq!(KernelConfig::parse(GOOD).get("LOCALVERSION"), Some("-x"));
    }

    #[test]
    fn each_missing_option_is_named_with_its_reason() {
        let text = GOOD
            .replace("CONFIG_VIRTIO_PCI=y", "# CONFIG_VIRTIO_PCI is not set")
            .replace("CONFIG_SMP=y\n", "")
            .replace("CONFIG_ACPI=y", "CONFIG_ACPI=m");
        let missing = missing_options(&KernelConfig::parse(&text), ALL);
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(missing[0].starts_with("CONFIG_ACPI (") && missing[0].contains("is m, must be y"));
        assert!(missing
            .iter()
            .any(|m| m.starts_with("CONFIG_VIRTIO_PCI (") && m.contains("not set")));
        assert!(missing.iter().any(|m| m.starts_with("CONFIG_SMP (")));
        // One vCPU and no NVMe: neither SMP nor the NVMe driver is asked for.
        let few = GuestNeeds {
            virtio_blk: true,
            nvme: false,
            max_cpus: 1,
        };
        let text = GOOD
            .replace("CONFIG_SMP=y\n", "")
            .replace("CONFIG_BLK_DEV_NVME=m\n", "");
        assert!(missing_options(&KernelConfig::parse(&text), few).is_empty());
        // A driver as a module needs module support.
        let text = GOOD.replace("CONFIG_MODULES=y\n", "");
        let missing = missing_options(&KernelConfig::parse(&text), ALL);
        assert!(
            missing == ["CONFIG_MODULES (a driver the guest needs is a module)"],
            "{missing:?}"
        );
    }

    #[test]
    fn module_names_drop_the_compression_and_ko() {
        assert_eq!(module_name(Path::new("/x/nvme-core.ko.xz")), "nvme-core");
        assert_eq!(module_name(Path::new("virtio_blk.ko")), "virtio_blk");
        assert_eq!(module_name(Path::new("a/ext4.ko.zst")), "ext4");
    }

    #[test]
    fn the_module_lists_match_the_image_builder() {
        let build = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build.sh"),
        )
        .unwrap();
        let array = |name: &str| -> Vec<String> {
            let line = build
                .lines()
                .find(|l| l.starts_with(&format!("{name}=(")))
                .unwrap_or_else(|| panic!("{name} not in guests/build.sh"));
            line[name.len() + 2..line.find(')').unwrap()]
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let boot: Vec<&str> = BOOT_MODULES
            .iter()
            .copied()
            .filter(|m| *m != "virtio_pci")
            .collect();
        assert_eq!(array("GUEST_MODULES"), boot);
        assert_eq!(array("GUEST_ONDEMAND_MODULES"), ONDEMAND_MODULES);
    }

    #[test]
    fn a_tree_without_a_bzimage_is_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("blkswarm-uk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = UserKernel::open(&dir).unwrap_err();
        assert!(
            e.contains("neither a bzImage nor a kernel build tree"),
            "{e}"
        );
        std::fs::write(dir.join("Makefile"), "").unwrap();
        std::fs::write(dir.join("Kconfig"), "").unwrap();
        let e = UserKernel::open(&dir).unwrap_err();
        assert!(e.contains("has not been built"), "{e}");
        // A built tree: the release from the bzImage, the config from .config.
        std::fs::create_dir_all(dir.join("arch/x86/boot")).unwrap();
        std::fs::write(
            dir.join("arch/x86/boot/bzImage"),
            bzimage_with(b"6.1.9-t #1"),
        )
        .unwrap();
        std::fs::write(dir.join(".config"), GOOD.replace("CONFIG_AIO=y\n", "")).unwrap();
        let k = UserKernel::open(&dir).unwrap();
        assert_eq!(k.release, "6.1.9-t");
        let e = k.check_config(ALL).unwrap_err();
        assert!(
            e.contains("CONFIG_AIO (fio's libaio engine; not set)"),
            "{e}"
        );
        // Modules of another release.
        let mods = dir.join("mods/lib/modules/6.12.1");
        std::fs::create_dir_all(&mods).unwrap();
        let e = find_modules(&dir.join("mods"), "6.1.9-t", &dir.join("links")).unwrap_err();
        assert!(e.contains("modules of another kernel (6.12.1)"), "{e}");
        let e = find_modules(&mods, "6.1.9-t", &dir.join("links"));
        assert!(e.is_err());
        std::fs::write(mods.join("modules.order"), "").unwrap();
        let e = find_modules(&mods, "6.1.9-t", &dir.join("links")).unwrap_err();
        assert!(e.contains("another kernel (6.12.1)"), "{e}");
        let good = dir.join("mods/lib/modules/6.1.9-t");
        std::fs::create_dir_all(&good).unwrap();
        let found = find_modules(&dir.join("mods"), "6.1.9-t", &dir.join("links")).unwrap();
        assert_eq!(found.dir(), good);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
