//! One opened thin volume: the grain map in memory, the physical grain
//! allocator, the metadata write-back (flush), and the data path.
//!
//! # Invariants
//!
//! * **Data before map.** `map[v] = p` is set only after the write that
//!   allocated `p` (data and zero fill) has completed. A flush snapshots the
//!   dirty map pages *before* it flushes the real volume, so every mapping it
//!   writes points at data that the real volume's flush made durable first.
//! * **One unflushed slot.** A map page (and the superblock) is written only
//!   to the slot that does not hold its newest durable version, and only by
//!   the flush in progress (flushes are serialized). A torn write damages
//!   only a version that was never durable; recovery takes the other slot.
//! * **No early reuse.** A freed physical grain goes back to the allocator
//!   only after (1) a flush made the map without it durable, and (2) every
//!   request that might still be reading or writing it (one that started
//!   before the release) has finished: an epoch ("era") scheme tracks them.
//! * **One allocation per grain.** A grain being allocated is in
//!   `allocating`; other requests touching it wait for it to finish.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;
use sanvirt_facility::{
    AllocExtent, Buffer, BufferPool, DiskId, DiskInfo, IoError, IoFlags, IoOp, IoRequest, IoResult,
    IoServer,
};

use crate::format::{
    decode_map_page, encode_map_page, map_entry, Layout, MapPageHeader, SlotError, Superblock,
    MAP_ENTRIES_PER_PAGE, META_PAGE_BYTES,
};
use crate::split::{transfer, Run, RunKind};

/// Metadata pages read per request when a volume is opened (256 KiB).
pub const OPEN_READ_PAGES_MAX: u64 = 32;
/// Metadata writes (and grain unmaps) in flight at once during a flush.
pub const META_WRITES_IN_FLIGHT_MAX: usize = 64;
/// Grains examined per lock hold by unmap and write-zeroes.
pub const DISCARD_GRAINS_PER_BATCH: u64 = 4096;
/// Extents one block-status answer holds at most (the answer may be short).
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;
/// Flushes a write that found no free grain makes to reclaim freed ones.
pub const NO_SPACE_RECLAIM_TRIES: usize = 2;

const NO_SLOT: u8 = 2;

fn other_slot(slot: u8) -> u8 {
    if slot == 0 {
        1
    } else {
        0
    }
}

/// Why a volume could not be opened.
#[derive(Debug, Clone)]
pub(crate) enum OpenError {
    /// The real volume failed a request; opening may succeed later.
    Io(IoError),
    /// The metadata does not fit the configuration or is damaged; the volume
    /// stays unavailable until its configuration changes.
    Refused(String),
}

impl From<IoError> for OpenError {
    fn from(e: IoError) -> Self {
        OpenError::Io(e)
    }
}

/// Durable state of one metadata page (map page or superblock).
#[derive(Debug, Clone, Copy)]
struct PageMeta {
    /// The slot with the newest durable version, or `NO_SLOT`.
    slot: u8,
    /// Its sequence number (0 if none).
    seq: u64,
    /// Changed in memory since the last snapshot.
    dirty: bool,
    /// Snapshotted by the flush in progress, not yet durable.
    flushing: bool,
}

impl PageMeta {
    const EMPTY: PageMeta = PageMeta {
        slot: NO_SLOT,
        seq: 0,
        dirty: false,
        flushing: false,
    };

    fn next_slot(&self) -> u8 {
        if self.slot == NO_SLOT {
            0
        } else {
            other_slot(self.slot)
        }
    }
}

/// Allocation bitmap of physical grains (bit `p - 1` for grain `p`).
#[derive(Debug, Default)]
struct Grains {
    words: Vec<u64>,
    len: u64,
    used: u64,
    cursor: u64,
}

impl Grains {
    fn with_len(len: u64) -> Grains {
        Grains {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            used: 0,
            cursor: 0,
        }
    }

    fn grow(&mut self, len: u64) {
        if len > self.len {
            self.words.resize(len.div_ceil(64) as usize, 0);
            self.len = len;
        }
    }

    fn is_used(&self, p: u32) -> bool {
        let b = u64::from(p) - 1;
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, p: u32) {
        let b = u64::from(p) - 1;
        debug_assert!(!self.is_used(p));
        self.words[(b / 64) as usize] |= 1 << (b % 64);
        self.used += 1;
    }

    fn clear(&mut self, p: u32) {
        let b = u64::from(p) - 1;
        assert!(self.is_used(p), "freeing free grain {p}");
        self.words[(b / 64) as usize] &= !(1 << (b % 64));
        self.used -= 1;
    }

    fn free(&self) -> u64 {
        self.len - self.used
    }

    /// A free grain: `hint` if it is free (keeps sequential writes
    /// contiguous on the real volume), else the next free one from the
    /// cursor.
    fn take(&mut self, hint: Option<u32>) -> Option<u32> {
        if let Some(h) = hint {
            if h >= 1 && u64::from(h) <= self.len && !self.is_used(h) {
                self.set(h);
                return Some(h);
            }
        }
        if self.free() == 0 {
            return None;
        }
        let n = self.words.len();
        let start = (self.cursor / 64) as usize % n.max(1);
        for k in 0..=n {
            let w = (start + k) % n;
            let mut inv = !self.words[w];
            let valid = self.len - w as u64 * 64;
            if valid < 64 {
                inv &= (1u64 << valid) - 1;
            }
            if inv != 0 {
                let bit = w as u64 * 64 + u64::from(inv.trailing_zeros());
                let p = (bit + 1) as u32;
                self.set(p);
                self.cursor = bit + 1;
                return Some(p);
            }
        }
        unreachable!("free() > 0 but no free bit");
    }
}

