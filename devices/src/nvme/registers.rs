//! The controller register file at the start of BAR 0 (NVMe 1.4, 3.1) and the doorbells
//! after it. Pure state: effects of a write (enable, reset, doorbells) are returned to the
//! controller as a [`RegisterWrite`].

pub const REG_CAP: u64 = 0x00;
pub const REG_VS: u64 = 0x08;
pub const REG_INTMS: u64 = 0x0C;
pub const REG_INTMC: u64 = 0x10;
pub const REG_CC: u64 = 0x14;
pub const REG_CSTS: u64 = 0x1C;
pub const REG_NSSR: u64 = 0x20;
pub const REG_AQA: u64 = 0x24;
pub const REG_ASQ: u64 = 0x28;
pub const REG_ACQ: u64 = 0x30;
pub const DOORBELL_BASE: u64 = 0x1000;
/// CAP.DSTRD = 0: doorbells are 4 bytes apart.
pub const DOORBELL_STRIDE: u64 = 4;

/// NVMe 1.4.0.
pub const VERSION_1_4: u32 = 0x0001_0400;

pub const CC_EN: u32 = 1;
pub const CC_CSS_SHIFT: u32 = 4;
pub const CC_MPS_SHIFT: u32 = 7;
pub const CC_AMS_SHIFT: u32 = 11;
pub const CC_SHN_SHIFT: u32 = 14;
pub const CC_IOSQES_SHIFT: u32 = 16;
pub const CC_IOCQES_SHIFT: u32 = 20;

pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 1 << 1;
pub const CSTS_SHST_MASK: u32 = 0b11 << 2;
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;
/// NVM Subsystem Reset Occurred; the host clears it by writing 1 (RW1C).
pub const CSTS_NSSRO: u32 = 1 << 4;

/// "NVMe" in ASCII: the only NSSR value that starts an NVM Subsystem Reset.
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

/// CAP.TO in 500 ms units: how long the host waits for RDY to follow CC.EN.
const CAP_TIMEOUT_500MS: u64 = 30;

pub fn cc_field(cc: u32, shift: u32, mask: u32) -> u32 {
    (cc >> shift) & mask
}

pub fn cc_shutdown_notification(cc: u32) -> u32 {
    cc_field(cc, CC_SHN_SHIFT, 0b11)
}

/// The CAP register: MQES, CQR=1 (queues must be physically contiguous), AMS round robin
/// only, TO, DSTRD=0, NSSRS=1 (NVM Subsystem Reset through NSSR), CSS=NVM, MPSMIN=MPSMAX=0
/// (4 KiB pages only).
pub fn capabilities(max_queue_entries: u32) -> u64 {
    let mqes = u64::from(max_queue_entries - 1) & 0xFFFF;
    let contiguous_queues_required = 1 << 16;
    let timeout = CAP_TIMEOUT_500MS << 24;
    let subsystem_reset_supported = 1 << 36;
    let nvm_command_set = 1 << 37;
    mqes | contiguous_queues_required | timeout | subsystem_reset_supported | nvm_command_set
}

/// A doorbell register, decoded from its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    SubmissionTail(u16),
    CompletionHead(u16),
}

impl Doorbell {
    /// Doorbell 2y is SQ y's tail, 2y+1 is CQ y's head (with DSTRD = 0).
    pub fn from_offset(offset: u64) -> Option<Doorbell> {
        let index = offset.checked_sub(DOORBELL_BASE)? / DOORBELL_STRIDE;
        let queue_id = u16::try_from(index / 2).ok()?;
        Some(if index.is_multiple_of(2) {
            Doorbell::SubmissionTail(queue_id)
        } else {
            Doorbell::CompletionHead(queue_id)
        })
    }

    /// Position among the doorbells: 2y for SQ y, 2y+1 for CQ y.
    pub fn index(self) -> u64 {
        match self {
            Doorbell::SubmissionTail(qid) => 2 * u64::from(qid),
            Doorbell::CompletionHead(qid) => 2 * u64::from(qid) + 1,
        }
    }

    pub fn offset(self) -> u64 {
        DOORBELL_BASE + self.index() * DOORBELL_STRIDE
    }

    pub fn queue_id(self) -> u16 {
        match self {
            Doorbell::SubmissionTail(qid) | Doorbell::CompletionHead(qid) => qid,
        }
    }
}

