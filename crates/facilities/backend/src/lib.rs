//! The back-end facility: the right end of the I/O facility stack (the
//! paper's "back-end facility serves as a SCSI initiator to back-end storage
//! devices"). Here the back-end disks — managed disks, **mdisks** — are
//! regular files or Linux block devices, addressed by [`DiskId`] = the
//! mdisk's object id in the configuration.
//!
//! * Data moves between the disk and the [`Buffer`]'s pages with
//!   `preadv`/`pwritev`: no memory-to-memory copy.
//! * Aligned requests use an `O_DIRECT` fd (in [`CacheMode::Direct`]);
//!   unaligned ones use a second, buffered fd of the same file. Linux keeps
//!   the two coherent: a direct write writes back and invalidates the page
//!   cache over its range, a direct read writes back dirty pages first.
//! * Two execution engines ([`EngineKind`]) behind one interface; operation
//!   contexts come from a fixed slot table ([`slot`]).
//! * A failed mdisk goes offline, stays offline, and tells the IOClient.
//!
//! `docs/backend.md` has the design, the durability guarantees and the
//! engine measurements.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use sanvirt_facility::{
    AllocExtent, Buffer, ClientLink, DiskId, DiskInfo, DiskPathEvent, FrontEndDiskEvent, IoClient,
    IoError, IoFlags, IoOp, IoRequest, IoResult, IoServer, NodeId, PathState,
};

pub mod admin;
pub mod engine;
pub mod mdisk;
pub mod slot;
mod sys;

pub use admin::{ReconcileAction, ReconcileEntry};
pub use engine::{EngineKind, ENGINE_DEFAULT};
pub use mdisk::{DeviceKind, Fault, IoMode};

use engine::Engine;
use mdisk::Mdisk;
use slot::{OpKind, OpStatus, Slots};

/// Most mdisks one back end serves.
pub const MDISKS_MAX: usize = 4096;
/// Default size of the slot table (operations in flight at once).
pub const QUEUE_DEPTH_DEFAULT: usize = 256;
/// Default thread count of the thread-pool engine.
pub const POOL_THREADS_DEFAULT: usize = 8;
/// Most extents one `block_status` answer carries (the rest of the range is
/// left for the caller to ask again, as NBD allows).
pub const STATUS_EXTENTS_MAX: usize = 1024;

const _: () = assert!(QUEUE_DEPTH_DEFAULT <= slot::QUEUE_DEPTH_MAX);
const _: () = assert!(POOL_THREADS_DEFAULT <= engine::pool::POOL_THREADS_MAX);

/// How mdisks use the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheMode {
    /// `O_DIRECT` for aligned requests where the filesystem allows it.
    Direct,
    /// Everything through the page cache (what nbdkit's file plugin and
    /// qemu-nbd do by default).
    Buffered,
}

/// Construction parameters of a [`BackEnd`].
#[derive(Debug, Clone)]
pub struct BackEndConfig {
    pub engine: EngineKind,
    pub cache: CacheMode,
    /// Operations in flight at once (slot table size); more wait.
    pub queue_depth_max: usize,
    /// Worker threads of the thread-pool engine.
    pub pool_threads: usize,
    /// Try a read that the buffered fd serves inline first
    /// (`preadv2(RWF_NOWAIT)`, page-cache hits only), before handing it to
    /// the engine: no thread hop when the data is cached.
    pub inline_cached_reads: bool,
    /// Try a non-FUA write on the buffered fd inline first
    /// (`pwritev2(RWF_NOWAIT)`): no thread hop when the page cache takes it.
    pub inline_buffered_writes: bool,
    /// Write non-FUA buffered writes into the page cache on the calling
    /// thread even where the filesystem has no non-blocking buffered writes
    /// (ext4). Saves the thread hop, at the risk of stalling the caller while
    /// the kernel throttles dirty pages. Off by default.
    pub inline_blocking_writes: bool,
    /// The node this back end runs on (for disk-path events).
    pub node: NodeId,
}

impl Default for BackEndConfig {
    fn default() -> Self {
        BackEndConfig {
            engine: EngineKind::Auto,
            cache: CacheMode::Direct,
            queue_depth_max: QUEUE_DEPTH_DEFAULT,
            pool_threads: POOL_THREADS_DEFAULT,
            inline_cached_reads: true,
            inline_buffered_writes: true,
            inline_blocking_writes: false,
            node: 1,
        }
    }
}

