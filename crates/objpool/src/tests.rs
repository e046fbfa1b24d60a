use super::*;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex as StdMutex;
use std::task::{Context, Poll, Waker};

fn indexes(n: u32) -> Vec<u32> {
    (0..n).collect()
}

fn base(n: u32) -> Pool<u32> {
    Pool::base("base", Rank(1), indexes(n))
}

/// Polls once with a no-op waker.
fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    std::pin::Pin::new(f).poll(&mut cx)
}

fn check<T: Send>(p: &Pool<T>) {
    let s = p.stats();
    assert_eq!(
        s.reserved,
        s.spare + s.granted + s.cached,
        "held == spare + granted + cached in {}",
        p.name()
    );
}

#[test]
fn base_reserve_allocate_free_unreserve() {
    let p = base(4);
    let mut w = WorkItem::new();
    let mut r = p.try_reserve(&mut w, 3).unwrap();
    assert_eq!(p.spare(), 1);
    let a = r.allocate().unwrap();
    let b = r.allocate().unwrap();
    assert_ne!(a, b);
    assert_eq!(p.stats().allocated, 2);
    r.free(a);
    // The unit stays reserved after free.
    assert_eq!(p.spare(), 1);
    let c = r.allocate().unwrap();
    let d = r.allocate().unwrap();
    assert!(matches!(r.allocate(), Err(PoolError::NotReserved { .. })));
    r.free(b);
    r.free(c);
    r.free(d);
    r.unreserve(1);
    assert_eq!(p.spare(), 2);
    drop(r);
    assert_eq!(p.spare(), 4);
    assert_eq!(p.free_objects(), 4);
    check(&p);
}

