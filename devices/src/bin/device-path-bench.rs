//! The virtio-blk device path without a guest: an in-process driver keeps `--qd` 4 KiB
//! reads in flight on one queue of a null-backed disk served by one I/O worker, with
//! EVENT_IDX on both sides and every interrupt an eventfd write (what an irqfd costs the
//! worker). It prints requests per second per worker core, next to the io_uring NOP rate
//! measured in the same run (the floor of any io_uring-served request), once with
//! per-request timing on and once off. As in the VMM, a sampler thread records the timed
//! requests into histograms every 10 ms, off the worker's core.
//!
//! cargo run --release -p blkswarm-devices --bin device-path-bench -- --seconds 3 --qd 32

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::io::{BlockBackend, IoPool};
use devices::virtio::block::{Block, BlockConfig, VIRTIO_BLK_T_IN};
use devices::virtio::testing::{Buffer, TestQueue};
use devices::virtio::{VirtioDevice, VirtioInterrupt};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const USAGE: &str = "\
usage: device-path-bench [--seconds S] [--qd N]
  --seconds S   measuring time per run (default 3)
  --qd N        requests kept in flight, 1..=128 (default 32)";

const MEMORY_BYTES: usize = 64 << 20;
const RINGS: u64 = 0x1_0000;
/// Per request: header at +0, status at +16, data at +4096.
const AREAS: u64 = 0x10_0000;
const AREA_BYTES: u64 = 8192;
const QUEUE_SIZE: u16 = 256;
const BLOCK_BYTES: u32 = 4096;
/// io_uring NOPs submitted per io_uring_enter, as a worker batches a busy queue's SQEs.
const NOP_BATCH: u32 = 32;

/// An interrupt as the worker pays for it: one eventfd write (an irqfd in the VMM).
struct EventfdInterrupt(EventFd);

impl VirtioInterrupt for EventfdInterrupt {
    fn notify_queue(&self, _queue: u16) {
        let _ = self.0.write(1);
    }
    fn notify_config(&self) {}
}

/// CPU seconds (user + system) a thread of this process used, found by name.
fn thread_cpu_seconds(name: &str) -> Option<f64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        return Some((utime + stime) / ticks_per_second);
    }
    None
}

/// CPU seconds the calling thread used.
fn own_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer we own.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

struct PathResult {
    requests: u64,
    wall: Duration,
    worker_cpu: f64,
    interrupts: u64,
    kicks: u64,
}

fn request_buffers(memory: &GuestMemoryMmap, slot: u64) -> [Buffer; 3] {
    let area = GuestAddress(AREAS + slot * AREA_BYTES);
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&(slot * 8).to_le_bytes());
    memory.write_slice(&header, area).expect("header");
    [
        Buffer::readable(area, 16),
        Buffer::writable(area.unchecked_add(4096), BLOCK_BYTES),
        Buffer::writable(area.unchecked_add(16), 1),
    ]
}

/// Runs the device path for `seconds` with `qd` requests in flight.
fn device_path(seconds: Duration, qd: u16, timing: bool) -> Result<PathResult, String> {
    devices::latency::set_timing(timing);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_BYTES)])
        .map_err(|e| e.to_string())?;
    let pool = Arc::new(IoPool::new(1).map_err(|e| e.to_string())?);
    let mut block = Block::new(
        BlockConfig {
            backend: BlockBackend::null(1 << 30, None),
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            read_only: false,
            serial: "bench".into(),
        },
        pool.clone(),
    )
    .map_err(|e| e.to_string())?;
    let interrupt = Arc::new(EventfdInterrupt(
        EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?,
    ));
    let mut queue = TestQueue::new(&memory, GuestAddress(RINGS), QUEUE_SIZE, true);
    let features = block.device_features();
    block
        .activate(
            memory.clone(),
            features,
            interrupt.clone(),
            vec![queue.active_queue(0)],
        )
        .map_err(|e| e.to_string())?;
    // As in the VMM: a sampler thread records what the worker hands over, off its core.
    let latency = block.queue_latency()[0].clone();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                latency.sample_in_flight();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut kicks = 0;
    for slot in 0..u64::from(qd) {
        let head = queue.add_chain(&request_buffers(&memory, slot));
        queue.publish(head);
    }
    queue.kick();
    // Interrupt at the first completion; afterwards after each reaped batch.
    queue.set_used_event(0);
    let mut requests = 0u64;
    let cpu_before = thread_cpu_seconds("blkswarm-io0").ok_or("no I/O worker thread")?;
    let start = Instant::now();
    while start.elapsed() < seconds {
        let mut reaped = 0;
        while let Some(used) = queue.pop_used() {
            reaped += 1;
            // Chains are freed as they come back: publish a new one per completion.
            let slot = u64::from(used.id) % u64::from(qd);
            let head = queue.add_chain(&request_buffers(&memory, slot));
            queue.publish(head);
        }
        if reaped == 0 {
            std::hint::spin_loop();
            continue;
        }
        requests += reaped;
        queue.set_used_event(queue.last_used());
        if queue.kick_if_needed() {
            kicks += 1;
        }
    }
    let wall = start.elapsed();
    let worker_cpu = thread_cpu_seconds("blkswarm-io0").ok_or("no I/O worker thread")? - cpu_before;
    let interrupts = interrupt.0.read().unwrap_or(0);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    drop(block);
    Ok(PathResult {
        requests,
        wall,
        worker_cpu,
        interrupts,
        kicks,
    })
}

