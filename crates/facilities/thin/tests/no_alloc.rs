//! A disk that is not thin passes through the thin facility without a heap
//! allocation (counted by a global allocator on this thread), even while
//! another disk is thin.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use sanvirt_facility::scaffold::MemDisks;
use sanvirt_facility::{BufferPool, IoFlags, IoRequest, IoServer};
use sanvirt_thin::{Thin, ThinVolume};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: delegates to the system allocator; the bookkeeping touches only
// const-initialised thread-locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn pass_through_does_not_allocate() {
    const MIB: u64 = 1 << 20;
    let pool = BufferPool::new(64, 64);
    let thin = Thin::with_runtime(
        MemDisks::new(&[(1, 8 * MIB), (2, 8 * MIB)]),
        std::sync::Arc::clone(&pool),
        None,
    );
    thin.configure([ThinVolume {
        id: 2,
        virtual_size_bytes: 64 * MIB,
        grain_bytes: 64 << 10,
    }]);
    let mut buf = Some(pool.alloc(16384).unwrap());
    let mut run = |n: u64| {
        for k in 0..n {
            let off = (k % 8) * MIB + 4096 * (k % 200);
            let b = buf.take().unwrap();
            let b =
                futures::executor::block_on(thin.submit(IoRequest::write(1, off, b, k % 3 == 0)))
                    .unwrap()
                    .unwrap();
            let b = futures::executor::block_on(thin.submit(IoRequest::read(1, off, b)))
                .unwrap()
                .unwrap();
            buf = Some(b);
            futures::executor::block_on(thin.submit(IoRequest::write_zeroes(
                1,
                off,
                512,
                IoFlags::default(),
            )))
            .unwrap();
            futures::executor::block_on(thin.submit(IoRequest::flush(1))).unwrap();
        }
    };
    run(4); // warm up thread-locals (executor, arc-swap debt list)
    COUNTING.with(|c| c.set(true));
    run(500);
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCS.with(Cell::get),
        0,
        "allocations on the pass-through path"
    );
}
