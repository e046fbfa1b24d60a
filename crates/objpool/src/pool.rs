//! Base and child pools of one object type.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use parking_lot::Mutex;

use crate::node::{Kind, Limits, Node, ParentLink};
use crate::wait::NodeWait;
use crate::{ChildLimits, PoolError, PoolStats, Rank, Reclaim, WorkItem, POOL_OBJECTS_MAX};

/// The free objects of one type: the free list of its base pool, shared by
/// every pool of the hierarchy (child pools only account).
///
/// A stack (last freed, first allocated), not a queue: the object freed a
/// moment ago is still in the processor's caches (a buffer page the last
/// request's data went through, its reference count, its IOB), where a
/// queue would hand out the one freed longest ago, cold in a pool of
/// 65,536 pages. Measured on 4 KiB random writes over NBD
/// (docs/benchmarks.md, session 11).
pub(crate) struct Store<T> {
    free: Mutex<Vec<T>>,
    capacity_max: usize,
}

impl<T> Store<T> {
    /// Invariant: a caller holding an unallocated unit finds an object here,
    /// because every object out of this list is covered by a unit.
    #[inline]
    pub(crate) fn pop(&self, pool: &str) -> T {
        match self.free.lock().pop() {
            Some(o) => o,
            None => panic!("pool {pool}: free list empty although a unit was held"),
        }
    }

    #[inline]
    pub(crate) fn push(&self, obj: T, pool: &str) {
        let mut free = self.free.lock();
        if free.len() == self.capacity_max.max(1) {
            drop(free);
            panic!("pool {pool}: more objects freed than the pool holds");
        }
        free.push(obj);
    }

    pub(crate) fn free_len(&self) -> usize {
        self.free.lock().len()
    }
}

/// A base or child pool of objects of type `T`. Cloning gives another handle
/// to the same pool; the pool goes away (returning its reservation to its
/// parent) with its last handle.
pub struct Pool<T> {
    pub(crate) node: Arc<Node>,
    pub(crate) store: Arc<Store<T>>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            node: Arc::clone(&self.node),
            store: Arc::clone(&self.store),
        }
    }
}

