//! Tight alloc/free loop on the buffer pool, reported in ns per operation.
//!
//! `cargo run --release -p sanvirt-buffer --example alloc_bench [filter]`
//!
//! With a filter, only cases whose name starts with it run, so that
//! `perf stat -e cycles:u,instructions:u` can count one case (per-op counts
//! are then total / (ITERATIONS × (RUNS + 0.1)), setup being negligible).
//!
//! Single thread, warm pool: this measures the fixed per-I/O cost of getting
//! and returning a buffer, not memory bandwidth (no page is touched).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use sanvirt_buffer::{BufferPool, PAGE_SIZE};
use sanvirt_objpool::ChildLimits;

/// Iterations per measured run: short, so that some runs escape preemption
/// on a shared machine.
const ITERATIONS: u32 = 200_000;
/// Runs per case; the best is reported, the closest to the uncontended cost.
const RUNS: u32 = 40;

fn measure(name: &str, mut f: impl FnMut()) {
    if let Some(filter) = std::env::args().nth(1) {
        if !name.starts_with(&filter) {
            return;
        }
    }
    for _ in 0..ITERATIONS / 10 {
        f();
    }
    let mut best = f64::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        for _ in 0..ITERATIONS {
            f();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(ITERATIONS));
    }
    println!("{name:<40} {best:8.1} ns/op");
}

fn main() {
    let pool = BufferPool::new(1024, 256);
    measure("alloc(4 KiB) + drop", || {
        black_box(pool.alloc(PAGE_SIZE).expect("pool sized for the loop"));
    });
    measure("alloc(32 KiB) + drop", || {
        black_box(pool.alloc(8 * PAGE_SIZE).expect("pool sized for the loop"));
    });
    measure("alloc(128 KiB) + drop", || {
        black_box(pool.alloc(32 * PAGE_SIZE).expect("pool sized for the loop"));
    });
    let held = pool.alloc(8 * PAGE_SIZE).expect("pool sized for the loop");
    measure("share(32 KiB) + drop", || {
        black_box(held.share().expect("pool sized for the loop"));
    });
    drop(held);
    // A facility's child pools holding their antibottleneck reservation.
    let child = pool
        .child(
            "bench",
            1,
            ChildLimits::new(64, 128),
            ChildLimits::new(16, 32),
        )
        .expect("room for the child");
    measure("child: alloc(4 KiB) + drop", || {
        black_box(child.alloc(PAGE_SIZE).expect("child sized for the loop"));
    });
    measure("child: alloc(32 KiB) + drop", || {
        black_box(
            child
                .alloc(8 * PAGE_SIZE)
                .expect("child sized for the loop"),
        );
    });
    // The waiting allocation when nothing waits: one poll, no executor.
    let mut cx = Context::from_waker(Waker::noop());
    measure("child: alloc_wait(4 KiB) + drop (ready)", || {
        let mut f = pin!(child.alloc_wait(PAGE_SIZE));
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(b) => {
                black_box(b.expect("child sized for the loop"));
            }
            Poll::Pending => unreachable!("child sized for the loop"),
        }
    });
}
