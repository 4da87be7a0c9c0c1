//! The stress suite (`bash run.sh stress`, `blkswarm-stress`, tests/tests/stress.rs): what
//! users run, at full rate, with blkswarm and with QEMU as the L2 VMM, and how each run
//! ended: completed, the lab's failure (L2 triple fault, L1 death or hang) or the guest's.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::qemu_l2::{qemu_argv, qemu_virtio_disks, QemuPaths};
use crate::{guest_with_ctl, scratch_dir, shell, words, GuestOutcome, GuestSpec, LabFailure, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vmm {
    Blkswarm,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Blkswarm => "blkswarm",
            Vmm::Qemu => "qemu",
        }
    }
}

/// The stress guests, in table order.
pub const GUESTS: [&str; 5] = ["raw16", "null100", "nvme4x8", "multipath", "disks1000"];

#[derive(Debug, Clone, PartialEq)]
pub struct StressConfig {
    /// Runs per guest and VMM.
    pub runs: u32,
    pub vmms: Vec<Vmm>,
    /// fio seconds per phase.
    pub runtime_s: u32,
    /// CI's form (fewer disks in the many-disk boot).
    pub short: bool,
    /// Only these guests (empty: all).
    pub only: Vec<String>,
}

/// fio on every disk: a crc32c verify phase, then randrw 70/30, `runtime_s` each.
fn stress_cmdline(runtime_s: u32) -> String {
    format!(
        "blkswarm.stress=both blkswarm.runtime={runtime_s} blkswarm.iodepth=8 blkswarm.size=32m"
    )
}

/// Null disks keep no data, so nothing can be verified on them: randrw 70/30 for both
/// phases' time.
fn randrw_cmdline(runtime_s: u32) -> String {
    format!(
        "blkswarm.stress=randrw blkswarm.runtime={} blkswarm.iodepth=8 blkswarm.size=32m",
        2 * runtime_s
    )
}

/// Shell that makes `count` sparse 64-MiB images `{dir}/{stem}N.img` (N from 0) in L1's tmpfs.
fn make_images(dir: &str, stem: &str, count: u32) -> String {
    format!(
        "mkdir -p {dir}; for i in $(seq 0 {}); do dd if=/dev/zero of={dir}/{stem}$i.img bs=1M count=0 seek=64 2>/dev/null; done",
        count - 1
    )
}

/// A guest's time limit: boot (up to a few minutes for hundreds of disks in the lab), two
/// fio phases, the final verify and the result lines.
fn limit(runtime_s: u32, boot_s: u64) -> Duration {
    Duration::from_secs(boot_s + 2 * u64::from(runtime_s) + 120)
}

/// Where the multipath guest's host requests go, and when (seconds after its first disk).
const PATH_A: &str = "0000:00:01.0";

pub struct Plan {
    pub specs: Vec<GuestSpec>,
    /// (guest, VMM) of each spec.
    pub keys: Vec<(String, Vmm)>,
}

pub fn blkswarm_spec(guest: &str, run: u32, cli: &StressConfig, mode: Mode) -> GuestSpec {
    let name = format!("{guest}-blkswarm-{run}");
    let rt = cli.runtime_s;
    match guest {
        "raw16" => {
            let dir = scratch_dir(&name, mode);
            let spec = GuestSpec::new(&name, "stress")
                .cpus(2, 2)
                .timeout(limit(rt, 120))
                .cmdline(&stress_cmdline(rt))
                .cmdline("blkswarm.expect=16")
                .arg("--disks")
                .arg(format!("count=16,path={dir}/disk%d.img,num_queues=2"));
            let setup = make_images(&dir, "disk", 16);
            guest_with_ctl(&name, mode, spec, &setup, &[]).self_contained()
        }
        "null100" => GuestSpec::new(&name, "stress")
            .cpus(2, 2)
            .timeout(limit(rt, 240))
            .cmdline(&randrw_cmdline(rt))
            .cmdline("blkswarm.expect=100 blkswarm.timeout=200")
            .arg("--disks")
            .arg("count=100,backend=null,size=1G,num_queues=2"),
        "nvme4x8" => {
            let dir = scratch_dir(&name, mode);
            let spec = GuestSpec::new(&name, "stress")
                .cpus(4, 4)
                .timeout(limit(rt, 120))
                .cmdline(&stress_cmdline(rt))
                .cmdline("blkswarm.expect=4")
                .arg("--nvmes")
                .arg(format!("count=4,path={dir}/nvme%d.img,max_ioqpairs=8"));
            let setup = make_images(&dir, "nvme", 4);
            guest_with_ctl(&name, mode, spec, &setup, &[]).self_contained()
        }
        "multipath" => {
            let image = format!("{}/shared.img", scratch_dir(&name, mode));
            let spec = GuestSpec::new(&name, "multipath")
                .cpus(2, 2)
                .timeout(limit(rt, 120))
                .cmdline(&format!(
                    "nvme_core.io_timeout=5 blkswarm.iodepth=8 blkswarm.runtime={} blkswarm.rate_iops=0",
                    2 * rt
                ))
                .arg("--nvme")
                .arg(format!("path={image},controllers=2,max_ioqpairs=2"));
            let setup = format!("dd if=/dev/zero of={image} bs=1M count=0 seek=64 2>/dev/null");
            let requests = [
                format!("ana pci={PATH_A} group=1 state=inaccessible"),
                format!("ana pci={PATH_A} group=1 state=optimized via_change_ms=1500"),
                format!("fatal pci={PATH_A}"),
            ];
            let requests = [
                (0, requests[0].as_str()),
                (4, requests[1].as_str()),
                (5, requests[2].as_str()),
            ];
            guest_with_ctl(&name, mode, spec, &setup, &requests).self_contained()
        }
        _ => {
            let disks = if cli.short { 300 } else { 1000 };
            GuestSpec::new(&name, "disks")
                .cpus(2, 2)
                .timeout(Duration::from_secs(480))
                .cmdline("blkswarm.timeout=400 log_buf_len=4M")
                .arg("--disks")
                .arg(format!("count={disks},backend=null,size=1G,num_queues=2"))
        }
    }
}

