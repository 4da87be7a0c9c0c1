//! A guest image made for one run: a user's kernel, the files they copy in, the command
//! they run and the files they fetch back (docs/own-kernel.md).
//!
//! The initramfs is the cache's, followed by one more newc archive: the kernel unpacks the
//! archives in order into one rootfs, so a later file replaces an earlier one. For a user's
//! kernel the overlay carries its modules (`/lib/modules/NAME.ko`) and replaces the load
//! lists (`/etc/modules`, `/etc/modules.ondemand`) and `/etc/kernel-version`; busybox, fio,
//! nvme-cli and the init script stay as they are.

use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::NewcWriter;
use crate::user_kernel::{read_module, ModuleList, UserKernel};
use crate::{GuestImage, Paths};

/// The command the guest's `run` scenario runs (guests/guest-init.sh).
pub const RUN_SCRIPT: &str = "/etc/blkswarm/run";
/// The guest paths it sends back afterwards, one per line.
pub const FETCH_LIST: &str = "/etc/blkswarm/fetch";
/// Files bigger than this are not sent back: they go gzip'd and in base64 over the guest's
/// serial console, which in the lab carries only a few KB/s (each byte is an exit of the
/// nested guest); the guest reports them as `fetch_too_big`.
pub const FETCH_MAX_BYTES: u64 = 1 << 20;

/// A host file or directory copied into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    pub host: PathBuf,
    /// Absolute path in the guest.
    pub guest: String,
}

impl GuestFile {
    /// `HOST[:GUEST]`; GUEST defaults to `/root/<name>`, and one ending in `/` gets the
    /// host file's name appended.
    pub fn parse(s: &str) -> Result<GuestFile, String> {
        let (host, guest) = match s.split_once(':') {
            Some((h, g)) => (h, Some(g)),
            None => (s, None),
        };
        let host = PathBuf::from(host);
        let name = host
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("--guest-file {s:?}: the host path has no file name"))?;
        let guest = match guest {
            None | Some("") => format!("/root/{name}"),
            Some(g) if g.ends_with('/') => format!("{g}{name}"),
            Some(g) => g.to_string(),
        };
        if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
            return Err(format!(
                "--guest-file {s:?}: the guest path {guest:?} must be absolute, without `..`"
            ));
        }
        if !host.exists() {
            return Err(format!(
                "--guest-file {s:?}: {} does not exist",
                host.display()
            ));
        }
        Ok(GuestFile { host, guest })
    }
}

/// A user's kernel with the module files the guest loads.
#[derive(Debug, Clone)]
pub struct KernelWithModules {
    pub kernel: UserKernel,
    pub boot_modules: ModuleList,
    pub ondemand_modules: ModuleList,
}