/// Grace periods for freed grains (see the module invariants).
#[derive(Debug, Default)]
struct Reclaim {
    era: u64,
    /// Requests in flight that started in an era of each parity.
    active: [u64; 2],
    /// Released when every request of era `limbo_era` has finished.
    limbo: Vec<u32>,
    limbo_era: Option<u64>,
    /// Durably freed, waiting for the limbo to clear.
    queued: Vec<u32>,
}

impl Reclaim {
    fn enter(&mut self) -> u64 {
        self.active[(self.era & 1) as usize] += 1;
        self.era
    }

    fn exit(&mut self, era: u64) {
        let a = &mut self.active[(era & 1) as usize];
        *a = a.checked_sub(1).expect("era exit without enter");
    }

    /// Moves grains whose grace period is over into `grains`.
    fn progress(&mut self, grains: &mut Grains) {
        if let Some(e) = self.limbo_era {
            if self.active[(e & 1) as usize] != 0 {
                return;
            }
            for p in self.limbo.drain(..) {
                grains.clear(p);
            }
            self.limbo_era = None;
        }
        // Era E -> E+1 reuses the parity of E-1: only once it has drained.
        if !self.queued.is_empty() && self.active[((self.era + 1) & 1) as usize] == 0 {
            std::mem::swap(&mut self.limbo, &mut self.queued);
            self.limbo_era = Some(self.era);
            self.era += 1;
            self.progress(grains);
        }
    }

    fn pending(&self) -> usize {
        self.limbo.len() + self.queued.len()
    }
}

struct VolState {
    virtual_bytes: u64,
    /// Virtual grain -> physical grain (0: unallocated).
    map: Vec<u32>,
    pages: Vec<PageMeta>,
    dirty_pages: Vec<u32>,
    sb: PageMeta,
    /// The virtual size in the newest durable superblock.
    sb_virtual_bytes: u64,
    grains: Grains,
    allocating: HashSet<u32>,
    /// Physical grains freed in memory since the last snapshot.
    freed: Vec<u32>,
    reclaim: Reclaim,
    can_write_zeroes: bool,
    can_unmap: bool,
}

impl VolState {
    fn mark_dirty(&mut self, v: u32) {
        let page = (u64::from(v) / MAP_ENTRIES_PER_PAGE) as usize;
        let m = &mut self.pages[page];
        if !m.dirty {
            m.dirty = true;
            self.dirty_pages.push(page as u32);
        }
    }

    /// Whether the mappings of grains `g0..=g1` are durable.
    fn map_durable(&self, g0: u64, g1: u64) -> bool {
        let (a, b) = (g0 / MAP_ENTRIES_PER_PAGE, g1 / MAP_ENTRIES_PER_PAGE);
        (a..=b).all(|k| {
            let m = &self.pages[k as usize];
            !m.dirty && !m.flushing
        })
    }

    fn allocating_in(&self, g0: u64, g1: u64) -> bool {
        !self.allocating.is_empty()
            && (g0..=g1).any(|g| self.map[g as usize] == 0 && self.allocating.contains(&(g as u32)))
    }

    /// First physical grain if `g0..=g1` are mapped to consecutive grains.
    fn contiguous(&self, g0: u64, g1: u64) -> Option<u32> {
        let p0 = self.map[g0 as usize];
        if p0 == 0 {
            return None;
        }
        (g0 + 1..=g1)
            .all(|g| u64::from(self.map[g as usize]) == u64::from(p0) + (g - g0))
            .then_some(p0)
    }

    fn reclaimable(&self) -> usize {
        self.freed.len() + self.reclaim.pending()
    }
}

