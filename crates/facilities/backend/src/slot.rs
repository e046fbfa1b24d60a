//! Request slots: the fixed table of in-flight operation contexts.
//!
//! Every operation an engine runs lives in one [`Slot`] from a table sized at
//! start-up (`queue_depth_max`), so the data path allocates nothing: the
//! iovecs, the buffer, the result and the waker all sit in the slot. The slots
//! are the back end's per-request control blocks, and like every data-path
//! object they are objects of an object pool: the indices of free slots form
//! a base pool ([`sanvirt_objpool::Pool`], rank
//! [`ranks::DEVICE_CONTROL_BLOCK`]). A request reserves and allocates one; a
//! request that finds every slot busy waits for one in the pool's FIFO queue
//! (explicit backpressure, never an unbounded queue).
//!
//! # Ownership protocol (the `state` word)
//!
//! * `IDLE`: the slot is on the free list or held by the submitter that
//!   popped it; only that submitter touches `op`.
//! * `IN_FLIGHT`: the submitter handed the slot to an engine
//!   ([`crate::engine::Engine::start`]); only the engine touches `op` (and the
//!   kernel touches the memory the iovecs describe).
//! * `DONE`: the engine stored the result and gave the slot back; only the
//!   awaiting [`InFlight`] future touches `op`, then frees the slot.
//! * `ABANDONED`: the future was dropped while the operation ran (request
//!   cancelled). The engine's completion then frees the slot itself, dropping
//!   the buffer only after the kernel is done with its pages. This is what
//!   makes cancellation safe: pages are never returned to the pool while a
//!   `preadv` or an io_uring SQE may still write into them.
//!
//! The engine publishes `DONE` with a release swap after writing `op`; the
//! future reads `op` after an acquire load of `DONE`. Completion wakes the
//! task through the slot's `AtomicWaker`: one atomic swap and the runtime's
//! own wake, no allocation, no channel.

use std::cell::UnsafeCell;
use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use sanvirt_buffer::Buffer;
use sanvirt_objpool::{ranks, Pool};

use crate::mdisk::Mdisk;
use crate::sys::{self, Errno};

/// Iovecs one slot holds; a longer scatter list is sent in several calls.
pub const IOVECS_PER_SLOT: usize = 256;
const _: () = assert!(IOVECS_PER_SLOT <= sys::IOV_MAX);

/// Largest slot table a back end may be built with.
pub const QUEUE_DEPTH_MAX: usize = 4096;

/// Bytes of the static zero block used to write zeroes without fallocate.
const ZERO_BLOCK_BYTES: usize = 64 << 10;

#[repr(C, align(4096))]
struct ZeroBlock([u8; ZERO_BLOCK_BYTES]);
/// Read-only zeros, aligned for direct I/O; the kernel only reads it.
static ZEROS: ZeroBlock = ZeroBlock([0; ZERO_BLOCK_BYTES]);

const IDLE: u8 = 0;
const IN_FLIGHT: u8 = 1;
const DONE: u8 = 2;
const ABANDONED: u8 = 3;

/// What an operation does. `Read`/`Write`/`WriteZeroPages` move `len` bytes
/// at `offset`; the rest are single calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write {
        dsync: bool,
    },
    /// Writes `len` zero bytes from the static zero block.
    WriteZeroPages {
        dsync: bool,
    },
    /// `fdatasync`.
    Sync,
    Fallocate {
        mode: i32,
    },
    /// `BLKDISCARD` (block devices).
    Discard,
    /// `BLKZEROOUT` (block devices).
    ZeroOut,
}

impl OpKind {
    pub fn moves_data(self) -> bool {
        matches!(
            self,
            OpKind::Read | OpKind::Write { .. } | OpKind::WriteZeroPages { .. }
        )
    }

