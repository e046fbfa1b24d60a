//! Managed disks: opening a file or block device, measuring it, and its
//! online/offline state and injected faults.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use sanvirt_facility::{DiskId, DiskInfo, IoOp};

use crate::sys;
use crate::{BackendError, CacheMode};

/// What kind of object backs an mdisk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    File,
    BlockDevice,
}

/// The I/O mode an mdisk got when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoMode {
    /// Aligned requests use an `O_DIRECT` fd; unaligned ones the buffered fd.
    Direct {
        align_offset: u32,
        align_memory: u32,
    },
    /// Every request uses the page cache: configured so, or the filesystem
    /// refused `O_DIRECT` (then `refused` holds the reason).
    Buffered { refused: Option<String> },
}

/// An injected fault (as SPDK's error bdev): matching requests fail with
/// `errno` instead of reaching the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Requests of this op fail; `None`: every op.
    pub op: Option<IoOp>,
    pub errno: i32,
    /// Matching requests to let through before failing.
    pub skip: u32,
    /// Requests to fail, then the fault clears itself; 0: until cleared.
    pub count: u32,
}

#[derive(Default)]
struct FaultState {
    armed: AtomicBool,
    fault: Mutex<Option<Fault>>,
}

pub struct Mdisk {
    pub id: DiskId,
    pub path: PathBuf,
    pub kind: DeviceKind,
    pub info: DiskInfo,
    pub mode: IoMode,
    /// `O_DIRECT` fd, when the mode is `Direct`.
    direct: Option<File>,
    buffered: File,
    /// (device, inode) at open time, to notice the path being replaced.
    identity: (u64, u64),
    offline: AtomicBool,
    reason: Mutex<Option<Arc<str>>>,
    faults: FaultState,
}