enum ReadPlan<'a> {
    Wait(tokio::sync::futures::Notified<'a>),
    Zero,
    Direct(u32, InFlight<'a>),
    Runs(Vec<Run>, InFlight<'a>),
}

enum WritePlan<'a> {
    Wait(tokio::sync::futures::Notified<'a>),
    NoSpace,
    /// Freed grains may come back with a flush.
    Reclaim,
    /// (first physical grain, mapping durable, request)
    Direct(u32, bool, InFlight<'a>),
    /// (physical grains, request holding the new ones, can write zeroes)
    Allocate(Vec<u32>, InFlight<'a>, bool),
}

/// A flush's copy of what it makes durable.
struct Snapshot {
    /// (map page, slot, seq)
    pages: Vec<(u32, u8, u64)>,
    /// `MAP_ENTRIES_PER_PAGE` entries per page of `pages`.
    entries: Vec<u32>,
    sb: Option<(u8, Superblock)>,
    freed: Vec<u32>,
}

/// An opened thin volume.
pub(crate) struct Vol {
    pub disk: DiskId,
    pub layout: Layout,
    pub format_id: u64,
    pool: Arc<BufferPool>,
    st: Mutex<VolState>,
    /// Woken when an allocation finishes.
    notify: tokio::sync::Notify,
    /// Serializes flushes (and thus metadata writes).
    flush_lock: tokio::sync::Mutex<()>,
}

/// A request in flight on the volume: holds its era, and the grains it
/// allocated until they are committed (or given back, also when the request
/// is dropped midway).
struct InFlight<'a> {
    vol: &'a Vol,
    era: u64,
    new: Vec<(u32, u32)>,
    committed: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut guard = self.vol.st.lock();
        let st = &mut *guard;
        for &(v, p) in &self.new {
            st.allocating.remove(&v);
            if self.committed {
                st.map[v as usize] = p;
                st.mark_dirty(v);
            } else {
                // The write may have reached the grain: it goes through the
                // same grace period as any freed grain.
                st.freed.push(p);
            }
        }
        st.reclaim.exit(self.era);
        st.reclaim.progress(&mut st.grains);
        drop(guard);
        if !self.new.is_empty() {
            self.vol.notify.notify_waiters();
        }
    }
}

impl Vol {
    fn enter(&self, st: &mut VolState, new: Vec<(u32, u32)>) -> InFlight<'_> {
        InFlight {
            vol: self,
            era: st.reclaim.enter(),
            new,
            committed: false,
        }
    }

    fn shift(&self) -> u32 {
        self.layout.grain_shift
    }

    pub fn virtual_bytes(&self) -> u64 {
        self.st.lock().virtual_bytes
    }

    /// Grows the virtual size (made durable by the next flush).
    pub fn set_virtual_bytes(&self, bytes: u64) -> Result<(), String> {
        let mut st = self.st.lock();
        if bytes < st.virtual_bytes {
            return Err(format!(
                "a thin volume cannot shrink ({} to {bytes} bytes)",
                st.virtual_bytes
            ));
        }
        let grains = bytes.div_ceil(1 << self.shift());
        if grains > self.layout.map_grains {
            return Err(format!(
                "the grain map was reserved for {} bytes; {bytes} needs a new volume",
                self.layout.map_grains << self.shift()
            ));
        }
        if bytes != st.virtual_bytes {
            st.map.resize(grains as usize, 0);
            st.virtual_bytes = bytes;
            st.sb.dirty = true;
        }
        Ok(())
    }

    /// The real volume changed size (only growth adds grains).
    pub fn set_real(&self, info: &DiskInfo) {
        let mut st = self.st.lock();
        st.grains.grow(self.layout.phys_grains(info.size_bytes));
        st.can_write_zeroes = info.can_write_zeroes;
        st.can_unmap = info.can_unmap;
    }

    /// (grains allocated, physical grains) for status and tests.
    pub fn usage(&self) -> (u64, u64) {
        let st = self.st.lock();
        (
            st.map.iter().filter(|&&p| p != 0).count() as u64,
            st.grains.len,
        )
    }

    /// Checks the in-memory invariants (tests): every mapped grain is
    /// allocated in the bitmap and mapped once.
    pub fn check(&self) -> Result<(), String> {
        let st = self.st.lock();
        let mut seen = HashSet::new();
        for (v, &p) in st.map.iter().enumerate() {
            if p != 0 {
                if !seen.insert(p) {
                    return Err(format!("physical grain {p} mapped twice (v {v})"));
                }
                if !st.grains.is_used(p) {
                    return Err(format!("grain {p} mapped by {v} but free"));
                }
            }
        }
        Ok(())
    }

    // ---- opening and formatting ------------------------------------------

    /// Opens the thin metadata on real volume `disk` of `real`, formatting
    /// it if it holds none for this volume.
    pub async fn open<S: IoServer>(
        server: &S,
        pool: &Arc<BufferPool>,
        disk: DiskId,
        grain_bytes: u64,
        virtual_bytes: u64,
        real: DiskInfo,
    ) -> Result<Vol, OpenError> {
        let page = META_PAGE_BYTES as u64;
        if real.size_bytes < 2 * page {
            return Err(OpenError::Refused(format!(
                "the real capacity ({} bytes) cannot hold the thin metadata",
                real.size_bytes
            )));
        }
        let sbs = read(server, pool, disk, 0, 2 * page).await?;
        let mut slots = vec![[0u8; META_PAGE_BYTES]; 2];
        sbs.copy_to_slice(0, &mut slots[0]);
        sbs.copy_to_slice(META_PAGE_BYTES, &mut slots[1]);
        drop(sbs);
        let decoded = [Superblock::decode(&slots[0]), Superblock::decode(&slots[1])];
        let ours = decoded
            .iter()
            .enumerate()
            .filter_map(|(i, d)| match d {
                Ok(sb) if sb.volume == disk => Some((i as u8, *sb)),
                _ => None,
            })
            .max_by_key(|(_, sb)| sb.seq);
        let Some((slot, sb)) = ours else {
            if decoded.iter().all(|d| *d == Err(SlotError::Damaged)) {
                return Err(OpenError::Refused(
                    "both superblock slots are damaged; refusing to format over them".into(),
                ));
            }
            return Vol::format(server, pool, disk, grain_bytes, virtual_bytes, real).await;
        };
        if sb.grain_bytes != grain_bytes {
            return Err(OpenError::Refused(format!(
                "formatted with {} KiB grains, configured with {} KiB",
                sb.grain_bytes >> 10,
                grain_bytes >> 10
            )));
        }
        if virtual_bytes < sb.virtual_bytes {
            return Err(OpenError::Refused(format!(
                "virtual size {virtual_bytes} is smaller than the formatted {} bytes",
                sb.virtual_bytes
            )));
        }
        let layout = sb.layout();
        let virtual_grains = virtual_bytes.div_ceil(grain_bytes);
        if virtual_grains > layout.map_grains {
            return Err(OpenError::Refused(format!(
                "virtual size {virtual_bytes} exceeds the reserved grain map ({} bytes)",
                layout.map_grains * grain_bytes
            )));
        }
        let phys = layout.phys_grains(real.size_bytes);
        let mut st = VolState::new(&layout, virtual_bytes, phys, &real);
        st.sb = PageMeta {
            slot,
            seq: sb.seq,
            ..PageMeta::EMPTY
        };
        st.sb_virtual_bytes = sb.virtual_bytes;
        st.sb.dirty = virtual_bytes != sb.virtual_bytes;

        // Map pages covering the virtual size, both slots, in batches.
        let pages_needed = virtual_grains.div_ceil(MAP_ENTRIES_PER_PAGE);
        let mut k = 0u64;
        let mut pair = vec![[0u8; META_PAGE_BYTES]; 2];
        while k < pages_needed {
            let n = (pages_needed - k).min(OPEN_READ_PAGES_MAX);
            let buf = read(
                server,
                pool,
                disk,
                Layout::map_page_offset(k, 0),
                2 * n * page,
            )
            .await?;
            for j in 0..n {
                let idx = k + j;
                buf.copy_to_slice(2 * j as usize * META_PAGE_BYTES, &mut pair[0]);
                buf.copy_to_slice((2 * j + 1) as usize * META_PAGE_BYTES, &mut pair[1]);
                let best = (0..2u8)
                    .filter_map(|s| {
                        decode_map_page(&pair[s as usize], idx as u32, sb.format_id).map(|h| (s, h))
                    })
                    .max_by_key(|(_, h)| h.seq);
                let Some((s, h)) = best else { continue };
                st.pages[idx as usize] = PageMeta {
                    slot: s,
                    seq: h.seq,
                    ..PageMeta::EMPTY
                };
                for i in 0..MAP_ENTRIES_PER_PAGE {
                    let p = map_entry(&pair[s as usize], i as usize);
                    if p == 0 {
                        continue;
                    }
                    let v = idx * MAP_ENTRIES_PER_PAGE + i;
                    if v >= virtual_grains {
                        return Err(OpenError::Refused(format!(
                            "map page {idx} maps virtual grain {v} beyond the virtual size"
                        )));
                    }
                    if u64::from(p) > phys {
                        return Err(OpenError::Refused(format!(
                            "virtual grain {v} maps physical grain {p} beyond the real capacity ({phys} grains)"
                        )));
                    }
                    if st.grains.is_used(p) {
                        return Err(OpenError::Refused(format!(
                            "physical grain {p} is mapped twice (second: virtual grain {v})"
                        )));
                    }
                    st.grains.set(p);
                    st.map[v as usize] = p;
                }
            }
            k += n;
        }
        tracing::info!(
            volume = disk,
            mapped = st.grains.used,
            grains = phys,
            "thin volume opened"
        );
        Ok(Vol::with_state(disk, layout, sb.format_id, pool, st))
    }

    async fn format<S: IoServer>(
        server: &S,
        pool: &Arc<BufferPool>,
        disk: DiskId,
        grain_bytes: u64,
        virtual_bytes: u64,
        real: DiskInfo,
    ) -> Result<Vol, OpenError> {
        let layout = Layout::for_format(grain_bytes, virtual_bytes);
        if layout.data_offset + grain_bytes > real.size_bytes {
            return Err(OpenError::Refused(format!(
                "the real capacity ({} bytes) cannot hold the thin metadata ({} bytes) and a grain",
                real.size_bytes, layout.data_offset
            )));
        }
        let mut sb = Superblock {
            seq: 1,
            volume: disk,
            format_id: format_id(disk),
            grain_bytes,
            virtual_bytes,
            map_grains: layout.map_grains,
            data_offset: layout.data_offset,
        };
        // Slot 0 (seq 1) then slot 1 (seq 0), each made durable before the
        // next: a crash leaves at most one damaged slot, and a formatted
        // volume always has two valid ones.
        for slot in [0u8, 1] {
            write_page(server, pool, disk, Layout::superblock_offset(slot), |p| {
                sb.encode(p)
            })
            .await?;
            server.submit(IoRequest::flush(disk)).await?;
            sb.seq = 0;
        }
        tracing::info!(
            volume = disk,
            grain_kib = grain_bytes >> 10,
            virtual_bytes,
            real_bytes = real.size_bytes,
            data_offset = layout.data_offset,
            "thin volume formatted"
        );
        let phys = layout.phys_grains(real.size_bytes);
        let mut st = VolState::new(&layout, virtual_bytes, phys, &real);
        st.sb = PageMeta {
            slot: 0,
            seq: 1,
            ..PageMeta::EMPTY
        };
        st.sb_virtual_bytes = virtual_bytes;
        Ok(Vol::with_state(disk, layout, sb.format_id, pool, st))
    }

    fn with_state(
        disk: DiskId,
        layout: Layout,
        format_id: u64,
        pool: &Arc<BufferPool>,
        st: VolState,
    ) -> Vol {
        Vol {
            disk,
            layout,
            format_id,
            pool: Arc::clone(pool),
            st: Mutex::new(st),
            notify: tokio::sync::Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
        }
    }

    // ---- data path ----------------------------------------------------------

    /// Reads: mapped grains from the real volume, unmapped ones as zeros.
    pub async fn read<S: IoServer>(&self, server: &S, req: IoRequest) -> IoResult {
        let mask = (1u64 << self.shift()) - 1;
        let (offset, len) = (req.offset, req.len);
        let mut buf = req.buf.expect("validated");
        loop {
            match self.plan_read(offset, len) {
                ReadPlan::Wait(w) => w.await,
                ReadPlan::Zero => {
                    buf.zero();
                    return Ok(Some(buf));
                }
                ReadPlan::Direct(p0, _io) => {
                    // One run on the real volume, the same buffer.
                    return server
                        .submit(IoRequest {
                            disk: self.disk,
                            op: IoOp::Read,
                            offset: self.layout.grain_offset(p0) + (offset & mask),
                            len,
                            flags: req.flags,
                            buf: Some(buf),
                        })
                        .await;
                }
                ReadPlan::Runs(runs, _io) => {
                    // Boxed, like every path below the direct one: the
                    // common request's future stays small.
                    return Box::pin(transfer(
                        server,
                        self.disk,
                        IoOp::Read,
                        req.flags,
                        offset,
                        buf,
                        &runs,
                        async { Ok(()) },
                    ))
                    .await
                    .map(Some);
                }
            }
        }
    }

    fn plan_read(&self, offset: u64, len: u64) -> ReadPlan<'_> {
        let shift = self.shift();
        let (g0, g1) = (offset >> shift, (offset + len - 1) >> shift);
        let mut st = self.st.lock();
        if st.allocating_in(g0, g1) {
            return ReadPlan::Wait(self.notify.notified());
        }
        if let Some(p0) = st.contiguous(g0, g1) {
            return ReadPlan::Direct(p0, self.enter(&mut st, Vec::new()));
        }
        if (g0..=g1).all(|g| st.map[g as usize] == 0) {
            return ReadPlan::Zero;
        }
        let runs = self.runs(&st.map, offset, len);
        ReadPlan::Runs(runs, self.enter(&mut st, Vec::new()))
    }

    /// The runs of `[offset, offset+len)`: consecutive mapped grains on
    /// consecutive physical grains form one I/O run, unmapped grains zero runs.
    fn runs(&self, map: &[u32], offset: u64, len: u64) -> Vec<Run> {
        let shift = self.shift();
        let end = offset + len;
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos >> shift;
            let g_end = ((g + 1) << shift).min(end);
            let p = map[g as usize];
            let kind = if p == 0 {
                RunKind::Zero
            } else {
                RunKind::Io {
                    real_offset: self.layout.grain_offset(p) + (pos - (g << shift)),
                }
            };
            match (runs.last_mut(), kind) {
                (Some(last), RunKind::Zero) if last.kind == RunKind::Zero => {
                    last.len += g_end - pos
                }
                (Some(last), RunKind::Io { real_offset }) if matches!(last.kind, RunKind::Io { real_offset: r } if r + last.len == real_offset) => {
                    last.len += g_end - pos
                }
                _ => runs.push(Run {
                    at: pos - offset,
                    len: g_end - pos,
                    kind,
                }),
            }
            pos = g_end;
        }
        runs
    }

    /// Writes: allocates the grains that are not mapped (all or nothing:
    /// `NoSpace` writes nothing), zero-fills what the write does not cover
    /// of a new grain, and maps the new grains once all of it completed.
    pub async fn write<S: IoServer>(&self, server: &S, req: IoRequest) -> IoResult {
        let mask = (1u64 << self.shift()) - 1;
        let (offset, len, flags) = (req.offset, req.len, req.flags);
        let buf = req.buf.expect("validated");
        let mut reclaim_tries = 0;
        loop {
            match self.plan_write(offset, len, reclaim_tries) {
                WritePlan::Wait(w) => w.await,
                WritePlan::NoSpace => return Err(IoError::NoSpace { disk: self.disk }),
                WritePlan::Reclaim => {
                    reclaim_tries += 1;
                    Box::pin(self.flush(server)).await?;
                }
                WritePlan::Direct(p0, durable, io) => {
                    // Overwrite of one run: the same buffer, no allocation.
                    let out = server
                        .submit(IoRequest {
                            disk: self.disk,
                            op: IoOp::Write,
                            offset: self.layout.grain_offset(p0) + (offset & mask),
                            len,
                            flags,
                            buf: Some(buf),
                        })
                        .await;
                    drop(io);
                    if out.is_ok() && flags.fua && !durable {
                        Box::pin(self.flush(server)).await?;
                    }
                    return out;
                }
                WritePlan::Allocate(phys, io, can_write_zeroes) => {
                    return Box::pin(self.write_allocated(
                        server,
                        phys,
                        io,
                        can_write_zeroes,
                        offset,
                        len,
                        flags,
                        buf,
                    ))
                    .await;
                }
            }
        }
    }

    fn plan_write(&self, offset: u64, len: u64, reclaim_tries: usize) -> WritePlan<'_> {
        let shift = self.shift();
        let (g0, g1) = (offset >> shift, (offset + len - 1) >> shift);
        let mut st = self.st.lock();
        if st.allocating_in(g0, g1) {
            return WritePlan::Wait(self.notify.notified());
        }
        if let Some(p0) = st.contiguous(g0, g1) {
            let durable = st.map_durable(g0, g1);
            return WritePlan::Direct(p0, durable, self.enter(&mut st, Vec::new()));
        }
        let needed = (g0..=g1).filter(|&g| st.map[g as usize] == 0).count() as u64;
        if needed <= st.grains.free() {
            let (phys, io) = self.allocate(&mut st, g0, g1);
            return WritePlan::Allocate(phys, io, st.can_write_zeroes);
        }
        if reclaim_tries >= NO_SPACE_RECLAIM_TRIES || st.reclaimable() == 0 {
            WritePlan::NoSpace
        } else {
            WritePlan::Reclaim
        }
    }

    /// Maps every grain of `g0..=g1` (the caller checked there are enough
    /// free grains): the physical grain of each, and the request in flight
    /// holding the new ones.
    fn allocate(&self, st: &mut VolState, g0: u64, g1: u64) -> (Vec<u32>, InFlight<'_>) {
        let mut phys: Vec<u32> = Vec::with_capacity((g1 - g0 + 1) as usize);
        let mut new: Vec<(u32, u32)> = Vec::new();
        let mut prev: Option<u32> = None;
        for g in g0..=g1 {
            let p = match st.map[g as usize] {
                0 => {
                    let p = st
                        .grains
                        .take(prev.map(|q| q + 1))
                        .expect("free grains counted under the lock");
                    st.allocating.insert(g as u32);
                    new.push((g as u32, p));
                    p
                }
                p => p,
            };
            phys.push(p);
            prev = Some(p);
        }
        let io = self.enter(st, new);
        (phys, io)
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_allocated<S: IoServer>(
        &self,
        server: &S,
        phys: Vec<u32>,
        mut io: InFlight<'_>,
        can_write_zeroes: bool,
        offset: u64,
        len: u64,
        flags: IoFlags,
        buf: Buffer,
    ) -> IoResult {
        let shift = self.shift();
        let grain = 1u64 << shift;
        let end = offset + len;
        let (g0, g1) = (offset >> shift, (end - 1) >> shift);
        // Runs over consecutive physical grains.
        let mut runs: Vec<Run> = Vec::new();
        for (i, &p) in phys.iter().enumerate() {
            let g = g0 + i as u64;
            let start = offset.max(g << shift);
            let stop = end.min((g + 1) << shift);
            let real_offset = self.layout.grain_offset(p) + (start - (g << shift));
            match runs.last_mut() {
                Some(last) if matches!(last.kind, RunKind::Io { real_offset: r } if r + last.len == real_offset) => {
                    last.len += stop - start
                }
                _ => runs.push(Run {
                    at: start - offset,
                    len: stop - start,
                    kind: RunKind::Io { real_offset },
                }),
            }
        }
        // What the write leaves uncovered of a new grain is zeroed, so the
        // grain never shows a previous owner's data.
        let is_new = |g: u64| io.new.iter().any(|&(v, _)| u64::from(v) == g);
        let mut fills: [Option<(u64, u64)>; 2] = [None, None];
        let head = offset - (g0 << shift);
        if head > 0 && is_new(g0) {
            fills[0] = Some((self.layout.grain_offset(phys[0]), head));
        }
        let tail = ((g1 + 1) << shift) - end;
        if tail > 0 && is_new(g1) {
            let p = phys[phys.len() - 1];
            fills[1] = Some((self.layout.grain_offset(p) + (grain - tail), tail));
        }
        let side = async {
            let zero = |(o, l): (u64, u64)| self.zero_real(server, o, l, can_write_zeroes, false);
            let (a, b) = futures::join!(
                async {
                    match fills[0] {
                        Some(f) => zero(f).await,
                        None => Ok(()),
                    }
                },
                async {
                    match fills[1] {
                        Some(f) => zero(f).await,
                        None => Ok(()),
                    }
                }
            );
            a.and(b)
        };
        let out = transfer(
            server,
            self.disk,
            IoOp::Write,
            IoFlags {
                fua: false,
                ..flags
            },
            offset,
            buf,
            &runs,
            side,
        )
        .await;
        let allocated = !io.new.is_empty();
        io.committed = out.is_ok();
        drop(io);
        let buf = out?;
        if flags.fua && (allocated || !self.st.lock().map_durable(g0, g1)) {
            self.flush(server).await?;
        } else if flags.fua {
            server.submit(IoRequest::flush(self.disk)).await?;
        }
        Ok(Some(buf))
    }

    /// Zeros `len` bytes of the real volume at `real_offset`.
    async fn zero_real<S: IoServer>(
        &self,
        server: &S,
        real_offset: u64,
        len: u64,
        can_write_zeroes: bool,
        no_unmap: bool,
    ) -> Result<(), IoError> {
        if can_write_zeroes {
            server
                .submit(IoRequest::write_zeroes(
                    self.disk,
                    real_offset,
                    len,
                    IoFlags {
                        no_unmap,
                        ..IoFlags::default()
                    },
                ))
                .await?;
        } else {
            let mut b = self
                .pool
                .alloc_wait(len as usize)
                .await
                .map_err(|_| IoError::Exhausted { disk: self.disk })?;
            b.zero();
            server
                .submit(IoRequest::write(self.disk, real_offset, b, false))
                .await?;
        }
        Ok(())
    }

    /// Unmap and write-zeroes. Whole grains are freed (write-zeroes with
    /// `no_unmap` zeroes mapped ones in place instead); parts of grains are
    /// zeroed in place if mapped. Unmapped grains already read as zeros.
    pub async fn discard<S: IoServer>(
        &self,
        server: &S,
        op: IoOp,
        offset: u64,
        len: u64,
        flags: IoFlags,
    ) -> IoResult {
        let shift = self.shift();
        let grain = 1u64 << shift;
        let end = offset + len;
        let keep = op == IoOp::WriteZeroes && flags.no_unmap;
        let mut pos = offset;
        while pos < end {
            // One batch under the lock: frees applied, zeroing collected.
            let mut zeroes: Vec<(u64, u64)> = Vec::new();
            let (io, can_write_zeroes, waiter) = {
                let mut st = self.st.lock();
                let mut waiter = None;
                let batch_end = end.min(((pos >> shift) + DISCARD_GRAINS_PER_BATCH) << shift);
                while pos < batch_end {
                    let g = pos >> shift;
                    let g_start = g << shift;
                    let stop = end.min(g_start + grain);
                    let p = st.map[g as usize];
                    if p == 0 {
                        if st.allocating.contains(&(g as u32)) {
                            waiter = Some(self.notify.notified());
                            break;
                        }
                    } else if pos == g_start && stop == g_start + grain && !keep {
                        st.map[g as usize] = 0;
                        st.mark_dirty(g as u32);
                        st.freed.push(p);
                    } else {
                        let real = self.layout.grain_offset(p) + (pos - g_start);
                        match zeroes.last_mut() {
                            Some((o, l)) if *o + *l == real => *l += stop - pos,
                            _ => zeroes.push((real, stop - pos)),
                        }
                    }
                    pos = stop;
                }
                let io = (!zeroes.is_empty()).then(|| self.enter(&mut st, Vec::new()));
                (io, st.can_write_zeroes, waiter)
            };
            for chunk in zeroes.chunks(META_WRITES_IN_FLIGHT_MAX) {
                let results = futures::future::join_all(
                    chunk
                        .iter()
                        .map(|&(o, l)| self.zero_real(server, o, l, can_write_zeroes, keep)),
                )
                .await;
                for r in results {
                    r?;
                }
            }
            drop(io);
            if let Some(w) = waiter {
                w.await;
            }
        }
        if flags.fua {
            self.flush(server).await?;
        }
        Ok(None)
    }

    /// Allocation status at grain granularity: mapped grains are data,
    /// unmapped ones holes that read as zeros. May answer short.
    pub fn block_status(&self, offset: u64, len: u64) -> Vec<AllocExtent> {
        let shift = self.shift();
        let end = offset + len;
        let st = self.st.lock();
        let mut out: Vec<AllocExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos >> shift;
            let stop = end.min((g + 1) << shift);
            let hole = st.map[g as usize] == 0;
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += stop - pos,
                _ => {
                    if out.len() == BLOCK_STATUS_EXTENTS_MAX {
                        break;
                    }
                    out.push(AllocExtent {
                        len: stop - pos,
                        hole,
                        zero: hole,
                    })
                }
            }
            pos = stop;
        }
        out
    }

    // ---- flush ------------------------------------------------------------

    /// Makes every completed write and every mapping change durable: flush
    /// the real volume (data), write the dirty map pages and superblock to
    /// their other slots, flush again (map); then the grains freed by the
    /// flushed map are unmapped on the real volume and start their grace
    /// period.
    pub async fn flush<S: IoServer>(&self, server: &S) -> Result<(), IoError> {
        let _serial = self.flush_lock.lock().await;
        let disk = self.disk;
        let snap = self.snapshot();
        let flush_real = || server.submit(IoRequest::flush(disk));
        if snap.pages.is_empty() && snap.sb.is_none() && snap.freed.is_empty() {
            flush_real().await?;
            return Ok(());
        }
        let written = async {
            flush_real().await?;
            self.write_snapshot(server, &snap).await?;
            flush_real().await?;
            Ok::<(), IoError>(())
        }
        .await;
        if let Err(e) = written {
            self.restore(snap);
            return Err(e);
        }
        let can_unmap = {
            let mut st = self.st.lock();
            for &(page, slot, seq) in &snap.pages {
                let m = &mut st.pages[page as usize];
                m.slot = slot;
                m.seq = seq;
                m.flushing = false;
            }
            if let Some((slot, sb)) = snap.sb {
                st.sb.slot = slot;
                st.sb.seq = sb.seq;
                st.sb.flushing = false;
                st.sb_virtual_bytes = sb.virtual_bytes;
            }
            st.can_unmap
        };
        // Give the freed grains' space back to the real volume (best
        // effort: the grains stay reserved until this is done).
        if can_unmap && !snap.freed.is_empty() {
            let mut sorted = snap.freed.clone();
            sorted.sort_unstable();
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for p in sorted {
                let o = self.layout.grain_offset(p);
                match ranges.last_mut() {
                    Some((s, l)) if *s + *l == o => *l += self.layout.grain_bytes(),
                    _ => ranges.push((o, self.layout.grain_bytes())),
                }
            }
            for chunk in ranges.chunks(META_WRITES_IN_FLIGHT_MAX) {
                let _ = futures::future::join_all(
                    chunk
                        .iter()
                        .map(|&(o, l)| server.submit(IoRequest::unmap(disk, o, l))),
                )
                .await;
            }
        }
        let mut st = self.st.lock();
        let st = &mut *st;
        st.reclaim.queued.extend_from_slice(&snap.freed);
        st.reclaim.progress(&mut st.grains);
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        let mut st = self.st.lock();
        let st = &mut *st;
        let mut dirty = std::mem::take(&mut st.dirty_pages);
        dirty.sort_unstable();
        let per = MAP_ENTRIES_PER_PAGE as usize;
        let mut snap = Snapshot {
            pages: Vec::with_capacity(dirty.len()),
            entries: Vec::with_capacity(dirty.len() * per),
            sb: None,
            freed: std::mem::take(&mut st.freed),
        };
        for page in dirty {
            let m = &mut st.pages[page as usize];
            m.dirty = false;
            m.flushing = true;
            snap.pages.push((page, m.next_slot(), m.seq + 1));
            let first = page as usize * per;
            let last = (first + per).min(st.map.len());
            snap.entries
                .extend_from_slice(&st.map[first.min(last)..last]);
            snap.entries.resize(snap.pages.len() * per, 0);
        }
        if st.sb.dirty {
            st.sb.dirty = false;
            st.sb.flushing = true;
            snap.sb = Some((
                st.sb.next_slot(),
                Superblock {
                    seq: st.sb.seq + 1,
                    volume: self.disk,
                    format_id: self.format_id,
                    grain_bytes: self.layout.grain_bytes(),
                    virtual_bytes: st.virtual_bytes,
                    map_grains: self.layout.map_grains,
                    data_offset: self.layout.data_offset,
                },
            ));
        }
        snap
    }

    /// A failed flush: what it snapshotted is dirty again.
    fn restore(&self, snap: Snapshot) {
        let mut st = self.st.lock();
        for &(page, _, _) in &snap.pages {
            st.pages[page as usize].flushing = false;
            if !st.pages[page as usize].dirty {
                st.pages[page as usize].dirty = true;
                st.dirty_pages.push(page);
            }
        }
        if snap.sb.is_some() {
            st.sb.flushing = false;
            st.sb.dirty = true;
        }
        st.freed.extend_from_slice(&snap.freed);
    }

    async fn write_snapshot<S: IoServer>(
        &self,
        server: &S,
        snap: &Snapshot,
    ) -> Result<(), IoError> {
        let per = MAP_ENTRIES_PER_PAGE as usize;
        let pool = &self.pool;
        let disk = self.disk;
        let format_id = self.format_id;
        for (c, chunk) in snap.pages.chunks(META_WRITES_IN_FLIGHT_MAX).enumerate() {
            let results = futures::future::join_all(chunk.iter().enumerate().map(
                |(j, &(page, slot, seq))| {
                    let i = c * META_WRITES_IN_FLIGHT_MAX + j;
                    let entries = &snap.entries[i * per..(i + 1) * per];
                    write_page(
                        server,
                        pool,
                        disk,
                        Layout::map_page_offset(u64::from(page), slot),
                        move |p| {
                            encode_map_page(
                                MapPageHeader {
                                    index: page,
                                    seq,
                                    format_id,
                                },
                                entries,
                                p,
                            )
                        },
                    )
                },
            ))
            .await;
            for r in results {
                r?;
            }
        }
        if let Some((slot, sb)) = snap.sb {
            write_page(server, pool, disk, Layout::superblock_offset(slot), |p| {
                sb.encode(p)
            })
            .await?;
        }
        Ok(())
    }
}

