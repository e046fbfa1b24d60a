//! Hierarchical object pools (the paper's section "Hierarchical object pools").
//!
//! Memory objects — pages, IOB descriptors, control blocks, credits — are
//! shared between I/O facilities through a hierarchy of pools:
//!
//! * a **base pool** ([`Pool::base`]) per object type holds every object of
//!   that type;
//! * **child pools** ([`Pool::child`]) have one parent (base or child) and are
//!   created by a facility, possibly one per work stream;
//! * **compound pools** ([`CompoundPool`]) aggregate objects of several types
//!   from several parents, so that a work item needing e.g. "1 control block +
//!   8 pages + 1 IOB" gets them in one step; they also feed
//!   [lines of credit](credit).
//!
//! Every pool supports the paper's four operations, split into two pairs:
//! *reserve*/*unreserve* are accounting only (a guaranteed right to use `n`
//! objects), *allocate*/*free* move objects. An allocation requires a
//! reservation; an object may stay allocated after its reservation is dropped
//! (*cached*, e.g. a page holding data in the hope of a cache hit) and is then
//! reclaimable.
//!
//! # Units and the accounting invariant
//!
//! Each pool counts **units**: a unit is the right to one object (one compound
//! object for a compound pool). For every pool:
//!
//! `held == spare + granted + cached`
//!
//! where `held` is what the pool has reserved from its parent(s) (a base pool
//! holds its whole capacity), `granted` what its clients and child pools
//! hold, `cached` the allocated-but-unreserved objects of its clients, and
//! `spare` what it can grant without asking its parent. Objects live in the
//! base pool's free list; since every allocated object is covered by a
//! unit somewhere in the hierarchy, a client holding an unallocated unit always
//! finds a free object (`allocate` never fails for lack of objects).
//!
//! # Child pool attributes
//!
//! See [`ChildLimits`]: the **antideadlock** threshold is reserved at creation
//! (creation fails if the parent cannot give it) and is never given back while
//! the pool lives; the **antibottleneck** threshold is what the pool
//! over-reserves towards once clients reserve, keeps while active, and only
//! gives up after a period of inactivity ([`Pool::tick`]); the **quota** caps
//! what the pool may hold. A pool's floor is its antideadlock threshold plus
//! the antideadlock thresholds of its child pools.
//!
//! # Deadlock freedom: the fixed reservation order
//!
//! Every pool has a [`Rank`]. A work item reserves from each pool at most once
//! (atomically: everything it needs from that pool in one request) and from
//! several pools in increasing rank order; [`WorkItem`] debug-asserts it. With
//! antideadlock thresholds at least as large as any single work item's request,
//! a work item waiting at a pool only waits for work items that are themselves
//! waiting on higher-ranked pools or not waiting at all, so no cycle forms.
//!
//! # Cost of the hot path
//!
//! Each pool keeps `spare` (with two flag bits and an activity counter) in one
//! atomic word. Reserving from a pool whose spare suffices and that has no
//! waiters is one compare-and-swap on that word; unreserving is one
//! `fetch_add` plus, for a child pool, one load per ancestor; allocating or
//! freeing an object is one lock-free queue operation on the base pool's free
//! list (plus, through a [`Reservation`] of a child pool, one relaxed counter
//! update for the `allocated` statistic). No lock is taken
//! on this path and nothing is allocated. The per-pool mutex is taken only
//! when the pool must wait, grow from its parent, bleed down, be reclaimed or
//! be ticked. A waiting reservation allocates one small shared slot.

mod compound;
pub mod credit;
mod node;
mod pool;
mod wait;

use std::sync::Arc;

pub use compound::{CompoundBuilder, CompoundPool, CompoundReservation, CompoundReserve, Part};
pub use pool::{Pool, Reservation, Reserve, ReserveDetached};
pub use wait::block_on;

/// Objects one base pool may hold (object indexes fit in a `u32`).
pub const POOL_OBJECTS_MAX: usize = u32::MAX as usize;
/// Object types one compound pool may aggregate.
pub const COMPOUND_PARTS_MAX: usize = 4;
/// Work items that may wait on one pool at once; the next one is refused
/// ([`PoolError::TooManyWaiters`]). Concurrent work items are bounded by the
/// front ends' queue depths, far below this.
pub const WAITERS_MAX: usize = 1 << 16;
/// Waiter slots preallocated per pool, so that ordinary backpressure does not
/// grow the queue.
pub const WAITERS_PREALLOCATED: usize = 16;
/// Non-blocking reservation attempts after growing from the parent or
/// reclaiming, before reporting exhaustion (concurrent reservers may take the
/// units just obtained).
pub const TRY_ATTEMPTS_MAX: usize = 4;
/// Default inactivity period after which a child pool bleeds below its
/// antibottleneck threshold.
pub const IDLE_MS_DEFAULT: u64 = 1_000;
/// Period at which the daemon should call [`Pool::tick`] on each base pool.
pub const TICK_PERIOD_MS: u64 = 100;

