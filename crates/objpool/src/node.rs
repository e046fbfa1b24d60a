//! The accounting core shared by every pool kind. It knows units, not object
//! types: typed pools ([`crate::Pool`], [`crate::CompoundPool`]) wrap it.
//!
//! # Locking
//!
//! `spare` lives in one atomic word so that the common reserve/unreserve is
//! lock-free. Everything else (`held`, the waiter queue, growth in progress)
//! is under the per-node mutex. **No code holds two node mutexes at once**:
//! every call into a parent or child happens after releasing our own, so the
//! hierarchy cannot deadlock on its locks whatever the direction of the call
//! (growth goes up, reclaim goes down).
//!
//! # The word
//!
//! `gen:22 | spare:40 | BLEED:1 | WAITERS:1`. Flags change only under the
//! mutex; `spare` changes by CAS (take) or `fetch_add` (put) from anywhere.
//! * `WAITERS`: requests are queued; the fast take fails (FIFO: newcomers
//!   must not overtake) and a put must run [`Node::settle`] to serve them.
//! * `BLEED`: `held` is above what the pool keeps while active, so a put must
//!   settle to give the excess back.
//! * `gen` counts takes: [`Node::tick`] detects inactivity by an unchanged
//!   `gen`, so the hot path never reads a clock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;

use parking_lot::Mutex;

use crate::{
    PoolError, PoolStats, Rank, Reclaim, POOL_OBJECTS_MAX, TRY_ATTEMPTS_MAX, WAITERS_MAX,
    WAITERS_PREALLOCATED,
};

const WAITERS: u64 = 1;
const BLEED: u64 = 2;
const FLAGS: u64 = WAITERS | BLEED;
const SPARE_SHIFT: u32 = 2;
const SPARE_BITS: u32 = 40;
const SPARE_MASK: u64 = ((1u64 << SPARE_BITS) - 1) << SPARE_SHIFT;
const GEN_SHIFT: u32 = SPARE_SHIFT + SPARE_BITS;
const GEN_ONE: u64 = 1 << GEN_SHIFT;

// Spare can never reach the gen bits: it is at most `held`, bounded by the
// largest pool (compound units included, since a unit holds >= 1 object).
const _: () = assert!((POOL_OBJECTS_MAX as u64) < (1u64 << SPARE_BITS));

fn spare_of(w: u64) -> usize {
    ((w & SPARE_MASK) >> SPARE_SHIFT) as usize
}

fn gen_of(w: u64) -> u32 {
    (w >> GEN_SHIFT) as u32
}

fn in_word(n: usize) -> u64 {
    (n as u64) << SPARE_SHIFT
}

/// Keeps a hot atomic on its own cache lines (adjacent-line prefetch included).
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Base,
    Child,
    Compound,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub antideadlock: usize,
    pub antibottleneck: usize,
    pub quota: usize,
    pub idle_ms: u64,
}

pub(crate) struct ParentLink {
    pub node: Arc<Node>,
    /// Parent objects per unit of this node (1 except in compound pools).
    pub per_unit: usize,
}

/// Where a queued client learns that its request was granted.
pub(crate) struct WaitSlot {
    state: Mutex<SlotState>,
}

struct SlotState {
    granted: bool,
    waker: Option<Waker>,
}

impl WaitSlot {
    fn new(waker: &Waker) -> Arc<WaitSlot> {
        Arc::new(WaitSlot {
            state: Mutex::new(SlotState {
                granted: false,
                waker: Some(waker.clone()),
            }),
        })
    }

