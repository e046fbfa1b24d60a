//! The fast-write cache facility (the paper's "fast-write cache I/O
//! facility"), between the front ends and the facilities that map volumes
//! onto back-end storage.
//!
//! * **Write-back**: a host write goes into pages of the cache directory
//!   (sharing the host's buffer pages: the IOB clone), and is complete when
//!   it is also in the partner node's memory ([`Mirror`]). Dirty pages are
//!   destaged to the IOServer in the background, neighbouring pages
//!   coalesced into one write.
//! * **Write-through**: a write goes to the IOServer and is complete when it
//!   completes there; the cache keeps clean data for reads only. A
//!   write-back volume runs write-through while this node has no partner to
//!   mirror with.
//! * **None**: requests pass through.
//!
//! Reads hit cached data; a read that misses goes to the IOServer and
//! dirty cached sectors are laid over what it returns. How much may be dirty
//! is bounded by **hardening rights** (docs/cache.md): a base object pool of
//! one right per page this node may hold dirty, and a per-volume bound on
//! the rights one volume holds; a write reserves rights before its pages
//! become dirty and waits when there are none, destage gives them back.
//!
//! FLUSH completes when every write completed before it is on the back end
//! and the IOServer flushed; a FUA write completes when its data are on the
//! back end with FUA. See docs/cache.md for the semantics per mode.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use sanvirt_buffer::{Buffer, BufferPool};
use sanvirt_facility::{
    AllocExtent, ClientLink, DiskId, DiskInfo, DiskPathEvent, FrontEndDiskEvent, IoClient, IoError,
    IoOp, IoRequest, IoResult, IoServer,
};
use sanvirt_objpool::{Pool, Rank};
use tokio::sync::Notify;

mod destage;
pub mod dir;
mod pair;
#[cfg(test)]
mod tests;

use dir::{Dir, Track, ALL, PAGE, SECTOR};
pub use pair::{Adopted, Forward, Forwarded, ForwardedStatus, LineLost};

/// Bounds and pacing of one node's cache.
#[derive(Debug, Clone)]
pub struct CacheLimits {
    /// Pages this node may hold dirty (its hardening rights).
    pub dirty_pages_max: usize,
    /// Pages one volume may hold dirty.
    pub volume_dirty_pages_max: usize,
    /// Clean pages kept for read hits.
    pub clean_pages_max: usize,
    /// Largest single destage write.
    pub destage_bytes_max: usize,
    /// Destage writes in flight at once.
    pub destage_in_flight_max: usize,
    /// Destaging starts at once when this many pages of the node are dirty;
    /// below it, dirty data wait up to `destage_delay` (so rewrites of the
    /// same pages and neighbours coalesce).
    pub destage_start_pages: usize,
    pub destage_delay: Duration,
}

impl Default for CacheLimits {
    fn default() -> CacheLimits {
        CacheLimits {
            dirty_pages_max: 16384,
            volume_dirty_pages_max: 8192,
            clean_pages_max: 16384,
            destage_bytes_max: 1 << 20,
            destage_in_flight_max: 64,
            destage_start_pages: 4096,
            destage_delay: Duration::from_millis(200),
        }
    }
}

impl CacheLimits {
    pub fn check(&self) -> Result<(), String> {
        if self.dirty_pages_max == 0 || self.volume_dirty_pages_max == 0 {
            return Err("dirty page limits must be at least 1".into());
        }
        if self.volume_dirty_pages_max > self.dirty_pages_max {
            return Err(format!(
                "a volume's dirty pages ({}) cannot exceed the node's ({})",
                self.volume_dirty_pages_max, self.dirty_pages_max
            ));
        }
        if self.destage_bytes_max < PAGE as usize || self.destage_in_flight_max == 0 {
            return Err("destage needs at least one write of at least a page".into());
        }
        Ok(())
    }
}

/// A volume's cache mode as configured (the configuration's
/// `VolumeCacheMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    WriteBack,
    WriteThrough,
    None,
}

/// How this node serves a volume, decided by the I/O group's cache pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This node caches and destages the volume. `mirrored`: a partner
    /// holds a copy of every dirty page, so write-back volumes complete
    /// writes from memory; otherwise they run write-through.
    Owner { mirrored: bool },
    /// Requests wait until the role changes (the pair is breaking, or the
    /// volume is moving between nodes).
    Hold,
    /// The partner node owns the volume: requests go to it through the
    /// [`Forward`] set with [`Cache::set_forward`] (the cache keeps
    /// nothing of the volume).
    Forward,
    /// This node does not serve the volume now.
    Unavailable { reason: Arc<str> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSetup {
    pub mode: CacheMode,
    pub role: Role,
    /// The cache pair's epoch the role belongs to (0 without a pair): a
    /// write whose partner copy failed completes in a later epoch only.
    pub epoch: u64,
}

impl Default for VolumeSetup {
    /// A standalone node: it owns the volume and has no partner, so
    /// write-back runs write-through.
    fn default() -> VolumeSetup {
        VolumeSetup {
            mode: CacheMode::WriteBack,
            role: Role::Owner { mirrored: false },
            epoch: 0,
        }
    }
}

/// Why the partner could not take a copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the partner node's cache is unreachable: {0}")]
pub struct MirrorError(pub Arc<str>);

/// The partner node's cache as the owner of a volume sees it: where the
/// second copy of each dirty page goes. Calls are made under the volume's
/// directory lock, so the partner sees them in the order the directory
/// changed; an implementation queues them in call order.
pub trait Mirror: Send + Sync + 'static {
    /// Puts a copy of `data`, written at `offset` of `disk`, in the
    /// partner's memory; resolves once it is there.
    fn mirror(
        &self,
        disk: DiskId,
        offset: u64,
        data: Buffer,
    ) -> Pin<Box<dyn Future<Output = Result<(), MirrorError>> + Send>>;
    /// The sectors (`(page index, sector mask)`) are on the back end: the
    /// partner may drop its copies.
    fn destaged(&self, disk: DiskId, pages: &[(u64, u8)]);
}