const _: () = assert!(COMPOUND_PARTS_MAX >= 2);
const _: () = assert!(WAITERS_PREALLOCATED <= WAITERS_MAX);
const _: () = assert!(TICK_PERIOD_MS < IDLE_MS_DEFAULT);

/// Position of a pool in the node-wide reservation order: a work item
/// reserves from pools in strictly increasing rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rank(pub u32);

/// Node-wide rank bands, one per object type, in the order a work item
/// reserves them. A facility ranks its child and compound pools inside the
/// band of their type (a compound pool in the band of its first part), e.g.
/// `Rank(ranks::PAGE.0 + 10)`.
pub mod ranks {
    use super::Rank;
    /// Control blocks for work in progress.
    pub const CONTROL_BLOCK: Rank = Rank(1_000);
    /// Cache directory control blocks.
    pub const CACHE_DIRECTORY: Rank = Rank(2_000);
    /// Pages of host data.
    pub const PAGE: Rank = Rank(3_000);
    /// IOB descriptors (reserved after the pages they describe).
    pub const IOB: Rank = Rank(4_000);
    /// Control blocks of a device-side facility (the back end's operation
    /// slots): taken by a request that already holds its buffer, so they
    /// come after pages and IOBs.
    pub const DEVICE_CONTROL_BLOCK: Rank = Rank(4_500);
    /// Hardening rights.
    pub const HARDENING_RIGHT: Rank = Rank(5_000);
    /// Credits on lines of credit to other nodes: reserved last, just before
    /// sending work to the other node.
    pub const CREDIT: Rank = Rank(6_000);
    /// Width of each band.
    pub const BAND: u32 = 1_000;
}

/// Why a pool operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Not enough objects now; a waiting [`Pool::reserve`] would wait.
    #[error("pool {pool}: {requested} requested, {spare} spare, {waiters} waiting")]
    Exhausted {
        pool: Arc<str>,
        requested: usize,
        spare: usize,
        waiters: usize,
    },
    /// One request larger than the pool's antideadlock threshold (a base
    /// pool's: its capacity less its child pools' thresholds) could wait
    /// forever, so it is refused.
    #[error(
        "pool {pool}: a single reservation of {requested} exceeds the antideadlock \
         threshold {limit}; size the threshold for the largest work item"
    )]
    TooLarge {
        pool: Arc<str>,
        requested: usize,
        limit: usize,
    },
    /// Child pool creation could not reserve its antideadlock threshold.
    #[error(
        "cannot create pool {pool}: its antideadlock threshold of {antideadlock} \
         cannot be reserved from {parent}"
    )]
    AntideadlockUnavailable {
        pool: Arc<str>,
        parent: Arc<str>,
        antideadlock: usize,
    },
    /// Inconsistent thresholds or compound layout.
    #[error("pool {pool}: invalid configuration: {reason}")]
    InvalidConfig {
        pool: Arc<str>,
        reason: &'static str,
    },
    /// `allocate` without an unallocated reserved unit.
    #[error("pool {pool}: allocate without a reservation")]
    NotReserved { pool: Arc<str> },
    /// Too many work items waiting on one pool.
    #[error("pool {pool}: more than {waiters_max} waiters")]
    TooManyWaiters { pool: Arc<str>, waiters_max: usize },
    /// Grow/shrink on a pool that is not a base pool.
    #[error("pool {pool}: only a base pool can grow or shrink")]
    NotBase { pool: Arc<str> },
}

/// Attributes of a child or compound pool (in units of the pool: objects,
/// or compound objects for a compound pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildLimits {
    /// Reserved at creation and never given back while the pool lives; at
    /// least the largest request of any one work item.
    pub antideadlock: usize,
    /// Reservation that sustains the stream's throughput: over-reserved up to
    /// it on demand, given back below it only after `idle_ms` of inactivity.
    pub antibottleneck: usize,
    /// Most the pool may hold from its parent; `None` for no quota.
    pub quota: Option<usize>,
    /// Inactivity (no reservation requests) before bleeding below the
    /// antibottleneck threshold, as observed by [`Pool::tick`].
    pub idle_ms: u64,
}

