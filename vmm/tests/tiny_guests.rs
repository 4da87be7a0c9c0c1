//! The `blkswarm` binary against tiny hand-assembled "kernels": a bzImage header followed by a
//! few instructions at the 64-bit entry point. Such code runs on any KVM, including the
//! software-only one on machines without VMX/SVM, so these tests check the VMM's boot contract
//! (long mode, RSI -> zero page, command line, e820) and every exit path without the lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A bzImage of boot protocol 2.15 whose 64-bit entry (load address + 0x200) runs `code`.
fn bzimage(code: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut image = vec![0u8; 512 * (usize::from(setup_sects) + 1)];
    let put16 =
        |img: &mut Vec<u8>, at: usize, v: u16| img[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |img: &mut Vec<u8>, at: usize, v: u32| img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    image[0x1f1] = setup_sects;
    put16(&mut image, 0x1fe, 0xaa55); // boot_flag
    put32(&mut image, 0x202, 0x5372_6448); // "HdrS"
    put16(&mut image, 0x206, 0x020f); // protocol version
    image[0x211] = 0x1; // loadflags: LOADED_HIGH
    put32(&mut image, 0x214, 0x10_0000); // code32_start
    put32(&mut image, 0x22c, 0x7fff_ffff); // initrd_addr_max
    put32(&mut image, 0x230, 0x20_0000); // kernel_alignment
    put16(&mut image, 0x236, 0x1); // xloadflags: XLF_KERNEL_64
    put32(&mut image, 0x238, 2048); // cmdline_size
    put32(&mut image, 0x260, 0x10_0000); // init_size
    image.extend_from_slice(&[0u8; 0x200]);
    image.extend_from_slice(code);
    image
}

/// `mov al, 0x34; mov dx, 0x600; out dx, al`: ACPI S5 through the sleep control register.
const POWEROFF: &[u8] = &[0xb0, 0x34, 0x66, 0xba, 0x00, 0x06, 0xee];
/// `mov al, 1; mov dx, 0x601; out dx, al`: the FADT reset register.
const RESET: &[u8] = &[0xb0, 0x01, 0x66, 0xba, 0x01, 0x06, 0xee];
/// `hlt`, to stop if an exit did not happen.
const HALT: &[u8] = &[0xf4];

fn program(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Prints the command line the zero page points at, then the e820 entry count as a digit,
/// then a newline, to COM1.
fn print_boot_params() -> Vec<u8> {
    program(&[
        &[0x8b, 0xbe, 0x28, 0x02, 0x00, 0x00], // mov edi, [rsi + 0x228]  (hdr.cmd_line_ptr)
        &[0x66, 0xba, 0xf8, 0x03],             // mov dx, 0x3f8
        &[0x8a, 0x07],                         // loop: mov al, [rdi]
        &[0x84, 0xc0],                         // test al, al
        &[0x74, 0x06],                         // jz after_loop
        &[0xee],                               // out dx, al
        &[0x48, 0xff, 0xc7],                   // inc rdi
        &[0xeb, 0xf4],                         // jmp loop
        &[0xb0, b' ', 0xee],                   // after_loop: out ' '
        &[0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00], // mov al, [rsi + 0x1e8]  (e820_entries)
        &[0x04, b'0', 0xee],                   // add al, '0'; out
        &[0xb0, b'\n', 0xee],                  // out '\n'
    ])
}

fn blkswarm() -> &'static str {
    env!("CARGO_BIN_EXE_blkswarm")
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "these tests boot tiny guests with KVM and need /dev/kvm, which cannot be opened: {e}"
        );
    }
}

struct TinyGuest {
    dir: PathBuf,
}

impl TinyGuest {
    fn new(name: &str, code: &[u8]) -> Self {
        let dir = std::env::temp_dir().join(format!("blkswarm-tiny-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel"), bzimage(code)).unwrap();
        TinyGuest { dir }
    }

    fn kernel(&self) -> PathBuf {
        self.dir.join("kernel")
    }

    fn run(&self, extra: &[&str]) -> Output {
        require_kvm();
        run_vmm(&self.kernel(), extra)
    }
}

