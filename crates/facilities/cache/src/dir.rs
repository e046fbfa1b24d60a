//! The cache directory of one volume: which 4 KiB pages of the volume the
//! cache holds, which of their 512-byte sectors are valid and which are
//! dirty (newer than the back end).

use std::collections::{BTreeSet, VecDeque};

use rustc_hash::FxHashMap;

use sanvirt_buffer::{Buffer, PAGE_SIZE};

/// Validity and dirtiness are kept per sector of this size.
pub const SECTOR: u64 = 512;
pub const SECTORS_PER_PAGE: u32 = (PAGE_SIZE as u64 / SECTOR) as u32;
/// Every sector of a page.
pub const ALL: u8 = u8::MAX;
pub const PAGE: u64 = PAGE_SIZE as u64;

const _: () = assert!(SECTORS_PER_PAGE == 8, "sector masks are u8");

/// One cached page of a volume.
pub struct Track {
    /// `PAGE_SIZE` bytes: the page's data where `valid` says so. Often
    /// shared with the host's write buffer (the paper's IOB clone).
    pub page: Buffer,
    pub valid: u8,
    pub dirty: u8,
    /// The volume's write counter when a write last went into the track.
    pub version: u64,
    /// The version a destage in flight is writing.
    pub destaging: Option<u64>,
    /// The version of the last completed destage.
    pub destaged: u64,
}

/// Sector mask of the byte range `[a, b)` within one page (both multiples of
/// [`SECTOR`]).
pub fn mask(a: u64, b: u64) -> u8 {
    debug_assert!(a < b && b <= PAGE && a.is_multiple_of(SECTOR) && b.is_multiple_of(SECTOR));
    let (s, e) = ((a / SECTOR) as u32, (b / SECTOR) as u32);
    (((1u16 << e) - (1u16 << s)) & 0xFF) as u8
}

/// Maximal runs of set bits of `m`, as sector ranges `[start, end)`.
pub fn runs(m: u8) -> impl Iterator<Item = (u32, u32)> {
    let mut s = 0u32;
    std::iter::from_fn(move || {
        while s < SECTORS_PER_PAGE && m & (1 << s) == 0 {
            s += 1;
        }
        if s >= SECTORS_PER_PAGE {
            return None;
        }
        let start = s;
        while s < SECTORS_PER_PAGE && m & (1 << s) != 0 {
            s += 1;
        }
        Some((start, s))
    })
}

/// The per-volume part of the cache under one lock.
#[derive(Default)]
pub struct Dir {
    /// Tracks by page index. A hash map, not an ordered map: a read hit
    /// looks up every page of the read, and with a large cache the levels
    /// of a B-tree were one cache miss each (with 256k tracks, the hit path
    /// was 12.9% of the server's samples at 40k reads/s, three quarters of
    /// it in the tree search; 6.5% with this map). Ordered walks use `dirty`.
    pub tracks: FxHashMap<u64, Track>,
    /// Pages with dirty sectors, ascending (destage coalesces neighbours).
    pub dirty: BTreeSet<u64>,
    /// Bumped by every write (the versions of tracks come from it).
    pub version: u64,
    /// Bumped by every write that bypasses the directory, so a read miss
    /// that started before it does not populate the cache with older data.
    pub bypass_gen: u64,
    /// Byte ranges being written straight to the back end; destage leaves
    /// overlapping pages alone until they complete.
    pub direct: Vec<(u64, u64)>,
    /// Clean pages in the order they became clean or were read (eviction).
    pub clean_fifo: VecDeque<(u64, u64)>,
}

impl Dir {
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    pub fn overlaps_direct(&self, start: u64, end: u64) -> bool {
        self.direct.iter().any(|&(a, b)| a < end && start < b)
    }

    /// Any dirty sector in pages `[first, last]`.
    pub fn any_dirty(&self, first: u64, last: u64) -> bool {
        self.dirty.range(first..=last).next().is_some()
    }

