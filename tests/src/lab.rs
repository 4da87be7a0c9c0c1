//! Lab mode: one QEMU TCG boot of an L1 Linux (with kvm_amd on emulated SVM) runs
//! every guest of a `Runner::run` in sequence, with blkswarm inside L1.
//!
//! The L1 initrd is `lab/l1-base.cpio.gz` followed by a payload newc archive built
//! here: `/lab/plan.sh` (one `run_guest NAME CMD...` line per guest), `/lab/blkswarm`
//! with its shared libraries at their absolute paths, `/lab/guest/vmlinuz`,
//! `/lab/guest/initramfs.cpio.gz` and any extra files. L1's /init prints
//! `@@lab kvm=ok`, `@@lab ready uptime_ms=N`, runs the plan (`@@lab guest-begin
//! name=N` ... `@@lab guest-end name=N rc=RC wall_ms=MS` around each guest), then
//! `@@lab done` and powers off. Everything arrives on QEMU's stdout (L1's console).
//! After a blkswarm guest that exited 3 (a guest fault), the plan prints L1's KVM trace
//! as `@@lab trace name=N ...` lines (guests/README.md, "L1's KVM trace of an L2 triple
//! fault"), which go to guest N's console.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cpio::NewcWriter;
use crate::direct::spawn_line_reader;
use crate::parse::{self, Collected};
use crate::{io_err, shell, tail, GuestOutcome, GuestSpec, HarnessError, Mode, Paths, TAIL_LINES};

/// Where things are inside L1.
pub const LAB_BIN: &str = "/lab/blkswarm";
pub const LAB_KERNEL: &str = "/lab/guest/vmlinuz";
pub const LAB_INITRAMFS: &str = "/lab/guest/initramfs.cpio.gz";
pub const LAB_PLAN: &str = "/lab/plan.sh";
/// blkswarm writes each guest's measurement report under here (`--report DIR/NAME`); the
/// plan sends it back over the console as `@@lab report name=NAME json=...`.
pub const LAB_REPORTS: &str = "/tmp/blkswarm-reports";

/// The L1 kernel command line (BLKSWARM_LAB_CMDLINE adds words, e.g. `kvm_amd.vgif=0`:
/// L1's init hands MODULE.PARAM=VALUE words to the modules it loads).
pub const L1_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// QEMU's accelerator for L1 (BLKSWARM_LAB_ACCEL replaces it, e.g. `tcg,thread=single`).
pub const L1_ACCEL: &str = "tcg,thread=multi,tb-size=512";
/// vCPUs of each L1 (BLKSWARM_LAB_SMP replaces it). One: with two, QEMU's multi-threaded
/// TCG lost L2 guests and L1s under heavy I/O (16 disks of fio verify: 0 of 8 runs finished,
/// L2 triple faults, L1 deaths and hangs, whichever VMM ran L2); with one, 4 of 4 ran
/// clean (docs/lab.md). Parallelism comes from several L1s side by side instead.
pub const L1_SMP: u32 = 1;

fn l1_cmdline() -> String {
    match std::env::var("BLKSWARM_LAB_CMDLINE") {
        Ok(extra) if !extra.trim().is_empty() => format!("{L1_CMDLINE} {}", extra.trim()),
        _ => L1_CMDLINE.to_string(),
    }
}

/// The vCPUs each L1 gets: BLKSWARM_LAB_SMP, else [`L1_SMP`].
pub fn l1_smp() -> u32 {
    std::env::var("BLKSWARM_LAB_SMP")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &u32| (1..=64).contains(&n))
        .unwrap_or(L1_SMP)
}

fn l1_accel() -> String {
    std::env::var("BLKSWARM_LAB_ACCEL")
        .ok()
        .filter(|accel| !accel.trim().is_empty())
        .unwrap_or_else(|| L1_ACCEL.to_string())
}

/// Between the SIGTERM that ends a guest past its timeout and the SIGKILL that follows.
pub const TERM_GRACE_SECS: u64 = 10;
/// Host-side slack on top of a guest's timeout before the whole lab is killed (the
/// plan's own `timeout` inside L1 should fire first).
pub const GUEST_GRACE: Duration = Duration::from_secs(30);
/// Per-guest allowance in the overall lab deadline (process start, plan overhead).
const PER_GUEST_OVERHEAD: Duration = Duration::from_secs(10);
/// How a guest's loss begins when L1 went silent under it (see [`run`]'s deadlines): a
/// lab failure, like QEMU's exit without `@@lab done`.
pub const L1_HUNG: &str = "L1 hung";
/// How long to wait for QEMU to exit after `@@lab done` or `@@lab error`.
const WIND_DOWN: Duration = Duration::from_secs(30);

/// How much of QEMU's debug log is read back when L1 dies.
const QEMU_LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The last `max` bytes of a file (lossy UTF-8), empty if it cannot be read.
fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One phrase on how L1 ended, from the end of QEMU's `-d cpu_reset` log: TCG logs
/// "Triple fault" before the reset a triple fault causes (with `-no-reboot`, the exit).
pub fn how_l1_ended(qemu_log: &str) -> String {
    match qemu_log
        .lines()
        .filter(|l| l.contains("Triple fault"))
        .count()
    {
        0 if qemu_log.trim().is_empty() => "QEMU's log is empty".to_string(),
        0 => "QEMU logged no triple fault: L1 reset or powered off itself".to_string(),
        n => format!("QEMU logged {n} triple fault(s) in L1"),
    }
}

/// What `lab::run` needs.
#[derive(Debug, Clone)]
pub struct LabConfig {
    pub qemu: PathBuf,
    pub paths: Paths,
    /// The blkswarm binary, when some guest uses it.
    pub bin: Option<PathBuf>,
    pub memory_mib: u64,
    pub boot_timeout: Duration,
    pub verbose: bool,
    /// Host-side slack after a guest's timeout before QEMU is killed.
    pub guest_grace: Duration,
    /// (absolute path in L1, host path)
    pub extra_files: Vec<(String, PathBuf)>,
    /// Names this L1 on the live console (`lab`, or `lab2` for the second of several).
    pub label: String,
}

fn timeout_secs(d: Duration) -> u64 {
    (d.as_millis() as u64).div_ceil(1000).max(1)
}

