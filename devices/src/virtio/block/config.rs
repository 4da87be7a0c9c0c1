//! The virtio-blk device configuration structure (virtio 1.2, 5.2.4), laid out as the driver
//! reads it: little-endian fields at fixed offsets.

/// Bytes of `struct virtio_blk_config` up to and including `unused1`: the fields of the
/// features this device may offer (no SECURE_ERASE, no ZONED).
pub const CONFIG_SPACE_BYTES: usize = 60;

const CAPACITY: usize = 0;
const SIZE_MAX: usize = 8;
const SEG_MAX: usize = 12;
// geometry (16..20) stays zero: GEOMETRY is not offered.
const BLK_SIZE: usize = 20;
// topology (24..32) stays zero: TOPOLOGY is not offered.
const WRITEBACK: usize = 32;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS: usize = 36;
const MAX_DISCARD_SEG: usize = 40;
const DISCARD_SECTOR_ALIGNMENT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS: usize = 48;
const MAX_WRITE_ZEROES_SEG: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// Values of the configuration structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockConfigSpace {
    /// In 512-byte sectors, whatever `blk_size` says.
    pub capacity_sectors: u64,
    /// Largest segment the driver should send (SIZE_MAX).
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    /// Meaningful only with CONFIG_WCE, which is not offered.
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl BlockConfigSpace {
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_BYTES] {
        let mut bytes = [0u8; CONFIG_SPACE_BYTES];
        let mut put = |offset: usize, field: &[u8]| {
            bytes[offset..offset + field.len()].copy_from_slice(field);
        };
        put(CAPACITY, &self.capacity_sectors.to_le_bytes());
        put(SIZE_MAX, &self.size_max.to_le_bytes());
        put(SEG_MAX, &self.seg_max.to_le_bytes());
        put(BLK_SIZE, &self.blk_size.to_le_bytes());
        put(WRITEBACK, &[self.writeback]);
        put(NUM_QUEUES, &self.num_queues.to_le_bytes());
        put(MAX_DISCARD_SECTORS, &self.max_discard_sectors.to_le_bytes());
        put(MAX_DISCARD_SEG, &self.max_discard_seg.to_le_bytes());
        put(
            DISCARD_SECTOR_ALIGNMENT,
            &self.discard_sector_alignment.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SECTORS,
            &self.max_write_zeroes_sectors.to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SEG,
            &self.max_write_zeroes_seg.to_le_bytes(),
        );
        put(
            WRITE_ZEROES_MAY_UNMAP,
            &[u8::from(self.write_zeroes_may_unmap)],
        );
        bytes
    }
}

/// Copies `data.len()` bytes of `config` from `offset`; bytes past the end read as zero.
pub fn read_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec() {
        let space = BlockConfigSpace {
            capacity_sectors: 0x0102_0304_0506_0708,
            size_max: 0x10_0000,
            seg_max: 126,
            blk_size: 512,
            writeback: 0,
            num_queues: 4,
            max_discard_sectors: 0x1111,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 0x2222,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
        };
        let bytes = space.to_bytes();
        let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(bytes[0..8], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(le32(8), 0x10_0000);
        assert_eq!(le32(12), 126);
        assert_eq!(le32(16), 0, "geometry");
        assert_eq!(le32(20), 512);
        assert_eq!(bytes[24..33], [0; 9], "topology and writeback");
        assert_eq!(u16::from_le_bytes([bytes[34], bytes[35]]), 4);
        assert_eq!(le32(36), 0x1111);
        assert_eq!(le32(40), 1);
        assert_eq!(le32(44), 8);
        assert_eq!(le32(48), 0x2222);
        assert_eq!(le32(52), 1);
        assert_eq!(bytes[56], 1);

        let mut window = [0xffu8; 4];
        read_bytes(&bytes, 58, &mut window);
        assert_eq!(window, [0; 4], "past the end reads as zero");
        read_bytes(&bytes, u64::MAX, &mut window);
        assert_eq!(window, [0; 4]);
    }
}
