//! blkswarm vs QEMU: the same test guest and the same fio job on one null-backed
//! virtio-blk disk or NVMe controller (`--device nvme`), run side by side in ONE lab boot (or directly on a host with
//! VMX/SVM), then a table of IOPS and completion latency with the blkswarm/QEMU ratios.
//!
//! Numbers measured in the lab are inflated by TCG: only the ratios mean something, and
//! only because both VMMs ran in the same L1, one after the other, per queue depth.
//!
//! cargo run --release -p blkswarm-tests --bin blkswarm-bench -- --runtime 5 --qd 1,32
//! cargo run --release -p blkswarm-tests --bin blkswarm-bench -- --skip-blkswarm
//!
//! `--many-disks N` switches to the many-disk comparison (see `many.rs`): native device
//! creation time and peak RSS of both VMMs without a guest, then the wall time of a
//! `disks` guest boot with both VMMs in one lab run.

#[path = "blkswarm-bench/many.rs"]
mod many;

use std::process::ExitCode;
use std::time::Duration;

use harness::qemu_l2::{qemu_argv, ship_qemu, QemuPaths};
use harness::{paths, GuestOutcome, GuestSpec, Mode, Runner};

const USAGE: &str = "\
usage: blkswarm-bench [options]
  --runtime S          fio time_based runtime per job, seconds (default 5)
  --qd LIST            queue depths, comma-separated (default 1,32)
  --rw MODE            fio rw (default randread)
  --bs SIZE            fio block size (default 4k)
  --ioengine E         libaio | io_uring (default libaio)
  --device D           virtio-blk (default) | nvme: the disk both VMMs give the guest
  --cpus N             guest vCPUs (default 2); the disk gets N queues (NVMe: I/O
                       queue pairs) on both VMMs
  --memory MIB         guest memory (default 1024)
  --disk-size SIZE     null disk size for both VMMs, QEMU syntax (default 1G)
  --blkswarm-args STR  blkswarm's disk arguments, whitespace-separated (default:
                       \"--disk backend=null,size=<disk-size>,num_queues=<cpus>\", or
                       \"--nvme backend=null,size=<disk-size>,max_ioqpairs=<cpus>\")
  --skip-blkswarm      run QEMU only
  --skip-qemu          run blkswarm only
  --timing-overhead    also run blkswarm with --timing off at each queue depth and print
                       the IOPS ratio of timing on to off (what per-request timing costs)
  --lab-memory MIB     L1 memory in lab mode (default 3072)
Many-disk mode (null virtio-blk disks; QEMU puts 31 on each pci-bridge):
  --many-disks N       compare blkswarm and QEMU with N disks instead of fio
  --native-counts LIST disk counts for the native creation trend (default 100,200,N)
  --boot-disks LIST    disk counts of the lab boot comparison, one L1 run (default N)
  --qemu-boot-max N    lab boot: QEMU only up to N disks (default 1000); say why in the report
  --queues Q           queues per disk (default 2)
  --skip-native        no native creation measurement
  --skip-boot          no lab boot
  --rss-cap-mib MIB    kill QEMU natively past this RSS (default: MemAvailable - 2 GiB)
  --boot-timeout S     per-guest limit of the lab boot (default 120 + 1.5 s per disk)
Environment: BLKSWARM_MODE=direct|lab, BLKSWARM_VERBOSE=0 (quiet console),
BLKSWARM_CACHE, BLKSWARM_BIN, BLKSWARM_QEMU (the L1 QEMU, also the QEMU measured),
BLKSWARM_QEMU_FIRMWARE (directory with qboot.rom; default <qemu>/../share/qemu).
Exit status: 0 when every VMM that ran completed every fio job, else 1; 2 bad usage.";

/// Time a guest gets on top of the fio runtime: L2 boot (8-13 s in the lab), fio setup,
/// result lines, power-off, with a wide margin for a slow lab.
const GUEST_OVERHEAD: Duration = Duration::from_secs(150);

/// The disk model both VMMs give the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    VirtioBlk,
    Nvme,
}

