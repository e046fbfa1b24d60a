//! The on-disk format of a thin volume's metadata inside its real volume
//! (`docs/on-disk-formats.md`, section "Thin volumes"). Pure encoding and
//! decoding, so every byte can be tested without I/O.
//!
//! Layout of the real volume, in 4 KiB metadata pages:
//!
//! | page | content |
//! |---|---|
//! | 0, 1 | superblock, slot 0 and slot 1 |
//! | 2 + 2k, 3 + 2k | map page k, slot 0 and slot 1 |
//! | from `data_offset` | data grains 1, 2, 3, … (grain-aligned) |
//!
//! Every metadata page lives in two slots. An update goes to the slot that
//! does not hold the newest durable version, with the next sequence number;
//! recovery takes the valid slot with the higher sequence number. A torn
//! write therefore damages only a version that was never made durable.

use sanvirt_facility::DiskId;

/// Size of one metadata page (and of one slot).
pub const META_PAGE_BYTES: usize = 4096;
/// Superblock magic.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"SVTHINSB";
/// Map page magic.
pub const MAP_MAGIC: [u8; 8] = *b"SVTHINMP";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first map entry of a map page.
pub const MAP_HEADER_BYTES: usize = 32;
/// Map entries (u32 each) per map page.
pub const MAP_ENTRIES_PER_PAGE: u64 = ((META_PAGE_BYTES - MAP_HEADER_BYTES) / 4) as u64;
/// Smallest and largest grain.
pub const GRAIN_BYTES_MIN: u64 = 32 << 10;
pub const GRAIN_BYTES_MAX: u64 = 256 << 10;
/// The map is reserved at format time for this many times the virtual size,
/// so the virtual size can grow that far without moving data grains.
pub const MAP_GROWTH_FACTOR: u64 = 4;
/// Largest virtual size the map is ever reserved for (256 TiB, the
/// configuration's largest volume).
pub const VIRTUAL_BYTES_MAX: u64 = 256 << 40;
/// Physical grain numbers are u32 and 0 means "unallocated".
pub const PHYS_GRAINS_MAX: u64 = u32::MAX as u64 - 1;

const _: () = assert!(MAP_ENTRIES_PER_PAGE == 1016);
const _: () = assert!(GRAIN_BYTES_MIN.is_power_of_two() && GRAIN_BYTES_MAX.is_power_of_two());
const _: () = assert!(GRAIN_BYTES_MIN.is_multiple_of(META_PAGE_BYTES as u64));

/// CRC32C of a page with its CRC field (bytes 8..12) left out.
fn page_crc(page: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&page[0..8]), &page[12..META_PAGE_BYTES])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The superblock (page 0, two slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Slot sequence number (higher wins).
    pub seq: u64,
    /// The volume this metadata belongs to (volume ids are never reused, so
    /// metadata left on extents by a deleted volume is never adopted).
    pub volume: DiskId,
    /// Random at format time; every map page carries it.
    pub format_id: u64,
    pub grain_bytes: u64,
    /// The virtual size last made durable (it only grows).
    pub virtual_bytes: u64,
    /// Virtual grains the reserved map can describe.
    pub map_grains: u64,
    /// Byte offset of data grain 1 on the real volume.
    pub data_offset: u64,
}

/// Why a slot does not hold a usable superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// No magic: never written (or not ours).
    Empty,
    /// Magic present, CRC wrong: torn or damaged.
    Damaged,
    /// Good CRC, but a version or geometry this code does not accept.
    Unsupported(&'static str),
}

