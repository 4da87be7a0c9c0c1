//! `blkswarm-stress` (`bash run.sh stress`): what users run, at full rate, N times per guest,
//! with blkswarm and with QEMU as the L2 VMM in the same lab, and a survival table that says
//! whose failure each lost run is: the guest's, blkswarm's, or the lab's.

use std::process::ExitCode;

use harness::qemu_l2::ship_qemu;
use harness::stress::{plan, table, StressConfig as Cli, Vmm, GUESTS};
use harness::Runner;

const USAGE: &str = "\
usage: blkswarm-stress [--runs N] [--vmm blkswarm|qemu|both] [--runtime S] [--only A,B]
                       [--short] [--list]

Boots each stress guest N times (default 1) with each VMM and prints one table row per
guest and VMM: runs, completed, L2 triple faults (QEMU: L2 resets), L1 deaths, L1 hangs,
guest failures (the guest's own, e.g. fio errors), fio errors summed, and wall time.
Lab failures are NOT retried here: each is that run's outcome (runs that a lab failure
kept from starting run in the next L1 boot).

  --runs N        runs per guest and VMM (default 1)
  --vmm V         blkswarm (default), qemu, or both
  --runtime S     fio seconds per phase (default 30: a verify phase, then randrw 70/30,
                  so 60 s of I/O per guest)
  --short         CI's form: --runtime 10, and the 1000-disk guest boots 300 disks
  --only A,B      only these guests (see --list)
  --list          list the guests and exit

Guests (L2 with 1 GiB):
  raw16       16 raw 64-MiB images (L1 tmpfs), 2 queues each, 2 vCPUs: fio on every disk
  null100     100 null disks, 2 queues each, 2 vCPUs: randrw on every disk for both phases'
              time (a null disk keeps no data to verify)
  nvme4x8     4 NVMe controllers x 8 I/O queue pairs on 64-MiB images, 4 vCPUs: fio on
              every namespace
  multipath   2-controller NVMe subsystem on a 64-MiB image, fio verify on the multipath
              disk at full rate through ANA flips and a controller failure (blkswarm;
              QEMU has no ANA: the same fio on its nvme-subsys, no flips)
  disks1000   1000 null disks, 2 vCPUs, booting to a count (blkswarm only: QEMU's RSS for
              1000 virtio-blk devices does not fit L1)

Exit status: 0 when every blkswarm run completed, 1 otherwise, 2 bad usage.";

fn parse_args(args: &[String]) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        runs: 1,
        vmms: vec![Vmm::Blkswarm],
        runtime_s: 30,
        short: false,
        only: Vec::new(),
    };
    let mut runtime = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--list" => {
                println!("{}", GUESTS.join("\n"));
                return Ok(None);
            }
            "--runs" => {
                cli.runs = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .ok_or("--runs: a number >= 1")?
            }
            "--runtime" => {
                runtime = Some(
                    value()?
                        .parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or("--runtime: seconds >= 1")?,
                )
            }
            "--short" => cli.short = true,
            "--vmm" => {
                cli.vmms = match value()?.as_str() {
                    "blkswarm" => vec![Vmm::Blkswarm],
                    "qemu" => vec![Vmm::Qemu],
                    "both" => vec![Vmm::Blkswarm, Vmm::Qemu],
                    other => return Err(format!("--vmm {other}: blkswarm, qemu or both")),
                }
            }
            "--only" => {
                cli.only = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = cli.only.iter().find(|g| !GUESTS.contains(&g.as_str())) {
                    return Err(format!("--only: no guest {bad:?} (see --list)"));
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    cli.runtime_s = runtime.unwrap_or(if cli.short { 10 } else { 30 });
    Ok(Some(cli))
}

fn run(cli: &Cli) -> Result<bool, String> {
    let runner = Runner::detect()
        .map_err(|e| e.to_string())?
        .retry_lab_failures(false);
    let mode = runner.mode();
    let want_qemu = cli.vmms.contains(&Vmm::Qemu);
    let (runner, qemu) = ship_qemu(runner, !want_qemu, !cli.vmms.contains(&Vmm::Blkswarm))?;
    let plan = plan(cli, mode, qemu.as_ref());
    eprintln!(
        "blkswarm-stress: {} run(s) of {} guest(s), {}; fio {} s per phase",
        cli.runs,
        plan.specs.len() / cli.runs.max(1) as usize,
        cli.vmms
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(" and "),
        cli.runtime_s
    );
    let (outcomes, lab) = runner.run(&plan.specs).map_err(|e| e.to_string())?;
    let (text, ok) = table(&plan, &outcomes);
    println!("== blkswarm-stress ({mode} mode)");
    print!("{text}");
    if let Some(lab) = lab {
        println!("lab: {}", lab.summary());
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = match parse_args(&args) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            if !args.iter().any(|a| a == "--list") {
                println!("{USAGE}");
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("blkswarm-stress: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("blkswarm-stress: {e}");
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
    fn cli() {
        let c = parse_args(&args(&["--runs", "3", "--vmm", "both", "--short"]))
            .unwrap()
            .unwrap();
        assert_eq!((c.runs, c.runtime_s, c.short), (3, 10, true));
        assert_eq!(c.vmms, [Vmm::Blkswarm, Vmm::Qemu]);
        assert!(parse_args(&args(&["--runs", "0"])).is_err());
        assert!(parse_args(&args(&["--only", "nope"])).is_err());
        assert!(parse_args(&args(&["--vmm", "xen"])).is_err());
        let c = parse_args(&args(&["--runtime", "60"])).unwrap().unwrap();
        assert_eq!(c.runtime_s, 60);
    }
}
