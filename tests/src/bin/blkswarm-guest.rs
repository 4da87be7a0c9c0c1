//! Boots one test guest through the harness (direct KVM or the lab, whichever this host
//! supports), streams its console to stderr, then prints a summary on stdout. Exits
//! non-zero unless the guest ended cleanly (VMM exit 0 and `@@guest done`).
//!
//! cargo run --release -p blkswarm-tests --bin blkswarm-guest -- --scenario boot --cpus boot=2,max=8

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use harness::{GuestSpec, Mode, Runner};

const USAGE: &str = "\
usage: blkswarm-guest [options]
  --scenario NAME     guest scenario (blkswarm.scenario=NAME), default: boot
  --name NAME         guest name in reports, default: the scenario
  --cpus boot=N,max=M vCPUs present at boot and possible (or just N), default: 1
  --memory SIZE       guest memory: 1G, 512M or a number of MiB, default: 1G
  --cmdline STR       extra guest kernel command line words
  --arg X             extra blkswarm argument (repeatable)
  --timeout SECS      guest timeout, default: 90
  --lab-memory MIB    L1 memory in lab mode, default: 3072
  --report-dir DIR    where blkswarm's measurement report (report.json, SVG plots) is
                      saved, default: target/blkswarm-reports/NAME
  --ctl SECS:REQUEST  send REQUEST to blkswarm's control socket SECS seconds after the
                      previous one (the first: 4 s after the guest's first disk), e.g.
                      --ctl '0:fatal pci=0000:00:01.0'; answers print as ctl_answer
  --setup CMD         shell command run before blkswarm (inside L1 in the lab)
  In --arg, --setup and --ctl, {scratch} is a scratch directory for this guest (made
  before --setup runs), e.g. for an image: --setup 'truncate -s 64M {scratch}/a.img'.
Environment: BLKSWARM_MODE=direct|lab, BLKSWARM_VERBOSE=0, BLKSWARM_CACHE,
BLKSWARM_BIN, BLKSWARM_QEMU.";

fn parse_cpus(s: &str) -> Result<(u32, u32), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("--cpus {s:?}: {v:?} is not a number"))
    };
    if !s.contains('=') {
        let n = num(s)?;
        return Ok((n, n));
    }
    let (mut boot, mut max) = (None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("boot", v)) => boot = Some(num(v)?),
            Some(("max", v)) => max = Some(num(v)?),
            _ => return Err(format!("--cpus {s:?}: expected boot=N,max=M")),
        }
    }
    let boot = boot.ok_or_else(|| format!("--cpus {s:?}: boot=N missing"))?;
    Ok((boot, max.unwrap_or(boot)))
}

fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let v = s.strip_prefix("size=").unwrap_or(s);
    let (digits, mult) = match v.as_bytes().last() {
        Some(b'G' | b'g') => (&v[..v.len() - 1], 1024),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 1),
        _ => (v, 1),
    };
    digits
        .parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("--memory {s:?}: expected e.g. 1G or 512M"))
}

struct Cli {
    spec: GuestSpec,
    lab_memory_mib: Option<u64>,
    report_dir: Option<PathBuf>,
    /// `--ctl`: (delay in seconds, request).
    ctl: Vec<(u32, String)>,
    setup: Option<String>,
}

impl Cli {
    /// The guest to run in `mode`: with `--ctl` or `--setup`, a step that runs blkswarm with
    /// a control socket and sends the requests; `{scratch}` replaced everywhere.
    fn guest(&self, mode: Mode) -> GuestSpec {
        let scratch = harness::scratch_dir(&self.spec.name, mode);
        let fill = |s: &str| s.replace("{scratch}", &scratch);
        let mut spec = self.spec.clone();
        spec.extra_args = spec.extra_args.iter().map(|a| fill(a)).collect();
        if self.ctl.is_empty() && self.setup.is_none() {
            return spec;
        }
        let name = spec.name.clone();
        let requests: Vec<(u32, String)> = self
            .ctl
            .iter()
            .map(|(delay, request)| (*delay, fill(request)))
            .collect();
        let requests: Vec<(u32, &str)> = requests
            .iter()
            .map(|(delay, request)| (*delay, request.as_str()))
            .collect();
        let setup = fill(self.setup.as_deref().unwrap_or(""));
        harness::guest_with_ctl(&name, mode, spec, &setup, &requests)
    }
}