/// Counters of the cache's work (the admin API shows them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub read_hits: u64,
    pub read_misses: u64,
    pub writes_back: u64,
    pub writes_through: u64,
    pub destage_writes: u64,
    pub destage_bytes: u64,
    pub destage_errors: u64,
    pub dirty_pages: usize,
    pub clean_pages: usize,
}

#[derive(Default)]
struct Counters {
    read_hits: AtomicU64,
    read_misses: AtomicU64,
    writes_back: AtomicU64,
    writes_through: AtomicU64,
    destage_writes: AtomicU64,
    destage_bytes: AtomicU64,
    destage_errors: AtomicU64,
}

/// One volume the cache serves.
struct Vol {
    disk: DiskId,
    name: Mutex<Arc<str>>,
    info: Mutex<DiskInfo>,
    setup: Mutex<VolumeSetup>,
    dir: Mutex<Dir>,
    /// Destage completions, errors and role changes.
    changed: Notify,
    /// Hardening rights this volume holds (one per dirty page, plus those
    /// of writes being entered), bounded by `volume_dirty_pages_max`.
    rights: AtomicUsize,
    /// Destage everything of this volume now (flush, direct I/O waiting).
    urgent: AtomicUsize,
    /// The last destage error and how many there were.
    error: Mutex<Option<IoError>>,
    errors: AtomicU64,
    /// Requests being served by this node's cache (not forwarded); a
    /// volume changes hands once none is left.
    active: AtomicUsize,
    /// `active` reached zero.
    idle: Notify,
    /// Bumped by every change of the setup: a request that waited compares
    /// it with the value it started under to see that the volume may have
    /// changed hands.
    gen: AtomicU64,
    /// Destage of the volume stops (the pair is breaking).
    frozen: AtomicBool,
    /// A destage write counts only once the IOServer is flushed after it
    /// (see [`Cache::set_flush_destage`]).
    flush_destage: AtomicBool,
}

impl Vol {
    fn size(&self) -> u64 {
        self.info.lock().size_bytes
    }
}

struct Inner<S: IoServer> {
    server: S,
    pool: Arc<BufferPool>,
    limits: CacheLimits,
    client: ClientLink,
    vols: RwLock<HashMap<DiskId, Arc<Vol>>>,
    /// Setups given before the volume appeared.
    setups: Mutex<HashMap<DiskId, VolumeSetup>>,
    /// The node's hardening rights: one per page that may be dirty.
    rights: Pool<()>,
    mirror: RwLock<Option<Arc<dyn Mirror>>>,
    forward: RwLock<Option<Arc<dyn Forward>>>,
    wake: Arc<Notify>,
    dirty_total: AtomicUsize,
    clean_total: AtomicUsize,
    counters: Counters,
    destage_in_flight: AtomicUsize,
}

/// The cache facility over IOServer `S`. Cheap to clone (one `Arc`).
pub struct Cache<S: IoServer> {
    inner: Arc<Inner<S>>,
}

impl<S: IoServer> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// Ranks of the cache's pools (a write reserves its rights alone, so any
/// rank above the buffer pools' works).
const RIGHTS_RANK: Rank = Rank(40);

/// What a request does, from the volume's setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Complete from memory (mirrored when a partner exists).
    Back { mirrored: bool },
    /// To the back end before completion; the cache keeps clean data.
    Through,
    /// To the back end; nothing cached.
    Pass,
    /// To the owner on the partner node.
    Forward,
}

impl<S: IoServer> Cache<S> {
    /// Builds the cache over `server` and starts its destage task; must be
    /// called within a tokio runtime.
    pub fn new(server: S, pool: Arc<BufferPool>, limits: CacheLimits) -> Cache<S> {
        limits.check().expect("cache limits");
        let rights = Pool::base(
            "cache hardening rights",
            RIGHTS_RANK,
            vec![(); limits.dirty_pages_max],
        );
        let inner = Arc::new(Inner {
            server,
            pool,
            limits,
            client: ClientLink::default(),
            vols: RwLock::new(HashMap::new()),
            setups: Mutex::new(HashMap::new()),
            rights,
            mirror: RwLock::new(None),
            forward: RwLock::new(None),
            wake: Arc::new(Notify::new()),
            dirty_total: AtomicUsize::new(0),
            clean_total: AtomicUsize::new(0),
            counters: Counters::default(),
            destage_in_flight: AtomicUsize::new(0),
        });
        let weak: Weak<dyn IoClient> = Arc::downgrade(&inner) as Weak<Inner<S>>;
        inner.server.bind_client(weak);
        tokio::spawn(destage::run(Arc::downgrade(&inner)));
        Cache { inner }
    }