impl Device {
    fn name(self) -> &'static str {
        match self {
            Device::VirtioBlk => "virtio-blk",
            Device::Nvme => "nvme",
        }
    }

    /// The block device the guest's fio runs on.
    fn guest_disk(self) -> &'static str {
        match self {
            Device::VirtioBlk => "vda",
            Device::Nvme => "nvme0n1",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Cli {
    device: Device,
    runtime_s: u64,
    qds: Vec<u32>,
    rw: String,
    bs: String,
    ioengine: String,
    cpus: u32,
    memory_mib: u64,
    disk_size: String,
    blkswarm_args: Option<Vec<String>>,
    skip_blkswarm: bool,
    skip_qemu: bool,
    timing_overhead: bool,
    lab_memory_mib: Option<u64>,
    many: Option<many::ManyCli>,
}

impl Default for Cli {
    fn default() -> Cli {
        Cli {
            device: Device::VirtioBlk,
            runtime_s: 5,
            qds: vec![1, 32],
            rw: "randread".into(),
            bs: "4k".into(),
            ioengine: "libaio".into(),
            cpus: 2,
            memory_mib: 1024,
            disk_size: "1G".into(),
            blkswarm_args: None,
            skip_blkswarm: false,
            skip_qemu: false,
            timing_overhead: false,
            lab_memory_mib: None,
            many: None,
        }
    }
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: expected a number"))
}

/// A value safe to put in the guest kernel command line (one word, no quotes).
fn cmdline_word(flag: &str, v: &str) -> Result<String, String> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(format!("{flag} {v:?}: expected letters, digits, _ - ."));
    }
    Ok(v.to_string())
}

fn parse_args(args: &[String]) -> Result<Option<Cli>, String> {
    let mut cli = Cli::default();
    let mut many_disks: Option<u32> = None;
    let mut native_counts: Option<Vec<u32>> = None;
    let mut boot_disks: Option<Vec<u32>> = None;
    let mut qemu_boot_max = 1000u32;
    let mut queues = 2u32;
    let (mut skip_native, mut skip_boot) = (false, false);
    let mut rss_cap_kib = None;
    let mut boot_timeout = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag {
            "-h" | "--help" => return Ok(None),
            "--device" => {
                cli.device = match value()?.as_str() {
                    "virtio-blk" => Device::VirtioBlk,
                    "nvme" => Device::Nvme,
                    other => {
                        return Err(format!("--device {other:?}: expected virtio-blk or nvme"))
                    }
                }
            }
            "--runtime" => cli.runtime_s = parse_num(flag, &value()?)?,
            "--qd" => {
                cli.qds = value()?
                    .split(',')
                    .map(|q| parse_num(flag, q.trim()))
                    .collect::<Result<_, _>>()?
            }
            "--rw" => cli.rw = cmdline_word(flag, &value()?)?,
            "--bs" => cli.bs = cmdline_word(flag, &value()?)?,
            "--ioengine" => cli.ioengine = cmdline_word(flag, &value()?)?,
            "--cpus" => cli.cpus = parse_num(flag, &value()?)?,
            "--memory" => cli.memory_mib = parse_num(flag, &value()?)?,
            "--disk-size" => cli.disk_size = cmdline_word(flag, &value()?)?,
            "--blkswarm-args" => {
                cli.blkswarm_args = Some(value()?.split_whitespace().map(String::from).collect())
            }
            "--skip-blkswarm" => cli.skip_blkswarm = true,
            "--skip-qemu" => cli.skip_qemu = true,
            "--timing-overhead" => cli.timing_overhead = true,
            "--lab-memory" => cli.lab_memory_mib = Some(parse_num(flag, &value()?)?),
            "--many-disks" => many_disks = Some(parse_num(flag, &value()?)?),
            "--native-counts" => {
                native_counts = Some(
                    value()?
                        .split(',')
                        .map(|q| parse_num(flag, q.trim()))
                        .collect::<Result<_, _>>()?,
                )
            }
            "--boot-disks" => {
                boot_disks = Some(
                    value()?
                        .split(',')
                        .map(|q| parse_num(flag, q.trim()))
                        .collect::<Result<_, _>>()?,
                )
            }
            "--qemu-boot-max" => qemu_boot_max = parse_num(flag, &value()?)?,
            "--queues" => queues = parse_num(flag, &value()?)?,
            "--skip-native" => skip_native = true,
            "--skip-boot" => skip_boot = true,
            "--rss-cap-mib" => rss_cap_kib = Some(parse_num::<u64>(flag, &value()?)? * 1024),
            "--boot-timeout" => {
                boot_timeout = Some(Duration::from_secs(parse_num(flag, &value()?)?))
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if cli.runtime_s == 0 {
        return Err("--runtime must be at least 1 s".into());
    }
    if cli.qds.is_empty() || cli.qds.contains(&0) {
        return Err("--qd needs queue depths >= 1".into());
    }
    if cli.cpus == 0 || cli.memory_mib == 0 {
        return Err("--cpus and --memory must be > 0".into());
    }
    if cli.skip_blkswarm && cli.skip_qemu {
        return Err("--skip-blkswarm and --skip-qemu leave nothing to run".into());
    }
    if let Some(n) = many_disks {
        let mut counts = native_counts.unwrap_or_else(|| vec![100, 200]);
        counts.push(n);
        counts.sort_unstable();
        counts.dedup();
        let boot_disks = boot_disks.unwrap_or_else(|| vec![n]);
        if n == 0
            || counts.contains(&0)
            || boot_disks.is_empty()
            || boot_disks.contains(&0)
            || queues == 0
        {
            return Err(
                "--many-disks, --native-counts, --boot-disks and --queues must be > 0".into(),
            );
        }
        if skip_native && skip_boot {
            return Err("--skip-native and --skip-boot leave nothing to run".into());
        }
        cli.many = Some(many::ManyCli {
            disks: n,
            native_counts: counts,
            boot_disks,
            qemu_boot_max,
            queues,
            skip_native,
            skip_boot,
            rss_cap_kib,
            boot_timeout,
        });
    } else if native_counts.is_some() || boot_disks.is_some() || skip_native || skip_boot {
        return Err(
            "--native-counts, --boot-disks, --skip-native and --skip-boot need --many-disks".into(),
        );
    }
    Ok(Some(cli))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Qemu,
    Blkswarm,
    /// blkswarm with `--timing off`: no per-request timestamps or histograms.
    BlkswarmUntimed,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Blkswarm => "blkswarm",
            Vmm::BlkswarmUntimed => "blkswarm-untimed",
        }
    }
}

