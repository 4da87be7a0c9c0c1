//! Physical Region Page walking (NVMe 1.4, 4.3): turns PRP1/PRP2 of a command into the
//! guest memory segments of a transfer. Everything here comes from the guest and is checked:
//! alignment, guest memory bounds, the transfer limit, and list lengths (bounded by the
//! transfer size, so a list that points at itself cannot loop).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Status, PAGE_SIZE};

const PRP_ENTRY_BYTES: u64 = 8;
/// PRP1 and PRP2 as a list pointer may carry an offset, but only dword (data) or qword
/// (list) aligned.
const DWORD_MASK: u64 = 0b11;
const QWORD_MASK: u64 = 0b111;
const PAGE_MASK: u64 = PAGE_SIZE - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub address: GuestAddress,
    pub len: u64,
}

/// The segments of a `len`-byte transfer described by `prp1`/`prp2`, adjacent ones merged.
/// `max_transfer` is the MDTS limit in bytes.
pub fn map_prps(
    memory: &GuestMemoryMmap,
    prp1: u64,
    prp2: u64,
    len: u64,
    max_transfer: Option<u64>,
) -> Result<Vec<Segment>, Status> {
    let mut segments = Vec::new();
    map_prps_into(memory, prp1, prp2, len, max_transfer, &mut segments)?;
    Ok(segments)
}

/// [`map_prps`] into a caller's vector (cleared first), so that the I/O path allocates
/// nothing per command once warm.
pub fn map_prps_into(
    memory: &GuestMemoryMmap,
    prp1: u64,
    prp2: u64,
    len: u64,
    max_transfer: Option<u64>,
    segments: &mut Vec<Segment>,
) -> Result<(), Status> {
    segments.clear();
    if max_transfer.is_some_and(|max| len > max) {
        return Err(Status::INVALID_FIELD);
    }
    let mut segments = SegmentList(segments);
    if len == 0 {
        return Ok(());
    }
    if prp1 & DWORD_MASK != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let first = len.min(PAGE_SIZE - (prp1 & PAGE_MASK));
    segments.push(memory, prp1, first)?;
    let mut remaining = len - first;
    if remaining == 0 {
        return Ok(());
    }
    if remaining <= PAGE_SIZE {
        // PRP2 is the second (and last) data page.
        if prp2 & PAGE_MASK != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        segments.push(memory, prp2, remaining)?;
        return Ok(());
    }
    // PRP2 points to a PRP list, which may start inside its page.
    if prp2 & QWORD_MASK != 0 {
        return Err(Status::PRP_OFFSET_INVALID);
    }
    let mut list_entry = prp2;
    while remaining > 0 {
        let last_in_list_page = (list_entry & PAGE_MASK) == PAGE_SIZE - PRP_ENTRY_BYTES;
        let entry = read_list_entry(memory, list_entry)?;
        if last_in_list_page && remaining > PAGE_SIZE {
            // More data than this entry can describe: it chains to the next list page. That
            // page must be aligned, so each list page yields data entries and the walk ends.
            if entry & PAGE_MASK != 0 {
                return Err(Status::PRP_OFFSET_INVALID);
            }
            list_entry = entry;
            continue;
        }
        if entry & PAGE_MASK != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        let chunk = remaining.min(PAGE_SIZE);
        segments.push(memory, entry, chunk)?;
        remaining -= chunk;
        list_entry += PRP_ENTRY_BYTES;
    }
    Ok(())
}

fn read_list_entry(memory: &GuestMemoryMmap, address: u64) -> Result<u64, Status> {
    memory
        .read_obj::<u64>(GuestAddress(address))
        .map(u64::from_le)
        .map_err(|_| Status::DATA_TRANSFER_ERROR)
}

struct SegmentList<'a>(&'a mut Vec<Segment>);

impl SegmentList<'_> {
    fn push(&mut self, memory: &GuestMemoryMmap, address: u64, len: u64) -> Result<(), Status> {
        let in_memory = address.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|len| {
                GuestMemoryBackend::check_range(memory, GuestAddress(address), len)
            });
        if !in_memory {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        if let Some(last) = self.0.last_mut() {
            if last.address.0 + last.len == address {
                last.len += len;
                return Ok(());
            }
        }
        self.0.push(Segment {
            address: GuestAddress(address),
            len,
        });
        Ok(())
    }
}

/// Copies `data` into the segments in order (a controller-to-host transfer).
pub fn write_to_segments(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    mut data: &[u8],
) -> Result<(), Status> {
    for segment in segments {
        let len = (segment.len as usize).min(data.len());
        memory
            .write_slice(&data[..len], segment.address)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        data = &data[len..];
    }
    Ok(())
}