/// Control-path errors of the back end.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("mdisk {id}: cannot open {path}: {source}")]
    Open {
        id: DiskId,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mdisk {id}: {path} is neither a regular file nor a block device")]
    NotADisk { id: DiskId, path: PathBuf },
    #[error("mdisk {id}: {path} has size 0")]
    Empty { id: DiskId, path: PathBuf },
    #[error("mdisk {id} is already open (on {path})")]
    AlreadyOpen { id: DiskId, path: PathBuf },
    #[error("mdisk {id} is not open")]
    NoSuchMdisk { id: DiskId },
    #[error("too many mdisks (at most {MDISKS_MAX})")]
    TooMany,
    #[error("invalid back-end configuration: {0}")]
    Config(&'static str),
    #[error("cannot start the I/O engine: {0}")]
    Engine(std::io::Error),
}

/// What the back end says about one mdisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MdiskStatus {
    pub id: DiskId,
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub mode: IoMode,
    pub info: DiskInfo,
    /// `None` while online.
    pub offline: Option<Arc<str>>,
}

/// Counters of the data path (relaxed atomics; for benchmarks and
/// diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Reads served inline from the page cache (`RWF_NOWAIT` hit).
    pub inline_hits: u64,
    /// Inline attempts that missed and went to the engine.
    pub inline_misses: u64,
    /// Buffered writes completed inline (`RWF_NOWAIT` accepted them whole).
    pub inline_write_hits: u64,
    /// Inline write attempts that went to the engine.
    pub inline_write_misses: u64,
    /// Operations run by the engine.
    pub engine_ops: u64,
}

#[derive(Default)]
struct Counters {
    inline_hits: std::sync::atomic::AtomicU64,
    inline_misses: std::sync::atomic::AtomicU64,
    inline_write_hits: std::sync::atomic::AtomicU64,
    inline_write_misses: std::sync::atomic::AtomicU64,
    engine_ops: std::sync::atomic::AtomicU64,
}

/// The back-end facility.
pub struct BackEnd {
    counters: Counters,
    /// Set when the filesystem answered a non-blocking buffered write with
    /// EOPNOTSUPP (ext4 does): later writes go straight to the engine.
    nowait_writes_unsupported: std::sync::atomic::AtomicBool,
    config: BackEndConfig,
    mdisks: RwLock<HashMap<DiskId, Arc<Mdisk>>>,
    /// Serialises open/close/reconcile (control path).
    control: Mutex<()>,
    slots: Arc<Slots>,
    engine: Engine,
    engine_note: Option<String>,
    client: ClientLink,
}

impl BackEnd {
    pub fn new(config: BackEndConfig) -> Result<BackEnd, BackendError> {
        if config.queue_depth_max == 0 || config.queue_depth_max > slot::QUEUE_DEPTH_MAX {
            return Err(BackendError::Config("queue_depth_max out of range"));
        }
        if config.pool_threads == 0 || config.pool_threads > engine::pool::POOL_THREADS_MAX {
            return Err(BackendError::Config("pool_threads out of range"));
        }
        let slots = Slots::new(config.queue_depth_max);
        let (engine, engine_note) =
            Engine::new(config.engine, Arc::clone(&slots), config.pool_threads)
                .map_err(BackendError::Engine)?;
        Ok(BackEnd {
            counters: Counters::default(),
            nowait_writes_unsupported: std::sync::atomic::AtomicBool::new(false),
            config,
            mdisks: RwLock::new(HashMap::new()),
            control: Mutex::new(()),
            slots,
            engine,
            engine_note,
            client: ClientLink::default(),
        })
    }

