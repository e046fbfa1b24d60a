//! A fixed slab of in-flight request futures with one waker per slot, so a
//! connection polls only the requests that made progress, and never
//! allocates per request (no boxing, no `FuturesUnordered` node, no task).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

use crate::limits::IN_FLIGHT_MAX;

/// Which slots were woken, and the connection task to wake.
#[derive(Default)]
pub struct ReadySet {
    bits: AtomicU64,
    task: AtomicWaker,
}

impl ReadySet {
    /// Registers the connection task's waker (before polling anything).
    pub fn register(&self, w: &Waker) {
        self.task.register(w);
    }

    pub fn mark(&self, slot: usize) {
        self.bits.fetch_or(1 << slot, Ordering::AcqRel);
    }

    /// Takes the set of woken slots.
    pub fn take(&self) -> u64 {
        self.bits.swap(0, Ordering::AcqRel)
    }
}

struct SlotWaker {
    set: Arc<ReadySet>,
    slot: usize,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.set.mark(self.slot);
        self.set.task.wake();
    }
}

/// `IN_FLIGHT_MAX` pinned future slots. Slot indices are managed by the
/// caller (a free list); the slab only stores, polls and drops.
pub struct FutureSlab<F> {
    futs: Pin<Box<[Option<F>]>>,
    wakers: Box<[Waker]>,
    ready: Arc<ReadySet>,
}

impl<F: Future> FutureSlab<F> {
    pub fn new() -> Self {
        let ready = Arc::new(ReadySet::default());
        let wakers = (0..IN_FLIGHT_MAX)
            .map(|slot| {
                Waker::from(Arc::new(SlotWaker {
                    set: ready.clone(),
                    slot,
                }))
            })
            .collect();
        let futs: Box<[Option<F>]> = (0..IN_FLIGHT_MAX).map(|_| None).collect();
        FutureSlab {
            futs: Box::into_pin(futs),
            wakers,
            ready,
        }
    }

    pub fn ready(&self) -> &ReadySet {
        &self.ready
    }

    fn slot(&mut self, i: usize) -> Pin<&mut Option<F>> {
        // SAFETY: the boxed slice is allocated once and never moved out of or
        // reallocated; an element is only ever replaced in place through
        // `Pin::set`, which drops the old future where it lies. So a future,
        // once stored, stays at its address until it is dropped: projecting
        // the pin to one element is sound.
        unsafe { self.futs.as_mut().map_unchecked_mut(|s| &mut s[i]) }
    }

    /// Stores `f` in free slot `i` and marks it ready for its first poll.
    pub fn insert(&mut self, i: usize, f: F) {
        let mut s = self.slot(i);
        assert!(s.is_none(), "slot {i} is busy");
        s.set(Some(f));
        self.ready.mark(i);
    }

    /// Polls slot `i` with its own waker; a finished future is dropped.
    pub fn poll(&mut self, i: usize) -> Poll<F::Output> {
        let mut cx = Context::from_waker(&self.wakers[i]);
        // SAFETY: as in `slot` (a disjoint borrow of the same field).
        let mut s = unsafe { self.futs.as_mut().map_unchecked_mut(|s| &mut s[i]) };
        let Some(f) = s.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        match f.poll(&mut cx) {
            Poll::Ready(out) => {
                s.set(None);
                Poll::Ready(out)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    pub fn is_busy(&self, i: usize) -> bool {
        self.futs[i].is_some()
    }
}

impl<F: Future> Default for FutureSlab<F> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_woken_slots_and_drops_finished() {
        let mut slab = FutureSlab::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        slab.insert(
            3,
            futures::future::Either::Left(async { rx.await.unwrap_or(0) }),
        );
        slab.insert(5, futures::future::Either::Right(async { 9u32 }));
        assert_eq!(slab.ready().take(), (1 << 3) | (1 << 5));
        assert!(slab.poll(3).is_pending());
        assert_eq!(slab.poll(5), Poll::Ready(9));
        assert!(!slab.is_busy(5));
        assert_eq!(slab.ready().take(), 0);
        tx.send(4).expect("receiver alive");
        assert_eq!(slab.ready().take(), 1 << 3, "the slot's own waker fired");
        assert_eq!(slab.poll(3), Poll::Ready(4));
    }
}