/// io_uring NOPs per CPU second of the submitting thread, in batches of [`NOP_BATCH`].
fn nop_rate(seconds: Duration) -> Result<(f64, f64), String> {
    let mut ring = io_uring::IoUring::new(256).map_err(|e| e.to_string())?;
    let nop = io_uring::opcode::Nop::new().build();
    let mut done = 0u64;
    let cpu_before = own_cpu_seconds();
    let start = Instant::now();
    while start.elapsed() < seconds {
        for _ in 0..NOP_BATCH {
            // SAFETY: a NOP references no memory.
            unsafe { ring.submission().push(&nop) }.map_err(|e| e.to_string())?;
        }
        ring.submit_and_wait(NOP_BATCH as usize)
            .map_err(|e| e.to_string())?;
        done += ring.completion().count() as u64;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = own_cpu_seconds() - cpu_before;
    Ok((done as f64 / wall, done as f64 / cpu.max(1e-9)))
}

fn parse_args() -> Result<Option<(Duration, u16)>, String> {
    let mut seconds = 3u64;
    let mut qd = 32u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => {
                seconds = value("--seconds")?
                    .parse()
                    .map_err(|_| "--seconds: a number")?
            }
            "--qd" => {
                qd = value("--qd")?
                    .parse()
                    .ok()
                    .filter(|qd| (1..=128).contains(qd))
                    .ok_or("--qd: 1..=128")?
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some((Duration::from_secs(seconds.max(1)), qd)))
}

fn main() -> ExitCode {
    let (seconds, qd) = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("device-path-bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (nops_per_second, nops_per_core) = match nop_rate(seconds) {
        Ok(rate) => rate,
        Err(e) => {
            eprintln!("device-path-bench: io_uring NOPs: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "== device-path-bench: virtio-blk, 1 queue, 1 I/O worker, null backend, 4k reads, \
         QD {qd}, {} s per run",
        seconds.as_secs()
    );
    println!(
        "io_uring NOP:        {nops_per_second:>10.0} ops/s   {nops_per_core:>10.0} ops/s per core \
         (batches of {NOP_BATCH})"
    );
    let mut per_core = Vec::new();
    for timing in [true, false] {
        let result = match device_path(seconds, qd, timing) {
            Ok(result) => result,
            Err(e) => {
                eprintln!("device-path-bench: {e}");
                return ExitCode::FAILURE;
            }
        };
        let rate = result.requests as f64 / result.wall.as_secs_f64();
        let core = result.requests as f64 / result.worker_cpu.max(1e-9);
        per_core.push(core);
        println!(
            "device path, timing {:<3} {rate:>10.0} req/s   {core:>10.0} req/s per core \
             ({:.0}% of the NOP rate; worker busy {:.0}%, {:.2} interrupts and {:.3} kicks per request)",
            if timing { "on:" } else { "off:" },
            100.0 * core / nops_per_core,
            100.0 * result.worker_cpu / result.wall.as_secs_f64(),
            result.interrupts as f64 / result.requests.max(1) as f64,
            result.kicks as f64 / result.requests.max(1) as f64
        );
        println!(
            "@@devbench timing={} qd={qd} requests_per_second={rate:.0} requests_per_core_second={core:.0} \
             nop_per_core_second={nops_per_core:.0}",
            u8::from(timing)
        );
    }
    println!(
        "timing cost: {:.1}% fewer requests per core with timing on",
        100.0 * (1.0 - per_core[0] / per_core[1])
    );
    ExitCode::SUCCESS
}