    /// The IOServer to the right.
    pub fn server(&self) -> &S {
        &self.inner.server
    }

    /// Where the second copy of dirty pages goes (`None`: no partner).
    pub fn set_mirror(&self, mirror: Option<Arc<dyn Mirror>>) {
        *self.inner.mirror.write() = mirror;
    }

    /// Sets how this node serves `disk` (kept for a volume that has not
    /// appeared yet). Waiting requests re-examine the new setup.
    pub fn set_volume(&self, disk: DiskId, setup: VolumeSetup) {
        let vol = self.inner.vols.read().get(&disk).cloned();
        match vol {
            Some(v) => {
                {
                    let mut s = v.setup.lock();
                    *s = setup;
                    v.gen.fetch_add(1, Ordering::SeqCst);
                    v.frozen.store(false, Ordering::SeqCst);
                }
                v.urgent.fetch_add(1, Ordering::Relaxed);
                v.changed.notify_waiters();
                self.inner.wake.notify_one();
                v.urgent.fetch_sub(1, Ordering::Relaxed);
            }
            None => {
                self.inner.setups.lock().insert(disk, setup);
            }
        }
    }

    /// Changes the cache mode of `disk`, keeping its role (a configuration
    /// change that does not move the volume).
    pub fn set_mode(&self, disk: DiskId, mode: CacheMode) {
        let vol = self.inner.vols.read().get(&disk).cloned();
        match vol {
            Some(v) => {
                v.setup.lock().mode = mode;
                v.changed.notify_waiters();
            }
            None => {
                let mut setups = self.inner.setups.lock();
                let s = setups.entry(disk).or_insert_with(|| VolumeSetup {
                    role: Role::Hold,
                    ..VolumeSetup::default()
                });
                s.mode = mode;
            }
        }
    }

    /// The setup of `disk`, if the cache serves it.
    pub fn volume(&self, disk: DiskId) -> Option<VolumeSetup> {
        let vol = self.inner.vols.read().get(&disk).cloned();
        vol.map(|v| v.setup.lock().clone())
    }

    /// Destages every dirty page of every volume (shutdown, power failing,
    /// before a volume changes hands). Returns the first destage error.
    pub async fn drain(&self) -> Result<(), IoError> {
        let vols: Vec<Arc<Vol>> = self.inner.vols.read().values().cloned().collect();
        for v in vols {
            self.inner.destage_all(&v, None).await?;
        }
        Ok(())
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            read_hits: c.read_hits.load(Ordering::Relaxed),
            read_misses: c.read_misses.load(Ordering::Relaxed),
            writes_back: c.writes_back.load(Ordering::Relaxed),
            writes_through: c.writes_through.load(Ordering::Relaxed),
            destage_writes: c.destage_writes.load(Ordering::Relaxed),
            destage_bytes: c.destage_bytes.load(Ordering::Relaxed),
            destage_errors: c.destage_errors.load(Ordering::Relaxed),
            dirty_pages: self.inner.dirty_total.load(Ordering::Relaxed),
            clean_pages: self.inner.clean_total.load(Ordering::Relaxed),
        }
    }

    /// Dirty pages of `disk` (tests, status).
    pub fn dirty_pages(&self, disk: DiskId) -> usize {
        let vol = self.inner.vols.read().get(&disk).cloned();
        vol.map_or(0, |v| v.dir.lock().dirty_pages())
    }
}

impl<S: IoServer> Inner<S> {
    fn vol(&self, disk: DiskId) -> Result<Arc<Vol>, IoError> {
        self.vols
            .read()
            .get(&disk)
            .cloned()
            .ok_or(IoError::NoSuchDisk { disk })
    }

