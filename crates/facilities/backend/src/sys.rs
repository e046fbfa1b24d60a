//! Thin wrappers over the Linux system calls the back end uses. Each returns
//! the raw `errno` on failure so callers can map it once
//! ([`crate::BackEnd`] turns it into an `IoError`). `EINTR` is retried here,
//! so no caller sees it.

use std::os::fd::RawFd;

/// Linux `UIO_MAXIOV`: most iovecs one `preadv`/`pwritev` accepts.
pub const IOV_MAX: usize = 1024;

// Block-device ioctls from <linux/fs.h> (`_IO(0x12, n)` / `_IOR(0x12, n, size_t)`).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

pub type Errno = i32;

fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs `f` until it does not fail with `EINTR`.
fn retry(mut f: impl FnMut() -> isize) -> Result<usize, Errno> {
    loop {
        let r = f();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// One `preadv2`. `iov` must describe memory the caller may write.
pub fn preadv2(fd: RawFd, iov: &[libc::iovec], offset: u64, flags: i32) -> Result<usize, Errno> {
    debug_assert!(iov.len() <= IOV_MAX);
    // SAFETY: `iov` is a valid slice of iovecs, each describing writable
    // memory owned by the caller for the duration of the call (caller's
    // contract); the kernel writes only inside those ranges.
    retry(|| unsafe {
        libc::preadv2(
            fd,
            iov.as_ptr(),
            iov.len() as i32,
            offset as libc::off_t,
            flags,
        )
    })
}

/// One `pwritev2`.
pub fn pwritev2(fd: RawFd, iov: &[libc::iovec], offset: u64, flags: i32) -> Result<usize, Errno> {
    debug_assert!(iov.len() <= IOV_MAX);
    // SAFETY: as for `preadv2`; the kernel only reads the described memory.
    retry(|| unsafe {
        libc::pwritev2(
            fd,
            iov.as_ptr(),
            iov.len() as i32,
            offset as libc::off_t,
            flags,
        )
    })
}

pub fn fdatasync(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: plain syscall on an fd; no memory is passed.
    retry(|| unsafe { libc::fdatasync(fd) } as isize).map(|_| ())
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    // SAFETY: plain syscall on an fd; no memory is passed.
    retry(
        || unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) } as isize,
    )
    .map(|_| ())
}

/// `lseek` with `SEEK_DATA` / `SEEK_HOLE`. `Ok(None)` for `ENXIO` (no more
/// data / offset at or past the end).
pub fn lseek(fd: RawFd, offset: u64, whence: i32) -> Result<Option<u64>, Errno> {
    // SAFETY: plain syscall on an fd; no memory is passed.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    match errno() {
        libc::ENXIO => Ok(None),
        e => Err(e),
    }
}

fn ioctl_range(fd: RawFd, req: libc::c_ulong, offset: u64, len: u64) -> Result<(), Errno> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` (start, length) from
    // the pointer; `range` lives across the call.
    retry(|| unsafe { libc::ioctl(fd, req, range.as_ptr()) } as isize).map(|_| ())
}

pub fn blk_discard(fd: RawFd, offset: u64, len: u64) -> Result<(), Errno> {
    ioctl_range(fd, BLKDISCARD, offset, len)
}

pub fn blk_zeroout(fd: RawFd, offset: u64, len: u64) -> Result<(), Errno> {
    ioctl_range(fd, BLKZEROOUT, offset, len)
}

pub fn blk_size_bytes(fd: RawFd) -> Result<u64, Errno> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live local.
    retry(|| unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) } as isize)?;
    Ok(size)
}

/// Logical and physical block size of a block device.
pub fn blk_block_sizes(fd: RawFd) -> Result<(u32, u32), Errno> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes an int, BLKPBSZGET an unsigned int, through
    // pointers to live locals of those types.
    retry(|| unsafe { libc::ioctl(fd, BLKSSZGET, &mut logical as *mut libc::c_int) } as isize)?;
    // SAFETY: as above.
    retry(|| unsafe { libc::ioctl(fd, BLKPBSZGET, &mut physical as *mut libc::c_uint) } as isize)?;
    Ok((
        logical.max(512) as u32,
        physical.max(logical as u32).max(512),
    ))
}

/// Direct-I/O alignment of an open file (`statx` `STATX_DIOALIGN`, Linux
/// 6.1+): `(memory alignment, offset alignment)`, `None` if the kernel or the
/// filesystem does not say.
pub fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a NUL-terminated string, `stx` a live statx buffer;
    // AT_EMPTY_PATH makes statx describe `fd` itself.
    let r = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Human text for an errno.
pub fn errno_text(e: Errno) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}
