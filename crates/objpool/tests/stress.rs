//! Many concurrent work streams (tokio tasks on two workers, plus OS threads
//! blocking on reservations) reserve random sets of objects in the fixed rank
//! order over a hierarchy base → children → grandchild → compound, while a
//! ticker bleeds idle pools down. Shows, within a time bound: no deadlock,
//! every stream finishes all its work items, no object is ever handed out
//! twice, and every object and unit is back in the base pools at the end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sanvirt_objpool::{
    block_on, ranks, ChildLimits, CompoundPool, CompoundReservation, Part, Pool, Rank, Reservation,
    WorkItem,
};

/// Object counts (control blocks, pages, IOBs) of the roomy run.
const ROOMY: [u32; 3] = [24, 160, 24];
/// Of the tight run: barely above the sum of the child pools' floors
/// (4, 40, 4) plus one largest request, so base pools are always short.
const TIGHT: [u32; 3] = [6, 56, 6];
const TASK_STREAMS: usize = 24;
const THREAD_STREAMS: usize = 4;
const ITEMS_PER_STREAM: usize = 2_000;
/// Generous for two busy cores; a deadlock never finishes.
const DEADLINE: Duration = Duration::from_secs(120);

/// Marks objects in use: handing one out twice trips the swap.
struct InUse(Vec<AtomicBool>);

impl InUse {
    fn new(n: u32) -> InUse {
        InUse((0..n).map(|_| AtomicBool::new(false)).collect())
    }
    fn take(&self, o: u32) {
        assert!(
            !self.0[o as usize].swap(true, Ordering::SeqCst),
            "object {o} handed out twice"
        );
    }
    fn give(&self, o: u32) {
        assert!(
            self.0[o as usize].swap(false, Ordering::SeqCst),
            "object {o} freed twice"
        );
    }
}

struct H {
    cb: Pool<u32>,
    pages: Pool<u32>,
    iobs: Pool<u32>,
    /// Ranked pools work items pick from, in rank order.
    fe_cb: Pool<u32>,
    fe_pages: Pool<u32>,
    cache_pages: Pool<u32>,
    hot_pages: Pool<u32>,
    fe_iobs: Pool<u32>,
    remote: CompoundPool,
    r_cb: Part<u32>,
    r_pages: Part<u32>,
    r_iobs: Part<u32>,
    used: [InUse; 3],
    items_done: AtomicUsize,
    objects: [u32; 3],
}

fn limits(ad: usize, ab: usize, quota: usize) -> ChildLimits {
    ChildLimits::new(ad, ab).with_quota(quota).with_idle_ms(20)
}

impl H {
    fn new(objects: [u32; 3]) -> H {
        let cb = Pool::base("cb", ranks::CONTROL_BLOCK, (0..objects[0]).collect());
        let pages = Pool::base("pages", ranks::PAGE, (0..objects[1]).collect());
        let iobs = Pool::base("iobs", ranks::IOB, (0..objects[2]).collect());
        let fe_cb = cb
            .child("fe.cb", Rank(ranks::CONTROL_BLOCK.0 + 10), limits(2, 6, 12))
            .unwrap();
        let fe_pages = pages
            .child("fe.pages", Rank(ranks::PAGE.0 + 10), limits(16, 48, 96))
            .unwrap();
        let cache_pages = pages
            .child("cache.pages", Rank(ranks::PAGE.0 + 20), limits(8, 32, 80))
            .unwrap();
        let hot_pages = cache_pages
            .child("cache.hot", Rank(ranks::PAGE.0 + 30), limits(8, 16, 24))
            .unwrap();
        let fe_iobs = iobs
            .child("fe.iobs", Rank(ranks::IOB.0 + 10), limits(2, 6, 12))
            .unwrap();
        let mut b = CompoundPool::builder();
        let r_cb = b.part(&cb, 1);
        let r_pages = b.part(&cache_pages, 4);
        let r_iobs = b.part(&iobs, 1);
        let remote = b
            .build("remote", Rank(ranks::IOB.0 + 500), limits(2, 4, 8))
            .unwrap();
        H {
            cb,
            pages,
            iobs,
            fe_cb,
            fe_pages,
            cache_pages,
            hot_pages,
            fe_iobs,
            remote,
            r_cb,
            r_pages,
            r_iobs,
            used: objects.map(InUse::new),
            items_done: AtomicUsize::new(0),
            objects,
        }
    }