    /// Called under the node mutex, which orders it with cancellation.
    fn grant(&self) {
        let waker = {
            let mut st = self.state.lock();
            st.granted = true;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// True once granted; otherwise remembers `waker` for the grant.
    pub(crate) fn poll(&self, waker: &Waker) -> bool {
        let mut st = self.state.lock();
        if st.granted {
            return true;
        }
        match &st.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => st.waker = Some(waker.clone()),
        }
        false
    }
}

enum Waiter {
    /// A client (work item) waiting for `n` units.
    Task { n: usize, slot: Arc<WaitSlot> },
    /// A child (or compound) pool waiting for `n` objects to grow by;
    /// `part` is this node's index among the child's parents.
    Child {
        node: Arc<Node>,
        part: usize,
        n: usize,
    },
}

/// A growth from the parents in progress: `units` are acquired from each
/// parent in turn (parents are in rank order, so this is the fixed order
/// rule applied to the pool itself). Parents before `part` have given theirs.
struct Growth {
    units: usize,
    part: usize,
    /// A request to parent `part` is in progress or queued there.
    requesting: bool,
}

struct Slow {
    /// Units reserved from the parents (base: capacity).
    held: usize,
    /// Σ floors of child pools, in this node's units.
    children_floor: usize,
    waiters: VecDeque<Waiter>,
    task_waiters: usize,
    growth: Option<Growth>,
    /// `gen` at the last tick that saw activity, and when.
    idle_gen: u32,
    idle_since_ms: Option<u64>,
}

pub(crate) struct Node {
    pub name: Arc<str>,
    pub rank: Rank,
    pub kind: Kind,
    pub limits: Limits,
    parents: Box<[ParentLink]>,
    word: Padded<AtomicU64>,
    /// Mirrors `WAITERS` on a line of its own: descendants read it on every
    /// put, so it must not bounce with `word`.
    pressure: Padded<AtomicBool>,
    /// Largest single request: the antideadlock threshold; for a base pool
    /// what its child pools' thresholds leave of its capacity.
    request_max: AtomicUsize,
    cached: AtomicUsize,
    allocated: AtomicUsize,
    reclaiming: AtomicBool,
    slow: Mutex<Slow>,
    children: Mutex<Vec<Weak<Node>>>,
    reclaimer: Mutex<Option<Weak<dyn Reclaim>>>,
    reclaimed: AtomicU64,
    cache_reclaimed: AtomicU64,
    bled: AtomicU64,
    grown: AtomicU64,
    waits: AtomicU64,
}

impl Node {
    fn new(
        name: Arc<str>,
        rank: Rank,
        kind: Kind,
        limits: Limits,
        parents: Box<[ParentLink]>,
        held: usize,
    ) -> Node {
        Node {
            name,
            rank,
            kind,
            limits,
            parents,
            word: Padded(AtomicU64::new(in_word(held))),
            pressure: Padded(AtomicBool::new(false)),
            request_max: AtomicUsize::new(match kind {
                Kind::Base => held,
                _ => limits.antideadlock,
            }),
            cached: AtomicUsize::new(0),
            allocated: AtomicUsize::new(0),
            reclaiming: AtomicBool::new(false),
            slow: Mutex::new(Slow {
                held,
                children_floor: 0,
                waiters: VecDeque::with_capacity(WAITERS_PREALLOCATED),
                task_waiters: 0,
                growth: None,
                idle_gen: 0,
                idle_since_ms: None,
            }),
            children: Mutex::new(Vec::new()),
            reclaimer: Mutex::new(None),
            reclaimed: AtomicU64::new(0),
            cache_reclaimed: AtomicU64::new(0),
            bled: AtomicU64::new(0),
            grown: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// A base node holding `held` units, able to grow to `capacity_max`.
    pub(crate) fn base(name: Arc<str>, rank: Rank, held: usize, capacity_max: usize) -> Arc<Node> {
        assert!(held <= capacity_max && capacity_max <= POOL_OBJECTS_MAX);
        let limits = Limits {
            antideadlock: capacity_max,
            antibottleneck: capacity_max,
            quota: capacity_max,
            idle_ms: u64::MAX,
        };
        Arc::new(Node::new(
            name,
            rank,
            Kind::Base,
            limits,
            Box::new([]),
            held,
        ))
    }

    /// Creates a child (one parent) or compound (several) node, reserving its
    /// antideadlock threshold from every parent in order.
    pub(crate) fn child(
        name: Arc<str>,
        rank: Rank,
        kind: Kind,
        limits: Limits,
        parents: Vec<ParentLink>,
    ) -> Result<Arc<Node>, PoolError> {
        let ad = limits.antideadlock;
        let mut done = 0;
        let mut failure = None;
        for p in &parents {
            if let Err(e) = p.node.adopt_child(&name, ad * p.per_unit) {
                failure = Some(e);
                break;
            }
            done += 1;
        }
        if let Some(e) = failure {
            for p in &parents[..done] {
                p.node.release_child(ad * p.per_unit, ad * p.per_unit);
            }
            return Err(e);
        }
        let node = Arc::new(Node::new(name, rank, kind, limits, parents.into(), ad));
        for p in node.parents.iter() {
            let mut kids = p.node.children.lock();
            kids.retain(|w| w.strong_count() > 0);
            kids.push(Arc::downgrade(&node));
        }
        Ok(node)
    }

    /// A new child with antideadlock threshold `n` (in our units): raises our
    /// floor (and our ancestors') by `n` and grants the child those `n` units.
    fn adopt_child(self: &Arc<Self>, child: &Arc<str>, n: usize) -> Result<(), PoolError> {
        let unavailable = || PoolError::AntideadlockUnavailable {
            pool: Arc::clone(child),
            parent: Arc::clone(&self.name),
            antideadlock: n,
        };
        if !self.raise_floor(n) {
            return Err(unavailable());
        }
        // Creation is control path: it may pass queued requests.
        if self.try_acquire(n, n, false).is_none() {
            self.lower_floor(n);
            return Err(unavailable());
        }
        Ok(())
    }

    /// Raises the floor by `n` here and, scaled, in every ancestor, and grows
    /// `held` to cover it (a floor is what the pool keeps for good: its own
    /// antideadlock threshold plus its children's floors). False, with
    /// nothing changed, if a quota or the base capacity does not allow it.
    fn raise_floor(self: &Arc<Self>, n: usize) -> bool {
        {
            let mut s = self.slow.lock();
            let cap = match self.kind {
                Kind::Base => s.held,
                _ => self.limits.quota,
            };
            if self.floor(&s) + n > cap {
                return false;
            }
            s.children_floor += n;
            self.update_flags(&s);
        }
        for (i, p) in self.parents.iter().enumerate() {
            if !p.node.raise_floor(n * p.per_unit) {
                for q in &self.parents[..i] {
                    q.node.lower_floor(n * q.per_unit);
                }
                self.lower_floor_here(n);
                return false;
            }
        }
        let missing = {
            let s = self.slow.lock();
            self.floor(&s).saturating_sub(s.held)
        };
        if missing > 0 {
            match self.try_grow(missing, missing) {
                Some(g) => self.absorb(g),
                None => {
                    self.lower_floor(n);
                    return false;
                }
            }
        }
        true
    }

    /// Undoes [`Node::raise_floor`] (units above the new floor are given
    /// back by the usual bleed-down).
    fn lower_floor(self: &Arc<Self>, n: usize) {
        self.lower_floor_here(n);
        for p in self.parents.iter() {
            p.node.lower_floor(n * p.per_unit);
        }
    }

    fn lower_floor_here(&self, n: usize) {
        let mut s = self.slow.lock();
        debug_assert!(s.children_floor >= n);
        s.children_floor -= n;
        self.update_flags(&s);
    }

    /// A child whose floor was `floor` (in our units) goes away, returning `units`.
    fn release_child(self: &Arc<Self>, floor: usize, units: usize) {
        self.lower_floor(floor);
        self.put(units);
    }

    pub(crate) fn set_reclaimer(&self, r: Weak<dyn Reclaim>) {
        *self.reclaimer.lock() = Some(r);
    }

    // ---- the word -------------------------------------------------------

    #[inline]
    pub(crate) fn spare(&self) -> usize {
        spare_of(self.word.0.load(Ordering::Acquire))
    }

    /// The fast path: takes between `min` and `max` units if nobody waits.
    #[inline]
    fn take_fast(&self, min: usize, max: usize) -> Option<usize> {
        let mut w = self.word.0.load(Ordering::Relaxed);
        loop {
            let spare = spare_of(w);
            if w & WAITERS != 0 || spare < min {
                return None;
            }
            let t = spare.min(max);
            let new = w.wrapping_sub(in_word(t)).wrapping_add(GEN_ONE);
            match self
                .word
                .0
                .compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(t),
                Err(now) => w = now,
            }
        }
    }

    /// Takes between `min` and `max` units whatever the flags (the caller has
    /// decided it may). `activity`: counts as a reservation request for
    /// idle detection.
    fn take_any(&self, min: usize, max: usize, activity: bool) -> Option<usize> {
        let mut w = self.word.0.load(Ordering::SeqCst);
        loop {
            let spare = spare_of(w);
            if spare < min {
                return None;
            }
            let t = spare.min(max);
            let mut new = w.wrapping_sub(in_word(t));
            if activity {
                new = new.wrapping_add(GEN_ONE);
            }
            match self
                .word
                .0
                .compare_exchange_weak(w, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(t),
                Err(now) => w = now,
            }
        }
    }

    /// Takes up to `max` spare units to give back (not activity).
    fn take_up_to(&self, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        self.take_any(1, max, false).unwrap_or(0)
    }

    /// Adds units without serving anyone; the caller settles if needed.
    #[inline]
    fn put_quiet(&self, n: usize) -> u64 {
        // SeqCst pairs with the pressure check in `put` (see there).
        self.word.0.fetch_add(in_word(n), Ordering::SeqCst)
    }

    /// Unreserve: gives `n` units back to spare.
    #[inline]
    pub(crate) fn put(self: &Arc<Self>, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.put_quiet(n);
        // The store of our units above and the load of an ancestor's pressure
        // below are both SeqCst, as are the pressure store and the spare read
        // on the reclaiming side: either we see the pressure and give the
        // units back, or the reclaimer sees them in our spare.
        if prev & FLAGS != 0 || self.ancestors_pressured() {
            self.settle();
        }
    }

    #[inline]
    fn ancestors_pressured(&self) -> bool {
        self.parents
            .iter()
            .any(|p| p.node.pressure.0.load(Ordering::SeqCst) || p.node.ancestors_pressured())
    }

    /// Flags must be updated under the mutex only.
    fn update_flags(&self, s: &Slow) {
        let mut want = 0;
        if !s.waiters.is_empty() {
            want |= WAITERS;
        }
        if self.kind != Kind::Base && s.held > self.keep_active(s) {
            want |= BLEED;
        }
        let have = self.word.0.load(Ordering::SeqCst) & FLAGS;
        if have & !want != 0 {
            self.word.0.fetch_and(!(have & !want), Ordering::SeqCst);
        }
        if want & !have != 0 {
            self.word.0.fetch_or(want & !have, Ordering::SeqCst);
        }
        if self.kind == Kind::Base {
            self.request_max
                .store(s.held.saturating_sub(s.children_floor), Ordering::Relaxed);
        }
        let pressured = !s.waiters.is_empty();
        if self.pressure.0.load(Ordering::Relaxed) != pressured {
            self.pressure.0.store(pressured, Ordering::SeqCst);
        }
    }

    // ---- thresholds ------------------------------------------------------

    /// Never given back while the node lives.
    fn floor(&self, s: &Slow) -> usize {
        self.limits.antideadlock_floor(self.kind) + s.children_floor
    }

    /// Kept while active: the antibottleneck threshold (or the floor if higher).
    fn keep_active(&self, s: &Slow) -> usize {
        self.limits.antibottleneck.max(self.floor(s))
    }

    /// A request above the antideadlock threshold (for a base pool: above
    /// what the child pools' thresholds leave) might never be served.
    #[inline]
    pub(crate) fn check_request(&self, n: usize) -> Result<(), PoolError> {
        let limit = self.request_max.load(Ordering::Relaxed);
        if n > limit {
            return Err(PoolError::TooLarge {
                pool: Arc::clone(&self.name),
                requested: n,
                limit,
            });
        }
        Ok(())
    }

    #[cold]
    pub(crate) fn exhausted(&self, requested: usize) -> PoolError {
        PoolError::Exhausted {
            pool: Arc::clone(&self.name),
            requested,
            spare: self.spare(),
            waiters: self.slow.lock().waiters.len(),
        }
    }

    // ---- non-blocking acquisition -----------------------------------------

    /// Reserves between `min` and `max` units without waiting, growing from
    /// the parent or reclaiming from children if needed. `fifo`: refuse if
    /// clients are queued (a new request must not overtake them).
    #[inline]
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        min: usize,
        max: usize,
        fifo: bool,
    ) -> Option<usize> {
        debug_assert!(min <= max);
        if min == 0 {
            return Some(0);
        }
        if let Some(t) = self.take_fast(min, max) {
            return Some(t);
        }
        self.try_acquire_slow(min, max, fifo)
    }