impl Mdisk {
    pub fn open(id: DiskId, path: &Path, cache: CacheMode) -> Result<Mdisk, BackendError> {
        let err = |source: std::io::Error| BackendError::Open {
            id,
            path: path.to_owned(),
            source,
        };
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(err)?;
        let meta = buffered.metadata().map_err(err)?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            DeviceKind::File
        } else if ft.is_block_device() {
            DeviceKind::BlockDevice
        } else {
            return Err(BackendError::NotADisk {
                id,
                path: path.to_owned(),
            });
        };
        let fd = buffered.as_raw_fd();
        let (size_bytes, lbs, pbs) = match kind {
            DeviceKind::File => (meta.len(), 512, 4096),
            DeviceKind::BlockDevice => {
                let size = sys::blk_size_bytes(fd).map_err(|e| err(errno(e)))?;
                let (l, p) = sys::blk_block_sizes(fd).map_err(|e| err(errno(e)))?;
                (size, l, p)
            }
        };
        if size_bytes == 0 {
            return Err(BackendError::Empty {
                id,
                path: path.to_owned(),
            });
        }
        let (direct, mode) = match cache {
            CacheMode::Buffered => (None, IoMode::Buffered { refused: None }),
            CacheMode::Direct => match open_direct(path, size_bytes) {
                Ok(f) => {
                    let (mem, off) = sys::dio_align(f.as_raw_fd()).unwrap_or(match kind {
                        DeviceKind::BlockDevice => (lbs, lbs),
                        // Unknown filesystem alignment: a page satisfies
                        // every device with logical blocks up to 4 KiB.
                        DeviceKind::File => (4096, 4096),
                    });
                    (
                        Some(f),
                        IoMode::Direct {
                            align_offset: off.max(1),
                            align_memory: mem.max(1),
                        },
                    )
                }
                Err(e) => (
                    None,
                    IoMode::Buffered {
                        refused: Some(format!("O_DIRECT refused: {e}")),
                    },
                ),
            },
        };
        let block_size_min = match &mode {
            IoMode::Direct { align_offset, .. } => (*align_offset).max(lbs),
            IoMode::Buffered { .. } => lbs,
        };
        let (can_unmap, unmap_zeroes, reports_allocation) = match kind {
            DeviceKind::File => {
                // Punching beyond the end changes nothing but tells whether
                // the filesystem supports holes at all.
                let punch = sys::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    size_bytes,
                    4096,
                )
                .is_ok();
                let seek = sys::lseek(fd, 0, libc::SEEK_DATA).is_ok();
                (punch, punch, seek)
            }
            DeviceKind::BlockDevice => (blk_discard_supported(&meta), false, false),
        };
        let info = DiskInfo {
            size_bytes,
            block_size_min,
            block_size_preferred: pbs.max(block_size_min).max(4096),
            can_unmap,
            can_write_zeroes: true,
            unmap_zeroes,
            flush_covers_all_paths: true,
            reports_allocation,
        };
        Ok(Mdisk {
            id,
            path: path.to_owned(),
            kind,
            info,
            mode,
            direct,
            buffered,
            identity: (meta.dev(), meta.ino()),
            offline: AtomicBool::new(false),
            reason: Mutex::new(None),
            faults: FaultState::default(),
        })
    }

    pub fn buffered_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// The fd for a transfer: the direct fd if the request and all of its
    /// memory segments are aligned, else the buffered fd.
    pub fn fd_for<'a>(
        &self,
        offset: u64,
        len: u64,
        segments: impl Iterator<Item = &'a [u8]>,
    ) -> RawFd {
        let (
            Some(d),
            IoMode::Direct {
                align_offset,
                align_memory,
            },
        ) = (&self.direct, &self.mode)
        else {
            return self.buffered_fd();
        };
        let (ao, am) = (*align_offset as u64, *align_memory as usize);
        let aligned = offset.is_multiple_of(ao)
            && len.is_multiple_of(ao)
            && segments.into_iter().all(|s| {
                (s.as_ptr() as usize).is_multiple_of(am) && (s.len() as u64).is_multiple_of(ao)
            });
        if aligned {
            d.as_raw_fd()
        } else {
            self.buffered_fd()
        }
    }

    pub fn direct_fd(&self) -> Option<RawFd> {
        self.direct.as_ref().map(|d| d.as_raw_fd())
    }

    pub fn is_direct(&self, fd: RawFd) -> bool {
        self.direct.as_ref().is_some_and(|d| d.as_raw_fd() == fd)
    }

    #[inline]
    pub fn offline_reason(&self) -> Option<Arc<str>> {
        if !self.offline.load(Ordering::Acquire) {
            return None;
        }
        self.reason.lock().clone()
    }

    /// Marks the mdisk offline. Returns false if it already was (so only the
    /// first failure emits an event).
    pub fn set_offline(&self, reason: Arc<str>) -> bool {
        let mut r = self.reason.lock();
        if r.is_some() {
            return false;
        }
        *r = Some(reason);
        self.offline.store(true, Ordering::Release);
        true
    }

    /// Does the path still lead to the file we opened?
    pub fn path_intact(&self) -> Result<(), String> {
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => {}
            Ok(_) => return Err(format!("{} now names another file", self.path.display())),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        }
        match self.buffered.metadata() {
            Ok(m) if m.nlink() == 0 => Err(format!("{} was deleted", self.path.display())),
            Ok(m) if self.kind == DeviceKind::File && m.len() < self.info.size_bytes => Err(
                format!("{} shrank to {} bytes", self.path.display(), m.len()),
            ),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    pub fn inject(&self, fault: Option<Fault>) {
        let mut f = self.faults.fault.lock();
        *f = fault;
        self.faults.armed.store(f.is_some(), Ordering::Release);
    }

    /// The errno an injected fault imposes on a request of `op`, if any.
    #[inline]
    pub fn take_fault(&self, op: IoOp) -> Option<i32> {
        if !self.faults.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut g = self.faults.fault.lock();
        let f = g.as_mut()?;
        if f.op.is_some_and(|o| o != op) {
            return None;
        }
        if f.skip > 0 {
            f.skip -= 1;
            return None;
        }
        let errno = f.errno;
        if f.count > 0 {
            f.count -= 1;
            if f.count == 0 {
                *g = None;
                self.faults.armed.store(false, Ordering::Release);
            }
        }
        Some(errno)
    }
}

/// Opens `path` with `O_DIRECT` and proves the filesystem serves direct I/O
/// with one aligned read (some accept the flag at open and fail every I/O).
fn open_direct(path: &Path, size_bytes: u64) -> std::io::Result<File> {
    #[cfg(test)]
    if path.extension().is_some_and(|e| e == "nodirect") {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)?;
    if size_bytes >= 4096 {
        let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("page layout");
        // SAFETY: non-zero size layout.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        let iov = [libc::iovec {
            iov_base: p.cast(),
            iov_len: 4096,
        }];
        let r = sys::preadv2(f.as_raw_fd(), &iov, 0, 0);
        // SAFETY: `p` came from `alloc` with this layout and the read is over.
        unsafe { std::alloc::dealloc(p, layout) };
        r.map_err(errno)?;
    }
    Ok(f)
}

fn errno(e: sys::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// Whether the kernel advertises discard for the device (sysfs
/// `queue/discard_max_bytes`, in the device's or, for a partition, its
/// parent's directory).
fn blk_discard_supported(meta: &std::fs::Metadata) -> bool {
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    for q in ["queue", "../queue"] {
        let p = format!("/sys/dev/block/{maj}:{min}/{q}/discard_max_bytes");
        if let Ok(s) = std::fs::read_to_string(&p) {
            return s.trim().parse::<u64>().is_ok_and(|n| n > 0);
        }
    }
    false
}
