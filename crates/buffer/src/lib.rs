//! Buffer management (the paper's section "Buffer management").
//!
//! Host data live in 4 KiB **pages** taken from one arena allocated when the
//! [`BufferPool`] is created; nothing on the data path allocates memory for
//! host data afterwards. Each page carries a reference count. A [`Buffer`] is
//! a chain of **IOBs**; an IOB points to up to [`IOB_PAGES_MAX`] pages and
//! chains to the next IOB for longer transfers. IOB descriptors also come from
//! a fixed table sized at start-up.
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
//! `available == free_pages - Σ(refcount(p) - 1)` over allocated pages `p`:
//! every extra reference to a page holds one reserved page for its eventual
//! copy-on-write. Allocations and shares take from `available`; dropping a
//! reference gives one back.
//!
//! # Copies
//!
//! Every memory-to-memory copy of host data made through this crate is counted
//! ([`BufferStats`]): copy-on-write copies and explicit [`Buffer::copy_from_slice`]
//! / [`Buffer::copy_to_slice`] calls. The data path uses neither; tests prove it
//! by reading the counters.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

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
    /// Explicit copies into or out of buffers (`copy_from_slice` / `copy_to_slice`).
    pub explicit_copies: u64,
    /// Bytes moved by both kinds of copy.
    pub copied_bytes: u64,
}

/// The page arena, page reference counts and IOB descriptor table of one node.
pub struct BufferPool {
    arena: *mut u8,
    layout: Layout,
    page_count: usize,
    refs: Box<[AtomicU32]>,
    free_pages: ArrayQueue<u32>,
    /// Pages that may still be allocated or reserved (see the crate invariant).
    available: AtomicUsize,
    iobs: Box<[UnsafeCell<IobSlot>]>,
    free_iobs: ArrayQueue<u32>,
    cow_copies: AtomicU64,
    explicit_copies: AtomicU64,
    copied_bytes: AtomicU64,
}

