//! The transmission phase of one connection: a single task, no locks, no
//! allocation per request.
//!
//! * **Slots.** A connection has [`IN_FLIGHT_MAX`] request slots and a
//!   [`FutureSlab`] of the same size holding each request's IOServer future.
//!   A request occupies a slot from the moment its header is accepted until
//!   its reply has been written completely; while it does, the slot holds a
//!   request control block ([`Slot`]: metadata, reply header bytes,
//!   block-status payload space), an object allocated from the front end's
//!   control-block pool under the reservation the connection made when it
//!   started (so a connection can always fill its slots, and the blocks are
//!   accounted like every other data-path object). When every slot is busy
//!   the connection stops reading the socket: TCP flow control pushes back
//!   on the client.
//! * **Receiving.** Headers are *peeked*, parsed, then consumed only up to the
//!   end of the last accepted header, so a WRITE payload is never pulled into
//!   scratch memory: it is read with `readv` straight into the pages of a
//!   [`Buffer`] from the pool. With a peek offset (`SO_PEEK_OFF`, see
//!   `crate::sock`) the parsed headers are not consumed before the next
//!   peek: they are read in bulk once [`CONSUME_BATCH_BYTES`] have gathered,
//!   or by the first iovec of the next payload's `readv`, and always before
//!   the connection waits (unread bytes can hold the receive window shut:
//!   see `poll_recv`). After a short WRITE
//!   the next peek is a *batch peek* (`Transmission::recv_batch`) that
//!   puts the following WRITEs' payloads straight into buffers allocated
//!   for them in advance; accepted bytes are thrown away with `MSG_TRUNC`,
//!   without a copy. A request whose buffer cannot be had leaves its
//!   header unread in the socket while the connection waits in the pool's
//!   FIFO queue (`BufferPool::alloc_wait`): backpressure, no error.
//! * **Executing.** Requests run concurrently; each slot future is polled only
//!   when its own waker fired. Replies go out in completion order.
//! * **Sending.** Completed replies are queued (slot indices) and written with
//!   `writev`, many replies per call: header bytes from the slot, data from
//!   the buffer's pages.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sanvirt_buffer::{BufferError, PAGE_SIZE};
use sanvirt_facility::{
    AllocExtent, Buffer, BufferPool, DiskId, IoError, IoFlags, IoRequest, IoResult, IoServer,
};
use sanvirt_objpool::Pool;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::coalesce::{Coalesce, CoalesceStats, Mark, Timer};
use crate::judge::{errno_for, judge, ExportView, Verdict};
use crate::limits::*;
use crate::negotiate::{Session, BASE_ALLOCATION_ID};
use crate::proto::*;
use crate::slab::FutureSlab;
use crate::sock::Got;

/// What a slot asks of the IOServer.
pub enum Op {
    Io(IoRequest),
    Status { disk: DiskId, offset: u64, len: u64 },
}

/// What the IOServer answered.
pub enum Done {
    Io(IoResult),
    Status(Result<Vec<AllocExtent>, IoError>),
}

/// The future stored in a slot: one `async fn`, so every slot has the same
/// (statically known, unboxed) type.
pub async fn exec<S: IoServer>(server: &S, op: Op) -> Done {
    match op {
        Op::Io(req) => Done::Io(server.submit(req).await),
        Op::Status { disk, offset, len } => {
            Done::Status(server.block_status(disk, offset, len).await)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// WRITE payload being received, or being discarded before an error reply.
    Receiving,
    Running,
    Queued,
}

/// A request control block (see the module docs).
pub struct Slot {
    state: SlotState,
    cookie: u64,
    cmd: Command,
    offset: u64,
    len: u32,
    flags: u16,
    /// Error to answer once a discarded payload has been read.
    errno: u32,
    hdr: [u8; SLOT_HEADER_BYTES_MAX],
    hdr_len: usize,
    /// WRITE: the payload being received. READ: the data being sent.
    data: Option<Buffer>,
    /// Block-status payload (capacity reserved at connection start).
    extents: Vec<u8>,
    reply_len: usize,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot::new()
    }
}

impl Slot {
    pub fn new() -> Slot {
        Slot {
            state: SlotState::Free,
            cookie: 0,
            cmd: Command::Read,
            offset: 0,
            len: 0,
            flags: 0,
            errno: 0,
            hdr: [0; SLOT_HEADER_BYTES_MAX],
            hdr_len: 0,
            data: None,
            extents: Vec::with_capacity(4 + 8 * BLOCK_STATUS_EXTENTS_MAX),
            reply_len: 0,
        }
    }

    /// The reply's bytes, in order.
    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.hdr[..self.hdr_len])
            .chain(self.data.iter().flat_map(|b| b.segments()))
            .chain(std::iter::once(&self.extents[..]))
    }
}

/// The connection's slots: slot `i` holds a control block from `pool` while
/// it is busy, nothing while it is free. The connection holds a reservation
/// of [`IN_FLIGHT_MAX`] blocks in `pool` (made by the front end before the
/// connection starts), so allocating one for a free slot cannot fail.
struct SlotTable<'a> {
    pool: &'a Pool<Box<Slot>>,
    held: Box<[Option<Box<Slot>>]>,
}

impl<'a> SlotTable<'a> {
    fn new(pool: &'a Pool<Box<Slot>>) -> Self {
        SlotTable {
            pool,
            held: (0..IN_FLIGHT_MAX).map(|_| None).collect(),
        }
    }

    fn is_held(&self, i: usize) -> bool {
        self.held[i].is_some()
    }

    fn take(&mut self, i: usize) -> &mut Slot {
        debug_assert!(self.held[i].is_none());
        self.held[i].insert(self.pool.allocate_detached())
    }

    fn give_back(&mut self, i: usize) {
        if let Some(mut b) = self.held[i].take() {
            b.state = SlotState::Free;
            b.data = None;
            b.extents.clear();
            self.pool.free_detached(b);
        }
    }
}

impl Drop for SlotTable<'_> {
    fn drop(&mut self) {
        for i in 0..self.held.len() {
            self.give_back(i);
        }
    }
}

impl std::ops::Index<usize> for SlotTable<'_> {
    type Output = Slot;
    fn index(&self, i: usize) -> &Slot {
        self.held[i].as_deref().expect("slot holds a control block")
    }
}