impl ChildLimits {
    /// Thresholds without a quota, with the default idle period.
    pub const fn new(antideadlock: usize, antibottleneck: usize) -> ChildLimits {
        ChildLimits {
            antideadlock,
            antibottleneck,
            quota: None,
            idle_ms: IDLE_MS_DEFAULT,
        }
    }

    pub const fn with_quota(mut self, quota: usize) -> ChildLimits {
        self.quota = Some(quota);
        self
    }

    pub const fn with_idle_ms(mut self, idle_ms: u64) -> ChildLimits {
        self.idle_ms = idle_ms;
        self
    }
}

/// A snapshot of one pool's accounting (fields may be mutually inconsistent
/// by a few units while other threads operate on the pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Units held from the parent(s) (a base pool: its capacity).
    pub reserved: usize,
    /// Units held by clients and child pools.
    pub granted: usize,
    /// Units neither granted nor cached.
    pub spare: usize,
    /// Objects allocated by clients and no longer reserved.
    pub cached: usize,
    /// Objects allocated through this pool's reservations (guards) and not
    /// yet freed; detached allocations are the caller's to count. A base
    /// pool: all objects out of its free list.
    pub allocated: usize,
    /// Antideadlock threshold plus the child pools' thresholds; never given back.
    pub floor: usize,
    /// Requests queued (clients and child pools).
    pub waiters: usize,
    /// Units of a growth from the parents in progress (0 if none).
    pub growth_units: usize,
    /// Parents (in rank order) that already gave their part of that growth:
    /// those objects are granted by the parents but not yet in `reserved`.
    pub growth_parts_acquired: usize,
    /// Units the parent reclaimed from this pool.
    pub reclaimed: u64,
    /// Cached objects this pool asked its [`Reclaim`] holder to free.
    pub cache_reclaimed: u64,
    /// Units given back by bleed-down.
    pub bled: u64,
    /// Units obtained from the parent after creation.
    pub grown: u64,
    /// Requests that had to wait.
    pub waits: u64,
}

/// Implemented by a holder of cached (allocated but unreserved) objects, e.g.
/// a read cache: when the pool runs low it asks for up to `wanted` objects
/// back, which the holder returns with [`Pool::free_cached`].
///
/// Called with no pool lock held, possibly from a thread that is reserving
/// from the pool: the implementation must not block on a lock that such a
/// thread may hold (use `try_lock` and return 0).
pub trait Reclaim: Send + Sync {
    /// Frees up to `wanted` cached objects; returns how many it freed.
    fn reclaim(&self, wanted: usize) -> usize;
}

/// The reservations of one work item, in the fixed global order.
///
/// Each reservation method takes the work item and debug-asserts that the
/// pool's rank is above every rank it reserved from before: reserving out of
/// order is the only way pools can deadlock, so it is a bug, caught in tests.
#[derive(Debug, Default)]
pub struct WorkItem {
    last: Option<Rank>,
    /// Name of the pool at `last`, for the assertion message only.
    #[cfg(debug_assertions)]
    last_pool: Option<Arc<str>>,
}

impl WorkItem {
    pub const fn new() -> WorkItem {
        WorkItem {
            last: None,
            #[cfg(debug_assertions)]
            last_pool: None,
        }
    }

    /// Highest rank reserved so far.
    pub fn last_rank(&self) -> Option<Rank> {
        self.last
    }

    /// Debug-asserts that reserving from `rank` now respects the order.
    pub(crate) fn check(&self, rank: Rank, pool: &Arc<str>) {
        #[cfg(debug_assertions)]
        if let Some(last) = self.last {
            let last_pool = self.last_pool.as_deref().unwrap_or("?");
            assert!(
                last < rank,
                "work item reserves from pool {pool} (rank {}) after pool {last_pool} \
                 (rank {}): reservations must follow the fixed rank order",
                rank.0,
                last.0
            );
        }
        #[cfg(not(debug_assertions))]
        let _ = (rank, pool);
    }

    /// Records a reservation made at `rank`.
    pub(crate) fn record(&mut self, rank: Rank, pool: &Arc<str>) {
        #[cfg(debug_assertions)]
        {
            self.last_pool = Some(Arc::clone(pool));
        }
        #[cfg(not(debug_assertions))]
        let _ = pool;
        self.last = Some(rank);
    }

    /// Checks and records: for a waiting reservation, which will hold the
    /// rank once it completes.
    pub(crate) fn admit(&mut self, rank: Rank, pool: &Arc<str>) {
        self.check(rank, pool);
        self.record(rank, pool);
    }
}

#[cfg(test)]
mod tests;
