//! Engine (b): one io_uring driven by one dedicated ring thread.
//!
//! Why a dedicated thread rather than submitting from the async tasks: an
//! io_uring read or write that completes asynchronously (direct I/O, a
//! page-cache miss) posts its completion through task work queued to the
//! thread that *submitted* it. If tokio workers submitted, every device
//! completion would first have to interrupt a tokio worker, then wake a
//! reaper. With one ring thread that both submits and waits, completions run
//! in the thread that is already waiting for them, and the ring can be set
//! up `SINGLE_ISSUER | DEFER_TASKRUN` (Linux 6.1+) so the kernel batches that
//! task work until the thread asks for completions.
//!
//! Submission: the slot index goes on a bounded queue; if the ring thread is
//! asleep in `io_uring_enter`, the submitter writes an eventfd that the ring
//! has a read outstanding on, which wakes it. Completion: the ring thread
//! completes the slot, which wakes the awaiting task directly.
//!
//! Block-device ioctls (`BLKDISCARD`, `BLKZEROOUT`) have no io_uring opcode;
//! they go to a one-thread [`PoolEngine`] helper.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, squeue, types, IoUring};

use super::pool::PoolEngine;
use crate::slot::{OpKind, OpStatus, Slots};

/// `user_data` of the eventfd read; slot indexes are far below it.
const WAKE_TOKEN: u64 = u64::MAX;

struct Shared {
    slots: Arc<Slots>,
    /// Slots waiting to be turned into SQEs by the ring thread.
    queue: ArrayQueue<u32>,
    /// The ring thread is (about to be) asleep in `io_uring_enter`.
    sleeping: AtomicBool,
    shutdown: AtomicBool,
    wake_fd: OwnedFd,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our own eventfd.
        let r = unsafe {
            libc::write(
                self.wake_fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        // An eventfd write only fails if the counter would overflow, which
        // cannot happen while the ring thread keeps reading it.
        debug_assert_eq!(r, 8, "eventfd write");
    }
}

pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    helper: PoolEngine,
    /// The kernel accepted `SINGLE_ISSUER | DEFER_TASKRUN`.
    pub deferred_taskrun: bool,
    /// Writes go to the helper pool instead of the ring (hybrid engine).
    writes_to_pool: bool,
}

