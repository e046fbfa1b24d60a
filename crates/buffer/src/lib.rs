//! Buffer management (the paper's section "Buffer management").
//!
//! Host data live in 4 KiB **pages** taken from one arena allocated when the
//! [`BufferPool`] is created; nothing on the data path allocates memory for
//! host data afterwards. Each page carries a reference count. A [`Buffer`] is
//! a chain of **IOBs**; an IOB points to up to [`IOB_PAGES_MAX`] pages and
//! chains to the next IOB for longer transfers. IOB descriptors also come from
//! a fixed table sized at start-up.
//!
//! Pages and IOB descriptors are the objects of two object-pool base pools
//! (`sanvirt-objpool`): page indexes in the page base pool (rank
//! [`ranks::PAGE`]), IOB slot indexes in the IOB base pool (rank
//! [`ranks::IOB`]). A facility takes its share with [`BufferPool::child`]: a
//! child pool of each, with antideadlock and antibottleneck thresholds, from
//! which it allocates ([`BufferChild::alloc`]), waits for buffers
//! ([`BufferChild::alloc_wait`], backpressure) or builds buffers from
//! reservations its work item made in the fixed rank order
//! ([`BufferChild::alloc_in`]).
//!
//! Facilities hand buffers to each other by moving the [`Buffer`] handle, never
//! by copying bytes. When two facilities need the same data at once,
//! [`Buffer::share`] (the paper's *clone*) builds a second IOB chain over the
//! same pages and increments their counts. A later write into a page whose
//! count is above one first copies it to a private page (copy-on-write). The
//! page for that copy is **reserved when the share is made**, so a
//! copy-on-write never fails for lack of memory.
//!
//! # Accounting invariant
//!
//! Every page reference held by a buffer holds one reserved unit of the page
//! pool, and every IOB of a chain one unit of the IOB pool, in the pool the
//! buffer was allocated from (the base pools, or a facility's child pools;
//! shares and splits stay in the pool of their source). Hence, with
//! `held_unused` the units child pools hold but no buffer uses:
//!
//! `pages_available == free_pages - Σ(refcount(p) - 1) - held_unused`
//!
//! over allocated pages `p`: every extra reference to a page holds one
//! reserved page for its eventual copy-on-write. Without child pools this is
//! `available == free_pages - Σ(refcount(p) - 1)`. Allocations and shares
//! reserve; dropping a reference unreserves one unit, except that a holder
//! whose drop leaves only a holder busy copying the page for a
//! copy-on-write hands its unit to that copier (see `make_exclusive`).
//!
//! # Copies
//!
//! Every memory-to-memory copy of host data made through this crate is counted
//! ([`BufferStats`]): copy-on-write copies and explicit [`Buffer::copy_from_slice`]
//! / [`Buffer::copy_to_slice`] calls. The data path uses neither; tests prove it
//! by reading the counters.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use sanvirt_objpool::{
    ranks, ChildLimits, Pool, PoolError, PoolStats, Rank, Reservation, WorkItem,
};

/// Size of one page of host data.
pub const PAGE_SIZE: usize = 4096;
/// Pages one IOB points to; longer transfers chain IOBs.
pub const IOB_PAGES_MAX: usize = 8;
/// Bytes one IOB can describe.
pub const IOB_BYTES_MAX: usize = PAGE_SIZE * IOB_PAGES_MAX;
/// Largest page arena a pool may be created with (16 GiB of pages).
pub const POOL_PAGES_MAX: usize = 4 << 20;

const NONE: u32 = u32::MAX;

const _: () = assert!(PAGE_SIZE.is_power_of_two());
const _: () = assert!(POOL_PAGES_MAX < NONE as usize);
const _: () = assert!(POOL_PAGES_MAX <= sanvirt_objpool::POOL_OBJECTS_MAX);
// A facility's child pools take ranks inside the page and IOB bands.
const _: () = assert!(ranks::PAGE.0 + ranks::BAND <= ranks::IOB.0);

/// High bit of a page's reference count: one of its holders is copying it
/// for a copy-on-write (see `Buffer::make_exclusive`). While it is set, a
/// holder that drops its reference and leaves only the copier hands its page
/// unit to the copier instead of returning it to the pool.
const COPYING: u32 = 1 << 31;
const _: () = assert!(POOL_PAGES_MAX < COPYING as usize);

/// What dropping one page reference did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dropped {
    /// It was the last: free the page, return its unit.
    Last,
    /// Others remain: return the unit this reference held.
    Shared,
    /// Only a holder copying the page remains: that holder takes this
    /// reference's unit (it settles the accounting when its copy is done).
    HandedToCopier,
}

/// Pages a buffer of `len` bytes holds.
pub const fn pages_for(len: usize) -> usize {
    len.div_ceil(PAGE_SIZE)
}

/// IOB descriptors a buffer of `pages` pages (from one allocation) holds.
pub const fn iobs_for(pages: usize) -> usize {
    pages.div_ceil(IOB_PAGES_MAX)
}

