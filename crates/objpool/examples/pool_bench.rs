//! Cost of the object pool primitives on the fast path (spare units, nobody
//! waiting), single thread, in ns per operation.
//!
//! `cargo run --release -p sanvirt-objpool --example pool_bench [filter]`
//!
//! With a filter, only cases whose name starts with it run (for
//! `perf stat -e task-clock`: per-op CPU time is then total / (ITERATIONS ×
//! (RUNS + 0.1))).

use std::hint::black_box;
use std::time::Instant;

use sanvirt_objpool::{ranks, ChildLimits, Pool, Rank, WorkItem};

/// Iterations per measured run: short, so that some runs escape preemption.
const ITERATIONS: u32 = 200_000;
/// Runs per case; the best is reported.
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
    println!("{name:<52} {best:8.1} ns/op");
}

fn main() {
    let base = Pool::base("pages", ranks::PAGE, (0..4096u32).collect());
    let child = base
        .child("fe", Rank(ranks::PAGE.0 + 1), ChildLimits::new(64, 256))
        .expect("room");
    let grandchild = child
        .child("fe.conn", Rank(ranks::PAGE.0 + 2), ChildLimits::new(16, 64))
        .expect("room");
    for (label, pool) in [
        ("base", &base),
        ("child", &child),
        ("grandchild", &grandchild),
    ] {
        measure(
            &format!("{label}: try_reserve_detached(1) + unreserve"),
            || {
                pool.try_reserve_detached(1).expect("spare");
                pool.unreserve_detached(1);
            },
        );
        measure(
            &format!("{label}: reserve 1, allocate, free, unreserve"),
            || {
                let mut w = WorkItem::new();
                let mut r = pool.try_reserve(&mut w, 1).expect("spare");
                let o = r.allocate().expect("reserved");
                r.free(black_box(o));
            },
        );
        measure(
            &format!("{label}: reserve 8, allocate 8, free 8, unreserve"),
            || {
                let mut w = WorkItem::new();
                let mut r = pool.try_reserve(&mut w, 8).expect("spare");
                let mut objs = [0u32; 8];
                for o in &mut objs {
                    *o = r.allocate().expect("reserved");
                }
                for o in black_box(objs) {
                    r.free(o);
                }
            },
        );
    }
}