    #[inline(never)]
    fn try_acquire_slow(self: &Arc<Self>, min: usize, max: usize, fifo: bool) -> Option<usize> {
        for _ in 0..TRY_ATTEMPTS_MAX {
            let (short, goal) = {
                let s = self.slow.lock();
                if fifo && s.task_waiters > 0 {
                    return None;
                }
                if let Some(t) = self.take_any(min, max, true) {
                    return Some(t);
                }
                let short = min.saturating_sub(self.spare());
                let mut goal = short;
                if self.kind != Kind::Base {
                    let room = self.limits.quota.saturating_sub(s.held);
                    if room < short {
                        return None;
                    }
                    if !self.ancestors_pressured() {
                        // Over-reserve towards the antibottleneck threshold.
                        goal = short
                            .max(self.keep_active(&s).saturating_sub(s.held))
                            .min(room);
                    }
                }
                (short, goal)
            };
            if short == 0 {
                continue; // spare rose meanwhile
            }
            if self.kind == Kind::Base {
                // Reclaimed units may also arrive by a child's own bleed-down
                // rather than through the count returned here.
                if self.reclaim_children(short) == 0 && self.spare() < min {
                    return None;
                }
            } else {
                let g = self.try_grow(short, goal)?;
                self.absorb(g);
            }
        }
        None
    }