/// Why a buffer could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// Not enough unreserved pages; the caller waits and retries (backpressure).
    #[error("buffer pool exhausted: {needed} pages needed, {available} available")]
    PagesExhausted { needed: usize, available: usize },
    /// Not enough free IOB descriptors.
    #[error("buffer pool exhausted: {needed} IOBs needed")]
    IobsExhausted { needed: usize },
    /// A split or join that does not fall on a page boundary.
    #[error("buffer split/join at byte {at} is not on a page boundary")]
    Unaligned { at: usize },
    /// A slice outside the buffer.
    #[error("range {start}+{len} outside buffer of {buffer_len} bytes")]
    OutOfRange {
        start: usize,
        len: usize,
        buffer_len: usize,
    },
    /// A waiting allocation larger than its pool can ever grant (above the
    /// pool's antideadlock threshold): it would wait forever.
    #[error("buffer needs {needed} {what}, more than the {limit} its pool can ever grant")]
    TooLarge {
        what: &'static str,
        needed: usize,
        limit: usize,
    },
    /// Too many allocations already waiting on the pool.
    #[error("too many allocations waiting for {what}")]
    TooManyWaiters { what: &'static str },
}

/// Maps a page reservation failure.
#[cold]
fn pages_error(e: PoolError, needed: usize, pool: &Pool<u32>) -> BufferError {
    match e {
        PoolError::Exhausted { spare, .. } => BufferError::PagesExhausted {
            needed,
            available: spare,
        },
        // A non-waiting allocation larger than the pool: exhausted, as ever.
        PoolError::TooLarge { .. } => BufferError::PagesExhausted {
            needed,
            available: pool.spare(),
        },
        PoolError::TooManyWaiters { .. } => BufferError::TooManyWaiters { what: "pages" },
        other => unreachable!("page reservation: {other}"),
    }
}

/// Maps an IOB reservation failure; `needed` counts the missing descriptors.
#[cold]
fn iobs_error(e: PoolError, iobs: usize, pool: &Pool<u32>) -> BufferError {
    match e {
        PoolError::Exhausted { .. } | PoolError::TooLarge { .. } => BufferError::IobsExhausted {
            needed: iobs.saturating_sub(pool.spare()).max(1),
        },
        PoolError::TooManyWaiters { .. } => BufferError::TooManyWaiters { what: "IOBs" },
        other => unreachable!("IOB reservation: {other}"),
    }
}

/// Maps a failure of a waiting reservation.
#[cold]
fn wait_error(e: PoolError, what: &'static str) -> BufferError {
    match e {
        PoolError::TooLarge {
            requested, limit, ..
        } => BufferError::TooLarge {
            what,
            needed: requested,
            limit,
        },
        PoolError::TooManyWaiters { .. } => BufferError::TooManyWaiters { what },
        other => unreachable!("waiting reservation of {what}: {other}"),
    }
}

#[derive(Clone, Copy)]
struct IobSlot {
    pages: [u32; IOB_PAGES_MAX],
    count: u8,
    next: u32,
}

const EMPTY_SLOT: IobSlot = IobSlot {
    pages: [NONE; IOB_PAGES_MAX],
    count: 0,
    next: NONE,
};

/// Counters of memory-to-memory copies of host data.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BufferStats {
    /// Pages copied because a shared page was written.
    pub cow_copies: u64,
    /// Copies made for a write and given back because the page's other
    /// holders all let go of it during the copy (a race, not a cost).
    pub cow_abandoned: u64,
    /// Explicit copies into or out of buffers (`copy_from_slice` / `copy_to_slice`).
    pub explicit_copies: u64,
    /// Bytes moved by both kinds of copy.
    pub copied_bytes: u64,
}

/// The page arena, page reference counts and IOB descriptor table of one
/// node, with the base pools whose objects are their indexes.
pub struct BufferPool {
    arena: *mut u8,
    layout: Layout,
    page_count: usize,
    refs: Box<[AtomicU32]>,
    /// Base pool of page indexes; its spare is the pages neither allocated
    /// nor reserved (see the crate invariant).
    pages: Pool<u32>,
    iob_table: Box<[UnsafeCell<IobSlot>]>,
    /// Base pool of IOB slot indexes.
    iobs: Pool<u32>,
    cow_copies: AtomicU64,
    cow_abandoned: AtomicU64,
    explicit_copies: AtomicU64,
    copied_bytes: AtomicU64,
}

// SAFETY: the arena is only reached through `Buffer` handles. A page is written
// only through `&mut Buffer` after `make_exclusive` proved its count is one, so
// no other handle can read it concurrently. An IOB slot is owned by exactly one
// `Buffer` (allocated from the IOB pool, freed back on drop), so its
// `UnsafeCell` is never accessed from two threads at once. All shared counters
// are atomics.
unsafe impl Send for BufferPool {}
unsafe impl Sync for BufferPool {}

/// A facility's child pools of pages and IOBs.
struct Account {
    pages: Pool<u32>,
    iobs: Pool<u32>,
}