impl UringEngine {
    /// Sets up the ring. Fails if io_uring is unavailable (old kernel,
    /// `kernel.io_uring_disabled`, a seccomp filter): the caller falls back.
    /// `writes_to_pool`: run writes on a `helper_threads` pool rather than
    /// the ring (the hybrid engine); otherwise the helper has one thread and
    /// only runs ioctls.
    pub fn new(
        slots: Arc<Slots>,
        name: &str,
        writes_to_pool: bool,
        helper_threads: usize,
    ) -> std::io::Result<UringEngine> {
        // SAFETY: eventfd has no memory arguments; a non-negative return is a
        // new fd that we own.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh fd owned by nobody else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(slots.capacity()),
            slots: Arc::clone(&slots),
            sleeping: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            wake_fd,
        });
        let helper_threads = if writes_to_pool { helper_threads } else { 1 };
        let helper = PoolEngine::new(slots, helper_threads, &format!("{name}-help"))?;
        let s = Arc::clone(&shared);
        // The ring is created inside its thread: with SINGLE_ISSUER the
        // creating thread is the only one allowed to submit.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-ring"))
            .spawn(move || {
                let ring = match setup_ring(s.slots.capacity()) {
                    Ok((ring, deferred)) => {
                        let _ = tx.send(Ok(deferred));
                        ring
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                ring_thread(ring, &s)
            })?;
        let deferred_taskrun = match rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(std::io::Error::other("io_uring ring thread died"));
            }
        };
        Ok(UringEngine {
            shared,
            thread: Some(thread),
            helper,
            deferred_taskrun,
            writes_to_pool,
        })
    }

    pub fn writes_to_pool(&self) -> bool {
        self.writes_to_pool
    }

    pub fn start(&self, idx: u32) {
        // SAFETY: the caller just handed slot `idx` to the engine; nothing
        // runs it yet, so reading its kind is race-free.
        let kind = unsafe { self.shared.slots.op(idx).kind };
        let to_pool = match kind {
            OpKind::Discard | OpKind::ZeroOut => true,
            OpKind::Write { .. } | OpKind::WriteZeroPages { .. } => self.writes_to_pool,
            _ => false,
        };
        if to_pool {
            self.helper.start(idx);
            return;
        }
        let s = &self.shared;
        s.queue
            .push(idx)
            .expect("queue holds at most one entry per slot");
        // Pairs with the fence in the ring thread before it sleeps.
        fence(Ordering::SeqCst);
        if s.sleeping.load(Ordering::Relaxed) && s.sleeping.swap(false, Ordering::AcqRel) {
            s.wake();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One SQE per slot plus the eventfd read; the CQ is twice the SQ, so it
/// cannot overflow.
fn setup_ring(slots: usize) -> std::io::Result<(IoUring, bool)> {
    let entries = (slots + 1).next_power_of_two() as u32;
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(r) => Ok((r, true)),
        Err(_) => Ok((IoUring::new(entries)?, false)),
    }
}

/// Builds the SQE for slot `idx`'s next step.
fn sqe_for(slots: &Slots, idx: u32) -> squeue::Entry {
    // SAFETY: the ring thread owns every slot between popping it from the
    // queue and completing it.
    let op = unsafe { slots.op(idx) };
    let fd = types::Fd(op.fd);
    let entry = match op.kind {
        OpKind::Read => {
            let at = op.offset + op.done;
            let iov = op.fill_iov();
            opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(at)
                .build()
        }
        OpKind::Write { .. } | OpKind::WriteZeroPages { .. } => {
            let at = op.offset + op.done;
            let flags = op.kind.rw_flags();
            let iov = op.fill_iov();
            opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                .offset(at)
                .rw_flags(flags)
                .build()
        }
        OpKind::Sync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate { mode } => opcode::Fallocate::new(fd, op.len)
            .offset(op.offset)
            .mode(mode)
            .build(),
        OpKind::Discard | OpKind::ZeroOut => unreachable!("ioctls go to the helper"),
    };
    entry.user_data(idx as u64)
}

/// Applies one CQE to its slot. Returns true if the op needs another SQE
/// (a short transfer continues).
fn on_cqe(slots: &Slots, idx: u32, res: i32) -> bool {
    // SAFETY: as in `sqe_for`.
    let op = unsafe { slots.op(idx) };
    if res < 0 {
        let e = -res;
        if e == libc::EINTR || e == libc::EAGAIN {
            return true;
        }
        op.status = OpStatus::Errno(e);
        slots.complete(idx);
        return false;
    }
    if op.kind.moves_data() {
        if res == 0 {
            op.status = if op.kind == OpKind::Read {
                OpStatus::Eof
            } else {
                OpStatus::Errno(libc::EIO)
            };
            slots.complete(idx);
            return false;
        }
        if !op.advance(res as usize) {
            return true;
        }
    }
    op.status = OpStatus::Ok;
    slots.complete(idx);
    false
}

fn ring_thread(ring: IoUring, s: &Shared) {
    // The kernel writes the eventfd counter here. Leaked (8 bytes per engine)
    // so that no teardown order can leave the kernel a dangling target.
    let wake_buf: *mut u64 = Box::leak(Box::new(0u64));
    let wake_read = opcode::Read::new(types::Fd(s.wake_fd.as_raw_fd()), wake_buf.cast(), 8)
        .build()
        .user_data(WAKE_TOKEN);
    // SAFETY: only this thread touches the SQ; `wake_buf` is never freed.
    unsafe { ring.submission_shared().push(&wake_read) }.expect("fresh SQ has room");
    let mut wake_armed = true;
    let mut inflight = 0usize;
    let mut resubmit: Vec<u32> = Vec::with_capacity(s.slots.capacity());
    loop {
        // SAFETY: only this thread touches the SQ.
        let mut sq = unsafe { ring.submission_shared() };
        for idx in resubmit
            .drain(..)
            .chain(std::iter::from_fn(|| s.queue.pop()))
        {
            let e = sqe_for(&s.slots, idx);
            // SAFETY: the iovecs and buffers the entry points to live in slot
            // `idx`, which this thread owns until the CQE arrives; the SQ has
            // room for one entry per slot plus the wake read.
            unsafe { sq.push(&e) }.expect("SQ sized for every slot");
            inflight += 1;
        }
        drop(sq);
        if s.shutdown.load(Ordering::Acquire) && inflight == 0 && !wake_armed {
            break;
        }
        // Submit and sleep in one io_uring_enter. Submitters that arrive
        // after the check below see `sleeping` and write the eventfd, whose
        // outstanding read then completes and ends the wait.
        s.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !s.queue.is_empty() {
            s.sleeping.store(false, Ordering::Relaxed);
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                tracing::error!("io_uring_enter: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        s.sleeping.store(false, Ordering::Relaxed);
        // SAFETY: only this thread touches the CQ.
        for cqe in unsafe { ring.completion_shared() } {
            if cqe.user_data() == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            inflight -= 1;
            let idx = cqe.user_data() as u32;
            if on_cqe(&s.slots, idx, cqe.result()) {
                resubmit.push(idx);
            }
        }
        // At shutdown the wake read is left to complete (Drop writes the
        // eventfd) and not re-armed, so nothing is outstanding at exit.
        if !wake_armed && !s.shutdown.load(Ordering::Acquire) {
            // SAFETY: only this thread touches the SQ; `wake_buf` is never freed.
            unsafe { ring.submission_shared().push(&wake_read) }
                .expect("SQ has room for the wake read");
            wake_armed = true;
        }
    }
}