    /// Reserves between `min` and `max` units from the parents without
    /// waiting; returns the units obtained.
    fn try_grow(&self, min: usize, max: usize) -> Option<usize> {
        if let [p] = &*self.parents {
            let k = p.per_unit;
            return p.node.try_acquire(min * k, max * k, true).map(|g| g / k);
        }
        // Compound: the same number of units from every parent, in order,
        // rolled back if one refuses.
        let try_parts = |units: usize| {
            for (i, p) in self.parents.iter().enumerate() {
                let n = units * p.per_unit;
                if p.node.try_acquire(n, n, true).is_none() {
                    for q in &self.parents[..i] {
                        q.node.put(units * q.per_unit);
                    }
                    return false;
                }
            }
            true
        };
        if max > min && try_parts(max) {
            return Some(max);
        }
        try_parts(min).then_some(min)
    }

    /// Adds `units` obtained from the parents.
    fn absorb(self: &Arc<Self>, units: usize) {
        if units == 0 {
            return;
        }
        let waiting = {
            let mut s = self.slow.lock();
            s.held += units;
            self.put_quiet(units);
            self.update_flags(&s);
            !s.waiters.is_empty()
        };
        self.grown.fetch_add(units as u64, Ordering::Relaxed);
        if waiting {
            self.settle();
        }
    }

