//! Asymmetric Namespace Access (NVMe 1.4, 8.20): how a controller of a multi-controller
//! subsystem reaches each namespace. The namespaces are dealt round-robin into the ANA
//! groups (one group per namespace by default: group id = nsid; with fewer groups, as on an
//! array whose two ports each own half the volumes, namespace n is in group
//! ((n - 1) mod groups) + 1), and each controller has its own state per group, so the host
//! can make one path optimized, another inaccessible, and flip them while I/O runs. The
//! states are read by the I/O workers on every command (one relaxed load) and survive
//! controller resets: they belong to the subsystem's ports, not to a controller's life.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::Status;

/// Get Log Page identifier of the ANA log.
pub const LOG_ANA: u8 = 0x0C;
/// Get Log Page LSP bit 0 for the ANA log: Return Groups Only (no NSID lists).
pub const LSP_RETURN_GROUPS_ONLY: u8 = 1;
/// Asynchronous event Notice information: Asymmetric Namespace Access Change.
pub const NOTICE_ANA_CHANGE: u8 = 0x03;
/// Asynchronous Event Configuration (and OAES) bit for ANA Change Notices.
pub const AEC_ANA_CHANGE: u32 = 1 << 11;
/// Identify Controller ANACAP: reports optimized, non-optimized, inaccessible, persistent
/// loss and change (bits 0-4); a namespace's group id does not change while it is attached
/// (bit 6).
pub const ANA_CAPABILITIES: u8 = 0b0101_1111;
/// Identify Controller ANATT by default: the longest a group stays in the change state, in
/// seconds. Linux resets a controller whose group is still changing after twice this long.
pub const ANA_TRANSITION_TIME_SECS: u8 = 10;

const HEADER_BYTES: usize = 16;
const DESCRIPTOR_BYTES: usize = 32;

/// An ANA state (NVMe 1.4, 8.20.3) with its ANA log encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0F,
}

impl AnaState {
    pub const ALL: [AnaState; 5] = [
        AnaState::Optimized,
        AnaState::NonOptimized,
        AnaState::Inaccessible,
        AnaState::PersistentLoss,
        AnaState::Change,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|state| state.code() == code)
    }

    /// The names used on the command line and in reports (nvme-cli's, hyphenated).
    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
        }
    }

    pub fn from_name(name: &str) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|state| state.name() == name)
    }

    /// The Path Related Status (SCT 3) an I/O command gets in this state, if it cannot be
    /// served. Do Not Retry stays clear: the host is meant to try another path.
    pub fn io_status(self) -> Option<Status> {
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
            AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
            AnaState::Change => Some(Status::ANA_TRANSITION),
        }
    }
}

/// One controller's ANA state of every group, and the change counts of the ANA log.
#[derive(Debug)]
pub struct AnaGroups {
    /// Index group id - 1.
    states: Vec<AtomicU8>,
    namespaces: u32,
    change_counts: Vec<AtomicU64>,
    /// The log header's change count: changes of any group.
    change_count: AtomicU64,
}

impl AnaGroups {
    /// `groups` groups (ids 1..=groups, at least 1, at most one per namespace) holding
    /// `namespaces` namespaces round-robin, all optimized.
    pub fn new(groups: u32, namespaces: u32) -> Self {
        let groups = groups.clamp(1, namespaces.max(1));
        AnaGroups {
            namespaces,
            states: (0..groups)
                .map(|_| AtomicU8::new(AnaState::Optimized.code()))
                .collect(),
            change_counts: (0..groups).map(|_| AtomicU64::new(0)).collect(),
            change_count: AtomicU64::new(0),
        }
    }

    pub fn groups(&self) -> u32 {
        self.states.len() as u32
    }

    /// The group of namespace `nsid`; None for an id the subsystem does not have.
    pub fn group_of(&self, nsid: u32) -> Option<u32> {
        let index = nsid
            .checked_sub(1)
            .filter(|&index| index < self.namespaces)?;
        Some(index % self.groups() + 1)
    }

