//! vCPU state at reset and the run loop that turns KVM exits into device accesses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::Bus;
use irq::RecentInterrupts;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::{self, BootEntry};
use crate::fault_dump;
use crate::layout;
use crate::vm::VmExit;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        index: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM accepted {set} of {total} boot MSRs; MSR {msr:#x} was refused")]
    Msr {
        index: u32,
        set: usize,
        total: usize,
        msr: u32,
    },
}

/// MSR indices (arch/x86/include/asm/msr-index.h).
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// MTRRs enabled, default type write-back: without it the guest maps RAM uncached.
    pub const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
}

/// MSR values a vCPU starts with: syscall MSRs cleared, TSC at 0, fast strings, MTRRs on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(msr::IA32_SYSENTER_CS, 0),
        entry(msr::IA32_SYSENTER_ESP, 0),
        entry(msr::IA32_SYSENTER_EIP, 0),
        entry(msr::STAR, 0),
        entry(msr::CSTAR, 0),
        entry(msr::KERNEL_GS_BASE, 0),
        entry(msr::SYSCALL_MASK, 0),
        entry(msr::LSTAR, 0),
        entry(msr::IA32_TSC, 0),
        entry(msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
        entry(msr::MTRR_DEF_TYPE, msr::MTRR_ENABLE_WRITEBACK),
    ]
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Long mode with paging through the boot page tables and the boot GDT loaded.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = boot::segment_from_gdt(
        boot::BOOT_GDT[boot::CODE_SEGMENT_INDEX as usize],
        boot::CODE_SEGMENT_INDEX,
    );
    let data = boot::segment_from_gdt(
        boot::BOOT_GDT[boot::DATA_SEGMENT_INDEX as usize],
        boot::DATA_SEGMENT_INDEX,
    );
    let tss = boot::segment_from_gdt(
        boot::BOOT_GDT[boot::TSS_SEGMENT_INDEX as usize],
        boot::TSS_SEGMENT_INDEX,
    );
    sregs.gdt.base = layout::GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&boot::BOOT_GDT) - 1) as u16;
    sregs.idt.base = layout::IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = layout::PML4_START.0;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at the 64-bit entry: RSI points at the zero page (boot protocol).
pub fn entry_regs(entry: BootEntry) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry.rip.0,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: entry.boot_params.0,
        ..Default::default()
    }
}