/// The same guest with QEMU as the L2 VMM, or None where QEMU cannot run it here.
pub fn qemu_spec(
    guest: &str,
    run: u32,
    cli: &StressConfig,
    mode: Mode,
    p: &QemuPaths,
) -> Option<GuestSpec> {
    let name = format!("{guest}-qemu-{run}");
    let rt = cli.runtime_s;
    let dir = scratch_dir(&name, mode);
    let (spec, disks, setup) = match guest {
        "raw16" => (
            GuestSpec::new(&name, "stress")
                .cpus(2, 2)
                .timeout(limit(rt, 120))
                .cmdline(&stress_cmdline(rt))
                .cmdline("blkswarm.expect=16"),
            qemu_virtio_disks(16, 2, |i| {
                format!("file={dir}/disk{i}.img,format=raw,cache=writeback")
            })
            .ok()?,
            make_images(&dir, "disk", 16),
        ),
        "null100" => (
            GuestSpec::new(&name, "stress")
                .cpus(2, 2)
                .timeout(limit(rt, 240))
                .cmdline(&randrw_cmdline(rt))
                .cmdline("blkswarm.expect=100 blkswarm.timeout=200"),
            qemu_virtio_disks(100, 2, |_| "driver=null-co,size=1G".to_string()).ok()?,
            String::new(),
        ),
        "nvme4x8" => {
            let mut disks = Vec::new();
            for i in 0..4 {
                disks.extend([
                    "-drive".to_string(),
                    format!("file={dir}/nvme{i}.img,format=raw,cache=writeback,if=none,id=n{i}"),
                    "-device".to_string(),
                    format!("nvme,drive=n{i},serial=stress{i},max_ioqpairs=8"),
                ]);
            }
            (
                GuestSpec::new(&name, "stress")
                    .cpus(4, 4)
                    .timeout(limit(rt, 120))
                    .cmdline(&stress_cmdline(rt))
                    .cmdline("blkswarm.expect=4"),
                disks,
                make_images(&dir, "nvme", 4),
            )
        }
        "multipath" => (
            GuestSpec::new(&name, "multipath")
                .cpus(2, 2)
                .timeout(limit(rt, 120))
                .cmdline(&format!(
                    "nvme_core.io_timeout=5 blkswarm.iodepth=8 blkswarm.runtime={} blkswarm.rate_iops=0",
                    2 * rt
                )),
            [
                "-drive",
                &format!("file={dir}/shared0.img,format=raw,if=none,id=ns1,cache=writeback"),
                "-device",
                "nvme-subsys,id=subsys0,nqn=blkswarm-stress",
                "-device",
                "nvme,serial=stress,subsys=subsys0,max_ioqpairs=2",
                "-device",
                "nvme,serial=stress,subsys=subsys0,max_ioqpairs=2",
                "-device",
                "nvme-ns,drive=ns1,nsid=1,shared=on",
            ]
            .map(String::from)
            .to_vec(),
            make_images(&dir, "shared", 1),
        ),
        _ => return None,
    };
    let argv = qemu_argv(p, spec.boot_cpus, spec.memory_mib, &spec, &disks);
    let script = format!("{setup}\nexec {}", shell::join(&argv));
    Some(
        spec.custom_command(["sh".to_string(), "-c".to_string(), script])
            .self_contained(),
    )
}