impl<T: Send> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.node.name)
            .field("rank", &self.node.rank)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<T: Send> Pool<T> {
    /// The base pool of a type, holding `objects` (all of them, for the life
    /// of the node).
    pub fn base(name: &str, rank: Rank, objects: Vec<T>) -> Pool<T> {
        let n = objects.len();
        Pool::base_resizable(name, rank, n.max(1), objects)
    }

    /// A base pool that can later [`grow`](Pool::grow) to `capacity_max`
    /// objects (e.g. the credits of a line of credit).
    pub fn base_resizable(name: &str, rank: Rank, capacity_max: usize, objects: Vec<T>) -> Pool<T> {
        assert!(
            objects.len() <= capacity_max && capacity_max <= POOL_OBJECTS_MAX,
            "base pool {name}: {} objects, capacity {capacity_max}",
            objects.len()
        );
        let held = objects.len();
        let mut free = Vec::with_capacity(capacity_max.max(1));
        // Reversed: the first objects given are the first allocated.
        free.extend(objects.into_iter().rev());
        let free = Mutex::new(free);
        Pool {
            node: Node::base(name.into(), rank, held, capacity_max),
            store: Arc::new(Store { free, capacity_max }),
        }
    }

    /// A child pool of this pool. Reserves `limits.antideadlock` from this
    /// pool now; fails if it cannot.
    pub fn child(&self, name: &str, rank: Rank, limits: ChildLimits) -> Result<Pool<T>, PoolError> {
        let limits = child_limits(name, limits)?;
        let node = Node::child(
            name.into(),
            rank,
            Kind::Child,
            limits,
            vec![ParentLink {
                node: Arc::clone(&self.node),
                per_unit: 1,
            }],
        )?;
        Ok(Pool {
            node,
            store: Arc::clone(&self.store),
        })
    }

    pub fn name(&self) -> &str {
        &self.node.name
    }

    pub fn rank(&self) -> Rank {
        self.node.rank
    }

    /// Units this pool can grant without asking its parent.
    pub fn spare(&self) -> usize {
        self.node.spare()
    }

    pub fn stats(&self) -> PoolStats {
        let mut st = self.node.stats();
        if self.node.kind == Kind::Base {
            st.allocated = self.node.held().saturating_sub(self.store.free_len());
        }
        st
    }

    /// Objects in the base pool's free list (shared by the whole hierarchy).
    pub fn free_objects(&self) -> usize {
        self.store.free_len()
    }

    /// Reserves `n` objects without waiting.
    pub fn try_reserve(
        &self,
        work: &mut WorkItem,
        n: usize,
    ) -> Result<Reservation<'_, T>, PoolError> {
        // A failed attempt reserves nothing, so only success records the rank.
        work.check(self.node.rank, &self.node.name);
        self.try_reserve_detached(n)?;
        work.record(self.node.rank, &self.node.name);
        Ok(Reservation {
            pool: self,
            reserved: n,
            allocated: 0,
        })
    }

    /// Reserves `n` objects, waiting (FIFO with other waiters) while the
    /// pool cannot grant them: this is how backpressure works.
    pub fn reserve(&self, work: &mut WorkItem, n: usize) -> Reserve<'_, T> {
        work.admit(self.node.rank, &self.node.name);
        Reserve {
            pool: self,
            wait: NodeWait::new(&self.node, n),
            n,
        }
    }

    /// Reserves `n` units for a caller that tracks them itself (e.g. one unit
    /// per page reference in a buffer). The caller orders such reservations
    /// itself and returns the units with [`Pool::unreserve_detached`].
    #[inline]
    pub fn try_reserve_detached(&self, n: usize) -> Result<(), PoolError> {
        self.node.check_request(n)?;
        match self.node.try_acquire(n, n, true) {
            Some(_) => Ok(()),
            None => Err(self.node.exhausted(n)),
        }
    }

    /// Waiting form of [`Pool::try_reserve_detached`]. Dropping the future
    /// before it completes reserves nothing.
    pub fn reserve_detached(&self, n: usize) -> ReserveDetached<'_> {
        ReserveDetached {
            wait: NodeWait::new(&self.node, n),
        }
    }

    /// Takes an object under a detached unit the caller holds unallocated.
    /// Not counted in this pool's `allocated` stat (the caller accounts for
    /// its objects; this keeps the path to one queue operation).
    #[inline]
    pub fn allocate_detached(&self) -> T {
        self.store.pop(&self.node.name)
    }

    /// Returns an object allocated with [`Pool::allocate_detached`] on this
    /// pool; its unit stays reserved.
    #[inline]
    pub fn free_detached(&self, obj: T) {
        self.store.push(obj, &self.node.name);
    }

    /// Returns `n` detached units (their objects already freed or cached).
    #[inline]
    pub fn unreserve_detached(&self, n: usize) {
        self.node.put(n);
    }

    /// Returns a cached object (see [`Reservation::cache`]) to the free list.
    pub fn free_cached(&self, obj: T) {
        self.node.note_freed();
        self.store.push(obj, &self.node.name);
        self.node.uncache();
    }

    /// Registers the holder of this pool's cached objects, asked to free some
    /// when the hierarchy reclaims. Held weakly: the holder owns the pool.
    pub fn set_reclaimer(&self, reclaimer: Weak<dyn Reclaim>) {
        self.node.set_reclaimer(reclaimer);
    }

    /// Periodic maintenance at `now_ms` of a monotonic clock, for this pool
    /// and all its descendants: bleed-down after inactivity, retried reclaim.
    /// The daemon calls it on each base pool every
    /// [`TICK_PERIOD_MS`](crate::TICK_PERIOD_MS); tests pass any time they like.
    pub fn tick(&self, now_ms: u64) {
        self.node.tick(now_ms);
    }

    /// Adds objects to a base pool (e.g. credits granted by a provider).
    pub fn grow(&self, objects: Vec<T>) -> Result<(), PoolError> {
        if self.node.kind != Kind::Base {
            return Err(PoolError::NotBase {
                pool: Arc::clone(&self.node.name),
            });
        }
        let n = objects.len();
        if self.node.held() + n > self.store.capacity_max {
            return Err(PoolError::InvalidConfig {
                pool: Arc::clone(&self.node.name),
                reason: "grow beyond the capacity the base pool was created with",
            });
        }
        for o in objects {
            self.store.push(o, &self.node.name);
        }
        self.node.grow_base(n);
        Ok(())
    }

    /// Removes up to `n` unreserved objects from a base pool (never below the
    /// child pools' antideadlock thresholds); returns them.
    pub fn shrink(&self, n: usize) -> Result<Vec<T>, PoolError> {
        if self.node.kind != Kind::Base {
            return Err(PoolError::NotBase {
                pool: Arc::clone(&self.node.name),
            });
        }
        let x = self.node.shrink_base(n);
        Ok((0..x).map(|_| self.store.pop(&self.node.name)).collect())
    }

    /// True if both handles are the same pool.
    pub fn same_pool(&self, other: &Pool<T>) -> bool {
        Arc::ptr_eq(&self.node, &other.node)
    }
}