impl VolState {
    fn new(layout: &Layout, virtual_bytes: u64, phys: u64, real: &DiskInfo) -> VolState {
        VolState {
            virtual_bytes,
            map: vec![0; virtual_bytes.div_ceil(layout.grain_bytes()) as usize],
            pages: vec![PageMeta::EMPTY; layout.map_pages as usize],
            dirty_pages: Vec::new(),
            sb: PageMeta::EMPTY,
            sb_virtual_bytes: virtual_bytes,
            grains: Grains::with_len(phys),
            allocating: HashSet::new(),
            freed: Vec::new(),
            reclaim: Reclaim::default(),
            can_write_zeroes: real.can_write_zeroes,
            can_unmap: real.can_unmap,
        }
    }
}

/// A random format id (never 0): metadata of an earlier format is never
/// taken for this one's.
fn format_id(disk: DiskId) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(disk);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() | 1
}

/// Reads `len` bytes of metadata at `offset` into a pool buffer.
async fn read<S: IoServer>(
    server: &S,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    offset: u64,
    len: u64,
) -> Result<Buffer, IoError> {
    let buf = pool
        .alloc_wait(len as usize)
        .await
        .map_err(|_| IoError::Exhausted { disk })?;
    server
        .submit(IoRequest::read(disk, offset, buf))
        .await?
        .ok_or(IoError::Invalid {
            disk,
            reason: "server did not hand the buffer back",
        })
}

/// Writes one metadata page built by `fill` in place in a pool page.
async fn write_page<S: IoServer>(
    server: &S,
    pool: &Arc<BufferPool>,
    disk: DiskId,
    offset: u64,
    fill: impl FnOnce(&mut [u8]),
) -> Result<(), IoError> {
    let mut buf = pool
        .alloc_wait(META_PAGE_BYTES)
        .await
        .map_err(|_| IoError::Exhausted { disk })?;
    {
        let mut segs = buf.segments_mut();
        let seg = segs.next().expect("one page");
        assert_eq!(seg.len(), META_PAGE_BYTES, "a pool page is one segment");
        fill(seg);
    }
    server
        .submit(IoRequest::write(disk, offset, buf, false))
        .await?;
    Ok(())
}
