//! NVMe guest tests: a real Linux guest's nvme driver and nvme-cli drive blkswarm's NVMe
//! controller over PCI with MSI-X, its I/O queues served by the io_uring worker pool. All
//! guests of this file share one run (in the lab: one L1 boot).

use std::collections::BTreeMap;
use std::time::Duration;

use harness::{words, GuestOutcome, GuestSpec, Mode, SharedRun};

/// 1 GiB in 512-byte blocks: what nvme-cli reports as nsze/ncap of a `size=1G` namespace.
const BLOCKS_1G: u64 = 1 << 21;

fn image_dir(mode: Mode) -> String {
    match mode {
        Mode::Lab => "/tmp/blkswarm-nvme-images".to_string(),
        Mode::Direct => std::env::temp_dir()
            .join(format!("blkswarm-nvme-{}", std::process::id()))
            .display()
            .to_string(),
    }
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    let dir = image_dir(mode);
    let image = format!("{dir}/fio.img");
    let make_image = format!(
        "mkdir -p '{dir}' && truncate -s 64M '{image}' && echo '@@guest image={image}' && \
         echo '@@guest done'"
    );
    vec![
        // Identify, namespaces, log pages and features as nvme-cli shows them.
        GuestSpec::new("nvme_info", "nvme-info")
            .cpus(2, 2)
            .timeout(Duration::from_secs(150))
            .cmdline("blkswarm.expect=2")
            .arg("--nvme")
            .arg("backend=null,size=1G,namespaces=2,max_ioqpairs=4,mdts=5,serial=BLKSWARM-SN-7"),
        // fio with crc32c verification through the nvme driver onto a raw image file.
        GuestSpec::new("make_fio_image", "boot").custom_command(["sh", "-c", &make_image]),
        GuestSpec::new("nvme_fio_verify", "fio")
            .cpus(2, 2)
            .timeout(Duration::from_secs(240))
            .cmdline(
                "blkswarm.disk=nvme0n1 blkswarm.rw=randwrite blkswarm.bs=4k blkswarm.iodepth=8 \
                 blkswarm.numjobs=2 blkswarm.size=4M blkswarm.verify=crc32c \
                 blkswarm.ioengine=libaio blkswarm.direct=1",
            )
            .arg("--nvme")
            .arg(format!("path={image},max_ioqpairs=2")),
        // S2: 2 present of 32 possible vCPUs, 32 I/O queue pairs offered.
        GuestSpec::new("s2_queues", "disk-info")
            .cpus(2, 32)
            .timeout(Duration::from_secs(150))
            .cmdline("blkswarm.expect=1")
            .arg("--nvme")
            .arg("backend=null,size=1G,max_ioqpairs=32"),
        // 100 controllers in one guest.
        GuestSpec::new("hundred_controllers", "disks")
            .cpus(2, 2)
            .timeout(Duration::from_secs(300))
            .cmdline("blkswarm.expect=100")
            .arg("--nvmes")
            .arg("count=100,backend=null,size=64M,max_ioqpairs=1"),
    ]
}

static RUN: SharedRun = SharedRun::new(specs);

fn clean(name: &str) -> &'static GuestOutcome {
    RUN.clean(name)
}

fn expect(o: &GuestOutcome, key: &str, value: &str) {
    o.expect_result(key, value);
}

/// The host's per-queue lines: `@@vmm nvme_queue pci=... sq=N ... commands=C`.
fn host_queue_commands(o: &GuestOutcome) -> BTreeMap<u16, u64> {
    o.console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm nvme_queue "))
        .map(words)
        .filter_map(|w| Some((w.get("sq")?.parse().ok()?, w.get("commands")?.parse().ok()?)))
        .collect()
}

