//! Mapping a byte range of a volume onto its mdisks. Pure and allocation
//! free, so the data path can use it per request and tests can check it
//! exhaustively.

use sanvirt_config::PhysExtent;
use sanvirt_facility::DiskId;

/// A contiguous part of a volume range that lives contiguously on one mdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Byte offset on the volume.
    pub volume_offset: u64,
    pub len: u64,
    pub mdisk: DiskId,
    /// Byte offset on the mdisk.
    pub mdisk_offset: u64,
}

/// The pieces of `[offset, offset+len)` of a volume whose extent `i` lives at
/// `extents[i]` and whose extents are `1 << extent_shift` bytes, in volume
/// order. Extents that follow each other on the same mdisk (sequential and
/// image-mode volumes, mostly) merge into one piece.
///
/// The caller has checked the range against the volume size, and the extent
/// map covers the volume (`extents.len() << extent_shift >= size`).
pub fn pieces(extents: &[PhysExtent], extent_shift: u32, offset: u64, len: u64) -> Pieces<'_> {
    Pieces {
        extents,
        shift: extent_shift,
        pos: offset,
        end: offset + len,
    }
}

/// Iterator returned by [`pieces`].
#[derive(Debug, Clone)]
pub struct Pieces<'a> {
    extents: &'a [PhysExtent],
    shift: u32,
    pos: u64,
    end: u64,
}

impl Iterator for Pieces<'_> {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.pos >= self.end {
            return None;
        }
        let i = (self.pos >> self.shift) as usize;
        let first = self.extents[i];
        let within = self.pos & ((1u64 << self.shift) - 1);
        let mut next = i + 1;
        // End of the contiguous run: grow while the next extent follows on
        // the same mdisk and the range goes on.
        let mut run_end = (next as u64) << self.shift;
        while run_end < self.end {
            match self.extents.get(next) {
                Some(e) if e.mdisk == first.mdisk && e.index == first.index + (next - i) as u64 => {
                    next += 1;
                    run_end = (next as u64) << self.shift;
                }
                _ => break,
            }
        }
        let piece_end = run_end.min(self.end);
        let piece = Piece {
            volume_offset: self.pos,
            len: piece_end - self.pos,
            mdisk: first.mdisk,
            mdisk_offset: (first.index << self.shift) + within,
        };
        self.pos = piece_end;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map_byte(extents: &[PhysExtent], shift: u32, off: u64) -> (DiskId, u64) {
        let e = extents[(off >> shift) as usize];
        (e.mdisk, (e.index << shift) + (off & ((1 << shift) - 1)))
    }

    fn layout() -> impl Strategy<Value = (Vec<PhysExtent>, u32)> {
        (
            proptest::collection::vec((0..3u64, 0..6u64, any::<bool>()), 1..24),
            12..=20u32,
        )
            .prop_map(|(raw, shift)| {
                // Some extents continue the previous one on its mdisk, as in
                // sequential volumes, so merging is exercised.
                let mut v: Vec<PhysExtent> = Vec::new();
                for (m, idx, follow) in raw {
                    let e = match v.last() {
                        Some(p) if follow => PhysExtent {
                            mdisk: p.mdisk,
                            index: p.index + 1,
                        },
                        _ => PhysExtent {
                            mdisk: 10 + m,
                            index: idx * 7,
                        },
                    };
                    v.push(e);
                }
                (v, shift)
            })
    }

    proptest! {
        #[test]
        fn pieces_tile_the_range_on_the_right_mdisk_offsets(
            (extents, shift) in layout(),
            a in any::<u64>(),
            b in any::<u64>(),
        ) {
            let size = (extents.len() as u64) << shift;
            let start = a % size;
            let len = b % (size - start + 1);
            let ps: Vec<Piece> = pieces(&extents, shift, start, len).collect();
            let mut at = start;
            for (k, p) in ps.iter().enumerate() {
                prop_assert_eq!(p.volume_offset, at, "pieces are contiguous");
                prop_assert!(p.len > 0);
                // Every extent boundary inside the piece, and its ends, map
                // onto the mdisk exactly where the piece says.
                let last = p.volume_offset + p.len - 1;
                let mut probes = vec![p.volume_offset, last];
                let mut bnd = ((p.volume_offset >> shift) + 1) << shift;
                while bnd <= last {
                    probes.push(bnd - 1);
                    probes.push(bnd);
                    bnd += 1 << shift;
                }
                for off in probes {
                    prop_assert_eq!(
                        map_byte(&extents, shift, off),
                        (p.mdisk, p.mdisk_offset + (off - p.volume_offset))
                    );
                }
                // Merging is maximal: the next piece does not continue this one.
                if let Some(n) = ps.get(k + 1) {
                    prop_assert!(
                        n.mdisk != p.mdisk || n.mdisk_offset != p.mdisk_offset + p.len
                    );
                }
                at += p.len;
            }
            prop_assert_eq!(at, start + len, "pieces cover the range");
        }
    }

    #[test]
    fn striped_and_sequential_examples() {
        let striped = [
            PhysExtent { mdisk: 1, index: 0 },
            PhysExtent { mdisk: 2, index: 0 },
            PhysExtent { mdisk: 1, index: 1 },
        ];
        let ps: Vec<_> = pieces(&striped, 20, (1 << 20) - 512, (1 << 20) + 1024).collect();
        assert_eq!(
            ps,
            vec![
                Piece {
                    volume_offset: (1 << 20) - 512,
                    len: 512,
                    mdisk: 1,
                    mdisk_offset: (1 << 20) - 512
                },
                Piece {
                    volume_offset: 1 << 20,
                    len: 1 << 20,
                    mdisk: 2,
                    mdisk_offset: 0
                },
                Piece {
                    volume_offset: 2 << 20,
                    len: 512,
                    mdisk: 1,
                    mdisk_offset: 1 << 20
                },
            ]
        );
        let seq = [
            PhysExtent { mdisk: 1, index: 4 },
            PhysExtent { mdisk: 1, index: 5 },
            PhysExtent { mdisk: 3, index: 0 },
        ];
        let ps: Vec<_> = pieces(&seq, 20, 4096, 3 << 20 >> 1).collect();
        assert_eq!(ps.len(), 1, "two extents in a row on mdisk 1 merge");
        assert_eq!(ps[0].mdisk_offset, (4 << 20) + 4096);
        assert_eq!(pieces(&seq, 20, 0, 0).count(), 0);
    }
}