/// What one run changes in the guest image.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    pub kernel: Option<KernelWithModules>,
    pub files: Vec<GuestFile>,
    /// Shell script text for [`RUN_SCRIPT`].
    pub run: Option<String>,
    pub fetch: Vec<String>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.kernel.is_none()
            && self.files.is_empty()
            && self.run.is_none()
            && self.fetch.is_empty()
    }

    /// Writes the overlay archive.
    pub fn write_archive<W: Write>(&self, out: W) -> Result<W, String> {
        let mut w = NewcWriter::new(out);
        let e = |what: &str| {
            let what = what.to_string();
            move |err: io::Error| format!("overlay {what}: {err}")
        };
        if let Some(k) = &self.kernel {
            let list =
                |l: &ModuleList| -> String { l.iter().map(|(n, _)| format!("{n}\n")).collect() };
            for (name, file) in k.boot_modules.iter().chain(&k.ondemand_modules) {
                let data = read_module(file)?;
                w.file(&format!("/lib/modules/{name}.ko"), 0o644, &data)
                    .map_err(e(name))?;
            }
            w.file("/etc/modules", 0o644, list(&k.boot_modules).as_bytes())
                .map_err(e("/etc/modules"))?;
            w.file(
                "/etc/modules.ondemand",
                0o644,
                list(&k.ondemand_modules).as_bytes(),
            )
            .map_err(e("/etc/modules.ondemand"))?;
            w.file(
                "/etc/kernel-version",
                0o644,
                format!("{}\n", k.kernel.release).as_bytes(),
            )
            .map_err(e("/etc/kernel-version"))?;
        }
        for f in &self.files {
            add_host_path(&mut w, &f.host, &f.guest)?;
        }
        if let Some(run) = &self.run {
            w.file(RUN_SCRIPT, 0o755, run.as_bytes())
                .map_err(e(RUN_SCRIPT))?;
        }
        if !self.fetch.is_empty() {
            let list: String = self.fetch.iter().map(|p| format!("{p}\n")).collect();
            w.file(FETCH_LIST, 0o644, list.as_bytes())
                .map_err(e(FETCH_LIST))?;
        }
        w.finish().map_err(e("trailer"))
    }

    /// Writes `dir/initramfs.cpio.gz` (the cache's image, zero padding to 4 bytes, the
    /// overlay) and returns the image to boot, labelled `label`.
    pub fn build(&self, paths: &Paths, label: &str, dir: &Path) -> Result<GuestImage, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let initramfs = dir.join("initramfs.cpio.gz");
        let base = paths.guest_initramfs();
        let mut base_file = std::fs::File::open(&base)
            .map_err(|e| format!("{}: {e} (run `bash guests/build.sh` first)", base.display()))?;
        let out = std::fs::File::create(&initramfs)
            .map_err(|e| format!("{}: {e}", initramfs.display()))?;
        let mut out = BufWriter::new(out);
        let len =
            io::copy(&mut base_file, &mut out).map_err(|e| format!("{}: {e}", base.display()))?;
        // The kernel looks for an uncompressed archive after another only at a 4-byte
        // aligned offset (guests/README.md, "Appending").
        out.write_all(&[0u8; 4][..((4 - len % 4) % 4) as usize])
            .map_err(|e| format!("{}: {e}", initramfs.display()))?;
        let mut out = self.write_archive(out)?;
        out.flush()
            .map_err(|e| format!("{}: {e}", initramfs.display()))?;
        let kernel = match &self.kernel {
            Some(k) => k.kernel.bzimage.clone(),
            None => paths.guest_kernel(),
        };
        Ok(GuestImage {
            label: label.to_string(),
            kernel,
            initramfs,
        })
    }
}

/// Adds a host file, or a directory's files recursively, at `guest`, keeping permissions.
fn add_host_path<W: Write>(w: &mut NewcWriter<W>, host: &Path, guest: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(host).map_err(|e| format!("{}: {e}", host.display()))?;
    let perm = meta.permissions().mode() & 0o777;
    if meta.is_dir() {
        w.dir(guest, perm).map_err(|e| format!("{guest}: {e}"))?;
        let mut entries: Vec<_> = std::fs::read_dir(host)
            .map_err(|e| format!("{}: {e}", host.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            add_host_path(
                w,
                &entry.path(),
                &format!("{}/{name}", guest.trim_end_matches('/')),
            )?;
        }
        Ok(())
    } else {
        w.file_from_path(guest, perm, host)
            .map_err(|e| format!("--guest-file {} -> {guest}: {e}", host.display()))
    }
}

/// One file the guest sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub path: String,
    /// The contents, checked against the size and sha256 the guest printed; Err says what
    /// did not match, or why the guest sent nothing.
    pub data: Result<Vec<u8>, String>,
}

