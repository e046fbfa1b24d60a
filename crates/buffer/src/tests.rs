use super::*;
use proptest::prelude::*;
use sanvirt_objpool::WorkItem;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

impl Buffer {
    /// IOBs in the chain (tests).
    fn iob_count(&self) -> usize {
        let mut n = 0;
        let mut i = self.head;
        while i != NONE {
            n += 1;
            // SAFETY: the chain belongs to this buffer; we only read it.
            i = unsafe { self.pool.slot(i) }.next;
        }
        n
    }
}

fn fill(buf: &mut Buffer, seed: u8) {
    let mut k = seed;
    for seg in buf.segments_mut() {
        for b in seg.iter_mut() {
            *b = k;
            k = k.wrapping_add(1);
        }
    }
}

fn bytes(buf: &Buffer) -> Vec<u8> {
    buf.segments().flat_map(|s| s.iter().copied()).collect()
}

#[test]
fn alloc_chains_iobs_of_eight_pages() {
    let pool = BufferPool::new(64, 64);
    let b = pool.alloc(20 * PAGE_SIZE + 1).unwrap();
    assert_eq!(b.page_ids().len(), 21);
    assert_eq!(pool.iobs_free(), 64 - 3);
    assert_eq!(pool.pages_available(), 64 - 21);
    drop(b);
    assert_eq!(pool.iobs_free(), 64);
    assert_eq!(pool.pages_available(), 64);
}

#[test]
fn share_increments_refcounts_and_reserves_cow_pages() {
    let pool = BufferPool::new(32, 32);
    let mut a = pool.alloc(8 * PAGE_SIZE).unwrap();
    fill(&mut a, 7);
    let b = a.share().unwrap();
    assert_eq!(a.page_ids(), b.page_ids());
    assert!(b.page_refcounts().iter().all(|&c| c == 2));
    // 8 pages allocated, 8 reserved for copy-on-write.
    assert_eq!(pool.pages_available(), 32 - 16);
    assert_eq!(bytes(&a), bytes(&b));
    assert_eq!(
        pool.stats(),
        BufferStats::default(),
        "sharing copies nothing"
    );
}

#[test]
fn write_to_shared_page_copies_it_first() {
    let pool = BufferPool::new(32, 32);
    let mut a = pool.alloc(2 * PAGE_SIZE).unwrap();
    fill(&mut a, 1);
    let before = bytes(&a);
    let b = a.share().unwrap();
    // Writing through `a` must leave `b` untouched.
    for s in a.segments_mut() {
        s.fill(0xEE);
    }
    assert_eq!(bytes(&b), before);
    assert!(bytes(&a).iter().all(|&x| x == 0xEE));
    assert_ne!(a.page_ids(), b.page_ids());
    assert_eq!(pool.stats().cow_copies, 2);
    assert!(a.page_refcounts().iter().all(|&c| c == 1));
    assert!(b.page_refcounts().iter().all(|&c| c == 1));
    // The copies consumed the reservations: 4 pages in use, none reserved.
    assert_eq!(pool.pages_available(), 32 - 4);
    drop(a);
    drop(b);
    assert_eq!(pool.pages_available(), 32);
}