#[test]
fn exhaustion_and_too_large_are_reported() {
    let p = base(4);
    let mut w = WorkItem::new();
    let _r = p.try_reserve(&mut w, 3).unwrap();
    let e = p.try_reserve(&mut WorkItem::new(), 2).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::Exhausted {
                requested: 2,
                spare: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = p.try_reserve(&mut WorkItem::new(), 5).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::TooLarge {
                requested: 5,
                limit: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn antideadlock_threshold_that_cannot_be_reserved_fails_creation() {
    let p = base(10);
    let a = p.child("a", Rank(10), ChildLimits::new(6, 6)).unwrap();
    assert_eq!(p.spare(), 4);
    assert_eq!(a.stats().reserved, 6);
    let e = p.child("b", Rank(11), ChildLimits::new(5, 5)).unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::AntideadlockUnavailable {
                antideadlock: 5,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("cannot be reserved from base"),
        "{e}"
    );
    // Nothing leaked by the failed creation.
    assert_eq!(p.spare(), 4);
    assert_eq!(p.stats().floor, 6);
    let b = p.child("b", Rank(11), ChildLimits::new(4, 4)).unwrap();
    assert_eq!(p.spare(), 0);
    drop(a);
    drop(b);
    assert_eq!(p.spare(), 10);
    assert_eq!(p.stats().floor, 0);
}

#[test]
fn invalid_limits_are_refused() {
    let p = base(10);
    for l in [
        ChildLimits::new(0, 1),
        ChildLimits::new(3, 2),
        ChildLimits::new(2, 5).with_quota(4),
    ] {
        let e = p.child("c", Rank(10), l).unwrap_err();
        assert!(matches!(e, PoolError::InvalidConfig { .. }), "{e}");
    }
}

#[test]
fn child_over_reserves_to_antibottleneck_then_only_what_is_asked() {
    let p = base(100);
    let c = p.child("c", Rank(10), ChildLimits::new(4, 10)).unwrap();
    assert_eq!(c.stats().reserved, 4);
    let r1 = c.try_reserve(&mut WorkItem::new(), 3).unwrap();
    assert_eq!(
        c.stats().reserved,
        4,
        "served from the antideadlock reservation"
    );
    let r2 = c.try_reserve(&mut WorkItem::new(), 3).unwrap();
    // Short by 2: over-reserved up to the antibottleneck threshold.
    assert_eq!(c.stats().reserved, 10);
    assert_eq!(c.spare(), 4);
    let e = c.try_reserve(&mut WorkItem::new(), 5).unwrap_err();
    assert!(matches!(e, PoolError::TooLarge { limit: 4, .. }), "{e}");
    let r3 = c.try_reserve(&mut WorkItem::new(), 4).unwrap();
    let r4 = c.try_reserve(&mut WorkItem::new(), 3).unwrap();
    // Above the threshold the pool holds only what is asked.
    assert_eq!(c.stats().reserved, 13);
    assert_eq!(c.spare(), 0);
    check(&c);
    check(&p);
    drop(r4);
    // Bleeds readily down to the antibottleneck threshold, not below.
    assert_eq!(c.stats().reserved, 10);
    drop((r1, r2, r3));
    assert_eq!(c.stats().reserved, 10);
    assert_eq!(p.spare(), 90);
    check(&c);
}

#[test]
fn bleeds_below_antibottleneck_only_after_inactivity() {
    let p = base(100);
    let c = p
        .child("c", Rank(10), ChildLimits::new(2, 10).with_idle_ms(500))
        .unwrap();
    drop(c.try_reserve(&mut WorkItem::new(), 2).unwrap());
    drop(c.try_reserve(&mut WorkItem::new(), 2).unwrap());
    assert_eq!(c.stats().reserved, 2, "no growth needed yet");
    let r = c.try_reserve(&mut WorkItem::new(), 1).unwrap();
    let r2 = c.try_reserve(&mut WorkItem::new(), 2).unwrap();
    assert_eq!(c.stats().reserved, 10);
    drop((r, r2));
    p.tick(0);
    p.tick(400);
    assert_eq!(c.stats().reserved, 10, "not idle long enough");
    // Activity restarts the idle period.
    drop(c.try_reserve(&mut WorkItem::new(), 1).unwrap());
    p.tick(600);
    assert_eq!(c.stats().reserved, 10, "active since the last tick");
    p.tick(1000);
    assert_eq!(c.stats().reserved, 10, "only 400 ms idle");
    p.tick(1100);
    assert_eq!(c.stats().reserved, 2, "idle 500 ms: down to antideadlock");
    assert_eq!(c.stats().bled, 8);
    assert_eq!(p.spare(), 98);
}

#[test]
fn quota_caps_what_a_pool_holds() {
    let p = base(100);
    let c = p
        .child("c", Rank(10), ChildLimits::new(4, 4).with_quota(6))
        .unwrap();
    let r1 = c.try_reserve(&mut WorkItem::new(), 4).unwrap();
    let r2 = c.try_reserve(&mut WorkItem::new(), 2).unwrap();
    assert_eq!(c.stats().reserved, 6);
    let e = c.try_reserve(&mut WorkItem::new(), 1).unwrap_err();
    assert!(matches!(e, PoolError::Exhausted { .. }), "{e}");
    assert_eq!(p.spare(), 94, "the base had plenty: the quota refused");
    // A waiting request waits for the pool's own clients, not the base.
    let mut w = WorkItem::new();
    let mut f = c.reserve(&mut w, 2);
    assert!(poll_once(&mut f).is_pending());
    assert_eq!(c.stats().reserved, 6);
    drop(r2);
    let r3 = match poll_once(&mut f) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("freed units go to the waiter"),
    };
    drop((r1, r3));
    check(&c);
}

#[test]
fn base_reclaims_idle_reservations_from_children() {
    let p = base(20);
    let a = p.child("a", Rank(10), ChildLimits::new(2, 8)).unwrap();
    let aa = a.child("aa", Rank(11), ChildLimits::new(2, 6)).unwrap();
    let b = p.child("b", Rank(12), ChildLimits::new(2, 10)).unwrap();
    assert_eq!(a.stats().floor, 4, "own antideadlock + aa's");
    // Clients make everybody grow, then go idle.
    for pool in [&aa, &b] {
        let rs: Vec<_> = (0..4)
            .map(|_| pool.try_reserve(&mut WorkItem::new(), 2).unwrap())
            .collect();
        drop(rs);
    }
    let grown = a.stats().reserved + b.stats().reserved;
    assert!(grown > 6, "children grew: {grown}");
    assert_eq!(p.spare() + grown, 20);
    // A direct client of the base wants everything above the floors (2 + 4):
    // children, and aa through a, give back their idle reservations.
    let big = p.try_reserve(&mut WorkItem::new(), 14).unwrap();
    assert_eq!(a.stats().reserved, 4);
    assert_eq!(aa.stats().reserved, 2);
    assert_eq!(b.stats().reserved, 2);
    assert!(aa.stats().reclaimed > 0 && b.stats().reclaimed > 0);
    // Nothing is reclaimed below the floors.
    assert!(p.try_reserve(&mut WorkItem::new(), 1).is_err());
    for x in [&p, &a, &aa, &b] {
        check(x);
    }
    drop(big);
    drop((aa, a, b));
    assert_eq!(p.spare(), 20);
}

struct Cache {
    pool: Pool<u32>,
    held: StdMutex<Vec<u32>>,
}

impl Reclaim for Cache {
    fn reclaim(&self, wanted: usize) -> usize {
        let Ok(mut held) = self.held.try_lock() else {
            return 0;
        };
        let mut n = 0;
        while n < wanted {
            let Some(o) = held.pop() else { break };
            self.pool.free_cached(o);
            n += 1;
        }
        n
    }
}

#[test]
fn cached_objects_are_adopted_and_reclaimed() {
    let p = base(10);
    let c = p.child("cache", Rank(10), ChildLimits::new(1, 1)).unwrap();
    let cache = Arc::new(Cache {
        pool: c.clone(),
        held: StdMutex::new(Vec::new()),
    });
    let weak: std::sync::Weak<dyn Reclaim> = Arc::downgrade(&cache) as _;
    c.set_reclaimer(weak);
    let keep = |r: &mut Reservation<'_, u32>| {
        let page = r.allocate().unwrap();
        cache.held.lock().unwrap().push(page);
        // The data stays in the page; the reservation goes.
        r.cache(1);
    };
    keep(&mut c.try_reserve(&mut WorkItem::new(), 1).unwrap());
    keep(&mut c.try_reserve(&mut WorkItem::new(), 1).unwrap());
    assert_eq!(c.stats().cached, 2);
    assert_eq!(p.free_objects(), 8);
    check(&c);
    // A cache hit: a new reservation adopts a cached page, then frees it.
    {
        let mut hit = c.try_reserve(&mut WorkItem::new(), 1).unwrap();
        hit.adopt().unwrap();
        let page = cache.held.lock().unwrap().pop().unwrap();
        assert_eq!(c.stats().cached, 1);
        hit.free(page);
    }
    check(&c);
    assert_eq!(p.free_objects(), 9);
    keep(&mut c.try_reserve(&mut WorkItem::new(), 1).unwrap());
    assert_eq!(c.stats().cached, 2);
    assert_eq!(p.spare(), 8);
    // Someone needs 9: one cached page is reclaimed from its holder.
    let all = p.try_reserve(&mut WorkItem::new(), 9).unwrap();
    assert_eq!(c.stats().cached, 1);
    assert_eq!(p.free_objects(), 9);
    assert_eq!(c.stats().cache_reclaimed, 1);
    drop(all);
    assert_eq!(cache.reclaim(10), 1);
    drop(c);
    drop(cache);
    assert_eq!(p.spare(), 10);
}

#[test]
fn waiters_are_served_in_fifo_order_and_block_newcomers() {
    let p = base(4);
    let mut held = p.try_reserve(&mut WorkItem::new(), 4).unwrap();
    let (mut w1, mut w2) = (WorkItem::new(), WorkItem::new());
    let mut f1 = p.reserve(&mut w1, 3);
    let mut f2 = p.reserve(&mut w2, 1);
    assert!(poll_once(&mut f1).is_pending());
    assert!(poll_once(&mut f2).is_pending());
    held.unreserve(1);
    // One unit is free but the head needs 3: the second may not overtake it,
    // and neither may a newcomer.
    assert!(poll_once(&mut f2).is_pending());
    assert!(p.try_reserve(&mut WorkItem::new(), 1).is_err());
    held.unreserve(2);
    let r1 = match poll_once(&mut f1) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("head served first"),
    };
    assert!(poll_once(&mut f2).is_pending());
    drop(held);
    assert!(matches!(poll_once(&mut f2), Poll::Ready(Ok(_))));
    drop(r1);
    assert_eq!(p.stats().waits, 2);
}

