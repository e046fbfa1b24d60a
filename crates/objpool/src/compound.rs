//! Compound pools: one unit is a fixed set of objects of several types
//! ("1 control block + 8 pages + 1 IOB"), reserved from several parents.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::node::{Kind, Node, ParentLink};
use crate::pool::{child_limits, Store};
use crate::wait::NodeWait;
use crate::{ChildLimits, PoolError, PoolStats, Rank, WorkItem, COMPOUND_PARTS_MAX};

type AnyStore = Arc<dyn Any + Send + Sync>;

/// Typed access to one object type of a compound pool; returned by
/// [`CompoundBuilder::part`].
pub struct Part<T> {
    index: usize,
    store: Arc<Store<T>>,
}

impl<T> Clone for Part<T> {
    fn clone(&self) -> Self {
        Part {
            index: self.index,
            store: Arc::clone(&self.store),
        }
    }
}

impl<T> Part<T> {
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Collects the parts of a compound pool, in increasing rank of their parents
/// (the order in which the compound reserves from them).
#[derive(Default)]
pub struct CompoundBuilder {
    parents: Vec<ParentLink>,
    stores: Vec<AnyStore>,
}

impl CompoundBuilder {
    pub fn new() -> CompoundBuilder {
        CompoundBuilder::default()
    }

    /// Adds `per_unit` objects of `parent`'s type to each compound object.
    pub fn part<T: Send + 'static>(&mut self, parent: &crate::Pool<T>, per_unit: usize) -> Part<T> {
        let index = self.parents.len();
        self.parents.push(ParentLink {
            node: Arc::clone(&parent.node),
            per_unit,
        });
        let store: AnyStore = parent.store.clone();
        self.stores.push(store);
        Part {
            index,
            store: Arc::clone(&parent.store),
        }
    }

    /// Creates the pool, reserving `limits.antideadlock` compound objects from
    /// every parent (in units of compound objects).
    pub fn build(
        self,
        name: &str,
        rank: Rank,
        limits: ChildLimits,
    ) -> Result<CompoundPool, PoolError> {
        let invalid = |reason| PoolError::InvalidConfig {
            pool: name.into(),
            reason,
        };
        if self.parents.len() < 2 || self.parents.len() > COMPOUND_PARTS_MAX {
            return Err(invalid("a compound pool has 2..=COMPOUND_PARTS_MAX parts"));
        }
        if self.parents.iter().any(|p| p.per_unit == 0) {
            return Err(invalid("a part with zero objects per unit"));
        }
        if self
            .parents
            .windows(2)
            .any(|w| w[0].node.rank >= w[1].node.rank)
        {
            return Err(invalid(
                "parts must be added in strictly increasing parent rank",
            ));
        }
        let limits = child_limits(name, limits)?;
        let per_unit: Vec<usize> = self.parents.iter().map(|p| p.per_unit).collect();
        let node = Node::child(name.into(), rank, Kind::Compound, limits, self.parents)?;
        Ok(CompoundPool {
            inner: Arc::new(Inner {
                node,
                stores: self.stores.into(),
                per_unit: per_unit.into(),
            }),
        })
    }
}

struct Inner {
    node: Arc<Node>,
    stores: Box<[AnyStore]>,
    per_unit: Box<[usize]>,
}

/// A pool of compound objects. Cloning gives another handle.
#[derive(Clone)]
pub struct CompoundPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CompoundPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompoundPool")
            .field("name", &self.inner.node.name)
            .field("rank", &self.inner.node.rank)
            .field("stats", &self.stats())
            .finish()
    }
}

impl CompoundPool {
    pub fn builder() -> CompoundBuilder {
        CompoundBuilder::new()
    }

    pub fn name(&self) -> &str {
        &self.inner.node.name
    }

    pub fn rank(&self) -> Rank {
        self.inner.node.rank
    }

    pub fn parts(&self) -> usize {
        self.inner.per_unit.len()
    }

    /// Objects of part `index` in one compound object.
    pub fn per_unit(&self, index: usize) -> usize {
        self.inner.per_unit[index]
    }

    pub fn spare(&self) -> usize {
        self.inner.node.spare()
    }

    pub fn stats(&self) -> PoolStats {
        self.inner.node.stats()
    }