#[test]
fn dropping_the_share_frees_pages_as_in_figure_5() {
    // Figure 5: two IOBs share pages 6 and 7 after the first frees 0..5.
    let pool = BufferPool::new(16, 16);
    let a = pool.alloc(8 * PAGE_SIZE).unwrap();
    let b = a.slice(6 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let shared = b.page_ids();
    assert_eq!(shared, a.page_ids()[6..].to_vec());
    drop(a);
    assert!(b.page_refcounts().iter().all(|&c| c == 1));
    assert_eq!(pool.pages_available(), 16 - 2);
}

#[test]
fn slice_at_unaligned_offset() {
    let pool = BufferPool::new(16, 16);
    let mut a = pool.alloc(3 * PAGE_SIZE).unwrap();
    fill(&mut a, 0);
    let whole = bytes(&a);
    let s = a.slice(100, PAGE_SIZE + 50).unwrap();
    assert_eq!(bytes(&s), whole[100..100 + PAGE_SIZE + 50].to_vec());
    assert!(a.slice(PAGE_SIZE * 3, 1).is_err());
    let empty = a.slice(5, 0).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn exhaustion_is_reported_and_leaves_pool_unchanged() {
    let pool = BufferPool::new(4, 4);
    let a = pool.alloc(3 * PAGE_SIZE).unwrap();
    let err = pool.alloc(2 * PAGE_SIZE).unwrap_err();
    assert_eq!(
        err,
        BufferError::PagesExhausted {
            needed: 2,
            available: 1
        }
    );
    // Sharing 3 pages needs 3 reserved pages: only 1 left.
    assert!(a.share().is_err());
    assert_eq!(pool.pages_available(), 1);
    drop(a);
    assert_eq!(pool.pages_available(), 4);
    // Out of IOBs.
    let pool = BufferPool::new(32, 1);
    assert_eq!(
        pool.alloc(9 * PAGE_SIZE).unwrap_err(),
        BufferError::IobsExhausted { needed: 1 }
    );
    assert_eq!(pool.pages_available(), 32);
    assert_eq!(pool.iobs_free(), 1);
}

#[test]
fn explicit_copies_are_counted() {
    let pool = BufferPool::new(8, 8);
    let mut a = pool.alloc(5000).unwrap();
    let src: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    a.copy_from_slice(0, &src);
    assert_eq!(a.to_vec(), src);
    let st = pool.stats();
    assert_eq!(st.explicit_copies, 2);
    assert_eq!(st.copied_bytes, 10000);
}

#[test]
fn split_off_and_append_move_pages_without_copies() {
    let pool = BufferPool::new(64, 16);
    let mut a = pool.alloc(20 * PAGE_SIZE).unwrap();
    fill(&mut a, 3);
    let whole = bytes(&a);
    let ids = a.page_ids();
    let mut b = a.split_off(5 * PAGE_SIZE).unwrap(); // inside the first IOB
    let c = b.split_off(3 * PAGE_SIZE).unwrap(); // exactly at an IOB boundary (page 8)
    assert_eq!(bytes(&a), whole[..5 * PAGE_SIZE].to_vec());
    assert_eq!(bytes(&b), whole[5 * PAGE_SIZE..8 * PAGE_SIZE].to_vec());
    assert_eq!(bytes(&c), whole[8 * PAGE_SIZE..].to_vec());
    assert!(a.page_refcounts().iter().all(|&r| r == 1));
    // Each half is writable in place: no copy-on-write.
    for s in b.segments_mut() {
        s.fill(9);
    }
    assert!(a.split_off(100).is_err());
    a.append(b).unwrap();
    a.append(c).unwrap();
    assert_eq!(a.page_ids(), ids);
    assert_eq!(a.len(), 20 * PAGE_SIZE);
    assert_eq!(pool.stats(), BufferStats::default());
    drop(a);
    assert_eq!(pool.pages_available(), 64);
    assert_eq!(pool.iobs_free(), 16);
}

fn fe_child(pool: &Arc<BufferPool>) -> BufferChild {
    pool.child("fe", 1, ChildLimits::new(8, 16), ChildLimits::new(2, 4))
        .unwrap()
}

#[test]
fn child_pools_charge_their_buffers() {
    let pool = BufferPool::new(64, 16);
    let child = fe_child(&pool);
    // The antideadlock thresholds are reserved at creation.
    assert_eq!(pool.pages_available(), 64 - 8);
    assert_eq!(pool.iobs_available(), 16 - 2);
    let a = child.alloc(3 * PAGE_SIZE).unwrap();
    assert_eq!(child.page_stats().granted, 3);
    assert_eq!(child.iob_stats().granted, 1);
    let b = child.alloc(8 * PAGE_SIZE).unwrap();
    // 11 > 8: the child over-reserved from the base up to its antibottleneck.
    assert_eq!(child.page_stats().reserved, 16);
    assert_eq!(pool.pages_available(), 64 - 16);
    // A share and a split stay charged to the child.
    let s = b.share().unwrap();
    assert_eq!(child.page_stats().granted, 3 + 8 + 8);
    let mut c = s.slice(0, 8 * PAGE_SIZE).unwrap();
    let d = c.split_off(5 * PAGE_SIZE).unwrap();
    drop((a, b, s));
    assert_eq!(child.page_stats().granted, 8);
    assert_eq!(child.iob_stats().granted, 2);
    drop((c, d));
    assert_eq!(child.page_stats().granted, 0);
    assert_eq!(child.iob_stats().granted, 0);
    assert_eq!(pool.iobs_free(), 16);
    assert_eq!(pool.stats(), BufferStats::default());
    drop(child);
    assert_eq!(pool.pages_available(), 64);
    assert_eq!(pool.iobs_available(), 16);
}

#[test]
fn copy_on_write_in_a_child_uses_the_page_reserved_at_share_time() {
    let pool = BufferPool::new(32, 16);
    let child = fe_child(&pool);
    let mut a = child.alloc(2 * PAGE_SIZE).unwrap();
    fill(&mut a, 5);
    let before = bytes(&a);
    let b = a.share().unwrap();
    let granted = child.page_stats().granted;
    a.copy_from_slice(0, &[1, 2, 3]);
    assert_eq!(bytes(&b), before);
    assert_eq!(pool.stats().cow_copies, 2);
    // The copies took the reserved units: nothing more was reserved.
    assert_eq!(child.page_stats().granted, granted);
    drop((a, b));
    assert_eq!(child.page_stats().granted, 0);
    assert_eq!(pool.page_pool().free_objects(), 32);
}

#[test]
fn creating_a_child_fails_without_room_for_its_antideadlock_threshold() {
    let pool = BufferPool::new(16, 16);
    let _held = pool.alloc(10 * PAGE_SIZE).unwrap();
    let e = pool
        .child("big", 1, ChildLimits::new(8, 8), ChildLimits::new(1, 1))
        .unwrap_err();
    assert!(
        matches!(e, PoolError::AntideadlockUnavailable { .. }),
        "{e}"
    );
    assert_eq!(pool.pages_available(), 6);
}

#[test]
fn alloc_in_builds_from_a_work_items_reservations() {
    let pool = BufferPool::new(64, 16);
    let child = fe_child(&pool);
    // The paper's example work item: 1 control block + 8 pages + 1 IOB,
    // reserved in rank order.
    let cbs =
        sanvirt_objpool::Pool::base("cb", sanvirt_objpool::ranks::CONTROL_BLOCK, vec![0u32; 4]);
    let mut work = WorkItem::new();
    let mut cb = cbs.try_reserve(&mut work, 1).unwrap();
    let mut pages = child.pages().try_reserve(&mut work, 8).unwrap();
    let mut iobs = child.iobs().try_reserve(&mut work, 1).unwrap();
    let block = cb.allocate().unwrap();
    let buf = child
        .alloc_in(&mut pages, &mut iobs, 8 * PAGE_SIZE)
        .unwrap();
    assert_eq!((pages.reserved(), iobs.reserved()), (0, 0));
    assert_eq!(
        child.alloc_in(&mut pages, &mut iobs, 1).unwrap_err(),
        BufferError::PagesExhausted {
            needed: 1,
            available: 0
        }
    );
    assert_eq!(child.page_stats().granted, 8);
    drop(buf);
    cb.free(block);
    drop((cb, pages, iobs));
    assert_eq!(child.page_stats().granted, 0);
}

#[test]
#[should_panic(expected = "not from this buffer pool")]
fn alloc_in_refuses_reservations_of_other_pools() {
    let pool = BufferPool::new(64, 16);
    let child = fe_child(&pool);
    let mut work = WorkItem::new();
    let mut pages = pool.page_pool().try_reserve(&mut work, 1).unwrap();
    let mut iobs = pool.iob_pool().try_reserve(&mut work, 1).unwrap();
    let _ = child.alloc_in(&mut pages, &mut iobs, 1);
}

#[test]
#[should_panic(expected = "different child pools")]
fn append_across_child_pools_is_refused() {
    let pool = BufferPool::new(64, 16);
    let child = fe_child(&pool);
    let mut a = pool.alloc(PAGE_SIZE).unwrap();
    let b = child.alloc(PAGE_SIZE).unwrap();
    let _ = a.append(b);
}

fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
    f.poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn alloc_wait_waits_for_buffers_in_fifo_order() {
    let pool = BufferPool::new(16, 16);
    let child = fe_child(&pool);
    // Everything is taken: the base by a direct buffer, the child by its own.
    let direct = pool.alloc(8 * PAGE_SIZE).unwrap();
    let mine = child.alloc(8 * PAGE_SIZE).unwrap();
    let mut first = pin!(child.alloc_wait(6 * PAGE_SIZE));
    let mut second = pin!(child.alloc_wait(PAGE_SIZE));
    assert!(poll_once(first.as_mut()).is_pending());
    assert!(poll_once(second.as_mut()).is_pending());
    assert!(
        child.alloc(PAGE_SIZE).is_err(),
        "newcomers queue behind waiters"
    );
    drop(direct);
    // The base has room now: the child grows and serves its head first.
    let a = match poll_once(first.as_mut()) {
        Poll::Ready(b) => b.unwrap(),
        Poll::Pending => panic!("head served once the base has room"),
    };
    let b = match poll_once(second.as_mut()) {
        Poll::Ready(b) => b.unwrap(),
        Poll::Pending => panic!("second served"),
    };
    assert_eq!((a.len(), b.len()), (6 * PAGE_SIZE, PAGE_SIZE));
    drop((a, b, mine));
    assert_eq!(child.page_stats().granted, 0);
}

#[test]
fn waiting_for_more_than_the_antideadlock_threshold_is_refused() {
    let pool = BufferPool::new(64, 16);
    let child = fe_child(&pool);
    let r = pollster(child.alloc_wait(9 * PAGE_SIZE));
    assert_eq!(
        r.unwrap_err(),
        BufferError::TooLarge {
            what: "pages",
            needed: 9,
            limit: 8
        }
    );
    // Without waiting it is refused too, as exhausted: a facility splits
    // transfers larger than its threshold.
    assert!(matches!(
        child.alloc(9 * PAGE_SIZE),
        Err(BufferError::PagesExhausted { needed: 9, .. })
    ));
    assert!(child.alloc(8 * PAGE_SIZE).is_ok());
}

fn pollster<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match poll_once(f.as_mut()) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("expected an immediate result"),
    }
}

