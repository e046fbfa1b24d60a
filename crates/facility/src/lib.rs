//! The I/O facility stack API (the paper's section "The I/O facility stack").
//!
//! Every I/O facility has the same interface to its neighbours and does not
//! know their types:
//!
//! * to its right, its **IOServer**: it submits [`IoRequest`]s with
//!   [`IoServer::submit`] and gets the completion back from the returned future;
//! * to its left, its **IOClient**: it sends [`DiskPathEvent`]s (a disk
//!   becoming available or unavailable) and [`FrontEndDiskEvent`]s (a
//!   front-end disk created, deleted, resized) through [`IoClient`].
//!
//! Facilities are bound into the stack **at compile time**: each facility is
//! generic over its IOServer (`Virtualization<S: IoServer>`), so the daemon's
//! stack is one concrete type such as `Nbd<Virtualization<BackEnd>>` and a
//! request crosses every layer with static dispatch, no boxing and no
//! allocation. Events travel left through `Weak<dyn IoClient>` links: they are
//! control-path traffic.
//!
//! # Ownership of buffers
//!
//! A request owns its [`Buffer`]. The submitter gives the buffer up when it
//! calls `submit` and gets it back in the completion (`Ok(Some(buf))`); on an
//! error the buffer is dropped and its pages return to their pool. A server
//! must not keep any part of a buffer after completing a request, unless it
//! took a share of it ([`Buffer::share`]), which counts as its own reference.
//!
//! For a read the submitter supplies a buffer of exactly `len` bytes and the
//! server fills it. For a write the buffer holds the `len` bytes to write.

use std::future::Future;
use std::sync::{Arc, Weak};

pub use sanvirt_buffer::{Buffer, BufferError, BufferPool, PAGE_SIZE};

pub mod conformance;
pub mod fanout;
pub mod scaffold;
pub mod slab;

/// Identifies a disk at one interface of the stack: a front-end disk (volume)
/// between the front ends and the virtualization facility, a back-end disk
/// (managed disk) between the virtualization and back-end facilities.
pub type DiskId = u64;

/// A node of the cluster. A single-node engine is node 1.
pub type NodeId = u64;

/// Largest transfer one request may carry (32 MiB, as NBD's usual maximum).
pub const REQUEST_BYTES_MAX: u64 = 32 << 20;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    /// Make every completed write to the disk durable.
    Flush,
    /// The range is no longer needed; later reads return zeros if the disk
    /// reports [`DiskInfo::unmap_zeroes`], otherwise unspecified data.
    Unmap,
    /// The range reads back as zeros afterwards.
    WriteZeroes,
}

/// Modifiers of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoFlags {
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// For `WriteZeroes`: keep the range allocated (do not punch a hole).
    pub no_unmap: bool,
    /// Forwarded by the partner node's cache to this node, the volume's
    /// owner as the partner saw it. A cache that does not own the volume
    /// (any more) refuses it with [`IoError::NotOwner`] instead of forwarding
    /// it back: while the two nodes' roles change, a request bouncing
    /// between them would hold a forwarding credit on each side per hop and
    /// could take them all (docs/cache.md, "Forwarding").
    pub from_partner: bool,
}

/// One request travelling right through the stack.
#[derive(Debug)]
pub struct IoRequest {
    pub disk: DiskId,
    pub op: IoOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes affected (0 for `Flush`).
    pub len: u64,
    pub flags: IoFlags,
    /// Data for `Write`; space for `Read`; `None` otherwise.
    pub buf: Option<Buffer>,
}

impl IoRequest {
    pub fn read(disk: DiskId, offset: u64, buf: Buffer) -> IoRequest {
        IoRequest {
            disk,
            op: IoOp::Read,
            offset,
            len: buf.len() as u64,
            flags: IoFlags::default(),
            buf: Some(buf),
        }
    }

    pub fn write(disk: DiskId, offset: u64, buf: Buffer, fua: bool) -> IoRequest {
        IoRequest {
            disk,
            op: IoOp::Write,
            offset,
            len: buf.len() as u64,
            flags: IoFlags {
                fua,
                ..IoFlags::default()
            },
            buf: Some(buf),
        }
    }

    pub fn flush(disk: DiskId) -> IoRequest {
        IoRequest {
            disk,
            op: IoOp::Flush,
            offset: 0,
            len: 0,
            flags: IoFlags::default(),
            buf: None,
        }
    }