/// What a register write asks of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterWrite {
    /// Stored (or dropped, for read-only registers); nothing else to do.
    Stored,
    ControllerConfiguration {
        old: u32,
        new: u32,
    },
    Doorbell {
        doorbell: Doorbell,
        value: u32,
    },
    /// "NVMe" written to NSSR.
    SubsystemReset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterFile {
    pub cap: u64,
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    /// Stored as written, reserved low bits included, so enabling can reject a misaligned base.
    pub asq: u64,
    pub acq: u64,
    /// INTMS/INTMC: the pin/MSI interrupt mask; unused with MSI-X but readable back.
    pub interrupt_mask: u32,
}

impl RegisterFile {
    pub fn new(max_queue_entries: u32) -> Self {
        RegisterFile {
            cap: capabilities(max_queue_entries),
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            interrupt_mask: 0,
        }
    }

    /// 64-bit registers may be accessed as one 8-byte access or two 4-byte halves; everything
    /// else only as aligned 4 bytes (NVMe 1.4, 3.1).
    fn access_allowed(offset: u64, len: usize) -> bool {
        match len {
            4 => offset.is_multiple_of(4),
            8 => matches!(offset, REG_CAP | REG_ASQ | REG_ACQ),
            _ => false,
        }
    }

    /// Reads `len` bytes at `offset`; `None` for an access the specification does not allow.
    /// Reserved registers and the write-only doorbells read as zero.
    pub fn read(&self, offset: u64, len: usize) -> Option<u64> {
        if !Self::access_allowed(offset, len) {
            return None;
        }
        if len == 8 {
            let low = u64::from(self.read_dword(offset));
            let high = u64::from(self.read_dword(offset + 4));
            return Some(low | high << 32);
        }
        Some(u64::from(self.read_dword(offset)))
    }