    /// The path for a request on `vol`, waiting while the volume is held
    /// (boxed: a cold path, kept out of every request's future). A request
    /// served locally is counted in `vol.active` until its guard drops.
    async fn path<'v>(&self, vol: &'v Vol) -> Result<(Path, Active<'v>), IoError> {
        match self.path_now(vol) {
            Some(p) => p,
            None => Box::pin(self.path_wait(vol)).await,
        }
    }

    /// The path unless the volume is held.
    fn path_now<'v>(&self, vol: &'v Vol) -> Option<Result<(Path, Active<'v>), IoError>> {
        // Counted before the role is read, so whoever sets `Hold` and then
        // waits for `active` to reach zero sees this request (the setup
        // lock orders the two).
        let mut active = Active::enter(vol);
        let setup = {
            let s = vol.setup.lock();
            active.gen = vol.gen.load(Ordering::SeqCst);
            active.epoch = s.epoch;
            s.clone()
        };
        let mirrored = match setup.role {
            Role::Owner { mirrored } => mirrored,
            Role::Forward => return Some(Ok((Path::Forward, Active::none()))),
            Role::Unavailable { reason } => {
                return Some(Err(IoError::Unavailable {
                    disk: vol.disk,
                    reason,
                }))
            }
            Role::Hold => return None,
        };
        let mirrored = mirrored && self.mirror.read().is_some();
        let path = match (setup.mode, mirrored) {
            (CacheMode::None, _) => Path::Pass,
            (CacheMode::WriteBack, true) => Path::Back { mirrored: true },
            _ => Path::Through,
        };
        Some(Ok((path, active)))
    }

    async fn path_wait<'v>(&self, vol: &'v Vol) -> Result<(Path, Active<'v>), IoError> {
        loop {
            let notified = vol.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.path_now(vol) {
                return p;
            }
            notified.await;
        }
    }

    async fn submit(&self, req: IoRequest) -> IoResult {
        let vol = self.vol(req.disk)?;
        req.validate(vol.size())?;
        let (path, active) = self.path(&vol).await?;
        if path == Path::Forward {
            return Box::pin(self.reroute(&vol, req)).await;
        }
        let r = self.serve(&vol, req, path, active.gen, active.epoch).await;
        drop(active);
        match r {
            Served::Done(r) => r,
            Served::Again(req) => Box::pin(self.reroute(&vol, req)).await,
            Served::Unmirrored {
                offset,
                buf,
                gen,
                epoch,
            } => {
                Box::pin(async {
                    match self.mirror_lost(&vol, offset, buf, gen, epoch).await {
                        Served::Done(r) => r,
                        Served::Again(req) => self.reroute(&vol, req).await,
                        Served::Unmirrored { .. } => unreachable!("resolved"),
                    }
                })
                .await
            }
        }
    }

    async fn serve(
        &self,
        vol: &Arc<Vol>,
        req: IoRequest,
        path: Path,
        gen: u64,
        epoch: u64,
    ) -> Served {
        Served::Done(match req.op {
            IoOp::Read => self.read(vol, req, path != Path::Pass).await,
            IoOp::Write => {
                let aligned = req.offset.is_multiple_of(SECTOR) && req.len.is_multiple_of(SECTOR);
                let fits = pages_of(req.offset, req.len).1 - pages_of(req.offset, req.len).0
                    < self.limits.volume_dirty_pages_max as u64;
                match path {
                    Path::Back { mirrored } if aligned && fits && !req.flags.fua => {
                        self.counters.writes_back.fetch_add(1, Ordering::Relaxed);
                        return Box::pin(self.write_back(vol, req, mirrored, gen, epoch)).await;
                    }
                    _ => {
                        self.counters.writes_through.fetch_add(1, Ordering::Relaxed);
                        return self.direct(vol, req, gen).await;
                    }
                }
            }
            // Cold paths are boxed: every request's future is as large as
            // its largest path (docs/benchmarks.md).
            IoOp::Flush => {
                return Box::pin(async {
                    match self.destage_all(vol, Some(gen)).await {
                        // The volume changed hands (its destage may have
                        // been frozen): served again on its new path.
                        Ok(false) => Served::Again(req),
                        Ok(true) => Served::Done(self.server.submit(req).await),
                        Err(e) => Served::Done(Err(e)),
                    }
                })
                .await;
            }
            IoOp::Unmap | IoOp::WriteZeroes => return Box::pin(self.direct(vol, req, gen)).await,
        })
    }

    /// Waits until no page of `[first, last]` is dirty, then runs `then`
    /// under the directory lock (so no write dirties the range in between).
    /// With `gen`, gives up (`Ok(None)`) once the volume's setup changes
    /// from that generation: it may have changed hands.
    async fn wait_clean<T>(
        &self,
        vol: &Arc<Vol>,
        first: u64,
        last: u64,
        gen: Option<u64>,
        then: impl Fn(&mut Dir) -> T,
    ) -> Result<Option<T>, IoError> {
        loop {
            let notified = vol.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let errors = vol.errors.load(Ordering::Acquire);
            {
                let mut d = vol.dir.lock();
                if gen.is_some_and(|g| g != vol.gen.load(Ordering::SeqCst)) {
                    return Ok(None);
                }
                if !d.any_dirty(first, last) {
                    return Ok(Some(then(&mut d)));
                }
            }
            vol.urgent.fetch_add(1, Ordering::Relaxed);
            self.wake.notify_one();
            notified.await;
            vol.urgent.fetch_sub(1, Ordering::Relaxed);
            self.check_destage_error(vol, errors)?;
        }
    }

    /// A request that goes straight to the IOServer once no dirty page of
    /// its range is left (they would later overwrite its data on the back
    /// end); the range's clean pages are dropped afterwards. If the volume
    /// changes hands while it waits, it is handed back to be served again.
    async fn direct(&self, vol: &Arc<Vol>, req: IoRequest, gen: u64) -> Served {
        let (start, end) = (req.offset, req.offset + req.len);
        let (first, last) = pages_of(start, req.len);
        let range = (start, end);
        let enter = |d: &mut Dir| {
            d.direct.push(range);
            d.bypass_gen += 1;
        };
        let entered = {
            let mut d = vol.dir.lock();
            let clean = !d.any_dirty(first, last);
            if clean {
                enter(&mut d);
            }
            clean
        };
        if !entered {
            match Box::pin(self.wait_clean(vol, first, last, Some(gen), enter)).await {
                Ok(Some(())) => {}
                Ok(None) => return Served::Again(req),
                Err(e) => return Served::Done(Err(e)),
            }
        }
        let r = self.server.submit(req).await;
        let mut d = vol.dir.lock();
        if let Some(i) = d.direct.iter().position(|r| *r == range) {
            d.direct.swap_remove(i);
        }
        d.bypass_gen += 1;
        if end > start {
            let gone = d.invalidate_clean(first, last);
            self.clean_total.fetch_sub(gone, Ordering::Relaxed);
        }
        Served::Done(r)
    }

    /// Fails with the volume's destage error if one happened after
    /// `errors_before` were counted.
    fn check_destage_error(&self, vol: &Vol, errors_before: u64) -> Result<(), IoError> {
        if vol.errors.load(Ordering::Acquire) != errors_before {
            if let Some(e) = vol.error.lock().clone() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits until every page dirty now has been destaged. With `gen`,
    /// gives up (`Ok(false)`) once the volume's setup changes from that
    /// generation: a volume that is changing hands may have its destage
    /// frozen, and whoever froze it waits for this request to leave.
    async fn destage_all(&self, vol: &Arc<Vol>, gen: Option<u64>) -> Result<bool, IoError> {
        let snapshot: Vec<(u64, u64)> = {
            let d = vol.dir.lock();
            d.dirty.iter().map(|p| (*p, d.tracks[p].version)).collect()
        };
        if snapshot.is_empty() {
            return Ok(true);
        }
        let errors = vol.errors.load(Ordering::Acquire);
        vol.urgent.fetch_add(1, Ordering::Relaxed);
        let result = loop {
            let notified = vol.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if gen.is_some_and(|g| g != vol.gen.load(Ordering::SeqCst)) {
                break Ok(false);
            }
            let done = {
                let d = vol.dir.lock();
                snapshot.iter().all(|(p, v)| {
                    d.tracks
                        .get(p)
                        .is_none_or(|t| t.dirty == 0 || t.destaged >= *v)
                })
            };
            if done {
                break Ok(true);
            }
            if let Err(e) = self.check_destage_error(vol, errors) {
                break Err(e);
            }
            self.wake.notify_one();
            notified.await;
        };
        vol.urgent.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// A write completed from memory: its pages become dirty in the
    /// directory (sharing the host's pages where whole pages are written)
    /// and, if mirrored, copied to the partner.
    async fn write_back(
        &self,
        vol: &Arc<Vol>,
        mut req: IoRequest,
        mirrored: bool,
        gen: u64,
        epoch: u64,
    ) -> Served {
        let buf = req.buf.take().expect("validated write has a buffer");
        let (first, last) = pages_of(req.offset, req.len);
        let npages = (last - first + 1) as usize;
        if self.dirty_total.load(Ordering::Relaxed) + npages >= self.limits.destage_start_pages {
            self.wake.notify_one();
        }
        // Hardening rights first: this is where a writer waits when its
        // volume or the node holds as much dirty data as it may.
        match self.take_rights(vol, npages, gen).await {
            Ok(true) => {}
            // The volume changed hands while this write waited for rights
            // (destage may be frozen): served again on its new path.
            Ok(false) => {
                let mut req = req;
                req.buf = Some(buf);
                return Served::Again(req);
            }
            Err(e) => return Served::Done(Err(e)),
        }
        // Pieces of the host buffer, one per page, made before the lock
        // (they may fail for want of buffers, and then nothing changed).
        let pieces = match self.pieces(&buf, req.offset, first, last) {
            Ok(p) => p,
            Err(e) => {
                self.give_back_rights(vol, npages);
                return Served::Done(Err(e));
            }
        };
        let mirror = if mirrored {
            self.mirror.read().clone()
        } else {
            None
        };
        let mirror_share = match &mirror {
            Some(_) => match buf.share() {
                Ok(b) => Some(b),
                Err(_) => {
                    self.give_back_rights(vol, npages);
                    return Served::Done(Err(IoError::Exhausted { disk: vol.disk }));
                }
            },
            None => None,
        };
        let (newly_dirty, recleaned, mirrored_fut) = {
            let mut d = vol.dir.lock();
            d.version += 1;
            let v = d.version;
            let (mut newly_dirty, mut recleaned) = (0usize, 0usize);
            for (p, m, piece) in pieces {
                match d.tracks.get_mut(&p) {
                    Some(t) => {
                        if t.dirty == 0 {
                            newly_dirty += 1;
                            recleaned += 1;
                        }
                        match piece {
                            Piece::Whole(b) => t.page = b,
                            Piece::Part { at, data } => copy_into(&mut t.page, at, &data),
                        }
                        t.valid |= m;
                        t.dirty |= m;
                        t.version = v;
                    }
                    None => {
                        newly_dirty += 1;
                        let page = match piece {
                            Piece::Whole(b) => b,
                            Piece::Part { at, data } => {
                                // Allocated before the lock would be
                                // better; a failure here leaves the
                                // earlier pages of the write dirty, which
                                // is harmless (the host sees an error and
                                // rewrites).
                                let Ok(mut page) = data_page(&self.pool, vol.disk) else {
                                    drop(d);
                                    return Served::Done(Err(IoError::Exhausted {
                                        disk: vol.disk,
                                    }));
                                };
                                copy_into(&mut page, at, &data);
                                page
                            }
                        };
                        d.tracks.insert(
                            p,
                            Track {
                                page,
                                valid: m,
                                dirty: m,
                                version: v,
                                destaging: None,
                                destaged: 0,
                            },
                        );
                    }
                }
                d.dirty.insert(p);
            }
            let fut = match (&mirror, mirror_share) {
                (Some(m), Some(share)) => Some(m.mirror(vol.disk, req.offset, share)),
                _ => None,
            };
            (newly_dirty, recleaned, fut)
        };
        self.give_back_rights(vol, npages - newly_dirty);
        self.dirty_total.fetch_add(newly_dirty, Ordering::Relaxed);
        self.clean_total.fetch_sub(recleaned, Ordering::Relaxed);
        if let Some(f) = mirrored_fut {
            if let Err(e) = f.await {
                tracing::warn!(disk = vol.disk, %e, "no partner copy; the write waits for the pair to settle");
                return Served::Unmirrored {
                    offset: req.offset,
                    buf,
                    gen,
                    epoch,
                };
            }
        }
        Served::Done(Ok(Some(buf)))
    }

    /// Reserves `n` hardening rights for `vol`: first within the volume's
    /// bound, then from the node's pool. Waits (destage gives them back)
    /// when either is used up; gives up (`Ok(false)`, nothing reserved) if
    /// the volume's setup changes from generation `gen` meanwhile.
    async fn take_rights(&self, vol: &Vol, n: usize, gen: u64) -> Result<bool, IoError> {
        let quota = self.limits.volume_dirty_pages_max;
        let moved = || vol.gen.load(Ordering::SeqCst) != gen;
        loop {
            let notified = vol.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if moved() {
                return Ok(false);
            }
            let held = vol.rights.load(Ordering::Acquire);
            if held + n <= quota {
                if vol
                    .rights
                    .compare_exchange(held, held + n, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
                continue;
            }
            vol.urgent.fetch_add(1, Ordering::Relaxed);
            self.wake.notify_one();
            notified.await;
            vol.urgent.fetch_sub(1, Ordering::Relaxed);
        }
        if self.rights.try_reserve_detached(n).is_ok() {
            return Ok(true);
        }
        self.wake.notify_one();
        let gave_up = async {
            loop {
                let notified = vol.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if moved() {
                    return;
                }
                notified.await;
            }
        };
        let r = tokio::select! {
            r = self.rights.reserve_detached(n) => Some(r),
            _ = gave_up => None,
        };
        match r {
            Some(Ok(())) => Ok(true),
            None => {
                vol.rights.fetch_sub(n, Ordering::AcqRel);
                Ok(false)
            }
            Some(Err(e)) => {
                vol.rights.fetch_sub(n, Ordering::AcqRel);
                tracing::warn!(disk = vol.disk, %e, "no hardening rights");
                Err(IoError::Exhausted { disk: vol.disk })
            }
        }
    }

    pub(crate) fn give_back_rights(&self, vol: &Vol, n: usize) {
        if n > 0 {
            vol.rights.fetch_sub(n, Ordering::AcqRel);
            self.rights.unreserve_detached(n);
        }
    }

    /// Cuts a write buffer into one piece per page it touches.
    fn pieces(
        &self,
        buf: &Buffer,
        offset: u64,
        first: u64,
        last: u64,
    ) -> Result<Vec<(u64, u8, Piece)>, IoError> {
        let end = offset + buf.len() as u64;
        let mut out = Vec::with_capacity((last - first + 1) as usize);
        for p in first..=last {
            let a = (p * PAGE).max(offset);
            let b = ((p + 1) * PAGE).min(end);
            let pos = (a - offset) as usize;
            let m = dir::mask(a - p * PAGE, b - p * PAGE);
            let piece = if m == ALL {
                Piece::Whole(
                    buf.slice(pos, PAGE as usize)
                        .map_err(|_| IoError::Exhausted { disk: 0 })?,
                )
            } else {
                let mut data = vec![0u8; (b - a) as usize];
                buf.copy_to_slice(pos, &mut data);
                Piece::Part {
                    at: (a - p * PAGE) as usize,
                    data,
                }
            };
            out.push((p, m, piece));
        }
        Ok(out)
    }

    /// A read: from the directory when every sector is cached, otherwise
    /// from the IOServer with the dirty sectors laid over. `populate`: keep
    /// what was read for later hits.
    async fn read(&self, vol: &Arc<Vol>, mut req: IoRequest, populate: bool) -> IoResult {
        let mut buf = req.buf.take().expect("validated read has a buffer");
        let (off, len) = (req.offset, req.len);
        if len == 0 {
            return Ok(Some(buf));
        }
        let (first, last) = pages_of(off, len);
        let aligned = off.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR);
        let (bypass_gen, overlay) = {
            let d = vol.dir.lock();
            if aligned && self.try_hit(&d, &mut buf, off, first, last) {
                self.counters.read_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(buf));
            }
            let mut overlay = Vec::new();
            for p in d.dirty.range(first..=last) {
                let t = &d.tracks[p];
                let share = t
                    .page
                    .share()
                    .map_err(|_| IoError::Exhausted { disk: vol.disk })?;
                overlay.push((*p, t.dirty, share));
            }
            (d.bypass_gen, overlay)
        };
        self.counters.read_misses.fetch_add(1, Ordering::Relaxed);
        let mut buf = self
            .server
            .submit(IoRequest::read(vol.disk, off, buf))
            .await?
            .expect("a read hands its buffer back");
        // Dirty sectors are newer than the back end.
        let end = off + len;
        for (p, dirty, page) in &overlay {
            for (s, e) in dir::runs(*dirty) {
                let a = (p * PAGE + s as u64 * SECTOR).max(off);
                let b = (p * PAGE + e as u64 * SECTOR).min(end);
                if a < b {
                    let mut tmp = [0u8; PAGE as usize];
                    let n = (b - a) as usize;
                    page.copy_to_slice((a - p * PAGE) as usize, &mut tmp[..n]);
                    buf.copy_from_slice((a - off) as usize, &tmp[..n]);
                }
            }
        }
        if populate && self.limits.clean_pages_max > 0 {
            self.populate(vol, &buf, off, bypass_gen);
        }
        Ok(Some(buf))
    }

    /// Serves a read from the directory if every sector is valid. The reply
    /// shares the cached pages (the paper's IOB clone: no copy; a later
    /// write into a shared page copies it first), or, where they cannot be
    /// shared (a page not aligned on its own, pages of different accounts,
    /// no page to reserve for the copy-on-write), is copied from them.
    fn try_hit(&self, d: &Dir, buf: &mut Buffer, off: u64, first: u64, last: u64) -> bool {
        let end = off + buf.len() as u64;
        let span = |p: u64| {
            (
                (p * PAGE).max(off) - p * PAGE,
                ((p + 1) * PAGE).min(end) - p * PAGE,
            )
        };
        let mut shared: Option<Buffer> = None;
        let mut sharing = true;
        for p in first..=last {
            let (a, b) = span(p);
            let m = dir::mask(a, b);
            let t = match d.tracks.get(&p) {
                Some(t) if t.valid & m == m => t,
                _ => return false,
            };
            if !sharing {
                continue;
            }
            let part = (t.page.len() == PAGE as usize)
                .then(|| t.page.slice(a as usize, (b - a) as usize).ok())
                .flatten();
            sharing = match (part, shared.as_mut()) {
                (Some(part), None) => {
                    shared = Some(part);
                    true
                }
                (Some(part), Some(s)) => s.same_account(&part) && s.append(part).is_ok(),
                (None, _) => false,
            };
        }
        if sharing {
            if let Some(s) = shared {
                *buf = s;
                return true;
            }
        }
        let mut tmp = [0u8; PAGE as usize];
        for p in first..=last {
            let (a, b) = span(p);
            let n = (b - a) as usize;
            d.tracks[&p].page.copy_to_slice(a as usize, &mut tmp[..n]);
            buf.copy_from_slice((p * PAGE + a - off) as usize, &tmp[..n]);
        }
        true
    }

    /// Keeps the whole pages of a read's result as clean tracks, unless a
    /// write bypassed the cache meanwhile.
    fn populate(&self, vol: &Vol, buf: &Buffer, off: u64, bypass_gen: u64) {
        let end = off + buf.len() as u64;
        let first = off.div_ceil(PAGE);
        let end_page = end / PAGE;
        if first >= end_page {
            return;
        }
        let mut d = vol.dir.lock();
        if d.bypass_gen != bypass_gen {
            return;
        }
        let mut added = 0;
        for p in first..end_page {
            if d.tracks.contains_key(&p) {
                continue;
            }
            let Ok(page) = buf.slice((p * PAGE - off) as usize, PAGE as usize) else {
                break;
            };
            let v = d.version;
            d.tracks.insert(
                p,
                Track {
                    page,
                    valid: ALL,
                    dirty: 0,
                    version: v,
                    destaging: None,
                    destaged: v,
                },
            );
            d.clean_fifo.push_back((p, v));
            added += 1;
        }
        let clean = self.clean_total.fetch_add(added, Ordering::Relaxed) + added;
        if clean > self.limits.clean_pages_max {
            let mine = d.clean_pages();
            let keep = mine.saturating_sub(clean - self.limits.clean_pages_max);
            let gone = d.evict_clean(mine, keep);
            self.clean_total.fetch_sub(gone, Ordering::Relaxed);
        }
    }
}

/// How a request served on this node ended.
enum Served {
    Done(IoResult),
    /// Serve it again: the volume changed hands meanwhile.
    Again(IoRequest),
    /// A write-back write whose partner copy failed ([`Inner::mirror_lost`]).
    Unmirrored {
        offset: u64,
        buf: Buffer,
        gen: u64,
        epoch: u64,
    },
}

/// Counts a request in its volume's `active` while it is served locally;
/// `gen` is the volume's setup generation it was admitted under.
struct Active<'v> {
    vol: Option<&'v Vol>,
    gen: u64,
    epoch: u64,
}