pub fn plan(cli: &StressConfig, mode: Mode, qemu: Option<&QemuPaths>) -> Plan {
    let mut plan = Plan {
        specs: Vec::new(),
        keys: Vec::new(),
    };
    let guests: Vec<&str> = GUESTS
        .iter()
        .copied()
        .filter(|g| cli.only.is_empty() || cli.only.iter().any(|o| o == g))
        .collect();
    // Runs interleave VMMs and guests, so a lab that degrades over time hurts both alike.
    for run in 1..=cli.runs {
        for guest in &guests {
            for &vmm in &cli.vmms {
                let spec = match (vmm, qemu) {
                    (Vmm::Blkswarm, _) => Some(blkswarm_spec(guest, run, cli, mode)),
                    (Vmm::Qemu, Some(p)) => qemu_spec(guest, run, cli, mode, p),
                    (Vmm::Qemu, None) => None,
                };
                if let Some(spec) = spec {
                    plan.specs.push(spec);
                    plan.keys.push((guest.to_string(), vmm));
                }
            }
        }
    }
    plan
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    Completed,
    Lab(LabFailure),
    /// QEMU exited without the guest's `done`, without a kernel panic and without the
    /// guest's power-off: the L2 guest reset (a triple fault, under -no-reboot).
    QemuL2Reset,
    /// The guest's or the VMM's own failure, with why.
    Guest(String),
}