/// The files in a guest's console: `@@fetch begin path=P`, `@@fetch data=BASE64` lines,
/// then `@@guest fetched=P size=N sha256=H encoding=gzip` (the data gzip'd, the size and
/// hash the file's) (or `@@guest fetch_missing=P`,
/// `@@guest fetch_too_big=P size=N`).
pub fn fetched_files(console: &str) -> Vec<Fetched> {
    let mut files = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in console.lines().map(str::trim) {
        if let Some(path) = line.strip_prefix("@@fetch begin path=") {
            current = Some((path.to_string(), String::new()));
        } else if let Some(data) = line.strip_prefix("@@fetch data=") {
            if let Some((_, text)) = current.as_mut() {
                text.push_str(data.trim());
            }
        } else if let Some(rest) = line.strip_prefix("@@guest fetched=") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let path = words.first().copied().unwrap_or_default().to_string();
            let field = |k: &str| {
                words
                    .iter()
                    .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            };
            let data = match current.take() {
                Some((p, text)) if p == path => decode_base64(&text)
                    .and_then(|bytes| {
                        if field("encoding") == Some("gzip") {
                            filter("gzip", &["-dc"], &bytes)
                        } else {
                            Ok(bytes)
                        }
                    })
                    .and_then(|bytes| {
                        let size = field("size").and_then(|s| s.parse::<usize>().ok());
                        if size != Some(bytes.len()) {
                            return Err(format!(
                                "got {} bytes, the guest sent {size:?}",
                                bytes.len()
                            ));
                        }
                        let want = field("sha256").unwrap_or_default();
                        let have = sha256_hex(&bytes)?;
                        if have != want {
                            return Err(format!("sha256 {have}, the guest's {want}"));
                        }
                        Ok(bytes)
                    }),
                _ => Err("no data lines before the guest's fetched line".to_string()),
            };
            files.push(Fetched { path, data });
        } else if let Some(rest) = line.strip_prefix("@@guest fetch_missing=") {
            files.push(Fetched {
                path: rest.trim().to_string(),
                data: Err("no such file in the guest".to_string()),
            });
        } else if let Some(rest) = line.strip_prefix("@@guest fetch_too_big=") {
            let path = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            files.push(Fetched {
                path,
                data: Err(format!("bigger than {FETCH_MAX_BYTES} bytes: {rest}")),
            });
        }
    }
    files
}

/// Standard base64 (with `=` padding), as busybox `base64` writes it.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "base64 length {} is not a multiple of 4",
            bytes.len()
        ));
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err("misplaced base64 padding".to_string());
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | value(c).ok_or_else(|| format!("not base64: {:?}", c as char))?;
        }
        n <<= 6 * pad as u32;
        out.extend_from_slice(&n.to_be_bytes()[1..4 - pad]);
    }
    Ok(out)
}

/// sha256 of `data` in hex, by coreutils' `sha256sum` (the harness has no hashing crate).
fn sha256_hex(data: &[u8]) -> Result<String, String> {
    let out = filter("sha256sum", &[], data)?;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// `data` through the host command `program args` (stdin to stdout).
fn filter(program: &str, args: &[&str], data: &[u8]) -> Result<Vec<u8>, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let mut out = Vec::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_end(&mut out)
        .map_err(|e| format!("{program}: {e}"))?;
    let _ = writer.join();
    let status = child.wait().map_err(|e| format!("{program}: {e}"))?;
    if !status.success() {
        return Err(format!("{program} {}: {status}", args.join(" ")));
    }
    Ok(out)
}