    /// Reserves `units` compound objects without waiting.
    pub fn try_reserve(
        &self,
        work: &mut WorkItem,
        units: usize,
    ) -> Result<CompoundReservation<'_>, PoolError> {
        work.check(self.inner.node.rank, &self.inner.node.name);
        self.try_reserve_detached(units)?;
        work.record(self.inner.node.rank, &self.inner.node.name);
        Ok(CompoundReservation::new(self, units))
    }

    /// Reserves `units` compound objects, waiting in FIFO order.
    pub fn reserve(&self, work: &mut WorkItem, units: usize) -> CompoundReserve<'_> {
        work.admit(self.inner.node.rank, &self.inner.node.name);
        CompoundReserve {
            pool: self,
            wait: NodeWait::new(&self.inner.node, units),
            units,
        }
    }

    pub(crate) fn try_reserve_detached(&self, units: usize) -> Result<(), PoolError> {
        self.inner.node.check_request(units)?;
        match self.inner.node.try_acquire(units, units, true) {
            Some(_) => Ok(()),
            None => Err(self.inner.node.exhausted(units)),
        }
    }

    pub(crate) fn unreserve_detached(&self, units: usize) {
        self.inner.node.put(units);
    }

    /// Periodic maintenance (see [`crate::Pool::tick`]); a compound pool is
    /// also ticked through each of its parents.
    pub fn tick(&self, now_ms: u64) {
        self.inner.node.tick(now_ms);
    }

    fn store<'a, T: Send + 'static>(&self, part: &'a Part<T>) -> &'a Store<T> {
        let slot = self
            .inner
            .stores
            .get(part.index)
            .expect("part index outside this compound pool");
        // A part of another compound pool over other parents would take
        // objects that no unit of ours covers.
        assert!(
            std::ptr::addr_eq(Arc::as_ptr(slot), Arc::as_ptr(&part.store)),
            "part does not belong to compound pool {}",
            self.inner.node.name
        );
        &part.store
    }

    pub(crate) fn allocate_detached<T: Send + 'static>(&self, part: &Part<T>) -> T {
        let obj = self.store(part).pop(&self.inner.node.name);
        self.inner.node.note_allocated();
        obj
    }

    pub(crate) fn free_detached<T: Send + 'static>(&self, part: &Part<T>, obj: T) {
        self.store(part).push(obj, &self.inner.node.name);
        self.inner.node.note_freed();
    }
}

/// A client's reservation of compound objects. Dropping it unreserves the
/// units whose objects are all freed (the others stay taken: a bug, asserted
/// in debug builds).
#[must_use = "dropping a reservation unreserves it"]
pub struct CompoundReservation<'p> {
    pool: &'p CompoundPool,
    units: usize,
    allocated: [usize; COMPOUND_PARTS_MAX],
}

impl<'p> CompoundReservation<'p> {
    fn new(pool: &'p CompoundPool, units: usize) -> CompoundReservation<'p> {
        CompoundReservation {
            pool,
            units,
            allocated: [0; COMPOUND_PARTS_MAX],
        }
    }

    pub fn pool(&self) -> &'p CompoundPool {
        self.pool
    }

    pub fn units(&self) -> usize {
        self.units
    }

    pub fn allocated<T>(&self, part: &Part<T>) -> usize {
        self.allocated[part.index]
    }

    /// Takes one object of `part`; at most `units × per_unit` at a time.
    pub fn allocate<T: Send + 'static>(&mut self, part: &Part<T>) -> Result<T, PoolError> {
        let i = part.index;
        if self.allocated[i] == self.units * self.pool.per_unit(i) {
            return Err(PoolError::NotReserved {
                pool: Arc::clone(&self.pool.inner.node.name),
            });
        }
        let obj = self.pool.allocate_detached(part);
        self.allocated[i] += 1;
        Ok(obj)
    }

    pub fn free<T: Send + 'static>(&mut self, part: &Part<T>, obj: T) {
        let i = part.index;
        assert!(self.allocated[i] > 0, "free without an allocated object");
        self.pool.free_detached(part, obj);
        self.allocated[i] -= 1;
    }

    /// Units that must stay reserved to cover the allocated objects.
    fn units_in_use(&self) -> usize {
        (0..self.pool.parts())
            .map(|i| self.allocated[i].div_ceil(self.pool.per_unit(i)))
            .max()
            .unwrap_or(0)
    }

    /// Gives back `n` units; the objects still allocated must fit the rest.
    pub fn unreserve(&mut self, n: usize) {
        assert!(
            self.units - n >= self.units_in_use(),
            "unreserve of units covering allocated objects"
        );
        self.units -= n;
        self.pool.unreserve_detached(n);
    }
}

impl Drop for CompoundReservation<'_> {
    fn drop(&mut self) {
        let in_use = self.units_in_use();
        debug_assert!(
            in_use == 0 || std::thread::panicking(),
            "compound pool {}: reservation dropped with objects allocated",
            self.pool.inner.node.name
        );
        // Units covering objects nobody will free stay taken, so that the
        // free lists never run short of what other units promise.
        self.pool.unreserve_detached(self.units - in_use);
    }
}

/// Future of [`CompoundPool::reserve`].
#[must_use = "futures do nothing unless awaited"]
pub struct CompoundReserve<'p> {
    pool: &'p CompoundPool,
    wait: NodeWait<'p>,
    units: usize,
}

impl<'p> Future for CompoundReserve<'p> {
    type Output = Result<CompoundReservation<'p>, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.wait).poll(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(CompoundReservation::new(this.pool, this.units))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}