#[test]
fn cancelled_waiter_returns_or_withdraws() {
    let p = base(2);
    let held = p.try_reserve(&mut WorkItem::new(), 2).unwrap();
    let mut w = WorkItem::new();
    let mut f = p.reserve(&mut w, 2);
    assert!(poll_once(&mut f).is_pending());
    drop(f);
    assert_eq!(p.stats().waiters, 0);
    let mut w = WorkItem::new();
    let mut f = p.reserve(&mut w, 1);
    assert!(poll_once(&mut f).is_pending());
    drop(held); // grants f while nobody polls it
    drop(f); // its grant comes back
    assert_eq!(p.spare(), 2);
}

#[test]
fn waiting_child_grows_from_parent_when_a_sibling_releases() {
    let p = base(10);
    let a = p.child("a", Rank(10), ChildLimits::new(2, 8)).unwrap();
    let b = p.child("b", Rank(11), ChildLimits::new(2, 2)).unwrap();
    // a's clients hold 8, b's hold 2: the base is empty.
    let ra: Vec<_> = (0..4)
        .map(|_| a.try_reserve(&mut WorkItem::new(), 2).unwrap())
        .collect();
    let rb = b.try_reserve(&mut WorkItem::new(), 2).unwrap();
    assert_eq!(a.stats().reserved, 8);
    assert_eq!(p.spare(), 0);
    // b's next client must wait: b asks the base, the base is short.
    let mut w = WorkItem::new();
    let mut f = b.reserve(&mut w, 1);
    assert!(poll_once(&mut f).is_pending());
    assert_eq!(
        p.stats().waiters,
        1,
        "b's growth request queued at the base"
    );
    // When one of a's clients unreserves, a sees the base's pressure and gives
    // back down to its floor; the base serves b's growth.
    let mut ra = ra.into_iter();
    drop(ra.next());
    let got = poll_once(&mut f);
    assert!(
        matches!(got, Poll::Ready(Ok(_))),
        "b served after a released"
    );
    assert_eq!(a.stats().reserved, 6);
    drop(got);
    drop(f);
    drop((ra, rb));
    drop((a, b));
    assert_eq!(p.spare(), 10);
}