/// The plan L1 runs with busybox sh (`run_guest` is defined by L1's /init). Each
/// guest runs under `timeout -s TERM -k 10 <its timeout>` when L1 has a `timeout` command
/// (SIGTERM makes blkswarm print where each vCPU and queue was before it exits; SIGKILL
/// follows after 10 s if it does not),
/// except the plan helpers L1's /init defines as shell functions (make_image,
/// check_pattern, ...), which `timeout` cannot execute.
///
/// Around each guest that runs blkswarm, the plan uses L1's KVM trace (guests/lab-init.sh):
/// `lab_trace_clear` before it, and `lab_trace_dump NAME` after it when it exited 3
/// (blkswarm's guest fault exit: a triple fault), which prints `@@lab trace name=NAME ...`
/// lines after the guest's `guest-end` (see [`LabParser`]); an L1 image without those
/// helpers runs the plan without them.
pub fn plan_script(specs: &[GuestSpec]) -> String {
    let mut s = String::from(
        "# blkswarm lab plan, generated by the test harness (tests/src/lab.rs)\n\
         # L1 defaults to 1024 open files; many-disk guests need far more.\n\
         ulimit -n 65536 2>/dev/null || ulimit -n 20000 2>/dev/null || true\n\
         if command -v timeout >/dev/null 2>&1; then HARNESS_TIMEOUT=1; else HARNESS_TIMEOUT=\n\
         \x20   echo '[plan] no timeout command in L1: guests run without a time limit inside L1'\n\
         fi\n\
         limit() { case \"$(type \"$1\" 2>/dev/null)\" in *function*) return 1 ;; esac; [ -n \"$HARNESS_TIMEOUT\" ]; }\n\
         emit_report() { [ -f \"$2/report.json\" ] || return 0; printf '@@lab report name=%s json=' \"$1\"; cat \"$2/report.json\"; echo; }\n\
         trace_clear() { type lab_trace_clear >/dev/null 2>&1 || return 0; lab_trace_clear; }\n\
         trace_fault() { [ \"$2\" = 3 ] || return 0; type lab_trace_dump >/dev/null 2>&1 || return 0; lab_trace_dump \"$1\"; }\n",
    );
    for spec in specs {
        let (kernel, initramfs) = match &spec.image {
            Some(image) => image.lab_paths(),
            None => (LAB_KERNEL.to_string(), LAB_INITRAMFS.to_string()),
        };
        let mut argv = spec.argv(LAB_BIN, &kernel, &initramfs);
        let report_dir = format!("{LAB_REPORTS}/{}", spec.name);
        if spec.uses_vmm() {
            argv.extend(["--report".to_string(), report_dir.clone()]);
        }
        let name = shell::quote(&spec.name);
        let cmd = shell::join(&argv);
        let first = shell::quote(argv.first().map_or("", String::as_str));
        if spec.uses_vmm() {
            s.push_str("trace_clear\n");
        }
        s.push_str(&format!(
            "if limit {first}; then\n\
             \x20   run_guest {name} timeout -s TERM -k {TERM_GRACE_SECS} {} {cmd}\n\
             else\n\
             \x20   run_guest {name} {cmd}\n\
             fi\n",
            timeout_secs(spec.timeout)
        ));
        if spec.uses_vmm() {
            // `$?`: the status of the `if`, i.e. of the run_guest that ran.
            s.push_str(&format!(
                "trace_fault {name} $?\nemit_report {name} {}\n",
                shell::quote(&report_dir)
            ));
        }
    }
    s
}

/// Library paths named in `ldd` output, in order: `x => /path (addr)` and `/path (addr)`
/// lines (the dynamic loader); the vDSO has no path and is skipped. Err on
/// `not found`. A static binary gives an empty list.
pub fn parse_ldd(text: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = if let Some((lib, rhs)) = line.split_once("=>") {
            let rhs = rhs.trim();
            if rhs.starts_with("not found") {
                return Err(format!("ldd: {} not found", lib.trim()));
            }
            rhs.split_whitespace().next().filter(|p| p.starts_with('/'))
        } else if line.starts_with('/') {
            line.split_whitespace().next()
        } else {
            None
        };
        if let Some(p) = path {
            if !out.iter().any(|o| o == p) {
                out.push(p.to_string());
            }
        }
    }
    Ok(out)
}

fn ldd_libs(bin: &Path) -> Result<Vec<String>, HarnessError> {
    let out = Command::new("ldd").arg(bin).output().map_err(io_err(
        "running ldd (needed to ship blkswarm's libraries into the lab)",
    ))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(HarnessError::Io(format!(
            "ldd {} failed: {}",
            bin.display(),
            text.trim()
        )));
    }
    parse_ldd(&text).map_err(|e| HarnessError::Io(format!("{}: {e}", bin.display())))
}

/// A host binary and the shared libraries `ldd` names for it, as `(path in L1, host
/// file)` pairs for [`crate::Runner::lab_file`]: the binary at `in_lab`, each library at
/// its absolute path (the host file is the symlink-resolved library). A static binary
/// gives just itself. Used to run other programs in the lab, e.g. QEMU as the L2 VMM.
pub fn binary_with_libs(in_lab: &str, bin: &Path) -> Result<Vec<(String, PathBuf)>, HarnessError> {
    let mut out = vec![(in_lab.to_string(), bin.to_path_buf())];
    for lib in ldd_libs(bin)? {
        let real = Path::new(&lib)
            .canonicalize()
            .map_err(io_err(format!("resolving {lib}")))?;
        out.push((lib, real));
    }
    Ok(out)
}

/// One file of the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadFile {
    /// Absolute path inside L1.
    pub in_lab: String,
    /// Host file whose contents are stored (symlinks followed).
    pub host: PathBuf,
    pub perm: u32,
}

/// Writes `base` (the gzip'd L1 initramfs), zero padding to a 4-byte boundary (the
/// kernel only looks for an uncompressed `070701` header at 4-aligned offsets), then
/// the payload archive. Returns the payload's offset.
pub fn write_initrd(out: &Path, base: &Path, plan: &str, files: &[PayloadFile]) -> io::Result<u64> {
    let ctx = |what: &str, p: &Path| {
        let p = p.display().to_string();
        let what = what.to_string();
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {p}: {e}"))
    };
    let mut f = BufWriter::new(File::create(out).map_err(ctx("creating", out))?);
    let mut base_file = File::open(base).map_err(ctx("opening", base))?;
    let base_len = io::copy(&mut base_file, &mut f).map_err(ctx("copying", base))?;
    let pad = (4 - base_len % 4) % 4;
    f.write_all(&[0u8; 4][..pad as usize])?;
    let mut w = NewcWriter::new(f);
    w.file(LAB_PLAN, 0o755, plan.as_bytes())?;
    for file in files {
        w.file_from_path(&file.in_lab, file.perm, &file.host)?;
    }
    w.finish()?.flush()?;
    Ok(base_len + pad)
}