    // ---- waiting -----------------------------------------------------------

    /// Starts a waiting request for `n` units: `Ok(None)` if granted at once,
    /// else the slot the grant will be signalled on.
    pub(crate) fn wait_begin(
        self: &Arc<Self>,
        n: usize,
        waker: &Waker,
    ) -> Result<Option<Arc<WaitSlot>>, PoolError> {
        self.check_request(n)?;
        if n == 0 || self.take_fast(n, n).is_some() {
            return Ok(None);
        }
        // Try without waiting first (growth, reclaim), still in FIFO order.
        if self.try_acquire(n, n, true).is_some() {
            return Ok(None);
        }
        let slot = {
            let mut s = self.slow.lock();
            if s.task_waiters == 0 && self.take_any(n, n, true).is_some() {
                return Ok(None);
            }
            if s.waiters.len() >= WAITERS_MAX {
                return Err(PoolError::TooManyWaiters {
                    pool: Arc::clone(&self.name),
                    waiters_max: WAITERS_MAX,
                });
            }
            let slot = WaitSlot::new(waker);
            s.waiters.push_back(Waiter::Task {
                n,
                slot: Arc::clone(&slot),
            });
            s.task_waiters += 1;
            self.update_flags(&s);
            slot
        };
        self.waits.fetch_add(1, Ordering::Relaxed);
        if self.kind == Kind::Base {
            self.reclaim_children(n.saturating_sub(self.spare()));
        }
        self.settle();
        Ok(Some(slot))
    }

    /// A waiting client gave up. Its units are returned if the grant raced
    /// with the cancellation.
    pub(crate) fn wait_cancel(self: &Arc<Self>, slot: &Arc<WaitSlot>, n: usize) {
        let removed = {
            let mut s = self.slow.lock();
            let pos = s
                .waiters
                .iter()
                .position(|w| matches!(w, Waiter::Task { slot: x, .. } if Arc::ptr_eq(x, slot)));
            match pos {
                Some(i) => {
                    s.waiters.remove(i);
                    s.task_waiters -= 1;
                    self.update_flags(&s);
                    true
                }
                None => false,
            }
        };
        if removed {
            // Requests behind it may now be served.
            self.settle();
        } else {
            // Not queued, so granted (grants happen under the mutex).
            self.put(n);
        }
    }

