//! A fixed slab of in-flight request futures with one waker per slot, so a
//! front end's connection polls only the requests that made progress and
//! allocates nothing per request (no boxing, no `FuturesUnordered` node, no
//! task). Shared by the NBD and iSCSI front ends; `N` slots, at most 64 (the
//! ready set is one `u64`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

#[derive(Default)]
pub struct ReadySet {
    bits: AtomicU64,
    task: AtomicWaker,
}

impl ReadySet {
    pub fn register(&self, w: &Waker) {
        self.task.register(w);
    }
    pub fn mark(&self, slot: usize) {
        self.bits.fetch_or(1 << slot, Ordering::AcqRel);
    }
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

pub struct FutureSlab<F, const N: usize> {
    futs: Pin<Box<[Option<F>]>>,
    wakers: Box<[Waker]>,
    ready: Arc<ReadySet>,
}

impl<F: Future, const N: usize> FutureSlab<F, N> {
    pub fn new() -> Self {
        const { assert!(N <= 64, "the ready set is one u64") };
        let ready = Arc::new(ReadySet::default());
        let wakers = (0..N)
            .map(|slot| {
                Waker::from(Arc::new(SlotWaker {
                    set: ready.clone(),
                    slot,
                }))
            })
            .collect();
        let futs: Box<[Option<F>]> = (0..N).map(|_| None).collect();
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
        // SAFETY: the boxed slice is allocated once and never moved or
        // reallocated; an element is only replaced in place through
        // `Pin::set`, which drops the old future where it lies. A stored
        // future therefore never moves until dropped, so projecting the pin
        // to one element is sound.
        unsafe { self.futs.as_mut().map_unchecked_mut(|s| &mut s[i]) }
    }

    /// Stores `f` in free slot `i`.
    ///
    /// Storing a future copies all of `size_of::<F>()` into the slot, which
    /// is why the facilities box their cold paths and the daemon's tests
    /// hold the request future to a size budget.
    pub fn insert(&mut self, i: usize, f: F) {
        self.insert_with(i, || f);
    }

    /// Stores the future `make` builds in free slot `i`, without the
    /// temporary that `Pin::set` would need while dropping the old value.
    #[inline(always)]
    pub fn insert_with(&mut self, i: usize, make: impl FnOnce() -> F) {
        let s = self.slot(i);
        assert!(s.is_none(), "slot {i} is busy");
        // SAFETY: the slot is `None` (nothing to drop) and is never moved
        // (see `slot`); writing a value in place keeps the pin's promise.
        unsafe {
            let p: *mut Option<F> = s.get_unchecked_mut();
            std::ptr::write(p, Some(make()));
        }
        self.ready.mark(i);
    }

    pub fn poll(&mut self, i: usize) -> Poll<F::Output> {
        let waker = self.wakers[i].clone();
        let mut cx = Context::from_waker(&waker);
        let mut s = self.slot(i);
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

impl<F: Future, const N: usize> Default for FutureSlab<F, N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_woken_slots_and_drops_finished() {
        let mut slab = FutureSlab::<_, 8>::new();
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