impl Cli {
    /// The guest: same scenario, command line, vCPUs and memory for both VMMs.
    fn guest(&self, name: String, qd: u32) -> GuestSpec {
        GuestSpec::new(name, "fio")
            .cpus(self.cpus, self.cpus)
            .memory_mib(self.memory_mib)
            .cmdline(&format!(
                "blkswarm.rw={} blkswarm.bs={} blkswarm.iodepth={qd} blkswarm.numjobs=1 \
                 blkswarm.runtime={} blkswarm.ioengine={} blkswarm.direct=1 blkswarm.disk={}",
                self.rw,
                self.bs,
                self.runtime_s,
                self.ioengine,
                self.device.guest_disk()
            ))
            .timeout(Duration::from_secs(self.runtime_s) + GUEST_OVERHEAD)
    }

    fn blkswarm_disk_args(&self) -> Vec<String> {
        self.blkswarm_args
            .clone()
            .unwrap_or_else(|| match self.device {
                Device::VirtioBlk => vec![
                    "--disk".into(),
                    format!(
                        "backend=null,size={},num_queues={}",
                        self.disk_size, self.cpus
                    ),
                ],
                Device::Nvme => vec![
                    "--nvme".into(),
                    format!(
                        "backend=null,size={},max_ioqpairs={}",
                        self.disk_size, self.cpus
                    ),
                ],
            })
    }

    fn blkswarm_spec(&self, qd: u32) -> GuestSpec {
        let mut spec = self.guest(format!("blkswarm-qd{qd}"), qd);
        spec.extra_args = self.blkswarm_disk_args();
        spec
    }

    fn blkswarm_untimed_spec(&self, qd: u32) -> GuestSpec {
        let mut spec = self.guest(format!("blkswarm-untimed-qd{qd}"), qd);
        spec.extra_args = self.blkswarm_disk_args();
        spec.extra_args.extend(["--timing".into(), "off".into()]);
        spec
    }

    /// QEMU with qboot and direct kernel boot, one null-co virtio-blk-pci disk with a
    /// queue per vCPU (QEMU's default, spelled out), or one NVMe controller with an I/O
    /// queue pair per vCPU.
    fn qemu_spec(&self, qd: u32, p: &QemuPaths) -> GuestSpec {
        let guest = self.guest(format!("qemu-qd{qd}"), qd);
        let device = match self.device {
            Device::VirtioBlk => format!("virtio-blk-pci,drive=d0,num-queues={}", self.cpus),
            Device::Nvme => format!("nvme,drive=d0,serial=bench,max_ioqpairs={}", self.cpus),
        };
        let disks = [
            "-drive".to_string(),
            format!("driver=null-co,size={},if=none,id=d0", self.disk_size),
            "-device".to_string(),
            device,
        ];
        let argv = qemu_argv(p, self.cpus, self.memory_mib, &guest, &disks);
        guest.custom_command(argv)
    }
}

/// One measured row.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    vmm: Vmm,
    qd: u32,
    /// Ok((iops, p50, p99, p99.9)) or why there is no number.
    result: Result<(f64, f64, f64, f64), String>,
    wall_ms: Option<u64>,
}

/// The direction the table reports: read for read, randread and the mixed modes
/// (rw, readwrite, randrw; their write half is in the guest's result lines), else write.
fn direction(rw: &str) -> &'static str {
    if rw.contains("read") || rw.ends_with("rw") {
        "read"
    } else {
        "write"
    }
}