impl std::ops::IndexMut<usize> for SlotTable<'_> {
    fn index_mut(&mut self, i: usize) -> &mut Slot {
        self.held[i]
            .as_deref_mut()
            .expect("slot holds a control block")
    }
}

enum Recv {
    Headers,
    Payload { slot: usize, received: usize },
    Discard { slot: usize, remaining: u64 },
    Stopped,
}

/// What waiting for the socket to become readable gave.
enum Readable {
    /// Readable again: try the read once more.
    Again,
    /// Not yet; the task is woken when it is.
    Pending,
    /// The socket failed; the connection stopped.
    Failed,
}

/// What happened to one accepted header.
enum Admit {
    /// Consumed; keep parsing headers.
    Next,
    /// Consumed; a payload follows (or the connection stops).
    Last,
    /// Not consumed: no buffer now, retry later.
    NoBuffer,
}

/// `fmt::Write` into a byte slice that cuts at character boundaries when full.
struct Bounded<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl std::fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let mut n = s.len().min(room);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

type BufWait<'a> = Pin<Box<dyn Future<Output = Result<Buffer, BufferError>> + Send + 'a>>;

pub struct Transmission<'a, S, F, G> {
    server: &'a S,
    exec: G,
    stream: &'a TcpStream,
    pool: &'a Arc<BufferPool>,
    session: Session,
    slots: SlotTable<'a>,
    slab: FutureSlab<F>,
    free: Vec<usize>,
    sendq: VecDeque<usize>,
    /// Bytes of the reply at the front of `sendq` already written.
    front_sent: usize,
    busy: usize,
    recv: Recv,
    hdr_buf: [u8; REQUEST_HEADER_BYTES],
    hdr_have: usize,
    scratch: Box<[u8]>,
    /// Peeked bytes accepted but not yet consumed from the socket.
    consume_pending: usize,
    /// The socket's peek offset as this connection left it (bytes past the
    /// next unread byte where the next peek starts); `None` where the kernel
    /// has no peek offset for TCP (then every peek starts at the next
    /// unread byte, and parsed headers are consumed before peeking again).
    peek_off: Option<usize>,
    /// Bytes past the next unread byte known to be in the socket (peeked).
    /// A peek past them (`EAGAIN`) clears tokio's readiness while they stay
    /// unread, so reads of them must not wait for readiness
    /// (`crate::sock`).
    seen: usize,
    /// Waiting (FIFO, in the pool) for the buffer of the header at the
    /// front of the socket; boxed only on this exhaustion path.
    buf_wait: Option<BufWait<'a>>,
    /// The outcome of that wait, for the same header.
    waited: Option<Result<Buffer, BufferError>>,
    /// Retry timer for a pool too busy even to queue us (`TooManyWaiters`).
    retry: Pin<Box<Sleep>>,
    retry_armed: bool,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    write_broken: bool,
    /// Request coalescing ([`crate::coalesce`]): the policy, the bound on a
    /// wait (created at the first wait), the socket's receive low-water mark
    /// as last set (1: the kernel's default).
    coalesce: Coalesce,
    timer: Option<Timer>,
    lowat: usize,
    /// The wait's timer ran out; judged when the connection is next idle.
    expired: bool,
    /// Peek once even if tokio has no readiness (after a wait timed out).
    force_peek: bool,
    /// Write batches ([`Transmission::recv_batch`]): the payload length of
    /// the last request if it was a WRITE short enough to batch (0: not),
    /// how many requests the next batch peek covers, and its header and
    /// payload space (kept between batches: no allocation per batch).
    batch_len: usize,
    batch_guess: usize,
    batch_hdrs: [[u8; REQUEST_HEADER_BYTES]; BATCH_REQUESTS_MAX],
    batch_bufs: Vec<Buffer>,
    batch_stats: BatchStats,
}

/// What WRITE batching did on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batch peeks that returned bytes.
    pub peeks: u64,
    /// WRITEs whose payload (all of it or its start) came with a batch peek.
    pub writes: u64,
}

impl BatchStats {
    pub fn add(&mut self, o: &BatchStats) {
        self.peeks += o.peeks;
        self.writes += o.writes;
    }
}

