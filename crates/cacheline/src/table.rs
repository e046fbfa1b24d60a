//! The mirror table: this node's copies of the partner's dirty pages, per
//! volume and page, with the sectors each copy holds. Filled by `Copy`
//! messages, emptied by `Destaged`; taken whole when this node wins a break
//! ([`sanvirt_cache::Cache::adopt`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use sanvirt_buffer::{Buffer, BufferPool};
use sanvirt_cache::dir::{mask, PAGE, SECTOR};
use sanvirt_cache::Adopted;
use sanvirt_facility::DiskId;

struct Copy {
    mask: u8,
    page: Buffer,
}

/// Why a copy could not be kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("copy at {offset}+{len} is not sector-aligned")]
    Unaligned { offset: u64, len: usize },
    #[error("no buffer for a copy")]
    NoBuffer,
}

pub struct MirrorTable {
    pool: Arc<BufferPool>,
    disks: HashMap<DiskId, BTreeMap<u64, Copy>>,
    pages: usize,
}

impl MirrorTable {
    pub fn new(pool: Arc<BufferPool>) -> MirrorTable {
        MirrorTable {
            pool,
            disks: HashMap::new(),
            pages: 0,
        }
    }

    /// Pages held.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Pages held for `disk`.
    pub fn pages_of(&self, disk: DiskId) -> usize {
        self.disks.get(&disk).map_or(0, |d| d.len())
    }

    /// Keeps a copy of `data`, written at `offset` of `disk`. All or
    /// nothing: on an error the table is unchanged.
    pub fn copy(&mut self, disk: DiskId, offset: u64, data: &[u8]) -> Result<(), TableError> {
        let len = data.len();
        if !offset.is_multiple_of(SECTOR) || !(len as u64).is_multiple_of(SECTOR) {
            return Err(TableError::Unaligned { offset, len });
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset + len as u64;
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        // Buffers for pages not held yet, before anything changes.
        let table = self.disks.entry(disk).or_default();
        let mut fresh = Vec::new();
        for p in first..=last {
            if !table.contains_key(&p) {
                match self.pool.alloc(PAGE as usize) {
                    Ok(mut b) => {
                        b.zero();
                        fresh.push((p, b));
                    }
                    Err(_) => {
                        if table.is_empty() {
                            self.disks.remove(&disk);
                        }
                        return Err(TableError::NoBuffer);
                    }
                }
            }
        }
        for (p, b) in fresh {
            table.insert(p, Copy { mask: 0, page: b });
            self.pages += 1;
        }
        for p in first..=last {
            let a = (p * PAGE).max(offset);
            let b = ((p + 1) * PAGE).min(end);
            let c = table.get_mut(&p).expect("inserted above");
            let at = (a - p * PAGE) as usize;
            let from = (a - offset) as usize;
            c.page
                .copy_from_slice(at, &data[from..from + (b - a) as usize]);
            c.mask |= mask(a - p * PAGE, b - p * PAGE);
        }
        Ok(())
    }

    /// The owner destaged these pages (they became clean there): drops
    /// the copies.
    pub fn destaged(&mut self, disk: DiskId, pages: &[(u64, u8)]) {
        if let Some(table) = self.disks.get_mut(&disk) {
            for (p, _) in pages {
                if table.remove(p).is_some() {
                    self.pages -= 1;
                }
            }
            if table.is_empty() {
                self.disks.remove(&disk);
            }
        }
    }

    /// Takes every copy of `disk` (this node won a break and owns it now).
    pub fn take(&mut self, disk: DiskId) -> Vec<Adopted> {
        let table = self.disks.remove(&disk).unwrap_or_default();
        self.pages -= table.len();
        table
            .into_iter()
            .map(|(page, c)| Adopted {
                page,
                mask: c.mask,
                data: c.page,
            })
            .collect()
    }

    /// Volumes with copies.
    pub fn disks(&self) -> Vec<DiskId> {
        self.disks.keys().copied().collect()
    }

    /// Drops everything (this node lost a break, or the pair rejoined).
    pub fn clear(&mut self) {
        self.disks.clear();
        self.pages = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_merge_by_sector_and_destage_drops_them() {
        let mut t = MirrorTable::new(BufferPool::new(64, 4096));
        t.copy(1, 4096 + 512, &[7; 1024]).unwrap();
        t.copy(1, 4096 + 1024, &[8; 4096]).unwrap();
        assert_eq!(t.pages(), 2);
        assert!(t.copy(1, 100, &[0; 512]).is_err());
        assert_eq!(t.pages(), 2);
        let got = t.take(1);
        assert_eq!(t.pages(), 0);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].page, 1);
        assert_eq!(got[0].mask, 0b1111_1110);
        let mut page = vec![0u8; 4096];
        got[0].data.copy_to_slice(0, &mut page);
        assert!(page[..512].iter().all(|b| *b == 0));
        assert!(page[512..1024].iter().all(|b| *b == 7));
        assert!(page[1024..].iter().all(|b| *b == 8));
        assert_eq!(got[1].page, 2);
        assert_eq!(got[1].mask, 0b0000_0011);
        t.copy(2, 0, &[1; 8192]).unwrap();
        t.destaged(2, &[(0, 0xFF), (5, 0xFF)]);
        assert_eq!(t.pages_of(2), 1);
        t.clear();
        assert_eq!(t.pages(), 0);
    }
}
