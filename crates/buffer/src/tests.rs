use super::*;
use proptest::prelude::*;

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

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Share(usize),
    Slice(usize, usize, usize),
    Write(usize, u8),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..40_000).prop_map(Op::Alloc),
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
        let mut live: Vec<(Buffer, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(len) => {
                    if let Ok(mut b) = pool.alloc(len) {
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
            prop_assert_eq!(pool.pages_available() + extra + refs.len(), 64);
            for (p, c) in &refs {
                prop_assert_eq!(pool.refs[*p as usize].load(Ordering::Acquire) as usize, *c);
            }
        }
        live.clear();
        prop_assert_eq!(pool.pages_available(), 64);
        prop_assert_eq!(pool.iobs_free(), 24);
    }
}