    /// The simple pools in rank order, with the object type index and the
    /// largest request (antideadlock threshold).
    fn simple(&self) -> [(&Pool<u32>, usize, usize); 5] {
        [
            (&self.fe_cb, 0, 2),
            (&self.fe_pages, 1, 16),
            (&self.cache_pages, 1, 8),
            (&self.hot_pages, 1, 8),
            (&self.fe_iobs, 2, 2),
        ]
    }
}

/// xorshift64*: deterministic per stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A compound reservation and its control blocks, pages and IOBs.
type CompoundHeld<'h> = (CompoundReservation<'h>, Vec<u32>, Vec<u32>, Vec<u32>);

/// What one work item holds.
struct Held<'h> {
    simple: Vec<(Reservation<'h, u32>, usize, Vec<u32>)>,
    compound: Option<CompoundHeld<'h>>,
}

fn plan(rng: &mut Rng) -> (Vec<(usize, usize)>, usize) {
    // Each pool with probability 1/2, in rank order; compound last (highest rank).
    let mut picks = Vec::new();
    for i in 0..5 {
        if rng.below(2) == 0 {
            picks.push((i, 0));
        }
    }
    let units = if rng.below(3) == 0 {
        1 + rng.below(2)
    } else {
        0
    };
    for p in &mut picks {
        p.1 = rng.below(usize::MAX);
    }
    (picks, units)
}

fn use_objects<'h>(h: &'h H, held: &mut Held<'h>, rng: &mut Rng) {
    for (r, ty, objs) in &mut held.simple {
        let n = rng.below(r.reserved() + 1);
        for _ in 0..n {
            let o = r.allocate().expect("reserved");
            h.used[*ty].take(o);
            objs.push(o);
        }
    }
    if let Some((r, cbs, pages, iobs)) = &mut held.compound {
        for _ in 0..r.units() {
            let o = r.allocate(&h.r_cb).expect("reserved");
            h.used[0].take(o);
            cbs.push(o);
            for _ in 0..4 {
                let o = r.allocate(&h.r_pages).expect("reserved");
                h.used[1].take(o);
                pages.push(o);
            }
            let o = r.allocate(&h.r_iobs).expect("reserved");
            h.used[2].take(o);
            iobs.push(o);
        }
    }
}

fn release(h: &H, held: Held<'_>) {
    for (mut r, ty, objs) in held.simple {
        for o in objs {
            h.used[ty].give(o);
            r.free(o);
        }
    }
    if let Some((mut r, cbs, pages, iobs)) = held.compound {
        for o in cbs {
            h.used[0].give(o);
            r.free(&h.r_cb, o);
        }
        for o in pages {
            h.used[1].give(o);
            r.free(&h.r_pages, o);
        }
        for o in iobs {
            h.used[2].give(o);
            r.free(&h.r_iobs, o);
        }
    }
    h.items_done.fetch_add(1, Ordering::Relaxed);
}

async fn task_stream(h: Arc<H>, seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..ITEMS_PER_STREAM {
        let (picks, units) = plan(&mut rng);
        let mut work = WorkItem::new();
        let mut held = Held {
            simple: Vec::new(),
            compound: None,
        };
        let pools = h.simple();
        for (i, x) in picks {
            let (pool, ty, ad) = pools[i];
            let n = 1 + x % ad;
            let r = pool
                .reserve(&mut work, n)
                .await
                .expect("within antideadlock");
            held.simple.push((r, ty, Vec::new()));
        }
        if units > 0 {
            let r = h
                .remote
                .reserve(&mut work, units)
                .await
                .expect("within antideadlock");
            held.compound = Some((r, Vec::new(), Vec::new(), Vec::new()));
        }
        use_objects(&h, &mut held, &mut rng);
        // Hold for a while, so that streams overlap and contend.
        for _ in 0..rng.below(4) {
            tokio::task::yield_now().await;
        }
        release(&h, held);
    }
}