    pub fn unmap(disk: DiskId, offset: u64, len: u64) -> IoRequest {
        IoRequest {
            disk,
            op: IoOp::Unmap,
            offset,
            len,
            flags: IoFlags::default(),
            buf: None,
        }
    }

    pub fn write_zeroes(disk: DiskId, offset: u64, len: u64, flags: IoFlags) -> IoRequest {
        IoRequest {
            disk,
            op: IoOp::WriteZeroes,
            offset,
            len,
            flags,
            buf: None,
        }
    }

    /// Checks the request against a disk of `size` bytes: range inside the
    /// disk, buffer present and sized as `len` where the op needs one.
    pub fn validate(&self, size: u64) -> Result<(), IoError> {
        let needs_buf = matches!(self.op, IoOp::Read | IoOp::Write);
        match (&self.buf, needs_buf) {
            (Some(b), true) if b.len() as u64 == self.len => {}
            (None, false) => {}
            _ => {
                return Err(IoError::Invalid {
                    disk: self.disk,
                    reason: "buffer does not match request",
                })
            }
        }
        if self.op != IoOp::Flush {
            let end = self.offset.checked_add(self.len);
            if end.is_none_or(|e| e > size) {
                return Err(IoError::OutOfRange {
                    disk: self.disk,
                    offset: self.offset,
                    len: self.len,
                    size,
                });
            }
        }
        if needs_buf && self.len > REQUEST_BYTES_MAX {
            return Err(IoError::Invalid {
                disk: self.disk,
                reason: "request larger than REQUEST_BYTES_MAX",
            });
        }
        Ok(())
    }
}

/// The result of a request: the buffer handed back (reads: filled; writes:
/// unchanged), or an error.
pub type IoResult = Result<Option<Buffer>, IoError>;

/// Why a request failed. Each front end maps these to its protocol's errors
/// (NBD errno values, SCSI sense data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    #[error("disk {disk}: no such disk")]
    NoSuchDisk { disk: DiskId },
    #[error("disk {disk}: range {offset}+{len} beyond end of disk ({size} bytes)")]
    OutOfRange {
        disk: DiskId,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("disk {disk}: invalid request: {reason}")]
    Invalid { disk: DiskId, reason: &'static str },
    #[error("disk {disk}: {op:?} not supported")]
    NotSupported { disk: DiskId, op: IoOp },
    /// The disk path is unavailable (a back-end disk went away, the volume is
    /// offline). Sticky until a disk-path event brings it back.
    #[error("disk {disk}: unavailable: {reason}")]
    Unavailable { disk: DiskId, reason: Arc<str> },
    /// The back end reported a medium or transport error.
    #[error("disk {disk}: I/O error at offset {offset}: {errno_text}")]
    Medium {
        disk: DiskId,
        offset: u64,
        errno: i32,
        errno_text: Arc<str>,
    },
    #[error("disk {disk}: no space left")]
    NoSpace { disk: DiskId },
    /// A resource the request needs (pages, IOBs) could not be had.
    #[error("disk {disk}: out of buffers")]
    Exhausted { disk: DiskId },
    /// A request forwarded by the partner node ([`IoFlags::from_partner`])
    /// reached a cache that does not own the volume now; the partner sends
    /// it again once the roles have settled. Never reaches a host.
    #[error("disk {disk}: not owned by this node now")]
    NotOwner { disk: DiskId },
}

impl IoError {
    pub fn medium(disk: DiskId, offset: u64, e: &std::io::Error) -> IoError {
        if e.raw_os_error() == Some(28) {
            return IoError::NoSpace { disk };
        }
        IoError::Medium {
            disk,
            offset,
            errno: e.raw_os_error().unwrap_or(5),
            errno_text: e.to_string().into(),
        }
    }

    /// The POSIX errno a front end should report (NBD uses these values).
    pub fn errno(&self) -> i32 {
        match self {
            IoError::NoSuchDisk { .. } => 6,    // ENXIO
            IoError::OutOfRange { .. } => 22,   // EINVAL (NBD: ENOSPC on writes)
            IoError::Invalid { .. } => 22,      // EINVAL
            IoError::NotSupported { .. } => 95, // EOPNOTSUPP
            IoError::Unavailable { .. } => 5,   // EIO
            IoError::Medium { .. } => 5,        // EIO
            IoError::NoSpace { .. } => 28,      // ENOSPC
            IoError::Exhausted { .. } => 12,    // ENOMEM
            IoError::NotOwner { .. } => 5,      // EIO
        }
    }
}