/// A facility's share of the buffer pools: a child pool of pages and a child
/// pool of IOB descriptors (the paper's child pools), from which it allocates
/// buffers. Cloning gives another handle; the child pools go away, returning
/// their reservations, when the last handle and the last buffer allocated
/// from them are gone.
#[derive(Clone)]
pub struct BufferChild {
    pool: Arc<BufferPool>,
    acct: Arc<Account>,
}

impl BufferPool {
    /// Allocates `page_count` pages and `iob_count` IOB descriptors up front.
    pub fn new(page_count: usize, iob_count: usize) -> Arc<BufferPool> {
        assert!(page_count > 0 && page_count <= POOL_PAGES_MAX);
        assert!(iob_count > 0 && iob_count < NONE as usize);
        let layout =
            Layout::from_size_align(page_count * PAGE_SIZE, PAGE_SIZE).expect("page arena layout");
        // SAFETY: layout has non-zero size (page_count > 0).
        let arena = unsafe { alloc_zeroed(layout) };
        assert!(!arena.is_null(), "cannot allocate page arena");
        Arc::new(BufferPool {
            arena,
            layout,
            page_count,
            refs: (0..page_count).map(|_| AtomicU32::new(0)).collect(),
            pages: Pool::base("pages", ranks::PAGE, (0..page_count as u32).collect()),
            iob_table: (0..iob_count)
                .map(|_| UnsafeCell::new(EMPTY_SLOT))
                .collect(),
            iobs: Pool::base("iobs", ranks::IOB, (0..iob_count as u32).collect()),
            cow_copies: AtomicU64::new(0),
            cow_abandoned: AtomicU64::new(0),
            explicit_copies: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
        })
    }

    /// Total pages in the arena.
    pub fn page_count(&self) -> usize {
        self.page_count
    }

    /// Pages of the base pool neither allocated nor reserved (by buffers for
    /// copy-on-write, or by child pools).
    pub fn pages_available(&self) -> usize {
        self.pages.spare()
    }

    /// Free IOB descriptors (not in any buffer's chain).
    pub fn iobs_free(&self) -> usize {
        self.iobs.free_objects()
    }

    /// IOB descriptors of the base pool neither allocated nor reserved.
    pub fn iobs_available(&self) -> usize {
        self.iobs.spare()
    }

    /// The page base pool (for stats, and for facilities that build compound
    /// pools over pages).
    pub fn page_pool(&self) -> &Pool<u32> {
        &self.pages
    }

    /// The IOB base pool.
    pub fn iob_pool(&self) -> &Pool<u32> {
        &self.iobs
    }

    /// Copy counters since the pool was created.
    pub fn stats(&self) -> BufferStats {
        BufferStats {
            cow_copies: self.cow_copies.load(Ordering::Relaxed),
            cow_abandoned: self.cow_abandoned.load(Ordering::Relaxed),
            explicit_copies: self.explicit_copies.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }

    /// Creates a facility's child pools: pages ranked `ranks::PAGE + offset`
    /// and IOBs ranked `ranks::IOB + offset` (`offset` < `ranks::BAND`), with
    /// the given thresholds. Fails if their antideadlock thresholds cannot be
    /// reserved now.
    pub fn child(
        self: &Arc<Self>,
        name: &str,
        offset: u32,
        pages: ChildLimits,
        iobs: ChildLimits,
    ) -> Result<BufferChild, PoolError> {
        assert!(
            offset > 0 && offset < ranks::BAND,
            "rank offset {offset} outside the band"
        );
        let page_pool = self.pages.child(
            &format!("{name}.pages"),
            Rank(ranks::PAGE.0 + offset),
            pages,
        )?;
        let iob_pool =
            self.iobs
                .child(&format!("{name}.iobs"), Rank(ranks::IOB.0 + offset), iobs)?;
        Ok(BufferChild {
            pool: Arc::clone(self),
            acct: Arc::new(Account {
                pages: page_pool,
                iobs: iob_pool,
            }),
        })
    }

    /// A buffer of `len` bytes from the base pools, without waiting (zero-filled
    /// only if the pages were never used: callers must not rely on content).
    #[inline]
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<Buffer, BufferError> {
        self.alloc_from(None, len)
    }

    /// A buffer of `len` bytes from the base pools, waiting in FIFO order for
    /// pages, then IOBs, while there are not enough (backpressure). Dropping
    /// the future before it completes reserves nothing.
    pub async fn alloc_wait(self: &Arc<Self>, len: usize) -> Result<Buffer, BufferError> {
        self.alloc_wait_from(None, len).await
    }

    /// A buffer of `len` bytes built from reservations of the base pools that
    /// the caller's work item made (see [`BufferChild::alloc_in`]).
    pub fn alloc_in(
        self: &Arc<Self>,
        pages: &mut Reservation<'_, u32>,
        iobs: &mut Reservation<'_, u32>,
        len: usize,
    ) -> Result<Buffer, BufferError> {
        self.alloc_in_from(None, pages, iobs, len)
    }

    fn pools<'a>(&'a self, acct: Option<&'a Arc<Account>>) -> (&'a Pool<u32>, &'a Pool<u32>) {
        match acct {
            Some(a) => (&a.pages, &a.iobs),
            None => (&self.pages, &self.iobs),
        }
    }