    pub fn rw_flags(self) -> i32 {
        match self {
            OpKind::Write { dsync: true } | OpKind::WriteZeroPages { dsync: true } => {
                libc::RWF_DSYNC
            }
            _ => 0,
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    Ok,
    /// The system call failed with this errno.
    Errno(Errno),
    /// A read hit end of file before `len` bytes: the file shrank under us.
    Eof,
}

/// One operation's context. See the module docs for who may touch it when.
pub struct Op {
    pub kind: OpKind,
    pub fd: RawFd,
    pub offset: u64,
    pub len: u64,
    /// Bytes transferred so far (short transfers continue from here).
    pub done: u64,
    pub status: OpStatus,
    pub buf: Option<Buffer>,
    /// Keeps the mdisk, and so `fd`, open while the operation runs, even if
    /// the mdisk is closed meanwhile.
    pub mdisk: Option<Arc<Mdisk>>,
    pub iov: [libc::iovec; IOVECS_PER_SLOT],
    pub iov_cnt: usize,
}

// SAFETY: the raw pointers in `iov` point into the buffer the op owns (or the
// static zero block); the op moves between threads only as described in the
// module docs, with exactly one owner at a time.
unsafe impl Send for Op {}

impl Op {
    fn empty() -> Op {
        Op {
            kind: OpKind::Sync,
            fd: -1,
            offset: 0,
            len: 0,
            done: 0,
            status: OpStatus::Ok,
            buf: None,
            mdisk: None,
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOVECS_PER_SLOT],
            iov_cnt: 0,
        }
    }

    /// Fills `iov` with the next run of the transfer, from byte `done`, at
    /// most [`IOVECS_PER_SLOT`] entries; adjacent pages merge into one entry.
    /// Returns the iovecs.
    pub fn fill_iov(&mut self) -> &[libc::iovec] {
        let mut cnt = 0usize;
        let mut skip = self.done as usize;
        let remaining = (self.len - self.done) as usize;
        let mut covered = 0usize;
        let iov = &mut self.iov;
        let mut push = |ptr: *mut u8, n: usize| -> bool {
            if cnt > 0 {
                let last = &mut iov[cnt - 1];
                // SAFETY: pointer arithmetic only, to compare addresses.
                if unsafe { (last.iov_base as *mut u8).add(last.iov_len) } == ptr {
                    last.iov_len += n;
                    return true;
                }
            }
            if cnt == IOVECS_PER_SLOT {
                return false;
            }
            iov[cnt] = libc::iovec {
                iov_base: ptr.cast(),
                iov_len: n,
            };
            cnt += 1;
            true
        };
        match self.kind {
            OpKind::Read => {
                let buf = self.buf.as_mut().expect("read op has a buffer");
                for seg in buf.segments_mut() {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    let n = seg.len() - skip;
                    // SAFETY: skip < seg.len(), so the pointer stays in the segment.
                    if !push(unsafe { seg.as_mut_ptr().add(skip) }, n) {
                        break;
                    }
                    skip = 0;
                    covered += n;
                }
            }
            OpKind::Write { .. } => {
                let buf = self.buf.as_ref().expect("write op has a buffer");
                for seg in buf.segments() {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    let n = seg.len() - skip;
                    // SAFETY: as above. The kernel only reads through this
                    // pointer (pwritev), so casting away const is sound.
                    if !push(unsafe { seg.as_ptr().add(skip) } as *mut u8, n) {
                        break;
                    }
                    skip = 0;
                    covered += n;
                }
            }
            OpKind::WriteZeroPages { .. } => {
                let mut left = remaining;
                while left > 0 {
                    let n = left.min(ZERO_BLOCK_BYTES);
                    // Never merge: each entry restarts at the block's start.
                    if cnt == IOVECS_PER_SLOT {
                        break;
                    }
                    iov[cnt] = libc::iovec {
                        iov_base: ZEROS.0.as_ptr() as *mut libc::c_void,
                        iov_len: n,
                    };
                    cnt += 1;
                    left -= n;
                    covered += n;
                }
            }
            _ => {}
        }
        debug_assert!(covered <= remaining);
        self.iov_cnt = cnt;
        &self.iov[..cnt]
    }

    /// Accounts `n` transferred bytes; true when the transfer is complete.
    pub fn advance(&mut self, n: usize) -> bool {
        self.done += n as u64;
        debug_assert!(self.done <= self.len);
        self.done >= self.len
    }

    /// Runs the operation to its end with blocking system calls (thread pool
    /// engine, and the io_uring engine's helper for ioctls). Short transfers
    /// continue, `EINTR` is retried in [`sys`].
    pub fn execute_blocking(&mut self) {
        self.status = match self.kind {
            OpKind::Read | OpKind::Write { .. } | OpKind::WriteZeroPages { .. } => {
                self.transfer_blocking()
            }
            OpKind::Sync => status(sys::fdatasync(self.fd)),
            OpKind::Fallocate { mode } => {
                status(sys::fallocate(self.fd, mode, self.offset, self.len))
            }
            OpKind::Discard => status(sys::blk_discard(self.fd, self.offset, self.len)),
            OpKind::ZeroOut => status(sys::blk_zeroout(self.fd, self.offset, self.len)),
        };
    }

    fn transfer_blocking(&mut self) -> OpStatus {
        let flags = self.kind.rw_flags();
        let read = self.kind == OpKind::Read;
        while self.done < self.len {
            let fd = self.fd;
            let at = self.offset + self.done;
            let iov = self.fill_iov();
            let r = if read {
                sys::preadv2(fd, iov, at, flags)
            } else {
                sys::pwritev2(fd, iov, at, flags)
            };
            match r {
                Ok(0) if read => return OpStatus::Eof,
                Ok(0) => return OpStatus::Errno(libc::EIO),
                Ok(n) => {
                    self.advance(n);
                }
                Err(e) => return OpStatus::Errno(e),
            }
        }
        OpStatus::Ok
    }
}

fn status(r: Result<(), Errno>) -> OpStatus {
    match r {
        Ok(()) => OpStatus::Ok,
        Err(e) => OpStatus::Errno(e),
    }
}

/// One entry of the slot table.
pub struct Slot {
    state: AtomicU8,
    waker: AtomicWaker,
    op: UnsafeCell<Op>,
}

/// The fixed table of operation contexts of one back end.
pub struct Slots {
    slots: Box<[Slot]>,
    /// Indices of the free slots.
    free: Pool<u32>,
}

// SAFETY: `op` is only accessed by the single owner the state protocol (module
// docs) designates; ownership changes hands through atomics with
// release/acquire ordering (the state word, the engines' queues and locks).
unsafe impl Sync for Slots {}
unsafe impl Send for Slots {}

impl Slots {
    pub fn new(count: usize) -> Arc<Slots> {
        assert!(count > 0 && count <= QUEUE_DEPTH_MAX);
        let free = Pool::base(
            "backend.slots",
            ranks::DEVICE_CONTROL_BLOCK,
            (0..count as u32).collect(),
        );
        Arc::new(Slots {
            slots: (0..count)
                .map(|_| Slot {
                    state: AtomicU8::new(IDLE),
                    waker: AtomicWaker::new(),
                    op: UnsafeCell::new(Op::empty()),
                })
                .collect(),
            free,
        })
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots on the free list.
    pub fn idle(&self) -> usize {
        self.free.free_objects()
    }

    /// The pool the free slots are objects of.
    pub fn pool(&self) -> &Pool<u32> {
        &self.free
    }

    /// Takes a free slot, waiting for one if all are busy. Fails only if
    /// the pool's wait queue is full ([`sanvirt_objpool::WAITERS_MAX`]).
    pub async fn acquire(self: &Arc<Self>) -> Result<SlotGuard, sanvirt_objpool::PoolError> {
        if self.free.try_reserve_detached(1).is_err() {
            // Every slot busy (or waiters ahead of us): wait in FIFO order.
            self.free.reserve_detached(1).await?;
        }
        let idx = self.free.allocate_detached();
        debug_assert_eq!(self.slots[idx as usize].state.load(Ordering::Relaxed), IDLE);
        Ok(SlotGuard {
            slots: Arc::clone(self),
            idx,
        })
    }

    /// The operation of slot `idx`.
    ///
    /// # Safety
    /// The caller must be the slot's current owner per the state protocol
    /// (engine while `IN_FLIGHT`, submitter while `IDLE` and held).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn op(&self, idx: u32) -> &mut Op {
        &mut *self.slots[idx as usize].op.get()
    }