    /// Drops clean tracks of pages `[first, last]` (their data may be stale
    /// after a write that bypassed the cache).
    pub fn invalidate_clean(&mut self, first: u64, last: u64) -> usize {
        let stale = |t: &Track| t.dirty == 0 && t.destaging.is_none();
        // Probe the range's pages, or walk the map when it has fewer
        // entries than the range has pages (an unmap of a whole volume).
        // No allocation: this runs for every write that bypasses the cache.
        if last.saturating_sub(first) < self.tracks.len() as u64 {
            let mut gone = 0;
            for p in first..=last {
                if self.tracks.get(&p).is_some_and(stale) {
                    self.tracks.remove(&p);
                    gone += 1;
                }
            }
            gone
        } else {
            let before = self.tracks.len();
            self.tracks
                .retain(|p, t| !((first..=last).contains(p) && stale(t)));
            before - self.tracks.len()
        }
    }

    /// Evicts clean tracks, oldest first, until at most `keep` clean tracks
    /// remain or none can go. Returns how many went.
    pub fn evict_clean(&mut self, clean_now: usize, keep: usize) -> usize {
        let mut gone = 0;
        while clean_now - gone > keep {
            let Some((p, version)) = self.clean_fifo.pop_front() else {
                break;
            };
            let evictable = self
                .tracks
                .get(&p)
                .is_some_and(|t| t.version == version && t.dirty == 0 && t.destaging.is_none());
            if evictable {
                self.tracks.remove(&p);
                gone += 1;
            }
        }
        gone
    }

    pub fn clean_pages(&self) -> usize {
        self.tracks.len() - self.dirty.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_runs() {
        assert_eq!(mask(0, PAGE), ALL);
        assert_eq!(mask(0, 512), 1);
        assert_eq!(mask(3584, 4096), 0x80);
        assert_eq!(mask(1024, 2048), 0b1100);
        assert_eq!(runs(0).count(), 0);
        assert_eq!(runs(ALL).collect::<Vec<_>>(), [(0, 8)]);
        assert_eq!(
            runs(0b1010_0110).collect::<Vec<_>>(),
            [(1, 3), (5, 6), (7, 8)]
        );
    }

    /// Both ways `invalidate_clean` finds the range's tracks (probing each
    /// page of a short range, walking the map for a long one) drop exactly
    /// the clean, idle tracks inside the range.
    #[test]
    fn invalidate_clean_drops_only_clean_idle_tracks_in_range() {
        let pool = sanvirt_buffer::BufferPool::new(64, 64);
        let build = || {
            let mut d = Dir::default();
            for p in 0..20u64 {
                let dirty = if p % 5 == 0 { ALL } else { 0 };
                let destaging = (p % 7 == 0).then_some(1);
                let page = pool.alloc(PAGE_SIZE).unwrap();
                d.tracks.insert(
                    p * 3,
                    Track {
                        page,
                        valid: ALL,
                        dirty,
                        version: 1,
                        destaging,
                        destaged: 0,
                    },
                );
                if dirty != 0 {
                    d.dirty.insert(p * 3);
                }
            }
            d
        };
        let expect = |d: &Dir, first: u64, last: u64| -> Vec<u64> {
            let mut v: Vec<u64> = d
                .tracks
                .iter()
                .filter(|(p, t)| {
                    (first..=last).contains(*p) && t.dirty == 0 && t.destaging.is_none()
                })
                .map(|(p, _)| *p)
                .collect();
            v.sort();
            v
        };
        // Short range (probed), long range (walked), empty and inverted.
        for (first, last) in [(4, 20), (0, u64::MAX), (9, 9), (10, 9), (30, 1 << 40)] {
            let mut d = build();
            let gone = expect(&d, first, last);
            assert_eq!(
                d.invalidate_clean(first, last),
                gone.len(),
                "{first}..={last}"
            );
            for p in &gone {
                assert!(!d.tracks.contains_key(p));
            }
            assert_eq!(d.tracks.len(), 20 - gone.len());
        }
    }
}