/// Fills `data` from the segments in order (a host-to-controller transfer).
pub fn read_from_segments(
    memory: &GuestMemoryMmap,
    segments: &[Segment],
    mut data: &mut [u8],
) -> Result<(), Status> {
    for segment in segments {
        let len = (segment.len as usize).min(data.len());
        let (head, tail) = data.split_at_mut(len);
        memory
            .read_slice(head, segment.address)
            .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        data = tail;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMORY_BYTES: u64 = 4 << 20;
    /// A hole between two regions, to check addresses that are above RAM start but not in it.
    const HIGH_REGION: u64 = 8 << 20;
    const PAGE: u64 = PAGE_SIZE;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEMORY_BYTES as usize),
            (GuestAddress(HIGH_REGION), MEMORY_BYTES as usize),
        ])
        .unwrap()
    }

    fn seg(address: u64, len: u64) -> Segment {
        Segment {
            address: GuestAddress(address),
            len,
        }
    }

    fn write_list(memory: &GuestMemoryMmap, at: u64, entries: &[u64]) {
        for (i, entry) in entries.iter().enumerate() {
            memory
                .write_obj(entry.to_le(), GuestAddress(at + 8 * i as u64))
                .unwrap();
        }
    }

    #[test]
    fn empty_transfer_ignores_pointers() {
        assert_eq!(map_prps(&memory(), u64::MAX, u64::MAX, 0, None), Ok(vec![]));
    }

    #[test]
    fn single_page_with_offset() {
        let m = memory();
        assert_eq!(
            map_prps(&m, 0x10_0000, 0, 512, None),
            Ok(vec![seg(0x10_0000, 512)])
        );
        assert_eq!(
            map_prps(&m, 0x10_0F00, 0xDEAD_0001, 256, None),
            Ok(vec![seg(0x10_0F00, 256)]),
            "PRP2 unused when PRP1 covers the transfer"
        );
        assert_eq!(
            map_prps(&m, 0x10_0002, 0, 512, None),
            Err(Status::PRP_OFFSET_INVALID),
            "PRP1 offset must be dword aligned"
        );
    }

    #[test]
    fn two_pages_through_prp2() {
        let m = memory();
        assert_eq!(
            map_prps(&m, 0x10_0800, 0x20_0000, PAGE, None),
            Ok(vec![seg(0x10_0800, 0x800), seg(0x20_0000, 0x800)])
        );
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x10_1000, 2 * PAGE, None),
            Ok(vec![seg(0x10_0000, 2 * PAGE)]),
            "contiguous pages merge"
        );
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x20_0200, 2 * PAGE, None),
            Err(Status::PRP_OFFSET_INVALID),
            "second page must be page aligned"
        );
    }

    #[test]
    fn prp_list_in_one_page() {
        let m = memory();
        write_list(&m, 0x30_0000, &[0x20_0000, 0x22_0000, 0x24_0000]);
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0000, 4 * PAGE, None),
            Ok(vec![
                seg(0x10_0000, PAGE),
                seg(0x20_0000, PAGE),
                seg(0x22_0000, PAGE),
                seg(0x24_0000, PAGE)
            ])
        );
        // Last page partially used.
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0000, 2 * PAGE + 100, None),
            Ok(vec![
                seg(0x10_0000, PAGE),
                seg(0x20_0000, PAGE),
                seg(0x22_0000, 100)
            ])
        );
    }

    #[test]
    fn prp_list_with_offset_and_chain() {
        let m = memory();
        // The list starts 16 bytes before the end of its page: one data entry, then a chain.
        let list = 0x30_0000 + PAGE - 16;
        write_list(&m, list, &[0x20_0000, 0x31_0000]);
        write_list(&m, 0x31_0000, &[0x21_0000, 0x23_0000]);
        assert_eq!(
            map_prps(&m, 0x10_0000, list, 4 * PAGE, None),
            Ok(vec![
                seg(0x10_0000, PAGE),
                seg(0x20_0000, PAGE),
                seg(0x21_0000, PAGE),
                seg(0x23_0000, PAGE)
            ])
        );
        // Exactly enough data for the last slot: it is a data entry, not a chain.
        assert_eq!(
            map_prps(&m, 0x10_0000, list, 3 * PAGE, None),
            Ok(vec![
                seg(0x10_0000, PAGE),
                seg(0x20_0000, PAGE),
                seg(0x31_0000, PAGE)
            ])
        );
    }

    #[test]
    fn full_list_page_chains() {
        let m = memory();
        let slots = PAGE / 8;
        // 511 contiguous data pages after PRP1, then a chain to a second list page.
        let mut first: Vec<u64> = (1..slots).map(|i| i * PAGE).collect();
        first.push(0x32_0000);
        write_list(&m, 0x30_0000, &first);
        let second: Vec<u64> = (0..4).map(|i| HIGH_REGION + i * 2 * PAGE).collect();
        write_list(&m, 0x32_0000, &second);
        let len = (slots + 4) * PAGE;
        assert_eq!(
            map_prps(&m, 0, 0x30_0000, len, None),
            Ok(vec![
                seg(0, slots * PAGE),
                seg(HIGH_REGION, PAGE),
                seg(HIGH_REGION + 2 * PAGE, PAGE),
                seg(HIGH_REGION + 4 * PAGE, PAGE),
                seg(HIGH_REGION + 6 * PAGE, PAGE)
            ])
        );
    }

    #[test]
    fn misaligned_list_entries() {
        let m = memory();
        write_list(&m, 0x30_0000, &[0x20_0000, 0x21_0010]);
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0000, 3 * PAGE, None),
            Err(Status::PRP_OFFSET_INVALID)
        );
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0004, 3 * PAGE, None),
            Err(Status::PRP_OFFSET_INVALID),
            "list pointer must be qword aligned"
        );
        let list = 0x30_0000 + PAGE - 8;
        write_list(&m, list, &[0x33_0004]);
        assert_eq!(
            map_prps(&m, 0x10_0000, list, 3 * PAGE, None),
            Err(Status::PRP_OFFSET_INVALID),
            "chain pointer must be page aligned"
        );
    }

    #[test]
    fn addresses_outside_guest_memory() {
        let m = memory();
        let hole = MEMORY_BYTES + PAGE;
        assert_eq!(
            map_prps(&m, hole, 0, 512, None),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            map_prps(&m, MEMORY_BYTES - PAGE, MEMORY_BYTES, 2 * PAGE, None),
            Err(Status::DATA_TRANSFER_ERROR),
            "second page just past the end of RAM"
        );
        assert_eq!(
            map_prps(&m, 0x10_0000, hole, 2 * PAGE, None),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        assert_eq!(
            map_prps(&m, 0x10_0000, hole, 3 * PAGE, None),
            Err(Status::DATA_TRANSFER_ERROR),
            "list outside RAM"
        );
        write_list(&m, 0x30_0000, &[0x20_0000, !PAGE_MASK]);
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0000, 3 * PAGE, None),
            Err(Status::DATA_TRANSFER_ERROR),
            "entry at the top of the address space must not overflow"
        );
        assert_eq!(
            map_prps(&m, !PAGE_MASK, 0, PAGE, None),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    #[test]
    fn self_referencing_list_terminates() {
        let m = memory();
        let list = 0x30_0000 + PAGE - 8;
        // A chain back to its own slot would consume no data and loop forever.
        write_list(&m, list, &[list]);
        assert_eq!(
            map_prps(&m, 0x10_0000, list, 3 * PAGE, None),
            Err(Status::PRP_OFFSET_INVALID)
        );
        // A chain back to the start of its own page makes progress and ends with the data.
        let page: Vec<u64> = (0..PAGE / 8)
            .map(|i| {
                if i == PAGE / 8 - 1 {
                    0x30_0000
                } else {
                    0x20_0000
                }
            })
            .collect();
        write_list(&m, 0x30_0000, &page);
        let pages = 3 * (PAGE / 8);
        let segments = map_prps(&m, 0x10_0000, 0x30_0000, pages * PAGE, None).unwrap();
        assert_eq!(segments.iter().map(|s| s.len).sum::<u64>(), pages * PAGE);
    }

    #[test]
    fn transfer_limit() {
        let m = memory();
        let max = Some(2 * PAGE);
        assert!(map_prps(&m, 0x10_0000, 0x10_1000, 2 * PAGE, max).is_ok());
        assert_eq!(
            map_prps(&m, 0x10_0000, 0x30_0000, 2 * PAGE + 1, max),
            Err(Status::INVALID_FIELD)
        );
    }

    #[test]
    fn copies_follow_segments() {
        let m = memory();
        let segments = [seg(0x10_0FF0, 16), seg(0x20_0000, 32)];
        let data: Vec<u8> = (0..48).collect();
        write_to_segments(&m, &segments, &data).unwrap();
        let mut back = vec![0u8; 48];
        read_from_segments(&m, &segments, &mut back).unwrap();
        assert_eq!(back, data);
        let mut tail = [0u8; 32];
        m.read_slice(&mut tail, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(&tail[..], &data[16..]);
    }
}