/// fio errors a stress or multipath guest reported (failed jobs, verify failures).
pub fn fio_errors(o: &GuestOutcome) -> u64 {
    let phases: u64 = o
        .get_all("stress_phase")
        .iter()
        .map(|v| {
            words(v)
                .get("jobs_failed")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    let fio: u64 = o
        .get_all("fio_errors")
        .iter()
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    phases + fio
}

pub fn classify(o: &GuestOutcome, vmm: Vmm) -> RunEnd {
    if let Some(f) = o.lab_failure() {
        return RunEnd::Lab(f);
    }
    if let Some(lost) = &o.lost {
        return RunEnd::Guest(lost.lines().next().unwrap_or("lost").to_string());
    }
    if vmm == Vmm::Qemu
        && !o.done
        && o.exit_code == Some(0)
        && !o.console.contains("Kernel panic")
        && !o.console.contains("reboot: Power down")
    {
        return RunEnd::QemuL2Reset;
    }
    if vmm == Vmm::Blkswarm {
        if let Err(e) = o.expect_clean() {
            return RunEnd::Guest(e.lines().next().unwrap_or("").to_string());
        }
    } else if !o.done {
        return RunEnd::Guest(format!("no `@@guest done` (QEMU exit {:?})", o.exit_code));
    }
    if let Some(e) = o.get("error") {
        return RunEnd::Guest(format!("guest error={e}"));
    }
    // stress: its phases; multipath: fio's status; disks: the count.
    if o.get_all("stress_phase").is_empty() && o.get("fio_rc").is_none() && o.get("disks").is_none()
    {
        return RunEnd::Guest("no result lines".to_string());
    }
    match fio_errors(o) {
        0 if matches!(o.get("fio_rc"), None | Some("0")) => RunEnd::Completed,
        0 => RunEnd::Guest(format!("fio exited {}", o.get("fio_rc").unwrap_or("?"))),
        n => RunEnd::Guest(format!("{n} fio error(s)")),
    }
}

#[derive(Default)]
struct Row {
    runs: u32,
    completed: u32,
    l2_faults: u32,
    l1_deaths: u32,
    l1_hangs: u32,
    guest_failures: u32,
    fio_errors: u64,
    wall_ms: Vec<u64>,
    notes: Vec<String>,
}

pub fn table(plan: &Plan, outcomes: &[GuestOutcome]) -> (String, bool) {
    let mut rows: BTreeMap<(usize, Vmm), Row> = BTreeMap::new();
    let order = |g: &str| GUESTS.iter().position(|x| *x == g).unwrap_or(usize::MAX);
    let mut all_blkswarm_completed = true;
    for ((guest, vmm), o) in plan.keys.iter().zip(outcomes) {
        let row = rows.entry((order(guest), *vmm)).or_default();
        row.runs += 1;
        row.fio_errors += fio_errors(o);
        if let Some(ms) = o.wall_ms {
            row.wall_ms.push(ms);
        }
        let end = classify(o, *vmm);
        match &end {
            RunEnd::Completed => row.completed += 1,
            RunEnd::Lab(LabFailure::L2TripleFault) | RunEnd::QemuL2Reset => row.l2_faults += 1,
            RunEnd::Lab(LabFailure::L1Died) => row.l1_deaths += 1,
            RunEnd::Lab(LabFailure::L1Hung | LabFailure::L1KvmStuck) => row.l1_hangs += 1,
            RunEnd::Guest(_) => row.guest_failures += 1,
        }
        if end != RunEnd::Completed {
            if *vmm == Vmm::Blkswarm {
                all_blkswarm_completed = false;
            }
            row.notes.push(format!("{}: {end:?}", o.name));
        }
    }
    let mut out = String::from(
        "guest      vmm       runs  completed  L2-faults  L1-deaths  L1-hangs  guest-failures  fio-errors  wall-s(median)\n",
    );
    let mut notes = String::new();
    for ((g, vmm), row) in &rows {
        let mut w = row.wall_ms.clone();
        w.sort_unstable();
        let median = w
            .get(w.len() / 2)
            .map_or("-".to_string(), |ms| format!("{:.1}", *ms as f64 / 1000.0));
        out.push_str(&format!(
            "{:<10} {:<9} {:>4}  {:>9}  {:>9}  {:>9}  {:>8}  {:>14}  {:>10}  {:>14}\n",
            GUESTS.get(*g).unwrap_or(&"?"),
            vmm.name(),
            row.runs,
            row.completed,
            row.l2_faults,
            row.l1_deaths,
            row.l1_hangs,
            row.guest_failures,
            row.fio_errors,
            median
        ));
        for n in &row.notes {
            notes.push_str(&format!("  {n}\n"));
        }
    }
    out.push_str(
        "L2-faults: blkswarm exit 3 (KVM_EXIT_SHUTDOWN) or, for QEMU, the guest reset before its result;\n\
         L1-deaths/hangs: the lab's QEMU TCG L1 died or went silent under the run (the lab's failure).\n",
    );
    if !notes.is_empty() {
        out.push_str("runs that did not complete:\n");
        out.push_str(&notes);
    }
    (out, all_blkswarm_completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_interleaves_runs_and_skips_what_qemu_cannot_run() {
        let cli = StressConfig {
            runs: 2,
            vmms: vec![Vmm::Blkswarm, Vmm::Qemu],
            runtime_s: 30,
            short: false,
            only: Vec::new(),
        };
        let p = QemuPaths {
            qemu: "/q".into(),
            firmware: "/fw".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
        };
        let plan = plan(&cli, Mode::Lab, Some(&p));
        // 5 guests x blkswarm + 4 x QEMU (no 1000-disk QEMU), twice.
        assert_eq!(plan.specs.len(), 18);
        assert_eq!(plan.keys[0], ("raw16".to_string(), Vmm::Blkswarm));
        assert_eq!(plan.keys[1], ("raw16".to_string(), Vmm::Qemu));
        assert!(plan.specs.iter().all(|s| s.needs_nothing_earlier()));
        let names: std::collections::HashSet<&str> =
            plan.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), plan.specs.len());
    }

    fn outcome(console: &str, results: &[(&str, &str)], exit: i32) -> GuestOutcome {
        let mut o = GuestOutcome::new("g", Mode::Lab);
        o.console = console.to_string();
        o.exit_code = Some(exit);
        o.results = results
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        o.done = results.iter().any(|(k, _)| *k == "done");
        o
    }

    #[test]
    fn runs_are_told_apart() {
        let ok = outcome(
            "",
            &[
                ("stress_phase", "verify fio_rc=0 jobs=16 jobs_failed=0"),
                ("done", ""),
            ],
            0,
        );
        assert_eq!(classify(&ok, Vmm::Blkswarm), RunEnd::Completed);
        let bad = outcome(
            "",
            &[
                ("stress_phase", "verify fio_rc=1 jobs=16 jobs_failed=2"),
                ("done", ""),
            ],
            0,
        );
        assert_eq!(
            classify(&bad, Vmm::Blkswarm),
            RunEnd::Guest("2 fio error(s)".into())
        );
        let tf = outcome(
            "guest fault on vCPU 1: triple fault (KVM_EXIT_SHUTDOWN)",
            &[],
            3,
        );
        assert_eq!(
            classify(&tf, Vmm::Blkswarm),
            RunEnd::Lab(LabFailure::L2TripleFault)
        );
        let reset = outcome("@@guest scenario=stress", &[], 0);
        assert_eq!(classify(&reset, Vmm::Qemu), RunEnd::QemuL2Reset);
        let panic = outcome("Kernel panic - not syncing", &[], 0);
        assert!(matches!(classify(&panic, Vmm::Qemu), RunEnd::Guest(_)));
    }
}
