//! Durability: the guest writes a pattern in 64-KiB chunks to a raw image, each with O_DIRECT
//! and an fsync, and prints after every completed flush how many sectors are acknowledged.
//! Each trial kills blkswarm with SIGKILL at a random moment of that, then checks that every
//! acknowledged sector is in the image (`blkswarm-pattern`, `cmp`). A reference guest runs
//! the same writes to the end first.
//!
//! What this proves: blkswarm never acknowledges a write or a flush before the host kernel
//! has it. SIGKILL leaves the host's page cache intact, so a host crash is not simulated.
//!
//! `BLKSWARM_DURABILITY_TRIALS=N` sets the number of kill trials (default 4).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::{shell, vmm_argv, GuestSpec, Mode, SharedRun};

const SEED: u32 = 4242;
/// 200 chunks of 128 sectors: long enough that a kill lands in the middle.
const SECTORS: u32 = 200 * 128;

fn trials() -> usize {
    std::env::var("BLKSWARM_DURABILITY_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn image_dir(mode: Mode) -> String {
    match mode {
        Mode::Lab => "/tmp/blkswarm-durability".into(),
        Mode::Direct => std::env::temp_dir()
            .join(format!("blkswarm-durability-{}", std::process::id()))
            .display()
            .to_string(),
    }
}

fn writer(name: &str, image: &str) -> GuestSpec {
    GuestSpec::new(name, "durability")
        .cpus(1, 1)
        .timeout(Duration::from_secs(240))
        .cmdline(&format!("blkswarm.seed={SEED} blkswarm.sectors={SECTORS}"))
        .arg("--disk")
        .arg(format!("path={image}"))
}

/// Milliseconds between the guest's first acknowledged flush and the kill: somewhere in its
/// writes (the reference writer takes several seconds for all of them). Counted from the
/// first acknowledgement, not from the start, so that a slow boot (a busy host) cannot
/// make every kill land before the first write.
fn kill_delay_ms(mode: Mode, trial: usize) -> u64 {
    let span = match mode {
        Mode::Lab => 4000,
        Mode::Direct => 1500,
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(nanos) / 7 + trial as u64 * 997) % span
}

/// One trial, as a shell script for where blkswarm runs: start the writer on a fresh image,
/// SIGKILL it `delay_ms` after its first acknowledged flush, compare the acknowledged
/// sectors with the pattern.
fn trial_script(mode: Mode, trial: usize, delay_ms: u64) -> String {
    let dir = image_dir(mode);
    let image = format!("{dir}/trial{trial}.img");
    let argv = vmm_argv(&writer("trial", &image), mode);
    let out = format!("{dir}/trial{trial}.out");
    format!(
        "mkdir -p {dir}; rm -f {image}; truncate -s 64M {image}\n\
         {cmd} >{out} 2>&1 &\n\
         pid=$!\n\
         i=0; while ! grep -q flushed_sectors= {out} && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done\n\
         sleep {delay}\n\
         kill -9 $pid\n\
         wait $pid\n\
         echo \"@@guest killed_after_first_flush_ms={delay_ms}\"\n\
         n=$(grep -o 'flushed_sectors=[0-9]*' {out} | tail -n 1 | cut -d= -f2)\n\
         n=${{n:-0}}\n\
         echo \"@@guest acknowledged_sectors=$n\"\n\
         if grep -q durability_done= {out}; then echo '@@guest finished_before_kill=1'; fi\n\
         if [ \"$n\" -gt 0 ]; then\n\
         \x20   blkswarm-pattern {SEED} \"$n\" >{dir}/expect$$\n\
         \x20   dd if={image} bs=512 count=\"$n\" of={dir}/got$$ 2>/dev/null\n\
         \x20   if cmp -s {dir}/expect$$ {dir}/got$$; then echo '@@guest acknowledged_intact=1';\n\
         \x20   else echo \"@@guest acknowledged_intact=0 $(cmp {dir}/expect$$ {dir}/got$$ 2>&1 | head -n 1)\"; fi\n\
         else echo '@@guest acknowledged_intact=1'; fi\n\
         rm -f {image} {out} {dir}/expect$$ {dir}/got$$\n\
         echo '@@guest done'\n",
        cmd = shell::join(&argv),
        delay = format_args!("{}.{:03}", delay_ms / 1000, delay_ms % 1000),
    )
}

fn specs(mode: Mode) -> Vec<GuestSpec> {
    let dir = image_dir(mode);
    let reference = format!("{dir}/reference.img");
    let mut specs = vec![
        GuestSpec::new("make_reference", "boot").custom_command([
            "sh",
            "-c",
            &format!("mkdir -p {dir} && truncate -s 64M {reference} && echo '@@guest done'"),
        ]),
        writer("reference", &reference),
        GuestSpec::new("check_reference", "boot").custom_command([
            "check_pattern".to_string(),
            reference.clone(),
            SEED.to_string(),
            SECTORS.to_string(),
        ]),
    ];
    for trial in 0..trials() {
        let delay_ms = kill_delay_ms(mode, trial);
        specs.push(
            GuestSpec::new(format!("kill_trial_{trial}"), "boot")
                .timeout(Duration::from_secs(180))
                .custom_command(["sh", "-c", &trial_script(mode, trial, delay_ms)])
                // Each trial makes its own image: the trials spread over the parallel L1s.
                .self_contained(),
        );
    }
    specs
}

static RUN: SharedRun = SharedRun::new(specs);

#[test]
fn the_writer_alone_writes_every_chunk() {
    let o = RUN.clean("reference");
    o.expect_result("durability_done", &SECTORS.to_string());
    RUN.clean("check_reference")
        .expect_result("pattern_check", "ok");
}

#[test]
fn every_flushed_write_survives_sigkill_of_the_vmm() {
    let mut acknowledged = Vec::new();
    for trial in 0..trials() {
        let o = RUN.clean(&format!("kill_trial_{trial}"));
        o.expect_result("acknowledged_intact", "1");
        let sectors: u32 = o
            .get("acknowledged_sectors")
            .and_then(|v| v.parse().ok())
            .expect("acknowledged_sectors");
        acknowledged.push((
            o.get("killed_after_first_flush_ms")
                .unwrap_or("?")
                .to_string(),
            sectors,
        ));
    }
    eprintln!(
        "durability: {} trials, (ms from the first flush to the kill, sectors acknowledged): {acknowledged:?}",
        acknowledged.len()
    );
    // At least one kill landed while chunks were being written and flushed.
    assert!(
        acknowledged
            .iter()
            .any(|&(_, sectors)| sectors > 0 && sectors < SECTORS),
        "no trial killed the VMM in the middle of the writes: {acknowledged:?}"
    );
}