/// What a facility tells its IOClient about a disk it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    pub size_bytes: u64,
    /// Smallest block the disk handles without read-modify-write.
    pub block_size_min: u32,
    /// Block size for best performance.
    pub block_size_preferred: u32,
    pub can_unmap: bool,
    pub can_write_zeroes: bool,
    /// Unmapped ranges read back as zeros.
    pub unmap_zeroes: bool,
    /// `Flush` on any path makes every completed write durable, whichever
    /// path it came through (what NBD's `CAN_MULTI_CONN` promises).
    pub flush_covers_all_paths: bool,
    /// The disk can answer `block_status` with real allocation data.
    pub reports_allocation: bool,
}

impl DiskInfo {
    pub fn simple(size_bytes: u64) -> DiskInfo {
        DiskInfo {
            size_bytes,
            block_size_min: 512,
            block_size_preferred: 4096,
            can_unmap: false,
            can_write_zeroes: true,
            unmap_zeroes: false,
            flush_covers_all_paths: true,
            reports_allocation: false,
        }
    }
}

/// A run of bytes with the same allocation state (NBD `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocExtent {
    pub len: u64,
    /// No storage backs the range.
    pub hole: bool,
    /// The range reads as zeros.
    pub zero: bool,
}

/// A facility's interface towards its right neighbour, as seen by the left.
///
/// The futures returned are `Send` so a front end may run them on any worker
/// thread. `submit` must validate the request against the disk and answer
/// malformed requests with an error, never a panic.
pub trait IoServer: Send + Sync + 'static {
    /// Serves one request. The buffer travels with the request and comes back
    /// in the result (see the crate documentation on ownership).
    fn submit(&self, req: IoRequest) -> impl Future<Output = IoResult> + Send;

    /// Size and capabilities of `disk`, if this server serves it.
    fn disk_info(&self, disk: DiskId) -> Option<DiskInfo>;

    /// Allocation state of `[offset, offset+len)`. Servers that do not track
    /// allocation report one data extent.
    fn block_status(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<AllocExtent>, IoError>> + Send {
        let info = self.disk_info(disk);
        async move {
            let info = info.ok_or(IoError::NoSuchDisk { disk })?;
            if offset.checked_add(len).is_none_or(|e| e > info.size_bytes) {
                return Err(IoError::OutOfRange {
                    disk,
                    offset,
                    len,
                    size: info.size_bytes,
                });
            }
            Ok(vec![AllocExtent {
                len,
                hole: false,
                zero: false,
            }])
        }
    }

    /// Binds the IOClient that receives this server's events. On binding, the
    /// server announces every disk it currently serves with
    /// [`FrontEndDiskEvent::Created`], so a client needs no other discovery.
    fn bind_client(&self, client: Weak<dyn IoClient>);
}

/// A facility's interface towards its left neighbour, as seen by the right:
/// events only. Called on control paths; implementations may lock.
pub trait IoClient: Send + Sync {
    fn disk_path_event(&self, event: DiskPathEvent);
    fn front_end_disk_event(&self, event: FrontEndDiskEvent);
}

/// A disk's availability on a node changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPathEvent {
    pub disk: DiskId,
    pub node: NodeId,
    pub state: PathState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    Online,
    Offline { reason: Arc<str> },
}

/// Front-end disk configuration, travelling left to the front ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontEndDiskEvent {
    Created {
        disk: DiskId,
        name: Arc<str>,
        info: DiskInfo,
    },
    Deleted {
        disk: DiskId,
    },
    Resized {
        disk: DiskId,
        info: DiskInfo,
    },
    Renamed {
        disk: DiskId,
        name: Arc<str>,
    },
}

/// The link from a facility to its IOClient, set by `bind_client`.
#[derive(Default)]
pub struct ClientLink {
    client: parking_lot::RwLock<Option<Weak<dyn IoClient>>>,
}

impl ClientLink {
    pub fn bind(&self, client: Weak<dyn IoClient>) {
        *self.client.write() = Some(client);
    }

    fn get(&self) -> Option<Arc<dyn IoClient>> {
        self.client.read().as_ref().and_then(Weak::upgrade)
    }

    pub fn disk_path_event(&self, event: DiskPathEvent) {
        if let Some(c) = self.get() {
            c.disk_path_event(event);
        }
    }

    pub fn front_end_disk_event(&self, event: FrontEndDiskEvent) {
        if let Some(c) = self.get() {
            c.front_end_disk_event(event);
        }
    }
}
