//! `blkswarm-bench --many-disks N`: blkswarm vs QEMU with hundreds of null virtio-blk
//! disks (issue 4, item 7).
//!
//! (a) Native device creation, no guest: each VMM builds the whole VM on this host and
//!     stops before the guest runs; launch -> ready wall time and peak RSS (wait4
//!     rusage). blkswarm: `--dry-run` (exits before the first KVM_RUN) when the binary has
//!     it, else killed at its `@@vmm first_run_us=` line. QEMU: TCG, `-S`, QMP on stdio;
//!     ready is the answer to the first QMP command (QMP commands run in the main loop,
//!     after every `-device` exists; the greeting comes earlier), then `quit`.
//! (b) Boot in one lab run: the `disks` guest scenario with both VMMs, wall time from
//!     launch until the VMM exits after the guest printed every disk it sees.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::{GuestOutcome, GuestSpec};

pub use harness::qemu_l2::qemu_disk_args;
/// Headroom left to the rest of the machine when QEMU's RSS is capped by default.
const RSS_HEADROOM_KIB: u64 = 2 << 20;
/// How often the child's RSS is sampled (it is also the cap's reaction time).
const POLL: Duration = Duration::from_millis(20);

/// What the many-disk mode was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct ManyCli {
    /// The headline disk count.
    pub disks: u32,
    /// Counts measured natively (the trend), ascending, including `disks`.
    pub native_counts: Vec<u32>,
    /// Disk counts of the lab boot comparison, in run order.
    pub boot_disks: Vec<u32>,
    /// QEMU boots only up to this many disks (its RSS in L1 must fit L1's memory).
    pub qemu_boot_max: u32,
    pub queues: u32,
    pub skip_native: bool,
    pub skip_boot: bool,
    /// Kill QEMU natively past this RSS (KiB); None: MemAvailable minus 2 GiB.
    pub rss_cap_kib: Option<u64>,
    /// Per-guest timeout of the lab boot; None: from the disk count.
    pub boot_timeout: Option<Duration>,
}

/// What the blkswarm binary supports (from its `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkswarmFeatures {
    pub disk_groups: bool,
    pub dry_run: bool,
}

impl BlkswarmFeatures {
    pub fn probe(bin: &Path) -> BlkswarmFeatures {
        let help = Command::new(bin)
            .arg("--help")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default();
        BlkswarmFeatures {
            disk_groups: help.contains("--disks"),
            dry_run: help.contains("--dry-run"),
        }
    }
}

/// blkswarm's disks: one `--disks count=N` group, or N `--disk` when groups are missing.
pub fn blkswarm_disk_args(n: u32, queues: u32, size: &str, groups: bool) -> Vec<String> {
    let keys = format!("backend=null,size={size},num_queues={queues}");
    if groups {
        vec!["--disks".into(), format!("count={n},{keys}")]
    } else {
        (0..n)
            .flat_map(|_| ["--disk".to_string(), keys.clone()])
            .collect()
    }
}

/// When a natively started VMM counts as "devices created".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// QEMU: the first QMP `{"return"` on stdout; then `quit` is sent.
    QemuQmp,
    /// blkswarm `--dry-run`: the `@@vmm dry_run` line; the VMM exits by itself.
    BlkswarmDryRun,
    /// blkswarm without `--dry-run`: the `@@vmm first_run_us=` line; then SIGKILL.
    BlkswarmFirstRun,
}

impl Ready {
    fn how(self) -> &'static str {
        match self {
            Ready::QemuQmp => "TCG -S, first QMP reply, then quit",
            Ready::BlkswarmDryRun => "--dry-run (exits before the first KVM_RUN)",
            Ready::BlkswarmFirstRun => "killed at its first KVM_RUN (no --dry-run in this binary)",
        }
    }
}