impl Drop for TinyGuest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_vmm(kernel: &Path, extra: &[&str]) -> Output {
    Command::new(blkswarm())
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "size=128M"])
        .args(extra)
        .output()
        .expect("blkswarm runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn poweroff_exits_zero() {
    let guest = TinyGuest::new("poweroff", &program(&[POWEROFF, HALT]));
    let out = guest.run(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("@@vmm exit reason=poweroff code=0"),
        "{stderr}"
    );
    assert!(stderr.contains("@@vmm first_run_us="), "{stderr}");
}

#[test]
fn poweroff_with_application_processors_waiting() {
    // The APs wait for INIT/SIPI that never comes; the boot vCPU's poweroff still ends the VM.
    let guest = TinyGuest::new("poweroff-smp", &program(&[POWEROFF, HALT]));
    let out = guest.run(&["--cpus", "boot=4,max=8"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}

#[test]
fn reset_exits_two() {
    let guest = TinyGuest::new("reset", &program(&[RESET, HALT]));
    let out = guest.run(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("reason=reset"), "{stderr}");
}

#[test]
fn triple_fault_exits_three_and_names_the_cause() {
    // ud2 with an empty IDT: #UD cannot be delivered, nor can #DF, so the CPU shuts down.
    let guest = TinyGuest::new("triple", &[0x0f, 0x0b]);
    let out = guest.run(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(stderr.contains("reason=fault"), "{stderr}");
}

/// `mov rax, 0x1122334455667788; push rax; mov rbx, 0xcafef00d; ud2`: known registers and a
/// known stack word, then the boot IDT (limit 7) cannot deliver #UD, #GP or #DF.
fn triple_fault_with_known_state() -> Vec<u8> {
    program(&[
        &[0x48, 0xb8],
        &0x1122_3344_5566_7788u64.to_le_bytes(),
        &[0x50],
        &[0x48, 0xbb],
        &0xcafe_f00du64.to_le_bytes(),
        &[0x0f, 0x0b],
    ])
}

/// The entry point plus the bytes before `ud2` in [`triple_fault_with_known_state`].
const UD2_RIP: &str = "rip=0x100215";

#[test]
fn triple_fault_dumps_registers_tables_and_stack_before_exiting() {
    let guest = TinyGuest::new("triple-dump", &triple_fault_with_known_state());
    let out = guest.run(&[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    let dump: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("@@vmm fault_dump vcpu=0 "))
        .collect();
    let line = |needle: &str| -> &str {
        dump.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no fault_dump line with {needle:?}: {stderr}"))
    };
    assert_eq!(
        dump.first(),
        Some(&"@@vmm fault_dump vcpu=0 begin exit=shutdown")
    );
    assert!(
        dump.last().is_some_and(|l| l.contains(" end lines=")),
        "{stderr}"
    );
    // Printed before the VM exits.
    let dump_end = stderr.find(" end lines=").unwrap();
    assert!(
        dump_end < stderr.find("@@vmm exit reason=fault").unwrap(),
        "{stderr}"
    );
    line(" sregs ");
    line(" events ");
    line(" lapic ");
    line("irq_recent apic_id=0 recorded=0 shown=0");

    // An AMD host's KVM re-initialises the vCPU at a SHUTDOWN intercept: the dump must say
    // so, and the registers are not the guest's.
    if stderr.contains(" note state_is_reset_vector=1") {
        eprintln!("this KVM reset the vCPU at shutdown; register checks skipped");
        return;
    }
    let regs = line(" regs ");
    assert!(regs.contains(UD2_RIP), "{regs}");
    assert!(regs.contains("rax=0x1122334455667788"), "{regs}");
    assert!(regs.contains("rbx=0xcafef00d"), "{regs}");
    assert!(regs.contains("rsp=0x8fe8"), "{regs}");
    assert!(line(" sregs ").contains("mode=long"));
    assert!(line("dtable name=idt").ends_with("base=0x520 limit=0x7"));
    // Why it died: no gate fits under the IDT limit.
    for vector in ["0x8 why=df", "0xd why=gp", "0xe why=pf"] {
        assert!(
            line(&format!("idt_entry vector={vector}")).ends_with("beyond_limit=1 idt_limit=0x7"),
            "{stderr}"
        );
    }
    assert!(
        line("gdt_entry name=cs").contains("index=1 gva=0x508 raw_low=0x00af9b000000ffff"),
        "{stderr}"
    );
    assert!(
        line("stack addr=0x8fe8").contains("words=1122334455667788,"),
        "{stderr}"
    );
    assert!(line("stack_end").ends_with("bytes=512"), "{stderr}");
}

#[test]
fn guest_sees_command_line_and_e820_through_the_zero_page() {
    let guest = TinyGuest::new(
        "bootparams",
        &program(&[&print_boot_params(), POWEROFF, HALT]),
    );
    let out = guest.run(&["--cmdline", "console=ttyS0 blkswarm.scenario=boot"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    // 128 MiB: low RAM, the reserved EBDA..1 MiB hole, RAM from 1 MiB, the reserved ECAM.
    assert_eq!(
        text(&out.stdout),
        "console=ttyS0 blkswarm.scenario=boot 4\n"
    );
}

#[test]
fn guest_above_4g_gets_a_fifth_e820_entry() {
    let guest = TinyGuest::new(
        "bootparams-4g",
        &program(&[&print_boot_params(), POWEROFF, HALT]),
    );
    let out = guest.run(&["--memory", "size=4G", "--cmdline", "x"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "x 5\n");
}

#[test]
fn setup_errors_exit_one_with_a_message() {
    require_kvm();
    let missing = run_vmm(Path::new("/nonexistent/kernel"), &[]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("cannot open /nonexistent/kernel"));

    let guest = TinyGuest::new("not-a-kernel", &[]);
    std::fs::write(guest.kernel(), b"not a bzImage").unwrap();
    let garbage = run_vmm(&guest.kernel(), &[]);
    assert_eq!(garbage.status.code(), Some(1));
    assert!(
        text(&garbage.stderr).contains("cannot load the kernel"),
        "{}",
        text(&garbage.stderr)
    );

    let too_long = "x".repeat(4096);
    let guest = TinyGuest::new("long-cmdline", &program(&[POWEROFF]));
    let out = guest.run(&["--cmdline", &too_long]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("command line is 4096 bytes"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_options_exit_one_before_touching_kvm() {
    let out = Command::new(blkswarm())
        .args(["--kernel", "/k", "--cpus", "boot=3,max=2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("boot=3 and max=2"));
}

#[test]
fn dry_run_builds_500_disks_on_16_buses_and_exits_before_the_guest_runs() {
    // The guest would print to COM1 and power off; a dry run must not let it.
    let guest = TinyGuest::new("dry-run", &program(&[&print_boot_params(), POWEROFF, HALT]));
    let out = guest.run(&[
        "--cpus",
        "boot=2",
        "--disks",
        "count=500,backend=null,size=1G,num_queues=2",
        "--dry-run",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "the guest ran: {}",
        text(&out.stdout)
    );
    assert!(stderr.contains("@@vmm dry_run created_us="), "{stderr}");
    assert!(stderr.contains("reason=dry-run"), "{stderr}");
    assert!(
        stderr.contains("pci_buses=16") && stderr.contains("ioeventfds=1000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("@@vmm disks count=500") && stderr.contains("last_pci=0000:0f:14.0"),
        "{stderr}"
    );
}

#[test]
fn sigterm_prints_where_each_vcpu_and_disk_was_then_exits_143() {
    require_kvm();
    // hlt with interrupts off: the guest never stops by itself.
    let guest = TinyGuest::new("sigterm", HALT);
    let child = Command::new(blkswarm())
        .arg("--kernel")
        .arg(guest.kernel())
        .args(["--memory", "size=128M", "--cpus", "boot=2"])
        .args(["--disk", "backend=null,size=1M"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("blkswarm runs");
    // Long enough for the vCPUs to be inside KVM_RUN and for the watchdog to kick the idle
    // ones at least once (after 1 s in KVM_RUN).
    std::thread::sleep(std::time::Duration::from_millis(2200));
    // SAFETY: kill only sends a signal to the child we spawned (still unreaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("blkswarm exits");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "stderr: {stderr}");
    assert!(stderr.contains("@@vmm signal=15"), "{stderr}");
    assert!(
        stderr.contains("@@vmm stall_vcpu index=0 state=in_kvm_run"),
        "{stderr}"
    );
    assert!(
        stderr.contains("@@vmm stall_vcpu index=1 state="),
        "{stderr}"
    );
    assert!(stderr.contains("@@vmm disks total=1 "), "{stderr}");
    let kicks: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("@@vmm vcpu_kicks="))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no vcpu_kicks line: {stderr}"));
    assert!(kicks >= 1, "the halted vCPUs were never kicked: {stderr}");
    assert!(
        stderr.contains("@@vmm exit reason=signal-15 code=143"),
        "{stderr}"
    );
}

#[test]
fn the_api_socket_answers_while_the_guest_runs_and_the_report_is_written_at_exit() {
    require_kvm();
    let guest = TinyGuest::new("api", HALT);
    let socket = guest.dir.join("api.sock");
    let report_dir = guest.dir.join("report");
    let child = Command::new(blkswarm())
        .arg("--kernel")
        .arg(guest.kernel())
        .args(["--memory", "size=128M"])
        .args(["--disk", "backend=null,size=1M,num_queues=2"])
        .args(["--nvme", "backend=null,size=1M,max_ioqpairs=3"])
        .arg("--api-socket")
        .arg(&socket)
        .arg("--report")
        .arg(&report_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("blkswarm runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ctl = Command::new(blkswarm())
        .args(["ctl", "--api-socket"])
        .arg(&socket)
        .arg("stats")
        .output()
        .expect("blkswarm ctl runs");
    assert!(ctl.status.success(), "{}", text(&ctl.stderr));
    let live: serde_json::Value = serde_json::from_slice(&ctl.stdout).expect("JSON");
    assert_eq!(live["schema"], "blkswarm-report/1");
    let disks = live["disks"].as_array().expect("disks");
    let kinds: Vec<&str> = disks.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["virtio-blk", "nvme"]);
    // Nothing ran in the guest: every queue idle (2 virtqueues, 3 NVMe I/O SQ ids).
    let idle: Vec<u64> = disks
        .iter()
        .filter_map(|d| d["idle_queues"].as_u64())
        .collect();
    assert_eq!(idle, [2, 3]);
    assert_eq!(live["requests"], 0);
    let ctl = |request: &[&str]| {
        let out = Command::new(blkswarm())
            .args(["ctl", "--api-socket"])
            .arg(&socket)
            .args(request)
            .output()
            .expect("blkswarm ctl runs");
        text(&out.stdout)
    };
    let nvme_pci = disks[1]["pci"].as_str().unwrap().to_string();
    let virtio_pci = disks[0]["pci"].as_str().unwrap().to_string();
    let answer = ctl(&["fatal", &format!("pci={nvme_pci}")]);
    assert!(answer.contains("\"fatal_errors\":1"), "{answer}");
    assert!(ctl(&["fatal", &format!("pci={virtio_pci}")]).contains("not an NVMe controller"));
    let answer = ctl(&["fault", &format!("pci={virtio_pci}"), "error_rate=0.25"]);
    assert!(answer.contains("error_rate: 0.25"), "{answer}");
    let live: serde_json::Value = serde_json::from_str(&ctl(&["stats"])).unwrap();
    assert_eq!(live["disks"][1]["controller"]["fatal_errors"], 1);
    let bogus = Command::new(blkswarm())
        .args(["ctl", "--api-socket"])
        .arg(&socket)
        .arg("frobnicate")
        .output()
        .expect("blkswarm ctl runs");
    assert!(text(&bogus.stdout).contains("unknown request"));

    // SAFETY: kill only sends a signal to the child we spawned (still unreaped).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().expect("blkswarm exits");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + 15), "stderr: {stderr}");
    assert!(
        stderr.contains("@@vmm report requests=0 interrupts=0 disks=2 timing=1"),
        "{stderr}"
    );
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(written["disks"].as_array().map(Vec::len), Some(2));
    assert!(!socket.exists(), "the socket goes with the VMM");
    let unreachable = Command::new(blkswarm())
        .args(["ctl", "--api-socket"])
        .arg(&socket)
        .arg("stats")
        .output()
        .expect("blkswarm ctl runs");
    assert_eq!(unreachable.status.code(), Some(1));
}