    #[inline]
    fn alloc_from(
        self: &Arc<Self>,
        acct: Option<&Arc<Account>>,
        len: usize,
    ) -> Result<Buffer, BufferError> {
        let (pp, ip) = self.pools(acct);
        let pages = pages_for(len);
        let iobs = iobs_for(pages);
        pp.try_reserve_detached(pages)
            .map_err(|e| pages_error(e, pages, pp))?;
        if let Err(e) = ip.try_reserve_detached(iobs) {
            pp.unreserve_detached(pages);
            return Err(iobs_error(e, iobs, ip));
        }
        Ok(self.build(acct, pages, len))
    }

    async fn alloc_wait_from(
        self: &Arc<Self>,
        acct: Option<&Arc<Account>>,
        len: usize,
    ) -> Result<Buffer, BufferError> {
        // Without waiters and with enough spare, as cheap as `alloc` (which
        // also respects the FIFO order of waiters).
        if let Ok(b) = self.alloc_from(acct, len) {
            return Ok(b);
        }
        let (pp, ip) = self.pools(acct);
        let pages = pages_for(len);
        let iobs = iobs_for(pages);
        // Pages before IOBs: the fixed order every work item follows.
        let mut work = WorkItem::new();
        let mut pr = pp
            .reserve(&mut work, pages)
            .await
            .map_err(|e| wait_error(e, "pages"))?;
        let mut ir = ip
            .reserve(&mut work, iobs)
            .await
            .map_err(|e| wait_error(e, "IOBs"))?;
        pr.detach(pages);
        ir.detach(iobs);
        Ok(self.build(acct, pages, len))
    }

    fn alloc_in_from(
        self: &Arc<Self>,
        acct: Option<&Arc<Account>>,
        pr: &mut Reservation<'_, u32>,
        ir: &mut Reservation<'_, u32>,
        len: usize,
    ) -> Result<Buffer, BufferError> {
        let (pp, ip) = self.pools(acct);
        assert!(
            pr.pool().same_pool(pp) && ir.pool().same_pool(ip),
            "alloc_in: reservations are not from this buffer pool's page and IOB pools"
        );
        let pages = pages_for(len);
        let iobs = iobs_for(pages);
        if pr.unallocated() < pages {
            return Err(BufferError::PagesExhausted {
                needed: pages,
                available: pr.unallocated(),
            });
        }
        if ir.unallocated() < iobs {
            return Err(BufferError::IobsExhausted {
                needed: iobs - ir.unallocated(),
            });
        }
        pr.detach(pages);
        ir.detach(iobs);
        Ok(self.build(acct, pages, len))
    }

    /// Builds a buffer over `pages` new pages; the caller holds `pages` page
    /// units and `iobs_for(pages)` IOB units of `acct`, which pass to it.
    #[inline]
    fn build(self: &Arc<Self>, acct: Option<&Arc<Account>>, pages: usize, len: usize) -> Buffer {
        let (pp, ip) = self.pools(acct);
        let mut chain = ChainBuilder::new(self, ip);
        for _ in 0..pages {
            let p = pp.allocate_detached();
            let old = self.refs[p as usize].swap(1, Ordering::AcqRel);
            debug_assert_eq!(old, 0, "free page {p} had references");
            chain.push(p);
        }
        chain.finish(acct.cloned(), 0, len)
    }

    /// Drops one reference to `page`.
    #[inline]
    fn drop_ref(&self, page: u32) -> Dropped {
        let before = self.refs[page as usize].fetch_sub(1, Ordering::AcqRel);
        let n = before & !COPYING;
        assert!(n >= 1, "page {page} released more often than referenced");
        match (n, before & COPYING != 0) {
            // A copier holds a reference, so a flagged count is never the last.
            (1, copying) => {
                debug_assert!(!copying);
                Dropped::Last
            }
            (2, true) => Dropped::HandedToCopier,
            _ => Dropped::Shared,
        }
    }

    /// A page's reference count, without the copy flag.
    fn ref_count(&self, page: u32) -> u32 {
        self.refs[page as usize].load(Ordering::Acquire) & !COPYING
    }