#[test]
fn alloc_wait_is_backpressure_across_tasks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let pool = BufferPool::new(32, 8);
    let child = fe_child(&pool);
    let done = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let child = child.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                for k in 0..200usize {
                    let len = (1 + (k + i as usize) % 8) * PAGE_SIZE;
                    let mut b = child.alloc_wait(len).await.unwrap();
                    b.zero();
                    tokio::task::yield_now().await;
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    assert_eq!(done, 16 * 200);
    assert_eq!(child.page_stats().granted, 0);
    assert!(child.page_stats().waits > 0, "the tasks had to wait");
    drop(child);
    assert_eq!(pool.pages_available(), 32);
    assert_eq!(pool.iobs_free(), 8);
}

#[test]
fn futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let pool = BufferPool::new(8, 8);
    let child = fe_child(&pool);
    is_send(&pool.alloc_wait(1));
    is_send(&child.alloc_wait(1));
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    AllocChild(usize),
    Share(usize),
    Slice(usize, usize, usize),
    Write(usize, u8),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..40_000).prop_map(Op::Alloc),
        (1usize..40_000).prop_map(Op::AllocChild),
        any::<usize>().prop_map(Op::Share),
        (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(a, b, c)| Op::Slice(a, b, c)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Op::Write(a, b)),
        any::<usize>().prop_map(Op::Drop),
    ]
}

