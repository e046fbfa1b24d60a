//! The few socket calls of the transmission phase that tokio does not offer
//! in the shape the data path wants.
//!
//! * **Peek offset** (`SO_PEEK_OFF`, TCP since Linux 6.9): successive peeks
//!   return successive bytes, so the request headers a connection has
//!   already parsed need not be read (consumed) before it peeks at the next
//!   ones. The connection consumes them later in bulk ([`discard`], which
//!   copies nothing), or with the `readv` of the next WRITE payload. A batch
//!   peek ([`peekv`]) lands several WRITEs' headers and payloads where they
//!   belong in one call. Where the kernel refuses the option the connection
//!   consumes before every peek, as before.
//! * **Readiness.** Every call runs inside [`TcpStream::try_io`], so only
//!   `EAGAIN` clears tokio's readiness. A short read or `readv` does not:
//!   under load the client's next request often arrives within
//!   microseconds, and trying again at once is cheaper than a round
//!   through `epoll_wait` (clearing readiness on short transfers, as
//!   tokio's own `poll_read` does, cost 10-20% of the IOPS of 4 KiB random
//!   writes at QD32, whose payload `readv` is usually short of the next
//!   header). A short *peek* does clear it: a peek asks for every header
//!   the connection has room for, so a short one saw the whole socket, and
//!   the peek after the replies would only return `EAGAIN` (one system
//!   call in three at QD32 reads). Bytes arriving after it wake the task
//!   again (edge-triggered readiness, tokio's tick guard).
//! * **Bytes already peeked are read even when readiness is clear.** With a
//!   peek offset, a peek past the last byte returns `EAGAIN` and clears
//!   readiness while the headers it skipped are still unread; reading them
//!   must not wait for new data (the client may be waiting for the reply).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Sets the socket's peek offset to `off` bytes past the next unread byte.
/// `Err` where the kernel does not support `SO_PEEK_OFF` on TCP.
pub fn set_peek_off(stream: &TcpStream, off: usize) -> io::Result<()> {
    set_socket_int(stream, libc::SO_PEEK_OFF, off)
}

/// Sets the socket's receive low-water mark (`SO_RCVLOWAT`): the kernel
/// reports it readable, and wakes the connection, only once `bytes` are
/// waiting (or the stream ended). Non-blocking reads still return whatever
/// is there. Raising the mark signals readiness at once if that many bytes
/// are already waiting, lowering it likewise.
pub fn set_rcvlowat(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    set_socket_int(stream, libc::SO_RCVLOWAT, bytes.max(1))
}

/// `setsockopt(SOL_SOCKET, opt)` with an `int` value.
fn set_socket_int(stream: &TcpStream, opt: libc::c_int, value: usize) -> io::Result<()> {
    let v: libc::c_int = value
        .try_into()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid socket fd, a c_int option value of the right size.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a non-blocking transfer did.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// `n` bytes (0: end of stream).
    Bytes(usize),
    /// Nothing there now; readiness cleared, the caller waits for the next.
    WouldBlock,
}

/// Runs one read-side system call `f` (returning bytes or -1) under tokio's
/// readiness (`EAGAIN` clears it).
///
/// `present`: the caller knows bytes are waiting (it peeked them earlier).
/// Readiness may have been cleared while they stayed unread, so when tokio
/// says "not ready" the call is made anyway, outside `try_io` (it changes no
/// readiness: data arriving later sets it again).
///
/// `drained_below`: a transfer of fewer bytes than this (but not 0) also
/// clears readiness (0: only `EAGAIN` does).
fn transfer(
    stream: &TcpStream,
    present: bool,
    drained_below: usize,
    mut f: impl FnMut(RawFd) -> isize,
) -> io::Result<Got> {
    let fd = stream.as_raw_fd();
    let mut got = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = f(fd);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        got = Some(n as usize);
        if n > 0 && (n as usize) < drained_below {
            // Tells tokio to clear readiness; the bytes are kept.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match (r, got) {
        (Ok(()), Some(n)) => Ok(Got::Bytes(n)),
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => Ok(Got::Bytes(n)),
        // Not ready in tokio's eyes, without a system call.
        (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock && present => {
            let n = f(fd);
            if n >= 0 {
                Ok(Got::Bytes(n as usize))
            } else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(Got::WouldBlock)
                } else {
                    Err(e)
                }
            }
        }
        (Err(e), _) if e.kind() == io::ErrorKind::WouldBlock => Ok(Got::WouldBlock),
        (Err(e), _) => Err(e),
        (Ok(()), None) => unreachable!("success records the count"),
    }
}

/// `recv(MSG_PEEK)` into `buf` (from the peek offset, where set). A peek
/// that fills less than `buf` clears readiness (see the module docs).
pub fn peek(stream: &TcpStream, buf: &mut [u8], present: bool) -> io::Result<Got> {
    let want = buf.len();
    transfer(stream, present, want, |fd| {
        // SAFETY: `buf` is valid for `want` bytes of writes.
        unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                want,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        }
    })
}

/// `recvmsg(MSG_PEEK)` into `iov` (from the peek offset, where set): one
/// peek that lands request headers and WRITE payloads where they belong. A
/// peek that fills less than `iov` clears readiness, as [`peek`] does.
pub fn peekv(stream: &TcpStream, iov: &mut [IoSliceMut<'_>], present: bool) -> io::Result<Got> {
    let want: usize = iov.iter().map(|s| s.len()).sum();
    transfer(stream, present, want, |fd| {
        // SAFETY: a zeroed `msghdr` is valid (no name, no control data);
        // `IoSliceMut` is ABI-compatible with `iovec` on Unix and every
        // slice is valid for writes of its length.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr().cast();
            msg.msg_iovlen = iov.len() as _;
            libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        }
    })
}

/// Throws away the next `len` bytes without copying them (`MSG_TRUNC`,
/// which Linux honours for TCP since 2.4, tcp(7)): bytes the connection has
/// already peeked into place.
pub fn discard(stream: &TcpStream, len: usize, present: bool) -> io::Result<Got> {
    transfer(stream, present, 0, |fd| {
        // SAFETY: with MSG_TRUNC, TCP copies nothing to the (null) buffer.
        unsafe {
            libc::recv(
                fd,
                std::ptr::null_mut(),
                len,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        }
    })
}

/// `readv` into `iov`.
pub fn readv(stream: &TcpStream, iov: &mut [IoSliceMut<'_>], present: bool) -> io::Result<Got> {
    let cnt = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
    transfer(stream, present, 0, |fd| {
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix; every
        // slice is valid for writes of its length.
        unsafe { libc::readv(fd, iov.as_mut_ptr().cast(), cnt) }
    })
}
