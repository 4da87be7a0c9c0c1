//! What KVM knew about a vCPU when its guest died (triple fault, failed entry, internal
//! error), printed on stderr as `@@vmm fault_dump vcpu=N GROUP key=value...` lines, one fact
//! group per line, so that a failure can be attributed from the log alone.
//!
//! The groups, in order: `begin` (the exit), exit details (`internal_error`, `fail_entry`),
//! `regs`, `sregs`, `dtable` (gdt, idt), `segment` (cs ss ds es fs gs tr ldt),
//! `interrupt_bitmap`, `note` (only when the registers are the reset state, see below),
//! `events`, `lapic`,
//! `idt_entry` (vectors 8, 13, 14, any pending or injected event, and the last exception KVM
//! queued), `gdt_entry` (cs, ss, tr), `stack` and `stack_end` (up to 512 bytes at RSP),
//! `irq_recent` (the last interrupts userspace sent toward this vCPU), `end`. A part that
//! cannot be read prints `error=...` and the dump goes on.
//!
//! Everything read from guest memory (and every register) is guest-controlled: addresses
//! are translated by KVM page by page and read through vm-memory's bounds-checked accessors,
//! arithmetic is checked, and nothing here panics on what it reads.
//!
//! Caveat for AMD hosts (and the lab, where L1's KVM runs on QEMU's emulated SVM): KVM's SVM
//! code re-initialises the vCPU (INIT) when it handles a SHUTDOWN intercept, before
//! userspace sees KVM_EXIT_SHUTDOWN, so registers then show the reset vector rather than the
//! faulting state; the dump says so (`note state_is_reset_vector=1`). Guest memory, and what
//! `irq_recent` recorded, are unaffected. Triple faults KVM synthesises itself (an exception
//! it injects that cannot be delivered) keep the faulting state on every host.

use std::fmt::Write as _;
use std::io::Write as _;

use irq::RecentInterrupts;
use kvm_bindings::{
    kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events,
    KVM_VCPUEVENT_VALID_PAYLOAD, KVM_VCPUEVENT_VALID_SMM, KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Bytes of stack printed from RSP up.
pub const STACK_BYTES: usize = 512;
/// 8-byte words per `stack` line.
const STACK_WORDS_PER_LINE: usize = 4;
/// Translations are done per 4 KiB page, whatever the guest's page size: always correct.
const PAGE_SIZE: u64 = 4096;

const CR0_PE: u64 = 1;
const EFER_LMA: u64 = 1 << 10;

/// Exception vectors whose IDT gates are always shown: #DF, #GP, #PF.
const VECTOR_NMI: u8 = 2;
const VECTOR_DOUBLE_FAULT: u8 = 8;
const VECTOR_GENERAL_PROTECTION: u8 = 13;
const VECTOR_PAGE_FAULT: u8 = 14;

/// A KVM ioctl that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmFailure {
    pub ioctl: &'static str,
    pub errno: i32,
}

impl std::fmt::Display for KvmFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error={} errno={}", self.ioctl, self.errno)
    }
}

/// The vCPU state a dump reads: KVM's ioctls, behind a trait so the dump is testable.
pub trait FaultedVcpu {
    fn regs(&self) -> Result<kvm_regs, KvmFailure>;
    fn sregs(&self) -> Result<kvm_sregs, KvmFailure>;
    fn events(&self) -> Result<kvm_vcpu_events, KvmFailure>;
    fn lapic(&self) -> Result<kvm_lapic_state, KvmFailure>;
    /// The guest-physical address of `gva` under the vCPU's current paging; None when the
    /// page is not mapped.
    fn translate(&self, gva: u64) -> Result<Option<u64>, KvmFailure>;
}

fn failure(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmFailure {
    move |e| KvmFailure {
        ioctl,
        errno: e.errno(),
    }
}

impl FaultedVcpu for VcpuFd {
    fn regs(&self) -> Result<kvm_regs, KvmFailure> {
        self.get_regs().map_err(failure("KVM_GET_REGS"))
    }
    fn sregs(&self) -> Result<kvm_sregs, KvmFailure> {
        self.get_sregs().map_err(failure("KVM_GET_SREGS"))
    }
    fn events(&self) -> Result<kvm_vcpu_events, KvmFailure> {
        self.get_vcpu_events()
            .map_err(failure("KVM_GET_VCPU_EVENTS"))
    }
    fn lapic(&self) -> Result<kvm_lapic_state, KvmFailure> {
        self.get_lapic().map_err(failure("KVM_GET_LAPIC"))
    }
    fn translate(&self, gva: u64) -> Result<Option<u64>, KvmFailure> {
        let translation = self.translate_gva(gva).map_err(failure("KVM_TRANSLATE"))?;
        Ok((translation.valid != 0).then_some(translation.physical_address))
    }
}

/// Why a read of guest-virtual memory stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStop {
    Translate {
        gva: u64,
        failure: KvmFailure,
    },
    Unmapped {
        gva: u64,
    },
    /// The page translated to `gpa`, which is not RAM.
    NotRam {
        gva: u64,
        gpa: u64,
    },
    /// The range runs past the top of the address space.
    Wraps {
        gva: u64,
    },
}

impl std::fmt::Display for ReadStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadStop::Translate { gva, failure } => write!(f, "{failure} gva={gva:#x}"),
            ReadStop::Unmapped { gva } => write!(f, "error=unmapped gva={gva:#x}"),
            ReadStop::NotRam { gva, gpa } => {
                write!(f, "error=not_ram gva={gva:#x} gpa={gpa:#x}")
            }
            ReadStop::Wraps { gva } => write!(f, "error=address_wraps gva={gva:#x}"),
        }
    }
}