    /// The engine actually running (`Auto` resolved, fallback applied).
    pub fn engine(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Why the engine differs from the one configured (io_uring refused).
    pub fn engine_note(&self) -> Option<&str> {
        self.engine_note.as_deref()
    }

    pub fn stats(&self) -> BackendStats {
        use std::sync::atomic::Ordering::Relaxed;
        BackendStats {
            inline_hits: self.counters.inline_hits.load(Relaxed),
            inline_misses: self.counters.inline_misses.load(Relaxed),
            inline_write_hits: self.counters.inline_write_hits.load(Relaxed),
            inline_write_misses: self.counters.inline_write_misses.load(Relaxed),
            engine_ops: self.counters.engine_ops.load(Relaxed),
        }
    }

    pub fn config(&self) -> &BackEndConfig {
        &self.config
    }

    /// Opens mdisk `id` over `path` (regular file or block device) and
    /// announces it to the IOClient.
    pub fn open_mdisk(&self, id: DiskId, path: &Path) -> Result<DiskInfo, BackendError> {
        let _c = self.control.lock();
        self.open_locked(id, path)
    }

    fn open_locked(&self, id: DiskId, path: &Path) -> Result<DiskInfo, BackendError> {
        if let Some(m) = self.mdisks.read().get(&id) {
            return Err(BackendError::AlreadyOpen {
                id,
                path: m.path.clone(),
            });
        }
        if self.mdisks.read().len() >= MDISKS_MAX {
            return Err(BackendError::TooMany);
        }
        let m = Arc::new(Mdisk::open(id, path, self.config.cache)?);
        let info = m.info;
        tracing::info!(mdisk = id, path = %path.display(), mode = ?m.mode, "mdisk opened");
        self.mdisks.write().insert(id, m);
        self.client
            .front_end_disk_event(FrontEndDiskEvent::Created {
                disk: id,
                name: mdisk_name(id),
                info,
            });
        Ok(info)
    }

    /// Closes mdisk `id`. Requests already in flight finish on the old fds.
    pub fn close_mdisk(&self, id: DiskId) -> Result<(), BackendError> {
        let _c = self.control.lock();
        self.close_locked(id)
    }

    fn close_locked(&self, id: DiskId) -> Result<(), BackendError> {
        self.mdisks
            .write()
            .remove(&id)
            .ok_or(BackendError::NoSuchMdisk { id })?;
        tracing::info!(mdisk = id, "mdisk closed");
        self.client
            .front_end_disk_event(FrontEndDiskEvent::Deleted { disk: id });
        Ok(())
    }

    /// Status of every open mdisk, by id.
    pub fn mdisks(&self) -> Vec<MdiskStatus> {
        let mut v: Vec<_> = self.mdisks.read().values().map(|m| status(m)).collect();
        v.sort_by_key(|s| s.id);
        v
    }

    pub fn mdisk(&self, id: DiskId) -> Option<MdiskStatus> {
        self.mdisks.read().get(&id).map(|m| status(m))
    }

    /// Fault injection for tests (SPDK's error bdev): from now on, requests
    /// matching `fault` fail with its errno as if the device had returned it.
    /// `None` clears the fault.
    pub fn inject_fault(&self, id: DiskId, fault: Option<Fault>) -> Result<(), BackendError> {
        let m = self.get(id).ok_or(BackendError::NoSuchMdisk { id })?;
        m.inject(fault);
        Ok(())
    }

    /// Checks that every online mdisk's path still leads to the file or
    /// device that was opened (not deleted, replaced or shrunk); takes the
    /// others offline. Returns the ids taken offline.
    pub fn health_check(&self) -> Vec<DiskId> {
        let all: Vec<_> = self.mdisks.read().values().cloned().collect();
        let mut failed = Vec::new();
        for m in all {
            if m.offline_reason().is_some() {
                continue;
            }
            if let Err(why) = m.path_intact() {
                self.take_offline(&m, why.into());
                failed.push(m.id);
            }
        }
        failed
    }

    fn get(&self, id: DiskId) -> Option<Arc<Mdisk>> {
        self.mdisks.read().get(&id).cloned()
    }

    fn take_offline(&self, m: &Mdisk, reason: Arc<str>) {
        if m.set_offline(Arc::clone(&reason)) {
            tracing::error!(mdisk = m.id, %reason, "mdisk offline");
            self.client.disk_path_event(DiskPathEvent {
                disk: m.id,
                node: self.config.node,
                state: PathState::Offline { reason },
            });
        }
    }

    /// Maps a failed system call to the request's error; device-loss errors
    /// take the mdisk offline first.
    fn fail(&self, m: &Mdisk, op: IoOp, offset: u64, st: OpStatus) -> IoError {
        let (errno, text) = match st {
            OpStatus::Ok => unreachable!("fail() on success"),
            OpStatus::Errno(e) => (e, sys::errno_text(e)),
            OpStatus::Eof => (
                libc::EIO,
                "end of file inside the mdisk (file truncated?)".to_owned(),
            ),
        };
        if matches!(st, OpStatus::Eof) || matches!(errno, libc::EIO | libc::ENXIO | libc::ENODEV) {
            self.take_offline(
                m,
                format!(
                    "{op:?} at offset {offset} on {} failed: {text}",
                    m.path.display()
                )
                .into(),
            );
        }
        if errno == libc::ENOMEM {
            // No slot (or kernel memory) for it now: a resource shortage,
            // not a medium error.
            return IoError::Exhausted { disk: m.id };
        }
        IoError::medium(m.id, offset, &std::io::Error::from_raw_os_error(errno))
    }

    /// Runs one operation through a slot and the engine.
    async fn run(
        &self,
        m: &Arc<Mdisk>,
        kind: OpKind,
        fd: i32,
        offset: u64,
        len: u64,
        buf: Option<Buffer>,
    ) -> (OpStatus, Option<Buffer>) {
        bump(&self.counters.engine_ops);
        let Ok(mut g) = self.slots.acquire().await else {
            // More requests waiting for a slot than the pool queues: refuse
            // this one rather than queue without bound.
            return (OpStatus::Errno(libc::ENOMEM), buf);
        };
        let op = g.op();
        op.kind = kind;
        op.fd = fd;
        op.offset = offset;
        op.len = len;
        op.done = 0;
        op.status = OpStatus::Ok;
        op.buf = buf;
        op.mdisk = Some(Arc::clone(m));
        let f = g.start(|idx| self.engine.start(idx)).await;
        (f.status, f.buf)
    }

    async fn transfer(&self, m: &Arc<Mdisk>, req: IoRequest) -> IoResult {
        let IoRequest {
            op,
            offset,
            len,
            flags,
            buf,
            ..
        } = req;
        let mut buf = buf.expect("validated: transfers carry a buffer");
        if len == 0 {
            return Ok(Some(buf));
        }
        let fd = m.fd_for(offset, len, buf.segments());
        let kind = match op {
            IoOp::Read => {
                if self.config.inline_cached_reads && !m.is_direct(fd) {
                    if read_cached(fd, offset, len, &mut buf) == Some(len) {
                        bump(&self.counters.inline_hits);
                        return Ok(Some(buf));
                    }
                    bump(&self.counters.inline_misses);
                }
                OpKind::Read
            }
            _ => {
                // A buffered write the page cache takes without blocking
                // completes here, with no thread hop (FUA writes need the
                // engine's RWF_DSYNC, so they never take this path). A short
                // write is redone whole by the engine: the request has not
                // completed, so rewriting its own bytes is invisible.
                if self.config.inline_blocking_writes && !flags.fua && !m.is_direct(fd) {
                    if write_cached(fd, offset, len, &buf, 0) == Ok(len) {
                        bump(&self.counters.inline_write_hits);
                        return Ok(Some(buf));
                    }
                    bump(&self.counters.inline_write_misses);
                } else if self.config.inline_buffered_writes
                    && !flags.fua
                    && !m.is_direct(fd)
                    && !self
                        .nowait_writes_unsupported
                        .load(std::sync::atomic::Ordering::Relaxed)
                {
                    match write_cached(fd, offset, len, &buf, libc::RWF_NOWAIT) {
                        Ok(n) if n == len => {
                            bump(&self.counters.inline_write_hits);
                            return Ok(Some(buf));
                        }
                        Err(libc::EOPNOTSUPP) => {
                            // The filesystem (ext4, for one) has no
                            // non-blocking buffered writes: stop asking.
                            self.nowait_writes_unsupported
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    bump(&self.counters.inline_write_misses);
                }
                OpKind::Write { dsync: flags.fua }
            }
        };
        let (st, buf) = self.run(m, kind, fd, offset, len, Some(buf)).await;
        match st {
            OpStatus::Ok => Ok(buf),
            st => Err(self.fail(m, op, offset, st)),
        }
    }

    async fn flush(&self, m: &Arc<Mdisk>) -> IoResult {
        // fdatasync acts on the inode: it covers writes made through either fd.
        let (st, _) = self.run(m, OpKind::Sync, m.buffered_fd(), 0, 0, None).await;
        match st {
            OpStatus::Ok => Ok(None),
            st => Err(self.fail(m, IoOp::Flush, 0, st)),
        }
    }

    async fn unmap(&self, m: &Arc<Mdisk>, offset: u64, len: u64) -> IoResult {
        if !m.info.can_unmap {
            return Err(IoError::NotSupported {
                disk: m.id,
                op: IoOp::Unmap,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        let (kind, off, n) = match m.kind {
            DeviceKind::File => (
                OpKind::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                },
                offset,
                len,
            ),
            DeviceKind::BlockDevice => {
                // Discard is advisory here (unmap_zeroes is false): shrink
                // to whole logical blocks, which BLKDISCARD requires.
                let b = m.info.block_size_min as u64;
                let start = offset.div_ceil(b) * b;
                let end = (offset + len) / b * b;
                if end <= start {
                    return Ok(None);
                }
                (OpKind::Discard, start, end - start)
            }
        };
        let (st, _) = self.run(m, kind, m.buffered_fd(), off, n, None).await;
        match st {
            OpStatus::Ok => Ok(None),
            OpStatus::Errno(libc::EOPNOTSUPP) => Err(IoError::NotSupported {
                disk: m.id,
                op: IoOp::Unmap,
            }),
            st => Err(self.fail(m, IoOp::Unmap, offset, st)),
        }
    }

    async fn write_zeroes(
        &self,
        m: &Arc<Mdisk>,
        offset: u64,
        len: u64,
        flags: IoFlags,
    ) -> IoResult {
        if len == 0 {
            return Ok(None);
        }
        let fast = match m.kind {
            DeviceKind::File if flags.no_unmap => Some(OpKind::Fallocate {
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            }),
            DeviceKind::File if m.info.unmap_zeroes => Some(OpKind::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            }),
            DeviceKind::File => None,
            DeviceKind::BlockDevice => {
                let b = m.info.block_size_min as u64;
                if !offset.is_multiple_of(b) || !len.is_multiple_of(b) {
                    None
                } else if flags.no_unmap {
                    // On a block device ZERO_RANGE zeroes without unmapping.
                    Some(OpKind::Fallocate {
                        mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    })
                } else {
                    Some(OpKind::ZeroOut)
                }
            }
        };
        if let Some(kind) = fast {
            let (st, _) = self.run(m, kind, m.buffered_fd(), offset, len, None).await;
            match st {
                OpStatus::Ok => {
                    return if flags.fua {
                        self.flush(m).await
                    } else {
                        Ok(None)
                    };
                }
                // Not supported here: write zero pages instead.
                OpStatus::Errno(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY) => {}
                st => return Err(self.fail(m, IoOp::WriteZeroes, offset, st)),
            }
        }
        let b = m.info.block_size_min as u64;
        let fd = match m.direct_fd() {
            Some(d) if offset.is_multiple_of(b) && len.is_multiple_of(b) => d,
            _ => m.buffered_fd(),
        };
        let (st, _) = self
            .run(
                m,
                OpKind::WriteZeroPages { dsync: flags.fua },
                fd,
                offset,
                len,
                None,
            )
            .await;
        match st {
            OpStatus::Ok => Ok(None),
            st => Err(self.fail(m, IoOp::WriteZeroes, offset, st)),
        }
    }

    async fn serve(&self, req: IoRequest) -> IoResult {
        let m = self
            .get(req.disk)
            .ok_or(IoError::NoSuchDisk { disk: req.disk })?;
        if let Some(reason) = m.offline_reason() {
            return Err(IoError::Unavailable { disk: m.id, reason });
        }
        req.validate(m.info.size_bytes)?;
        if let Some(errno) = m.take_fault(req.op) {
            return Err(self.fail(&m, req.op, req.offset, OpStatus::Errno(errno)));
        }
        match req.op {
            IoOp::Read | IoOp::Write => self.transfer(&m, req).await,
            IoOp::Flush => self.flush(&m).await,
            IoOp::Unmap => self.unmap(&m, req.offset, req.len).await,
            IoOp::WriteZeroes => {
                let flags = req.flags;
                self.write_zeroes(&m, req.offset, req.len, flags).await
            }
        }
    }

    fn status_extents(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<AllocExtent>, IoError> {
        let m = self.get(disk).ok_or(IoError::NoSuchDisk { disk })?;
        if let Some(reason) = m.offline_reason() {
            return Err(IoError::Unavailable { disk, reason });
        }
        let size = m.info.size_bytes;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(IoError::OutOfRange {
                disk,
                offset,
                len,
                size,
            });
        }
        let data = |len| AllocExtent {
            len,
            hole: false,
            zero: false,
        };
        if len == 0 {
            return Ok(Vec::new());
        }
        if !m.info.reports_allocation {
            return Ok(vec![data(len)]);
        }
        // Walk SEEK_DATA / SEEK_HOLE. Metadata lookups only; done inline.
        let fd = m.buffered_fd();
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < STATUS_EXTENTS_MAX {
            let next_data = match sys::lseek(fd, pos, libc::SEEK_DATA) {
                Ok(d) => d.unwrap_or(end).min(end),
                Err(e) => return Err(self.fail(&m, IoOp::Read, pos, OpStatus::Errno(e))),
            };
            if next_data > pos {
                out.push(AllocExtent {
                    len: next_data - pos,
                    hole: true,
                    zero: true,
                });
                pos = next_data;
                continue;
            }
            let next_hole = match sys::lseek(fd, pos, libc::SEEK_HOLE) {
                Ok(h) => h.unwrap_or(end).min(end),
                Err(e) => return Err(self.fail(&m, IoOp::Read, pos, OpStatus::Errno(e))),
            };
            // A hole at `pos` would have been found by SEEK_DATA above; the
            // max() guarantees progress if the file changed in between.
            let stop = next_hole.max(pos + 1).min(end);
            out.push(data(stop - pos));
            pos = stop;
        }
        Ok(out)
    }
}

/// Gathers `(address, length)` segments into `iov`, merging neighbours that
/// are contiguous in memory. `None` if they need more than the array holds.
fn gather_iov(
    segs: impl Iterator<Item = (*mut u8, usize)>,
    iov: &mut [libc::iovec; INLINE_IOVECS_MAX],
) -> Option<usize> {
    let mut cnt = 0usize;
    for (ptr, len) in segs {
        if cnt > 0 {
            let last = &mut iov[cnt - 1];
            if (last.iov_base as usize) + last.iov_len == ptr as usize {
                last.iov_len += len;
                continue;
            }
        }
        if cnt == INLINE_IOVECS_MAX {
            return None;
        }
        iov[cnt] = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        cnt += 1;
    }
    Some(cnt)
}

const EMPTY_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

/// Tries to read `len` bytes into `buf` from the page cache without
/// blocking (`RWF_NOWAIT`). `None` if nothing could be read that way.
/// Only whole-request hits count; a partial read is redone by the engine.
fn read_cached(fd: i32, offset: u64, len: u64, buf: &mut Buffer) -> Option<u64> {
    let mut iov = [EMPTY_IOV; INLINE_IOVECS_MAX];
    let cnt = gather_iov(
        buf.segments_mut().map(|s| (s.as_mut_ptr(), s.len())),
        &mut iov,
    )?;
    match sys::preadv2(fd, &iov[..cnt], offset, libc::RWF_NOWAIT) {
        Ok(n) => Some(n as u64).filter(|&n| n <= len),
        Err(_) => None,
    }
}

/// Writes `buf` at `offset` on the calling thread with `pwritev2(flags)`
/// (`RWF_NOWAIT`: only if the page cache takes it without blocking). The
/// bytes written, or the errno.
fn write_cached(fd: i32, offset: u64, len: u64, buf: &Buffer, flags: i32) -> Result<u64, i32> {
    let mut iov = [EMPTY_IOV; INLINE_IOVECS_MAX];
    // The kernel only reads through these pointers (pwritev2).
    let cnt = gather_iov(
        buf.segments().map(|s| (s.as_ptr() as *mut u8, s.len())),
        &mut iov,
    )
    .ok_or(libc::E2BIG)?;
    let n = sys::pwritev2(fd, &iov[..cnt], offset, flags)?;
    debug_assert!(n as u64 <= len);
    Ok(n as u64)
}

/// Iovecs `read_cached` and `write_cached` build on the stack (larger
/// requests skip them).
const INLINE_IOVECS_MAX: usize = 32;

#[inline]
fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn mdisk_name(id: DiskId) -> Arc<str> {
    format!("mdisk{id}").into()
}

fn status(m: &Mdisk) -> MdiskStatus {
    MdiskStatus {
        id: m.id,
        path: m.path.clone(),
        kind: m.kind,
        mode: m.mode.clone(),
        info: m.info,
        offline: m.offline_reason(),
    }
}

impl IoServer for BackEnd {
    fn submit(&self, req: IoRequest) -> impl std::future::Future<Output = IoResult> + Send {
        self.serve(req)
    }

    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo> {
        self.mdisks.read().get(&disk).map(|m| m.info)
    }

    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        let r = self.status_extents(disk, offset, len);
        async move { r }
    }

    fn bind_client(&self, client: Weak<dyn IoClient>) {
        let _c = self.control.lock();
        self.client.bind(client);
        let all = self.mdisks();
        for s in all {
            self.client
                .front_end_disk_event(FrontEndDiskEvent::Created {
                    disk: s.id,
                    name: mdisk_name(s.id),
                    info: s.info,
                });
            if let Some(reason) = s.offline {
                self.client.disk_path_event(DiskPathEvent {
                    disk: s.id,
                    node: self.config.node,
                    state: PathState::Offline { reason },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