    /// The state of the group of namespace `nsid`: what a command to it meets.
    pub fn namespace_state(&self, nsid: u32) -> Option<AnaState> {
        self.state(self.group_of(nsid)?)
    }

    /// The state of group `group`; None for an id the controller does not have.
    pub fn state(&self, group: u32) -> Option<AnaState> {
        let index = usize::try_from(group.checked_sub(1)?).ok()?;
        let code = self.states.get(index)?.load(Ordering::Relaxed);
        AnaState::from_code(code)
    }

    /// Sets group `group`'s state; Ok(true) if it changed (the caller raises the event).
    pub fn set(&self, group: u32, state: AnaState) -> Result<bool, String> {
        let index = group
            .checked_sub(1)
            .map(|index| index as usize)
            .filter(|index| *index < self.states.len())
            .ok_or_else(|| format!("no ANA group {group} (groups 1..={})", self.groups()))?;
        let old = self.states[index].swap(state.code(), Ordering::SeqCst);
        if old == state.code() {
            return Ok(false);
        }
        self.change_counts[index].fetch_add(1, Ordering::SeqCst);
        self.change_count.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }

    /// The ANA log page (NVMe 1.4, 5.14.1.12): a header and one descriptor per group, each
    /// listing its namespaces in ascending order (Linux walks them so) unless `groups_only`.
    pub fn log_page(&self, groups_only: bool) -> Vec<u8> {
        let groups = self.groups();
        let mut data = Vec::with_capacity(self.log_bytes());
        data.extend_from_slice(&self.change_count.load(Ordering::SeqCst).to_le_bytes());
        data.extend_from_slice(&(self.states.len() as u16).to_le_bytes());
        data.resize(HEADER_BYTES, 0);
        for (index, (state, change_count)) in
            self.states.iter().zip(&self.change_counts).enumerate()
        {
            let group = index as u32 + 1;
            let members: Vec<u32> = (group..=self.namespaces).step_by(groups as usize).collect();
            let start = data.len();
            data.extend_from_slice(&group.to_le_bytes());
            let listed = if groups_only { 0 } else { members.len() as u32 };
            data.extend_from_slice(&listed.to_le_bytes());
            data.extend_from_slice(&change_count.load(Ordering::SeqCst).to_le_bytes());
            data.push(state.load(Ordering::SeqCst));
            data.resize(start + DESCRIPTOR_BYTES, 0);
            if !groups_only {
                for nsid in &members {
                    data.extend_from_slice(&nsid.to_le_bytes());
                }
            }
        }
        data
    }