    /// Copy-on-write of one page a buffer of `acct` holds (see
    /// `Buffer::make_exclusive`): `Some(copy)` when the page was shared and
    /// our reference moved to the private copy, `None` when it is ours alone.
    fn copy_if_shared(&self, acct: Option<&Arc<Account>>, p: u32) -> Option<u32> {
        let count = &self.refs[p as usize];
        let mut spins = 0u32;
        loop {
            let cur = count.load(Ordering::Acquire);
            if cur == 1 {
                return None;
            }
            if cur & COPYING == 0 {
                if count
                    .compare_exchange_weak(cur, cur | COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
                continue;
            }
            // Another holder is copying this page: one page copy's wait.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let (pp, _) = self.pools(acct);
        // The unit our reference holds for its copy-on-write covers this
        // page (the crate invariant); no dropper can return it meanwhile.
        let np = pp.allocate_detached();
        // SAFETY: p and np are distinct in-arena pages; np is private to us;
        // p has another holder or a flagged count, so nobody writes it.
        unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(p), self.page_ptr(np), PAGE_SIZE) };
        self.refs[np as usize].store(1, Ordering::Release);
        // Clear the flag; drop our reference to p if others still hold it.
        let before = count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                let n = c & !COPYING;
                Some(if n >= 2 { n - 1 } else { n })
            })
            .expect("the update always applies");
        if before & !COPYING >= 2 {
            self.cow_copies.fetch_add(1, Ordering::Relaxed);
            self.copied_bytes
                .fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
            Some(np)
        } else {
            // The others dropped while we copied and the last one handed us
            // its unit: p is ours alone, the copy goes back (object first,
            // then the unit).
            self.refs[np as usize].store(0, Ordering::Release);
            pp.free_detached(np);
            pp.unreserve_detached(1);
            self.cow_abandoned.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn page_ptr(&self, page: u32) -> *mut u8 {
        debug_assert!((page as usize) < self.page_count);
        // SAFETY: page < page_count, so the offset stays inside the arena.
        unsafe { self.arena.add(page as usize * PAGE_SIZE) }
    }

    /// # Safety
    /// The caller must own slot `i` (it belongs to a live `Buffer` it holds,
    /// or was just allocated from the IOB pool).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, i: u32) -> &mut IobSlot {
        &mut *self.iob_table[i as usize].get()
    }

    /// Frees a chain: page references and IOBs go back, objects first, then
    /// their units (a unit must never be spare while its object is not free).
    fn free_chain(&self, mut head: u32, pp: &Pool<u32>, ip: &Pool<u32>) {
        let mut page_units = 0;
        let mut iobs = 0;
        while head != NONE {
            // SAFETY: the chain belongs to the buffer being dropped.
            let slot = unsafe { self.slot(head) };
            for &p in &slot.pages[..slot.count as usize] {
                match self.drop_ref(p) {
                    Dropped::Last => {
                        pp.free_detached(p);
                        page_units += 1;
                    }
                    Dropped::Shared => page_units += 1,
                    Dropped::HandedToCopier => {}
                }
            }
            let next = slot.next;
            *slot = EMPTY_SLOT;
            ip.free_detached(head);
            iobs += 1;
            head = next;
        }
        // Each reference held a page unit: either for the page itself or for
        // its copy-on-write (except those handed to a copier).
        pp.unreserve_detached(page_units);
        ip.unreserve_detached(iobs);
    }
}

impl BufferChild {
    /// The buffer pool this child draws from.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// The child pool of pages (reserve from it in a work item, then
    /// [`BufferChild::alloc_in`]).
    pub fn pages(&self) -> &Pool<u32> {
        &self.acct.pages
    }

    /// The child pool of IOB descriptors.
    pub fn iobs(&self) -> &Pool<u32> {
        &self.acct.iobs
    }

    pub fn page_stats(&self) -> PoolStats {
        self.acct.pages.stats()
    }

    pub fn iob_stats(&self) -> PoolStats {
        self.acct.iobs.stats()
    }

    /// A buffer of `len` bytes charged to this child's pools, without waiting.
    #[inline]
    pub fn alloc(&self, len: usize) -> Result<Buffer, BufferError> {
        self.pool.alloc_from(Some(&self.acct), len)
    }

    /// A buffer of `len` bytes charged to this child's pools, waiting in FIFO
    /// order while there are not enough (backpressure). A buffer larger than
    /// the antideadlock thresholds is refused ([`BufferError::TooLarge`]).
    pub async fn alloc_wait(&self, len: usize) -> Result<Buffer, BufferError> {
        self.pool.alloc_wait_from(Some(&self.acct), len).await
    }

    /// A buffer of `len` bytes built from reservations of this child's pools
    /// that the caller's work item made, in rank order with its other
    /// objects (e.g. a control block first). Takes
    /// [`pages_for`]`(len)` page units and [`iobs_for`] IOB units from them.
    pub fn alloc_in(
        &self,
        pages: &mut Reservation<'_, u32>,
        iobs: &mut Reservation<'_, u32>,
        len: usize,
    ) -> Result<Buffer, BufferError> {
        self.pool.alloc_in_from(Some(&self.acct), pages, iobs, len)
    }
}

impl std::fmt::Debug for BufferChild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferChild")
            .field("pages", &self.acct.pages)
            .field("iobs", &self.acct.iobs)
            .finish()
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: arena was allocated with exactly this layout in `new`.
        unsafe { dealloc(self.arena, self.layout) };
    }
}

/// Builds an IOB chain, taking IOB slots as pages arrive. The caller holds
/// an IOB unit for every slot the chain will need. No heap allocation: slots
/// are linked through their `next` field.
struct ChainBuilder<'a> {
    pool: &'a Arc<BufferPool>,
    iobs: &'a Pool<u32>,
    head: u32,
    tail: u32,
}