/// Reads guest-virtual `gva..gva + buf.len()` one page at a time (each page translated by
/// KVM, then read bounds-checked). Returns the bytes read before the first failure.
pub fn read_virtual(
    vcpu: &impl FaultedVcpu,
    memory: &GuestMemoryMmap,
    gva: u64,
    buf: &mut [u8],
) -> (usize, Option<ReadStop>) {
    let mut done = 0;
    while done < buf.len() {
        let Some(address) = gva.checked_add(done as u64) else {
            return (done, Some(ReadStop::Wraps { gva }));
        };
        let in_page = (PAGE_SIZE - address % PAGE_SIZE) as usize;
        let chunk_len = in_page.min(buf.len() - done);
        let gpa = match vcpu.translate(address) {
            Ok(Some(gpa)) => gpa,
            Ok(None) => return (done, Some(ReadStop::Unmapped { gva: address })),
            Err(failure) => {
                return (
                    done,
                    Some(ReadStop::Translate {
                        gva: address,
                        failure,
                    }),
                )
            }
        };
        let Some(chunk) = buf.get_mut(done..done + chunk_len) else {
            break;
        };
        if memory.read_slice(chunk, GuestAddress(gpa)).is_err() {
            return (done, Some(ReadStop::NotRam { gva: address, gpa }));
        }
        done += chunk_len;
    }
    (done, None)
}

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The CPU mode that decides the IDT and descriptor formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected,
    Long,
}

impl CpuMode {
    pub fn of(sregs: &kvm_sregs) -> Self {
        if sregs.efer & EFER_LMA != 0 {
            CpuMode::Long
        } else if sregs.cr0 & CR0_PE != 0 {
            CpuMode::Protected
        } else {
            CpuMode::Real
        }
    }

    fn name(self) -> &'static str {
        match self {
            CpuMode::Real => "real",
            CpuMode::Protected => "protected",
            CpuMode::Long => "long",
        }
    }

    /// Bytes per IDT gate; None in real mode (an IVT, not decoded).
    fn gate_size(self) -> Option<u64> {
        match self {
            CpuMode::Real => None,
            CpuMode::Protected => Some(8),
            CpuMode::Long => Some(16),
        }
    }
}

/// An IDT gate descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gate {
    pub offset: u64,
    pub selector: u16,
    /// Interrupt stack table index (long mode; 0: no stack switch).
    pub ist: u8,
    pub gate_type: u8,
    pub dpl: u8,
    pub present: bool,
}

/// Decodes a 16-byte long-mode or 8-byte protected-mode gate; None when `bytes` is short
/// or the mode is real (whose IVT has no gates).
pub fn decode_gate(bytes: &[u8], mode: CpuMode) -> Option<Gate> {
    if (bytes.len() as u64) < mode.gate_size()? {
        return None;
    }
    let access = *bytes.get(5)?;
    let low = u64::from(le_u16(bytes, 0)?) | (u64::from(le_u16(bytes, 6)?) << 16);
    let (offset, ist) = match mode {
        CpuMode::Long => (
            low | (u64::from(le_u32(bytes, 8)?) << 32),
            *bytes.get(4)? & 0x7,
        ),
        CpuMode::Protected | CpuMode::Real => (low, 0),
    };
    Some(Gate {
        offset,
        selector: le_u16(bytes, 2)?,
        ist,
        gate_type: access & 0xf,
        dpl: (access >> 5) & 0x3,
        present: access & 0x80 != 0,
    })
}

/// What an IDT gate type is; `invalid` for types the mode does not allow in an IDT.
pub fn gate_kind(gate_type: u8, mode: CpuMode) -> &'static str {
    match (gate_type, mode) {
        (0xe, _) => "interrupt_gate",
        (0xf, _) => "trap_gate",
        (0x5, CpuMode::Protected) => "task_gate",
        (0x6, CpuMode::Protected) => "interrupt_gate16",
        (0x7, CpuMode::Protected) => "trap_gate16",
        _ => "invalid",
    }
}

/// A GDT (or LDT) segment descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub base: u64,
    /// In bytes, granularity applied.
    pub limit: u32,
    pub segment_type: u8,
    /// S bit: code or data (true), system (false: TSS, LDT, gates).
    pub code_or_data: bool,
    pub dpl: u8,
    pub present: bool,
    pub available: bool,
    pub long: bool,
    pub default_big: bool,
    pub granularity: bool,
}