    /// Bytes of the full log: what Linux sizes its buffer by (header, NANAGRPID descriptors,
    /// MNAN namespace ids).
    pub fn log_bytes(&self) -> usize {
        HEADER_BYTES + self.states.len() * DESCRIPTOR_BYTES + self.namespaces as usize * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(data: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(data[offset..offset + 4].try_into().unwrap())
    }

    fn le64(data: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(data[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn states_round_trip_their_names_and_codes() {
        for state in AnaState::ALL {
            assert_eq!(AnaState::from_name(state.name()), Some(state));
            assert_eq!(AnaState::from_code(state.code()), Some(state));
        }
        assert_eq!(AnaState::from_code(0), None);
        assert_eq!(AnaState::from_name("down"), None);
        assert_eq!(AnaState::Optimized.io_status(), None);
        assert_eq!(AnaState::NonOptimized.io_status(), None);
        for state in [
            AnaState::Inaccessible,
            AnaState::PersistentLoss,
            AnaState::Change,
        ] {
            let status = state.io_status().unwrap();
            assert_eq!(status.code_type, 3, "path related");
            assert!(!status.do_not_retry, "another path may serve it");
        }
    }

    #[test]
    fn log_page_lists_every_group_with_its_state_and_change_counts() {
        let groups = AnaGroups::new(3, 3);
        assert_eq!(groups.set(2, AnaState::Inaccessible), Ok(true));
        assert_eq!(
            groups.set(2, AnaState::Inaccessible),
            Ok(false),
            "no change"
        );
        assert_eq!(groups.set(3, AnaState::Change), Ok(true));
        assert!(groups.set(0, AnaState::Optimized).is_err());
        assert!(groups.set(4, AnaState::Optimized).is_err());
        assert_eq!(groups.state(2), Some(AnaState::Inaccessible));
        assert_eq!(groups.state(4), None);
        assert_eq!(groups.state(0), None);

        let log = groups.log_page(false);
        assert_eq!(log.len(), groups.log_bytes());
        assert_eq!(le64(&log, 0), 2, "header change count");
        assert_eq!(u16::from_le_bytes([log[8], log[9]]), 3);
        let expected = [
            (1, 0, AnaState::Optimized),
            (2, 1, AnaState::Inaccessible),
            (3, 1, AnaState::Change),
        ];
        let mut offset = HEADER_BYTES;
        for (group, changes, state) in expected {
            assert_eq!(le32(&log, offset), group);
            assert_eq!(le32(&log, offset + 4), 1, "one namespace per group");
            assert_eq!(le64(&log, offset + 8), changes);
            assert_eq!(log[offset + 16], state.code());
            assert_eq!(le32(&log, offset + DESCRIPTOR_BYTES), group, "its nsid");
            offset += DESCRIPTOR_BYTES + 4;
        }

        let groups_only = groups.log_page(true);
        assert_eq!(groups_only.len(), HEADER_BYTES + 3 * DESCRIPTOR_BYTES);
        assert_eq!(le32(&groups_only, HEADER_BYTES + 4), 0, "no NSID list");
        assert_eq!(
            le32(&groups_only, HEADER_BYTES + DESCRIPTOR_BYTES),
            2,
            "next descriptor right after"
        );
    }

    #[test]
    fn namespaces_are_dealt_round_robin_into_fewer_groups() {
        let groups = AnaGroups::new(2, 5);
        assert_eq!(groups.groups(), 2);
        let of: Vec<Option<u32>> = (0..=6).map(|nsid| groups.group_of(nsid)).collect();
        assert_eq!(
            of,
            [None, Some(1), Some(2), Some(1), Some(2), Some(1), None]
        );
        assert_eq!(groups.set(2, AnaState::Inaccessible), Ok(true));
        assert_eq!(groups.namespace_state(4), Some(AnaState::Inaccessible));
        assert_eq!(groups.namespace_state(5), Some(AnaState::Optimized));
        assert_eq!(groups.namespace_state(6), None);
        assert!(
            groups.set(3, AnaState::Optimized).is_err(),
            "two groups only"
        );

        let log = groups.log_page(false);
        assert_eq!(log.len(), groups.log_bytes());
        assert_eq!(log.len(), HEADER_BYTES + 2 * DESCRIPTOR_BYTES + 5 * 4);
        // Group 1: namespaces 1, 3, 5; group 2: 2, 4, ascending.
        let mut offset = HEADER_BYTES;
        for (group, nsids, state) in [
            (1, vec![1, 3, 5], AnaState::Optimized),
            (2, vec![2, 4], AnaState::Inaccessible),
        ] {
            assert_eq!(le32(&log, offset), group);
            assert_eq!(le32(&log, offset + 4), nsids.len() as u32);
            assert_eq!(log[offset + 16], state.code());
            offset += DESCRIPTOR_BYTES;
            for nsid in nsids {
                assert_eq!(le32(&log, offset), nsid, "group {group}");
                offset += 4;
            }
        }
        // Out-of-range group counts are clamped: at least one, at most one per namespace.
        assert_eq!(AnaGroups::new(0, 3).groups(), 1);
        assert_eq!(AnaGroups::new(9, 3).groups(), 3);
    }
}
