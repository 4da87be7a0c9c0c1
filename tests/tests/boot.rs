//! Boot tests: real guests through the harness (direct KVM or the lab, whichever this
//! host supports). All specs of this file share ONE `Runner::run` (in the lab: one L1
//! boot); each #[test] checks its own guest. If no mode can run, every test fails
//! with the reason: these tests never skip.

use std::sync::OnceLock;

use harness::{GuestOutcome, GuestSpec, Runner};

/// (name, boot cpus, max cpus)
const GUESTS: [(&str, u32, u32); 3] = [
    ("boot_1cpu", 1, 1),
    ("boot_2cpu", 2, 2),
    ("boot_2_of_8", 2, 8),
];

fn run_all() -> Result<Vec<GuestOutcome>, String> {
    let runner = Runner::detect().map_err(|e| e.to_string())?;
    let specs: Vec<GuestSpec> = GUESTS
        .iter()
        .map(|&(name, boot, max)| GuestSpec::new(name, "boot").cpus(boot, max))
        .collect();
    let (outcomes, lab) = runner.run(&specs).map_err(|e| e.to_string())?;
    if let Some(lab) = lab {
        eprintln!(
            "boot tests: lab L1 ready after {:?} ms, whole lab run {} ms",
            lab.l1_ready_ms, lab.total_ms
        );
    }
    Ok(outcomes)
}

fn outcome(name: &str) -> &'static GuestOutcome {
    static RUN: OnceLock<Result<Vec<GuestOutcome>, String>> = OnceLock::new();
    match RUN.get_or_init(run_all) {
        Ok(outcomes) => outcomes
            .iter()
            .find(|o| o.name == name)
            .unwrap_or_else(|| panic!("no outcome for guest {name}")),
        Err(e) => panic!("{e}"),
    }
}

/// "0" for 1 CPU, "0-N" for more: the kernel's cpulist format.
fn cpu_list(n: u32) -> String {
    if n == 1 {
        "0".to_string()
    } else {
        format!("0-{}", n - 1)
    }
}

fn check(name: &str) {
    let &(_, boot, max) = GUESTS.iter().find(|g| g.0 == name).expect("known guest");
    let o = outcome(name);
    if let Err(e) = o.expect_clean() {
        panic!("{e}");
    }
    let want = [
        ("nproc", boot.to_string()),
        ("cpus_online", cpu_list(boot)),
        ("cpus_possible", cpu_list(max)),
    ];
    for (key, value) in want {
        assert_eq!(
            o.get(key),
            Some(value.as_str()),
            "guest '{name}': @@guest {key} (results {:?})\n{}",
            o.results,
            o.describe_tail()
        );
    }
}

#[test]
fn boot_1cpu() {
    check("boot_1cpu");
}

#[test]
fn boot_2cpu() {
    check("boot_2cpu");
}

#[test]
fn boot_2_of_8() {
    check("boot_2_of_8");
}