/// The payload files for `cfg` (without the plan).
fn payload_files(cfg: &LabConfig) -> Result<Vec<PayloadFile>, HarnessError> {
    let mut files = Vec::new();
    if let Some(bin) = &cfg.bin {
        files.push(PayloadFile {
            in_lab: LAB_BIN.into(),
            host: bin.clone(),
            perm: 0o755,
        });
        for lib in ldd_libs(bin)? {
            let real = Path::new(&lib)
                .canonicalize()
                .map_err(io_err(format!("resolving {lib}")))?;
            files.push(PayloadFile {
                in_lab: lib,
                host: real,
                perm: 0o755,
            });
        }
        files.push(PayloadFile {
            in_lab: LAB_KERNEL.into(),
            host: cfg.paths.guest_kernel(),
            perm: 0o644,
        });
        files.push(PayloadFile {
            in_lab: LAB_INITRAMFS.into(),
            host: cfg.paths.guest_initramfs(),
            perm: 0o644,
        });
    }
    for (in_lab, host) in &cfg.extra_files {
        if !in_lab.starts_with('/') {
            return Err(HarnessError::InvalidSpec(format!(
                "lab file path {in_lab:?} must be absolute"
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        let perm = std::fs::metadata(host)
            .map_err(io_err(format!("lab file {}", host.display())))?
            .permissions()
            .mode()
            & 0o777;
        files.push(PayloadFile {
            in_lab: in_lab.clone(),
            host: host.clone(),
            perm,
        });
    }
    Ok(files)
}

/// Follows the L1 console and attributes lines to guests: those between a guest's
/// `guest-begin` and `guest-end`, and `@@lab trace name=NAME` lines wherever they arrive.
/// Pure: times are passed in (ms since QEMU launch), so it is unit-tested on synthetic
/// consoles.
#[derive(Debug)]
pub struct LabParser {
    outcomes: Vec<GuestOutcome>,
    began: Vec<bool>,
    ended: Vec<bool>,
    index: HashMap<String, usize>,
    /// (outcome index, begin ms, collected lines)
    current: Option<(usize, u64, Collected)>,
    /// The whole L1 console, cleaned lines.
    pub console: String,
    pub kvm_ok: bool,
    pub ready_ms: Option<u64>,
    pub ready_uptime_ms: Option<u64>,
    pub done_ms: Option<u64>,
    /// `@@lab error=REASON` (first one) and when.
    pub error: Option<(String, u64)>,
}

impl LabParser {
    pub fn new<S: AsRef<str>>(names: &[S]) -> LabParser {
        LabParser {
            outcomes: names
                .iter()
                .map(|n| GuestOutcome::new(n.as_ref(), Mode::Lab))
                .collect(),
            began: vec![false; names.len()],
            ended: vec![false; names.len()],
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_ref().to_string(), i))
                .collect(),
            current: None,
            console: String::new(),
            kvm_ok: false,
            ready_ms: None,
            ready_uptime_ms: None,
            done_ms: None,
            error: None,
        }
    }

    /// The running guest: (name, ms when it began).
    pub fn current(&self) -> Option<(&str, u64)> {
        self.current
            .as_ref()
            .map(|(i, t, _)| (self.outcomes[*i].name.as_str(), *t))
    }

    /// Feeds one raw console line received at `now_ms`.
    pub fn feed(&mut self, raw: &str, now_ms: u64) {
        let line = parse::clean_line(raw);
        // A guest line without its final newline glues L1's next marker to itself:
        // split at a lab marker that is not at the start.
        if let Some(pos) = line.find("@@lab ").filter(|&p| p > 0) {
            let (head, rest) = line.split_at(pos);
            self.feed_clean(head.trim(), now_ms);
            self.feed_clean(rest, now_ms);
        } else {
            self.feed_clean(&line, now_ms);
        }
    }

    fn feed_clean(&mut self, line: &str, now_ms: u64) {
        if let Some((head, json)) = line.split_once(" json=").filter(|(head, _)| {
            parse::tagged(head, parse::LAB).is_some_and(|body| body.starts_with("report "))
        }) {
            return self.report(head, json);
        }
        self.console.push_str(line);
        self.console.push('\n');
        let Some(body) = parse::tagged(line, parse::LAB) else {
            if let Some((i, _, collected)) = &mut self.current {
                collected.feed(line);
                let c = &mut self.outcomes[*i].console;
                c.push_str(line);
                c.push('\n');
            }
            return;
        };
        let pairs = parse::pairs(body);
        let word = pairs.first().map(|(k, _)| k.as_str()).unwrap_or("");
        let name = parse::lookup(&pairs, "name").unwrap_or("");
        match word {
            "kvm" => self.kvm_ok = parse::lookup(&pairs, "kvm") == Some("ok"),
            "error" if self.error.is_none() => {
                let reason = body.strip_prefix("error=").unwrap_or(body).trim();
                self.error = Some((reason.to_string(), now_ms));
            }
            "ready" => {
                self.ready_ms = Some(now_ms);
                self.ready_uptime_ms =
                    parse::lookup(&pairs, "uptime_ms").and_then(|v| v.parse().ok());
            }
            "done" => self.done_ms = Some(now_ms),
            "trace" => self.trace(name, line),
            "guest-begin" => {
                if let Some((i, _, _)) = &self.current {
                    let prev = self.outcomes[*i].name.clone();
                    self.lose_current(
                        &format!("it never ended: L1 began guest '{name}' before '{prev}' ended"),
                        now_ms,
                    );
                }
                match self.index.get(name) {
                    Some(&i) if !self.began[i] => {
                        self.began[i] = true;
                        self.current = Some((i, now_ms, Collected::default()));
                    }
                    _ => self.note(&format!(
                        "[harness] unexpected guest-begin for {name:?} (unknown or repeated)"
                    )),
                }
            }
            "guest-end" => match self.current.take() {
                Some((i, begin, collected)) if self.outcomes[i].name == name => {
                    let o = &mut self.outcomes[i];
                    o.exit_code = parse::lookup(&pairs, "rc").and_then(|v| v.parse().ok());
                    o.wall_ms = parse::lookup(&pairs, "wall_ms")
                        .and_then(|v| v.parse().ok())
                        .or(Some(now_ms.saturating_sub(begin)));
                    o.results = collected.results;
                    o.vmm = collected.vmm;
                    o.done = collected.done;
                    self.ended[i] = true;
                }
                other => {
                    self.current = other;
                    self.note(&format!(
                        "[harness] guest-end for {name:?} does not match the running guest"
                    ));
                }
            },
            _ => {}
        }
    }

    /// `@@lab report name=NAME json=...`: the JSON goes to the outcome, not the console.
    fn report(&mut self, head: &str, json: &str) {
        let name = head
            .rsplit_once("name=")
            .map_or("", |(_, name)| name.trim());
        self.note(&format!(
            "@@lab report name={name} ({} bytes of JSON)",
            json.len()
        ));
        match self.index.get(name) {
            Some(&i) => self.outcomes[i].report = Some(json.to_string()),
            None => self.note(&format!("[harness] report for unknown guest {name:?}")),
        }
    }

    /// `@@lab trace name=NAME ...`: L1's KVM trace for a guest that faulted, printed by the
    /// plan after the guest's `guest-end`: the line goes to that guest's console too (as
    /// it is), wherever it arrives.
    fn trace(&mut self, name: &str, line: &str) {
        match self.index.get(name) {
            Some(&i) => {
                let c = &mut self.outcomes[i].console;
                c.push_str(line);
                c.push('\n');
            }
            None => self.note(&format!("[harness] trace line for unknown guest {name:?}")),
        }
    }

    fn note(&mut self, msg: &str) {
        self.console.push_str(msg);
        self.console.push('\n');
    }

    fn lose_current(&mut self, why: &str, now_ms: u64) {
        if let Some((i, begin, collected)) = self.current.take() {
            let tail = tail(&self.console, TAIL_LINES);
            let o = &mut self.outcomes[i];
            o.results = collected.results;
            o.vmm = collected.vmm;
            o.done = collected.done;
            o.wall_ms = Some(now_ms.saturating_sub(begin));
            o.lost = Some(format!(
                "began but {why}\n--- last {TAIL_LINES} lab console lines ---\n{tail}\n--- end of lab console ---"
            ));
            self.ended[i] = true;
        }
    }

    /// Ends the run: a guest still running is lost with `stop` as the reason, guests
    /// that never began are lost as never started.
    pub fn finish(mut self, stop: &str, now_ms: u64) -> (Vec<GuestOutcome>, String) {
        self.lose_current(&format!("never ended: {stop}"), now_ms);
        for i in 0..self.outcomes.len() {
            if !self.began[i] {
                self.outcomes[i].lost = Some(format!("never started: {stop}"));
            }
        }
        (self.outcomes, self.console)
    }
}

/// Removes its directory on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("{prefix}-{}-{seq}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `limit` for `child` to exit, then kills it.
fn reap(child: &mut Child, limit: Duration) -> String {
    let until = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                kill(child);
                return format!(
                    "still running {} s after its console closed; killed",
                    limit.as_secs()
                );
            }
        }
    }
}

