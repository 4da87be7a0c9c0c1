//! Boots one test guest through the harness (direct KVM or the lab, whichever this host
//! supports), streams its console to stderr, then prints a summary on stdout. Exits
//! non-zero unless the guest ended cleanly (VMM exit 0 and `@@guest done`).
//!
//! cargo run --release -p blkswarm-tests --bin blkswarm-guest -- --scenario boot --cpus boot=2,max=8

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use harness::overlay::{self, GuestFile, KernelWithModules, Overlay};
use harness::user_kernel::{self, GuestNeeds, UserKernel};
use harness::{GuestSpec, Mode, Paths, Runner};

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
Your kernel, your workload (docs/own-kernel.md):
  --kernel PATH       boot this kernel: a bzImage or a kernel build tree (its
                      arch/x86/boot/bzImage; its modules are installed into the cache
                      with `make modules_install`); its .config (or config-RELEASE beside
                      a bzImage) is checked for what the guest needs before anything boots;
                      `debian` is the cache's Debian kernel. Repeat it for a kernel
                      matrix: the same guest on each kernel, in one lab run, one row per
                      kernel at the end
  --modules DIR       the modules of the --kernel before it: an INSTALL_MOD_PATH root, a
                      lib/modules directory or lib/modules/RELEASE itself
  --guest-file HOST[:GUEST]  copy a host file or directory into the guest (default
                      /root/NAME; GUEST ending in / keeps the name); repeatable
  --run CMD           run CMD with sh in /root once the disks are up (scenario `run`);
                      its output streams as `@@run LINE` and is printed after `run|`; the
                      runner exits with its status (125: the guest itself failed)
  --script FILE       like --run, the commands of FILE
  --fetch GUEST_PATH  bring a guest file back after the command (up to 8 MiB, over the
                      console), into --fetch-dir; repeatable
  --fetch-dir DIR     default: target/blkswarm-guest/NAME/fetched
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

/// One `--kernel PATH` (None: the cache's Debian kernel) and its `--modules DIR`.
#[derive(Debug, Clone, Default)]
struct KernelArg {
    path: Option<PathBuf>,
    modules: Option<PathBuf>,
}

struct Cli {
    spec: GuestSpec,
    /// `--kernel` values in order, each with its `--modules`.
    kernels: Vec<KernelArg>,
    guest_files: Vec<GuestFile>,
    /// `--run` or `--script`: the commands.
    run: Option<String>,
    fetch: Vec<String>,
    fetch_dir: Option<PathBuf>,
    lab_memory_mib: Option<u64>,
    report_dir: Option<PathBuf>,
    /// `--ctl`: (delay in seconds, request).
    ctl: Vec<(u32, String)>,
    setup: Option<String>,
}

