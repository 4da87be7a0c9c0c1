//! Typed io_uring user data: every SQE the pool submits says what it is for, so a completion
//! is routed by decoding, never by trusting a raw pointer or a stale index.
//!
//! Layout of the `u64`, high to low: kind (8 bits) | queue slot (20) | slot generation (16) |
//! request (20). A slot's generation changes every time the slot is reused, so a completion
//! that outlived its queue (which the removal protocol should prevent anyway) is recognised
//! and dropped instead of being delivered to the slot's next owner.

/// Queue slots per worker: 20 bits of user data.
pub const MAX_QUEUE_SLOTS: u32 = 1 << 20;
/// Requests per queue: 20 bits of user data (virtqueues have at most 32768 entries).
pub const MAX_REQUESTS: u32 = 1 << 20;

const KIND_SHIFT: u32 = 56;
const SLOT_SHIFT: u32 = 36;
const GENERATION_SHIFT: u32 = 20;
const SLOT_MASK: u64 = (MAX_QUEUE_SLOTS as u64) - 1;
const GENERATION_MASK: u64 = 0xffff;
const REQUEST_MASK: u64 = (MAX_REQUESTS as u64) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// The poll on the worker's control eventfd.
    Control = 1,
    /// The poll on a queue's notifier eventfd.
    Notify = 2,
    /// A backend operation of one request of a queue.
    Io = 3,
    /// An ASYNC_CANCEL issued while removing a queue; its own completion carries nothing.
    Cancel = 4,
}

impl OpKind {
    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Control),
            2 => Some(Self::Notify),
            3 => Some(Self::Io),
            4 => Some(Self::Cancel),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    pub kind: OpKind,
    pub slot: u32,
    pub generation: u16,
    pub request: u32,
}

impl UserData {
    pub fn control() -> Self {
        Self {
            kind: OpKind::Control,
            slot: 0,
            generation: 0,
            request: 0,
        }
    }

    pub fn notify(slot: u32, generation: u16) -> Self {
        Self {
            kind: OpKind::Notify,
            slot,
            generation,
            request: 0,
        }
    }

    pub fn io(slot: u32, generation: u16, request: u32) -> Self {
        Self {
            kind: OpKind::Io,
            slot,
            generation,
            request,
        }
    }

    pub fn cancel(slot: u32, generation: u16) -> Self {
        Self {
            kind: OpKind::Cancel,
            slot,
            generation,
            request: 0,
        }
    }

    /// Packs the fields; values too wide for their field are a bug of the caller, caught in
    /// debug builds and masked otherwise (the generation check then rejects the completion).
    pub fn encode(self) -> u64 {
        debug_assert!(self.slot < MAX_QUEUE_SLOTS && self.request < MAX_REQUESTS);
        (u64::from(self.kind as u8) << KIND_SHIFT)
            | ((u64::from(self.slot) & SLOT_MASK) << SLOT_SHIFT)
            | ((u64::from(self.generation) & GENERATION_MASK) << GENERATION_SHIFT)
            | (u64::from(self.request) & REQUEST_MASK)
    }

    /// Unpacks user data the pool wrote; `None` for anything else.
    pub fn decode(value: u64) -> Option<Self> {
        let kind = OpKind::from_u8((value >> KIND_SHIFT) as u8)?;
        // The masks make these conversions lossless.
        let slot = ((value >> SLOT_SHIFT) & SLOT_MASK) as u32;
        let generation = ((value >> GENERATION_SHIFT) & GENERATION_MASK) as u16;
        let request = (value & REQUEST_MASK) as u32;
        Some(Self {
            kind,
            slot,
            generation,
            request,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for data in [
            UserData::control(),
            UserData::notify(7, 65535),
            UserData::io(MAX_QUEUE_SLOTS - 1, 3, MAX_REQUESTS - 1),
            UserData::cancel(0, 1),
        ] {
            assert_eq!(UserData::decode(data.encode()), Some(data));
        }
    }

    #[test]
    fn rejects_foreign_values() {
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(u64::MAX), None);
        assert_eq!(UserData::decode(9 << KIND_SHIFT), None);
    }
}
