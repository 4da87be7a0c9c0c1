//! Where the harness finds the repository, the artifact cache, the blkswarm binary
//! and QEMU.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// Repository and cache locations.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The workspace root (`tests/..`).
    pub repo: PathBuf,
    /// `${BLKSWARM_CACHE:-<repo>/.cache}`.
    pub cache: PathBuf,
}

impl Paths {
    pub fn from_env() -> Paths {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let repo = repo.canonicalize().unwrap_or(repo);
        let cache = match std::env::var_os("BLKSWARM_CACHE") {
            Some(c) if !c.is_empty() => PathBuf::from(c),
            _ => repo.join(".cache"),
        };
        Paths { repo, cache }
    }

    /// The L2 guest kernel (also the L1 lab kernel).
    pub fn guest_kernel(&self) -> PathBuf {
        self.cache.join("guest/vmlinuz")
    }

    pub fn guest_initramfs(&self) -> PathBuf {
        self.cache.join("guest/initramfs.cpio.gz")
    }

    pub fn kernel_version_file(&self) -> PathBuf {
        self.cache.join("guest/kernel-version")
    }

    /// The L1 initramfs without payload.
    pub fn lab_base(&self) -> PathBuf {
        self.cache.join("lab/l1-base.cpio.gz")
    }

    /// The guest kernel version recorded by guests/build.sh, if present.
    pub fn kernel_version(&self) -> Option<String> {
        std::fs::read_to_string(self.kernel_version_file())
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Checks that the artifacts of guests/build.sh are present.
    pub fn require_artifacts(&self, lab: bool) -> Result<(), HarnessError> {
        let mut want = vec![
            ("guest kernel", self.guest_kernel()),
            ("guest initramfs", self.guest_initramfs()),
        ];
        if lab {
            want.push(("lab L1 initramfs", self.lab_base()));
        }
        let missing: Vec<String> = want
            .iter()
            .filter(|(_, p)| !p.is_file())
            .map(|(what, p)| format!("{what} {}", p.display()))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(HarnessError::MissingArtifact(format!(
                "missing {}: run `bash guests/build.sh` (as root) in {} first",
                missing.join(", "),
                self.repo.display()
            )))
        }
    }

    /// `$BLKSWARM_BIN`, else `<repo>/target/release/blkswarm`.
    pub fn vmm_bin(&self) -> Result<PathBuf, HarnessError> {
        let (bin, from_env) = match std::env::var_os("BLKSWARM_BIN") {
            Some(b) if !b.is_empty() => (PathBuf::from(b), true),
            _ => (self.repo.join("target/release/blkswarm"), false),
        };
        if bin.is_file() {
            if !from_env {
                if let Some(newer) = self.newer_source(&bin) {
                    eprintln!(
                        "harness: warning: {} is older than {}: run `cargo build --release -p blkswarm`",
                        bin.display(),
                        newer.display()
                    );
                }
            }
            return Ok(bin);
        }
        Err(HarnessError::MissingArtifact(if from_env {
            format!(
                "BLKSWARM_BIN={} does not exist; unset it or point it at a blkswarm binary",
                bin.display()
            )
        } else {
            format!(
                "the blkswarm binary {} does not exist: run `cargo build --release -p blkswarm` first",
                bin.display()
            )
        }))
    }
}

impl Paths {
    /// A VMM source file (vmm/, devices/, irq/) modified after `bin`, if any.
    fn newer_source(&self, bin: &Path) -> Option<PathBuf> {
        let built = bin.metadata().and_then(|m| m.modified()).ok()?;
        let mut stack: Vec<PathBuf> = ["vmm", "devices", "irq"]
            .iter()
            .map(|d| self.repo.join(d))
            .collect();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(path);
                } else if (path.extension().is_some_and(|e| e == "rs")
                    || path.file_name().is_some_and(|n| n == "Cargo.toml"))
                    && meta.modified().is_ok_and(|m| m > built)
                {
                    return Some(path);
                }
            }
        }
        None
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `$BLKSWARM_QEMU`, else `qemu-system-x86_64` on PATH; Err says why not.
pub fn find_qemu() -> Result<PathBuf, String> {
    if let Some(q) = std::env::var_os("BLKSWARM_QEMU").filter(|q| !q.is_empty()) {
        let q = PathBuf::from(q);
        return if is_executable(&q) {
            Ok(q)
        } else {
            Err(format!(
                "BLKSWARM_QEMU={} is not an executable file",
                q.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            "qemu-system-x86_64 is not on PATH and BLKSWARM_QEMU is unset \
             (`bash guests/build.sh` installs QEMU 10 from bookworm-backports)"
                .to_string()
        })
}