/// The command's output: the text of each `@@run LINE` line, in order.
pub fn run_output(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| {
            let l = l.trim_end();
            l.strip_prefix("@@run ")
                .or_else(|| (l == "@@run").then_some(""))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_file_paths() {
        let here = env!("CARGO_MANIFEST_DIR");
        let f = GuestFile::parse(&format!("{here}/Cargo.toml")).unwrap();
        assert_eq!(f.guest, "/root/Cargo.toml");
        let f = GuestFile::parse(&format!("{here}/Cargo.toml:/etc/x/")).unwrap();
        assert_eq!(f.guest, "/etc/x/Cargo.toml");
        let f = GuestFile::parse(&format!("{here}/Cargo.toml:/job.fio")).unwrap();
        assert_eq!(f.guest, "/job.fio");
        assert!(GuestFile::parse(&format!("{here}/Cargo.toml:rel")).is_err());
        assert!(GuestFile::parse(&format!("{here}/Cargo.toml:/a/../b")).is_err());
        let e = GuestFile::parse("/no/such/file").unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn base64_round_trips_with_busybox_padding() {
        assert_eq!(decode_base64("aGVsbG8K").unwrap(), b"hello\n");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aA==").unwrap(), b"h");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("aGk").is_err());
        assert!(decode_base64("aA==aGk=").is_err());
        assert!(decode_base64("a*k=").is_err());
    }

    #[test]
    fn fetched_files_are_checked_against_the_guests_size_and_hash() {
        let sha = sha256_hex(b"hello\n").unwrap();
        let console = format!(
            "noise\n@@fetch begin path=/root/a\n@@fetch data=aGVs\n@@fetch data=bG8K\n\
             @@guest fetched=/root/a size=6 sha256={sha}\n\
             @@fetch begin path=/root/b\n@@fetch data=aGVsbG8K\n\
             @@guest fetched=/root/b size=6 sha256=00\n\
             @@guest fetch_missing=/root/c\n\
             @@guest fetched=/root/d size=0 sha256=x\n"
        );
        let files = fetched_files(&console);
        assert_eq!(files.len(), 4);
        assert_eq!(files[0].data.as_deref(), Ok(&b"hello\n"[..]));
        assert!(files[1].data.as_ref().unwrap_err().contains("sha256"));
        assert_eq!(files[2].path, "/root/c");
        assert!(files[2].data.is_err());
        assert!(files[3]
            .data
            .as_ref()
            .unwrap_err()
            .contains("no data lines"));
    }

    #[test]
    fn the_archive_carries_modules_lists_files_and_the_command() {
        let dir = std::env::temp_dir().join(format!("blkswarm-ov-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
        std::fs::write(dir.join("tree/sub/job.fio"), "[job]\n").unwrap();
        std::fs::write(dir.join("m.ko"), "ELF").unwrap();
        let kernel = KernelWithModules {
            kernel: UserKernel {
                bzimage: dir.join("bz"),
                release: "6.1.9-t".into(),
                tree: None,
                config: None,
            },
            boot_modules: vec![("m".into(), dir.join("m.ko"))],
            ondemand_modules: vec![],
        };
        let overlay = Overlay {
            kernel: Some(kernel),
            files: vec![
                GuestFile::parse(&format!("{}:/work", dir.join("tree").display())).unwrap(),
            ],
            run: Some("fio /work/sub/job.fio\n".into()),
            fetch: vec!["/root/out.json".into()],
        };
        let archive = overlay.write_archive(Vec::new()).unwrap();
        let entries = crate::cpio::parse_newc(&archive).unwrap();
        let get = |name: &str| {
            entries
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, _, d)| String::from_utf8_lossy(d).into_owned())
                .unwrap_or_else(|| panic!("{name} not in {entries:?}"))
        };
        assert_eq!(get("lib/modules/m.ko"), "ELF");
        assert_eq!(get("etc/modules"), "m\n");
        assert_eq!(get("etc/modules.ondemand"), "");
        assert_eq!(get("etc/kernel-version"), "6.1.9-t\n");
        assert_eq!(get("work/sub/job.fio"), "[job]\n");
        assert_eq!(get("etc/blkswarm/run"), "fio /work/sub/job.fio\n");
        assert_eq!(get("etc/blkswarm/fetch"), "/root/out.json\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_output_keeps_empty_lines() {
        let console = "x\n@@run a b\n@@run\n@@runner\n@@run  c\n";
        assert_eq!(run_output(console), ["a b", "", " c"]);
    }
}