/// One native measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub vmm: &'static str,
    pub disks: u32,
    /// Launch -> ready, ms (host wall clock).
    pub ready_ms: Option<f64>,
    /// `@@vmm dry_run created_us=` or `first_run_us=` (blkswarm's own clock).
    pub vmm_us: Option<u64>,
    /// ru_maxrss of the reaped child, KiB.
    pub maxrss_kib: u64,
    /// Launch -> reaped, ms.
    pub exit_ms: f64,
    /// The RSS cap fired: the numbers are lower bounds.
    pub capped: bool,
    pub how: &'static str,
    pub error: Option<String>,
}

fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The default QEMU RSS cap: what the machine has available now, minus headroom.
pub fn default_rss_cap_kib() -> u64 {
    mem_available_kib()
        .unwrap_or(u64::MAX)
        .saturating_sub(RSS_HEADROOM_KIB)
}

fn line_reader<R: Read + Send + 'static>(r: R, err: bool, tx: mpsc::Sender<(bool, String)>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send((err, line)).is_err() {
                break;
            }
        }
    });
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Starts `argv`, waits for `ready`, ends it as `ready` says, reaps it with wait4 and
/// returns wall times and peak RSS. Past `cap_kib` of RSS or `timeout`, it is killed.
pub fn measure(
    vmm: &'static str,
    disks: u32,
    argv: &[String],
    ready: Ready,
    cap_kib: u64,
    timeout: Duration,
) -> Native {
    let mut out = Native {
        vmm,
        disks,
        ready_ms: None,
        vmm_us: None,
        maxrss_kib: 0,
        exit_ms: 0.0,
        capped: false,
        how: ready.how(),
        error: None,
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("cannot start {}: {e}", argv[0]));
            return out;
        }
    };
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take();
    if ready == Ready::QemuQmp {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n");
        }
    } else {
        stdin = None; // blkswarm reads nothing
    }
    let (tx, rx) = mpsc::channel();
    line_reader(child.stdout.take().expect("piped"), false, tx.clone());
    line_reader(child.stderr.take().expect("piped"), true, tx);
    let ms = |t: Instant| t.duration_since(start).as_secs_f64() * 1000.0;
    let mut tail: Vec<String> = Vec::new();
    let mut killed_why: Option<String> = None;
    let kill = |why: &mut Option<String>, msg: String| {
        if why.is_none() {
            // SAFETY: plain kill(2) on our own child, not yet reaped (wait4 below is the
            // only reaper), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            *why = Some(msg);
        }
    };
    let mut peak_polled = 0u64;
    let status = loop {
        match rx.recv_timeout(POLL) {
            Ok((is_err, line)) => {
                let now = Instant::now();
                let hit = match ready {
                    Ready::QemuQmp => !is_err && line.trim_start().starts_with("{\"return\""),
                    Ready::BlkswarmDryRun => is_err && line.contains("@@vmm dry_run"),
                    Ready::BlkswarmFirstRun => is_err && line.contains("@@vmm first_run_us="),
                };
                if hit && out.ready_ms.is_none() {
                    out.ready_ms = Some(ms(now));
                    match ready {
                        Ready::QemuQmp => {
                            if let Some(s) = stdin.as_mut() {
                                let _ = s.write_all(b"{\"execute\":\"quit\"}\n");
                            }
                        }
                        Ready::BlkswarmDryRun => {
                            out.vmm_us = number_after(&line, "created_us=");
                        }
                        Ready::BlkswarmFirstRun => {
                            out.vmm_us = number_after(&line, "first_run_us=");
                            kill(&mut killed_why, String::new());
                        }
                    }
                }
                if is_err || !line.starts_with("{\"") {
                    tail.push(line);
                    if tail.len() > 8 {
                        tail.remove(0);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(r) = rss_kib(pid) {
            peak_polled = peak_polled.max(r);
            if r > cap_kib {
                kill(
                    &mut killed_why,
                    format!(
                        "RSS passed the cap of {} MiB after {:.1} s: killed",
                        cap_kib / 1024,
                        start.elapsed().as_secs_f64()
                    ),
                );
                out.capped = true;
            }
        }
        if start.elapsed() > timeout {
            kill(
                &mut killed_why,
                format!("no result within {} s: killed", timeout.as_secs()),
            );
        }
        let mut st = 0;
        // SAFETY: rusage is plain old data, zero is a valid value; wait4 writes it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid pointers to locals.
        let r = unsafe { libc::wait4(pid, &mut st, libc::WNOHANG, &mut ru) };
        if r == pid {
            out.exit_ms = ms(Instant::now());
            out.maxrss_kib = (ru.ru_maxrss as u64).max(peak_polled);
            break st;
        }
        if r == -1 {
            out.error = Some(format!("wait4: {}", std::io::Error::last_os_error()));
            return out;
        }
    };
    drop(stdin);
    // Late lines (an error message after the ready marker) for the failure report.
    while let Ok((_, line)) = rx.recv_timeout(Duration::from_millis(100)) {
        if !line.starts_with("{\"") {
            tail.push(line);
        }
    }
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let expected_kill = ready == Ready::BlkswarmFirstRun
        && killed_why.as_deref() == Some("")
        && libc::WIFSIGNALED(status);
    if out.ready_ms.is_none() || !(exited_ok || expected_kill) || out.capped {
        let why = match &killed_why {
            Some(w) if !w.is_empty() => w.clone(),
            _ if libc::WIFEXITED(status) => format!("exit status {}", libc::WEXITSTATUS(status)),
            _ => format!("killed by signal {}", libc::WTERMSIG(status)),
        };
        out.error = Some(format!(
            "{why}{}; last output: {}",
            if out.ready_ms.is_none() {
                " before it was ready"
            } else {
                ""
            },
            tail.join(" | ")
        ));
    }
    out
}

/// Power-law fit through the two largest good points, for a labelled extrapolation:
/// (exponent, value at `n`).
pub fn extrapolate(points: &[(u32, f64)], n: u32) -> Option<(f64, f64)> {
    let mut p: Vec<(u32, f64)> = points.iter().copied().filter(|p| p.1 > 0.0).collect();
    p.sort_by_key(|p| p.0);
    p.dedup_by_key(|p| p.0);
    let [.., (n1, y1), (n2, y2)] = p[..] else {
        return None;
    };
    let k = (y2 / y1).ln() / (f64::from(n2) / f64::from(n1)).ln();
    Some((k, y2 * (f64::from(n) / f64::from(n2)).powf(k)))
}

fn pct(b: f64, q: f64) -> String {
    if q > 0.0 {
        format!("{:.2}%", 100.0 * b / q)
    } else {
        "-".into()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Table and `@@bench` lines for the native measurements.
pub fn native_report(rows: &[Native], headline: u32) -> String {
    let mut s = String::from(
        "\n-- (a) native device creation, no guest (this host, /dev/kvm software KVM for blkswarm, TCG for QEMU)\n",
    );
    s.push_str(&format!(
        "{:<9} {:>6} {:>12} {:>12} {:>12}  {}\n",
        "VMM", "disks", "ready ms", "exit ms", "peak RSS MiB", "how"
    ));
    for r in rows {
        match &r.error {
            None => s.push_str(&format!(
                "{:<9} {:>6} {:>12.1} {:>12.1} {:>12.1}  {}{}\n",
                r.vmm,
                r.disks,
                r.ready_ms.unwrap_or(0.0),
                r.exit_ms,
                mib(r.maxrss_kib),
                r.how,
                r.vmm_us.map_or(String::new(), |u| format!(
                    " (vmm says {:.1} ms)",
                    u as f64 / 1000.0
                ))
            )),
            Some(e) => s.push_str(&format!(
                "{:<9} {:>6} {:>12} {:>12.1} {:>12.1}  FAILED: {}\n",
                r.vmm,
                r.disks,
                r.ready_ms.map_or("-".into(), |v| format!("{v:.1}")),
                r.exit_ms,
                mib(r.maxrss_kib),
                e
            )),
        }
    }
    let good = |vmm: &str, n: u32| {
        rows.iter()
            .find(|r| r.vmm == vmm && r.disks == n && r.error.is_none())
    };
    let mut counts: Vec<u32> = rows.iter().map(|r| r.disks).collect();
    counts.sort_unstable();
    counts.dedup();
    let header = s.len();
    for &n in &counts {
        let b = good("blkswarm", n);
        let q = good("qemu", n);
        if let (Some(b), Some(q)) = (b, q) {
            let (bt, qt) = (b.ready_ms.unwrap_or(0.0), q.ready_ms.unwrap_or(0.0));
            s.push_str(&format!(
                "  {n:>4} disks: creation time {}  peak RSS {}  (measured)\n",
                pct(bt, qt),
                pct(b.maxrss_kib as f64, q.maxrss_kib as f64)
            ));
        } else if let (Some(b), None) = (b, q) {
            let qt: Vec<(u32, f64)> = counts
                .iter()
                .filter_map(|&c| good("qemu", c).map(|q| (c, q.ready_ms.unwrap_or(0.0))))
                .filter(|p| p.0 < n)
                .collect();
            let qr: Vec<(u32, f64)> = counts
                .iter()
                .filter_map(|&c| good("qemu", c).map(|q| (c, q.maxrss_kib as f64)))
                .filter(|p| p.0 < n)
                .collect();
            if let (Some((kt, et)), Some((kr, er))) = (extrapolate(&qt, n), extrapolate(&qr, n)) {
                s.push_str(&format!(
                    "  {n:>4} disks: QEMU did not complete here; EXTRAPOLATED QEMU {:.1} s (n^{kt:.2}), {:.0} MiB (n^{kr:.2}): \
                     creation time {}  peak RSS {}\n",
                    et / 1000.0,
                    er / 1024.0,
                    pct(b.ready_ms.unwrap_or(0.0), et),
                    pct(b.maxrss_kib as f64, er)
                ));
                s.push_str(&format!(
                    "@@bench many_disks native vmm=qemu disks={n} extrapolated=1 ready_ms={et:.0} peak_rss_kib={er:.0}\n"
                ));
            }
        }
    }
    if s.len() > header {
        s.insert_str(
            header,
            "ratio blkswarm/qemu (goal at 500 disks: time < 1%, RSS < 5%):\n",
        );
    }
    for r in rows {
        s.push_str(&format!(
            "@@bench many_disks native vmm={} disks={} {}ready_ms={} exit_ms={:.1} peak_rss_kib={}{}\n",
            r.vmm,
            r.disks,
            if r.error.is_some() { "failed=1 " } else { "" },
            r.ready_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.exit_ms,
            r.maxrss_kib,
            if r.capped { " capped=1" } else { "" }
        ));
    }
    if let (Some(b), Some(q)) = (good("blkswarm", headline), good("qemu", headline)) {
        s.push_str(&format!(
            "@@bench many_disks native ratio disks={headline} time_pct={:.3} rss_pct={:.3}\n",
            100.0 * b.ready_ms.unwrap_or(0.0) / q.ready_ms.unwrap_or(f64::MAX),
            100.0 * b.maxrss_kib as f64 / q.maxrss_kib as f64
        ));
    }
    s
}

/// One lab boot row.
#[derive(Debug, Clone, PartialEq)]
pub struct Boot {
    pub vmm: &'static str,
    pub disks: u32,
    pub wall_ms: Option<u64>,
    pub seen: Option<u32>,
    pub uptime_ms: Option<u64>,
    pub error: Option<String>,
}

pub fn boot_row(vmm: &'static str, disks: u32, o: &GuestOutcome) -> Boot {
    let seen = o.get("disks").and_then(|v| v.parse().ok());
    let mut error = o.expect_clean().err();
    if error.is_none() {
        if let Some(e) = o.get("error") {
            error = Some(format!("guest error: {e}"));
        } else if seen.is_none() {
            error = Some("no `@@guest disks=` line".into());
        }
    }
    Boot {
        vmm,
        disks,
        wall_ms: o.wall_ms,
        seen,
        uptime_ms: o.get("uptime_ms").and_then(|v| v.parse().ok()),
        error,
    }
}

pub fn boot_report(rows: &[Boot]) -> String {
    let mut s = String::from(
        "\n-- (b) lab boot, same L1 run: launch -> VMM exit after the guest printed every disk it sees\n",
    );
    s.push_str(&format!(
        "{:<9} {:>6} {:>10} {:>10} {:>16}\n",
        "VMM", "disks", "seen", "wall s", "guest uptime s"
    ));
    let secs = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.1}", v as f64 / 1000.0));
    for r in rows {
        s.push_str(&format!(
            "{:<9} {:>6} {:>10} {:>10} {:>16}{}\n",
            r.vmm,
            r.disks,
            r.seen.map_or("-".into(), |v| v.to_string()),
            secs(r.wall_ms),
            secs(r.uptime_ms),
            r.error.as_ref().map_or(String::new(), |e| format!(
                "  FAILED: {}",
                e.lines().next().unwrap_or("")
            ))
        ));
    }
    let mut counts: Vec<u32> = rows.iter().map(|r| r.disks).collect();
    counts.dedup();
    for n in counts {
        let good = |vmm: &str| {
            rows.iter()
                .find(|r| r.vmm == vmm && r.disks == n && r.error.is_none())
        };
        let (Some(b), Some(q)) = (good("blkswarm"), good("qemu")) else {
            continue;
        };
        if let (Some(bw), Some(qw)) = (b.wall_ms, q.wall_ms) {
            s.push_str(&format!(
                "ratio blkswarm/qemu boot wall time at {} disks: {} (goal: at most 50%)\n",
                b.disks,
                pct(bw as f64, qw as f64)
            ));
            s.push_str(&format!(
                "@@bench many_disks boot ratio disks={} wall_pct={:.1}\n",
                b.disks,
                100.0 * bw as f64 / qw as f64
            ));
        }
    }
    for r in rows {
        s.push_str(&format!(
            "@@bench many_disks boot vmm={} disks={} {}seen={} wall_ms={} guest_uptime_ms={}\n",
            r.vmm,
            r.disks,
            if r.error.is_some() { "failed=1 " } else { "" },
            r.seen.map_or("-".into(), |v| v.to_string()),
            r.wall_ms.map_or("-".into(), |v| v.to_string()),
            r.uptime_ms.map_or("-".into(), |v| v.to_string())
        ));
    }
    s
}

/// The lab guest of the boot comparison (same for both VMMs).
pub fn boot_guest(name: &str, cpus: u32, memory_mib: u64, timeout: Duration) -> GuestSpec {
    GuestSpec::new(name, "disks")
        .cpus(cpus, cpus)
        .memory_mib(memory_mib)
        // The guest's own wait for the disk count to settle: longer than any boot here.
        .cmdline(&format!("blkswarm.timeout={}", timeout.as_secs()))
        .timeout(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_layout() {
        let v = qemu_disk_args(32, 2, "1G").unwrap();
        assert_eq!(v.iter().filter(|a| a.starts_with("pci-bridge")).count(), 2);
        assert_eq!(v[1], "pci-bridge,id=br0,chassis_nr=1,bus=pci.0,addr=0x2");
        assert_eq!(v[3], "driver=null-co,size=1G,if=none,id=d0");
        assert_eq!(
            v[5],
            "virtio-blk-pci,drive=d0,num-queues=2,bus=br0,addr=0x1"
        );
        assert!(v.contains(&"virtio-blk-pci,drive=d30,num-queues=2,bus=br0,addr=0x1f".into()));
        assert!(v.contains(&"pci-bridge,id=br1,chassis_nr=2,bus=pci.0,addr=0x3".into()));
        assert!(v.contains(&"virtio-blk-pci,drive=d31,num-queues=2,bus=br1,addr=0x1".into()));
        assert_eq!(
            qemu_disk_args(500, 2, "1G")
                .unwrap()
                .iter()
                .filter(|a| a.starts_with("pci-bridge"))
                .count(),
            17
        );
        assert!(qemu_disk_args(harness::qemu_l2::MAX_QEMU_DISKS + 1, 2, "1G").is_err());
    }

    #[test]
    fn blkswarm_layout() {
        assert_eq!(
            blkswarm_disk_args(500, 2, "1G", true),
            ["--disks", "count=500,backend=null,size=1G,num_queues=2"]
        );
        let v = blkswarm_disk_args(3, 2, "1G", false);
        assert_eq!(v.len(), 6);
        assert_eq!(v[4..], ["--disk", "backend=null,size=1G,num_queues=2"]);
    }

    #[test]
    fn extrapolation() {
        let (k, y) = extrapolate(&[(100, 1.0), (200, 4.0)], 500).unwrap();
        assert!((k - 2.0).abs() < 1e-9 && (y - 25.0).abs() < 1e-9);
        assert!(extrapolate(&[(100, 1.0)], 500).is_none());
        assert_eq!(
            number_after("@@vmm dry_run created_us=1234 x", "created_us="),
            Some(1234)
        );
    }

    #[test]
    fn native_table_and_extrapolation() {
        let row = |vmm, disks, ready: f64, rss, error: Option<&str>| Native {
            vmm,
            disks,
            ready_ms: Some(ready),
            vmm_us: None,
            maxrss_kib: rss,
            exit_ms: ready,
            capped: error.is_some(),
            how: "t",
            error: error.map(String::from),
        };
        let rows = [
            row("blkswarm", 100, 50.0, 20_000, None),
            row("qemu", 100, 1000.0, 1_000_000, None),
            row("blkswarm", 200, 60.0, 20_000, None),
            row("qemu", 200, 4000.0, 4_000_000, None),
            row("blkswarm", 500, 100.0, 20_000, None),
            row("qemu", 500, 9000.0, 9_000_000, Some("RSS passed the cap")),
        ];
        let text = native_report(&rows, 500);
        assert!(
            text.contains("100 disks: creation time 5.00%  peak RSS 2.00%"),
            "{text}"
        );
        assert!(text.contains("EXTRAPOLATED QEMU 25.0 s (n^2.00)"), "{text}");
        assert!(
            text.contains("@@bench many_disks native vmm=qemu disks=500 failed=1 "),
            "{text}"
        );
        assert!(text.contains("extrapolated=1 ready_ms=25000"), "{text}");
        assert!(!text.contains("native ratio disks=500"), "{text}");
    }

    #[test]
    fn native_measure_of_a_shell() {
        let argv: Vec<String> = ["sh", "-c", "echo '@@vmm dry_run created_us=7' >&2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = measure(
            "blkswarm",
            1,
            &argv,
            Ready::BlkswarmDryRun,
            u64::MAX,
            Duration::from_secs(10),
        );
        assert_eq!(r.error, None);
        assert_eq!(r.vmm_us, Some(7));
        assert!(r.maxrss_kib > 0 && r.ready_ms.is_some());
        let argv: Vec<String> = ["sh", "-c", "echo '@@vmm first_run_us=9' >&2; sleep 30"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = measure(
            "blkswarm",
            1,
            &argv,
            Ready::BlkswarmFirstRun,
            u64::MAX,
            Duration::from_secs(10),
        );
        assert_eq!(r.error, None);
        assert!(r.exit_ms < 5000.0);
        let argv: Vec<String> = ["sh", "-c", "sleep 30"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = measure(
            "qemu",
            1,
            &argv,
            Ready::QemuQmp,
            u64::MAX,
            Duration::from_millis(300),
        );
        assert!(r.error.as_deref().unwrap().contains("no result within"));
    }
}