/// Decodes an 8-byte descriptor; `high` is the upper half of a 16-byte long-mode system
/// descriptor (TSS, LDT), which extends the base to 64 bits.
pub fn decode_descriptor(low: u64, high: Option<u64>) -> Descriptor {
    let bit = |n: u32| (low >> n) & 1 != 0;
    let raw_limit = ((low & 0xffff) | ((low >> 32) & 0xf_0000)) as u32;
    let granularity = bit(55);
    let limit = if granularity {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let code_or_data = bit(44);
    let mut base = ((low >> 16) & 0xff_ffff) | ((low >> 32) & 0xff00_0000);
    if let (false, Some(high)) = (code_or_data, high) {
        base |= (high & 0xffff_ffff) << 32;
    }
    Descriptor {
        base,
        limit,
        segment_type: ((low >> 40) & 0xf) as u8,
        code_or_data,
        dpl: ((low >> 45) & 0x3) as u8,
        present: bit(47),
        available: bit(52),
        long: bit(53),
        default_big: bit(54),
        granularity,
    }
}

/// Vectors whose bit is set in a bitmap of `bits_per_word`-bit words (lowest vector first).
pub fn bitmap_vectors(words: &[u64], bits_per_word: u32) -> Vec<u32> {
    let mut vectors = Vec::new();
    for (word_index, word) in (0u32..).zip(words) {
        for bit in 0..bits_per_word.min(64) {
            if (word >> bit) & 1 != 0 {
                vectors.push(word_index * bits_per_word + bit);
            }
        }
    }
    vectors
}

fn vector_list(vectors: &[u32]) -> String {
    if vectors.is_empty() {
        return "none".into();
    }
    let hex: Vec<String> = vectors.iter().map(|v| format!("{v:#x}")).collect();
    hex.join(",")
}

/// `stack` lines: `bytes` read at guest-virtual `address`, as 8-byte little-endian words,
/// [`STACK_WORDS_PER_LINE`] per line; a trailing partial word as its bytes.
pub fn stack_lines(address: u64, bytes: &[u8]) -> Vec<String> {
    let line_bytes = STACK_WORDS_PER_LINE * 8;
    let mut lines = Vec::new();
    for (index, chunk) in bytes.chunks(line_bytes).enumerate() {
        let at = address.wrapping_add((index * line_bytes) as u64);
        let words: Vec<String> = chunk
            .chunks_exact(8)
            .filter_map(|word| le_u64(word, 0))
            .map(|word| format!("{word:016x}"))
            .collect();
        let mut line = format!("stack addr={at:#x}");
        if !words.is_empty() {
            let _ = write!(line, " words={}", words.join(","));
        }
        let tail = chunk.chunks_exact(8).remainder();
        if !tail.is_empty() {
            let hex: String = tail.iter().map(|b| format!("{b:02x}")).collect();
            let _ = write!(line, " tail_bytes={hex}");
        }
        lines.push(line);
    }
    lines
}

pub fn regs_line(regs: &kvm_regs) -> String {
    format!(
        "regs rip={:#x} rsp={:#x} rbp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} \
         rdx={:#x} rsi={:#x} rdi={:#x} r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} \
         r13={:#x} r14={:#x} r15={:#x}",
        regs.rip,
        regs.rsp,
        regs.rbp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15
    )
}

pub fn segment_line(name: &str, segment: &kvm_segment) -> String {
    format!(
        "segment name={name} selector={:#x} base={:#x} limit={:#x} type={:#x} present={} \
         dpl={} s={} l={} db={} g={} avl={} unusable={}",
        segment.selector,
        segment.base,
        segment.limit,
        segment.type_,
        segment.present,
        segment.dpl,
        segment.s,
        segment.l,
        segment.db,
        segment.g,
        segment.avl,
        segment.unusable
    )
}

/// The `sregs`, `dtable`, `segment` and `interrupt_bitmap` lines.
pub fn sregs_lines(sregs: &kvm_sregs) -> Vec<String> {
    let mut lines = vec![format!(
        "sregs mode={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} cr8={:#x} efer={:#x} \
         apic_base={:#x}",
        CpuMode::of(sregs).name(),
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.cr8,
        sregs.efer,
        sregs.apic_base
    )];
    for (name, table) in [("gdt", &sregs.gdt), ("idt", &sregs.idt)] {
        lines.push(format!(
            "dtable name={name} base={:#x} limit={:#x}",
            table.base, table.limit
        ));
    }
    for (name, segment) in [
        ("cs", &sregs.cs),
        ("ss", &sregs.ss),
        ("ds", &sregs.ds),
        ("es", &sregs.es),
        ("fs", &sregs.fs),
        ("gs", &sregs.gs),
        ("tr", &sregs.tr),
        ("ldt", &sregs.ldt),
    ] {
        lines.push(segment_line(name, segment));
    }
    lines.push(format!(
        "interrupt_bitmap vectors={}",
        vector_list(&bitmap_vectors(&sregs.interrupt_bitmap, 64))
    ));
    lines
}

pub fn events_line(events: &kvm_vcpu_events) -> String {
    let exception = &events.exception;
    let interrupt = &events.interrupt;
    let nmi = &events.nmi;
    let mut line = format!(
        "events exception_injected={} exception_pending={} exception_nr={:#x} \
         exception_has_error_code={} exception_error_code={:#x}",
        exception.injected,
        exception.pending,
        exception.nr,
        exception.has_error_code,
        exception.error_code
    );
    if events.flags & KVM_VCPUEVENT_VALID_PAYLOAD != 0 {
        let _ = write!(
            line,
            " exception_has_payload={} exception_payload={:#x}",
            events.exception_has_payload, events.exception_payload
        );
    } else {
        // Only with KVM_CAP_EXCEPTION_PAYLOAD enabled; blkswarm does not enable it.
        line.push_str(" exception_payload=unavailable");
    }
    let _ = write!(
        line,
        " interrupt_injected={} interrupt_nr={:#x} interrupt_soft={} interrupt_shadow={} \
         nmi_injected={} nmi_pending={} nmi_masked={} sipi_vector={:#x}",
        interrupt.injected,
        interrupt.nr,
        interrupt.soft,
        interrupt.shadow,
        nmi.injected,
        nmi.pending,
        nmi.masked,
        events.sipi_vector
    );
    if events.flags & KVM_VCPUEVENT_VALID_SMM != 0 {
        let smi = &events.smi;
        let _ = write!(
            line,
            " smi_smm={} smi_pending={} smi_inside_nmi={} smi_latched_init={}",
            smi.smm, smi.pending, smi.smm_inside_nmi, smi.latched_init
        );
    }
    if events.flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT != 0 {
        let _ = write!(
            line,
            " triple_fault_pending={}",
            events.triple_fault.pending
        );
    }
    let _ = write!(line, " flags={:#x}", events.flags);
    line
}

/// LAPIC register offsets (in the KVM_GET_LAPIC page).
mod apic {
    pub const ID: usize = 0x20;
    pub const TPR: usize = 0x80;
    pub const PPR: usize = 0xa0;
    pub const SVR: usize = 0xf0;
    pub const ISR: usize = 0x100;
    pub const IRR: usize = 0x200;
    pub const ESR: usize = 0x280;
    pub const LVT_TIMER: usize = 0x320;
    pub const TIMER_INITIAL: usize = 0x380;
    pub const TIMER_CURRENT: usize = 0x390;
    /// ISR and IRR are eight 32-bit registers, 16 bytes apart.
    pub const BITMAP_REGISTERS: usize = 8;
    pub const REGISTER_STRIDE: usize = 0x10;
}

/// The `lapic` line: id, priorities, in-service and requested vectors, timer.
pub fn lapic_line(lapic: &kvm_lapic_state) -> String {
    let bytes: Vec<u8> = lapic.regs.iter().map(|b| *b as u8).collect();
    let reg = |offset: usize| le_u32(&bytes, offset).unwrap_or(0);
    let bitmap = |base: usize| -> Vec<u64> {
        (0..apic::BITMAP_REGISTERS)
            .map(|i| u64::from(reg(base + i * apic::REGISTER_STRIDE)))
            .collect()
    };
    format!(
        "lapic id_reg={:#x} svr={:#x} tpr={:#x} ppr={:#x} isr={} irr={} esr={:#x} \
         lvt_timer={:#x} timer_initial={:#x} timer_current={:#x}",
        reg(apic::ID),
        reg(apic::SVR),
        reg(apic::TPR),
        reg(apic::PPR),
        vector_list(&bitmap_vectors(&bitmap(apic::ISR), 32)),
        vector_list(&bitmap_vectors(&bitmap(apic::IRR), 32)),
        reg(apic::ESR),
        reg(apic::LVT_TIMER),
        reg(apic::TIMER_INITIAL),
        reg(apic::TIMER_CURRENT)
    )
}

/// Whether the registers are the x86 reset state (CS:IP = F000:FFF0 with the high base),
/// which is what an AMD host's KVM leaves after a SHUTDOWN intercept (see the module doc).
pub fn looks_like_reset(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000
}

/// The IDT vectors worth showing, each with why: #DF, #GP, #PF, then any event KVM had in
/// flight.
pub fn interesting_vectors(events: Option<&kvm_vcpu_events>) -> Vec<(u8, String)> {
    let mut vectors: Vec<(u8, String)> = vec![
        (VECTOR_DOUBLE_FAULT, "df".into()),
        (VECTOR_GENERAL_PROTECTION, "gp".into()),
        (VECTOR_PAGE_FAULT, "pf".into()),
    ];
    let mut add = |vector: u8, why: &str| match vectors.iter_mut().find(|(v, _)| *v == vector) {
        Some((_, reasons)) => {
            reasons.push(',');
            reasons.push_str(why);
        }
        None => vectors.push((vector, why.into())),
    };
    if let Some(events) = events {
        if events.exception.pending != 0 {
            add(events.exception.nr, "exception_pending");
        }
        if events.exception.injected != 0 {
            add(events.exception.nr, "exception_injected");
        }
        if events.interrupt.injected != 0 {
            add(events.interrupt.nr, "interrupt_injected");
        }
        if events.nmi.injected != 0 || events.nmi.pending != 0 {
            add(VECTOR_NMI, "nmi");
        }
        if events.exception.pending == 0 && events.exception.injected == 0 {
            // KVM leaves the vector of the last exception it queued in `nr` (only the flags
            // are cleared on delivery): after a triple fault that KVM synthesised, that is
            // the exception that started the chain.
            add(events.exception.nr, "last_queued_exception");
        }
    }
    vectors
}

/// The `idt_entry` line for `vector`, read from guest memory.
fn idt_entry_line(
    vcpu: &impl FaultedVcpu,
    memory: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    vector: u8,
    why: &str,
) -> String {
    let mode = CpuMode::of(sregs);
    let mut line = format!("idt_entry vector={vector:#x} why={why}");
    let Some(gate_size) = mode.gate_size() else {
        line.push_str(" skipped=real_mode");
        return line;
    };
    let offset = u64::from(vector) * gate_size;
    // The CPU raises #GP for a gate that does not fit under the limit: say so rather than
    // show bytes the CPU never looked at.
    if offset + gate_size - 1 > u64::from(sregs.idt.limit) {
        let _ = write!(line, " beyond_limit=1 idt_limit={:#x}", sregs.idt.limit);
        return line;
    }
    let gva = sregs.idt.base.wrapping_add(offset);
    let mut bytes = [0u8; 16];
    let Some(gate_bytes) = bytes.get_mut(..gate_size as usize) else {
        return line;
    };
    let _ = write!(line, " gva={gva:#x}");
    if let (_, Some(stop)) = read_virtual(vcpu, memory, gva, gate_bytes) {
        let _ = write!(line, " {stop}");
        return line;
    }
    let _ = write!(
        line,
        " raw_low={:#018x}",
        le_u64(gate_bytes, 0).unwrap_or(0)
    );
    if let Some(high) = le_u64(gate_bytes, 8) {
        let _ = write!(line, " raw_high={high:#018x}");
    }
    if let Some(gate) = decode_gate(gate_bytes, mode) {
        let _ = write!(
            line,
            " offset={:#x} selector={:#x} type={:#x} kind={} present={} dpl={} ist={}",
            gate.offset,
            gate.selector,
            gate.gate_type,
            gate_kind(gate.gate_type, mode),
            u8::from(gate.present),
            gate.dpl,
            gate.ist
        );
    }
    line
}

/// The `gdt_entry` line for segment register `name`'s selector, read from guest memory.
fn gdt_entry_line(
    vcpu: &impl FaultedVcpu,
    memory: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    name: &str,
    selector: u16,
) -> String {
    let index = u64::from(selector >> 3);
    let mut line = format!("gdt_entry name={name} selector={selector:#x} index={index}");
    if selector & 0x4 != 0 {
        line.push_str(" table=ldt skipped=ldt_not_decoded");
        return line;
    }
    if index == 0 {
        line.push_str(" null=1");
        return line;
    }
    let offset = index * 8;
    let limit = u64::from(sregs.gdt.limit);
    if offset + 7 > limit {
        let _ = write!(line, " beyond_limit=1 gdt_limit={limit:#x}");
        return line;
    }
    let gva = sregs.gdt.base.wrapping_add(offset);
    let mut low = [0u8; 8];
    let _ = write!(line, " gva={gva:#x}");
    if let (_, Some(stop)) = read_virtual(vcpu, memory, gva, &mut low) {
        let _ = write!(line, " {stop}");
        return line;
    }
    let low = u64::from_le_bytes(low);
    let _ = write!(line, " raw_low={low:#018x}");
    // In long mode, system descriptors (TSS, LDT) take 16 bytes; the upper half carries
    // base bits 63:32.
    let system = (low >> 44) & 1 == 0;
    let mut high = None;
    if system && CpuMode::of(sregs) == CpuMode::Long {
        if offset + 15 > limit {
            let _ = write!(line, " high_beyond_limit=1 gdt_limit={limit:#x}");
        } else {
            let mut bytes = [0u8; 8];
            match read_virtual(vcpu, memory, gva.wrapping_add(8), &mut bytes) {
                (_, None) => {
                    let value = u64::from_le_bytes(bytes);
                    let _ = write!(line, " raw_high={value:#018x}");
                    high = Some(value);
                }
                (_, Some(stop)) => {
                    let _ = write!(line, " high: {stop}");
                }
            }
        }
    }
    let d = decode_descriptor(low, high);
    let _ = write!(
        line,
        " base={:#x} limit={:#x} type={:#x} s={} present={} dpl={} l={} db={} g={} avl={}",
        d.base,
        d.limit,
        d.segment_type,
        u8::from(d.code_or_data),
        u8::from(d.present),
        d.dpl,
        u8::from(d.long),
        u8::from(d.default_big),
        u8::from(d.granularity),
        u8::from(d.available)
    );
    line
}

/// The `internal_error` line of a KVM_EXIT_INTERNAL_ERROR: the suberror and the first
/// `ndata` words of `data` (never more than the array holds, whatever `ndata` says).
pub fn internal_error_line(suberror: u32, ndata: u32, data: &[u64]) -> String {
    let words: Vec<String> = data
        .iter()
        .take(usize::try_from(ndata).unwrap_or(usize::MAX))
        .map(|word| format!("{word:#x}"))
        .collect();
    let words = if words.is_empty() {
        "none".to_string()
    } else {
        words.join(",")
    };
    format!("internal_error suberror={suberror} ndata={ndata} data={words}")
}

/// The `irq_recent` lines: a summary, then every entry oldest first.
pub fn recent_interrupt_lines(recent: &RecentInterrupts, apic_id: u32) -> Vec<String> {
    let entries = recent.recent(apic_id);
    let now = recent.now_us();
    let mut lines = vec![format!(
        "irq_recent apic_id={apic_id} recorded={} shown={} now_us={now} \
         unknown_destination={} seen=msix_irqfd_writes,signal_msi \
         unseen=lapic_timer,ipi,ioapic_pins",
        recent.recorded(apic_id),
        entries.len(),
        recent.unknown_destination()
    )];
    for entry in entries {
        lines.push(format!(
            "irq_recent seq={} at_us={} age_us={} vector={:#x} dest={} {}",
            entry.sequence,
            entry.at_us,
            now.saturating_sub(entry.at_us),
            entry.vector,
            entry.destination,
            entry.source
        ));
    }
    lines
}

/// Everything the dump prints, in order, each line with its `@@vmm fault_dump vcpu=N`
/// prefix. `details` are printed right after `begin` (e.g. the internal error's data).
pub fn collect(
    vcpu_index: u32,
    exit: &str,
    details: &[String],
    vcpu: &impl FaultedVcpu,
    memory: &GuestMemoryMmap,
    recent: &RecentInterrupts,
) -> Vec<String> {
    let mut lines = vec![format!("begin exit={exit}")];
    lines.extend_from_slice(details);

    let regs = vcpu.regs();
    match &regs {
        Ok(regs) => lines.push(regs_line(regs)),
        Err(e) => lines.push(format!("regs {e}")),
    }
    let sregs = vcpu.sregs();
    match &sregs {
        Ok(sregs) => lines.extend(sregs_lines(sregs)),
        Err(e) => lines.push(format!("sregs {e}")),
    }
    if let (Ok(regs), Ok(sregs)) = (&regs, &sregs) {
        if looks_like_reset(regs, sregs) {
            lines.push(
                "note state_is_reset_vector=1 why=kvm_svm_inits_the_vcpu_at_shutdown \
                 registers_are_not_the_faulting_ones=1"
                    .into(),
            );
        }
    }
    let events = vcpu.events();
    match &events {
        Ok(events) => lines.push(events_line(events)),
        Err(e) => lines.push(format!("events {e}")),
    }
    match vcpu.lapic() {
        Ok(lapic) => lines.push(lapic_line(&lapic)),
        Err(e) => lines.push(format!("lapic {e}")),
    }

    match &sregs {
        Ok(sregs) => {
            for (vector, why) in interesting_vectors(events.as_ref().ok()) {
                lines.push(idt_entry_line(vcpu, memory, sregs, vector, &why));
            }
            for (name, segment) in [("cs", &sregs.cs), ("ss", &sregs.ss), ("tr", &sregs.tr)] {
                lines.push(gdt_entry_line(vcpu, memory, sregs, name, segment.selector));
            }
        }
        Err(_) => {
            lines.push("idt_entry skipped=no_sregs".into());
            lines.push("gdt_entry skipped=no_sregs".into());
        }
    }

    match &regs {
        Ok(regs) => {
            let mut stack = [0u8; STACK_BYTES];
            let (read, stop) = read_virtual(vcpu, memory, regs.rsp, &mut stack);
            lines.extend(stack_lines(regs.rsp, stack.get(..read).unwrap_or(&[])));
            let mut end = format!("stack_end bytes={read}");
            if let Some(stop) = stop {
                let _ = write!(end, " {stop}");
            }
            lines.push(end);
        }
        Err(_) => lines.push("stack skipped=no_regs".into()),
    }

    lines.extend(recent_interrupt_lines(recent, vcpu_index));
    lines.push(format!("end lines={}", lines.len() + 1));
    lines
        .into_iter()
        .map(|line| format!("@@vmm fault_dump vcpu={vcpu_index} {line}"))
        .collect()
}

/// Collects the dump and writes it to stderr in one piece (other vCPUs may dump at once).
pub fn print(
    vcpu_index: u32,
    exit: &str,
    details: &[String],
    vcpu: &impl FaultedVcpu,
    memory: &GuestMemoryMmap,
    recent: &RecentInterrupts,
) {
    let lines = collect(vcpu_index, exit, details, vcpu, memory, recent);
    let mut text = lines.join("\n");
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use irq::InterruptSource;

    use super::*;

    /// A long-mode interrupt gate: handler `offset`, selector 0x10, present, DPL `dpl`, IST 2.
    fn long_gate(offset: u64, dpl: u8) -> [u8; 16] {
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[4] = 2;
        gate[5] = 0x80 | (dpl << 5) | 0xe;
        gate[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
        gate
    }

    #[test]
    fn decodes_long_mode_gates() {
        let gate = decode_gate(&long_gate(0xffff_ffff_8160_1234, 3), CpuMode::Long).unwrap();
        assert_eq!(
            gate,
            Gate {
                offset: 0xffff_ffff_8160_1234,
                selector: 0x10,
                ist: 2,
                gate_type: 0xe,
                dpl: 3,
                present: true,
            }
        );
        assert_eq!(gate_kind(gate.gate_type, CpuMode::Long), "interrupt_gate");
        assert_eq!(gate_kind(0x5, CpuMode::Long), "invalid");
        assert_eq!(decode_gate(&[0u8; 15], CpuMode::Long), None, "short");
        let empty = decode_gate(&[0u8; 16], CpuMode::Long).unwrap();
        assert!(!empty.present);
        assert_eq!(gate_kind(empty.gate_type, CpuMode::Long), "invalid");
    }

    #[test]
    fn decodes_protected_mode_gates_from_eight_bytes() {
        // A 32-bit trap gate at 0xc010_2030, selector 0x60, DPL 0; bytes 8.. are not read.
        let bytes = [0x30, 0x20, 0x60, 0x00, 0x00, 0x8f, 0x10, 0xc0];
        let gate = decode_gate(&bytes, CpuMode::Protected).unwrap();
        assert_eq!(
            (
                gate.offset,
                gate.selector,
                gate.gate_type,
                gate.present,
                gate.ist
            ),
            (0xc010_2030, 0x60, 0xf, true, 0)
        );
        assert_eq!(gate_kind(0x5, CpuMode::Protected), "task_gate");
        assert_eq!(
            decode_gate(&bytes, CpuMode::Long),
            None,
            "long gates are 16 bytes"
        );
    }

    #[test]
    fn decodes_code_data_and_system_descriptors() {
        // Linux's __KERNEL_CS: 64-bit code, G, limit 0xfffff.
        let code = decode_descriptor(0x00af_9b00_0000_ffff, None);
        assert_eq!(
            (code.base, code.limit, code.segment_type, code.code_or_data),
            (0, 0xffff_ffff, 0xb, true)
        );
        assert!(code.present && code.long && !code.default_big && code.granularity);
        assert_eq!(code.dpl, 0);
        // A user data segment, DPL 3, 32-bit, byte granular, base 0x1234_5678.
        let data = decode_descriptor(0x1240_f234_5678_0fff, None);
        assert_eq!(
            (data.base, data.limit, data.dpl, data.default_big),
            (0x1234_5678, 0xfff, 3, true)
        );
        // A busy 64-bit TSS at 0xfffffe00_00003000 with limit 0x4087: the upper half holds
        // base bits 63:32.
        let tss = decode_descriptor(0x0000_8b00_3000_4087, Some(0xffff_fe00));
        assert_eq!(
            (tss.base, tss.limit, tss.segment_type, tss.code_or_data),
            (0xffff_fe00_0000_3000, 0x4087, 0xb, false)
        );
        // The upper half never extends a code or data segment's base.
        assert_eq!(
            decode_descriptor(0x00af_9b00_0000_ffff, Some(u64::MAX)).base,
            0
        );
    }

    #[test]
    fn stack_words_four_per_line_with_a_tail() {
        let mut bytes: Vec<u8> = (1u64..=5).flat_map(|w| w.to_le_bytes()).collect();
        bytes.extend_from_slice(&[0xaa, 0xbb]);
        let lines = stack_lines(0x8fd0, &bytes);
        assert_eq!(
            lines,
            [
                "stack addr=0x8fd0 words=0000000000000001,0000000000000002,\
                 0000000000000003,0000000000000004",
                "stack addr=0x8ff0 words=0000000000000005 tail_bytes=aabb",
            ]
        );
        assert!(stack_lines(0, &[]).is_empty());
        assert_eq!(stack_lines(0, &[1]), ["stack addr=0x0 tail_bytes=01"]);
        // An address at the top of the space wraps in the label instead of panicking.
        assert_eq!(stack_lines(u64::MAX - 7, &[0; 40]).len(), 2);
    }

    #[test]
    fn internal_error_data_is_bounded_by_the_array() {
        assert_eq!(
            internal_error_line(3, 2, &[0x80000b0e, 0x31, 0x7]),
            "internal_error suberror=3 ndata=2 data=0x80000b0e,0x31"
        );
        assert_eq!(
            internal_error_line(1, 999, &[1, 2]),
            "internal_error suberror=1 ndata=999 data=0x1,0x2"
        );
        assert_eq!(
            internal_error_line(2, 0, &[1]),
            "internal_error suberror=2 ndata=0 data=none"
        );
    }

    #[test]
    fn bitmaps_list_their_vectors() {
        assert_eq!(bitmap_vectors(&[0, 1 << 3, 0, 1 << 63], 64), [67, 255]);
        assert_eq!(bitmap_vectors(&[1 << 31 | 1, 1 << 1], 32), [0, 31, 33]);
        assert_eq!(vector_list(&[]), "none");
        assert_eq!(vector_list(&[0x31, 0xef]), "0x31,0xef");
    }

    #[test]
    fn events_show_payload_and_triple_fault_only_when_valid() {
        let mut events = kvm_vcpu_events::default();
        events.exception.injected = 1;
        events.exception.nr = 14;
        events.exception.has_error_code = 1;
        events.exception.error_code = 2;
        let line = events_line(&events);
        assert!(
            line.starts_with("events exception_injected=1 exception_pending=0 exception_nr=0xe")
        );
        assert!(line.contains("exception_error_code=0x2 exception_payload=unavailable"));
        assert!(!line.contains("triple_fault"));
        events.flags = KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
        events.exception_has_payload = 1;
        events.exception_payload = 0xdead_b000;
        events.triple_fault.pending = 1;
        let line = events_line(&events);
        assert!(line.contains("exception_has_payload=1 exception_payload=0xdeadb000"));
        assert!(line.contains("triple_fault_pending=1 flags=0x30"), "{line}");
    }

    #[test]
    fn interesting_vectors_merge_reasons() {
        let mut events = kvm_vcpu_events::default();
        events.exception.pending = 1;
        events.exception.nr = 13;
        events.interrupt.injected = 1;
        events.interrupt.nr = 0x31;
        let vectors = interesting_vectors(Some(&events));
        assert_eq!(
            vectors,
            [
                (8, "df".to_string()),
                (13, "gp,exception_pending".to_string()),
                (14, "pf".to_string()),
                (0x31, "interrupt_injected".to_string()),
            ]
        );
        assert_eq!(interesting_vectors(None).len(), 3);
        // Nothing in flight: the last exception KVM queued is still worth a look.
        let idle = kvm_vcpu_events {
            exception: kvm_bindings::kvm_vcpu_events__bindgen_ty_1 {
                nr: 6,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            interesting_vectors(Some(&idle)).last(),
            Some(&(6, "last_queued_exception".to_string()))
        );
    }

    #[test]
    fn lapic_line_decodes_in_service_and_requested_vectors() {
        let mut lapic = kvm_lapic_state::default();
        let mut put = |offset: usize, value: u32| {
            for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                lapic.regs[offset + i] = b as std::os::raw::c_char;
            }
        };
        put(apic::ID, 1 << 24);
        put(apic::SVR, 0x1ff);
        put(apic::ISR + 0x10, 1 << 17); // vector 0x31
        put(apic::IRR + 0x70, 1 << 15); // vector 0xef
        let line = lapic_line(&lapic);
        assert!(
            line.starts_with("lapic id_reg=0x1000000 svr=0x1ff tpr=0x0 ppr=0x0 isr=0x31 irr=0xef"),
            "{line}"
        );
    }

    /// Identity paging up to `mapped`, with failing ioctls on request.
    struct FakeVcpu {
        regs: kvm_regs,
        sregs: kvm_sregs,
        mapped: u64,
        fail_regs: bool,
        fail_translate_at: Option<u64>,
    }

    fn refused(ioctl: &'static str) -> KvmFailure {
        KvmFailure { ioctl, errno: 22 }
    }

    impl FaultedVcpu for FakeVcpu {
        fn regs(&self) -> Result<kvm_regs, KvmFailure> {
            if self.fail_regs {
                return Err(refused("KVM_GET_REGS"));
            }
            Ok(self.regs)
        }
        fn sregs(&self) -> Result<kvm_sregs, KvmFailure> {
            Ok(self.sregs)
        }
        fn events(&self) -> Result<kvm_vcpu_events, KvmFailure> {
            Err(refused("KVM_GET_VCPU_EVENTS"))
        }
        fn lapic(&self) -> Result<kvm_lapic_state, KvmFailure> {
            Ok(kvm_lapic_state::default())
        }
        fn translate(&self, gva: u64) -> Result<Option<u64>, KvmFailure> {
            if self.fail_translate_at == Some(gva & !(PAGE_SIZE - 1)) {
                return Err(refused("KVM_TRANSLATE"));
            }
            Ok((gva < self.mapped).then_some(gva))
        }
    }

    const IDT: u64 = 0x1000;
    const GDT: u64 = 0x2000;
    const MEMORY: u64 = 0x10000;

    /// A long-mode vCPU whose IDT has a #PF gate and a limit covering 16 vectors, whose GDT
    /// has a code segment at 1 and a TSS at 2 (16 bytes), and whose stack holds 1, 2, 3.
    fn long_mode_guest() -> (FakeVcpu, GuestMemoryMmap) {
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY as usize)]).unwrap();
        memory
            .write_slice(
                &long_gate(0xffff_ffff_8100_0e00, 0),
                GuestAddress(IDT + 14 * 16),
            )
            .unwrap();
        memory
            .write_obj(0x00af_9b00_0000_ffffu64, GuestAddress(GDT + 8))
            .unwrap();
        memory
            .write_obj(0x0000_8b00_3000_4087u64, GuestAddress(GDT + 16))
            .unwrap();
        memory
            .write_obj(0xffff_fe00u64, GuestAddress(GDT + 24))
            .unwrap();
        for (i, word) in [1u64, 2, 3].into_iter().enumerate() {
            memory
                .write_obj(word, GuestAddress(0x8000 + 8 * i as u64))
                .unwrap();
        }
        let mut sregs = kvm_sregs {
            efer: EFER_LMA | (1 << 8),
            cr0: CR0_PE | (1 << 31),
            ..Default::default()
        };
        sregs.idt.base = IDT;
        sregs.idt.limit = 16 * 16 - 1;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 31;
        sregs.cs.selector = 0x8;
        sregs.ss.selector = 0;
        sregs.tr.selector = 0x10;
        sregs.interrupt_bitmap[0] = 1 << 0x31;
        let regs = kvm_regs {
            rip: 0x10_0abc,
            rsp: 0x8000,
            rax: 0x1122_3344_5566_7788,
            ..Default::default()
        };
        let vcpu = FakeVcpu {
            regs,
            sregs,
            mapped: MEMORY,
            fail_regs: false,
            fail_translate_at: None,
        };
        (vcpu, memory)
    }

    fn line_with<'a>(lines: &'a [String], needle: &str) -> &'a str {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}: {lines:#?}"))
    }

    #[test]
    fn a_dump_reads_registers_tables_stack_and_recent_interrupts() {
        let (vcpu, memory) = long_mode_guest();
        let recent = RecentInterrupts::new(2, Instant::now());
        recent.record(1, 0x31, InterruptSource::MsixIrqfd { gsi: 40 });
        recent.record(1, 0x32, InterruptSource::SignalMsi);
        recent.record(0, 0x33, InterruptSource::SignalMsi);
        let details = ["fail_entry hardware_reason=0x21".to_string()];
        let lines = collect(1, "shutdown", &details, &vcpu, &memory, &recent);
        assert!(lines
            .iter()
            .all(|l| l.starts_with("@@vmm fault_dump vcpu=1 ")));
        assert_eq!(lines[0], "@@vmm fault_dump vcpu=1 begin exit=shutdown");
        assert_eq!(
            lines[1],
            "@@vmm fault_dump vcpu=1 fail_entry hardware_reason=0x21"
        );
        assert!(line_with(&lines, " regs ").contains("rip=0x100abc rsp=0x8000"));
        assert!(line_with(&lines, " regs ").contains("rax=0x1122334455667788"));
        assert!(line_with(&lines, " sregs ").contains("mode=long"));
        assert!(line_with(&lines, "dtable name=idt").ends_with("base=0x1000 limit=0xff"));
        assert!(line_with(&lines, "segment name=tr").contains("selector=0x10"));
        assert!(line_with(&lines, "interrupt_bitmap").ends_with("vectors=0x31"));
        assert!(
            line_with(&lines, " events ").ends_with("events error=KVM_GET_VCPU_EVENTS errno=22")
        );
        assert!(line_with(&lines, " lapic ").contains("isr=none"));
        assert!(!lines.iter().any(|l| l.contains(" note ")));

        let pf = line_with(&lines, "idt_entry vector=0xe");
        assert!(pf.contains("why=pf gva=0x10e0"), "{pf}");
        assert!(
            pf.contains("offset=0xffffffff81000e00 selector=0x10 type=0xe kind=interrupt_gate present=1 dpl=0 ist=2"),
            "{pf}"
        );
        let df = line_with(&lines, "idt_entry vector=0x8");
        assert!(
            df.contains("present=0") && df.contains("kind=invalid"),
            "{df}"
        );

        let cs = line_with(&lines, "gdt_entry name=cs");
        assert!(
            cs.contains("index=1 gva=0x2008 raw_low=0x00af9b000000ffff"),
            "{cs}"
        );
        assert!(cs.contains("base=0x0 limit=0xffffffff type=0xb s=1 present=1 dpl=0 l=1"));
        assert!(line_with(&lines, "gdt_entry name=ss").ends_with("null=1"));
        let tr = line_with(&lines, "gdt_entry name=tr");
        assert!(
            tr.contains("raw_high=0x00000000fffffe00 base=0xfffffe0000003000 limit=0x4087"),
            "{tr}"
        );

        let stack = line_with(&lines, "stack addr=0x8000");
        assert!(stack.ends_with(
            "words=0000000000000001,0000000000000002,0000000000000003,0000000000000000"
        ));
        assert_eq!(
            lines.iter().filter(|l| l.contains(" stack addr=")).count(),
            16
        );
        assert!(line_with(&lines, "stack_end").ends_with("stack_end bytes=512"));

        let summary = line_with(&lines, "irq_recent apic_id=1");
        assert!(summary.contains("recorded=2 shown=2"), "{summary}");
        let entries: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("irq_recent seq="))
            .collect();
        assert_eq!(entries.len(), 2);
        assert!(
            entries[0].contains("seq=0")
                && entries[0].ends_with("vector=0x31 dest=1 source=msix_irqfd gsi=40")
        );
        assert!(entries[1].ends_with("vector=0x32 dest=1 source=signal_msi"));
        assert_eq!(
            lines.last().unwrap(),
            &format!("@@vmm fault_dump vcpu=1 end lines={}", lines.len())
        );
    }

    #[test]
    fn hostile_tables_and_stacks_are_reported_not_followed() {
        let (mut vcpu, memory) = long_mode_guest();
        // IDT limit 7 (what the boot state has): #DF, #GP, #PF gates lie beyond it.
        vcpu.sregs.idt.limit = 7;
        // CS points past the GDT limit, SS into the LDT, TR's upper half past the limit.
        vcpu.sregs.cs.selector = 0x48;
        vcpu.sregs.ss.selector = 0x0c;
        vcpu.sregs.gdt.limit = 23;
        // The stack runs off the end of the mapped range after 0x10 bytes.
        vcpu.mapped = 0x8000;
        vcpu.regs.rsp = 0x7ff0;
        let recent = RecentInterrupts::new(0, Instant::now());
        let lines = collect(0, "shutdown", &[], &vcpu, &memory, &recent);
        assert!(line_with(&lines, "idt_entry vector=0x8").ends_with("beyond_limit=1 idt_limit=0x7"));
        assert!(line_with(&lines, "gdt_entry name=cs").ends_with("beyond_limit=1 gdt_limit=0x17"));
        assert!(line_with(&lines, "gdt_entry name=ss").contains("table=ldt"));
        assert!(line_with(&lines, "gdt_entry name=tr").contains("high_beyond_limit=1"));
        assert!(line_with(&lines, "stack addr=0x7ff0")
            .ends_with("words=0000000000000000,0000000000000000"));
        assert!(line_with(&lines, "stack_end").ends_with("bytes=16 error=unmapped gva=0x8000"));
        assert!(line_with(&lines, "irq_recent apic_id=0").contains("recorded=0 shown=0"));

        // A stack at the top of the address space, and beyond RAM.
        vcpu.mapped = u64::MAX;
        vcpu.regs.rsp = u64::MAX - 3;
        let lines = collect(0, "shutdown", &[], &vcpu, &memory, &recent);
        assert!(line_with(&lines, "stack_end").contains("error=not_ram gva=0xfffffffffffffffc"));
        // A translation that KVM refuses.
        vcpu.regs.rsp = 0x4f00;
        vcpu.fail_translate_at = Some(0x5000);
        let lines = collect(0, "shutdown", &[], &vcpu, &memory, &recent);
        assert!(line_with(&lines, "stack_end")
            .ends_with("bytes=256 error=KVM_TRANSLATE errno=22 gva=0x5000"));
    }

    #[test]
    fn failed_ioctls_print_errors_and_the_dump_goes_on() {
        let (mut vcpu, memory) = long_mode_guest();
        vcpu.fail_regs = true;
        let recent = RecentInterrupts::new(1, Instant::now());
        let lines = collect(0, "internal_error", &[], &vcpu, &memory, &recent);
        assert!(line_with(&lines, " regs ").ends_with("regs error=KVM_GET_REGS errno=22"));
        assert!(line_with(&lines, " stack ").ends_with("stack skipped=no_regs"));
        assert!(line_with(&lines, "idt_entry vector=0xe").contains("present=1"));
        assert!(lines.last().unwrap().contains(" end lines="));
    }

    #[test]
    fn the_reset_vector_is_flagged() {
        let (mut vcpu, memory) = long_mode_guest();
        vcpu.regs.rip = 0xfff0;
        vcpu.sregs.cs.selector = 0xf000;
        vcpu.sregs.cs.base = 0xffff_0000;
        vcpu.sregs.efer = 0;
        vcpu.sregs.cr0 = 0x6000_0010;
        let recent = RecentInterrupts::new(1, Instant::now());
        let lines = collect(0, "shutdown", &[], &vcpu, &memory, &recent);
        assert!(line_with(&lines, " note ").contains("state_is_reset_vector=1"));
        assert!(line_with(&lines, " sregs ").contains("mode=real"));
        assert!(line_with(&lines, "idt_entry vector=0xd").ends_with("skipped=real_mode"));
    }
}