/// LAPIC register offsets and delivery modes for the local interrupt pins.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Everything a vCPU needs before its first run.
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    cpuid: &CpuId,
    boot_entry: Option<BootEntry>,
) -> Result<(), VcpuError> {
    let kvm = |what| {
        move |source| VcpuError::Kvm {
            index,
            what,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a kvm_msrs");
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(VcpuError::Msr {
            index,
            set,
            total: entries.len(),
            msr: entries[set].index,
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,    // x87 default control word: all exceptions masked
        mxcsr: 0x1f80, // SSE default: all exceptions masked
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    // LINT0 receives the 8259's ExtINT, LINT1 the NMI, as firmware would leave them.
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    // Application processors wait for INIT/SIPI from the guest; only the boot vCPU gets state.
    if let Some(entry) = boot_entry {
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&long_mode_sregs(sregs))
            .map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&entry_regs(entry))
            .map_err(kvm("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// What a vCPU thread is doing, as a stall report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    NotStarted,
    /// Inside KVM_RUN: the guest runs (or halts) and KVM handles its exits in the kernel.
    InKvmRun,
    /// Back in the VMM, handling an exit at `address` (port or guest-physical address).
    PioRead,
    PioWrite,
    MmioRead,
    MmioWrite,
    Stopped,
}

impl VcpuState {
    const ALL: [VcpuState; 7] = [
        VcpuState::NotStarted,
        VcpuState::InKvmRun,
        VcpuState::PioRead,
        VcpuState::PioWrite,
        VcpuState::MmioRead,
        VcpuState::MmioWrite,
        VcpuState::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VcpuState::NotStarted => "not_started",
            VcpuState::InKvmRun => "in_kvm_run",
            VcpuState::PioRead => "pio_read",
            VcpuState::PioWrite => "pio_write",
            VcpuState::MmioRead => "mmio_read",
            VcpuState::MmioWrite => "mmio_write",
            VcpuState::Stopped => "stopped",
        }
    }
}

/// Bits of a slot's word that hold the time; the state sits above them.
const SINCE_BITS: u32 = 56;
const SINCE_MASK: u64 = (1 << SINCE_BITS) - 1;

#[derive(Default)]
struct ActivitySlot {
    /// State index in the top byte, microseconds since the epoch below.
    state_and_since: AtomicU64,
    address: AtomicU64,
    /// The vCPU thread's pthread_t, once it runs (0 before), for kicks.
    thread: AtomicU64,
}

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing; KVM_RUN
/// returns EINTR and the thread enters again).
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR2;

extern "C" fn ignore_kick(_signal: libc::c_int) {}

/// Installs the kick signal's handler (without SA_RESTART, so KVM_RUN returns EINTR). Call
/// once before the vCPU threads start.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is a valid argument;
    // the handler is async-signal-safe (it does nothing).
    unsafe {
        let mut action = std::mem::zeroed::<libc::sigaction>();
        action.sa_sigaction = ignore_kick as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Every vCPU's current state and since when, written by the vCPU threads (two relaxed
/// stores per exit) and read by stall reports: a guest that stops making progress either
/// waits inside KVM_RUN (its own business or KVM's) or is stuck in the VMM handling an exit,
/// and the report says which.
pub struct VcpuActivity {
    epoch: Instant,
    slots: Box<[ActivitySlot]>,
}

/// One vCPU as a stall report prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSnapshot {
    pub index: usize,
    pub state: VcpuState,
    pub address: u64,
    pub for_duration: Duration,
}

impl VcpuActivity {
    pub fn new(vcpus: usize) -> Self {
        Self {
            epoch: Instant::now(),
            slots: (0..vcpus).map(|_| ActivitySlot::default()).collect(),
        }
    }

    /// Records the calling thread as vCPU `vcpu`'s, so it can be kicked.
    pub fn register_thread(&self, vcpu: usize) {
        if let Some(slot) = self.slots.get(vcpu) {
            // SAFETY: pthread_self has no preconditions.
            let thread = unsafe { libc::pthread_self() };
            slot.thread.store(thread as u64, Ordering::Relaxed);
        }
    }

    /// Kicks every vCPU that has been inside KVM_RUN for at least `after` out of it (it
    /// enters again at once). Returns how many were kicked.
    ///
    /// Why: in the lab (KVM nested on QEMU TCG), a halted L2 vCPU sometimes misses its timer
    /// wake-up for good (guests hung with every vCPU in KVM_RUN for minutes, RCU reporting
    /// "timer wakeup didn't happen"). Entering KVM_RUN again makes KVM look at the expired
    /// timer. On real hardware this costs one exit per idle vCPU per period.
    pub fn kick_idle(&self, after: Duration) -> usize {
        let mut kicked = 0;
        for (vcpu, slot) in self.snapshot().iter().zip(self.slots.iter()) {
            let thread = slot.thread.load(Ordering::Relaxed);
            if vcpu.state != VcpuState::InKvmRun || vcpu.for_duration < after || thread == 0 {
                continue;
            }
            // SAFETY: `thread` is a vCPU thread's pthread_t, recorded by itself; vCPU
            // threads live until the process exits, and the kick signal's handler is
            // installed before they start.
            if unsafe { libc::pthread_kill(thread as libc::pthread_t, KICK_SIGNAL) } == 0 {
                kicked += 1;
            }
        }
        kicked
    }

    pub fn set(&self, vcpu: usize, state: VcpuState, address: u64) {
        let Some(slot) = self.slots.get(vcpu) else {
            return;
        };
        let since = (self.epoch.elapsed().as_micros() as u64) & SINCE_MASK;
        let index = VcpuState::ALL.iter().position(|s| *s == state).unwrap_or(0) as u64;
        slot.address.store(address, Ordering::Relaxed);
        slot.state_and_since
            .store((index << SINCE_BITS) | since, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Vec<VcpuSnapshot> {
        let now = self.epoch.elapsed().as_micros() as u64;
        (0..)
            .zip(self.slots.iter())
            .map(|(index, slot)| {
                let word = slot.state_and_since.load(Ordering::Relaxed);
                let state = VcpuState::ALL
                    .get((word >> SINCE_BITS) as usize)
                    .copied()
                    .unwrap_or(VcpuState::NotStarted);
                VcpuSnapshot {
                    index,
                    state,
                    address: slot.address.load(Ordering::Relaxed),
                    for_duration: Duration::from_micros(now.saturating_sub(word & SINCE_MASK)),
                }
            })
            .collect()
    }
}

/// What a vCPU thread shares with the rest of the VMM.
pub struct VcpuContext {
    pub index: u32,
    pub activity: Arc<VcpuActivity>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Sender<VmExit>,
    /// Set for the boot vCPU: when the VMM was launched, to report the time to its first entry.
    pub launched: Option<Instant>,
    /// Guest RAM, read (never written) by the fault dump.
    pub memory: GuestMemoryMmap,
    /// The interrupts sent toward each vCPU lately, printed by the fault dump.
    pub recent_interrupts: Arc<RecentInterrupts>,
}

impl VcpuContext {
    /// Prints what KVM knew about this vCPU (`@@vmm fault_dump` lines), before the VM exits.
    fn dump_fault(&self, vcpu: &VcpuFd, exit: &str, details: &[String]) {
        fault_dump::print(
            self.index,
            exit,
            details,
            vcpu,
            &self.memory,
            &self.recent_interrupts,
        );
    }
}

/// Runs the vCPU until the guest stops it or it fails; reports why on `ctx.exits`.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    if let Some(launched) = ctx.launched {
        eprintln!("@@vmm first_run_us={}", launched.elapsed().as_micros());
    }
    let vcpu_index = ctx.index as usize;
    ctx.activity.register_thread(vcpu_index);
    let activity = |state, address| ctx.activity.set(vcpu_index, state, address);
    let exit = loop {
        activity(VcpuState::InKvmRun, 0);
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                activity(VcpuState::PioRead, u64::from(port));
                if !ctx.pio.read(u64::from(port), data) {
                    // Nothing decodes the port: the bus floats high.
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                activity(VcpuState::PioWrite, u64::from(port));
                ctx.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                activity(VcpuState::MmioRead, addr);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                activity(VcpuState::MmioWrite, addr);
                ctx.mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => {
                ctx.dump_fault(&vcpu, "shutdown", &[]);
                break VmExit::Fault {
                    vcpu: ctx.index,
                    cause: "triple fault (KVM_EXIT_SHUTDOWN)".into(),
                };
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                break match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Fault {
                        vcpu: ctx.index,
                        cause: format!("system event {other} (KVM_EXIT_SYSTEM_EVENT)"),
                    },
                }
            }
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
                // `internal` member of the exit union.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let details = [fault_dump::internal_error_line(
                    internal.suberror,
                    internal.ndata,
                    &internal.data,
                )];
                ctx.dump_fault(&vcpu, "internal_error", &details);
                break VmExit::Fault {
                    vcpu: ctx.index,
                    cause: format!(
                        "KVM internal error, suberror {} (1: emulation failure, 2: simultaneous exceptions, 3: delivery event)",
                        internal.suberror
                    ),
                };
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let details = [format!(
                    "fail_entry hardware_reason={reason:#x} host_cpu={cpu}"
                )];
                ctx.dump_fault(&vcpu, "fail_entry", &details);
                break VmExit::Fault {
                    vcpu: ctx.index,
                    cause: format!(
                        "VM entry failed on host CPU {cpu}, hardware reason {reason:#x}"
                    ),
                };
            }
            // A signal interrupted KVM_RUN; nothing to do but enter again.
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                break VmExit::Fault {
                    vcpu: ctx.index,
                    cause: format!("unexpected exit {other:?}"),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                break VmExit::Fault {
                    vcpu: ctx.index,
                    cause: format!("KVM_RUN failed: {e}"),
                }
            }
        }
    };
    activity(VcpuState::Stopped, 0);
    // The receiver only goes away when the VMM is already exiting.
    let _ = ctx.exits.send(exit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr3, layout::PML4_START.0);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.ss.selector, 16);
        assert_eq!(sregs.gdt.limit, 31);
    }

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let regs = entry_regs(BootEntry {
            rip: vm_memory::GuestAddress(0x10_0200),
            boot_params: layout::ZERO_PAGE_START,
        });
        assert_eq!(regs.rip, 0x10_0200);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START.0);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn lapic_lint_pins_get_their_delivery_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT_LINT0 + 1] = 0x07; // some other mode
        regs[APIC_LVT_LINT0] = 0x30u8 as std::os::raw::c_char;
        set_delivery_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        set_delivery_mode(&mut regs, APIC_LVT_LINT1, APIC_MODE_NMI);
        let read = |offset: usize| {
            u32::from_le_bytes([
                regs[offset] as u8,
                regs[offset + 1] as u8,
                regs[offset + 2] as u8,
                regs[offset + 3] as u8,
            ])
        };
        assert_eq!(read(APIC_LVT_LINT0), 0x730);
        assert_eq!(read(APIC_LVT_LINT1), 0x400);
    }

    #[test]
    fn boot_msrs_enable_writeback_mtrrs() {
        let msrs = boot_msrs();
        let mtrr = msrs.iter().find(|m| m.index == msr::MTRR_DEF_TYPE).unwrap();
        assert_eq!(mtrr.data, 0x806);
        let mut indices: Vec<_> = msrs.iter().map(|m| m.index).collect();
        indices.sort();
        indices.dedup();
        assert_eq!(indices.len(), msrs.len());
    }

    #[test]
    fn activity_shows_each_vcpus_state_and_how_long_it_has_been_in_it() {
        let activity = VcpuActivity::new(2);
        assert!(activity
            .snapshot()
            .iter()
            .all(|v| v.state == VcpuState::NotStarted));
        activity.set(1, VcpuState::MmioWrite, 0xfebf_0000);
        activity.set(0, VcpuState::InKvmRun, 0);
        activity.set(7, VcpuState::PioRead, 0x3f8); // no such vCPU: ignored
        std::thread::sleep(Duration::from_millis(20));
        let snapshot = activity.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(snapshot[0].state, VcpuState::InKvmRun);
        assert_eq!(snapshot[1].state, VcpuState::MmioWrite);
        assert_eq!(snapshot[1].address, 0xfebf_0000);
        assert!(snapshot[1].for_duration >= Duration::from_millis(20));
        assert_eq!(VcpuState::Stopped.name(), "stopped");
    }
}