impl Superblock {
    pub fn encode(&self, page: &mut [u8]) {
        assert_eq!(page.len(), META_PAGE_BYTES);
        page.fill(0);
        page[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        page[12..16].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        page[16..24].copy_from_slice(&self.seq.to_le_bytes());
        page[24..32].copy_from_slice(&self.volume.to_le_bytes());
        page[32..40].copy_from_slice(&self.format_id.to_le_bytes());
        page[40..44].copy_from_slice(&((self.grain_bytes >> 10) as u32).to_le_bytes());
        page[48..56].copy_from_slice(&self.virtual_bytes.to_le_bytes());
        page[56..64].copy_from_slice(&self.map_grains.to_le_bytes());
        page[64..72].copy_from_slice(&self.data_offset.to_le_bytes());
        let crc = page_crc(page);
        page[8..12].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(page: &[u8]) -> Result<Superblock, SlotError> {
        assert_eq!(page.len(), META_PAGE_BYTES);
        if page[0..8] != SUPERBLOCK_MAGIC {
            return Err(SlotError::Empty);
        }
        if u32_at(page, 8) != page_crc(page) {
            return Err(SlotError::Damaged);
        }
        if u32_at(page, 12) != FORMAT_VERSION {
            return Err(SlotError::Unsupported("unknown format version"));
        }
        let sb = Superblock {
            seq: u64_at(page, 16),
            volume: u64_at(page, 24),
            format_id: u64_at(page, 32),
            grain_bytes: u64::from(u32_at(page, 40)) << 10,
            virtual_bytes: u64_at(page, 48),
            map_grains: u64_at(page, 56),
            data_offset: u64_at(page, 64),
        };
        if !(GRAIN_BYTES_MIN..=GRAIN_BYTES_MAX).contains(&sb.grain_bytes)
            || !sb.grain_bytes.is_power_of_two()
        {
            return Err(SlotError::Unsupported("grain size out of range"));
        }
        let layout = Layout::new(sb.grain_bytes, sb.map_grains);
        if sb.virtual_bytes.div_ceil(sb.grain_bytes) > sb.map_grains
            || sb.map_grains > VIRTUAL_BYTES_MAX / GRAIN_BYTES_MIN
            || layout.data_offset != sb.data_offset
        {
            return Err(SlotError::Unsupported("inconsistent geometry"));
        }
        Ok(sb)
    }

    pub fn layout(&self) -> Layout {
        Layout::new(self.grain_bytes, self.map_grains)
    }
}

/// The header of a valid map page slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapPageHeader {
    pub index: u32,
    pub seq: u64,
    pub format_id: u64,
}

/// Encodes map page `index` holding `entries` (at most
/// [`MAP_ENTRIES_PER_PAGE`]; the rest of the page is unallocated).
pub fn encode_map_page(header: MapPageHeader, entries: &[u32], page: &mut [u8]) {
    assert_eq!(page.len(), META_PAGE_BYTES);
    assert!(entries.len() as u64 <= MAP_ENTRIES_PER_PAGE);
    page.fill(0);
    page[0..8].copy_from_slice(&MAP_MAGIC);
    page[12..16].copy_from_slice(&header.index.to_le_bytes());
    page[16..24].copy_from_slice(&header.seq.to_le_bytes());
    page[24..32].copy_from_slice(&header.format_id.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = MAP_HEADER_BYTES + 4 * i;
        page[at..at + 4].copy_from_slice(&e.to_le_bytes());
    }
    let crc = page_crc(page);
    page[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// The header of a map page slot if it is a valid slot of page `index` of
/// the format `format_id` (magic, CRC, index and format all match).
pub fn decode_map_page(page: &[u8], index: u32, format_id: u64) -> Option<MapPageHeader> {
    assert_eq!(page.len(), META_PAGE_BYTES);
    if page[0..8] != MAP_MAGIC || u32_at(page, 8) != page_crc(page) {
        return None;
    }
    let h = MapPageHeader {
        index: u32_at(page, 12),
        seq: u64_at(page, 16),
        format_id: u64_at(page, 24),
    };
    (h.index == index && h.format_id == format_id).then_some(h)
}

/// Entry `i` of a map page (checked by [`decode_map_page`] first).
pub fn map_entry(page: &[u8], i: usize) -> u32 {
    u32_at(page, MAP_HEADER_BYTES + 4 * i)
}

/// Where things are on the real volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub grain_shift: u32,
    pub map_grains: u64,
    pub map_pages: u64,
    pub data_offset: u64,
}

impl Layout {
    pub fn new(grain_bytes: u64, map_grains: u64) -> Layout {
        let map_pages = map_grains.div_ceil(MAP_ENTRIES_PER_PAGE);
        let meta_bytes = (2 + 2 * map_pages) * META_PAGE_BYTES as u64;
        Layout {
            grain_shift: grain_bytes.trailing_zeros(),
            map_grains,
            map_pages,
            data_offset: meta_bytes.next_multiple_of(grain_bytes.max(1)),
        }
    }

    /// The layout a new format of a volume of `virtual_bytes` gets.
    pub fn for_format(grain_bytes: u64, virtual_bytes: u64) -> Layout {
        let reserve = virtual_bytes
            .saturating_mul(MAP_GROWTH_FACTOR)
            .min(VIRTUAL_BYTES_MAX)
            .max(virtual_bytes);
        Layout::new(grain_bytes, reserve.div_ceil(grain_bytes))
    }

    pub fn grain_bytes(&self) -> u64 {
        1 << self.grain_shift
    }

    /// Byte offset of superblock slot `slot`.
    pub fn superblock_offset(slot: u8) -> u64 {
        u64::from(slot) * META_PAGE_BYTES as u64
    }

    /// Byte offset of slot `slot` of map page `page`.
    pub fn map_page_offset(page: u64, slot: u8) -> u64 {
        (2 + 2 * page + u64::from(slot)) * META_PAGE_BYTES as u64
    }

    /// Byte offset of physical grain `p` (1-based).
    pub fn grain_offset(&self, p: u32) -> u64 {
        debug_assert!(p > 0);
        self.data_offset + (u64::from(p - 1) << self.grain_shift)
    }

    /// Physical grains a real volume of `real_bytes` holds.
    pub fn phys_grains(&self, real_bytes: u64) -> u64 {
        (real_bytes.saturating_sub(self.data_offset) >> self.grain_shift).min(PHYS_GRAINS_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        let l = Layout::for_format(64 << 10, 10 << 20);
        Superblock {
            seq: 7,
            volume: 42,
            format_id: 0x1122_3344_5566_7788,
            grain_bytes: 64 << 10,
            virtual_bytes: 10 << 20,
            map_grains: l.map_grains,
            data_offset: l.data_offset,
        }
    }

    #[test]
    fn superblock_round_trip_and_bytes() {
        let s = sb();
        let mut page = vec![0u8; META_PAGE_BYTES];
        s.encode(&mut page);
        assert_eq!(Superblock::decode(&page), Ok(s));
        assert_eq!(&page[0..8], b"SVTHINSB");
        assert_eq!(&page[12..16], &[1, 0, 0, 0]);
        assert_eq!(&page[40..44], &64u32.to_le_bytes());
        // 10 MiB × 4 / 64 KiB = 640 grains: one map page; metadata 4 pages
        // (16 KiB) rounded up to a grain.
        assert_eq!(s.map_grains, 640);
        assert_eq!(s.data_offset, 64 << 10);
        assert!(page[72..].iter().all(|&b| b == 0));
    }

    #[test]
    fn superblock_damage_is_detected() {
        let mut page = vec![0u8; META_PAGE_BYTES];
        assert_eq!(Superblock::decode(&page), Err(SlotError::Empty));
        sb().encode(&mut page);
        for byte in [0usize, 9, 13, 20, 50, 4095] {
            let mut p = page.clone();
            p[byte] ^= 0x10;
            assert!(Superblock::decode(&p).is_err(), "flip at {byte}");
        }
        // A torn write: only the first sector new.
        let mut torn = vec![0u8; META_PAGE_BYTES];
        torn[..512].copy_from_slice(&page[..512]);
        torn[600] = 1;
        assert_eq!(Superblock::decode(&torn), Err(SlotError::Damaged));
    }

    #[test]
    fn map_page_round_trip_and_checks() {
        let h = MapPageHeader {
            index: 3,
            seq: 9,
            format_id: 77,
        };
        let entries: Vec<u32> = (0..MAP_ENTRIES_PER_PAGE as u32).map(|i| i * 3).collect();
        let mut page = vec![0u8; META_PAGE_BYTES];
        encode_map_page(h, &entries, &mut page);
        assert_eq!(decode_map_page(&page, 3, 77), Some(h));
        assert_eq!(decode_map_page(&page, 4, 77), None, "misdirected");
        assert_eq!(decode_map_page(&page, 3, 78), None, "other format");
        for (i, &e) in entries.iter().enumerate() {
            assert_eq!(map_entry(&page, i), e);
        }
        page[4000] ^= 1;
        assert_eq!(decode_map_page(&page, 3, 77), None);
    }

    #[test]
    fn layout_offsets() {
        let l = Layout::new(32 << 10, 3000);
        assert_eq!(l.map_pages, 3);
        assert_eq!(l.data_offset, 32 << 10);
        assert_eq!(Layout::map_page_offset(0, 0), 8192);
        assert_eq!(Layout::map_page_offset(2, 1), 7 * 4096);
        assert_eq!(l.grain_offset(1), 32 << 10);
        assert_eq!(l.grain_offset(3), 96 << 10);
        assert_eq!(l.phys_grains((32 << 10) * 5 + 100), 4);
        assert_eq!(l.phys_grains(1000), 0);
    }
}