fn thread_stream(h: &H, seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..ITEMS_PER_STREAM {
        let (picks, units) = plan(&mut rng);
        let mut work = WorkItem::new();
        let mut held = Held {
            simple: Vec::new(),
            compound: None,
        };
        let pools = h.simple();
        for (i, x) in picks {
            let (pool, ty, ad) = pools[i];
            let n = 1 + x % ad;
            // Mix non-blocking attempts with waiting ones.
            let r = match pool.try_reserve(&mut work, n) {
                Ok(r) => r,
                Err(_) => block_on(pool.reserve(&mut work, n)).expect("within antideadlock"),
            };
            held.simple.push((r, ty, Vec::new()));
        }
        if units > 0 {
            let r = block_on(h.remote.reserve(&mut work, units)).expect("within antideadlock");
            held.compound = Some((r, Vec::new(), Vec::new(), Vec::new()));
        }
        use_objects(h, &mut held, &mut rng);
        for _ in 0..rng.below(4) {
            std::thread::yield_now();
        }
        release(h, held);
    }
}

#[test]
fn concurrent_streams_make_progress_without_leaks() {
    run(ROOMY);
}

#[test]
fn concurrent_streams_make_progress_when_base_pools_are_tight() {
    run(TIGHT);
}

fn run(objects: [u32; 3]) {
    let h = Arc::new(H::new(objects));
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Fake clock: advances 5 ms per real millisecond, so idle pools bleed.
    let ticker = {
        let (h, stop) = (Arc::clone(&h), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut now = 0;
            while !stop.load(Ordering::Relaxed) {
                now += 5;
                for p in [&h.cb, &h.pages, &h.iobs] {
                    p.tick(now);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let threads: Vec<_> = (0..THREAD_STREAMS)
        .map(|i| {
            let h = Arc::clone(&h);
            std::thread::spawn(move || thread_stream(&h, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1000)))
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASK_STREAMS)
            .map(|i| tokio::spawn(task_stream(Arc::clone(&h), 0x2545_f491 ^ (i as u64 + 1))))
            .collect();
        let all = async {
            for t in tasks {
                t.await.expect("stream panicked");
            }
        };
        tokio::time::timeout(DEADLINE, all)
            .await
            .unwrap_or_else(|_| panic!("deadlock: streams stuck after {DEADLINE:?}: {}", dump(&h)));
    });
    for t in threads {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let deadline = Instant::now() + left;
        while !t.is_finished() {
            assert!(
                Instant::now() < deadline,
                "deadlock in thread streams: {}",
                dump(&h)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("thread stream panicked");
    }
    stop.store(true, Ordering::Relaxed);
    ticker.join().unwrap();
    eprintln!("stress: {:?}, {}", start.elapsed(), dump(&h));
    assert_eq!(
        h.items_done.load(Ordering::Relaxed),
        (TASK_STREAMS + THREAD_STREAMS) * ITEMS_PER_STREAM,
        "every stream completed every work item"
    );
    let h = Arc::into_inner(h).expect("all streams done");
    let stats = [
        h.fe_cb.stats(),
        h.fe_pages.stats(),
        h.cache_pages.stats(),
        h.hot_pages.stats(),
        h.fe_iobs.stats(),
        h.remote.stats(),
    ];
    let waits: u64 = stats.iter().map(|s| s.waits).sum();
    assert!(waits > 0, "the load must make streams wait");
    for s in &stats {
        assert_eq!(s.reserved, s.spare + s.granted + s.cached);
        assert!(s.reserved >= s.floor);
        assert_eq!(s.allocated, 0);
    }
    let H {
        cb,
        pages,
        iobs,
        fe_cb,
        fe_pages,
        cache_pages,
        hot_pages,
        fe_iobs,
        remote,
        r_cb,
        r_pages,
        r_iobs,
        objects,
        ..
    } = h;
    drop((
        fe_cb, fe_pages, hot_pages, fe_iobs, remote, r_cb, r_pages, r_iobs,
    ));
    drop(cache_pages);
    for (p, n) in [&cb, &pages, &iobs].into_iter().zip(objects) {
        assert_eq!(p.spare(), n as usize, "all units back in {}", p.name());
        assert_eq!(
            p.free_objects(),
            n as usize,
            "all objects back in {}",
            p.name()
        );
    }
}

fn dump(h: &H) -> String {
    let mut s = format!("items done {}; ", h.items_done.load(Ordering::Relaxed));
    for p in [
        &h.cb,
        &h.pages,
        &h.iobs,
        &h.fe_cb,
        &h.fe_pages,
        &h.cache_pages,
        &h.hot_pages,
        &h.fe_iobs,
    ] {
        s += &format!("{}: {:?}; ", p.name(), p.stats());
    }
    s += &format!("remote: {:?}", h.remote.stats());
    s
}