impl<'v> Active<'v> {
    fn enter(vol: &'v Vol) -> Active<'v> {
        vol.active.fetch_add(1, Ordering::SeqCst);
        Active {
            vol: Some(vol),
            gen: 0,
            epoch: 0,
        }
    }

    fn none() -> Active<'v> {
        Active {
            vol: None,
            gen: 0,
            epoch: 0,
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(v) = self.vol {
            if v.active.fetch_sub(1, Ordering::SeqCst) == 1 {
                v.idle.notify_waiters();
            }
        }
    }
}

enum Piece {
    /// A whole page of the host's buffer, shared.
    Whole(Buffer),
    /// Part of a page: bytes to copy in at `at`.
    Part { at: usize, data: Vec<u8> },
}

fn copy_into(page: &mut Buffer, at: usize, data: &[u8]) {
    page.copy_from_slice(at, data);
}

fn data_page(pool: &Arc<BufferPool>, disk: DiskId) -> Result<Buffer, IoError> {
    let mut b = pool
        .alloc(PAGE as usize)
        .map_err(|_| IoError::Exhausted { disk })?;
    b.zero();
    Ok(b)
}

/// First and last page index of `[off, off + len)` (`len` 0: the page of
/// `off`).
fn pages_of(off: u64, len: u64) -> (u64, u64) {
    (off / PAGE, (off + len.max(1) - 1) / PAGE)
}

impl<S: IoServer> IoClient for Inner<S> {
    fn disk_path_event(&self, event: DiskPathEvent) {
        self.client.disk_path_event(event);
    }

    fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        match &event {
            FrontEndDiskEvent::Created { disk, name, info } => {
                let setup = self.setups.lock().remove(disk).unwrap_or_default();
                let vol = Arc::new(Vol {
                    disk: *disk,
                    name: Mutex::new(Arc::clone(name)),
                    info: Mutex::new(*info),
                    setup: Mutex::new(setup),
                    dir: Mutex::new(Dir::default()),
                    changed: Notify::new(),
                    rights: AtomicUsize::new(0),
                    urgent: AtomicUsize::new(0),
                    error: Mutex::new(None),
                    errors: AtomicU64::new(0),
                    active: AtomicUsize::new(0),
                    idle: Notify::new(),
                    gen: AtomicU64::new(0),
                    frozen: AtomicBool::new(false),
                    flush_destage: AtomicBool::new(false),
                });
                self.vols.write().insert(*disk, vol);
            }
            FrontEndDiskEvent::Deleted { disk } => {
                if let Some(v) = self.vols.write().remove(disk) {
                    let d = v.dir.lock();
                    self.dirty_total
                        .fetch_sub(d.dirty_pages(), Ordering::Relaxed);
                    self.clean_total
                        .fetch_sub(d.clean_pages(), Ordering::Relaxed);
                    self.give_back_rights(&v, d.dirty_pages());
                    v.changed.notify_waiters();
                }
            }
            FrontEndDiskEvent::Resized { disk, info } => {
                if let Some(v) = self.vols.read().get(disk) {
                    *v.info.lock() = *info;
                    // Pages beyond a shrunk end are gone from the volume.
                    let mut d = v.dir.lock();
                    let keep_below = info.size_bytes.div_ceil(PAGE);
                    let beyond: Vec<u64> = d
                        .tracks
                        .keys()
                        .filter(|p| **p >= keep_below)
                        .copied()
                        .collect();
                    for p in beyond {
                        let t = d.tracks.remove(&p).expect("listed");
                        if t.dirty != 0 {
                            d.dirty.remove(&p);
                            self.dirty_total.fetch_sub(1, Ordering::Relaxed);
                            self.give_back_rights(v, 1);
                        } else {
                            self.clean_total.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            FrontEndDiskEvent::Renamed { disk, name } => {
                if let Some(v) = self.vols.read().get(disk) {
                    *v.name.lock() = Arc::clone(name);
                }
            }
        }
        self.client.front_end_disk_event(event);
    }
}

impl<S: IoServer> Inner<S> {
    /// Block status of a range. Allocation is decided below the cache:
    /// dirty pages of the range are destaged first, or a hole (reading as
    /// zeros) could be reported where a completed write is still only in
    /// memory. `from_partner`: asked by the partner node, so never
    /// forwarded back (see `IoFlags::from_partner`).
    async fn block_status(
        self: Arc<Self>,
        disk: DiskId,
        offset: u64,
        len: u64,
        from_partner: bool,
    ) -> Result<Vec<AllocExtent>, IoError> {
        let vol = self.vol(disk)?;
        if let Some(r) = self
            .forwarded_block_status(&vol, offset, len, from_partner)
            .await
        {
            return r;
        }
        if len > 0 && offset.checked_add(len).is_some_and(|e| e <= vol.size()) {
            let (first, last) = pages_of(offset, len);
            self.wait_clean(&vol, first, last, None, |_| ()).await?;
        }
        self.server.block_status(disk, offset, len).await
    }
}

/// The node's own cache as the cache line serves the partner with it.
pub trait PartnerServe: IoServer {
    /// Block status asked by the partner node: [`IoError::NotOwner`] when
    /// this node does not own the volume now (never forwarded back; the
    /// partner asks again).
    fn partner_block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send;
}

impl<S: IoServer> PartnerServe for Cache<S> {
    fn partner_block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        Arc::clone(&self.inner).block_status(disk, offset, len, true)
    }
}

impl<S: IoServer> IoServer for Cache<S> {
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send {
        self.inner.submit(req)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        let vol = self.inner.vols.read().get(&disk).cloned();
        vol.map(|v| *v.info.lock())
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        Arc::clone(&self.inner).block_status(disk, offset, len, false)
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        self.inner.client.bind(client);
        let vols: Vec<Arc<Vol>> = self.inner.vols.read().values().cloned().collect();
        for v in vols {
            self.inner
                .client
                .front_end_disk_event(FrontEndDiskEvent::Created {
                    disk: v.disk,
                    name: v.name.lock().clone(),
                    info: *v.info.lock(),
                });
        }
    }
}