impl Cli {
    /// The guest to run in `mode`: with `--ctl` or `--setup`, a step that runs blkswarm with
    /// a control socket and sends the requests; `{scratch}` replaced everywhere.
    fn guest(&self, spec: &GuestSpec, mode: Mode) -> GuestSpec {
        let scratch = harness::scratch_dir(&spec.name, mode);
        let fill = |s: &str| s.replace("{scratch}", &scratch);
        let mut spec = spec.clone();
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

impl Cli {
    /// What the guest's kernel must have: the disk kinds of the blkswarm arguments and
    /// the vCPU count.
    fn needs(&self) -> GuestNeeds {
        let has = |flags: &[&str]| {
            self.spec
                .extra_args
                .iter()
                .any(|a| flags.contains(&a.as_str()))
        };
        GuestNeeds {
            virtio_blk: has(&["--disk", "--disks"]),
            nvme: has(&["--nvme", "--nvmes"]),
            max_cpus: self.spec.max_cpus,
        }
    }

    /// The user's kernel, checked, with its modules; None for the cache's kernel. Prints
    /// what it found on stderr.
    fn user_kernel(
        &self,
        arg: &KernelArg,
        paths: &Paths,
    ) -> Result<Option<KernelWithModules>, String> {
        let Some(path) = &arg.path else {
            if arg.modules.is_some() {
                return Err("--modules goes with a --kernel that is not `debian`".into());
            }
            return Ok(None);
        };
        let kernel = UserKernel::open(path)?;
        let needs = self.needs();
        if let Some(warning) = kernel.check_config(needs)? {
            eprintln!("blkswarm-guest: warning: {warning}");
        }
        let store = paths.cache.join("user-kernels").join(&kernel.release);
        let modules = match &arg.modules {
            Some(dir) => Some(user_kernel::find_modules(
                dir,
                &kernel.release,
                &store.join("links"),
            )?),
            None => user_kernel::install_tree_modules(&kernel, &store.join("modules"))?,
        };
        let (boot_modules, ondemand_modules) =
            user_kernel::guest_modules(&kernel, modules.as_ref(), needs)?;
        let names = |l: &user_kernel::ModuleList| {
            l.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        eprintln!(
            "blkswarm-guest: kernel {} from {} (config {}; modules: {}{})",
            kernel.release,
            kernel.bzimage.display(),
            kernel
                .config
                .as_ref()
                .map_or("not checked".to_string(), |(f, _)| format!(
                    "{} checked",
                    f.display()
                )),
            modules
                .as_ref()
                .map_or("none".to_string(), |m| format!("{} ", m.dir().display())),
            if boot_modules.is_empty() && ondemand_modules.is_empty() {
                "(drivers built in)".to_string()
            } else {
                format!(
                    "boot: {}, on demand: {}",
                    names(&boot_modules),
                    names(&ondemand_modules)
                )
            }
        );
        Ok(Some(KernelWithModules {
            kernel,
            boot_modules,
            ondemand_modules,
        }))
    }

    /// The guests to run: one per `--kernel` (named NAME-RELEASE when there are several),
    /// each with an image holding its kernel, the files and the command.
    fn guests(&self, paths: &Paths) -> Result<Vec<GuestSpec>, String> {
        let one = [KernelArg::default()];
        let kernels = if self.kernels.is_empty() {
            &one[..]
        } else {
            &self.kernels[..]
        };
        let mut specs: Vec<GuestSpec> = Vec::new();
        for arg in kernels {
            let kernel = self.user_kernel(arg, paths)?;
            let mut spec = self.spec.clone();
            if kernels.len() > 1 {
                let release = kernel.as_ref().map_or_else(
                    || paths.kernel_version().unwrap_or_else(|| "debian".into()),
                    |k| k.kernel.release.clone(),
                );
                let release: String = release
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "_-.".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                spec.name = format!("{}-{release}", self.spec.name);
                if specs.iter().any(|s| s.name == spec.name) {
                    return Err(format!("kernel {release} is given twice"));
                }
            }
            let overlay = Overlay {
                kernel,
                files: self.guest_files.clone(),
                run: self.run.clone(),
                fetch: self.fetch.clone(),
            };
            if !overlay.is_empty() {
                let dir = paths.repo.join("target/blkswarm-guest").join(&spec.name);
                spec.image = Some(overlay.build(paths, &spec.name, &dir)?);
            }
            specs.push(spec);
        }
        Ok(specs)
    }
}

/// With --run: the command's output, its status, the fetched files saved; returns the
/// runner's exit status (the command's, or 125 when the guest or a fetch failed).
fn finish_run(cli: &Cli, o: &harness::GuestOutcome, clean: bool) -> u8 {
    for line in overlay::run_output(&o.console) {
        println!("run| {line}");
    }
    let dir = cli.fetch_dir.clone().unwrap_or_else(|| {
        Paths::from_env()
            .repo
            .join("target/blkswarm-guest")
            .join(&o.name)
            .join("fetched")
    });
    let mut fetch_failed = false;
    let fetched = overlay::fetched_files(&o.console);
    for want in &cli.fetch {
        match fetched.iter().find(|f| &f.path == want).map(|f| &f.data) {
            Some(Ok(data)) => {
                let to = dir.join(want.trim_start_matches('/'));
                let saved = to
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&to, data));
                match saved {
                    Ok(()) => println!(
                        "fetched:     {want} -> {} ({} bytes)",
                        to.display(),
                        data.len()
                    ),
                    Err(e) => {
                        fetch_failed = true;
                        println!("fetched:     {want}: NOT SAVED: {}: {e}", to.display());
                    }
                }
            }
            Some(Err(why)) => {
                fetch_failed = true;
                println!("fetched:     {want}: FAILED: {why}");
            }
            None => {
                fetch_failed = true;
                println!("fetched:     {want}: FAILED: the guest sent nothing for it");
            }
        }
    }
    let status = o.get("run_status").and_then(|s| s.parse::<u8>().ok());
    match status {
        Some(code) if clean => {
            println!("command:     exit status {code}");
            if code == 0 && fetch_failed {
                125
            } else {
                code
            }
        }
        _ => {
            println!(
                "command:     {} (exit 125: the guest did not run it to the end)",
                o.get("run_status")
                    .map_or("no status".to_string(), |s| format!("status {s}"))
            );
            125
        }
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
    let mut scenario_given = false;
    let mut kernels: Vec<KernelArg> = Vec::new();
    let mut guest_files = Vec::new();
    let mut run = None;
    let mut fetch = Vec::new();
    let mut fetch_dir = None;
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
            "--scenario" => {
                scenario = value()?;
                scenario_given = true;
            }
            "--kernel" => {
                let v = value()?;
                kernels.push(KernelArg {
                    path: (v != "debian").then(|| PathBuf::from(v)),
                    modules: None,
                });
            }
            "--modules" => {
                let dir = PathBuf::from(value()?);
                match kernels.last_mut() {
                    Some(k) if k.modules.is_none() => k.modules = Some(dir),
                    _ => return Err("--modules DIR follows the --kernel it belongs to".into()),
                }
            }
            "--guest-file" => guest_files.push(GuestFile::parse(&value()?)?),
            "--run" | "--script" if run.is_some() => {
                return Err("give one --run or --script (put several commands in a script)".into())
            }
            "--run" => run = Some(format!("{}\n", value()?)),
            "--script" => {
                let file = value()?;
                run = Some(
                    std::fs::read_to_string(&file).map_err(|e| format!("--script {file}: {e}"))?,
                );
            }
            "--fetch" => {
                let p = value()?;
                if !p.starts_with('/') || p.contains(char::is_whitespace) {
                    return Err(format!(
                        "--fetch {p:?}: a guest path must be absolute, without spaces"
                    ));
                }
                fetch.push(p);
            }
            "--fetch-dir" => fetch_dir = Some(PathBuf::from(value()?)),
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
    if run.is_some() {
        if scenario_given && scenario != "run" {
            return Err(format!(
                "--run/--script run in the scenario `run`, not {scenario:?}: leave out --scenario"
            ));
        }
        scenario = "run".to_string();
    } else if !fetch.is_empty() {
        return Err("--fetch brings files back after --run or --script: give one".into());
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
        kernels,
        guest_files,
        run,
        fetch,
        fetch_dir,
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
    // Bad input (a kernel, its modules, its config, a file) is said before anything boots.
    let specs = match cli.guests(&Paths::from_env()) {
        Ok(specs) => specs,
        Err(e) => {
            eprintln!("blkswarm-guest: {e}");
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
    let steps: Vec<GuestSpec> = specs.iter().map(|s| cli.guest(s, runner.mode())).collect();
    let (outcomes, lab) = match runner.run(&steps) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let codes: Vec<u8> = outcomes
        .iter()
        .map(|o| report_guest(&cli, &runner, o, lab.as_ref()))
        .collect();
    if outcomes.len() > 1 {
        print_matrix(&cli, &outcomes, &codes);
    }
    // A matrix fails with its first failing row's status.
    ExitCode::from(codes.iter().copied().find(|&c| c != 0).unwrap_or(0))
}

/// Prints one guest's results and blkswarm's report; returns its exit status: with --run
/// the command's (125 when the guest failed), else 0 when clean and 1 when not.
fn report_guest(
    cli: &Cli,
    runner: &Runner,
    o: &harness::GuestOutcome,
    lab: Option<&harness::LabReport>,
) -> u8 {
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
    if let Some(lab) = lab {
        println!(
            "L1 ready:    {} (host wall time since QEMU launch; L1 uptime {})",
            ms(lab.l1_ready_ms),
            ms(lab.l1_uptime_ms)
        );
        println!("lab total:   {} ms", lab.total_ms);
    }
    println!("guest wall:  {}", ms(o.wall_ms));
    if let Some(json) = &o.report {
        let dir = match &cli.report_dir {
            Some(d) if cli.kernels.len() > 1 => d.join(&o.name),
            Some(d) => d.clone(),
            None => Paths::from_env()
                .repo
                .join("target/blkswarm-reports")
                .join(&o.name),
        };
        match save_report(json, &dir, runner) {
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
    let clean = o.expect_clean();
    if let Err(e) = &clean {
        eprintln!("{e}");
    }
    let code = if cli.run.is_some() {
        finish_run(cli, o, clean.is_ok())
    } else {
        u8::from(clean.is_err())
    };
    println!(
        "result:      {}",
        if clean.is_ok() { "clean" } else { "NOT CLEAN" }
    );
    code
}

/// The kernel matrix: one row per kernel with its outcome and the host report's headline
/// numbers, so that a difference between two kernels shows at a glance.
fn print_matrix(cli: &Cli, outcomes: &[harness::GuestOutcome], codes: &[u8]) {
    println!("== kernel matrix: scenario={}", cli.spec.scenario);
    println!(
        "{:<34} {:<9} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "kernel",
        "result",
        "status",
        "disks",
        "requests",
        "interrupts",
        "p50_us",
        "p99_us",
        "wall_ms"
    );
    for (o, code) in outcomes.iter().zip(codes) {
        let vmm_line = |prefix: &str| {
            o.console
                .lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(prefix))
                .map(|rest| rest.to_string())
                .unwrap_or_default()
        };
        let report = vmm_line("@@vmm report ");
        let total = vmm_line("@@vmm latency phase=total ");
        let report = harness::words(&report);
        let total = harness::words(&total);
        let get = |m: &std::collections::BTreeMap<&str, &str>, k: &str| {
            m.get(k).map_or("-".to_string(), |v| v.to_string())
        };
        println!(
            "{:<34} {:<9} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10} {:>9}",
            o.get("kernel").unwrap_or(&o.name),
            if o.expect_clean().is_ok() {
                "clean"
            } else {
                "NOT-CLEAN"
            },
            code,
            o.get("disks").unwrap_or("-"),
            get(&report, "requests"),
            get(&report, "interrupts"),
            get(&total, "p50_us"),
            get(&total, "p99_us"),
            o.wall_ms.map_or("-".to_string(), |w| w.to_string()),
        );
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
    fn modules_belong_to_the_kernel_before_them() {
        let cli = parse_args(&args(&[
            "--kernel",
            "debian",
            "--kernel",
            "/k/tree",
            "--modules",
            "/m",
            "--kernel",
            "/k/bzImage",
        ]))
        .unwrap()
        .unwrap();
        let k: Vec<(Option<&str>, Option<&str>)> = cli
            .kernels
            .iter()
            .map(|k| {
                (
                    k.path.as_deref().and_then(|p| p.to_str()),
                    k.modules.as_deref().and_then(|p| p.to_str()),
                )
            })
            .collect();
        assert_eq!(
            k,
            [
                (None, None),
                (Some("/k/tree"), Some("/m")),
                (Some("/k/bzImage"), None)
            ]
        );
        assert!(parse_args(&args(&["--modules", "/m"])).is_err());
        assert!(parse_args(&args(&[
            "--kernel",
            "/k",
            "--modules",
            "/a",
            "--modules",
            "/b"
        ]))
        .is_err());
        // --run picks the run scenario; another scenario with it is refused.
        let run = parse_args(&args(&["--run", "true"])).unwrap().unwrap();
        assert_eq!(run.spec.scenario, "run");
        assert!(parse_args(&args(&["--scenario", "disks", "--run", "true"])).is_err());
        assert!(parse_args(&args(&["--fetch", "/x"])).is_err());
        assert!(parse_args(&args(&["--run", "true", "--fetch", "rel"])).is_err());
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
        let step = cli.guest(&cli.spec, Mode::Lab);
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
        let spec = plain.guest(&plain.spec, Mode::Lab);
        assert!(spec.command.is_none());
        assert_eq!(spec.extra_args, ["--disk", "path=/tmp/blkswarm-boot/d.img"]);
        for bad in ["--ctl=x:fatal", "--ctl=fatal", "--ctl=3:"] {
            assert!(parse_args(&args(&[bad])).is_err(), "{bad}");
        }
    }
}