fn row(vmm: Vmm, qd: u32, o: &GuestOutcome, dir: &str) -> Row {
    let num = |k: &str| -> Result<f64, String> {
        let key = format!("fio_{dir}_{k}");
        o.get(&key)
            .ok_or_else(|| format!("no `@@guest {key}=` line"))?
            .parse::<f64>()
            .map_err(|e| format!("{key}: {e}"))
    };
    let result = o.expect_clean().and_then(|()| {
        if let Some(e) = o.get("error") {
            return Err(format!("guest error: {e}"));
        }
        match o.get("fio_rc") {
            Some("0") => {}
            rc => {
                return Err(format!(
                    "fio failed: fio_rc={} {}",
                    rc.unwrap_or("(none)"),
                    o.get("fio_stderr").unwrap_or("")
                ))
            }
        }
        Ok((
            num("iops")?,
            num("clat_p50_us")?,
            num("clat_p99_us")?,
            num("clat_p999_us")?,
        ))
    });
    Row {
        vmm,
        qd,
        result,
        wall_ms: o.wall_ms,
    }
}

fn fmt_ratio(b: f64, q: f64) -> String {
    if q > 0.0 {
        format!("{:.2}", b / q)
    } else {
        "-".into()
    }
}

/// The table, the ratios and one `@@bench` line per row.
fn report(cli: &Cli, rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<16} {:>4} {:>10} {:>13} {:>13} {:>14} {:>9}\n",
        "VMM", "QD", "IOPS", "clat p50 us", "clat p99 us", "clat p99.9 us", "wall s"
    ));
    for r in rows {
        let wall = r
            .wall_ms
            .map_or("-".to_string(), |w| format!("{:.1}", w as f64 / 1000.0));
        match &r.result {
            Ok((iops, p50, p99, p999)) => s.push_str(&format!(
                "{:<16} {:>4} {:>10.0} {:>13.1} {:>13.1} {:>14.1} {:>9}\n",
                r.vmm.name(),
                r.qd,
                iops,
                p50,
                p99,
                p999,
                wall
            )),
            Err(e) => s.push_str(&format!(
                "{:<16} {:>4} {:>10} {}\n",
                r.vmm.name(),
                r.qd,
                "FAILED",
                e.lines().next().unwrap_or("")
            )),
        }
    }
    let find = |vmm: Vmm, qd: u32| {
        rows.iter()
            .find(|r| r.vmm == vmm && r.qd == qd)
            .and_then(|r| r.result.as_ref().ok())
    };
    let mut ratio_lines = Vec::new();
    for &qd in &cli.qds {
        if let (Some(b), Some(q)) = (find(Vmm::Blkswarm, qd), find(Vmm::Qemu, qd)) {
            ratio_lines.push(format!(
                "{:<16} {:>4} {:>10} {:>13} {:>13} {:>14}\n",
                "b/q",
                qd,
                fmt_ratio(b.0, q.0),
                fmt_ratio(b.1, q.1),
                fmt_ratio(b.2, q.2),
                fmt_ratio(b.3, q.3)
            ));
        }
    }
    if !ratio_lines.is_empty() {
        s.push_str(
            "ratio blkswarm/qemu (IOPS: higher is better for blkswarm; latency: lower is):\n",
        );
        for l in ratio_lines {
            s.push_str(&l);
        }
    }
    let timing: Vec<(u32, f64, f64)> = cli
        .qds
        .iter()
        .filter_map(|&qd| {
            let on = find(Vmm::Blkswarm, qd)?;
            let off = find(Vmm::BlkswarmUntimed, qd)?;
            Some((qd, on.0, off.0))
        })
        .collect();
    if !timing.is_empty() {
        s.push_str("timing cost (IOPS with per-request timing on / off; 1.00 = free):\n");
        for (qd, on, off) in timing {
            s.push_str(&format!(
                "{:<16} {:>4} {:>10}   loss {:.1}%\n",
                "on/off",
                qd,
                fmt_ratio(on, off),
                if off > 0.0 {
                    (1.0 - on / off) * 100.0
                } else {
                    0.0
                }
            ));
            s.push_str(&format!(
                "@@bench timing_overhead device={} qd={qd} iops_on={on:.0} iops_off={off:.0}\n",
                cli.device.name()
            ));
        }
    }
    for r in rows {
        match &r.result {
            Ok((iops, p50, p99, p999)) => s.push_str(&format!(
                "@@bench vmm={} device={} qd={} rw={} bs={} ioengine={} iops={iops:.0} \
                 clat_p50_us={p50:.1} clat_p99_us={p99:.1} clat_p999_us={p999:.1}\n",
                r.vmm.name(),
                cli.device.name(),
                r.qd,
                cli.rw,
                cli.bs,
                cli.ioengine
            )),
            Err(_) => s.push_str(&format!(
                "@@bench vmm={} device={} qd={} failed\n",
                r.vmm.name(),
                cli.device.name(),
                r.qd
            )),
        }
    }
    s
}

