//! Several L1s side by side: how many, and which guests each one runs.
//!
//! Each L1 has one vCPU (see [`crate::lab::L1_SMP`]), so a 2-core host runs two of them
//! at once to keep the suite's wall time. A plan is split into shards, one L1 boot each.

use std::time::Duration;

use crate::GuestSpec;

/// Host memory left for everything but the L1s (the harness, cargo, page cache).
const HOST_RESERVE_MIB: u64 = 2048;
/// QEMU's own memory on top of what it gives L1 (TCG's translation cache is 512 MiB).
const QEMU_OVERHEAD_MIB: u64 = 768;

/// How many L1s may run at once: `BLKSWARM_LAB_PARALLEL` if set (at least 1), else one per
/// host core, as many as the host's available memory holds at `lab_memory_mib` each.
pub fn lab_parallelism(lab_memory_mib: u64) -> usize {
    if let Some(n) = std::env::var("BLKSWARM_LAB_PARALLEL")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.max(1);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory = mem_available_mib()
        .map(|avail| fitting(avail, lab_memory_mib))
        .unwrap_or(cores);
    cores.min(by_memory).max(1)
}

/// How many L1s of `lab_memory_mib` fit in `available_mib` of host memory.
pub fn fitting(available_mib: u64, lab_memory_mib: u64) -> usize {
    let each = lab_memory_mib + QEMU_OVERHEAD_MIB;
    (available_mib.saturating_sub(HOST_RESERVE_MIB) / each.max(1)) as usize
}

fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// What a guest is expected to cost, to balance shards: its timeout, the only estimate a
/// spec carries (guests with longer work are given longer timeouts).
fn weight(spec: &GuestSpec) -> Duration {
    spec.timeout
}

/// Splits the plan (indices into `specs`) into at most `n` shards, each in plan order.
/// Guests that may need files earlier guests made (not [`GuestSpec::needs_nothing_earlier`]) stay
/// together in the first shard, in their order, so every dependency holds; self-contained
/// guests go, heaviest first, to the shard with the least weight so far. Empty shards are
/// dropped.
pub fn shard_plan(specs: &[GuestSpec], indices: &[usize], n: usize) -> Vec<Vec<usize>> {
    let n = n.max(1);
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut load = vec![Duration::ZERO; n];
    for &i in indices
        .iter()
        .filter(|&&i| !specs[i].needs_nothing_earlier())
    {
        shards[0].push(i);
        load[0] += weight(&specs[i]);
    }
    let mut free: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| specs[i].needs_nothing_earlier())
        .collect();
    // Heaviest first; ties keep plan order (stable sort).
    free.sort_by_key(|&i| std::cmp::Reverse(weight(&specs[i])));
    for i in free {
        let lightest = (0..n).min_by_key(|&s| (load[s], s)).unwrap_or(0);
        shards[lightest].push(i);
        load[lightest] += weight(&specs[i]);
    }
    for shard in &mut shards {
        shard.sort_unstable();
    }
    shards.retain(|s| !s.is_empty());
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, secs: u64, free: bool) -> GuestSpec {
        let s = GuestSpec::new(name, "boot")
            .timeout(Duration::from_secs(secs))
            .arg("--disk")
            .arg("path=/tmp/made-by-an-earlier-guest.img");
        if free {
            s.self_contained()
        } else {
            s
        }
    }

    #[test]
    fn dependent_guests_stay_together_in_order() {
        let specs = [
            spec("make", 10, false),
            spec("a", 100, true),
            spec("use", 10, false),
            spec("b", 100, true),
            spec("c", 50, true),
        ];
        let shards = shard_plan(&specs, &[0, 1, 2, 3, 4], 2);
        assert_eq!(shards.len(), 2);
        // The first 100-s guest goes to the empty shard, the second to make+use (20 s),
        // and the 50-s guest to whichever is lighter then (the second: 100 < 120).
        assert_eq!(shards[0], [0, 2, 3]);
        assert_eq!(shards[1], [1, 4]);
    }

    #[test]
    fn one_shard_keeps_the_plan() {
        let specs = [
            spec("a", 5, true),
            spec("b", 90, false),
            spec("c", 30, true),
        ];
        assert_eq!(shard_plan(&specs, &[0, 1, 2], 1), [vec![0, 1, 2]]);
        assert_eq!(shard_plan(&specs, &[0, 1, 2], 0), [vec![0, 1, 2]]);
    }

    #[test]
    fn subsets_and_no_empty_shards() {
        let specs = [spec("a", 5, true), spec("b", 90, true), spec("c", 30, true)];
        assert_eq!(shard_plan(&specs, &[2], 4), [vec![2]]);
        let shards = shard_plan(&specs, &[0, 1, 2], 4);
        assert_eq!(shards.len(), 3);
        let mut all: Vec<usize> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2]);
    }

    #[test]
    fn plain_vmm_guests_without_files_are_free() {
        let plain = GuestSpec::new("p", "boot")
            .arg("--disks")
            .arg("count=2,backend=null");
        assert!(plain.needs_nothing_earlier());
        let image = GuestSpec::new("i", "boot")
            .arg("--disk")
            .arg("path=/tmp/x.img");
        assert!(!image.needs_nothing_earlier());
        let custom = GuestSpec::new("c", "boot").custom_command(["true"]);
        assert!(!custom.needs_nothing_earlier());
        assert!(custom.self_contained().needs_nothing_earlier());
    }

    #[test]
    fn memory_bounds_the_number_of_labs() {
        assert_eq!(fitting(24 * 1024, 3072), 5);
        assert_eq!(fitting(4096, 3072), 0);
        assert_eq!(fitting(1024, 3072), 0);
    }
}