    fn read_dword(&self, offset: u64) -> u32 {
        match offset {
            REG_CAP => self.cap as u32,
            0x04 => (self.cap >> 32) as u32,
            REG_VS => VERSION_1_4,
            REG_INTMS | REG_INTMC => self.interrupt_mask,
            REG_CC => self.cc,
            REG_CSTS => self.csts,
            REG_AQA => self.aqa,
            REG_ASQ => self.asq as u32,
            0x2C => (self.asq >> 32) as u32,
            REG_ACQ => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// Applies a write; `None` for an access the specification does not allow.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<RegisterWrite> {
        if !Self::access_allowed(offset, data.len()) {
            return None;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        if data.len() == 8 {
            match offset {
                REG_ASQ => self.asq = value,
                REG_ACQ => self.acq = value,
                _ => {} // CAP is read-only.
            }
            return Some(RegisterWrite::Stored);
        }
        let value = value as u32;
        if offset >= DOORBELL_BASE {
            return Doorbell::from_offset(offset)
                .map(|doorbell| RegisterWrite::Doorbell { doorbell, value });
        }
        match offset {
            REG_INTMS => self.interrupt_mask |= value,
            REG_INTMC => self.interrupt_mask &= !value,
            REG_CC => {
                let old = self.cc;
                self.cc = value;
                return Some(RegisterWrite::ControllerConfiguration { old, new: value });
            }
            // Bits 31:28 and 15:12 are reserved.
            REG_AQA => self.aqa = value & 0x0FFF_0FFF,
            REG_ASQ => self.asq = (self.asq & !0xFFFF_FFFF) | u64::from(value),
            0x2C => self.asq = (self.asq & 0xFFFF_FFFF) | u64::from(value) << 32,
            REG_ACQ => self.acq = (self.acq & !0xFFFF_FFFF) | u64::from(value),
            0x34 => self.acq = (self.acq & 0xFFFF_FFFF) | u64::from(value) << 32,
            REG_CSTS => self.csts &= !(value & CSTS_NSSRO),
            REG_NSSR if value == NSSR_RESET_VALUE => return Some(RegisterWrite::SubsystemReset),
            // CAP and VS are read-only; NSSR ignores any other value.
            _ => {}
        }
        Some(RegisterWrite::Stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_fields() {
        let cap = capabilities(1024);
        assert_eq!(cap & 0xFFFF, 1023);
        assert_eq!((cap >> 16) & 1, 1, "CQR");
        assert_eq!((cap >> 17) & 0b11, 0, "AMS");
        assert_eq!((cap >> 24) & 0xFF, CAP_TIMEOUT_500MS);
        assert_eq!((cap >> 32) & 0xF, 0, "DSTRD");
        assert_eq!((cap >> 36) & 1, 1, "NSSRS");
        assert_eq!((cap >> 37) & 0xFF, 1, "CSS NVM");
        assert_eq!((cap >> 48) & 0xF, 0, "MPSMIN");
        assert_eq!((cap >> 52) & 0xF, 0, "MPSMAX");
        assert_eq!(capabilities(65536) & 0xFFFF, 0xFFFF);
    }

    #[test]
    fn subsystem_reset_register_and_its_status_bit() {
        let mut regs = RegisterFile::new(64);
        let write =
            |regs: &mut RegisterFile, offset, value: u32| regs.write(offset, &value.to_le_bytes());
        assert_eq!(
            write(&mut regs, REG_NSSR, 0x1234),
            Some(RegisterWrite::Stored)
        );
        assert_eq!(
            write(&mut regs, REG_NSSR, NSSR_RESET_VALUE),
            Some(RegisterWrite::SubsystemReset)
        );
        assert_eq!(regs.read(REG_NSSR, 4), Some(0), "NSSR reads as zero");
        regs.csts = CSTS_NSSRO | CSTS_RDY;
        write(&mut regs, REG_CSTS, CSTS_RDY);
        assert_eq!(regs.csts, CSTS_NSSRO | CSTS_RDY, "only NSSRO is writable");
        write(&mut regs, REG_CSTS, CSTS_NSSRO);
        assert_eq!(regs.csts, CSTS_RDY, "writing 1 clears NSSRO");
    }

    #[test]
    fn doorbell_offsets_round_trip() {
        assert_eq!(
            Doorbell::from_offset(0x1000),
            Some(Doorbell::SubmissionTail(0))
        );
        assert_eq!(
            Doorbell::from_offset(0x1004),
            Some(Doorbell::CompletionHead(0))
        );
        assert_eq!(
            Doorbell::from_offset(0x1008),
            Some(Doorbell::SubmissionTail(1))
        );
        assert_eq!(
            Doorbell::from_offset(0x100C),
            Some(Doorbell::CompletionHead(1))
        );
        for qid in [0u16, 1, 7, 1023] {
            for doorbell in [Doorbell::SubmissionTail(qid), Doorbell::CompletionHead(qid)] {
                assert_eq!(Doorbell::from_offset(doorbell.offset()), Some(doorbell));
            }
        }
    }

    #[test]
    fn access_sizes() {
        let mut regs = RegisterFile::new(64);
        assert_eq!(regs.read(REG_CAP, 8), Some(regs.cap));
        assert_eq!(regs.read(0x04, 4), Some(regs.cap >> 32));
        assert_eq!(regs.read(REG_VS, 4), Some(u64::from(VERSION_1_4)));
        assert_eq!(regs.read(REG_VS, 8), None, "VS is a 32-bit register");
        assert_eq!(regs.read(REG_CC, 2), None);
        assert_eq!(regs.read(REG_CC + 1, 4), None);
        assert_eq!(regs.write(REG_CC, &[1]), None);
        assert_eq!(
            regs.write(REG_ASQ, &0x1234_5000u64.to_le_bytes()),
            Some(RegisterWrite::Stored)
        );
        assert_eq!(
            regs.write(0x2C, &1u32.to_le_bytes()),
            Some(RegisterWrite::Stored)
        );
        assert_eq!(regs.read(REG_ASQ, 8), Some(0x1_1234_5000));
        regs.write(REG_INTMS, &0b101u32.to_le_bytes());
        regs.write(REG_INTMC, &0b001u32.to_le_bytes());
        assert_eq!(regs.read(REG_INTMS, 4), Some(0b100));
        assert_eq!(regs.read(REG_INTMC, 4), Some(0b100));
        let cap = regs.cap;
        regs.write(REG_CAP, &0u64.to_le_bytes());
        regs.write(REG_CSTS, &1u32.to_le_bytes());
        assert_eq!(
            (regs.cap, regs.csts),
            (cap, 0),
            "read-only registers ignore writes"
        );
        assert_eq!(
            regs.write(0x1008, &5u32.to_le_bytes()),
            Some(RegisterWrite::Doorbell {
                doorbell: Doorbell::SubmissionTail(1),
                value: 5
            })
        );
        assert_eq!(
            regs.write(0x1008, &5u64.to_le_bytes()),
            None,
            "doorbells are 32-bit"
        );
    }
}