fn run(cli: &Cli) -> Result<bool, String> {
    if let Some(m) = &cli.many {
        return run_many(cli, m);
    }
    let mut runner = Runner::detect().map_err(|e| e.to_string())?;
    if let Some(mib) = cli.lab_memory_mib {
        runner = runner.lab_memory_mib(mib);
    }
    let p = runner.paths().clone();
    p.require_artifacts(runner.mode() == Mode::Lab)
        .map_err(|e| e.to_string())?;

    let (runner, qemu_paths) = ship_qemu(runner, cli.skip_qemu, cli.skip_blkswarm)?;

    // Per queue depth, QEMU then blkswarm, back to back.
    let mut plan: Vec<(Vmm, u32, GuestSpec)> = Vec::new();
    for &qd in &cli.qds {
        if let Some(qp) = &qemu_paths {
            plan.push((Vmm::Qemu, qd, cli.qemu_spec(qd, qp)));
        }
        if !cli.skip_blkswarm {
            plan.push((Vmm::Blkswarm, qd, cli.blkswarm_spec(qd)));
            if cli.timing_overhead {
                plan.push((Vmm::BlkswarmUntimed, qd, cli.blkswarm_untimed_spec(qd)));
            }
        }
    }
    eprintln!(
        "bench: {} {} QD {:?}, {} s each, {} vCPUs, {} MiB, 1 null disk of {}; blkswarm disk args: {}",
        cli.rw,
        cli.bs,
        cli.qds,
        cli.runtime_s,
        cli.cpus,
        cli.memory_mib,
        cli.disk_size,
        if cli.skip_blkswarm {
            "(skipped)".to_string()
        } else {
            cli.blkswarm_disk_args().join(" ")
        }
    );
    let specs: Vec<GuestSpec> = plan.iter().map(|(_, _, s)| s.clone()).collect();
    let (outcomes, lab_report) = runner.run(&specs).map_err(|e| e.to_string())?;

    let dir = direction(&cli.rw);
    let rows: Vec<Row> = plan
        .iter()
        .zip(&outcomes)
        .map(|((vmm, qd, _), o)| row(*vmm, *qd, o, dir))
        .collect();
    // Say loudly why a VMM failed, with its console tail (blkswarm until it has disks).
    for (r, o) in rows.iter().zip(&outcomes) {
        if let Err(e) = &r.result {
            eprintln!(
                "\nbench: {} QD{} FAILED: {}\n--- last console lines of '{}' ---\n{}\n---",
                r.vmm.name(),
                r.qd,
                e.lines().next().unwrap_or(""),
                o.name,
                harness::tail(&o.console, 15)
            );
        }
    }
    println!(
        "\n== blkswarm-bench: {} {} {}, direct=1, {} s per job, {} vCPUs, 1 null {} disk ({})",
        cli.rw,
        cli.bs,
        cli.ioengine,
        cli.runtime_s,
        cli.cpus,
        cli.device.name(),
        cli.disk_size
    );
    println!("mode: {} ({})", runner.mode(), runner.why());
    if let Some(l) = &lab_report {
        println!(
            "lab: L1 ready after {} ms, whole run {} s; numbers are TCG-inflated: compare ratios only",
            l.l1_ready_ms.map_or("-".into(), |v| v.to_string()),
            l.total_ms / 1000
        );
    }
    print!("{}", report(cli, &rows));
    Ok(rows.iter().all(|r| r.result.is_ok()))
}