proptest! {
    /// Random alloc/share/slice/write/drop sequences: the content every buffer
    /// holds always matches a model, the accounting invariant holds after each
    /// step, and everything is returned at the end.
    #[test]
    fn model_check(ops in proptest::collection::vec(op(), 1..80)) {
        let pool = BufferPool::new(64, 24);
        // A facility's child pools: buffers from it are charged to them.
        let child = pool
            .child("fe", 1, ChildLimits::new(10, 16), ChildLimits::new(2, 4))
            .unwrap();
        let mut live: Vec<(Buffer, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(len) => {
                    if let Ok(mut b) = pool.alloc(len) {
                        b.zero();
                        live.push((b, vec![0; len]));
                    }
                }
                Op::AllocChild(len) => {
                    if let Ok(mut b) = child.alloc(len) {
                        b.zero();
                        live.push((b, vec![0; len]));
                    }
                }
                Op::Share(i) if !live.is_empty() => {
                    let i = i % live.len();
                    if let Ok(b) = live[i].0.share() {
                        let m = live[i].1.clone();
                        live.push((b, m));
                    }
                }
                Op::Slice(i, s, l) if !live.is_empty() => {
                    let i = i % live.len();
                    let len = live[i].1.len();
                    let s = s % (len + 1);
                    let l = l % (len - s + 1);
                    if let Ok(b) = live[i].0.slice(s, l) {
                        let m = live[i].1[s..s + l].to_vec();
                        live.push((b, m));
                    }
                }
                Op::Write(i, v) if !live.is_empty() => {
                    let i = i % live.len();
                    for seg in live[i].0.segments_mut() { seg.fill(v); }
                    live[i].1.iter_mut().for_each(|x| *x = v);
                }
                Op::Drop(i) if !live.is_empty() => {
                    let i = i % live.len();
                    live.swap_remove(i);
                }
                _ => {}
            }
            for (b, m) in &live {
                prop_assert_eq!(&bytes(b), m);
            }
            // available == free - Σ(refs - 1)
            let mut refs = std::collections::HashMap::new();
            for (b, _) in &live {
                for p in b.page_ids() { *refs.entry(p).or_insert(0usize) += 1; }
            }
            let extra: usize = refs.values().map(|c| c - 1).sum();
            // free − Σ(refs − 1) − units the child holds unused == available
            let cp = child.page_stats();
            prop_assert_eq!(pool.pages_available() + extra + refs.len() + cp.spare, 64);
            for (p, c) in &refs {
                prop_assert_eq!(pool.refs[*p as usize].load(Ordering::Acquire) as usize, *c);
            }
            // Each page reference and each IOB holds one unit of its pool.
            let charged = |child_side: bool| {
                let mut page_refs = 0;
                let mut iobs = 0;
                for (b, _) in live.iter().filter(|(b, _)| b.acct.is_some() == child_side) {
                    page_refs += b.page_ids().len();
                    iobs += b.iob_count();
                }
                (page_refs, iobs)
            };
            let (child_refs, child_iobs) = charged(true);
            let (base_refs, base_iobs) = charged(false);
            prop_assert_eq!(cp.granted, child_refs);
            prop_assert_eq!(child.iob_stats().granted, child_iobs);
            prop_assert_eq!(
                pool.page_pool().stats().granted,
                base_refs + cp.reserved
            );
            prop_assert_eq!(
                pool.iob_pool().stats().granted,
                base_iobs + child.iob_stats().reserved
            );
            prop_assert_eq!(pool.iobs_free() + base_iobs + child_iobs, 24);
            prop_assert!(cp.reserved >= 10 && child.iob_stats().reserved >= 2);
        }
        live.clear();
        prop_assert_eq!(child.page_stats().granted, 0);
        drop(child);
        prop_assert_eq!(pool.pages_available(), 64);
        prop_assert_eq!(pool.iobs_free(), 24);
        prop_assert_eq!(pool.iobs_available(), 24);
    }
}