#[test]
#[cfg(debug_assertions)]
#[should_panic(expected = "fixed rank order")]
fn reserving_out_of_order_is_caught() {
    let lo = Pool::base("lo", Rank(1), indexes(4));
    let hi = Pool::base("hi", Rank(2), indexes(4));
    let mut w = WorkItem::new();
    let _h = hi.try_reserve(&mut w, 1).unwrap();
    let _l = lo.try_reserve(&mut w, 1);
}

#[derive(Debug, PartialEq)]
struct ControlBlock(u32);

#[test]
fn compound_pool_reserves_all_parts_in_one_step() {
    let cbs = Pool::base(
        "cb",
        ranks::CONTROL_BLOCK,
        (0..8).map(ControlBlock).collect(),
    );
    let pages = Pool::base("pages", ranks::PAGE, indexes(64));
    let iobs = Pool::base("iobs", ranks::IOB, indexes(8));
    let mut b = CompoundPool::builder();
    let cb = b.part(&cbs, 1);
    let pg = b.part(&pages, 8);
    let io = b.part(&iobs, 1);
    let wr = b
        .build(
            "write",
            Rank(ranks::IOB.0 + 500),
            ChildLimits::new(2, 4).with_quota(4),
        )
        .unwrap();
    assert_eq!((cbs.spare(), pages.spare(), iobs.spare()), (6, 48, 6));
    let mut w = WorkItem::new();
    let mut r = wr.try_reserve(&mut w, 2).unwrap();
    assert_eq!(wr.stats().reserved, 2);
    assert!(matches!(
        wr.try_reserve(&mut WorkItem::new(), 3),
        Err(PoolError::TooLarge { .. })
    ));
    let c = r.allocate(&cb).unwrap();
    let ps: Vec<u32> = (0..16).map(|_| r.allocate(&pg).unwrap()).collect();
    assert!(r.allocate(&pg).is_err());
    let i = r.allocate(&io).unwrap();
    r.free(&cb, c);
    for p in ps {
        r.free(&pg, p);
    }
    r.free(&io, i);
    let r2 = wr.try_reserve(&mut WorkItem::new(), 1).unwrap();
    // Short by 1: over-reserved to the antibottleneck threshold, 4 compound
    // objects, taken from every parent in one step.
    assert_eq!(wr.stats().reserved, 4);
    assert_eq!((cbs.spare(), pages.spare(), iobs.spare()), (4, 32, 4));
    // Quota 4: a fifth compound object is never held.
    let r3 = wr.try_reserve(&mut WorkItem::new(), 1).unwrap();
    assert!(wr.try_reserve(&mut WorkItem::new(), 1).is_err());
    assert_eq!((cbs.spare(), pages.spare(), iobs.spare()), (4, 32, 4));
    drop((r, r2, r3));
    drop(wr);
    assert_eq!((cbs.spare(), pages.spare(), iobs.spare()), (8, 64, 8));
}

#[test]
fn compound_parts_must_follow_rank_order() {
    let pages = Pool::base("pages", ranks::PAGE, indexes(64));
    let cbs = Pool::base("cb", ranks::CONTROL_BLOCK, indexes(8));
    let mut b = CompoundPool::builder();
    b.part(&pages, 8);
    b.part(&cbs, 1);
    let e = b
        .build("bad", Rank(5000), ChildLimits::new(1, 1))
        .unwrap_err();
    assert!(matches!(e, PoolError::InvalidConfig { .. }), "{e}");
    assert_eq!(pages.spare(), 64);
}