pub(crate) fn child_limits(name: &str, l: ChildLimits) -> Result<Limits, PoolError> {
    let limits = Limits {
        antideadlock: l.antideadlock,
        antibottleneck: l.antibottleneck,
        quota: l.quota.unwrap_or(POOL_OBJECTS_MAX),
        idle_ms: l.idle_ms,
    };
    limits
        .validate()
        .map_err(|reason| PoolError::InvalidConfig {
            pool: name.into(),
            reason,
        })?;
    Ok(limits)
}

/// A client's reservation of objects in one pool. Dropping it unreserves.
///
/// Invariant: `allocated <= reserved`. Objects still allocated when it drops
/// become cached (their units stay taken) — a bug in debug builds.
#[must_use = "dropping a reservation unreserves it"]
pub struct Reservation<'p, T: Send> {
    pool: &'p Pool<T>,
    reserved: usize,
    allocated: usize,
}

impl<'p, T: Send> Reservation<'p, T> {
    pub fn pool(&self) -> &'p Pool<T> {
        self.pool
    }

    pub fn reserved(&self) -> usize {
        self.reserved
    }

    pub fn allocated(&self) -> usize {
        self.allocated
    }

    /// Reserved units not backing an allocated object.
    pub fn unallocated(&self) -> usize {
        self.reserved - self.allocated
    }

    /// Takes an object; needs an unallocated reserved unit.
    #[inline]
    pub fn allocate(&mut self) -> Result<T, PoolError> {
        if self.allocated == self.reserved {
            return Err(PoolError::NotReserved {
                pool: Arc::clone(&self.pool.node.name),
            });
        }
        self.allocated += 1;
        self.pool.node.note_allocated();
        Ok(self.pool.allocate_detached())
    }

    /// Returns an object allocated from this reservation; the unit stays
    /// reserved for another allocation.
    #[inline]
    pub fn free(&mut self, obj: T) {
        assert!(self.allocated > 0, "free without an allocated object");
        self.allocated -= 1;
        self.pool.node.note_freed();
        self.pool.free_detached(obj);
    }

    /// Gives back `n` unallocated units.
    pub fn unreserve(&mut self, n: usize) {
        assert!(n <= self.unallocated(), "unreserve of allocated units");
        self.reserved -= n;
        self.pool.node.put(n);
    }

    /// Unreserves `n` allocated objects while the caller keeps them: they
    /// become *cached* (e.g. pages holding data for a possible cache hit) and
    /// must be returned with [`Pool::free_cached`] or taken back with
    /// [`Reservation::adopt`]. Registering a [`Reclaim`] lets the hierarchy
    /// ask for them when it runs low.
    pub fn cache(&mut self, n: usize) {
        assert!(n <= self.allocated, "cache of unallocated objects");
        self.allocated -= n;
        self.reserved -= n;
        self.pool.node.cache(n);
    }

    /// Takes one of the caller's cached objects back under this reservation
    /// (a cache hit), using one unallocated unit; the cached object's own
    /// unit becomes spare. The caller keeps the object.
    pub fn adopt(&mut self) -> Result<(), PoolError> {
        if self.allocated == self.reserved {
            return Err(PoolError::NotReserved {
                pool: Arc::clone(&self.pool.node.name),
            });
        }
        self.allocated += 1;
        self.pool.node.uncache();
        Ok(())
    }

    /// Hands `n` unallocated units to the caller, who then owns them as
    /// detached units (see [`Pool::try_reserve_detached`]).
    pub fn detach(&mut self, n: usize) {
        assert!(n <= self.unallocated(), "detach of allocated units");
        self.reserved -= n;
    }
}

impl<T: Send> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        if self.allocated > 0 {
            debug_assert!(
                std::thread::panicking(),
                "pool {}: reservation dropped with {} objects allocated",
                self.pool.node.name,
                self.allocated
            );
            self.pool.node.cache(self.allocated);
        }
        self.pool.node.put(self.reserved - self.allocated);
    }
}

impl<T: Send> std::fmt::Debug for Reservation<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("pool", &self.pool.node.name)
            .field("reserved", &self.reserved)
            .field("allocated", &self.allocated)
            .finish()
    }
}

/// Future of [`Pool::reserve`].
#[must_use = "futures do nothing unless awaited"]
pub struct Reserve<'p, T> {
    pool: &'p Pool<T>,
    wait: NodeWait<'p>,
    n: usize,
}

impl<'p, T: Send> Future for Reserve<'p, T> {
    type Output = Result<Reservation<'p, T>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.wait).poll(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Reservation {
                pool: this.pool,
                reserved: this.n,
                allocated: 0,
            })),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Future of [`Pool::reserve_detached`].
#[must_use = "futures do nothing unless awaited"]
pub struct ReserveDetached<'p> {
    wait: NodeWait<'p>,
}

impl Future for ReserveDetached<'_> {
    type Output = Result<(), PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.wait).poll(cx)
    }
}