/// Boots the lab once and runs `specs` in it, in order.
pub fn run(
    cfg: &LabConfig,
    specs: &[GuestSpec],
) -> Result<(Vec<GuestOutcome>, crate::LabReport), HarnessError> {
    let work = TempDir::new("blkswarm-lab").map_err(io_err("creating a temp dir"))?;
    let plan = plan_script(specs);
    let files = payload_files(cfg)?;
    let initrd = work.0.join("l1-initrd.img");
    let qemu_log = work.0.join("qemu-debug.log");
    write_initrd(&initrd, &cfg.paths.lab_base(), &plan, &files)
        .map_err(io_err("building the lab initrd"))?;

    let args: Vec<String> = vec![
        "-accel".into(),
        l1_accel(),
        "-cpu".into(),
        "max".into(),
        "-smp".into(),
        l1_smp().to_string(),
        "-m".into(),
        cfg.memory_mib.to_string(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        cfg.paths.guest_kernel().to_string_lossy().into_owned(),
        "-initrd".into(),
        initrd.to_string_lossy().into_owned(),
        "-append".into(),
        l1_cmdline(),
        // When L1 dies the console says nothing; QEMU's own log tells a triple fault
        // (TCG logs it under cpu_reset) from L1 rebooting itself.
        "-d".into(),
        "cpu_reset,guest_errors".into(),
        "-D".into(),
        qemu_log.to_string_lossy().into_owned(),
    ];
    let say = |msg: &str| {
        if cfg.verbose {
            eprintln!("[{}] {msg}", cfg.label);
        }
    };
    say(&format!(
        "{} guest(s): {}",
        specs.len(),
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    say(&format!(
        "$ {} {}",
        shell::quote(&cfg.qemu.to_string_lossy()),
        shell::join(&args)
    ));

    let start = Instant::now();
    let ms = || start.elapsed().as_millis() as u64;
    let mut child = crate::direct::die_with_parent(Command::new(&cfg.qemu).args(&args))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("cannot start {}", cfg.qemu.display())))?;
    let (tx, rx) = mpsc::channel();
    let out_reader = spawn_line_reader(child.stdout.take().expect("piped stdout"), tx);
    let (etx, erx) = mpsc::channel();
    let err_reader = spawn_line_reader(child.stderr.take().expect("piped stderr"), etx);

    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let timeouts: HashMap<&str, Duration> =
        specs.iter().map(|s| (s.name.as_str(), s.timeout)).collect();
    let overall = cfg.boot_timeout
        + specs
            .iter()
            .map(|s| s.timeout + PER_GUEST_OVERHEAD)
            .sum::<Duration>();
    let mut parser = LabParser::new(&names);
    let mut killed: Option<String> = None;
    let mut eof = false;
    loop {
        // The nearest deadline and what it means.
        let mut deadlines: Vec<(u64, String)> = vec![(
            overall.as_millis() as u64,
            format!(
                "the lab's overall timeout of {} s expired",
                overall.as_secs()
            ),
        )];
        if parser.ready_ms.is_none() {
            deadlines.push((
                cfg.boot_timeout.as_millis() as u64,
                format!(
                    "L1 did not print `@@lab ready` within {} s",
                    cfg.boot_timeout.as_secs()
                ),
            ));
        }
        if let Some((name, begin)) = parser.current() {
            let t = timeouts.get(name).copied().unwrap_or_default() + cfg.guest_grace;
            // L1 runs the guest under `timeout` (plan_script): a guest still running
            // this late means L1 itself stopped, not the guest.
            deadlines.push((
                begin + t.as_millis() as u64,
                format!(
                    "{L1_HUNG}: guest '{name}' ran past its timeout plus {} s grace ({} s), \
                     and L1's own `timeout` (SIGTERM, then SIGKILL {TERM_GRACE_SECS} s later) \
                     did not end it",
                    cfg.guest_grace.as_secs(),
                    t.as_secs()
                ),
            ));
        }
        for (t, what) in [
            (parser.done_ms, "`@@lab done`"),
            (parser.error.as_ref().map(|e| e.1), "`@@lab error`"),
        ] {
            if let Some(t) = t {
                deadlines.push((
                    t + WIND_DOWN.as_millis() as u64,
                    format!(
                        "QEMU did not exit within {} s of {what}",
                        WIND_DOWN.as_secs()
                    ),
                ));
            }
        }
        let (deadline, why) = deadlines
            .into_iter()
            .min_by_key(|d| d.0)
            .expect("non-empty");
        // Checked before reading, so a console that never stops talking cannot
        // postpone a kill that is due.
        let now = ms();
        let result = if now >= deadline {
            Err(mpsc::RecvTimeoutError::Timeout)
        } else {
            rx.recv_timeout(Duration::from_millis(deadline - now))
        };
        match result {
            Ok(Some(line)) => {
                if cfg.verbose {
                    let clean = parse::clean_line(&line);
                    match clean.split_once(" json=") {
                        Some((head, json)) if head.starts_with("@@lab report ") => {
                            eprintln!("[{}] {head} ({} bytes of JSON)", cfg.label, json.len())
                        }
                        // A fetched file's base64 lines are data, not news.
                        _ if clean.starts_with("@@fetch data=") => {}
                        _ => eprintln!("[{}] {clean}", cfg.label),
                    }
                }
                let was_ready = parser.ready_ms.is_some();
                parser.feed(&line, ms());
                if !was_ready {
                    if let Some(r) = parser.ready_ms {
                        say(&format!(
                            "L1 ready after {r} ms (host wall time since QEMU launch)"
                        ));
                    }
                }
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                eof = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                say(&format!("killing QEMU: {why}"));
                kill(&mut child);
                killed = Some(why);
                break;
            }
        }
    }
    let status = if killed.is_some() {
        "killed".to_string()
    } else {
        reap(&mut child, Duration::from_secs(10))
    };
    let total_ms = ms();
    if eof {
        let _ = out_reader.join();
    }
    // stderr closes when QEMU is gone.
    let mut qemu_stderr = String::new();
    while let Ok(Some(l)) = erx.recv_timeout(Duration::from_secs(2)) {
        qemu_stderr.push_str(&l);
        qemu_stderr.push('\n');
    }
    drop(err_reader); // detached if something still holds QEMU's stderr open
    if cfg.verbose && !qemu_stderr.trim().is_empty() {
        eprintln!("[{}] QEMU stderr:\n{}", cfg.label, qemu_stderr.trim_end());
    }

    let l1_hung = killed
        .as_deref()
        .is_some_and(|why| why.starts_with(L1_HUNG));
    let l1_died = killed.is_none() && parser.done_ms.is_none();
    let qemu_log_tail = if l1_died || l1_hung {
        read_tail(&qemu_log, QEMU_LOG_TAIL_BYTES)
    } else {
        String::new()
    };
    let stop = match (&killed, parser.done_ms) {
        (Some(why), _) if l1_hung => format!(
            "{why}; the harness killed QEMU after {total_ms} ms ({})",
            how_l1_ended(&qemu_log_tail)
        ),
        (Some(why), _) => format!("the harness killed QEMU after {total_ms} ms: {why}"),
        (None, Some(_)) => "L1 finished the plan (`@@lab done`) without running it".to_string(),
        (None, None) => format!(
            "QEMU exited ({status}) after {total_ms} ms without `@@lab done` (L1 crashed or powered off early; {})",
            how_l1_ended(&qemu_log_tail)
        ),
    };
    let error = parser.error.clone();
    let ready_ms = parser.ready_ms;
    let ready_uptime_ms = parser.ready_uptime_ms;
    let (outcomes, console) = parser.finish(&stop, total_ms);
    let console_tail = tail(&console, TAIL_LINES);
    if !qemu_log_tail.trim().is_empty() {
        // L1 died: keep the end of QEMU's log with the report for whoever reads it.
        let log_tail = tail(&qemu_log_tail, TAIL_LINES);
        if cfg.verbose {
            eprintln!(
                "[{}] end of QEMU's -d cpu_reset,guest_errors log:\n{log_tail}",
                cfg.label
            );
        }
        qemu_stderr.push_str("--- end of QEMU's -d cpu_reset,guest_errors log ---\n");
        qemu_stderr.push_str(&log_tail);
    }
    let stderr_note = if qemu_stderr.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- QEMU stderr ---\n{}", qemu_stderr.trim_end())
    };
    if let Some((reason, _)) = error {
        return Err(HarnessError::Lab(format!(
            "L1 reported `@@lab error={reason}`\n--- last {TAIL_LINES} lab console lines ---\n{console_tail}{stderr_note}"
        )));
    }
    if ready_ms.is_none() {
        return Err(HarnessError::Lab(format!(
            "L1 never became ready: {stop}\n--- last {TAIL_LINES} lab console lines ---\n{console_tail}{stderr_note}"
        )));
    }
    for o in outcomes.iter().filter(|o| o.lost.is_some()) {
        eprintln!(
            "!!!!!!!! harness: lab guest '{}' LOST: {}\n!!!!!!!!",
            o.name,
            o.lost.as_deref().unwrap_or("")
        );
    }
    let report = crate::LabReport {
        l1_ready_ms: ready_ms,
        l1_uptime_ms: ready_uptime_ms,
        total_ms,
        console,
        qemu_stderr,
        boots: Vec::new(),
        parallel: 1,
        wall_ms: total_ms,
    };
    Ok((outcomes, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5c9f6000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0d1a000000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0d19e00000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f0d1a2c5000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0d19e00000)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
        assert_eq!(
            parse_ldd("\tstatically linked\n").unwrap(),
            Vec::<String>::new()
        );
    }

    /// ldd on a real dynamic binary of this host names the loader, and every path
    /// resolves to a file.
    #[test]
    fn ldd_on_host_binary() {
        let libs = ldd_libs(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.contains("ld-linux")),
            "no dynamic loader in {libs:?}"
        );
        for l in libs {
            assert!(Path::new(&l).canonicalize().unwrap().is_file(), "{l}");
        }
    }

    #[test]
    fn binary_with_libs_on_host_binary() {
        let files = binary_with_libs("/lab/bin/sh", Path::new("/bin/sh")).unwrap();
        assert_eq!(
            files[0],
            ("/lab/bin/sh".to_string(), PathBuf::from("/bin/sh"))
        );
        assert!(files.len() > 1, "{files:?}");
        for (in_lab, host) in &files[1..] {
            assert!(in_lab.starts_with('/'), "{in_lab}");
            assert!(host.is_file() && !host.is_symlink(), "{}", host.display());
        }
    }

    #[test]
    fn plan_has_one_quoted_run_guest_per_spec() {
        let specs = [
            GuestSpec::new("a", "boot").cpus(2, 8),
            GuestSpec::new("b", "boot").cmdline("x='1 2'"),
            GuestSpec::new("c", "boot").custom_command(["echo", "@@guest done"]),
        ];
        let plan = plan_script(&specs);
        assert!(plan.contains(
            "run_guest a timeout -s TERM -k 10 90 /lab/blkswarm --kernel /lab/guest/vmlinuz \
             --initramfs /lab/guest/initramfs.cpio.gz --cmdline \
             'console=ttyS0 quiet panic=-1 blkswarm.scenario=boot' --cpus boot=2,max=8 \
             --memory size=1G --report /tmp/blkswarm-reports/a\n"
        ));
        // Reports come back for VMM guests only.
        assert!(plan.contains("emit_report a /tmp/blkswarm-reports/a\n"));
        assert!(!plan.contains("emit_report c"));
        assert!(
            plan.contains("'console=ttyS0 quiet panic=-1 blkswarm.scenario=boot x='\\''1 2'\\'''")
        );
        assert!(plan.contains("    run_guest c echo '@@guest done'\n"));
        assert_eq!(plan.matches("run_guest ").count(), 6);
    }

    /// The plan runs under a real shell with a stub run_guest and gives back the argv.
    #[test]
    fn plan_runs_in_sh() {
        let specs = [
            GuestSpec::new("a", "boot").cmdline("q=\"it's\" $HOME"),
            GuestSpec::new("b", "boot").custom_command(["printf", "%s|", "", "x y"]),
        ];
        let script = format!(
            "run_guest() {{ echo \"begin $1\"; shift; for a in \"$@\"; do printf '<%s>' \"$a\"; done; echo; }}\n{}",
            plan_script(&specs)
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains(
                "<--cmdline><console=ttyS0 quiet panic=-1 blkswarm.scenario=boot q=\"it's\" $HOME>"
            ),
            "{text}"
        );
        assert!(text.contains("<printf><%s|><><x y>"), "{text}");
    }

    /// Each blkswarm guest: the KVM trace is cleared before it and dumped after it only when
    /// it exited 3 (a guest fault); other commands are left alone; an L1 image without the
    /// trace helpers still runs the plan.
    #[test]
    fn plan_clears_and_dumps_the_kvm_trace() {
        let mut ctl = GuestSpec::new("d", "boot").custom_command(["sh", "-c", "exit 3"]);
        ctl.command_runs_vmm = true;
        let specs = [
            GuestSpec::new("a", "boot"),
            GuestSpec::new("b", "boot"),
            GuestSpec::new("c", "boot").custom_command(["make_image", "/x", "1M"]),
            ctl,
        ];
        let plan = plan_script(&specs);
        assert!(
            plan.contains(
                "trace_clear\nif limit /lab/blkswarm; then\n\
                 \x20   run_guest a timeout"
            ),
            "{plan}"
        );
        assert!(
            plan.contains("fi\ntrace_fault a $?\nemit_report a /tmp/blkswarm-reports/a\n"),
            "{plan}"
        );
        assert!(!plan.contains("trace_fault c"), "{plan}");
        assert_eq!(plan.matches("\ntrace_clear\n").count(), 3, "{plan}");
        assert_eq!(plan.matches("\ntrace_fault ").count(), 3, "{plan}");

        // a faults (3), b does not, c is a helper (3, but no VMM), d runs the VMM (3).
        let stubs =
            "run_guest() { echo \"run $1\"; case $1 in a|c|d) return 3 ;; esac; return 0; }\n";
        let helpers = "lab_trace_clear() { echo clear; }\nlab_trace_dump() { echo \"dump $1\"; }\n";
        let run = |script: String| {
            let out = Command::new("sh").args(["-c", &script]).output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        assert_eq!(
            run(format!("{stubs}{helpers}{plan}")),
            "clear\nrun a\ndump a\nclear\nrun b\nrun c\nclear\nrun d\ndump d\n"
        );
        assert_eq!(
            run(format!("{stubs}{plan}")),
            "run a\nrun b\nrun c\nrun d\n"
        );
    }

    #[test]
    fn initrd_layout() {
        let dir = TempDir::new("blkswarm-test").unwrap();
        let base = dir.0.join("base");
        std::fs::write(&base, b"\x1f\x8b12345").unwrap(); // 7 bytes: 1 byte of padding
        let extra = dir.0.join("lib.so");
        std::fs::write(&extra, b"ELF").unwrap();
        let out = dir.0.join("initrd");
        let files = [PayloadFile {
            in_lab: "/lib64/ld-linux-x86-64.so.2".into(),
            host: extra,
            perm: 0o755,
        }];
        let off = write_initrd(&out, &base, "echo hi\n", &files).unwrap();
        assert_eq!(off, 8);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x1f\x8b12345\0");
        let entries = crate::cpio::parse_newc(&bytes[8..]).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["lab", "lab/plan.sh", "lib64", "lib64/ld-linux-x86-64.so.2"]
        );
        assert_eq!(entries[1].2, b"echo hi\n");
        assert_eq!(entries[3].2, b"ELF");
    }

    /// `lab::run` against a fake QEMU (a shell script printing a canned console), to
    /// check deadlines, kills and errors without booting anything.
    fn fake_lab(console_script: &str, boot_timeout: Duration) -> (TempDir, LabConfig) {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("blkswarm-fake-lab").unwrap();
        let cache = dir.0.join("cache");
        std::fs::create_dir_all(cache.join("lab")).unwrap();
        std::fs::create_dir_all(cache.join("guest")).unwrap();
        std::fs::write(cache.join("lab/l1-base.cpio.gz"), b"base").unwrap();
        std::fs::write(cache.join("guest/vmlinuz"), b"kernel").unwrap();
        let qemu = dir.0.join("qemu");
        // The fake checks that it was given an initrd holding the plan.
        let script = format!(
            "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -initrd ] && I=$2; shift; done\n\
             grep -q 'run_guest g1' \"$I\" || {{ echo 'no plan in initrd' >&2; exit 9; }}\n{console_script}\n"
        );
        std::fs::write(&qemu, script).unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = LabConfig {
            qemu,
            paths: Paths {
                repo: dir.0.clone(),
                cache,
            },
            bin: None,
            memory_mib: 64,
            boot_timeout,
            verbose: false,
            guest_grace: Duration::ZERO,
            extra_files: Vec::new(),
            label: "lab".into(),
        };
        (dir, cfg)
    }

    fn g1_g2() -> [GuestSpec; 2] {
        [
            GuestSpec::new("g1", "x")
                .custom_command(["true"])
                .timeout(Duration::from_secs(1)),
            GuestSpec::new("g2", "x").custom_command(["true"]),
        ]
    }

    #[test]
    fn fake_lab_guest_hang_kills_qemu() {
        let (_dir, cfg) = fake_lab(
            "echo '@@lab kvm=ok'; echo '@@lab ready uptime_ms=5'\n\
             echo '@@lab guest-begin name=g1'; echo '@@guest partial=1'; exec sleep 600",
            Duration::from_secs(20),
        );
        let t0 = Instant::now();
        let (o, report) = run(&cfg, &g1_g2()).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert!(report.l1_ready_ms.is_some());
        assert_eq!(report.l1_uptime_ms, Some(5));
        let lost = o[0].lost.as_deref().unwrap();
        assert!(lost.contains("killed QEMU"), "{lost}");
        assert!(
            lost.starts_with("began but never ended: L1 hung: guest 'g1' ran past its timeout"),
            "{lost}"
        );
        assert!(lost.contains("@@guest partial=1"), "{lost}");
        assert!(o[1]
            .lost
            .as_deref()
            .unwrap()
            .starts_with("never started: L1 hung"));
        assert!(o[0].lost_with_the_lab() && o[1].lost_with_the_lab());
    }

    #[test]
    fn fake_lab_never_ready() {
        let (_dir, cfg) = fake_lab("echo booting; exec sleep 600", Duration::from_secs(1));
        let e = run(&cfg, &g1_g2()).unwrap_err().to_string();
        assert!(e.contains("L1 never became ready"), "{e}");
        assert!(e.contains("within 1 s") && e.contains("booting"), "{e}");
    }

    #[test]
    fn fake_lab_error_line() {
        let (_dir, cfg) = fake_lab(
            "echo '@@lab error=insmod-kvm_amd'; echo '@@lab done'",
            Duration::from_secs(20),
        );
        let e = run(&cfg, &g1_g2()).unwrap_err().to_string();
        assert!(e.contains("`@@lab error=insmod-kvm_amd`"), "{e}");
    }

    #[test]
    fn fake_lab_qemu_fails() {
        let (_dir, cfg) = fake_lab(
            "echo 'qemu: could not load kernel' >&2; exit 1",
            Duration::from_secs(20),
        );
        let e = run(&cfg, &g1_g2()).unwrap_err().to_string();
        assert!(e.contains("QEMU exited (exit status: 1)"), "{e}");
        assert!(e.contains("qemu: could not load kernel"), "{e}");
    }

    #[test]
    fn fake_lab_clean_run() {
        let (_dir, cfg) = fake_lab(
            "echo '@@lab kvm=ok'; echo '@@lab ready uptime_ms=5'\n\
             for g in g1 g2; do echo \"@@lab guest-begin name=$g\"; echo '@@guest done'; \
             echo \"@@lab guest-end name=$g rc=0 wall_ms=7\"; done; echo '@@lab done'",
            Duration::from_secs(20),
        );
        let (o, report) = run(&cfg, &g1_g2()).unwrap();
        assert!(o.iter().all(|o| o.expect_clean().is_ok()), "{o:?}");
        assert_eq!(o[1].wall_ms, Some(7));
        assert!(report.console.contains("@@lab done"));
    }

    #[test]
    fn how_l1_ended_reads_the_qemu_log() {
        assert_eq!(how_l1_ended(""), "QEMU's log is empty");
        let boot = "CPU Reset (CPU 0)\nEAX=00000000 EBX=00000000\nCPU Reset (CPU 1)\n";
        assert!(how_l1_ended(boot).contains("no triple fault"));
        let died = format!("{boot}Triple fault\nCPU Reset (CPU 1)\nEAX=00000000\n");
        assert_eq!(how_l1_ended(&died), "QEMU logged 1 triple fault(s) in L1");
    }

    #[test]
    fn read_tail_keeps_the_end() {
        let dir = TempDir::new("blkswarm-tail-test").unwrap();
        let f = dir.0.join("log");
        std::fs::write(&f, "abcdef").unwrap();
        assert_eq!(read_tail(&f, 4), "cdef");
        assert_eq!(read_tail(&f, 100), "abcdef");
        assert_eq!(read_tail(&dir.0.join("missing"), 4), "");
    }

    fn feed_all(p: &mut LabParser, text: &str) {
        for (i, l) in text.split('\n').enumerate() {
            p.feed(l, i as u64 * 100);
        }
    }

    #[test]
    fn parser_attributes_lines_to_guests() {
        let mut p = LabParser::new(&["one", "two"]);
        feed_all(
            &mut p,
            "SeaBIOS noise\r\n\
             @@lab kvm=ok\r\n\
             @@lab ready uptime_ms=5123\r\n\
             @@lab guest-begin name=one\r\n\
             [    1.0] kvm: something\r\n\
             @@guest nproc=1\r\n\
             @@vmm first_run_us=99\r\n\
             @@guest done\r\n\
             @@vmm exit reason=poweroff\r\n\
             @@lab guest-end name=one rc=0 wall_ms=8000\r\n\
             @@lab report name=one json={\"schema\":\"x\",\"disks\":[]}\r\n\
             @@lab guest-begin name=two\r\n\
             @@guest nproc=2\r\n\
             @@guest done@@lab guest-end name=two rc=3 wall_ms=9000\r\n\
             @@lab done\r",
        );
        assert!(p.kvm_ok);
        assert_eq!(p.ready_ms, Some(200));
        assert_eq!(p.ready_uptime_ms, Some(5123));
        assert!(p.done_ms.is_some());
        assert!(p.current().is_none());
        let (o, console) = p.finish("unused", 9999);
        assert!(console.contains("SeaBIOS noise"));
        assert_eq!(o[0].report.as_deref(), Some(r#"{"schema":"x","disks":[]}"#));
        assert!(
            !console.contains("\"schema\""),
            "the JSON stays out of the console"
        );
        assert!(o[1].report.is_none());
        assert_eq!(o[0].exit_code, Some(0));
        assert_eq!(o[0].wall_ms, Some(8000));
        assert!(o[0].done);
        assert_eq!(o[0].get("nproc"), Some("1"));
        assert_eq!(o[0].vmm_get("reason"), Some("poweroff"));
        assert_eq!(o[0].vmm_get("first_run_us"), Some("99"));
        assert!(o[0].console.contains("kvm: something"));
        assert!(!o[0].console.contains("@@lab"));
        assert_eq!(o[0].expect_clean(), Ok(()));
        assert_eq!(o[1].exit_code, Some(3));
        assert!(
            o[1].done,
            "glued `@@guest done@@lab guest-end` must still count"
        );
        assert!(o[1].lost.is_none());
        assert!(o[1].expect_clean().unwrap_err().contains("exit code 3"));
    }

    /// `@@lab trace name=NAME` lines arrive after the guest's `guest-end` (and may arrive
    /// during the next guest): they go to the named guest's console, not the running one's.
    #[test]
    fn parser_gives_trace_lines_to_the_named_guest() {
        let exit = "vcpu0-201 [000] d..1. 12.000002: kvm_exit: vcpu 0 reason shutdown \
                    rip 0x100215 info1 0x0000000000000000";
        let mut p = LabParser::new(&["one", "two"]);
        feed_all(
            &mut p,
            &format!(
                "@@lab kvm=ok\n@@lab tracing=on events=kvm_exit,kvm_inj_exception\n\
                 @@lab ready uptime_ms=1\n\
                 @@lab guest-begin name=one\n\
                 blkswarm: guest fault on vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)\n\
                 @@vmm exit reason=fault\n\
                 @@lab guest-end name=one rc=3 wall_ms=900\n\
                 @@lab trace name=one # lines=2 shown=2 shutdown_exits=1\n\
                 @@lab trace name=one vcpu0-201 [000] d..1. 12.000001: kvm_inj_exception: #UD\n\
                 @@lab trace name=one {exit}\n\
                 @@lab guest-begin name=two\n\
                 @@guest done\n\
                 @@lab trace name=one late line\n\
                 @@lab trace name=zzz stray\n\
                 @@lab guest-end name=two rc=0 wall_ms=5\n\
                 @@lab done\n"
            ),
        );
        assert!(p.error.is_none());
        let (o, console) = p.finish("unused", 9999);
        assert!(o[0].triple_faulted(), "{:?}", o[0]);
        assert_eq!(o[0].exit_code, Some(3));
        let traced: Vec<&str> = o[0]
            .console
            .lines()
            .filter(|l| l.starts_with("@@lab trace name=one "))
            .collect();
        assert_eq!(
            traced,
            [
                "@@lab trace name=one # lines=2 shown=2 shutdown_exits=1",
                "@@lab trace name=one vcpu0-201 [000] d..1. 12.000001: kvm_inj_exception: #UD",
                &format!("@@lab trace name=one {exit}"),
                "@@lab trace name=one late line",
            ]
        );
        assert!(o[0].console.ends_with("late line\n"), "{}", o[0].console);
        assert!(
            o[0].console.find("triple fault").unwrap() < o[0].console.find("@@lab trace").unwrap()
        );
        assert!(!o[1].console.contains("@@lab"), "{}", o[1].console);
        assert_eq!(o[1].expect_clean(), Ok(()));
        assert!(console.contains(&format!("@@lab trace name=one {exit}\n")));
        assert!(console.contains("trace line for unknown guest \"zzz\""));
    }

    #[test]
    fn parser_reports_lost_guests_loudly() {
        let mut p = LabParser::new(&["one", "two", "three"]);
        let mut text = String::from(
            "@@lab kvm=ok\n@@lab ready uptime_ms=1\n\
             @@lab guest-begin name=one\n@@guest done\n@@lab guest-end name=one rc=0 wall_ms=1\n\
             @@lab guest-begin name=two\n@@guest nproc=2\n",
        );
        for i in 0..50 {
            text.push_str(&format!("noise {i}\n"));
        }
        text.push_str("Kernel panic - not syncing: oops\n");
        feed_all(&mut p, &text);
        assert_eq!(p.current().map(|c| c.0), Some("two"));
        let (o, _) = p.finish("QEMU exited (exit status: 0)", 99_000);
        assert!(o[0].lost.is_none());
        let lost = o[1].lost.as_deref().unwrap();
        assert!(
            lost.starts_with("began but never ended: QEMU exited"),
            "{lost}"
        );
        assert!(lost.contains("Kernel panic"), "{lost}");
        assert!(
            lost.contains("noise 49") && !lost.contains("noise 5\n"),
            "{lost}"
        );
        assert_eq!(o[1].get("nproc"), Some("2"));
        let err = o[1].expect_clean().unwrap_err();
        assert!(
            err.contains("LOST") && err.contains("Kernel panic"),
            "{err}"
        );
        assert!(o[2]
            .lost
            .as_deref()
            .unwrap()
            .starts_with("never started: QEMU exited"));
    }

    #[test]
    fn parser_error_and_surprises() {
        let mut p = LabParser::new(&["one"]);
        feed_all(
            &mut p,
            "@@lab error=kvm_amd failed to load: No such device\n\
             @@lab guest-end name=one rc=0\n\
             @@lab guest-begin name=zzz\n",
        );
        assert_eq!(
            p.error.as_ref().map(|e| e.0.as_str()),
            Some("kvm_amd failed to load: No such device")
        );
        assert!(p.current().is_none());
        let (o, console) = p.finish("stop", 1);
        assert!(console.contains("unexpected guest-begin"));
        assert!(console.contains("does not match"));
        assert!(o[0].lost.is_some());
    }
}
