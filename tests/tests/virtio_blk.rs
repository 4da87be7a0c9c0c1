//! virtio-blk guest tests: a real Linux guest drives blkswarm's virtio-blk over PCI with
//! MSI-X, served by the io_uring worker pool. All guests of this file share one run (in the
//! lab: one L1 boot). Image files live where blkswarm runs (inside L1 in the lab), so they
//! are created and checked by steps of the same run.

use std::path::PathBuf;
use std::time::Duration;

use harness::{GuestOutcome, GuestSpec, Mode, SharedRun};

const PATTERN_SEED: u32 = 7;
const PATTERN_SECTORS: u32 = 2048;

struct Images {
    mode: Mode,
    dir: PathBuf,
}

impl Images {
    fn for_mode(mode: Mode) -> Images {
        let dir = match mode {
            Mode::Lab => PathBuf::from("/tmp/blkswarm-images"),
            Mode::Direct => {
                std::env::temp_dir().join(format!("blkswarm-virtio-blk-{}", std::process::id()))
            }
        };
        Images { mode, dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A step that creates a sparse image of `size` where blkswarm runs.
    fn create(&self, step: &str, name: &str, size: &str) -> GuestSpec {
        let path = self.path(name);
        let script = format!(
            "mkdir -p '{}' && truncate -s {size} '{path}' && echo '@@guest image={path}' && echo '@@guest done'",
            self.dir.display()
        );
        GuestSpec::new(step, "boot").custom_command(["sh", "-c", &script])
    }
}

fn disk(spec: GuestSpec, disk: &str) -> GuestSpec {
    spec.arg("--disk").arg(disk)
}

/// fio writes with one job per vCPU (so several hardware queues carry I/O), then verifies.
fn fio_verify(name: &str, image: &str, queues: u16, cpus: u32) -> GuestSpec {
    disk(
        GuestSpec::new(name, "fio")
            .cpus(cpus, cpus)
            .timeout(Duration::from_secs(240))
            .cmdline(
                &format!(
                    "blkswarm.rw=randwrite blkswarm.bs=4k blkswarm.iodepth=8 blkswarm.numjobs={cpus} \
                     blkswarm.size=4M blkswarm.verify=crc32c blkswarm.ioengine=libaio blkswarm.direct=1"
                ),
            ),
        &format!("path={image},num_queues={queues}"),
    )
}

fn specs(images: &Images) -> Vec<GuestSpec> {
    let q1 = images.path("fio-q1.img");
    let q4 = images.path("fio-q4.img");
    let pattern = images.path("pattern.img");
    let ro = images.path("ro.img");
    let mut specs = vec![
        disk(
            GuestSpec::new("null_disk_info", "disk-info").cpus(2, 2),
            "backend=null,size=1G,num_queues=2",
        ),
        images.create("make_fio_q1", "fio-q1.img", "64M"),
        fio_verify("fio_verify_1_queue", &q1, 1, 1),
        images.create("make_fio_q4", "fio-q4.img", "64M"),
        fio_verify("fio_verify_4_queues", &q4, 4, 4),
        disk(
            // virtio_blk uses at most one queue per CPU.
            GuestSpec::new("four_queue_disk_info", "disk-info").cpus(4, 4),
            &format!("path={q4},num_queues=4"),
        ),
        images.create("make_pattern", "pattern.img", "16M"),
        disk(
            GuestSpec::new("pattern_write", "pattern-write").cmdline(&format!(
                "blkswarm.seed={PATTERN_SEED} blkswarm.sectors={PATTERN_SECTORS}"
            )),
            &format!("path={pattern}"),
        ),
        images.create("make_ro", "ro.img", "16M"),
        disk(
            GuestSpec::new("read_only", "ro-check"),
            &format!("path={ro},readonly=on"),
        ),
    ];
    if let Mode::Lab = images.mode {
        // Checked inside L1, where the image is, with the generator the guest used.
        let script = format!(
            "blkswarm-pattern {PATTERN_SEED} {PATTERN_SECTORS} > /tmp/pattern.want && \
             dd if='{pattern}' bs=512 count={PATTERN_SECTORS} 2>/dev/null | cmp /tmp/pattern.want - \
             && echo '@@guest pattern_check=ok'; echo '@@guest done'"
        );
        specs.push(GuestSpec::new("pattern_check", "boot").custom_command(["sh", "-c", &script]));
    }
    specs
}

static RUN: SharedRun = SharedRun::new(|mode| specs(&Images::for_mode(mode)));

fn clean(name: &str) -> &'static GuestOutcome {
    RUN.clean(name)
}

fn expect(outcome: &GuestOutcome, key: &str, want: &str) {
    outcome.expect_result(key, want);
}

/// The `disk=` line of a disk-info outcome, as key=value pairs.
fn disk_line(outcome: &GuestOutcome, disk: &str) -> Vec<(String, String)> {
    let line = outcome
        .get_all("disk")
        .into_iter()
        .find(|v| v.split_whitespace().next() == Some(disk))
        .unwrap_or_else(|| panic!("no disk={disk} in {:?}", outcome.results));
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"))
}

#[test]
fn null_disk_has_the_configured_size_queues_and_vectors() {
    let o = clean("null_disk_info");
    let vda = disk_line(o, "vda");
    assert_eq!(field(&vda, "size_sectors"), "2097152", "1 GiB in sectors");
    assert_eq!(field(&vda, "mq"), "2");
    assert_eq!(field(&vda, "vectors"), "3", "one per queue plus config");
    assert_eq!(field(&vda, "ro"), "0");
    expect(o, "disks", "1");
}

#[test]
fn fio_verify_is_clean_with_one_queue() {
    clean("make_fio_q1");
    let o = clean("fio_verify_1_queue");
    expect(o, "fio_rc", "0");
    expect(o, "fio_verify", "ok");
    expect(o, "fio_errors", "0");
}

#[test]
fn fio_verify_is_clean_with_four_queues() {
    clean("make_fio_q4");
    let o = clean("fio_verify_4_queues");
    expect(o, "fio_rc", "0");
    expect(o, "fio_verify", "ok");
    expect(o, "fio_errors", "0");
}

#[test]
fn four_queue_disk_gets_four_hardware_queues_and_five_vectors() {
    let o = clean("four_queue_disk_info");
    let vda = disk_line(o, "vda");
    assert_eq!(field(&vda, "mq"), "4");
    assert_eq!(field(&vda, "vectors"), "5");
    assert_eq!(field(&vda, "size_sectors"), "131072", "64 MiB image");
}

#[test]
fn pattern_written_by_the_guest_is_in_the_image_after_exit() {
    clean("make_pattern");
    let o = clean("pattern_write");
    expect(o, "pattern_written", &PATTERN_SECTORS.to_string());
    expect(o, "pattern_readback", "ok");
    match o.mode {
        Mode::Lab => expect(clean("pattern_check"), "pattern_check", "ok"),
        Mode::Direct => {
            let images = Images::for_mode(Mode::Direct);
            let image = std::fs::read(images.path("pattern.img")).expect("image readable");
            let want = pattern(PATTERN_SEED, PATTERN_SECTORS);
            assert_eq!(image.len(), 16 << 20);
            if let Some(sector) = (0..PATTERN_SECTORS as usize)
                .find(|&s| image[s * 512..(s + 1) * 512] != want[s * 512..(s + 1) * 512])
            {
                panic!("image sector {sector} does not hold the pattern the guest wrote");
            }
        }
    }
}

#[test]
fn read_only_disk_rejects_writes_in_the_guest() {
    clean("make_ro");
    let o = clean("read_only");
    expect(o, "ro_flag", "1");
    expect(o, "ro_write", "rejected");
}

/// guests/pattern.sh's layout: sector L is 16 records "blkswp SEED L K\n" of 32 bytes.
fn pattern(seed: u32, sectors: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(sectors as usize * 512);
    for sector in 0..sectors {
        for record in 0..16 {
            out.extend_from_slice(
                format!("blkswp {seed:010} {sector:010} {record:02}\n").as_bytes(),
            );
        }
    }
    out
}

#[test]
fn pattern_generator_matches_the_documented_layout() {
    let p = pattern(7, 2);
    assert_eq!(p.len(), 1024);
    assert_eq!(&p[..32], b"blkswp 0000000007 0000000000 00\n");
    assert_eq!(&p[512 + 15 * 32..], b"blkswp 0000000007 0000000001 15\n");
}