    /// Called by an engine when the operation of slot `idx` is over (its
    /// `status` and `done` set). Gives the slot back to the awaiting future,
    /// or frees it if the future is gone.
    pub fn complete(&self, idx: u32) {
        let slot = &self.slots[idx as usize];
        match slot.state.swap(DONE, Ordering::AcqRel) {
            IN_FLIGHT => slot.waker.wake(),
            ABANDONED => self.release(idx),
            s => unreachable!("slot {idx} completed in state {s}"),
        }
    }

    fn release(&self, idx: u32) {
        // SAFETY: called by the last owner of the slot (the future after DONE,
        // or the engine after ABANDONED); nobody else holds it.
        let op = unsafe { self.op(idx) };
        op.buf = None;
        op.mdisk = None;
        self.slots[idx as usize]
            .state
            .store(IDLE, Ordering::Release);
        self.free.free_detached(idx);
        self.free.unreserve_detached(1);
    }
}

/// A slot held by a submitter that has not started it yet.
pub struct SlotGuard {
    slots: Arc<Slots>,
    idx: u32,
}

impl SlotGuard {
    pub fn op(&mut self) -> &mut Op {
        // SAFETY: the guard owns the IDLE slot exclusively.
        unsafe { self.slots.op(self.idx) }
    }

    /// Hands the slot to an engine via `start` and returns the future that
    /// resolves when the engine completes it.
    pub fn start(self, start: impl FnOnce(u32)) -> InFlight {
        let idx = self.idx;
        let slots = Arc::clone(&self.slots);
        std::mem::forget(self);
        slots.slots[idx as usize]
            .state
            .store(IN_FLIGHT, Ordering::Relaxed);
        // The engine's queue or lock publishes `op` to the engine thread.
        start(idx);
        InFlight {
            slots,
            idx,
            finished: false,
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.idx);
    }
}

/// What a finished operation hands back.
pub struct Finished {
    pub status: OpStatus,
    pub done: u64,
    pub buf: Option<Buffer>,
}

/// Resolves when the engine completes the slot's operation.
pub struct InFlight {
    slots: Arc<Slots>,
    idx: u32,
    finished: bool,
}

impl InFlight {
    fn take(&mut self) -> Finished {
        // SAFETY: state is DONE (acquire-loaded by the caller), so this future
        // owns the slot.
        let op = unsafe { self.slots.op(self.idx) };
        let out = Finished {
            status: op.status,
            done: op.done,
            buf: op.buf.take(),
        };
        self.finished = true;
        self.slots.release(self.idx);
        out
    }
}

impl Future for InFlight {
    type Output = Finished;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished> {
        assert!(!self.finished, "InFlight polled after completion");
        let slot = &self.slots.slots[self.idx as usize];
        // Fast path: completed before we ever registered a waker (inline
        // completions), so no waker clone at all.
        if slot.state.load(Ordering::Acquire) == DONE {
            return Poll::Ready(self.take());
        }
        slot.waker.register(cx.waker());
        if slot.state.load(Ordering::Acquire) == DONE {
            return Poll::Ready(self.take());
        }
        Poll::Pending
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let slot = &self.slots.slots[self.idx as usize];
        if slot.state.swap(ABANDONED, Ordering::AcqRel) == DONE {
            // Completed after our last poll: we own it and free it.
            self.slots.release(self.idx);
        }
    }
}
