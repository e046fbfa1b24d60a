//! Waiting for units: the future behind every `reserve`, and `block_on` for
//! plain threads.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use crate::node::{Node, WaitSlot};
use crate::PoolError;

/// Waits for `n` units of one node, in FIFO order with the node's other
/// waiters. Dropping it while queued withdraws the request (and returns the
/// units if the grant raced with the drop).
pub(crate) struct NodeWait<'a> {
    node: &'a Arc<Node>,
    n: usize,
    state: State,
}

enum State {
    Init,
    Queued(Arc<WaitSlot>),
    Done,
}

impl<'a> NodeWait<'a> {
    pub(crate) fn new(node: &'a Arc<Node>, n: usize) -> NodeWait<'a> {
        NodeWait {
            node,
            n,
            state: State::Init,
        }
    }
}

impl Future for NodeWait<'_> {
    type Output = Result<(), PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match &this.state {
            State::Init => match this.node.wait_begin(this.n, cx.waker()) {
                Ok(None) => {
                    this.state = State::Done;
                    Poll::Ready(Ok(()))
                }
                Ok(Some(slot)) => {
                    // The grant may already have happened inside `wait_begin`.
                    let granted = slot.poll(cx.waker());
                    if granted {
                        this.state = State::Done;
                        Poll::Ready(Ok(()))
                    } else {
                        this.state = State::Queued(slot);
                        Poll::Pending
                    }
                }
                Err(e) => {
                    this.state = State::Done;
                    Poll::Ready(Err(e))
                }
            },
            State::Queued(slot) => {
                if slot.poll(cx.waker()) {
                    this.state = State::Done;
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                }
            }
            State::Done => panic!("reservation future polled after completion"),
        }
    }
}

impl Drop for NodeWait<'_> {
    fn drop(&mut self) {
        if let State::Queued(slot) = &self.state {
            self.node.wait_cancel(slot, self.n);
        }
    }
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on the current thread, parking while it is
/// pending: lets a plain thread wait for a reservation
/// (`block_on(pool.reserve(&mut work, n))`).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        // A wake before the park leaves a token, so no wake-up is lost.
        std::thread::park();
    }
}
