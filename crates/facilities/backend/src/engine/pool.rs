//! Engine (a): a fixed pool of threads doing blocking `preadv2`/`pwritev2`.
//!
//! Submission pushes the slot index on a bounded queue (it cannot overflow:
//! it holds at most one entry per slot) and wakes one sleeping worker, if
//! any. A worker runs the whole operation, short transfers included, then
//! completes the slot, which wakes the awaiting task directly.

use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_queue::ArrayQueue;
use parking_lot::{Condvar, Mutex};

use crate::slot::Slots;

/// Most worker threads one pool may have.
pub const POOL_THREADS_MAX: usize = 256;

struct Shared {
    slots: Arc<Slots>,
    queue: ArrayQueue<u32>,
    /// Workers asleep (or about to sleep) on `cv`.
    idle: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

pub struct PoolEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl PoolEngine {
    pub fn new(slots: Arc<Slots>, threads: usize, name: &str) -> std::io::Result<PoolEngine> {
        assert!(threads > 0 && threads <= POOL_THREADS_MAX);
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(slots.capacity()),
            slots,
            idle: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let mut engine = PoolEngine {
            shared,
            workers: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let s = Arc::clone(&engine.shared);
            // On error `engine` drops here, which stops the workers started so far.
            engine.workers.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(engine)
    }

    /// Queues slot `idx` (state `IN_FLIGHT`).
    pub fn start(&self, idx: u32) {
        let s = &self.shared;
        s.queue
            .push(idx)
            .expect("queue holds at most one entry per slot");
        // Pairs with the fence in `worker`: either the worker sees the entry
        // or we see it idle and wake it.
        fence(Ordering::SeqCst);
        if s.idle.load(Ordering::Relaxed) > 0 {
            let _g = s.lock.lock();
            s.cv.notify_one();
        }
    }
}

fn worker(s: &Shared) {
    loop {
        if let Some(idx) = s.queue.pop() {
            // SAFETY: popping the index from the engine queue makes this
            // worker the slot's only owner until `complete`.
            let op = unsafe { s.slots.op(idx) };
            op.execute_blocking();
            s.slots.complete(idx);
            continue;
        }
        let mut g = s.lock.lock();
        s.idle.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if s.queue.is_empty() {
            if s.shutdown.load(Ordering::Acquire) {
                s.idle.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            s.cv.wait(&mut g);
        }
        s.idle.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _g = self.shared.lock.lock();
            self.shared.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