impl<'a> ChainBuilder<'a> {
    fn new(pool: &'a Arc<BufferPool>, iobs: &'a Pool<u32>) -> Self {
        ChainBuilder {
            pool,
            iobs,
            head: NONE,
            tail: NONE,
        }
    }

    /// Appends a page the caller already holds a reference for.
    #[inline]
    fn push(&mut self, page: u32) {
        // SAFETY: `tail` (when set) was allocated by this builder; nobody else owns it.
        let full = self.tail == NONE
            || unsafe { self.pool.slot(self.tail).count } as usize == IOB_PAGES_MAX;
        if full {
            let s = self.iobs.allocate_detached();
            if self.tail == NONE {
                self.head = s;
            } else {
                // SAFETY: as above.
                unsafe { self.pool.slot(self.tail).next = s };
            }
            self.tail = s;
        }
        // SAFETY: as above; free slots are kept EMPTY_SLOT.
        let slot = unsafe { self.pool.slot(self.tail) };
        slot.pages[slot.count as usize] = page;
        slot.count += 1;
    }

    fn finish(self, acct: Option<Arc<Account>>, offset: usize, len: usize) -> Buffer {
        Buffer {
            pool: Arc::clone(self.pool),
            acct,
            head: self.head,
            offset,
            len,
        }
    }
}

/// A chain of IOBs describing `len` bytes of host data starting `offset`
/// bytes into its first page.
///
/// Ownership: whoever holds the `Buffer` owns its IOBs. A facility that
/// submits a request moves the buffer into it and gets it back with the
/// completion; it must not touch the bytes meanwhile (it cannot: it no longer
/// holds the handle).
pub struct Buffer {
    pool: Arc<BufferPool>,
    /// The child pools its units are reserved from; `None`: the base pools.
    acct: Option<Arc<Account>>,
    head: u32,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool this buffer's pages come from.
    pub fn pool(&self) -> &Arc<BufferPool> {
        &self.pool
    }

    /// The page and IOB pools this buffer's units are reserved from.
    #[inline]
    fn pools(&self) -> (&Pool<u32>, &Pool<u32>) {
        self.pool.pools(self.acct.as_ref())
    }

    /// An empty buffer charged to the same pools.
    fn empty(&self) -> Buffer {
        Buffer {
            pool: Arc::clone(&self.pool),
            acct: self.acct.clone(),
            head: NONE,
            offset: 0,
            len: 0,
        }
    }