/// A write into a shared page races the drop of the page's other share: the
/// writer must either copy (the other share was still there) or write in
/// place (it was gone), never lose track of a reference or a reserved page.
/// A third thread allocates and frees pages meanwhile, with the pool nearly
/// full, so a page unit handed back too early would be taken at once.
#[test]
fn write_racing_the_drop_of_the_other_share_keeps_counts_and_reservations() {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Barrier, Mutex};
    const PAGES: usize = 6;
    const ROUNDS: usize = 100_000;
    let pool = BufferPool::new(PAGES, 16);
    let other: Mutex<Option<Buffer>> = Mutex::new(None);
    let barrier = Barrier::new(2);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 0..ROUNDS {
                let b = {
                    barrier.wait();
                    other.lock().unwrap().take().expect("share handed over")
                };
                assert!(
                    bytes(&b).iter().all(|&x| x == 0x11),
                    "share changed under its holder"
                );
                // Stagger the drop across the writer's copy window.
                for _ in 0..round % 97 {
                    std::hint::spin_loop();
                }
                drop(b);
                barrier.wait();
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut c) = pool.alloc(PAGE_SIZE) {
                    c.zero();
                }
            }
        });
        for round in 0..ROUNDS {
            let mut a = loop {
                if let Ok(a) = pool.alloc(PAGE_SIZE) {
                    break a;
                }
            };
            for seg in a.segments_mut() {
                seg.fill(0x11);
            }
            let b = loop {
                if let Ok(b) = a.share() {
                    break b;
                }
            };
            *other.lock().unwrap() = Some(b);
            barrier.wait();
            for _ in 0..(round * 7) % 101 {
                std::hint::spin_loop();
            }
            for seg in a.segments_mut() {
                seg.fill(0x22);
            }
            barrier.wait();
            assert!(bytes(&a).iter().all(|&x| x == 0x22));
            assert_eq!(a.page_refcounts(), vec![1]);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let stats = pool.stats();
    eprintln!("{stats:?}");
    assert!(stats.cow_copies > 0, "no write found its page still shared");
    assert_eq!(
        pool.pages_available(),
        PAGES,
        "a page or a reservation leaked"
    );
    assert_eq!(pool.page_pool().free_objects(), PAGES);
}