impl<'a, S, F, G> Transmission<'a, S, F, G>
where
    S: IoServer,
    F: Future<Output = Done>,
    G: Fn(&'a S, Op) -> F,
{
    /// Must be created inside a tokio runtime with the time driver enabled.
    pub fn new(
        server: &'a S,
        exec: G,
        stream: &'a TcpStream,
        pool: &'a Arc<BufferPool>,
        blocks: &'a Pool<Box<Slot>>,
        session: Session,
        shutdown: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    ) -> Self {
        Transmission {
            server,
            exec,
            stream,
            pool,
            session,
            slots: SlotTable::new(blocks),
            slab: FutureSlab::new(),
            free: (0..IN_FLIGHT_MAX).rev().collect(),
            sendq: VecDeque::with_capacity(IN_FLIGHT_MAX),
            front_sent: 0,
            busy: 0,
            recv: Recv::Headers,
            hdr_buf: [0; REQUEST_HEADER_BYTES],
            hdr_have: 0,
            scratch: vec![0u8; DISCARD_CHUNK_BYTES].into_boxed_slice(),
            consume_pending: 0,
            peek_off: crate::sock::set_peek_off(stream, 0).ok().map(|()| 0),
            seen: 0,
            buf_wait: None,
            waited: None,
            retry: Box::pin(tokio::time::sleep(Duration::ZERO)),
            retry_armed: false,
            shutdown,
            write_broken: false,
            coalesce: Coalesce::new(0, Duration::ZERO),
            timer: None,
            lowat: 1,
            expired: false,
            force_peek: false,
            batch_len: 0,
            batch_guess: 2,
            batch_hdrs: [[0; REQUEST_HEADER_BYTES]; BATCH_REQUESTS_MAX],
            batch_bufs: Vec::with_capacity(BATCH_REQUESTS_MAX),
            batch_stats: BatchStats::default(),
        }
    }

    /// Coalesces requests as `c` decides (off without).
    pub fn coalescing(mut self, c: Coalesce) -> Self {
        self.coalesce = c;
        self
    }

    /// What request coalescing did on this connection.
    pub fn coalesce_stats(&self) -> CoalesceStats {
        self.coalesce.stats()
    }

    /// What WRITE batching did on this connection.
    pub fn batch_stats(&self) -> BatchStats {
        self.batch_stats
    }

    /// Drives the connection; ready when the session is over (client
    /// disconnect, protocol error, shutdown) and nothing is in flight.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.slab.ready().register(cx.waker());
        // Once per wakeup (it registers this task's waker), not per round.
        if !matches!(self.recv, Recv::Stopped) && self.shutdown.as_mut().poll(cx).is_ready() {
            self.stop("server shutting down");
        }
        if self.coalesce.waiting() {
            self.wait_woken(cx);
        }
        for _ in 0..POLL_ROUNDS_MAX {
            let mut progress = self.poll_completions();
            progress |= self.poll_send(cx);
            if self.retry_armed && self.retry.as_mut().poll(cx).is_ready() {
                self.retry_armed = false;
                progress = true;
            }
            if let Some(w) = self.buf_wait.as_mut() {
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    self.wait_done(r, cx);
                    progress = true;
                }
            }
            if !matches!(self.recv, Recv::Stopped) {
                progress |= self.poll_recv(cx);
            }
            if matches!(self.recv, Recv::Stopped) && self.busy == 0 {
                self.drain_parsed();
                return Poll::Ready(());
            }
            if !progress {
                if self.park(cx) {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
        }
        // Plenty of work: let other tasks run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    // ------------------------------------------------------------ coalescing

    /// Polled during a coalesced wait: the batch arrived, or the timer ran
    /// out (then the connection reads whatever is there).
    fn wait_woken(&mut self, cx: &mut Context<'_>) {
        let expired = self.timer.as_mut().is_some_and(|t| t.poll_expired(cx));
        if expired {
            self.wait_ran_out();
        } else {
            self.coalesce.woken(Instant::now().into_std());
        }
    }

    /// The wait's timer ran out: wake on any byte again and read whatever is
    /// there (the wait is judged when the connection is next idle).
    fn wait_ran_out(&mut self) {
        self.expired = true;
        self.force_peek = true;
        self.set_mark(1);
    }

    /// The poll loop found nothing to do: choose how to wait. `true`: that
    /// changed something worth another round.
    fn park(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.coalesce.enabled() {
            return false;
        }
        let now = Instant::now().into_std();
        if std::mem::take(&mut self.expired) {
            self.coalesce.timed_out(now);
        }
        let clean = matches!(self.recv, Recv::Headers) && self.hdr_have == 0;
        let idle = clean
            && self.busy == 0
            && self.sendq.is_empty()
            && self.buf_wait.is_none()
            && self.waited.is_none()
            && !self.retry_armed;
        if !idle {
            // Waiting for the rest of a header or payload: any byte counts.
            if !clean && self.lowat > 1 {
                self.set_mark(1);
            }
            return false;
        }
        match self.coalesce.idle(now) {
            Mark::Keep => false,
            Mark::Off => {
                if self.lowat > 1 {
                    self.set_mark(1);
                }
                false
            }
            Mark::Wait(bytes) => {
                // Headers parsed but unread would count towards the mark.
                if self.consume_pending > 0 && !self.consume(cx) {
                    self.coalesce.cancel();
                    if self.lowat > 1 {
                        self.set_mark(1);
                    }
                    return true;
                }
                if self.lowat != bytes && !self.set_mark(bytes) {
                    return false;
                }
                let wait = self.coalesce.wait();
                let timer = match self.timer.take().map_or_else(Timer::new, Ok) {
                    Ok(t) => self.timer.insert(t),
                    Err(e) => return self.coalesce_failed("timer", &e),
                };
                if let Err(e) = timer.arm(wait) {
                    return self.coalesce_failed("timer", &e);
                }
                // Registers the waker for the expiry; it cannot have run
                // out yet, but if it has, handle it now.
                if timer.poll_expired(cx) {
                    self.wait_ran_out();
                    return true;
                }
                false
            }
        }
    }

    /// Sets the socket's receive low-water mark; `false` if the kernel
    /// refused (coalescing is then off for this connection).
    fn set_mark(&mut self, bytes: usize) -> bool {
        match crate::sock::set_rcvlowat(self.stream, bytes) {
            Ok(()) => {
                self.lowat = bytes;
                true
            }
            Err(e) => {
                self.coalesce_failed("SO_RCVLOWAT", &e);
                false
            }
        }
    }

    /// Turns coalescing off for this connection after a system call failed.
    /// `true`: the connection should run another round.
    fn coalesce_failed(&mut self, what: &'static str, e: &io::Error) -> bool {
        tracing::debug!(what, error = %e, "request coalescing off for this connection");
        let stats = self.coalesce.stats();
        self.coalesce = Coalesce::off_after(stats);
        if self.lowat > 1 && crate::sock::set_rcvlowat(self.stream, 1).is_ok() {
            self.lowat = 1;
        }
        // Read whatever is waiting without waiting for readiness.
        self.force_peek = true;
        true
    }

    fn stop(&mut self, reason: &'static str) {
        self.buf_wait = None;
        self.waited = None;
        match std::mem::replace(&mut self.recv, Recv::Stopped) {
            Recv::Payload { slot, .. } | Recv::Discard { slot, .. } => self.free_slot(slot),
            Recv::Headers | Recv::Stopped => {}
        }
        tracing::debug!(reason, "connection stops receiving");
    }

    /// Reads the headers parsed but left in the socket (peek offset) before
    /// the connection ends: closing a socket with unread bytes resets the
    /// connection instead of closing it (the client that sent NBD_CMD_DISC
    /// would see ECONNRESET).
    fn drain_parsed(&mut self) {
        while self.consume_pending > 0 {
            match crate::sock::discard(self.stream, self.consume_pending, true) {
                Ok(Got::Bytes(m)) if m > 0 => {
                    self.consume_pending -= m;
                    self.consumed(m);
                }
                _ => break,
            }
        }
    }

    // ------------------------------------------------------------ slots

    fn take_slot(&mut self, h: &RequestHeader) -> usize {
        let i = self
            .free
            .pop()
            .expect("a header is only accepted while a slot is free");
        let s = self.slots.take(i);
        debug_assert_eq!(s.state, SlotState::Free);
        s.cookie = h.cookie;
        s.cmd = h.command();
        s.offset = h.offset;
        s.len = h.len;
        s.flags = h.flags;
        s.errno = 0;
        s.hdr_len = 0;
        s.reply_len = 0;
        s.extents.clear();
        s.state = SlotState::Running;
        self.busy += 1;
        let payload = if s.cmd == Command::Write {
            h.len as usize
        } else {
            0
        };
        self.batch_len = if payload <= BATCH_PAYLOAD_MAX {
            payload
        } else {
            0
        };
        self.coalesce
            .request(REQUEST_HEADER_BYTES + payload, self.busy);
        i
    }

    fn free_slot(&mut self, i: usize) {
        debug_assert_ne!(self.slots[i].state, SlotState::Free);
        self.slots.give_back(i);
        self.busy -= 1;
        self.free.push(i);
    }

    fn run(&mut self, i: usize, op: Op) {
        self.slots[i].state = SlotState::Running;
        let fut = (self.exec)(self.server, op);
        self.slab.insert(i, fut);
    }

    fn queue(&mut self, i: usize) {
        if self.write_broken {
            self.free_slot(i);
            return;
        }
        let s = &mut self.slots[i];
        s.reply_len = s.hdr_len + s.data.as_ref().map_or(0, Buffer::len) + s.extents.len();
        s.state = SlotState::Queued;
        self.sendq.push_back(i);
    }

    /// Success without data (and the empty structured reply to a 0-byte read).
    fn reply_ok(&mut self, i: usize) {
        let structured_read = self.session.structured && self.slots[i].cmd == Command::Read;
        let s = &mut self.slots[i];
        s.data = None;
        s.hdr_len = if structured_read {
            encode_chunk_header(&mut s.hdr, REPLY_FLAG_DONE, REPLY_TYPE_NONE, s.cookie, 0)
        } else {
            encode_simple_reply(&mut s.hdr, 0, s.cookie)
        };
        self.queue(i);
    }

    fn reply_read(&mut self, i: usize, buf: Buffer) {
        let structured = self.session.structured;
        let s = &mut self.slots[i];
        s.hdr_len = if structured {
            // One content chunk covering the whole read, marked final: the
            // data are in memory, so no error can follow (this also honours
            // NBD_CMD_FLAG_DF).
            let n = encode_chunk_header(
                &mut s.hdr,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                s.cookie,
                8 + s.len,
            );
            s.hdr[n..n + 8].copy_from_slice(&s.offset.to_be_bytes());
            n + 8
        } else {
            encode_simple_reply(&mut s.hdr, 0, s.cookie)
        };
        s.data = Some(buf);
        self.queue(i);
    }

    fn reply_error(&mut self, i: usize, errno: u32, msg: std::fmt::Arguments<'_>) {
        let structured = self.session.structured;
        let s = &mut self.slots[i];
        s.data = None;
        s.extents.clear();
        s.hdr_len = if structured {
            let mut w = Bounded {
                buf: &mut s.hdr[CHUNK_HEADER_BYTES + 6..],
                len: 0,
            };
            // Bounded never fails; a cut message is still a message.
            let _ = std::fmt::write(&mut w, msg);
            let n = w.len;
            let m = CHUNK_HEADER_BYTES;
            encode_chunk_header(
                &mut s.hdr,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                s.cookie,
                (6 + n) as u32,
            );
            s.hdr[m..m + 4].copy_from_slice(&errno.to_be_bytes());
            s.hdr[m + 4..m + 6].copy_from_slice(&(n as u16).to_be_bytes());
            m + 6 + n
        } else {
            encode_simple_reply(&mut s.hdr, errno, s.cookie)
        };
        self.queue(i);
    }

    fn reply_reject(&mut self, i: usize, errno: u32) {
        let msg = match errno {
            NBD_EPERM => "export is read-only",
            NBD_EIO => "disk path offline",
            NBD_ENOSPC => "write beyond the end of the export",
            NBD_ENOTSUP => "fast zero not available",
            NBD_ENOMEM => "request larger than the buffer pool",
            _ => "invalid request",
        };
        self.reply_error(i, errno, format_args!("{msg}"));
    }

    fn reply_status(&mut self, i: usize, extents: &[AllocExtent]) {
        let s = &mut self.slots[i];
        let req_one = s.flags & CMD_FLAG_REQ_ONE != 0;
        let cap = if req_one { 1 } else { BLOCK_STATUS_EXTENTS_MAX };
        let mut left = s.len as u64;
        let mut descs: usize = 0;
        // (length, flags) of the descriptor being built.
        let mut cur: Option<(u64, u32)> = None;
        s.extents.clear();
        s.extents
            .extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        let push = |v: &mut Vec<u8>, (len, flags): (u64, u32)| {
            v.extend_from_slice(&(len as u32).to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        };
        for e in extents {
            let len = e.len.min(left);
            if len == 0 {
                continue;
            }
            let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
            cur = match cur {
                Some((l, f)) if f == flags => Some((l + len, f)),
                Some(prev) => {
                    push(&mut s.extents, prev);
                    descs += 1;
                    if descs == cap {
                        None
                    } else {
                        Some((len, flags))
                    }
                }
                None => Some((len, flags)),
            };
            left -= len;
            if descs == cap || left == 0 {
                break;
            }
        }
        if let Some(last) = cur {
            if descs < cap {
                push(&mut s.extents, last);
                descs += 1;
            }
        }
        if descs == 0 {
            // Nothing usable from the server: status 0 is always safe.
            push(&mut s.extents, (s.len as u64, 0));
        }
        s.hdr_len = encode_chunk_header(
            &mut s.hdr,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            s.cookie,
            s.extents.len() as u32,
        );
        self.queue(i);
    }

    fn complete(&mut self, i: usize, done: Done) {
        let (cmd, len) = (self.slots[i].cmd, self.slots[i].len);
        match done {
            Done::Io(Ok(buf)) if cmd == Command::Read => match buf {
                Some(b) if b.len() == len as usize => self.reply_read(i, b),
                _ => self.reply_error(
                    i,
                    NBD_EIO,
                    format_args!("read returned no data of the right size"),
                ),
            },
            Done::Io(Ok(_)) => self.reply_ok(i),
            Done::Io(Err(e)) | Done::Status(Err(e)) => {
                self.reply_error(i, errno_for(&e, cmd), format_args!("{e}"))
            }
            Done::Status(Ok(extents)) => self.reply_status(i, &extents),
        }
    }

    fn poll_completions(&mut self) -> bool {
        let mut bits = self.slab.ready().take();
        let mut progress = false;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if !self.slots.is_held(i)
                || self.slots[i].state != SlotState::Running
                || !self.slab.is_busy(i)
            {
                continue;
            }
            if let Poll::Ready(done) = self.slab.poll(i) {
                self.complete(i, done);
                progress = true;
            }
        }
        progress
    }

    // ------------------------------------------------------------ sending

    fn broken(&mut self, e: &io::Error) {
        tracing::debug!(error = %e, "write to client failed");
        self.write_broken = true;
        while let Some(i) = self.sendq.pop_front() {
            self.free_slot(i);
        }
        self.front_sent = 0;
        if !matches!(self.recv, Recv::Stopped) {
            self.stop("write failed");
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.sendq.is_empty() && !self.write_broken {
            match self.stream.poll_write_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => {
                    self.broken(&e);
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            let written = {
                let mut iov = [IoSlice::new(&[]); SEND_IOV_MAX];
                let n = gather(&self.slots, &self.sendq, self.front_sent, &mut iov);
                self.stream.try_write_vectored(&iov[..n])
            };
            match written {
                Ok(0) => {
                    self.broken(&io::ErrorKind::WriteZero.into());
                    return true;
                }
                Ok(n) => {
                    self.advance(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    self.broken(&e);
                    return true;
                }
            }
        }
        progress
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let i = *self
                .sendq
                .front()
                .expect("bytes written belong to queued replies");
            let rest = self.slots[i].reply_len - self.front_sent;
            if n >= rest {
                n -= rest;
                self.front_sent = 0;
                self.sendq.pop_front();
                self.free_slot(i);
            } else {
                self.front_sent += n;
                n = 0;
            }
        }
    }

    // ------------------------------------------------------------ receiving

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        loop {
            let must_consume = self.consume_pending > 0
                && (self.peek_off.is_none()
                    || self.consume_pending >= CONSUME_BATCH_BYTES
                    || matches!(self.recv, Recv::Discard { .. }));
            if must_consume && !self.consume(cx) {
                return progress;
            }
            let step = match self.recv {
                Recv::Headers => self.recv_headers(cx),
                Recv::Payload { slot, received } => self.recv_payload(cx, slot, received),
                Recv::Discard { slot, remaining } => self.recv_discard(cx, slot, remaining),
                Recv::Stopped => false,
            };
            if !step {
                // About to wait (for the client's bytes, a slot or a
                // buffer): read out every accepted byte first. Bytes left
                // in the socket keep their whole segment charged to the
                // receive buffer, so the kernel may advertise a zero window
                // (it keeps the window shut while the free space is below
                // the largest segment seen), and a client blocked sending
                // the rest of a request would never send it. Found with a
                // batch peek that ended inside a header: 8 bytes left of a
                // 52 KiB segment, the client's send queue full, both sides
                // waiting.
                if self.consume_pending > 0 && !matches!(self.recv, Recv::Stopped) {
                    self.consume(cx);
                }
                return progress;
            }
            progress = true;
        }
    }

    /// Drops the `consume_pending` bytes already parsed from a peek.
    fn consume(&mut self, cx: &mut Context<'_>) -> bool {
        while self.consume_pending > 0 {
            // Peeked, so there: read without waiting for readiness; nothing
            // to copy (headers parsed, payloads already in their buffers).
            match crate::sock::discard(self.stream, self.consume_pending, true) {
                Ok(Got::Bytes(0)) => {
                    self.stop("client closed the connection");
                    return false;
                }
                Ok(Got::Bytes(m)) => {
                    self.consume_pending -= m;
                    self.consumed(m);
                }
                Ok(Got::WouldBlock) => match self.readable(cx) {
                    Readable::Again => {}
                    Readable::Pending | Readable::Failed => return false,
                },
                Err(_) => {
                    self.stop("read failed");
                    return false;
                }
            }
        }
        true
    }

    /// After a read found nothing: waits for readiness (registering the
    /// waker), or stops the connection if the socket failed.
    fn readable(&mut self, cx: &mut Context<'_>) -> Readable {
        match self.stream.poll_read_ready(cx) {
            Poll::Pending => Readable::Pending,
            Poll::Ready(Err(_)) => {
                self.stop("read failed");
                Readable::Failed
            }
            Poll::Ready(Ok(())) => Readable::Again,
        }
    }

    /// `m` bytes were read (consumed) from the socket: the kernel moved the
    /// peek offset back by as much, down to zero.
    fn consumed(&mut self, m: usize) {
        if let Some(off) = self.peek_off.as_mut() {
            *off = off.saturating_sub(m);
        }
        self.seen = self.seen.saturating_sub(m);
    }

    /// Makes the next peek start right after the parsed headers. Normally
    /// it already does; it does not after a peek that went past what was
    /// accepted (a header without a buffer yet, a tiny payload followed by
    /// more requests). `false`: without a peek offset, consume first; or the
    /// connection stopped.
    fn align_peek(&mut self) -> bool {
        match self.peek_off {
            Some(off) if off == self.consume_pending => true,
            Some(_) => match crate::sock::set_peek_off(self.stream, self.consume_pending) {
                Ok(()) => {
                    self.peek_off = Some(self.consume_pending);
                    true
                }
                Err(e) => {
                    // It was accepted when the connection started: the
                    // stream position is no longer known for sure.
                    tracing::warn!(error = %e, "closing connection: cannot set the peek offset");
                    self.stop("peek offset refused");
                    false
                }
            },
            None => self.consume_pending == 0,
        }
    }

    /// The front request has no buffer yet: make sure something wakes us.
    fn no_buffer(&mut self, cx: &mut Context<'_>) {
        match self.buf_wait.as_mut().map(|w| w.as_mut().poll(cx)) {
            // Registered in the pool's FIFO: its release wakes us.
            Some(Poll::Pending) => {}
            Some(Poll::Ready(r)) => {
                self.wait_done(r, cx);
                cx.waker().wake_by_ref();
            }
            // Not even queued (too many waiters): poll again shortly.
            None => self.arm_retry(cx),
        }
    }

    fn wait_done(&mut self, r: Result<Buffer, BufferError>, cx: &mut Context<'_>) {
        self.buf_wait = None;
        match r {
            // The pool's queue is full: back off, then try again.
            Err(BufferError::TooManyWaiters { .. }) => self.arm_retry(cx),
            r => self.waited = Some(r),
        }
    }

    fn arm_retry(&mut self, cx: &mut Context<'_>) {
        if !self.retry_armed {
            let at = Instant::now() + Duration::from_millis(BUFFER_RETRY_INTERVAL_MS);
            self.retry.as_mut().reset(at);
            self.retry_armed = true;
            if self.retry.as_mut().poll(cx).is_ready() {
                self.retry_armed = false;
                cx.waker().wake_by_ref();
            }
        }
    }

    fn recv_headers(&mut self, cx: &mut Context<'_>) -> bool {
        let free = self.free.len();
        if free == 0 || self.buf_wait.is_some() {
            return false;
        }
        if self.hdr_have == REQUEST_HEADER_BYTES {
            // A whole header arrived with the previous write's payload.
            let h = match RequestHeader::parse(&self.hdr_buf) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: stream out of sync");
                    self.stop("bad request magic");
                    return true;
                }
            };
            return match self.admit(&h) {
                Admit::NoBuffer => {
                    self.no_buffer(cx);
                    false
                }
                Admit::Next | Admit::Last => {
                    self.hdr_have = 0;
                    true
                }
            };
        }
        if !self.align_peek() {
            // Consume first (the caller's loop does), then peek; or stopped.
            return true;
        }
        // Not with a buffer from a finished pool wait at hand: it is for the
        // header at the front, which the plain path admits.
        if self.batch_len > 0
            && self.hdr_have == 0
            && self.peek_off.is_some()
            && self.waited.is_none()
        {
            if let Some(progress) = self.recv_batch(cx, self.batch_len) {
                return progress;
            }
        }
        let want = (free * REQUEST_HEADER_BYTES - self.hdr_have).min(self.scratch.len());
        // Where this peek starts, past the next unread byte.
        let start = self.peek_off.unwrap_or(0);
        let present = self.seen > start || std::mem::take(&mut self.force_peek);
        let n = loop {
            match crate::sock::peek(self.stream, &mut self.scratch[..want], present) {
                Ok(Got::Bytes(n)) => break n,
                Ok(Got::WouldBlock) => match self.readable(cx) {
                    Readable::Again => {}
                    Readable::Pending => return false,
                    Readable::Failed => return true,
                },
                Err(_) => {
                    self.stop("read failed");
                    return true;
                }
            }
        };
        self.seen = self.seen.max(start + n);
        if let Some(off) = self.peek_off.as_mut() {
            *off += n;
        }
        if n == 0 {
            self.stop("client closed the connection");
            return true;
        }
        let mut pos = 0;
        while !self.free.is_empty() && matches!(self.recv, Recv::Headers) {
            let need = REQUEST_HEADER_BYTES - self.hdr_have;
            if n - pos < need {
                // A partial header: header bytes only, safe to consume.
                let k = n - pos;
                self.hdr_buf[self.hdr_have..self.hdr_have + k]
                    .copy_from_slice(&self.scratch[pos..n]);
                self.hdr_have += k;
                pos = n;
                break;
            }
            let parsed = if self.hdr_have > 0 {
                self.hdr_buf[self.hdr_have..].copy_from_slice(&self.scratch[pos..pos + need]);
                RequestHeader::parse(&self.hdr_buf)
            } else {
                RequestHeader::parse(&self.scratch[pos..pos + need])
            };
            let h = match parsed {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: stream out of sync");
                    self.stop("bad request magic");
                    return true;
                }
            };
            match self.admit(&h) {
                Admit::NoBuffer => {
                    self.no_buffer(cx);
                    break;
                }
                Admit::Next => {}
                Admit::Last => {
                    pos += need;
                    self.hdr_have = 0;
                    break;
                }
            }
            pos += need;
            self.hdr_have = 0;
        }
        self.consume_pending += pos;
        pos > 0 || matches!(self.recv, Recv::Stopped)
    }

    /// The buffer for the request at the front of the socket: from a
    /// finished wait, at once, or after a FIFO wait in the pool
    /// (`Ok(None)`: not yet; the header stays unread meanwhile).
    fn buffer(&mut self, len: u32) -> Result<Option<Buffer>, BufferError> {
        match self.waited.take() {
            Some(Ok(b)) if b.len() == len as usize => return Ok(Some(b)),
            Some(Ok(_)) | None => {}
            Some(Err(e)) => return Err(e),
        }
        match self.pool.alloc(len as usize) {
            Ok(b) => Ok(Some(b)),
            // Refused a place in the queue recently: the timer will retry.
            Err(_) if self.retry_armed => Ok(None),
            Err(_) => {
                let pool: &'a Arc<BufferPool> = self.pool;
                self.buf_wait = Some(Box::pin(pool.alloc_wait(len as usize)));
                Ok(None)
            }
        }
    }

    /// Acts on one request header (already framed).
    fn admit(&mut self, h: &RequestHeader) -> Admit {
        let e = &self.session.export;
        let view = ExportView {
            size: e.size(),
            read_only: self.session.read_only,
            can_trim: self.session.can_trim,
            can_write_zeroes: self.session.can_write_zeroes,
            structured: self.session.structured,
            block_status: self.session.block_status,
            online: e.online(),
            payload_max: self.session.payload_max,
        };
        let disk = e.disk();
        match judge(h, &view) {
            Verdict::Disconnect => {
                self.stop("client disconnected (NBD_CMD_DISC)");
                Admit::Last
            }
            Verdict::Close { reason } => {
                tracing::warn!(reason, len = h.len, "closing connection");
                self.stop(reason);
                Admit::Last
            }
            Verdict::Reject { errno, discard } => {
                let i = self.take_slot(h);
                if discard > 0 {
                    self.slots[i].errno = errno;
                    self.slots[i].state = SlotState::Receiving;
                    self.recv = Recv::Discard {
                        slot: i,
                        remaining: discard as u64,
                    };
                    Admit::Last
                } else {
                    self.reply_reject(i, errno);
                    Admit::Next
                }
            }
            Verdict::Execute => self.execute(h, disk),
        }
    }

    fn execute(&mut self, h: &RequestHeader, disk: DiskId) -> Admit {
        let cmd = h.command();
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (h.offset, h.len);
        let needs_buf = matches!(cmd, Command::Read | Command::Write) && len > 0;
        let buf = if needs_buf {
            if (len as usize).div_ceil(PAGE_SIZE) > self.pool.page_count() {
                // Could never be satisfied: refuse instead of waiting forever.
                let i = self.take_slot(h);
                if cmd == Command::Write {
                    self.slots[i].errno = NBD_ENOMEM;
                    self.slots[i].state = SlotState::Receiving;
                    self.recv = Recv::Discard {
                        slot: i,
                        remaining: len as u64,
                    };
                    return Admit::Last;
                }
                self.reply_reject(i, NBD_ENOMEM);
                return Admit::Next;
            }
            match self.buffer(len) {
                Ok(Some(b)) => Some(b),
                Ok(None) => return Admit::NoBuffer,
                Err(e) => {
                    // The pool can never grant it: refuse, as if oversized.
                    tracing::warn!(error = %e, len, "request refused: no buffer possible");
                    let i = self.take_slot(h);
                    if cmd == Command::Write {
                        self.slots[i].errno = NBD_ENOMEM;
                        self.slots[i].state = SlotState::Receiving;
                        self.recv = Recv::Discard {
                            slot: i,
                            remaining: len as u64,
                        };
                        return Admit::Last;
                    }
                    self.reply_reject(i, NBD_ENOMEM);
                    return Admit::Next;
                }
            }
        } else {
            None
        };
        let i = self.take_slot(h);
        let payloadless = len == 0 && cmd != Command::Flush && cmd != Command::BlockStatus;
        if payloadless || cmd == Command::Cache {
            // Nothing to do: empty ranges succeed, CACHE is an accepted no-op.
            self.reply_ok(i);
            return Admit::Next;
        }
        let mut flags = IoFlags {
            fua,
            no_unmap: h.flags & CMD_FLAG_NO_HOLE != 0,
            ..IoFlags::default()
        };
        let op = match cmd {
            Command::Read => {
                let buf = buf.expect("allocated above");
                Op::Io(IoRequest::read(disk, offset, buf))
            }
            Command::Write => {
                let s = &mut self.slots[i];
                s.data = buf;
                s.state = SlotState::Receiving;
                self.recv = Recv::Payload {
                    slot: i,
                    received: 0,
                };
                return Admit::Last;
            }
            Command::Flush => Op::Io(IoRequest::flush(disk)),
            Command::Trim => {
                flags.no_unmap = false;
                let mut r = IoRequest::unmap(disk, offset, len as u64);
                r.flags = flags;
                Op::Io(r)
            }
            Command::WriteZeroes => {
                Op::Io(IoRequest::write_zeroes(disk, offset, len as u64, flags))
            }
            Command::BlockStatus => Op::Status {
                disk,
                offset,
                len: len as u64,
            },
            Command::Cache | Command::Disc | Command::Unknown(_) => {
                unreachable!("judged before execution")
            }
        };
        self.run(i, op);
        Admit::Next
    }

    /// The payload of the WRITE in `slot` is all in its buffer: run it.
    fn payload_done(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        let buf = s.data.take().expect("payload buffer");
        let fua = s.flags & CMD_FLAG_FUA != 0;
        let req = IoRequest::write(self.session.export.disk(), s.offset, buf, fua);
        self.recv = Recv::Headers;
        self.run(slot, Op::Io(req));
    }

    /// One peek for a batch of WRITEs: while the last request was a WRITE
    /// of `len` bytes, the next ones probably are too (a client's queue of
    /// random writes), so the peek's iovecs alternate a header's space and
    /// a buffer of `len` bytes, allocated in advance, for as many requests
    /// as the last batch suggested. Each header that is indeed such a WRITE
    /// gets its buffer with its payload already in it; the first that is
    /// not ends the batch (what the peek put after it is ignored and peeked
    /// again from the right place). The accepted bytes are thrown away
    /// later in one `MSG_TRUNC` call. So a batch of `k` writes costs two
    /// system calls instead of a `readv` each, and no extra copy: the
    /// payload moves once, from the socket into its pages.
    ///
    /// `None`: no buffer for even one request now; use the plain peek.
    fn recv_batch(&mut self, cx: &mut Context<'_>, len: usize) -> Option<bool> {
        let start = self.peek_off.unwrap_or(0);
        let mut present = self.seen > start || self.force_peek;
        if !present {
            // Nothing known to be there: do not allocate for nothing.
            match self.readable(cx) {
                Readable::Again => {}
                Readable::Pending => return Some(false),
                Readable::Failed => return Some(true),
            }
        }
        let unit = REQUEST_HEADER_BYTES + len;
        let iovs = 1 + len.div_ceil(PAGE_SIZE);
        let count = self
            .batch_guess
            .min(self.free.len())
            .min(BATCH_BYTES_MAX / unit)
            .min(BATCH_IOV_MAX / iovs)
            .max(1);
        debug_assert!(self.batch_bufs.is_empty());
        while self.batch_bufs.len() < count {
            match self.pool.alloc(len) {
                Ok(b) => self.batch_bufs.push(b),
                Err(_) => break,
            }
        }
        if self.batch_bufs.is_empty() {
            return None;
        }
        let count = self.batch_bufs.len();
        self.force_peek = false;
        let stream = self.stream;
        let n = loop {
            let mut iov: [IoSliceMut<'_>; BATCH_IOV_MAX] =
                std::array::from_fn(|_| IoSliceMut::new(&mut []));
            let mut k = 0;
            for (hdr, buf) in self.batch_hdrs.iter_mut().zip(self.batch_bufs.iter_mut()) {
                iov[k] = IoSliceMut::new(hdr);
                k += 1;
                for seg in buf.segments_mut() {
                    iov[k] = IoSliceMut::new(seg);
                    k += 1;
                }
            }
            match crate::sock::peekv(stream, &mut iov[..k], present) {
                Ok(Got::Bytes(n)) => break n,
                Ok(Got::WouldBlock) => match self.readable(cx) {
                    Readable::Again => present = false,
                    Readable::Pending => {
                        self.batch_bufs.clear();
                        return Some(false);
                    }
                    Readable::Failed => {
                        self.batch_bufs.clear();
                        return Some(true);
                    }
                },
                Err(_) => {
                    self.batch_bufs.clear();
                    self.stop("read failed");
                    return Some(true);
                }
            }
        };
        self.seen = self.seen.max(start + n);
        if let Some(off) = self.peek_off.as_mut() {
            *off += n;
        }
        if n == 0 {
            self.batch_bufs.clear();
            self.stop("client closed the connection");
            return Some(true);
        }
        self.batch_stats.peeks += 1;
        // Bytes of the peek accepted (parsed headers, received payloads).
        let mut pos = 0;
        let mut whole = 0;
        let mut bufs = std::mem::take(&mut self.batch_bufs);
        for (j, buf) in bufs.drain(..).enumerate() {
            let rest = n - pos;
            if rest < REQUEST_HEADER_BYTES {
                // A partial header: header bytes only, safe to consume.
                self.hdr_buf[..rest].copy_from_slice(&self.batch_hdrs[j][..rest]);
                self.hdr_have = rest;
                pos += rest;
                break;
            }
            let h = match RequestHeader::parse(&self.batch_hdrs[j]) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "closing connection: stream out of sync");
                    self.stop("bad request magic");
                    break;
                }
            };
            let fits = h.command() == Command::Write && h.len as usize == len;
            if fits {
                // `execute` takes the buffer as if a pool wait had given it.
                self.waited = Some(Ok(buf));
            }
            let admitted = self.admit(&h);
            let took = fits && self.waited.is_none();
            self.waited = None;
            match admitted {
                Admit::NoBuffer => {
                    self.no_buffer(cx);
                    break;
                }
                // Not a payload in this buffer: what follows is elsewhere.
                Admit::Next => {
                    pos += REQUEST_HEADER_BYTES;
                    break;
                }
                Admit::Last => pos += REQUEST_HEADER_BYTES,
            }
            let Recv::Payload { slot, .. } = self.recv else {
                // Refused (its payload is discarded from the socket) or stopped.
                break;
            };
            if !took {
                // A WRITE of another length: its own buffer, read as usual.
                break;
            }
            let got = (n - pos).min(len);
            pos += got;
            self.batch_stats.writes += 1;
            if got < len {
                self.recv = Recv::Payload {
                    slot,
                    received: got,
                };
                break;
            }
            self.payload_done(slot);
            whole += 1;
        }
        self.batch_bufs = bufs;
        self.consume_pending += pos;
        self.batch_guess = if whole == count {
            (count * 2).min(BATCH_REQUESTS_MAX)
        } else {
            (whole + 1).clamp(2, BATCH_REQUESTS_MAX)
        };
        Some(pos > 0 || matches!(self.recv, Recv::Stopped))
    }

    fn recv_payload(&mut self, cx: &mut Context<'_>, slot: usize, mut received: usize) -> bool {
        let stream = self.stream;
        loop {
            // Bytes peeked earlier are there even if readiness was cleared.
            let present = self.seen > 0;
            let got = {
                let buf = self.slots[slot]
                    .data
                    .as_mut()
                    .expect("a receiving write slot holds its buffer");
                let mut iov: [IoSliceMut<'_>; RECV_IOV_MAX + 2] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                let mut k = 0;
                // Headers parsed from peeks and not consumed yet come first
                // on the wire: the same readv throws them away.
                let pending = self.consume_pending;
                if pending > 0 {
                    iov[0] = IoSliceMut::new(&mut self.scratch[..pending]);
                    k = 1;
                }
                let mut skip = received;
                let mut whole_rest = true;
                for seg in buf.segments_mut() {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    if k == RECV_IOV_MAX + 1 {
                        whole_rest = false;
                        break;
                    }
                    iov[k] = IoSliceMut::new(&mut seg[skip..]);
                    skip = 0;
                    k += 1;
                }
                // What follows a payload on the wire is the next request
                // header (never payload bytes), so once the iovecs cover the
                // rest of the payload the same readv may fetch it: a stream
                // of writes costs one system call per write. Not after a
                // write short enough to batch: the next header is left for
                // the batch peek, which fetches it with its payload.
                debug_assert_eq!(self.hdr_have, 0);
                if whole_rest && self.batch_len == 0 {
                    iov[k] = IoSliceMut::new(&mut self.hdr_buf[..]);
                    k += 1;
                }
                crate::sock::readv(stream, &mut iov[..k], present)
            };
            match got {
                Ok(Got::Bytes(0)) => {
                    self.stop("client closed the connection inside a write payload");
                    return true;
                }
                Ok(Got::Bytes(mut m)) => {
                    self.consumed(m);
                    let thrown = m.min(self.consume_pending);
                    self.consume_pending -= thrown;
                    m -= thrown;
                    let s = &mut self.slots[slot];
                    let len = s.len as usize;
                    received += m;
                    if received >= len {
                        self.hdr_have = received - len;
                        self.payload_done(slot);
                        return true;
                    }
                    self.recv = Recv::Payload { slot, received };
                }
                Ok(Got::WouldBlock) => match self.readable(cx) {
                    Readable::Again => {}
                    Readable::Pending => {
                        self.recv = Recv::Payload { slot, received };
                        return false;
                    }
                    Readable::Failed => return true,
                },
                Err(_) => {
                    self.stop("read failed");
                    return true;
                }
            }
        }
    }

    fn recv_discard(&mut self, cx: &mut Context<'_>, slot: usize, mut remaining: u64) -> bool {
        loop {
            // Thrown away in the kernel: no copy into scratch memory.
            let k = remaining.min(DISCARD_CHUNK_BYTES as u64) as usize;
            let present = self.seen > 0;
            match crate::sock::discard(self.stream, k, present) {
                Ok(Got::Bytes(0)) => {
                    self.stop("client closed the connection inside a write payload");
                    return true;
                }
                Ok(Got::Bytes(m)) => {
                    self.consumed(m);
                    remaining -= m as u64;
                    if remaining == 0 {
                        self.recv = Recv::Headers;
                        let errno = self.slots[slot].errno;
                        self.reply_reject(slot, errno);
                        return true;
                    }
                    self.recv = Recv::Discard { slot, remaining };
                }
                Ok(Got::WouldBlock) => match self.readable(cx) {
                    Readable::Again => {}
                    Readable::Pending => {
                        self.recv = Recv::Discard { slot, remaining };
                        return false;
                    }
                    Readable::Failed => return true,
                },
                Err(_) => {
                    self.stop("read failed");
                    return true;
                }
            }
        }
    }
}

/// Fills `iov` with the queued replies' bytes, skipping the `skip` bytes of
/// the first one already sent. Returns the number of slices used.
fn gather<'s>(
    slots: &'s SlotTable<'_>,
    sendq: &VecDeque<usize>,
    mut skip: usize,
    iov: &mut [IoSlice<'s>],
) -> usize {
    let mut n = 0;
    for &i in sendq {
        for piece in slots[i].pieces() {
            if piece.is_empty() {
                continue;
            }
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            iov[n] = IoSlice::new(&piece[skip..]);
            skip = 0;
            n += 1;
            if n == iov.len() {
                return n;
            }
        }
    }
    n
}