    /// Page ids in chain order (for tests and diagnostics).
    pub fn page_ids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        self.for_each_page(|p| v.push(p));
        v
    }

    /// Reference count of each page in chain order (for tests).
    pub fn page_refcounts(&self) -> Vec<u32> {
        let mut v = Vec::new();
        self.for_each_page(|p| v.push(self.pool.ref_count(p)));
        v
    }

    fn for_each_page(&self, mut f: impl FnMut(u32)) {
        let mut i = self.head;
        while i != NONE {
            // SAFETY: the chain belongs to this buffer; we only read it.
            let slot = unsafe { self.pool.slot(i) };
            for &p in &slot.pages[..slot.count as usize] {
                f(p);
            }
            i = slot.next;
        }
    }

    /// Whether `other` is charged to the same pools as this buffer (so
    /// [`Buffer::append`] may join them).
    pub fn same_account(&self, other: &Buffer) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool)
            && match (&self.acct, &other.acct) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// The paper's IOB *clone*: a second buffer over the same pages. Each
    /// shared page reserves one page for its later copy-on-write.
    pub fn share(&self) -> Result<Buffer, BufferError> {
        self.slice(0, self.len)
    }

    /// A shared view of `len` bytes starting at `start` (page-granular sharing;
    /// reserves a copy-on-write page per shared page, and the IOBs of the new
    /// chain, from the pools of this buffer).
    pub fn slice(&self, start: usize, len: usize) -> Result<Buffer, BufferError> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(BufferError::OutOfRange {
                start,
                len,
                buffer_len: self.len,
            });
        }
        if len == 0 {
            return Ok(self.empty());
        }
        let abs = self.offset + start;
        let first = abs / PAGE_SIZE;
        let last = (abs + len - 1) / PAGE_SIZE;
        let pages = last - first + 1;
        let iobs = iobs_for(pages);
        let (pp, ip) = self.pools();
        pp.try_reserve_detached(pages)
            .map_err(|e| pages_error(e, pages, pp))?;
        if let Err(e) = ip.try_reserve_detached(iobs) {
            pp.unreserve_detached(pages);
            return Err(iobs_error(e, iobs, ip));
        }
        let mut chain = ChainBuilder::new(&self.pool, ip);
        let mut idx = 0usize;
        self.for_each_page(|p| {
            if idx >= first && idx <= last {
                let before = self.pool.refs[p as usize].fetch_add(1, Ordering::AcqRel);
                debug_assert!(before >= 1);
                chain.push(p);
            }
            idx += 1;
        });
        Ok(chain.finish(self.acct.clone(), abs % PAGE_SIZE, len))
    }

    /// Splits the buffer at byte `at`: `self` keeps `[0, at)`, the result
    /// holds `[at, len)`. Pages *move*, nothing is shared or copied, so both
    /// halves stay writable in place (a back end can read from disk into each).
    /// `at` must fall on a page boundary of the underlying pages.
    pub fn split_off(&mut self, at: usize) -> Result<Buffer, BufferError> {
        if at > self.len || !(self.offset + at).is_multiple_of(PAGE_SIZE) {
            return Err(BufferError::Unaligned { at });
        }
        let keep_pages = (self.offset + at) / PAGE_SIZE;
        let tail_len = self.len - at;
        if tail_len == 0 {
            return Ok(self.empty());
        }
        if keep_pages == 0 {
            let mut tail = self.empty();
            tail.head = std::mem::replace(&mut self.head, NONE);
            tail.offset = std::mem::replace(&mut self.offset, 0);
            tail.len = tail_len;
            self.len = 0;
            return Ok(tail);
        }
        // Walk to the IOB holding page index `keep_pages`.
        let mut seen = 0usize;
        let mut i = self.head;
        loop {
            // SAFETY: the chain is ours (`&mut self`).
            let slot = unsafe { self.pool.slot(i) };
            let n = slot.count as usize;
            if seen + n == keep_pages {
                // Split between IOBs: just cut the link.
                let next = std::mem::replace(&mut slot.next, NONE);
                self.len = at;
                let mut tail = self.empty();
                tail.head = next;
                tail.len = tail_len;
                return Ok(tail);
            }
            if seen + n > keep_pages {
                // Split inside this IOB: move its later pages to a new IOB,
                // reserved from this buffer's IOB pool.
                let (_, ip) = self.pools();
                ip.try_reserve_detached(1)
                    .map_err(|e| iobs_error(e, 1, ip))?;
                let new = ip.allocate_detached();
                let k = keep_pages - seen;
                // SAFETY: `new` was just allocated, so we own it; it differs from `i`.
                let ns = unsafe { self.pool.slot(new) };
                debug_assert_eq!(ns.count, 0, "free IOB slots are kept empty");
                for (j, p) in slot.pages[k..n].iter_mut().enumerate() {
                    ns.pages[j] = std::mem::replace(p, NONE);
                }
                ns.count = (n - k) as u8;
                ns.next = std::mem::replace(&mut slot.next, NONE);
                slot.count = k as u8;
                self.len = at;
                let mut tail = self.empty();
                tail.head = new;
                tail.len = tail_len;
                return Ok(tail);
            }
            seen += n;
            i = slot.next;
        }
    }

    /// Appends `other` after `self` (the inverse of [`Buffer::split_off`]).
    /// `self` must end on a page boundary and `other` start at one. Both must
    /// be charged to the same pools (allocated from the same [`BufferChild`],
    /// or both from the base pools): a chain returns its units to one place.
    pub fn append(&mut self, mut other: Buffer) -> Result<(), BufferError> {
        assert!(
            Arc::ptr_eq(&self.pool, &other.pool),
            "buffers from different pools"
        );
        let same_acct = match (&self.acct, &other.acct) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        assert!(
            same_acct || other.head == NONE,
            "append of buffers charged to different child pools"
        );
        if other.len == 0 {
            return Ok(());
        }
        if !(self.offset + self.len).is_multiple_of(PAGE_SIZE) || other.offset != 0 {
            return Err(BufferError::Unaligned { at: self.len });
        }
        let ohead = std::mem::replace(&mut other.head, NONE);
        let olen = std::mem::replace(&mut other.len, 0);
        if self.head == NONE {
            self.head = ohead;
            self.offset = 0;
            self.len = olen;
            return Ok(());
        }
        let mut i = self.head;
        loop {
            // SAFETY: the chain is ours (`&mut self`).
            let slot = unsafe { self.pool.slot(i) };
            if slot.next == NONE {
                slot.next = ohead;
                break;
            }
            i = slot.next;
        }
        self.len += olen;
        Ok(())
    }

    /// Read-only segments in order; their lengths sum to `len()`.
    pub fn segments(&self) -> Segments<'_> {
        Segments {
            buf: self,
            slot: self.head,
            idx: 0,
            skip: self.offset,
            remaining: self.len,
        }
    }

    /// Makes every page private to this buffer, copying shared pages into the
    /// pages reserved when they were shared.
    ///
    /// Other holders may drop their references while we copy (a reply sent on
    /// another thread), so the decision is made under the page's `COPYING`
    /// flag: set it while the page is still shared (it stays read-only to
    /// everyone: no holder writes a page whose count is above one), copy, then
    /// clear it and move our reference to the copy if the page is still
    /// shared. If the others left meanwhile, the last of them handed its unit
    /// to us rather than returning it (`Dropped::HandedToCopier`), so the
    /// page we took for the copy was covered all along; we keep the original,
    /// give the copy back and return that unit. Two holders copying the same
    /// page take turns (the flag is held for one page copy).
    fn make_exclusive(&mut self) {
        let mut i = self.head;
        while i != NONE {
            // SAFETY: we hold `&mut self`, the chain is ours.
            let slot = unsafe { self.pool.slot(i) };
            for k in 0..slot.count as usize {
                let p = slot.pages[k];
                if let Some(np) = self.pool.copy_if_shared(self.acct.as_ref(), p) {
                    slot.pages[k] = np;
                }
            }
            i = slot.next;
        }
    }

    /// Writable segments in order, after copy-on-write of any shared page.
    /// This is where a front end receives host data from the network and a
    /// back end reads from disk: straight into the pages.
    pub fn segments_mut(&mut self) -> SegmentsMut<'_> {
        self.make_exclusive();
        SegmentsMut {
            slot: self.head,
            idx: 0,
            skip: self.offset,
            remaining: self.len,
            buf: self,
        }
    }

    /// Fills the buffer with zeros (memset, not a copy).
    pub fn zero(&mut self) {
        for s in self.segments_mut() {
            s.fill(0);
        }
    }

    /// Copies `src` into the buffer at `at`. Counted: host data should reach
    /// pages without this on the data path.
    pub fn copy_from_slice(&mut self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.len, "copy_from_slice out of range");
        let mut pos = 0usize;
        let mut done = 0usize;
        for seg in self.segments_mut() {
            let seg_end = pos + seg.len();
            if seg_end > at && done < src.len() {
                let from = at.max(pos) - pos;
                let n = (seg.len() - from).min(src.len() - done);
                seg[from..from + n].copy_from_slice(&src[done..done + n]);
                done += n;
            }
            pos = seg_end;
        }
        self.count_copy(src.len());
    }

    /// Copies bytes from `at` into `dst`. Counted like `copy_from_slice`.
    pub fn copy_to_slice(&self, at: usize, dst: &mut [u8]) {
        assert!(at + dst.len() <= self.len, "copy_to_slice out of range");
        let mut pos = 0usize;
        let mut done = 0usize;
        for seg in self.segments() {
            let seg_end = pos + seg.len();
            if seg_end > at && done < dst.len() {
                let from = at.max(pos) - pos;
                let n = (seg.len() - from).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&seg[from..from + n]);
                done += n;
            }
            pos = seg_end;
        }
        self.count_copy(dst.len());
    }

    /// The whole content as a vector (tests, control path). Counted.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        self.copy_to_slice(0, &mut v);
        v
    }

    fn count_copy(&self, n: usize) {
        self.pool.explicit_copies.fetch_add(1, Ordering::Relaxed);
        self.pool
            .copied_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let (pp, ip) = self.pools();
        self.pool.free_chain(self.head, pp, ip);
    }
}

