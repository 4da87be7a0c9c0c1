//! A writer for the "newc" cpio format (`070701`), the format the Linux initramfs
//! unpacker reads. Only what the lab payload needs: directories and regular files,
//! owned by root, mtime 0.
//!
//! Layout of one entry: a 110-byte ASCII header (`070701` then 13 fields of 8 hex
//! digits), the NUL-terminated name padded so that header + name is a multiple of 4,
//! then the data padded to a multiple of 4. The archive ends with an entry named
//! `TRAILER!!!`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &str = "070701";
const HEADER_LEN: u64 = 110;
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;

/// Streams a newc archive into `W`. Parent directories of every file are emitted
/// (once, before the file) automatically, since the kernel unpacker does not create
/// missing parents.
pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

/// Archive names are relative ("lab/plan.sh"); a leading `/` is accepted and dropped.
fn normalize(name: &str) -> io::Result<String> {
    let trimmed = name.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        || trimmed.contains('\0')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad cpio entry name {name:?}"),
        ));
    }
    Ok(trimmed.to_string())
}

fn pad4(len: u64) -> usize {
    ((4 - (len % 4)) % 4) as usize
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        NewcWriter {
            out,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry_header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: {size} bytes does not fit a newc entry (max 4 GiB)"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() as u64 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        );
        debug_assert_eq!(header.len() as u64, HEADER_LEN);
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.out.write_all(&[0; 4][..pad4(HEADER_LEN + namesize)])?;
        Ok(())
    }

    fn ensure_parents(&mut self, name: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            end += i;
            let parent = name[..end].to_string();
            if !self.dirs.contains(&parent) {
                self.entry_header(&parent, S_IFDIR | 0o755, 2, 0)?;
                self.dirs.insert(parent);
            }
            end += 1;
        }
        Ok(())
    }

    /// Adds a directory (and its parents) unless it was already added.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        let name = normalize(name)?;
        self.ensure_parents(&name)?;
        if self.dirs.insert(name.clone()) {
            self.entry_header(&name, S_IFDIR | (perm & 0o7777), 2, 0)?;
        }
        Ok(())
    }

    /// Adds a regular file with the given permission bits (e.g. 0o755).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.file_from_reader(name, perm, data.len() as u64, data)
    }

    /// Adds a regular file whose `size` bytes come from `data` (checked).
    pub fn file_from_reader(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: impl Read,
    ) -> io::Result<()> {
        let name = normalize(name)?;
        self.ensure_parents(&name)?;
        self.entry_header(&name, S_IFREG | (perm & 0o7777), 1, size)?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {size} bytes, read {copied}"),
            ));
        }
        self.out.write_all(&[0; 4][..pad4(size)])?;
        Ok(())
    }

    /// Adds the host file `src` (contents of the file a symlink points to) as `name`.
    pub fn file_from_path(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        let f = File::open(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let size = f.metadata()?.len();
        self.file_from_reader(name, perm, size, f)
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry_header(TRAILER, 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One parsed entry, for tests: (name, mode, data).
#[cfg(test)]
pub(crate) fn parse_newc(mut buf: &[u8]) -> Result<Vec<(String, u32, Vec<u8>)>, String> {
    let mut entries = Vec::new();
    let mut offset = 0u64;
    loop {
        if buf.len() < HEADER_LEN as usize {
            return Err(format!("truncated header at {offset}"));
        }
        let h = std::str::from_utf8(&buf[..HEADER_LEN as usize]).map_err(|e| e.to_string())?;
        if &h[..6] != MAGIC {
            return Err(format!("bad magic at {offset}: {:?}", &h[..6]));
        }
        let field = |i: usize| u32::from_str_radix(&h[6 + 8 * i..14 + 8 * i], 16).unwrap();
        let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
        let name_start = HEADER_LEN as usize;
        let name_bytes = &buf[name_start..name_start + namesize];
        if name_bytes.last() != Some(&0) {
            return Err("name not NUL-terminated".into());
        }
        let name = String::from_utf8(name_bytes[..namesize - 1].to_vec()).unwrap();
        let data_start = name_start + namesize + pad4((name_start + namesize) as u64);
        let data = buf[data_start..data_start + size].to_vec();
        let next = data_start + size + pad4(size as u64);
        offset += next as u64;
        buf = &buf[next..];
        if name == TRAILER {
            if !buf.is_empty() {
                return Err(format!("{} bytes after trailer", buf.len()));
            }
            return Ok(entries);
        }
        entries.push((name, mode, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = NewcWriter::new(Vec::new());
        w.file("/lab/plan.sh", 0o755, b"echo hi\n").unwrap();
        w.file("lab/guest/vmlinuz", 0o644, &[1, 2, 3]).unwrap();
        w.dir("/lab/empty", 0o700).unwrap();
        w.dir("lab", 0o755).unwrap(); // already there: no second entry
        w.file("lib64/ld-linux-x86-64.so.2", 0o755, b"").unwrap();
        w.file("a", 0o600, b"abcd").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let buf = sample();
        assert_eq!(buf.len() % 4, 0);
        let entries = parse_newc(&buf).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "lab",
                "lab/plan.sh",
                "lab/guest",
                "lab/guest/vmlinuz",
                "lab/empty",
                "lib64",
                "lib64/ld-linux-x86-64.so.2",
                "a"
            ]
        );
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(entries[1].1, 0o100_755);
        assert_eq!(entries[1].2, b"echo hi\n");
        assert_eq!(entries[3].2, [1, 2, 3]);
        assert_eq!(entries[4].1, 0o040_700);
        assert_eq!(entries[6].2, b"");
        assert_eq!(entries[7].1, 0o100_600);
        assert_eq!(entries[7].2, b"abcd");
    }

    #[test]
    fn every_name_length_pads_correctly() {
        // Header + name padding depends on the name length mod 4; data padding on size mod 4.
        let mut w = NewcWriter::new(Vec::new());
        let mut want = Vec::new();
        for n in 1..=9 {
            let name = "x".repeat(n);
            let data = vec![n as u8; n + 1];
            w.file(&name, 0o644, &data).unwrap();
            want.push((name, 0o100_644, data));
        }
        let entries = parse_newc(&w.finish().unwrap()).unwrap();
        assert_eq!(entries, want);
    }

    #[test]
    fn rejects_bad_names_and_short_readers() {
        let mut w = NewcWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a/../b", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
        assert!(w.file_from_reader("a", 0o644, 10, &b"short"[..]).is_err());
    }

    /// If a `cpio` binary exists, it must list what we wrote.
    #[test]
    fn cpio_tool_lists_names() {
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("cpio not installed: only the in-process round trip was checked");
            return;
        };
        let buf = sample();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&buf));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(out.status.success(), "cpio -t failed: {out:?}");
        let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(
            listed,
            [
                "lab",
                "lab/plan.sh",
                "lab/guest",
                "lab/guest/vmlinuz",
                "lab/empty",
                "lib64",
                "lib64/ld-linux-x86-64.so.2",
                "a"
            ]
        );
    }
}