#[test]
fn line_of_credit_between_two_in_process_nodes() {
    use credit::*;
    // Node M (provider): control blocks and pages, a compound pool bound to
    // the line for node N's cache writes.
    let m_cbs = Pool::base(
        "m.cb",
        ranks::CONTROL_BLOCK,
        (0..16).map(ControlBlock).collect(),
    );
    let m_pages = Pool::base("m.pages", ranks::PAGE, indexes(128));
    let mut b = CompoundPool::builder();
    let cb = b.part(&m_cbs, 1);
    let pg = b.part(&m_pages, 8);
    let for_n = b
        .build(
            "m.for-n",
            Rank(ranks::PAGE.0 + 900),
            ChildLimits::new(2, 4).with_quota(8),
        )
        .unwrap();
    let provider = CreditProvider::new(LineId(7), for_n.clone());
    // Node N (consumer): a base pool of credits bound to the line.
    let consumer = CreditConsumer::new(LineId(7), "n.credits.m", ranks::CREDIT);
    assert!(
        consumer.try_reserve(&mut WorkItem::new()).is_err(),
        "no credit before activation"
    );

    // Activation: the provider exports its antideadlock threshold.
    deliver(&provider, &consumer, provider.grant(2).unwrap()).unwrap();
    assert_eq!(consumer.credits(), 2);
    assert_eq!(for_n.stats().granted, 2);

    // N sends two requests; a third must wait for a credit.
    let c1 = consumer.try_reserve(&mut WorkItem::new()).unwrap();
    let c2 = consumer.try_reserve(&mut WorkItem::new()).unwrap();
    let mut w3 = WorkItem::new();
    let mut f3 = consumer.reserve(&mut w3);
    assert!(poll_once(&mut f3).is_pending());
    assert_eq!(consumer.demand(), 1);

    // M serves both from the reserved compound objects.
    let mut work1 = provider.begin().unwrap();
    let mut work2 = provider.begin().unwrap();
    assert!(matches!(
        provider.begin(),
        Err(CreditError::Overdrawn { .. })
    ));
    let o1 = (work1.allocate(&cb).unwrap(), work1.allocate(&pg).unwrap());
    let o2 = (work2.allocate(&cb).unwrap(), work2.allocate(&pg).unwrap());
    assert_ne!(o1.0, o2.0);
    work1.free(&cb, o1.0);
    work1.free(&pg, o1.1);
    drop(work1);
    // Response to N: the credit is unreserved and the waiter gets it.
    drop(c1);
    let c3 = match poll_once(&mut f3) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("credit returned to the waiter"),
    };
    // N reports demand; M grants more credits, adaptively within its quota.
    let mut w4 = WorkItem::new();
    let mut f4 = consumer.reserve(&mut w4);
    assert!(poll_once(&mut f4).is_pending());
    let grant = provider.rebalance(consumer.demand(), 2).unwrap();
    deliver(&provider, &consumer, grant).unwrap();
    assert_eq!(consumer.credits(), 3);
    let c4 = match poll_once(&mut f4) {
        Poll::Ready(r) => r.unwrap(),
        Poll::Pending => panic!("new credit"),
    };
    work2.free(&cb, o2.0);
    work2.free(&pg, o2.1);
    drop(work2);
    drop((c2, c3, c4));
    // Idle: M revokes down to 2; N returns what is unused.
    let revoke = provider.rebalance(0, 2).unwrap();
    deliver(&provider, &consumer, revoke).unwrap();
    assert_eq!(consumer.credits(), 2);
    assert_eq!(provider.exported(), 2);
    assert!(provider
        .on_message(CreditMsg::Return {
            line: LineId(7),
            credits: 5
        })
        .is_err());
    drop(provider);
    assert_eq!(for_n.stats().granted, 0);
    drop(for_n);
    assert_eq!((m_cbs.spare(), m_pages.spare()), (16, 128));
}

#[test]
fn block_on_waits_for_another_thread() {
    let p = Arc::new(base(1));
    let r = p.try_reserve_detached(1);
    assert!(r.is_ok());
    let done = Arc::new(AtomicUsize::new(0));
    let t = {
        let (p, done) = (Arc::clone(&p), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut w = WorkItem::new();
            let r = block_on(p.reserve(&mut w, 1)).unwrap();
            done.store(1, Ordering::SeqCst);
            drop(r);
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(done.load(Ordering::SeqCst), 0);
    p.unreserve_detached(1);
    t.join().unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 1);
    assert_eq!(p.spare(), 1);
}