    /// A child asks for `n` objects to grow by: true if given now, else
    /// queued and [`Node::deliver`] will be called on the child.
    fn acquire_or_queue(self: &Arc<Self>, child: &Arc<Node>, part: usize, n: usize) -> bool {
        if self.take_fast(n, n).is_some() {
            return true;
        }
        {
            let mut s = self.slow.lock();
            if s.waiters.is_empty() && self.take_any(n, n, true).is_some() {
                return true;
            }
            s.waiters.push_back(Waiter::Child {
                node: Arc::clone(child),
                part,
                n,
            });
            self.update_flags(&s);
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        if self.kind == Kind::Base {
            self.reclaim_children(n.saturating_sub(self.spare()));
        }
        self.settle();
        false
    }

    /// Removes a child's queued growth request; true if it was still queued.
    fn remove_child_entry(self: &Arc<Self>, child: &Arc<Node>) -> bool {
        let removed = {
            let mut s = self.slow.lock();
            let pos = s
                .waiters
                .iter()
                .position(|w| matches!(w, Waiter::Child { node, .. } if Arc::ptr_eq(node, child)));
            if let Some(i) = pos {
                s.waiters.remove(i);
                self.update_flags(&s);
            }
            pos.is_some()
        };
        if removed {
            self.settle();
        }
        removed
    }

    /// Serves queued requests, starts growth for the first one that cannot
    /// be served, or (when nobody waits) bleeds down. Call after anything that
    /// may have changed what is possible; cheap when nothing is.
    #[inline(never)]
    pub(crate) fn settle(self: &Arc<Self>) {
        loop {
            let mut delivery = None;
            let mut give_back = 0;
            let mut grow = false;
            let mut cancel = false;
            {
                let mut s = self.slow.lock();
                // FIFO, except that a child's growth request that cannot be
                // served does not hold up clients behind it: the child has
                // its antideadlock reservation, growth is only for throughput.
                let mut blocker = None;
                let mut children_blocked = false;
                let mut i = 0;
                while i < s.waiters.len() {
                    match s.waiters[i] {
                        Waiter::Task { n, .. } => {
                            if self.take_any(n, n, true).is_none() {
                                blocker.get_or_insert(n);
                                break;
                            }
                            if let Some(Waiter::Task { slot, .. }) = s.waiters.remove(i) {
                                slot.grant();
                            }
                            s.task_waiters -= 1;
                        }
                        Waiter::Child { n, .. } => {
                            if children_blocked || self.take_any(n, n, true).is_none() {
                                children_blocked = true;
                                blocker.get_or_insert(n);
                                i += 1;
                                continue;
                            }
                            if let Some(Waiter::Child { node, part, n }) = s.waiters.remove(i) {
                                delivery = Some((node, part, n));
                            }
                            break;
                        }
                    }
                }
                if delivery.is_none() {
                    if let Some(n) = blocker {
                        if self.kind != Kind::Base && s.growth.is_none() {
                            let short = n.saturating_sub(self.spare());
                            let units = short.min(self.limits.quota.saturating_sub(s.held));
                            if units > 0 {
                                s.growth = Some(Growth {
                                    units,
                                    part: 0,
                                    requesting: false,
                                });
                                grow = true;
                            }
                        }
                    } else if s.waiters.is_empty() {
                        if self.kind != Kind::Base {
                            // Readily down to the antibottleneck threshold; down
                            // to the floor if an ancestor is short.
                            let keep = if self.ancestors_pressured() {
                                self.floor(&s)
                            } else {
                                self.keep_active(&s)
                            };
                            if s.held > keep {
                                give_back = self.take_up_to(s.held - keep);
                                s.held -= give_back;
                            }
                        }
                        cancel = s.growth.as_ref().is_some_and(|g| g.requesting);
                    }
                }
                self.update_flags(&s);
            }
            if let Some((node, part, n)) = delivery {
                node.deliver(part, n);
                continue;
            }
            if give_back > 0 {
                self.bled.fetch_add(give_back as u64, Ordering::Relaxed);
                self.give_to_parents(give_back);
            }
            if grow {
                self.advance_growth();
            }
            if cancel {
                self.cancel_growth();
            }
            return;
        }
    }

    fn give_to_parents(&self, units: usize) {
        for p in self.parents.iter() {
            p.node.put(units * p.per_unit);
        }
    }

    /// Drives the growth in progress: one parent at a time, queueing at a
    /// parent that cannot give now.
    fn advance_growth(self: &Arc<Self>) {
        loop {
            let (part, units) = {
                let mut s = self.slow.lock();
                let Some(g) = s.growth.as_mut() else { return };
                if g.requesting {
                    return;
                }
                if g.part == self.parents.len() {
                    let units = g.units;
                    s.growth = None;
                    s.held += units;
                    self.put_quiet(units);
                    self.update_flags(&s);
                    drop(s);
                    self.grown.fetch_add(units as u64, Ordering::Relaxed);
                    self.settle();
                    return;
                }
                g.requesting = true;
                (g.part, g.units)
            };
            let link = &self.parents[part];
            if !link
                .node
                .acquire_or_queue(self, part, units * link.per_unit)
            {
                return; // `deliver` continues
            }
            let mut s = self.slow.lock();
            let g = s
                .growth
                .as_mut()
                .expect("growth in progress while requesting");
            g.part += 1;
            g.requesting = false;
        }
    }

    /// A parent served our queued growth request for `n` objects.
    fn deliver(self: &Arc<Self>, part: usize, n: usize) {
        {
            let mut s = self.slow.lock();
            let g = s
                .growth
                .as_mut()
                .expect("a parent delivered without a growth in progress");
            assert!(g.requesting && g.part == part && n == g.units * self.parents[part].per_unit);
            g.part += 1;
            g.requesting = false;
        }
        self.advance_growth();
    }

    /// Nobody waits any more: withdraw a queued growth request and return
    /// what earlier parents gave for it.
    fn cancel_growth(self: &Arc<Self>) {
        let part = {
            let s = self.slow.lock();
            match &s.growth {
                Some(g) if g.requesting && s.waiters.is_empty() => g.part,
                _ => return,
            }
        };
        if !self.parents[part].node.remove_child_entry(self) {
            return; // being delivered, or not queued yet: it completes normally
        }
        let units = {
            let mut s = self.slow.lock();
            let g = s.growth.take().expect("growth still in progress");
            debug_assert_eq!(g.part, part);
            self.update_flags(&s);
            g.units
        };
        for p in &self.parents[..part] {
            p.node.put(units * p.per_unit);
        }
        // Waiters may have arrived since we looked.
        self.settle();
    }

    // ---- reclaim -------------------------------------------------------

    /// Asks child pools (and this pool's cache holders) for up to `want` of
    /// this node's units; what they give back lands in our spare. Returns
    /// the units obtained.
    pub(crate) fn reclaim_children(self: &Arc<Self>, want: usize) -> usize {
        if want == 0 || self.reclaiming.swap(true, Ordering::SeqCst) {
            return 0;
        }
        // Control path: allocation is acceptable here.
        let kids: Vec<Arc<Node>> = self
            .children
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut got = 0;
        for k in &kids {
            if got >= want {
                break;
            }
            got += k.reclaim(self, want - got);
        }
        if got < want {
            let r = self.reclaimer.lock().as_ref().and_then(Weak::upgrade);
            if let Some(r) = r {
                let freed = r.reclaim(want - got);
                self.cache_reclaimed
                    .fetch_add(freed as u64, Ordering::Relaxed);
                got += freed;
            }
        }
        self.reclaiming.store(false, Ordering::SeqCst);
        // The units landed quietly in our spare; our own queue comes first.
        if got > 0 && self.word.0.load(Ordering::SeqCst) & WAITERS != 0 {
            self.settle();
        }
        got
    }

    /// Our parent `caller` wants `want` of its objects back: give idle units
    /// above our floor, reclaiming from our own children first if needed.
    fn reclaim(self: &Arc<Self>, caller: &Arc<Node>, want: usize) -> usize {
        let Some(k) = self
            .parents
            .iter()
            .find(|p| Arc::ptr_eq(&p.node, caller))
            .map(|p| p.per_unit)
        else {
            return 0;
        };
        let want_units = want.div_ceil(k);
        let mut units = self.release_idle(want_units);
        if units < want_units {
            let got = self.reclaim_children(want_units - units);
            if got > 0 {
                units += self.release_idle(want_units - units);
            }
        }
        if units == 0 {
            return 0;
        }
        self.reclaimed.fetch_add(units as u64, Ordering::Relaxed);
        for p in self.parents.iter() {
            if Arc::ptr_eq(&p.node, caller) {
                // The caller serves its queue itself after reclaiming.
                p.node.put_quiet(units * p.per_unit);
            } else {
                p.node.put(units * p.per_unit);
            }
        }
        units * k
    }

    /// Takes up to `max` spare units above the floor out of `held`, unless
    /// this node needs them itself.
    fn release_idle(&self, max: usize) -> usize {
        let mut s = self.slow.lock();
        if !s.waiters.is_empty() || s.growth.is_some() {
            return 0;
        }
        let floor = self.floor(&s);
        if s.held <= floor {
            return 0;
        }
        let x = self.take_up_to((s.held - floor).min(max));
        s.held -= x;
        self.update_flags(&s);
        x
    }

    // ---- time ------------------------------------------------------------

    /// Periodic maintenance at time `now_ms` (any monotonic clock): bleeds
    /// below the antibottleneck threshold after `idle_ms` without reservation
    /// requests, retries reclaim for a base pool with waiters, withdraws stale
    /// growth requests; then ticks the child pools.
    pub(crate) fn tick(self: &Arc<Self>, now_ms: u64) {
        let mut give_back = 0;
        let mut reclaim = 0;
        {
            let mut s = self.slow.lock();
            let gen = gen_of(self.word.0.load(Ordering::SeqCst));
            match s.idle_since_ms {
                Some(since) if gen == s.idle_gen => {
                    let idle = now_ms.saturating_sub(since) >= self.limits.idle_ms;
                    if idle && self.kind != Kind::Base && s.waiters.is_empty() && s.growth.is_none()
                    {
                        let floor = self.floor(&s);
                        if s.held > floor {
                            give_back = self.take_up_to(s.held - floor);
                            s.held -= give_back;
                        }
                    }
                }
                _ => {
                    s.idle_gen = gen;
                    s.idle_since_ms = Some(now_ms);
                }
            }
            if self.kind == Kind::Base {
                if let Some(n) = s
                    .waiters
                    .iter()
                    .map(|w| match w {
                        Waiter::Task { n, .. } | Waiter::Child { n, .. } => *n,
                    })
                    .next()
                {
                    reclaim = n.saturating_sub(self.spare());
                }
            }
            self.update_flags(&s);
        }
        if give_back > 0 {
            self.bled.fetch_add(give_back as u64, Ordering::Relaxed);
            self.give_to_parents(give_back);
        }
        if reclaim > 0 {
            self.reclaim_children(reclaim);
        }
        self.settle();
        let kids: Vec<Arc<Node>> = self
            .children
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for k in kids {
            k.tick(now_ms);
        }
    }

    // ---- objects and stats ---------------------------------------------------

    #[inline]
    pub(crate) fn note_allocated(&self) {
        if self.kind != Kind::Base {
            self.allocated.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[inline]
    pub(crate) fn note_freed(&self) {
        if self.kind != Kind::Base {
            let before = self.allocated.fetch_sub(1, Ordering::Relaxed);
            debug_assert!(
                before > 0,
                "pool {}: more frees than allocations",
                self.name
            );
        }
    }

    /// `n` allocated objects stop being reserved (cached).
    pub(crate) fn cache(&self, n: usize) {
        self.cached.fetch_add(n, Ordering::SeqCst);
    }

    /// A cached object stops being cached (freed or adopted): its unit
    /// becomes spare.
    pub(crate) fn uncache(self: &Arc<Self>) {
        let before = self.cached.fetch_sub(1, Ordering::SeqCst);
        assert!(
            before > 0,
            "pool {}: no cached object to release",
            self.name
        );
        self.put(1);
    }

    /// Grows a base node by `n` units whose objects are already in the store.
    pub(crate) fn grow_base(self: &Arc<Self>, n: usize) {
        debug_assert_eq!(self.kind, Kind::Base);
        {
            let mut s = self.slow.lock();
            s.held += n;
            self.put_quiet(n);
            self.update_flags(&s);
        }
        self.settle();
    }

    /// Shrinks a base node by up to `n` spare units above its floor; the
    /// caller removes that many objects from the store.
    pub(crate) fn shrink_base(&self, n: usize) -> usize {
        debug_assert_eq!(self.kind, Kind::Base);
        let mut s = self.slow.lock();
        let floor = self.floor(&s);
        let x = self.take_up_to(n.min(s.held.saturating_sub(floor)));
        s.held -= x;
        self.update_flags(&s);
        x
    }

    pub(crate) fn held(&self) -> usize {
        self.slow.lock().held
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let s = self.slow.lock();
        let spare = self.spare();
        let cached = self.cached.load(Ordering::SeqCst);
        PoolStats {
            reserved: s.held,
            granted: s.held.saturating_sub(spare + cached),
            spare,
            cached,
            allocated: self.allocated.load(Ordering::Relaxed),
            floor: self.floor(&s),
            waiters: s.waiters.len(),
            growth_units: s.growth.as_ref().map_or(0, |g| g.units),
            growth_parts_acquired: s.growth.as_ref().map_or(0, |g| g.part),
            reclaimed: self.reclaimed.load(Ordering::Relaxed),
            cache_reclaimed: self.cache_reclaimed.load(Ordering::Relaxed),
            bled: self.bled.load(Ordering::Relaxed),
            grown: self.grown.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }
}

impl Limits {
    /// The antideadlock part of the floor (a base pool has none of its own).
    fn antideadlock_floor(&self, kind: Kind) -> usize {
        match kind {
            Kind::Base => 0,
            _ => self.antideadlock,
        }
    }

    /// Checks a child's thresholds against each other.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.antideadlock == 0 {
            return Err("antideadlock threshold must be at least 1");
        }
        if self.antibottleneck < self.antideadlock {
            return Err("antibottleneck threshold below antideadlock threshold");
        }
        if self.quota < self.antibottleneck {
            return Err("quota below antibottleneck threshold");
        }
        if self.quota > POOL_OBJECTS_MAX {
            return Err("quota above POOL_OBJECTS_MAX");
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.kind == Kind::Base {
            return;
        }
        let s = self.slow.get_mut();
        debug_assert!(s.waiters.is_empty() && s.growth.is_none());
        let cached = *self.cached.get_mut();
        let spare = spare_of(*self.word.0.get_mut());
        debug_assert!(
            (cached == 0 && spare == s.held) || std::thread::panicking(),
            "pool {} dropped with {} units granted and {cached} cached",
            self.name,
            s.held - spare.min(s.held),
        );
        // Units of cached objects stay reserved in the parents forever: their
        // objects are out of the free lists and nobody can return them now.
        let units = s.held.saturating_sub(cached);
        for p in self.parents.iter() {
            p.node
                .release_child(self.limits.antideadlock * p.per_unit, units * p.per_unit);
        }
    }
}