#[test]
fn nvme_cli_reports_the_configured_controller_and_namespaces() {
    let o = clean("nvme_info");
    expect(o, "nvme_ctrls", "1");
    let ctrl = words(o.get("nvme_ctrl").expect("an nvme_ctrl line"));
    assert_eq!(ctrl.get("serial"), Some(&"BLKSWARM-SN-7"), "{ctrl:?}");
    assert_eq!(ctrl.get("mdts"), Some(&"5"), "{ctrl:?}");
    assert_eq!(ctrl.get("nn"), Some(&"2"), "{ctrl:?}");
    // A volatile write cache is present (so Linux sends flushes) and flushes of all
    // namespaces at once are not supported: VWC = 101b.
    assert_eq!(ctrl.get("vwc"), Some(&"5"), "{ctrl:?}");
    expect(o, "nvme_model", "blkswarm NVMe controller");
    let namespaces = o.get_all("nvme_ns");
    assert_eq!(namespaces.len(), 2, "{namespaces:?}");
    for ns in namespaces {
        let ns = words(ns);
        assert_eq!(
            ns.get("nsze"),
            Some(&BLOCKS_1G.to_string().as_str()),
            "{ns:?}"
        );
        assert_eq!(ns.get("lbads"), Some(&"9"), "{ns:?}");
    }
    expect(o, "nvme_list_count", "2");
    expect(o, "nvme_smart_ok", "1");
    // Number of Queues (feature 7): 0's based counts of I/O CQs (31:16) and SQs (15:0)
    // allocated, here min(max_ioqpairs, what the guest asked for) = 2 (2 vCPUs).
    let queues = o.get("nvme_feature7").expect("nvme_feature7");
    let value = u32::from_str_radix(queues.trim_start_matches("0x"), 16).expect(queues);
    let (cqs, sqs) = ((value >> 16) + 1, (value & 0xffff) + 1);
    assert_eq!(cqs, sqs, "{queues}");
    assert!((1..=4).contains(&sqs), "{queues}");
    assert!(
        o.get("nvme_error").is_none(),
        "{:?}",
        o.get_all("nvme_error")
    );
}

#[test]
fn fio_verify_is_clean_on_nvme() {
    clean("make_fio_image");
    let o = clean("nvme_fio_verify");
    expect(o, "fio_rc", "0");
    expect(o, "fio_verify", "ok");
    expect(o, "fio_errors", "0");
    // Linux saw OACS bit 8 and handed over doorbell buffers: its I/O doorbells went to the
    // shadow buffer, and to MMIO only when the controller's EventIdx asked for it.
    let controller = o.vmm_line("nvme").expect("an @@vmm nvme line");
    assert_eq!(
        controller.get("shadow_doorbells"),
        Some(&"1"),
        "{controller:?}"
    );
    assert_eq!(
        controller.get("invalid_shadow_doorbells"),
        Some(&"0"),
        "{controller:?}"
    );
    assert_eq!(controller.get("fatal_errors"), Some(&"0"), "{controller:?}");
    let (commands, doorbell_writes) = o
        .console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("@@vmm nvme_queue "))
        .map(words)
        .map(|w| {
            let count = |key| w.get(key).and_then(|v| v.parse::<u64>().ok()).unwrap();
            (count("commands"), count("doorbell_writes"))
        })
        .fold((0, 0), |(c, d), (qc, qd)| (c + qc, d + qd));
    assert!(commands > 0, "{}", o.describe_tail());
    assert!(
        doorbell_writes <= commands,
        "{doorbell_writes} > {commands}"
    );
}

#[test]
fn s2_two_present_of_32_possible_cpus_get_32_queues_and_the_host_sees_which_carried_io() {
    let o = clean("s2_queues");
    // Linux sizes its I/O queues by possible CPUs, not present ones: 32 hardware queues,
    // 33 vectors (admin + one per I/O queue).
    let line = o.get("disk").expect("a disk line");
    assert!(line.starts_with("nvme0n1 "), "{line}");
    let disk = words(line);
    assert_eq!(disk.get("mq"), Some(&"32"), "{line}");
    assert_eq!(disk.get("vectors"), Some(&"33"), "{line}");
    let host = host_queue_commands(o);
    assert_eq!(
        host.len(),
        32,
        "host queue lines: {host:?}\n{}",
        o.describe_tail()
    );
    let busy: Vec<u16> = host
        .iter()
        .filter(|(_, &commands)| commands > 0)
        .map(|(&sq, _)| sq)
        .collect();
    // Only queues mapped to the two online CPUs can carry I/O.
    assert!(!busy.is_empty() && busy.len() <= 2, "busy queues {busy:?}");
}

#[test]
fn a_hundred_controllers_in_one_guest() {
    let o = clean("hundred_controllers");
    expect(o, "disks", "100");
}