/// Iterator over a buffer's byte segments (at most one page each).
pub struct Segments<'a> {
    buf: &'a Buffer,
    slot: u32,
    idx: usize,
    skip: usize,
    remaining: usize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (p, skip, n) = next_page(
            &self.buf.pool,
            &mut self.slot,
            &mut self.idx,
            &mut self.skip,
            &mut self.remaining,
        )?;
        // SAFETY: page p is referenced by this buffer; it is written only by an
        // exclusive owner, and while we hold `&Buffer` nobody can take `&mut`.
        // Other holders of a shared page copy before writing.
        Some(unsafe { std::slice::from_raw_parts(self.buf.pool.page_ptr(p).add(skip), n) })
    }
}

/// Iterator over a buffer's writable byte segments.
pub struct SegmentsMut<'a> {
    buf: &'a mut Buffer,
    slot: u32,
    idx: usize,
    skip: usize,
    remaining: usize,
}

impl<'a> Iterator for SegmentsMut<'a> {
    type Item = &'a mut [u8];
    fn next(&mut self) -> Option<&'a mut [u8]> {
        let (p, skip, n) = next_page(
            &self.buf.pool,
            &mut self.slot,
            &mut self.idx,
            &mut self.skip,
            &mut self.remaining,
        )?;
        // SAFETY: `segments_mut` made every page exclusive (count 1, held by
        // this buffer) and we hold `&mut Buffer`; each page is yielded once, so
        // the returned slices never alias.
        Some(unsafe { std::slice::from_raw_parts_mut(self.buf.pool.page_ptr(p).add(skip), n) })
    }
}

fn next_page(
    pool: &BufferPool,
    slot_i: &mut u32,
    idx: &mut usize,
    skip: &mut usize,
    remaining: &mut usize,
) -> Option<(u32, usize, usize)> {
    if *remaining == 0 {
        return None;
    }
    loop {
        if *slot_i == NONE {
            return None;
        }
        // SAFETY: the chain belongs to the buffer being iterated.
        let slot = unsafe { pool.slot(*slot_i) };
        if *idx < slot.count as usize {
            let p = slot.pages[*idx];
            *idx += 1;
            let s = *skip;
            *skip = 0;
            let n = (PAGE_SIZE - s).min(*remaining);
            *remaining -= n;
            return Some((p, s, n));
        }
        *slot_i = slot.next;
        *idx = 0;
    }
}

#[cfg(test)]
mod tests;
