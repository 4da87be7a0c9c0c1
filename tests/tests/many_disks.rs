//! Many disks in one guest, and the interrupt-vector shapes of scenario S1. All guests of this
//! file share one run (one L1 boot in the lab). Each case compares the guest's own view (its
//! `probe` scenario: sysfs, /proc/interrupts, probe errors in dmesg) with blkswarm's host-side
//! view (`@@vmm disk pci=... mode=...` at exit), disk by disk.

use std::collections::BTreeMap;
use std::time::Duration;

use harness::{words, GuestOutcome, GuestSpec, SharedRun};

fn specs() -> Vec<GuestSpec> {
    vec![
        // A table smaller than queues + 1: Linux falls back to one config vector and one
        // vector shared by all queues.
        GuestSpec::new("shared_vectors", "probe")
            .cpus(2, 2)
            .arg("--disks")
            .arg("count=2,backend=null,size=64M,num_queues=2,msix_vectors=2"),
        // No MSI-X capability at all, INTx on: the guest must use the shared, level-triggered
        // IOAPIC line, and its probe (which reads the partition table) completes through it.
        GuestSpec::new("intx_without_msix", "probe")
            .cpus(2, 2)
            .arg("--disks")
            .arg("count=2,backend=null,size=64M,num_queues=2,msix_vectors=0,intx=on"),
        // One vector and no INTx: neither fallback works, the probe fails.
        GuestSpec::new("one_vector_no_intx", "probe")
            .cpus(2, 2)
            .arg("--disks")
            .arg("count=1,backend=null,size=64M,num_queues=2,msix_vectors=1"),
        // S1: 500 disks, 2 vCPUs: the guest runs out of interrupt vectors part way. Last, as
        // the longest: a hang here cannot keep the small cases from running.
        GuestSpec::new("s1_500_disks", "probe")
            .cpus(2, 2)
            .timeout(Duration::from_secs(400))
            .cmdline("blkswarm.timeout=300 log_buf_len=4M")
            .arg("--disks")
            .arg("count=500,backend=null,size=1G,num_queues=2"),
    ]
}

static RUN: SharedRun = SharedRun::new(|_| specs());

fn clean(name: &str) -> &'static GuestOutcome {
    RUN.clean(name)
}

/// The host's per-disk modes, by PCI address, from `@@vmm disk pci=X mode=Y ...` lines.
fn host_modes(outcome: &GuestOutcome) -> BTreeMap<String, String> {
    outcome
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm disk "))
        .map(words)
        .filter_map(|w| Some((w.get("pci")?.to_string(), w.get("mode")?.to_string())))
        .collect()
}

/// The guest's per-function view, by PCI address: its irq mode, or `failed`.
fn guest_modes(outcome: &GuestOutcome) -> BTreeMap<String, String> {
    let mut modes = BTreeMap::new();
    for value in outcome.get_all("vdisk") {
        let w = words(value);
        if let (Some(pci), Some(mode)) = (w.get("pci"), w.get("irq_mode")) {
            modes.insert(pci.to_string(), mode.to_string());
        }
    }
    for value in outcome.get_all("probe_failed") {
        if let Some(pci) = value.split_whitespace().next() {
            modes.insert(pci.to_string(), "failed".to_string());
        }
    }
    modes
}

/// The host mode that matches each guest view.
fn expected_host_mode(guest: &str) -> &'static str {
    match guest {
        "per-queue" => "per-queue-msix",
        "shared" => "shared-msix",
        "intx" => "intx",
        _ => "no-driver-ok",
    }
}

fn assert_host_and_guest_agree(outcome: &GuestOutcome, disks: usize) {
    let host = host_modes(outcome);
    let guest = guest_modes(outcome);
    assert_eq!(
        host.len(),
        disks,
        "host lines: {host:?}\n{}",
        outcome.describe_tail()
    );
    assert_eq!(
        guest.len(),
        disks,
        "guest lines: {guest:?}\n{}",
        outcome.describe_tail()
    );
    let disagreements: Vec<String> = guest
        .iter()
        .filter(|(pci, mode)| host.get(*pci).map(String::as_str) != Some(expected_host_mode(mode)))
        .map(|(pci, mode)| format!("{pci}: guest {mode}, host {:?}", host.get(pci)))
        .collect();
    assert!(
        disagreements.is_empty(),
        "{} of {disks} disks disagree, first: {:?}",
        disagreements.len(),
        &disagreements[..disagreements.len().min(5)]
    );
}

fn summary(outcome: &GuestOutcome) -> BTreeMap<String, String> {
    let line = outcome
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm disks total="))
        .next_back()
        .unwrap_or_else(|| panic!("no host summary\n{}", outcome.describe_tail()));
    words(&format!("total={line}"))
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn s1_500_disks_host_and_guest_agree_disk_by_disk() {
    let o = clean("s1_500_disks");
    assert_host_and_guest_agree(o, 500);
    let s = summary(o);
    assert_eq!(s["total"], "500");
    let bound: usize = s["per_queue_msix"].parse().unwrap();
    let failed: usize = s["never_driver_ok"].parse().unwrap();
    assert_eq!(bound + failed, 500, "{s:?}");
    // Two vCPUs cannot give 500 disks three managed vectors each (~200 per CPU).
    assert!(failed > 0 && bound > 0, "{s:?}");
    assert_eq!(o.get("disks"), Some(bound.to_string().as_str()));
    // Every failed probe the guest logged is a disk the host saw never reach DRIVER_OK.
    assert_eq!(o.get("probe_errors"), Some(failed.to_string().as_str()));
}

#[test]
fn small_msix_table_makes_the_guest_share_one_vector_for_all_queues() {
    let o = clean("shared_vectors");
    assert_host_and_guest_agree(o, 2);
    let guest = guest_modes(o);
    assert!(guest.values().all(|m| m == "shared"), "{guest:?}");
    assert_eq!(summary(o)["shared_msix"], "2");
}

#[test]
fn one_vector_without_intx_fails_the_probe_and_the_host_sees_it() {
    let o = clean("one_vector_no_intx");
    assert_host_and_guest_agree(o, 1);
    assert_eq!(summary(o)["never_driver_ok"], "1");
    assert_eq!(o.get("probe_errors"), Some("1"));
}

#[test]
fn without_msix_the_guest_uses_intx_and_the_host_sees_it() {
    let o = clean("intx_without_msix");
    assert_host_and_guest_agree(o, 2);
    let guest = guest_modes(o);
    assert!(guest.values().all(|m| m == "intx"), "{guest:?}");
    assert_eq!(summary(o)["intx"], "2");
    assert_eq!(o.get("disks"), Some("2"));
    // Every disk's line fired: its probe I/O completed through INTx.
    let asserts: Vec<u64> = o
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm disk "))
        .filter_map(|l| words(l).get("intx_asserts")?.parse().ok())
        .collect();
    assert_eq!(asserts.len(), 2, "{}", o.describe_tail());
    assert!(asserts.iter().all(|&n| n > 0), "{asserts:?}");
}