// SAFETY: the arena is only reached through `Buffer` handles. A page is written
// only through `&mut Buffer` after `make_exclusive` proved its count is one, so
// no other handle can read it concurrently. An IOB slot is owned by exactly one
// `Buffer` (taken from `free_iobs`, returned on drop), so its `UnsafeCell` is
// never accessed from two threads at once. All shared counters are atomics.
unsafe impl Send for BufferPool {}
unsafe impl Sync for BufferPool {}

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
        let free_pages = ArrayQueue::new(page_count);
        for p in 0..page_count as u32 {
            free_pages.push(p).expect("queue sized for every page");
        }
        let free_iobs = ArrayQueue::new(iob_count);
        for i in 0..iob_count as u32 {
            free_iobs.push(i).expect("queue sized for every iob");
        }
        Arc::new(BufferPool {
            arena,
            layout,
            page_count,
            refs: (0..page_count).map(|_| AtomicU32::new(0)).collect(),
            free_pages,
            available: AtomicUsize::new(page_count),
            iobs: (0..iob_count)
                .map(|_| UnsafeCell::new(EMPTY_SLOT))
                .collect(),
            free_iobs,
            cow_copies: AtomicU64::new(0),
            explicit_copies: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
        })
    }

    /// Total pages in the arena.
    pub fn page_count(&self) -> usize {
        self.page_count
    }

    /// Pages neither allocated nor reserved for a copy-on-write.
    pub fn pages_available(&self) -> usize {
        self.available.load(Ordering::Acquire)
    }

    /// Free IOB descriptors.
    pub fn iobs_free(&self) -> usize {
        self.free_iobs.len()
    }

    /// Copy counters since the pool was created.
    pub fn stats(&self) -> BufferStats {
        BufferStats {
            cow_copies: self.cow_copies.load(Ordering::Relaxed),
            explicit_copies: self.explicit_copies.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }

    /// A buffer of `len` bytes (zero-filled only if the pages were never used:
    /// callers must not rely on content).
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<Buffer, BufferError> {
        let pages = len.div_ceil(PAGE_SIZE);
        self.take_available(pages)?;
        let mut chain = ChainBuilder::new(self);
        for i in 0..pages {
            let p = self
                .free_pages
                .pop()
                .expect("available pages imply free pages");
            let old = self.refs[p as usize].swap(1, Ordering::AcqRel);
            debug_assert_eq!(old, 0, "free page {p} had references");
            if let Err(e) = chain.push(p) {
                self.release_page(p);
                self.give_available(pages - i - 1);
                drop(chain.finish(0, 0));
                return Err(e);
            }
        }
        Ok(chain.finish(0, len))
    }

    fn take_available(&self, n: usize) -> Result<(), BufferError> {
        let mut cur = self.available.load(Ordering::Acquire);
        loop {
            if cur < n {
                return Err(BufferError::PagesExhausted {
                    needed: n,
                    available: cur,
                });
            }
            match self.available.compare_exchange_weak(
                cur,
                cur - n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    fn give_available(&self, n: usize) {
        let before = self.available.fetch_add(n, Ordering::AcqRel);
        debug_assert!(before + n <= self.page_count);
    }

    /// Drops one reference to `page`; returns the page (or its reservation).
    fn release_page(&self, page: u32) {
        let before = self.refs[page as usize].fetch_sub(1, Ordering::AcqRel);
        assert!(
            before >= 1,
            "page {page} released more often than referenced"
        );
        if before == 1 {
            self.free_pages
                .push(page)
                .expect("free list has room for every page");
        }
        // Either the page itself or the copy-on-write reservation held by the
        // extra reference becomes available again.
        self.give_available(1);
    }

    fn page_ptr(&self, page: u32) -> *mut u8 {
        debug_assert!((page as usize) < self.page_count);
        // SAFETY: page < page_count, so the offset stays inside the arena.
        unsafe { self.arena.add(page as usize * PAGE_SIZE) }
    }

    /// # Safety
    /// The caller must own slot `i` (it belongs to a live `Buffer` it holds).
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, i: u32) -> &mut IobSlot {
        &mut *self.iobs[i as usize].get()
    }

    fn free_chain(&self, mut head: u32) {
        while head != NONE {
            // SAFETY: the chain belongs to the buffer being dropped.
            let slot = unsafe { self.slot(head) };
            for &p in &slot.pages[..slot.count as usize] {
                self.release_page(p);
            }
            let next = slot.next;
            *slot = EMPTY_SLOT;
            self.free_iobs
                .push(head)
                .expect("free list has room for every iob");
            head = next;
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: arena was allocated with exactly this layout in `new`.
        unsafe { dealloc(self.arena, self.layout) };
    }
}

/// Builds an IOB chain, taking IOB slots from the free list as pages arrive.
/// No heap allocation: slots are linked through their `next` field.
struct ChainBuilder<'a> {
    pool: &'a Arc<BufferPool>,
    head: u32,
    tail: u32,
    pushed: usize,
}

impl<'a> ChainBuilder<'a> {
    fn new(pool: &'a Arc<BufferPool>) -> Self {
        ChainBuilder {
            pool,
            head: NONE,
            tail: NONE,
            pushed: 0,
        }
    }

    /// Appends a page the caller already holds a reference for. On failure
    /// the caller still owns that reference.
    fn push(&mut self, page: u32) -> Result<(), BufferError> {
        // SAFETY: `tail` (when set) was popped by this builder; nobody else owns it.
        let full = self.tail == NONE
            || unsafe { self.pool.slot(self.tail).count } as usize == IOB_PAGES_MAX;
        if full {
            let s = self
                .pool
                .free_iobs
                .pop()
                .ok_or(BufferError::IobsExhausted { needed: 1 })?;
            if self.tail == NONE {
                self.head = s;
            } else {
                // SAFETY: as above.
                unsafe { self.pool.slot(self.tail).next = s };
            }
            self.tail = s;
        }
        // SAFETY: as above.
        let slot = unsafe { self.pool.slot(self.tail) };
        slot.pages[slot.count as usize] = page;
        slot.count += 1;
        self.pushed += 1;
        Ok(())
    }

    fn finish(self, offset: usize, len: usize) -> Buffer {
        Buffer {
            pool: Arc::clone(self.pool),
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

    /// Page ids in chain order (for tests and diagnostics).
    pub fn page_ids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        self.for_each_page(|p| v.push(p));
        v
    }

    /// Reference count of each page in chain order (for tests).
    pub fn page_refcounts(&self) -> Vec<u32> {
        let mut v = Vec::new();
        self.for_each_page(|p| v.push(self.pool.refs[p as usize].load(Ordering::Acquire)));
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

    /// The paper's IOB *clone*: a second buffer over the same pages. Each
    /// shared page reserves one page for its later copy-on-write.
    pub fn share(&self) -> Result<Buffer, BufferError> {
        self.slice(0, self.len)
    }

    /// A shared view of `len` bytes starting at `start` (page-granular sharing;
    /// reserves a copy-on-write page per shared page).
    pub fn slice(&self, start: usize, len: usize) -> Result<Buffer, BufferError> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(BufferError::OutOfRange {
                start,
                len,
                buffer_len: self.len,
            });
        }
        if len == 0 {
            return Ok(Buffer {
                pool: Arc::clone(&self.pool),
                head: NONE,
                offset: 0,
                len: 0,
            });
        }
        let abs = self.offset + start;
        let first = abs / PAGE_SIZE;
        let last = (abs + len - 1) / PAGE_SIZE;
        let pages = last - first + 1;
        self.pool.take_available(pages)?;
        let mut chain = ChainBuilder::new(&self.pool);
        let mut idx = 0usize;
        let mut failed = None;
        self.for_each_page(|p| {
            if idx >= first && idx <= last && failed.is_none() {
                let before = self.pool.refs[p as usize].fetch_add(1, Ordering::AcqRel);
                debug_assert!(before >= 1);
                if let Err(e) = chain.push(p) {
                    self.pool.release_page(p);
                    failed = Some(e);
                }
            }
            idx += 1;
        });
        if let Some(e) = failed {
            // Pushed pages give their reservation back when the partial chain
            // drops; the failed page gave its own back in `release_page`.
            self.pool.give_available(pages - chain.pushed - 1);
            drop(chain.finish(0, 0));
            return Err(e);
        }
        Ok(chain.finish(abs % PAGE_SIZE, len))
    }

    /// Splits the buffer at byte `at`: `self` keeps `[0, at)`, the result
    /// holds `[at, len)`. Pages *move*, nothing is shared or copied, so both
    /// halves stay writable in place (a back end can read from disk into each).
    /// `at` must fall on a page boundary of the underlying pages.
    pub fn split_off(&mut self, at: usize) -> Result<Buffer, BufferError> {
        if at > self.len || (self.offset + at) % PAGE_SIZE != 0 {
            return Err(BufferError::Unaligned { at });
        }
        let keep_pages = (self.offset + at) / PAGE_SIZE;
        let tail_len = self.len - at;
        if tail_len == 0 {
            return Ok(Buffer {
                pool: Arc::clone(&self.pool),
                head: NONE,
                offset: 0,
                len: 0,
            });
        }
        if keep_pages == 0 {
            let head = std::mem::replace(&mut self.head, NONE);
            let off = std::mem::replace(&mut self.offset, 0);
            self.len = 0;
            return Ok(Buffer {
                pool: Arc::clone(&self.pool),
                head,
                offset: off,
                len: tail_len,
            });
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
                return Ok(Buffer {
                    pool: Arc::clone(&self.pool),
                    head: next,
                    offset: 0,
                    len: tail_len,
                });
            }
            if seen + n > keep_pages {
                // Split inside this IOB: move its later pages to a new IOB.
                let new = self
                    .pool
                    .free_iobs
                    .pop()
                    .ok_or(BufferError::IobsExhausted { needed: 1 })?;
                let k = keep_pages - seen;
                // SAFETY: `new` was just popped, so we own it; it differs from `i`.
                let ns = unsafe { self.pool.slot(new) };
                *ns = EMPTY_SLOT;
                for (j, p) in slot.pages[k..n].iter_mut().enumerate() {
                    ns.pages[j] = std::mem::replace(p, NONE);
                }
                ns.count = (n - k) as u8;
                ns.next = std::mem::replace(&mut slot.next, NONE);
                slot.count = k as u8;
                self.len = at;
                return Ok(Buffer {
                    pool: Arc::clone(&self.pool),
                    head: new,
                    offset: 0,
                    len: tail_len,
                });
            }
            seen += n;
            i = slot.next;
        }
    }

    /// Appends `other` after `self` (the inverse of [`Buffer::split_off`]).
    /// `self` must end on a page boundary and `other` start at one.
    pub fn append(&mut self, mut other: Buffer) -> Result<(), BufferError> {
        assert!(
            Arc::ptr_eq(&self.pool, &other.pool),
            "buffers from different pools"
        );
        if other.len == 0 {
            return Ok(());
        }
        if (self.offset + self.len) % PAGE_SIZE != 0 || other.offset != 0 {
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
    fn make_exclusive(&mut self) {
        let mut i = self.head;
        while i != NONE {
            // SAFETY: we hold `&mut self`, the chain is ours.
            let slot = unsafe { self.pool.slot(i) };
            for k in 0..slot.count as usize {
                let p = slot.pages[k];
                if self.pool.refs[p as usize].load(Ordering::Acquire) > 1 {
                    // The reservation made at share time guarantees a free page.
                    let np = self
                        .pool
                        .free_pages
                        .pop()
                        .expect("copy-on-write page was reserved at share time");
                    // SAFETY: p and np are distinct in-arena pages; np is
                    // private to us; p is shared and thus read-only to all.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.pool.page_ptr(p),
                            self.pool.page_ptr(np),
                            PAGE_SIZE,
                        )
                    };
                    self.pool.refs[np as usize].store(1, Ordering::Release);
                    // The old page keeps its other references. The reservation
                    // our extra reference held is now the page `np` itself.
                    let before = self.pool.refs[p as usize].fetch_sub(1, Ordering::AcqRel);
                    assert!(before >= 2);
                    slot.pages[k] = np;
                    self.pool.cow_copies.fetch_add(1, Ordering::Relaxed);
                    self.pool
                        .copied_bytes
                        .fetch_add(PAGE_SIZE as u64, Ordering::Relaxed);
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
        self.pool.free_chain(self.head);
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