/// `SECS:REQUEST`.
fn parse_ctl(s: &str) -> Result<(u32, String), String> {
    let (delay, request) = s
        .split_once(':')
        .ok_or_else(|| format!("--ctl {s:?}: expected SECS:REQUEST"))?;
    let delay = delay
        .trim()
        .parse()
        .map_err(|_| format!("--ctl {s:?}: {delay:?} is not a number of seconds"))?;
    if request.trim().is_empty() {
        return Err(format!("--ctl {s:?}: no request"));
    }
    Ok((delay, request.trim().to_string()))
}

fn parse_args(args: &[String]) -> Result<Option<Cli>, String> {
    let mut scenario = "boot".to_string();
    let mut name = None;
    let mut cpus = (1, 1);
    let mut memory = 1024;
    let mut cmdline = Vec::new();
    let mut extra = Vec::new();
    let mut timeout = 90;
    let mut lab_memory_mib = None;
    let mut report_dir = None;
    let mut ctl = Vec::new();
    let mut setup = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
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
            "--scenario" => scenario = value()?,
            "--name" => name = Some(value()?),
            "--cpus" => cpus = parse_cpus(&value()?)?,
            "--memory" => memory = parse_memory_mib(&value()?)?,
            "--cmdline" => cmdline.push(value()?),
            "--arg" => extra.push(value()?),
            "--timeout" => {
                let v = value()?;
                timeout = v
                    .parse()
                    .map_err(|_| format!("--timeout {v:?}: expected seconds"))?;
            }
            "--lab-memory" => {
                let v = value()?;
                lab_memory_mib = Some(
                    v.parse()
                        .map_err(|_| format!("--lab-memory {v:?}: expected MiB"))?,
                );
            }
            "--report-dir" => report_dir = Some(PathBuf::from(value()?)),
            "--ctl" => ctl.push(parse_ctl(&value()?)?),
            "--setup" => setup = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mut spec = GuestSpec::new(name.unwrap_or_else(|| scenario.clone()), scenario)
        .cpus(cpus.0, cpus.1)
        .memory_mib(memory)
        .timeout(Duration::from_secs(timeout));
    for c in cmdline {
        spec = spec.cmdline(&c);
    }
    spec.extra_args = extra;
    Ok(Some(Cli {
        spec,
        lab_memory_mib,
        report_dir,
        ctl,
        setup,
    }))
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
            eprintln!("blkswarm-guest: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut runner = match Runner::detect() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(mib) = cli.lab_memory_mib {
        runner = runner.lab_memory_mib(mib);
    }
    let spec = cli.guest(runner.mode());
    let (outcomes, lab) = match runner.run(std::slice::from_ref(&spec)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let o = &outcomes[0];
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    println!("== blkswarm-guest: {}", o.name);
    println!("mode:        {} ({})", runner.mode(), runner.why());
    println!(
        "guest:       scenario={} cpus boot={},max={} memory={} MiB",
        cli.spec.scenario, cli.spec.boot_cpus, cli.spec.max_cpus, cli.spec.memory_mib
    );
    for (k, v) in &o.results {
        if v.is_empty() {
            println!("@@guest {k}");
        } else {
            println!("@@guest {k}={v}");
        }
    }
    // blkswarm's own report: its `@@vmm` lines as it printed them.
    for line in o.console.lines().map(str::trim) {
        if line.starts_with("@@vmm ") {
            println!("{line}");
        }
    }
    println!(
        "exit code:   {}",
        o.exit_code.map_or("none".to_string(), |c| c.to_string())
    );
    if let Some(lab) = &lab {
        println!(
            "L1 ready:    {} (host wall time since QEMU launch; L1 uptime {})",
            ms(lab.l1_ready_ms),
            ms(lab.l1_uptime_ms)
        );
        println!("lab total:   {} ms", lab.total_ms);
    }
    println!("guest wall:  {}", ms(o.wall_ms));
    if let Some(json) = &o.report {
        let dir = cli
            .report_dir
            .clone()
            .unwrap_or_else(|| Path::new("target/blkswarm-reports").join(&o.name));
        match save_report(json, &dir, &runner) {
            Ok(files) => {
                for file in files {
                    println!("report:      {}", file.display());
                }
            }
            Err(e) => eprintln!("blkswarm-guest: report: {e}"),
        }
        // The guest's fio latency next to the host's for the same disk.
        for line in harness::report::latency_comparison(o).unwrap_or_default() {
            println!("{line}");
        }
        // S4: the host's writes (latency, oldest held) beside its reads.
        for line in harness::report::direction_comparison(o).unwrap_or_default() {
            println!("{line}");
        }
    }
    match o.expect_clean() {
        Ok(()) => {
            println!("result:      clean");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("result:      NOT CLEAN");
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the guest's report to `dir/report.json` and has blkswarm draw its plots there;
/// returns the files written.
fn save_report(json: &str, dir: &Path, runner: &Runner) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("report.json");
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    let bin = runner.paths().vmm_bin().map_err(|e| e.to_string())?;
    let plot = Command::new(&bin)
        .arg("plot")
        .arg(&path)
        .arg(dir)
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !plot.status.success() {
        return Err(String::from_utf8_lossy(&plot.stderr).trim().to_string());
    }
    let mut files = vec![path];
    files.extend(
        String::from_utf8_lossy(&plot.stdout)
            .lines()
            .map(PathBuf::from),
    );
    Ok(files)
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
            "--scenario",
            "disks",
            "--cpus",
            "boot=2,max=8",
            "--memory=2G",
            "--arg",
            "--disk",
            "--arg=null,size=1G",
            "--cmdline",
            "blkswarm.expect=1",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(cli.spec.name, "disks");
        assert_eq!((cli.spec.boot_cpus, cli.spec.max_cpus), (2, 8));
        assert_eq!(cli.spec.memory_mib, 2048);
        assert_eq!(cli.spec.extra_args, ["--disk", "null,size=1G"]);
        assert_eq!(cli.spec.extra_cmdline, "blkswarm.expect=1");
        assert_eq!(parse_cpus("4").unwrap(), (4, 4));
        assert!(parse_cpus("boot=x").is_err());
        assert_eq!(parse_memory_mib("size=512M").unwrap(), 512);
        assert_eq!(parse_memory_mib("768").unwrap(), 768);
        assert!(parse_args(&args(&["--bogus"])).is_err());
        assert!(parse_args(&args(&["--cpus"])).is_err());
        assert!(parse_args(&args(&["--help"])).unwrap().is_none());
    }

    #[test]
    fn ctl_requests_make_a_step_with_a_control_socket() {
        let cli = parse_args(&args(&[
            "--name",
            "s3",
            "--arg=--nvme",
            "--arg=path={scratch}/a.img,controllers=2",
            "--setup",
            "truncate -s 64M {scratch}/a.img",
            "--ctl",
            "0:fatal pci=0000:00:01.0",
            "--ctl=5: reset pci=0000:00:01.0",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            cli.ctl,
            [
                (0, "fatal pci=0000:00:01.0".to_string()),
                (5, "reset pci=0000:00:01.0".to_string())
            ]
        );
        let step = cli.guest(Mode::Lab);
        assert!(step.command_runs_vmm);
        let script = step.command.unwrap().join(" ");
        assert!(
            script.contains("truncate -s 64M /tmp/blkswarm-s3/a.img"),
            "{script}"
        );
        assert!(
            script.contains("path=/tmp/blkswarm-s3/a.img,controllers=2"),
            "{script}"
        );
        assert!(script.contains("sleep 5;"), "{script}");
        assert!(script.contains("--api-socket"), "{script}");
        assert!(!script.contains("{scratch}"), "{script}");
        // Without requests or setup, the guest runs as it is.
        let plain = parse_args(&args(&["--arg=--disk", "--arg=path={scratch}/d.img"]))
            .unwrap()
            .unwrap();
        let spec = plain.guest(Mode::Lab);
        assert!(spec.command.is_none());
        assert_eq!(spec.extra_args, ["--disk", "path=/tmp/blkswarm-boot/d.img"]);
        for bad in ["--ctl=x:fatal", "--ctl=fatal", "--ctl=3:"] {
            assert!(parse_args(&args(&[bad])).is_err(), "{bad}");
        }
    }
}