/// `--many-disks`: (a) native creation time and peak RSS, (b) one lab boot.
fn run_many(cli: &Cli, m: &many::ManyCli) -> Result<bool, String> {
    let paths = harness::Paths::from_env();
    let bin = paths.vmm_bin().map_err(|e| e.to_string())?;
    let feats = many::BlkswarmFeatures::probe(&bin);
    let kernel = paths.guest_kernel();
    let initramfs = paths.guest_initramfs();
    if !kernel.is_file() || !initramfs.is_file() {
        paths.require_artifacts(false).map_err(|e| e.to_string())?;
    }
    let mut all_ok = true;
    let mut out = format!(
        "\n== blkswarm-bench many disks: null virtio-blk disks of {}, {} queues each, {} vCPUs, {} MiB\n\
         blkswarm {}: {}, {}\n",
        cli.disk_size,
        m.queues,
        cli.cpus,
        cli.memory_mib,
        bin.display(),
        if feats.disk_groups {
            "one --disks count=N group"
        } else {
            "N x --disk (this binary has no --disks)"
        },
        if feats.dry_run {
            "--dry-run"
        } else {
            "no --dry-run: killed at its first KVM_RUN"
        }
    );

    if !m.skip_native {
        let cap = m.rss_cap_kib.unwrap_or_else(many::default_rss_cap_kib);
        let qemu = if cli.skip_qemu {
            None
        } else {
            Some(paths::find_qemu()?)
        };
        eprintln!(
            "bench: native creation at {:?} disks; QEMU RSS cap {} MiB",
            m.native_counts,
            cap / 1024
        );
        let mut rows = Vec::new();
        let mut qemu_gave_up: Option<u32> = None;
        for &n in &m.native_counts {
            if !cli.skip_blkswarm {
                let mut argv: Vec<String> = vec![
                    bin.to_string_lossy().into_owned(),
                    "--kernel".into(),
                    kernel.to_string_lossy().into_owned(),
                    "--initramfs".into(),
                    initramfs.to_string_lossy().into_owned(),
                    "--cpus".into(),
                    format!("boot={}", cli.cpus),
                    "--memory".into(),
                    GuestSpec::new("x", "x")
                        .memory_mib(cli.memory_mib)
                        .memory_arg(),
                ];
                argv.extend(many::blkswarm_disk_args(
                    n,
                    m.queues,
                    &cli.disk_size,
                    feats.disk_groups,
                ));
                let ready = if feats.dry_run {
                    argv.push("--dry-run".into());
                    many::Ready::BlkswarmDryRun
                } else {
                    many::Ready::BlkswarmFirstRun
                };
                let r = many::measure(
                    "blkswarm",
                    n,
                    &argv,
                    ready,
                    u64::MAX,
                    Duration::from_secs(300),
                );
                eprintln!("bench: {r:?}");
                rows.push(r);
            }
            if let Some(q) = &qemu {
                if let Some(at) = qemu_gave_up {
                    eprintln!("bench: QEMU not run at {n} disks (it already failed at {at})");
                    continue;
                }
                let mut argv: Vec<String> = [
                    q.to_string_lossy().as_ref(),
                    "-nodefaults",
                    "-machine",
                    "pc",
                    "-accel",
                    "tcg",
                    "-S",
                    "-smp",
                    &cli.cpus.to_string(),
                    "-m",
                    &cli.memory_mib.to_string(),
                    "-display",
                    "none",
                    "-qmp",
                    "stdio",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                argv.extend(many::qemu_disk_args(n, m.queues, &cli.disk_size)?);
                let r = many::measure(
                    "qemu",
                    n,
                    &argv,
                    many::Ready::QemuQmp,
                    cap,
                    Duration::from_secs(1800),
                );
                eprintln!("bench: {r:?}");
                if r.error.is_some() {
                    qemu_gave_up = Some(n);
                }
                rows.push(r);
            }
        }
        all_ok &= rows.iter().all(|r| r.error.is_none());
        out.push_str(&many::native_report(&rows, m.disks));
        print!("{out}");
        out.clear();
    }

    if !m.skip_boot {
        let mut runner = Runner::detect().map_err(|e| e.to_string())?;
        if let Some(mib) = cli.lab_memory_mib {
            runner = runner.lab_memory_mib(mib);
        }
        runner
            .paths()
            .require_artifacts(runner.mode() == Mode::Lab)
            .map_err(|e| e.to_string())?;
        let (runner, qemu_paths) = ship_qemu(runner, cli.skip_qemu, cli.skip_blkswarm)?;
        let timeout_for = |n: u32| {
            m.boot_timeout
                .unwrap_or(Duration::from_secs(120 + u64::from(n) * 3 / 2))
        };
        let mut plan: Vec<(&'static str, u32, GuestSpec)> = Vec::new();
        for &n in &m.boot_disks {
            let timeout = timeout_for(n);
            if !cli.skip_blkswarm {
                let mut spec = many::boot_guest(
                    &format!("blkswarm-disks{n}"),
                    cli.cpus,
                    cli.memory_mib,
                    timeout,
                );
                spec.extra_args =
                    many::blkswarm_disk_args(n, m.queues, &cli.disk_size, feats.disk_groups);
                plan.push(("blkswarm", n, spec));
            }
            match &qemu_paths {
                Some(_) if n > m.qemu_boot_max => out.push_str(&format!(
                    "lab boot: QEMU not run with {n} disks (--qemu-boot-max {}: its RSS would not fit L1)\n",
                    m.qemu_boot_max
                )),
                Some(qp) => {
                    let guest = many::boot_guest(
                        &format!("qemu-disks{n}"),
                        cli.cpus,
                        cli.memory_mib,
                        timeout,
                    );
                    let disks = many::qemu_disk_args(n, m.queues, &cli.disk_size)?;
                    let argv = qemu_argv(qp, cli.cpus, cli.memory_mib, &guest, &disks);
                    plan.push(("qemu", n, guest.custom_command(argv)));
                }
                None => {}
            }
        }
        eprintln!(
            "bench: lab boot of the `disks` guest with {:?} disks, {} vCPUs, {} MiB: {}",
            m.boot_disks,
            cli.cpus,
            cli.memory_mib,
            plan.iter()
                .map(|(_, _, s)| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let specs: Vec<GuestSpec> = plan.iter().map(|(_, _, s)| s.clone()).collect();
        let (outcomes, lab_report) = runner.run(&specs).map_err(|e| e.to_string())?;
        let rows: Vec<many::Boot> = plan
            .iter()
            .zip(&outcomes)
            .map(|((vmm, n, _), o)| many::boot_row(vmm, *n, o))
            .collect();
        for (r, o) in rows.iter().zip(&outcomes) {
            if r.error.is_some() {
                eprintln!(
                    "\nbench: {} boot FAILED: {}\n{}",
                    r.vmm,
                    r.error
                        .as_deref()
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or(""),
                    o.describe_tail()
                );
            }
            if let Some(v) = o.vmm_get("disks_driver_ok") {
                out.push_str(&format!(
                    "{} {} disks: VMM says disks_driver_ok={v}\n",
                    r.vmm, r.disks
                ));
            }
        }
        all_ok &= rows.iter().all(|r| r.error.is_none());
        out.push_str(&format!("\nmode: {} ({})\n", runner.mode(), runner.why()));
        if let Some(l) = &lab_report {
            out.push_str(&format!(
                "lab: L1 {} MiB, ready after {} ms, whole run {} s; times are TCG-inflated: compare ratios only\n",
                cli.lab_memory_mib.unwrap_or(3072),
                l.l1_ready_ms.map_or("-".into(), |v| v.to_string()),
                l.total_ms / 1000
            ));
        }
        out.push_str(&many::boot_report(&rows));
        print!("{out}");
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse_args(&args) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("blkswarm-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("blkswarm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn cli_parsing() {
        let cli = parse_args(&args(&[
            "--runtime=3",
            "--qd",
            "1, 8,32",
            "--skip-blkswarm",
            "--blkswarm-args",
            "--disk null,size=2G --x",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cli.runtime_s, 3);
        assert_eq!(cli.qds, [1, 8, 32]);
        assert!(cli.skip_blkswarm);
        assert_eq!(cli.blkswarm_disk_args(), ["--disk", "null,size=2G", "--x"]);
        // As many queues as QEMU's disk gets: one per vCPU.
        assert_eq!(
            Cli::default().blkswarm_disk_args(),
            ["--disk", "backend=null,size=1G,num_queues=2"]
        );
        let nvme = parse_args(&args(&["--device", "nvme"])).unwrap().unwrap();
        assert_eq!(nvme.device, Device::Nvme);
        assert!(parse_args(&args(&["--device", "scsi"])).is_err());
        assert!(parse_args(&args(&["--qd", "0"])).is_err());
        assert!(parse_args(&args(&["--rw", "rand read"])).is_err());
        assert!(parse_args(&args(&["--skip-qemu", "--skip-blkswarm"])).is_err());
        assert!(parse_args(&args(&["--help"])).unwrap().is_none());
    }

    #[test]
    fn many_disk_cli() {
        let cli = parse_args(&args(&[
            "--many-disks",
            "500",
            "--native-counts=300,100",
            "--boot-disks",
            "200,500",
            "--qemu-boot-max",
            "200",
            "--rss-cap-mib",
            "1000",
        ]))
        .unwrap()
        .unwrap();
        let m = cli.many.unwrap();
        assert_eq!(m.native_counts, [100, 300, 500]);
        assert_eq!(m.boot_disks, [200, 500]);
        assert_eq!((m.qemu_boot_max, m.queues), (200, 2));
        assert_eq!(m.rss_cap_kib, Some(1000 * 1024));
        let m = parse_args(&args(&["--many-disks", "64"]))
            .unwrap()
            .unwrap()
            .many
            .unwrap();
        assert_eq!(m.native_counts, [64, 100, 200]);
        assert_eq!(m.boot_disks, [64]);
        assert!(parse_args(&args(&["--boot-disks", "5"])).is_err());
        assert!(parse_args(&args(&["--many-disks", "0"])).is_err());
        assert!(parse_args(&args(&[
            "--many-disks",
            "5",
            "--skip-native",
            "--skip-boot"
        ]))
        .is_err());
    }

    #[test]
    fn many_disk_boot_rows() {
        let mut o = GuestOutcome {
            name: "qemu-disks200".into(),
            mode: Mode::Lab,
            exit_code: Some(0),
            wall_ms: Some(100_000),
            results: [("disks", "134"), ("uptime_ms", "40000"), ("done", "")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            vmm: Vec::new(),
            console: String::new(),
            done: true,
            lost: None,
            report: None,
        };
        let q = many::boot_row("qemu", 200, &o);
        assert_eq!(
            (q.seen, q.uptime_ms, q.error.clone()),
            (Some(134), Some(40000), None)
        );
        o.wall_ms = Some(25_000);
        let b = many::boot_row("blkswarm", 200, &o);
        o.results.retain(|(k, _)| k != "disks");
        let lost = many::boot_row("blkswarm", 500, &o);
        assert!(lost.error.as_deref().unwrap().contains("disks="));
        let text = many::boot_report(&[b, q, lost]);
        assert!(text.contains("at 200 disks: 25.00%"), "{text}");
        assert!(text.contains("@@bench many_disks boot vmm=qemu disks=200 seen=134 wall_ms=100000"));
        assert!(text.contains("@@bench many_disks boot vmm=blkswarm disks=500 failed=1"));
    }

    #[test]
    fn both_vmms_get_the_same_guest() {
        let cli = Cli::default();
        let p = QemuPaths {
            qemu: "/q".into(),
            firmware: "/fw".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let q = cli.qemu_spec(32, &p);
        let b = cli.blkswarm_spec(32);
        let argv = q.command.clone().unwrap();
        let append = argv.iter().position(|a| a == "-append").unwrap();
        assert_eq!(argv[append + 1], b.kernel_cmdline());
        assert!(b.kernel_cmdline().contains("blkswarm.iodepth=32"));
        assert!(b.kernel_cmdline().contains("blkswarm.scenario=fio"));
        assert!(argv.contains(&"driver=null-co,size=1G,if=none,id=d0".to_string()));
        let bargv = b.argv("/lab/blkswarm", "/k", "/i");
        assert!(bargv.ends_with(&[
            "--disk".to_string(),
            "backend=null,size=1G,num_queues=2".to_string()
        ]));
        assert!(b.kernel_cmdline().contains("blkswarm.disk=vda"));
        assert!(bargv.contains(&"boot=2,max=2".to_string()));
        assert_eq!(q.timeout, b.timeout);
        // NVMe: both VMMs give the guest an NVMe controller with a queue pair per vCPU.
        let nvme = Cli {
            device: Device::Nvme,
            ..Cli::default()
        };
        let nvme_qemu = nvme.qemu_spec(1, &p).command.unwrap();
        assert!(nvme_qemu.contains(&"nvme,drive=d0,serial=bench,max_ioqpairs=2".to_string()));
        let nvme_blkswarm = nvme.blkswarm_spec(1);
        assert!(nvme_blkswarm.argv("/lab/blkswarm", "/k", "/i").ends_with(&[
            "--nvme".to_string(),
            "backend=null,size=1G,max_ioqpairs=2".to_string()
        ]));
        assert!(nvme_blkswarm
            .kernel_cmdline()
            .contains("blkswarm.disk=nvme0n1"));
    }

    #[test]
    fn rows_and_report() {
        let mut o = GuestOutcome {
            name: "qemu-qd1".into(),
            mode: Mode::Lab,
            exit_code: Some(0),
            wall_ms: Some(15000),
            results: [
                ("fio_rc", "0"),
                ("fio_read_iops", "473"),
                ("fio_read_clat_p50_us", "1105.9"),
                ("fio_read_clat_p99_us", "5603.3"),
                ("fio_read_clat_p999_us", "10420.2"),
                ("done", ""),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            vmm: Vec::new(),
            console: String::new(),
            done: true,
            lost: None,
            report: None,
        };
        let q = row(Vmm::Qemu, 1, &o, "read");
        assert_eq!(q.result, Ok((473.0, 1105.9, 5603.3, 10420.2)));
        o.results[1].1 = "946".into();
        let b = row(Vmm::Blkswarm, 1, &o, "read");
        o.exit_code = Some(1);
        o.done = false;
        o.console = "error: unknown option --disk\n".into();
        let failed = row(Vmm::Blkswarm, 32, &o, "read");
        assert!(failed.result.as_ref().unwrap_err().contains("exit code 1"));
        o.exit_code = Some(0);
        o.done = true;
        o.results[1].1 = "980".into();
        let untimed = row(Vmm::BlkswarmUntimed, 1, &o, "read");
        let text = report(&Cli::default(), &[q, b, failed, untimed]);
        assert!(text.contains("b/q                 1       2.00"), "{text}");
        assert!(text.contains("blkswarm           32     FAILED"), "{text}");
        // 946 / 980 IOPS with timing on / off.
        assert!(
            text.contains("on/off              1       0.97   loss 3.5%"),
            "{text}"
        );
        assert!(text
            .contains("@@bench timing_overhead device=virtio-blk qd=1 iops_on=946 iops_off=980"));
        assert!(text.contains(
            "@@bench vmm=qemu device=virtio-blk qd=1 rw=randread bs=4k ioengine=libaio iops=473 "
        ));
        assert!(text.contains("@@bench vmm=blkswarm device=virtio-blk qd=32 failed"));
        assert_eq!(direction("randrw"), "read");
        assert_eq!(direction("randwrite"), "write");
    }
}
